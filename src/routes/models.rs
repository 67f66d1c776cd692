//! `GET /v1/models`: the public model names of the routing table in force that the key may
//! use (all of them, unless it has a model allowlist).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Extension, Json};

use crate::auth::Principal;
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

/// Whether `principal` may use the model `name` (a model or an alias) names.
fn allowed(runtime: &Runtime, principal: &Principal, name: &str) -> bool {
    let config = &runtime.config;
    config
        .resolve_model(Some(name))
        .is_some_and(|model| principal.allows(&model.name, &config.aliases))
}

pub async fn list(
    State(RoutingTable(runtime)): State<RoutingTable>,
    Extension(principal): Extension<Arc<Principal>>,
) -> Json<ModelList> {
    let data = runtime
        .config
        .public_names()
        .into_iter()
        .filter(|id| allowed(&runtime, &principal, id))
        .map(|id| entry(&runtime, id))
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// A model the key may not use is not found, as OpenAI answers for a model a key cannot
/// access.
pub async fn retrieve(
    State(RoutingTable(runtime)): State<RoutingTable>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<Json<Model>, ApiError> {
    if allowed(&runtime, &principal, &model) {
        Ok(Json(entry(&runtime, &model)))
    } else {
        Err(ApiError::ModelNotFound(model))
    }
}
