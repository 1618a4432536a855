//! Connections to the state database (the `pulse` schema).

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::config::DbUrl;

/// A pool over the state database.
pub fn pool(url: &DbUrl, size: usize) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager = Manager::from_config(
        url.config().clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(size).build()
}

/// One plain connection (for migrations, which hold an advisory lock for their session).
pub async fn connect(url: &DbUrl) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = url.config().connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}
