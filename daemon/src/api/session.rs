//! One WebSocket session: `hello`, then requests until either side closes.
//!
//! Reading and writing are separate: frames to the client go through a bounded queue to
//! a writer task, so a client that stops reading fills its own queue and is cut loose,
//! and never blocks whoever produces its frames (the engine's hub delivers with
//! `try_send`). A session authenticated by a JWT ends with `unauthenticated` when the
//! token expires, unless the client sent a fresh one in a `token` frame.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use pulse_shared::caps::{Capability, Decision, Principal, Role, Target, authorize};
use pulse_shared::protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame, parse_client_frame};
use pulse_shared::{ErrorBody, ErrorCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::App;
use crate::engine::Caller;
use crate::engine::hub::{Outgoing, merge_live};

/// How the client reached us, which decides how `hello` authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The public HTTP listener: JWT or deploy key.
    Http,
    /// The admin Unix socket: the socket's file mode already authenticated the peer.
    AdminSocket {
        /// The peer's user id (SO_PEERCRED), named in audit records.
        uid: Option<u32>,
    },
}

/// Frames queued for one client before it is considered too slow and cut loose.
const OUTBOX_FRAMES: usize = 1024;
/// Most frames written between two flushes.
const WRITE_BATCH: usize = 64;
/// Live updates queued side by side are merged into one `updates` frame up to this size.
const MERGE_BYTES: usize = 256 * 1024;
/// How long a client has to send `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who the session is, and until when.
struct Identity {
    principal: Principal,
    /// When the token stops being valid; `None` for the deploy key and the admin socket.
    expires: Option<SystemTime>,
    /// On the admin socket, who the kernel says is connected (`console uid=N (name)`):
    /// the actor of the console's audited actions.
    peer: Option<String>,
}

/// Runs one session to its end. `guard` (a connection slot) is held until then.
pub async fn run<G: Send + 'static>(socket: WebSocket, app: Arc<App>, transport: Transport, guard: G) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Outgoing>(OUTBOX_FRAMES);
    let shutdown = app.shutdown.clone();
    let kill = CancellationToken::new();
    let writer = tokio::spawn(async move {
        // Frames that are already waiting go out in one flush: under load that is one
        // write for many frames instead of one each; live updates waiting side by side
        // go out as one `updates` frame.
        let mut held: Option<Outgoing> = None;
        'writing: loop {
            let mut out = match held.take() {
                Some(o) => o,
                None => match rx.recv().await {
                    Some(o) => o,
                    None => break,
                },
            };
            let mut frames = 0;
            loop {
                let text: Utf8Bytes = match out {
                    frame @ Outgoing::Frame(_) => frame.into_wire(),
                    live => {
                        let mut bytes = live.live_len();
                        // Allocated only when more is waiting.
                        let mut run = Vec::new();
                        while bytes < MERGE_BYTES {
                            match rx.try_recv() {
                                Ok(Outgoing::Frame(f)) => {
                                    held = Some(Outgoing::Frame(f));
                                    break;
                                }
                                Ok(more) => {
                                    bytes += more.live_len();
                                    run.push(more);
                                }
                                Err(_) => break,
                            }
                        }
                        if run.is_empty() {
                            live.into_wire()
                        } else {
                            run.insert(0, live);
                            merge_live(run)
                        }
                    }
                };
                if sink.feed(Message::Text(text)).await.is_err() {
                    break 'writing;
                }
                frames += 1;
                if frames >= WRITE_BATCH {
                    break;
                }
                match held.take().map(Ok).unwrap_or_else(|| rx.try_recv()) {
                    Ok(more) => out = more,
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    metrics::gauge!("pulse_connections_active").increment(1.0);

    let identity = tokio::select! {
        p = hello(&mut stream, &tx, &app, transport) => p,
        _ = shutdown.cancelled() => None,
    };
    if let Some(mut identity) = identity {
        let session = app.engine.open_session(tx.clone(), kill.clone());
        let mut settings = app.settings.subscribe();
        settings.mark_unchanged();
        // The console's live change feed, when this session watches it.
        let mut watch: Option<crate::changefeed::Watch> = None;
        let rate_key = identity
            .principal
            .user
            .clone()
            .unwrap_or_else(|| format!("session:{session}"));
        loop {
            let expiry = async {
                match identity.expires {
                    Some(at) => {
                        let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                        tokio::time::sleep(left).await
                    }
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = shutdown.cancelled() => break,
                _ = kill.cancelled() => break,
                pushed = async {
                    match watch.as_mut() {
                        Some(w) => w.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if !send(&tx, pushed) {
                        break;
                    }
                    continue;
                }
                Ok(()) = settings.changed() => {
                    let now = settings.borrow_and_update().clone();
                    if !send(&tx, ServerFrame::Settings {
                        realtime: now.enable_realtime,
                        sync_interval_ms: now.sync_interval_ms,
                    }) {
                        break;
                    }
                    continue;
                }
                _ = expiry => {
                    send(&tx, error(None, ErrorCode::Unauthenticated,
                        "the token expired; reconnect with a fresh one (send token frames before expiry to stay connected)"));
                    break;
                }
            };
            let Some(Ok(msg)) = msg else { break };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => break,
                Message::Binary(_) => {
                    if !send(
                        &tx,
                        error(
                            None,
                            ErrorCode::InvalidArgument,
                            "binary frames are not part of the protocol; send JSON text frames",
                        ),
                    ) {
                        break;
                    }
                    continue;
                }
                _ => continue,
            };
            if let Err(wait) = app.limits.frame(&rate_key) {
                let body = ErrorBody::new(
                    ErrorCode::RateLimited,
                    format!(
                        "too many frames; slow down and retry in {} ms",
                        wait.as_millis().max(1)
                    ),
                )
                .with_details(serde_json::json!({ "retry_after_ms": wait.as_millis().max(1) as u64 }));
                if !send(&tx, error_body(None, body)) {
                    break;
                }
                continue;
            }
            match parse_client_frame(&text) {
                Err(body) => {
                    if !send(&tx, error_body(None, body)) {
                        break;
                    }
                }
                Ok(ClientFrame::Admin {
                    id,
                    request: pulse_shared::admin::AdminRequest::WatchChanges { after },
                }) => {
                    let reply = match crate::admin::watch_changes(&app, &identity.principal, &id, after) {
                        Ok((w, first)) => {
                            watch = Some(w);
                            ServerFrame::Admin {
                                id,
                                response: Box::new(first),
                            }
                        }
                        Err(body) => error_body(Some(id), body),
                    };
                    if !send(&tx, reply) {
                        break;
                    }
                }
                Ok(ClientFrame::Admin {
                    id,
                    request: pulse_shared::admin::AdminRequest::UnwatchChanges,
                }) => {
                    watch = None;
                    let done = ServerFrame::Admin {
                        id,
                        response: Box::new(pulse_shared::admin::AdminResponse::Done {
                            message: "change feed stopped".into(),
                        }),
                    };
                    if !send(&tx, done) {
                        break;
                    }
                }
                Ok(frame) => {
                    let caller = Caller {
                        session,
                        principal: identity.principal.clone(),
                    };
                    if let Some(reply) = handle(frame, &caller, &mut identity, &app).await
                        && !send(&tx, reply)
                    {
                        break;
                    }
                }
            }
        }
        app.engine.close_session(session);
    }
    drop(tx);
    let _ = writer.await;
    metrics::gauge!("pulse_connections_active").decrement(1.0);
    drop(guard);
}

/// Queues a frame; false when the client is gone or too slow (then the session ends).
fn send(tx: &mpsc::Sender<Outgoing>, frame: ServerFrame) -> bool {
    match tx.try_send(Outgoing::Frame(frame)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!("client stopped reading; cutting it loose");
            metrics::counter!("pulse_slow_clients_cut_total").increment(1);
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

fn error(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    metrics::counter!("pulse_errors_total", "code" => code.as_str()).increment(1);
    ServerFrame::Error {
        id,
        error: ErrorBody::new(code, message),
    }
}

fn error_body(id: Option<String>, body: ErrorBody) -> ServerFrame {
    metrics::counter!("pulse_errors_total", "code" => body.code.as_str()).increment(1);
    ServerFrame::Error { id, error: body }
}

/// Verifies a JWT into an identity.
fn verify_token(app: &App, token: &str) -> Result<Identity, ErrorBody> {
    match app.auth.verify(token, &app.engine.schema) {
        Ok(v) => Ok(Identity {
            principal: v.principal,
            expires: Some(v.expires),
            peer: None,
        }),
        Err(e) => Err(ErrorBody::new(ErrorCode::Unauthenticated, e.to_string())),
    }
}

async fn hello(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    tx: &mpsc::Sender<Outgoing>,
    app: &App,
    transport: Transport,
) -> Option<Identity> {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(_) => return None,
        Err(_) => {
            send(
                tx,
                error(
                    None,
                    ErrorCode::Unauthenticated,
                    "no hello within 10 s; send {\"type\":\"hello\",\"protocol\":1,\"token\":…} first",
                ),
            );
            return None;
        }
    };
    let (protocol, token, deploy_key) = match parse_client_frame(&first) {
        Ok(ClientFrame::Hello {
            protocol,
            token,
            deploy_key,
        }) => (protocol, token, deploy_key),
        Ok(_) => {
            send(
                tx,
                error(None, ErrorCode::Unauthenticated, "the first frame must be hello"),
            );
            return None;
        }
        Err(body) => {
            send(tx, error_body(None, body));
            return None;
        }
    };
    if protocol != PROTOCOL_VERSION {
        send(
            tx,
            error(
                None,
                ErrorCode::InvalidArgument,
                format!("protocol {protocol} is not supported; this server speaks {PROTOCOL_VERSION}"),
            ),
        );
        return None;
    }
    let service = Identity {
        principal: Principal {
            user: None,
            tenant: None,
            roles: vec![Role::Service],
        },
        expires: None,
        peer: None,
    };
    let identity = match (transport, token, deploy_key) {
        (Transport::AdminSocket { uid }, _, _) => Identity {
            peer: uid.map(crate::admin::console_user),
            ..service
        },
        (Transport::Http, _, Some(key)) => {
            if app.deploy_key_matches(&key) {
                service
            } else {
                send(
                    tx,
                    error(None, ErrorCode::Unauthenticated, "the deploy key is wrong"),
                );
                return None;
            }
        }
        (Transport::Http, Some(token), None) => match verify_token(app, &token) {
            Ok(i) => i,
            Err(body) => {
                send(tx, error_body(None, body));
                return None;
            }
        },
        (Transport::Http, None, None) => {
            send(
                tx,
                error(
                    None,
                    ErrorCode::Unauthenticated,
                    "hello needs a token (JWT) or a deploy key",
                ),
            );
            return None;
        }
    };
    let settings = app.platform();
    let welcome = ServerFrame::Welcome {
        protocol: PROTOCOL_VERSION,
        server_version: crate::VERSION.to_string(),
        session: uuid::Uuid::now_v7().to_string(),
        roles: identity
            .principal
            .roles
            .iter()
            .map(|r| r.as_str().to_string())
            .collect(),
        realtime: settings.enable_realtime,
        sync_interval_ms: settings.sync_interval_ms,
    };
    send(tx, welcome).then_some(identity)
}

async fn handle(
    frame: ClientFrame,
    caller: &Caller,
    identity: &mut Identity,
    app: &App,
) -> Option<ServerFrame> {
    let engine = &app.engine;
    match frame {
        ClientFrame::Hello { .. } => Some(error(None, ErrorCode::InvalidArgument, "hello was already sent")),
        ClientFrame::Ping { nonce } => Some(ServerFrame::Pong { nonce }),
        ClientFrame::Token { token } => {
            if identity.expires.is_none() {
                return Some(error(
                    None,
                    ErrorCode::InvalidArgument,
                    "this session is not authenticated by a token",
                ));
            }
            match verify_token(app, &token) {
                // A fresh token must be for the same user and tenant: a session never
                // changes hands.
                Ok(fresh)
                    if fresh.principal.user == identity.principal.user
                        && fresh.principal.tenant == identity.principal.tenant =>
                {
                    // Roles are taken from the fresh token for new requests; existing
                    // subscriptions keep what they were granted.
                    *identity = fresh;
                    None
                }
                Ok(_) => Some(error(
                    None,
                    ErrorCode::Unauthenticated,
                    "the fresh token is for another user or tenant",
                )),
                Err(body) => Some(error_body(None, body)),
            }
        }
        ClientFrame::Subscribe { id, query, args } => engine
            .subscribe(caller, &id, &query, &args, None)
            .await
            .err()
            .map(|e| error_body(Some(id), e)),
        ClientFrame::Resume {
            cursor,
            subscriptions,
        } => {
            for s in subscriptions {
                if let Err(e) = engine
                    .subscribe(caller, &s.id, &s.query, &s.args, Some(&cursor))
                    .await
                {
                    engine
                        .hub
                        .lock()
                        .expect("hub lock")
                        .deliver(caller.session, error_body(Some(s.id), e));
                }
            }
            None
        }
        ClientFrame::Unsubscribe { id } => engine
            .unsubscribe(caller, &id)
            .err()
            .map(|e| error_body(Some(id), e)),
        ClientFrame::Heartbeat { resource, state } => engine
            .heartbeat(caller, &resource, state)
            .err()
            .map(|e| error_body(None, e)),
        ClientFrame::Mutate {
            id,
            name,
            args,
            idempotency_key,
        } => Some(
            match engine
                .mutate(caller, &name, &args, idempotency_key.as_deref())
                .await
            {
                Ok(result) => ServerFrame::MutationResult { id, result },
                Err(e) => error_body(Some(id), e),
            },
        ),
        ClientFrame::Admin { id, request } => {
            match authorize(&caller.principal, Capability::Console, &Target::default()) {
                Decision::Allowed(_) => {
                    match crate::admin::answer(app, &caller.principal, identity.peer.as_deref(), request)
                        .await
                    {
                        Ok(response) => Some(ServerFrame::Admin {
                            id,
                            response: Box::new(response),
                        }),
                        Err(body) => Some(error_body(Some(id), body)),
                    }
                }
                Decision::Denied(reason) => Some(error(
                    Some(id),
                    ErrorCode::Forbidden,
                    format!("console requests: {}", reason.explain()),
                )),
            }
        }
    }
}
