//! The Pulse wire: protocol frames, error codes and the capability table.
//!
//! This crate is the edge. It depends on serde and nothing heavier, and the daemon's
//! internal types never appear here: the daemon converts at the boundary.

#![forbid(unsafe_code)]

pub mod admin;
pub mod caps;
pub mod error;
pub mod protocol;

pub use caps::{Capability, Principal, Role, Scope, Target, authorize};
pub use error::{ErrorBody, ErrorCode};
pub use protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame};
