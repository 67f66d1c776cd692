//! What a provider call leaves behind: its usage row and how it ended. Shared by the code
//! that meters calls (`usage`) and the code that stores them (`store`), so it sits below both.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub outcome: Outcome,
    pub streamed: bool,
    pub n: Option<i32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub images: i32,
    pub text_input_tokens: i64,
    pub image_input_tokens: i64,
    pub cached_text_input_tokens: i64,
    pub cached_image_input_tokens: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    /// Cost in billionths of a US dollar, so that sums are exact.
    pub cost_nanousd: i64,
    pub latency_ms: i64,
    pub created_at: DateTime<Utc>,
    /// The provider's `usage` object as it sent it (JSON text), when it sent one.
    pub raw_usage: Option<String>,
    /// The provider reported more than `usage::extract::MAX_TOKENS_PER_CALL` tokens of some kind:
    /// the counts were capped at that (and priced so), the raw usage shows what it sent.
    #[serde(default)]
    pub usage_suspect: bool,
    /// The cost is imagegate's worst-case estimate, not the price of reported usage.
    #[serde(default)]
    pub cost_estimated: bool,
}

impl UsageRow {
    /// A token count as the database keeps it: none for a call with no usage to report.
    pub fn stored_tokens(&self, count: i64) -> Option<i64> {
        (self.outcome != Outcome::Interrupted).then_some(count)
    }
}
