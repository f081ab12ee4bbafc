//! PgBouncer's pool- and server-side knobs against real PostgreSQL: tcp_* on client and
//! server sockets, the reserve pool, server_check_query, max_db_connections and
//! max_user_connections.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use iampool::config::TcpOptions;
use socket2::SockRef;

use crate::pooler::{self, code, connect, start};
use crate::support::pg::{shared_cluster, TestDb};

/// Hang guard for single steps; never an assertion about speed.
const T: Duration = Duration::from_secs(60);

async fn one_value(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = tokio::time::timeout(T, c.simple_query(sql))
        .await
        .expect("answers")
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

/// A console user added to `cfg`, and a way in for it.
fn with_console(cfg: &mut iampool::config::Config, db: &TestDb) -> (String, String) {
    let user = (
        format!("{}_admin", db.name),
        format!("{}_admin_pw", db.name),
    );
    cfg.users.insert(
        user.0.clone(),
        iampool::config::UserSecret::Plain(iampool::config::Secret::new(user.1.clone())),
    );
    cfg.admin_users = vec![user.0.clone()];
    user
}

/// SHOW `what` on the console: each row as column name -> value.
async fn show(
    addr: SocketAddr,
    (user, pw): &(String, String),
    what: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .password(pw)
        .dbname("pgbouncer")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("console login");
    tokio::spawn(conn);
    let msgs = tokio::time::timeout(T, client.simple_query(&format!("SHOW {what}")))
        .await
        .expect("SHOW answers")
        .unwrap();
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

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

/// A pool of one with a reserve of one: a client that waited reserve_pool_timeout gets a
/// second server while the first is still held; when it is released with nobody waiting,
/// the pool is back to one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waited_reserve_pool_timeout_gets_a_reserve_server() {
    let pg = shared_cluster();
    let db = pg.scratch_db("reserve");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 1;
    cfg.databases[0].reserve_pool_size = 1;
    cfg.reserve_pool_timeout = Duration::from_millis(200);
    let console = with_console(&mut cfg, &db);
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let rows = show(addr, &console, "DATABASES").await;
    let row = rows.iter().find(|r| r["name"] == db.name).expect("a row");
    assert_eq!(row["pool_size"], "1");
    assert_eq!(row["reserve_pool_size"], "1");

    // The pool's only server, held in a transaction.
    let holder = connect(addr, &db).await;
    holder.batch_execute("begin").await.unwrap();
    let held = one_value(&holder, "select pg_backend_pid()").await;

    // Served while the transaction still holds the first server: by a reserve server.
    let waiter = connect(addr, &db).await;
    let got = one_value(&waiter, "select pg_backend_pid()").await;
    assert_ne!(got, held);

    // Released with nobody waiting: the reserve server closes, the held one stays.
    let left = pg
        .wait_for_backends(&db.name, &db.user, T, |n| n == 1)
        .await;
    assert_eq!(left, 1, "the reserve server was not closed");
    holder.batch_execute("commit").await.unwrap();
    assert_eq!(one_value(&waiter, "select pg_backend_pid()").await, held);
    drop((holder, waiter));
    assert!(iam.shutdown().await);
}

/// Without a reserve the same second client waits for the first server until
/// query_wait_timeout: what the reserve test above relies on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reserve_a_full_pool_makes_clients_wait() {
    let pg = shared_cluster();
    let db = pg.scratch_db("noreserve");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 1;
    cfg.reserve_pool_timeout = Duration::from_millis(200);
    cfg.query_wait_timeout = Duration::from_secs(1);
    let iam = start(cfg).await;
    let holder = connect(iam.local_addr(), &db).await;
    holder.batch_execute("begin").await.unwrap();
    one_value(&holder, "select 1").await;
    let waiter = connect(iam.local_addr(), &db).await;
    let err = tokio::time::timeout(T, waiter.simple_query("select 1"))
        .await
        .expect("answers")
        .unwrap_err();
    assert_eq!(code(&err), "08001", "{err:?}");
    assert_eq!(pg.backend_count(&db.name, &db.user), 1);
    holder.batch_execute("commit").await.unwrap();
    drop((holder, waiter));
    assert!(iam.shutdown().await);
}

/// server_check_query runs on a server taken from the idle list once it has sat there for
/// server_check_delay, and not before: counted with a sequence the query advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_check_query_runs_on_servers_idle_for_server_check_delay() {
    let pg = shared_cluster();
    let db = pg.scratch_db("srvcheck");
    pg.psql_db(
        &db.name,
        &format!(
            "create sequence checks; alter sequence checks owner to {};",
            crate::support::pg::quote_ident(&db.user)
        ),
    );
    let checks = || pg.psql_db(&db.name, "select last_value, is_called from checks");
    for (delay, checked) in [(Duration::from_secs(3600), false), (Duration::ZERO, true)] {
        let mut cfg = pooler::config(pg, &db);
        cfg.databases[0].pool_size = 1;
        cfg.server_check_query = "select nextval('checks')".into();
        cfg.server_check_delay = delay;
        let iam = start(cfg).await;
        let c = connect(iam.local_addr(), &db).await;
        for _ in 0..3 {
            one_value(&c, "select 1").await;
        }
        let seen = checks();
        let (last, called) = seen.trim().split_once('|').expect("two columns");
        assert_eq!(called == "t", checked, "delay {delay:?}: {seen}");
        if checked {
            assert!(last.parse::<i64>().unwrap() >= 2, "{seen}");
        }
        drop(c);
        assert!(iam.shutdown().await);
    }
}

/// An idle server that stopped answering (its backend stopped with SIGSTOP: the socket
/// stays open, so only a query can tell) fails server_check_query and is replaced: the
/// client's query runs on a new server and it never sees an error. Without the check the
/// query would wait on the stopped backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_fails_server_check_query_is_replaced_unseen() {
    let pg = shared_cluster();
    let db = pg.scratch_db("srvstop");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 2;
    cfg.server_check_query = "select 1".into();
    cfg.server_check_delay = Duration::ZERO;
    // The check's limit.
    cfg.server_connect_timeout = Duration::from_secs(1);
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &db).await;
    let stopped: i32 = one_value(&c, "select pg_backend_pid()")
        .await
        .parse()
        .unwrap();
    // SAFETY: a signal to a backend of the test's own cluster; it is continued below.
    assert_eq!(unsafe { libc::kill(stopped, libc::SIGSTOP) }, 0);
    let got = tokio::time::timeout(T, c.simple_query("select pg_backend_pid()")).await;
    assert_eq!(unsafe { libc::kill(stopped, libc::SIGCONT) }, 0);
    let rows = got
        .expect("the query waited on the stopped server")
        .expect("no error");
    let pid = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap();
    assert_ne!(pid, stopped.to_string());
    // The stopped server was closed, not put back.
    let left = pg
        .wait_for_backends(&db.name, &db.user, T, |n| n == 1)
        .await;
    assert_eq!(left, 1);
    drop(c);
    assert!(iam.shutdown().await);
}

/// A server killed with pg_terminate_backend while idle: with server_check_query on, the
/// client's next query still runs, on another server, without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_terminated_while_idle_is_never_seen_by_the_client() {
    let pg = shared_cluster();
    let db = pg.scratch_db("srvterm");
    let mut cfg = pooler::config(pg, &db);
    cfg.server_check_query = "select 1".into();
    cfg.server_check_delay = Duration::ZERO;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &db).await;
    let first = one_value(&c, "select pg_backend_pid()").await;
    pg.psql(&format!("select pg_terminate_backend({first})"));
    pg.wait_for_backends(&db.name, &db.user, T, |n| n == 0)
        .await;
    let second = one_value(&c, "select pg_backend_pid()").await;
    assert_ne!(first, second);
    drop(c);
    assert!(iam.shutdown().await);
}

/// Two database entries in front of one upstream database and user, pool_size 2 each, under
/// a shared limit of 2 (max_db_connections or max_user_connections): while the first entry's
/// clients hold two servers, a client of the second waits without a login; once one of them
/// is released, that server is closed and the second entry gets its place.
async fn shared_limit(db_limit: usize, user_limit: usize) {
    let pg = shared_cluster();
    let db = pg.scratch_db("sharedcap");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 2;
    cfg.databases[0].max_db_connections = db_limit;
    cfg.max_user_connections = user_limit;
    let mut second = cfg.databases[0].clone();
    second.name = format!("{}_2", db.name);
    cfg.databases.push(second);
    let console = with_console(&mut cfg, &db);
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let other = TestDb {
        name: format!("{}_2", db.name),
        ..db.clone()
    };

    let rows = show(addr, &console, "DATABASES").await;
    for r in rows.iter().filter(|r| r["database"] == db.name) {
        assert_eq!(r["max_connections"], db_limit.to_string(), "{r:?}");
    }
    let rows = show(addr, &console, "USERS").await;
    let row = rows.iter().find(|r| r["name"] == db.user).expect("a row");
    assert_eq!(row["max_user_connections"], user_limit.to_string());

    let a1 = connect(addr, &db).await;
    let a2 = connect(addr, &db).await;
    for c in [&a1, &a2] {
        c.batch_execute("begin").await.unwrap();
        one_value(c, "select 1").await;
    }
    let b = connect(addr, &other).await;
    let waiting = tokio::spawn(async move {
        let pid = one_value(&b, "select pg_backend_pid()").await;
        (b, pid)
    });
    let pool_b = iam.shared().pool(&other.name).unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while pool_b.status().waiting == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = pool_b.status();
    assert_eq!(
        (st.idle, st.active, st.connecting),
        (0, 0, 0),
        "the second entry opened a connection over the limit: {st:?}"
    );
    assert_eq!(pg.backend_count(&db.name, &db.user), 2);
    assert!(!waiting.is_finished());

    a1.batch_execute("commit").await.unwrap();
    let (b, pid) = tokio::time::timeout(T, waiting)
        .await
        .expect("the second entry got a server")
        .unwrap();
    assert!(!pid.is_empty());
    let pool_a = iam.shared().pool(&db.name).unwrap();
    assert!(pool_a.db_count.count() <= 2 && pool_a.user_count.count() <= 2);
    a2.batch_execute("commit").await.unwrap();
    drop((a1, a2, b));
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_is_shared_by_entries_of_one_upstream_database() {
    shared_limit(2, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_user_connections_is_shared_by_pools_of_one_upstream_user() {
    shared_limit(0, 2).await;
}
