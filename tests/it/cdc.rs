//! Change data capture against a real PostgreSQL: the reader (pulse-cdc) directly, and
//! pulsed's stream with its durability rule (ledger sink), in-process and as the binary.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use pulse_cdc::reader::{CdcConfig, CdcHandle, CdcStatus};
use pulse_cdc::{ChangeKind, Event, Lsn, Transaction, Value};
use pulse_harness::{ClusterOptions, PgCluster, Pulsed, TestDb, unique_slot, wait_for};
use tokio::sync::mpsc;

use crate::support::{InProcess, component, fresh_db_with, metrics_text, pulsed_bin, readyz};

const WAIT: Duration = Duration::from_secs(30);

/// A reader on one test database, with a consumer that reports every transaction
/// durable as soon as the test has taken it.
struct Reader {
    handle: Option<CdcHandle>,
    rx: mpsc::Receiver<Event>,
    slot: String,
}

impl Reader {
    fn start(url: &str, label: &str, tables: &[&str]) -> Reader {
        let slot = unique_slot(label);
        Reader::start_on(url, &slot, tables, |_| {})
    }

    fn start_on(url: &str, slot: &str, tables: &[&str], tweak: impl FnOnce(&mut CdcConfig)) -> Reader {
        let (source, tls) = pulse_cdc::tls::parse_url(url).unwrap();
        let mut config = CdcConfig::new(source, slot, "pulse_test");
        config.tls = tls;
        config.tables = tables.iter().map(|t| t.to_string()).collect();
        config.needs_snapshot = false;
        config.backoff_min = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(500);
        tweak(&mut config);
        let (handle, rx) = pulse_cdc::reader::start(config);
        Reader {
            handle: Some(handle),
            rx,
            slot: slot.to_string(),
        }
    }

    fn handle(&self) -> &CdcHandle {
        self.handle.as_ref().unwrap()
    }

    async fn streaming(&self) {
        let mut status = self.handle().status.clone();
        tokio::time::timeout(
            WAIT,
            status.wait_for(|s| matches!(s, CdcStatus::Streaming { .. })),
        )
        .await
        .unwrap_or_else(|_| panic!("not streaming; status {:?}", self.handle().status.borrow()))
        .unwrap();
    }

    /// The next committed transaction (reported durable at once).
    async fn next(&mut self) -> Transaction {
        loop {
            let ev = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no transaction; status {:?}", self.handle().status.borrow()))
                .expect("reader stopped");
            match ev {
                Event::Commit(tx) => {
                    self.handle().durable.report(tx.end_lsn);
                    return tx;
                }
                Event::Snapshot(s) => {
                    let _ = s.done.send(Ok(()));
                }
            }
        }
    }

    async fn stop(mut self) {
        self.handle.take().unwrap().stop().await;
    }
}

fn new_row(tx: &Transaction, i: usize) -> &Vec<Value> {
    match &tx.changes[i].kind {
        ChangeKind::Insert { new } | ChangeKind::Update { new, .. } => new,
        other => panic!("expected a new row, got {other:?}"),
    }
}

fn col<'a>(tx: &'a Transaction, i: usize, name: &str) -> &'a Value {
    let rel = &tx.changes[i].relation;
    &new_row(tx, i)[rel.column(name).unwrap_or_else(|| panic!("no column {name}"))]
}

async fn slot_flush(db: &TestDb, slot: &str) -> Option<Lsn> {
    let c = db.connect().await.ok()?;
    let r = c
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()??;
    r.get::<_, Option<String>>(0)?.parse().ok()
}

#[tokio::test]
async fn every_type_through_insert_update_delete() {
    let (db, c) = fresh_db_with(
        "cdc_types",
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN positive AS int4 CHECK (VALUE > 0);
         CREATE TABLE every (
            id int8 PRIMARY KEY, b bool, i2 int2, i4 int4, f4 float4, f8 float8, n numeric,
            t text, vc varchar(10), u uuid, j json, jb jsonb, d date, tm time, ts timestamp,
            tz timestamptz, iv interval, by bytea, ai int4[], at text[], m mood, p positive,
            am mood[], pt point)",
    )
    .await;
    let mut r = Reader::start(&db.url(), "types", &["public.every"]);
    r.streaming().await;
    c.batch_execute(
        "INSERT INTO every VALUES (1, true, -2, 4, 1.5, -2.25, '12345678901234567890.0000000001',
            'héllo', 'vc', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": 1}', '{\"b\": [1, 2]}',
            '2024-02-29', '13:14:15.5', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+02',
            '1 day 2 hours', '\\x00ff', '{1,NULL,3}', '{\"a b\",c}', 'happy', 7, '{sad,happy}', '(1,2)')",
    )
    .await
    .unwrap();
    let tx = r.next().await;
    assert_eq!(tx.changes.len(), 1);
    let rel = &tx.changes[0].relation;
    assert_eq!((rel.schema.as_str(), rel.name.as_str()), ("public", "every"));
    assert!(rel.columns[0].key && !rel.columns[1].key);
    assert_eq!(
        rel.columns[rel.column("p").unwrap()].type_name,
        "int4",
        "domain resolved to its base"
    );
    assert_eq!(col(&tx, 0, "id"), &Value::Int(1));
    assert_eq!(col(&tx, 0, "b"), &Value::Bool(true));
    assert_eq!(col(&tx, 0, "i2"), &Value::Int(-2));
    assert_eq!(col(&tx, 0, "i4"), &Value::Int(4));
    assert_eq!(col(&tx, 0, "f4"), &Value::Float(1.5));
    assert_eq!(col(&tx, 0, "f8"), &Value::Float(-2.25));
    assert_eq!(
        col(&tx, 0, "n"),
        &Value::Numeric("12345678901234567890.0000000001".into())
    );
    assert_eq!(col(&tx, 0, "t"), &Value::Text("héllo".into()));
    assert_eq!(col(&tx, 0, "vc"), &Value::Text("vc".into()));
    assert_eq!(
        col(&tx, 0, "u"),
        &Value::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".parse().unwrap())
    );
    assert_eq!(col(&tx, 0, "j"), &Value::Json(serde_json::json!({"a": 1})));
    assert_eq!(col(&tx, 0, "jb"), &Value::Json(serde_json::json!({"b": [1, 2]})));
    assert_eq!(
        col(&tx, 0, "d"),
        &Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 2, 29).unwrap())
    );
    assert_eq!(
        col(&tx, 0, "tm"),
        &Value::Time(chrono::NaiveTime::from_hms_milli_opt(13, 14, 15, 500).unwrap())
    );
    let ts = chrono::NaiveDate::from_ymd_opt(2024, 1, 2)
        .unwrap()
        .and_hms_micro_opt(3, 4, 5, 123456)
        .unwrap();
    assert_eq!(col(&tx, 0, "ts"), &Value::Timestamp(ts));
    assert_eq!(
        col(&tx, 0, "tz"),
        &Value::TimestampTz(
            chrono::NaiveDate::from_ymd_opt(2024, 1, 2)
                .unwrap()
                .and_hms_opt(1, 4, 5)
                .unwrap()
                .and_utc()
        )
    );
    assert_eq!(col(&tx, 0, "iv"), &Value::Interval("1 day 02:00:00".into()));
    assert_eq!(col(&tx, 0, "by"), &Value::Bytes(vec![0, 255]));
    assert_eq!(
        col(&tx, 0, "ai"),
        &Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)])
    );
    assert_eq!(
        col(&tx, 0, "at"),
        &Value::Array(vec![Value::Text("a b".into()), Value::Text("c".into())])
    );
    assert_eq!(col(&tx, 0, "m"), &Value::Text("happy".into()));
    assert_eq!(col(&tx, 0, "p"), &Value::Int(7));
    assert_eq!(
        col(&tx, 0, "am"),
        &Value::Array(vec![Value::Text("sad".into()), Value::Text("happy".into())])
    );
    assert_eq!(
        col(&tx, 0, "pt"),
        &Value::Text("(1,2)".into()),
        "unknown type: text"
    );

    c.batch_execute("UPDATE every SET b = false, i4 = NULL, m = 'sad', ai = '{}' WHERE id = 1")
        .await
        .unwrap();
    let tx = r.next().await;
    match &tx.changes[0].kind {
        ChangeKind::Update { old, .. } => assert!(old.is_none(), "default identity, key unchanged"),
        other => panic!("{other:?}"),
    }
    assert_eq!(col(&tx, 0, "b"), &Value::Bool(false));
    assert_eq!(col(&tx, 0, "i4"), &Value::Null);
    assert_eq!(col(&tx, 0, "m"), &Value::Text("sad".into()));
    assert_eq!(col(&tx, 0, "ai"), &Value::Array(vec![]));
    assert_eq!(
        col(&tx, 0, "n"),
        &Value::Numeric("12345678901234567890.0000000001".into())
    );

    // Changing the key sends the old key.
    c.batch_execute("UPDATE every SET id = 2 WHERE id = 1")
        .await
        .unwrap();
    let tx = r.next().await;
    match &tx.changes[0].kind {
        ChangeKind::Update { old: Some(old), new } => {
            assert_eq!(old[0], Value::Int(1));
            assert_eq!(new[0], Value::Int(2));
        }
        other => panic!("{other:?}"),
    }
    c.batch_execute("DELETE FROM every").await.unwrap();
    let tx = r.next().await;
    match &tx.changes[0].kind {
        ChangeKind::Delete { old } => {
            assert_eq!(old[0], Value::Int(2));
            assert_eq!(
                old[1],
                Value::Null,
                "only the key is sent with the default identity"
            );
        }
        other => panic!("{other:?}"),
    }
    r.stop().await;
}

#[tokio::test]
async fn replica_identities_truncate_toast_and_messages() {
    let (db, c) = fresh_db_with(
        "cdc_identity",
        "CREATE TABLE full_t (id int PRIMARY KEY, a text, big text);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         CREATE TABLE idx_t (id int PRIMARY KEY, code text NOT NULL, v int);
         CREATE UNIQUE INDEX idx_t_code ON idx_t (code);
         ALTER TABLE idx_t REPLICA IDENTITY USING INDEX idx_t_code;
         CREATE TABLE none_t (id int, v int);
         ALTER TABLE none_t REPLICA IDENTITY NOTHING;
         CREATE TABLE toast_t (id int PRIMARY KEY, small int, big text);
         ALTER TABLE toast_t ALTER COLUMN big SET STORAGE EXTERNAL;",
    )
    .await;
    let mut r = Reader::start(
        &db.url(),
        "identity",
        &["public.full_t", "public.idx_t", "public.none_t", "public.toast_t"],
    );
    r.streaming().await;

    c.batch_execute("INSERT INTO full_t VALUES (1, 'x', 'y')")
        .await
        .unwrap();
    let tx = r.next().await;
    assert_eq!(tx.changes[0].relation.replica_identity, 'f');
    c.batch_execute("UPDATE full_t SET a = 'z'").await.unwrap();
    match &r.next().await.changes[0].kind {
        ChangeKind::Update { old: Some(old), new } => {
            assert_eq!(
                old,
                &vec![Value::Int(1), Value::Text("x".into()), Value::Text("y".into())]
            );
            assert_eq!(new[1], Value::Text("z".into()));
        }
        other => panic!("full identity sends the whole old row: {other:?}"),
    }
    c.batch_execute("DELETE FROM full_t").await.unwrap();
    match &r.next().await.changes[0].kind {
        ChangeKind::Delete { old } => assert_eq!(old[2], Value::Text("y".into())),
        other => panic!("{other:?}"),
    }

    c.batch_execute("INSERT INTO idx_t VALUES (1, 'a', 1); UPDATE idx_t SET code = 'b'; DELETE FROM idx_t")
        .await
        .unwrap();
    let tx = r.next().await;
    assert_eq!(tx.changes.len(), 3);
    assert_eq!(tx.changes[0].relation.replica_identity, 'i');
    let code = tx.changes[0].relation.column("code").unwrap();
    assert!(tx.changes[0].relation.columns[code].key);
    match &tx.changes[1].kind {
        ChangeKind::Update { old: Some(old), .. } => assert_eq!(old[code], Value::Text("a".into())),
        other => panic!("index identity sends the old index key: {other:?}"),
    }
    match &tx.changes[2].kind {
        ChangeKind::Delete { old } => {
            assert_eq!(old[code], Value::Text("b".into()));
            assert_eq!(old[0], Value::Null);
        }
        other => panic!("{other:?}"),
    }

    c.batch_execute("INSERT INTO none_t VALUES (1, 1)").await.unwrap();
    let tx = r.next().await;
    assert_eq!(tx.changes[0].relation.replica_identity, 'n');

    // A value far above the TOAST threshold, incompressible so it stays out of line.
    c.batch_execute(
        "INSERT INTO toast_t SELECT 1, 1, string_agg(md5(g::text), '') FROM generate_series(1, 2000) g",
    )
    .await
    .unwrap();
    let tx = r.next().await;
    let big = match col(&tx, 0, "big") {
        Value::Text(s) => s.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(big.len(), 64_000);
    c.batch_execute("UPDATE toast_t SET small = 2").await.unwrap();
    let tx = r.next().await;
    assert_eq!(col(&tx, 0, "small"), &Value::Int(2));
    assert_eq!(
        col(&tx, 0, "big"),
        &Value::UnchangedToast,
        "an unchanged TOASTed value is marked, never NULL"
    );

    // Truncate, and a transactional logical decoding message beside a change.
    c.batch_execute(
        "BEGIN; INSERT INTO none_t VALUES (2, 2);
         SELECT pg_logical_emit_message(true, 'pulse', 'hello');
         TRUNCATE toast_t, none_t; COMMIT;",
    )
    .await
    .unwrap();
    let tx = r.next().await;
    let kinds: Vec<_> = tx
        .changes
        .iter()
        .map(|c| (c.relation.name.as_str(), matches!(c.kind, ChangeKind::Truncate)))
        .collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert!(kinds.contains(&("toast_t", true)) && kinds.contains(&("none_t", true)));
    assert_eq!(tx.messages.len(), 1);
    assert_eq!(tx.messages[0].prefix, "pulse");
    assert_eq!(tx.messages[0].content, b"hello");
    r.stop().await;
}

#[tokio::test]
async fn alter_table_while_streaming_is_followed_by_name() {
    let (db, c) = fresh_db_with("cdc_alter", "CREATE TABLE t (id int PRIMARY KEY, a text, b int)").await;
    let mut r = Reader::start(&db.url(), "alter", &["public.t"]);
    r.streaming().await;
    c.batch_execute("INSERT INTO t VALUES (1, 'one', 10)")
        .await
        .unwrap();
    let tx = r.next().await;
    assert_eq!(col(&tx, 0, "b"), &Value::Int(10));
    c.batch_execute(
        "ALTER TABLE t ADD COLUMN c jsonb DEFAULT '{}'; ALTER TABLE t DROP COLUMN a;
         INSERT INTO t VALUES (2, 20, '{\"k\": true}')",
    )
    .await
    .unwrap();
    let tx = r.next().await;
    let rel = &tx.changes[0].relation;
    assert_eq!(
        rel.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        vec!["id", "b", "c"]
    );
    assert_eq!(col(&tx, 0, "b"), &Value::Int(20));
    assert_eq!(col(&tx, 0, "c"), &Value::Json(serde_json::json!({"k": true})));
    // In one transaction: a change before and after the ALTER, each with its relation.
    c.batch_execute(
        "BEGIN; INSERT INTO t VALUES (3, 30, '{}'); ALTER TABLE t ADD COLUMN d text;
         INSERT INTO t VALUES (4, 40, '{}', 'dee'); COMMIT;",
    )
    .await
    .unwrap();
    let tx = r.next().await;
    assert_eq!(tx.changes[0].relation.column("d"), None);
    assert_eq!(col(&tx, 1, "d"), &Value::Text("dee".into()));
    r.stop().await;
}

#[tokio::test]
async fn idle_database_slot_still_advances() {
    let (db, c) = fresh_db_with(
        "cdc_idle",
        "CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE other (id int)",
    )
    .await;
    let r = Reader::start(&db.url(), "idle", &["public.published"]);
    r.streaming().await;
    let before = wait_for("a confirmed position", WAIT, || slot_flush(&db, &r.slot))
        .await
        .unwrap();
    for i in 0..20 {
        c.execute("INSERT INTO other VALUES ($1)", &[&i]).await.unwrap();
    }
    let written: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let written: Lsn = written.parse().unwrap();
    assert!(written > before);
    // Keepalives come at least every wal_sender_timeout / 2 (5 s here).
    wait_for("the slot to pass the unpublished writes", WAIT, || async {
        slot_flush(&db, &r.slot).await.filter(|l| *l >= written)
    })
    .await
    .unwrap();
    r.stop().await;
}

/// Rows of `items` the writer committed, and what the ledger says pulsed applied.
async fn ledger_matches_source(db: &TestDb, slot: &str) -> Result<usize, String> {
    let c = db.connect().await.map_err(|e| e.to_string())?;
    let source: Vec<String> = c
        .query("SELECT id::text AS k FROM items ORDER BY items.id", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let applied: Vec<String> = c
        .query(
            "SELECT key FROM pulse.cdc_ledger WHERE slot = $1 AND relation = 'public.items' \
             AND kind IN ('insert', 'snapshot') ORDER BY key::int8",
            &[&slot],
        )
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let distinct: BTreeSet<&String> = applied.iter().collect();
    if distinct.len() != applied.len() {
        panic!(
            "a change was applied twice: {} ledger rows, {} distinct",
            applied.len(),
            distinct.len()
        );
    }
    if applied == source {
        Ok(source.len())
    } else {
        let diff = source.iter().zip(&applied).find(|(a, b)| a != b);
        Err(format!(
            "source has {} rows, ledger {}; first difference {diff:?}",
            source.len(),
            applied.len()
        ))
    }
}

/// Waits until the ledger matches the table; fails with the last difference.
async fn wait_ledger(db: &TestDb, slot: &str) -> usize {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match ledger_matches_source(db, slot).await {
            Ok(n) => return n,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("the ledger never matched the table: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Inserts single-row transactions into `items` until stopped, riding out connection
/// losses. The table, not this writer, is the truth of what committed.
fn spawn_writer(url: String) -> (tokio::task::JoinHandle<u64>, tokio_util::sync::CancellationToken) {
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut done = 0u64;
        while !token.is_cancelled() {
            let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(conn);
            while !token.is_cancelled() {
                if client
                    .execute("INSERT INTO items (note) VALUES ('w')", &[])
                    .await
                    .is_err()
                {
                    break;
                }
                done += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        done
    });
    (task, stop)
}

fn ledger_env(db: &TestDb, slot: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__REPLICATION__SLOT", slot.to_string()),
        ("PULSE__REPLICATION__SINK", "ledger".to_string()),
    ]
}

#[tokio::test]
async fn snapshot_plus_stream_is_exact() {
    let (db, c) = fresh_db_with(
        "cdc_snapshot",
        "CREATE TABLE items (id bigserial PRIMARY KEY, note text);
         INSERT INTO items (note) SELECT 'before' FROM generate_series(1, 2000);",
    )
    .await;
    // Writes go on while the slot is created and the snapshot read.
    let (writer, stop_writer) = spawn_writer(db.url());
    let slot = unique_slot("snapshot");
    let pulsed = InProcess::start(&ledger_env(&db, &slot)).await;
    wait_for("replication up", WAIT, || async {
        (pulsed.replication_state().await.as_deref() == Some("up")).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_writer.cancel();
    assert!(writer.await.unwrap() > 0);
    let n = wait_ledger(&db, &slot).await;
    assert!(n > 2000);
    let snapshot_rows: i64 = c
        .query_one(
            "SELECT count(*) FROM pulse.cdc_ledger WHERE slot = $1 AND kind = 'snapshot'",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(snapshot_rows >= 2000, "the initial rows came from the snapshot");
    pulsed.stop().await;
}

#[tokio::test]
async fn postgres_restart_resumes_without_loss() {
    let cluster: &'static PgCluster = Box::leak(Box::new(PgCluster::start().unwrap()));
    let db = cluster.fresh_db("cdc_restart").await.unwrap();
    db.connect()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE items (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let slot = unique_slot("restart");
    let pulsed = InProcess::start(&ledger_env(&db, &slot)).await;
    wait_for("replication up", WAIT, || async {
        (pulsed.replication_state().await.as_deref() == Some("up")).then_some(())
    })
    .await
    .unwrap();
    let (writer, stop_writer) = spawn_writer(db.url());
    wait_for("some rows applied", WAIT, || async {
        ledger_matches_source(&db, &slot).await.ok().filter(|n| *n > 50)
    })
    .await
    .ok();
    cluster.stop().unwrap();
    wait_for("replication down", WAIT, || async {
        (pulsed.replication_state().await.as_deref() == Some("down")).then_some(())
    })
    .await
    .unwrap();
    cluster.restart().unwrap();
    let restarted = std::time::Instant::now();
    wait_for("replication up again", WAIT, || async {
        (pulsed.replication_state().await.as_deref() == Some("up")).then_some(())
    })
    .await
    .unwrap();
    assert!(
        restarted.elapsed() < Duration::from_secs(10),
        "resumed in {:?}",
        restarted.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_writer.cancel();
    writer.await.unwrap();
    let n = wait_ledger(&db, &slot).await;
    assert!(n > 0);
    pulsed.stop().await;
}

#[tokio::test]
async fn pulsed_stopped_and_killed_mid_stream_loses_nothing() {
    let (db, _) = fresh_db_with(
        "cdc_kill",
        "CREATE TABLE items (id bigserial PRIMARY KEY, note text)",
    )
    .await;
    let slot = unique_slot("kill");
    let env = ledger_env(&db, &slot);
    let (writer, stop_writer) = spawn_writer(db.url());
    let applied = |min: usize| {
        let (db, slot) = (&db, slot.clone());
        async move {
            let c = db.connect().await.ok()?;
            let n: i64 = c
                .query_one("SELECT count(*) FROM pulse.cdc_ledger WHERE slot = $1", &[&slot])
                .await
                .ok()?
                .get(0);
            (n as usize >= min).then_some(n as usize)
        }
    };

    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(WAIT).await.unwrap();
    let first = wait_for("changes applied", WAIT, || applied(1)).await.unwrap();
    pulsed.signal(Signal::SIGTERM).unwrap();
    let status = pulsed.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{}", pulsed.log());
    assert!(
        pulsed.log().contains("replication stream stopped"),
        "{}",
        pulsed.log()
    );

    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(WAIT).await.unwrap();
    let second = wait_for("more changes applied", WAIT, || applied(first + 20))
        .await
        .unwrap();
    pulsed.kill9();

    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(WAIT).await.unwrap();
    wait_for("more changes after the kill", WAIT, || applied(second + 20))
        .await
        .unwrap();
    let metrics = metrics_text(&pulsed).await;
    assert!(metrics.contains("pulse_replication_rows_total"), "{metrics}");
    stop_writer.cancel();
    writer.await.unwrap();
    wait_ledger(&db, &slot).await;
    // The slot never confirms beyond what is persisted (nothing else is published).
    let c = db.connect().await.unwrap();
    let row = c
        .query_one(
            "SELECT (SELECT lsn FROM pulse.checkpoints WHERE name = $1)::text, confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let checkpoint: Lsn = row.get::<_, String>(0).parse().unwrap();
    let last_commit: Lsn = c
        .query_one(
            "SELECT max(commit_lsn)::text FROM pulse.cdc_ledger WHERE slot = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    assert!(
        checkpoint > last_commit,
        "checkpoint {checkpoint} covers the last commit {last_commit}"
    );
    pulsed.signal(Signal::SIGTERM).unwrap();
    assert!(pulsed.wait_exit(Duration::from_secs(20)).await.unwrap().success());
}

/// The replication stream's statistics for a slot: (streamed transactions, bytes).
async fn stream_stats(db: &TestDb, slot: &str) -> (i64, i64) {
    let c = db.connect().await.unwrap();
    c.query_opt(
        "SELECT stream_txns, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
    .unwrap_or((0, 0))
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_million_row_transaction_streams_in_progress() {
    let (db, c) = fresh_db_with("cdc_million", "CREATE TABLE big (id int PRIMARY KEY, v int)").await;
    let mut r = Reader::start(&db.url(), "million", &["public.big"]);
    r.streaming().await;
    let before = peak_rss_kb();
    c.batch_execute("INSERT INTO big SELECT g, g % 7 FROM generate_series(1, 1000000) g")
        .await
        .unwrap();
    let tx = r.next().await;
    assert_eq!(tx.changes.len(), 1_000_000);
    let ids_in_order = tx.changes.iter().enumerate().all(|(i, c)| match &c.kind {
        ChangeKind::Insert { new } => new[0] == Value::Int(i as i64 + 1),
        _ => false,
    });
    assert!(ids_in_order, "every row, once, in order");
    let (streamed, bytes) = stream_stats(&db, &r.slot).await;
    assert!(
        streamed >= 1 && bytes > 1_000_000,
        "PostgreSQL streamed the transaction while in progress ({streamed} txns, {bytes} bytes) instead of spilling it"
    );
    drop(tx);
    // Memory stays in proportion to the transaction itself (about 1M typed rows), not a
    // multiple of it; generous, since other tests share this process.
    let grew_mb = peak_rss_kb().saturating_sub(before) / 1024;
    eprintln!("a_million_row_transaction: peak RSS grew by {grew_mb} MiB");
    assert!(grew_mb < 1500, "peak RSS grew by {grew_mb} MiB");
    r.stop().await;
}

#[tokio::test]
async fn walsender_terminated_mid_transaction() {
    let (db, c) = fresh_db_with("cdc_terminate", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let mut r = Reader::start(&db.url(), "terminate", &["public.t"]);
    r.streaming().await;
    c.batch_execute("INSERT INTO t VALUES (0, 'before')")
        .await
        .unwrap();
    let first = r.next().await;
    assert_eq!(first.changes.len(), 1);

    // A large transaction, streamed in progress, with a subtransaction that aborts.
    let mut w = db.connect().await.unwrap();
    let tx = w.transaction().await.unwrap();
    tx.batch_execute("INSERT INTO t SELECT g, repeat('x', 50) FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    tx.batch_execute(
        "SAVEPOINT s; INSERT INTO t SELECT g, 'gone' FROM generate_series(100001, 110000) g; ROLLBACK TO SAVEPOINT s",
    )
    .await
    .unwrap();
    wait_for("the open transaction to be streamed", WAIT, || async {
        (stream_stats(&db, &r.slot).await.0 >= 1).then_some(())
    })
    .await
    .unwrap();
    let pid = match &*r.handle().status.borrow() {
        CdcStatus::Streaming { pid } => *pid,
        other => panic!("{other:?}"),
    };
    let killed: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    tx.batch_execute("INSERT INTO t SELECT g, 'after' FROM generate_series(20001, 30000) g")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (-1, 'last')")
        .await
        .unwrap();

    // After the reconnect: the big transaction once and whole, without the aborted part,
    // and the first one never again.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|t: &Transaction| t.changes.len() == 1 && col(t, 0, "id") == &Value::Int(-1))
    {
        let t = r.next().await;
        if t.end_lsn > first.end_lsn {
            seen.push(t);
        } else {
            assert_eq!(
                t.end_lsn, first.end_lsn,
                "only an unconfirmed transaction may come again"
            );
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "{:?}",
        seen.iter().map(|t| t.changes.len()).collect::<Vec<_>>()
    );
    let big = &seen[0];
    assert_eq!(big.changes.len(), 30000);
    let ids: BTreeSet<i64> = big
        .changes
        .iter()
        .map(|c| match &c.kind {
            ChangeKind::Insert { new } => match new[0] {
                Value::Int(i) => i,
                _ => panic!(),
            },
            _ => panic!(),
        })
        .collect();
    assert_eq!(ids, (1..=30000).collect());
    let new_pid = match &*r.handle().status.borrow() {
        CdcStatus::Streaming { pid } => *pid,
        other => panic!("{other:?}"),
    };
    assert_ne!(new_pid, pid, "a new walsender");
    r.stop().await;
}

async fn retry_error(r: &Reader) -> String {
    let mut status = r.handle().status.clone();
    let s = tokio::time::timeout(WAIT, status.wait_for(|s| matches!(s, CdcStatus::Retrying { .. })))
        .await
        .expect("an error")
        .unwrap()
        .clone();
    match s {
        CdcStatus::Retrying { error, .. } => error,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn set_up_errors_say_what_to_do() {
    let (db, c) = fresh_db_with(
        "cdc_errors",
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
         CREATE PUBLICATION pulse_test FOR TABLE a;",
    )
    .await;
    let role = format!("norepl_{}", std::process::id());
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; GRANT ALL ON DATABASE \"{}\" TO {role}",
        db.name
    ))
    .await
    .unwrap();

    // The publication lacks a configured table.
    let r = Reader::start(&db.url(), "errors", &["public.a", "public.b"]);
    let e = retry_error(&r).await;
    assert!(
        e.contains("does not include table public.b") && e.contains("ALTER PUBLICATION"),
        "{e}"
    );
    r.stop().await;

    // A configured table is missing.
    let r = Reader::start(&db.url(), "errors", &["public.nope"]);
    let e = retry_error(&r).await;
    assert!(e.contains("public.nope") && e.contains("does not exist"), "{e}");
    r.stop().await;

    // The role lacks REPLICATION.
    let url = db.url().replacen("postgres@", &format!("{role}@"), 1);
    let r = Reader::start(&url, "errors", &["public.a"]);
    let e = retry_error(&r).await;
    assert!(e.contains("REPLICATION") && e.contains(&role), "{e}");
    r.stop().await;

    // The slot is active in another process: the error names the PID.
    let slot = unique_slot("busy");
    let first = Reader::start_on(&db.url(), &slot, &["public.a"], |_| {});
    first.streaming().await;
    let pid = match &*first.handle().status.borrow() {
        CdcStatus::Streaming { pid } => *pid,
        _ => unreachable!(),
    };
    let second = Reader::start_on(&db.url(), &slot, &["public.a"], |_| {});
    let e = retry_error(&second).await;
    assert!(e.contains(&format!("PID {pid}")) && e.contains("active"), "{e}");
    second.stop().await;
    first.stop().await;

    // A slot without a loaded state, for a consumer that needs the snapshot.
    let r = Reader::start_on(&db.url(), &slot, &["public.a"], |c| c.needs_snapshot = true);
    let e = retry_error(&r).await;
    assert!(
        e.contains("never loaded") && e.contains("pulsed slot drop"),
        "{e}"
    );
    r.stop().await;

    // Creation off and nothing there.
    let r = Reader::start_on(&db.url(), &unique_slot("missing"), &["public.a"], |c| {
        c.create = false
    });
    let e = retry_error(&r).await;
    assert!(
        e.contains("does not exist") && e.contains("replication.create"),
        "{e}"
    );
    r.stop().await;
    c.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn slot_status_and_drop_from_the_command_line() {
    let (db, _) = fresh_db_with("cdc_slot_cli", "CREATE TABLE a (id int PRIMARY KEY)").await;
    let slot = unique_slot("cli");
    let r = Reader::start_on(&db.url(), &slot, &["public.a"], |_| {});
    r.streaming().await;
    let pulsed = |args: &[&str]| {
        std::process::Command::new(pulsed_bin())
            .args(["--config", "/dev/null", "slot"])
            .args(args)
            .env("PULSE__SOURCE__URL", db.url())
            .env("PULSE__REPLICATION__SLOT", &slot)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = pulsed(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in [
        "confirmed flush",
        "retained wal",
        "wal_status       reserved",
        "lag",
    ] {
        assert!(text.contains(field), "{field}: {text}");
    }
    assert!(text.contains("active pid       "), "{text}");
    // Active: refused, naming the PID.
    let out = pulsed(&["drop", "--yes"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PID"));
    r.stop().await;
    // Without a terminal and without --yes: refused, kept.
    let out = pulsed(&["drop"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(slot_flush(&db, &slot).await.is_some(), "kept");
    let out = pulsed(&["drop", "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = pulsed(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

async fn replication_component(pulsed: &Pulsed) -> Option<(u16, String, String)> {
    let (status, body) = readyz(&pulsed.http).await?;
    let c = component(&body, "replication")?;
    Some((
        status,
        c["state"].as_str()?.to_string(),
        c["detail"].as_str()?.to_string(),
    ))
}

#[tokio::test]
async fn readyz_reflects_the_stream_and_retained_wal() {
    let (db, c) = fresh_db_with(
        "cdc_readyz",
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE other (pad text)",
    )
    .await;
    let slot = unique_slot("readyz");
    // Someone else streams from the slot: pulsed is not ready and says who.
    let squatter = Reader::start_on(&db.url(), &slot, &["public.a"], |_| {});
    squatter.streaming().await;
    let pid = match &*squatter.handle().status.borrow() {
        CdcStatus::Streaming { pid } => *pid,
        _ => unreachable!(),
    };
    let env = [
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__REPLICATION__SLOT", slot.clone()),
        ("PULSE__REPLICATION__TABLES", "public.a".to_string()),
        ("PULSE__REPLICATION__MAX_RETAINED_WAL_MB", "1".to_string()),
        ("PULSE__REPLICATION__SINK", "checkpoint".to_string()),
    ];
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    let (status, state, detail) = wait_for("replication down", WAIT, || async {
        replication_component(&pulsed)
            .await
            .filter(|(_, _, d)| d.contains("PID"))
    })
    .await
    .unwrap();
    assert_eq!((status, state.as_str()), (503, "down"));
    assert!(detail.contains(&format!("PID {pid}")), "{detail}");
    squatter.stop().await;
    pulsed.wait_ready(WAIT).await.unwrap();
    let (_, state, _) = replication_component(&pulsed).await.unwrap();
    assert_eq!(state, "up");

    // An open transaction holds the slot's restart point while WAL grows past 1 MiB.
    let mut holder = db.connect().await.unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("INSERT INTO other VALUES ('hold')")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO other SELECT repeat(md5(g::text), 4) FROM generate_series(1, 30000) g")
        .await
        .unwrap();
    let (status, _, detail) = wait_for("the retained-WAL warning", WAIT, || async {
        replication_component(&pulsed)
            .await
            .filter(|(_, s, _)| s == "degraded")
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "degraded, still ready");
    assert!(
        detail.contains("retains") && detail.contains("limit 1 MiB"),
        "{detail}"
    );
    assert!(pulsed.log().contains("max_retained_wal_mb"), "{}", pulsed.log());
    hold.rollback().await.unwrap();
    pulsed.signal(Signal::SIGTERM).unwrap();
    assert!(pulsed.wait_exit(Duration::from_secs(20)).await.unwrap().success());
}

#[tokio::test]
async fn invalidated_slot_and_wal_level_are_reported() {
    let cluster: &'static PgCluster = Box::leak(Box::new(PgCluster::start().unwrap()));
    let db = cluster.fresh_db("cdc_cluster_errors").await.unwrap();
    let c = db.connect().await.unwrap();
    c.batch_execute("CREATE TABLE a (id int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    let slot = unique_slot("lost");
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();
    // Let PostgreSQL remove WAL the idle slot still needs.
    c.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    wait_for("the slot to be invalidated", WAIT, || async {
        for sql in [
            "INSERT INTO a SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g ON CONFLICT (id) DO UPDATE SET pad = EXCLUDED.pad",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            c.batch_execute(sql).await.ok()?;
        }
        let status: Option<String> = c
            .query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .ok()?
            .get(0);
        (status.as_deref() == Some("lost")).then_some(())
    })
    .await
    .unwrap();
    let r = Reader::start_on(&db.url(), &slot, &["public.a"], |_| {});
    let e = retry_error(&r).await;
    assert!(e.contains("invalidated") && e.contains("pulsed slot drop"), "{e}");
    r.stop().await;

    // wal_level below logical (no logical slot may exist then).
    c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    c.batch_execute("ALTER SYSTEM SET wal_level = replica")
        .await
        .unwrap();
    drop(c);
    cluster.stop().unwrap();
    cluster.restart().unwrap();
    let r = Reader::start(&db.url(), "wal_level", &["public.a"]);
    let e = retry_error(&r).await;
    assert!(
        e.contains("wal_level is \"replica\"") && e.contains("wal_level = logical"),
        "{e}"
    );
    r.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_holds_the_walsender_back_without_timing_out() {
    let (db, c) = fresh_db_with(
        "cdc_backpressure",
        "CREATE TABLE t (id int PRIMARY KEY, pad text)",
    )
    .await;
    let mut r = Reader::start_on(&db.url(), &unique_slot("slow"), &["public.t"], |c| {
        c.channel_capacity = 2
    });
    r.streaming().await;
    let pid = match &*r.handle().status.borrow() {
        CdcStatus::Streaming { pid } => *pid,
        _ => unreachable!(),
    };
    // About 60 MB of changes in 15,000 transactions, far more than socket buffers hold.
    c.batch_execute(
        "DO $$ BEGIN FOR i IN 1..15000 LOOP
            INSERT INTO t VALUES (i, repeat(md5(i::text), 128)); COMMIT;
         END LOOP; END $$",
    )
    .await
    .unwrap();
    let end: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let end: Lsn = end.parse().unwrap();
    let sent = || async {
        let s: Option<String> = c
            .query_opt(
                "SELECT sent_lsn::text FROM pg_stat_replication WHERE pid = $1",
                &[&pid],
            )
            .await
            .ok()??
            .get(0);
        s?.parse::<Lsn>().ok()
    };
    // Nothing is consumed for longer than wal_sender_timeout (10 s): the walsender is
    // held back by the full socket, and the same session survives on status updates.
    let waited = std::time::Instant::now();
    while waited.elapsed() < Duration::from_secs(12) {
        let s = sent().await.expect("the same walsender is still streaming");
        assert!(
            s < end,
            "the walsender sent everything ({s} of {end}): no back-pressure"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for i in 1..=15000i64 {
        let tx = r.next().await;
        assert_eq!(col(&tx, 0, "id"), &Value::Int(i));
    }
    assert_eq!(
        &*r.handle().status.borrow(),
        &CdcStatus::Streaming { pid },
        "no reconnect was needed"
    );
    r.stop().await;
}

/// The cluster of the TLS tests: `ssl = on`, TCP only over TLS, a certificate for
/// `localhost` only.
fn tls_cluster() -> &'static PgCluster {
    static CLUSTER: std::sync::OnceLock<PgCluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        PgCluster::start_with(ClusterOptions {
            ssl: true,
            ssl_only: true,
        })
        .expect("start the TLS test cluster")
    })
}

/// Whether the backend `pid` speaks TLS (`pg_stat_ssl`).
async fn uses_tls(admin: &tokio_postgres::Client, pid: i32) -> bool {
    admin
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0)
}

/// An ordinary connection through pulsed's own path (DbUrl, db::connect): whether it
/// is TLS, or the error.
async fn ordinary_connection(url: &str) -> Result<bool, String> {
    let url = pulse_daemon::config::DbUrl::parse(url)?;
    let c = pulse_daemon::db::connect(&url)
        .await
        .map_err(|e| pulse_daemon::db::explain(&e, &url))?;
    Ok(
        c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0),
    )
}

/// A replication connection: whether it is TLS, or the error.
async fn replication_connection(admin: &tokio_postgres::Client, url: &str) -> Result<bool, String> {
    let (config, tls) = pulse_cdc::tls::parse_url(url)?;
    let conn = pulse_cdc::conn::ReplConn::connect(&config, &tls)
        .await
        .map_err(|e| e.to_string())?;
    let ssl = uses_tls(admin, conn.pid).await;
    conn.close().await;
    Ok(ssl)
}

/// What a connection URL gives in the TLS tests.
#[derive(Clone, Copy)]
enum TlsOutcome {
    /// A TLS session.
    Tls,
    /// A refusal whose message holds every one of these.
    Refused(&'static [&'static str]),
}

#[tokio::test]
async fn tls_modes_for_replication_and_ordinary_connections() {
    use TlsOutcome::{Refused, Tls};

    let cluster = tls_cluster();
    let db = cluster.fresh_db("cdc_tls").await.unwrap();
    let admin = db.connect().await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, note text);
             DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pulse_cert') THEN
                 CREATE ROLE pulse_cert LOGIN SUPERUSER;
               END IF;
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pulse_scram') THEN
                 SET password_encryption = 'scram-sha-256';
                 CREATE ROLE pulse_scram LOGIN SUPERUSER PASSWORD 'scram-secret';
               END IF;
             END $$;",
        )
        .await
        .unwrap();
    let ca = cluster.tls_file("ca.crt").display().to_string();
    let other_ca = cluster.tls_file("other-ca.crt").display().to_string();
    let client_crt = cluster.tls_file("client.crt").display().to_string();
    let client_key = cluster.tls_file("client.key").display().to_string();
    let url = |user: &str, host: &str, params: String| {
        format!("postgres://{user}@{host}:{}/{}?{params}", cluster.port, db.name)
    };
    // Each URL on both paths, an ordinary connection and a replication one: TLS, or
    // refused with a message that says what to do.
    let verify_full = format!("sslmode=verify-full&sslrootcert={ca}");
    let cases: [(&str, &str, &str, String, TlsOutcome); 12] = [
        (
            "require: TLS, no verification",
            "postgres",
            "127.0.0.1",
            "sslmode=require".into(),
            Tls,
        ),
        (
            "the default (prefer) takes TLS when offered",
            "postgres",
            "127.0.0.1",
            String::new(),
            Tls,
        ),
        (
            "verify-full with the right authority and the certificate's host name",
            "postgres",
            "localhost",
            verify_full.clone(),
            Tls,
        ),
        (
            "verify-full with a host the certificate does not name",
            "postgres",
            "127.0.0.1",
            verify_full.clone(),
            Refused(&["not valid for host \"127.0.0.1\"", "verify-ca"]),
        ),
        (
            "verify-ca checks the chain only",
            "postgres",
            "127.0.0.1",
            format!("sslmode=verify-ca&sslrootcert={ca}"),
            Tls,
        ),
        (
            "the wrong authority",
            "postgres",
            "localhost",
            format!("sslmode=verify-full&sslrootcert={other_ca}"),
            Refused(&["not signed by a trusted authority", "sslrootcert"]),
        ),
        (
            "require with a root certificate verifies the chain, as libpq does",
            "postgres",
            "127.0.0.1",
            format!("sslmode=require&sslrootcert={other_ca}"),
            Refused(&["not signed by a trusted authority"]),
        ),
        (
            "disable against a server that accepts TCP only over TLS",
            "postgres",
            "127.0.0.1",
            "sslmode=disable".into(),
            Refused(&["no encryption", "accepts only TLS", "sslmode=verify-full"]),
        ),
        (
            "a client certificate (cert authentication)",
            "pulse_cert",
            "localhost",
            format!("{verify_full}&sslcert={client_crt}&sslkey={client_key}"),
            Tls,
        ),
        (
            "cert authentication without a client certificate",
            "pulse_cert",
            "localhost",
            verify_full.clone(),
            Refused(&["certificate"]),
        ),
        (
            "SCRAM over TLS (the server offers SCRAM-SHA-256-PLUS: channel binding)",
            "pulse_scram:scram-secret",
            "localhost",
            verify_full.clone(),
            Tls,
        ),
        (
            "SCRAM over TLS with a wrong password",
            "pulse_scram:wrong",
            "localhost",
            verify_full.clone(),
            Refused(&["password authentication failed"]),
        ),
    ];
    for (case, user, host, params, want) in cases {
        let u = url(user, host, params);
        let ordinary = ordinary_connection(&u).await;
        let replication = replication_connection(&admin, &u).await;
        for (path, got) in [("ordinary", ordinary), ("replication", replication)] {
            match want {
                Tls => assert_eq!(got, Ok(true), "{case}: {path} connection to {u}"),
                Refused(needles) => {
                    let e = got.expect_err(case);
                    assert!(
                        needles.iter().all(|n| e.contains(n)),
                        "{case}: {path} connection to {u}: {e}"
                    );
                }
            }
        }
    }

    // A missing root certificate file is refused before connecting.
    let e = ordinary_connection(&url(
        "postgres",
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".into(),
    ))
    .await
    .unwrap_err();
    assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
    // The whole stream over verify-full: catalog, slot, changes.
    let r = Reader::start(
        &url(
            "postgres",
            "localhost",
            format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "tls",
        &["public.items"],
    );
    r.streaming().await;
    let pid = match &*r.handle().status.borrow() {
        CdcStatus::Streaming { pid } => *pid,
        _ => unreachable!(),
    };
    assert!(uses_tls(&admin, pid).await, "the walsender's session is TLS");
    let mut r = r;
    admin
        .execute("INSERT INTO items VALUES (1, 'over tls')", &[])
        .await
        .unwrap();
    let tx = r.next().await;
    assert_eq!(col(&tx, 0, "note"), &Value::Text("over tls".into()));
    r.stop().await;
}

#[tokio::test]
async fn pulsed_uses_one_tls_url_everywhere() {
    let cluster = tls_cluster();
    let db = cluster.fresh_db("cdc_tls_pulsed").await.unwrap();
    let admin = db.connect().await.unwrap();
    admin
        .batch_execute("CREATE TABLE items (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@localhost:{}/{}?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        db.name,
        cluster.tls_file("ca.crt").display()
    );
    let slot = unique_slot("tls_pulsed");
    let env = vec![
        ("PULSE__SOURCE__URL", url.clone()),
        ("PULSE__STATE__URL", url.clone()),
        ("PULSE__REPLICATION__SLOT", slot.clone()),
        ("PULSE__REPLICATION__SINK", "ledger".to_string()),
    ];
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed
        .wait_ready(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", pulsed.log()));
    admin
        .execute("INSERT INTO items (note) VALUES ('a'), ('b')", &[])
        .await
        .unwrap();
    wait_ledger(&db, &slot).await;
    // Every session pulsed holds on this database is TLS.
    let plain: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid() AND a.client_addr IS NOT NULL AND NOT s.ssl",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);
    let out = std::process::Command::new(pulsed_bin())
        .args(["--config", "/dev/null", "slot", "status"])
        .env("PULSE__SOURCE__URL", &url)
        .env("PULSE__REPLICATION__SLOT", &slot)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("confirmed flush"));
    pulsed.signal(Signal::SIGTERM).unwrap();
    assert!(
        pulsed.wait_exit(Duration::from_secs(20)).await.unwrap().success(),
        "{}",
        pulsed.log()
    );
}

/// Runs `pulsed slot drop <slot>` on a pseudo-terminal (util-linux `script`), typing
/// `answer` at the prompt: its exit status and what the terminal showed.
fn slot_drop_in_a_terminal(db: &TestDb, slot: &str, answer: &str) -> (bool, String) {
    use std::io::Write;
    let command = format!(
        "'{}' --config /dev/null slot drop '{slot}'",
        pulsed_bin().display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("PULSE__SOURCE__URL", db.url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs pulsed on a pseudo-terminal");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{answer}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn slot_drop_asks_for_confirmation_in_a_terminal() {
    let db = PgCluster::shared().fresh_db("cdc_slot_tty").await.unwrap();
    let c = db.connect().await.unwrap();
    let slot = unique_slot("tty");
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();
    let exists = || async {
        c.query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .is_some()
    };
    // Anything but the slot's name keeps it: "no", and "yes" too.
    for answer in ["no", "yes"] {
        let (ok, text) = slot_drop_in_a_terminal(&db, &slot, answer);
        assert!(!ok, "{answer}: {text}");
        assert!(text.contains("Type the slot name to confirm"), "{text}");
        assert!(text.contains("not confirmed") && text.contains("kept"), "{text}");
        assert!(exists().await, "kept after {answer:?}");
    }
    // The slot's name drops it.
    let (ok, text) = slot_drop_in_a_terminal(&db, &slot, &slot);
    assert!(ok, "{text}");
    assert!(text.contains("dropped replication slot"), "{text}");
    assert!(!exists().await, "dropped");
}
