//! Refused requests per key, reason and minute (see the migration `0014_refusals`): what
//! the dashboard and the admin API show next to the usage rows, which hold only the calls
//! that were sent.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{OnRuntime, StoreResult};

/// Refusals of one key for one reason within one UTC minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalCount {
    pub key_name: String,
    /// `rpm`, `budget`, `in_flight`, `model_not_allowed` or `expired`.
    pub reason: String,
    /// The minute's first instant.
    pub minute: DateTime<Utc>,
    pub count: i64,
}

/// One key's refusals for one reason over a period.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RefusalTotal {
    pub key_name: String,
    pub reason: String,
    pub count: i64,
}

/// The `refusals` table.
#[async_trait]
pub trait RefusalStore: Send + Sync {
    /// Adds each count to its (key, reason, minute), in one transaction.
    async fn add_refusals(&self, counts: &[RefusalCount]) -> StoreResult<()>;
    /// Totals per key and reason of the minutes in `[since, until)` (each bound optional),
    /// of one key when `key_name` is given; by key name, then reason.
    async fn refusal_totals(
        &self,
        key_name: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> StoreResult<Vec<RefusalTotal>>;
}

#[async_trait]
impl RefusalStore for OnRuntime {
    async fn add_refusals(&self, counts: &[RefusalCount]) -> StoreResult<()> {
        let counts = counts.to_vec();
        self.run(move |s| async move { s.add_refusals(&counts).await })
            .await
    }
    async fn refusal_totals(
        &self,
        key_name: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> StoreResult<Vec<RefusalTotal>> {
        let key_name = key_name.map(str::to_owned);
        self.run(move |s| async move { s.refusal_totals(key_name.as_deref(), since, until).await })
            .await
    }
}
