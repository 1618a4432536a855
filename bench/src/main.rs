//! pulse-bench: the benchmarks of TARGETS.md. Each starts what it needs (a throwaway
//! PostgreSQL cluster, pulsed, nginx), measures Pulse beside its anchor in the same run,
//! and ends with one summary line.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod fanout;
mod files;
mod latency;

#[derive(Parser, Debug)]
#[command(
    name = "pulse-bench",
    version,
    about = "Pulse benchmarks, each beside its anchor"
)]
struct Cli {
    /// A smaller workload for a first look; the figures that count are from the full one.
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum Bench {
    /// Change data capture throughput, beside pg_recvlogical.
    Cdc,
    /// Commit-to-client latency with 1,000 subscribed WebSocket clients.
    Latency,
    /// 10,000 WebSocket clients: delivery rate and memory per connection.
    Fanout,
    /// Outbox to RabbitMQ with confirms, beside a bare publisher.
    Webhooks,
    /// Uploads and downloads, beside nginx.
    Files,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Bench::Files = cli.bench {
        return finish(runtime().block_on(files::run(cli.quick)));
    }
    if matches!(cli.bench, Bench::Fanout | Bench::Latency) {
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("pulse-bench: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let result = match cli.bench {
            Bench::Fanout => runtime.block_on(fanout::run(cli.quick)),
            _ => runtime.block_on(latency::run(cli.quick)),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pulse-bench {:?} failed: {e:#}", cli.bench);
                ExitCode::FAILURE
            }
        };
    }
    let name = format!("{:?}", cli.bench).to_lowercase();
    eprintln!("pulse-bench {name}: this benchmark is not written yet; see the open issues");
    ExitCode::from(2)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Exit status of a finished benchmark: non-zero, with the reason, when it failed.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pulse-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
