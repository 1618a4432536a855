//! The transactional outbox: webhooks to Symfony are written here, in the same database
//! transaction as the state change they report, and published later by the relay.
//!
//! This module owns the event catalogue (names, PHP classes), the idempotency keys and
//! [`enqueue`]. It never talks to the broker and never opens a transaction of its own:
//! the caller's transaction decides whether the event exists at all, which is the
//! durability rule (an event is sent if and only if its change committed).

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use tokio_postgres::GenericClient;

/// Every event Pulse sends to Symfony; the name is also the AMQP routing key.
pub const EVENTS: &[&str] = &[
    "presence.joined",
    "presence.left",
    "notification.created",
    "notification.read",
    "file.uploaded",
    "file.deleted",
    "metric.threshold_crossed",
    "job.failed",
    "data_export.ready",
];

/// NOTIFY channel the relay listens on, so it wakes up at commit instead of polling.
pub const NOTIFY_CHANNEL: &str = "pulse_outbox";

/// One event to send.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// One of [`EVENTS`].
    pub event: &'static str,
    /// Idempotency key, sent as the AMQP `message_id`; the same source gives the same key
    /// (see [`message_id_from_lsn`], [`message_id_from_command`]).
    pub message_id: String,
    /// Events of one aggregate (for example `user:42`) are published in the order they
    /// were enqueued.
    pub aggregate: String,
    /// The message's properties: a JSON object that Symfony's serializer maps onto the
    /// PHP class.
    pub payload: Value,
}

/// Why an event was not enqueued.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The event is malformed; a bug in the caller.
    #[error("invalid outbox event: {0}")]
    Invalid(String),
    /// The database refused; the caller's transaction is lost and must be retried.
    #[error("cannot write the outbox: {0}")]
    Db(#[from] tokio_postgres::Error),
}

impl OutboxEvent {
    /// A checked event.
    pub fn new(
        event: &str,
        message_id: impl Into<String>,
        aggregate: impl Into<String>,
        payload: Value,
    ) -> Result<OutboxEvent, OutboxError> {
        let event = EVENTS
            .iter()
            .copied()
            .find(|e| *e == event)
            .ok_or_else(|| OutboxError::Invalid(format!("unknown event {event:?}")))?;
        let message_id = message_id.into();
        let aggregate = aggregate.into();
        if message_id.is_empty() || message_id.len() > 255 {
            return Err(OutboxError::Invalid(
                "message_id must be 1 to 255 bytes (an AMQP short string)".into(),
            ));
        }
        if aggregate.is_empty() {
            return Err(OutboxError::Invalid("aggregate must not be empty".into()));
        }
        if !payload.is_object() {
            return Err(OutboxError::Invalid(
                "payload must be a JSON object (the message's properties)".into(),
            ));
        }
        Ok(OutboxEvent {
            event,
            message_id,
            aggregate,
            payload,
        })
    }
}

/// The idempotency key of the `position`-th event derived from the transaction that
/// committed at `commit_lsn`: a replay of that transaction derives the same key.
pub fn message_id_from_lsn(commit_lsn: u64, position: u32) -> String {
    format!(
        "lsn:{:X}/{:X}:{position}",
        commit_lsn >> 32,
        commit_lsn & 0xffff_ffff
    )
}

/// The idempotency key of the `position`-th event caused by a command.
pub fn message_id_from_command(command_id: &str, position: u32) -> String {
    format!("cmd:{command_id}:{position}")
}

/// Writes `event` in the caller's transaction. Returns false when an event with the same
/// message_id is already there (a replay): nothing new is sent.
///
/// Pass the [`Transaction`](tokio_postgres::Transaction) that makes the state change the event reports; any
/// [`GenericClient`] is accepted so that code generic over it can call this, but a plain
/// client gives up the atomicity the durability rule needs.
pub async fn enqueue<C: GenericClient>(tx: &C, event: &OutboxEvent) -> Result<bool, OutboxError> {
    Ok(write(tx, event).await?)
}

/// [`enqueue`] for callers whose errors are database errors: the event was checked when it
/// was built, so the database is the only thing that can fail here.
pub async fn write<C: GenericClient>(tx: &C, event: &OutboxEvent) -> Result<bool, tokio_postgres::Error> {
    let rows = tx
        .query(
            "WITH ins AS (
                 INSERT INTO pulse.outbox (message_id, aggregate, event, payload)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (message_id) DO NOTHING
                 RETURNING id)
             SELECT id, pg_notify($5, '') FROM ins",
            &[
                &event.message_id,
                &event.aggregate,
                &event.event,
                &event.payload,
                &NOTIFY_CHANNEL,
            ],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// Writes many events in one statement (in slice order, so per-aggregate order is the
/// slice order). Returns how many were new.
pub async fn enqueue_all<C: GenericClient>(tx: &C, events: &[OutboxEvent]) -> Result<u64, OutboxError> {
    Ok(write_all(tx, events).await?)
}

/// [`enqueue_all`] for callers whose errors are database errors (see [`write`]).
pub async fn write_all<C: GenericClient>(
    tx: &C,
    events: &[OutboxEvent],
) -> Result<u64, tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    let aggs: Vec<&str> = events.iter().map(|e| e.aggregate.as_str()).collect();
    let names: Vec<&str> = events.iter().map(|e| e.event).collect();
    let payloads: Vec<&Value> = events.iter().map(|e| &e.payload).collect();
    let rows = tx
        .query(
            "WITH ins AS (
                 INSERT INTO pulse.outbox (message_id, aggregate, event, payload)
                 SELECT m, a, e, p FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])
                     WITH ORDINALITY AS u(m, a, e, p, n)
                 ORDER BY n
                 ON CONFLICT (message_id) DO NOTHING
                 RETURNING id)
             SELECT (SELECT count(*) FROM ins), pg_notify($5, '')",
            &[&ids, &aggs, &names, &payloads, &NOTIFY_CHANNEL],
        )
        .await?;
    Ok(rows.first().map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0))
}

/// Which events are sent and the PHP class each maps to.
#[derive(Debug, Clone)]
pub struct EventCatalog {
    namespace: String,
    /// `None`: every event.
    enabled: Option<HashSet<String>>,
    /// Classes named one by one (the schema file may map an event to any class).
    classes: HashMap<String, String>,
}

impl EventCatalog {
    /// A catalogue: classes under `namespace`; `enabled` empty means every event.
    pub fn new(namespace: &str, enabled: &[String]) -> EventCatalog {
        EventCatalog {
            namespace: namespace.trim_end_matches('\\').to_string(),
            enabled: if enabled.is_empty() {
                None
            } else {
                Some(enabled.iter().cloned().collect())
            },
            classes: HashMap::new(),
        }
    }

    /// Maps `event` to `class` instead of the namespace rule.
    pub fn with_class(mut self, event: &str, class: &str) -> EventCatalog {
        self.classes.insert(event.to_string(), class.to_string());
        self
    }

    /// Whether `event` is sent to Symfony.
    pub fn is_enabled(&self, event: &str) -> bool {
        self.enabled.as_ref().is_none_or(|set| set.contains(event))
    }

    /// The PHP class of `event`: `presence.joined` is `<namespace>\PresenceJoined`.
    pub fn class_of(&self, event: &str) -> String {
        if let Some(class) = self.classes.get(event) {
            return class.clone();
        }
        let mut class = String::with_capacity(self.namespace.len() + event.len() + 1);
        class.push_str(&self.namespace);
        class.push('\\');
        for word in event.split(['.', '_']) {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                class.extend(first.to_uppercase());
                class.push_str(chars.as_str());
            }
        }
        class
    }
}

/// Debounces presence for Symfony (`amqp.presence_debounce_ms`): a user who drops and
/// comes back within the window (a page reload, a flaky network) sends neither
/// `presence.left` nor a second `presence.joined`. The engine feeds it joins and leaves
/// and asks it, on its own clock, which leaves are due; it keeps no timers of its own.
#[derive(Debug)]
pub struct PresenceDebounce<K> {
    window: std::time::Duration,
    /// Keys Symfony was told joined and not yet told left.
    present: HashSet<K>,
    /// Leaves held back, with when they were seen.
    leaving: HashMap<K, std::time::Instant>,
}

impl<K: std::hash::Hash + Eq + Clone> PresenceDebounce<K> {
    /// A debouncer with the given window (zero: every change is sent at once).
    pub fn new(window: std::time::Duration) -> Self {
        PresenceDebounce {
            window,
            present: HashSet::new(),
            leaving: HashMap::new(),
        }
    }

    /// A join: true when `presence.joined` must be sent (not a quick return).
    pub fn joined(&mut self, key: K) -> bool {
        if self.leaving.remove(&key).is_some() {
            return false;
        }
        self.present.insert(key)
    }

    /// A leave: held back until [`PresenceDebounce::due`] releases it. True when the key
    /// was known as present (else there is nothing to announce).
    pub fn left(&mut self, key: K, now: std::time::Instant) -> bool {
        if !self.present.contains(&key) {
            return false;
        }
        self.leaving.entry(key).or_insert(now);
        true
    }

    /// The leaves whose window has passed at `now`: send `presence.left` for each.
    pub fn due(&mut self, now: std::time::Instant) -> Vec<K> {
        let window = self.window;
        let due: Vec<K> = self
            .leaving
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= window)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.leaving.remove(k);
            self.present.remove(k);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classes_follow_the_event_names() {
        let c = EventCatalog::new("App\\Message\\Pulse", &[]);
        assert_eq!(
            c.class_of("presence.joined"),
            "App\\Message\\Pulse\\PresenceJoined"
        );
        assert_eq!(
            c.class_of("metric.threshold_crossed"),
            "App\\Message\\Pulse\\MetricThresholdCrossed"
        );
        assert_eq!(
            c.class_of("data_export.ready"),
            "App\\Message\\Pulse\\DataExportReady"
        );
        assert!(c.is_enabled("file.deleted"));
        let only = EventCatalog::new("X\\", &["file.deleted".to_string()]);
        assert!(only.is_enabled("file.deleted"));
        assert!(!only.is_enabled("file.uploaded"));
        assert_eq!(only.class_of("file.deleted"), "X\\FileDeleted");
        let mapped = only.with_class("file.deleted", "Shop\\Media\\Removed");
        assert_eq!(mapped.class_of("file.deleted"), "Shop\\Media\\Removed");
    }

    #[test]
    fn events_are_checked() {
        assert!(OutboxEvent::new("presence.joined", "k", "user:1", json!({})).is_ok());
        assert!(OutboxEvent::new("presence.jumped", "k", "user:1", json!({})).is_err());
        assert!(OutboxEvent::new("presence.joined", "", "user:1", json!({})).is_err());
        assert!(OutboxEvent::new("presence.joined", "k", "", json!({})).is_err());
        assert!(OutboxEvent::new("presence.joined", "k", "u", json!([1])).is_err());
        assert!(OutboxEvent::new("presence.joined", "k".repeat(256), "u", json!({})).is_err());
    }

    #[test]
    fn a_quick_return_sends_nothing() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let mut d = PresenceDebounce::new(Duration::from_secs(5));
        assert!(d.joined("u1"));
        assert!(!d.joined("u1"), "already present");
        assert!(d.left("u1", t0));
        assert!(d.due(t0 + Duration::from_secs(4)).is_empty());
        assert!(!d.joined("u1"), "back within the window: no new join");
        assert!(d.due(t0 + Duration::from_secs(10)).is_empty(), "and no leave");
        assert!(d.left("u1", t0 + Duration::from_secs(10)));
        assert_eq!(d.due(t0 + Duration::from_secs(15)), vec!["u1"]);
        assert!(d.joined("u1"), "a real return joins again");
        assert!(!d.left("u2", t0), "never joined: nothing to announce");
        let mut now = PresenceDebounce::new(Duration::ZERO);
        assert!(now.joined(1));
        assert!(now.left(1, t0));
        assert_eq!(now.due(t0), vec![1]);
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(message_id_from_lsn(0x1_0000_00A0, 3), "lsn:1/A0:3");
        assert_ne!(
            message_id_from_lsn(0x1_0000_00A0, 3),
            message_id_from_lsn(0x1_0000_00A0, 4)
        );
        assert_eq!(message_id_from_command("c-1", 0), "cmd:c-1:0");
    }
}
