//! `GET /admin/replicas`, behind the admin token: every imagegate process writing its
//! heartbeat to this database (see [`crate::replicas`]), live or stale, and a warning when
//! the live ones run different settings or versions.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use chrono::Utc;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::replicas::{HEARTBEAT, LIVE_WITHIN, Roster};
use crate::state::AppState;

/// The replicas, live ones first. A replica whose row is older than
/// [`LIVE_WITHIN`] is listed as `stale` (it died, or lost the database) until its row is
/// deleted an hour after its last beat.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let roster = roster(&state).await?;
    Ok(Json(json!({
        "object": "list",
        "data": roster.replicas,
        "live": roster.live,
        "warnings": roster.warnings,
        "heartbeat_seconds": HEARTBEAT.as_secs(),
        "live_within_seconds": LIVE_WITHIN.as_secs(),
    })))
}

/// The replicas as this replica sees them now; 503 (`not_ready`) while the database does
/// not answer.
pub async fn roster(state: &AppState) -> Result<Roster, ApiError> {
    let rows = state.store.replicas().await.map_err(|err| {
        tracing::warn!(target: "imagegate::admin", %err, "replicas: the database is not answering");
        ApiError::NotReady
    })?;
    Ok(Roster::of(rows, Utc::now(), &state.replica))
}
