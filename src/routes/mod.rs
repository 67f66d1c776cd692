//! Thin handlers, one module per group of routes, and the one table of every route.

mod admin;
pub mod dashboard;
mod health;
mod images;
mod jobs;
mod models;

use std::sync::Arc;

use axum::middleware;
use axum::routing::{MethodRouter, delete, get, patch, post};
use axum::{Extension, Router};
use http::Method;

use crate::state::AppState;
use crate::upstream::Endpoint;

/// The only routes that need no key. Every other route is behind authentication.
pub const PUBLIC: &[&str] = &["/healthz", "/readyz", METRICS];

/// Prometheus's page: on the main listener, or alone on `server.metrics_listen` when that
/// is set (see [`metrics_router`]).
pub const METRICS: &str = "/metrics";

/// The image routes, whose request bodies are timed (see [`images::body_timeouts`]).
pub const IMAGES: &str = "/v1/images/";

/// The routes behind the admin token instead of a client key.
pub const ADMIN: &[&str] = &[
    "/admin/reload",
    "/admin/config",
    "/admin/keys",
    "/admin/keys/{name}",
    "/admin/usage",
    "/admin/requests",
    "/admin/refusals",
    "/admin/replicas",
];

/// The dashboard's pages, behind its session cookie instead of a key: without a valid
/// session they redirect to its login form (see [`dashboard::session`]).
pub const DASHBOARD: &[&str] = &[
    "/dashboard",
    "/dashboard/usage.csv",
    "/dashboard/requests.csv",
    "/dashboard/logout",
];

/// The dashboard's login form and its two files: open, like the public routes, but to
/// people rather than probes.
pub const DASHBOARD_OPEN: &[&str] = &[
    dashboard::LOGIN,
    "/dashboard/assets/dashboard.css",
    "/dashboard/assets/dashboard.js",
];

/// Every route: its method, its path template, and its handler. The router is built from
/// this list and nothing else, so that a test can call each route.
fn table() -> Vec<(Method, &'static str, MethodRouter<Arc<AppState>>)> {
    use Method as M;
    vec![
        (M::GET, "/healthz", get(health::healthz)),
        (M::GET, "/readyz", get(health::readyz)),
        (M::GET, METRICS, get(health::metrics)),
        (M::POST, "/v1/images/generations", post(images::generations)),
        (M::POST, "/v1/images/edits", uploads(Endpoint::Edits)),
        (
            M::POST,
            "/v1/images/variations",
            uploads(Endpoint::Variations),
        ),
        (M::GET, "/v1/images/jobs/{id}", get(jobs::retrieve)),
        (M::GET, "/v1/models", get(models::list)),
        (M::GET, "/v1/models/{model}", get(models::retrieve)),
        (M::POST, "/admin/reload", post(admin::reload)),
        (M::GET, "/admin/config", get(admin::config::show)),
        (M::POST, "/admin/keys", post(admin::keys::create)),
        (M::GET, "/admin/keys", get(admin::keys::list)),
        (M::GET, "/admin/keys/{name}", get(admin::keys::show)),
        (M::PATCH, "/admin/keys/{name}", patch(admin::keys::update)),
        (M::DELETE, "/admin/keys/{name}", delete(admin::keys::revoke)),
        (M::GET, "/admin/usage", get(admin::usage::usage)),
        (M::GET, "/admin/requests", get(admin::usage::requests)),
        (M::GET, "/admin/refusals", get(admin::usage::refusals)),
        (M::GET, "/admin/replicas", get(admin::replicas::list)),
        (M::GET, "/dashboard", get(dashboard::dashboard)),
        (M::GET, "/dashboard/usage.csv", get(dashboard::usage_csv)),
        (
            M::GET,
            "/dashboard/requests.csv",
            get(dashboard::requests_csv),
        ),
        (M::POST, "/dashboard/logout", post(dashboard::logout)),
        (
            M::GET,
            dashboard::LOGIN,
            get(dashboard::login_form).post(dashboard::login),
        ),
        (
            M::GET,
            "/dashboard/assets/dashboard.css",
            get(dashboard::css),
        ),
        (M::GET, "/dashboard/assets/dashboard.js", get(dashboard::js)),
    ]
}

/// Edits and variations share their handler; the route tells it which endpoint it serves.
fn uploads(endpoint: Endpoint) -> MethodRouter<Arc<AppState>> {
    post(images::uploads).layer(Extension(endpoint))
}

/// Each route's method and path template, in the order the router is built.
pub fn list() -> Vec<(Method, &'static str)> {
    table()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

/// Every route (but [`METRICS`] when `server.metrics_listen` gives it a listener of its
/// own). Authentication is the app's one layer over all of them; the image routes, which
/// read request bodies, have the body timeouts' layer too.
pub fn router(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let metrics_apart = state.runtime.load().config.server.metrics_listen.is_some();
    table()
        .into_iter()
        .filter(|(_, path, _)| !(metrics_apart && *path == METRICS))
        .fold(Router::new(), |router, (_, path, handler)| {
            let handler = if path.starts_with(IMAGES) {
                handler.route_layer(middleware::from_fn_with_state(
                    Arc::clone(state),
                    images::body_timeouts,
                ))
            } else {
                handler
            };
            router.route(path, handler)
        })
}

/// The metrics listener's one route.
pub fn metrics_router() -> Router<Arc<AppState>> {
    Router::new().route(METRICS, get(health::metrics))
}
