//! The `[jobs]` section: asynchronous jobs (`Prefer: respond-async`), validated.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawJobs, RawServer};
use super::{ConfigError, Validator};

#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// One file per job (and one per result) lives here; read back at start.
    pub dir: PathBuf,
    /// How long a finished job and its result are kept before the sweeper deletes them.
    pub retention: Duration,
    /// Jobs of one key not yet finished (queued or running); one more gets 429.
    pub max_queued_per_key: NonZeroU32,
    /// What one key's finished jobs may keep within their retention; past either, its
    /// oldest finished jobs expire first (their result deleted, their status `expired`).
    pub kept: KeptPerKey,
}

/// The bounds on one key's finished jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptPerKey {
    pub jobs: NonZeroU32,
    pub result_bytes: u64,
}

impl Validator<'_> {
    /// Checked against the server's folders: the spool is emptied at every start, and the
    /// journal's folder belongs to the journal alone.
    pub(super) fn jobs(&self, raw: RawJobs, server: &RawServer) -> Result<JobsConfig, ConfigError> {
        if raw.dir.as_os_str().is_empty() {
            return Err(self.err("jobs.dir", "must name a folder"));
        }
        for (other, key) in [
            (&server.spool_dir, "server.spool_dir"),
            (&server.journal_dir, "server.journal_dir"),
        ] {
            if raw.dir == *other || raw.dir.starts_with(other) {
                return Err(self.err(
                    "jobs.dir",
                    format!("must not be {key} or a folder inside it"),
                ));
            }
        }
        let max_queued_per_key = NonZeroU32::new(raw.max_queued_per_key)
            .ok_or_else(|| self.err("jobs.max_queued_per_key", "must be at least 1"))?;
        let kept_jobs = NonZeroU32::new(raw.max_kept_per_key)
            .ok_or_else(|| self.err("jobs.max_kept_per_key", "must be at least 1"))?;
        Ok(JobsConfig {
            dir: raw.dir,
            retention: self.positive("jobs.retention", raw.retention)?,
            max_queued_per_key,
            kept: KeptPerKey {
                jobs: kept_jobs,
                result_bytes: raw.max_kept_bytes_per_key,
            },
        })
    }
}
