//! Duplicate protection. The SDKs retry a cut or timed-out call with the same body and no
//! idempotency key, and the provider bills both. A retry (`X-Stainless-Retry-Count` >= 1,
//! or a repeated `Idempotency-Key`) from the same key with the same body attaches to the
//! original call while it runs, or collects its result, kept on disk for a while when the
//! original client went away before receiving it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::upstream::Endpoint;

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
    expires: Instant,
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
    entries: Mutex<HashMap<String, watch::Sender<Status>>>,
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
        std::fs::create_dir_all(&dir)?;
        Ok(Dedupe {
            enabled,
            window,
            dir,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// Same key, same endpoint, same body (and the same idempotency key when there is one).
    pub fn fingerprint(
        key_id: i64,
        endpoint: Endpoint,
        idempotency_key: Option<&str>,
        body: &[u8],
    ) -> String {
        let mut hash = Sha256::new();
        hash.update(key_id.to_be_bytes());
        hash.update(endpoint.as_str());
        hash.update([0]);
        hash.update(idempotency_key.unwrap_or_default());
        hash.update([0]);
        hash.update(body);
        hex::encode(hash.finalize())
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

    pub fn claim(self: &Arc<Self>, fingerprint: String, retry: bool) -> Claim {
        if !self.enabled {
            return Claim::Original(None);
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        entries.retain(|_, tx| match &*tx.borrow() {
            Status::InFlight => true,
            Status::Kept(kept) => kept.expires > now,
            Status::Gone => false,
        });
        if retry {
            if let Some(tx) = entries.get(&fingerprint) {
                return Claim::Attach(tx.subscribe());
            }
        }
        let (tx, _) = watch::channel(Status::InFlight);
        entries.insert(fingerprint.clone(), tx.clone());
        Claim::Original(Some(KeepTicket {
            dedupe: Arc::clone(self),
            fingerprint,
            tx: Some(tx),
        }))
    }
}

/// Held by an original call; tells its retries how it ended.
pub struct KeepTicket {
    dedupe: Arc<Dedupe>,
    fingerprint: String,
    tx: Option<watch::Sender<Status>>,
}

impl KeepTicket {
    /// A file to write the result to, when its client has gone.
    pub async fn create_file(&self) -> std::io::Result<(PathBuf, tokio::fs::File)> {
        let path = self.dedupe.dir.join(format!("{}.result", self.fingerprint));
        let file = tokio::fs::File::create(&path).await?;
        Ok((path, file))
    }

    /// The whole result is in `path`: retries within the window get it.
    pub fn keep(mut self, path: PathBuf, status: StatusCode, headers: HeaderMap) {
        if let Some(tx) = self.tx.take() {
            tracing::info!(fingerprint = %&self.fingerprint[..12], "result kept for a retry to collect");
            let _ = tx.send(Status::Kept(Arc::new(Kept {
                path,
                status,
                headers,
                expires: Instant::now() + self.dedupe.window,
            })));
        }
    }
}

impl Drop for KeepTicket {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Status::Gone);
        }
    }
}

/// Writes a result body to its file as it is read.
pub async fn write_chunk(file: &mut tokio::fs::File, chunk: &Bytes) -> std::io::Result<()> {
    file.write_all(chunk).await
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
