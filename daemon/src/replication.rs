//! The change stream inside pulsed: from the replication reader (pulse-cdc) to the
//! consumer of the changes (the state engine), with the durability rule of DESIGN.md.
//!
//! This module owns the group-commit loop: it takes committed transactions from the
//! reader's bounded channel, batches what is already waiting, skips what the persisted
//! state already holds (`end_lsn <= checkpoint`), lets the [`ChangeSink`] apply the batch
//! inside one state-database transaction that also records the checkpoint, commits, and
//! only then reports the batch's end LSN as durable to the reader, which is the only
//! position it ever confirms to PostgreSQL. Effects reach clients (`committed`) only
//! after the commit.
//!
//! It must never confirm a position before the state it covers is committed, and never
//! drop a replication slot.

use std::future::Future;

use pulse_cdc::{Durable, Event, Lsn, SnapshotRequest, Transaction};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

    /// After the commit: publish effects to clients. Never called before the batch is
    /// durable.
    fn committed(&mut self, batch: &[Transaction]);

    /// Whether this sink derives state from the tables, and so needs the initial
    /// snapshot. A sink that does not (like [`CheckpointSink`]) may start on a slot
    /// that exists without a checkpoint; one that does refuses to, since the changes
    /// before the slot's position would be missing from its state.
    fn needs_snapshot(&self) -> bool {
        true
    }
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

    fn committed(&mut self, _batch: &[Transaction]) {}

    fn needs_snapshot(&self) -> bool {
        false
    }
}

/// Bounds of one group commit: a batch takes what is already waiting, up to these.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most transactions in one state-database transaction.
    pub max_transactions: usize,
    /// Most changes (rows) in one state-database transaction.
    pub max_changes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_transactions: 10_000,
            max_changes: 50_000,
        }
    }
}

/// What the group-commit loop needs besides the sink and the channel.
pub struct Consumer<'a> {
    /// The state database (a connection of its own: it holds the loop's transactions).
    pub state: &'a mut tokio_postgres::Client,
    /// The source database, for snapshot loads.
    pub source: &'a tokio_postgres::Config,
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
        mut persisted: Option<Lsn>,
    ) -> Result<Option<Lsn>, SinkError> {
        let mut batch: Vec<Transaction> = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(persisted),
                e = events.recv() => match e {
                    Some(e) => e,
                    None => return Ok(persisted),
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
            while pending_snapshot.is_none()
                && batch.len() < self.limits.max_transactions
                && changes < self.limits.max_changes
            {
                match events.try_recv() {
                    Ok(e) => pending_snapshot = take(e, &mut batch, &mut changes),
                    Err(_) => break,
                }
            }
            if let Some(lsn) = skipped_to {
                tracing::debug!(%lsn, "skipped transactions already persisted");
            }
            if !batch.is_empty() {
                let last = batch.last().map(|t| t.end_lsn).expect("non-empty batch");
                let tx = self.state.transaction().await?;
                sink.apply(&batch, &tx).await?;
                write_checkpoint(&tx, self.name, last).await?;
                tx.commit().await?;
                persisted = Some(last);
                self.durable.report(last);
                sink.committed(&batch);
                metrics::counter!("pulse_replication_batches_total").increment(1);
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

    async fn load_snapshot<S: ChangeSink>(
        &mut self,
        sink: &mut S,
        req: &SnapshotRequest,
    ) -> Result<(), SinkError> {
        tracing::info!(snapshot = %req.name, lsn = %req.lsn, "loading the initial state through the slot's snapshot");
        let started = std::time::Instant::now();
        let (mut source, conn) = self.source.connect(tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "snapshot connection ended");
            }
        });
        let result = async {
            let stx = source
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            // The name comes from the server; quote it all the same.
            stx.batch_execute(&format!(
                "SET TRANSACTION SNAPSHOT '{}'",
                req.name.replace('\'', "''")
            ))
            .await?;
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
}
