//! PgBouncer's pool- and server-side knobs against real PostgreSQL: tcp_* on client and
//! server sockets.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use iampool::config::TcpOptions;
use socket2::SockRef;

use crate::pooler::{self, connect, start};
use crate::support::pg::shared_cluster;

/// This process's connected TCP sockets whose local address `mine` picks, with their
/// options read back with getsockopt: (keepalive, idle, interval, probes, user timeout).
fn sockets_where(
    mine: impl Fn(SocketAddr) -> bool,
) -> Vec<(bool, Duration, Duration, u32, Option<Duration>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the fd is only read while this test's iampool, which owns it, runs; a
        // socket closed meanwhile only makes the calls below fail.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let s = SockRef::from(&fd);
        let (Ok(local), Ok(_peer)) = (s.local_addr(), s.peer_addr()) else {
            continue;
        };
        let Some(local) = local.as_socket() else {
            continue;
        };
        if !mine(local) {
            continue;
        }
        found.push((
            s.keepalive().unwrap(),
            s.tcp_keepalive_time().unwrap(),
            s.tcp_keepalive_interval().unwrap(),
            s.tcp_keepalive_retries().unwrap(),
            s.tcp_user_timeout().unwrap(),
        ));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_options_are_set_on_client_and_server_sockets() {
    let pg = shared_cluster();
    let db = pg.scratch_db("tcpopts");
    let mut cfg = pooler::config(pg, &db);
    cfg.tcp = TcpOptions {
        keepalive: true,
        keepidle: Some(Duration::from_secs(77)),
        keepintvl: Some(Duration::from_secs(9)),
        keepcnt: Some(3),
        user_timeout: Some(Duration::from_millis(4_500)),
    };
    let iam = start(cfg).await;
    let listen = iam.local_addr();
    let c = connect(listen, &db).await;
    c.simple_query("select 1").await.unwrap();
    let want = (
        true,
        Duration::from_secs(77),
        Duration::from_secs(9),
        3,
        Some(Duration::from_millis(4_500)),
    );

    // The client's socket inside iampool: accepted on the listen address.
    let clients = sockets_where(|local| local == listen);
    assert!(!clients.is_empty(), "no accepted client socket found");
    assert!(clients.iter().all(|s| *s == want), "{clients:?}");

    // The pool's server sockets: iampool's end is the address SHOW SERVERS lists.
    let pool = iam.shared().pool(&db.name).unwrap();
    let locals: Vec<SocketAddr> = pool
        .servers
        .snapshot()
        .iter()
        .filter_map(|s| s.local)
        .collect();
    assert!(!locals.is_empty());
    let servers = sockets_where(|local| locals.contains(&local));
    assert_eq!(servers.len(), locals.len(), "{servers:?}");
    assert!(servers.iter().all(|s| *s == want), "{servers:?}");
    drop(c);
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keepalive_off_leaves_sockets_without_it() {
    let pg = shared_cluster();
    let db = pg.scratch_db("tcpoff");
    let mut cfg = pooler::config(pg, &db);
    cfg.tcp = TcpOptions {
        keepalive: false,
        ..TcpOptions::default()
    };
    let iam = start(cfg).await;
    let listen = iam.local_addr();
    let c = connect(listen, &db).await;
    c.simple_query("select 1").await.unwrap();
    let clients = sockets_where(|local| local == listen);
    assert!(!clients.is_empty());
    assert!(clients.iter().all(|s| !s.0), "{clients:?}");
    drop(c);
    assert!(iam.shutdown().await);
}
