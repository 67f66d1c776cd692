//! `GET /v1/models`: the public model names of the routing table in force.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use crate::error::ApiError;
use crate::openai::{Model, ModelList};
use crate::state::{AppState, Runtime};

fn entry(runtime: &Runtime, id: &str) -> Model {
    Model {
        id: id.to_owned(),
        object: "model".into(),
        created: runtime.loaded_at,
        owned_by: "imagegate".into(),
    }
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let runtime = state.runtime.load();
    let data = runtime
        .config
        .public_names()
        .into_iter()
        .map(|id| entry(&runtime, id))
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<Model>, ApiError> {
    let runtime = state.runtime.load();
    runtime
        .config
        .resolve_model(Some(&model))
        .map(|_| Json(entry(&runtime, &model)))
        .ok_or(ApiError::ModelNotFound(model))
}
