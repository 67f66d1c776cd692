//! The Postgres `Store`: the production database.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgPool, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::{Decode, FromRow, Postgres, QueryBuilder, Type};

use super::rows::{Sum, Timestamp};
use super::{
    GroupBy, KeyRecord, NewKey, PageCursor, Store, StoreError, StoreResult, USAGE_COLUMNS,
    UsageFilter, UsageRow, UsageTotals, report_columns,
};

/// The pool is shared by every request and the usage writer; a handful of connections is
/// plenty, and a short acquire timeout turns an exhausted or dead database into a quick
/// error instead of requests that hang.
const MAX_CONNECTIONS: u32 = 10;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const KEY_COLUMNS: &str = "id, name, prefix, hash, created_at, revoked_at";

/// Usage rows as column arrays (see `insert_usage`), in [`USAGE_COLUMNS`]' order.
const INSERT_USAGE: &str = concat!(
    "insert into usage (",
    usage_columns!(),
    ") select * from unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::int4[], $9::text[], $10::bool[], $11::int4[], $12::text[], \
     $13::text[], $14::int4[], $15::int8[], $16::int8[], $17::int8[], $18::int8[], $19::int8[], \
     $20::int8[], $21::int8[], $22::int8[], $23::int8[], $24::timestamptz[], $25::text[], \
     $26::bool[], $27::bool[]) \
     on conflict (request_id) do nothing"
);

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Opens a pool and one connection now, so a wrong URL fails at startup.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        Ok(Self { pool })
    }
}

impl Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Timestamp {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Timestamp(<DateTime<Utc> as Decode<Postgres>>::decode(
            value,
        )?))
    }
}

/// Postgres sends a sum as its decimal text (see `usage_report`).
impl Type<Postgres> for Sum {
    fn type_info() -> PgTypeInfo {
        <String as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <String as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Sum {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Postgres>>::decode(value)?;
        let sum = text
            .parse()
            .map_err(|err| format!("sum {text:?} is not an integer: {err}"))?;
        Ok(Sum(sum))
    }
}

/// The SQL a report groups by. Static text only: nothing a caller sends reaches it.
fn group_expr(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Key => "key_name",
        GroupBy::Model => "model",
        GroupBy::Provider => "provider",
        // The session time zone is the server's choice; a day in a report is a UTC day.
        GroupBy::Day => "to_char(created_at at time zone 'UTC', 'YYYY-MM-DD')",
        GroupBy::Hour => "to_char(created_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:00\"Z\"')",
    }
}

/// `sum` of bigint is numeric, exact at any size; it travels as text and is read into i128
/// (a cast back to bigint fails once a sum passes 2^63 - 1).
fn exact_sum(column: &str) -> String {
    format!("coalesce(sum({column}), 0)::text as {column}")
}

/// The `and ...` conditions of a filter, after a `where true`.
fn push_filter(query: &mut QueryBuilder<'_, Postgres>, filter: &UsageFilter) {
    let texts = [
        ("key_name", &filter.key_name),
        ("model", &filter.model),
        ("provider", &filter.provider),
    ];
    for (column, value) in texts {
        if let Some(value) = value {
            query
                .push(format!(" and {column} = "))
                .push_bind(value.clone());
        }
    }
    if let Some(since) = filter.since {
        query.push(" and created_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        query.push(" and created_at < ").push_bind(until);
    }
}

#[async_trait]
impl Store for PostgresStore {
    #[tracing::instrument(skip_all)]
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(name = %key.name))]
    async fn create_key(&self, key: NewKey) -> StoreResult<KeyRecord> {
        // `on conflict (name)` rather than catching the error: it names the one constraint
        // that means "duplicate name", and a clash on the hash still surfaces as an error.
        let sql = format!(
            "insert into api_keys (name, prefix, hash) values ($1, $2, $3) \
             on conflict (name) where revoked_at is null do nothing returning {KEY_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&key.hash)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(KeyRecord::from_row(&row)?),
            None => Err(StoreError::DuplicateKeyName(key.name)),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn list_keys(&self) -> StoreResult<Vec<KeyRecord>> {
        let sql = format!("select {KEY_COLUMNS} from api_keys order by id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(KeyRecord::from_row)
            .collect::<Result<_, _>>()?)
    }

    #[tracing::instrument(skip_all, fields(name = %name))]
    async fn revoke_key(&self, name: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "update api_keys set revoked_at = now() where name = $1 and revoked_at is null",
        )
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(skip_all)]
    async fn find_key_by_hash(&self, hash: &str) -> StoreResult<Option<KeyRecord>> {
        let sql = format!("select {KEY_COLUMNS} from api_keys where hash = $1");
        let row = sqlx::query(&sql)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(KeyRecord::from_row).transpose()?)
    }

    #[tracing::instrument(skip_all, fields(rows = rows.len()))]
    async fn insert_usage(&self, rows: &[UsageRow]) -> StoreResult<u64> {
        // One statement per batch, whatever its size: each column goes as one array and
        // `unnest` turns the arrays back into rows. The text never changes, so the
        // statement is parsed and planned once per connection, not once per batch (a
        // round trip per row would cost the database more than imagegate spends on the
        // request itself).
        fn column<'a, T>(rows: &'a [UsageRow], f: impl Fn(&'a UsageRow) -> T) -> Vec<T> {
            rows.iter().map(f).collect()
        }
        let inserted = sqlx::query(INSERT_USAGE)
            .bind(column(rows, |r| r.request_id.as_str()))
            .bind(column(rows, |r| r.key_id))
            .bind(column(rows, |r| r.key_name.as_str()))
            .bind(column(rows, |r| r.model.as_str()))
            .bind(column(rows, |r| r.provider.as_str()))
            .bind(column(rows, |r| r.upstream_model.as_str()))
            .bind(column(rows, |r| r.endpoint.as_str()))
            .bind(column(rows, |r| r.status))
            .bind(column(rows, |r| r.outcome.as_str()))
            .bind(column(rows, |r| r.streamed))
            .bind(column(rows, |r| r.n))
            .bind(column(rows, |r| r.size.as_deref()))
            .bind(column(rows, |r| r.quality.as_deref()))
            .bind(column(rows, |r| r.images))
            .bind(column(rows, |r| r.stored_tokens(r.text_input_tokens)))
            .bind(column(rows, |r| r.stored_tokens(r.image_input_tokens)))
            .bind(column(rows, |r| {
                r.stored_tokens(r.cached_text_input_tokens)
            }))
            .bind(column(rows, |r| {
                r.stored_tokens(r.cached_image_input_tokens)
            }))
            .bind(column(rows, |r| r.stored_tokens(r.input_tokens)))
            .bind(column(rows, |r| r.stored_tokens(r.output_tokens)))
            .bind(column(rows, |r| r.stored_tokens(r.total_tokens)))
            .bind(column(rows, |r| r.cost_nanousd))
            .bind(column(rows, |r| r.latency_ms))
            .bind(column(rows, |r| r.created_at))
            .bind(column(rows, |r| r.raw_usage.as_deref()))
            .bind(column(rows, |r| r.usage_suspect))
            .bind(column(rows, |r| r.cost_estimated))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(inserted)
    }

    #[tracing::instrument(skip_all, fields(request_id = %request_id))]
    async fn usage_for_request(&self, request_id: &str) -> StoreResult<Vec<UsageRow>> {
        let sql = format!(
            "select {USAGE_COLUMNS} from usage where request_id = $1 order by created_at, id"
        );
        let rows = sqlx::query(&sql)
            .bind(request_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(UsageRow::from_row)
            .collect::<Result<_, _>>()?)
    }

    #[tracing::instrument(skip_all)]
    async fn recent_usage(&self, limit: i64) -> StoreResult<Vec<UsageRow>> {
        let sql =
            format!("select {USAGE_COLUMNS} from usage order by created_at desc, id desc limit $1");
        let rows = sqlx::query(&sql).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(UsageRow::from_row)
            .collect::<Result<_, _>>()?)
    }

    #[tracing::instrument(skip_all, fields(group_by = ?filter.group_by))]
    async fn usage_report(&self, filter: &UsageFilter) -> StoreResult<Vec<UsageTotals>> {
        let group = group_expr(filter.group_by);
        let mut query = QueryBuilder::<Postgres>::new(format!(
            "select {group} as grp, {} from usage where true",
            report_columns(exact_sum)
        ));
        push_filter(&mut query, filter);
        // Byte order, as SQLite sorts, whatever collation the database was created with.
        query.push(format!(" group by 1 order by {group} collate \"C\""));
        let rows = query.build().fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(UsageTotals::from_row)
            .collect::<Result<_, _>>()?)
    }

    #[tracing::instrument(skip_all, fields(limit))]
    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<&PageCursor>,
        limit: i64,
    ) -> StoreResult<Vec<UsageRow>> {
        let mut query =
            QueryBuilder::<Postgres>::new(format!("select {USAGE_COLUMNS} from usage where true"));
        push_filter(&mut query, filter);
        // Request ids in byte order, as SQLite compares them.
        if let Some(after) = after {
            query
                .push(" and (created_at, request_id collate \"C\") < (")
                .push_bind(after.created_at)
                .push(", ")
                .push_bind(after.request_id.clone())
                .push(")");
        }
        query
            .push(" order by created_at desc, request_id collate \"C\" desc limit ")
            .push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(UsageRow::from_row)
            .collect::<Result<_, _>>()?)
    }
}
