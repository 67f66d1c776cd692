//! imagegate

pub mod store;
pub mod usage;
