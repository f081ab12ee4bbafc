//! What the admin console sees of each server connection while it exists (SHOW SERVERS),
//! and the one thing it may do to one behind its owner's back: cut its socket (KILL).
//!
//! A connection is listed from its login until it is dropped, wherever it is (idle in its
//! pool, linked to a client, held for a cancel, closing). The pool, which makes every state
//! transition, records the state here; nothing on the relay's path touches the list.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::ServerConn;

/// Where a server connection is, as SHOW SERVERS names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// In the pool, ready for a client.
    Idle,
    /// Handed to a client (linked, or on its way to or from one).
    Active,
    /// Clean, but held out of the pool until a cancel on its way to it has been delivered.
    BeingCanceled,
    /// Being closed: no longer shown.
    Closing,
}

impl ServerState {
    const ALL: [ServerState; 4] = [
        ServerState::Idle,
        ServerState::Active,
        ServerState::BeingCanceled,
        ServerState::Closing,
    ];

    /// PgBouncer's name for the state.
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Idle => "idle",
            ServerState::Active => "active",
            ServerState::BeingCanceled => "being_canceled",
            ServerState::Closing => "closing",
        }
    }
}

const NEVER: u64 = u64::MAX;

/// One server connection as the console sees it.
#[derive(Debug)]
pub struct ServerInfo {
    /// Unique among the process's server connections (SHOW SERVERS' `id`).
    pub id: u64,
    pub backend_pid: i32,
    /// The server's address.
    pub addr: SocketAddr,
    /// iampool's end (None over a unix socket).
    pub local: Option<SocketAddr>,
    /// The TLS session (see [`crate::stream::Stream::tls_description`]); empty without TLS.
    pub tls: String,
    pub connected_at: SystemTime,
    created: Instant,
    fd: RawFd,
    state: AtomicU8,
    /// When it was last handed to a client, in µs after `created` (NEVER: not yet).
    assigned: AtomicU64,
    /// Prepared statements iampool had made on it when it last changed hands.
    prepared: AtomicU64,
    killed: AtomicBool,
}

impl ServerInfo {
    fn new(id: u64, conn: &ServerConn) -> ServerInfo {
        ServerInfo {
            id,
            backend_pid: conn.backend_pid,
            addr: conn.cancel_addr,
            local: conn.stream.local_addr(),
            tls: conn.stream.tls_description(),
            connected_at: SystemTime::now() - conn.created_at.elapsed(),
            created: conn.created_at,
            fd: conn.stream.raw_fd(),
            state: AtomicU8::new(ServerState::Idle as u8),
            assigned: AtomicU64::new(NEVER),
            prepared: AtomicU64::new(0),
            killed: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> ServerState {
        ServerState::ALL[usize::from(self.state.load(Ordering::Relaxed)).min(3)]
    }

    pub fn created(&self) -> Instant {
        self.created
    }

    /// When a client last got it (its login time before any did), to the pool's clock tick.
    pub fn request_time(&self) -> SystemTime {
        match self.assigned.load(Ordering::Relaxed) {
            NEVER => self.connected_at,
            us => self.connected_at + Duration::from_micros(us),
        }
    }

    pub fn prepared_statements(&self) -> u64 {
        self.prepared.load(Ordering::Relaxed)
    }

    /// Cut by an administrator (KILL): its end is no sign of a failover.
    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }
}

/// The server connections of one pool.
#[derive(Debug, Default)]
pub struct ServerList {
    /// Shared by every pool's list, so that an id names one connection of the process.
    ids: Arc<AtomicU64>,
    by_id: Mutex<BTreeMap<u64, Arc<ServerInfo>>>,
}

impl ServerList {
    pub fn new(ids: Arc<AtomicU64>) -> ServerList {
        ServerList {
            ids,
            by_id: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<ServerInfo>>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists `conn` until it is dropped.
    pub fn enter(self: &Arc<Self>, conn: &mut ServerConn) {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ServerInfo::new(id, conn));
        self.lock().insert(info.id, info.clone());
        conn.listing = Some(Listed {
            list: self.clone(),
            info,
        });
    }

    /// The connections now, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<ServerInfo>> {
        self.lock().values().cloned().collect()
    }

    /// Shuts down the socket of every listed connection `pick` chooses (both directions),
    /// so that whoever holds it sees it end at once; returns how many. Each is marked
    /// killed first, so its end is not taken for a failover.
    pub fn cut(&self, pick: impl Fn(&ServerInfo) -> bool) -> usize {
        let list = self.lock();
        let mut n = 0;
        for info in list.values().filter(|i| pick(i)) {
            info.killed.store(true, Ordering::Relaxed);
            // SAFETY: shutdown(2) touches no memory; the only hazard would be a descriptor
            // that was closed and reused by another socket. It cannot be: the entry is
            // removed by `Listed::drop` under this lock, which we hold, and `Listed` is
            // dropped before the stream that owns the descriptor (it is `ServerConn`'s first
            // field), so while the entry is here the descriptor is open and this socket's.
            let rc = unsafe { libc::shutdown(info.fd, libc::SHUT_RDWR) };
            if rc == 0 {
                n += 1;
            }
        }
        n
    }
}

/// Keeps a connection listed while it lives; ends the listing when dropped.
#[derive(Debug)]
pub struct Listed {
    list: Arc<ServerList>,
    pub info: Arc<ServerInfo>,
}

impl Listed {
    /// Records a transition (the pool makes them all). `now` is the pool's clock tick, so no
    /// clock is read per transaction; `prepared` is the connection's statement count.
    pub fn set(&self, state: ServerState, now: Instant, prepared: usize) {
        let i = &self.info;
        i.state.store(state as u8, Ordering::Relaxed);
        i.prepared.store(prepared as u64, Ordering::Relaxed);
        if state == ServerState::Active {
            let us = now.saturating_duration_since(i.created).as_micros();
            i.assigned
                .store(u64::try_from(us).unwrap_or(NEVER - 1), Ordering::Relaxed);
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.list.lock().remove(&self.info.id);
    }
}
