//! Upload parts that arrive before the route is known wait here, on disk, in one file per
//! request that is removed when the request ends, however it ends. All spool files together
//! stay within `server.spool_max_bytes`, and those of one key within its share of it
//! (`limits.max_share_per_key`).

use std::io::SeekFrom;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::error::ApiError;
use crate::limits::{ByteQuota, QuotaHold, QuotaLimit, QuotaRefusal};
use crate::private_fs;

const PREFIX: &str = "upload-";
const SUFFIX: &str = ".part";
const READ_CHUNK: usize = 64 * 1024;

/// Where a request's spool file goes, and how much all spool files, and those of the
/// request's key, may hold together.
#[derive(Clone)]
pub struct SpoolArea {
    pub dir: PathBuf,
    pub limit: QuotaLimit,
    pub usage: ByteQuota,
    /// The key whose request spools here: its files count against its share.
    pub key_id: i64,
}

pub struct Spool {
    /// Owns the path: dropping it removes the file.
    file: tempfile::NamedTempFile,
    writer: File,
    /// Holds the file's length of the spool quota; given back when the file is removed.
    held: QuotaHold,
}

impl Spool {
    pub async fn create(area: &SpoolArea) -> Result<Spool, ApiError> {
        private_fs::create_dir_all_async(&area.dir)
            .await
            .map_err(spool_error)?;
        let file = tempfile::Builder::new()
            .prefix(PREFIX)
            .suffix(SUFFIX)
            .permissions(std::fs::Permissions::from_mode(private_fs::FILE_MODE))
            .tempfile_in(&area.dir)
            .map_err(spool_error)?;
        let writer = File::from_std(file.reopen().map_err(spool_error)?);
        Ok(Spool {
            file,
            writer,
            held: area.usage.empty_hold(area.key_id, area.limit),
        })
    }

    /// Bytes written so far: where the next part starts.
    pub fn written(&self) -> u64 {
        self.held.bytes()
    }

    /// Appends `chunk`, if the spool quota has room for it; otherwise nothing is written
    /// and the request fails (its file is removed with it): 429 `key_spool_share_exceeded`
    /// when its key's uploads hold the key's share, 503 `spool_full` when all of them hold
    /// the whole quota.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        // Counted before the write, so that a failed write is given back with the file.
        match self.held.grow(chunk.len() as u64) {
            Ok(()) => {}
            Err(QuotaRefusal::KeyShare) => {
                metrics::counter!("imagegate_key_share_refused_total", "quota" => "spool")
                    .increment(1);
                return Err(ApiError::KeySpoolShare);
            }
            Err(QuotaRefusal::Full) => {
                metrics::counter!("imagegate_spool_full_total").increment(1);
                return Err(ApiError::SpoolFull);
            }
        }
        self.writer.write_all(chunk).await.map_err(spool_error)?;
        Ok(())
    }

    /// Makes everything written so far readable by [`Spool::reader`].
    pub async fn flush(&mut self) -> Result<(), ApiError> {
        self.writer.flush().await.map_err(spool_error)
    }

    /// Reads `len` bytes from `offset`, in chunks, through a handle of its own, so that
    /// several attempts can read the same spool.
    pub async fn reader(&self, offset: u64, len: u64) -> Result<SpoolReader, ApiError> {
        let mut file = File::from_std(self.file.reopen().map_err(spool_error)?);
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(spool_error)?;
        Ok(SpoolReader {
            file,
            remaining: len,
        })
    }
}

pub struct SpoolReader {
    file: File,
    remaining: u64,
}

impl SpoolReader {
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ApiError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(READ_CHUNK);
        let mut buf = BytesMut::zeroed(want);
        let read = self.file.read(&mut buf).await.map_err(spool_error)?;
        if read == 0 {
            return Err(ApiError::Internal("spool file ended early".into()));
        }
        buf.truncate(read);
        self.remaining -= read as u64;
        Ok(Some(buf.freeze()))
    }
}

fn spool_error(err: std::io::Error) -> ApiError {
    ApiError::Internal(format!("upload spool: {err}"))
}

/// Removes spool files a crash left behind; returns how many.
pub fn clean_spool_dir(dir: &Path) -> std::io::Result<usize> {
    private_fs::create_dir_all(dir)?;
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PREFIX) && name.ends_with(SUFFIX) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}
