//! A call's hold on its key's budget: its worst-case cost reserved in the database before
//! it is sent, so that replicas sharing the database never spend past the budget together.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{BudgetPeriod, Reservation, Reserved, Store};
use crate::upstream::RequestSummary;
use crate::usage::Intent;
use crate::usage::price::{format_usd, worst_case_nanousd};

/// How long a call waits for its reservation. Reservations of one key queue on its row, so
/// a burst of a few hundred calls of one key waits its turn; a database that does not
/// answer at all gets the call refused (503) after this.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(5);

/// When a reservation given up on is released again (after the call stopped waiting for
/// it): soon, for one that was only slow, and later, for one still queued on its key's row.
/// One that lands later still is released by its deadline.
const LATE_RELEASES: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];

/// Releases the reservation of `request_id`, whose outcome the call did not see (a timeout
/// or an error from the database), at each of [`LATE_RELEASES`]: a reservation that was
/// granted after all is given back instead of holding the budget until its deadline. At
/// shutdown (`tasks` closed) it tries once more at once instead of waiting.
async fn release_late(store: Arc<dyn Store>, tasks: TaskTracker, request_id: String) {
    const TICK: Duration = Duration::from_millis(250);
    for wait in LATE_RELEASES {
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until && !tasks.is_closed() {
            tokio::time::sleep(TICK.min(until - tokio::time::Instant::now())).await;
        }
        match store.release(&request_id).await {
            Ok(true) => {
                tracing::info!(request_id, "late budget reservation released");
                return;
            }
            Ok(false) if tasks.is_closed() => return,
            Ok(false) => {}
            Err(err) => tracing::debug!(%err, request_id, "late budget release failed"),
        }
    }
}

/// A reservation the call stopped waiting for: the call is not sent (503), but the
/// reservation may still land (it queues on the key's row), so it is released late.
fn give_up(state: &AppState, request_id: String) -> ApiError {
    let (store, tasks) = (Arc::clone(&state.store), state.tasks.clone());
    (state.tasks).spawn(release_late(store, tasks, request_id));
    ApiError::BudgetUnavailable
}

/// Releases the reservation of a call that was not sent, waiting for the database at most
/// [`RESERVE_TIMEOUT`]; a release that fails or is not answered in time is tried again
/// later (see [`release_late`]), and the reservation's deadline ends it at the latest.
pub(super) async fn release(state: &AppState, request_id: &str) {
    let released = tokio::time::timeout(RESERVE_TIMEOUT, state.store.release(request_id)).await;
    match released {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => {
            tracing::warn!(%err, request_id, "budget reservation not released; trying again later");
            give_up(state, request_id.to_owned());
        }
        Err(_elapsed) => {
            tracing::warn!(
                request_id,
                "budget reservation release timed out; trying again later"
            );
            give_up(state, request_id.to_owned());
        }
    }
}

/// Whether the key had a budget when its principal was read: a key without one costs no
/// database call. A budget set since reaches every replica's key cache by its notice.
pub(super) fn has_budget(principal: &Principal) -> bool {
    principal.limits.budget_nanousd.is_some()
}

/// Reserves `amount` (the call's worst case; none for an unpriced route, which a key with a
/// budget may not use) for `request_id` against the key's budget as the database holds it
/// now (amount and period: a budget lowered on another replica holds at once); the
/// reservation ends with the call's usage row, or `hold_for` from now at the latest. A key
/// revoked meanwhile is refused as at the door (401).
pub(super) async fn hold(
    state: &AppState,
    principal: &Principal,
    request_id: &str,
    model: &str,
    amount: Option<i64>,
    hold_for: Duration,
) -> Result<(), ApiError> {
    if !has_budget(principal) {
        return Ok(());
    }
    // A route without a price could spend anything: a budget cannot hold it.
    let amount = amount.ok_or_else(|| ApiError::UnpricedOverBudget(model.to_owned()))?;
    let now = Utc::now();
    let reservation = Reservation {
        request_id: request_id.to_owned(),
        key_id: principal.key_id,
        amount_nanousd: amount,
        now,
        expires_at: now + hold_for,
    };
    let reserve = state.store.reserve(&reservation);
    let verdict = match tokio::time::timeout(RESERVE_TIMEOUT, reserve).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(err)) => {
            tracing::warn!(%err, key = %principal.name, "budget reservation failed");
            return Err(give_up(state, reservation.request_id));
        }
        Err(_) => {
            tracing::warn!(key = %principal.name, "budget reservation timed out");
            return Err(give_up(state, reservation.request_id));
        }
    };
    match verdict {
        Reserved::Granted { .. } | Reserved::Unlimited => Ok(()),
        Reserved::KeyRevoked => Err(ApiError::KEY_REVOKED),
        Reserved::Refused {
            remaining_nanousd,
            period,
        } => Err(ApiError::InsufficientQuota {
            cost: format_usd(amount),
            remaining: format_usd(remaining_nanousd),
            period: match period {
                BudgetPeriod::Day => "day",
                BudgetPeriod::Month => "month",
                BudgetPeriod::Total => "budget's lifetime",
            },
        }),
    }
}

/// A call's hold kept covering its worst case while its upload arrives: `n`, `size`,
/// `quality` or `partial_images` sent after `model` (both official SDKs send them so) can
/// raise what the provider may bill past what was held when the call was routed. The pump
/// asks [`CostGuard::cover`] before it sends such a field on; a budget that cannot cover
/// the new worst case fails the pump, which cuts the provider's body before its end.
#[derive(Clone, Default)]
pub struct CostGuard(Option<Arc<Guarded>>);

struct Guarded {
    state: Arc<AppState>,
    principal: Arc<Principal>,
    price: crate::config::Price,
    endpoint: crate::upstream::Endpoint,
    max_images: usize,
    hold_for: Duration,
    /// The call's journaled intent, once its hold was granted: its worst case is what is
    /// held (and what an interrupted row would bill).
    intent: std::sync::Mutex<Option<Intent>>,
}

impl CostGuard {
    /// A guard for one attempt of `call` on `route`; armed by [`CostGuard::held`].
    pub(super) fn new(
        call: &super::Call,
        route: &crate::config::Route,
        hold_for: Duration,
    ) -> CostGuard {
        CostGuard(Some(Arc::new(Guarded {
            state: Arc::clone(&call.state),
            principal: Arc::clone(&call.principal),
            price: route.price.clone(),
            endpoint: call.endpoint,
            max_images: call.runtime.config.server.uploads.max_images,
            hold_for,
            intent: std::sync::Mutex::new(None),
        })))
    }

    /// The hold for `intent` was granted (or the key has no budget) and journaled.
    pub(super) fn held(&self, intent: &Intent) {
        if let Some(guarded) = &self.0 {
            *guarded.lock() = Some(intent.clone());
        }
    }

    /// Makes sure the call's hold covers the worst case of `summary` (the request's fields
    /// read so far): raised in the database when it does not, and journaled, so that an
    /// interrupted call is billed at the raised worst case. 429 `insufficient_quota` when
    /// the key's budget cannot hold the new worst case (the hold stays as it was; the call
    /// releases it when it ends).
    pub async fn cover(&self, summary: &RequestSummary) -> Result<(), ApiError> {
        let Some(guarded) = &self.0 else {
            return Ok(());
        };
        let Some(mut intent) = guarded.lock().clone() else {
            return Ok(());
        };
        let worst = worst_case_nanousd(
            &guarded.price,
            guarded.endpoint,
            summary,
            guarded.max_images,
        );
        let raised = match (worst, intent.worst_case_nanousd) {
            (Some(worst), Some(held)) => worst > held,
            // An unpriced route has no worst case to hold (a budget refused it already).
            _ => false,
        };
        if !raised {
            return Ok(());
        }
        let (state, principal) = (&guarded.state, &guarded.principal);
        let (id, model) = (&intent.request_id, &intent.model);
        hold(state, principal, id, model, worst, guarded.hold_for).await?;
        intent.worst_case_nanousd = worst;
        intent.streamed = summary.stream;
        intent.n = summary.n;
        intent.size.clone_from(&summary.size);
        intent.quality.clone_from(&summary.quality);
        if state.usage.intend(&intent).is_err() {
            return Err(ApiError::UsageJournalUnavailable);
        }
        *guarded.lock() = Some(intent);
        Ok(())
    }
}

impl Guarded {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Intent>> {
        self.intent.lock().unwrap_or_else(|e| e.into_inner())
    }
}
