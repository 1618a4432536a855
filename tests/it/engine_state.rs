//! The engine as the change stream's consumer, in-process against real PostgreSQL: the
//! group-commit loop of `replication` drives [`EngineSink`] with transactions that mirror
//! what was really committed in the source database. Metrics (count, sum,
//! count-distinct, windows, rows moving in and out of filters) must equal a fresh
//! recomputation, also after a "restart" from the persisted state; live-table
//! subscribers get the changes after they are durable, and a resume gets exactly what
//! was missed.

use std::sync::Arc;
use std::time::Duration;

use pulse_cdc::{Change, ChangeKind, Column, Durable, Event, Lsn, Relation, Transaction, Value};
use pulse_daemon::config::DbUrl;
use pulse_daemon::engine::{Caller, Engine, EngineLimits, EngineSink, value};
use pulse_daemon::replication::{BatchLimits, ChangeSink, Consumer};
use pulse_daemon::schema::Schema;
use pulse_harness::{PgCluster, TestDb};
use pulse_shared::caps::{Principal, Role};
use pulse_shared::protocol::{ServerFrame, UpdateOp};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = r#"
default_time_zone = "Europe/Paris"

[tables.payments]
source = "public.payments"
tenant_column = "tenant_id"
columns = ["id", "tenant_id", "status", "amount", "payer"]
roles = ["staff"]
filters = ["status"]

[metrics.paid]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
filter = "status = 'paid'"

[metrics.revenue]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "sum"
column = "amount"
filter = "status IN ('paid', 'refunded') AND NOT amount IS NULL"

[metrics.payers_week]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count_distinct"
column = "payer"
window = "last_7_days"
time_column = "created_at"

[metrics.today]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
filter = "status != 'void' OR amount > 100"
window = "today"
time_column = "created_at"
"#;

const COLUMNS: [(&str, &str, bool); 6] = [
    ("id", "int4", true),
    ("tenant_id", "text", false),
    ("status", "text", false),
    ("amount", "numeric", false),
    ("payer", "text", false),
    ("created_at", "timestamptz", false),
];

fn relation() -> Arc<Relation> {
    Arc::new(Relation {
        oid: 1,
        schema: "public".into(),
        name: "payments".into(),
        replica_identity: 'f',
        columns: COLUMNS
            .iter()
            .map(|(n, t, k)| Column {
                name: n.to_string(),
                type_oid: 0,
                type_name: t.to_string(),
                key: *k,
            })
            .collect(),
    })
}

/// The row as the stream would carry it, read back from the source.
async fn fetch(c: &tokio_postgres::Client, id: i32) -> Option<Vec<Value>> {
    let row = c
        .query_opt("SELECT to_jsonb(p) FROM payments p WHERE id = $1", &[&id])
        .await
        .unwrap()?;
    let obj: serde_json::Value = row.get(0);
    Some(
        COLUMNS
            .iter()
            .map(|(n, t, _)| value::from_json(t, &obj[*n]).unwrap())
            .collect(),
    )
}

struct Fixture {
    db: TestDb,
    source: tokio_postgres::Client,
    engine: Arc<Engine>,
    lsn: u64,
}

async fn engine_for(db: &TestDb) -> Arc<Engine> {
    let url = DbUrl::parse(&db.url()).unwrap();
    let mut schema = Schema::parse("test", SCHEMA).unwrap();
    let catalog = db.connect().await.unwrap();
    schema.check(&catalog).await.unwrap();
    Arc::new(Engine::new(
        Arc::new(schema),
        pulse_daemon::db::pool(&url, 4).unwrap(),
        pulse_daemon::db::pool(&url, 4).unwrap(),
        EngineLimits {
            subscriptions: 10,
            presence_ttl: Duration::from_secs(30),
            history: 100,
        },
    ))
}

impl Fixture {
    async fn new(label: &str) -> Fixture {
        let db = PgCluster::shared().fresh_db(label).await.unwrap();
        let mut source = db.connect().await.unwrap();
        pulse_daemon::migrate::migrate(&mut source).await.unwrap();
        source
            .batch_execute(
                "CREATE TABLE payments (id int PRIMARY KEY, tenant_id text NOT NULL, status text NOT NULL,
                   amount numeric, payer text, created_at timestamptz NOT NULL DEFAULT now());
                 ALTER TABLE payments REPLICA IDENTITY FULL;
                 INSERT INTO payments VALUES
                   (1, 't1', 'paid', 10.50, 'ann', now()),
                   (2, 't1', 'paid', 5, 'bob', now() - interval '3 days'),
                   (3, 't1', 'void', 500, 'ann', now() - interval '20 days'),
                   (4, 't2', 'refunded', 7.25, 'cy', now()),
                   (5, 't2', 'paid', NULL, NULL, now());",
            )
            .await
            .unwrap();
        let engine = engine_for(&db).await;
        Fixture {
            db,
            source,
            engine,
            lsn: 0x1000,
        }
    }

    /// Runs SQL on the source and returns the transaction the stream would deliver.
    async fn commit(&mut self, id: i32, sql: &str) -> Transaction {
        let before = fetch(&self.source, id).await;
        self.source.batch_execute(sql).await.unwrap();
        let after = fetch(&self.source, id).await;
        let kind = match (before, after) {
            (None, Some(new)) => ChangeKind::Insert { new },
            (Some(old), Some(new)) => ChangeKind::Update { old: Some(old), new },
            (Some(old), None) => ChangeKind::Delete { old },
            (None, None) => panic!("{sql} changed nothing"),
        };
        self.lsn += 0x100;
        Transaction {
            xid: self.lsn as u32,
            commit_lsn: Lsn(self.lsn),
            end_lsn: Lsn(self.lsn + 8),
            commit_time: chrono::Utc::now(),
            changes: vec![Change {
                relation: relation(),
                kind,
            }],
            messages: Vec::new(),
        }
    }

    /// Feeds transactions through the real group-commit loop; returns the durable LSN.
    async fn consume(&self, engine: &Arc<Engine>, txs: Vec<Transaction>) -> Option<Lsn> {
        let mut state = self.db.connect().await.unwrap();
        let mut sink = EngineSink::new(engine.clone(), "pulse");
        let persisted = sink.checkpoint(&state).await.unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        for t in txs {
            tx.send(Event::Commit(t)).await.unwrap();
        }
        drop(tx);
        let (durable, _watch) = Durable::new(persisted);
        let source_config = pulse_daemon::config::DbUrl::parse(&self.db.url()).unwrap();
        let shutdown = CancellationToken::new();
        let mut consumer = Consumer {
            state: &mut state,
            source: &source_config,
            name: "pulse",
            durable: &durable,
            limits: BatchLimits {
                max_transactions: 2,
                max_changes: 100,
                ..BatchLimits::default()
            },
            shutdown: &shutdown,
        };
        consumer.run(&mut sink, &mut rx, persisted).await.unwrap()
    }

    /// The cells a fresh engine computes from the source as it is now.
    async fn recomputed(
        &self,
    ) -> Vec<(
        pulse_daemon::engine::metrics::CellKey,
        pulse_daemon::engine::metrics::Cell,
    )> {
        let fresh = engine_for(&self.db).await;
        let mut src = self.db.connect().await.unwrap();
        let mut st = self.db.connect().await.unwrap();
        let stx = src.transaction().await.unwrap();
        let ttx = st.transaction().await.unwrap();
        fresh.load_snapshot(&stx, &ttx).await.unwrap();
        ttx.rollback().await.unwrap();
        fresh.metric_cells()
    }
}

#[tokio::test]
async fn metrics_follow_every_change_and_equal_a_recomputation_after_a_restart() {
    let mut f = Fixture::new("engine_metrics").await;
    // The initial load, as the loop does it for a new slot.
    {
        let mut src = f.db.connect().await.unwrap();
        let mut st = f.db.connect().await.unwrap();
        let stx = src.transaction().await.unwrap();
        let ttx = st.transaction().await.unwrap();
        f.engine.load_snapshot(&stx, &ttx).await.unwrap();
        pulse_daemon::replication::write_checkpoint(&ttx, "pulse", Lsn(0x1000))
            .await
            .unwrap();
        ttx.commit().await.unwrap();
    }
    assert_eq!(f.engine.metric_cells(), f.recomputed().await);
    let mut txs = vec![
        f.commit(
            6,
            "INSERT INTO payments VALUES (6, 't1', 'paid', 2.25, 'dee', now())",
        )
        .await,
        // Out of the filter and back in; into another tenant.
        f.commit(1, "UPDATE payments SET status = 'pending' WHERE id = 1")
            .await,
        f.commit(
            2,
            "UPDATE payments SET status = 'refunded', amount = 4.75 WHERE id = 2",
        )
        .await,
        f.commit(
            3,
            "UPDATE payments SET status = 'paid', created_at = now() WHERE id = 3",
        )
        .await,
        f.commit(4, "UPDATE payments SET tenant_id = 't1' WHERE id = 4")
            .await,
        f.commit(5, "DELETE FROM payments WHERE id = 5").await,
        f.commit(1, "UPDATE payments SET status = 'paid' WHERE id = 1")
            .await,
    ];
    let last = txs.last().unwrap().end_lsn;
    let first_half: Vec<_> = txs.drain(..3).collect();
    f.consume(&f.engine, first_half).await;
    assert_eq!(f.consume(&f.engine, txs).await, Some(last));
    let expected = f.recomputed().await;
    assert_eq!(
        f.engine.metric_cells(),
        expected,
        "maintained cells differ from a recomputation"
    );
    assert!(!expected.is_empty());

    // A restart: a new engine loads the persisted cells and the checkpoint.
    let restarted = engine_for(&f.db).await;
    let state = f.db.connect().await.unwrap();
    let mut sink = EngineSink::new(restarted.clone(), "pulse");
    assert_eq!(sink.checkpoint(&state).await.unwrap(), Some(last));
    assert_eq!(restarted.metric_cells(), expected);
    // A replay of what is already persisted changes nothing.
    let replay = f.commit(6, "UPDATE payments SET amount = 3 WHERE id = 6").await;
    let mut stale = replay.clone();
    stale.end_lsn = last;
    assert_eq!(f.consume(&restarted, vec![stale]).await, Some(last));
    assert_eq!(restarted.metric_cells(), expected);
    f.consume(&restarted, vec![replay]).await;
    assert_eq!(restarted.metric_cells(), f.recomputed().await);
}

#[tokio::test]
async fn a_committed_change_reaches_live_subscribers_and_resume_gets_what_was_missed() {
    let mut f = Fixture::new("engine_live_sink").await;
    let staff = Principal {
        user: Some("sam".into()),
        tenant: Some("t1".into()),
        roles: vec![Role::Staff],
    };
    let (tx, mut rx) = mpsc::channel(64);
    let session = f.engine.open_session(tx, CancellationToken::new());
    let caller = Caller {
        session,
        principal: staff.clone(),
    };
    f.engine
        .subscribe(&caller, "s", "payments", &json!({ "status": "paid" }), None)
        .await
        .unwrap();
    let cursor = match rx.recv().await.unwrap().into_frame() {
        ServerFrame::Result { data, cursor, .. } => {
            assert_eq!(data.as_array().unwrap().len(), 2);
            cursor.unwrap()
        }
        other => panic!("{other:?}"),
    };
    let t1 = f
        .commit(
            7,
            "INSERT INTO payments VALUES (7, 't1', 'paid', 1, 'eve', now())",
        )
        .await;
    let t2 = f
        .commit(
            8,
            "INSERT INTO payments VALUES (8, 't2', 'paid', 1, 'fay', now())",
        )
        .await;
    let t3 = f
        .commit(1, "UPDATE payments SET status = 'void' WHERE id = 1")
        .await;
    f.consume(&f.engine, vec![t1, t2, t3]).await;
    let mut got = Vec::new();
    while let Ok(ServerFrame::Update { op, key, .. }) = rx.try_recv().map(|o| o.into_frame()) {
        got.push((op, key["id"].as_i64().unwrap()));
    }
    assert_eq!(
        got,
        vec![(UpdateOp::Insert, 7), (UpdateOp::Delete, 1)],
        "t2's row must not reach t1"
    );

    // A reconnect with the first cursor gets exactly the two missed updates.
    f.engine.close_session(session);
    let (tx2, mut rx2) = mpsc::channel(64);
    let session2 = f.engine.open_session(tx2, CancellationToken::new());
    let caller2 = Caller {
        session: session2,
        principal: staff,
    };
    f.engine
        .subscribe(
            &caller2,
            "s",
            "payments",
            &json!({ "status": "paid" }),
            Some(&cursor),
        )
        .await
        .unwrap();
    let mut resumed = Vec::new();
    while let Ok(ServerFrame::Update { op, key, .. }) = rx2.try_recv().map(|o| o.into_frame()) {
        resumed.push((op, key["id"].as_i64().unwrap()));
    }
    assert_eq!(resumed, got);
    // An unknown cursor gets a resnapshot and a fresh result.
    let (tx3, mut rx3) = mpsc::channel(64);
    let caller3 = Caller {
        session: f.engine.open_session(tx3, CancellationToken::new()),
        principal: caller2.principal.clone(),
    };
    f.engine
        .subscribe(&caller3, "s", "payments", &json!({}), Some("0-0"))
        .await
        .unwrap();
    assert_eq!(
        rx3.recv().await.unwrap().into_frame(),
        ServerFrame::Resnapshot { id: "s".into() }
    );
    assert!(matches!(
        rx3.recv().await.unwrap().into_frame(),
        ServerFrame::Result { .. }
    ));
}

// ---- The real binary: metric definitions that change between runs, buckets past their
// window, tenant time zones from a table.

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::{AUDIENCE, Client, Daemon, ISSUER, SECRET, token, wait_streaming};

/// Starts pulsed on `db` with the schema file at `schema` and the slot `slot` (the same
/// slot across restarts, so a restart resumes from its checkpoint).
async fn pulsed(db: &TestDb, schema: &Path, slot: &str) -> Daemon {
    let env = vec![
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__SCHEMA__PATH", schema.display().to_string()),
        ("PULSE__AUTH__ISSUER", ISSUER.to_string()),
        ("PULSE__AUTH__AUDIENCE", AUDIENCE.to_string()),
        ("PULSE__AUTH__HS256_SECRET", SECRET.to_string()),
        ("PULSE__PLATFORM__DEPLOY_KEY", "d".repeat(40)),
        ("PULSE__REPLICATION__SLOT", slot.to_string()),
    ];
    let mut p = pulse_harness::Pulsed::spawn(&crate::support::pulsed_bin(), &env).unwrap();
    p.wait_ready(Duration::from_secs(30)).await.unwrap();
    let ws = format!("{}/ws", p.http.replace("http://", "ws://"));
    let d = Daemon {
        pulsed: p,
        _dir: tempfile::tempdir().unwrap(),
        ws,
    };
    wait_streaming(&d).await;
    d
}

/// (tenant, number) pairs a query answers, zeros left out.
async fn by_tenant(c: &tokio_postgres::Client, sql: &str) -> BTreeMap<String, i64> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .filter(|(_, n): &(String, i64)| *n != 0)
        .collect()
}

/// Rows per tenant in a metric's persisted cells.
async fn persisted(c: &tokio_postgres::Client, metric: &str) -> BTreeMap<String, i64> {
    by_tenant(
        c,
        &format!("SELECT tenant, sum(n)::int8 FROM pulse.metric_cells WHERE metric = '{metric}' GROUP BY 1"),
    )
    .await
}

/// The value pulsed serves for a metric of a tenant.
async fn served(ws: &str, tenant: &str, metric: &str) -> serde_json::Value {
    let mut c = Client::open(ws, &token("sam", Some(tenant), &["ROLE_STAFF"])).await;
    match c.subscribe("k", &format!("metric:{metric}"), json!({})).await {
        ServerFrame::Result { data, .. } => data["value"].clone(),
        other => panic!("{other:?}"),
    }
}

/// Waits until `check` holds, else fails with what it last saw and the log.
async fn settle<F, Fut>(d: &Daemon, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(e) => e,
        };
        if std::time::Instant::now() > deadline {
            panic!("{what}: {last}\nlog:\n{}", d.pulsed.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The log without terminal colours, so fields read `name=value`.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

fn same<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

const PAYMENTS: &str =
    "CREATE TABLE payments (id int PRIMARY KEY, tenant_id text NOT NULL, status text NOT NULL,
       amount numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
     ALTER TABLE payments REPLICA IDENTITY FULL;
     INSERT INTO payments SELECT i, 't' || (i % 3), (ARRAY['paid', 'refunded', 'void'])[1 + i % 4 % 3], i,
       now() - make_interval(hours => i * 5) FROM generate_series(1, 40) i;";

const DEFINITIONS_V1: &str = r#"
default_time_zone = "Europe/Paris"

[metrics.paid]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
filter = "status = 'paid'"

[metrics.revenue]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "sum"
column = "amount"
filter = "status = 'paid'"

[metrics.doomed]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
"#;

const DEFINITIONS_V2: &str = r#"
default_time_zone = "Europe/Paris"

[metrics.paid]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
filter = "status IN ('paid', 'refunded')"

[metrics.revenue]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "sum"
column = "amount"
filter = "status = 'paid'"

[metrics.refunds_week]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
filter = "status = 'refunded'"
window = "last_7_days"
time_column = "created_at"
"#;

const PAID_V1: &str = "SELECT tenant_id, count(*) FROM payments WHERE status = 'paid' GROUP BY 1";
const PAID_V2: &str =
    "SELECT tenant_id, count(*) FROM payments WHERE status IN ('paid', 'refunded') GROUP BY 1";
const REVENUE: &str =
    "SELECT tenant_id, (sum(amount) * 1000000)::int8 FROM payments WHERE status = 'paid' GROUP BY 1";
const REFUNDS_WEEK: &str = "SELECT tenant_id, count(*) FROM payments WHERE status = 'refunded' \
    AND (created_at AT TIME ZONE 'Europe/Paris')::date >= (now() AT TIME ZONE 'Europe/Paris')::date - 6 GROUP BY 1";

/// Every v2 metric's persisted cells against a fresh computation from the source.
async fn v2_equal(c: &tokio_postgres::Client) -> Result<(), String> {
    same("paid", persisted(c, "paid").await, by_tenant(c, PAID_V2).await)?;
    same(
        "refunds_week",
        persisted(c, "refunds_week").await,
        by_tenant(c, REFUNDS_WEEK).await,
    )?;
    let micros = by_tenant(
        c,
        "SELECT tenant, sum(micros)::int8 FROM pulse.metric_cells WHERE metric = 'revenue' GROUP BY 1",
    )
    .await;
    same("revenue", micros, by_tenant(c, REVENUE).await)?;
    same("doomed", persisted(c, "doomed").await, BTreeMap::new())
}

/// A metric whose filter changed, one added and one removed in the schema file while
/// pulsed was down (SIGKILL), with writes before, during and after: at the restart the
/// changed and the new metric are recomputed in a snapshot and the stream, resuming
/// from the older checkpoint, skips for them what that snapshot holds (no write counted
/// twice or missed); the unchanged metric is not recomputed; the removed one's cells go.
#[tokio::test]
async fn changed_added_and_removed_metric_definitions_equal_a_recomputation_after_restart() {
    let db = PgCluster::shared().fresh_db("engine_definitions").await.unwrap();
    let client = db.connect().await.unwrap();
    let c = &client;
    c.batch_execute(PAYMENTS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, DEFINITIONS_V1).unwrap();
    let slot = pulse_harness::unique_slot("definitions");

    let mut d = pulsed(&db, &schema, &slot).await;
    c.batch_execute(
        "INSERT INTO payments SELECT i, 't' || (i % 3), 'refunded', 1, now() FROM generate_series(41, 50) i;
         UPDATE payments SET status = 'paid' WHERE id IN (2, 6, 41);",
    )
    .await
    .unwrap();
    settle(&d, "v1 metrics follow the writes", || async move {
        same("paid", persisted(c, "paid").await, by_tenant(c, PAID_V1).await)
    })
    .await;
    d.pulsed.kill9();

    // The operator edits the schema file; Symfony keeps writing meanwhile.
    std::fs::write(&schema, DEFINITIONS_V2).unwrap();
    c.batch_execute(
        "UPDATE payments SET status = 'refunded' WHERE id % 5 = 0;
         INSERT INTO payments SELECT i, 't' || (i % 3), 'paid', 2.5, now() FROM generate_series(51, 60) i;
         DELETE FROM payments WHERE id % 7 = 0;",
    )
    .await
    .unwrap();
    let mut d = pulsed(&db, &schema, &slot).await;
    settle(&d, "metrics equal a recomputation after the restart", || {
        v2_equal(c)
    })
    .await;
    let log = plain(&d.pulsed.log());
    let recomputed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("metric recomputed from a snapshot"))
        .collect();
    assert!(
        recomputed
            .iter()
            .any(|l| l.contains("metric=paid") && l.contains("definition changed: filter")),
        "{log}"
    );
    assert!(
        recomputed.iter().any(|l| l.contains("metric=refunds_week")),
        "{log}"
    );
    assert!(!recomputed.iter().any(|l| l.contains("metric=revenue")), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("no longer in the schema file") && l.contains("doomed")),
        "{log}"
    );
    let defined: Vec<String> = c
        .query("SELECT metric FROM pulse.metric_definitions ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(defined, vec!["paid", "refunds_week", "revenue"]);

    // The stream goes on from there, each change counted once.
    c.batch_execute(
        "UPDATE payments SET status = 'void' WHERE id IN (1, 3, 51);
         INSERT INTO payments VALUES (61, 't1', 'refunded', 1, now()), (62, 't2', 'paid', 1, now());",
    )
    .await
    .unwrap();
    settle(&d, "metrics follow the writes after the recomputation", || {
        v2_equal(c)
    })
    .await;
    let want = by_tenant(c, PAID_V2).await["t1"];
    assert_eq!(served(&d.ws, "t1", "paid").await, json!(want));
    let want = by_tenant(c, REFUNDS_WEEK).await.get("t1").copied().unwrap_or(0);
    assert_eq!(served(&d.ws, "t1", "refunds_week").await, json!(want));
    // Nothing is recomputed again at the next start.
    d.pulsed.kill9();
    let d = pulsed(&db, &schema, &slot).await;
    settle(&d, "still equal after another restart", || v2_equal(c)).await;
    assert!(
        !d.pulsed.log().contains("metric recomputed from a snapshot"),
        "{}",
        d.pulsed.log()
    );
}

const WINDOWS: &str = r#"
default_time_zone = "Europe/Paris"

[metrics.today]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
window = "today"
time_column = "created_at"

[metrics.week]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
window = "last_7_days"
time_column = "created_at"
"#;

/// Buckets no window reads any more (persisted when they were live, days ago) are
/// deleted from the state and from memory; the values do not move.
#[tokio::test]
async fn buckets_older_than_their_window_are_pruned_and_values_stay() {
    let db = PgCluster::shared().fresh_db("engine_prune").await.unwrap();
    let client = db.connect().await.unwrap();
    let c = &client;
    c.batch_execute(PAYMENTS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, WINDOWS).unwrap();
    let slot = pulse_harness::unique_slot("prune");
    let since = |days: i32| {
        format!(
            "SELECT tenant_id, count(*) FROM payments WHERE (created_at AT TIME ZONE 'Europe/Paris')::date \
             >= (now() AT TIME ZONE 'Europe/Paris')::date - {days} GROUP BY 1"
        )
    };
    let mut d = pulsed(&db, &schema, &slot).await;
    let today = by_tenant(c, &since(0)).await;
    let week = by_tenant(c, &since(6)).await;
    assert_ne!(today, week, "the rows must span more than a day");
    assert_eq!(persisted(c, "today").await, today);
    assert_eq!(persisted(c, "week").await, week);
    let before = (
        served(&d.ws, "t1", "today").await,
        served(&d.ws, "t1", "week").await,
    );
    assert_eq!(
        before,
        (json!(today.get("t1").copied().unwrap_or(0)), json!(week["t1"]))
    );
    d.pulsed.kill9();

    // Cells written back when those days were inside the windows.
    c.batch_execute(
        "WITH d AS (SELECT (now() AT TIME ZONE 'Europe/Paris')::date AS today)
         INSERT INTO pulse.metric_cells (metric, tenant, bucket, dkey, n, micros)
         SELECT 'today', 't1', (today - 1)::text, '', 3, 0 FROM d
         UNION ALL SELECT 'week', 't1', (today - 7)::text, '', 4, 0 FROM d
         UNION ALL SELECT 'week', 't2', '2020-01-01', '', 5, 0 FROM d",
    )
    .await
    .unwrap();
    let d = pulsed(&db, &schema, &slot).await;
    let (today_ref, week_ref) = (&today, &week);
    settle(&d, "dead buckets are deleted", || async move {
        same("today", persisted(c, "today").await, today_ref.clone())?;
        same("week", persisted(c, "week").await, week_ref.clone())
    })
    .await;
    assert!(
        d.pulsed
            .log()
            .contains("metric buckets no window reads any more were deleted"),
        "{}",
        d.pulsed.log()
    );
    assert_eq!(
        (
            served(&d.ws, "t1", "today").await,
            served(&d.ws, "t1", "week").await
        ),
        before
    );
    assert_eq!(served(&d.ws, "t2", "week").await, json!(week["t2"]));
}

const ZONES: &str = r#"
default_time_zone = "UTC"

[tenants]
source = "public.tenants"
id_column = "id"
time_zone_column = "timezone"

[metrics.today]
source = "public.payments"
tenant_column = "tenant_id"
aggregate = "count"
window = "today"
time_column = "created_at"
"#;

/// Rows of `tenant` that are "today" in `zone`.
async fn today_in(c: &tokio_postgres::Client, tenant: &str, zone: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM payments WHERE tenant_id = $1 \
         AND (created_at AT TIME ZONE $2)::date = (now() AT TIME ZONE $2)::date",
        &[&tenant, &zone],
    )
    .await
    .unwrap()
    .get(0)
}

/// The "today" metric of `tenant`, persisted and served, against a count in `zone`.
async fn today_equal(c: &tokio_postgres::Client, ws: &str, tenant: &str, zone: &str) -> Result<(), String> {
    let want = today_in(c, tenant, zone).await;
    same(
        &format!("{tenant} persisted in {zone}"),
        persisted(c, "today").await.get(tenant).copied().unwrap_or(0),
        want,
    )?;
    same(
        &format!("{tenant} served in {zone}"),
        served(ws, tenant, "today").await,
        json!(want),
    )
}

/// Tenant time zones from the tenants table: loaded at start (an unknown name falls back
/// to the default with a warning), followed live (a zone change recomputes the tenant's
/// windowed metrics in its new zone), and replayed after SIGKILL (a change made while
/// pulsed was down).
#[tokio::test]
async fn tenant_time_zones_come_from_a_table_and_follow_its_changes() {
    let db = PgCluster::shared().fresh_db("engine_zones").await.unwrap();
    let client = db.connect().await.unwrap();
    let c = &client;
    // One row an hour for two days: "today" holds a different number of them in zones
    // 25 hours apart.
    c.batch_execute(
        "CREATE TABLE tenants (id text PRIMARY KEY, timezone text);
         INSERT INTO tenants VALUES ('t1', 'Pacific/Kiritimati'), ('t2', 'Mars/Base');
         CREATE TABLE payments (id serial PRIMARY KEY, tenant_id text NOT NULL, created_at timestamptz NOT NULL);
         ALTER TABLE payments REPLICA IDENTITY FULL;
         INSERT INTO payments (tenant_id, created_at)
           SELECT t, now() - make_interval(hours => i) FROM generate_series(0, 47) i, unnest(ARRAY['t1', 't2', 't3']) t;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, ZONES).unwrap();
    let slot = pulse_harness::unique_slot("zones");
    let (kiritimati, pago_pago) = ("Pacific/Kiritimati", "Pacific/Pago_Pago");
    assert_ne!(
        today_in(c, "t1", kiritimati).await,
        today_in(c, "t1", pago_pago).await
    );
    assert_ne!(
        today_in(c, "t1", kiritimati).await,
        today_in(c, "t1", "UTC").await
    );

    let mut d = pulsed(&db, &schema, &slot).await;
    let ws = d.ws.clone();
    let ws = ws.as_str();
    settle(&d, "zones from the table at start", || async move {
        today_equal(c, ws, "t1", kiritimati).await?;
        today_equal(c, ws, "t2", "UTC").await?;
        today_equal(c, ws, "t3", "UTC").await
    })
    .await;
    assert!(
        d.pulsed.log().contains("unknown time zone in the tenants table"),
        "{}",
        d.pulsed.log()
    );
    let buckets: Vec<String> = c
        .query(
            "SELECT DISTINCT bucket FROM pulse.metric_cells WHERE tenant = 't1'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let local_today: String = c
        .query_one("SELECT ((now() AT TIME ZONE $1)::date)::text", &[&kiritimati])
        .await
        .unwrap()
        .get(0);
    assert_eq!(buckets, vec![local_today]);

    // A live zone change: the tenant's "today" is recomputed in its new zone. A row
    // written in a transaction still open then lands inside the recomputation's
    // snapshot (taking it waits for running transactions) and also reaches the stream
    // after the zone change: it must count once.
    let mut writer = db.connect().await.unwrap();
    let open = writer.transaction().await.unwrap();
    open.execute(
        "INSERT INTO payments (tenant_id, created_at) VALUES ('t1', now())",
        &[],
    )
    .await
    .unwrap();
    c.batch_execute("UPDATE tenants SET timezone = 'Pacific/Pago_Pago' WHERE id = 't1'")
        .await
        .unwrap();
    pulse_harness::wait_for(
        "the recomputation's temporary slot",
        Duration::from_secs(20),
        || async move {
            c.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE temporary AND database = current_database() AND slot_name LIKE '%refresh%'",
                &[],
            )
            .await
            .unwrap()
            .map(|_| ())
        },
    )
    .await
    .unwrap();
    open.commit().await.unwrap();
    settle(&d, "t1 follows its new zone", || {
        today_equal(c, ws, "t1", pago_pago)
    })
    .await;
    c.batch_execute("INSERT INTO payments (tenant_id, created_at) VALUES ('t1', now()), ('t3', now())")
        .await
        .unwrap();
    settle(&d, "later rows count once", || async move {
        today_equal(c, ws, "t1", pago_pago).await?;
        today_equal(c, ws, "t3", "UTC").await
    })
    .await;
    assert!(
        d.pulsed.log().contains("time zone of tenant t1 changed"),
        "{}",
        d.pulsed.log()
    );

    // A change made while pulsed is down arrives through the stream after the restart.
    d.pulsed.kill9();
    c.batch_execute(
        "INSERT INTO tenants VALUES ('t3', 'Pacific/Kiritimati');
         INSERT INTO payments (tenant_id, created_at) VALUES ('t3', now() - interval '20 hours');",
    )
    .await
    .unwrap();
    let d = pulsed(&db, &schema, &slot).await;
    let ws = d.ws.as_str();
    settle(&d, "zones after the restart", || async move {
        today_equal(c, ws, "t1", pago_pago).await?;
        today_equal(c, ws, "t2", "UTC").await?;
        today_equal(c, ws, "t3", kiritimati).await
    })
    .await;
}
