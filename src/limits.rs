//! Limits per client key: how many of its requests are answered at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::ApiError;

/// Requests in flight per key id. A key's count goes when its last request ends, so the
/// map holds only keys with requests in flight.
#[derive(Default)]
pub struct InFlight {
    counts: Mutex<HashMap<i64, u32>>,
}

impl InFlight {
    /// A slot for one more request of `key_id`, or none when it has `cap` already.
    pub fn try_enter(self: &Arc<Self>, key_id: i64, cap: u32) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key_id).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(Slot {
            table: Arc::clone(self),
            key_id,
        })
    }

    /// How many keys have requests in flight (tests).
    pub fn keys(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One request's place among its key's requests in flight; given back when dropped.
pub struct Slot {
    table: Arc<InFlight>,
    key_id: i64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key_id);
            }
        }
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
    let cap = state
        .runtime
        .load()
        .config
        .limits
        .max_in_flight_per_key
        .get();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_key_and_given_back() {
        let table = Arc::new(InFlight::default());
        let a1 = table.try_enter(1, 2).expect("first");
        let a2 = table.try_enter(1, 2).expect("second");
        assert!(table.try_enter(1, 2).is_none(), "third over the cap");
        let b = table.try_enter(2, 2).expect("another key");
        drop(a1);
        let a3 = table.try_enter(1, 2).expect("a slot was given back");
        drop((a2, a3, b));
        assert_eq!(table.keys(), 0, "idle keys leave the map");
    }
}
