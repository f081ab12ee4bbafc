//! A logged-in server connection and what iampool knows about its session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Context;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use super::cancel::CancelGate;
use super::params::SessionParams;
use crate::protocol::exchange::Exchange;
use crate::protocol::statements::ServerStatements;
use crate::stream::Stream;

/// A server connection, owned by exactly one place at a time: the pool's idle list, a
/// client's relay, or the task closing it.
pub struct ServerConn {
    pub stream: Stream,
    pub id: u64,
    /// The upstream backend's BackendKeyData, for forwarding cancels.
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// Where cancel requests for this backend go.
    pub cancel_addr: SocketAddr,
    /// The session's parameter values as the server reported them (and unreported ones iampool set).
    pub params: SessionParams,
    pub created_at: Instant,
    /// Retire at this point (server_lifetime + jitter, or reauth_interval if sooner).
    pub retire_at: Instant,
    /// Last time it went idle, for server_idle_timeout.
    pub idle_since: Instant,
    /// Bytes the server sent after its last ReadyForQuery during a login or reset.
    pub leftover: BytesMut,
    /// A replacement has been opened ahead of `retire_at` (make-before-break).
    pub renewing: bool,
    /// Named statements iampool has prepared here (transaction mode).
    pub statements: ServerStatements,
    /// What the server owes the client it is linked to, and its protocol state.
    pub exchange: Exchange,
    /// Cancel requests on their way to this backend: it is not handed to anyone else
    /// until they have been delivered.
    pub cancels: Arc<CancelGate>,
}

impl ServerConn {
    /// True if the server has closed the connection or sent something unsolicited while it
    /// sat idle (e.g. a FATAL from pg_terminate_backend). Polls the socket once, never waits.
    pub fn is_broken(&mut self) -> bool {
        if !self.leftover.is_empty() {
            return true;
        }
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        // Pending is a healthy idle server. EOF, an error or unsolicited data (e.g. the FATAL
        // from pg_terminate_backend) all mean it is not clean.
        std::pin::Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut rb)
            .is_ready()
    }

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.retire_at
    }

    /// When to open this connection's replacement: a tenth of its life (at most a minute)
    /// before it retires, so no client waits on a login when it goes.
    pub fn renew_at(&self) -> Instant {
        let life = self.retire_at.saturating_duration_since(self.created_at);
        self.retire_at - (life / 10).min(std::time::Duration::from_secs(60))
    }
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}
