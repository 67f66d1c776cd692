//! Liveness, readiness and metrics, for orchestrators and scrapers.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRef, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use crate::breaker::Breakers;
use crate::state::{AppState, MetricsHandle, Runtime};
use crate::store::Store;
use crate::usage::writer::UsageSink;

/// What readiness looks at: the store, the usage journal, and the providers' circuits in
/// the routing table in force.
#[derive(Clone)]
pub struct Readiness {
    store: Arc<dyn Store>,
    usage: UsageSink,
    breakers: Arc<Breakers>,
    table: Arc<Runtime>,
}

impl FromRef<Arc<AppState>> for Readiness {
    fn from_ref(state: &Arc<AppState>) -> Self {
        Readiness {
            store: Arc::clone(&state.store),
            usage: state.usage.clone(),
            breakers: Arc::clone(&state.breakers),
            table: state.runtime.load_full(),
        }
    }
}

/// `/readyz`'s `shared_state` while the database does not answer.
const SHARED_STATE_DEGRADED: &str = "degraded: the database is not answering, so \
     duplicate protection is limited to this replica (other replicas cannot see its calls \
     in flight, nor it theirs) and async jobs can be neither created nor read (503 \
     jobs_unavailable) until it answers again";

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the usage store answers within two seconds and the usage journal can be
/// written (`usage_journal` says why not). `usage_backlog` (rows journaled and not yet in
/// the database) is reported, not judged: requests are served while it grows.
/// `shared_state` says what the replicas share through the database and whether this one
/// has it now: without the database, async jobs and duplicate protection hold on this
/// replica alone, until it answers again.
pub async fn readyz(State(state): State<Readiness>) -> Response {
    let database = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(err)) => {
            tracing::warn!(%err, "readiness: database unreachable");
            "unreachable".to_owned()
        }
        Err(_) => "timeout".to_owned(),
    };
    let journal = match state.usage.unavailable() {
        None => "ok".to_owned(),
        Some(reason) => format!("unavailable: {reason}"),
    };
    let shared_state = if database == "ok" {
        "ok"
    } else {
        SHARED_STATE_DEGRADED
    };
    let ready = database == "ok" && journal == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Provider circuits are details: a provider being skipped does not make imagegate unready.
    let providers: serde_json::Map<String, serde_json::Value> = state
        .table
        .config
        .providers
        .keys()
        .map(|name| (name.clone(), state.breakers.state(name).as_str().into()))
        .collect();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "shared_state": shared_state,
        "checks": {
            "database": database,
            "usage_journal": journal,
            "usage_backlog": state.usage.backlog(),
            "providers": providers,
        },
    });
    (status, Json(body)).into_response()
}

/// The Prometheus page; with `metrics.per_key`, each active key's budget gauge is first
/// set to what `GET /admin/keys` shows for it now.
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.runtime.load().config.metrics.per_key {
        budget_gauges(&state).await;
    }
    let MetricsHandle(metrics) = MetricsHandle::from_ref(&state);
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}

/// `imagegate_key_budget_remaining_nanousd{key}` for every active key with a budget, from
/// the one computation the admin API shows ([`super::admin::keys::standings`]): spent and
/// settled calls count at their real cost, calls in flight at their worst case. A database
/// that does not answer within `key_lookup_timeout` leaves the gauges as they were.
async fn budget_gauges(state: &Arc<AppState>) {
    let timeout = state.runtime.load().config.server.key_lookup_timeout;
    let now = chrono::Utc::now();
    let keys = match tokio::time::timeout(timeout, super::admin::keys::standings(state, now)).await
    {
        Ok(Ok(keys)) => keys,
        Ok(Err(err)) => {
            tracing::warn!(%err, "budget gauges not refreshed: the database failed");
            return;
        }
        Err(_elapsed) => {
            tracing::warn!("budget gauges not refreshed: the database did not answer in time");
            return;
        }
    };
    let mut budgeted = std::collections::HashSet::new();
    let mut unbudgeted = std::collections::HashSet::new();
    for (key, standing) in keys {
        let active = super::admin::keys::key_status(&key, now) == "active";
        if let (true, Some(standing)) = (active, standing) {
            metrics::gauge!(BUDGET_GAUGE, "key" => key.name.clone())
                .set(standing.remaining_nanousd as f64);
            budgeted.insert(key.name);
        } else {
            unbudgeted.insert(key.name);
        }
    }
    // A key revoked, expired or without a budget now has no gauge, rather than its last
    // figure (unless another key of that name has an active budget: names can be reused).
    let MetricsHandle(metrics) = MetricsHandle::from_ref(state);
    metrics.retain_gauge_series(BUDGET_GAUGE, "key", |name| {
        budgeted.contains(name) || !unbudgeted.contains(name)
    });
}

const BUDGET_GAUGE: &str = "imagegate_key_budget_remaining_nanousd";
