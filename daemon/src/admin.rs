//! Answers console requests. Reads the daemon's state; never changes it without an audit
//! record.

use pulse_shared::admin::{AdminRequest, AdminResponse, ConfigEntry, StatusReport};

use crate::App;

/// Answers one request.
pub async fn answer(app: &App, request: AdminRequest) -> AdminResponse {
    match request {
        AdminRequest::Status => AdminResponse::Status(StatusReport {
            version: crate::VERSION.to_string(),
            uptime_secs: app.started.elapsed().as_secs(),
            components: app.health.snapshot(),
        }),
        AdminRequest::Config => AdminResponse::Config {
            entries: app
                .config()
                .effective
                .iter()
                .map(|e| ConfigEntry {
                    key: e.key.to_string(),
                    value: e.shown.clone(),
                    source: e.origin.to_string(),
                })
                .collect(),
        },
    }
}
