//! From a model to a provider call: pick the route, send, and turn the provider's answer
//! into the client's response with its usage metered on the way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use http::{HeaderValue, StatusCode, header};

use crate::auth::Principal;
pub use crate::breaker::{BreakerState, Breakers};
use crate::config::{Model, ProviderKind, Route};
use crate::dedupe::{self, KeepTicket};
use crate::error::ApiError;
use crate::openai::ErrorBody;
use crate::state::{AppState, Forwarded, RequestId, Runtime};
use crate::upstream::{Endpoint, UpstreamError, UpstreamRequest, read_capped, read_summary};
use crate::usage::extract::{BodyKind, Extracted};
use crate::usage::meter::{Metered, UsageTicket};
use crate::usage::price::worst_case_nanousd;
use crate::usage::{Intent, Outcome};

/// How much of a provider's error body is read.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
const ERROR_BODY_WAIT: Duration = Duration::from_secs(10);

/// A provider request, and for streamed uploads the future that feeds its body: it runs
/// alongside the call and fails it when the client's upload turns out bad.
pub struct Prepared {
    pub request: UpstreamRequest,
    pub pump: Option<Pump>,
}

pub type Pump = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApiError>> + Send>>;

/// Makes the provider request for a route, once per attempt: a failover replays the same
/// client request to the next route (an upload from its disk spool, never from memory).
#[async_trait::async_trait]
pub trait RequestSource: Send {
    async fn prepare(&mut self, route: &Route, attempt: usize) -> Result<Prepared, ApiError>;
}

/// Who asked for what: the parts of a request every provider call needs.
pub struct Call {
    pub state: Arc<AppState>,
    pub runtime: Arc<Runtime>,
    pub principal: Arc<Principal>,
    pub request_id: RequestId,
    pub model: Arc<Model>,
    pub endpoint: Endpoint,
    /// Lets retries of this request collect its result (see [`dedupe`]).
    pub keep: Option<KeepTicket>,
}

/// How one attempt ended.
enum Attempt {
    /// The client gets this response: a success, or an error no other route would fix.
    Answered(Response),
    /// The provider failed in a way the next route may not: try it.
    Failed(Response),
}

impl Call {
    /// Sends the request to the model's routes in order, moving on when a provider cannot
    /// be reached, times out before answering, or answers with a failover status, and never
    /// after a provider has begun a successful answer. Providers whose circuit is open are
    /// skipped. Each attempt a provider answered (or failed on its side) gets its own usage
    /// row; an upload that fails on the client's side cancels the call and writes none.
    pub async fn forward(mut self, source: &mut dyn RequestSource) -> Result<Response, ApiError> {
        let mut skipped = None;
        let mut last = None;
        let mut attempt = 0;
        let model = Arc::clone(&self.model);
        for (index, route) in model.routes.iter().enumerate() {
            if attempt == self.model.failover.max_attempts {
                break;
            }
            if let Err(wait) = self.state.breakers.admit(&route.provider.name) {
                skipped.get_or_insert((route.provider.name.clone(), wait));
                continue;
            }
            let more = attempt + 1 < self.model.failover.max_attempts;
            match self.attempt(source, route, index, attempt).await? {
                Attempt::Answered(response) => return Ok(response),
                Attempt::Failed(response) => {
                    attempt += 1;
                    if more {
                        tracing::warn!(request_id = %self.request_id.0, provider = %route.provider.name, status = response.status().as_u16(), "failing over to the next route");
                    }
                    last = Some(response);
                }
            }
        }
        if let Some(response) = last {
            return Ok(response);
        }
        let (provider, wait) = skipped.unwrap_or_else(|| (String::new(), Duration::from_secs(1)));
        Err(ApiError::CircuitOpen {
            provider,
            retry_after: wait,
        })
    }

    async fn attempt(
        &mut self,
        source: &mut dyn RequestSource,
        route: &Route,
        index: usize,
        attempt: usize,
    ) -> Result<Attempt, ApiError> {
        let provider = &route.provider;
        let breakers = &self.state.breakers;
        let Prepared { request, pump } = match source.prepare(route, attempt).await {
            Ok(prepared) => prepared,
            Err(err) => {
                breakers.release_probe(&provider.name);
                return Err(err);
            }
        };
        let started = Instant::now();
        let created_at = Utc::now();
        let slot = Arc::clone(&request.summary);
        let request_id = if attempt == 0 {
            self.request_id.0.to_string()
        } else {
            format!("{}-{}", self.request_id.0, attempt + 1)
        };
        // Journaled before the call, so that a crash during it still leaves a row.
        let summary = read_summary(&slot);
        let intent = Intent {
            request_id: request_id.clone(),
            key_id: self.principal.key_id,
            key_name: self.principal.name.clone(),
            model: self.model.name.clone(),
            provider: provider.name.clone(),
            upstream_model: route.upstream_model.clone(),
            endpoint: self.endpoint.as_str().to_owned(),
            streamed: summary.stream,
            n: summary.n,
            size: summary.size.clone(),
            quality: summary.quality.clone(),
            worst_case_nanousd: worst_case_nanousd(&route.price, self.endpoint, &summary),
            created_at,
        };
        if self.state.usage.intend(&intent).is_err() {
            breakers.release_probe(&provider.name);
            return Err(ApiError::UsageJournalUnavailable);
        }
        let send = async {
            tokio::time::timeout(
                provider.first_byte_timeout,
                self.runtime.upstreams.send(provider, request),
            )
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
        };
        // Whether the client's upload had reached its end when the call ended: a timeout
        // before that is the slow client's, not the provider's.
        let (sent, uploaded) = match pump {
            None => (send.await, true),
            Some(mut pump) => {
                let mut send = std::pin::pin!(send);
                let mut pumped = false;
                loop {
                    tokio::select! {
                        // An upload error returns here and drops the provider call, which
                        // is cancelled before its body completes.
                        result = &mut pump, if !pumped => {
                            match result {
                                // The provider's side ended the call: its answer, or its
                                // connection's error, says why.
                                Ok(()) | Err(ApiError::UpstreamClosedBody) => pumped = true,
                                Err(err) => {
                                    breakers.release_probe(&provider.name);
                                    self.state.usage.cancel(&request_id);
                                    return Err(err);
                                }
                            }
                        }
                        sent = &mut send => break (sent, pumped),
                    }
                }
            }
        };
        let ticket = UsageTicket {
            sink: self.state.usage.clone(),
            request_id,
            principal: Arc::clone(&self.principal),
            model: self.model.name.clone(),
            provider: provider.name.clone(),
            upstream_model: route.upstream_model.clone(),
            endpoint: self.endpoint,
            summary: read_summary(&slot),
            price: route.price,
            started,
            created_at,
            metrics: self
                .runtime
                .route_metrics(&self.model.name, index, &provider.name),
        };
        let streamed = ticket.summary.stream;
        let answer = match sent {
            Ok(answer) => answer,
            Err(err) => {
                if matches!(err, UpstreamError::Timeout) && !uploaded {
                    breakers.release_probe(&provider.name);
                } else {
                    breakers.failure(&provider.name, provider.breaker);
                }
                let error = match err {
                    UpstreamError::Timeout => ApiError::UpstreamTimeout {
                        provider: provider.name.clone(),
                    },
                    UpstreamError::Connect(detail) | UpstreamError::Other(detail) => {
                        ApiError::UpstreamUnreachable {
                            provider: provider.name.clone(),
                            detail,
                        }
                    }
                };
                ticket.finish(
                    error.status().as_u16(),
                    Outcome::Failed,
                    &Extracted::default(),
                );
                return Ok(Attempt::Failed(forwarded(
                    error.into_response(),
                    &provider.name,
                )));
            }
        };

        if !answer.status.is_success() {
            let fails_over = self
                .model
                .failover
                .on_status
                .contains(&answer.status.as_u16());
            if answer.status == StatusCode::TOO_MANY_REQUESTS {
                // A rate limit is the provider's answer to whoever sent too much (often one
                // key's flood), not a sign that it is down for every key.
                breakers.release_probe(&provider.name);
            } else if fails_over && answer.status.is_server_error() {
                breakers.failure(&provider.name, provider.breaker);
            } else {
                breakers.success(&provider.name);
            }
            let body =
                tokio::time::timeout(ERROR_BODY_WAIT, read_capped(answer.body, ERROR_BODY_LIMIT))
                    .await
                    .unwrap_or_default();
            let body = redact(&body, &provider.kind);
            let error = upstream_error(
                &provider.name,
                answer.status,
                &body,
                answer.headers.get(header::RETRY_AFTER),
            );
            ticket.finish(
                error.status().as_u16(),
                Outcome::UpstreamError,
                &Extracted::default(),
            );
            let response = forwarded(error.into_response(), &provider.name);
            return Ok(if fails_over {
                Attempt::Failed(response)
            } else {
                Attempt::Answered(response)
            });
        }

        breakers.success(&provider.name);
        let kind = match answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(ct) if ct.starts_with("text/event-stream") => BodyKind::Sse,
            _ => BodyKind::Json,
        };
        let kept_headers =
            dedupe::kept_headers(answer.headers.get(header::CONTENT_TYPE), &provider.name);
        let metered = Metered::new(
            answer.body,
            kind,
            route.strip_b64_prefix,
            answer.status.as_u16(),
            ticket,
            self.state.tasks.clone(),
        )
        .keep_for_retries(self.keep.take(), kept_headers)
        .keepalive((kind == BodyKind::Sse).then_some(self.runtime.config.server.sse_keepalive));
        let mut response = Response::new(Body::from_stream(metered));
        *response.status_mut() = answer.status;
        let headers = response.headers_mut();
        headers.extend(answer.headers);
        if kind == BodyKind::Sse || streamed {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Tells nginx-style proxies in between not to buffer the events.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        }
        if attempt > 0 {
            headers.insert("x-imagegate-attempts", HeaderValue::from(attempt + 1));
        }
        Ok(Attempt::Answered(forwarded(response, &provider.name)))
    }
}

/// Marks a response as having reached a provider, and names the provider.
fn forwarded(mut response: Response, provider: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(provider) {
        response.headers_mut().insert("x-imagegate-provider", value);
    }
    response.extensions_mut().insert(Forwarded);
    response
}

/// A provider that echoes its key in an error message must not hand it to our client.
fn redact(body: &[u8], kind: &ProviderKind) -> Vec<u8> {
    let ProviderKind::OpenAi { api_key, .. } = kind else {
        return body.to_vec();
    };
    let key = api_key.expose().as_bytes();
    if key.is_empty() || body.len() < key.len() {
        return body.to_vec();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(key) {
            out.extend_from_slice(b"[redacted]");
            i += key.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
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
