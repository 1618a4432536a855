//! The replication reader: one task that owns the replication session from start to
//! stop, through every reconnect.
//!
//! Per session it checks the source (wal_level, REPLICATION, publication, slot), creates
//! what is missing when allowed, hands the exported snapshot of a new slot to the
//! consumer and waits until it is loaded, streams from the durable position, and hands
//! committed transactions over a bounded channel. While the consumer is slow it stops
//! reading (the socket fills up and the walsender waits) but keeps answering keepalives.
//!
//! Acknowledgement: the flush position sent to PostgreSQL is the consumer's durable
//! position, never more, except that when nothing is in flight (no transaction partly
//! received, none handed over and not yet durable) it is the last keepalive's `wal_end`,
//! so an idle source or writes to unpublished tables never pin WAL. It never goes
//! backwards. A status update goes out at least every third of `wal_sender_timeout`,
//! whenever a keepalive asks for one, and whenever the durable position moves.
//!
//! After any failure it reconnects with capped exponential backoff and jitter, resuming
//! from the durable position; the consumer skips what it already persisted.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::assemble::{Assembler, Output};
use crate::conn::{ReplConn, standby_status};
use crate::decode::{PgOutput, ReplMessage, parse_copy, parse_pgoutput};
use crate::error::{CdcError, DbError};
use crate::model::Lsn;
use crate::stream::{Durable, Event, SnapshotRequest};
use crate::tls::TlsSettings;
use crate::value::{Kind, TypeInfo};

/// What the reader needs to know.
#[derive(Debug, Clone)]
pub struct CdcConfig {
    /// The source database (the same settings serve the replication connection).
    pub source: tokio_postgres::Config,
    /// TLS for both connections (see [`crate::tls::parse_url`]).
    pub tls: TlsSettings,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Create the publication and slot when missing.
    pub create: bool,
    /// Published tables, schema-qualified; empty: every table of `schema`.
    pub tables: Vec<String>,
    /// Schema published when `tables` is empty.
    pub schema: String,
    /// Whether the consumer needs the initial snapshot (see `SlotWithoutState`).
    pub needs_snapshot: bool,
    /// The consumer's persisted position (its checkpoint), if any.
    pub start: Option<Lsn>,
    /// Transactions waiting for the consumer, at most.
    pub channel_capacity: usize,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl CdcConfig {
    /// Settings with the defaults for everything but the names.
    pub fn new(source: tokio_postgres::Config, slot: &str, publication: &str) -> CdcConfig {
        CdcConfig {
            tls: TlsSettings::from_config(&source),
            source,
            slot: slot.to_string(),
            publication: publication.to_string(),
            create: true,
            tables: Vec::new(),
            schema: "public".into(),
            needs_snapshot: true,
            start: None,
            channel_capacity: 1024,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
        }
    }
}

/// Where the reader is.
#[derive(Debug, Clone, PartialEq)]
pub enum CdcStatus {
    /// Connecting or setting up.
    Connecting,
    /// Streaming from the walsender with this PID.
    Streaming {
        /// The walsender's PID.
        pid: i32,
    },
    /// The last session failed; the next attempt comes after a delay.
    Retrying {
        /// What failed, with what to do.
        error: String,
        /// Whether waiting is likely to help.
        transient: bool,
        /// Attempts failed in a row.
        attempt: u32,
    },
    /// Stopped for good.
    Stopped,
}

/// The running reader.
pub struct CdcHandle {
    /// Where the consumer reports durable positions.
    pub durable: Durable,
    /// The reader's state, for health.
    pub status: watch::Receiver<CdcStatus>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl CdcHandle {
    /// Stops the reader: it sends a last status update with the durable position, closes
    /// the session and ends. Call it after the consumer has reported its last batch.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the reader; committed transactions arrive on the returned channel.
pub fn start(config: CdcConfig) -> (CdcHandle, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
    let (durable, durable_rx) = Durable::new(config.start);
    let (status_tx, status) = watch::channel(CdcStatus::Connecting);
    let stop = CancellationToken::new();
    let reader = Reader {
        config,
        tx,
        durable: durable_rx,
        status: status_tx,
        stop: stop.clone(),
    };
    let task = tokio::spawn(reader.run());
    (
        CdcHandle {
            durable,
            status,
            stop,
            task,
        },
        rx,
    )
}

struct Reader {
    config: CdcConfig,
    tx: mpsc::Sender<Event>,
    durable: watch::Receiver<Option<Lsn>>,
    status: watch::Sender<CdcStatus>,
    stop: CancellationToken,
}

/// A delay in [d/2, d] for d = min(max, min·2^attempt): spreads reconnects of many
/// instances.
fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let d = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let jitter: f64 = rand::random_range(0.5..=1.0);
    d.mul_f64(jitter)
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_qualified(s: &str) -> String {
    match s.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(s),
    }
}

/// `10s`, `500ms`, `1min`: PostgreSQL's SHOW format for a time GUC.
fn parse_pg_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let n: u64 = text[..split].parse().ok()?;
    let unit = &text[split..];
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => return None,
    })
}

fn now_micros_pg() -> i64 {
    chrono::Utc::now().timestamp_micros() - 946_684_800_000_000
}

/// Maps a server error at START_REPLICATION to the operator-facing error.
fn start_error(slot: &str, e: DbError) -> CdcError {
    if e.code == "55006" {
        let pid = e
            .message
            .rsplit("PID ")
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        return CdcError::SlotActive {
            slot: slot.to_string(),
            pid,
        };
    }
    if e.message.contains("can no longer get changes") || e.message.contains("invalidated") {
        return CdcError::SlotInvalidated(slot.to_string());
    }
    if e.code == "42501" {
        return CdcError::NoReplicationPrivilege(String::new());
    }
    CdcError::Server(e)
}

/// What the catalog says about the slot.
struct SlotRow {
    plugin: Option<String>,
    database: Option<String>,
    active_pid: Option<i32>,
    wal_status: Option<String>,
    confirmed_flush: Option<Lsn>,
}

impl Reader {
    /// The durable position (the guard must not live across an await).
    fn durable_now(&self) -> Option<Lsn> {
        *self.durable.borrow()
    }

    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            let _ = self.status.send(CdcStatus::Connecting);
            match self.session(&mut attempt).await {
                Ok(()) => break,
                Err(CdcError::ConsumerGone) => break,
                Err(e) => {
                    metrics::counter!("pulse_replication_reconnects_total").increment(1);
                    let transient = e.is_transient();
                    let delay = backoff(self.config.backoff_min, self.config.backoff_max, attempt);
                    if transient {
                        tracing::warn!(error = %e, attempt, retry_in = ?delay, "replication stream interrupted; reconnecting");
                    } else {
                        tracing::error!(error = %e, attempt, retry_in = ?delay, "replication cannot proceed; retrying until fixed");
                    }
                    attempt = attempt.saturating_add(1);
                    let _ = self.status.send(CdcStatus::Retrying {
                        error: e.to_string(),
                        transient,
                        attempt,
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.cancelled() => break,
                    }
                }
            }
        }
        let _ = self.status.send(CdcStatus::Stopped);
    }

    async fn catalog(&self) -> Result<tokio_postgres::Client, CdcError> {
        let tls = self.config.tls.connector().map_err(|e| CdcError::Tls(e.0))?;
        let (client, conn) = self
            .config
            .source
            .connect(tls)
            .await
            .map_err(|e| crate::tls::explain_connect_error(e, &self.config.tls))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "catalog connection ended");
            }
        });
        Ok(client)
    }

    /// Checks the source and makes sure the publication exists.
    async fn prepare(&self, catalog: &tokio_postgres::Client) -> Result<Duration, CdcError> {
        let wal_level: String = catalog.query_one("SHOW wal_level", &[]).await?.get(0);
        if wal_level != "logical" {
            return Err(CdcError::WalLevel(wal_level));
        }
        let role = catalog
            .query_one(
                "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await?;
        if !role.get::<_, bool>(1) {
            return Err(CdcError::NoReplicationPrivilege(role.get(0)));
        }
        let timeout: String = catalog.query_one("SHOW wal_sender_timeout", &[]).await?.get(0);
        let timeout = parse_pg_duration(&timeout)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));

        let c = &self.config;
        for t in &c.tables {
            let exists: Option<String> = catalog
                .query_one("SELECT to_regclass($1)::text", &[&quote_qualified(t)])
                .await?
                .get(0);
            if exists.is_none() {
                return Err(CdcError::TableMissing(t.clone()));
            }
        }
        let publication = catalog
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&c.publication],
            )
            .await?;
        if publication.is_none() {
            if !c.create {
                return Err(CdcError::PublicationMissing(c.publication.clone()));
            }
            let what = if c.tables.is_empty() {
                format!("FOR TABLES IN SCHEMA {}", quote_ident(&c.schema))
            } else {
                format!(
                    "FOR TABLE {}",
                    c.tables
                        .iter()
                        .map(|t| quote_qualified(t))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            tracing::info!(publication = %c.publication, %what, "creating the publication");
            let sql = format!("CREATE PUBLICATION {} {what}", quote_ident(&c.publication));
            if let Err(e) = catalog.batch_execute(&sql).await {
                // Another instance may have created it meanwhile; then it is fine.
                if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                    return Err(e.into());
                }
            }
        }
        for t in &c.tables {
            let (schema, table) = t.split_once('.').unwrap_or(("public", t));
            let row = catalog
                .query_opt(
                    "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                    &[&c.publication, &schema, &table],
                )
                .await?;
            if row.is_none() {
                return Err(CdcError::PublicationLacksTable {
                    publication: c.publication.clone(),
                    table: t.clone(),
                });
            }
        }
        Ok(timeout)
    }

    async fn slot_row(&self, catalog: &tokio_postgres::Client) -> Result<Option<SlotRow>, CdcError> {
        let row = catalog
            .query_opt(
                "SELECT plugin::text, database::text, active_pid, wal_status, confirmed_flush_lsn::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.slot],
            )
            .await?;
        Ok(row.map(|r| SlotRow {
            plugin: r.get(0),
            database: r.get(1),
            active_pid: r.get(2),
            wal_status: r.get(3),
            confirmed_flush: r.get::<_, Option<String>>(4).and_then(|s| s.parse().ok()),
        }))
    }

    /// One session: set-up, then streaming until stopped or failed.
    async fn session(&mut self, attempt: &mut u32) -> Result<(), CdcError> {
        let catalog = self.catalog().await?;
        let sender_timeout = self.prepare(&catalog).await?;
        let slot = self.config.slot.clone();
        let current_db: String = catalog
            .query_one("SELECT current_database()::text", &[])
            .await?
            .get(0);
        let existing = self.slot_row(&catalog).await?;
        let mut confirmed = 0u64;
        let has_state = self.durable_now().is_some();
        if let Some(row) = &existing {
            if row.plugin.as_deref() != Some("pgoutput") {
                return Err(CdcError::SlotUnusable {
                    slot,
                    why: format!(
                        "it is a {} slot, not a logical pgoutput one",
                        row.plugin.as_deref().unwrap_or("physical")
                    ),
                });
            }
            if row.database.as_deref() != Some(current_db.as_str()) {
                return Err(CdcError::SlotUnusable {
                    slot,
                    why: format!(
                        "it belongs to database {:?}, not {current_db:?}",
                        row.database.as_deref().unwrap_or("")
                    ),
                });
            }
            if row.wal_status.as_deref() == Some("lost") {
                return Err(CdcError::SlotInvalidated(slot));
            }
            if let Some(pid) = row.active_pid {
                return Err(CdcError::SlotActive { slot, pid });
            }
            if !has_state && self.config.needs_snapshot {
                return Err(CdcError::SlotWithoutState(slot));
            }
            confirmed = row.confirmed_flush.map(|l| l.0).unwrap_or(0);
        } else if !self.config.create {
            return Err(CdcError::SlotMissing(slot));
        }

        let mut repl = ReplConn::connect(&self.config.source, &self.config.tls).await?;
        if existing.is_none() {
            tracing::info!(%slot, "creating the replication slot");
            let (point, exported) =
                crate::snapshot::create_slot(&mut repl, &slot, false, self.config.needs_snapshot).await?;
            confirmed = point.0;
            if let Some(name) = exported {
                let (done, answer) = oneshot::channel();
                let req = Event::Snapshot(SnapshotRequest {
                    name,
                    lsn: point,
                    done,
                });
                tokio::select! {
                    r = self.tx.send(req) => r.map_err(|_| CdcError::ConsumerGone)?,
                    _ = self.stop.cancelled() => return Ok(()),
                }
                // The snapshot lives as long as this connection stays idle: wait here.
                let answer = tokio::select! {
                    a = answer => a.map_err(|_| CdcError::ConsumerGone)?,
                    _ = self.stop.cancelled() => return Ok(()),
                };
                answer.map_err(CdcError::Snapshot)?;
            }
        }

        let durable_now = self.durable_now().map(|l| l.0).unwrap_or(0);
        let start = confirmed.max(durable_now);
        let cmd = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '2', streaming 'on', messages 'true', publication_names '{}')",
            quote_ident(&slot),
            Lsn(start),
            quote_ident(&self.config.publication).replace('\'', "''")
        );
        repl.start_copy_both(&cmd).await.map_err(|e| match e {
            CdcError::Server(db) => start_error(&slot, db),
            e => e,
        })?;
        tracing::info!(%slot, start = %Lsn(start), walsender = repl.pid, "streaming changes");
        let _ = self.status.send(CdcStatus::Streaming { pid: repl.pid });

        let mut s = Streaming {
            asm: Assembler::default(),
            pending: None,
            last_sent_end: None,
            keepalive_end: 0,
            received: start,
            confirmed: start,
            reported: 0,
        };
        let every = (sender_timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => {
                    s.send_status(&mut repl, self.durable_now(), false).await?;
                    tracing::info!(confirmed = %Lsn(s.confirmed), "replication stream stopped");
                    repl.close().await;
                    return Ok(());
                }
                // Unconditionally on every tick, so two updates are never further apart
                // than a third of wal_sender_timeout, whatever else was sent between.
                _ = tick.tick() => {
                    s.send_status(&mut repl, self.durable_now(), false).await?;
                }
                r = self.durable.changed() => {
                    if r.is_err() {
                        return Err(CdcError::ConsumerGone);
                    }
                    let durable = *self.durable.borrow_and_update();
                    s.send_status(&mut repl, durable, true).await?;
                }
                permit = self.tx.reserve(), if s.pending.is_some() => {
                    let permit = permit.map_err(|_| CdcError::ConsumerGone)?;
                    let tx = s.pending.take().expect("pending transaction");
                    s.last_sent_end = Some(tx.end_lsn.0);
                    permit.send(Event::Commit(tx));
                }
                frame = repl.read_copy(), if s.pending.is_none() => {
                    let Some(frame) = frame? else {
                        return Err(CdcError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the server ended the replication stream",
                        )));
                    };
                    *attempt = 0;
                    let mut next = Some(frame);
                    // Work through what is already buffered before polling anything else,
                    // until a transaction waits for room in the channel.
                    while let Some(frame) = next {
                        self.on_frame(&catalog, &mut repl, &mut s, frame).await?;
                        next = if s.pending.is_none() { repl.buffered_copy() } else { None };
                    }
                }
            }
        }
    }

    /// Handles one CopyData payload.
    async fn on_frame(
        &self,
        catalog: &tokio_postgres::Client,
        repl: &mut ReplConn,
        s: &mut Streaming,
        frame: Bytes,
    ) -> Result<(), CdcError> {
        match parse_copy(frame)? {
            ReplMessage::XLogData { wal_start, data, .. } => {
                s.received = s.received.max(wal_start);
                self.handle_data(catalog, s, data).await
            }
            ReplMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                s.keepalive_end = s.keepalive_end.max(wal_end);
                s.received = s.received.max(wal_end);
                if reply_requested {
                    s.send_status(repl, self.durable_now(), false).await?;
                }
                Ok(())
            }
        }
    }

    async fn handle_data(
        &self,
        catalog: &tokio_postgres::Client,
        s: &mut Streaming,
        data: Bytes,
    ) -> Result<(), CdcError> {
        let msg = parse_pgoutput(data, s.asm.in_stream())?;
        if let PgOutput::Relation { columns, .. } = &msg {
            let unknown = s.asm.unknown_types(columns);
            if !unknown.is_empty() {
                resolve_types(catalog, &mut s.asm, unknown).await?;
            }
        }
        match s.asm.handle(msg)? {
            Output::None => {}
            Output::Message(m) => {
                metrics::counter!("pulse_replication_messages_total").increment(1);
                tracing::debug!(prefix = %m.prefix, lsn = %m.lsn, "non-transactional logical decoding message");
            }
            // Empty transactions (possible before PostgreSQL 15, or when every change
            // was filtered) carry nothing to apply: the keepalive rule confirms past them.
            Output::Commit(tx) if tx.changes.is_empty() && tx.messages.is_empty() => {}
            Output::Commit(tx) => {
                // Straight into the channel when there is room; else it waits as
                // `pending`, and nothing more is read until the consumer makes room.
                let end = tx.end_lsn.0;
                match self.tx.try_send(Event::Commit(tx)) {
                    Ok(()) => s.last_sent_end = Some(end),
                    Err(mpsc::error::TrySendError::Full(Event::Commit(tx))) => s.pending = Some(tx),
                    Err(mpsc::error::TrySendError::Full(_)) => unreachable!("only commits are sent here"),
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(CdcError::ConsumerGone),
                }
                metrics::gauge!("pulse_replication_streamed_changes_buffered")
                    .set(s.asm.streamed_changes() as f64);
            }
        }
        Ok(())
    }
}

/// Asks the catalog what unknown types are: domains resolve to their base, arrays to
/// their element, enums and the rest read as text.
async fn resolve_types(
    catalog: &tokio_postgres::Client,
    asm: &mut Assembler,
    mut oids: Vec<u32>,
) -> Result<(), CdcError> {
    // A domain over a domain over an array…: a few rounds settle any real chain.
    for _ in 0..6 {
        if oids.is_empty() {
            return Ok(());
        }
        let rows = catalog
            .query(
                "SELECT oid, typname::text, typtype::text, typbasetype, typelem, typcategory::text \
                 FROM pg_type WHERE oid = ANY($1)",
                &[&oids],
            )
            .await?;
        let mut next = Vec::new();
        for oid in &oids {
            let Some(r) = rows.iter().find(|r| r.get::<_, u32>(0) == *oid) else {
                // Dropped meanwhile: text, named as the Type message had it.
                let name = asm
                    .type_name(*oid)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("oid:{oid}"));
                asm.types.insert(
                    *oid,
                    TypeInfo {
                        name,
                        kind: Kind::Text,
                    },
                );
                continue;
            };
            let name: String = r.get(1);
            let typtype: String = r.get(2);
            let base: u32 = r.get(3);
            let elem: u32 = r.get(4);
            let category: String = r.get(5);
            let info = if typtype == "d" {
                if asm.types.is_known(base) {
                    let b = asm.types.get(base);
                    Some(TypeInfo {
                        name: b.name,
                        kind: b.kind,
                    })
                } else {
                    next.push(base);
                    next.push(*oid);
                    None
                }
            } else if category == "A" && elem != 0 {
                if asm.types.is_known(elem) {
                    Some(TypeInfo {
                        name,
                        kind: Kind::Array(Box::new(asm.types.get(elem).kind)),
                    })
                } else {
                    next.push(elem);
                    next.push(*oid);
                    None
                }
            } else {
                Some(TypeInfo {
                    name,
                    kind: Kind::Text,
                })
            };
            if let Some(info) = info {
                asm.types.insert(*oid, info);
            }
        }
        next.sort_unstable();
        next.dedup();
        next.retain(|o| !asm.types.is_known(*o));
        oids = next;
    }
    for oid in oids {
        asm.types.insert(
            oid,
            TypeInfo {
                name: format!("oid:{oid}"),
                kind: Kind::Text,
            },
        );
    }
    Ok(())
}

struct Streaming {
    asm: Assembler,
    /// A committed transaction waiting for room in the channel; nothing is read meanwhile.
    pending: Option<crate::model::Transaction>,
    /// End LSN of the last transaction handed to the consumer.
    last_sent_end: Option<u64>,
    /// `wal_end` of the latest keepalive.
    keepalive_end: u64,
    /// Highest position received.
    received: u64,
    /// Flush position last sent; never decreases.
    confirmed: u64,
    /// Flush position of the last update sent (to skip redundant ones).
    reported: u64,
}

impl Streaming {
    /// Moves the flush position to what may be confirmed now: the durable position, or
    /// the last keepalive's `wal_end` when nothing is in flight. Never backwards.
    fn advance(&mut self, durable: Option<Lsn>) -> u64 {
        let durable = durable.map(|l| l.0).unwrap_or(0);
        let nothing_in_flight =
            !self.asm.busy() && self.pending.is_none() && self.last_sent_end.is_none_or(|e| e <= durable);
        let mut flush = durable;
        if nothing_in_flight {
            flush = flush.max(self.keepalive_end);
        }
        self.confirmed = self.confirmed.max(flush);
        self.confirmed
    }

    /// Sends a standby status update. With `only_if_moved`, sends only when the flush
    /// position advanced.
    async fn send_status(
        &mut self,
        repl: &mut ReplConn,
        durable: Option<Lsn>,
        only_if_moved: bool,
    ) -> Result<(), CdcError> {
        self.advance(durable);
        if only_if_moved && self.confirmed <= self.reported {
            return Ok(());
        }
        let write = self.received.max(self.confirmed);
        repl.send_copy(&standby_status(
            write,
            self.confirmed,
            self.confirmed,
            now_micros_pg(),
            false,
        ))
        .await?;
        self.reported = self.confirmed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_backoff() {
        assert_eq!(parse_pg_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..40 {
            let d = backoff(min, max, attempt);
            assert!(d <= max && d >= min / 2, "{attempt}: {d:?}");
        }
        assert!(backoff(min, max, 30) >= max / 2, "capped, not overflowing");
    }

    #[test]
    fn flush_follows_durability_and_idles_forward() {
        let mut s = Streaming {
            asm: Assembler::default(),
            pending: None,
            last_sent_end: None,
            keepalive_end: 0,
            received: 0,
            confirmed: 100,
            reported: 0,
        };
        // Never below where it started, even if the consumer reports less.
        assert_eq!(s.advance(Some(Lsn(50))), 100);
        // A transaction handed over and not yet durable pins the position.
        s.last_sent_end = Some(300);
        s.keepalive_end = 500;
        assert_eq!(s.advance(Some(Lsn(200))), 200);
        // Durable, nothing in flight: the keepalive's wal_end is confirmed.
        assert_eq!(s.advance(Some(Lsn(300))), 500);
        // A transaction partly received pins it again; the position does not go back.
        s.asm
            .handle(PgOutput::Begin {
                final_lsn: 600,
                timestamp: 0,
                xid: 1,
            })
            .unwrap();
        s.keepalive_end = 700;
        assert_eq!(s.advance(Some(Lsn(300))), 500);
    }

    #[test]
    fn slot_active_errors_name_the_pid() {
        let e = start_error(
            "s",
            DbError {
                severity: "ERROR".into(),
                code: "55006".into(),
                message: "replication slot \"s\" is active for PID 4242".into(),
                detail: None,
            },
        );
        assert!(e.to_string().contains("PID 4242"), "{e}");
        assert_eq!(quote_qualified("public.We\"ird"), "\"public\".\"We\"\"ird\"");
    }
}
