//! Changes one replica publishes to every replica sharing the database: a key created,
//! changed or revoked (published by the key's own transaction), and a reload asked for.
//! Postgres carries them with `NOTIFY`; SQLite (one node) delivers them in-process, so the
//! same listener runs above both.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{OnRuntime, StoreResult};

/// The Postgres channel every replica listens on.
pub(crate) const CHANNEL: &str = "imagegate";

/// One change, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// The key with this id was created, changed or revoked: what a replica cached of it
    /// is stale.
    Key { id: i64 },
    /// The replica named `from` reloaded its configuration file; every other reloads its
    /// own.
    Reload { from: String },
}

impl Notice {
    /// The payload as sent: small JSON, `{"kind":"key","id":42}`.
    pub(crate) fn payload(&self) -> String {
        // An enum of an integer and a string always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A received payload; `None` (logged) for one this version does not know, which a
    /// newer replica may send: it is skipped, never fatal.
    pub(crate) fn parse(payload: &str) -> Option<Notice> {
        match serde_json::from_str(payload) {
            Ok(notice) => Some(notice),
            Err(err) => {
                tracing::warn!(%err, payload = %payload.chars().take(200).collect::<String>(), "a notice of an unknown shape was ignored");
                None
            }
        }
    }
}

/// Why a subscription ended: whatever was published meanwhile may have been missed, so
/// the subscriber treats every cache it guards as stale and subscribes again.
#[derive(Debug, thiserror::Error)]
pub enum NoticesLost {
    #[error("the notice connection failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the notice connection was lost")]
    Disconnected,
    #[error("{0} notices were missed (the subscriber fell behind)")]
    Missed(u64),
}

/// An open subscription to the notices of every replica.
#[async_trait]
pub trait Notices: Send {
    /// The next notice; an error ends the subscription.
    async fn next(&mut self) -> Result<Notice, NoticesLost>;
}

/// Publishing and receiving [`Notice`]s. Key changes need no call here: the store's key
/// methods publish them in their own transactions.
#[async_trait]
pub trait NoticeStore: Send + Sync {
    /// Opens a subscription: notices published from now on are delivered to it.
    async fn subscribe(&self) -> StoreResult<Box<dyn Notices>>;
    /// Asks every replica to reload its configuration file (`from`: this replica's name,
    /// which its own listener skips).
    async fn publish_reload(&self, from: &str) -> StoreResult<()>;
}

#[async_trait]
impl NoticeStore for OnRuntime {
    async fn subscribe(&self) -> StoreResult<Box<dyn Notices>> {
        self.run(|s| async move { s.subscribe().await }).await
    }
    async fn publish_reload(&self, from: &str) -> StoreResult<()> {
        let from = from.to_owned();
        self.run(|s| async move { s.publish_reload(&from).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_unknown_ones_are_skipped() {
        for notice in [
            Notice::Key { id: 42 },
            Notice::Reload {
                from: "pod-a-0000beef".into(),
            },
        ] {
            assert_eq!(Notice::parse(&notice.payload()), Some(notice));
        }
        assert_eq!(
            Notice::Key { id: 42 }.payload(),
            r#"{"kind":"key","id":42}"#
        );
        for unknown in [
            "",
            "not json",
            r#"{"kind":"job","id":1}"#,
            r#"{"kind":"key"}"#,
            r#"{"kind":"key","id":"x"}"#,
        ] {
            assert_eq!(Notice::parse(unknown), None, "{unknown}");
        }
    }
}
