//! Health of each dependency and subsystem, and progress of the main loops.
//!
//! Subsystems report their own state here; `/readyz`, the console and the systemd
//! watchdog read it. A loop that stops ticking stops the watchdog pings, so systemd
//! restarts a wedged daemon instead of leaving it up and useless.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pulse_shared::admin::{ComponentHealth, HealthState};

/// Component states, by name. A std mutex: nothing awaits while holding it.
#[derive(Debug, Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, Entry>>,
    loops: Mutex<BTreeMap<&'static str, Instant>>,
}

#[derive(Debug, Clone)]
struct Entry {
    state: HealthState,
    detail: String,
    /// Whether the daemon is not ready while this component is down.
    required: bool,
}

impl Health {
    /// Records a component's state; logs transitions.
    pub fn set(&self, name: &str, state: HealthState, detail: impl Into<String>, required: bool) {
        let detail = detail.into();
        let mut map = self.components.lock().expect("health lock");
        let previous = map.get(name).map(|e| e.state);
        if previous != Some(state) {
            match state {
                HealthState::Up => tracing::info!(component = name, %detail, "component up"),
                HealthState::Degraded => tracing::warn!(component = name, %detail, "component degraded"),
                HealthState::Down => tracing::warn!(component = name, %detail, "component down"),
            }
        }
        map.insert(
            name.to_string(),
            Entry {
                state,
                detail,
                required,
            },
        );
    }

    /// Every component, for the console and `/readyz`.
    pub fn snapshot(&self) -> Vec<ComponentHealth> {
        let map = self.components.lock().expect("health lock");
        map.iter()
            .map(|(name, e)| ComponentHealth {
                name: name.clone(),
                state: e.state,
                detail: e.detail.clone(),
            })
            .collect()
    }

    /// Ready when no required component is down.
    pub fn ready(&self) -> bool {
        let map = self.components.lock().expect("health lock");
        map.values().all(|e| !e.required || e.state != HealthState::Down)
    }

    /// A main loop says it made progress.
    pub fn tick(&self, loop_name: &'static str) {
        self.loops
            .lock()
            .expect("health lock")
            .insert(loop_name, Instant::now());
    }

    /// A main loop ended on purpose (shutdown): it no longer counts for the watchdog.
    pub fn retire(&self, loop_name: &'static str) {
        self.loops.lock().expect("health lock").remove(loop_name);
    }

    /// The loops that have not ticked within `within`; empty means all are alive.
    pub fn stalled(&self, within: Duration) -> Vec<&'static str> {
        let now = Instant::now();
        self.loops
            .lock()
            .expect("health lock")
            .iter()
            .filter(|(_, at)| now.duration_since(**at) > within)
            .map(|(name, _)| *name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_down_component_makes_unready() {
        let h = Health::default();
        h.set("state_db", HealthState::Up, "ok", true);
        h.set("broker", HealthState::Down, "connection refused", false);
        assert!(h.ready(), "an optional component does not block readiness");
        h.set("state_db", HealthState::Down, "timeout", true);
        assert!(!h.ready());
        assert_eq!(h.snapshot().len(), 2);
    }

    #[test]
    fn stalled_loops_are_named() {
        let h = Health::default();
        h.tick("http");
        assert!(h.stalled(Duration::from_secs(60)).is_empty());
        assert_eq!(h.stalled(Duration::ZERO), vec!["http"]);
        h.retire("http");
        assert!(h.stalled(Duration::ZERO).is_empty());
    }
}
