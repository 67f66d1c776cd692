//! The Postgres `ReplicaStore`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::PostgresStore;
use crate::store::StoreResult;
use crate::store::replicas::{ReplicaRow, ReplicaStore};

#[async_trait]
impl ReplicaStore for PostgresStore {
    #[tracing::instrument(skip_all)]
    async fn beat(&self, row: &ReplicaRow, forget_before: DateTime<Utc>) -> StoreResult<()> {
        sqlx::query("delete from replicas where last_seen < $1")
            .bind(forget_before)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "insert into replicas \
             (id, version, started_at, last_seen, calls_in_flight, config_hash) \
             values ($1, $2, $3, $4, $5, $6) \
             on conflict (id) do update set version = excluded.version, \
             started_at = excluded.started_at, last_seen = excluded.last_seen, \
             calls_in_flight = excluded.calls_in_flight, config_hash = excluded.config_hash",
        )
        .bind(&row.id)
        .bind(&row.version)
        .bind(row.started_at)
        .bind(row.last_seen)
        .bind(row.calls_in_flight)
        .bind(&row.config_hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn replicas(&self) -> StoreResult<Vec<ReplicaRow>> {
        Ok(sqlx::query_as(
            "select id, version, started_at, last_seen, calls_in_flight, config_hash \
             from replicas order by id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip_all)]
    async fn forget_replica(&self, id: &str) -> StoreResult<bool> {
        let deleted = sqlx::query("delete from replicas where id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }
}
