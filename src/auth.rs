//! Client keys: how they look, how they are stored (hashed) and how a request's key becomes
//! a principal (cached, so a database outage does not stop keys seen before; a change to a
//! key drops it from every replica's cache by its notice, and the cache TTL bounds how long
//! a missed notice can go unnoticed).

pub mod settings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, WeakShared};
use http::header;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::Secret;
use crate::store::{KeyLimits, KeyRecord, NewKey, Store, StoreError, StoreResult};

const KEY_PREFIX: &str = "ig-";
const KEY_RANDOM_CHARS: usize = 40;
/// How much of a key listings show.
const VISIBLE_CHARS: usize = 10;

/// The key a request was made with, and its limits as last read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: i64,
    pub name: String,
    pub limits: KeyLimits,
}

impl Principal {
    /// Past its `expires_at`: checked on every request, so that a cached key stops at once.
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.limits.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether the key may use the model `canonical` (a model's own name, aliases resolved).
    /// The allowlist is matched by model, not by the name a request used: an alias in the
    /// list allows its model under any of its names, and a model in the list allows its
    /// aliases, since each name reaches the same routes at the same price.
    pub fn allows(&self, canonical: &str, aliases: &HashMap<String, String>) -> bool {
        self.limits.models.as_ref().is_none_or(|models| {
            models
                .iter()
                .any(|name| aliases.get(name).map_or(name.as_str(), String::as_str) == canonical)
        })
    }

    /// The key's requests per minute, when it has a limit.
    pub fn rpm(&self) -> Option<u32> {
        self.limits
            .rpm
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The key's own cap on requests in flight, else `default`
    /// (`limits.max_in_flight_per_key`).
    pub fn max_in_flight(&self, default: u32) -> u32 {
        self.limits
            .max_in_flight
            .map_or(default, |n| u32::try_from(n).unwrap_or(u32::MAX))
    }
}

/// The principal of a key as stored, unless it was revoked.
fn active_principal(record: KeyRecord) -> Option<Arc<Principal>> {
    record.revoked_at.is_none().then(|| {
        Arc::new(Principal {
            key_id: record.id,
            name: record.name,
            limits: record.limits,
        })
    })
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
            limits: KeyLimits::default(),
        },
        key,
    }
}

/// SHA-256 is enough: keys are 238 bits of randomness, not passwords.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// True when `given` is the admin token `expected` (none set: nothing is). Compared by
/// hash, so in time independent of where they differ.
pub fn admin_token_matches(expected: Option<&Secret>, given: &str) -> bool {
    expected.is_some_and(|token| !given.is_empty() && hash_key(token.expose()) == hash_key(given))
}

pub fn well_formed(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS
        && key.starts_with(KEY_PREFIX)
        && key[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

/// SHA-256 of a key, raw: half the memory of its hex form in the caches.
type KeyHash = [u8; 32];

/// At most this many keys not found are remembered; beyond it moka evicts among them only
/// (the keys found live in their own map).
const UNKNOWN_CAPACITY: u64 = 100_000;
/// Database lookups of keys never seen, at once: the pool (10 connections) is shared with
/// the usage writer and the refreshes of known keys, and a flood of made-up keys must not
/// take all of it.
const UNSEEN_LOOKUPS: usize = 4;
/// A refresh that has not answered by then is given up, so that a hung connection cannot
/// keep a key from ever being checked again.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a key could not be checked: the database did not answer in time, or failed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the key database did not answer within the key lookup timeout")]
pub struct LookupUnavailable;

/// A lookup of a key not seen before, shared by the requests that wait on it.
type LookupFuture = BoxFuture<'static, Result<Option<Arc<Principal>>, LookupUnavailable>>;
type SharedLookup = Shared<LookupFuture>;

/// A key found active, as of `checked_at`.
struct Known {
    principal: Arc<Principal>,
    checked_at: Instant,
    /// One refresh per key at a time.
    refreshing: AtomicBool,
    /// Woken when a refresh of this entry ends, however it ends.
    refreshed: Notify,
}

impl Known {
    fn new(principal: Arc<Principal>) -> Arc<Known> {
        Arc::new(Known {
            principal,
            checked_at: Instant::now(),
            refreshing: AtomicBool::new(false),
            refreshed: Notify::new(),
        })
    }
}

/// Client key -> principal, so that a request does not wait on the database.
///
/// Keys found active live in their own map (bounded by the number of real keys), so that no
/// flood of unknown keys can evict them. Past half the TTL an entry is refreshed in the
/// background while it keeps answering; past the whole TTL a request waits for that refresh
/// (at most `lookup_timeout`) so that a revocation takes effect within the TTL, except while
/// the database is known to be failing: then the last known answer is served at once.
/// Keys not found are remembered for the TTL in a bounded cache of their own. A key never
/// seen waits at most `lookup_timeout` for the database, then gets [`LookupUnavailable`].
#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    ttl: Duration,
    lookup_timeout: Duration,
    store: Arc<dyn Store>,
    known: RwLock<HashMap<KeyHash, Arc<Known>>>,
    unknown: moka::sync::Cache<KeyHash, ()>,
    unseen_lookups: Arc<Semaphore>,
    /// Lookups of keys not seen before, by key, while requests wait on them.
    pending: Mutex<HashMap<KeyHash, WeakShared<LookupFuture>>>,
    /// False after a lookup failed or timed out, true again after one answered.
    store_answers: AtomicBool,
    /// Counts the forgettings: a lookup that began before one may have read a key as it
    /// was before its change, so its answer is not cached (see [`KeyCache::forget`]).
    generation: AtomicU64,
    tasks: TaskTracker,
}

impl KeyCache {
    /// `tasks` runs the lookups and refreshes, which go on after the request that started
    /// them stopped waiting (so a slow database is not asked again by every request).
    pub fn new(
        store: Arc<dyn Store>,
        ttl: Duration,
        lookup_timeout: Duration,
        tasks: TaskTracker,
    ) -> Self {
        KeyCache {
            inner: Arc::new(Inner {
                ttl,
                lookup_timeout,
                store,
                known: RwLock::new(HashMap::new()),
                unknown: moka::sync::Cache::builder()
                    .max_capacity(UNKNOWN_CAPACITY)
                    .time_to_live(ttl)
                    .build(),
                unseen_lookups: Arc::new(Semaphore::new(UNSEEN_LOOKUPS)),
                pending: Mutex::new(HashMap::new()),
                store_answers: AtomicBool::new(true),
                generation: AtomicU64::new(0),
                tasks,
            }),
        }
    }

    /// Drops what is cached of the key `key_id` (it was created, changed or revoked): its
    /// next request reads it again. Known keys are few, so they are scanned by id.
    pub fn forget(&self, key_id: i64) {
        let inner = &self.inner;
        let mut known = inner.known.write().unwrap_or_else(|e| e.into_inner());
        inner.generation.fetch_add(1, Ordering::AcqRel);
        known.retain(|_, entry| entry.principal.key_id != key_id);
    }

    /// Drops every cached key, found or not: after notices may have been missed (the
    /// listener reconnected), none of them can be trusted past this moment.
    pub fn forget_all(&self) {
        let inner = &self.inner;
        let mut known = inner.known.write().unwrap_or_else(|e| e.into_inner());
        inner.generation.fetch_add(1, Ordering::AcqRel);
        known.clear();
        inner.unknown.invalidate_all();
    }

    /// `principal`'s key as the database holds it now, past the cache: `None` when it was
    /// revoked or deleted since. For work that starts long after its request was let in
    /// (a queued job). [`LookupUnavailable`] when the database does not answer in time.
    pub async fn reread(
        &self,
        principal: &Principal,
    ) -> Result<Option<Arc<Principal>>, LookupUnavailable> {
        let inner = &self.inner;
        let found = tokio::time::timeout(
            inner.lookup_timeout,
            inner.store.find_key_by_id(principal.key_id),
        )
        .await;
        match found {
            Ok(Ok(record)) => Ok(record.and_then(active_principal)),
            Ok(Err(err)) => {
                tracing::warn!(%err, key = %principal.name, "a key could not be read again");
                Err(LookupUnavailable)
            }
            Err(_elapsed) => Err(LookupUnavailable),
        }
    }

    /// The principal of an active key, `None` for a key unknown or revoked.
    pub async fn lookup(&self, key: &str) -> Result<Option<Arc<Principal>>, LookupUnavailable> {
        let hash: KeyHash = Sha256::digest(key.as_bytes()).into();
        let inner = &self.inner;
        if let Some(entry) = inner.known_entry(&hash) {
            let age = entry.checked_at.elapsed();
            if age < inner.ttl / 2 {
                return Ok(Some(Arc::clone(&entry.principal)));
            }
            if age < inner.ttl || !inner.store_answers.load(Ordering::Relaxed) {
                self.refresh(hash, &entry);
                return Ok(Some(Arc::clone(&entry.principal)));
            }
            // Expired: the refresh says whether the key was revoked meanwhile. A database
            // that does not answer in time gets the last known answer served.
            let refreshed = entry.refreshed.notified();
            tokio::pin!(refreshed);
            // Registered before the refresh starts, so that its end cannot be missed.
            refreshed.as_mut().enable();
            self.refresh(hash, &entry);
            if tokio::time::timeout(inner.lookup_timeout, refreshed)
                .await
                .is_err()
            {
                // Until a lookup answers again, the next requests do not wait.
                inner.store_answers.store(false, Ordering::Relaxed);
            }
            if let Some(now) = inner.known_entry(&hash) {
                return Ok(Some(Arc::clone(&now.principal)));
            }
            // Revoked, or forgotten meanwhile (a change to the key): asked again below.
        }
        if inner.unknown.contains_key(&hash) {
            return Ok(None);
        }
        self.lookup_unseen(hash).await
    }

    /// A key not in either cache: asks the database, for at most `lookup_timeout`. The
    /// first requests of a new key often come at once (a service starting with many
    /// workers): they share one lookup instead of each queueing its own.
    async fn lookup_unseen(
        &self,
        hash: KeyHash,
    ) -> Result<Option<Arc<Principal>>, LookupUnavailable> {
        let inner = &self.inner;
        let lookup = self.shared_lookup(hash);
        let asked = tokio::time::timeout(inner.lookup_timeout, lookup).await;
        // Once every request waiting on it has gone, its entry goes too (a flood of made-up
        // keys leaves nothing behind).
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending
            .get(&hash)
            .is_some_and(|weak| weak.upgrade().is_none())
        {
            pending.remove(&hash);
        }
        drop(pending);
        match asked {
            Ok(answer) => answer,
            Err(_elapsed) => {
                inner.store_answers.store(false, Ordering::Relaxed);
                Err(LookupUnavailable)
            }
        }
    }

    /// The lookup of `hash` that requests are waiting on, or a new one. It takes one of the
    /// UNSEEN_LOOKUPS permits, then asks the database on a tracked task that holds the
    /// permit until the database answers, even once every request has stopped waiting. A
    /// lookup all its requests left before it got a permit is dropped without a query.
    fn shared_lookup(&self, hash: KeyHash) -> SharedLookup {
        let inner = &self.inner;
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lookup) = pending.get(&hash).and_then(|weak| weak.upgrade()) {
            return lookup;
        }
        // Lookups whose every request went away before they ended (their clients hung up)
        // are not removed by a request: they go here, so the table holds no more than the
        // requests waiting at once.
        pending.retain(|_, weak| weak.upgrade().is_some());
        let this = self.clone();
        let lookup = async move {
            let permit = Arc::clone(&this.inner.unseen_lookups)
                .acquire_owned()
                .await
                .map_err(|_| LookupUnavailable)?;
            let task = this.inner.tasks.clone().spawn(async move {
                let _permit = permit;
                let generation = this.inner.generation.load(Ordering::Acquire);
                let found = this.inner.store.find_key_by_hash(&hex::encode(hash)).await;
                this.settle(hash, found, generation)
            });
            task.await.map_err(|_| LookupUnavailable)?
        }
        .boxed()
        .shared();
        if let Some(weak) = lookup.downgrade() {
            pending.insert(hash, weak);
        }
        lookup
    }

    /// Starts a background lookup of a known key, unless one is running.
    fn refresh(&self, hash: KeyHash, entry: &Arc<Known>) {
        if entry.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, entry) = (self.clone(), Arc::clone(entry));
        self.inner.tasks.spawn(async move {
            let generation = this.inner.generation.load(Ordering::Acquire);
            let found = tokio::time::timeout(
                REFRESH_TIMEOUT,
                this.inner.store.find_key_by_hash(&hex::encode(hash)),
            )
            .await;
            let found = found.unwrap_or_else(|_| {
                Err(StoreError::Cancelled(format!(
                    "no answer within {REFRESH_TIMEOUT:?}"
                )))
            });
            // An answer cached replaces this entry; one that failed, or that a forgetting
            // overtook, leaves it for the next request past half the TTL to try again.
            let _ = this.settle(hash, found, generation);
            entry.refreshing.store(false, Ordering::Release);
            entry.refreshed.notify_waiters();
        });
    }

    /// Records what the database said about a key, read by a lookup that began at
    /// `generation`: an answer that a forgetting overtook is given to the requests waiting
    /// for it, not cached.
    fn settle(
        &self,
        hash: KeyHash,
        found: StoreResult<Option<KeyRecord>>,
        generation: u64,
    ) -> Result<Option<Arc<Principal>>, LookupUnavailable> {
        let inner = &self.inner;
        let found = match found {
            Ok(found) => found,
            Err(err) => {
                if inner.store_answers.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%err, "key lookup failed; keys seen before are served from their last known answer");
                }
                return Err(LookupUnavailable);
            }
        };
        if !inner.store_answers.swap(true, Ordering::Relaxed) {
            tracing::info!("key lookups answer again");
        }
        let principal = found.and_then(active_principal);
        let mut known = inner.known.write().unwrap_or_else(|e| e.into_inner());
        // Compared under the lock that forgetting takes: no forgetting slips in between.
        if inner.generation.load(Ordering::Acquire) != generation {
            return Ok(principal);
        }
        match &principal {
            Some(principal) => {
                known.insert(hash, Known::new(Arc::clone(principal)));
                inner.unknown.invalidate(&hash);
            }
            None => {
                known.remove(&hash);
                inner.unknown.insert(hash, ());
            }
        }
        Ok(principal)
    }
}

impl Inner {
    fn known_entry(&self, hash: &KeyHash) -> Option<Arc<Known>> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lookups_their_clients_left_do_not_pile_up() {
        let store = crate::store::connect("sqlite::memory:")
            .await
            .expect("store");
        let cache = KeyCache::new(
            store,
            Duration::from_secs(60),
            Duration::from_secs(5),
            TaskTracker::new(),
        );
        // Each request is polled once (its lookup registered and waiting), then dropped, as
        // when its client hangs up.
        for _ in 0..200 {
            let key = issue_key("gone").key;
            let _ = tokio::time::timeout(Duration::ZERO, cache.lookup(&key)).await;
        }
        let pending = cache.inner.pending.lock().expect("lock").len();
        assert!(pending <= 1, "{pending} lookups left behind");
    }

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
