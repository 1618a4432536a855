//! The `pulsed` binary: parses the command line, loads the configuration, installs
//! signal handlers, and hands over to the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use pulse_daemon::config::{Config, ConfigSource};
use pulse_daemon::{Control, Listeners, telemetry};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "pulsed",
    version,
    about = "Pulse: the realtime daemon beside Symfony and PostgreSQL"
)]
struct Cli {
    /// Config file (TOML). Without it, /etc/pulse/pulsed.toml if present, else built-in
    /// defaults; environment variables PULSE__SECTION__KEY override both.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Apply the pulse schema's migrations and exit.
    Migrate,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The replication slot pulsed reads from.
    Slot {
        #[command(subcommand)]
        command: SlotCommand,
    },
}

#[derive(Subcommand, Debug)]
enum SlotCommand {
    /// Position, lag, retained WAL, wal_status and the active PID of the slot.
    Status {
        /// Slot name; replication.slot when omitted.
        name: Option<String>,
    },
    /// Drop the slot (pulsed takes a new snapshot on its next start). Asks for
    /// confirmation unless --yes.
    Drop {
        /// Slot name; replication.slot when omitted.
        name: Option<String>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Show every effective value and where it came from (secrets masked); exit non-zero
    /// when anything is invalid.
    Check,
    /// Print the reference of every key (Markdown), as in the README.
    Reference,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = ConfigSource::from_cli(cli.config.as_deref());
    match cli.command.unwrap_or(Command::Run) {
        Command::Config {
            command: ConfigCommand::Check,
        } => config_check(&source),
        Command::Config {
            command: ConfigCommand::Reference,
        } => {
            print!("{}", pulse_daemon::config::reference_markdown());
            ExitCode::SUCCESS
        }
        Command::Migrate => with_runtime(|| migrate(source)),
        Command::Slot { command } => with_runtime(|| slot(source, command)),
        Command::Run => with_runtime(|| run(source)),
    }
}

fn with_runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pulsed: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pulsed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(source: &ConfigSource) -> anyhow::Result<Config> {
    Config::load(source).map_err(|e| anyhow::anyhow!("{e}"))
}

fn config_check(source: &ConfigSource) -> ExitCode {
    let result = Config::load(source);
    let width = pulse_daemon::config::KEYS
        .iter()
        .map(|k| k.key.len())
        .max()
        .unwrap_or(0);
    match result {
        Ok(config) => {
            for e in &config.effective {
                println!(
                    "{:width$}  {:40}  {}",
                    e.key,
                    if e.shown.is_empty() { "(empty)" } else { &e.shown },
                    e.origin
                );
            }
            println!("\nconfiguration is valid");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(source: ConfigSource) -> anyhow::Result<()> {
    let config = load(&source)?;
    let _log = telemetry::init_logging(&config.log_level, config.log_format)?;
    let mut client = pulse_daemon::db::connect(&config.state_db).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the state database {}: {}",
            config.state_db.masked(),
            pulse_daemon::db::explain(&e, &config.state_db)
        )
    })?;
    let report = pulse_daemon::migrate::migrate(&mut client).await?;
    if report.applied.is_empty() {
        println!("pulse schema already at version {}", report.current);
    } else {
        println!(
            "applied migrations {:?}; pulse schema at version {}",
            report.applied, report.current
        );
    }
    Ok(())
}

async fn slot(source: ConfigSource, command: SlotCommand) -> anyhow::Result<()> {
    let config = load(&source)?;
    let client = pulse_daemon::db::connect(&config.source_db).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the source database {}: {}",
            config.source_db.masked(),
            pulse_daemon::db::explain(&e, &config.source_db)
        )
    })?;
    let mib = |b: Option<i64>| {
        b.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
            .unwrap_or_else(|| "-".into())
    };
    match command {
        SlotCommand::Status { name } => {
            let name = name.unwrap_or(config.replication.slot.clone());
            let Some(s) = pulse_cdc::slot::status(&client, &name).await? else {
                anyhow::bail!(
                    "replication slot {name:?} does not exist; pulsed creates it on start when replication.create is true"
                );
            };
            let lsn = |l: Option<pulse_cdc::Lsn>| l.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
            println!("slot             {}", s.name);
            println!("plugin           {}", s.plugin.as_deref().unwrap_or("(physical)"));
            println!("database         {}", s.database.as_deref().unwrap_or("-"));
            println!("confirmed flush  {}", lsn(s.confirmed_flush));
            println!("restart lsn      {}", lsn(s.restart_lsn));
            println!("current wal      {}", s.current);
            println!("lag              {}", mib(s.lag_bytes));
            println!("retained wal     {}", mib(s.retained_bytes));
            println!("wal_status       {}", s.wal_status.as_deref().unwrap_or("-"));
            println!(
                "active pid       {}",
                s.active_pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "- (not streaming)".into())
            );
            Ok(())
        }
        SlotCommand::Drop { name, yes } => {
            let name = name.unwrap_or(config.replication.slot.clone());
            let Some(s) = pulse_cdc::slot::status(&client, &name).await? else {
                anyhow::bail!("replication slot {name:?} does not exist; nothing to drop");
            };
            if !yes {
                use std::io::{BufRead, IsTerminal, Write};
                if !std::io::stdin().is_terminal() {
                    anyhow::bail!(
                        "refusing to drop slot {name:?} without confirmation; run it in a terminal or pass --yes"
                    );
                }
                print!(
                    "Drop replication slot {name:?} (database {}, retaining {})? pulsed will take a new snapshot on its next start. Type the slot name to confirm: ",
                    s.database.as_deref().unwrap_or("-"),
                    mib(s.retained_bytes)
                );
                std::io::stdout().flush()?;
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer)?;
                if answer.trim() != name {
                    anyhow::bail!("not confirmed; slot {name:?} kept");
                }
            }
            pulse_cdc::slot::drop_slot(&client, &name).await?;
            println!("dropped replication slot {name:?}");
            Ok(())
        }
    }
}

async fn run(source: ConfigSource) -> anyhow::Result<()> {
    let config = load(&source)?;
    let log = telemetry::init_logging(&config.log_level, config.log_format)?;
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);

    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let handle = signals.handle();
    let token = shutdown.clone();
    let signal_task = tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    match Config::load(&ConfigSource::from_cli(
                        source.file.as_ref().filter(|f| f.1).map(|f| f.0.as_path()),
                    )) {
                        Ok(new) => {
                            let _ = reload_tx.send(new).await;
                        }
                        Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
                    }
                }
                _ => {
                    if token.is_cancelled() {
                        tracing::warn!("second stop signal; exiting now");
                        std::process::exit(1);
                    }
                    tracing::info!(signal, "stop signal received");
                    token.cancel();
                }
            }
        }
    });

    let control = Control {
        shutdown,
        reload: reload_rx,
        log: Some(log),
    };
    let result = pulse_daemon::run(config, listeners, control).await;
    handle.close();
    let _ = signal_task.await;
    result.map_err(Into::into)
}
