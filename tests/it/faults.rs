//! Fault injection: what clients see, and how the pool recovers, when the upstream dies,
//! restarts, is down or silent, and when clients vanish, crawl or stop reading.
//!
//! Faults come from the real PostgreSQL (pg_terminate_backend, pg_ctl-style restarts and
//! stops) and from the network ([`FaultProxy`] between iampool and PostgreSQL, or between a
//! client and iampool). The commit ledger (`support/ledger.rs`) checks the pass condition
//! of the kill and restart tests: zero lost acknowledged commits, nothing committed that
//! was neither acknowledged nor in doubt, no transaction half applied. docs/faults.md lists
//! every fault with its expected outcome and the test here that checks it.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use iampool::app::Running;
use iampool::config::{AuthType, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::iam::{self as iamt, Iampool, APP};
use crate::pooler::{self, client_config, code, connect, run, start, try_connect};
use crate::support::fake_aws::{FailMode, FakeEcs, FakeSts};
use crate::support::fault_proxy::{Dir, FaultProxy, NewConns};
use crate::support::ledger::{Ledger, SCHEMA};
use crate::support::pg::{quote_literal, shared_cluster, PgCluster, PgOptions, TestDb};
use crate::support::rds::{RdsOptions, RDS_REGION};

/// Hang guard for one step; never an assertion about speed.
const T: Duration = Duration::from_secs(60);
/// Ledger writers pause this long between transactions: enough commits to catch faults in
/// flight, without taking a core from the suites running alongside.
const PACE: Duration = Duration::from_millis(2);

/// iampool in front of the shared cluster through a fault proxy.
struct Rig {
    pg: &'static PgCluster,
    db: TestDb,
    proxy: FaultProxy,
    iam: Running,
}

async fn rig(prefix: &str, tweak: impl FnOnce(&mut Config)) -> Rig {
    let pg = shared_cluster();
    let db = pg.scratch_db(prefix);
    let proxy = FaultProxy::start(pg.addr()).await;
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].upstream.hosts[0].port = proxy.port();
    tweak(&mut cfg);
    let iam = start(cfg).await;
    Rig { pg, db, proxy, iam }
}

impl Rig {
    fn addr(&self) -> std::net::SocketAddr {
        self.iam.local_addr()
    }

    /// A connection straight to PostgreSQL, for checks that must not go through iampool.
    async fn direct(&self) -> tokio_postgres::Client {
        self.pg
            .connect(&self.db.user, &self.db.password, &self.db.name)
            .await
    }
}

/// `select count(*) from pg_stat_activity` for the test's user and database, plus `extra`.
fn backends(pg: &PgCluster, db: &TestDb, extra: &str) -> i64 {
    pg.psql(&format!(
        "select count(*) from pg_stat_activity where backend_type = 'client backend' \
         and usename = {} and datname = {} and pid <> pg_backend_pid() {extra}",
        quote_literal(&db.user),
        quote_literal(&db.name)
    ))
    .trim()
    .parse()
    .expect("a count")
}

/// Terminates every backend of the test's user and database; returns how many.
fn terminate_all(pg: &PgCluster, db: &TestDb, extra: &str) -> i64 {
    pg.psql(&format!(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity \
         where backend_type = 'client backend' and usename = {} and datname = {} {extra}",
        quote_literal(&db.user),
        quote_literal(&db.name)
    ))
    .trim()
    .parse()
    .expect("a count")
}

/// Polls `f` until it holds (bounded); panics with `what` if it never does.
async fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn one_int(c: &tokio_postgres::Client, sql: &str) -> Result<i64, tokio_postgres::Error> {
    let rows = c.simple_query(sql).await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .expect("one row"))
}

/// A client through iampool runs `select 1` cleanly (a fresh connection).
async fn fresh_client_works(addr: std::net::SocketAddr, db: &TestDb) {
    let c = tokio::time::timeout(T, connect(addr, db))
        .await
        .expect("login hung");
    let v = tokio::time::timeout(T, one_int(&c, "select 1"))
        .await
        .expect("query hung")
        .unwrap_or_else(|e| panic!("a fresh client's query failed: {e:?}"));
    assert_eq!(v, 1);
}

// ---------------------------------------------------------------------------------------------
// The fault proxy itself, against a TCP echo server

/// Each fault of the proxy does what it says: bytes pass, trickle one at a time, are
/// swallowed; a stall holds them until resumed; cut gives EOF, reset gives ECONNRESET;
/// refused, reset and black-holed new connections behave as named; counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_does_what_it_says() {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let proxy = FaultProxy::start(target).await;
    let roundtrip = |s: &'static [u8]| {
        let addr = proxy.addr();
        async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(s).await.unwrap();
            let mut got = vec![0u8; s.len()];
            tokio::time::timeout(T, c.read_exact(&mut got))
                .await
                .expect("echo")
                .unwrap();
            assert_eq!(got, s);
            c
        }
    };
    drop(roundtrip(b"plain").await);

    // Trickle: every byte arrives, forwarded one at a time.
    proxy.trickle(Dir::Up, Some(Duration::from_millis(5)));
    let before = proxy.bytes(Dir::Up);
    drop(roundtrip(b"one at a time").await);
    assert_eq!(proxy.bytes(Dir::Up) - before, 13);
    proxy.heal();

    // Stall: nothing comes back until resumed.
    let mut c = roundtrip(b"x").await;
    proxy.stall(Dir::Down);
    c.write_all(b"held").await.unwrap();
    let mut got = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut got))
            .await
            .is_err(),
        "a stalled direction delivers nothing"
    );
    proxy.resume(Dir::Down);
    tokio::time::timeout(T, c.read_exact(&mut got))
        .await
        .expect("resumed")
        .unwrap();
    assert_eq!(&got, b"held");

    // Swallow: written, never echoed.
    proxy.swallow(Dir::Up, true);
    c.write_all(b"gone").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut got))
            .await
            .is_err()
    );
    proxy.heal();

    // Cut: EOF; reset: ECONNRESET.
    assert_eq!(proxy.cut_all(), 1);
    let mut rest = Vec::new();
    assert_eq!(
        tokio::time::timeout(T, c.read_to_end(&mut rest))
            .await
            .expect("closed")
            .unwrap(),
        0
    );
    let mut c = roundtrip(b"y").await;
    assert_eq!(proxy.reset_all(), 1);
    let e = tokio::time::timeout(T, c.read_to_end(&mut rest))
        .await
        .expect("reset")
        .expect_err("a reset is an error, not EOF");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}");

    // New connections: refused, reset, black-holed, then forwarded again.
    proxy.set_new(NewConns::Refuse);
    assert!(
        proxy
            .wait_until(T, |p| std::net::TcpStream::connect(p.addr()).is_err())
            .await
    );
    let e = TcpStream::connect(proxy.addr()).await.expect_err("refused");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e:?}");
    proxy.set_new(NewConns::Reset);
    let forwarded = proxy.forwarded();
    let mut c = tokio::time::timeout(T, async {
        loop {
            if let Ok(c) = TcpStream::connect(proxy.addr()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("listening again");
    let e = tokio::time::timeout(T, c.read_to_end(&mut rest))
        .await
        .expect("reset")
        .expect_err("reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}");
    proxy.set_new(NewConns::Blackhole);
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"anyone?").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut got))
            .await
            .is_err()
    );
    assert_eq!(
        proxy.forwarded(),
        forwarded,
        "reset and black-holed connections reach nobody"
    );
    drop(c);
    proxy.heal();
    drop(roundtrip(b"back").await);
    // plain, trickle, x, y, at least one reset, the black hole, back.
    assert!(proxy.accepted() >= 7, "{}", proxy.accepted());
    assert!(
        proxy.wait_until(T, |p| p.open() == 0).await,
        "{} open",
        proxy.open()
    );
}

// ---------------------------------------------------------------------------------------------
// The upstream dies

/// Idle servers killed by PostgreSQL (pg_terminate_backend), reset (RST) or cut (FIN) by the
/// network: the pool notices at checkout, so the next client's query succeeds on a fresh
/// server and never sees the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_while_idle_next_client_never_sees_it() {
    let r = rig("fault_idle", |c| c.databases[0].pool_size = 3).await;
    let warm = || async {
        let clients: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| connect(r.addr(), &r.db))).await;
        futures_util::future::join_all(
            clients
                .iter()
                .map(|c| c.simple_query("select pg_sleep(0.2)")),
        )
        .await
        .into_iter()
        .for_each(|x| {
            x.expect("warm-up query");
        });
    };
    for fault in ["terminate", "reset", "cut"] {
        warm().await;
        eventually("three idle servers", T, || {
            backends(r.pg, &r.db, "and state = 'idle'") == 3
        })
        .await;
        match fault {
            "terminate" => assert_eq!(terminate_all(r.pg, &r.db, ""), 3),
            "reset" => assert_eq!(r.proxy.reset_all(), 3),
            _ => assert_eq!(r.proxy.cut_all(), 3),
        }
        eventually("the killed backends are gone", T, || {
            backends(r.pg, &r.db, "") == 0
        })
        .await;
        assert!(
            r.proxy.wait_until(T, |p| p.open() == 0).await,
            "the proxy closed its side"
        );
        // Not one error: the dead servers are dropped at checkout, not handed out.
        for _ in 0..3 {
            fresh_client_works(r.addr(), &r.db).await;
        }
        let pool = r.iam.shared().pool(&r.db.name).expect("pool");
        let st = pool.status();
        assert!(st.idle + st.active + st.connecting <= 3, "{fault}: {st:?}");
    }
    assert!(r.iam.shutdown().await);
}

/// A query running when its backend is killed (transaction mode): the query fails with an
/// ERROR 08006 that says why (PostgreSQL's own 57P01 when it kills the backend, the reset or
/// close when the network does), the client keeps its connection and its next query runs on
/// a fresh server, and so does the next client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_query_client_gets_clear_error() {
    let r = rig("fault_query", |c| c.databases[0].pool_size = 2).await;
    for (fault, why) in [
        ("terminate", "[57P01]"),
        ("reset", "reset"),
        ("cut", "closed the connection"),
    ] {
        let c = connect(r.addr(), &r.db).await;
        let q = tokio::spawn(async move {
            let res = c.simple_query("select pg_sleep(20)").await.map(|_| ());
            (c, res)
        });
        eventually("the query runs", T, || {
            backends(
                r.pg,
                &r.db,
                "and query = 'select pg_sleep(20)' and state = 'active'",
            ) == 1
        })
        .await;
        match fault {
            "terminate" => {
                terminate_all(r.pg, &r.db, "and state = 'active'");
            }
            "reset" => {
                r.proxy.reset_all();
            }
            _ => {
                r.proxy.cut_all();
            }
        }
        let (c, res) = tokio::time::timeout(T, q)
            .await
            .expect("the query hung")
            .unwrap();
        let e = res.expect_err("the killed query must fail");
        let db = e
            .as_db_error()
            .unwrap_or_else(|| panic!("{fault}: an ErrorResponse, got {e:?}"));
        assert_eq!(db.code().code(), "08006", "{fault}: {db:?}");
        assert_eq!(db.severity(), "ERROR", "{fault}: not a FATAL: {db:?}");
        assert!(
            db.message().contains("the server connection was lost") && db.message().contains(why),
            "{fault}: {db:?}"
        );
        assert!(!c.is_closed(), "{fault}: the client keeps its connection");
        assert_eq!(
            one_int(&c, "select 5")
                .await
                .expect("the same client's next query"),
            5,
            "{fault}"
        );
        fresh_client_works(r.addr(), &r.db).await;
        // The network faults leave the backend sleeping; iampool has forgotten it.
        terminate_all(r.pg, &r.db, "and query = 'select pg_sleep(20)'");
    }
    assert!(r.iam.shutdown().await);
}

/// A transaction whose backend dies (killed, or its connection reset) before COMMIT, while
/// the client is idle in it (transaction mode): the client keeps its connection; its next
/// statement fails with an ERROR 08006 that says why, later ones with 25P02 as inside any
/// failed transaction, and COMMIT answers ROLLBACK, after which it works as before. Nothing
/// of the transaction is committed, no backend is left idle in transaction, and the next
/// client's session on the only server is clean. A real driver (tokio-postgres) sees its
/// COMMIT fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_transaction_nothing_commits() {
    let r = rig("fault_tx", |c| {
        c.auth_type = AuthType::Trust;
        c.databases[0].pool_size = 1;
    })
    .await;
    pooler::create_owned_table(r.pg, &r.db, "t (v int)");
    let direct = r.direct().await;
    for (i, (fault, why)) in [("terminate", "[57P01]"), ("reset", "reset")]
        .into_iter()
        .enumerate()
    {
        // On the wire: exactly what the client is told.
        let mut raw = Raw::login(r.addr(), &r.db).await;
        raw.query(&format!("begin; insert into t values ({i})"))
            .await;
        raw.until_ready().await;
        // Through a real driver, at the same time (its own transaction, waiting for the
        // server: pool_size is 1).
        let c = connect(r.addr(), &r.db).await;
        let driver = tokio::spawn(async move {
            let r = c
                .batch_execute("begin; insert into t values (100); commit")
                .await;
            (c, r)
        });
        eventually("one backend idle in transaction", T, || {
            backends(r.pg, &r.db, "and state = 'idle in transaction'") == 1
        })
        .await;
        match fault {
            "terminate" => {
                terminate_all(r.pg, &r.db, "and state = 'idle in transaction'");
            }
            _ => {
                r.proxy.reset_all();
            }
        }
        eventually("the killed backend is gone", T, || {
            backends(r.pg, &r.db, "and state = 'idle in transaction'") == 0
        })
        .await;
        // The client learns of it with its next statement, and stays in the failed block.
        raw.query(&format!("insert into t values ({})", i + 10))
            .await;
        let told = raw.until_ready().await;
        let (got, message) =
            first_error(&told).unwrap_or_else(|| panic!("{fault}: no error sent: {told:?}"));
        assert_eq!(got, "08006", "{fault}: {message}");
        assert!(message.contains(why), "{fault}: {message}");
        assert_eq!(
            told.last().map(|(_, b)| b[..].to_vec()),
            Some(b"E".to_vec()),
            "{fault}: {told:?}"
        );
        raw.query("select 1").await;
        let told = raw.until_ready().await;
        assert_eq!(
            first_error(&told).map(|e| e.0).as_deref(),
            Some("25P02"),
            "{fault}: {told:?}"
        );
        raw.query("commit").await;
        let told = raw.until_ready().await;
        assert_eq!(
            told.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            b"CZ",
            "{fault}: {told:?}"
        );
        assert_eq!(&told[0].1[..], b"ROLLBACK\0", "{fault}");
        assert_eq!(&told[1].1[..], b"I", "{fault}");
        // The driver's transaction then ran on a fresh server and committed.
        let (c, res) = tokio::time::timeout(T, driver)
            .await
            .expect("driver hung")
            .unwrap();
        res.unwrap_or_else(|e| panic!("{fault}: the waiting client's transaction: {e:?}"));
        assert_eq!(
            one_int(&direct, "select count(*) from t where v <> 100")
                .await
                .unwrap(),
            0,
            "{fault}: the killed transaction's insert is not committed"
        );
        assert_eq!(
            one_int(&direct, "select count(*) from t where v = 100")
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            backends(r.pg, &r.db, "and state like 'idle in transaction%'"),
            0
        );
        // A driver whose transaction is cut: its next statement fails.
        c.batch_execute("begin; insert into t values (200)")
            .await
            .unwrap();
        eventually("idle in transaction", T, || {
            backends(r.pg, &r.db, "and state = 'idle in transaction'") == 1
        })
        .await;
        terminate_all(r.pg, &r.db, "and state = 'idle in transaction'");
        assert!(
            c.batch_execute("commit").await.is_err(),
            "{fault}: COMMIT after the kill fails"
        );
        let next = connect(r.addr(), &r.db).await;
        assert_eq!(
            one_int(&next, "select (now() = statement_timestamp() and txid_current_if_assigned() is null)::int")
                .await
                .unwrap(),
            1,
            "the next client's session is not in a transaction"
        );
        assert_eq!(
            one_int(&direct, "select count(*) from t where v = 200")
                .await
                .unwrap(),
            0
        );
        direct.batch_execute("delete from t").await.unwrap();
    }
    assert!(r.iam.shutdown().await);
}

/// Transaction mode, through a real driver's extended protocol: a client whose server dies
/// keeps its connection. A statement in flight outside a transaction fails with 08006 and
/// the next one runs; inside a transaction, the next statement is told why (08006), the one
/// after gets PostgreSQL's own 25P02 (from a fresh server put inside a failed block), and
/// after ROLLBACK the client's next transaction commits. An idle client sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeps_its_connection_when_its_server_dies() {
    let r = rig("fault_orphan", |c| {
        c.auth_type = AuthType::Trust;
        c.databases[0].pool_size = 2;
    })
    .await;
    pooler::create_owned_table(r.pg, &r.db, "t (v int)");
    let bystander = connect(r.addr(), &r.db).await;
    assert_eq!(one_int(&bystander, "select 1").await.unwrap(), 1);
    let mut c = connect(r.addr(), &r.db).await;

    // In flight, outside a transaction (extended protocol: Parse/Bind/Execute/Sync).
    let sleeper = tokio::spawn(async move {
        let res = c.query("select pg_sleep($1::float8)", &[&20.0f64]).await;
        (c, res)
    });
    eventually("the query runs", T, || {
        backends(
            r.pg,
            &r.db,
            "and query like 'select pg_sleep%' and state = 'active'",
        ) == 1
    })
    .await;
    terminate_all(r.pg, &r.db, "and state = 'active'");
    let (client, res) = tokio::time::timeout(T, sleeper)
        .await
        .expect("hung")
        .unwrap();
    c = client;
    let e = res.expect_err("the killed query fails");
    assert_eq!(code(&e), "08006", "{e:?}");
    let n: i32 = c
        .query_one("select $1::int", &[&3i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "the next statement runs on a fresh server");

    // Idle inside a transaction.
    let tx = c.transaction().await.unwrap();
    tx.execute("insert into t values ($1)", &[&1i32])
        .await
        .unwrap();
    eventually("idle in transaction", T, || {
        backends(r.pg, &r.db, "and state = 'idle in transaction'") == 1
    })
    .await;
    terminate_all(r.pg, &r.db, "and state = 'idle in transaction'");
    eventually("the backend is gone", T, || {
        backends(r.pg, &r.db, "and state = 'idle in transaction'") == 0
    })
    .await;
    let told = tx
        .execute("insert into t values ($1)", &[&2i32])
        .await
        .expect_err("the transaction is gone");
    assert_eq!(code(&told), "08006", "{told:?}");
    assert!(pooler::message(&told).contains("[57P01]"), "{told:?}");
    let aborted = tx
        .query_one("select $1::int", &[&4i32])
        .await
        .expect_err("still inside the failed transaction");
    assert_eq!(code(&aborted), "25P02", "{aborted:?}");
    tx.rollback().await.expect("ROLLBACK ends the failed block");

    let tx = c.transaction().await.unwrap();
    tx.execute("insert into t values ($1)", &[&5i32])
        .await
        .unwrap();
    tx.commit().await.expect("the next transaction commits");
    let direct = r.direct().await;
    assert_eq!(
        one_int(&direct, "select coalesce(sum(v), 0)::int from t")
            .await
            .unwrap(),
        5,
        "only the last transaction committed"
    );
    assert_eq!(
        one_int(&bystander, "select 2").await.unwrap(),
        2,
        "the idle client saw nothing"
    );
    assert_eq!(
        backends(r.pg, &r.db, "and state like 'idle in transaction%'"),
        0
    );
    assert!(r.iam.shutdown().await);
}

/// COPY FROM STDIN whose backend is killed halfway: the client is told the server's 57P01
/// and no row lands; COPY TO STDOUT whose connection is reset halfway: the client's stream
/// (tokio-postgres) ends in 08006. The pool then serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_copy() {
    let r = rig("fault_copy", |c| {
        c.auth_type = AuthType::Trust;
        c.databases[0].pool_size = 2;
    })
    .await;
    pooler::create_owned_table(r.pg, &r.db, "t (v int)");
    let mut raw = Raw::login(r.addr(), &r.db).await;
    raw.query("copy t from stdin").await;
    let (tag, _) = raw.next().await.expect("CopyInResponse");
    assert_eq!(tag, b'G');
    let mut data = BytesMut::new();
    iampool::protocol::messages::frontend_message(&mut data, b'd', |m| {
        for i in 0..1000 {
            m.extend_from_slice(format!("{i}\n").as_bytes());
        }
    });
    raw.send(&data).await;
    eventually("the COPY runs", T, || {
        backends(r.pg, &r.db, "and query = 'copy t from stdin'") == 1
    })
    .await;
    terminate_all(r.pg, &r.db, "and query = 'copy t from stdin'");
    // More data after the kill; then whatever iampool says before it closes.
    for _ in 0..10 {
        if !raw.try_send(&data).await {
            break;
        }
    }
    let told = raw.until_close().await;
    let (got, message) = first_error(&told).unwrap_or_else(|| panic!("no error sent: {told:?}"));
    assert_eq!(got, "57P01", "{message}");
    let direct = r.direct().await;
    assert_eq!(one_int(&direct, "select count(*) from t").await.unwrap(), 0);

    // COPY TO STDOUT, connection reset halfway. On the wire: if the server's stream broke
    // between messages, the client is told 08006; if it broke inside a CopyData message,
    // nothing follows the part the client has (iampool's FATAL would be read as the rest of
    // that row), the connection just closes. Either way every byte of CopyData is row text.
    let copy_out =
        "copy (select g, repeat('x', 100) from generate_series(1, 10000000) g) to stdout";
    let row_text = |b: &[u8]| b.iter().all(|c| c.is_ascii_digit() || b"\tx\n".contains(c));
    for _ in 0..3 {
        let mut raw = Raw::login(r.addr(), &r.db).await;
        raw.query(copy_out).await;
        for _ in 0..10 {
            raw.next().await.expect("COPY data");
        }
        r.proxy.reset_all();
        let bytes = raw.bytes_until_close().await;
        let mut rest = &bytes[..];
        let mut last = None;
        while rest.len() >= 5 {
            let len = i32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            let tag = rest[0];
            let body = &rest[5..rest.len().min(1 + len)];
            if tag == b'd' {
                assert!(
                    row_text(body),
                    "bytes that are not the server's inside a CopyData: {body:?}"
                );
            }
            if rest.len() < 1 + len {
                assert_eq!(tag, b'd', "only a CopyData can be cut short here");
                last = Some("truncated".to_string());
                break;
            }
            last = Some(if tag == b'E' {
                iampool::protocol::messages::parse_error_fields(body).code
            } else {
                (tag as char).to_string()
            });
            rest = &rest[1 + len..];
        }
        let last = last.expect("some bytes after the reset");
        assert!(
            last == "truncated" || last == "08006",
            "the stream ends in 08006 or mid-row, not with {last:?}"
        );
        terminate_all(r.pg, &r.db, "and query like 'copy (select%'");
    }

    let c = connect(r.addr(), &r.db).await;
    let stream = c
        .copy_out("copy (select g, repeat('x', 100) from generate_series(1, 10000000) g) to stdout")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    for _ in 0..10 {
        stream.next().await.expect("data").expect("a row");
    }
    r.proxy.reset_all();
    let failed = tokio::time::timeout(T, async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("COPY TO finished although its connection was reset"),
            }
        }
    })
    .await
    .expect("COPY TO hung");
    assert!(code(&failed) == "08006" || failed.is_closed(), "{failed:?}");
    fresh_client_works(r.addr(), &r.db).await;
    terminate_all(r.pg, &r.db, "and query like 'copy (select%'");
    assert!(r.iam.shutdown().await);
}

/// Ledger writers through iampool while backends are repeatedly killed and their
/// connections reset and cut. Pass condition: zero lost acknowledged commits, nothing
/// committed that was neither acknowledged nor in doubt, no transaction half applied; and
/// the writers keep committing after every fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_loses_no_acknowledged_commit_when_backends_are_killed() {
    let r = rig("fault_ledger", |c| {
        c.auth_type = AuthType::Trust; // writers reconnect often; SCRAM would dominate
        c.databases[0].pool_size = 4;
    })
    .await;
    let direct = r.direct().await;
    direct.batch_execute(SCHEMA).await.unwrap();
    let ledger = Ledger::start(client_config(r.addr(), &r.db), 8, 1, PACE);
    ledger.wait_for_more(50, T).await;
    for round in 0..6 {
        match round % 3 {
            0 => {
                terminate_all(r.pg, &r.db, "");
            }
            1 => {
                r.proxy.reset_all();
            }
            _ => {
                r.proxy.cut_all();
            }
        }
        ledger.wait_for_more(40, T).await;
    }
    // The check reads as the superuser: the faults above also ended `direct`.
    let check =
        r.pg.connect("postgres", r.pg.superuser_password(), &r.db.name)
            .await;
    let report = ledger.verify(&check).await;
    println!("ledger under kills: {report}");
    report.assert_no_loss(290);
    assert!(
        report.not_committed + report.in_doubt > 0,
        "the faults hit transactions in flight: {report}"
    );
    assert!(r.iam.shutdown().await);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL restarts, is down, or is silent

fn pgbench_cmd(port: u16, db: &TestDb, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.env("PGPASSWORD", &db.password)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", &db.user])
        .args(args)
        .arg(&db.name);
    cmd
}

/// A dedicated cluster restarted (fast shutdown, start) under pgbench and ledger writers
/// through iampool: afterwards the same iampool, never restarted, runs pgbench with no
/// failed transaction, and the ledger shows zero lost acknowledged commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_pgbench_loses_no_acknowledged_commit() {
    let pg = tokio::task::spawn_blocking(|| PgCluster::start(PgOptions::default()))
        .await
        .unwrap();
    let db = pg.scratch_db("fault_restart");
    let (ok, _, err) = run(
        &mut pgbench_cmd(pg.port(), &db, &["-i", "-q", "-s", "1"]),
        Duration::from_secs(120),
    );
    assert!(ok, "pgbench -i: {err}");
    let mut cfg = pooler::config(&pg, &db);
    cfg.auth_type = AuthType::Trust;
    cfg.databases[0].pool_size = 8;
    cfg.server_login_retry = Duration::from_millis(100);
    let iam = start(cfg).await;
    let port = iam.local_addr().port();
    let direct = pg.connect(&db.user, &db.password, &db.name).await;
    direct.batch_execute(SCHEMA).await.unwrap();
    drop(direct);
    // Unpaced writers: one of them holds a server in a transaction whenever the restart
    // comes (paced ones sat between transactions, unhurt, about one run in eight).
    let ledger = Ledger::start(client_config(iam.local_addr(), &db), 8, 1, Duration::ZERO);
    ledger.wait_for_more(30, T).await;

    let db2 = db.clone();
    let during = tokio::task::spawn_blocking(move || {
        run(
            &mut pgbench_cmd(
                port,
                &db2,
                &["-n", "-c", "8", "-j", "2", "-T", "6", "-R", "400"],
            ),
            Duration::from_secs(90),
        )
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.restart();
        pg
    })
    .await
    .unwrap();
    let (_, out, err) = during.await.unwrap();
    println!("pgbench across the restart:\n{out}{err}");
    // Transaction mode keeps clients' connections: a pgbench client whose statement was in
    // flight is aborted by pgbench on the ERROR (pgbench aborts on any error), the others
    // wait through the restart and carry on; either way pgbench ran across it.
    assert!(
        out.contains("number of transactions actually processed"),
        "pgbench ran across the restart:\n{out}{err}"
    );
    assert!(
        !err.contains("FATAL"),
        "no session was ended by the restart:\n{out}{err}"
    );
    ledger.wait_for_more(30, T).await;

    // The same iampool, not restarted, serves a clean run.
    let db2 = db.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(
            &mut pgbench_cmd(
                port,
                &db2,
                &["-n", "-c", "8", "-j", "2", "-T", "3", "-R", "400"],
            ),
            Duration::from_secs(90),
        )
    })
    .await
    .unwrap();
    assert!(ok, "pgbench after the restart:\n{out}{err}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");

    let direct = pg.connect(&db.user, &db.password, &db.name).await;
    let report = ledger.verify(&direct).await;
    println!("ledger across the restart: {report}");
    report.assert_no_loss(60);
    assert!(
        report.not_committed + report.in_doubt > 0
            || report.causes.keys().any(|k| k.starts_with("connect")),
        "the restart hit the writers: {report}"
    );
    assert!(iam.shutdown().await);
    pg.stop();
}

/// PostgreSQL down when iampool starts: iampool starts anyway; a client's login fails
/// within query_wait_timeout with 08001 naming the connect failure; once PostgreSQL is up
/// the same iampool serves clients. Down again later: logins work, queries get 08P01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_at_start_then_up() {
    let mut pg = tokio::task::spawn_blocking(|| PgCluster::start(PgOptions::default()))
        .await
        .unwrap();
    let db = pg.scratch_db("fault_down");
    pg.stop();
    let mut cfg = pooler::config(&pg, &db);
    cfg.query_wait_timeout = Duration::from_secs(2);
    cfg.server_login_retry = Duration::from_millis(100);
    let iam = start(cfg).await;
    let e = tokio::time::timeout(T, try_connect(iam.local_addr(), &db))
        .await
        .expect("login hung while PostgreSQL is down")
        .expect_err("no login while PostgreSQL is down");
    let db_err = e
        .as_db_error()
        .unwrap_or_else(|| panic!("an ErrorResponse: {e:?}"));
    assert_eq!(db_err.code().code(), "08001", "{db_err:?}");
    assert!(db_err.message().contains("could not connect"), "{db_err:?}");

    let mut pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    let deadline = Instant::now() + T;
    loop {
        match try_connect(iam.local_addr(), &db).await {
            Ok(c) => {
                assert_eq!(one_int(&c, "select 1").await.unwrap(), 1);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Down again, after the pool has served: a new client still logs in (iampool knows the
    // server's parameters), and its first query fails after query_wait_timeout with 08001
    // (the same code a client gets for it at login) naming the connect failure.
    let mut pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    let c = tokio::time::timeout(T, connect(iam.local_addr(), &db))
        .await
        .expect("login hung");
    let e = tokio::time::timeout(T, c.simple_query("select 1"))
        .await
        .expect("query hung while PostgreSQL is down")
        .expect_err("no query while PostgreSQL is down");
    let db_err = e
        .as_db_error()
        .unwrap_or_else(|| panic!("an ErrorResponse: {e:?}"));
    assert_eq!(db_err.code().code(), "08001", "{db_err:?}");
    assert!(
        db_err.message().contains("query_wait_timeout")
            || db_err.message().contains("cannot be reached"),
        "{db_err:?}"
    );
    assert!(db_err.message().contains("could not connect"), "{db_err:?}");
    assert!(iam.shutdown().await);
    pg.stop();
}

/// An upstream that accepts TCP and never answers: the login is bounded by
/// server_connect_timeout, the client gets 08001 naming the timeout (no hang); a connection
/// refused upstream gives 08001 naming the refusal; once the upstream answers, logins work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_and_refusing_upstream_give_clear_errors() {
    let r = rig("fault_blackhole", |c| {
        c.server_connect_timeout = Duration::from_millis(500);
        c.query_wait_timeout = Duration::from_secs(2);
        c.server_login_retry = Duration::from_millis(100);
    })
    .await;
    for (mode, words) in [
        (NewConns::Blackhole, "timed out connecting"),
        (NewConns::Refuse, "could not connect"),
        (NewConns::Reset, "reset"),
    ] {
        r.proxy.set_new(mode);
        // Logins back off while they fail, so the first error may still name the previous
        // cause; every error is 08001, and the new cause is named once a login has met it.
        let deadline = Instant::now() + T;
        loop {
            let e = tokio::time::timeout(T, try_connect(r.addr(), &r.db))
                .await
                .unwrap_or_else(|_| panic!("{mode:?}: the login hung"))
                .expect_err("no login");
            let db_err = e
                .as_db_error()
                .unwrap_or_else(|| panic!("{mode:?}: an ErrorResponse, got {e:?}"));
            assert_eq!(db_err.code().code(), "08001", "{mode:?}: {db_err:?}");
            if db_err.message().contains(words) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode:?}: never named: {db_err:?}"
            );
        }
    }
    assert!(r.proxy.accepted() > 0);
    r.proxy.heal();
    // Logins were backing off: the next one comes at most MAX_LOGIN_BACKOFF later.
    let deadline = Instant::now() + iampool::pool::MAX_LOGIN_BACKOFF + T;
    loop {
        match tokio::time::timeout(T, try_connect(r.addr(), &r.db)).await {
            Ok(Ok(c)) => {
                assert_eq!(one_int(&c, "select 1").await.unwrap(), 1);
                break;
            }
            Ok(Err(e)) => assert!(Instant::now() < deadline, "no recovery: {e:?}"),
            Err(_) => panic!("the login hung"),
        }
    }

    // A black hole after login (the server stops answering mid-session) holds only the
    // client that is waiting on it; others are served by another server.
    let stuck = connect(r.addr(), &r.db).await;
    r.proxy.stall(Dir::Down);
    let q = tokio::spawn(async move { stuck.simple_query("select 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!q.is_finished(), "a stalled server answers nothing");
    r.proxy.resume(Dir::Down);
    tokio::time::timeout(T, q)
        .await
        .expect("resumed")
        .unwrap()
        .unwrap();
    assert!(r.iam.shutdown().await);
}

// ---------------------------------------------------------------------------------------------
// Clients that vanish, crawl, or stop reading

/// A client reset (RST) in the middle of a transaction, and one that goes away (FIN) in the
/// middle of a COPY FROM STDIN: nothing of either is committed, no backend is left idle in
/// transaction, and the next client on the only server has a clean session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_transaction_and_mid_copy_commits_nothing() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fault_client_gone");
    pooler::create_owned_table(pg, &db, "t (v int)");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 1;
    let iam = start(cfg).await;
    let front = FaultProxy::start(iam.local_addr()).await;
    let direct = pg.connect(&db.user, &db.password, &db.name).await;
    let count = || async { one_int(&direct, "select count(*) from t").await.unwrap() };

    // Mid-transaction, then the client's connection is reset.
    let a = connect(front.addr(), &db).await;
    a.batch_execute("begin; insert into t values (1); set local application_name = 'dirty'")
        .await
        .unwrap();
    assert_eq!(front.reset_all(), 1);
    eventually("no backend idle in transaction", T, || {
        backends(pg, &db, "and state like 'idle in transaction%'") == 0
    })
    .await;
    let b = connect(iam.local_addr(), &db).await;
    let row = tokio::time::timeout(
        T,
        b.query_one(
            "select txid_current_if_assigned() is null, current_setting('application_name')",
            &[],
        ),
    )
    .await
    .expect("the next client waited forever")
    .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the next client is not in the old transaction"
    );
    assert_ne!(row.get::<_, String>(1), "dirty");
    assert_eq!(
        count().await,
        0,
        "the reset client's insert is not committed"
    );
    drop(b);

    // Mid-COPY, then the client goes away without CopyDone.
    let a = connect(front.addr(), &db).await;
    let sink = a.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
        .await
        .unwrap();
    eventually("the COPY reached the server", T, || {
        backends(pg, &db, "and query = 'copy t from stdin'") == 1
    })
    .await;
    assert_eq!(front.cut_all(), 1);
    eventually("no backend left in the COPY", T, || {
        backends(
            pg,
            &db,
            "and query = 'copy t from stdin' and state <> 'idle'",
        ) == 0
            && backends(pg, &db, "and state like 'idle in transaction%'") == 0
    })
    .await;
    let b = connect(iam.local_addr(), &db).await;
    assert_eq!(one_int(&b, "select count(*) from t").await.unwrap(), 0);
    assert_eq!(count().await, 0, "a COPY cut short is not committed");
    b.batch_execute("insert into t values (7)").await.unwrap();
    assert_eq!(count().await, 1);
    assert!(iam.shutdown().await);
}

/// Slowloris: max_client_conn sockets that send their startup packet a byte at a time hold
/// every client slot, so a real client is refused (53300) at first; client_login_timeout
/// drops them, and the real client then gets in. Sockets that connect and send nothing at
/// all do not delay a real client's login either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_logins_are_dropped_at_client_login_timeout() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fault_slowloris");
    let mut cfg = pooler::config(pg, &db);
    cfg.max_client_conn = 20;
    cfg.client_login_timeout = Duration::from_secs(1);
    let iam = start(cfg).await;
    let shared = iam.shared().clone();
    let mut startup = BytesMut::new();
    iampool::protocol::messages::startup(
        &mut startup,
        &[("user", &db.user), ("database", &db.name)],
    );
    let startup = startup.freeze();
    let crawlers: Vec<_> = (0..20)
        .map(|_| {
            let startup = startup.clone();
            let addr = iam.local_addr();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let started = Instant::now();
                for b in startup.iter() {
                    if s.write_all(std::slice::from_ref(b)).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Whatever it managed to send, iampool closes it.
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
                started.elapsed()
            })
        })
        .collect();
    eventually("twenty slow logins hold every slot", T, || {
        shared.open_client_count() >= 20
    })
    .await;
    let mut refused = 0;
    let deadline = Instant::now() + T;
    let c = loop {
        match try_connect(iam.local_addr(), &db).await {
            Ok(c) => break c,
            Err(e) => {
                assert_eq!(code(&e), "53300", "{e:?}");
                refused += 1;
            }
        }
        assert!(Instant::now() < deadline, "the real client never got in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(one_int(&c, "select 1").await.unwrap(), 1);
    assert!(refused > 0, "the slow logins held the slots at first");
    for t in crawlers {
        let held = t.await.unwrap();
        assert!(
            held < Duration::from_secs(startup.len() as u64 / 5),
            "a slow login was dropped before it could finish its startup ({held:?})"
        );
    }
    drop(c);

    // Sockets that send nothing: a real client logs in at once, while they are still open.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(iam.local_addr()).await.unwrap());
    }
    fresh_client_works(iam.local_addr(), &db).await;
    drop(idle);
    assert!(iam.shutdown().await);
}

/// iampool as a subprocess (so its memory is its own), in front of the shared cluster.
struct Subprocess {
    child: std::process::Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl Subprocess {
    fn start(pg: &PgCluster, db: &TestDb, extra: &[&str]) -> Subprocess {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = tempfile::NamedTempFile::new().unwrap();
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_iampool"))
                .args(["--upstream", &pg.url(&db.user, &db.password, &db.name)])
                .args([
                    "--auth-type",
                    "trust",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                ])
                .args(extra)
                .env_clear()
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .stdin(std::process::Stdio::null())
                .stdout(log.reopen().unwrap())
                .stderr(log.reopen().unwrap())
                .spawn()
                .expect("spawn iampool");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Subprocess { child, port, log };
                }
                assert!(Instant::now() < deadline, "iampool did not listen");
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        panic!("iampool did not start");
    }

    fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Resident set size in kB, from /proc.
    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Subprocess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- iampool log ----\n{}",
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            );
        }
    }
}

/// A client speaking the protocol by hand (trust auth), to see exactly what iampool sends.
struct Raw {
    s: iampool::stream::Stream,
    buf: BytesMut,
}

impl Raw {
    /// Logs in and reads up to the first ReadyForQuery.
    async fn login(addr: std::net::SocketAddr, db: &TestDb) -> Raw {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut raw = Raw {
            s: iampool::stream::Stream::Tcp(s),
            buf: BytesMut::new(),
        };
        let mut b = BytesMut::new();
        iampool::protocol::messages::startup(&mut b, &[("user", &db.user), ("database", &db.name)]);
        raw.send(&b).await;
        let msgs = raw.until_ready().await;
        assert!(first_error(&msgs).is_none(), "login refused: {msgs:?}");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        assert!(self.try_send(bytes).await, "write to iampool failed");
    }

    async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).await.is_ok() && self.s.flush().await.is_ok()
    }

    async fn query(&mut self, sql: &str) {
        let mut q = BytesMut::new();
        iampool::protocol::messages::query(&mut q, sql);
        self.send(&q).await;
    }

    /// The next message; None once the connection is closed.
    async fn next(&mut self) -> Option<(u8, BytesMut)> {
        tokio::time::timeout(
            T,
            iampool::stream::read_message(&mut self.s, &mut self.buf, 1 << 20),
        )
        .await
        .expect("iampool neither answered nor closed")
        .ok()
    }

    async fn until_ready(&mut self) -> Vec<(u8, BytesMut)> {
        let mut msgs = Vec::new();
        loop {
            let m = self
                .next()
                .await
                .unwrap_or_else(|| panic!("closed after {msgs:?}"));
            let ready = m.0 == b'Z';
            msgs.push(m);
            if ready {
                return msgs;
            }
        }
    }

    /// The raw bytes not yet read as messages, up to the close.
    async fn bytes_until_close(&mut self) -> Vec<u8> {
        let mut out = self.buf.to_vec();
        tokio::time::timeout(T, self.s.read_to_end(&mut out))
            .await
            .expect("iampool did not close")
            .ok();
        out
    }

    /// Everything until iampool closes the connection.
    async fn until_close(&mut self) -> Vec<(u8, BytesMut)> {
        let mut msgs = Vec::new();
        while let Some(m) = self.next().await {
            msgs.push(m);
        }
        msgs
    }
}

/// (SQLSTATE, message) of the first ErrorResponse.
fn first_error(msgs: &[(u8, BytesMut)]) -> Option<(String, String)> {
    msgs.iter().find(|(t, _)| *t == b'E').map(|(_, body)| {
        let f = iampool::protocol::messages::parse_error_fields(body);
        (f.code, f.message)
    })
}

/// A client that sends a query with a multi-gigabyte result and never reads: iampool stops
/// reading from the server (the backend blocks in ClientWrite), its memory stays bounded,
/// other clients are served meanwhile, and once the client goes the query is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_reads_nothing_gets_back_pressure_not_buffering() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fault_noread");
    let iam = Subprocess::start(pg, &db, &["--pool-size", "2"]);
    let warm = Raw::login(iam.addr(), &db).await;
    drop(warm);
    let before = iam.rss_kb();
    let mut hog = Raw::login(iam.addr(), &db).await;
    let huge = "select repeat('x', 8000) from generate_series(1, 1000000)"; // 8 GB
    hog.query(huge).await;
    eventually("the backend blocks writing to iampool", T, || {
        backends(
            pg,
            &db,
            &format!(
                "and query = {} and wait_event = 'ClientWrite'",
                quote_literal(huge)
            ),
        ) == 1
    })
    .await;
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(iam.rss_kb());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("no-read client: iampool RSS {before} kB before, {peak} kB at most while blocked");
    assert!(
        peak < before + 64 * 1024,
        "iampool buffered the result: RSS {before} kB -> {peak} kB"
    );
    // Still blocked (nothing drained it), and another client is served meanwhile.
    assert_eq!(
        backends(
            pg,
            &db,
            &format!("and query = {} and state = 'active'", quote_literal(huge))
        ),
        1
    );
    let mut other = Raw::login(iam.addr(), &db).await;
    other.query("select 1").await;
    let answer = other.until_ready().await;
    assert_eq!(
        answer.first().map(|m| m.0),
        Some(b'T'),
        "the other client is served: {answer:?}"
    );
    drop(hog);
    eventually("the abandoned query is cancelled", T, || {
        backends(
            pg,
            &db,
            &format!("and query = {} and state = 'active'", quote_literal(huge)),
        ) == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// IAM: the credential endpoint, STS, a refused token, a skewed clock (the RDS-like server and
// the iampool subprocess of the iam suite)

/// The credential endpoint (ECS container credentials) failing when iampool starts, by
/// answering 500 and by closing connections: iampool starts anyway, a client gets 08001 at
/// once naming the IAM failure (no hang, no secret in it); once the endpoint answers, the
/// same iampool signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_credential_endpoint_down_at_start_then_back() {
    let ttl = Duration::from_secs(3600);
    let ecs = FakeEcs::start(ttl).await;
    ecs.set_fail(FailMode::Status500);
    let rds = iamt::rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&iamt::keys_with_next(vec![], "ecs", ttl, 1));
    let iampool = Iampool::start(
        &iamt::args(
            &rds.upstream_url(APP, ""),
            &[
                "--server-login-retry",
                "200ms",
                "--query-wait-timeout",
                "10s",
            ],
        ),
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", ecs.uri())],
    );
    for mode in [FailMode::Status500, FailMode::Close] {
        ecs.set_fail(mode);
        // A failure to get credentials is reported as is for server_login_retry.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let e = iampool
            .try_query(APP)
            .await
            .expect_err("no login without credentials");
        let (code, message) = iamt::db_error(&e);
        println!("credential endpoint {mode:?}: {code}: {message}");
        assert_eq!(code, "08001", "{mode:?}: {message}");
        assert!(message.contains("IAM"), "{mode:?}: names IAM: {message}");
        iamt::assert_secret_free(&message, "the client's error");
    }
    assert_eq!(
        rds.stats().accepted + rds.stats().rejected,
        0,
        "no token was sent"
    );
    ecs.set_fail(FailMode::Healthy);
    let deadline = Instant::now() + T;
    loop {
        rds.set_issued_keys(&iamt::keys_with_next(ecs.issued(), "ecs", ttl, 1));
        match iampool.try_query(APP).await {
            Ok(user) => {
                assert_eq!(user, APP);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rds.stats().rejected, 0);
    iamt::assert_secret_free(&iampool.log(), "iampool's log");
}

/// STS behind the fault proxy. Slow (every answer 1.5 s late): logins still succeed. Slower
/// than server_connect_timeout (3 s against 2 s): the fetch outlives the login attempt that
/// started it, so the next attempt signs in (before the fix in credentials.rs every attempt
/// cancelled its own fetch and no login ever succeeded). Stalled
/// (requests accepted, never answered): a client's login fails within
/// server_connect_timeout + query_wait_timeout with 08001 (no hang); once STS answers
/// again, the same iampool signs in with the role's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_slow_then_stalled_sts() {
    let ttl = Duration::from_secs(3600);
    let sts = FakeSts::start(ttl).await;
    let proxy = FaultProxy::start(sts.addr()).await;
    let arn = "arn:aws:iam::111122223333:role/iampool-slow-sts";
    let rds = iamt::rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&iamt::keys_with_next(vec![], arn, ttl, 1));
    let mut env = iamt::static_env();
    env.push(("AWS_ENDPOINT_URL_STS", format!("http://{}", proxy.addr())));
    env.push(("AWS_REGION", RDS_REGION.to_string()));

    proxy.set_latency(Dir::Down, Duration::from_millis(1500));
    let iampool = Iampool::start(
        &iamt::args(&rds.upstream_url(APP, ""), &["--assume-role-arn", arn]),
        &env,
    );
    assert_eq!(iampool.query_ok(APP).await, APP);
    assert!(sts.requests() >= 1);
    drop(iampool);

    // Slower than server_connect_timeout: the first login attempt gives up, but the
    // credential fetch it started goes on, so the pool's next attempt signs in and the
    // client is served within query_wait_timeout. STS is asked once.
    proxy.set_latency(Dir::Down, Duration::from_millis(3000));
    let asked = sts.requests();
    let iampool = Iampool::start(
        &iamt::args(
            &rds.upstream_url(APP, ""),
            &[
                "--assume-role-arn",
                arn,
                "--server-connect-timeout",
                "2s",
                "--query-wait-timeout",
                "8s",
                "--server-login-retry",
                "200ms",
            ],
        ),
        &env,
    );
    match iampool.try_query(APP).await {
        Ok(user) => assert_eq!(user, APP),
        Err(e) => panic!(
            "STS slower than server_connect_timeout never yields credentials: {:?} ({} STS requests)",
            iamt::db_error(&e),
            sts.requests() - asked
        ),
    }
    assert_eq!(
        sts.requests() - asked,
        1,
        "one credential fetch, not one per login attempt"
    );
    drop(iampool);

    proxy.heal();
    proxy.stall(Dir::Down);
    let iampool = Iampool::start(
        &iamt::args(
            &rds.upstream_url(APP, ""),
            &[
                "--assume-role-arn",
                arn,
                "--server-connect-timeout",
                "2s",
                "--query-wait-timeout",
                "4s",
                "--server-login-retry",
                "200ms",
            ],
        ),
        &env,
    );
    let e = iampool
        .try_query(APP)
        .await
        .expect_err("no login while STS is stalled");
    let (code, message) = iamt::db_error(&e);
    println!("stalled STS: {code}: {message}");
    assert_eq!(code, "08001", "{message}");
    iamt::assert_secret_free(&message, "the client's error");
    proxy.resume(Dir::Down);
    let deadline = Instant::now() + T;
    while let Err(e) = iampool.try_query(APP).await {
        assert!(
            Instant::now() < deadline,
            "no recovery after STS answered: {e:?}\n{}",
            iampool.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        rds.stats().signers,
        std::collections::BTreeSet::from([FakeSts::key_for(arn)])
    );
}

/// The server stops trusting the signing key (every token refused): a new server login
/// fails with the server's 28000 after one retry with a fresh token, with no token in the
/// message; once the key is trusted again, the same iampool signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_token_refused_then_accepted_again() {
    let rds = iamt::rds_with_app(RdsOptions::default());
    rds.trust_static_key();
    let iampool = Iampool::start(
        &iamt::args(
            &rds.upstream_url(APP, ""),
            &[
                "--pool-size",
                "1",
                "--server-lifetime",
                "1s",
                "--server-lifetime-jitter",
                "0",
                "--server-login-retry",
                "200ms",
                "--query-wait-timeout",
                "10s",
            ],
        ),
        &iamt::static_env(),
    );
    assert_eq!(iampool.query_ok(APP).await, APP);
    rds.set_keys_json("{}");
    let deadline = Instant::now() + T;
    let e = loop {
        match iampool.try_query(APP).await {
            Ok(_) => assert!(Instant::now() < deadline, "tokens were never refused"),
            Err(e) => break e,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (code, message) = iamt::db_error(&e);
    println!("refused token: {code}: {message}");
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("PAM authentication failed"), "{message}");
    iamt::assert_secret_free(&message, "the client's error");
    let refused = rds.stats();
    assert!(
        refused.rejected >= 2,
        "the login and its retry: {refused:?}"
    );
    assert!(refused
        .reject_reasons
        .iter()
        .all(|r| r.contains("unknown access key id")));
    rds.trust_static_key();
    let deadline = Instant::now() + T;
    while let Err(e) = iampool.try_query(APP).await {
        assert!(Instant::now() < deadline, "no recovery: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    iamt::assert_secret_free(&iampool.log(), "iampool's log");
}

/// The server's clock skewed against iampool's signer (the verifier checks X-Amz-Date
/// against a clock moved by the skew, as RDS would against its own): minutes either way
/// within the token's window and RDS's 5-minute allowance for future dates are accepted;
/// 16 minutes ahead (every token already expired) and 6 minutes behind (every token from
/// the future) are refused with 28000 after one retry, no hang; when the clocks agree
/// again the same iampool signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_clock_skew_against_the_signer() {
    let mut rds = iamt::rds_with_app(RdsOptions::default());
    rds.trust_static_key();
    let url = rds.upstream_url(APP, "");
    let start = || {
        Iampool::start(
            &iamt::args(
                &url,
                &[
                    "--server-login-retry",
                    "200ms",
                    "--query-wait-timeout",
                    "10s",
                ],
            ),
            &iamt::static_env(),
        )
    };
    for (skew, accepted, reason) in [
        (4 * 60, true, ""),
        (-4 * 60, true, ""),
        (16 * 60, false, "token expired at"),
        (-6 * 60, false, "is in the future"),
    ] {
        rds.set_clock_skew(skew);
        let before = rds.stats().rejected;
        let iampool = start();
        let result = iampool.try_query(APP).await;
        if accepted {
            assert_eq!(
                result.unwrap_or_else(|e| panic!("skew {skew} s: {e:?}")),
                APP
            );
            continue;
        }
        let e = result.expect_err("a skewed token is refused");
        let (code, message) = iamt::db_error(&e);
        println!("skew {skew} s: {code}: {message}");
        assert_eq!(code, "28000", "skew {skew} s: {message}");
        let stats = rds.stats();
        assert!(
            stats.rejected >= before + 2,
            "a login and its retry: {stats:?}"
        );
        // (A login of the previous phase's iampool may still be checked meanwhile.)
        let matching = stats.reject_reasons[before..]
            .iter()
            .filter(|r| r.contains(reason))
            .count();
        assert!(matching >= 2, "skew {skew} s: {reason:?} twice: {stats:?}");
        if skew < 0 {
            // Clocks agree again: the same iampool recovers without a restart.
            rds.set_clock_skew(0);
            let deadline = Instant::now() + T;
            while let Err(e) = iampool.try_query(APP).await {
                assert!(Instant::now() < deadline, "no recovery: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A server that dies just as iampool brings its session parameters in line with the next
/// client's has seen nothing of that client's request: the client gets another server, not
/// an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lost_while_parameters_are_applied_is_replaced() {
    let r = rig("fault_sync", |c| c.databases[0].pool_size = 1).await;
    let with_name = |name: &str| {
        let mut c = pooler::client_config(r.addr(), &r.db);
        c.application_name(name);
        c
    };
    let connect_as = |name: &str| {
        let cfg = with_name(name);
        async move {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("login");
            tokio::spawn(conn);
            client
        }
    };
    let a = connect_as("sync_a").await;
    assert_eq!(one_int(&a, "select 1").await.unwrap(), 1);
    let b = connect_as("sync_b").await;
    // The pool's one server last served sync_a: b's request makes iampool set
    // application_name first, and that write is what the server dies on.
    r.proxy.reset_next_upstream_write();
    let name: String = tokio::time::timeout(
        T,
        b.query_one("select current_setting('application_name')", &[]),
    )
    .await
    .expect("bounded")
    .expect("b is served by another server")
    .get(0);
    assert_eq!(name, "sync_b");
    assert!(
        !r.proxy.reset_pending(),
        "the fault fired (a server was lost during the parameter sync)"
    );
    assert!(r.iam.shutdown().await);
}
