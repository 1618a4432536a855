//! Notifications in `pulse.notifications`: create, inbox, unread count, mark read,
//! retention. Pure storage: who may do what is decided by the caller through
//! `pulse_shared::caps::authorize`, and delivery to sessions is the hub's.

use serde_json::{Value as Json, json};
use tokio_postgres::GenericClient;

/// A stored notification.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Id.
    pub id: i64,
    /// Tenant.
    pub tenant: String,
    /// Recipient.
    pub user: String,
    /// Its wire form.
    pub row: Json,
}

/// What a new notification holds.
#[derive(Debug, Clone)]
pub struct NewNotification<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// Recipient.
    pub user: &'a str,
    /// Title.
    pub title: &'a str,
    /// Body.
    pub body: &'a str,
    /// Extra data.
    pub data: &'a Json,
    /// Idempotency key (stream position), if any.
    pub source_key: Option<&'a str>,
    /// Who created it (user id, `service`, or `stream`).
    pub created_by: &'a str,
}

const COLUMNS: &str = "id, tenant, user_id, title, body, data, created_at, read_at";

fn to_row(r: &tokio_postgres::Row) -> Notification {
    let created: chrono::DateTime<chrono::Utc> = r.get(6);
    let read: Option<chrono::DateTime<chrono::Utc>> = r.get(7);
    let id: i64 = r.get(0);
    Notification {
        id,
        tenant: r.get(1),
        user: r.get(2),
        row: json!({
            "id": id,
            "title": r.get::<_, String>(3),
            "body": r.get::<_, String>(4),
            "data": r.get::<_, Json>(5),
            "created_at": created.to_rfc3339(),
            "read": read.is_some(),
        }),
    }
}

/// Inserts a notification; `None` when its source key was already used (a replay).
pub async fn create<C: GenericClient>(
    db: &C,
    n: &NewNotification<'_>,
) -> Result<Option<Notification>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            &format!(
                "INSERT INTO pulse.notifications (tenant, user_id, title, body, data, source_key, created_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (source_key) DO NOTHING RETURNING {COLUMNS}"
            ),
            &[&n.tenant, &n.user, &n.title, &n.body, n.data, &n.source_key, &n.created_by],
        )
        .await?;
    Ok(row.as_ref().map(to_row))
}

/// The newest notifications of a user.
pub async fn inbox<C: GenericClient>(
    db: &C,
    tenant: &str,
    user: &str,
    limit: i64,
) -> Result<Vec<Json>, tokio_postgres::Error> {
    let rows = db
        .query(
            &format!("SELECT {COLUMNS} FROM pulse.notifications WHERE tenant = $1 AND user_id = $2 ORDER BY id DESC LIMIT $3"),
            &[&tenant, &user, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| to_row(r).row).collect())
}

/// Unread notifications of a user.
pub async fn unread<C: GenericClient>(
    db: &C,
    tenant: &str,
    user: &str,
) -> Result<i64, tokio_postgres::Error> {
    db.query_one(
        "SELECT count(*) FROM pulse.notifications WHERE tenant = $1 AND user_id = $2 AND read_at IS NULL",
        &[&tenant, &user],
    )
    .await
    .map(|r| r.get(0))
}

/// Marks some of a user's notifications read (others' ids are ignored); returns the ids
/// that were unread.
pub async fn mark_read<C: GenericClient>(
    db: &C,
    tenant: &str,
    user: &str,
    ids: &[i64],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = db
        .query(
            "UPDATE pulse.notifications SET read_at = now() WHERE tenant = $1 AND user_id = $2 AND id = ANY($3) AND read_at IS NULL RETURNING id",
            &[&tenant, &user, &ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Marks all of a user's notifications read; returns the ids that were unread.
pub async fn mark_all_read<C: GenericClient>(
    db: &C,
    tenant: &str,
    user: &str,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = db
        .query(
            "UPDATE pulse.notifications SET read_at = now() WHERE tenant = $1 AND user_id = $2 AND read_at IS NULL RETURNING id",
            &[&tenant, &user],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every notification of a user, oldest first (GDPR export).
pub async fn all_of<C: GenericClient>(
    db: &C,
    tenant: &str,
    user: &str,
) -> Result<Vec<Json>, tokio_postgres::Error> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM pulse.notifications WHERE tenant = $1 AND user_id = $2 ORDER BY id"
            ),
            &[&tenant, &user],
        )
        .await?;
    Ok(rows.iter().map(|r| to_row(r).row).collect())
}

/// Deletes every notification of a user (GDPR erasure); returns how many.
pub async fn erase<C: GenericClient>(db: &C, tenant: &str, user: &str) -> Result<u64, tokio_postgres::Error> {
    db.execute(
        "DELETE FROM pulse.notifications WHERE tenant = $1 AND user_id = $2",
        &[&tenant, &user],
    )
    .await
}

/// Loads notifications by id (to publish those a command created, after its commit).
pub async fn by_ids<C: GenericClient>(
    db: &C,
    ids: &[i64],
) -> Result<Vec<Notification>, tokio_postgres::Error> {
    let rows = db
        .query(
            &format!("SELECT {COLUMNS} FROM pulse.notifications WHERE id = ANY($1) ORDER BY id"),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(to_row).collect())
}

/// Deletes notifications older than the retention.
pub async fn expire<C: GenericClient>(db: &C, days: u32) -> Result<u64, tokio_postgres::Error> {
    db.execute(
        "DELETE FROM pulse.notifications WHERE created_at < now() - make_interval(days => $1)",
        &[&(days as i32)],
    )
    .await
}
