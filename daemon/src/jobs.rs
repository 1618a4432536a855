//! Scheduled jobs: cron schedules from the config, one run of a job at a time across
//! every instance, a time limit, and a record of each run in `pulse.job_runs`.
//!
//! Every run (scheduled or from the console's "run now") takes the job's PostgreSQL
//! advisory lock first; an instance that does not get it skips that run, so two pulsed
//! processes never run the same job at once. A run that passes its time limit
//! (`limits.job_timeout_secs`, 60 s by default) is stopped (its statement cancelled, its
//! connection discarded) and recorded with the outcome `timeout`. A failed or timed-out
//! run also sends a `job.failed` event, written in the transaction that records the run.
//!
//! The [`Registry`] is open: each subsystem registers its own jobs (sweep stale presence,
//! notification retention, orphaned files, upload tickets) beside the built-in ones; a
//! job is scheduled when the config gives it a schedule under `jobs.<name>`.
//!
//! This module never decides what a job deletes; each [`Job`] owns its own SQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use pulse_shared::caps::{self, Capability, Principal, Target};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::outbox::{self, OutboxEvent};

/// What a job run gets: its own database connection, discarded if the run times out.
pub struct JobContext {
    /// The run's connection (a pooled one).
    pub client: deadpool_postgres::Object,
    /// The run record's id.
    pub run_id: i64,
}

/// A job: a name and what a run does. Returns counts for the run record
/// (for example `{"deleted": 12}`) or an error message.
pub trait Job: Send + Sync {
    /// Stable name: the `jobs.<name>` config key, the console's label, the lock's key.
    fn name(&self) -> &'static str;

    /// One run.
    fn run<'a>(&'a self, ctx: &'a mut JobContext) -> BoxFuture<'a, Result<Value, String>>;
}

/// The jobs this daemon knows, by name.
#[derive(Default, Clone)]
pub struct Registry {
    jobs: BTreeMap<&'static str, Arc<dyn Job>>,
}

impl Registry {
    /// Adds a job; a second job with the same name replaces the first.
    pub fn register(&mut self, job: Arc<dyn Job>) {
        self.jobs.insert(job.name(), job);
    }

    /// The job called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Job>> {
        self.jobs.get(name).cloned()
    }

    /// Every job name.
    pub fn names(&self) -> Vec<&'static str> {
        self.jobs.keys().copied().collect()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Done.
    Ok,
    /// The job returned an error.
    Failed,
    /// Stopped at the time limit.
    Timeout,
}

impl JobOutcome {
    /// As stored and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Ok => "ok",
            JobOutcome::Failed => "failed",
            JobOutcome::Timeout => "timeout",
        }
    }
}

/// The record of one finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// `pulse.job_runs.id`.
    pub id: i64,
    /// The job.
    pub job: String,
    /// How it ended.
    pub outcome: JobOutcome,
    /// What it counted.
    pub counts: Value,
    /// Why it failed.
    pub error: Option<String>,
    /// How long it ran.
    pub duration: Duration,
}

/// Why a run did not happen.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No job by that name.
    #[error("unknown job {name:?}; the jobs are {known}")]
    Unknown {
        /// Asked for.
        name: String,
        /// Known jobs, comma-separated.
        known: String,
    },
    /// Another run holds the job's lock (on this or another instance).
    #[error("job {0} is already running; try again when it has finished")]
    AlreadyRunning(String),
    /// The principal may not run jobs.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// The state database failed.
    #[error("state database: {0}")]
    Db(String),
}

impl JobError {
    /// The client error code.
    pub fn code(&self) -> pulse_shared::ErrorCode {
        use pulse_shared::ErrorCode;
        match self {
            JobError::Unknown { .. } => ErrorCode::NotFound,
            JobError::AlreadyRunning(_) => ErrorCode::Unavailable,
            JobError::Forbidden(_) => ErrorCode::Forbidden,
            JobError::Db(_) => ErrorCode::Unavailable,
        }
    }
}

/// Runs jobs: on their schedules, and on demand.
pub struct Scheduler {
    pool: deadpool_postgres::Pool,
    registry: Registry,
    /// (job, expression, parsed) for each scheduled job.
    schedules: Vec<(String, String, croner::Cron)>,
    timeout: Duration,
    /// Who starts scheduled runs: host:pid.
    instance: String,
    /// How to reach the server to cancel a timed-out job's query: the pool's own TLS
    /// settings (a cancel request opens a new connection).
    cancel_tls: Option<pulse_cdc::tls::MakeTls>,
}

fn lock_key_sql() -> &'static str {
    "hashtextextended('pulse.job.' || $1, 0)"
}

impl Scheduler {
    /// A scheduler over `registry`. Schedules naming unknown jobs are refused.
    pub fn new(
        pool: deadpool_postgres::Pool,
        registry: Registry,
        schedules: &[(String, String)],
        timeout: Duration,
    ) -> Result<Scheduler, String> {
        let mut parsed = Vec::new();
        for (job, expr) in schedules {
            if registry.get(job).is_none() {
                return Err(format!(
                    "jobs.{job} schedules a job this pulsed does not have; the jobs are {}",
                    registry.names().join(", ")
                ));
            }
            let cron = expr
                .parse::<croner::Cron>()
                .map_err(|e| format!("jobs.{job}: invalid cron expression {expr:?}: {e}"))?;
            parsed.push((job.clone(), expr.clone(), cron));
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        Ok(Scheduler {
            pool,
            registry,
            schedules: parsed,
            timeout,
            instance: format!("{host}:{}", std::process::id()),
            cancel_tls: None,
        })
    }

    /// Cancels timed-out queries over `tls`, the TLS settings of the pool's database
    /// (without it, cancel requests go in the clear and fail against a TLS-only server).
    pub fn with_cancel_tls(mut self, tls: pulse_cdc::tls::MakeTls) -> Scheduler {
        self.cancel_tls = Some(tls);
        self
    }

    /// The registered job names.
    pub fn jobs(&self) -> Vec<&'static str> {
        self.registry.names()
    }

    /// The schedules in force: (job, cron expression).
    pub fn schedules(&self) -> Vec<(String, String)> {
        self.schedules
            .iter()
            .map(|(j, e, _)| (j.clone(), e.clone()))
            .collect()
    }

    /// When `job` runs next on its schedule (RFC 3339, UTC); `None` when unscheduled.
    pub fn next_run(&self, job: &str) -> Option<String> {
        let (_, _, cron) = self.schedules.iter().find(|(j, _, _)| j == job)?;
        cron.find_next_occurrence(&chrono::Utc::now(), false)
            .ok()
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
    }

    /// Starts one task per schedule; they stop with `shutdown`.
    pub fn spawn(self: &Arc<Self>, tasks: &TaskTracker, shutdown: CancellationToken) {
        metrics::describe_histogram!(
            "pulse_job_duration_seconds",
            "Duration of job runs, by job, in seconds."
        );
        metrics::describe_counter!(
            "pulse_job_runs_total",
            "Job runs, by job and outcome (ok, failed, timeout)."
        );
        metrics::describe_counter!(
            "pulse_job_skipped_total",
            "Scheduled runs skipped because another run (on any instance) held the job's lock."
        );
        for (job, expr, cron) in &self.schedules {
            let this = self.clone();
            let job = job.clone();
            let cron = cron.clone();
            let shutdown = shutdown.clone();
            tracing::info!(job, schedule = %expr, "job scheduled");
            tasks.spawn(async move { this.schedule_loop(&job, &cron, &shutdown).await });
        }
    }

    async fn schedule_loop(&self, job: &str, cron: &croner::Cron, shutdown: &CancellationToken) {
        loop {
            let now = chrono::Utc::now();
            let next = match cron.find_next_occurrence(&now, false) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(job, error = %e, "schedule has no next occurrence; job stops");
                    return;
                }
            };
            let wait = (next - now).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            match self.run_once(job, "schedule", &self.instance).await {
                Ok(r) => tracing::info!(job, outcome = r.outcome.as_str(), counts = %r.counts, "job run"),
                Err(JobError::AlreadyRunning(_)) => {
                    metrics::counter!("pulse_job_skipped_total", "job" => job.to_string()).increment(1);
                    tracing::debug!(job, "job run skipped: another run holds its lock");
                }
                Err(e) => tracing::warn!(job, error = %e, "job run did not start"),
            }
        }
    }

    /// Runs `name` now for the console: checks the capability, audits, runs, and returns
    /// the record (outcome `failed` or `timeout` included).
    pub async fn run_now(
        &self,
        name: &str,
        principal: &Principal,
        actor: &str,
    ) -> Result<RunRecord, JobError> {
        if let caps::Decision::Denied(reason) =
            caps::authorize(principal, Capability::RunJob, &Target::default())
        {
            return Err(JobError::Forbidden(reason.explain()));
        }
        if self.registry.get(name).is_none() {
            return Err(self.unknown(name));
        }
        {
            let client = self.pool.get().await.map_err(|e| JobError::Db(e.to_string()))?;
            client
                .execute(
                    "INSERT INTO pulse.audit_log (actor, action, target) VALUES ($1, 'job.run_now', $2)",
                    &[&actor, &name],
                )
                .await
                .map_err(|e| JobError::Db(e.to_string()))?;
        }
        self.run_once(name, "manual", actor).await
    }

    fn unknown(&self, name: &str) -> JobError {
        JobError::Unknown {
            name: name.to_string(),
            known: self.registry.names().join(", "),
        }
    }

    /// One run under the job's lock. `Err(AlreadyRunning)` when another run holds it.
    pub async fn run_once(&self, name: &str, trigger: &str, started_by: &str) -> Result<RunRecord, JobError> {
        let job = self.registry.get(name).ok_or_else(|| self.unknown(name))?;
        let db = |e: tokio_postgres::Error| JobError::Db(e.to_string());
        let pool_err = |e: deadpool_postgres::PoolError| JobError::Db(e.to_string());
        let lock = self.pool.get().await.map_err(pool_err)?;
        let locked: bool = lock
            .query_one(
                &format!("SELECT pg_try_advisory_lock({})", lock_key_sql()),
                &[&name],
            )
            .await
            .map_err(db)?
            .get(0);
        if !locked {
            return Err(JobError::AlreadyRunning(name.to_string()));
        }
        let result = self.run_locked(&*job, &lock, trigger, started_by).await;
        let unlocked = lock
            .query_one(
                &format!("SELECT pg_advisory_unlock({})", lock_key_sql()),
                &[&name],
            )
            .await;
        if !matches!(unlocked, Ok(ref r) if r.get::<_, bool>(0)) {
            // Never return a connection that may still hold the lock to the pool.
            let _ = deadpool_postgres::Object::take(lock);
        }
        result
    }

    async fn run_locked(
        &self,
        job: &dyn Job,
        lock: &tokio_postgres::Client,
        trigger: &str,
        started_by: &str,
    ) -> Result<RunRecord, JobError> {
        let name = job.name();
        let db = |e: tokio_postgres::Error| JobError::Db(e.to_string());
        // We hold the lock: a run still marked running was left by an instance that died.
        lock.execute(
            "UPDATE pulse.job_runs SET outcome = 'failed', ended_at = clock_timestamp(),
                    error = 'the instance running it stopped before it finished'
              WHERE job = $1 AND outcome = 'running'",
            &[&name],
        )
        .await
        .map_err(db)?;
        let run_id: i64 = lock
            .query_one(
                "INSERT INTO pulse.job_runs (job, trigger, started_by) VALUES ($1, $2, $3) RETURNING id",
                &[&name, &trigger, &started_by],
            )
            .await
            .map_err(db)?
            .get(0);
        let started = Instant::now();
        let client = self.pool.get().await.map_err(|e| JobError::Db(e.to_string()))?;
        let cancel = client.cancel_token();
        let mut ctx = JobContext { client, run_id };
        let outcome = tokio::time::timeout(self.timeout, job.run(&mut ctx)).await;
        let (outcome, counts, error) = match outcome {
            Ok(Ok(counts)) => (JobOutcome::Ok, counts, None),
            Ok(Err(e)) => (JobOutcome::Failed, json!({}), Some(e)),
            Err(_) => {
                // Stop what the job was doing in the database, and throw its connection
                // away rather than hand a busy one back to the pool.
                let cancelled = match &self.cancel_tls {
                    Some(tls) => cancel.cancel_query(tls.clone()).await,
                    None => cancel.cancel_query(tokio_postgres::NoTls).await,
                };
                if let Err(e) = cancelled {
                    tracing::warn!(job = name, "could not cancel the timed-out job's query: {e}");
                }
                let _ = deadpool_postgres::Object::take(ctx.client);
                (
                    JobOutcome::Timeout,
                    json!({}),
                    Some(format!("ran past its time limit of {} s", self.timeout.as_secs())),
                )
            }
        };
        let duration = started.elapsed();
        metrics::histogram!("pulse_job_duration_seconds", "job" => name).record(duration.as_secs_f64());
        metrics::counter!("pulse_job_runs_total", "job" => name, "outcome" => outcome.as_str()).increment(1);
        self.finish(run_id, name, outcome, &counts, error.as_deref())
            .await?;
        if let Some(e) = &error {
            tracing::warn!(job = name, outcome = outcome.as_str(), error = %e, "job run did not succeed");
        }
        Ok(RunRecord {
            id: run_id,
            job: name.to_string(),
            outcome,
            counts,
            error,
            duration,
        })
    }

    /// Records the end of a run, and for a failure its `job.failed` event, in one
    /// transaction.
    async fn finish(
        &self,
        run_id: i64,
        name: &str,
        outcome: JobOutcome,
        counts: &Value,
        error: Option<&str>,
    ) -> Result<(), JobError> {
        let db = |e: tokio_postgres::Error| JobError::Db(e.to_string());
        let mut client = self.pool.get().await.map_err(|e| JobError::Db(e.to_string()))?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute(
            "UPDATE pulse.job_runs SET ended_at = clock_timestamp(), outcome = $2, counts = $3, error = $4 WHERE id = $1",
            &[&run_id, &outcome.as_str(), counts, &error],
        )
        .await
        .map_err(db)?;
        if outcome != JobOutcome::Ok {
            let event = OutboxEvent::new(
                "job.failed",
                format!("job:{run_id}"),
                format!("job:{name}"),
                json!({
                    "job": name,
                    "runId": run_id,
                    "outcome": outcome.as_str(),
                    "error": error.unwrap_or_default(),
                }),
            )
            .map_err(|e| JobError::Db(e.to_string()))?;
            outbox::enqueue(&*tx, &event)
                .await
                .map_err(|e| JobError::Db(e.to_string()))?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }
}

/// One run as the console lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    /// `pulse.job_runs.id`.
    pub id: i64,
    /// The job.
    pub job: String,
    /// `schedule` or `manual`.
    pub trigger: String,
    /// The instance or the actor.
    pub started_by: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Seconds it ran (so far, when still running).
    pub duration_secs: f64,
    /// `running`, `ok`, `failed` or `timeout`.
    pub outcome: String,
    /// What it counted.
    pub counts: Value,
    /// Why it failed.
    pub error: Option<String>,
}

/// The newest runs, all jobs or one, for the console.
pub async fn recent_runs(
    client: &tokio_postgres::Client,
    job: Option<&str>,
    limit: i64,
) -> Result<Vec<RunRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, job, trigger, started_by,
                    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    EXTRACT(EPOCH FROM COALESCE(ended_at, clock_timestamp()) - started_at)::float8,
                    outcome, counts, error
               FROM pulse.job_runs
              WHERE $1::text IS NULL OR job = $1
              ORDER BY started_at DESC, id DESC
              LIMIT $2",
            &[&job, &limit],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| RunRow {
            id: r.get(0),
            job: r.get(1),
            trigger: r.get(2),
            started_by: r.get(3),
            started_at: r.get(4),
            duration_secs: r.get(5),
            outcome: r.get(6),
            counts: r.get(7),
            error: r.get(8),
        })
        .collect())
}

/// Deletes delivered outbox rows older than the retention, and the records of commands
/// processed before it (a redelivery comes within minutes, not days). Without a broker,
/// undelivered rows older than the retention are deleted too: nothing would ever send
/// them.
pub struct PruneOutbox {
    /// How long delivered rows are kept.
    pub retention: Duration,
    /// Whether a broker is configured.
    pub broker: bool,
}

impl Job for PruneOutbox {
    fn name(&self) -> &'static str {
        "prune_outbox"
    }

    fn run<'a>(&'a self, ctx: &'a mut JobContext) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let secs = self.retention.as_secs_f64();
            let mut deleted = 0u64;
            // In slices, so that no statement holds many row locks for long.
            loop {
                let n = ctx
                    .client
                    .execute(
                        "DELETE FROM pulse.outbox WHERE id IN (
                             SELECT id FROM pulse.outbox
                              WHERE (delivered_at IS NOT NULL OR NOT $2)
                                AND COALESCE(delivered_at, created_at) < now() - make_interval(secs => $1::float8)
                              LIMIT 5000)",
                        &[&secs, &self.broker],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                deleted += n;
                if n < 5000 {
                    break;
                }
            }
            let commands = ctx
                .client
                .execute(
                    "DELETE FROM pulse.processed_commands
                      WHERE processed_at < now() - make_interval(secs => greatest($1::float8, 7 * 86400.0::float8))",
                    &[&secs],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(json!({ "deleted": deleted, "processed_commands_deleted": commands }))
        })
    }
}

/// The built-in jobs.
pub fn builtin(config: &crate::Config) -> Registry {
    let mut registry = Registry::default();
    registry.register(Arc::new(PruneOutbox {
        retention: config.jobs.outbox_retention,
        broker: config.amqp.is_some(),
    }));
    registry
}

/// Sweeps presence tabs silent past `limits.presence_ttl_secs` (the engine also does it
/// every half second; the job makes the sweep visible and recorded).
pub struct SweepPresence {
    /// The engine holding presence.
    pub engine: Arc<crate::engine::Engine>,
}

impl Job for SweepPresence {
    fn name(&self) -> &'static str {
        "sweep_presence"
    }

    fn run<'a>(&'a self, _ctx: &'a mut JobContext) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let removed = self.engine.sweep_presence();
            let events = self
                .engine
                .flush_presence_events()
                .await
                .map_err(|e| e.to_string())?;
            Ok(json!({ "removed": removed, "events": events }))
        })
    }
}

/// Deletes notifications past the schema's `notification_retention_days`.
pub struct NotificationRetention {
    /// The engine (which knows the retention).
    pub engine: Arc<crate::engine::Engine>,
}

impl Job for NotificationRetention {
    fn name(&self) -> &'static str {
        "notification_retention"
    }

    fn run<'a>(&'a self, ctx: &'a mut JobContext) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let deleted = self
                .engine
                .enforce_notification_retention(&**ctx.client)
                .await
                .map_err(|e| e.to_string())?;
            Ok(json!({ "deleted": deleted }))
        })
    }
}

/// The file storage's cleanup, in two jobs with their own schedules:
/// `expire_upload_tickets` (expired tickets, stale reservations) and
/// `delete_orphaned_files` (files whose Symfony row is gone, objects no row names,
/// staged leftovers).
pub struct FileCleanup {
    /// The job's name.
    pub name: &'static str,
    /// Storage.
    pub files: Arc<crate::files::Files>,
    /// The state database.
    pub pool: deadpool_postgres::Pool,
    /// The configuration at start.
    pub config: Arc<crate::Config>,
    /// How old unfinished uploads must be ([`crate::files::STALE_UPLOAD`]).
    pub stale: Duration,
}

impl Job for FileCleanup {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run<'a>(&'a self, _ctx: &'a mut JobContext) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let cx = crate::files::Ctx {
                files: &self.files,
                pool: &self.pool,
                config: &self.config,
            };
            let report = if self.name == "expire_upload_tickets" {
                crate::files::expire_upload_tickets(&cx, self.stale).await
            } else {
                crate::files::delete_orphaned_files(&cx, self.stale).await
            }
            .map_err(|e| e.to_string())?;
            serde_json::to_value(report).map_err(|e| e.to_string())
        })
    }
}

/// Registers the jobs of the engine and the file storage.
pub fn register_wired(
    registry: &mut Registry,
    config: &crate::Config,
    engine: &Arc<crate::engine::Engine>,
    files: &Arc<crate::files::Files>,
    pool: &deadpool_postgres::Pool,
) {
    registry.register(Arc::new(SweepPresence {
        engine: engine.clone(),
    }));
    registry.register(Arc::new(NotificationRetention {
        engine: engine.clone(),
    }));
    let config = Arc::new(config.clone());
    for name in ["expire_upload_tickets", "delete_orphaned_files"] {
        registry.register(Arc::new(FileCleanup {
            name,
            files: files.clone(),
            pool: pool.clone(),
            config: config.clone(),
            stale: crate::files::STALE_UPLOAD,
        }));
    }
}
