//! What every request can reach: the state the gateway shares (store, usage sink, key
//! cache, breakers, the routing table in force) and the ids a request carries. Below the
//! routing and the routes that use it, above everything it holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use axum::extract::FromRef;
use tokio_util::task::TaskTracker;

use crate::auth::KeyCache;
use crate::breaker::Breakers;
use crate::config::{Config, ConfigError, EnvLookup};
use crate::dedupe::Dedupe;
use crate::jobs::Jobs;
use crate::limits::{ByteQuota, InFlight, LocalRates};
use crate::login_throttle::LoginThrottle;
use crate::prometheus::catalogue::Named;
use crate::store::Store;
use crate::upstream::Upstreams;
use crate::usage::meter::RouteMetrics;
use crate::usage::writer::UsageSink;

/// What a configuration turns into: replaced whole on reload, so that a request keeps the
/// table it started with.
pub struct Runtime {
    pub config: Arc<Config>,
    pub upstreams: Upstreams,
    /// Per model, one per route, in the order of its routes.
    route_metrics: HashMap<String, Vec<Arc<RouteMetrics>>>,
    /// Unix seconds when this table was loaded (the `created` of `/v1/models`).
    pub loaded_at: i64,
    /// Keeps the series of its providers and models on `/metrics` while it (or a call it
    /// started) lives.
    named: Arc<Named>,
}

impl Runtime {
    /// Built at start and on each reload: the configuration's warnings are logged here.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        for warning in &config.warnings {
            tracing::warn!(source = %config.source.display(), "{warning}");
        }
        let named = Named::claim(&config);
        let route_metrics = config
            .models
            .values()
            .map(|model| {
                let routes = model
                    .routes
                    .iter()
                    .map(|r| {
                        Arc::new(RouteMetrics::new(
                            &model.name,
                            &r.provider.name,
                            config.metrics.per_key,
                            Arc::clone(&named),
                        ))
                    })
                    .collect();
                (model.name.clone(), routes)
            })
            .collect();
        let upstreams = Upstreams::build(&config)?;
        // Which settings each replica runs: `/metrics` shows the hash of its configuration.
        metrics::gauge!("imagegate_config_info", "hash" => config.hash.clone()).set(1.0);
        Ok(Runtime {
            named,
            route_metrics,
            upstreams,
            config: Arc::new(config),
            loaded_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
        })
    }
}

pub struct AppState {
    /// This process's name among the replicas sharing the database: the host's name (a
    /// pod's name on Kubernetes) and a random suffix drawn at start.
    pub replica: Arc<str>,
    pub runtime: ArcSwap<Runtime>,
    pub env: EnvLookup,
    pub store: Arc<dyn Store>,
    pub usage: UsageSink,
    pub keys: KeyCache,
    /// Work that must finish even when its client has gone; shutdown waits for it.
    pub tasks: TaskTracker,
    pub metrics: crate::prometheus::Handle,
    /// Per provider, kept across reloads.
    pub breakers: Arc<Breakers>,
    pub dedupe: Arc<Dedupe>,
    /// What the upload spool files hold together, against `server.spool_max_bytes`.
    pub spool: ByteQuota,
    /// What JSON bodies hold in memory together, against `server.json_memory_max_bytes`.
    pub json_memory: ByteQuota,
    /// Requests in flight per key, for `limits.max_in_flight_per_key`.
    pub in_flight: Arc<InFlight>,
    /// Each key's `rpm` counted here too, answering when the database cannot.
    pub local_rates: LocalRates,
    /// Async jobs (`Prefer: respond-async`): rows of the database, results in `results`.
    pub jobs: Arc<Jobs>,
    /// Job results and kept duplicate-protection results (`[results] url`).
    pub results: crate::results::Results,
    /// Failed dashboard logins per client address, on this replica.
    pub login_throttle: LoginThrottle,
    /// Refused requests of known keys, counted here and written in batches.
    pub refusals: Arc<crate::refusals::Refusals>,
    /// Reloads happen one at a time.
    pub(crate) reload_lock: std::sync::Mutex<()>,
}

/// A new replica name (see [`AppState::replica`]).
pub fn replica_name() -> Arc<str> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 64)
        .unwrap_or_else(|| "imagegate".into());
    format!("{host}-{:08x}", rand::random::<u32>()).into()
}

/// The routing table in force when a request arrived, for handlers that need nothing else
/// (a reload while the request is served does not change it under the handler).
#[derive(Clone)]
pub struct RoutingTable(pub Arc<Runtime>);

impl FromRef<Arc<AppState>> for RoutingTable {
    fn from_ref(state: &Arc<AppState>) -> Self {
        RoutingTable(state.runtime.load_full())
    }
}

/// The metrics recorder's handle, for the metrics endpoint.
#[derive(Clone)]
pub struct MetricsHandle(pub crate::prometheus::Handle);

impl FromRef<Arc<AppState>> for MetricsHandle {
    fn from_ref(state: &Arc<AppState>) -> Self {
        MetricsHandle(state.metrics.clone())
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Build(String),
}

/// What asked for a reload, as `imagegate_config_reloads_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// `POST /admin/reload`.
    AdminApi,
    /// `SIGHUP` to the process.
    Sighup,
    /// Another replica's reload, heard as a notice.
    Notice,
}

impl ReloadTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadTrigger::AdminApi => "admin_api",
            ReloadTrigger::Sighup => "sighup",
            ReloadTrigger::Notice => "notice",
        }
    }
}

impl AppState {
    /// Re-reads the configuration file. A valid one replaces the routing table at once; an
    /// invalid one is refused and the table in force stays. Either way it is counted in
    /// `imagegate_config_reloads_total` with what asked for it.
    pub fn reload(&self, trigger: ReloadTrigger) -> Result<Arc<Runtime>, ReloadError> {
        let result = self.reload_now();
        let counted = if result.is_ok() { "applied" } else { "refused" };
        metrics::counter!(
            "imagegate_config_reloads_total",
            "trigger" => trigger.as_str(),
            "result" => counted,
        )
        .increment(1);
        result
    }

    fn reload_now(&self) -> Result<Arc<Runtime>, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.runtime.load_full();
        let config = Config::load(&current.config.source, &self.env)?;
        if config.database_url != current.config.database_url
            || config.server.listen != current.config.server.listen
            || config.server.metrics_listen != current.config.server.metrics_listen
            || config.server.journal_dir != current.config.server.journal_dir
            || config.server.workers != current.config.server.workers
            || config.server.header_read_timeout != current.config.server.header_read_timeout
            || config.server.http2_keep_alive_interval
                != current.config.server.http2_keep_alive_interval
            || config.server.max_connections != current.config.server.max_connections
        {
            tracing::warn!(
                "database.url, server.listen, server.metrics_listen, server.journal_dir, server.workers, server.header_read_timeout, server.http2_keep_alive_interval and server.max_connections changes take effect at the next restart"
            );
        }
        let runtime =
            Arc::new(Runtime::new(config).map_err(|e| ReloadError::Build(e.to_string()))?);
        self.runtime.store(Arc::clone(&runtime));
        self.breakers
            .keep_only(|provider| runtime.config.providers.contains_key(provider));
        if current.config.hash != runtime.config.hash {
            metrics::gauge!("imagegate_config_info", "hash" => current.config.hash.clone())
                .set(0.0);
        }
        Ok(runtime)
    }
}

impl Runtime {
    /// The metric handles of a model's route (by its place in the model's routes).
    pub fn route_metrics(&self, model: &str, route: usize, provider: &str) -> Arc<RouteMetrics> {
        match self.route_metrics.get(model).and_then(|r| r.get(route)) {
            Some(metrics) => Arc::clone(metrics),
            None => Arc::new(RouteMetrics::new(
                model,
                provider,
                self.config.metrics.per_key,
                Arc::clone(&self.named),
            )),
        }
    }
}

/// The request's id, made at the door and echoed in `x-request-id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// The client's address as the access log names it: the TCP peer's, or from
/// `X-Forwarded-For` when the peer is one of `server.trusted_proxies`. Set on every request
/// that came through a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub std::net::IpAddr);
