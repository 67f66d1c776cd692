//! From a model to a provider call: pick the route, send, and turn the provider's answer
//! into the client's response with its usage metered on the way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use http::{HeaderValue, StatusCode, header};
use tracing::Instrument;

mod budget;

pub use budget::CostGuard;

use crate::auth::Principal;
pub use crate::breaker::{BreakerState, Breakers};
use crate::config::{Model, Provider, Route};
use crate::dedupe::{self, KeepTicket};
use crate::error::ApiError;
use crate::state::{AppState, RequestId, Runtime};
use crate::upstream::{Endpoint, RequestSummary, UpstreamError, UpstreamRequest, UpstreamResponse};
use crate::usage::extract::{BodyKind, Extracted};
use crate::usage::meter::{Failure, Metered, UsageTicket};
use crate::usage::price::worst_case_nanousd;
use crate::usage::{Intent, Outcome};

/// A provider request, and for streamed uploads the future that feeds its body: it runs
/// alongside the call and fails it when the client's upload turns out bad.
pub struct Prepared {
    pub request: UpstreamRequest,
    pub pump: Option<Pump>,
}

/// Feeds an upload to its provider call; ends with the request's whole summary (the fields
/// of an upload arrive with its parts).
pub type Pump =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<RequestSummary, ApiError>> + Send>>;

/// Makes the provider request for a route, once per attempt: a failover replays the same
/// client request to the next route (an upload from its disk spool, never from memory).
/// A streamed upload's pump asks `cost` to cover each field that arrives after the hold.
#[async_trait::async_trait]
pub trait RequestSource: Send {
    /// Whether fields of the request may still arrive after its call is sent (an upload
    /// streamed through): only then does a [`CostGuard`] follow them.
    fn fields_arrive_late(&self) -> bool {
        false
    }

    async fn prepare(
        &mut self,
        route: &Route,
        attempt: usize,
        cost: CostGuard,
    ) -> Result<Prepared, ApiError>;
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
    /// The async job this call runs for: each attempt's intent is kept with the job
    /// before the attempt is sent, so that another replica can bill it if this one dies.
    pub job: Option<Arc<str>>,
}

/// How one attempt ended.
enum Attempt {
    /// The client gets this response: a success, or an error no other route would fix.
    Answered(Response),
    /// The provider failed in a way the next route may not: try it. With why.
    Failed(Response, Failure),
}

/// What the access log says of a forwarded request: set on its response (the last
/// attempt's), read by [`crate::app`]'s access line and request span.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The model the client asked for (its public name).
    pub model: String,
    /// The provider of the attempt whose answer the client got.
    pub provider: String,
    /// Provider attempts made, failovers included.
    pub attempts: usize,
}

/// Marks `response` with what routed it.
fn routed(mut response: Response, model: &str, provider: &str, attempts: usize) -> Response {
    response.extensions_mut().insert(Routed {
        model: model.to_owned(),
        provider: provider.to_owned(),
        attempts,
    });
    response
}

/// The GenAI semantic conventions' name for what an endpoint does: every image endpoint
/// makes content.
const GEN_AI_OPERATION: &str = "generate_content";

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
            if attempt == self.model.failover.max_attempts.get() {
                break;
            }
            if !route.serves(self.endpoint) {
                continue;
            }
            if let Err(wait) = self.state.breakers.admit(&route.provider.name) {
                skipped.get_or_insert((route.provider.name.clone(), wait));
                continue;
            }
            let more = attempt + 1 < self.model.failover.max_attempts.get();
            let span = self.attempt_span(route, attempt);
            let tried = self.attempt(source, route, index, attempt);
            let tried = match tried.instrument(span).await {
                // A later route the key's budget cannot pay for does not hide why the
                // earlier one failed.
                Err(err) if err.is_budget_refusal() && last.is_some() => break,
                tried => tried?,
            };
            match tried {
                Attempt::Answered(response) => {
                    let provider = &route.provider.name;
                    return Ok(routed(response, &model.name, provider, attempt + 1));
                }
                Attempt::Failed(response, cause) => {
                    attempt += 1;
                    let status = response.status().as_u16();
                    let provider = &route.provider.name;
                    let (request_id, model) = (&*self.request_id.0, &model.name);
                    let then = if more {
                        "failing over to the next route"
                    } else {
                        "no attempt left"
                    };
                    tracing::warn!(
                        request_id,
                        model,
                        provider,
                        attempt,
                        cause = %cause,
                        status,
                        "provider attempt failed; {then}"
                    );
                    last = Some(routed(response, model, provider, attempt));
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

    /// The span of one provider attempt (a client span, in OpenTelemetry's terms), with the
    /// GenAI semantic conventions' attributes; the usage and status are recorded on it when
    /// the answer ends (see [`UsageTicket::finish`]).
    fn attempt_span(&self, route: &Route, attempt: usize) -> tracing::Span {
        let empty = tracing::field::Empty;
        tracing::info_span!(
            "provider attempt",
            otel.name = %format_args!("{GEN_AI_OPERATION} {}", route.upstream_model),
            otel.kind = "client",
            otel.status_code = empty,
            // Signed: OpenTelemetry attributes have no unsigned integers.
            attempt = attempt as i64 + 1,
            gen_ai.operation.name = GEN_AI_OPERATION,
            gen_ai.provider.name = %route.provider.name,
            gen_ai.request.model = %route.upstream_model,
            imagegate.model = %self.model.name,
            imagegate.endpoint = self.endpoint.as_str(),
            http.response.status_code = empty,
            error.type = empty,
            gen_ai.usage.input_tokens = empty,
            gen_ai.usage.output_tokens = empty,
        )
    }

    /// One route's try: journal the call, send it (feeding its upload alongside), and turn
    /// what came back into the client's response or a reason to try the next route.
    async fn attempt(
        &mut self,
        source: &mut dyn RequestSource,
        route: &Route,
        index: usize,
        attempt: usize,
    ) -> Result<Attempt, ApiError> {
        let provider = &route.provider;
        let hold_for = provider.total_timeout + self.runtime.config.limits.budget_hold_grace;
        let cost = if source.fields_arrive_late() {
            CostGuard::new(self, route, hold_for)
        } else {
            CostGuard::default()
        };
        let prepared = source.prepare(route, attempt, cost.clone()).await;
        let Prepared { request, pump } = match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                self.state.breakers.release_probe(&provider.name);
                return Err(err);
            }
        };
        let started = Instant::now();
        let created_at = Utc::now();
        let sent_with = request.summary.clone();
        let intent = self.intent(route, attempt, &sent_with, created_at);
        let request_id = intent.request_id.clone();
        if let Err(err) = self.hold_budget(&intent, hold_for).await {
            self.state.breakers.release_probe(&provider.name);
            return Err(err);
        }
        // Journaled before the call, so that a crash during it still leaves a row.
        if self.state.usage.intend(&intent).is_err() {
            self.state.breakers.release_probe(&provider.name);
            self.release_budget(&request_id).await;
            return Err(ApiError::UsageJournalUnavailable);
        }
        cost.held(&intent);
        if let Some(job) = &self.job {
            self.state.jobs.record_call(job, &intent).await;
        }
        let sending = Instant::now();
        let (sent, uploaded, whole) = self.send(provider, request, pump, &request_id).await?;
        // A provider that answered before the upload ended is billed on what was read.
        let summary = whole.unwrap_or(sent_with);
        let ticket = self.ticket(route, index, &intent, summary, started);
        if let Ok(answer) = &sent {
            ticket.metrics.first_byte(answer.status, sending.elapsed());
        }
        Ok(match sent {
            Ok(answer) if answer.status.is_success() => self.stream(route, answer, ticket, attempt),
            Ok(answer) => self.refused(provider, answer, ticket).await,
            Err(err) => self.unanswered(provider, err, uploaded, ticket),
        })
    }

    /// Reserves the call's worst case against its key's budget, if the key has one.
    async fn hold_budget(&self, intent: &Intent, hold_for: Duration) -> Result<(), ApiError> {
        let amount = intent.worst_case_nanousd;
        let (id, model) = (&intent.request_id, &self.model.name);
        budget::hold(&self.state, &self.principal, id, model, amount, hold_for).await
    }

    /// Gives back the reservation of a call that was not sent (none: nothing to do), before
    /// its client is answered: the client's next call finds the budget whole again.
    async fn release_budget(&self, request_id: &str) {
        if !budget::has_budget(&self.principal) {
            return;
        }
        budget::release(&self.state, request_id).await;
    }

    /// The journal's record of a call about to be sent: the `attempt`-th of its request (from
    /// 0), under the request's own id for the first and `<id>-<n>` for the n-th.
    fn intent(
        &self,
        route: &Route,
        attempt: usize,
        summary: &RequestSummary,
        created_at: DateTime<Utc>,
    ) -> Intent {
        let request_id = if attempt == 0 {
            self.request_id.0.to_string()
        } else {
            format!("{}-{}", self.request_id.0, attempt + 1)
        };
        Intent {
            request_id,
            key_id: self.principal.key_id,
            key_name: self.principal.name.clone(),
            model: self.model.name.clone(),
            provider: route.provider.name.clone(),
            upstream_model: route.upstream_model.clone(),
            endpoint: self.endpoint.as_str().to_owned(),
            streamed: summary.stream,
            n: summary.n,
            size: summary.size.clone(),
            quality: summary.quality.clone(),
            worst_case_nanousd: worst_case_nanousd(
                &route.price,
                self.endpoint,
                summary,
                self.runtime.config.server.uploads.max_images,
            ),
            created_at,
            attempt: i32::try_from(attempt + 1).unwrap_or(i32::MAX),
            client_request_id: Some(self.request_id.0.to_string()),
        }
    }

    /// Sends the request, and feeds its upload alongside when it has one. Returns the
    /// provider's answer, whether the client's upload had reached its end when the call
    /// ended (a timeout before that is the slow client's, not the provider's), and the
    /// request's whole summary when its pump delivered it. An upload that
    /// fails on the client's side returns its error and drops the provider call, which is
    /// cancelled before its body completes.
    async fn send(
        &self,
        provider: &Provider,
        request: UpstreamRequest,
        pump: Option<Pump>,
        request_id: &str,
    ) -> Result<
        (
            Result<UpstreamResponse, UpstreamError>,
            bool,
            Option<RequestSummary>,
        ),
        ApiError,
    > {
        let send = async {
            tokio::time::timeout(
                provider.first_byte_timeout,
                self.runtime.upstreams.send(provider, request),
            )
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
        };
        let Some(mut pump) = pump else {
            return Ok((send.await, true, None));
        };
        let mut send = std::pin::pin!(send);
        let mut pumped = false;
        let mut whole = None;
        loop {
            tokio::select! {
                result = &mut pump, if !pumped => {
                    match result {
                        Ok(summary) => (pumped, whole) = (true, Some(summary)),
                        // The provider's side ended the call: its answer, or its
                        // connection's error, says why.
                        Err(ApiError::UpstreamClosedBody) => pumped = true,
                        Err(err) => {
                            self.state.breakers.release_probe(&provider.name);
                            self.state.usage.cancel(request_id);
                            self.release_budget(request_id).await;
                            return Err(err);
                        }
                    }
                }
                sent = &mut send => return Ok((sent, pumped, whole)),
            }
        }
    }

    /// What the usage row of an answered (or failed) call is written from: the call its
    /// `intent` journaled.
    fn ticket(
        &self,
        route: &Route,
        index: usize,
        intent: &Intent,
        summary: RequestSummary,
        started: Instant,
    ) -> UsageTicket {
        let provider = &route.provider;
        UsageTicket {
            sink: self.state.usage.clone(),
            principal: Arc::clone(&self.principal),
            model: self.model.name.clone(),
            provider: provider.name.clone(),
            upstream_model: route.upstream_model.clone(),
            endpoint: self.endpoint,
            summary,
            price: route.price.clone(),
            started,
            created_at: intent.created_at,
            metrics: self
                .runtime
                .route_metrics(&self.model.name, index, &provider.name),
            span: tracing::Span::current(),
            attempt: intent.attempt,
            client_request_id: self.request_id.0.to_string(),
            request_id: intent.request_id.clone(),
            cause: None,
        }
    }

    /// The provider could not be reached, or did not answer in time.
    fn unanswered(
        &self,
        provider: &Provider,
        err: UpstreamError,
        uploaded: bool,
        mut ticket: UsageTicket,
    ) -> Attempt {
        let failure = Failure::Unanswered(err.cause());
        ticket.cause = Some(failure);
        let breakers = &self.state.breakers;
        if matches!(err, UpstreamError::Timeout) && !uploaded {
            breakers.release_probe(&provider.name);
        } else {
            breakers.failure(&provider.name, provider.breaker);
        }
        let error = err.into_api_error(&provider.name);
        ticket.finish(
            error.status().as_u16(),
            Outcome::Failed,
            &Extracted::default(),
        );
        Attempt::Failed(forwarded(error.into_response(), &provider.name), failure)
    }

    /// The provider answered with an error status: the next route is tried when the model's
    /// failover names that status.
    async fn refused(
        &self,
        provider: &Provider,
        answer: UpstreamResponse,
        mut ticket: UsageTicket,
    ) -> Attempt {
        let breakers = &self.state.breakers;
        let status = answer.status;
        let failure = Failure::Status(status.as_u16());
        ticket.cause = Some(failure);
        let fails_over = self.model.failover.on_status.contains(&status.as_u16());
        if status == StatusCode::TOO_MANY_REQUESTS {
            // A rate limit is the provider's answer to whoever sent too much (often one
            // key's flood), not a sign that it is down for every key.
            breakers.release_probe(&provider.name);
        } else if fails_over && status.is_server_error() {
            breakers.failure(&provider.name, provider.breaker);
        } else {
            breakers.success(&provider.name);
        }
        let error = answer.into_error(provider).await;
        ticket.finish(
            error.status().as_u16(),
            Outcome::UpstreamError,
            &Extracted::default(),
        );
        let response = forwarded(error.into_response(), &provider.name);
        if fails_over {
            Attempt::Failed(response, failure)
        } else {
            Attempt::Answered(response)
        }
    }

    /// A successful answer: its body streams to the client, metered on the way.
    fn stream(
        &mut self,
        route: &Route,
        answer: UpstreamResponse,
        ticket: UsageTicket,
        attempt: usize,
    ) -> Attempt {
        let provider = &route.provider;
        self.state.breakers.success(&provider.name);
        let kind = if answer.is_event_stream() {
            BodyKind::Sse
        } else {
            BodyKind::Json
        };
        let streamed = ticket.summary.stream;
        let kept_headers = dedupe::kept_headers(
            answer.headers.get(header::CONTENT_TYPE),
            Some(&provider.name),
        );
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
        Attempt::Answered(forwarded(response, &provider.name))
    }
}

/// Names the provider that answered a response.
fn forwarded(mut response: Response, provider: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(provider) {
        response.headers_mut().insert("x-imagegate-provider", value);
    }
    response
}
