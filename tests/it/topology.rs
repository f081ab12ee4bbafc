//! Writers and readers: `target_session_attrs` against a real primary and its streaming hot
//! standby (pg_basebackup -R), with a fault proxy standing in for an endpoint whose DNS
//! moves from one server to the other.

use std::time::{Duration, Instant};

use iampool::config::TargetSessionAttrs;

use crate::pooler::{self, code, message, start, try_connect};
use crate::support::fault_proxy::FaultProxy;
use crate::support::pg::{quote_ident, PgCluster, PgOptions, TestDb};

const T: Duration = Duration::from_secs(60);

/// A primary that lets its standby replicate, a role and database on it, and the standby.
fn primary_and_standby(prefix: &str) -> (PgCluster, PgCluster, TestDb) {
    let primary = PgCluster::start(PgOptions {
        hba: vec!["local replication postgres trust".into()],
        ..PgOptions::default()
    });
    let db = primary.scratch_db(prefix);
    primary.psql_db(
        &db.name,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO {}",
            quote_ident(&db.user)
        ),
    );
    let standby = PgCluster::start_standby(&primary);
    (primary, standby, db)
}

/// iampool with one database whose upstream is `proxy`, taking only `target` servers.
async fn iampool_via(
    pg: &PgCluster,
    db: &TestDb,
    proxy: &FaultProxy,
    target: TargetSessionAttrs,
) -> iampool::app::Running {
    let mut config = pooler::config(pg, db);
    let upstream = &mut config.databases[0].upstream;
    upstream.hosts[0].port = proxy.port();
    upstream.target_session_attrs = target;
    config.query_wait_timeout = Duration::from_secs(20);
    // A new client waits for the welcome (the first login) within its login timeout.
    config.client_login_timeout = Duration::from_secs(40);
    start(config).await
}

/// Server connections of `db.user` on `pg` (iampool's), waited for to reach `want`.
async fn settle_backends(pg: &PgCluster, db: &TestDb, want: i64) {
    let n = pg
        .wait_for_backends(&db.name, &db.user, T, |n| n == want)
        .await;
    assert_eq!(n, want, "backends of {} that stay", db.user);
}

/// A read-write pool whose endpoint points at the standby (a DNS answer that lags behind a
/// failover) does not keep the standby: the login is refused with a message that says why,
/// no connection to the standby stays open, and once the endpoint points at the primary a
/// write goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_pool_refuses_a_standby_and_takes_the_primary() {
    let (primary, standby, db) = primary_and_standby("topo_rw");
    let proxy = FaultProxy::start(standby.addr()).await;
    let running = iampool_via(&primary, &db, &proxy, TargetSessionAttrs::ReadWrite).await;
    let addr = running.local_addr();

    // The first client waits for a writer (as during a failover) instead of failing; when
    // the wait runs out it is told why.
    let refused = try_connect(addr, &db)
        .await
        .expect_err("a standby is no writer");
    assert_eq!(code(&refused), "08001", "{refused:?}");
    let why = message(&refused);
    assert!(why.contains("within query_wait_timeout"), "{why}");
    assert!(
        why.contains("is a hot standby, but target_session_attrs is read-write"),
        "{why}"
    );
    settle_backends(&standby, &db, 0).await;

    // A client waiting while the endpoint moves to the primary gets in, with no error.
    let waiting = tokio::spawn({
        let db = db.clone();
        async move { try_connect(addr, &db).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_target(primary.addr());
    let client = waiting
        .await
        .unwrap()
        .expect("the waiting client gets the writer");
    client
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .expect("a write through the writer pool");
    let recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!recovery);
}

/// A read-only pool takes the standby and refuses the primary; and when the standby is
/// promoted, the pool notices from the server's own report (in_hot_standby turns off), drops
/// its connections, and refuses the new primary from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_pool_takes_the_standby_and_follows_its_promotion() {
    let (primary, standby, db) = primary_and_standby("topo_ro");
    primary.psql_db(&db.name, "INSERT INTO t VALUES (7)");
    let proxy = FaultProxy::start(primary.addr()).await;
    let running = iampool_via(&primary, &db, &proxy, TargetSessionAttrs::ReadOnly).await;
    let addr = running.local_addr();

    let refused = try_connect(addr, &db)
        .await
        .expect_err("a primary is no reader");
    assert!(
        message(&refused).contains("is a writer, but target_session_attrs is read-only"),
        "{refused:?}"
    );
    proxy.set_target(standby.addr());
    // The client waits for the pool's next login, which finds the standby.
    let reader = try_connect(addr, &db)
        .await
        .expect("the reader pool takes the standby");
    let deadline = Instant::now() + T;
    loop {
        // The row replicates soon after the standby starts.
        let rows = reader.query("SELECT id FROM t", &[]).await.expect("a read");
        if rows.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the row never replicated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle_backends(&standby, &db, 1).await;

    standby.promote();
    // The first query after the promotion runs on the connection it has; the server's report
    // comes with its answer, and the pool drops that connection when it comes back. The
    // client's next transaction finds no reader (today iampool then ends the client's
    // session with the reason; see issue 12 on keeping it).
    let deadline = Instant::now() + T;
    while reader.query("SELECT 1", &[]).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still served by the promoted server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new client logs in (the pool's welcome is cached) and its first query is refused.
    let refused = match try_connect(addr, &db).await {
        Ok(client) => client
            .query("SELECT 1", &[])
            .await
            .expect_err("no reader any more"),
        Err(e) => e,
    };
    assert!(
        message(&refused).contains("is a writer, but target_session_attrs is read-only"),
        "{refused:?}"
    );
    settle_backends(&standby, &db, 0).await;
}
