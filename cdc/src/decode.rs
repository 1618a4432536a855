//! Decoding of the replication stream: the CopyData envelope (XLogData `w`, primary
//! keepalive `k`) and the pgoutput messages inside XLogData, protocol versions 1 and 2
//! (streaming of in-progress transactions).
//!
//! Pure functions over bytes: every malformed input is a [`DecodeError`], never a panic,
//! and nothing allocates more than the input can justify (counts from the wire are
//! checked against the bytes left). Values stay raw here; [`crate::value`] types them.

use bytes::{Buf, Bytes};

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended early.
    #[error("message truncated while reading {0}")]
    Truncated(&'static str),
    /// An unknown message or field tag.
    #[error("unknown {what} tag {tag:?}")]
    UnknownTag {
        /// Which kind of tag.
        what: &'static str,
        /// The byte.
        tag: u8,
    },
    /// A field holds an impossible value.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A message of the replication sub-protocol, inside CopyData.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        /// WAL position of the start of this data.
        wal_start: u64,
        /// The server's current end of WAL.
        wal_end: u64,
        /// Server time (µs since 2000-01-01).
        send_time: i64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A keepalive.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: u64,
        /// Server time.
        send_time: i64,
        /// The server wants a status update now (or it will time us out).
        reply_requested: bool,
    },
}

/// One column of a tuple, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// NULL.
    Null,
    /// An unchanged TOASTed value (not sent).
    UnchangedToast,
    /// Text format.
    Text(Bytes),
    /// Binary format (only with `binary 'true'`, which this client does not ask for).
    Binary(Bytes),
}

/// A column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags: 1 = part of the key.
    pub flags: u8,
    /// Name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
}

/// A pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutput {
    /// Start of a transaction.
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Commit time (µs since 2000-01-01).
        timestamp: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// Flags (unused).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End of the commit record.
        end_lsn: u64,
        /// Commit time.
        timestamp: i64,
    },
    /// Replication origin of the transaction.
    Origin {
        /// Commit LSN on the origin server.
        lsn: u64,
        /// Origin name.
        name: String,
    },
    /// A table's description.
    Relation {
        /// Streamed transaction, inside a stream block.
        xid: Option<u32>,
        /// OID.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Table name.
        name: String,
        /// Replica identity setting.
        replica_identity: u8,
        /// Columns.
        columns: Vec<RelationColumn>,
    },
    /// A non-built-in type's name.
    Type {
        /// Streamed transaction.
        xid: Option<u32>,
        /// OID.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Streamed transaction.
        xid: Option<u32>,
        /// Relation OID.
        relation: u32,
        /// The row.
        new: Vec<TupleValue>,
    },
    /// A changed row.
    Update {
        /// Streamed transaction.
        xid: Option<u32>,
        /// Relation OID.
        relation: u32,
        /// Old key (`K`) or old row (`O`), when sent.
        old: Option<(u8, Vec<TupleValue>)>,
        /// The new row.
        new: Vec<TupleValue>,
    },
    /// A removed row.
    Delete {
        /// Streamed transaction.
        xid: Option<u32>,
        /// Relation OID.
        relation: u32,
        /// `K` (key) or `O` (whole old row).
        kind: u8,
        /// The old values.
        old: Vec<TupleValue>,
    },
    /// Tables truncated.
    Truncate {
        /// Streamed transaction.
        xid: Option<u32>,
        /// Options: 1 CASCADE, 2 RESTART IDENTITY.
        options: u8,
        /// Relation OIDs.
        relations: Vec<u32>,
    },
    /// A logical decoding message (pg_logical_emit_message).
    Message {
        /// Streamed transaction.
        xid: Option<u32>,
        /// Part of a transaction (else sent at once).
        transactional: bool,
        /// Its LSN.
        lsn: u64,
        /// Prefix.
        prefix: String,
        /// Content.
        content: Bytes,
    },
    /// A block of a streamed in-progress transaction starts.
    StreamStart {
        /// Top-level transaction.
        xid: u32,
        /// First block of this transaction.
        first: bool,
    },
    /// The block ends.
    StreamStop,
    /// A streamed transaction committed.
    StreamCommit {
        /// Top-level transaction.
        xid: u32,
        /// Flags (unused).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End of the commit record.
        end_lsn: u64,
        /// Commit time.
        timestamp: i64,
    },
    /// A streamed transaction, or one of its subtransactions, aborted.
    StreamAbort {
        /// Top-level transaction.
        xid: u32,
        /// The aborted (sub)transaction; equal to `xid` when the whole one aborted.
        subxid: u32,
    },
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_i16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = String::from_utf8(self.buf[..end].to_vec()).map_err(|_| DecodeError::Invalid(what))?;
        self.buf.advance(end + 1);
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16("tuple column count")?;
        if n < 0 {
            return Err(DecodeError::Invalid("tuple column count"));
        }
        // Each column takes at least one byte: never reserve more than that allows.
        let mut cols = Vec::with_capacity((n as usize).min(self.buf.remaining()));
        for _ in 0..n {
            let v = match self.u8("tuple column kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = self.i32("text value length")?;
                    if len < 0 {
                        return Err(DecodeError::Invalid("text value length"));
                    }
                    TupleValue::Text(self.bytes(len as usize, "text value")?)
                }
                b'b' => {
                    let len = self.i32("binary value length")?;
                    if len < 0 {
                        return Err(DecodeError::Invalid("binary value length"));
                    }
                    TupleValue::Binary(self.bytes(len as usize, "binary value")?)
                }
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "tuple column",
                        tag,
                    });
                }
            };
            cols.push(v);
        }
        Ok(cols)
    }
    fn xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            Ok(Some(self.u32("xid")?))
        } else {
            Ok(None)
        }
    }
}

/// Parses a CopyData payload of the replication stream.
pub fn parse_copy(payload: Bytes) -> Result<ReplMessage, DecodeError> {
    let mut r = Reader { buf: payload };
    match r.u8("message tag")? {
        b'w' => Ok(ReplMessage::XLogData {
            wal_start: r.u64("XLogData start")?,
            wal_end: r.u64("XLogData end")?,
            send_time: r.i64("XLogData time")?,
            data: r.buf,
        }),
        b'k' => Ok(ReplMessage::Keepalive {
            wal_end: r.u64("keepalive end")?,
            send_time: r.i64("keepalive time")?,
            reply_requested: r.u8("keepalive reply flag")? != 0,
        }),
        tag => Err(DecodeError::UnknownTag {
            what: "replication message",
            tag,
        }),
    }
}

/// Parses one pgoutput message. `in_stream` says whether it arrived between Stream Start
/// and Stream Stop, where data messages carry their transaction id.
pub fn parse_pgoutput(data: Bytes, in_stream: bool) -> Result<PgOutput, DecodeError> {
    let mut r = Reader { buf: data };
    let tag = r.u8("pgoutput tag")?;
    let msg = match tag {
        b'B' => PgOutput::Begin {
            final_lsn: r.u64("Begin LSN")?,
            timestamp: r.i64("Begin time")?,
            xid: r.u32("Begin xid")?,
        },
        b'C' => PgOutput::Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.u64("Commit LSN")?,
            end_lsn: r.u64("Commit end LSN")?,
            timestamp: r.i64("Commit time")?,
        },
        b'O' => PgOutput::Origin {
            lsn: r.u64("Origin LSN")?,
            name: r.cstr("Origin name")?,
        },
        b'R' => {
            let xid = r.xid(in_stream)?;
            let oid = r.u32("Relation OID")?;
            let namespace = r.cstr("Relation namespace")?;
            let name = r.cstr("Relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("Relation column count")?;
            if n < 0 {
                return Err(DecodeError::Invalid("Relation column count"));
            }
            let mut columns = Vec::with_capacity((n as usize).min(r.buf.remaining() / 10));
            for _ in 0..n {
                columns.push(RelationColumn {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_mod: r.i32("column type modifier")?,
                });
            }
            PgOutput::Relation {
                xid,
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => PgOutput::Type {
            xid: r.xid(in_stream)?,
            oid: r.u32("Type OID")?,
            namespace: r.cstr("Type namespace")?,
            name: r.cstr("Type name")?,
        },
        b'I' => {
            let xid = r.xid(in_stream)?;
            let relation = r.u32("Insert relation")?;
            match r.u8("Insert tuple tag")? {
                b'N' => {}
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "Insert tuple",
                        tag,
                    });
                }
            }
            PgOutput::Insert {
                xid,
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let xid = r.xid(in_stream)?;
            let relation = r.u32("Update relation")?;
            let mut old = None;
            let new = loop {
                match r.u8("Update tuple tag")? {
                    t @ (b'K' | b'O') if old.is_none() => old = Some((t, r.tuple()?)),
                    b'N' => break r.tuple()?,
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            what: "Update tuple",
                            tag,
                        });
                    }
                }
            };
            PgOutput::Update {
                xid,
                relation,
                old,
                new,
            }
        }
        b'D' => {
            let xid = r.xid(in_stream)?;
            let relation = r.u32("Delete relation")?;
            let kind = match r.u8("Delete tuple tag")? {
                t @ (b'K' | b'O') => t,
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "Delete tuple",
                        tag,
                    });
                }
            };
            PgOutput::Delete {
                xid,
                relation,
                kind,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let xid = r.xid(in_stream)?;
            let n = r.i32("Truncate relation count")?;
            if n < 0 {
                return Err(DecodeError::Invalid("Truncate relation count"));
            }
            let options = r.u8("Truncate options")?;
            let mut relations = Vec::with_capacity((n as usize).min(r.buf.remaining() / 4));
            for _ in 0..n {
                relations.push(r.u32("Truncate relation")?);
            }
            PgOutput::Truncate {
                xid,
                options,
                relations,
            }
        }
        b'M' => {
            let xid = r.xid(in_stream)?;
            let transactional = r.u8("Message flags")? & 1 == 1;
            let lsn = r.u64("Message LSN")?;
            let prefix = r.cstr("Message prefix")?;
            let len = r.i32("Message length")?;
            if len < 0 {
                return Err(DecodeError::Invalid("Message length"));
            }
            PgOutput::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content: r.bytes(len as usize, "Message content")?,
            }
        }
        b'S' => PgOutput::StreamStart {
            xid: r.u32("Stream Start xid")?,
            first: r.u8("Stream Start flag")? == 1,
        },
        b'E' => PgOutput::StreamStop,
        b'c' => PgOutput::StreamCommit {
            xid: r.u32("Stream Commit xid")?,
            flags: r.u8("Stream Commit flags")?,
            commit_lsn: r.u64("Stream Commit LSN")?,
            end_lsn: r.u64("Stream Commit end LSN")?,
            timestamp: r.i64("Stream Commit time")?,
        },
        b'A' => PgOutput::StreamAbort {
            xid: r.u32("Stream Abort xid")?,
            subxid: r.u32("Stream Abort subxid")?,
        },
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "pgoutput message",
                tag,
            });
        }
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    fn insert_bytes(in_stream: bool) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        if in_stream {
            b.put_u32(77);
        }
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_i16(3);
        b.put_u8(b't');
        b.put_i32(2);
        b.put_slice(b"42");
        b.put_u8(b'n');
        b.put_u8(b'u');
        b.freeze()
    }

    #[test]
    fn insert_with_null_and_unchanged_toast() {
        let msg = parse_pgoutput(insert_bytes(false), false).unwrap();
        assert_eq!(
            msg,
            PgOutput::Insert {
                xid: None,
                relation: 16384,
                new: vec![
                    TupleValue::Text(Bytes::from_static(b"42")),
                    TupleValue::Null,
                    TupleValue::UnchangedToast
                ]
            }
        );
        match parse_pgoutput(insert_bytes(true), true).unwrap() {
            PgOutput::Insert { xid, .. } => assert_eq!(xid, Some(77)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error() {
        let full = insert_bytes(false);
        for n in 0..full.len() {
            assert!(
                parse_pgoutput(full.slice(..n), false).is_err(),
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn update_with_old_key_and_keepalive() {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(1);
        b.put_u8(b'K');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(1);
        b.put_u8(b'7');
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b'n');
        match parse_pgoutput(b.freeze(), false).unwrap() {
            PgOutput::Update {
                old: Some((b'K', old)),
                new,
                ..
            } => {
                assert_eq!(old, vec![TupleValue::Text(Bytes::from_static(b"7"))]);
                assert_eq!(new, vec![TupleValue::Null]);
            }
            other => panic!("{other:?}"),
        }
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x10);
        k.put_i64(5);
        k.put_u8(1);
        assert_eq!(
            parse_copy(k.freeze()).unwrap(),
            ReplMessage::Keepalive {
                wal_end: 0x10,
                send_time: 5,
                reply_requested: true
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256), in_stream: bool) {
            let _ = parse_pgoutput(Bytes::from(data.clone()), in_stream);
            let _ = parse_copy(Bytes::from(data));
        }

        #[test]
        fn arbitrary_bodies_after_each_tag_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTMSEcAwk".to_vec()),
            body in proptest::collection::vec(any::<u8>(), 0..128),
            in_stream: bool,
        ) {
            let mut data = vec![tag];
            data.extend(body);
            let _ = parse_pgoutput(Bytes::from(data.clone()), in_stream);
            let _ = parse_copy(Bytes::from(data));
        }
    }
}
