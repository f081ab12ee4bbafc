//! A TCP proxy on 127.0.0.1:0 that injects network faults, for tests.
//!
//! Put it between iampool and PostgreSQL (point the pooler's upstream port at
//! [`FaultProxy::port`]) or between a client and iampool. The test changes its behaviour at
//! any time; every change applies to connections already open as well as new ones.
//!
//! Directions: [`Dir::Up`] carries what the connecting side sends (towards the target),
//! [`Dir::Down`] what the target sends back.
//!
//! - [`FaultProxy::set_latency`]: each chunk waits this long before it is forwarded.
//! - [`FaultProxy::stall`] / [`FaultProxy::resume`]: stop forwarding (and reading, so TCP
//!   back-pressure builds) while both connections stay open.
//! - [`FaultProxy::trickle`]: deliver one byte at a time, with a pause between bytes.
//! - [`FaultProxy::swallow`]: read and drop everything (a one-way black hole).
//! - [`FaultProxy::cut_all`]: close every open connection on both sides (FIN).
//! - [`FaultProxy::reset_all`]: abort every open connection on both sides (RST, via
//!   `SO_LINGER` 0).
//! - [`FaultProxy::set_new`]: what happens to new connections: forwarded, refused (the
//!   listener is closed, so connects get ECONNREFUSED), reset right after accept, or
//!   black-holed (accepted, read, never answered, never forwarded).
//! - [`FaultProxy::heal`]: back to a plain proxy.
//!
//! Bounded: one task per connection, 16 kB per read, and the tasks end when either side
//! closes, on `cut_all`/`reset_all`, or when the proxy is dropped.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A direction of traffic through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting side to the target.
    Up,
    /// From the target back to the connecting side.
    Down,
    Both,
}

/// What the proxy does with new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewConns {
    Forward,
    /// Nobody listens: connects are refused (ECONNREFUSED).
    Refuse,
    /// Accepted, then reset at once.
    Reset,
    /// Accepted and read, but never forwarded and never answered.
    Blackhole,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct DirFaults {
    latency: Duration,
    stalled: bool,
    /// Pause between bytes when delivering one byte at a time.
    trickle: Option<Duration>,
    swallow: bool,
}

#[derive(Clone, Debug, PartialEq)]
struct Faults {
    up: DirFaults,
    down: DirFaults,
    new: NewConns,
}

impl Faults {
    fn dir(&self, up: bool) -> &DirFaults {
        if up {
            &self.up
        } else {
            &self.down
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    Cut,
    Reset,
}

struct Shared {
    target: Mutex<SocketAddr>,
    faults: watch::Sender<Faults>,
    /// Bumped by cut_all/reset_all; connections open at that moment end.
    kill: watch::Sender<(u64, Kill)>,
    accepted: AtomicU64,
    forwarded: AtomicU64,
    open: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// The next connection to send bytes upstream is reset instead (one shot).
    reset_next_up: std::sync::atomic::AtomicBool,
}

/// The proxy; it stops (and closes every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1:0 forwarding to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            faults: watch::Sender::new(Faults {
                up: DirFaults::default(),
                down: DirFaults::default(),
                new: NewConns::Forward,
            }),
            kill: watch::Sender::new((0, Kill::Cut)),
            accepted: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            open: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            reset_next_up: std::sync::atomic::AtomicBool::new(false),
        });
        let acceptor = tokio::spawn(accept_loop(listener, addr, shared.clone()));
        FaultProxy {
            addr,
            shared,
            acceptor,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where new connections go.
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    fn change(&self, dir: Dir, f: impl Fn(&mut DirFaults)) {
        self.shared.faults.send_modify(|faults| {
            if matches!(dir, Dir::Up | Dir::Both) {
                f(&mut faults.up);
            }
            if matches!(dir, Dir::Down | Dir::Both) {
                f(&mut faults.down);
            }
        });
    }

    pub fn set_latency(&self, dir: Dir, latency: Duration) {
        self.change(dir, |d| d.latency = latency);
    }

    /// Stops forwarding in `dir`; connections stay open.
    pub fn stall(&self, dir: Dir) {
        self.change(dir, |d| d.stalled = true);
    }

    pub fn resume(&self, dir: Dir) {
        self.change(dir, |d| d.stalled = false);
    }

    /// One byte at a time, `pause` between bytes; `None` turns it off.
    pub fn trickle(&self, dir: Dir, pause: Option<Duration>) {
        self.change(dir, |d| d.trickle = pause);
    }

    /// Read and drop everything in `dir`.
    pub fn swallow(&self, dir: Dir, on: bool) {
        self.change(dir, |d| d.swallow = on);
    }

    pub fn set_new(&self, new: NewConns) {
        self.shared.faults.send_modify(|f| f.new = new);
    }

    /// No faults: every direction forwards at once, new connections are forwarded.
    pub fn heal(&self) {
        self.shared.faults.send_replace(Faults {
            up: DirFaults::default(),
            down: DirFaults::default(),
            new: NewConns::Forward,
        });
    }

    /// Closes both sides of every open connection (FIN); returns how many were open.
    pub fn cut_all(&self) -> u64 {
        self.kill(Kill::Cut)
    }

    /// The next open connection whose client side sends anything is reset (RST) instead of
    /// forwarding it, once: a server that dies just as it is asked something.
    pub fn reset_next_upstream_write(&self) {
        self.shared.reset_next_up.store(true, Ordering::SeqCst);
    }

    /// Whether a [`FaultProxy::reset_next_upstream_write`] has yet to fire.
    pub fn reset_pending(&self) -> bool {
        self.shared.reset_next_up.load(Ordering::SeqCst)
    }

    /// Aborts both sides of every open connection (RST); returns how many were open.
    pub fn reset_all(&self) -> u64 {
        self.kill(Kill::Reset)
    }

    fn kill(&self, how: Kill) -> u64 {
        let open = self.open();
        self.shared.kill.send_modify(|(n, k)| {
            *n += 1;
            *k = how;
        });
        open
    }

    /// Connections accepted so far (whatever happened to them).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections forwarded to the target so far.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Bytes forwarded in `dir` so far (`Both`: the sum).
    pub fn bytes(&self, dir: Dir) -> u64 {
        let up = self.shared.bytes_up.load(Ordering::SeqCst);
        let down = self.shared.bytes_down.load(Ordering::SeqCst);
        match dir {
            Dir::Up => up,
            Dir::Down => down,
            Dir::Both => up + down,
        }
    }

    /// Polls until `done()` holds, for at most `limit`; false if it never did.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&FaultProxy) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        // Ends every connection task.
        self.reset_all();
    }
}

/// Counts an open connection while it lives.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut faults = shared.faults.subscribe();
    let mut listener = Some(listener);
    loop {
        let refusing = faults.borrow_and_update().new == NewConns::Refuse;
        if refusing {
            // Nobody listens while refusing; bind the same port again afterwards.
            listener = None;
            if faults.changed().await.is_err() {
                return;
            }
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                listener = Some(rebind(addr).await);
                continue;
            }
        };
        tokio::select! {
            accepted = l.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                shared.open.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(shared.clone());
                let mode = shared.faults.borrow().new;
                tokio::spawn(serve(client, mode, shared.clone(), guard));
            }
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Binds `addr` again after a refusal; some other socket may hold the port for a moment.
async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..250 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("fault proxy: could not listen on {addr} again");
}

/// `SO_LINGER` 0: closing the socket then sends RST instead of FIN.
fn set_abortive(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid fd owned by `s`, and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn serve(mut client: TcpStream, mode: NewConns, shared: Arc<Shared>, _open: OpenGuard) {
    let mut kill = shared.kill.subscribe();
    match mode {
        NewConns::Forward => {}
        NewConns::Refuse | NewConns::Reset => {
            set_abortive(&client);
            return;
        }
        NewConns::Blackhole => {
            let mut sink = [0u8; 4096];
            let how = tokio::select! {
                _ = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} } => Kill::Cut,
                k = kill.changed() => if k.is_ok() { kill.borrow().1 } else { Kill::Reset },
            };
            if how == Kill::Reset {
                set_abortive(&client);
            }
            return;
        }
    }
    let target = *shared.target.lock().unwrap();
    let mut server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => {
            // The target refused: pass that on as a reset.
            set_abortive(&client);
            return;
        }
    };
    shared.forwarded.fetch_add(1, Ordering::SeqCst);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let how = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let mut up = std::pin::pin!(pump(&mut cr, &mut sw, true, &shared));
        let mut down = std::pin::pin!(pump(&mut sr, &mut cw, false, &shared));
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                aborted = &mut up, if !up_done => {
                    up_done = true;
                    if aborted { break Some(Kill::Reset) }
                }
                aborted = &mut down, if !down_done => {
                    down_done = true;
                    if aborted { break Some(Kill::Reset) }
                }
                k = kill.changed() => break Some(if k.is_ok() { kill.borrow().1 } else { Kill::Reset }),
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    // A reset on one side is passed on as a reset to the other.
    if how == Some(Kill::Reset) {
        set_abortive(&client);
        set_abortive(&server);
    }
    // Dropping both streams closes them: FIN, or RST when abortive.
}

/// Copies `from` to `to` under the current faults for this direction until EOF, then shuts
/// down `to`'s write side. Returns true if either side failed (reset) instead.
async fn pump<R, W>(from: &mut R, to: &mut W, up: bool, shared: &Shared) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut faults = shared.faults.subscribe();
    let counter = if up {
        &shared.bytes_up
    } else {
        &shared.bytes_down
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Stalled: neither read nor write, so the sender's socket buffers fill up.
        if faults.wait_for(|f| !f.dir(up).stalled).await.is_err() {
            return true;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return true,
        };
        if up
            && shared
                .reset_next_up
                .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            return true;
        }
        let f = faults.borrow().dir(up).clone();
        if f.swallow {
            continue;
        }
        if !f.latency.is_zero() {
            tokio::time::sleep(f.latency).await;
        }
        // A stall that began while this chunk was read holds it back too.
        if faults.wait_for(|f| !f.dir(up).stalled).await.is_err() {
            return true;
        }
        let trickle = faults.borrow().dir(up).trickle;
        let written = match trickle {
            Some(pause) => {
                let mut ok = true;
                for b in &buf[..n] {
                    if to.write_all(std::slice::from_ref(b)).await.is_err()
                        || to.flush().await.is_err()
                    {
                        ok = false;
                        break;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(pause).await;
                }
                ok
            }
            None => {
                let ok = to.write_all(&buf[..n]).await.is_ok();
                if ok {
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                }
                ok
            }
        };
        if !written {
            return true;
        }
    }
    to.shutdown().await.is_err()
}
