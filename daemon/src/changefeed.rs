//! The data explorer's feed of the latest committed changes: a bounded ring of the most
//! recent changes from the replication stream, and a broadcast of each committed batch
//! to the consoles that watch it (`WatchChanges` over the admin socket).
//!
//! Fed by [`Recorded`], a wrapper around the stream's sink that records a batch only in
//! `committed`, after the state transaction that covers it: the feed never shows a
//! change the daemon has not made durable. It owns copies of the changes as text, cut to
//! [`VALUE_CHARS`] characters with secret-looking columns masked; it never blocks the
//! stream (a std mutex held only to copy, a broadcast that drops for slow watchers) and
//! formats at most [`RING`] changes per batch, however large the batch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use pulse_cdc::{Change, ChangeKind, Lsn, Transaction, Value};
use pulse_shared::admin::{AdminResponse, ChangeEvent};
use pulse_shared::protocol::ServerFrame;
use tokio::sync::broadcast;

use crate::replication::{ChangeSink, SinkError};

/// Changes the daemon keeps for the console.
pub const RING: usize = 1_000;
/// Longest value shown, in characters (longer ones end in `…`).
pub const VALUE_CHARS: usize = 60;
/// Most columns shown per change.
const MAX_COLUMNS: usize = 16;
/// Batches waiting for a slow watcher before it is told it missed some.
const BROADCAST: usize = 64;

/// Column names whose values are never shown.
const SECRET_HINTS: [&str; 8] = [
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "private_key",
    "hash",
    "salt",
];

/// The ring and the broadcast.
pub struct ChangeFeed {
    /// The latest changes, oldest first, and the next sequence number.
    ring: Mutex<(VecDeque<ChangeEvent>, u64)>,
    /// Each committed batch, to the watching sessions.
    tx: broadcast::Sender<Arc<Vec<ChangeEvent>>>,
    /// Primary key columns by source table (`schema.table`), from the schema file: with
    /// REPLICA IDENTITY FULL the stream marks every column as key.
    keys: HashMap<String, Vec<String>>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed::with_keys(HashMap::new())
    }
}

impl ChangeFeed {
    /// A feed that names rows of these tables by these key columns.
    pub fn with_keys(keys: HashMap<String, Vec<String>>) -> ChangeFeed {
        ChangeFeed {
            ring: Mutex::new((VecDeque::with_capacity(RING), 1)),
            tx: broadcast::channel(BROADCAST).0,
            keys,
        }
    }

    /// Records the changes of a committed batch (the last [`RING`] of them).
    pub fn record(&self, batch: &[Transaction]) {
        // Walk from the end so a huge batch costs at most RING formatted changes.
        let mut newest: Vec<(&Transaction, &Change)> = Vec::new();
        'outer: for t in batch.iter().rev() {
            for c in t.changes.iter().rev() {
                if newest.len() == RING {
                    break 'outer;
                }
                newest.push((t, c));
            }
        }
        if newest.is_empty() {
            return;
        }
        let mut events: Vec<ChangeEvent> = newest
            .into_iter()
            .rev()
            .map(|(t, c)| describe(t.commit_lsn, t.commit_time, t.xid, c, &self.keys))
            .collect();
        {
            let mut ring = self.ring.lock().expect("change feed lock");
            let (kept, next) = &mut *ring;
            for e in &mut events {
                e.seq = *next;
                *next += 1;
            }
            for e in &events {
                if kept.len() == RING {
                    kept.pop_front();
                }
                kept.push_back(e.clone());
            }
        }
        // No watcher is not an error.
        let _ = self.tx.send(Arc::new(events));
    }

    /// The kept changes after `after`, oldest first, and how many after it are gone.
    pub fn since(&self, after: u64) -> (Vec<ChangeEvent>, u64) {
        let ring = self.ring.lock().expect("change feed lock");
        let (kept, next) = &*ring;
        let first = kept.front().map_or(*next, |e| e.seq);
        let missed = if after > 0 && after + 1 < first {
            first - after - 1
        } else {
            0
        };
        (kept.iter().filter(|e| e.seq > after).cloned().collect(), missed)
    }

    /// A live view for one session, starting after `after`.
    pub fn watch(self: &Arc<Self>, id: String, after: u64) -> (Watch, AdminResponse) {
        // Subscribe before reading the ring, so nothing commits in between unseen.
        let rx = self.tx.subscribe();
        let (changes, missed) = self.since(after);
        let last = changes.last().map_or(after, |e| e.seq);
        let watch = Watch {
            id,
            feed: self.clone(),
            rx,
            last,
        };
        (watch, AdminResponse::Changes { changes, missed })
    }
}

/// One session's subscription to the feed.
pub struct Watch {
    /// The request id the pushes answer.
    id: String,
    /// For catching up after falling behind.
    feed: Arc<ChangeFeed>,
    /// Committed batches.
    rx: broadcast::Receiver<Arc<Vec<ChangeEvent>>>,
    /// Highest sequence number sent.
    last: u64,
}

impl Watch {
    /// The next frame to push; waits for a commit. Never returns when the feed is gone
    /// (the daemon is stopping and the session ends by itself).
    pub async fn next(&mut self) -> ServerFrame {
        loop {
            let (changes, missed) = match self.rx.recv().await {
                Ok(batch) => (
                    batch
                        .iter()
                        .filter(|e| e.seq > self.last)
                        .cloned()
                        .collect::<Vec<_>>(),
                    0,
                ),
                // Fell behind: take what the ring still holds, and say what is gone.
                Err(broadcast::error::RecvError::Lagged(_)) => self.feed.since(self.last),
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            };
            if changes.is_empty() && missed == 0 {
                continue;
            }
            if let Some(e) = changes.last() {
                self.last = e.seq;
            }
            return ServerFrame::Admin {
                id: self.id.clone(),
                response: Box::new(AdminResponse::Changes { changes, missed }),
            };
        }
    }
}

/// A sink that records every committed batch in a [`ChangeFeed`], then lets `inner`
/// publish it. Everything else is `inner`'s.
pub struct Recorded<S> {
    /// The real consumer.
    pub inner: S,
    /// Where committed changes are shown.
    pub feed: Arc<ChangeFeed>,
}

impl<S: ChangeSink> ChangeSink for Recorded<S> {
    async fn checkpoint(&mut self, state: &tokio_postgres::Client) -> Result<Option<Lsn>, SinkError> {
        self.inner.checkpoint(state).await
    }

    async fn load_snapshot(
        &mut self,
        source: &tokio_postgres::Transaction<'_>,
        state_tx: &tokio_postgres::Transaction<'_>,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        self.inner.load_snapshot(source, state_tx, lsn).await
    }

    async fn apply(
        &mut self,
        batch: &[Transaction],
        state_tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), SinkError> {
        self.inner.apply(batch, state_tx).await
    }

    fn live_tap(&self) -> crate::replication::LiveTap {
        self.inner.live_tap()
    }

    fn committed(&mut self, batch: &[Transaction]) {
        self.feed.record(batch);
        self.inner.committed(batch);
    }

    fn refresh_wanted(&self) -> bool {
        self.inner.refresh_wanted()
    }

    async fn refresh(
        &mut self,
        source: &tokio_postgres::Transaction<'_>,
        state_tx: &tokio_postgres::Transaction<'_>,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        self.inner.refresh(source, state_tx, lsn).await
    }

    async fn housekeeping(&mut self, state_tx: &tokio_postgres::Transaction<'_>) -> Result<bool, SinkError> {
        self.inner.housekeeping(state_tx).await
    }

    fn needs_snapshot(&self) -> bool {
        self.inner.needs_snapshot()
    }
}

/// Whether a column's values must not be shown.
pub fn is_secret(column: &str) -> bool {
    let c = column.to_ascii_lowercase();
    SECRET_HINTS.iter().any(|h| c.contains(h))
}

/// Cuts `text` to [`VALUE_CHARS`] characters.
pub fn cut(text: &str) -> String {
    match text.char_indices().nth(VALUE_CHARS) {
        None => text.to_string(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

/// A value as the console shows it.
fn shown(column: &str, v: &Value) -> String {
    if is_secret(column) && !matches!(v, Value::Null) {
        return "***".into();
    }
    match v {
        Value::Null => "NULL".into(),
        Value::UnchangedToast => "(unchanged)".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Numeric(s) | Value::Text(s) | Value::Interval(s) => cut(s),
        Value::Uuid(u) => u.to_string(),
        Value::Json(j) => cut(&j.to_string()),
        Value::Date(d) => d.to_string(),
        Value::Time(t) => t.to_string(),
        Value::Timestamp(t) => t.to_string(),
        Value::TimestampTz(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        Value::Bytes(b) => format!("<{} bytes>", b.len()),
        Value::Array(a) => format!("<array of {}>", a.len()),
    }
}

/// One change as text: key columns, then what changed.
fn describe(
    lsn: Lsn,
    at: chrono::DateTime<chrono::Utc>,
    xid: u32,
    c: &Change,
    keys: &HashMap<String, Vec<String>>,
) -> ChangeEvent {
    let rel = &c.relation;
    let table = format!("{}.{}", rel.schema, rel.name);
    // The primary key the schema file knows; else the replica identity, except that a
    // FULL identity (every column) names the row by its first column.
    let is_key = |i: usize| match keys.get(&table) {
        Some(k) => k.contains(&rel.columns[i].name),
        None if rel.replica_identity == 'f' => i == 0,
        None => rel.columns[i].key,
    };
    let (op, row, old): (&str, Option<&[Value]>, Option<&[Value]>) = match &c.kind {
        ChangeKind::Insert { new } => ("insert", Some(new), None),
        ChangeKind::Update { old, new } => ("update", Some(new), old.as_deref()),
        ChangeKind::Delete { old } => ("delete", Some(old), None),
        ChangeKind::Truncate => ("truncate", None, None),
    };
    let mut key = Vec::new();
    let mut columns = Vec::new();
    if let Some(row) = row {
        for (i, col) in rel.columns.iter().enumerate() {
            let Some(v) = row.get(i) else { continue };
            if is_key(i) {
                // A key the update did not send (unchanged) is in the old row.
                let v = match (v, old.and_then(|o| o.get(i))) {
                    (Value::UnchangedToast, Some(o)) => o,
                    _ => v,
                };
                key.push(format!("{}={}", col.name, shown(&col.name, v)));
                continue;
            }
            let changed = match (op, old.and_then(|o| o.get(i))) {
                ("delete", _) => false,
                ("update", Some(before)) => before != v && *v != Value::UnchangedToast,
                ("update", None) => *v != Value::UnchangedToast,
                _ => !matches!(v, Value::Null),
            };
            if changed && columns.len() < MAX_COLUMNS {
                columns.push((col.name.clone(), shown(&col.name, v)));
            }
        }
    }
    ChangeEvent {
        seq: 0,
        lsn: lsn.to_string(),
        commit_time: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        xid,
        table,
        op: op.into(),
        key: key.join(" "),
        columns,
    }
}

#[cfg(test)]
mod tests {
    use pulse_cdc::{Column, Relation};

    use super::*;

    fn relation() -> Arc<Relation> {
        let col = |name: &str, key: bool| Column {
            name: name.into(),
            type_oid: 25,
            type_name: "text".into(),
            key,
        };
        Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: "members".into(),
            replica_identity: 'f',
            columns: vec![
                col("id", true),
                col("status", false),
                col("password_hash", false),
                col("bio", false),
            ],
        })
    }

    fn tx(n: u64, changes: Vec<ChangeKind>) -> Transaction {
        let relation = relation();
        Transaction {
            xid: n as u32,
            commit_lsn: Lsn(n * 100 + 10),
            end_lsn: Lsn(n * 100 + 20),
            commit_time: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            changes: changes
                .into_iter()
                .map(|kind| Change {
                    relation: relation.clone(),
                    kind,
                })
                .collect(),
            messages: Vec::new(),
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn changes_show_key_and_changed_columns_with_secrets_masked_and_values_cut() {
        let feed = ChangeFeed::default();
        let long = "x".repeat(200);
        feed.record(&[tx(
            1,
            vec![
                ChangeKind::Insert {
                    new: vec![Value::Int(7), text("active"), text("s3cr3t"), text(&long)],
                },
                ChangeKind::Update {
                    old: Some(vec![Value::Int(7), text("active"), text("s3cr3t"), text(&long)]),
                    new: vec![Value::Int(7), text("gone"), text("s3cr3t"), Value::UnchangedToast],
                },
                ChangeKind::Delete {
                    old: vec![Value::Int(7), Value::Null, Value::Null, Value::Null],
                },
            ],
        )]);
        let (all, missed) = feed.since(0);
        assert_eq!(missed, 0);
        assert_eq!(all.len(), 3);
        let insert = &all[0];
        assert_eq!((insert.op.as_str(), insert.key.as_str()), ("insert", "id=7"));
        assert_eq!(insert.table, "public.members");
        assert_eq!(insert.lsn, "0/6E");
        assert_eq!(insert.xid, 1);
        assert_eq!(insert.commit_time, "2023-11-14T22:13:20.000Z");
        assert_eq!(insert.columns[0], ("status".into(), "active".into()));
        assert_eq!(insert.columns[1], ("password_hash".into(), "***".into()));
        assert_eq!(insert.columns[2].1.chars().count(), VALUE_CHARS + 1);
        assert!(insert.columns[2].1.ends_with('…'));
        // The update shows only what changed.
        assert_eq!(all[1].columns, vec![("status".to_string(), "gone".to_string())]);
        assert_eq!((all[2].op.as_str(), all[2].key.as_str()), ("delete", "id=7"));
        assert!(all[2].columns.is_empty());
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn the_ring_is_bounded_and_says_what_a_late_reader_missed() {
        let feed = ChangeFeed::default();
        let insert = |i: i64| ChangeKind::Insert {
            new: vec![Value::Int(i), text("a"), Value::Null, Value::Null],
        };
        // One huge batch: only the newest RING are formatted and kept.
        feed.record(&[tx(1, (0..(RING as i64 + 500)).map(insert).collect())]);
        let (all, _) = feed.since(0);
        assert_eq!(all.len(), RING);
        assert_eq!(all.last().unwrap().key, format!("id={}", RING + 499));
        for i in 0..20 {
            feed.record(&[tx(2 + i, vec![insert(-1)])]);
        }
        let (kept, _) = feed.since(0);
        assert_eq!(kept.len(), RING);
        let first = kept[0].seq;
        assert_eq!(first, 21);
        // A reader that last saw a change the ring no longer holds learns how many it lost.
        let (after, missed) = feed.since(first - 11);
        assert_eq!(missed, 10);
        assert_eq!(after.len(), RING);
        let (newer, missed) = feed.since(kept.last().unwrap().seq - 1);
        assert_eq!((newer.len(), missed), (1, 0));
    }

    #[tokio::test]
    async fn a_watch_gets_the_kept_changes_then_each_commit() {
        let feed = Arc::new(ChangeFeed::default());
        let insert = |i: i64| ChangeKind::Insert {
            new: vec![Value::Int(i), text("a"), Value::Null, Value::Null],
        };
        feed.record(&[tx(1, vec![insert(1)])]);
        let (mut watch, first) = feed.watch("w#1".into(), 0);
        let AdminResponse::Changes { changes, missed } = first else {
            panic!("{first:?}")
        };
        assert_eq!((changes.len(), missed), (1, 0));
        feed.record(&[tx(2, vec![insert(2), insert(3)])]);
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
            .await
            .unwrap();
        let ServerFrame::Admin { id, response } = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(id, "w#1");
        let AdminResponse::Changes { changes, .. } = *response else {
            panic!()
        };
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["id=2", "id=3"]);
    }

    #[test]
    fn rows_are_named_by_the_schema_files_key_when_every_column_is_identity() {
        let mut rel = (*relation()).clone();
        for c in &mut rel.columns {
            c.key = true;
        }
        let rel = Arc::new(rel);
        let change = Change {
            relation: rel,
            kind: ChangeKind::Insert {
                new: vec![Value::Int(9), text("active"), Value::Null, text("hi")],
            },
        };
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let by_schema = HashMap::from([("public.members".to_string(), vec!["id".to_string()])]);
        let e = describe(Lsn(1), at, 1, &change, &by_schema);
        assert_eq!(e.key, "id=9");
        assert_eq!(e.columns.len(), 2, "{:?}", e.columns);
        let e = describe(Lsn(1), at, 1, &change, &HashMap::new());
        assert_eq!(e.key, "id=9");
    }

    #[test]
    fn secret_columns_are_recognised() {
        assert!(is_secret("password"));
        assert!(is_secret("API_KEY"));
        assert!(is_secret("reset_token"));
        assert!(!is_secret("status"));
        assert_eq!(cut("short"), "short");
    }
}
