//! Answers console requests (pulsetop): status, config, metrics, logs, the data explorer,
//! replication, settings, and the screens whose subsystems other parts of pulsed own.
//!
//! Reads the daemon's state and the state database; never changes anything without an
//! audit record (settings edits go through [`crate::settings::Settings::update`]). Every
//! write checks its own capability here, on top of the console capability the session
//! already checked. A screen whose subsystem is not in this build gets an `unavailable`
//! error naming what is missing, never made-up data.

use std::time::Duration;

use pulse_shared::admin::{
    AdminRequest, AdminResponse, ConfigEntry, DeadLetter, JobInfo, JobRun, JobsReport, LiveTableInfo,
    MetricsSample, NotificationItem, PresenceEntry, PresenceReport, ReplicationReport, SenderInfo,
    SettingEntry, SettingKind, SlotInfo, StatusReport, StorageReport, StoredFile, TableInfo, TableRows,
    TenantPresence, TenantRows, TenantStorage,
};
use pulse_shared::caps::{Capability, Decision, Principal, Target, authorize};
use pulse_shared::{ErrorBody, ErrorCode};

use crate::App;
use crate::settings::{SettingKey, Settings};

/// How long one console request may take on the database.
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// Tables larger than this (by the planner's estimate) show the estimate, not an exact
/// count, so that browsing never scans a huge outbox.
const EXACT_COUNT_LIMIT: f32 = 1_000_000.0;
/// Most rows the data explorer returns.
const MAX_ROWS: u32 = 500;

/// Answers one request from `principal` (who already holds the console capability).
/// `peer` names the user at the other end of the admin socket (`console uid=N (name)`),
/// when known: audit records name them.
pub async fn answer(
    app: &App,
    principal: &Principal,
    peer: Option<&str>,
    request: AdminRequest,
) -> Result<AdminResponse, ErrorBody> {
    if matches!(
        request,
        AdminRequest::Tables
            | AdminRequest::TableRows { .. }
            | AdminRequest::LiveTables
            | AdminRequest::LiveRows { .. }
    ) {
        allowed(principal, Capability::Console, "the data explorer")?;
    }
    match request {
        AdminRequest::Status => Ok(AdminResponse::Status(StatusReport {
            version: crate::VERSION.to_string(),
            uptime_secs: app.started.elapsed().as_secs(),
            components: app.health.snapshot(),
        })),
        AdminRequest::Config => Ok(AdminResponse::Config {
            entries: app
                .config()
                .effective
                .iter()
                .map(|e| ConfigEntry {
                    key: e.key.to_string(),
                    value: e.shown.clone(),
                    source: e.origin.to_string(),
                })
                .collect(),
        }),
        AdminRequest::Metrics => {
            let mut sample = metrics_sample(&app.metrics.render());
            sample.storage_max_quota_pct = storage_max_quota_pct(app).await;
            Ok(AdminResponse::Metrics(sample))
        }
        AdminRequest::Logs { after, limit } => Ok(AdminResponse::Logs(
            crate::telemetry::log_buffer().page(after, limit as usize),
        )),
        AdminRequest::Tables => with_db(tables(app)).await,
        AdminRequest::TableRows { table, limit } => {
            with_db(table_rows(app, &table, limit.min(MAX_ROWS))).await
        }
        AdminRequest::Replication => with_db(replication(app)).await,
        AdminRequest::LiveTables => with_db(live_tables(app)).await,
        AdminRequest::LiveRows {
            table,
            tenant,
            offset,
            limit,
        } => with_db(live_rows(app, &table, tenant, offset, limit.min(MAX_ROWS))).await,
        // Sessions serve the feed themselves (it pushes); see `watch_changes`.
        AdminRequest::WatchChanges { .. } | AdminRequest::UnwatchChanges => Err(ErrorBody::new(
            ErrorCode::InvalidArgument,
            "the change feed is served by a session; send watch_changes in an admin frame",
        )),
        AdminRequest::Presence { tenant } => Ok(AdminResponse::Presence(presence(app, tenant.as_deref()))),
        AdminRequest::Notifications { tenant, user, limit } => {
            with_db(notifications(app, tenant, user, limit.min(MAX_ROWS))).await
        }
        AdminRequest::Storage => with_db(storage(app)).await,
        AdminRequest::Jobs => with_db(jobs(app)).await,
        AdminRequest::RunJob { name } => {
            allowed(principal, Capability::RunJob, "running jobs")?;
            let record = app
                .jobs
                .run_now(&name, principal, &actor(principal, peer))
                .await
                .map_err(|e| ErrorBody::new(e.code(), e.to_string()))?;
            Ok(AdminResponse::Done {
                message: format!(
                    "{} ran: {:?} in {} ms{}",
                    record.job,
                    record.outcome,
                    record.duration.as_millis(),
                    record.error.map(|e| format!(" ({e})")).unwrap_or_default()
                ),
            })
        }
        AdminRequest::RequeueDeadLetter { id } => {
            allowed(principal, Capability::RunJob, "requeueing dead letters")?;
            let Ok(number) = id.parse::<i64>() else {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidArgument,
                    format!("dead letter id {id:?} is not a number"),
                ));
            };
            let mut client = app.pool.get().await.map_err(db_unavailable)?;
            if crate::relay::requeue_dead_letter(&mut client, number, &actor(principal, peer))
                .await
                .map_err(db_unavailable)?
            {
                Ok(AdminResponse::Done {
                    message: format!("dead letter {id} requeued"),
                })
            } else {
                Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no dead letter {id}"),
                ))
            }
        }
        AdminRequest::Settings => Ok(AdminResponse::Settings {
            settings: app.settings.list().into_iter().map(setting_entry).collect(),
        }),
        AdminRequest::UpdateSetting { key, value } => {
            allowed(
                principal,
                Capability::ManageSettings,
                "changing platform settings",
            )?;
            let key = update_setting(app, principal, peer, &key, &value).await?;
            Ok(AdminResponse::Done {
                message: format!("{} changed", key.label()),
            })
        }
        AdminRequest::RotateDeployKey => {
            allowed(principal, Capability::ManageSettings, "rotating the deploy key")?;
            let fresh = Settings::generate_deploy_key();
            update_setting(
                app,
                principal,
                peer,
                SettingKey::DeployKey.as_str(),
                fresh.expose(),
            )
            .await?;
            Ok(AdminResponse::DeployKeyRotated {
                key: fresh.expose().to_string(),
            })
        }
    }
}

fn allowed(principal: &Principal, capability: Capability, what: &str) -> Result<(), ErrorBody> {
    match authorize(principal, capability, &Target::default()) {
        Decision::Allowed(_) => Ok(()),
        Decision::Denied(reason) => Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("{what}: {}", reason.explain()),
        )),
    }
}

/// Storage per tenant against its quota, and the largest files.
async fn storage(app: &App) -> Result<AdminResponse, ErrorBody> {
    let config = app.config();
    let cx = crate::files::Ctx {
        files: &app.files,
        pool: &app.pool,
        config: &config,
    };
    let tenants = crate::files::storage_usage(&cx, None)
        .await
        .map_err(|e| ErrorBody::new(e.code(), e.to_string()))?
        .into_iter()
        .map(|u| TenantStorage {
            tenant: u.tenant,
            used_bytes: u.used_bytes,
            quota_bytes: u.quota_bytes.unwrap_or(0),
            files: u.files,
        })
        .collect();
    let client = app.pool.get().await.map_err(db_unavailable)?;
    let largest = client
        .query(
            "SELECT tenant, name, size,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM pulse.files ORDER BY size DESC, created_at DESC LIMIT 20",
            &[],
        )
        .await
        .map_err(db_unavailable)?
        .iter()
        .map(|r| StoredFile {
            tenant: r.get(0),
            name: r.get(1),
            bytes: r.get::<_, i64>(2).max(0) as u64,
            uploaded_at: r.get(3),
        })
        .collect();
    Ok(AdminResponse::Storage(StorageReport { tenants, largest }))
}

/// Jobs with their schedules, the newest runs and the newest dead letters.
async fn jobs(app: &App) -> Result<AdminResponse, ErrorBody> {
    let client = app.pool.get().await.map_err(db_unavailable)?;
    let runs = crate::jobs::recent_runs(&client, None, 50)
        .await
        .map_err(db_unavailable)?;
    let schedules = app.jobs.schedules();
    let jobs = app
        .jobs
        .jobs()
        .into_iter()
        .map(|name| JobInfo {
            name: name.to_string(),
            schedule: schedules
                .iter()
                .find(|(j, _)| j == name)
                .map(|(_, e)| e.clone())
                .unwrap_or_else(|| "(by hand)".into()),
            next_run: app.jobs.next_run(name),
            last_status: runs.iter().find(|r| r.job == name).map(|r| r.outcome.clone()),
        })
        .collect();
    let history = runs
        .iter()
        .map(|r| JobRun {
            job: r.job.clone(),
            started_at: r.started_at.clone(),
            duration_ms: Some((r.duration_secs * 1000.0) as u64),
            status: r.outcome.clone(),
            message: r.error.clone().unwrap_or_else(|| r.counts.to_string()),
        })
        .collect();
    let dead_letters = crate::relay::dead_letters(&client, 50)
        .await
        .map_err(db_unavailable)?
        .into_iter()
        .map(|d| DeadLetter {
            id: d.id.to_string(),
            source: d.event,
            reason: d.last_error,
            at: d.dead_at,
        })
        .collect();
    Ok(AdminResponse::Jobs(JobsReport {
        jobs,
        history,
        dead_letters,
    }))
}

/// The latest notifications, newest first, optionally of one tenant or user.
async fn notifications(
    app: &App,
    tenant: Option<String>,
    user: Option<String>,
    limit: u32,
) -> Result<AdminResponse, ErrorBody> {
    let client = app.pool.get().await.map_err(db_unavailable)?;
    let rows = client
        .query(
            "SELECT id, tenant, user_id, title,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    read_at IS NOT NULL
             FROM pulse.notifications
             WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR user_id = $2)
             ORDER BY id DESC LIMIT $3",
            &[&tenant, &user, &(limit as i64)],
        )
        .await
        .map_err(db_unavailable)?;
    let items = rows
        .iter()
        .map(|r| NotificationItem {
            id: r.get::<_, i64>(0).to_string(),
            tenant: r.get(1),
            user: r.get(2),
            title: r.get(3),
            created_at: r.get(4),
            read: r.get(5),
        })
        .collect();
    Ok(AdminResponse::Notifications { items })
}

/// Who is online, from the engine's hub (the lock is held only to copy).
fn presence(app: &App, tenant: Option<&str>) -> PresenceReport {
    let (online, counts) = {
        let hub = app.engine.hub.lock().expect("hub lock");
        (hub.online(tenant, None), hub.online_counts())
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let users = online["online"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|u| PresenceEntry {
                    tenant: text(&u["tenant"]),
                    user: text(&u["user"]),
                    resource: text(&u["resource"]),
                    state: text(&u["state"]),
                    // The hub does not report heartbeat ages.
                    last_seen_secs: None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut tenants: Vec<TenantPresence> = counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(tenant, n)| TenantPresence {
            tenant,
            online: n as u64,
        })
        .collect();
    tenants.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    PresenceReport { tenants, users }
}

/// Starts the live change feed for a session (the data explorer's capability): the
/// answer holds the kept changes after `after`; the [`crate::changefeed::Watch`] yields
/// each later push, which the session sends under the same `id`.
pub fn watch_changes(
    app: &App,
    principal: &Principal,
    id: &str,
    after: u64,
) -> Result<(crate::changefeed::Watch, AdminResponse), ErrorBody> {
    allowed(principal, Capability::Console, "the data explorer")?;
    Ok(app.changes.watch(id.to_string(), after))
}

/// How audit records name a console user on the admin socket: `console uid=N (name)`,
/// the name from the password database when it lists the id.
pub fn console_user(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|text| {
        text.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?;
            (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    });
    match name {
        Some(name) => format!("console uid={uid} ({name})"),
        None => format!("console uid={uid}"),
    }
}

/// Counts one function run (a query, a mutation) for the overview's function-error
/// rate. A run fails when the server could not carry it out (`unavailable`, `timeout`);
/// a refusal of the caller's input or rights is the caller's error, not the function's.
pub fn record_function(kind: &'static str, error: Option<&ErrorBody>) {
    metrics::counter!("pulse_functions_total", "kind" => kind).increment(1);
    if error.is_some_and(|e| matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout)) {
        metrics::counter!("pulse_function_errors_total", "kind" => kind).increment(1);
    }
}

/// Who the audit log names for a console edit: the socket's peer when known.
fn actor(principal: &Principal, peer: Option<&str>) -> String {
    if let Some(peer) = peer {
        return peer.to_string();
    }
    match &principal.user {
        Some(user) => format!("{user} (console)"),
        None => {
            let roles: Vec<&str> = principal.roles.iter().map(|r| r.as_str()).collect();
            format!("{} (console)", roles.join("+"))
        }
    }
}

async fn update_setting(
    app: &App,
    principal: &Principal,
    peer: Option<&str>,
    key: &str,
    value: &str,
) -> Result<SettingKey, ErrorBody> {
    let mut client = app.pool.get().await.map_err(db_unavailable)?;
    app.settings
        .update(&mut client, key, value, &actor(principal, peer))
        .await
        .map_err(|e| ErrorBody::new(e.code(), e.to_string()))
}

fn setting_entry(view: crate::settings::SettingView) -> SettingEntry {
    SettingEntry {
        key: view.key.as_str().to_string(),
        label: view.key.label().to_string(),
        kind: match view.key {
            SettingKey::DeploymentUrl => SettingKind::Url,
            SettingKey::DeployKey => SettingKind::Secret,
            SettingKey::EnableRealtime => SettingKind::Toggle,
            SettingKey::SyncIntervalMs => SettingKind::Millis,
        },
        value: view.shown,
        source: view.source,
    }
}

/// The median of a Prometheus histogram from its cumulative buckets, per label set (the
/// `le` label removed), the worst over all sets; `None` when nothing was observed.
fn bucket_median(samples: &[(&str, &str, f64)], bucket: &str) -> Option<f64> {
    let mut sets: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for (_, labels, count) in samples.iter().filter(|(n, _, _)| *n == bucket) {
        let mut le = None;
        let mut rest = Vec::new();
        for pair in labels.split(',') {
            match pair.strip_prefix("le=") {
                Some(v) => le = v.trim_matches('"').parse::<f64>().ok(),
                None => rest.push(pair),
            }
        }
        if let Some(le) = le {
            sets.entry(rest.join(",")).or_default().push((le, *count));
        }
    }
    sets.into_values()
        .filter_map(|mut buckets| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let total = buckets.last()?.1;
            if total <= 0.0 {
                return None;
            }
            let half = total / 2.0;
            let (mut lower, mut below) = (0.0, 0.0);
            for (le, count) in buckets {
                if count >= half {
                    if le.is_infinite() {
                        return Some(lower);
                    }
                    let within = count - below;
                    let frac = if within > 0.0 {
                        (half - below) / within
                    } else {
                        1.0
                    };
                    return Some(lower + (le - lower) * frac);
                }
                (lower, below) = (le, count);
            }
            None
        })
        .reduce(f64::max)
}

/// Reads the figures the overview needs from the Prometheus rendering, by metric name,
/// so the console picks up what subsystems record without depending on them. Whatever
/// this build does not record stays `None`.
pub fn metrics_sample(rendered: &str) -> MetricsSample {
    // Each sample line: `name{labels} value` or `name value`.
    let samples = rendered
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse::<f64>().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name, labels, value))
        });
    let samples: Vec<(&str, &str, f64)> = samples.collect();
    let sum = |name: &str| -> Option<f64> {
        samples
            .iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, _, v)| *v)
            .reduce(|a, b| a + b)
    };
    // A histogram renders as a summary (quantile lines) or, when buckets are configured,
    // as cumulative `_bucket{le=…}` lines: take the quantile when there is one, else the
    // median estimated from the buckets (linear within the bucket that holds it). Over
    // several label sets, the worst median.
    let p50_ms = |name: &str| -> Option<f64> {
        let quantile = samples
            .iter()
            .filter(|(n, l, _)| *n == name && l.contains("quantile=\"0.5\""))
            .map(|(_, _, v)| v * 1000.0)
            .reduce(f64::max);
        quantile.or_else(|| bucket_median(&samples, &format!("{name}_bucket")).map(|s| s * 1000.0))
    };
    let requests = match (
        sum("pulse_query_latency_seconds_count"),
        sum("pulse_mutation_latency_seconds_count"),
    ) {
        (None, None) => None,
        (q, m) => Some((q.unwrap_or(0.0) + m.unwrap_or(0.0)) as u64),
    };
    // Function runs: queries and mutations (counted by `record_function`) and job runs;
    // this build measures them, so zero before the first run, never "unknown".
    let job_failures: f64 = samples
        .iter()
        .filter(|(n, l, _)| *n == "pulse_job_runs_total" && !l.contains("outcome=\"ok\""))
        .map(|(_, _, v)| v)
        .sum();
    let functions = sum("pulse_functions_total").unwrap_or(0.0) + sum("pulse_job_runs_total").unwrap_or(0.0);
    let function_errors = sum("pulse_function_errors_total").unwrap_or(0.0) + job_failures;
    MetricsSample {
        connections: sum("pulse_connections_active").unwrap_or(0.0).max(0.0) as u64,
        errors_total: sum("pulse_errors_total").unwrap_or(0.0) as u64,
        requests_total: requests,
        changes_total: sum("pulse_replication_batches_total").map(|v| v as u64),
        query_p50_ms: p50_ms("pulse_query_latency_seconds"),
        mutation_p50_ms: p50_ms("pulse_mutation_latency_seconds"),
        functions_total: Some(functions as u64),
        function_errors_total: Some(function_errors as u64),
        storage_max_quota_pct: None,
    }
}

/// The fullest tenant's storage against its quota, percent; `None` when no tenant has a
/// quota (nothing to measure against) or the state database does not answer.
async fn storage_max_quota_pct(app: &App) -> Option<f64> {
    let config = app.config();
    let cx = crate::files::Ctx {
        files: &app.files,
        pool: &app.pool,
        config: &config,
    };
    let usage = tokio::time::timeout(Duration::from_secs(2), crate::files::storage_usage(&cx, None))
        .await
        .ok()?
        .ok()?;
    let worst = usage
        .iter()
        .filter_map(|u| {
            u.quota_bytes
                .filter(|q| *q > 0)
                .map(|q| u.used_bytes as f64 * 100.0 / q as f64)
        })
        .reduce(f64::max);
    // No tenant stored anything yet, but a default quota exists: nobody is over it.
    worst.or_else(|| config.files.quota_bytes.filter(|q| *q > 0).map(|_| 0.0))
}

fn source_unavailable(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Unavailable,
        format!("source database: {e}; check source.url and that PostgreSQL is running"),
    )
}

fn db_unavailable(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Unavailable,
        format!("state database: {e}; check that PostgreSQL is running"),
    )
}

async fn with_db<F>(work: F) -> Result<AdminResponse, ErrorBody>
where
    F: Future<Output = Result<AdminResponse, ErrorBody>>,
{
    tokio::time::timeout(DB_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(db_unavailable("no answer within 5 s")))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn tables(app: &App) -> Result<AdminResponse, ErrorBody> {
    let client = app.pool.get().await.map_err(db_unavailable)?;
    let rows = client
        .query(
            "SELECT c.relname::text, c.reltuples, pg_total_relation_size(c.oid)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'pulse' AND c.relkind IN ('r', 'p') ORDER BY 1",
            &[],
        )
        .await
        .map_err(db_unavailable)?;
    let mut tables = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.get(0);
        let estimate: f32 = row.get(1);
        let count = if estimate > EXACT_COUNT_LIMIT {
            estimate as i64
        } else {
            client
                .query_one(&format!("SELECT count(*) FROM pulse.{}", quote_ident(&name)), &[])
                .await
                .map_err(db_unavailable)?
                .get(0)
        };
        tables.push(TableInfo {
            name: format!("pulse.{name}"),
            rows: count,
            bytes: row.get(2),
        });
    }
    Ok(AdminResponse::Tables { tables })
}

async fn table_rows(app: &App, table: &str, limit: u32) -> Result<AdminResponse, ErrorBody> {
    let name = table.strip_prefix("pulse.").unwrap_or(table);
    let client = app.pool.get().await.map_err(db_unavailable)?;
    // Only names the catalog lists as tables of the pulse schema reach the SQL text.
    let oid: Option<u32> = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'pulse' AND c.relkind IN ('r', 'p') AND c.relname = $1",
            &[&name],
        )
        .await
        .map_err(db_unavailable)?
        .map(|r| r.get(0));
    let Some(oid) = oid else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no table {name:?} in the pulse schema; the Tables list names them"),
        ));
    };
    let columns: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(db_unavailable)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let key: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(db_unavailable)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let order = if key.is_empty() {
        String::new()
    } else {
        let cols: Vec<String> = key.iter().map(|k| format!("{} DESC", quote_ident(k))).collect();
        format!("ORDER BY {}", cols.join(", "))
    };
    let sql = format!(
        "SELECT to_jsonb(t) FROM pulse.{} t {order} LIMIT {limit}",
        quote_ident(name)
    );
    let found = client.query(&sql, &[]).await.map_err(db_unavailable)?;
    let rows = found
        .iter()
        .map(|r| {
            let obj: serde_json::Value = r.get(0);
            // The settings table holds the deploy key's digest: still not for display.
            let secret_row = name == "settings" && obj["key"] == SettingKey::DeployKey.as_str();
            columns
                .iter()
                .map(|c| match &obj[c] {
                    _ if secret_row && c == "value" => "***".to_string(),
                    serde_json::Value::Null => "NULL".to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    Ok(AdminResponse::TableRows(TableRows {
        table: format!("pulse.{name}"),
        columns,
        rows,
        offset: 0,
    }))
}

/// A connection to the source database. Console reads run in a read-only transaction
/// with a statement timeout, so none keeps a query running on Symfony's database after
/// the console gave up.
async fn on_source(app: &App) -> Result<deadpool_postgres::Object, ErrorBody> {
    let client = app.source.get().await.map_err(source_unavailable)?;
    Ok(client)
}

/// The live tables of the schema file with their rows per tenant, from the source
/// database; a table the planner puts past [`EXACT_COUNT_LIMIT`] rows shows the
/// estimate instead of being counted.
async fn live_tables(app: &App) -> Result<AdminResponse, ErrorBody> {
    let mut client = on_source(app).await?;
    let tx = client.transaction().await.map_err(source_unavailable)?;
    tx.batch_execute("SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = 5000")
        .await
        .map_err(source_unavailable)?;
    let mut tables = Vec::new();
    for t in app.engine.schema.tables.values() {
        let estimate: f32 = tx
            .query_opt(
                "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.source.schema, &t.source.table],
            )
            .await
            .map_err(source_unavailable)?
            .map_or(0.0, |r| r.get(0));
        let mut info = LiveTableInfo {
            name: t.name.clone(),
            source: t.source.to_string(),
            tenant_column: t.tenant_column.clone(),
            rows: estimate.max(0.0) as i64,
            estimated: estimate > EXACT_COUNT_LIMIT,
            tenants: Vec::new(),
        };
        if !info.estimated {
            let counts = tx
                .query(
                    &format!(
                        "SELECT coalesce({}::text, 'NULL'), count(*) FROM {} GROUP BY 1 ORDER BY 2 DESC, 1",
                        quote_ident(&t.tenant_column),
                        t.source.quoted()
                    ),
                    &[],
                )
                .await
                .map_err(source_unavailable)?;
            info.tenants = counts
                .iter()
                .map(|r| TenantRows {
                    tenant: r.get(0),
                    rows: r.get(1),
                })
                .collect();
            info.rows = info.tenants.iter().map(|t| t.rows).sum();
        }
        tables.push(info);
    }
    tx.commit().await.map_err(source_unavailable)?;
    Ok(AdminResponse::LiveTables { tables })
}

/// One page of a live table's rows from the source database, newest key first: the
/// key and the visible columns of the schema file, long values cut, secret-looking
/// columns masked.
async fn live_rows(
    app: &App,
    name: &str,
    tenant: Option<String>,
    offset: u32,
    limit: u32,
) -> Result<AdminResponse, ErrorBody> {
    let Some(t) = app.engine.schema.tables.get(name) else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no live table {name:?} in the schema file; the live tables list names them"),
        ));
    };
    // Only names from the checked schema file reach the SQL text, quoted.
    let mut columns: Vec<String> = t.key.clone();
    columns.extend(t.columns.iter().filter(|c| !t.key.contains(c)).cloned());
    let select: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let order = if t.key.is_empty() {
        String::new()
    } else {
        let keys: Vec<String> = t.key.iter().map(|k| format!("{} DESC", quote_ident(k))).collect();
        format!("ORDER BY {}", keys.join(", "))
    };
    let sql = format!(
        "SELECT to_jsonb(r) FROM (SELECT {} FROM {} WHERE $1::text IS NULL OR {}::text = $1 {order} \
         LIMIT {limit} OFFSET {offset}) r",
        select.join(", "),
        t.source.quoted(),
        quote_ident(&t.tenant_column),
    );
    let mut client = on_source(app).await?;
    let tx = client.transaction().await.map_err(source_unavailable)?;
    tx.batch_execute("SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = 5000")
        .await
        .map_err(source_unavailable)?;
    let found = tx.query(&sql, &[&tenant]).await.map_err(source_unavailable)?;
    tx.commit().await.map_err(source_unavailable)?;
    let rows = found
        .iter()
        .map(|r| {
            let obj: serde_json::Value = r.get(0);
            columns
                .iter()
                .map(|c| match &obj[c] {
                    serde_json::Value::Null => "NULL".to_string(),
                    _ if crate::changefeed::is_secret(c) => "***".to_string(),
                    serde_json::Value::String(s) => crate::changefeed::cut(s),
                    other => crate::changefeed::cut(&other.to_string()),
                })
                .collect()
        })
        .collect();
    Ok(AdminResponse::TableRows(TableRows {
        table: t.name.clone(),
        columns,
        rows,
        offset,
    }))
}

/// Slots and senders of the source cluster, read through the source database (the
/// state database may be on another cluster).
async fn replication(app: &App) -> Result<AdminResponse, ErrorBody> {
    let client = app.source.get().await.map_err(source_unavailable)?;
    let current_lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(source_unavailable)?
        .get(0);
    let slots = client
        .query(
            "SELECT slot_name::text, coalesce(plugin::text, ''), coalesce(database::text, ''), active,
                    restart_lsn::text, confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                    wal_status
             FROM pg_replication_slots ORDER BY slot_name",
            &[],
        )
        .await
        .map_err(source_unavailable)?
        .iter()
        .map(|r| SlotInfo {
            name: r.get(0),
            plugin: r.get(1),
            database: r.get(2),
            active: r.get(3),
            restart_lsn: r.get(4),
            confirmed_flush_lsn: r.get(5),
            lag_bytes: r.get(6),
            retained_bytes: r.get(7),
            wal_status: r.get(8),
        })
        .collect();
    let senders = client
        .query(
            "SELECT coalesce(application_name, ''), coalesce(state, ''), sent_lsn::text, flush_lsn::text,
                    (extract(epoch FROM flush_lag) * 1000)::float8
             FROM pg_stat_replication ORDER BY pid",
            &[],
        )
        .await
        .map_err(source_unavailable)?
        .iter()
        .map(|r| SenderInfo {
            application: r.get(0),
            state: r.get(1),
            sent_lsn: r.get(2),
            flush_lsn: r.get(3),
            flush_lag_ms: r.get(4),
        })
        .collect();
    Ok(AdminResponse::Replication(ReplicationReport {
        current_lsn,
        slots,
        senders,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_from_the_rendering() {
        let text = "# TYPE pulse_connections_active gauge\npulse_connections_active 3\n\
                    pulse_errors_total{code=\"forbidden\"} 2\npulse_errors_total{code=\"not_found\"} 5\n\
                    pulse_connections_active_peak 99\n";
        let m = metrics_sample(text);
        assert_eq!(m.connections, 3);
        assert_eq!(m.errors_total, 7);
        assert_eq!(m.query_p50_ms, None);
        assert_eq!(m.requests_total, None);

        let buckets = "pulse_mutation_latency_seconds_bucket{name=\"notify\",le=\"0.001\"} 0\n\
                       pulse_mutation_latency_seconds_bucket{name=\"notify\",le=\"0.01\"} 10\n\
                       pulse_mutation_latency_seconds_bucket{name=\"notify\",le=\"+Inf\"} 10\n";
        let m = metrics_sample(buckets);
        let p50 = m.mutation_p50_ms.expect("a median from buckets");
        assert!((p50 - 5.5).abs() < 1e-9, "{p50}");
        assert_eq!(metrics_sample("").mutation_p50_ms, None);
        let text = "pulse_query_latency_seconds{table=\"a\",quantile=\"0.5\"} 0.002\n\
                    pulse_query_latency_seconds{table=\"b\",quantile=\"0.5\"} 0.004\n\
                    pulse_query_latency_seconds{table=\"b\",quantile=\"0.99\"} 0.9\n\
                    pulse_query_latency_seconds_count{table=\"a\"} 10\n\
                    pulse_mutation_latency_seconds_count 5\n";
        let m = metrics_sample(text);
        assert_eq!(m.query_p50_ms, Some(4.0));
        assert_eq!(m.mutation_p50_ms, None);
        assert_eq!(m.requests_total, Some(15));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
