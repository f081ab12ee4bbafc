//! KILL, KILL_CLIENT, DISABLE / ENABLE, WAIT_CLOSE, and the PgBouncer commands iampool
//! refuses, against a real PostgreSQL.

use std::net::SocketAddr;
use std::time::Duration;

use super::{backend_pid, console, get, num, pool_row, setup, show, wait_for_row, Row, T};
use crate::pooler::{self, code, connect, message, start, try_connect};
use crate::support::pg::{shared_cluster, PgCluster, TestDb};

/// A client of `db` that SHOW CLIENTS can tell by its application_name.
pub(super) async fn client_as(addr: SocketAddr, db: &TestDb, app: &str) -> tokio_postgres::Client {
    let (client, conn) = pooler::client_config(addr, db)
        .application_name(app)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through iampool");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub(super) fn row_of<'a>(rows: &'a [Row], app: &str) -> &'a Row {
    rows.iter()
        .find(|r| get(r, "application_name") == app)
        .unwrap_or_else(|| panic!("no row for {app} in {rows:?}"))
}

/// The SHOW CLIENTS row `pick` chooses, once it is there: a client is listed a moment
/// after its login completes.
pub(super) async fn client_row(admin: &tokio_postgres::Client, pick: impl Fn(&Row) -> bool) -> Row {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let clients = show(admin, "CLIENTS").await;
        if let Some(row) = clients.into_iter().find(|r| pick(r)) {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client is never listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Picks the client with this application_name.
pub(super) fn app(name: &str) -> impl Fn(&Row) -> bool + '_ {
    move |r| get(r, "application_name") == name
}

/// Waits until backend `pid` has gone from the server.
async fn backend_gone(pg: &PgCluster, pid: i32) {
    let deadline = tokio::time::Instant::now() + T;
    while pg
        .psql(&format!(
            "select count(*) from pg_stat_activity where pid = {pid}"
        ))
        .trim()
        != "0"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend {pid} still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The session of a killed client is over: its next query fails with 57P01 (or finds the
/// connection closed, if the FATAL was read with the previous answer).
async fn assert_ended(c: &tokio_postgres::Client, who: &str) -> tokio_postgres::Error {
    let e = tokio::time::timeout(T, c.simple_query("select 1"))
        .await
        .unwrap_or_else(|_| panic!("{who}: no answer"))
        .expect_err(who);
    assert!(code(&e) == "57P01" || e.is_closed(), "{who}: {e:?}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_that_session_and_cuts_its_server() {
    let pg = shared_cluster();
    let (db, mut cfg, users) = setup(pg, "adm_killc");
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let victim = client_as(addr, &db, "victim").await;
    victim.batch_execute("begin").await.unwrap();
    let victim_pid = backend_pid(&victim).await;
    let bystander = client_as(addr, &db, "bystander").await;
    let bystander_pid = backend_pid(&bystander).await;
    assert_ne!(victim_pid, bystander_pid);
    let idle = client_as(addr, &db, "idle-one").await;
    let admin = console(addr, &users.admin).await;

    let id = get(&client_row(&admin, app("victim")).await, "id").to_owned();
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .expect("KILL_CLIENT");
    // In a transaction, yet gone at once: its server was cut, and so is its backend.
    assert_ended(&victim, "victim").await;
    backend_gone(pg, victim_pid).await;
    // The rest of the pool carries on: a cut server is no failover sign.
    assert_eq!(backend_pid(&bystander).await, bystander_pid);
    let pool = iam.shared().pool(&db.name).unwrap();
    assert_eq!(pool.metrics.failovers.get(), 0);
    let rows = wait_for_row(&admin, "POOLS", &db.name, |r| num(r, "sv_idle") == 1).await;
    assert_eq!(num(&rows, "sv_active"), 0, "{rows:?}");

    // An idle client goes at once too.
    let deadline = tokio::time::Instant::now() + T;
    while show(&admin, "CLIENTS")
        .await
        .iter()
        .any(|r| get(r, "application_name") == "victim")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "victim still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = get(&client_row(&admin, app("idle-one")).await, "id").to_owned();
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    assert_ended(&idle, "idle client").await;

    // Another console session can be killed; its FATAL names the command.
    let other = console(addr, &users.stats).await;
    let stats_user = users.stats.0.clone();
    let other_row = client_row(&admin, |r| get(r, "user") == stats_user).await;
    let other_id = get(&other_row, "id").to_owned();
    let admin_user = users.admin.0.clone();
    let admin_row = client_row(&admin, |r| get(r, "user") == admin_user).await;
    let id = get(&admin_row, "id");
    assert_ne!(id, other_id);
    admin
        .simple_query(&format!("KILL_CLIENT {other_id}"))
        .await
        .unwrap();
    let e = assert_ended(&other, "console session").await;
    if !e.is_closed() {
        assert!(message(&e).contains("KILL_CLIENT"), "{e:?}");
    }

    // Mistakes.
    let e = admin
        .simple_query("KILL_CLIENT 987654321")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42704", "{e:?}");
    let e = admin
        .simple_query("KILL_CLIENT 0x55e2fd")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42601", "{e:?}");
    let stats = console(addr, &users.stats).await;
    let e = stats
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501", "{e:?}");
    bystander.simple_query("select 1").await.unwrap();
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_databases_sessions_and_servers_then_holds_it_until_resume() {
    let pg = shared_cluster();
    let (db, mut cfg, users) = setup(pg, "adm_kill");
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let in_tx = connect(addr, &db).await;
    in_tx.batch_execute("begin; select 1").await.unwrap();
    let idle = connect(addr, &db).await;
    idle.simple_query("select 1").await.unwrap();
    let admin = console(addr, &users.admin).await;
    let watcher = console(addr, &users.stats).await;
    assert_eq!(pg.backend_count(&db.name, &db.user), 2);

    admin
        .simple_query(&format!("KILL \"{}\"", db.name))
        .await
        .expect("KILL");
    assert_ended(&in_tx, "client in a transaction").await;
    assert_ended(&idle, "idle client").await;
    let left = pg
        .wait_for_backends(&db.name, &db.user, T, |n| n == 0)
        .await;
    assert_eq!(left, 0, "server connections left after KILL");
    let row = pool_row(&show(&watcher, "DATABASES").await, &db.name);
    assert_eq!(num(&row, "paused"), 1, "{row:?}");
    // Console sessions are not the database's: both still answer.
    assert_eq!(show(&watcher, "VERSION").await.len(), 1);

    // A client that comes now logs in, and its query waits for RESUME.
    let late = connect(addr, &db).await;
    let q = tokio::spawn(async move { late.simple_query("select 42").await.map(|_| late) });
    wait_for_row(&watcher, "POOLS", &db.name, |r| num(r, "cl_waiting") == 1).await;
    assert!(!q.is_finished(), "a query ran on a killed database");
    admin
        .simple_query(&format!("RESUME \"{}\"", db.name))
        .await
        .unwrap();
    let late = tokio::time::timeout(T, q)
        .await
        .expect("the query runs after RESUME")
        .unwrap()
        .expect("query after RESUME");
    late.simple_query("select 1").await.unwrap();

    // KILL of every database spares the console; names are checked.
    admin.simple_query("KILL").await.unwrap();
    assert_ended(&late, "client after KILL").await;
    assert_eq!(show(&admin, "VERSION").await.len(), 1);
    admin.simple_query("RESUME").await.unwrap();
    let e = admin.simple_query("KILL pgbouncer").await.unwrap_err();
    assert_eq!(code(&e), "42809", "{e:?}");
    let e = admin.simple_query("KILL no_such_db").await.unwrap_err();
    assert_eq!(code(&e), "3D000", "{e:?}");
    let e = watcher.simple_query("KILL").await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e:?}");
    let fresh = connect(addr, &db).await;
    fresh.simple_query("select 1").await.unwrap();
    assert_eq!(
        iam.shared().pool(&db.name).unwrap().metrics.failovers.get(),
        0
    );
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_refuses_new_clients_until_enable() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_disable");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;
    let existing = connect(addr, &db).await;
    existing.simple_query("select 1").await.unwrap();

    admin
        .simple_query(&format!("DISABLE \"{}\"", db.name))
        .await
        .expect("DISABLE");
    let Err(e) = try_connect(addr, &db).await else {
        panic!("a new client got into a disabled database");
    };
    assert_eq!(code(&e), "55000", "{e:?}");
    assert!(
        message(&e).contains("not currently accepting connections"),
        "{e:?}"
    );
    // Clients already in go on.
    existing.simple_query("select 1").await.unwrap();
    let row = pool_row(&show(&admin, "DATABASES").await, &db.name);
    assert_eq!(num(&row, "disabled"), 1, "{row:?}");

    for (sql, want) in [
        ("DISABLE", "42601"),
        ("ENABLE", "42601"),
        ("DISABLE no_such_db", "3D000"),
        ("ENABLE iampool", "42809"),
    ] {
        let e = admin.simple_query(sql).await.unwrap_err();
        assert_eq!(code(&e), want, "{sql}: {e:?}");
    }
    let stats = console(addr, &users.stats).await;
    let e = stats
        .simple_query(&format!("ENABLE \"{}\"", db.name))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501", "{e:?}");

    admin
        .simple_query(&format!("ENABLE \"{}\"", db.name))
        .await
        .expect("ENABLE");
    connect(addr, &db)
        .await
        .simple_query("select 1")
        .await
        .unwrap();
    let row = pool_row(&show(&admin, "DATABASES").await, &db.name);
    assert_eq!(num(&row, "disabled"), 0, "{row:?}");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_close_returns_once_reconnected_servers_are_gone() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_waitc");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;
    let watcher = console(addr, &users.stats).await;
    // Nothing marked: it answers at once.
    tokio::time::timeout(T, admin.simple_query("WAIT_CLOSE"))
        .await
        .expect("WAIT_CLOSE with nothing to wait for")
        .unwrap();

    let busy = connect(addr, &db).await;
    busy.batch_execute("begin").await.unwrap();
    let busy_pid = backend_pid(&busy).await;
    admin
        .simple_query(&format!("RECONNECT \"{}\"", db.name))
        .await
        .unwrap();
    let servers = show(&watcher, "SERVERS").await;
    let marked: Vec<_> = servers
        .iter()
        .filter(|s| num(s, "close_needed") == 1)
        .collect();
    assert_eq!(marked.len(), 1, "{servers:?}");
    assert_eq!(num(marked[0], "remote_pid"), i64::from(busy_pid));

    let name = db.name.clone();
    let wait = tokio::spawn(async move {
        admin
            .simple_query(&format!("WAIT_CLOSE \"{name}\""))
            .await
            .map(|_| admin)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !wait.is_finished(),
        "WAIT_CLOSE answered while a marked server was in use"
    );
    busy.batch_execute("commit").await.unwrap();
    let admin = tokio::time::timeout(T, wait)
        .await
        .expect("WAIT_CLOSE answers once the server has closed")
        .unwrap()
        .expect("WAIT_CLOSE");
    let servers = show(&watcher, "SERVERS").await;
    assert!(
        !servers
            .iter()
            .any(|s| num(s, "remote_pid") == i64::from(busy_pid)),
        "{servers:?}"
    );
    backend_gone(pg, busy_pid).await;
    let e = admin
        .simple_query("WAIT_CLOSE no_such_db")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "3D000", "{e:?}");
    assert!(iam.shutdown().await);
}

/// What iampool cannot do is refused with 0A000, the reason and what to use instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_commands_say_why() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_unsup");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;
    for (sql, why) in [
        ("SUSPEND", "cannot hand its connections"),
        ("SHOW FDS", "online restart"),
        ("SHOW ACTIVE_SOCKETS", "packet buffers"),
        ("SET log_connections = 1", "RELOAD"),
        ("SHUTDOWN WAIT_FOR_CLIENTS", "drains"),
    ] {
        let e = admin.simple_query(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        assert!(message(&e).contains(why), "{sql}: {e:?}");
        let hint = e.as_db_error().unwrap().hint().unwrap_or_default();
        assert!(!hint.is_empty(), "{sql}: no hint");
    }
    // Nothing happened: no shutdown, and clients are served.
    assert!(!*iam.shared().shutdown_signal().borrow());
    connect(addr, &db)
        .await
        .simple_query("select 1")
        .await
        .unwrap();
    assert_eq!(show(&admin, "VERSION").await.len(), 1);
    assert!(iam.shutdown().await);
}

/// A raw, logged-in connection to `database` as `user` (trust), its welcome read.
async fn raw_login(addr: SocketAddr, user: &str, database: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = bytes::BytesMut::new();
    iampool::protocol::messages::startup(&mut b, &[("user", user), ("database", database)]);
    s.write_all(&b).await.unwrap();
    let welcome = super::read_reply(&mut s).await;
    assert_eq!(welcome.last().map(|m| m.0), Some(b'Z'), "{welcome:?}");
    s
}

/// The FATAL an idle connection gets, unasked: (SQLSTATE, message).
async fn farewell(s: &mut tokio::net::TcpStream) -> (String, String) {
    let (tag, body) = super::read_msg(s).await.expect("a FATAL before the close");
    assert_eq!(tag, b'E');
    let f = iampool::protocol::messages::parse_error_fields(&body);
    assert!(super::read_msg(s).await.is_none(), "closed after the FATAL");
    (f.code, f.message)
}

/// Every ended session is told by whom: KILL_CLIENT, KILL, or iampool's shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_are_told_why() {
    let pg = shared_cluster();
    let (db, mut cfg, users) = setup(pg, "adm_why");
    cfg.auth_type = iampool::config::AuthType::Trust;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;
    let by_port = |port: u16| move |r: &Row| num(r, "port") == i64::from(port);

    let mut pooled = raw_login(addr, &db.user, &db.name).await;
    let mut console_session = raw_login(addr, &users.stats.0, "pgbouncer").await;
    for s in [&mut pooled, &mut console_session] {
        let row = client_row(&admin, by_port(s.local_addr().unwrap().port())).await;
        let id = get(&row, "id");
        admin
            .simple_query(&format!("KILL_CLIENT {id}"))
            .await
            .unwrap();
        let (code, message) = farewell(s).await;
        assert_eq!(code, "57P01");
        assert!(message.contains("(KILL_CLIENT)"), "{message}");
    }

    let mut pooled = raw_login(addr, &db.user, &db.name).await;
    admin.simple_query("KILL").await.unwrap();
    let (code, message) = farewell(&mut pooled).await;
    assert_eq!(code, "57P01");
    assert!(message.contains("(KILL)"), "{message}");
    admin.simple_query("RESUME").await.unwrap();

    let mut pooled = raw_login(addr, &db.user, &db.name).await;
    iam.shared().request_shutdown();
    let (code, message) = farewell(&mut pooled).await;
    assert_eq!(code, "57P01");
    assert!(message.contains("shutting down"), "{message}");
    assert!(iam.shutdown().await);

    // Session mode: a client between transactions holds its server; it is told too, and
    // its server goes back to the pool rather than being cut.
    let (_, mut cfg, users) = setup(pg, "adm_why_session");
    cfg.auth_type = iampool::config::AuthType::Trust;
    cfg.databases[0] = pooler::config(pg, &db).databases.remove(0);
    cfg.databases[0].pool_mode = iampool::config::PoolMode::Session;
    cfg.users.insert(
        db.user.clone(),
        iampool::config::UserSecret::Plain(iampool::config::Secret::new(db.password.clone())),
    );
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;
    let mut held = raw_login(addr, &db.user, &db.name).await;
    {
        use tokio::io::AsyncWriteExt;
        held.write_all(&super::query(b"select 1")).await.unwrap();
    }
    let reply = super::read_reply(&mut held).await;
    assert_eq!(reply.last().map(|m| m.0), Some(b'Z'), "{reply:?}");
    let row = client_row(&admin, by_port(held.local_addr().unwrap().port())).await;
    let id = get(&row, "id");
    assert_eq!(get(&row, "state"), "active", "{row:?}");
    let servers = show(&admin, "SERVERS").await;
    let server = servers
        .iter()
        .find(|s| get(s, "ptr") == get(&row, "link"))
        .unwrap_or_else(|| panic!("{row:?} {servers:?}"));
    let pid = num(server, "remote_pid");
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let (code, message) = farewell(&mut held).await;
    assert_eq!(code, "57P01");
    assert!(message.contains("(KILL_CLIENT)"), "{message}");
    // Its server is back in the pool, idle: not cut (a cut one is closed, never idle again).
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let servers = show(&admin, "SERVERS").await;
        let back = servers.iter().find(|s| num(s, "remote_pid") == pid);
        if back.is_some_and(|s| get(s, "state") == "idle") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server {pid}: {servers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(iam.shutdown().await);
}
