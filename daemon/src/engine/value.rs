//! Typed column values: conversion between the change stream's [`Value`], JSON (the wire
//! and the source-database queries) and comparison for filters.
//!
//! This module only converts and compares; it never decides who sees what.

use std::cmp::Ordering;

use pulse_cdc::Value;
use serde_json::Value as Json;

/// Converts a stream value to the JSON that clients see.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Null | Value::UnchangedToast => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Numeric(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Json::String(s.clone()), Json::Number),
        Value::Text(s) | Value::Interval(s) => Json::String(s.clone()),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::Json(j) => j.clone(),
        Value::Date(d) => Json::String(d.to_string()),
        Value::Time(t) => Json::String(t.to_string()),
        Value::Timestamp(t) => Json::String(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
        Value::TimestampTz(t) => Json::String(t.to_rfc3339()),
        Value::Bytes(b) => Json::String(format!("\\x{}", hex::encode(b))),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
    }
}

/// Converts JSON (a client argument, or a value selected with `to_jsonb` from the source
/// database) to a typed value of the catalog type `type_name`. `None` when it does not fit.
pub fn from_json(type_name: &str, j: &Json) -> Option<Value> {
    if j.is_null() {
        return Some(Value::Null);
    }
    Some(match type_name {
        "bool" => Value::Bool(j.as_bool()?),
        "int2" | "int4" | "int8" => match j {
            Json::Number(n) => Value::Int(n.as_i64()?),
            Json::String(s) => Value::Int(s.trim().parse().ok()?),
            _ => return None,
        },
        "float4" | "float8" => match j {
            Json::Number(n) => Value::Float(n.as_f64()?),
            Json::String(s) => Value::Float(s.trim().parse().ok()?),
            _ => return None,
        },
        "numeric" => match j {
            Json::Number(n) => Value::Numeric(n.to_string()),
            Json::String(s) if s.trim().parse::<f64>().is_ok() => Value::Numeric(s.trim().to_string()),
            _ => return None,
        },
        "uuid" => Value::Uuid(j.as_str()?.parse().ok()?),
        "json" | "jsonb" => Value::Json(j.clone()),
        "date" => Value::Date(j.as_str()?.parse().ok()?),
        "timestamptz" => {
            let s = j.as_str()?;
            Value::TimestampTz(
                chrono::DateTime::parse_from_rfc3339(s)
                    .ok()?
                    .with_timezone(&chrono::Utc),
            )
        }
        "timestamp" => {
            let s = j.as_str()?;
            Value::Timestamp(
                chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                    .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
                    .ok()?,
            )
        }
        _ => match j {
            Json::String(s) => Value::Text(s.clone()),
            Json::Number(n) => Value::Text(n.to_string()),
            Json::Bool(b) => Value::Text(b.to_string()),
            _ => return None,
        },
    })
}

/// A number, when the value is numeric.
pub fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        Value::Numeric(s) => s.parse().ok(),
        _ => None,
    }
}

/// SQL-style comparison: `None` when either side is NULL or the two cannot be compared.
pub fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    use Value as V;
    match (a, b) {
        (V::Null | V::UnchangedToast, _) | (_, V::Null | V::UnchangedToast) => None,
        (V::Bool(x), V::Bool(y)) => Some(x.cmp(y)),
        (V::Int(x), V::Int(y)) => Some(x.cmp(y)),
        (V::Text(x), V::Text(y)) => Some(x.cmp(y)),
        (V::Uuid(x), V::Uuid(y)) => Some(x.cmp(y)),
        (V::Date(x), V::Date(y)) => Some(x.cmp(y)),
        (V::Time(x), V::Time(y)) => Some(x.cmp(y)),
        (V::Timestamp(x), V::Timestamp(y)) => Some(x.cmp(y)),
        (V::TimestampTz(x), V::TimestampTz(y)) => Some(x.cmp(y)),
        (V::Json(x), V::Json(y)) => (x == y).then_some(Ordering::Equal),
        _ => match (as_f64(a), as_f64(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y),
            _ => Some(key_text(a).cmp(&key_text(b))),
        },
    }
}

/// A stable text form of a value, for keys (count-distinct, primary keys, equality filters).
pub fn key_text(v: &Value) -> String {
    match v {
        Value::Null | Value::UnchangedToast => String::new(),
        Value::Text(s) | Value::Numeric(s) | Value::Interval(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Uuid(u) => u.to_string(),
        other => to_json(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_for_common_types() {
        let cases = [
            ("int8", serde_json::json!(42)),
            ("text", serde_json::json!("x")),
            ("bool", serde_json::json!(true)),
            ("date", serde_json::json!("2026-11-24")),
            ("uuid", serde_json::json!("6f1b5a8e-0000-4000-8000-000000000001")),
        ];
        for (ty, j) in cases {
            let v = from_json(ty, &j).unwrap();
            assert_eq!(to_json(&v), j, "{ty}");
        }
        assert!(from_json("int4", &serde_json::json!("abc")).is_none());
        assert_eq!(from_json("text", &Json::Null), Some(Value::Null));
    }

    #[test]
    fn comparisons_follow_sql() {
        assert_eq!(
            compare(&Value::Int(2), &Value::Numeric("2.0".into())),
            Some(Ordering::Equal)
        );
        assert_eq!(compare(&Value::Null, &Value::Int(1)), None);
        assert_eq!(
            compare(&Value::Text("a".into()), &Value::Text("b".into())),
            Some(Ordering::Less)
        );
    }
}
