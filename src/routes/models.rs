//! `GET /v1/models`: the public model names of the routing table in force.

use axum::Json;
use axum::extract::{Path, State};

use crate::error::ApiError;
use crate::openai::{Model, ModelList};
use crate::state::{RoutingTable, Runtime};

fn entry(runtime: &Runtime, id: &str) -> Model {
    Model {
        id: id.to_owned(),
        object: "model".into(),
        created: runtime.loaded_at,
        owned_by: "imagegate".into(),
    }
}

pub async fn list(State(RoutingTable(runtime)): State<RoutingTable>) -> Json<ModelList> {
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
    State(RoutingTable(runtime)): State<RoutingTable>,
    Path(model): Path<String>,
) -> Result<Json<Model>, ApiError> {
    runtime
        .config
        .resolve_model(Some(&model))
        .map(|_| Json(entry(&runtime, &model)))
        .ok_or(ApiError::ModelNotFound(model))
}
