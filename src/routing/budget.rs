//! A call's hold on its key's budget: its worst-case cost reserved in the database before
//! it is sent, so that replicas sharing the database never spend past the budget together.

use std::time::Duration;

use chrono::Utc;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::{BudgetPeriod, Reservation, Reserved, Store};
use crate::usage::price::format_usd;

/// How long a call waits for its reservation. Reservations of one key queue on its row, so
/// a burst of a few hundred calls of one key waits its turn; a database that does not
/// answer at all gets the call refused (503) after this.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The key's budget and its period, when it has one.
pub(super) fn budget_of(principal: &Principal) -> Option<(i64, BudgetPeriod)> {
    let limit = principal.limits.budget_nanousd?;
    let period = principal
        .limits
        .budget_period
        .as_deref()
        .and_then(BudgetPeriod::parse)
        .unwrap_or(BudgetPeriod::Total);
    Some((limit, period))
}

/// Reserves `amount` (the call's worst case; none for an unpriced route, which a key with a
/// budget may not use) for `request_id` against the key's budget;
/// the reservation ends with the call's usage row, or `hold_for` from now at the latest.
/// A key without a budget costs no database call.
pub(super) async fn hold(
    store: &dyn Store,
    principal: &Principal,
    request_id: &str,
    model: &str,
    amount: Option<i64>,
    hold_for: Duration,
) -> Result<(), ApiError> {
    let Some((limit, period)) = budget_of(principal) else {
        return Ok(());
    };
    // A route without a price could spend anything: a budget cannot hold it.
    let amount = amount.ok_or_else(|| ApiError::UnpricedOverBudget(model.to_owned()))?;
    let now = Utc::now();
    let reservation = Reservation {
        request_id: request_id.to_owned(),
        key_id: principal.key_id,
        limit_nanousd: limit,
        period_start: period.start(now),
        amount_nanousd: amount,
        now,
        expires_at: now + hold_for,
    };
    let verdict = match tokio::time::timeout(RESERVE_TIMEOUT, store.reserve(&reservation)).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(err)) => {
            tracing::warn!(%err, key = %principal.name, "budget reservation failed");
            return Err(ApiError::BudgetUnavailable);
        }
        Err(_) => {
            tracing::warn!(key = %principal.name, "budget reservation timed out");
            return Err(ApiError::BudgetUnavailable);
        }
    };
    let (Reserved::Granted { remaining_nanousd } | Reserved::Refused { remaining_nanousd }) =
        verdict;
    metrics::gauge!("imagegate_key_budget_remaining_nanousd", "key" => principal.name.clone())
        .set(remaining_nanousd as f64);
    match verdict {
        Reserved::Granted { .. } => Ok(()),
        Reserved::Refused { remaining_nanousd } => Err(ApiError::InsufficientQuota {
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
