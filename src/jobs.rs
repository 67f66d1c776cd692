//! Asynchronous jobs, imagegate's own extension to OpenAI's API: a request sent with
//! `Prefer: respond-async` is answered 202 at once with a job id, runs in the background,
//! and its result is collected later with `GET /v1/images/jobs/{id}`.
//!
//! This module is the jobs' table and their files: one `{id}.json` per job (written whole
//! to a temporary file, then renamed over the old one, so that a crash leaves the old
//! record or the new one, never half of one) and one `{id}.result` per job that succeeded:
//! the body the synchronous call would have returned. The table is read back at start;
//! jobs a restart cut off are recorded as failed, with the reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::KeptPerKey;
use crate::limits::InFlight;
use crate::openai::{ErrorBody, ErrorDetail};
use crate::private_fs;

/// Every job id starts with it.
pub const ID_PREFIX: &str = "imgjob_";

/// The reason of a job whose provider call was in flight when imagegate stopped.
pub const INTERRUPTED: &str = "interrupted: imagegate restarted while the job ran";

/// The reason of a job that was still waiting for its turn when imagegate stopped.
pub const INTERRUPTED_QUEUED: &str = "interrupted: imagegate restarted before the job ran (its request was not sent to a provider and is not billed)";

const RECORD: &str = "json";
const RESULT: &str = "result";
const TEMP: &str = "tmp";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted, waiting for its turn (see [`Jobs::running`]).
    Queued,
    /// Its provider call is running.
    InProgress,
    Succeeded,
    Failed,
    /// Finished, then dropped (its result deleted) to keep its key within
    /// `jobs.max_kept_per_key` and `jobs.max_kept_bytes_per_key`.
    Expired,
}

impl Status {
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Expired)
    }
}

/// One job, as its file holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// Only this key may read the job.
    pub key_id: i64,
    pub status: Status,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, once finished.
    #[serde(default)]
    pub completed_at: Option<i64>,
    /// Unix milliseconds, once finished: when the retention starts.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// `generations`, `edits`.
    pub endpoint: String,
    /// The creating request's id: its usage rows carry it.
    pub request_id: String,
    /// Hex of the duplicate-protection fingerprint, when the request had one.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Why it failed, in OpenAI's error shape.
    #[serde(default)]
    pub error: Option<ErrorDetail>,
    /// The HTTP status the synchronous call would have answered with, once finished.
    #[serde(default)]
    pub status_code: Option<u16>,
    /// The size of its result file, once it succeeded.
    #[serde(default)]
    pub result_bytes: Option<u64>,
}

/// What a job was created from.
pub struct Order {
    pub key_id: i64,
    pub endpoint: String,
    pub request_id: String,
    pub fingerprint: Option<[u8; 32]>,
    /// A retry (the SDKs' retry header, a repeated idempotency key) of the same request
    /// gets the job created first instead of a second one.
    pub retry: bool,
}

pub enum Created {
    New(Record),
    /// A retry of the request that created this job.
    Existing(Record),
}

/// The key has `limit` jobs not finished already.
#[derive(Debug)]
pub struct QueueFull {
    pub limit: u32,
}

/// How a job ended.
pub enum Finished {
    /// Its result is in [`Jobs::temp_result_path`], whole.
    Succeeded { status_code: u16 },
    Failed {
        status_code: u16,
        error: ErrorDetail,
    },
}

pub struct Jobs {
    dir: PathBuf,
    table: Mutex<Table>,
    /// Each key's jobs whose call is running: at most `limits.max_in_flight_per_key` at
    /// once, the others wait (queued). Counted apart from the key's requests, so that
    /// running jobs never get the key's own polling refused.
    pub running: Arc<InFlight>,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<String, Record>,
    /// Fingerprint -> the latest job created with it.
    by_fingerprint: HashMap<String, String>,
    /// Jobs not finished, per key.
    open: HashMap<i64, u32>,
}

impl Table {
    fn insert(&mut self, record: Record) {
        if let Some(fingerprint) = &record.fingerprint {
            self.by_fingerprint
                .insert(fingerprint.clone(), record.id.clone());
        }
        if !record.status.is_finished() {
            *self.open.entry(record.key_id).or_insert(0) += 1;
        }
        self.jobs.insert(record.id.clone(), record);
    }

    fn close(&mut self, key_id: i64) {
        if let Some(count) = self.open.get_mut(&key_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.open.remove(&key_id);
            }
        }
    }

    fn remove(&mut self, id: &str) -> Option<Record> {
        let record = self.jobs.remove(id)?;
        if let Some(fingerprint) = &record.fingerprint {
            if self
                .by_fingerprint
                .get(fingerprint)
                .is_some_and(|j| j == id)
            {
                self.by_fingerprint.remove(fingerprint);
            }
        }
        if !record.status.is_finished() {
            self.close(record.key_id);
        }
        Some(record)
    }
}

impl Jobs {
    /// Reads back the jobs an earlier run left in `dir` (created when the first job is).
    /// A job that was queued or running then is recorded as failed, with the reason;
    /// returns how many were.
    pub fn open(dir: &Path) -> std::io::Result<(Jobs, usize)> {
        let jobs = Jobs {
            dir: dir.to_owned(),
            table: Mutex::new(Table::default()),
            running: Arc::default(),
        };
        let mut interrupted = 0;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok((jobs, 0)),
            Err(err) => return Err(err),
        };
        let mut results = Vec::new();
        for entry in entries {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some(TEMP) => remove(&path)?,
                Some(RESULT) => results.push(path),
                Some(RECORD) => {
                    if let Some(record) = jobs.read_back(&path)? {
                        interrupted += usize::from(record.1);
                        jobs.lock().insert(record.0);
                    }
                }
                _ => {}
            }
        }
        // A result whose record is gone (the sweeper stopped between the two) is removed.
        let table = jobs.lock();
        for path in results {
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if !table.jobs.contains_key(id) {
                remove(&path)?;
            }
        }
        drop(table);
        Ok((jobs, interrupted))
    }

    /// One record file; a job that had not finished becomes failed (true).
    fn read_back(&self, path: &Path) -> std::io::Result<Option<(Record, bool)>> {
        let text = std::fs::read(path)?;
        let mut record: Record = match serde_json::from_slice(&text) {
            Ok(record) => record,
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "skipping a job file that cannot be read");
                return Ok(None);
            }
        };
        if record.status.is_finished() {
            return Ok(Some((record, false)));
        }
        let reason = if record.status == Status::Queued {
            INTERRUPTED_QUEUED
        } else {
            INTERRUPTED
        };
        finish_record(
            &mut record,
            Status::Failed,
            500,
            Some(interrupted_error(reason)),
        );
        write_atomically(&self.record_path(&record.id), &encode(&record)?)?;
        Ok(Some((record, true)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new job for `order`, queued (its file not written yet: see [`Jobs::save`]); or the
    /// job a retry of the same request created; or [`QueueFull`] when the key has `limit`
    /// jobs not finished.
    pub fn create(&self, order: Order, limit: u32) -> Result<Created, QueueFull> {
        let fingerprint = order.fingerprint.map(hex::encode);
        let mut table = self.lock();
        if order.retry {
            let existing = fingerprint
                .as_ref()
                .and_then(|f| table.by_fingerprint.get(f))
                .and_then(|id| table.jobs.get(id))
                .filter(|record| record.key_id == order.key_id);
            if let Some(record) = existing {
                return Ok(Created::Existing(record.clone()));
            }
        }
        if table.open.get(&order.key_id).copied().unwrap_or(0) >= limit {
            return Err(QueueFull { limit });
        }
        let record = Record {
            id: format!("{ID_PREFIX}{:032x}", rand::random::<u128>()),
            key_id: order.key_id,
            status: Status::Queued,
            created_at: now_ms() / 1000,
            completed_at: None,
            finished_ms: None,
            endpoint: order.endpoint,
            request_id: order.request_id,
            fingerprint,
            error: None,
            status_code: None,
            result_bytes: None,
        };
        table.insert(record.clone());
        Ok(Created::New(record))
    }

    /// Writes a job's record file as the table holds it now.
    pub async fn save(&self, id: &str) -> std::io::Result<()> {
        let record = self.lock().jobs.get(id).cloned();
        let Some(record) = record else {
            return Ok(());
        };
        let bytes = encode(&record)?;
        let path = self.record_path(id);
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Forgets a job whose record could not be written (its request is refused).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The job's provider call is about to be sent.
    pub async fn started(&self, id: &str) -> std::io::Result<()> {
        if let Some(record) = self.lock().jobs.get_mut(id) {
            record.status = Status::InProgress;
        }
        self.save(id).await
    }

    /// Where a job's result is written before it is complete.
    pub fn temp_result_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.{RESULT}.{TEMP}"))
    }

    /// A succeeded job's result.
    pub fn result_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.{RESULT}"))
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.{RECORD}"))
    }

    /// Removes a result's temporary file, if there is one.
    pub async fn remove_temp_result(&self, id: &str) {
        let _ = tokio::fs::remove_file(self.temp_result_path(id)).await;
    }

    /// Creates the folder (the first job does), for the result's temporary file.
    pub async fn ensure_dir(&self) -> std::io::Result<()> {
        private_fs::create_dir_all_async(&self.dir).await
    }

    /// Records how the job ended: a result is moved into place first, then the record
    /// says it succeeded. A result that cannot be moved fails the job (its file removed), so
    /// that the job still ends and gives its key's queue slot back. Then the key's oldest
    /// finished jobs expire while it keeps more than `kept` allows.
    pub async fn finish(
        &self,
        id: &str,
        finished: Finished,
        kept: KeptPerKey,
    ) -> std::io::Result<()> {
        self.record_end(id, finished).await?;
        let key_id = self.lock().jobs.get(id).map(|r| r.key_id);
        if let Some(key_id) = key_id {
            self.bound(key_id, kept).await;
        }
        Ok(())
    }

    /// Expires `key_id`'s oldest finished jobs while it has more than `kept.jobs` of them,
    /// or results of more than `kept.result_bytes` in all: results are deleted, records say
    /// `expired`.
    async fn bound(&self, key_id: i64, kept: KeptPerKey) {
        let expired: Vec<String> = {
            let mut table = self.lock();
            let mut finished: Vec<&Record> = table
                .jobs
                .values()
                .filter(|r| {
                    r.key_id == key_id && r.status.is_finished() && r.status != Status::Expired
                })
                .collect();
            finished.sort_by_key(|r| (r.finished_ms, r.id.clone()));
            let mut count = finished.len();
            let mut bytes: u64 = finished.iter().filter_map(|r| r.result_bytes).sum();
            let mut over = Vec::new();
            for record in finished {
                if count <= kept.jobs.get() as usize && bytes <= kept.result_bytes {
                    break;
                }
                count -= 1;
                bytes -= record.result_bytes.unwrap_or(0);
                over.push(record.id.clone());
            }
            for id in &over {
                if let Some(record) = table.jobs.get_mut(id) {
                    record.status = Status::Expired;
                    record.result_bytes = None;
                }
            }
            over
        };
        for id in &expired {
            if let Err(err) = tokio::fs::remove_file(self.result_path(id)).await {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(job = %id, %err, "could not delete an expired job's result");
                }
            }
            if let Err(err) = self.save(id).await {
                tracing::warn!(job = %id, %err, "could not record that a job expired");
            }
        }
        if !expired.is_empty() {
            tracing::info!(
                key_id,
                expired = expired.len(),
                "finished jobs expired to keep their key within jobs.max_kept_per_key and jobs.max_kept_bytes_per_key"
            );
        }
    }

    async fn record_end(&self, id: &str, finished: Finished) -> std::io::Result<()> {
        let mut result_bytes = None;
        let (status, code, error) = match finished {
            Finished::Succeeded { status_code } => {
                match tokio::fs::rename(self.temp_result_path(id), self.result_path(id)).await {
                    Ok(()) => {
                        result_bytes = tokio::fs::metadata(self.result_path(id))
                            .await
                            .ok()
                            .map(|m| m.len());
                        (Status::Succeeded, status_code, None)
                    }
                    Err(err) => {
                        tracing::error!(job = %id, %err, "could not move a job's result into place");
                        self.remove_temp_result(id).await;
                        let message =
                            "The result could not be kept (it could not be written to disk).";
                        let error = ErrorBody::new(message, "server_error", None, None).error;
                        (Status::Failed, 500, Some(error))
                    }
                }
            }
            Finished::Failed { status_code, error } => (Status::Failed, status_code, Some(error)),
        };
        {
            let mut table = self.lock();
            let Some(record) = table.jobs.get_mut(id) else {
                return Ok(());
            };
            let was_open = !record.status.is_finished();
            finish_record(record, status, code, error);
            record.result_bytes = result_bytes;
            let key_id = record.key_id;
            if was_open {
                table.close(key_id);
            }
        }
        self.save(id).await
    }

    /// The job `id` of `key_id`, unless it is unknown, another key's or past `retention`.
    pub fn get(&self, id: &str, key_id: i64, retention: Duration) -> Option<Record> {
        let table = self.lock();
        let record = table.jobs.get(id)?;
        if record.key_id != key_id || expired(record, retention, now_ms()) {
            return None;
        }
        Some(record.clone())
    }

    /// Deletes the jobs finished longer than `retention` ago, record and result; returns
    /// how many.
    pub fn sweep(&self, retention: Duration) -> usize {
        let now = now_ms();
        let expired: Vec<Record> = {
            let mut table = self.lock();
            let ids: Vec<String> = table
                .jobs
                .values()
                .filter(|r| expired(r, retention, now))
                .map(|r| r.id.clone())
                .collect();
            ids.iter().filter_map(|id| table.remove(id)).collect()
        };
        for record in &expired {
            for path in [self.record_path(&record.id), self.result_path(&record.id)] {
                if let Err(err) = remove(&path) {
                    tracing::warn!(path = %path.display(), %err, "could not delete an expired job file");
                }
            }
        }
        expired.len()
    }

    /// Jobs of `key_id` not finished.
    pub fn open_jobs(&self, key_id: i64) -> u32 {
        self.lock().open.get(&key_id).copied().unwrap_or(0)
    }
}

/// How often the sweeper looks for expired jobs: often enough that a job outlives its
/// retention by a small part of it, at most once a minute.
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

fn expired(record: &Record, retention: Duration, now_ms: i64) -> bool {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    record
        .finished_ms
        .is_some_and(|finished| now_ms.saturating_sub(finished) >= retention_ms)
}

fn finish_record(record: &mut Record, status: Status, code: u16, error: Option<ErrorDetail>) {
    let now = now_ms();
    record.status = status;
    record.status_code = Some(code);
    record.error = error;
    record.completed_at = Some(now / 1000);
    record.finished_ms = Some(now);
}

fn interrupted_error(reason: &str) -> ErrorDetail {
    ErrorDetail {
        message: reason.to_owned(),
        kind: "server_error".to_owned(),
        param: None,
        code: Some("job_interrupted".to_owned()),
    }
}

fn encode(record: &Record) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(std::io::Error::other)
}

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk, then renames it
/// over `path`: readers (and the next start) see the old file or the new one, whole.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        private_fs::create_dir_all(dir)?;
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{TEMP}"));
    let temp = PathBuf::from(temp);
    let mut file = private_fs::create_file(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(key_id: i64, fingerprint: u8, retry: bool) -> Order {
        Order {
            key_id,
            endpoint: "generations".into(),
            request_id: "req_1".into(),
            fingerprint: Some([fingerprint; 32]),
            retry,
        }
    }

    fn new(created: Result<Created, QueueFull>) -> Record {
        match created {
            Ok(Created::New(record)) => record,
            _ => panic!("expected a new job"),
        }
    }

    /// No bound on a key's finished jobs.
    const UNBOUNDED: KeptPerKey = KeptPerKey {
        jobs: std::num::NonZeroU32::MAX,
        result_bytes: u64::MAX,
    };

    #[tokio::test]
    async fn unfinished_jobs_are_counted_per_key_and_a_retry_finds_its_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (jobs, _) = Jobs::open(&dir.path().join("jobs")).expect("open");
        let first = new(jobs.create(order(1, 1, false), 2));
        let again = jobs.create(order(1, 1, true), 2);
        assert!(matches!(again, Ok(Created::Existing(r)) if r.id == first.id));
        let other_key = jobs.create(order(2, 1, true), 2);
        assert!(
            matches!(other_key, Ok(Created::New(_))),
            "another key's fingerprint differs in practice; a key never gets another's job"
        );
        new(jobs.create(order(1, 2, false), 2));
        assert!(matches!(
            jobs.create(order(1, 3, false), 2),
            Err(QueueFull { limit: 2 })
        ));
        jobs.ensure_dir().await.expect("dir");
        let error = interrupted_error("x");
        jobs.finish(
            &first.id,
            Finished::Failed {
                status_code: 500,
                error,
            },
            UNBOUNDED,
        )
        .await
        .expect("finish");
        assert_eq!(jobs.open_jobs(1), 1);
        new(jobs.create(order(1, 3, false), 2));
    }

    #[tokio::test]
    async fn a_restart_fails_unfinished_jobs_and_the_sweeper_deletes_expired_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jobs");
        let (jobs, _) = Jobs::open(&path).expect("open");
        let running = new(jobs.create(order(1, 1, false), 10));
        let queued = new(jobs.create(order(1, 2, false), 10));
        let done = new(jobs.create(order(1, 3, false), 10));
        jobs.started(&running.id).await.expect("save");
        jobs.save(&queued.id).await.expect("save");
        std::fs::write(jobs.temp_result_path(&done.id), b"{}").expect("result");
        jobs.finish(
            &done.id,
            Finished::Succeeded { status_code: 200 },
            UNBOUNDED,
        )
        .await
        .expect("finish");
        drop(jobs);

        let (jobs, interrupted) = Jobs::open(&path).expect("reopen");
        assert_eq!(interrupted, 2);
        let day = Duration::from_secs(86_400);
        let running = jobs.get(&running.id, 1, day).expect("kept");
        assert_eq!(running.status, Status::Failed);
        assert_eq!(running.error.expect("error").message, INTERRUPTED);
        let queued = jobs.get(&queued.id, 1, day).expect("kept");
        assert_eq!(queued.error.expect("error").message, INTERRUPTED_QUEUED);
        assert_eq!(
            jobs.get(&done.id, 1, day).expect("kept").status,
            Status::Succeeded
        );
        assert!(jobs.get(&done.id, 2, day).is_none(), "another key's");
        assert_eq!(jobs.open_jobs(1), 0);

        assert_eq!(jobs.sweep(day), 0);
        assert_eq!(jobs.sweep(Duration::ZERO), 3);
        assert_eq!(
            std::fs::read_dir(&path).expect("dir").count(),
            0,
            "every file deleted"
        );
    }
}
