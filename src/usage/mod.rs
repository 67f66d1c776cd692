//! Usage: read it from streamed bodies, price it, journal it on disk, write it to the store.

pub mod extract;
pub mod journal;
pub mod meter;
pub mod price;
pub mod writer;

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
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completed" => Some(Outcome::Completed),
            "upstream_error" => Some(Outcome::UpstreamError),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

/// One provider call, as stored. Token counts are zero when the provider reported none.
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
    /// The provider reported more than [`extract::MAX_TOKENS_PER_CALL`] tokens of some kind:
    /// the counts were capped at that (and priced so), the raw usage shows what it sent.
    #[serde(default)]
    pub usage_suspect: bool,
    /// The cost is imagegate's worst-case estimate, not the price of reported usage.
    #[serde(default)]
    pub cost_estimated: bool,
}
