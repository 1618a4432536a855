//! `pulse-bench latency`: commit-to-client latency of live-table updates.
//!
//! Clients subscribe to a live table; writers commit single-row inserts at a fixed rate.
//! Each row carries `committed_at` (`clock_timestamp()` inside its one-statement
//! transaction, the anchor standing in for the commit time in the WAL); each client
//! measures the time from it to the moment the update arrives. Same machine, same clock.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pulse_harness::{PgCluster, Pulsed, wait_for};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::fanout::pulsed_path;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-02";
const ISSUER: &str = "https://symfony.bench";

const SCHEMA: &str = r#"
[tables.ticks]
source = "public.ticks"
tenant_column = "tenant_id"
columns = ["id", "tenant_id", "committed_at"]
roles = ["staff"]
"#;

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64
}

const COMMITTED_AT: &str = "\"committed_at\":\"";

/// Every `"committed_at":"<RFC 3339>"` in an `update` or `updates` frame, in
/// microseconds since the epoch, without a full parse (the clients must keep up with
/// thousands of updates a second each, on the machine pulsed runs on: the searcher is
/// built once, not per frame).
fn committed_micros(frame: &str, mut each: impl FnMut(i64)) {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(COMMITTED_AT));
    let mut rest = frame.as_bytes();
    while let Some(i) = FINDER.find(rest) {
        rest = &rest[i + COMMITTED_AT.len()..];
        let Some(end) = memchr::memchr(b'"', rest) else {
            return;
        };
        if let Some(t) = std::str::from_utf8(&rest[..end]).ok().and_then(rfc3339_micros) {
            each(t);
        }
        rest = &rest[end..];
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)` to microseconds since the epoch; anything
/// else goes through chrono.
fn rfc3339_micros(s: &str) -> Option<i64> {
    fn fast(s: &[u8]) -> Option<i64> {
        let num = |a: usize, b: usize| -> Option<i64> {
            let mut n = 0i64;
            for &c in s.get(a..b)? {
                if !c.is_ascii_digit() {
                    return None;
                }
                n = n * 10 + i64::from(c - b'0');
            }
            Some(n)
        };
        if s.len() < 20 || s[4] != b'-' || s[7] != b'-' || !matches!(s[10], b'T' | b' ') {
            return None;
        }
        let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
        let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
        let mut i = 19;
        let mut micros = 0i64;
        if s[i] == b'.' {
            i += 1;
            let start = i;
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
            }
            let digits = (i - start).min(6);
            micros = num(start, start + digits)? * 10i64.pow(6 - digits as u32);
        }
        let offset = match *s.get(i)? {
            b'Z' | b'z' => 0,
            sign @ (b'+' | b'-') => {
                let o = num(i + 1, i + 3)? * 3600 + num(i + 4, i + 6)? * 60;
                if sign == b'+' { o } else { -o }
            }
            _ => return None,
        };
        // Days from the civil date (proleptic Gregorian).
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (mo + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(((days * 86_400 + h * 3600 + mi * 60 + sec - offset) * 1_000_000) + micros)
    }
    fast(s.as_bytes()).or_else(|| Some(chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_micros()))
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// The readers' latencies: one histogram per thread of the clients' runtime, merged at
/// the end. One per client (a thousand of about 130 KB each) spread every sample over
/// memory that never stays in cache: recording took a sixth of the clients' CPU, time
/// taken from pulsed on this machine.
static SHARDS: Mutex<Vec<Arc<Mutex<Histogram<u64>>>>> = Mutex::new(Vec::new());

/// Runs `f` on this thread's histogram (uncontended until the merge).
fn record_here(f: impl FnOnce(&mut Histogram<u64>)) {
    thread_local! {
        static MINE: OnceCell<Arc<Mutex<Histogram<u64>>>> = const { OnceCell::new() };
    }
    MINE.with(|mine| {
        let h = mine.get_or_init(|| {
            let h = Arc::new(Mutex::new(new_histogram()));
            SHARDS.lock().expect("shards").push(h.clone());
            h
        });
        f(&mut h.lock().expect("histogram"));
    });
}

/// Runs the benchmark; prints the summary line last.
pub async fn run(quick: bool) -> Result<()> {
    let (mut clients, mut rate, mut seconds) = if quick {
        (100, 500u64, 5u64)
    } else {
        (1_000, 2_000u64, 30u64)
    };
    // Overrides for exploring (the figures that count are from the defaults).
    let knob = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = knob("PULSE_BENCH_CLIENTS") {
        clients = n as usize;
    }
    if let Some(n) = knob("PULSE_BENCH_RATE") {
        rate = n.max(1);
    }
    if let Some(n) = knob("PULSE_BENCH_SECONDS") {
        seconds = n.max(1);
    }
    let cluster: &'static PgCluster = Box::leak(Box::new(PgCluster::start()?));
    let db = cluster.fresh_db("latency").await?;
    let setup = db.connect().await?;
    setup
        .batch_execute(
            "CREATE TABLE ticks (id bigserial PRIMARY KEY, tenant_id text NOT NULL,
               committed_at timestamptz NOT NULL DEFAULT clock_timestamp());
             ALTER TABLE ticks REPLICA IDENTITY FULL;",
        )
        .await?;
    let dir = tempfile_dir()?;
    let schema = dir.join("schema.toml");
    std::fs::write(&schema, SCHEMA)?;
    let mut env = vec![
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__SCHEMA__PATH", schema.display().to_string()),
        ("PULSE__AUTH__ISSUER", ISSUER.into()),
        ("PULSE__AUTH__HS256_SECRET", SECRET.into()),
        ("PULSE__LIMITS__MAX_CONNECTIONS", "100000".into()),
        ("PULSE__LIMITS__CONNECTIONS_PER_IP", "100000".into()),
        ("PULSE__LOG__LEVEL", "warn".into()),
    ];
    // pulsed's own default unless set here, for exploring.
    if let Ok(ms) = std::env::var("PULSE__LIMITS__LIVE_BATCH_MS") {
        env.push(("PULSE__LIMITS__LIVE_BATCH_MS", ms));
    }
    let mut pulsed = Pulsed::spawn(&pulsed_path()?, &env)?;
    pulsed.wait_ready(Duration::from_secs(60)).await?;
    let readyz = format!("{}/readyz", pulsed.http);
    wait_for("the change stream to be up", Duration::from_secs(60), || {
        let url = readyz.clone();
        async move {
            let body: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            body["components"]
                .as_array()?
                .iter()
                .any(|c| c["name"] == "replication" && c["state"] == "up")
                .then_some(())
        }
    })
    .await?;
    let url = format!("{}/ws", pulsed.http.replace("http://", "ws://"));

    let received = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let frames = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..clients {
        let mut ws = crate::ws::connect(&url).await.context("connect")?;
        ws.send(Message::Text(
            json!({ "type": "hello", "protocol": 1, "token": crate::jwt::hs256(SECRET, ISSUER, &format!("u{i}"), "t1", "ROLE_STAFF") })
                .to_string()
                .into(),
        ))
        .await?;
        ws.send(Message::Text(
            json!({ "type": "subscribe", "id": "t", "query": "ticks" })
                .to_string()
                .into(),
        ))
        .await?;
        let mut answered = 0;
        while answered < 2 {
            match tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
                Some(Ok(Message::Text(t))) if t.contains("\"error\"") => bail!("client {i} refused: {t}"),
                Some(Ok(Message::Text(_))) => answered += 1,
                Some(Ok(_)) => {}
                _ => bail!("client {i} closed before subscribing"),
            }
        }
        let (received, closed, frames) = (received.clone(), closed.clone(), frames.clone());
        readers.push(tokio::spawn(async move {
            let (mut n, mut texts) = (0u64, 0u64);
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    // One clock reading per frame: every update in it arrived now.
                    let now = now_micros();
                    texts += 1;
                    record_here(|h| {
                        committed_micros(&t, |c| {
                            let _ = h.record((now - c).max(1) as u64);
                            n += 1;
                            if n.is_multiple_of(256) {
                                received.fetch_add(256, Ordering::Relaxed);
                            }
                        })
                    });
                }
            }
            received.fetch_add(n % 256, Ordering::Relaxed);
            frames.fetch_add(texts, Ordering::Relaxed);
            closed.fetch_add(1, Ordering::Relaxed);
        }));
    }
    println!("{clients} clients subscribed");

    // Writers: one connection per 100 commits/s, each paced to its share of the rate, so
    // that the rate asked is reached even when a commit's round trip takes several
    // milliseconds on a loaded machine.
    let writers = rate.div_ceil(100).max(1);
    // They run on a runtime of their own, on their own thread: on the clients' runtime a
    // writer would wait behind a thousand readers, and the rate asked would not be the
    // rate offered.
    let committed = Arc::new(AtomicU64::new(0));
    let (elapsed, commits) = {
        let url = db.url();
        let counter = committed.clone();
        let load = std::thread::spawn(move || -> Result<f64> {
            let committed = counter;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..writers {
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    tasks.push(c);
                }
                let stop = Instant::now() + Duration::from_secs(seconds);
                let t0 = Instant::now();
                let tasks: Vec<_> = tasks
                    .into_iter()
                    .map(|c| {
                        let committed = committed.clone();
                        tokio::spawn(async move {
                            let mut tick =
                                tokio::time::interval(Duration::from_secs_f64(writers as f64 / rate as f64));
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                            while Instant::now() < stop {
                                tick.tick().await;
                                if c.execute("INSERT INTO ticks (tenant_id) VALUES ('t1')", &[])
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                                committed.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await?;
                }
                Ok(t0.elapsed().as_secs_f64())
            })
        });
        let elapsed = tokio::task::spawn_blocking(move || load.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the writers' thread panicked"))??;
        (elapsed, committed.load(Ordering::Relaxed))
    };
    // Let the last updates arrive.
    let expected = commits * clients as u64;
    let _ = wait_for("the last updates", Duration::from_secs(10), || {
        let received = received.load(Ordering::Relaxed);
        async move { (received + 256 * clients as u64 >= expected).then_some(()) }
    })
    .await;
    pulsed.kill9();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    let mut h = new_histogram();
    for shard in SHARDS.lock().expect("shards").iter() {
        h.add(&*shard.lock().expect("histogram"))?;
    }
    let p50 = h.value_at_quantile(0.5) as f64 / 1000.0;
    let p99 = h.value_at_quantile(0.99) as f64 / 1000.0;
    let got = received.load(Ordering::Relaxed);
    println!(
        "{commits} commits in {elapsed:.1} s; {got} of {expected} updates received in {} frames; {} clients cut; max {:.1} ms",
        frames.load(Ordering::Relaxed),
        closed
            .load(Ordering::Relaxed)
            .saturating_sub(clients as u64)
            .min(clients as u64),
        h.max() as f64 / 1000.0
    );
    println!(
        "targets (p50 <= 5 ms, p99 <= 25 ms at 2000 commits/s, 1000 clients): {}",
        if !quick && p50 <= 5.0 && p99 <= 25.0 && commits as f64 / elapsed >= 1900.0 {
            "met"
        } else {
            "not met"
        }
    );
    drop(db);
    println!(
        "latency: p50 {p50:.2} ms, p99 {p99:.2} ms, clients {clients}, commits/s {:.0}",
        commits as f64 / elapsed
    );
    if got == 0 {
        bail!("no update reached any client");
    }
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("pulse-bench-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_like_chrono() {
        for t in [
            "2026-11-24T21:58:09.123456+00:00",
            "2026-11-24T21:58:09.1+02:00",
            "2024-02-29T23:59:59Z",
            "1999-12-31T00:00:00.999999999-05:30",
            "2026-03-01T00:00:00.000001+00:00",
        ] {
            let want = chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .timestamp_micros();
            assert_eq!(rfc3339_micros(t), Some(want), "{t}");
        }
        let mut seen = Vec::new();
        committed_micros(
            r#"{"type":"updates","updates":[{"row":{"committed_at":"2026-11-24T21:58:09Z"}},{"row":{"committed_at":"2026-11-24T21:58:10Z"}}]}"#,
            |c| seen.push(c),
        );
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1] - seen[0], 1_000_000);
    }
}
