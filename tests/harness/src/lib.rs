//! Test and benchmark harness: real PostgreSQL and RabbitMQ, never mocks.
//!
//! - [`PgCluster`]: a throwaway PostgreSQL cluster (initdb in a temporary directory,
//!   `wal_level=logical`, a free port, run as the `postgres` user when we are root). One
//!   per test process via [`PgCluster::shared`], or a private one for tests that restart
//!   it. A detached watchdog removes the cluster when the process that made it is gone,
//!   even after a panic or SIGKILL.
//! - [`TestDb`]: one fresh database per test, dropped with its replication slots.
//! - [`Rabbit`]: the broker at `127.0.0.1:5672` (or `PULSE_TEST_AMQP_URL`), with
//!   uniquely named exchanges and queues per test.
//! - [`Pulsed`]: the real `pulsed` binary as a child process, on free ports.
//! - [`wait_for`]: polls a condition with a timeout; tests never sleep a guessed time.

#![forbid(unsafe_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout` with
/// `what` in the message.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where [`free_port`] starts looking.
const LOWEST_PORT: u32 = 10_000;

/// The first port of the kernel's ephemeral range (read once).
fn first_ephemeral_port() -> u16 {
    static FIRST: OnceLock<u16> = OnceLock::new();
    *FIRST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768)
    })
}

/// A port nothing listens on, for a server a test or a benchmark is about to start.
///
/// Taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), which is
/// where outgoing connections get their local ports: a port found free inside it (as
/// `bind` to port 0 finds one) can be taken by any connection the tests open before the
/// server binds it, and the server then fails with "Address already in use" (seen in
/// the suite: pulsed on its metrics port). Below the range only another listener can
/// take it. Each call moves on from the last, from a start that differs per process,
/// and checks that the port can be bound right now.
pub fn free_port() -> u16 {
    let span = u32::from(first_ephemeral_port()).saturating_sub(LOWEST_PORT);
    if span >= 1_000 {
        // Where this process starts: spread by its id, so parallel test binaries rarely
        // walk the same ports.
        static NEXT: OnceLock<AtomicU32> = OnceLock::new();
        let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7_919) % span));
        for _ in 0..span {
            let port = LOWEST_PORT + next.fetch_add(1, Ordering::Relaxed) % span;
            if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    // No room below the ephemeral range: any free port.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The folder holding initdb, pg_ctl and postgres (Debian keeps them off PATH).
pub fn pg_bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PULSE_TEST_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    versions.pop().ok_or_else(|| {
        anyhow!(
            "no PostgreSQL server binaries found (initdb); install postgresql or set PULSE_TEST_PG_BINDIR"
        )
    })
}

/// Runs a PostgreSQL tool, as the postgres user when we are root.
fn pg_command(bindir: &Path, tool: &str) -> Command {
    let bin = bindir.join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// Runs a command to completion; a failure carries its output.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A throwaway PostgreSQL cluster with logical replication.
pub struct PgCluster {
    /// Holds the data directory, the socket and the log.
    dir: tempfile::TempDir,
    bindir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Removes the cluster when this process is gone; killed on drop.
    watchdog: Option<Child>,
    /// The options it was started with.
    options: ClusterOptions,
}

/// How a private cluster is set up ([`PgCluster::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Serve TLS (`ssl = on`) with a certificate for the host name `localhost` only (not
    /// `127.0.0.1`), signed by a certificate authority made for the cluster. See
    /// [`PgCluster::tls_file`] for the files: `ca.crt` (the authority), `other-ca.crt`
    /// (an authority that signed nothing), `client.crt`/`client.key` (a client certificate
    /// for the role `pulse_cert`, accepted with `cert` authentication).
    pub ssl: bool,
    /// Accept TCP connections over TLS only (`hostssl` lines); the harness itself then
    /// connects over the Unix socket.
    pub ssl_only: bool,
}

impl PgCluster {
    /// The cluster shared by every test of this process, started on first use.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| PgCluster::start().expect("start the test PostgreSQL cluster"))
    }

    /// Starts a new cluster.
    pub fn start() -> Result<PgCluster> {
        PgCluster::start_with(ClusterOptions::default())
    }

    /// Starts a new cluster with `options`.
    pub fn start_with(options: ClusterOptions) -> Result<PgCluster> {
        let bindir = pg_bindir()?;
        let dir = tempfile::Builder::new().prefix("pulse-pg-").tempdir()?;
        if is_root() {
            run_checked(
                &mut {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown of the cluster folder",
            )?;
        }
        let data = dir.path().join("data");
        let mut initdb = pg_command(&bindir, "initdb");
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data);
        run_checked(&mut initdb, "initdb")?;
        let port = free_port();
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 64\nmax_wal_senders = 64\n\
             wal_sender_timeout = '10s'\nmax_connections = 300\nfsync = off\n\
             full_page_writes = off\nshared_buffers = '128MB'\nlog_min_messages = warning\n\
             logical_decoding_work_mem = '64kB'\n",
            dir.path().display()
        );
        let mut owned = vec![data.join("pg_hba.conf")];
        if options.ssl {
            make_certificates(&dir.path().join("tls"))?;
            for f in ["server.crt", "server.key", "ca.crt"] {
                std::fs::copy(dir.path().join("tls").join(f), data.join(f))?;
                owned.push(data.join(f));
            }
            std::fs::set_permissions(
                data.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            conf.push_str(
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n",
            );
        }
        let conf_path = data.join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;
        let host = if options.ssl_only { "hostssl" } else { "host" };
        let mut hba = String::new();
        if options.ssl {
            // A role that logs in with its client certificate, and one with SCRAM.
            hba.push_str("hostssl all,replication pulse_cert 127.0.0.1/32 cert\n");
            hba.push_str("hostssl all,replication pulse_scram 127.0.0.1/32 scram-sha-256\n");
        }
        hba.push_str(&format!(
            "local all all trust\n{host} all all 127.0.0.1/32 trust\nlocal replication all trust\n{host} replication all 127.0.0.1/32 trust\n"
        ));
        std::fs::write(data.join("pg_hba.conf"), hba)?;
        if is_root() {
            run_checked(
                &mut {
                    let mut c = Command::new("chown");
                    c.args(["postgres:postgres"]).arg(&conf_path).args(&owned);
                    c
                },
                "chown of the cluster config",
            )?;
        }
        let mut cluster = PgCluster {
            dir,
            bindir,
            port,
            watchdog: None,
            options,
        };
        cluster.pg_ctl_start()?;
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let mut c = pg_command(&self.bindir, "pg_ctl");
        c.args(["start", "-w", "-t", "60", "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"));
        run_checked(&mut c, "pg_ctl start").with_context(|| {
            format!(
                "log:\n{}",
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
            )
        })
    }

    /// A detached shell that waits for this process to end, then stops and removes the
    /// cluster. Detached (setsid) so that a Ctrl-C to the test's process group does not
    /// kill it before it has cleaned up.
    fn spawn_watchdog(&self) -> Result<Child> {
        let pid = std::process::id();
        let stop = format!(
            "{} {} stop -m immediate -D {}",
            if is_root() { "runuser -u postgres --" } else { "" },
            self.bindir.join("pg_ctl").display(),
            self.data_dir().display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {}",
            self.dir.path().display()
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the cluster watchdog")
    }

    /// Stops the server (fast mode: clients are disconnected, a clean shutdown).
    pub fn stop(&self) -> Result<()> {
        let mut c = pg_command(&self.bindir, "pg_ctl");
        c.args(["stop", "-w", "-m", "fast", "-D"]).arg(self.data_dir());
        run_checked(&mut c, "pg_ctl stop")
    }

    /// Starts the server again after [`PgCluster::stop`].
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A URL for `database` as the postgres superuser (TCP on 127.0.0.1).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A file made for a cluster started with [`ClusterOptions::ssl`]: `ca.crt`,
    /// `other-ca.crt`, `client.crt`, `client.key`.
    pub fn tls_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("tls").join(name)
    }

    /// The connection string the harness itself uses: TCP, or the Unix socket when the
    /// cluster accepts TCP only over TLS.
    pub fn admin_url(&self, database: &str) -> String {
        if self.options.ssl_only {
            format!(
                "host={} port={} user=postgres dbname={database}",
                self.dir.path().display(),
                self.port
            )
        } else {
            self.url(database)
        }
    }

    /// Connects to `database`.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.admin_url(database), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to {}", self.url(database)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// A fresh, empty database with a unique name.
    pub async fn fresh_db(&'static self, label: &str) -> Result<TestDb> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let clean: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!("t{}_{n}_{clean}", std::process::id());
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        Ok(TestDb { cluster: self, name })
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Makes the certificates of a TLS cluster in `dir` with the `openssl` command: an
/// authority, a server certificate for `localhost` (DNS name only), a client certificate
/// for `pulse_cert`, and a second authority that signed nothing.
fn make_certificates(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca_cnf = "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ca\n[dn]\nCN = Pulse test CA\n\
                  [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n";
    let leaf_cnf = |cn: &str| format!("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {cn}\n");
    let ext = "[server]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
               extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost\n\
               [client]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
               extendedKeyUsage = clientAuth\n";
    std::fs::write(dir.join("ca.cnf"), ca_cnf)?;
    std::fs::write(dir.join("server.cnf"), leaf_cnf("localhost"))?;
    std::fs::write(dir.join("client.cnf"), leaf_cnf("pulse_cert"))?;
    std::fs::write(dir.join("ext.cnf"), ext)?;
    let openssl = |args: &[&str], what: &str| -> Result<()> {
        let mut c = Command::new("openssl");
        c.current_dir(dir).args(args);
        run_checked(&mut c, what)
            .context("the TLS test cluster needs the openssl command (apt-get install openssl)")
    };
    for ca in ["ca", "other-ca"] {
        let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
        openssl(
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "3",
                "-config",
                "ca.cnf",
            ],
            "openssl req (authority)",
        )?;
    }
    for (leaf, section) in [("server", "server"), ("client", "client")] {
        let (key, csr, crt, cnf) = (
            format!("{leaf}.key"),
            format!("{leaf}.csr"),
            format!("{leaf}.crt"),
            format!("{leaf}.cnf"),
        );
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-config",
                &cnf,
            ],
            "openssl req (leaf)",
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "3",
                "-sha256",
                "-extfile",
                "ext.cnf",
                "-extensions",
                section,
            ],
            "openssl x509 (sign)",
        )?;
    }
    Ok(())
}

/// One test's database. Dropping it drops its replication slots and the database.
pub struct TestDb {
    /// The cluster it lives in.
    pub cluster: &'static PgCluster,
    /// Its name.
    pub name: String,
}

impl TestDb {
    /// Its URL.
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// A connection to it.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        self.cluster.connect(&self.name).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Blocking psql-free cleanup on a thread of its own: Drop may run inside a runtime.
        let url = self.cluster.admin_url("postgres");
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(conn);
                let _ = client
                    .execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL",
                        &[&name],
                    )
                    .await;
                for _ in 0..50 {
                    let r = client
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
                            &[&name],
                        )
                        .await;
                    if r.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await.ok()
            })
        })
        .join();
    }
}

/// The RabbitMQ broker used by tests and benchmarks.
pub struct Rabbit {
    /// AMQP URL.
    pub url: String,
}

impl Rabbit {
    /// The broker of `PULSE_TEST_AMQP_URL`, or guest on 127.0.0.1:5672.
    pub fn from_env() -> Rabbit {
        let url = std::env::var("PULSE_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
        Rabbit { url }
    }

    /// A name no other test uses: `pulse-test-<label>-<uuid>`.
    pub fn unique(label: &str) -> String {
        format!("pulse-test-{label}-{}", uuid::Uuid::new_v4().simple())
    }

    /// Connects, or says how to get a broker.
    pub async fn connect(&self) -> Result<lapin::Connection> {
        lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
            .await
            .with_context(|| {
                format!(
                    "cannot reach RabbitMQ at {}; start it (rabbitmq-server -detached) or set PULSE_TEST_AMQP_URL",
                    self.url
                )
            })
    }
}

/// A replication slot name no other test of this cluster uses: slots are cluster-wide,
/// unlike the databases each test creates.
pub fn unique_slot(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let clean: String = label
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(30)
        .collect();
    format!("{clean}_{}_{n}", std::process::id())
}

/// The real `pulsed` binary, running as a child process on free ports.
pub struct Pulsed {
    child: Option<Child>,
    /// Browser API base, `http://127.0.0.1:PORT`.
    pub http: String,
    /// Metrics base.
    pub metrics: String,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Holds the log and the admin socket.
    pub dir: tempfile::TempDir,
}

impl Pulsed {
    /// Starts `bin` with the given extra environment (`PULSE__…` pairs); ports, the admin
    /// socket and the storage folder are chosen here unless given.
    pub fn spawn(bin: &Path, env: &[(&str, String)]) -> Result<Pulsed> {
        Pulsed::spawn_with_config(bin, Path::new("/dev/null"), env)
    }

    /// Like [`Pulsed::spawn`], with a config file.
    pub fn spawn_with_config(bin: &Path, config: &Path, env: &[(&str, String)]) -> Result<Pulsed> {
        let dir = tempfile::Builder::new().prefix("pulsed-").tempdir()?;
        let http_port = free_port();
        let metrics_port = free_port();
        let admin_socket = dir.path().join("admin.sock");
        let log = std::fs::File::create(dir.path().join("pulsed.log"))?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PULSE__HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
            .env("PULSE__METRICS__LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("PULSE__ADMIN__SOCKET", &admin_socket)
            .env("PULSE__STORAGE__PATH", dir.path().join("files"))
            .env("PULSE__LOG__FORMAT", "text")
            // Replication slots are cluster-wide: each pulsed gets its own unless the
            // test names one.
            .env("PULSE__REPLICATION__SLOT", unique_slot("pulsed"))
            .env("RUST_BACKTRACE", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Pulsed {
            child: Some(child),
            http: format!("http://127.0.0.1:{http_port}"),
            metrics: format!("http://127.0.0.1:{metrics_port}"),
            admin_socket,
            dir,
        })
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pulsed.log")).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let url = format!("{}/readyz", self.http);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "pulsed exited with {status} before it was ready; log:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("pulsed not ready within {timeout:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal)?;
        Ok(())
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "pulsed still running {timeout:?} after being asked to stop; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pulsed {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_distinct_and_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!((LOWEST_PORT as u16..first_ephemeral_port()).contains(&p), "{p}");
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
