//! From pgoutput messages to committed [`Transaction`]s.
//!
//! Owns the relation cache (replaced whenever a Relation message arrives, as after an
//! ALTER TABLE), the type cache, the transaction being received, and one buffer per
//! streamed in-progress transaction (protocol v2). Streamed changes are typed as they
//! arrive, tagged with their subtransaction so that a subtransaction abort drops exactly
//! its changes, and handed over only at Stream Commit; an abort drops the buffer.
//!
//! Relation messages inside a stream block describe the table for that transaction only
//! (pgoutput tracks "schema sent" per streamed transaction), so they go to the stream's
//! own overlay, never to the shared cache.
//!
//! Pure and synchronous: the reader resolves unknown types in the catalog before it
//! hands a Relation message here.

use std::collections::HashMap;
use std::sync::Arc;

use crate::decode::{DecodeError, PgOutput, RelationColumn, TupleValue};
use crate::model::{Change, ChangeKind, Column, LogicalMessage, Lsn, Relation, Row, Transaction, Value};
use crate::value::{Kind, TypeCache, parse};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A PostgreSQL timestamp (µs since 2000-01-01) as UTC.
pub fn pg_time(micros: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS)).unwrap_or_default()
}

/// A relation with how to parse each column.
#[derive(Debug, Clone)]
struct RelEntry {
    rel: Arc<Relation>,
    kinds: Vec<Kind>,
}

#[derive(Debug)]
struct Building {
    xid: u32,
    commit_lsn: u64,
    changes: Vec<Change>,
    messages: Vec<LogicalMessage>,
}

#[derive(Debug, Default)]
struct StreamBuf {
    changes: Vec<Change>,
    /// Runs of changes by (sub)transaction: (xid, index of the first change of the run).
    runs: Vec<(u32, usize)>,
    messages: Vec<(u32, LogicalMessage)>,
    overlay: HashMap<u32, RelEntry>,
}

impl StreamBuf {
    fn push(&mut self, xid: u32, change: Change) {
        if self.runs.last().is_none_or(|r| r.0 != xid) {
            self.runs.push((xid, self.changes.len()));
        }
        self.changes.push(change);
    }

    /// Drops the changes of one subtransaction.
    fn abort_sub(&mut self, subxid: u32) {
        if !self.runs.iter().any(|r| r.0 == subxid) {
            self.messages.retain(|m| m.0 != subxid);
            return;
        }
        let old = std::mem::take(&mut self.changes);
        let runs = std::mem::take(&mut self.runs);
        let ends: Vec<usize> = runs.iter().skip(1).map(|r| r.1).chain([old.len()]).collect();
        let mut iter = old.into_iter();
        let mut at = 0;
        for ((xid, _), end) in runs.into_iter().zip(ends) {
            let run: Vec<Change> = iter.by_ref().take(end - at).collect();
            at = end;
            if xid != subxid {
                for c in run {
                    self.push(xid, c);
                }
            }
        }
        self.messages.retain(|m| m.0 != subxid);
    }
}

/// Assembles transactions. One per replication session: a new session starts empty
/// (the server sends every Relation again).
#[derive(Debug, Default)]
pub struct Assembler {
    relations: HashMap<u32, RelEntry>,
    /// Types, shared with the reader, which fills in what the catalog says.
    pub types: TypeCache,
    /// Names of types from Type messages: the fallback when the catalog cannot say.
    type_names: HashMap<u32, String>,
    current: Option<Building>,
    streams: HashMap<u32, StreamBuf>,
    in_stream: Option<u32>,
}

/// What one message produced.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Nothing to hand over yet.
    None,
    /// A committed transaction.
    Commit(Transaction),
    /// A non-transactional logical decoding message.
    Message(LogicalMessage),
}

impl Assembler {
    /// Whether the next message is inside a stream block (its data messages carry an xid).
    pub fn in_stream(&self) -> bool {
        self.in_stream.is_some()
    }

    /// Whether a transaction is partly received (open, or streamed and not yet ended):
    /// while one is, the position after it must not be confirmed on keepalives.
    pub fn busy(&self) -> bool {
        self.current.is_some() || !self.streams.is_empty()
    }

    /// Changes buffered for streamed transactions, for metrics.
    pub fn streamed_changes(&self) -> usize {
        self.streams.values().map(|s| s.changes.len()).sum()
    }

    /// The name a Type message gave `oid`, if any.
    pub fn type_name(&self, oid: u32) -> Option<&str> {
        self.type_names.get(&oid).map(String::as_str)
    }

    /// Type OIDs of a Relation message that the cache does not know.
    pub fn unknown_types(&self, columns: &[RelationColumn]) -> Vec<u32> {
        let mut v: Vec<u32> = columns
            .iter()
            .map(|c| c.type_oid)
            .filter(|oid| !self.types.is_known(*oid))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Handles one message.
    pub fn handle(&mut self, msg: PgOutput) -> Result<Output, DecodeError> {
        match msg {
            PgOutput::Begin { final_lsn, xid, .. } => {
                if self.current.is_some() || self.in_stream.is_some() {
                    return Err(DecodeError::Invalid("Begin inside a transaction"));
                }
                self.current = Some(Building {
                    xid,
                    commit_lsn: final_lsn,
                    changes: Vec::new(),
                    messages: Vec::new(),
                });
            }
            PgOutput::Commit {
                commit_lsn,
                end_lsn,
                timestamp,
                ..
            } => {
                let b = self
                    .current
                    .take()
                    .ok_or(DecodeError::Invalid("Commit without Begin"))?;
                if b.commit_lsn != commit_lsn {
                    return Err(DecodeError::Invalid("Commit LSN differs from Begin's"));
                }
                return Ok(Output::Commit(Transaction {
                    xid: b.xid,
                    commit_lsn: Lsn(commit_lsn),
                    end_lsn: Lsn(end_lsn),
                    commit_time: pg_time(timestamp),
                    changes: b.changes,
                    messages: b.messages,
                }));
            }
            PgOutput::Origin { .. } => {}
            PgOutput::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
                ..
            } => {
                let entry = self.relation_entry(oid, namespace, name, replica_identity, &columns);
                match self.in_stream {
                    Some(top) => {
                        self.streams.entry(top).or_default().overlay.insert(oid, entry);
                    }
                    None => {
                        self.relations.insert(oid, entry);
                    }
                }
            }
            PgOutput::Type {
                oid, namespace, name, ..
            } => {
                // Names only; the reader asks the catalog what a type is (a domain's base,
                // an array's element) when a Relation uses it. The name is the fallback
                // when the catalog cannot say.
                self.type_names.insert(oid, format!("{namespace}.{name}"));
            }
            PgOutput::Insert { xid, relation, new } => {
                let rel = self.lookup(relation)?;
                let new = row(&rel, new)?;
                self.push(xid, rel.rel, ChangeKind::Insert { new })?;
            }
            PgOutput::Update {
                xid,
                relation,
                old,
                new,
            } => {
                let rel = self.lookup(relation)?;
                let old = old.map(|(_, t)| row(&rel, t)).transpose()?;
                let new = row(&rel, new)?;
                self.push(xid, rel.rel, ChangeKind::Update { old, new })?;
            }
            PgOutput::Delete {
                xid, relation, old, ..
            } => {
                let rel = self.lookup(relation)?;
                let old = row(&rel, old)?;
                self.push(xid, rel.rel, ChangeKind::Delete { old })?;
            }
            PgOutput::Truncate { xid, relations, .. } => {
                for oid in relations {
                    let rel = self.lookup(oid)?;
                    self.push(xid, rel.rel, ChangeKind::Truncate)?;
                }
            }
            PgOutput::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            } => {
                let m = LogicalMessage {
                    lsn: Lsn(lsn),
                    prefix,
                    content: content.to_vec(),
                    transactional,
                };
                if !transactional {
                    return Ok(Output::Message(m));
                }
                match (self.in_stream, &mut self.current) {
                    (Some(top), _) => {
                        let sub = xid.unwrap_or(top);
                        self.streams.entry(top).or_default().messages.push((sub, m));
                    }
                    (None, Some(b)) => b.messages.push(m),
                    (None, None) => {
                        return Err(DecodeError::Invalid(
                            "transactional Message outside a transaction",
                        ));
                    }
                }
            }
            PgOutput::StreamStart { xid, .. } => {
                if self.in_stream.is_some() || self.current.is_some() {
                    return Err(DecodeError::Invalid("Stream Start inside a transaction"));
                }
                self.in_stream = Some(xid);
                self.streams.entry(xid).or_default();
            }
            PgOutput::StreamStop => {
                if self.in_stream.take().is_none() {
                    return Err(DecodeError::Invalid("Stream Stop outside a stream"));
                }
            }
            PgOutput::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                timestamp,
                ..
            } => {
                if self.in_stream.is_some() {
                    return Err(DecodeError::Invalid("Stream Commit inside a stream block"));
                }
                let buf = self.streams.remove(&xid).unwrap_or_default();
                return Ok(Output::Commit(Transaction {
                    xid,
                    commit_lsn: Lsn(commit_lsn),
                    end_lsn: Lsn(end_lsn),
                    commit_time: pg_time(timestamp),
                    changes: buf.changes,
                    messages: buf.messages.into_iter().map(|m| m.1).collect(),
                }));
            }
            PgOutput::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    self.streams.remove(&xid);
                } else if let Some(buf) = self.streams.get_mut(&xid) {
                    buf.abort_sub(subxid);
                }
            }
        }
        Ok(Output::None)
    }

    fn relation_entry(
        &self,
        oid: u32,
        schema: String,
        name: String,
        replica_identity: u8,
        columns: &[RelationColumn],
    ) -> RelEntry {
        let mut kinds = Vec::with_capacity(columns.len());
        let columns = columns
            .iter()
            .map(|c| {
                let info = self.types.get(c.type_oid);
                kinds.push(info.kind);
                Column {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_name: info.name,
                    key: c.flags & 1 == 1,
                }
            })
            .collect();
        RelEntry {
            rel: Arc::new(Relation {
                oid,
                schema,
                name,
                replica_identity: replica_identity as char,
                columns,
            }),
            kinds,
        }
    }

    fn lookup(&self, oid: u32) -> Result<RelEntry, DecodeError> {
        self.in_stream
            .and_then(|top| self.streams.get(&top))
            .and_then(|s| s.overlay.get(&oid))
            .or_else(|| self.relations.get(&oid))
            .cloned()
            .ok_or(DecodeError::Invalid("change for a relation never described"))
    }

    fn push(
        &mut self,
        xid: Option<u32>,
        relation: Arc<Relation>,
        kind: ChangeKind,
    ) -> Result<(), DecodeError> {
        let change = Change { relation, kind };
        match (self.in_stream, &mut self.current) {
            (Some(top), _) => {
                self.streams
                    .entry(top)
                    .or_default()
                    .push(xid.unwrap_or(top), change);
            }
            (None, Some(b)) => b.changes.push(change),
            (None, None) => return Err(DecodeError::Invalid("change outside a transaction")),
        }
        Ok(())
    }
}

fn row(rel: &RelEntry, tuple: Vec<TupleValue>) -> Result<Row, DecodeError> {
    if tuple.len() != rel.kinds.len() {
        return Err(DecodeError::Invalid(
            "tuple column count differs from the relation's",
        ));
    }
    Ok(tuple
        .into_iter()
        .zip(&rel.kinds)
        .map(|(v, kind)| match v {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => Value::UnchangedToast,
            TupleValue::Binary(b) => Value::Bytes(b.to_vec()),
            TupleValue::Text(b) => match std::str::from_utf8(&b) {
                Ok(s) => parse(kind, s),
                Err(_) => Value::Text(String::from_utf8_lossy(&b).into_owned()),
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rel(oid: u32, cols: &[(&str, u32)]) -> PgOutput {
        PgOutput::Relation {
            xid: None,
            oid,
            namespace: "public".into(),
            name: format!("t{oid}"),
            replica_identity: b'd',
            columns: cols
                .iter()
                .enumerate()
                .map(|(i, (n, t))| RelationColumn {
                    flags: (i == 0) as u8,
                    name: n.to_string(),
                    type_oid: *t,
                    type_mod: -1,
                })
                .collect(),
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn insert(xid: Option<u32>, v: &str) -> PgOutput {
        PgOutput::Insert {
            xid,
            relation: 1,
            new: vec![text(v)],
        }
    }

    fn commit(out: Output) -> Transaction {
        match out {
            Output::Commit(t) => t,
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    fn ints(t: &Transaction) -> Vec<i64> {
        t.changes
            .iter()
            .map(|c| match &c.kind {
                ChangeKind::Insert { new } => match new[0] {
                    Value::Int(i) => i,
                    ref v => panic!("{v:?}"),
                },
                k => panic!("{k:?}"),
            })
            .collect()
    }

    #[test]
    fn a_plain_transaction_and_a_relation_change() {
        let mut a = Assembler::default();
        a.handle(rel(1, &[("id", 23)])).unwrap();
        a.handle(PgOutput::Begin {
            final_lsn: 100,
            timestamp: 0,
            xid: 5,
        })
        .unwrap();
        assert!(a.busy());
        a.handle(insert(None, "1")).unwrap();
        // ALTER TABLE: a new Relation with another column, matched by name downstream.
        a.handle(rel(1, &[("id", 23), ("note", 25)])).unwrap();
        a.handle(PgOutput::Insert {
            xid: None,
            relation: 1,
            new: vec![text("2"), TupleValue::UnchangedToast],
        })
        .unwrap();
        let t = commit(
            a.handle(PgOutput::Commit {
                flags: 0,
                commit_lsn: 100,
                end_lsn: 120,
                timestamp: 0,
            })
            .unwrap(),
        );
        assert!(!a.busy());
        assert_eq!(t.end_lsn, Lsn(120));
        assert_eq!(t.changes[0].relation.columns.len(), 1);
        assert_eq!(t.changes[1].relation.column("note"), Some(1));
        assert_eq!(
            t.changes[1].kind,
            ChangeKind::Insert {
                new: vec![Value::Int(2), Value::UnchangedToast]
            }
        );
        assert_eq!(t.commit_time, pg_time(0));
        assert_eq!(pg_time(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
    }

    #[test]
    fn streamed_transactions_interleave_and_subtransactions_abort() {
        let mut a = Assembler::default();
        a.handle(rel(1, &[("id", 20)])).unwrap();
        let block = |a: &mut Assembler, top: u32, items: &[(u32, &str)]| {
            a.handle(PgOutput::StreamStart {
                xid: top,
                first: false,
            })
            .unwrap();
            assert!(a.in_stream());
            for (x, v) in items {
                a.handle(insert(Some(*x), v)).unwrap();
            }
            a.handle(PgOutput::StreamStop).unwrap();
        };
        block(&mut a, 10, &[(10, "1"), (11, "2"), (11, "3")]);
        block(&mut a, 20, &[(20, "100")]);
        block(&mut a, 10, &[(12, "4"), (10, "5"), (11, "6")]);
        // A plain transaction may commit between stream blocks.
        a.handle(PgOutput::Begin {
            final_lsn: 50,
            timestamp: 0,
            xid: 30,
        })
        .unwrap();
        a.handle(insert(None, "7")).unwrap();
        assert_eq!(
            ints(&commit(
                a.handle(PgOutput::Commit {
                    flags: 0,
                    commit_lsn: 50,
                    end_lsn: 60,
                    timestamp: 0
                })
                .unwrap()
            )),
            vec![7]
        );
        a.handle(PgOutput::StreamAbort { xid: 10, subxid: 11 }).unwrap();
        a.handle(PgOutput::StreamAbort { xid: 20, subxid: 20 }).unwrap();
        assert!(a.busy());
        let t = commit(
            a.handle(PgOutput::StreamCommit {
                xid: 10,
                flags: 0,
                commit_lsn: 200,
                end_lsn: 210,
                timestamp: 0,
            })
            .unwrap(),
        );
        assert_eq!(ints(&t), vec![1, 4, 5]);
        assert!(!a.busy(), "the aborted stream left nothing behind");
    }

    #[test]
    fn stream_relations_stay_private_to_their_transaction() {
        let mut a = Assembler::default();
        a.handle(rel(1, &[("id", 20)])).unwrap();
        a.handle(PgOutput::StreamStart { xid: 9, first: true }).unwrap();
        a.handle(rel(1, &[("id", 25)])).unwrap();
        a.handle(insert(Some(9), "x")).unwrap();
        a.handle(PgOutput::StreamStop).unwrap();
        a.handle(PgOutput::Begin {
            final_lsn: 1,
            timestamp: 0,
            xid: 2,
        })
        .unwrap();
        a.handle(insert(None, "3")).unwrap();
        let t = commit(
            a.handle(PgOutput::Commit {
                flags: 0,
                commit_lsn: 1,
                end_lsn: 2,
                timestamp: 0,
            })
            .unwrap(),
        );
        assert_eq!(ints(&t), vec![3]);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut a = Assembler::default();
        assert!(a.handle(insert(None, "1")).is_err(), "unknown relation");
        a.handle(rel(1, &[("id", 20)])).unwrap();
        assert!(a.handle(insert(None, "1")).is_err(), "outside a transaction");
        assert!(
            a.handle(PgOutput::Commit {
                flags: 0,
                commit_lsn: 1,
                end_lsn: 2,
                timestamp: 0
            })
            .is_err()
        );
        assert!(a.handle(PgOutput::StreamStop).is_err());
        a.handle(PgOutput::Begin {
            final_lsn: 1,
            timestamp: 0,
            xid: 2,
        })
        .unwrap();
        assert!(
            a.handle(PgOutput::Insert {
                xid: None,
                relation: 1,
                new: vec![]
            })
            .is_err(),
            "column count"
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::decode::parse_pgoutput;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = Vec<u8>> {
        // A tag the decoder knows, a small body, and often a relation OID of 1 so that
        // changes find a relation and reach the typing and buffering code.
        (
            proptest::sample::select(b"BCORYIUDTMSEcA".to_vec()),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..48),
        )
            .prop_map(|(tag, rel1, body)| {
                let mut m = vec![tag];
                if rel1 && matches!(tag, b'I' | b'U' | b'D') {
                    m.extend([0, 0, 0, 1]);
                }
                m.extend(body);
                m
            })
    }

    /// Well-formed messages in any order: the state machine's side of the fuzzing.
    fn structured() -> impl Strategy<Value = PgOutput> {
        let xid = 1u32..4;
        prop_oneof![
            (0u64..4, xid.clone()).prop_map(|(l, xid)| PgOutput::Begin {
                final_lsn: l,
                timestamp: 0,
                xid
            }),
            (0u64..4).prop_map(|l| PgOutput::Commit {
                flags: 0,
                commit_lsn: l,
                end_lsn: l + 1,
                timestamp: 0
            }),
            (proptest::option::of(xid.clone()), ".{0,8}").prop_map(|(xid, v)| PgOutput::Insert {
                xid,
                relation: 1,
                new: vec![TupleValue::Text(Bytes::from(v))],
            }),
            (xid.clone(), any::<bool>()).prop_map(|(xid, first)| PgOutput::StreamStart { xid, first }),
            Just(PgOutput::StreamStop),
            (xid.clone(), 0u64..4).prop_map(|(xid, l)| PgOutput::StreamCommit {
                xid,
                flags: 0,
                commit_lsn: l,
                end_lsn: l + 1,
                timestamp: -1
            }),
            (xid.clone(), xid).prop_map(|(xid, subxid)| PgOutput::StreamAbort { xid, subxid }),
        ]
    }

    /// An assembler that knows relation 1, `public.t` with one key column `column`.
    fn knowing_one_relation(column: &str) -> Assembler {
        let mut a = Assembler::default();
        let _ = a.handle(PgOutput::Relation {
            xid: None,
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![RelationColumn {
                flags: 1,
                name: column.into(),
                type_oid: 1007,
                type_mod: -1,
            }],
        });
        a
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn well_formed_messages_in_any_order_never_panic(msgs in proptest::collection::vec(structured(), 0..60)) {
            let mut a = knowing_one_relation("v");
            for m in msgs {
                let _ = a.handle(m);
            }
        }

        /// Any sequence of messages: errors at worst, never a panic or a hang.
        #[test]
        fn arbitrary_message_sequences_never_panic(msgs in proptest::collection::vec(message(), 0..40)) {
            let mut a = knowing_one_relation("id");
            for m in msgs {
                if let Ok(msg) = parse_pgoutput(Bytes::from(m), a.in_stream()) {
                    let _ = a.handle(msg);
                }
            }
        }
    }
}
