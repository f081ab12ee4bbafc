//! New-login rate limit per upstream host, shared by every pool that connects there.
//!
//! AWS advises keeping new IAM logins under 200 per second; a pool refilling after an
//! upstream restart must not stampede. Logins are spaced evenly; callers wait their turn.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct LoginLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl LoginLimiter {
    pub fn new(per_second: u32) -> LoginLimiter {
        LoginLimiter {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this caller's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_logins_evenly() {
        let l = LoginLimiter::new(10);
        let start = Instant::now();
        for _ in 0..5 {
            l.acquire().await;
        }
        // Slots at 0, 100, 200, 300, 400 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }
}
