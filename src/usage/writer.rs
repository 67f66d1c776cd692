//! Gets usage rows from the request path into the database without losing one: the row is
//! appended to the journal on disk in the caller, a task fsyncs the journal every few
//! milliseconds, and another ships it to the store in batches, retrying while the database
//! is down. See [`crate::usage::journal`] for the files.
//!
//! When the journal cannot be written (disk full, read-only, a file-size limit), the sink
//! says so ([`UsageSink::unavailable`]): billable requests are refused until a probe finds
//! it writable again, and a row that could not be journaled is written straight to the
//! database, or, failing that, counted as lost and logged whole.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};
use crate::usage::journal::{DEFAULT_SEGMENT_BYTES, Journal, Unwritten};
use crate::usage::{Intent, UsageRow};

/// How long the shipper lets rows gather before a batch that is not full: after the first
/// new row, and after a batch that took all there was.
const LINGER: Duration = Duration::from_millis(50);
/// Journal lines per batch (a call is two: its intent and its row).
const BATCH: usize = 256;
/// How often the journal is fsync'd when rows were appended. A process crash loses no row
/// (an append is in the page cache when `record` returns); an OS crash or power cut loses at
/// most the rows of this window, plus the fsync's own time.
const SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Retries of a failed insert wait from this ...
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// ... doubling up to this.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// An insert that takes longer is abandoned and retried; rows it did store are skipped then.
const INSERT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a journal that failed is tried again.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a row the journal could not take may wait for the database.
const RESCUE_TIMEOUT: Duration = Duration::from_secs(10);

struct Shared {
    journal: Journal,
    /// Wakes the shipper when a row is appended.
    appended: Notify,
    /// Set while the journal cannot be written; read on every billable request.
    broken: AtomicBool,
    /// Why, for `/readyz` and the refusals' log lines.
    reason: Mutex<Option<String>>,
    /// Wakes the probe when the journal fails.
    failed: Notify,
    /// Rows the journal could not take, for the rescue task to write to the database.
    rescue: mpsc::UnboundedSender<UsageRow>,
}

impl Shared {
    /// Marks the journal unwritable: billable requests are refused until the probe passes.
    fn fail(&self, what: &str, err: &std::io::Error) {
        metrics::counter!("imagegate_usage_journal_errors_total").increment(1);
        let reason = format!("{what} failed: {err}");
        let first = !self.broken.swap(true, Ordering::SeqCst);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
        if first {
            metrics::gauge!("imagegate_usage_journal_unavailable").set(1.0);
            tracing::error!(journal = %self.journal.dir().display(), %reason, "usage journal unavailable: billable requests are refused until it can be written again");
        }
        self.failed.notify_one();
    }

    fn recovered(&self) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.broken.store(false, Ordering::SeqCst);
        metrics::gauge!("imagegate_usage_journal_unavailable").set(0.0);
        tracing::info!(journal = %self.journal.dir().display(), "usage journal writable again; accepting billable requests");
    }
}

/// Where finished requests drop their usage row. Recording writes to the journal on local
/// disk; it never waits on the database.
#[derive(Clone)]
pub struct UsageSink {
    shared: Arc<Shared>,
    /// False only for measuring what recording costs (`server.record_usage = false`).
    enabled: bool,
}

impl UsageSink {
    /// Appends the row to the journal. Once this returns, the row survives a crash of the
    /// process, and reaches the database as soon as the database accepts it.
    pub fn record(&self, row: UsageRow) {
        if !self.enabled {
            return;
        }
        match self.shared.journal.append(row) {
            Ok(()) => self.shared.appended.notify_one(),
            Err(Unwritten { error: err, row }) => {
                self.shared.fail("appending a usage row", &err);
                tracing::warn!(%err, request_id = %row.request_id, "usage journal write failed; writing the row straight to the database");
                if let Err(mpsc::error::SendError(row)) = self.shared.rescue.send(*row) {
                    lost(&row, "the usage writer has stopped");
                }
            }
        }
    }

    /// Journals a provider call before it is sent, so that a crash during it still leaves
    /// a row (see [`crate::usage::journal`]). An error means the call must not be sent: its
    /// usage could not be accounted for.
    pub fn intend(&self, intent: &Intent) -> std::io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.shared
            .journal
            .append_intent(intent)
            .inspect_err(|err| {
                self.shared.fail("appending a call's intent", err);
            })
    }

    /// Resolves the intent of a call abandoned before the provider could answer it (the
    /// client's upload failed): it has no row, and must not become an interrupted one.
    pub fn cancel(&self, request_id: &str) {
        if !self.enabled {
            return;
        }
        if let Err(err) = self.shared.journal.append_cancel(request_id) {
            // The next start then records the call as interrupted: over-counted, not lost.
            self.shared.fail("appending a cancelled call", &err);
        }
    }

    /// Why billable requests must be refused now: the journal cannot be written. `None`
    /// when it can.
    pub fn unavailable(&self) -> Option<String> {
        if !self.enabled || !self.shared.broken.load(Ordering::Relaxed) {
            return None;
        }
        let reason = self.shared.reason.lock().unwrap_or_else(|e| e.into_inner());
        Some(reason.clone().unwrap_or_else(|| "unavailable".to_owned()))
    }

    /// A sink that drops every row: for benchmarks of what recording costs, never production.
    pub fn discarding(mut self) -> Self {
        self.enabled = false;
        self
    }

    /// Rows recorded and not yet in the database.
    pub fn backlog(&self) -> u64 {
        self.shared.journal.backlog()
    }
}

/// The journal's tasks; [`UsageWriter::close`] flushes and stops them.
pub struct UsageWriter {
    shared: Arc<Shared>,
    /// Stops the fsync task (after a last fsync).
    stop_sync: CancellationToken,
    /// Tells the shipper to stop once the journal is empty.
    drain: CancellationToken,
    /// Stops the shipper now, mid-retry if need be.
    abort: CancellationToken,
    syncer: JoinHandle<()>,
    shipper: JoinHandle<()>,
    /// Stops the probe and, once the rows it holds are written, the rescue task.
    stop_aside: CancellationToken,
    prober: JoinHandle<()>,
    rescuer: JoinHandle<()>,
}

impl UsageWriter {
    /// Opens the journal in `dir` and starts fsyncing it and shipping it, beginning with
    /// what an earlier run left.
    pub async fn start(
        store: Arc<dyn Store>,
        dir: &Path,
    ) -> anyhow::Result<(UsageSink, UsageWriter)> {
        let path = dir.to_owned();
        let journal =
            tokio::task::spawn_blocking(move || Journal::open(&path, DEFAULT_SEGMENT_BYTES))
                .await?
                .map_err(|e| anyhow::anyhow!("server.journal_dir {}: {e}", dir.display()))?;
        if journal.backlog() > 0 {
            tracing::info!(
                rows = journal.backlog(),
                "usage rows left in the journal by an earlier run; writing them to the database"
            );
        }
        let (rescue, rescued) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            journal,
            appended: Notify::new(),
            broken: AtomicBool::new(false),
            reason: Mutex::new(None),
            failed: Notify::new(),
            rescue,
        });
        metrics::gauge!("imagegate_usage_journal_unavailable").set(0.0);
        let stop_aside = CancellationToken::new();
        let (stop_sync, drain, abort) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        #[expect(
            clippy::disallowed_methods,
            reason = "the journal tasks outlive the request tasks and are joined by UsageWriter::close"
        )]
        let (syncer, shipper, prober, rescuer) = (
            tokio::spawn(sync_every(Arc::clone(&shared), stop_sync.clone())),
            tokio::spawn(ship(
                Arc::clone(&shared),
                Arc::clone(&store),
                drain.clone(),
                abort.clone(),
            )),
            tokio::spawn(probe(Arc::clone(&shared), stop_aside.clone())),
            tokio::spawn(rescue_rows(rescued, store, stop_aside.clone())),
        );
        let sink = UsageSink {
            shared: Arc::clone(&shared),
            enabled: true,
        };
        let writer = UsageWriter {
            shared,
            stop_sync,
            drain,
            abort,
            syncer,
            shipper,
            stop_aside,
            prober,
            rescuer,
        };
        Ok((sink, writer))
    }

    /// fsyncs the journal, then writes what it holds to the database for up to `grace`.
    /// Rows still there after it stay in the journal for the next start. Call after the
    /// request tasks have finished.
    pub async fn close(self, grace: Duration) {
        self.stop_aside.cancel();
        for (task, what) in [(self.prober, "probe"), (self.rescuer, "rescue")] {
            if let Err(err) = task.await {
                tracing::error!(%err, "usage journal {what} task failed");
            }
        }
        self.stop_sync.cancel();
        if let Err(err) = self.syncer.await {
            tracing::error!(%err, "usage journal fsync task failed");
        }
        self.drain.cancel();
        let mut shipper = self.shipper;
        let shipped = match tokio::time::timeout(grace, &mut shipper).await {
            Ok(shipped) => shipped,
            Err(_) => {
                self.abort.cancel();
                shipper.await
            }
        };
        if let Err(err) = shipped {
            tracing::error!(%err, "usage journal shipper failed");
        }
        let journal = &self.shared.journal;
        let shared = Arc::clone(&self.shared);
        match tokio::task::spawn_blocking(move || shared.journal.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(%err, "usage journal fsync failed"),
            Err(err) => tracing::error!(%err, "usage journal fsync task failed"),
        }
        let left = journal.backlog();
        if left > 0 {
            tracing::warn!(
                rows = left,
                journal = %journal.dir().display(),
                "usage rows not yet in the database; they stay in the journal and are written at the next start"
            );
        }
    }
}

/// fsyncs the journal whenever rows were appended, at most every [`SYNC_INTERVAL`], and once
/// more when stopped.
async fn sync_every(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        if shared.journal.needs_sync() {
            let syncing = Arc::clone(&shared);
            match tokio::task::spawn_blocking(move || syncing.journal.sync()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => shared.fail("fsync", &err),
                Err(err) => tracing::error!(%err, "usage journal fsync task failed"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// After the journal fails, tries it every [`PROBE_INTERVAL`] until it can be written again
/// (see [`Journal::probe`]), then lets billable requests in again.
async fn probe(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = shared.failed.notified() => {}
            () = stop.cancelled() => return,
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                () = stop.cancelled() => return,
            }
            let probing = Arc::clone(&shared);
            match tokio::task::spawn_blocking(move || probing.journal.probe()).await {
                Ok(Ok(())) => {
                    shared.recovered();
                    break;
                }
                Ok(Err(err)) => {
                    let mut reason = shared.reason.lock().unwrap_or_else(|e| e.into_inner());
                    *reason = Some(format!("probe failed: {err}"));
                }
                Err(err) => tracing::error!(%err, "usage journal probe task failed"),
            }
        }
    }
}

/// Writes the rows the journal could not take straight to the database, one insert each
/// (they are few: the first failure stops billable requests). A row the database does not
/// take either is counted as lost and logged whole: the log line is then its only record.
async fn rescue_rows(
    mut rows: mpsc::UnboundedReceiver<UsageRow>,
    store: Arc<dyn Store>,
    stop: CancellationToken,
) {
    loop {
        let row = tokio::select! {
            row = rows.recv() => row,
            // Requests have finished when the writer closes: take what is queued, then end.
            () = stop.cancelled() => rows.try_recv().ok(),
        };
        let Some(row) = row else { return };
        let stored = tokio::time::timeout(
            RESCUE_TIMEOUT,
            store.insert_usage(std::slice::from_ref(&row)),
        )
        .await;
        match stored {
            Ok(Ok(_)) => {
                metrics::counter!("imagegate_usage_rows_rescued_total").increment(1);
                metrics::counter!("imagegate_usage_rows_written_total").increment(1);
                tracing::warn!(request_id = %row.request_id, "usage row written straight to the database (the journal could not take it)");
            }
            Ok(Err(err)) => lost(&row, &err.to_string()),
            Err(_) => lost(&row, "the database did not answer in time"),
        }
    }
}

/// A row neither the journal nor the database took: counted, and logged with all of it.
fn lost(row: &UsageRow, why: &str) {
    metrics::counter!("imagegate_usage_rows_lost_total").increment(1);
    let row_json = serde_json::to_string(row).unwrap_or_default();
    tracing::error!(request_id = %row.request_id, row = %row_json, error = why, "usage row lost: neither the journal nor the database took it; this log line is its only record");
}

/// Reads batches from the journal's cursor, inserts them, and moves the cursor past each
/// once it is stored. Returns when drained and the journal is empty, or when aborted.
async fn ship(
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let mut delay = FIRST_RETRY;
    loop {
        let reading = Arc::clone(&shared);
        let batch = match tokio::task::spawn_blocking(move || reading.journal.read_batch(BATCH))
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read)
        {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(%err, "reading the usage journal failed; retrying");
                if !pause(&mut delay, &abort).await {
                    return;
                }
                continue;
            }
        };
        delay = FIRST_RETRY;
        if batch.is_empty() {
            if drain.is_cancelled() {
                return;
            }
            tokio::select! {
                () = shared.appended.notified() => {}
                () = drain.cancelled() => {}
                () = abort.cancelled() => return,
            }
            // Let a batch gather: a database round trip and a cursor fsync per row would
            // cost more than the requests themselves at low rates.
            if !linger(&drain, &abort).await {
                return;
            }
            continue;
        }
        if !store_batch(&shared, &*store, &batch.rows, &abort).await {
            return;
        }
        // A batch short of BATCH lines means the shipper has caught up with the journal.
        let caught_up = batch.lines < BATCH as u64;
        let committing = Arc::clone(&shared);
        let committed =
            tokio::task::spawn_blocking(move || committing.journal.commit(&batch)).await;
        match committed {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(%err, "usage journal cursor not saved; the next start writes these rows again (they are skipped)");
            }
            Err(err) => tracing::error!(%err, "usage journal commit task failed"),
        }
        // The next batch gathers too: read at once, it would hold only the rows appended
        // during this insert, and pay a transaction and a cursor fsync for those few.
        // Behind, a full batch is followed by the next at once.
        if caught_up && !linger(&drain, &abort).await {
            return;
        }
    }
}

/// Stores the rows, retrying while the database is unreachable. When it refuses the batch
/// itself, the rows are tried one by one and those it refuses are set aside, so that one bad
/// row cannot hold up every row behind it. False when aborted first.
async fn store_batch(
    shared: &Arc<Shared>,
    store: &dyn Store,
    rows: &[UsageRow],
    abort: &CancellationToken,
) -> bool {
    if rows.is_empty() {
        return true;
    }
    match insert(store, rows, abort).await {
        Insert::Stored => return true,
        Insert::Aborted => return false,
        Insert::Refused(_) if rows.len() > 1 => {}
        Insert::Refused(err) => {
            set_aside(shared, &rows[0], &err).await;
            return true;
        }
    }
    for row in rows {
        match insert(store, std::slice::from_ref(row), abort).await {
            Insert::Stored => {}
            Insert::Aborted => return false,
            Insert::Refused(err) => set_aside(shared, row, &err).await,
        }
    }
    true
}

enum Insert {
    Stored,
    Aborted,
    /// The database refused the rows themselves; trying them again cannot help.
    Refused(StoreError),
}

/// Inserts the rows, retrying with backoff while the database is down, slow or busy.
async fn insert(store: &dyn Store, rows: &[UsageRow], abort: &CancellationToken) -> Insert {
    let mut delay = FIRST_RETRY;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = tokio::select! {
            result = tokio::time::timeout(INSERT_TIMEOUT, store.insert_usage(rows)) => result,
            () = abort.cancelled() => return Insert::Aborted,
        };
        match result {
            Ok(Ok(_)) => {
                metrics::counter!("imagegate_usage_rows_written_total")
                    .increment(rows.len() as u64);
                return Insert::Stored;
            }
            Ok(Err(err)) if err.is_refused() => return Insert::Refused(err),
            Ok(Err(err)) => {
                tracing::warn!(%err, rows = rows.len(), attempt, "usage write failed; the rows wait in the journal, retrying");
            }
            Err(_) => {
                tracing::warn!(
                    rows = rows.len(),
                    attempt,
                    timeout_secs = INSERT_TIMEOUT.as_secs(),
                    "usage write timed out; the rows wait in the journal, retrying"
                );
            }
        }
        if !pause(&mut delay, abort).await {
            return Insert::Aborted;
        }
    }
}

async fn set_aside(shared: &Arc<Shared>, row: &UsageRow, err: &StoreError) {
    metrics::counter!("imagegate_usage_rows_refused_total").increment(1);
    let keeping = Arc::clone(shared);
    let kept = row.clone();
    let written = tokio::task::spawn_blocking(move || keeping.journal.set_aside(&kept)).await;
    let row_json = serde_json::to_string(row).unwrap_or_default();
    match written {
        Ok(Ok(())) => tracing::error!(
            %err,
            request_id = %row.request_id,
            row = %row_json,
            file = %shared.journal.dir().join("refused.jsonl").display(),
            "the database refused a usage row; set aside"
        ),
        Ok(Err(io)) => tracing::error!(
            %err,
            %io,
            request_id = %row.request_id,
            row = %row_json,
            "the database refused a usage row and it could not be set aside; this log line is its only record"
        ),
        Err(join) => {
            tracing::error!(%err, %join, request_id = %row.request_id, row = %row_json, "the database refused a usage row; set-aside task failed")
        }
    }
}

/// Waits [`LINGER`] for rows to gather, less once draining; false when aborted.
async fn linger(drain: &CancellationToken, abort: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(LINGER) => true,
        () = drain.cancelled() => true,
        () = abort.cancelled() => false,
    }
}

/// Sleeps `delay`, then doubles it up to [`MAX_RETRY`]; false when aborted first.
async fn pause(delay: &mut Duration, abort: &CancellationToken) -> bool {
    let sleep = *delay;
    *delay = (*delay * 2).min(MAX_RETRY);
    tokio::select! {
        () = tokio::time::sleep(sleep) => true,
        () = abort.cancelled() => false,
    }
}
