//! Calls in flight in SQLite (see [`crate::store::CallStore`]).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{SqliteStore, encode_time};
use crate::store::StoreResult;
use crate::store::calls::{CALL_COLUMNS, CallRecord, CallRow, CallStore};

/// Writes a call; `$11` says whether an existing row takes the new state (a kept answer)
/// or stays as it is (a registration that arrives after the call was already kept).
const UPSERT: &str = "insert into calls_in_flight (fingerprint, request_id, replica, state, \
     result, status, content_type, provider, started_at, expires_at) \
     values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     on conflict (fingerprint, request_id) do update set state = excluded.state, \
     result = excluded.result, status = excluded.status, content_type = excluded.content_type, \
     provider = excluded.provider, expires_at = excluded.expires_at \
     where $11";

impl SqliteStore {
    async fn write_call(&self, call: &CallRecord, replace: bool) -> StoreResult<()> {
        let (state, result, status, content_type, provider) = call.kept_columns();
        sqlx::query(UPSERT)
            .bind(&call.fingerprint)
            .bind(&call.request_id)
            .bind(&call.replica)
            .bind(state)
            .bind(result)
            .bind(status)
            .bind(content_type)
            .bind(provider)
            .bind(encode_time(call.started_at))
            .bind(encode_time(call.expires_at))
            .bind(replace)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl CallStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn register_call(&self, call: &CallRecord) -> StoreResult<()> {
        self.write_call(call, false).await
    }

    #[tracing::instrument(skip_all)]
    async fn keep_call(&self, call: &CallRecord) -> StoreResult<()> {
        self.write_call(call, true).await
    }

    #[tracing::instrument(skip_all)]
    async fn end_call(&self, fingerprint: &str, request_id: &str) -> StoreResult<bool> {
        let deleted =
            sqlx::query("delete from calls_in_flight where fingerprint = $1 and request_id = $2")
                .bind(fingerprint)
                .bind(request_id)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(deleted > 0)
    }

    #[tracing::instrument(skip_all)]
    async fn find_call(
        &self,
        fingerprint: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<CallRecord>> {
        let row: Option<CallRow> = sqlx::query_as(&format!(
            "select {CALL_COLUMNS} from calls_in_flight where fingerprint = $1 \
             and expires_at > $2 order by started_at desc, request_id desc limit 1"
        ))
        .bind(fingerprint)
        .bind(encode_time(now))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(CallRecord::try_from).transpose()?)
    }

    #[tracing::instrument(skip_all)]
    async fn get_call(
        &self,
        fingerprint: &str,
        request_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<CallRecord>> {
        let row: Option<CallRow> = sqlx::query_as(&format!(
            "select {CALL_COLUMNS} from calls_in_flight where fingerprint = $1 \
             and request_id = $2 and expires_at > $3"
        ))
        .bind(fingerprint)
        .bind(request_id)
        .bind(encode_time(now))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(CallRecord::try_from).transpose()?)
    }

    #[tracing::instrument(skip_all)]
    async fn sweep_calls(&self, now: DateTime<Utc>) -> StoreResult<Vec<String>> {
        let kept: Vec<(Option<String>,)> =
            sqlx::query_as("delete from calls_in_flight where expires_at <= $1 returning result")
                .bind(encode_time(now))
                .fetch_all(&self.pool)
                .await?;
        Ok(kept.into_iter().filter_map(|(result,)| result).collect())
    }
}
