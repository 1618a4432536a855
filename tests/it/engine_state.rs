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
