//! Limits per client key: how many of its requests are answered at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
