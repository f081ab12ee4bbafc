//! The session relay: one client's life after login, and the hot path.
//!
//! Bytes are read into one buffer per direction, the framer walks message boundaries in
//! place, and the same bytes are written on: no per-message allocation, one write per read.
//! Only the messages that decide pooling are looked at (ReadyForQuery, ParameterStatus,
//! ErrorResponse and the COPY responses from the server; the tag of each client message).
//!
//! While a server is linked, both directions are driven from one task with `poll_fn`, so a
//! server that is blocked writing results can never deadlock against a client that is
//! blocked writing a large pipeline: each side is read as long as its buffer has room.

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
use super::cycle::{ClientMsg, Cycle};
use super::prepared::{
    drops_statements, names_statement, session_state_kind, ClientAction, QueryAction, ServerAction,
    Staging, Tracker, SESSION_STATE_KINDS,
};
use crate::config::PoolMode;
use crate::pool::{Pool, PoolError};
use crate::protocol::framing::{Header, Step, HEADER_LEN};
use crate::protocol::messages::{
    self, backend, frontend, parse_error_fields, parse_parameter_status, sqlstate, Severity,
    TxStatus,
};
use crate::server::params::SessionParams;
use crate::server::session::SessionError;
use crate::server::ServerConn;
use crate::stream::Stream;

use super::half::{Half, HIGH_WATER, READ_CHUNK};
/// PostgreSQL never sends a message over 1 GiB.
const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1;

/// Why the linked phase stopped.
#[derive(Debug)]
enum Wake {
    /// Transaction mode: the server is clean and goes back to the pool.
    Released,
    /// The client closed, sent Terminate, or failed; everything it sent has been passed on.
    ClientGone,
    ServerGone(Option<io::Error>),
    ClientProtocol(String),
    ServerProtocol(String),
    IdleInTransaction,
    Shutdown,
}

/// Per-transaction traffic, kept in plain integers on the hot path.
#[derive(Default)]
struct Traffic {
    queries: u64,
    bytes_in: u64,
    bytes_out: u64,
    messages_in: u64,
    messages_out: u64,
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
    pool: Arc<Pool>,
    mode: PoolMode,
    client: Stream,
    c: Half,
    s: Half,
    server: Option<ServerConn>,
    cycle: Cycle,
    /// Named prepared statements (transaction mode).
    tracker: Tracker,
    /// Counted locally and added to the pool's counters when the server is unlinked.
    traffic: Traffic,
    linked_at: Instant,
    /// When the request now in flight started (for the query duration histogram).
    request_started: Option<Instant>,
    /// Kinds of session state already reported for this client (bit per kind).
    session_state_seen: u8,
    /// The parameter values this client believes in.
    params: SessionParams,
    cancel: Arc<CancelSlot>,
    max_message: usize,
    /// The client will send nothing more (EOF or Terminate).
    client_done: bool,
    /// The linked server sent a FATAL error: it is about to close.
    server_fatal: bool,
    idle_tx_timeout: Option<Duration>,
    idle_timer: Pin<Box<Sleep>>,
    idle_armed: bool,
    server_reset_query: String,
    shutdown: watch::Receiver<bool>,
    /// Resolves once iampool starts shutting down; polled only until it does.
    shutdown_signal: Pin<Box<dyn Future<Output = ()> + Send>>,
    shutdown_seen: bool,
}

pub struct SessionArgs {
    pub pool: Arc<Pool>,
    pub client: Stream,
    /// Bytes the client sent after its startup packet, already read.
    pub leftover: BytesMut,
    pub params: SessionParams,
    pub cancel: Arc<CancelSlot>,
    pub max_message: usize,
    pub max_prepared_statements: usize,
    pub idle_tx_timeout: Option<Duration>,
    pub server_reset_query: String,
    pub shutdown: watch::Receiver<bool>,
}

impl Session {
    pub fn new(a: SessionArgs) -> Session {
        let mode = a.pool.mode();
        let known = a.pool.statements.clone();
        let mut c = Half {
            buf: a.leftover,
            ..Half::default()
        };
        c.buf.reserve(READ_CHUNK);
        Session {
            pool: a.pool,
            mode,
            client: a.client,
            c,
            s: Half {
                buf: BytesMut::with_capacity(READ_CHUNK),
                ..Half::default()
            },
            server: None,
            cycle: Cycle::default(),
            // Session mode keeps one server per client: names need no rewriting there.
            traffic: Traffic::default(),
            linked_at: Instant::now(),
            request_started: None,
            session_state_seen: 0,
            tracker: Tracker::new(
                match mode {
                    PoolMode::Transaction => a.max_prepared_statements,
                    PoolMode::Session => 0,
                },
                known,
            ),
            params: a.params,
            cancel: a.cancel,
            max_message: a.max_message,
            client_done: false,
            server_fatal: false,
            idle_tx_timeout: a.idle_tx_timeout,
            idle_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            idle_armed: false,
            server_reset_query: a.server_reset_query,
            shutdown_signal: {
                let mut rx = a.shutdown.clone();
                Box::pin(async move { wait_for_shutdown(&mut rx).await })
            },
            shutdown: a.shutdown,
            shutdown_seen: false,
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
        loop {
            // Unlinked: hand the client what the last server sent, then wait for its next request.
            if let Err(e) = self.flush_to_client().await {
                debug!(error = %e, "client write failed");
                return End::ClientGone;
            }
            // Wait until the client has sent at least one message header.
            loop {
                match Header::parse(&self.c.buf, self.max_message) {
                    Err(e) => return self.fatal_protocol(&e.to_string()).await,
                    Ok(Some(h)) if h.tag == frontend::TERMINATE => return End::ClientGone,
                    Ok(Some(_)) => break,
                    Ok(None) => {}
                }
                if self.client_done {
                    return End::ClientGone;
                }
                if self.shutdown_seen {
                    return self.shut_down().await;
                }
                self.s.shrink_if_idle();
                self.c.shrink_if_idle();
                self.c.reserve();
                tokio::select! {
                    r = self.client.read_buf(&mut self.c.buf) => match r {
                        Ok(0) | Err(_) => return End::ClientGone,
                        Ok(_) => {}
                    },
                    _ = self.shutdown_signal.as_mut() => {
                        self.shutdown_seen = true;
                        return self.shut_down().await;
                    }
                }
            }

            if self.answer_prepare_locally() {
                continue;
            }

            // The client has a request: link a server, then look at what it sent (names are
            // rewritten against the statements this particular server has).
            self.cancel.set_waiting(true);
            let checkout = self.pool.checkout().await;
            self.cancel.set_waiting(false);
            let server = match checkout {
                Ok(s) => s,
                Err(e) => return self.pool_error(e).await,
            };
            if let Err(end) = self.link(server).await {
                return end;
            }
            if let Some(Wake::ClientProtocol(m)) = self.scan_client() {
                return self.fatal_protocol(&m).await;
            }

            let wake = poll_fn(|cx| self.poll_linked(cx)).await;
            match wake {
                Wake::Released => {
                    let server = self.unlink();
                    tracing::trace!(backend_pid = server.backend_pid, "server released");
                    if self.tracker.is_idle() && !self.cycle.tainted() {
                        self.pool.checkin(server);
                    } else {
                        self.cycle.reset();
                        // Unmatched responses, or a taint (DISCARD ALL, a COPY that ended oddly):
                        // the server is not provably clean, so it closes; the client moves on.
                        debug!(
                            backend_pid = server.backend_pid,
                            "server not provably clean; closing it"
                        );
                        self.tracker.reset_server();
                        self.pool.discard(server);
                    }
                    if *self.shutdown.borrow() {
                        return self.shut_down().await;
                    }
                }
                // Session mode: shutting down and the session is between transactions.
                Wake::Shutdown => return self.shut_down().await,
                Wake::ClientGone => return End::ClientGone,
                Wake::ServerGone(err) => {
                    let server = self.unlink();
                    debug!(backend_pid = server.backend_pid, error = ?err, "server connection lost while linked");
                    self.pool.discard(server);
                    let _ = self.flush_to_client().await;
                    if !self.server_fatal {
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

    /// Unlinks the server: cancel routing, saturation count and the transaction's metrics.
    fn unlink(&mut self) -> ServerConn {
        let server = self.server.take().expect("linked");
        self.cancel.unlink();
        self.pool.linked.fetch_sub(1, Ordering::Relaxed);
        let m = &self.pool.metrics;
        m.transactions.inc();
        m.transaction
            .observe(self.linked_at.elapsed().as_secs_f64());
        let t = std::mem::take(&mut self.traffic);
        m.queries.inc_by(t.queries);
        m.bytes_in.inc_by(t.bytes_in);
        m.bytes_out.inc_by(t.bytes_out);
        m.messages_in.inc_by(t.messages_in);
        m.messages_out.inc_by(t.messages_out);
        server
    }

    /// Links a server: brings its session parameters in line with the client's first.
    async fn link(&mut self, mut server: ServerConn) -> Result<(), End> {
        let mut reports = BytesMut::new();
        match server.sync_params(&mut self.params, &mut reports).await {
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
                return Err(End::ProtocolError);
            }
            Err(e) => {
                debug!(backend_pid = server.backend_pid, error = %e, "applying session parameters failed");
                self.pool.discard(server);
                self.send_fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "server connection failed while applying session parameters",
                )
                .await;
                return Err(End::ServerGone);
            }
        }
        self.cancel.link(CancelTarget {
            addr: server.cancel_addr,
            pid: server.backend_pid,
            secret: server.backend_secret,
        });
        self.server_fatal = false;
        self.tracker.reset_server();
        tracing::trace!(backend_pid = server.backend_pid, "server linked");
        self.pool.linked.fetch_add(1, Ordering::Relaxed);
        self.linked_at = Instant::now();
        self.server = Some(server);
        Ok(())
    }

    /// The client is gone (or the session ended) while a server is linked: deliver what the
    /// client sent (a COMMIT must not be lost), then return the server only if it is clean.
    async fn settle_server(&mut self, mut server: ServerConn) {
        let delivered = tokio::time::timeout(Duration::from_secs(5), async {
            poll_fn(|cx| self.c.poll_write_to(cx, &mut server.stream)).await
        })
        .await;
        let clean = matches!(delivered, Ok(Ok(())))
            && self.cycle.is_clean()
            && self.tracker.is_idle()
            && self.c.scan.at_boundary()
            && self.s.buf.len() == self.s.ready
            && !self.server_fatal;
        if !clean {
            self.pool.discard(server);
            return;
        }
        match self.mode {
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

    fn releasable(&self) -> bool {
        self.mode == PoolMode::Transaction
            && self.cycle.at_rest()
            && self.c.settled()
            // Bytes of the client's next message already here (e.g. a large Query arriving
            // in pieces) keep the server: releasing now would only check it out again.
            && self.c.buf.len() == self.c.ready
            && self.s.scan.at_boundary()
            && self.s.buf.len() == self.s.ready
            && !self.server_fatal
    }

    /// Drives both directions while a server is linked.
    fn poll_linked(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        loop {
            let mut progress = false;
            let server = self.server.as_mut().expect("linked");

            // Client -> server.
            let before = self.c.ready;
            match self.c.poll_write_to(cx, &mut server.stream) {
                Poll::Ready(Err(e)) => return Poll::Ready(Wake::ServerGone(Some(e))),
                Poll::Ready(Ok(())) => {
                    if self.client_done {
                        return Poll::Ready(Wake::ClientGone);
                    }
                }
                Poll::Pending => {}
            }
            progress |= self.c.ready != before;

            // Server -> client.
            let before = self.s.ready;
            if let Poll::Ready(Err(_)) = self.s.poll_write_to(cx, &mut self.client) {
                self.client_done = true;
                return Poll::Ready(Wake::ClientGone);
            }
            progress |= self.s.ready != before;

            if self.releasable() {
                return Poll::Ready(Wake::Released);
            }

            // Read the client while its half has room (never again after EOF or Terminate:
            // a closed socket is always readable, and polling it would spin).
            if !self.client_done && self.c.ready < HIGH_WATER {
                self.c.reserve();
                match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.c.buf) {
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
            if self.s.ready < HIGH_WATER {
                self.s.reserve();
                let server = self.server.as_mut().expect("linked");
                match poll_read_buf(Pin::new(&mut server.stream), cx, &mut self.s.buf) {
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
            if !self.shutdown_seen && self.shutdown_signal.as_mut().poll(cx).is_ready() {
                self.shutdown_seen = true;
            }
            if self.shutdown_seen
                && self.cycle.at_rest()
                && self.c.settled()
                && self.c.buf.is_empty()
                && self.s.settled()
                && self.s.buf.is_empty()
            {
                return Poll::Ready(Wake::Shutdown);
            }
            return self.poll_idle_in_transaction(cx);
        }
    }

    fn poll_idle_in_transaction(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        let Some(limit) = self.idle_tx_timeout else {
            return Poll::Pending;
        };
        let idle_in_tx = self.cycle.status() != TxStatus::Idle
            && self.cycle.is_quiet()
            && self.c.ready == 0
            && self.s.ready == 0;
        if !idle_in_tx {
            self.idle_armed = false;
            return Poll::Pending;
        }
        if !self.idle_armed {
            self.idle_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + limit);
            self.idle_armed = true;
        }
        match self.idle_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Wake::IdleInTransaction),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Walks new client bytes: marks complete and partial messages ready to forward.
    /// Terminate ends the scan (it is never forwarded) and marks the client done.
    fn scan_client(&mut self) -> Option<Wake> {
        let track = self.tracker.enabled();
        self.c.want = 0;
        loop {
            let pos = self.c.ready;
            let header = match self.c.scan.step(&self.c.buf[pos..], self.max_message) {
                Err(e) => return Some(Wake::ClientProtocol(e.to_string())),
                Ok(Step::NeedMore) => break,
                Ok(Step::Continue(n)) => {
                    self.c.scan.consume_body(n);
                    self.c.ready += n;
                    continue;
                }
                Ok(Step::Message { header, complete }) => {
                    let inspected =
                        track && (Tracker::inspects(header.tag) || header.tag == frontend::QUERY);
                    if inspected && !complete {
                        self.c.want = header.frame_len();
                        break;
                    }
                    header
                }
            };
            let tag = header.tag;
            let len = header.frame_len();
            self.traffic.messages_in += 1;
            self.traffic.bytes_in += len as u64;
            if self.request_started.is_none() {
                self.request_started = Some(Instant::now());
            }
            if track && (tag == frontend::QUERY || tag == frontend::PARSE) {
                let body = &self.c.buf[pos + HEADER_LEN..pos + len];
                let sql = if tag == frontend::PARSE {
                    // Parse: name, then the statement text.
                    let skip = body
                        .iter()
                        .position(|&b| b == 0)
                        .map_or(body.len(), |i| i + 1);
                    &body[skip..]
                } else {
                    body
                };
                let state = session_state_kind(sql);
                let drops = tag == frontend::PARSE && drops_statements(sql);
                if let Some(kind) = state {
                    self.note_session_state(kind);
                }
                if drops {
                    // DEALLOCATE / DISCARD through the extended protocol.
                    self.forget_server_statements();
                }
            }
            if track && tag == frontend::QUERY {
                let body = &self.c.buf[pos + HEADER_LEN..pos + len];
                match self.tracker.on_query(body) {
                    QueryAction::Forward => {}
                    QueryAction::Discard | QueryAction::ForwardDeallocate => {
                        self.forget_server_statements();
                    }
                    QueryAction::Answer(command) => {
                        // Answered in order, once everything before it has been answered.
                        self.c.drop_message(len);
                        self.tracker.queue_answer(command);
                        self.emit_synthetic();
                        continue;
                    }
                }
            }
            let ignored_sync = tag == frontend::SYNC && self.cycle.ignoring_syncs();
            match self.cycle.on_client(tag) {
                ClientMsg::Forward => {}
                ClientMsg::Terminate => {
                    self.c.buf.truncate(pos);
                    self.client_done = true;
                    return Some(Wake::ClientGone);
                }
                ClientMsg::Invalid => {
                    return Some(Wake::ClientProtocol(format!(
                        "invalid frontend message type {tag}"
                    )))
                }
            }
            if track {
                // A message that names a statement may be rewritten: move what came before
                // it out of the way first, so the message starts the buffer.
                let named = Tracker::inspects(tag)
                    && names_statement(tag, &self.c.buf[pos + HEADER_LEN..pos + len]);
                let at = if named {
                    self.c.stage_ready();
                    0
                } else {
                    pos
                };
                let frame_end = at
                    + if Tracker::inspects(tag) {
                        len
                    } else {
                        HEADER_LEN
                    };
                let Some(server) = self.server.as_mut() else {
                    unreachable!("client messages are scanned only while a server is linked")
                };
                let action = self.tracker.on_client(
                    &self.c.buf[at..frame_end],
                    &mut server.statements,
                    ignored_sync,
                    &mut self.c.out,
                );
                if action == ClientAction::Rewritten {
                    self.c.drop_message(len);
                    self.emit_synthetic();
                    continue;
                }
            }
            let avail = self.c.buf.len() - pos;
            self.c.ready += self.c.scan.consume_message(header, avail);
        }
        None
    }

    /// Walks new server bytes, looking into the few messages that decide pooling.
    fn scan_server(&mut self) -> Option<Wake> {
        let track = self.tracker.enabled();
        self.s.want = 0;
        loop {
            let pos = self.s.ready;
            let header = match self.s.scan.step(&self.s.buf[pos..], MAX_SERVER_MESSAGE) {
                Err(e) => return Some(Wake::ServerProtocol(e.to_string())),
                Ok(Step::NeedMore) => break,
                Ok(Step::Continue(n)) => {
                    self.s.scan.consume_body(n);
                    self.s.ready += n;
                    continue;
                }
                Ok(Step::Message { header, complete }) => {
                    let inspected = matches!(
                        header.tag,
                        backend::READY_FOR_QUERY
                            | backend::PARAMETER_STATUS
                            | backend::ERROR_RESPONSE
                            | backend::COMMAND_COMPLETE
                    );
                    if inspected && !complete {
                        self.s.want = header.frame_len();
                        break;
                    }
                    header
                }
            };
            let end = (pos + header.frame_len()).min(self.s.buf.len());
            let body = &self.s.buf[pos + HEADER_LEN..end];
            self.traffic.messages_out += 1;
            self.traffic.bytes_out += header.frame_len() as u64;
            match header.tag {
                backend::READY_FOR_QUERY => {
                    let Some(status) = body.first().copied().and_then(TxStatus::from_byte) else {
                        return Some(Wake::ServerProtocol("bad ReadyForQuery".into()));
                    };
                    self.cycle.on_ready(status);
                    self.traffic.queries += 1;
                    if let Some(started) = self.request_started.take() {
                        self.pool
                            .metrics
                            .query
                            .observe(started.elapsed().as_secs_f64());
                    }
                }
                backend::PARAMETER_STATUS => {
                    if let Ok((n, v)) = parse_parameter_status(body) {
                        if let Some(server) = self.server.as_mut() {
                            server.params.set_reported(n, v);
                        }
                        self.params.set_reported(n, v);
                    }
                }
                backend::COMMAND_COMPLETE => {
                    // A client's RESET / DISCARD ALL changes what iampool set on this server.
                    if let Some(server) = self.server.as_mut() {
                        server.params.on_command_complete(body);
                    }
                }
                backend::ERROR_RESPONSE => {
                    if parse_error_fields(body).is_fatal() {
                        self.server_fatal = true;
                    }
                    self.cycle.on_error();
                }
                tag => {
                    let swallowed = self.cycle.on_server(tag);
                    if swallowed > 0 {
                        self.tracker.syncs_ignored(swallowed);
                    }
                }
            }
            if track {
                let server = self.server.as_mut().expect("linked");
                if self.tracker.on_server(header.tag, &mut server.statements) == ServerAction::Drop
                {
                    // An answer to an injected message: complete (5 bytes) and never forwarded.
                    self.s.drop_message(header.frame_len());
                    self.emit_synthetic();
                    continue;
                }
                let avail = self.s.buf.len() - pos;
                self.s.ready += self.s.scan.consume_message(header, avail);
                self.emit_synthetic();
                continue;
            }
            let avail = self.s.buf.len() - pos;
            self.s.ready += self.s.scan.consume_message(header, avail);
        }
        None
    }

    /// Unlinked, the client sent exactly a named Parse and a Sync of a statement this pool
    /// knows: answer ParseComplete + ReadyForQuery without taking a server.
    fn answer_prepare_locally(&mut self) -> bool {
        if !self.tracker.enabled() || !self.tracker.is_idle() {
            return false;
        }
        let buf = &self.c.buf;
        let Ok(Some(p)) = Header::parse(buf, self.max_message) else {
            return false;
        };
        if p.tag != frontend::PARSE || buf.len() < p.frame_len() {
            return false;
        }
        let Ok(Some(sync)) = Header::parse(&buf[p.frame_len()..], self.max_message) else {
            return false;
        };
        if sync.tag != frontend::SYNC || sync.len != 4 {
            return false;
        }
        if !names_statement(p.tag, &buf[HEADER_LEN..p.frame_len()])
            || !self.tracker.prepare_locally(&buf[..p.frame_len()])
        {
            return false;
        }
        self.c.buf.advance(p.frame_len() + sync.frame_len());
        let out = self.s.staged();
        out.extend_from_slice(&[b'1', 0, 0, 0, 4]);
        messages::ready_for_query(out, TxStatus::Idle);
        true
    }

    /// The server is dropping prepared statements (DEALLOCATE / DISCARD from the client):
    /// iampool's list for it is stale, so it is forgotten and the server retired at release.
    fn forget_server_statements(&mut self) {
        if let Some(server) = self.server.as_mut() {
            server.statements = Default::default();
        }
        self.cycle.taint();
    }

    /// A statement created session state that transaction mode cannot carry: count it, and
    /// say so once per client and kind.
    fn note_session_state(&mut self, kind: usize) {
        let bit = 1u8 << kind;
        let kind = SESSION_STATE_KINDS[kind];
        self.pool.metrics.session_state(kind);
        if self.session_state_seen & bit == 0 {
            self.session_state_seen |= bit;
            tracing::warn!(
                database = %self.pool.database, kind,
                "a client created session state that does not follow it to other servers in \
                 transaction mode; use session mode for this client (see README)"
            );
        }
    }

    /// Writes the made-up answers that are due (after everything scanned so far).
    fn emit_synthetic(&mut self) {
        let status = self.cycle.status();
        self.tracker.drain_synthetic(&mut self.s, status);
    }

    async fn flush_to_client(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.s.poll_write_to(cx, &mut self.client)).await
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
        self.send_fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command (iampool is shutting down)",
        )
        .await;
        End::Shutdown
    }

    async fn fatal_protocol(&mut self, message: &str) -> End {
        self.send_fatal(sqlstate::PROTOCOL_VIOLATION, message).await;
        End::ProtocolError
    }

    async fn pool_error(&mut self, e: PoolError) -> End {
        let msg = match &e {
            PoolError::Timeout { .. } => format!("query_wait_timeout: {e}"),
            _ => e.to_string(),
        };
        let code = match &e {
            PoolError::Timeout { .. } => sqlstate::PROTOCOL_VIOLATION.to_owned(),
            other => other.sqlstate().to_owned(),
        };
        self.send_fatal(&code, &msg).await;
        End::PoolError
    }
}

async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
