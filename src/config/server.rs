//! The gateway's own sections, `[server]`, `[database]`, `[limits]` and `[metrics]`,
//! validated.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawLimits, RawMetrics, RawServer};
use super::{ConfigError, Validator};

/// More serving threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where `/metrics` is served instead of `listen`; none: on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    pub max_json_body_bytes: NonZeroUsize,
    /// Largest JSON edit: its images are references, but a data: URL carries one inline.
    pub max_json_edit_body_bytes: NonZeroUsize,
    /// Most bytes of JSON bodies held in memory at once by all calls and queued jobs.
    pub json_memory_max_bytes: NonZeroUsize,
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
    pub max_connections: NonZeroUsize,
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
    /// The proxies (networks) whose `X-Forwarded-For` names the client in the access log;
    /// none: the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Limits on multipart edits and variations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    pub max_images: usize,
    pub max_image_bytes: u64,
    pub max_mask_bytes: u64,
    pub max_body_bytes: u64,
}

/// Limits per client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests of one key being answered at once (bodies included); more get 429.
    pub max_in_flight_per_key: NonZeroU32,
    /// How long past `server.upstream_total_timeout` a budget reservation whose call never
    /// settled (its process died) keeps holding the key's budget.
    pub budget_hold_grace: Duration,
    /// The most one key's requests may hold together of the quotas all keys share: JSON
    /// bodies in memory and the upload spool.
    pub max_share_per_key: Share,
}

/// A fraction of a quota, more than none and at most all of it, kept in millionths so that
/// the bytes it allows are counted exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    millionths: u32,
}

impl Share {
    const WHOLE: u32 = 1_000_000;

    /// The share a fraction names, when it is more than 0 and at most 1.
    pub fn new(fraction: f64) -> Option<Share> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return None;
        }
        // Within 0..=1_000_000 after the check above.
        let millionths = (fraction * f64::from(Self::WHOLE)).round() as u32;
        (millionths > 0).then_some(Share { millionths })
    }

    /// The bytes this share of `total` bytes comes to (rounded down).
    pub fn of(self, total: u64) -> u64 {
        let part = u128::from(total) * u128::from(self.millionths) / u128::from(Self::WHOLE);
        u64::try_from(part).unwrap_or(total)
    }
}

/// What `/metrics` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The series labelled with a key's name (its requests, spend and budget left) are
    /// recorded; off, they are not recorded at all.
    pub per_key: bool,
}

/// `database.url`, with the database it names decided once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `postgres://` or `postgresql://`.
    Postgres(String),
    /// `sqlite:` followed by a path or `:memory:`.
    Sqlite(String),
}

impl DatabaseUrl {
    /// Reads a URL (surrounding blanks removed); the error is the reason, without the key.
    pub fn parse(text: &str) -> Result<DatabaseUrl, &'static str> {
        let url = text.trim().to_owned();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(url))
        } else if url.starts_with("sqlite:") {
            Ok(DatabaseUrl::Sqlite(url))
        } else {
            Err("must start with postgres://, postgresql:// or sqlite:")
        }
    }

    /// The database in words, for messages: which kind, its name and its host (Postgres)
    /// or its file (SQLite), never a password.
    pub fn describe(&self) -> String {
        match self {
            DatabaseUrl::Postgres(url) => match reqwest::Url::parse(url) {
                Ok(parsed) => {
                    let host = parsed.host_str().unwrap_or("localhost");
                    let port = parsed.port().unwrap_or(5432);
                    match parsed.path().trim_start_matches('/') {
                        "" => format!("the Postgres server on {host}:{port}"),
                        name => format!("the Postgres database {name:?} on {host}:{port}"),
                    }
                }
                Err(_) => "the Postgres database (its URL cannot be read)".to_owned(),
            },
            DatabaseUrl::Sqlite(url) => {
                let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
                let path = path.split('?').next().unwrap_or(path);
                format!("the SQLite database {path}")
            }
        }
    }

    /// The URL as written (it may hold a password: redact before showing it).
    pub fn as_str(&self) -> &str {
        match self {
            DatabaseUrl::Postgres(url) | DatabaseUrl::Sqlite(url) => url,
        }
    }
}

impl PartialEq<&str> for DatabaseUrl {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Why `server.listen` is refused.
pub(super) fn not_an_address(text: &str) -> String {
    format!("{text:?} is not an address like 127.0.0.1:8080")
}

impl Validator<'_> {
    pub(super) fn server(&self, s: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen: SocketAddr = s
            .listen
            .parse()
            .map_err(|_| self.err("server.listen", not_an_address(&s.listen)))?;
        let metrics_listen = self.metrics_listen(s.metrics_listen.as_deref(), listen)?;
        let max_json_body_bytes =
            self.body_limit("server.max_json_body_bytes", s.max_json_body_bytes)?;
        let max_json_edit_body_bytes = self.body_limit(
            "server.max_json_edit_body_bytes",
            s.max_json_edit_body_bytes,
        )?;
        let json_memory_max_bytes =
            self.body_limit("server.json_memory_max_bytes", s.json_memory_max_bytes)?;
        if json_memory_max_bytes < max_json_body_bytes.max(max_json_edit_body_bytes) {
            return Err(self.err(
                "server.json_memory_max_bytes",
                "must be at least max_json_body_bytes and max_json_edit_body_bytes, or the \
                 largest body allowed could never be taken",
            ));
        }
        let uploads = self.uploads(&s)?;
        self.spool_and_journal(&s)?;
        let max_connections = NonZeroUsize::new(s.max_connections)
            .ok_or_else(|| self.err("server.max_connections", "must be at least 1"))?;
        Ok(ServerConfig {
            listen,
            metrics_listen,
            max_json_body_bytes,
            max_json_edit_body_bytes,
            json_memory_max_bytes,
            shutdown_grace: self.positive("server.shutdown_grace", s.shutdown_grace)?,
            key_cache_ttl: self.positive("server.key_cache_ttl", s.key_cache_ttl)?,
            key_lookup_timeout: self.positive("server.key_lookup_timeout", s.key_lookup_timeout)?,
            request_body_idle_timeout: self.positive(
                "server.request_body_idle_timeout",
                s.request_body_idle_timeout,
            )?,
            request_body_timeout: self
                .positive("server.request_body_timeout", s.request_body_timeout)?,
            header_read_timeout: self
                .positive("server.header_read_timeout", s.header_read_timeout)?,
            http2_keep_alive_interval: self.positive(
                "server.http2_keep_alive_interval",
                s.http2_keep_alive_interval,
            )?,
            max_connections,
            uploads,
            spool_max_bytes: self.at_least_one("server.spool_max_bytes", s.spool_max_bytes)?,
            spool_dir: s.spool_dir,
            sse_keepalive: self.positive("server.sse_keepalive", s.sse_keepalive)?,
            duplicate_protection: s.duplicate_protection,
            record_usage: s.record_usage,
            duplicate_window: self.positive("server.duplicate_window", s.duplicate_window)?,
            journal_dir: s.journal_dir,
            workers: self.workers(s.workers)?,
            trusted_proxies: self.trusted_proxies(&s.trusted_proxies)?,
        })
    }

    /// `server.trusted_proxies`: networks in CIDR form, or single addresses.
    fn trusted_proxies(&self, proxies: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        proxies
            .iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        self.err(
                            "server.trusted_proxies",
                            format!("{text:?} is not a network like 10.0.0.0/8 or an address"),
                        )
                    })
            })
            .collect()
    }

    /// `server.metrics_listen`: an address of its own (port 0 picks a free one).
    fn metrics_listen(
        &self,
        text: Option<&str>,
        listen: SocketAddr,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(text) = text else {
            return Ok(None);
        };
        let addr: SocketAddr = text.parse().map_err(|_| {
            self.err(
                "server.metrics_listen",
                format!("{text:?} is not an address like 127.0.0.1:9090"),
            )
        })?;
        if addr.port() != 0 && addr == listen {
            return Err(self.err(
                "server.metrics_listen",
                "must not be server.listen (leave it out to serve /metrics there)",
            ));
        }
        Ok(Some(addr))
    }

    pub(super) fn metrics(&self, raw: &RawMetrics) -> MetricsConfig {
        MetricsConfig {
            per_key: raw.per_key,
        }
    }

    /// The upstream timeouts a provider falls back on: (connect, total).
    pub(super) fn upstream_timeouts(
        &self,
        s: &RawServer,
    ) -> Result<(Duration, Duration), ConfigError> {
        Ok((
            self.positive(
                "server.upstream_connect_timeout",
                s.upstream_connect_timeout,
            )?,
            self.positive("server.upstream_total_timeout", s.upstream_total_timeout)?,
        ))
    }

    fn uploads(&self, s: &RawServer) -> Result<UploadLimits, ConfigError> {
        Ok(UploadLimits {
            max_images: self.at_least_one("server.max_images", s.max_images)?,
            max_image_bytes: self.at_least_one("server.max_image_bytes", s.max_image_bytes)?,
            max_mask_bytes: self.at_least_one("server.max_mask_bytes", s.max_mask_bytes)?,
            max_body_bytes: self.at_least_one(
                "server.max_multipart_body_bytes",
                s.max_multipart_body_bytes,
            )?,
        })
    }

    fn spool_and_journal(&self, s: &RawServer) -> Result<(), ConfigError> {
        if s.journal_dir.as_os_str().is_empty() {
            return Err(self.err("server.journal_dir", "must name a folder"));
        }
        if s.journal_dir == s.spool_dir {
            return Err(self.err(
                "server.journal_dir",
                "must not be server.spool_dir (the spool is emptied at every start)",
            ));
        }
        Ok(())
    }

    fn workers(&self, workers: usize) -> Result<usize, ConfigError> {
        match workers {
            // Two per CPU: a worker that the scheduler preempts (the CPUs are shared with
            // other programs) stalls only its share of the connections.
            0 => Ok(2 * std::thread::available_parallelism().map_or(1, |n| n.get())),
            n if n > MAX_WORKERS => Err(self.err(
                "server.workers",
                format!("must be at most {MAX_WORKERS} (0: two per CPU)"),
            )),
            n => Ok(n),
        }
    }

    pub(super) fn database_url(&self, url: &str) -> Result<DatabaseUrl, ConfigError> {
        DatabaseUrl::parse(url).map_err(|reason| self.err("database.url", reason))
    }

    pub(super) fn limits(
        &self,
        raw: &RawLimits,
        server: &ServerConfig,
    ) -> Result<Limits, ConfigError> {
        let max_in_flight_per_key = NonZeroU32::new(raw.max_in_flight_per_key)
            .ok_or_else(|| self.err("limits.max_in_flight_per_key", "must be at least 1"))?;
        let key = "limits.max_share_per_key";
        let max_share_per_key = Share::new(raw.max_share_per_key)
            .ok_or_else(|| self.err(key, "must be more than 0 and at most 1 (0.25: a quarter)"))?;
        let largest_json = server
            .max_json_body_bytes
            .max(server.max_json_edit_body_bytes)
            .get() as u64;
        if max_share_per_key.of(server.json_memory_max_bytes.get() as u64) < largest_json {
            return Err(self.err(
                key,
                "of server.json_memory_max_bytes must be at least max_json_body_bytes and \
                 max_json_edit_body_bytes, or a key could never send the largest body allowed",
            ));
        }
        Ok(Limits {
            max_in_flight_per_key,
            budget_hold_grace: raw.budget_hold_grace,
            max_share_per_key,
        })
    }

    /// A body size limit in bytes: at least one, and one this machine can address.
    fn body_limit(&self, key: &str, value: u64) -> Result<NonZeroUsize, ConfigError> {
        usize::try_from(self.at_least_one(key, value)?)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| self.err(key, "is too large"))
    }

    fn at_least_one<T: Copy + PartialEq + From<u8>>(
        &self,
        key: &str,
        value: T,
    ) -> Result<T, ConfigError> {
        if value == T::from(0) {
            return Err(self.err(key, "must be at least 1"));
        }
        Ok(value)
    }
}

/// A URL without what could be a secret: its password becomes `redacted`, and so does
/// each query value (a provider key or a database password may travel there). A URL that
/// does not parse (a SQLite path) has neither.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return url.to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("redacted"));
    }
    if parsed.query().is_some() {
        let names: Vec<String> = parsed
            .query_pairs()
            .map(|(name, _)| name.into_owned())
            .collect();
        parsed
            .query_pairs_mut()
            .clear()
            .extend_pairs(names.iter().map(|name| (name.as_str(), "redacted")));
    }
    parsed.to_string()
}

#[cfg(test)]
mod redact_tests {
    use super::*;
    #[test]
    fn urls_lose_their_password_and_query_values() {
        assert_eq!(
            redact_url("postgres://ig:s3cret@db:5432/ig?password=also&sslmode=require"),
            "postgres://ig:redacted@db:5432/ig?password=redacted&sslmode=redacted"
        );
        assert_eq!(
            redact_url("https://api.example.com/v1"),
            "https://api.example.com/v1"
        );
        assert_eq!(
            redact_url("sqlite:data/imagegate.db"),
            "sqlite:data/imagegate.db"
        );
    }
}
