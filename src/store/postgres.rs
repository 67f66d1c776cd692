//! The Postgres `Store`: the production database.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgPool, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::{Decode, FromRow, Postgres, QueryBuilder, Type};

use super::rows::{Sum, Timestamp};
use super::{
    GroupBy, KEY_COLUMNS, KeyChanges, KeyRecord, NewKey, RATE_WINDOW_NANOS, RateState, Store,
    StoreError, StoreResult, USAGE_COLUMNS, UsageFilter, UsageRow, UsageTotals,
};

/// The pool is shared by every request and the usage writer; a handful of connections is
/// plenty, and a short acquire timeout turns an exhausted or dead database into a quick
/// error instead of requests that hang.
const MAX_CONNECTIONS: u32 = 10;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// One request of a key against its rpm: the GCRA of the migration `0004_key_limits`, in
/// one upsert. `$2` is the emission interval (the window over rpm) and `$3` the window, in
/// nanoseconds; now is the database's clock, the same for every replica (`excluded.at_ns`
/// in the update). Concurrent requests of one key queue on its row, each seeing the last
/// one's result.
const TAKE_REQUEST: &str = "insert into key_rate_limits as r (key_id, tat_ns, at_ns, allowed) \
     select $1, now_ns + $2, now_ns, true \
     from (select (extract(epoch from clock_timestamp()) * 1000000000)::bigint as now_ns) c \
     on conflict (key_id) do update set \
     allowed = greatest(r.tat_ns, excluded.at_ns) + $2 <= excluded.at_ns + $3, \
     tat_ns = case when greatest(r.tat_ns, excluded.at_ns) + $2 <= excluded.at_ns + $3 \
     then greatest(r.tat_ns, excluded.at_ns) + $2 else r.tat_ns end, \
     at_ns = excluded.at_ns \
     returning allowed, tat_ns, at_ns";

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
            "insert into api_keys (name, prefix, hash, budget_nanousd, budget_period, rpm, \
             max_in_flight, models, expires_at, metadata) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             on conflict (name) where revoked_at is null do nothing returning {KEY_COLUMNS}"
        );
        let limits = &key.limits;
        let row = sqlx::query(&sql)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&key.hash)
            .bind(limits.budget_nanousd)
            .bind(&limits.budget_period)
            .bind(limits.rpm)
            .bind(limits.max_in_flight)
            .bind(limits.models_json())
            .bind(limits.expires_at)
            .bind(limits.metadata_json())
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

    #[tracing::instrument(skip_all, fields(name = %name))]
    async fn update_key(&self, name: &str, changes: &KeyChanges) -> StoreResult<Option<KeyRecord>> {
        // Only the columns that change are named; `name = name` keeps the list non-empty.
        let mut query = QueryBuilder::<Postgres>::new("update api_keys set name = name");
        if let Some((nanousd, period, clear)) = changes.budget_columns() {
            query.push(", budget_nanousd = ").push_bind(nanousd);
            if clear {
                query.push(", budget_period = null");
            } else {
                query
                    .push(", budget_period = coalesce(")
                    .push_bind(period)
                    .push(", budget_period, 'total')");
            }
        }
        if let Some(rpm) = changes.rpm {
            query.push(", rpm = ").push_bind(rpm);
        }
        if let Some(max_in_flight) = changes.max_in_flight {
            query.push(", max_in_flight = ").push_bind(max_in_flight);
        }
        if let Some(models) = changes.models_json() {
            query.push(", models = ").push_bind(models);
        }
        if let Some(expires_at) = changes.expires_at {
            query.push(", expires_at = ").push_bind(expires_at);
        }
        if let Some(metadata) = changes.metadata_json() {
            query.push(", metadata = ").push_bind(metadata);
        }
        query
            .push(" where revoked_at is null and name = ")
            .push_bind(name);
        query.push(format!(" returning {KEY_COLUMNS}"));
        let row = query.build().fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(KeyRecord::from_row).transpose()?)
    }

    #[tracing::instrument(skip_all, fields(key_id = key_id))]
    async fn take_request(&self, key_id: i64, rpm: u32) -> StoreResult<RateState> {
        let (allowed, tat_ns, at_ns) = sqlx::query_as(TAKE_REQUEST)
            .bind(key_id)
            .bind(RATE_WINDOW_NANOS / i64::from(rpm.max(1)))
            .bind(RATE_WINDOW_NANOS)
            .fetch_one(&self.pool)
            .await?;
        Ok(RateState {
            allowed,
            tat_ns,
            at_ns,
        })
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
        // `sum` of bigint is numeric, exact at any size; it travels as text and is read
        // into i128 (a cast back to bigint fails once a sum passes 2^63 - 1).
        let mut query = QueryBuilder::<Postgres>::new(format!(
            "select {group} as grp, count(*) as requests, \
             coalesce(sum(images), 0)::text as images, \
             coalesce(sum(input_tokens), 0)::text as input_tokens, \
             coalesce(sum(output_tokens), 0)::text as output_tokens, \
             coalesce(sum(total_tokens), 0)::text as total_tokens, \
             coalesce(sum(cost_nanousd), 0)::text as cost_nanousd, \
             count(case when cost_nanousd is null then 1 end) as unpriced \
             from usage where true"
        ));
        if let Some(key_name) = &filter.key_name {
            query.push(" and key_name = ").push_bind(key_name);
        }
        if let Some(since) = filter.since {
            query.push(" and created_at >= ").push_bind(since);
        }
        // Byte order, as SQLite sorts, whatever collation the database was created with.
        query.push(format!(" group by 1 order by {group} collate \"C\""));
        let rows = query.build().fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(UsageTotals::from_row)
            .collect::<Result<_, _>>()?)
    }
}
