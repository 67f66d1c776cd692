//! Usage: read it from streamed bodies, price it, journal it on disk, write it to the store.

mod counts;
pub mod extract;
pub mod journal;
mod line;
pub mod meter;
pub mod price;
pub mod report;
pub mod writer;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

// Rows are the store's; the usage code builds and reads them under these names too.
pub use crate::store::{Outcome, UsageRow};

/// A provider call about to be sent, journaled before it is (see [`journal`]). Its row
/// resolves it; if the process dies first, the next start writes [`Intent::interrupted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    pub request_id: String,
    pub key_id: i64,
    pub key_name: String,
    pub model: String,
    pub provider: String,
    pub upstream_model: String,
    pub endpoint: String,
    pub streamed: bool,
    pub n: Option<i32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    /// The most the call can cost, from the price table (see [`price::worst_case_nanousd`]);
    /// none for an unpriced route.
    pub worst_case_nanousd: Option<i64>,
    pub created_at: DateTime<Utc>,
    /// Which provider call of its client request this is (1 on intents journaled before
    /// it was kept).
    #[serde(default = "first_attempt")]
    pub attempt: i32,
    /// The request id its client was answered with.
    #[serde(default)]
    pub client_request_id: Option<String>,
}

fn first_attempt() -> i32 {
    1
}

impl Intent {
    /// The row of a call cut off with the process: no answer, no tokens, the worst case.
    pub fn interrupted(&self) -> UsageRow {
        UsageRow {
            request_id: self.request_id.clone(),
            key_id: self.key_id,
            key_name: self.key_name.clone(),
            model: self.model.clone(),
            provider: self.provider.clone(),
            upstream_model: self.upstream_model.clone(),
            endpoint: self.endpoint.clone(),
            // No answer was recorded for the client.
            status: 0,
            outcome: Outcome::Interrupted,
            streamed: self.streamed,
            n: self.n,
            size: self.size.clone(),
            quality: self.quality.clone(),
            images: 0,
            text_input_tokens: 0,
            image_input_tokens: 0,
            cached_text_input_tokens: 0,
            cached_image_input_tokens: 0,
            input_tokens: 0,
            output_tokens: 0,
            total_tokens: 0,
            cost_nanousd: self.worst_case_nanousd,
            latency_ms: 0,
            created_at: self.created_at,
            raw_usage: None,
            usage_suspect: false,
            cost_estimated: true,
            attempt: self.attempt,
            client_request_id: self.client_request_id.clone(),
            cause: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_and_rows_journaled_before_attempts_were_kept_still_replay() {
        let intent = r#"{"request_id":"r1","key_id":1,"key_name":"svc","model":"m","provider":"p",
            "upstream_model":"u","endpoint":"generations","streamed":false,"n":1,"size":null,
            "quality":null,"worst_case_nanousd":5,"created_at":"2026-12-01T00:00:00Z"}"#;
        let intent: Intent = serde_json::from_str(intent).expect("an older intent");
        let row = intent.interrupted();
        assert_eq!(
            (row.attempt, row.client_request(), row.cause.as_deref()),
            (1, "r1", None)
        );
        let mut old_row = serde_json::to_value(&row).expect("row");
        for field in ["attempt", "client_request_id", "cause"] {
            old_row.as_object_mut().expect("object").remove(field);
        }
        let replayed: UsageRow = serde_json::from_value(old_row).expect("an older row");
        assert_eq!((replayed.attempt, replayed.client_request_id), (1, None));
    }
}
