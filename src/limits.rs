//! Limits per client key: its share of the byte quotas all keys share, how many of its
//! requests are answered at once, this process's own count of its requests per minute (for
//! when the database cannot answer), and what that limit tells the client (OpenAI's
//! `x-ratelimit-*` headers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

use crate::config::Share;
use crate::store::{RATE_WINDOW_NANOS, RateState};

/// Bytes the process holds of one kind (all workers share the count), in all and per key,
/// each hold checked against a [`QuotaLimit`]: the upload spool's files
/// (`server.spool_max_bytes`), JSON bodies in memory (`server.json_memory_max_bytes`).
#[derive(Clone, Default)]
pub struct ByteQuota(Arc<Mutex<QuotaCounts>>);

#[derive(Default)]
struct QuotaCounts {
    total: u64,
    /// Key id -> bytes its holds take; a key leaves the map when it holds nothing.
    per_key: HashMap<i64, u64>,
}

/// What the holds on a [`ByteQuota`] may take: all of them together, and those of one key
/// together (its share, `limits.max_share_per_key` of the total), so that one key cannot
/// take the room every other key needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimit {
    pub total: u64,
    pub per_key: u64,
}

impl QuotaLimit {
    pub fn shared(total: u64, share: Share) -> QuotaLimit {
        QuotaLimit {
            total,
            per_key: share.of(total),
        }
    }
}

/// Why a hold could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// The key's holds take its share already: its own doing, other keys are unaffected.
    KeyShare,
    /// All holds together take the whole quota.
    Full,
}

impl ByteQuota {
    /// A hold on `bytes` for `key_id`, or why it cannot be had.
    pub fn hold(
        &self,
        key_id: i64,
        bytes: u64,
        limit: QuotaLimit,
    ) -> Result<QuotaHold, QuotaRefusal> {
        let mut hold = self.empty_hold(key_id, limit);
        hold.grow(bytes)?;
        Ok(hold)
    }

    /// A hold on nothing yet, to [`QuotaHold::grow`] as bytes come.
    pub fn empty_hold(&self, key_id: i64, limit: QuotaLimit) -> QuotaHold {
        QuotaHold {
            quota: self.clone(),
            key_id,
            limit,
            bytes: 0,
        }
    }

    /// Bytes held by all keys, and by `key_id`.
    pub fn held(&self, key_id: i64) -> (u64, u64) {
        let counts = self.counts();
        let key = counts.per_key.get(&key_id).copied().unwrap_or(0);
        (counts.total, key)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, QuotaCounts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request's part of a [`ByteQuota`], given back when dropped.
pub struct QuotaHold {
    quota: ByteQuota,
    key_id: i64,
    limit: QuotaLimit,
    bytes: u64,
}

impl QuotaHold {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `add` bytes more, unless that would take the key past its share or the quota
    /// past its total: then nothing changes and the answer says which.
    pub fn grow(&mut self, add: u64) -> Result<(), QuotaRefusal> {
        let mut counts = self.quota.counts();
        let key = counts.per_key.get(&self.key_id).copied().unwrap_or(0);
        // A share that is the whole quota is no key's own: past it, the quota is full.
        if key.saturating_add(add) > self.limit.per_key && self.limit.per_key < self.limit.total {
            return Err(QuotaRefusal::KeyShare);
        }
        if counts.total.saturating_add(add) > self.limit.total {
            return Err(QuotaRefusal::Full);
        }
        if add > 0 {
            counts.total += add;
            *counts.per_key.entry(self.key_id).or_insert(0) += add;
            self.bytes += add;
        }
        Ok(())
    }

    /// Gives back what is held beyond `bytes` (a body held at its declared length that
    /// was shorter).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.give_back(self.bytes - bytes);
        }
    }

    fn give_back(&mut self, bytes: u64) {
        let mut counts = self.quota.counts();
        counts.total = counts.total.saturating_sub(bytes);
        if let Some(key) = counts.per_key.get_mut(&self.key_id) {
            *key = key.saturating_sub(bytes);
            if *key == 0 {
                counts.per_key.remove(&self.key_id);
            }
        }
        self.bytes -= bytes;
    }
}

impl Drop for QuotaHold {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.give_back(self.bytes);
        }
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

    /// Requests in flight, every key's together (this replica's heartbeat reports it).
    pub fn total(&self) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.values().map(|&n| u64::from(n)).sum()
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

/// Each key's `rpm` counted in this process, for when the database that counts it for every
/// replica cannot answer in time: the same GCRA as the store's statement (see
/// `store::postgres`), on this process's monotonic clock, so that the limit holds per
/// replica at worst instead of failing open.
pub struct LocalRates {
    /// Key id -> theoretical arrival time, in nanoseconds since `epoch`.
    tats: Mutex<HashMap<i64, i64>>,
    epoch: Instant,
    /// Past this many keys, those whose limit is whole again are forgotten.
    prune_at: AtomicUsize,
}

/// Keys kept before the first pruning.
const PRUNE_FROM: usize = 1024;

impl Default for LocalRates {
    fn default() -> Self {
        LocalRates {
            tats: Mutex::default(),
            epoch: Instant::now(),
            prune_at: AtomicUsize::new(PRUNE_FROM),
        }
    }
}

impl LocalRates {
    /// Counts one request of `key_id` against `rpm`, as the store's statement does: allowed
    /// when the theoretical arrival time, moved on by one interval, stays within a window of
    /// now; a refused request moves nothing.
    pub fn take(&self, key_id: i64, rpm: u32) -> RateState {
        let interval = RATE_WINDOW_NANOS / i64::from(rpm.max(1));
        let now = self.now_ns();
        let mut tats = self.tats();
        let state = match tats.get(&key_id).copied() {
            None => RateState {
                allowed: true,
                tat_ns: now + interval,
                at_ns: now,
            },
            Some(tat) => {
                let next = tat.max(now) + interval;
                let allowed = next <= now + RATE_WINDOW_NANOS;
                RateState {
                    allowed,
                    tat_ns: if allowed { next } else { tat },
                    at_ns: now,
                }
            }
        };
        if state.allowed {
            tats.insert(key_id, state.tat_ns);
            self.prune(&mut tats, now);
        }
        state
    }

    /// Takes in what the database answered for `key_id` (the requests every replica made),
    /// so that, should it stop answering, this process goes on from there rather than from
    /// a fresh minute: its state runs as far ahead of now as the database's did, or further.
    pub fn follow(&self, key_id: i64, shared: RateState) {
        let ahead = (shared.tat_ns - shared.at_ns).clamp(0, RATE_WINDOW_NANOS);
        let now = self.now_ns();
        let mut tats = self.tats();
        let tat = tats.entry(key_id).or_insert(now);
        *tat = (*tat).max(now + ahead);
        self.prune(&mut tats, now);
    }

    fn now_ns(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }

    fn tats(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
        self.tats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the keys whose limit is whole again (a key that is not there starts whole),
    /// once there are many; the next pruning waits until the map has doubled, so that many
    /// busy keys do not make every request walk the map.
    fn prune(&self, tats: &mut HashMap<i64, i64>, now: i64) {
        if tats.len() < self.prune_at.load(Ordering::Relaxed) {
            return;
        }
        tats.retain(|_, tat| *tat > now);
        self.prune_at
            .store((2 * tats.len()).max(PRUNE_FROM), Ordering::Relaxed);
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
    fn a_key_holds_at_most_its_share_and_others_keep_theirs() {
        let quota = ByteQuota::default();
        let limit = QuotaLimit::shared(1000, Share::new(0.25).expect("a quarter"));
        assert_eq!(limit.per_key, 250);
        let mut first = quota.empty_hold(1, limit);
        first.grow(200).expect("within the share");
        let mut second = quota.empty_hold(1, limit);
        assert_eq!(second.grow(51), Err(QuotaRefusal::KeyShare));
        second.grow(50).expect("up to the share");
        assert_eq!(quota.held(1), (250, 250));
        // Other keys take the rest, until the whole quota is held.
        let others: Vec<QuotaHold> = (2..5)
            .map(|key| quota.hold(key, 250, limit).expect("another key's share"))
            .collect();
        assert_eq!(
            quota.hold(5, 1, limit).err(),
            Some(QuotaRefusal::Full),
            "the whole quota is held"
        );
        drop(others);
        // With a share of all of it, a key past the quota finds it full.
        let whole = QuotaLimit::shared(1000, Share::new(1.0).expect("all"));
        assert_eq!(
            quota.hold(1, 751, whole).err(),
            Some(QuotaRefusal::Full),
            "key 1 holds 250 already"
        );
        first.shrink_to(100);
        assert_eq!(quota.held(1), (150, 150));
        drop((first, second));
        assert_eq!(quota.held(1), (0, 0));
        assert!(
            quota.counts().per_key.is_empty(),
            "keys holding nothing leave the map"
        );
    }

    #[test]
    fn the_local_limiter_counts_as_the_store_does() {
        let rates = LocalRates::default();
        let taken: Vec<bool> = (0..4).map(|_| rates.take(1, 3).allowed).collect();
        assert_eq!(taken, [true, true, true, false], "three a minute");
        let refused = RateLimit::of(3, rates.take(1, 3));
        assert_eq!(refused.remaining, 0);
        let wait = refused.retry_after.expect("refused");
        assert!((19..=20).contains(&wait), "one more in 20 s: {wait}");
        assert!(rates.take(2, 3).allowed, "other keys are counted apart");

        // What the database answered is taken in: two of three used there, one left here.
        let follower = LocalRates::default();
        let interval = RATE_WINDOW_NANOS / 3;
        follower.follow(
            1,
            RateState {
                allowed: true,
                tat_ns: 5_000 + 2 * interval,
                at_ns: 5_000,
            },
        );
        assert!(follower.take(1, 3).allowed);
        assert!(!follower.take(1, 3).allowed, "the database's two count");
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
