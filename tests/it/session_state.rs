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

    // The other client takes A's server (LIFO: the one just released) and keeps it.
    other.batch_execute("BEGIN").await.unwrap();
    assert_eq!(one(&other, "SELECT pg_backend_pid()").await, first);
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
