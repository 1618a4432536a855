//! Limits at the edge: a cap on connections (total and per IP) and rate limits per user
//! (frames) and per IP (HTTP requests). A refused request gets `rate_limited` with a
//! retry delay (429 with Retry-After over HTTP); a full server gets `unavailable` (503).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Limits;

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The server holds `limits.max_connections`.
    Full(u64),
    /// This IP holds `limits.connections_per_ip`.
    PerIp(u64),
}

/// The limits in force.
pub struct EdgeLimits {
    max_connections: u64,
    per_ip: u64,
    open: Mutex<(u64, HashMap<IpAddr, u64>)>,
    frames: DefaultKeyedRateLimiter<String>,
    http: DefaultKeyedRateLimiter<IpAddr>,
}

fn per_second(n: u64) -> Quota {
    let n = NonZeroU32::new(n.clamp(1, u32::MAX as u64) as u32).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(n).allow_burst(n)
}

impl EdgeLimits {
    /// From the config's limits.
    pub fn new(l: &Limits) -> EdgeLimits {
        EdgeLimits {
            max_connections: l.max_connections,
            per_ip: l.connections_per_ip,
            open: Mutex::new((0, HashMap::new())),
            frames: RateLimiter::keyed(per_second(l.frames_per_sec_per_user)),
            http: RateLimiter::keyed(per_second(l.http_requests_per_sec_per_ip)),
        }
    }

    /// Takes a connection slot for `ip`; the guard gives it back.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refused> {
        let mut open = self.open.lock().expect("connections lock");
        if open.0 >= self.max_connections {
            return Err(Refused::Full(self.max_connections));
        }
        let n = open.1.entry(ip).or_insert(0);
        if *n >= self.per_ip {
            return Err(Refused::PerIp(self.per_ip));
        }
        *n += 1;
        open.0 += 1;
        Ok(ConnGuard {
            limits: self.clone(),
            ip,
        })
    }

    /// One client frame from `user`: `Err(wait)` when over the rate.
    pub fn frame(&self, user: &str) -> Result<(), Duration> {
        self.frames
            .check_key(&user.to_string())
            .map_err(|n| n.wait_time_from(DefaultClock::default().now()))
    }

    /// One HTTP request from `ip`: `Err(wait)` when over the rate.
    pub fn http(&self, ip: IpAddr) -> Result<(), Duration> {
        self.http
            .check_key(&ip)
            .map_err(|n| n.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets idle rate-limit keys, so memory follows active users.
    pub fn prune(&self) {
        self.frames.retain_recent();
        self.http.retain_recent();
    }
}

/// A held connection slot.
pub struct ConnGuard {
    limits: Arc<EdgeLimits>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("connections lock");
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_free() {
        let l = Limits {
            max_upload_bytes: 1,
            function_timeout: Duration::from_secs(1),
            job_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(1),
            max_connections: 3,
            connections_per_ip: 2,
            http_requests_per_sec_per_ip: 2,
            frames_per_sec_per_user: 2,
            subscriptions_per_user: 1,
            presence_ttl: Duration::from_secs(1),
            history_updates: 1,
            live_batch: Duration::ZERO,
        };
        let e = Arc::new(EdgeLimits::new(&l));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = e.connect(a).unwrap();
        let _g2 = e.connect(a).unwrap();
        assert_eq!(e.connect(a).err(), Some(Refused::PerIp(2)));
        let _g3 = e.connect(b).unwrap();
        assert_eq!(e.connect(b).err(), Some(Refused::Full(3)));
        drop(g1);
        assert!(e.connect(a).is_ok());
        assert!(e.frame("u").is_ok() && e.frame("u").is_ok());
        assert!(e.frame("u").is_err());
        assert!(e.frame("v").is_ok());
    }
}
