//! `pulse-bench webhooks`: events through the outbox to RabbitMQ with publisher confirms,
//! beside a bare lapin publisher with confirms, same broker, same message bodies and
//! properties.
//!
//! Pulse: a real (release) pulsed relays while the benchmark commits N events to the
//! outbox in one transaction; the clock runs from that commit until a consumer has
//! received all N. Bare: the same N bodies, published by lapin in windows of the relay's
//! batch size, with at most two windows unconfirmed (the relay's depth); the clock runs
//! from the first publish until the consumer has received all N. The consumer is the same in both runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, ExchangeKind};
use pulse_daemon::outbox::{self, OutboxEvent};
use pulse_harness::{PgCluster, Pulsed, Rabbit, wait_for};
use serde_json::json;

/// Events per relay round, and the bare publisher's window.
const BATCH: usize = 500;

/// Counts deliveries on a fresh queue bound to `exchange`.
async fn counter(rabbit: &Rabbit, exchange: &str) -> Result<(lapin::Connection, Arc<AtomicU64>)> {
    let conn = rabbit.connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = Rabbit::unique("bench-webhooks-q");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Some(Ok(_)) = consumer.next().await {
            c.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok((conn, count))
}

async fn until_count(count: &AtomicU64, target: u64, timeout: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while count.load(Ordering::Relaxed) < target {
        if Instant::now() > deadline {
            bail!(
                "{what}: only {} of {target} messages arrived within {timeout:?}",
                count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn await_confirms(confirms: Vec<lapin::PublisherConfirm>) -> Result<()> {
    for c in confirms {
        match c.await? {
            Confirmation::Ack(None) => {}
            other => bail!("bare publisher: the broker did not take a message: {other:?}"),
        }
    }
    Ok(())
}

fn pulsed_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("pulsed");
    if !bin.exists() {
        bail!(
            "{} not found: build it beside pulse-bench (cargo build --release -p pulse-daemon -p pulse-bench)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Runs the benchmark; returns the summary line.
pub async fn run(quick: bool) -> Result<String> {
    let n: u32 = if quick { 10_000 } else { 100_000 };
    let rabbit = match std::env::var("PULSE_BENCH_AMQP_URL") {
        Ok(url) => Rabbit { url },
        Err(_) => Rabbit::from_env(),
    };
    let exchange = Rabbit::unique("bench-webhooks");
    let cluster = PgCluster::shared();
    let db = cluster.fresh_db("bench_webhooks").await?;
    let mut client = db.connect().await?;
    pulse_daemon::migrate::migrate(&mut client).await?;

    // --- Pulse: pulsed relays what one transaction commits.
    let (_consumer_conn, pulse_count) = counter(&rabbit, &exchange).await?;
    let mut pulsed = Pulsed::spawn(
        &pulsed_bin()?,
        &[
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__AMQP__URL", rabbit.url.clone()),
            ("PULSE__AMQP__EXCHANGE", exchange.clone()),
            ("PULSE__AMQP__COMMANDS_QUEUE", String::new()),
            ("PULSE__AMQP__PUBLISH_BATCH", BATCH.to_string()),
            ("PULSE__LOG__LEVEL", "warn".into()),
        ],
    )?;
    pulsed.wait_ready(Duration::from_secs(30)).await?;
    let http = pulsed.http.clone();
    wait_for("the relay to start", Duration::from_secs(30), || async {
        let body: serde_json::Value = reqwest::get(format!("{http}/readyz"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        body["components"]
            .as_array()?
            .iter()
            .any(|c| c["name"] == "broker" && c["detail"].as_str().is_some_and(|d| d.contains("relaying")))
            .then_some(())
    })
    .await
    .with_context(|| pulsed.log())?;

    let events: Vec<OutboxEvent> = (0..n)
        .map(|i| {
            OutboxEvent::new(
                "presence.joined",
                format!("bench-{i}"),
                format!("user:{}", i % 1000),
                json!({
                    "tenantId": "tenant-1",
                    "userId": (i % 1000).to_string(),
                    "resource": format!("document:{i}"),
                    "state": "editing",
                    "at": "2026-11-24T19:00:00Z",
                }),
            )
            .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let tx = client.transaction().await?;
    outbox::enqueue_all(&tx, &events).await?;
    let enqueue = started.elapsed();
    tx.commit().await?;
    let t0 = Instant::now();
    until_count(&pulse_count, n as u64, Duration::from_secs(600), "pulse relay")
        .await
        .with_context(|| pulsed.log())?;
    let pulse_secs = t0.elapsed().as_secs_f64();
    let pulse_rate = n as f64 / pulse_secs;
    let (bytes, class) = {
        let row = client
            .query_one("SELECT avg(length(payload::text))::float8 FROM pulse.outbox", &[])
            .await?;
        (row.get::<_, f64>(0), "App\\Message\\Pulse\\PresenceJoined")
    };
    println!(
        "webhooks: {n} events of {bytes:.0} bytes on average; enqueued in one transaction in {:.2} s",
        enqueue.as_secs_f64()
    );
    println!(
        "webhooks: pulse relay (batch {BATCH}, confirms, persistent, mandatory): {n} in {pulse_secs:.2} s = {pulse_rate:.0} msg/s"
    );
    drop(pulsed);

    // --- Bare: the same bodies and properties, published by lapin with confirms.
    let bodies: Vec<(String, String)> = client
        .query(
            "SELECT message_id, payload::text FROM pulse.outbox ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (_bare_consumer, bare_count) = counter(&rabbit, &exchange).await?;
    let conn = rabbit.connect().await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    // The same depth as the relay: a window is sent while the previous one's confirms
    // are awaited, so at most two windows are out at once.
    let t0 = Instant::now();
    let mut previous: Vec<lapin::PublisherConfirm> = Vec::new();
    for window in bodies.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(window.len());
        for (id, body) in window {
            confirms.push(
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "presence.joined".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        body.as_bytes(),
                        pulse_daemon::relay::event_properties(id, class),
                    )
                    .await?,
            );
        }
        await_confirms(std::mem::replace(&mut previous, confirms)).await?;
    }
    await_confirms(previous).await?;
    until_count(&bare_count, n as u64, Duration::from_secs(600), "bare publisher").await?;
    let bare_secs = t0.elapsed().as_secs_f64();
    let bare_rate = n as f64 / bare_secs;
    println!(
        "webhooks: bare lapin publisher (windows of {BATCH}, two in flight, confirms, same bodies and properties): {n} in {bare_secs:.2} s = {bare_rate:.0} msg/s"
    );
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    Ok(format!(
        "webhooks: pulse {pulse_rate:.0} msg/s, bare {bare_rate:.0} msg/s, ratio {:.2}",
        pulse_rate / bare_rate
    ))
}
