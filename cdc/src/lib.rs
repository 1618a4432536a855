//! PostgreSQL logical replication (pgoutput) for Pulse.
//!
//! This crate owns the replication connection, the pgoutput decoder, typed values and
//! the acknowledgement of the slot. It hands committed transactions to its consumer and
//! confirms to PostgreSQL only what the consumer reports durable (the durability rule of
//! DESIGN.md). It never writes to the database it reads, and never drops a slot by itself.

#![forbid(unsafe_code)]

pub mod model;
pub mod stream;

pub use model::{Change, ChangeKind, Column, Lsn, Relation, Row, Transaction, Value};
pub use stream::{Durable, Event, SnapshotRequest};
