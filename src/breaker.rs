//! One circuit breaker per provider: after a run of failures the provider is skipped for a
//! cooldown, then one request probes it. State outlives configuration reloads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

#[derive(Debug, Default)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    /// A probe is out after the cooldown; others wait for its outcome.
    probing: bool,
}

/// What `/readyz` and the metrics show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Default)]
pub struct Breakers {
    states: Mutex<HashMap<String, State>>,
}

impl Breakers {
    /// Whether a request may go to `provider` now. Past the cooldown, one request is let
    /// through as a probe.
    pub fn admit(&self, provider: &str) -> Result<(), Duration> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = states.get_mut(provider) else {
            return Ok(());
        };
        match state.open_until {
            None => Ok(()),
            Some(until) => {
                let now = Instant::now();
                if now < until {
                    Err(until - now)
                } else if state.probing {
                    Err(Duration::from_secs(1))
                } else {
                    state.probing = true;
                    Ok(())
                }
            }
        }
    }

    pub fn success(&self, provider: &str) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = states.remove(provider) {
            if state.open_until.is_some() {
                tracing::info!(provider, "circuit closed: the provider answers again");
                metrics::gauge!("imagegate_provider_circuit_open", "provider" => provider.to_owned()).set(0.0);
            }
        }
    }

    pub fn failure(&self, provider: &str, config: BreakerConfig) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states.entry(provider.to_owned()).or_default();
        state.failures += 1;
        let reopen = state.probing;
        state.probing = false;
        if reopen || state.failures >= config.failures {
            if state.open_until.is_none() || reopen {
                tracing::warn!(
                    provider,
                    failures = state.failures,
                    cooldown_secs = config.cooldown.as_secs(),
                    "circuit open: skipping the provider"
                );
            }
            state.open_until = Some(Instant::now() + config.cooldown);
            metrics::gauge!("imagegate_provider_circuit_open", "provider" => provider.to_owned())
                .set(1.0);
        }
    }

    /// A probe that ended without telling (the request went away): let another one try.
    pub fn release_probe(&self, provider: &str) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = states.get_mut(provider) {
            state.probing = false;
        }
    }

    /// Drops the state of providers the configuration no longer names: one added back later
    /// starts closed, as its `imagegate_provider_circuit_open` series (removed with it) does.
    pub fn keep_only(&self, named: impl Fn(&str) -> bool) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.retain(|provider, _| named(provider));
    }

    pub fn state(&self, provider: &str) -> BreakerState {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        match states.get(provider).and_then(|s| s.open_until) {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BreakerConfig = BreakerConfig {
        failures: 2,
        cooldown: Duration::from_millis(50),
    };

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let b = Breakers::default();
        b.failure("p", CONFIG);
        assert!(b.admit("p").is_ok(), "one failure is not enough");
        b.success("p");
        b.failure("p", CONFIG);
        assert!(b.admit("p").is_ok(), "success reset the count");
        b.failure("p", CONFIG);
        assert_eq!(b.state("p"), BreakerState::Open);
        assert!(b.admit("p").is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state("p"), BreakerState::HalfOpen);
        assert!(b.admit("p").is_ok(), "the probe");
        assert!(b.admit("p").is_err(), "only one probe at a time");
        b.failure("p", CONFIG);
        assert_eq!(b.state("p"), BreakerState::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.admit("p").is_ok());
        b.success("p");
        assert_eq!(b.state("p"), BreakerState::Closed);
        assert!(b.admit("p").is_ok() && b.admit("p").is_ok());
    }

    #[test]
    fn a_provider_no_longer_named_is_forgotten_and_comes_back_closed() {
        let b = Breakers::default();
        for provider in ["kept", "gone"] {
            b.failure(provider, CONFIG);
            b.failure(provider, CONFIG);
        }
        b.keep_only(|provider| provider == "kept");
        assert_eq!(b.state("kept"), BreakerState::Open);
        assert_eq!(b.state("gone"), BreakerState::Closed);
        assert!(b.admit("gone").is_ok());
    }
}
