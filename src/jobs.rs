//! Asynchronous jobs, imagegate's own extension to OpenAI's API: a request sent with
//! `Prefer: respond-async` is answered 202 at once with a job id, runs in the background,
//! and its result is collected later with `GET /v1/images/jobs/{id}`.
//!
//! A job is a row of the database every replica shares ([`crate::store::JobStore`]) and its
//! result an object `jobs/{id}` of the result store (`[results] url`), so that any replica
//! answers its polls. The replica that accepted a job runs it and holds a lease on it,
//! renewed by the `jobs` service every third of `jobs.lease`; a job whose lease ran out
//! unfinished (its replica died) is failed `job_interrupted` by whichever replica notices,
//! and billed as the crash recovery bills any call cut off: one interrupted usage row at
//! the worst case, under the creating request's id, when its call had been sent.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::{JobsConfig, KeptPerKey};
use crate::limits::InFlight;
use crate::openai::ErrorDetail;
use crate::results::{Reading, Results, ResultsError};
use crate::store::{
    Interrupted, JobCreated, JobEnd, NewJob, PastRetention, Store, StoreResult, after, before,
};
use crate::usage::Intent;
use crate::usage::writer::UsageSink;

pub use crate::store::{JobRow as Record, JobStatus as Status};

/// Every job id starts with it.
pub const ID_PREFIX: &str = "imgjob_";

/// The reason of a job whose provider call was in flight when its replica stopped.
pub const INTERRUPTED: &str =
    "interrupted: the imagegate replica running the job stopped while it ran";

/// The reason of a job that was still waiting for its turn when its replica stopped.
pub const INTERRUPTED_QUEUED: &str = "interrupted: the imagegate replica holding the job stopped before it ran (its request was not sent to a provider and is not billed)";

/// How long a stopping replica tries to end its leases (see [`service`]): the stop must
/// not wait for a database that does not answer.
const STOP_RELEASE: Duration = Duration::from_millis(500);

/// Jobs past retention deleted per statement.
const SWEEP_BATCH: i64 = 500;

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

/// How a job ended.
pub enum Finished {
    /// Its result is stored whole as [`result_name`], `bytes` long.
    Succeeded { status_code: u16, bytes: u64 },
    Failed {
        status_code: u16,
        error: ErrorDetail,
    },
}

/// The jobs of every replica, as this replica reaches them.
pub struct Jobs {
    store: Arc<dyn Store>,
    results: Results,
    replica: Arc<str>,
    /// Each key's jobs whose call is running on this replica: at most
    /// `limits.max_in_flight_per_key` at once, the others wait (queued). Counted apart from
    /// the key's requests, so that running jobs never get the key's own polling refused.
    pub running: Arc<InFlight>,
    /// The jobs this replica's tasks hold (see [`Jobs::hold`]): only theirs are renewed, so
    /// that a job whose task ended without recording its end (the database failed then, or
    /// the task panicked) lapses and is failed, rather than staying unfinished for ever.
    held: Mutex<HashSet<String>>,
}

/// A job held by the task that runs it: its lease is renewed until this is dropped.
pub struct Held {
    jobs: Arc<Jobs>,
    id: String,
}

impl Held {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.jobs.held_ids().remove(&self.id);
    }
}

/// A job's result in the result store.
pub fn result_name(id: &str) -> String {
    format!("jobs/{id}")
}

impl Jobs {
    pub fn new(store: Arc<dyn Store>, results: Results, replica: Arc<str>) -> Jobs {
        Jobs {
            store,
            results,
            replica,
            running: Arc::default(),
            held: Mutex::default(),
        }
    }

    /// Holds the job `id` for the task that runs it (see [`Held`]).
    pub fn hold(self: &Arc<Self>, id: &str) -> Held {
        self.held_ids().insert(id.to_owned());
        Held {
            jobs: Arc::clone(self),
            id: id.to_owned(),
        }
    }

    fn held_ids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new job for `order`, queued and leased to this replica; or the job a retry of the
    /// same request created; or [`JobCreated::QueueFull`] when the key has
    /// `jobs.max_queued_per_key` unfinished jobs on all replicas.
    pub async fn create(&self, order: Order, config: &JobsConfig) -> StoreResult<JobCreated> {
        let now = Utc::now();
        let job = NewJob {
            id: format!("{ID_PREFIX}{:032x}", rand::random::<u128>()),
            key_id: order.key_id,
            endpoint: order.endpoint,
            request_id: order.request_id,
            fingerprint: order.fingerprint.map(hex::encode),
            created_at: now,
            replica: self.replica.to_string(),
            lease_until: after(now, config.lease),
        };
        let limit = config.max_queued_per_key.get();
        let finished_after = before(now, config.retention);
        self.store
            .create_job(&job, order.retry, limit, finished_after)
            .await
    }

    /// The job `id` of `key_id`, unless it is unknown or past `retention`.
    pub async fn get(
        &self,
        id: &str,
        key_id: i64,
        retention: Duration,
    ) -> StoreResult<Option<Record>> {
        self.store
            .job(id, key_id, before(Utc::now(), retention))
            .await
    }

    /// The job's provider call is about to be sent; false when the job is no longer
    /// queued (another replica failed it when its lease ran out): it must not run.
    pub async fn started(&self, id: &str) -> StoreResult<bool> {
        self.store.start_job(id, Utc::now()).await
    }

    /// Keeps the intent of the job's call about to be sent with the job, so that another
    /// replica can bill the call if this one dies during it. Not kept (the database did
    /// not answer), the call is still billed by this replica's journal at its next start.
    pub async fn record_call(&self, id: &str, intent: &Intent) {
        let result = match serde_json::to_string(intent) {
            Ok(json) => self.store.record_job_call(id, &json).await,
            Err(err) => {
                tracing::error!(job = %id, %err, "a call's intent cannot be encoded");
                return;
            }
        };
        if let Err(err) = result {
            tracing::warn!(job = %id, %err, "could not keep a job's call with it: only this replica's journal can bill it if it stops");
        }
    }

    /// Starts writing the job's result; it is visible only once finished.
    pub fn result_writer(&self, id: &str) -> crate::results::ResultWriter {
        self.results.writer(&result_name(id))
    }

    /// Reads a stored result; `None` when it is gone.
    pub async fn read_result(&self, name: &str) -> Result<Option<Reading>, ResultsError> {
        self.results.read(name).await
    }

    /// Records how the job ended. A job another replica failed meanwhile (this replica's
    /// lease ran out) stays failed, and the result written for it is deleted. Then the
    /// key's oldest finished jobs expire while it keeps more than `kept` allows.
    pub async fn finish(
        &self,
        id: &str,
        key_id: i64,
        finished: Finished,
        kept: KeptPerKey,
    ) -> StoreResult<()> {
        let (end, written) = match finished {
            Finished::Succeeded { status_code, bytes } => (
                JobEnd::Succeeded {
                    status_code: i32::from(status_code),
                    result_name: result_name(id),
                    result_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
                },
                true,
            ),
            Finished::Failed { status_code, error } => (
                JobEnd::Failed {
                    status_code: i32::from(status_code),
                    error: error_json(&error),
                },
                false,
            ),
        };
        let recorded = self.store.finish_job(id, &end, Utc::now()).await?;
        if !recorded {
            tracing::warn!(job = %id, "a job ended after another replica had failed it (this replica's lease ran out)");
            if written {
                self.delete_results(&[result_name(id)]).await;
            }
            return Ok(());
        }
        let expired = self
            .store
            .expire_kept_jobs(key_id, kept.jobs.get(), kept.result_bytes)
            .await?;
        if !expired.is_empty() {
            tracing::info!(
                key_id,
                expired = expired.len(),
                "finished jobs expired to keep their key within jobs.max_kept_per_key and jobs.max_kept_bytes_per_key"
            );
            self.delete_results(&expired).await;
        }
        Ok(())
    }

    /// Extends the lease of every job this replica's tasks hold to `lease` from now.
    pub async fn renew_leases(&self, lease: Duration) -> StoreResult<u64> {
        let ids: Vec<String> = self.held_ids().iter().cloned().collect();
        if ids.is_empty() {
            return Ok(0);
        }
        self.store
            .renew_job_leases(&self.replica, Some(&ids), after(Utc::now(), lease))
            .await
    }

    /// Ends now the lease of every unfinished job of this replica (at the stop: another
    /// replica fails them at once); returns how many there were.
    async fn release_leases(&self) -> StoreResult<u64> {
        self.store
            .renew_job_leases(&self.replica, None, Utc::now())
            .await
    }

    /// Fails the unfinished jobs whose lease ran out (their replica died), on whichever
    /// replica it was, and records the interrupted usage row of each whose call had been
    /// sent (the same row that replica's journal writes if it starts again: the request id
    /// makes the second a no-op). Returns how many jobs it failed.
    pub async fn claim_lapsed(&self, usage: &UsageSink) -> StoreResult<usize> {
        let why = Interrupted {
            queued: error_json(&interrupted_error(INTERRUPTED_QUEUED)),
            running: error_json(&interrupted_error(INTERRUPTED)),
        };
        let claimed = self.store.claim_lapsed_jobs(Utc::now(), &why).await?;
        let mut billed = 0;
        for job in &claimed {
            let Some(intent) = job.call_intent.as_deref() else {
                continue;
            };
            match serde_json::from_str::<Intent>(intent) {
                Ok(intent) => {
                    usage.record(intent.interrupted());
                    billed += 1;
                }
                Err(err) => {
                    tracing::error!(job = %job.id, %err, "a lapsed job's call cannot be read: no interrupted row for it");
                }
            }
        }
        if !claimed.is_empty() {
            tracing::warn!(
                interrupted = claimed.len(),
                billed,
                "async jobs cut off by the stop of the replica running them are reported failed (\"{INTERRUPTED}\")"
            );
        }
        // A result written whole before its replica died (or before its end could be
        // recorded) is named by no row: it goes now, or it would stay in the store for ever.
        let names: Vec<String> = claimed.iter().map(|job| result_name(&job.id)).collect();
        self.delete_results(&names).await;
        Ok(claimed.len())
    }

    /// Deletes the jobs finished longer than `retention` ago, result then row (a stop
    /// between the two leaves the row for the next sweep, never a result without its row).
    /// Every replica sweeps; a job two of them take at once is deleted once. Returns how
    /// many rows it deleted.
    pub async fn sweep(&self, retention: Duration) -> StoreResult<u64> {
        let cutoff = before(Utc::now(), retention);
        let mut deleted = 0;
        loop {
            let past = self.store.jobs_past_retention(cutoff, SWEEP_BATCH).await?;
            if past.is_empty() {
                return Ok(deleted);
            }
            let names: Vec<String> = past.iter().filter_map(|p| p.result_name.clone()).collect();
            if !self.delete_results(&names).await {
                // Tried again at the next sweep, rather than losing track of the results.
                return Ok(deleted);
            }
            let ids: Vec<String> = past.into_iter().map(|p: PastRetention| p.id).collect();
            deleted += self.store.delete_jobs(&ids).await?;
            if ids.len() < usize::try_from(SWEEP_BATCH).unwrap_or(usize::MAX) {
                return Ok(deleted);
            }
        }
    }

    /// Deletes results (already gone counts as deleted); false when one could not be.
    async fn delete_results(&self, names: &[String]) -> bool {
        let mut all = true;
        for name in names {
            if let Err(err) = self.results.delete(name).await {
                tracing::warn!(result = %name, %err, "could not delete a job's result");
                all = false;
            }
        }
        all
    }
}

/// How often the `jobs` service renews this replica's leases and looks for lapsed ones.
pub fn lease_interval(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(100))
}

/// How often the sweeper looks for expired jobs: often enough that a job outlives its
/// retention by a small part of it, at most once a minute.
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// A stored error read back (see [`error_json`]).
pub fn stored_error(record: &Record) -> Option<serde_json::Value> {
    record
        .error
        .as_deref()
        .map(|text| serde_json::from_str(text).unwrap_or_else(|_| serde_json::json!(text)))
}

/// Unix seconds.
pub fn unix(time: DateTime<Utc>) -> i64 {
    time.timestamp()
}

fn error_json(error: &ErrorDetail) -> String {
    serde_json::to_string(error).unwrap_or_else(|_| "{}".to_owned())
}

fn interrupted_error(reason: &str) -> ErrorDetail {
    ErrorDetail {
        message: reason.to_owned(),
        kind: "server_error".to_owned(),
        param: None,
        code: Some("job_interrupted".to_owned()),
    }
}

/// The `jobs` service, until `stop`: every third of `jobs.lease` it renews the leases of
/// the jobs this replica runs and fails the jobs whose lease ran out (the first round at
/// once, so that a restarted replica settles what its previous run left as soon as those
/// leases lapse); on its own timer it deletes jobs past `jobs.retention`. Settings are
/// read at each round (a reload changes them). A database that does not answer is tried
/// again at the next round: a lease lasts three of them. At the stop, the leases of jobs
/// still unfinished end.
pub async fn service(
    jobs: Arc<Jobs>,
    usage: UsageSink,
    settings: impl Fn() -> JobsConfig + Send + 'static,
    stop: CancellationToken,
) {
    let mut lease_due = tokio::time::Instant::now();
    let mut sweep_due = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        let config = settings();
        let now = tokio::time::Instant::now();
        let round = async {
            let mut outcome = Ok(());
            if now >= lease_due {
                outcome = match jobs.renew_leases(config.lease).await {
                    Ok(_) => jobs.claim_lapsed(&usage).await.map(|_| ()),
                    Err(err) => Err(err),
                };
            }
            if outcome.is_ok() && now >= sweep_due {
                outcome = jobs.sweep(config.retention).await.map(|swept| {
                    if swept > 0 {
                        tracing::info!(swept, "deleted async jobs past jobs.retention");
                    }
                });
            }
            outcome
        };
        // A round waiting on a database that does not answer (a hung connection) is given
        // up at the next round's time, so that the renewals go on once it answers again,
        // and never holds up the stop.
        let round = tokio::time::timeout(lease_interval(config.lease), round);
        let outcome = tokio::select! {
            () = stop.cancelled() => break,
            outcome = round => outcome.unwrap_or_else(|_elapsed| {
                Err(crate::store::StoreError::Cancelled(
                    "not answered within a third of jobs.lease".to_owned(),
                ))
            }),
        };
        if now >= lease_due {
            lease_due = now + lease_interval(config.lease);
        }
        if now >= sweep_due {
            sweep_due = now + sweep_interval(config.retention);
        }
        match outcome {
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(%err, "async jobs: leases cannot be renewed nor lapsed or old jobs found (the database did not answer); trying again every third of jobs.lease");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!("async jobs: the database answers again");
            }
            _ => {}
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(lease_due.min(sweep_due)) => {}
        }
    }
    // Stopped after the requests' grace: a job still unfinished now is cut off with this
    // process. Its lease ends now, so that another replica fails it at once rather than
    // a lease later; a database that does not answer soon leaves the leases to run out.
    let release = tokio::time::timeout(STOP_RELEASE, jobs.release_leases());
    match release.await {
        Ok(Ok(0)) => {}
        Ok(Ok(left)) => tracing::warn!(
            left,
            "async jobs still unfinished at the stop are left to be failed job_interrupted"
        ),
        Ok(Err(err)) => {
            tracing::warn!(%err, "could not end the leases of this replica's jobs at the stop")
        }
        Err(_elapsed) => {
            tracing::warn!(
                "the database did not answer in time: this replica's unfinished jobs are failed once their leases run out"
            )
        }
    }
}
