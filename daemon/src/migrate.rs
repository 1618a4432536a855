//! Migrations of the `pulse` schema.
//!
//! Plain SQL files from `migrations/`, embedded at build time, applied in version order
//! under a PostgreSQL advisory lock (so two `pulsed migrate` at once are safe), each in
//! its own transaction, recorded in `pulse.schema_migrations` with a SHA-256 checksum.
//! An applied migration whose file changed stops the start: the database and the code
//! disagree and a person must decide. This module never touches Doctrine's tables.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Advisory lock key: "pulse" spelled in hex digits, so it will not collide with
/// Doctrine's or anybody's small integers.
const LOCK_KEY: i64 = 0x7075_6c73_655f_6d67;

/// A migration problem.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database refused or failed.
    #[error("migration database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// An applied migration's file was edited since.
    #[error(
        "migration {version} ({name}) was applied with checksum {applied} but the file embedded in this pulsed has {embedded}; \
         migrations must never change once applied: restore the file or add a new migration"
    )]
    ChecksumMismatch {
        /// Version.
        version: i32,
        /// Name.
        name: String,
        /// Checksum recorded in the database.
        applied: String,
        /// Checksum of the embedded file.
        embedded: String,
    },
    /// The database has a migration this binary does not know: it is older than the schema.
    #[error(
        "the pulse schema has migration {version} ({name}) that this pulsed does not know; \
         it is older than the database: upgrade pulsed"
    )]
    Unknown {
        /// Version.
        version: i32,
        /// Name.
        name: String,
    },
    /// A migration's SQL failed.
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        /// Version.
        version: i32,
        /// Name.
        name: String,
        /// The error.
        source: tokio_postgres::Error,
    },
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Versions applied by this run.
    pub applied: Vec<i32>,
    /// The latest version now in the database.
    pub current: i32,
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// The newest version embedded in this binary.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Applies what is missing. Holds the advisory lock for the whole run.
pub async fn migrate(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = migrate_locked(client).await;
    // Unlock even after a failure; if the connection is gone, the lock went with it.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    result
}

async fn migrate_locked(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pulse;
             CREATE TABLE IF NOT EXISTS pulse.schema_migrations (
                 version     integer PRIMARY KEY,
                 name        text NOT NULL,
                 checksum    text NOT NULL,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    let rows = client
        .query(
            "SELECT version, name, checksum FROM pulse.schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let mut applied_versions = Vec::new();
    for row in &rows {
        let (version, name, recorded): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
        match MIGRATIONS.iter().find(|m| m.0 == version) {
            None => return Err(MigrateError::Unknown { version, name }),
            Some((_, _, sql)) => {
                let embedded = checksum(sql);
                if embedded != recorded {
                    return Err(MigrateError::ChecksumMismatch {
                        version,
                        name,
                        applied: recorded,
                        embedded,
                    });
                }
            }
        }
        applied_versions.push(version);
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied_versions.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .map_err(|source| MigrateError::Failed {
                version: *version,
                name: name.to_string(),
                source,
            })?;
        tx.execute(
            "INSERT INTO pulse.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &checksum(sql)],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        applied.push(*version);
    }
    Ok(MigrateReport {
        applied,
        current: latest_version(),
    })
}

/// Whether the schema is at this binary's latest version (for `/readyz`).
pub async fn is_current(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt("SELECT max(version) FROM pulse.schema_migrations", &[])
        .await;
    match row {
        Ok(Some(row)) => Ok(row.get::<_, Option<i32>>(0) == Some(latest_version())),
        Ok(None) => Ok(false),
        // The table does not exist yet.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_embedded_in_order() {
        assert!(!MIGRATIONS.is_empty());
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(MIGRATIONS[0].0, 1);
    }

    #[test]
    fn checksums_are_stable_sha256() {
        assert_eq!(
            checksum(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
