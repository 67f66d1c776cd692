//! The `[jobs]` section: asynchronous jobs (`Prefer: respond-async`), validated.

use std::num::NonZeroU32;
use std::time::Duration;

use super::raw::RawJobs;
use super::{ConfigError, Validator};

#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// How long a finished job and its result are kept before the sweeper deletes them.
    pub retention: Duration,
    /// How long a replica's hold on the jobs it runs lasts unless renewed (every third of
    /// it): a replica that died leaves its jobs to be failed `job_interrupted` by another
    /// one at most this long (plus a third) after its last renewal.
    pub lease: Duration,
    /// Jobs of one key not yet finished (queued or running) on all replicas; one more gets
    /// 429.
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

/// The warning of a configuration that still sets `jobs.dir`.
pub const DIR_UNUSED: &str = "jobs.dir is no longer used and can be removed: job results now go to the result store of [results] url (jobs kept in that folder by an earlier version are not read)";

impl Validator<'_> {
    pub(super) fn jobs(&self, raw: RawJobs) -> Result<JobsConfig, ConfigError> {
        let max_queued_per_key = NonZeroU32::new(raw.max_queued_per_key)
            .ok_or_else(|| self.err("jobs.max_queued_per_key", "must be at least 1"))?;
        let kept_jobs = NonZeroU32::new(raw.max_kept_per_key)
            .ok_or_else(|| self.err("jobs.max_kept_per_key", "must be at least 1"))?;
        // Renewed every third of it: shorter, a busy database could let a live replica's
        // lease run out.
        if raw.lease < Duration::from_secs(1) {
            return Err(self.err("jobs.lease", "must be at least 1s"));
        }
        Ok(JobsConfig {
            retention: self.positive("jobs.retention", raw.retention)?,
            lease: raw.lease,
            max_queued_per_key,
            kept: KeptPerKey {
                jobs: kept_jobs,
                result_bytes: raw.max_kept_bytes_per_key,
            },
        })
    }
}
