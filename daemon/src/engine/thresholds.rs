//! Metric thresholds: which committed source transactions move a tenant's metric across
//! a threshold declared in the schema file (`thresholds`, `above`, `below`), and the
//! `metric.threshold_crossed` events that say so.
//!
//! Crossings are judged per source transaction, in commit order, between the value
//! before it and the value after it (a transaction's intermediate states are never
//! visible, so they never count). The events are written to the outbox by
//! [`super::Engine::apply`] in the same state transaction as the metric cells and the
//! checkpoint, so an event exists exactly when the value it reports is durable. Each
//! event's key is derived from the transaction's commit LSN and the crossing's position
//! among that transaction's crossings (metrics by name, tenants by id, thresholds
//! ascending): a batch replayed after a crash derives the same keys.
//!
//! This module reads the committed cells and never writes anything itself.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use pulse_cdc::Transaction;
use serde_json::json;

use super::metrics::{Cell, CellKey, Deltas, MetricStore, ZoneOf, value_over};
use crate::outbox::{self, OutboxEvent};
use crate::schema::Schema;

/// Follows, across one batch, the cells of the (metric, tenant) pairs whose metric has
/// thresholds, as of the last transaction observed.
#[derive(Default)]
pub struct Tracker {
    /// Cells of each pair touched so far in the batch.
    pairs: HashMap<(String, String), BTreeMap<CellKey, Cell>>,
    /// Metrics whose table was truncated earlier in the batch: their stored cells are gone.
    cleared: HashSet<String>,
}

impl Tracker {
    /// Whether any metric of the schema has thresholds (else there is nothing to follow).
    pub fn wanted(schema: &Schema) -> bool {
        schema.metrics.values().any(|m| !m.thresholds.is_empty())
    }

    /// One transaction of the batch: `deltas` are its own metric deltas (after its
    /// truncations), `truncated` the metrics whose table it truncated. Returns the
    /// crossings as outbox events.
    pub fn observe(
        &mut self,
        schema: &Schema,
        zone: ZoneOf<'_>,
        store: &MetricStore,
        tx: &Transaction,
        deltas: &Deltas,
        truncated: &[String],
    ) -> Vec<OutboxEvent> {
        let mut events = Vec::new();
        for m in schema.metrics.values().filter(|m| !m.thresholds.is_empty()) {
            let cut = truncated.contains(&m.name);
            let mut tenants: BTreeSet<String> = deltas
                .iter()
                .filter(|(k, d)| k.metric == m.name && (d.n != 0 || d.micros != 0))
                .map(|(k, _)| k.tenant.clone())
                .collect();
            if cut {
                // Every tenant that had a value loses it.
                tenants.extend(
                    self.pairs
                        .keys()
                        .filter(|(metric, _)| *metric == m.name)
                        .map(|(_, t)| t.clone()),
                );
                if !self.cleared.contains(&m.name) {
                    tenants.extend(
                        store
                            .cells()
                            .keys()
                            .filter(|k| k.metric == m.name)
                            .map(|k| k.tenant.clone()),
                    );
                }
            }
            for tenant in tenants {
                let cleared = self.cleared.contains(&m.name);
                let cells = self
                    .pairs
                    .entry((m.name.clone(), tenant.clone()))
                    .or_insert_with(|| {
                        if cleared {
                            BTreeMap::new()
                        } else {
                            store
                                .cells_of(&m.name, &tenant)
                                .map(|(k, c)| (k.clone(), *c))
                                .collect()
                        }
                    });
                let before = value_over(zone(&tenant), m, cells.iter());
                if cut {
                    cells.clear();
                }
                for (k, d) in deltas
                    .iter()
                    .filter(|(k, _)| k.metric == m.name && k.tenant == tenant)
                {
                    let c = cells.entry(k.clone()).or_default();
                    c.n += d.n;
                    c.micros += d.micros;
                    if c.n == 0 {
                        cells.remove(k);
                    }
                }
                let after = value_over(zone(&tenant), m, cells.iter());
                let (Some(b), Some(a)) = (before.as_f64(), after.as_f64()) else {
                    continue;
                };
                for t in &m.thresholds {
                    let Some(direction) = t.crossed(b, a) else {
                        continue;
                    };
                    let position = events.len() as u32;
                    events.push(OutboxEvent {
                        event: "metric.threshold_crossed",
                        message_id: format!(
                            "metric.threshold_crossed:{}",
                            outbox::message_id_from_lsn(tx.commit_lsn.0, position)
                        ),
                        aggregate: format!("metric:{tenant}:{}", m.name),
                        payload: json!({
                            "tenantId": tenant,
                            "metric": m.name,
                            "threshold": number(t.value),
                            "direction": direction,
                            "value": after,
                            "previous": before,
                            "at": tx.commit_time.to_rfc3339(),
                            "lsn": tx.commit_lsn.to_string(),
                        }),
                    });
                }
            }
            if cut {
                self.cleared.insert(m.name.clone());
            }
        }
        events
    }
}

/// A threshold as JSON: an integer when it is one (what PHP's `int` properties take).
fn number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::metrics;
    use pulse_cdc::Lsn;

    fn schema() -> Schema {
        let mut s = Schema::parse(
            "s",
            r#"
[metrics.members]
source = "public.m"
tenant_column = "tenant_id"
aggregate = "count"
thresholds = [2]
above = [3]
below = [1]
"#,
        )
        .unwrap();
        s.metrics.get_mut("members").unwrap().types = [("tenant_id".to_string(), "text".to_string())]
            .into_iter()
            .collect();
        s
    }

    fn utc(_: &str) -> chrono_tz::Tz {
        chrono_tz::UTC
    }

    fn tx(lsn: u64) -> Transaction {
        Transaction {
            xid: 1,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 1),
            commit_time: chrono::Utc::now(),
            changes: Vec::new(),
            messages: Vec::new(),
        }
    }

    fn rows(tenant: &str, n: i64) -> Deltas {
        let mut d = Deltas::new();
        d.insert(
            CellKey {
                metric: "members".into(),
                tenant: tenant.into(),
                bucket: String::new(),
                dkey: String::new(),
            },
            metrics::Cell { n, micros: 0 },
        );
        d
    }

    fn seen(events: &[OutboxEvent]) -> Vec<(f64, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e.payload["threshold"].as_f64().unwrap(),
                    e.payload["direction"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn crossings_are_judged_per_transaction_in_both_directions() {
        let s = schema();
        let mut store = MetricStore::default();
        store.apply(&rows("t1", 1));
        let mut t = Tracker::default();
        // 1 -> 3: crosses 2 (both ways) and 3 (above only) upwards.
        let e = t.observe(&s, &utc, &store, &tx(0x10), &rows("t1", 2), &[]);
        assert_eq!(seen(&e), vec![(2.0, "up".into()), (3.0, "up".into())]);
        assert_eq!(e[0].message_id, "metric.threshold_crossed:lsn:0/10:0");
        assert_eq!(e[1].message_id, "metric.threshold_crossed:lsn:0/10:1");
        assert_eq!(e[1].payload["value"], 3);
        assert_eq!(e[1].payload["previous"], 1);
        // The tracker carries the batch's state: 3 -> 2 crosses nothing downwards
        // (3 is announced only above, 2 is still reached).
        assert!(
            t.observe(&s, &utc, &store, &tx(0x20), &rows("t1", -1), &[])
                .is_empty()
        );
        // 2 -> 0: crosses 2 and 1 downwards; another tenant is not touched.
        let e = t.observe(&s, &utc, &store, &tx(0x30), &rows("t1", -2), &[]);
        assert_eq!(seen(&e), vec![(1.0, "down".into()), (2.0, "down".into())]);
        assert!(
            t.observe(&s, &utc, &store, &tx(0x40), &rows("t2", 1), &[])
                .is_empty()
        );
    }

    #[test]
    fn a_truncate_brings_every_tenant_to_zero() {
        let s = schema();
        let mut store = MetricStore::default();
        store.apply(&rows("t1", 2));
        store.apply(&rows("t2", 5));
        let mut t = Tracker::default();
        let e = t.observe(
            &s,
            &utc,
            &store,
            &tx(0x10),
            &Deltas::new(),
            &["members".to_string()],
        );
        let mut by_tenant: Vec<(String, f64)> = e
            .iter()
            .map(|e| {
                (
                    e.payload["tenantId"].as_str().unwrap().to_string(),
                    e.payload["threshold"].as_f64().unwrap(),
                )
            })
            .collect();
        by_tenant.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(
            by_tenant,
            vec![
                ("t1".into(), 1.0),
                ("t1".into(), 2.0),
                ("t2".into(), 1.0),
                ("t2".into(), 2.0)
            ]
        );
        // After the truncate the stored cells no longer count: one row is 0 -> 1.
        let e = t.observe(&s, &utc, &store, &tx(0x20), &rows("t2", 2), &[]);
        assert_eq!(seen(&e), vec![(2.0, "up".into())]);
    }

    #[test]
    fn the_same_batch_derives_the_same_keys() {
        let s = schema();
        let store = MetricStore::default();
        let run = || {
            let mut t = Tracker::default();
            let mut all = t.observe(&s, &utc, &store, &tx(0x10), &rows("t1", 5), &[]);
            all.extend(t.observe(&s, &utc, &store, &tx(0x20), &rows("t1", -5), &[]));
            all.into_iter().map(|e| e.message_id).collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first.len(), 4);
        assert_eq!(first, run());
    }
}
