//! A replication connection: the PostgreSQL frontend/backend protocol over a tokio
//! socket, with `replication=database`, authentication, simple queries and CopyBoth.
//!
//! tokio-postgres cannot open such a connection (no CopyBoth), and postgres-protocol's
//! backend parser rejects CopyBothResponse, so this module frames backend messages
//! itself and uses postgres-protocol only to write frontend messages and for SCRAM.
//! It owns the socket and nothing else: no decoding of the stream, no policy.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

use crate::error::{CdcError, DbError};
use crate::tls::{MakeTls, SslMode, TlsSettings, TlsStream};

/// Largest backend message accepted (a row of the snapshot or a huge change); beyond it
/// the stream is treated as corrupt rather than allocating without bound.
const MAX_MESSAGE: usize = 1 << 30;

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    /// `tls-server-end-point` data when the socket is a TLS session.
    fn channel_binding(&self) -> Option<&[u8]> {
        None
    }
}
impl Socket for tokio::net::TcpStream {}
impl Socket for tokio::net::UnixStream {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Socket for TlsStream<S> {}

/// A socket and what the authentication needs to know about it.
struct Stream {
    socket: Box<dyn Socket>,
    binding: Option<Vec<u8>>,
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.socket).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.socket).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.socket).poll_shutdown(cx)
    }
}

impl Socket for Stream {
    fn channel_binding(&self) -> Option<&[u8]> {
        self.binding.as_deref()
    }
}

/// One backend message: its tag and body.
#[derive(Debug)]
pub struct BackendMessage {
    /// Message type byte.
    pub tag: u8,
    /// Body, without tag and length.
    pub body: Bytes,
}

/// The result of a simple query: rows of text columns (NULL is `None`).
#[derive(Debug, Default)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(i)?.as_deref()
    }
}

/// An open replication connection.
pub struct ReplConn {
    socket: Box<dyn Socket>,
    read: BytesMut,
    write: BytesMut,
    /// Backend PID, for messages and for pg_terminate_backend in tests.
    pub pid: i32,
}

/// Parses an ErrorResponse/NoticeResponse body.
pub fn parse_error(mut body: &[u8]) -> DbError {
    let mut e = DbError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
    };
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        body = rest.get(end + 1..).unwrap_or(&[]);
        match field {
            b'V' => e.severity = value,
            b'S' if e.severity.is_empty() => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            _ => {}
        }
    }
    e
}

impl ReplConn {
    /// Connects with the settings of `config` plus `replication=database`, with TLS as
    /// `tls` asks (never over a Unix socket); tries each host in turn.
    pub async fn connect(config: &tokio_postgres::Config, tls: &TlsSettings) -> Result<ReplConn, CdcError> {
        let make = tls.connector().map_err(|e| CdcError::Tls(e.0))?;
        let hosts = config.get_hosts();
        let ports = config.get_ports();
        let mut last = None;
        for (i, host) in hosts.iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let socket: Result<Box<dyn Socket>, CdcError> = match host {
                Host::Tcp(h) => match tokio::net::TcpStream::connect((h.as_str(), port)).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        Self::negotiate_tls(s, &make, h).await
                    }
                    Err(e) => Err(e.into()),
                },
                Host::Unix(dir) => tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                    .await
                    .map(|s| (Box::new(s) as Box<dyn Socket>, None))
                    .map_err(CdcError::from),
            }
            .map(|(socket, binding)| Box::new(Stream { socket, binding }) as Box<dyn Socket>);
            match socket {
                Ok(socket) => {
                    let mut conn = ReplConn {
                        socket,
                        read: BytesMut::with_capacity(64 * 1024),
                        write: BytesMut::with_capacity(1024),
                        pid: 0,
                    };
                    let connect = conn.startup(config);
                    let started = match config.get_connect_timeout() {
                        Some(t) => tokio::time::timeout(*t, connect).await.map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                        })?,
                        None => connect.await,
                    };
                    return match started {
                        Err(CdcError::Server(e))
                            if tls.mode == SslMode::Disable
                                && e.code == "28000"
                                && e.message.contains("no encryption") =>
                        {
                            Err(CdcError::Tls(format!(
                                "PostgreSQL refused a connection without TLS ({e}); the server accepts only TLS from this host: set sslmode=verify-full with sslrootcert (or sslmode=require) in the connection string"
                            )))
                        }
                        Err(e) => Err(e),
                        Ok(()) => Ok(conn),
                    };
                }
                // A TLS refusal is an answer, not an unreachable host.
                Err(e @ CdcError::Tls(_)) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            CdcError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no host to connect to",
            ))
        }))
    }

    /// SSLRequest and handshake on a fresh TCP connection, as the mode asks; returns the
    /// socket to speak on and the channel binding data of a TLS session.
    async fn negotiate_tls(
        mut tcp: tokio::net::TcpStream,
        make: &MakeTls,
        host: &str,
    ) -> Result<(Box<dyn Socket>, Option<Vec<u8>>), CdcError> {
        if !make.enabled() {
            return Ok((Box::new(tcp), None));
        }
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await?;
        let answer = tcp.read_u8().await?;
        match answer {
            b'S' => {
                let tls = make.handshake(tcp, host).await.map_err(|e| CdcError::Tls(e.0))?;
                let binding = tls.server_end_point();
                Ok((Box::new(tls), binding))
            }
            b'N' if make.mode() == SslMode::Prefer => Ok((Box::new(tcp), None)),
            b'N' => Err(CdcError::Tls(format!(
                "the server at {host:?} does not accept TLS connections, and sslmode={} requires TLS; turn ssl on in postgresql.conf, or use sslmode=prefer or disable",
                make.mode().as_str()
            ))),
            other => Err(CdcError::Protocol(format!(
                "unexpected answer {:?} to the TLS request",
                other as char
            ))),
        }
    }

    async fn startup(&mut self, config: &tokio_postgres::Config) -> Result<(), CdcError> {
        let user = config
            .get_user()
            .ok_or_else(|| CdcError::Auth("no user given in the connection string".into()))?
            .to_string();
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &user),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
            // The walsender prints values with these settings; the value parser relies on them.
            ("DateStyle", "ISO, YMD"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
            ("bytea_output", "hex"),
            (
                "application_name",
                config.get_application_name().unwrap_or("pulsed"),
            ),
        ];
        if let Some(db) = config.get_dbname() {
            params.push(("database", db));
        }
        if let Some(options) = config.get_options() {
            params.push(("options", options));
        }
        frontend::startup_message(params.iter().copied(), &mut self.write)?;
        self.flush().await?;

        let password = config.get_password().map(|p| p.to_vec());
        let need_password = || {
            password.clone().ok_or_else(|| {
                CdcError::Auth("the server asks for a password and none was given in source.url".into())
            })
        };
        loop {
            let msg = self.next().await?;
            match msg.tag {
                b'R' => {
                    let mut body = &msg.body[..];
                    if body.len() < 4 {
                        return Err(CdcError::Protocol("short authentication message".into()));
                    }
                    let kind = body.get_i32();
                    match kind {
                        0 => {}
                        3 => {
                            let pw = need_password()?;
                            frontend::password_message(&pw, &mut self.write)?;
                            self.flush().await?;
                        }
                        5 => {
                            let pw = need_password()?;
                            if body.len() < 4 {
                                return Err(CdcError::Protocol("short MD5 salt".into()));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = md5_hash(user.as_bytes(), &pw, salt);
                            frontend::password_message(hash.as_bytes(), &mut self.write)?;
                            self.flush().await?;
                        }
                        10 => {
                            let pw = need_password()?;
                            let mechanisms: Vec<&[u8]> =
                                body.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                            let binding = self.socket.channel_binding().map(|b| b.to_vec());
                            match binding {
                                Some(b) if mechanisms.contains(&sasl::SCRAM_SHA_256_PLUS.as_bytes()) => {
                                    self.scram(
                                        &pw,
                                        sasl::SCRAM_SHA_256_PLUS,
                                        sasl::ChannelBinding::tls_server_end_point(b),
                                    )
                                    .await?
                                }
                                _ if mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes()) => {
                                    // Over TLS, "n" (no binding) rather than "y": a server that
                                    // could bind would take "y" for a downgrade.
                                    self.scram(&pw, sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported())
                                        .await?
                                }
                                _ => {
                                    return Err(CdcError::Auth(
                                        "the server offers no SASL mechanism this client supports (SCRAM-SHA-256, SCRAM-SHA-256-PLUS)".into(),
                                    ));
                                }
                            }
                        }
                        other => {
                            return Err(CdcError::Auth(format!(
                                "authentication method {other} is not supported (trust, password, md5 and scram-sha-256 are)"
                            )));
                        }
                    }
                }
                b'K' => {
                    if msg.body.len() >= 4 {
                        self.pid = (&msg.body[..4]).get_i32();
                    }
                }
                b'S' | b'N' => {}
                b'E' => return Err(CdcError::Server(parse_error(&msg.body))),
                b'Z' => return Ok(()),
                t => {
                    return Err(CdcError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        t as char
                    )));
                }
            }
        }
    }

    async fn scram(
        &mut self,
        password: &[u8],
        mechanism: &str,
        binding: sasl::ChannelBinding,
    ) -> Result<(), CdcError> {
        let mut scram = sasl::ScramSha256::new(password, binding);
        frontend::sasl_initial_response(mechanism, scram.message(), &mut self.write)?;
        self.flush().await?;
        let step = |msg: BackendMessage, want: i32| -> Result<Bytes, CdcError> {
            match msg.tag {
                b'E' => Err(CdcError::Server(parse_error(&msg.body))),
                b'R' if msg.body.len() >= 4 && (&msg.body[..4]).get_i32() == want => Ok(msg.body.slice(4..)),
                _ => Err(CdcError::Protocol("unexpected message during SCRAM".into())),
            }
        };
        let cont = step(self.next().await?, 11)?;
        scram
            .update(&cont)
            .map_err(|e| CdcError::Auth(format!("SCRAM: {e}")))?;
        frontend::sasl_response(scram.message(), &mut self.write)?;
        self.flush().await?;
        let fin = step(self.next().await?, 12)?;
        scram
            .finish(&fin)
            .map_err(|e| CdcError::Auth(format!("SCRAM server signature: {e}")))?;
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        self.socket.flush().await
    }

    /// Reads the next backend message.
    pub async fn next(&mut self) -> Result<BackendMessage, CdcError> {
        loop {
            if self.read.len() >= 5 {
                let len = (&self.read[1..5]).get_i32();
                if len < 4 || len as usize > MAX_MESSAGE {
                    return Err(CdcError::Protocol(format!("invalid message length {len}")));
                }
                let total = 1 + len as usize;
                if self.read.len() >= total {
                    let mut frame = self.read.split_to(total).freeze();
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok(BackendMessage { tag, body: frame });
                }
                self.read.reserve(total - self.read.len());
            }
            // Read in large chunks: a nearly full buffer would otherwise turn every small
            // message into a system call of its own.
            if self.read.capacity() - self.read.len() < 16 * 1024 {
                self.read.reserve(128 * 1024);
            }
            let n = self.socket.read_buf(&mut self.read).await?;
            if n == 0 {
                return Err(CdcError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the replication connection",
                )));
            }
        }
    }

    /// Runs a simple query and collects its (last) result set.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, CdcError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            let msg = self.next().await?;
            match msg.tag {
                b'T' => {
                    result = QueryResult::default();
                    let mut b = &msg.body[..];
                    let n = read_i16(&mut b)?;
                    for _ in 0..n {
                        result.columns.push(read_cstr(&mut b)?);
                        if b.len() < 18 {
                            return Err(CdcError::Protocol("short RowDescription".into()));
                        }
                        b.advance(18);
                    }
                }
                b'D' => {
                    let mut b = &msg.body[..];
                    let n = read_i16(&mut b)?;
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n {
                        let len = read_i32(&mut b)?;
                        if len < 0 {
                            row.push(None);
                        } else {
                            let len = len as usize;
                            if b.len() < len {
                                return Err(CdcError::Protocol("short DataRow".into()));
                            }
                            row.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
                            b.advance(len);
                        }
                    }
                    result.rows.push(row);
                }
                b'E' => error = Some(parse_error(&msg.body)),
                b'Z' => {
                    return match error {
                        Some(e) => Err(CdcError::Server(e)),
                        None => Ok(result),
                    };
                }
                _ => {}
            }
        }
    }

    /// Sends a command that answers with CopyBothResponse (START_REPLICATION) and waits
    /// for that answer.
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<(), CdcError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        loop {
            let msg = self.next().await?;
            match msg.tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = parse_error(&msg.body);
                    // Drain to ReadyForQuery so the error is the whole story.
                    loop {
                        if self.next().await?.tag == b'Z' {
                            break;
                        }
                    }
                    return Err(CdcError::Server(e));
                }
                b'N' | b'S' => {}
                t => {
                    return Err(CdcError::Protocol(format!(
                        "expected CopyBothResponse, got {:?}",
                        t as char
                    )));
                }
            }
        }
    }

    /// The next CopyData payload of the stream; `None` when the server ended the copy.
    pub async fn read_copy(&mut self) -> Result<Option<Bytes>, CdcError> {
        loop {
            let msg = self.next().await?;
            match msg.tag {
                b'd' => return Ok(Some(msg.body)),
                b'c' => return Ok(None),
                b'E' => return Err(CdcError::Server(parse_error(&msg.body))),
                b'N' | b'S' => {}
                t => {
                    return Err(CdcError::Protocol(format!(
                        "unexpected message {:?} in the replication stream",
                        t as char
                    )));
                }
            }
        }
    }

    /// A CopyData payload already complete in the read buffer, without waiting for the
    /// socket; `None` when there is none (or the next message is not CopyData: the
    /// awaiting [`ReplConn::read_copy`] handles that one). Lets the reader work through
    /// a burst of messages without a trip through the scheduler for each.
    pub fn buffered_copy(&mut self) -> Option<Bytes> {
        loop {
            if self.read.len() < 5 {
                return None;
            }
            let len = (&self.read[1..5]).get_i32();
            if len < 4 || len as usize > MAX_MESSAGE || self.read.len() < 1 + len as usize {
                return None;
            }
            match self.read[0] {
                b'd' => {
                    let mut frame = self.read.split_to(1 + len as usize).freeze();
                    frame.advance(5);
                    return Some(frame);
                }
                b'N' | b'S' => self.read.advance(1 + len as usize),
                _ => return None,
            }
        }
    }

    /// Sends one CopyData message.
    pub async fn send_copy(&mut self, payload: &[u8]) -> Result<(), CdcError> {
        frontend::CopyData::new(payload)?.write(&mut self.write);
        self.flush().await?;
        Ok(())
    }

    /// Ends the copy and the session, politely; errors are irrelevant at this point.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.write);
        frontend::terminate(&mut self.write);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.flush()).await;
    }
}

fn read_i16(b: &mut &[u8]) -> Result<i16, CdcError> {
    if b.len() < 2 {
        return Err(CdcError::Protocol("short message".into()));
    }
    Ok(b.get_i16())
}

fn read_i32(b: &mut &[u8]) -> Result<i32, CdcError> {
    if b.len() < 4 {
        return Err(CdcError::Protocol("short message".into()));
    }
    Ok(b.get_i32())
}

fn read_cstr(b: &mut &[u8]) -> Result<String, CdcError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| CdcError::Protocol("unterminated string".into()))?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

/// A standby status update ('r'): positions written, flushed and applied.
pub fn standby_status(write: u64, flush: u64, apply: u64, now_micros: i64, reply: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(write);
    b.put_u64(flush);
    b.put_u64(apply);
    b.put_i64(now_micros);
    b.put_u8(reply as u8);
    b
}
