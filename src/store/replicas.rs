//! Replicas' heartbeat rows: which imagegate processes share the database, what each runs
//! (version, settings' hash) and when it was last seen (see `crate::replicas`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::rows::Timestamp;
use super::{OnRuntime, StoreResult};

/// One replica as its heartbeat wrote it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReplicaRow {
    /// The replica's name (`AppState::replica`).
    pub id: String,
    pub version: String,
    #[sqlx(try_from = "Timestamp")]
    pub started_at: DateTime<Utc>,
    /// When its heartbeat last wrote the row, by its own clock.
    #[sqlx(try_from = "Timestamp")]
    pub last_seen: DateTime<Utc>,
    /// Its keyed requests in flight when it last wrote the row.
    pub calls_in_flight: i64,
    /// `Config::hash` of the settings it runs.
    pub config_hash: String,
}

/// The `replicas` table.
#[async_trait]
pub trait ReplicaStore: Send + Sync {
    /// Writes `row`, replacing the one with its id; first deletes the rows last seen before
    /// `forget_before` (replicas gone without a clean stop).
    async fn beat(&self, row: &ReplicaRow, forget_before: DateTime<Utc>) -> StoreResult<()>;
    /// Every row, by id.
    async fn replicas(&self) -> StoreResult<Vec<ReplicaRow>>;
    /// Deletes the row of `id` (a clean stop); false when there was none.
    async fn forget_replica(&self, id: &str) -> StoreResult<bool>;
}

#[async_trait]
impl ReplicaStore for OnRuntime {
    async fn beat(&self, row: &ReplicaRow, forget_before: DateTime<Utc>) -> StoreResult<()> {
        let row = row.clone();
        self.run(move |s| async move { s.beat(&row, forget_before).await })
            .await
    }
    async fn replicas(&self) -> StoreResult<Vec<ReplicaRow>> {
        self.run(|s| async move { s.replicas().await }).await
    }
    async fn forget_replica(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.run(move |s| async move { s.forget_replica(&id).await })
            .await
    }
}
