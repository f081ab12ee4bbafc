//! Cancel requests: iampool's own BackendKeyData per client, and the link from a client to
//! the upstream backend currently running its query.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::protocol::framing::CANCEL_REQUEST;

/// Where a client's query is running right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// One client's slot: None while it holds no server.
#[derive(Debug, Default)]
pub struct CancelSlot(Mutex<Option<CancelTarget>>, std::sync::atomic::AtomicBool);

impl CancelSlot {
    pub fn link(&self, target: CancelTarget) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
    }
    pub fn unlink(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    fn get(&self) -> Option<CancelTarget> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The backend the client holds right now, if any (admin SHOW CLIENTS / SERVERS).
    pub fn target(&self) -> Option<CancelTarget> {
        self.get()
    }

    /// The client is queued for a server (for SHOW CLIENTS).
    pub fn set_waiting(&self, waiting: bool) {
        self.1.store(waiting, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn waiting(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
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
        let target = {
            let map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&pid) {
                Some((s, slot)) if *s == secret => slot.get(),
                _ => None,
            }
        };
        let Some(t) = target else {
            debug!("cancel request for an unknown or idle client dropped");
            return;
        };
        let mut pkt = [0u8; 16];
        pkt[..4].copy_from_slice(&16i32.to_be_bytes());
        pkt[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
        pkt[8..12].copy_from_slice(&t.pid.to_be_bytes());
        pkt[12..].copy_from_slice(&t.secret.to_be_bytes());
        let sent = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = TcpStream::connect(t.addr).await?;
            s.write_all(&pkt).await?;
            s.shutdown().await
        })
        .await;
        debug!(
            backend_pid = t.pid,
            ok = matches!(sent, Ok(Ok(()))),
            "cancel forwarded"
        );
    }
}
