//! The change stream inside pulsed: from the replication reader (pulse-cdc) to the
//! consumer of the changes (the state engine), with the durability rule of DESIGN.md.
//!
//! This module owns the group-commit loop: it takes committed transactions from the
//! reader's bounded channel, batches what is already waiting, skips what the persisted
//! state already holds (`end_lsn <= checkpoint`), lets the [`ChangeSink`] apply the batch
//! inside one state-database transaction that also records the checkpoint, commits, and
//! only then reports the batch's end LSN as durable to the reader, which is the only
//! position it ever confirms to PostgreSQL. Effects derived from persisted state reach
//! clients (`committed`) only after the commit; what is sent straight from the stream
//! (live-table rows, through the sink's [`LiveTap`]) goes out as soon as a transaction
//! leaves the reader's channel, even while the previous batch's state transaction is in
//! flight, since clients get at-least-once updates with a cursor and a failed batch is
//! simply replayed.
//!
//! It must never confirm a position before the state it covers is committed, and never
//! drop a replication slot.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use pulse_cdc::{CdcConfig, CdcStatus, Durable, Event, Lsn, SnapshotRequest, Transaction};
use pulse_shared::admin::HealthState;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::App;

/// Why a sink (or the loop around it) failed. Every failure ends the current stream;
/// the supervisor starts over from the persisted checkpoint, so a failed batch is
/// applied again from scratch, never half.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The state (or source) database refused or failed; usually transient.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// Anything else the sink cannot get past, with what to do about it.
    #[error("{0}")]
    Other(String),
}

/// The consumer of the change stream inside pulsed (the state engine implements it).
///
/// Calls come from one task, in this order: `checkpoint` at every (re)start of the
/// stream (a sink drops whatever it holds in memory that is not persisted, and reloads
/// from the state database), then possibly `load_snapshot` (only when the slot was just
/// created), then any number of `apply` + `committed` pairs. A failed call ends the
/// stream; the next start calls `checkpoint` again.
pub trait ChangeSink: Send + 'static {
    /// The LSN the sink's persisted state is valid at, read at start from the state db;
    /// None = never loaded. [`read_checkpoint`] reads the row the loop writes.
    fn checkpoint(
        &mut self,
        state: &tokio_postgres::Client,
    ) -> impl Future<Output = Result<Option<Lsn>, SinkError>> + Send;

    /// The slot was just created: (re)build derived state from the slot's exported
    /// snapshot. `source` is a REPEATABLE READ transaction on the source db already SET
    /// TRANSACTION SNAPSHOT to it; writes go to `state_tx`, which the caller commits
    /// together with the checkpoint at `lsn`.
    fn load_snapshot(
        &mut self,
        source: &tokio_postgres::Transaction<'_>,
        state_tx: &tokio_postgres::Transaction<'_>,
        lsn: Lsn,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Applies a batch of committed transactions (commit order) inside `state_tx`. The
    /// caller then writes the checkpoint (the batch's last end_lsn, table
    /// pulse.checkpoints keyed by slot name) in the SAME transaction, commits, and only
    /// then lets the slot's flush position advance (the durability rule).
    fn apply(
        &mut self,
        batch: &[Transaction],
        state_tx: &tokio_postgres::Transaction<'_>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Where the loop publishes what comes straight from the stream and derives no
    /// persisted state (live-table rows), so clients wait neither for the group commit
    /// nor for the batch before: the loop calls it for each transaction as it leaves the
    /// reader's channel, including while the previous batch's state transaction runs, in
    /// commit order, before the transaction is applied. It may be called again for the
    /// same transactions after a failed batch (the stream replays them): clients get
    /// at-least-once updates with a cursor. It never moves the slot. Asked once per
    /// stream start. No default: a sink that wraps another must pass on the inner tap,
    /// or live tables go silent.
    fn live_tap(&self) -> LiveTap;

    /// After the commit: publish effects derived from persisted state to clients. Never
    /// called before the batch is durable. Also called with an empty batch after a
    /// [`ChangeSink::refresh`] or a [`ChangeSink::housekeeping`] that changed something.
    fn committed(&mut self, batch: &[Transaction]);

    /// Whether part of the derived state must be recomputed from the source (a changed
    /// definition, a tenant whose time zone changed). Asked once a checkpoint exists, at
    /// start and after every commit; when true the loop calls [`ChangeSink::refresh`]
    /// before the next batch. No default: a wrapper must pass it on.
    fn refresh_wanted(&self) -> bool;

    /// Recomputes what [`ChangeSink::refresh_wanted`] asked for, reading `source` (a
    /// REPEATABLE READ transaction in a snapshot holding exactly the transactions with
    /// `end_lsn <= lsn`) and writing to `state_tx`, which the caller commits WITHOUT
    /// moving the checkpoint (the stream still resumes from it). From then on the sink
    /// must ignore, for what it recomputed and only for that, the streamed transactions
    /// with `end_lsn <= lsn`, and remember so durably (in `state_tx`), so that neither a
    /// replay nor a crash counts them twice.
    fn refresh(
        &mut self,
        source: &tokio_postgres::Transaction<'_>,
        state_tx: &tokio_postgres::Transaction<'_>,
        lsn: Lsn,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Periodic upkeep (every [`HOUSEKEEPING_EVERY`], between batches, in the loop's own
    /// state transaction, so it never races a batch): for the engine, deleting metric
    /// buckets no window reads any more. Returns whether it changed anything; then the
    /// loop calls `committed(&[])` after the commit.
    fn housekeeping(
        &mut self,
        state_tx: &tokio_postgres::Transaction<'_>,
    ) -> impl Future<Output = Result<bool, SinkError>> + Send;

    /// Whether this sink derives state from the tables, and so needs the initial
    /// snapshot. A sink that does not (like [`CheckpointSink`]) may start on a slot
    /// that exists without a checkpoint; one that does refuses to, since the changes
    /// before the slot's position would be missing from its state.
    fn needs_snapshot(&self) -> bool {
        true
    }
}

/// Publishes transactions straight from the stream (see [`ChangeSink::live_tap`]).
pub type LiveTap = Arc<dyn Fn(&[Transaction]) + Send + Sync>;

/// The tap of a sink that publishes nothing from the stream.
pub fn no_live_tap() -> LiveTap {
    Arc::new(|_: &[Transaction]| {})
}

/// Reads the checkpoint of `name` (the slot name) from `pulse.checkpoints`.
pub async fn read_checkpoint(state: &tokio_postgres::Client, name: &str) -> Result<Option<Lsn>, SinkError> {
    let row = state
        .query_opt(
            "SELECT lsn::text FROM pulse.checkpoints WHERE name = $1",
            &[&name],
        )
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let text: String = row.get(0);
            text.parse()
                .map(Some)
                .map_err(|e| SinkError::Other(format!("pulse.checkpoints row {name:?}: {e}")))
        }
    }
}

/// Records inside `tx` that the state is valid at `lsn` for the slot `name`.
pub async fn write_checkpoint(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    lsn: Lsn,
) -> Result<(), SinkError> {
    tx.execute(
        "INSERT INTO pulse.checkpoints (name, lsn, updated_at) VALUES ($1, $2::text::pg_lsn, now()) \
         ON CONFLICT (name) DO UPDATE SET lsn = EXCLUDED.lsn, updated_at = now()",
        &[&name, &lsn.to_string()],
    )
    .await?;
    Ok(())
}

/// The sink pulsed runs until the state engine is plugged in: applies nothing and
/// persists only the checkpoint, so the slot advances exactly as far as is durable.
#[derive(Debug, Clone)]
pub struct CheckpointSink {
    /// The checkpoint row's name (the slot name).
    name: String,
}

impl CheckpointSink {
    /// A sink whose checkpoint row is `name`.
    pub fn new(name: impl Into<String>) -> CheckpointSink {
        CheckpointSink { name: name.into() }
    }
}

impl ChangeSink for CheckpointSink {
    async fn checkpoint(&mut self, state: &tokio_postgres::Client) -> Result<Option<Lsn>, SinkError> {
        read_checkpoint(state, &self.name).await
    }

    async fn load_snapshot(
        &mut self,
        _source: &tokio_postgres::Transaction<'_>,
        _state_tx: &tokio_postgres::Transaction<'_>,
        _lsn: Lsn,
    ) -> Result<(), SinkError> {
        Ok(())
    }

    async fn apply(
        &mut self,
        _batch: &[Transaction],
        _state_tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), SinkError> {
        Ok(())
    }

    fn live_tap(&self) -> LiveTap {
        no_live_tap()
    }

    fn committed(&mut self, _batch: &[Transaction]) {}

    fn refresh_wanted(&self) -> bool {
        false
    }

    async fn refresh(
        &mut self,
        _source: &tokio_postgres::Transaction<'_>,
        _state_tx: &tokio_postgres::Transaction<'_>,
        _lsn: Lsn,
    ) -> Result<(), SinkError> {
        Ok(())
    }

    async fn housekeeping(&mut self, _state_tx: &tokio_postgres::Transaction<'_>) -> Result<bool, SinkError> {
        Ok(false)
    }

    fn needs_snapshot(&self) -> bool {
        false
    }
}

/// How often the loop gives the sink its [`ChangeSink::housekeeping`] call.
pub const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);

/// Bounds of one group commit: a batch takes what is already waiting, up to these.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most transactions in one state-database transaction.
    pub max_transactions: usize,
    /// Most changes (rows) in one state-database transaction.
    pub max_changes: usize,
    /// How long a batch waits for more once a backlog shows.
    pub linger: Duration,
    /// A backlog shows when at least this many transactions were already waiting.
    pub linger_after: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_transactions: 10_000,
            max_changes: 50_000,
            linger: Duration::from_millis(5),
            linger_after: 16,
        }
    }
}

/// Events the loop took from the channel while a state transaction ran (already
/// published through the tap), waiting for the next batch.
#[derive(Default)]
struct Early {
    events: std::collections::VecDeque<Event>,
    changes: usize,
}

impl Early {
    fn push(&mut self, e: Event) {
        if let Event::Commit(tx) = &e {
            self.changes += tx.changes.len();
        }
        self.events.push_back(e);
    }

    fn pop(&mut self) -> Option<Event> {
        let e = self.events.pop_front()?;
        if let Event::Commit(tx) = &e {
            self.changes -= tx.changes.len();
        }
        Some(e)
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether to take more: up to one batch's worth, and nothing after a snapshot
    /// request (it is handled on its own, after the batch before it). Beyond that the
    /// reader waits, as it would for a full channel.
    fn takes_more(&self, limits: &BatchLimits) -> bool {
        self.events.len() < limits.max_transactions
            && self.changes < limits.max_changes
            && !matches!(self.events.back(), Some(Event::Snapshot(_)))
    }
}

/// What the group-commit loop needs besides the sink and the channel.
pub struct Consumer<'a> {
    /// The state database (a connection of its own: it holds the loop's transactions).
    pub state: &'a mut tokio_postgres::Client,
    /// The source database, for snapshot loads.
    pub source: &'a crate::config::DbUrl,
    /// Checkpoint row name (the slot name).
    pub name: &'a str,
    /// Where durable positions are reported to the reader.
    pub durable: &'a Durable,
    /// Batch bounds.
    pub limits: BatchLimits,
    /// Stops the loop between batches.
    pub shutdown: &'a CancellationToken,
}

impl Consumer<'_> {
    /// Runs the group-commit loop until the channel closes (the reader stopped) or the
    /// shutdown token is cancelled; returns the last durable position. `persisted` is
    /// the checkpoint read at start.
    pub async fn run<S: ChangeSink>(
        &mut self,
        sink: &mut S,
        events: &mut mpsc::Receiver<Event>,
        persisted: Option<Lsn>,
    ) -> Result<Option<Lsn>, SinkError> {
        self.run_with_progress(sink, events, persisted, &Progress::default())
            .await
    }

    async fn run_with_progress<S: ChangeSink>(
        &mut self,
        sink: &mut S,
        events: &mut mpsc::Receiver<Event>,
        mut persisted: Option<Lsn>,
        progress: &Progress,
    ) -> Result<Option<Lsn>, SinkError> {
        let mut batch: Vec<Transaction> = Vec::new();
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tap = sink.live_tap();
        // Events taken from the channel while the last state transaction ran, in order;
        // their transactions were published through the tap then.
        let mut early = Early::default();
        // Whether the channel is still open (it closes when the reader stops).
        let mut open = true;
        loop {
            // Recomputations the sink asked for, before anything more is applied (only
            // once there is a checkpoint: a new slot's initial load covers everything).
            if let Some(checkpoint) = persisted
                && sink.refresh_wanted()
            {
                self.refresh(sink, checkpoint).await?;
            }
            let from_early = !early.is_empty();
            let first = match early.pop() {
                Some(e) => e,
                None if !open => return Ok(persisted),
                None => tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return Ok(persisted),
                    // Ready once per period, so it never starves the stream.
                    _ = housekeeping.tick() => {
                        let tx = self.state.transaction().await?;
                        let changed = sink.housekeeping(&tx).await?;
                        tx.commit().await?;
                        if changed {
                            sink.committed(&[]);
                        }
                        continue;
                    }
                    e = events.recv() => match e {
                        Some(e) => e,
                        None => return Ok(persisted),
                    },
                },
            };
            let mut pending_snapshot = None;
            let mut changes = 0usize;
            let mut skipped_to = None;
            let mut take = |e: Event, batch: &mut Vec<Transaction>, changes: &mut usize| match e {
                Event::Commit(tx) => {
                    if persisted.is_some_and(|p| tx.end_lsn <= p) {
                        // Already in the persisted state (a replay after a restart).
                        skipped_to = Some(tx.end_lsn);
                    } else {
                        *changes += tx.changes.len();
                        batch.push(tx);
                    }
                    None
                }
                Event::Snapshot(s) => Some(s),
            };
            pending_snapshot = pending_snapshot.or(take(first, &mut batch, &mut changes));
            let full = |batch: &Vec<Transaction>, changes: usize| {
                batch.len() >= self.limits.max_transactions || changes >= self.limits.max_changes
            };
            // What was taken early comes first, already published.
            while pending_snapshot.is_none() && !full(&batch, changes) {
                let Some(e) = early.pop() else { break };
                pending_snapshot = take(e, &mut batch, &mut changes);
            }
            let published = if from_early { batch.len() } else { 0 };
            // Take what waits; when many were waiting (a backlog, not the steady trickle
            // of a live database), linger a moment for more, so that a backlog is
            // persisted in few commits: each costs round trips, and is WAL the walsender
            // must decode too. Live commits never wait.
            let linger_until = tokio::time::Instant::now() + self.limits.linger;
            while pending_snapshot.is_none() && early.is_empty() && open && !full(&batch, changes) {
                match events.try_recv() {
                    Ok(e) => pending_snapshot = take(e, &mut batch, &mut changes),
                    Err(_) if batch.len() < self.limits.linger_after => break,
                    Err(_) => match tokio::time::timeout_at(linger_until, events.recv()).await {
                        Ok(Some(e)) => pending_snapshot = take(e, &mut batch, &mut changes),
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            if let Some(lsn) = skipped_to {
                tracing::debug!(%lsn, "skipped transactions already persisted");
                // Lets the reader see that nothing is in flight.
                self.durable.report(lsn);
            }
            if !batch.is_empty() {
                let last = batch.last().map(|t| t.end_lsn).expect("non-empty batch");
                tap(&batch[published..]);
                // The state transaction; meanwhile what arrives is published at once and
                // kept for the next batch (up to one batch of it: then the reader waits).
                {
                    let (state, name, limits) = (&mut self.state, self.name, self.limits);
                    let persist = async {
                        let tx = state.transaction().await?;
                        sink.apply(&batch, &tx).await?;
                        write_checkpoint(&tx, name, last).await?;
                        tx.commit().await?;
                        Ok::<(), SinkError>(())
                    };
                    tokio::pin!(persist);
                    loop {
                        let receiving = open && early.takes_more(&limits);
                        tokio::select! {
                            biased;
                            done = &mut persist => break done?,
                            e = events.recv(), if receiving => match e {
                                Some(Event::Commit(tx)) => {
                                    if persisted.is_none_or(|p| tx.end_lsn > p) {
                                        tap(std::slice::from_ref(&tx));
                                    }
                                    early.push(Event::Commit(tx));
                                }
                                Some(snapshot) => early.push(snapshot),
                                None => open = false,
                            },
                        }
                    }
                }
                persisted = Some(last);
                self.durable.report(last);
                sink.committed(&batch);
                let rows: usize = batch.iter().map(|t| t.changes.len()).sum();
                metrics::counter!("pulse_replication_batches_total").increment(1);
                metrics::counter!("pulse_replication_transactions_total").increment(batch.len() as u64);
                metrics::counter!("pulse_replication_rows_total").increment(rows as u64);
                let commit_time = batch
                    .last()
                    .map(|t| t.commit_time.timestamp_micros())
                    .unwrap_or(0);
                progress.last_commit_micros.store(commit_time, Ordering::Relaxed);
                batch.clear();
            }
            if let Some(req) = pending_snapshot {
                let lsn = req.lsn;
                let result = self.load_snapshot(sink, &req).await;
                let answer = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
                let _ = req.done.send(answer);
                result?;
                persisted = Some(lsn);
                self.durable.report(lsn);
            }
        }
    }

    /// Opens a connection to the source for reading in an exported snapshot.
    async fn snapshot_connection(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), SinkError> {
        let (source, conn) = self.source.config().connect(self.source.connector()).await?;
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "snapshot connection ended");
            }
        });
        Ok((source, conn))
    }

    /// A read-only REPEATABLE READ transaction on `source` in the exported snapshot `name`.
    async fn in_snapshot<'c>(
        source: &'c mut tokio_postgres::Client,
        name: &str,
    ) -> Result<tokio_postgres::Transaction<'c>, SinkError> {
        let stx = source
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The name comes from the server; quote it all the same.
        stx.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            name.replace('\'', "''")
        ))
        .await?;
        Ok(stx)
    }

    async fn load_snapshot<S: ChangeSink>(
        &mut self,
        sink: &mut S,
        req: &SnapshotRequest,
    ) -> Result<(), SinkError> {
        tracing::info!(snapshot = %req.name, lsn = %req.lsn, "loading the initial state through the slot's snapshot");
        let started = std::time::Instant::now();
        let (mut source, conn) = self.snapshot_connection().await?;
        let result = async {
            let stx = Self::in_snapshot(&mut source, &req.name).await?;
            let tx = self.state.transaction().await?;
            sink.load_snapshot(&stx, &tx, req.lsn).await?;
            write_checkpoint(&tx, self.name, req.lsn).await?;
            tx.commit().await?;
            stx.commit().await?;
            Ok::<(), SinkError>(())
        }
        .await;
        drop(source);
        let _ = conn.await;
        if result.is_ok() {
            tracing::info!(lsn = %req.lsn, elapsed = ?started.elapsed(), "initial state loaded");
        }
        result
    }

    /// Recomputes what the sink asked for in a snapshot of its own, at a known LSN: a
    /// temporary slot on a replication connection of its own exports it (the slot being
    /// streamed cannot, and keeps its position), the same snapshot hand-over as the
    /// initial load reads it, and the checkpoint does not move.
    async fn refresh<S: ChangeSink>(&mut self, sink: &mut S, checkpoint: Lsn) -> Result<(), SinkError> {
        let started = std::time::Instant::now();
        let base: String = self.name.chars().take(40).collect();
        let temp = format!("{base}_refresh_{:08x}", rand::random::<u32>());
        let snap =
            pulse_cdc::snapshot::TemporarySnapshot::create(self.source.config(), self.source.tls(), &temp)
                .await
                .map_err(|e| SinkError::Other(format!("cannot take a snapshot to recompute metrics: {e}")))?;
        let lsn = snap.lsn;
        // A new slot's consistent point is past everything committed when it was made,
        // so past the checkpoint; were it not, the changes between would be missed.
        if lsn < checkpoint {
            snap.close().await;
            return Err(SinkError::Other(format!(
                "the snapshot for a recomputation is at {lsn}, behind the checkpoint {checkpoint}"
            )));
        }
        let (mut source, conn) = match self.snapshot_connection().await {
            Ok(c) => c,
            Err(e) => {
                snap.close().await;
                return Err(e);
            }
        };
        let result = async {
            let stx = Self::in_snapshot(&mut source, &snap.name).await?;
            let tx = self.state.transaction().await?;
            sink.refresh(&stx, &tx, lsn).await?;
            tx.commit().await?;
            stx.commit().await?;
            Ok::<(), SinkError>(())
        }
        .await;
        drop(source);
        let _ = conn.await;
        snap.close().await;
        result?;
        tracing::debug!(%lsn, elapsed = ?started.elapsed(), "recomputation committed");
        sink.committed(&[]);
        Ok(())
    }
}

/// How the stream is doing, shared between the consumer and the health task.
#[derive(Debug, Default)]
struct Progress {
    /// Commit time of the last applied transaction, µs since the Unix epoch (0: none).
    last_commit_micros: AtomicI64,
}

/// Runs the change stream into `sink` until `shutdown`: starts the reader, runs the
/// group-commit loop, reports health ("replication") and metrics, and starts over from
/// the persisted checkpoint after any failure of the consumer side (the reader
/// reconnects to PostgreSQL by itself). On shutdown the current batch finishes, then
/// the reader confirms the durable position and closes.
pub async fn run<S: ChangeSink>(app: Arc<App>, sink: S, shutdown: CancellationToken) {
    // The console's change feed sees each batch once it is committed.
    let mut sink = crate::changefeed::Recorded {
        inner: sink,
        feed: app.changes.clone(),
    };
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        match pipeline(&app, &mut sink, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(60) {
                    attempt = 0;
                }
                let delay = Duration::from_millis(200)
                    .saturating_mul(1 << attempt.min(7))
                    .min(Duration::from_secs(15))
                    .mul_f64(rand::random_range(0.5..=1.0));
                attempt += 1;
                tracing::warn!(error = %e, retry_in = ?delay, "change stream consumer failed; starting over from the checkpoint");
                app.health.set(
                    "replication",
                    HealthState::Down,
                    format!("consumer failed: {e}; retrying"),
                    true,
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    app.health.set("replication", HealthState::Down, "stopped", true);
}

async fn pipeline<S: ChangeSink>(
    app: &Arc<App>,
    sink: &mut S,
    shutdown: &CancellationToken,
) -> Result<(), SinkError> {
    let config = app.config();
    let r = &config.replication;
    let mut state = crate::db::connect(&config.state_db).await?;
    let checkpoint = sink.checkpoint(&state).await?;
    tracing::info!(slot = %r.slot, checkpoint = ?checkpoint.map(|l| l.to_string()), "starting the change stream");
    let mut cdc = CdcConfig::new(config.source_db.config().clone(), &r.slot, &r.publication);
    cdc.tls = config.source_db.tls().clone();
    cdc.create = r.create;
    cdc.tables = r.tables.clone();
    cdc.schema = r.schema.clone();
    cdc.needs_snapshot = sink.needs_snapshot();
    cdc.start = checkpoint;
    let (handle, mut events) = pulse_cdc::reader::start(cdc);
    let progress = Arc::new(Progress::default());
    let watcher_stop = CancellationToken::new();
    let watcher = tokio::spawn(watch_health(
        app.clone(),
        handle.status.clone(),
        progress.clone(),
        watcher_stop.clone(),
    ));
    let mut consumer = Consumer {
        state: &mut state,
        source: &config.source_db,
        name: &r.slot,
        durable: &handle.durable,
        limits: BatchLimits::default(),
        shutdown,
    };
    let result = consumer
        .run_with_progress(sink, &mut events, checkpoint, &progress)
        .await;
    // Stop the reader while the channel is still open: it then sends its last status
    // update (the durable position) and closes the session cleanly. Dropping the channel
    // first would make a reader with a transaction in hand end on "consumer gone",
    // skipping that last confirmation. The reader never blocks on the channel (it waits
    // for room inside its select, beside the stop signal), so this cannot hang.
    handle.stop().await;
    drop(events);
    watcher_stop.cancel();
    let _ = watcher.await;
    result.map(|_| ())
}

/// Keeps the "replication" health component and the slot metrics current: from the
/// reader's status as it changes, and from `pg_replication_slots` every few seconds.
async fn watch_health(
    app: Arc<App>,
    mut status: tokio::sync::watch::Receiver<CdcStatus>,
    progress: Arc<Progress>,
    stop: CancellationToken,
) {
    let config = app.config();
    let slot = config.replication.slot.clone();
    let max_retained = config.replication.max_retained_wal_bytes;
    let mut catalog: Option<tokio_postgres::Client> = None;
    let mut poll = tokio::time::interval(Duration::from_secs(5));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retained_warning: Option<String> = None;
    loop {
        let current = status.borrow_and_update().clone();
        let (state, detail) = match &current {
            CdcStatus::Connecting => (HealthState::Down, "connecting to the source".to_string()),
            CdcStatus::Streaming { pid } => match &retained_warning {
                Some(w) => (HealthState::Degraded, w.clone()),
                None => (HealthState::Up, format!("streaming (walsender PID {pid})")),
            },
            CdcStatus::Retrying { error, attempt, .. } => {
                (HealthState::Down, format!("{error} (attempt {attempt})"))
            }
            CdcStatus::Stopped => (HealthState::Down, "stopped".to_string()),
        };
        app.health.set("replication", state, detail, true);
        tokio::select! {
            _ = stop.cancelled() => return,
            r = status.changed() => if r.is_err() { return },
            _ = poll.tick() => {
                if catalog.as_ref().is_none_or(|c| c.is_closed()) {
                    catalog = crate::db::connect(&config.source_db).await.ok();
                }
                let Some(client) = &catalog else { continue };
                let last = progress.last_commit_micros.load(Ordering::Relaxed);
                if last > 0 {
                    let age = (chrono::Utc::now().timestamp_micros() - last).max(0) as f64 / 1e6;
                    metrics::gauge!("pulse_replication_last_commit_age_seconds").set(age);
                }
                match pulse_cdc::slot::status(client, &slot).await {
                    Ok(Some(s)) => {
                        let retained = s.retained_bytes.unwrap_or(0).max(0) as u64;
                        metrics::gauge!("pulse_replication_lag_bytes").set(s.lag_bytes.unwrap_or(0) as f64);
                        metrics::gauge!("pulse_replication_retained_wal_bytes").set(retained as f64);
                        for w in ["reserved", "extended", "unreserved", "lost"] {
                            let on = s.wal_status.as_deref() == Some(w);
                            metrics::gauge!("pulse_replication_wal_status", "status" => w).set(on as u8 as f64);
                        }
                        let over = retained > max_retained;
                        if over && retained_warning.is_none() {
                            tracing::warn!(slot = %slot, retained_mib = retained >> 20, limit_mib = max_retained >> 20,
                                "the replication slot retains more WAL than replication.max_retained_wal_mb; pulsed is behind or stalled");
                        }
                        retained_warning = over.then(|| format!(
                            "slot {slot} retains {} MiB of WAL (limit {} MiB)",
                            retained >> 20,
                            max_retained >> 20
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "slot status poll failed");
                        catalog = None;
                    }
                }
            }
        }
    }
}

/// A sink that records every change (and every snapshot row) in `pulse.cdc_ledger`,
/// keyed by source position: a diagnostic consumer, and the proof in tests that nothing
/// is lost or applied twice across crashes.
#[derive(Debug, Clone)]
pub struct LedgerSink {
    /// Slot name: the checkpoint row and the ledger's first key column.
    slot: String,
    /// Publication, whose tables the snapshot reads.
    publication: String,
}

impl LedgerSink {
    /// A ledger for `slot`, whose snapshot covers the tables of `publication`.
    pub fn new(slot: impl Into<String>, publication: impl Into<String>) -> LedgerSink {
        LedgerSink {
            slot: slot.into(),
            publication: publication.into(),
        }
    }
}

/// A short text form of a value, for the ledger's key column.
fn value_text(v: &pulse_cdc::Value) -> Option<String> {
    use pulse_cdc::Value;
    match v {
        Value::Null | Value::UnchangedToast => None,
        Value::Int(i) => Some(i.to_string()),
        Value::Text(s) | Value::Numeric(s) | Value::Interval(s) => Some(s.clone()),
        Value::Uuid(u) => Some(u.to_string()),
        other => Some(format!("{other:?}")),
    }
}

impl ChangeSink for LedgerSink {
    async fn checkpoint(&mut self, state: &tokio_postgres::Client) -> Result<Option<Lsn>, SinkError> {
        read_checkpoint(state, &self.slot).await
    }

    async fn load_snapshot(
        &mut self,
        source: &tokio_postgres::Transaction<'_>,
        state_tx: &tokio_postgres::Transaction<'_>,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        state_tx
            .execute("DELETE FROM pulse.cdc_ledger WHERE slot = $1", &[&self.slot])
            .await?;
        let tables = source
            .query(
                "SELECT format('%I.%I', schemaname, tablename), schemaname || '.' || tablename \
                 FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
                &[&self.publication],
            )
            .await?;
        let mut seq = 0i32;
        for t in tables {
            let quoted: String = t.get(0);
            let name: String = t.get(1);
            let mut keys = Vec::new();
            for m in source.simple_query(&format!("SELECT * FROM {quoted}")).await? {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    keys.push(r.get(0).map(str::to_string));
                }
            }
            for key in keys {
                seq += 1;
                state_tx
                    .execute(
                        "INSERT INTO pulse.cdc_ledger (slot, commit_lsn, seq, xid, relation, kind, key) \
                         VALUES ($1, $2::text::pg_lsn, $3, 0, $4, 'snapshot', $5)",
                        &[&self.slot, &lsn.to_string(), &seq, &name, &key],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn apply(
        &mut self,
        batch: &[Transaction],
        state_tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), SinkError> {
        use pulse_cdc::ChangeKind;
        let n: usize = batch.iter().map(|t| t.changes.len()).sum();
        let (mut lsns, mut seqs, mut xids, mut rels, mut kinds, mut keys) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for t in batch {
            for (i, c) in t.changes.iter().enumerate() {
                let (kind, key) = match &c.kind {
                    ChangeKind::Insert { new } => ("insert", new.first().and_then(value_text)),
                    ChangeKind::Update { new, .. } => ("update", new.first().and_then(value_text)),
                    ChangeKind::Delete { old } => ("delete", old.first().and_then(value_text)),
                    ChangeKind::Truncate => ("truncate", None),
                };
                lsns.push(t.commit_lsn.to_string());
                seqs.push(i as i32);
                xids.push(t.xid as i64);
                rels.push(format!("{}.{}", c.relation.schema, c.relation.name));
                kinds.push(kind);
                keys.push(key);
            }
        }
        state_tx
            .execute(
                "INSERT INTO pulse.cdc_ledger (slot, commit_lsn, seq, xid, relation, kind, key) \
                 SELECT $1, l::pg_lsn, s, x, r, k, v \
                 FROM unnest($2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[], $7::text[]) AS u(l, s, x, r, k, v)",
                &[&self.slot, &lsns, &seqs, &xids, &rels, &kinds, &keys],
            )
            .await?;
        Ok(())
    }

    fn live_tap(&self) -> LiveTap {
        no_live_tap()
    }

    fn committed(&mut self, _batch: &[Transaction]) {}

    fn refresh_wanted(&self) -> bool {
        false
    }

    async fn refresh(
        &mut self,
        _source: &tokio_postgres::Transaction<'_>,
        _state_tx: &tokio_postgres::Transaction<'_>,
        _lsn: Lsn,
    ) -> Result<(), SinkError> {
        Ok(())
    }

    async fn housekeeping(&mut self, _state_tx: &tokio_postgres::Transaction<'_>) -> Result<bool, SinkError> {
        Ok(false)
    }
}
