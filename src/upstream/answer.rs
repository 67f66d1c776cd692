//! A provider's answer read as far as the client needs it: a success to stream on, or an
//! error status (or a failed call) turned into the client's error, with the key redacted.

use std::time::Duration;

use futures_util::StreamExt;
use http::{HeaderValue, StatusCode, header};

use super::{BodyStream, UpstreamError, UpstreamResponse};
use crate::config::{Provider, ProviderKind};
use crate::error::ApiError;
use crate::openai::ErrorBody;

/// How much of a provider's error body is read.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
const ERROR_BODY_WAIT: Duration = Duration::from_secs(10);

impl UpstreamResponse {
    /// True when the provider streams its answer as server-sent events.
    pub fn is_event_stream(&self) -> bool {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"))
    }

    /// The client's error for an answer with an error status: its body read (capped, and
    /// given up on after a while), the provider's key taken out of it, its status mapped.
    pub async fn into_error(self, provider: &Provider) -> ApiError {
        let body = tokio::time::timeout(ERROR_BODY_WAIT, read_capped(self.body, ERROR_BODY_LIMIT))
            .await
            .unwrap_or_default();
        let body = redact(&body, &provider.kind);
        upstream_error(
            &provider.name,
            self.status,
            &body,
            self.headers.get(header::RETRY_AFTER),
        )
    }
}

impl UpstreamError {
    /// The client's error for a call that got no answer.
    pub fn into_api_error(self, provider: &str) -> ApiError {
        match self {
            UpstreamError::Timeout => ApiError::UpstreamTimeout {
                provider: provider.to_owned(),
            },
            UpstreamError::Connect(_, detail) | UpstreamError::Other(_, detail) => {
                ApiError::UpstreamUnreachable {
                    provider: provider.to_owned(),
                    detail,
                }
            }
        }
    }
}

/// Reads at most `limit` bytes of an error body; the rest is dropped.
async fn read_capped(mut body: BodyStream, limit: usize) -> bytes::Bytes {
    let mut buf = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        let room = limit.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= limit {
            break;
        }
    }
    bytes::Bytes::from(buf)
}

/// A provider that echoes its key in an error message must not hand it to our client, nor
/// to a job record or a log line, in any form ([`redact`](super::redact)).
fn redact(body: &[u8], kind: &ProviderKind) -> Vec<u8> {
    match kind {
        ProviderKind::OpenAi { api_key, .. } => super::redact::redact(body, api_key.expose()),
        ProviderKind::Mock { .. } => body.to_vec(),
    }
}

/// Maps a provider's error status: its 4xx reach the client as they are (with
/// `retry-after` on 429), except 401/403, which mean imagegate's own credentials were
/// refused and are the operator's problem, not the client's; 5xx become 502.
fn upstream_error(
    provider: &str,
    status: StatusCode,
    body: &[u8],
    retry_after: Option<&HeaderValue>,
) -> ApiError {
    let parsed = ErrorBody::from_upstream(provider, status.as_u16(), body);
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        tracing::error!(provider, status = status.as_u16(), message = %parsed.error.message, "provider refused imagegate's credentials");
        return ApiError::UpstreamUnreachable {
            provider: provider.to_owned(),
            detail: format!("it refused imagegate's credentials ({status})"),
        };
    }
    if status.is_client_error() {
        return ApiError::Upstream {
            provider: provider.to_owned(),
            status,
            body: Box::new(parsed),
            retry_after: retry_after.cloned(),
        };
    }
    ApiError::Upstream {
        provider: provider.to_owned(),
        status: StatusCode::BAD_GATEWAY,
        body: Box::new(ErrorBody::new(
            format!(
                "provider {provider} failed ({status}): {}",
                parsed.error.message
            ),
            "upstream_error",
            None,
            Some("upstream_error"),
        )),
        retry_after: retry_after.cloned(),
    }
}
