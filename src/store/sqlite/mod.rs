//! The SQLite `Store`: one file, for a single instance, a demo or a laptop.

mod calls;
mod jobs;
mod notices;
mod refusals;
mod replicas;

use std::collections::BTreeMap;
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

use super::budget::{BudgetState, KeyBudget, Reservation, Reserved, Settlement, verdict};
use super::notices::Notice;
use super::rows::{Sum, Timestamp};
use super::{
    GroupBy, KEY_COLUMNS, KeyChanges, KeyRecord, NewKey, PageCursor, RATE_WINDOW_NANOS, RateState,
    Store, StoreError, StoreResult, USAGE_COLUMNS, UsageFilter, UsageRow, UsageTotals,
    report_columns,
};
use crate::private_fs;

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

/// Postgres's statement (see there), with now as `$4` from this process's clock: one node.
const TAKE_REQUEST: &str = "insert into key_rate_limits as r (key_id, tat_ns, at_ns, allowed) \
     values ($1, $4 + $2, $4, true) \
     on conflict (key_id) do update set \
     allowed = max(r.tat_ns, excluded.at_ns) + $2 <= excluded.at_ns + $3, \
     tat_ns = case when max(r.tat_ns, excluded.at_ns) + $2 <= excluded.at_ns + $3 \
     then max(r.tat_ns, excluded.at_ns) + $2 else r.tat_ns end, \
     at_ns = excluded.at_ns \
     returning allowed, tat_ns, at_ns";

/// Rows per insert statement: 30 columns each stays far below the bind-parameter limit.
const INSERT_ROWS: usize = 256;

pub struct SqliteStore {
    pool: SqlitePool,
    /// Key changes and reloads, to this process's listener (one node: no other to tell).
    notices: tokio::sync::broadcast::Sender<Notice>,
}

impl SqliteStore {
    /// Opens (creating if need be) the database file and the directory it lives in, both
    /// for imagegate's user only (see [`private_fs`]).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT);
        // `sqlite::memory:` or `?mode=memory`, as sqlx reads them: no file at all.
        let in_memory = url.contains(":memory:")
            || url
                .split_once('?')
                .is_some_and(|(_, query)| query.split('&').any(|pair| pair == "mode=memory"));
        if !in_memory {
            let file = options.get_filename();
            if let Some(dir) = file.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                private_fs::create_dir_all_async(dir).await?;
            }
            // SQLite would create the file with the umask's mode, and its -wal and -shm
            // files take the database file's: made 0600 first, all three are.
            private_fs::ensure_file(file)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            notices: tokio::sync::broadcast::Sender::new(notices::BACKLOG),
        })
    }
}

fn encode_time(time: DateTime<Utc>) -> String {
    time.format(TIME_FORMAT).to_string()
}

/// A timestamp read back as plain text (outside a `FromRow`).
fn stored_time(text: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    decode_time(text).map_err(|err| sqlx::Error::Decode(err.into()))
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
    async fn migrate(&self) -> StoreResult<super::Migrated> {
        let migrator = sqlx::migrate!("migrations/sqlite");
        let before = {
            use sqlx::migrate::Migrate as _;
            let mut conn = self.pool.acquire().await?;
            conn.ensure_migrations_table().await?;
            conn.list_applied_migrations().await?.len()
        };
        migrator.run(&self.pool).await?;
        Ok(super::Migrated::new(migrator.migrations.len(), before))
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
            "insert into api_keys (name, prefix, hash, created_at, budget_nanousd, \
             budget_period, rpm, max_in_flight, models, expires_at, metadata) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             on conflict (name) where revoked_at is null do nothing returning {KEY_COLUMNS}"
        );
        let limits = &key.limits;
        let row = sqlx::query(&sql)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&key.hash)
            .bind(encode_time(Utc::now()))
            .bind(limits.budget_nanousd)
            .bind(&limits.budget_period)
            .bind(limits.rpm)
            .bind(limits.max_in_flight)
            .bind(limits.models_json())
            .bind(limits.expires_at.map(encode_time))
            .bind(limits.metadata_json())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::DuplicateKeyName(key.name));
        };
        let record = KeyRecord::from_row(&row)?;
        notices::publish(&self.notices, Notice::Key { id: record.id });
        Ok(record)
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
        let revoked: Option<(i64,)> = sqlx::query_as(
            "update api_keys set revoked_at = $1 where name = $2 and revoked_at is null \
             returning id",
        )
        .bind(encode_time(Utc::now()))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id,)) = revoked else {
            return Ok(false);
        };
        notices::publish(&self.notices, Notice::Key { id });
        Ok(true)
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

    #[tracing::instrument(skip_all, fields(key_id))]
    async fn find_key_by_id(&self, key_id: i64) -> StoreResult<Option<KeyRecord>> {
        let sql = format!("select {KEY_COLUMNS} from api_keys where id = $1");
        let row = sqlx::query(&sql)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(KeyRecord::from_row).transpose()?)
    }

    #[tracing::instrument(skip_all, fields(name = %name))]
    async fn update_key(&self, name: &str, changes: &KeyChanges) -> StoreResult<Option<KeyRecord>> {
        // Only the columns that change are named; `name = name` keeps the list non-empty.
        let mut query = QueryBuilder::<Sqlite>::new("update api_keys set name = name");
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
            query
                .push(", expires_at = ")
                .push_bind(expires_at.map(encode_time));
        }
        if let Some(metadata) = changes.metadata_json() {
            query.push(", metadata = ").push_bind(metadata);
        }
        query
            .push(" where revoked_at is null and name = ")
            .push_bind(name);
        query.push(format!(" returning {KEY_COLUMNS}"));
        let row = query.build().fetch_optional(&self.pool).await?;
        let record = row.as_ref().map(KeyRecord::from_row).transpose()?;
        if let Some(record) = &record {
            notices::publish(&self.notices, Notice::Key { id: record.id });
        }
        Ok(record)
    }

    #[tracing::instrument(skip_all, fields(key_id = key_id))]
    async fn take_request(&self, key_id: i64, rpm: u32) -> StoreResult<RateState> {
        let now_ns = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let (allowed, tat_ns, at_ns) = sqlx::query_as(TAKE_REQUEST)
            .bind(key_id)
            .bind(RATE_WINDOW_NANOS / i64::from(rpm.max(1)))
            .bind(RATE_WINDOW_NANOS)
            .bind(now_ns)
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
        // One multi-row statement per slice: a round trip per row would cost the database
        // more than imagegate spends on the request itself.
        let mut tx = self.pool.begin().await?;
        let mut inserted = Vec::new();
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
                    .push_bind(row.cost_estimated)
                    .push_bind(row.attempt)
                    .push_bind(&row.client_request_id)
                    .push_bind(&row.cause);
            });
            query.push(
                " on conflict (request_id) do nothing \
                 returning key_id, request_id, cost_nanousd, created_at",
            );
            let rows: Vec<(i64, String, Option<i64>, String)> =
                query.build_query_as().fetch_all(&mut *tx).await?;
            inserted.extend(rows);
        }
        settle(&mut tx, &inserted).await?;
        tx.commit().await?;
        Ok(inserted.len() as u64)
    }

    #[tracing::instrument(skip_all, fields(key_id = reservation.key_id))]
    async fn reserve(&self, reservation: &Reservation) -> StoreResult<Reserved> {
        let r = reservation;
        // A write first, so that the transaction holds SQLite's one write lock from its
        // start: reservations queue instead of reading a state another one is changing.
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "insert into budget_state (key_id, period_start, spent_nanousd, reserved_nanousd) \
             values ($1, $2, 0, 0) on conflict (key_id) do nothing",
        )
        .bind(r.key_id)
        .bind(encode_time(DateTime::UNIX_EPOCH))
        .execute(&mut *tx)
        .await?;
        // The budget as stored now, read under the write lock: a change of it either
        // committed before (and counts) or waits for this reservation.
        let key: Option<(Option<i64>, Option<String>, bool)> = sqlx::query_as(
            "select budget_nanousd, budget_period, revoked_at is not null from api_keys \
             where id = $1",
        )
        .bind(r.key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (limit, period) = match KeyBudget::of(key) {
            KeyBudget::Limit { nanousd, period } => (nanousd, period),
            // The rollback (on drop) takes back the row made above.
            KeyBudget::Unlimited => return Ok(Reserved::Unlimited),
            KeyBudget::Revoked => return Ok(Reserved::KeyRevoked),
        };
        let period_start = period.start(r.now);
        let (stored_start, spent, reserved): (String, i64, i64) = sqlx::query_as(
            "select period_start, spent_nanousd, reserved_nanousd from budget_state \
             where key_id = $1",
        )
        .bind(r.key_id)
        .fetch_one(&mut *tx)
        .await?;
        let (expired,): (Option<i64>,) = sqlx::query_as(
            "select sum(amount_nanousd) from budget_reservations \
             where key_id = $1 and expires_at < $2",
        )
        .bind(r.key_id)
        .bind(encode_time(r.now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("delete from budget_reservations where key_id = $1 and expires_at < $2")
            .bind(r.key_id)
            .bind(encode_time(r.now))
            .execute(&mut *tx)
            .await?;
        // A call raising its own hold (a field that arrived after it raised its worst
        // case) is weighed without what it holds already.
        let (prior,): (Option<i64>,) = sqlx::query_as(
            "select max(amount_nanousd) from budget_reservations \
             where request_id = $1 and key_id = $2",
        )
        .bind(&r.request_id)
        .bind(r.key_id)
        .fetch_one(&mut *tx)
        .await?;
        let prior = prior.unwrap_or(0);
        let spent = if stored_time(&stored_start)? < period_start {
            0
        } else {
            spent
        };
        let others = reserved - expired.unwrap_or(0) - prior;
        let verdict = verdict(r, (limit, period), spent, others);
        let reserved = match verdict {
            Reserved::Granted { .. } => others + r.amount_nanousd,
            _ => others + prior,
        };
        sqlx::query(
            "update budget_state set period_start = max(period_start, $2), \
             spent_nanousd = $3, reserved_nanousd = $4 where key_id = $1",
        )
        .bind(r.key_id)
        .bind(encode_time(period_start))
        .bind(spent)
        .bind(reserved)
        .execute(&mut *tx)
        .await?;
        if let Reserved::Granted { .. } = verdict {
            sqlx::query(
                "insert into budget_reservations (request_id, key_id, amount_nanousd, expires_at) \
                 values ($1, $2, $3, $4) on conflict (request_id) do update \
                 set amount_nanousd = excluded.amount_nanousd, expires_at = excluded.expires_at",
            )
            .bind(&r.request_id)
            .bind(r.key_id)
            .bind(r.amount_nanousd)
            .bind(encode_time(r.expires_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(verdict)
    }

    #[tracing::instrument(skip_all, fields(request_id = %request_id))]
    async fn release(&self, request_id: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let gone: Option<(i64, i64)> = sqlx::query_as(
            "delete from budget_reservations where request_id = $1 \
             returning key_id, amount_nanousd",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((key_id, amount)) = gone {
            sqlx::query(
                "update budget_state set reserved_nanousd = reserved_nanousd - $2 \
                 where key_id = $1",
            )
            .bind(key_id)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(gone.is_some())
    }

    #[tracing::instrument(skip_all, fields(key_id))]
    async fn budget_state(&self, key_id: i64) -> StoreResult<Option<BudgetState>> {
        let row: Option<(String, i64, i64)> = sqlx::query_as(
            "select period_start, spent_nanousd, reserved_nanousd from budget_state \
             where key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(period_start, spent_nanousd, reserved_nanousd)| {
            Ok(BudgetState {
                period_start: stored_time(&period_start)?,
                spent_nanousd,
                reserved_nanousd,
            })
        })
        .transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn budget_standings(&self, now: DateTime<Utc>) -> StoreResult<Vec<(i64, BudgetState)>> {
        let rows: Vec<(i64, String, i64, i64)> = sqlx::query_as(
            "select s.key_id, s.period_start, s.spent_nanousd, \
             coalesce((select sum(r.amount_nanousd) from budget_reservations r \
             where r.key_id = s.key_id and r.expires_at >= $1), 0) \
             from budget_state s order by s.key_id",
        )
        .bind(encode_time(now))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(key_id, period_start, spent_nanousd, reserved_nanousd)| {
                let state = BudgetState {
                    period_start: stored_time(&period_start)?,
                    spent_nanousd,
                    reserved_nanousd,
                };
                Ok((key_id, state))
            })
            .collect()
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

    #[tracing::instrument(skip_all)]
    async fn create_session(
        &self,
        hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query("delete from dashboard_sessions where expires_at <= $1")
            .bind(encode_time(now))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "insert into dashboard_sessions (hash, created_at, expires_at) values ($1, $2, $3)",
        )
        .bind(hash)
        .bind(encode_time(now))
        .bind(encode_time(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn session_active(&self, hash: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let found: Option<(i64,)> =
            sqlx::query_as("select 1 from dashboard_sessions where hash = $1 and expires_at > $2")
                .bind(hash)
                .bind(encode_time(now))
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    #[tracing::instrument(skip_all)]
    async fn delete_session(&self, hash: &str) -> StoreResult<bool> {
        let deleted = sqlx::query("delete from dashboard_sessions where hash = $1")
            .bind(hash)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }
}

/// Settles the reservations of newly written usage rows (key id, request id, cost, start)
/// in their transaction, as the Postgres store does: each reservation released, each row's
/// cost added to its key's spending in the period it started in.
async fn settle(
    tx: &mut sqlx::SqliteConnection,
    inserted: &[(i64, String, Option<i64>, String)],
) -> StoreResult<()> {
    let mut keys: BTreeMap<i64, Settlement> = BTreeMap::new();
    for (key_id, request_id, cost, created_at) in inserted {
        let gone: Option<(i64,)> = sqlx::query_as(
            "delete from budget_reservations where request_id = $1 returning amount_nanousd",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let created_at = stored_time(created_at)?;
        let settlement = keys.entry(*key_id).or_default();
        settlement.released += gone.map_or(0, |(amount,)| amount);
        // An unpriced route's row (no cost) adds nothing.
        settlement.costs.push((cost.unwrap_or(0), created_at));
    }
    for (key_id, settlement) in keys {
        let Some((period_start,)): Option<(String,)> =
            sqlx::query_as("select period_start from budget_state where key_id = $1")
                .bind(key_id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            continue;
        };
        let period_start = stored_time(&period_start)?;
        sqlx::query(
            "update budget_state set reserved_nanousd = reserved_nanousd - $2, \
             spent_nanousd = spent_nanousd + $3 where key_id = $1",
        )
        .bind(key_id)
        .bind(settlement.released)
        .bind(settlement.spent_since(period_start))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory database has no file, so none is made for it (the one made first, 0600,
    /// is for a database on disk).
    #[tokio::test]
    async fn an_in_memory_database_makes_no_file() {
        let named = "scratch-in-memory-test.db";
        for url in ["sqlite::memory:", &format!("sqlite:{named}?mode=memory")] {
            SqliteStore::connect(url).await.expect("opens");
        }
        let made: Vec<String> = std::fs::read_dir(".")
            .expect("working folder")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name == named || name.contains("in-memory"))
            .collect();
        assert_eq!(made, Vec::<String>::new());
    }
}
