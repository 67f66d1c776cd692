//! The configuration file as written: the serde schema and every default, in one place.
//!
//! Each section with defaults is `#[serde(default)]` with one `Default` impl, so a key left
//! out and a section left out get the same value. Durations are read with `humantime_serde`
//! ("30s", "500ms", "10m"); whether a value makes sense is checked by the section modules.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub default_model: Option<String>,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub jobs: RawJobs,
    #[serde(default)]
    pub results: RawResults,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pub pricing: BTreeMap<String, BTreeMap<String, RawPrice>>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawServer {
    pub listen: String,
    /// Unset: `/metrics` is served on `listen`.
    pub metrics_listen: Option<String>,
    pub max_json_body_bytes: u64,
    pub max_json_edit_body_bytes: u64,
    pub json_memory_max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub upstream_total_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub key_cache_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub key_lookup_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_body_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_body_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_interval: Duration,
    pub max_connections: usize,
    pub max_images: usize,
    pub max_image_bytes: u64,
    pub max_mask_bytes: u64,
    pub max_multipart_body_bytes: u64,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub sse_keepalive: Duration,
    pub duplicate_protection: bool,
    pub record_usage: bool,
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    pub journal_dir: PathBuf,
    /// 0: two per CPU.
    pub workers: usize,
    /// CIDRs of the proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            metrics_listen: None,
            max_json_body_bytes: MIB,
            // One data: URL at OpenAI's limit for an image reference (20 MiB), and the rest.
            max_json_edit_body_bytes: 21 * MIB,
            json_memory_max_bytes: 512 * MIB,
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_total_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            key_cache_ttl: Duration::from_secs(5),
            key_lookup_timeout: Duration::from_millis(500),
            request_body_idle_timeout: Duration::from_secs(30),
            request_body_timeout: Duration::from_secs(10 * 60),
            header_read_timeout: Duration::from_secs(30),
            http2_keep_alive_interval: Duration::from_secs(20),
            max_connections: 10_000,
            max_images: 16,
            max_image_bytes: 50 * MIB,
            max_mask_bytes: 4 * MIB,
            // Sixteen full images, a full mask and a MiB for the other fields.
            max_multipart_body_bytes: 16 * 50 * MIB + 4 * MIB + MIB,
            spool_dir: PathBuf::from("data/spool"),
            spool_max_bytes: 20 * 1024 * MIB,
            sse_keepalive: Duration::from_secs(15),
            duplicate_protection: true,
            record_usage: true,
            duplicate_window: Duration::from_secs(10 * 60),
            journal_dir: PathBuf::from("data/journal"),
            workers: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub url: String,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: "sqlite://data/imagegate.db".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub token_env: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            token_env: "IMAGEGATE_ADMIN_TOKEN".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLimits {
    pub max_in_flight_per_key: u32,
    #[serde(with = "humantime_serde")]
    pub budget_hold_grace: Duration,
    pub max_share_per_key: f64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_in_flight_per_key: 64,
            budget_hold_grace: Duration::from_secs(60),
            max_share_per_key: 0.25,
        }
    }
}

/// Off by default: per-key series name every key and its spend to whoever can scrape.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub per_key: bool,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawResults {
    pub url: String,
}

impl Default for RawResults {
    fn default() -> Self {
        RawResults {
            url: "file://data/results".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawJobs {
    /// No longer used (results go to `[results] url`): accepted with a warning, so that an
    /// older configuration still starts.
    pub dir: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    pub max_queued_per_key: u32,
    pub max_kept_per_key: u32,
    pub max_kept_bytes_per_key: u64,
}

impl Default for RawJobs {
    fn default() -> Self {
        RawJobs {
            dir: None,
            retention: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(30),
            max_queued_per_key: 100,
            max_kept_per_key: 1000,
            max_kept_bytes_per_key: 1024 * MIB,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawProvider {
    pub kind: RawProviderKind,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    /// Unset: `server.upstream_connect_timeout`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Unset: the provider's total timeout.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Option<Duration>,
    /// Unset: `server.upstream_total_timeout`.
    #[serde(with = "humantime_serde")]
    pub total_timeout: Option<Duration>,
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Mock providers only: how long before answering.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// The part name this provider wants for edit images ("image" or "image[]").
    pub image_field: Option<String>,
}

impl Default for RawProvider {
    fn default() -> Self {
        RawProvider {
            kind: RawProviderKind::Openai,
            base_url: None,
            api_key_env: None,
            connect_timeout: None,
            first_byte_timeout: None,
            total_timeout: None,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            delay: Duration::from_millis(200),
            image_field: None,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawProviderKind {
    #[default]
    Openai,
    Mock,
}

/// No section default: a model without `routes` is a mistake serde should name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    #[serde(default)]
    pub aliases: Vec<String>,
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub failover: RawFailover,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawFailover {
    pub on_status: Vec<u16>,
    /// At most this many provider calls per request (default: one per route).
    pub max_attempts: Option<usize>,
}

impl Default for RawFailover {
    fn default() -> Self {
        RawFailover {
            on_status: vec![429, 500, 502, 503, 504],
            max_attempts: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub provider: String,
    pub model: Option<String>,
    #[serde(default)]
    pub defaults: Map<String, Value>,
    #[serde(default)]
    pub force: Map<String, Value>,
    #[serde(default)]
    pub drop: Vec<String>,
    #[serde(default)]
    pub strip_b64_prefix: bool,
    /// Unset: every endpoint.
    pub endpoints: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub text_input: Option<f64>,
    pub cached_text_input: Option<f64>,
    pub image_input: Option<f64>,
    pub cached_image_input: Option<f64>,
    pub image_output: Option<f64>,
    pub text_output: Option<f64>,
    pub per_image: Option<f64>,
    /// quality -> size -> USD per image.
    pub table: Option<BTreeMap<String, BTreeMap<String, f64>>>,
    pub min_of: Option<Vec<String>>,
    pub unpriced: Option<bool>,
    pub source: Option<String>,
}
