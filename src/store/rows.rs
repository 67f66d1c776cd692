//! The rows the store keeps, decoded from either database by one `sqlx::FromRow` each.
//! Where the databases hold a column differently (SQLite keeps timestamps as text), the
//! column is read through a small type that each database's module teaches to decode.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Type};

/// What happened to a request that reached a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The provider's whole body was read.
    Completed,
    /// The provider answered with an error status.
    UpstreamError,
    /// The provider could not be reached, timed out or broke off its body.
    Failed,
    /// imagegate ended (a crash, `kill -9`) while the call was in flight: the provider may
    /// have finished and billed it. Tokens are unknown (stored as null) and the cost is the
    /// call's worst case (`cost_estimated`).
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completed" => Some(Outcome::Completed),
            "upstream_error" => Some(Outcome::UpstreamError),
            "failed" => Some(Outcome::Failed),
            "interrupted" => Some(Outcome::Interrupted),
            _ => None,
        }
    }
}

/// One provider call, as stored. Token counts are zero when the provider reported none, and
/// null in the database for an [`Outcome::Interrupted`] call (nothing was reported).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct UsageRow {
    pub request_id: String,
    pub key_id: i64,
    pub key_name: String,
    pub model: String,
    pub provider: String,
    pub upstream_model: String,
    /// `generations`, `edits` or `variations`.
    pub endpoint: String,
    /// The status imagegate answered the client with.
    pub status: i32,
    #[sqlx(try_from = "String")]
    pub outcome: Outcome,
    pub streamed: bool,
    pub n: Option<i32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub images: i32,
    #[sqlx(try_from = "Tokens")]
    pub text_input_tokens: i64,
    #[sqlx(try_from = "Tokens")]
    pub image_input_tokens: i64,
    #[sqlx(try_from = "Tokens")]
    pub cached_text_input_tokens: i64,
    #[sqlx(try_from = "Tokens")]
    pub cached_image_input_tokens: i64,
    #[sqlx(try_from = "Tokens")]
    pub input_tokens: i64,
    #[sqlx(try_from = "Tokens")]
    pub output_tokens: i64,
    #[sqlx(try_from = "Tokens")]
    pub total_tokens: i64,
    /// Cost in billionths of a US dollar, so that sums are exact; none (null) when the
    /// route is unpriced (`unpriced = true`: no published price).
    pub cost_nanousd: Option<i64>,
    pub latency_ms: i64,
    #[sqlx(try_from = "Timestamp")]
    pub created_at: DateTime<Utc>,
    /// The provider's `usage` object as it sent it (JSON text), when it sent one.
    pub raw_usage: Option<String>,
    /// The provider reported more than [`crate::usage::extract::MAX_TOKENS_PER_CALL`] tokens of some kind:
    /// the counts were capped at that (and priced so), the raw usage shows what it sent.
    #[serde(default)]
    pub usage_suspect: bool,
    /// The cost is imagegate's worst-case estimate, not the price of reported usage.
    #[serde(default)]
    pub cost_estimated: bool,
    /// Which provider call of its client request this is: 1, then 2 for the next route
    /// after a failover, and so on.
    #[serde(default = "first_attempt")]
    pub attempt: i32,
    /// The request id its client was answered with (this row's own `request_id` on the
    /// first attempt, `<it>-<n>` being the n-th); none on rows written before it was kept.
    #[serde(default)]
    pub client_request_id: Option<String>,
    /// Why the call gave no image: an `upstream::Cause` (`refused`, `dns`, `tls`,
    /// `timeout`, `reset`, `connect`, `other`) when the provider was not reached or broke
    /// off, `http_<status>` when it answered an error; none otherwise.
    #[serde(default)]
    pub cause: Option<String>,
}

fn first_attempt() -> i32 {
    1
}

impl UsageRow {
    /// The id of the client request this row's call was made for.
    pub fn client_request(&self) -> &str {
        self.client_request_id
            .as_deref()
            .unwrap_or(&self.request_id)
    }

    /// A token count as the database keeps it: none for a call with no usage to report.
    pub fn stored_tokens(&self, count: i64) -> Option<i64> {
        (self.outcome != Outcome::Interrupted).then_some(count)
    }
}

impl TryFrom<String> for Outcome {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Outcome::parse(&text).ok_or_else(|| format!("unknown outcome {text:?}"))
    }
}

/// A timestamp column: `timestamptz` in Postgres, fixed-width UTC text in SQLite (see
/// each store for its decoding).
pub struct Timestamp(pub DateTime<Utc>);

impl From<Timestamp> for DateTime<Utc> {
    fn from(time: Timestamp) -> Self {
        time.0
    }
}

/// A column that may be null, read as `Option<T>` and typed as `T`: what a `try_from`
/// conversion of a nullable column reads.
pub struct Nullable<T>(Option<T>);

impl<DB: Database, T: Type<DB>> Type<DB> for Nullable<T> {
    fn type_info() -> DB::TypeInfo {
        <T as Type<DB>>::type_info()
    }
    fn compatible(ty: &DB::TypeInfo) -> bool {
        <T as Type<DB>>::compatible(ty)
    }
}

impl<'r, DB: Database, T> Decode<'r, DB> for Nullable<T>
where
    Option<T>: Decode<'r, DB>,
{
    fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Nullable(<Option<T> as Decode<DB>>::decode(value)?))
    }
}

/// A timestamp column that may be null.
pub type MaybeTimestamp = Nullable<Timestamp>;

impl From<MaybeTimestamp> for Option<DateTime<Utc>> {
    fn from(time: MaybeTimestamp) -> Self {
        time.0.map(|time| time.0)
    }
}

/// A report's sum: exact past i64, so each database hands it over in text (see each store
/// for the form) and it is read into i128.
pub struct Sum(pub i128);

impl From<Sum> for i128 {
    fn from(sum: Sum) -> Self {
        sum.0
    }
}

/// A token count; null (no usage reported, see the migration) reads as 0.
pub type Tokens = Nullable<i64>;

impl From<Tokens> for i64 {
    fn from(tokens: Tokens) -> Self {
        tokens.0.unwrap_or(0)
    }
}

/// A JSON value kept as text (both databases), null allowed: a key's model list and its
/// metadata.
pub type JsonText = Nullable<String>;

impl JsonText {
    fn parse<T: serde::de::DeserializeOwned>(self) -> Result<Option<T>, String> {
        self.0
            .map(|text| serde_json::from_str(&text).map_err(|err| format!("{text:?}: {err}")))
            .transpose()
    }
}

impl TryFrom<JsonText> for Option<Vec<String>> {
    type Error = String;

    fn try_from(text: JsonText) -> Result<Self, String> {
        text.parse()
    }
}

impl TryFrom<JsonText> for Option<serde_json::Map<String, serde_json::Value>> {
    type Error = String;

    fn try_from(text: JsonText) -> Result<Self, String> {
        text.parse()
    }
}
