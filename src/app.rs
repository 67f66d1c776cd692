//! Application state, the router with its middleware stack, and the server's lifecycle.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::HeaderValue;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::auth::{KeyCache, Principal};
use crate::config::{Config, EnvLookup};
use crate::dedupe::{Dedupe, OriginalRequestId};
use crate::error::ApiError;
use crate::gate;
use crate::jobs::Jobs;
use crate::routes;
use crate::routing::Routed;
use crate::server::Listeners;
pub use crate::state::{AppState, ClientAddress, ReloadError, ReloadTrigger, RequestId, Runtime};
use crate::store::Store;
use crate::usage::writer::UsageWriter;

/// The running gateway: state plus the usage writer, which outlives the server so that
/// shutdown can flush it last.
pub struct Gateway {
    pub state: Arc<AppState>,
    writer: UsageWriter,
}

impl Gateway {
    /// Connects the store, applies migrations, opens the usage journal and starts shipping
    /// it (first what an earlier run left).
    pub async fn start(config: Config, env: EnvLookup) -> anyhow::Result<Gateway> {
        let stale = crate::spool::clean_spool_dir(&config.server.spool_dir).map_err(|e| {
            anyhow::anyhow!(
                "server.spool_dir {}: {e}",
                config.server.spool_dir.display()
            )
        })?;
        if stale > 0 {
            tracing::info!(
                removed = stale,
                "removed upload spool files left by an earlier run"
            );
        }
        let what = format!(
            "{} (set by {})",
            config.database_url.describe(),
            config.database_place
        );
        let (store, _) = crate::store::open(config.database_url.as_str(), &what).await?;
        // Before the journal, which reports its backlog to the recorder.
        let metrics = crate::prometheus::install();
        let (usage, writer) =
            UsageWriter::start(Arc::clone(&store), &config.server.journal_dir).await?;
        let usage = if config.server.record_usage {
            usage
        } else {
            tracing::warn!(
                "server.record_usage is off: no usage is recorded (for benchmarks only)"
            );
            usage.discarding()
        };
        let results = crate::results::Results::open(&config.results, &*env)?;
        let store: Arc<dyn Store> = Arc::new(crate::store::OnRuntime::new(store));
        let replica = crate::state::replica_name();
        let jobs = Arc::new(Jobs::new(
            Arc::clone(&store),
            results.clone(),
            Arc::clone(&replica),
        ));
        let tasks = TaskTracker::new();
        let dedupe = Arc::new(Dedupe::new(
            config.server.duplicate_protection,
            config.server.duplicate_window,
            crate::dedupe::Shared {
                store: Arc::clone(&store),
                results: results.clone(),
                replica: Arc::clone(&replica),
                tasks: tasks.clone(),
            },
        ));
        let keys = KeyCache::new(
            Arc::clone(&store),
            config.server.key_cache_ttl,
            config.server.key_lookup_timeout,
            tasks.clone(),
        );
        let state = Arc::new(AppState {
            replica,
            runtime: ArcSwap::from_pointee(Runtime::new(config)?),
            env,
            store,
            usage,
            keys,
            tasks,
            metrics,
            breakers: Arc::default(),
            dedupe,
            spool: Default::default(),
            json_memory: Default::default(),
            in_flight: Arc::default(),
            local_rates: Default::default(),
            jobs,
            results,
            login_throttle: Default::default(),
            refusals: Arc::default(),
            reload_lock: std::sync::Mutex::new(()),
        });
        Ok(Gateway { state, writer })
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets requests in flight
    /// finish within the configured grace, waits for tracked work, then fsyncs the usage
    /// journal and writes what it holds to the database (within the grace again; what is
    /// left stays in the journal for the next start).
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (grace, limits) = {
            let server = &self.state.runtime.load().config.server;
            (
                server.shutdown_grace,
                crate::server::ConnectionLimits::from_config(server),
            )
        };
        let metrics_listen = self.state.runtime.load().config.server.metrics_listen;
        // Bound by the caller: /metrics must be served where the configuration says, and
        // nowhere else (it is left off the main listener when it has its own).
        if metrics_listen.is_some() != listeners.metrics_addr().is_some() {
            anyhow::bail!(
                "server.metrics_listen and the listeners disagree: bind them with Listeners::with_metrics"
            );
        }
        let services = crate::services::Services::start(&self.state);
        let served = crate::server::serve_workers(
            listeners,
            router(Arc::clone(&self.state)),
            metrics_router(Arc::clone(&self.state)),
            shutdown,
            grace,
            limits,
            self.state.tasks.clone(),
        )
        .await;
        services.stop().await;
        // Whatever happened to the workers, what was recorded reaches the database.
        self.writer.close(grace).await;
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Counts a request in `imagegate_http_requests_total` and times it in
/// `imagegate_http_response_seconds`, through handles kept per thread: looking a metric up
/// by its labels allocates and hashes them.
fn http_metrics(path: &str, status: u16, elapsed: std::time::Duration) {
    type Handles = HashMap<u16, HashMap<Box<str>, (metrics::Counter, metrics::Histogram)>>;
    thread_local! {
        static HANDLES: std::cell::RefCell<Handles> = std::cell::RefCell::new(HashMap::new());
    }
    HANDLES.with_borrow_mut(|handles| {
        let by_path = handles.entry(status).or_default();
        let (requests, seconds) = match by_path.get(path) {
            Some(found) => found,
            // Route templates and statuses: a small, bounded set.
            None => by_path.entry(path.into()).or_insert_with(|| {
                (
                    metrics::counter!("imagegate_http_requests_total", "path" => path.to_owned(), "status" => status.to_string()),
                    metrics::histogram!("imagegate_http_response_seconds", "path" => path.to_owned()),
                )
            }),
        };
        requests.increment(1);
        seconds.record(elapsed.as_secs_f64());
    });
}

/// A request id unique across restarts: a random prefix drawn once per process, then a
/// counter. (A UUID per request costs a getrandom system call on the hot path.)
fn next_request_id() -> Arc<str> {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random::<u64>);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("req_{prefix:016x}{n:012x}").into()
}

/// The longest `x-request-id` kept from a client.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's `x-request-id` is kept as the request's id: 1 to
/// [`MAX_REQUEST_ID_LEN`] characters of ASCII letters, digits and `- _ . : @ + =`, starting
/// with a letter or digit. The id names the usage row, the budget hold and a kept result in
/// the result store, and is written in log lines: no slash, space, quote or control
/// character, no `.` or `..` of its own. UUIDs, ULIDs, proxies' ids and ours all pass.
pub fn valid_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+=".contains(&b))
}

/// The request's id, and the client's own `x-request-id` when it is valid.
///
/// The request's id names its usage row and budget hold, which must be unique: a client's
/// id cannot be trusted to be (the same id sent twice would have its second call's row
/// dropped as a replay of the first, and the two calls share one hold). So a client's id
/// is kept as the start of the request's id, `<client's id>~<a new id>`, and answered
/// back as it came; without one, the new id alone.
fn request_id(headers: &http::HeaderMap) -> (Arc<str>, Option<Arc<str>>) {
    let ours = next_request_id();
    match headers.get("x-request-id").map(HeaderValue::to_str) {
        Some(Ok(theirs)) if valid_request_id(theirs) => {
            (format!("{theirs}~{ours}").into(), Some(theirs.into()))
        }
        _ => (ours, None),
    }
}

/// The client's address: the TCP peer's, or, when the peer is one of
/// `server.trusted_proxies`, the last address of `X-Forwarded-For` that is not a trusted
/// proxy itself (what a proxy appends cannot be forged by the client before it). `None`
/// for a request that came through no socket (a test's `oneshot`).
fn client_address(request: &Request, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_canonical())?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let forwarded = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    let mut client = peer;
    for hop in forwarded.iter().rev() {
        match hop.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // Garbage in the chain: the last address known good stands.
            Err(_) => break,
        }
    }
    Some(client)
}

/// The client's `User-Agent`, fit for a log line and bounded.
fn user_agent(headers: &http::HeaderMap) -> Option<String> {
    const MAX: usize = 256;
    let agent = String::from_utf8_lossy(headers.get(http::header::USER_AGENT)?.as_bytes())
        .chars()
        .take(MAX)
        .collect::<String>();
    Some(escape_control(&agent).into_owned())
}

/// The whole HTTP surface.
///
/// Every request passes, outermost first:
/// 1. `access_log`: gives the request its id (`x-request-id`), times it, counts it, and logs
///    its one line (the usage meter logs a line per provider call besides);
/// 2. `CatchPanicLayer`: a panic becomes a 500 in OpenAI's shape, the server stays up;
/// 3. on every route (not on 404 and 405 answers), [`gate::authenticate`]: a client key by
///    default, the admin token on [`routes::ADMIN`], the dashboard's session cookie on
///    [`routes::DASHBOARD`] (without one: a redirect to its login form), nothing on
///    [`routes::PUBLIC`] and [`routes::DASHBOARD_OPEN`] only;
///    then the key's expiry (401), its cap on requests in flight (its own `max_in_flight`, or
///    `limits.max_in_flight_per_key`) and on the image routes its `rpm` (a database-backed
///    count shared by every replica, with OpenAI's `x-ratelimit-*` headers): over either,
///    429 before anything is forwarded; the slot is held until the response body ends;
/// 4. on the image routes, the request body's timeouts (`routes::images::body_timeouts`).
pub fn router(state: Arc<AppState>) -> Router {
    let routes = routes::router(&state).route_layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        gate::authenticate,
    ));
    outermost(routes, state)
}

/// Layers 1 and 2 of [`router`] (the access log, then the panic guard) around `routes`, and
/// OpenAI-shaped 404 and 405 answers for what no route takes.
fn outermost(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(
                    Arc::clone(&state),
                    access_log,
                ))
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::Internal("handler panicked".into()).into_response()
                })),
        )
        .with_state(state)
}

/// What the metrics listener (`server.metrics_listen`) serves: `/metrics` alone, under the
/// same access log and panic guard as the main router; anything else is a 404 in OpenAI's
/// shape.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    outermost(routes::metrics_router(), state)
}

/// Text from a client, fit for a log line: control characters (a newline that would start a
/// forged line, terminal escapes) are written as escapes.
fn escape_control(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

/// The access line of a request, written once: when its response head is ready, or,
/// when the client left before that (the request's future dropped), with status 499 on
/// drop. The provider call goes on without it, billed as always (see
/// [`crate::routes::images`]).
struct Access {
    id: Arc<str>,
    /// The client's `x-request-id`, when it sent a valid one.
    client_request_id: Option<Arc<str>>,
    method: http::Method,
    path: Option<MatchedPath>,
    client: Option<IpAddr>,
    user_agent: Option<String>,
    started: Instant,
    span: tracing::Span,
    answered: bool,
}

/// What a client that closed its connection before the answer's head gets in the access
/// log and the metrics (nginx's code): it never sees a status.
const CLIENT_CLOSED: u16 = 499;

impl Access {
    fn path(&self) -> &str {
        self.path.as_ref().map_or("unmatched", MatchedPath::as_str)
    }

    fn trace_id(&self) -> Option<String> {
        crate::telemetry::trace_id(&self.span)
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let elapsed = self.started.elapsed();
        http_metrics(self.path(), CLIENT_CLOSED, elapsed);
        self.span
            .record("http.response.status_code", i64::from(CLIENT_CLOSED))
            .record("otel.status_code", "error");
        tracing::info!(
            target: "imagegate::access",
            request_id = %self.id,
            client_request_id = self.client_request_id.as_deref(),
            method = %self.method,
            path = self.path(),
            status = CLIENT_CLOSED,
            latency_ms = elapsed.as_millis() as u64,
            client = self.client.map(|ip| ip.to_string()),
            // Escaped already: written as it is, not escaped again.
            user_agent = self.user_agent.as_deref().map(tracing::field::display),
            trace_id = self.trace_id(),
            error = "the client closed the connection before the answer",
            "request"
        );
    }
}

/// Layer 1 of [`router`]: the request's id, its span (continuing the caller's
/// `traceparent`), its metrics and its one access line.
async fn access_log(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let (id, client_request_id) = request_id(request.headers());
    request.extensions_mut().insert(RequestId(Arc::clone(&id)));
    let method = request.method().clone();
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let path = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let client = {
        let runtime = state.runtime.load();
        client_address(&request, &runtime.config.server.trusted_proxies)
    };
    if let Some(ip) = client {
        request.extensions_mut().insert(ClientAddress(ip));
    }
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {path}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request_id = %id,
        http.request.method = %method,
        http.route = path,
        http.response.status_code = tracing::field::Empty,
        client.address = client.map(|ip| ip.to_string()),
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.provider.name = tracing::field::Empty,
    );
    crate::telemetry::continue_trace(&span, request.headers());
    let mut access = Access {
        id,
        client_request_id,
        method,
        path: matched,
        client,
        user_agent: user_agent(request.headers()),
        started,
        span,
        answered: false,
    };
    let mut response = next.run(request).instrument(access.span.clone()).await;
    access.answered = true;
    let Access {
        ref id,
        ref method,
        client,
        ref user_agent,
        ref span,
        ..
    } = access;
    let path = access.path();
    let answered_id = access.client_request_id.as_deref().unwrap_or(id);
    if let Ok(value) = HeaderValue::from_str(answered_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    http_metrics(path, status, elapsed);
    let principal = response.extensions().get::<Arc<Principal>>();
    if let Some(principal) = principal.filter(|_| state.runtime.load().config.metrics.per_key) {
        // Key names, never keys: a name is what the operator chose to see in reports.
        metrics::counter!("imagegate_key_requests_total", "key" => principal.name.clone(), "status" => status.to_string()).increment(1);
    }
    let key = principal.map(|p| p.name.as_str());
    let routed = response.extensions().get::<Routed>();
    let original = response.extensions().get::<OriginalRequestId>();
    // OpenTelemetry attributes have no unsigned integers: a u64 would be text.
    span.record("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    if let Some(routed) = routed {
        span.record("gen_ai.request.model", routed.model.as_str());
        span.record("gen_ai.provider.name", routed.provider.as_str());
    }
    let error = response
        .extensions()
        .get::<ApiError>()
        .map(|err| match err {
            ApiError::Internal(detail) => escape_control(detail).into_owned(),
            // Error messages quote the client's text (a model name, a part name).
            err => escape_control(&err.to_string()).into_owned(),
        });
    macro_rules! access_line {
        ($level:ident) => {
            tracing::$level!(
                target: "imagegate::access",
                request_id = %id,
                client_request_id = access.client_request_id.as_deref(),
                method = %method,
                path,
                status,
                latency_ms = elapsed.as_millis() as u64,
                client = client.map(|ip| ip.to_string()),
                user_agent = user_agent.as_deref().map(tracing::field::display),
                key,
                model = routed.map(|r| r.model.as_str()),
                provider = routed.map(|r| r.provider.as_str()),
                attempts = routed.map(|r| r.attempts),
                original_request_id = original.map(|o| &*o.0),
                trace_id = access.trace_id(),
                error = error.as_deref().map(tracing::field::display),
                "request"
            )
        };
    }
    match response.extensions().get::<ApiError>() {
        Some(ApiError::Internal(_)) => access_line!(error),
        Some(_) => access_line!(info),
        None if routes::PUBLIC.contains(&path) => access_line!(debug),
        None => access_line!(info),
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(peer: &str, forwarded: Option<&str>) -> Request {
        let mut request = Request::new(axum::body::Body::empty());
        let peer: SocketAddr = format!("{peer}:40000").parse().expect("peer");
        request.extensions_mut().insert(ConnectInfo(peer));
        if let Some(forwarded) = forwarded {
            request.headers_mut().insert(
                "x-forwarded-for",
                HeaderValue::from_str(forwarded).expect("value"),
            );
        }
        request
    }

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().expect("net")).collect()
    }

    #[test]
    fn x_forwarded_for_is_read_only_from_a_trusted_proxy() {
        let client = |peer, forwarded, trusted: &[&str]| {
            client_address(&from(peer, forwarded), &nets(trusted)).map(|ip| ip.to_string())
        };
        // No proxy trusted: the peer, whatever the header says.
        assert_eq!(
            client("192.0.2.1", Some("198.51.100.7"), &[]).as_deref(),
            Some("192.0.2.1")
        );
        // A trusted proxy: the last hop it did not add itself...
        assert_eq!(
            client("10.0.0.2", Some("6.6.6.6, 198.51.100.7"), &["10.0.0.0/8"]).as_deref(),
            Some("198.51.100.7")
        );
        // ...past other trusted proxies in the chain...
        assert_eq!(
            client("10.0.0.2", Some("198.51.100.7, 10.0.0.9"), &["10.0.0.0/8"]).as_deref(),
            Some("198.51.100.7")
        );
        // ...and never past garbage, nor from a peer that is not trusted.
        assert_eq!(
            client("10.0.0.2", Some("198.51.100.7, junk"), &["10.0.0.0/8"]).as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(
            client("192.0.2.1", Some("198.51.100.7"), &["10.0.0.0/8"]).as_deref(),
            Some("192.0.2.1")
        );
        // Without a header: the proxy itself.
        assert_eq!(
            client("10.0.0.2", None, &["10.0.0.0/8"]).as_deref(),
            Some("10.0.0.2")
        );
        // On a dual-stack listener an IPv4 peer comes mapped (::ffff:a.b.c.d): it is
        // matched, and logged, as the IPv4 address it is.
        assert_eq!(
            client("[::ffff:10.0.0.2]", Some("198.51.100.7"), &["10.0.0.0/8"]).as_deref(),
            Some("198.51.100.7")
        );
        assert_eq!(
            client("[::ffff:192.0.2.1]", None, &[]).as_deref(),
            Some("192.0.2.1")
        );
    }

    #[test]
    fn request_ids_are_kept_only_when_safe_to_name_rows_and_files() {
        for good in [
            "req_0123",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "client-7f3a:1",
            "a",
        ] {
            assert!(valid_request_id(good), "{good}");
        }
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in [
            "",
            "../etc",
            ".hidden",
            "a/b",
            "a b",
            "a\nb",
            "caf\u{e9}",
            "\"quoted\"",
            long.as_str(),
        ] {
            assert!(!valid_request_id(bad), "{bad:?}");
        }
        let mut headers = http::HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("client-1"));
        let (id, theirs) = request_id(&headers);
        assert_eq!(theirs.as_deref(), Some("client-1"));
        assert!(id.starts_with("client-1~req_"), "{id}");
        let (again, _) = request_id(&headers);
        assert_ne!(id, again, "the same client id twice makes two request ids");
    }
}
