//! Server connection pools: one per (database, user).
//!
//! Checkout is FIFO: a returned or newly opened connection goes to the longest-waiting
//! client. A connection comes back only through [`Pool::checkin`] (provably clean) or
//! [`Pool::discard`] (closed); nothing is repaired. The janitor retires idle connections
//! that died, outlived `server_lifetime` or sat idle past `server_idle_timeout`, and keeps
//! `min_pool_size` open.

mod check;
mod janitor;
pub mod listen;
mod pins;
mod shared_limit;

pub use pins::PinLimit;
pub use shared_limit::SharedCount;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::config::PoolMode;
use crate::metrics::PoolMetrics;
use crate::protocol::messages::ErrorFields;
use crate::server::conn::IdleCheck;
use crate::server::connect::ServerParamList;
use crate::server::listing::{ServerList, ServerState};
use crate::server::{Connector, LoginError, ServerConn};

/// The reloadable part of a pool's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub pool_size: usize,
    pub min_pool_size: usize,
    /// Extra servers beyond pool_size, for clients that have waited `reserve_pool_timeout`.
    pub reserve_pool_size: usize,
    pub reserve_pool_timeout: Duration,
    /// Most server connections of all the pools to this pool's upstream database, and of
    /// all those signed in as its upstream user; 0 for no limit.
    pub max_db_connections: usize,
    pub max_user_connections: usize,
    pub query_wait_timeout: Duration,
    pub idle_timeout: Duration,
    /// Run on a server idle for `server_check_delay` or longer before a client gets it;
    /// empty for no check.
    pub server_check_query: String,
    pub server_check_delay: Duration,
    /// How long a server may take to answer `server_check_query`.
    pub server_check_limit: Duration,
    pub login_retry: Duration,
    /// Transaction mode: clients with session state keep their server (else they are only
    /// warned about, as PgBouncer does).
    pub pin_session_state: bool,
    pub max_pinned_servers: usize,
}

#[derive(Debug, Error, Clone)]
pub enum PoolError {
    #[error("no server connection became available within query_wait_timeout ({waited:?}){}",
        .last_error.as_ref().map(|e| format!("; last login error: {e}")).unwrap_or_default())]
    Timeout {
        waited: Duration,
        last_error: Option<String>,
    },
    /// The upstream refused the login: (SQLSTATE, message).
    #[error("{1}")]
    Login(String, String),
    /// Logins are failing and the pool has no server: the client is told at once (after a
    /// short grace) rather than at query_wait_timeout.
    #[error("the upstream cannot be reached: {last_error}; iampool tries again in {}s",
        .retry_in.as_secs().max(1))]
    Unavailable {
        last_error: String,
        retry_in: Duration,
    },
    #[error("pool is shutting down")]
    Closed,
    /// Admin KILL: the waiting client is refused, and its session is ended.
    #[error("terminating connection due to administrator command (KILL)")]
    Killed,
}

impl PoolError {
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::Timeout { .. } => {
                crate::protocol::messages::sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH
            }
            PoolError::Login(code, _) => code,
            PoolError::Unavailable { .. } => {
                crate::protocol::messages::sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH
            }
            PoolError::Closed | PoolError::Killed => {
                crate::protocol::messages::sqlstate::ADMIN_SHUTDOWN
            }
        }
    }
}

/// A server connection as the pool hands it around: boxed, so that checkout, link, release
/// and checkin move a pointer rather than the whole connection state.
pub type Server = Box<ServerConn>;

type Delivery = Result<Server, PoolError>;

/// What a checkout finds.
enum Taken {
    Ready(Server),
    /// An idle server that must answer server_check_query (this query, within this long)
    /// before the client gets it.
    Check(Server, String, Duration),
    /// No idle server: the client is queued.
    Wait(oneshot::Receiver<Delivery>, Duration),
}

struct Waiter {
    tx: oneshot::Sender<Delivery>,
    since: Instant,
}

struct State {
    settings: PoolSettings,
    /// Most recently used first (LIFO reuse keeps a warm core; the rest can idle out).
    idle: VecDeque<Server>,
    /// Every connection that exists or is being opened: idle + in use + connecting +
    /// closing. A closing connection counts until its backend has gone, so the upstream
    /// never has more than pool_size backends of this pool.
    total: usize,
    connecting: usize,
    closing: usize,
    /// Clean connections held back until a cancel on its way to them has been delivered.
    being_canceled: usize,
    waiters: VecDeque<Waiter>,
    /// Last login failure and when, so a burst of clients does not hammer a failing upstream.
    last_error: Option<(Instant, LoginError)>,
    /// Set while logins fail: no login starts before `until`, then one at a time.
    backoff: Option<Backoff>,
    /// A retry is scheduled for when the backoff ends.
    retry_armed: bool,
    /// A look at the reserve is scheduled for when the oldest waiter has waited
    /// reserve_pool_timeout.
    reserve_armed: bool,
    closed: bool,
    /// Admin PAUSE: no connection is handed out until RESUME.
    paused: bool,
    /// Admin RECONNECT: connections opened before this are closed when they come back.
    retired_before: Option<Instant>,
    /// The time as of the last janitor tick (at most 500 ms old): checkin and checkout
    /// compare lifetimes against it instead of reading the clock per transaction.
    clock: Instant,
    /// A failover was detected (when, and the sign) and no server of the right role has
    /// logged in since.
    failover: Option<(Instant, String)>,
}

/// Consecutive failed logins and when the next may start.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Instant,
}

/// The longest wait between failed logins (at least server_login_retry): a login every 10 s
/// is calm for the upstream (and RDS's IAM authentication limit), and the pool finds a
/// recovered upstream within 10 s.
pub const MAX_LOGIN_BACKOFF: Duration = Duration::from_secs(10);
/// While logins fail and the pool has no server, a client waits this long for one before it
/// is told why (at most query_wait_timeout).
pub const UNAVAILABLE_GRACE: Duration = Duration::from_secs(3);

/// The wait after the `failures`-th failed login in a row: server_login_retry doubled for
/// each failure after the first, capped, with the upper half jittered so that many pools
/// (or many iampools) do not retry in step.
fn backoff_delay(retry: Duration, failures: u32) -> Duration {
    let cap = MAX_LOGIN_BACKOFF.max(retry);
    let full = retry
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(cap);
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

impl State {
    /// Logins keep failing (two in a row at least, none running now) and the pool has no
    /// server: waiting clients are told rather than kept waiting. One failure alone is not
    /// enough, as its retry may be about to succeed. A server of the wrong role is not a
    /// reason either: the endpoint answers, and during a failover the new writer is seconds
    /// away, so clients wait for it (up to query_wait_timeout).
    fn unreachable(&self) -> Option<(Backoff, &LoginError)> {
        let b = self.backoff?;
        let (_, e) = self.last_error.as_ref()?;
        let failing_over = matches!(e, LoginError::Role { .. });
        (b.failures >= 2 && self.connecting == 0 && self.live() == 0 && !failing_over)
            .then_some((b, e))
    }

    /// Server connections that exist and are signed in (idle or in use).
    fn live(&self) -> usize {
        self.total - self.connecting - self.closing
    }

    /// Connections in use by clients (or held back for a cancel).
    fn busy(&self) -> usize {
        self.total - self.idle.len() - self.connecting - self.closing
    }

    /// Whether the longest-waiting client has waited reserve_pool_timeout (waiters are
    /// FIFO, so the first live one is the oldest).
    fn reserve_due(&self, now: Instant) -> bool {
        self.settings.reserve_pool_size > 0
            && self
                .waiters
                .iter()
                .find(|w| !w.tx.is_closed())
                .is_some_and(|w| {
                    now.saturating_duration_since(w.since) >= self.settings.reserve_pool_timeout
                })
    }

    /// The most connections the pool may have now: pool_size, and its reserve while a
    /// client has waited reserve_pool_timeout.
    fn limit(&self, now: Instant) -> usize {
        match self.reserve_due(now) {
            true => self.settings.pool_size + self.settings.reserve_pool_size,
            false => self.settings.pool_size,
        }
    }
}

/// A snapshot for the admin console and metrics.
#[derive(Debug, Clone, Default)]
pub struct PoolStatus {
    pub idle: usize,
    pub active: usize,
    pub connecting: usize,
    /// Held out of the pool until a cancel for them has been delivered.
    pub being_canceled: usize,
    pub waiting: usize,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    pub max_db_connections: usize,
    pub max_user_connections: usize,
    pub mode: Option<PoolMode>,
    /// Logged-in client sessions of this pool, and those holding a server right now.
    pub sessions: usize,
    pub linked_clients: usize,
    /// Servers kept by clients for their session state, and the most allowed.
    pub pinned: usize,
    pub max_pinned: usize,
    pub longest_wait: Duration,
    pub paused: bool,
    /// Admin DISABLE: new clients are refused.
    pub disabled: bool,
    /// A login has succeeded since the last failure (or none was tried yet and none failed).
    pub last_login_ok: bool,
    pub warmed: bool,
}

pub struct Pool {
    pub database: String,
    pub user: String,
    connector: Connector,
    state: Mutex<State>,
    /// ParameterStatus set from the first login, sent to clients at their login.
    welcome: Mutex<Option<Arc<ServerParamList>>>,
    pub metrics: PoolMetrics,
    /// Logged-in client sessions, and how many of them hold a server.
    pub sessions: AtomicUsize,
    pub linked: AtomicUsize,
    /// Named statements that prepared successfully on a server of this pool.
    pub statements: Arc<crate::protocol::statements::KnownStatements>,
    /// Servers pinned to clients for their session state, and the limit.
    pub pins: Arc<PinLimit>,
    /// LISTEN/NOTIFY for transaction-mode clients: one listening connection for all.
    pub notifications: Arc<listen::Hub>,
    /// Every server connection of the pool, for the admin console.
    pub servers: Arc<ServerList>,
    /// Admin DISABLE: new clients are refused until ENABLE.
    disabled: AtomicBool,
    /// Server connections of every pool to the same upstream database, and signed in as the
    /// same upstream user (max_db_connections, max_user_connections).
    pub db_count: Arc<SharedCount>,
    pub user_count: Arc<SharedCount>,
    /// Clients wait that a full shared count kept this pool from opening a connection for.
    starved: AtomicBool,
}

impl Pool {
    /// `servers` is the list the pool's connections enter (for the admin console);
    /// `db_count` and `user_count` are shared with the pools to the same upstream database
    /// and user.
    pub fn new(
        database: String,
        connector: Connector,
        settings: PoolSettings,
        metrics: PoolMetrics,
        servers: Arc<ServerList>,
        (db_count, user_count): (Arc<SharedCount>, Arc<SharedCount>),
    ) -> Arc<Pool> {
        let user = connector.upstream.user.clone();
        let pins = Arc::new(PinLimit::new(settings.max_pinned_servers));
        Arc::new_cyclic(|pool| {
            db_count.join(pool.clone());
            user_count.join(pool.clone());
            Pool {
                database,
                user,
                connector,
                state: Mutex::new(State {
                    settings,
                    idle: VecDeque::new(),
                    total: 0,
                    connecting: 0,
                    closing: 0,
                    being_canceled: 0,
                    waiters: VecDeque::new(),
                    last_error: None,
                    backoff: None,
                    retry_armed: false,
                    reserve_armed: false,
                    closed: false,
                    paused: false,
                    retired_before: None,
                    clock: Instant::now(),
                    failover: None,
                }),
                welcome: Mutex::new(None),
                metrics,
                sessions: AtomicUsize::new(0),
                linked: AtomicUsize::new(0),
                statements: Default::default(),
                pins,
                notifications: listen::Hub::new(pool.clone()),
                servers,
                disabled: AtomicBool::new(false),
                db_count,
                user_count,
                starved: AtomicBool::new(false),
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode(&self) -> PoolMode {
        self.lock().settings.mode
    }

    /// The pin slots for a new transaction-mode session, if this pool pins clients with
    /// session state.
    pub fn pinning(&self) -> Option<Arc<PinLimit>> {
        let st = self.lock();
        (st.settings.mode == PoolMode::Transaction && st.settings.pin_session_state)
            .then(|| self.pins.clone())
    }

    /// Applies reloaded settings; a smaller pool shrinks as connections come back.
    pub fn update_settings(self: &Arc<Self>, settings: PoolSettings) {
        let mut st = self.lock();
        self.pins.set_max(settings.max_pinned_servers);
        st.settings = settings;
        self.grow_for_waiters(&mut st);
    }

    pub fn status(&self) -> PoolStatus {
        let st = self.lock();
        let now = Instant::now();
        let live = st.waiters.iter().filter(|w| !w.tx.is_closed());
        PoolStatus {
            idle: st.idle.len(),
            active: st.busy(),
            connecting: st.connecting,
            being_canceled: st.being_canceled,
            waiting: live.clone().count(),
            pool_size: st.settings.pool_size,
            min_pool_size: st.settings.min_pool_size,
            reserve_pool_size: st.settings.reserve_pool_size,
            max_db_connections: st.settings.max_db_connections,
            max_user_connections: st.settings.max_user_connections,
            mode: Some(st.settings.mode),
            sessions: self.sessions.load(Ordering::Relaxed),
            linked_clients: self.linked.load(Ordering::Relaxed),
            pinned: self.pins.pinned(),
            max_pinned: self.pins.max(),
            longest_wait: live
                .map(|w| now.duration_since(w.since))
                .max()
                .unwrap_or_default(),
            paused: st.paused,
            disabled: self.is_disabled(),
            last_login_ok: st.last_error.is_none(),
            warmed: self
                .welcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some(),
        }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Waits (FIFO, up to `query_wait_timeout`) for a clean server connection.
    pub async fn checkout(self: &Arc<Self>) -> Result<Server, PoolError> {
        let started = Instant::now();
        let (rx, wait) = loop {
            let (mut conn, sql, limit) = match self.take_idle_or_wait()? {
                Taken::Ready(conn) => return Ok(conn),
                Taken::Check(conn, sql, limit) => (conn, sql, limit),
                Taken::Wait(rx, wait) => break (rx, wait),
            };
            if check::passes(&mut conn, &sql, limit).await {
                self.metrics.wait.observe(started.elapsed().as_secs_f64());
                return Ok(conn);
            }
            self.discard(conn);
        };
        self.wait_for(rx, wait).await
    }

    /// An idle server (checked or about to be), or a place in the queue: in one step, so a
    /// server checked in meanwhile cannot sit idle while this client waits.
    fn take_idle_or_wait(self: &Arc<Self>) -> Result<Taken, PoolError> {
        {
            let mut st = self.lock();
            if st.closed {
                return Err(PoolError::Closed);
            }
            let clock = st.clock;
            while let Some(mut conn) = (!st.paused).then(|| st.idle.pop_front()).flatten() {
                match conn.check_idle() {
                    IdleCheck::Healthy if !conn.expired(clock) => {
                        conn.set_state(ServerState::Active, clock);
                        if check::due(&st.settings, &conn, clock) {
                            let sql = st.settings.server_check_query.clone();
                            return Ok(Taken::Check(conn, sql, st.settings.server_check_limit));
                        }
                        self.metrics.wait.observe(0.0);
                        return Ok(Taken::Ready(conn));
                    }
                    IdleCheck::Gone { fatal } => {
                        if let Some(sign) = failover_sign(fatal.as_ref()) {
                            self.failover_locked(&mut st, &conn, &sign);
                        }
                        self.forget(&mut st, conn);
                    }
                    _ => self.forget(&mut st, conn),
                }
            }
            // A login failed permanently and the backoff has not run out: fail fast instead
            // of hammering.
            let now = Instant::now();
            st.clock = now;
            if let (Some((_, e)), Some(b)) = (&st.last_error, &st.backoff) {
                if e.is_permanent() && now < b.until {
                    let (code, msg) = e.client_error();
                    return Err(PoolError::Login(code, msg));
                }
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter { tx, since: now });
            self.grow_for_waiters(&mut st);
            Ok(Taken::Wait(rx, st.settings.query_wait_timeout))
        }
    }

    /// Waits in the queue (FIFO, up to `wait`) for a server.
    async fn wait_for(
        self: &Arc<Self>,
        mut rx: oneshot::Receiver<Delivery>,
        wait: Duration,
    ) -> Result<Server, PoolError> {
        let started = Instant::now();
        let give_up = started + wait;
        // Every UNAVAILABLE_GRACE the wait looks up: if logins are failing and the pool has
        // no server at all, the client is told why now rather than at query_wait_timeout.
        let mut deadline = (started + UNAVAILABLE_GRACE).min(give_up);
        let waited = loop {
            match tokio::time::timeout_at(deadline.into(), &mut rx).await {
                Ok(delivery) => break Ok(delivery),
                Err(_) if deadline >= give_up => break Err(None),
                Err(_) => {
                    let st = self.lock();
                    if let Some((b, e)) = st.unreachable() {
                        break Err(Some(PoolError::Unavailable {
                            last_error: e.to_string(),
                            retry_in: b.until.saturating_duration_since(Instant::now()),
                        }));
                    }
                    deadline = (deadline + UNAVAILABLE_GRACE).min(give_up);
                }
            }
        };
        self.metrics.wait.observe(started.elapsed().as_secs_f64());
        match waited {
            Ok(Ok(delivery)) => delivery,
            Ok(Err(_)) => Err(PoolError::Closed),
            Err(why) => {
                // Close the channel first: a connection sent in the meantime is still ours.
                rx.close();
                if let Ok(delivery) = rx.try_recv() {
                    return delivery;
                }
                self.metrics.checkout_timeouts.inc();
                let mut st = self.lock();
                st.waiters.retain(|w| !w.tx.is_closed());
                Err(why.unwrap_or_else(|| PoolError::Timeout {
                    waited: wait,
                    last_error: st.last_error.as_ref().map(|(_, e)| e.to_string()),
                }))
            }
        }
    }

    /// Returns a provably clean connection (ReadyForQuery 'I', nothing outstanding). One
    /// that a cancel is on its way to is held back until the cancel has been delivered, so
    /// the cancel cannot reach the next client's query.
    pub fn checkin(self: &Arc<Self>, mut conn: Server) {
        if conn.cancels.busy() {
            let mut st = self.lock();
            st.being_canceled += 1;
            conn.set_state(ServerState::BeingCanceled, st.clock);
            drop(st);
            let pool = self.clone();
            tokio::spawn(async move {
                let delivered = tokio::time::timeout(CANCEL_HOLD, conn.cancels.wait()).await;
                pool.lock().being_canceled -= 1;
                match delivered {
                    Ok(()) => pool.checkin(conn),
                    Err(_) => pool.discard(conn),
                }
            });
            return;
        }
        if self.changed_role(&conn) {
            // A promotion or demotion: every connection opened before now is to a server
            // of the wrong kind or is about to go, so all are replaced (each new login checks).
            self.failover(&conn, "the server reported a new role (in_hot_standby)");
            self.discard(conn);
            return;
        }
        let mut st = self.lock();
        let now = st.clock;
        let retired = st.retired_before.is_some_and(|t| conn.created_at <= t);
        // Above pool_size (a reserve connection, or a pool shrunk by a reload) a connection
        // stays only for a client that has waited reserve_pool_timeout.
        let over = st.total > st.limit(Instant::now());
        if st.closed || conn.expired(now) || retired || over {
            self.forget(&mut st, conn);
            return;
        }
        conn.idle_since = now;
        self.deliver(&mut st, conn);
    }

    /// Whether a server reports a role (since its login) that this pool does not take.
    fn changed_role(&self, conn: &ServerConn) -> bool {
        let target = self.connector.upstream.target_session_attrs;
        crate::server::role::must_check(target)
            && crate::server::role::ServerRole::reported(&conn.params)
                .is_some_and(|role| !role.accepted_by(target))
    }

    /// A connection after a write it refused as read-only (25006): a writer pool asks the
    /// server what it is (in the background), and a demoted server is a failover sign.
    pub fn checkin_after_read_only(self: &Arc<Self>, mut conn: Server) {
        let target = self.connector.upstream.target_session_attrs;
        if !crate::server::role::must_check(target) {
            self.checkin(conn);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let mut buf = bytes::BytesMut::new();
            let asked = tokio::time::timeout(
                Duration::from_secs(5),
                crate::server::role::query(&mut conn.stream, &mut buf),
            )
            .await;
            match asked {
                Ok(Ok(role)) if role.accepted_by(target) && buf.is_empty() => pool.checkin(conn),
                Ok(Ok(role)) => {
                    pool.failover(
                        &conn,
                        &format!("a write was refused: the server is {}", role.describe()),
                    );
                    pool.discard(conn);
                }
                _ => pool.discard(conn),
            }
        });
    }

    /// A connection that died while a client had it (see [`failover_sign`]).
    pub fn lost(self: &Arc<Self>, conn: Server, fatal: Option<&ErrorFields>) {
        let mut st = self.lock();
        if let Some(sign) = failover_sign(fatal) {
            self.failover_locked(&mut st, &conn, &sign);
        }
        self.forget(&mut st, conn);
    }

    /// A sign of a failover from `conn`.
    fn failover(self: &Arc<Self>, conn: &ServerConn, sign: &str) {
        let mut st = self.lock();
        self.failover_locked(&mut st, conn, sign);
    }

    /// A sign of a failover from `conn`: unless the connections opened before it were
    /// already retired, every connection is replaced now (idle ones at once, the rest when
    /// they come back) and the time until a server answers again is measured. Each new
    /// login resolves the host name again and checks the server's role.
    fn failover_locked(self: &Arc<Self>, st: &mut State, conn: &ServerConn, sign: &str) {
        // A connection an administrator cut (KILL) went away for that reason alone.
        if conn.killed() || st.retired_before.is_some_and(|t| conn.created_at <= t) {
            return;
        }
        if st.failover.is_none() {
            st.failover = Some((Instant::now(), sign.to_owned()));
        }
        self.metrics.failovers.inc();
        warn!(
            pool = %self.database, backend_pid = conn.backend_pid, server = %conn.cancel_addr,
            target_session_attrs = crate::config::Named::name(self.connector.upstream.target_session_attrs),
            sign, "failover detected; replacing every server connection of the pool"
        );
        self.retire_locked(st);
    }

    /// Closes a connection that is not clean, or that the caller otherwise will not return.
    pub fn discard(self: &Arc<Self>, conn: Server) {
        let mut st = self.lock();
        self.forget(&mut st, conn);
    }

    /// The ParameterStatus set clients get at login, logging a server in if none has yet.
    pub async fn welcome_params(self: &Arc<Self>) -> Result<Arc<ServerParamList>, PoolError> {
        if let Some(p) = self
            .welcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(p);
        }
        let conn = self.checkout().await?;
        self.checkin(conn);
        self.welcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(PoolError::Closed)
    }

    /// Stops handing out connections, fails waiters and closes idle connections.
    pub fn close(self: &Arc<Self>) {
        self.notifications.close();
        let mut st = self.lock();
        st.closed = true;
        for w in st.waiters.drain(..) {
            let _ = w.tx.send(Err(PoolError::Closed));
        }
        while let Some(conn) = st.idle.pop_front() {
            self.forget(&mut st, conn);
        }
    }

    /// Admin PAUSE: stop handing out connections; resolves once no server is in use.
    pub async fn pause(self: &Arc<Self>) {
        self.lock().paused = true;
        loop {
            let busy = {
                let st = self.lock();
                st.busy()
            };
            if busy == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Admin RESUME: hand connections out again, oldest waiter first.
    pub fn resume(self: &Arc<Self>) {
        let mut st = self.lock();
        st.paused = false;
        while !st.waiters.is_empty() {
            let Some(conn) = st.idle.pop_front() else {
                break;
            };
            self.deliver(&mut st, conn);
        }
        self.grow_for_waiters(&mut st);
    }

    /// Closes every idle connection now and marks the rest to close when they come back
    /// (admin RECONNECT, credential changes).
    pub fn retire_all(self: &Arc<Self>) {
        let mut st = self.lock();
        self.retire_locked(&mut st);
    }

    /// Admin DISABLE / ENABLE: whether new clients are refused.
    pub fn set_disabled(&self, disabled: bool) {
        self.disabled.store(disabled, Ordering::Relaxed);
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    /// Admin KILL: pauses the pool (clients that come wait for RESUME), refuses the clients
    /// waiting now, closes idle connections and cuts the sockets of those in use, so their
    /// clients lose them at once; returns how many were cut. Ending the pool's client
    /// sessions is the caller's part.
    pub fn kill(self: &Arc<Self>) -> usize {
        let mut st = self.lock();
        st.paused = true;
        for w in st.waiters.drain(..) {
            let _ = w.tx.send(Err(PoolError::Killed));
        }
        self.retire_locked(&mut st);
        drop(st);
        self.servers.cut(|s| s.state() != ServerState::Closing)
    }

    /// Whether a connection is marked to close when it comes back (RECONNECT, a failover):
    /// PgBouncer's `close_needed`.
    pub fn close_needed(&self, created: Instant) -> bool {
        self.lock().retired_before.is_some_and(|t| created <= t)
    }

    /// Admin WAIT_CLOSE: resolves once no connection marked to close is left, closing ones
    /// included (their backends have gone).
    pub async fn wait_close(&self) {
        loop {
            let retired_before = self.lock().retired_before;
            let Some(t) = retired_before else { return };
            if !self.servers.snapshot().iter().any(|s| s.created() <= t) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn retire_locked(self: &Arc<Self>, st: &mut State) {
        st.retired_before = Some(Instant::now());
        while let Some(conn) = st.idle.pop_front() {
            self.forget(st, conn);
        }
        self.grow_for_waiters(st);
    }

    fn deliver(self: &Arc<Self>, st: &mut State, mut conn: Server) {
        // Paused: the connection waits in the idle list (a popped waiter would be dropped).
        while let Some(w) = (!st.paused).then(|| st.waiters.pop_front()).flatten() {
            conn.set_state(ServerState::Active, st.clock);
            match w.tx.send(Ok(conn)) {
                Ok(()) => return,
                Err(Ok(back)) => conn = back,
                Err(Err(_)) => unreachable!("only connections are sent here"),
            }
        }
        if self.shared_count_wanted(st) {
            // Another pool's clients wait for a place in a shared count this server holds.
            self.forget(st, conn);
            return;
        }
        conn.set_state(ServerState::Idle, st.clock);
        st.idle.push_front(conn);
    }

    /// Whether a pool sharing a full max_db_connections or max_user_connections count with
    /// this one has clients waiting that it could not open a connection for.
    fn shared_count_wanted(&self, st: &State) -> bool {
        let (db, user) = (
            st.settings.max_db_connections,
            st.settings.max_user_connections,
        );
        (db > 0 && self.db_count.count() >= db && self.db_count.other_starved(self))
            || (user > 0 && self.user_count.count() >= user && self.user_count.other_starved(self))
    }

    /// Closes a connection in the background. It stays on the books until its backend has
    /// gone: a backend still working (answers owed) is cancelled first, then sent Terminate,
    /// and the connection read to its end.
    fn forget(self: &Arc<Self>, st: &mut State, conn: Server) {
        st.closing += 1;
        conn.set_state(ServerState::Closing, st.clock);
        debug!(pool = %self.database, backend_pid = conn.backend_pid, "closing server connection");
        let pool = self.clone();
        tokio::spawn(async move {
            close(conn).await;
            let mut st = pool.lock();
            st.closing -= 1;
            st.total -= 1;
            pool.give_back_places();
            pool.grow_for_waiters(&mut st);
        });
    }

    /// Opens connections while clients wait and the pool has room.
    fn grow_for_waiters(self: &Arc<Self>, st: &mut State) {
        st.waiters.retain(|w| !w.tx.is_closed());
        // Set again below if a shared count still turns a waiting client away.
        self.starved.store(false, Ordering::Relaxed);
        if let Some(b) = st.backoff {
            // Logins are failing: none before the backoff ends, then one at a time until
            // one succeeds, however many clients wait.
            if st.closed || st.paused || st.waiters.is_empty() {
                return;
            }
            let now = Instant::now();
            if now < b.until {
                self.arm_retry(st, b.until);
            } else if st.connecting == 0 && st.total < st.limit(now) {
                self.spawn_connect(st);
            }
            return;
        }
        let limit = st.limit(Instant::now());
        while !st.closed && !st.paused && st.total < limit && st.waiters.len() > st.connecting {
            if !self.spawn_connect(st) {
                break;
            }
        }
        self.arm_reserve(st);
    }

    /// Clients wait that no login in progress will serve, and the pool has a reserve it
    /// may not use yet: look again once the oldest has waited reserve_pool_timeout (one
    /// timer at a time; each look arms the next).
    fn arm_reserve(self: &Arc<Self>, st: &mut State) {
        if st.reserve_armed
            || st.closed
            || st.paused
            || st.settings.reserve_pool_size == 0
            || st.waiters.len() <= st.connecting
        {
            return;
        }
        let Some(oldest) = st.waiters.front() else {
            return;
        };
        let at = oldest.since + st.settings.reserve_pool_timeout;
        if at <= Instant::now() {
            return;
        }
        st.reserve_armed = true;
        let pool = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut st = pool.lock();
            st.reserve_armed = false;
            pool.grow_for_waiters(&mut st);
        });
    }

    /// Tries again for the waiting clients once the backoff ends (one timer at a time).
    fn arm_retry(self: &Arc<Self>, st: &mut State, at: Instant) {
        if st.retry_armed {
            return;
        }
        st.retry_armed = true;
        let pool = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut st = pool.lock();
            st.retry_armed = false;
            pool.grow_for_waiters(&mut st);
        });
    }

    /// Opens a connection, unless max_db_connections or max_user_connections is reached
    /// (then another pool sharing the full count is asked for an idle server): whether it
    /// started.
    fn spawn_connect(self: &Arc<Self>, st: &mut State) -> bool {
        // Only clients waiting are a reason to close another pool's server, not keeping
        // min_pool_size or renewing ahead of time.
        let waited = !st.waiters.is_empty();
        if !self.db_count.try_take(st.settings.max_db_connections) {
            if waited {
                self.starved.store(true, Ordering::Relaxed);
                self.evict_elsewhere(self.db_count.clone());
            }
            return false;
        }
        if !self.user_count.try_take(st.settings.max_user_connections) {
            self.db_count.give_back();
            if waited {
                self.starved.store(true, Ordering::Relaxed);
                self.evict_elsewhere(self.user_count.clone());
            }
            return false;
        }
        st.total += 1;
        st.connecting += 1;
        let pool = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = pool.connector.connect().await;
            let secs = started.elapsed().as_secs_f64();
            match &result {
                Ok(_) => pool.metrics.login_ok.observe(secs),
                Err(e) => {
                    pool.metrics.login_failed.observe(secs);
                    pool.metrics.login_failure(e.kind());
                }
            }
            pool.connected(result);
        });
        true
    }

    /// A connection is gone: its places in the shared counts are free, and the other pools
    /// sharing them look at their waiting clients again (in a task: no two pools' locks are
    /// ever held together).
    fn give_back_places(self: &Arc<Self>) {
        self.db_count.give_back();
        self.user_count.give_back();
        let mut others = self.db_count.others(self);
        others.extend(self.user_count.others(self));
        if others.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for pool in others {
                let mut st = pool.lock();
                pool.grow_for_waiters(&mut st);
            }
        });
    }

    /// This pool's clients wait on a full shared count: one idle server of another pool
    /// sharing it, one with no client waiting, is closed to make room (its least recently
    /// used).
    fn evict_elsewhere(self: &Arc<Self>, count: Arc<SharedCount>) {
        let me = self.clone();
        tokio::spawn(async move {
            for other in count.others(&me) {
                let mut st = other.lock();
                if st.waiters.iter().any(|w| !w.tx.is_closed()) {
                    continue;
                }
                if let Some(conn) = st.idle.pop_back() {
                    debug!(pool = %other.database, for_pool = %me.database, backend_pid = conn.backend_pid,
                        "closing an idle server to make room under max_db_connections or max_user_connections");
                    other.forget(&mut st, conn);
                    return;
                }
            }
        });
    }

    fn connected(self: &Arc<Self>, result: Result<(ServerConn, ServerParamList), LoginError>) {
        let mut st = self.lock();
        st.connecting -= 1;
        match result {
            Ok((conn, params)) => {
                let mut conn = Box::new(conn);
                self.servers.enter(&mut conn);
                st.last_error = None;
                st.backoff = None;
                if let Some((detected, sign)) = st.failover.take() {
                    let took = detected.elapsed();
                    self.metrics.failover_recovery.observe(took.as_secs_f64());
                    warn!(
                        pool = %self.database, server = %conn.cancel_addr, sign = %sign,
                        recovered_ms = took.as_millis() as u64,
                        "failover over: a server of the right role answered"
                    );
                }
                {
                    let mut w = self.welcome.lock().unwrap_or_else(|e| e.into_inner());
                    if w.is_none() {
                        *w = Some(Arc::new(params));
                    }
                }
                if st.closed {
                    self.forget(&mut st, conn);
                } else {
                    self.deliver(&mut st, conn);
                }
            }
            Err(e) => {
                st.total -= 1;
                self.give_back_places();
                let now = Instant::now();
                let failures = st.backoff.map_or(0, |b| b.failures) + 1;
                let delay = backoff_delay(st.settings.login_retry, failures);
                st.backoff = Some(Backoff {
                    failures,
                    until: now + delay,
                });
                if failures == 1 || failures.is_power_of_two() {
                    warn!(pool = %self.database, error = %e, failures,
                        retry_in_ms = delay.as_millis() as u64, "server login failed; backing off");
                }
                if e.is_permanent() {
                    // Retrying cannot help soon: tell every waiting client now.
                    let (code, msg) = e.client_error();
                    for w in st.waiters.drain(..) {
                        let _ = w.tx.send(Err(PoolError::Login(code.clone(), msg.clone())));
                    }
                } else if !st.waiters.is_empty() {
                    // Transient (refused, reset, timeout, too many connections): try again
                    // when the backoff ends, while clients still wait.
                    self.arm_retry(&mut st, now + delay);
                }
                st.last_error = Some((now, e));
            }
        }
    }

    /// Janitor's entry point: see `janitor.rs`.
    pub fn spawn_janitor(self: &Arc<Self>) {
        janitor::spawn(self.clone());
    }
}

/// Whether a server that went away said goodbye as a failover's server does: shut down
/// (57P01 admin, 57P02 crash, 57P03 cannot connect now), or closed or reset without a word.
/// Another FATAL (an idle timeout, a terminated backend's own reason) concerns that
/// connection alone. pg_terminate_backend also says 57P01; replacing the other connections
/// then costs only logins.
fn failover_sign(fatal: Option<&ErrorFields>) -> Option<String> {
    match fatal {
        None => Some("the server closed or reset the connection".to_owned()),
        Some(f) if matches!(f.code.as_str(), "57P01" | "57P02" | "57P03") => {
            Some(format!("the server went away: {} [{}]", f.message, f.code))
        }
        Some(_) => None,
    }
}

/// How long a clean connection is held back for a cancel on its way to it (the cancel
/// itself gives up after 5 s).
const CANCEL_HOLD: Duration = Duration::from_secs(10);

/// Ends a server connection: cancels what its backend is still running, sends Terminate,
/// and waits (bounded) until the server has closed its end.
async fn close(mut conn: Server) {
    if !conn.exchange.is_quiet() {
        let ok = crate::server::cancel::send_cancel(
            conn.cancel_addr,
            conn.backend_pid,
            conn.backend_secret,
        )
        .await;
        debug!(
            backend_pid = conn.backend_pid,
            ok, "cancelled the query of a server being closed"
        );
    }
    let terminate = [b'X', 0, 0, 0, 4];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        conn.stream.write_all(&terminate).await?;
        conn.stream.flush().await?;
        let mut sink = [0u8; 1024];
        while conn.stream.read(&mut sink).await? > 0 {}
        conn.stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let retry = Duration::from_millis(200);
        for failures in 1..=12u32 {
            let full = (retry * 2u32.pow(failures - 1)).min(MAX_LOGIN_BACKOFF);
            for _ in 0..50 {
                let d = backoff_delay(retry, failures);
                assert!(
                    d >= full / 2 && d <= full,
                    "failure {failures}: {d:?} of {full:?}"
                );
            }
        }
        // A retry setting above the cap is honoured as it is.
        let long = Duration::from_secs(60);
        assert!(backoff_delay(long, 10) <= long);
        assert!(backoff_delay(long, 10) >= long / 2);
        // Absurd failure counts do not overflow.
        assert!(backoff_delay(retry, u32::MAX) <= MAX_LOGIN_BACKOFF);
    }
}
