//! pulsetop, the Pulse operations console, as a library: the model and reducer
//! ([`state`]), the drawing ([`view`]), the network task ([`net`]) and where to connect
//! ([`endpoint`]). The binary wires them to a terminal.
//!
//! Invariants: rendering is pure (`view::render(&State, …)`); only `state::update`
//! changes the state; only `net` touches the network, from its own task; nothing is
//! written to the terminal except frames (logs go to a file).

#![forbid(unsafe_code)]

pub mod endpoint;
pub mod net;
pub mod state;
pub mod view;
