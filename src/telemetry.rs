//! Logs and traces: the subscriber every command runs under (one log format a run), the
//! W3C trace context a request continues and passes on to its provider calls, and the
//! OpenTelemetry export over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) names a collector.
//!
//! The trace context is always kept, exported or not: a request's `traceparent` is
//! continued, and each provider attempt carries one with the same trace id (a new one when
//! the request came without) and the attempt's own span id, so that a provider's logs can
//! be matched with ours. Without a collector, imagegate's own spans are not sampled
//! (flag `00`) unless the caller's were.
//!
//! Without a collector the OpenTelemetry layer is not installed: building, timing and
//! dropping its spans (attributes, events, timings) was a tenth of what a request cost.
//! [`Propagation`], a layer of our own, then keeps only what the trace context needs: each
//! span's trace id, span id, sampling flag and `tracestate`.

use std::io::IsTerminal;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written, one way for the whole run (`IMAGEGATE_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event; colours only at a terminal.
    Text,
    /// One JSON object per line, every line: events with their fields flattened.
    Json,
}

impl LogFormat {
    /// `IMAGEGATE_LOG_FORMAT=json` chooses JSON; anything else, text.
    pub fn from_env() -> LogFormat {
        match std::env::var("IMAGEGATE_LOG_FORMAT") {
            Ok(format) if format.eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// The service name spans carry when `OTEL_SERVICE_NAME` does not say.
pub const DEFAULT_SERVICE_NAME: &str = "imagegate";

/// The installed subscriber's tracer; [`Telemetry::shutdown`] sends the spans it still
/// holds.
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// Where spans go, when they go anywhere.
    pub exporting_to: Option<String>,
}

/// True for the spans OpenTelemetry sees: those that declare their kind (the request's
/// server span and each provider attempt's client span), not every function's span.
fn is_otel_span(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.fields().field("otel.kind").is_some()
}

impl Telemetry {
    /// Installs the process's subscriber: log lines on stderr in `format` (filtered by
    /// `RUST_LOG`, `info` by default), and the OpenTelemetry layer, exporting over OTLP
    /// when `export` and the standard variables name an endpoint.
    pub fn init(format: LogFormat, export: bool) -> anyhow::Result<Telemetry> {
        let endpoint = [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
        let exporting_to = endpoint.filter(|_| export);
        let provider = match &exporting_to {
            Some(_) => {
                // Reads the standard variables itself: endpoint, headers, timeout, protocol.
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .build()
                    .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
                let service = std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|s| !s.trim().is_empty())
                    .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
                let resource = opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .with_attribute(opentelemetry::KeyValue::new(
                        "service.version",
                        env!("CARGO_PKG_VERSION"),
                    ))
                    .build();
                // The sampler is the SDK's default (parent-based, always on), or what
                // OTEL_TRACES_SAMPLER says.
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build()
            }
            // Ids for propagation, nothing recorded of our own.
            None => SdkTracerProvider::builder()
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
                .build(),
        };
        let only_otel_spans = || tracing_subscriber::filter::filter_fn(is_otel_span);
        let traces = match &exporting_to {
            Some(_) => tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("imagegate"))
                .with_threads(false)
                .with_target(false)
                .with_filter(only_otel_spans())
                .boxed(),
            None => Propagation.with_filter(only_otel_spans()).boxed(),
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let fmt = match format {
            LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
            // Colour codes only for a person at a terminal, never into a file or a log
            // collector.
            LogFormat::Text => fmt
                .compact()
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter)
                .boxed(),
        };
        tracing_subscriber::registry()
            .with(fmt)
            .with(traces)
            .try_init()?;
        Ok(Telemetry {
            provider,
            exporting_to,
        })
    }

    /// Sends the spans not yet exported and stops the exporter. Call it outside the async
    /// runtime: the exporter's client blocks.
    pub fn shutdown(self) {
        if self.exporting_to.is_none() {
            return;
        }
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(%err, "could not send the last spans to the OTLP endpoint");
        }
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Where a span stands in its trace, kept by [`Propagation`] when no collector is set.
#[derive(Clone)]
struct Place {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    /// The caller's `tracestate`, passed on as it came.
    state: Option<HeaderValue>,
}

impl Place {
    fn traceparent(&self) -> String {
        let flags = if self.sampled { "01" } else { "00" };
        format!("00-{}-{}-{flags}", self.trace_id, self.span_id)
    }
}

/// The trace context without OpenTelemetry's span machinery: a new span gets its parent's
/// trace (or a new, unsampled one) and a span id of its own; nothing else is recorded.
struct Propagation;

impl<S> Layer<S> for Propagation
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let parent = span
            .scope()
            .skip(1)
            .find_map(|ancestor| ancestor.extensions().get::<Place>().cloned());
        let span_id = SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes());
        let place = match parent {
            Some(parent) => Place { span_id, ..parent },
            None => Place {
                trace_id: TraceId::from_bytes(rand::random::<u128>().max(1).to_be_bytes()),
                span_id,
                sampled: false,
                state: None,
            },
        };
        span.extensions_mut().insert(place);
    }
}

/// Runs `f` on the [`Place`] of `span`, when [`Propagation`] keeps one for it.
fn with_place<T>(span: &tracing::Span, f: impl FnOnce(&mut Place) -> T) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let span = registry.span(id)?;
        let mut extensions = span.extensions_mut();
        extensions.get_mut::<Place>().map(f)
    })
    .flatten()
}

/// Makes `span` continue the trace of a request's valid `traceparent` (with its
/// `tracestate`); an absent or malformed one leaves `span` the root of a new trace.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if headers.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    let theirs = cx.span().span_context().clone();
    if !theirs.is_valid() {
        return;
    }
    let kept = with_place(span, |place| {
        place.trace_id = theirs.trace_id();
        place.sampled = theirs.is_sampled();
        // As OpenTelemetry's propagator passes it on: parsed, and dropped when malformed.
        let state = theirs.trace_state().header();
        place.state = HeaderValue::try_from(state)
            .ok()
            .filter(|state| !state.is_empty());
    });
    if kept.is_none() {
        // Fails only when the span is disabled or already entered.
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` (and `tracestate`) naming `span`, for a provider request; empty when
/// no tracing subscriber is installed (a library embedded without one).
pub fn trace_headers(span: &tracing::Span) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let place = with_place(span, |place| place.clone());
    if let Some(place) = place {
        if let Ok(value) = HeaderValue::try_from(place.traceparent()) {
            headers.insert("traceparent", value);
        }
        if let Some(state) = place.state {
            headers.insert("tracestate", state);
        }
        return headers;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(&mut headers));
    }
    headers
}

/// The trace id of `span` in hex, when it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if let Some(id) = with_place(span, |place| place.trace_id.to_string()) {
        return Some(id);
    }
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
