//! The storage backends, through `object_store`: a local directory (fsync on) or an
//! S3-compatible bucket. Uploads are first staged in a local file (hashed and, when on,
//! encrypted on the way), because the storage key is the content's SHA-256, known only at
//! the end; [`Backend::commit`] then moves the staged file into place.
//!
//! This module knows nothing of tenants, tickets or quotas; it must never hold a whole
//! file in memory.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart,
};
use tokio::io::AsyncReadExt;

use crate::config::StorageConfig;

/// Bytes read from disk per chunk when serving and committing.
const READ_CHUNK: usize = 256 * 1024;
/// S3 multipart part size (S3 needs at least 5 MiB per part but the last).
const PART: usize = 8 * 1024 * 1024;

/// A storage failure, with the backend's own words.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object is not there.
    #[error("object {0} is missing from storage")]
    Missing(String),
    /// Anything else.
    #[error("storage: {0}")]
    Backend(String),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => StoreError::Missing(path),
            e => StoreError::Backend(e.to_string()),
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Where objects live.
#[derive(Debug, Clone)]
pub struct Backend {
    store: Arc<dyn ObjectStore>,
    /// The directory of the local store (`None` for S3): commits rename into it.
    local_root: Option<PathBuf>,
    /// Where uploads are staged before they are committed.
    staging: PathBuf,
    /// A short name for logs and metrics.
    pub kind: &'static str,
}

impl Backend {
    /// Opens the backend the configuration names, creating the local folders.
    pub fn open(config: &StorageConfig) -> Result<Backend, StoreError> {
        match config {
            StorageConfig::Local { path } => {
                std::fs::create_dir_all(path).map_err(|e| {
                    StoreError::Backend(format!("cannot create storage.path {}: {e}", path.display()))
                })?;
                let root = path.canonicalize()?;
                let staging = root.join(".staging");
                std::fs::create_dir_all(&staging)?;
                let store = LocalFileSystem::new_with_prefix(&root)?;
                Ok(Backend {
                    store: Arc::new(store),
                    local_root: Some(root),
                    staging,
                    kind: "local",
                })
            }
            StorageConfig::S3 {
                endpoint,
                bucket,
                region,
                access_key_id,
                secret_access_key,
                path_style,
                staging,
            } => {
                std::fs::create_dir_all(staging).map_err(|e| {
                    StoreError::Backend(format!(
                        "cannot create the staging folder storage.path {}: {e}",
                        staging.display()
                    ))
                })?;
                let store = AmazonS3Builder::new()
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_access_key_id(access_key_id)
                    .with_secret_access_key(secret_access_key.expose())
                    .with_virtual_hosted_style_request(!path_style)
                    .build()?;
                Ok(Backend {
                    store: Arc::new(store),
                    local_root: None,
                    staging: staging.canonicalize()?,
                    kind: "s3",
                })
            }
        }
    }

    /// The folder uploads are staged in.
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// A fresh staging path.
    pub fn staging_path(&self) -> PathBuf {
        self.staging.join(format!("{}.part", uuid::Uuid::new_v4()))
    }

    /// Moves a staged (already fsynced) file to `key`; the staged file is gone afterwards.
    pub async fn commit(&self, staged: &Path, key: &str) -> Result<(), StoreError> {
        match &self.local_root {
            Some(root) => {
                let target = root.join(key);
                let dir = target.parent().expect("keys have folders").to_path_buf();
                let staged = staged.to_path_buf();
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    std::fs::create_dir_all(&dir)?;
                    std::fs::rename(&staged, &target)?;
                    // The rename is durable only once the folder is synced.
                    std::fs::File::open(&dir)?.sync_all()
                })
                .await
                .map_err(|e| StoreError::Backend(e.to_string()))??;
                Ok(())
            }
            None => {
                let result = self.upload_file(staged, key).await;
                let _ = tokio::fs::remove_file(staged).await;
                result
            }
        }
    }

    async fn upload_file(&self, staged: &Path, key: &str) -> Result<(), StoreError> {
        let path = ObjectPath::from(key);
        let mut file = tokio::fs::File::open(staged).await?;
        let len = file.metadata().await?.len();
        if len <= PART as u64 {
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf).await?;
            self.store.put(&path, PutPayload::from(buf)).await?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&path).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // At most two parts in flight: memory stays bounded whatever the file size.
            if let Err(e) = writer.wait_for_capacity(2).await {
                return Err(e.into());
            }
            writer.write(&buf[..n]);
        }
        match writer.finish().await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams bytes `range` (or all) of `key`, read in chunks (for callers that read
    /// the bytes themselves, such as decryption).
    pub async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        self.stream(key, range, false).await
    }

    /// Streams bytes `range` of `key` for sending to a client as they are. A local file
    /// comes back as one `Bytes` mapped from it ([`crate::zerocopy::map_range`]), which
    /// the HTTP listener sends with `sendfile`, so nothing is read into memory; other
    /// backends stream as [`Backend::get`] does.
    pub async fn serve(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        self.stream(key, Some(range), true).await
    }

    async fn stream(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        mapped: bool,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        if let Some(r) = &range
            && r.is_empty()
        {
            return Ok(futures_util::stream::empty().boxed());
        }
        let options = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..Default::default()
        };
        let result = self.store.get_opts(&ObjectPath::from(key), options).await?;
        let served = result.range.clone();
        match result.payload {
            GetResultPayload::File(file, _) if mapped => {
                match crate::zerocopy::map_range(&file, served.clone()) {
                    Ok(body) => Ok(futures_util::stream::once(std::future::ready(Ok(body))).boxed()),
                    // Short: refused before any byte of the answer goes out.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(e.into()),
                    // A file system that cannot map it: read it instead.
                    Err(e) => {
                        tracing::debug!(key, error = %e, "cannot map a stored file; reading it");
                        Ok(read_ahead(file, served).boxed())
                    }
                }
            }
            // A local file: read in large chunks (rather than object_store's small ones) on
            // a blocking thread that reads ahead of the consumer, so reading the next chunk
            // overlaps with using this one.
            GetResultPayload::File(file, _) => Ok(read_ahead(file, served).boxed()),
            GetResultPayload::Stream(s) => Ok(s.map_err(StoreError::from).boxed()),
        }
    }

    /// Reads bytes `range` of `key` whole (small reads only: headers).
    pub async fn read_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        Ok(self.store.get_range(&ObjectPath::from(key), range).await?)
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `key`; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key under `prefix` with its last modification, for the cleanup.
    pub async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>)>, StoreError> {
        let prefix = ObjectPath::from(prefix);
        self.store
            .list(Some(&prefix))
            .map_ok(|m| (m.location.to_string(), m.last_modified))
            .try_collect()
            .await
            .map_err(StoreError::from)
    }
}

/// Chunks read ahead of the consumer by [`read_ahead`].
const READ_AHEAD: usize = 4;

/// Streams `range` of a local file, read by a blocking thread up to [`READ_AHEAD`] chunks
/// ahead of the consumer. Dropping the stream stops the thread at its next chunk.
fn read_ahead(
    mut file: std::fs::File,
    range: Range<u64>,
) -> impl futures_util::Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, StoreError>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        if let Err(e) = file.seek(std::io::SeekFrom::Start(range.start)) {
            let _ = tx.blocking_send(Err(e.into()));
            return;
        }
        let mut left = range.end - range.start;
        while left > 0 {
            let want = left.min(READ_CHUNK as u64) as usize;
            // read_to_end fills the spare capacity without zeroing it first.
            let mut buf = Vec::with_capacity(want);
            if let Err(e) = (&mut file).take(want as u64).read_to_end(&mut buf) {
                let _ = tx.blocking_send(Err(e.into()));
                return;
            }
            if buf.len() < want {
                let _ = tx.blocking_send(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stored file is shorter than its metadata says",
                )
                .into()));
                return;
            }
            left -= want as u64;
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(file: std::fs::File, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        let mut stream = std::pin::pin!(read_ahead(file, range));
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn read_ahead_serves_exact_ranges_across_chunks_and_refuses_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..(READ_CHUNK * 3 + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let open = || std::fs::File::open(&path).unwrap();
        let len = data.len() as u64;
        for range in [
            0..len,
            1..len - 1,
            READ_CHUNK as u64 - 1..READ_CHUNK as u64 + 1,
            5..6,
            0..0,
        ] {
            let got = collect(open(), range.clone()).await.unwrap();
            assert_eq!(got, data[range.start as usize..range.end as usize], "{range:?}");
        }
        // Metadata promising more than the object holds is an error, not a short body.
        let err = collect(open(), 10..len + 5).await.unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
    }
}
