//! Calls in flight, as every replica sees them: the originals a retry may join, and the
//! results kept for one (see [`crate::dedupe`] and the migration `0011_calls_in_flight`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::rows::Timestamp;
use super::{OnRuntime, StoreResult};

/// Where an original call stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallState {
    /// Its provider call runs on `replica`.
    Running,
    /// Over, its client gone before receiving the answer: the answer is in the result store.
    Kept(KeptCall),
}

/// A kept answer: the result store's object and what its response is sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptCall {
    /// The object's name in the result store.
    pub result: String,
    pub status: u16,
    pub content_type: Option<String>,
    /// The provider that answered (`x-imagegate-provider`).
    pub provider: Option<String>,
}

/// One original call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// Hex of its duplicate-protection fingerprint.
    pub fingerprint: String,
    /// The original's request id: unique per call.
    pub request_id: String,
    /// The replica that runs (or ran) it.
    pub replica: String,
    pub state: CallState,
    pub started_at: DateTime<Utc>,
    /// Past it, the row is ignored and swept: a running call whose replica died, or a kept
    /// answer past `server.duplicate_window`.
    pub expires_at: DateTime<Utc>,
}

/// A `calls_in_flight` row as both databases return it.
#[derive(sqlx::FromRow)]
pub(super) struct CallRow {
    fingerprint: String,
    request_id: String,
    replica: String,
    state: String,
    result: Option<String>,
    status: Option<i32>,
    content_type: Option<String>,
    provider: Option<String>,
    #[sqlx(try_from = "Timestamp")]
    started_at: DateTime<Utc>,
    #[sqlx(try_from = "Timestamp")]
    expires_at: DateTime<Utc>,
}

/// The columns [`CallRow`] reads.
pub(super) const CALL_COLUMNS: &str = "fingerprint, request_id, replica, state, result, status, \
     content_type, provider, started_at, expires_at";

impl TryFrom<CallRow> for CallRecord {
    type Error = sqlx::Error;

    fn try_from(row: CallRow) -> Result<Self, sqlx::Error> {
        let state = match (row.state.as_str(), row.result, row.status) {
            ("running", _, _) => CallState::Running,
            ("kept", Some(result), Some(status)) => CallState::Kept(KeptCall {
                result,
                status: u16::try_from(status).map_err(|e| sqlx::Error::Decode(e.into()))?,
                content_type: row.content_type,
                provider: row.provider,
            }),
            (state, _, _) => {
                return Err(sqlx::Error::Decode(
                    format!("calls_in_flight: unknown state {state:?}").into(),
                ));
            }
        };
        Ok(CallRecord {
            fingerprint: row.fingerprint,
            request_id: row.request_id,
            replica: row.replica,
            state,
            started_at: row.started_at,
            expires_at: row.expires_at,
        })
    }
}

impl CallRecord {
    /// The columns a kept call sets (all null while it runs).
    pub(super) fn kept_columns(
        &self,
    ) -> (&str, Option<&str>, Option<i32>, Option<&str>, Option<&str>) {
        match &self.state {
            CallState::Running => ("running", None, None, None, None),
            CallState::Kept(kept) => (
                "kept",
                Some(kept.result.as_str()),
                Some(i32::from(kept.status)),
                kept.content_type.as_deref(),
                kept.provider.as_deref(),
            ),
        }
    }
}

/// The calls in flight that every replica shares.
#[async_trait]
pub trait CallStore: Send + Sync {
    /// Registers a running original; nothing when its row exists already.
    async fn register_call(&self, call: &CallRecord) -> StoreResult<()>;
    /// Writes the call as it now stands (kept, with its new expiry), registered or not.
    async fn keep_call(&self, call: &CallRecord) -> StoreResult<()>;
    /// Forgets a call whose answer was delivered or failed; false when it was not there.
    async fn end_call(&self, fingerprint: &str, request_id: &str) -> StoreResult<bool>;
    /// The newest call with this fingerprint not expired at `now`.
    async fn find_call(
        &self,
        fingerprint: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<CallRecord>>;
    /// One call, if it is there and not expired at `now`.
    async fn get_call(
        &self,
        fingerprint: &str,
        request_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<CallRecord>>;
    /// Deletes the calls expired at `now`; the names of the kept results they held, for the
    /// caller to delete from the result store.
    async fn sweep_calls(&self, now: DateTime<Utc>) -> StoreResult<Vec<String>>;
}

#[async_trait]
impl CallStore for OnRuntime {
    async fn register_call(&self, call: &CallRecord) -> StoreResult<()> {
        let call = call.clone();
        self.run(|s| async move { s.register_call(&call).await })
            .await
    }
    async fn keep_call(&self, call: &CallRecord) -> StoreResult<()> {
        let call = call.clone();
        self.run(|s| async move { s.keep_call(&call).await }).await
    }
    async fn end_call(&self, fingerprint: &str, request_id: &str) -> StoreResult<bool> {
        let (fingerprint, request_id) = (fingerprint.to_owned(), request_id.to_owned());
        self.run(|s| async move { s.end_call(&fingerprint, &request_id).await })
            .await
    }
    async fn find_call(
        &self,
        fingerprint: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<CallRecord>> {
        let fingerprint = fingerprint.to_owned();
        self.run(move |s| async move { s.find_call(&fingerprint, now).await })
            .await
    }
    async fn get_call(
        &self,
        fingerprint: &str,
        request_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<CallRecord>> {
        let (fingerprint, request_id) = (fingerprint.to_owned(), request_id.to_owned());
        self.run(move |s| async move { s.get_call(&fingerprint, &request_id, now).await })
            .await
    }
    async fn sweep_calls(&self, now: DateTime<Utc>) -> StoreResult<Vec<String>> {
        self.run(move |s| async move { s.sweep_calls(now).await })
            .await
    }
}
