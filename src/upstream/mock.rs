//! The `mock` provider kind: answers inside imagegate, after a delay, with a valid 1x1 PNG
//! and the usage a real provider would report, so imagegate runs end to end without an account.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;

use super::{Endpoint, UpstreamBody, UpstreamRequest, UpstreamResponse};

const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

/// Output tokens per image, as OpenAI's gpt-image-1 documentation lists them.
fn output_tokens(size: Option<&str>, quality: Option<&str>) -> i64 {
    let large = matches!(size, Some("1536x1024" | "1024x1536"));
    match (quality, large) {
        (Some("low"), false) => 272,
        (Some("low"), true) => 408,
        (Some("high" | "hd"), false) => 4160,
        (Some("high" | "hd"), true) => 6240,
        (_, false) => 1056,
        (_, true) => 1584,
    }
}

/// What a mock answer reports, worked out from the request's summary.
struct Answer {
    n: i64,
    text_tokens: i64,
    image_tokens: i64,
    out: i64,
    created: u64,
    size: String,
    quality: String,
}

pub(super) async fn answer(delay: Duration, request: UpstreamRequest) -> UpstreamResponse {
    // Read the whole upload first, as a real provider does.
    if let UpstreamBody::Stream(mut rx) = request.body {
        while let Some(Ok(_)) = rx.next().await {}
    }
    tokio::time::sleep(delay).await;
    let s = &request.summary;
    let n = i64::from(s.n.unwrap_or(1).max(1));
    let answer = Answer {
        n,
        text_tokens: i64::try_from(s.prompt_chars.div_ceil(4).max(1)).unwrap_or(i64::MAX),
        image_tokens: if request.endpoint == Endpoint::Generations {
            0
        } else {
            323
        },
        out: output_tokens(s.size.as_deref(), s.quality.as_deref()) * n,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        size: s.size.clone().unwrap_or_else(|| "1024x1024".into()),
        quality: s.quality.clone().unwrap_or_else(|| "medium".into()),
    };
    let (content_type, body) = if s.stream {
        let prefix = if request.endpoint == Endpoint::Generations {
            "image_generation"
        } else {
            "image_edit"
        };
        ("text/event-stream", answer.events(prefix))
    } else {
        ("application/json", answer.json())
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    UpstreamResponse {
        status: StatusCode::OK,
        headers,
        body: futures_util::stream::once(async move { Ok(Bytes::from(body)) }).boxed(),
    }
}

impl Answer {
    /// One JSON body with every image and the whole usage.
    fn json(&self) -> String {
        let (text_tokens, image_tokens, out) = (self.text_tokens, self.image_tokens, self.out);
        let usage = json!({
            "total_tokens": text_tokens + image_tokens + out,
            "input_tokens": text_tokens + image_tokens,
            "output_tokens": out,
            "input_tokens_details": { "text_tokens": text_tokens, "image_tokens": image_tokens },
        });
        let data: Vec<_> = (0..self.n)
            .map(|_| json!({ "b64_json": PNG_1X1 }))
            .collect();
        let body = json!({
            "created": self.created, "background": "opaque", "data": data, "output_format": "png",
            "quality": self.quality, "size": self.size, "usage": usage,
        });
        body.to_string()
    }

    /// One completed event per image, the usage split across them as a real stream
    /// reports it.
    fn events(&self, prefix: &str) -> String {
        let (n, text_tokens, image_tokens, out) =
            (self.n, self.text_tokens, self.image_tokens, self.out);
        let mut text = String::new();
        for i in 0..n {
            let share = |total: i64| total / n + i64::from(i < total % n);
            let event = json!({
                "type": format!("{prefix}.completed"), "b64_json": PNG_1X1, "created_at": self.created,
                "size": self.size, "quality": self.quality, "background": "opaque", "output_format": "png",
                "usage": {
                    "total_tokens": share(text_tokens + image_tokens + out),
                    "input_tokens": share(text_tokens + image_tokens),
                    "output_tokens": share(out),
                    "input_tokens_details": { "text_tokens": share(text_tokens), "image_tokens": share(image_tokens) },
                },
            });
            text.push_str(&format!("event: {prefix}.completed\ndata: {event}\n\n"));
        }
        text
    }
}
