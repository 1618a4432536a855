//! Webhooks and commands through the real RabbitMQ: the outbox relay across a broker
//! outage and a SIGKILL, returned events and the dead-letter table, commands and their
//! dead-letter queue, and the round trip with a real Symfony Messenger (PHP).
//!
//! The outage is forced with a TCP proxy between pulsed and RabbitMQ that the test cuts
//! (every open connection closed, new ones refused) and restores: the system broker keeps
//! running for every other test.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use pulse_daemon::outbox::{self, OutboxEvent};
use pulse_harness::{PgCluster, Pulsed, Rabbit, TestDb, wait_for};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::support::{
    Broker, Seen, column, component, header_text, metrics_text, pulsed_bin, readyz, tap, wait_processed,
};

fn distinct(seen: &Mutex<Vec<Seen>>) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .map(|s| s.message_id.clone())
        .collect::<HashSet<_>>()
        .len()
}

/// The numbered test event `n` of aggregate `user:(n % aggregates)`.
fn event(prefix: &str, n: u32, aggregates: u32) -> OutboxEvent {
    let user = n % aggregates;
    OutboxEvent::new(
        "presence.joined",
        format!("{prefix}-{n}"),
        format!("user:{user}"),
        json!({ "tenantId": "t1", "userId": user.to_string(), "resource": "doc", "seq": n }),
    )
    .unwrap()
}

async fn enqueue(db: &TestDb, events: &[OutboxEvent]) {
    let mut client = db.connect().await.unwrap();
    let tx = client.transaction().await.unwrap();
    outbox::enqueue_all(&tx, events).await.unwrap();
    tx.commit().await.unwrap();
}

async fn migrated(db: &TestDb) {
    let mut client = db.connect().await.unwrap();
    pulse_daemon::migrate::migrate(&mut client).await.unwrap();
}

async fn pending(db: &TestDb) -> i64 {
    db.connect()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pulse.outbox WHERE delivered_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until `total` distinct events reached the broker and the outbox is empty.
async fn wait_all_delivered(
    seen: &Mutex<Vec<Seen>>,
    db: &TestDb,
    pulsed: &Pulsed,
    total: u32,
    timeout: Duration,
) {
    wait_for("every event", timeout, || async {
        (distinct(seen) as u32 >= total).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
    wait_for("an empty outbox", Duration::from_secs(10), || async {
        (pending(db).await == 0).then_some(())
    })
    .await
    .unwrap();
}

/// Every expected event arrived at least once, duplicates are identical to the first
/// copy (same message_id, same body), each carries what Symfony needs, and per
/// aggregate the first copies arrived in enqueue order. Returns the duplicate count.
fn check_delivery(seen: &[Seen], prefix: &str, total: u32, aggregates: u32) -> usize {
    let mut first: HashMap<&str, &Seen> = HashMap::new();
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut duplicates = 0;
    for s in seen {
        assert_eq!(s.content_type.as_deref(), Some("application/json"), "{s:?}");
        assert!(s.persistent, "not persistent: {s:?}");
        assert_eq!(
            s.class.as_deref(),
            Some("App\\Message\\Pulse\\PresenceJoined"),
            "{s:?}"
        );
        assert_eq!(s.routing_key, "presence.joined");
        match first.get(s.message_id.as_str()) {
            Some(f) => {
                duplicates += 1;
                assert_eq!(f.body, s.body, "a duplicate differs from its first copy");
            }
            None => {
                first.insert(&s.message_id, s);
                let seq = s.body["seq"].as_u64().unwrap();
                assert_eq!(s.message_id, format!("{prefix}-{seq}"));
                order
                    .entry(s.body["userId"].as_str().unwrap().to_string())
                    .or_default()
                    .push(seq);
            }
        }
    }
    let missing: Vec<u32> = (0..total)
        .filter(|n| !first.contains_key(format!("{prefix}-{n}").as_str()))
        .collect();
    assert!(missing.is_empty(), "events never delivered: {missing:?}");
    assert_eq!(order.len() as u32, aggregates);
    for (user, seqs) in order {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "events of user {user} arrived out of order: {seqs:?}"
        );
    }
    duplicates
}

/// A TCP proxy in front of RabbitMQ that the test can cut and restore.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (flag, conns) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            port,
            up,
            connections,
        }
    }

    /// Closes every proxied connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    fn url(&self, rabbit: &Rabbit) -> String {
        let mut u = url::Url::parse(&rabbit.url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.to_string()
    }
}

fn broker_target(rabbit: &Rabbit) -> String {
    let u = url::Url::parse(&rabbit.url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5672))
}

#[tokio::test]
async fn a_broker_outage_mid_stream_loses_nothing() {
    let db = PgCluster::shared().fresh_db("amqp_outage").await.unwrap();
    migrated(&db).await;
    let broker = Broker::new("outage").await;
    let seen = broker.record("#").await;

    let proxy = Proxy::start(broker_target(&broker.rabbit)).await;
    let mut pulsed =
        Pulsed::spawn(&pulsed_bin(), &broker.names.env(&db, &proxy.url(&broker.rabbit))).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();

    // A steady stream: 300 transactions of 10 events over 20 aggregates.
    const TOTAL: u32 = 3000;
    let producer = {
        let url = db.url();
        tokio::spawn(async move {
            let (mut client, c) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(c);
            for chunk in 0..TOTAL / 10 {
                let events: Vec<_> = (chunk * 10..chunk * 10 + 10)
                    .map(|n| event("outage", n, 20))
                    .collect();
                let tx = client.transaction().await.unwrap();
                outbox::enqueue_all(&tx, &events).await.unwrap();
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    wait_for("the first events", Duration::from_secs(30), || async {
        (distinct(&seen) >= 300).then_some(())
    })
    .await
    .unwrap();
    proxy.cut();
    // pulsed stays up and ready, says the broker is degraded, and the outbox grows.
    wait_for("broker degraded in /readyz", Duration::from_secs(20), || async {
        let (status, body) = readyz(&pulsed.http).await.expect("pulsed answers /readyz");
        let broker = component(&body, "broker")?;
        (status == 200 && broker["state"] == "degraded").then(|| broker["detail"].clone())
    })
    .await
    .unwrap();
    let during = pending(&db).await;
    wait_for(
        "the outbox to grow during the outage",
        Duration::from_secs(20),
        || async { (pending(&db).await > during + 200).then_some(()) },
    )
    .await
    .unwrap();
    let received_during = distinct(&seen);
    proxy.restore();

    producer.await.unwrap();
    wait_all_delivered(&seen, &db, &pulsed, TOTAL, Duration::from_secs(60)).await;
    wait_for("broker up again", Duration::from_secs(10), || async {
        let (_, body) = readyz(&pulsed.http).await.expect("pulsed answers /readyz");
        (component(&body, "broker")?["state"] == "up").then_some(())
    })
    .await
    .unwrap();
    // The command consumer came back with the new session too.
    broker
        .send_command(
            Some("App\\Message\\Pulse\\Command\\ChangeSetting"),
            &json!({"commandId": "after-outage", "key": "sync_interval_ms", "value": 900}),
        )
        .await;
    let client = db.connect().await.unwrap();
    wait_processed(&client, "after-outage", &pulsed).await;
    let all = seen.lock().unwrap().clone();
    let dups = check_delivery(&all, "outage", TOTAL, 20);
    eprintln!(
        "outage: {} deliveries, {dups} duplicates, {received_during} distinct before the restore",
        all.len()
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn pulsed_killed_mid_relay_resends_with_the_same_message_ids() {
    let db = PgCluster::shared().fresh_db("amqp_kill9").await.unwrap();
    migrated(&db).await;
    const TOTAL: u32 = 20_000;
    let events: Vec<_> = (0..TOTAL).map(|n| event("kill", n, 50)).collect();
    for chunk in events.chunks(2000) {
        enqueue(&db, chunk).await;
    }
    let broker = Broker::new("kill9").await;
    let seen = broker.record("#").await;

    let mut env = broker.names.env(&db, &broker.rabbit.url);
    env.push(("PULSE__AMQP__PUBLISH_BATCH", "200".into()));
    let mut first = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    wait_for("the relay to be under way", Duration::from_secs(30), || async {
        (distinct(&seen) >= 1000).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", first.log()));
    first.kill9();
    let left = pending(&db).await;
    assert!(
        left > 0,
        "the relay finished before the kill; the test needs more events"
    );

    let mut second = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    second.wait_ready(Duration::from_secs(20)).await.unwrap();
    wait_all_delivered(&seen, &db, &second, TOTAL, Duration::from_secs(120)).await;
    let all = seen.lock().unwrap().clone();
    let dups = check_delivery(&all, "kill", TOTAL, 50);
    eprintln!(
        "kill -9 with {left} pending: {} deliveries, {dups} duplicates",
        all.len()
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn a_returned_event_is_retried_then_dead_lettered_then_requeued() {
    let db = PgCluster::shared().fresh_db("amqp_returned").await.unwrap();
    migrated(&db).await;
    let broker = Broker::new("returned").await;
    // Only presence events are routed: file events come back to pulsed.
    let seen = broker.record("presence.#").await;
    let unroutable =
        OutboxEvent::new("file.deleted", "file-gone-1", "file:1", json!({"fileId": "1"})).unwrap();
    enqueue(&db, &[event("ret", 0, 1), unroutable, event("ret", 1, 1)]).await;

    let mut env = broker.names.env(&db, &broker.rabbit.url);
    env.push(("PULSE__AMQP__MAX_ATTEMPTS", "3".into()));
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();
    let client = db.connect().await.unwrap();
    let (attempts, error): (i32, String) = wait_for("the dead letter", Duration::from_secs(20), || async {
        client
            .query_opt(
                "SELECT attempts, last_error FROM pulse.outbox_dead WHERE message_id = 'file-gone-1'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1)))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
    assert_eq!(attempts, 3);
    assert!(
        error.contains("returned") && error.contains("file.deleted"),
        "{error}"
    );
    // The other aggregate's events were not held back.
    wait_for("the routable events", Duration::from_secs(10), || async {
        (distinct(&seen) == 2).then_some(())
    })
    .await
    .unwrap();

    // Once Symfony binds file events, the console requeues the dead letter.
    broker
        .channel
        .queue_bind(
            broker.names.tap.as_str().into(),
            broker.names.exchange.as_str().into(),
            "file.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let id: i64 = client
        .query_one(
            "SELECT id FROM pulse.outbox_dead WHERE message_id = 'file-gone-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut admin = db.connect().await.unwrap();
    assert!(
        pulse_daemon::relay::requeue_dead_letter(&mut admin, id, "ops")
            .await
            .unwrap()
    );
    let listed = pulse_daemon::relay::dead_letters(&client, 10).await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    wait_for("the requeued event", Duration::from_secs(10), || async {
        seen.lock()
            .unwrap()
            .iter()
            .find(|s| s.message_id == "file-gone-1")
            .map(|s| (s.class.clone(), s.body.clone()))
    })
    .await
    .map(|(class, body)| {
        assert_eq!(class.as_deref(), Some("App\\Message\\Pulse\\FileDeleted"));
        assert_eq!(body, json!({"fileId": "1"}));
    })
    .unwrap();
    broker.cleanup().await;
}

#[tokio::test]
async fn commands_are_applied_once_and_invalid_ones_go_to_the_dead_letter_queue() {
    let db = PgCluster::shared().fresh_db("amqp_commands").await.unwrap();
    let broker = Broker::new("commands").await;
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &broker.names.env(&db, &broker.rabbit.url)).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();
    // pulsed declares its queues (amqp.declare_topology defaults to true).
    broker.wait_commands_queue().await;

    let end_presence = Some("App\\Message\\Pulse\\Command\\EndPresence");
    let change_setting = Some("App\\Message\\Pulse\\Command\\ChangeSetting");
    broker.send_command(None, &json!({"commandId": "no-type"})).await;
    broker
        .send_command(end_presence, &json!({"commandId": "c-end", "tenantId": 1}))
        .await;
    broker
        .send_command(
            end_presence,
            &json!({"commandId": "c-presence", "tenantId": 1, "userId": 2}),
        )
        .await;
    broker
        .send_command(
            change_setting,
            &json!({"commandId": "c-bad", "key": "sync_interval_ms", "value": "soon"}),
        )
        .await;
    let good = json!({"commandId": "c-ok", "key": "sync_interval_ms", "value": 750, "actor": "alice"});
    broker.send_command(change_setting, &good).await;
    broker.send_command(change_setting, &good).await;
    broker
        .send_command(
            change_setting,
            &json!({"commandId": "c-last", "key": "enable_realtime", "value": false}),
        )
        .await;

    let client = db.connect().await.unwrap();
    wait_processed(&client, "c-last", &pulsed).await;
    let value: Value = client
        .query_one(
            "SELECT value FROM pulse.settings WHERE key = 'sync_interval_ms'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, json!(750));
    let audits: i64 = client
        .query_one(
            "SELECT count(*) FROM pulse.audit_log WHERE action = 'setting.update' AND target = 'sync_interval_ms'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 1, "the duplicate command was applied again");
    let processed: Vec<String> = column(
        &client,
        "SELECT command_id FROM pulse.processed_commands ORDER BY 1",
    )
    .await;
    // EndPresence is carried out by the engine (nobody was online: nothing to end).
    assert_eq!(processed, vec!["c-last", "c-ok", "c-presence"]);

    // Three refusals, each with its reason; bodies and headers kept for a retry.
    let reasons = Mutex::new(BTreeMap::new());
    let dead = broker.conn.create_channel().await.unwrap();
    wait_for("three dead letters", Duration::from_secs(10), || async {
        while let Some(m) = dead
            .basic_get(
                broker.names.dead.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let reason = header_text(&m.delivery.properties, "x-pulse-reason")
                .unwrap_or_else(|| panic!("no reason header: {:?}", m.delivery.properties));
            let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
            reasons
                .lock()
                .unwrap()
                .insert(body["commandId"].as_str().unwrap().to_string(), reason);
        }
        (reasons.lock().unwrap().len() == 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {reasons:?}"));
    let reasons = reasons.into_inner().unwrap();
    assert!(reasons["no-type"].contains("`type` header"), "{reasons:?}");
    assert!(reasons["c-end"].contains("userId"), "{reasons:?}");
    assert!(reasons["c-bad"].contains("sync_interval_ms"), "{reasons:?}");

    let metrics = metrics_text(&pulsed).await;
    assert!(
        metrics.contains("pulse_commands_total{kind=\"ChangeSetting\",outcome=\"duplicate\"} 1"),
        "{metrics}"
    );
    broker.cleanup().await;
}

/// Runs a PHP fixture of tests/symfony and returns its standard output.
fn php(script: &str, args: &[String]) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/symfony/");
    let out = Command::new("php")
        .arg(format!("{path}{script}"))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run php ({e}): install php-cli php-amqp php-symfony-messenger php-symfony-amqp-messenger (.ci/run does)")
        });
    assert!(
        out.status.success(),
        "php {script} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn symfony_messenger_decodes_events_and_sends_commands() {
    let db = PgCluster::shared().fresh_db("amqp_symfony").await.unwrap();
    migrated(&db).await;
    let broker = Broker::new("symfony").await;
    let names = &broker.names;
    let commands_exchange = Rabbit::unique("symfony-cmdx");
    let dead_exchange = Rabbit::unique("symfony-deadx");
    // Symfony owns the topology here, as in docs/symfony.md: it declares, pulsed checks.
    let events_transport = json!({
        "exchange": {"name": names.exchange, "type": "topic"},
        "queues": {names.tap.clone(): {"binding_keys": ["#"]}},
    });
    let commands_transport = json!({
        "exchange": {"name": commands_exchange, "type": "fanout"},
        "queues": {names.commands.clone(): {}},
    });
    let dead_transport = json!({
        "exchange": {"name": dead_exchange, "type": "fanout"},
        "queues": {names.dead.clone(): {}},
    });
    let dsn = broker.rabbit.url.clone();
    php(
        "setup.php",
        &[
            dsn.clone(),
            events_transport.to_string(),
            commands_transport.to_string(),
            dead_transport.to_string(),
        ],
    );

    let mut env = names.env(&db, &broker.rabbit.url);
    env.push(("PULSE__AMQP__DECLARE_TOPOLOGY", "false".into()));
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();

    let events = vec![
        OutboxEvent::new(
            "presence.joined",
            "sf-1",
            "user:42",
            json!({"tenantId": "t1", "userId": "42", "resource": "doc:7"}),
        )
        .unwrap(),
        OutboxEvent::new(
            "notification.created",
            "sf-2",
            "user:42",
            json!({"tenantId": "t1", "userId": "42", "notificationId": 9, "title": "Hello"}),
        )
        .unwrap(),
        OutboxEvent::new(
            "job.failed",
            "sf-3",
            "job:prune_outbox",
            json!({"job": "prune_outbox", "runId": 3, "outcome": "timeout", "error": "ran past 60 s"}),
        )
        .unwrap(),
    ];
    enqueue(&db, &events).await;

    let out = php(
        "consume.php",
        &[dsn.clone(), events_transport.to_string(), "3".into(), "30".into()],
    );
    let decoded: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(decoded.len(), 3, "{out}");
    let by_id: HashMap<&str, &Value> = decoded
        .iter()
        .map(|d| (d["message_id"].as_str().unwrap(), d))
        .collect();
    assert_eq!(by_id["sf-1"]["class"], "App\\Message\\Pulse\\PresenceJoined");
    assert_eq!(
        by_id["sf-1"]["properties"],
        json!({"tenantId": "t1", "userId": "42", "resource": "doc:7"})
    );
    assert_eq!(by_id["sf-2"]["class"], "App\\Message\\Pulse\\NotificationCreated");
    assert_eq!(by_id["sf-2"]["properties"]["notificationId"], 9);
    assert_eq!(by_id["sf-3"]["class"], "App\\Message\\Pulse\\JobFailed");
    assert_eq!(by_id["sf-3"]["properties"]["outcome"], "timeout");
    for d in &decoded {
        assert_eq!(d["content_type"], "application/json");
        assert_eq!(d["delivery_mode"], 2);
    }

    php(
        "produce.php",
        &[
            dsn.clone(),
            commands_transport.to_string(),
            json!({"class": "App\\Message\\Pulse\\Command\\ChangeSetting",
                   "properties": {"commandId": "sf-cmd-1", "key": "sync_interval_ms", "value": 1250, "actor": "admin@club"}})
            .to_string(),
            json!({"class": "App\\Message\\Pulse\\Command\\EndPresence",
                   "properties": {"commandId": "sf-cmd-2", "tenantId": "t1", "userId": "42"}})
            .to_string(),
        ],
    );
    let client = db.connect().await.unwrap();
    let (value, by): (Value, String) =
        wait_for("the setting from Symfony", Duration::from_secs(20), || async {
            client
                .query_opt(
                    "SELECT value, updated_by FROM pulse.settings WHERE key = 'sync_interval_ms'",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .map(|r| (r.get(0), r.get(1)))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
    assert_eq!(value, json!(1250));
    assert_eq!(by, "symfony:admin@club");
    // EndPresence is carried out by the engine too.
    assert_eq!(wait_processed(&client, "sf-cmd-2", &pulsed).await, "applied");

    broker.cleanup().await;
    for x in [commands_exchange, dead_exchange] {
        let _ = broker
            .channel
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
}

#[tokio::test]
async fn missing_topology_owned_by_symfony_is_reported_until_it_exists() {
    let db = PgCluster::shared().fresh_db("amqp_passive").await.unwrap();
    let broker = Broker::new("passive").await;
    let names = &broker.names;
    let mut env = names.env(&db, &broker.rabbit.url);
    env.push(("PULSE__AMQP__DECLARE_TOPOLOGY", "false".into()));
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();
    // The exchange exists (Symfony set up its events transport), the queues do not yet.
    tap(&broker.channel, names, "#").await;
    let detail = wait_for(
        "the missing queue in /readyz",
        Duration::from_secs(20),
        || async {
            let (status, body) = readyz(&pulsed.http).await.expect("pulsed answers /readyz");
            let broker = component(&body, "broker")?;
            let detail = broker["detail"].as_str()?.to_string();
            (status == 200 && broker["state"] == "degraded" && detail.contains(&names.commands))
                .then_some(detail)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
    assert!(detail.contains("declare_topology"), "{detail}");
    for q in [&names.commands, &names.dead] {
        broker
            .channel
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    wait_for(
        "the broker up once the topology exists",
        Duration::from_secs(20),
        || async {
            let (_, body) = readyz(&pulsed.http).await.expect("pulsed answers /readyz");
            (component(&body, "broker")?["state"] == "up").then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
    broker.cleanup().await;
}
