//! Hands usage rows to the store in batches, off the request path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::usage::UsageRow;

const BATCH: usize = 256;

/// Where finished requests drop their usage row. Sending never waits on the database.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::UnboundedSender<UsageRow>,
}

impl UsageSink {
    pub fn record(&self, row: UsageRow) {
        if let Err(mpsc::error::SendError(row)) = self.tx.send(row) {
            tracing::error!(request_id = %row.request_id, "usage writer has stopped; row not recorded");
        }
    }
}

/// The writer task; [`UsageWriter::close`] writes what is queued and waits for it.
pub struct UsageWriter {
    stop: CancellationToken,
    join: JoinHandle<()>,
}

impl UsageWriter {
    pub fn start(store: Arc<dyn Store>) -> (UsageSink, UsageWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        #[expect(
            clippy::disallowed_methods,
            reason = "the writer outlives the request tasks and is joined by UsageWriter::close"
        )]
        let join = tokio::spawn(run(store, rx, stop.clone()));
        (UsageSink { tx }, UsageWriter { stop, join })
    }

    /// Writes every queued row, then stops. Call after the request tasks have finished.
    pub async fn close(self) {
        self.stop.cancel();
        if let Err(err) = self.join.await {
            tracing::error!(%err, "usage writer failed");
        }
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<UsageRow>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let stopping = tokio::select! {
            received = rx.recv_many(&mut batch, BATCH) => received == 0,
            () = stop.cancelled() => true,
        };
        if stopping {
            while let Ok(row) = rx.try_recv() {
                batch.push(row);
            }
        }
        if !batch.is_empty() {
            write(&*store, &batch, stopping).await;
            batch.clear();
        }
        if stopping {
            return;
        }
    }
}

/// Retries until the rows are stored. At shutdown it gives up after a few tries and says
/// how many rows it could not write.
async fn write(store: &dyn Store, batch: &[UsageRow], stopping: bool) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1u32.. {
        match store.insert_usage(batch).await {
            Ok(_) => {
                metrics::counter!("imagegate_usage_rows_written_total")
                    .increment(batch.len() as u64);
                return;
            }
            Err(err) if stopping && attempt >= 5 => {
                tracing::error!(%err, rows = batch.len(), "usage rows not written at shutdown");
                return;
            }
            Err(err) => {
                tracing::warn!(%err, rows = batch.len(), attempt, "usage write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
