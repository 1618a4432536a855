//! The realtime engine: live tables, presence, notifications and live dashboard metrics.
//!
//! It owns the hub (sessions, subscriptions, update history, presence), the metric cells
//! and the notification store, and it consumes committed transactions from the change
//! stream in two steps: [`Engine::apply`] writes derived state (metric cells,
//! notifications from the source table) inside the caller's state transaction, and
//! [`Engine::committed`] publishes to clients once that transaction is durable. It never
//! publishes anything before it is durable, never decides access except through
//! `pulse_shared::caps::authorize`, and never blocks on a client (see [`hub`]).

pub mod filter;
pub mod forward;
pub mod hub;
pub mod metrics;
pub mod notifications;
pub mod thresholds;
pub mod value;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use deadpool_postgres::Pool;
use pulse_cdc::{ChangeKind, Lsn, Relation, Transaction, Value};
use pulse_shared::caps::{Capability, Decision, Principal, Scope, Target, authorize};
use pulse_shared::protocol::{ServerFrame, UpdateOp};
use pulse_shared::{ErrorBody, ErrorCode};
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::schema::{LiveTable, Metric, Schema, quote_ident};
use hub::{Hub, LiveRow, RowFilter, SessionHandle, SessionId, SubError};
use metrics::{Deltas, MetricStore};

/// Rows an initial live-table result carries at most.
const MAX_RESULT_ROWS: i64 = 10_000;
/// Presence events kept while the database is unreachable.
const PRESENCE_UNSENT_MAX: usize = 10_000;
/// Notifications an inbox result carries.
const INBOX_ROWS: i64 = 50;

/// Engine limits, taken from the config at start.
#[derive(Debug, Clone)]
pub struct EngineLimits {
    /// Subscriptions per session.
    pub subscriptions: usize,
    /// Presence lifetime.
    pub presence_ttl: Duration,
    /// Updates kept for resume.
    pub history: usize,
}

/// What `apply` (or a refresh, or housekeeping) derived, waiting for the commit to be
/// installed in memory and published.
#[derive(Default)]
struct Stash {
    deltas: Deltas,
    /// Metrics whose table was truncated, with the tenants whose cells stay (recomputed
    /// after the truncate).
    truncated: Vec<(String, Vec<String>)>,
    notifications: Vec<notifications::Notification>,
    /// Tenant zones as of the end of the batch (when the tenants table changed) or of a
    /// refresh snapshot (when seeded).
    zones: Option<Arc<HashMap<String, Tz>>>,
    /// The zones were seeded from a snapshot at this LSN.
    zones_seeded: Option<Lsn>,
    /// Recomputed cells: metric, tenants (None: all), cells, valid from this LSN.
    replaced: Vec<(String, Option<Vec<String>>, Deltas, Lsn)>,
    /// Recomputations asked for (a tenant's zone changed), with why.
    wanted: Vec<(RefreshTarget, String)>,
    /// Recomputations done.
    done: Vec<RefreshTarget>,
    /// The checkpoint passed this LSN: recomputations valid up to it are ordinary now.
    passed: Option<Lsn>,
    /// Buckets no window reads any more: (metric, tenant, first live bucket).
    pruned: Vec<(String, String, String)>,
    /// Tenants whose zone the batch changed.
    rezoned: Vec<String>,
}

/// What a recomputation covers: a metric for every tenant (`None`) or for one.
pub type RefreshTarget = (String, Option<String>);

/// Metric cells recomputed from a snapshot ahead of the checkpoint: the streamed
/// transactions they already hold (`end_lsn <= lsn`) are skipped for them.
#[derive(Debug, Default, Clone)]
struct Ahead {
    /// Every tenant of the metric.
    all: Option<Lsn>,
    /// Single tenants.
    tenants: HashMap<String, Lsn>,
}

impl Ahead {
    /// Whether the cells of `tenant` already hold a transaction ending at `end`.
    fn covers(&self, tenant: &str, end: Lsn) -> bool {
        self.all.is_some_and(|l| end <= l) || self.tenants.get(tenant).is_some_and(|l| end <= *l)
    }
}

/// What must be recomputed, and what was recomputed ahead of the checkpoint.
#[derive(Debug, Default)]
struct Refresh {
    /// Waiting for a snapshot, with why.
    pending: BTreeMap<RefreshTarget, String>,
    /// The tenant zones must be (re)loaded from the tenants table (first use of
    /// `[tenants]`, or its entry changed).
    zones_pending: bool,
    /// Recomputed ahead of the checkpoint, by metric.
    ahead: HashMap<String, Ahead>,
    /// Tenants-table changes up to this LSN are already in the zones (seeded from a
    /// snapshot at it).
    zones_ahead: Option<Lsn>,
    /// The quarter hour (Unix seconds / 900) of the last scan for dead buckets: local
    /// dates roll over only at quarter hours (every zone's offset is a multiple of 15 min).
    last_prune: Option<i64>,
}

/// The engine.
pub struct Engine {
    /// The validated schema.
    pub schema: Arc<Schema>,
    /// Symfony's database, for initial results.
    source: Pool,
    /// The pulse schema's database.
    state: Pool,
    /// Sessions, subscriptions, history, presence.
    pub hub: Mutex<Hub>,
    /// Metric cells. Lock order: `store` before `hub`.
    store: Mutex<MetricStore>,
    /// Tenant time zones from the tenants table (`[tenants]`), as the stream has brought
    /// them; copied out, never held across other locks.
    zones: Mutex<Arc<HashMap<String, Tz>>>,
    /// Recomputations pending and done ahead of the checkpoint (the change stream's task
    /// is the only writer).
    refresh: Mutex<Refresh>,
    /// Derived in `apply`, published in `committed`.
    stash: Mutex<Stash>,
    /// Last value sent per (metric, tenant), so window roll-overs are noticed.
    last_values: Mutex<HashMap<(String, String), Json>>,
    next_session: AtomicU64,
    limits: EngineLimits,
    /// Presence events for the outbox, when a broker is configured.
    presence_events: Mutex<Option<crate::outbox::PresenceDebounce<(String, String)>>>,
    /// Presence events the database refused, retried at the next flush (bounded).
    presence_unsent: Mutex<Vec<events::PresenceChange>>,
    /// Whether schema mutations are handed to Symfony (a broker is configured).
    forwarding: std::sync::atomic::AtomicBool,
    /// Shortest time between two sends of live-table updates (zero: at once).
    live_batch: Duration,
    /// Live updates are staged and wait for the end of the current `live_batch`.
    live_due: tokio::sync::Notify,
}

/// Who is asking, as the engine needs it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The session.
    pub session: SessionId,
    /// The principal.
    pub principal: Principal,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

fn invalid(field: &str, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::InvalidArgument, format!("{field}: {}", message.into()))
        .with_details(json!({ "field": field }))
}

fn internal(e: impl std::fmt::Display) -> ErrorBody {
    tracing::error!(error = %e, "engine database error");
    err(
        ErrorCode::Unavailable,
        "the database did not answer; try again shortly",
    )
}

/// The (tenant, user) whose inbox the principal may read and mark: its own, and only
/// when the principal is a user with a tenant.
fn own_inbox(p: &Principal) -> Result<(String, String), ErrorBody> {
    let (Some(tenant), Some(user)) = (p.tenant.clone(), p.user.clone()) else {
        return Err(err(
            ErrorCode::Forbidden,
            "notifications: only users with a tenant have an inbox",
        ));
    };
    let target = Target {
        tenant: Some(&tenant),
        owner: Some(&user),
        public: false,
        listed: None,
    };
    check(
        authorize(p, Capability::ReadOwnNotifications, &target),
        "notifications",
    )?;
    Ok((tenant, user))
}

fn check(d: Decision, what: &str) -> Result<Scope, ErrorBody> {
    match d {
        Decision::Allowed(s) => Ok(s),
        Decision::Denied(r) => Err(err(ErrorCode::Forbidden, format!("{what}: {}", r.explain()))),
    }
}

fn sub_error(e: SubError, id: &str) -> ErrorBody {
    match e {
        SubError::Duplicate => invalid(
            "id",
            format!("subscription {id:?} already exists in this session"),
        ),
        SubError::TooMany(n) => err(
            ErrorCode::RateLimited,
            format!("at most {n} subscriptions per session; unsubscribe some first"),
        )
        .with_details(json!({ "limit": n })),
    }
}

fn arg_text(args: &Json, name: &str) -> Result<Option<String>, ErrorBody> {
    match args.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(invalid(&format!("args.{name}"), "must be a string")),
    }
}

/// Reads a column of a change's row, taking an unchanged TOAST value from the old row.
fn getter<'a>(
    rel: &'a Relation,
    new: &'a [Value],
    old: Option<&'a [Value]>,
) -> impl Fn(&str) -> Option<Value> + 'a {
    move |c: &str| {
        let i = rel.column(c)?;
        match new.get(i)? {
            Value::UnchangedToast => old.and_then(|o| o.get(i)).cloned(),
            v => Some(v.clone()),
        }
    }
}

impl Engine {
    /// A new engine.
    pub fn new(schema: Arc<Schema>, source: Pool, state: Pool, limits: EngineLimits) -> Engine {
        let epoch = rand::random::<u32>() as u64;
        Engine {
            schema,
            source,
            state,
            hub: Mutex::new(Hub::new(limits.history, epoch)),
            store: Mutex::new(MetricStore::default()),
            zones: Mutex::new(Arc::new(HashMap::new())),
            refresh: Mutex::new(Refresh::default()),
            stash: Mutex::new(Stash::default()),
            last_values: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            limits,
            presence_events: Mutex::new(None),
            presence_unsent: Mutex::new(Vec::new()),
            forwarding: std::sync::atomic::AtomicBool::new(false),
            live_batch: Duration::ZERO,
            live_due: tokio::sync::Notify::new(),
        }
    }

    /// Sends live-table updates to a client at most once per `window`, together: under
    /// load that is one frame per client per window instead of one per transaction. The
    /// updates of a quiet moment still go out at once. Needs [`Engine::spawn_tasks`].
    pub fn with_live_batch(mut self, window: Duration) -> Engine {
        self.live_batch = window;
        self
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().expect("hub lock")
    }

    /// The tenant zones from the tenants table, as the engine follows them.
    fn table_zones(&self) -> Arc<HashMap<String, Tz>> {
        self.zones.lock().expect("zones lock").clone()
    }

    /// A tenant's time zone now: pinned in the schema file, else from the tenants table,
    /// else the default.
    pub fn zone_of(&self, tenant: &str) -> Tz {
        self.schema.zone(tenant, &self.table_zones())
    }

    /// Registers a session; returns its id.
    pub fn open_session(
        &self,
        tx: tokio::sync::mpsc::Sender<hub::Outgoing>,
        kill: CancellationToken,
    ) -> SessionId {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.hub().add_session(id, SessionHandle { tx, kill });
        id
    }

    /// Sends `presence.joined` / `presence.left` to the outbox from now on, debounced by
    /// `window` (`amqp.presence_debounce_ms`).
    pub fn enable_presence_events(&self, window: Duration) {
        self.hub().record_presence();
        *self.presence_events.lock().expect("presence events lock") =
            Some(crate::outbox::PresenceDebounce::new(window));
    }

    /// Writes the presence events that are due to the outbox; returns how many.
    pub async fn flush_presence_events(&self) -> Result<u64, tokio_postgres::Error> {
        let transitions = self.hub().take_transitions();
        let mut due: Vec<events::PresenceChange> =
            std::mem::take(&mut *self.presence_unsent.lock().expect("presence unsent lock"));
        {
            let mut guard = self.presence_events.lock().expect("presence events lock");
            let Some(debounce) = guard.as_mut() else {
                return Ok(0);
            };
            let now = crate::outbox::now_ms();
            let window_ms = debounce.window_ms();
            let change = |tenant, user, joined, at_ms| events::PresenceChange {
                tenant,
                user,
                joined,
                at_ms,
                window_ms,
            };
            for (tenant, user, online) in transitions {
                let key = (tenant, user);
                if online {
                    if debounce.joined(key.clone()) {
                        due.push(change(key.0, key.1, true, now));
                    }
                } else {
                    debounce.left(key, now);
                }
            }
            due.extend(
                debounce
                    .due(now)
                    .into_iter()
                    .map(|((t, u), at)| change(t, u, false, at)),
            );
        }
        if due.is_empty() {
            return Ok(0);
        }
        let written = match self.state.get().await {
            Ok(db) => events::presence_changed(&**db, &due).await.map_err(Some),
            Err(e) => {
                tracing::warn!(error = %e, pending = due.len(), "presence events wait: no database connection");
                Err(None)
            }
        };
        match written {
            // Fewer written than due is fine: the rest were there already (same keys).
            Ok(n) => Ok(n),
            Err(e) => {
                // Kept for the next flush, in order, with their keys' times; a long outage
                // keeps only the newest.
                let mut unsent = self.presence_unsent.lock().expect("presence unsent lock");
                let excess = due.len().saturating_sub(PRESENCE_UNSENT_MAX);
                if excess > 0 {
                    tracing::warn!(
                        dropped = excess,
                        "presence events dropped during a database outage"
                    );
                }
                unsent.extend(due.into_iter().skip(excess));
                match e {
                    Some(e) => {
                        tracing::warn!(error = %e, pending = unsent.len(), "presence events not written yet");
                        Err(e)
                    }
                    None => Ok(0),
                }
            }
        }
    }

    /// Removes presence tabs silent past the presence lifetime; returns how many.
    pub fn sweep_presence(&self) -> usize {
        self.hub().expire_presence(self.limits.presence_ttl)
    }

    /// Ends every presence tab of a user (a command from Symfony); returns how many
    /// sessions had one. Safe to repeat.
    pub fn end_presence(&self, tenant: &str, user: &str) -> usize {
        self.hub().end_user_presence(tenant, user)
    }

    /// Deletes notifications past the schema's retention on `db`; returns how many.
    pub async fn enforce_notification_retention<C: tokio_postgres::GenericClient>(
        &self,
        db: &C,
    ) -> Result<u64, tokio_postgres::Error> {
        notifications::expire(db, self.schema.notification_retention_days).await
    }

    /// Publishes notifications created by a committed transaction elsewhere (a command)
    /// to their recipients' inboxes.
    pub async fn publish_created(&self, ids: &[i64]) -> Result<(), tokio_postgres::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let db = self.state.get().await.map_err(|e| {
            tracing::warn!(error = %e, "created notifications not published");
            e
        });
        let Ok(db) = db else { return Ok(()) };
        for n in notifications::by_ids(&**db, ids).await? {
            let unread = notifications::unread(&**db, &n.tenant, &n.user).await?;
            self.publish_notification(&n, unread);
        }
        Ok(())
    }

    /// Removes a session and everything it held; its presence leaves.
    pub fn close_session(&self, id: SessionId) {
        self.hub().remove_session(id);
    }

    /// Starts the periodic work: presence expiry, metric windows, notification retention.
    pub fn spawn_tasks(self: &Arc<Self>, tasks: &TaskTracker, shutdown: CancellationToken) {
        if !self.live_batch.is_zero() {
            // Sends the live updates left staged by `publish_live` when their window ends.
            let engine = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = engine.live_due.notified() => {}
                    }
                    let due = engine.hub().live_due(engine.live_batch);
                    if let Some(due) = due {
                        tokio::time::sleep_until(due.into()).await;
                        engine.hub().flush_live();
                    }
                }
            });
        }
        let engine = self.clone();
        tasks.spawn(async move {
            let mut presence = tokio::time::interval(Duration::from_millis(500));
            let mut windows = tokio::time::interval(Duration::from_secs(30));
            let mut retention = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = presence.tick() => {
                        engine.sweep_presence();
                        let _ = engine.flush_presence_events().await;
                    }
                    _ = windows.tick() => engine.refresh_metrics(None),
                    _ = retention.tick() => engine.expire_notifications().await,
                }
            }
        });
    }

    async fn expire_notifications(&self) {
        let days = self.schema.notification_retention_days;
        match self.state.get().await {
            Ok(c) => match notifications::expire(&**c, days).await {
                Ok(n) if n > 0 => {
                    tracing::info!(deleted = n, days, "notifications past their retention deleted")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "notification retention failed"),
            },
            Err(e) => tracing::warn!(error = %e, "notification retention: no database connection"),
        }
    }

    /// Recomputes watched metrics (all, or only `touched`) and sends those that changed.
    fn refresh_metrics(&self, touched: Option<&[(String, String)]>) {
        let zones = self.table_zones();
        let store = self.store.lock().expect("store lock");
        let mut hub = self.hub();
        let mut last = self.last_values.lock().expect("last values lock");
        let pairs: Vec<(String, String)> = match touched {
            Some(t) => t.to_vec(),
            None => hub.watched_metrics(),
        };
        for (metric, tenant) in pairs {
            let Some(m) = self.schema.metrics.get(&metric) else {
                continue;
            };
            let v = store.value(m, self.schema.zone(&tenant, &zones), &tenant);
            let key = (metric.clone(), tenant.clone());
            if last.get(&key) != Some(&v) {
                hub.publish_metric(&metric, &tenant, &v);
                last.insert(key, v);
            }
        }
    }

    /// The tenant a request is about: `args.tenant` when given, else the caller's.
    /// The tenant whose presence `p` asks to see (`None`: every tenant, for those who
    /// may see them all), checked against the matrix.
    fn presence_tenant(p: &Principal, args: &Json) -> Result<Option<String>, ErrorBody> {
        let tenant = Self::tenant_of(p, args)?;
        let target = Target {
            tenant: tenant.as_deref(),
            ..Target::default()
        };
        let scope = check(authorize(p, Capability::SeePresence, &target), "presence")?;
        if tenant.is_none() && scope != Scope::Any {
            return Err(invalid("args.tenant", "name the tenant"));
        }
        Ok(tenant)
    }

    fn tenant_of(p: &Principal, args: &Json) -> Result<Option<String>, ErrorBody> {
        Ok(arg_text(args, "tenant")?.or_else(|| p.tenant.clone()))
    }

    /// Handles `subscribe`, and each subscription of `resume` (with its cursor).
    pub async fn subscribe(
        &self,
        c: &Caller,
        id: &str,
        query: &str,
        args: &Json,
        cursor: Option<&str>,
    ) -> Result<(), ErrorBody> {
        if !(args.is_null() || args.is_object()) {
            return Err(invalid("args", "must be an object"));
        }
        let started = Instant::now();
        let max = self.limits.subscriptions;
        let p = &c.principal;
        if let Some(user) = &p.user {
            self.hub().bind_user(c.session, user);
        }
        let r = match query {
            "presence" => {
                let tenant = Self::presence_tenant(p, args)?;
                let resource = arg_text(args, "resource")?;
                let mut hub = self.hub();
                let online = hub
                    .subscribe_presence(c.session, id, tenant.as_deref(), resource.as_deref(), max)
                    .map_err(|e| sub_error(e, id))?;
                hub.deliver(
                    c.session,
                    ServerFrame::Result {
                        id: id.into(),
                        cursor: None,
                        data: online,
                    },
                );
                Ok(())
            }
            "notifications" => {
                let (tenant, user) = own_inbox(p)?;
                self.hub()
                    .subscribe_inbox(c.session, id, &tenant, &user, max)
                    .map_err(|e| sub_error(e, id))?;
                let loaded = async {
                    let db = self.state.get().await.map_err(internal)?;
                    let items = notifications::inbox(&**db, &tenant, &user, INBOX_ROWS)
                        .await
                        .map_err(internal)?;
                    let unread = notifications::unread(&**db, &tenant, &user)
                        .await
                        .map_err(internal)?;
                    Ok::<_, ErrorBody>(json!({ "items": items, "unread": unread }))
                }
                .await;
                match loaded {
                    Ok(data) => {
                        self.hub().deliver(
                            c.session,
                            ServerFrame::Result {
                                id: id.into(),
                                cursor: None,
                                data,
                            },
                        );
                        Ok(())
                    }
                    Err(e) => {
                        self.hub().unsubscribe(c.session, id);
                        Err(e)
                    }
                }
            }
            q if q.starts_with("metric:") => {
                let name = &q["metric:".len()..];
                let tenant =
                    Self::tenant_of(p, args)?.ok_or_else(|| invalid("args.tenant", "name the tenant"))?;
                if name == hub::ONLINE_METRIC {
                    check(
                        authorize(
                            p,
                            Capability::SeeMetrics,
                            &Target {
                                tenant: Some(&tenant),
                                ..Target::default()
                            },
                        ),
                        "metrics",
                    )?;
                    let mut hub = self.hub();
                    let v = json!(hub.online_counts().get(&tenant).copied().unwrap_or(0));
                    hub.subscribe_metric(c.session, id, name, &tenant, max)
                        .map_err(|e| sub_error(e, id))?;
                    hub.deliver(
                        c.session,
                        ServerFrame::Result {
                            id: id.into(),
                            cursor: None,
                            data: json!({ "value": v }),
                        },
                    );
                    return Ok(());
                }
                let m =
                    self.schema.metrics.get(name).ok_or_else(|| {
                        err(ErrorCode::NotFound, format!("no metric {name:?} in the schema"))
                    })?;
                check(
                    authorize(
                        p,
                        Capability::SeeMetrics,
                        &Target {
                            tenant: Some(&tenant),
                            ..Target::default()
                        },
                    ),
                    "metrics",
                )?;
                let tz = self.zone_of(&tenant);
                let store = self.store.lock().expect("store lock");
                let v = store.value(m, tz, &tenant);
                let mut hub = self.hub();
                hub.subscribe_metric(c.session, id, name, &tenant, max)
                    .map_err(|e| sub_error(e, id))?;
                // What this subscriber has counts as sent: the periodic refresh sends
                // only changes.
                self.last_values
                    .lock()
                    .expect("last values lock")
                    .insert((name.to_string(), tenant.clone()), v.clone());
                hub.deliver(
                    c.session,
                    ServerFrame::Result {
                        id: id.into(),
                        cursor: None,
                        data: json!({ "value": v }),
                    },
                );
                Ok(())
            }
            table => self.subscribe_live(c, id, table, args, cursor).await,
        };
        ::metrics::histogram!("pulse_query_latency_seconds").record(started.elapsed().as_secs_f64());
        crate::admin::record_function("query", r.as_ref().err());
        r
    }

    /// Works out the rows a caller may see of a live table, from the matrix and the schema.
    fn live_filter(&self, p: &Principal, t: &LiveTable, args: &Json) -> Result<RowFilter, ErrorBody> {
        let tenant = Self::tenant_of(p, args)?;
        // The schema's roles for the table narrow the matrix (services always may read).
        let scope = check(
            authorize(
                p,
                Capability::ReadLiveTable,
                &Target {
                    tenant: tenant.as_deref(),
                    listed: Some(&t.roles),
                    ..Target::default()
                },
            ),
            &format!("live table {}", t.name),
        )?;
        if tenant.is_none() && scope != Scope::Any {
            return Err(invalid("args.tenant", "name the tenant"));
        }
        let owner = match (scope, &t.owner_column) {
            (Scope::OwnTenantOwnedRows, Some(col)) => {
                let user = p
                    .user
                    .clone()
                    .ok_or_else(|| err(ErrorCode::Forbidden, "only a user owns rows"))?;
                Some((col.clone(), user))
            }
            _ => None,
        };
        let mut eq = Vec::new();
        if let Some(obj) = args.as_object() {
            for (k, v) in obj {
                if k == "tenant" {
                    continue;
                }
                let field = format!("args.{k}");
                if !t.filters.contains(k) {
                    return Err(invalid(
                        &field,
                        format!(
                            "{} cannot be filtered on {k:?}; allowed: {}",
                            t.name,
                            t.filters.join(", ")
                        ),
                    ));
                }
                let ty = t.types.get(k).map(String::as_str).unwrap_or("text");
                let typed =
                    value::from_json(ty, v).ok_or_else(|| invalid(&field, format!("must be a {ty}")))?;
                eq.push((k.clone(), typed));
            }
        }
        eq.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(RowFilter {
            tenant: tenant.map(|t_| (t.tenant_column.clone(), t_)),
            owner,
            eq,
        })
    }

    async fn subscribe_live(
        &self,
        c: &Caller,
        id: &str,
        table: &str,
        args: &Json,
        cursor: Option<&str>,
    ) -> Result<(), ErrorBody> {
        let t = self.schema.tables.get(table).ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("no live table, metric or query named {table:?}"),
            )
        })?;
        let filter = self.live_filter(&c.principal, t, args)?;
        let max = self.limits.subscriptions;
        let cursor_at = {
            let mut hub = self.hub();
            match cursor {
                Some(cur) => {
                    if hub
                        .resume_live(c.session, id, table, filter.clone(), cur, max)
                        .map_err(|e| sub_error(e, id))?
                    {
                        return Ok(());
                    }
                    hub.deliver(c.session, ServerFrame::Resnapshot { id: id.into() });
                    hub.current_cursor()
                }
                None => hub
                    .subscribe_live(c.session, id, table, filter.clone(), max)
                    .map_err(|e| sub_error(e, id))?,
            }
        };
        match self.initial_rows(t, &filter).await {
            Ok(rows) => {
                self.hub().complete(
                    c.session,
                    id,
                    ServerFrame::Result {
                        id: id.into(),
                        cursor: Some(cursor_at),
                        data: Json::Array(rows),
                    },
                );
                Ok(())
            }
            Err(e) => {
                self.hub().unsubscribe(c.session, id);
                Err(internal(e))
            }
        }
    }

    /// Reads a live table's current rows for a filter from the source database.
    async fn initial_rows(&self, t: &LiveTable, f: &RowFilter) -> Result<Vec<Json>, String> {
        let cols = t
            .columns
            .iter()
            .map(|c| format!("'{}', {}", c.replace('\'', "''"), quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut conds = Vec::new();
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        for (col, v) in f.tenant.iter().chain(f.owner.iter()) {
            params.push(Box::new(v.clone()));
            conds.push(format!("{}::text = ${}", quote_ident(col), params.len()));
        }
        for (col, v) in &f.eq {
            params.push(Box::new(value::to_json(v)));
            conds.push(format!(
                "to_jsonb({}) = ${}::jsonb",
                quote_ident(col),
                params.len()
            ));
        }
        let sql = format!(
            "SELECT jsonb_build_object({cols}) FROM {} {} {} ORDER BY {} LIMIT {MAX_RESULT_ROWS}",
            t.source.quoted(),
            if conds.is_empty() { "" } else { "WHERE" },
            conds.join(" AND "),
            t.key
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let db = self.source.get().await.map_err(|e| e.to_string())?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let rows = db.query(&sql, &refs).await.map_err(|e| e.to_string())?;
        Ok(rows.iter().map(|r| r.get::<_, Json>(0)).collect())
    }

    /// The polling fallback: what a client without a WebSocket sees of a query. Live
    /// tables answer the updates since `cursor` (or every row, with `resnapshot: true`,
    /// when there is no cursor or the history no longer reaches it); other queries answer
    /// their current value.
    pub async fn poll(
        &self,
        p: &Principal,
        query: &str,
        args: &Json,
        cursor: Option<&str>,
    ) -> Result<Json, ErrorBody> {
        if !(args.is_null() || args.is_object()) {
            return Err(invalid("args", "must be an object"));
        }
        if let Some(t) = self.schema.tables.get(query) {
            let filter = self.live_filter(p, t, args)?;
            if let Some(cur) = cursor
                && let Some((updates, next)) = self.hub().since(&t.name, &filter, cur)
            {
                return Ok(json!({ "resnapshot": false, "cursor": next, "updates": updates }));
            }
            let at = self.hub().current_cursor();
            let rows = self.initial_rows(t, &filter).await.map_err(internal)?;
            return Ok(json!({ "resnapshot": true, "cursor": at, "rows": rows }));
        }
        match query {
            "presence" => {
                let tenant = Self::presence_tenant(p, args)?;
                let resource = arg_text(args, "resource")?;
                Ok(self.hub().online(tenant.as_deref(), resource.as_deref()))
            }
            "notifications" => {
                let (tenant, user) = own_inbox(p)?;
                let db = self.state.get().await.map_err(internal)?;
                let items = notifications::inbox(&**db, &tenant, &user, INBOX_ROWS)
                    .await
                    .map_err(internal)?;
                let unread = notifications::unread(&**db, &tenant, &user)
                    .await
                    .map_err(internal)?;
                Ok(json!({ "items": items, "unread": unread }))
            }
            q if q.starts_with("metric:") => {
                let name = &q["metric:".len()..];
                let tenant =
                    Self::tenant_of(p, args)?.ok_or_else(|| invalid("args.tenant", "name the tenant"))?;
                if name == hub::ONLINE_METRIC {
                    check(
                        authorize(
                            p,
                            Capability::SeeMetrics,
                            &Target {
                                tenant: Some(&tenant),
                                ..Target::default()
                            },
                        ),
                        "metrics",
                    )?;
                    let n = self.hub().online_counts().get(&tenant).copied().unwrap_or(0);
                    return Ok(json!({ "value": n }));
                }
                let m =
                    self.schema.metrics.get(name).ok_or_else(|| {
                        err(ErrorCode::NotFound, format!("no metric {name:?} in the schema"))
                    })?;
                check(
                    authorize(
                        p,
                        Capability::SeeMetrics,
                        &Target {
                            tenant: Some(&tenant),
                            ..Target::default()
                        },
                    ),
                    "metrics",
                )?;
                let tz = self.zone_of(&tenant);
                Ok(json!({ "value": self.store.lock().expect("store lock").value(m, tz, &tenant) }))
            }
            other => Err(err(
                ErrorCode::NotFound,
                format!("no live table, metric or query named {other:?}"),
            )),
        }
    }

    /// Handles `unsubscribe`.
    pub fn unsubscribe(&self, c: &Caller, id: &str) -> Result<(), ErrorBody> {
        let mut hub = self.hub();
        if hub.unsubscribe(c.session, id) {
            hub.deliver(c.session, ServerFrame::Unsubscribed { id: id.into() });
            Ok(())
        } else {
            Err(err(
                ErrorCode::NotFound,
                format!("no subscription {id:?} in this session"),
            ))
        }
    }

    /// Handles `heartbeat`.
    pub fn heartbeat(&self, c: &Caller, resource: &str, state: Json) -> Result<(), ErrorBody> {
        let p = &c.principal;
        check(
            authorize(
                p,
                Capability::PublishPresence,
                &Target {
                    tenant: p.tenant.as_deref(),
                    owner: p.user.as_deref(),
                    listed: None,
                    public: false,
                },
            ),
            "presence",
        )?;
        let user = p
            .user
            .as_deref()
            .ok_or_else(|| err(ErrorCode::Forbidden, "presence: only users have presence"))?;
        if resource.is_empty() || resource.len() > 512 {
            return Err(invalid("resource", "must be 1 to 512 characters"));
        }
        if state.to_string().len() > 1024 {
            return Err(invalid("state", "must be at most 1 KB of JSON"));
        }
        let tenant = p.tenant.clone().unwrap_or_default();
        self.hub().heartbeat(c.session, &tenant, user, resource, state);
        Ok(())
    }

    /// Handles `mutate`; `key` is the client's idempotency key (declared mutations only).
    pub async fn mutate(
        &self,
        c: &Caller,
        name: &str,
        args: &Json,
        key: Option<&str>,
    ) -> Result<Json, ErrorBody> {
        let started = Instant::now();
        let r = self.mutate_inner(c, name, args, key).await;
        ::metrics::histogram!("pulse_mutation_latency_seconds").record(started.elapsed().as_secs_f64());
        crate::admin::record_function("mutation", r.as_ref().err());
        r
    }

    async fn mutate_inner(
        &self,
        c: &Caller,
        name: &str,
        args: &Json,
        key: Option<&str>,
    ) -> Result<Json, ErrorBody> {
        let p = &c.principal;
        if !(args.is_null() || args.is_object()) {
            return Err(invalid("args", "must be an object"));
        }
        if key.is_some() && !self.schema.mutations.contains_key(name) {
            return Err(invalid(
                "idempotency_key",
                format!(
                    "{name} is not a mutation declared in the schema file; only those take an idempotency key"
                ),
            ));
        }
        match name {
            "notify" => {
                let tenant =
                    Self::tenant_of(p, args)?.ok_or_else(|| invalid("args.tenant", "name the tenant"))?;
                check(
                    authorize(
                        p,
                        Capability::SendNotifications,
                        &Target {
                            tenant: Some(&tenant),
                            ..Target::default()
                        },
                    ),
                    "send notifications",
                )?;
                let user = arg_text(args, "user")?.ok_or_else(|| invalid("args.user", "is required"))?;
                let title = arg_text(args, "title")?.ok_or_else(|| invalid("args.title", "is required"))?;
                let body = arg_text(args, "body")?.unwrap_or_default();
                if title.len() > 500 || body.len() > 10_000 {
                    return Err(invalid(
                        "args.title",
                        "title at most 500 and body at most 10,000 characters",
                    ));
                }
                let data = args.get("data").cloned().unwrap_or_else(|| json!({}));
                let created_by = p.user.clone().unwrap_or_else(|| "service".into());
                let mut db = self.state.get().await.map_err(internal)?;
                let tx = db.transaction().await.map_err(internal)?;
                let n = notifications::create(
                    &*tx,
                    &notifications::NewNotification {
                        tenant: &tenant,
                        user: &user,
                        title: &title,
                        body: &body,
                        data: &data,
                        source_key: None,
                        created_by: &created_by,
                    },
                )
                .await
                .map_err(internal)?
                .ok_or_else(|| internal("a notification without a source key conflicted"))?;
                events::notification_created(&*tx, &n).await.map_err(internal)?;
                tx.commit().await.map_err(internal)?;
                let unread = notifications::unread(&**db, &tenant, &user)
                    .await
                    .map_err(internal)?;
                self.publish_notification(&n, unread);
                Ok(json!({ "id": n.id }))
            }
            "mark_read" | "mark_all_read" => {
                let (tenant, user) = own_inbox(p)?;
                let ids: Option<Vec<i64>> = if name == "mark_read" {
                    Some(match args.get("ids") {
                        Some(Json::Array(a)) => a
                            .iter()
                            .map(|v| {
                                v.as_i64()
                                    .ok_or_else(|| invalid("args.ids", "must be a list of notification ids"))
                            })
                            .collect::<Result<_, _>>()?,
                        _ => return Err(invalid("args.ids", "must be a list of notification ids")),
                    })
                } else {
                    None
                };
                let mut db = self.state.get().await.map_err(internal)?;
                let tx = db.transaction().await.map_err(internal)?;
                let read = match &ids {
                    Some(ids) => notifications::mark_read(&*tx, &tenant, &user, ids).await,
                    None => notifications::mark_all_read(&*tx, &tenant, &user).await,
                }
                .map_err(internal)?;
                events::notifications_read(&*tx, &tenant, &user, &read)
                    .await
                    .map_err(internal)?;
                tx.commit().await.map_err(internal)?;
                let changed = read.len() as u64;
                let unread = notifications::unread(&**db, &tenant, &user)
                    .await
                    .map_err(internal)?;
                self.hub().publish_inbox(&tenant, &user, &|id| {
                    vec![ServerFrame::Value {
                        id: id.into(),
                        name: "unread".into(),
                        value: json!(unread),
                    }]
                });
                Ok(json!({ "marked": changed, "unread": unread }))
            }
            other => {
                let m = self
                    .schema
                    .mutations
                    .get(other)
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("no mutation {other:?}")))?;
                self.forward_mutation(p, m, args, key).await
            }
        }
    }

    fn publish_notification(&self, n: &notifications::Notification, unread: i64) {
        self.hub().publish_inbox(&n.tenant, &n.user, &|id| {
            vec![
                ServerFrame::Update {
                    id: id.into(),
                    cursor: None,
                    op: UpdateOp::Insert,
                    key: json!({ "id": n.id }),
                    row: Some(n.row.clone()),
                },
                ServerFrame::Value {
                    id: id.into(),
                    name: "unread".into(),
                    value: json!(unread),
                },
            ]
        });
    }

    // ---- The change stream: state loading, apply (inside the state transaction), committed.

    /// Loads the persisted metric cells (at start, before the stream resumes), and works
    /// out what must be recomputed: metrics whose definition is new or changed (their
    /// fingerprint differs from `pulse.metric_definitions`), recomputations a tenant's
    /// zone change asked for, the tenant zones when `[tenants]` is new. Cells of metrics
    /// no longer in the schema file are deleted.
    pub async fn load_state<C: tokio_postgres::GenericClient>(
        &self,
        state: &C,
    ) -> Result<(), tokio_postgres::Error> {
        let names: Vec<String> = self.schema.metrics.keys().cloned().collect();
        let removed: Vec<String> = state
            .query(
                "SELECT metric FROM pulse.metric_cells WHERE metric <> ALL($1) \
                 UNION SELECT metric FROM pulse.metric_definitions WHERE metric <> ALL($1) \
                 UNION SELECT metric FROM pulse.metric_refreshes WHERE metric <> ALL($1)",
                &[&names],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !removed.is_empty() {
            for table in ["metric_cells", "metric_definitions", "metric_refreshes"] {
                state
                    .execute(
                        &format!("DELETE FROM pulse.{table} WHERE metric = ANY($1)"),
                        &[&removed],
                    )
                    .await?;
            }
            tracing::info!(metrics = ?removed, "metrics no longer in the schema file: their cells were deleted");
        }

        let mut refresh = Refresh::default();
        let recorded: HashMap<String, (String, Json)> = state
            .query(
                "SELECT metric, fingerprint, definition FROM pulse.metric_definitions",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for m in self.schema.metrics.values() {
            let why = match recorded.get(&m.name) {
                None => Some(
                    "no recorded definition: a new metric, or the first start of a pulsed that records them"
                        .to_string(),
                ),
                Some((fp, _)) if *fp == self.schema.fingerprint(m) => None,
                Some((_, was)) => {
                    let changed: Vec<&str> = self
                        .schema
                        .definition(m)
                        .iter()
                        .filter(|(k, v)| was.get(*k).and_then(Json::as_str) != Some(v.as_str()))
                        .map(|(k, _)| *k)
                        .collect();
                    Some(format!("definition changed: {}", changed.join(", ")))
                }
            };
            if let Some(why) = why {
                refresh.pending.insert((m.name.clone(), None), why);
            }
        }
        for r in state
            .query(
                "SELECT metric, tenant, valid_from::text, reason FROM pulse.metric_refreshes",
                &[],
            )
            .await?
        {
            let metric: String = r.get(0);
            let tenant: String = r.get(1);
            let tenant = (!tenant.is_empty()).then_some(tenant);
            match r.get::<_, Option<String>>(2).and_then(|l| l.parse::<Lsn>().ok()) {
                None => {
                    refresh
                        .pending
                        .entry((metric, tenant))
                        .or_insert_with(|| r.get(3));
                }
                Some(lsn) => {
                    let a = refresh.ahead.entry(metric).or_default();
                    match tenant {
                        None => a.all = Some(lsn),
                        Some(t) => {
                            a.tenants.insert(t, lsn);
                        }
                    }
                }
            }
        }
        let mut zones = HashMap::new();
        match &self.schema.tenants {
            Some(t) => {
                let seeded = state
                    .query_opt(
                        "SELECT valid_from::text FROM pulse.tenant_zone_source WHERE definition = $1",
                        &[&t.describe()],
                    )
                    .await?;
                match seeded {
                    Some(row) => {
                        refresh.zones_ahead = row.get::<_, String>(0).parse().ok();
                        for r in state
                            .query("SELECT tenant, zone FROM pulse.tenant_zones", &[])
                            .await?
                        {
                            let zone: String = r.get(1);
                            if let Ok(tz) = zone.parse::<Tz>() {
                                zones.insert(r.get(0), tz);
                            }
                        }
                    }
                    None => {
                        refresh.zones_pending = true;
                        for m in self.schema.metrics.values().filter(|m| m.window.is_some()) {
                            refresh
                                .pending
                                .entry((m.name.clone(), None))
                                .or_insert_with(|| format!("tenant time zones now come from {}", t.source));
                        }
                    }
                }
            }
            None => {
                state
                    .batch_execute("DELETE FROM pulse.tenant_zones; DELETE FROM pulse.tenant_zone_source")
                    .await?;
            }
        }

        let rows = state
            .query(
                "SELECT metric, tenant, bucket, dkey, n, micros FROM pulse.metric_cells",
                &[],
            )
            .await?;
        // Cells of a metric whose definition changed mean nothing: the metric reads 0
        // until its recomputation lands (before any change is applied).
        let stale = |metric: &str| refresh.pending.contains_key(&(metric.to_string(), None));
        let cells: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    metrics::CellKey {
                        metric: r.get(0),
                        tenant: r.get(1),
                        bucket: r.get(2),
                        dkey: r.get(3),
                    },
                    metrics::Cell {
                        n: r.get(4),
                        micros: r.get(5),
                    },
                )
            })
            .filter(|(k, _)| !stale(&k.metric))
            .collect();
        self.store.lock().expect("store lock").replace(cells);
        *self.zones.lock().expect("zones lock") = Arc::new(zones);
        *self.refresh.lock().expect("refresh lock") = refresh;
        Ok(())
    }

    /// Whether something waits for a recomputation from a snapshot.
    pub fn refresh_wanted(&self) -> bool {
        let r = self.refresh.lock().expect("refresh lock");
        !r.pending.is_empty() || r.zones_pending
    }

    /// The tenant zones of the tenants table as `source` sees it; unknown names are
    /// warned about when `warn` (once per load, not at every recomputation).
    async fn read_zones<S: tokio_postgres::GenericClient>(
        &self,
        source: &S,
        warn: bool,
    ) -> Result<HashMap<String, Tz>, tokio_postgres::Error> {
        let Some(t) = &self.schema.tenants else {
            return Ok(HashMap::new());
        };
        let sql = format!(
            "SELECT {id}::text, {zone}::text FROM {table} WHERE {id} IS NOT NULL",
            id = quote_ident(&t.id_column),
            zone = quote_ident(&t.time_zone_column),
            table = t.source.quoted()
        );
        let mut zones = HashMap::new();
        for r in source.query(&sql, &[]).await? {
            let tenant: String = r.get(0);
            if let Some(tz) = self.schema.parse_zone(&tenant, r.get(1), warn) {
                zones.insert(tenant, tz);
            }
        }
        Ok(zones)
    }

    /// Replaces the persisted tenant zones, seeded from a snapshot at `lsn`.
    async fn write_zones<T: tokio_postgres::GenericClient>(
        &self,
        state: &T,
        zones: &HashMap<String, Tz>,
        lsn: Lsn,
    ) -> Result<(), tokio_postgres::Error> {
        let Some(t) = &self.schema.tenants else {
            return Ok(());
        };
        let tenants: Vec<String> = zones.keys().cloned().collect();
        let names: Vec<String> = zones.values().map(|z| z.name().to_string()).collect();
        state.execute("DELETE FROM pulse.tenant_zones", &[]).await?;
        state
            .execute(
                "INSERT INTO pulse.tenant_zones (tenant, zone) SELECT * FROM unnest($1::text[], $2::text[])",
                &[&tenants, &names],
            )
            .await?;
        state
            .execute(
                "INSERT INTO pulse.tenant_zone_source (id, definition, valid_from) VALUES (true, $1, $2::text::pg_lsn) \
                 ON CONFLICT (id) DO UPDATE SET definition = EXCLUDED.definition, valid_from = EXCLUDED.valid_from",
                &[&t.describe(), &lsn.to_string()],
            )
            .await?;
        Ok(())
    }

    /// Computes a metric's cells over the rows `source` sees (of `tenants` only, when
    /// given), with `zone` for the buckets, into `deltas`.
    async fn compute<S: tokio_postgres::GenericClient>(
        &self,
        source: &S,
        m: &Metric,
        zone: metrics::ZoneOf<'_>,
        tenants: Option<&[String]>,
        now: DateTime<Utc>,
        deltas: &mut Deltas,
    ) -> Result<u64, tokio_postgres::Error> {
        let cols = Schema::metric_columns(m);
        let mut sql = format!(
            "SELECT jsonb_build_object({}) FROM {}",
            cols.iter()
                .map(|c| format!("'{}', {}", c.replace('\'', "''"), quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", "),
            m.source.quoted()
        );
        let list: Vec<String> = tenants.map(<[String]>::to_vec).unwrap_or_default();
        let rows = if tenants.is_some() {
            sql.push_str(&format!(
                " WHERE {}::text = ANY($1)",
                quote_ident(&m.tenant_column)
            ));
            source.query(&sql, &[&list]).await?
        } else {
            source.query(&sql, &[]).await?
        };
        for row in &rows {
            let obj: Json = row.get(0);
            let get = |c: &str| {
                let ty = m.types.get(c)?;
                value::from_json(ty, obj.get(c)?)
            };
            let c = metrics::contribution(zone, m, &get, now)
                .filter(|(k, _)| tenants.is_none_or(|t| t.contains(&k.tenant)));
            metrics::add(deltas, c, 1);
        }
        Ok(rows.len() as u64)
    }

    /// Rebuilds the metric cells from the source database as of the exported snapshot
    /// (a new slot): every metric, the tenant zones, the recorded definitions.
    pub async fn load_snapshot<S, T>(&self, source: &S, state: &T) -> Result<(), tokio_postgres::Error>
    where
        S: tokio_postgres::GenericClient,
        T: tokio_postgres::GenericClient,
    {
        let zones = Arc::new(self.read_zones(source, true).await?);
        let zone = |t: &str| self.schema.zone(t, &zones);
        let now = Utc::now();
        let mut deltas = Deltas::new();
        for m in self.schema.metrics.values() {
            self.compute(source, m, &zone, None, now, &mut deltas).await?;
        }
        state.execute("DELETE FROM pulse.metric_cells", &[]).await?;
        state.execute("DELETE FROM pulse.metric_refreshes", &[]).await?;
        state.execute("DELETE FROM pulse.metric_definitions", &[]).await?;
        for m in self.schema.metrics.values() {
            record_definition(state, &self.schema, m).await?;
        }
        // Valid at the checkpoint the caller writes: nothing to skip.
        self.write_zones(state, &zones, Lsn(0)).await?;
        write_deltas(state, &deltas).await?;
        self.store.lock().expect("store lock").replace(deltas);
        *self.zones.lock().expect("zones lock") = zones;
        *self.refresh.lock().expect("refresh lock") = Refresh::default();
        Ok(())
    }

    /// Recomputes what is pending (see [`Engine::load_state`] and the zone changes seen
    /// by [`Engine::apply`]) from `source`, a snapshot holding exactly the transactions
    /// with `end_lsn <= lsn`, inside the caller's state transaction. The recomputed
    /// cells are recorded as valid from `lsn` (`pulse.metric_refreshes`), so the stream,
    /// which resumes below it, skips for them what they already hold. Buckets use the
    /// tenant zones as of the snapshot.
    pub async fn refresh<S, T>(&self, source: &S, state: &T, lsn: Lsn) -> Result<(), tokio_postgres::Error>
    where
        S: tokio_postgres::GenericClient,
        T: tokio_postgres::GenericClient,
    {
        let (pending, zones_pending) = {
            let r = self.refresh.lock().expect("refresh lock");
            (r.pending.clone(), r.zones_pending)
        };
        let mut stash = Stash::default();
        let zones = Arc::new(self.read_zones(source, zones_pending).await?);
        if zones_pending {
            self.write_zones(state, &zones, lsn).await?;
            tracing::info!(tenants = zones.len(), %lsn, table = ?self.schema.tenants.as_ref().map(|t| t.source.to_string()),
                "tenant time zones loaded from the tenants table");
            stash.zones = Some(zones.clone());
            stash.zones_seeded = Some(lsn);
        }
        let zone = |t: &str| self.schema.zone(t, &zones);
        // By metric: every tenant, or some; and why.
        let mut by_metric: BTreeMap<&str, (bool, Vec<String>, Vec<&str>)> = BTreeMap::new();
        for ((metric, tenant), why) in &pending {
            let e = by_metric.entry(metric).or_default();
            match tenant {
                None => e.0 = true,
                Some(t) => e.1.push(t.clone()),
            }
            if !e.2.contains(&why.as_str()) {
                e.2.push(why);
            }
        }
        let now = Utc::now();
        for (name, (all, tenants, why)) in by_metric {
            let Some(m) = self.schema.metrics.get(name) else {
                continue;
            };
            let started = Instant::now();
            let scope = (!all).then_some(tenants);
            let mut deltas = Deltas::new();
            let rows = self
                .compute(source, m, &zone, scope.as_deref(), now, &mut deltas)
                .await?;
            let lsn_text = lsn.to_string();
            let why = why.join("; ");
            match &scope {
                None => {
                    state
                        .execute("DELETE FROM pulse.metric_cells WHERE metric = $1", &[&m.name])
                        .await?;
                    state
                        .execute("DELETE FROM pulse.metric_refreshes WHERE metric = $1", &[&m.name])
                        .await?;
                    state
                        .execute(
                            "INSERT INTO pulse.metric_refreshes (metric, tenant, valid_from, reason) \
                             VALUES ($1, '', $2::text::pg_lsn, $3)",
                            &[&m.name, &lsn_text, &why],
                        )
                        .await?;
                    record_definition(state, &self.schema, m).await?;
                }
                Some(tenants) => {
                    state
                        .execute(
                            "DELETE FROM pulse.metric_cells WHERE metric = $1 AND tenant = ANY($2)",
                            &[&m.name, tenants],
                        )
                        .await?;
                    state
                        .execute(
                            "INSERT INTO pulse.metric_refreshes (metric, tenant, valid_from, reason) \
                             SELECT $1, t, $3::text::pg_lsn, $4 FROM unnest($2::text[]) AS t \
                             ON CONFLICT (metric, tenant) DO UPDATE SET valid_from = EXCLUDED.valid_from, reason = EXCLUDED.reason",
                            &[&m.name, tenants, &lsn_text, &why],
                        )
                        .await?;
                }
            }
            write_deltas(state, &deltas).await?;
            tracing::info!(
                metric = %m.name,
                tenants = %scope.as_ref().map_or_else(|| "all".to_string(), |t| t.join(",")),
                reason = %why,
                %lsn,
                rows,
                elapsed = ?started.elapsed(),
                "metric recomputed from a snapshot"
            );
            stash.replaced.push((m.name.clone(), scope, deltas, lsn));
        }
        stash.done = pending.into_keys().collect();
        *self.stash.lock().expect("stash lock") = stash;
        Ok(())
    }

    /// Deletes, in `state`, the metric buckets no window reads any more at `now` (see
    /// [`metrics::MetricStore::dead`]); memory follows in [`Engine::committed`]. Scans at
    /// most once per quarter hour. Returns whether anything was deleted.
    pub async fn housekeeping<T: tokio_postgres::GenericClient>(
        &self,
        state: &T,
        now: DateTime<Utc>,
    ) -> Result<bool, tokio_postgres::Error> {
        let quarter = now.timestamp().div_euclid(900);
        {
            let mut r = self.refresh.lock().expect("refresh lock");
            if r.last_prune == Some(quarter) {
                return Ok(false);
            }
            r.last_prune = Some(quarter);
        }
        let zones = self.table_zones();
        let zone = |t: &str| self.schema.zone(t, &zones);
        let dead = self
            .store
            .lock()
            .expect("store lock")
            .dead(&self.schema.metrics, &zone, now);
        if dead.is_empty() {
            return Ok(false);
        }
        let col = |i: usize| -> Vec<&str> {
            dead.iter()
                .map(|d| match i {
                    0 => d.0.as_str(),
                    1 => d.1.as_str(),
                    _ => d.2.as_str(),
                })
                .collect()
        };
        let deleted = state
            .execute(
                "DELETE FROM pulse.metric_cells c USING unnest($1::text[], $2::text[], $3::text[]) AS d(metric, tenant, start) \
                 WHERE c.metric = d.metric AND c.tenant = d.tenant AND c.bucket <> '' AND c.bucket < d.start",
                &[&col(0), &col(1), &col(2)],
            )
            .await?;
        tracing::info!(
            cells = deleted,
            pairs = dead.len(),
            "metric buckets no window reads any more were deleted"
        );
        *self.stash.lock().expect("stash lock") = Stash {
            pruned: dead,
            ..Stash::default()
        };
        Ok(true)
    }

    /// Follows a change of the tenants table: updates `zones`; returns each tenant it
    /// touched with its zone in the table from now on (None: none, or not a zone) and,
    /// when its effective zone changed, the zones before and after.
    #[allow(clippy::type_complexity)]
    fn follow_zone(
        &self,
        zones: &mut Arc<HashMap<String, Tz>>,
        rel: &Relation,
        kind: &ChangeKind,
    ) -> Vec<(String, Option<Tz>, Option<(Tz, Tz)>)> {
        let Some(t) = &self.schema.tenants else {
            return Vec::new();
        };
        let id_of = |get: &dyn Fn(&str) -> Option<Value>| {
            get(&t.id_column)
                .filter(|v| !matches!(v, Value::Null | Value::UnchangedToast))
                .map(|v| value::key_text(&v))
        };
        let zone_in = |tenant: &str, get: &dyn Fn(&str) -> Option<Value>| {
            let text = get(&t.time_zone_column).and_then(|v| match v {
                Value::Null => None,
                v => Some(value::key_text(&v)),
            });
            self.schema.parse_zone(tenant, text.as_deref(), true)
        };
        // (tenant, its zone in the table from now on: None = none or unknown)
        let mut set: Vec<(String, Option<Tz>)> = Vec::new();
        match kind {
            ChangeKind::Insert { new } => {
                let get = getter(rel, new, None);
                if let Some(id) = id_of(&get) {
                    let z = zone_in(&id, &get);
                    set.push((id, z));
                }
            }
            ChangeKind::Update { old, new } => {
                let get = getter(rel, new, old.as_deref());
                if let Some(old) = old
                    && let Some(was) = id_of(&getter(rel, old, None))
                    && id_of(&get).as_ref() != Some(&was)
                {
                    set.push((was, None));
                }
                if let Some(id) = id_of(&get) {
                    let z = zone_in(&id, &get);
                    set.push((id, z));
                }
            }
            ChangeKind::Delete { old } => {
                if let Some(id) = id_of(&getter(rel, old, None)) {
                    set.push((id, None));
                }
            }
            ChangeKind::Truncate => set.extend(zones.keys().map(|k| (k.clone(), None))),
        }
        let mut out = Vec::new();
        for (tenant, z) in set {
            let before = self.schema.zone(&tenant, zones);
            if zones.get(&tenant) != z.as_ref() {
                let map = Arc::make_mut(zones);
                match z {
                    Some(z) => map.insert(tenant.clone(), z),
                    None => map.remove(&tenant),
                };
            }
            let after = self.schema.zone(&tenant, zones);
            out.push((tenant, z, (before != after).then_some((before, after))));
        }
        out
    }

    /// Derives state from a batch of committed transactions inside the caller's state
    /// transaction: metric cells, notifications from the source table, tenant zones.
    /// Changes already held by recomputed cells (`end_lsn` at or below their LSN) are
    /// skipped for those cells only.
    pub async fn apply<T: tokio_postgres::GenericClient>(
        &self,
        batch: &[Transaction],
        state: &T,
    ) -> Result<(), tokio_postgres::Error> {
        let mut stash = Stash::default();
        let mut crossings = thresholds::Tracker::wanted(&self.schema).then(thresholds::Tracker::default);
        let mut crossed = Vec::new();
        let now = Utc::now();
        let (ahead, zones_ahead) = {
            let r = self.refresh.lock().expect("refresh lock");
            (r.ahead.clone(), r.zones_ahead)
        };
        let mut zones = self.table_zones();
        let zones_before = zones.clone();
        // Tenants whose table zone the batch set: (tenant, zone name or None).
        let mut zone_writes: BTreeMap<String, Option<String>> = BTreeMap::new();
        let windowed: Vec<&Metric> = self
            .schema
            .metrics
            .values()
            .filter(|m| m.window.is_some())
            .collect();
        for tx in batch {
            // This transaction's own metric deltas, so thresholds are judged per transaction.
            let mut deltas = Deltas::new();
            let mut truncated = Vec::new();
            for (pos, change) in tx.changes.iter().enumerate() {
                let rel = &change.relation;
                if let Some(t) = &self.schema.tenants
                    && t.source.schema == rel.schema
                    && t.source.table == rel.name
                    && zones_ahead.is_none_or(|l| tx.end_lsn > l)
                {
                    for (tenant, table_zone, moved) in self.follow_zone(&mut zones, rel, &change.kind) {
                        zone_writes.insert(tenant.clone(), table_zone.map(|z| z.name().to_string()));
                        let Some((before, after)) = moved else {
                            continue;
                        };
                        let why =
                            format!("the time zone of tenant {tenant} changed from {before} to {after}");
                        tracing::info!(%tenant, from = %before, to = %after, lsn = %tx.commit_lsn, "tenant time zone changed; its windowed metrics will be recomputed");
                        for m in &windowed {
                            if ahead.get(&m.name).is_some_and(|a| a.covers(&tenant, tx.end_lsn)) {
                                continue;
                            }
                            stash
                                .wanted
                                .push(((m.name.clone(), Some(tenant.clone())), why.clone()));
                        }
                    }
                }
                let zone = |t: &str| self.schema.zone(t, &zones);
                for m in self.schema.metrics.values() {
                    if m.source.schema != rel.schema || m.source.table != rel.name {
                        continue;
                    }
                    let ahead = ahead.get(&m.name);
                    if ahead.is_some_and(|a| a.all.is_some_and(|l| tx.end_lsn <= l)) {
                        continue;
                    }
                    let held = |c: Option<(metrics::CellKey, i64)>| {
                        c.filter(|(k, _)| !ahead.is_some_and(|a| a.covers(&k.tenant, tx.end_lsn)))
                    };
                    let of = |row: &[Value], old: Option<&[Value]>| {
                        held(metrics::contribution(&zone, m, &getter(rel, row, old), now))
                    };
                    match &change.kind {
                        ChangeKind::Insert { new } => metrics::add(&mut deltas, of(new, None), 1),
                        ChangeKind::Update { old, new } => {
                            if let Some(old) = old {
                                metrics::add(&mut deltas, of(old, None), -1);
                            }
                            metrics::add(&mut deltas, of(new, old.as_deref()), 1);
                        }
                        ChangeKind::Delete { old } => metrics::add(&mut deltas, of(old, None), -1),
                        ChangeKind::Truncate => {
                            // Everything of the metric goes, including deltas of this
                            // batch, except cells recomputed after this truncate.
                            let keep: Vec<String> = ahead
                                .map(|a| {
                                    a.tenants
                                        .iter()
                                        .filter(|(_, l)| tx.end_lsn <= **l)
                                        .map(|(t, _)| t.clone())
                                        .collect()
                                })
                                .unwrap_or_default();
                            deltas.retain(|k, _| k.metric != m.name || keep.contains(&k.tenant));
                            stash
                                .deltas
                                .retain(|k, _| k.metric != m.name || keep.contains(&k.tenant));
                            state
                                .execute(
                                    "DELETE FROM pulse.metric_cells WHERE metric = $1 AND tenant <> ALL($2)",
                                    &[&m.name, &keep],
                                )
                                .await?;
                            stash.truncated.push((m.name.clone(), keep));
                            truncated.push(m.name.clone());
                        }
                    }
                }
                if let (Some(ns), ChangeKind::Insert { new }) = (&self.schema.notifications, &change.kind)
                    && ns.source.schema == rel.schema
                    && ns.source.table == rel.name
                {
                    let get = getter(rel, new, None);
                    let text = |c: &str| {
                        get(c)
                            .filter(|v| !matches!(v, Value::Null))
                            .map(|v| value::key_text(&v))
                    };
                    let (Some(tenant), Some(user)) = (text(&ns.tenant_column), text(&ns.user_column)) else {
                        tracing::warn!(table = %ns.source, "a notification row without tenant or user was skipped");
                        continue;
                    };
                    let title = text(&ns.title_column).unwrap_or_default();
                    let body = ns.body_column.as_deref().and_then(text).unwrap_or_default();
                    let key = format!("{}:{pos}", tx.commit_lsn);
                    let created = notifications::create(
                        state,
                        &notifications::NewNotification {
                            tenant: &tenant,
                            user: &user,
                            title: &title,
                            body: &body,
                            data: &json!({}),
                            source_key: Some(&key),
                            created_by: "stream",
                        },
                    )
                    .await?;
                    if let Some(n) = created {
                        events::notification_created(state, &n).await?;
                        stash.notifications.push(n);
                    }
                }
            }
            if let Some(tracker) = crossings.as_mut() {
                let zone = |t: &str| self.schema.zone(t, &zones);
                let store = self.store.lock().expect("store lock");
                crossed.extend(tracker.observe(&self.schema, &zone, &store, tx, &deltas, &truncated));
            }
            for (k, d) in deltas {
                let e = stash.deltas.entry(k).or_default();
                e.n += d.n;
                e.micros += d.micros;
            }
        }
        // Beside the cells and the checkpoint: durable exactly when the values are.
        crate::outbox::write_all(state, &crossed).await?;
        write_deltas(state, &stash.deltas).await?;
        for (tenant, zone) in &zone_writes {
            match zone {
                Some(z) => {
                    state
                        .execute(
                            "INSERT INTO pulse.tenant_zones (tenant, zone) VALUES ($1, $2) \
                             ON CONFLICT (tenant) DO UPDATE SET zone = EXCLUDED.zone",
                            &[tenant, z],
                        )
                        .await?
                }
                None => {
                    state
                        .execute("DELETE FROM pulse.tenant_zones WHERE tenant = $1", &[tenant])
                        .await?
                }
            };
        }
        // A zone change asks for a recomputation, durably: a crash before it happens
        // finds it pending at the next start.
        for ((metric, tenant), why) in &stash.wanted {
            state
                .execute(
                    "INSERT INTO pulse.metric_refreshes (metric, tenant, valid_from, reason) VALUES ($1, $2, NULL, $3) \
                     ON CONFLICT (metric, tenant) DO UPDATE SET valid_from = NULL, reason = EXCLUDED.reason",
                    &[metric, &tenant.clone().unwrap_or_default(), why],
                )
                .await?;
        }
        // Recomputations the checkpoint (this batch's end) passes are ordinary cells now.
        if let Some(end) = batch.last().map(|t| t.end_lsn)
            && ahead
                .values()
                .any(|a| a.all.is_some_and(|l| l <= end) || a.tenants.values().any(|l| *l <= end))
        {
            state
                .execute(
                    "DELETE FROM pulse.metric_refreshes WHERE valid_from <= $1::text::pg_lsn",
                    &[&end.to_string()],
                )
                .await?;
            stash.passed = Some(end);
        }
        if !Arc::ptr_eq(&zones, &zones_before) {
            stash.zones = Some(zones);
        }
        stash.rezoned = stash.wanted.iter().filter_map(|((_, t), _)| t.clone()).collect();
        stash.rezoned.sort();
        stash.rezoned.dedup();
        *self.stash.lock().expect("stash lock") = stash;
        Ok(())
    }

    /// The batch (or refresh, or housekeeping) is durable: update memory and publish
    /// metric values and notifications (live-table rows went out in
    /// [`Engine::publish_live`]).
    pub fn committed(self: &Arc<Self>) {
        let stash = std::mem::take(&mut *self.stash.lock().expect("stash lock"));
        if let Some(z) = &stash.zones {
            *self.zones.lock().expect("zones lock") = z.clone();
        }
        {
            let mut r = self.refresh.lock().expect("refresh lock");
            for t in &stash.done {
                r.pending.remove(t);
            }
            if stash.zones_seeded.is_some() {
                r.zones_pending = false;
                r.zones_ahead = stash.zones_seeded;
            }
            for (metric, tenants, _, lsn) in &stash.replaced {
                let a = r.ahead.entry(metric.clone()).or_default();
                match tenants {
                    None => {
                        *a = Ahead {
                            all: Some(*lsn),
                            tenants: HashMap::new(),
                        }
                    }
                    Some(ts) => a.tenants.extend(ts.iter().map(|t| (t.clone(), *lsn))),
                }
            }
            for (t, why) in &stash.wanted {
                r.pending.insert(t.clone(), why.clone());
            }
            if let Some(end) = stash.passed {
                r.ahead.retain(|_, a| {
                    a.all = a.all.filter(|l| *l > end);
                    a.tenants.retain(|_, l| *l > end);
                    a.all.is_some() || !a.tenants.is_empty()
                });
            }
        }
        // "Today" moved for tenants whose zone changed: every windowed metric of theirs.
        let zone_changed: Vec<(String, String)> = self
            .schema
            .metrics
            .values()
            .filter(|m| m.window.is_some())
            .flat_map(|m| stash.rezoned.iter().map(|t| (m.name.clone(), t.clone())))
            .collect();
        let mut touched = {
            let mut store = self.store.lock().expect("store lock");
            let mut touched = zone_changed;
            for (m, keep) in &stash.truncated {
                touched.extend(store.clear_metric(m, keep).into_iter().map(|t| (m.clone(), t)));
            }
            for (m, tenants, cells, _) in stash.replaced {
                touched.extend(
                    store
                        .replace_metric(&m, tenants.as_deref(), cells)
                        .into_iter()
                        .map(|t| (m.clone(), t)),
                );
            }
            for (m, t, start) in &stash.pruned {
                store.remove_before(m, t, start);
            }
            touched.extend(store.apply(&stash.deltas));
            touched
        };
        touched.sort();
        touched.dedup();
        self.refresh_metrics(Some(&touched));
        if !stash.notifications.is_empty() {
            // Unread counts need the database; publishing from here must not wait for it.
            let engine = self.clone();
            tokio::spawn(async move {
                let db = match engine.state.get().await {
                    Ok(db) => db,
                    Err(e) => return tracing::warn!(error = %e, "unread counts not sent"),
                };
                for n in &stash.notifications {
                    match notifications::unread(&**db, &n.tenant, &n.user).await {
                        Ok(unread) => engine.publish_notification(n, unread),
                        Err(e) => tracing::warn!(error = %e, "unread count not sent"),
                    }
                }
            });
        }
    }

    /// Live-table updates of transactions straight from the stream: they derive nothing
    /// the state database keeps, so they go to clients as soon as the transactions leave
    /// the reader, before any state transaction (see
    /// [`crate::replication::ChangeSink::live_tap`]).
    pub fn publish_live(&self, batch: &[Transaction]) {
        if self.schema.tables.is_empty() {
            return;
        }
        let mut hub = self.hub();
        for tx in batch {
            for change in &tx.changes {
                let rel = &change.relation;
                for t in self.schema.tables.values() {
                    if t.source.schema != rel.schema || t.source.table != rel.name {
                        continue;
                    }
                    let live = |row: &[Value], old: Option<&[Value]>| live_row(t, &getter(rel, row, old));
                    match &change.kind {
                        ChangeKind::Insert { new } => {
                            hub.stage_live(&t.name, &t.tenant_column, None, Some(live(new, None)))
                        }
                        ChangeKind::Update { old, new } => hub.stage_live(
                            &t.name,
                            &t.tenant_column,
                            old.as_deref().map(|o| live(o, None)),
                            Some(live(new, old.as_deref())),
                        ),
                        ChangeKind::Delete { old } => {
                            hub.stage_live(&t.name, &t.tenant_column, Some(live(old, None)), None)
                        }
                        ChangeKind::Truncate => hub.resnapshot_table(&t.name),
                    }
                }
            }
            hub.staged_commit(tx.commit_time.into());
        }
        if hub
            .flush_live_within(std::time::Instant::now(), self.live_batch)
            .is_some()
        {
            drop(hub);
            self.live_due.notify_one();
        }
    }

    /// Every metric cell (tests and the console compare them with a recomputation).
    pub fn metric_cells(&self) -> Vec<(metrics::CellKey, metrics::Cell)> {
        self.store
            .lock()
            .expect("store lock")
            .cells()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

fn live_row(t: &LiveTable, get: &dyn Fn(&str) -> Option<Value>) -> LiveRow {
    let mut vals = HashMap::new();
    for c in std::iter::once(&t.tenant_column)
        .chain(t.owner_column.iter())
        .chain(t.filters.iter())
    {
        if let Some(v) = get(c) {
            vals.insert(c.clone(), v);
        }
    }
    let obj = |cols: &[String]| {
        Json::Object(
            cols.iter()
                .map(|c| {
                    (
                        c.clone(),
                        get(c).map(|v| value::to_json(&v)).unwrap_or(Json::Null),
                    )
                })
                .collect(),
        )
    };
    LiveRow {
        vals,
        key: obj(&t.key),
        row: obj(&t.columns),
    }
}

/// Records the definition a metric's cells are now computed with.
async fn record_definition<T: tokio_postgres::GenericClient>(
    state: &T,
    schema: &Schema,
    m: &Metric,
) -> Result<(), tokio_postgres::Error> {
    let definition = Json::Object(
        schema
            .definition(m)
            .into_iter()
            .map(|(k, v)| (k.to_string(), Json::String(v)))
            .collect(),
    );
    state
        .execute(
            "INSERT INTO pulse.metric_definitions (metric, fingerprint, definition, updated_at) VALUES ($1, $2, $3, now()) \
             ON CONFLICT (metric) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, definition = EXCLUDED.definition, updated_at = now()",
            &[&m.name, &schema.fingerprint(m), &definition],
        )
        .await?;
    Ok(())
}

async fn write_deltas<T: tokio_postgres::GenericClient>(
    state: &T,
    deltas: &Deltas,
) -> Result<(), tokio_postgres::Error> {
    let live: Vec<_> = deltas.iter().filter(|(_, d)| d.n != 0 || d.micros != 0).collect();
    if live.is_empty() {
        return Ok(());
    }
    let col =
        |f: &dyn Fn(&metrics::CellKey) -> String| live.iter().map(|(k, _)| f(k)).collect::<Vec<String>>();
    let metric = col(&|k| k.metric.clone());
    let tenant = col(&|k| k.tenant.clone());
    let bucket = col(&|k| k.bucket.clone());
    let dkey = col(&|k| k.dkey.clone());
    let n: Vec<i64> = live.iter().map(|(_, d)| d.n).collect();
    let micros: Vec<i64> = live.iter().map(|(_, d)| d.micros).collect();
    state
        .execute(
            "INSERT INTO pulse.metric_cells AS c (metric, tenant, bucket, dkey, n, micros) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[]) \
             ON CONFLICT (metric, tenant, bucket, dkey) DO UPDATE SET n = c.n + EXCLUDED.n, micros = c.micros + EXCLUDED.micros",
            &[&metric, &tenant, &bucket, &dkey, &n, &micros],
        )
        .await?;
    state
        .execute(
            "DELETE FROM pulse.metric_cells c USING unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS d(metric, tenant, bucket, dkey) \
             WHERE c.metric = d.metric AND c.tenant = d.tenant AND c.bucket = d.bucket AND c.dkey = d.dkey AND c.n = 0",
            &[&metric, &tenant, &bucket, &dkey],
        )
        .await?;
    Ok(())
}

/// Where events born in the engine leave for Symfony: each is written to the outbox
/// inside the same state transaction that made the change, so the event is durable
/// exactly when the change is (the relay publishes it later).
pub mod events {
    use super::notifications::Notification;
    use crate::outbox::{self, OutboxEvent};
    use serde_json::json;

    /// The ordering key of a user's events.
    pub fn aggregate(tenant: &str, user: &str) -> String {
        format!("user:{tenant}:{user}")
    }

    /// A notification was created (by a mutation, a command or from the change stream),
    /// inside `tx`. The key is the notification id: a replayed stream change creates no
    /// second notification (its source key conflicts), so it sends no second event.
    pub async fn notification_created<C: tokio_postgres::GenericClient>(
        tx: &C,
        n: &Notification,
    ) -> Result<(), tokio_postgres::Error> {
        let event = OutboxEvent {
            event: "notification.created",
            message_id: format!("notification.created:{}", n.id),
            aggregate: aggregate(&n.tenant, &n.user),
            payload: json!({
                "notificationId": n.id,
                "tenantId": n.tenant,
                "userId": n.user,
                "title": n.row["title"],
                "body": n.row["body"],
                "data": n.row["data"],
                "createdAt": n.row["created_at"],
            }),
        };
        outbox::write(tx, &event).await?;
        tracing::debug!(id = n.id, tenant = %n.tenant, "notification created");
        Ok(())
    }

    /// Notifications `ids` of a user were marked read, inside `tx`. A notification is
    /// read once, so the smallest id names this set for good: that is the key.
    pub async fn notifications_read<C: tokio_postgres::GenericClient>(
        tx: &C,
        tenant: &str,
        user: &str,
        ids: &[i64],
    ) -> Result<(), tokio_postgres::Error> {
        let Some(first) = ids.iter().min() else {
            return Ok(());
        };
        let event = OutboxEvent {
            event: "notification.read",
            message_id: format!("notification.read:{first}"),
            aggregate: aggregate(tenant, user),
            payload: json!({ "tenantId": tenant, "userId": user, "notificationIds": ids }),
        };
        outbox::write(tx, &event).await?;
        Ok(())
    }

    /// A presence change of a user, after the debounce, with when it happened (wall
    /// clock, ms) and the debounce window its key is derived from.
    #[derive(Debug, Clone)]
    pub struct PresenceChange {
        /// Tenant.
        pub tenant: String,
        /// User.
        pub user: String,
        /// Joined (true) or left.
        pub joined: bool,
        /// When the join, or the leave that is now due, was seen.
        pub at_ms: u64,
        /// The debounce window (`amqp.presence_debounce_ms`).
        pub window_ms: u64,
    }

    /// Presence changes of users, after the debounce (see [`crate::outbox::PresenceDebounce`]).
    /// Presence lives in memory, so there is no state change to share a transaction with;
    /// each call writes its events in one transaction of its own. Keys are derived from
    /// the user and the debounce window of the change
    /// ([`crate::outbox::presence_message_id`]): a retried write, or the same join seen
    /// again after a restart within the window, keeps one event.
    pub async fn presence_changed<C: tokio_postgres::GenericClient>(
        tx: &C,
        changes: &[PresenceChange],
    ) -> Result<u64, tokio_postgres::Error> {
        let events: Vec<OutboxEvent> = changes
            .iter()
            .map(|c| {
                let event = if c.joined {
                    "presence.joined"
                } else {
                    "presence.left"
                };
                let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(c.at_ms as i64)
                    .unwrap_or_default()
                    .to_rfc3339();
                OutboxEvent {
                    event,
                    message_id: outbox::presence_message_id(event, &c.tenant, &c.user, c.at_ms, c.window_ms),
                    aggregate: aggregate(&c.tenant, &c.user),
                    payload: json!({ "tenantId": c.tenant, "userId": c.user, "at": at }),
                }
            })
            .collect();
        outbox::write_all(tx, &events).await
    }
}

/// The engine as the change stream's consumer (see [`crate::replication::ChangeSink`]):
/// metric cells and stream notifications are written in the loop's state transaction,
/// beside the checkpoint, and published only once it is committed.
pub struct EngineSink {
    engine: Arc<Engine>,
    /// The checkpoint row (the slot name).
    name: String,
}

impl EngineSink {
    /// A sink feeding `engine`, checkpointed under `name` (the slot name).
    pub fn new(engine: Arc<Engine>, name: impl Into<String>) -> EngineSink {
        EngineSink {
            engine,
            name: name.into(),
        }
    }
}

impl crate::replication::ChangeSink for EngineSink {
    async fn checkpoint(
        &mut self,
        state: &tokio_postgres::Client,
    ) -> Result<Option<pulse_cdc::Lsn>, crate::replication::SinkError> {
        // Whatever memory holds beyond the persisted state is dropped: the stream replays it.
        *self.engine.stash.lock().expect("stash lock") = Stash::default();
        self.engine.load_state(state).await?;
        crate::replication::read_checkpoint(state, &self.name).await
    }

    async fn load_snapshot(
        &mut self,
        source: &tokio_postgres::Transaction<'_>,
        state_tx: &tokio_postgres::Transaction<'_>,
        _lsn: pulse_cdc::Lsn,
    ) -> Result<(), crate::replication::SinkError> {
        self.engine.load_snapshot(source, state_tx).await?;
        Ok(())
    }

    async fn apply(
        &mut self,
        batch: &[Transaction],
        state_tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), crate::replication::SinkError> {
        self.engine.apply(batch, state_tx).await?;
        Ok(())
    }

    fn live_tap(&self) -> crate::replication::LiveTap {
        let engine = self.engine.clone();
        Arc::new(move |batch: &[Transaction]| engine.publish_live(batch))
    }

    fn committed(&mut self, _batch: &[Transaction]) {
        self.engine.committed();
    }

    fn refresh_wanted(&self) -> bool {
        self.engine.refresh_wanted()
    }

    async fn refresh(
        &mut self,
        source: &tokio_postgres::Transaction<'_>,
        state_tx: &tokio_postgres::Transaction<'_>,
        lsn: pulse_cdc::Lsn,
    ) -> Result<(), crate::replication::SinkError> {
        self.engine.refresh(source, state_tx, lsn).await?;
        Ok(())
    }

    async fn housekeeping(
        &mut self,
        state_tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<bool, crate::replication::SinkError> {
        Ok(self.engine.housekeeping(state_tx, Utc::now()).await?)
    }

    fn needs_snapshot(&self) -> bool {
        !self.engine.schema.metrics.is_empty()
    }
}
