//! Cancel requests: iampool's own BackendKeyData per client, and the link from a client to
//! the upstream backend currently running its query (which the admin console reads too,
//! along with the client's request to end).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::Notify;
use tracing::debug;

use crate::server::{CancelGate, CancelPass};

/// Where a client's query is running right now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// Holds the backend out of the pool while a cancel for it is on its way.
    pub gate: Arc<CancelGate>,
}

/// Why a session is asked to end, and what its client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// iampool is shutting down.
    Shutdown,
    /// Admin KILL of the client's database.
    Kill,
    /// Admin KILL_CLIENT of this client.
    KillClient,
}

impl Ending {
    /// The FATAL's message (SQLSTATE 57P01 in every case).
    pub fn message(self) -> &'static str {
        match self {
            Ending::Shutdown => {
                "terminating connection due to administrator command (iampool is shutting down)"
            }
            Ending::Kill => "terminating connection due to administrator command (KILL)",
            Ending::KillClient => {
                "terminating connection due to administrator command (KILL_CLIENT)"
            }
        }
    }
}

/// One client's slot, shared by its session and the admin console: the backend running its
/// query (None while it holds no server), whether it waits for one or is pinned to one
/// (kinds of session state, bits over `session_state::KINDS`), and the request to end.
#[derive(Debug)]
pub struct CancelSlot {
    target: Mutex<Option<CancelTarget>>,
    waiting: AtomicBool,
    pinned: AtomicU8,
    /// When the client last asked for a server, in µs since the Unix epoch (0: never).
    requested: AtomicU64,
    ending: OnceLock<Ending>,
    /// Wakes the session when it is asked to end (inline: no allocation per client).
    end: Notify,
}

impl Default for CancelSlot {
    fn default() -> Self {
        CancelSlot {
            target: Mutex::default(),
            waiting: AtomicBool::new(false),
            pinned: AtomicU8::new(0),
            requested: AtomicU64::new(0),
            ending: OnceLock::new(),
            end: Notify::new(),
        }
    }
}

impl CancelSlot {
    fn lock(&self) -> MutexGuard<'_, Option<CancelTarget>> {
        self.target.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn link(&self, target: CancelTarget) {
        *self.lock() = Some(target);
    }
    pub fn unlink(&self) {
        *self.lock() = None;
    }
    /// The backend the client holds right now, if any (admin SHOW CLIENTS / SERVERS).
    pub fn target(&self) -> Option<CancelTarget> {
        self.lock().clone()
    }

    /// Runs `f` on the backend the client holds, under the lock [`Self::unlink`] takes: the
    /// server cannot leave the client (and reach another) while `f` runs (admin KILL_CLIENT).
    pub fn with_target<R>(&self, f: impl FnOnce(Option<&CancelTarget>) -> R) -> R {
        f(self.lock().as_ref())
    }

    /// The linked backend, with its gate entered under the same lock that [`Self::unlink`]
    /// takes: once the relay has unlinked a server, either this cancel holds its gate or
    /// it found no target.
    fn enter(&self) -> Option<(CancelTarget, CancelPass)> {
        let slot = self.lock();
        let t = slot.as_ref()?;
        let pass = t.gate.enter();
        Some((t.clone(), pass))
    }

    /// The client is queued for a server (for SHOW CLIENTS); the start of a wait is the
    /// client's latest request.
    pub fn set_waiting(&self, waiting: bool) {
        if waiting {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            self.requested.store(now, Ordering::Relaxed);
        }
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// When the client last asked for a server, if it has.
    pub fn requested_at(&self) -> Option<SystemTime> {
        match self.requested.load(Ordering::Relaxed) {
            0 => None,
            us => Some(SystemTime::UNIX_EPOCH + Duration::from_micros(us)),
        }
    }

    /// Asks the session to end (the first reason given is the one its client is told).
    pub fn end(&self, why: Ending) {
        let _ = self.ending.set(why);
        self.end.notify_waiters();
    }

    /// Why the session was asked to end, if it was.
    pub fn ending(&self) -> Option<Ending> {
        self.ending.get().copied()
    }

    /// Resolves once the session is asked to end (at once if it already was). iampool's
    /// shutdown reaches sessions on its own signal, not through here.
    pub async fn ended(&self) {
        loop {
            let woken = self.end.notified();
            tokio::pin!(woken);
            // Registered before the check, so an `end` in between is not missed.
            woken.as_mut().enable();
            if self.ending.get().is_some() {
                return;
            }
            woken.await;
        }
    }

    /// The client keeps its server for these kinds of session state (0: not pinned).
    pub fn set_pinned(&self, kinds: u8) {
        self.pinned.store(kinds, Ordering::Relaxed);
    }

    pub fn pinned(&self) -> u8 {
        self.pinned.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// Removes the client's key when its session ends.
pub struct Registration<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Issues a unique (pid, secret) for a new client.
    pub fn register(&self) -> Registration<'_> {
        let mut rng = rand::thread_rng();
        let slot = Arc::new(CancelSlot::default());
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rng.gen_range(1..i32::MAX);
            if map.contains_key(&pid) {
                continue;
            }
            let secret = rng.gen::<i32>();
            map.insert(pid, (secret, slot.clone()));
            return Registration {
                registry: self,
                pid,
                secret,
                slot,
            };
        }
    }

    /// Forwards a client's CancelRequest to the backend running its query, if any.
    /// A wrong key or an unlinked client is dropped silently, as PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let slot = {
            let map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&pid) {
                Some((s, slot)) if *s == secret => Some(slot.clone()),
                _ => None,
            }
        };
        let Some((t, pass)) = slot.and_then(|s| s.enter()) else {
            debug!("cancel request for an unknown or idle client dropped");
            return;
        };
        let ok = crate::server::cancel::send_cancel(t.addr, t.pid, t.secret).await;
        drop(pass);
        debug!(backend_pid = t.pid, ok, "cancel forwarded");
    }
}
