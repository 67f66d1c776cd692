//! Which serving thread the code runs on. The server numbers its threads; the provider
//! clients read the number to keep each connection on the thread that opened it. Neither
//! needs the other: both depend on this module alone.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as serving thread `index` (the server does, once per thread).
pub fn set_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The serving thread this code runs on, from 0 (also 0 outside them).
pub fn index() -> usize {
    WORKER.with(Cell::get)
}
