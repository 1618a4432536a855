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
/// A session silent for this long gets a ping.
const PING_AFTER: Duration = Duration::from_secs(5);
/// A session silent for this long (ping unanswered) is dropped and reopened: a dead
/// TCP peer may otherwise never be noticed.
const DEAD_AFTER: Duration = Duration::from_secs(15);

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
            let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        "; the socket's group may open it (usermod -aG pulse $USER)"
                    }
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        "; is pulsed running? (--socket names another path)"
                    }
                    _ => "",
                };
                format!("cannot open {}: {e}{hint}", path.display())
            })?;
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
    let mut last_heard = tokio::time::Instant::now();
    let mut check = tokio::time::interval(PING_AFTER / 2);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            r = requests.recv() => {
                let Some((id, request)) = r else { return Ok(()) };
                send(&mut ws, &ClientFrame::Admin { id, request }).await?;
            }
            frame = next_frame(&mut ws) => {
                last_heard = tokio::time::Instant::now();
                let event = match frame? {
                    ServerFrame::Admin { id, response } => NetEvent::Response { id, response: *response },
                    ServerFrame::Error { id, error } => NetEvent::Error { id, error },
                    _ => continue,
                };
                events.send(Action::Net(event)).await.map_err(|_| "console closed".to_string())?;
            }
            _ = check.tick() => {
                let silent = last_heard.elapsed();
                if silent >= DEAD_AFTER {
                    return Err(format!("no answer from pulsed for {} s", silent.as_secs()));
                }
                if silent >= PING_AFTER {
                    nonce += 1;
                    send(&mut ws, &ClientFrame::Ping { nonce }).await?;
                }
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

#[cfg(test)]
mod tests {
    use pulse_shared::admin::{AdminResponse, StatusReport};

    use super::*;

    /// A stand-in for pulsed's admin socket: answers hello, then `status` requests.
    /// It is the far end of the wire only; the console side under test is real.
    async fn fake_pulsed(listener: tokio::net::UnixListener, sessions: usize) {
        for _ in 0..sessions {
            let (stream, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            let Some(Ok(Message::Text(hello))) = ws.next().await else {
                panic!("no hello")
            };
            assert!(hello.contains("\"type\":\"hello\""), "{hello}");
            let welcome = ServerFrame::Welcome {
                protocol: PROTOCOL_VERSION,
                server_version: "test".into(),
                session: "s".into(),
                roles: vec!["service".into()],
                realtime: true,
                sync_interval_ms: 1000,
            };
            ws.send(Message::Text(serde_json::to_string(&welcome).unwrap().into()))
                .await
                .unwrap();
            // Answer one request, then hang up.
            let Some(Ok(Message::Text(text))) = ws.next().await else {
                panic!("no request")
            };
            let ClientFrame::Admin { id, .. } = serde_json::from_str(&text).unwrap() else {
                panic!("{text}")
            };
            let answer = ServerFrame::Admin {
                id,
                response: Box::new(AdminResponse::Status(StatusReport {
                    version: "test".into(),
                    uptime_secs: 1,
                    components: vec![],
                })),
            };
            ws.send(Message::Text(serde_json::to_string(&answer).unwrap().into()))
                .await
                .unwrap();
            let _ = ws.close(None).await;
        }
    }

    async fn next(events: &mut mpsc::Receiver<Action>) -> NetEvent {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Action::Net(e))) => e,
            other => panic!("no network event: {other:?}"),
        }
    }

    #[tokio::test]
    async fn connects_answers_and_reconnects_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let (req_tx, req_rx) = mpsc::channel(8);
        let (ev_tx, mut events) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            Endpoint::Unix(path.clone()),
            None,
            req_rx,
            ev_tx,
            shutdown.clone(),
        ));

        // Nothing listens yet: it says so, and requests fail at once rather than hang.
        assert_eq!(next(&mut events).await, NetEvent::Connecting { attempt: 1 });
        let NetEvent::Disconnected { reason, .. } = next(&mut events).await else {
            panic!()
        };
        assert!(reason.contains("cannot open"), "{reason}");
        req_tx
            .send(("status#1".into(), AdminRequest::Status))
            .await
            .unwrap();
        assert!(matches!(
            next(&mut events).await,
            NetEvent::Error { id: Some(id), error } if id == "status#1" && error.code == ErrorCode::Unavailable
        ));

        // pulsed appears: connected, a request is answered; it hangs up; the task
        // reconnects and the second session works too.
        let server = tokio::spawn(fake_pulsed(tokio::net::UnixListener::bind(&path).unwrap(), 2));
        for round in 0..2 {
            loop {
                match next(&mut events).await {
                    NetEvent::Connected { roles, .. } => {
                        assert_eq!(roles, vec!["service".to_string()]);
                        break;
                    }
                    NetEvent::Connecting { .. } | NetEvent::Disconnected { .. } => {}
                    other => panic!("round {round}: {other:?}"),
                }
            }
            req_tx
                .send((format!("status#{}", round + 2), AdminRequest::Status))
                .await
                .unwrap();
            let NetEvent::Response { id, response } = next(&mut events).await else {
                panic!()
            };
            assert_eq!(id, format!("status#{}", round + 2));
            assert!(matches!(response, AdminResponse::Status(_)));
            let NetEvent::Disconnected { reason, .. } = next(&mut events).await else {
                panic!()
            };
            assert!(reason.contains("closed"), "{reason}");
        }
        server.await.unwrap();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
