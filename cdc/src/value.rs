//! Text-format column values to typed [`Value`]s.
//!
//! The walsender prints values with the session settings this client sets at startup
//! (DateStyle ISO, TimeZone UTC, IntervalStyle postgres, bytea_output hex), so the
//! formats below are fixed. A type without a mapping, or a value the parser does not
//! accept (infinity dates, BC years…), becomes [`Value::Text`]: never an error.

use std::collections::HashMap;

use crate::model::Value;

/// How a type's values are parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// bool.
    Bool,
    /// int2, int4, int8 (and oid-like integers).
    Int,
    /// float4, float8.
    Float,
    /// numeric.
    Numeric,
    /// Text, and every type without a better mapping (enums among them).
    Text,
    /// uuid.
    Uuid,
    /// json, jsonb.
    Json,
    /// date.
    Date,
    /// time.
    Time,
    /// timestamp.
    Timestamp,
    /// timestamptz.
    TimestampTz,
    /// interval.
    Interval,
    /// bytea.
    Bytea,
    /// An array of the element kind.
    Array(Box<Kind>),
}

/// What the client knows of a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// The name shown in [`crate::Column::type_name`] (domains resolved to their base).
    pub name: String,
    /// How to parse.
    pub kind: Kind,
}

/// The built-in types with a mapping, by OID.
pub fn builtin(oid: u32) -> Option<TypeInfo> {
    let (name, kind) = match oid {
        16 => ("bool", Kind::Bool),
        20 => ("int8", Kind::Int),
        21 => ("int2", Kind::Int),
        23 => ("int4", Kind::Int),
        26 => ("oid", Kind::Int),
        700 => ("float4", Kind::Float),
        701 => ("float8", Kind::Float),
        1700 => ("numeric", Kind::Numeric),
        25 => ("text", Kind::Text),
        1043 => ("varchar", Kind::Text),
        1042 => ("bpchar", Kind::Text),
        18 => ("char", Kind::Text),
        19 => ("name", Kind::Text),
        2950 => ("uuid", Kind::Uuid),
        114 => ("json", Kind::Json),
        3802 => ("jsonb", Kind::Json),
        1082 => ("date", Kind::Date),
        1083 => ("time", Kind::Time),
        1114 => ("timestamp", Kind::Timestamp),
        1184 => ("timestamptz", Kind::TimestampTz),
        1186 => ("interval", Kind::Interval),
        17 => ("bytea", Kind::Bytea),
        _ => {
            let elem = match oid {
                1000 => 16,
                1016 => 20,
                1005 => 21,
                1007 => 23,
                1028 => 26,
                1021 => 700,
                1022 => 701,
                1231 => 1700,
                1009 => 25,
                1015 => 1043,
                1014 => 1042,
                1002 => 18,
                1003 => 19,
                2951 => 2950,
                199 => 114,
                3807 => 3802,
                1182 => 1082,
                1183 => 1083,
                1115 => 1114,
                1185 => 1184,
                1187 => 1186,
                1001 => 17,
                _ => return None,
            };
            let e = builtin(elem)?;
            return Some(TypeInfo {
                name: format!("_{}", e.name),
                kind: Kind::Array(Box::new(e.kind)),
            });
        }
    };
    Some(TypeInfo {
        name: name.to_string(),
        kind,
    })
}

/// Known types: built-ins plus what the catalog told us.
#[derive(Debug, Default, Clone)]
pub struct TypeCache {
    known: HashMap<u32, TypeInfo>,
}

impl TypeCache {
    /// What is known of `oid`; unknown types read as text.
    pub fn get(&self, oid: u32) -> TypeInfo {
        builtin(oid)
            .or_else(|| self.known.get(&oid).cloned())
            .unwrap_or_else(|| TypeInfo {
                name: format!("oid:{oid}"),
                kind: Kind::Text,
            })
    }

    /// Whether `oid` needs a catalog lookup.
    pub fn is_known(&self, oid: u32) -> bool {
        builtin(oid).is_some() || self.known.contains_key(&oid)
    }

    /// Records a type.
    pub fn insert(&mut self, oid: u32, info: TypeInfo) {
        self.known.insert(oid, info);
    }
}

/// Parses one text-format value.
pub fn parse(kind: &Kind, text: &str) -> Value {
    let fallback = || Value::Text(text.to_string());
    match kind {
        Kind::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => fallback(),
        },
        Kind::Int => text.parse().map(Value::Int).unwrap_or_else(|_| fallback()),
        Kind::Float => match text {
            "NaN" => Value::Float(f64::NAN),
            "Infinity" => Value::Float(f64::INFINITY),
            "-Infinity" => Value::Float(f64::NEG_INFINITY),
            _ => text.parse().map(Value::Float).unwrap_or_else(|_| fallback()),
        },
        Kind::Numeric => Value::Numeric(text.to_string()),
        Kind::Text => fallback(),
        Kind::Uuid => uuid::Uuid::parse_str(text)
            .map(Value::Uuid)
            .unwrap_or_else(|_| fallback()),
        Kind::Json => serde_json::from_str(text)
            .map(Value::Json)
            .unwrap_or_else(|_| fallback()),
        Kind::Date => chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map(Value::Date)
            .unwrap_or_else(|_| fallback()),
        Kind::Time => chrono::NaiveTime::parse_from_str(text, "%H:%M:%S%.f")
            .map(Value::Time)
            .unwrap_or_else(|_| fallback()),
        Kind::Timestamp => chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
            .map(Value::Timestamp)
            .unwrap_or_else(|_| fallback()),
        Kind::TimestampTz => chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
            .map(|t| Value::TimestampTz(t.with_timezone(&chrono::Utc)))
            .unwrap_or_else(|_| fallback()),
        Kind::Interval => Value::Interval(text.to_string()),
        Kind::Bytea => text
            .strip_prefix("\\x")
            .and_then(unhex)
            .map(Value::Bytes)
            .unwrap_or_else(fallback),
        Kind::Array(elem) => parse_array(elem, text).unwrap_or_else(fallback),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Parses an array literal (`{1,2,NULL}`, nested, quoted, with optional dimensions).
fn parse_array(elem: &Kind, text: &str) -> Option<Value> {
    let body = match text.strip_prefix('[') {
        // "[0:1]={…}": explicit bounds; the values are what matters.
        Some(_) => text.split_once('=')?.1,
        None => text,
    };
    let bytes = body.as_bytes();
    let mut pos = 0;
    let v = array_level(elem, bytes, &mut pos, 0)?;
    (pos == bytes.len()).then_some(v)
}

fn array_level(elem: &Kind, b: &[u8], pos: &mut usize, depth: usize) -> Option<Value> {
    // PostgreSQL allows at most 6 dimensions; deeper is not an array it printed.
    if depth > 6 || b.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Some(Value::Array(items));
    }
    loop {
        match b.get(*pos)? {
            b'{' => items.push(array_level(elem, b, pos, depth + 1)?),
            b'"' => {
                *pos += 1;
                let mut s = Vec::new();
                loop {
                    match *b.get(*pos)? {
                        b'\\' => {
                            s.push(*b.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            s.push(c);
                            *pos += 1;
                        }
                    }
                }
                items.push(parse(elem, std::str::from_utf8(&s).ok()?));
            }
            _ => {
                let start = *pos;
                while !matches!(b.get(*pos)?, b',' | b'}') {
                    *pos += 1;
                }
                let raw = std::str::from_utf8(&b[start..*pos]).ok()?.trim();
                items.push(if raw.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    parse(elem, raw)
                });
            }
        }
        match b.get(*pos)? {
            b',' => *pos += 1,
            b'}' => {
                *pos += 1;
                return Some(Value::Array(items));
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(oid: u32) -> Kind {
        builtin(oid).unwrap().kind
    }

    #[test]
    fn scalars() {
        assert_eq!(parse(&k(16), "t"), Value::Bool(true));
        assert_eq!(parse(&k(20), "-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(parse(&k(701), "1.5"), Value::Float(1.5));
        assert!(matches!(parse(&k(701), "NaN"), Value::Float(f) if f.is_nan()));
        assert_eq!(
            parse(&k(1700), "12345678901234567890.000000001"),
            Value::Numeric("12345678901234567890.000000001".into())
        );
        assert_eq!(
            parse(&k(2950), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Value::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".parse().unwrap())
        );
        assert_eq!(
            parse(&k(3802), r#"{"a": [1, 2]}"#),
            Value::Json(serde_json::json!({"a": [1, 2]}))
        );
        assert_eq!(
            parse(&k(1082), "2024-02-29"),
            Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 2, 29).unwrap())
        );
        assert_eq!(parse(&k(1082), "infinity"), Value::Text("infinity".into()));
        assert_eq!(
            parse(&k(1083), "13:14:15.5"),
            Value::Time(chrono::NaiveTime::from_hms_milli_opt(13, 14, 15, 500).unwrap())
        );
        let ts = chrono::NaiveDate::from_ymd_opt(2024, 1, 2)
            .unwrap()
            .and_hms_micro_opt(3, 4, 5, 123456)
            .unwrap();
        assert_eq!(
            parse(&k(1114), "2024-01-02 03:04:05.123456"),
            Value::Timestamp(ts)
        );
        assert_eq!(
            parse(&k(1184), "2024-01-02 03:04:05.123456+00"),
            Value::TimestampTz(ts.and_utc())
        );
        assert_eq!(
            parse(&k(1184), "2024-01-02 05:34:05.123456+02:30"),
            Value::TimestampTz(ts.and_utc())
        );
        assert_eq!(
            parse(&k(1186), "1 day 02:00:00"),
            Value::Interval("1 day 02:00:00".into())
        );
        assert_eq!(parse(&k(17), "\\x00ff10"), Value::Bytes(vec![0, 255, 16]));
        assert_eq!(parse(&Kind::Text, "x"), Value::Text("x".into()));
    }

    #[test]
    fn arrays() {
        assert_eq!(
            parse(&k(1007), "{1,NULL,3}"),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)])
        );
        assert_eq!(
            parse(&k(1009), r#"{"a b","c\"d",NULL,"NULL",plain}"#),
            Value::Array(vec![
                Value::Text("a b".into()),
                Value::Text("c\"d".into()),
                Value::Null,
                Value::Text("NULL".into()),
                Value::Text("plain".into()),
            ])
        );
        assert_eq!(
            parse(&k(1007), "{{1,2},{3,4}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Int(4)])
            ])
        );
        assert_eq!(
            parse(&k(1007), "[0:1]={5,6}"),
            Value::Array(vec![Value::Int(5), Value::Int(6)])
        );
        assert_eq!(parse(&k(1007), "{}"), Value::Array(vec![]));
        assert_eq!(parse(&k(1007), "{1,2"), Value::Text("{1,2".into()));
    }

    proptest! {
        #[test]
        fn any_text_of_any_kind_is_a_value(text in ".{0,64}", oid in proptest::sample::select(vec![16u32, 20, 701, 1700, 2950, 3802, 1082, 1083, 1114, 1184, 17, 1007, 1009, 1185])) {
            let _ = parse(&k(oid), &text);
        }
    }
}
