//! Commands from Symfony: consumed from the configured queue, validated, carried out,
//! acknowledged only once their effect is durable.
//!
//! A command is a Symfony Messenger message sent through the AMQP transport with the JSON
//! serializer: the AMQP header `type` names the PHP class (its last segment is the command
//! kind), the content type is `application/json`, the body holds the message's
//! properties, among them `commandId`. Other headers (Messenger's `X-Message-Stamp-*`
//! stamps, anything else) are ignored.
//!
//! Each command is handled in one state-database transaction that takes a transaction
//! advisory lock on its id, checks `pulse.processed_commands`, applies the effect through
//! [`CommandEffects`], records the id, and commits; the delivery is acknowledged after
//! the commit. A redelivered command (crash before the ack, a second instance) therefore
//! finds its id and is acknowledged without a second effect. An invalid command, or one
//! this pulsed cannot carry out, is copied to the dead-letter queue with the reason in
//! the `x-pulse-reason` header and then acknowledged; a transient failure (database
//! down) is returned to the queue.
//!
//! This module never decides what an effect does (that is the [`CommandEffects`]
//! implementation) and never acknowledges before the commit.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use pulse_shared::caps::{self, Capability, Principal, Role, Target};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

/// The reason given for commands that need the realtime engine while it is not built in.
pub const NOT_SUPPORTED: &str = "not supported by this pulsed yet";

/// A user or tenant id: Symfony sends integers or strings; Pulse keeps text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(s) => s,
            Raw::Number(n) => n.to_string(),
        };
        if text.is_empty() || text.len() > 200 || text.chars().any(char::is_control) {
            return Err(serde::de::Error::custom(
                "an id must be 1 to 200 printable characters or a non-negative integer",
            ));
        }
        Ok(Id(text))
    }
}

/// Send a notification to one user, every user of a role in a tenant, or a whole tenant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendNotification {
    /// Idempotency key.
    pub command_id: String,
    /// The tenant.
    pub tenant_id: Id,
    /// One user; with `role` empty.
    #[serde(default)]
    pub user_id: Option<Id>,
    /// Every user with this role in the tenant; with `user_id` empty.
    #[serde(default)]
    pub role: Option<String>,
    /// Title, 1 to 200 characters.
    pub title: String,
    /// Body text, up to 10,000 characters.
    #[serde(default)]
    pub body: String,
    /// Free data for the client.
    #[serde(default)]
    pub data: Option<Value>,
}

/// End every presence session of a user.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndPresence {
    /// Idempotency key.
    pub command_id: String,
    /// The tenant.
    pub tenant_id: Id,
    /// The user.
    pub user_id: Id,
}

/// Erase a user's realtime data and files (GDPR), or export it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserData {
    /// Idempotency key.
    pub command_id: String,
    /// The tenant.
    pub tenant_id: Id,
    /// The user.
    pub user_id: Id,
}

/// Change a platform setting.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeSetting {
    /// Idempotency key.
    pub command_id: String,
    /// deployment_url, deploy_key, enable_realtime or sync_interval_ms.
    pub key: String,
    /// The new value: text, a boolean or a number.
    pub value: Value,
    /// Who asked, for the audit log (`symfony` when absent).
    #[serde(default)]
    pub actor: Option<String>,
}

/// A validated command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `SendNotification`.
    SendNotification(SendNotification),
    /// `EndPresence`.
    EndPresence(EndPresence),
    /// `EraseUserData`.
    EraseUserData(UserData),
    /// `ExportUserData`.
    ExportUserData(UserData),
    /// `ChangeSetting`.
    ChangeSetting(ChangeSetting),
}

/// The command kinds, as the last segment of their PHP class.
pub const KINDS: &[&str] = &[
    "SendNotification",
    "EndPresence",
    "EraseUserData",
    "ExportUserData",
    "ChangeSetting",
];

impl Command {
    /// The command's id.
    pub fn id(&self) -> &str {
        match self {
            Command::SendNotification(c) => &c.command_id,
            Command::EndPresence(c) => &c.command_id,
            Command::EraseUserData(c) | Command::ExportUserData(c) => &c.command_id,
            Command::ChangeSetting(c) => &c.command_id,
        }
    }

    /// The kind, as in [`KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Command::SendNotification(_) => "SendNotification",
            Command::EndPresence(_) => "EndPresence",
            Command::EraseUserData(_) => "EraseUserData",
            Command::ExportUserData(_) => "ExportUserData",
            Command::ChangeSetting(_) => "ChangeSetting",
        }
    }

    fn capability(&self) -> (Capability, Option<&str>) {
        match self {
            Command::SendNotification(c) => (Capability::SendNotifications, Some(c.tenant_id.0.as_str())),
            Command::EndPresence(c) => (Capability::SeePresence, Some(c.tenant_id.0.as_str())),
            Command::EraseUserData(c) => (Capability::EraseUserData, Some(c.tenant_id.0.as_str())),
            Command::ExportUserData(c) => (Capability::ExportUserData, Some(c.tenant_id.0.as_str())),
            Command::ChangeSetting(_) => (Capability::ManageSettings, None),
        }
    }
}

/// Why a message is not a valid command; the text goes into `x-pulse-reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Parses and validates one message: its `type` header, content type and body.
pub fn parse(type_header: Option<&str>, content_type: Option<&str>, body: &[u8]) -> Result<Command, Invalid> {
    let class = type_header.ok_or_else(|| {
        Invalid("no `type` header: send commands through Symfony Messenger's AMQP transport with the JSON serializer".into())
    })?;
    if let Some(ct) = content_type
        && !ct.eq_ignore_ascii_case("application/json")
        && !ct.to_ascii_lowercase().starts_with("application/json;")
    {
        return Err(Invalid(format!(
            "content type {ct:?} is not application/json: use messenger.transport.symfony_serializer"
        )));
    }
    let kind = class.rsplit('\\').next().unwrap_or(class);
    fn body_of<'a, T: Deserialize<'a>>(kind: &str, body: &'a [u8]) -> Result<T, Invalid> {
        serde_json::from_slice(body).map_err(|e| Invalid(format!("invalid {kind} body: {e}")))
    }
    let command = match kind {
        "SendNotification" => Command::SendNotification(body_of(kind, body)?),
        "EndPresence" => Command::EndPresence(body_of(kind, body)?),
        "EraseUserData" => Command::EraseUserData(body_of(kind, body)?),
        "ExportUserData" => Command::ExportUserData(body_of(kind, body)?),
        "ChangeSetting" => Command::ChangeSetting(body_of(kind, body)?),
        _ => {
            return Err(Invalid(format!(
                "unknown command class {class:?}; the commands are {}",
                KINDS.join(", ")
            )));
        }
    };
    validate(&command)?;
    Ok(command)
}

fn validate(command: &Command) -> Result<(), Invalid> {
    let id = command.id();
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        return Err(Invalid("commandId must be 1 to 200 printable characters".into()));
    }
    match command {
        Command::SendNotification(c) => {
            match (&c.user_id, &c.role) {
                (Some(_), Some(_)) => {
                    return Err(Invalid(
                        "SendNotification: give userId or role, not both (neither: the whole tenant)".into(),
                    ));
                }
                (None, Some(role)) if Role::parse(role).is_none() => {
                    return Err(Invalid(format!(
                        "SendNotification: unknown role {role:?}; the roles are {}",
                        Role::ALL.map(Role::as_str).join(", ")
                    )));
                }
                _ => {}
            }
            let title = c.title.trim();
            if title.is_empty() || title.chars().count() > 200 {
                return Err(Invalid(
                    "SendNotification: title must be 1 to 200 characters".into(),
                ));
            }
            if c.body.chars().count() > 10_000 {
                return Err(Invalid(
                    "SendNotification: body must be at most 10000 characters".into(),
                ));
            }
        }
        Command::ChangeSetting(c) => {
            if crate::settings::SettingKey::parse(&c.key).is_none() {
                return Err(Invalid(format!(
                    "ChangeSetting: unknown setting {:?}; the settings are deployment_url, deploy_key, enable_realtime, sync_interval_ms",
                    c.key
                )));
            }
            if !(c.value.is_string() || c.value.is_boolean() || c.value.is_number()) {
                return Err(Invalid(
                    "ChangeSetting: value must be text, a boolean or a number".into(),
                ));
            }
        }
        Command::EndPresence(_) | Command::EraseUserData(_) | Command::ExportUserData(_) => {}
    }
    Ok(())
}

/// What an effect did, recorded beside the command id.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Details for `pulse.processed_commands.detail` (counts, ids); never secrets.
    pub detail: Value,
}

/// Why an effect was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    /// This pulsed cannot carry the command out; it goes to the dead-letter queue.
    #[error("{NOT_SUPPORTED}")]
    NotSupported,
    /// The command is well-formed but refused (unknown user, invalid value...); it goes to
    /// the dead-letter queue with this reason.
    #[error("{0}")]
    Refused(String),
    /// Something that may work later (database down); the command is returned to the queue.
    #[error("{0}")]
    Transient(String),
}

/// Carries out commands. Each method runs inside the transaction that will record the
/// command as processed: whatever it writes there (rows, outbox events via
/// [`crate::outbox::enqueue`]) commits together with that record, and the delivery is
/// acknowledged only after the commit. Effects outside the database (closing sessions)
/// must be safe to repeat, since a crash before the commit redelivers the command.
///
/// The defaults refuse with [`EffectError::NotSupported`]; the realtime engine implements
/// the methods it supports.
pub trait CommandEffects: Send + Sync {
    /// Send a notification.
    fn send_notification<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        _command: &'a SendNotification,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async { Err(EffectError::NotSupported) })
    }

    /// End a user's presence sessions.
    fn end_presence<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        _command: &'a EndPresence,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async { Err(EffectError::NotSupported) })
    }

    /// Erase a user's realtime data and files.
    fn erase_user_data<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        _command: &'a UserData,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async { Err(EffectError::NotSupported) })
    }

    /// Export a user's realtime data; the result is announced by a `data_export.ready`
    /// event.
    fn export_user_data<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        _command: &'a UserData,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async { Err(EffectError::NotSupported) })
    }

    /// Change a platform setting.
    fn change_setting<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        _command: &'a ChangeSetting,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async { Err(EffectError::NotSupported) })
    }

    /// Called once the command's transaction has committed, before the ack: what may only
    /// be shown once durable (publishing to connected clients). Must not fail the command.
    fn committed<'a>(&'a self, _command: &'a Command, _applied: &'a Applied) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The effects the core daemon carries out itself: platform settings. The engine's
/// implementation wraps this one for `change_setting`.
pub struct CoreEffects {
    /// The live settings (validates, stores, audits).
    pub settings: Arc<Settings>,
    /// A connection for the settings store, which runs its own transaction.
    pub pool: deadpool_postgres::Pool,
}

impl CommandEffects for CoreEffects {
    fn change_setting<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        command: &'a ChangeSetting,
    ) -> BoxFuture<'a, Result<Applied, EffectError>> {
        Box::pin(async move {
            let raw = match &command.value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let actor = format!("symfony:{}", command.actor.as_deref().unwrap_or("command"));
            // The settings store commits in its own transaction (validate + store +
            // audit): a crash between that commit and the command's record re-applies the
            // same value on redelivery, which changes nothing but adds an audit line.
            let mut client = self
                .pool
                .get()
                .await
                .map_err(|e| EffectError::Transient(format!("state database: {e}")))?;
            match self
                .settings
                .update(&mut client, &command.key, &raw, &actor)
                .await
            {
                Ok(key) => Ok(Applied {
                    detail: json!({ "setting": key.as_str() }),
                }),
                Err(crate::settings::SettingError::Db(e)) => Err(EffectError::Transient(e)),
                Err(e) => Err(EffectError::Refused(e.to_string())),
            }
        })
    }
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Carried out and recorded.
    Applied,
    /// Already carried out earlier (same id).
    Duplicate,
    /// Sent to the dead-letter queue, with this reason.
    DeadLettered(String),
    /// Returned to the queue (transient failure), with this reason.
    Requeued(String),
}

impl Outcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered(_) => "dead_lettered",
            Outcome::Requeued(_) => "requeued",
        }
    }
}

/// Carries out one validated command, exactly once per id. `Err` is a transient failure.
pub async fn execute(
    pool: &deadpool_postgres::Pool,
    effects: &dyn CommandEffects,
    command: &Command,
) -> Result<Outcome, String> {
    let service = Principal {
        user: None,
        tenant: None,
        roles: vec![Role::Service],
    };
    let (capability, tenant) = command.capability();
    let decision = caps::authorize(
        &service,
        capability,
        &Target {
            tenant,
            ..Default::default()
        },
    );
    if let caps::Decision::Denied(reason) = decision {
        return Ok(Outcome::DeadLettered(format!("forbidden: {}", reason.explain())));
    }
    let db = |e: tokio_postgres::Error| format!("state database: {e}");
    let mut client = pool.get().await.map_err(|e| format!("state database: {e}"))?;
    let tx = client.transaction().await.map_err(db)?;
    // Two instances handling the same redelivered command wait for each other here.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&command.id()],
    )
    .await
    .map_err(db)?;
    let seen = tx
        .query_opt(
            "SELECT 1 FROM pulse.processed_commands WHERE command_id = $1",
            &[&command.id()],
        )
        .await
        .map_err(db)?;
    if seen.is_some() {
        return Ok(Outcome::Duplicate);
    }
    let result = match command {
        Command::SendNotification(c) => effects.send_notification(&tx, c).await,
        Command::EndPresence(c) => effects.end_presence(&tx, c).await,
        Command::EraseUserData(c) => effects.erase_user_data(&tx, c).await,
        Command::ExportUserData(c) => effects.export_user_data(&tx, c).await,
        Command::ChangeSetting(c) => effects.change_setting(&tx, c).await,
    };
    let applied = match result {
        Ok(a) => a,
        Err(EffectError::Transient(e)) => return Err(e),
        Err(e) => return Ok(Outcome::DeadLettered(e.to_string())),
    };
    tx.execute(
        "INSERT INTO pulse.processed_commands (command_id, kind, outcome, detail) VALUES ($1, $2, 'applied', $3)",
        &[&command.id(), &command.kind(), &applied.detail],
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    effects.committed(command, &applied).await;
    Ok(Outcome::Applied)
}

/// What the consumer needs, lent by the supervisor for one session.
pub struct Consumer<'a> {
    /// The state database.
    pub pool: &'a deadpool_postgres::Pool,
    /// What commands do.
    pub effects: &'a dyn CommandEffects,
    /// The commands queue.
    pub queue: &'a str,
    /// Where refused commands go.
    pub dead_letter_queue: &'a str,
    /// Deliveries in flight.
    pub prefetch: u16,
}

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))?
        .1;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Consumes the commands queue until `stop` or a broker failure (returned as `Err`, so
/// the supervisor reconnects).
pub async fn consume(
    consumer: &Consumer<'_>,
    conn: &lapin::Connection,
    stop: &CancellationToken,
) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(consumer.prefetch, BasicQosOptions::default())
        .await?;
    // Dead letters are published with confirms on a channel of their own, so that the
    // original is acknowledged only once its copy is safe.
    let dead = conn.create_channel().await?;
    dead.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            consumer.queue.into(),
            "pulsed-commands".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = consumer.queue, "consuming commands");
    loop {
        let delivery = tokio::select! {
            d = deliveries.next() => d,
            _ = stop.cancelled() => return Ok(()),
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e),
            None => {
                return Err(lapin::ErrorKind::InvalidChannelState(
                    lapin::ChannelState::Closed,
                    "the commands consumer was cancelled by the broker",
                )
                .into());
            }
        };
        handle(consumer, &dead, delivery).await?;
    }
}

async fn handle(
    consumer: &Consumer<'_>,
    dead: &lapin::Channel,
    delivery: Delivery,
) -> Result<(), lapin::Error> {
    let headers = delivery.properties.headers().as_ref();
    let class = header_text(headers, "type");
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .or_else(|| header_text(headers, "Content-Type"));
    let outcome = match parse(class.as_deref(), content_type.as_deref(), &delivery.data) {
        Err(Invalid(reason)) => Outcome::DeadLettered(reason),
        Ok(command) => match execute(consumer.pool, consumer.effects, &command).await {
            Ok(o) => o,
            Err(e) => Outcome::Requeued(e),
        },
    };
    let last = class.as_deref().and_then(|c| c.rsplit('\\').next());
    let kind: &'static str = KINDS
        .iter()
        .copied()
        .find(|k| Some(*k) == last)
        .unwrap_or("unknown");
    metrics::counter!("pulse_commands_total", "kind" => kind, "outcome" => outcome.label()).increment(1);
    match &outcome {
        Outcome::Applied | Outcome::Duplicate => {
            tracing::info!(kind, outcome = outcome.label(), "command handled");
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Outcome::DeadLettered(reason) => {
            tracing::warn!(kind, %reason, "command refused; moved to the dead-letter queue");
            dead_letter(dead, consumer.dead_letter_queue, &delivery, reason).await?;
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Outcome::Requeued(reason) => {
            tracing::warn!(kind, %reason, "command failed for now; returned to the queue");
            // Give the cause (usually the database) a moment before the redelivery.
            tokio::time::sleep(Duration::from_secs(1)).await;
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// Copies a refused delivery to the dead-letter queue with its reason, and waits for the
/// broker's confirm.
async fn dead_letter(
    channel: &lapin::Channel,
    queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), lapin::Error> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from("x-pulse-reason"),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(
        ShortString::from("x-pulse-original-queue"),
        AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
    );
    let properties: BasicProperties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &delivery.data,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        _ => Err(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Error,
            "the dead-letter queue refused a command",
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "App\\Message\\Pulse\\Command\\";

    #[test]
    fn a_symfony_command_parses() {
        let c = parse(
            Some(&format!("{NS}SendNotification")),
            Some("application/json"),
            br#"{"commandId":"c1","tenantId":7,"userId":"42","role":null,"title":"Hi","body":"x","data":null}"#,
        )
        .unwrap();
        let Command::SendNotification(n) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(n.tenant_id, Id("7".into()));
        assert_eq!(n.user_id, Some(Id("42".into())));
        assert_eq!(c.id(), "c1");
        assert_eq!(c.kind(), "SendNotification");
    }

    #[test]
    fn invalid_commands_say_why() {
        let err = |t: Option<&str>, ct: Option<&str>, b: &str| parse(t, ct, b.as_bytes()).unwrap_err().0;
        assert!(err(None, None, "{}").contains("type"));
        assert!(err(Some("X\\Nope"), None, "{}").contains("unknown command class"));
        assert!(err(Some("X\\EndPresence"), Some("text/plain"), "{}").contains("application/json"));
        assert!(err(Some("X\\EndPresence"), None, "not json").contains("invalid EndPresence body"));
        assert!(err(Some("X\\EndPresence"), None, r#"{"commandId":"a","tenantId":1}"#).contains("userId"));
        assert!(
            err(
                Some("X\\EndPresence"),
                None,
                r#"{"commandId":"a","tenantId":1,"userId":2,"extra":1}"#
            )
            .contains("extra")
        );
        assert!(
            err(
                Some("X\\SendNotification"),
                None,
                r#"{"commandId":"a","tenantId":1,"userId":2,"role":"staff","title":"t"}"#
            )
            .contains("not both")
        );
        assert!(
            err(
                Some("X\\SendNotification"),
                None,
                r#"{"commandId":"a","tenantId":1,"role":"boss","title":"t"}"#
            )
            .contains("unknown role")
        );
        assert!(
            err(
                Some("X\\SendNotification"),
                None,
                r#"{"commandId":"","tenantId":1,"title":"t"}"#
            )
            .contains("commandId")
        );
        assert!(
            err(
                Some("X\\ChangeSetting"),
                None,
                r#"{"commandId":"a","key":"colour","value":"red"}"#
            )
            .contains("unknown setting")
        );
        assert!(
            err(
                Some("X\\ChangeSetting"),
                None,
                r#"{"commandId":"a","key":"sync_interval_ms","value":[1]}"#
            )
            .contains("value")
        );
        assert!(
            err(
                Some("X\\EraseUserData"),
                None,
                r#"{"commandId":"a","tenantId":-1,"userId":2}"#
            )
            .contains("id")
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// The command parser never panics, whatever arrives from the queue.
        #[test]
        fn parse_never_panics(
            kind in proptest::sample::select(vec!["SendNotification", "EndPresence", "EraseUserData", "ExportUserData", "ChangeSetting", "Nope", ""]),
            prefix in "[A-Za-z\\\\]{0,12}",
            content_type in proptest::option::of("[a-z/;= -]{0,24}"),
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            fields in proptest::collection::btree_map(
                proptest::sample::select(vec!["commandId", "tenantId", "userId", "role", "title", "body", "data", "key", "value", "actor", "x"]),
                proptest::prop_oneof![
                    proptest::strategy::Just(Value::Null),
                    proptest::num::i64::ANY.prop_map(Value::from),
                    "\\PC{0,40}".prop_map(Value::from),
                    proptest::bool::ANY.prop_map(Value::from),
                ],
                0..8,
            ),
            use_raw in proptest::bool::ANY,
        ) {
            let class = format!("{prefix}{kind}");
            let body = if use_raw {
                raw
            } else {
                serde_json::to_vec(&fields).unwrap()
            };
            let _ = parse(Some(&class), content_type.as_deref(), &body);
            let _ = parse(None, None, &body);
        }
    }

    #[test]
    fn headers_are_found_whatever_their_case() {
        let mut t = FieldTable::default();
        t.insert("Type".into(), AMQPValue::LongString("A\\B".into()));
        t.insert(
            "X-Message-Stamp-Symfony\\Component\\Messenger\\Stamp\\BusNameStamp".into(),
            AMQPValue::LongString("[{\"busName\":\"x\"}]".into()),
        );
        assert_eq!(header_text(Some(&t), "type").as_deref(), Some("A\\B"));
        assert_eq!(header_text(Some(&t), "missing"), None);
    }
}
