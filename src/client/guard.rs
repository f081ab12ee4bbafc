//! What stands between the listener and a password check: a cap on connections still
//! logging in, and a limit on failed logins per source address.
//!
//! Both exist so that an attacker cannot use logins to hurt anyone else: stalled or slow
//! logins cannot take the places of logged-in clients, and passwords cannot be guessed at
//! speed from one address (each failure also waits `auth_failure_delay`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window failed logins are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Source addresses tracked at most; beyond it, addresses whose window is over are forgotten
/// first, and new ones are not tracked until there is room (memory stays bounded).
const MAX_TRACKED: usize = 16 * 1024;

#[derive(Default)]
pub struct LoginGuard {
    pending: AtomicUsize,
    failures: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    failures: usize,
}

/// A connection counted as logging in until this is dropped (or [`Pending::done`]).
pub struct Pending<'a>(Option<&'a AtomicUsize>);

impl Pending<'_> {
    /// The login finished (or failed): the place is free for the next one.
    pub fn done(&mut self) {
        if let Some(n) = self.0.take() {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

impl LoginGuard {
    /// Counts a new connection as logging in, or None when `max` are already (0: no cap).
    pub fn begin(&self, max: usize) -> Option<Pending<'_>> {
        let now = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        if max > 0 && now > max {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Pending(Some(&self.pending)))
    }

    /// Connections logging in now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// If `addr` has used up its failed logins (`limit` a window; 0: no limit), how long
    /// until it may try again.
    pub fn blocked(&self, addr: Option<IpAddr>, limit: usize, now: Instant) -> Option<Duration> {
        let addr = addr?;
        if limit == 0 {
            return None;
        }
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let w = map.get(&addr)?;
        let left = (w.started + FAILURE_WINDOW).checked_duration_since(now)?;
        (w.failures >= limit && !left.is_zero()).then_some(left)
    }

    /// Records a failed login from `addr`.
    pub fn failed(&self, addr: Option<IpAddr>, now: Instant) {
        let Some(addr) = addr else { return };
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&addr) {
            map.retain(|_, w| now.duration_since(w.started) < FAILURE_WINDOW);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let w = map.entry(addr).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(w.started) >= FAILURE_WINDOW {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_logins_are_capped_and_freed() {
        let g = LoginGuard::default();
        let a = g.begin(2).expect("first");
        let mut b = g.begin(2).expect("second");
        assert!(g.begin(2).is_none(), "a third is over the cap");
        assert_eq!(g.pending(), 2);
        b.done();
        b.done(); // twice is once
        assert_eq!(g.pending(), 1);
        let _c = g.begin(2).expect("room again");
        drop(a);
        assert_eq!(g.pending(), 1);
        let many: Vec<_> = (0..1000).map(|_| g.begin(0).expect("no cap")).collect();
        assert_eq!(g.pending(), 1001);
        drop(many);
        assert_eq!(g.pending(), 1);
    }

    #[test]
    fn failures_block_one_address_for_the_rest_of_the_window() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        let b: Option<IpAddr> = Some("10.0.0.2".parse().unwrap());
        for _ in 0..2 {
            assert_eq!(g.blocked(a, 3, t0), None);
            g.failed(a, t0);
        }
        g.failed(a, t0 + Duration::from_secs(10));
        let left = g
            .blocked(a, 3, t0 + Duration::from_secs(20))
            .expect("blocked");
        assert_eq!(left, Duration::from_secs(40));
        assert_eq!(
            g.blocked(b, 3, t0),
            None,
            "other addresses are not affected"
        );
        assert_eq!(g.blocked(a, 0, t0), None, "0 disables the limit");
        assert_eq!(g.blocked(None, 3, t0), None, "unix sockets have no address");
        // A new window starts afresh.
        let later = t0 + FAILURE_WINDOW;
        assert_eq!(g.blocked(a, 3, later), None);
        g.failed(a, later);
        assert_eq!(g.blocked(a, 3, later), None);
    }

    #[test]
    fn tracking_is_bounded() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            g.failed(Some(IpAddr::from(i.to_be_bytes())), t0);
        }
        assert_eq!(g.failures.lock().unwrap().len(), MAX_TRACKED);
        // Once their window is over, old addresses make room.
        g.failed(Some("192.0.2.1".parse().unwrap()), t0 + FAILURE_WINDOW);
        assert_eq!(g.failures.lock().unwrap().len(), 1);
    }
}
