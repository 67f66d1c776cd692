//! Thin handlers, one module per group of routes, and the one table of every route.

mod admin;
mod health;
mod images;
mod models;

use std::sync::Arc;

use axum::Router;
use axum::routing::{MethodRouter, get, post};
use http::Method;

use crate::state::AppState;

/// The only routes that need no key. Every other route is behind authentication.
pub const PUBLIC: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// The routes behind the admin token instead of a client key.
pub const ADMIN: &[&str] = &["/admin/reload"];

/// Every route: its method, its path template, and its handler. The router is built from
/// this list and nothing else, so that a test can call each route.
fn table() -> Vec<(Method, &'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        (Method::GET, "/healthz", get(health::healthz)),
        (Method::GET, "/readyz", get(health::readyz)),
        (Method::GET, "/metrics", get(health::metrics)),
        (
            Method::POST,
            "/v1/images/generations",
            post(images::generations),
        ),
        (Method::POST, "/v1/images/edits", post(images::edits)),
        (
            Method::POST,
            "/v1/images/variations",
            post(images::variations),
        ),
        (Method::GET, "/v1/models", get(models::list)),
        (Method::GET, "/v1/models/{model}", get(models::retrieve)),
        (Method::POST, "/admin/reload", post(admin::reload)),
    ]
}

/// Each route's method and path template, in the order the router is built.
pub fn list() -> Vec<(Method, &'static str)> {
    table()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

/// Every route. Authentication is the app's one layer over all of them.
pub fn router() -> Router<Arc<AppState>> {
    table()
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler)| {
            router.route(path, handler)
        })
}
