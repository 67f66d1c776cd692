//! Duplicate protection. The SDKs retry a cut or timed-out call with the same body and no
//! idempotency key, and the provider bills both. A retry (`X-Stainless-Retry-Count` >= 1,
//! or a repeated `Idempotency-Key`) from the same key with the same body attaches to the
//! original call while it runs, or collects its result, kept on disk for a while when the
//! original client went away before receiving it. A call that ended any other way (its
//! answer delivered, or failed) leaves nothing behind: its retry is a new call, at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::private_fs;
use crate::upstream::Endpoint;

/// Most calls remembered at once (running, or kept for a retry); beyond it the oldest is
/// forgotten, and a retry of it becomes a new call. About 200 bytes each.
const MAX_ENTRIES: usize = 16_384;

/// Same client key, endpoint, idempotency key and body.
pub type Fingerprint = [u8; 32];

/// Where an original call stands, as its retries see it.
#[derive(Clone)]
pub enum Status {
    InFlight,
    /// The result, on disk, for a retry to collect.
    Kept(Arc<Kept>),
    /// Over, with nothing kept: the client received it, or it failed (a retry calls again).
    Gone,
}

pub struct Kept {
    path: PathBuf,
    status: StatusCode,
    headers: HeaderMap,
}

impl Drop for Kept {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub struct Dedupe {
    enabled: bool,
    window: Duration,
    dir: PathBuf,
    capacity: usize,
    next_id: AtomicU64,
    table: Mutex<Table>,
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

/// What a request does about duplicates.
pub enum Claim {
    /// Not a retry of anything running or kept: call the provider, and let later retries
    /// find this call through the ticket.
    Original(Option<KeepTicket>),
    /// A retry of a call still running or kept: wait for it / collect it.
    Attach(watch::Receiver<Status>),
}

impl Dedupe {
    /// Results kept by an earlier run are unknown to this one and removed.
    pub fn new(enabled: bool, window: Duration, dir: PathBuf) -> std::io::Result<Dedupe> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        private_fs::create_dir_all(&dir)?;
        Ok(Dedupe {
            enabled,
            window,
            dir,
            capacity: MAX_ENTRIES,
            next_id: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
        })
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
        let retry_count = headers
            .get("x-stainless-retry-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        retry_count >= 1 || headers.contains_key("idempotency-key")
    }

    pub fn claim(self: &Arc<Self>, fingerprint: Fingerprint, retry: bool) -> Claim {
        if !self.enabled {
            return Claim::Original(None);
        }
        let mut table = self.lock();
        table.expire(Instant::now());
        if retry {
            if let Some(entry) = table.entries.get(&fingerprint) {
                return Claim::Attach(entry.tx.subscribe());
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, _) = watch::channel(Status::InFlight);
        let entry = Entry { id, tx: tx.clone() };
        table.insert(fingerprint, entry, self.capacity);
        Claim::Original(Some(KeepTicket {
            dedupe: Arc::clone(self),
            fingerprint,
            id,
            tx: Some(tx),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the kept results past the window (their files go once no retry is reading
    /// them): run by a timer, so that they go whether or not requests arrive. Returns how
    /// many calls a retry could find before.
    pub fn sweep(&self) -> usize {
        let mut table = self.lock();
        let before = table.entries.len();
        table.expire(Instant::now());
        before - table.entries.len()
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

/// Held by an original call; tells its retries how it ended.
pub struct KeepTicket {
    dedupe: Arc<Dedupe>,
    fingerprint: Fingerprint,
    id: u64,
    tx: Option<watch::Sender<Status>>,
}

impl KeepTicket {
    /// A file to write the result to, when its client has gone: one per call, so that two
    /// originals with the same fingerprint never share one. Removed when dropped unless
    /// [`KeepTicket::keep`] took it.
    pub async fn create_file(&self) -> std::io::Result<KeptFile> {
        let path = self.dedupe.dir.join(format!(
            "{}-{}.result",
            hex::encode(&self.fingerprint[..8]),
            self.id
        ));
        let file = private_fs::create_file_async(&path).await?;
        Ok(KeptFile {
            path: Some(path),
            file,
        })
    }

    /// The whole result is in `file`: retries within the window get it.
    pub fn keep(mut self, mut file: KeptFile, status: StatusCode, headers: HeaderMap) {
        let Some(path) = file.path.take() else {
            return;
        };
        let Some(tx) = self.tx.take() else {
            let _ = std::fs::remove_file(&path);
            return;
        };
        tracing::info!(
            fingerprint = %hex::encode(&self.fingerprint[..6]),
            "result kept for a retry to collect"
        );
        // `send_replace`, not `send`: the value must change even when no retry is waiting
        // yet, since later retries read it from the table.
        tx.send_replace(Status::Kept(Arc::new(Kept {
            path,
            status,
            headers,
        })));
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
}

impl Drop for KeepTicket {
    /// Ended without a kept result: waiting retries call again, and later ones find nothing.
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Status::Gone);
            self.dedupe.lock().remove(&self.fingerprint, self.id);
        }
    }
}

/// A result being written for a retry: its file is removed when this is dropped, on every
/// path that does not keep it (the provider broke off, a write failed, the task ended).
pub struct KeptFile {
    /// Taken by [`KeepTicket::keep`].
    path: Option<PathBuf>,
    file: tokio::fs::File,
}

impl KeptFile {
    /// Writes a piece of the result body as it is read.
    pub async fn write(&mut self, chunk: &Bytes) -> std::io::Result<()> {
        self.file.write_all(chunk).await
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush().await
    }
}

impl Drop for KeptFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Waits for the original call; the kept result as a response, or `None` when nothing was
/// kept (the retry then calls the provider itself).
pub async fn collect(mut rx: watch::Receiver<Status>, wait: Duration) -> Option<Response> {
    let attached = matches!(*rx.borrow(), Status::InFlight);
    let status = tokio::time::timeout(wait, rx.wait_for(|s| !matches!(s, Status::InFlight)))
        .await
        .ok()?
        .ok()?
        .clone();
    let Status::Kept(kept) = status else {
        return None;
    };
    let file = tokio::fs::File::open(&kept.path).await.ok()?;
    let mut response = Response::new(Body::from_stream(KeptStream {
        inner: tokio_util::io::ReaderStream::new(file),
        _kept: Arc::clone(&kept),
    }));
    *response.status_mut() = kept.status;
    response.headers_mut().extend(kept.headers.clone());
    response.headers_mut().insert(
        "x-imagegate-duplicate",
        HeaderValue::from_static(if attached { "attached" } else { "replayed" }),
    );
    Some(response)
}

/// Keeps the file alive while it is being sent, even if its entry expires meanwhile.
struct KeptStream {
    inner: tokio_util::io::ReaderStream<tokio::fs::File>,
    _kept: Arc<Kept>,
}

impl futures_util::Stream for KeptStream {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The headers a kept result is served with.
pub fn kept_headers(content_type: Option<&HeaderValue>, provider: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, ct.clone());
    }
    if let Ok(value) = HeaderValue::from_str(provider) {
        headers.insert("x-imagegate-provider", value);
    }
    headers
}

pub fn results_dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join("results")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dedupe(dir: &Path) -> Arc<Dedupe> {
        Arc::new(Dedupe::new(true, Duration::from_secs(600), dir.join("results")).expect("dir"))
    }

    fn fingerprint(n: u64) -> Fingerprint {
        Dedupe::fingerprint(1, Endpoint::Generations, None, &n.to_be_bytes())
    }

    fn original(claim: Claim) -> KeepTicket {
        match claim {
            Claim::Original(Some(ticket)) => ticket,
            _ => panic!("expected an original call with a ticket"),
        }
    }

    #[test]
    fn distinct_calls_leave_the_table_bounded_and_forget_the_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dedupe = dedupe(dir.path());
        // Calls still running hold their tickets: nothing ends on its own.
        let tickets: Vec<KeepTicket> = (0..100_000)
            .map(|n| original(dedupe.claim(fingerprint(n), false)))
            .collect();
        assert_eq!(dedupe.len(), MAX_ENTRIES);
        assert!(
            matches!(dedupe.claim(fingerprint(0), true), Claim::Original(_)),
            "the oldest was forgotten: its retry is a new call"
        );
        assert!(matches!(
            dedupe.claim(fingerprint(99_999), true),
            Claim::Attach(_)
        ));
        drop(tickets);
        assert!(dedupe.len() <= 1, "ended calls leave nothing behind");
    }

    #[tokio::test]
    async fn calls_that_end_unkept_are_forgotten_and_kept_ones_found_until_they_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dedupe = Arc::new(
            Dedupe::new(true, Duration::from_millis(50), dir.path().join("r")).expect("dir"),
        );
        let ticket = original(dedupe.claim(fingerprint(1), false));
        drop(ticket);
        assert!(dedupe.is_empty());
        assert!(matches!(
            dedupe.claim(fingerprint(1), true),
            Claim::Original(Some(_))
        ));

        let ticket = original(dedupe.claim(fingerprint(2), false));
        let file = ticket.create_file().await.expect("file");
        let path = file.path.clone().expect("a path");
        ticket.keep(file, StatusCode::OK, HeaderMap::new());
        let Claim::Attach(rx) = dedupe.claim(fingerprint(2), true) else {
            panic!("a kept result is found by its retry");
        };
        assert!(matches!(*rx.borrow(), Status::Kept(_)));
        drop(rx);
        std::thread::sleep(Duration::from_millis(60));
        // No request comes: the timer's sweep removes it.
        assert_eq!(dedupe.sweep(), 1);
        assert!(!path.exists(), "an expired result's file is removed");
        assert!(matches!(
            dedupe.claim(fingerprint(2), true),
            Claim::Original(_)
        ));
    }

    #[tokio::test]
    async fn two_originals_with_one_fingerprint_keep_separate_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dedupe = dedupe(dir.path());
        let first = original(dedupe.claim(fingerprint(7), false));
        let second = original(dedupe.claim(fingerprint(7), false));
        let a = first.create_file().await.expect("file");
        let b = second.create_file().await.expect("file");
        assert_ne!(a.path, b.path);
        // The first one's end does not forget the second, which replaced it.
        drop(first);
        assert!(matches!(
            dedupe.claim(fingerprint(7), true),
            Claim::Attach(_)
        ));
        drop(second);
        assert!(dedupe.is_empty());
    }

    #[tokio::test]
    async fn a_result_file_not_kept_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dedupe = dedupe(dir.path());
        let ticket = original(dedupe.claim(fingerprint(9), false));
        let mut file = ticket.create_file().await.expect("file");
        let path = file.path.clone().expect("a path");
        file.write(&Bytes::from_static(b"half a result"))
            .await
            .expect("write");
        assert!(path.exists());
        // The provider broke off: the call ends without keeping it.
        drop(file);
        drop(ticket);
        assert!(!path.exists(), "a result not kept leaves no file");
        assert_eq!(
            std::fs::read_dir(dir.path().join("results"))
                .expect("dir")
                .count(),
            0
        );
    }
}
