//! Session state in transaction mode: what one client sets for its session never reaches the
//! next client on the same server (issue 13).

use std::time::Duration;

use crate::pooler::{self, code, connect, start};
use crate::support::pg::{quote_ident, shared_cluster};

/// The first value of a one-row, one-column simple query.
async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

/// One server, two clients: the first sets a search_path, a statement_timeout, a setting
/// through set_config, a time zone and a role with more privileges (simple and extended
/// protocol); the second, given the same server next, sees none of it: the defaults, its own
/// user, and no access to what only the raised role may read. The first client, given the
/// server back untouched, still sees its own settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_roles_do_not_leak_to_the_next_client() {
    let pg = shared_cluster();
    let db = pg.scratch_db("leak");
    let privileged = format!("{}_admin", db.user);
    pg.psql_db(
        &db.name,
        &format!(
            "CREATE ROLE {p} NOLOGIN; GRANT {p} TO {u}; ALTER ROLE {u} NOINHERIT; CREATE TABLE secret (v int); \
             ALTER TABLE secret OWNER TO {p}; CREATE SCHEMA elsewhere AUTHORIZATION {u};",
            p = quote_ident(&privileged),
            u = quote_ident(&db.user)
        ),
    );
    let mut config = pooler::config(pg, &db);
    config.databases[0].pool_size = 1;
    let running = start(config).await;
    let addr = running.local_addr();

    let a = connect(addr, &db).await;
    let b = connect(addr, &db).await;
    let defaults = [
        one(&b, "SHOW search_path").await,
        one(&b, "SHOW statement_timeout").await,
        one(&b, "SHOW TimeZone").await,
    ];
    let backend = one(&b, "SELECT pg_backend_pid()").await;

    a.execute("SET search_path TO elsewhere", &[])
        .await
        .unwrap();
    a.batch_execute("SET statement_timeout = '4321ms'; SET TIME ZONE 'Pacific/Auckland'")
        .await
        .unwrap();
    a.batch_execute("SELECT pg_catalog.set_config('iampool.test', 'from-a', false)")
        .await
        .unwrap();
    a.batch_execute(&format!("SET ROLE {}", quote_ident(&privileged)))
        .await
        .unwrap();
    assert_eq!(one(&a, "SELECT count(*) FROM public.secret").await, "0");
    // The same client keeps its settings while it keeps getting the server back.
    assert_eq!(one(&a, "SHOW search_path").await, "elsewhere");
    assert_eq!(one(&a, "SELECT current_user").await, privileged);
    assert_eq!(one(&a, "SELECT pg_backend_pid()").await, backend);

    assert_eq!(
        one(&b, "SELECT pg_backend_pid()").await,
        backend,
        "the same server"
    );
    assert_eq!(
        one(&b, "SELECT current_user").await,
        db.user,
        "no role leaks"
    );
    let denied = b
        .simple_query("SELECT count(*) FROM public.secret")
        .await
        .expect_err("the raised role's table");
    assert_eq!(code(&denied), "42501", "{denied:?}");
    assert_eq!(one(&b, "SHOW search_path").await, defaults[0]);
    assert_eq!(one(&b, "SHOW statement_timeout").await, defaults[1]);
    assert_eq!(one(&b, "SHOW TimeZone").await, defaults[2]);
    assert_eq!(
        one(
            &b,
            "SELECT coalesce(current_setting('iampool.test', true), '')"
        )
        .await,
        ""
    );
    // A SET LOCAL ends with its transaction: nothing to reset for it.
    b.batch_execute("BEGIN; SET LOCAL statement_timeout = '1s'; COMMIT")
        .await
        .unwrap();
    assert_eq!(one(&a, "SHOW statement_timeout").await, defaults[1]);
    tokio::time::timeout(Duration::from_secs(30), async {
        assert!(running.shutdown().await);
    })
    .await
    .expect("shutdown");
}

/// A client's own SET and RESET statements follow it to other servers: with its first server
/// held by another client's open transaction, its next statements run on the second server,
/// where its search_path, statement_timeout, time zone and role are what it set (a SET
/// inside a transaction that rolled back is not), and a RESET is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_settings_follow_it_to_other_servers() {
    let pg = shared_cluster();
    let db = pg.scratch_db("follow");
    let privileged = format!("{}_admin", db.user);
    pg.psql_db(
        &db.name,
        &format!(
            "CREATE ROLE {p} NOLOGIN; GRANT {p} TO {u}; CREATE SCHEMA elsewhere AUTHORIZATION {u};",
            p = quote_ident(&privileged),
            u = quote_ident(&db.user)
        ),
    );
    let mut config = pooler::config(pg, &db);
    config.databases[0].pool_size = 2;
    let running = start(config).await;
    let addr = running.local_addr();

    let a = connect(addr, &db).await;
    let other = connect(addr, &db).await;
    let first = one(&a, "SELECT pg_backend_pid()").await;
    a.execute("SET search_path TO elsewhere, public", &[])
        .await
        .unwrap();
    a.batch_execute("SET statement_timeout = '4321ms'")
        .await
        .unwrap();
    a.batch_execute("SET TIME ZONE 'Pacific/Auckland'")
        .await
        .unwrap();
    a.batch_execute(&format!("SET ROLE {}", quote_ident(&privileged)))
        .await
        .unwrap();
    a.batch_execute("SET lock_timeout = '777ms'").await.unwrap();
    a.batch_execute("RESET lock_timeout").await.unwrap();
    a.batch_execute("BEGIN; SET work_mem = '1234kB'")
        .await
        .unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();

    // The other client takes A's server and keeps it. The pool usually hands out the server
    // released last, but does not promise which idle server a client gets (one full run in
    // several gave the other one): try again.
    // Then A's settings are on the server it used last (replayed there if it moved), which
    // is the one released last.
    let mut first = first;
    let mut held = false;
    for _ in 0..20 {
        other.batch_execute("BEGIN").await.unwrap();
        if one(&other, "SELECT pg_backend_pid()").await == first {
            held = true;
            break;
        }
        other.batch_execute("COMMIT").await.unwrap();
        first = one(&a, "SELECT pg_backend_pid()").await;
    }
    assert!(held, "the other client got A's server");
    assert_eq!(one(&other, "SHOW search_path").await, "\"$user\", public");

    let second = one(&a, "SELECT pg_backend_pid()").await;
    assert_ne!(second, first, "A runs on the other server now");
    assert_eq!(one(&a, "SHOW search_path").await, "elsewhere, public");
    assert_eq!(one(&a, "SHOW statement_timeout").await, "4321ms");
    assert_eq!(one(&a, "SHOW TimeZone").await, "Pacific/Auckland");
    assert_eq!(one(&a, "SELECT current_user").await, privileged);
    assert_eq!(
        one(&a, "SHOW lock_timeout").await,
        "0",
        "RESET is followed too"
    );
    assert_eq!(
        one(&a, "SHOW work_mem").await,
        "4MB",
        "a rolled-back SET is not"
    );
    other.batch_execute("COMMIT").await.unwrap();
    assert!(running.shutdown().await);
}

/// How many servers of the test database's pool are pinned now.
fn pinned(running: &iampool::app::Running, db: &str) -> usize {
    running.shared().pool(db).expect("pool").status().pinned
}

/// Temporary tables, session advisory locks, WITH HOLD cursors and SQL PREPARE pin their
/// client to its server (pool_size 2, so max_pinned_servers 1): the client sees its state
/// on every later transaction, the other clients never see it, a second client's pinning
/// statement is refused (53400, simple and extended protocol) without losing its connection,
/// and the pin ends when the state is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_its_client_until_it_is_gone() {
    let pg = shared_cluster();
    let db = pg.scratch_db("pin");
    let mut config = pooler::config(pg, &db);
    config.databases[0].pool_size = 2;
    let running = start(config).await;
    let addr = running.local_addr();
    let temp_tables = "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()";
    let locks =
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()";

    let a = connect(addr, &db).await;
    let b = connect(addr, &db).await;
    let c = connect(addr, &db).await;

    a.batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (1)")
        .await
        .unwrap();
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(pinned(&running, &db.name), 1);
    // A keeps its server and its table, transaction after transaction, whatever B and C do.
    for _ in 0..5 {
        assert_eq!(one(&b, temp_tables).await, "0");
        assert_eq!(one(&c, temp_tables).await, "0");
        assert_ne!(one(&b, "SELECT pg_backend_pid()").await, pid);
        assert_eq!(one(&a, "SELECT count(*) FROM mine").await, "1");
        assert_eq!(one(&a, "SELECT pg_backend_pid()").await, pid);
    }

    // The one pin slot is A's: B's pinning statements fail, and B keeps its connection.
    let e = b
        .batch_execute("CREATE TEMP TABLE theirs (v int)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "53400", "{e:?}");
    assert!(pooler::message(&e).contains("max_pinned_servers"), "{e:?}");
    let e = b
        .query("SELECT pg_advisory_lock($1)", &[&7i64])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "53400", "extended protocol: {e:?}");
    assert_eq!(one(&b, locks).await, "0");
    assert_eq!(one(&b, "SELECT 1").await, "1");
    // Pipelined behind another request, the refusal is still the one replaced.
    let (first, refused) = tokio::join!(
        b.simple_query("SELECT 1"),
        b.simple_query("CREATE TEMP TABLE pipelined (v int)")
    );
    assert!(first.is_ok(), "{first:?}");
    assert_eq!(code(&refused.unwrap_err()), "53400");
    // Inside a transaction the refusal fails the transaction, as an error would.
    b.batch_execute("BEGIN").await.unwrap();
    let e = b
        .batch_execute("SELECT pg_advisory_lock(8)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "53400");
    let e = b.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    b.batch_execute("ROLLBACK").await.unwrap();

    // A session lock (extended protocol) keeps A pinned after its table is dropped.
    a.query("SELECT pg_advisory_lock($1)", &[&42i64])
        .await
        .unwrap();
    a.batch_execute("DROP TABLE mine").await.unwrap();
    assert_eq!(one(&a, "SELECT 1").await, "1");
    assert_eq!(pinned(&running, &db.name), 1);
    assert_eq!(one(&a, locks).await, "1");
    assert_eq!(one(&a, "SELECT pg_backend_pid()").await, pid);
    assert_eq!(one(&c, locks).await, "0", "no other client holds A's lock");
    a.query("SELECT pg_advisory_unlock($1)", &[&42i64])
        .await
        .unwrap();
    // The server is asked what is left once the unlock's answer is out: by the time the
    // client's next statement is answered, it has been.
    assert_eq!(one(&a, "SELECT 1").await, "1");
    assert_eq!(pinned(&running, &db.name), 0, "nothing left: unpinned");

    // Now B may pin: a WITH HOLD cursor outlives its transaction, until it is closed.
    b.batch_execute(
        "BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g; COMMIT",
    )
    .await
    .unwrap();
    assert_eq!(pinned(&running, &db.name), 1);
    assert_eq!(one(&b, "FETCH cur").await, "1");
    assert_eq!(one(&c, "SELECT count(*) FROM pg_cursors").await, "0");
    assert_eq!(one(&b, "FETCH cur").await, "2");
    b.batch_execute("CLOSE cur").await.unwrap();
    assert_eq!(one(&b, "SELECT 1").await, "1");
    assert_eq!(pinned(&running, &db.name), 0);

    // SQL PREPARE, until DEALLOCATE.
    c.batch_execute("PREPARE two AS SELECT 2").await.unwrap();
    assert_eq!(pinned(&running, &db.name), 1);
    assert_eq!(one(&c, "EXECUTE two").await, "2");
    assert_eq!(
        one(
            &a,
            "SELECT count(*) FROM pg_prepared_statements WHERE from_sql"
        )
        .await,
        "0"
    );
    assert_eq!(one(&c, "EXECUTE two").await, "2");
    c.batch_execute("DEALLOCATE two").await.unwrap();
    assert_eq!(one(&c, "SELECT 1").await, "1");
    assert_eq!(pinned(&running, &db.name), 0);

    // A client that leaves pinned: its server is reset before anyone else gets it.
    a.batch_execute("CREATE TEMP TABLE gone (v int); SELECT pg_advisory_lock(9)")
        .await
        .unwrap();
    assert_eq!(pinned(&running, &db.name), 1);
    drop(a);
    tokio::time::timeout(Duration::from_secs(20), async {
        while pinned(&running, &db.name) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the pin ends with its client");
    for client in [&b, &c] {
        for _ in 0..3 {
            assert_eq!(one(client, temp_tables).await, "0");
            assert_eq!(one(client, locks).await, "0");
        }
    }
    assert!(running.shutdown().await);
}

/// `session_state = "warn"` keeps PgBouncer's behaviour: nothing pins, and the next client
/// on the server sees the temporary table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_mode_hands_the_server_on_as_pgbouncer_does() {
    let pg = shared_cluster();
    let db = pg.scratch_db("warnmode");
    let mut config = pooler::config(pg, &db);
    config.databases[0].pool_size = 1;
    config.session_state = iampool::config::SessionStateMode::Warn;
    let running = start(config).await;
    let addr = running.local_addr();
    let a = connect(addr, &db).await;
    let b = connect(addr, &db).await;
    a.batch_execute("CREATE TEMP TABLE left_behind (v int)")
        .await
        .unwrap();
    assert_eq!(pinned(&running, &db.name), 0);
    assert_eq!(
        one(
            &b,
            "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
        )
        .await,
        "1"
    );
    drop(a);
    assert!(running.shutdown().await);
}

/// A client connection whose notifications arrive on a channel.
async fn listener(
    addr: std::net::SocketAddr,
    db: &crate::support::pg::TestDb,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    let (client, mut conn) = pooler::client_config(addr, db)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through iampool");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a notification")
        .expect("the connection is open")
}

/// LISTEN/NOTIFY between clients of one transaction-mode pool of 2 servers: listeners take
/// no server while they wait, each gets the notifications of its own channels (sent by
/// other clients and by itself, in a transaction that commits, not one that rolls back),
/// UNLISTEN and leaving stop them, and the pool's one listening connection goes once
/// nobody listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_notify_work_in_transaction_mode() {
    let pg = shared_cluster();
    let db = pg.scratch_db("notify");
    let mut config = pooler::config(pg, &db);
    config.databases[0].pool_size = 2;
    let running = start(config).await;
    let addr = running.local_addr();
    let hub = running
        .shared()
        .pool(&db.name)
        .expect("pool")
        .notifications
        .clone();

    let (a, mut a_rx) = listener(addr, &db).await;
    let (b, mut b_rx) = listener(addr, &db).await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    a.batch_execute("LISTEN \"Mixed\"").await.unwrap();
    b.batch_execute("listen JOBS").await.unwrap();
    assert_eq!(hub.channels(), 2);
    assert_eq!(pinned(&running, &db.name), 0, "listeners hold no server");

    // Both pool servers stay free for everyone else while they listen.
    let others: Vec<_> = futures_util::future::join_all((0..4).map(|_| connect(addr, &db))).await;
    for c in &others {
        assert_eq!(one(c, "SELECT 1").await, "1");
    }
    let sender = &others[0];
    sender.batch_execute("NOTIFY jobs, 'one'").await.unwrap();
    assert_eq!(next(&mut a_rx).await, ("jobs".into(), "one".into()));
    assert_eq!(next(&mut b_rx).await, ("jobs".into(), "one".into()));
    sender
        .batch_execute("SELECT pg_notify('Mixed', 'two')")
        .await
        .unwrap();
    assert_eq!(next(&mut a_rx).await, ("Mixed".into(), "two".into()));
    // A rolled-back NOTIFY is never delivered; a committed one after it is.
    sender
        .batch_execute("BEGIN; NOTIFY jobs, 'never'; ROLLBACK")
        .await
        .unwrap();
    sender
        .batch_execute("BEGIN; NOTIFY jobs, 'three'; COMMIT")
        .await
        .unwrap();
    assert_eq!(next(&mut a_rx).await, ("jobs".into(), "three".into()));
    assert_eq!(next(&mut b_rx).await, ("jobs".into(), "three".into()));
    // A listener's own NOTIFY comes back to it, as PostgreSQL delivers it.
    b.batch_execute("NOTIFY jobs, 'from b'").await.unwrap();
    assert_eq!(next(&mut b_rx).await, ("jobs".into(), "from b".into()));
    assert_eq!(next(&mut a_rx).await, ("jobs".into(), "from b".into()));

    b.batch_execute("UNLISTEN jobs").await.unwrap();
    sender.batch_execute("NOTIFY jobs, 'four'").await.unwrap();
    assert_eq!(next(&mut a_rx).await, ("jobs".into(), "four".into()));
    sender
        .batch_execute("NOTIFY \"Mixed\", 'five'")
        .await
        .unwrap();
    assert_eq!(next(&mut a_rx).await, ("Mixed".into(), "five".into()));
    assert!(b_rx.try_recv().is_err(), "b no longer listens");
    assert_eq!(one(&b, "SELECT 1").await, "1");
    assert!(b_rx.try_recv().is_err(), "b no longer listens");

    drop(a);
    tokio::time::timeout(Duration::from_secs(20), async {
        while hub.channels() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a client that leaves stops listening");
    // The listening connection has gone: only the pool's own servers are left.
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let n = one(sender, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'").await;
            if n.parse::<usize>().unwrap() <= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the listening connection closes once nobody listens");
    drop(b);
    assert!(running.shutdown().await);
}

/// psql as the first client on a pool of one server: its settings, application_name, time
/// zone, temporary table and advisory lock hold for its whole session; the next client on
/// that same server sees none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_session_state_never_reaches_the_next_client() {
    let pg = shared_cluster();
    let db = pg.scratch_db("psqlpin");
    pg.psql_db(
        &db.name,
        &format!(
            "CREATE SCHEMA elsewhere AUTHORIZATION {}",
            quote_ident(&db.user)
        ),
    );
    let mut config = pooler::config(pg, &db);
    config.databases[0].pool_size = 1;
    let running = start(config).await;
    let addr = running.local_addr();
    let b = connect(addr, &db).await;
    let b_app = one(&b, "SHOW application_name").await;

    let statements = [
        "SET search_path TO elsewhere",
        "SET application_name = 'from_psql'",
        "SET TIME ZONE 'Asia/Tokyo'",
        "SET statement_timeout = '9876ms'",
        "CREATE TEMP TABLE psql_t (v int)",
        "INSERT INTO psql_t VALUES (1), (2)",
        "SELECT pg_advisory_lock(11)",
        "SELECT current_setting('search_path') || ' ' || current_setting('application_name') \
         || ' ' || current_setting('TimeZone') || ' ' || current_setting('statement_timeout') \
         || ' ' || (SELECT count(*) FROM psql_t) || ' ' || (SELECT count(*) FROM pg_locks \
         WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
    ];
    let (db2, port) = (db.clone(), addr.port());
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = pooler::psql_command(port, &db2);
        cmd.args(["-v", "ON_ERROR_STOP=1", "-At"]);
        for s in statements {
            cmd.args(["-c", s]);
        }
        cmd.output().expect("psql runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().last(),
        Some("elsewhere from_psql Asia/Tokyo 9876ms 2 1"),
        "psql keeps its own state: {stdout}"
    );
    // psql has left; B gets the same (only) server, reset.
    assert_eq!(one(&b, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(one(&b, "SHOW application_name").await, b_app);
    assert_ne!(one(&b, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(one(&b, "SHOW statement_timeout").await, "0");
    assert_eq!(
        one(
            &b,
            "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
        )
        .await,
        "0"
    );
    assert_eq!(
        one(
            &b,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        )
        .await,
        "0"
    );
    assert!(running.shutdown().await);
}
