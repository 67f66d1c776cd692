//! The Postgres `Store`: the production database.

mod calls;
mod jobs;
mod notices;
mod refusals;
mod replicas;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgTypeInfo, PgValueRef,
};
use sqlx::{Connection, Decode, FromRow, Postgres, QueryBuilder, Type};

use super::budget::{BudgetState, KeyBudget, Reservation, Reserved, Settlement, verdict};
use super::notices::Notice;
use super::rows::{Sum, Timestamp};
use super::{
    GroupBy, KEY_COLUMNS, KeyChanges, KeyRecord, NewKey, PageCursor, RATE_WINDOW_NANOS, RateState,
    Store, StoreError, StoreResult, USAGE_COLUMNS, UsageFilter, UsageRow, UsageTotals,
    report_columns,
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
     $26::bool[], $27::bool[], $28::int4[], $29::text[], $30::text[]) \
     on conflict (request_id) do nothing \
     returning key_id, request_id, cost_nanousd, created_at"
);

pub struct PostgresStore {
    pool: PgPool,
    /// The `LISTEN` connection's own (one connection, opened when a subscriber asks).
    listen_pool: PgPool,
}

impl PostgresStore {
    /// Opens a pool and one connection now, so a wrong URL fails at startup.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        // Postgres's NOTICEs ("relation ... already exists, skipping" at each migration
        // check) are not news to an operator: sqlx would log every one at info.
        let options =
            PgConnectOptions::from_str(url)?.options([("client_min_messages", "warning")]);
        // One connection first, alone: its error says why (refused, authentication, no such
        // database), where the pool's would only say that it timed out.
        PgConnection::connect_with(&options).await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with((*pool.connect_options()).clone());
        Ok(Self { pool, listen_pool })
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
    async fn migrate(&self) -> StoreResult<super::Migrated> {
        let migrator = sqlx::migrate!("migrations/postgres");
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
        // `on conflict (name)` rather than catching the error: it names the one constraint
        // that means "duplicate name", and a clash on the hash still surfaces as an error.
        let sql = format!(
            "insert into api_keys (name, prefix, hash, budget_nanousd, budget_period, rpm, \
             max_in_flight, models, expires_at, metadata) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             on conflict (name) where revoked_at is null do nothing returning {KEY_COLUMNS}"
        );
        let limits = &key.limits;
        let mut tx = self.pool.begin().await?;
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
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::DuplicateKeyName(key.name));
        };
        let record = KeyRecord::from_row(&row)?;
        notices::publish(&mut tx, &Notice::Key { id: record.id }).await?;
        tx.commit().await?;
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
        let mut tx = self.pool.begin().await?;
        let revoked: Option<(i64,)> = sqlx::query_as(
            "update api_keys set revoked_at = now() where name = $1 and revoked_at is null \
             returning id",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id,)) = revoked else {
            return Ok(false);
        };
        notices::publish(&mut tx, &Notice::Key { id }).await?;
        tx.commit().await?;
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
        let mut tx = self.pool.begin().await?;
        let row = query.build().fetch_optional(&mut *tx).await?;
        let Some(record) = row.as_ref().map(KeyRecord::from_row).transpose()? else {
            return Ok(None);
        };
        notices::publish(&mut tx, &Notice::Key { id: record.id }).await?;
        tx.commit().await?;
        Ok(Some(record))
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
        let mut tx = self.pool.begin().await?;
        let inserted: Vec<Inserted> = sqlx::query_as(INSERT_USAGE)
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
            .bind(column(rows, |r| r.attempt))
            .bind(column(rows, |r| r.client_request_id.as_deref()))
            .bind(column(rows, |r| r.cause.as_deref()))
            .fetch_all(&mut *tx)
            .await?;
        settle(&mut tx, &inserted).await?;
        tx.commit().await?;
        Ok(inserted.len() as u64)
    }

    #[tracing::instrument(skip_all, fields(key_id = reservation.key_id))]
    async fn reserve(&self, reservation: &Reservation) -> StoreResult<Reserved> {
        let r = reservation;
        let mut tx = self.pool.begin().await?;
        // The key's budget row first, locked (made if need be, its period set below): every
        // reservation and settlement of the key queues on it, whichever replica makes it.
        let (stored_start, spent, reserved): (DateTime<Utc>, i64, i64) = sqlx::query_as(
            "insert into budget_state (key_id, period_start) values ($1, $2) \
             on conflict (key_id) do update set period_start = budget_state.period_start \
             returning period_start, spent_nanousd, reserved_nanousd",
        )
        .bind(r.key_id)
        .bind(DateTime::UNIX_EPOCH)
        .fetch_one(&mut *tx)
        .await?;
        // Then the budget as stored now (read once this reservation's turn has come), not
        // as a replica cached it; share-locked until this reservation commits, so that a
        // change of the budget or a revocation answers only once the reservations weighed
        // against the old one are done: from its answer on, every reservation sees it.
        let key: Option<(Option<i64>, Option<String>, bool)> = sqlx::query_as(
            "select budget_nanousd, budget_period, revoked_at is not null from api_keys \
             where id = $1 for share",
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
        // Calls whose replica died never settle: their hold ends with their deadline. A
        // call raising its own hold (a field that arrived after it raised its worst case)
        // is weighed without what it holds already (unless that expired just now).
        let (expired, prior): (Option<i64>, Option<i64>) = sqlx::query_as(
            "with gone as (delete from budget_reservations where key_id = $1 and expires_at < $2 \
             returning amount_nanousd) \
             select (select sum(amount_nanousd)::int8 from gone), \
             (select max(amount_nanousd) from budget_reservations \
              where request_id = $3 and key_id = $1 and expires_at >= $2)",
        )
        .bind(r.key_id)
        .bind(r.now)
        .bind(&r.request_id)
        .fetch_one(&mut *tx)
        .await?;
        let prior = prior.unwrap_or(0);
        let spent = if stored_start < period_start {
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
            "update budget_state set period_start = greatest(period_start, $2), \
             spent_nanousd = $3, reserved_nanousd = $4 where key_id = $1",
        )
        .bind(r.key_id)
        .bind(period_start)
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
            .bind(r.expires_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(verdict)
    }

    #[tracing::instrument(skip_all, fields(request_id = %request_id))]
    async fn release(&self, request_id: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        // The key's budget row is locked before the reservation, in the order a reservation
        // takes them, so that the two never wait on each other.
        let Some((key_id,)): Option<(i64,)> =
            sqlx::query_as("select key_id from budget_reservations where request_id = $1")
                .bind(request_id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(false);
        };
        sqlx::query("select 1 from budget_state where key_id = $1 for update")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        let released = sqlx::query(
            "with gone as (delete from budget_reservations where request_id = $1 \
             returning key_id, amount_nanousd) \
             update budget_state s set reserved_nanousd = s.reserved_nanousd - gone.amount_nanousd \
             from gone where s.key_id = gone.key_id",
        )
        .bind(request_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(released > 0)
    }

    #[tracing::instrument(skip_all, fields(key_id))]
    async fn budget_state(&self, key_id: i64) -> StoreResult<Option<BudgetState>> {
        let row: Option<(DateTime<Utc>, i64, i64)> = sqlx::query_as(
            "select period_start, spent_nanousd, reserved_nanousd from budget_state \
             where key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(period_start, spent_nanousd, reserved_nanousd)| BudgetState {
                period_start,
                spent_nanousd,
                reserved_nanousd,
            },
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn budget_standings(&self, now: DateTime<Utc>) -> StoreResult<Vec<(i64, BudgetState)>> {
        let rows: Vec<(i64, DateTime<Utc>, i64, i64)> = sqlx::query_as(
            "select s.key_id, s.period_start, s.spent_nanousd, \
             coalesce((select sum(r.amount_nanousd) from budget_reservations r \
             where r.key_id = s.key_id and r.expires_at >= $1), 0)::int8 \
             from budget_state s order by s.key_id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(key_id, period_start, spent_nanousd, reserved_nanousd)| {
                let state = BudgetState {
                    period_start,
                    spent_nanousd,
                    reserved_nanousd,
                };
                (key_id, state)
            })
            .collect())
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

    #[tracing::instrument(skip_all)]
    async fn create_session(
        &self,
        hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query("delete from dashboard_sessions where expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "insert into dashboard_sessions (hash, created_at, expires_at) values ($1, $2, $3)",
        )
        .bind(hash)
        .bind(now)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn session_active(&self, hash: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let found: Option<(i32,)> =
            sqlx::query_as("select 1 from dashboard_sessions where hash = $1 and expires_at > $2")
                .bind(hash)
                .bind(now)
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

/// A usage row just written: what settling its call's budget needs.
#[derive(sqlx::FromRow)]
struct Inserted {
    key_id: i64,
    request_id: String,
    /// None for an unpriced route's row: it adds nothing to a budget.
    cost_nanousd: Option<i64>,
    created_at: DateTime<Utc>,
}

/// Settles the reservations of newly written usage rows, in their transaction: each
/// reservation is released and each row's cost added to its key's spending. A row written
/// again (a replayed batch) is not new, so nothing is settled twice.
async fn settle(tx: &mut sqlx::PgConnection, inserted: &[Inserted]) -> StoreResult<()> {
    if inserted.is_empty() {
        return Ok(());
    }
    let mut keys: BTreeMap<i64, Settlement> = BTreeMap::new();
    for row in inserted {
        let costs = &mut keys.entry(row.key_id).or_default().costs;
        costs.push((row.cost_nanousd.unwrap_or(0), row.created_at));
    }
    // Budget rows first, in key order, as reservations lock them: no deadlock between a
    // settlement and a reservation releasing expired holds.
    let key_ids: Vec<i64> = keys.keys().copied().collect();
    let states: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
        "select key_id, period_start from budget_state where key_id = any($1) \
         order by key_id for update",
    )
    .bind(&key_ids)
    .fetch_all(&mut *tx)
    .await?;
    if states.is_empty() {
        // No key of these rows has a budget, so none holds a reservation.
        return Ok(());
    }
    let ids: Vec<&str> = inserted.iter().map(|r| r.request_id.as_str()).collect();
    let released: Vec<(i64, i64)> = sqlx::query_as(
        "delete from budget_reservations where request_id = any($1) \
         returning key_id, amount_nanousd",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for (key_id, amount) in released {
        keys.entry(key_id).or_default().released += amount;
    }
    for (key_id, period_start) in states {
        let settlement = &keys[&key_id];
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
