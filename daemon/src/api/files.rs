//! HTTP routes of file storage: upload URLs, uploads, downloads (with ETag, Range, HEAD,
//! signed URLs), deletion, usage. The logic lives in `crate::files`; this module only
//! speaks HTTP: headers in, headers out, errors as the shared table's bodies.
//!
//! Choices worth knowing:
//! - `Range` (RFC 9110 §14): one satisfiable range answers 206 with `Content-Range`;
//!   several answer 206 `multipart/byteranges` (§14.6), one part per range with its own
//!   `Content-Type` and `Content-Range`, after sorting them and coalescing those that
//!   overlap or touch (§15.3.7.2 allows both). Ranges past the end are dropped; when none
//!   is left, 416 with `Content-Range: bytes */SIZE`. A malformed header, another unit, or
//!   more than [`MAX_RANGES`] ranges is ignored and the whole file served (200), as §14.2
//!   allows and as nginx (`max_ranges`) and Apache (`MaxRanges`) do against
//!   many-small-ranges abuse.
//! - `If-Range` (§13.1.5): the range is honoured only when the header is our strong ETag;
//!   anything else (another or weak ETag, a date: we send no `Last-Modified`) serves the
//!   whole file.
//! - `If-None-Match` wins over `Range`: a matching ETag answers 304 whatever the range.
//! - `Cache-Control`: a signed URL is the credential, so its response may be cached by a
//!   CDN until the URL expires (`public`, `immutable`); a bearer-authorised response is
//!   `private` (tenant-public files for an hour, private files revalidated every time).
//! - Uploads take the raw body with PUT (or POST) to the ticket's URL, or a
//!   `multipart/form-data` POST whose first file field is the file. The ticket fixes the
//!   content type; the request's own `Content-Type` is not trusted.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use pulse_shared::ErrorCode;
use pulse_shared::caps::{Capability, Decision, Scope, Target, authorize};
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use uuid::Uuid;

use super::ApiError;
use crate::App;
use crate::files::{self, FileError, ReadAccess, TicketRequest, sniff};

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        ApiError(e.body())
    }
}

/// The file routes, with the CORS allow-list of `http.cors_origins`.
pub fn files_router(app: Arc<App>) -> Router {
    {
        let app = app.clone();
        tokio::spawn(async move {
            let config = app.config();
            if let Err(e) = files::refresh_usage_metrics(&files::Ctx::new(&app, &config)).await {
                tracing::warn!(error = %e, "cannot read storage usage at start");
            }
        });
    }
    let origins = app.config().cors_origins.clone();
    let router = Router::new()
        .route("/files/upload-url", post(upload_url))
        // Uploads enforce their own limit while streaming (per tenant), not axum's.
        .route(
            "/files/upload/{ticket}",
            put(upload).post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/files/usage", get(usage))
        .route("/files/{id}", get(download).delete(delete))
        .route("/files/{id}/signed-url", post(signed_url))
        .route("/exports/{id}", get(export))
        .with_state(app);
    if origins.is_empty() {
        return router;
    }
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    router.layer(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(allowed))
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::PUT,
                Method::POST,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::RANGE,
                header::IF_RANGE,
                header::IF_NONE_MATCH,
                header::HeaderName::from_static(files::TENANT_HEADER),
                header::HeaderName::from_static(files::DEPLOY_KEY_HEADER),
            ])
            .expose_headers([
                header::ETAG,
                header::CONTENT_RANGE,
                header::CONTENT_LENGTH,
                header::CONTENT_DISPOSITION,
                header::ACCEPT_RANGES,
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

fn require_principal(app: &App, headers: &HeaderMap) -> Result<pulse_shared::caps::Principal, ApiError> {
    files::principal_from_headers(app, headers)?
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "send Authorization: Bearer <token>"))
}

/// A user's data export (made by an `ExportUserData` command and announced by the
/// `data_export.ready` event, whose `exportId` names it), for those who may export that
/// user's data.
async fn export(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = require_principal(&app, &headers)?;
    let not_found = || ApiError::new(ErrorCode::NotFound, format!("no export {id:?}"));
    let id: Uuid = id.parse().map_err(|_| not_found())?;
    let client = app.pool.get().await.map_err(FileError::from)?;
    let row = client
        .query_opt(
            "SELECT tenant, user_id, data FROM pulse.data_exports WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(FileError::from)?
        .ok_or_else(not_found)?;
    let (tenant, user): (String, String) = (row.get(0), row.get(1));
    let target = Target {
        tenant: Some(&tenant),
        owner: Some(&user),
        public: false,
        listed: None,
    };
    if let Decision::Denied(reason) = authorize(&principal, Capability::ExportUserData, &target) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("not allowed to read this export: {}", reason.explain()),
        ));
    }
    let data: serde_json::Value = row.get(2);
    Ok((
        [(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        )],
        axum::Json(data),
    )
        .into_response())
}

async fn upload_url(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let principal = require_principal(&app, &headers)?;
    let request: TicketRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            pulse_shared::ErrorBody::new(
                ErrorCode::InvalidArgument,
                format!("the body must be a JSON object with name and content_type: {e}"),
            )
            .with_details(serde_json::json!({ "field": "body" })),
        )
    })?;
    let ticket = files::create_upload_ticket(&app, &principal, request).await?;
    Ok((StatusCode::CREATED, axum::Json(ticket)).into_response())
}

#[derive(Debug, Deserialize)]
struct SignedQuery {
    expires: Option<i64>,
    sig: Option<String>,
}

async fn upload(
    State(app): State<Arc<App>>,
    Path(ticket): Path<String>,
    Query(q): Query<SignedQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let forged = || FileError::UrlExpired("this upload URL is not valid: ask for a new one".into());
    let ticket = Uuid::parse_str(&ticket).map_err(|_| forged())?;
    let (Some(expires), Some(sig)) = (q.expires, q.sig) else {
        return Err(forged().into());
    };
    let content_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    // In its own task, so that a client hanging up mid-upload cannot cancel it between
    // two awaits: the body then ends in an error, and the upload cleans up after itself
    // (staged bytes removed, quota reservation released).
    let task = if multipart {
        let form = Multipart::from_request(request, &()).await.map_err(|e| {
            ApiError::from(FileError::Invalid {
                field: "body",
                message: format!("not a valid multipart form: {e}"),
            })
        })?;
        tokio::spawn(async move { receive_form(&app, ticket, expires, &sig, form).await })
    } else {
        let body = request.into_body().into_data_stream().map_err(|e| e.to_string());
        tokio::spawn(
            async move { files::receive_upload(&app, ticket, expires, &sig, content_length, body).await },
        )
    };
    let info = task
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("the upload task failed: {e}")))??;
    let location = format!("/files/{}", info.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(info),
    )
        .into_response())
}

/// A multipart form upload (an HTML form posting to the upload URL): the first field
/// with a file name (or named `file`) is the file; other fields are ignored.
async fn receive_form(
    app: &App,
    ticket: Uuid,
    expires: i64,
    sig: &str,
    mut form: Multipart,
) -> Result<files::FileInfo, FileError> {
    let broken = |e: axum::extract::multipart::MultipartError| FileError::Invalid {
        field: "body",
        message: format!("the form upload was interrupted or malformed: {e}"),
    };
    while let Some(field) = form.next_field().await.map_err(broken)? {
        if field.file_name().is_none() && field.name() != Some("file") {
            continue;
        }
        let chunks = futures_util::stream::unfold(Some(field), |field| async move {
            let mut field = field?;
            match field.chunk().await {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(field))),
                Ok(None) => None,
                Err(e) => Some((Err(e.to_string()), None)),
            }
        });
        return files::receive_upload(app, ticket, expires, sig, None, Box::pin(chunks)).await;
    }
    Err(FileError::Invalid {
        field: "file",
        message: "the form has no file field: send the file in a field named file".into(),
    })
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| FileError::NotFound.into())
}

/// The most ranges one `Range` header may ask for; more and the header is ignored.
pub const MAX_RANGES: usize = 32;

/// What a `Range` header asks for, checked against the file's size.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// No range, or one to ignore: the whole file.
    Full,
    /// The satisfiable ranges, half-open, sorted, coalesced, never empty.
    Parts(Vec<(u64, u64)>),
    /// No range overlaps the file.
    Unsatisfiable,
}

fn wanted_range(header: Option<&str>, size: u64) -> Wanted {
    let Some((unit, set)) = header.and_then(|h| h.trim().split_once('=')) else {
        return Wanted::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Wanted::Full;
    }
    // The list syntax allows empty elements (`bytes=0-1,,4-5`).
    let specs: Vec<&str> = set.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if specs.is_empty() || specs.len() > MAX_RANGES {
        return Wanted::Full;
    }
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok()
    };
    let mut parts = Vec::with_capacity(specs.len());
    for spec in specs {
        let Some((a, b)) = spec.split_once('-') else {
            return Wanted::Full;
        };
        let (a, b) = (a.trim(), b.trim());
        match (a.is_empty(), b.is_empty()) {
            // bytes=-N: the last N bytes (none of an empty file, nothing for -0).
            (true, false) => {
                let Some(n) = number(b) else {
                    return Wanted::Full;
                };
                if n > 0 && size > 0 {
                    parts.push((size.saturating_sub(n), size));
                }
            }
            // bytes=A-: from A to the end.
            (false, true) => {
                let Some(start) = number(a) else {
                    return Wanted::Full;
                };
                if start < size {
                    parts.push((start, size));
                }
            }
            // bytes=A-B, B inclusive and clipped to the end.
            (false, false) => {
                let (Some(start), Some(last)) = (number(a), number(b)) else {
                    return Wanted::Full;
                };
                if start > last {
                    return Wanted::Full;
                }
                if start < size {
                    parts.push((start, last.saturating_add(1).min(size)));
                }
            }
            (true, true) => return Wanted::Full,
        }
    }
    if parts.is_empty() {
        return Wanted::Unsatisfiable;
    }
    parts.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(parts.len());
    for (start, end) in parts {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Wanted::Parts(merged)
}

/// The framing of a `multipart/byteranges` body: the header of each part and the
/// closing delimiter, so the length is known before any byte is read.
struct ByteRanges {
    boundary: String,
    heads: Vec<String>,
    tail: String,
}

impl ByteRanges {
    fn new(parts: &[(u64, u64)], content_type: &str, size: u64) -> ByteRanges {
        let boundary = format!("pulse-{}", Uuid::new_v4().simple());
        let heads = parts
            .iter()
            .enumerate()
            .map(|(i, (start, end))| {
                format!(
                    "{}--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: bytes {start}-{}/{size}\r\n\r\n",
                    if i == 0 { "" } else { "\r\n" },
                    end - 1
                )
            })
            .collect();
        let tail = format!("\r\n--{boundary}--\r\n");
        ByteRanges {
            boundary,
            heads,
            tail,
        }
    }

    fn content_length(&self, parts: &[(u64, u64)]) -> u64 {
        let framing: usize = self.heads.iter().map(String::len).sum::<usize>() + self.tail.len();
        framing as u64 + parts.iter().map(|(s, e)| e - s).sum::<u64>()
    }
}

fn etag_matches(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag)
}

async fn download(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<SignedQuery>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let signed = match (q.expires, q.sig.as_deref()) {
        (Some(e), Some(s)) => Some((e, s)),
        (None, None) => None,
        _ => {
            return Err(FileError::UrlExpired("a signed URL needs both expires and sig".into()).into());
        }
    };
    let principal = if signed.is_some() {
        None
    } else {
        files::principal_from_headers(&app, &headers)?
    };
    let (info, access) = files::authorize_read(&app, id, principal, signed).await?;
    let etag = format!("\"{}\"", info.sha256);
    let cache = match access {
        ReadAccess::Signed { expires } => {
            let left = (expires - chrono::Utc::now().timestamp()).clamp(0, 86_400);
            format!("public, max-age={left}, immutable")
        }
        ReadAccess::Principal(_) if info.public => "private, max-age=3600".to_string(),
        ReadAccess::Principal(_) => "private, no-cache".to_string(),
    };
    let content_type = if info.content_type.starts_with("text/") {
        format!("{}; charset=utf-8", info.content_type)
    } else {
        info.content_type.clone()
    };
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::CACHE_CONTROL, &cache)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CONTENT_SECURITY_POLICY, "default-src 'none'; sandbox");
    if let Some(inm) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok())
        && etag_matches(inm, &etag)
    {
        return Ok(builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response"));
    }
    builder = builder.header(
        header::CONTENT_DISPOSITION,
        sniff::content_disposition(sniff::shown_inline(&info.content_type), &info.name),
    );
    let mut range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    if let Some(validator) = headers.get(header::IF_RANGE)
        && validator.to_str().ok().map(str::trim) != Some(etag.as_str())
    {
        // Not our current strong ETag (or a date, which we cannot match): the whole file.
        range = None;
    }
    let wanted = wanted_range(range, info.size);
    let whole = wanted == Wanted::Full;
    let parts = match wanted {
        Wanted::Full => vec![(0, info.size)],
        Wanted::Parts(parts) => parts,
        Wanted::Unsatisfiable => {
            return Ok(builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{}", info.size))
                .body(Body::empty())
                .expect("valid response"));
        }
    };
    if whole || parts.len() == 1 {
        let (start, end) = parts[0];
        builder = builder.header(header::CONTENT_TYPE, content_type);
        if whole {
            builder = builder.status(StatusCode::OK);
        } else {
            builder = builder.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{}", end - 1, info.size),
            );
        }
        builder = builder.header(header::CONTENT_LENGTH, end - start);
        if method == Method::HEAD {
            return Ok(builder.body(Body::empty()).expect("valid response"));
        }
        let stream = files::read(&app, &info, start..end).await?;
        return Ok(builder.body(Body::from_stream(stream)).expect("valid response"));
    }
    let framing = ByteRanges::new(&parts, &content_type, info.size);
    builder = builder
        .status(StatusCode::PARTIAL_CONTENT)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/byteranges; boundary={}", framing.boundary),
        )
        .header(header::CONTENT_LENGTH, framing.content_length(&parts));
    if method == Method::HEAD {
        return Ok(builder.body(Body::empty()).expect("valid response"));
    }
    let ByteRanges { heads, tail, .. } = framing;
    let info = Arc::new(info);
    let body = futures_util::stream::iter(parts.into_iter().zip(heads))
        .then(move |((start, end), head)| {
            let (app, info) = (app.clone(), info.clone());
            async move {
                let part = files::read(&app, &info, start..end).await?;
                Ok::<_, FileError>(
                    futures_util::stream::once(async move { Ok(Bytes::from(head)) }).chain(part),
                )
            }
        })
        .try_flatten()
        .chain(futures_util::stream::once(async move { Ok(Bytes::from(tail)) }));
    Ok(builder.body(Body::from_stream(body)).expect("valid response"))
}

async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = require_principal(&app, &headers)?;
    let id = parse_id(&id)?;
    files::delete(&app, &principal, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Default, Deserialize)]
struct SignRequest {
    #[serde(default)]
    ttl_secs: Option<u64>,
}

async fn signed_url(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let principal = require_principal(&app, &headers)?;
    let id = parse_id(&id)?;
    let request: SignRequest = if body.is_empty() {
        SignRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidArgument,
                format!("the body must be {{\"ttl_secs\": N}} or empty: {e}"),
            )
        })?
    };
    let url =
        files::signed_download_url(&app, &principal, id, request.ttl_secs.map(Duration::from_secs)).await?;
    Ok(axum::Json(url).into_response())
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    tenant: Option<String>,
}

async fn usage(
    State(app): State<Arc<App>>,
    Query(q): Query<UsageQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = require_principal(&app, &headers)?;
    let tenant = q.tenant.or_else(|| principal.tenant.clone());
    let decision = authorize(
        &principal,
        Capability::SeeMetrics,
        &Target {
            tenant: tenant.as_deref(),
            owner: None,
            listed: None,
            public: false,
        },
    );
    match (decision, &tenant) {
        (Decision::Allowed(_), Some(_)) | (Decision::Allowed(Scope::Any), None) => {}
        _ => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "not allowed to see this storage usage",
            ));
        }
    }
    let config = app.config();
    let rows = files::storage_usage(&files::Ctx::new(&app, &config), tenant.as_deref()).await?;
    Ok(axum::Json(rows).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let part = |s, e| Wanted::Parts(vec![(s, e)]);
        assert_eq!(wanted_range(None, 10), Wanted::Full);
        assert_eq!(wanted_range(Some("bytes=0-0"), 10), part(0, 1));
        assert_eq!(wanted_range(Some("bytes=2-"), 10), part(2, 10));
        assert_eq!(wanted_range(Some("bytes=-3"), 10), part(7, 10));
        assert_eq!(wanted_range(Some("bytes=-30"), 10), part(0, 10));
        assert_eq!(wanted_range(Some("bytes=5-100"), 10), part(5, 10));
        assert_eq!(wanted_range(Some("Bytes = 5-6"), 10), part(5, 7));
        assert_eq!(wanted_range(Some("bytes=10-"), 10), Wanted::Unsatisfiable);
        assert_eq!(wanted_range(Some("bytes=-0"), 10), Wanted::Unsatisfiable);
        assert_eq!(wanted_range(Some("bytes=5-2"), 10), Wanted::Full);
        assert_eq!(wanted_range(Some("bytes=+1-2"), 10), Wanted::Full);
        assert_eq!(wanted_range(Some("bytes=1-2,x"), 10), Wanted::Full);
        assert_eq!(wanted_range(Some("bytes="), 10), Wanted::Full);
        assert_eq!(wanted_range(Some("items=0-1"), 10), Wanted::Full);
        assert_eq!(wanted_range(Some("bytes=0-"), 0), Wanted::Unsatisfiable);
        // Several: sorted, overlapping and touching ones coalesced, those past the end
        // dropped.
        assert_eq!(
            wanted_range(Some("bytes=0-1,4-5"), 10),
            Wanted::Parts(vec![(0, 2), (4, 6)])
        );
        assert_eq!(
            wanted_range(Some("bytes=6-7, 0-1,,1-3,20-30,-1"), 10),
            Wanted::Parts(vec![(0, 4), (6, 8), (9, 10)])
        );
        assert_eq!(wanted_range(Some("bytes=0-4,5-9"), 10), part(0, 10));
        assert_eq!(wanted_range(Some("bytes=10-11,12-"), 10), Wanted::Unsatisfiable);
        let many = vec!["0-0"; MAX_RANGES].join(",");
        assert_eq!(wanted_range(Some(&format!("bytes={many}")), 10), part(0, 1));
        let too_many = vec!["0-0"; MAX_RANGES + 1].join(",");
        assert_eq!(wanted_range(Some(&format!("bytes={too_many}")), 10), Wanted::Full);
    }

    #[test]
    fn byteranges_length_counts_every_byte() {
        let parts = [(0, 2), (5, 10)];
        let f = ByteRanges::new(&parts, "text/plain", 10);
        let mut body = String::new();
        for (head, (s, e)) in f.heads.iter().zip(parts) {
            body.push_str(head);
            body.push_str(&"x".repeat((e - s) as usize));
        }
        body.push_str(&f.tail);
        assert_eq!(f.content_length(&parts), body.len() as u64);
        assert!(body.starts_with(&format!(
            "--{}\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\nxx\r\n--",
            f.boundary
        )));
        assert!(body.ends_with(&format!("xxxxx\r\n--{}--\r\n", f.boundary)));
    }

    #[test]
    fn etags() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("W/\"abc\", \"x\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }
}
