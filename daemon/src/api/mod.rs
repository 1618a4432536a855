//! The network edge: HTTP routes, the WebSocket session, the admin socket and the
//! metrics listener. Only this module (and `pulse_shared`) knows the wire format;
//! handlers convert daemon types to protocol frames here.

pub mod files;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
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

async fn ws_http(State(app): State<Arc<App>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| session::run(socket, app, Transport::Http))
}

async fn ws_admin(State(app): State<Arc<App>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| session::run(socket, app, Transport::AdminSocket))
}
