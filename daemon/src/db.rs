//! Connections to the state database (the `pulse` schema) and the source database, with
//! TLS as their connection strings ask.

use crate::config::DbUrl;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

/// A pool over the state database.
pub fn pool(url: &DbUrl, size: usize) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager = Manager::from_config(
        url.config().clone(),
        url.connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(size).build()
}

/// One plain connection (for migrations, which hold an advisory lock for their session).
pub async fn connect(url: &DbUrl) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = url.config().connect(url.connector()).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

/// A failed connection in words: what TLS needs, or the server's message (tokio-postgres
/// shows only "db error" by itself).
pub fn explain(e: &tokio_postgres::Error, url: &DbUrl) -> String {
    if let Some(hint) = pulse_cdc::tls::tls_hint(e, url.tls()) {
        return hint;
    }
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// Runs `work` as a transaction of its own whose commit does not wait for the disk,
/// sending its `BEGIN` and `COMMIT` with it: one round trip in all, so the row locks it
/// takes are held only while the server runs it, never across a round trip to pulsed.
/// `work` must send every statement when first polled (prepared statements, not SQL
/// text, which would wait for a prepare first and let the `COMMIT` overtake it). All
/// three are always polled, so the `COMMIT` goes out whatever `work` does and the
/// connection never goes back to the pool inside a transaction. When a statement fails
/// on the server, that `COMMIT` rolls the transaction back; when `work` fails on its own
/// side (a row count it did not expect, a value it cannot decode), what the server did
/// is committed. For changes that need no durability of their own (each caller says
/// why).
pub async fn one_trip<T>(
    client: &tokio_postgres::Client,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    let (begun, out, committed) = futures_util::join!(
        client.batch_execute("BEGIN; SET LOCAL synchronous_commit TO off"),
        work,
        client.batch_execute("COMMIT"),
    );
    // The statement's own error says the most.
    let out = out?;
    begun?;
    committed?;
    Ok(out)
}
