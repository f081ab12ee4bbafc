//! The admin console (database `pgbouncer`) against a real PostgreSQL, with psql and
//! tokio-postgres as clients; its column lists against PgBouncer's own (`columns`), the
//! control commands (`control`) and what the SHOWs say about a known situation (`shows`).

mod columns;
mod control;
mod shows;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use iampool::config::{AuthType, Config, Secret, UserSecret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::SimpleQueryMessage;

use crate::pooler::{self, code, connect, message, run, start};
use crate::support::pg::{shared_cluster, unique_name, PgCluster, TestDb};

/// Hang guard for single steps; never an assertion about speed.
const T: Duration = Duration::from_secs(60);

/// Console users: client-side only, they need no PostgreSQL role.
struct Users {
    admin: (String, String),
    stats: (String, String),
}

fn setup(pg: &PgCluster, prefix: &str) -> (TestDb, Config, Users) {
    let db = pg.scratch_db(prefix);
    let mut cfg = pooler::config(pg, &db);
    let name = unique_name(prefix);
    let users = Users {
        admin: (format!("{name}_admin"), format!("{name}_admin_pw")),
        stats: (format!("{name}_stats"), format!("{name}_stats_pw")),
    };
    for (user, pw) in [&users.admin, &users.stats] {
        cfg.users
            .insert(user.clone(), UserSecret::Plain(Secret::new(pw.clone())));
    }
    cfg.admin_users = vec![users.admin.0.clone()];
    cfg.stats_users = vec![users.stats.0.clone()];
    (db, cfg, users)
}

async fn try_console(
    addr: SocketAddr,
    (user, pw): &(String, String),
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .password(pw)
        .dbname("pgbouncer")
        .application_name("console-test")
        .connect_timeout(Duration::from_secs(20))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn console(addr: SocketAddr, user: &(String, String)) -> tokio_postgres::Client {
    try_console(addr, user).await.expect("console login")
}

type Row = HashMap<String, Option<String>>;

fn to_rows(msgs: Vec<SimpleQueryMessage>) -> Vec<Row> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).map(str::to_owned)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

async fn show(c: &tokio_postgres::Client, what: &str) -> Vec<Row> {
    let msgs = tokio::time::timeout(T, c.simple_query(&format!("SHOW {what}")))
        .await
        .expect("SHOW answers")
        .unwrap_or_else(|e| panic!("SHOW {what}: {e:?}"));
    to_rows(msgs)
}

fn get<'a>(row: &'a Row, col: &str) -> &'a str {
    row.get(col)
        .unwrap_or_else(|| panic!("no column {col} in {row:?}"))
        .as_deref()
        .unwrap_or("")
}

fn num(row: &Row, col: &str) -> i64 {
    get(row, col)
        .parse()
        .unwrap_or_else(|_| panic!("{col} not a number in {row:?}"))
}

fn pool_row(rows: &[Row], db: &str) -> Row {
    rows.iter()
        .find(|r| get(r, "database") == db)
        .unwrap_or_else(|| panic!("no row for {db} in {rows:?}"))
        .clone()
}

/// Polls SHOW `what` until `done` holds for the row of `db` (bounded by T); returns that row.
async fn wait_for_row(
    c: &tokio_postgres::Client,
    what: &str,
    db: &str,
    done: impl Fn(&Row) -> bool,
) -> Row {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let row = pool_row(&show(c, what).await, db);
        if done(&row) {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SHOW {what} never reached the expected state: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// psql -d pgbouncer -c SQL as a console user; returns (success, header+rows, stderr).
async fn psql(
    addr: SocketAddr,
    (user, pw): &(String, String),
    sql: &str,
) -> (bool, Vec<Row>, String) {
    let (user, pw, sql) = (user.clone(), pw.clone(), sql.to_owned());
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(
            std::process::Command::new("psql")
                .env_clear()
                .env("PGPASSWORD", &pw)
                .env("PGCONNECT_TIMEOUT", "20")
                .args([
                    "-X",
                    "-A",
                    "-F",
                    "\t",
                    "-P",
                    "footer=off",
                    "-v",
                    "ON_ERROR_STOP=1",
                ])
                .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                .args(["-U", &user, "-d", "pgbouncer", "-c", &sql]),
            T,
        )
    })
    .await
    .unwrap();
    let mut lines = out.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(str::to_owned)
        .collect();
    let rows = lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split('\t').map(|v| Some(v.to_owned())))
                .collect()
        })
        .collect();
    (ok, rows, err)
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    let rows = to_rows(c.simple_query("select pg_backend_pid()").await.unwrap());
    get(&rows[0], "pg_backend_pid").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_pools_clients_and_servers_match_a_known_situation() {
    let pg = shared_cluster();
    let (db, mut cfg, users) = setup(pg, "adm_pools");
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    // Three clients: one inside a transaction, one that ran a query, one that did nothing.
    let c1 = connect(addr, &db).await;
    let c2 = connect(addr, &db).await;
    let c3 = connect(addr, &db).await;
    c1.batch_execute("begin").await.unwrap();
    let in_tx_pid = backend_pid(&c1).await;
    c2.simple_query("select 1").await.unwrap();

    // psql as a real client; the pool's numbers settle once c2's server is back.
    let deadline = tokio::time::Instant::now() + T;
    let row = loop {
        let (ok, rows, err) = psql(addr, &users.admin, "SHOW POOLS").await;
        assert!(ok, "psql SHOW POOLS failed: {err}");
        let row = pool_row(&rows, &db.name);
        if num(&row, "sv_idle") == 1 || tokio::time::Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(get(&row, "user"), db.user);
    assert_eq!(num(&row, "cl_active"), 3, "{row:?}");
    assert_eq!(num(&row, "cl_waiting"), 0, "{row:?}");
    assert_eq!(num(&row, "sv_active"), 1, "{row:?}");
    assert_eq!(num(&row, "sv_idle"), 1, "{row:?}");
    assert_eq!(num(&row, "sv_login"), 0, "{row:?}");
    assert_eq!(num(&row, "maxwait"), 0, "{row:?}");
    assert_eq!(get(&row, "pool_mode"), "transaction");
    for col in [
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_used",
        "sv_tested",
        "maxwait_us",
    ] {
        assert!(row.contains_key(col), "{col} missing");
    }

    // SHOW SERVERS: the server in use is c1's backend, linked to c1's row in SHOW CLIENTS.
    let admin = console(addr, &users.admin).await;
    let servers = show(&admin, "SERVERS").await;
    // One server in use (c1's); the pool's other server is listed as idle.
    let active: Vec<_> = servers
        .iter()
        .filter(|s| get(s, "state") == "active")
        .collect();
    assert_eq!(active.len(), 1, "{servers:?}");
    assert_eq!(servers.len(), 2, "{servers:?}");
    let server = active[0];
    assert_eq!(num(server, "remote_pid"), i64::from(in_tx_pid));
    assert_eq!(get(server, "database"), db.name);
    assert_eq!(get(server, "state"), "active");
    assert_eq!(num(server, "port"), i64::from(pg.port()));

    let clients = show(&admin, "CLIENTS").await;
    let pool_clients: Vec<_> = clients
        .iter()
        .filter(|r| get(r, "database") == db.name)
        .collect();
    assert_eq!(pool_clients.len(), 3, "{clients:?}");
    let active: Vec<_> = pool_clients
        .iter()
        .filter(|r| get(r, "state") == "active")
        .collect();
    assert_eq!(active.len(), 1, "{clients:?}");
    assert_eq!(get(active[0], "link"), get(server, "ptr"));
    assert_eq!(get(server, "link"), get(active[0], "ptr"));
    assert!(pool_clients
        .iter()
        .all(|r| get(r, "addr") == "127.0.0.1" && get(r, "type") == "C"));
    // The console session lists itself, with its application_name.
    let me: Vec<_> = clients
        .iter()
        .filter(|r| get(r, "application_name") == "console-test")
        .collect();
    assert_eq!(me.len(), 1, "{clients:?}");
    assert_eq!(get(me[0], "application_name"), "console-test");
    assert_eq!(get(me[0], "user"), users.admin.0);
    assert_eq!(get(me[0], "database"), "pgbouncer");

    c1.batch_execute("commit").await.unwrap();
    drop((c1, c2, c3));
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_show_returns_rows_and_mistakes_get_errors() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_show");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let c = connect(addr, &db).await;
    c.batch_execute("begin; select 1; commit").await.unwrap();
    c.simple_query("select 2").await.unwrap();
    let admin = console(addr, &users.admin).await;

    let stats = wait_for_row(&admin, "STATS", &db.name, |r| {
        num(r, "total_xact_count") >= 2
    })
    .await;
    assert!(num(&stats, "total_query_count") >= 2, "{stats:?}");
    assert!(num(&stats, "total_received") > 0 && num(&stats, "total_sent") > 0);
    for col in [
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_time",
    ] {
        assert!(num(&stats, col) >= 0, "{col}: {stats:?}");
    }

    let dbs = show(&admin, "DATABASES").await;
    let row = dbs.iter().find(|r| get(r, "name") == db.name).unwrap();
    assert_eq!(get(row, "host"), "127.0.0.1");
    assert_eq!(num(row, "port"), i64::from(pg.port()));
    assert_eq!(get(row, "database"), db.name);
    assert_eq!(get(row, "force_user"), db.user);
    assert_eq!(num(row, "pool_size"), 10);
    assert_eq!(num(row, "paused"), 0);
    assert!(num(row, "current_connections") >= 1);

    let config = show(&admin, "CONFIG").await;
    let value = |key: &str| {
        let r = config
            .iter()
            .find(|r| get(r, "key") == key)
            .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"));
        (get(r, "value").to_owned(), get(r, "changeable").to_owned())
    };
    assert_eq!(value("max_client_conn"), ("2000".into(), "yes".into()));
    assert_eq!(value("listen").1, "no");
    assert_eq!(value("admin_users").0, users.admin.0);
    let all = format!("{config:?}");
    for secret in [&db.password, &users.admin.1, &users.stats.1] {
        assert!(!all.contains(secret.as_str()), "a secret in SHOW CONFIG");
    }

    let version = show(&admin, "VERSION").await;
    assert!(get(&version[0], "version").starts_with("iampool "));
    let tokens = show(&admin, "TOKENS").await;
    let row = pool_row(&tokens, &db.name);
    assert_eq!(get(&row, "auth"), "password");
    assert_eq!(row.get("tokens_signed"), Some(&None), "{row:?}");

    // Several statements in one query; psql shows each result.
    let (ok, rows, err) = psql(addr, &users.admin, "SHOW VERSION; SHOW HELP").await;
    assert!(ok, "{err}");
    assert!(rows
        .iter()
        .any(|r| get(r, "version").starts_with("iampool")));
    assert!(err.contains("SHOW POOLS"), "SHOW HELP notice: {err}");

    // Mistakes: an ERROR with a hint, and the session goes on.
    let e = admin.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    let hint = e
        .as_db_error()
        .unwrap()
        .hint()
        .unwrap_or_default()
        .to_owned();
    assert!(
        hint.contains("SHOW POOLS") && hint.contains("PAUSE"),
        "{hint}"
    );
    let e = admin
        .simple_query("SHOW VERSION; NONSENSE; SHOW POOLS")
        .await;
    assert_eq!(code(&e.unwrap_err()), "42601");
    let e = admin.simple_query("PAUSE no_such_db").await.unwrap_err();
    assert_eq!(code(&e), "3D000");
    // The extended protocol is refused cleanly, then simple queries still work.
    let e = admin.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    assert_eq!(show(&admin, "VERSION").await.len(), 1);
    admin.simple_query("").await.unwrap();

    // In-process there is no configuration to re-read: RELOAD says so.
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&e), "F0000");
    assert!(message(&e).contains("configuration source"), "{e:?}");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_console_users_get_in_and_stats_users_only_show() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_roles");
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let stats = console(addr, &users.stats).await;
    assert_eq!(pool_row(&show(&stats, "POOLS").await, &db.name).len(), 17);
    for cmd in ["PAUSE", "RESUME", "RECONNECT", "RELOAD", "SHUTDOWN"] {
        let e = stats.simple_query(cmd).await.unwrap_err();
        assert_eq!(code(&e), "42501", "{cmd}: {e:?}");
    }
    assert!(!*iam.shared().shutdown_signal().borrow());
    let (ok, _, err) = psql(addr, &users.stats, "PAUSE").await;
    assert!(!ok && err.contains("permission denied"), "{err}");

    // A pool user with the right password is still no console user; a wrong password fails
    // as it would anywhere.
    let pool_user = (db.user.clone(), db.password.clone());
    let e = try_console(addr, &pool_user).await.err().unwrap();
    assert_eq!(code(&e), "28000", "{e:?}");
    assert!(message(&e).contains("not allowed"), "{e:?}");
    let wrong = (users.admin.0.clone(), "wrong".to_owned());
    let e = try_console(addr, &wrong).await.err().unwrap();
    assert_eq!(code(&e), "28P01", "{e:?}");
    // The alias reaches the console too.
    let (user, pw) = &users.admin;
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(addr.port())
        .user(user)
        .password(pw)
        .dbname("iampool")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(show(&client, "VERSION").await.len(), 1);
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_the_transaction_then_holds_queries_until_resume() {
    let pg = shared_cluster();
    let (db, mut cfg, users) = setup(pg, "adm_pause");
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;
    let watcher = console(addr, &users.stats).await;

    let c1 = connect(addr, &db).await;
    c1.batch_execute("begin; select 1").await.unwrap();
    let pause = tokio::spawn(async move { admin.simple_query("PAUSE").await.map(|_| admin) });
    // The pool is paused, but PAUSE has not answered: c1's transaction still holds a server.
    wait_for_row(&watcher, "DATABASES", &db.name, |r| num(r, "paused") == 1).await;
    let still = pool_row(&show(&watcher, "POOLS").await, &db.name);
    assert_eq!(num(&still, "sv_active"), 1, "{still:?}");
    assert!(
        !pause.is_finished(),
        "PAUSE answered while a transaction ran"
    );

    // The transaction ends normally; then PAUSE answers.
    c1.batch_execute("commit").await.unwrap();
    let admin = tokio::time::timeout(T, pause)
        .await
        .expect("PAUSE answers once the transaction ended")
        .unwrap()
        .expect("PAUSE");

    // New queries wait while paused...
    let c2 = connect(addr, &db).await;
    let q = tokio::spawn(async move { c2.simple_query("select 42").await.map(|_| c2) });
    let row = wait_for_row(&watcher, "POOLS", &db.name, |r| num(r, "cl_waiting") == 1).await;
    assert!(!q.is_finished(), "a query ran while paused");
    // The idle server stays put and no new one is opened for the waiting client.
    let servers = ["sv_idle", "sv_active", "sv_login"].map(|c| num(&row, c));
    assert_eq!(servers, [1, 0, 0], "{row:?}");
    // SHOW CLIENTS shows that client as waiting.
    let clients = show(&watcher, "CLIENTS").await;
    assert_eq!(
        clients
            .iter()
            .filter(|c| get(c, "database") == db.name && get(c, "state") == "waiting")
            .count(),
        1,
        "{clients:?}"
    );
    // ...until RESUME.
    admin.simple_query("RESUME").await.unwrap();
    let c2 = tokio::time::timeout(T, q)
        .await
        .expect("the query runs after RESUME")
        .unwrap()
        .expect("query after RESUME");
    c2.simple_query("select 1").await.unwrap();
    let row = pool_row(&show(&watcher, "DATABASES").await, &db.name);
    assert_eq!(num(&row, "paused"), 0);
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_replaces_server_connections() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_reconnect");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;

    let idle = connect(addr, &db).await;
    let busy = connect(addr, &db).await;
    busy.batch_execute("begin").await.unwrap();
    let busy_pid = backend_pid(&busy).await;
    let idle_pid = backend_pid(&idle).await;
    assert_ne!(idle_pid, busy_pid);

    admin.simple_query("RECONNECT").await.unwrap();
    // The idle server is replaced at once; the one in use finishes its transaction first.
    assert_eq!(backend_pid(&busy).await, busy_pid);
    let fresh = backend_pid(&idle).await;
    assert!(fresh != idle_pid && fresh != busy_pid);
    busy.batch_execute("commit").await.unwrap();
    let after = backend_pid(&busy).await;
    assert!(after != idle_pid && after != busy_pid, "{after}");

    // Both old backends are closed.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let out = pg.psql(&format!(
            "select count(*) from pg_stat_activity where pid in ({idle_pid}, {busy_pid})"
        ));
        if out.trim() == "0" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old servers still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // RECONNECT of one database by name works too.
    admin
        .simple_query(&format!("RECONNECT \"{}\"", db.name))
        .await
        .unwrap();
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_pooler() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_shutdown");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let c = connect(addr, &db).await;
    c.simple_query("select 1").await.unwrap();
    // An idle console session must not hold the drain up.
    let _idle_console = console(addr, &users.stats).await;
    let mut signal = iam.shared().shutdown_signal();
    assert!(!*signal.borrow_and_update());

    let (ok, _, err) = psql(addr, &users.admin, "SHUTDOWN").await;
    assert!(ok, "{err}");
    tokio::time::timeout(T, signal.changed())
        .await
        .expect("shutdown signal fires")
        .unwrap();
    assert!(*signal.borrow());
    assert!(iam.shared().is_draining());
    // The idle pool client is told, and every session ends.
    let e = tokio::time::timeout(T, c.simple_query("select 1"))
        .await
        .expect("answered")
        .unwrap_err();
    assert!(code(&e) == "57P01" || e.is_closed(), "{e:?}");
    assert!(iam.shutdown().await, "clients left after SHUTDOWN");
}

/// Reads one backend message from a raw socket (bounded).
async fn read_msg(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    let read = tokio::time::timeout(T, s.read_exact(&mut head))
        .await
        .expect("the console answers");
    read.ok()?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

/// Messages up to and including ReadyForQuery, or until the connection closes.
async fn read_reply(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((tag, body)) = read_msg(s).await {
        out.push((tag, body));
        if tag == b'Z' {
            break;
        }
    }
    out
}

fn error_code(body: &[u8]) -> String {
    iampool::protocol::messages::parse_error_fields(body).code
}

async fn raw_console(addr: SocketAddr, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut b = bytes::BytesMut::new();
    iampool::protocol::messages::startup(&mut b, &[("user", user), ("database", "pgbouncer")]);
    s.write_all(&b).await.unwrap();
    let welcome = read_reply(&mut s).await;
    assert_eq!(welcome.last().map(|m| m.0), Some(b'Z'), "{welcome:?}");
    s
}

fn query(sql: &[u8]) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql);
    m.push(0);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_input_gets_an_error_not_a_hang() {
    let pg = shared_cluster();
    let (_db, mut cfg, users) = setup(pg, "adm_garbage");
    cfg.auth_type = AuthType::Trust;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = users.admin.0.as_str();

    // Invalid UTF-8 and odd text: an ERROR, and the session goes on.
    let mut s = raw_console(addr, admin).await;
    for sql in [
        &b"\xff\xfe SHOW"[..],
        b"\"unterminated",
        b"SHOW \x01\x02",
        b";;;",
        b"PAUSE a b c",
    ] {
        s.write_all(&query(sql)).await.unwrap();
        let reply = read_reply(&mut s).await;
        let tags: Vec<u8> = reply.iter().map(|m| m.0).collect();
        assert_eq!(tags.last(), Some(&b'Z'), "{sql:?}: {reply:?}");
        assert!(tags.contains(&b'E') || tags.contains(&b'I'), "{sql:?}");
    }
    s.write_all(&query(b"SHOW VERSION")).await.unwrap();
    let tags: Vec<u8> = read_reply(&mut s).await.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"TDCZ");

    // Broken framing: a FATAL and a close.
    for bad in [
        vec![b'Q', 0, 0, 0, 2],
        vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
        vec![b'Q', 0, 0, 0, 7, b'a', b'b', b'c'],
        vec![b'?', 0, 0, 0, 4],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let mut s = raw_console(addr, admin).await;
        s.write_all(&bad).await.unwrap();
        let reply = read_reply(&mut s).await;
        let (tag, body) = reply.first().unwrap_or_else(|| panic!("{bad:?}: no reply"));
        assert_eq!(*tag, b'E', "{bad:?}: {reply:?}");
        assert_eq!(error_code(body), "08P01", "{bad:?}");
        assert!(read_msg(&mut s).await.is_none(), "{bad:?}: not closed");
    }
    assert!(iam.shutdown().await);
}

/// A rotated upstream password applies on reload to the logins that follow, without a
/// restart; a setting that needs a restart is still reported by every later reload until
/// there has been one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_the_upstream_password_and_remembers_pending_restarts() {
    let pg = crate::support::pg::shared_cluster();
    let db = pg.scratch_db("reload_rotate");
    let cfg = pooler::config(pg, &db);
    let iam = start(cfg.clone()).await;
    let client = pooler::connect(iam.local_addr(), &db).await;
    client.simple_query("select 1").await.unwrap();

    // The password changes upstream and in the configuration.
    pg.psql(&format!(
        "alter role {} password 'rotated-secret'",
        crate::support::pg::quote_ident(&db.user)
    ));
    let mut rotated = cfg.clone();
    rotated.databases[0].upstream.password = Some(iampool::config::Secret::new("rotated-secret"));
    let report = iam.shared().apply(rotated.clone());
    assert!(
        report
            .applied
            .contains(&format!("databases.{}.password", db.name)),
        "{report:?}"
    );
    assert!(report.needs_restart.is_empty(), "{report:?}");
    // New server logins use it: retire the old servers and sign in again.
    iam.shared().pool(&db.name).unwrap().retire_all();
    let fresh = pooler::connect(iam.local_addr(), &db).await;
    fresh
        .simple_query("select 1")
        .await
        .expect("a new server login with the rotated password");
    client
        .simple_query("select 1")
        .await
        .expect("the first client still works");

    // A restart-only change is reported, and again on the next reload.
    let mut moved = rotated.clone();
    moved.listen = vec![
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    ];
    let first = iam.shared().apply(moved.clone());
    assert!(
        first.needs_restart.contains(&"listen".to_owned()),
        "{first:?}"
    );
    let second = iam.shared().apply(moved);
    assert!(
        second.needs_restart.contains(&"listen".to_owned()),
        "still pending: {second:?}"
    );
    // Going back to what runs clears it.
    let back = iam.shared().apply(rotated);
    assert!(back.needs_restart.is_empty(), "{back:?}");
    assert!(iam.shutdown().await);
}
