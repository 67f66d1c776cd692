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
