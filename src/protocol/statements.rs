//! Prepared statements a server connection holds, and those a pool knows to be valid.
//!
//! Both are keyed by iampool's server-side statement name (`iampool_<hash>`, see
//! `client::prepared`). They live here, below the client side, because server connections
//! and pools own them.

use std::collections::HashMap;

use bytes::Bytes;

/// The statements one server connection has prepared, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<Bytes, u64>,
    tick: u64,
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// True if prepared here; marks it recently used.
    pub fn touch(&mut self, name: &Bytes) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement; returns the least recently used one to close if over `cap`.
    pub fn insert(&mut self, name: Bytes, cap: usize) -> Option<Bytes> {
        self.tick += 1;
        self.used.insert(name.clone(), self.tick);
        if self.used.len() <= cap {
            return None;
        }
        let victim = self
            .used
            .iter()
            .filter(|(n, _)| **n != name)
            .min_by_key(|(_, t)| **t)
            .map(|(n, _)| n.clone())?;
        self.used.remove(&victim);
        Some(victim)
    }

    pub fn remove(&mut self, name: &Bytes) {
        self.used.remove(name);
    }
}

/// Statements that prepared successfully on some server of one pool. A client's lone
/// Parse + Sync of such a statement is answered without a server: pgbench and libpq's
/// `PQprepare` block until it completes, and a client that waits for a server there can
/// deadlock against its own other connections that hold the servers mid-transaction.
#[derive(Debug, Default)]
pub struct KnownStatements(std::sync::Mutex<std::collections::HashSet<Bytes>>);

/// Bounds the registry; past it, it starts over (entries are only an optimisation).
const MAX_KNOWN: usize = 10_000;

impl KnownStatements {
    pub fn contains(&self, global: &Bytes) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(global)
    }

    pub fn learn(&self, global: &Bytes) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() >= MAX_KNOWN {
            set.clear();
        }
        set.insert(global.clone());
    }
}
