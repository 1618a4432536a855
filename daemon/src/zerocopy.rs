//! Zero-copy file downloads under hyper: `sendfile(2)` from the page cache to the socket.
//!
//! hyper writes a response body from `Bytes` it is handed, so a body cannot say "these
//! bytes are in that file". This module gets around that without forking hyper:
//!
//! - [`map_range`] maps a range of a local file read-only (`mmap`, nothing read) and
//!   returns it as one `Bytes`, whose address range it records in a registry together
//!   with the file and the offset;
//! - [`ZeroCopyListener`] accepts TCP connections as [`ZeroCopyStream`]s. When hyper
//!   asks such a stream to write a slice that lies inside a registered mapping, the stream
//!   calls `sendfile` on the file instead of copying the mapped memory into the socket.
//!
//! The mapping holds exactly the bytes the registry points at, so any other consumer (the
//! decryption path, a test, a writer that is not a [`ZeroCopyStream`]) reads the same
//! bytes through ordinary page faults: the registry is an optimisation, never needed for
//! correctness. A mapping leaves the registry before it is unmapped, when the last
//! `Bytes` that refers to it is dropped, so a live slice always finds its own entry.
//!
//! Stored objects are written once and renamed into place (never modified), and
//! [`map_range`] refuses a file shorter than the range, so touching a mapped page cannot
//! fault past the end of the file.
//!
//! This is the only module of the workspace allowed `unsafe`: `mmap`, `munmap` and the
//! slice over the mapping, each with its reason beside it.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Slices shorter than this are written by copying (one lookup is not worth it).
const MIN_SENDFILE: usize = 4096;

/// Where a registered mapping's bytes come from.
struct Region {
    len: usize,
    file: Arc<File>,
    offset: u64,
}

/// Registered mappings by start address.
static REGIONS: LazyLock<RwLock<BTreeMap<usize, Region>>> = LazyLock::new(Default::default);
/// How many mappings are registered: while none is, writes skip the lookup.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Bytes sent with `sendfile` since start (exported as a metric; tests read it).
static SENT: AtomicU64 = AtomicU64::new(0);

/// Bytes written to sockets by `sendfile` since the process started.
pub fn sendfile_bytes() -> u64 {
    SENT.load(Ordering::Relaxed)
}

fn page_size() -> u64 {
    static PAGE: LazyLock<u64> = LazyLock::new(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as u64)
    });
    *PAGE
}

/// A read-only mapping of part of a file, registered while it lives.
struct Mapping {
    base: NonNull<std::ffi::c_void>,
    map_len: usize,
    data: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone; the pointers are only
// read from, from any thread, until Drop unmaps them.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `data..data+len` lies inside the live mapping, which `map_range` checked
        // the file covers.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let removed = REGIONS
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.data as usize));
        if removed.is_some() {
            LIVE.fetch_sub(1, Ordering::Relaxed);
        }
        // SAFETY: `base`/`map_len` are exactly what mmap returned; no slice of the mapping
        // outlives this value (every `Bytes` pointing into it has been dropped).
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.base, self.map_len) } {
            tracing::warn!(error = %e, "munmap failed");
        }
    }
}

/// Bytes `range` of `file` as one `Bytes` backed by a read-only mapping, registered for
/// [`ZeroCopyStream`]. Fails with [`io::ErrorKind::UnexpectedEof`] when the file is
/// shorter than `range.end`, and with the system's error when it cannot be mapped (a
/// file system without shared mappings); the caller can then read it instead.
pub fn map_range(file: &File, range: std::ops::Range<u64>) -> io::Result<Bytes> {
    let size = file.metadata()?.len();
    if size < range.end {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the stored file is shorter than its metadata says ({size} bytes, {} wanted)",
                range.end
            ),
        ));
    }
    let Some(len) = NonZeroUsize::new((range.end - range.start) as usize) else {
        return Ok(Bytes::new());
    };
    let base_offset = range.start - range.start % page_size();
    let lead = (range.start - base_offset) as usize;
    let map_len = NonZeroUsize::new(lead + len.get()).expect("non-zero");
    // SAFETY: a fresh read-only shared mapping; the file is a stored object, written once
    // and renamed into place, and covers the whole range (checked above).
    let base = unsafe {
        nix::sys::mman::mmap(
            None,
            map_len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            file,
            base_offset as i64,
        )
    }
    .map_err(io::Error::from)?;
    // The registry's own handle (the caller keeps its own); on failure, unmap again.
    let file = match file.try_clone() {
        Ok(f) => f,
        Err(e) => {
            // SAFETY: just mapped, and nothing points into it yet.
            let _ = unsafe { nix::sys::mman::munmap(base, map_len.get()) };
            return Err(e);
        }
    };
    // SAFETY: `lead < map_len`.
    let data = unsafe { base.as_ptr().cast::<u8>().add(lead) }.cast_const();
    {
        let mut regions = REGIONS.write().unwrap_or_else(|e| e.into_inner());
        regions.insert(
            data as usize,
            Region {
                len: len.get(),
                file: Arc::new(file),
                offset: range.start,
            },
        );
        LIVE.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Bytes::from_owner(Mapping {
        base,
        map_len: map_len.get(),
        data,
        len: len.get(),
    }))
}

/// The file and offset behind `slice`, when it lies inside a registered mapping.
fn lookup(slice: &[u8]) -> Option<(Arc<File>, u64)> {
    let start = slice.as_ptr() as usize;
    let regions = REGIONS.read().unwrap_or_else(|e| e.into_inner());
    let (&base, region) = regions.range(..=start).next_back()?;
    let inside = start - base;
    (inside + slice.len() <= region.len).then(|| (region.file.clone(), region.offset + inside as u64))
}

/// A TCP connection whose writes of mapped file ranges go out with `sendfile`.
#[derive(Debug)]
pub struct ZeroCopyStream {
    tcp: TcpStream,
}

impl ZeroCopyStream {
    /// Wraps an accepted connection.
    pub fn new(tcp: TcpStream) -> ZeroCopyStream {
        ZeroCopyStream { tcp }
    }

    /// The connection, for socket options.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let mut off = offset as i64;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile64(&self.tcp, file, Some(&mut off), len).map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stored file ended before the bytes promised",
                    )));
                }
                Ok(n) => {
                    SENT.fetch_add(n as u64, Ordering::Relaxed);
                    metrics::counter!("pulse_files_sendfile_bytes_total").increment(n as u64);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if LIVE.load(Ordering::Relaxed) > 0 {
            for (i, b) in bufs.iter().enumerate() {
                if b.len() < MIN_SENDFILE {
                    continue;
                }
                if let Some((file, offset)) = lookup(b) {
                    if i > 0 {
                        // What comes before (headers, a part's head) first; hyper calls
                        // again for the rest.
                        return Pin::new(&mut this.tcp).poll_write_vectored(cx, &bufs[..i]);
                    }
                    return this.poll_sendfile(cx, &file, offset, b.len());
                }
            }
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper then queues body chunks as they are instead of copying them into its own
        // buffer, so their addresses reach `poll_write_vectored`.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A TCP listener for `axum::serve` whose connections are [`ZeroCopyStream`]s.
#[derive(Debug)]
pub struct ZeroCopyListener(pub TcpListener);

impl axum::serve::Listener for ZeroCopyListener {
    type Io = ZeroCopyStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (ZeroCopyStream::new(tcp), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn stored(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        (dir, path, data)
    }

    #[test]
    fn mapped_ranges_hold_exactly_the_file_bytes_and_a_short_file_is_refused() {
        let (_dir, path, data) = stored(3 * 4096 + 123);
        let len = data.len() as u64;
        let live = LIVE.load(Ordering::Relaxed);
        for range in [0..len, 1..len - 1, 4095..4097, 5..6, 0..0, len..len] {
            let b = map_range(&File::open(&path).unwrap(), range.clone()).unwrap();
            assert_eq!(
                &b[..],
                &data[range.start as usize..range.end as usize],
                "{range:?}"
            );
        }
        let err = map_range(&File::open(&path).unwrap(), 10..len + 5).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("shorter"), "{err}");
        // A file that cannot be mapped (here: open for writing only) fails with another
        // kind, which tells the caller to read it instead.
        let write_only = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let err = map_range(&write_only, 0..len).unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        // Every mapping left the registry with its last reference.
        assert!(LIVE.load(Ordering::Relaxed) <= live);
    }

    #[tokio::test]
    async fn a_mapped_body_goes_out_by_sendfile_byte_for_byte() {
        let (_dir, path, data) = stored(5 * 1024 * 1024 + 17);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let mut peer = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = ZeroCopyStream::new(tcp);
        let start = 1000u64;
        let body = map_range(&File::open(&path).unwrap(), start..data.len() as u64).unwrap();
        let before = sendfile_bytes();
        // A header, then the mapped body: what hyper hands over.
        let mut parts = [Bytes::from_static(b"HEAD\r\n"), body.clone()];
        loop {
            let slices: Vec<IoSlice<'_>> = parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| IoSlice::new(p))
                .collect();
            if slices.is_empty() {
                break;
            }
            let mut n = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &slices))
                .await
                .unwrap();
            for p in parts.iter_mut() {
                let k = n.min(p.len());
                bytes::Buf::advance(p, k);
                n -= k;
            }
        }
        stream.shutdown().await.unwrap();
        drop(stream);
        let got = reader.await.unwrap();
        assert_eq!(&got[..6], b"HEAD\r\n");
        assert!(
            got[6..] == data[start as usize..],
            "the body differs from the file"
        );
        // Other tests may send at the same time; at least this body went by sendfile.
        // (a tail shorter than MIN_SENDFILE may have been copied).
        assert!(sendfile_bytes() - before >= (body.len() - MIN_SENDFILE) as u64);
    }
}
