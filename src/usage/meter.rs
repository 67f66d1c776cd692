//! Taps a provider's response body on its way to the client: reads usage, rewrites what a
//! route needs rewritten, and records one usage row when the body ends, however it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use metrics::{Counter, Histogram};
use tokio_util::task::TaskTracker;

use crate::dedupe::KeepTicket;

use crate::auth::Principal;
use crate::config::Price;
use crate::prometheus::catalogue::{ATTEMPT_OUTCOMES, Named};
use crate::upstream::{BodyStream, Cause, Endpoint, RequestSummary, UpstreamError};
use crate::usage::extract::{BodyKind, Extracted, Extractor, TokenUsage};
use crate::usage::price::{Billed, cost_nanousd, format_cost};
use crate::usage::writer::UsageSink;
use crate::usage::{Outcome, UsageRow};

/// Everything needed to write the usage row of one provider call, taken when it is sent.
pub struct UsageTicket {
    pub sink: UsageSink,
    pub request_id: String,
    pub principal: Arc<Principal>,
    pub model: String,
    pub provider: String,
    pub upstream_model: String,
    pub endpoint: Endpoint,
    pub summary: RequestSummary,
    pub price: Price,
    pub started: Instant,
    pub created_at: DateTime<Utc>,
    pub metrics: Arc<RouteMetrics>,
    /// The provider attempt's span: the status and token counts are recorded on it.
    pub span: tracing::Span,
    /// Which provider call of its client request this is, from 1.
    pub attempt: i32,
    /// The request's own id, without the attempt's `-<n>` (see the usage table's
    /// `client_request_id`).
    pub client_request_id: String,
    /// Why the call gave no image, once known: its usage row names it (see
    /// `UsageRow::cause`) and its latency is counted under it.
    pub cause: Option<Failure>,
}

/// One route's metric handles, registered once per configuration: looking a metric up by
/// its labels allocates and hashes them, several times on every request.
pub struct RouteMetrics {
    model: String,
    provider: String,
    /// `imagegate_upstream_requests_total` with status 200; other statuses are looked up.
    ok: Counter,
    /// `imagegate_upstream_duration_seconds` of successes; other outcomes are looked up.
    duration: Histogram,
    /// `imagegate_upstream_first_byte_seconds` of successes; error statuses are looked up.
    first_byte: Histogram,
    input_tokens: Counter,
    output_tokens: Counter,
    images: Counter,
    cost: Counter,
    /// `metrics.per_key`: the cost is counted by key name too.
    per_key: bool,
    /// Keeps the route's series on `/metrics` while a call of the route is counted.
    _named: Arc<Named>,
}

impl RouteMetrics {
    /// Registers the handles with the recorder installed now (none: they count nothing).
    pub fn new(model: &str, provider: &str, per_key: bool, named: Arc<Named>) -> Self {
        let labels = [
            ("model", model.to_owned()),
            ("provider", provider.to_owned()),
        ];
        let success = [
            ("model", model.to_owned()),
            ("provider", provider.to_owned()),
            ("outcome", "success".to_owned()),
        ];
        RouteMetrics {
            model: model.to_owned(),
            provider: provider.to_owned(),
            ok: metrics::counter!(
                "imagegate_upstream_requests_total",
                &[
                    ("model", model.to_owned()),
                    ("provider", provider.to_owned()),
                    ("status", "200".to_owned()),
                ]
            ),
            duration: metrics::histogram!("imagegate_upstream_duration_seconds", &success),
            first_byte: metrics::histogram!("imagegate_upstream_first_byte_seconds", &success),
            input_tokens: metrics::counter!("imagegate_input_tokens_total", &labels),
            output_tokens: metrics::counter!("imagegate_output_tokens_total", &labels),
            images: metrics::counter!("imagegate_images_total", &labels),
            cost: metrics::counter!("imagegate_cost_nanousd_total", &labels),
            per_key,
            _named: named,
        }
    }

    fn histogram(&self, name: &'static str, outcome: &'static str) -> Histogram {
        metrics::histogram!(
            name,
            &[
                ("model", self.model.clone()),
                ("provider", self.provider.clone()),
                ("outcome", outcome.to_owned()),
            ]
        )
    }

    /// Times a provider call from its sending to its response head.
    pub fn first_byte(&self, status: http::StatusCode, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if status.is_success() {
            self.first_byte.record(seconds);
        } else {
            self.histogram("imagegate_upstream_first_byte_seconds", "error_status")
                .record(seconds);
        }
    }

    fn duration(&self, outcome: &'static str) -> Histogram {
        if outcome == "success" {
            return self.duration.clone();
        }
        self.histogram("imagegate_upstream_duration_seconds", outcome)
    }

    fn requests(&self, status: u16) -> Counter {
        if status == 200 {
            return self.ok.clone();
        }
        metrics::counter!(
            "imagegate_upstream_requests_total",
            &[
                ("model", self.model.clone()),
                ("provider", self.provider.clone()),
                ("status", status.to_string()),
            ]
        )
    }
}

impl UsageTicket {
    /// Writes the row (through the sink, never waiting on the database), counts it in the
    /// metrics and logs the request's one line.
    pub fn finish(self, status: u16, outcome: Outcome, extracted: &Extracted) {
        let tally = self.tally(outcome, extracted);
        self.span
            .record("http.response.status_code", i64::from(status))
            .record("gen_ai.usage.input_tokens", tally.usage.input_tokens)
            .record("gen_ai.usage.output_tokens", tally.usage.output_tokens);
        if outcome != Outcome::Completed {
            self.span.record("otel.status_code", "error");
        }
        if let Some(failure) = self.cause {
            self.span.record("error.type", failure.label());
        }
        self.count(status, outcome, &tally);
        self.log_call(status, outcome, &tally);
        let Tally {
            usage,
            images,
            cost,
            latency,
            usage_suspect,
        } = tally;
        self.sink.record(UsageRow {
            request_id: self.request_id,
            key_id: self.principal.key_id,
            key_name: self.principal.name.clone(),
            model: self.model,
            provider: self.provider,
            upstream_model: self.upstream_model,
            endpoint: self.endpoint.as_str().to_owned(),
            status: i32::from(status),
            outcome,
            streamed: self.summary.stream,
            n: self.summary.n,
            size: self.summary.size,
            quality: self.summary.quality,
            images: i32::try_from(images).unwrap_or(i32::MAX),
            text_input_tokens: usage.text_input_tokens,
            image_input_tokens: usage.image_input_tokens,
            cached_text_input_tokens: usage.cached_text_input_tokens,
            cached_image_input_tokens: usage.cached_image_input_tokens,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            total_tokens: usage.total_tokens,
            cost_nanousd: cost,
            latency_ms: i64::try_from(latency.as_millis()).unwrap_or(i64::MAX),
            created_at: self.created_at,
            raw_usage: extracted.raw_usage.clone(),
            usage_suspect,
            cost_estimated: false,
            attempt: self.attempt,
            client_request_id: Some(self.client_request_id),
            cause: self.cause.map(Failure::label),
        });
    }

    /// What the request used and cost, from the usage the provider reported (capped: an
    /// absurd count is flagged, not summed, and warned of).
    fn tally(&self, outcome: Outcome, extracted: &Extracted) -> Tally {
        let capped = extracted.usage.as_ref().map(TokenUsage::capped);
        let usage_suspect = capped.as_ref().is_some_and(|(_, suspect)| *suspect);
        if usage_suspect {
            tracing::warn!(
                request_id = %self.request_id,
                provider = %self.provider,
                raw_usage = extracted.raw_usage.as_deref().unwrap_or_default(),
                "the provider reported more tokens than one call can use; counts capped and the row flagged usage_suspect"
            );
        }
        let capped = capped.map(|(usage, _)| usage);
        let images = if outcome == Outcome::UpstreamError {
            0
        } else {
            extracted.images
        };
        Tally {
            usage: capped.clone().unwrap_or_default(),
            images,
            cost: cost_nanousd(
                &self.price,
                &Billed {
                    usage: capped.as_ref(),
                    images,
                    // The provider's word on what it made, else what was asked for.
                    quality: extracted
                        .quality
                        .as_deref()
                        .or(self.summary.quality.as_deref()),
                    size: extracted.size.as_deref().or(self.summary.size.as_deref()),
                },
            ),
            latency: self.started.elapsed(),
            usage_suspect,
        }
    }

    /// Counts the request in the metrics.
    fn count(&self, status: u16, outcome: Outcome, tally: &Tally) {
        let m = &self.metrics;
        m.requests(status).increment(1);
        m.duration(latency_outcome(outcome, self.cause))
            .record(tally.latency.as_secs_f64());
        m.input_tokens
            .increment(tally.usage.input_tokens.max(0) as u64);
        m.output_tokens
            .increment(tally.usage.output_tokens.max(0) as u64);
        m.images.increment(u64::from(tally.images));
        let cost = tally.cost.unwrap_or(0).max(0) as u64;
        m.cost.increment(cost);
        if m.per_key {
            metrics::counter!("imagegate_key_cost_nanousd_total", "key" => self.principal.name.clone())
                .increment(cost);
        }
        if outcome != Outcome::Completed {
            metrics::counter!(
                "imagegate_upstream_errors_total",
                &[
                    ("provider", self.provider.clone()),
                    ("kind", outcome.as_str().to_owned()),
                ]
            )
            .increment(1);
        }
    }

    /// Logs the request's one access line.
    fn log_call(&self, status: u16, outcome: Outcome, tally: &Tally) {
        // The request's own line is the access log's; this one is the provider call's (a
        // request that failed over has one per call).
        tracing::info!(
            target: "imagegate::usage",
            request_id = %self.request_id,
            key = %self.principal.name,
            model = %self.model,
            provider = %self.provider,
            upstream_model = %self.upstream_model,
            endpoint = self.endpoint.as_str(),
            status,
            outcome = outcome.as_str(),
            streamed = self.summary.stream,
            images = tally.images,
            input_tokens = tally.usage.input_tokens,
            output_tokens = tally.usage.output_tokens,
            cost_usd = %format_cost(tally.cost),
            cost_nanousd = tally.cost,
            latency_ms = tally.latency.as_millis() as u64,
            "provider call"
        );
    }
}

/// How a call's latency is grouped (one of [`ATTEMPT_OUTCOMES`]): a failure that took no time
/// (a refused connection) kept apart from the answers that took a minute.
fn latency_outcome(outcome: Outcome, cause: Option<Failure>) -> &'static str {
    match (outcome, cause) {
        (Outcome::Completed, _) => ATTEMPT_OUTCOMES[0],
        (Outcome::UpstreamError, _) => ATTEMPT_OUTCOMES[1],
        (Outcome::Failed | Outcome::Interrupted, Some(Failure::Unanswered(cause))) => {
            cause.as_str()
        }
        (Outcome::Failed | Outcome::Interrupted, _) => Cause::Other.as_str(),
    }
}

/// Why a provider call gave no image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer, or one broken off, for this cause.
    Unanswered(Cause),
    /// The provider answered with this error status.
    Status(u16),
}

impl Failure {
    /// The usage row's `cause` (and the attempt span's `error.type`): the cause's word, or
    /// `http_<status>`.
    pub fn label(self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unanswered(cause) => f.write_str(cause.as_str()),
            Failure::Status(status) => write!(f, "http_{status}"),
        }
    }
}

/// What one request used and cost, as counted, logged and stored.
struct Tally {
    /// The usage reported, capped; zero when none was.
    usage: TokenUsage,
    images: u32,
    /// None: the route is unpriced.
    cost: Option<i64>,
    latency: Duration,
    /// The reported usage had to be capped.
    usage_suspect: bool,
}

/// A provider's body on its way to the client.
pub struct Metered {
    inner: Option<BodyStream>,
    extractor: Extractor,
    ticket: Option<UsageTicket>,
    status: u16,
    tasks: TaskTracker,
    /// Set when retries of this request may collect its result.
    keep: Option<(KeepTicket, HeaderMap)>,
    /// Whether any byte reached the client.
    sent_any: bool,
    keepalive: Option<KeepAlive>,
}

/// An SSE comment: clients ignore it, proxies see traffic.
const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// Sends an SSE comment when the provider has been quiet for a while, so that proxies in
/// between do not cut the stream. Only between events: never inside one.
struct KeepAlive {
    every: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The last byte sent ended an event (or nothing was sent yet).
    at_boundary: bool,
    /// The last bytes sent.
    tail: [u8; 4],
}

impl KeepAlive {
    fn new(every: Duration) -> Self {
        KeepAlive {
            every,
            timer: Box::pin(tokio::time::sleep(every)),
            at_boundary: true,
            tail: *b"\n\n\n\n",
        }
    }

    fn sent(&mut self, out: &[u8]) {
        for &b in &out[out.len().saturating_sub(4)..] {
            self.tail = [self.tail[1], self.tail[2], self.tail[3], b];
        }
        self.at_boundary = self.tail.ends_with(b"\n\n") || self.tail == *b"\r\n\r\n";
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + self.every);
    }

    /// Whether a comment is due now; registers the timer's wake-up otherwise.
    fn due(&mut self, cx: &mut Context<'_>) -> bool {
        if self.timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + self.every);
        // Re-arm the waker for the next interval.
        let _ = self.timer.as_mut().poll(cx);
        self.at_boundary
    }
}

impl Metered {
    pub fn new(
        inner: BodyStream,
        kind: BodyKind,
        strip_b64_prefix: bool,
        status: u16,
        ticket: UsageTicket,
        tasks: TaskTracker,
    ) -> Self {
        Metered {
            inner: Some(inner),
            extractor: Extractor::new(kind, strip_b64_prefix),
            ticket: Some(ticket),
            status,
            tasks,
            keep: None,
            sent_any: false,
            keepalive: None,
        }
    }

    /// For SSE bodies: a comment after `every` of silence between events.
    pub fn keepalive(mut self, every: Option<Duration>) -> Self {
        self.keepalive = every.map(KeepAlive::new);
        self
    }

    /// Lets a retry collect this result if the client goes away before receiving any of
    /// it; `headers` are what the retry is answered with.
    pub fn keep_for_retries(mut self, keep: Option<KeepTicket>, headers: HeaderMap) -> Self {
        self.keep = keep.map(|k| (k, headers));
        self
    }

    fn finish(&mut self, outcome: Outcome) {
        self.inner = None;
        // Delivered or failed: nothing for a retry to collect, it calls again.
        self.keep = None;
        if let Some(ticket) = self.ticket.take() {
            ticket.finish(self.status, outcome, &self.extractor.extracted());
        }
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let polled = inner.poll_next_unpin(cx);
            if polled.is_pending() {
                if let Some(keepalive) = &mut this.keepalive {
                    if keepalive.due(cx) {
                        return Poll::Ready(Some(Ok(Bytes::from_static(KEEPALIVE))));
                    }
                }
            }
            match ready!(polled) {
                Some(Ok(chunk)) => {
                    let out = this.extractor.feed(chunk);
                    if !out.is_empty() {
                        this.sent_any = true;
                        if let Some(keepalive) = &mut this.keepalive {
                            keepalive.sent(&out);
                        }
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Some(Err(err)) => {
                    if let Some(ticket) = &mut this.ticket {
                        ticket.cause = Some(Failure::Unanswered(err.cause()));
                    }
                    this.finish(Outcome::Failed);
                    return Poll::Ready(Some(Err(err)));
                }
                None => {
                    let tail = this.extractor.finish();
                    this.finish(Outcome::Completed);
                    return Poll::Ready((!tail.is_empty()).then_some(Ok(tail)));
                }
            }
        }
    }
}

impl Drop for Metered {
    /// The client went away before the body ended. The provider bills the call anyway, so
    /// the rest of its body is read (and discarded) on a tracked task to record its usage.
    fn drop(&mut self) {
        let (Some(mut inner), Some(mut ticket)) = (self.inner.take(), self.ticket.take()) else {
            return;
        };
        let mut extractor =
            std::mem::replace(&mut self.extractor, Extractor::new(BodyKind::Json, false));
        let status = self.status;
        // A result none of which reached the client can be kept whole for its retry.
        let keep = if self.sent_any {
            None
        } else {
            self.keep.take()
        };
        tracing::info!(request_id = %ticket.request_id, keep = keep.is_some(), "client disconnected; reading the rest of the provider's answer");
        self.tasks.spawn(async move {
            let mut writer = keep.as_ref().map(|(ticket, _)| ticket.writer());
            let mut outcome = Outcome::Completed;
            while let Some(chunk) = inner.next().await {
                match chunk {
                    Ok(chunk) => {
                        let out = extractor.feed(chunk);
                        if let Some(w) = &mut writer {
                            if let Err(err) = w.write(&out).await {
                                crate::dedupe::kept_result_dropped(&ticket.request_id, &err);
                                // Dropping it discards what was written.
                                writer = None;
                            }
                        }
                    }
                    Err(err) => {
                        outcome = Outcome::Failed;
                        ticket.cause = Some(Failure::Unanswered(err.cause()));
                        break;
                    }
                }
            }
            let tail = extractor.finish();
            // Kept before the row is recorded: a retry that sees the row finds the result.
            // Any other way (the provider broke off, a write failed), the writer is dropped,
            // which leaves nothing, and the ticket's end tells retries to call again.
            if let (Some(mut w), Some((keep, headers)), Outcome::Completed) =
                (writer, keep, outcome)
            {
                match w.write(&tail).await {
                    Ok(()) => {
                        let status =
                            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
                        keep.keep(w, status, headers).await;
                    }
                    Err(err) => {
                        crate::dedupe::kept_result_dropped(&ticket.request_id, &err);
                    }
                }
            }
            ticket.finish(status, outcome, &extractor.extracted());
        });
    }
}
