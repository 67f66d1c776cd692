//! imagegate: an OpenAI-compatible gateway for the image endpoints. Services point their
//! OpenAI SDK at it with a key it issued; its configuration routes each model to a provider;
//! it streams answers back and records each call's usage and cost per key.
//!
//! Tests and the binary start the same server: [`Gateway::start`] then [`Gateway::serve`].

pub mod app;
pub mod auth;
pub mod body_timeout;
pub mod breaker;
pub mod config;
pub mod dedupe;
pub mod error;
pub mod gate;
pub mod held;
pub mod jobs;
pub mod limits;
pub mod login_throttle;
pub mod multipart;
pub mod notices;
pub mod openai;
pub mod private_fs;
pub mod prometheus;
pub mod refusals;
pub mod replicas;
pub mod results;
pub mod routes;
pub mod routing;
pub mod server;
pub mod services;
pub mod spool;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod upstream;
pub mod usage;
pub mod worker;

pub use app::Gateway;
