//! Admin API, behind the admin token: reload the configuration; client keys ([`keys`]);
//! usage reports ([`usage`]); the replicas sharing the database ([`replicas`]).

pub mod keys;
pub mod replicas;
pub mod usage;

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// Re-reads the configuration file; the answer lists the models now routed.
pub async fn reload(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let runtime = state
        .reload()
        .map_err(|err| ApiError::ReloadRefused(err.to_string()))?;
    tracing::info!(source = %runtime.config.source.display(), "configuration reloaded");
    Ok(Json(json!({
        "status": "reloaded",
        "models": runtime.config.public_names(),
    })))
}
