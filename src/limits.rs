//! Limits per client key: how many of its requests are answered at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
