//! The console end to end: the real `pulsetop` in tmux against the real `pulsed`,
//! driven with send-keys and read with capture-pane.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::Signal;
use pulse_harness::{PgCluster, Pulsed};
use pulse_shared::protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{fresh_db_with, pulsed_bin};

/// pulsetop, built in the same target directory as pulsed.
fn pulsetop_bin() -> PathBuf {
    let path = pulsed_bin().with_file_name("pulsetop");
    assert!(
        path.exists(),
        "{} is missing: build the whole workspace first (cargo build --workspace), \
         this test runs the real console binary",
        path.display()
    );
    path
}

/// A tmux server of its own (so no other tmux user is touched) with one session
/// running one command; killed on drop.
struct Tmux {
    socket: String,
    log: PathBuf,
}

impl Tmux {
    /// pulsetop reaching pulsed as `connect` says (`--socket …`, `--url …`), logging to
    /// `log`.
    fn pulsetop(connect: &str, log: &Path) -> Tmux {
        let command = format!(
            "{} {connect} --log-file {}",
            pulsetop_bin().display(),
            log.display()
        );
        Tmux::start(&command, log)
    }

    fn start(command: &str, log: &Path) -> Tmux {
        static N: AtomicU32 = AtomicU32::new(0);
        let socket = format!(
            "pulse-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let tmux = Tmux {
            socket,
            log: log.to_path_buf(),
        };
        // The shell keeps the pane after pulsetop exits, so its exit status can be read.
        let script = format!("{command}; echo \"pulsetop exited with $?\"; sleep 600");
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "console",
            "-x",
            "120",
            // Tall enough for every table of the pulse schema above the live tables on
            // the Data screen.
            "-y",
            "50",
            "sh",
            "-c",
            &script,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("/usr/bin/tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux runs (installed at /usr/bin/tmux)")
    }

    /// Sends tmux key names (`Enter`, `BSpace`, `y`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "console"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// Types text literally.
    fn type_text(&self, text: &str) {
        assert!(
            self.run(&["send-keys", "-t", "console", "-l", text])
                .status
                .success()
        );
    }

    /// The pid of the command in the pane (the child of the pane's shell).
    fn command_pid(&self) -> u32 {
        let out = self.run(&["list-panes", "-t", "console", "-F", "#{pane_pid}"]);
        let shell = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no child of the pane's shell {shell}"))
    }

    fn capture(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "console"]).stdout).into_owned()
    }

    /// Waits until the pane shows every needle; fails with the pane and pulsetop's log.
    async fn wait_for(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_until(&format!("{needles:?}"), timeout, |screen| {
            needles.iter().all(|n| screen.contains(n))
        })
        .await
    }

    /// Waits until the pane shows none of the needles.
    async fn wait_gone(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_until(&format!("{needles:?} to go"), timeout, |screen| {
            !needles.iter().any(|n| screen.contains(n))
        })
        .await
    }

    async fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if done(&screen) {
                return screen;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} on the console; screen:\n{screen}\n\
                     pulsetop log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Opens a WebSocket session over TCP with a deploy key; the first answer to hello.
async fn hello_with_key(http: &str, key: &str) -> ServerFrame {
    let url = format!("{}/ws", http.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = ClientFrame::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        deploy_key: Some(key.to_string()),
    };
    ws.send(Message::Text(serde_json::to_string(&hello).unwrap().into()))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no answer to hello: {other:?}"),
        }
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn pulsetop_shows_live_data_edits_settings_and_reconnects() {
    let db = PgCluster::shared().fresh_db("console").await.unwrap();
    let client = db.connect().await.unwrap();
    let slot = format!("console_{}", std::process::id());
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let old_key = "o".repeat(40);
    let env = [
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__PLATFORM__DEPLOY_KEY", old_key.clone()),
        ("PULSE__ADMIN__SOCKET", socket.display().to_string()),
    ];
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    pulsed.wait_ready(WAIT).await.unwrap();

    let log = dir.path().join("pulsetop.log");
    let tui = Tmux::pulsetop(&format!("--socket {}", socket.display()), &log);

    // Overview: live health from pulsed.
    tui.wait_for(
        &["● connected", "pulsed 0.1.0", "state_db", "reachable, migrated"],
        WAIT,
    )
    .await;

    // Idle, it polls once a second and redraws only then: well under 2% of a core.
    // (clock ticks are 1/100 s on Linux.)
    let pid = tui.command_pid();
    let (ticks, started) = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let share = (cpu_ticks(pid) - ticks) as f64 / 100.0 / started.elapsed().as_secs_f64();
    println!("pulsetop idle: {:.2}% of a core", share * 100.0);
    assert!(share < 0.02, "pulsetop idle used {:.1}% of a core", share * 100.0);

    // Replication: the slot made above, with its WAL status.
    tui.keys(&["8"]);
    tui.wait_for(&[&slot, "reserved", "current WAL"], WAIT).await;

    // Logs: pulsed's own events, from its log buffer.
    tui.keys(&["4"]);
    tui.wait_for(&["pulsed ready", "pulse schema is current"], WAIT)
        .await;

    // Data explorer: the pulse schema and the latest rows of a table.
    tui.keys(&["5"]);
    tui.wait_for(&["audit_log", "schema_migrations", "settings"], WAIT)
        .await;
    tui.keys(&["j", "Enter"]);
    tui.wait_for(&["pulse.cdc_ledger · latest 0"], WAIT).await;

    // Presence comes from the engine's hub: nobody is online in this test database.
    tui.keys(&["2"]);
    tui.wait_for(&["Online: 0 of 0", "(all tenants)"], WAIT).await;

    // Settings: an invalid value is refused before anything is sent…
    tui.keys(&["9"]);
    tui.wait_for(&["Sync Interval", "Deploy Key", "Configuration in effect"], WAIT)
        .await;
    tui.keys(&["G", "Enter"]);
    tui.wait_for(&["Edit Sync Interval"], WAIT).await;
    tui.keys(&["BSpace"; 10]);
    tui.type_text("5");
    tui.keys(&["Enter"]);
    tui.wait_for(&["100 to 3600000"], WAIT).await;
    // …a valid one is confirmed, applied and audited.
    tui.type_text("50");
    tui.keys(&["Enter"]);
    tui.wait_for(&["Set Sync Interval to 550?"], WAIT).await;
    tui.keys(&["y"]);
    // The audit names the console's user, from the admin socket's peer credentials.
    let me = format!("console uid={}", nix::unistd::getuid().as_raw());
    tui.wait_for(&["Sync Interval changed", &format!("edited by {me}")], WAIT)
        .await;
    let stored: String = client
        .query_one(
            "SELECT value::text FROM pulse.settings WHERE key = 'sync_interval_ms'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "550");
    let audit = client
        .query_one(
            "SELECT actor, details::text FROM pulse.audit_log WHERE action = 'setting.update' AND target = 'sync_interval_ms'",
            &[],
        )
        .await
        .unwrap();
    let actor: String = audit.get(0);
    assert!(
        actor == me || actor.starts_with(&format!("{me} (")),
        "audit actor {actor:?}, expected {me}"
    );
    assert!(
        audit.get::<_, String>(1).contains("550"),
        "{}",
        audit.get::<_, String>(1)
    );

    // Rotating the deploy key: confirmed, shown once, audited without the key; the old
    // key stops working and the new one works.
    tui.keys(&["R"]);
    tui.wait_for(&["Replace the deploy key"], WAIT).await;
    tui.keys(&["y"]);
    let screen = tui.wait_for(&["New deploy key", "Copy it now"], WAIT).await;
    let new_key = screen
        .split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .unwrap_or_else(|| panic!("no 64-hex-digit key on screen:\n{screen}"))
        .to_string();
    tui.keys(&["Escape"]);
    let screen = tui.wait_gone(&["New deploy key"], WAIT).await;
    assert!(screen.contains("Deploy key rotated"), "{screen}");
    assert!(!screen.contains(&new_key), "the key stays on screen:\n{screen}");
    assert!(matches!(
        hello_with_key(&pulsed.http, &old_key).await,
        ServerFrame::Error { .. }
    ));
    assert!(matches!(
        hello_with_key(&pulsed.http, &new_key).await,
        ServerFrame::Welcome { .. }
    ));
    let rotations = client
        .query(
            "SELECT details::text FROM pulse.audit_log WHERE target = 'deploy_key'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rotations.len(), 1);
    assert!(!rotations[0].get::<_, String>(0).contains(&new_key));

    // The console over TCP with the new deploy key.
    let key_file = dir.path().join("deploy.key");
    std::fs::write(&key_file, &new_key).unwrap();
    let tcp_log = dir.path().join("pulsetop-tcp.log");
    let tcp_connect = format!(
        "--url {}/ws --deploy-key-file {}",
        pulsed.http.replace("http://", "ws://"),
        key_file.display()
    );
    let tcp = Tmux::pulsetop(&tcp_connect, &tcp_log);
    tcp.wait_for(&["● connected", "state_db"], WAIT).await;
    tcp.keys(&["q"]);
    tcp.wait_for(&["pulsetop exited with 0"], WAIT).await;
    // With the old key it is refused, says why, and keeps trying.
    std::fs::write(&key_file, &old_key).unwrap();
    let refused = Tmux::pulsetop(&tcp_connect, &tcp_log);
    refused
        .wait_for(&["○ disconnected", "the deploy key is wrong"], WAIT)
        .await;
    // SIGTERM ends it like q: cleanly, terminal restored.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(refused.command_pid() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let screen = refused.wait_for(&["pulsetop exited with 0"], WAIT).await;
    assert!(
        !screen.contains("disconnected"),
        "the console was not cleared:\n{screen}"
    );

    // pulsed goes away: the status bar says so and the console keeps running; pulsed
    // comes back on the same socket: the console reconnects by itself.
    pulsed.signal(Signal::SIGTERM).unwrap();
    pulsed.wait_exit(WAIT).await.unwrap();
    tui.wait_for(&["○ disconnected", "retry in"], WAIT).await;
    let mut again = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
    again.wait_ready(WAIT).await.unwrap();
    tui.keys(&["1"]);
    tui.wait_for(&["● connected", "reachable, migrated"], WAIT).await;
    // The Logs screen now shows the new pulsed's events, not the old one's shutdown.
    tui.keys(&["4"]);
    let screen = tui.wait_for(&["pulsed ready"], WAIT).await;
    assert!(!screen.contains("stopping"), "{screen}");

    // q quits cleanly and restores the terminal.
    tui.keys(&["q"]);
    let screen = tui.wait_for(&["pulsetop exited with 0"], WAIT).await;
    assert!(
        !screen.contains("Overview"),
        "the console was not cleared:\n{screen}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("connected to pulsed"), "{log_text}");
    assert!(!log_text.contains(&new_key), "the key reached pulsetop's log");
    drop(again);
}

/// Sends one admin request and returns the answer or the error.
async fn ask(
    c: &mut crate::support::AdminClient,
    id: &str,
    request: pulse_shared::admin::AdminRequest,
) -> Result<pulse_shared::admin::AdminResponse, pulse_shared::ErrorBody> {
    c.send(&ClientFrame::Admin {
        id: id.to_string(),
        request,
    })
    .await
    .unwrap();
    // Sessions also receive pushed frames (live settings); skip them.
    let mut frame = c.recv().await.unwrap();
    while matches!(frame, ServerFrame::Settings { .. }) {
        frame = c.recv().await.unwrap();
    }
    match frame {
        ServerFrame::Admin { id: got, response } => {
            assert_eq!(got, id);
            Ok(*response)
        }
        ServerFrame::Error { id: got, error } => {
            assert_eq!(got.as_deref(), Some(id), "errors name their request");
            Err(error)
        }
        other => panic!("unexpected frame {other:?}"),
    }
}

#[tokio::test]
async fn console_requests_answer_with_data_or_a_clear_error() {
    use pulse_shared::ErrorCode;
    use pulse_shared::admin::{AdminRequest as R, AdminResponse as A};

    let db = PgCluster::shared().fresh_db("console_requests").await.unwrap();
    let mut pulsed = Pulsed::spawn(&pulsed_bin(), &[("PULSE__SOURCE__URL", db.url())]).unwrap();
    pulsed.wait_ready(WAIT).await.unwrap();
    let mut c = crate::support::AdminClient::welcomed(&pulsed.admin_socket)
        .await
        .unwrap();

    // Logs come from the daemon's own buffer, in order, and page by sequence.
    let Ok(A::Logs(page)) = ask(&mut c, "1", R::Logs { after: 0, limit: 500 }).await else {
        panic!("expected logs")
    };
    assert!(
        page.entries.iter().any(|e| e.message == "pulsed ready"),
        "{page:?}"
    );
    assert!(page.entries.windows(2).all(|w| w[0].seq < w[1].seq));
    // This pulsed has no deploy key: its start-up warning is counted by kind.
    let group = page
        .errors
        .iter()
        .find(|g| g.kind.contains("no deploy key is set"))
        .unwrap_or_else(|| panic!("no warning group: {:?}", page.errors));
    assert_eq!(group.level, pulse_shared::admin::LogLevel::Warn);
    assert_eq!(group.count, 1);
    let last = page.entries.last().unwrap().seq;
    let Ok(A::Logs(newer)) = ask(
        &mut c,
        "2",
        R::Logs {
            after: last,
            limit: 500,
        },
    )
    .await
    else {
        panic!("expected logs")
    };
    assert!(newer.entries.iter().all(|e| e.seq > last));

    // A settings edit refused by validation says why and stores nothing.
    let err = ask(
        &mut c,
        "3",
        R::UpdateSetting {
            key: "sync_interval_ms".into(),
            value: "soon".into(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(err.message.contains("milliseconds"), "{}", err.message);
    let client = db.connect().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM pulse.audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // Data explorer: tables of the pulse schema only, the digest of the deploy key masked.
    let Ok(A::Tables { tables }) = ask(&mut c, "4", R::Tables).await else {
        panic!("expected tables")
    };
    assert!(tables.iter().all(|t| t.name.starts_with("pulse.")), "{tables:?}");
    assert!(tables.iter().any(|t| t.name == "pulse.audit_log"));
    let err = ask(
        &mut c,
        "5",
        R::TableRows {
            table: "pg_authid".into(),
            limit: 5,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    ask(
        &mut c,
        "6",
        R::UpdateSetting {
            key: "deploy_key".into(),
            value: "d".repeat(40),
        },
    )
    .await
    .unwrap();
    let Ok(A::TableRows(rows)) = ask(
        &mut c,
        "7",
        R::TableRows {
            table: "pulse.settings".into(),
            limit: 5,
        },
    )
    .await
    else {
        panic!("expected rows")
    };
    let value = rows.columns.iter().position(|c| c == "value").unwrap();
    assert_eq!(rows.rows[0][value], "***");
    // The edit's audit record names the socket's peer (SO_PEERCRED), not a role.
    let actor: String = client
        .query_one(
            "SELECT actor FROM pulse.audit_log WHERE target = 'deploy_key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let uid = nix::unistd::getuid().as_raw();
    assert_eq!(actor, pulse_daemon::admin::console_user(uid));
    assert!(actor.starts_with(&format!("console uid={uid}")), "{actor}");

    let Ok(A::Presence(p)) = ask(&mut c, "8", R::Presence { tenant: None }).await else {
        panic!("expected presence")
    };
    assert!(p.users.is_empty() && p.tenants.is_empty(), "{p:?}");

    // Notifications from pulse.notifications, newest first, by tenant and user.
    client
        .batch_execute(
            "INSERT INTO pulse.notifications (tenant, user_id, title, created_by) VALUES
             ('t1', 'alice', 'first', 'test'), ('t1', 'bob', 'second', 'test'), ('t2', 'alice', 'third', 'test')",
        )
        .await
        .unwrap();
    let Ok(A::Notifications { items }) = ask(
        &mut c,
        "12",
        R::Notifications {
            tenant: Some("t1".into()),
            user: None,
            limit: 10,
        },
    )
    .await
    else {
        panic!("expected notifications")
    };
    let titles: Vec<&str> = items.iter().map(|n| n.title.as_str()).collect();
    assert_eq!(titles, ["second", "first"]);
    assert!(items.iter().all(|n| !n.read && n.created_at.ends_with('Z')));
    let Ok(A::Notifications { items }) = ask(
        &mut c,
        "13",
        R::Notifications {
            tenant: None,
            user: Some("alice".into()),
            limit: 1,
        },
    )
    .await
    else {
        panic!("expected notifications")
    };
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].title, "third");

    // Jobs: the scheduler's jobs with their next run; unknown jobs and dead letters are
    // refused with a clear error.
    let Ok(A::Jobs(report)) = ask(&mut c, "14", R::Jobs).await else {
        panic!("expected jobs")
    };
    assert!(!report.jobs.is_empty(), "{report:?}");
    let err = ask(
        &mut c,
        "15",
        R::RunJob {
            name: "no_such_job".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(err.message.contains(&report.jobs[0].name), "{}", err.message);
    let err = ask(&mut c, "16", R::RequeueDeadLetter { id: "999".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);

    // Storage: nothing uploaded in this database yet.
    let Ok(A::Storage(storage)) = ask(&mut c, "9", R::Storage).await else {
        panic!("expected storage")
    };
    assert!(
        storage.tenants.is_empty() && storage.largest.is_empty(),
        "{storage:?}"
    );

    // Without a schema file there are no live tables; an unknown one is not found.
    let Ok(A::LiveTables { tables }) = ask(&mut c, "11", R::LiveTables).await else {
        panic!("expected live tables")
    };
    assert!(tables.is_empty(), "{tables:?}");
    let err = ask(
        &mut c,
        "17",
        R::LiveRows {
            table: "members".into(),
            tenant: None,
            offset: 0,
            limit: 5,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("schema file"), "{}", err.message);
}

#[tokio::test]
async fn a_presence_change_appears_on_the_console() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    let db = PgCluster::shared().fresh_db("console_presence").await.unwrap();
    let secret = "console-presence-secret-0123456789abcdef";
    let mut pulsed = Pulsed::spawn(
        &pulsed_bin(),
        &[
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__AUTH__ISSUER", "https://symfony.test".to_string()),
            ("PULSE__AUTH__AUDIENCE", "pulse".to_string()),
            ("PULSE__AUTH__HS256_SECRET", secret.to_string()),
        ],
    )
    .unwrap();
    pulsed.wait_ready(WAIT).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("pulsetop.log");
    let tui = Tmux::pulsetop(&format!("--socket {}", pulsed.admin_socket.display()), &log);
    tui.keys(&["2"]);
    tui.wait_for(&["Online: 0 of 0"], WAIT).await;

    // A member of tenant t1 opens a page and announces it.
    let claims = serde_json::json!({
        "iss": "https://symfony.test", "aud": "pulse", "sub": "alice-console",
        "tenant_id": "t1", "roles": ["ROLE_USER"],
        "exp": pulse_daemon::auth::now_secs() + 600,
    });
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let url = format!("{}/ws", pulsed.http.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let send = |frame: ClientFrame| Message::Text(serde_json::to_string(&frame).unwrap().into());
    ws.send(send(ClientFrame::Hello {
        protocol: PROTOCOL_VERSION,
        token: Some(token),
        deploy_key: None,
    }))
    .await
    .unwrap();
    let welcome = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(&welcome, Some(Ok(Message::Text(t))) if t.contains("welcome")),
        "{welcome:?}"
    );
    ws.send(send(ClientFrame::Heartbeat {
        resource: "/events/42".into(),
        state: serde_json::json!("active"),
    }))
    .await
    .unwrap();
    tui.wait_for(&["alice-console", "/events/42", "Online: 1 of 1", "t1"], WAIT)
        .await;

    // The session ends: the user leaves the console's list.
    ws.close(None).await.unwrap();
    drop(ws);
    tui.wait_gone(&["alice-console"], WAIT).await;
    tui.keys(&["q"]);
    tui.wait_for(&["pulsetop exited with 0"], WAIT).await;
}

const LIVE_SCHEMA: &str = r#"
[roles]
ROLE_SUPER_ADMIN = "platform_admin"

[tables.members]
source = "public.members"
tenant_column = "tenant_id"
columns = ["id", "tenant_id", "name", "api_token", "status"]
roles = ["platform_admin"]
"#;

#[tokio::test]
async fn the_data_explorer_shows_live_tables_and_each_committed_change() {
    use pulse_shared::admin::{AdminRequest as R, AdminResponse as A};

    let (db, source) = fresh_db_with(
        "console_live",
        "CREATE TABLE members (id int PRIMARY KEY, tenant_id text NOT NULL, name text NOT NULL,
                               api_token text, status text NOT NULL);
         ALTER TABLE members REPLICA IDENTITY FULL;
         INSERT INTO members VALUES (1, 't1', 'alice', 'tok-1', 'active'), (2, 't1', 'bob', NULL, 'active'),
                                    (3, 't2', 'carol', 'tok-3', 'gone');",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.toml");
    std::fs::write(&schema, LIVE_SCHEMA).unwrap();
    let mut pulsed = Pulsed::spawn(
        &pulsed_bin(),
        &[
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__SCHEMA__PATH", schema.display().to_string()),
        ],
    )
    .unwrap();
    pulsed.wait_ready(WAIT).await.unwrap();
    // Changes reach the feed only once the stream runs (earlier rows are the snapshot).
    crate::support::wait_streaming(&pulsed, WAIT).await;

    let mut c = crate::support::AdminClient::welcomed(&pulsed.admin_socket)
        .await
        .unwrap();

    // Live tables with their rows per tenant, from the source database.
    let Ok(A::LiveTables { tables }) = ask(&mut c, "1", R::LiveTables).await else {
        panic!("expected live tables")
    };
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!((tables[0].name.as_str(), tables[0].rows), ("members", 3));
    let per_tenant: Vec<(&str, i64)> = tables[0]
        .tenants
        .iter()
        .map(|t| (t.tenant.as_str(), t.rows))
        .collect();
    assert_eq!(per_tenant, [("t1", 2), ("t2", 1)]);
    // A page of one tenant's rows, newest key first, the secret-looking column masked.
    let t1_page = |offset| R::LiveRows {
        table: "members".into(),
        tenant: Some("t1".into()),
        offset,
        limit: 1,
    };
    let Ok(A::TableRows(rows)) = ask(&mut c, "2", t1_page(0)).await else {
        panic!("expected rows")
    };
    assert_eq!(rows.columns[0], "id");
    assert_eq!(rows.rows.len(), 1);
    assert_eq!(rows.rows[0][0], "2");
    let Ok(A::TableRows(page2)) = ask(&mut c, "3", t1_page(1)).await else {
        panic!("expected rows")
    };
    let token = page2.columns.iter().position(|c| c == "api_token").unwrap();
    assert_eq!(
        (page2.rows[0][0].as_str(), page2.rows[0][token].as_str()),
        ("1", "***")
    );

    // The feed: what the ring holds, then each commit pushed under the same id.
    let Ok(A::Changes { missed, .. }) = ask(&mut c, "watch", R::WatchChanges { after: 0 }).await else {
        panic!("expected changes")
    };
    assert_eq!(missed, 0);
    source
        .execute(
            "INSERT INTO members VALUES (99, 't2', 'zed', 'tok-99', 'active')",
            &[],
        )
        .await
        .unwrap();
    let pushed = loop {
        match c.recv().await.unwrap() {
            ServerFrame::Admin { id, response } if id == "watch" => match *response {
                A::Changes { changes, .. } if !changes.is_empty() => break changes,
                _ => continue,
            },
            ServerFrame::Settings { .. } => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    };
    let change = pushed.iter().find(|e| e.key == "id=99").expect("the insert");
    assert_eq!(
        (change.op.as_str(), change.table.as_str()),
        ("insert", "public.members")
    );
    assert!(change.xid > 0 && change.lsn.contains('/') && change.commit_time.ends_with('Z'));
    assert!(
        change
            .columns
            .contains(&("api_token".to_string(), "***".to_string()))
    );
    assert!(change.columns.contains(&("name".to_string(), "zed".to_string())));
    let Ok(A::Done { .. }) = ask(&mut c, "unwatch", R::UnwatchChanges).await else {
        panic!("expected done")
    };

    // The console: the live table with its tenants, then a change appears as it commits.
    let log = dir.path().join("pulsetop.log");
    let tui = Tmux::pulsetop(&format!("--socket {}", pulsed.admin_socket.display()), &log);
    tui.wait_for(&["● connected"], WAIT).await;
    tui.keys(&["5"]);
    tui.wait_for(&["» members", "Latest changes", "id=99"], WAIT)
        .await;
    source
        .execute(
            "INSERT INTO members VALUES (100, 't1', 'yolanda', NULL, 'active')",
            &[],
        )
        .await
        .unwrap();
    tui.wait_for(&["id=100", "name=yolanda"], WAIT).await;
    // Filtered to the live table, Enter opens its rows from the source.
    tui.keys(&["/"]);
    tui.type_text("members");
    tui.keys(&["Enter", "Enter"]);
    tui.wait_for(&["members · rows 1–5", "yolanda"], WAIT).await;
    // Paused, a new change is held, not shown, until p again.
    tui.keys(&["p"]);
    tui.wait_for(&["PAUSED"], WAIT).await;
    source
        .execute("UPDATE members SET status = 'gone' WHERE id = 100", &[])
        .await
        .unwrap();
    tui.wait_for(&["PAUSED · 1 new"], WAIT).await;
    assert!(!tui.capture().contains("status=gone"), "{}", tui.capture());
    tui.keys(&["p"]);
    tui.wait_for(&["status=gone"], WAIT).await;
    tui.keys(&["q"]);
    tui.wait_for(&["pulsetop exited with 0"], WAIT).await;
}
