//! `pulse-bench fanout`: many concurrent WebSocket clients, presence heartbeats plus
//! notifications. Reports whether every client connected, the messages per second
//! delivered to clients, and pulsed's resident memory per idle connection.
//!
//! Every client is a member of one of a few tenants, subscribed to its tenant's presence
//! and to its own inbox. One driver per tenant moves between two pages (each move is an
//! `update` to every client of the tenant) and a service sends notifications to random
//! users. Delivered messages are counted on the client side.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use pulse_harness::{PgCluster, Pulsed};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::ws::Ws;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-01";
const ISSUER: &str = "https://symfony.bench";

/// The workload's size.
struct Plan {
    clients: usize,
    tenants: usize,
    heartbeats_per_sec: u64,
    notifications_per_sec: u64,
    seconds: u64,
}

/// pulsed's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// The pulsed binary beside this one (both come from the same `cargo build`).
pub fn pulsed_path() -> Result<std::path::PathBuf> {
    let p = std::env::current_exe()?.with_file_name("pulsed");
    if !p.exists() {
        bail!(
            "{} not found: build it with cargo build --release -p pulse-daemon",
            p.display()
        );
    }
    Ok(p)
}

/// Opens a session and waits until its subscriptions answered.
async fn open(url: &str, hello: serde_json::Value, subs: &[serde_json::Value]) -> Result<Ws> {
    let mut ws = crate::ws::connect(url).await?;
    ws.send(Message::Text(hello.to_string().into())).await?;
    for s in subs {
        ws.send(Message::Text(s.to_string().into())).await?;
    }
    let mut waiting = 1 + subs.len();
    while waiting > 0 {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no answer within 30 s")?
            .context("closed")??;
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("welcome") | Some("result") => waiting -= 1,
                Some("error") => bail!("refused: {t}"),
                _ => {}
            }
        }
    }
    Ok(ws)
}

/// Runs the benchmark; prints the summary line last.
pub async fn run(quick: bool) -> Result<()> {
    let plan = if quick {
        Plan {
            clients: 1_000,
            tenants: 4,
            heartbeats_per_sec: 400,
            notifications_per_sec: 200,
            seconds: 5,
        }
    } else {
        Plan {
            clients: 10_000,
            tenants: 10,
            heartbeats_per_sec: 250,
            notifications_per_sec: 1_000,
            seconds: 15,
        }
    };
    let cluster = PgCluster::start()?;
    let cluster: &'static PgCluster = Box::leak(Box::new(cluster));
    let db = cluster.fresh_db("fanout").await?;
    let deploy_key = "b".repeat(40);
    let mut pulsed = Pulsed::spawn(
        &pulsed_path()?,
        &[
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__AUTH__ISSUER", ISSUER.into()),
            ("PULSE__AUTH__HS256_SECRET", SECRET.into()),
            ("PULSE__PLATFORM__DEPLOY_KEY", deploy_key.clone()),
            ("PULSE__LIMITS__MAX_CONNECTIONS", "100000".into()),
            ("PULSE__LIMITS__CONNECTIONS_PER_IP", "100000".into()),
            ("PULSE__LIMITS__FRAMES_PER_SEC_PER_USER", "100000".into()),
            ("PULSE__LOG__LEVEL", "warn".into()),
        ],
    )?;
    pulsed.wait_ready(Duration::from_secs(60)).await?;
    let url = format!("{}/ws", pulsed.http.replace("http://", "ws://"));
    let before = rss_kib(pulsed.pid())?;
    println!("pulsed RSS before clients: {before} KiB");

    let delivered = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut readers = Vec::new();
    let mut drivers = Vec::new();
    let connect_limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..plan.clients {
        let url = url.clone();
        let permit = connect_limit.clone();
        let tenant = format!("t{}", i % plan.tenants);
        opening.spawn(async move {
            let _p = permit.acquire_owned().await;
            let user = format!("u{i}");
            let ws = open(
                &url,
                json!({ "type": "hello", "protocol": 1, "token": crate::jwt::hs256(SECRET, ISSUER, &user, &tenant, "ROLE_USER") }),
                &[
                    json!({ "type": "subscribe", "id": "p", "query": "presence" }),
                    json!({ "type": "subscribe", "id": "n", "query": "notifications" }),
                ],
            )
            .await;
            (i, ws)
        });
    }
    let mut connected = 0;
    let mut failures = 0;
    while let Some(r) = opening.join_next().await {
        let (i, ws) = r?;
        match ws {
            Ok(ws) => {
                connected += 1;
                let (sink, mut stream) = ws.split();
                if i < plan.tenants {
                    drivers.push(sink);
                }
                let delivered = delivered.clone();
                let closed = closed.clone();
                readers.push(tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        if matches!(m, Message::Text(_)) {
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    closed.fetch_add(1, Ordering::Relaxed);
                }));
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 {
                    eprintln!("a client could not connect: {e:#}");
                }
            }
        }
    }
    println!(
        "connected {connected}/{} clients in {:.1} s",
        plan.clients,
        started.elapsed().as_secs_f64()
    );
    // Idle: let allocations settle, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pulsed.pid())?;
    let per_conn = (idle.saturating_sub(before)) as f64 / connected.max(1) as f64;
    println!("pulsed RSS with {connected} idle clients: {idle} KiB ({per_conn:.1} KiB per connection)");

    let mut service = open(
        &url,
        json!({ "type": "hello", "protocol": 1, "deploy_key": deploy_key }),
        &[],
    )
    .await?;
    let stop = Instant::now() + Duration::from_secs(plan.seconds);
    let base = delivered.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let hb_every = Duration::from_secs_f64(plan.tenants as f64 / plan.heartbeats_per_sec as f64);
    let mut driving = Vec::new();
    for (t, mut sink) in drivers.into_iter().enumerate() {
        driving.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(hb_every);
            let mut n = 0u64;
            while Instant::now() < stop {
                tick.tick().await;
                n += 1;
                let frame = json!({ "type": "heartbeat", "resource": format!("/t{t}/page/{}", n % 2), "state": { "n": n } });
                if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                    break;
                }
            }
            sink
        }));
    }
    let clients = plan.clients;
    let tenants = plan.tenants;
    let notify_every = Duration::from_secs_f64(1.0 / plan.notifications_per_sec as f64);
    let notifier = tokio::spawn(async move {
        let mut tick = tokio::time::interval(notify_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut n = 0usize;
        while Instant::now() < stop {
            tick.tick().await;
            n += 1;
            let i = (n * 7919) % clients;
            let frame = json!({ "type": "mutate", "id": n.to_string(), "name": "notify",
                "args": { "tenant": format!("t{}", i % tenants), "user": format!("u{i}"), "title": "bench" } });
            if service
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
            // Drain answers so the service session is never the slow one.
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, service.next()).await {}
        }
        n
    });
    let mut keep = Vec::new();
    for d in driving {
        keep.push(d.await?);
    }
    let notifications = notifier.await?;
    let elapsed = t0.elapsed().as_secs_f64();
    // Frames in flight at the end arrive within a moment; count them too, over the time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = delivered.load(Ordering::Relaxed) - base;
    let rate = got as f64 / (elapsed + 0.5);
    println!(
        "load: {:.1} s, {} heartbeats/s planned across {} tenants, {} notifications sent, {} messages delivered, {} clients cut",
        elapsed,
        plan.heartbeats_per_sec,
        plan.tenants,
        notifications,
        got,
        closed.load(Ordering::Relaxed)
    );
    let targets_met = connected == plan.clients && rate >= 200_000.0 && per_conn <= 30.0;
    println!(
        "targets (all connected, >= 200000 msg/s, <= 30 KB per idle connection): {}",
        if targets_met { "met" } else { "not met" }
    );
    drop(keep);
    for r in readers {
        r.abort();
    }
    pulsed.kill9();
    drop(db);
    println!("fanout: clients {connected}, delivered {rate:.0} msg/s, rss per conn {per_conn:.1} KB");
    if connected == 0 {
        bail!("no client connected");
    }
    Ok(())
}
