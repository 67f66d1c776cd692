//! Refused requests of known keys, counted in memory per key, reason and minute and added
//! to the database in batches ([`flush_every`]): a flood of refused requests costs a map
//! entry each, never a write each. [`crate::gate`] counts them, in one place, from the
//! error a key's response carries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::store::{RefusalCount, Store};

/// How often counts go to the database.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The reason a key's request was refused before it reached a provider, if it was: over
/// its `rpm` (`rpm`), its budget (`budget`: spent, or a model it cannot pay for), its
/// requests in flight (`in_flight`), or outside its models (`model_not_allowed`).
pub fn reason(error: &ApiError) -> Option<&'static str> {
    match error {
        ApiError::KeyRateLimit { .. } => Some("rpm"),
        ApiError::InsufficientQuota { .. } | ApiError::UnpricedOverBudget(_) => Some("budget"),
        ApiError::KeyInFlightLimit { .. } => Some("in_flight"),
        ApiError::ModelNotAllowed(_) => Some("model_not_allowed"),
        _ => None,
    }
}

/// Refusals of one key for one reason within one UTC minute (its first instant).
type Bucket = (String, &'static str, DateTime<Utc>);

/// The counts not yet in the database.
#[derive(Default)]
pub struct Refusals {
    counts: Mutex<HashMap<Bucket, i64>>,
}

impl Refusals {
    /// Counts one refusal of `key` for `reason`, now.
    pub fn count(&self, key: &str, reason: &'static str) {
        let minute = Utc::now()
            .duration_trunc(TimeDelta::minutes(1))
            .unwrap_or_else(|_| Utc::now());
        *self
            .lock()
            .entry((key.to_owned(), reason, minute))
            .or_default() += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Bucket, i64>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the counts held to the database; on failure they are kept for the next time.
    pub async fn flush(&self, store: &dyn Store) {
        let taken: Vec<_> = self.lock().drain().collect();
        if taken.is_empty() {
            return;
        }
        let counts: Vec<RefusalCount> = taken
            .iter()
            .map(|((key, reason, minute), count)| RefusalCount {
                key_name: key.clone(),
                reason: (*reason).to_owned(),
                minute: *minute,
                count: *count,
            })
            .collect();
        if let Err(err) = store.add_refusals(&counts).await {
            tracing::warn!(%err, counts = counts.len(), "refusal counts not written; kept for the next try");
            let mut held = self.lock();
            for (entry, count) in taken {
                *held.entry(entry).or_default() += count;
            }
        }
    }
}

/// Writes the counts every [`FLUSH_EVERY`] until `stop`, then once more.
pub async fn flush_every(refusals: Arc<Refusals>, store: Arc<dyn Store>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(FLUSH_EVERY) => {}
        }
        refusals.flush(store.as_ref()).await;
    }
    refusals.flush(store.as_ref()).await;
}
