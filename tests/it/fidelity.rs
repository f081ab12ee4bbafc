//! What a client sees through iampool is what it would see from PostgreSQL itself: startup
//! options across session resets and client RESET/DISCARD, list-valued startup settings, the
//! startup-packet failure cases, and the ParameterStatus spelling at login. Every check here
//! compares iampool with the same request sent to PostgreSQL directly.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use iampool::config::PoolMode;
use iampool::protocol::messages;
use iampool::stream::{read_message, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pooler::{self, start};
use crate::support::pg::{shared_cluster, TestDb};

const OPTIONS: &str = "-c statement_timeout=1234 -c work_mem=7MB \
                       -c idle_in_transaction_session_timeout=4321";
const SETTINGS: [&str; 3] = [
    "statement_timeout",
    "work_mem",
    "idle_in_transaction_session_timeout",
];

async fn client(addr: SocketAddr, db: &TestDb, options: Option<&str>) -> tokio_postgres::Client {
    let mut cfg = pooler::client_config(addr, db);
    if let Some(o) = options {
        cfg.options(o);
    }
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

async fn show(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {name}: {e}"))
        .get(0)
}

async fn shows(c: &tokio_postgres::Client) -> Vec<String> {
    let mut out = Vec::new();
    for name in SETTINGS {
        out.push(show(c, name).await);
    }
    out
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Session mode: each client of a reused server gets its own startup options, after the
/// `DISCARD ALL` reset put the previous client's back to the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_startup_options_survive_server_reset() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fid_sess");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_mode = PoolMode::Session;
    cfg.databases[0].pool_size = 1;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let direct_with = shows(&client(pg.addr(), &db, Some(OPTIONS)).await).await;
    let direct_without = shows(&client(pg.addr(), &db, None).await).await;
    assert_eq!(direct_with, ["1234ms", "7MB", "4321ms"]);

    let mut pid = None;
    for (round, options) in [Some(OPTIONS), Some(OPTIONS), None, Some(OPTIONS)]
        .into_iter()
        .enumerate()
    {
        let c = client(addr, &db, options).await;
        let want = if options.is_some() {
            &direct_with
        } else {
            &direct_without
        };
        assert_eq!(&shows(&c).await, want, "client {round} ({options:?})");
        // One server throughout: the reset ran between clients.
        let p = backend_pid(&c).await;
        assert_eq!(
            *pid.get_or_insert(p),
            p,
            "client {round} got another server"
        );
        drop(c);
    }
    assert!(iam.shutdown().await);
}

/// Transaction mode: a client's own `RESET ALL` / `DISCARD ALL` returns the server to its
/// defaults; PostgreSQL keeps the startup options as the reset values, and so must iampool
/// for the next statement and for the next client on that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_client_reset_all_and_discard_all_keep_startup_options() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fid_txreset");
    let direct = client(pg.addr(), &db, Some(OPTIONS)).await;
    for reset in ["RESET ALL", "DISCARD ALL"] {
        direct.batch_execute(reset).await.unwrap();
        assert_eq!(shows(&direct).await, ["1234ms", "7MB", "4321ms"], "{reset}");
    }

    // With and without statement tracking (DISCARD ALL retires the server only with it).
    for max_prepared in [200, 0] {
        let mut cfg = pooler::config(pg, &db);
        cfg.databases[0].pool_size = 1;
        cfg.max_prepared_statements = max_prepared;
        let iam = start(cfg).await;
        let addr = iam.local_addr();
        for reset in ["RESET ALL", "DISCARD ALL", "RESET work_mem"] {
            let c = client(addr, &db, Some(OPTIONS)).await;
            assert_eq!(shows(&c).await, ["1234ms", "7MB", "4321ms"]);
            c.batch_execute(reset).await.unwrap();
            assert_eq!(
                shows(&c).await,
                ["1234ms", "7MB", "4321ms"],
                "after {reset} (max_prepared_statements {max_prepared})"
            );
            c.batch_execute(reset).await.unwrap();
            drop(c);
            let next = client(addr, &db, Some(OPTIONS)).await;
            assert_eq!(
                shows(&next).await,
                ["1234ms", "7MB", "4321ms"],
                "next client after {reset} (max_prepared_statements {max_prepared})"
            );
        }
        assert!(iam.shutdown().await);
    }
}

/// `options=-c search_path=a,b` is a list of two schemas, as the startup packet applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_valued_startup_options_are_applied_like_postgresql() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fid_list");
    pg.psql_db(
        &db.name,
        &format!(
            "CREATE SCHEMA fid_a AUTHORIZATION {0}; CREATE TABLE fid_a.only_in_a (v text); \
             ALTER TABLE fid_a.only_in_a OWNER TO {0}; INSERT INTO fid_a.only_in_a VALUES ('a');",
            crate::support::pg::quote_ident(&db.user)
        ),
    );
    let options = [
        r"-c search_path=fid_a,public",
        r"-c search_path=public,\ fid_a",
        r#"-c search_path="fid_a",public -c DateStyle=sql,dmy"#,
        r"-c search_path='it''s',fid_a",
    ];
    let direct = {
        let mut out = Vec::new();
        for o in options {
            let c = client(pg.addr(), &db, Some(o)).await;
            out.push((
                show(&c, "search_path").await,
                show(&c, "DateStyle").await,
                c.query_one("SELECT v FROM only_in_a", &[])
                    .await
                    .map(|r| r.get::<_, String>(0))
                    .map_err(|e| pooler::code(&e)),
            ));
        }
        out
    };
    assert_eq!(direct[0].0, "fid_a,public");
    assert_eq!(direct[0].2, Ok("a".to_owned()));

    for mode in [PoolMode::Transaction, PoolMode::Session] {
        let mut cfg = pooler::config(pg, &db);
        cfg.databases[0].pool_mode = mode;
        cfg.databases[0].pool_size = 1;
        let iam = start(cfg).await;
        for (o, want) in options.iter().zip(&direct) {
            let c = client(iam.local_addr(), &db, Some(o)).await;
            let got = (
                show(&c, "search_path").await,
                show(&c, "DateStyle").await,
                c.query_one("SELECT v FROM only_in_a", &[])
                    .await
                    .map(|r| r.get::<_, String>(0))
                    .map_err(|e| pooler::code(&e)),
            );
            assert_eq!(&got, want, "{mode:?} {o}");
        }
        assert!(iam.shutdown().await);
    }
}

/// Everything the peer wrote until it closed, or None if it kept the connection open.
async fn read_to_close(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await {
        Ok(_) => Some(out),
        Err(_) => None,
    }
}

/// Sends `bytes` (then, if `half_close`, ends the stream) and returns everything the server
/// wrote before closing.
async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    match read_to_close(&mut s).await {
        Some(reply) => summarize(&reply),
        None => vec!["kept open".into()],
    }
}

/// (SQLSTATE, message) of each ErrorResponse in `reply`, and the tags of other messages.
fn summarize(reply: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = reply;
    // The one-byte answer to an SSLRequest.
    if let [b'N', b'E', ..] = rest {
        out.push("N".into());
        rest = &rest[1..];
    }
    while rest.len() >= 5 {
        let tag = rest[0];
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() < len + 1 {
            out.push(format!("partial {:?}", tag as char));
            break;
        }
        let body = &rest[5..len + 1];
        if tag == b'E' {
            let f = messages::parse_error_fields(body);
            out.push(format!("E {} {}", f.code, f.message));
        } else {
            out.push(format!("{:?}", tag as char));
        }
        rest = &rest[len + 1..];
    }
    if !rest.is_empty() {
        out.push(format!("raw {rest:?}"));
    }
    out
}

fn packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut v = ((8 + body.len()) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Bytes that are not a startup packet: PostgreSQL closes without a word (it logs the
/// problem); only an unsupported protocol version gets an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_failures_match_postgresql() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fid_startup");
    let iam = start(pooler::config(pg, &db)).await;

    const SSL: u32 = 80_877_103;
    const CANCEL: u32 = 80_877_102;
    let mut truncated = 40i32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&196_608u32.to_be_bytes());
    truncated.extend_from_slice(b"user\0");
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("connect and close", vec![], true),
        ("partial length word", vec![0, 0], true),
        ("length 3", 3i32.to_be_bytes().to_vec(), false),
        ("length 7", 7i32.to_be_bytes().to_vec(), false),
        ("negative length", (-8i32).to_be_bytes().to_vec(), false),
        ("length i32::MAX", i32::MAX.to_be_bytes().to_vec(), false),
        ("length 20000", 20_000i32.to_be_bytes().to_vec(), false),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("eof inside the packet", truncated, true),
        (
            "cancel of the wrong length",
            packet(CANCEL, &[0, 0, 0, 1]),
            false,
        ),
        ("protocol 2.0", packet(2 << 16, b"user\0x\0\0"), false),
        ("protocol 4.0", packet(4 << 16, b"user\0x\0\0"), false),
        (
            "startup packet pipelined behind an SSLRequest",
            [packet(SSL, &[]), packet(196_608, b"user\0x\0\0")].concat(),
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (what, bytes, half_close) in &cases {
        let direct = exchange(pg.addr(), bytes, *half_close).await;
        let pooled = exchange(iam.local_addr(), bytes, *half_close).await;
        // iampool declines SSL here ('N', no TLS configured); so does the test cluster.
        if direct != pooled {
            failures.push(format!("{what}: postgres {direct:?}, iampool {pooled:?}"));
        }
    }
    // A second SSLRequest (after the first was declined) is no protocol PostgreSQL knows.
    for addr in [pg.addr(), iam.local_addr()] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&packet(SSL, &[])).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        s.write_all(&packet(SSL, &[])).await.unwrap();
        let reply = read_to_close(&mut s).await.map(|r| summarize(&r));
        let want = "E 0A000 unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0";
        if reply.as_deref() != Some(&[want.to_owned()][..]) {
            failures.push(format!("second SSLRequest to {addr}: {reply:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The well-formed requests still work.
    pooler::connect(iam.local_addr(), &db)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    assert!(iam.shutdown().await);
}

/// Logs in over a raw socket (SCRAM) with `params` and returns the ParameterStatus pairs
/// sent before the first ReadyForQuery, and after a first query's ReadyForQuery.
async fn login_parameter_status(
    addr: SocketAddr,
    db: &TestDb,
    params: &[(&str, &str)],
) -> (Vec<(String, String)>, Vec<(String, String)>) {
    let s = TcpStream::connect(addr).await.unwrap();
    let mut stream = Stream::Tcp(s);
    let mut b = BytesMut::new();
    let mut all = vec![("user", db.user.as_str()), ("database", db.name.as_str())];
    all.extend_from_slice(params);
    messages::startup(&mut b, &all);
    stream.write_all(&b).await.unwrap();
    let mut buf = BytesMut::new();
    let (tag, body) = read_message(&mut stream, &mut buf, 1 << 16).await.unwrap();
    assert_eq!(tag, b'R');
    assert_eq!(&body[..4], &10i32.to_be_bytes(), "SCRAM expected");
    let mut scram = iampool::protocol::scram::ScramClient::new(&db.password);
    let first = scram.client_first();
    let mut out = BytesMut::new();
    messages::frontend_message(&mut out, b'p', |m| {
        m.extend_from_slice(b"SCRAM-SHA-256\0");
        m.extend_from_slice(&(first.len() as i32).to_be_bytes());
        m.extend_from_slice(&first);
    });
    stream.write_all(&out).await.unwrap();
    let (_, body) = read_message(&mut stream, &mut buf, 1 << 16).await.unwrap();
    let fin = scram.handle_server_first(&body[4..]).unwrap();
    out.clear();
    messages::frontend_message(&mut out, b'p', |m| m.extend_from_slice(&fin));
    stream.write_all(&out).await.unwrap();
    let at_login = read_until_ready(&mut stream, &mut buf).await;
    out.clear();
    messages::query(&mut out, "SELECT 1");
    stream.write_all(&out).await.unwrap();
    let later = read_until_ready(&mut stream, &mut buf).await;
    (at_login, later)
}

async fn read_until_ready(stream: &mut Stream, buf: &mut BytesMut) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    loop {
        let (tag, body) = read_message(stream, buf, 1 << 16).await.unwrap();
        match tag {
            b'S' => {
                let (n, v) = messages::parse_parameter_status(&body).unwrap();
                seen.push((n.to_owned(), v.to_owned()));
            }
            b'E' => panic!("error: {:?}", messages::parse_error_fields(&body).message),
            b'Z' => return seen,
            _ => {}
        }
    }
}

fn value<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A client that asks for `client_encoding=utf8` is told `UTF8`, as PostgreSQL spells it;
/// other startup values arrive in the server's spelling too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_parameter_status_uses_postgresql_spelling() {
    let pg = shared_cluster();
    let db = pg.scratch_db("fid_enc");
    let iam = start(pooler::config(pg, &db)).await;
    let cases: [&[(&str, &str)]; 3] = [
        &[("client_encoding", "utf8")],
        &[("client_encoding", "unicode"), ("DateStyle", "iso, dmy")],
        &[
            ("client_encoding", "Latin-1"),
            ("DateStyle", "german"),
            ("IntervalStyle", "SQL_STANDARD"),
            ("standard_conforming_strings", "true"),
        ],
    ];
    for params in cases {
        let (direct, _) = login_parameter_status(pg.addr(), &db, params).await;
        let (pooled, later) = login_parameter_status(iam.local_addr(), &db, params).await;
        let encoding = value(&direct, "client_encoding");
        assert_eq!(
            value(&pooled, "client_encoding"),
            encoding,
            "{params:?}: postgres {direct:?}, iampool {pooled:?}"
        );
        // The others: what the client believes once the server has applied them.
        let believed: Vec<_> = pooled.iter().chain(&later).cloned().collect();
        for (name, _) in params {
            assert_eq!(
                value(&believed, name),
                value(&direct, name),
                "{name} in {params:?}: postgres {direct:?}, iampool {pooled:?} then {later:?}"
            );
        }
    }
    assert!(iam.shutdown().await);
}
