//! File storage over real HTTP against the real pulsed binary and real PostgreSQL:
//! upload URLs, uploads, downloads, quotas, names, memory, encryption, permissions,
//! cleanup, and the S3 backend against a local S3-compatible server when one is installed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use pulse_daemon::config::{Config, ConfigSource};
use pulse_daemon::files::{self, Ctx, Files};
use pulse_harness::{PgCluster, Pulsed, TestDb, wait_for};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{column, metrics_text, pulsed_bin};

const DEPLOY_KEY: &str = "files-test-deploy-key-0123456789abcdef-0123";
const SIGNING: &str = "files-test-signing-secret-0123456789abcdef";
const JWT_SECRET: &str = "files-test-jwt-secret-0123456789abcdef-xyz";
const MB: usize = 1024 * 1024;

struct Env {
    db: TestDb,
    pulsed: Pulsed,
    http: reqwest::Client,
    storage: PathBuf,
    _storage_dir: Option<tempfile::TempDir>,
}

fn base_env(db: &TestDb, storage: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("PULSE__SOURCE__URL", db.url()),
        ("PULSE__PLATFORM__DEPLOY_KEY", DEPLOY_KEY.into()),
        ("PULSE__STORAGE__SIGNING_SECRET", SIGNING.into()),
        ("PULSE__STORAGE__PATH", storage.display().to_string()),
        ("PULSE__AUTH__ISSUER", "symfony".into()),
        ("PULSE__AUTH__AUDIENCE", "pulse".into()),
        ("PULSE__AUTH__HS256_SECRET", JWT_SECRET.into()),
        ("PULSE__HTTP__CORS_ORIGINS", "https://app.example.org".into()),
    ]
}

impl Env {
    async fn start(label: &str, extra: &[(&'static str, String)]) -> Env {
        let db = PgCluster::shared().fresh_db(label).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("files");
        let pulsed = Env::spawn(&db, &storage, extra).await;
        Env {
            db,
            pulsed,
            http: reqwest::Client::new(),
            storage,
            _storage_dir: Some(dir),
        }
    }

    async fn spawn(db: &TestDb, storage: &Path, extra: &[(&'static str, String)]) -> Pulsed {
        let mut env = base_env(db, storage);
        env.extend(extra.iter().cloned());
        let mut pulsed = Pulsed::spawn(&pulsed_bin(), &env).unwrap();
        pulsed.wait_ready(Duration::from_secs(30)).await.unwrap();
        pulsed
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.pulsed.http)
    }

    fn service(&self, rb: reqwest::RequestBuilder, tenant: &str) -> reqwest::RequestBuilder {
        rb.bearer_auth(DEPLOY_KEY).header("X-Pulse-Tenant", tenant)
    }

    /// A request about a file, `/files/{path}` (`path` is its id, and what follows),
    /// as the service for `tenant`.
    fn file(&self, method: Method, path: &str, tenant: &str) -> reqwest::RequestBuilder {
        self.service(
            self.http.request(method, self.url(&format!("/files/{path}"))),
            tenant,
        )
    }

    async fn ticket_as(&self, auth: &Auth, body: Value) -> reqwest::Response {
        auth.apply(self.http.post(self.url("/files/upload-url")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn ticket(&self, tenant: &str, body: Value) -> Value {
        let r = self.ticket_as(&Auth::Service(tenant.into()), body).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }

    /// The upload of a ticket's bytes (a `Vec<u8>`, or a stream with no length).
    fn put_request(&self, ticket: &Value, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        self.http
            .put(self.url(ticket["path"].as_str().unwrap()))
            .body(body)
    }

    async fn put(&self, ticket: &Value, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.put_request(ticket, body).send().await.unwrap()
    }

    async fn upload_as(&self, auth: &Auth, name: &str, ctype: &str, bytes: Vec<u8>, public: bool) -> Value {
        let r = self
            .ticket_as(
                auth,
                json!({"name": name, "content_type": ctype, "size": bytes.len(), "public": public}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
        let ticket: Value = r.json().await.unwrap();
        let r = self.put(&ticket, bytes).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }

    async fn upload(&self, tenant: &str, name: &str, ctype: &str, bytes: Vec<u8>) -> Value {
        self.upload_as(&Auth::Service(tenant.into()), name, ctype, bytes, false)
            .await
    }

    async fn get(&self, id: &str, tenant: &str) -> reqwest::Response {
        self.file(Method::GET, id, tenant).send().await.unwrap()
    }

    /// (used, reserved) bytes of a tenant, from the database.
    async fn usage(&self, tenant: &str) -> (i64, i64) {
        let c = self.db.connect().await.unwrap();
        c.query_opt(
            "SELECT used_bytes, reserved_bytes FROM pulse.storage_usage WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
        .unwrap_or((0, 0))
    }

    /// Stored objects (not staged files).
    fn objects(&self) -> Vec<PathBuf> {
        walk(&self.storage.join("t"))
    }

    fn staged(&self) -> Vec<PathBuf> {
        walk(&self.storage.join(".staging"))
    }

    /// What the daemon's jobs get, for calling its file functions directly.
    fn direct(&self) -> Direct {
        let config = self.config(&[]);
        Direct {
            files: Files::open(&config).unwrap(),
            pool: pulse_daemon::db::pool(&config.state_db, 2).unwrap(),
            config,
        }
    }

    fn config(&self, extra: &[(&str, String)]) -> Config {
        let mut env: Vec<(String, String)> = base_env(&self.db, &self.storage)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Config::load(&ConfigSource { file: None, env }).unwrap()
    }
}

/// The storage, a pool and the configuration of a test's pulsed, held for [`Ctx`].
struct Direct {
    files: Files,
    pool: deadpool_postgres::Pool,
    config: Config,
}

impl Direct {
    fn cx(&self) -> Ctx<'_> {
        Ctx {
            files: &self.files,
            pool: &self.pool,
            config: &self.config,
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// How a request authenticates.
enum Auth {
    Service(String),
    Jwt(String),
    None,
}

impl Auth {
    fn apply(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::Service(t) => rb.bearer_auth(DEPLOY_KEY).header("X-Pulse-Tenant", t),
            Auth::Jwt(token) => rb.bearer_auth(token),
            Auth::None => rb,
        }
    }

    fn user(user: &str, tenant: Option<&str>, role: &str) -> Auth {
        let now = pulse_daemon::auth::now_secs();
        let mut claims = json!({
            "iss": "symfony", "aud": "pulse", "sub": user, "roles": [role],
            "iat": now, "exp": now + 600,
        });
        if let Some(t) = tenant {
            claims["tenant_id"] = json!(t);
        }
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .unwrap();
        Auth::Jwt(token)
    }
}

async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "expected {code}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert!(!body["message"].as_str().unwrap_or("").is_empty());
    body
}

fn png(len: usize, seed: u8) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend((0..len.saturating_sub(8)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

fn text(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i + seed as usize) % 26) as u8)
        .collect()
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The parts of a `multipart/byteranges` body: each part's header lines (lower case)
/// and bytes. Fails the test on broken framing.
fn byteranges(body: &[u8], boundary: &str) -> Vec<(Vec<String>, Vec<u8>)> {
    let first = format!("--{boundary}\r\n");
    assert!(
        body.starts_with(first.as_bytes()),
        "the body starts with the boundary"
    );
    let close = format!("\r\n--{boundary}--\r\n");
    assert!(
        body.ends_with(close.as_bytes()),
        "the body ends with the closing delimiter"
    );
    let inner = &body[first.len()..body.len() - close.len()];
    let delimiter = format!("\r\n--{boundary}\r\n");
    let mut parts = Vec::new();
    let mut rest = inner;
    loop {
        let blank = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("part headers end with a blank line");
        let headers = String::from_utf8(rest[..blank].to_vec())
            .unwrap()
            .split("\r\n")
            .map(str::to_ascii_lowercase)
            .collect();
        let data = &rest[blank + 4..];
        match data
            .windows(delimiter.len())
            .position(|w| w == delimiter.as_bytes())
        {
            Some(end) => {
                parts.push((headers, data[..end].to_vec()));
                rest = &data[end + delimiter.len()..];
            }
            None => {
                parts.push((headers, data.to_vec()));
                return parts;
            }
        }
    }
}

#[tokio::test]
async fn round_trip_with_etag_range_head_and_signed_urls() {
    let env = Env::start("files_round_trip", &[]).await;
    let body = png(300_000, 1);
    let file = env.upload("club-a", "photo.png", "image/png", body.clone()).await;
    let id = file["id"].as_str().unwrap().to_string();
    assert_eq!(file["size"], 300_000);
    assert_eq!(file["sha256"], sha_hex(&body));
    assert_eq!(file["tenant"], "club-a");

    // Full download with every header.
    let r = env.get(&id, "club-a").await;
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    let etag = h["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", sha_hex(&body)));
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["content-length"], "300000");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(
        h["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("inline; filename=\"photo.png\"")
    );
    assert_eq!(h["cache-control"], "private, no-cache");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);

    // If-None-Match: 304 without a body, also with a range.
    for range in [None, Some("bytes=0-9")] {
        let mut rb = env.file(Method::GET, &id, "club-a");
        rb = rb.header("If-None-Match", format!("\"nope\", {etag}"));
        if let Some(r) = range {
            rb = rb.header("Range", r);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(r.headers()["etag"], etag.as_str());
        assert!(r.bytes().await.unwrap().is_empty());
    }
    let r = env
        .file(Method::GET, &id, "club-a")
        .header("If-None-Match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // HEAD: the headers of GET, no body.
    let r = env.file(Method::HEAD, &id, "club-a").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], "300000");
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().await.unwrap().is_empty());

    // Ranges.
    let size = body.len();
    type Case<'a> = (&'a str, u16, Option<(usize, usize)>);
    let cases: &[Case<'_>] = &[
        ("bytes=0-9", 206, Some((0, 10))),
        ("bytes=100-", 206, Some((100, size))),
        ("bytes=-50", 206, Some((size - 50, size))),
        ("bytes=-999999999", 206, Some((0, size))),
        ("bytes=299990-400000", 206, Some((299_990, size))),
        ("bytes=299999-299999", 206, Some((299_999, size))),
        ("bytes=300000-", 416, None),
        ("bytes=-0", 416, None),
        // Several ranges that coalesce into one: a single part.
        ("bytes=10-19,0-9,5-12", 206, Some((0, 20))),
        // Past the end only: unsatisfiable even when there are several.
        ("bytes=300000-300001,400000-", 416, None),
        // Malformed: ignored, whole file.
        ("bytes=9-2", 200, Some((0, size))),
    ];
    for (range, status, want) in cases {
        let r = env
            .file(Method::GET, &id, "club-a")
            .header("Range", *range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), *status, "{range}");
        let h = r.headers().clone();
        let got = r.bytes().await.unwrap();
        match want {
            Some((s, e)) => {
                assert_eq!(got.as_ref(), &body[*s..*e], "{range}");
                if *status == 206 {
                    assert_eq!(h["content-range"], format!("bytes {s}-{}/{size}", e - 1).as_str());
                }
            }
            None => assert_eq!(h["content-range"], format!("bytes */{size}").as_str()),
        }
    }

    // Several ranges: multipart/byteranges, sorted and coalesced, with a Content-Range
    // per part and a Content-Length that counts the framing; HEAD says the same length.
    let get_ranges = |range: &'static str, if_range: Option<String>| {
        let mut rb = env.file(Method::GET, &id, "club-a").header("Range", range);
        if let Some(v) = if_range {
            rb = rb.header("If-Range", v);
        }
        rb.send()
    };
    let r = get_ranges("bytes=200-209, 0-9,5-14,299995-", None).await.unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let h = r.headers().clone();
    assert!(h.get("content-range").is_none());
    let ctype = h["content-type"].to_str().unwrap().to_string();
    let boundary = ctype
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("{ctype}"))
        .to_string();
    let got = r.bytes().await.unwrap();
    assert_eq!(h["content-length"], got.len().to_string().as_str());
    let parts = byteranges(&got, &boundary);
    let want = [(0, 15), (200, 210), (299_995, size)];
    assert_eq!(parts.len(), want.len(), "{parts:?}");
    for ((headers, bytes), (s, e)) in parts.iter().zip(want) {
        assert!(
            headers.contains(&"content-type: image/png".to_string()),
            "{headers:?}"
        );
        assert!(
            headers.contains(&format!("content-range: bytes {s}-{}/{size}", e - 1)),
            "{headers:?}"
        );
        assert_eq!(&bytes[..], &body[s..e]);
    }
    let r = env
        .file(Method::HEAD, &id, "club-a")
        .header("Range", "bytes=200-209, 0-9,5-14,299995-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-length"], got.len().to_string().as_str());
    // More ranges than the cap: ignored, the whole file.
    let many: String = (0..33).map(|i| format!("{}-{},", i * 10, i * 10 + 1)).collect();
    let r = env
        .file(Method::GET, &id, "club-a")
        .header("Range", format!("bytes={many}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().len(), size);
    // If-Range: our ETag keeps the range; another, a weak one or a date serve it whole.
    let r = get_ranges("bytes=0-9", Some(etag.clone())).await.unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..10]);
    for other in [
        "\"0123\"".to_string(),
        format!("W/{etag}"),
        "Tue, 24 Nov 2026 10:00:00 GMT".to_string(),
    ] {
        let r = get_ranges("bytes=0-9,20-29", Some(other.clone())).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "If-Range {other}");
        assert!(r.headers().get("content-range").is_none());
        assert_eq!(r.bytes().await.unwrap().len(), size, "If-Range {other}");
    }

    // Signed URLs: readable without a token, cacheable publicly, forged and expired ones
    // refused.
    let signed_path = |ttl_secs: u64| {
        let (env, id) = (&env, &id);
        async move {
            let r = env
                .file(Method::POST, &format!("{id}/signed-url"), "club-a")
                .json(&json!({ "ttl_secs": ttl_secs }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let signed: Value = r.json().await.unwrap();
            signed["path"].as_str().unwrap().to_string()
        }
    };
    let refused = |path: String| {
        let env = &env;
        async move {
            expect_error(
                env.http.get(env.url(&path)).send().await.unwrap(),
                403,
                "upload_url_expired",
            )
            .await
        }
    };
    let path = signed_path(60).await;
    let r = env.http.get(env.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .starts_with("public, max-age=")
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    refused(path.replace("sig=", "sig=00")).await;
    // Moving the expiry breaks the signature.
    refused(path.replacen("expires=", "expires=9", 1)).await;
    let short = signed_path(1).await;
    wait_for("the signed URL to expire", Duration::from_secs(5), || async {
        let r = env.http.get(env.url(&short)).send().await.ok()?;
        (r.status() == StatusCode::FORBIDDEN).then_some(())
    })
    .await
    .unwrap();
    let body = refused(short).await;
    assert!(body["message"].as_str().unwrap().contains("expired"), "{body}");

    // No credentials, wrong credentials, unknown ids.
    let anonymous = env.http.get(env.url(&format!("/files/{id}")));
    for request in [anonymous.try_clone().unwrap(), anonymous.bearer_auth("not-a-jwt")] {
        expect_error(request.send().await.unwrap(), 401, "unauthenticated").await;
    }
    expect_error(
        env.get("00000000-0000-0000-0000-000000000000", "club-a").await,
        404,
        "not_found",
    )
    .await;
    expect_error(env.get("nonsense", "club-a").await, 404, "not_found").await;

    // CORS: the allowed origin gets its header, another does not.
    let preflight = |origin: &'static str| {
        env.http
            .request(Method::OPTIONS, env.url("/files/upload-url"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .send()
    };
    let r = preflight("https://app.example.org").await.unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.org"
    );
    let r = preflight("https://evil.example.net").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // Delete: gone from the database, the disk and the usage.
    assert_eq!(env.usage("club-a").await, (300_000, 0));
    let r = env.file(Method::DELETE, &id, "club-a").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    expect_error(env.get(&id, "club-a").await, 404, "not_found").await;
    assert!(env.objects().is_empty());
    assert_eq!(env.usage("club-a").await, (0, 0));
}

#[tokio::test]
async fn every_upload_error_has_its_code_and_leaves_nothing() {
    let env = Env::start(
        "files_errors",
        &[("PULSE__LIMITS__MAX_UPLOAD_BYTES", (MB).to_string())],
    )
    .await;
    let svc = Auth::Service("club-a".into());

    // Ticket errors.
    let r = env
        .ticket_as(
            &Auth::None,
            json!({"name": "a.txt", "content_type": "text/plain"}),
        )
        .await;
    expect_error(r, 401, "unauthenticated").await;
    let r = env
        .ticket_as(
            &Auth::Jwt("forged.token.here".into()),
            json!({"name": "a.txt", "content_type": "text/plain"}),
        )
        .await;
    expect_error(r, 401, "unauthenticated").await;
    let r = env
        .http
        .post(env.url("/files/upload-url"))
        .header("X-Pulse-Deploy-Key", "wrong")
        .json(&json!({"name": "a.txt", "content_type": "text/plain"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "unauthenticated").await;
    let r = env
        .ticket_as(
            &Auth::Service(String::new()),
            json!({"name": "a.txt", "content_type": "text/plain"}),
        )
        .await;
    let b = expect_error(r, 400, "invalid_argument").await;
    assert_eq!(b["details"]["field"], "tenant");
    let r = env
        .ticket_as(&svc, json!({"name": "a.html", "content_type": "text/html"}))
        .await;
    let b = expect_error(r, 400, "invalid_argument").await;
    assert_eq!(b["details"]["field"], "content_type");
    let r = env.ticket_as(&svc, json!({"content_type": "text/plain"})).await;
    expect_error(r, 400, "invalid_argument").await;
    let r = env
        .ticket_as(
            &svc,
            json!({"name": "big.bin", "content_type": "application/octet-stream", "size": MB + 1}),
        )
        .await;
    let b = expect_error(r, 413, "file_too_large").await;
    assert_eq!(b["details"]["limit_bytes"], MB);
    assert!(b["message"].as_str().unwrap().contains("1048576"), "{b}");

    // Too large while streaming, without a Content-Length: refused when the limit passes.
    let t = env
        .ticket(
            "club-a",
            json!({"name": "big.bin", "content_type": "application/octet-stream"}),
        )
        .await;
    assert_eq!(t["max_bytes"], MB);
    let chunks = futures_util::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![7u8; 64 * 1024])));
    let r = env.put(&t, reqwest::Body::wrap_stream(chunks)).await;
    let b = expect_error(r, 413, "file_too_large").await;
    assert_eq!(b["details"]["limit_bytes"], MB);
    // Too large by Content-Length.
    let t = env
        .ticket(
            "club-a",
            json!({"name": "big.bin", "content_type": "application/octet-stream"}),
        )
        .await;
    let r = env.put(&t, vec![1u8; MB + 10]).await;
    expect_error(r, 413, "file_too_large").await;

    // A client that hangs up halfway: nothing stays staged, the reservation goes back.
    let t = env
        .ticket(
            "club-a",
            json!({"name": "cut.bin", "content_type": "application/octet-stream"}),
        )
        .await;
    let half = futures_util::stream::iter((0..6).map(|i| {
        if i < 5 {
            Ok(vec![9u8; 64 * 1024])
        } else {
            Err(std::io::Error::other("the client gives up"))
        }
    }));
    let sent = env.put_request(&t, reqwest::Body::wrap_stream(half)).send().await;
    assert!(sent.is_err(), "the request was cut: {sent:?}");
    wait_for("the cut upload to clean up", Duration::from_secs(10), || async {
        (env.usage("club-a").await.1 == 0 && env.staged().is_empty()).then_some(())
    })
    .await
    .unwrap();

    // Reused, forged and expired tickets.
    let t = env
        .ticket("club-a", json!({"name": "a.txt", "content_type": "text/plain"}))
        .await;
    assert_eq!(env.put(&t, text(10, 0)).await.status(), StatusCode::CREATED);
    let b = expect_error(env.put(&t, text(10, 1)).await, 403, "upload_url_expired").await;
    assert!(b["message"].as_str().unwrap().contains("already used"), "{b}");
    let t = env
        .ticket("club-a", json!({"name": "a.txt", "content_type": "text/plain"}))
        .await;
    let mut forged = t.clone();
    forged["path"] = json!(t["path"].as_str().unwrap().replace("sig=", "sig=ab"));
    expect_error(env.put(&forged, text(10, 2)).await, 403, "upload_url_expired").await;
    let mut unsigned = t.clone();
    unsigned["path"] = json!(format!("/files/upload/{}", t["id"].as_str().unwrap()));
    expect_error(env.put(&unsigned, text(10, 2)).await, 403, "upload_url_expired").await;
    // Another ticket's signature does not fit this ticket.
    let other = env
        .ticket("club-a", json!({"name": "a.txt", "content_type": "text/plain"}))
        .await;
    let mut swapped = t.clone();
    let sig = other["path"].as_str().unwrap().split("sig=").nth(1).unwrap();
    let mine = t["path"].as_str().unwrap().split("&sig=").next().unwrap();
    swapped["path"] = json!(format!("{mine}&sig={sig}"));
    expect_error(env.put(&swapped, text(10, 2)).await, 403, "upload_url_expired").await;
    env.db
        .connect()
        .await
        .unwrap()
        .execute(
            "UPDATE pulse.upload_tickets SET expires_at = now() - interval '1 second' WHERE id = $1::text::uuid",
            &[&t["id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    expect_error(env.put(&t, text(10, 3)).await, 403, "upload_url_expired").await;

    // Content that contradicts the declared type.
    let t = env
        .ticket("club-a", json!({"name": "x.png", "content_type": "image/png"}))
        .await;
    let b = expect_error(
        env.put(&t, b"%PDF-1.7 not a png".to_vec()).await,
        400,
        "invalid_argument",
    )
    .await;
    assert!(b["message"].as_str().unwrap().contains("application/pdf"), "{b}");
    let t = env
        .ticket("club-a", json!({"name": "x.txt", "content_type": "text/plain"}))
        .await;
    expect_error(
        env.put(&t, b"\x7fELF\x02\x01\x01\0binary".to_vec()).await,
        400,
        "invalid_argument",
    )
    .await;
    let t = env
        .ticket(
            "club-a",
            json!({"name": "x.bin", "content_type": "application/octet-stream"}),
        )
        .await;
    // A large file whose first bytes are an executable: refused after the first chunk.
    let mut exe = b"\x7fELF".to_vec();
    exe.extend(vec![0u8; 600_000]);
    expect_error(env.put(&t, exe).await, 400, "invalid_argument").await;

    // Nothing partial anywhere, and every reservation released.
    assert!(env.staged().is_empty(), "{:?}", env.staged());
    assert_eq!(env.objects().len(), 1, "only the one good upload is stored");
    let (used, reserved) = env.usage("club-a").await;
    assert_eq!((used, reserved), (10, 0));
    let metrics = metrics_text(&env.pulsed).await;
    assert!(
        metrics.contains("pulse_storage_bytes{tenant=\"club-a\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pulse_file_uploads_total{result=\"too_large\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_uploads_race_for_the_last_bytes_of_the_quota() {
    let quota = 3 * MB + MB / 2;
    let env = Env::start(
        "files_quota",
        &[("PULSE__STORAGE__QUOTA_BYTES", quota.to_string())],
    )
    .await;
    // Eight tickets first (the quota is empty then), then eight uploads at once.
    let mut tickets = Vec::new();
    for i in 0..8 {
        tickets.push(
            env.ticket(
                "club-q",
                json!({"name": format!("f{i}.bin"), "content_type": "application/octet-stream", "size": MB}),
            )
            .await,
        );
    }
    let results = futures_util::future::join_all(
        tickets
            .iter()
            .enumerate()
            .map(|(i, t)| env.put(t, vec![i as u8; MB])),
    )
    .await;
    let mut ok = 0;
    for r in results {
        match r.status().as_u16() {
            201 => ok += 1,
            507 => {
                let b: Value = r.json().await.unwrap();
                assert_eq!(b["code"], "quota_exceeded");
                assert_eq!(b["details"]["quota_bytes"], quota);
            }
            s => panic!("unexpected status {s}: {}", r.text().await.unwrap()),
        }
    }
    assert_eq!(ok, 3, "exactly three 1 MiB files fit in 3.5 MiB");
    assert_eq!(env.usage("club-q").await, (3 * MB as i64, 0));
    assert_eq!(env.objects().len(), 3);
    assert!(env.staged().is_empty());
    // With the size known, the ticket itself is refused now.
    let r = env
        .ticket_as(
            &Auth::Service("club-q".into()),
            json!({"name": "g.bin", "content_type": "application/octet-stream", "size": MB}),
        )
        .await;
    expect_error(r, 507, "quota_exceeded").await;
    // Another tenant is not affected.
    env.upload("club-r", "g.bin", "application/octet-stream", vec![1u8; MB])
        .await;

    // Uploads without a length (chunked) reserve as their bytes arrive, not the ticket's
    // 20 MiB maximum each: two of 1.5 MiB fit together in a quota of 3.5 MiB.
    let chunked = |ticket: Value, len: usize, seed: u8| {
        let chunks = futures_util::stream::iter(
            (0..len)
                .step_by(64 * 1024)
                .map(move |at| Ok::<_, std::io::Error>(vec![seed; (len - at).min(64 * 1024)])),
        );
        env.put_request(&ticket, reqwest::Body::wrap_stream(chunks))
            .send()
    };
    let open_ticket = || {
        env.ticket(
            "club-c",
            json!({"name": "c.bin", "content_type": "application/octet-stream"}),
        )
    };
    let (a, b) = (open_ticket().await, open_ticket().await);
    assert_eq!(a["max_bytes"], 20 * MB);
    let both = futures_util::future::join_all([chunked(a, 3 * MB / 2, 1), chunked(b, 3 * MB / 2, 2)]).await;
    for r in both {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    }
    assert_eq!(env.usage("club-c").await, (3 * MB as i64, 0));
    // Half a MiB left: two chunked uploads of 400 KiB race for it; at most one wins, the
    // quota holds, and the loser leaves neither bytes nor a reservation behind.
    let (a, b) = (open_ticket().await, open_ticket().await);
    let both = futures_util::future::join_all([chunked(a, 400 * 1024, 3), chunked(b, 400 * 1024, 4)]).await;
    let mut won = 0;
    for r in both {
        let r = r.unwrap();
        match r.status().as_u16() {
            201 => won += 1,
            _ => {
                expect_error(r, 507, "quota_exceeded").await;
            }
        }
    }
    assert!(won <= 1, "800 KiB cannot fit in 512 KiB");
    let (used, reserved) = env.usage("club-c").await;
    assert_eq!(used, 3 * MB as i64 + won * 400 * 1024);
    assert_eq!(reserved, 0);
    // A chunked upload larger than what is left: refused once it passes the quota.
    let r = chunked(open_ticket().await, MB, 5).await.unwrap();
    let body = expect_error(r, 507, "quota_exceeded").await;
    assert_eq!(body["details"]["quota_bytes"], quota);
    assert_eq!(env.usage("club-c").await, (used, 0));
    assert!(env.staged().is_empty());

    // The usage figure the console shows, with the 80% warning.
    let r = env
        .service(env.http.get(env.url("/files/usage?tenant=club-q")), "club-q")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let usage: Value = r.json().await.unwrap();
    assert_eq!(usage[0]["used_bytes"], 3 * MB);
    assert_eq!(usage[0]["files"], 3);
    assert_eq!(usage[0]["quota_bytes"], quota);
    assert_eq!(usage[0]["warning"], true);
    assert!(
        env.pulsed.log().contains("80% of its quota"),
        "{}",
        env.pulsed.log()
    );
}

#[tokio::test]
async fn an_html_form_can_post_the_file_as_multipart() {
    let env = Env::start("files_multipart", &[]).await;
    let content = text(70_000, 3);
    let t = env
        .ticket(
            "club-a",
            json!({"name": "form.txt", "content_type": "text/plain"}),
        )
        .await;
    let form = |fields: &[(&str, Option<&str>, &[u8])]| {
        let mut body = Vec::new();
        for (name, filename, data) in fields {
            body.extend_from_slice(b"--XyZbound\r\n");
            let disposition = match filename {
                Some(f) => format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n"),
                None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n"),
            };
            body.extend_from_slice(disposition.as_bytes());
            body.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XyZbound--\r\n");
        body
    };
    let post = |path: &str, body: Vec<u8>| {
        env.http
            .post(env.url(path))
            .header("Content-Type", "multipart/form-data; boundary=XyZbound")
            .body(body)
            .send()
    };
    let body = form(&[("note", None, b"ignored"), ("upload", Some("form.txt"), &content)]);
    let r = post(t["path"].as_str().unwrap(), body).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let f: Value = r.json().await.unwrap();
    assert_eq!(f["sha256"], sha_hex(&content));
    assert_eq!(f["name"], "form.txt", "the ticket's name, not the form's");
    let r = env.get(f["id"].as_str().unwrap(), "club-a").await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &content[..]);
    // A form without a file field.
    let t = env
        .ticket("club-a", json!({"name": "x.txt", "content_type": "text/plain"}))
        .await;
    let r = post(t["path"].as_str().unwrap(), form(&[("note", None, b"no file")]))
        .await
        .unwrap();
    let b = expect_error(r, 400, "invalid_argument").await;
    assert_eq!(b["details"]["field"], "file");
    assert!(env.staged().is_empty());
    assert_eq!(env.usage("club-a").await, (70_000, 0));
}

#[tokio::test]
async fn identical_content_is_stored_once_per_tenant() {
    let env = Env::start("files_dedup", &[]).await;
    let body = text(50_000, 4);
    let a = env.upload("club-a", "one.txt", "text/plain", body.clone()).await;
    let b = env.upload("club-a", "two.txt", "text/plain", body.clone()).await;
    let c = env
        .upload("club-b", "three.txt", "text/plain", body.clone())
        .await;
    assert_ne!(a["id"], b["id"]);
    assert_eq!(env.objects().len(), 2, "once for club-a, once for club-b");
    assert_eq!(env.usage("club-a").await, (50_000, 0));
    // Deleting one name keeps the content for the other.
    let del = |id: &Value, t: &str| env.file(Method::DELETE, id.as_str().unwrap(), t).send();
    assert_eq!(
        del(&a["id"], "club-a").await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let r = env.get(b["id"].as_str().unwrap(), "club-a").await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    assert_eq!(env.usage("club-a").await, (50_000, 0));
    assert_eq!(
        del(&b["id"], "club-a").await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(env.usage("club-a").await, (0, 0));
    assert_eq!(env.objects().len(), 1);
    let r = env.get(c["id"].as_str().unwrap(), "club-b").await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn concurrent_uploads_of_the_same_content_store_it_once() {
    let env = Env::start("files_dedup_race", &[]).await;
    let body = text(200_000, 7);
    let names: Vec<String> = (0..8).map(|i| format!("copy-{i}.txt")).collect();
    let uploads = names
        .iter()
        .map(|n| env.upload("club-a", n, "text/plain", body.clone()));
    let files = futures_util::future::join_all(uploads).await;
    let ids: std::collections::HashSet<String> = files
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 8, "eight files");
    assert_eq!(env.objects().len(), 1, "one stored object for the eight");
    assert_eq!(
        env.usage("club-a").await,
        (200_000, 0),
        "counted once, nothing left reserved"
    );
    for id in &ids {
        let r = env.get(id, "club-a").await;
        assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    }
    // Deleting them all, concurrently, frees the content exactly once.
    let deletes = ids.iter().map(|id| env.file(Method::DELETE, id, "club-a").send());
    for r in futures_util::future::join_all(deletes).await {
        assert_eq!(r.unwrap().status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(env.usage("club-a").await, (0, 0));
    assert!(env.objects().is_empty(), "the object is gone with its last file");
}

#[tokio::test]
async fn path_tricks_in_names_give_safe_names_and_dispositions() {
    let env = Env::start("files_names", &[]).await;
    let long = format!("{}.txt", "x".repeat(5000));
    let cases: Vec<(String, &str)> = vec![
        ("../../etc/passwd".into(), "passwd"),
        ("..\\..\\windows\\win.ini".into(), "win.ini"),
        ("a\u{0}b\r\nc.txt".into(), "abc.txt"),
        ("..".into(), "file"),
        ("/".into(), "file"),
        ("résumé ✓ \"quoted\";.txt".into(), "résumé ✓ quoted;.txt"),
        ("\u{202e}txt.exe".into(), "txt.exe"),
    ];
    for (i, (name, expected)) in cases.iter().enumerate() {
        let f = env.upload("club-a", name, "text/plain", text(100, i as u8)).await;
        assert_eq!(f["name"], *expected, "{name:?}");
        let r = env.get(f["id"].as_str().unwrap(), "club-a").await;
        let cd = r.headers()["content-disposition"].to_str().unwrap().to_string();
        // Only printable ASCII, no path separators, the exact name percent-encoded.
        assert!(cd.bytes().all(|b| (0x20..0x7f).contains(&b)), "{cd}");
        let fallback = cd.split("filename=\"").nth(1).unwrap().split('"').next().unwrap();
        assert!(
            !fallback.contains('/') && !fallback.contains('\\') && !fallback.contains(".."),
            "{cd}"
        );
        assert!(cd.contains("filename*=UTF-8''"), "{cd}");
    }
    // Very long names are accepted up to 4096 bytes and cut to a short safe name.
    let f = env
        .upload("club-a", &long[..4000], "text/plain", text(10, 99))
        .await;
    assert!(f["name"].as_str().unwrap().len() <= 200);
    let r = env
        .ticket_as(
            &Auth::Service("club-a".into()),
            json!({"name": long, "content_type": "text/plain"}),
        )
        .await;
    let b = expect_error(r, 400, "invalid_argument").await;
    assert_eq!(b["details"]["field"], "name");
    // Nothing was written outside the storage folder's content tree.
    for p in env.objects() {
        assert!(p.starts_with(env.storage.join("t")), "{p:?}");
    }
}

fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_20_mb_upload_and_download_keep_memory_flat() {
    let env = Env::start("files_memory", &[]).await;
    // Warm up every code path with a small file first, so the peak that follows is the
    // large file's own.
    let warm = env
        .upload("club-m", "w.bin", "application/octet-stream", vec![3u8; 300_000])
        .await;
    let r = env.get(warm["id"].as_str().unwrap(), "club-m").await;
    r.bytes().await.unwrap();
    let pid = env.pulsed.pid();
    let before = vm_hwm_kb(pid);

    let size = 20 * MB;
    let t = env
        .ticket(
            "club-m",
            json!({"name": "big.bin", "content_type": "application/octet-stream"}),
        )
        .await;
    let mut hasher = Sha256::new();
    let chunks: Vec<Vec<u8>> = (0..size / (64 * 1024))
        .map(|i| {
            let c: Vec<u8> = (0..64 * 1024).map(|j| ((i * 7 + j) % 253) as u8).collect();
            hasher.update(&c);
            c
        })
        .collect();
    let expected = hex::encode(hasher.finalize());
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let r = env.put(&t, reqwest::Body::wrap_stream(stream)).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let f: Value = r.json().await.unwrap();
    assert_eq!(f["size"], size);
    assert_eq!(f["sha256"], expected);

    let r = env.get(f["id"].as_str().unwrap(), "club-m").await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut stream = r.bytes_stream();
    let mut got = Sha256::new();
    let mut n = 0;
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        n += c.len();
        got.update(&c);
    }
    assert_eq!(n, size);
    assert_eq!(hex::encode(got.finalize()), expected);
    // The body left by sendfile from the stored file, not copied through memory.
    let metrics = metrics_text(&env.pulsed).await;
    let sent: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pulse_files_sendfile_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pulse_files_sendfile_bytes_total in {metrics}"));
    assert!(sent >= (size - 4096) as f64, "only {sent} bytes went by sendfile");
    let after = vm_hwm_kb(pid);
    let grew_mb = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!("peak resident memory: {before} kB before, {after} kB after a 20 MB upload and download");
    // Holding the file would take 20 MB or more; streaming stays far below.
    assert!(
        grew_mb < 8.0,
        "peak resident memory grew by {grew_mb:.1} MB for a 20 MB file"
    );
}

#[tokio::test]
async fn encrypted_files_round_trip_and_survive_key_rotation() {
    use base64::Engine as _;
    let b64 = |k: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
    let (old, new) = ([11u8; 32], [22u8; 32]);
    let mut env = Env::start("files_crypto", &[("PULSE__STORAGE__ENCRYPTION_KEY", b64(old))]).await;
    let body = text(200_000, 5);
    let f = env
        .upload("club-e", "secret.txt", "text/plain", body.clone())
        .await;
    let id = f["id"].as_str().unwrap().to_string();
    // On disk: not the plaintext, and the sealed size.
    let objects = env.objects();
    assert_eq!(objects.len(), 1);
    let stored = std::fs::read(&objects[0]).unwrap();
    assert_eq!(stored.len() as u64, files::crypto::sealed_size(body.len() as u64));
    assert!(
        !stored.windows(64).any(|w| w == &body[1000..1064]),
        "plaintext on disk"
    );
    let check = |env: &Env| {
        let id = id.clone();
        let body = body.clone();
        let http = env.http.clone();
        let url = env.url(&format!("/files/{id}"));
        async move {
            let r = http.get(&url).bearer_auth(DEPLOY_KEY).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
            // A range across a chunk boundary, and the last bytes.
            for (range, s, e) in [
                ("bytes=65530-131080", 65_530, 131_081),
                ("bytes=-7", 199_993, 200_000),
            ] {
                let r = http
                    .get(&url)
                    .bearer_auth(DEPLOY_KEY)
                    .header("Range", range)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
                assert_eq!(r.bytes().await.unwrap().as_ref(), &body[s..e], "{range}");
            }
        }
    };
    check(&env).await;

    // Rotation: a new key, the old one kept for reading.
    env.pulsed.kill9();
    env.pulsed = Env::spawn(
        &env.db,
        &env.storage,
        &[
            ("PULSE__STORAGE__ENCRYPTION_KEY", b64(new)),
            ("PULSE__STORAGE__ENCRYPTION_PREVIOUS_KEYS", b64(old)),
        ],
    )
    .await;
    check(&env).await;
    let g = env
        .upload("club-e", "newer.txt", "text/plain", text(1000, 6))
        .await;
    let c = env.db.connect().await.unwrap();
    let ids: Vec<String> = column(&c, "SELECT DISTINCT key_id FROM pulse.file_blobs ORDER BY 1").await;
    assert_eq!(ids.len(), 2, "one blob per key");
    assert!(g["sha256"].is_string());

    // The old key dropped too early: the file is unavailable with a message that says why.
    env.pulsed.kill9();
    env.pulsed = Env::spawn(
        &env.db,
        &env.storage,
        &[("PULSE__STORAGE__ENCRYPTION_KEY", b64(new))],
    )
    .await;
    let r = env.get(&id, "club-e").await;
    let b = expect_error(r, 503, "unavailable").await;
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("encryption_previous_keys"),
        "{b}"
    );
}

#[tokio::test]
async fn members_staff_and_admins_follow_the_capability_matrix() {
    let env = Env::start("files_caps", &[]).await;
    let alice = Auth::user("alice", Some("club-a"), "member");
    let bob = Auth::user("bob", Some("club-a"), "member");
    let staff = Auth::user("sam", Some("club-a"), "staff");
    let tadmin = Auth::user("tina", Some("club-a"), "tenant_admin");
    let outsider = Auth::user("olga", Some("club-b"), "tenant_admin");
    let padmin = Auth::user("paul", None, "platform_admin");

    let private = env
        .upload_as(&alice, "mine.txt", "text/plain", text(10, 1), false)
        .await;
    let public = env
        .upload_as(&alice, "ours.txt", "text/plain", text(10, 2), true)
        .await;
    assert_eq!(private["owner"], "alice");
    assert_eq!(private["tenant"], "club-a");
    // A request about file `f` (and what follows its id) as `auth`.
    let request = |method: Method, auth: &Auth, f: &Value, rest: &str| {
        let url = env.url(&format!("/files/{}{rest}", f["id"].as_str().unwrap()));
        auth.apply(env.http.request(method, url)).send()
    };
    let get = |auth: &Auth, f: &Value| request(Method::GET, auth, f, "");
    let status = |r: reqwest::Response| r.status().as_u16();
    // Reading.
    assert_eq!(status(get(&alice, &private).await.unwrap()), 200);
    assert_eq!(status(get(&bob, &public).await.unwrap()), 200);
    expect_error(get(&bob, &private).await.unwrap(), 403, "forbidden").await;
    assert_eq!(status(get(&staff, &private).await.unwrap()), 200);
    assert_eq!(status(get(&tadmin, &private).await.unwrap()), 200);
    expect_error(get(&outsider, &public).await.unwrap(), 403, "forbidden").await;
    assert_eq!(status(get(&padmin, &private).await.unwrap()), 200);
    // Signed URLs only for readers.
    let sign = |auth: &Auth, f: &Value| request(Method::POST, auth, f, "/signed-url");
    expect_error(sign(&bob, &private).await.unwrap(), 403, "forbidden").await;
    assert_eq!(status(sign(&alice, &private).await.unwrap()), 200);
    // Uploading: members into their own tenant only, never on another's behalf.
    for (auth, body) in [
        (
            &alice,
            json!({"tenant": "club-b", "name": "x.txt", "content_type": "text/plain"}),
        ),
        (
            &alice,
            json!({"owner": "bob", "name": "x.txt", "content_type": "text/plain"}),
        ),
        (
            &outsider,
            json!({"tenant": "club-a", "name": "x.txt", "content_type": "text/plain"}),
        ),
    ] {
        expect_error(env.ticket_as(auth, body).await, 403, "forbidden").await;
    }
    // Deleting: members and staff their own files, tenant admins their tenant's,
    // platform admins any.
    let del = |auth: &Auth, f: &Value| request(Method::DELETE, auth, f, "");
    expect_error(del(&bob, &public).await.unwrap(), 403, "forbidden").await;
    expect_error(del(&staff, &public).await.unwrap(), 403, "forbidden").await;
    expect_error(del(&outsider, &public).await.unwrap(), 403, "forbidden").await;
    assert_eq!(status(del(&tadmin, &public).await.unwrap()), 204);
    let staff_file = env
        .upload_as(&staff, "s.txt", "text/plain", text(10, 3), false)
        .await;
    assert_eq!(status(del(&staff, &staff_file).await.unwrap()), 204);
    assert_eq!(status(del(&padmin, &private).await.unwrap()), 204);
    // Usage: staff see their tenant's, not another's; members see none.
    let usage = |auth: &Auth, q: &str| {
        auth.apply(env.http.get(env.url(&format!("/files/usage{q}"))))
            .send()
    };
    assert_eq!(status(usage(&staff, "").await.unwrap()), 200);
    expect_error(usage(&staff, "?tenant=club-b").await.unwrap(), 403, "forbidden").await;
    expect_error(usage(&alice, "").await.unwrap(), 403, "forbidden").await;
    assert_eq!(status(usage(&padmin, "").await.unwrap()), 200);
}

#[tokio::test]
async fn cleanup_removes_orphans_and_erasure_removes_a_users_files() {
    let env = Env::start("files_cleanup", &[]).await;
    let c = env.db.connect().await.unwrap();
    c.batch_execute(
        "CREATE TABLE public.members (id int PRIMARY KEY); INSERT INTO public.members VALUES (1), (2);",
    )
    .await
    .unwrap();
    let attached = |id: i32, seed: u8| {
        let env = &env;
        async move {
            let t = env
                .ticket(
                    "club-c",
                    json!({"name": "a.txt", "content_type": "text/plain",
                           "attached_to": {"table": "public.members", "id": id.to_string()}}),
                )
                .await;
            let r = env.put(&t, text(1000, seed)).await;
            assert_eq!(r.status(), StatusCode::CREATED);
            r.json::<Value>().await.unwrap()
        }
    };
    let keep = attached(1, 1).await;
    let gone = attached(2, 2).await;
    // A ticket never used, already expired.
    let never = env
        .ticket("club-c", json!({"name": "n.txt", "content_type": "text/plain"}))
        .await;
    c.execute(
        "UPDATE pulse.upload_tickets SET expires_at = now() - interval '1 minute' WHERE id = $1::text::uuid",
        &[&never["id"].as_str().unwrap()],
    )
    .await
    .unwrap();
    // A stuck reservation (an upload that died with its process).
    c.execute(
        "INSERT INTO pulse.upload_tickets (id, tenant, name, max_bytes, content_types, expires_at, used_at, reserved_bytes)
         VALUES (gen_random_uuid(), 'club-c', 'x', 100, '{text/plain}', now(), now() - interval '1 hour', 100)",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE pulse.storage_usage SET reserved_bytes = reserved_bytes + 100 WHERE tenant = 'club-c'",
        &[],
    )
    .await
    .unwrap();
    // A stray object and a stray staged file.
    let stray = env.storage.join("t/ffff/ff/stray");
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, b"orphan").unwrap();
    std::fs::write(env.storage.join(".staging/dead.part"), b"half").unwrap();
    // The owning row goes.
    c.execute("DELETE FROM public.members WHERE id = 2", &[])
        .await
        .unwrap();

    let direct = env.direct();
    let cx = direct.cx();
    let report = files::cleanup_orphans(&cx, Duration::ZERO).await.unwrap();
    assert_eq!(report.expired_tickets, 1, "{report:?}");
    assert_eq!(report.stale_reservations, 1, "{report:?}");
    assert_eq!(report.detached_files, 1, "{report:?}");
    assert_eq!(report.orphan_objects, 1, "{report:?}");
    assert_eq!(report.staged_files, 1, "{report:?}");
    assert!(!stray.exists());
    assert_eq!(
        env.get(gone["id"].as_str().unwrap(), "club-c").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        env.get(keep["id"].as_str().unwrap(), "club-c").await.status(),
        StatusCode::OK
    );
    assert_eq!(env.usage("club-c").await, (1000, 0));
    // A second run finds nothing.
    let again = files::cleanup_orphans(&cx, Duration::ZERO).await.unwrap();
    assert_eq!(again, files::CleanupReport::default());

    // GDPR erasure of one user's files.
    let alice = Auth::user("alice", Some("club-c"), "member");
    let a1 = env
        .upload_as(&alice, "1.txt", "text/plain", text(10, 7), false)
        .await;
    env.upload_as(&alice, "2.txt", "text/plain", text(10, 8), true)
        .await;
    assert_eq!(files::erase_user_files(&cx, "club-c", "alice").await.unwrap(), 2);
    assert_eq!(
        env.get(a1["id"].as_str().unwrap(), "club-c").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(env.usage("club-c").await, (1000, 0));
    let usage = files::storage_usage(&cx, Some("club-c")).await.unwrap();
    assert_eq!(usage[0].files, 1);
}

/// moto's S3-compatible server (PyPI `moto[server]`), run on a free port for one test.
struct Moto {
    child: std::process::Child,
    url: String,
}

impl Moto {
    fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("PULSE_TEST_MOTO") {
            return PathBuf::from(p);
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/moto-venv/bin/moto_server");
        if venv.exists() {
            return venv;
        }
        PathBuf::from("moto_server")
    }

    async fn start() -> Moto {
        let port = pulse_harness::free_port();
        let bin = Moto::binary();
        let child = std::process::Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): the S3 backend is tested against moto's S3 server; \
                     install it with `python3 -m venv target/moto-venv && target/moto-venv/bin/pip install 'moto[server]'` \
                     (scripts/test does) or set PULSE_TEST_MOTO",
                    bin.display()
                )
            });
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_for("moto's S3 server", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move { http.get(&url).send().await.ok().map(|_| ()) }
        })
        .await
        .unwrap();
        Moto { child, url }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_s3_backend_stores_serves_and_deletes() {
    let moto = Moto::start().await;
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/pulse-files", moto.url))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "cannot create the bucket: {}",
        r.status()
    );
    let s3: [(&'static str, String); 6] = [
        ("PULSE__STORAGE__BACKEND", "s3".into()),
        ("PULSE__STORAGE__S3__ENDPOINT", moto.url.clone()),
        ("PULSE__STORAGE__S3__BUCKET", "pulse-files".into()),
        ("PULSE__STORAGE__S3__ACCESS_KEY_ID", "testing".into()),
        ("PULSE__STORAGE__S3__SECRET_ACCESS_KEY", "testing".into()),
        ("PULSE__STORAGE__S3__PATH_STYLE", "true".into()),
    ];
    let env = Env::start("files_s3", &s3).await;
    // The test's own view of the bucket, through the same backend code.
    let bucket = pulse_daemon::files::store::Backend::open(&env.config(&s3).storage).unwrap();
    // Larger than one multipart part (8 MiB), so the multipart path runs.
    let big: Vec<u8> = (0..12 * MB).map(|i| (i % 241) as u8).collect();
    let small = text(5000, 9);
    let f = env
        .upload("club-s", "big.bin", "application/octet-stream", big.clone())
        .await;
    let g = env
        .upload("club-s", "small.txt", "text/plain", small.clone())
        .await;
    let dup = env
        .upload("club-s", "again.txt", "text/plain", small.clone())
        .await;
    // Nothing landed in the local folder but the (empty) staging area.
    assert!(env.objects().is_empty());
    assert!(env.staged().is_empty());
    let r = env.get(f["id"].as_str().unwrap(), "club-s").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &big[..]);
    let r = env
        .file(Method::GET, f["id"].as_str().unwrap(), "club-s")
        .header("Range", "bytes=8388600-8388700")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &big[8_388_600..8_388_701]);
    assert_eq!(env.usage("club-s").await, ((12 * MB + 5000) as i64, 0));

    // The object is in the bucket under its content address, and goes with its last file.
    let c = env.db.connect().await.unwrap();
    let key: String = c
        .query_one(
            "SELECT storage_key FROM pulse.file_blobs WHERE sha256 = $1",
            &[&g["sha256"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(bucket.exists(&key).await.unwrap());
    for id in [&g["id"], &dup["id"]] {
        let r = env
            .file(Method::DELETE, id.as_str().unwrap(), "club-s")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    assert!(!bucket.exists(&key).await.unwrap());
    assert_eq!(
        bucket.list("t").await.unwrap().len(),
        1,
        "only the big file is left"
    );
    assert_eq!(env.usage("club-s").await, ((12 * MB) as i64, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_reservation_locks_the_usage_before_the_ticket_and_releases_once() {
    let env = Env::start("files_release_order", &[]).await;
    let c = env.db.connect().await.unwrap();
    // Another upload holds 50 bytes of the tenant's quota throughout.
    c.execute(
        "INSERT INTO pulse.storage_usage (tenant, reserved_bytes) VALUES ('club-a', 50)",
        &[],
    )
    .await
    .unwrap();
    let ticket = ticket_holding(&c, 100).await;
    // Someone holds the usage row (as a settlement does before it touches its ticket).
    let mut holder = env.db.connect().await.unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.execute(files::LOCK_USAGE, &[&"club-a"]).await.unwrap();
    let release = release_blocked(&env, &c, ticket, 100, "the release to wait for the usage row").await;
    // While it waits, it holds nothing on the ticket: a settlement of the same ticket,
    // holding the usage row, can take it (the other order deadlocked here).
    let mut other = env.db.connect().await.unwrap();
    let probe = other.transaction().await.unwrap();
    probe
        .execute(
            "SELECT 1 FROM pulse.upload_tickets WHERE id = $1 FOR UPDATE NOWAIT",
            &[&ticket],
        )
        .await
        .expect("the ticket is not locked by the waiting release");
    probe.rollback().await.unwrap();
    hold.commit().await.unwrap();
    assert_eq!(release.await.unwrap().unwrap(), 1, "the usage row updated");
    assert_eq!(env.usage("club-a").await, (0, 50), "the ticket's 100 given back");
    // Released once: a second release of the same hold changes nothing.
    c.execute(files::RELEASE_RESERVATION, &[&"club-a", &ticket, &100i64])
        .await
        .unwrap();
    assert_eq!(env.usage("club-a").await, (0, 50));
    let held: i64 = c
        .query_one(
            "SELECT reserved_bytes FROM pulse.upload_tickets WHERE id = $1",
            &[&ticket],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0);

    // Racing the end of the same upload (the cleanup job's release of an upload that is
    // just finishing): the upload records its file and settles its ticket without the
    // usage row; the release waits for the ticket, then finds it settled and leaves its
    // bytes to the fold, which moves them once.
    let second = ticket_holding(&c, 40).await;
    let settle = holder.transaction().await.unwrap();
    settle
        .execute(
            "UPDATE pulse.upload_tickets SET file_id = gen_random_uuid(), pending_bytes = 40 WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap();
    let release = release_blocked(&env, &c, second, 40, "the release to wait for the settlement").await;
    settle.commit().await.unwrap();
    assert_eq!(
        release.await.unwrap().unwrap(),
        0,
        "a settled ticket is not released"
    );
    assert_eq!(env.usage("club-a").await, (0, 90), "still held by the ticket");
    for (folded, usage) in [(true, (40, 50)), (false, (40, 50))] {
        let tx = holder.transaction().await.unwrap();
        tx.execute(files::LOCK_USAGE, &[&"club-a"]).await.unwrap();
        let rows = tx
            .query(files::FOLD_SETTLED, &[&"club-a", &Some(second)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(rows.len() == 1, folded, "folded once");
        assert_eq!(env.usage("club-a").await, usage, "stored once, released never");
    }
}

/// Puts a stored file back as a crash between its upload's commit and its fold leaves
/// it: its ticket holds `reserved` bytes again and what the file added to its tenant's
/// usage is pending, out of `used_bytes`.
async fn unfold(c: &tokio_postgres::Client, file: &Value, reserved: i64) {
    let n = c
        .execute(
            "WITH t AS (
                 UPDATE pulse.upload_tickets t SET reserved_bytes = $2, pending_bytes = f.size
                   FROM pulse.files f WHERE f.id = $1::text::uuid AND t.file_id = f.id
                 RETURNING t.tenant, t.pending_bytes)
             UPDATE pulse.storage_usage u
                SET used_bytes = u.used_bytes - t.pending_bytes, reserved_bytes = u.reserved_bytes + $2
               FROM t WHERE u.tenant = t.tenant",
            &[&file["id"].as_str().unwrap(), &reserved],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn uploads_stored_but_not_yet_counted_are_counted_by_the_cleanup_a_restart_and_a_deletion() {
    let mut env = Env::start("files_unfolded", &[]).await;
    let c = env.db.connect().await.unwrap();
    let a = env.upload("club-a", "a.txt", "text/plain", text(1000, 1)).await;
    let b = env.upload("club-a", "b.txt", "text/plain", text(2000, 2)).await;
    assert_eq!(
        env.usage("club-a").await,
        (3000, 0),
        "each upload counted before its answer"
    );

    // The cleanup counts it; the reservation of a settled ticket, however old, is not
    // released as a stale one but moved with its file.
    unfold(&c, &a, 1000).await;
    c.execute(
        "UPDATE pulse.upload_tickets SET used_at = now() - interval '1 day' WHERE file_id = $1::text::uuid",
        &[&a["id"].as_str().unwrap()],
    )
    .await
    .unwrap();
    assert_eq!(env.usage("club-a").await, (2000, 1000));
    let direct = env.direct();
    let cx = direct.cx();
    let report = files::expire_upload_tickets(&cx, Duration::ZERO).await.unwrap();
    assert_eq!(
        (report.stale_reservations, report.unfolded_tenants),
        (0, 1),
        "{report:?}"
    );
    assert_eq!(env.usage("club-a").await, (3000, 0));

    // So does the next start (a reservation larger than the file, as an upload of
    // unknown length holds, goes back whole).
    unfold(&c, &b, 4096).await;
    assert_eq!(env.usage("club-a").await, (1000, 4096));
    env.pulsed.kill9();
    env.pulsed = Env::spawn(&env.db, &env.storage, &[]).await;
    let usage = || env.usage("club-a");
    wait_for(
        "the start to count the upload",
        Duration::from_secs(10),
        || async { (usage().await == (3000, 0)).then_some(()) },
    )
    .await
    .unwrap();

    // A deletion counts the tenant's settled uploads before it takes the freed bytes off
    // (the other order would take them off a count that lacks them, stopping at 0).
    unfold(&c, &a, 1000).await;
    unfold(&c, &b, 2000).await;
    assert_eq!(env.usage("club-a").await, (0, 3000));
    let r = env
        .file(Method::DELETE, a["id"].as_str().unwrap(), "club-a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(env.usage("club-a").await, (2000, 0));
    let again = files::expire_upload_tickets(&cx, Duration::ZERO).await.unwrap();
    assert_eq!(again.unfolded_tenants, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_content_being_deleted_stores_it_again() {
    let env = Env::start("files_delete_race", &[]).await;
    let c = env.db.connect().await.unwrap();
    // A deletion of the last file naming the content is half done when an upload of the
    // same content comes: it holds the blob's row (the upload's file then refers to a
    // row that goes away), or has deleted it already (the upload's claim of the content
    // waits to see whether it comes back).
    for (seed, row_deleted) in [(9, false), (10, true)] {
        let body = text(30_000, seed);
        let sha = sha_hex(&body);
        let first = env
            .upload("club-a", "first.txt", "text/plain", body.clone())
            .await;
        let stored: Vec<PathBuf> = env.objects().into_iter().filter(|p| p.ends_with(&sha)).collect();
        assert_eq!(stored.len(), 1);

        let mut x = env.db.connect().await.unwrap();
        let deleter: i32 = x.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        let del = x.transaction().await.unwrap();
        del.execute(
            "DELETE FROM pulse.files WHERE id = $1::text::uuid",
            &[&first["id"].as_str().unwrap()],
        )
        .await
        .unwrap();
        del.execute(
            "SELECT 1 FROM pulse.file_blobs WHERE tenant = 'club-a' AND sha256 = $1 FOR UPDATE",
            &[&sha],
        )
        .await
        .unwrap();
        let delete_row = "WITH b AS (DELETE FROM pulse.file_blobs WHERE tenant = 'club-a' AND sha256 = $1 RETURNING size)
             UPDATE pulse.storage_usage SET used_bytes = used_bytes - (SELECT size FROM b) WHERE tenant = 'club-a'";
        if row_deleted {
            del.execute(delete_row, &[&sha]).await.unwrap();
        }

        let ticket = env
            .ticket(
                "club-a",
                json!({"name": "second.txt", "content_type": "text/plain", "size": body.len()}),
            )
            .await;
        let finish_deletion = async {
            wait_for_lock(&c, "the upload to wait for the deletion", BLOCKS_SOMEONE, deleter).await;
            if !row_deleted {
                del.execute(delete_row, &[&sha]).await.unwrap();
            }
            std::fs::remove_file(&stored[0]).unwrap();
            del.commit().await.unwrap();
        };
        let (r, ()) = futures_util::join!(env.put(&ticket, body.clone()), finish_deletion);
        assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
        let second: Value = r.json().await.unwrap();

        // The content is stored again, under the same key, and counted again.
        assert!(stored[0].exists(), "stored again");
        let r = env.get(second["id"].as_str().unwrap(), "club-a").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    }
    assert_eq!(env.usage("club-a").await, (60_000, 0));
    assert_eq!(env.objects().len(), 2);
}

/// A claimed club-a ticket whose running upload holds `bytes` of the quota (on the
/// ticket and in the tenant's usage).
async fn ticket_holding(c: &tokio_postgres::Client, bytes: i64) -> uuid::Uuid {
    let ticket = uuid::Uuid::new_v4();
    c.execute(
        "WITH t AS (
             INSERT INTO pulse.upload_tickets (id, tenant, name, max_bytes, content_types, expires_at, used_at, reserved_bytes)
             VALUES ($1, 'club-a', 'x.txt', 1000, '{text/plain}', now() + interval '1 hour', now(), $2))
         INSERT INTO pulse.storage_usage AS u (tenant, reserved_bytes) VALUES ('club-a', $2)
         ON CONFLICT (tenant) DO UPDATE SET reserved_bytes = u.reserved_bytes + EXCLUDED.reserved_bytes",
        &[&ticket, &bytes],
    )
    .await
    .unwrap();
    ticket
}

/// Starts releasing `bytes` of club-a's `ticket` on a connection of its own and returns
/// once that release waits for a lock (`c` watches it).
async fn release_blocked(
    env: &Env,
    c: &tokio_postgres::Client,
    ticket: uuid::Uuid,
    bytes: i64,
    what: &str,
) -> tokio::task::JoinHandle<Result<u64, tokio_postgres::Error>> {
    let releaser = env.db.connect().await.unwrap();
    let pid: i32 = releaser
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let release = tokio::spawn(async move {
        releaser
            .execute(files::RELEASE_RESERVATION, &[&"club-a", &ticket, &bytes])
            .await
    });
    wait_for_lock(c, what, WAITS_FOR_A_LOCK, pid).await;
    release
}

/// Backend $1 holds a lock another backend waits for.
const BLOCKS_SOMEONE: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid)))";
/// Backend $1 waits for a lock.
const WAITS_FOR_A_LOCK: &str =
    "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1";

/// Waits (`c` watching) until `check`, one of the two above, holds for backend `pid`.
async fn wait_for_lock(c: &tokio_postgres::Client, what: &str, check: &str, pid: i32) {
    wait_for(what, Duration::from_secs(10), || async move {
        let holds: bool = c.query_one(check, &[&pid]).await.ok()?.get(0);
        holds.then_some(())
    })
    .await
    .unwrap();
}
