//! Limits per client key: how many of its requests are answered at once, and what its
//! requests-per-minute limit tells the client (OpenAI's `x-ratelimit-*` headers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::store::{RATE_WINDOW_NANOS, RateState};

/// Bytes the process holds of one kind (all workers share the count), each hold checked
/// against its maximum: the upload spool's files (`server.spool_max_bytes`), JSON bodies
/// in memory (`server.json_memory_max_bytes`).
#[derive(Clone, Default)]
pub struct ByteQuota(Arc<AtomicU64>);

impl ByteQuota {
    /// A hold on `bytes` more, or none when that would pass `max`.
    pub fn hold(&self, bytes: u64, max: u64) -> Option<QuotaHold> {
        let mut hold = self.empty_hold();
        hold.grow(bytes, max).then_some(hold)
    }

    /// A hold on nothing yet, to [`QuotaHold::grow`] as bytes come.
    pub fn empty_hold(&self) -> QuotaHold {
        QuotaHold {
            quota: self.clone(),
            bytes: 0,
        }
    }
}

/// A share of a [`ByteQuota`], given back when dropped.
pub struct QuotaHold {
    quota: ByteQuota,
    bytes: u64,
}

impl QuotaHold {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `add` bytes more, unless that would take the quota past `max`: then nothing
    /// changes and the answer is false.
    pub fn grow(&mut self, add: u64, max: u64) -> bool {
        let before = self.quota.0.fetch_add(add, Ordering::Relaxed);
        if before.saturating_add(add) > max {
            self.quota.0.fetch_sub(add, Ordering::Relaxed);
            return false;
        }
        self.bytes += add;
        true
    }

    /// Gives back what is held beyond `bytes` (a body held at its limit that was shorter).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.quota
                .0
                .fetch_sub(self.bytes - bytes, Ordering::Relaxed);
            self.bytes = bytes;
        }
    }
}

impl Drop for QuotaHold {
    fn drop(&mut self) {
        self.quota.0.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Requests in flight per key id. A key's count goes when its last request ends, so the
/// map holds only keys with requests in flight.
#[derive(Default)]
pub struct InFlight {
    counts: Mutex<HashMap<i64, u32>>,
    /// Told whenever a slot is given back, for those waiting for one.
    freed: tokio::sync::Notify,
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

    /// A slot for one more request of `key_id`, once it has fewer than `cap` (background
    /// work, such as a job, waits for its turn instead of being refused).
    pub async fn enter(self: &Arc<Self>, key_id: i64, cap: u32) -> Slot {
        loop {
            // Registered before looking, so that a slot given back in between wakes it.
            let freed = self.freed.notified();
            if let Some(slot) = self.try_enter(key_id, cap) {
                return slot;
            }
            freed.await;
        }
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
        drop(counts);
        self.table.freed.notify_waiters();
    }
}

/// A key's rate limit as a client sees it, after one of its requests was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    /// Requests it may still make at once.
    pub remaining: u32,
    /// Until the limit is whole again (every request of the minute available).
    pub reset: Duration,
    /// For a request refused: whole seconds until one more is allowed.
    pub retry_after: Option<u64>,
}

impl RateLimit {
    /// From the GCRA's state (see the store): the theoretical arrival time runs `ahead` of
    /// now by one interval (a minute over `rpm`) per request still counted.
    pub fn of(rpm: u32, state: RateState) -> Self {
        let interval = RATE_WINDOW_NANOS / i64::from(rpm.max(1));
        let ahead = (state.tat_ns - state.at_ns).clamp(0, RATE_WINDOW_NANOS);
        let remaining = ((RATE_WINDOW_NANOS - ahead) / interval).clamp(0, i64::from(rpm));
        let retry_after = (!state.allowed).then(|| {
            let wait = (ahead + interval - RATE_WINDOW_NANOS).max(0);
            // Whole seconds, rounded up, at least one: a retry sooner is refused again.
            u64::try_from(wait)
                .map_or(1, |w| w.div_ceil(1_000_000_000))
                .max(1)
        });
        RateLimit {
            limit: rpm,
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset: Duration::from_nanos(u64::try_from(ahead).unwrap_or(0)),
            retry_after,
        }
    }

    /// OpenAI's request headers: `x-ratelimit-limit-requests`,
    /// `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` (a duration such as
    /// `1s`, `6m0s` or `120ms`).
    pub fn write(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit-requests", HeaderValue::from(self.limit));
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from(self.remaining),
        );
        if let Ok(reset) = HeaderValue::from_str(&openai_duration(self.reset)) {
            headers.insert("x-ratelimit-reset-requests", reset);
        }
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `120ms`, `1.5s`, `6m0s`.
fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (minutes, ms) = (ms / 60_000, ms % 60_000);
    let seconds = if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!(
            "{}s",
            format!("{}.{:03}", ms / 1000, ms % 1000).trim_end_matches('0')
        )
    };
    if minutes > 0 {
        format!("{minutes}m{seconds}")
    } else {
        seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_read_as_openai_writes_them() {
        let interval = RATE_WINDOW_NANOS / 3;
        let state = |allowed, ahead| RateState {
            allowed,
            tat_ns: 1_000 + ahead,
            at_ns: 1_000,
        };
        let first = RateLimit::of(3, state(true, interval));
        assert_eq!((first.remaining, first.retry_after), (2, None));
        assert_eq!(first.reset, Duration::from_secs(20));
        let last = RateLimit::of(3, state(true, 3 * interval));
        assert_eq!(last.remaining, 0);
        let refused = RateLimit::of(3, state(false, 3 * interval - 1_500_000_000));
        assert_eq!((refused.remaining, refused.retry_after), (0, Some(19)));
        let mut headers = HeaderMap::new();
        first.write(&mut headers);
        assert_eq!(headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "2");
        assert_eq!(headers["x-ratelimit-reset-requests"], "20s");
        assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
    }

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

    #[tokio::test]
    async fn a_waiter_gets_the_slot_given_back() {
        let table = Arc::new(InFlight::default());
        let held = table.try_enter(1, 1).expect("first");
        let waiting = table.enter(1, 1);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "no slot while the cap is reached"
        );
        drop(held);
        let slot = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken when the slot is given back");
        assert!(table.try_enter(1, 1).is_none());
        drop(slot);
    }
}
