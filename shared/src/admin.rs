//! Console (admin) requests and responses, carried inside `admin` frames.
//!
//! One request kind per console screen (and per action on it). A request whose
//! subsystem is not in the running daemon is answered with an `unavailable` error that
//! names what is missing; the console shows that state, never made-up data.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The admin socket pulsed binds when `admin.socket` is not set, and where pulsetop looks
/// by default: `$XDG_RUNTIME_DIR/pulse/admin.sock`, else `/tmp/pulse-UID/admin.sock`.
/// (Under systemd the unit sets `/run/pulse/admin.sock`.)
pub fn default_admin_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("pulse/admin.sock"),
        _ => {
            use std::os::unix::fs::MetadataExt;
            let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
            PathBuf::from(format!("/tmp/pulse-{uid}/admin.sock"))
        }
    }
}

/// What the console asks of pulsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminRequest {
    /// The overview: version, uptime, health of each dependency.
    Status,
    /// The effective configuration, every key with its source, secrets masked.
    Config,
    /// Counters and latencies for the overview's sparklines and alerts.
    Metrics,
    /// Recent log events after a sequence number, and errors grouped by kind.
    Logs {
        /// Only events with a greater sequence number (0 for all kept).
        #[serde(default)]
        after: u64,
        /// At most this many events (the newest).
        #[serde(default = "default_log_limit")]
        limit: u32,
    },
    /// The tables of the `pulse` schema with their row counts.
    Tables,
    /// The latest rows of one `pulse` table.
    TableRows {
        /// The table name, without schema.
        table: String,
        /// At most this many rows.
        #[serde(default = "default_row_limit")]
        limit: u32,
    },
    /// The live tables of the schema file with their row counts per tenant.
    LiveTables,
    /// One page of a live table's rows, read from the source database (newest key
    /// first), optionally of one tenant; long values are cut and secrets masked.
    LiveRows {
        /// The live table's name in the schema file.
        table: String,
        /// Only this tenant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        /// Rows to skip (paging).
        #[serde(default)]
        offset: u32,
        /// At most this many rows.
        #[serde(default = "default_row_limit")]
        limit: u32,
    },
    /// Starts the live feed of committed changes on this session: answered with the
    /// kept changes after `after` (a sequence number; 0 for all), then pushed as more
    /// commit, each push an `admin` frame with the same id. One feed per session; a new
    /// watch replaces the old one.
    WatchChanges {
        /// Only changes with a greater sequence number.
        #[serde(default)]
        after: u64,
    },
    /// Stops the live feed of this session.
    UnwatchChanges,
    /// Replication slots and WAL senders of the source database.
    Replication,
    /// Who is online: tenants, then users, optionally of one tenant.
    Presence {
        /// Only this tenant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
    },
    /// The latest notifications, optionally of one tenant or user.
    Notifications {
        /// Only this tenant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        /// Only this user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// At most this many.
        #[serde(default = "default_row_limit")]
        limit: u32,
    },
    /// Storage usage per tenant against quota, and the largest files.
    Storage,
    /// Scheduled jobs, their recent runs and the dead letters.
    Jobs,
    /// Runs a scheduled job now (needs the run-job capability).
    RunJob {
        /// The job's name.
        name: String,
    },
    /// Puts a dead letter back on its queue (needs the run-job capability).
    RequeueDeadLetter {
        /// The dead letter's id.
        id: String,
    },
    /// The four platform settings, secrets masked.
    Settings,
    /// Changes one platform setting (needs the settings capability); validated and
    /// audited by the daemon.
    UpdateSetting {
        /// `deployment_url`, `deploy_key`, `enable_realtime` or `sync_interval_ms`.
        key: String,
        /// The new value as typed.
        value: String,
    },
    /// Replaces the deploy key with a fresh random one (needs the settings capability);
    /// the answer carries the new key, shown once.
    RotateDeployKey,
}

fn default_log_limit() -> u32 {
    500
}

fn default_row_limit() -> u32 {
    50
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
    /// Answers [`AdminRequest::Metrics`].
    Metrics(MetricsSample),
    /// Answers [`AdminRequest::Logs`].
    Logs(LogsPage),
    /// Answers [`AdminRequest::Tables`].
    Tables {
        /// Every table of the `pulse` schema.
        tables: Vec<TableInfo>,
    },
    /// Answers [`AdminRequest::TableRows`].
    TableRows(TableRows),
    /// Answers [`AdminRequest::LiveTables`].
    LiveTables {
        /// Live tables of the schema file, by name.
        tables: Vec<LiveTableInfo>,
    },
    /// Answers [`AdminRequest::WatchChanges`], then pushed under the same id as changes
    /// commit.
    Changes {
        /// Changes, oldest first.
        changes: Vec<ChangeEvent>,
        /// Changes this session did not receive (it fell behind, or they left the
        /// daemon's ring before they could be sent).
        #[serde(default)]
        missed: u64,
    },
    /// Answers [`AdminRequest::Replication`].
    Replication(ReplicationReport),
    /// Answers [`AdminRequest::Presence`].
    Presence(PresenceReport),
    /// Answers [`AdminRequest::Notifications`].
    Notifications {
        /// Newest first.
        items: Vec<NotificationItem>,
    },
    /// Answers [`AdminRequest::Storage`].
    Storage(StorageReport),
    /// Answers [`AdminRequest::Jobs`].
    Jobs(JobsReport),
    /// Answers [`AdminRequest::Settings`].
    Settings {
        /// The four settings, in the product page's order.
        settings: Vec<SettingEntry>,
    },
    /// Answers an action ([`AdminRequest::RunJob`], [`AdminRequest::RequeueDeadLetter`],
    /// [`AdminRequest::UpdateSetting`]).
    Done {
        /// What was done, for the status bar.
        message: String,
    },
    /// Answers [`AdminRequest::RotateDeployKey`].
    DeployKeyRotated {
        /// The new key, in clear, this once.
        key: String,
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

/// Counters and latencies at one moment. `None` means the daemon does not measure it
/// (the subsystem is not in this build), never zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSample {
    /// Open WebSocket sessions.
    pub connections: u64,
    /// Errors answered to clients since start (every code).
    pub errors_total: u64,
    /// Requests (frames, mutations, queries) handled since start, when counted.
    #[serde(default)]
    pub requests_total: Option<u64>,
    /// Changes applied from the stream since start.
    #[serde(default)]
    pub changes_total: Option<u64>,
    /// Live query latency, median, ms.
    #[serde(default)]
    pub query_p50_ms: Option<f64>,
    /// Mutation latency, median, ms.
    #[serde(default)]
    pub mutation_p50_ms: Option<f64>,
    /// Function invocations and failures since start.
    #[serde(default)]
    pub functions_total: Option<u64>,
    /// Function failures since start.
    #[serde(default)]
    pub function_errors_total: Option<u64>,
    /// Worst storage use against quota over all tenants, percent.
    #[serde(default)]
    pub storage_max_quota_pct: Option<f64>,
}

/// Severity of a log event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Fine detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something to look at.
    Warn,
    /// Something failed.
    Error,
}

impl LogLevel {
    /// Upper-case name, as log lines show it.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        }
    }
}

/// One log event kept by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Increasing number, for paging.
    pub seq: u64,
    /// Unix time, ms.
    pub at_ms: i64,
    /// Severity.
    pub level: LogLevel,
    /// The module that logged it.
    pub target: String,
    /// The message.
    pub message: String,
    /// Structured fields, in order, values as text.
    pub fields: Vec<(String, String)>,
}

/// Errors (and warnings) of one kind: same level, target and message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorGroup {
    /// Warn or error.
    pub level: LogLevel,
    /// `target: message`.
    pub kind: String,
    /// How many since start.
    pub count: u64,
    /// Unix time of the latest, ms.
    pub last_at_ms: i64,
    /// Fields of the latest, as `k=v` text.
    pub last_fields: String,
}

/// A page of logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogsPage {
    /// Oldest first.
    pub entries: Vec<LogEntry>,
    /// Errors and warnings grouped by kind, most frequent first.
    pub errors: Vec<ErrorGroup>,
    /// Events dropped from the daemon's buffer before they could be read.
    pub dropped: u64,
}

/// A table and its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableInfo {
    /// Schema-qualified name.
    pub name: String,
    /// Rows (exact for `pulse` tables).
    pub rows: i64,
    /// On-disk size, bytes.
    pub bytes: i64,
}

/// The latest rows of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRows {
    /// Schema-qualified name.
    pub table: String,
    /// Column names, in table order.
    pub columns: Vec<String>,
    /// Values as text (`NULL` for null), newest first when the table has a key.
    pub rows: Vec<Vec<String>>,
    /// Rows skipped before these (paging).
    #[serde(default)]
    pub offset: u32,
}

/// A live table of the schema file and its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveTableInfo {
    /// The name in the schema file.
    pub name: String,
    /// The source table, schema-qualified.
    pub source: String,
    /// The column naming the tenant.
    pub tenant_column: String,
    /// Rows in the source table (the planner's estimate when `estimated`).
    pub rows: i64,
    /// Whether `rows` is an estimate (huge tables are not counted, nor split by tenant).
    #[serde(default)]
    pub estimated: bool,
    /// Rows per tenant, most first (empty when estimated).
    #[serde(default)]
    pub tenants: Vec<TenantRows>,
}

/// How many rows of a live table belong to one tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRows {
    /// Tenant id.
    pub tenant: String,
    /// Rows.
    pub rows: i64,
}

/// One committed change from the replication stream, as the data explorer shows it.
/// Values are text, cut when long; secret-looking columns are masked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// Increasing number in the daemon's feed, for `WatchChanges { after }`.
    pub seq: u64,
    /// Commit LSN.
    pub lsn: String,
    /// Commit time, RFC 3339 (UTC).
    pub commit_time: String,
    /// Transaction id.
    pub xid: u32,
    /// Source table, schema-qualified.
    pub table: String,
    /// `insert`, `update`, `delete` or `truncate`.
    pub op: String,
    /// The row's key as `col=value` pairs (empty for truncate).
    pub key: String,
    /// Changed (or, for inserts, set) columns other than the key, `(column, value)`.
    pub columns: Vec<(String, String)>,
}

/// Replication as PostgreSQL reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationReport {
    /// `pg_current_wal_lsn()` of the source.
    pub current_lsn: String,
    /// Every replication slot of the cluster.
    pub slots: Vec<SlotInfo>,
    /// Every WAL sender (active replication connection).
    pub senders: Vec<SenderInfo>,
}

/// One replication slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// Slot name.
    pub name: String,
    /// Output plugin (`pgoutput`), empty for physical slots.
    pub plugin: String,
    /// Database, empty for physical slots.
    pub database: String,
    /// Whether a client is streaming from it.
    pub active: bool,
    /// Oldest WAL the slot needs.
    pub restart_lsn: Option<String>,
    /// What the client confirmed.
    pub confirmed_flush_lsn: Option<String>,
    /// Bytes between the current WAL position and the confirmed position.
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL kept for the slot.
    pub retained_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// One WAL sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SenderInfo {
    /// Client's application name.
    pub application: String,
    /// `streaming`, `catchup`…
    pub state: String,
    /// Last WAL position sent.
    pub sent_lsn: Option<String>,
    /// Last position the client flushed.
    pub flush_lsn: Option<String>,
    /// Flush lag, ms.
    pub flush_lag_ms: Option<f64>,
}

/// Presence: tenants, then users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceReport {
    /// Every tenant with someone online.
    pub tenants: Vec<TenantPresence>,
    /// Who is online (of the asked tenant, or all).
    pub users: Vec<PresenceEntry>,
}

/// How many are online in a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantPresence {
    /// Tenant id.
    pub tenant: String,
    /// Users online.
    pub online: u64,
}

/// One user online.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// Tenant id.
    pub tenant: String,
    /// User id.
    pub user: String,
    /// What they are viewing.
    pub resource: String,
    /// Their announced state (`active`, `idle`…).
    pub state: String,
    /// Seconds since their last heartbeat, when the tracker reports it.
    #[serde(default)]
    pub last_seen_secs: Option<u64>,
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationItem {
    /// Id.
    pub id: String,
    /// Tenant id.
    pub tenant: String,
    /// Recipient.
    pub user: String,
    /// Title.
    pub title: String,
    /// When, RFC 3339.
    pub created_at: String,
    /// Read by the recipient.
    pub read: bool,
}

/// Storage usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageReport {
    /// Per tenant.
    pub tenants: Vec<TenantStorage>,
    /// The largest files, largest first.
    pub largest: Vec<StoredFile>,
}

/// One tenant's usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantStorage {
    /// Tenant id.
    pub tenant: String,
    /// Bytes used.
    pub used_bytes: u64,
    /// Quota, bytes (0: none).
    pub quota_bytes: u64,
    /// Files.
    pub files: u64,
}

/// One stored file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Tenant id.
    pub tenant: String,
    /// File name.
    pub name: String,
    /// Size, bytes.
    pub bytes: u64,
    /// Uploaded at, RFC 3339.
    pub uploaded_at: String,
}

/// Scheduled jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsReport {
    /// Every job.
    pub jobs: Vec<JobInfo>,
    /// Recent runs, newest first.
    pub history: Vec<JobRun>,
    /// Messages that could not be handled.
    pub dead_letters: Vec<DeadLetter>,
}

/// One scheduled job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Name.
    pub name: String,
    /// Cron expression.
    pub schedule: String,
    /// Next run, RFC 3339.
    pub next_run: Option<String>,
    /// Outcome of the last run.
    pub last_status: Option<String>,
}

/// One job run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRun {
    /// Job name.
    pub job: String,
    /// Started at, RFC 3339.
    pub started_at: String,
    /// Duration, ms.
    pub duration_ms: Option<u64>,
    /// `ok`, `failed`, `timeout`, `running`.
    pub status: String,
    /// Error or summary.
    pub message: String,
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Id, for requeueing.
    pub id: String,
    /// Queue or source it came from.
    pub source: String,
    /// Why it failed.
    pub reason: String,
    /// When, RFC 3339.
    pub at: String,
}

/// What kind of value a setting holds, for editing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingKind {
    /// An http(s) URL.
    Url,
    /// A secret, never shown.
    Secret,
    /// true / false.
    Toggle,
    /// Milliseconds.
    Millis,
}

/// One platform setting as the console shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingEntry {
    /// Stable key.
    pub key: String,
    /// The product page's label.
    pub label: String,
    /// Kind of value.
    pub kind: SettingKind,
    /// Value, `***` for a set secret.
    pub value: String,
    /// `config` or `edited by X at T`.
    pub source: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_default_their_limits() {
        let r: AdminRequest = serde_json::from_str(r#"{"kind":"logs"}"#).unwrap();
        assert_eq!(r, AdminRequest::Logs { after: 0, limit: 500 });
        let r: AdminRequest = serde_json::from_str(r#"{"kind":"table_rows","table":"x"}"#).unwrap();
        assert_eq!(
            r,
            AdminRequest::TableRows {
                table: "x".into(),
                limit: 50
            }
        );
    }

    #[test]
    fn responses_round_trip() {
        let r = AdminResponse::Metrics(MetricsSample {
            connections: 3,
            ..Default::default()
        });
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"kind":"metrics""#), "{text}");
        assert_eq!(serde_json::from_str::<AdminResponse>(&text).unwrap(), r);
    }
}
