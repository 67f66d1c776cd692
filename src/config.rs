//! Configuration: a TOML file, then `IMAGEGATE_*` environment overrides (`__` nests), read
//! with figment and validated once into types that cannot hold an invalid value.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Where the configuration is read from when neither `--config` nor `IMAGEGATE_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "config/imagegate.toml";

/// Looks up an environment variable; tests hand in their own.
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The process environment.
pub fn process_env() -> EnvLookup {
    Arc::new(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

/// A value that must never reach a log line or an error body.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

// ---------------------------------------------------------------------------------------
// The file as written. Defaults live in serde attributes.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    default_model: Option<String>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pricing: BTreeMap<String, BTreeMap<String, RawPrice>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_json_limit")]
    max_json_body_bytes: u64,
    #[serde(default = "default_connect_timeout")]
    upstream_connect_timeout: String,
    #[serde(default = "default_total_timeout")]
    upstream_total_timeout: String,
    #[serde(default = "default_grace")]
    shutdown_grace: String,
    #[serde(default = "default_key_cache_ttl")]
    key_cache_ttl: String,
    #[serde(default = "default_key_lookup_timeout")]
    key_lookup_timeout: String,
    #[serde(default = "default_request_body_idle_timeout")]
    request_body_idle_timeout: String,
    #[serde(default = "default_request_body_timeout")]
    request_body_timeout: String,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: String,
    #[serde(default = "default_http2_keep_alive_interval")]
    http2_keep_alive_interval: String,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_images")]
    max_images: usize,
    #[serde(default = "default_max_image_bytes")]
    max_image_bytes: u64,
    #[serde(default = "default_max_mask_bytes")]
    max_mask_bytes: u64,
    #[serde(default = "default_max_multipart_body_bytes")]
    max_multipart_body_bytes: u64,
    #[serde(default = "default_spool_dir")]
    spool_dir: PathBuf,
    #[serde(default = "default_spool_max_bytes")]
    spool_max_bytes: u64,
    #[serde(default = "default_sse_keepalive")]
    sse_keepalive: String,
    #[serde(default = "default_true")]
    duplicate_protection: bool,
    #[serde(default = "default_true")]
    record_usage: bool,
    #[serde(default = "default_duplicate_window")]
    duplicate_window: String,
    #[serde(default = "default_journal_dir")]
    journal_dir: PathBuf,
    /// 0: two per CPU.
    #[serde(default)]
    workers: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            max_json_body_bytes: default_json_limit(),
            upstream_connect_timeout: default_connect_timeout(),
            upstream_total_timeout: default_total_timeout(),
            shutdown_grace: default_grace(),
            key_cache_ttl: default_key_cache_ttl(),
            key_lookup_timeout: default_key_lookup_timeout(),
            request_body_idle_timeout: default_request_body_idle_timeout(),
            request_body_timeout: default_request_body_timeout(),
            header_read_timeout: default_header_read_timeout(),
            http2_keep_alive_interval: default_http2_keep_alive_interval(),
            max_connections: default_max_connections(),
            max_images: default_max_images(),
            max_image_bytes: default_max_image_bytes(),
            max_mask_bytes: default_max_mask_bytes(),
            max_multipart_body_bytes: default_max_multipart_body_bytes(),
            spool_dir: default_spool_dir(),
            spool_max_bytes: default_spool_max_bytes(),
            duplicate_protection: true,
            record_usage: true,
            duplicate_window: default_duplicate_window(),
            sse_keepalive: default_sse_keepalive(),
            journal_dir: default_journal_dir(),
            workers: 0,
        }
    }
}

fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> String {
    "30s".into()
}
fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_json_limit() -> u64 {
    1024 * 1024
}
fn default_connect_timeout() -> String {
    "10s".into()
}
fn default_total_timeout() -> String {
    "600s".into()
}
fn default_grace() -> String {
    "30s".into()
}
fn default_key_cache_ttl() -> String {
    "5s".into()
}
fn default_key_lookup_timeout() -> String {
    "500ms".into()
}
fn default_request_body_idle_timeout() -> String {
    "30s".into()
}
fn default_request_body_timeout() -> String {
    "10m".into()
}
fn default_header_read_timeout() -> String {
    "30s".into()
}
fn default_http2_keep_alive_interval() -> String {
    "20s".into()
}
fn default_max_connections() -> usize {
    10_000
}
const MIB: u64 = 1024 * 1024;
const MAX_WORKERS: usize = 1024;
fn default_max_images() -> usize {
    16
}
fn default_max_image_bytes() -> u64 {
    50 * MIB
}
fn default_max_mask_bytes() -> u64 {
    4 * MIB
}
fn default_max_multipart_body_bytes() -> u64 {
    16 * 50 * MIB + 4 * MIB + MIB
}
fn default_sse_keepalive() -> String {
    "15s".into()
}
fn default_true() -> bool {
    true
}
fn default_duplicate_window() -> String {
    "10m".into()
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("data/spool")
}

fn default_spool_max_bytes() -> u64 {
    20 * 1024 * 1024 * 1024
}
fn default_journal_dir() -> PathBuf {
    PathBuf::from("data/journal")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    #[serde(default = "default_database_url")]
    url: String,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: default_database_url(),
        }
    }
}

fn default_database_url() -> String {
    "sqlite://data/imagegate.db".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_token_env")]
    token_env: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            token_env: default_admin_token_env(),
        }
    }
}

fn default_admin_token_env() -> String {
    "IMAGEGATE_ADMIN_TOKEN".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_in_flight_per_key")]
    max_in_flight_per_key: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_in_flight_per_key: default_max_in_flight_per_key(),
        }
    }
}

fn default_max_in_flight_per_key() -> u32 {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    #[serde(default)]
    kind: RawProviderKind,
    base_url: Option<String>,
    api_key_env: Option<String>,
    connect_timeout: Option<String>,
    first_byte_timeout: Option<String>,
    total_timeout: Option<String>,
    #[serde(default = "default_breaker_failures")]
    breaker_failures: u32,
    #[serde(default = "default_breaker_cooldown")]
    breaker_cooldown: String,
    /// Mock providers only: how long before answering.
    delay: Option<String>,
    /// The part name this provider wants for edit images ("image" or "image[]").
    image_field: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawProviderKind {
    #[default]
    Openai,
    Mock,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(default)]
    aliases: Vec<String>,
    routes: Vec<RawRoute>,
    #[serde(default)]
    failover: RawFailover,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    #[serde(default = "default_failover_statuses")]
    on_status: Vec<u16>,
    /// At most this many provider calls per request (default: one per route).
    max_attempts: Option<usize>,
}

impl Default for RawFailover {
    fn default() -> Self {
        RawFailover {
            on_status: default_failover_statuses(),
            max_attempts: None,
        }
    }
}

fn default_failover_statuses() -> Vec<u16> {
    vec![429, 500, 502, 503, 504]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    provider: String,
    model: Option<String>,
    #[serde(default)]
    defaults: Map<String, Value>,
    #[serde(default)]
    force: Map<String, Value>,
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    strip_b64_prefix: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    text_input: Option<f64>,
    cached_text_input: Option<f64>,
    image_input: Option<f64>,
    cached_image_input: Option<f64>,
    image_output: Option<f64>,
    per_image: Option<f64>,
}

// ---------------------------------------------------------------------------------------
// The validated configuration.

#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, for messages and reloads.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub database_url: String,
    pub admin_token: Option<Secret>,
    pub admin_token_env: String,
    pub limits: Limits,
    pub default_model: Option<String>,
    pub providers: BTreeMap<String, Arc<Provider>>,
    /// Public model name -> model, one entry per canonical name.
    pub models: BTreeMap<String, Arc<Model>>,
    /// Alias -> canonical public name.
    pub aliases: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_json_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub key_cache_ttl: Duration,
    /// How long a request waits for the database to check its key.
    pub key_lookup_timeout: Duration,
    /// How long a request may wait for the next bytes of its body before it gets 408.
    pub request_body_idle_timeout: Duration,
    /// How long a request's whole body may take to arrive before it gets 408.
    pub request_body_timeout: Duration,
    /// How long a connection may wait for a request's headers: the first request's (bytes
    /// or an HTTP/2 preface that never complete) and, between requests, the next one's.
    pub header_read_timeout: Duration,
    /// How often an HTTP/2 connection is pinged to find a peer that has gone away.
    pub http2_keep_alive_interval: Duration,
    /// Connections open at once, over all workers; more wait in the listen backlog.
    pub max_connections: usize,
    pub uploads: UploadLimits,
    /// Where edit parts wait on disk while the route is not yet known.
    pub spool_dir: PathBuf,
    /// The most all spool files together may hold; an upload that would exceed it gets 503.
    pub spool_max_bytes: u64,
    /// Silence after which an SSE response gets a keep-alive comment.
    pub sse_keepalive: Duration,
    /// Off only to measure what recording costs: no row is written at all.
    pub record_usage: bool,
    /// Retries attach to the original call instead of paying again.
    pub duplicate_protection: bool,
    /// How long a retry can find its original, and how long a result is kept for it.
    pub duplicate_window: Duration,
    /// Where usage rows are journaled on their way to the database.
    pub journal_dir: PathBuf,
    /// Serving threads, each with its own runtime, listening socket and provider
    /// connections.
    pub workers: usize,
}

/// Limits per client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests of one key being answered at once (bodies included); more get 429.
    pub max_in_flight_per_key: u32,
}

/// Limits on multipart edits and variations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    pub max_images: usize,
    pub max_image_bytes: u64,
    pub max_mask_bytes: u64,
    pub max_body_bytes: u64,
}

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// Edit image parts are renamed to this; `None` keeps the client's spelling.
    pub image_field: Option<String>,
    pub connect_timeout: Duration,
    /// Until the provider's status line and headers arrive.
    pub first_byte_timeout: Duration,
    pub total_timeout: Duration,
    pub breaker: BreakerConfig,
}

/// After `failures` consecutive failures a provider is skipped for `cooldown`, then probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cooldown: Duration,
}

#[derive(Debug)]
pub enum ProviderKind {
    /// An OpenAI-compatible HTTP API.
    OpenAi {
        base_url: reqwest::Url,
        api_key: Secret,
        api_key_env: String,
    },
    /// Answers inside imagegate with a small PNG and realistic usage, after a delay.
    Mock { delay: Duration },
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub aliases: Vec<String>,
    /// Tried in order (failover walks this list).
    pub routes: Vec<Route>,
    pub failover: Failover,
}

/// When a request moves on to the model's next route. Connection failures and timeouts
/// before the provider answers always do; these statuses do too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    pub on_status: Vec<u16>,
    pub max_attempts: usize,
}

#[derive(Debug)]
pub struct Route {
    pub provider: Arc<Provider>,
    pub upstream_model: String,
    pub policy: ParamPolicy,
    /// The provider prefixes `b64_json` with `data:image/...;base64,`; remove it on the way.
    pub strip_b64_prefix: bool,
    pub price: Price,
}

/// What a route changes in a request before it goes upstream.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ParamPolicy {
    /// Set when absent (or null).
    pub defaults: Map<String, Value>,
    /// Always set.
    pub force: Map<String, Value>,
    /// Always removed.
    pub drop: Vec<String>,
}

impl ParamPolicy {
    /// Applies the policy to a JSON request body.
    pub fn apply(&self, body: &mut Map<String, Value>) {
        for (key, value) in &self.defaults {
            if body.get(key).is_none_or(Value::is_null) {
                body.insert(key.clone(), value.clone());
            }
        }
        for (key, value) in &self.force {
            body.insert(key.clone(), value.clone());
        }
        for key in &self.drop {
            body.shift_remove(key);
        }
    }
}

/// Prices in billionths of a dollar (nano-USD), so that costs add up exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Price {
    /// Nano-USD per token (a rate of $5 per million tokens is 5000).
    Tokens {
        text_input: i64,
        cached_text_input: i64,
        image_input: i64,
        cached_image_input: i64,
        image_output: i64,
    },
    PerImage(i64),
}

/// A configuration that cannot be used, with the file and key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Parse {
        file: String,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads `path`, then the `IMAGEGATE_SECTION__KEY` overrides, and validates the result.
    /// The file must exist: a typo in `--config` should not silently start on defaults.
    pub fn load(path: &Path, env: &EnvLookup) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        if !path.is_file() {
            return Err(ConfigError::Invalid {
                file,
                key: "--config".into(),
                message: "no such file (pass --config PATH or set IMAGEGATE_CONFIG)".into(),
            });
        }
        let figment = Figment::new()
            .merge(Toml::file(path))
            .merge(env_overrides());
        Self::from_figment(&figment, path, env)
    }

    /// Validates what a figment holds; `path` is only used in messages.
    pub fn from_figment(
        figment: &Figment,
        path: &Path,
        env: &EnvLookup,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = figment.extract().map_err(|source| ConfigError::Parse {
            file: file.clone(),
            source: Box::new(source),
        })?;
        Validator { file, env }.validate(raw, path)
    }

    /// Resolves a requested model name (or the default when none was given).
    pub fn resolve_model(&self, requested: Option<&str>) -> Option<&Arc<Model>> {
        let name = requested.or(self.default_model.as_deref())?;
        let canonical = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        self.models.get(canonical)
    }

    /// Every public name a client may use: models and their aliases.
    pub fn public_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .models
            .values()
            .flat_map(|m| {
                std::iter::once(m.name.as_str()).chain(m.aliases.iter().map(String::as_str))
            })
            .collect();
        names.sort_unstable();
        names
    }
}

/// Reads only `database.url` (file, then environment), without validating the rest:
/// managing keys and reading usage need no provider key.
pub fn load_database_url(path: &Path) -> Result<String, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::Invalid {
            file: path.display().to_string(),
            key: "--config".into(),
            message: "no such file (pass --config PATH or set IMAGEGATE_CONFIG)".into(),
        });
    }
    let figment = Figment::new()
        .merge(Toml::file(path))
        .merge(env_overrides());
    match figment.extract_inner::<String>("database.url") {
        Ok(url) => Ok(url),
        Err(err) if err.missing() => Ok(default_database_url()),
        Err(source) => Err(ConfigError::Parse {
            file: path.display().to_string(),
            source: Box::new(source),
        }),
    }
}

/// `IMAGEGATE_SERVER__LISTEN` -> `server.listen`. Only variables with a `__` (or the one
/// top-level key) are read, so that `IMAGEGATE_CONFIG`, `IMAGEGATE_ADMIN_TOKEN` and the like
/// are not mistaken for configuration keys.
fn env_overrides() -> Env {
    Env::prefixed("IMAGEGATE_")
        .filter(|key| {
            key.as_str().contains("__") || key.as_str().eq_ignore_ascii_case("default_model")
        })
        .split("__")
}

struct Validator<'a> {
    file: String,
    env: &'a EnvLookup,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn duration(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(value).map_err(|e| {
            self.err(
                key,
                format!("{value:?} is not a duration like \"30s\" ({e})"),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(key, "must be longer than zero"));
        }
        Ok(d)
    }

    fn validate(&self, raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let s = &raw.server;
        let listen: SocketAddr = s.listen.parse().map_err(|_| {
            self.err(
                "server.listen",
                format!("{:?} is not an address like 127.0.0.1:8080", s.listen),
            )
        })?;
        if s.max_json_body_bytes == 0 {
            return Err(self.err("server.max_json_body_bytes", "must be at least 1"));
        }
        let connect_timeout = self.duration(
            "server.upstream_connect_timeout",
            &s.upstream_connect_timeout,
        )?;
        let total_timeout =
            self.duration("server.upstream_total_timeout", &s.upstream_total_timeout)?;
        let server = ServerConfig {
            listen,
            max_json_body_bytes: usize::try_from(s.max_json_body_bytes)
                .map_err(|_| self.err("server.max_json_body_bytes", "is too large"))?,
            shutdown_grace: self.duration("server.shutdown_grace", &s.shutdown_grace)?,
            key_cache_ttl: self.duration("server.key_cache_ttl", &s.key_cache_ttl)?,
            key_lookup_timeout: self
                .duration("server.key_lookup_timeout", &s.key_lookup_timeout)?,
            request_body_idle_timeout: self.duration(
                "server.request_body_idle_timeout",
                &s.request_body_idle_timeout,
            )?,
            request_body_timeout: self
                .duration("server.request_body_timeout", &s.request_body_timeout)?,
            header_read_timeout: self
                .duration("server.header_read_timeout", &s.header_read_timeout)?,
            http2_keep_alive_interval: self.duration(
                "server.http2_keep_alive_interval",
                &s.http2_keep_alive_interval,
            )?,
            max_connections: match s.max_connections {
                0 => return Err(self.err("server.max_connections", "must be at least 1")),
                n => n,
            },
            uploads: UploadLimits {
                max_images: s.max_images,
                max_image_bytes: s.max_image_bytes,
                max_mask_bytes: s.max_mask_bytes,
                max_body_bytes: s.max_multipart_body_bytes,
            },
            spool_dir: s.spool_dir.clone(),
            spool_max_bytes: s.spool_max_bytes,
            sse_keepalive: self.duration("server.sse_keepalive", &s.sse_keepalive)?,
            duplicate_protection: s.duplicate_protection,
            record_usage: s.record_usage,
            duplicate_window: self.duration("server.duplicate_window", &s.duplicate_window)?,
            journal_dir: s.journal_dir.clone(),
            workers: match s.workers {
                // Two per CPU: a worker that the scheduler preempts (the CPUs are shared
                // with other programs) stalls only its share of the connections.
                0 => 2 * std::thread::available_parallelism().map_or(1, |n| n.get()),
                n if n > MAX_WORKERS => {
                    return Err(self.err(
                        "server.workers",
                        format!("must be at most {MAX_WORKERS} (0: two per CPU)"),
                    ));
                }
                n => n,
            },
        };
        if s.journal_dir.as_os_str().is_empty() {
            return Err(self.err("server.journal_dir", "must name a folder"));
        }
        if s.journal_dir == s.spool_dir {
            return Err(self.err(
                "server.journal_dir",
                "must not be server.spool_dir (the spool is emptied at every start)",
            ));
        }
        for (key, value) in [
            ("server.max_images", s.max_images as u64),
            ("server.max_image_bytes", s.max_image_bytes),
            ("server.max_mask_bytes", s.max_mask_bytes),
            (
                "server.max_multipart_body_bytes",
                s.max_multipart_body_bytes,
            ),
            ("server.spool_max_bytes", s.spool_max_bytes),
        ] {
            if value == 0 {
                return Err(self.err(key, "must be at least 1"));
            }
        }

        let url = raw.database.url.trim().to_owned();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return Err(self.err(
                "database.url",
                "must start with postgres://, postgresql:// or sqlite:",
            ));
        }

        let admin_token = (self.env)(&raw.admin.token_env).map(Secret::new);
        if raw.limits.max_in_flight_per_key == 0 {
            return Err(self.err("limits.max_in_flight_per_key", "must be at least 1"));
        }
        let limits = Limits {
            max_in_flight_per_key: raw.limits.max_in_flight_per_key,
        };

        let mut providers = BTreeMap::new();
        for (name, p) in raw.providers {
            let provider = self.provider(&name, p, connect_timeout, total_timeout)?;
            providers.insert(name, Arc::new(provider));
        }

        let prices = self.prices(&raw.pricing, &providers)?;

        let mut models = BTreeMap::new();
        let mut aliases = HashMap::new();
        for (name, m) in raw.models {
            let key = format!("models.{name}");
            if m.routes.is_empty() {
                return Err(self.err(format!("{key}.routes"), "needs at least one route"));
            }
            let mut routes = Vec::with_capacity(m.routes.len());
            for (i, r) in m.routes.into_iter().enumerate() {
                let rkey = format!("{key}.routes[{i}]");
                let provider = providers.get(&r.provider).ok_or_else(|| {
                    self.err(
                        format!("{rkey}.provider"),
                        format!("no provider named {:?} in [providers]", r.provider),
                    )
                })?;
                let upstream_model = r.model.unwrap_or_else(|| name.clone());
                let price =
                    *prices
                        .get(&(r.provider.clone(), upstream_model.clone()))
                        .ok_or_else(|| {
                            self.err(
                        format!("pricing.{}.{upstream_model}", r.provider),
                        format!("missing: route {rkey} needs a price so that its usage has a cost"),
                    )
                        })?;
                for field in ["model", "prompt"] {
                    if r.force.contains_key(field)
                        || r.defaults.contains_key(field)
                        || r.drop.iter().any(|d| d == field)
                    {
                        return Err(self.err(
                            rkey.clone(),
                            format!("the parameter policy may not touch {field:?}"),
                        ));
                    }
                }
                routes.push(Route {
                    provider: Arc::clone(provider),
                    upstream_model,
                    policy: ParamPolicy {
                        defaults: r.defaults,
                        force: r.force,
                        drop: r.drop,
                    },
                    strip_b64_prefix: r.strip_b64_prefix,
                    price,
                });
            }
            for alias in &m.aliases {
                if aliases.insert(alias.clone(), name.clone()).is_some() {
                    return Err(self.err(
                        format!("{key}.aliases"),
                        format!("alias {alias:?} is used twice"),
                    ));
                }
            }
            let max_attempts = m.failover.max_attempts.unwrap_or(routes.len());
            if max_attempts == 0 {
                return Err(self.err(format!("{key}.failover.max_attempts"), "must be at least 1"));
            }
            if let Some(bad) = m
                .failover
                .on_status
                .iter()
                .find(|s| !(400..=599).contains(*s))
            {
                return Err(self.err(
                    format!("{key}.failover.on_status"),
                    format!("{bad} is not an error status"),
                ));
            }
            models.insert(
                name.clone(),
                Arc::new(Model {
                    name,
                    aliases: m.aliases,
                    routes,
                    failover: Failover {
                        on_status: m.failover.on_status,
                        max_attempts,
                    },
                }),
            );
        }
        if let Some(alias) = aliases.keys().find(|a| models.contains_key(*a)) {
            return Err(self.err("models", format!("{alias:?} is both a model and an alias")));
        }
        if let Some(default) = &raw.default_model {
            if !models.contains_key(default) && !aliases.contains_key(default) {
                return Err(self.err(
                    "default_model",
                    format!("{default:?} is not a configured model"),
                ));
            }
        }

        Ok(Config {
            source: path.to_owned(),
            server,
            database_url: url,
            admin_token,
            admin_token_env: raw.admin.token_env,
            limits,
            default_model: raw.default_model,
            providers,
            models,
            aliases,
        })
    }

    fn provider(
        &self,
        name: &str,
        p: RawProvider,
        connect_default: Duration,
        total_default: Duration,
    ) -> Result<Provider, ConfigError> {
        let key = format!("providers.{name}");
        let connect_timeout = match &p.connect_timeout {
            Some(v) => self.duration(&format!("{key}.connect_timeout"), v)?,
            None => connect_default,
        };
        let total_timeout = match &p.total_timeout {
            Some(v) => self.duration(&format!("{key}.total_timeout"), v)?,
            None => total_default,
        };
        let first_byte_timeout = match &p.first_byte_timeout {
            Some(v) => self.duration(&format!("{key}.first_byte_timeout"), v)?,
            None => total_timeout,
        };
        if p.breaker_failures == 0 {
            return Err(self.err(format!("{key}.breaker_failures"), "must be at least 1"));
        }
        let breaker = BreakerConfig {
            failures: p.breaker_failures,
            cooldown: self.duration(&format!("{key}.breaker_cooldown"), &p.breaker_cooldown)?,
        };
        let kind = match p.kind {
            RawProviderKind::Mock => ProviderKind::Mock {
                delay: match &p.delay {
                    Some(v) => humantime::parse_duration(v).map_err(|e| {
                        self.err(
                            format!("{key}.delay"),
                            format!("{v:?} is not a duration ({e})"),
                        )
                    })?,
                    None => Duration::from_millis(200),
                },
            },
            RawProviderKind::Openai => {
                let base = p
                    .base_url
                    .ok_or_else(|| self.err(format!("{key}.base_url"), "missing"))?;
                let mut base_url = reqwest::Url::parse(&base).map_err(|e| {
                    self.err(
                        format!("{key}.base_url"),
                        format!("{base:?} is not a URL ({e})"),
                    )
                })?;
                if !matches!(base_url.scheme(), "http" | "https") {
                    return Err(self.err(format!("{key}.base_url"), "must be http:// or https://"));
                }
                // Url::join drops the last segment unless the path ends in a slash.
                if !base_url.path().ends_with('/') {
                    let path = format!("{}/", base_url.path());
                    base_url.set_path(&path);
                }
                let api_key_env = p.api_key_env.ok_or_else(|| {
                    self.err(
                        format!("{key}.api_key_env"),
                        "missing: name the environment variable that holds the key",
                    )
                })?;
                let api_key = (self.env)(&api_key_env).ok_or_else(|| {
                    self.err(
                        format!("{key}.api_key_env"),
                        format!("environment variable {api_key_env} is not set (it must hold the provider's API key)"),
                    )
                })?;
                ProviderKind::OpenAi {
                    base_url,
                    api_key: Secret::new(api_key),
                    api_key_env,
                }
            }
        };
        if let Some(field) = &p.image_field {
            if field != "image" && field != "image[]" {
                return Err(self.err(
                    format!("{key}.image_field"),
                    "must be \"image\" or \"image[]\"",
                ));
            }
        }
        Ok(Provider {
            name: name.to_owned(),
            kind,
            image_field: p.image_field,
            first_byte_timeout,
            breaker,
            connect_timeout,
            total_timeout,
        })
    }

    fn prices(
        &self,
        raw: &BTreeMap<String, BTreeMap<String, RawPrice>>,
        providers: &BTreeMap<String, Arc<Provider>>,
    ) -> Result<HashMap<(String, String), Price>, ConfigError> {
        let mut out = HashMap::new();
        for (provider, models) in raw {
            if !providers.contains_key(provider) {
                return Err(self.err(format!("pricing.{provider}"), "no provider by that name"));
            }
            for (model, p) in models {
                let key = format!("pricing.{provider}.{model}");
                let rates = [
                    ("text_input", p.text_input),
                    ("cached_text_input", p.cached_text_input),
                    ("image_input", p.image_input),
                    ("cached_image_input", p.cached_image_input),
                    ("image_output", p.image_output),
                ];
                let price = match (p.per_image, rates.iter().any(|(_, r)| r.is_some())) {
                    (Some(_), true) => {
                        return Err(self.err(key, "set either per_image or token rates, not both"));
                    }
                    (Some(usd), false) => {
                        Price::PerImage(self.nanos(&format!("{key}.per_image"), usd, 1e9)?)
                    }
                    (None, false) => {
                        return Err(self.err(
                            key,
                            "needs per_image or token rates (USD per million tokens)",
                        ));
                    }
                    (None, true) => {
                        let mut n = [0i64; 5];
                        for (slot, (field, rate)) in n.iter_mut().zip(rates) {
                            let rate =
                                rate.ok_or_else(|| self.err(format!("{key}.{field}"), "missing"))?;
                            // USD per million tokens -> nano-USD per token.
                            *slot = self.nanos(&format!("{key}.{field}"), rate, 1e3)?;
                        }
                        Price::Tokens {
                            text_input: n[0],
                            cached_text_input: n[1],
                            image_input: n[2],
                            cached_image_input: n[3],
                            image_output: n[4],
                        }
                    }
                };
                out.insert((provider.clone(), model.clone()), price);
            }
        }
        Ok(out)
    }

    /// Converts dollars to whole nano-USD units, refusing what would be rounded.
    fn nanos(&self, key: &str, usd: f64, scale: f64) -> Result<i64, ConfigError> {
        if !usd.is_finite() || usd < 0.0 {
            return Err(self.err(key, "must be a non-negative number"));
        }
        let scaled = usd * scale;
        let whole = scaled.round();
        if (scaled - whole).abs() > 1e-6 || whole > 1e15 {
            return Err(self.err(
                key,
                format!("{usd} has more decimals than a nano-dollar can hold"),
            ));
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "checked to be a whole number below 1e15"
        )]
        Ok(whole as i64)
    }
}

#[cfg(test)]
#[expect(
    clippy::result_large_err,
    reason = "figment::Jail closures return figment::Error, which is large"
)]
mod tests {
    use super::*;

    fn env_with(vars: &[(&str, &str)]) -> EnvLookup {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Arc::new(move |name| map.get(name).cloned())
    }

    const GOOD: &str = r#"
        default_model = "gpt-image-1"
        [providers.piapi]
        base_url = "https://api.piapi.ai/v1"
        api_key_env = "PIAPI_API_KEY"
        [models."gpt-image-1"]
        aliases = ["img"]
        routes = [{ provider = "piapi", defaults = { quality = "standard" }, drop = ["input_fidelity"] }]
        [pricing.piapi."gpt-image-1"]
        text_input = 5.0
        cached_text_input = 1.25
        image_input = 10.0
        cached_image_input = 1.25
        image_output = 40.0
    "#;

    fn load(jail: &mut figment::Jail, text: &str, env: &EnvLookup) -> Result<Config, ConfigError> {
        jail.create_file("imagegate.toml", text).expect("write");
        Config::load(Path::new("imagegate.toml"), env)
    }

    #[test]
    fn reads_file_then_env_overrides() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("IMAGEGATE_SERVER__LISTEN", "0.0.0.0:9999");
            jail.set_env("IMAGEGATE_CONFIG", "ignored.toml");
            jail.set_env("IMAGEGATE_ADMIN_TOKEN", "not-a-key");
            let cfg = load(jail, GOOD, &env_with(&[("PIAPI_API_KEY", "pk")])).expect("valid");
            assert_eq!(cfg.server.listen.to_string(), "0.0.0.0:9999");
            assert_eq!(cfg.database_url, "sqlite://data/imagegate.db");
            let model = cfg.resolve_model(Some("img")).expect("alias resolves");
            assert_eq!(model.routes[0].upstream_model, "gpt-image-1");
            assert_eq!(
                cfg.resolve_model(None).map(|m| m.name.as_str()),
                Some("gpt-image-1")
            );
            assert!(cfg.resolve_model(Some("dall-e-3")).is_none());
            assert_eq!(
                model.routes[0].price,
                Price::Tokens {
                    text_input: 5000,
                    cached_text_input: 1250,
                    image_input: 10000,
                    cached_image_input: 1250,
                    image_output: 40000
                }
            );
            assert_eq!(
                model.routes[0].provider.connect_timeout,
                Duration::from_secs(10)
            );
            assert_eq!(
                model.routes[0].provider.total_timeout,
                Duration::from_secs(600)
            );
            assert_eq!(
                cfg.server.request_body_idle_timeout,
                Duration::from_secs(30)
            );
            assert_eq!(cfg.server.request_body_timeout, Duration::from_secs(600));
            assert_eq!(cfg.server.header_read_timeout, Duration::from_secs(30));
            assert_eq!(
                cfg.server.http2_keep_alive_interval,
                Duration::from_secs(20)
            );
            assert_eq!(cfg.server.max_connections, 10_000);
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_file_and_key() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let cases = [
                (
                    GOOD.replace("https://api.piapi.ai/v1", "not a url"),
                    "providers.piapi.base_url",
                ),
                (
                    GOOD.replace("image_output = 40.0", ""),
                    "pricing.piapi.gpt-image-1.image_output",
                ),
                (
                    GOOD.replace("\"piapi\", defaults", "\"nobody\", defaults"),
                    "models.gpt-image-1.routes[0].provider",
                ),
                (
                    GOOD.replace("default_model = \"gpt-image-1\"", "default_model = \"x\""),
                    "default_model",
                ),
                (
                    format!("{GOOD}\n[server]\nlisten = \"nowhere\""),
                    "server.listen",
                ),
                (
                    format!("{GOOD}\n[server]\nupstream_total_timeout = \"soon\""),
                    "server.upstream_total_timeout",
                ),
                (
                    format!("{GOOD}\n[server]\nspool_dir = \"d\"\njournal_dir = \"d\""),
                    "server.journal_dir",
                ),
                (
                    format!("{GOOD}\n[server]\nrequest_body_idle_timeout = \"0s\""),
                    "server.request_body_idle_timeout",
                ),
                (
                    format!("{GOOD}\n[server]\nworkers = 100000"),
                    "server.workers",
                ),
                (
                    format!("{GOOD}\n[server]\nrequest_body_timeout = \"0s\""),
                    "server.request_body_timeout",
                ),
                (
                    format!("{GOOD}\n[server]\nheader_read_timeout = \"never\""),
                    "server.header_read_timeout",
                ),
                (
                    format!("{GOOD}\n[server]\nhttp2_keep_alive_interval = \"0s\""),
                    "server.http2_keep_alive_interval",
                ),
                (
                    format!("{GOOD}\n[server]\nmax_connections = 0"),
                    "server.max_connections",
                ),
                (
                    format!("{GOOD}\n[server]\nkey_lookup_timeout = \"0ms\""),
                    "server.key_lookup_timeout",
                ),
                (
                    format!("{GOOD}\n[limits]\nmax_in_flight_per_key = 0"),
                    "limits.max_in_flight_per_key",
                ),
            ];
            for (text, key) in cases {
                let err = load(jail, &text, &env).expect_err(key).to_string();
                assert!(err.starts_with("imagegate.toml: "), "{err}");
                assert!(err.contains(key), "{key} not in {err}");
            }
            let err = load(jail, GOOD, &env_with(&[]))
                .expect_err("no key")
                .to_string();
            assert!(err.contains("PIAPI_API_KEY is not set"), "{err}");
            let err = load(jail, &format!("{GOOD}\n[server]\nlisten = 5"), &env)
                .expect_err("type")
                .to_string();
            assert!(
                err.contains("imagegate.toml") && err.contains("listen"),
                "{err}"
            );
            let err = load(jail, &format!("{GOOD}\n[server]\nlsiten = \"x\""), &env)
                .expect_err("unknown")
                .to_string();
            assert!(err.contains("lsiten"), "{err}");
            let one_per_cpu =
                load(jail, &format!("{GOOD}\n[server]\nworkers = 0"), &env).expect("workers = 0");
            assert!(one_per_cpu.server.workers >= 1);
            let three = load(jail, &format!("{GOOD}\n[server]\nworkers = 3"), &env).expect("3");
            assert_eq!(three.server.workers, 3);
            let defaults = load(jail, GOOD, &env).expect("defaults");
            assert_eq!(defaults.limits.max_in_flight_per_key, 64);
            assert_eq!(
                defaults.server.key_lookup_timeout,
                Duration::from_millis(500)
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        figment::Jail::expect_with(|jail| {
            let cfg = load(
                jail,
                GOOD,
                &env_with(&[("PIAPI_API_KEY", "pk-very-secret")]),
            )
            .expect("valid");
            assert!(!format!("{cfg:?}").contains("pk-very-secret"));
            Ok(())
        });
    }

    #[test]
    fn policy_sets_defaults_forces_and_drops() {
        let policy = ParamPolicy {
            defaults: serde_json::from_str(r#"{"quality":"standard","size":"1024x1024"}"#)
                .expect("json"),
            force: serde_json::from_str(r#"{"n":1}"#).expect("json"),
            drop: vec!["input_fidelity".into()],
        };
        let mut body: Map<String, Value> = serde_json::from_str(
            r#"{"prompt":"p","quality":null,"size":"auto","n":3,"input_fidelity":"high"}"#,
        )
        .expect("json");
        policy.apply(&mut body);
        assert_eq!(
            Value::Object(body).to_string(),
            r#"{"prompt":"p","quality":"standard","size":"auto","n":1}"#
        );
    }
}
