//! `pulse-bench files`: uploads and downloads of 1 MB and 20 MB files, 16 at a time,
//! through pulsed (upload URL, PUT, authorised GET) and through nginx (WebDAV PUT, GET)
//! beside it, both storing on the same disk in the same run.
//!
//! Starts its own PostgreSQL cluster, pulsed (the binary next to this one) and nginx
//! (`/usr/sbin/nginx` or `nginx` on PATH, with a generated config on a free port), and
//! removes everything when done.
//!
//! Durability: pulsed answers an upload only once the file's data and its directory entry
//! are synced to disk (and its metadata committed); nginx's WebDAV PUT renames its
//! temporary file into place and answers without any sync, and has no setting to do
//! otherwise. So nginx's uploads are measured twice on the same files: as nginx does
//! them, and with the same guarantee as pulsed, each PUT followed by an fsync of the
//! stored file and of its folder before it counts as done (the bench does the syncs,
//! which really write nginx's bytes to the disk). The summary's upload ratio is against
//! the latter; the line before it also gives the ratio against nginx without syncs.
//! Every timed upload phase starts after a `sync`, so no phase pays for the writeback of
//! another's dirty pages, and the files are uploaded in rounds whose order of sides flips
//! each time ([`ROUNDS`]), so neither side always goes first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use pulse_harness::{PgCluster, Pulsed, free_port};

const DEPLOY_KEY: &str = "bench-deploy-key-0123456789abcdef0123456789";
const SIGNING: &str = "bench-signing-secret-0123456789abcdef012345";
const CONCURRENCY: usize = 16;
const MB: usize = 1024 * 1024;

/// Runs the benchmark and prints its summary line last.
pub async fn run(quick: bool) -> Result<()> {
    let mut per_size = if quick { 20 } else { 100 };
    let mut sizes = vec![MB, 20 * MB];
    // Overrides for exploring one part of the workload (the figures that count are from
    // the defaults): how many files of each size, and which sizes (in MB, comma-separated).
    if let Ok(n) = std::env::var("PULSE_BENCH_FILES") {
        per_size = n
            .trim()
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .context("PULSE_BENCH_FILES: how many files of each size, at least 1")?;
    }
    if let Ok(list) = std::env::var("PULSE_BENCH_FILE_SIZES") {
        sizes = list
            .split(',')
            .map(|s| s.trim().parse::<usize>().ok().filter(|mb| (1..=20).contains(mb)))
            .map(|mb| mb.map(|mb| mb * MB))
            .collect::<Option<_>>()
            .context("PULSE_BENCH_FILE_SIZES: sizes in MB, each 1 to 20, comma-separated")?;
    }
    let work = tempfile::Builder::new().prefix("pulse-bench-files-").tempdir()?;

    let pulsed_bin = sibling("pulsed")?;
    eprintln!("starting PostgreSQL");
    let cluster = PgCluster::start()?;
    let mut pulsed = Pulsed::spawn(
        &pulsed_bin,
        &[
            ("PULSE__SOURCE__URL", cluster.url("postgres")),
            ("PULSE__PLATFORM__DEPLOY_KEY", DEPLOY_KEY.into()),
            ("PULSE__STORAGE__SIGNING_SECRET", SIGNING.into()),
            (
                "PULSE__STORAGE__PATH",
                work.path().join("pulse").display().to_string(),
            ),
            ("PULSE__STORAGE__QUOTA_BYTES", "0".into()),
            ("PULSE__LOG__LEVEL", "warn".into()),
        ],
    )?;
    pulsed.wait_ready(Duration::from_secs(60)).await?;
    let nginx = Nginx::start(work.path())?;
    nginx.wait_ready().await?;
    eprintln!(
        "pulsed at {}, nginx at {}; {per_size} files of each size, {CONCURRENCY} at a time",
        pulsed.http, nginx.url
    );

    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let mut base = vec![0u8; 20 * MB];
    rand::fill(&mut base[..]);
    let base = Bytes::from(base);

    let mut totals = Totals::default();
    for size in sizes {
        let files: Vec<Bytes> = (0..per_size).map(|i| distinct(&base, size, i)).collect();
        let bytes = (size * per_size) as f64;
        // A quick run's few files make one round: split, most of each round would be
        // the ramp up to 16 in flight and the tail below it.
        let rounds = rounds(per_size, if quick { 1 } else { ROUNDS });
        let mut t = Totals::default();

        let mut ids = Vec::with_capacity(per_size);
        for (round, range) in rounds.iter().enumerate() {
            let mut order = [Upload::Nginx, Upload::NginxSynced, Upload::Pulse];
            if round % 2 == 1 {
                order.reverse();
            }
            for side in order {
                settle(&format!(
                    "{} MB files, round {}, {}",
                    size / MB,
                    round + 1,
                    side.name()
                ))
                .await;
                let start = Instant::now();
                let range = range.clone();
                match side {
                    Upload::Nginx | Upload::NginxSynced => {
                        let synced = side == Upload::NginxSynced;
                        let prefix = if synced { "synced-" } else { "" };
                        run_all(range, |i| {
                            let name = format!("{prefix}{size}-{i}.bin");
                            nginx_put(&http, &nginx, name, files[i].clone(), synced)
                        })
                        .await?;
                    }
                    Upload::Pulse => {
                        ids.extend(
                            run_all(range, |i| pulse_put(&http, &pulsed.http, files[i].clone())).await?,
                        );
                    }
                }
                *t.upload(side) += start.elapsed().as_secs_f64();
            }
        }

        settle(&format!("{} MB files, downloads", size / MB)).await;
        for (round, range) in rounds.iter().enumerate() {
            for pulse in [round % 2 == 1, round % 2 == 0] {
                let start = Instant::now();
                if pulse {
                    run_all(range.clone(), |i| {
                        let url = format!("{}/files/{}", pulsed.http, ids[i]);
                        get_len(&http, url, Some(DEPLOY_KEY), size)
                    })
                    .await?;
                    t.pulse_down += start.elapsed().as_secs_f64();
                } else {
                    run_all(range.clone(), |i| {
                        get_len(&http, format!("{}/files/{size}-{i}.bin", nginx.url), None, size)
                    })
                    .await?;
                    t.nginx_down += start.elapsed().as_secs_f64();
                }
            }
        }
        // Ends the downloads' phase (for `scripts/phase-cpu`): what follows is untimed.
        eprintln!("phase: {} MB files, untimed", size / MB);
        let Totals {
            pulse_up,
            pulse_down,
            nginx_up,
            nginx_synced_up,
            nginx_down,
            ..
        } = t;

        let mb = bytes / 1e6;
        println!(
            "{:>2} MB files: upload pulse {:.0} MB/s, nginx {:.0} MB/s synced ({:.0} MB/s unsynced); download pulse {:.0} MB/s, nginx {:.0} MB/s; pulsed peak RSS {:.1} MB",
            size / MB,
            mb / pulse_up,
            mb / nginx_synced_up,
            mb / nginx_up,
            mb / pulse_down,
            mb / nginx_down,
            peak_rss_mb(pulsed.pid()).unwrap_or(f64::NAN),
        );
        totals.bytes += bytes;
        totals.pulse_up += pulse_up;
        totals.pulse_down += pulse_down;
        totals.nginx_up += nginx_up;
        totals.nginx_synced_up += nginx_synced_up;
        totals.nginx_down += nginx_down;
    }
    // Idle keep-alive connections first: a server stopping gracefully waits for them.
    drop(http);
    drop(nginx);
    pulsed.signal(nix::sys::signal::Signal::SIGTERM)?;
    let _ = pulsed.wait_exit(Duration::from_secs(20)).await;

    let mb = totals.bytes / 1e6;
    let up = mb / totals.pulse_up;
    let down = mb / totals.pulse_down;
    let nginx_up = mb / totals.nginx_up;
    let nginx_synced_up = mb / totals.nginx_synced_up;
    let nginx_down = mb / totals.nginx_down;
    // The weaker direction: the target must hold for uploads and downloads alike.
    let ratio = (up / nginx_synced_up).min(down / nginx_down);
    println!(
        "nginx: upload {nginx_synced_up:.0} MB/s synced ({nginx_up:.0} MB/s unsynced), download {nginx_down:.0} MB/s; ratios: upload {:.2} ({:.2} vs unsynced), download {:.2}",
        up / nginx_synced_up,
        up / nginx_up,
        down / nginx_down
    );
    println!("files: upload {up:.0} MB/s, download {down:.0} MB/s, ratio vs nginx {ratio:.2}");
    Ok(())
}

/// How many rounds each size's files are split into. Within a round each side uploads
/// (and then downloads) its share of the files; the order of the sides flips from one
/// round to the next (A B, then B A), so a drift of the machine over the run (the page
/// cache growing into memory the host has not backed yet, writeback, a neighbour) weighs
/// on pulsed and nginx alike instead of on whichever would otherwise go last. That drift
/// is large here (the first round often runs several times faster than the last), so
/// four rounds, each still more than [`CONCURRENCY`] files.
const ROUNDS: usize = 4;

/// `n` file indexes in `rounds` consecutive ranges (fewer when there are fewer files).
fn rounds(n: usize, rounds: usize) -> Vec<std::ops::Range<usize>> {
    let chunk = n.div_ceil(rounds.max(1)).max(1);
    (0..n).step_by(chunk).map(|s| s..(s + chunk).min(n)).collect()
}

/// The three ways a round's files are uploaded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// nginx's WebDAV PUT as nginx does it (no sync).
    Nginx,
    /// nginx's PUT followed by the syncs pulsed makes: the anchor.
    NginxSynced,
    /// pulsed: upload URL, then PUT.
    Pulse,
}

impl Upload {
    fn name(self) -> &'static str {
        match self {
            Upload::Nginx => "nginx upload",
            Upload::NginxSynced => "nginx synced upload",
            Upload::Pulse => "pulsed upload",
        }
    }
}

#[derive(Default)]
struct Totals {
    bytes: f64,
    pulse_up: f64,
    pulse_down: f64,
    nginx_up: f64,
    nginx_synced_up: f64,
    nginx_down: f64,
}

impl Totals {
    /// The upload time of `side`.
    fn upload(&mut self, side: Upload) -> &mut f64 {
        match side {
            Upload::Nginx => &mut self.nginx_up,
            Upload::NginxSynced => &mut self.nginx_synced_up,
            Upload::Pulse => &mut self.pulse_up,
        }
    }
}

/// Writes every dirty page back before a timed phase, so a phase never pays for the
/// writeback of the one before it; then names the phase on stderr (for profiling one).
async fn settle(phase: &str) {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
    eprintln!("phase: {phase}");
}

/// The binary `name` next to this one (both come from the same `cargo build`).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("the bench binary has a folder")?.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p pulse-daemon)",
            path.display()
        );
    }
    Ok(path)
}

/// The first `size` bytes of `base`, made unique by the index, so no two files share
/// content (pulsed would store identical content once).
fn distinct(base: &Bytes, size: usize, i: usize) -> Bytes {
    let mut v = base[..size].to_vec();
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v[8..16].copy_from_slice(&(size as u64).to_le_bytes());
    Bytes::from(v)
}

/// Runs `f` on every item, [`CONCURRENCY`] at a time: a new one starts as soon as any
/// finishes (results in the order they finish). In order, a slow head would hold the
/// finished ones behind it and keep their places empty.
async fn run_all<I, T, F, Fut, R>(items: I, f: F) -> Result<Vec<R>>
where
    I: IntoIterator<Item = T>,
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<R>>,
{
    futures_util::stream::iter(items.into_iter().map(f))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// A WebDAV PUT to nginx; with `synced`, done only once the stored file and its folder
/// are synced to disk, the guarantee pulsed gives.
async fn nginx_put(
    http: &reqwest::Client,
    nginx: &Nginx,
    name: String,
    body: Bytes,
    synced: bool,
) -> Result<()> {
    let r = http
        .put(format!("{}/files/{name}", nginx.url))
        .body(body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("nginx PUT answered {}", r.status());
    }
    if synced {
        let dir = nginx.files.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(dir.join(&name))?.sync_data()?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await??;
    }
    Ok(())
}

async fn pulse_put(http: &reqwest::Client, base: &str, body: Bytes) -> Result<String> {
    let r = http
        .post(format!("{base}/files/upload-url"))
        .bearer_auth(DEPLOY_KEY)
        .header("X-Pulse-Tenant", "bench")
        .json(&serde_json::json!({
            "name": "bench.bin", "content_type": "application/octet-stream", "size": body.len(),
        }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("upload-url answered {}: {}", r.status(), r.text().await?);
    }
    let ticket: serde_json::Value = r.json().await?;
    let path = ticket["path"]
        .as_str()
        .ok_or_else(|| anyhow!("no path in {ticket}"))?;
    let r = http.put(format!("{base}{path}")).body(body).send().await?;
    if !r.status().is_success() {
        bail!("upload answered {}: {}", r.status(), r.text().await?);
    }
    let file: serde_json::Value = r.json().await?;
    Ok(file["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id in {file}"))?
        .to_string())
}

async fn get_len(http: &reqwest::Client, url: String, bearer: Option<&str>, expect: usize) -> Result<()> {
    let mut rb = http.get(&url);
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    let r = rb.send().await?;
    if !r.status().is_success() {
        bail!("GET {url} answered {}", r.status());
    }
    let mut stream = r.bytes_stream();
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        n += chunk?.len();
    }
    if n != expect {
        bail!("GET {url}: {n} bytes, expected {expect}");
    }
    Ok(())
}

fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// An nginx of our own: generated config, free port, WebDAV PUT, files on our disk.
struct Nginx {
    child: Child,
    url: String,
    /// The folder the PUT files land in.
    files: PathBuf,
}

impl Nginx {
    fn start(work: &Path) -> Result<Nginx> {
        let bin = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|b| Command::new(b).arg("-v").output().is_ok())
            .ok_or_else(|| anyhow!("nginx not found: install the Debian package nginx"))?;
        let dir = work.join("nginx");
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("files"))?;
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join("tmp").join(t))?;
        }
        let port = free_port();
        let is_root = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })?;
        let d = dir.display();
        let config = format!(
            r#"{user}
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        client_max_body_size 64m;
        client_body_buffer_size 1m;
        location /files/ {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw;
        }}
    }}
}}
"#,
            user = if is_root { "user root;" } else { "" },
            root = root.display(),
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-e", "stderr", "-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start nginx")?;
        Ok(Nginx {
            child,
            url: format!("http://127.0.0.1:{port}"),
            files: root.join("files"),
        })
    }

    async fn wait_ready(&self) -> Result<()> {
        let http = reqwest::Client::new();
        pulse_harness::wait_for("nginx", Duration::from_secs(10), || {
            let http = http.clone();
            let url = format!("{}/files/", self.url);
            async move { http.get(url).send().await.ok().map(|_| ()) }
        })
        .await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful stop of the master and its workers.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::rounds;

    #[test]
    fn rounds_cover_every_file_once_in_order() {
        assert_eq!(rounds(100, 4), vec![0..25, 25..50, 50..75, 75..100]);
        assert_eq!(rounds(10, 4), vec![0..3, 3..6, 6..9, 9..10]);
        assert_eq!(rounds(3, 4), vec![0..1, 1..2, 2..3]);
        assert_eq!(rounds(0, 4), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(rounds(5, 0), vec![0..5]);
    }
}
