//! A logged-in server connection and what iampool knows about its session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use super::cancel::CancelGate;
use super::listing::{Listed, ServerState};
use super::params::SessionParams;
use crate::protocol::exchange::Exchange;
use crate::protocol::framing::{Header, HEADER_LEN};
use crate::protocol::messages::{backend, parse_error_fields, ErrorFields};
use crate::protocol::statements::ServerStatements;
use crate::stream::Stream;

/// A server connection, owned by exactly one place at a time: the pool's idle list, a
/// client's relay, or the task closing it.
pub struct ServerConn {
    /// What the admin console sees of it (set by the pool at login). It must stay the first
    /// field: it is dropped, ending the listing, before `stream` closes the socket, which is
    /// what lets the console cut a listed socket safely (see `listing::ServerList::cut`).
    pub(crate) listing: Option<Listed>,
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

/// An idle connection, looked at without waiting.
#[derive(Debug)]
pub enum IdleCheck {
    Healthy,
    /// The server closed or reset the connection; `fatal` is the error it said goodbye with.
    Gone {
        fatal: Option<ErrorFields>,
    },
    /// The server sent something unsolicited (a notification, a notice): not clean.
    Unusable,
}

impl ServerConn {
    /// Whether the server has closed the connection or sent something unsolicited while it
    /// sat idle (e.g. the FATAL of a shutdown or of pg_terminate_backend). Polls the socket
    /// once, never waits.
    pub fn check_idle(&mut self) -> IdleCheck {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut bytes = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut rb = ReadBuf::uninit(&mut bytes);
        // Pending is a healthy idle server.
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(&mut cx, &mut rb);
        let unread = match polled {
            _ if !self.leftover.is_empty() => &self.leftover[..],
            Poll::Pending => return IdleCheck::Healthy,
            Poll::Ready(Err(_)) => return IdleCheck::Gone { fatal: None },
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                return IdleCheck::Gone { fatal: None }
            }
            Poll::Ready(Ok(())) => rb.filled(),
        };
        // An idle backend sends an error only as it ends (a shutdown, pg_terminate_backend):
        // FATAL, whether or not all of it has arrived yet.
        if unread.first() != Some(&backend::ERROR_RESPONSE) {
            return IdleCheck::Unusable;
        }
        let end = match Header::parse(unread, usize::MAX) {
            Ok(Some(h)) => unread.len().min(h.frame_len()),
            _ => unread.len(),
        };
        let fields = parse_error_fields(&unread[HEADER_LEN.min(end)..end]);
        IdleCheck::Gone {
            fatal: (!fields.code.is_empty()).then_some(fields),
        }
    }

    /// Records a transition for the admin console (the pool makes them all).
    pub(crate) fn set_state(&self, state: ServerState, now: Instant) {
        if let Some(l) = &self.listing {
            l.set(state, now, self.statements.len());
        }
    }

    /// Cut by an administrator (KILL): its end says nothing about the server.
    pub fn killed(&self) -> bool {
        self.listing.as_ref().is_some_and(|l| l.info.killed())
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
