//! Logs and metrics set-up.
//!
//! Logs go to journald when systemd started us (JOURNAL_STREAM is set) or when asked,
//! else to stderr as text or JSON. The log filter can be swapped at run time (SIGHUP).
//! Metrics use the `metrics` facade with one Prometheus recorder per process.
//! Every event the log filter lets through at INFO and above is also kept in the
//! process's [`LogBuffer`] for the console.

use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, reload};

use crate::config::LogFormat;
use crate::logbuf::{LogBuffer, LogLayer};

/// Changes the log filter of the running process.
pub struct LogHandle(reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl LogHandle {
    /// Applies a new filter (already validated by the config).
    pub fn set_level(&self, filter: &str) -> Result<(), String> {
        let f = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        let cap = log_records_cap(&f);
        self.0.reload(f).map_err(|e| e.to_string())?;
        log::set_max_level(cap);
        Ok(())
    }
}

/// The most verbose `log` crate record (tungstenite's, hyper's) the filter can let
/// through. The `log` macros compare with it before doing anything else; left at the
/// default the subscriber stack gives (everything, because the filter can be swapped at
/// run time), each of tungstenite's per-frame trace records went through the
/// subscriber to be refused: about 4% of pulsed's CPU in the latency benchmark.
fn log_records_cap(filter: &EnvFilter) -> log::LevelFilter {
    match filter.max_level_hint() {
        Some(l) if l == LevelFilter::OFF => log::LevelFilter::Off,
        Some(l) if l == LevelFilter::ERROR => log::LevelFilter::Error,
        Some(l) if l == LevelFilter::WARN => log::LevelFilter::Warn,
        Some(l) if l == LevelFilter::INFO => log::LevelFilter::Info,
        Some(l) if l == LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Installs the global subscriber. Call once, from the binary.
pub fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<LogHandle> {
    let filter = EnvFilter::try_new(level)?;
    let cap = log_records_cap(&filter);
    let (filter, handle) = reload::Layer::new(filter);
    let format = match format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let output: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => Box::new(filter.and_then(layer)),
            Err(e) => {
                eprintln!("journald unavailable ({e}); logging to stderr");
                Box::new(filter.and_then(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)))
            }
        },
        LogFormat::Json => Box::new(
            filter.and_then(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            ),
        ),
        _ => Box::new(filter.and_then(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))),
    };
    let console = LogLayer(log_buffer()).with_filter(LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(output)
        .with(console)
        .try_init()?;
    // After try_init, which sets its own (see log_records_cap).
    log::set_max_level(cap);
    Ok(LogHandle(handle))
}

/// The process-wide Prometheus recorder; installed on first use. Several daemons in one
/// test process share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Latencies as real histograms (not summaries), with buckets around the
            // product page's thresholds (query p50 200 ms, mutation p50 500 ms).
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_latency_seconds".into()),
                    &buckets,
                )
                .expect("fixed, non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then ours only
            // renders what it sees, which is nothing, and that is acceptable in tests.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The process-wide log buffer the console reads. Empty when [`init_logging`] was not
/// called (daemons started in-process by tests).
pub fn log_buffer() -> Arc<LogBuffer> {
    static BUFFER: OnceLock<Arc<LogBuffer>> = OnceLock::new();
    BUFFER.get_or_init(|| Arc::new(LogBuffer::default())).clone()
}
