//! The pooler core against a real PostgreSQL 15 with real clients.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use iampool::config::{AuthType, PoolMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::types::Type;

use crate::pooler::{self, code, connect, message, run, start, try_connect};
use crate::support::pg::{shared_cluster, PgCluster, PgOptions};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let pg = shared_cluster();
    let db = pg.scratch_db("basic");
    let iam = start(pooler::config(pg, &db)).await;
    let c = connect(iam.local_addr(), &db).await;

    // Simple protocol, multi-statement, empty query.
    let msgs = c.simple_query("select 1; select 'two'").await.unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["1", "two"]);
    c.simple_query("").await.unwrap();

    // Extended protocol with parameters (unnamed statements), pipelined.
    let (a, b) = tokio::join!(
        c.query_one("select $1::int + 1", &[&41i32]),
        c.query_one("select $1::text || '!'", &[&"hi"])
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 42);
    assert_eq!(b.unwrap().get::<_, String>(0), "hi!");

    // An error in the middle of a pipeline does not break the session.
    let (ok1, bad, ok2) = tokio::join!(
        c.query_one("select 1::int", &[]),
        c.query_one("select 1/0", &[]),
        c.query_one("select 3::int", &[])
    );
    assert_eq!(ok1.unwrap().get::<_, i32>(0), 1);
    assert_eq!(code(&bad.unwrap_err()), "22012");
    assert_eq!(ok2.unwrap().get::<_, i32>(0), 3);

    // Notices pass through.
    c.batch_execute("do $$ begin raise notice 'hello'; end $$")
        .await
        .unwrap();
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_ten_servers() {
    let pg = shared_cluster();
    let db = pg.scratch_db("many");
    pooler::create_owned_table(pg, &db, "t (id int primary key, n int)");
    pg.psql_db(
        &db.name,
        "insert into t select g, 0 from generate_series(1, 50) g",
    );
    let mut cfg = pooler::config(pg, &db);
    cfg.auth_type = AuthType::Trust; // the test is about pooling, not 500 PBKDF2 runs
    cfg.databases[0].pool_size = 10;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let max_seen = Arc::new(AtomicI64::new(0));
    // Samples pg_stat_activity until dropped (also when a client task panics).
    struct Stop(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Stop(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let watcher = {
        let (max_seen, stop, name, user) = (
            max_seen.clone(),
            stop.0.clone(),
            db.name.clone(),
            db.user.clone(),
        );
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = shared_cluster().backend_count(&name, &user);
                max_seen.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let mut tasks = Vec::new();
    let clients: usize = std::env::var("IT_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    for i in 0..clients {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(addr, &db).await;
            for j in 0..4 {
                let id = ((i * 7 + j) % 50 + 1) as i32;
                c.batch_execute(&format!(
                    "begin; update t set n = n + 1 where id = {id}; commit"
                ))
                .await
                .expect("transaction");
                // Unnamed statements: named ones in transaction mode are the prepared-statement work.
                let v: i32 = c
                    .query_typed("select n from t where id = $1", &[(&id, Type::INT4)])
                    .await
                    .expect("read")
                    .remove(0)
                    .get(0);
                assert!(v >= 1);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(T, t)
            .await
            .expect("bounded")
            .expect("client task");
    }
    drop(stop);
    watcher.await.unwrap();

    let total = pg.psql_db(&db.name, "select sum(n) from t");
    assert_eq!(
        total.trim(),
        (clients * 4).to_string(),
        "every transaction committed exactly once"
    );
    let max = max_seen.load(Ordering::Relaxed);
    assert!(max <= 10, "saw {max} server backends, limit 10");
    assert!(max >= 1);
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_stay_isolated_on_a_shared_server() {
    let pg = shared_cluster();
    let db = pg.scratch_db("iso");
    pooler::create_owned_table(pg, &db, "t (v int)");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 1;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    // A opens a transaction; B must not get the only server until A is done.
    let a = connect(addr, &db).await;
    let b = connect(addr, &db).await;
    a.batch_execute("begin; insert into t values (1)")
        .await
        .unwrap();
    let b_task = tokio::spawn(async move {
        let n: i64 = b
            .query_one("select count(*) from t", &[])
            .await
            .unwrap()
            .get(0);
        (b, n)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !b_task.is_finished(),
        "B got the server while A's transaction was open"
    );
    a.batch_execute("commit").await.unwrap();
    let (b, n) = tokio::time::timeout(T, b_task).await.unwrap().unwrap();
    assert_eq!(n, 1);

    // A leaves in the middle of a transaction: its work is rolled back, B sees a clean server.
    a.batch_execute("begin; insert into t values (2); set local application_name = 'dirty'")
        .await
        .unwrap();
    drop(a);
    let row = tokio::time::timeout(
        T,
        b.query_one(
            "select count(*), txid_current_if_assigned() is null, current_setting('application_name') from t",
            &[],
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        1,
        "the abandoned insert was rolled back"
    );
    assert!(row.get::<_, bool>(1), "no transaction left open");
    assert_ne!(row.get::<_, String>(2), "dirty");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let pg = shared_cluster();
    let db = pg.scratch_db("cancel");
    let iam = start(pooler::config(pg, &db)).await;
    let c = connect(iam.local_addr(), &db).await;
    let token = c.cancel_token();
    let q = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), q)
        .await
        .expect("cancel ended the query")
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&err), "57014");

    // A cancel for a client that holds no server is dropped and harms nobody.
    let idle = connect(iam.local_addr(), &db).await;
    idle.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    assert_eq!(
        idle.query_one("select 1::int", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let pg = shared_cluster();
    let db = pg.scratch_db("copy");
    pooler::create_owned_table(pg, &db, "t (a int, b text)");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &db).await;

    let sink = c.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..20_000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 20_000);

    let stream = c
        .copy_out("copy (select * from t order by a) to stdout")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);

    // A failing COPY leaves a clean session.
    let sink = c.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    assert_eq!(code(&sink.finish().await.unwrap_err()), "22P02");
    let n: i64 = c
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20_000);

    // psql's \copy uses the simple protocol.
    let addr = iam.local_addr();
    let (db2, addr2) = (db.clone(), addr);
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(
            pooler::psql_command(addr2.port(), &db2)
                .args(["-v", "ON_ERROR_STOP=1", "-Atc"])
                .arg("\\copy (select count(*) from t) to stdout"),
            T,
        )
    })
    .await
    .unwrap();
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "20000");
    assert!(iam.shutdown().await);
}

async fn server_pids(pg: &PgCluster, db: &str, user: &str) -> Vec<i32> {
    let out = pg.psql(&format!(
        "select pid from pg_stat_activity where datname = '{db}' and usename = '{user}' and pid <> pg_backend_pid()"
    ));
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_servers_are_replaced() {
    let pg = shared_cluster();
    let db = pg.scratch_db("term");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &db).await;
    c.simple_query("select 1").await.unwrap();

    // Idle in the pool: the client never notices.
    for pid in server_pids(pg, &db.name, &db.user).await {
        pg.psql(&format!("select pg_terminate_backend({pid})"));
    }
    pg.wait_for_backends(&db.name, &db.user, Duration::from_secs(10), |n| n == 0)
        .await;
    let v: i32 = c.query_one("select 7::int", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);

    // Busy: the query fails with an ERROR that carries PostgreSQL's reason; the client keeps
    // its connection, and the pool recovers.
    let busy = connect(iam.local_addr(), &db).await;
    let q = tokio::spawn(async move {
        let r = busy.simple_query("select pg_sleep(30)").await;
        (busy, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = pg.psql(&format!(
        "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{}' and query like 'select pg_sleep%'",
        db.name
    ));
    assert_eq!(out.trim(), "t");
    let (busy, r) = tokio::time::timeout(T, q).await.unwrap().unwrap();
    let err = r.unwrap_err();
    assert_eq!(code(&err), "08006", "unexpected error: {err:?}");
    let why = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(why.contains("[57P01]"), "{err:?}");
    let v: i32 = busy.query_one("select 9::int", &[]).await.unwrap().get(0);
    assert_eq!(v, 9);
    let again = connect(iam.local_addr(), &db).await;
    let v: i32 = again.query_one("select 8::int", &[]).await.unwrap().get(0);
    assert_eq!(v, 8);
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_is_survived() {
    let mut pg = PgCluster::start(PgOptions::default());
    let db = pg.scratch_db("restart");
    let mut cfg = pooler::config(&pg, &db);
    cfg.databases[0].pool_size = 3;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &db).await;
    c.simple_query("select 1").await.unwrap();
    tokio::task::block_in_place(|| pg.restart());
    // The idle server died with the restart; the next transaction gets a fresh one.
    let v: i32 = tokio::time::timeout(T, c.query_one("select 5::int", &[]))
        .await
        .unwrap()
        .unwrap()
        .get(0);
    assert_eq!(v, 5);
    let c2 = connect(iam.local_addr(), &db).await;
    c2.simple_query("select 1").await.unwrap();
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_errors_have_the_right_sqlstate() {
    let pg = shared_cluster();
    let db = pg.scratch_db("loginerr");
    let mut cfg = pooler::config(pg, &db);
    cfg.max_client_conn = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let mut wrong = db.clone();
    wrong.password = "not-the-password".into();
    assert_eq!(code(&try_connect(addr, &wrong).await.unwrap_err()), "28P01");

    let mut nouser = db.clone();
    nouser.user = "nobody_here".into();
    assert_eq!(
        code(&try_connect(addr, &nouser).await.unwrap_err()),
        "28P01"
    );

    let mut nodb = db.clone();
    nodb.name = "no_such_db".into();
    assert_eq!(code(&try_connect(addr, &nodb).await.unwrap_err()), "3D000");

    let _a = connect(addr, &db).await;
    let _b = connect(addr, &db).await;
    assert_eq!(code(&try_connect(addr, &db).await.unwrap_err()), "53300");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_login_failure_reaches_the_client() {
    let pg = shared_cluster();
    let db = pg.scratch_db("upfail");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].upstream.password = Some(iampool::config::Secret::new("wrong"));
    let iam = start(cfg).await;
    let err = try_connect(iam.local_addr(), &db).await.unwrap_err();
    assert_eq!(code(&err), "28P01", "{err:?}");
    assert!(!format!("{err:?}").contains(&db.password));
    assert!(iam.shutdown().await);
}

/// Reads until EOF (bounded) and returns everything the server sent.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("iampool closes the connection");
    out
}

fn sqlstate_of(reply: &[u8]) -> String {
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "expected an ErrorResponse, got {reply:?}"
    );
    let body = &reply[5..];
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let end = body[i + 1..].iter().position(|&b| b == 0).unwrap() + i + 1;
        if body[i] == b'C' {
            return String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        }
        i = end + 1;
    }
    String::new()
}

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_an_error_or_a_silent_close() {
    let pg = shared_cluster();
    let db = pg.scratch_db("malformed");
    let mut cfg = pooler::config(pg, &db);
    cfg.max_message_size = 1 << 20;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let before = rss_kb();
    for _ in 0..50 {
        for bad in [
            3i32.to_be_bytes().to_vec(),
            i32::MAX.to_be_bytes().to_vec(),
            (-8i32).to_be_bytes().to_vec(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ] {
            // Not a startup packet: closed without a word, as PostgreSQL does.
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bad).await.unwrap();
            let reply = read_to_close(&mut s).await;
            assert!(reply.is_empty(), "{bad:?}: {reply:?}");
        }
    }
    let grown = rss_kb().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} kB over 200 bad packets"
    );

    // After login: a message length below 4, and one above max_message_size.
    for len in [2i32, i32::MAX, 2 << 20] {
        let mut s = login_raw(addr, &db).await;
        let mut m = vec![b'Q'];
        m.extend_from_slice(&len.to_be_bytes());
        s.write_all(&m).await.unwrap();
        let reply = read_to_close(&mut s).await;
        assert_eq!(sqlstate_of(&reply), "08P01", "length {len}");
    }

    // An unknown message type after login.
    let mut s = login_raw(addr, &db).await;
    s.write_all(&[b'?', 0, 0, 0, 4]).await.unwrap();
    assert_eq!(sqlstate_of(&read_to_close(&mut s).await), "08P01");

    // A client that never finishes its startup is dropped after client_login_timeout.
    assert!(iam.shutdown().await);
    let mut cfg = pooler::config(pg, &db);
    cfg.client_login_timeout = Duration::from_millis(500);
    let iam = start(cfg).await;
    let mut s = TcpStream::connect(iam.local_addr()).await.unwrap();
    s.write_all(&[0, 0, 0]).await.unwrap();
    let reply = read_to_close(&mut s).await;
    assert!(reply.is_empty());
    assert!(iam.shutdown().await);
}

/// Logs in with trust auth over a raw socket and returns the stream after ReadyForQuery.
pub(crate) async fn login_raw(
    addr: std::net::SocketAddr,
    db: &crate::support::pg::TestDb,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut b = bytes::BytesMut::new();
    iampool::protocol::messages::startup(&mut b, &[("user", &db.user), ("database", &db.name)]);
    s.write_all(&b).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut stream = iampool::stream::Stream::Tcp(s);
    let (tag, body) = iampool::stream::read_message(&mut stream, &mut buf, 1 << 16)
        .await
        .unwrap();
    assert_eq!(tag, b'R');
    assert_eq!(&body[..4], &10i32.to_be_bytes(), "SCRAM expected");
    let mut client = iampool::protocol::scram::ScramClient::new(&db.password);
    let first = client.client_first();
    let mut out = bytes::BytesMut::new();
    iampool::protocol::messages::frontend_message(&mut out, b'p', |m| {
        m.extend_from_slice(b"SCRAM-SHA-256\0");
        m.extend_from_slice(&(first.len() as i32).to_be_bytes());
        m.extend_from_slice(&first);
    });
    stream.write_all(&out).await.unwrap();
    let (_, body) = iampool::stream::read_message(&mut stream, &mut buf, 1 << 16)
        .await
        .unwrap();
    let fin = client.handle_server_first(&body[4..]).unwrap();
    out.clear();
    iampool::protocol::messages::frontend_message(&mut out, b'p', |m| m.extend_from_slice(&fin));
    stream.write_all(&out).await.unwrap();
    loop {
        let (tag, _) = iampool::stream::read_message(&mut stream, &mut buf, 1 << 16)
            .await
            .unwrap();
        if tag == b'Z' {
            break;
        }
    }
    assert!(buf.is_empty());
    match stream {
        iampool::stream::Stream::Tcp(s) => s,
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_one_server_per_client() {
    let pg = shared_cluster();
    let db = pg.scratch_db("session");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_mode = PoolMode::Session;
    cfg.databases[0].pool_size = 2;
    cfg.query_wait_timeout = Duration::from_secs(1);
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let a = connect(addr, &db).await;
    let b = connect(addr, &db).await;
    let a1: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let b1: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute("set application_name = 'session_a'")
        .await
        .unwrap();
    let a2: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(a1, a2);
    assert_ne!(a1, b1);
    // The pool is full: a third client waits and then gets a clear error.
    let c = connect(addr, &db).await;
    let err = c.simple_query("select 1").await.unwrap_err();
    let msg = message(&err);
    assert!(msg.contains("query_wait_timeout"), "{err:?}");
    // When A leaves, its server is reset and reused.
    drop(a);
    let d = connect(addr, &db).await;
    let row = tokio::time::timeout(
        T,
        d.query_one("select current_setting('application_name')", &[]),
    )
    .await
    .unwrap()
    .unwrap();
    assert_ne!(row.get::<_, String>(0), "session_a");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_renewed_before_they_retire() {
    let pg = shared_cluster();
    let db = pg.scratch_db("renew");
    let mut cfg = pooler::config(pg, &db);
    cfg.server_lifetime = Duration::from_secs(2);
    cfg.databases[0].pool_size = 4;
    cfg.databases[0].min_pool_size = 2;
    let iam = start(cfg).await;
    // min_pool_size is opened at start, before any client.
    let warm = pg
        .wait_for_backends(&db.name, &db.user, Duration::from_secs(10), |n| n == 2)
        .await;
    assert_eq!(warm, 2);
    let c = connect(iam.local_addr(), &db).await;
    let mut pids = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
    while tokio::time::Instant::now() < deadline {
        let rows = c
            .simple_query("select pg_backend_pid()")
            .await
            .expect("no client error across renewals");
        for m in &rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                pids.insert(r.get(0).unwrap().to_owned());
            }
        }
        assert!(pg.backend_count(&db.name, &db.user) <= 4);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pids.len() >= 3, "servers were not renewed: {pids:?}");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_and_idle_server_timeouts() {
    let pg = shared_cluster();
    let db = pg.scratch_db("idletx");
    let mut cfg = pooler::config(pg, &db);
    cfg.idle_transaction_timeout = Some(Duration::from_millis(500));
    cfg.server_idle_timeout = Duration::from_secs(1);
    cfg.databases[0].pool_size = 3;
    let iam = start(cfg).await;

    // A client that opens a transaction and goes quiet loses its connection with 25P03;
    // its server is closed (the transaction is rolled back), not handed to anyone else.
    let c = connect(iam.local_addr(), &db).await;
    c.batch_execute("begin; select 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = c.simple_query("select 1").await.unwrap_err();
    let fatal = err.as_db_error().map(|e| e.code().code().to_owned());
    assert!(
        fatal.as_deref() == Some("25P03") || err.is_closed(),
        "unexpected: {err:?}"
    );

    // A client that keeps working is not affected by the timeout between transactions.
    let busy = connect(iam.local_addr(), &db).await;
    for _ in 0..3 {
        busy.simple_query("select 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    // Idle servers above min_pool_size (0) are closed after server_idle_timeout.
    drop(busy);
    let left = pg
        .wait_for_backends(&db.name, &db.user, Duration::from_secs(15), |n| n == 0)
        .await;
    assert_eq!(left, 0, "idle servers were not retired");
    assert!(iam.shutdown().await);
}

/// VmRSS of another process, in kB.
fn rss_kb_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_give_back_buffers_grown_for_large_messages() {
    let pg = shared_cluster();
    let db = pg.scratch_db("bigmsg");
    // A process of its own, so its memory is not mixed with other tests'.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{}/{}?sslmode=disable",
        db.user,
        db.password,
        pg.port(),
        db.name
    );
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_iampool"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["--upstream", &url, "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "iampool did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.0.id();
    // Warm up (first login, welcome parameters) before the baseline.
    drop(login_raw(addr, &db).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kb_of(pid);
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut s = login_raw(addr, &db).await;
        let sql = format!("select length('{}')", "x".repeat(8 << 20));
        let mut q = bytes::BytesMut::new();
        iampool::protocol::messages::query(&mut q, &sql);
        s.write_all(&q).await.unwrap();
        let mut stream = iampool::stream::Stream::Tcp(s);
        let mut buf = bytes::BytesMut::new();
        loop {
            let (tag, _) = iampool::stream::read_message(&mut stream, &mut buf, 1 << 20)
                .await
                .unwrap();
            if tag == b'Z' {
                break;
            }
        }
        // Stays connected and idle.
        idle.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown = rss_kb_of(pid).saturating_sub(before);
    // 8 idle clients that each kept an 8 MiB buffer would hold 64 MiB.
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} kB with 8 idle clients"
    );
    drop(idle);
}
