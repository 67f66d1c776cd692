//! Duplicate protection. The SDKs retry a cut or timed-out call with the same body and no
//! idempotency key, and the provider bills both. A retry (`X-Stainless-Retry-Count` >= 1,
//! or a repeated `Idempotency-Key`) from the same key with the same body attaches to the
//! original call while it runs, or collects its result, kept in the result store for a while
//! when the original client went away before receiving it. A call that ended any other way
//! (its answer delivered, or failed) leaves nothing behind: its retry is a new call, at once.
//!
//! Across replicas: this replica's calls are in its own table, where a retry on the same
//! replica finds them at once; every original is also registered in the database
//! (`calls_in_flight`, written in the background: the provider call never waits for it), so
//! that a retry the balancer sends to another replica finds it there, waits for it by reading
//! its row, and collects its kept result from the result store that every replica reads.
//! Without the database (down, or slow past [`LOOKUP_TIMEOUT`]) protection holds on each
//! replica alone, and comes back with the database.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::Response;
use chrono::Utc;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::results::{ResultWriter, Results};
use crate::store::{self, CallRecord, CallState, KeptCall, Store, StoreResult};
use crate::upstream::Endpoint;

/// Most calls remembered at once (running, or kept for a retry); beyond it the oldest is
/// forgotten, and a retry of it becomes a new call. About 200 bytes each.
const MAX_ENTRIES: usize = 16_384;

/// The longest a retry found in no table here waits for the database to say whether its
/// original runs on another replica; past it (the database down or slow) the retry is a new
/// call, as it is on one replica.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);

/// The longest a call's registration, kept result or end may take to be written. In the
/// background: no request waits for it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an original runs before it is registered in the database. One that ends
/// sooner is never written there: no retry can need it running (the SDKs retry 0.5 s at the
/// earliest after a try failed, and the registration is visible well before), and how it
/// ended (kept, or not) is written as for any call. Image calls take seconds; a proxy
/// benchmark's calls of a few milliseconds cost the database nothing.
const REGISTER_AFTER: Duration = Duration::from_millis(100);

/// How often a retry reads the row of its original running on another replica.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The result store's folder of kept results.
const KEPT_FOLDER: &str = "kept";

/// How much older than `server.duplicate_window` a kept result no row names must be before
/// the sweep deletes it: replicas' clocks differ a little.
const ORPHAN_MARGIN: Duration = Duration::from_secs(60);

/// How a request's headers say it repeats an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A first attempt.
    No,
    /// An `Idempotency-Key` and no retry count: it may well be a first attempt (clients that
    /// send a key send it on every request), so it is matched against this replica's calls
    /// only, and a first attempt never waits for the database before its provider call.
    Keyed,
    /// The SDKs' `X-Stainless-Retry-Count` >= 1: certainly a retry, looked for on every
    /// replica.
    Counted,
}

impl Retry {
    pub fn of(headers: &HeaderMap) -> Retry {
        let retry_count = headers
            .get("x-stainless-retry-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if retry_count >= 1 {
            Retry::Counted
        } else if headers.contains_key("idempotency-key") {
            Retry::Keyed
        } else {
            Retry::No
        }
    }
}

/// Same client key, endpoint, idempotency key and body.
pub type Fingerprint = [u8; 32];

/// On a retry's response answered from its original call: the original's request id, for
/// the retry's access line.
#[derive(Debug, Clone)]
pub struct OriginalRequestId(pub Arc<str>);

/// Where an original call stands, as its retries on this replica see it.
#[derive(Clone)]
pub enum Status {
    InFlight,
    /// The result, in the result store, for a retry to collect.
    Kept(Arc<Kept>),
    /// Over, with nothing kept: the client received it, or it failed (a retry calls again).
    Gone,
}

/// A kept result: its name in the result store and what it is answered with.
pub struct Kept {
    name: String,
    status: StatusCode,
    headers: HeaderMap,
}

/// What duplicate protection shares with the rest of the gateway.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub results: Results,
    /// This replica's name, on the rows of its calls.
    pub replica: Arc<str>,
    /// Where the database writes run: they outlive the request.
    pub tasks: TaskTracker,
}

pub struct Dedupe {
    enabled: bool,
    window: Duration,
    capacity: usize,
    next_id: AtomicU64,
    table: Mutex<Table>,
    shared: Shared,
}

/// The calls a retry can find. Each claim is O(log n): nothing scans the whole table.
#[derive(Default)]
struct Table {
    entries: HashMap<Fingerprint, Entry>,
    /// Entry ids, oldest first: the order in which a full table forgets.
    order: BTreeMap<u64, Fingerprint>,
    /// Kept results by expiry; one window for all, so the front expires first.
    expiring: VecDeque<(Instant, u64)>,
}

struct Entry {
    /// Unique per call: a later original with the same fingerprint replaces the entry, and
    /// the earlier call's end must not remove the later one's.
    id: u64,
    /// The original's request id, which its retries' answers name.
    original: Arc<str>,
    tx: watch::Sender<Status>,
}

impl Table {
    fn remove(&mut self, fingerprint: &Fingerprint, id: u64) {
        if self.entries.get(fingerprint).is_some_and(|e| e.id == id) {
            self.entries.remove(fingerprint);
            self.order.remove(&id);
        }
    }

    fn remove_id(&mut self, id: u64) {
        if let Some(fingerprint) = self.order.get(&id).copied() {
            self.remove(&fingerprint, id);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(expires, id)) = self.expiring.front() {
            if expires > now {
                break;
            }
            self.expiring.pop_front();
            self.remove_id(id);
        }
    }

    fn insert(&mut self, fingerprint: Fingerprint, entry: Entry, capacity: usize) {
        let id = entry.id;
        if let Some(replaced) = self.entries.insert(fingerprint, entry) {
            self.order.remove(&replaced.id);
        }
        self.order.insert(id, fingerprint);
        while self.entries.len() > capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

/// How long a call may take, from its model's routes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a retry waits for its original.
    pub wait: Duration,
    /// How long an original may run, failovers and all: past it, its row is taken for one
    /// whose replica died, ignored by retries and swept.
    pub running: Duration,
}

impl Dedupe {
    pub fn new(enabled: bool, window: Duration, shared: Shared) -> Dedupe {
        Dedupe {
            enabled,
            window,
            capacity: MAX_ENTRIES,
            next_id: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
            shared,
        }
    }

    /// Same key, same endpoint, same body (and the same idempotency key when there is one).
    pub fn fingerprint(
        key_id: i64,
        endpoint: Endpoint,
        idempotency_key: Option<&str>,
        body: &[u8],
    ) -> Fingerprint {
        let mut hash = Sha256::new();
        hash.update(key_id.to_be_bytes());
        hash.update(endpoint.as_str());
        hash.update([0]);
        hash.update(idempotency_key.unwrap_or_default());
        hash.update([0]);
        hash.update(body);
        hash.finalize().into()
    }

    /// Whether the headers mark the request as a retry of an earlier one.
    pub fn is_retry(headers: &HeaderMap) -> bool {
        Retry::of(headers) != Retry::No
    }

    /// Registers the request `request_id` against duplicates. A retry of a call still
    /// running or kept, on this replica or another, is answered from it (`Err`); otherwise
    /// the request goes on as an original, whose ticket lets later retries find it.
    pub async fn claim(
        self: &Arc<Self>,
        fingerprint: Fingerprint,
        retry: Retry,
        request_id: &str,
        limits: Limits,
    ) -> Result<Option<KeepTicket>, Response> {
        if !self.enabled {
            return Ok(None);
        }
        if retry != Retry::No {
            let joined = match self.local(&fingerprint) {
                Some((rx, original)) => self.collect(rx, &original, request_id, limits.wait).await,
                None if retry == Retry::Counted => {
                    self.join_elsewhere(&fingerprint, request_id, limits.wait)
                        .await
                }
                None => None,
            };
            if let Some(response) = joined {
                return Err(response);
            }
        }
        Ok(Some(self.original(fingerprint, request_id, limits.running)))
    }

    /// This replica's call with this fingerprint, running or kept, and its request id.
    fn local(&self, fingerprint: &Fingerprint) -> Option<(watch::Receiver<Status>, Arc<str>)> {
        let mut table = self.lock();
        table.expire(Instant::now());
        table
            .entries
            .get(fingerprint)
            .map(|entry| (entry.tx.subscribe(), Arc::clone(&entry.original)))
    }

    /// Enters a new original in this replica's table, and registers it in the database in
    /// the background.
    fn original(
        self: &Arc<Self>,
        fingerprint: Fingerprint,
        request_id: &str,
        running: Duration,
    ) -> KeepTicket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, _) = watch::channel(Status::InFlight);
        let entry = Entry {
            id,
            original: request_id.into(),
            tx: tx.clone(),
        };
        {
            let mut table = self.lock();
            table.expire(Instant::now());
            table.insert(fingerprint, entry, self.capacity);
        }
        let now = Utc::now();
        let record = CallRecord {
            fingerprint: hex::encode(fingerprint),
            request_id: request_id.to_owned(),
            replica: self.shared.replica.to_string(),
            state: CallState::Running,
            started_at: now,
            expires_at: store::after(now, running),
        };
        let store = Arc::clone(&self.shared.store);
        let call = record.clone();
        let started = Instant::now();
        let mut rx = tx.subscribe();
        let registered = self.in_background(async move {
            let ended = rx.wait_for(|s| !matches!(s, Status::InFlight));
            if tokio::time::timeout(REGISTER_AFTER, ended).await.is_ok() {
                return false;
            }
            let written = write("register", store.register_call(&call)).await;
            if written {
                metrics::histogram!("imagegate_duplicate_registration_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            written
        });
        KeepTicket {
            dedupe: Arc::clone(self),
            fingerprint,
            id,
            record,
            registered,
            tx: Some(tx),
        }
    }

    /// Runs `task` (database writes) on a tracked task: it outlives the request, and
    /// shutdown waits for it. `None` outside a runtime (nothing to run it on).
    fn in_background<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> Option<JoinHandle<T>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(self.shared.tasks.spawn_on(task.in_current_span(), &handle))
    }

    /// Waits for this replica's original call; its kept result as a response, or `None`
    /// when nothing was kept (the retry then calls the provider itself).
    async fn collect(
        &self,
        mut rx: watch::Receiver<Status>,
        original: &str,
        request_id: &str,
        wait: Duration,
    ) -> Option<Response> {
        let attached = matches!(*rx.borrow(), Status::InFlight);
        let status = tokio::time::timeout(wait, rx.wait_for(|s| !matches!(s, Status::InFlight)))
            .await
            .ok()?
            .ok()?
            .clone();
        let Status::Kept(kept) = status else {
            return None;
        };
        let how = if attached { "attached" } else { "replayed" };
        self.replay(&kept, how, original, request_id).await
    }

    /// Finds the original in the database: kept, its result; running on another replica,
    /// its result once kept (its row read every [`POLL_INTERVAL`], for `wait` at most).
    /// `None` when there is none, it ended unkept, or the database cannot say.
    async fn join_elsewhere(
        &self,
        fingerprint: &Fingerprint,
        request_id: &str,
        wait: Duration,
    ) -> Option<Response> {
        let hex = hex::encode(fingerprint);
        let mut call = lookup(self.shared.store.find_call(&hex, Utc::now())).await?;
        // This replica's calls still running are in its table: one found only here has
        // ended, its end not written yet (or was left by an earlier run of this replica).
        if call.state == CallState::Running && *call.replica == *self.shared.replica {
            return None;
        }
        let deadline = Instant::now() + wait;
        let mut how = "replayed";
        loop {
            match call.state {
                CallState::Kept(kept) => {
                    let kept = Kept::from(kept);
                    return self.replay(&kept, how, &call.request_id, request_id).await;
                }
                CallState::Running => {
                    how = "attached";
                    if Instant::now() + POLL_INTERVAL > deadline {
                        return None;
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                    call = lookup(
                        self.shared
                            .store
                            .get_call(&hex, &call.request_id, Utc::now()),
                    )
                    .await?;
                }
            }
        }
    }

    /// A retry's answer from the kept result of the call `original`; `None` when the
    /// result cannot be read (swept meanwhile, or the result store fails).
    async fn replay(
        &self,
        kept: &Kept,
        how: &'static str,
        original: &str,
        request_id: &str,
    ) -> Option<Response> {
        let reading = match self.shared.results.read(&kept.name).await {
            Ok(Some(reading)) => reading,
            Ok(None) => {
                tracing::info!(
                    request_id,
                    original_request_id = original,
                    "the original's kept result is gone (expired); the retry is a new call"
                );
                return None;
            }
            Err(err) => {
                tracing::warn!(request_id, original_request_id = original, error = %err, "could not read the original's kept result; the retry is a new call");
                return None;
            }
        };
        tracing::info!(
            request_id,
            original_request_id = original,
            duplicate = how,
            "a retry answered with its original call's result"
        );
        let mut response = Response::new(reading.body);
        *response.status_mut() = kept.status;
        let headers = response.headers_mut();
        headers.extend(kept.headers.clone());
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(reading.size));
        headers.insert("x-imagegate-duplicate", HeaderValue::from_static(how));
        if let Ok(value) = HeaderValue::from_str(original) {
            headers.insert("x-imagegate-original-request-id", value);
        }
        response
            .extensions_mut()
            .insert(OriginalRequestId(original.into()));
        Some(response)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets this replica's kept results past the window: run by a timer, so that they go
    /// whether or not requests arrive. Returns how many calls a retry could find before.
    pub fn sweep(&self) -> usize {
        let mut table = self.lock();
        let before = table.entries.len();
        table.expire(Instant::now());
        before - table.entries.len()
    }

    /// Deletes the database's calls past their expiry, with their kept results, and any
    /// kept result older than the window that no row names (its row could not be written,
    /// or its replica died in between). Any replica may run it. Returns how many results it
    /// deleted.
    pub async fn sweep_shared(&self) -> usize {
        let now = Utc::now();
        let mut names =
            match tokio::time::timeout(WRITE_TIMEOUT, self.shared.store.sweep_calls(now)).await {
                Ok(Ok(names)) => names,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "could not sweep expired calls in flight");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
        let cutoff = store::before(now, self.window + ORPHAN_MARGIN);
        match self.shared.results.list(KEPT_FOLDER).await {
            Ok(listed) => names.extend(
                listed
                    .into_iter()
                    .filter(|l| l.last_modified < cutoff)
                    .map(|l| l.name),
            ),
            Err(err) => tracing::warn!(error = %err, "could not list kept results"),
        }
        names.sort_unstable();
        names.dedup();
        let mut deleted = 0;
        for name in names {
            match self.shared.results.delete(&name).await {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "could not delete an expired kept result"),
            }
        }
        deleted
    }

    /// How often [`Dedupe::sweep`] runs: a kept result outlives its window by a small part
    /// of it, at most by ten seconds.
    pub fn sweep_interval(&self) -> Duration {
        (self.window / 4).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// How many calls a retry could find now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A database write of a call, bounded by [`WRITE_TIMEOUT`]; whether it was written
/// (failures are logged).
async fn write(what: &'static str, write: impl Future<Output = StoreResult<()>>) -> bool {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => true,
        Ok(Err(err)) => {
            tracing::warn!(what, error = %err, "duplicate protection: could not write a call in flight to the database; retries on other replicas will not find it");
            false
        }
        Err(_) => {
            tracing::warn!(
                what,
                timeout_ms = WRITE_TIMEOUT.as_millis() as u64,
                "duplicate protection: the database did not take a call in flight in time; retries on other replicas will not find it"
            );
            false
        }
    }
}

/// A database read for a retry, bounded by [`LOOKUP_TIMEOUT`]; `None` when it failed (logged).
async fn lookup<T>(query: impl Future<Output = StoreResult<Option<T>>>) -> Option<T> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, query).await {
        Ok(Ok(found)) => found,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "duplicate protection: the database could not be read; the retry is a new call unless this replica ran its original");
            None
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = LOOKUP_TIMEOUT.as_millis() as u64,
                "duplicate protection: the database did not answer in time; the retry is a new call unless this replica ran its original"
            );
            None
        }
    }
}

impl From<KeptCall> for Kept {
    fn from(kept: KeptCall) -> Self {
        let content_type = kept
            .content_type
            .and_then(|ct| HeaderValue::from_str(&ct).ok());
        Kept {
            headers: kept_headers(content_type.as_ref(), kept.provider.as_deref()),
            status: StatusCode::from_u16(kept.status).unwrap_or(StatusCode::OK),
            name: kept.result,
        }
    }
}

/// Held by an original call; tells its retries, here and on other replicas, how it ended.
pub struct KeepTicket {
    dedupe: Arc<Dedupe>,
    fingerprint: Fingerprint,
    id: u64,
    /// Its row, as registered.
    record: CallRecord,
    /// The registration, which the call's last write waits for (so that it never lands
    /// after it): true when the row was written.
    registered: Option<JoinHandle<bool>>,
    tx: Option<watch::Sender<Status>>,
}

impl KeepTicket {
    /// The result's name in the result store: one per call, so that two originals with
    /// the same fingerprint never share one.
    fn name(&self) -> String {
        format!(
            "{KEPT_FOLDER}/{}-{}",
            self.record.fingerprint, self.record.request_id
        )
    }

    /// Starts writing the result for a retry, when its client has gone. Nothing is visible
    /// until [`KeepTicket::keep`] takes it; dropped before, nothing is left.
    pub fn writer(&self) -> ResultWriter {
        self.dedupe.shared.results.writer(&self.name())
    }

    /// The whole result is in `writer`: stored, then found by retries on every replica
    /// within the window. A result that cannot be stored is dropped (said in the log) and
    /// the call ends as if nothing was kept: its retries call again.
    pub async fn keep(mut self, writer: ResultWriter, status: StatusCode, headers: HeaderMap) {
        let name = self.name();
        if let Err(err) = writer.finish().await {
            kept_result_dropped(&self.record.request_id, &err);
            return;
        }
        let Some(tx) = self.tx.take() else {
            return;
        };
        tracing::info!(
            request_id = %self.record.request_id,
            fingerprint = %&self.record.fingerprint[..12],
            "result kept for a retry to collect"
        );
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let now = Utc::now();
        let record = CallRecord {
            state: CallState::Kept(KeptCall {
                result: name.clone(),
                status: status.as_u16(),
                content_type: text(header::CONTENT_TYPE.as_str()),
                provider: text("x-imagegate-provider"),
            }),
            expires_at: store::after(now, self.dedupe.window),
            ..self.record.clone()
        };
        // `send_replace`, not `send`: the value must change even when no retry is waiting
        // yet, since later retries read it from the table.
        tx.send_replace(Status::Kept(Arc::new(Kept {
            name,
            status,
            headers,
        })));
        {
            let mut table = self.dedupe.lock();
            if table
                .entries
                .get(&self.fingerprint)
                .is_some_and(|e| e.id == self.id)
            {
                let expires = Instant::now() + self.dedupe.window;
                table.expiring.push_back((expires, self.id));
            }
        }
        let registered = match self.registered.take() {
            Some(registration) => registration.await.unwrap_or(true),
            None => false,
        };
        let store = &self.dedupe.shared.store;
        if !write("keep", store.keep_call(&record)).await {
            tracing::warn!(request_id = %self.record.request_id, "the kept result is not in the database: only retries on this replica find it");
            if registered {
                // A row left running would hold other replicas' retries until it expires.
                let end = store.end_call(&record.fingerprint, &record.request_id);
                write("end", async { end.await.map(drop) }).await;
            }
        }
    }
}

impl Drop for KeepTicket {
    /// Ended without a kept result: waiting retries call again, and later ones find nothing.
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Status::Gone);
            self.dedupe.lock().remove(&self.fingerprint, self.id);
            let store = Arc::clone(&self.dedupe.shared.store);
            let (fingerprint, request_id) = (
                self.record.fingerprint.clone(),
                self.record.request_id.clone(),
            );
            let Some(registration) = self.registered.take() else {
                return;
            };
            self.dedupe.in_background(async move {
                // Not registered (it ended too soon, or the write failed): nothing to end.
                if registration.await.unwrap_or(true) {
                    let end = store.end_call(&fingerprint, &request_id);
                    write("end", async { end.await.map(drop) }).await;
                }
            });
        }
    }
}

/// Says that a result kept for a retry could not be stored (its retry calls again).
pub fn kept_result_dropped(request_id: &str, err: &dyn std::fmt::Display) {
    tracing::error!(
        request_id,
        error = %err,
        "could not store the result its client left before receiving; dropped, a retry will be a new call"
    );
}

/// The headers a kept result is served with.
pub fn kept_headers(content_type: Option<&HeaderValue>, provider: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, ct.clone());
    }
    if let Some(value) = provider.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert("x-imagegate-provider", value);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Location;

    struct Fixture {
        dedupe: Arc<Dedupe>,
        results: Results,
        _dir: tempfile::TempDir,
    }

    async fn fixture(window: Duration, capacity: usize) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("db").display());
        let store = crate::store::connect(&url).await.expect("sqlite");
        store.migrate().await.expect("migrate");
        let results =
            Results::open(&Location::Folder(dir.path().join("results")), &|_| None).expect("open");
        let shared = Shared {
            store,
            results: results.clone(),
            replica: "test-replica".into(),
            tasks: TaskTracker::new(),
        };
        let mut dedupe = Dedupe::new(true, window, shared);
        dedupe.capacity = capacity;
        Fixture {
            dedupe: Arc::new(dedupe),
            results,
            _dir: dir,
        }
    }

    fn fingerprint(n: u64) -> Fingerprint {
        Dedupe::fingerprint(1, Endpoint::Generations, None, &n.to_be_bytes())
    }

    const LIMITS: Limits = Limits {
        wait: Duration::from_secs(1),
        running: Duration::from_secs(60),
    };

    async fn claim(dedupe: &Arc<Dedupe>, n: u64, retry: bool) -> Result<KeepTicket, Response> {
        let retry = if retry { Retry::Counted } else { Retry::No };
        let ticket = dedupe
            .claim(fingerprint(n), retry, &format!("req_{n}"), LIMITS)
            .await?;
        Ok(ticket.expect("enabled: an original gets a ticket"))
    }

    #[tokio::test]
    async fn distinct_calls_leave_the_table_bounded_and_forget_the_oldest_first() {
        let f = fixture(Duration::from_secs(600), 16).await;
        // Calls still running hold their tickets: nothing ends on its own.
        let mut tickets = Vec::new();
        for n in 0..100 {
            tickets.push(claim(&f.dedupe, n, false).await.expect("original"));
        }
        assert_eq!(f.dedupe.len(), 16);
        assert!(
            f.dedupe.local(&fingerprint(0)).is_none(),
            "the oldest was forgotten"
        );
        assert!(f.dedupe.local(&fingerprint(99)).is_some());
        drop(tickets);
        assert!(f.dedupe.is_empty(), "ended calls leave nothing behind");
    }

    #[tokio::test]
    async fn calls_that_end_unkept_are_forgotten_and_kept_ones_found_until_they_expire() {
        let f = fixture(Duration::from_millis(50), MAX_ENTRIES).await;
        let ticket = claim(&f.dedupe, 1, false).await.expect("original");
        drop(ticket);
        assert!(f.dedupe.is_empty());
        assert!(claim(&f.dedupe, 1, true).await.is_ok(), "nothing to join");

        let ticket = claim(&f.dedupe, 2, false).await.expect("original");
        let mut writer = ticket.writer();
        writer.write(b"the image").await.expect("write");
        ticket.keep(writer, StatusCode::OK, HeaderMap::new()).await;
        let Err(replayed) = claim(&f.dedupe, 2, true).await else {
            panic!("a kept result is found by its retry");
        };
        assert_eq!(replayed.headers()["x-imagegate-duplicate"], "replayed");
        assert_eq!(
            replayed.headers()["x-imagegate-original-request-id"],
            "req_2"
        );
        std::thread::sleep(Duration::from_millis(60));
        // No request comes: the timer's sweep forgets it, and deletes its result.
        assert_eq!(f.dedupe.sweep(), 1);
        assert_eq!(f.dedupe.sweep_shared().await, 1);
        assert!(f.results.list(KEPT_FOLDER).await.expect("list").is_empty());
        assert!(claim(&f.dedupe, 2, true).await.is_ok(), "a new call");
    }

    #[tokio::test]
    async fn only_calls_still_running_after_a_moment_are_registered_and_their_end_removes_them() {
        let f = fixture(Duration::from_secs(600), MAX_ENTRIES).await;
        let store = Arc::clone(&f.dedupe.shared.store);
        let row = |n: u64| {
            let store = Arc::clone(&store);
            async move {
                store
                    .find_call(&hex::encode(fingerprint(n)), Utc::now())
                    .await
                    .expect("find")
            }
        };
        // Over at once (a fast proxied call): never written.
        drop(claim(&f.dedupe, 1, false).await.expect("original"));
        let slow = claim(&f.dedupe, 2, false).await.expect("original");
        tokio::time::sleep(REGISTER_AFTER * 3).await;
        assert_eq!(row(1).await, None);
        let running = row(2).await.expect("registered");
        assert_eq!(
            (
                running.state,
                running.request_id.as_str(),
                &*running.replica
            ),
            (CallState::Running, "req_2", "test-replica")
        );
        drop(slow);
        f.dedupe.shared.tasks.close();
        f.dedupe.shared.tasks.wait().await;
        assert_eq!(row(2).await, None, "its end removed it");
    }

    #[tokio::test]
    async fn a_result_not_kept_leaves_nothing() {
        let f = fixture(Duration::from_secs(600), MAX_ENTRIES).await;
        let ticket = claim(&f.dedupe, 9, false).await.expect("original");
        let mut writer = ticket.writer();
        writer.write(b"half a result").await.expect("write");
        // The provider broke off: the call ends without keeping it.
        drop(writer);
        drop(ticket);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(f.results.list(KEPT_FOLDER).await.expect("list").is_empty());
    }
}
