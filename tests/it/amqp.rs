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

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use pulse_daemon::outbox::{self, OutboxEvent};
use pulse_harness::{PgCluster, Pulsed, Rabbit, TestDb, wait_for};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::support::pulsed_bin;

/// Uniquely named broker objects of one test, deleted at the end.
pub(crate) struct Names {
    pub(crate) exchange: String,
    pub(crate) commands: String,
    pub(crate) dead: String,
    /// The test's own queue, bound to the events exchange.
    pub(crate) tap: String,
}

impl Names {
    pub(crate) fn new(label: &str) -> Names {
        Names {
            exchange: Rabbit::unique(&format!("{label}-x")),
            commands: Rabbit::unique(&format!("{label}-cmd")),
            dead: Rabbit::unique(&format!("{label}-dead")),
            tap: Rabbit::unique(&format!("{label}-tap")),
        }
    }

    pub(crate) fn env(&self, db: &TestDb, amqp_url: &str) -> Vec<(&'static str, String)> {
        vec![
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__AMQP__URL", amqp_url.to_string()),
            ("PULSE__AMQP__EXCHANGE", self.exchange.clone()),
            ("PULSE__AMQP__COMMANDS_QUEUE", self.commands.clone()),
            ("PULSE__AMQP__COMMANDS_DEAD_LETTER_QUEUE", self.dead.clone()),
            ("PULSE__AMQP__RETRY_MAX_MS", "1000".into()),
            ("PULSE__AMQP__RETRY_BASE_MS", "50".into()),
            ("PULSE__JOBS__ENABLED", "false".into()),
        ]
    }

    pub(crate) async fn cleanup(&self, channel: &lapin::Channel) {
        for q in [&self.commands, &self.dead, &self.tap] {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(self.exchange.as_str().into(), Default::default())
            .await;
    }
}

/// Declares the events exchange as pulsed does, and the test's queue bound to it.
pub(crate) async fn tap(channel: &lapin::Channel, names: &Names, binding: &str) {
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            names.tap.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            names.tap.as_str().into(),
            names.exchange.as_str().into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// One delivery seen by the test's consumer.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) message_id: String,
    pub(crate) routing_key: String,
    pub(crate) body: Value,
    pub(crate) class: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) persistent: bool,
}

/// Consumes a queue in the background, recording every delivery.
pub(crate) fn collect(channel: lapin::Channel, queue: String) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "test-tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        while let Some(Ok(d)) = consumer.next().await {
            let class = d.properties.headers().as_ref().and_then(|h| {
                h.inner().get("type").and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                    _ => None,
                })
            });
            out.lock().unwrap().push(Seen {
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                routing_key: d.routing_key.to_string(),
                body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
                class,
                content_type: d.properties.content_type().as_ref().map(|s| s.to_string()),
                persistent: d.properties.delivery_mode() == &Some(2),
            });
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    seen
}

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

async fn readyz(pulsed: &Pulsed) -> (u16, Value) {
    let r = reqwest::get(format!("{}/readyz", pulsed.http)).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn component<'a>(readyz: &'a Value, name: &str) -> Option<&'a Value> {
    readyz["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

#[tokio::test]
async fn a_broker_outage_mid_stream_loses_nothing() {
    let db = PgCluster::shared().fresh_db("amqp_outage").await.unwrap();
    migrated(&db).await;
    let rabbit = Rabbit::from_env();
    let conn = rabbit.connect().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let names = Names::new("outage");
    tap(&channel, &names, "#").await;
    let seen = collect(conn.create_channel().await.unwrap(), names.tap.clone());

    let proxy = Proxy::start(broker_target(&rabbit)).await;
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &names.env(&db, &proxy.url(&rabbit))).unwrap();
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
        let (status, body) = readyz(&pulsed).await;
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
    wait_for(
        "every event after the outage",
        Duration::from_secs(60),
        || async { (distinct(&seen) as u32 >= TOTAL).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; pulsed log:\n{}", pulsed.log()));
    wait_for("an empty outbox", Duration::from_secs(10), || async {
        (pending(&db).await == 0).then_some(())
    })
    .await
    .unwrap();
    wait_for("broker up again", Duration::from_secs(10), || async {
        let (_, body) = readyz(&pulsed).await;
        (component(&body, "broker")?["state"] == "up").then_some(())
    })
    .await
    .unwrap();
    // The command consumer came back with the new session too.
    channel
        .basic_publish(
            "".into(),
            names.commands.as_str().into(),
            BasicPublishOptions::default(),
            json!({"commandId": "after-outage", "key": "sync_interval_ms", "value": 900})
                .to_string()
                .as_bytes(),
            command_properties(Some("App\\Message\\Pulse\\Command\\ChangeSetting")),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let client = db.connect().await.unwrap();
    wait_for("a command after the outage", Duration::from_secs(20), || async {
        client
            .query_opt(
                "SELECT 1 FROM pulse.processed_commands WHERE command_id = 'after-outage'",
                &[],
            )
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
    let all = seen.lock().unwrap().clone();
    let dups = check_delivery(&all, "outage", TOTAL, 20);
    eprintln!(
        "outage: {} deliveries, {dups} duplicates, {received_during} distinct before the restore",
        all.len()
    );
    names.cleanup(&channel).await;
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
    let rabbit = Rabbit::from_env();
    let conn = rabbit.connect().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let names = Names::new("kill9");
    tap(&channel, &names, "#").await;
    let seen = collect(conn.create_channel().await.unwrap(), names.tap.clone());

    let mut env = names.env(&db, &rabbit.url);
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
    wait_for(
        "every event after the restart",
        Duration::from_secs(120),
        || async { (distinct(&seen) as u32 >= TOTAL).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", second.log()));
    wait_for("an empty outbox", Duration::from_secs(10), || async {
        (pending(&db).await == 0).then_some(())
    })
    .await
    .unwrap();
    let all = seen.lock().unwrap().clone();
    let dups = check_delivery(&all, "kill", TOTAL, 50);
    eprintln!(
        "kill -9 with {left} pending: {} deliveries, {dups} duplicates",
        all.len()
    );
    names.cleanup(&channel).await;
}

#[tokio::test]
async fn a_returned_event_is_retried_then_dead_lettered_then_requeued() {
    let db = PgCluster::shared().fresh_db("amqp_returned").await.unwrap();
    migrated(&db).await;
    let rabbit = Rabbit::from_env();
    let conn = rabbit.connect().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let names = Names::new("returned");
    // Only presence events are routed: file events come back to pulsed.
    tap(&channel, &names, "presence.#").await;
    let seen = collect(conn.create_channel().await.unwrap(), names.tap.clone());
    let unroutable =
        OutboxEvent::new("file.deleted", "file-gone-1", "file:1", json!({"fileId": "1"})).unwrap();
    enqueue(&db, &[event("ret", 0, 1), unroutable, event("ret", 1, 1)]).await;

    let mut env = names.env(&db, &rabbit.url);
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
    channel
        .queue_bind(
            names.tap.as_str().into(),
            names.exchange.as_str().into(),
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
    names.cleanup(&channel).await;
}

pub(crate) fn command_properties(class: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(class) = class {
        headers.insert(
            ShortString::from("type"),
            AMQPValue::LongString(LongString::from(class)),
        );
    }
    // A stamp header pulsed knows nothing about: ignored.
    headers.insert(
        ShortString::from("X-Message-Stamp-App\\Stamp\\TraceStamp"),
        AMQPValue::LongString(LongString::from("[{\"traceId\":\"abc\"}]")),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}

#[tokio::test]
async fn commands_are_applied_once_and_invalid_ones_go_to_the_dead_letter_queue() {
    let db = PgCluster::shared().fresh_db("amqp_commands").await.unwrap();
    let rabbit = Rabbit::from_env();
    let conn = rabbit.connect().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let names = Names::new("commands");
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &names.env(&db, &rabbit.url)).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();
    // pulsed declares its queues (amqp.declare_topology defaults to true).
    wait_for("the commands queue", Duration::from_secs(10), || async {
        let probe = conn.create_channel().await.ok()?;
        probe
            .queue_declare(
                names.commands.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()
    })
    .await
    .unwrap();

    let ns = "App\\Message\\Pulse\\Command\\";
    let send = |class: Option<String>, body: Value| {
        let channel = channel.clone();
        let queue = names.commands.clone();
        async move {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    command_properties(class.as_deref()),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    send(None, json!({"commandId": "no-type"})).await;
    send(
        Some(format!("{ns}EndPresence")),
        json!({"commandId": "c-end", "tenantId": 1}),
    )
    .await;
    send(
        Some(format!("{ns}EndPresence")),
        json!({"commandId": "c-presence", "tenantId": 1, "userId": 2}),
    )
    .await;
    send(
        Some(format!("{ns}ChangeSetting")),
        json!({"commandId": "c-bad", "key": "sync_interval_ms", "value": "soon"}),
    )
    .await;
    let good = json!({"commandId": "c-ok", "key": "sync_interval_ms", "value": 750, "actor": "alice"});
    send(Some(format!("{ns}ChangeSetting")), good.clone()).await;
    send(Some(format!("{ns}ChangeSetting")), good).await;
    send(
        Some(format!("{ns}ChangeSetting")),
        json!({"commandId": "c-last", "key": "enable_realtime", "value": false}),
    )
    .await;

    let client = db.connect().await.unwrap();
    wait_for("the last command", Duration::from_secs(20), || async {
        client
            .query_opt(
                "SELECT 1 FROM pulse.processed_commands WHERE command_id = 'c-last'",
                &[],
            )
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
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
    let processed: Vec<String> = client
        .query("SELECT command_id FROM pulse.processed_commands ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // EndPresence is carried out by the engine (nobody was online: nothing to end).
    assert_eq!(processed, vec!["c-last", "c-ok", "c-presence"]);

    // Three refusals, each with its reason; bodies and headers kept for a retry.
    let reasons = Mutex::new(BTreeMap::new());
    let dead = conn.create_channel().await.unwrap();
    wait_for("three dead letters", Duration::from_secs(10), || async {
        while let Some(m) = dead
            .basic_get(names.dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let headers = m.delivery.properties.headers().clone().unwrap_or_default();
            let reason = match headers.inner().get("x-pulse-reason") {
                Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => panic!("no reason header: {other:?}"),
            };
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

    let metrics = reqwest::get(format!("{}/metrics", pulsed.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pulse_commands_total{kind=\"ChangeSetting\",outcome=\"duplicate\"} 1"),
        "{metrics}"
    );
    names.cleanup(&channel).await;
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
    let rabbit = Rabbit::from_env();
    let conn = rabbit.connect().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let names = Names::new("symfony");
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
    let dsn = rabbit.url.clone();
    php(
        "setup.php",
        &[
            dsn.clone(),
            events_transport.to_string(),
            commands_transport.to_string(),
            dead_transport.to_string(),
        ],
    );

    let mut env = names.env(&db, &rabbit.url);
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
    wait_for("the presence command from Symfony", Duration::from_secs(20), || async {
        client
            .query_opt(
                "SELECT 1 FROM pulse.processed_commands WHERE command_id = 'sf-cmd-2' AND outcome = 'applied'",
                &[],
            )
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));

    names.cleanup(&channel).await;
    for x in [commands_exchange, dead_exchange] {
        let _ = channel
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
}

#[tokio::test]
async fn missing_topology_owned_by_symfony_is_reported_until_it_exists() {
    let db = PgCluster::shared().fresh_db("amqp_passive").await.unwrap();
    let rabbit = Rabbit::from_env();
    let conn = rabbit.connect().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let names = Names::new("passive");
    let mut env = names.env(&db, &rabbit.url);
    env.push(("PULSE__AMQP__DECLARE_TOPOLOGY", "false".into()));
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();
    // The exchange exists (Symfony set up its events transport), the queues do not yet.
    tap(&channel, &names, "#").await;
    let detail = wait_for(
        "the missing queue in /readyz",
        Duration::from_secs(20),
        || async {
            let (status, body) = readyz(&pulsed).await;
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
        channel
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
            let (_, body) = readyz(&pulsed).await;
            (component(&body, "broker")?["state"] == "up").then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
    names.cleanup(&channel).await;
}
