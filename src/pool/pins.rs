//! The pool's budget of pinned servers: transaction-mode clients that made session state
//! no other server could carry (a temporary table, a session advisory lock, a WITH HOLD
//! cursor, a SQL-level prepared statement, a LISTEN that reached a server) keep their server
//! until the state is gone. Each such client holds one slot; past `max_pinned_servers` the
//! statement that would pin is refused, so pinned clients can never take every server.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct PinLimit {
    pinned: AtomicUsize,
    max: AtomicUsize,
}

impl PinLimit {
    pub fn new(max: usize) -> PinLimit {
        PinLimit {
            pinned: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// Takes a slot if one is free.
    pub fn try_take(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.pinned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn give_back(&self) {
        let _ = self
            .pinned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Servers pinned now.
    pub fn pinned(&self) -> usize {
        self.pinned.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A reload: pins already held stay; new ones count against the new limit.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let l = PinLimit::new(2);
        assert!(l.try_take());
        assert!(l.try_take());
        assert!(!l.try_take());
        assert_eq!(l.pinned(), 2);
        l.give_back();
        assert!(l.try_take());
        l.set_max(1);
        assert!(!l.try_take());
        l.give_back();
        l.give_back();
        l.give_back();
        assert_eq!(l.pinned(), 0);
        let none = PinLimit::new(0);
        assert!(!none.try_take());
    }
}
