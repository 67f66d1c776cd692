//! imagegate: an OpenAI-compatible gateway for the image endpoints.

pub mod store;
pub mod usage;
