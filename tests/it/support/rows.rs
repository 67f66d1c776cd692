//! One usage row with plain defaults; a test names only the fields it is about and takes the
//! rest with `UsageRow { field, ..usage_row(id) }`.

use chrono::DateTime;
use imagegate::usage::{Outcome, UsageRow};

/// A completed one-image generation by key 1 ("alice") on gpt-image-1 through "openai":
/// 10 input and 100 output tokens, 1,000 nano-USD, at 2025-01-01T00:00:00Z.
pub fn usage_row(request_id: &str) -> UsageRow {
    UsageRow {
        request_id: request_id.to_owned(),
        key_id: 1,
        key_name: "alice".to_owned(),
        model: "gpt-image-1".to_owned(),
        provider: "openai".to_owned(),
        upstream_model: "gpt-image-1".to_owned(),
        endpoint: "generations".to_owned(),
        status: 200,
        outcome: Outcome::Completed,
        streamed: false,
        n: Some(1),
        size: Some("1024x1024".to_owned()),
        quality: Some("high".to_owned()),
        images: 1,
        text_input_tokens: 10,
        image_input_tokens: 0,
        cached_text_input_tokens: 0,
        cached_image_input_tokens: 0,
        input_tokens: 10,
        output_tokens: 100,
        total_tokens: 110,
        cost_nanousd: Some(1_000),
        latency_ms: 1_234,
        created_at: DateTime::from_timestamp(1_735_689_600, 0).expect("time"),
        raw_usage: None,
        usage_suspect: false,
        cost_estimated: false,
        attempt: 1,
        client_request_id: Some(request_id.to_owned()),
        cause: None,
    }
}
