//! OpenAI wire types for the image endpoints. No I/O here.

pub mod edit;
pub mod generation;

use serde::{Deserialize, Serialize};

/// The width and height a `size` of `WIDTHxHEIGHT` names (`x` or `X`, blanks around each
/// part allowed), when it names two integers; `None` for `auto` and anything else. The
/// caller judges their range.
pub fn size_dimensions(size: &str) -> Option<(i64, i64)> {
    let (w, h) = size.trim().split_once(['x', 'X'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

/// `{"error":{"message","type","param","code"}}`, the body of every error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(
        message: impl Into<String>,
        kind: &str,
        param: Option<String>,
        code: Option<&str>,
    ) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_owned(),
                param,
                code: code.map(str::to_owned),
            },
        }
    }

    /// Reads a provider's error body: kept as is when it already has OpenAI's shape,
    /// wrapped otherwise so that the SDKs can still show a message.
    pub fn from_upstream(provider: &str, status: u16, body: &[u8]) -> Self {
        if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
            return parsed;
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let snippet: String = text.chars().take(500).collect();
        let kind = if status >= 500 {
            "upstream_error"
        } else {
            "invalid_request_error"
        };
        let message = if snippet.is_empty() {
            format!("provider {provider} answered {status}")
        } else {
            format!("provider {provider} answered {status}: {snippet}")
        };
        ErrorBody::new(message, kind, None, None)
    }
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<Model>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
}
