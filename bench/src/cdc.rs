//! `pulse-bench cdc`: change data capture throughput beside pg_recvlogical.
//!
//! A throwaway cluster gets two logical slots (pgoutput) before a backlog is written
//! with pgbench: single-row transactions plus transactions of 100 rows. Then, one after
//! the other, pg_recvlogical drains the backlog through its slot (to a file, no fsync),
//! and pulsed (in this process, the library the binary wraps) drains it through the
//! other: decode, apply to its sink, persist the checkpoint, confirm. Each is timed from its start until its slot has confirmed the
//! end of the backlog.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pulse_harness::{PgCluster, pg_bindir};
use tokio_util::sync::CancellationToken;

const PUBLICATION: &str = "bench_pub";
const SLOT_RECV: &str = "bench_recvlogical";
const SLOT_PULSE: &str = "bench_pulse";

/// The workload's size.
struct Workload {
    single: u64,
    batches: u64,
    rows_per_batch: u64,
    clients: u64,
}

impl Workload {
    fn rows(&self) -> u64 {
        self.single + self.batches * self.rows_per_batch
    }
}

async fn confirmed(client: &tokio_postgres::Client, slot: &str) -> Result<i64> {
    let r = client
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(r.get::<_, Option<i64>>(0).unwrap_or(0))
}

async fn wait_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
    target: i64,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while confirmed(client, slot).await? < target {
        if Instant::now() > deadline {
            bail!("slot {slot} did not reach the end of the backlog within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Runs the benchmark and prints its summary line last.
pub async fn run(quick: bool) -> Result<()> {
    // Counts divide evenly among the pgbench clients.
    let w = if quick {
        Workload {
            single: 10_000,
            batches: 500,
            rows_per_batch: 100,
            clients: 4,
        }
    } else {
        Workload {
            single: 100_000,
            batches: 5_000,
            rows_per_batch: 100,
            clients: 4,
        }
    };
    let bindir = pg_bindir()?;
    eprintln!("cdc: starting a throwaway PostgreSQL cluster");
    let cluster: &'static PgCluster = Box::leak(Box::new(PgCluster::start()?));
    let db = cluster.fresh_db("bench_cdc").await?;
    let client = db.connect().await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE bench_items (id bigserial PRIMARY KEY, aid int NOT NULL, delta int NOT NULL, note text NOT NULL);
             CREATE PUBLICATION {PUBLICATION} FOR TABLE bench_items;"
        ))
        .await?;
    // One statement each: a slot cannot be made in a transaction that wrote.
    for slot in [SLOT_RECV, SLOT_PULSE] {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
    }
    // The table was empty when the slots were made: an empty state is exact at the
    // slot's position, so pulsed may start from it without a snapshot.
    let start_lsn: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT_PULSE],
        )
        .await?
        .get(0);

    // The backlog, written with pgbench.
    let dir = tempfile::tempdir()?;
    let single = dir.path().join("single.sql");
    std::fs::write(
        &single,
        "\\set aid random(1, 100000)\nINSERT INTO bench_items (aid, delta, note) VALUES (:aid, 1, 'single-row transaction');\n",
    )?;
    let batch = dir.path().join("batch.sql");
    std::fs::write(
        &batch,
        format!(
            "INSERT INTO bench_items (aid, delta, note) SELECT g, 2, 'one of {0} rows' FROM generate_series(1, {0}) g;\n",
            w.rows_per_batch
        ),
    )?;
    let port = cluster.port.to_string();
    let pgbench = |script: &Path, total: u64| -> Result<()> {
        pulse_harness::run_checked(
            Command::new(bindir.join("pgbench"))
                .args(["-n", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                .arg("-c")
                .arg(w.clients.to_string())
                .arg("-j")
                .arg("2")
                .arg("-t")
                .arg((total / w.clients).to_string())
                .arg("-f")
                .arg(script)
                .arg(&db.name),
            "pgbench",
        )
    };
    let started = Instant::now();
    pgbench(&single, w.single)?;
    pgbench(&batch, w.batches)?;
    let row = client
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8, pg_current_wal_insert_lsn()::text, \
                    (pg_current_wal_insert_lsn() - $1::text::pg_lsn)::int8, (SELECT count(*) FROM bench_items)",
            &[&start_lsn],
        )
        .await?;
    let (target, target_text, wal_bytes, rows): (i64, String, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let transactions = w.single + w.batches;
    println!(
        "backlog: {rows} rows in {transactions} transactions, {:.1} MiB of WAL, written in {:.1} s",
        wal_bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    if rows as u64 != w.rows() {
        bail!("pgbench wrote {rows} rows, not the expected workload");
    }

    // pg_recvlogical through its own slot.
    let out = dir.path().join("recvlogical.out");
    let t = Instant::now();
    pulse_harness::run_checked(
        Command::new(bindir.join("pg_recvlogical"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", &db.name])
            .args(["--slot", SLOT_RECV, "--start", "-F", "0", "--no-loop"])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={PUBLICATION}"))
            .arg("--endpos")
            .arg(&target_text)
            .arg("-f")
            .arg(&out),
        "pg_recvlogical",
    )?;
    wait_confirmed(&client, SLOT_RECV, target, Duration::from_secs(60)).await?;
    let recv_secs = t.elapsed().as_secs_f64();
    let recv_rate = rows as f64 / recv_secs;
    println!(
        "pg_recvlogical: drained {rows} rows in {recv_secs:.2} s ({:.1} MiB written): {recv_rate:.0} rows/s",
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0
    );

    // pulsed through the other, in this process: its schema first, and its (empty)
    // state's checkpoint at the slot's start.
    let mut admin = db.connect().await?;
    pulse_daemon::migrate::migrate(&mut admin).await?;
    client
        .execute(
            "INSERT INTO pulse.checkpoints (name, lsn) VALUES ($1, $2::text::pg_lsn)",
            &[&SLOT_PULSE, &start_lsn],
        )
        .await?;
    let sink = std::env::var("PULSE_BENCH_CDC_SINK").unwrap_or_else(|_| "checkpoint".into());
    let state_dir = tempfile::tempdir()?;
    let env: Vec<(String, String)> = [
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__REPLICATION__SLOT", SLOT_PULSE.to_string()),
        ("PULSE__REPLICATION__PUBLICATION", PUBLICATION.to_string()),
        ("PULSE__REPLICATION__TABLES", "public.bench_items".to_string()),
        ("PULSE__REPLICATION__SINK", sink.clone()),
        ("PULSE__METRICS__LISTEN", String::new()),
        (
            "PULSE__STORAGE__PATH",
            state_dir.path().join("files").display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = pulse_daemon::config::Config::load(&pulse_daemon::config::ConfigSource { file: None, env })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listeners = pulse_daemon::Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        metrics: None,
        admin: pulse_daemon::bind_admin_socket(&state_dir.path().join("admin.sock"), 0o600)?,
    };
    let shutdown = CancellationToken::new();
    let (control, _reload) = pulse_daemon::Control::new(shutdown.clone());
    let cpu_before = process_cpu();
    let sys_before = process_sys_cpu();
    let t = Instant::now();
    let daemon = tokio::spawn(pulse_daemon::run(config, listeners, control));
    let mut streaming_after = None;
    while streaming_after.is_none() && t.elapsed() < Duration::from_secs(60) {
        let active: bool = client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT_PULSE],
            )
            .await?
            .get(0);
        if active {
            streaming_after = Some(t.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    wait_confirmed(&client, SLOT_PULSE, target, Duration::from_secs(600)).await?;
    let pulse_secs = t.elapsed().as_secs_f64();
    let pulse_cpu = process_cpu() - cpu_before;
    let pulse_sys = process_sys_cpu() - sys_before;
    let pulse_rate = rows as f64 / pulse_secs;
    let applied: Option<String> = client
        .query_opt(
            "SELECT lsn::text FROM pulse.checkpoints WHERE name = $1",
            &[&SLOT_PULSE],
        )
        .await?
        .map(|r| r.get(0));
    println!(
        "pulse ({sink} sink): drained {rows} rows in {pulse_secs:.2} s (streaming after {:.2} s of start-up), checkpoint at {}: {pulse_rate:.0} rows/s",
        streaming_after.unwrap_or_default().as_secs_f64(),
        applied.unwrap_or_default()
    );
    let rendered = pulse_daemon::telemetry::metrics_handle().render();
    let metric = |name: &str| {
        rendered
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    println!(
        "pulse: {pulse_cpu:.2} s of CPU in pulsed while draining ({pulse_sys:.2} s of it in the kernel)"
    );
    let batches = metric("pulse_replication_batches_total");
    if batches > 0.0 {
        println!(
            "pulse: {batches:.0} state-database commits, {:.0} transactions each on average",
            metric("pulse_replication_transactions_total") / batches
        );
    }
    for slot in [SLOT_RECV, SLOT_PULSE] {
        if let Some(r) = client
            .query_opt(
                "SELECT spill_txns, spill_bytes, stream_txns, stream_bytes, total_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
        {
            println!(
                "{slot}: decoded {} transactions; spilled {} ({:.1} MiB), streamed {} ({:.1} MiB)",
                r.get::<_, i64>(4),
                r.get::<_, i64>(0),
                r.get::<_, i64>(1) as f64 / 1048576.0,
                r.get::<_, i64>(2),
                r.get::<_, i64>(3) as f64 / 1048576.0
            );
        }
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), daemon)
        .await
        .context("pulsed did not stop")??
        .map_err(|e| anyhow::anyhow!("pulsed: {e}"))?;
    drop(client);
    drop(db);
    println!(
        "cdc: pulse {pulse_rate:.0} rows/s, pg_recvlogical {recv_rate:.0} rows/s, ratio {:.2}",
        pulse_rate / recv_rate
    );
    Ok(())
}

/// CPU time of this process so far (user + system), in seconds, from /proc.
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// System CPU time of this process so far, in seconds.
fn process_sys_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    rest.split_whitespace()
        .nth(12)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 100.0
}
