//! Slot inspection and removal, for operators (`pulsed slot status`, `pulsed slot drop`)
//! and for the metrics poller. Dropping happens only here, only when a person asks.

use crate::error::CdcError;
use crate::model::Lsn;

/// A replication slot as `pg_replication_slots` shows it, with derived sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// Output plugin (None for a physical slot).
    pub plugin: Option<String>,
    /// Database of a logical slot.
    pub database: Option<String>,
    /// PID of the process streaming from it, if any.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Position confirmed by the consumer.
    pub confirmed_flush: Option<Lsn>,
    /// Oldest WAL the slot keeps.
    pub restart_lsn: Option<Lsn>,
    /// The server's current WAL position.
    pub current: Lsn,
    /// Bytes of WAL written after the confirmed position: how far behind the consumer is.
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL kept on disk for the slot.
    pub retained_bytes: Option<i64>,
}

/// The status of `slot`, or `None` when it does not exist.
pub async fn status(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotStatus>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, database::text, active_pid, wal_status, \
                    confirmed_flush_lsn::text, restart_lsn::text, pg_current_wal_lsn()::text, \
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, \
                    (pg_current_wal_lsn() - restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let lsn = |s: Option<String>| s.and_then(|s| s.parse().ok());
    Ok(row.map(|r| SlotStatus {
        name: r.get(0),
        plugin: r.get(1),
        database: r.get(2),
        active_pid: r.get(3),
        wal_status: r.get(4),
        confirmed_flush: lsn(r.get(5)),
        restart_lsn: lsn(r.get(6)),
        current: lsn(r.get(7)).unwrap_or_default(),
        lag_bytes: r.get(8),
        retained_bytes: r.get(9),
    }))
}

/// Drops `slot`. Refuses while a process streams from it (naming the PID). Returns
/// whether a slot was dropped (false: there was none).
pub async fn drop_slot(client: &tokio_postgres::Client, slot: &str) -> Result<bool, CdcError> {
    match status(client, slot).await? {
        None => Ok(false),
        Some(s) => {
            if let Some(pid) = s.active_pid {
                return Err(CdcError::SlotActive {
                    slot: slot.to_string(),
                    pid,
                });
            }
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await?;
            Ok(true)
        }
    }
}
