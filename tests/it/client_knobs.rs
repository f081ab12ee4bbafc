//! PgBouncer's client-side knobs: query_timeout, client_idle_timeout,
//! application_name_add_host and ignore_startup_parameters.

use std::time::Duration;

use iampool::config::PoolMode;

use crate::pooler::{self, client_config, code, connect, message, start};
use crate::support::pg::shared_cluster;

async fn connect_with(config: tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through iampool");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    Ok(c.query_one(sql, &[]).await?.get::<_, String>(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cuts_a_request_and_transaction_mode_keeps_the_client() {
    let pg = shared_cluster();
    let db = pg.scratch_db("qtimeout");
    let mut cfg = pooler::config(pg, &db);
    cfg.query_timeout = Some(Duration::from_secs(1));
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &db).await;

    // Requests shorter than the limit are not cut, even when a transaction of them is longer.
    c.batch_execute("begin").await.unwrap();
    for _ in 0..4 {
        c.batch_execute("select pg_sleep(0.3)").await.unwrap();
    }
    c.batch_execute("commit").await.unwrap();

    let before = one(&c, "select pg_backend_pid()::text").await.unwrap();
    let err = c.simple_query("select pg_sleep(30)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err:?}");
    assert!(message(&err).contains("query_timeout"), "{err:?}");
    // The client keeps its connection; its server was closed, not handed on.
    let after = one(&c, "select pg_backend_pid()::text").await.unwrap();
    assert_ne!(before, after, "the timed-out server was reused");
    let closed = pg
        .wait_for_backends(&db.name, &db.user, Duration::from_secs(15), |n| n <= 1)
        .await;
    assert!(closed <= 1, "the timed-out server is still open");

    // Inside a transaction: the transaction is aborted until the client rolls back.
    c.batch_execute("begin").await.unwrap();
    let err = c.simple_query("select pg_sleep(30)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err:?}");
    let err = c.simple_query("select 1").await.unwrap_err();
    assert_eq!(code(&err), "25P02", "{err:?}");
    c.batch_execute("rollback").await.unwrap();
    assert_eq!(one(&c, "select 'ok'").await.unwrap(), "ok");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_in_session_mode_ends_the_session() {
    let pg = shared_cluster();
    let db = pg.scratch_db("qtsession");
    let mut cfg = pooler::config(pg, &db);
    cfg.query_timeout = Some(Duration::from_millis(500));
    cfg.databases[0].pool_mode = PoolMode::Session;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &db).await;
    let err = c.simple_query("select pg_sleep(30)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err:?}");
    assert!(message(&err).contains("query_timeout"), "{err:?}");
    let next = c.simple_query("select 1").await.unwrap_err();
    assert!(next.is_closed() || code(&next).is_empty(), "{next:?}");
    // A new client gets a new server.
    let d = connect(iam.local_addr(), &db).await;
    assert_eq!(one(&d, "select 'ok'").await.unwrap(), "ok");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_ends_a_pinned_clients_session() {
    let pg = shared_cluster();
    let db = pg.scratch_db("qtpinned");
    let mut cfg = pooler::config(pg, &db);
    cfg.query_timeout = Some(Duration::from_millis(500));
    let iam = start(cfg).await;
    // A temporary table pins the client to its server: the table goes with the server, so
    // the client cannot carry on as if nothing happened.
    let c = connect(iam.local_addr(), &db).await;
    c.batch_execute("create temp table mine (x int)")
        .await
        .unwrap();
    let err = c.simple_query("select pg_sleep(30)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err:?}");
    let next = c.simple_query("select 1").await.unwrap_err();
    assert!(next.is_closed() || code(&next).is_empty(), "{next:?}");
    let d = connect(iam.local_addr(), &db).await;
    assert_eq!(one(&d, "select 'ok'").await.unwrap(), "ok");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_closes_clients_that_hold_no_server() {
    let pg = shared_cluster();
    let db = pg.scratch_db("clientidle");
    let mut cfg = pooler::config(pg, &db);
    cfg.client_idle_timeout = Some(Duration::from_millis(500));
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let idle = connect(addr, &db).await;
    let in_tx = connect(addr, &db).await;
    in_tx.batch_execute("begin; select 1").await.unwrap();
    let busy = connect(addr, &db).await;
    for _ in 0..6 {
        busy.simple_query("select 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The idle client was told why and closed.
    let err = idle.simple_query("select 1").await.unwrap_err();
    assert!(
        code(&err) == "57P05" && message(&err).contains("client_idle_timeout") || err.is_closed(),
        "{err:?}"
    );
    assert!(idle.is_closed());
    // A client inside its transaction holds a server: not idle in this sense.
    assert_eq!(
        one(&in_tx, "select 'still here'").await.unwrap(),
        "still here"
    );
    in_tx.batch_execute("commit").await.unwrap();
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_name_add_host_names_the_client_address() {
    let pg = shared_cluster();
    let db = pg.scratch_db("appnamehost");
    let mut cfg = pooler::config(pg, &db);
    cfg.application_name_add_host = true;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let mut named = client_config(addr, &db);
    named.application_name("orders");
    let c = connect_with(named).await;
    let name = one(&c, "select current_setting('application_name')")
        .await
        .unwrap();
    let port = name
        .strip_prefix("orders - 127.0.0.1:")
        .unwrap_or_else(|| panic!("{name}"));
    assert!(port.parse::<u16>().is_ok(), "{name}");
    // A later SET is the client's own.
    c.batch_execute("set application_name = 'renamed'")
        .await
        .unwrap();
    assert_eq!(
        one(&c, "select current_setting('application_name')")
            .await
            .unwrap(),
        "renamed"
    );

    let anonymous = connect(addr, &db).await;
    let name = one(&anonymous, "select current_setting('application_name')")
        .await
        .unwrap();
    assert!(name.starts_with("app - 127.0.0.1:"), "{name}");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_startup_parameters_drops_what_it_lists() {
    let pg = shared_cluster();
    let db = pg.scratch_db("ignoreparams");
    let options = "-c extra_float_digits=2 -c no_such_setting=1";

    // Without the knob, every startup parameter reaches the server: an unknown one fails.
    let plain = start(pooler::config(pg, &db)).await;
    let mut c = client_config(plain.local_addr(), &db);
    c.options("-c extra_float_digits=2");
    let c = connect_with(c).await;
    assert_eq!(one(&c, "show extra_float_digits").await.unwrap(), "2");
    let mut c = client_config(plain.local_addr(), &db);
    c.options(options);
    let c = connect_with(c).await;
    assert!(one(&c, "select 'x'").await.is_err());
    assert!(plain.shutdown().await);

    let mut cfg = pooler::config(pg, &db);
    cfg.ignore_startup_parameters = vec!["extra_float_digits".into(), "no_such_setting".into()];
    let iam = start(cfg).await;
    let mut c = client_config(iam.local_addr(), &db);
    c.options(options);
    let c = connect_with(c).await;
    assert_eq!(one(&c, "select 'x'").await.unwrap(), "x");
    assert_ne!(one(&c, "show extra_float_digits").await.unwrap(), "2");
    assert!(iam.shutdown().await);

    // `options` listed drops the whole options parameter.
    let mut cfg = pooler::config(pg, &db);
    cfg.ignore_startup_parameters = vec!["options".into()];
    let iam = start(cfg).await;
    let mut c = client_config(iam.local_addr(), &db);
    c.options("-c search_path=nowhere -c no_such_setting=1");
    let c = connect_with(c).await;
    assert_ne!(one(&c, "show search_path").await.unwrap(), "nowhere");
    assert!(iam.shutdown().await);
}
