//! The listener for what other replicas publish (see `store::Notice`): a changed key is
//! dropped from the key cache, another replica's reload reloads this one's file. One
//! service, cancelled at shutdown; it never stops on a receive error: it subscribes again
//! with backoff, and after every resubscription drops the whole key cache, since what was
//! published while no subscription was open is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;
use crate::store::Notice;

/// The first wait before subscribing again, doubled at each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Exponential backoff between subscriptions; back to the first wait once a subscription
/// has lasted [`MAX_BACKOFF`] (a flapping connection keeps growing it).
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }

    /// The wait before the next try.
    fn wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        wait
    }

    /// A subscription opened at `since` has ended.
    fn ended(&mut self, since: Instant) {
        if since.elapsed() >= MAX_BACKOFF {
            self.next = FIRST_BACKOFF;
        }
    }
}

/// Listens until `stop`.
pub async fn listen(state: Arc<AppState>, stop: CancellationToken) {
    let mut backoff = Backoff::new();
    let mut first = true;
    loop {
        let subscribed = tokio::select! {
            () = stop.cancelled() => return,
            subscribed = state.store.subscribe() => subscribed,
        };
        match subscribed {
            Ok(mut notices) => {
                let since = Instant::now();
                // Whatever changed while no subscription was open was not heard. The first
                // one opens as the gateway starts: what it cached before is moments old (and
                // bounded by the TTL), and dropping it would leave a key that was just
                // checked unserved if the database went away next.
                if !std::mem::take(&mut first) {
                    state.keys.forget_all();
                }
                metrics::counter!("imagegate_notice_subscriptions_total").increment(1);
                tracing::info!("listening for key changes and reloads of other replicas");
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        next = notices.next() => next,
                    };
                    match next {
                        Ok(notice) => receive(&state, notice),
                        Err(err) => {
                            tracing::warn!(%err, "notices lost; subscribing again (every cached key is read again)");
                            break;
                        }
                    }
                }
                backoff.ended(since);
            }
            Err(err) => {
                // Requests are served meanwhile: the subscription that opens later must
                // assume it missed changes, even if it is the first to open.
                first = false;
                tracing::warn!(%err, "cannot subscribe to notices; trying again (cached keys expire by their TTL meanwhile)");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff.wait()) => {}
        }
    }
}

fn receive(state: &AppState, notice: Notice) {
    match notice {
        Notice::Key { id } => {
            state.keys.forget(id);
            tracing::debug!(
                key_id = id,
                "a key changed: its cached principal is dropped"
            );
        }
        Notice::Reload { from } if *from == *state.replica => {}
        Notice::Reload { from } => match state.reload(crate::state::ReloadTrigger::Notice) {
            Ok(runtime) => tracing::info!(
                from = %from,
                config_hash = %runtime.config.hash,
                "configuration reloaded, as another replica asked"
            ),
            Err(err) => tracing::warn!(
                from = %from,
                %err,
                "another replica asked for a reload, and this replica's configuration file was refused: the configuration in force stays"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_starts_over_after_a_lasting_subscription() {
        let mut backoff = Backoff::new();
        let waits: Vec<_> = (0..8).map(|_| backoff.wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.ended(Instant::now());
        assert_eq!(
            backoff.wait(),
            MAX_BACKOFF,
            "a short subscription keeps the backoff"
        );
        backoff.ended(Instant::now() - MAX_BACKOFF);
        assert_eq!(backoff.wait(), FIRST_BACKOFF);
    }
}
