//! The long-lived services of a running gateway, registered in one place: each runs until
//! the gateway stops, when it is cancelled and awaited. A service that talks to something
//! that can fail (the database) retries with backoff on its own; none ends the process.

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// The running services.
pub struct Services {
    stop: CancellationToken,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Services {
    /// Starts every service of `state`.
    pub fn start(state: &Arc<AppState>) -> Services {
        let mut services = Services {
            stop: CancellationToken::new(),
            running: Vec::new(),
        };
        services.spawn("sweeper", sweep(Arc::clone(state), services.stop.clone()));
        let jobs_settings = {
            let state = Arc::clone(state);
            move || state.runtime.load().config.jobs.clone()
        };
        services.spawn(
            "jobs",
            crate::jobs::service(
                Arc::clone(&state.jobs),
                state.usage.clone(),
                jobs_settings,
                services.stop.clone(),
            ),
        );
        let heartbeat = crate::replicas::heartbeat(Arc::clone(state), services.stop.clone());
        services.spawn("replica heartbeat", heartbeat);
        let refusals = crate::refusals::flush_every(
            Arc::clone(&state.refusals),
            Arc::clone(&state.store),
            services.stop.clone(),
        );
        services.spawn("refusal counts", refusals);
        services.spawn(
            "notices",
            crate::notices::listen(Arc::clone(state), services.stop.clone()),
        );
        services
    }

    fn spawn(&mut self, name: &'static str, service: impl Future<Output = ()> + Send + 'static) {
        #[expect(
            clippy::disallowed_methods,
            reason = "a service is not request work: it is cancelled and awaited by Services::stop, not by the request tasks' tracker"
        )]
        let handle = tokio::spawn(service);
        self.running.push((name, handle));
    }

    /// Cancels every service and waits for each to end.
    pub async fn stop(self) {
        self.stop.cancel();
        for (name, handle) in self.running {
            if let Err(err) = handle.await {
                tracing::error!(service = name, error = %err, "a service ended abnormally");
            }
        }
    }
}

/// Forgets kept duplicate-protection results past their window, until `stop`: on a timer,
/// so that they go whether or not requests arrive. (Jobs past `jobs.retention` are the
/// `jobs` service's.)
async fn sweep(state: Arc<AppState>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(state.dedupe.sweep_interval()) => {}
        }
        let kept = state.dedupe.sweep();
        if kept > 0 {
            tracing::info!(kept, "forgot kept results past server.duplicate_window");
        }
        let deleted = state.dedupe.sweep_shared().await;
        if deleted > 0 {
            tracing::info!(
                deleted,
                "deleted kept results past server.duplicate_window from the result store"
            );
        }
    }
}
