//! One WebSocket session: `hello`, then requests until either side closes.
//!
//! Reading and writing are separate: frames to the client go through a bounded queue to
//! a writer task, so a client that stops reading fills its own queue and is cut loose,
//! and never blocks whoever produces its frames.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use pulse_shared::caps::{Capability, Decision, Principal, Role, Target, authorize};
use pulse_shared::protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame, parse_client_frame};
use pulse_shared::{ErrorBody, ErrorCode};
use tokio::sync::mpsc;

use crate::App;

/// How the client reached us, which decides how `hello` authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The public HTTP listener: JWT or deploy key.
    Http,
    /// The admin Unix socket: the socket's file mode already authenticated the peer.
    AdminSocket,
}

/// Frames queued for one client before it is considered too slow and cut loose.
const OUTBOX_FRAMES: usize = 1024;
/// How long a client has to send `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one session to its end.
pub async fn run(socket: WebSocket, app: Arc<App>, transport: Transport) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<ServerFrame>(OUTBOX_FRAMES);
    let shutdown = app.shutdown.clone();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let text = serde_json::to_string(&frame).expect("server frames serialize");
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    metrics::gauge!("pulse_connections_active").increment(1.0);

    let principal = tokio::select! {
        p = hello(&mut stream, &tx, &app, transport) => p,
        _ = shutdown.cancelled() => None,
    };
    if let Some(principal) = principal {
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = shutdown.cancelled() => break,
            };
            let Some(Ok(msg)) = msg else { break };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => break,
                Message::Binary(_) => {
                    let _ = send(
                        &tx,
                        error(
                            None,
                            ErrorCode::InvalidArgument,
                            "binary frames are not part of the protocol; send JSON text frames",
                        ),
                    );
                    continue;
                }
                _ => continue,
            };
            match parse_client_frame(&text) {
                Err(body) => {
                    metrics::counter!("pulse_errors_total", "code" => body.code.as_str()).increment(1);
                    if !send(
                        &tx,
                        ServerFrame::Error {
                            id: None,
                            error: body,
                        },
                    ) {
                        break;
                    }
                }
                Ok(frame) => {
                    if let Some(reply) = handle(frame, &principal, &app).await
                        && !send(&tx, reply)
                    {
                        break;
                    }
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
    metrics::gauge!("pulse_connections_active").decrement(1.0);
}

/// Queues a frame; false when the client is gone or too slow (then the session ends).
fn send(tx: &mpsc::Sender<ServerFrame>, frame: ServerFrame) -> bool {
    match tx.try_send(frame) {
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

async fn hello(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    tx: &mpsc::Sender<ServerFrame>,
    app: &App,
    transport: Transport,
) -> Option<Principal> {
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
            send(
                tx,
                ServerFrame::Error {
                    id: None,
                    error: body,
                },
            );
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
    let principal = match (transport, token, deploy_key) {
        (Transport::AdminSocket, _, _) => Principal {
            user: None,
            tenant: None,
            roles: vec![Role::Service],
        },
        (Transport::Http, _, Some(key)) => {
            if app.deploy_key_matches(&key) {
                Principal {
                    user: None,
                    tenant: None,
                    roles: vec![Role::Service],
                }
            } else {
                send(
                    tx,
                    error(None, ErrorCode::Unauthenticated, "the deploy key is wrong"),
                );
                return None;
            }
        }
        (Transport::Http, Some(_token), None) => {
            send(
                tx,
                error(
                    None,
                    ErrorCode::Unauthenticated,
                    "token authentication is not configured on this server",
                ),
            );
            return None;
        }
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
        roles: principal.roles.iter().map(|r| r.as_str().to_string()).collect(),
        realtime: settings.enable_realtime,
        sync_interval_ms: settings.sync_interval_ms,
    };
    send(tx, welcome).then_some(principal)
}

async fn handle(frame: ClientFrame, principal: &Principal, app: &App) -> Option<ServerFrame> {
    match frame {
        ClientFrame::Hello { .. } => Some(error(None, ErrorCode::InvalidArgument, "hello was already sent")),
        ClientFrame::Ping { nonce } => Some(ServerFrame::Pong { nonce }),
        ClientFrame::Token { .. } => Some(error(
            None,
            ErrorCode::Unauthenticated,
            "token authentication is not configured on this server",
        )),
        ClientFrame::Admin { id, request } => {
            match authorize(principal, Capability::Console, &Target::default()) {
                Decision::Allowed(_) => match crate::admin::answer(app, principal, request).await {
                    Ok(response) => Some(ServerFrame::Admin {
                        id,
                        response: Box::new(response),
                    }),
                    Err(body) => {
                        metrics::counter!("pulse_errors_total", "code" => body.code.as_str()).increment(1);
                        Some(ServerFrame::Error {
                            id: Some(id),
                            error: body,
                        })
                    }
                },
                Decision::Denied(reason) => Some(error(
                    Some(id),
                    ErrorCode::Forbidden,
                    format!("console requests: {}", reason.explain()),
                )),
            }
        }
    }
}
