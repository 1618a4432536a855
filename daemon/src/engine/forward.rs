//! Mutations declared in the schema file (`[mutations.<name>]`): Pulse does not carry them
//! out itself (the business logic is Symfony's); it checks the caller's roles and the
//! arguments against their declared types, then hands the mutation to Symfony as the
//! outbox event `mutation.<name>` (PHP class from the schema file), and answers the client
//! `{accepted: true, message_id}` once that event is committed. Symfony's handler then
//! does the work, and its writes come back to clients through the change stream.
//!
//! Nothing is answered `accepted` before the event is durable; a mutation that fails its
//! checks writes nothing.

use pulse_shared::caps::{Principal, Role};
use pulse_shared::{ErrorBody, ErrorCode};
use serde_json::{Value as Json, json};

use super::{Engine, err, events, internal, invalid};
use crate::outbox::{self, OutboxEvent};
use crate::schema::Mutation;

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
    ) -> Result<Json, ErrorBody> {
        // The schema's roles narrow who may call it; services (the deploy key) always may.
        if !p.roles.iter().any(|r| *r == Role::Service || m.roles.contains(r)) {
            return Err(err(
                ErrorCode::Forbidden,
                format!(
                    "mutation {}: none of your roles may call it (allowed: {})",
                    m.name,
                    m.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
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
        let message_id = format!("{}:{}", m.event, uuid::Uuid::new_v4());
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
        tx.commit().await.map_err(internal)?;
        if !written {
            // The schema declares the mutation, so its event is sent; only a fresh key
            // conflicting would land here.
            return Err(internal(format!(
                "mutation {}: its event was not written",
                m.name
            )));
        }
        tracing::debug!(mutation = %m.name, %message_id, "mutation handed to Symfony");
        Ok(json!({ "accepted": true, "message_id": message_id }))
    }
}
