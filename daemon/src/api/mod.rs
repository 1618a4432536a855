//! The network edge: HTTP routes, the WebSocket session, the admin socket and the
//! metrics listener. Only this module (and `pulse_shared`) knows the wire format;
//! handlers convert daemon types to protocol frames here.

pub mod files;
pub mod limits;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Query, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use pulse_shared::{ErrorBody, ErrorCode};
use serde_json::json;

use crate::App;
use session::Transport;

/// An error as every HTTP route answers it: the status of its code and the JSON body of
/// the shared error table.
#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(ErrorBody::new(code, message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// The browser-facing router: health, readiness and the WebSocket.
pub fn http_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/ws", get(ws_http))
        .route("/v1/poll", get(poll))
        .with_state(app.clone())
        .merge(files::files_router(app))
}

/// The admin socket router: the same WebSocket protocol, trusted by the socket's mode.
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/ws", get(ws_admin))
        .route("/healthz", get(healthz))
        .with_state(app)
}

/// The metrics router, on its own listener.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(app)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "alive" }))
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    app.check_state_db().await;
    let ready = app.health.ready();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "components": app.health.snapshot().iter().map(|c| json!({
            "name": c.name, "state": c.state, "detail": c.detail,
        })).collect::<Vec<_>>(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn ws_http(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let guard = match app.limits.connect(peer.ip()) {
        Ok(g) => g,
        Err(limits::Refused::Full(n)) => {
            metrics::counter!("pulse_errors_total", "code" => "unavailable").increment(1);
            return ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "the server holds its maximum of {n} connections; retry later or use another instance"
                ),
            )
            .into_response();
        }
        Err(limits::Refused::PerIp(n)) => {
            return rate_limited(
                std::time::Duration::from_secs(1),
                format!("at most {n} connections from one address"),
            );
        }
    };
    // Small buffers: an idle connection must cost little memory (tungstenite's 128 KiB
    // default would dominate); client frames are small, so cap them too.
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .on_upgrade(move |socket| session::run(socket, app, Transport::Http, guard))
}

/// Who is at the other end of an admin socket connection, from the kernel
/// (SO_PEERCRED): the console's audit records name this user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminPeer {
    /// The peer process's user id, when the kernel reported it.
    pub uid: Option<u32>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>>
    for AdminPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        AdminPeer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

async fn ws_admin(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<AdminPeer>,
    ws: WebSocketUpgrade,
) -> Response {
    let uid = peer.uid;
    ws.on_upgrade(move |socket| session::run(socket, app, Transport::AdminSocket { uid }, ()))
}

/// A 429 with Retry-After (whole seconds, at least 1) and the delay in the details.
fn rate_limited(wait: std::time::Duration, what: String) -> Response {
    metrics::counter!("pulse_errors_total", "code" => "rate_limited").increment(1);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let body = ErrorBody::new(ErrorCode::RateLimited, format!("{what}; retry in {secs} s"))
        .with_details(json!({ "retry_after_ms": wait.as_millis() as u64 }));
    let mut r = ApiError(body).into_response();
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(secs),
    );
    r
}

/// Query string of the polling route.
#[derive(Debug, serde::Deserialize)]
struct PollParams {
    /// What to read (as in `subscribe`).
    query: String,
    /// Its arguments, as JSON.
    #[serde(default)]
    args: Option<String>,
    /// The cursor of the previous answer.
    #[serde(default)]
    cursor: Option<String>,
}

/// The polling fallback: `GET /v1/poll?query=…&args={…}&cursor=…` with
/// `Authorization: Bearer <JWT>` (or `X-Pulse-Deploy-Key`). The answer carries the platform
/// settings, so turning Real-time off or changing the Sync Interval takes effect at the
/// next poll.
async fn poll(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<PollParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(wait) = app.limits.http(peer.ip()) {
        return rate_limited(wait, "too many requests from this address".into());
    }
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => {
            return ApiError(
                ErrorBody::new(ErrorCode::InvalidArgument, format!("query string: {e}"))
                    .with_details(json!({ "field": "query" })),
            )
            .into_response();
        }
    };
    let principal = match http_principal(&app, &headers) {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    let args: serde_json::Value = match params.args.as_deref() {
        None | Some("") => serde_json::Value::Null,
        Some(text) => match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                return ApiError(
                    ErrorBody::new(ErrorCode::InvalidArgument, format!("args must be JSON: {e}"))
                        .with_details(json!({ "field": "args" })),
                )
                .into_response();
            }
        },
    };
    let started = std::time::Instant::now();
    let answer = app
        .engine
        .poll(&principal, &params.query, &args, params.cursor.as_deref())
        .await;
    metrics::histogram!("pulse_query_latency_seconds").record(started.elapsed().as_secs_f64());
    crate::admin::record_function("query", answer.as_ref().err());
    match answer {
        Ok(mut body) => {
            let settings = app.platform();
            body["realtime"] = json!(settings.enable_realtime);
            body["sync_interval_ms"] = json!(settings.sync_interval_ms);
            axum::Json(body).into_response()
        }
        Err(e) => {
            metrics::counter!("pulse_errors_total", "code" => e.code.as_str()).increment(1);
            ApiError(e).into_response()
        }
    }
}

/// Authenticates an HTTP request: a bearer JWT or the deploy key header.
fn http_principal(app: &App, headers: &HeaderMap) -> Result<pulse_shared::Principal, ErrorBody> {
    if let Some(key) = headers.get("x-pulse-deploy-key") {
        return match key.to_str() {
            Ok(k) if app.deploy_key_matches(k) => Ok(pulse_shared::Principal {
                user: None,
                tenant: None,
                roles: vec![pulse_shared::Role::Service],
            }),
            _ => Err(ErrorBody::new(
                ErrorCode::Unauthenticated,
                "the deploy key is wrong",
            )),
        };
    }
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::Unauthenticated,
                "send Authorization: Bearer <JWT> (or X-Pulse-Deploy-Key for services)",
            )
        })?;
    app.auth
        .verify(token, &app.engine.schema)
        .map(|v| v.principal)
        .map_err(|e| ErrorBody::new(ErrorCode::Unauthenticated, e.to_string()))
}
