//! Budgets in the database: what a key has spent in its period, and the reservations of
//! the calls in flight against it. Shared by replicas through the one database.

use chrono::{DateTime, Datelike, TimeZone, Utc};

/// The span a key's budget covers, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
    Total,
}

impl BudgetPeriod {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "day" => Some(BudgetPeriod::Day),
            "month" => Some(BudgetPeriod::Month),
            "total" => Some(BudgetPeriod::Total),
            _ => None,
        }
    }

    /// When the period that holds `now` began.
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let day = now.date_naive();
        let first = match self {
            BudgetPeriod::Day => day,
            BudgetPeriod::Month => day.with_day(1).unwrap_or(day),
            BudgetPeriod::Total => return DateTime::UNIX_EPOCH,
        };
        Utc.from_utc_datetime(&first.and_time(chrono::NaiveTime::MIN))
    }
}

/// A call's claim on its key's budget, made before the call is sent. The budget itself
/// (amount and period) is read from the key's row in the reservation's own transaction,
/// never taken from a replica's cache: a lowered budget holds from the moment it is stored.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The usage row that settles it will carry this id.
    pub request_id: String,
    pub key_id: i64,
    /// The call's worst-case cost.
    pub amount_nanousd: i64,
    pub now: DateTime<Utc>,
    /// Past this, a reservation its call never settled is released.
    pub expires_at: DateTime<Utc>,
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// Granted; what is left of the budget after it.
    Granted { remaining_nanousd: i64 },
    /// The budget cannot hold it; what is left (less than the amount asked for) in the
    /// period the key's budget has now.
    Refused {
        remaining_nanousd: i64,
        period: BudgetPeriod,
    },
    /// The key has no budget (any more): nothing is held, the call may go.
    Unlimited,
    /// The key was revoked (or deleted) since the request was let in: nothing is held.
    KeyRevoked,
}

/// A key's budget as its row holds it when a reservation reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyBudget {
    Limit { nanousd: i64, period: BudgetPeriod },
    Unlimited,
    Revoked,
}

impl KeyBudget {
    /// From the row's `budget_nanousd`, `budget_period` and whether it is revoked (`None`:
    /// no such key). A budget without a period counts over the key's lifetime, as the
    /// admin API sets it.
    pub(crate) fn of(row: Option<(Option<i64>, Option<String>, bool)>) -> KeyBudget {
        match row {
            None | Some((_, _, true)) => KeyBudget::Revoked,
            Some((None, _, false)) => KeyBudget::Unlimited,
            Some((Some(nanousd), period, false)) => KeyBudget::Limit {
                nanousd,
                period: period
                    .as_deref()
                    .and_then(BudgetPeriod::parse)
                    .unwrap_or(BudgetPeriod::Total),
            },
        }
    }
}

/// A key's budget row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    pub period_start: DateTime<Utc>,
    pub spent_nanousd: i64,
    pub reserved_nanousd: i64,
}

/// A key's budget as the admin API, the dashboard and the budget gauge show it: what is
/// spent in the current period, what calls in flight hold (reservations not yet settled
/// and not past their deadline) and what is left. Computed here alone, from the same
/// figures a reservation weighs, so that every view agrees with what the next call meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub period: BudgetPeriod,
    pub period_start: DateTime<Utc>,
    pub limit_nanousd: i64,
    pub spent_nanousd: i64,
    pub reserved_nanousd: i64,
    /// Never below zero (a budget lowered under what is spent has nothing left).
    pub remaining_nanousd: i64,
}

impl Standing {
    /// The standing of a key whose budget is `limit` per `period` (the key's columns),
    /// given its budget row as [`super::Store::budget_standing`] reads it (none before the
    /// key's first reservation); none for a key without a budget. Spending of an earlier
    /// period counts for nothing, as the next reservation would reset it.
    pub fn of(
        limit: Option<i64>,
        period: Option<&str>,
        state: Option<&BudgetState>,
        now: DateTime<Utc>,
    ) -> Option<Standing> {
        let limit = limit?;
        let period = period
            .and_then(BudgetPeriod::parse)
            .unwrap_or(BudgetPeriod::Total);
        let period_start = period.start(now);
        let (spent, reserved) = match state {
            Some(s) if s.period_start >= period_start => (s.spent_nanousd, s.reserved_nanousd),
            Some(s) => (0, s.reserved_nanousd),
            None => (0, 0),
        };
        Some(Standing {
            period,
            period_start,
            limit_nanousd: limit,
            spent_nanousd: spent,
            reserved_nanousd: reserved,
            remaining_nanousd: limit.saturating_sub(spent).saturating_sub(reserved).max(0),
        })
    }
}

/// Whether `r` fits in a budget of `limit` per `period`, given what is spent and held in
/// the period.
pub(crate) fn verdict(
    r: &Reservation,
    (limit, period): (i64, BudgetPeriod),
    spent: i64,
    reserved: i64,
) -> Reserved {
    let remaining = limit.saturating_sub(spent).saturating_sub(reserved);
    if r.amount_nanousd <= remaining {
        Reserved::Granted {
            remaining_nanousd: remaining - r.amount_nanousd,
        }
    } else {
        Reserved::Refused {
            remaining_nanousd: remaining.max(0),
            period,
        }
    }
}

/// What settling a batch of new usage rows does to one key's budget: the reservations
/// their calls held, and the cost of the rows (by when each call started).
#[derive(Debug, Clone, Default)]
pub(crate) struct Settlement {
    pub released: i64,
    pub costs: Vec<(i64, DateTime<Utc>)>,
}

impl Settlement {
    /// The cost that counts against a period starting at `period_start`: calls that began
    /// in an earlier period are not charged to this one.
    pub fn spent_since(&self, period_start: DateTime<Utc>) -> i64 {
        self.costs
            .iter()
            .filter(|(_, at)| *at >= period_start)
            .fold(0i64, |sum, (cost, _)| sum.saturating_add(*cost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_start_at_utc_midnight_the_first_of_the_month_or_the_epoch() {
        let now = Utc.with_ymd_and_hms(2026, 12, 6, 15, 30, 1).unwrap();
        let cases = [
            (
                BudgetPeriod::Day,
                Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap(),
            ),
            (
                BudgetPeriod::Month,
                Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
            ),
            (BudgetPeriod::Total, DateTime::UNIX_EPOCH),
        ];
        for (period, start) in cases {
            assert_eq!(period.start(now), start, "{period:?}");
        }
    }

    #[test]
    fn a_standing_forgets_an_earlier_period_and_never_goes_below_zero() {
        let now = Utc.with_ymd_and_hms(2026, 12, 6, 15, 30, 1).unwrap();
        let today = Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap();
        let state = |start, spent, reserved| BudgetState {
            period_start: start,
            spent_nanousd: spent,
            reserved_nanousd: reserved,
        };
        assert_eq!(Standing::of(None, None, None, now), None);
        let fresh = Standing::of(Some(100), Some("day"), None, now).unwrap();
        assert_eq!((fresh.spent_nanousd, fresh.remaining_nanousd), (0, 100));
        let held = state(today, 30, 20);
        let standing = Standing::of(Some(100), Some("day"), Some(&held), now).unwrap();
        assert_eq!(
            (
                standing.spent_nanousd,
                standing.reserved_nanousd,
                standing.remaining_nanousd
            ),
            (30, 20, 50)
        );
        let yesterday = state(today - chrono::TimeDelta::days(1), 90, 5);
        let standing = Standing::of(Some(100), Some("day"), Some(&yesterday), now).unwrap();
        assert_eq!(
            (standing.spent_nanousd, standing.remaining_nanousd),
            (0, 95)
        );
        let over = state(today, 150, 0);
        let standing = Standing::of(Some(100), Some("day"), Some(&over), now).unwrap();
        assert_eq!(standing.remaining_nanousd, 0);
        // A budget without a period counts over the key's lifetime.
        let total = Standing::of(Some(100), None, Some(&yesterday), now).unwrap();
        assert_eq!(
            (total.period, total.spent_nanousd),
            (BudgetPeriod::Total, 90)
        );
    }

    #[test]
    fn a_settlement_charges_only_calls_started_in_the_period() {
        let start = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        let settlement = Settlement {
            released: 0,
            costs: vec![
                (5, start - chrono::TimeDelta::microseconds(1)),
                (7, start),
                (11, start + chrono::TimeDelta::days(3)),
            ],
        };
        assert_eq!(settlement.spent_since(start), 18);
    }
}
