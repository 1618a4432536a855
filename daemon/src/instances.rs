//! What every pulsed instance of one state database must hear about: a user's presence
//! ended by a command (`EndPresence`, `EraseUserData`). Presence lives in the memory of
//! the instance that holds the user's WebSocket sessions, and a command is carried out by
//! whichever instance took it from the queue, so the effect is announced with PostgreSQL
//! `NOTIFY` in the command's own transaction: it reaches every listening instance exactly
//! when the command commits, and never when it rolls back.
//!
//! This module never decides anything; it carries the notice and calls the engine.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_postgres::{AsyncMessage, GenericClient, NoTls};
use tokio_util::sync::CancellationToken;

use crate::config::DbUrl;
use crate::engine::Engine;

/// The NOTIFY channel of ended presence.
pub const PRESENCE_ENDED: &str = "pulse_presence_ended";

/// Announces, in the caller's transaction, that a user's presence ends on every instance.
pub async fn end_presence_everywhere<C: GenericClient>(
    tx: &C,
    tenant: &str,
    user: &str,
) -> Result<(), tokio_postgres::Error> {
    let notice = json!({ "tenant": tenant, "user": user }).to_string();
    tx.execute("SELECT pg_notify($1, $2)", &[&PRESENCE_ENDED, &notice])
        .await?;
    Ok(())
}

/// Listens for ended presence until `shutdown`, reconnecting after a failure, and ends
/// the user's tabs held by this instance.
pub async fn listen(engine: Arc<Engine>, url: DbUrl, shutdown: CancellationToken) {
    loop {
        let session = async {
            let (client, mut connection) = url.config().connect(NoTls).await?;
            let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
            let reader = tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(message)) = messages.next().await {
                    if let AsyncMessage::Notification(n) = message
                        && tx.send(n.payload().to_string()).is_err()
                    {
                        break;
                    }
                }
            });
            client.batch_execute(&format!("LISTEN {PRESENCE_ENDED}")).await?;
            while let Some(payload) = notices.recv().await {
                let v: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
                if let (Some(tenant), Some(user)) = (v["tenant"].as_str(), v["user"].as_str()) {
                    let tabs = engine.end_presence(tenant, user);
                    tracing::debug!(%tenant, %user, tabs, "presence ended by another instance's command");
                }
            }
            reader.abort();
            Ok::<(), tokio_postgres::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "presence notices: the state database session ended; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
