//! The only code that speaks SQL: one small trait, a Postgres and a SQLite implementation.

/// The `usage` table's columns in [`UsageRow`]'s order, as a literal so that statements can
/// be built from it with `concat!`: one list for both databases and every statement.
macro_rules! usage_columns {
    () => {
        "request_id, key_id, key_name, model, provider, upstream_model, endpoint, status, \
         outcome, streamed, n, size, quality, images, text_input_tokens, image_input_tokens, \
         cached_text_input_tokens, cached_image_input_tokens, input_tokens, output_tokens, \
         total_tokens, cost_nanousd, latency_ms, created_at, raw_usage, usage_suspect, \
         cost_estimated, attempt, client_request_id, cause"
    };
}

mod budget;
mod calls;
mod jobs;
mod notices;
mod postgres;
mod refusals;
mod replicas;
mod rows;
mod sqlite;

const USAGE_COLUMNS: &str = usage_columns!();

/// The `api_keys` columns in [`KeyRecord`]'s order (its limits flattened in), for both
/// databases.
const KEY_COLUMNS: &str = "id, name, prefix, hash, created_at, revoked_at, budget_nanousd, \
     budget_period, rpm, max_in_flight, models, expires_at, metadata";

/// A per-key rate limit's window: `rpm` requests per this long.
pub const RATE_WINDOW_NANOS: i64 = 60_000_000_000;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use rows::{JsonText, MaybeTimestamp, Sum, Timestamp};

pub use budget::{BudgetPeriod, BudgetState, Reservation, Reserved, Standing};
pub use calls::{CallRecord, CallState, CallStore, KeptCall};
pub use jobs::{
    Interrupted, JobCreated, JobEnd, JobRow, JobStatus, JobStore, NewJob, PastRetention,
};
pub use notices::{Notice, NoticeStore, Notices, NoticesLost};
pub use postgres::PostgresStore;
pub use refusals::{RefusalCount, RefusalStore, RefusalTotal};
pub use replicas::{ReplicaRow, ReplicaStore};
pub use rows::{Outcome, UsageRow};
pub use sqlite::SqliteStore;

/// A client key as stored: never the key itself, only its SHA-256 and a short prefix.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyRecord {
    pub id: i64,
    pub name: String,
    /// The first characters of the key, shown in listings so people can recognise it.
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    #[sqlx(try_from = "Timestamp")]
    pub created_at: DateTime<Utc>,
    #[sqlx(try_from = "MaybeTimestamp")]
    pub revoked_at: Option<DateTime<Utc>>,
    #[sqlx(flatten)]
    pub limits: KeyLimits,
}

/// What a key may do, set when it is created and changed by `PATCH /admin/keys/{name}`.
/// Every field is optional: none means no limit of that kind. Values are checked before
/// they reach the store (see `auth::settings`); the database's constraints check again.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyLimits {
    /// Spending cap in billionths of a US dollar per `budget_period`.
    pub budget_nanousd: Option<i64>,
    /// `day`, `month` or `total` (set whenever `budget_nanousd` is).
    pub budget_period: Option<String>,
    /// Requests per minute, across every replica.
    pub rpm: Option<i64>,
    /// Requests in flight at once on one replica, instead of `limits.max_in_flight_per_key`.
    pub max_in_flight: Option<i64>,
    /// Public model names (models or aliases) the key may use; none: every model.
    #[sqlx(try_from = "JsonText")]
    pub models: Option<Vec<String>>,
    #[sqlx(try_from = "MaybeTimestamp")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Whatever the operator wants to keep with the key (owner, team, ticket): a JSON object.
    #[sqlx(try_from = "JsonText")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl KeyLimits {
    fn models_json(&self) -> Option<String> {
        self.models
            .as_ref()
            .map(|m| serde_json::Value::from(m.clone()).to_string())
    }

    fn metadata_json(&self) -> Option<String> {
        self.metadata
            .as_ref()
            .map(|m| serde_json::Value::Object(m.clone()).to_string())
    }
}

/// What `keys create` hands the store.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub prefix: String,
    pub hash: String,
    pub limits: KeyLimits,
}

/// Changes to a key's limits: `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChanges {
    /// A new budget, with its period (none: the period it had, or `total` if it had none);
    /// cleared, the period goes with it.
    pub budget: Option<Option<(i64, Option<String>)>>,
    pub rpm: Option<Option<i64>>,
    pub max_in_flight: Option<Option<i64>>,
    pub models: Option<Option<Vec<String>>>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub metadata: Option<Option<serde_json::Map<String, serde_json::Value>>>,
}

impl KeyChanges {
    /// The changed columns' new values as JSON text, for the update statements.
    fn models_json(&self) -> Option<Option<String>> {
        self.models.as_ref().map(|m| {
            m.as_ref()
                .map(|m| serde_json::Value::from(m.clone()).to_string())
        })
    }

    fn metadata_json(&self) -> Option<Option<String>> {
        self.metadata.as_ref().map(|m| {
            m.as_ref()
                .map(|m| serde_json::Value::Object(m.clone()).to_string())
        })
    }

    /// The budget's columns as an update sets them: the amount, and the new period or null
    /// to keep the old one (`coalesce(new, old, 'total')`).
    fn budget_columns(&self) -> Option<(Option<i64>, Option<String>, bool)> {
        self.budget.as_ref().map(|budget| match budget {
            Some((nanousd, period)) => (Some(*nanousd), period.clone(), false),
            None => (None, None, true),
        })
    }
}

/// A key's rate limit after one request was counted (or refused), in nanoseconds of the
/// database's clock: a GCRA's theoretical arrival time and the time of the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub allowed: bool,
    pub tat_ns: i64,
    pub at_ns: i64,
}

/// How usage totals are grouped in a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GroupBy {
    #[default]
    Key,
    Model,
    Provider,
    /// The UTC day, `YYYY-MM-DD`.
    Day,
    /// The UTC hour, `YYYY-MM-DDTHH:00Z`.
    Hour,
}

impl GroupBy {
    /// The grouping's name: in the admin API's `group_by`, the CLI's `--group-by`, and as
    /// the group's column in a report.
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Key => "key",
            GroupBy::Model => "model",
            GroupBy::Provider => "provider",
            GroupBy::Day => "day",
            GroupBy::Hour => "hour",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            GroupBy::Key,
            GroupBy::Model,
            GroupBy::Provider,
            GroupBy::Day,
            GroupBy::Hour,
        ]
        .into_iter()
        .find(|g| g.name() == name)
    }
}

/// Which rows a usage report (or a page of rows) covers; each filter that is set narrows
/// it. `since` is inclusive, `until` exclusive.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub key_name: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Used by [`Store::usage_report`] only.
    pub group_by: GroupBy,
}

/// Where a page of [`Store::usage_page`] ended: its last row's time and request id. The
/// next page has the rows strictly older in that order (newest first, then request id
/// descending), so rows written meanwhile never shift a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub request_id: String,
}

/// One line of a usage report: totals for one group. Sums are i128: a column of i64 values
/// can add up past i64, and a report must not fail (or wrap) when it does.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct UsageTotals {
    #[sqlx(rename = "grp")]
    pub group: String,
    pub requests: i64,
    /// Calls a provider may have charged for: completed, or interrupted by a crash.
    pub billed: i64,
    /// Calls that delivered nothing: the provider answered an error or could not be reached.
    pub failed: i64,
    /// Rows with no price (a null cost, unpriced routes): their cost is not in
    /// `cost_nanousd`, and reports say so.
    pub unpriced: i64,
    /// Rows of a second or later attempt (a failover): each means an earlier attempt of
    /// its request failed and was not the client's answer.
    pub retries: i64,
    #[sqlx(try_from = "Sum")]
    pub images: i128,
    #[sqlx(try_from = "Sum")]
    pub text_input_tokens: i128,
    #[sqlx(try_from = "Sum")]
    pub image_input_tokens: i128,
    #[sqlx(try_from = "Sum")]
    pub cached_text_input_tokens: i128,
    #[sqlx(try_from = "Sum")]
    pub cached_image_input_tokens: i128,
    #[sqlx(try_from = "Sum")]
    pub input_tokens: i128,
    #[sqlx(try_from = "Sum")]
    pub output_tokens: i128,
    #[sqlx(try_from = "Sum")]
    pub total_tokens: i128,
    /// The cost of the group's priced rows.
    #[sqlx(try_from = "Sum")]
    pub cost_nanousd: i128,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a key named {0:?} already exists")]
    DuplicateKeyName(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database call was cancelled: {0}")]
    Cancelled(String),
}

impl StoreError {
    /// True when the database refused the data (a constraint, or a value Postgres cannot
    /// hold such as a NUL character in text), as opposed to being unreachable or busy:
    /// trying the same rows again cannot help.
    pub fn is_refused(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                db.kind() != sqlx::error::ErrorKind::Other
                    // SQLSTATE class 22: data exception (Postgres).
                    || db.code().is_some_and(|code| code.starts_with("22"))
            }
            StoreError::Database(sqlx::Error::Encode(_)) => true,
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What [`Store::migrate`] did: how many migrations the binary holds, how many of them
/// were new to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub total: usize,
    pub new: usize,
}

impl Migrated {
    /// `total` embedded migrations, `before` of which the database had already applied.
    pub fn new(total: usize, before: usize) -> Self {
        Migrated {
            total,
            new: total.saturating_sub(before),
        }
    }
}

/// Everything imagegate keeps in a database.
#[async_trait]
pub trait Store:
    CallStore + JobStore + NoticeStore + RefusalStore + ReplicaStore + Send + Sync + 'static
{
    /// Applies the embedded migrations that have not run yet.
    async fn migrate(&self) -> StoreResult<Migrated>;
    /// One cheap round trip, for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;
    async fn create_key(&self, key: NewKey) -> StoreResult<KeyRecord>;
    async fn list_keys(&self) -> StoreResult<Vec<KeyRecord>>;
    /// Marks the key revoked; false when no active key has that name.
    async fn revoke_key(&self, name: &str) -> StoreResult<bool>;
    async fn find_key_by_hash(&self, hash: &str) -> StoreResult<Option<KeyRecord>>;
    /// The key with this id, revoked or not (a job reads its key again when it starts).
    async fn find_key_by_id(&self, key_id: i64) -> StoreResult<Option<KeyRecord>>;
    /// Changes the limits of the active key called `name`; `None` when there is none.
    async fn update_key(&self, name: &str, changes: &KeyChanges) -> StoreResult<Option<KeyRecord>>;
    /// Counts one request of `key_id` against `rpm` requests per minute, in one atomic
    /// statement shared by every replica (a GCRA; see the migration `0004_key_limits`).
    async fn take_request(&self, key_id: i64, rpm: u32) -> StoreResult<RateState>;
    /// Writes rows in one transaction; a row whose request id is already stored is skipped,
    /// so replaying a batch never counts twice. Returns how many rows were new. The same
    /// transaction settles the new rows' budget reservations (see [`Store::reserve`]).
    async fn insert_usage(&self, rows: &[UsageRow]) -> StoreResult<u64>;
    /// Holds a call's worst-case cost against its key's budget, atomically across every
    /// process sharing the database; first releases the key's reservations past their
    /// `expires_at` (calls whose process died). Granted holds are settled by the call's
    /// usage row, or released by [`Store::release`].
    async fn reserve(&self, reservation: &Reservation) -> StoreResult<Reserved>;
    /// Releases the reservation of a call that was never sent; false when there was none.
    async fn release(&self, request_id: &str) -> StoreResult<bool>;
    /// A key's spending in its current period; none before its first reservation.
    async fn budget_state(&self, key_id: i64) -> StoreResult<Option<BudgetState>>;
    /// Every key's budget row with what its calls hold at `now`: `reserved_nanousd` is the
    /// sum of its reservations not past their deadline (those past it no longer count: the
    /// next reservation releases them). By key id; a key before its first reservation has
    /// none. What [`Standing::of`] is computed from.
    async fn budget_standings(&self, now: DateTime<Utc>) -> StoreResult<Vec<(i64, BudgetState)>>;
    /// Every stored row of one request id, oldest first (tests and audits).
    async fn usage_for_request(&self, request_id: &str) -> StoreResult<Vec<UsageRow>>;
    /// The newest `limit` rows, newest first (audits, `imagegate usage --rows`, tests).
    async fn recent_usage(&self, limit: i64) -> StoreResult<Vec<UsageRow>>;
    async fn usage_report(&self, filter: &UsageFilter) -> StoreResult<Vec<UsageTotals>>;
    /// Up to `limit` of the rows `filter` selects (its grouping unused), newest first,
    /// starting after `after` (see [`PageCursor`]).
    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<&PageCursor>,
        limit: i64,
    ) -> StoreResult<Vec<UsageRow>>;
    /// Stores a dashboard session, by the hash of its id, until `expires_at`; first deletes
    /// the sessions past their own at `now`.
    async fn create_session(
        &self,
        hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// True when the session with this hash exists and has not expired at `now`.
    async fn session_active(&self, hash: &str, now: DateTime<Utc>) -> StoreResult<bool>;
    /// Ends the session with this hash; false when there was none.
    async fn delete_session(&self, hash: &str) -> StoreResult<bool>;
}

/// The counts and sums of a report, the same for both databases but for how a sum is
/// taken (`sum` wraps the column's name in each database's exact sum).
fn report_columns(sum: impl Fn(&str) -> String) -> String {
    let counts = "count(*) as requests, \
         count(case when outcome in ('completed', 'interrupted') then 1 end) as billed, \
         count(case when outcome in ('upstream_error', 'failed') then 1 end) as failed, \
         count(case when cost_nanousd is null then 1 end) as unpriced, \
         count(case when attempt > 1 then 1 end) as retries";
    let sums = [
        "images",
        "text_input_tokens",
        "image_input_tokens",
        "cached_text_input_tokens",
        "cached_image_input_tokens",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost_nanousd",
    ]
    .map(sum)
    .join(", ");
    format!("{counts}, {sums}")
}

/// Opens the store a database URL names: `postgres://` or `sqlite:`.
pub async fn connect(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        anyhow::bail!(
            "database.url must start with postgres:// or sqlite: (got a URL with another scheme)"
        )
    }
}

/// Connects to `url` and applies the migrations; `what` names the database in the error
/// (its kind, name and host and where its URL was set, never the URL: it may hold a
/// password), said once rather than by each layer.
pub async fn open(url: &str, what: &str) -> anyhow::Result<(Arc<dyn Store>, Migrated)> {
    let store = connect(url)
        .await
        .map_err(|err| anyhow::anyhow!("cannot open {what}: {}", crate::error::causes(&*err)))?;
    let migrated = store.migrate().await.map_err(|err| {
        anyhow::anyhow!(
            "cannot apply the migrations to {what}: {}",
            crate::error::causes(&err)
        )
    })?;
    Ok((store, migrated))
}

/// A store whose calls all run on one runtime: the one it was made on.
///
/// A database connection belongs to the runtime that opened it. The serving threads each
/// run their own runtime, and end before the usage writer's last flush; their calls (key
/// lookups, readiness) go through this to the process's main runtime, so that the pool
/// never holds a connection that dies with a serving thread.
pub struct OnRuntime {
    inner: Arc<dyn Store>,
    handle: tokio::runtime::Handle,
}

impl OnRuntime {
    /// Must be called on the runtime that is to run the calls.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        OnRuntime {
            inner,
            handle: tokio::runtime::Handle::current(),
        }
    }

    async fn run<T, F>(&self, call: impl FnOnce(Arc<dyn Store>) -> F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = StoreResult<T>> + Send + 'static,
    {
        self.handle
            .spawn(call(Arc::clone(&self.inner)))
            .await
            .map_err(|e| StoreError::Cancelled(e.to_string()))?
    }
}

#[async_trait]
impl Store for OnRuntime {
    async fn migrate(&self) -> StoreResult<Migrated> {
        self.run(|s| async move { s.migrate().await }).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.run(|s| async move { s.ping().await }).await
    }
    async fn create_key(&self, key: NewKey) -> StoreResult<KeyRecord> {
        self.run(|s| async move { s.create_key(key).await }).await
    }
    async fn list_keys(&self) -> StoreResult<Vec<KeyRecord>> {
        self.run(|s| async move { s.list_keys().await }).await
    }
    async fn revoke_key(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_owned();
        self.run(|s| async move { s.revoke_key(&name).await }).await
    }
    async fn find_key_by_hash(&self, hash: &str) -> StoreResult<Option<KeyRecord>> {
        let hash = hash.to_owned();
        self.run(|s| async move { s.find_key_by_hash(&hash).await })
            .await
    }
    async fn find_key_by_id(&self, key_id: i64) -> StoreResult<Option<KeyRecord>> {
        self.run(move |s| async move { s.find_key_by_id(key_id).await })
            .await
    }
    async fn update_key(&self, name: &str, changes: &KeyChanges) -> StoreResult<Option<KeyRecord>> {
        let (name, changes) = (name.to_owned(), changes.clone());
        self.run(|s| async move { s.update_key(&name, &changes).await })
            .await
    }
    async fn take_request(&self, key_id: i64, rpm: u32) -> StoreResult<RateState> {
        self.run(move |s| async move { s.take_request(key_id, rpm).await })
            .await
    }
    async fn insert_usage(&self, rows: &[UsageRow]) -> StoreResult<u64> {
        let rows = rows.to_vec();
        self.run(|s| async move { s.insert_usage(&rows).await })
            .await
    }
    async fn reserve(&self, reservation: &Reservation) -> StoreResult<Reserved> {
        let reservation = reservation.clone();
        self.run(|s| async move { s.reserve(&reservation).await })
            .await
    }
    async fn release(&self, request_id: &str) -> StoreResult<bool> {
        let id = request_id.to_owned();
        self.run(|s| async move { s.release(&id).await }).await
    }
    async fn budget_state(&self, key_id: i64) -> StoreResult<Option<BudgetState>> {
        self.run(|s| async move { s.budget_state(key_id).await })
            .await
    }
    async fn budget_standings(&self, now: DateTime<Utc>) -> StoreResult<Vec<(i64, BudgetState)>> {
        self.run(move |s| async move { s.budget_standings(now).await })
            .await
    }
    async fn usage_for_request(&self, request_id: &str) -> StoreResult<Vec<UsageRow>> {
        let id = request_id.to_owned();
        self.run(|s| async move { s.usage_for_request(&id).await })
            .await
    }
    async fn recent_usage(&self, limit: i64) -> StoreResult<Vec<UsageRow>> {
        self.run(|s| async move { s.recent_usage(limit).await })
            .await
    }
    async fn usage_report(&self, filter: &UsageFilter) -> StoreResult<Vec<UsageTotals>> {
        let filter = filter.clone();
        self.run(|s| async move { s.usage_report(&filter).await })
            .await
    }
    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<&PageCursor>,
        limit: i64,
    ) -> StoreResult<Vec<UsageRow>> {
        let filter = filter.clone();
        let after = after.cloned();
        self.run(|s| async move { s.usage_page(&filter, after.as_ref(), limit).await })
            .await
    }
    async fn create_session(
        &self,
        hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let hash = hash.to_owned();
        self.run(move |s| async move { s.create_session(&hash, now, expires_at).await })
            .await
    }
    async fn session_active(&self, hash: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let hash = hash.to_owned();
        self.run(move |s| async move { s.session_active(&hash, now).await })
            .await
    }
    async fn delete_session(&self, hash: &str) -> StoreResult<bool> {
        let hash = hash.to_owned();
        self.run(|s| async move { s.delete_session(&hash).await })
            .await
    }
}

/// `time` plus `span`, at most the last second of 9999: both databases keep any time up to
/// it (and SQLite's text compares as time only with four-digit years).
pub fn after(time: DateTime<Utc>, span: std::time::Duration) -> DateTime<Utc> {
    let last = DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(time);
    TimeDelta::from_std(span)
        .ok()
        .and_then(|span| time.checked_add_signed(span))
        .map_or(last, |t| t.min(last))
}

/// `time` minus `span`, at the earliest 1970.
pub fn before(time: DateTime<Utc>, span: std::time::Duration) -> DateTime<Utc> {
    TimeDelta::from_std(span)
        .ok()
        .and_then(|span| time.checked_sub_signed(span))
        .map_or(DateTime::UNIX_EPOCH, |t| t.max(DateTime::UNIX_EPOCH))
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn times_past_what_the_databases_keep_are_clamped_not_a_panic() {
        let now = Utc::now();
        let huge = std::time::Duration::MAX;
        assert_eq!(after(now, huge).to_rfc3339(), "9999-12-31T23:59:59+00:00");
        assert_eq!(before(now, huge), DateTime::UNIX_EPOCH);
        let minute = std::time::Duration::from_secs(60);
        assert_eq!(after(now, minute) - now, TimeDelta::seconds(60));
        assert_eq!(now - before(now, minute), TimeDelta::seconds(60));
    }
}
