//! Scheduled jobs: time limits, one run at a time across instances and processes, run
//! records, "run now" permissions, and the built-in prune_outbox job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use pulse_daemon::config::DbUrl;
use pulse_daemon::jobs::{
    Job, JobContext, JobError, JobOutcome, PruneOutbox, Registry, RunRecord, Scheduler,
};
use pulse_harness::{PgCluster, Pulsed, TestDb, wait_for};
use pulse_shared::caps::{Principal, Role};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::{column, pairs, pulsed_bin};

/// A job that sleeps in the database, like a slow cleanup would.
struct Sleep {
    name: &'static str,
    secs: f64,
}

impl Job for Sleep {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run<'a>(&'a self, ctx: &'a mut JobContext) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            ctx.client
                .execute("SELECT pg_sleep($1)", &[&self.secs])
                .await
                .map_err(|e| e.to_string())?;
            Ok(json!({ "slept": self.secs }))
        })
    }
}

/// A [`Sleep`] job.
fn sleep(name: &'static str, secs: f64) -> Arc<dyn Job> {
    Arc::new(Sleep { name, secs })
}

async fn scheduler(db: &TestDb, jobs: Vec<Arc<dyn Job>>, timeout: Duration) -> Scheduler {
    let mut client = db.connect().await.unwrap();
    pulse_daemon::migrate::migrate(&mut client).await.unwrap();
    let pool = pulse_daemon::db::pool(&DbUrl::parse(&db.url()).unwrap(), 4).unwrap();
    let mut registry = Registry::default();
    for j in jobs {
        registry.register(j);
    }
    Scheduler::new(pool, registry, &[], timeout).unwrap()
}

/// Runs `job` by hand and checks that it ended well.
async fn run_ok(s: &Scheduler, job: &str) -> RunRecord {
    let run = s.run_once(job, "manual", "test").await.unwrap();
    assert_eq!(run.outcome, JobOutcome::Ok, "{job}: {:?}", run.error);
    run
}

fn service() -> Principal {
    Principal {
        user: None,
        tenant: None,
        roles: vec![Role::Service],
    }
}

#[tokio::test]
async fn an_overrunning_job_ends_with_timeout() {
    let db = PgCluster::shared().fresh_db("jobs_timeout").await.unwrap();
    let s = scheduler(&db, vec![sleep("sleepy", 30.0)], Duration::from_secs(1)).await;
    let started = Instant::now();
    let run = s.run_once("sleepy", "manual", "test").await.unwrap();
    assert_eq!(run.outcome, JobOutcome::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let client = db.connect().await.unwrap();
    let row = client
        .query_one(
            "SELECT outcome, ended_at IS NOT NULL, error, trigger FROM pulse.job_runs WHERE id = $1",
            &[&run.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "timeout");
    assert!(row.get::<_, bool>(1));
    assert!(row.get::<_, String>(2).contains("time limit of 1 s"));
    assert_eq!(row.get::<_, String>(3), "manual");
    // The failure is announced to Symfony, in the transaction that recorded it.
    let event = client
        .query_one(
            "SELECT event, aggregate, payload FROM pulse.outbox WHERE message_id = $1",
            &[&format!("job:{}", run.id)],
        )
        .await
        .unwrap();
    assert_eq!(event.get::<_, String>(0), "job.failed");
    assert_eq!(event.get::<_, String>(1), "job:sleepy");
    assert_eq!(event.get::<_, Value>(2)["outcome"], "timeout");
    // The sleeping statement was cancelled, not left running in the database.
    wait_for("the job's statement to stop", Duration::from_secs(5), || async {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await
    .unwrap();
    // The lock was released: the next run starts (and times out again).
    let again = s.run_once("sleepy", "schedule", "test").await.unwrap();
    assert_eq!(again.outcome, JobOutcome::Timeout);
}

#[tokio::test]
async fn two_instances_never_run_the_same_job_at_once() {
    let db = PgCluster::shared().fresh_db("jobs_single").await.unwrap();
    let slow = || {
        vec![
            sleep("slow", 0.7),
            // Long enough that the second instance asks while the first still runs, even
            // on a loaded machine.
            sleep("long", 2.0),
        ]
    };
    // Two instances: separate pools, separate sessions, as two pulsed processes have.
    let a = Arc::new(scheduler(&db, slow(), Duration::from_secs(10)).await);
    let b = Arc::new(scheduler(&db, slow(), Duration::from_secs(10)).await);
    let (ra, rb) = tokio::join!(
        a.run_once("long", "manual", "a"),
        b.run_once("long", "manual", "b")
    );
    let ok = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    let busy = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(JobError::AlreadyRunning(_))))
        .count();
    assert_eq!((ok, busy), (1, 1), "{ra:?} {rb:?}");

    // Both on the same every-second schedule for a while.
    let schedules = vec![("slow".to_string(), "* * * * * *".to_string())];
    let mut registry = Registry::default();
    for job in slow() {
        registry.register(job);
    }
    let pool = |_: u8| pulse_daemon::db::pool(&DbUrl::parse(&db.url()).unwrap(), 4).unwrap();
    let x = Arc::new(Scheduler::new(pool(0), registry.clone(), &schedules, Duration::from_secs(10)).unwrap());
    let y = Arc::new(Scheduler::new(pool(1), registry, &schedules, Duration::from_secs(10)).unwrap());
    assert!(x.next_run("slow").is_some_and(|t| t.ends_with('Z')));
    assert_eq!(a.next_run("slow"), None, "not scheduled on that one");
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    x.spawn(&tasks, stop.clone());
    y.spawn(&tasks, stop.clone());
    tokio::time::sleep(Duration::from_millis(4500)).await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;

    let client = db.connect().await.unwrap();
    let runs: Vec<(f64, f64)> = pairs(
        &client,
        "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM ended_at)::float8
               FROM pulse.job_runs WHERE job = 'slow' AND trigger = 'schedule' AND outcome = 'ok'
              ORDER BY started_at",
    )
    .await;
    // Four or five ticks, each wanted by both instances: one run per tick at most (without
    // the lock both would run, twice as many runs, overlapping). A loaded machine may make
    // a run outlast a tick, hence the low bound.
    assert!((2..=5).contains(&runs.len()), "{runs:?}");
    for w in runs.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs overlapped: {w:?}");
    }
}

#[tokio::test]
async fn pulsed_processes_respect_a_held_job_lock() {
    let db = PgCluster::shared().fresh_db("jobs_processes").await.unwrap();
    let env = || {
        vec![
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__JOBS__PRUNE_OUTBOX", "* * * * * *".to_string()),
        ]
    };
    let mut one = Pulsed::spawn(&pulsed_bin(), &env()).unwrap();
    let mut two = Pulsed::spawn(&pulsed_bin(), &env()).unwrap();
    one.wait_ready(Duration::from_secs(20)).await.unwrap();
    two.wait_ready(Duration::from_secs(20)).await.unwrap();
    let client = db.connect().await.unwrap();
    let count = || async {
        client
            .query_one(
                "SELECT count(*) FROM pulse.job_runs WHERE job = 'prune_outbox'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_for("scheduled runs", Duration::from_secs(10), || async {
        (count().await >= 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", one.log(), two.log()));

    // A third party (as another instance would) holds the job's lock: neither process
    // may run it until it lets go.
    let holder = db.connect().await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_lock(hashtextextended('pulse.job.' || 'prune_outbox', 0))",
            &[],
        )
        .await
        .unwrap();
    // A run that started before the lock was taken may still be finishing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = count().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        count().await,
        before,
        "a job ran while another instance held its lock"
    );
    holder
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended('pulse.job.' || 'prune_outbox', 0))",
            &[],
        )
        .await
        .unwrap();
    wait_for(
        "runs after the lock is released",
        Duration::from_secs(10),
        || async { (count().await > before).then_some(()) },
    )
    .await
    .unwrap();

    let runs: Vec<(f64, f64, String)> = client
        .query(
            "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM ended_at)::float8, outcome
               FROM pulse.job_runs WHERE job = 'prune_outbox' AND ended_at IS NOT NULL ORDER BY started_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for w in runs.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs overlapped: {w:?}");
    }
    assert!(runs.iter().all(|r| r.2 == "ok"), "{runs:?}");
}

#[tokio::test]
async fn run_now_is_for_allowed_roles_and_audited() {
    let db = PgCluster::shared().fresh_db("jobs_run_now").await.unwrap();
    let s = scheduler(&db, vec![sleep("quick", 0.0)], Duration::from_secs(5)).await;
    let member = Principal {
        user: Some("u1".into()),
        tenant: Some("t1".into()),
        roles: vec![Role::Member, Role::TenantAdmin],
    };
    assert!(matches!(
        s.run_now("quick", &member, "u1").await,
        Err(JobError::Forbidden(_))
    ));
    match s.run_now("nope", &service(), "ops").await {
        Err(e @ JobError::Unknown { .. }) => assert!(e.to_string().contains("quick"), "{e}"),
        other => panic!("{other:?}"),
    }
    let run = s.run_now("quick", &service(), "ops").await.unwrap();
    assert_eq!(run.outcome, JobOutcome::Ok);
    assert_eq!(run.counts, json!({"slept": 0.0}));
    let client = db.connect().await.unwrap();
    let audited: i64 = client
        .query_one(
            "SELECT count(*) FROM pulse.audit_log WHERE action = 'job.run_now' AND actor = 'ops' AND target = 'quick'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 1);
    let by: String = client
        .query_one("SELECT started_by FROM pulse.job_runs WHERE id = $1", &[&run.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(by, "ops");
    let listed = pulse_daemon::jobs::recent_runs(&client, Some("quick"), 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].id,
            listed[0].outcome.as_str(),
            listed[0].trigger.as_str()
        ),
        (run.id, "ok", "manual")
    );
}

#[tokio::test]
async fn prune_outbox_deletes_only_old_delivered_rows() {
    let db = PgCluster::shared().fresh_db("jobs_prune").await.unwrap();
    let s = scheduler(
        &db,
        vec![Arc::new(PruneOutbox {
            retention: Duration::from_secs(3600),
            broker: true,
        })],
        Duration::from_secs(10),
    )
    .await;
    let client = db.connect().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO pulse.outbox (message_id, aggregate, event, payload, created_at, delivered_at)
             SELECT 'old-' || g, 'a', 'presence.joined', '{}', now() - interval '3 hours', now() - interval '2 hours'
               FROM generate_series(1, 12000) g;
             INSERT INTO pulse.outbox (message_id, aggregate, event, payload, created_at, delivered_at)
             VALUES ('recent', 'a', 'presence.joined', '{}', now(), now()),
                    ('old-pending', 'a', 'presence.joined', '{}', now() - interval '3 hours', NULL);
             INSERT INTO pulse.processed_commands (command_id, kind, outcome, processed_at)
             VALUES ('ancient', 'ChangeSetting', 'applied', now() - interval '30 days'),
                    ('fresh', 'ChangeSetting', 'applied', now());",
        )
        .await
        .unwrap();
    let run = run_ok(&s, "prune_outbox").await;
    assert_eq!(
        run.counts,
        json!({"deleted": 12000, "processed_commands_deleted": 1})
    );
    let left: Vec<String> = column(&client, "SELECT message_id FROM pulse.outbox ORDER BY 1").await;
    assert_eq!(left, vec!["old-pending", "recent"]);
}

/// The jobs of the engine and the file storage, registered as the daemon registers them:
/// each runs through the scheduler and leaves its record with what it counted.
#[tokio::test]
async fn engine_and_file_jobs_run_and_record_their_counts() {
    use pulse_daemon::config::{Config, ConfigSource};
    use pulse_daemon::engine::{Engine, EngineLimits};

    let db = PgCluster::shared().fresh_db("jobs_wired").await.unwrap();
    let mut client = db.connect().await.unwrap();
    pulse_daemon::migrate::migrate(&mut client).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config::load(&ConfigSource {
        file: None,
        env: vec![
            ("PULSE__SOURCE__URL".into(), db.url()),
            (
                "PULSE__STORAGE__PATH".into(),
                dir.path().join("files").display().to_string(),
            ),
        ],
    })
    .unwrap();
    let pool = pulse_daemon::db::pool(&DbUrl::parse(&db.url()).unwrap(), 4).unwrap();
    let engine = Arc::new(Engine::new(
        Arc::new(pulse_daemon::schema::Schema::default()),
        pool.clone(),
        pool.clone(),
        EngineLimits {
            subscriptions: 10,
            // Every tab is stale at once.
            presence_ttl: Duration::ZERO,
            history: 100,
        },
    ));
    let files = Arc::new(pulse_daemon::files::Files::open(&config).unwrap());
    let mut registry = Registry::default();
    pulse_daemon::jobs::register_wired(&mut registry, &config, &engine, &files, &pool);
    for name in [
        "sweep_presence",
        "notification_retention",
        "expire_upload_tickets",
        "delete_orphaned_files",
    ] {
        assert!(registry.get(name).is_some(), "{name} is not registered");
    }
    // The file jobs with no grace period, so that the test's leftovers count as stale.
    for name in ["expire_upload_tickets", "delete_orphaned_files"] {
        registry.register(Arc::new(pulse_daemon::jobs::FileCleanup {
            name,
            files: files.clone(),
            pool: pool.clone(),
            config: Arc::new(config.clone()),
            stale: Duration::ZERO,
        }));
    }
    let s = Scheduler::new(pool.clone(), registry, &[], Duration::from_secs(10)).unwrap();

    // Presence: two tabs of two users, both silent past the (zero) lifetime.
    {
        let mut hub = engine.hub.lock().unwrap();
        hub.heartbeat(1, "t1", "alice", "doc", json!({}));
        hub.heartbeat(2, "t1", "bob", "doc", json!({}));
    }
    let run = run_ok(&s, "sweep_presence").await;
    assert_eq!(run.counts["removed"], 2, "{}", run.counts);
    assert_eq!(engine.hub.lock().unwrap().online(None, None)["count"], 0);

    // Notifications: one past the default retention (90 days), one recent.
    client
        .batch_execute(
            "INSERT INTO pulse.notifications (tenant, user_id, title, created_by, created_at)
             VALUES ('t1', 'alice', 'old', 'test', now() - interval '400 days'),
                    ('t1', 'alice', 'new', 'test', now())",
        )
        .await
        .unwrap();
    let run = run_ok(&s, "notification_retention").await;
    assert_eq!(run.counts, json!({"deleted": 1}));
    let left: Vec<String> = column(&client, "SELECT title FROM pulse.notifications").await;
    assert_eq!(left, vec!["new"]);

    // Upload tickets: one expired and never used, one still valid.
    client
        .batch_execute(
            "INSERT INTO pulse.upload_tickets (id, tenant, name, max_bytes, content_types, expires_at)
             VALUES (gen_random_uuid(), 't1', 'a.txt', 10, '{text/plain}', now() - interval '1 hour'),
                    (gen_random_uuid(), 't1', 'b.txt', 10, '{text/plain}', now() + interval '1 hour')",
        )
        .await
        .unwrap();
    let run = run_ok(&s, "expire_upload_tickets").await;
    assert_eq!(run.counts["expired_tickets"], 1, "{}", run.counts);
    let tickets: Vec<String> = column(&client, "SELECT name FROM pulse.upload_tickets").await;
    assert_eq!(tickets, vec!["b.txt"]);

    // A staged upload left behind by a crash.
    let staged = files.backend().staging_path();
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::write(&staged, b"half an upload").unwrap();
    let run = run_ok(&s, "delete_orphaned_files").await;
    assert_eq!(run.counts["staged_files"], 1, "{}", run.counts);
    assert!(!staged.exists());

    let recorded: Vec<(String, String)> = pairs(
        &client,
        "SELECT job, outcome FROM pulse.job_runs WHERE ended_at IS NOT NULL ORDER BY id",
    )
    .await;
    assert_eq!(
        recorded,
        [
            "sweep_presence",
            "notification_retention",
            "expire_upload_tickets",
            "delete_orphaned_files"
        ]
        .map(|j| (j.to_string(), "ok".to_string()))
    );
}
