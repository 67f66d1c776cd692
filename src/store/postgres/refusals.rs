//! The Postgres `RefusalStore`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, QueryBuilder};

use super::PostgresStore;
use crate::store::StoreResult;
use crate::store::refusals::{RefusalCount, RefusalStore, RefusalTotal};

/// Counts written by one statement (4 bound values each).
const INSERT_COUNTS: usize = 1000;

#[async_trait]
impl RefusalStore for PostgresStore {
    #[tracing::instrument(skip_all, fields(counts = counts.len()))]
    async fn add_refusals(&self, counts: &[RefusalCount]) -> StoreResult<()> {
        if counts.is_empty() {
            return Ok(());
        }
        // In slices: a statement takes at most 65,535 bound values, and counts kept through a
        // long database outage can be more than a statement's worth.
        let mut tx = self.pool.begin().await?;
        for slice in counts.chunks(INSERT_COUNTS) {
            let mut query = QueryBuilder::<Postgres>::new(
                "insert into refusals as r (key_name, reason, minute, count) ",
            );
            query.push_values(slice, |mut b, c| {
                b.push_bind(&c.key_name)
                    .push_bind(&c.reason)
                    .push_bind(c.minute)
                    .push_bind(c.count);
            });
            query.push(
                " on conflict (key_name, reason, minute) do update set count = r.count + excluded.count",
            );
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn refusal_totals(
        &self,
        key_name: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> StoreResult<Vec<RefusalTotal>> {
        let mut query = QueryBuilder::<Postgres>::new(
            "select key_name, reason, sum(count)::int8 as count from refusals where true",
        );
        if let Some(key_name) = key_name {
            query
                .push(" and key_name = ")
                .push_bind(key_name.to_owned());
        }
        if let Some(since) = since {
            query.push(" and minute >= ").push_bind(since);
        }
        if let Some(until) = until {
            query.push(" and minute < ").push_bind(until);
        }
        query.push(
            " group by key_name, reason order by key_name collate \"C\", reason collate \"C\"",
        );
        Ok(query.build_query_as().fetch_all(&self.pool).await?)
    }
}
