//! pulsetop: the Pulse operations console, for operators over SSH.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use crossterm::event::{Event, EventStream, KeyEventKind};
use futures_util::StreamExt;
use pulse_tui::endpoint::{Endpoint, default_admin_socket};
use pulse_tui::state::{Action, Effect, State, update};
use pulse_tui::{net, view};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The Pulse operations console.
#[derive(Debug, Parser)]
#[command(name = "pulsetop", version, about)]
struct Args {
    /// pulsed's admin socket (default: the daemon's default, under $XDG_RUNTIME_DIR or /tmp).
    #[arg(long, conflicts_with = "url")]
    socket: Option<PathBuf>,
    /// Connect over TCP instead, for example ws://127.0.0.1:8080/ws (needs the deploy key).
    #[arg(long)]
    url: Option<String>,
    /// File holding the deploy key, for --url.
    #[arg(long)]
    deploy_key_file: Option<PathBuf>,
    /// Where pulsetop writes its own log (never to the terminal).
    #[arg(long, env = "PULSETOP_LOG")]
    log_file: Option<PathBuf>,
}

fn default_log_file() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("pulse/pulsetop.log")
}

fn deploy_key(args: &Args) -> anyhow::Result<Option<String>> {
    if let Some(path) = &args.deploy_key_file {
        let key = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the deploy key file {}", path.display()))?;
        return Ok(Some(key.trim().to_string()));
    }
    Ok(std::env::var("PULSE_DEPLOY_KEY").ok().filter(|k| !k.is_empty()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let endpoint = match &args.url {
        Some(url) => Endpoint::from_url(url).map_err(anyhow::Error::msg)?,
        None => Endpoint::Unix(args.socket.clone().unwrap_or_else(default_admin_socket)),
    };
    let key = deploy_key(&args)?;
    if matches!(endpoint, Endpoint::Tcp { .. }) && key.is_none() {
        anyhow::bail!("--url needs the deploy key: --deploy-key-file PATH or PULSE_DEPLOY_KEY");
    }

    let log_path = args.log_file.clone().unwrap_or_else(default_log_file);
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = tracing_appender::rolling::never(
        log_path.parent().unwrap_or(std::path::Path::new(".")),
        log_path.file_name().unwrap_or_default(),
    );
    let (writer, _guard) = tracing_appender::non_blocking(file);
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PULSETOP_LOG_LEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    tracing::info!(endpoint = %endpoint.describe(), "pulsetop starting");

    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut state = State::new(endpoint.describe(), color);

    let shutdown = CancellationToken::new();
    let (req_tx, req_rx) = mpsc::channel::<net::Outgoing>(64);
    let (ev_tx, mut ev_rx) = mpsc::channel::<Action>(256);
    let net_task = tokio::spawn(net::run(endpoint, key, req_rx, ev_tx, shutdown.clone()));

    // A panic is recorded in the log file too (the terminal may be gone by then).
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(panic = %info, "pulsetop panicked");
        print(info);
    }));
    // ratatui::init enters the alternate screen in raw mode and installs a panic hook
    // that restores the terminal before the hook above runs.
    let mut terminal = ratatui::init();
    let result = run(&mut terminal, &mut state, &req_tx, &mut ev_rx).await;
    ratatui::restore();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), net_task).await;
    tracing::info!("pulsetop stopped");
    result
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The loop: draw, wait for one thing to happen (a key, the network, the clock),
/// reduce, carry out the effects. Nothing happens between events, so an idle console
/// wakes once a second.
async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    state: &mut State,
    requests: &mpsc::Sender<net::Outgoing>,
    events: &mut mpsc::Receiver<Action>,
) -> anyhow::Result<()> {
    let mut keys = EventStream::new();
    // SIGTERM and SIGHUP (the SSH session went away) end the console like `q`, so the
    // terminal is restored.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    state.now_ms = now_ms();
    loop {
        terminal.draw(|frame| view::render(state, frame))?;
        let action = tokio::select! {
            ev = keys.next() => match ev {
                Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => Action::Key(k),
                Some(Ok(Event::Resize(..))) => Action::Resize,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            Some(a) = events.recv() => a,
            _ = tick.tick() => Action::Tick { now_ms: now_ms() },
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
        };
        for effect in update(state, action) {
            match effect {
                Effect::Quit => return Ok(()),
                Effect::Request { id, request } => {
                    if requests.try_send((id.clone(), request)).is_err() {
                        // The network task is behind; the answer will never come, so
                        // let the reducer forget the request.
                        tracing::warn!(%id, "request queue full; dropped");
                        update(
                            state,
                            Action::Net(pulse_tui::state::NetEvent::Error {
                                id: Some(id),
                                error: pulse_shared::ErrorBody::new(
                                    pulse_shared::ErrorCode::Unavailable,
                                    "pulsetop's request queue is full; try again",
                                ),
                            }),
                        );
                    }
                }
            }
        }
    }
}
