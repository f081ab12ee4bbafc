//! LISTEN/NOTIFY in transaction mode: one server connection per pool listens on every channel
//! any of its clients listens on, and hands each notification to the clients subscribed to
//! its channel.
//!
//! A client's `LISTEN` between transactions is answered once this connection listens too, so
//! a NOTIFY sent after the answer is never missed. Each client has a bounded queue; a client
//! that does not keep up, or whose notifications may have been lost while the listening
//! connection was being replaced, is told so (the relay ends its session with an error, as
//! losing a session-mode listener's connection would), and never silently misses one.
//!
//! The connection is opened for the first channel and closed after the last one is gone.
//! It is not one of the pool's `pool_size` servers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::Pool;
use crate::protocol::framing::{HEADER_LEN, MAX_SERVER_MESSAGE};
use crate::protocol::messages::{self, backend, parse_error_fields};
use crate::stream::read_message;

/// Notifications queued per client before it counts as not keeping up.
pub const CLIENT_QUEUE: usize = 1024;

/// Why a subscriber's notifications stopped being complete.
pub const LOST_NONE: u8 = 0;
/// Its queue was full.
pub const LOST_OVERFLOW: u8 = 1;
/// The listening connection was lost; notifications sent until it was back are gone.
pub const LOST_CONNECTION: u8 = 2;

/// One client's subscriptions. Dropping it unsubscribes.
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    pub rx: mpsc::Receiver<Bytes>,
    lost: Arc<AtomicU8>,
}

struct Subscriber {
    tx: mpsc::Sender<Bytes>,
    lost: Arc<AtomicU8>,
    channels: HashSet<String>,
}

enum Command {
    Listen(String, oneshot::Sender<Result<(), String>>),
    Unlisten(String),
}

#[derive(Default)]
struct State {
    subscribers: HashMap<u64, Subscriber>,
    /// Channel -> subscribed clients.
    channels: HashMap<String, HashSet<u64>>,
    /// The listening task's commands, while it runs.
    task: Option<mpsc::UnboundedSender<Command>>,
    next_id: u64,
}

/// The pool's notification hub.
pub struct Hub {
    /// The pool whose upstream the listening connection logs in to.
    pool: Weak<Pool>,
    state: Mutex<State>,
    /// Closed: no new LISTEN is accepted (the pool is shutting down).
    closed: std::sync::atomic::AtomicBool,
}

impl Hub {
    pub fn new(pool: Weak<Pool>) -> Arc<Hub> {
        Arc::new(Hub {
            pool,
            state: Mutex::default(),
            closed: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client's (empty) subscription.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let lost = Arc::new(AtomicU8::new(LOST_NONE));
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.subscribers.insert(
            id,
            Subscriber {
                tx,
                lost: lost.clone(),
                channels: HashSet::new(),
            },
        );
        Subscription {
            hub: self.clone(),
            id,
            rx,
            lost,
        }
    }

    /// Stops the listening task when it is idle and refuses new channels.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.lock().task = None;
    }

    /// Channels listened on now (for tests and the admin console).
    pub fn channels(&self) -> usize {
        self.lock().channels.len()
    }

    fn deliver(&self, channel: &str, message: Bytes) {
        let st = self.lock();
        let Some(ids) = st.channels.get(channel) else {
            return;
        };
        for id in ids {
            if let Some(s) = st.subscribers.get(id) {
                if s.tx.try_send(message.clone()).is_err() {
                    let _ = s.lost.compare_exchange(
                        LOST_NONE,
                        LOST_OVERFLOW,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
        }
    }

    /// The listening connection was lost: every subscriber may have missed notifications.
    fn lost_connection(&self) {
        let st = self.lock();
        for s in st.subscribers.values().filter(|s| !s.channels.is_empty()) {
            let _ = s.lost.compare_exchange(
                LOST_NONE,
                LOST_CONNECTION,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Removes `id` from `channel`; the listening connection stops listening on a channel
    /// nobody wants any more.
    fn drop_channel(st: &mut State, id: u64, channel: &str) {
        let Some(ids) = st.channels.get_mut(channel) else {
            return;
        };
        ids.remove(&id);
        if ids.is_empty() {
            st.channels.remove(channel);
            if let Some(task) = &st.task {
                let _ = task.send(Command::Unlisten(channel.to_owned()));
            }
        }
    }
}

impl Subscription {
    /// Listens on `channel` (its name as PostgreSQL folds it): done once the pool's listening
    /// connection listens on it too.
    pub async fn listen(&mut self, channel: &str) -> Result<(), String> {
        if self.hub.closed.load(Ordering::Relaxed) {
            return Err("iampool is shutting down".into());
        }
        let reply = {
            let mut st = self.hub.lock();
            let State {
                subscribers,
                channels,
                task,
                ..
            } = &mut *st;
            let Some(me) = subscribers.get_mut(&self.id) else {
                return Err("not subscribed".into());
            };
            me.channels.insert(channel.to_owned());
            let ids = channels.entry(channel.to_owned()).or_default();
            ids.insert(self.id);
            let task = task.get_or_insert_with(|| spawn_listener(Arc::downgrade(&self.hub)));
            let (tx, rx) = oneshot::channel();
            if task.send(Command::Listen(channel.to_owned(), tx)).is_err() {
                return Err("the listening connection is gone".into());
            }
            rx
        };
        match reply.await {
            Ok(r) => r,
            Err(_) => Err("the listening connection is gone".into()),
        }
        .inspect_err(|_| self.unlisten(Some(channel)))
    }

    /// Stops listening on `channel`, or on every channel (`None`, UNLISTEN *).
    pub fn unlisten(&mut self, channel: Option<&str>) {
        let mut st = self.hub.lock();
        let Some(me) = st.subscribers.get_mut(&self.id) else {
            return;
        };
        let gone: Vec<String> = match channel {
            Some(c) => me.channels.take(c).into_iter().collect(),
            None => me.channels.drain().collect(),
        };
        for c in gone {
            Hub::drop_channel(&mut st, self.id, &c);
        }
    }

    /// Whether the client listens on any channel.
    pub fn listening(&self) -> bool {
        self.hub
            .lock()
            .subscribers
            .get(&self.id)
            .is_some_and(|s| !s.channels.is_empty())
    }

    /// Why the client's notifications are incomplete ([`LOST_NONE`] when they are not).
    pub fn lost(&self) -> u8 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.unlisten(None);
        self.hub.lock().subscribers.remove(&self.id);
    }
}

/// Starts the task that owns the listening connection.
fn spawn_listener(hub: Weak<Hub>) -> mpsc::UnboundedSender<Command> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run_listener(hub, rx));
    tx
}

/// Waits after a failed login or a lost listening connection before the next try.
const RETRY: Duration = Duration::from_secs(1);

async fn run_listener(hub: Weak<Hub>, mut commands: mpsc::UnboundedReceiver<Command>) {
    loop {
        let Some(pool) = hub.upgrade().and_then(|h| h.pool.upgrade()) else {
            return;
        };
        let login = pool.connector().connect().await;
        drop(pool);
        let ended = match login {
            Ok((mut conn, _)) => {
                let ended = listen_on(&hub, &mut conn, &mut commands).await;
                if ended.is_ok() {
                    let terminate = [b'X', 0, 0, 0, 4];
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        conn.stream.write_all(&terminate).await?;
                        conn.stream.flush().await
                    })
                    .await;
                }
                ended
            }
            Err(e) => Err(format!(
                "the listening server connection could not log in: {e}"
            )),
        };
        let why = match ended {
            Ok(()) => return,
            Err(why) => why,
        };
        let Some(h) = hub.upgrade() else { return };
        warn!(error = %why, database = %h.pool.upgrade().map(|p| p.database.clone()).unwrap_or_default(),
            "the LISTEN server connection failed; listening clients are told their notifications may be incomplete");
        h.lost_connection();
        // LISTENs not yet answered fail (their clients get an ERROR and may try again).
        while let Ok(c) = commands.try_recv() {
            if let Command::Listen(_, reply) = c {
                let _ = reply.send(Err(why.clone()));
            }
        }
        if h.stop_if_unused(&commands) {
            return;
        }
        drop(h);
        tokio::time::sleep(RETRY).await;
    }
}

/// Listens on every channel wanted (again, after a lost connection), then follows commands
/// and hands out notifications. Ok: nobody listens any more.
async fn listen_on(
    hub: &Weak<Hub>,
    conn: &mut crate::server::ServerConn,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Result<(), String> {
    // One entry per statement sent, in order: the LISTEN to answer when it completes.
    let mut sent: VecDeque<Option<oneshot::Sender<Result<(), String>>>> = VecDeque::new();
    let mut out = BytesMut::new();
    if let Some(h) = hub.upgrade() {
        for channel in h.lock().channels.keys() {
            messages::query(&mut out, &format!("LISTEN {}", quote_ident(channel)));
            sent.push_back(None);
        }
    }
    let mut buf = BytesMut::with_capacity(4096);
    let mut error: Option<String> = None;
    loop {
        if !out.is_empty() {
            conn.stream
                .write_all(&out)
                .await
                .map_err(|e| e.to_string())?;
            conn.stream.flush().await.map_err(|e| e.to_string())?;
            out.clear();
        }
        tokio::select! {
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(Command::Listen(channel, reply)) => {
                    messages::query(&mut out, &format!("LISTEN {}", quote_ident(&channel)));
                    sent.push_back(Some(reply));
                }
                Some(Command::Unlisten(channel)) => {
                    messages::query(&mut out, &format!("UNLISTEN {}", quote_ident(&channel)));
                    sent.push_back(None);
                }
            },
            message = read_message(&mut conn.stream, &mut buf, MAX_SERVER_MESSAGE) => {
                let (tag, body) = message.map_err(|e| e.to_string())?;
                let Some(h) = hub.upgrade() else { return Ok(()) };
                match tag {
                    backend::NOTIFICATION_RESPONSE => {
                        if let Some(channel) = notification_channel(&body) {
                            let mut m = BytesMut::with_capacity(HEADER_LEN + body.len());
                            m.extend_from_slice(&[tag]);
                            m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
                            m.extend_from_slice(&body);
                            h.deliver(channel, m.freeze());
                        }
                    }
                    backend::ERROR_RESPONSE => {
                        let f = parse_error_fields(&body);
                        let e = format!("{} [{}]", f.message, f.code);
                        if f.is_fatal() {
                            return Err(e);
                        }
                        error = Some(e);
                    }
                    backend::READY_FOR_QUERY => {
                        let result = error.take().map_or(Ok(()), Err);
                        if let Some(Some(reply)) = sent.pop_front() {
                            let _ = reply.send(result);
                        }
                        if sent.is_empty() && h.stop_if_unused(commands) {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Hub {
    /// With no channel wanted and no command queued, the listening task ends (under the
    /// lock a new LISTEN takes, so that one starts a new task).
    fn stop_if_unused(&self, commands: &mpsc::UnboundedReceiver<Command>) -> bool {
        let mut st = self.lock();
        if st.channels.is_empty() && commands.is_empty() {
            st.task = None;
            return true;
        }
        false
    }
}

/// The channel name of a NotificationResponse body (pid, channel, payload).
fn notification_channel(body: &[u8]) -> Option<&str> {
    let rest = body.get(4..)?;
    let end = memchr::memchr(0, rest)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The channel of a simple Query that is exactly one `LISTEN name` or `UNLISTEN name` /
/// `UNLISTEN *` (an optional `;`), folded as PostgreSQL folds identifiers: `Some((true,
/// Some(name)))` for LISTEN, `Some((false, None))` for UNLISTEN *. None for anything else,
/// including names PostgreSQL would truncate (over 63 bytes): those go to a server.
pub fn listen_statement(sql: &[u8]) -> Option<(bool, Option<String>)> {
    let sql = sql.strip_suffix(&[0]).unwrap_or(sql).trim_ascii();
    let sql = sql.strip_suffix(b";").unwrap_or(sql).trim_ascii_end();
    let text = std::str::from_utf8(sql).ok()?;
    let (verb, rest) = text.split_once(|c: char| c.is_ascii_whitespace())?;
    let listen = if verb.eq_ignore_ascii_case("listen") {
        true
    } else if verb.eq_ignore_ascii_case("unlisten") {
        false
    } else {
        return None;
    };
    let name = rest.trim_ascii();
    if !listen && name == "*" {
        return Some((false, None));
    }
    let folded = if let Some(quoted) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        if quoted.is_empty() || quoted.replace("\"\"", "").contains('"') {
            return None;
        }
        quoted.replace("\"\"", "\"")
    } else {
        let mut chars = name.chars();
        let first = chars.next()?;
        let plain = (first.is_ascii_alphabetic() || first == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        if !plain {
            return None;
        }
        name.to_ascii_lowercase()
    };
    (folded.len() <= 63).then_some((listen, Some(folded)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_statements_are_read_as_postgresql_folds_them() {
        let l = |s: &str| listen_statement(s.as_bytes());
        assert_eq!(l("LISTEN Jobs\0"), Some((true, Some("jobs".into()))));
        assert_eq!(l("listen \"Jobs\";"), Some((true, Some("Jobs".into()))));
        assert_eq!(l("LISTEN \"a\"\"b\""), Some((true, Some("a\"b".into()))));
        assert_eq!(l("unlisten jobs"), Some((false, Some("jobs".into()))));
        assert_eq!(l("UNLISTEN *"), Some((false, None)));
        for sql in [
            "LISTEN *",
            "LISTEN a; LISTEN b",
            "LISTEN",
            "LISTEN a b",
            "LISTEN 1a",
            "LISTEN \"\"",
            "NOTIFY a",
            "/* x */ LISTEN a",
        ] {
            assert_eq!(l(sql), None, "{sql:?}");
        }
        assert_eq!(l(&format!("LISTEN {}", "a".repeat(64))), None);
        assert!(l(&format!("LISTEN {}", "a".repeat(63))).is_some());
    }

    /// A client that does not read its notifications has a bounded queue; past it, it is
    /// marked as having lost some (the relay then ends its session with 54000), never
    /// silently skipped. A lost listening connection marks every listener.
    #[test]
    fn queues_are_bounded_and_losses_are_marked() {
        let hub = Hub::new(Weak::new());
        let mut slow = hub.subscribe();
        let other = hub.subscribe();
        {
            let mut st = hub.lock();
            for id in [slow.id, other.id] {
                st.channels.entry("c".into()).or_default().insert(id);
                st.subscribers
                    .get_mut(&id)
                    .unwrap()
                    .channels
                    .insert("c".into());
            }
        }
        for _ in 0..CLIENT_QUEUE {
            hub.deliver("c", Bytes::from_static(b"A"));
        }
        assert_eq!(slow.lost(), LOST_NONE);
        hub.deliver("d", Bytes::from_static(b"A"));
        assert_eq!(slow.lost(), LOST_NONE, "another channel");
        hub.deliver("c", Bytes::from_static(b"A"));
        assert_eq!(slow.lost(), LOST_OVERFLOW);
        assert_eq!(other.lost(), LOST_OVERFLOW);
        assert_eq!(slow.rx.try_recv().unwrap(), Bytes::from_static(b"A"));

        let late = hub.subscribe();
        hub.lock()
            .subscribers
            .get_mut(&late.id)
            .unwrap()
            .channels
            .insert("c".into());
        hub.lost_connection();
        assert_eq!(late.lost(), LOST_CONNECTION);
        assert_eq!(slow.lost(), LOST_OVERFLOW, "the first reason stays");

        slow.unlisten(None);
        drop(other);
        drop(late);
        assert_eq!(hub.channels(), 0, "nobody listens");
    }

    #[test]
    fn notification_channels_are_read() {
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"jobs\0payload\0");
        assert_eq!(notification_channel(&body), Some("jobs"));
        assert_eq!(notification_channel(b"\0\0"), None);
    }
}
