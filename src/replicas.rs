//! Replicas made visible: each process writes a heartbeat row (its name, version, start,
//! calls in flight and settings' hash) every [`HEARTBEAT`], and the admin API and the
//! dashboard read every row back as a [`Roster`], with a warning when the live replicas
//! run different settings or versions.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;
use crate::store::ReplicaRow;

/// How often a replica writes its row.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A replica seen within three heartbeats is live; a row older than that is a replica that
/// missed three beats in a row (dead, or cut off from the database), listed as stale.
pub const LIVE_WITHIN: Duration = Duration::from_secs(15);
/// Rows unseen this long are deleted by the next heartbeat of any replica.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// How often the heartbeat looks for a reload (a new settings' hash is written at once).
const TICK: Duration = Duration::from_millis(500);
/// One heartbeat's statement at most this long.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The row's deletion at a clean stop at most this long: the stop waits for it, and a row
/// left behind only turns stale.
const FORGET_TIMEOUT: Duration = Duration::from_millis(500);
/// The first retry after a failed beat; then twice as long each time, up to [`HEARTBEAT`].
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// This build's version, as replicas report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes this replica's row until `stop`, then deletes it. A failed write is logged once
/// per outage and retried with backoff; it never ends the process.
pub async fn heartbeat(state: Arc<AppState>, stop: CancellationToken) {
    let started_at = Utc::now();
    let mut written_hash: Option<String> = None;
    let mut next = tokio::time::Instant::now();
    let mut failures: u32 = 0;
    loop {
        let hash = state.runtime.load().config.hash.clone();
        let now = tokio::time::Instant::now();
        let reloaded = failures == 0 && written_hash.as_deref() != Some(hash.as_str());
        if now >= next || reloaded {
            let row = ReplicaRow {
                id: state.replica.to_string(),
                version: VERSION.to_owned(),
                started_at,
                last_seen: Utc::now(),
                calls_in_flight: i64::try_from(state.in_flight.total()).unwrap_or(i64::MAX),
                config_hash: hash.clone(),
            };
            let forget_before = row.last_seen - FORGET_AFTER;
            let beat =
                tokio::time::timeout(STATEMENT_TIMEOUT, state.store.beat(&row, forget_before));
            // A stop does not wait for a beat held up by a busy or lost database.
            let outcome = tokio::select! {
                () = stop.cancelled() => break,
                outcome = beat => outcome,
            };
            match outcome {
                Ok(Ok(())) => {
                    if failures > 0 {
                        tracing::info!(failures, "replica heartbeat written again");
                    }
                    failures = 0;
                    written_hash = Some(hash);
                    next = now + HEARTBEAT;
                }
                outcome => {
                    failures += 1;
                    if failures == 1 {
                        let err = match outcome {
                            Ok(Err(err)) => err.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        tracing::warn!(%err, "replica heartbeat not written; retrying with backoff");
                    }
                    next = now + retry_after(failures);
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(TICK) => {}
        }
    }
    let forget = state.store.forget_replica(&state.replica);
    match tokio::time::timeout(FORGET_TIMEOUT, forget).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => tracing::warn!(%err, "replica row not deleted at stop; it turns stale"),
        Err(_) => tracing::warn!("replica row not deleted at stop (timed out); it turns stale"),
    }
}

/// The wait before the `failures`-th retry.
fn retry_after(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(HEARTBEAT)
}

/// One replica as the admin API and the dashboard show it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaView {
    pub id: String,
    /// `live` (seen within [`LIVE_WITHIN`]) or `stale`.
    pub status: &'static str,
    /// True for the replica that answered.
    pub this: bool,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub calls_in_flight: i64,
    pub config_hash: String,
}

/// Every replica with a row, live ones first, and what deserves a look.
#[derive(Debug, Clone, Serialize)]
pub struct Roster {
    pub replicas: Vec<ReplicaView>,
    /// Live replicas.
    pub live: usize,
    /// Set when the live replicas run different settings or versions.
    pub warnings: Vec<String>,
}

impl Roster {
    /// The roster of `rows` at `now`, as seen by the replica called `this`.
    pub fn of(rows: Vec<ReplicaRow>, now: DateTime<Utc>, this: &str) -> Roster {
        let live_within = chrono::Duration::from_std(LIVE_WITHIN).unwrap_or_default();
        let mut replicas: Vec<ReplicaView> = rows
            .into_iter()
            .map(|row| ReplicaView {
                status: if now - row.last_seen <= live_within {
                    "live"
                } else {
                    "stale"
                },
                this: row.id == this,
                id: row.id,
                version: row.version,
                started_at: row.started_at,
                last_seen: row.last_seen,
                calls_in_flight: row.calls_in_flight,
                config_hash: row.config_hash,
            })
            .collect();
        replicas.sort_by(|a, b| (a.status, &a.id).cmp(&(b.status, &b.id)));
        let live: Vec<&ReplicaView> = replicas.iter().filter(|r| r.status == "live").collect();
        let mut warnings = Vec::new();
        if let Some(text) = differing("settings", &live, |r| &r.config_hash) {
            warnings.push(format!(
                "{text}: reload or redeploy them from the same file and environment \
                 (config hashes differ)"
            ));
        }
        if let Some(text) = differing("versions", &live, |r| &r.version) {
            warnings.push(format!("{text}: finish the rollout"));
        }
        Roster {
            live: live.len(),
            replicas,
            warnings,
        }
    }
}

/// "live replicas run 2 different settings (a on r1; b on r2, r3)", when they do.
fn differing(
    what: &str,
    live: &[&ReplicaView],
    value: impl Fn(&ReplicaView) -> &String,
) -> Option<String> {
    let mut groups: std::collections::BTreeMap<&String, Vec<&str>> = Default::default();
    for replica in live {
        groups.entry(value(replica)).or_default().push(&replica.id);
    }
    if groups.len() < 2 {
        return None;
    }
    let detail: Vec<String> = groups
        .iter()
        .map(|(value, ids)| format!("{value} on {}", ids.join(", ")))
        .collect();
    Some(format!(
        "live replicas run {} different {what} ({})",
        groups.len(),
        detail.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, seen_secs_ago: i64, version: &str, hash: &str) -> ReplicaRow {
        let now = Utc::now();
        ReplicaRow {
            id: id.to_owned(),
            version: version.to_owned(),
            started_at: now - chrono::Duration::hours(1),
            last_seen: now - chrono::Duration::seconds(seen_secs_ago),
            calls_in_flight: 0,
            config_hash: hash.to_owned(),
        }
    }

    #[test]
    fn only_live_replicas_that_differ_raise_a_warning() {
        let now = Utc::now();
        let same = Roster::of(
            vec![
                row("b", 1, "1.0", "h1"),
                row("a", 2, "1.0", "h1"),
                row("c", 60, "0.9", "h0"),
            ],
            now,
            "a",
        );
        assert_eq!(same.live, 2);
        assert!(same.warnings.is_empty(), "{:?}", same.warnings);
        let ids: Vec<(&str, &str, bool)> = same
            .replicas
            .iter()
            .map(|r| (r.id.as_str(), r.status, r.this))
            .collect();
        assert_eq!(
            ids,
            [
                ("a", "live", true),
                ("b", "live", false),
                ("c", "stale", false)
            ]
        );

        let differ = Roster::of(
            vec![
                row("a", 1, "1.0", "h1"),
                row("b", 1, "1.1", "h2"),
                row("c", 1, "1.0", "h1"),
            ],
            now,
            "a",
        );
        assert_eq!(
            differ.warnings,
            [
                "live replicas run 2 different settings (h1 on a, c; h2 on b): reload or \
                 redeploy them from the same file and environment (config hashes differ)",
                "live replicas run 2 different versions (1.0 on a, c; 1.1 on b): finish the rollout",
            ]
        );
    }

    #[test]
    fn retries_back_off_up_to_one_heartbeat() {
        assert_eq!(retry_after(1), Duration::from_millis(500));
        assert_eq!(retry_after(2), Duration::from_secs(1));
        assert_eq!(retry_after(4), Duration::from_secs(4));
        assert_eq!(retry_after(5), HEARTBEAT);
        assert_eq!(retry_after(100), HEARTBEAT);
    }
}
