//! Mutations declared in the schema file (`[mutations.<name>]`): Pulse does not carry them
//! out itself (the business logic is Symfony's); it checks the caller's roles and the
//! arguments against their declared types, then hands the mutation to Symfony as the
//! outbox event `mutation.<name>` (PHP class from the schema file), and answers the client
//! `{accepted: true, message_id}` once that event is committed. Symfony's handler then
//! does the work, and its writes come back to clients through the change stream.
//!
//! Nothing is answered `accepted` before the event is durable; a mutation that fails its
//! checks writes nothing.
//!
//! A client that may retry (after a reconnect, it cannot know whether its call went
//! through) sends an idempotency key: the `message_id` is then derived from the caller,
//! the mutation and the key instead of drawn at random, so the retry finds the first
//! call's event in the outbox (as long as the outbox keeps it, `jobs.outbox_retention_hours`)
//! and is answered with its `message_id` instead of sending Symfony a second event.

use pulse_shared::caps::{Capability, Principal, Target, authorize};
use pulse_shared::{ErrorBody, ErrorCode};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use super::{Engine, check, err, events, internal, invalid};
use crate::outbox::{self, OutboxEvent};
use crate::schema::Mutation;

/// The longest idempotency key taken.
const KEY_MAX: usize = 128;

/// The `message_id` of a keyed call: the same for the same caller (tenant and user),
/// mutation and key, and for nothing else.
fn keyed_message_id(event: &str, p: &Principal, name: &str, key: &str) -> Result<String, ErrorBody> {
    if key.is_empty() || key.len() > KEY_MAX || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "idempotency_key",
            format!("must be 1 to {KEY_MAX} visible ASCII characters"),
        ));
    }
    let mut h = Sha256::new();
    for part in [p.tenant.as_deref(), p.user.as_deref(), Some(name), Some(key)] {
        // Tagged and length-prefixed, so that no two different tuples hash the same bytes.
        h.update([u8::from(part.is_some())]);
        let part = part.unwrap_or_default();
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    Ok(format!("{event}:key:{}", hex::encode(&h.finalize()[..16])))
}

impl Engine {
    /// Symfony's database (the source), for reads at command time such as the users of
    /// a tenant.
    pub fn source_pool(&self) -> &deadpool_postgres::Pool {
        &self.source
    }

    /// Hands schema mutations to Symfony from now on (a broker is configured).
    pub fn enable_mutation_forwarding(&self) {
        self.forwarding.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Checks a declared mutation and writes its event; answers `{accepted, message_id}`.
    pub(super) async fn forward_mutation(
        &self,
        p: &Principal,
        m: &Mutation,
        args: &Json,
        key: Option<&str>,
    ) -> Result<Json, ErrorBody> {
        // The matrix, narrowed by the schema's roles for the mutation (services, the
        // deploy key, always may); it acts in the caller's own tenant.
        let target = Target {
            tenant: p.tenant.as_deref(),
            listed: Some(&m.roles),
            ..Target::default()
        };
        check(
            authorize(p, Capability::CallMutation, &target),
            &format!("mutation {}", m.name),
        )
        .map_err(|mut e| {
            let allowed: Vec<&str> = m.roles.iter().map(|r| r.as_str()).collect();
            e.message.push_str(&format!(" (allowed: {})", allowed.join(", ")));
            e
        })?;
        m.validate(args).map_err(|(field, msg)| invalid(&field, msg))?;
        if !self.forwarding.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(err(
                ErrorCode::Unavailable,
                format!(
                    "mutation {}: schema mutations are handed to Symfony through RabbitMQ, and this pulsed has no broker (set amqp.url)",
                    m.name
                ),
            ));
        }
        let message_id = match key {
            Some(key) => keyed_message_id(m.event, p, &m.name, key)?,
            None => format!("{}:{}", m.event, uuid::Uuid::new_v4()),
        };
        let args = if args.is_null() { json!({}) } else { args.clone() };
        let event = OutboxEvent {
            event: m.event,
            message_id: message_id.clone(),
            aggregate: match (&p.tenant, &p.user) {
                (Some(t), Some(u)) => events::aggregate(t, u),
                (Some(t), None) => format!("tenant:{t}"),
                _ => "service".to_string(),
            },
            payload: json!({
                "mutationId": message_id,
                "name": m.name,
                "tenantId": p.tenant,
                "userId": p.user,
                "roles": p.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                "args": args,
                "requestedAt": chrono::Utc::now().to_rfc3339(),
            }),
        };
        let mut db = self.state.get().await.map_err(internal)?;
        let tx = db.transaction().await.map_err(internal)?;
        let written = outbox::write(&*tx, &event).await.map_err(internal)?;
        let first = if written {
            None
        } else {
            // The same message_id is already in the outbox: a retry of a keyed call.
            tx.query_opt(
                "SELECT payload FROM pulse.outbox WHERE message_id = $1",
                &[&message_id],
            )
            .await
            .map_err(internal)?
            .map(|row| row.get::<_, Json>(0))
        };
        tx.commit().await.map_err(internal)?;
        if !written {
            return match first {
                Some(first) if first["name"] == json!(m.name) && first["args"] == args => {
                    tracing::debug!(mutation = %m.name, %message_id, "retried mutation answered from the outbox");
                    Ok(json!({ "accepted": true, "message_id": message_id, "duplicate": true }))
                }
                Some(_) => Err(invalid(
                    "idempotency_key",
                    format!(
                        "this key was already used for mutation {} with other arguments; use a new key for a new action",
                        m.name
                    ),
                )),
                // Gone between the insert and the read (pruned): nothing to compare with.
                None => Err(err(
                    ErrorCode::Unavailable,
                    format!(
                        "mutation {}: its earlier event just left the outbox; retry",
                        m.name
                    ),
                )),
            };
        }
        tracing::debug!(mutation = %m.name, %message_id, "mutation handed to Symfony");
        Ok(json!({ "accepted": true, "message_id": message_id }))
    }
}
