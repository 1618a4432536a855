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
//!
//! A bucket before the first date the window reads (in the tenant's zone, now) is dead:
//! no value ever reads it again, since local dates only move forward. Rows in dead
//! buckets contribute nothing (neither from a snapshot nor from the stream), and
//! [`MetricStore::dead`] finds the cells that died as days rolled over, for pruning.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use pulse_cdc::Value;
use serde_json::Value as Json;

use super::value;
use crate::schema::{Aggregate, Metric};

/// A tenant's time zone, as the engine knows it at that point of the stream.
pub type ZoneOf<'a> = &'a (dyn Fn(&str) -> Tz + Sync);

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

/// The cell a row contributes to, with its sum, when it counts at all (rows in a bucket
/// dead at `now` do not).
pub fn contribution(
    zone: ZoneOf<'_>,
    m: &Metric,
    get: &dyn Fn(&str) -> Option<Value>,
    now: DateTime<Utc>,
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
        Some((w, col)) => {
            let tz = zone(&tenant);
            let date = local_date(tz, &get(col)?)?;
            if date < w.start(now.with_timezone(&tz).date_naive()) {
                return None;
            }
            date.to_string()
        }
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

fn local_date(tz: Tz, v: &Value) -> Option<NaiveDate> {
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

    /// Removes every cell of a metric (its table was truncated), except those of the
    /// tenants in `keep`; returns the tenants whose cells went.
    pub fn clear_metric(&mut self, metric: &str, keep: &[String]) -> Vec<String> {
        let gone = |k: &CellKey| k.metric == metric && !keep.contains(&k.tenant);
        let mut tenants: Vec<String> = self
            .cells
            .keys()
            .filter(|k| gone(k))
            .map(|k| k.tenant.clone())
            .collect();
        self.cells.retain(|k, _| !gone(k));
        tenants.dedup();
        tenants
    }

    /// Replaces the cells of a metric (every tenant, or only `tenants`) with `cells`
    /// (recomputed); returns the tenants whose value may have changed.
    pub fn replace_metric(
        &mut self,
        metric: &str,
        tenants: Option<&[String]>,
        cells: impl IntoIterator<Item = (CellKey, Cell)>,
    ) -> Vec<String> {
        let hit = |k: &CellKey| k.metric == metric && tenants.is_none_or(|t| t.contains(&k.tenant));
        let mut touched: Vec<String> = self
            .cells
            .keys()
            .filter(|k| hit(k))
            .map(|k| k.tenant.clone())
            .collect();
        self.cells.retain(|k, _| !hit(k));
        for (k, c) in cells {
            if c.n != 0 && hit(&k) {
                touched.push(k.tenant.clone());
                self.cells.insert(k, c);
            }
        }
        touched.extend(tenants.into_iter().flatten().cloned());
        touched.sort();
        touched.dedup();
        touched
    }

    /// The (metric, tenant) pairs of windowed metrics holding buckets dead at `now`, each
    /// with the first live bucket (every bucket before it is dead).
    pub fn dead(
        &self,
        metrics: &BTreeMap<String, Metric>,
        zone: ZoneOf<'_>,
        now: DateTime<Utc>,
    ) -> Vec<(String, String, String)> {
        let mut out: Vec<(String, String, String)> = Vec::new();
        let mut starts: HashMap<(&str, &str), String> = HashMap::new();
        for k in self.cells.keys() {
            if k.bucket.is_empty() {
                continue;
            }
            let Some((w, _)) = metrics.get(&k.metric).and_then(|m| m.window.as_ref()) else {
                continue;
            };
            let start = starts
                .entry((k.metric.as_str(), k.tenant.as_str()))
                .or_insert_with(|| {
                    let tz = zone(&k.tenant);
                    w.start(now.with_timezone(&tz).date_naive()).to_string()
                });
            if k.bucket.as_str() < start.as_str()
                && out
                    .last()
                    .is_none_or(|(m, t, _)| *m != k.metric || *t != k.tenant)
            {
                out.push((k.metric.clone(), k.tenant.clone(), start.clone()));
            }
        }
        out
    }

    /// Removes the cells of (metric, tenant) in buckets before `start`.
    pub fn remove_before(&mut self, metric: &str, tenant: &str, start: &str) {
        self.cells.retain(|k, _| {
            !(k.metric == metric && k.tenant == tenant && !k.bucket.is_empty() && k.bucket.as_str() < start)
        });
    }

    /// The metric's value for a tenant (in time zone `tz`) now.
    pub fn value(&self, m: &Metric, tz: Tz, tenant: &str) -> Json {
        value_over(tz, m, self.cells_of(&m.name, tenant))
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

/// A metric's value for a tenant (in time zone `tz`) now, over its cells (from the
/// store, or a copy that a batch is changing).
pub fn value_over<'a>(tz: Tz, m: &Metric, cells: impl Iterator<Item = (&'a CellKey, &'a Cell)>) -> Json {
    let start = m.window.as_ref().map(|(w, _)| {
        let today = Utc::now().with_timezone(&tz).date_naive();
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
        let mut schema = crate::schema::Schema::parse("s", text).unwrap();
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
        let zone = |_: &str| chrono_tz::UTC;
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
        add(
            &mut d,
            contribution(&zone, &m, &row("active", "10.25"), Utc::now()),
            1,
        );
        add(
            &mut d,
            contribution(&zone, &m, &row("active", "5"), Utc::now()),
            1,
        );
        store.apply(&d);
        assert_eq!(store.value(&m, chrono_tz::UTC, "t1"), serde_json::json!(15.25));
        // One row leaves the filter.
        let mut d = Deltas::new();
        add(
            &mut d,
            contribution(&zone, &m, &row("active", "5"), Utc::now()),
            -1,
        );
        add(&mut d, contribution(&zone, &m, &row("gone", "5"), Utc::now()), 1);
        assert_eq!(store.apply(&d), vec![("active".to_string(), "t1".to_string())]);
        assert_eq!(store.value(&m, chrono_tz::UTC, "t1"), serde_json::json!(10.25));
        assert_eq!(store.value(&m, chrono_tz::UTC, "t2"), serde_json::json!(0));
    }

    #[test]
    fn dead_buckets_count_nothing_and_are_found_for_pruning() {
        let text = r#"
[metrics.today]
source = "public.m"
tenant_column = "tenant_id"
aggregate = "count"
window = "today"
time_column = "at"
"#;
        let mut schema = crate::schema::Schema::parse("s", text).unwrap();
        schema.metrics.get_mut("today").unwrap().types = [("tenant_id", "text"), ("at", "timestamptz")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let m = schema.metrics["today"].clone();
        // 23:30 UTC on the 1st is already the 2nd in Tokyo (UTC+9).
        let now: DateTime<Utc> = "2026-03-01T23:30:00Z".parse().unwrap();
        let tokyo = |t: &str| {
            if t == "tk" {
                chrono_tz::Asia::Tokyo
            } else {
                chrono_tz::UTC
            }
        };
        let row = |tenant: &'static str, at: &'static str| {
            move |c: &str| match c {
                "tenant_id" => Some(Value::Text(tenant.into())),
                "at" => Some(Value::TimestampTz(at.parse().unwrap())),
                _ => None,
            }
        };
        // In UTC the row is today's; in Tokyo it is yesterday's, so it counts nothing.
        let early = "2026-03-01T10:00:00Z";
        assert_eq!(
            contribution(&tokyo, &m, &row("utc", early), now)
                .unwrap()
                .0
                .bucket,
            "2026-03-01"
        );
        assert_eq!(contribution(&tokyo, &m, &row("tk", early), now), None);
        let mut store = MetricStore::default();
        let mut d = Deltas::new();
        add(&mut d, contribution(&tokyo, &m, &row("utc", early), now), 1);
        add(
            &mut d,
            contribution(&tokyo, &m, &row("tk", "2026-03-01T16:00:00Z"), now),
            1,
        );
        store.apply(&d);
        assert!(store.dead(&schema.metrics, &tokyo, now).is_empty());
        // Two hours later it is the 2nd in UTC too: the UTC tenant's bucket died.
        let later: DateTime<Utc> = "2026-03-02T01:30:00Z".parse().unwrap();
        assert_eq!(
            store.dead(&schema.metrics, &tokyo, later),
            vec![("today".to_string(), "utc".to_string(), "2026-03-02".to_string())]
        );
        store.remove_before("today", "utc", "2026-03-02");
        assert_eq!(store.cells().len(), 1);
        assert!(
            store
                .cells()
                .keys()
                .all(|k| k.tenant == "tk" && k.bucket == "2026-03-02")
        );
    }
}
