//! Client authentication that cannot be probed or hammered: a stable stand-in salt for
//! unknown users, a delay and a per-address limit on failed logins, and a cap on
//! connections still logging in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use iampool::protocol::messages::{frontend_message, startup};
use iampool::protocol::scram::ScramClient;
use iampool::stream::{read_message, Stream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::pooler::{self, code, connect, message, start, try_connect};
use crate::support::pg::{shared_cluster, TestDb};

const T: Duration = Duration::from_secs(30);

/// Starts a SCRAM login as `user` and returns the server-first message (`r=...,s=...,i=...`),
/// with the stream and the client state to finish it.
async fn server_first(
    addr: SocketAddr,
    database: &str,
    user: &str,
    password: &str,
) -> (String, Stream, ScramClient, BytesMut) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut b = BytesMut::new();
    startup(&mut b, &[("user", user), ("database", database)]);
    s.write_all(&b).await.unwrap();
    let mut stream = Stream::Tcp(s);
    let mut buf = BytesMut::new();
    let (tag, body) = read_message(&mut stream, &mut buf, 1 << 16).await.unwrap();
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &10i32.to_be_bytes()[..]),
        "SCRAM offered"
    );
    let mut client = ScramClient::new(password);
    let first = client.client_first();
    let mut out = BytesMut::new();
    frontend_message(&mut out, b'p', |m| {
        m.extend_from_slice(b"SCRAM-SHA-256\0");
        m.extend_from_slice(&(first.len() as i32).to_be_bytes());
        m.extend_from_slice(&first);
    });
    stream.write_all(&out).await.unwrap();
    let (tag, body) = read_message(&mut stream, &mut buf, 1 << 16).await.unwrap();
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &11i32.to_be_bytes()[..]),
        "SASLContinue"
    );
    let text = String::from_utf8(body[4..].to_vec()).unwrap();
    (text, stream, client, buf)
}

fn field<'a>(server_first: &'a str, key: &str) -> &'a str {
    server_first
        .split(',')
        .find_map(|f| f.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {server_first}"))
}

/// Finishes a SCRAM login; returns the SQLSTATE of the FATAL, or "" on success.
async fn finish(
    mut stream: Stream,
    mut client: ScramClient,
    mut buf: BytesMut,
    first: &str,
) -> String {
    let Ok(fin) = client.handle_server_first(first.as_bytes()) else {
        return "client refused server-first".into();
    };
    let mut out = BytesMut::new();
    frontend_message(&mut out, b'p', |m| m.extend_from_slice(&fin));
    stream.write_all(&out).await.unwrap();
    loop {
        let Ok((tag, body)) = read_message(&mut stream, &mut buf, 1 << 16).await else {
            return "closed".into();
        };
        match tag {
            b'E' => {
                let mut fields = body[..].split(|&b| b == 0);
                return fields
                    .find_map(|f| f.strip_prefix(b"C"))
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .unwrap_or_default();
            }
            b'Z' => return String::new(),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_get_a_stable_salt_and_fail_like_a_wrong_password() {
    let pg = shared_cluster();
    let db = pg.scratch_db("cauth_mock");
    let iam = start(pooler::config(pg, &db)).await;
    let addr = iam.local_addr();

    let (a, ..) = server_first(addr, &db.name, "ghost", "x").await;
    let (b, ..) = server_first(addr, &db.name, "ghost", "y").await;
    let (c, ..) = server_first(addr, &db.name, "ghost2", "x").await;
    let (known, ..) = server_first(addr, &db.name, &db.user, "x").await;
    assert_eq!(
        field(&a, "s="),
        field(&b, "s="),
        "the same name gets the same salt"
    );
    assert_ne!(
        field(&a, "s="),
        field(&c, "s="),
        "another name gets another salt"
    );
    assert_ne!(field(&a, "r="), field(&b, "r="), "nonces are fresh");
    assert_eq!(
        field(&a, "i="),
        field(&known, "i="),
        "the same iteration count as a real user"
    );
    assert_eq!(
        field(&a, "s=").len(),
        field(&known, "s=").len(),
        "a salt of the same size"
    );

    // The end is the same as a wrong password: 28P01 after the whole exchange.
    let (first, stream, client, buf) = server_first(addr, &db.name, "ghost", "guess").await;
    assert_eq!(finish(stream, client, buf, &first).await, "28P01");
    let (first, stream, client, buf) = server_first(addr, &db.name, &db.user, "guess").await;
    assert_eq!(finish(stream, client, buf, &first).await, "28P01");
    let (first, stream, client, buf) = server_first(addr, &db.name, &db.user, &db.password).await;
    assert_eq!(
        finish(stream, client, buf, &first).await,
        "",
        "the right password works"
    );
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_delayed_and_limited_per_address() {
    let pg = shared_cluster();
    let db = pg.scratch_db("cauth_limit");
    let mut cfg = pooler::config(pg, &db);
    cfg.auth_failure_limit = 3;
    cfg.auth_failure_delay = Duration::from_millis(300);
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let wrong = TestDb {
        password: "wrong".into(),
        ..db.clone()
    };
    for attempt in 0..3 {
        let started = Instant::now();
        let e = try_connect(addr, &wrong).await.unwrap_err();
        assert_eq!(code(&e), "28P01", "attempt {attempt}: {e:?}");
        // A lower bound only: the error is held back at least auth_failure_delay.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "attempt {attempt} was not delayed"
        );
    }
    // The limit is reached: even the right password is refused, without a password check.
    let e = try_connect(addr, &db).await.unwrap_err();
    assert_eq!(code(&e), "53300", "{e:?}");
    let msg = message(&e);
    assert!(
        msg.contains("auth_failure_limit"),
        "names the setting: {msg}"
    );
    assert!(msg.contains("try again in"), "says when: {msg}");
    assert!(iam.shutdown().await);

    // Without a limit, the right password works after any number of failures.
    let mut cfg = pooler::config(pg, &db);
    cfg.auth_failure_limit = 0;
    let iam = start(cfg).await;
    for _ in 0..5 {
        assert_eq!(
            code(&try_connect(iam.local_addr(), &wrong).await.unwrap_err()),
            "28P01"
        );
    }
    connect(iam.local_addr(), &db).await;
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_logins_cannot_take_logged_in_clients_places() {
    let pg = shared_cluster();
    let db = pg.scratch_db("cauth_pending");
    let mut cfg = pooler::config(pg, &db);
    cfg.max_pending_logins = 4;
    cfg.max_client_conn = 10;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let logged_in = connect(addr, &db).await;

    // Sockets that connect and never send their startup packet: four take every place to
    // log in, the rest are turned away at once with 53300 (not after client_login_timeout).
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut deadline = Instant::now() + T;
    while iam.shared().pending_logins() < 4 {
        assert!(Instant::now() < deadline, "four logins pending");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..20 {
        let mut s = Stream::Tcp(TcpStream::connect(addr).await.unwrap());
        let mut buf = BytesMut::new();
        let read = tokio::time::timeout(T, read_message(&mut s, &mut buf, 1 << 16)).await;
        let (tag, body) = read.expect("answered at once").expect("an error message");
        assert_eq!(tag, b'E', "connection {i}");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("53300") && text.contains("max_pending_logins"),
            "{text}"
        );
    }
    // A real client meanwhile is told the same, clearly; the logged-in one keeps working,
    // and the turned-away sockets never counted toward max_client_conn.
    let e = try_connect(addr, &db).await.unwrap_err();
    assert_eq!(code(&e), "53300", "{e:?}");
    logged_in.simple_query("select 1").await.unwrap();
    assert!(
        iam.shared().open_client_count() <= 1 + 4,
        "refused sockets are not clients"
    );

    // Once the stalled sockets go, logins work again.
    drop(stalled);
    deadline = Instant::now() + T;
    while iam.shared().pending_logins() > 0 {
        assert!(Instant::now() < deadline, "stalled logins released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let again = connect(addr, &db).await;
    again.simple_query("select 1").await.unwrap();
    assert!(iam.shutdown().await);
}
