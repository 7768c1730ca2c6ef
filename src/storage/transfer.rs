//! Streamed transfers: a blob into a local file and a local file (or a result in memory) into a
//! blob, each hashed with sha256 on the way.
//!
//! Neither holds a whole blob in memory: the SDK fetches a few ranges at a time (bounded by
//! [`PARALLEL`] × [`PARTITION`]) and each chunk is written and hashed as it arrives, so the
//! daemon's memory stays flat whatever the size (bench/storage measures it). The cap is checked
//! against the blob's properties before the first byte is fetched, and again while bytes
//! arrive, in case the blob grew in between.

use std::num::NonZero;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use azure_core::http::{RequestContent, StatusCode};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders, BlobClientUploadOptions,
};
use azure_storage_blob::stream::tokio::FileStream;
use futures_core::Stream;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sas::Permission;
use super::{BlobRef, Storage, StorageError};

/// Ranges fetched (or blocks sent) at once per transfer: two.
const PARALLEL: NonZero<usize> = NonZero::<usize>::MIN.saturating_add(1);
/// Size of one range or block.
const PARTITION: usize = 4 * 1024 * 1024;

/// A blob fetched into a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub content_type: Option<String>,
}

/// A blob written: its reference, size, hash and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub blob: BlobRef,
    pub bytes: u64,
    pub sha256: String,
    pub content_type: String,
}

impl Storage {
    /// Streams `blob` into the new file `dest` (mode 0444, for the job to read), refusing it
    /// when it is missing or over `storage.max_input_mb`. On failure `dest` is removed.
    pub async fn download(&self, blob: &BlobRef, dest: &Path) -> Result<Fetched, StorageError> {
        let result = self.download_inner(blob, dest).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        result
    }

    async fn download_inner(&self, blob: &BlobRef, dest: &Path) -> Result<Fetched, StorageError> {
        let client = self.client(blob, Permission::Read)?;
        let remote = |e: azure_core::Error| self.classify(blob, e);
        let props = client.get_properties(None).await.map_err(remote)?;
        let size = props.content_length().ok().flatten().unwrap_or(0);
        let too_large = |bytes| StorageError::TooLarge {
            path: blob.path(),
            bytes,
            cap_mb: self.max_input_mb,
        };
        if size > self.max_input_bytes {
            return Err(too_large(size));
        }
        let etag = props.etag().ok().flatten();
        let content_type = props.content_type().ok().flatten();
        let options = BlobClientDownloadOptions {
            // The bytes of the version whose size was checked, or an error.
            if_match: etag,
            parallel: Some(PARALLEL),
            partition_size: NonZero::new(PARTITION),
            ..Default::default()
        };
        let mut body = client.download(Some(options)).await.map_err(remote)?.body;
        let local = |source| StorageError::Local {
            path: dest.to_path_buf(),
            source,
        };
        let mut file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create_new(true),
            0o444,
        )
        .open(dest)
        .map(tokio::fs::File::from_std)
        .map_err(local)?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_next(cx)).await {
            let chunk = chunk.map_err(remote)?;
            bytes += chunk.len() as u64;
            if bytes > self.max_input_bytes {
                return Err(too_large(bytes));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(local)?;
        }
        file.flush().await.map_err(local)?;
        file.sync_all().await.map_err(local)?;
        Ok(Fetched {
            path: dest.to_path_buf(),
            bytes,
            sha256: hex::encode(hasher.finalize()),
            content_type,
        })
    }

    /// Uploads the file at `path` as `blob`, overwriting what is there (a redelivered job
    /// writes the same names). The file is hashed first, then streamed.
    pub async fn upload_file(
        &self,
        blob: &BlobRef,
        path: &Path,
        content_type: &str,
    ) -> Result<Written, StorageError> {
        let local = |source| StorageError::Local {
            path: path.to_path_buf(),
            source,
        };
        let (bytes, sha256) = hash_file(path).await.map_err(local)?;
        let file = super::results::open_no_follow(path)
            .map(tokio::fs::File::from_std)
            .map_err(local)?;
        let stream = FileStream::builder(file)
            .build()
            .await
            .map_err(|e| self.classify(blob, e))?;
        let body: azure_core::http::Body = stream.into();
        self.put(blob, body.into(), content_type).await?;
        Ok(Written {
            blob: blob.clone(),
            bytes,
            sha256,
            content_type: content_type.to_owned(),
        })
    }

    /// Uploads `data` as `blob`, overwriting what is there.
    pub async fn upload_bytes(
        &self,
        blob: &BlobRef,
        data: Vec<u8>,
        content_type: &str,
    ) -> Result<Written, StorageError> {
        let bytes = data.len() as u64;
        let sha256 = hex::encode(Sha256::digest(&data));
        self.put(blob, RequestContent::from(data), content_type)
            .await?;
        Ok(Written {
            blob: blob.clone(),
            bytes,
            sha256,
            content_type: content_type.to_owned(),
        })
    }

    async fn put(
        &self,
        blob: &BlobRef,
        content: RequestContent<azure_core::Bytes, azure_core::http::NoFormat>,
        content_type: &str,
    ) -> Result<(), StorageError> {
        let client = self.client(blob, Permission::Write)?;
        let options = BlobClientUploadOptions {
            blob_content_type: Some(content_type.to_owned()),
            parallel: Some(PARALLEL),
            partition_size: NonZero::new(PARTITION as u64),
            ..Default::default()
        };
        client
            .upload(content, Some(options))
            .await
            .map_err(|e| match e.http_status() {
                // The results container is missing: the deployment's fault, not the job's.
                Some(StatusCode::NotFound) => StorageError::Unavailable {
                    path: blob.path(),
                    reason: format!(
                        "the container {:?} does not exist (check storage.results_container)",
                        blob.container
                    ),
                },
                _ => self.classify(blob, e),
            })?;
        Ok(())
    }

    /// A 404 on a read is the job's missing input; anything else (no connection, 5xx, a refused
    /// credential) is the daemon's problem and makes the job run again later.
    fn classify(&self, blob: &BlobRef, e: azure_core::Error) -> StorageError {
        match e.http_status() {
            Some(StatusCode::NotFound) => StorageError::NotFound { path: blob.path() },
            _ => StorageError::Unavailable {
                path: blob.path(),
                reason: crate::job::one_line(&e.to_string(), 300),
            },
        }
    }
}

/// The size and sha256 of a file (not followed if it is a link), read in 1 MiB chunks.
pub async fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = tokio::fs::File::from_std(super::results::open_no_follow(path)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok((bytes, hex::encode(hasher.finalize())));
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
}
