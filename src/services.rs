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

/// Deletes finished jobs past `jobs.retention` (read at each round: a reload changes it)
/// and kept duplicate-protection results past their window, until `stop`: on a timer, so
/// that they go whether or not requests arrive.
async fn sweep(state: Arc<AppState>, stop: CancellationToken) {
    let mut jobs_due = tokio::time::Instant::now();
    loop {
        let retention = state.runtime.load().config.jobs.retention;
        let every = (state.dedupe.sweep_interval()).min(crate::jobs::sweep_interval(retention));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let kept = state.dedupe.sweep();
        if kept > 0 {
            tracing::info!(kept, "forgot kept results past server.duplicate_window");
        }
        if tokio::time::Instant::now() < jobs_due {
            continue;
        }
        jobs_due = tokio::time::Instant::now() + crate::jobs::sweep_interval(retention);
        let jobs = Arc::clone(&state.jobs);
        let swept = tokio::task::spawn_blocking(move || jobs.sweep(retention)).await;
        if let Ok(swept @ 1..) = swept {
            tracing::info!(swept, "deleted async jobs past jobs.retention");
        }
    }
}
