//! The session relay: one client's life after login.
//!
//! This file is the lifecycle: wait for a request, link a server, pump until the server may
//! leave, unlink, and settle a server the session still holds when it ends. The protocol
//! decisions are in [`super::scan`] (no I/O) and the per-direction buffers in
//! [`super::half`]; whether a server is clean is the server's own [`Exchange`] to say.
//!
//! While a server is linked, both directions are driven from one task with `poll_fn`, so a
//! server that is blocked writing results can never deadlock against a client that is
//! blocked writing a large pipeline: each side is read as long as its buffer has room.
//!
//! [`Exchange`]: crate::protocol::exchange::Exchange

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_util::io::poll_read_buf;
use tracing::debug;

use super::cancel::{CancelSlot, CancelTarget};
use super::half::HIGH_WATER;
use super::orphan::{Loss, Next, Orphan};
use super::prepared::{names_statement, Tracker};
use super::scan::{Scan, ServerSide, Stop};
use crate::config::PoolMode;
use crate::pool::listen::Subscription;
use crate::pool::{Pool, PoolError, Server};
use crate::protocol::exchange::Disposition;
use crate::protocol::framing::{Header, HEADER_LEN};
use crate::protocol::messages::{self, backend, frontend, sqlstate, Severity, TxStatus};
use crate::protocol::session_state;
use crate::server::params::SessionParams;
use crate::server::session::SessionError;
use crate::server::ServerConn;
use crate::stream::Stream;

/// A client that leaves while its server is still answering: how long the answers may take
/// before the backend's query is cancelled (a COMMIT sent just before leaving completes).
const SETTLE_GRACE: Duration = Duration::from_secs(2);

/// Servers tried for one request when each is lost while its parameters are applied.
const LINK_ATTEMPTS: u32 = 3;

/// Why the linked phase stopped.
#[derive(Debug)]
enum Wake {
    /// Transaction mode: the server is at rest and leaves the client.
    Released,
    /// The client closed, sent Terminate, or failed; everything it sent has been passed on.
    ClientGone,
    ServerGone(Option<io::Error>),
    ClientProtocol(String),
    ServerProtocol(String),
    IdleInTransaction,
    /// A request went unanswered for query_timeout.
    QueryTimeout(Duration),
    Shutdown,
    /// A pinned client's server could not say what session state is left on it.
    ProbeFailed(String),
}

/// How the session ended (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientGone,
    ServerGone,
    ProtocolError,
    Timeout,
    Shutdown,
    PoolError,
}

pub struct Session {
    /// The pool of the server linked now (or last): `home`, or `readers` for a transaction
    /// that declared itself read-only.
    pool: Arc<Pool>,
    /// The pool of the client's own database.
    home: Arc<Pool>,
    /// Transaction mode: the pool for transactions that declare themselves read-only.
    readers: Option<Arc<Pool>>,
    /// The client's startup set default_transaction_read_only = on: every transaction of
    /// it is read-only.
    read_only_client: bool,
    mode: PoolMode,
    client: Stream,
    /// The protocol state of both directions.
    scan: Scan,
    server: Option<Server>,
    linked_at: Instant,
    /// When the request now in flight started (for the query duration histogram); the
    /// first request of a transaction starts when the server is linked.
    request_started: Option<Instant>,
    /// When the server last reported ReadyForQuery: the end of the transaction at unlink,
    /// so that no clock is read for it.
    last_ready: Option<Instant>,
    /// Kinds of session state already reported for this client (bit per kind).
    session_state_seen: u8,
    cancel: Arc<CancelSlot>,
    /// The client will send nothing more (EOF or Terminate).
    client_done: bool,
    idle_tx_timeout: Option<Duration>,
    /// Made the first time a transaction sits idle (most sessions never need one).
    idle_timer: Option<Pin<Box<Sleep>>>,
    idle_armed: bool,
    query_timeout: Option<Duration>,
    /// Made the first time a request is outstanding with query_timeout set; re-armed for
    /// each request (at every ReadyForQuery).
    query_timer: Option<Pin<Box<Sleep>>>,
    query_armed: bool,
    client_idle_timeout: Option<Duration>,
    server_reset_query: String,
    shutdown: watch::Receiver<bool>,
    /// Resolves once iampool starts shutting down; polled only until it does.
    shutdown_signal: Pin<Box<dyn Future<Output = ()> + Send>>,
    shutdown_seen: bool,
    /// Transaction mode: what the client is still owed after its server was lost.
    orphan: Option<Orphan>,
    /// Transaction mode: the channels the client listens on through the pool's listening
    /// connection (made at its first LISTEN).
    notifications: Option<Subscription>,
}

pub struct SessionArgs {
    pub pool: Arc<Pool>,
    pub readers: Option<Arc<Pool>>,
    pub client: Stream,
    /// Bytes the client sent after its startup packet, already read.
    pub leftover: BytesMut,
    pub params: SessionParams,
    pub cancel: Arc<CancelSlot>,
    pub max_message: usize,
    pub max_prepared_statements: usize,
    pub idle_tx_timeout: Option<Duration>,
    pub query_timeout: Option<Duration>,
    pub client_idle_timeout: Option<Duration>,
    pub server_reset_query: String,
    pub shutdown: watch::Receiver<bool>,
}

/// The scanner's view of a linked server.
fn side(server: &mut ServerConn) -> ServerSide<'_> {
    ServerSide {
        x: &mut server.exchange,
        statements: &mut server.statements,
        params: &mut server.params,
    }
}

impl Session {
    pub fn new(a: SessionArgs) -> Session {
        let mode = a.pool.mode();
        let transaction_mode = mode == PoolMode::Transaction;
        // Session mode keeps one server per client: names need no rewriting there.
        let tracker = Tracker::new(
            if transaction_mode {
                a.max_prepared_statements
            } else {
                0
            },
            a.pool.statements.clone(),
        );
        let readers = a.readers.filter(|_| transaction_mode);
        let read_only_client = a.params.startup_read_only();
        let mut scan = Scan::new(
            a.leftover,
            tracker,
            a.params,
            a.max_message,
            transaction_mode,
        );
        scan.pin = super::pin::Pin::new(a.pool.pinning());
        Session {
            read_only_client,
            home: a.pool.clone(),
            readers,
            scan,
            pool: a.pool,
            mode,
            client: a.client,
            server: None,
            linked_at: Instant::now(),
            request_started: None,
            last_ready: None,
            session_state_seen: 0,
            cancel: a.cancel.clone(),
            client_done: false,
            idle_tx_timeout: a.idle_tx_timeout,
            idle_timer: None,
            idle_armed: false,
            query_timeout: a.query_timeout,
            query_timer: None,
            query_armed: false,
            client_idle_timeout: a.client_idle_timeout,
            server_reset_query: a.server_reset_query,
            shutdown_signal: {
                let mut rx = a.shutdown.clone();
                let slot = a.cancel.clone();
                // iampool's shutdown, or the admin console ending this session (KILL).
                Box::pin(async move {
                    tokio::select! {
                        _ = wait_for_shutdown(&mut rx) => {}
                        _ = slot.ended() => {}
                    }
                })
            },
            shutdown: a.shutdown,
            shutdown_seen: false,
            orphan: None,
            notifications: None,
        }
    }

    /// Runs the session to its end and settles the server it may hold.
    pub async fn run(mut self) -> End {
        let end = self.run_inner().await;
        if self.server.is_some() {
            let server = self.unlink();
            self.settle_server(server).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.shutdown()).await;
        end
    }

    async fn run_inner(&mut self) -> End {
        'requests: loop {
            // Unlinked: hand the client what the last server sent, then wait for its next request.
            if let Err(e) = self.flush_to_client().await {
                debug!(error = %e, "client write failed");
                return End::ClientGone;
            }
            if let Some(end) = self.wait_for_request().await {
                return end;
            }
            if let Some(orphan) = self.orphan.as_mut() {
                let out = super::prepared::Staging::staged(&mut self.scan.s);
                match orphan.answer(&mut self.scan.c.buf, self.scan.max_message, out) {
                    Err(m) => return self.fatal_protocol(&m).await,
                    Ok(Next::Answered) => {
                        if orphan.done() {
                            self.orphan = None;
                        }
                        continue;
                    }
                    Ok(Next::NeedServer) => {}
                }
            }

            if self.answer_prepare_locally() {
                continue;
            }
            if self.orphan.is_none() && self.answer_listen_locally().await {
                continue;
            }

            // The client has a request: link a server, then look at what it sent (names are
            // rewritten against the statements this particular server has).
            // A server lost while its parameters are brought in line has seen nothing of the
            // client's request, so another one is tried (a few times, then the client is told).
            let mut lost = 0;
            if let Some(readers) = &self.readers {
                let read_only = self.read_only_client || self.declares_read_only();
                let pool = if read_only { readers } else { &self.home };
                if !Arc::ptr_eq(pool, &self.pool) {
                    self.pool = pool.clone();
                }
            }
            loop {
                self.cancel.set_waiting(true);
                let checkout = self.pool.checkout().await;
                self.cancel.set_waiting(false);
                let server = match checkout {
                    Ok(s) => s,
                    Err(e) => match self.pool_error(e).await {
                        Some(end) => return end,
                        None => continue 'requests,
                    },
                };
                match self.link(server).await {
                    Ok(()) => break,
                    Err(None) if lost + 1 < LINK_ATTEMPTS => lost += 1,
                    Err(None) => {
                        self.send_fatal(
                            sqlstate::CONNECTION_FAILURE,
                            "server connection failed while applying session parameters",
                        )
                        .await;
                        return End::ServerGone;
                    }
                    Err(Some(end)) => return end,
                }
            }
            if let Some(w) = self.scan_client() {
                match w {
                    Wake::ClientGone => {}
                    Wake::ClientProtocol(m) => return self.fatal_protocol(&m).await,
                    other => unreachable!("client scan woke with {other:?}"),
                }
            }

            let wake = loop {
                let wake = poll_fn(|cx| self.poll_linked(cx)).await;
                // A pinned client's server leaves it only once nothing is left on it.
                if matches!(wake, Wake::Released) && self.scan.pin.probe_due() {
                    match self.probe_pin().await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => break Wake::ProbeFailed(e.to_string()),
                    }
                }
                break wake;
            };
            match wake {
                Wake::Released => {
                    let server = self.unlink();
                    tracing::trace!(backend_pid = server.backend_pid, "server released");
                    self.release(server);
                    if *self.shutdown.borrow() || self.cancel.ending().is_some() {
                        return self.shut_down().await;
                    }
                }
                // Session mode: shutting down and the session is between transactions.
                Wake::Shutdown => return self.shut_down().await,
                Wake::ClientGone => return End::ClientGone,
                Wake::ServerGone(_) | Wake::QueryTimeout(_) => {
                    let timed_out = match &wake {
                        Wake::QueryTimeout(limit) => Some(*limit),
                        _ => None,
                    };
                    let err = match wake {
                        Wake::ServerGone(err) => err,
                        _ => None,
                    };
                    let mut server = self.unlink();
                    match timed_out {
                        Some(_) => debug!(
                            backend_pid = server.backend_pid,
                            "query_timeout: closing the server of a request that ran too long"
                        ),
                        None => {
                            debug!(backend_pid = server.backend_pid, error = ?err, "server connection lost while linked")
                        }
                    }
                    let x = &server.exchange;
                    let loss = Loss {
                        owed: x.readies_owed(),
                        unsynced: x.unsynced(),
                        in_block: match self.scan.block_change {
                            Some(open) => open,
                            None => x.status() != TxStatus::Idle,
                        },
                    };
                    let in_copy = x.in_copy();
                    let fatal = self.scan.server_fatal.take();
                    // A pinned client's session state went with the server: it is told, as a
                    // session-mode client would be.
                    let pinned = self.scan.pin.pinned();
                    self.set_unpinned();
                    if timed_out.is_some() {
                        // Still working: the pool cancels its query as it closes it.
                        self.pool.discard(server);
                    } else {
                        // Nothing is owed by a server that is gone: nothing to cancel.
                        server.exchange.reset();
                        self.pool.lost(server, fatal.as_ref());
                    }
                    let timeout_reason = timed_out.map(|limit| {
                        format!(
                            "query_timeout: the request ran longer than {}, so iampool \
                             closed its server connection",
                            humantime(limit)
                        )
                    });
                    let _ = self.flush_to_client().await;
                    // Transaction mode: the client keeps its connection if both directions
                    // are between messages (what it sent in full went to the lost server).
                    if self.mode == PoolMode::Transaction
                        && !pinned
                        && !in_copy
                        && self.scan.s.scan.at_boundary()
                        && self.scan.c.scan.at_boundary()
                    {
                        self.scan.c.discard_ready();
                        let reason = match (&timeout_reason, &fatal, &err) {
                            (Some(t), _, _) => t.clone(),
                            (None, Some(f), _) => format!("{} [{}]", f.message, f.code),
                            (None, None, Some(e)) => e.to_string(),
                            (None, None, None) => "the server closed the connection".to_owned(),
                        };
                        let code = match timed_out {
                            Some(_) => sqlstate::QUERY_CANCELED,
                            None => sqlstate::CONNECTION_FAILURE,
                        };
                        let out = super::prepared::Staging::staged(&mut self.scan.s);
                        self.orphan = Orphan::on_loss(out, loss, code, &reason);
                        continue;
                    }
                    if let Some(reason) = &timeout_reason {
                        // Session mode, or a reply cut mid-message: the client goes too, as
                        // with PgBouncer (a half-sent message only closes the connection).
                        if self.scan.s.scan.at_boundary() {
                            self.send_fatal(sqlstate::QUERY_CANCELED, reason).await;
                        }
                        return End::Timeout;
                    }
                    if let Some(f) = fatal.as_ref().filter(|_| self.scan.transaction_mode) {
                        // Held back for an ERROR that cannot be sent now: the FATAL after all.
                        self.send_fatal(&f.code, &f.message).await;
                        return End::ServerGone;
                    }
                    // The server may have died in the middle of a message (a DataRow, a
                    // CopyData), part of which the client already has: bytes sent after it
                    // would be read as the rest of that message, so then the connection
                    // only closes, and the client sees the truncation.
                    if fatal.is_none() && self.scan.s.scan.at_boundary() {
                        self.send_fatal(
                            sqlstate::CONNECTION_FAILURE,
                            "server closed the connection unexpectedly",
                        )
                        .await;
                    }
                    return End::ServerGone;
                }
                Wake::ClientProtocol(m) => return self.fatal_protocol(&m).await,
                Wake::ServerProtocol(m) => {
                    let server = self.unlink();
                    self.pool.discard(server);
                    self.send_fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!("server protocol error: {m}"),
                    )
                    .await;
                    return End::ProtocolError;
                }
                Wake::ProbeFailed(why) => {
                    // The server is not known to be gone (a failover sign), only unusable.
                    let server = self.unlink();
                    self.set_unpinned();
                    self.pool.discard(server);
                    self.send_fatal(
                        sqlstate::CONNECTION_FAILURE,
                        &format!(
                            "terminating connection: iampool could not ask the server what \
                             session state this client has left on it ({why})"
                        ),
                    )
                    .await;
                    return End::ServerGone;
                }
                Wake::IdleInTransaction => {
                    self.send_fatal(
                        sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                        "terminating connection due to idle-in-transaction timeout",
                    )
                    .await;
                    let server = self.unlink();
                    self.pool.discard(server);
                    return End::Timeout;
                }
            }
        }
    }

    /// Unlinked: waits until the client has sent at least a message header (the whole
    /// message when an orphaned client's next message is to be answered here). `Some` when
    /// the session ends instead.
    async fn wait_for_request(&mut self) -> Option<End> {
        let whole = self.orphan.as_ref().is_some_and(Orphan::wants_whole);
        // client_idle_timeout counts from the end of the client's last request.
        let idle_deadline = self
            .client_idle_timeout
            .map(|limit| (tokio::time::Instant::now() + limit, limit));
        loop {
            if let Some(end) = self.notifications_lost().await {
                return Some(end);
            }
            match Header::parse(&self.scan.c.buf, self.scan.max_message) {
                Err(e) => return Some(self.fatal_protocol(&e.to_string()).await),
                Ok(Some(h)) if h.tag == frontend::TERMINATE => return Some(End::ClientGone),
                // A short Query is read whole before a server is taken for it (it may be a
                // LISTEN, answered here).
                Ok(Some(h))
                    if !(whole || h.tag == frontend::QUERY && h.frame_len() <= LISTEN_MAX)
                        || self.scan.c.buf.len() >= h.frame_len() =>
                {
                    return None
                }
                Ok(Some(_)) => {}
                Ok(None) => {}
            }
            if self.client_done {
                return Some(End::ClientGone);
            }
            if self.shutdown_seen {
                return Some(self.shut_down().await);
            }
            if self.scan.c.buf.is_empty() {
                // Between requests: hold no buffer while waiting for the next one.
                self.scan.c.release_buffers();
                self.scan.s.release_buffers();
                tokio::select! {
                    r = self.client.readable() => if r.is_err() {
                        return Some(End::ClientGone);
                    },
                    limit = idle_until(idle_deadline) => return Some(self.client_idle(limit).await),
                    _ = self.shutdown_signal.as_mut() => {
                        self.shutdown_seen = true;
                        return Some(self.shut_down().await);
                    }
                    m = next_notification(&mut self.notifications), if self.notifications.is_some() => {
                        if self.deliver_notification(m).await.is_err() {
                            return Some(End::ClientGone);
                        }
                        continue;
                    }
                }
            }
            self.scan.c.reserve();
            tokio::select! {
                r = self.client.read_buf(&mut self.scan.c.buf) => match r {
                    Ok(0) | Err(_) => return Some(End::ClientGone),
                    Ok(_) => {}
                },
                limit = idle_until(idle_deadline) => return Some(self.client_idle(limit).await),
                _ = self.shutdown_signal.as_mut() => {
                    self.shutdown_seen = true;
                    return Some(self.shut_down().await);
                }
                m = next_notification(&mut self.notifications), if self.notifications.is_some() => {
                    if self.deliver_notification(m).await.is_err() {
                        return Some(End::ClientGone);
                    }
                }
            }
        }
    }

    /// A server at rest leaves the client: back to the pool if provably clean, else closed.
    fn release(&mut self, server: Server) {
        let read_only_error = std::mem::take(&mut self.scan.read_only_error);
        match server.exchange.disposition() {
            // A write refused as read-only: the pool asks the server what it is first.
            Disposition::Clean if read_only_error => self.pool.checkin_after_read_only(server),
            Disposition::Clean => self.pool.checkin(server),
            d => {
                // A taint (DISCARD ALL, a COPY that ended oddly, an answer nobody asked for):
                // the server is not provably clean, so it closes; the client moves on.
                debug!(
                    backend_pid = server.backend_pid,
                    disposition = ?d,
                    "server not provably clean; closing it"
                );
                self.pool.discard(server);
            }
        }
    }

    /// Unlinks the server: cancel routing, saturation count and the transaction's metrics.
    fn unlink(&mut self) -> Server {
        let server = self.server.take().expect("linked");
        self.cancel.unlink();
        self.pool.linked.fetch_sub(1, Ordering::Relaxed);
        let m = &self.pool.metrics;
        m.transactions.inc();
        let ended = self.last_ready.take().unwrap_or_else(Instant::now);
        m.transaction.observe(
            ended
                .saturating_duration_since(self.linked_at)
                .as_secs_f64(),
        );
        self.request_started = None;
        let t = std::mem::take(&mut self.scan.traffic);
        m.queries.inc_by(t.queries);
        m.bytes_in.inc_by(t.bytes_in);
        m.bytes_out.inc_by(t.bytes_out);
        m.messages_in.inc_by(t.messages_in);
        m.messages_out.inc_by(t.messages_out);
        server
    }

    /// Links a server: brings its session parameters in line with the client's first.
    /// `Err(None)`: the server was lost meanwhile (and discarded); nothing of the client's
    /// request has reached it.
    async fn link(&mut self, mut server: Server) -> Result<(), Option<End>> {
        let mut reports = BytesMut::new();
        match server
            .sync_params(self.scan.client_id, &mut self.scan.params, &mut reports)
            .await
        {
            Ok(()) => {
                // The server's spelling of what it applied (ParameterStatus), for the client.
                if !reports.is_empty() {
                    let _ = self.client.write_all(&reports).await;
                }
            }
            Err(SessionError::Server { code, message }) => {
                // The client asked for a value the server rejects: as PostgreSQL would at startup.
                self.pool.discard(server);
                self.send_fatal(&code, &message).await;
                return Err(Some(End::ProtocolError));
            }
            Err(e) => {
                debug!(backend_pid = server.backend_pid, error = %e, "applying session parameters failed");
                self.pool.discard(server);
                return Err(None);
            }
        }
        // An orphaned client inside its lost transaction: this server answers the client's
        // next requests from inside a failed block, as the lost one would have.
        let failed_block = self.orphan.as_ref().is_some_and(|o| o.aborted);
        if failed_block {
            if let Err(e) = server.enter_failed_block().await {
                debug!(backend_pid = server.backend_pid, error = %e, "opening a failed block failed");
                self.pool.discard(server);
                return Err(None);
            }
            self.orphan = None;
        }
        self.cancel.link(CancelTarget {
            addr: server.cancel_addr,
            pid: server.backend_pid,
            secret: server.backend_secret,
            gate: server.cancels.clone(),
        });
        self.scan.pin.use_limit(&self.pool.pins);
        self.scan.server_fatal = None;
        // A new server's first request gets a query_timeout of its own.
        self.query_armed = false;
        self.scan.block_change = None;
        self.scan.read_only_error = false;
        if failed_block {
            server.exchange.enter_failed_block();
        } else {
            server.exchange.reset();
        }
        tracing::trace!(backend_pid = server.backend_pid, "server linked");
        self.pool.linked.fetch_add(1, Ordering::Relaxed);
        self.linked_at = Instant::now();
        self.request_started = Some(self.linked_at);
        self.server = Some(server);
        Ok(())
    }

    /// The session ended while a server is linked (the client left, or broke the protocol):
    /// deliver what the client sent (a COMMIT must not be lost), give the server a moment to
    /// finish answering, and return it only if it is then provably clean. A server that is
    /// still working is closed by the pool, which cancels its query first.
    async fn settle_server(&mut self, mut server: Server) {
        let delivered = tokio::time::timeout(Duration::from_secs(5), async {
            poll_fn(|cx| self.scan.c.poll_write_to(cx, &mut server.stream)).await
        })
        .await;
        let whole = matches!(delivered, Ok(Ok(()))) && self.scan.c.scan.at_boundary();
        if !whole {
            self.pool.discard(server);
            return;
        }
        if !server.exchange.is_quiet() {
            let drained = tokio::time::timeout(SETTLE_GRACE, self.drain_owed(&mut server)).await;
            if !matches!(drained, Ok(Ok(()))) {
                self.pool.discard(server);
                return;
            }
        }
        let clean = server.exchange.disposition() == Disposition::Clean
            && self.scan.s.scan.at_boundary()
            && self.scan.s.buf.len() == self.scan.s.ready
            && self.scan.server_fatal.is_none();
        if !clean {
            self.pool.discard(server);
            return;
        }
        match self.mode {
            PoolMode::Transaction if self.scan.pin.pinned() => {
                self.reset_pinned(server).await;
            }
            PoolMode::Transaction => self.pool.checkin(server),
            PoolMode::Session => {
                // A session leaves state behind: reset it before anyone else gets the server.
                let reset = server
                    .reset_session(&self.server_reset_query, Duration::from_secs(10))
                    .await;
                match reset {
                    Ok(()) => self.pool.checkin(server),
                    Err(e) => {
                        debug!(backend_pid = server.backend_pid, error = %e, "server_reset_query failed; closing the server");
                        self.pool.discard(server);
                    }
                }
            }
        }
    }

    /// A pinned client left: its server goes back only once `server_reset_query` has left
    /// nothing of the client's session state on it (asked again after the reset).
    async fn reset_pinned(&mut self, mut server: Server) {
        self.set_unpinned();
        let limit = Duration::from_secs(10);
        let reset = match server.reset_session(&self.server_reset_query, limit).await {
            // The reset may have dropped prepared statements iampool made there.
            Ok(()) => server.session_state_left(limit).await,
            Err(e) => Err(e),
        };
        server.statements = Default::default();
        match reset {
            Ok(0) => self.pool.checkin(server),
            Ok(left) => {
                debug!(backend_pid = server.backend_pid, left = %session_state::names(left),
                    "server_reset_query left a pinned client's session state; closing the server");
                self.pool.discard(server);
            }
            Err(e) => {
                debug!(backend_pid = server.backend_pid, error = %e,
                    "resetting a pinned server failed; closing it");
                self.pool.discard(server);
            }
        }
    }

    /// Asks the linked server what session state its pinned client still has there.
    /// Ok(true): the client keeps the server.
    async fn probe_pin(&mut self) -> io::Result<bool> {
        let server = self.server.as_mut().expect("linked");
        let left = server
            .session_state_left(Duration::from_secs(10))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let was = self.scan.pin.reasons();
        let pinned = self.scan.pin.probed(left);
        self.cancel.set_pinned(self.scan.pin.reasons());
        if pinned && was == 0 {
            debug!(database = %self.pool.database, reasons = %session_state::names(left),
                "client pinned to its server for its session state");
        } else if !pinned {
            debug!(database = %self.pool.database, "client unpinned: its session state is gone");
        }
        Ok(pinned)
    }

    /// The client's pin ends (its server is lost or reset).
    fn set_unpinned(&mut self) {
        self.scan.pin.unpin();
        self.cancel.set_pinned(0);
    }

    /// Reads and drops the server's answers to a client that is gone, until nothing is owed.
    async fn drain_owed(&mut self, server: &mut ServerConn) -> io::Result<()> {
        // Whatever was already scanned would have gone to the client: drop it.
        self.scan.s.discard_ready();
        while !server.exchange.is_quiet() {
            self.scan.s.reserve();
            if server.stream.read_buf(&mut self.scan.s.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.scan
                .server(&mut side(server))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
            self.scan.s.discard_ready();
        }
        Ok(())
    }

    fn releasable(&self) -> bool {
        let Some(server) = self.server.as_ref() else {
            return false;
        };
        self.mode == PoolMode::Transaction
            && server.exchange.at_rest()
            && self.scan.c.settled()
            // Bytes of the client's next message already here (e.g. a large Query arriving
            // in pieces) keep the server: releasing now would only check it out again.
            && self.scan.c.buf.len() == self.scan.c.ready
            && self.scan.s.scan.at_boundary()
            && self.scan.s.buf.len() == self.scan.s.ready
            && self.scan.server_fatal.is_none()
            // A pinned client keeps its server; whether it still must is asked first.
            && (!self.scan.pin.pinned() || self.scan.pin.probe_due())
    }

    /// Drives both directions while a server is linked.
    fn poll_linked(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        loop {
            let mut progress = false;
            let server = self.server.as_mut().expect("linked");

            // Client -> server.
            let before = self.scan.c.ready;
            match self.scan.c.poll_write_to(cx, &mut server.stream) {
                Poll::Ready(Err(e)) => return Poll::Ready(Wake::ServerGone(Some(e))),
                Poll::Ready(Ok(())) => {
                    if self.client_done {
                        return Poll::Ready(Wake::ClientGone);
                    }
                }
                Poll::Pending => {}
            }
            progress |= self.scan.c.ready != before;

            // Server -> client.
            let before = self.scan.s.ready;
            if let Poll::Ready(Err(_)) = self.scan.s.poll_write_to(cx, &mut self.client) {
                self.client_done = true;
                return Poll::Ready(Wake::ClientGone);
            }
            progress |= self.scan.s.ready != before;

            if self.releasable() {
                return Poll::Ready(Wake::Released);
            }

            // Read the client while its half has room (never again after EOF or Terminate:
            // a closed socket is always readable, and polling it would spin).
            if !self.client_done && self.scan.c.ready < HIGH_WATER {
                self.scan.c.reserve();
                match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.scan.c.buf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.client_done = true;
                        continue;
                    }
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Some(w) = self.scan_client() {
                            match w {
                                Wake::ClientGone => continue,
                                other => return Poll::Ready(other),
                            }
                        }
                    }
                    Poll::Pending => {}
                }
            }

            // Read the server while its half has room.
            if self.scan.s.ready < HIGH_WATER {
                self.scan.s.reserve();
                let server = self.server.as_mut().expect("linked");
                match poll_read_buf(Pin::new(&mut server.stream), cx, &mut self.scan.s.buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Wake::ServerGone(None)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Wake::ServerGone(Some(e))),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Some(w) = self.scan_server() {
                            return Poll::Ready(w);
                        }
                    }
                    Poll::Pending => {}
                }
            }

            if progress {
                self.idle_armed = false;
                continue;
            }
            // Transaction mode notices shutdown when the server is released; session mode,
            // whose server stays linked between transactions, must be told here.
            if (self.mode == PoolMode::Session || self.scan.pin.pinned())
                && !self.shutdown_seen
                && self.shutdown_signal.as_mut().poll(cx).is_ready()
            {
                self.shutdown_seen = true;
            }
            // A pinned client between transactions gets the notifications of the channels
            // it listens on through the pool, as an idle one does.
            if let Some(sub) = self.notifications.as_mut() {
                let at_rest = self.server.as_ref().is_some_and(|s| s.exchange.at_rest());
                if at_rest
                    && self.scan.s.scan.at_boundary()
                    && self.scan.s.buf.len() == self.scan.s.ready
                {
                    if let Poll::Ready(Some(m)) = sub.rx.poll_recv(cx) {
                        super::prepared::Staging::staged(&mut self.scan.s).extend_from_slice(&m);
                        continue;
                    }
                }
            }
            if self.shutdown_seen
                && self.server.as_ref().is_some_and(|s| s.exchange.at_rest())
                && self.scan.c.settled()
                && self.scan.c.buf.is_empty()
                && self.scan.s.settled()
                && self.scan.s.buf.is_empty()
            {
                return Poll::Ready(Wake::Shutdown);
            }
            if let Poll::Ready(wake) = self.poll_query_timeout(cx) {
                return Poll::Ready(wake);
            }
            return self.poll_idle_in_transaction(cx);
        }
    }

    /// query_timeout: the oldest request still unanswered has run this long.
    fn poll_query_timeout(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        let Some(limit) = self.query_timeout else {
            return Poll::Pending;
        };
        let waiting = self.server.as_ref().is_some_and(|s| !s.exchange.is_quiet());
        if !waiting {
            self.query_armed = false;
            return Poll::Pending;
        }
        if !self.query_armed {
            let deadline = tokio::time::Instant::now() + limit;
            match self.query_timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.query_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.query_armed = true;
        }
        let Some(timer) = self.query_timer.as_mut() else {
            return Poll::Pending;
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Wake::QueryTimeout(limit)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_idle_in_transaction(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        let Some(limit) = self.idle_tx_timeout else {
            return Poll::Pending;
        };
        let idle_in_tx = self
            .server
            .as_ref()
            .is_some_and(|s| s.exchange.status() != TxStatus::Idle && s.exchange.is_quiet())
            && self.scan.c.ready == 0
            && self.scan.s.ready == 0;
        if !idle_in_tx {
            self.idle_armed = false;
            return Poll::Pending;
        }
        if !self.idle_armed {
            let deadline = tokio::time::Instant::now() + limit;
            match self.idle_timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.idle_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.idle_armed = true;
        }
        let Some(timer) = self.idle_timer.as_mut() else {
            return Poll::Pending;
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Wake::IdleInTransaction),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Scans what the client sent; Terminate marks the client done.
    fn scan_client(&mut self) -> Option<Wake> {
        let server = self.server.as_mut().expect("linked");
        let result = self.scan.client(&mut side(server));
        if self.scan.request_started && self.request_started.is_none() {
            self.request_started = Some(Instant::now());
        }
        self.scan.request_started = false;
        if self.scan.session_state != 0 {
            let kinds = self.scan.take_session_state();
            self.note_session_state(kinds);
        }
        // A pinned client's UNLISTEN goes to its server, and ends its listening through
        // the pool too.
        for channel in self.scan.unlistened.drain(..) {
            if let Some(sub) = self.notifications.as_mut() {
                sub.unlisten(channel.as_deref());
            }
        }
        match result {
            Ok(()) => None,
            Err(Stop::Terminate) => {
                self.client_done = true;
                Some(Wake::ClientGone)
            }
            Err(Stop::Client(m)) => Some(Wake::ClientProtocol(m)),
            Err(Stop::Server(m)) => Some(Wake::ServerProtocol(m)),
        }
    }

    /// Scans what the server sent.
    fn scan_server(&mut self) -> Option<Wake> {
        let server = self.server.as_mut().expect("linked");
        let result = self.scan.server(&mut side(server));
        if self.scan.readies > 0 {
            self.scan.readies = 0;
            // The next request outstanding gets a query_timeout of its own.
            self.query_armed = false;
            if let Some(started) = self.request_started.take() {
                let now = Instant::now();
                self.last_ready = Some(now);
                self.pool
                    .metrics
                    .query
                    .observe(now.saturating_duration_since(started).as_secs_f64());
            }
        }
        match result {
            Ok(()) => None,
            Err(Stop::Server(m)) => Some(Wake::ServerProtocol(m)),
            Err(other) => unreachable!("server scan stopped with {other:?}"),
        }
    }

    /// Whether the client's next request opens a transaction that declares itself read-only
    /// (`BEGIN READ ONLY`, `START TRANSACTION ISOLATION LEVEL ... READ ONLY`), as a simple
    /// Query: only its first few hundred bytes are looked at.
    fn declares_read_only(&self) -> bool {
        let buf = &self.scan.c.buf;
        let Ok(Some(h)) = Header::parse(buf, self.scan.max_message) else {
            return false;
        };
        if h.tag != frontend::QUERY {
            return false;
        }
        let end = buf.len().min(h.frame_len()).min(HEADER_LEN + 512);
        crate::protocol::tx_modes::begins_read_only(&buf[HEADER_LEN..end], end == h.frame_len())
    }

    /// Unlinked, the client sent exactly a named Parse and a Sync of a statement this pool
    /// knows: answer ParseComplete + ReadyForQuery without taking a server.
    fn answer_prepare_locally(&mut self) -> bool {
        if !self.scan.tracker.enabled() {
            return false;
        }
        let max = self.scan.max_message;
        let buf = &self.scan.c.buf;
        let Ok(Some(p)) = Header::parse(buf, max) else {
            return false;
        };
        if p.tag != frontend::PARSE || buf.len() < p.frame_len() {
            return false;
        }
        let Ok(Some(sync)) = Header::parse(&buf[p.frame_len()..], max) else {
            return false;
        };
        if sync.tag != frontend::SYNC || sync.len != 4 {
            return false;
        }
        if !names_statement(p.tag, &buf[HEADER_LEN..p.frame_len()])
            || !self.scan.tracker.prepare_locally(&buf[..p.frame_len()])
        {
            return false;
        }
        let parse = self.scan.c.buf.split_to(p.frame_len());
        self.scan.pin_note_parse(&parse[HEADER_LEN..]);
        self.scan.c.buf.advance(sync.frame_len());
        let out = super::prepared::Staging::staged(&mut self.scan.s);
        out.extend_from_slice(&[backend::PARSE_COMPLETE, 0, 0, 0, 4]);
        messages::ready_for_query(out, TxStatus::Idle);
        true
    }

    /// Unlinked, the client sent exactly `LISTEN name` or `UNLISTEN name|*` as a simple
    /// Query: answered here, through the pool's listening connection, without taking a
    /// server (the answer to a LISTEN waits until that connection listens too).
    async fn answer_listen_locally(&mut self) -> bool {
        if self.mode != PoolMode::Transaction {
            return false;
        }
        let buf = &self.scan.c.buf;
        let Ok(Some(h)) = Header::parse(buf, self.scan.max_message) else {
            return false;
        };
        if h.tag != frontend::QUERY || h.frame_len() > LISTEN_MAX || buf.len() < h.frame_len() {
            return false;
        }
        let body = &buf[HEADER_LEN..h.frame_len()];
        if !matches!(body.trim_ascii_start().first(), Some(b) if matches!(b | 0x20, b'l' | b'u')) {
            return false;
        }
        let Some((listen, channel)) = crate::pool::listen::listen_statement(body) else {
            return false;
        };
        self.scan.c.buf.advance(h.frame_len());
        let hub = &self.home.notifications;
        let sub = self.notifications.get_or_insert_with(|| hub.subscribe());
        let mut out = BytesMut::new();
        match (listen, channel) {
            (true, Some(channel)) => match sub.listen(&channel).await {
                Ok(()) => messages::command_complete(&mut out, "LISTEN"),
                Err(e) => messages::error_response(
                    &mut out,
                    Severity::Error,
                    sqlstate::CONNECTION_FAILURE,
                    &format!("LISTEN failed: {e}"),
                ),
            },
            (_, channel) => {
                sub.unlisten(channel.as_deref());
                messages::command_complete(&mut out, "UNLISTEN");
            }
        }
        messages::ready_for_query(&mut out, TxStatus::Idle);
        super::prepared::Staging::staged(&mut self.scan.s).extend_from_slice(&out);
        true
    }

    /// Writes a notification (and any others already queued) to the idle client.
    async fn deliver_notification(&mut self, first: bytes::Bytes) -> io::Result<()> {
        let mut out = BytesMut::from(&first[..]);
        if let Some(sub) = self.notifications.as_mut() {
            while out.len() < 64 * 1024 {
                match sub.rx.try_recv() {
                    Ok(m) => out.extend_from_slice(&m),
                    Err(_) => break,
                }
            }
        }
        self.client.write_all(&out).await?;
        self.client.flush().await
    }

    /// The client's notifications are no longer complete (its queue overflowed, or the
    /// listening connection was lost): its session ends with an error that says so, as a
    /// listener's own lost connection would end it.
    async fn notifications_lost(&mut self) -> Option<End> {
        use crate::pool::listen::{LOST_CONNECTION, LOST_OVERFLOW};
        let lost = self.notifications.as_ref().map_or(0, |s| s.lost());
        let (code, message) = match lost {
            LOST_OVERFLOW => (
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "terminating connection: more than {} notifications were waiting for this \
                     client, which did not read them; notifications were lost. Reconnect and \
                     LISTEN again",
                    crate::pool::listen::CLIENT_QUEUE
                ),
            ),
            LOST_CONNECTION => (
                sqlstate::CONNECTION_FAILURE,
                "terminating connection: iampool's listening server connection was lost, so \
                 notifications may have been lost. Reconnect and LISTEN again"
                    .to_owned(),
            ),
            _ => return None,
        };
        // What was delivered before the loss still goes first.
        while let Some(m) = self
            .notifications
            .as_mut()
            .and_then(|s| s.rx.try_recv().ok())
        {
            if self.client.write_all(&m).await.is_err() {
                return Some(End::ClientGone);
            }
        }
        self.send_fatal(code, &message).await;
        Some(End::ServerGone)
    }

    /// Statements created session state that transaction mode cannot carry: count them, and
    /// say so once per client and kind.
    fn note_session_state(&mut self, kinds: u8) {
        for (i, kind) in session_state::KINDS.iter().enumerate() {
            let bit = 1u8 << i;
            if kinds & bit == 0 {
                continue;
            }
            self.pool.metrics.session_state(kind);
            if self.scan.pin.enabled() && session_state::PINS & bit != 0 {
                // The client keeps its server for it (see `probe_pin`).
                continue;
            }
            if self.session_state_seen & bit == 0 {
                self.session_state_seen |= bit;
                tracing::warn!(
                    database = %self.pool.database, kind,
                    "a client created session state that does not follow it to other servers in \
                     transaction mode; use session mode for this client (see README)"
                );
            }
        }
    }

    async fn flush_to_client(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.scan.s.poll_write_to(cx, &mut self.client)).await
    }

    async fn send_fatal(&mut self, code: &str, message: &str) {
        let _ = self.flush_to_client().await;
        let mut b = BytesMut::new();
        messages::error_response(&mut b, Severity::Fatal, code, message);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.client.write_all(&b).await?;
            self.client.flush().await
        })
        .await;
    }

    async fn shut_down(&mut self) -> End {
        // Asked to end by iampool's shutdown or by the admin console (KILL, KILL_CLIENT).
        let why = self
            .cancel
            .ending()
            .unwrap_or(super::cancel::Ending::Shutdown);
        self.send_fatal(sqlstate::ADMIN_SHUTDOWN, why.message())
            .await;
        End::Shutdown
    }

    /// client_idle_timeout: the client sent nothing for `limit` while holding no server.
    async fn client_idle(&mut self, limit: Duration) -> End {
        debug!(database = %self.pool.database, "client_idle_timeout: closing an idle client");
        self.send_fatal(
            sqlstate::IDLE_SESSION_TIMEOUT,
            &format!(
                "terminating connection due to client_idle_timeout: no request for {}",
                humantime(limit)
            ),
        )
        .await;
        End::Timeout
    }

    async fn fatal_protocol(&mut self, message: &str) -> End {
        self.send_fatal(sqlstate::PROTOCOL_VIOLATION, message).await;
        End::ProtocolError
    }

    /// No server for the client's request. Transaction mode: the request fails with an
    /// ERROR and the client keeps its connection (its next request tries again). Session
    /// mode, or iampool shutting down: the session ends.
    async fn pool_error(&mut self, e: PoolError) -> Option<End> {
        let msg = match &e {
            PoolError::Timeout { .. } => format!("query_wait_timeout: {e}"),
            _ => e.to_string(),
        };
        // The same SQLSTATE a client gets for this at login: the pool decides it.
        let code = e.sqlstate().to_owned();
        if self.mode == PoolMode::Transaction && !matches!(e, PoolError::Closed) {
            let out = super::prepared::Staging::staged(&mut self.scan.s);
            self.orphan = Some(Orphan::refused(self.orphan.take(), out, &code, &msg));
            return None;
        }
        self.send_fatal(&code, &msg).await;
        Some(End::PoolError)
    }
}

/// Queries at most this long are read whole before a server is taken (LISTEN is answered
/// without one).
const LISTEN_MAX: usize = 512;

/// The next notification for a client that listens; never, for one that does not.
async fn next_notification(sub: &mut Option<Subscription>) -> bytes::Bytes {
    match sub.as_mut() {
        Some(s) => match s.rx.recv().await {
            Some(m) => m,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Resolves with the limit once the deadline passes; never without one.
async fn idle_until(deadline: Option<(tokio::time::Instant, Duration)>) -> Duration {
    match deadline {
        Some((at, limit)) => {
            tokio::time::sleep_until(at).await;
            limit
        }
        None => std::future::pending().await,
    }
}

/// A limit as the configuration would write it (`30s`, `1500ms`).
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
