//! File storage: upload tickets, streaming uploads with quota and size limits, content
//! addressed storage (once per tenant), authorised and signed downloads, deletion,
//! per-tenant usage, the orphan cleanup and GDPR erasure.
//!
//! Owns the `pulse.file_blobs`, `pulse.files`, `pulse.upload_tickets` and
//! `pulse.storage_usage` tables and the objects of the storage backend. Every permission
//! decision goes through `pulse_shared::caps::authorize`; this module never verifies
//! JWTs itself (it asks `crate::auth`, see [`principal_from_headers`]) and never holds a whole file in memory.
//!
//! Quota: an upload reserves its declared length in `pulse.storage_usage` with one
//! conditional UPDATE before any byte is stored, so concurrent uploads cannot together
//! pass the quota; an upload without a length (chunked, or a form) reserves a first MiB
//! and grows its reservation, with the same conditional UPDATE, before storing bytes past
//! it. The reservation becomes usage (or nothing, when the content was already stored)
//! at the fold that follows the upload's commit ([`FOLD_SETTLED`]; until then the ticket
//! keeps it, so the quota still counts it), and is released when the upload fails.

pub mod crypto;
pub mod sniff;
pub mod store;

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use pulse_shared::caps::{Capability, Decision, Principal, Role, Target, authorize};
use pulse_shared::{ErrorBody, ErrorCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::config::Config;
use crate::{App, db};
use crypto::Keyring;
use store::{Backend, StoreError};

/// The header a service holding the deploy key names the tenant it acts for with.
pub const TENANT_HEADER: &str = "x-pulse-tenant";
/// The header a service may send the deploy key in (as the engine's HTTP routes do).
pub const DEPLOY_KEY_HEADER: &str = "x-pulse-deploy-key";
/// The header a service names the user it acts for with (the owner of what it uploads).
pub const USER_HEADER: &str = "x-pulse-user";
/// Share of the quota past which a warning is logged.
pub const QUOTA_WARNING_RATIO: f64 = 0.8;

type HmacSha256 = Hmac<Sha256>;

/// Why a file operation failed; each maps to one code of the shared table.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// No usable credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The capability matrix said no.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown file.
    #[error("no such file; it may have been deleted")]
    NotFound,
    /// Bad input; names the field.
    #[error("{field}: {message}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// Over the size limit.
    #[error("the file is larger than the limit of {limit} bytes ({mb:.1} MB); upload a smaller file", mb = *limit as f64 / 1_048_576.0)]
    TooLarge {
        /// The limit in force.
        limit: u64,
    },
    /// Over the tenant's quota.
    #[error(
        "the storage quota of tenant {tenant} ({quota} bytes) would be exceeded ({used} bytes used or reserved, {wanted} more needed); delete files or ask for a larger quota"
    )]
    QuotaExceeded {
        /// The tenant.
        tenant: String,
        /// Its quota.
        quota: u64,
        /// Used plus reserved.
        used: u64,
        /// What the upload needed.
        wanted: u64,
    },
    /// Expired, forged or reused ticket or signed URL.
    #[error("{0}")]
    UrlExpired(String),
    /// The database or the storage is down.
    #[error("{0}")]
    Unavailable(String),
}

impl FileError {
    /// The code of the shared table.
    pub fn code(&self) -> ErrorCode {
        match self {
            FileError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            FileError::Forbidden(_) => ErrorCode::Forbidden,
            FileError::NotFound => ErrorCode::NotFound,
            FileError::Invalid { .. } => ErrorCode::InvalidArgument,
            FileError::TooLarge { .. } => ErrorCode::FileTooLarge,
            FileError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            FileError::UrlExpired(_) => ErrorCode::UploadUrlExpired,
            FileError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// The body clients see, with structured details where they help.
    pub fn body(&self) -> ErrorBody {
        let body = ErrorBody::new(self.code(), self.to_string());
        match self {
            FileError::Invalid { field, .. } => body.with_details(json!({ "field": field })),
            FileError::TooLarge { limit } => body.with_details(json!({ "limit_bytes": limit })),
            FileError::QuotaExceeded { quota, used, .. } => {
                body.with_details(json!({ "quota_bytes": quota, "used_bytes": used }))
            }
            _ => body,
        }
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        FileError::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl From<tokio_postgres::Error> for FileError {
    fn from(e: tokio_postgres::Error) -> Self {
        tracing::error!(error = %e, "file storage: database error");
        FileError::Unavailable(format!("the state database failed: {e}; retry shortly"))
    }
}

impl From<deadpool_postgres::PoolError> for FileError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        FileError::Unavailable(format!("the state database is unreachable: {e}; retry shortly"))
    }
}

impl From<StoreError> for FileError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "file storage: backend error");
        FileError::Unavailable(format!("file storage failed: {e}; retry shortly"))
    }
}

/// The storage subsystem's own state: the backend, the keys and the URL signing key.
pub struct Files {
    backend: Backend,
    keys: Keyring,
    signing_key: Vec<u8>,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("backend", &self.backend.kind)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Files {
    /// Opens the configured backend and keys.
    pub fn open(config: &Config) -> Result<Files, StoreError> {
        let backend = Backend::open(&config.storage)?;
        let keys = Keyring::new(
            config.files.encryption_key,
            &config.files.previous_encryption_keys,
        );
        let secret = config.files.signing_secret.expose();
        let signing_key = if secret.is_empty() {
            tracing::warn!(
                "storage.signing_secret is empty: upload and download URLs are signed with a random key and stop working at restart or on other instances"
            );
            let mut k = vec![0u8; 32];
            rand::fill(&mut k[..]);
            k
        } else {
            secret.as_bytes().to_vec()
        };
        Ok(Files {
            backend,
            keys,
            signing_key,
        })
    }

    /// The backend, for tests and the console.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    fn mac(&self, purpose: &str, id: Uuid, expires: i64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.signing_key).expect("any key length");
        mac.update(format!("{purpose}\n{id}\n{expires}").as_bytes());
        mac
    }

    fn sign(&self, purpose: &str, id: Uuid, expires: i64) -> String {
        hex::encode(self.mac(purpose, id, expires).finalize().into_bytes())
    }

    /// Checks a URL signature and its expiry (constant time).
    fn verify(&self, purpose: &str, id: Uuid, expires: i64, sig: &str) -> Result<(), FileError> {
        let forged = || FileError::UrlExpired("the URL's signature is wrong: ask for a new URL".into());
        let raw = hex::decode(sig).map_err(|_| forged())?;
        self.mac(purpose, id, expires)
            .verify_slice(&raw)
            .map_err(|_| forged())?;
        if expires <= now_unix() {
            return Err(FileError::UrlExpired(
                "the URL has expired: ask for a new one".into(),
            ));
        }
        Ok(())
    }
}

/// What the storage functions need from the daemon: built from an [`App`] with
/// [`Ctx::new`], or by hand by tools and tests that hold no running daemon.
pub struct Ctx<'a> {
    /// Backend, keys, signing.
    pub files: &'a Files,
    /// The state database.
    pub pool: &'a deadpool_postgres::Pool,
    /// The configuration in force.
    pub config: &'a Config,
}

impl<'a> Ctx<'a> {
    /// The context of a running daemon; `config` is `app.config()`.
    pub fn new(app: &'a App, config: &'a Config) -> Ctx<'a> {
        Ctx {
            files: &app.files,
            pool: &app.pool,
            config,
        }
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Who is asking, from the request headers.
///
/// A service holding the deploy key sends it as `Authorization: Bearer <deploy key>` or
/// `X-Pulse-Deploy-Key: <deploy key>` (Role::Service), acting for the tenant in
/// `X-Pulse-Tenant` and, optionally, the user in `X-Pulse-User`. Anything else in
/// `Authorization: Bearer` is a JWT, verified by [`crate::auth`]. `Ok(None)`: no
/// credentials at all.
pub fn principal_from_headers(app: &App, headers: &http::HeaderMap) -> Result<Option<Principal>, FileError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let service = || Principal {
        user: header(USER_HEADER),
        tenant: header(TENANT_HEADER),
        roles: vec![Role::Service],
    };
    if let Some(key) = headers.get(DEPLOY_KEY_HEADER) {
        return match key.to_str() {
            Ok(k) if app.deploy_key_matches(k.trim()) => Ok(Some(service())),
            _ => Err(FileError::Unauthenticated("the deploy key is wrong".into())),
        };
    }
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| {
            FileError::Unauthenticated("the Authorization header must be `Bearer <token>`".into())
        })?;
    if app.deploy_key_matches(token) {
        return Ok(Some(service()));
    }
    app.auth
        .verify(token, &app.engine.schema)
        .map(|v| Some(v.principal))
        .map_err(|e| FileError::Unauthenticated(e.to_string()))
}

fn decide(principal: &Principal, capability: Capability, target: &Target<'_>) -> Result<(), FileError> {
    match authorize(principal, capability, target) {
        Decision::Allowed(_) => Ok(()),
        Decision::Denied(reason) => Err(FileError::Forbidden(format!(
            "not allowed to {}: {}",
            match capability {
                Capability::UploadFiles => "upload files",
                Capability::ReadFile => "read this file",
                Capability::DeleteFile => "delete this file",
                _ => "do this",
            },
            reason.explain()
        ))),
    }
}

/// The row a file may be attached to in Symfony's database.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Attachment {
    /// Schema-qualified table, such as `public.members`.
    pub table: String,
    /// The row's id (compared as text).
    pub id: String,
}

/// What a client asks an upload URL for.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TicketRequest {
    /// The tenant; defaults to the principal's.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The file's name, as the user sees it (made safe before it is stored).
    pub name: String,
    /// The declared content type; must be allowed, and the bytes must agree.
    pub content_type: String,
    /// The size, when known: refused at once when over the limit.
    #[serde(default)]
    pub size: Option<u64>,
    /// Whether every member of the tenant may read it.
    #[serde(default)]
    pub public: bool,
    /// The owning user, for services uploading on a user's behalf.
    #[serde(default)]
    pub owner: Option<String>,
    /// The Symfony row the file belongs to; the cleanup removes it when the row goes.
    #[serde(default)]
    pub attached_to: Option<Attachment>,
}

/// A signed, single-use, short-lived upload URL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadTicket {
    /// The ticket id.
    pub id: Uuid,
    /// The absolute URL to PUT the bytes to.
    pub url: String,
    /// The same, relative to the deployment URL.
    pub path: String,
    /// The HTTP method.
    pub method: &'static str,
    /// When the URL stops working (RFC 3339).
    pub expires_at: String,
    /// The largest accepted body.
    pub max_bytes: u64,
    /// The content type the upload must have.
    pub content_type: String,
}

fn valid_table(t: &str) -> bool {
    let ident = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    matches!(t.split_once('.'), Some((a, b)) if ident(a) && ident(b))
}

/// Creates an upload ticket: the one entry point for the HTTP route and the WebSocket
/// mutation. Checks the capability, the content type, the size limit and (when the size
/// is given) the quota, then records a single-use ticket and returns its signed URL.
pub async fn create_upload_ticket(
    app: &App,
    principal: &Principal,
    request: TicketRequest,
) -> Result<UploadTicket, FileError> {
    let config = app.config();
    let tenant = request
        .tenant
        .clone()
        .or_else(|| principal.tenant.clone())
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| FileError::invalid("tenant", "name the tenant the file belongs to"))?;
    if tenant.len() > 200 {
        return Err(FileError::invalid("tenant", "at most 200 characters"));
    }
    let is_service = principal.roles.contains(&Role::Service);
    let owner = match (&request.owner, is_service) {
        (Some(o), true) => Some(o.clone()),
        (Some(o), false) if Some(o) != principal.user.as_ref() => {
            return Err(FileError::Forbidden(
                "only services may upload on another user's behalf".into(),
            ));
        }
        _ => principal.user.clone(),
    };
    decide(
        principal,
        Capability::UploadFiles,
        &Target {
            tenant: Some(&tenant),
            owner: owner.as_deref(),
            public: request.public,
            listed: None,
        },
    )?;
    let content_type = sniff::normalise_type(&request.content_type);
    if !config.files.allowed_content_types.contains(&content_type) {
        return Err(FileError::invalid(
            "content_type",
            format!(
                "{content_type:?} is not allowed; allowed types: {}",
                config.files.allowed_content_types.join(", ")
            ),
        ));
    }
    if request.name.len() > 4096 {
        return Err(FileError::invalid("name", "at most 4096 bytes"));
    }
    let name = sniff::safe_name(&request.name);
    let limit = config
        .files
        .max_upload_for(&tenant, config.limits.max_upload_bytes);
    if let Some(size) = request.size
        && size > limit
    {
        return Err(FileError::TooLarge { limit });
    }
    if let Some(a) = &request.attached_to
        && !valid_table(&a.table)
    {
        return Err(FileError::invalid(
            "attached_to.table",
            "expected a schema-qualified table such as public.members",
        ));
    }
    let client = app.pool.get().await?;
    if let (Some(size), Some(quota)) = (request.size, config.files.quota_for(&tenant)) {
        let used = held_bytes(&client, &tenant).await?;
        if used + size > quota {
            return Err(FileError::QuotaExceeded {
                tenant,
                quota,
                used,
                wanted: size,
            });
        }
    }
    let id = Uuid::new_v4();
    let ttl = config.files.upload_ticket_ttl;
    let expires = now_unix() + ttl.as_secs() as i64;
    let (att_table, att_id) = match &request.attached_to {
        Some(a) => (Some(a.table.clone()), Some(a.id.clone())),
        None => (None, None),
    };
    // A ticket lost in a crash is simply asked for again: its commit need not wait for
    // the disk.
    let insert = client.prepare_cached("INSERT INTO pulse.upload_tickets
                (id, tenant, owner, name, max_bytes, content_types, public, attached_table, attached_id, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp($10))").await?;
    let (max_bytes, types, expires_f) = (limit as i64, vec![content_type.clone()], expires as f64);
    let params: [&(dyn ToSql + Sync); 10] = [
        &id,
        &tenant,
        &owner,
        &name,
        &max_bytes,
        &types,
        &request.public,
        &att_table,
        &att_id,
        &expires_f,
    ];
    db::one_trip(&client, client.execute(&insert, &params)).await?;
    let sig = app.files.sign("upload", id, expires);
    let path = format!("/files/upload/{id}?expires={expires}&sig={sig}");
    let base = app.platform().deployment_url;
    tracing::info!(ticket = %id, tenant = %tenant, max_bytes = limit, "upload ticket issued");
    Ok(UploadTicket {
        id,
        url: format!("{}{path}", base.trim_end_matches('/')),
        path,
        method: "PUT",
        expires_at: chrono::DateTime::from_timestamp(expires, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        max_bytes: limit,
        content_type,
    })
}

/// A stored file, as the database has it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileInfo {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant: String,
    /// Owning user.
    pub owner: Option<String>,
    /// Safe name.
    pub name: String,
    /// Content type.
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, hex; also the ETag.
    pub sha256: String,
    /// Readable by the whole tenant.
    pub public: bool,
    /// When it was uploaded (RFC 3339).
    pub created_at: String,
    #[serde(skip)]
    storage_key: String,
    #[serde(skip)]
    key_id: Option<String>,
}

impl FileInfo {
    /// The capability target of this file.
    pub fn target(&self) -> Target<'_> {
        Target {
            tenant: Some(&self.tenant),
            owner: self.owner.as_deref(),
            listed: None,
            public: self.public,
        }
    }
}

/// Bytes gathered from the body before they are handed to a blocking thread.
const STAGE_BUFFER: usize = 1024 * 1024;

/// How much of a staged buffer [`Sink::absorb`] hashes and writes at a time.
const ABSORB_SLICE: usize = 128 * 1024;

/// Where a staged upload's bytes end up, on a blocking thread: hashed, sealed when
/// encryption is on, written to the staged file, and synced at the end.
struct Sink {
    file: std::fs::File,
    hasher: Sha256,
    encryptor: Option<crypto::Encryptor>,
    sealed: Vec<u8>,
}

impl Sink {
    fn absorb(&mut self, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        // A slice at a time, hashed and then written while it is still in the CPU's
        // cache (the whole buffer is larger than the cache: hashing it all and then
        // writing it all read it from memory twice).
        for piece in data.chunks(ABSORB_SLICE) {
            self.hasher.update(piece);
            match self.encryptor.as_mut() {
                Some(enc) => {
                    self.sealed.clear();
                    enc.push(piece, &mut self.sealed);
                    self.file.write_all(&self.sealed)?;
                }
                None => self.file.write_all(piece)?,
            }
        }
        Ok(())
    }

    /// Seals the last chunk, syncs the file's data (and the size that locates it) to
    /// disk, and returns the plaintext's SHA-256 in hex.
    fn finish(mut self) -> std::io::Result<String> {
        use std::io::Write;
        if let Some(enc) = self.encryptor.take() {
            self.sealed.clear();
            enc.finish(&mut self.sealed);
            self.file.write_all(&self.sealed)?;
        }
        self.file.sync_data()?;
        Ok(hex::encode(self.hasher.finalize()))
    }
}

type Absorbed = (Sink, Vec<Bytes>, std::io::Result<()>);

/// Streams an upload into its [`Sink`] about one [`STAGE_BUFFER`] at a time on a
/// blocking thread, while the next fills from the network: hashing and writing overlap
/// receiving, and at most two batches per upload are held, whatever the file's size. A
/// batch is the body's own chunks, handed over as they came (no copy into a buffer of
/// ours first).
struct Stager {
    sink: Option<Sink>,
    in_flight: Option<tokio::task::JoinHandle<Absorbed>>,
    buf: Vec<Bytes>,
    len: usize,
    spare: Vec<Bytes>,
}

impl Stager {
    fn new(sink: Sink) -> Stager {
        Stager {
            sink: Some(sink),
            in_flight: None,
            buf: Vec::new(),
            len: 0,
            spare: Vec::new(),
        }
    }

    async fn settle(&mut self) -> std::io::Result<()> {
        if let Some(task) = self.in_flight.take() {
            let (sink, mut used, result) = task.await.map_err(std::io::Error::other)?;
            used.clear();
            self.spare = used;
            self.sink = Some(sink);
            result?;
        }
        Ok(())
    }

    async fn write(&mut self, data: Bytes) -> std::io::Result<()> {
        if !self.buf.is_empty() && self.len + data.len() > STAGE_BUFFER {
            self.send().await?;
        }
        self.len += data.len();
        self.buf.push(data);
        Ok(())
    }

    async fn send(&mut self) -> std::io::Result<()> {
        self.settle().await?;
        let mut sink = self.sink.take().expect("no write in flight after settle");
        let full = std::mem::replace(&mut self.buf, std::mem::take(&mut self.spare));
        self.len = 0;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let result = full.iter().try_for_each(|c| sink.absorb(c));
            (sink, full, result)
        }));
        Ok(())
    }

    async fn finish(mut self) -> std::io::Result<String> {
        self.settle().await?;
        let mut sink = self.sink.take().expect("no write in flight after settle");
        let rest = std::mem::take(&mut self.buf);
        tokio::task::spawn_blocking(move || {
            rest.iter().try_for_each(|c| sink.absorb(c))?;
            sink.finish()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Deletes a staged file if the upload does not get as far as committing it.
struct StagedGuard(Option<PathBuf>);

impl Drop for StagedGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn storage_key(tenant: &str, sha: &str, key_id: Option<&str>) -> String {
    let t = hex::encode(&Sha256::digest(tenant.as_bytes())[..12]);
    match key_id {
        Some(k) => format!("t/{t}/{}/{sha}.{k}.enc", &sha[..2]),
        None => format!("t/{t}/{}/{sha}", &sha[..2]),
    }
}

fn aad_for(tenant: &str) -> String {
    format!("pulse-file\n{tenant}")
}

/// Receives an upload through a ticket: checks the signature and single use, reserves
/// quota, streams the body to a staged file (size limit, SHA-256, sniffing and encryption
/// on the way), stores the content once per tenant, and records the file. On any failure
/// the staged bytes are removed and the reservation released.
pub async fn receive_upload<S, E>(
    app: &App,
    ticket: Uuid,
    expires: i64,
    sig: &str,
    content_length: Option<u64>,
    body: S,
) -> Result<FileInfo, FileError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    app.files.verify("upload", ticket, expires, sig)?;
    let client = app.pool.get().await?;
    // The claim and the reservation each commit without waiting for the disk: the
    // upload's final commit flushes the WAL up to and including them, and one lost in a
    // crash only means the ticket could be used once more for an upload that never
    // completed. A refused upload still uses up its ticket.
    let claim = client
        .prepare_cached(
            "UPDATE pulse.upload_tickets SET used_at = now()
              WHERE id = $1 AND used_at IS NULL AND expires_at > now()
          RETURNING tenant, owner, name, max_bytes, content_types, public, attached_table, attached_id",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 1] = [&ticket];
    let row = db::one_trip(&client, client.query_opt(&claim, &params))
        .await?
        .ok_or_else(|| {
            FileError::UrlExpired("this upload URL was already used or has expired: ask for a new one".into())
        })?;
    let tenant: String = row.get(0);
    let limit = row.get::<_, i64>(3) as u64;
    if let Some(len) = content_length
        && len > limit
    {
        count_upload("too_large");
        return Err(FileError::TooLarge { limit });
    }
    let quota = app.config().files.quota_for(&tenant);
    let reserved = match content_length {
        Some(len) => reserve_quota(&client, &tenant, quota, len, ticket)
            .await
            .map(|_| len),
        // Unknown length: a first slice, grown as the bytes arrive (see `Reservation`);
        // when even that slice does not fit, nothing up front and only what arrives.
        None => {
            // Without a quota nobody waits on the reservation: the limit at once.
            let first = if quota.is_some() {
                FIRST_RESERVATION.min(limit)
            } else {
                limit
            };
            match reserve_quota(&client, &tenant, quota, first, ticket).await {
                Ok(()) => Ok(first),
                Err(FileError::QuotaExceeded { .. }) => {
                    reserve_quota(&client, &tenant, quota, 0, ticket).await.map(|_| 0)
                }
                Err(e) => Err(e),
            }
        }
    };
    drop(client);
    let mut reservation = match reserved {
        Ok(bytes) => Reservation {
            tenant: tenant.clone(),
            ticket,
            quota,
            limit,
            bytes,
        },
        Err(e) => {
            count_upload("quota_exceeded");
            return Err(e);
        }
    };
    let result = store_upload(app, &row, ticket, limit, content_length, &mut reservation, body).await;
    if result.is_err() {
        let config = app.config();
        if let Err(e) = release_reservation(&Ctx::new(app, &config), &tenant, reservation.bytes, ticket).await
        {
            tracing::error!(error = %e, ticket = %ticket, "cannot release an upload's quota reservation; the cleanup job will");
        }
    }
    count_upload(match &result {
        Ok(_) => "ok",
        Err(FileError::TooLarge { .. }) => "too_large",
        Err(FileError::QuotaExceeded { .. }) => "quota_exceeded",
        Err(FileError::Invalid { .. }) => "invalid",
        Err(_) => "failed",
    });
    result
}

/// A tenant's bytes stored and reserved (what its quota is checked against). Stored
/// uploads not folded yet count by their reservation, never less than what they stored.
async fn held_bytes(c: &impl deadpool_postgres::GenericClient, tenant: &str) -> Result<u64, FileError> {
    let statement = c
        .prepare_cached("SELECT used_bytes + reserved_bytes FROM pulse.storage_usage WHERE tenant = $1")
        .await?;
    let row = c.query_opt(&statement, &[&tenant]).await?;
    Ok(row.map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0))
}

/// Runs `statement` in `tx` after `SET LOCAL synchronous_commit TO off`, both sent at
/// once (pipelined: one round trip), for a transaction whose commit need not wait for the
/// disk (each caller says why).
async fn relaxed<T>(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    let ((), out) =
        futures_util::try_join!(tx.batch_execute("SET LOCAL synchronous_commit TO off"), statement)?;
    Ok(out)
}

fn count_upload(result: &'static str) {
    metrics::counter!("pulse_file_uploads_total", "result" => result).increment(1);
}

async fn reserve_quota(
    client: &deadpool_postgres::Object,
    tenant: &str,
    quota: Option<u64>,
    bytes: u64,
    ticket: Uuid,
) -> Result<(), FileError> {
    // One conditional upsert: the row lock makes concurrent reservations queue, and each
    // re-checks against the others' bytes, so the quota cannot be passed together. The
    // ticket records what it holds in the same statement. It runs alone in one round trip
    // (as the claim, the upload's final commit makes it durable): the tenant's usage row,
    // which every upload of the tenant takes, is held only while the server runs it.
    let quota_i = quota.map(|q| q as i64);
    let reserve = client
        .prepare_cached(
                "WITH u AS (
                 INSERT INTO pulse.storage_usage AS u (tenant, reserved_bytes)
                      SELECT $1, $2 WHERE $3::bigint IS NULL OR $2 <= $3
                 ON CONFLICT (tenant) DO UPDATE
                        SET reserved_bytes = u.reserved_bytes + EXCLUDED.reserved_bytes, updated_at = now()
                      WHERE $3::bigint IS NULL OR u.used_bytes + u.reserved_bytes + EXCLUDED.reserved_bytes <= $3
                 RETURNING 1),
             t AS (
                 UPDATE pulse.upload_tickets SET reserved_bytes = $2
                  WHERE id = $4 AND EXISTS (SELECT 1 FROM u)
                 RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM t)",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 4] = [&tenant, &(bytes as i64), &quota_i, &ticket];
    let reserved: bool = db::one_trip(client, client.query_one(&reserve, &params))
        .await?
        .get(0);
    if !reserved {
        let used = held_bytes(client, tenant).await?;
        return Err(FileError::QuotaExceeded {
            tenant: tenant.to_string(),
            quota: quota.unwrap_or(0),
            used,
            wanted: bytes,
        });
    }
    Ok(())
}

/// The first slice of quota an upload of unknown length (chunked, or a form) reserves.
const FIRST_RESERVATION: u64 = 1024 * 1024;

/// An upload's hold on its tenant's quota (mirrored in its ticket's `reserved_bytes`).
/// With a `Content-Length` it is that length from the start; without one it starts at
/// [`FIRST_RESERVATION`] and grows as bytes arrive, so uploads of unknown length do not
/// each hold the ticket's whole maximum against a quota that has room for all of them.
struct Reservation {
    tenant: String,
    ticket: Uuid,
    quota: Option<u64>,
    limit: u64,
    bytes: u64,
}

impl Reservation {
    /// Makes the reservation cover `total` bytes: doubling it (up to the size limit) so a
    /// large upload takes few round trips; when the doubled slice does not fit, only what
    /// has arrived. `quota_exceeded` when not even that fits.
    async fn cover(&mut self, app: &App, total: u64) -> Result<(), FileError> {
        if total <= self.bytes {
            return Ok(());
        }
        let doubled = (self.bytes.max(FIRST_RESERVATION) * 2)
            .max(total)
            .min(self.limit.max(total));
        let mut client = app.pool.get().await?;
        for want in [doubled, total] {
            let more = (want - self.bytes) as i64;
            let tx = client.transaction().await?;
            let grow = tx
                .prepare_cached(
                    "WITH u AS (
                     UPDATE pulse.storage_usage
                        SET reserved_bytes = reserved_bytes + $2, updated_at = now()
                      WHERE tenant = $1 AND ($3::bigint IS NULL OR used_bytes + reserved_bytes + $2 <= $3)
                  RETURNING 1)
                 UPDATE pulse.upload_tickets t SET reserved_bytes = t.reserved_bytes + $2
                   FROM u WHERE t.id = $4 AND t.reserved_bytes = $5
                 RETURNING 1",
                )
                .await?;
            let (quota, held) = (self.quota.map(|q| q as i64), self.bytes as i64);
            let params: [&(dyn ToSql + Sync); 5] = [&self.tenant, &more, &quota, &self.ticket, &held];
            // As the first reservation: the upload's final commit makes it durable.
            let grown = relaxed(&tx, tx.query_opt(&grow, &params)).await?;
            if grown.is_some() {
                tx.commit().await?;
                self.bytes = want;
                return Ok(());
            }
            // Nothing changed (or a ticket no longer ours: rolled back with the usage).
            tx.rollback().await?;
            if want == total {
                break;
            }
        }
        let used = held_bytes(&client, &self.tenant).await?;
        Err(FileError::QuotaExceeded {
            tenant: self.tenant.clone(),
            quota: self.quota.unwrap_or(0),
            used,
            wanted: total - self.bytes,
        })
    }
}

/// Gives back what an upload's ticket still holds of its tenant's quota: $1 tenant, $2
/// ticket, $3 the bytes it holds. Only if the ticket still holds them and is not
/// settled (a settled upload's reservation is the fold's to give back), so a release
/// never runs twice nor takes back a stored file's bytes. The usage row is locked before
/// the ticket, the order every other statement taking both follows (the reservation's
/// growth, the fold; an upload's recording takes the ticket alone and waits for nothing
/// after it), so a release racing the end of the same upload (the cleanup job's, for an
/// upload still running after [`STALE_UPLOAD`]) waits instead of deadlocking. Public for
/// the test that checks that order.
pub const RELEASE_RESERVATION: &str =
    "WITH u AS (SELECT 1 FROM pulse.storage_usage WHERE tenant = $1 FOR UPDATE),
     t AS (UPDATE pulse.upload_tickets SET reserved_bytes = 0
            WHERE id = $2 AND reserved_bytes = $3 AND file_id IS NULL AND (SELECT count(*) FROM u) >= 0
           RETURNING 1)
UPDATE pulse.storage_usage SET reserved_bytes = greatest(reserved_bytes - $3, 0), updated_at = now()
 WHERE tenant = $1 AND EXISTS (SELECT 1 FROM t)";

async fn release_reservation(cx: &Ctx<'_>, tenant: &str, bytes: u64, ticket: Uuid) -> Result<(), FileError> {
    let client = cx.pool.get().await?;
    client
        .execute(
            &client.prepare_cached(RELEASE_RESERVATION).await?,
            &[&tenant, &ticket, &(bytes as i64)],
        )
        .await?;
    Ok(())
}

async fn store_upload<S, E>(
    app: &App,
    ticket_row: &tokio_postgres::Row,
    ticket: Uuid,
    limit: u64,
    content_length: Option<u64>,
    reservation: &mut Reservation,
    mut body: S,
) -> Result<FileInfo, FileError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let tenant: String = ticket_row.get(0);
    let owner: Option<String> = ticket_row.get(1);
    let name: String = ticket_row.get(2);
    let types: Vec<String> = ticket_row.get(4);
    let public: bool = ticket_row.get(5);
    let att_table: Option<String> = ticket_row.get(6);
    let att_id: Option<String> = ticket_row.get(7);
    let content_type = types.first().cloned().unwrap_or_default();

    let files = &app.files;
    let staged_path = files.backend.staging_path();
    let mut guard = StagedGuard(Some(staged_path.clone()));
    let io = |e: std::io::Error| FileError::Unavailable(format!("cannot stage the upload: {e}"));
    let file = tokio::fs::File::create(&staged_path)
        .await
        .map_err(io)?
        .into_std()
        .await;
    let key_id = files.keys.current_id().map(String::from);
    let mut stager = Stager::new(Sink {
        file,
        hasher: Sha256::new(),
        encryptor: files.keys.encryptor(&aad_for(&tenant)),
        sealed: Vec::new(),
    });
    let mut head: Vec<u8> = Vec::with_capacity(sniff::SNIFF_LEN);
    let mut sniffed = false;
    let mut total: u64 = 0;

    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| FileError::invalid("body", format!("the upload was interrupted: {e}")))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(FileError::TooLarge { limit });
        }
        if let Some(len) = content_length
            && total > len
        {
            return Err(FileError::invalid("body", "more bytes than Content-Length"));
        }
        reservation.cover(app, total).await?;
        if !sniffed {
            let want = sniff::SNIFF_LEN - head.len();
            head.extend_from_slice(&chunk[..want.min(chunk.len())]);
            if head.len() >= sniff::SNIFF_LEN {
                sniff::check(&content_type, &head).map_err(|m| FileError::invalid("content_type", m))?;
                sniffed = true;
            }
        }
        stager.write(chunk).await.map_err(io)?;
    }
    if let Some(len) = content_length
        && total != len
    {
        return Err(FileError::invalid(
            "body",
            format!("the upload was truncated: {total} of {len} bytes arrived"),
        ));
    }
    if !sniffed {
        sniff::check(&content_type, &head).map_err(|m| FileError::invalid("content_type", m))?;
    }
    let sha = stager.finish().await.map_err(io)?;

    let key = storage_key(&tenant, &sha, key_id.as_deref());
    let id = Uuid::new_v4();
    let now = chrono::Utc::now();
    let created_at = now.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let event = file_event(
        "file.uploaded",
        id,
        &tenant,
        owner.as_deref(),
        serde_json::json!({
            "name": name, "contentType": content_type, "size": total, "sha256": sha,
            "public": public, "createdAt": created_at,
        }),
    );
    let size = total as i64;
    let blob_row: [&(dyn ToSql + Sync); 7] = [&ticket, &id, &tenant, &sha, &size, &key, &key_id];
    let file_row: [&(dyn ToSql + Sync); 11] = [
        &id,
        &tenant,
        &owner,
        &name,
        &content_type,
        &size,
        &sha,
        &public,
        &att_table,
        &att_id,
        &now,
    ];
    let mut client = app.pool.get().await?;
    let settle = client.prepare_cached(SETTLE_UPLOAD).await?;
    let insert_file = client
        .prepare_cached(
            "INSERT INTO pulse.files (id, tenant, owner, name, content_type, size, sha256, public, attached_table, attached_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .await?;
    // The tenant's usage row is not taken here: uploads of a tenant record themselves
    // side by side and their commits share WAL flushes. What orders them against each
    // other and against deletions is the blob's row (see `SETTLE_UPLOAD`).
    let mut attempt = 1;
    let (added, written) = loop {
        let tx = client.transaction().await?;
        let recorded = futures_util::try_join!(
            tx.query_opt(&settle, &blob_row),
            tx.execute(&insert_file, &file_row),
            crate::outbox::write_unannounced(&*tx, &event),
        );
        let (added, written): (i64, bool) = match recorded {
            Ok((Some(row), _, written)) => (row.get(0), written),
            Ok((None, _, _)) => {
                return Err(FileError::UrlExpired(
                    "this upload's ticket is gone (the upload took longer than the cleanup waits for): ask for a new upload URL".into(),
                ));
            }
            // The content was deleted while this upload pointed at it (the file's
            // reference waited for the deletion and then found nothing): the staged copy
            // is still here, so claim the content again, as new.
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
                    && attempt < 3 =>
            {
                attempt += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if added > 0 {
            // The blob's row is ours and not committed yet: whoever else wants this
            // content waits for it, so no deletion can remove the object between here
            // and the commit. (On S3 this is the object's upload: the transaction waits
            // idle meanwhile, holding only that row and the ticket's.)
            files.backend.commit(&staged_path, &key).await?;
            guard.0 = None;
        }
        tx.commit().await?;
        break (added, written);
    };
    // The file is stored: a fold that fails now is the next cleanup run's to do (and the
    // event is found by the relay's poll).
    if let Err(e) = fold_alone(&client, &app.config(), &tenant, Some(ticket), written).await {
        tracing::warn!(error = %e, ticket = %ticket, tenant = %tenant,
            "cannot count a stored upload in its tenant's usage yet; the next cleanup run will");
    }
    tracing::info!(file = %id, tenant = %tenant, size = total, deduplicated = added == 0, "file stored");
    Ok(FileInfo {
        id,
        tenant,
        owner,
        name,
        content_type,
        size: total,
        sha256: sha,
        public,
        created_at,
        storage_key: key,
        key_id,
    })
}

/// Records an upload's content and settles its ticket, in one statement:
/// $1 ticket, $2 file id, $3 tenant, $4 SHA-256, $5 size, $6 storage key, $7 key id.
/// The blob's row is inserted unless the tenant already has this content (`ON CONFLICT`
/// waits for an upload of the same content that has not committed yet, and inserts if it
/// rolls back); the ticket gets the file and, in `pending_bytes`, the bytes its tenant's
/// usage grows by: the size when the row is new, 0 when the content was already stored.
/// No row when the ticket is gone or already settled. The file's row, sent right after,
/// refers to the blob's, which holds a deletion of that content off until the commit.
const SETTLE_UPLOAD: &str = "
WITH b AS (
    INSERT INTO pulse.file_blobs (tenant, sha256, size, storage_key, key_id)
    VALUES ($3, $4, $5, $6, $7)
    ON CONFLICT (tenant, sha256) DO NOTHING
    RETURNING size)
UPDATE pulse.upload_tickets SET file_id = $2, pending_bytes = coalesce((SELECT size FROM b), 0)
 WHERE id = $1 AND file_id IS NULL
RETURNING pending_bytes";

/// Takes a tenant's usage row: $1 tenant. Every statement that changes what a tenant
/// holds or has reserved takes it first, so they run one at a time. Public for the
/// tests that hold it.
pub const LOCK_USAGE: &str = "SELECT used_bytes FROM pulse.storage_usage WHERE tenant = $1 FOR UPDATE";

/// Moves settled uploads into their tenant's usage (the "fold"): each settled ticket's
/// reservation leaves `reserved_bytes` and its `pending_bytes` joins `used_bytes`, and the
/// ticket is left holding nothing. $1 tenant, $2 one ticket (NULL: all the tenant's).
/// Returns `used_bytes` before and after, or no row when nothing was settled. Sent after
/// [`LOCK_USAGE`] in the same transaction: its snapshot is taken with the usage row held,
/// so no other fold runs and the tickets it reads do not change under it. Public for the
/// tests that race it.
pub const FOLD_SETTLED: &str = "
WITH o AS (
    SELECT id, reserved_bytes, pending_bytes FROM pulse.upload_tickets
     WHERE tenant = $1 AND ($2::uuid IS NULL OR id = $2) AND file_id IS NOT NULL
       AND (reserved_bytes > 0 OR pending_bytes > 0)
       AND EXISTS (SELECT 1 FROM pulse.storage_usage WHERE tenant = $1)),
t AS (
    UPDATE pulse.upload_tickets t SET reserved_bytes = 0, pending_bytes = 0 FROM o
     WHERE t.id = o.id
    RETURNING o.reserved_bytes, o.pending_bytes),
s AS (
    SELECT count(*) AS n, coalesce(sum(reserved_bytes), 0)::bigint AS reserved,
           coalesce(sum(pending_bytes), 0)::bigint AS pending FROM t)
UPDATE pulse.storage_usage u
   SET used_bytes = u.used_bytes + s.pending,
       reserved_bytes = greatest(u.reserved_bytes - s.reserved, 0), updated_at = now()
  FROM s
 WHERE u.tenant = $1 AND s.n > 0
RETURNING u.used_bytes - s.pending, u.used_bytes";

/// [`LOCK_USAGE`] and [`FOLD_SETTLED`], prepared on `c`.
async fn fold_statements(
    c: &impl deadpool_postgres::GenericClient,
) -> Result<[Statement; 2], tokio_postgres::Error> {
    let (lock, fold) = futures_util::try_join!(c.prepare_cached(LOCK_USAGE), c.prepare_cached(FOLD_SETTLED))?;
    Ok([lock, fold])
}

/// Folds `tenant`'s settled uploads (one `ticket`, or all) in the transaction `c` is in,
/// which must not have locked anything of the tenant's yet: takes the usage row, then
/// folds, both sent at once (`statements` from [`fold_statements`]). Returns the
/// tenant's `used_bytes` when the row was taken and after the fold (0, 0 when the tenant
/// has no usage row: nothing was ever reserved, so nothing is settled).
async fn fold_settled(
    c: &impl deadpool_postgres::GenericClient,
    [lock, fold]: &[Statement; 2],
    tenant: &str,
    ticket: Option<Uuid>,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let (key, params): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 2]) = ([&tenant], [&tenant, &ticket]);
    let (held, folded) = futures_util::try_join!(c.query_opt(lock, &key), c.query_opt(fold, &params))?;
    let before = held.map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0);
    Ok(folded.map_or((before, before), |r| {
        (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64)
    }))
}

/// Folds `tenant`'s settled uploads (one `ticket`, or all) in a transaction of its own,
/// in one round trip ([`db::one_trip`]): the usage row is held only while the server
/// runs it. Its commit need not wait for the disk: a fold lost in a crash is redone by
/// the next start or cleanup run, the tickets keeping what they hold until then.
/// With `announce`, the same transaction wakes the outbox relay at its commit (for an
/// upload's event, written without: see [`crate::outbox::write_unannounced`]).
async fn fold_alone(
    client: &deadpool_postgres::Object,
    config: &Config,
    tenant: &str,
    ticket: Option<Uuid>,
    announce: bool,
) -> Result<(), tokio_postgres::Error> {
    let statements = fold_statements(client).await?;
    let notify = if announce {
        Some(client.prepare_cached(crate::outbox::ANNOUNCE).await?)
    } else {
        None
    };
    let wake = async {
        if let Some(n) = &notify {
            client.execute(n, &[&crate::outbox::NOTIFY_CHANNEL]).await?;
        }
        Ok(())
    };
    let work = async {
        let (folded, ()) = futures_util::try_join!(fold_settled(client, &statements, tenant, ticket), wake)?;
        Ok(folded)
    };
    let (before, after) = db::one_trip(client, work).await?;
    usage_changed(config, tenant, before, after);
    Ok(())
}

/// Folds every tenant's settled uploads left unfolded (by a crash between an upload's
/// commit and its fold); returns how many tenants had some.
pub async fn fold_all_settled(cx: &Ctx<'_>) -> Result<u64, FileError> {
    let client = cx.pool.get().await?;
    let tenants: Vec<String> = client
        .query(
            "SELECT DISTINCT tenant FROM pulse.upload_tickets
              WHERE file_id IS NOT NULL AND (reserved_bytes > 0 OR pending_bytes > 0)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut folded = 0;
    for tenant in &tenants {
        // One tenant's failure does not keep the others' uploads out of their usage.
        match fold_alone(&client, cx.config, tenant, None, false).await {
            Ok(()) => folded += 1,
            Err(e) => tracing::warn!(error = %e, tenant = %tenant,
                "cannot count stored uploads in the tenant's usage; the next cleanup run will try again"),
        }
    }
    Ok(folded)
}

/// Records a tenant's new usage: the gauge, and a warning when it crosses 80% of quota.
fn usage_changed(config: &Config, tenant: &str, before: u64, after: u64) {
    metrics::gauge!("pulse_storage_bytes", "tenant" => tenant.to_string()).set(after as f64);
    if let Some(quota) = config.files.quota_for(tenant) {
        let line = (quota as f64 * QUOTA_WARNING_RATIO) as u64;
        if before < line && after >= line {
            tracing::warn!(
                tenant = %tenant, used_bytes = after, quota_bytes = quota,
                "tenant storage passed 80% of its quota"
            );
        }
    }
}

const FILE_COLUMNS: &str = "f.id, f.tenant, f.owner, f.name, f.content_type, f.size, f.sha256, f.public,
    to_char(f.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), b.storage_key, b.key_id";

fn file_from_row(r: &tokio_postgres::Row) -> FileInfo {
    FileInfo {
        id: r.get(0),
        tenant: r.get(1),
        owner: r.get(2),
        name: r.get(3),
        content_type: r.get(4),
        size: r.get::<_, i64>(5) as u64,
        sha256: r.get(6),
        public: r.get(7),
        created_at: r.get(8),
        storage_key: r.get(9),
        key_id: r.get(10),
    }
}

/// A file's metadata, without any permission check (callers decide).
pub async fn lookup(app: &App, id: Uuid) -> Result<FileInfo, FileError> {
    let client = app.pool.get().await?;
    let sql = format!(
        "SELECT {FILE_COLUMNS} FROM pulse.files f
           JOIN pulse.file_blobs b ON b.tenant = f.tenant AND b.sha256 = f.sha256
          WHERE f.id = $1"
    );
    let row = client
        .query_opt(&client.prepare_cached(&sql).await?, &[&id])
        .await?
        .ok_or(FileError::NotFound)?;
    Ok(file_from_row(&row))
}

/// How a download is allowed.
#[derive(Debug, Clone)]
pub enum ReadAccess {
    /// An authenticated principal.
    Principal(Principal),
    /// A valid signed URL for this file, until this Unix time.
    Signed {
        /// Expiry, Unix seconds.
        expires: i64,
    },
}

/// Resolves who may read file `id`: a valid signed URL for it, or a principal the matrix
/// allows. A file the principal may not see answers `not_found` only when it does not
/// exist; otherwise `forbidden`.
pub async fn authorize_read(
    app: &App,
    id: Uuid,
    principal: Option<Principal>,
    signed: Option<(i64, &str)>,
) -> Result<(FileInfo, ReadAccess), FileError> {
    let access = match (signed, principal) {
        (Some((expires, sig)), _) => {
            app.files.verify("download", id, expires, sig)?;
            ReadAccess::Signed { expires }
        }
        (None, Some(p)) => ReadAccess::Principal(p),
        (None, None) => {
            return Err(FileError::Unauthenticated(
                "send a bearer token or use a signed URL".into(),
            ));
        }
    };
    let info = lookup(app, id).await?;
    if let ReadAccess::Principal(p) = &access {
        decide(p, Capability::ReadFile, &info.target())?;
    }
    Ok((info, access))
}

/// A signed download URL for a file the principal may read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignedUrl {
    /// Absolute URL.
    pub url: String,
    /// Relative to the deployment URL.
    pub path: String,
    /// Expiry (RFC 3339).
    pub expires_at: String,
}

/// Signs a download URL of `id` for `ttl` (capped at 7 days; default from the config).
pub async fn signed_download_url(
    app: &App,
    principal: &Principal,
    id: Uuid,
    ttl: Option<Duration>,
) -> Result<SignedUrl, FileError> {
    let info = lookup(app, id).await?;
    decide(principal, Capability::ReadFile, &info.target())?;
    let ttl = ttl
        .unwrap_or(app.config().files.signed_url_ttl)
        .min(Duration::from_secs(7 * 86_400));
    Ok(sign_download(app, id, now_unix() + ttl.as_secs().max(1) as i64))
}

/// Signs a download URL of `id` valid until `expires` (Unix seconds), without checks.
pub fn sign_download(app: &App, id: Uuid, expires: i64) -> SignedUrl {
    let sig = app.files.sign("download", id, expires);
    let path = format!("/files/{id}?expires={expires}&sig={sig}");
    SignedUrl {
        url: format!("{}{path}", app.platform().deployment_url.trim_end_matches('/')),
        path,
        expires_at: chrono::DateTime::from_timestamp(expires, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    }
}

/// Streams the plaintext bytes `range` of a file (decrypting when it was encrypted).
pub async fn read(
    app: &App,
    info: &FileInfo,
    range: Range<u64>,
) -> Result<BoxStream<'static, Result<Bytes, FileError>>, FileError> {
    let backend = &app.files.backend;
    let Some(key_id) = &info.key_id else {
        let s = backend.serve(&info.storage_key, range).await?;
        return Ok(s.map(|r| r.map_err(FileError::from)).boxed());
    };
    if range.is_empty() {
        return Ok(futures_util::stream::empty().boxed());
    }
    let header = backend
        .read_range(&info.storage_key, 0..crypto::HEADER as u64)
        .await?;
    let decryptor = app
        .files
        .keys
        .decryptor(key_id, &header, &aad_for(&info.tenant))
        .map_err(|e| FileError::Unavailable(e.to_string()))?;
    let (sealed, first) = crypto::sealed_range(range.start, range.end, info.size);
    let inner = backend.get(&info.storage_key, Some(sealed)).await?;
    let size = info.size;
    let skip = (range.start - first * crypto::CHUNK as u64) as usize;
    let want = range.end - range.start;
    struct State {
        inner: BoxStream<'static, Result<Bytes, StoreError>>,
        buf: Vec<u8>,
        index: u64,
        skip: usize,
        left: u64,
        decryptor: crypto::Decryptor,
        size: u64,
        done: bool,
    }
    let state = State {
        inner,
        buf: Vec::with_capacity(crypto::CHUNK + crypto::TAG),
        index: first,
        skip,
        left: want,
        decryptor,
        size,
        done: false,
    };
    let full = crypto::CHUNK + crypto::TAG;
    let stream = futures_util::stream::unfold(state, move |mut st| async move {
        if st.done || st.left == 0 {
            return None;
        }
        // Fill one sealed chunk (the last one of the object may be shorter).
        loop {
            if st.buf.len() >= full {
                break;
            }
            match st.inner.next().await {
                Some(Ok(b)) => st.buf.extend_from_slice(&b),
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(FileError::from(e)), st));
                }
                None => break,
            }
        }
        if st.buf.is_empty() {
            st.done = true;
            return Some((
                Err(FileError::Unavailable("the stored file is truncated".into())),
                st,
            ));
        }
        let take = st.buf.len().min(full);
        let rest = st.buf.split_off(take);
        let mut chunk = std::mem::replace(&mut st.buf, rest);
        if let Err(e) = st.decryptor.open(st.index, st.size, &mut chunk) {
            st.done = true;
            return Some((Err(FileError::Unavailable(e.to_string())), st));
        }
        st.index += 1;
        let start = st.skip.min(chunk.len());
        st.skip = 0;
        let end = (start as u64 + st.left).min(chunk.len() as u64) as usize;
        st.left -= (end - start) as u64;
        Some((Ok(Bytes::copy_from_slice(&chunk[start..end])), st))
    });
    Ok(stream.boxed())
}

/// Deletes a file the principal may delete; its content goes when no file names it.
pub async fn delete(app: &App, principal: &Principal, id: Uuid) -> Result<(), FileError> {
    let info = lookup(app, id).await?;
    decide(principal, Capability::DeleteFile, &info.target())?;
    let config = app.config();
    delete_unchecked(&Ctx::new(app, &config), id).await.map(|_| ())
}

/// A file event for the outbox, keyed by the file id (a file is uploaded and deleted once)
/// and ordered per owner.
fn file_event(
    event: &'static str,
    id: Uuid,
    tenant: &str,
    owner: Option<&str>,
    extra: serde_json::Value,
) -> crate::outbox::OutboxEvent {
    let mut payload = serde_json::json!({ "fileId": id.to_string(), "tenantId": tenant, "ownerId": owner });
    if let (Some(p), serde_json::Value::Object(more)) = (payload.as_object_mut(), extra) {
        p.extend(more);
    }
    crate::outbox::OutboxEvent {
        event,
        message_id: format!("{event}:{id}"),
        aggregate: match owner {
            Some(o) => crate::engine::events::aggregate(tenant, o),
            None => format!("tenant:{tenant}"),
        },
        payload,
    }
}

/// Deletes a file without a permission check (cleanup, erasure); returns whether it was
/// there.
async fn delete_unchecked(cx: &Ctx<'_>, id: Uuid) -> Result<bool, FileError> {
    let mut client = cx.pool.get().await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "DELETE FROM pulse.files WHERE id = $1 RETURNING tenant, sha256, owner, name",
            &[&id],
        )
        .await?
    else {
        return Ok(false);
    };
    let tenant: String = row.get(0);
    let sha: String = row.get(1);
    let owner: Option<String> = row.get(2);
    let name: String = row.get(3);
    crate::outbox::write(
        &*tx,
        &file_event(
            "file.deleted",
            id,
            &tenant,
            owner.as_deref(),
            serde_json::json!({ "name": name }),
        ),
    )
    .await?;
    // The usage row first (as every change to what a tenant holds), with the tenant's
    // settled uploads folded in, so the bytes freed below come off a count that has them.
    let statements = fold_statements(&tx).await?;
    let (before, used) = fold_settled(&tx, &statements, &tenant, None).await?;
    // Then the blob's row, before counting the files that name it: an upload of this
    // content that has not committed holds that row (its file refers to it), so this
    // waits for it, and the count, taken after, sees its file.
    let blob = tx
        .query_opt(
            "SELECT 1 FROM pulse.file_blobs WHERE tenant = $1 AND sha256 = $2 FOR UPDATE",
            &[&tenant, &sha],
        )
        .await?;
    let others: i64 = tx
        .query_one(
            "SELECT count(*) FROM pulse.files WHERE tenant = $1 AND sha256 = $2",
            &[&tenant, &sha],
        )
        .await?
        .get(0);
    let mut freed = 0i64;
    if blob.is_some()
        && others == 0
        && let Some(blob) = tx
            .query_opt(
                "DELETE FROM pulse.file_blobs WHERE tenant = $1 AND sha256 = $2 RETURNING storage_key, size",
                &[&tenant, &sha],
            )
            .await?
    {
        let key: String = blob.get(0);
        freed = blob.get(1);
        // Removed while the blob's row is held (deleted, not committed), so an upload of
        // the same content waits and then stores it again rather than pointing at a
        // deleted object.
        cx.files.backend.delete(&key).await?;
        tx.execute(
            "UPDATE pulse.storage_usage SET used_bytes = greatest(used_bytes - $2, 0), updated_at = now() WHERE tenant = $1",
            &[&tenant, &freed],
        )
        .await?;
    }
    tx.commit().await?;
    usage_changed(cx.config, &tenant, before, used.saturating_sub(freed as u64));
    tracing::info!(file = %id, tenant = %tenant, freed_bytes = freed, "file deleted");
    Ok(true)
}

/// One tenant's storage, as the console and `/files/usage` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantUsage {
    /// Tenant.
    pub tenant: String,
    /// Bytes stored (each content once).
    pub used_bytes: u64,
    /// Bytes reserved by running uploads.
    pub reserved_bytes: u64,
    /// Files.
    pub files: u64,
    /// Quota, `None` when unlimited.
    pub quota_bytes: Option<u64>,
    /// Whether usage is at or past 80% of the quota.
    pub warning: bool,
}

/// Storage per tenant (all tenants when `tenant` is `None`), largest first.
pub async fn storage_usage(cx: &Ctx<'_>, tenant: Option<&str>) -> Result<Vec<TenantUsage>, FileError> {
    let client = cx.pool.get().await?;
    let rows = client
        .query(
            "SELECT u.tenant, u.used_bytes, u.reserved_bytes,
                    (SELECT count(*) FROM pulse.files f WHERE f.tenant = u.tenant)
               FROM pulse.storage_usage u
              WHERE $1::text IS NULL OR u.tenant = $1
              ORDER BY u.used_bytes DESC, u.tenant",
            &[&tenant],
        )
        .await?;
    let config = cx.config;
    Ok(rows
        .iter()
        .map(|r| {
            let tenant: String = r.get(0);
            let used = r.get::<_, i64>(1) as u64;
            let quota = config.files.quota_for(&tenant);
            TenantUsage {
                warning: quota.is_some_and(|q| used as f64 >= q as f64 * QUOTA_WARNING_RATIO),
                used_bytes: used,
                reserved_bytes: r.get::<_, i64>(2) as u64,
                files: r.get::<_, i64>(3) as u64,
                quota_bytes: quota,
                tenant,
            }
        })
        .collect())
}

/// Sets the `pulse_storage_bytes` gauge of every tenant from the database (at start),
/// after counting uploads a crash left stored but not folded into their tenant's usage.
pub async fn refresh_usage_metrics(cx: &Ctx<'_>) -> Result<(), FileError> {
    fold_all_settled(cx).await?;
    for u in storage_usage(cx, None).await? {
        metrics::gauge!("pulse_storage_bytes", "tenant" => u.tenant.clone()).set(u.used_bytes as f64);
        if u.warning {
            tracing::warn!(tenant = %u.tenant, used_bytes = u.used_bytes, quota_bytes = ?u.quota_bytes,
                "tenant storage is at or past 80% of its quota");
        }
    }
    Ok(())
}

/// What one cleanup run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CleanupReport {
    /// Tickets that expired without being used, removed.
    pub expired_tickets: u64,
    /// Reservations of uploads that never finished, released.
    pub stale_reservations: u64,
    /// Tenants with stored uploads not yet counted in their usage, counted: left by a
    /// crash between an upload's commit and its fold, or (rarely) an upload finishing
    /// at that moment, whose own fold then finds nothing left to do.
    pub unfolded_tenants: u64,
    /// Files whose owning Symfony row is gone, deleted.
    pub detached_files: u64,
    /// Stored objects no row names, deleted.
    pub orphan_objects: u64,
    /// Staged upload files left by a crash, deleted.
    pub staged_files: u64,
}

/// How old an unfinished upload must be before the cleanup gives up on it.
pub const STALE_UPLOAD: Duration = Duration::from_secs(6 * 3600);

/// The orphan cleanup, for the jobs scheduler: expired tickets never used, reservations of
/// uploads that never finished, files whose owning row in Symfony's database is gone,
/// objects in storage no row names, and staged files left by a crash. `stale` is how old
/// unfinished work must be before it is removed ([`STALE_UPLOAD`] in production).
pub async fn cleanup_orphans(cx: &Ctx<'_>, stale: Duration) -> Result<CleanupReport, FileError> {
    let mut report = expire_upload_tickets(cx, stale).await?;
    detached_and_orphans(cx, stale, &mut report).await?;
    tracing::info!(?report, "file cleanup done");
    Ok(report)
}

/// The upload-ticket part of [`cleanup_orphans`]: tickets expired unused (and used ones
/// a week old) are removed, reservations of uploads unfinished for `stale` released.
pub async fn expire_upload_tickets(cx: &Ctx<'_>, stale: Duration) -> Result<CleanupReport, FileError> {
    let mut report = CleanupReport::default();
    let stale_secs = stale.as_secs_f64();
    let client = cx.pool.get().await?;
    report.expired_tickets = client
        .execute(
            "DELETE FROM pulse.upload_tickets
              WHERE (used_at IS NULL AND expires_at < now() - make_interval(secs => $1))
                 OR (used_at IS NOT NULL AND reserved_bytes = 0 AND pending_bytes = 0
                     AND used_at < now() - interval '7 days')",
            &[&stale_secs],
        )
        .await?;
    let stale_rows = client
        .query(
            "SELECT id, tenant, reserved_bytes FROM pulse.upload_tickets
              WHERE reserved_bytes > 0 AND file_id IS NULL AND used_at < now() - make_interval(secs => $1)",
            &[&stale_secs],
        )
        .await?;
    drop(client);
    for r in stale_rows {
        release_reservation(cx, &r.get::<_, String>(1), r.get::<_, i64>(2) as u64, r.get(0)).await?;
        report.stale_reservations += 1;
    }
    report.unfolded_tenants = fold_all_settled(cx).await?;
    Ok(report)
}

/// The file part of [`cleanup_orphans`]: files whose Symfony row is gone, objects no row
/// names, staged leftovers, all older than `stale`.
pub async fn delete_orphaned_files(cx: &Ctx<'_>, stale: Duration) -> Result<CleanupReport, FileError> {
    let mut report = CleanupReport::default();
    detached_and_orphans(cx, stale, &mut report).await?;
    Ok(report)
}

async fn detached_and_orphans(
    cx: &Ctx<'_>,
    stale: Duration,
    report: &mut CleanupReport,
) -> Result<(), FileError> {
    report.detached_files = delete_detached(cx).await?;

    // Objects without a blob row (a crash between storing and recording), old enough not
    // to be an upload committing right now.
    let client = cx.pool.get().await?;
    let known: std::collections::HashSet<String> = client
        .query("SELECT storage_key FROM pulse.file_blobs", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let cutoff = chrono::Utc::now() - chrono::Duration::from_std(stale).unwrap_or_default();
    for (key, modified) in cx.files.backend.list("t").await? {
        if !known.contains(&key) && modified <= cutoff {
            cx.files.backend.delete(&key).await?;
            report.orphan_objects += 1;
        }
    }

    let dir = cx.files.backend.staging_dir().to_path_buf();
    report.staged_files = tokio::task::spawn_blocking(move || {
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= stale);
            if old && std::fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        n
    })
    .await
    .unwrap_or(0);
    Ok(())
}

async fn delete_detached(cx: &Ctx<'_>) -> Result<u64, FileError> {
    let client = cx.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, attached_table, attached_id FROM pulse.files WHERE attached_table IS NOT NULL",
            &[],
        )
        .await?;
    drop(client);
    if rows.is_empty() {
        return Ok(0);
    }
    let source = crate::db::connect(&cx.config.source_db)
        .await
        .map_err(|e| FileError::Unavailable(format!("cannot reach the source database: {e}")))?;
    let mut deleted = 0;
    for r in rows {
        let id: Uuid = r.get(0);
        let table: String = r.get(1);
        let row_id: String = r.get(2);
        if !valid_table(&table) {
            continue;
        }
        let (schema, name) = table.split_once('.').expect("validated");
        let sql = format!("SELECT 1 FROM \"{schema}\".\"{name}\" WHERE id::text = $1");
        match source.query_opt(&sql, &[&row_id]).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                if delete_unchecked(cx, id).await? {
                    deleted += 1;
                }
            }
            // A missing table means every row of it is gone.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                if delete_unchecked(cx, id).await? {
                    deleted += 1;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}

/// GDPR erasure: deletes every file `user` owns in `tenant`; returns how many.
pub async fn erase_user_files(cx: &Ctx<'_>, tenant: &str, user: &str) -> Result<u64, FileError> {
    let client = cx.pool.get().await?;
    let ids: Vec<Uuid> = client
        .query(
            "SELECT id FROM pulse.files WHERE tenant = $1 AND owner = $2",
            &[&tenant, &user],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let mut n = 0;
    for id in ids {
        if delete_unchecked(cx, id).await? {
            n += 1;
        }
    }
    Ok(n)
}
