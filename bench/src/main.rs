//! pulse-bench: the benchmarks of TARGETS.md. Each starts what it needs (a throwaway
//! PostgreSQL cluster, pulsed, nginx), measures Pulse beside its anchor in the same run,
//! and ends with one summary line.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cdc;
mod fanout;
mod files;
mod jwt;
mod latency;
mod presence_load;
mod webhooks;
mod ws;

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

#[derive(Subcommand, Debug, Clone)]
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
    /// Not a benchmark: simulated people online, for the demo.
    PresenceLoad(presence_load::PresenceLoad),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pulse-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let name = match &cli.bench {
        Bench::Cdc => "cdc",
        Bench::Latency => "latency",
        Bench::Fanout => "fanout",
        Bench::Webhooks => "webhooks",
        Bench::Files => "files",
        Bench::PresenceLoad(_) => "presence-load",
    };
    let result = runtime.block_on(async {
        match cli.bench {
            Bench::Cdc => cdc::run(cli.quick).await,
            Bench::Latency => latency::run(cli.quick).await,
            Bench::Fanout => fanout::run(cli.quick).await,
            Bench::Webhooks => webhooks::run(cli.quick)
                .await
                .map(|summary| println!("{summary}")),
            Bench::Files => files::run(cli.quick).await,
            Bench::PresenceLoad(load) => presence_load::run(load).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pulse-bench {name} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
