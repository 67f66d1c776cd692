//! Application state, the router with its middleware stack, and the server's lifecycle.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::HeaderValue;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::{KeyCache, Principal};
use crate::config::{Config, EnvLookup};
use crate::dedupe::Dedupe;
use crate::error::ApiError;
use crate::gate;
use crate::jobs::Jobs;
use crate::routes;
use crate::server::Listeners;
pub use crate::state::{AppState, ReloadError, RequestId, Runtime};
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
        let metrics = metrics_handle();
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

/// The Prometheus recorder is process-wide; every gateway in the process shares it.
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.005, 0.05, 0.25, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's): render an empty page.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
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

async fn access_log(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = next_request_id();
    request.extensions_mut().insert(RequestId(Arc::clone(&id)));
    let method = request.method().clone();
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let path = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
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
    let key = principal.map(|p| p.name.clone());
    let latency_ms = elapsed.as_millis() as u64;
    match response.extensions().get::<ApiError>() {
        Some(ApiError::Internal(detail)) => {
            let error = escape_control(detail);
            tracing::error!(target: "imagegate::access", request_id = %id, %method, %path, key, status, latency_ms, %error, "request");
        }
        Some(err) => {
            // Error messages quote the client's text (a model name, a part name).
            let message = err.to_string();
            let error = escape_control(&message);
            tracing::info!(target: "imagegate::access", request_id = %id, %method, %path, key, status, latency_ms, %error, "request");
        }
        None if routes::PUBLIC.contains(&path) => {
            tracing::debug!(target: "imagegate::access", request_id = %id, %method, %path, status, latency_ms, "request");
        }
        None => {
            tracing::info!(target: "imagegate::access", request_id = %id, %method, %path, key, status, latency_ms, "request");
        }
    }
    response
}
