//! Client keys: how they look, how they are stored (hashed) and how a request's key becomes
//! a principal (cached for a few seconds, so revocation takes effect within the cache TTL).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::header;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::error::ApiError;
use crate::store::{NewKey, Store, StoreResult};

const KEY_PREFIX: &str = "ig-";
const KEY_RANDOM_CHARS: usize = 40;
/// How much of a key listings show.
const VISIBLE_CHARS: usize = 10;
const CACHE_CAPACITY: usize = 10_000;

/// The key a request was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: i64,
    pub name: String,
}

/// A freshly made key: the only moment the whole key exists outside the client.
pub struct IssuedKey {
    pub key: String,
    pub new: NewKey,
}

pub fn issue_key(name: &str) -> IssuedKey {
    let key = format!(
        "{KEY_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), KEY_RANDOM_CHARS)
    );
    IssuedKey {
        new: NewKey {
            name: name.to_owned(),
            prefix: key[..VISIBLE_CHARS].to_owned(),
            hash: hash_key(&key),
        },
        key,
    }
}

/// SHA-256 is enough: keys are 238 bits of randomness, not passwords.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn well_formed(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS
        && key.starts_with(KEY_PREFIX)
        && key[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

/// A principal (or none: no such active key) and when it was looked up.
type CacheEntry = (Option<Arc<Principal>>, Instant);

/// Key hash -> principal (or "no such active key"), remembered for `ttl`.
pub struct KeyCache {
    ttl: Duration,
    entries: RwLock<HashMap<String, CacheEntry>>,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        KeyCache {
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    pub async fn lookup(
        &self,
        store: &dyn Store,
        key: &str,
    ) -> StoreResult<Option<Arc<Principal>>> {
        let hash = hash_key(key);
        let cached = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
            .cloned();
        if let Some((principal, at)) = &cached {
            if at.elapsed() < self.ttl {
                return Ok(principal.clone());
            }
        }
        let found = match store.find_key_by_hash(&hash).await {
            Ok(found) => found,
            // The database is down: a key seen before keeps its last answer, so that requests
            // are still served (their usage waits in the journal). It is asked again after
            // another TTL.
            Err(err) => {
                let Some((principal, _)) = cached else {
                    return Err(err);
                };
                tracing::warn!(%err, "key lookup failed; using the last known answer for this key");
                self.remember(hash, principal.clone());
                return Ok(principal);
            }
        };
        let principal = found
            .filter(|record| record.revoked_at.is_none())
            .map(|record| {
                Arc::new(Principal {
                    key_id: record.id,
                    name: record.name,
                })
            });
        self.remember(hash, principal.clone());
        Ok(principal)
    }

    fn remember(&self, hash: String, principal: Option<Arc<Principal>>) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert(hash, (principal, Instant::now()));
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Every `/v1` route: a valid, unrevoked key, or 401 before anything else happens.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(key) = bearer(&request) else {
        return Err(ApiError::Unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
        ));
    };
    if !well_formed(key) {
        return Err(ApiError::Unauthorized("Incorrect API key provided."));
    }
    let principal = state
        .keys
        .lookup(&*state.store, key)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::Unauthorized(
            "Incorrect API key provided, or the key was revoked.",
        ))?;
    request.extensions_mut().insert(Arc::clone(&principal));
    let mut response = next.run(request).await;
    // For the access log's key name.
    response.extensions_mut().insert(principal);
    Ok(response)
}

/// Admin routes: the admin token from the environment; none configured means no admin API.
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let expected = state.runtime.load().config.admin_token.clone();
    let given = bearer(&request);
    match (expected, given) {
        // Comparing hashes keeps the comparison's time independent of where they differ.
        (Some(expected), Some(given)) if hash_key(expected.expose()) == hash_key(given) => {
            Ok(next.run(request).await)
        }
        _ => Err(ApiError::AdminForbidden),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_keys_are_well_formed_and_hashed() {
        let issued = issue_key("svc");
        assert!(well_formed(&issued.key));
        assert!(issued.key.starts_with(&issued.new.prefix));
        assert_eq!(issued.new.hash, hash_key(&issued.key));
        assert_ne!(issued.new.hash, issued.key);
        assert_ne!(issue_key("svc").key, issued.key);
        assert!(!well_formed("sk-test-KEY"));
        assert!(!well_formed(&format!(
            "{}!",
            &issued.key[..issued.key.len() - 1]
        )));
    }
}
