//! Configuration: a TOML file, then `IMAGEGATE_*` environment overrides (`__` nests), read
//! with figment and validated once into types that cannot hold an invalid value.
//!
//! `raw` is the file as written, with every default; `server`, `providers`, `models` and
//! `pricing` each validate their own sections. Every refusal names the file and the key.

mod endpoints;
mod jobs;
mod models;
mod pricing;
mod providers;
mod raw;
mod server;
mod sources;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;

pub use endpoints::Endpoint;
pub use jobs::{JobsConfig, KeptPerKey};
pub use models::{Failover, Model, ParamPolicy, Route};
pub use pricing::{ImageTable, Price, TokenRates};
pub use providers::{BreakerConfig, Provider, ProviderKind};
pub use server::{
    DatabaseUrl, Limits, MetricsConfig, ServerConfig, Share, UploadLimits, redact_url,
};
pub use sources::{ConfigError, FILE_SUFFIX, Place};

use raw::{RawConfig, RawDatabase};

/// Where the configuration is read from when neither `--config` nor `IMAGEGATE_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "config/imagegate.toml";

/// The shortest admin token accepted: 32 characters, as many as `openssl rand -hex 16`
/// gives, beyond any online guessing.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

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

#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, for messages and reloads.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub database_url: DatabaseUrl,
    /// Where `database_url` was set (the file or a variable), for messages about it.
    pub database_place: Place,
    pub admin_token: Option<Secret>,
    pub admin_token_env: String,
    pub limits: Limits,
    /// Asynchronous jobs (`Prefer: respond-async`), imagegate's own extension.
    pub jobs: JobsConfig,
    /// Where job results and kept duplicate-protection results are stored (`[results] url`).
    pub results: crate::results::Location,
    pub metrics: MetricsConfig,
    pub default_model: Option<String>,
    pub providers: BTreeMap<String, Arc<Provider>>,
    /// Public model name -> model, one entry per canonical name.
    pub models: BTreeMap<String, Arc<Model>>,
    /// Alias -> canonical public name.
    pub aliases: HashMap<String, String>,
    /// What is valid but deserves a look (unpriced routes, prices naming no source):
    /// logged at start and on reload, printed by `config check`.
    pub warnings: Vec<String>,
    /// The first 16 hex digits of the SHA-256 of the settings as read (file and
    /// `IMAGEGATE_*` overrides, in a canonical order): replicas running the same settings
    /// show the same hash. It holds no secret: keys are read from variables the file names.
    pub hash: String,
}

impl Config {
    /// Reads `path`, then the `IMAGEGATE_SECTION__KEY` overrides, and validates the result.
    /// The file must exist: a typo in `--config` should not silently start on defaults.
    pub fn load(path: &Path, env: &EnvLookup) -> Result<Config, ConfigError> {
        Self::from_figment(&read(path)?, path, env)
    }

    /// Validates what a figment holds; `path` is only used in messages.
    pub fn from_figment(
        figment: &Figment,
        path: &Path,
        env: &EnvLookup,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = figment
            .extract()
            .map_err(|source| sources::parse_error(&file, source))?;
        let hash = settings_hash(figment);
        let validator = Validator {
            file,
            env,
            figment: Some(figment),
        };
        let mut config = validator.validate(raw, path)?;
        config.hash = hash;
        Ok(config)
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
/// managing keys and reading usage need no provider key. Also where it was set, for
/// messages about the database.
pub fn load_database_url(path: &Path) -> Result<(DatabaseUrl, Place), ConfigError> {
    let file = path.display().to_string();
    let figment = read(path)?;
    let url = match figment.extract_inner::<String>("database.url") {
        Ok(url) => url,
        Err(err) if err.missing() => RawDatabase::default().url,
        Err(source) => return Err(sources::parse_error(&file, source)),
    };
    let env: EnvLookup = Arc::new(|_| None);
    let validator = Validator {
        file,
        env: &env,
        figment: Some(&figment),
    };
    Ok((
        validator.database_url(&url)?,
        validator.place("database.url"),
    ))
}

/// The public model names (models and aliases) the file at `path` routes, read without
/// any secret: `imagegate keys create --models` checks its list against them. Provider keys
/// do not change which models are routed, so every variable reads as set (to nothing).
pub fn load_public_names(path: &Path) -> Result<Vec<String>, ConfigError> {
    let env: EnvLookup = Arc::new(|name| (!name.ends_with(FILE_SUFFIX)).then(String::new));
    let config = Config::load(path, &env)?;
    Ok(config
        .public_names()
        .into_iter()
        .map(str::to_owned)
        .collect())
}

/// `server.listen` as the file and the environment set it, without validating the rest:
/// `imagegate healthcheck` needs nothing else.
pub fn load_listen_address(path: &Path) -> Result<std::net::SocketAddr, ConfigError> {
    let file = path.display().to_string();
    let figment = read(path)?;
    let listen = match figment.extract_inner::<String>("server.listen") {
        Ok(listen) => listen,
        Err(err) if err.missing() => raw::RawServer::default().listen,
        Err(source) => return Err(sources::parse_error(&file, source)),
    };
    let env: EnvLookup = Arc::new(|_| None);
    let validator = Validator {
        file,
        env: &env,
        figment: Some(&figment),
    };
    listen
        .parse()
        .map_err(|_| validator.err("server.listen", server::not_an_address(&listen)))
}

/// The file at `path`, then the environment overrides (see [`sources::figment`]).
fn read(path: &Path) -> Result<Figment, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::Invalid {
            place: Place::File {
                file: path.display().to_string(),
                key: String::new(),
            },
            message: "no such file (pass --config PATH or set IMAGEGATE_CONFIG)".into(),
        });
    }
    sources::figment(path)
}

/// See [`Config::hash`]. Figment's dictionaries are sorted, so the same settings written in
/// another order hash the same. The database URL's password is left out: the hash is shown
/// in `/metrics`, `/admin/replicas` and the dashboard, and a short hash of a secret would
/// let anyone who knows the rest of the file test guesses of it.
fn settings_hash(figment: &Figment) -> String {
    use sha2::{Digest, Sha256};
    let mut value: serde_json::Value = figment.extract().unwrap_or_default();
    if let Some(url) = value.pointer_mut("/database/url") {
        if let Some(text) = url.as_str() {
            *url = serde_json::Value::from(without_password(text));
        }
    }
    let text = serde_json::to_string(&value).unwrap_or_default();
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

/// `scheme://user:password@host/...` without `:password`; other URLs as they are.
fn without_password(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let Some(at) = url[start..authority_end].rfind('@').map(|i| start + i) else {
        return url.to_owned();
    };
    match url[start..at].find(':').map(|i| start + i) {
        Some(colon) => format!("{}{}", &url[..colon], &url[at..]),
        None => url.to_owned(),
    }
}

/// Turns raw sections into validated ones; each section module adds its part.
struct Validator<'a> {
    file: String,
    env: &'a EnvLookup,
    /// What was read, to tell which settings came from a variable rather than the file.
    figment: Option<&'a Figment>,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            place: self.place(&key.into()),
            message: message.into(),
        }
    }

    /// Where `key` was set: the variable that set it, else the file.
    fn place(&self, key: &str) -> Place {
        sources::place_of(self.figment, &self.file, key)
    }

    /// The value of the variable `var` (never put into a message), or of the file that
    /// `var_FILE` names; `key` is the setting that names `var`. Unset: `None`.
    fn secret_var(&self, key: &str, var: &str) -> Result<Option<String>, ConfigError> {
        let file_var = format!("{var}{FILE_SUFFIX}");
        match ((self.env)(var), (self.env)(&file_var)) {
            (Some(_), Some(_)) => Err(self.err(key, format!("set {var} or {file_var}, not both"))),
            (Some(value), None) => Ok(Some(value)),
            (None, Some(path)) => sources::read_secret_file(&file_var, &path)
                .map(Some)
                .map_err(|message| self.err(key, message)),
            (None, None) => Ok(None),
        }
    }

    /// A timeout or interval: zero would mean "at once" or "never", neither of them meant.
    fn positive(&self, key: &str, value: Duration) -> Result<Duration, ConfigError> {
        if value.is_zero() {
            return Err(self.err(key, "must be longer than zero"));
        }
        Ok(value)
    }

    /// The admin token, from the environment variable `var`: unset or empty turns the admin
    /// API off. The admin API and the dashboard's login form take guesses at it, so a short
    /// one is refused (the message names its length, never the token).
    fn admin_token(&self, var: &str) -> Result<Option<Secret>, ConfigError> {
        let Some(token) = self
            .secret_var("admin.token_env", var)?
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        let chars = token.chars().count();
        if chars < MIN_ADMIN_TOKEN_CHARS {
            return Err(self.err(
                "admin.token_env",
                format!(
                    "{var} holds {chars} characters; an admin token needs at least \
                     {MIN_ADMIN_TOKEN_CHARS} (make one with `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(Some(Secret::new(token)))
    }

    fn validate(&self, raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let upstream = self.upstream_timeouts(&raw.server)?;
        let jobs_dir_set = raw.jobs.dir.is_some();
        let jobs = self.jobs(raw.jobs)?;
        let results = crate::results::Location::parse(&raw.results.url)
            .map_err(|message| self.err("results.url", message))?;
        let server = self.server(raw.server)?;
        let database_url = self.database_url(&raw.database.url)?;
        let admin_token = self.admin_token(&raw.admin.token_env)?;
        let limits = self.limits(&raw.limits, &server)?;
        let metrics = self.metrics(&raw.metrics);
        // Every provider is checked before any refusal, so that all the missing key
        // variables are named at once rather than one per attempt to start.
        let mut providers = BTreeMap::new();
        let mut refused = Vec::new();
        for (name, p) in raw.providers {
            match self.provider(&name, p, upstream) {
                Ok(provider) => {
                    providers.insert(name, Arc::new(provider));
                }
                Err(err) => refused.push(err),
            }
        }
        ConfigError::all(refused)?;
        let prices = self.prices(&raw.pricing, &providers)?;
        let mut warnings = pricing::warnings(&prices);
        if jobs_dir_set {
            warnings.push(jobs::DIR_UNUSED.to_owned());
        }
        let models = self.models(
            raw.models,
            &providers,
            &prices,
            raw.default_model.as_deref(),
        )?;
        Ok(Config {
            source: path.to_owned(),
            server,
            database_url,
            database_place: self.place("database.url"),
            admin_token,
            admin_token_env: raw.admin.token_env,
            limits,
            jobs,
            results,
            metrics,
            default_model: raw.default_model,
            providers,
            models: models.models,
            aliases: models.aliases,
            warnings,
            hash: String::new(),
        })
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
                Price::Tokens(TokenRates {
                    text_input: 5000,
                    cached_text_input: 1250,
                    image_input: 10000,
                    cached_image_input: 1250,
                    image_output: 40000,
                    text_output: 40000,
                })
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
            assert_eq!(cfg.server.max_connections.get(), 10_000);
            Ok(())
        });
    }

    #[test]
    fn metrics_listen_and_per_key_are_off_unless_set() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let default = load(jail, GOOD, &env).expect("valid");
            assert_eq!(default.server.metrics_listen, None);
            assert!(!default.metrics.per_key);
            let text = format!(
                "{GOOD}\n[server]\nmetrics_listen = \"127.0.0.1:9090\"\n[metrics]\nper_key = true"
            );
            let set = load(jail, &text, &env).expect("valid");
            assert_eq!(
                set.server.metrics_listen.map(|a| a.to_string()).as_deref(),
                Some("127.0.0.1:9090")
            );
            assert!(set.metrics.per_key);
            for bad in [
                "metrics_listen = \"localhost\"",
                "listen = \"127.0.0.1:9090\"\nmetrics_listen = \"127.0.0.1:9090\"",
            ] {
                let err = load(jail, &format!("{GOOD}\n[server]\n{bad}"), &env)
                    .expect_err(bad)
                    .to_string();
                assert!(err.contains("server.metrics_listen"), "{err}");
            }
            Ok(())
        });
    }

    #[test]
    fn trusted_proxies_are_networks_or_addresses_and_none_by_default() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let default = load(jail, GOOD, &env).expect("valid");
            assert!(default.server.trusted_proxies.is_empty());
            let text = format!(
                "{GOOD}\n[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"fd00::/8\"]"
            );
            let set = load(jail, &text, &env).expect("valid");
            let nets: Vec<String> = set
                .server
                .trusted_proxies
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]);
            let bad = format!("{GOOD}\n[server]\ntrusted_proxies = [\"10.0.0.0/33\"]");
            let err = load(jail, &bad, &env).expect_err("bad").to_string();
            assert!(err.contains("server.trusted_proxies"), "{err}");
            assert!(err.contains("10.0.0.0/33"), "{err}");
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
                    format!("{GOOD}\n[server]\njson_memory_max_bytes = 1048576"),
                    "server.json_memory_max_bytes",
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
                (
                    format!("{GOOD}\n[limits]\nmax_share_per_key = 0"),
                    "limits.max_share_per_key: must be more than 0",
                ),
                (
                    format!("{GOOD}\n[limits]\nmax_share_per_key = 1.5"),
                    "limits.max_share_per_key: must be more than 0",
                ),
                (
                    // A hundredth of 512 MiB is less than one JSON edit at its limit.
                    format!("{GOOD}\n[limits]\nmax_share_per_key = 0.01"),
                    "limits.max_share_per_key: of server.json_memory_max_bytes",
                ),
                (
                    GOOD.replace(
                        "drop = [",
                        "endpoints = [\"generations\", \"edit\"], drop = [",
                    ),
                    "models.gpt-image-1.routes[0].endpoints: unknown endpoint \"edit\"",
                ),
                (
                    format!("{GOOD}\nmin_of = [\"tokens\", \"per_image\"]"),
                    "pricing.piapi.gpt-image-1.min_of: takes",
                ),
                (
                    format!("{GOOD}\nmin_of = [\"tokens\", \"table\"]"),
                    "pricing.piapi.gpt-image-1.min_of: needs token rates and a table",
                ),
                (
                    format!("{GOOD}\nunpriced = true"),
                    "pricing.piapi.gpt-image-1.unpriced",
                ),
                (
                    format!(
                        "{GOOD}\n[pricing.piapi.\"gpt-image-1\".table]\nlow = {{ \"1024x1024\" = 0.005 }}"
                    ),
                    "pricing.piapi.gpt-image-1: token rates and a table: set min_of",
                ),
                (
                    format!(
                        "{GOOD}\nmin_of = [\"table\", \"tokens\"]\n[pricing.piapi.\"gpt-image-1\".table]\nlow = {{ \"1024x1024\" = 0.0000000001 }}"
                    ),
                    "pricing.piapi.gpt-image-1.table.low.1024x1024: 0.0000000001 has more decimals",
                ),
                (
                    GOOD.replace("drop = [", "endpoints = [], drop = ["),
                    "models.gpt-image-1.routes[0].endpoints: needs at least one",
                ),
                (
                    format!("{GOOD}\n[jobs]\nmax_queued_per_key = 0"),
                    "jobs.max_queued_per_key",
                ),
                (
                    format!("{GOOD}\n[jobs]\nretention = \"0s\""),
                    "jobs.retention",
                ),
                (
                    format!("{GOOD}\n[jobs]\nretention = \"a day\""),
                    "jobs.retention",
                ),
                (format!("{GOOD}\n[jobs]\nlease = \"500ms\""), "jobs.lease"),
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
            assert_eq!(defaults.limits.max_in_flight_per_key.get(), 64);
            assert_eq!(
                defaults.limits.max_share_per_key,
                Share::new(0.25).expect("a quarter")
            );
            assert_eq!(defaults.jobs.lease, Duration::from_secs(30));
            assert!(!defaults.warnings.iter().any(|w| w == jobs::DIR_UNUSED));
            let old = load(jail, &format!("{GOOD}\n[jobs]\ndir = \"data/jobs\""), &env)
                .expect("jobs.dir still accepted");
            assert!(old.warnings.iter().any(|w| w == jobs::DIR_UNUSED));
            assert_eq!(defaults.jobs.retention, Duration::from_secs(86_400));
            assert_eq!(defaults.jobs.max_queued_per_key.get(), 100);
            assert_eq!(
                defaults.server.key_lookup_timeout,
                Duration::from_millis(500)
            );
            Ok(())
        });
    }

    #[test]
    fn prices_of_every_kind_load_with_their_source_and_warnings() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let text = format!(
                "{GOOD}\nsource = \"a page, 2026-05-26\"\nmin_of = [\"tokens\", \"table\"]\n\
                 [pricing.piapi.\"gpt-image-1\".table]\nlow = {{ \"1024x1024\" = 0.005 }}\n\
                 [models.mini]\nroutes = [{{ provider = \"piapi\" }}]\n\
                 [pricing.piapi.mini]\nunpriced = true\n"
            );
            let cfg = load(jail, &text, &env).expect("valid");
            let route = &cfg.models["gpt-image-1"].routes[0];
            assert_eq!(route.price.kind(), "min_of(tokens, table)");
            assert_eq!(route.price_source.as_deref(), Some("a page, 2026-05-26"));
            let Price::MinOf(rates, table) = &route.price else {
                panic!("{:?}", route.price)
            };
            assert_eq!((rates.image_output, rates.text_output), (40000, 40000));
            assert_eq!(table.lookup(Some("low"), Some("1024x1024")), 5_000_000);
            assert_eq!(cfg.models["mini"].routes[0].price, Price::Unpriced);
            assert_eq!(
                cfg.warnings,
                [
                    "pricing.piapi.mini is unpriced: its calls are recorded with their tokens and no cost",
                    "pricing.piapi.mini names no source (the page and date its price comes from)",
                ]
            );
            let text = format!("{GOOD}\ntext_output = 10.0");
            let cfg = load(jail, &text, &env).expect("text output rate");
            let Price::Tokens(rates) = &cfg.models["gpt-image-1"].routes[0].price else {
                panic!("tokens")
            };
            assert_eq!(rates.text_output, 10000);
            Ok(())
        });
    }

    #[test]
    fn database_url_is_read_once_for_both_load_paths() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let path = Path::new("imagegate.toml");
            jail.create_file("imagegate.toml", GOOD).expect("write");
            assert_eq!(
                load_database_url(path).expect("default").0,
                DatabaseUrl::Sqlite("sqlite://data/imagegate.db".into())
            );
            let text = format!("{GOOD}\n[database]\nurl = \" postgres://db/x \"");
            let cfg = load(jail, &text, &env).expect("postgres");
            let (only_url, place) = load_database_url(path).expect("postgres");
            assert_eq!(only_url, DatabaseUrl::Postgres("postgres://db/x".into()));
            assert_eq!(place.to_string(), "imagegate.toml: database.url");
            assert_eq!(cfg.database_url, only_url);
            // The key commands refuse what serving refuses, with the same message.
            let text = format!("{GOOD}\n[database]\nurl = \"mysql://db/x\"");
            let full = load(jail, &text, &env).expect_err("mysql").to_string();
            let only_url = load_database_url(path).expect_err("mysql").to_string();
            assert_eq!(full, only_url);
            assert!(
                full.starts_with("imagegate.toml: database.url: must start with"),
                "{full}"
            );
            Ok(())
        });
    }

    #[test]
    fn durations_are_checked_where_they_are_read() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let text = GOOD.replace(
                "api_key_env = \"PIAPI_API_KEY\"",
                "api_key_env = \"PIAPI_API_KEY\"\ntotal_timeout = \"1 parsec\"",
            );
            let err = load(jail, &text, &env).expect_err("unit").to_string();
            assert!(
                err.starts_with("imagegate.toml: providers.piapi.total_timeout: \"1 parsec\" is not a duration like \"30s\" (unknown time unit"),
                "{err}"
            );
            let text = format!("{GOOD}\n[server]\nshutdown_grace = 30");
            let err = load(jail, &text, &env).expect_err("number").to_string();
            assert!(err.contains("expected a duration"), "{err}");
            assert!(err.contains("server.shutdown_grace"), "{err}");
            jail.set_env("IMAGEGATE_SERVER__SHUTDOWN_GRACE", "45s");
            let cfg = load(jail, GOOD, &env).expect("env duration");
            assert_eq!(cfg.server.shutdown_grace, Duration::from_secs(45));
            Ok(())
        });
    }

    #[test]
    fn a_short_admin_token_is_refused_without_showing_it() {
        figment::Jail::expect_with(|jail| {
            let with_token = |token: &str| {
                env_with(&[("PIAPI_API_KEY", "pk"), ("IMAGEGATE_ADMIN_TOKEN", token)])
            };
            let short = "hunter2-is-not-a-token-31-chars";
            assert_eq!(short.len(), MIN_ADMIN_TOKEN_CHARS - 1);
            let err = load(jail, GOOD, &with_token(short))
                .expect_err("too short")
                .to_string();
            assert!(
                err.ends_with(
                    "admin.token_env: IMAGEGATE_ADMIN_TOKEN holds 31 characters; an admin \
                     token needs at least 32 (make one with `openssl rand -hex 32`)"
                ),
                "{err}"
            );
            assert!(!err.contains(short), "{err}");
            let long = format!("{short}x");
            let cfg = load(jail, GOOD, &with_token(&long)).expect("32 characters");
            assert_eq!(cfg.admin_token.map(|t| t.expose().to_owned()), Some(long));
            let cfg = load(jail, GOOD, &with_token("")).expect("empty: no admin API");
            assert!(cfg.admin_token.is_none());
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
    fn the_settings_hash_ignores_the_database_password_and_follows_the_rest() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let on = |url: &str| format!("{GOOD}\n[database]\nurl = \"{url}\"\n");
            let hash = |jail: &mut figment::Jail, url: &str| {
                load(jail, &on(url), &env).expect("valid").hash
            };
            let a = hash(jail, "postgres://app:first-secret@db:5432/imagegate");
            let b = hash(jail, "postgres://app:other-secret@db:5432/imagegate");
            assert_eq!(a, b, "the password is not part of the hash");
            let c = hash(jail, "postgres://app:first-secret@db:5432/elsewhere");
            assert_ne!(a, c, "the rest of the URL is");
            Ok(())
        });
    }

    #[test]
    fn a_misspelt_key_gets_one_line_with_its_file_key_and_the_likely_name() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            let text = GOOD.replace("{ provider = \"piapi\"", "{ provder = \"piapi\"");
            let err = load(jail, &text, &env).expect_err("misspelt").to_string();
            assert_eq!(
                err,
                "imagegate.toml: models.gpt-image-1.routes[0].provder: unknown key `provder`; \
                 did you mean `provider`?"
            );
            let text = format!("{GOOD}\n[server]\ncolour = \"blue\"");
            let err = load(jail, &text, &env).expect_err("unknown").to_string();
            assert!(
                err.starts_with(
                    "imagegate.toml: server.colour: unknown key `colour` (expected one of `listen`,"
                ),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_setting_from_the_environment_is_named_by_its_variable() {
        figment::Jail::expect_with(|jail| {
            let env = env_with(&[("PIAPI_API_KEY", "pk")]);
            jail.set_env("IMAGEGATE_SERVER__LISTEN", "nowhere");
            let err = load(jail, GOOD, &env).expect_err("bad listen").to_string();
            assert_eq!(
                err,
                "environment variable IMAGEGATE_SERVER__LISTEN (server.listen): \"nowhere\" is \
                 not an address like 127.0.0.1:8080"
            );
            jail.set_env("IMAGEGATE_SERVER__LISTEN", "127.0.0.1:8080");
            jail.set_env("IMAGEGATE_SERVER__LSITEN", "127.0.0.1:8080");
            let err = load(jail, GOOD, &env).expect_err("misspelt").to_string();
            assert_eq!(
                err,
                "environment variable IMAGEGATE_SERVER__LSITEN (server.lsiten): unknown key \
                 `lsiten`; did you mean `listen`?"
            );
            Ok(())
        });
    }

    #[test]
    fn every_missing_provider_key_is_named_at_once() {
        figment::Jail::expect_with(|jail| {
            let text = format!(
                "{GOOD}\n[providers.apiyi]\nbase_url = \"https://api.apiyi.com/v1\"\n\
                 api_key_env = \"APIYI_API_KEY\"\n"
            );
            let err = load(jail, &text, &env_with(&[]))
                .expect_err("no keys")
                .to_string();
            let lines: Vec<&str> = err.lines().collect();
            assert_eq!(lines.len(), 2, "{err}");
            assert!(
                lines[0].starts_with(
                    "imagegate.toml: providers.apiyi.api_key_env: environment variable \
                     APIYI_API_KEY is not set"
                ),
                "{err}"
            );
            assert!(
                lines[1].starts_with(
                    "imagegate.toml: providers.piapi.api_key_env: environment variable \
                     PIAPI_API_KEY is not set"
                ),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_can_be_read_from_the_files_their_file_variables_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("piapi-key", "pk-from-a-file\n")?;
            jail.create_file("admin-token", &format!("{}\n", "t".repeat(40)))?;
            jail.create_file("database-url", "postgres://app:pw@db:5432/imagegate\n")?;
            jail.set_env("IMAGEGATE_DATABASE__URL_FILE", "database-url");
            let env = env_with(&[
                ("PIAPI_API_KEY_FILE", "piapi-key"),
                ("IMAGEGATE_ADMIN_TOKEN_FILE", "admin-token"),
            ]);
            let cfg = load(jail, GOOD, &env).expect("valid");
            let ProviderKind::OpenAi { api_key, .. } = &cfg.providers["piapi"].kind else {
                panic!("openai")
            };
            assert_eq!(api_key.expose(), "pk-from-a-file");
            assert_eq!(
                cfg.admin_token.as_ref().map(Secret::expose),
                Some("t".repeat(40).as_str())
            );
            assert_eq!(cfg.database_url, "postgres://app:pw@db:5432/imagegate");
            assert_eq!(
                cfg.database_place.to_string(),
                "environment variable IMAGEGATE_DATABASE__URL_FILE (database.url)"
            );
            let (url, _) = load_database_url(Path::new("imagegate.toml")).expect("url only");
            assert_eq!(url, "postgres://app:pw@db:5432/imagegate");

            // A variable and its file variable both set, or a file that is not there.
            let both = env_with(&[("PIAPI_API_KEY", "pk"), ("PIAPI_API_KEY_FILE", "piapi-key")]);
            let err = load(jail, GOOD, &both).expect_err("both").to_string();
            assert_eq!(
                err,
                "imagegate.toml: providers.piapi.api_key_env: set PIAPI_API_KEY or \
                 PIAPI_API_KEY_FILE, not both"
            );
            let gone = env_with(&[("PIAPI_API_KEY_FILE", "no-such-file")]);
            let err = load(jail, GOOD, &gone).expect_err("gone").to_string();
            assert!(
                err.starts_with(
                    "imagegate.toml: providers.piapi.api_key_env: cannot read no-such-file \
                     (named by PIAPI_API_KEY_FILE): "
                ),
                "{err}"
            );
            jail.set_env("IMAGEGATE_DATABASE__URL", "sqlite://x.db");
            let err = load(jail, GOOD, &env).expect_err("both urls").to_string();
            assert_eq!(
                err,
                "environment variable IMAGEGATE_DATABASE__URL_FILE (database.url): set \
                 IMAGEGATE_DATABASE__URL or IMAGEGATE_DATABASE__URL_FILE, not both"
            );
            Ok(())
        });
    }

    #[test]
    fn a_database_is_described_without_its_password() {
        let pg = DatabaseUrl::parse("postgres://app:hunter2@db.internal:6543/billing").expect("pg");
        assert_eq!(
            pg.describe(),
            "the Postgres database \"billing\" on db.internal:6543"
        );
        let pg = DatabaseUrl::parse("postgresql://db").expect("pg");
        assert_eq!(pg.describe(), "the Postgres server on db:5432");
        let lite = DatabaseUrl::parse("sqlite://data/imagegate.db?mode=rwc").expect("sqlite");
        assert_eq!(lite.describe(), "the SQLite database data/imagegate.db");
    }

    #[test]
    fn a_password_is_cut_from_a_url_and_nothing_else() {
        assert_eq!(
            without_password("postgres://u:p@ss@h:5/d?x=1"),
            "postgres://u@h:5/d?x=1"
        );
        assert_eq!(without_password("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            without_password("postgres://h/d?a=b@c"),
            "postgres://h/d?a=b@c"
        );
        assert_eq!(without_password("sqlite:data/x.db"), "sqlite:data/x.db");
    }
}
