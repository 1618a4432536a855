//! systemd integration: readiness, status lines, the watchdog, stopping.
//!
//! Every call is a no-op when the process was not started by systemd (no NOTIFY_SOCKET).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Tells systemd the daemon is ready (migrations applied, listeners up).
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A free-form status line, shown by `systemctl status`.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Tells systemd a stop has begun.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog at half its interval, but only while every registered main loop
/// has shown progress within the interval: a wedged loop lets systemd restart us.
pub fn spawn_watchdog(
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let stalled = health.stalled(interval);
            if stalled.is_empty() {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    ?stalled,
                    "main loops show no progress; withholding the watchdog ping"
                );
            }
        }
    }))
}

/// How often loops that have nothing to do still tick: every 5 s, or a quarter of the
/// watchdog interval when that is shorter, so an idle loop never looks stalled.
pub fn idle_tick() -> Duration {
    let base = Duration::from_secs(5);
    match sd_notify::watchdog_enabled() {
        Some(w) => base.min(w / 4).max(Duration::from_millis(50)),
        None => base,
    }
}
