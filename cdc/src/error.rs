//! Errors of the replication client, each saying what to do.

/// A PostgreSQL error response, with the fields operators need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    /// Severity (ERROR, FATAL…).
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Detail, if any.
    pub detail: Option<String>,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// Why the change stream stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// The network failed or the server went away; retried.
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("PostgreSQL: {0}")]
    Server(DbError),
    /// A catalog query failed.
    #[error("catalog query: {0}")]
    Catalog(#[from] tokio_postgres::Error),
    /// The server sent something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The pgoutput stream could not be decoded.
    #[error("decoding the change stream: {0}")]
    Decode(#[from] crate::decode::DecodeError),
    /// Authentication failed or is not supported.
    #[error("authentication: {0}")]
    Auth(String),
    /// TLS could not be set up as the connection string asks; the message says what to do.
    #[error("{0}")]
    Tls(String),
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is {0:?} on the source database; logical replication needs wal_level = logical: set it in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
    )]
    WalLevel(String),
    /// The role may not replicate.
    #[error(
        "role {0:?} lacks the REPLICATION attribute; run ALTER ROLE {0} WITH REPLICATION (as a superuser), or connect as a role that has it"
    )]
    NoReplicationPrivilege(String),
    /// Another process streams from the slot.
    #[error(
        "replication slot {slot:?} is active in another process (PID {pid}); stop the other pulsed (or pg_recvlogical), or run SELECT pg_terminate_backend({pid}) if it is stale"
    )]
    SlotActive {
        /// Slot.
        slot: String,
        /// The walsender's PID.
        pid: i32,
    },
    /// The slot lost WAL it needed.
    #[error(
        "replication slot {0:?} was invalidated (wal_status lost: PostgreSQL removed WAL it needed, see max_slot_wal_keep_size); changes are missing, so the derived state must be rebuilt: run `pulsed slot drop {0}` and start pulsed again to take a new snapshot"
    )]
    SlotInvalidated(String),
    /// The slot is missing and creation is off.
    #[error(
        "replication slot {0:?} does not exist and replication.create is false; create it (SELECT pg_create_logical_replication_slot('{0}', 'pgoutput')) or set replication.create = true"
    )]
    SlotMissing(String),
    /// The slot exists but belongs elsewhere or uses another plugin.
    #[error("replication slot {slot:?} cannot be used: {why}; choose another replication.slot")]
    SlotUnusable {
        /// Slot.
        slot: String,
        /// Why.
        why: String,
    },
    /// The slot exists but the state was never loaded from a snapshot.
    #[error(
        "replication slot {0:?} exists but pulsed's state was never loaded from its snapshot (no checkpoint), so changes made before the slot would be missing; run `pulsed slot drop {0}` and start pulsed again to create the slot with a fresh snapshot"
    )]
    SlotWithoutState(String),
    /// The publication is missing and creation is off.
    #[error(
        "publication {0:?} does not exist and replication.create is false; create it (CREATE PUBLICATION {0} FOR TABLE …) or set replication.create = true"
    )]
    PublicationMissing(String),
    /// The publication lacks a configured table.
    #[error(
        "publication {publication:?} does not include table {table}; run ALTER PUBLICATION {publication} ADD TABLE {table}, or remove it from replication.tables"
    )]
    PublicationLacksTable {
        /// Publication.
        publication: String,
        /// Table.
        table: String,
    },
    /// A configured table does not exist.
    #[error(
        "table {0} of replication.tables does not exist in the source database; create it or fix replication.tables"
    )]
    TableMissing(String),
    /// The consumer refused the initial snapshot.
    #[error("loading the initial snapshot failed: {0}")]
    Snapshot(String),
    /// The consumer went away.
    #[error("the consumer of the change stream stopped")]
    ConsumerGone,
}

impl CdcError {
    /// Whether retrying without a person's help may succeed. Every error is retried with
    /// backoff all the same (an operator may fix the cause while pulsed waits); this only
    /// decides how loudly it is reported.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CdcError::Io(_) | CdcError::Catalog(_) | CdcError::SlotActive { .. } | CdcError::Server(_)
        )
    }
}
