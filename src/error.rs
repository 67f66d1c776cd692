//! One error type for every request, one status mapping, and OpenAI's error body for all of them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::body_timeout::BodyTimeout;
use crate::openai::ErrorBody;
use crate::openai::generation::Invalid;

/// Everything a request can fail with. Turning it into a response has no side effects:
/// the access log reads it back from the response's extensions.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("admin token missing or wrong")]
    AdminForbidden,
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("route not found")]
    NotFound,
    /// An admin call named a key that is not there (or not active).
    #[error("No active key is named {0:?}.")]
    KeyNotFound(String),
    /// The key's model allowlist does not hold the model asked for.
    #[error("This API key is not allowed to use the model `{0}`.")]
    ModelNotAllowed(String),
    #[error("This method is not allowed on this route.")]
    MethodNotAllowed,
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// An upload part (or the whole upload) over its limit.
    #[error("{0}")]
    PartTooLarge(String),
    /// The client stopped sending its request body for longer than the idle timeout, or
    /// was still sending it when the time for a whole body ran out.
    #[error("{}", match .0 {
        BodyTimeout::Idle(_) => "The request body stopped arriving: nothing was received for longer than the server waits.",
        BodyTimeout::Total(_) => "The request body took too long: it was still arriving when the time the server gives a whole body ran out.",
    })]
    RequestTimeout(BodyTimeout),
    #[error("Content-Type must be {expected}")]
    UnsupportedMediaType { expected: &'static str },
    /// The provider answered with an error status; its body is already in OpenAI's shape.
    #[error("provider {provider} answered {status}")]
    Upstream {
        provider: String,
        status: StatusCode,
        body: Box<ErrorBody>,
        retry_after: Option<HeaderValue>,
    },
    #[error("provider {provider} could not be reached: {detail}")]
    UpstreamUnreachable { provider: String, detail: String },
    /// The provider stopped reading the upload: its answer, or the error of its
    /// connection, says why (the call waits for it; this reaches a client only without one).
    #[error("the provider closed the request before its body was sent")]
    UpstreamClosedBody,
    #[error("provider {provider} did not answer in time")]
    UpstreamTimeout { provider: String },
    #[error("provider {provider} is failing; it is skipped for a while (circuit open)")]
    CircuitOpen {
        provider: String,
        retry_after: std::time::Duration,
    },
    #[error("config reload refused: {0}")]
    ReloadRefused(String),
    #[error("the usage store is not reachable")]
    NotReady,
    /// The upload spool holds `server.spool_max_bytes` already.
    #[error(
        "The server has no room left to take this upload now; retry later or send a smaller upload."
    )]
    SpoolFull,
    /// JSON bodies in memory hold `server.json_memory_max_bytes` already.
    #[error(
        "The server is holding as many request bodies as it may now; retry in a moment or send a smaller request."
    )]
    JsonMemoryFull,
    /// The key's JSON bodies in memory hold its share (`limits.max_share_per_key`) of
    /// `server.json_memory_max_bytes` already: other keys' bodies are still taken.
    #[error(
        "This API key's requests hold as much of the server's memory for request bodies as one key may; retry when one of them has finished, or send a smaller request."
    )]
    KeyMemoryShare,
    /// The key's uploads hold its share (`limits.max_share_per_key`) of
    /// `server.spool_max_bytes` already: other keys' uploads are still taken.
    #[error(
        "This API key's uploads hold as much of the server's upload spool as one key may; retry when one of them has finished, or send a smaller upload."
    )]
    KeySpoolShare,
    /// The usage journal cannot be written: a billable request is refused before it
    /// reaches a provider, since its usage could not be recorded.
    #[error(
        "Usage cannot be recorded right now, so the request was not sent to a provider. Try again later."
    )]
    UsageJournalUnavailable,
    /// The key has `limit` requests in flight already.
    #[error(
        "Rate limit reached: this API key has {limit} requests in flight, the most it may have at once. Retry when one has finished."
    )]
    KeyInFlightLimit { limit: u32 },
    /// The key's `rpm` is used up; one more request is allowed after `retry_after` seconds.
    #[error(
        "Rate limit reached: this API key may make {rpm} requests per minute. Retry after {retry_after} s."
    )]
    KeyRateLimit { rpm: u32, retry_after: u64 },
    /// The key's budget cannot hold the call's worst-case cost (OpenAI's quota error).
    #[error(
        "You exceeded this API key's budget: the request could cost up to ${cost}, and ${remaining} of the budget is left for this {period}. Ask the gateway's operators to raise it."
    )]
    InsufficientQuota {
        /// In dollars, as text.
        cost: String,
        remaining: String,
        period: &'static str,
    },
    /// The key has a budget and the model's route has no price: its cost could not be
    /// counted against the budget.
    #[error(
        "The model `{0}` has no price at the provider serving it, and this API key has a budget that its cost could not be counted against. Use a priced model, or ask the gateway's operators."
    )]
    UnpricedOverBudget(String),
    /// The key has a budget, and the database that holds it did not answer in time.
    #[error(
        "This API key's budget could not be checked right now (the database is not answering), so the request was not sent. Please retry shortly."
    )]
    BudgetUnavailable,
    /// The database that holds async jobs did not answer: no job was created or read.
    #[error(
        "Async jobs cannot be created or read right now (the database that holds them is not answering). Retry shortly, or send the request without `Prefer: respond-async` to have it answered directly."
    )]
    JobsUnavailable,
    /// An async job that does not exist, has expired, or belongs to another key: the
    /// same answer for all three, so that a key cannot learn of another's jobs.
    #[error("No image job found with id '{0}'.")]
    JobNotFound(String),
    /// The key has `limit` async jobs not finished already.
    #[error(
        "Too many jobs: this API key has {limit} async jobs queued or running, the most it may have at once. Retry when one has finished."
    )]
    JobQueueFull { limit: u32 },
    /// A key never seen before, and the database did not answer in time to check it.
    #[error(
        "The API key could not be checked right now (the key database is not answering). Please retry shortly."
    )]
    KeyLookupUnavailable,
    /// Detail goes to the log only; the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A key unknown or revoked: the same answer for both, at the door and when a queued
    /// job starts.
    pub const KEY_REVOKED: ApiError =
        ApiError::Unauthorized("Incorrect API key provided, or the key was revoked.");
    /// A key past its `expires_at`, at the door and when a queued job starts.
    pub const KEY_EXPIRED: ApiError = ApiError::Unauthorized("This API key has expired.");

    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
            code: None,
        }
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        ApiError::Internal(err.to_string())
    }

    /// True when the key's budget stopped the call before it was sent.
    pub fn is_budget_refusal(&self) -> bool {
        matches!(
            self,
            ApiError::InsufficientQuota { .. }
                | ApiError::UnpricedOverBudget(_)
                | ApiError::BudgetUnavailable
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) | ApiError::AdminForbidden => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_)
            | ApiError::NotFound
            | ApiError::KeyNotFound(_)
            | ApiError::JobNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::ModelNotAllowed(_) | ApiError::UnpricedOverBudget(_) => StatusCode::FORBIDDEN,
            ApiError::PayloadTooLarge { .. } | ApiError::PartTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::KeyInFlightLimit { .. }
            | ApiError::KeyRateLimit { .. }
            | ApiError::KeyMemoryShare
            | ApiError::KeySpoolShare
            | ApiError::InsufficientQuota { .. }
            | ApiError::JobQueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Upstream { status, .. } => *status,
            ApiError::UpstreamUnreachable { .. } | ApiError::UpstreamClosedBody => {
                StatusCode::BAD_GATEWAY
            }
            ApiError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::ReloadRefused(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotReady
            | ApiError::CircuitOpen { .. }
            | ApiError::SpoolFull
            | ApiError::JsonMemoryFull
            | ApiError::UsageJournalUnavailable
            | ApiError::KeyLookupUnavailable
            | ApiError::BudgetUnavailable
            | ApiError::JobsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, code, param): (&str, Option<&str>, Option<String>) = match self {
            ApiError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", *code, param.clone())
            }
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key"), None),
            ApiError::AdminForbidden => {
                ("invalid_request_error", Some("invalid_admin_token"), None)
            }
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".into()),
            ),
            ApiError::NotFound => ("invalid_request_error", Some("not_found"), None),
            ApiError::KeyNotFound(_) => (
                "invalid_request_error",
                Some("key_not_found"),
                Some("name".into()),
            ),
            ApiError::ModelNotAllowed(_) => (
                "invalid_request_error",
                Some("model_not_allowed"),
                Some("model".into()),
            ),
            ApiError::JobNotFound(_) => ("invalid_request_error", Some("job_not_found"), None),
            ApiError::JobQueueFull { .. } => ("requests", Some("job_queue_full"), None),
            ApiError::KeyMemoryShare => ("requests", Some("key_memory_share_exceeded"), None),
            ApiError::KeySpoolShare => ("requests", Some("key_spool_share_exceeded"), None),
            ApiError::MethodNotAllowed => {
                ("invalid_request_error", Some("method_not_allowed"), None)
            }
            ApiError::PayloadTooLarge { .. } | ApiError::PartTooLarge(_) => {
                ("invalid_request_error", Some("payload_too_large"), None)
            }
            ApiError::RequestTimeout(_) => ("invalid_request_error", Some("request_timeout"), None),
            // OpenAI's own rate-limit errors have this type and code.
            ApiError::KeyInFlightLimit { .. } | ApiError::KeyRateLimit { .. } => {
                ("requests", Some("rate_limit_exceeded"), None)
            }
            ApiError::UnsupportedMediaType { .. } => (
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
            ),
            ApiError::Upstream { body, .. } => return (**body).clone(),
            ApiError::UpstreamUnreachable { .. } | ApiError::UpstreamClosedBody => {
                ("upstream_error", Some("upstream_unreachable"), None)
            }
            ApiError::UpstreamTimeout { .. } => ("upstream_error", Some("upstream_timeout"), None),
            ApiError::ReloadRefused(_) => ("invalid_request_error", Some("config_invalid"), None),
            ApiError::NotReady => ("server_error", Some("not_ready"), None),
            ApiError::SpoolFull => ("server_error", Some("spool_full"), None),
            ApiError::JsonMemoryFull => ("server_error", Some("server_busy"), None),
            ApiError::UsageJournalUnavailable => {
                ("server_error", Some("usage_journal_unavailable"), None)
            }
            ApiError::KeyLookupUnavailable => {
                ("server_error", Some("key_lookup_unavailable"), None)
            }
            ApiError::InsufficientQuota { .. } => {
                ("insufficient_quota", Some("insufficient_quota"), None)
            }
            ApiError::BudgetUnavailable => ("server_error", Some("budget_unavailable"), None),
            ApiError::JobsUnavailable => ("server_error", Some("jobs_unavailable"), None),
            ApiError::UnpricedOverBudget(_) => (
                "invalid_request_error",
                Some("model_unpriced"),
                Some("model".into()),
            ),
            ApiError::CircuitOpen { .. } => ("upstream_error", Some("provider_unavailable"), None),
            ApiError::Internal(_) => ("server_error", None, None),
        };
        let message = match self {
            ApiError::Internal(_) => {
                "The server had an error while processing your request.".to_owned()
            }
            other => other.to_string(),
        };
        ErrorBody::new(message, kind, param, code)
    }
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        ApiError::InvalidRequest {
            message: invalid.message,
            param: invalid.param,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::Upstream {
            retry_after: Some(value),
            ..
        } = &self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, value.clone());
        }
        if let ApiError::KeyLookupUnavailable
        | ApiError::KeyInFlightLimit { .. }
        | ApiError::BudgetUnavailable
        | ApiError::JobsUnavailable
        | ApiError::JsonMemoryFull
        | ApiError::KeyMemoryShare
        | ApiError::KeySpoolShare = &self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::KeyRateLimit { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        if let ApiError::CircuitOpen { retry_after, .. } = &self {
            let secs = retry_after.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // The SDKs retry 408, 409, 429 and 5xx; any other error will fail again as it is,
        // and so will a spent budget, until its operators raise it or its period ends.
        let status = response.status();
        let exhausted = matches!(self, ApiError::InsufficientQuota { .. });
        if exhausted || status.is_client_error() && !matches!(status.as_u16(), 408 | 409 | 429) {
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response.extensions_mut().insert(self);
        response
    }
}

/// The innermost cause of an error, which reads best ("Connection refused"): an HTTP
/// client's outer layers repeat the URL.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// An error and its causes on one line, `outer: inner: innermost`, each cause left out when
/// the text before it already says it (sqlx's "error communicating with database: Connection
/// refused" has the refusal as its source too), so that nothing reads twice.
pub fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}
