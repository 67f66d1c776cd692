//! Thin handlers, one module per group of routes; the app merges them.

pub mod admin;
mod health;
mod images;
mod models;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;

/// The only routes that need no key. Everything else is behind authentication.
pub const PUBLIC: &[&str] = &["/healthz", "/readyz", "/metrics"];

pub fn public() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
}

/// The OpenAI-compatible API.
pub fn v1() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/images/generations", post(images::generations))
        .route("/v1/images/edits", post(images::edits))
        .route("/v1/images/variations", post(images::variations))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{model}", get(models::retrieve))
}
