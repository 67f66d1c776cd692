//! The SQLite `RefusalStore`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite};

use super::{SqliteStore, encode_time};
use crate::store::StoreResult;
use crate::store::refusals::{RefusalCount, RefusalStore, RefusalTotal};

/// Counts per statement: four parameters each, far below the bind-parameter limit.
const INSERT_COUNTS: usize = 1000;

#[async_trait]
impl RefusalStore for SqliteStore {
    #[tracing::instrument(skip_all, fields(counts = counts.len()))]
    async fn add_refusals(&self, counts: &[RefusalCount]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for slice in counts.chunks(INSERT_COUNTS) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "insert into refusals as r (key_name, reason, minute, count) ",
            );
            query.push_values(slice, |mut b, c| {
                b.push_bind(&c.key_name)
                    .push_bind(&c.reason)
                    .push_bind(encode_time(c.minute))
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
        let mut query = QueryBuilder::<Sqlite>::new(
            "select key_name, reason, sum(count) as count from refusals where true",
        );
        if let Some(key_name) = key_name {
            query
                .push(" and key_name = ")
                .push_bind(key_name.to_owned());
        }
        if let Some(since) = since {
            query.push(" and minute >= ").push_bind(encode_time(since));
        }
        if let Some(until) = until {
            query.push(" and minute < ").push_bind(encode_time(until));
        }
        query.push(" group by key_name, reason order by key_name, reason");
        Ok(query.build_query_as().fetch_all(&self.pool).await?)
    }
}
