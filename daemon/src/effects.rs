//! The commands from Symfony that need the realtime engine and file storage: send a
//! notification (to a user, or to every user of a tenant or a role, read from Symfony's
//! user table as the schema file's `[users]` declares it), end a user's presence, erase or
//! export a user's realtime data. Settings changes are delegated to [`CoreEffects`].
//!
//! Every database write (notifications, export rows, outbox events) happens in the
//! command's transaction, so it commits together with the command's record and the
//! delivery is acknowledged only after. What lives outside that transaction (presence in
//! memory, file deletions, which commit one file at a time) is safe to repeat, because a
//! crash before the commit redelivers the command. This module never decides permissions
//! (the command consumer checks them) and never publishes to clients before the commit.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio_postgres::Transaction;

use crate::commands::{
    Applied, ChangeSetting, Command, CommandEffects, CoreEffects, EffectError, EndPresence, SendNotification,
    UserData,
};
use crate::engine::{events, notifications};
use crate::outbox::{self, OutboxEvent};

/// The daemon's command effects: engine, files, and the core (settings).
pub struct AppEffects {
    /// Settings changes.
    pub core: CoreEffects,
    /// The running daemon (engine, file storage, configuration).
    pub app: Arc<crate::App>,
}

fn transient(e: impl std::fmt::Display) -> EffectError {
    EffectError::Transient(format!("state database: {e}"))
}

impl AppEffects {
    /// Ends the user's tabs on this instance now, and on the others when `tx` commits;
    /// how many ended here.
    async fn end_presence_everywhere(
        &self,
        tx: &Transaction<'_>,
        tenant: &str,
        user: &str,
    ) -> Result<usize, EffectError> {
        crate::instances::end_presence_everywhere(tx, tenant, user)
            .await
            .map_err(transient)?;
        Ok(self.app.engine.end_presence(tenant, user))
    }
}

impl CommandEffects for AppEffects {
    fn send_notification<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        c: &'a SendNotification,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async move {
            let tenant = &c.tenant_id.0;
            // One user, or every user of the tenant (of a role) from Symfony's user table.
            let (recipients, fan_out) = match &c.user_id {
                Some(user) => (vec![user.0.clone()], false),
                None => {
                    let schema = &self.app.engine.schema;
                    let Some(users) = &schema.users else {
                        return Err(EffectError::Refused(
                            "SendNotification to a whole tenant or a role needs Symfony's user table: declare [users] (source, id_column, tenant_column, roles_column) in the schema file, or send userId".into(),
                        ));
                    };
                    let role = c.role.as_deref().and_then(pulse_shared::Role::parse);
                    let source = self
                        .app
                        .engine
                        .source_pool()
                        .get()
                        .await
                        .map_err(|e| EffectError::Transient(format!("source database: {e}")))?;
                    let ids = crate::users::recipients(&**source, schema, users, tenant, role)
                        .await
                        .map_err(|e| EffectError::Transient(format!("source database: {e}")))?;
                    (ids, true)
                }
            };
            let data = c.data.clone().unwrap_or_else(|| json!({}));
            let mut ids = Vec::with_capacity(recipients.len());
            for user in &recipients {
                // The command id (and the user, when fanned out) is the source key: a
                // redelivery after a lost commit creates the same notifications again,
                // never second ones.
                let key = if fan_out {
                    format!("cmd:{}:{user}", c.command_id)
                } else {
                    format!("cmd:{}", c.command_id)
                };
                let created = notifications::create(
                    tx,
                    &notifications::NewNotification {
                        tenant,
                        user,
                        title: c.title.trim(),
                        body: &c.body,
                        data: &data,
                        source_key: Some(&key),
                        created_by: "symfony",
                    },
                )
                .await
                .map_err(transient)?;
                if let Some(n) = created {
                    events::notification_created(tx, &n).await.map_err(transient)?;
                    ids.push(n.id);
                }
            }
            Ok(Applied {
                detail: json!({ "notifications": ids, "recipients": recipients.len() }),
            })
        })
    }

    fn end_presence<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        c: &'a EndPresence,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async move {
            let tabs = self
                .end_presence_everywhere(tx, &c.tenant_id.0, &c.user_id.0)
                .await?;
            Ok(Applied {
                detail: json!({ "sessions": tabs }),
            })
        })
    }

    fn erase_user_data<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        c: &'a UserData,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async move {
            let (tenant, user) = (&c.tenant_id.0, &c.user_id.0);
            let tabs = self.end_presence_everywhere(tx, tenant, user).await?;
            let config = self.app.config();
            let files =
                crate::files::erase_user_files(&crate::files::Ctx::new(&self.app, &config), tenant, user)
                    .await
                    .map_err(|e| EffectError::Transient(format!("file storage: {e}")))?;
            let notifications = notifications::erase(tx, tenant, user).await.map_err(transient)?;
            let exports = tx
                .execute(
                    "DELETE FROM pulse.data_exports WHERE tenant = $1 AND user_id = $2",
                    &[tenant, user],
                )
                .await
                .map_err(transient)?;
            tracing::info!(%tenant, %user, notifications, files, exports, "user data erased");
            Ok(Applied {
                detail: json!({ "notifications": notifications, "files": files, "exports": exports, "sessions": tabs }),
            })
        })
    }

    fn export_user_data<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        c: &'a UserData,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async move {
            let (tenant, user) = (&c.tenant_id.0, &c.user_id.0);
            let notes = notifications::all_of(tx, tenant, user).await.map_err(transient)?;
            let files: Vec<Value> = tx
                .query(
                    "SELECT id::text, name, content_type, size, public,
                            to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                       FROM pulse.files WHERE tenant = $1 AND owner = $2 ORDER BY created_at",
                    &[tenant, user],
                )
                .await
                .map_err(transient)?
                .iter()
                .map(|r| {
                    json!({
                        "id": r.get::<_, String>(0), "name": r.get::<_, String>(1),
                        "contentType": r.get::<_, String>(2), "size": r.get::<_, i64>(3),
                        "public": r.get::<_, bool>(4), "createdAt": r.get::<_, String>(5),
                    })
                })
                .collect();
            let presence: Vec<Value> = self
                .app
                .engine
                .hub
                .lock()
                .expect("hub lock")
                .online(Some(tenant), None)["online"]
                .as_array()
                .map(|a| a.iter().filter(|p| p["user"] == json!(user)).cloned().collect())
                .unwrap_or_default();
            let data = json!({
                "tenantId": tenant,
                "userId": user,
                "exportedAt": chrono::Utc::now().to_rfc3339(),
                "notifications": notes,
                "files": files,
                "presence": presence,
            });
            let row = tx
                .query_one(
                    "INSERT INTO pulse.data_exports (command_id, tenant, user_id, data) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (command_id) DO UPDATE SET data = EXCLUDED.data
                     RETURNING id::text, octet_length(data::text)",
                    &[&c.command_id, tenant, user, &data],
                )
                .await
                .map_err(transient)?;
            let export_id: String = row.get(0);
            let size: i32 = row.get(1);
            let event = OutboxEvent {
                event: "data_export.ready",
                message_id: outbox::message_id_from_command(&c.command_id, 0),
                aggregate: events::aggregate(tenant, user),
                payload: json!({
                    "exportId": export_id,
                    "commandId": c.command_id,
                    "tenantId": tenant,
                    "userId": user,
                    "bytes": size,
                    "notifications": notes.len(),
                    "files": files.len(),
                }),
            };
            outbox::write(tx, &event).await.map_err(transient)?;
            Ok(Applied {
                detail: json!({ "export": export_id, "bytes": size }),
            })
        })
    }

    fn change_setting<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        c: &'a ChangeSetting,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        self.core.change_setting(tx, c)
    }

    fn committed<'a>(&'a self, command: &'a Command, applied: &'a Applied) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Command::SendNotification(_) = command {
                let ids: Vec<i64> = applied.detail["notifications"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_i64).collect())
                    .unwrap_or_default();
                if let Err(e) = self.app.engine.publish_created(&ids).await {
                    tracing::warn!(error = %e, "a command's notification was stored but not pushed to sessions");
                }
            }
        })
    }
}
