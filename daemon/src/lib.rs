//! pulsed as a library: [`run`] takes a validated [`Config`], bound [`Listeners`] and a
//! [`Control`] (shutdown token, reload channel), so tests start it in-process on port 0
//! and stop it at will, and the binary is a thin shell around it.
//!
//! One shutdown path: SIGTERM/SIGINT (or a test) cancel the token; every server stops
//! accepting, sessions end, tasks finish within the configured grace, `run` returns.

// Denied, not forbidden: `zerocopy` alone maps files for sendfile (see its doc).
#![deny(unsafe_code)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod changefeed;
pub mod commands;
pub mod config;
pub mod db;
pub mod effects;
pub mod engine;
pub mod files;
pub mod health;
pub mod instances;
pub mod jobs;
pub mod logbuf;
pub mod migrate;
pub mod outbox;
pub mod relay;
pub mod replication;
pub mod schema;
pub mod settings;
pub mod systemd;
pub mod telemetry;
pub mod users;
pub mod zerocopy;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pulse_shared::admin::HealthState;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// The build version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Sockets bound before [`run`], so callers choose ports (0 in tests) and see bind errors
/// before anything starts.
pub struct Listeners {
    /// Browser API.
    pub http: TcpListener,
    /// Prometheus listener, when on.
    pub metrics: Option<TcpListener>,
    /// Console socket.
    pub admin: UnixListener,
}

impl Listeners {
    /// Binds every listener named by the config.
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let http = TcpListener::bind(config.http_listen)
            .await
            .map_err(|e| StartError::Bind {
                what: "http.listen",
                addr: config.http_listen.to_string(),
                source: e,
            })?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| StartError::Bind {
                what: "metrics.listen",
                addr: addr.to_string(),
                source: e,
            })?),
            None => None,
        };
        let admin = bind_admin_socket(&config.admin_socket, config.admin_socket_mode)?;
        Ok(Listeners { http, metrics, admin })
    }
}

/// Binds the admin socket: creates its folder, refuses to steal a live socket, replaces a
/// stale one, and sets the file mode that decides who may open the console.
pub fn bind_admin_socket(path: &Path, mode: u32) -> Result<UnixListener, StartError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| StartError::Bind {
        what: "admin.socket",
        addr: path.display().to_string(),
        source: e,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(fail)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).map_err(fail)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another pulsed is listening on this admin socket; stop it or set admin.socket to another path",
            )));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    Ok(listener)
}

/// How the outside steers a running daemon.
pub struct Control {
    /// Cancelled to stop.
    pub shutdown: CancellationToken,
    /// New configurations to apply (SIGHUP).
    pub reload: mpsc::Receiver<Config>,
    /// Swaps the log filter, when the process owns the global subscriber.
    pub log: Option<telemetry::LogHandle>,
}

impl Control {
    /// A control with no reloads, for tests.
    pub fn new(shutdown: CancellationToken) -> (Control, mpsc::Sender<Config>) {
        let (tx, rx) = mpsc::channel(4);
        (
            Control {
                shutdown,
                reload: rx,
                log: None,
            },
            tx,
        )
    }
}

/// Why pulsed could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The config key.
        what: &'static str,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The state database is unreachable.
    #[error(
        "cannot connect to the state database {url}: {why}; check state.url (or source.url) and that PostgreSQL is running"
    )]
    StateDb {
        /// The URL, password masked.
        url: String,
        /// Why, in words ([`db::explain`]).
        why: String,
        /// Why.
        source: tokio_postgres::Error,
    },
    /// Migrations failed.
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    /// The schema file is wrong or does not match the database.
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    /// The JWT keys are wrong.
    #[error("authentication keys: {0}")]
    Auth(#[from] auth::KeyConfigError),
    /// Something else at start.
    #[error("{0}")]
    Other(String),
}

/// Shared daemon state, owned by [`run`] and lent to handlers.
pub struct App {
    /// The configuration in force (replaced on reload).
    config: RwLock<Arc<Config>>,
    /// Component health and loop progress.
    pub health: Arc<health::Health>,
    /// The state database pool.
    pub pool: deadpool_postgres::Pool,
    /// Prometheus rendering.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Start time, for uptime.
    pub started: Instant,
    /// Cancelled when the daemon stops; sessions watch it.
    pub shutdown: CancellationToken,
    /// JWT verification.
    pub auth: auth::Authenticator,
    /// The realtime engine.
    pub engine: Arc<engine::Engine>,
    /// Connection caps and rate limits.
    pub limits: Arc<api::limits::EdgeLimits>,
    /// The platform settings in force (config defaults overlaid with stored edits).
    pub settings: Arc<settings::Settings>,
    /// Scheduled jobs, and "run now" for the console.
    pub jobs: Arc<jobs::Scheduler>,
    /// File storage: backend, encryption keys, URL signing.
    pub files: Arc<files::Files>,
    /// The source (Symfony's) database, for the console's reads of the source cluster
    /// (live tables, replication slots).
    pub source: deadpool_postgres::Pool,
    /// The latest committed changes, for the console's data explorer.
    pub changes: Arc<changefeed::ChangeFeed>,
}

impl App {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// The platform settings in force.
    pub fn platform(&self) -> settings::PlatformSettings {
        self.settings.current()
    }

    /// Whether `candidate` is the deploy key in force (constant time); an unset key
    /// matches nothing.
    pub fn deploy_key_matches(&self, candidate: &str) -> bool {
        self.settings.deploy_key_matches(candidate)
    }

    /// Re-reads the stored platform settings (edits from other instances).
    pub async fn refresh_settings(&self) {
        match self.pool.get().await {
            Ok(client) => {
                if let Err(e) = self.settings.refresh(&client).await {
                    tracing::warn!(error = %e, "cannot refresh platform settings");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot refresh platform settings"),
        }
    }

    /// Probes the state database and records the result.
    pub async fn check_state_db(&self) {
        let probe = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            migrate::is_current(&client).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(true)) => self
                .health
                .set("state_db", HealthState::Up, "reachable, migrated", true),
            Ok(Ok(false)) => self.health.set(
                "state_db",
                HealthState::Down,
                "reachable but not migrated: run pulsed migrate",
                true,
            ),
            Ok(Err(e)) => self
                .health
                .set("state_db", HealthState::Down, format!("unreachable: {e}"), true),
            Err(_) => self
                .health
                .set("state_db", HealthState::Down, "no answer within 2 s", true),
        }
    }

    fn apply_reload(&self, new: Config, log: Option<&telemetry::LogHandle>) {
        let old = self.config();
        let (old_level, old_limits) = old.reloadable();
        let (new_level, new_limits) = new.reloadable();
        if old_level != new_level {
            match log.map(|h| h.set_level(&new_level)) {
                Some(Err(e)) => tracing::warn!(error = %e, "log level not changed"),
                _ => tracing::info!(from = %old_level, to = %new_level, "log level changed"),
            }
        }
        if old_limits != new_limits {
            tracing::info!(from = ?old_limits, to = ?new_limits, "limits changed");
        }
        let restart_needed: Vec<_> = old
            .effective
            .iter()
            .zip(new.effective.iter())
            .filter(|(a, b)| a != b && !a.key.starts_with("limits.") && a.key != "log.level")
            .map(|(a, _)| a.key)
            .collect();
        if !restart_needed.is_empty() {
            tracing::warn!(keys = ?restart_needed, "these changes take effect only after a restart");
        }
        if old_level == new_level && old_limits == new_limits && restart_needed.is_empty() {
            tracing::info!("reload: nothing changed");
        }
        // Keep what needs a restart as it is running; take only the reloadable parts.
        let mut merged = (*old).clone();
        merged.log_level = new_level;
        merged.limits = new_limits;
        *self.config.write().expect("config lock") = Arc::new(merged);
    }
}

/// Runs the daemon until `control.shutdown` is cancelled.
pub async fn run(config: Config, listeners: Listeners, mut control: Control) -> Result<(), StartError> {
    let shutdown = control.shutdown.clone();
    systemd::status("connecting to the state database");
    let mut client = db::connect(&config.state_db)
        .await
        .map_err(|source| StartError::StateDb {
            url: config.state_db.masked(),
            why: db::explain(&source, &config.state_db),
            source,
        })?;
    systemd::status("applying migrations");
    let report = migrate::migrate(&mut client).await?;
    tracing::info!(applied = ?report.applied, current = report.current, "pulse schema is current");

    let pool =
        db::pool(&config.state_db, 16).map_err(|e| StartError::Other(format!("state database pool: {e}")))?;
    let settings = settings::Settings::new(&config.platform);
    settings
        .refresh(&client)
        .await
        .map_err(|e| StartError::Other(e.to_string()))?;
    drop(client);
    if settings.current().deploy_key_sha256.is_empty() {
        tracing::warn!("no deploy key is set (platform.deploy_key): service access is off until one is set");
    }
    let files =
        Arc::new(files::Files::open(&config).map_err(|e| StartError::Other(format!("file storage: {e}")))?);
    let source_pool = db::pool(&config.source_db, 8)
        .map_err(|e| StartError::Other(format!("source database pool: {e}")))?;
    let schema = match &config.schema_path {
        None => schema::Schema::default(),
        Some(path) => {
            systemd::status("checking the schema file against the database");
            let mut s = schema::Schema::load(path)?;
            let catalog = db::connect(&config.source_db)
                .await
                .map_err(|source| StartError::StateDb {
                    url: config.source_db.masked(),
                    why: db::explain(&source, &config.source_db),
                    source,
                })?;
            s.check(&catalog).await?;
            let publication = &config.replication.publication;
            match s.unpublished(&catalog, publication).await {
                Ok(Some(missing)) => {
                    for (entry, table) in missing {
                        tracing::warn!(%entry, %table, %publication,
                            "the publication does not carry this table, so its changes never arrive: ALTER PUBLICATION … ADD TABLE it (or list it in replication.tables before the publication is created)");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the publication's tables"),
            }
            tracing::info!(path = %path.display(), tables = s.tables.len(), metrics = s.metrics.len(), tenants = ?s.tenants.as_ref().map(|t| t.source.to_string()), "schema checked");
            s
        }
    };
    // Events the schema file does not send are never written to the outbox.
    outbox::install(schema.events.clone());
    let authenticator = auth::Authenticator::from_config(&config.auth)?;
    let engine = Arc::new(
        engine::Engine::new(
            Arc::new(schema),
            source_pool.clone(),
            pool.clone(),
            engine::EngineLimits {
                subscriptions: config.limits.subscriptions_per_user as usize,
                presence_ttl: config.limits.presence_ttl,
                history: config.limits.history_updates as usize,
            },
        )
        .with_live_batch(config.limits.live_batch),
    );
    {
        let state = pool
            .get()
            .await
            .map_err(|e| StartError::Other(format!("state database pool: {e}")))?;
        engine
            .load_state(&**state)
            .await
            .map_err(|e| StartError::Other(format!("cannot load the engine state: {e}")))?;
    }
    let limits = Arc::new(api::limits::EdgeLimits::new(&config.limits));
    let scheduler = jobs::Scheduler::new(
        pool.clone(),
        {
            let mut registry = jobs::builtin(&config);
            jobs::register_wired(&mut registry, &config, &engine, &files, &pool);
            registry
        },
        &config.jobs.schedules,
        config.limits.job_timeout,
    )
    .map_err(StartError::Other)?
    .with_cancel_tls(config.state_db.connector());
    let app = Arc::new(App {
        files,
        auth: authenticator,
        engine: engine.clone(),
        limits,
        jobs: Arc::new(scheduler),
        config: RwLock::new(Arc::new(config)),
        health: Arc::new(health::Health::default()),
        pool,
        metrics: telemetry::metrics_handle(),
        started: Instant::now(),
        shutdown: shutdown.clone(),
        settings,
        source: source_pool,
        changes: Arc::new(changefeed::ChangeFeed::with_keys(
            engine
                .schema
                .tables
                .values()
                .map(|t| (t.source.to_string(), t.key.clone()))
                .collect(),
        )),
    });
    app.check_state_db().await;
    // Known before the first /readyz answer: not ready until the change stream runs.
    app.health.set("replication", HealthState::Down, "starting", true);

    let tasks = TaskTracker::new();
    let serve = |listener: TcpListener, router: axum::Router, name: &'static str| {
        let token = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
            {
                tracing::error!(server = name, error = %e, "server failed");
            }
        });
    };
    let http_addr = listeners.http.local_addr().ok();
    {
        // The browser API needs the peer address for per-IP limits.
        let token = shutdown.clone();
        let router = api::http_router(app.clone());
        // Updates are small writes that must leave at once: no Nagle delay.
        // Downloads of local files go out by sendfile (see `zerocopy`).
        let http = axum::serve::ListenerExt::tap_io(
            zerocopy::ZeroCopyListener(listeners.http),
            |s: &mut zerocopy::ZeroCopyStream| {
                let _ = s.tcp().set_nodelay(true);
            },
        );
        tasks.spawn(async move {
            let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            if let Err(e) = axum::serve(http, service)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
            {
                tracing::error!(server = "http", error = %e, "server failed");
            }
        });
    }
    engine.spawn_tasks(&tasks, shutdown.clone());
    // Presence ended by a command on another instance ends here too.
    tasks.spawn(instances::listen(
        engine.clone(),
        app.config().state_db.clone(),
        shutdown.clone(),
    ));
    {
        let limits = app.limits.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = every.tick() => limits.prune(),
                    _ = token.cancelled() => break,
                }
            }
        });
    }
    if let Some(m) = listeners.metrics {
        serve(m, api::metrics_router(app.clone()), "metrics");
    }
    {
        let token = shutdown.clone();
        let router = api::admin_router(app.clone());
        let admin = listeners.admin;
        tasks.spawn(async move {
            // The peer's credentials name console users in the audit log.
            let service = router.into_make_service_with_connect_info::<api::AdminPeer>();
            if let Err(e) = axum::serve(admin, service)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
            {
                tracing::error!(server = "admin", error = %e, "server failed");
            }
        });
    }

    // Periodic health probe; its ticks are what the watchdog watches.
    {
        let app = app.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(systemd::idle_tick());
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = token.cancelled() => break,
                }
                app.check_state_db().await;
                app.refresh_settings().await;
                app.health.tick("health");
            }
            app.health.retire("health");
        });
    }
    // Scheduled jobs run on every instance; each run's advisory lock keeps them single.
    if app.config().jobs.enabled {
        app.jobs.spawn(&tasks, shutdown.clone());
    }

    // The broker: webhooks out, commands in. Without amqp.url pulsed runs without it.
    if let Some(amqp) = app.config().amqp.clone() {
        app.engine.enable_presence_events(amqp.presence_debounce);
        app.engine.enable_mutation_forwarding();
        app.health.set(
            "broker",
            HealthState::Degraded,
            "connecting to RabbitMQ; events wait in the outbox",
            false,
        );
        let broker = Arc::new(relay::Broker {
            catalog: app.engine.schema.events.clone(),
            config: amqp,
            pool: app.pool.clone(),
            state_db: app.config().state_db.clone(),
            health: app.health.clone(),
            effects: Arc::new(effects::AppEffects {
                core: commands::CoreEffects {
                    settings: app.settings.clone(),
                    pool: app.pool.clone(),
                },
                app: app.clone(),
            }),
        });
        tasks.spawn(relay::supervise(broker, shutdown.clone()));
    }

    app.health.tick("health");

    // The change stream, consumed by the sink replication.sink names (the engine by
    // default); the loop and its durability rule are the same for any sink.
    {
        let r = app.config().replication.clone();
        let (app, token) = (app.clone(), shutdown.clone());
        match r.sink {
            config::SinkKind::Engine => {
                let sink = engine::EngineSink::new(app.engine.clone(), r.slot);
                tasks.spawn(replication::run(app, sink, token));
            }
            config::SinkKind::Checkpoint => {
                tasks.spawn(replication::run(
                    app,
                    replication::CheckpointSink::new(r.slot),
                    token,
                ));
            }
            config::SinkKind::Ledger => {
                tasks.spawn(replication::run(
                    app,
                    replication::LedgerSink::new(r.slot, r.publication),
                    token,
                ));
            }
        }
    }
    if let Some(w) = systemd::spawn_watchdog(app.health.clone(), shutdown.clone()) {
        tasks.spawn(async move {
            let _ = w.await;
        });
    }

    let status = format!(
        "ready; http on {}",
        http_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    systemd::ready(&status);
    tracing::info!(version = VERSION, http = ?http_addr, "pulsed ready");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(new) = control.reload.recv() => app.apply_reload(new, control.log.as_ref()),
        }
    }

    systemd::stopping();
    tracing::info!("stopping");
    tasks.close();
    let grace = app.config().limits.shutdown_grace;
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "some tasks did not finish within the grace period; stopping anyway"
        );
    }
    tracing::info!("stopped");
    Ok(())
}
