//! PostgreSQL logical replication (pgoutput) for Pulse.
//!
//! This crate owns the replication connection, the pgoutput decoder, typed values and
//! the acknowledgement of the slot. It hands committed transactions to its consumer and
//! confirms to PostgreSQL only what the consumer reports durable (the durability rule of
//! DESIGN.md). It never writes to the database it reads, and never drops a slot by itself
//! (only [`slot::drop_slot`], which an operator calls through `pulsed slot drop`).
//!
//! Code map:
//! - [`conn`]: the replication connection (startup, auth, simple queries, CopyBoth).
//! - [`decode`]: bytes to replication and pgoutput messages; never panics.
//! - [`value`]: text-format values to typed [`Value`]s; unknown types become text.
//! - [`assemble`]: relation and type caches, transactions, streamed-transaction buffers.
//! - [`reader`]: the task: slot and publication, snapshot, streaming, acknowledgement,
//!   reconnects.
//! - [`slot`]: slot status and drop, for operators.
//! - [`snapshot`]: slot creation with an exported snapshot; temporary snapshots at a
//!   known LSN, for recomputing part of a consumer's state while the slot streams.
//! - [`stream`]: the hand-over to the consumer.
//! - [`tls`]: libpq's `sslmode`/`sslrootcert`/`sslcert`/`sslkey` for the replication
//!   connection and for tokio-postgres connections (rustls, aws-lc-rs).

#![forbid(unsafe_code)]

pub mod assemble;
pub mod conn;
pub mod decode;
pub mod error;
pub mod model;
pub mod reader;
pub mod slot;
pub mod snapshot;
pub mod stream;
pub mod tls;
pub mod value;

pub use error::CdcError;
pub use model::{Change, ChangeKind, Column, LogicalMessage, Lsn, Relation, Row, Transaction, Value};
pub use reader::{CdcConfig, CdcHandle, CdcStatus};

pub use stream::{Durable, Event, SnapshotRequest};
