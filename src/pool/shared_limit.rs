//! max_db_connections and max_user_connections: server connections counted across every pool
//! to one upstream database (the same hosts and dbname) or signed in as one upstream user.
//!
//! A pool takes a place in each of its two counts before it opens a connection and gives it
//! back once the connection is gone. A pool turned away asks the other pools of the count
//! that is full to close one idle server they do not need, and when a place comes free the
//! pools sharing the count look at their waiting clients again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::Pool;

#[derive(Default)]
pub struct SharedCount {
    /// Server connections (open, opening or closing) of all the pools in `pools`.
    count: AtomicUsize,
    pools: Mutex<Vec<Weak<Pool>>>,
}

impl SharedCount {
    pub(super) fn join(&self, pool: Weak<Pool>) {
        self.lock().push(pool);
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// One place, unless `max` (0: no limit) are taken.
    pub(super) fn try_take(&self, max: usize) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn give_back(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    /// The other pools sharing this count.
    pub(super) fn others(&self, me: &Pool) -> Vec<Arc<Pool>> {
        self.lock()
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), me))
            .collect()
    }

    /// Whether another pool sharing this count has clients it could not open a connection
    /// for.
    pub(super) fn other_starved(&self, me: &Pool) -> bool {
        self.lock()
            .iter()
            .filter_map(Weak::upgrade)
            .any(|p| !std::ptr::eq(Arc::as_ptr(&p), me) && p.starved.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Pool>>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }
}
