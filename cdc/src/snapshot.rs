//! Snapshots with a known LSN: a replication slot created with an exported snapshot.
//!
//! [`create_slot`] is the one place a slot is created: the reader creates its slot with
//! it (and hands the exported snapshot to the consumer for the initial load), and
//! [`TemporarySnapshot`] creates a TEMPORARY slot only for its snapshot, so that a
//! consumer can recompute part of its state at a known position while the real slot
//! keeps streaming. The snapshot holds exactly the transactions whose commit ended at or
//! before the slot's consistent point: a consumer that recomputes something in it
//! ignores, for that something, the streamed transactions with `end_lsn <= lsn`.

use crate::conn::ReplConn;
use crate::error::CdcError;
use crate::model::Lsn;
use crate::tls::TlsSettings;

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Creates a logical pgoutput slot on `repl`; returns its consistent point and, when
/// `export`, the exported snapshot's name. The snapshot lives while `repl` stays idle.
pub async fn create_slot(
    repl: &mut ReplConn,
    slot: &str,
    temporary: bool,
    export: bool,
) -> Result<(Lsn, Option<String>), CdcError> {
    let created = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput (SNAPSHOT '{}')",
            quote_ident(slot),
            if temporary { " TEMPORARY" } else { "" },
            if export { "export" } else { "nothing" }
        ))
        .await?;
    let point: Lsn = created
        .first("consistent_point")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| CdcError::Protocol("CREATE_REPLICATION_SLOT gave no consistent point".into()))?;
    let name = if export {
        Some(
            created
                .first("snapshot_name")
                .ok_or_else(|| CdcError::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".into()))?
                .to_string(),
        )
    } else {
        None
    };
    Ok((point, name))
}

/// An exported snapshot at a known LSN, held by a temporary slot on a replication
/// connection of its own. Use the snapshot (`SET TRANSACTION SNAPSHOT`) from another
/// connection, then [`TemporarySnapshot::close`]: the slot is dropped (PostgreSQL drops
/// a temporary slot with its session in any case, so a crash leaves nothing behind).
pub struct TemporarySnapshot {
    repl: ReplConn,
    slot: String,
    /// The snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// The consistent point: the snapshot holds what committed up to it.
    pub lsn: Lsn,
}

impl TemporarySnapshot {
    /// Creates the slot `slot` (a name no other slot has) and exports its snapshot. It
    /// waits, as any slot creation does, until the transactions running now have ended.
    pub async fn create(
        source: &tokio_postgres::Config,
        tls: &TlsSettings,
        slot: &str,
    ) -> Result<TemporarySnapshot, CdcError> {
        let mut repl = ReplConn::connect(source, tls).await?;
        let (lsn, name) = create_slot(&mut repl, slot, true, true).await?;
        Ok(TemporarySnapshot {
            repl,
            slot: slot.to_string(),
            name: name.expect("export asked"),
            lsn,
        })
    }

    /// Drops the slot (it retains WAL while it exists) and closes the connection.
    pub async fn close(mut self) {
        let drop = format!("DROP_REPLICATION_SLOT {}", quote_ident(&self.slot));
        if let Err(e) = self.repl.simple_query(&drop).await {
            tracing::debug!(error = %e, slot = %self.slot, "temporary slot not dropped; it goes with its session");
        }
        self.repl.close().await;
    }
}
