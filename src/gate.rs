//! The door every routed request passes: authentication is on by default (a client key),
//! the admin routes take the admin token instead, the dashboard's pages its session
//! cookie, and only the listed public routes (and the dashboard's login) need none of
//! them; then a key's expiry, its cap on requests in flight and its requests per minute.
//! A known key's refused requests are counted here ([`crate::refusals`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use http::Method;

use crate::auth::{Principal, admin_token_matches, bearer, well_formed};
use crate::error::ApiError;
use crate::held::Held;
use crate::limits::RateLimit;
use crate::refusals;
use crate::routes;
use crate::routes::dashboard::session;
use crate::state::AppState;

/// Every routed request, before its handler: the routes [`routes::PUBLIC`] lists pass as
/// they are, those [`routes::ADMIN`] lists need the admin token, and every other route (any
/// route added later included) needs a valid, unrevoked client key, or gets 401 before
/// anything else happens; a key's request then takes one of its slots in flight.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    match path {
        Some(path) if routes::PUBLIC.contains(&path) || routes::DASHBOARD_OPEN.contains(&path) => {
            Ok(next.run(request).await)
        }
        Some(path) if routes::ADMIN.contains(&path) => require_admin(&state, request, next).await,
        Some(path) if routes::DASHBOARD.contains(&path) => {
            Ok(require_session(&state, request, next).await)
        }
        _ => require_key(&state, request, next).await,
    }
}

/// A valid, unrevoked, unexpired key, or 401; then the key's limits. The response (an
/// error too) carries the principal, for the access log and the per-key metrics.
async fn require_key(
    state: &AppState,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(key) = bearer(&request) else {
        return Err(ApiError::Unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
        ));
    };
    if !well_formed(key) {
        return Err(ApiError::Unauthorized("Incorrect API key provided."));
    }
    let principal = state
        .keys
        .lookup(key)
        .await
        .map_err(|_| ApiError::KeyLookupUnavailable)?
        .ok_or(ApiError::KEY_REVOKED)?;
    let mut response = if principal.expired(Utc::now()) {
        state.refusals.count(&principal.name, "expired");
        ApiError::KEY_EXPIRED.into_response()
    } else {
        request.extensions_mut().insert(Arc::clone(&principal));
        within_limits(state, &principal, request, next)
            .await
            .unwrap_or_else(IntoResponse::into_response)
    };
    // The one place a known key's refusals are counted, whichever layer refused it.
    if let Some(reason) = response.extensions().get().and_then(refusals::reason) {
        state.refusals.count(&principal.name, reason);
    }
    response.extensions_mut().insert(principal);
    Ok(response)
}

/// Admin routes: the admin token from the environment; none configured means no admin API.
async fn require_admin(
    state: &AppState,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let config = Arc::clone(&state.runtime.load().config);
    match bearer(&request) {
        Some(given) if admin_token_matches(config.admin_token.as_ref(), given) => {
            Ok(next.run(request).await)
        }
        _ => Err(ApiError::AdminForbidden),
    }
}

/// Dashboard pages: a session the database holds and has not expired, or a redirect (303)
/// to the login form. A database that does not answer within `key_lookup_timeout` is a
/// 503, not a way in.
async fn require_session(state: &AppState, request: Request, next: Next) -> Response {
    let (token, timeout) = {
        let config = &state.runtime.load().config;
        (config.admin_token.clone(), config.server.key_lookup_timeout)
    };
    let Some(hash) = session::presented(request.headers(), token.as_ref()) else {
        return Redirect::to(routes::dashboard::LOGIN).into_response();
    };
    let active = state.store.session_active(&hash, Utc::now());
    match tokio::time::timeout(timeout, active).await {
        Ok(Ok(true)) => next.run(request).await,
        Ok(Ok(false)) => Redirect::to(routes::dashboard::LOGIN).into_response(),
        Ok(Err(err)) => {
            tracing::warn!(%err, "dashboard session not checked: the database failed");
            ApiError::NotReady.into_response()
        }
        Err(_elapsed) => {
            tracing::warn!("dashboard session not checked: the database did not answer in time");
            ApiError::NotReady.into_response()
        }
    }
}

/// After authentication: at most the key's `max_in_flight` (else
/// `limits.max_in_flight_per_key`) requests of one key at once, counted until the response
/// body has been sent or its client has left (a streamed answer counts for as long as it
/// streams); then, on the image calls (POST), the key's `rpm`. Over either, 429 before
/// anything is forwarded, so the request is neither sent to a provider nor billed.
async fn within_limits(
    state: &AppState,
    principal: &Principal,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let default = state.runtime.load().config.limits.max_in_flight_per_key;
    let cap = principal.max_in_flight(default.get());
    let Some(slot) = state.in_flight.try_enter(principal.key_id, cap) else {
        metrics::counter!("imagegate_key_in_flight_refused_total").increment(1);
        return Err(ApiError::KeyInFlightLimit { limit: cap });
    };
    // Image calls only: a job's polls (GET) and the model list are not counted.
    let rate = match request.extensions().get::<MatchedPath>() {
        Some(path)
            if request.method() == Method::POST && path.as_str().starts_with(routes::IMAGES) =>
        {
            per_key_rate(state, principal).await
        }
        _ => None,
    };
    if let Some(
        refusal @ RateLimit {
            limit,
            retry_after: Some(retry_after),
            ..
        },
    ) = rate
    {
        let mut refused = ApiError::KeyRateLimit {
            rpm: limit,
            retry_after,
        }
        .into_response();
        refusal.write(refused.headers_mut());
        return Ok(refused);
    }
    let mut response = next.run(request).await;
    if let Some(rate) = rate {
        rate.write(response.headers_mut());
    }
    Ok(response.map(|body| Body::new(Held::new(body, slot))))
}

/// Counts the request against the key's `rpm`, in the database that every replica shares;
/// None for a key without one. When the database fails or does not answer within
/// `key_lookup_timeout`, this process's own count answers instead (the same GCRA, counted
/// in `imagegate_rate_limit_local_fallback_total`), so the limit holds per replica at
/// worst; it follows every answer of the database, so it is warm when the database stops.
async fn per_key_rate(state: &AppState, principal: &Principal) -> Option<RateLimit> {
    let rpm = principal.rpm()?;
    let timeout = state.runtime.load().config.server.key_lookup_timeout;
    let taken = tokio::time::timeout(timeout, state.store.take_request(principal.key_id, rpm));
    match taken.await {
        Ok(Ok(shared)) => {
            state.local_rates.follow(principal.key_id, shared);
            Some(RateLimit::of(rpm, shared))
        }
        Ok(Err(err)) => {
            tracing::warn!(%err, key = %principal.name, "rate limit counted by this replica alone: the database failed");
            Some(local_rate(state, principal, rpm))
        }
        Err(_elapsed) => {
            tracing::warn!(key = %principal.name, "rate limit counted by this replica alone: the database did not answer in time");
            Some(local_rate(state, principal, rpm))
        }
    }
}

fn local_rate(state: &AppState, principal: &Principal, rpm: u32) -> RateLimit {
    metrics::counter!("imagegate_rate_limit_local_fallback_total").increment(1);
    RateLimit::of(rpm, state.local_rates.take(principal.key_id, rpm))
}
