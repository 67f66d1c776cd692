//! Notices on SQLite: one node, so a change is delivered in-process, through a broadcast
//! channel the store holds, to the same listener that Postgres feeds.

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::SqliteStore;
use crate::store::StoreResult;
use crate::store::notices::{Notice, NoticeStore, Notices, NoticesLost};

/// Notices not yet received by a slow subscriber; past this it is told it missed some.
pub(super) const BACKLOG: usize = 1024;

/// Delivers `notice` to the subscribers, after the change it announces was committed.
pub(super) fn publish(sender: &broadcast::Sender<Notice>, notice: Notice) {
    // No subscriber (a CLI command, or a gateway before its listener starts): nobody
    // caches anything to drop.
    let _ = sender.send(notice);
}

struct Receiving(broadcast::Receiver<Notice>);

#[async_trait]
impl Notices for Receiving {
    async fn next(&mut self) -> Result<Notice, NoticesLost> {
        match self.0.recv().await {
            Ok(notice) => Ok(notice),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(NoticesLost::Missed(missed)),
            Err(broadcast::error::RecvError::Closed) => Err(NoticesLost::Disconnected),
        }
    }
}

#[async_trait]
impl NoticeStore for SqliteStore {
    async fn subscribe(&self) -> StoreResult<Box<dyn Notices>> {
        Ok(Box::new(Receiving(self.notices.subscribe())))
    }

    async fn publish_reload(&self, from: &str) -> StoreResult<()> {
        publish(
            &self.notices,
            Notice::Reload {
                from: from.to_owned(),
            },
        );
        Ok(())
    }
}
