//! imagegate: an OpenAI-compatible gateway for the image endpoints.

pub mod usage;
