//! `[providers.NAME]`: where requests go, with what key, and how long they may take.

use std::time::Duration;

use super::raw::{RawProvider, RawProviderKind};
use super::{ConfigError, FILE_SUFFIX, Secret, Validator};

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

impl Validator<'_> {
    /// `upstream` is the server's (connect, total) timeouts, used where the provider sets none.
    pub(super) fn provider(
        &self,
        name: &str,
        p: RawProvider,
        upstream: (Duration, Duration),
    ) -> Result<Provider, ConfigError> {
        let key = format!("providers.{name}");
        let timeout = |field: &str, value: Option<Duration>, default: Duration| match value {
            Some(d) => self.positive(&format!("{key}.{field}"), d),
            None => Ok(default),
        };
        let connect_timeout = timeout("connect_timeout", p.connect_timeout, upstream.0)?;
        let total_timeout = timeout("total_timeout", p.total_timeout, upstream.1)?;
        let first_byte_timeout =
            timeout("first_byte_timeout", p.first_byte_timeout, total_timeout)?;
        if p.breaker_failures == 0 {
            return Err(self.err(format!("{key}.breaker_failures"), "must be at least 1"));
        }
        let breaker = BreakerConfig {
            failures: p.breaker_failures,
            cooldown: self.positive(&format!("{key}.breaker_cooldown"), p.breaker_cooldown)?,
        };
        let kind = match p.kind {
            RawProviderKind::Mock => ProviderKind::Mock { delay: p.delay },
            RawProviderKind::Openai => self.openai(&key, p.base_url, p.api_key_env)?,
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

    fn openai(
        &self,
        key: &str,
        base_url: Option<String>,
        api_key_env: Option<String>,
    ) -> Result<ProviderKind, ConfigError> {
        let base = base_url.ok_or_else(|| self.err(format!("{key}.base_url"), "missing"))?;
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
        let api_key_env = api_key_env.ok_or_else(|| {
            self.err(
                format!("{key}.api_key_env"),
                "missing: name the environment variable that holds the key",
            )
        })?;
        let api_key_key = format!("{key}.api_key_env");
        let api_key = self
            .secret_var(&api_key_key, &api_key_env)?
            .ok_or_else(|| {
                self.err(
                &api_key_key,
                format!(
                    "environment variable {api_key_env} is not set (it must hold the provider's \
                     API key; or set {api_key_env}{FILE_SUFFIX} to a file holding it)"
                ),
            )
            })?;
        Ok(ProviderKind::OpenAi {
            base_url,
            api_key: Secret::new(api_key),
            api_key_env,
        })
    }
}
