//! Every screen drawn into ratatui's TestBackend from fixed data, compared with the
//! committed insta snapshots; and the frame time of the presence screen with 10,000
//! users online.

use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use pulse_shared::admin::*;
use pulse_shared::{ErrorBody, ErrorCode};
use pulse_tui::state::{Action, NetEvent, State, update};
use pulse_tui::view::render;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::style::Color;

/// 2026-11-24 10:00:00 UTC.
const T0: i64 = 1_795_514_400_000;

fn answer(s: &mut State, kind: &str, response: AdminResponse) {
    update(
        s,
        Action::Net(NetEvent::Response {
            id: format!("{kind}#0"),
            response,
        }),
    );
}

fn fail(s: &mut State, kind: &str, code: ErrorCode, message: &str) {
    update(
        s,
        Action::Net(NetEvent::Error {
            id: Some(format!("{kind}#0")),
            error: ErrorBody::new(code, message),
        }),
    );
}

fn key(s: &mut State, code: KeyCode) {
    update(s, Action::Key(KeyEvent::new(code, KeyModifiers::NONE)));
}

fn connected() -> State {
    let mut s = State::new("unix:/run/pulse/admin.sock".into(), true);
    update(
        &mut s,
        Action::Net(NetEvent::Connected {
            server_version: "0.1.0".into(),
            roles: vec!["service".into()],
        }),
    );
    s.now_ms = T0;
    s
}

fn status() -> AdminResponse {
    AdminResponse::Status(StatusReport {
        version: "0.1.0".into(),
        uptime_secs: 3725,
        components: vec![
            ComponentHealth {
                name: "broker".into(),
                state: HealthState::Degraded,
                detail: "reconnecting; outbox holds 12".into(),
            },
            ComponentHealth {
                name: "state_db".into(),
                state: HealthState::Up,
                detail: "reachable, migrated".into(),
            },
        ],
    })
}

fn slot(lsn: &str, lag: i64) -> ReplicationReport {
    ReplicationReport {
        current_lsn: "0/3A00000".into(),
        slots: vec![SlotInfo {
            name: "pulse_main".into(),
            plugin: "pgoutput".into(),
            database: "app".into(),
            active: true,
            restart_lsn: Some("0/1000000".into()),
            confirmed_flush_lsn: Some(lsn.into()),
            lag_bytes: Some(lag),
            retained_bytes: Some(42 * 1024 * 1024),
            wal_status: Some("reserved".into()),
        }],
        senders: vec![SenderInfo {
            application: "pulsed".into(),
            state: "streaming".into(),
            sent_lsn: Some("0/3A00000".into()),
            flush_lsn: Some(lsn.into()),
            flush_lag_ms: Some(3.0),
        }],
    }
}

/// A console that has been connected for a while: overview history, logs, replication.
fn fixture() -> State {
    let mut s = connected();
    answer(&mut s, "status", status());
    for i in 0..30i64 {
        s.now_ms = T0 + i * 1000;
        answer(
            &mut s,
            "metrics",
            AdminResponse::Metrics(MetricsSample {
                connections: (40 + (i * 7) % 25) as u64,
                errors_total: (i * i / 10) as u64,
                ..Default::default()
            }),
        );
        answer(
            &mut s,
            "replication",
            AdminResponse::Replication(slot(
                &format!("0/{:X}", 0x3000000 + i * 0x8000),
                ((i * 37) % 11) * 4096,
            )),
        );
    }
    let entry = |seq: u64, level, target: &str, message: &str, fields: &[(&str, &str)]| LogEntry {
        seq,
        at_ms: T0 + seq as i64 * 1500,
        level,
        target: target.into(),
        message: message.into(),
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    answer(
        &mut s,
        "logs",
        AdminResponse::Logs(LogsPage {
            entries: vec![
                entry(
                    1,
                    LogLevel::Info,
                    "pulse_daemon",
                    "pulse schema is current",
                    &[("current", "1")],
                ),
                entry(
                    2,
                    LogLevel::Info,
                    "pulse_daemon",
                    "pulsed ready",
                    &[("version", "0.1.0")],
                ),
                entry(
                    3,
                    LogLevel::Warn,
                    "pulse_daemon::health",
                    "component degraded",
                    &[("component", "broker")],
                ),
                entry(
                    4,
                    LogLevel::Error,
                    "pulse_daemon::relay",
                    "publish failed",
                    &[("error", "connection reset")],
                ),
                entry(
                    5,
                    LogLevel::Error,
                    "pulse_daemon::relay",
                    "publish failed",
                    &[("error", "channel closed")],
                ),
                entry(
                    6,
                    LogLevel::Info,
                    "pulse_daemon::settings",
                    "platform setting changed",
                    &[("setting", "sync_interval_ms")],
                ),
            ],
            errors: vec![
                ErrorGroup {
                    level: LogLevel::Error,
                    kind: "pulse_daemon::relay: publish failed".into(),
                    count: 2,
                    last_at_ms: T0 + 7500,
                    last_fields: "error=channel closed".into(),
                },
                ErrorGroup {
                    level: LogLevel::Warn,
                    kind: "pulse_daemon::health: component degraded".into(),
                    count: 1,
                    last_at_ms: T0 + 4500,
                    last_fields: "component=broker".into(),
                },
            ],
            dropped: 0,
        }),
    );
    s
}

fn presence(n: usize) -> PresenceReport {
    let tenants = ["acme", "harbour", "zeta"];
    PresenceReport {
        tenants: tenants
            .iter()
            .enumerate()
            .map(|(t, name)| TenantPresence {
                tenant: name.to_string(),
                online: (0..n).filter(|i| i % 3 == t).count() as u64,
            })
            .collect(),
        users: (0..n)
            .map(|i| PresenceEntry {
                tenant: tenants[i % 3].into(),
                user: format!("user-{i:05}"),
                resource: format!("/events/{}", 100 + i % 17),
                state: if i % 4 == 0 { "idle" } else { "active" }.into(),
                last_seen_secs: Some((i % 29) as u64),
            })
            .collect(),
    }
}

fn draw(s: &State, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
    t.draw(|f| render(s, f)).unwrap();
    t
}

macro_rules! snap {
    ($name:expr, $state:expr) => {
        snap!($name, $state, 80, 24)
    };
    ($name:expr, $state:expr, $w:expr, $h:expr) => {{
        let t = draw(&$state, $w, $h);
        insta::assert_snapshot!($name, t.backend());
    }};
}

#[test]
fn overview() {
    let s = fixture();
    snap!("overview_80x24", s);
    snap!("overview_120x40", s, 120, 40);
}

#[test]
fn overview_alerts_past_the_thresholds() {
    let mut s = fixture();
    for i in 30..40i64 {
        s.now_ms = T0 + i * 1000;
        answer(
            &mut s,
            "metrics",
            AdminResponse::Metrics(MetricsSample {
                connections: 10_250,
                errors_total: 100,
                requests_total: Some((i * i * 10) as u64),
                query_p50_ms: Some(180.0 + (i - 30) as f64 * 8.0),
                mutation_p50_ms: Some(35.0),
                functions_total: Some((i * 100) as u64),
                function_errors_total: Some((i * 5 / 2) as u64),
                storage_max_quota_pct: Some(42.0),
                ..Default::default()
            }),
        );
    }
    let t = draw(&s, 80, 24);
    let text = format!("{}", t.backend());
    // Query latency (252 ms), connections and function errors (2.5%) are over.
    assert_eq!(text.matches("ALERT").count(), 3, "{text}");
    snap!("overview_alerts", s);
}

#[test]
fn overview_while_disconnected_keeps_the_last_data() {
    let mut s = fixture();
    update(
        &mut s,
        Action::Net(NetEvent::Disconnected {
            reason: "pulsed closed the connection".into(),
            retry_in_secs: 2,
        }),
    );
    snap!("overview_disconnected", s);
}

#[test]
fn before_the_first_answer() {
    let s = State::new("unix:/run/pulse/admin.sock".into(), true);
    snap!("connecting", s);
}

#[test]
fn presence_screen() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('2'));
    answer(&mut s, "presence", AdminResponse::Presence(presence(40)));
    snap!("presence", s);
    // Choose a tenant, then filter its users.
    key(&mut s, KeyCode::Char('j'));
    key(&mut s, KeyCode::Enter);
    key(&mut s, KeyCode::Char('/'));
    for c in "user-000".chars() {
        key(&mut s, KeyCode::Char(c));
    }
    snap!("presence_filtered", s);
}

#[test]
fn presence_unavailable() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('2'));
    fail(
        &mut s,
        "presence",
        ErrorCode::Unavailable,
        "presence: the presence tracker is not part of this pulsed build yet",
    );
    snap!("presence_unavailable", s);
}

#[test]
fn notifications_screen() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('3'));
    answer(
        &mut s,
        "notifications",
        AdminResponse::Notifications {
            items: (0..5)
                .map(|i| NotificationItem {
                    id: format!("n{i}"),
                    tenant: if i % 2 == 0 { "acme" } else { "zeta" }.into(),
                    user: format!("user-{i:05}"),
                    title: format!("Event {i} starts in one hour"),
                    created_at: format!("2026-11-24T10:0{i}:00Z"),
                    read: i % 3 == 0,
                })
                .collect(),
        },
    );
    snap!("notifications", s);
}

#[test]
fn logs_screen() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('4'));
    snap!("logs", s);
    key(&mut s, KeyCode::Char('l'));
    snap!("logs_warn_and_above", s);
    key(&mut s, KeyCode::Enter);
    snap!("logs_event_in_full", s);
    key(&mut s, KeyCode::Esc);
    key(&mut s, KeyCode::Char('e'));
    snap!("logs_errors_by_kind", s);
}

fn change(seq: u64, op: &str, key: &str, columns: &[(&str, &str)]) -> ChangeEvent {
    ChangeEvent {
        seq,
        lsn: format!("0/16B{:04X}", seq * 0x38),
        commit_time: format!("2026-11-24T10:00:{:02}.120Z", seq),
        xid: 730 + seq as u32,
        table: "public.members".into(),
        op: op.into(),
        key: key.into(),
        columns: columns
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The data explorer with the pulse tables, two live tables and a few changes.
fn data_state() -> State {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('5'));
    answer(
        &mut s,
        "tables",
        AdminResponse::Tables {
            tables: vec![
                TableInfo {
                    name: "pulse.audit_log".into(),
                    rows: 2,
                    bytes: 32768,
                },
                TableInfo {
                    name: "pulse.checkpoints".into(),
                    rows: 0,
                    bytes: 16384,
                },
                TableInfo {
                    name: "pulse.settings".into(),
                    rows: 1,
                    bytes: 32768,
                },
            ],
        },
    );
    answer(
        &mut s,
        "live_tables",
        AdminResponse::LiveTables {
            tables: vec![
                LiveTableInfo {
                    name: "members".into(),
                    source: "public.members".into(),
                    tenant_column: "tenant_id".into(),
                    rows: 1204,
                    estimated: false,
                    tenants: vec![
                        TenantRows {
                            tenant: "acme".into(),
                            rows: 1100,
                        },
                        TenantRows {
                            tenant: "globex".into(),
                            rows: 104,
                        },
                    ],
                },
                LiveTableInfo {
                    name: "payments".into(),
                    source: "public.payments".into(),
                    tenant_column: "tenant_id".into(),
                    rows: 3_400_000,
                    estimated: true,
                    tenants: vec![],
                },
            ],
        },
    );
    answer(
        &mut s,
        "watch_changes",
        AdminResponse::Changes {
            changes: vec![
                change(
                    1,
                    "insert",
                    "id=1201",
                    &[("tenant_id", "acme"), ("name", "Ann"), ("status", "active")],
                ),
                change(2, "update", "id=77", &[("status", "gone")]),
                change(3, "delete", "id=12", &[]),
                change(
                    4,
                    "insert",
                    "id=1202",
                    &[("tenant_id", "globex"), ("password_hash", "***")],
                ),
            ],
            missed: 0,
        },
    );
    s
}

#[test]
fn data_explorer() {
    let mut s = data_state();
    key(&mut s, KeyCode::Enter);
    answer(
        &mut s,
        "table_rows",
        AdminResponse::TableRows(TableRows {
            table: "pulse.audit_log".into(),
            columns: vec!["id".into(), "actor".into(), "action".into(), "target".into()],
            rows: vec![
                vec![
                    "2".into(),
                    "console uid=1000 (ops)".into(),
                    "setting.update".into(),
                    "deploy_key".into(),
                ],
                vec![
                    "1".into(),
                    "console uid=1000 (ops)".into(),
                    "setting.update".into(),
                    "sync_interval_ms".into(),
                ],
            ],
            offset: 0,
        }),
    );
    snap!("data", s);
    snap!("data_120x40", s, 120, 40);
}

#[test]
fn data_explorer_live_rows_of_one_tenant() {
    let mut s = data_state();
    // audit_log, checkpoints, settings, » members, acme
    for _ in 0..4 {
        key(&mut s, KeyCode::Char('j'));
    }
    key(&mut s, KeyCode::Enter);
    let rows = (0..50)
        .map(|i| {
            vec![
                (1250 - i).to_string(),
                "acme".to_string(),
                format!("member {i}"),
                "active".to_string(),
            ]
        })
        .collect();
    answer(
        &mut s,
        "live_rows",
        AdminResponse::TableRows(TableRows {
            table: "members".into(),
            columns: vec!["id".into(), "tenant_id".into(), "name".into(), "status".into()],
            rows,
            offset: 50,
        }),
    );
    snap!("data_live_rows", s);
}

#[test]
fn data_explorer_filter_and_paused_feed() {
    let mut s = data_state();
    key(&mut s, KeyCode::Char('p'));
    answer(
        &mut s,
        "watch_changes",
        AdminResponse::Changes {
            changes: vec![change(5, "insert", "id=1203", &[("tenant_id", "acme")])],
            missed: 0,
        },
    );
    key(&mut s, KeyCode::Char('/'));
    for c in "glo".chars() {
        key(&mut s, KeyCode::Char(c));
    }
    key(&mut s, KeyCode::Enter);
    snap!("data_filtered_paused", s);
}

#[test]
fn data_explorer_without_the_feed() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('5'));
    fail(
        &mut s,
        "live_tables",
        ErrorCode::Unavailable,
        "source database: connection refused; check source.url and that PostgreSQL is running",
    );
    fail(
        &mut s,
        "watch_changes",
        ErrorCode::Forbidden,
        "the data explorer: needs the platform_admin or service role",
    );
    snap!("data_unavailable", s);
}

#[test]
fn storage_screen() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('6'));
    answer(
        &mut s,
        "storage",
        AdminResponse::Storage(StorageReport {
            tenants: vec![
                TenantStorage {
                    tenant: "acme".into(),
                    used_bytes: 900 << 20,
                    quota_bytes: 1 << 30,
                    files: 1520,
                },
                TenantStorage {
                    tenant: "zeta".into(),
                    used_bytes: 12 << 20,
                    quota_bytes: 1 << 30,
                    files: 40,
                },
            ],
            largest: vec![StoredFile {
                tenant: "acme".into(),
                name: "agm-2026.pdf".into(),
                bytes: 19 << 20,
                uploaded_at: "2026-11-20T08:00:00Z".into(),
            }],
        }),
    );
    snap!("storage", s);
}

#[test]
fn storage_unavailable() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('6'));
    fail(
        &mut s,
        "storage",
        ErrorCode::Unavailable,
        "storage usage: file storage is not part of this pulsed build yet",
    );
    snap!("storage_unavailable", s);
}

#[test]
fn jobs_screen() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('7'));
    answer(
        &mut s,
        "jobs",
        AdminResponse::Jobs(JobsReport {
            jobs: vec![JobInfo {
                name: "cleanup_sessions".into(),
                schedule: "*/15 * * * *".into(),
                next_run: Some("2026-11-24T10:15:00Z".into()),
                last_status: Some("ok".into()),
            }],
            history: vec![JobRun {
                job: "cleanup_sessions".into(),
                started_at: "2026-11-24T10:00:00Z".into(),
                duration_ms: Some(120),
                status: "ok".into(),
                message: "removed 14".into(),
            }],
            dead_letters: vec![DeadLetter {
                id: "dl-1".into(),
                source: "commands".into(),
                reason: "invalid_argument: args.tenant missing".into(),
                at: "2026-11-24T09:58:00Z".into(),
            }],
        }),
    );
    key(&mut s, KeyCode::Enter);
    snap!("jobs_confirm_run", s);
}

#[test]
fn replication_screen() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('8'));
    snap!("replication", s);
}

fn settings_state() -> State {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('9'));
    let entry = |key: &str, label: &str, kind, value: &str, source: &str| SettingEntry {
        key: key.into(),
        label: label.into(),
        kind,
        value: value.into(),
        source: source.into(),
    };
    answer(
        &mut s,
        "settings",
        AdminResponse::Settings {
            settings: vec![
                entry(
                    "deployment_url",
                    "Deployment URL",
                    SettingKind::Url,
                    "https://rt.example.org",
                    "config",
                ),
                entry("deploy_key", "Deploy Key", SettingKind::Secret, "***", "config"),
                entry(
                    "enable_realtime",
                    "Enable Real-time",
                    SettingKind::Toggle,
                    "true",
                    "config",
                ),
                entry(
                    "sync_interval_ms",
                    "Sync Interval",
                    SettingKind::Millis,
                    "250",
                    "edited by service (console) at 2026-11-24 09:59:00+00",
                ),
            ],
        },
    );
    answer(
        &mut s,
        "config",
        AdminResponse::Config {
            entries: vec![
                ConfigEntry {
                    key: "admin.socket".into(),
                    value: "/run/pulse/admin.sock".into(),
                    source: "default".into(),
                },
                ConfigEntry {
                    key: "http.listen".into(),
                    value: "127.0.0.1:8080".into(),
                    source: "file /etc/pulse/pulsed.toml".into(),
                },
                ConfigEntry {
                    key: "platform.deploy_key".into(),
                    value: "***".into(),
                    source: "environment PULSE__PLATFORM__DEPLOY_KEY".into(),
                },
                ConfigEntry {
                    key: "source.url".into(),
                    value: "postgres://pulse:***@db/app".into(),
                    source: "environment PULSE__SOURCE__URL".into(),
                },
            ],
        },
    );
    s
}

#[test]
fn settings_screen() {
    let s = settings_state();
    snap!("settings", s);
}

#[test]
fn settings_edit_and_confirm() {
    let mut s = settings_state();
    key(&mut s, KeyCode::Char('G'));
    key(&mut s, KeyCode::Enter);
    key(&mut s, KeyCode::Backspace);
    key(&mut s, KeyCode::Char('0'));
    snap!("settings_edit", s);
    key(&mut s, KeyCode::Enter);
    snap!("settings_confirm", s);
}

#[test]
fn the_deploy_key_is_masked_while_typed() {
    let mut s = settings_state();
    key(&mut s, KeyCode::Char('j'));
    key(&mut s, KeyCode::Enter);
    for c in "super-secret-deploy-key".chars() {
        key(&mut s, KeyCode::Char(c));
    }
    let t = draw(&s, 80, 24);
    let text = format!("{}", t.backend());
    assert!(!text.contains("super-secret"), "{text}");
    snap!("settings_edit_secret", s);
}

#[test]
fn read_only_settings() {
    let mut s = settings_state();
    update(
        &mut s,
        Action::Net(NetEvent::Connected {
            server_version: "0.1.0".into(),
            roles: vec!["tenant_admin".into()],
        }),
    );
    key(&mut s, KeyCode::Enter);
    snap!("settings_read_only", s);
}

#[test]
fn help_lists_every_key() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('?'));
    let t = draw(&s, 80, 24);
    let text = format!("{}", t.backend());
    for (keys, _) in pulse_tui::view::KEYS {
        assert!(text.contains(keys), "{keys} missing from help:\n{text}");
    }
    snap!("help", s);
}

#[test]
fn no_color_means_no_colour() {
    for color in [true, false] {
        let mut s = fixture();
        s.color = color;
        let t = draw(&s, 80, 24);
        let coloured = t
            .backend()
            .buffer()
            .content()
            .iter()
            .filter(|c| c.fg != Color::Reset || c.bg != Color::Reset)
            .count();
        assert_eq!(coloured > 0, color, "color {color}: {coloured} coloured cells");
    }
}

#[test]
fn every_screen_follows_resizes_down_to_tiny_terminals() {
    let mut s = settings_state();
    for (w, h) in [(80, 24), (200, 60), (40, 12), (20, 5), (1, 1)] {
        for (n, screen) in ('1'..='9').zip(pulse_tui::state::Screen::ALL) {
            key(&mut s, KeyCode::Char(n));
            let t = draw(&s, w, h);
            let text = format!("{}", t.backend());
            if w >= 80 {
                // The tab bar names the screen and the status bar the connection.
                assert!(text.contains(&format!("{n} ")), "{screen:?} at {w}x{h}:\n{text}");
                assert!(text.contains("● connected"), "{screen:?} at {w}x{h}:\n{text}");
            }
        }
    }
}

#[test]
fn presence_with_10000_users_renders_a_frame_within_16_ms() {
    let mut s = fixture();
    key(&mut s, KeyCode::Char('2'));
    answer(&mut s, "presence", AdminResponse::Presence(presence(10_000)));
    key(&mut s, KeyCode::Char('l'));
    // Somewhere in the middle of the list.
    for _ in 0..500 {
        key(&mut s, KeyCode::PageDown);
    }
    let mut t = Terminal::new(TestBackend::new(120, 40)).unwrap();
    let mut times: Vec<Duration> = (0..30)
        .map(|_| {
            let start = Instant::now();
            t.draw(|f| render(&s, f)).unwrap();
            start.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "presence, 10,000 users, 120x40: median {median:?}, worst {:?}",
        times.last().unwrap()
    );
    assert!(median < Duration::from_millis(16), "median frame {median:?}");
    let text = format!("{}", t.backend());
    assert!(text.contains("Online: 10000 of 10000"), "{text}");
}
