//! The SQLite `Store`: one file, for a single instance, a demo or a laptop.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteTypeInfo,
    SqliteValueRef,
};
use sqlx::{Decode, FromRow, QueryBuilder, Sqlite, Type};

use super::rows::{Sum, Timestamp};
use super::{
    GroupBy, KeyRecord, NewKey, PageCursor, Store, StoreError, StoreResult, USAGE_COLUMNS,
    UsageFilter, UsageRow, UsageTotals, report_columns,
};

/// SQLite takes one writer at a time; a few connections let reads (key lookups, reports)
/// go on beside the usage writer, and the busy timeout makes writers queue instead of
/// failing at once with "database is locked".
const MAX_CONNECTIONS: u32 = 5;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Timestamps are stored as UTC text in this fixed-width form rather than sqlx's own
/// encoding (RFC 3339 with a variable number of fractional digits): with a fixed width,
/// comparing text is comparing instants, so `since` can use the index, and the first ten
/// characters are the UTC day. Six digits is what Postgres keeps too.
const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.6f";

const KEY_COLUMNS: &str = "id, name, prefix, hash, created_at, revoked_at";

/// Rows per insert statement: 27 columns each stays far below the bind-parameter limit.
const INSERT_ROWS: usize = 256;

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if need be) the database file and the directory it lives in.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT);
        // In-memory databases have a bare name, so no parent, and nothing is created.
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                tokio::fs::create_dir_all(dir).await?;
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}

fn encode_time(time: DateTime<Utc>) -> String {
    time.format(TIME_FORMAT).to_string()
}

fn decode_time(text: &str) -> Result<DateTime<Utc>, String> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .map(|naive| naive.and_utc())
        .map_err(|err| format!("bad timestamp {text:?}: {err}"))
}

impl Type<Sqlite> for Timestamp {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Sqlite> for Timestamp {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(Timestamp(decode_time(text)?))
    }
}

/// SQLite's `sum` of integers fails with "integer overflow" past i64 (and `total` is a
/// float, inexact past 2^53). So each column is summed in two halves that cannot overflow
/// before 2^31 rows: the high 32 bits (an arithmetic shift, so negatives stay exact) and
/// the low 32 bits, sent as `hi:lo` text and put back together in i128 ([`Sum`]).
fn split_sum(column: &str) -> String {
    format!(
        "(coalesce(sum({column} >> 32), 0) || ':' || \
         coalesce(sum({column} & 4294967295), 0)) as {column}"
    )
}

impl Type<Sqlite> for Sum {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Sqlite> for Sum {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        let halves = text
            .split_once(':')
            .and_then(|(hi, lo)| Some((hi.parse::<i64>().ok()?, lo.parse::<i64>().ok()?)));
        let (hi, lo) = halves.ok_or_else(|| format!("sum {text:?} is not hi:lo"))?;
        Ok(Sum((i128::from(hi) << 32) + i128::from(lo)))
    }
}

/// The SQL a report groups by. Static text only: nothing a caller sends reaches it.
fn group_expr(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Key => "key_name",
        GroupBy::Model => "model",
        GroupBy::Provider => "provider",
        // Stored text is UTC, so its date part is the UTC day.
        GroupBy::Day => "date(created_at)",
        GroupBy::Hour => "substr(created_at, 1, 10) || 'T' || substr(created_at, 12, 2) || ':00Z'",
    }
}

/// The `and ...` conditions of a filter, after a `where true`.
fn push_filter(query: &mut QueryBuilder<'_, Sqlite>, filter: &UsageFilter) {
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
        query
            .push(" and created_at >= ")
            .push_bind(encode_time(since));
    }
    if let Some(until) = filter.until {
        query
            .push(" and created_at < ")
            .push_bind(encode_time(until));
    }
}

#[async_trait]
impl Store for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(name = %key.name))]
    async fn create_key(&self, key: NewKey) -> StoreResult<KeyRecord> {
        // `on conflict (name)` rather than catching the error: SQLite reports no constraint
        // name, only a message, and a clash on the hash must still surface as an error.
        let sql = format!(
            "insert into api_keys (name, prefix, hash, created_at) values ($1, $2, $3, $4) \
             on conflict (name) where revoked_at is null do nothing returning {KEY_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&key.hash)
            .bind(encode_time(Utc::now()))
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
            "update api_keys set revoked_at = $1 where name = $2 and revoked_at is null",
        )
        .bind(encode_time(Utc::now()))
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
        // One multi-row statement per slice: a round trip per row would cost the database
        // more than imagegate spends on the request itself.
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        for slice in rows.chunks(INSERT_ROWS) {
            let mut query =
                QueryBuilder::<Sqlite>::new(format!("insert into usage ({USAGE_COLUMNS}) "));
            query.push_values(slice, |mut b, row| {
                b.push_bind(&row.request_id)
                    .push_bind(row.key_id)
                    .push_bind(&row.key_name)
                    .push_bind(&row.model)
                    .push_bind(&row.provider)
                    .push_bind(&row.upstream_model)
                    .push_bind(&row.endpoint)
                    .push_bind(row.status)
                    .push_bind(row.outcome.as_str())
                    .push_bind(row.streamed)
                    .push_bind(row.n)
                    .push_bind(&row.size)
                    .push_bind(&row.quality)
                    .push_bind(row.images)
                    .push_bind(row.stored_tokens(row.text_input_tokens))
                    .push_bind(row.stored_tokens(row.image_input_tokens))
                    .push_bind(row.stored_tokens(row.cached_text_input_tokens))
                    .push_bind(row.stored_tokens(row.cached_image_input_tokens))
                    .push_bind(row.stored_tokens(row.input_tokens))
                    .push_bind(row.stored_tokens(row.output_tokens))
                    .push_bind(row.stored_tokens(row.total_tokens))
                    .push_bind(row.cost_nanousd)
                    .push_bind(row.latency_ms)
                    .push_bind(encode_time(row.created_at))
                    .push_bind(&row.raw_usage)
                    .push_bind(row.usage_suspect)
                    .push_bind(row.cost_estimated);
            });
            query.push(" on conflict (request_id) do nothing");
            inserted += query.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
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
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "select {group} as grp, {} from usage where true",
            report_columns(split_sum)
        ));
        push_filter(&mut query, filter);
        query.push(" group by grp order by grp");
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
            QueryBuilder::<Sqlite>::new(format!("select {USAGE_COLUMNS} from usage where true"));
        push_filter(&mut query, filter);
        if let Some(after) = after {
            query
                .push(" and (created_at, request_id) < (")
                .push_bind(encode_time(after.created_at))
                .push(", ")
                .push_bind(after.request_id.clone())
                .push(")");
        }
        query
            .push(" order by created_at desc, request_id desc limit ")
            .push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(UsageRow::from_row)
            .collect::<Result<_, _>>()?)
    }
}
