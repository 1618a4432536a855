//! What the schema file decides about webhooks and commands, against the real binary and
//! the real broker: metric threshold crossings (sent once each, with keys derived from the
//! source position, across a SIGKILL), which events are sent and their PHP classes,
//! notifications fanned out to a tenant or a role from Symfony's user table, presence keys
//! that survive a restart, and declared mutations handed to Symfony through the outbox.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pulse_harness::{PgCluster, Pulsed, TestDb, wait_for};
use pulse_shared::ErrorCode;
use pulse_shared::protocol::{ClientFrame, ServerFrame};
use serde_json::{Value, json};

use crate::engine::{AUDIENCE, Client, ISSUER, SECRET, token};
use crate::support::{Broker, Seen, fresh_db_with, header_text, pulsed_bin, wait_processed, wait_streaming};

/// A pulsed with a schema file, on the test's broker names.
struct Daemon {
    pulsed: Pulsed,
    ws: String,
    _dir: tempfile::TempDir,
}

fn env(db: &TestDb, broker: &Broker, schema: &std::path::Path) -> Vec<(&'static str, String)> {
    let mut env = broker.names.env(db, &broker.rabbit.url);
    env.extend([
        ("PULSE__SCHEMA__PATH", schema.display().to_string()),
        ("PULSE__AUTH__ISSUER", ISSUER.to_string()),
        ("PULSE__AUTH__AUDIENCE", AUDIENCE.to_string()),
        ("PULSE__AUTH__HS256_SECRET", SECRET.to_string()),
        ("PULSE__PLATFORM__DEPLOY_KEY", "k".repeat(40)),
    ]);
    env
}

async fn start(env: &[(&'static str, String)], dir: tempfile::TempDir) -> Daemon {
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), env).unwrap();
    pulsed.wait_ready(Duration::from_secs(30)).await.unwrap();
    let ws = format!("{}/ws", pulsed.http.replace("http://", "ws://"));
    let d = Daemon {
        pulsed,
        ws,
        _dir: dir,
    };
    wait_streaming(&d.pulsed, Duration::from_secs(30)).await;
    d
}

fn schema_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schema.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn of(seen: &Arc<Mutex<Vec<Seen>>>, event: &str) -> Vec<Seen> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|s| s.routing_key == event)
        .cloned()
        .collect()
}

async fn outbox_rows(db: &TestDb, event: &str) -> Vec<(String, Value)> {
    db.connect()
        .await
        .unwrap()
        .query(
            "SELECT message_id, payload FROM pulse.outbox WHERE event = $1 ORDER BY id",
            &[&event],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

const THRESHOLDS: &str = r#"
[metrics.signups]
source = "public.signup"
tenant_column = "tenant_id"
aggregate = "count"
thresholds = [25, 50, 75, 100, 125, 150, 175, 200]
below = [10]

[events]
class_namespace = "Club\\Pulse"
[events.send]
"metric.threshold_crossed" = "Club\\Dashboard\\SignupMilestone"
"notification.created" = true
"#;

#[tokio::test]
async fn threshold_crossings_are_sent_once_each_across_a_sigkill() {
    let (db, _) = fresh_db_with(
        "hooks_thresholds",
        "CREATE TABLE signup (id serial PRIMARY KEY, tenant_id text NOT NULL);
         ALTER TABLE signup REPLICA IDENTITY FULL;
         INSERT INTO signup (tenant_id) SELECT 't1' FROM generate_series(1, 5);",
    )
    .await;
    let broker = Broker::new("thresholds").await;
    let seen = broker.record("#").await;
    let (dir, schema) = schema_file(THRESHOLDS);
    let mut env = env(&db, &broker, &schema);
    // Both runs read the same slot and checkpoint.
    env.push((
        "PULSE__REPLICATION__SLOT",
        pulse_harness::unique_slot("thresholds"),
    ));
    let first = start(&env, dir).await;

    // 200 sign-ups of t1, one transaction each, while pulsed is killed and restarted.
    let producer = {
        let url = db.url();
        tokio::spawn(async move {
            let (client, c) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(c);
            for _ in 0..200 {
                client
                    .execute("INSERT INTO signup (tenant_id) VALUES ('t1')", &[])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    wait_for("the first crossing", Duration::from_secs(30), || async {
        (!of(&seen, "metric.threshold_crossed").is_empty()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", first.pulsed.log()));
    let Daemon { mut pulsed, _dir, .. } = first;
    pulsed.kill9();
    let second = start(&env, _dir).await;
    producer.await.unwrap();
    // One transaction takes t1 from 205 to 5: every threshold down to `below = [10]`.
    db.connect()
        .await
        .unwrap()
        .execute("DELETE FROM signup WHERE id > 5", &[])
        .await
        .unwrap();

    // Up: 25..200 (8); down in that one transaction: 200..25 and 10 (9).
    let expected = 17;
    let distinct = || {
        let mut by_id: HashMap<String, Value> = HashMap::new();
        for s in of(&seen, "metric.threshold_crossed") {
            if let Some(first) = by_id.get(&s.message_id) {
                assert_eq!(first, &s.body, "a duplicate differs from its first copy");
            }
            by_id.insert(s.message_id.clone(), s.body.clone());
        }
        by_id
    };
    wait_for(
        "every crossing at the broker",
        Duration::from_secs(60),
        || async { (distinct().len() >= expected).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}; log:\n{}", distinct(), second.pulsed.log()));

    // Each crossing exists once in the outbox: the replay derived the same keys, never
    // new ones for a crossing already written.
    let rows = outbox_rows(&db, "metric.threshold_crossed").await;
    let mut crossings: BTreeMap<(i64, String), Vec<String>> = BTreeMap::new();
    for (id, p) in &rows {
        assert!(id.starts_with("metric.threshold_crossed:lsn:"), "{id}");
        assert_eq!((&p["tenantId"], &p["metric"]), (&json!("t1"), &json!("signups")));
        crossings
            .entry((
                p["threshold"].as_i64().unwrap(),
                p["direction"].as_str().unwrap().to_string(),
            ))
            .or_default()
            .push(id.clone());
    }
    let ups: Vec<i64> = (1..=8).map(|n| n * 25).collect();
    let mut want: Vec<(i64, String)> = ups.iter().map(|t| (*t, "up".to_string())).collect();
    want.extend(ups.iter().map(|t| (*t, "down".to_string())));
    want.push((10, "down".to_string()));
    want.sort();
    assert_eq!(crossings.keys().cloned().collect::<Vec<_>>(), want, "{rows:?}");
    assert!(
        crossings.values().all(|ids| ids.len() == 1),
        "a crossing was written under two keys: {crossings:?}"
    );
    // An upward crossing reports the value that reached the threshold.
    for (id, p) in &rows {
        if p["direction"] == "up" {
            assert_eq!(p["value"], p["threshold"], "{id}: {p}");
            assert_eq!(p["previous"].as_i64().unwrap() + 1, p["value"].as_i64().unwrap());
        }
    }
    // The nine downward crossings come from one transaction: one LSN, positions 0..8.
    let downs: Vec<&String> = rows
        .iter()
        .filter(|(_, p)| p["direction"] == "down")
        .map(|(id, _)| id)
        .collect();
    let lsn = |id: &str| id.rsplit_once(':').unwrap().0.to_string();
    assert!(downs.iter().all(|id| lsn(id) == lsn(downs[0])), "{downs:?}");
    let mut positions: Vec<u32> = downs
        .iter()
        .map(|id| id.rsplit_once(':').unwrap().1.parse().unwrap())
        .collect();
    positions.sort();
    assert_eq!(positions, (0..9).collect::<Vec<_>>());
    // The class the schema file names, as Symfony Messenger reads it.
    let sample = &of(&seen, "metric.threshold_crossed")[0];
    assert_eq!(sample.class.as_deref(), Some("Club\\Dashboard\\SignupMilestone"));
    assert_eq!(sample.content_type.as_deref(), Some("application/json"));
    broker.cleanup().await;
}

const USERS: &str = r#"
[roles]
ROLE_ADMIN = "tenant_admin"
ROLE_STAFF = "staff"
ROLE_USER = "member"

[users]
source = "public.app_user"
tenant_column = "organisation_id"
roles_column = "roles"

[events]
[events.send]
"notification.created" = "Club\\Inbox\\NotificationCreated"
"#;

#[tokio::test]
async fn notifications_fan_out_to_a_tenant_or_a_role_from_symfonys_users() {
    let (db, _) = fresh_db_with(
        "hooks_users",
        r#"CREATE TABLE app_user (id serial PRIMARY KEY, organisation_id int NOT NULL, email text, roles json NOT NULL);
           INSERT INTO app_user (organisation_id, email, roles) VALUES
             (1, 'ann', '["ROLE_ADMIN"]'), (1, 'bob', '["ROLE_STAFF"]'), (1, 'cid', '[]'),
             (1, 'dee', '["ROLE_STAFF", "ROLE_ADMIN"]'), (2, 'eve', '["ROLE_STAFF"]');"#,
    )
    .await;
    let broker = Broker::new("fanout").await;
    let seen = broker.record("#").await;
    let (dir, schema) = schema_file(USERS);
    let d = start(&env(&db, &broker, &schema), dir).await;
    broker.wait_commands_queue().await;

    let send = Some("App\\Message\\Pulse\\Command\\SendNotification");
    let staff = json!({"commandId": "to-staff", "tenantId": 1, "role": "staff", "title": "Staff meeting"});
    broker.send_command(send, &staff).await;
    broker
        .send_command(
            send,
            &json!({"commandId": "to-all", "tenantId": "1", "title": "Club news"}),
        )
        .await;
    broker
        .send_command(
            send,
            &json!({"commandId": "to-admins", "tenantId": 1, "role": "tenant_admin", "title": "Budget"}),
        )
        .await;
    // The same command again: carried out once.
    broker.send_command(send, &staff).await;
    broker
        .send_command(
            send,
            &json!({"commandId": "last", "tenantId": 2, "userId": "9", "title": "x"}),
        )
        .await;
    let state = db.connect().await.unwrap();
    wait_processed(&state, "last", &d.pulsed).await;
    let inbox = |title: &'static str| {
        let state = &state;
        async move {
            state
                .query(
                    "SELECT user_id FROM pulse.notifications WHERE title = $1 AND tenant = '1' ORDER BY user_id",
                    &[&title],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    // Ids 1..4 are ann, bob, cid, dee; eve (2) is another tenant.
    assert_eq!(inbox("Staff meeting").await, vec!["2", "4"]);
    assert_eq!(inbox("Club news").await, vec!["1", "2", "3", "4"]);
    assert_eq!(inbox("Budget").await, vec!["1", "4"]);
    // Each notification is announced with the class the schema file names.
    wait_for("nine notification events", Duration::from_secs(20), || async {
        (of(&seen, "notification.created").len() >= 9).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", d.pulsed.log()));
    assert!(
        of(&seen, "notification.created")
            .iter()
            .all(|s| s.class.as_deref() == Some("Club\\Inbox\\NotificationCreated"))
    );

    // An export is carried out, but data_export.ready is not in [events.send]: nothing
    // is written to the outbox for it.
    broker
        .send_command(
            Some("App\\Message\\Pulse\\Command\\ExportUserData"),
            &json!({"commandId": "exp", "tenantId": "1", "userId": "2"}),
        )
        .await;
    wait_for("the export", Duration::from_secs(20), || async {
        state
            .query_opt("SELECT 1 FROM pulse.data_exports WHERE command_id = 'exp'", &[])
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    assert!(outbox_rows(&db, "data_export.ready").await.is_empty());
    broker.cleanup().await;
}

#[tokio::test]
async fn tenant_notifications_are_refused_without_a_users_source() {
    let db = PgCluster::shared().fresh_db("hooks_nousers").await.unwrap();
    let broker = Broker::new("nousers").await;
    let (dir, schema) = schema_file("");
    let d = start(&env(&db, &broker, &schema), dir).await;
    broker.wait_commands_queue().await;
    broker
        .send_command(
            Some("X\\SendNotification"),
            &json!({"commandId": "t", "tenantId": 1, "title": "x"}),
        )
        .await;
    let reason = wait_for("the dead letter", Duration::from_secs(20), || async {
        let m = broker
            .channel
            .basic_get(
                broker.names.dead.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .ok()??;
        header_text(&m.delivery.properties, "x-pulse-reason")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", d.pulsed.log()));
    assert!(reason.contains("[users]"), "{reason}");
    broker.cleanup().await;
}

#[tokio::test]
async fn a_join_seen_again_after_a_restart_keeps_its_message_id() {
    let db = PgCluster::shared().fresh_db("hooks_presence").await.unwrap();
    let broker = Broker::new("presence").await;
    let seen = broker.record("presence.#").await;
    let (dir, schema) = schema_file("");
    // Keys follow 30-second debounce windows; start early in one so the restart fits.
    const WINDOW_MS: u64 = 30_000;
    let mut env = env(&db, &broker, &schema);
    env.push(("PULSE__AMQP__PRESENCE_DEBOUNCE_MS", WINDOW_MS.to_string()));
    let first = start(&env, dir).await;
    wait_for("the start of a window", Duration::from_secs(31), || async {
        (pulse_daemon::outbox::now_ms() % WINDOW_MS < 3_000).then_some(())
    })
    .await
    .unwrap();
    let mut alice = Client::open(&first.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    alice.heartbeat("doc").await;
    let joined = wait_for("presence.joined", Duration::from_secs(10), || async {
        of(&seen, "presence.joined").first().cloned()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", first.pulsed.log()));
    let slot = pulse_daemon::outbox::now_ms() / WINDOW_MS;
    assert_eq!(
        joined.message_id,
        format!("presence.joined:t1:alice:{slot}"),
        "{joined:?}"
    );
    // pulsed dies; the browser reconnects to the new one and announces itself again.
    let Daemon { mut pulsed, _dir, .. } = first;
    pulsed.kill9();
    let second = start(&env, _dir).await;
    let mut alice = Client::open(&second.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    alice.heartbeat("doc").await;
    // The new join derives the same key: the outbox keeps one row, every copy at the
    // broker carries that id.
    // Wendy's join, announced after alice's second one, shows that one was handled.
    let mut probe = Client::open(&second.ws, &token("wendy", Some("t1"), &["ROLE_USER"])).await;
    probe.heartbeat("doc").await;
    wait_for("wendy's join", Duration::from_secs(10), || async {
        of(&seen, "presence.joined")
            .iter()
            .any(|s| s.body["userId"] == "wendy")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", second.pulsed.log()));
    assert!(
        pulse_daemon::outbox::now_ms() / WINDOW_MS == slot,
        "the test ran past its window; its result says nothing"
    );
    let rows = outbox_rows(&db, "presence.joined").await;
    let alice_rows: Vec<&(String, Value)> = rows.iter().filter(|(_, p)| p["userId"] == "alice").collect();
    assert_eq!(alice_rows.len(), 1, "{rows:?}");
    assert!(
        of(&seen, "presence.joined")
            .iter()
            .filter(|s| s.body["userId"] == "alice")
            .all(|s| s.message_id == joined.message_id)
    );
    broker.cleanup().await;
}

async fn mutate(c: &mut Client, id: &str, args: Value) -> ServerFrame {
    mutate_keyed(c, id, "invite_member", args, None).await
}

async fn mutate_keyed(c: &mut Client, id: &str, name: &str, args: Value, key: Option<&str>) -> ServerFrame {
    c.send(&ClientFrame::Mutate {
        id: id.into(),
        name: name.into(),
        args,
        idempotency_key: key.map(str::to_string),
    })
    .await;
    c.next().await
}

/// The `message_id` of an accepted mutation, and whether it was a duplicate.
fn accepted(frame: ServerFrame) -> (String, bool) {
    match frame {
        ServerFrame::MutationResult { result, .. } => {
            assert_eq!(result["accepted"], true, "{result}");
            (
                result["message_id"].as_str().unwrap().to_string(),
                result["duplicate"] == true,
            )
        }
        other => panic!("not accepted: {other:?}"),
    }
}

fn refused_field(frame: ServerFrame) -> String {
    match frame {
        ServerFrame::Error { error, .. } => {
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
            error.details["field"].as_str().unwrap_or_default().to_string()
        }
        other => panic!("not refused: {other:?}"),
    }
}

const MUTATIONS: &str = r#"
[roles]
ROLE_ADMIN = "tenant_admin"
ROLE_USER = "member"

[mutations.invite_member]
args = { email = "text", full_name = "text", send_welcome = "bool?" }
roles = ["tenant_admin"]
class = "Club\\Member\\InviteMember"
"#;

#[tokio::test]
async fn declared_mutations_are_checked_and_handed_to_symfony() {
    let db = PgCluster::shared().fresh_db("hooks_mutations").await.unwrap();
    let broker = Broker::new("mutations").await;
    let seen = broker.record("mutation.#").await;
    let (dir, schema) = schema_file(MUTATIONS);
    let d = start(&env(&db, &broker, &schema), dir).await;

    let mut admin = Client::open(&d.ws, &token("ann", Some("t1"), &["ROLE_ADMIN"])).await;
    let args = json!({"email": "zoe@club.test", "full_name": "Zoe", "send_welcome": true});
    let message_id = match mutate(&mut admin, "m1", args.clone()).await {
        ServerFrame::MutationResult { id, result } => {
            assert_eq!(id, "m1");
            assert_eq!(result["accepted"], true, "{result}");
            result["message_id"].as_str().unwrap().to_string()
        }
        other => panic!("{other:?}; log:\n{}", d.pulsed.log()),
    };
    let got = wait_for("the mutation at the broker", Duration::from_secs(20), || async {
        of(&seen, "mutation.invite_member").first().cloned()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", d.pulsed.log()));
    assert_eq!(got.message_id, message_id);
    assert_eq!(got.class.as_deref(), Some("Club\\Member\\InviteMember"));
    assert_eq!(got.body["args"], args);
    assert_eq!(
        (&got.body["tenantId"], &got.body["userId"], &got.body["name"]),
        (&json!("t1"), &json!("ann"), &json!("invite_member"))
    );

    // Wrong types name the field; a member may not call it; neither writes anything.
    match mutate(&mut admin, "m2", json!({"email": 7, "full_name": "Zoe"})).await {
        ServerFrame::Error { error, .. } => {
            assert_eq!(error.code, ErrorCode::InvalidArgument);
            assert_eq!(error.details["field"], "args.email");
        }
        other => panic!("{other:?}"),
    }
    match mutate(&mut admin, "m3", json!({"email": "a@b"})).await {
        ServerFrame::Error { error, .. } => assert_eq!(error.details["field"], "args.full_name"),
        other => panic!("{other:?}"),
    }
    let mut member = Client::open(&d.ws, &token("bob", Some("t1"), &["ROLE_USER"])).await;
    match mutate(&mut member, "m4", args.clone()).await {
        ServerFrame::Error { error, .. } => assert_eq!(error.code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    assert_eq!(outbox_rows(&db, "mutation.invite_member").await.len(), 1);

    // With an idempotency key, a retry (here on a new connection, as after a reconnect)
    // gets the first call's message_id and sends nothing more.
    let invite = json!({"email": "yan@club.test", "full_name": "Yan"});
    let (keyed, dup) =
        accepted(mutate_keyed(&mut admin, "k1", "invite_member", invite.clone(), Some("inv-42")).await);
    assert!(!dup);
    let mut again = Client::open(&d.ws, &token("ann", Some("t1"), &["ROLE_ADMIN"])).await;
    let (retried, dup) =
        accepted(mutate_keyed(&mut again, "k2", "invite_member", invite.clone(), Some("inv-42")).await);
    assert_eq!((retried.as_str(), dup), (keyed.as_str(), true));
    // The same key with other arguments is a mistake, and says so.
    let other = json!({"email": "yan@club.test", "full_name": "Yannick"});
    assert_eq!(
        refused_field(mutate_keyed(&mut again, "k3", "invite_member", other, Some("inv-42")).await),
        "idempotency_key"
    );
    // Another user's key is theirs: the same text names a different action.
    let mut ines = Client::open(&d.ws, &token("ines", Some("t1"), &["ROLE_ADMIN"])).await;
    let (hers, dup) =
        accepted(mutate_keyed(&mut ines, "k4", "invite_member", invite.clone(), Some("inv-42")).await);
    assert!(!dup);
    assert_ne!(hers, keyed);
    // Keys that are empty, too long or not visible ASCII, and keys on built-in mutations,
    // are refused.
    let long = "k".repeat(129);
    for bad in ["", long.as_str(), "clé", "a b"] {
        assert_eq!(
            refused_field(mutate_keyed(&mut again, "k5", "invite_member", invite.clone(), Some(bad)).await),
            "idempotency_key",
            "{bad:?}"
        );
    }
    assert_eq!(
        refused_field(mutate_keyed(&mut again, "k6", "mark_all_read", json!({}), Some("x")).await),
        "idempotency_key"
    );
    // Symfony got each keyed action once.
    wait_for(
        "both keyed mutations at the broker",
        Duration::from_secs(20),
        || async {
            let got = of(&seen, "mutation.invite_member");
            (got.iter().any(|m| m.message_id == keyed) && got.iter().any(|m| m.message_id == hers))
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", d.pulsed.log()));
    let got = of(&seen, "mutation.invite_member");
    assert_eq!(got.iter().filter(|m| m.message_id == keyed).count(), 1);
    assert_eq!(outbox_rows(&db, "mutation.invite_member").await.len(), 3);
    broker.cleanup().await;
}

#[tokio::test]
async fn end_presence_reaches_the_instance_that_holds_the_session() {
    let db = PgCluster::shared().fresh_db("hooks_instances").await.unwrap();
    let broker = Broker::new("instances").await;
    let (dir_a, schema_a) = schema_file("");
    let (dir_b, schema_b) = schema_file("");
    // A consumes the commands; B has no broker at all and holds alice's session.
    let a = start(&env(&db, &broker, &schema_a), dir_a).await;
    let mut env_b: Vec<(&'static str, String)> = env(&db, &broker, &schema_b)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("PULSE__AMQP__"))
        .collect();
    // Long enough that only the command can end the presence within the test.
    env_b.push(("PULSE__LIMITS__PRESENCE_TTL_SECS", "600".into()));
    let b = start(&env_b, dir_b).await;
    let mut alice = Client::open(&b.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    alice.heartbeat("doc").await;
    let online = || async {
        let mut probe = Client::open(&b.ws, &token("wendy", Some("t1"), &["ROLE_STAFF"])).await;
        match probe.subscribe("p", "presence", json!({})).await {
            ServerFrame::Result { data, .. } => data["count"].as_i64().unwrap(),
            other => panic!("{other:?}"),
        }
    };
    wait_for("alice online on B", Duration::from_secs(10), || async {
        (online().await == 1).then_some(())
    })
    .await
    .unwrap();
    broker.wait_commands_queue().await;
    broker
        .send_command(
            Some("App\\Message\\Pulse\\Command\\EndPresence"),
            &json!({"commandId": "end-b", "tenantId": "t1", "userId": "alice"}),
        )
        .await;
    wait_for("alice's presence ended on B", Duration::from_secs(20), || async {
        (online().await == 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; A:\n{}\nB:\n{}", a.pulsed.log(), b.pulsed.log()));
    broker.cleanup().await;
}
