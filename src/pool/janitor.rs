//! Periodic maintenance of one pool.
//!
//! Every tick: idle connections that the upstream closed (or that sent something
//! unsolicited) are dropped, those past `server_lifetime` (+ jitter) or idle longer than
//! `server_idle_timeout` (above `min_pool_size`) are retired, and the pool is topped up
//! to `min_pool_size`. A connection nearing its retirement gets its replacement opened
//! first when the pool has room (make-before-break), so in steady state no client waits on
//! a login, which for IAM upstreams means signing and a PAM round trip. Clients never see
//! any of it.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{failover_sign, Pool};
use crate::server::conn::IdleCheck;

const TICK: Duration = Duration::from_millis(500);

pub(super) fn spawn(pool: Arc<Pool>) {
    let weak: Weak<Pool> = Arc::downgrade(&pool);
    drop(pool);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = weak.upgrade() else { return };
            if !pool.maintain() {
                return;
            }
        }
    });
}

impl Pool {
    /// One janitor pass. Returns false once the pool is closed.
    pub(super) fn maintain(self: &Arc<Self>) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        let now = Instant::now();
        st.clock = now;
        let idle_timeout = st.settings.idle_timeout;
        let min = st.settings.min_pool_size;
        let mut keep = std::collections::VecDeque::with_capacity(st.idle.len());
        while let Some(mut conn) = st.idle.pop_front() {
            let idle_too_long = !idle_timeout.is_zero()
                && now.duration_since(conn.idle_since) >= idle_timeout
                && st.total > min;
            match conn.check_idle() {
                IdleCheck::Healthy if !conn.expired(now) && !idle_too_long => {}
                IdleCheck::Gone { fatal } => {
                    // Every idle connection (those kept so far included) is closed.
                    if let Some(sign) = failover_sign(fatal.as_ref()) {
                        st.idle.append(&mut keep);
                        self.failover_locked(&mut st, &conn, &sign);
                    }
                    self.forget(&mut st, conn);
                    continue;
                }
                _ => {
                    self.forget(&mut st, conn);
                    continue;
                }
            }
            if !conn.renewing && now >= conn.renew_at() && st.total < st.settings.pool_size {
                conn.renewing = self.spawn_connect(&mut st);
            }
            keep.push_back(conn);
        }
        st.idle = keep;
        // Top up to min_pool_size; while logins fail, one at a time once the backoff ends.
        match st.backoff {
            Some(b) if now < b.until || st.connecting > 0 => {}
            Some(_) if st.total < min && st.total < st.settings.pool_size => {
                self.spawn_connect(&mut st);
            }
            _ => {
                while st.backoff.is_none() && st.total < min && st.total < st.settings.pool_size {
                    if !self.spawn_connect(&mut st) {
                        break;
                    }
                }
            }
        }
        true
    }
}
