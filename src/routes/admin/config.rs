//! `GET /admin/config`, behind the admin token: the routing table in force on this replica
//! (models, aliases, each model's routes in failover order with what they serve and cost,
//! the providers with their timeouts and breakers), its hash, and its warnings. Secrets
//! are never in it: provider keys are named by their variable, the admin token by its
//! variable, and URLs lose their password and query.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::config::{
    Config, ImageTable, Price, Provider, ProviderKind, Route, TokenRates, redact_url,
};
use crate::state::AppState;

/// The configuration this replica routes with now (a reload replaces it).
pub async fn show(State(state): State<Arc<AppState>>) -> Json<Value> {
    let runtime = state.runtime.load_full();
    let config = &runtime.config;
    let providers: Vec<Value> = config
        .providers
        .values()
        .map(|p| provider(p, state.breakers.state(&p.name).as_str()))
        .collect();
    let models: Vec<Value> = config
        .models
        .values()
        .map(|model| {
            json!({
                "name": model.name,
                "aliases": model.aliases,
                "failover": {
                    "on_status": model.failover.on_status,
                    "max_attempts": model.failover.max_attempts.get(),
                },
                "routes": model.routes.iter().enumerate().map(|(i, r)| route(i + 1, r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut aliases: Vec<(&String, &String)> = config.aliases.iter().collect();
    aliases.sort();
    Json(json!({
        "object": "config",
        "replica": &*state.replica,
        "config_hash": config.hash,
        "loaded_at": runtime.loaded_at,
        "default_model": config.default_model,
        "database": database(config),
        "admin_token_env": config.admin_token_env,
        "models": models,
        "aliases": aliases.into_iter().map(|(alias, model)| json!({"alias": alias, "model": model})).collect::<Vec<_>>(),
        "providers": providers,
        "warnings": config.warnings,
    }))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn provider(p: &Provider, circuit: &str) -> Value {
    let (kind, base_url, key_env, delay) = match &p.kind {
        ProviderKind::OpenAi {
            base_url,
            api_key_env,
            ..
        } => (
            "openai",
            Some(redact_url(base_url.as_str())),
            Some(api_key_env.as_str()),
            None,
        ),
        ProviderKind::Mock { delay } => ("mock", None, None, Some(millis(*delay))),
    };
    json!({
        "name": p.name,
        "kind": kind,
        "base_url": base_url,
        "api_key_env": key_env,
        "mock_delay_ms": delay,
        "connect_timeout_ms": millis(p.connect_timeout),
        "first_byte_timeout_ms": millis(p.first_byte_timeout),
        "total_timeout_ms": millis(p.total_timeout),
        "breaker": {
            "failures": p.breaker.failures,
            "cooldown_ms": millis(p.breaker.cooldown),
            "state": circuit,
        },
    })
}

fn route(order: usize, r: &Route) -> Value {
    json!({
        "order": order,
        "provider": r.provider.name,
        "upstream_model": r.upstream_model,
        "endpoints": r.endpoints.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
        "priced": r.price != Price::Unpriced,
        "price": price(&r.price),
        "price_source": r.price_source,
        "defaults": r.policy.defaults,
        "force": r.policy.force,
        "drop": r.policy.drop,
        "strip_b64_prefix": r.strip_b64_prefix,
    })
}

/// A price in billionths of a dollar (per token, or per image), as the file sets it.
fn price(price: &Price) -> Value {
    let rates = |r: &TokenRates| {
        json!({
            "text_input_nanousd": r.text_input,
            "cached_text_input_nanousd": r.cached_text_input,
            "image_input_nanousd": r.image_input,
            "cached_image_input_nanousd": r.cached_image_input,
            "image_output_nanousd": r.image_output,
            "text_output_nanousd": r.text_output,
        })
    };
    let table = |t: &ImageTable| json!(t.0);
    match price {
        Price::Tokens(r) => json!({"kind": "tokens", "per_token": rates(r)}),
        Price::PerImage(n) => json!({"kind": "per_image", "per_image_nanousd": n}),
        Price::Table(t) => json!({"kind": "table", "per_image_nanousd": table(t)}),
        Price::MinOf(r, t) => json!({
            "kind": "min_of",
            "per_token": rates(r),
            "per_image_nanousd": table(t),
        }),
        Price::Unpriced => json!({"kind": "unpriced"}),
    }
}

fn database(config: &Config) -> Value {
    let url = config.database_url.as_str();
    let kind = if url.starts_with("sqlite:") {
        "sqlite"
    } else {
        "postgres"
    };
    json!({"kind": kind, "url": redact_url(url)})
}
