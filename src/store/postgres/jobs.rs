//! The Postgres `JobStore`: jobs shared by every replica on the database.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::PostgresStore;
use crate::store::StoreResult;
use crate::store::jobs::{
    Interrupted, JOB_COLUMNS, JobCreated, JobEnd, JobRow, JobStore, NewJob, OVER_KEPT,
    PastRetention,
};

#[async_trait]
impl JobStore for PostgresStore {
    #[tracing::instrument(skip_all, fields(key_id = job.key_id))]
    async fn create_job(
        &self,
        job: &NewJob,
        retry: bool,
        limit: u32,
        finished_after: DateTime<Utc>,
    ) -> StoreResult<JobCreated> {
        let mut tx = self.pool.begin().await?;
        // One creation per key at a time, on every replica: the count below cannot be
        // read by two creations that both then insert.
        sqlx::query("select pg_advisory_xact_lock(hashtextextended('imagegate.jobs', $1))")
            .bind(job.key_id)
            .execute(&mut *tx)
            .await?;
        if let (true, Some(fingerprint)) = (retry, &job.fingerprint) {
            let existing: Option<JobRow> = sqlx::query_as(&format!(
                "select {JOB_COLUMNS} from jobs where key_id = $1 and fingerprint = $2 \
                 and (completed_at is null or completed_at >= $3) \
                 order by created_at desc, id desc limit 1"
            ))
            .bind(job.key_id)
            .bind(fingerprint)
            .bind(finished_after)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(existing) = existing {
                return Ok(JobCreated::Existing(existing));
            }
        }
        let (open,): (i64,) = sqlx::query_as(
            "select count(*) from jobs where key_id = $1 and status in ('queued', 'in_progress')",
        )
        .bind(job.key_id)
        .fetch_one(&mut *tx)
        .await?;
        if open >= i64::from(limit) {
            return Ok(JobCreated::QueueFull);
        }
        let row: JobRow = sqlx::query_as(&format!(
            "insert into jobs (id, key_id, status, endpoint, request_id, fingerprint, \
             created_at, replica, lease_until) values ($1, $2, 'queued', $3, $4, $5, $6, $7, $8) \
             returning {JOB_COLUMNS}"
        ))
        .bind(&job.id)
        .bind(job.key_id)
        .bind(&job.endpoint)
        .bind(&job.request_id)
        .bind(&job.fingerprint)
        .bind(job.created_at)
        .bind(&job.replica)
        .bind(job.lease_until)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(JobCreated::New(row))
    }

    #[tracing::instrument(skip_all)]
    async fn job(
        &self,
        id: &str,
        key_id: i64,
        finished_after: DateTime<Utc>,
    ) -> StoreResult<Option<JobRow>> {
        Ok(sqlx::query_as(&format!(
            "select {JOB_COLUMNS} from jobs where id = $1 and key_id = $2 \
             and (completed_at is null or completed_at >= $3)"
        ))
        .bind(id)
        .bind(key_id)
        .bind(finished_after)
        .fetch_optional(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip_all)]
    async fn start_job(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let done = sqlx::query(
            "update jobs set status = 'in_progress', started_at = $2 \
             where id = $1 and status = 'queued'",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(skip_all)]
    async fn record_job_call(&self, id: &str, intent: &str) -> StoreResult<()> {
        sqlx::query("update jobs set call_intent = $2 where id = $1 and status = 'in_progress'")
            .bind(id)
            .bind(intent)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn renew_job_leases(
        &self,
        replica: &str,
        ids: Option<&[String]>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let done = sqlx::query(
            "update jobs set lease_until = $2 \
             where replica = $1 and status in ('queued', 'in_progress') \
             and ($3::text[] is null or id = any($3))",
        )
        .bind(replica)
        .bind(lease_until)
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(skip_all)]
    async fn finish_job(&self, id: &str, end: &JobEnd, now: DateTime<Utc>) -> StoreResult<bool> {
        let query = match end {
            JobEnd::Succeeded {
                status_code,
                result_name,
                result_bytes,
            } => sqlx::query(
                "update jobs set status = 'succeeded', status_code = $2, result_name = $3, \
                 result_bytes = $4, completed_at = $5 \
                 where id = $1 and status in ('queued', 'in_progress')",
            )
            .bind(id)
            .bind(status_code)
            .bind(result_name)
            .bind(result_bytes),
            JobEnd::Failed { status_code, error } => sqlx::query(
                "update jobs set status = 'failed', status_code = $2, error = $3, \
                 completed_at = $4 where id = $1 and status in ('queued', 'in_progress')",
            )
            .bind(id)
            .bind(status_code)
            .bind(error),
        };
        let done = query.bind(now).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(skip_all)]
    async fn claim_lapsed_jobs(
        &self,
        now: DateTime<Utc>,
        why: &Interrupted,
    ) -> StoreResult<Vec<JobRow>> {
        // One statement: a row another replica claimed first no longer matches once its
        // update is seen (Postgres re-checks the condition on the updated row).
        Ok(sqlx::query_as(&format!(
            "update jobs set status = 'failed', status_code = 500, completed_at = $1, \
             error = case when status = 'queued' then $2 else $3 end \
             where status in ('queued', 'in_progress') and lease_until < $1 \
             returning {JOB_COLUMNS}"
        ))
        .bind(now)
        .bind(&why.queued)
        .bind(&why.running)
        .fetch_all(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip_all, fields(key_id))]
    async fn expire_kept_jobs(
        &self,
        key_id: i64,
        max_jobs: u32,
        max_bytes: u64,
    ) -> StoreResult<Vec<String>> {
        let over: Vec<PastRetention> = sqlx::query_as(&format!(
            "with over as ({OVER_KEPT}) \
             update jobs set status = 'expired', result_name = null, result_bytes = null \
             from over where jobs.id = over.id and jobs.status in ('succeeded', 'failed') \
             returning over.id, over.result_name"
        ))
        .bind(key_id)
        .bind(i64::from(max_jobs))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(over.into_iter().filter_map(|o| o.result_name).collect())
    }

    #[tracing::instrument(skip_all)]
    async fn jobs_past_retention(
        &self,
        finished_before: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<PastRetention>> {
        Ok(sqlx::query_as(
            "select id, result_name from jobs where completed_at < $1 \
             order by completed_at limit $2",
        )
        .bind(finished_before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip_all)]
    async fn delete_jobs(&self, ids: &[String]) -> StoreResult<u64> {
        let done = sqlx::query("delete from jobs where id = any($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(skip_all)]
    async fn open_jobs(&self, key_id: i64) -> StoreResult<u32> {
        let (open,): (i64,) = sqlx::query_as(
            "select count(*) from jobs where key_id = $1 and status in ('queued', 'in_progress')",
        )
        .bind(key_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(u32::try_from(open).unwrap_or(u32::MAX))
    }
}
