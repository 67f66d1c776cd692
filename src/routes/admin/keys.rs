//! Admin API for client keys, behind the admin token: create one (the key is shown once),
//! list them or show one (never a key or its hash; with its budget's standing), change a
//! key's limits, revoke one. Every call is
//! logged with who made it ("admin"), what it did and the key's name: never a key or token.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use chrono::{DateTime, SecondsFormat, Utc};
use http::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::auth::settings::{ChangeKey, CreateKey, SettingError};
use crate::auth::{IssuedKey, issue_key};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{BudgetState, KeyLimits, KeyRecord, Standing, StoreError};
use crate::usage::price::format_usd;

/// An admin body is a few hundred bytes; metadata gets room, not without end.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// A key as the admin API shows it: its limits and state, never the key or its hash.
#[derive(Debug, Serialize)]
pub struct KeyView {
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub status: &'static str,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub budget_usd: Option<f64>,
    pub budget_period: Option<String>,
    pub rpm: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub models: Option<Vec<String>>,
    pub metadata: Option<Map<String, Value>>,
    /// The budget's standing now; all null for a key without a budget.
    #[serde(flatten)]
    pub budget: BudgetView,
}

/// A key's budget as it stands (see [`Standing`]): exact in both forms, dollars as decimal
/// text and billionths of a dollar as a number.
#[derive(Debug, Default, Serialize)]
pub struct BudgetView {
    /// When the budget's current period began (a UTC day or month; the epoch for `total`).
    pub period_start: Option<String>,
    pub spent_usd: Option<String>,
    pub spent_nanousd: Option<i64>,
    /// Held by calls in flight: their worst case, until their usage row settles it.
    pub reserved_usd: Option<String>,
    pub reserved_nanousd: Option<i64>,
    pub remaining_usd: Option<String>,
    pub remaining_nanousd: Option<i64>,
}

impl BudgetView {
    fn of(standing: Option<Standing>) -> Self {
        let Some(s) = standing else {
            return BudgetView::default();
        };
        BudgetView {
            period_start: Some(s.period_start.to_rfc3339_opts(SecondsFormat::Secs, true)),
            spent_usd: Some(format_usd(s.spent_nanousd)),
            spent_nanousd: Some(s.spent_nanousd),
            reserved_usd: Some(format_usd(s.reserved_nanousd)),
            reserved_nanousd: Some(s.reserved_nanousd),
            remaining_usd: Some(format_usd(s.remaining_nanousd)),
            remaining_nanousd: Some(s.remaining_nanousd),
        }
    }
}

/// Every key (revoked ones too, oldest first) with its budget's standing at `now`: what the
/// key listing, the dashboard and the budget gauge show, read once for all keys.
pub async fn standings(
    state: &AppState,
    now: DateTime<Utc>,
) -> Result<Vec<(KeyRecord, Option<Standing>)>, ApiError> {
    let keys = state.store.list_keys().await.map_err(ApiError::internal)?;
    let rows = (state.store.budget_standings(now).await).map_err(ApiError::internal)?;
    let rows: std::collections::HashMap<i64, BudgetState> = rows.into_iter().collect();
    Ok(keys
        .into_iter()
        .map(|key| {
            let limits = &key.limits;
            let standing = Standing::of(
                limits.budget_nanousd,
                limits.budget_period.as_deref(),
                rows.get(&key.id),
                now,
            );
            (key, standing)
        })
        .collect())
}

/// A key's state at `now`: `revoked`, `expired` or `active`.
pub fn key_status(record: &KeyRecord, now: DateTime<Utc>) -> &'static str {
    match (record.revoked_at, record.limits.expires_at) {
        (Some(_), _) => "revoked",
        (None, Some(at)) if at <= now => "expired",
        _ => "active",
    }
}

impl KeyView {
    /// A key as listed, with its budget's standing.
    pub fn with_standing(record: KeyRecord, standing: Option<Standing>) -> Self {
        let mut view = KeyView::of(record);
        view.budget = BudgetView::of(standing);
        view
    }

    fn of(record: KeyRecord) -> Self {
        let status = key_status(&record, Utc::now());
        let KeyLimits {
            budget_nanousd,
            budget_period,
            rpm,
            max_in_flight,
            models,
            expires_at,
            metadata,
        } = record.limits;
        KeyView {
            name: record.name,
            prefix: record.prefix,
            status,
            created_at: record.created_at,
            expires_at,
            revoked_at: record.revoked_at,
            // Nano-dollars to dollars: exact for any budget a person sets.
            budget_usd: budget_nanousd.map(|n| n as f64 / 1e9),
            budget_period,
            rpm,
            max_in_flight,
            models,
            metadata,
            budget: BudgetView::default(),
        }
    }
}

/// `POST /admin/keys`: 201 with the new key, shown this once.
pub async fn create(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: CreateKey = read_json(body).await?;
    let (name, limits) = {
        let runtime = state.runtime.load();
        request.check(&runtime.config.public_names())
    }
    .map_err(refused)?;
    let IssuedKey { key, mut new } = issue_key(&name);
    new.limits = limits;
    let record = state.store.create_key(new).await.map_err(|err| match err {
        StoreError::DuplicateKeyName(name) => ApiError::InvalidRequest {
            message: format!(
                "An active key is already named {name:?}: revoke it first, or choose another name."
            ),
            param: Some("name".into()),
            code: Some("duplicate_key_name"),
        },
        other => ApiError::internal(other),
    })?;
    audit("POST /admin/keys", &record.name);
    let mut view = serde_json::to_value(KeyView::of(record)).map_err(ApiError::internal)?;
    view["key"] = Value::String(key);
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /admin/keys`: every key, revoked ones too, oldest first, each with its budget's
/// standing.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let keys = standings(&state, Utc::now()).await?;
    audit("GET /admin/keys", "");
    let data: Vec<KeyView> = keys
        .into_iter()
        .map(|(key, standing)| KeyView::with_standing(key, standing))
        .collect();
    Ok(Json(serde_json::json!({ "object": "list", "data": data })))
}

/// `GET /admin/keys/{name}`: the active key of that name, else the latest revoked one
/// (names are reused once revoked); 404 `key_not_found` when no key ever had it.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let keys = standings(&state, Utc::now()).await?;
    audit("GET /admin/keys/{name}", &name);
    let named = keys.into_iter().filter(|(key, _)| key.name == name);
    // Oldest first: the active key, or else the newest of the revoked ones.
    let found = named.fold(
        None,
        |found: Option<(KeyRecord, Option<Standing>)>, next| match &found {
            Some((key, _)) if key.revoked_at.is_none() => found,
            _ => Some(next),
        },
    );
    let (key, standing) = found.ok_or(ApiError::KeyNotFound(name))?;
    Ok(Json(KeyView::with_standing(key, standing)))
}

/// `PATCH /admin/keys/{name}`: changes the active key's limits; running gateways apply
/// them within `key_cache_ttl`.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<KeyView>, ApiError> {
    let request: ChangeKey = read_json(body).await?;
    let changes = {
        let runtime = state.runtime.load();
        request.check(&runtime.config.public_names())
    }
    .map_err(refused)?;
    let record = state
        .store
        .update_key(&name, &changes)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::KeyNotFound(name.clone()))?;
    audit("PATCH /admin/keys/{name}", &name);
    Ok(Json(KeyView::of(record)))
}

/// `DELETE /admin/keys/{name}`: revokes the active key; 200 with what it was.
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !state
        .store
        .revoke_key(&name)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::KeyNotFound(name));
    }
    audit("DELETE /admin/keys/{name}", &name);
    Ok(Json(
        serde_json::json!({ "name": name, "status": "revoked" }),
    ))
}

/// One line per admin call: who, what, which key (by name; none for the list).
fn audit(what: &str, name: &str) {
    // Debug-formatted: a name written before names were checked may hold a line break.
    tracing::info!(target: "imagegate::admin", who = "admin", what, key = ?name, "admin call");
}

fn refused(err: SettingError) -> ApiError {
    ApiError::invalid(err.message, Some(err.param))
}

/// The body as `T`: malformed JSON, a wrong type or an unknown field is a 400 that names
/// the field.
async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        })?;
    let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let inner = err.inner().to_string();
        let path = err.path().to_string();
        // An unknown field is reported at its parent; its own name is in the message.
        let param = inner
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned)
            .or_else(|| (path != ".").then_some(path));
        not_valid(&inner, param)
    })?;
    deserializer
        .end()
        .map_err(|err| not_valid(&err.to_string(), None))?;
    Ok(value)
}

fn not_valid(detail: &str, param: Option<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("The request body is not valid: {detail}."),
        param,
        code: None,
    }
}
