//! The wiring between the realtime engine, file storage and the broker: events born in
//! the engine and the file storage reach RabbitMQ through the outbox, and Symfony's
//! commands act on notifications, presence, files and exports.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pulse_harness::{Pulsed, TestDb, wait_for};
use pulse_shared::protocol::{ClientFrame, ServerFrame, UpdateOp};
use serde_json::{Value, json};

use crate::engine::{AUDIENCE, Client, ISSUER, SECRET, token};
use crate::support::{Broker, Seen, fresh_db_with, pairs, pulsed_bin, wait_processed, wait_streaming};

const DEPLOY_KEY: &str = "wire-deploy-key-0123456789abcdef0123456789";

const SCHEMA: &str = r#"
[notifications]
source = "public.app_notification"
tenant_column = "tenant_id"
user_column = "user_id"
title_column = "title"
body_column = "body"
"#;

async fn source_db(label: &str) -> TestDb {
    fresh_db_with(
        label,
        "CREATE TABLE app_notification (id serial PRIMARY KEY, tenant_id text NOT NULL, user_id text NOT NULL,
                                        title text NOT NULL, body text NOT NULL DEFAULT '')",
    )
    .await
    .0
}

/// The first delivery of `event` matching `pred`, waited for.
async fn event(
    seen: &Arc<Mutex<Vec<Seen>>>,
    pulsed: &Pulsed,
    event: &str,
    pred: impl Fn(&Value) -> bool,
) -> Seen {
    wait_for(event, Duration::from_secs(20), || async {
        seen.lock()
            .unwrap()
            .iter()
            .find(|s| s.routing_key == event && pred(&s.body))
            .cloned()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; seen: {:?}; log:\n{}", seen.lock().unwrap(), pulsed.log()))
}

#[tokio::test]
async fn engine_and_file_events_reach_the_broker_and_commands_act_on_them() {
    let db = source_db("wire_e2e").await;
    let broker = Broker::new("wire").await;
    let seen = broker.record("#").await;

    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let mut env = broker.names.env(&db, &broker.rabbit.url);
    env.extend([
        ("PULSE__SCHEMA__PATH", schema.display().to_string()),
        ("PULSE__AUTH__ISSUER", ISSUER.to_string()),
        ("PULSE__AUTH__AUDIENCE", AUDIENCE.to_string()),
        ("PULSE__AUTH__HS256_SECRET", SECRET.to_string()),
        ("PULSE__PLATFORM__DEPLOY_KEY", DEPLOY_KEY.to_string()),
        ("PULSE__AMQP__PRESENCE_DEBOUNCE_MS", "300".to_string()),
    ]);
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(Duration::from_secs(30)).await.unwrap();
    wait_streaming(&pulsed, Duration::from_secs(30)).await;
    let ws = format!("{}/ws", pulsed.http.replace("http://", "ws://"));
    let pulsed = &pulsed;
    let state = db.connect().await.unwrap();

    // 1. A row Symfony inserts becomes a notification, and its event reaches the broker
    // with the PHP class in `type` and the notification id as message_id.
    state
        .batch_execute(
            "INSERT INTO app_notification (tenant_id, user_id, title) VALUES ('t1', 'alice', 'from symfony')",
        )
        .await
        .unwrap();
    let created = event(&seen, pulsed, "notification.created", |b| {
        b["title"] == "from symfony"
    })
    .await;
    let id = created.body["notificationId"].as_i64().unwrap();
    assert_eq!(created.message_id, format!("notification.created:{id}"));
    assert!(
        created
            .class
            .as_deref()
            .unwrap_or_default()
            .ends_with("\\NotificationCreated"),
        "{created:?}"
    );
    assert_eq!(created.content_type.as_deref(), Some("application/json"));
    assert!(created.persistent);
    assert_eq!(
        (created.body["tenantId"].clone(), created.body["userId"].clone()),
        (json!("t1"), json!("alice"))
    );

    // 2. SendNotification from Symfony: a subscribed client receives it.
    let mut alice = Client::open(&ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    match alice.subscribe("n", "notifications", json!({})).await {
        ServerFrame::Result { data, .. } => assert_eq!(data["unread"], 1),
        other => panic!("{other:?}"),
    }
    let ns = "App\\Message\\Pulse\\Command\\";
    let broker = &broker;
    let send = |kind: &str, body: Value| {
        let class = format!("{ns}{kind}");
        async move { broker.send_command(Some(&class), &body).await }
    };
    send(
        "SendNotification",
        json!({"commandId": "w-send", "tenantId": "t1", "userId": "alice", "title": "from a command"}),
    )
    .await;
    loop {
        match alice.next_within(20).await {
            Some(ServerFrame::Update { op, row, .. }) => {
                assert_eq!(op, UpdateOp::Insert);
                assert_eq!(row.unwrap()["title"], "from a command");
                break;
            }
            Some(ServerFrame::Value { .. }) => continue,
            other => panic!(
                "expected the command's notification, got {other:?}; log:\n{}",
                pulsed.log()
            ),
        }
    }
    let by_command = event(&seen, pulsed, "notification.created", |b| {
        b["title"] == "from a command"
    })
    .await;
    assert!(by_command.message_id.starts_with("notification.created:"));

    // Reading them is announced once, keyed by the first id read.
    alice
        .send(&ClientFrame::Mutate {
            id: "r".into(),
            name: "mark_all_read".into(),
            args: json!({}),
            idempotency_key: None,
        })
        .await;
    let read = event(&seen, pulsed, "notification.read", |b| b["userId"] == "alice").await;
    let mut ids: Vec<i64> = read.body["notificationIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 2, "{read:?}");
    assert_eq!(read.message_id, format!("notification.read:{}", ids[0]));

    // Presence: alice comes online.
    alice.heartbeat("doc").await;
    let joined = event(&seen, pulsed, "presence.joined", |b| b["userId"] == "alice").await;
    // Keyed by the user and the debounce window of the join (see outbox::presence_message_id).
    assert!(
        joined.message_id.starts_with("presence.joined:t1:alice:"),
        "{joined:?}"
    );
    assert_eq!(joined.body["tenantId"], "t1");

    // 3. A file alice owns: its upload is announced.
    let http = reqwest::Client::new();
    let ticket: Value = http
        .post(format!("{}/files/upload-url", pulsed.http))
        .bearer_auth(DEPLOY_KEY)
        .header("X-Pulse-Tenant", "t1")
        .json(&json!({"name": "notes.txt", "content_type": "text/plain", "size": 5, "owner": "alice"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = http
        .put(format!("{}{}", pulsed.http, ticket["path"].as_str().unwrap()))
        .body(&b"hello"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let file: Value = r.json().await.unwrap();
    let file_id = file["id"].as_str().unwrap().to_string();
    let uploaded = event(&seen, pulsed, "file.uploaded", |b| b["fileId"] == json!(file_id)).await;
    assert_eq!(uploaded.message_id, format!("file.uploaded:{file_id}"));
    assert_eq!(uploaded.body["ownerId"], "alice");

    // 4. ExportUserData: stored, and announced by data_export.ready.
    send(
        "ExportUserData",
        json!({"commandId": "w-export", "tenantId": "t1", "userId": "alice"}),
    )
    .await;
    let ready = event(&seen, pulsed, "data_export.ready", |b| {
        b["commandId"] == "w-export"
    })
    .await;
    assert_eq!(ready.message_id, "cmd:w-export:0");
    assert_eq!(
        (ready.body["notifications"].clone(), ready.body["files"].clone()),
        (json!(2), json!(1))
    );
    let export: Value = state
        .query_one(
            "SELECT data FROM pulse.data_exports WHERE id::text = $1",
            &[&ready.body["exportId"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(export["files"][0]["id"], json!(file_id));
    assert_eq!(export["notifications"].as_array().unwrap().len(), 2);
    // Symfony fetches it with the deploy key; a member of another tenant may not.
    let export_url = format!(
        "{}/exports/{}",
        pulsed.http,
        ready.body["exportId"].as_str().unwrap()
    );
    let fetched: Value = http
        .get(&export_url)
        .bearer_auth(DEPLOY_KEY)
        .header("X-Pulse-Tenant", "t1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, export);
    let r = http
        .get(&export_url)
        .bearer_auth(token("mallory", Some("t2"), &["ROLE_USER"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // 5. EraseUserData: alice's notifications, files and exports are gone; the file's
    // deletion is announced.
    send(
        "EraseUserData",
        json!({"commandId": "w-erase", "tenantId": "t1", "userId": "alice"}),
    )
    .await;
    wait_processed(&state, "w-erase", pulsed).await;
    let count = |sql: &'static str| {
        let state = &state;
        async move { state.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM pulse.notifications WHERE user_id = 'alice'").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM pulse.files WHERE owner = 'alice'").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM pulse.data_exports WHERE user_id = 'alice'").await,
        0
    );
    let deleted = event(&seen, pulsed, "file.deleted", |b| b["fileId"] == json!(file_id)).await;
    assert_eq!(deleted.message_id, format!("file.deleted:{file_id}"));
    // The erasure ended alice's presence: after the debounce, presence.left.
    event(&seen, pulsed, "presence.left", |b| b["userId"] == "alice").await;
    assert_eq!(
        seen.lock()
            .unwrap()
            .iter()
            .filter(|s| s.routing_key == "presence.joined")
            .count(),
        1,
        "one join only"
    );

    // Every command was applied, none dead-lettered.
    let outcomes: Vec<(String, String)> = pairs(
        &state,
        "SELECT command_id, outcome FROM pulse.processed_commands ORDER BY 1",
    )
    .await;
    assert_eq!(
        outcomes,
        ["w-erase", "w-export", "w-send"].map(|c| (c.to_string(), "applied".to_string()))
    );
    broker.cleanup().await;
}
