//! The network task: one WebSocket session to pulsed at a time, reopened by itself.
//!
//! It owns the socket and nothing else. Requests come in on a bounded channel; answers,
//! errors and connection changes go out as [`NetEvent`]s. The UI never waits on it: if
//! pulsed is slow or gone, the UI keeps drawing and the status bar says so.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pulse_shared::admin::AdminRequest;
use pulse_shared::protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame};
use pulse_shared::{ErrorBody, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::endpoint::Endpoint;
use crate::state::{Action, NetEvent};

/// A request for pulsed, with its id.
pub type Outgoing = (String, AdminRequest);

/// How long `hello` may take to be answered.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until `shutdown` is cancelled or the UI is gone.
pub async fn run(
    endpoint: Endpoint,
    deploy_key: Option<String>,
    mut requests: mpsc::Receiver<Outgoing>,
    events: mpsc::Sender<Action>,
    shutdown: CancellationToken,
) {
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if events
            .send(Action::Net(NetEvent::Connecting { attempt }))
            .await
            .is_err()
        {
            return;
        }
        let outcome = tokio::select! {
            r = session(&endpoint, deploy_key.as_deref(), &mut requests, &events, &mut attempt) => r,
            _ = shutdown.cancelled() => return,
        };
        let reason = match outcome {
            Ok(()) => "pulsed closed the session".to_string(),
            Err(e) => e,
        };
        tracing::info!(%reason, attempt, "disconnected from pulsed");
        let backoff = (Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(6))).min(MAX_BACKOFF);
        if events
            .send(Action::Net(NetEvent::Disconnected {
                reason,
                retry_in_secs: backoff.as_secs_f64().ceil() as u64,
            }))
            .await
            .is_err()
        {
            return;
        }
        // While waiting, answer requests at once so the UI does not wait for them.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = shutdown.cancelled() => return,
                r = requests.recv() => match r {
                    Some((id, _)) => {
                        let _ = events.send(Action::Net(NetEvent::Error {
                            id: Some(id),
                            error: ErrorBody::new(ErrorCode::Unavailable, "not connected to pulsed"),
                        })).await;
                    }
                    None => return,
                },
            }
        }
    }
}

/// One session: connect, hello, then requests and answers until it ends. `attempt` is
/// reset once the session is open.
async fn session(
    endpoint: &Endpoint,
    deploy_key: Option<&str>,
    requests: &mut mpsc::Receiver<Outgoing>,
    events: &mpsc::Sender<Action>,
    attempt: &mut u32,
) -> Result<(), String> {
    match endpoint {
        Endpoint::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let (ws, _) = tokio_tungstenite::client_async("ws://localhost/ws", stream)
                .await
                .map_err(|e| format!("WebSocket handshake failed: {e}"))?;
            serve(ws, None, requests, events, attempt).await
        }
        Endpoint::Tcp { authority, url } => {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
            let (ws, _) = tokio_tungstenite::client_async(url.as_str(), stream)
                .await
                .map_err(|e| format!("WebSocket handshake failed: {e}"))?;
            serve(ws, deploy_key, requests, events, attempt).await
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocketStream<S>,
    deploy_key: Option<&str>,
    requests: &mut mpsc::Receiver<Outgoing>,
    events: &mpsc::Sender<Action>,
    attempt: &mut u32,
) -> Result<(), String> {
    let hello = ClientFrame::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        deploy_key: deploy_key.map(str::to_string),
    };
    send(&mut ws, &hello).await?;
    let welcome = tokio::time::timeout(HELLO_TIMEOUT, next_frame(&mut ws))
        .await
        .map_err(|_| "no answer to hello within 5 s".to_string())??;
    match welcome {
        ServerFrame::Welcome {
            server_version,
            roles,
            ..
        } => {
            *attempt = 0;
            tracing::info!(%server_version, ?roles, "connected to pulsed");
            events
                .send(Action::Net(NetEvent::Connected {
                    server_version,
                    roles,
                }))
                .await
                .map_err(|_| "console closed".to_string())?;
        }
        ServerFrame::Error { error, .. } => {
            return Err(format!("refused: {} ({})", error.message, error.code));
        }
        other => return Err(format!("unexpected answer to hello: {other:?}")),
    }
    loop {
        tokio::select! {
            r = requests.recv() => {
                let Some((id, request)) = r else { return Ok(()) };
                send(&mut ws, &ClientFrame::Admin { id, request }).await?;
            }
            frame = next_frame(&mut ws) => {
                let event = match frame? {
                    ServerFrame::Admin { id, response } => NetEvent::Response { id, response: *response },
                    ServerFrame::Error { id, error } => NetEvent::Error { id, error },
                    _ => continue,
                };
                events.send(Action::Net(event)).await.map_err(|_| "console closed".to_string())?;
            }
        }
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    frame: &ClientFrame,
) -> Result<(), String> {
    let text = serde_json::to_string(frame).map_err(|e| e.to_string())?;
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| format!("send failed: {e}"))
}

async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Result<ServerFrame, String> {
    loop {
        match ws.next().await {
            None => return Err("pulsed closed the connection".into()),
            Some(Err(e)) => return Err(format!("connection lost: {e}")),
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).map_err(|e| format!("unreadable frame from pulsed: {e}"));
            }
            Some(Ok(Message::Close(_))) => return Err("pulsed closed the connection".into()),
            Some(Ok(_)) => {}
        }
    }
}
