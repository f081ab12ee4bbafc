//! The list of logged-in clients that SHOW CLIENTS and SHOW SERVERS read.
//!
//! A client is entered once at login and removed when its session ends; nothing on the
//! relay's hot path touches this list. Whether a client holds a server, and which one, is
//! read from its cancel slot, which the relay keeps current at every link and unlink; the
//! console asks a session to end (KILL, KILL_CLIENT) through the same slot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::client::cancel::CancelSlot;
use crate::stream::Stream;

/// One end of a connection as SHOW CLIENTS prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// An IP address, or `unix` for a unix socket.
    pub addr: String,
    pub port: u16,
}

impl Endpoint {
    fn from_socket(a: std::io::Result<std::net::SocketAddr>) -> Endpoint {
        match a {
            Ok(a) => Endpoint {
                addr: a.ip().to_string(),
                port: a.port(),
            },
            Err(_) => Endpoint {
                addr: String::new(),
                port: 0,
            },
        }
    }

    fn unix() -> Endpoint {
        Endpoint {
            addr: "unix".into(),
            port: 0,
        }
    }
}

/// What the console shows about one logged-in client.
#[derive(Debug)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub peer: Endpoint,
    pub local: Endpoint,
    /// The TLS session (see [`Stream::tls_description`]); empty without TLS.
    pub tls: String,
    /// The client process over a unix socket, when the kernel tells (0 otherwise).
    pub remote_pid: i32,
    pub connected_at: SystemTime,
    pub application_name: String,
    /// Linked to a server (and which backend) while the relay holds one for this client.
    pub cancel: Arc<CancelSlot>,
}

impl ClientInfo {
    /// Reads the addresses and TLS state from the client's stream.
    pub fn new(
        stream: &Stream,
        user: &str,
        database: &str,
        application_name: &str,
        cancel: Arc<CancelSlot>,
    ) -> ClientInfo {
        let (peer, local, remote_pid) = match stream {
            Stream::Tcp(s) => (
                Endpoint::from_socket(s.peer_addr()),
                Endpoint::from_socket(s.local_addr()),
                0,
            ),
            Stream::TlsServer(s) => {
                let tcp = s.get_ref().0;
                (
                    Endpoint::from_socket(tcp.peer_addr()),
                    Endpoint::from_socket(tcp.local_addr()),
                    0,
                )
            }
            Stream::Unix(s) => {
                let pid = s.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0);
                (Endpoint::unix(), Endpoint::unix(), pid)
            }
            Stream::TlsClient(_) => (Endpoint::unix(), Endpoint::unix(), 0),
        };
        ClientInfo {
            user: user.to_owned(),
            database: database.to_owned(),
            peer,
            local,
            tls: stream.tls_description(),
            remote_pid,
            connected_at: SystemTime::now(),
            application_name: application_name.to_owned(),
            cancel,
        }
    }
}

/// Every logged-in client, by an id that is never reused while iampool runs.
#[derive(Default)]
pub struct ClientRegistry {
    next: AtomicU64,
    clients: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

/// Keeps a client listed while it lives.
pub struct Registered<'a> {
    registry: &'a ClientRegistry,
    pub id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl ClientRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ClientInfo>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, info: ClientInfo) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(id, Arc::new(info));
        Registered { registry: self, id }
    }

    /// The clients now, oldest first.
    pub fn snapshot(&self) -> Vec<(u64, Arc<ClientInfo>)> {
        self.lock().iter().map(|(id, c)| (*id, c.clone())).collect()
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientInfo>> {
        self.lock().get(&id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(user: &str) -> ClientInfo {
        ClientInfo {
            user: user.into(),
            database: "db".into(),
            peer: Endpoint::unix(),
            local: Endpoint::unix(),
            tls: String::new(),
            remote_pid: 0,
            connected_at: SystemTime::now(),
            application_name: String::new(),
            cancel: Arc::default(),
        }
    }

    #[test]
    fn clients_leave_the_list_when_their_session_ends() {
        let r = ClientRegistry::default();
        let a = r.register(info("a"));
        let b = r.register(info("b"));
        assert_ne!(a.id, b.id);
        assert_eq!(r.len(), 2);
        drop(a);
        let left: Vec<_> = r
            .snapshot()
            .into_iter()
            .map(|(_, c)| c.user.clone())
            .collect();
        assert_eq!(left, vec!["b"]);
        drop(b);
        assert!(r.is_empty());
    }
}
