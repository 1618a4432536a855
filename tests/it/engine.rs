//! The realtime engine against the real binary with a real WebSocket client: JWTs
//! (good, forged, expired, wrong issuer, malformed), malformed frames, presence, live
//! tables with tenant and owner scoping, notifications, the capability matrix with every
//! cross-tenant attempt, and the polling fallback with its rate limit.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use pulse_harness::{PgCluster, Pulsed, TestDb};
use pulse_shared::ErrorCode;
use pulse_shared::caps::{Capability, Principal, Role, Target, authorize};
use pulse_shared::protocol::{ClientFrame, PROTOCOL_VERSION, PresenceEvent, ServerFrame, UpdateOp};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::pulsed_bin;

pub(crate) const SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub(crate) const ISSUER: &str = "https://symfony.test";
pub(crate) const AUDIENCE: &str = "pulse";

const SCHEMA: &str = r#"
[roles]
ROLE_SUPER_ADMIN = "platform_admin"
ROLE_ADMIN = "tenant_admin"
ROLE_STAFF = "staff"
ROLE_USER = "member"

[tables.members]
source = "public.members"
tenant_column = "tenant_id"
owner_column = "user_id"
columns = ["id", "tenant_id", "user_id", "status"]
roles = ["platform_admin", "tenant_admin", "staff", "member"]
filters = ["status"]

# For staff only: the schema's roles narrow the matrix.
[tables.roster]
source = "public.shifts"
tenant_column = "tenant_id"
columns = ["id", "tenant_id", "status"]
roles = ["staff"]

[metrics.active]
source = "public.members"
tenant_column = "tenant_id"
aggregate = "count"
filter = "status = 'active'"

[notifications]
source = "public.alerts"
retention_days = 30

[mutations.invite]
args = { email = "text" }
"#;

async fn members_db(label: &str) -> TestDb {
    let db = PgCluster::shared().fresh_db(label).await.unwrap();
    let c = db.connect().await.unwrap();
    c.batch_execute(
        "CREATE TABLE members (id int PRIMARY KEY, tenant_id text NOT NULL, user_id text NOT NULL, status text NOT NULL);
         ALTER TABLE members REPLICA IDENTITY FULL;
         CREATE TABLE alerts (id serial PRIMARY KEY, tenant_id text NOT NULL, user_id text NOT NULL,
                              title text NOT NULL, body text);
         CREATE TABLE shifts (id int PRIMARY KEY, tenant_id text NOT NULL, status text NOT NULL);
         ALTER TABLE shifts REPLICA IDENTITY FULL;
         INSERT INTO members VALUES (1, 't1', 'alice', 'active'), (2, 't1', 'bob', 'active'),
                                    (3, 't1', 'alice', 'gone'), (4, 't2', 'carol', 'active');",
    )
    .await
    .unwrap();
    db
}

pub(crate) struct Daemon {
    pub(crate) pulsed: Pulsed,
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) ws: String,
}

async fn start(db: &TestDb, extra: &[(&str, String)]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let mut env = vec![
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__SCHEMA__PATH", schema.display().to_string()),
        ("PULSE__AUTH__ISSUER", ISSUER.to_string()),
        ("PULSE__AUTH__AUDIENCE", AUDIENCE.to_string()),
        ("PULSE__AUTH__HS256_SECRET", SECRET.to_string()),
        ("PULSE__AUTH__LEEWAY_SECS", "0".to_string()),
        ("PULSE__PLATFORM__DEPLOY_KEY", "d".repeat(40)),
    ];
    env.extend(extra.iter().cloned());
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(Duration::from_secs(30)).await.unwrap();
    let ws = format!("{}/ws", pulsed.http.replace("http://", "ws://"));
    Daemon {
        pulsed,
        _dir: dir,
        ws,
    }
}

fn token_with(claims: Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    pulse_daemon::auth::now_secs()
}

/// A valid token for a user of a tenant with Symfony roles.
pub(crate) fn token(user: &str, tenant: Option<&str>, roles: &[&str]) -> String {
    let mut claims =
        json!({ "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "sub": user, "roles": roles });
    if let Some(t) = tenant {
        claims["tenant_id"] = json!(t);
    }
    token_with(claims, SECRET)
}

pub(crate) struct Client {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    /// Items of an `updates` frame not handed out yet (`next` yields them one by one).
    queued: std::collections::VecDeque<ServerFrame>,
    /// How many `updates` frames arrived (with at least two items each).
    pub(crate) batches: usize,
}

impl Client {
    async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client {
            ws,
            queued: Default::default(),
            batches: 0,
        }
    }

    pub(crate) async fn send(&mut self, frame: &ClientFrame) {
        self.ws
            .send(Message::Text(serde_json::to_string(frame).unwrap().into()))
            .await
            .unwrap();
    }

    async fn raw(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_string().into()))
            .await
            .unwrap();
    }

    /// The next frame within `secs`, or None when the connection closed or nothing came.
    /// The items of an `updates` frame come one by one, as the protocol says to handle
    /// them.
    pub(crate) async fn next_within(&mut self, secs: u64) -> Option<ServerFrame> {
        if let Some(f) = self.queued.pop_front() {
            return Some(f);
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(secs), self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(&t).unwrap() {
                    ServerFrame::Updates { updates } => {
                        assert!(updates.len() >= 2, "an updates frame with fewer than two: {t}");
                        assert!(
                            updates.iter().all(|u| matches!(u, ServerFrame::Update { .. })),
                            "an updates frame holds only update frames: {t}"
                        );
                        self.batches += 1;
                        self.queued.extend(updates);
                        return self.queued.pop_front();
                    }
                    f => return Some(f),
                },
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub(crate) async fn next(&mut self) -> ServerFrame {
        self.next_within(5).await.expect("a frame within 5 s")
    }

    /// Connects and says hello with a token; returns the client after `welcome`.
    pub(crate) async fn open(url: &str, token: &str) -> Client {
        let mut c = Client::connect(url).await;
        c.send(&ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            token: Some(token.into()),
            deploy_key: None,
        })
        .await;
        match c.next().await {
            ServerFrame::Welcome { .. } => c,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Sends hello and returns the error code it gets.
    async fn refused(url: &str, token: &str) -> ErrorCode {
        let mut c = Client::connect(url).await;
        c.send(&ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            token: Some(token.into()),
            deploy_key: None,
        })
        .await;
        match c.next().await {
            ServerFrame::Error { error, .. } => {
                // The session ends after a refused hello.
                assert!(
                    c.next_within(5).await.is_none(),
                    "the session stayed open after a refused hello"
                );
                error.code
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    pub(crate) async fn subscribe(&mut self, id: &str, query: &str, args: Value) -> ServerFrame {
        self.send(&ClientFrame::Subscribe {
            id: id.into(),
            query: query.into(),
            args,
        })
        .await;
        self.next().await
    }

    pub(crate) async fn heartbeat(&mut self, resource: &str) {
        self.send(&ClientFrame::Heartbeat {
            resource: resource.into(),
            state: json!({ "typing": false }),
        })
        .await;
    }

    async fn mutate(&mut self, id: &str, name: &str, args: Value) -> ServerFrame {
        self.send(&ClientFrame::Mutate {
            id: id.into(),
            name: name.into(),
            args,
            idempotency_key: None,
        })
        .await;
        self.next().await
    }
}

fn code_of(f: &ServerFrame) -> Option<ErrorCode> {
    match f {
        ServerFrame::Error { error, .. } => Some(error.code),
        _ => None,
    }
}

#[tokio::test]
async fn tokens_forged_expired_wrong_issuer_and_malformed_are_refused() {
    let db = members_db("engine_tokens").await;
    let d = start(&db, &[]).await;
    let good = json!({ "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "sub": "alice", "tenant_id": "t1", "roles": ["ROLE_USER"] });
    Client::open(&d.ws, &token_with(good.clone(), SECRET)).await;

    let forged = token_with(good.clone(), "another-secret-another-secret-another-12");
    assert_eq!(Client::refused(&d.ws, &forged).await, ErrorCode::Unauthenticated);
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 10);
    assert_eq!(
        Client::refused(&d.ws, &token_with(expired, SECRET)).await,
        ErrorCode::Unauthenticated
    );
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.test");
    assert_eq!(
        Client::refused(&d.ws, &token_with(wrong_iss, SECRET)).await,
        ErrorCode::Unauthenticated
    );
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    assert_eq!(
        Client::refused(&d.ws, &token_with(wrong_aud, SECRET)).await,
        ErrorCode::Unauthenticated
    );
    let mut early = good.clone();
    early["nbf"] = json!(now() + 600);
    assert_eq!(
        Client::refused(&d.ws, &token_with(early, SECRET)).await,
        ErrorCode::Unauthenticated
    );
    // alg=none with the signature stripped.
    let parts: Vec<&str> = forged.split('.').collect();
    let none_header = base64_url(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", parts[1]);
    assert_eq!(
        Client::refused(&d.ws, &unsigned).await,
        ErrorCode::Unauthenticated
    );
    for malformed in ["", "not-a-jwt", "a.b.c", "a.b", "....."] {
        assert_eq!(
            Client::refused(&d.ws, malformed).await,
            ErrorCode::Unauthenticated,
            "{malformed:?}"
        );
    }
    // A wrong deploy key too.
    let mut c = Client::connect(&d.ws).await;
    c.send(&ClientFrame::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        deploy_key: Some("x".repeat(40)),
    })
    .await;
    assert_eq!(code_of(&c.next().await), Some(ErrorCode::Unauthenticated));
    drop(d);
}

fn base64_url(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires_unless_refreshed() {
    let db = members_db("engine_expiry").await;
    let d = start(&db, &[]).await;
    let short = |secs: u64| {
        token_with(
            json!({ "iss": ISSUER, "aud": AUDIENCE, "exp": now() + secs, "sub": "alice", "tenant_id": "t1", "roles": ["ROLE_USER"] }),
            SECRET,
        )
    };
    let mut refreshed = Client::open(&d.ws, &short(2)).await;
    let mut lapsed = Client::open(&d.ws, &short(2)).await;
    refreshed.send(&ClientFrame::Token { token: short(600) }).await;
    // A token for someone else is refused and does not replace the session's.
    let other = token("mallory", Some("t1"), &["ROLE_USER"]);
    refreshed.send(&ClientFrame::Token { token: other }).await;
    assert_eq!(code_of(&refreshed.next().await), Some(ErrorCode::Unauthenticated));
    match lapsed.next_within(6).await {
        Some(ServerFrame::Error { error, .. }) => {
            assert_eq!(error.code, ErrorCode::Unauthenticated);
            assert!(error.message.contains("expired"), "{}", error.message);
        }
        other => panic!("expected unauthenticated on expiry, got {other:?}"),
    }
    assert!(
        lapsed.next_within(5).await.is_none(),
        "the expired session stayed open"
    );
    // The refreshed one is still up after the first token's expiry.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    refreshed.send(&ClientFrame::Ping { nonce: 7 }).await;
    assert_eq!(refreshed.next().await, ServerFrame::Pong { nonce: 7 });
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_the_connection_stays_up() {
    let db = members_db("engine_frames").await;
    let d = start(&db, &[]).await;
    let mut c = Client::open(&d.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    for bad in [
        "{",
        "[]",
        "null",
        r#"{"type":"teleport"}"#,
        r#"{"type":"subscribe","id":1}"#,
        r#"{"type":"heartbeat"}"#,
        r#"{"type":"mutate","id":"m"}"#,
        "\u{0}\u{1}",
    ] {
        c.raw(bad).await;
        assert_eq!(
            code_of(&c.next().await),
            Some(ErrorCode::InvalidArgument),
            "{bad:?}"
        );
    }
    c.ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(code_of(&c.next().await), Some(ErrorCode::InvalidArgument));
    // Well-formed but wrong input names the field.
    match c.subscribe("s", "members", json!({ "secret": 1 })).await {
        ServerFrame::Error { error, id } => {
            assert_eq!(id.as_deref(), Some("s"));
            assert_eq!(error.code, ErrorCode::InvalidArgument);
            assert_eq!(error.details["field"], "args.secret");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code_of(&c.subscribe("u", "nothing_like_this", json!({})).await),
        Some(ErrorCode::NotFound)
    );
    match c.mutate("m", "invite", json!({ "email": 3 })).await {
        ServerFrame::Error { error, .. } => assert_eq!(error.details["field"], "args.email"),
        other => panic!("{other:?}"),
    }
    c.send(&ClientFrame::Ping { nonce: 1 }).await;
    assert_eq!(c.next().await, ServerFrame::Pong { nonce: 1 });
}

#[tokio::test]
async fn presence_join_update_leave_and_ttl_expiry() {
    let db = members_db("engine_presence").await;
    let d = start(&db, &[("PULSE__LIMITS__PRESENCE_TTL_SECS", "1".to_string())]).await;
    let mut watcher = Client::open(&d.ws, &token("wendy", Some("t1"), &["ROLE_STAFF"])).await;
    let mut outsider = Client::open(&d.ws, &token("oscar", Some("t2"), &["ROLE_STAFF"])).await;
    match watcher.subscribe("p", "presence", json!({})).await {
        ServerFrame::Result { data, .. } => assert_eq!(data["count"], 0),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        outsider.subscribe("p", "presence", json!({})).await,
        ServerFrame::Result { .. }
    ));

    // Online counts feed a metric.
    let mut counter = Client::open(&d.ws, &token("carl", Some("t1"), &["ROLE_ADMIN"])).await;
    match counter.subscribe("o", "metric:online", json!({})).await {
        ServerFrame::Result { data, .. } => assert_eq!(data["value"], 0),
        other => panic!("{other:?}"),
    }
    let alice = token("alice", Some("t1"), &["ROLE_USER"]);
    let mut tab1 = Client::open(&d.ws, &alice).await;
    let mut tab2 = Client::open(&d.ws, &alice).await;
    tab1.heartbeat("/home").await;
    let expect = |f: ServerFrame, event: PresenceEvent, resource: &str| match f {
        ServerFrame::Presence {
            event: e,
            user,
            resource: r,
            ..
        } => {
            assert_eq!((e, user.as_str(), r.as_str()), (event, "alice", resource));
        }
        other => panic!("expected {event:?} {resource}, got {other:?}"),
    };
    expect(watcher.next().await, PresenceEvent::Join, "/home");
    // A second tab on the same page changes nothing; moving pages is an update.
    tab2.heartbeat("/home").await;
    tab2.heartbeat("/members/7").await;
    expect(watcher.next().await, PresenceEvent::Update, "/members/7");
    drop(tab2);
    expect(watcher.next().await, PresenceEvent::Update, "/home");
    drop(tab1);
    expect(watcher.next().await, PresenceEvent::Leave, "/home");

    // A tab that stops heartbeating leaves after the TTL.
    let mut quiet = Client::open(&d.ws, &alice).await;
    quiet.heartbeat("/away").await;
    expect(watcher.next().await, PresenceEvent::Join, "/away");
    match watcher.next_within(4).await {
        Some(f) => expect(f, PresenceEvent::Leave, "/away"),
        None => panic!("no leave after the TTL"),
    }
    // The other tenant saw none of it; a cross-tenant presence subscription is refused.
    assert!(outsider.next_within(1).await.is_none());
    assert_eq!(
        code_of(
            &outsider
                .subscribe("x", "presence", json!({ "tenant": "t1" }))
                .await
        ),
        Some(ErrorCode::Forbidden)
    );
    let mut counts = Vec::new();
    while counts.len() < 4 {
        match counter.next().await {
            ServerFrame::Value { value, .. } => counts.push(value),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(counts, vec![json!(1), json!(0), json!(1), json!(0)]);
    drop(quiet);
}

#[tokio::test]
async fn live_tables_scope_rows_by_tenant_and_owner() {
    let db = members_db("engine_live").await;
    let d = start(&db, &[]).await;
    let ids = |f: ServerFrame| match f {
        ServerFrame::Result { data, cursor, .. } => {
            assert!(cursor.is_some());
            let mut v: Vec<i64> = data
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_i64().unwrap())
                .collect();
            v.sort();
            v
        }
        other => panic!("{other:?}"),
    };
    let mut member = Client::open(&d.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    assert_eq!(ids(member.subscribe("a", "members", json!({})).await), vec![1, 3]);
    assert_eq!(
        ids(member
            .subscribe("b", "members", json!({ "status": "active" }))
            .await),
        vec![1]
    );
    let mut staff = Client::open(&d.ws, &token("sam", Some("t1"), &["ROLE_STAFF"])).await;
    assert_eq!(
        ids(staff.subscribe("a", "members", json!({})).await),
        vec![1, 2, 3]
    );
    assert_eq!(
        code_of(&staff.subscribe("x", "members", json!({ "tenant": "t2" })).await),
        Some(ErrorCode::Forbidden)
    );
    // Services read any tenant.
    let mut service = Client::connect(&d.ws).await;
    service
        .send(&ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            token: None,
            deploy_key: Some("d".repeat(40)),
        })
        .await;
    assert!(matches!(service.next().await, ServerFrame::Welcome { .. }));
    assert_eq!(
        ids(service.subscribe("a", "members", json!({ "tenant": "t2" })).await),
        vec![4]
    );
    assert_eq!(
        ids(service.subscribe("b", "members", json!({})).await),
        vec![1, 2, 3, 4]
    );
    // Unsubscribe, and a second one of the same id is not found.
    member.send(&ClientFrame::Unsubscribe { id: "a".into() }).await;
    assert_eq!(member.next().await, ServerFrame::Unsubscribed { id: "a".into() });
    member.send(&ClientFrame::Unsubscribe { id: "a".into() }).await;
    assert_eq!(code_of(&member.next().await), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn notifications_are_sent_read_and_counted_live() {
    let db = members_db("engine_notify").await;
    let d = start(&db, &[]).await;
    let mut alice = Client::open(&d.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    match alice.subscribe("n", "notifications", json!({})).await {
        ServerFrame::Result { data, .. } => assert_eq!(data["unread"], 0),
        other => panic!("{other:?}"),
    }
    let mut staff = Client::open(&d.ws, &token("sam", Some("t1"), &["ROLE_STAFF"])).await;
    for i in 0..2 {
        match staff
            .mutate(
                "m",
                "notify",
                json!({ "user": "alice", "title": format!("hello {i}") }),
            )
            .await
        {
            ServerFrame::MutationResult { result, .. } => assert!(result["id"].is_i64()),
            other => panic!("{other:?}"),
        }
        match alice.next().await {
            ServerFrame::Update { op, row, .. } => {
                assert_eq!(op, UpdateOp::Insert);
                assert_eq!(row.unwrap()["title"], format!("hello {i}"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            alice.next().await,
            ServerFrame::Value {
                id: "n".into(),
                name: "unread".into(),
                value: json!(i + 1)
            }
        );
    }
    // Members may not send; staff of another tenant may not send here.
    assert_eq!(
        code_of(
            &alice
                .mutate("m", "notify", json!({ "user": "bob", "title": "x" }))
                .await
        ),
        Some(ErrorCode::Forbidden)
    );
    let mut other = Client::open(&d.ws, &token("olga", Some("t2"), &["ROLE_STAFF"])).await;
    assert_eq!(
        code_of(
            &other
                .mutate(
                    "m",
                    "notify",
                    json!({ "tenant": "t1", "user": "alice", "title": "x" })
                )
                .await
        ),
        Some(ErrorCode::Forbidden)
    );
    match alice.mutate("r", "mark_all_read", json!({})).await {
        ServerFrame::Value { name, value, .. } => {
            assert_eq!((name.as_str(), value), ("unread", json!(0)));
            assert!(matches!(alice.next().await, ServerFrame::MutationResult { .. }));
        }
        ServerFrame::MutationResult { result, .. } => assert_eq!(result["unread"], 0),
        other => panic!("{other:?}"),
    }
    // The inbox query sees them, read.
    match alice.subscribe("n2", "notifications", json!({})).await {
        ServerFrame::Result { data, .. } => {
            assert_eq!(data["unread"], 0);
            assert_eq!(data["items"].as_array().unwrap().len(), 2);
        }
        other => panic!("{other:?}"),
    }
}

/// Every capability the API exposes, for every role, against the own tenant and another:
/// the answer on the wire must match `authorize` over the matrix.
#[tokio::test]
async fn every_capability_cell_and_cross_tenant_attempt_on_the_api() {
    let db = members_db("engine_caps").await;
    let d = start(&db, &[]).await;
    let roles: [(Role, &str); 4] = [
        (Role::PlatformAdmin, "ROLE_SUPER_ADMIN"),
        (Role::TenantAdmin, "ROLE_ADMIN"),
        (Role::Staff, "ROLE_STAFF"),
        (Role::Member, "ROLE_USER"),
    ];
    let mut checked = 0;
    for (role, symfony) in roles {
        let principal = Principal {
            user: Some("u1".into()),
            tenant: Some("t1".into()),
            roles: vec![role],
        };
        let mut c = Client::open(&d.ws, &token("u1", Some("t1"), &[symfony])).await;
        for tenant in ["t1", "t2"] {
            let everyone = [Role::PlatformAdmin, Role::TenantAdmin, Role::Staff, Role::Member];
            let cases: [(Capability, &str, Value, Option<&[Role]>); 5] = [
                (
                    Capability::SeePresence,
                    "presence",
                    json!({ "tenant": tenant }),
                    None,
                ),
                (
                    Capability::SeeMetrics,
                    "metric:active",
                    json!({ "tenant": tenant }),
                    None,
                ),
                (
                    Capability::ReadLiveTable,
                    "members",
                    json!({ "tenant": tenant }),
                    Some(&everyone),
                ),
                (
                    Capability::ReadLiveTable,
                    "roster",
                    json!({ "tenant": tenant }),
                    Some(&[Role::Staff]),
                ),
                (
                    Capability::SendNotifications,
                    "notify",
                    json!({ "tenant": tenant, "user": "u9", "title": "t" }),
                    None,
                ),
            ];
            for (i, (cap, what, args, listed)) in cases.into_iter().enumerate() {
                let target = Target {
                    tenant: Some(tenant),
                    listed,
                    ..Target::default()
                };
                let expected = authorize(&principal, cap, &target).is_allowed();
                let id = format!("{tenant}-{i}");
                let answer = if cap == Capability::SendNotifications {
                    c.mutate(&id, what, args).await
                } else {
                    c.subscribe(&id, what, args).await
                };
                let allowed = match &answer {
                    ServerFrame::Result { .. } | ServerFrame::MutationResult { .. } => true,
                    ServerFrame::Error { error, .. } if error.code == ErrorCode::Forbidden => false,
                    other => panic!("{role:?} {cap:?} {tenant}: unexpected {other:?}"),
                };
                assert_eq!(allowed, expected, "{role:?} {cap:?} on tenant {tenant}");
                checked += 1;
            }
        }
        // Own presence and own inbox, on a session that watches nothing, in a tenant
        // nobody above watches (its leave would reach their presence subscriptions).
        let mut c = Client::open(&d.ws, &token("u1", Some("t3"), &[symfony])).await;
        c.heartbeat("/x").await;
        let inbox = c.subscribe("inbox", "notifications", json!({})).await;
        assert!(
            matches!(inbox, ServerFrame::Result { .. }),
            "{role:?} inbox: {inbox:?}"
        );
        c.send(&ClientFrame::Ping { nonce: 3 }).await;
        assert_eq!(
            c.next().await,
            ServerFrame::Pong { nonce: 3 },
            "{role:?}: heartbeat was refused"
        );
    }
    assert_eq!(checked, 40);
    // The service (deploy key) may not publish presence nor read an inbox.
    let mut s = Client::connect(&d.ws).await;
    s.send(&ClientFrame::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        deploy_key: Some("d".repeat(40)),
    })
    .await;
    assert!(matches!(s.next().await, ServerFrame::Welcome { .. }));
    s.heartbeat("/x").await;
    assert_eq!(code_of(&s.next().await), Some(ErrorCode::Forbidden));
    assert_eq!(
        code_of(&s.subscribe("i", "notifications", json!({})).await),
        Some(ErrorCode::Forbidden)
    );
    assert!(matches!(
        s.subscribe("m", "metric:active", json!({ "tenant": "t2" })).await,
        ServerFrame::Result { .. }
    ));
}

#[tokio::test]
async fn polling_answers_with_a_cursor_and_its_rate_limit() {
    let db = members_db("engine_poll").await;
    let d = start(
        &db,
        &[("PULSE__LIMITS__HTTP_REQUESTS_PER_SEC_PER_IP", "4".to_string())],
    )
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/poll", d.pulsed.http);
    let staff = token("sam", Some("t1"), &["ROLE_STAFF"]);
    let r = http
        .get(&url)
        .query(&[("query", "members")])
        .bearer_auth(&staff)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["resnapshot"], true);
    assert_eq!(body["rows"].as_array().unwrap().len(), 3);
    assert_eq!(body["realtime"], true);
    assert!(body["sync_interval_ms"].is_u64());
    // With the cursor: nothing changed since.
    let r = http
        .get(&url)
        .query(&[("query", "members"), ("cursor", body["cursor"].as_str().unwrap())])
        .bearer_auth(&staff)
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["resnapshot"].clone(), body["updates"].clone()),
        (json!(false), json!([]))
    );
    // Cross-tenant polling is refused like the WebSocket: 403 with the shared body.
    let r = http
        .get(&url)
        .query(&[("query", "members"), ("args", r#"{"tenant":"t2"}"#)])
        .bearer_auth(&staff)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "forbidden");
    // No token, then too many requests.
    let r = http
        .get(&url)
        .query(&[("query", "members")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Requests in a burst beyond the rate get 429 (the bucket refills one every 250 ms,
    // so a slow machine may let a few through first).
    let mut limited = None;
    for _ in 0..20 {
        let r = http
            .get(&url)
            .query(&[("query", "presence")])
            .bearer_auth(&staff)
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("no 429 in a burst of 20 requests at 4 per second");
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
}

#[tokio::test]
async fn metrics_endpoint_shows_engine_series() {
    let db = members_db("engine_prom").await;
    let d = start(&db, &[]).await;
    wait_streaming(&d).await;
    let mut c = Client::open(&d.ws, &token("sam", Some("t1"), &["ROLE_STAFF"])).await;
    assert!(matches!(
        c.subscribe("p", "presence", json!({})).await,
        ServerFrame::Result { .. }
    ));
    assert!(matches!(
        c.subscribe("m", "members", json!({})).await,
        ServerFrame::Result { .. }
    ));
    // A commit that reaches the subscriber: its delivery latency is recorded.
    db.connect()
        .await
        .unwrap()
        .batch_execute("INSERT INTO members VALUES (70, 't1', 'zed', 'active')")
        .await
        .unwrap();
    assert!(matches!(c.next().await, ServerFrame::Update { .. }));
    let mut alice = Client::open(&d.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    alice.heartbeat("/home").await;
    assert!(matches!(c.next().await, ServerFrame::Presence { .. }));
    assert!(matches!(
        c.mutate("n", "notify", json!({ "user": "alice", "title": "hi" }))
            .await,
        ServerFrame::MutationResult { .. }
    ));
    c.raw("{").await;
    assert_eq!(code_of(&c.next().await), Some(ErrorCode::InvalidArgument));
    let text = reqwest::get(format!("{}/metrics", d.pulsed.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    assert_eq!(value("pulse_connections_active"), 2.0);
    assert_eq!(value("pulse_subscriptions"), 2.0);
    assert_eq!(value("pulse_presence_online"), 1.0);
    assert!(value("pulse_query_latency_seconds_count") >= 2.0);
    assert!(value("pulse_mutation_latency_seconds_count") >= 1.0);
    assert!(
        text.contains("pulse_query_latency_seconds_bucket{le=\"0.2\"}"),
        "{text}"
    );
    assert!(value("pulse_errors_total{code=\"invalid_argument\"}") >= 1.0);
    assert!(value("pulse_live_delivery_latency_seconds_count") >= 1.0);
    assert!(
        text.contains("pulse_live_delivery_latency_seconds_bucket{le=\"0.005\"}"),
        "{text}"
    );
}

/// A client that stops reading is cut loose; a client beside it gets everything.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_loose_and_others_are_unaffected() {
    let db = members_db("engine_slow").await;
    let d = start(
        &db,
        &[("PULSE__LIMITS__FRAMES_PER_SEC_PER_USER", "1000000".to_string())],
    )
    .await;
    let mut slow = Client::open(&d.ws, &token("slow", Some("t1"), &["ROLE_STAFF"])).await;
    let mut fast = Client::open(&d.ws, &token("fast", Some("t1"), &["ROLE_STAFF"])).await;
    assert!(matches!(
        slow.subscribe("p", "presence", json!({})).await,
        ServerFrame::Result { .. }
    ));
    assert!(matches!(
        fast.subscribe("p", "presence", json!({})).await,
        ServerFrame::Result { .. }
    ));
    let mut busy = Client::open(&d.ws, &token("busy", Some("t1"), &["ROLE_USER"])).await;
    let padding = "x".repeat(900);
    let total = 12_000;
    // The fast client reads everything while the slow one reads nothing.
    let (progress, mut seen_rx) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < total {
            match fast.next_within(20).await {
                Some(ServerFrame::Presence { .. }) => seen += 1,
                Some(other) => panic!("{other:?}"),
                None => break,
            }
            let _ = progress.send(seen);
        }
        seen
    });
    // Paced to what the reading client keeps up with: only the one that reads nothing
    // falls behind.
    for i in 0..total {
        while i >= *seen_rx.borrow() + 200 {
            if seen_rx.changed().await.is_err() {
                break;
            }
        }
        busy.send(&ClientFrame::Heartbeat {
            resource: format!("/page/{}", i % 2),
            state: json!({ "pad": padding }),
        })
        .await;
    }
    assert_eq!(reader.await.unwrap(), total, "the reading client missed updates");
    // The slow client finds its connection closed after what was buffered.
    let mut drained = 0;
    while let Some(f) = slow.next_within(5).await {
        assert!(matches!(f, ServerFrame::Presence { .. }));
        drained += 1;
    }
    assert!(
        drained < total,
        "the slow client was never cut ({drained} frames)"
    );
    let text = reqwest::get(format!("{}/metrics", d.pulsed.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("pulse_slow_clients_cut_total 1"), "{text}");
}

/// Turning Real-time off and changing the Sync Interval reach connected clients and the
/// polling answer without a restart.
#[tokio::test]
async fn platform_settings_take_effect_live() {
    let db = members_db("engine_settings").await;
    let d = start(&db, &[]).await;
    let mut c = Client::open(&d.ws, &token("sam", Some("t1"), &["ROLE_STAFF"])).await;
    // Another instance (or the console) edits the stored settings.
    let mut admin = db.connect().await.unwrap();
    let config = pulse_daemon::config::Config::load(&pulse_daemon::config::ConfigSource {
        file: None,
        env: vec![("PULSE__SOURCE__URL".into(), db.url())],
    })
    .unwrap();
    let settings = pulse_daemon::settings::Settings::new(&config.platform);
    settings
        .update(&mut admin, "enable_realtime", "false", "ops")
        .await
        .unwrap();
    settings
        .update(&mut admin, "sync_interval_ms", "1500", "ops")
        .await
        .unwrap();
    let mut last = None;
    while let Some(f) = c.next_within(15).await {
        if let ServerFrame::Settings {
            realtime,
            sync_interval_ms,
        } = f
        {
            last = Some((realtime, sync_interval_ms));
            if last == Some((false, 1500)) {
                break;
            }
        }
    }
    assert_eq!(last, Some((false, 1500)), "the session was not told to poll");
    let body: Value = reqwest::Client::new()
        .get(format!("{}/v1/poll", d.pulsed.http))
        .query(&[("query", "presence")])
        .bearer_auth(token("sam", Some("t1"), &["ROLE_STAFF"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (body["realtime"].clone(), body["sync_interval_ms"].clone()),
        (json!(false), json!(1500))
    );
}

/// Waits until the change stream is up (the snapshot is loaded and streaming runs).
pub(crate) async fn wait_streaming(d: &Daemon) {
    let url = format!("{}/readyz", d.pulsed.http);
    pulse_harness::wait_for("replication up", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let body: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            body["components"]
                .as_array()?
                .iter()
                .any(|c| c["name"] == "replication" && c["state"] == "up")
                .then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", d.pulsed.log()));
}

/// Reads frames until `want` are seen (in any order among themselves); returns every
/// update and value seen, in order.
async fn collect(c: &mut Client, want: usize) -> Vec<ServerFrame> {
    let mut out = Vec::new();
    while out.len() < want {
        match c.next_within(10).await {
            Some(f @ (ServerFrame::Update { .. } | ServerFrame::Value { .. })) => out.push(f),
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("only {} of {want} frames arrived: {out:?}", out.len()),
        }
    }
    out
}

fn update_of(f: &ServerFrame) -> Option<(UpdateOp, i64, String)> {
    match f {
        ServerFrame::Update { op, key, cursor, .. } => {
            Some((*op, key["id"].as_i64().unwrap(), cursor.clone().unwrap()))
        }
        _ => None,
    }
}

/// End to end: a commit in PostgreSQL reaches subscribed clients through the change
/// stream (live table and metric), rows leave filters, other tenants see nothing, a
/// reconnect with resume gets exactly what it missed, and after SIGKILL and a restart
/// the metric equals a fresh count.
#[tokio::test]
async fn commits_reach_subscribers_resume_gets_what_was_missed_and_metrics_survive_sigkill() {
    let db = members_db("engine_e2e").await;
    let mut d = start(&db, &[]).await;
    wait_streaming(&d).await;
    let source = db.connect().await.unwrap();
    let staff = token("sam", Some("t1"), &["ROLE_STAFF"]);
    let mut c = Client::open(&d.ws, &staff).await;
    assert!(matches!(
        c.subscribe("m", "members", json!({ "status": "active" })).await,
        ServerFrame::Result { .. }
    ));
    match c.subscribe("k", "metric:active", json!({})).await {
        ServerFrame::Result { data, .. } => assert_eq!(data["value"], 2),
        other => panic!("{other:?}"),
    }
    let mut other_tenant = Client::open(&d.ws, &token("olga", Some("t2"), &["ROLE_STAFF"])).await;
    assert!(matches!(
        other_tenant.subscribe("m", "members", json!({})).await,
        ServerFrame::Result { .. }
    ));

    source
        .batch_execute("INSERT INTO members VALUES (5, 't1', 'dave', 'active')")
        .await
        .unwrap();
    let frames = collect(&mut c, 2).await;
    assert!(
        frames
            .iter()
            .any(|f| update_of(f).is_some_and(|(op, id, _)| op == UpdateOp::Insert && id == 5)),
        "{frames:?}"
    );
    assert!(
        frames.contains(&ServerFrame::Value {
            id: "k".into(),
            name: "value".into(),
            value: json!(3)
        }),
        "{frames:?}"
    );
    source
        .batch_execute("UPDATE members SET status = 'gone' WHERE id = 1")
        .await
        .unwrap();
    let frames = collect(&mut c, 2).await;
    let cursor = frames
        .iter()
        .find_map(|f| update_of(f).filter(|(op, id, _)| *op == UpdateOp::Delete && *id == 1))
        .map(|(_, _, cursor)| cursor)
        .unwrap_or_else(|| panic!("row 1 did not leave the filter: {frames:?}"));
    assert!(other_tenant.next_within(1).await.is_none(), "t2 saw t1's changes");

    // Disconnect, miss three changes (one of another tenant), resume.
    drop(c);
    source
        .batch_execute(
            "INSERT INTO members VALUES (6, 't1', 'erin', 'active');
             INSERT INTO members VALUES (7, 't2', 'zed', 'active');
             DELETE FROM members WHERE id = 2;",
        )
        .await
        .unwrap();
    // The other tenant's subscriber sees its row: the stream went past all three.
    assert!(matches!(
        other_tenant.next_within(10).await,
        Some(ServerFrame::Update { .. })
    ));
    let mut c = Client::open(&d.ws, &staff).await;
    c.send(&ClientFrame::Resume {
        cursor,
        subscriptions: vec![pulse_shared::protocol::SubscribeSpec {
            id: "m".into(),
            query: "members".into(),
            args: json!({ "status": "active" }),
        }],
    })
    .await;
    let missed: Vec<(UpdateOp, i64)> = collect(&mut c, 2)
        .await
        .iter()
        .filter_map(update_of)
        .map(|(op, id, _)| (op, id))
        .collect();
    assert_eq!(missed, vec![(UpdateOp::Insert, 6), (UpdateOp::Delete, 2)]);
    assert!(c.next_within(1).await.is_none(), "more than what was missed");

    // SIGKILL and restart: the metric equals a fresh count.
    source
        .batch_execute("UPDATE members SET status = 'active' WHERE id = 3")
        .await
        .unwrap();
    assert!(c.next_within(10).await.is_some());
    d.pulsed.kill9();
    source
        .batch_execute("INSERT INTO members VALUES (8, 't1', 'fred', 'active')")
        .await
        .unwrap();
    let d2 = start(&db, &[]).await;
    wait_streaming(&d2).await;
    let fresh: i64 = source
        .query_one(
            "SELECT count(*) FROM members WHERE tenant_id = 't1' AND status = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut c = Client::open(&d2.ws, &staff).await;
    pulse_harness::wait_for("the metric to catch up", Duration::from_secs(10), || {
        let ws = d2.ws.clone();
        let staff = staff.clone();
        async move {
            let mut c = Client::open(&ws, &staff).await;
            match c.subscribe("k", "metric:active", json!({})).await {
                ServerFrame::Result { data, .. } if data["value"] == json!(fresh) => Some(()),
                _ => None,
            }
        }
    })
    .await
    .unwrap();
    let persisted: i64 = source
        .query_one(
            "SELECT COALESCE(sum(n), 0)::int8 FROM pulse.metric_cells WHERE metric = 'active' AND tenant = 't1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(persisted, fresh);
    c.send(&ClientFrame::Ping { nonce: 0 }).await;
    assert_eq!(c.next().await, ServerFrame::Pong { nonce: 0 });
}

/// Live updates reach clients as soon as the batch is taken from the stream, not after
/// the group commit: while the checkpoint row is locked (the loop's state transaction
/// cannot commit), the 50 rows of one commit arrive, coalesced into `updates` frames,
/// in order, each with its own cursor; the metric value (derived, persisted state)
/// waits for the commit. A resume from a cursor in the middle of that batch gets
/// exactly the rest of it.
#[tokio::test]
async fn live_updates_arrive_before_the_group_commit_coalesced_with_exact_cursors() {
    let db = members_db("engine_early").await;
    let d = start(&db, &[]).await;
    wait_streaming(&d).await;
    let source = db.connect().await.unwrap();
    let staff = token("sam", Some("t1"), &["ROLE_STAFF"]);
    let mut c = Client::open(&d.ws, &staff).await;
    assert!(matches!(
        c.subscribe("m", "members", json!({})).await,
        ServerFrame::Result { .. }
    ));
    match c.subscribe("k", "metric:active", json!({})).await {
        ServerFrame::Result { data, .. } => assert_eq!(data["value"], 2),
        other => panic!("{other:?}"),
    }
    // Hold the checkpoint row: the group commit blocks on it.
    let mut blocker = db.connect().await.unwrap();
    let lock = blocker.transaction().await.unwrap();
    let held = lock
        .execute("SELECT 1 FROM pulse.checkpoints FOR UPDATE", &[])
        .await
        .unwrap();
    assert!(held >= 1, "no checkpoint row to hold");
    source
        .batch_execute(
            "INSERT INTO members SELECT g, 't1', 'u' || g, 'active' FROM generate_series(10, 59) g",
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 50 {
        match c.next_within(10).await {
            Some(f @ ServerFrame::Update { .. }) => got.push(update_of(&f).unwrap()),
            Some(ServerFrame::Value { .. }) => panic!("the metric was published before its commit"),
            other => panic!("after {} updates: {other:?}", got.len()),
        }
    }
    assert_eq!(
        got.iter().map(|(op, id, _)| (*op, *id)).collect::<Vec<_>>(),
        (10..60).map(|i| (UpdateOp::Insert, i)).collect::<Vec<_>>()
    );
    let seqs: Vec<u64> = got
        .iter()
        .map(|(_, _, cursor)| cursor.rsplit_once('-').unwrap().1.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(c.batches >= 1, "50 rows of one commit came as 50 frames");
    assert!(
        c.next_within(1).await.is_none(),
        "something beyond the live updates came before the commit"
    );
    // A commit made while that batch's state transaction waits reaches clients too: the
    // loop goes on taking what the reader sends, and publishes it at once.
    source
        .batch_execute("INSERT INTO members VALUES (60, 't1', 'u60', 'active')")
        .await
        .unwrap();
    match c.next_within(10).await {
        Some(f @ ServerFrame::Update { .. }) => {
            let (op, id, _) = update_of(&f).unwrap();
            assert_eq!((op, id), (UpdateOp::Insert, 60));
        }
        other => panic!("a commit made during the state transaction waited for it: {other:?}"),
    }
    lock.rollback().await.unwrap();
    // The two batches commit in turn: 52 (maybe shown), then 53.
    loop {
        match c.next_within(10).await {
            Some(ServerFrame::Value { id, value, .. }) if id == "k" && value == json!(52) => {}
            Some(ServerFrame::Value { id, value, .. }) if id == "k" && value == json!(53) => break,
            other => panic!("the metric did not follow the commits: {other:?}"),
        }
    }
    // Resume from the 25th update of the batch: exactly the other 25, and row 60.
    let mut r = Client::open(&d.ws, &staff).await;
    r.send(&ClientFrame::Resume {
        cursor: got[24].2.clone(),
        subscriptions: vec![pulse_shared::protocol::SubscribeSpec {
            id: "m".into(),
            query: "members".into(),
            args: json!({}),
        }],
    })
    .await;
    let missed: Vec<i64> = collect(&mut r, 26)
        .await
        .iter()
        .filter_map(update_of)
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(missed, (35..61).collect::<Vec<_>>());
    assert!(r.next_within(1).await.is_none(), "more than what was missed");
}

/// The demo's schema file matches the demo database, and a wrong entry is named.
#[tokio::test]
async fn the_demo_schema_file_matches_the_demo_database() {
    let db = PgCluster::shared().fresh_db("engine_demo_schema").await.unwrap();
    let c = db.connect().await.unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for f in ["demo/schema.sql", "demo/seed.sql"] {
        c.batch_execute(&std::fs::read_to_string(format!("{root}/{f}")).unwrap())
            .await
            .unwrap();
    }
    let text = std::fs::read_to_string(format!("{root}/demo/pulse-schema.toml")).unwrap();
    let mut schema = pulse_daemon::schema::Schema::parse("demo/pulse-schema.toml", &text).unwrap();
    schema.check(&c).await.unwrap();
    assert_eq!(schema.tables["payments"].key, vec!["id".to_string()]);
    let mut wrong = pulse_daemon::schema::Schema::parse(
        "x",
        &text.replace(
            "\"full_name\", \"status\"",
            "\"full_name\", \"status\", \"nickname\"",
        ),
    )
    .unwrap();
    let e = wrong.check(&c).await.unwrap_err();
    assert_eq!(e.entry, "tables.members.columns");
    assert!(e.message.contains("nickname"), "{e}");
    let mut wrong = pulse_daemon::schema::Schema::parse(
        "x",
        &text.replace("column = \"amount\"", "column = \"currency\""),
    )
    .unwrap();
    assert_eq!(
        wrong.check(&c).await.unwrap_err().entry,
        "metrics.revenue_this_month.column"
    );
    c.batch_execute("ALTER TABLE payment REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let e = schema.check(&c).await.unwrap_err();
    assert!(e.message.contains("REPLICA IDENTITY FULL"), "{e}");
}

/// Rows Symfony inserts into the notification source table reach the recipient's inbox
/// live, once; marking some read ignores other users' ids; old ones expire.
#[tokio::test]
async fn notifications_from_the_source_table_arrive_live_and_expire() {
    let db = members_db("engine_alerts").await;
    let d = start(&db, &[]).await;
    wait_streaming(&d).await;
    let source = db.connect().await.unwrap();
    let mut alice = Client::open(&d.ws, &token("alice", Some("t1"), &["ROLE_USER"])).await;
    assert!(matches!(
        alice.subscribe("n", "notifications", json!({})).await,
        ServerFrame::Result { .. }
    ));
    source
        .batch_execute(
            "INSERT INTO alerts (tenant_id, user_id, title, body) VALUES ('t1', 'alice', 'Payment received', 'Thanks');
             INSERT INTO alerts (tenant_id, user_id, title) VALUES ('t1', 'bob', 'Not for alice');
             INSERT INTO alerts (tenant_id, user_id, title) VALUES ('t2', 'alice', 'Other tenant');",
        )
        .await
        .unwrap();
    let frames = collect(&mut alice, 2).await;
    let id = match &frames[0] {
        ServerFrame::Update {
            op: UpdateOp::Insert,
            row: Some(row),
            key,
            ..
        } => {
            assert_eq!(
                (row["title"].as_str(), row["body"].as_str()),
                (Some("Payment received"), Some("Thanks"))
            );
            key["id"].as_i64().unwrap()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        frames[1],
        ServerFrame::Value {
            id: "n".into(),
            name: "unread".into(),
            value: json!(1)
        }
    );
    assert!(
        alice.next_within(1).await.is_none(),
        "alice got someone else's notification"
    );
    // Bob's notification id is ignored when alice marks it.
    let state = db.connect().await.unwrap();
    let bobs: i64 = state
        .query_one("SELECT id FROM pulse.notifications WHERE user_id = 'bob'", &[])
        .await
        .unwrap()
        .get(0);
    alice
        .send(&ClientFrame::Mutate {
            id: "r".into(),
            name: "mark_read".into(),
            args: json!({ "ids": [id, bobs] }),
            idempotency_key: None,
        })
        .await;
    let mut marked = None;
    for _ in 0..2 {
        match alice.next().await {
            ServerFrame::MutationResult { result, .. } => marked = Some(result["marked"].clone()),
            ServerFrame::Value { value, .. } => assert_eq!(value, json!(0)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(marked, Some(json!(1)));
    let bob_unread: bool = state
        .query_one(
            "SELECT read_at IS NULL FROM pulse.notifications WHERE id = $1",
            &[&bobs],
        )
        .await
        .unwrap()
        .get(0);
    assert!(bob_unread);
    // Retention: anything older than the schema's 30 days goes.
    state
        .execute(
            "UPDATE pulse.notifications SET created_at = now() - interval '31 days' WHERE user_id = 'bob'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        pulse_daemon::engine::notifications::expire(&state, 30)
            .await
            .unwrap(),
        1
    );
    let left: i64 = state
        .query_one("SELECT count(*) FROM pulse.notifications", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 2);
}

/// Frames beyond the per-user rate get `rate_limited` and the session stays up;
/// connections beyond the per-address cap get 429.
#[tokio::test]
async fn frame_rates_and_connection_caps_are_enforced() {
    let db = members_db("engine_limits").await;
    let d = start(
        &db,
        &[
            ("PULSE__LIMITS__FRAMES_PER_SEC_PER_USER", "5".to_string()),
            ("PULSE__LIMITS__CONNECTIONS_PER_IP", "2".to_string()),
            ("PULSE__LIMITS__SUBSCRIPTIONS_PER_USER", "2".to_string()),
        ],
    )
    .await;
    let alice = token("alice", Some("t1"), &["ROLE_USER"]);
    let mut c = Client::open(&d.ws, &alice).await;
    for n in 0..12 {
        c.send(&ClientFrame::Ping { nonce: n }).await;
    }
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..12 {
        match c.next().await {
            ServerFrame::Pong { .. } => pongs += 1,
            ServerFrame::Error { error, .. } => {
                assert_eq!(error.code, ErrorCode::RateLimited);
                assert!(error.details["retry_after_ms"].as_u64().unwrap() > 0);
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(pongs >= 5 && limited >= 1, "pongs {pongs}, limited {limited}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.send(&ClientFrame::Ping { nonce: 99 }).await;
    assert_eq!(c.next().await, ServerFrame::Pong { nonce: 99 });
    // Subscriptions per session.
    assert!(matches!(
        c.subscribe("a", "members", json!({})).await,
        ServerFrame::Result { .. }
    ));
    assert!(matches!(
        c.subscribe("b", "members", json!({})).await,
        ServerFrame::Result { .. }
    ));
    assert_eq!(
        code_of(&c.subscribe("c", "members", json!({})).await),
        Some(ErrorCode::RateLimited)
    );
    // A second connection fits, a third from the same address does not. The
    // subscription limit is per user, across sessions.
    let mut second = Client::open(&d.ws, &alice).await;
    assert_eq!(
        code_of(&second.subscribe("d", "members", json!({})).await),
        Some(ErrorCode::RateLimited)
    );
    // (After the frame rate's second: both sessions count as alice's.)
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.send(&ClientFrame::Unsubscribe { id: "a".into() }).await;
    assert!(matches!(c.next().await, ServerFrame::Unsubscribed { .. }));
    assert!(matches!(
        second.subscribe("d", "members", json!({})).await,
        ServerFrame::Result { .. }
    ));
    match tokio_tungstenite::connect_async(&d.ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            assert!(r.headers().get("retry-after").is_some());
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
}
