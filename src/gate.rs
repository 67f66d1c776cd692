//! The door every routed request passes: a client key, or the admin token, or one of the
//! public routes; then the key's cap on requests in flight.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::auth::{Principal, bearer, hash_key, well_formed};
use crate::error::ApiError;
use crate::limits::Slot;
use crate::state::AppState;

/// Every `/v1` route: a valid, unrevoked key, or 401 before anything else happens.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
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
        .ok_or(ApiError::Unauthorized(
            "Incorrect API key provided, or the key was revoked.",
        ))?;
    request.extensions_mut().insert(Arc::clone(&principal));
    let mut response = next.run(request).await;
    // For the access log's key name.
    response.extensions_mut().insert(principal);
    Ok(response)
}

/// Admin routes: the admin token from the environment; none configured means no admin API.
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let expected = state.runtime.load().config.admin_token.clone();
    let given = bearer(&request);
    match (expected, given) {
        // Comparing hashes keeps the comparison's time independent of where they differ.
        (Some(expected), Some(given)) if hash_key(expected.expose()) == hash_key(given) => {
            Ok(next.run(request).await)
        }
        _ => Err(ApiError::AdminForbidden),
    }
}

/// Every `/v1` route, after authentication: at most `limits.max_in_flight_per_key`
/// requests of one key at once, counted until the response body has been sent or its
/// client has left (a streamed answer counts for as long as it streams). One more gets
/// 429 before it is forwarded, so it is neither sent to a provider nor billed.
pub async fn per_key_in_flight(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(principal) = request.extensions().get::<Arc<Principal>>() else {
        return Ok(next.run(request).await);
    };
    let cap = state.runtime.load().config.limits.max_in_flight_per_key;
    let Some(slot) = state.in_flight.try_enter(principal.key_id, cap) else {
        metrics::counter!("imagegate_key_in_flight_refused_total").increment(1);
        return Err(ApiError::KeyInFlightLimit { limit: cap });
    };
    let response = next.run(request).await;
    Ok(response.map(|body| {
        Body::new(HoldSlot {
            inner: body,
            slot: Some(slot),
        })
    }))
}

/// A response body that holds its request's slot until it ends or is dropped.
struct HoldSlot {
    inner: Body,
    slot: Option<Slot>,
}

impl http_body::Body for HoldSlot {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.slot.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
