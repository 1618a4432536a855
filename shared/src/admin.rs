//! Console (admin) requests and responses, carried inside `admin` frames.

use serde::{Deserialize, Serialize};

/// What the console asks of pulsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminRequest {
    /// The overview: version, uptime, health of each dependency.
    Status,
    /// The effective configuration, every key with its source, secrets masked.
    Config,
}

/// What pulsed answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminResponse {
    /// Answers [`AdminRequest::Status`].
    Status(StatusReport),
    /// Answers [`AdminRequest::Config`].
    Config {
        /// Every effective key.
        entries: Vec<ConfigEntry>,
    },
}

/// The daemon's health at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Build version of pulsed.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// One line per dependency or subsystem.
    pub components: Vec<ComponentHealth>,
}

/// Health of one dependency or subsystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentHealth {
    /// For example `state_db`, `replication`, `broker`.
    pub name: String,
    /// Up, degraded or down.
    pub state: HealthState,
    /// Why, when not up; what it is doing, when up.
    pub detail: String,
}

/// Health of a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Working.
    Up,
    /// Working with reduced function (for example the broker is down and the outbox grows).
    Degraded,
    /// Not working.
    Down,
}

/// One effective configuration value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigEntry {
    /// Dotted key, for example `http.listen`.
    pub key: String,
    /// The value, masked when secret.
    pub value: String,
    /// `default`, `file <path>` or `environment PULSE__…`.
    pub source: String,
}
