//! Cancel requests: iampool's own BackendKeyData per client, and the link from a client to
//! the upstream backend currently running its query.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;
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

/// One client's slot: None while it holds no server. Also what SHOW CLIENTS shows of the
/// client's state: waiting for a server, and pinned to one (kinds of session state, bits
/// over `session_state::KINDS`).
#[derive(Debug, Default)]
pub struct CancelSlot(
    Mutex<Option<CancelTarget>>,
    std::sync::atomic::AtomicBool,
    std::sync::atomic::AtomicU8,
);

impl CancelSlot {
    pub fn link(&self, target: CancelTarget) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
    }
    pub fn unlink(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    /// The backend the client holds right now, if any (admin SHOW CLIENTS / SERVERS).
    pub fn target(&self) -> Option<CancelTarget> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The linked backend, with its gate entered under the same lock that [`Self::unlink`]
    /// takes: once the relay has unlinked a server, either this cancel holds its gate or
    /// it found no target.
    fn enter(&self) -> Option<(CancelTarget, CancelPass)> {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let t = slot.as_ref()?;
        let pass = t.gate.enter();
        Some((t.clone(), pass))
    }

    /// The client is queued for a server (for SHOW CLIENTS).
    pub fn set_waiting(&self, waiting: bool) {
        self.1.store(waiting, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn waiting(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The client keeps its server for these kinds of session state (0: not pinned).
    pub fn set_pinned(&self, kinds: u8) {
        self.2.store(kinds, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn pinned(&self) -> u8 {
        self.2.load(std::sync::atomic::Ordering::Relaxed)
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
