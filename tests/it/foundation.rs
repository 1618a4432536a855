//! Foundation: migrations, configuration, lifecycle, health, admin socket.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use pulse_daemon::config::{Config, ConfigSource};
use pulse_daemon::migrate::{self, MigrateError};
use pulse_harness::{PgCluster, Pulsed, wait_for};
use pulse_shared::ErrorCode;
use pulse_shared::admin::{AdminRequest, AdminResponse, HealthState};
use pulse_shared::protocol::{ClientFrame, ServerFrame};

use crate::support::{AdminClient, InProcess, pulsed_bin};

fn config_for(url: &str, extra: &[(&str, &str)]) -> Config {
    let mut env = vec![("PULSE__SOURCE__URL".to_string(), url.to_string())];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load(&ConfigSource { file: None, env }).expect("valid test config")
}

#[tokio::test]
async fn two_concurrent_migrations_apply_each_file_once() {
    let db = PgCluster::shared().fresh_db("migrate_twice").await.unwrap();
    let mut a = db.connect().await.unwrap();
    let mut b = db.connect().await.unwrap();
    let (ra, rb) = tokio::join!(migrate::migrate(&mut a), migrate::migrate(&mut b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let mut all = ra.applied.clone();
    all.extend(&rb.applied);
    all.sort();
    let expected: Vec<i32> = migrate::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(
        all, expected,
        "each migration applied by exactly one of the two runs"
    );
    let n: i64 = a
        .query_one("SELECT count(*) FROM pulse.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, expected.len());
    assert!(migrate::is_current(&a).await.unwrap());
    // Running again applies nothing.
    assert!(migrate::migrate(&mut a).await.unwrap().applied.is_empty());
}

#[tokio::test]
async fn an_edited_applied_migration_stops_the_start() {
    let db = PgCluster::shared().fresh_db("migrate_tamper").await.unwrap();
    let mut c = db.connect().await.unwrap();
    migrate::migrate(&mut c).await.unwrap();
    c.execute(
        "UPDATE pulse.schema_migrations SET checksum = 'abc' WHERE version = 1",
        &[],
    )
    .await
    .unwrap();
    match migrate::migrate(&mut c).await {
        Err(MigrateError::ChecksumMismatch { version: 1, .. }) => {}
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    // The binary refuses to start and says why.
    let out = Command::new(pulsed_bin())
        .args(["--config", "/dev/null", "migrate"])
        .env("PULSE__SOURCE__URL", db.url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("migration 1") && stderr.contains("checksum"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_migration_from_a_newer_pulsed_is_refused() {
    let db = PgCluster::shared().fresh_db("migrate_newer").await.unwrap();
    let mut c = db.connect().await.unwrap();
    migrate::migrate(&mut c).await.unwrap();
    c.execute(
        "INSERT INTO pulse.schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')",
        &[],
    )
    .await
    .unwrap();
    assert!(matches!(
        migrate::migrate(&mut c).await,
        Err(MigrateError::Unknown { version: 9999, .. })
    ));
}

#[test]
fn config_check_names_the_bad_key_and_its_source() {
    let out = Command::new(pulsed_bin())
        .args(["--config", "/dev/null", "config", "check"])
        .env("PULSE__HTTP__LISTEN", "nonsense")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("http.listen"), "{stderr}");
    assert!(stderr.contains("environment PULSE__HTTP__LISTEN"), "{stderr}");
}

#[test]
fn config_check_masks_the_deploy_key() {
    let key = "0123456789abcdef0123456789abcdef-secret";
    let out = Command::new(pulsed_bin())
        .args(["--config", "/dev/null", "config", "check"])
        .env("PULSE__PLATFORM__DEPLOY_KEY", key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(key), "deploy key shown in clear:\n{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("platform.deploy_key"))
        .unwrap();
    assert!(
        line.contains("***") && line.contains("environment PULSE__PLATFORM__DEPLOY_KEY"),
        "{line}"
    );
}

#[tokio::test]
async fn pulsed_runs_answers_readyz_and_stops_on_sigterm() {
    let db = PgCluster::shared().fresh_db("run_sigterm").await.unwrap();
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &[("PULSE__SOURCE__URL", db.url())]).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();

    let http = reqwest::Client::new();
    let health = http.get(format!("{}/healthz", pulsed.http)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready: serde_json::Value = http
        .get(format!("{}/readyz", pulsed.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert!(
        ready["components"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "state_db" && c["state"] == "up"),
        "{ready}"
    );
    let metrics = http
        .get(format!("{}/metrics", pulsed.metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);

    // The migrations were applied by `run`.
    let client = db.connect().await.unwrap();
    assert!(migrate::is_current(&client).await.unwrap());

    pulsed.signal(Signal::SIGTERM).unwrap();
    let status = pulsed.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status {status}; log:\n{}", pulsed.log());
    assert!(
        !pulsed.admin_socket.exists()
            || std::os::unix::net::UnixStream::connect(&pulsed.admin_socket).is_err()
    );
}

#[tokio::test]
async fn sighup_reloads_the_log_level() {
    let db = PgCluster::shared().fresh_db("sighup").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pulsed.toml");
    std::fs::write(&path, "[log]\nlevel = \"info\"\n").unwrap();
    let mut pulsed =
        Pulsed::spawn_with_config(&pulsed_bin(), &path, &[("PULSE__SOURCE__URL", db.url())]).unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();
    std::fs::write(
        &path,
        "[log]\nlevel = \"debug\"\n[limits]\nmax_upload_bytes = 1000\n",
    )
    .unwrap();
    pulsed.signal(Signal::SIGHUP).unwrap();
    wait_for("the reload to be logged", Duration::from_secs(5), || async {
        let log = pulsed.log();
        (log.contains("log level changed") && log.contains("limits changed")).then_some(())
    })
    .await
    .unwrap();
    pulsed.signal(Signal::SIGTERM).unwrap();
    assert!(pulsed.wait_exit(Duration::from_secs(10)).await.unwrap().success());
}

#[tokio::test]
async fn admin_socket_speaks_the_protocol() {
    let db = PgCluster::shared().fresh_db("admin_socket").await.unwrap();
    let key = "k".repeat(40);
    let mut pulsed = Pulsed::spawn(
        &pulsed_bin(),
        &[
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__PLATFORM__DEPLOY_KEY", key.clone()),
        ],
    )
    .unwrap();
    pulsed.wait_ready(Duration::from_secs(20)).await.unwrap();
    let mode = std::fs::metadata(&pulsed.admin_socket).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.unwrap(), 0o660);

    let mut c = AdminClient::connect(&pulsed.admin_socket).await.unwrap();
    // A malformed frame before hello ends the session with an error.
    c.send_raw("{nonsense").await.unwrap();
    assert!(
        matches!(c.recv().await.unwrap(), ServerFrame::Error { error, .. } if error.code == ErrorCode::InvalidArgument)
    );

    let mut c = AdminClient::welcomed(&pulsed.admin_socket).await.unwrap();
    // Malformed frames after hello get an error and the session stays up.
    c.send_raw(r#"{"type":"teleport"}"#).await.unwrap();
    assert!(
        matches!(c.recv().await.unwrap(), ServerFrame::Error { error, .. } if error.code == ErrorCode::InvalidArgument)
    );
    c.send(&ClientFrame::Admin {
        id: "1".into(),
        request: AdminRequest::Status,
    })
    .await
    .unwrap();
    match c.recv().await.unwrap() {
        ServerFrame::Admin { id, response } => {
            assert_eq!(id, "1");
            let AdminResponse::Status(report) = *response else {
                panic!("expected a status")
            };
            let db_health = report.components.iter().find(|c| c.name == "state_db").unwrap();
            assert_eq!(db_health.state, HealthState::Up);
        }
        other => panic!("expected an admin answer, got {other:?}"),
    }
    c.send(&ClientFrame::Admin {
        id: "2".into(),
        request: AdminRequest::Config,
    })
    .await
    .unwrap();
    match c.recv().await.unwrap() {
        ServerFrame::Admin { response, .. } => {
            let AdminResponse::Config { entries } = *response else {
                panic!("expected config")
            };
            let dk = entries.iter().find(|e| e.key == "platform.deploy_key").unwrap();
            assert_eq!(dk.value, "***");
            assert!(entries.iter().all(|e| !e.value.contains(&key)));
        }
        other => panic!("expected an admin answer, got {other:?}"),
    }
    // A second pulsed refuses to take over the live socket.
    let out = Command::new(pulsed_bin())
        .args(["--config", "/dev/null", "run"])
        .env("PULSE__SOURCE__URL", db.url())
        .env("PULSE__HTTP__LISTEN", "127.0.0.1:0")
        .env("PULSE__METRICS__LISTEN", "")
        .env("PULSE__ADMIN__SOCKET", &pulsed.admin_socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another pulsed"));
}

#[tokio::test]
async fn readyz_follows_the_state_database() {
    let cluster: &'static PgCluster = Box::leak(Box::new(PgCluster::start().unwrap()));
    let db = cluster.fresh_db("readyz").await.unwrap();
    let daemon = InProcess::start(&[("PULSE__SOURCE__URL", db.url())]).await;
    let base = daemon.base.clone();

    let http = reqwest::Client::new();
    let status = |http: reqwest::Client, base: String| async move {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    };
    wait_for("ready", Duration::from_secs(20), || async {
        (status(http.clone(), base.clone()).await == Some(200)).then_some(())
    })
    .await
    .unwrap();
    cluster.stop().unwrap();
    wait_for(
        "not ready once the database is gone",
        Duration::from_secs(20),
        || async { (status(http.clone(), base.clone()).await == Some(503)).then_some(()) },
    )
    .await
    .unwrap();
    cluster.restart().unwrap();
    wait_for("ready again", Duration::from_secs(20), || async {
        (status(http.clone(), base.clone()).await == Some(200)).then_some(())
    })
    .await
    .unwrap();
    daemon.stop().await;
}

#[tokio::test]
async fn a_settings_edit_is_validated_stored_audited_and_live() {
    use pulse_daemon::settings::{SettingError, Settings};
    let db = PgCluster::shared().fresh_db("settings").await.unwrap();
    let mut client = db.connect().await.unwrap();
    migrate::migrate(&mut client).await.unwrap();
    let config = config_for(&db.url(), &[]);
    let settings = Settings::new(&config.platform);
    let mut live = settings.subscribe();

    settings
        .update(&mut client, "sync_interval_ms", "250", "ops@example.org")
        .await
        .unwrap();
    assert_eq!(settings.current().sync_interval_ms, 250);
    assert!(live.has_changed().unwrap());
    assert_eq!(live.borrow_and_update().sync_interval_ms, 250);

    // Invalid values are refused and nothing is stored or audited.
    let err = settings
        .update(&mut client, "sync_interval_ms", "0", "ops")
        .await
        .unwrap_err();
    assert!(matches!(err, SettingError::Invalid { .. }));
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(matches!(
        settings.update(&mut client, "colour", "blue", "ops").await,
        Err(SettingError::UnknownKey(_))
    ));

    // A deploy key rotation is audited without the key, and stored only as a digest.
    let key = "r".repeat(48);
    settings
        .update(&mut client, "deploy_key", &key, "ops@example.org")
        .await
        .unwrap();
    assert!(settings.deploy_key_matches(&key));
    let audit = client
        .query(
            "SELECT actor, target, details::text FROM pulse.audit_log ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 2, "one audit row per accepted edit");
    assert_eq!(audit[0].get::<_, String>(1), "sync_interval_ms");
    let stored: String = client
        .query_one(
            "SELECT value::text FROM pulse.settings WHERE key = 'deploy_key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for row in &audit {
        assert!(!row.get::<_, String>(2).contains(&key));
    }
    assert!(!stored.contains(&key));

    // Another instance sees the edits on refresh.
    let other = Settings::new(&config.platform);
    other.refresh(&client).await.unwrap();
    assert_eq!(other.current().sync_interval_ms, 250);
    assert!(other.deploy_key_matches(&key));
    assert!(other.list().iter().any(|v| v.source.contains("ops@example.org")));
}

#[test]
fn the_systemd_unit_is_hardened() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/pulsed.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", unit])
        .output()
        .expect("systemd-analyze is installed (scripts/test installs systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure line:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score from {line:?}"));
    assert!(score <= 2.0, "exposure {score} > 2.0: {line}");
    let unit_text = std::fs::read_to_string(unit).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "TimeoutStopSec=",
        "EnvironmentFile=",
        "StateDirectory=pulse",
        "RuntimeDirectory=pulse",
    ] {
        assert!(unit_text.contains(needed), "the unit lacks {needed}");
    }
}

/// pulsed speaks the sd_notify protocol: READY=1 once it serves, WATCHDOG=1 while its
/// loops run, STOPPING=1 on SIGTERM. A datagram socket stands in for systemd's.
#[tokio::test]
async fn systemd_notifications_follow_the_lifecycle() {
    let db = PgCluster::shared().fresh_db("sd_notify").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut pulsed = Pulsed::spawn(
        &pulsed_bin(),
        &[
            ("PULSE__SOURCE__URL", db.url()),
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "2000000".to_string()),
        ],
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut drain = |seen: &mut String| {
        while let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    };
    let ready_seen = wait_for("READY=1", Duration::from_secs(20), || {
        drain(&mut seen);
        let done = seen.contains("READY=1");
        async move { done.then_some(()) }
    })
    .await;
    ready_seen.unwrap_or_else(|e| panic!("{e}; got {seen:?}; log:\n{}", pulsed.log()));
    // The watchdog interval is 2 s: pings come every second while the loops tick.
    wait_for("WATCHDOG=1 pings to keep coming", Duration::from_secs(10), || {
        drain(&mut seen);
        let done = seen.matches("WATCHDOG=1").count() >= 4;
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    pulsed.signal(Signal::SIGTERM).unwrap();
    assert!(pulsed.wait_exit(Duration::from_secs(10)).await.unwrap().success());
    drain(&mut seen);
    assert!(seen.contains("STOPPING=1"), "{seen:?}");
}

/// The README's configuration reference lists every key pulsed knows.
#[test]
fn the_readme_documents_every_config_key() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for key in pulse_daemon::config::KEYS {
        let row = format!("| `{}` |", key.key);
        assert!(
            readme.contains(&row),
            "README.md lacks the config key {}; run `pulsed config reference`",
            key.key
        );
        assert!(readme.contains(&pulse_daemon::config::env_var_for(key.key)));
    }
}

/// The broker the suite uses is reachable, and per-test names keep tests apart.
#[tokio::test]
async fn the_broker_round_trips_with_confirms_on_unique_names() {
    use futures_util::StreamExt;
    use lapin::options::*;
    use lapin::types::FieldTable;
    let rabbit = pulse_harness::Rabbit::from_env();
    let conn = rabbit.connect().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let exchange = pulse_harness::Rabbit::unique("x");
    let queue = pulse_harness::Rabbit::unique("q");
    assert_ne!(exchange, pulse_harness::Rabbit::unique("x"));
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            exchange.as_str().into(),
            "pulse.test".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"hello",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, b"hello");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    conn.close(200, "done".into()).await.unwrap();
}
