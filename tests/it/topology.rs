//! Writers and readers: `target_session_attrs` against a real primary and its streaming hot
//! standby (pg_basebackup -R), with a fault proxy standing in for an endpoint whose DNS
//! moves from one server to the other.

use std::time::{Duration, Instant};

use iampool::config::TargetSessionAttrs;

use crate::pooler::{self, client_config, code, message, start, try_connect};
use crate::support::fault_proxy::FaultProxy;
use crate::support::ledger::{Ledger, SCHEMA};
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
    assert!(!on_standby(&client).await);
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
    // client's next transaction finds no reader: it waits, then fails with an ERROR that
    // says why, and the client keeps its connection.
    let deadline = Instant::now() + T;
    let refused = loop {
        match reader.query("SELECT 1", &[]).await {
            Ok(_) => assert!(
                Instant::now() < deadline,
                "still served by the promoted server"
            ),
            Err(e) => break e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        message(&refused).contains("is a writer, but target_session_attrs is read-only"),
        "{refused:?}"
    );
    assert!(!reader.is_closed(), "the client keeps its connection");
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

/// Whether the server a client's next statement runs on is in recovery (a standby).
async fn on_standby(c: &impl tokio_postgres::GenericClient) -> bool {
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("pg_is_in_recovery()")
        .get(0)
}

/// Synchronous replication to the standby, so that every acknowledged commit is on it too.
async fn make_replication_synchronous(primary: &PgCluster) {
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'; SELECT pg_reload_conf()");
    let deadline = Instant::now() + T;
    while primary
        .psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")
        .trim()
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "the standby never became synchronous"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How iampool finds the writer after a failover.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    /// One host name whose address moves (Aurora's cluster endpoint, RDS's DNS name): a
    /// proxy that is pointed at the new primary.
    Moving,
    /// Both servers as libpq hosts (`host=primary,standby`), with target_session_attrs.
    BothHosts,
}

/// A failover under load, as an Aurora or RDS Multi-AZ failover looks from a pooler: writers
/// run a commit ledger through a read-write pool while the primary shuts down (fast) and the
/// standby is promoted. No acknowledged commit is lost, writes succeed again within seconds
/// of the promotion without restarting iampool, clients that were idle see no error, the
/// pool counts one failover and how long it took, and its connections are all to the new
/// primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_loses_no_acknowledged_commit() {
    failover_under_load(Endpoint::Moving).await;
}

/// The same with both servers listed as hosts of one upstream: the pool tries the next host
/// when the first refuses or is a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_between_two_hosts_loses_no_acknowledged_commit() {
    failover_under_load(Endpoint::BothHosts).await;
}

async fn failover_under_load(endpoint: Endpoint) {
    let (mut primary, standby, db) = primary_and_standby("topo_failover");
    make_replication_synchronous(&primary).await;
    let direct = primary.connect(&db.user, &db.password, &db.name).await;
    direct.batch_execute(SCHEMA).await.unwrap();
    direct
        .batch_execute("CREATE TABLE probe (at timestamptz)")
        .await
        .unwrap();
    drop(direct);
    let proxy = FaultProxy::start(primary.addr()).await;
    let mut config = pooler::config(&primary, &db);
    let upstream = &mut config.databases[0].upstream;
    match endpoint {
        Endpoint::Moving => upstream.hosts[0].port = proxy.port(),
        Endpoint::BothHosts => {
            let mut second = upstream.hosts[0].clone();
            second.port = standby.port();
            upstream.hosts.push(second);
        }
    }
    upstream.target_session_attrs = TargetSessionAttrs::ReadWrite;
    config.databases[0].pool_size = 4;
    config.query_wait_timeout = Duration::from_secs(30);
    config.auth_type = iampool::config::AuthType::Trust;
    let running = start(config).await;
    let addr = running.local_addr();

    let idle = [
        try_connect(addr, &db).await.unwrap(),
        try_connect(addr, &db).await.unwrap(),
    ];
    for c in &idle {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let probe = try_connect(addr, &db).await.unwrap();
    let ledger = Ledger::start(client_config(addr, &db), 4, 1, Duration::from_millis(2));
    ledger.wait_for_more(100, T).await;

    let pool0 = running.shared().pool(&db.name).expect("the pool");
    eprintln!(
        "DEBUG before stop: acked {} status {:?}",
        ledger.acked(),
        pool0.status()
    );
    primary.stop();
    eprintln!(
        "DEBUG after stop: acked {} status {:?}",
        ledger.acked(),
        pool0.status()
    );
    standby.promote();
    eprintln!(
        "DEBUG after promote: acked {} status {:?}",
        ledger.acked(),
        pool0.status()
    );
    let promoted = Instant::now();
    proxy.set_target(standby.addr());
    // The probe's statement waits for a writer (or fails once, with the loss) and then runs.
    let first_write = loop {
        match probe.execute("INSERT INTO probe VALUES (now())", &[]).await {
            Ok(_) => break promoted.elapsed(),
            Err(e) => {
                assert!(promoted.elapsed() < T, "no write within {T:?}: {e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    ledger.wait_for_more(100, T).await;
    for c in &idle {
        c.simple_query("SELECT 1")
            .await
            .expect("an idle client sees no error");
    }
    let check = standby
        .connect("postgres", standby.superuser_password(), &db.name)
        .await;
    let report = ledger.verify(&check).await;
    let pool = running.shared().pool(&db.name).expect("the pool");
    let failovers = pool.metrics.failovers.get();
    let recovery = pool.metrics.failover_recovery.get_sample_sum();
    println!(
        "failover ({endpoint:?}): first write {:.0} ms after the promotion; pool recovery {recovery:.2} s \
         over {failovers} failover(s); {report}",
        first_write.as_secs_f64() * 1000.0
    );
    report.assert_no_loss(200);
    assert!(failovers >= 1, "the pool saw the failover");
    assert!(pool.metrics.failover_recovery.get_sample_count() >= 1);
    assert!(first_write < T, "writes resumed after {first_write:?}");
    // Every server connection of the pool is to the new primary.
    let live = pool.status();
    let on_new = standby.backend_count(&db.name, &db.user);
    assert_eq!(on_new as usize, live.idle + live.active, "{live:?}");
}

/// Read-only routing without a SQL parser: a database whose `read_only_database` is a reader
/// pool over the standby sends the transactions that declare themselves read-only there
/// (BEGIN READ ONLY, START TRANSACTION ... READ ONLY, a driver's read-only transaction, and
/// everything of a client whose startup sets default_transaction_read_only), and every other
/// transaction, writes included, to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_go_to_the_reader_pool() {
    let (primary, standby, db) = primary_and_standby("topo_route");
    let mut config = pooler::config(&primary, &db);
    let readers = format!("{}_ro", db.name);
    let mut reader = config.databases[0].clone();
    reader.name = readers.clone();
    reader.upstream.hosts[0].port = standby.port();
    reader.upstream.target_session_attrs = TargetSessionAttrs::ReadOnly;
    config.databases[0].upstream.target_session_attrs = TargetSessionAttrs::ReadWrite;
    config.databases[0].read_only_database = Some(readers.clone());
    config.databases.push(reader);
    let running = start(config).await;
    let addr = running.local_addr();

    let client = try_connect(addr, &db).await.unwrap();
    let in_recovery = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "t"),
                _ => None,
            })
            .expect("a row")
    };
    for (sql, on_reader) in [
        ("BEGIN READ ONLY; SELECT pg_is_in_recovery()", true),
        ("SELECT pg_is_in_recovery()", false),
        (
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT pg_is_in_recovery()",
            true,
        ),
        ("BEGIN; SELECT pg_is_in_recovery()", false),
        ("BEGIN READ WRITE; SELECT pg_is_in_recovery()", false),
    ] {
        let rows = client.simple_query(sql).await.unwrap();
        assert_eq!(in_recovery(rows), on_reader, "{sql}");
        client.batch_execute("COMMIT").await.unwrap();
    }
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (1); COMMIT")
        .await
        .expect("a write goes to the writer");

    // A driver's read-only transaction (tokio-postgres sends START TRANSACTION READ ONLY).
    let mut client = client;
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .unwrap();
    let r = on_standby(&tx).await;
    assert!(r, "a driver's read-only transaction runs on the reader");
    tx.commit().await.unwrap();

    // A client that is read-only from its startup: everything goes to the reader.
    let mut cfg = pooler::client_config(addr, &db);
    cfg.options("-c default_transaction_read_only=on");
    let (ro, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let r = on_standby(&ro).await;
    assert!(r, "a read-only client runs on the reader");

    let pools = running.shared();
    let writes = pools.pool(&db.name).unwrap().metrics.transactions.get();
    let reads = pools.pool(&readers).unwrap().metrics.transactions.get();
    assert!(reads >= 4 && writes >= 4, "reads {reads}, writes {writes}");
}

/// Several hosts, as libpq takes them: prefer-standby takes the standby even when the
/// primary is listed first, and the primary once no standby answers; load_balance_hosts =
/// random spreads a pool's logins over its hosts (here two endpoints of the one standby).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_standby_and_load_balanced_hosts() {
    let (primary, mut standby, db) = primary_and_standby("topo_hosts");
    let mut config = pooler::config(&primary, &db);
    let first = config.databases[0].upstream.hosts[0].clone();
    let host = |port: u16| iampool::config::Host {
        port,
        ..first.clone()
    };
    let a = FaultProxy::start(standby.addr()).await;
    let b = FaultProxy::start(standby.addr()).await;
    let mut balanced = config.databases[0].clone();
    balanced.name = format!("{}_lb", db.name);
    balanced.upstream.hosts = vec![host(a.port()), host(b.port())];
    balanced.upstream.load_balance_hosts = iampool::config::LoadBalanceHosts::Random;
    balanced.pool_size = 16;
    let prefer = &mut config.databases[0];
    prefer.upstream.hosts = vec![host(primary.port()), host(standby.port())];
    prefer.upstream.target_session_attrs = TargetSessionAttrs::PreferStandby;
    config.databases.push(balanced.clone());
    let running = start(config).await;
    let addr = running.local_addr();

    let client = try_connect(addr, &db).await.unwrap();
    let r = on_standby(&client).await;
    assert!(
        r,
        "prefer-standby takes the standby, though the primary is listed first"
    );
    drop(client);

    // Sixteen logins at once over two hosts in random order: both get some.
    let mut lb = db.clone();
    lb.name = balanced.name.clone();
    let mut clients = Vec::new();
    for _ in 0..16 {
        let c = try_connect(addr, &lb).await.unwrap();
        clients.push(c);
    }
    let holds: Vec<_> = clients
        .iter()
        .map(|c| c.simple_query("BEGIN; SELECT 1"))
        .collect();
    for h in futures_util::future::join_all(holds).await {
        h.unwrap();
    }
    let (on_a, on_b) = (a.open(), b.open());
    assert_eq!(on_a + on_b, 16, "one server per open transaction");
    assert!(
        on_a >= 2 && on_b >= 2,
        "random order spreads logins: {on_a} and {on_b}"
    );
    for c in &clients {
        c.simple_query("COMMIT").await.unwrap();
    }
    drop(clients);

    // No standby answers: prefer-standby's second pass takes the primary.
    standby.stop();
    running.shared().pool(&db.name).unwrap().retire_all();
    let client = try_connect(addr, &db).await.unwrap();
    let r = on_standby(&client).await;
    assert!(
        !r,
        "with the standby down, prefer-standby takes the primary"
    );
}
