//! What the change stream delivers: committed transactions of typed rows.
//!
//! These are the types the state engine consumes. They are plain data: not `Serialize`
//! (the wire format belongs to the `shared` crate, converted at the edge).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A WAL position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN (X/X)"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("{s:?}: {e}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("{s:?}: {e}"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

/// A typed column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value the server did not send because it did not change. Never a NULL:
    /// the consumer keeps the value it had.
    UnchangedToast,
    /// bool.
    Bool(bool),
    /// int2, int4, int8.
    Int(i64),
    /// float4, float8.
    Float(f64),
    /// numeric, kept exact as its text.
    Numeric(String),
    /// text, varchar, char, enums, and any type without a better mapping.
    Text(String),
    /// uuid.
    Uuid(uuid::Uuid),
    /// json, jsonb.
    Json(serde_json::Value),
    /// date.
    Date(chrono::NaiveDate),
    /// time.
    Time(chrono::NaiveTime),
    /// timestamp without time zone.
    Timestamp(chrono::NaiveDateTime),
    /// timestamptz.
    TimestampTz(chrono::DateTime<chrono::Utc>),
    /// interval, as PostgreSQL prints it.
    Interval(String),
    /// bytea.
    Bytes(Vec<u8>),
    /// arrays of any of these.
    Array(Vec<Value>),
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type name as the catalog has it (after resolving domains to their base).
    pub type_name: String,
    /// Part of the replica identity (key).
    pub key: bool,
}

/// A table as the stream describes it; replaced when a new Relation message arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting: `d` default, `f` full, `i` index, `n` nothing.
    pub replica_identity: char,
    /// Columns in order.
    pub columns: Vec<Column>,
}

impl Relation {
    /// Index of a column by name (columns are matched by name, never by position, so
    /// that ALTER TABLE cannot shift meanings).
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// Values of one row, in the relation's column order.
pub type Row = Vec<Value>;

/// What happened to rows.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    /// A new row.
    Insert {
        /// The row.
        new: Row,
    },
    /// A changed row. `old` holds the old key (or the whole old row with REPLICA
    /// IDENTITY FULL) when the server sent it.
    Update {
        /// Old values, when sent.
        old: Option<Row>,
        /// New values; unchanged TOAST values are `Value::UnchangedToast`.
        new: Row,
    },
    /// A removed row: its key (or whole row with REPLICA IDENTITY FULL).
    Delete {
        /// Old values.
        old: Row,
    },
    /// The table was truncated.
    Truncate,
}

/// One change, with the relation as it was when the change was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The table.
    pub relation: Arc<Relation>,
    /// What happened.
    pub kind: ChangeKind,
}

/// A committed transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    /// Transaction id.
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once this is durable.
    pub end_lsn: Lsn,
    /// Commit time.
    pub commit_time: chrono::DateTime<chrono::Utc>,
    /// Changes in commit order.
    pub changes: Vec<Change>,
    /// Transactional logical decoding messages (`pg_logical_emit_message(true, …)`), in
    /// order. Empty for nearly every transaction.
    pub messages: Vec<LogicalMessage>,
}

/// A logical decoding message written with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Its WAL position.
    pub lsn: Lsn,
    /// The prefix chosen by the writer.
    pub prefix: String,
    /// The content.
    pub content: Vec<u8>,
    /// Written inside the transaction (else it was emitted at once, outside any).
    pub transactional: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for text in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert!("nope".parse::<Lsn>().is_err());
        assert!("1/100000000".parse::<Lsn>().is_err());
    }
}
