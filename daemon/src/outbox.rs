//! The transactional outbox: webhooks to Symfony are written here, in the same database
//! transaction as the state change they report, and published later by the relay.
//!
//! This module owns the event catalogue (names, PHP classes), the idempotency keys and
//! [`enqueue`]. It never talks to the broker and never opens a transaction of its own:
//! the caller's transaction decides whether the event exists at all, which is the
//! durability rule (an event is sent if and only if its change committed).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

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

/// The PHP namespace of event classes when the schema file names none.
pub const DEFAULT_NAMESPACE: &str = "App\\Message\\Pulse";

/// Whether `name` is a PHP class or namespace name (`App\Message\Pulse`).
pub fn is_php_class(name: &str) -> bool {
    !name.is_empty()
        && name.trim_start_matches('\\').split('\\').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// The event names of declared mutations (`mutation.<name>`), kept for the life of the
/// process so that events can name them as `&'static str` like the built-in ones; a
/// schema declares few, and each name is stored once however often it is parsed.
pub fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().expect("event names lock");
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
}

/// The events this process writes to the outbox: set once at start from the schema file
/// ([`install`]); until then (tools, tests), every event.
static SENT: RwLock<Option<Arc<EventCatalog>>> = RwLock::new(None);

/// Makes `catalog` decide which events [`write`] and [`write_all`] keep: an event the
/// schema file does not send is never written, so it never reaches the relay.
pub fn install(catalog: EventCatalog) {
    *SENT.write().expect("outbox catalog lock") = Some(Arc::new(catalog));
}

fn is_sent(event: &str) -> bool {
    SENT.read()
        .expect("outbox catalog lock")
        .as_ref()
        .is_none_or(|c| c.is_enabled(event))
}

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
        let event = match EVENTS.iter().copied().find(|e| *e == event) {
            Some(e) => e,
            None if event.len() > "mutation.".len() && event.starts_with("mutation.") => intern(event),
            None => return Err(OutboxError::Invalid(format!("unknown event {event:?}"))),
        };
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
/// message_id is already there (a replay), or when the schema file does not send this
/// event: nothing new is sent.
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
    insert(tx, event, Some(NOTIFY_CHANNEL)).await
}

/// [`write`] without waking the relay at commit. A transaction that notifies takes
/// PostgreSQL's cluster-wide notification lock at commit and holds it until its commit
/// is on disk, so notifying transactions commit one at a time. A caller that commits
/// often side by side (uploads) writes its event with this and then sends [`ANNOUNCE`]
/// from a transaction that does not wait for the disk; if that is lost, the relay's
/// poll finds the event a moment later.
pub async fn write_unannounced<C: GenericClient>(
    tx: &C,
    event: &OutboxEvent,
) -> Result<bool, tokio_postgres::Error> {
    insert(tx, event, None).await
}

/// Wakes the relay (at the commit of the transaction it runs in): $1 [`NOTIFY_CHANNEL`].
pub const ANNOUNCE: &str = "SELECT pg_notify($1, '')";

async fn insert<C: GenericClient>(
    tx: &C,
    event: &OutboxEvent,
    channel: Option<&str>,
) -> Result<bool, tokio_postgres::Error> {
    if !is_sent(event.event) {
        return Ok(false);
    }
    // Typed parameters: parsed, bound and run in one round trip (a plain `query` first
    // prepares, which is one more, and this sits inside callers' transactions, some
    // holding a tenant's lock).
    let rows = tx
        .query_typed(
            "WITH ins AS (
                 INSERT INTO pulse.outbox (message_id, aggregate, event, payload)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (message_id) DO NOTHING
                 RETURNING id)
             SELECT id, CASE WHEN $5::text IS NOT NULL THEN pg_notify($5, '') END FROM ins",
            &[
                (&event.message_id, Type::TEXT),
                (&event.aggregate, Type::TEXT),
                (&event.event, Type::TEXT),
                (&event.payload, Type::JSONB),
                (&channel, Type::TEXT),
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
    let kept: Vec<&OutboxEvent> = events.iter().filter(|e| is_sent(e.event)).collect();
    if kept.is_empty() {
        return Ok(0);
    }
    let events = kept;
    let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    let aggs: Vec<&str> = events.iter().map(|e| e.aggregate.as_str()).collect();
    let names: Vec<&str> = events.iter().map(|e| e.event).collect();
    let payloads: Vec<&Value> = events.iter().map(|e| &e.payload).collect();
    let rows = tx
        .query_typed(
            "WITH ins AS (
                 INSERT INTO pulse.outbox (message_id, aggregate, event, payload)
                 SELECT m, a, e, p FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])
                     WITH ORDINALITY AS u(m, a, e, p, n)
                 ORDER BY n
                 ON CONFLICT (message_id) DO NOTHING
                 RETURNING id)
             SELECT (SELECT count(*) FROM ins), pg_notify($5, '')",
            &[
                (&ids, Type::TEXT_ARRAY),
                (&aggs, Type::TEXT_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&payloads, Type::JSONB_ARRAY),
                (&NOTIFY_CHANNEL, Type::TEXT),
            ],
        )
        .await?;
    Ok(rows.first().map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0))
}

/// Which events are sent and the PHP class each maps to (the schema file's `[events]`
/// and `[mutations.*] class`).
#[derive(Debug, Clone)]
pub struct EventCatalog {
    namespace: String,
    /// `None`: every event.
    enabled: Option<HashSet<&'static str>>,
    /// Classes named one by one (the schema file may map an event to any class).
    classes: HashMap<&'static str, String>,
}

impl Default for EventCatalog {
    /// Every event, classes under [`DEFAULT_NAMESPACE`].
    fn default() -> Self {
        EventCatalog::new(DEFAULT_NAMESPACE, None)
    }
}

impl EventCatalog {
    /// A catalogue: classes under `namespace`; `enabled` `None` means every event.
    pub fn new(namespace: &str, enabled: Option<&[&'static str]>) -> EventCatalog {
        EventCatalog {
            namespace: namespace.trim_end_matches('\\').to_string(),
            enabled: enabled.map(|list| list.iter().copied().collect()),
            classes: HashMap::new(),
        }
    }

    /// Maps `event` to `class` instead of the namespace rule.
    pub fn with_class(mut self, event: &'static str, class: &str) -> EventCatalog {
        self.classes
            .insert(event, class.trim_start_matches('\\').to_string());
        self
    }

    /// Sends `event` too (a declared mutation's event).
    pub fn with_event(mut self, event: &'static str) -> EventCatalog {
        if let Some(set) = self.enabled.as_mut() {
            set.insert(event);
        }
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

/// The idempotency key of a presence event: the user, the event and the debounce window
/// it happened in (`at_ms / window_ms`, wall clock). A write retried after an unclear
/// failure, or a join the same user announces again after a restart within the same
/// window, derives the same key, so the outbox keeps one event. Long ids become a digest
/// (an AMQP short string holds 255 bytes).
pub fn presence_message_id(event: &str, tenant: &str, user: &str, at_ms: u64, window_ms: u64) -> String {
    let slot = at_ms / window_ms.max(1);
    let id = format!("{event}:{tenant}:{user}:{slot}");
    if id.len() <= 255 {
        return id;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}\0{tenant}\0{user}\0{slot}", event).as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{event}:{hex}")
}

/// Milliseconds since the Unix epoch (the wall clock presence keys are derived from).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Debounces presence for Symfony (`amqp.presence_debounce_ms`): a user who drops and
/// comes back within the window (a page reload, a flaky network) sends neither
/// `presence.left` nor a second `presence.joined`. The engine feeds it joins and leaves
/// and asks it, on its own clock (milliseconds of wall time), which leaves are due; it
/// keeps no timers of its own.
#[derive(Debug)]
pub struct PresenceDebounce<K> {
    window_ms: u64,
    /// Keys Symfony was told joined and not yet told left.
    present: HashSet<K>,
    /// Leaves held back, with when they were seen.
    leaving: HashMap<K, u64>,
}

impl<K: std::hash::Hash + Eq + Clone> PresenceDebounce<K> {
    /// A debouncer with the given window (zero: every change is sent at once).
    pub fn new(window: std::time::Duration) -> Self {
        PresenceDebounce {
            window_ms: window.as_millis() as u64,
            present: HashSet::new(),
            leaving: HashMap::new(),
        }
    }

    /// The window, in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// A join: true when `presence.joined` must be sent (not a quick return).
    pub fn joined(&mut self, key: K) -> bool {
        if self.leaving.remove(&key).is_some() {
            return false;
        }
        self.present.insert(key)
    }

    /// A leave seen at `now_ms`: held back until [`PresenceDebounce::due`] releases it.
    /// True when the key was known as present (else there is nothing to announce).
    pub fn left(&mut self, key: K, now_ms: u64) -> bool {
        if !self.present.contains(&key) {
            return false;
        }
        self.leaving.entry(key).or_insert(now_ms);
        true
    }

    /// The leaves whose window has passed at `now_ms`, with when each was seen: send
    /// `presence.left` for each.
    pub fn due(&mut self, now_ms: u64) -> Vec<(K, u64)> {
        let window = self.window_ms;
        let due: Vec<(K, u64)> = self
            .leaving
            .iter()
            .filter(|(_, at)| now_ms.saturating_sub(**at) >= window)
            .map(|(k, at)| (k.clone(), *at))
            .collect();
        for (k, _) in &due {
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
        let c = EventCatalog::default();
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
        let only = EventCatalog::new("X\\", Some(&["file.deleted"]));
        assert!(only.is_enabled("file.deleted"));
        assert!(!only.is_enabled("file.uploaded"));
        assert_eq!(only.class_of("file.deleted"), "X\\FileDeleted");
        let mapped = only.with_class("file.deleted", "Shop\\Media\\Removed");
        assert_eq!(mapped.class_of("file.deleted"), "Shop\\Media\\Removed");
        let m = intern("mutation.invite");
        assert!(std::ptr::eq(m, intern("mutation.invite")), "interned once");
        let with = mapped.with_event(m);
        assert!(with.is_enabled("mutation.invite"));
        assert_eq!(with.class_of("mutation.invite"), "X\\MutationInvite");
        assert!(is_php_class("App\\Message\\Pulse"));
        assert!(!is_php_class("App\\9Message"));
        assert!(!is_php_class("App Message"));
        assert!(!is_php_class(""));
    }

    #[test]
    fn events_are_checked() {
        assert!(OutboxEvent::new("presence.joined", "k", "user:1", json!({})).is_ok());
        assert!(OutboxEvent::new("presence.jumped", "k", "user:1", json!({})).is_err());
        assert!(OutboxEvent::new("presence.joined", "", "user:1", json!({})).is_err());
        assert!(OutboxEvent::new("presence.joined", "k", "", json!({})).is_err());
        assert!(OutboxEvent::new("presence.joined", "k", "u", json!([1])).is_err());
        assert!(OutboxEvent::new("presence.joined", "k".repeat(256), "u", json!({})).is_err());
        assert_eq!(
            OutboxEvent::new("mutation.invite", "k", "u", json!({}))
                .unwrap()
                .event,
            "mutation.invite"
        );
        assert!(OutboxEvent::new("mutation.", "k", "u", json!({})).is_err());
    }

    #[test]
    fn a_quick_return_sends_nothing() {
        let t0 = 1_000_000u64;
        let mut d = PresenceDebounce::new(std::time::Duration::from_secs(5));
        assert!(d.joined("u1"));
        assert!(!d.joined("u1"), "already present");
        assert!(d.left("u1", t0));
        assert!(d.due(t0 + 4_000).is_empty());
        assert!(!d.joined("u1"), "back within the window: no new join");
        assert!(d.due(t0 + 10_000).is_empty(), "and no leave");
        assert!(d.left("u1", t0 + 10_000));
        assert_eq!(d.due(t0 + 15_000), vec![("u1", t0 + 10_000)]);
        assert!(d.joined("u1"), "a real return joins again");
        assert!(!d.left("u2", t0), "never joined: nothing to announce");
        let mut now = PresenceDebounce::new(std::time::Duration::ZERO);
        assert!(now.joined(1));
        assert!(now.left(1, t0));
        assert_eq!(now.due(t0), vec![(1, t0)]);
    }

    #[test]
    fn presence_keys_follow_the_debounce_window() {
        let id = |at| presence_message_id("presence.joined", "t1", "alice", at, 5_000);
        assert_eq!(id(10_000), "presence.joined:t1:alice:2");
        assert_eq!(id(10_000), id(14_999), "a retry or a return in the same window");
        assert_ne!(id(10_000), id(15_000));
        assert_ne!(
            presence_message_id("presence.left", "t1", "alice", 10_000, 5_000),
            id(10_000)
        );
        let long = presence_message_id("presence.left", &"t".repeat(200), "u", 1, 0);
        assert!(long.len() <= 255 && long.starts_with("presence.left:"), "{long}");
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
