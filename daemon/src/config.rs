//! Configuration: one typed, validated struct built in one place.
//!
//! Layers, lowest first: the built-in defaults of [`KEYS`], the TOML file, then
//! environment variables `PULSE__SECTION__KEY`. The `config` crate reads the file and the
//! environment; this module keeps track of where every value came from, so that an
//! invalid value is reported with its key, its source and what is expected, and so that
//! `pulsed config check` can show each effective value beside its source.
//!
//! Every key is declared once, in [`KEYS`]. Unknown keys are refused (a typo in a key
//! would otherwise silently leave the default in force). Secrets are held in [`Secret`],
//! whose `Debug` and `Display` never show the value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Environment, File, FileFormat, Source, Value, ValueKind};

/// The environment prefix: `PULSE__HTTP__LISTEN` sets `http.listen`.
pub const ENV_PREFIX: &str = "PULSE";

/// The default config file path, used when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pulse/pulsed.toml";

/// What kind of value a key holds: decides parsing, validation and masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Free text (may be empty when the key is optional).
    Text,
    /// Text that must not be shown: masked in every output.
    Secret,
    /// A PostgreSQL connection string (URL or key=value); its password is masked.
    Database,
    /// An AMQP URL (may be empty to disable); its password is masked.
    AmqpUrl,
    /// An `http(s)://` URL.
    HttpUrl,
    /// `host:port`.
    SocketAddr,
    /// `host:port`, or empty for "off".
    OptionalSocketAddr,
    /// A filesystem path.
    Path,
    /// `true` or `false`.
    Bool,
    /// A non-negative integer.
    Integer,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// A comma-separated list (or a TOML array).
    List,
}

/// One configuration key: its name, default and meaning. The README's configuration
/// reference is this table.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Dotted key, as in the file (`[http] listen = …`) and the environment
    /// (`PULSE__HTTP__LISTEN`).
    pub key: &'static str,
    /// The built-in default, as text.
    pub default: &'static str,
    /// How the value is parsed and shown.
    pub kind: KeyKind,
    /// What the key does, for `config check` and the README.
    pub help: &'static str,
}

const fn key(key: &'static str, default: &'static str, kind: KeyKind, help: &'static str) -> KeySpec {
    KeySpec {
        key,
        default,
        kind,
        help,
    }
}

/// Every configuration key pulsed knows.
pub const KEYS: &[KeySpec] = &[
    key(
        "source.url",
        "postgres://postgres@localhost:5432/memberpulse",
        KeyKind::Database,
        "Symfony's PostgreSQL database, read through logical replication and the catalog.",
    ),
    key(
        "state.url",
        "",
        KeyKind::Database,
        "Database holding the pulse schema; empty means the source database.",
    ),
    key(
        "replication.publication",
        "pulse",
        KeyKind::Text,
        "Publication pulsed reads.",
    ),
    key(
        "replication.slot",
        "pulse",
        KeyKind::Text,
        "Logical replication slot pulsed owns.",
    ),
    key(
        "replication.create",
        "true",
        KeyKind::Bool,
        "Create the publication and slot when missing (false: require existing ones).",
    ),
    key(
        "replication.tables",
        "",
        KeyKind::List,
        "Tables of the publication, schema-qualified; empty means every table of replication.schema.",
    ),
    key(
        "replication.schema",
        "public",
        KeyKind::Text,
        "Schema whose tables are published when replication.tables is empty.",
    ),
    key(
        "replication.max_retained_wal_mb",
        "1024",
        KeyKind::Integer,
        "Warn when the slot retains more WAL than this many MiB.",
    ),
    key(
        "replication.sink",
        "engine",
        KeyKind::Choice(&["engine", "checkpoint", "ledger"]),
        "Consumer of the change stream: engine (live tables, metrics, notifications), checkpoint (persist the position only) or ledger (also record every change in pulse.cdc_ledger, for diagnostics and tests).",
    ),
    key(
        "http.listen",
        "127.0.0.1:8080",
        KeyKind::SocketAddr,
        "Address of the WebSocket and HTTP API for browsers.",
    ),
    key(
        "http.cors_origins",
        "",
        KeyKind::List,
        "Origins allowed to call the HTTP API from browsers (uploads, downloads).",
    ),
    key(
        "metrics.listen",
        "127.0.0.1:9187",
        KeyKind::OptionalSocketAddr,
        "Address of the Prometheus /metrics listener; empty turns it off.",
    ),
    key(
        "admin.socket",
        "",
        KeyKind::Path,
        "Unix socket of the console (pulsetop); empty means $XDG_RUNTIME_DIR/pulse/admin.sock or /tmp/pulse-UID/admin.sock.",
    ),
    key(
        "admin.socket_mode",
        "660",
        KeyKind::Integer,
        "File mode of the admin socket, in octal: who may open the console.",
    ),
    key(
        "amqp.url",
        "",
        KeyKind::AmqpUrl,
        "RabbitMQ URL for webhooks and commands; empty runs without a broker.",
    ),
    key(
        "amqp.exchange",
        "pulse.events",
        KeyKind::Text,
        "Exchange the relay publishes events to, with the event name as routing key.",
    ),
    key(
        "amqp.declare_topology",
        "true",
        KeyKind::Bool,
        "Declare the exchange and queues (durable) at connect; false: Symfony owns the topology and pulsed only checks it (passive declare).",
    ),
    key(
        "amqp.commands_queue",
        "pulse.commands",
        KeyKind::Text,
        "Queue of commands from Symfony; empty turns the command consumer off.",
    ),
    key(
        "amqp.commands_dead_letter_queue",
        "pulse.commands.dead",
        KeyKind::Text,
        "Queue invalid or refused commands are moved to, with the reason in the x-pulse-reason header.",
    ),
    key(
        "amqp.commands_prefetch",
        "16",
        KeyKind::Integer,
        "Commands taken from the queue before earlier ones are acknowledged.",
    ),
    key(
        "amqp.publish_batch",
        "500",
        KeyKind::Integer,
        "Outbox events published per relay round before their confirms are awaited.",
    ),
    key(
        "amqp.max_attempts",
        "10",
        KeyKind::Integer,
        "Failed publishes (returned or nacked) after which an event moves to the dead-letter table.",
    ),
    key(
        "amqp.retry_base_ms",
        "500",
        KeyKind::Integer,
        "First retry delay of a failed publish, doubled each attempt.",
    ),
    key(
        "amqp.retry_max_ms",
        "60000",
        KeyKind::Integer,
        "Cap of the publish retry delay and of the reconnect delay.",
    ),
    key(
        "amqp.presence_debounce_ms",
        "5000",
        KeyKind::Integer,
        "A presence left followed by a join within this time sends neither event.",
    ),
    key(
        "storage.backend",
        "local",
        KeyKind::Choice(&["local", "s3"]),
        "Where files are stored: a local directory or S3-compatible storage.",
    ),
    key(
        "storage.path",
        "pulse-data/files",
        KeyKind::Path,
        "Directory of the local file store; with storage.backend = s3, where uploads are staged.",
    ),
    key(
        "storage.s3.endpoint",
        "",
        KeyKind::Text,
        "S3-compatible endpoint URL.",
    ),
    key("storage.s3.bucket", "", KeyKind::Text, "S3 bucket."),
    key("storage.s3.region", "us-east-1", KeyKind::Text, "S3 region."),
    key("storage.s3.access_key_id", "", KeyKind::Text, "S3 access key id."),
    key(
        "storage.s3.secret_access_key",
        "",
        KeyKind::Secret,
        "S3 secret access key.",
    ),
    key(
        "storage.s3.path_style",
        "true",
        KeyKind::Bool,
        "Path-style bucket addressing (most self-hosted S3 servers need it).",
    ),
    key(
        "storage.quota_bytes",
        "1073741824",
        KeyKind::Integer,
        "Storage quota of each tenant, in bytes (1 GiB); 0 means no quota.",
    ),
    key(
        "storage.tenant_quota_bytes",
        "",
        KeyKind::List,
        "Per-tenant quota overrides, as tenant=bytes pairs (0 means no quota).",
    ),
    key(
        "storage.tenant_max_upload_bytes",
        "",
        KeyKind::List,
        "Per-tenant overrides of limits.max_upload_bytes, as tenant=bytes pairs.",
    ),
    key(
        "storage.allowed_content_types",
        "image/png,image/jpeg,image/gif,image/webp,application/pdf,text/plain,text/csv,application/json,application/zip,application/octet-stream",
        KeyKind::List,
        "Content types an upload may declare; the first bytes must agree with the declared type.",
    ),
    key(
        "storage.upload_ticket_ttl_secs",
        "900",
        KeyKind::Integer,
        "How long an upload URL stays valid, in seconds.",
    ),
    key(
        "storage.signed_url_ttl_secs",
        "300",
        KeyKind::Integer,
        "Default lifetime of a signed download URL, in seconds.",
    ),
    key(
        "storage.signing_secret",
        "",
        KeyKind::Secret,
        "Secret signing upload and download URLs (at least 32 characters); empty means a random one per process, which breaks URLs across instances and restarts.",
    ),
    key(
        "storage.encryption_key",
        "",
        KeyKind::Secret,
        "AES-256-GCM key for encryption at rest, 32 bytes in base64; empty stores files in clear.",
    ),
    key(
        "storage.encryption_previous_keys",
        "",
        KeyKind::Secret,
        "Earlier encryption keys (base64, comma-separated), still used to read files written with them.",
    ),
    key(
        "platform.deployment_url",
        "http://localhost:8080",
        KeyKind::HttpUrl,
        "Deployment URL: the public base URL clients use to reach pulsed.",
    ),
    key(
        "platform.deploy_key",
        "",
        KeyKind::Secret,
        "Deploy key: the secret services (Symfony, the console over TCP) authenticate with; at least 32 characters.",
    ),
    key(
        "platform.enable_realtime",
        "true",
        KeyKind::Bool,
        "Enable Real-time: when false, clients are told to poll over HTTP.",
    ),
    key(
        "platform.sync_interval_ms",
        "5000",
        KeyKind::Integer,
        "Sync Interval: the polling interval in milliseconds for clients without real-time.",
    ),
    key(
        "limits.max_upload_bytes",
        "20971520",
        KeyKind::Integer,
        "Largest accepted upload, in bytes (20 MB).",
    ),
    key(
        "limits.function_timeout_secs",
        "60",
        KeyKind::Integer,
        "Time limit of a function (query or mutation), in seconds.",
    ),
    key(
        "limits.job_timeout_secs",
        "60",
        KeyKind::Integer,
        "Time limit of a scheduled job run, in seconds.",
    ),
    key(
        "limits.shutdown_grace_secs",
        "10",
        KeyKind::Integer,
        "How long a graceful stop lets in-flight work finish, in seconds.",
    ),
    key(
        "auth.issuer",
        "",
        KeyKind::Text,
        "Issuer (iss) of the JWTs Symfony signs with auth.hs256_secret or auth.public_key_path; empty turns tokens off.",
    ),
    key(
        "auth.audience",
        "",
        KeyKind::Text,
        "Audience (aud) tokens must carry; empty skips the audience check.",
    ),
    key(
        "auth.hs256_secret",
        "",
        KeyKind::Secret,
        "HS256 shared secret of the issuer (at least 32 characters).",
    ),
    key(
        "auth.public_key_path",
        "",
        KeyKind::Path,
        "RS256 or ES256 public key in PEM (LexikJWTAuthenticationBundle's public.pem).",
    ),
    key(
        "auth.key_id",
        "",
        KeyKind::Text,
        "Key id (kid) of the secret or PEM key; empty matches tokens without a kid.",
    ),
    key(
        "auth.jwks_path",
        "",
        KeyKind::Path,
        "A JWKS file of public keys (each with a kid).",
    ),
    key(
        "auth.jwks_issuer",
        "",
        KeyKind::Text,
        "Issuer the JWKS keys belong to; empty means auth.issuer.",
    ),
    key(
        "auth.leeway_secs",
        "30",
        KeyKind::Integer,
        "Clock skew allowed on exp and nbf, in seconds.",
    ),
    key(
        "auth.user_claim",
        "sub",
        KeyKind::Text,
        "Claim holding the user id.",
    ),
    key(
        "auth.tenant_claim",
        "tenant_id",
        KeyKind::Text,
        "Claim holding the tenant id.",
    ),
    key(
        "auth.roles_claim",
        "roles",
        KeyKind::Text,
        "Claim holding the Symfony role names.",
    ),
    key(
        "schema.path",
        "",
        KeyKind::Path,
        "The declarative schema (TOML): live tables, metrics and thresholds, notifications, mutations, role mapping, webhook events and their PHP classes, the users table; empty: none.",
    ),
    key(
        "limits.max_connections",
        "20000",
        KeyKind::Integer,
        "Most WebSocket connections at once; more are refused with 503.",
    ),
    key(
        "limits.connections_per_ip",
        "200",
        KeyKind::Integer,
        "Most WebSocket connections from one IP address.",
    ),
    key(
        "limits.http_requests_per_sec_per_ip",
        "50",
        KeyKind::Integer,
        "HTTP polling requests per second from one IP address (429 with Retry-After beyond).",
    ),
    key(
        "limits.frames_per_sec_per_user",
        "100",
        KeyKind::Integer,
        "Client frames per second per user (rate_limited beyond).",
    ),
    key(
        "limits.subscriptions_per_user",
        "100",
        KeyKind::Integer,
        "Live subscriptions one user may hold at once.",
    ),
    key(
        "limits.presence_ttl_secs",
        "30",
        KeyKind::Integer,
        "A user is offline this long after their last heartbeat.",
    ),
    key(
        "limits.history_updates",
        "10000",
        KeyKind::Integer,
        "Live-table updates kept for resume; older cursors get a resnapshot.",
    ),
    key(
        "limits.live_batch_ms",
        "4",
        KeyKind::Integer,
        "After live-table updates went out to 256 clients or more, the next ones wait this many milliseconds (after fewer clients, proportionally less) and go out together (0: each change at once); bounds the frames per second under load.",
    ),
    key(
        "jobs.enabled",
        "true",
        KeyKind::Bool,
        "Run scheduled jobs on this instance (each run still takes the job's advisory lock).",
    ),
    key(
        "jobs.prune_outbox",
        "0 */10 * * * *",
        KeyKind::Text,
        "Cron schedule (5 or 6 fields, UTC) of the job deleting delivered outbox rows; empty turns it off.",
    ),
    key(
        "jobs.sweep_presence",
        "0 * * * * *",
        KeyKind::Text,
        "Cron schedule of the job removing presence tabs silent past limits.presence_ttl_secs; empty turns it off.",
    ),
    key(
        "jobs.notification_retention",
        "0 17 * * * *",
        KeyKind::Text,
        "Cron schedule of the job deleting notifications past the schema's notification_retention_days; empty turns it off.",
    ),
    key(
        "jobs.expire_upload_tickets",
        "0 */15 * * * *",
        KeyKind::Text,
        "Cron schedule of the file cleanup run for expired upload tickets, stale reservations and stored uploads a crash left out of their tenant's usage; empty turns it off.",
    ),
    key(
        "jobs.delete_orphaned_files",
        "0 37 3 * * *",
        KeyKind::Text,
        "Cron schedule of the file cleanup run for files whose Symfony row is gone and unreferenced objects; empty turns it off.",
    ),
    key(
        "jobs.outbox_retention_hours",
        "24",
        KeyKind::Integer,
        "Delivered outbox rows older than this many hours are deleted by prune_outbox.",
    ),
    key(
        "log.level",
        "info",
        KeyKind::Text,
        "Log filter, in tracing's EnvFilter syntax (for example info,pulse_cdc=debug).",
    ),
    key(
        "log.format",
        "auto",
        KeyKind::Choice(&["auto", "text", "json", "journald"]),
        "Log output: auto means journald under systemd, text on a terminal.",
    ),
];

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The config file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "environment {v}"),
        }
    }
}

/// The environment variable that sets `key`.
pub fn env_var_for(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase())
}

/// A secret value. Never shown by `Debug` or `Display`; read it with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(<empty>)"
        } else {
            "Secret(***)"
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// A PostgreSQL connection string, kept whole (it may hold a password) and parsed, with
/// its TLS settings (libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
#[derive(Clone)]
pub struct DbUrl {
    raw: Secret,
    parsed: tokio_postgres::Config,
    tls: pulse_cdc::tls::TlsSettings,
    connector: pulse_cdc::tls::MakeTls,
}

impl DbUrl {
    /// Parses a URL or key=value connection string; reads the certificate files it names.
    pub fn parse(raw: &str) -> Result<DbUrl, String> {
        let (parsed, tls) = pulse_cdc::tls::parse_url(raw)?;
        if parsed.get_hosts().is_empty() {
            return Err("no host given".into());
        }
        let connector = tls.connector().map_err(|e| e.0)?;
        Ok(DbUrl {
            raw: Secret::new(raw),
            parsed,
            tls,
            connector,
        })
    }
    /// The parsed connection settings (tokio-postgres's; TLS is [`DbUrl::tls`]'s).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.parsed
    }
    /// The TLS settings.
    pub fn tls(&self) -> &pulse_cdc::tls::TlsSettings {
        &self.tls
    }
    /// The TLS connector for tokio-postgres connections and pools to this database.
    pub fn connector(&self) -> pulse_cdc::tls::MakeTls {
        self.connector.clone()
    }
    /// The connection string itself (contains the password, if any).
    pub fn expose(&self) -> &str {
        self.raw.expose()
    }
    /// The connection string with its password masked.
    pub fn masked(&self) -> String {
        mask_url_password(self.raw.expose())
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({})", self.masked())
    }
}

/// Masks the password of a `scheme://user:password@host` URL or of a `password=…` pair.
pub fn mask_url_password(raw: &str) -> String {
    if let Ok(mut url) = url::Url::parse(raw)
        && url.has_host()
    {
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        return url.to_string();
    }
    raw.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k.trim() == "password" => "password=***".to_string(),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Settings of the replication stream.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Publication name.
    pub publication: String,
    /// Slot name.
    pub slot: String,
    /// Create the publication and slot when missing.
    pub create: bool,
    /// Published tables (schema-qualified); empty: all of `schema`.
    pub tables: Vec<String>,
    /// Schema published when `tables` is empty.
    pub schema: String,
    /// Retained-WAL warning threshold.
    pub max_retained_wal_bytes: u64,
    /// Which consumer pulsed runs on the stream.
    pub sink: SinkKind,
}

/// The consumer of the change stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// The realtime engine (live tables, metrics, notifications).
    Engine,
    /// Persist the position only.
    Checkpoint,
    /// Record every change in `pulse.cdc_ledger` too.
    Ledger,
}

/// Where files go.
#[derive(Debug, Clone)]
pub enum StorageConfig {
    /// A local directory (fsync on).
    Local {
        /// The directory.
        path: PathBuf,
    },
    /// S3-compatible storage.
    S3 {
        /// Endpoint URL.
        endpoint: String,
        /// Bucket.
        bucket: String,
        /// Region.
        region: String,
        /// Access key id.
        access_key_id: String,
        /// Secret access key.
        secret_access_key: Secret,
        /// Path-style addressing.
        path_style: bool,
        /// Local folder where uploads are staged before they go to the bucket.
        staging: PathBuf,
    },
}

/// File storage policy: quotas, limits, URL signing, encryption at rest.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Quota of a tenant without an override; `None` is no quota.
    pub quota_bytes: Option<u64>,
    /// Per-tenant quota overrides (`None`: no quota for that tenant).
    pub tenant_quota_bytes: BTreeMap<String, Option<u64>>,
    /// Per-tenant upload size limits, overriding `limits.max_upload_bytes`.
    pub tenant_max_upload_bytes: BTreeMap<String, u64>,
    /// Content types an upload may declare.
    pub allowed_content_types: Vec<String>,
    /// Lifetime of an upload ticket.
    pub upload_ticket_ttl: Duration,
    /// Default lifetime of a signed download URL.
    pub signed_url_ttl: Duration,
    /// HMAC key of upload and download URLs; empty means one random per process.
    pub signing_secret: Secret,
    /// The AES-256 key new files are encrypted with; `None` stores in clear.
    pub encryption_key: Option<[u8; 32]>,
    /// Keys files written earlier may use, for reading only.
    pub previous_encryption_keys: Vec<[u8; 32]>,
}

impl FilesConfig {
    /// The quota of `tenant`, `None` when unlimited.
    pub fn quota_for(&self, tenant: &str) -> Option<u64> {
        match self.tenant_quota_bytes.get(tenant) {
            Some(q) => *q,
            None => self.quota_bytes,
        }
    }

    /// The largest upload `tenant` may make, given the global limit.
    pub fn max_upload_for(&self, tenant: &str, global: u64) -> u64 {
        self.tenant_max_upload_bytes
            .get(tenant)
            .copied()
            .unwrap_or(global)
    }
}

/// The four platform settings of the product page, as defaults: the live values are in
/// the `pulse` schema once edited.
#[derive(Debug, Clone)]
pub struct PlatformDefaults {
    /// Deployment URL.
    pub deployment_url: String,
    /// Deploy key.
    pub deploy_key: Secret,
    /// Enable Real-time.
    pub enable_realtime: bool,
    /// Sync Interval, in ms.
    pub sync_interval_ms: u64,
}

/// Limits that SIGHUP can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest upload.
    pub max_upload_bytes: u64,
    /// Function time limit.
    pub function_timeout: Duration,
    /// Job time limit.
    pub job_timeout: Duration,
    /// Graceful stop bound.
    pub shutdown_grace: Duration,
    /// WebSocket connections at once.
    pub max_connections: u64,
    /// WebSocket connections per IP.
    pub connections_per_ip: u64,
    /// Polling requests per second per IP.
    pub http_requests_per_sec_per_ip: u64,
    /// Client frames per second per user.
    pub frames_per_sec_per_user: u64,
    /// Subscriptions per user.
    pub subscriptions_per_user: u64,
    /// Presence lifetime after the last heartbeat.
    pub presence_ttl: Duration,
    /// Updates kept for resume.
    pub history_updates: u64,
    /// Shortest time between two sends of live-table updates (zero: no wait).
    pub live_batch: Duration,
}

/// JWT verification settings (see `crate::auth`).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Issuer of the secret and PEM keys.
    pub issuer: String,
    /// Required audience, empty for none.
    pub audience: String,
    /// HS256 secret.
    pub hs256_secret: Secret,
    /// RS256/ES256 PEM public key.
    pub public_key_path: Option<PathBuf>,
    /// JWKS file.
    pub jwks_path: Option<PathBuf>,
    /// Issuer of the JWKS keys (empty: `issuer`).
    pub jwks_issuer: String,
    /// kid of the secret / PEM key.
    pub key_id: String,
    /// Leeway on exp / nbf.
    pub leeway_secs: u64,
    /// User id claim.
    pub user_claim: String,
    /// Tenant id claim.
    pub tenant_claim: String,
    /// Roles claim.
    pub roles_claim: String,
}

/// RabbitMQ settings: webhooks out, commands in.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Broker URL (contains the password).
    pub url: Secret,
    /// Exchange events are published to.
    pub exchange: String,
    /// Declare the topology (true) or only check it passively (Symfony owns it).
    pub declare_topology: bool,
    /// Commands queue; `None` turns the consumer off.
    pub commands_queue: Option<String>,
    /// Dead-letter queue of refused commands.
    pub commands_dead_letter_queue: String,
    /// Unacknowledged commands in flight.
    pub commands_prefetch: u16,
    /// Events published per relay round.
    pub publish_batch: usize,
    /// Failed publishes before the dead-letter table.
    pub max_attempts: u32,
    /// First publish retry delay.
    pub retry_base: Duration,
    /// Cap of retry and reconnect delays.
    pub retry_max: Duration,
    /// Presence flap window.
    pub presence_debounce: Duration,
}

/// Scheduled jobs.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Whether this instance runs schedules.
    pub enabled: bool,
    /// Schedules by job name (only jobs with a non-empty schedule).
    pub schedules: Vec<(String, String)>,
    /// Retention of delivered outbox rows.
    pub outbox_retention: Duration,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// journald under systemd (JOURNAL_STREAM set), else text.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
    /// Straight to journald.
    Journald,
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Symfony's database.
    pub source_db: DbUrl,
    /// The database of the `pulse` schema.
    pub state_db: DbUrl,
    /// Replication settings.
    pub replication: ReplicationConfig,
    /// Browser API address.
    pub http_listen: SocketAddr,
    /// CORS allow-list.
    pub cors_origins: Vec<String>,
    /// Prometheus listener; `None` is off.
    pub metrics_listen: Option<SocketAddr>,
    /// Console socket.
    pub admin_socket: PathBuf,
    /// Console socket file mode.
    pub admin_socket_mode: u32,
    /// Broker; `None` runs without one.
    pub amqp_url: Option<Secret>,
    /// Broker settings; `None` when amqp.url is empty (no webhooks, no commands).
    pub amqp: Option<AmqpConfig>,
    /// Scheduled jobs.
    pub jobs: JobsConfig,
    /// File storage.
    pub storage: StorageConfig,
    /// File storage policy.
    pub files: FilesConfig,
    /// Platform settings defaults.
    pub platform: PlatformDefaults,
    /// Reloadable limits.
    pub limits: Limits,
    /// JWT verification.
    pub auth: AuthConfig,
    /// The schema file, if any.
    pub schema_path: Option<PathBuf>,
    /// Log filter.
    pub log_level: String,
    /// Log output.
    pub log_format: LogFormat,
    /// Every effective value with its origin, for `config check` and the console.
    pub effective: Vec<Effective>,
}

/// One effective value, shown with secrets masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    /// Dotted key.
    pub key: &'static str,
    /// Value as shown (masked when secret).
    pub shown: String,
    /// Where it came from.
    pub origin: Origin,
}

/// A configuration problem: the key, its source, the value, what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key (or the unknown key).
    pub key: String,
    /// Where the value came from.
    pub origin: Origin,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {}): {}", self.key, self.origin, self.message)
    }
}

/// Every problem found, all at once, so one edit can fix them all.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Where to read the configuration from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file, and whether it must exist (true when given with `--config`).
    pub file: Option<(PathBuf, bool)>,
    /// The environment, as pairs (the process environment in production; tests pass
    /// their own so they never touch global state).
    pub env: Vec<(String, String)>,
}

impl ConfigSource {
    /// The file given on the command line (must exist), or the default path (may be
    /// missing), plus the process environment.
    pub fn from_cli(path: Option<&Path>) -> ConfigSource {
        let file = match path {
            Some(p) => Some((p.to_path_buf(), true)),
            None => Some((PathBuf::from(DEFAULT_CONFIG_PATH), false)),
        };
        ConfigSource {
            file,
            env: std::env::vars().collect(),
        }
    }
}

/// A raw value with its origin, before parsing.
struct Raw {
    text: String,
    origin: Origin,
}

fn value_to_text(v: Value) -> Result<String, String> {
    match v.kind {
        ValueKind::Array(items) => items
            .into_iter()
            .map(value_to_text)
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(",")),
        ValueKind::Table(_) => Err("expected a value, found a table".into()),
        ValueKind::Nil => Ok(String::new()),
        _ => v.into_string().map_err(|e| e.to_string()),
    }
}

fn flatten(prefix: &str, map: config::Map<String, Value>, out: &mut Vec<(String, Value)>) {
    for (k, v) in map {
        let full = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        match v.kind {
            ValueKind::Table(t) => flatten(&full, t, out),
            _ => out.push((full, v)),
        }
    }
}

impl Config {
    /// Reads, merges and validates. Returns every problem at once.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let mut raw: BTreeMap<&'static str, Raw> = KEYS
            .iter()
            .map(|k| {
                (
                    k.key,
                    Raw {
                        text: k.default.to_string(),
                        origin: Origin::Default,
                    },
                )
            })
            .collect();

        if let Some((path, required)) = &source.file
            && (path.exists() || *required)
        {
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    File::from_str(&text, FileFormat::Toml)
                        .collect()
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok(map) => {
                    let mut pairs = Vec::new();
                    flatten("", map, &mut pairs);
                    let p = path.clone();
                    layer(&mut raw, &mut problems, pairs, &move |_| Origin::File(p.clone()));
                }
                Err(e) => problems.push(ConfigProblem {
                    key: "(file)".into(),
                    origin: Origin::File(path.clone()),
                    message: format!("cannot read the config file: {e}"),
                }),
            }
        }

        let env_map: config::Map<String, String> = source
            .env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .cloned()
            .collect();
        let env = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .source(Some(env_map));
        match env.collect() {
            Ok(map) => {
                let mut pairs = Vec::new();
                flatten("", map, &mut pairs);
                layer(&mut raw, &mut problems, pairs, &|k| Origin::Env(env_var_for(k)));
            }
            Err(e) => problems.push(ConfigProblem {
                key: "(environment)".into(),
                origin: Origin::Env(format!("{ENV_PREFIX}__*")),
                message: e.to_string(),
            }),
        }

        let mut v = Validator { raw: &raw, problems };
        let config = v.build();
        if v.problems.is_empty() {
            Ok(config.expect("a config is built whenever no problem was found"))
        } else {
            Err(ConfigErrors(v.problems))
        }
    }

    /// The limits that a reload may change.
    pub fn reloadable(&self) -> (String, Limits) {
        (self.log_level.clone(), self.limits.clone())
    }
}

/// Keys of earlier versions that now live in the schema file; refused with a pointer there.
const MOVED_TO_SCHEMA: &[&str] = &["amqp.events", "amqp.class_namespace"];

/// Lays one source's pairs over the values so far; unknown keys become problems.
fn layer(
    raw: &mut BTreeMap<&'static str, Raw>,
    problems: &mut Vec<ConfigProblem>,
    pairs: Vec<(String, Value)>,
    origin_of: &dyn Fn(&str) -> Origin,
) {
    for (k, v) in pairs {
        let origin = origin_of(&k);
        match KEYS.iter().find(|spec| spec.key == k) {
            None if MOVED_TO_SCHEMA.contains(&k.as_str()) => problems.push(ConfigProblem {
                key: k.clone(),
                origin,
                message: "moved to the schema file: which events are sent and their PHP classes are its [events] section (class_namespace, send); see docs/symfony.md".into(),
            }),
            None => problems.push(ConfigProblem {
                key: k.clone(),
                origin,
                message: "unknown key; see `pulsed config check` or the README for the keys pulsed knows"
                    .into(),
            }),
            Some(spec) => match value_to_text(v) {
                Ok(text) => {
                    raw.insert(spec.key, Raw { text, origin });
                }
                Err(e) => problems.push(ConfigProblem {
                    key: k.clone(),
                    origin,
                    message: e,
                }),
            },
        }
    }
}

/// Parses each key by its kind, collecting problems.
struct Validator<'a> {
    raw: &'a BTreeMap<&'static str, Raw>,
    problems: Vec<ConfigProblem>,
}

impl Validator<'_> {
    fn raw(&self, key: &str) -> &Raw {
        self.raw
            .get(key)
            .unwrap_or_else(|| panic!("config key {key} is not declared in KEYS"))
    }

    fn fail(&mut self, key: &str, message: impl Into<String>) {
        let origin = self.raw(key).origin.clone();
        let shown = self.shown(key);
        self.problems.push(ConfigProblem {
            key: key.to_string(),
            origin,
            message: format!("{} (got {shown:?})", message.into()),
        });
    }

    fn spec(key: &str) -> &'static KeySpec {
        KEYS.iter().find(|s| s.key == key).expect("declared key")
    }

    fn shown(&self, key: &str) -> String {
        let text = &self.raw(key).text;
        match Self::spec(key).kind {
            KeyKind::Secret if text.is_empty() => String::new(),
            KeyKind::Secret => "***".into(),
            KeyKind::Database | KeyKind::AmqpUrl => mask_url_password(text),
            _ => text.clone(),
        }
    }

    fn text(&self, key: &str) -> String {
        self.raw(key).text.trim().to_string()
    }

    fn nonempty(&mut self, key: &str) -> Option<String> {
        let t = self.text(key);
        if t.is_empty() {
            self.fail(key, "must not be empty");
            None
        } else {
            Some(t)
        }
    }

    fn bool(&mut self, key: &str) -> Option<bool> {
        match self.text(key).to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => {
                self.fail(key, "expected true or false");
                None
            }
        }
    }

    fn int(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        match self.text(key).parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            Ok(_) => {
                self.fail(key, format!("expected a whole number from {min} to {max}"));
                None
            }
            Err(_) => {
                self.fail(key, format!("expected a whole number from {min} to {max}"));
                None
            }
        }
    }

    fn addr(&mut self, key: &str) -> Option<SocketAddr> {
        let t = self.text(key);
        match t.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.fail(
                    key,
                    "expected a socket address such as 127.0.0.1:8080 or [::1]:8080",
                );
                None
            }
        }
    }

    fn optional_addr(&mut self, key: &str) -> Option<Option<SocketAddr>> {
        if self.text(key).is_empty() {
            Some(None)
        } else {
            self.addr(key).map(Some)
        }
    }

    fn db(&mut self, key: &str) -> Option<DbUrl> {
        let t = self.text(key);
        match DbUrl::parse(&t) {
            Ok(u) => Some(u),
            Err(e) => {
                self.fail(
                    key,
                    format!("expected a PostgreSQL URL such as postgres://user@host:5432/dbname: {e}"),
                );
                None
            }
        }
    }

    fn list(&self, key: &str) -> Vec<String> {
        self.text(key)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    fn choice(&mut self, key: &str) -> Option<String> {
        let KeyKind::Choice(options) = Self::spec(key).kind else {
            unreachable!("{key} is a choice")
        };
        let t = self.text(key);
        if options.contains(&t.as_str()) {
            Some(t)
        } else {
            self.fail(key, format!("expected one of {}", options.join(", ")));
            None
        }
    }

    fn ident(&mut self, key: &str) -> Option<String> {
        let t = self.nonempty(key)?;
        let ok = t.len() <= 63
            && t.chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && t.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Some(t)
        } else {
            self.fail(key, "expected a PostgreSQL name: lowercase letters, digits and _, at most 63 characters, not starting with a digit");
            None
        }
    }

    fn amqp(&mut self, url: Option<Option<Secret>>) -> Option<Option<AmqpConfig>> {
        let name = |v: &mut Self, key: &str, may_be_empty: bool| -> Option<String> {
            let t = v.text(key);
            // AMQP short strings: at most 255 bytes; no control characters.
            if (t.is_empty() && !may_be_empty) || t.len() > 255 || t.chars().any(char::is_control) {
                v.fail(key, "expected a name of 1 to 255 printable characters");
                None
            } else {
                Some(t)
            }
        };
        let exchange = name(self, "amqp.exchange", false);
        let declare_topology = self.bool("amqp.declare_topology");
        let commands_queue = name(self, "amqp.commands_queue", true);
        let dlq = name(self, "amqp.commands_dead_letter_queue", false);
        let prefetch = self.int("amqp.commands_prefetch", 1, 10_000);
        let batch = self.int("amqp.publish_batch", 1, 100_000);
        let max_attempts = self.int("amqp.max_attempts", 1, 1_000_000);
        let retry_base = self.int("amqp.retry_base_ms", 1, 3_600_000);
        let retry_max = self.int("amqp.retry_max_ms", 1, 86_400_000);
        let debounce = self.int("amqp.presence_debounce_ms", 0, 3_600_000);
        let url = url?;
        let Some(url) = url else {
            return Some(None);
        };
        Some(Some(AmqpConfig {
            url,
            exchange: exchange?,
            declare_topology: declare_topology?,
            commands_queue: commands_queue.map(|q| if q.is_empty() { None } else { Some(q) })?,
            commands_dead_letter_queue: dlq?,
            commands_prefetch: prefetch? as u16,
            publish_batch: batch? as usize,
            max_attempts: max_attempts? as u32,
            retry_base: Duration::from_millis(retry_base?),
            retry_max: Duration::from_millis(retry_max?),
            presence_debounce: Duration::from_millis(debounce?),
        }))
    }

    fn jobs(&mut self) -> Option<JobsConfig> {
        let enabled = self.bool("jobs.enabled");
        let mut schedules = Vec::new();
        for spec in KEYS.iter().filter(|k| k.key.starts_with("jobs.")) {
            // Schedules are the jobs.* text keys; the other jobs.* keys are numbers or flags.
            if spec.kind != KeyKind::Text {
                continue;
            }
            let t = self.text(spec.key);
            if t.is_empty() {
                continue;
            }
            match t.parse::<croner::Cron>() {
                Ok(_) => schedules.push((spec.key["jobs.".len()..].to_string(), t)),
                Err(e) => self.fail(
                    spec.key,
                    format!("expected a cron expression of 5 or 6 fields such as 0 */10 * * * *: {e}"),
                ),
            }
        }
        let retention = self.int("jobs.outbox_retention_hours", 1, 24 * 3650);
        Some(JobsConfig {
            enabled: enabled?,
            schedules,
            outbox_retention: Duration::from_secs(retention? * 3600),
        })
    }

    /// `tenant=bytes` pairs of a list key.
    fn tenant_bytes(&mut self, key: &str) -> Option<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        let mut ok = true;
        for item in self.list(key) {
            match item
                .split_once('=')
                .map(|(t, n)| (t.trim(), n.trim().parse::<u64>()))
            {
                Some((t, Ok(n))) if !t.is_empty() => {
                    out.insert(t.to_string(), n);
                }
                _ => {
                    self.fail(
                        key,
                        format!("{item:?} is not a tenant=bytes pair such as club-a=1073741824"),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// A 32-byte key in base64.
    fn aes_key(&mut self, key: &str, text: &str) -> Option<[u8; 32]> {
        use base64::Engine as _;
        match base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        {
            Some(k) => Some(k),
            None => {
                self.fail(
                    key,
                    "expected 32 bytes in base64 (generate one with `openssl rand -base64 32`)",
                );
                None
            }
        }
    }

    fn files(&mut self) -> Option<FilesConfig> {
        let quota = self.int("storage.quota_bytes", 0, u64::MAX >> 2);
        let tenant_quota = self.tenant_bytes("storage.tenant_quota_bytes");
        let tenant_max = self.tenant_bytes("storage.tenant_max_upload_bytes");
        let allowed = self.list("storage.allowed_content_types");
        for t in &allowed {
            if !t.contains('/') || t.contains(char::is_whitespace) {
                self.fail(
                    "storage.allowed_content_types",
                    format!("{t:?} is not a content type such as image/png"),
                );
            }
        }
        let ticket_ttl = self.int("storage.upload_ticket_ttl_secs", 10, 7 * 86_400);
        let signed_ttl = self.int("storage.signed_url_ttl_secs", 10, 30 * 86_400);
        let signing = self.raw("storage.signing_secret").text.clone();
        let signing_ok = if !signing.is_empty() && signing.len() < 32 {
            self.fail(
                "storage.signing_secret",
                format!("too short: {} characters, at least 32 are needed (generate one with `openssl rand -hex 32`)", signing.len()),
            );
            false
        } else {
            true
        };
        let enc_text = self.raw("storage.encryption_key").text.clone();
        let encryption_key = if enc_text.trim().is_empty() {
            Some(None)
        } else {
            self.aes_key("storage.encryption_key", &enc_text).map(Some)
        };
        let prev_text = self.raw("storage.encryption_previous_keys").text.clone();
        let mut previous = Vec::new();
        let mut prev_ok = true;
        for part in prev_text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match self.aes_key("storage.encryption_previous_keys", part) {
                Some(k) => previous.push(k),
                None => prev_ok = false,
            }
        }
        Some(FilesConfig {
            quota_bytes: quota.map(|q| (q > 0).then_some(q))?,
            tenant_quota_bytes: tenant_quota?
                .into_iter()
                .map(|(t, q)| (t, (q > 0).then_some(q)))
                .collect(),
            tenant_max_upload_bytes: tenant_max?,
            allowed_content_types: allowed.into_iter().map(|t| t.to_ascii_lowercase()).collect(),
            upload_ticket_ttl: Duration::from_secs(ticket_ttl?),
            signed_url_ttl: Duration::from_secs(signed_ttl?),
            signing_secret: signing_ok.then(|| Secret::new(signing))?,
            encryption_key: encryption_key?,
            previous_encryption_keys: prev_ok.then_some(previous)?,
        })
    }

    fn build(&mut self) -> Option<Config> {
        let source_db = self.db("source.url");
        let state_db = if self.text("state.url").is_empty() {
            source_db.clone()
        } else {
            self.db("state.url")
        };
        let publication = self.ident("replication.publication");
        let slot = self.ident("replication.slot");
        let create = self.bool("replication.create");
        let tables = self.list("replication.tables");
        for t in &tables {
            if !t.contains('.') {
                self.fail(
                    "replication.tables",
                    format!("table {t:?} must be schema-qualified, for example public.{t}"),
                );
            }
        }
        let schema = self.nonempty("replication.schema");
        let max_wal = self.int("replication.max_retained_wal_mb", 1, 1 << 30);
        let sink = self.choice("replication.sink").map(|s| match s.as_str() {
            "ledger" => SinkKind::Ledger,
            "checkpoint" => SinkKind::Checkpoint,
            _ => SinkKind::Engine,
        });
        let http_listen = self.addr("http.listen");
        let cors_origins = self.list("http.cors_origins");
        for o in &cors_origins {
            if url::Url::parse(o)
                .map(|u| !matches!(u.scheme(), "http" | "https"))
                .unwrap_or(true)
            {
                self.fail(
                    "http.cors_origins",
                    format!("{o:?} is not an origin such as https://app.example.org"),
                );
            }
        }
        let metrics_listen = self.optional_addr("metrics.listen");
        let admin_socket = {
            let t = self.text("admin.socket");
            if t.is_empty() {
                Some(default_admin_socket())
            } else {
                Some(PathBuf::from(t))
            }
        };
        let admin_socket_mode = {
            let t = self.text("admin.socket_mode");
            match u32::from_str_radix(&t, 8) {
                Ok(m) if m <= 0o777 => Some(m),
                _ => {
                    self.fail("admin.socket_mode", "expected an octal file mode such as 660");
                    None
                }
            }
        };
        let amqp_url = {
            let t = self.text("amqp.url");
            if t.is_empty() {
                Some(None)
            } else if url::Url::parse(&t)
                .map(|u| matches!(u.scheme(), "amqp" | "amqps"))
                .unwrap_or(false)
            {
                Some(Some(Secret::new(t)))
            } else {
                self.fail(
                    "amqp.url",
                    "expected an AMQP URL such as amqp://guest:guest@127.0.0.1:5672/%2f, or empty",
                );
                None
            }
        };
        let storage = match self.choice("storage.backend").as_deref() {
            Some("local") => self.nonempty("storage.path").map(|p| StorageConfig::Local {
                path: PathBuf::from(p),
            }),
            Some("s3") => {
                let endpoint = self.nonempty("storage.s3.endpoint");
                let bucket = self.nonempty("storage.s3.bucket");
                let region = self.nonempty("storage.s3.region");
                let access_key_id = self.nonempty("storage.s3.access_key_id");
                let secret = self.nonempty("storage.s3.secret_access_key");
                let path_style = self.bool("storage.s3.path_style");
                let staging = self.nonempty("storage.path");
                match (
                    endpoint,
                    bucket,
                    region,
                    access_key_id,
                    secret,
                    path_style,
                    staging,
                ) {
                    (
                        Some(endpoint),
                        Some(bucket),
                        Some(region),
                        Some(access_key_id),
                        Some(s),
                        Some(path_style),
                        Some(staging),
                    ) => Some(StorageConfig::S3 {
                        staging: PathBuf::from(staging),
                        endpoint,
                        bucket,
                        region,
                        access_key_id,
                        secret_access_key: Secret::new(s),
                        path_style,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        let files = self.files();
        let deployment_url = {
            let t = self.text("platform.deployment_url");
            if url::Url::parse(&t)
                .map(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                .unwrap_or(false)
            {
                Some(t)
            } else {
                self.fail("platform.deployment_url", "expected an http:// or https:// URL");
                None
            }
        };
        let deploy_key = {
            let t = self.raw("platform.deploy_key").text.clone();
            if !t.is_empty() && t.len() < 32 {
                self.fail("platform.deploy_key", format!("too short: {} characters, at least 32 are needed (generate one with `openssl rand -hex 32`)", t.len()));
                None
            } else {
                Some(Secret::new(t))
            }
        };
        let amqp = self.amqp(amqp_url.clone());
        let jobs = self.jobs();
        let enable_realtime = self.bool("platform.enable_realtime");
        let sync_interval_ms = self.int("platform.sync_interval_ms", 100, 3_600_000);
        let max_upload = self.int("limits.max_upload_bytes", 1, 5 << 30);
        let fn_timeout = self.int("limits.function_timeout_secs", 1, 3600);
        let job_timeout = self.int("limits.job_timeout_secs", 1, 86_400);
        let grace = self.int("limits.shutdown_grace_secs", 1, 600);
        let max_connections = self.int("limits.max_connections", 1, 1_000_000);
        let connections_per_ip = self.int("limits.connections_per_ip", 1, 1_000_000);
        let http_rps = self.int("limits.http_requests_per_sec_per_ip", 1, 1_000_000);
        let frames_ps = self.int("limits.frames_per_sec_per_user", 1, 1_000_000);
        let subs = self.int("limits.subscriptions_per_user", 1, 100_000);
        let presence_ttl = self.int("limits.presence_ttl_secs", 1, 3600);
        let history = self.int("limits.history_updates", 0, 10_000_000);
        let live_batch = self.int("limits.live_batch_ms", 0, 1000);
        let leeway = self.int("auth.leeway_secs", 0, 600);
        let opt_path = |v: &Self, k: &str| {
            let t = v.text(k);
            (!t.is_empty()).then(|| PathBuf::from(t))
        };
        let auth = AuthConfig {
            issuer: self.text("auth.issuer"),
            audience: self.text("auth.audience"),
            hs256_secret: Secret::new(self.raw("auth.hs256_secret").text.clone()),
            public_key_path: opt_path(self, "auth.public_key_path"),
            jwks_path: opt_path(self, "auth.jwks_path"),
            jwks_issuer: self.text("auth.jwks_issuer"),
            key_id: self.text("auth.key_id"),
            leeway_secs: leeway.unwrap_or(30),
            user_claim: self.nonempty("auth.user_claim").unwrap_or_default(),
            tenant_claim: self.nonempty("auth.tenant_claim").unwrap_or_default(),
            roles_claim: self.nonempty("auth.roles_claim").unwrap_or_default(),
        };
        let schema_path = opt_path(self, "schema.path");
        let log_level = {
            let t = self.text("log.level");
            match tracing_subscriber::EnvFilter::try_new(&t) {
                Ok(_) => Some(t),
                Err(e) => {
                    self.fail(
                        "log.level",
                        format!("expected a tracing filter such as info or info,pulse_cdc=debug: {e}"),
                    );
                    None
                }
            }
        };
        let log_format = self.choice("log.format").map(|f| match f.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            "journald" => LogFormat::Journald,
            _ => LogFormat::Auto,
        });

        let effective = KEYS
            .iter()
            .map(|spec| Effective {
                key: spec.key,
                shown: self.shown(spec.key),
                origin: self.raw(spec.key).origin.clone(),
            })
            .collect();

        Some(Config {
            source_db: source_db?,
            state_db: state_db?,
            replication: ReplicationConfig {
                publication: publication?,
                slot: slot?,
                create: create?,
                tables,
                schema: schema?,
                max_retained_wal_bytes: max_wal? * 1024 * 1024,
                sink: sink?,
            },
            http_listen: http_listen?,
            cors_origins,
            metrics_listen: metrics_listen?,
            admin_socket: admin_socket?,
            admin_socket_mode: admin_socket_mode?,
            amqp_url: amqp_url?,
            amqp: amqp?,
            jobs: jobs?,
            storage: storage?,
            files: files?,
            platform: PlatformDefaults {
                deployment_url: deployment_url?,
                deploy_key: deploy_key?,
                enable_realtime: enable_realtime?,
                sync_interval_ms: sync_interval_ms?,
            },
            limits: Limits {
                max_upload_bytes: max_upload?,
                function_timeout: Duration::from_secs(fn_timeout?),
                job_timeout: Duration::from_secs(job_timeout?),
                shutdown_grace: Duration::from_secs(grace?),
                max_connections: max_connections?,
                connections_per_ip: connections_per_ip?,
                http_requests_per_sec_per_ip: http_rps?,
                frames_per_sec_per_user: frames_ps?,
                subscriptions_per_user: subs?,
                presence_ttl: Duration::from_secs(presence_ttl?),
                history_updates: history?,
                live_batch: Duration::from_millis(live_batch?),
            },
            auth,
            schema_path,
            log_level: log_level?,
            log_format: log_format?,
            effective,
        })
    }
}

/// The configuration reference as a Markdown table (the README embeds it).
pub fn reference_markdown() -> String {
    let mut out = String::from("| key | default | environment | meaning |\n|---|---|---|---|\n");
    for k in KEYS {
        let default = if k.default.is_empty() {
            "(empty)".to_string()
        } else {
            format!("`{}`", k.default)
        };
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} |\n",
            k.key,
            default,
            env_var_for(k.key),
            k.help
        ));
    }
    out
}

/// The admin socket path used when `admin.socket` is empty; pulsetop uses the same rule.
pub fn default_admin_socket() -> PathBuf {
    pulse_shared::admin::default_admin_socket()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], file: Option<&str>) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let file = file.map(|text| {
            let p = dir.path().join("pulsed.toml");
            std::fs::write(&p, text).unwrap();
            (p, true)
        });
        Config::load(&ConfigSource {
            file,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        })
    }

    #[test]
    fn defaults_alone_are_valid() {
        let c = load(&[], None).unwrap();
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.limits.max_upload_bytes, 20 * 1024 * 1024);
        assert_eq!(c.limits.job_timeout, Duration::from_secs(60));
        assert!(c.effective.iter().all(|e| e.origin == Origin::Default));
    }

    #[test]
    fn environment_beats_file_beats_default() {
        let c = load(
            &[("PULSE__HTTP__LISTEN", "0.0.0.0:9000")],
            Some("[http]\nlisten = \"127.0.0.1:7000\"\n[platform]\nsync_interval_ms = 250\n"),
        )
        .unwrap();
        assert_eq!(c.http_listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.platform.sync_interval_ms, 250);
        let origin = |k: &str| c.effective.iter().find(|e| e.key == k).unwrap().origin.clone();
        assert_eq!(origin("http.listen"), Origin::Env("PULSE__HTTP__LISTEN".into()));
        assert!(matches!(origin("platform.sync_interval_ms"), Origin::File(_)));
        assert_eq!(origin("log.level"), Origin::Default);
    }

    #[test]
    fn bad_value_names_key_and_source() {
        let err = load(&[("PULSE__HTTP__LISTEN", "nonsense")], None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("http.listen"), "{text}");
        assert!(text.contains("environment PULSE__HTTP__LISTEN"), "{text}");
        assert!(text.contains("socket address"), "{text}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = load(
            &[
                ("PULSE__HTTP__LISTEN", "x"),
                ("PULSE__PLATFORM__SYNC_INTERVAL_MS", "soon"),
            ],
            Some("[storage]\nbackend = \"tape\"\n"),
        )
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"http.listen"));
        assert!(keys.contains(&"platform.sync_interval_ms"));
        assert!(keys.contains(&"storage.backend"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = load(&[("PULSE__HTTP__LISTN", "127.0.0.1:1")], None).unwrap_err();
        assert_eq!(err.0[0].key, "http.listn");
        let err = load(&[], Some("[htp]\nlisten = 1\n")).unwrap_err();
        assert_eq!(err.0[0].key, "htp.listen");
        // Keys that moved to the schema file say where they went.
        let err = load(&[("PULSE__AMQP__EVENTS", "presence.joined")], None).unwrap_err();
        assert_eq!(err.0[0].key, "amqp.events");
        assert!(err.0[0].message.contains("[events]"), "{}", err.0[0].message);
    }

    #[test]
    fn secrets_never_show() {
        let key = "k".repeat(40);
        let c = load(
            &[
                ("PULSE__PLATFORM__DEPLOY_KEY", key.as_str()),
                ("PULSE__SOURCE__URL", "postgres://app:hunter2@db:5432/app"),
            ],
            None,
        )
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains(&key), "deploy key leaked in Debug");
        assert!(!debug.contains("hunter2"), "password leaked in Debug");
        let shown = c
            .effective
            .iter()
            .find(|e| e.key == "platform.deploy_key")
            .unwrap();
        assert_eq!(shown.shown, "***");
        let url = c.effective.iter().find(|e| e.key == "source.url").unwrap();
        assert_eq!(url.shown, "postgres://app:***@db:5432/app");
        assert_eq!(c.platform.deploy_key.expose(), key);
    }

    #[test]
    fn short_deploy_key_is_refused_without_echoing_it() {
        let err = load(&[("PULSE__PLATFORM__DEPLOY_KEY", "short-secret")], None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("platform.deploy_key"));
        assert!(!text.contains("short-secret"), "{text}");
    }

    #[test]
    fn key_value_passwords_are_masked() {
        assert_eq!(
            mask_url_password("host=db user=app password=hunter2 dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
    }

    #[test]
    fn state_db_defaults_to_source() {
        let c = load(&[("PULSE__SOURCE__URL", "postgres://a@h/db1")], None).unwrap();
        assert_eq!(c.state_db.expose(), "postgres://a@h/db1");
    }

    #[test]
    fn missing_required_file_is_an_error() {
        let err = Config::load(&ConfigSource {
            file: Some((PathBuf::from("/nonexistent/pulsed.toml"), true)),
            env: vec![],
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/pulsed.toml"));
    }

    #[test]
    fn every_key_has_an_env_var() {
        assert_eq!(
            env_var_for("storage.s3.secret_access_key"),
            "PULSE__STORAGE__S3__SECRET_ACCESS_KEY"
        );
        let mut seen = std::collections::HashSet::new();
        for k in KEYS {
            assert!(seen.insert(k.key), "{} declared twice", k.key);
        }
    }

    #[test]
    fn file_storage_keys_parse_overrides_and_refuse_bad_keys() {
        let c = load(
            &[
                ("PULSE__STORAGE__QUOTA_BYTES", "1000"),
                ("PULSE__STORAGE__TENANT_QUOTA_BYTES", "club-a=5000, club-b=0"),
                ("PULSE__STORAGE__TENANT_MAX_UPLOAD_BYTES", "club-a=10"),
                (
                    "PULSE__STORAGE__ENCRYPTION_KEY",
                    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ),
            ],
            None,
        )
        .unwrap();
        assert_eq!(c.files.quota_for("club-a"), Some(5000));
        assert_eq!(c.files.quota_for("club-b"), None);
        assert_eq!(c.files.quota_for("club-c"), Some(1000));
        assert_eq!(c.files.max_upload_for("club-a", 99), 10);
        assert_eq!(c.files.max_upload_for("club-c", 99), 99);
        assert_eq!(c.files.encryption_key, Some([0u8; 32]));
        let shown = c
            .effective
            .iter()
            .find(|e| e.key == "storage.encryption_key")
            .unwrap();
        assert_eq!(shown.shown, "***");

        let errors = load(
            &[
                ("PULSE__STORAGE__TENANT_QUOTA_BYTES", "club-a"),
                ("PULSE__STORAGE__ENCRYPTION_KEY", "c2hvcnQ="),
                ("PULSE__STORAGE__SIGNING_SECRET", "short"),
            ],
            None,
        )
        .unwrap_err();
        let text = errors.to_string();
        for key in [
            "storage.tenant_quota_bytes",
            "storage.encryption_key",
            "storage.signing_secret",
        ] {
            assert!(text.contains(key), "{key} not named in {text}");
        }
    }
}
