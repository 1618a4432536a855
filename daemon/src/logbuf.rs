//! The log ring buffer behind the console's Logs screen.
//!
//! A `tracing` layer that keeps the most recent events (level, target, message, fields)
//! in memory and counts warnings and errors by kind (level, target and message), so an
//! operator sees what is going wrong without access to journald.
//!
//! It owns only a bounded copy of what was logged: it never writes anywhere, never
//! blocks (a std mutex held for a push), and forgets the oldest events when full. The
//! number of kinds is bounded too, so a message with unbounded variety cannot grow it.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;

use pulse_shared::admin::{ErrorGroup, LogEntry, LogLevel, LogsPage};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Events kept.
pub const CAPACITY: usize = 2_000;
/// Error kinds counted; further kinds are counted under one overflow kind.
pub const MAX_KINDS: usize = 256;
/// Longest field value kept, in bytes; longer ones are cut.
const MAX_VALUE: usize = 512;

/// Recent events and error counts.
#[derive(Debug, Default)]
pub struct LogBuffer {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    events: VecDeque<LogEntry>,
    /// By (level, kind).
    kinds: HashMap<(LogLevel, String), ErrorGroup>,
}

impl LogBuffer {
    /// Records one event.
    pub fn push(
        &self,
        at_ms: i64,
        level: LogLevel,
        target: &str,
        message: String,
        fields: Vec<(String, String)>,
    ) {
        let mut inner = self.inner.lock().expect("log buffer lock");
        inner.next_seq += 1;
        let seq = inner.next_seq;
        if level >= LogLevel::Warn {
            let mut kind = format!("{target}: {message}");
            if !inner.kinds.contains_key(&(level, kind.clone())) && inner.kinds.len() >= MAX_KINDS {
                kind = "(other kinds)".to_string();
            }
            let last_fields = fields
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            let group = inner
                .kinds
                .entry((level, kind.clone()))
                .or_insert_with(|| ErrorGroup {
                    level,
                    kind,
                    count: 0,
                    last_at_ms: at_ms,
                    last_fields: String::new(),
                });
            group.count += 1;
            group.last_at_ms = at_ms;
            group.last_fields = last_fields;
        }
        if inner.events.len() == CAPACITY {
            inner.events.pop_front();
        }
        inner.events.push_back(LogEntry {
            seq,
            at_ms,
            level,
            target: target.to_string(),
            message,
            fields,
        });
    }

    /// Events after `after` (at most `limit`, the newest), and every error kind.
    pub fn page(&self, after: u64, limit: usize) -> LogsPage {
        let inner = self.inner.lock().expect("log buffer lock");
        let newer: Vec<&LogEntry> = inner.events.iter().filter(|e| e.seq > after).collect();
        let skip = newer.len().saturating_sub(limit);
        let entries: Vec<LogEntry> = newer[skip..].iter().map(|e| (*e).clone()).collect();
        // What the reader missed: events it never saw that are no longer kept, plus
        // those cut by its limit.
        let oldest_kept = inner.events.front().map(|e| e.seq).unwrap_or(inner.next_seq + 1);
        let lost = oldest_kept.saturating_sub(after + 1);
        let dropped = if after == 0 { 0 } else { lost } + skip as u64;
        let mut errors: Vec<ErrorGroup> = inner.kinds.values().cloned().collect();
        errors.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
        LogsPage {
            entries,
            errors,
            dropped,
        }
    }
}

/// The `tracing` layer feeding a [`LogBuffer`].
pub struct LogLayer(pub std::sync::Arc<LogBuffer>);

impl<S: Subscriber> tracing_subscriber::Layer<S> for LogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            Level::DEBUG => LogLevel::Debug,
            Level::TRACE => LogLevel::Trace,
        };
        let mut visitor = Collect::default();
        event.record(&mut visitor);
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.0
            .push(at_ms, level, meta.target(), visitor.message, visitor.fields);
    }
}

#[derive(Default)]
struct Collect {
    message: String,
    fields: Vec<(String, String)>,
}

impl Collect {
    fn put(&mut self, field: &Field, mut value: String) {
        if value.len() > MAX_VALUE {
            let mut cut = MAX_VALUE;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push((field.name().to_string(), value));
        }
    }
}

impl Visit for Collect {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.put(field, s);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn keeps_events_with_fields_and_counts_errors_by_kind() {
        let buf = Arc::new(LogBuffer::default());
        let subscriber = tracing_subscriber::registry().with(LogLayer(buf.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(port = 80, "listening");
            for attempt in 0..3 {
                tracing::error!(attempt, error = %"refused", "broker connection failed");
            }
            tracing::warn!("slow client");
        });
        let page = buf.page(0, 100);
        assert_eq!(page.entries.len(), 5);
        assert_eq!(page.entries[0].message, "listening");
        assert_eq!(page.entries[0].level, LogLevel::Info);
        assert_eq!(
            page.entries[0].fields,
            vec![("port".to_string(), "80".to_string())]
        );
        assert_eq!(page.errors.len(), 2);
        assert_eq!(page.errors[0].count, 3);
        assert!(
            page.errors[0].kind.ends_with("broker connection failed"),
            "{:?}",
            page.errors[0]
        );
        assert_eq!(page.errors[0].last_fields, "attempt=2 error=refused");
        assert_eq!(page.errors[1].level, LogLevel::Warn);
        // Paging: only newer events.
        let newer = buf.page(page.entries[3].seq, 100);
        assert_eq!(newer.entries.len(), 1);
        assert_eq!(newer.dropped, 0);
    }

    #[test]
    fn forgets_the_oldest_and_says_how_many_were_missed() {
        let buf = LogBuffer::default();
        for i in 0..CAPACITY + 10 {
            buf.push(0, LogLevel::Info, "t", format!("m{i}"), vec![]);
        }
        let all = buf.page(0, usize::MAX);
        assert_eq!(all.entries.len(), CAPACITY);
        assert_eq!(all.entries[0].message, "m10");
        // A reader that had seen up to seq 5 missed 6..=10.
        assert_eq!(buf.page(5, usize::MAX).dropped, 5);
        // A limit keeps the newest.
        let last = buf.page(0, 3);
        assert_eq!(last.entries.last().unwrap().message, format!("m{}", CAPACITY + 9));
        assert_eq!(last.entries.len(), 3);
    }

    #[test]
    fn kinds_are_bounded() {
        let buf = LogBuffer::default();
        for i in 0..MAX_KINDS + 50 {
            buf.push(0, LogLevel::Error, "t", format!("unique {i}"), vec![]);
        }
        let page = buf.page(0, 1);
        assert!(page.errors.len() <= MAX_KINDS + 1);
        let other = page.errors.iter().find(|g| g.kind == "(other kinds)").unwrap();
        assert_eq!(other.count, 50);
    }
}
