//! Admin API, behind the admin token: reload the configuration; the routing table in
//! force ([`config`]); client keys ([`keys`]); usage reports ([`usage`]); the replicas
//! sharing the database ([`replicas`]).

pub mod config;
pub mod keys;
pub mod replicas;
pub mod usage;

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// Re-reads this replica's configuration file, then asks every other replica sharing the
/// database to reload its own (they report their hash in `/metrics`). The answer lists the
/// models now routed, this replica's name and its configuration's hash. A reload refused
/// here asks no other replica.
pub async fn reload(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let runtime = state
        .reload(crate::state::ReloadTrigger::AdminApi)
        .map_err(|err| ApiError::ReloadRefused(err.to_string()))?;
    tracing::info!(source = %runtime.config.source.display(), config_hash = %runtime.config.hash, "configuration reloaded");
    let others = match state.store.publish_reload(&state.replica).await {
        Ok(()) => "asked",
        Err(err) => {
            tracing::warn!(%err, "the other replicas could not be asked to reload");
            "not_asked"
        }
    };
    Ok(Json(json!({
        "status": "reloaded",
        "replica": &*state.replica,
        "config_hash": runtime.config.hash,
        "other_replicas": others,
        "models": runtime.config.public_names(),
    })))
}
