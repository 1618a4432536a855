//! Live dashboard metrics: count, sum and count-distinct per tenant, with a filter and an
//! optional time window in the tenant's time zone.
//!
//! State is kept per (metric, tenant, bucket, distinct key): a bucket is a local date for
//! windowed metrics (so "today" or "last 7 days" roll over without a rescan) and empty
//! otherwise. Each change subtracts the old row's contribution and adds the new row's,
//! so an update that moves a row into or out of the filter counts. Sums are exact, in
//! millionths. The same deltas go to memory and to `pulse.metric_cells` (in the
//! caller's state transaction), so after a crash the persisted state equals a fresh
//! recomputation at the checkpoint LSN. Nothing here polls the source tables.

use std::collections::{BTreeMap, HashMap};

use chrono::{NaiveDate, Utc};
use pulse_cdc::Value;
use serde_json::Value as Json;

use super::value;
use crate::schema::{Aggregate, Metric, Schema};

/// Position of one aggregate cell.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellKey {
    /// Metric name.
    pub metric: String,
    /// Tenant.
    pub tenant: String,
    /// Local date (windowed metrics) or empty.
    pub bucket: String,
    /// Distinct value (count-distinct) or empty.
    pub dkey: String,
}

/// Rows and sum of one cell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cell {
    /// Rows counted.
    pub n: i64,
    /// Sum, in millionths.
    pub micros: i64,
}

/// Changes to cells, accumulated over a batch.
pub type Deltas = HashMap<CellKey, Cell>;

/// Parses a decimal to millionths, exactly for up to six decimals.
pub fn micros(v: &Value) -> i64 {
    match v {
        Value::Int(i) => i.saturating_mul(1_000_000),
        Value::Float(f) => (f * 1e6).round() as i64,
        Value::Numeric(s) => {
            let (neg, s) = match s.strip_prefix('-') {
                Some(r) => (true, r),
                None => (false, s.as_str()),
            };
            let (int, frac) = s.split_once('.').unwrap_or((s, ""));
            let mut frac: String = frac.chars().take(6).collect();
            while frac.len() < 6 {
                frac.push('0');
            }
            let n = int
                .parse::<i64>()
                .unwrap_or(0)
                .saturating_mul(1_000_000)
                .saturating_add(frac.parse::<i64>().unwrap_or(0));
            if neg { -n } else { n }
        }
        _ => 0,
    }
}

/// The cell a row contributes to, with its sum, when it counts at all.
pub fn contribution(
    schema: &Schema,
    m: &Metric,
    get: &dyn Fn(&str) -> Option<Value>,
) -> Option<(CellKey, i64)> {
    let tenant = get(&m.tenant_column)?;
    if matches!(tenant, Value::Null) {
        return None;
    }
    let tenant = value::key_text(&tenant);
    if let Some(f) = &m.filter {
        let cols: Vec<(String, Value)> = {
            let mut names = Vec::new();
            f.columns(&mut names);
            names
                .into_iter()
                .filter_map(|c| get(&c).map(|v| (c, v)))
                .collect()
        };
        let lookup = |c: &str| cols.iter().find(|(k, _)| k == c).map(|(_, v)| v);
        if !f.matches(&lookup) {
            return None;
        }
    }
    let bucket = match &m.window {
        None => String::new(),
        Some((_, col)) => local_date(schema, &tenant, &get(col)?)?.to_string(),
    };
    let (dkey, sum) = match &m.aggregate {
        Aggregate::Count => (String::new(), 0),
        Aggregate::Sum(c) => (String::new(), get(c).map(|v| micros(&v)).unwrap_or(0)),
        Aggregate::CountDistinct(c) => {
            let v = get(c)?;
            if matches!(v, Value::Null) {
                return None;
            }
            (value::key_text(&v), 0)
        }
    };
    Some((
        CellKey {
            metric: m.name.clone(),
            tenant,
            bucket,
            dkey,
        },
        sum,
    ))
}

fn local_date(schema: &Schema, tenant: &str, v: &Value) -> Option<NaiveDate> {
    let tz = schema.time_zone(tenant);
    match v {
        Value::TimestampTz(t) => Some(t.with_timezone(&tz).date_naive()),
        // A timestamp without time zone is taken as already local.
        Value::Timestamp(t) => Some(t.date()),
        Value::Date(d) => Some(*d),
        _ => None,
    }
}

/// Adds a contribution (sign +1 or -1) to the deltas.
pub fn add(deltas: &mut Deltas, c: Option<(CellKey, i64)>, sign: i64) {
    if let Some((k, sum)) = c {
        let e = deltas.entry(k).or_default();
        e.n += sign;
        e.micros += sign * sum;
    }
}

/// Every metric cell, in memory.
#[derive(Debug, Default)]
pub struct MetricStore {
    cells: BTreeMap<CellKey, Cell>,
}

impl MetricStore {
    /// Replaces everything (after loading from the state database or a snapshot).
    pub fn replace(&mut self, cells: impl IntoIterator<Item = (CellKey, Cell)>) {
        self.cells = cells.into_iter().filter(|(_, c)| c.n != 0).collect();
    }

    /// Applies deltas; returns the (metric, tenant) pairs touched.
    pub fn apply(&mut self, deltas: &Deltas) -> Vec<(String, String)> {
        let mut touched = Vec::new();
        for (k, d) in deltas {
            if d.n == 0 && d.micros == 0 {
                continue;
            }
            let cell = self.cells.entry(k.clone()).or_default();
            cell.n += d.n;
            cell.micros += d.micros;
            if cell.n == 0 {
                self.cells.remove(k);
            }
            touched.push((k.metric.clone(), k.tenant.clone()));
        }
        touched.sort();
        touched.dedup();
        touched
    }

    /// Removes every cell of a metric (its table was truncated); returns the tenants.
    pub fn clear_metric(&mut self, metric: &str) -> Vec<String> {
        let mut tenants: Vec<String> = self
            .cells
            .keys()
            .filter(|k| k.metric == metric)
            .map(|k| k.tenant.clone())
            .collect();
        self.cells.retain(|k, _| k.metric != metric);
        tenants.dedup();
        tenants
    }

    /// The metric's value for a tenant now.
    pub fn value(&self, schema: &Schema, m: &Metric, tenant: &str) -> Json {
        value_over(schema, m, tenant, self.cells_of(&m.name, tenant))
    }

    /// The cells of one (metric, tenant).
    pub fn cells_of<'a>(
        &'a self,
        metric: &'a str,
        tenant: &'a str,
    ) -> impl Iterator<Item = (&'a CellKey, &'a Cell)> + 'a {
        let lo = CellKey {
            metric: metric.to_string(),
            tenant: tenant.to_string(),
            bucket: String::new(),
            dkey: String::new(),
        };
        self.cells
            .range(lo..)
            .take_while(move |(k, _)| k.metric == metric && k.tenant == tenant)
    }

    /// Every cell, for comparisons in tests and the console.
    pub fn cells(&self) -> &BTreeMap<CellKey, Cell> {
        &self.cells
    }
}

/// A metric's value for a tenant now, over its cells (from the store, or a copy that a
/// batch is changing).
pub fn value_over<'a>(
    schema: &Schema,
    m: &Metric,
    tenant: &str,
    cells: impl Iterator<Item = (&'a CellKey, &'a Cell)>,
) -> Json {
    let start = m.window.as_ref().map(|(w, _)| {
        let today = Utc::now().with_timezone(&schema.time_zone(tenant)).date_naive();
        (w.start(today).to_string(), today.to_string())
    });
    let cells = cells.filter(|(k, _)| match &start {
        None => true,
        Some((from, to)) => k.bucket.as_str() >= from.as_str() && k.bucket.as_str() <= to.as_str(),
    });
    match &m.aggregate {
        Aggregate::Count => Json::from(cells.map(|(_, c)| c.n).sum::<i64>()),
        Aggregate::Sum(_) => {
            let total: i64 = cells.map(|(_, c)| c.micros).sum();
            if total % 1_000_000 == 0 {
                Json::from(total / 1_000_000)
            } else {
                serde_json::Number::from_f64(total as f64 / 1e6).map_or(Json::Null, Json::Number)
            }
        }
        Aggregate::CountDistinct(_) => {
            let mut keys: Vec<&str> = cells
                .filter(|(_, c)| c.n > 0)
                .map(|(k, _)| k.dkey.as_str())
                .collect();
            keys.sort();
            keys.dedup();
            Json::from(keys.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_become_exact_millionths() {
        assert_eq!(micros(&Value::Numeric("12.5".into())), 12_500_000);
        assert_eq!(micros(&Value::Numeric("-0.000001".into())), -1);
        assert_eq!(micros(&Value::Int(3)), 3_000_000);
    }

    #[test]
    fn updates_moving_rows_in_and_out_count() {
        let text = r#"
[metrics.active]
source = "public.m"
tenant_column = "tenant_id"
aggregate = "sum"
column = "fee"
filter = "status = 'active'"
"#;
        let mut schema = Schema::parse("s", text).unwrap();
        let m = schema.metrics.get_mut("active").unwrap();
        m.types = [("tenant_id", "text"), ("fee", "numeric"), ("status", "text")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        m.filter = Some(
            crate::engine::filter::parse("status = 'active'")
                .unwrap()
                .bind(&|c| m.types.get(c).cloned())
                .unwrap(),
        );
        let m = schema.metrics["active"].clone();
        let row = |status: &str, fee: &str| {
            let vals: HashMap<String, Value> = [
                ("tenant_id", Value::Text("t1".into())),
                ("status", Value::Text(status.into())),
                ("fee", Value::Numeric(fee.into())),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            move |c: &str| vals.get(c).cloned()
        };
        let mut store = MetricStore::default();
        let mut d = Deltas::new();
        add(&mut d, contribution(&schema, &m, &row("active", "10.25")), 1);
        add(&mut d, contribution(&schema, &m, &row("active", "5")), 1);
        store.apply(&d);
        assert_eq!(store.value(&schema, &m, "t1"), serde_json::json!(15.25));
        // One row leaves the filter.
        let mut d = Deltas::new();
        add(&mut d, contribution(&schema, &m, &row("active", "5")), -1);
        add(&mut d, contribution(&schema, &m, &row("gone", "5")), 1);
        assert_eq!(store.apply(&d), vec![("active".to_string(), "t1".to_string())]);
        assert_eq!(store.value(&schema, &m, "t1"), serde_json::json!(10.25));
        assert_eq!(store.value(&schema, &m, "t2"), serde_json::json!(0));
    }
}
