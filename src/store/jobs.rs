//! Async jobs as rows every replica shares (`jobs` table, migration `0010_jobs`): created
//! within the key's queue limit, started and finished by the replica that runs them under a
//! lease it renews, failed by any replica once that lease ran out, expired past retention.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::rows::{MaybeTimestamp, Timestamp};
use super::{OnRuntime, StoreResult};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepted, waiting for its turn.
    Queued,
    /// Its provider call is running.
    InProgress,
    Succeeded,
    Failed,
    /// Finished, then dropped (its result deleted) to keep its key within
    /// `jobs.max_kept_per_key` and `jobs.max_kept_bytes_per_key`.
    Expired,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::InProgress => "in_progress",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Expired => "expired",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Expired
        )
    }
}

impl TryFrom<String> for JobStatus {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        [
            JobStatus::Queued,
            JobStatus::InProgress,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
        .ok_or_else(|| format!("unknown job status {text:?}"))
    }
}

/// The `jobs` columns in [`JobRow`]'s order, for both databases.
pub(super) const JOB_COLUMNS: &str = "id, key_id, status, endpoint, request_id, fingerprint, \
     created_at, started_at, completed_at, error, status_code, result_name, result_bytes, \
     replica, lease_until, call_intent";

/// One job as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    /// Only this key may read the job.
    pub key_id: i64,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    /// `generations`, `edits`.
    pub endpoint: String,
    /// The creating request's id: its usage rows carry it.
    pub request_id: String,
    /// Hex of the duplicate-protection fingerprint, when the request had one.
    pub fingerprint: Option<String>,
    #[sqlx(try_from = "Timestamp")]
    pub created_at: DateTime<Utc>,
    #[sqlx(try_from = "MaybeTimestamp")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished: its retention starts then.
    #[sqlx(try_from = "MaybeTimestamp")]
    pub completed_at: Option<DateTime<Utc>>,
    /// Why it failed: OpenAI's error detail as JSON text.
    pub error: Option<String>,
    /// The HTTP status the synchronous call would have answered with, once finished.
    pub status_code: Option<i32>,
    /// Its result's name in the result store, once it succeeded.
    pub result_name: Option<String>,
    pub result_bytes: Option<i64>,
    /// The replica that runs it.
    pub replica: String,
    /// Until when that replica's lease holds (renewed while it lives).
    #[sqlx(try_from = "Timestamp")]
    pub lease_until: DateTime<Utc>,
    /// The intent (JSON) of its provider call, once one was about to be sent: the
    /// interrupted usage row of a job whose replica died is made from it.
    pub call_intent: Option<String>,
}

/// A job to create, queued, leased to the replica that accepts it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub key_id: i64,
    pub endpoint: String,
    pub request_id: String,
    pub fingerprint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub replica: String,
    pub lease_until: DateTime<Utc>,
}

/// What [`JobStore::create_job`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobCreated {
    New(JobRow),
    /// A retry of the request that created this job (same key, same fingerprint).
    Existing(JobRow),
    /// The key has `limit` unfinished jobs already.
    QueueFull,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    Succeeded {
        status_code: i32,
        result_name: String,
        result_bytes: i64,
    },
    Failed {
        status_code: i32,
        /// OpenAI's error detail as JSON text.
        error: String,
    },
}

/// The errors (JSON text) a job whose replica died is failed with: one for a job that was
/// still queued (nothing sent, nothing billed), one for a job whose call had started.
#[derive(Debug, Clone)]
pub struct Interrupted {
    pub queued: String,
    pub running: String,
}

/// A finished job past its retention: its row, and its result when it has one.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PastRetention {
    pub id: String,
    pub result_name: Option<String>,
}

/// The jobs' rows. Times are passed in (the caller's clock) so that both databases keep
/// the same instants and tests can move time; replicas' clocks must agree to well within a
/// lease (NTP).
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Creates `job` unless the key has `limit` unfinished jobs (counted under a lock of
    /// the key, across every replica); first, when `retry`, returns the key's latest job
    /// with the same fingerprint that did not finish before `finished_after`.
    async fn create_job(
        &self,
        job: &NewJob,
        retry: bool,
        limit: u32,
        finished_after: DateTime<Utc>,
    ) -> StoreResult<JobCreated>;
    /// The job `id` of `key_id`, unless it finished before `finished_after`.
    async fn job(
        &self,
        id: &str,
        key_id: i64,
        finished_after: DateTime<Utc>,
    ) -> StoreResult<Option<JobRow>>;
    /// A queued job's call is about to be sent; false when it is no longer queued.
    async fn start_job(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool>;
    /// Records the intent (JSON) of the job's provider call about to be sent.
    async fn record_job_call(&self, id: &str, intent: &str) -> StoreResult<()>;
    /// Extends to `lease_until`, in one statement, the lease of the unfinished jobs of
    /// `replica` whose ids are in `ids` (every one of them for `None`); returns how many.
    async fn renew_job_leases(
        &self,
        replica: &str,
        ids: Option<&[String]>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<u64>;
    /// Records how an unfinished job ended; false when it had finished already (another
    /// replica failed it when its lease ran out).
    async fn finish_job(&self, id: &str, end: &JobEnd, now: DateTime<Utc>) -> StoreResult<bool>;
    /// Fails (status code 500, `why`) every unfinished job whose lease ran out before `now`,
    /// and returns them as they are now: each is returned by one call only.
    async fn claim_lapsed_jobs(
        &self,
        now: DateTime<Utc>,
        why: &Interrupted,
    ) -> StoreResult<Vec<JobRow>>;
    /// Expires `key_id`'s oldest finished jobs while it keeps more than `max_jobs` of them
    /// or results of more than `max_bytes` in all; returns the expired results' names.
    async fn expire_kept_jobs(
        &self,
        key_id: i64,
        max_jobs: u32,
        max_bytes: u64,
    ) -> StoreResult<Vec<String>>;
    /// Up to `limit` jobs finished before `finished_before` (their results are deleted,
    /// then [`JobStore::delete_jobs`] deletes the rows).
    async fn jobs_past_retention(
        &self,
        finished_before: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<PastRetention>>;
    /// Deletes these jobs' rows; returns how many existed.
    async fn delete_jobs(&self, ids: &[String]) -> StoreResult<u64>;
    /// The key's unfinished jobs, on every replica.
    async fn open_jobs(&self, key_id: i64) -> StoreResult<u32>;
}

/// How many of a key's finished jobs to expire, newest kept first: a job is kept while the
/// jobs newer than it and itself number at most `max_jobs` and hold at most `max_bytes`.
/// Shared by both databases (`$1` key, `$2` max jobs, `$3` max bytes).
pub(super) const OVER_KEPT: &str = "select id, result_name from (\
     select id, result_name, \
     row_number() over (order by completed_at desc, id desc) as n, \
     sum(coalesce(result_bytes, 0)) over (order by completed_at desc, id desc \
     rows between unbounded preceding and current row) as bytes \
     from jobs where key_id = $1 and status in ('succeeded', 'failed')) ranked \
     where n > cast($2 as bigint) or bytes > cast($3 as bigint)";

#[async_trait]
impl JobStore for OnRuntime {
    async fn create_job(
        &self,
        job: &NewJob,
        retry: bool,
        limit: u32,
        finished_after: DateTime<Utc>,
    ) -> StoreResult<JobCreated> {
        let job = job.clone();
        self.run(move |s| async move { s.create_job(&job, retry, limit, finished_after).await })
            .await
    }
    async fn job(
        &self,
        id: &str,
        key_id: i64,
        finished_after: DateTime<Utc>,
    ) -> StoreResult<Option<JobRow>> {
        let id = id.to_owned();
        self.run(move |s| async move { s.job(&id, key_id, finished_after).await })
            .await
    }
    async fn start_job(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let id = id.to_owned();
        self.run(move |s| async move { s.start_job(&id, now).await })
            .await
    }
    async fn record_job_call(&self, id: &str, intent: &str) -> StoreResult<()> {
        let (id, intent) = (id.to_owned(), intent.to_owned());
        self.run(move |s| async move { s.record_job_call(&id, &intent).await })
            .await
    }
    async fn renew_job_leases(
        &self,
        replica: &str,
        ids: Option<&[String]>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let (replica, ids) = (replica.to_owned(), ids.map(<[String]>::to_vec));
        self.run(move |s| async move {
            s.renew_job_leases(&replica, ids.as_deref(), lease_until)
                .await
        })
        .await
    }
    async fn finish_job(&self, id: &str, end: &JobEnd, now: DateTime<Utc>) -> StoreResult<bool> {
        let (id, end) = (id.to_owned(), end.clone());
        self.run(move |s| async move { s.finish_job(&id, &end, now).await })
            .await
    }
    async fn claim_lapsed_jobs(
        &self,
        now: DateTime<Utc>,
        why: &Interrupted,
    ) -> StoreResult<Vec<JobRow>> {
        let why = why.clone();
        self.run(move |s| async move { s.claim_lapsed_jobs(now, &why).await })
            .await
    }
    async fn expire_kept_jobs(
        &self,
        key_id: i64,
        max_jobs: u32,
        max_bytes: u64,
    ) -> StoreResult<Vec<String>> {
        self.run(move |s| async move { s.expire_kept_jobs(key_id, max_jobs, max_bytes).await })
            .await
    }
    async fn jobs_past_retention(
        &self,
        finished_before: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<PastRetention>> {
        self.run(move |s| async move { s.jobs_past_retention(finished_before, limit).await })
            .await
    }
    async fn delete_jobs(&self, ids: &[String]) -> StoreResult<u64> {
        let ids = ids.to_vec();
        self.run(move |s| async move { s.delete_jobs(&ids).await })
            .await
    }
    async fn open_jobs(&self, key_id: i64) -> StoreResult<u32> {
        self.run(move |s| async move { s.open_jobs(key_id).await })
            .await
    }
}
