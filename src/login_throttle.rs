//! Failed dashboard logins per client address: after [`MAX_FAILURES`] within [`WINDOW`]
//! from one address, its login attempts are refused until the oldest of them leaves the
//! window. Kept in this process (each replica counts its own): see [`LoginThrottle`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logins one address may make within [`WINDOW`]; the next attempt is refused.
pub const MAX_FAILURES: usize = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked before those with no failure left in the window are dropped.
const PRUNE_AT: usize = 4096;

/// The failed logins of the last [`WINDOW`], by client address.
///
/// In memory, per replica, not in the database: the admin token it guards has at least 128
/// bits (`MIN_ADMIN_TOKEN_CHARS`), so the throttle is not what keeps it from being guessed
/// (10 guesses a minute per replica are as hopeless as 350 a second); it keeps a flood of
/// guesses from costing hashes and log lines, which each replica can do for itself. In the
/// database, every failed login from anyone on the internet would be a write there.
#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl LoginThrottle {
    /// None when `addr` may try to log in at `now`; else how long it must wait.
    pub fn refused(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let recent = failures.get(&bucket(addr))?;
        if recent.len() < MAX_FAILURES {
            return None;
        }
        let oldest = recent.front()?;
        let free_at = *oldest + WINDOW;
        (free_at > now).then(|| free_at - now)
    }

    /// Counts a failed login from `addr` at `now`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= PRUNE_AT {
            failures.retain(|_, recent| recent.back().is_some_and(|last| *last + WINDOW > now));
        }
        let recent = failures.entry(bucket(addr)).or_default();
        while recent.front().is_some_and(|first| *first + WINDOW <= now) {
            recent.pop_front();
        }
        // Only the last MAX_FAILURES matter: the oldest of them says when the next try may come.
        if recent.len() == MAX_FAILURES {
            recent.pop_front();
        }
        recent.push_back(now);
    }

    /// A login from `addr` succeeded: its count starts again.
    pub fn succeeded(&self, addr: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&bucket(addr));
    }
}

/// What one client is counted as: its IPv4 address, or the /64 of its IPv6 address (the
/// least a host is given, so that one host cannot spread its guesses over 2^64 addresses).
fn bucket(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn the_eleventh_try_within_a_minute_waits_for_the_oldest_failure_to_age_out() {
        let throttle = LoginThrottle::default();
        let start = Instant::now();
        let one = ip("192.0.2.1");
        for i in 0..MAX_FAILURES as u64 {
            let at = start + Duration::from_secs(i);
            assert_eq!(throttle.refused(one, at), None, "try {}", i + 1);
            throttle.failed(one, at);
        }
        let at = start + Duration::from_secs(20);
        assert_eq!(throttle.refused(one, at), Some(Duration::from_secs(40)));
        assert_eq!(
            throttle.refused(ip("192.0.2.2"), at),
            None,
            "another address"
        );
        // The first failure leaves the window: one more try, and a failure closes it again.
        let later = start + WINDOW;
        assert_eq!(throttle.refused(one, later), None);
        throttle.failed(one, later);
        assert_eq!(
            throttle.refused(one, later),
            Some(Duration::from_secs(1)),
            "the next oldest failure, made a second after the first"
        );
        throttle.succeeded(one);
        assert_eq!(throttle.refused(one, later), None, "a success starts again");
    }

    #[test]
    fn failures_spread_over_more_than_a_minute_are_never_refused() {
        let throttle = LoginThrottle::default();
        let start = Instant::now();
        let one = ip("192.0.2.1");
        for i in 0..100u64 {
            let at = start + Duration::from_secs(7 * i);
            assert_eq!(throttle.refused(one, at), None, "failure {i}");
            throttle.failed(one, at);
        }
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64_and_a_mapped_ipv4_as_itself() {
        assert_eq!(bucket(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(bucket(ip("2001:db8:1:2:ffff::9")), ip("2001:db8:1:2::"));
        assert_eq!(bucket(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..MAX_FAILURES {
            throttle.failed(ip(&format!("2001:db8:1:2::{i:x}")), now);
        }
        assert!(throttle.refused(ip("2001:db8:1:2::ffff"), now).is_some());
        assert!(throttle.refused(ip("2001:db8:1:3::1"), now).is_none());
    }

    #[test]
    fn addresses_without_a_recent_failure_are_dropped_once_many_are_tracked() {
        let throttle = LoginThrottle::default();
        let start = Instant::now();
        for i in 0..PRUNE_AT as u32 {
            throttle.failed(IpAddr::V4(i.into()), start);
        }
        throttle.failed(ip("192.0.2.1"), start + WINDOW);
        let tracked = throttle.failures.lock().expect("lock").len();
        assert_eq!(tracked, 1);
    }
}
