//! TLS for connections to PostgreSQL, with libpq's meaning of `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey`, for the replication connection ([`crate::conn::ReplConn`]) and
//! for ordinary tokio-postgres connections and pools ([`MakeTls`]), so that one
//! connection string works for both.
//!
//! tokio-postgres parses only `disable`, `prefer` and `require` and rejects the other
//! TLS keys, so [`parse_url`] takes them out of the string first and keeps them in
//! [`TlsSettings`]. Modes, as in libpq:
//! - `disable`: plain TCP.
//! - `prefer` (the default): TLS when the server offers it, without verification.
//! - `require`: TLS or nothing; the certificate is verified as with `verify-ca` when a
//!   root certificate is given (`sslrootcert` or `~/.postgresql/root.crt`), not otherwise.
//! - `verify-ca`: TLS with a certificate chain to a trusted root.
//! - `verify-full`: as `verify-ca`, and the certificate names the host connected to.
//!
//! `sslrootcert=system` trusts the operating system's roots. TLS is never attempted over
//! a Unix socket (as libpq). The crypto provider is aws-lc-rs.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode`, less `allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unverified.
    #[default]
    Prefer,
    /// TLS or fail; verified against a root certificate only when one is given.
    Require,
    /// TLS with a verified chain.
    VerifyCa,
    /// TLS with a verified chain and host name.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported; use sslmode=prefer (TLS when offered) or sslmode=disable".into(),
                );
            }
            other => {
                return Err(format!(
                    "invalid sslmode {other:?}; use disable, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }

    /// The name in connection strings.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file of trusted roots, or `system`.
    pub root_cert: Option<String>,
    /// `sslcert`: the client certificate (PEM), for `cert` authentication.
    pub cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

/// A TLS setting that cannot be used; the message says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Parses a connection string (URL or `key=value` pairs): the tokio-postgres settings
/// and the TLS settings. The `sslmode` tokio-postgres sees is `disable`, `prefer` or
/// `require` (the verification is [`MakeTls`]'s).
pub fn parse_url(raw: &str) -> Result<(tokio_postgres::Config, TlsSettings), String> {
    let mut tls = TlsSettings::default();
    let mut take = |key: &str, value: String| -> Result<(), String> {
        match key {
            "sslmode" => tls.mode = SslMode::parse(&value)?,
            "sslrootcert" => tls.root_cert = Some(value),
            "sslcert" => tls.cert = Some(PathBuf::from(value)),
            "sslkey" => tls.key = Some(PathBuf::from(value)),
            _ => {}
        }
        Ok(())
    };
    let rest = if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        match raw.split_once('?') {
            None => raw.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let key = decode(k);
                    if TLS_KEYS.contains(&key.as_str()) {
                        take(&key, decode(v))?;
                    } else {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v) in split_pairs(raw)? {
            if TLS_KEYS.contains(&k.as_str()) {
                take(&k, v)?;
            } else {
                kept.push(format!("{k}={}", quote(&v)));
            }
        }
        kept.join(" ")
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    let only_sockets = !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    config.ssl_mode(match tls.mode {
        // TLS is never attempted over a Unix socket.
        _ if only_sockets => tokio_postgres::config::SslMode::Disable,
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok((config, tls))
}

fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Splits `key=value key='quoted value'` pairs as libpq does.
fn split_pairs(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = raw.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after {key:?} in the connection string"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "unterminated quoted value of {key:?} in the connection string"
                        ));
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn quote(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

impl TlsSettings {
    /// The settings tokio-postgres would assume for `config` alone (its `sslmode`).
    pub fn from_config(config: &tokio_postgres::Config) -> TlsSettings {
        TlsSettings {
            mode: match config.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                tokio_postgres::config::SslMode::Require => SslMode::Require,
                _ => SslMode::Prefer,
            },
            ..TlsSettings::default()
        }
    }

    fn default_root() -> Option<PathBuf> {
        let home = std::env::var_os("HOME")?;
        let p = Path::new(&home).join(".postgresql/root.crt");
        p.exists().then_some(p)
    }

    /// The connector for these settings; reads the certificate files now.
    pub fn connector(&self) -> Result<MakeTls, TlsError> {
        if self.mode == SslMode::Disable {
            return Ok(MakeTls {
                mode: self.mode,
                config: None,
            });
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let root = match &self.root_cert {
            Some(r) => Some(r.clone()),
            None => Self::default_root().map(|p| p.display().to_string()),
        };
        let check = match self.mode {
            SslMode::VerifyFull => Check::ChainAndName,
            SslMode::VerifyCa => Check::Chain,
            SslMode::Require if root.is_some() => Check::Chain,
            _ => Check::Nothing,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS set-up: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = if check == Check::Nothing {
            Arc::new(Lenient {
                provider,
                chain: None,
            })
        } else {
            let roots = self.roots(root.as_deref())?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError(format!("sslrootcert: {e}")))?;
            if check == Check::Chain {
                Arc::new(Lenient {
                    provider,
                    chain: Some(webpki),
                })
            } else {
                webpki
            }
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        let config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<_, _>>())
                    .map_err(|e| {
                        TlsError(format!(
                            "sslcert {}: {e}; give a PEM certificate file",
                            cert.display()
                        ))
                    })?;
                if chain.is_empty() {
                    return Err(TlsError(format!(
                        "sslcert {}: no certificate in the file",
                        cert.display()
                    )));
                }
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    TlsError(format!(
                        "sslkey {}: {e}; give a PEM private key file",
                        key.display()
                    ))
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError(format!("sslcert/sslkey: {e}")))?
            }
            _ => {
                return Err(TlsError(
                    "sslcert and sslkey go together: give both (or neither) in the connection string".into(),
                ));
            }
        };
        Ok(MakeTls {
            mode: self.mode,
            config: Some(Arc::new(config)),
        })
    }

    fn roots(&self, root: Option<&str>) -> Result<RootCertStore, TlsError> {
        let mut store = RootCertStore::empty();
        match root {
            None => {
                return Err(TlsError(format!(
                    "sslmode={} needs the certificate of the authority that signed the server's certificate: \
                     add sslrootcert=/path/to/root.crt to the connection string (or sslrootcert=system for the \
                     system's trusted roots), or put it in ~/.postgresql/root.crt",
                    self.mode.as_str()
                )));
            }
            Some("system") => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = store.add(cert);
                }
                if store.is_empty() {
                    return Err(TlsError(
                        "sslrootcert=system: no trusted root certificates found on this system; install ca-certificates or give sslrootcert=/path/to/root.crt".into(),
                    ));
                }
            }
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<_, _>>())
                    .map_err(|e| {
                        TlsError(format!(
                            "sslrootcert {path}: {e}; give the PEM file of the certificate authority that signed the server's certificate"
                        ))
                    })?;
                for cert in certs {
                    store
                        .add(cert)
                        .map_err(|e| TlsError(format!("sslrootcert {path}: {e}")))?;
                }
                if store.is_empty() {
                    return Err(TlsError(format!(
                        "sslrootcert {path}: no certificate in the file"
                    )));
                }
            }
        }
        Ok(store)
    }
}

/// Explains a failed handshake, with what to do.
pub fn explain_handshake(err: &io::Error, mode: SslMode, host: &str) -> String {
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned();
    match inner {
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            format!(
                "TLS: the server's certificate is not valid for host {host:?} (sslmode={}); connect with the host name the \
             certificate was issued for, or use sslmode=verify-ca to check the chain only",
                mode.as_str()
            )
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
        | Some(rustls::Error::InvalidCertificate(CertificateError::BadSignature)) => format!(
            "TLS: the server's certificate is not signed by a trusted authority (sslmode={}); set sslrootcert to the \
             certificate of the authority that signed it",
            mode.as_str()
        ),
        Some(rustls::Error::InvalidCertificate(e)) => format!(
            "TLS: the server's certificate was refused ({e:?}, sslmode={}); check the server's certificate and sslrootcert",
            mode.as_str()
        ),
        _ => format!("TLS handshake with {host:?} failed: {err}"),
    }
}

/// What to do about a failed tokio-postgres connection, when TLS is the cause: a
/// server that accepts only TLS, a server without TLS, a refused certificate.
pub fn tls_hint(e: &tokio_postgres::Error, tls: &TlsSettings) -> Option<String> {
    if let Some(db) = e.as_db_error() {
        if db.code().code() == "28000" && db.message().contains("no encryption") {
            return Some(format!(
                "PostgreSQL refused a connection without TLS ({}); the server accepts only TLS from this host: \
                 set sslmode=verify-full with sslrootcert (or sslmode=require) in the connection string",
                db.message()
            ));
        }
        return None;
    }
    let text = e.to_string();
    if text.contains("server does not support TLS") {
        return Some(format!(
            "the server does not accept TLS connections, and sslmode={} requires TLS; turn ssl on in \
             postgresql.conf, or use sslmode=prefer or disable",
            tls.mode.as_str()
        ));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<TlsError>() {
            return Some(t.0.clone());
        }
        source = s.source();
    }
    None
}

/// A failed catalog connection as a [`CdcError`]: TLS causes become
/// [`CdcError::Tls`] with what to do.
pub fn explain_connect_error(e: tokio_postgres::Error, tls: &TlsSettings) -> crate::CdcError {
    match tls_hint(&e, tls) {
        Some(hint) => crate::CdcError::Tls(hint),
        None => crate::CdcError::Catalog(e),
    }
}

/// The verifier of the modes that do not check the name: the chain only (`verify-ca`,
/// and `require` with a root), or nothing (`prefer`, and `require` without a root). The
/// handshake signatures are checked either way.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    /// The chain check, if any.
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The chain is checked before the name, so a name error means a good chain.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    // The chain check's own signature checks use the same provider's algorithms.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Makes TLS connectors for tokio-postgres (connections, pools) from [`TlsSettings`].
#[derive(Clone)]
pub struct MakeTls {
    mode: SslMode,
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for MakeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MakeTls({})", self.mode.as_str())
    }
}

impl MakeTls {
    /// A handshake on `stream` with `host`; the error says what to do.
    pub async fn handshake<S>(&self, stream: S, host: &str) -> Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self
            .config
            .clone()
            .ok_or_else(|| TlsError("TLS is disabled (sslmode=disable)".into()))?;
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            TlsError(format!(
                "TLS: {host:?} is not a valid host name for the handshake"
            ))
        })?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map(|s| TlsStream(Box::new(s)))
            .map_err(|e| TlsError(explain_handshake(&e, self.mode, host)))
    }

    /// Whether TLS is to be attempted at all.
    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// The `sslmode`.
    pub fn mode(&self) -> SslMode {
        self.mode
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = TlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<TlsConnect, TlsError> {
        Ok(TlsConnect {
            make: self.clone(),
            host: domain.to_string(),
        })
    }
}

/// One handshake for tokio-postgres.
pub struct TlsConnect {
    make: MakeTls,
    host: String,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for TlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { self.make.handshake(stream, &self.host).await })
    }
}

/// A TLS session over `S`.
pub struct TlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S> TlsStream<S> {
    /// `tls-server-end-point` channel binding data (RFC 5929): a hash of the server's
    /// certificate, SHA-256 unless the certificate is signed with SHA-384 or SHA-512.
    /// `None` when there is no certificate or its signature has no hash (Ed25519).
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        let (_, session) = self.0.get_ref();
        let cert = session.peer_certificates()?.first()?;
        Some(match signature_hash(cert.as_ref())? {
            Hash::Sha256 => sha2::Sha256::digest(cert.as_ref()).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(cert.as_ref()).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(cert.as_ref()).to_vec(),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.server_end_point() {
            Some(h) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(h),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// The hash of a DER certificate's signature algorithm, for channel binding: SHA-384
/// and SHA-512 as named, SHA-256 for every other hashed algorithm (MD5 and SHA-1 map
/// to SHA-256 too), `None` for EdDSA.
fn signature_hash(der: &[u8]) -> Option<Hash> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let (tag, body, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_tbs) = tlv(body)?;
    let (tag, alg, _) = tlv(after_tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, params) = tlv(alg)?;
    if tag != 0x06 {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    const ED448: &[u8] = &[0x2b, 0x65, 0x71];
    if oid == ED25519 || oid == ED448 {
        return None;
    }
    Some(match oid {
        [p @ .., 12] if p == RSA => Hash::Sha384,
        [p @ .., 13] if p == RSA => Hash::Sha512,
        [p @ .., 3] if p == ECDSA => Hash::Sha384,
        [p @ .., 4] if p == ECDSA => Hash::Sha512,
        // RSASSA-PSS names its hash in the parameters; SHA-384/512 OIDs end in 2 and 3.
        [p @ .., 10] if p == RSA => {
            let text = params;
            let sha = [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02];
            match text.windows(9).find(|w| w[..8] == sha).map(|w| w[8]) {
                Some(2) => Hash::Sha384,
                Some(3) => Hash::Sha512,
                _ => Hash::Sha256,
            }
        }
        _ => Hash::Sha256,
    })
}

/// One DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &d| (a << 8) | d as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_tls_keys_and_keep_the_rest() {
        let (c, t) = parse_url(
            "postgres://u:p@db.example:6543/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(t.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(t.key, Some(PathBuf::from("/k.pem")));
        assert_eq!(c.get_application_name(), Some("x"));
        assert_eq!(c.get_dbname(), Some("app"));
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);

        let (c, t) = parse_url("postgres://u@h/d").unwrap();
        assert_eq!(t.mode, SslMode::Prefer);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);

        let (c, t) = parse_url("postgres://u@h/d?sslmode=disable").unwrap();
        assert_eq!(t.mode, SslMode::Disable);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn key_value_strings_keep_quoted_values() {
        let (c, t) = parse_url(
            "host=h user=u password='it\\'s a secret' sslmode = verify-ca sslrootcert='/my certs/ca.pem' dbname=d",
        )
        .unwrap();
        assert_eq!(t.mode, SslMode::VerifyCa);
        assert_eq!(t.root_cert.as_deref(), Some("/my certs/ca.pem"));
        assert_eq!(c.get_password(), Some(&b"it's a secret"[..]));
        assert_eq!(c.get_dbname(), Some("d"));
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn bad_modes_and_missing_roots_say_what_to_do() {
        let e = parse_url("postgres://u@h/d?sslmode=allow").unwrap_err();
        assert!(e.contains("use sslmode=prefer"), "{e}");
        let e = parse_url("postgres://u@h/d?sslmode=verify").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        let t = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
            ..TlsSettings::default()
        };
        let e = t.connector().unwrap_err().0;
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
        let t = TlsSettings {
            mode: SslMode::Require,
            cert: Some("/c.pem".into()),
            ..TlsSettings::default()
        };
        assert!(t.connector().unwrap_err().0.contains("go together"));
    }

    #[test]
    fn unix_sockets_never_ask_for_tls() {
        let (c, _) = parse_url("host=/run/postgresql user=u sslmode=require").unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn der_walker_survives_garbage() {
        assert_eq!(signature_hash(&[]), None);
        assert_eq!(signature_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(signature_hash(&[0x30, 0x03, 0x30, 0x01]), None);
    }
}
