//! Named prepared statements in transaction mode, proven with real drivers and raw pipelines.
//!
//! Every test runs 32 concurrent clients over a pool of 4 servers, so each client's statements
//! run on servers that never saw them prepared. The driver programs in `tests/drivers/` run the
//! same workload directly against PostgreSQL and through iampool and must print the same
//! `RESULT ok <checksum> <statements>` line. Their packages come from `scripts/setup.sh`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use iampool::config::{Config, PoolMode};
use iampool::protocol::messages::{self, backend, frontend};
use iampool::stream::{read_message, Stream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::types::{ToSql, Type};

use crate::pooler::{self, run, start, try_connect};
use crate::support::pg::{quote_ident, shared_cluster, PgCluster, TestDb};

const CLIENTS: i32 = 32;
const POOL_SIZE: usize = 4;
const ROUNDS: i32 = 40;
/// Bound on one client's whole workload, and on one driver program run.
const T: Duration = Duration::from_secs(120);

/// Transaction mode, 4 servers: 32 clients must share them statement by statement.
fn tx_config(pg: &PgCluster, db: &TestDb) -> Config {
    let mut cfg = pooler::config(pg, db);
    cfg.databases[0].pool_mode = PoolMode::Transaction;
    cfg.databases[0].pool_size = POOL_SIZE;
    cfg
}

/// A scratch database with the tables `tests/drivers/workload.md` describes.
fn workload_db(prefix: &str) -> TestDb {
    let pg = shared_cluster();
    let db = pg.scratch_db(prefix);
    pg.psql_db(
        &db.name,
        &format!(
            "create table items (id int primary key, v int not null, name text not null);
             insert into items select g, 3 * g, 'item' || g from generate_series(1, 100) g;
             create table log (tag text not null, client int not null, i int not null, x int not null);
             alter table items owner to {u}; alter table log owner to {u};",
            u = quote_ident(&db.user)
        ),
    );
    db
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A driver prerequisite installed by `scripts/setup.sh`; a missing one fails the test.
fn prerequisite(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} is not installed ({} is missing): run scripts/setup.sh",
        path.display()
    );
    path
}

/// `HOST PORT USER PASSWORD DBNAME TAG`, the arguments every driver program takes.
fn conn_args(port: u16, db: &TestDb, tag: &str) -> Vec<String> {
    vec![
        "127.0.0.1".into(),
        port.to_string(),
        db.user.clone(),
        db.password.clone(),
        db.name.clone(),
        tag.into(),
    ]
}

/// Runs a driver program to completion (bounded) and returns its `RESULT` line, or the whole
/// output when it failed.
fn result_line(mut cmd: Command) -> Result<String, String> {
    let (ok, out, err) = run(&mut cmd, T);
    let line = out.lines().rev().find(|l| l.starts_with("RESULT "));
    match line {
        Some(l) if ok && l.starts_with("RESULT ok ") => Ok(l.to_owned()),
        _ => Err(format!("exit ok: {ok}\nstdout:\n{out}\nstderr:\n{err}")),
    }
}

/// Runs `program` directly against PostgreSQL, then through iampool, and requires both to
/// succeed with the same result line.
async fn compare_driver(
    prefix: &str,
    program: impl Fn(u16, &TestDb, &str) -> Command + Send + 'static,
) {
    let pg = shared_cluster();
    let db = workload_db(prefix);
    let iam = start(tx_config(pg, &db)).await;
    let (direct_port, iam_port) = (pg.port(), iam.local_addr().port());
    let (direct, pooled) = tokio::task::spawn_blocking(move || {
        let direct = result_line(program(direct_port, &db, "direct"));
        let pooled = result_line(program(iam_port, &db, "iampool"));
        (direct, pooled)
    })
    .await
    .unwrap();
    let direct =
        direct.unwrap_or_else(|e| panic!("{prefix} directly against PostgreSQL failed:\n{e}"));
    let pooled = pooled.unwrap_or_else(|e| panic!("{prefix} through iampool failed:\n{e}"));
    assert_eq!(pooled, direct, "{prefix}: iampool and PostgreSQL disagree");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_default_statement_cache() {
    let python = prerequisite(
        repo_path("target/driver-venv/bin/python"),
        "the Python driver venv",
    );
    let script = repo_path("tests/drivers/asyncpg_driver.py");
    compare_driver("drv_asyncpg", move |port, db, tag| {
        let mut c = Command::new(&python);
        c.arg(&script).args(conn_args(port, db, tag));
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepare_threshold_zero() {
    let python = prerequisite(
        repo_path("target/driver-venv/bin/python"),
        "the Python driver venv",
    );
    let script = repo_path("tests/drivers/psycopg_driver.py");
    compare_driver("drv_psycopg", move |port, db, tag| {
        let mut c = Command::new(&python);
        c.arg(&script).args(conn_args(port, db, tag));
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries() {
    let modules = prerequisite(
        repo_path("target/driver-node/node_modules"),
        "node-postgres",
    );
    prerequisite(modules.join("pg/package.json"), "node-postgres");
    let script = repo_path("tests/drivers/node_pg_driver.js");
    compare_driver("drv_node", move |port, db, tag| {
        let mut c = Command::new("node");
        c.env("NODE_PATH", &modules)
            .arg(&script)
            .args(conn_args(port, db, tag));
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_default_prepare_threshold() {
    let jar = prerequisite(
        PathBuf::from("/usr/share/java/postgresql.jar"),
        "pgjdbc (libpostgresql-jdbc-java)",
    );
    let classes = repo_path("target/driver-java");
    let source = repo_path("tests/drivers/PgjdbcDriver.java");
    let (ok, out, err) = tokio::task::spawn_blocking({
        let classes = classes.clone();
        move || {
            run(
                Command::new("javac").arg("-d").arg(&classes).arg(&source),
                T,
            )
        }
    })
    .await
    .unwrap();
    assert!(
        ok,
        "javac (run scripts/setup.sh for a JDK) failed:\n{out}\n{err}"
    );
    let classpath = format!("{}:{}", classes.display(), jar.display());
    compare_driver("drv_jdbc", move |port, db, tag| {
        let mut c = Command::new("java");
        c.arg("-cp")
            .arg(&classpath)
            .arg("PgjdbcDriver")
            .args(conn_args(port, db, tag));
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_32_clients_4_servers() {
    let pg = shared_cluster();
    let db = pg.scratch_db("drv_pgbench");
    let direct_port = pg.port();
    let init = db.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(
            Command::new("pgbench")
                .env("PGPASSWORD", &init.password)
                .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p"])
                .arg(direct_port.to_string())
                .args(["-U", &init.user, &init.name]),
            T,
        )
    })
    .await
    .unwrap();
    assert!(ok, "pgbench -i:\n{out}\n{err}");
    let iam = start(tx_config(pg, &db)).await;
    let port = iam.local_addr().port();
    let db2 = db.clone();
    let (direct, pooled) = tokio::task::spawn_blocking(move || {
        // -n: no vacuum, which would also truncate the history that the check below counts.
        let args = ["-n", "-M", "prepared", "-c", "32", "-j", "2"];
        let direct = pgbench_counts(direct_port, &db2, &[&args[..], &["-t", "20"]].concat());
        let pooled = pgbench_counts(port, &db2, &[&args[..], &["-T", "5"]].concat());
        (direct, pooled)
    })
    .await
    .unwrap();
    let direct = direct.unwrap_or_else(|out| panic!("pgbench directly failed:\n{out}"));
    let pooled = pooled.unwrap_or_else(|out| panic!("pgbench through iampool failed:\n{out}"));
    assert_eq!(direct.1, 0, "directly:\n{}", direct.2);
    assert_eq!(pooled.1, 0, "through iampool:\n{}", pooled.2);
    assert!(pooled.0 > 0, "{}", pooled.2);
    // Every committed transaction moved the same delta through all four tables.
    let sums = pg.psql_db(
        &db.name,
        "select (select sum(abalance) from pgbench_accounts), (select sum(tbalance) from pgbench_tellers),
                (select sum(bbalance) from pgbench_branches), (select sum(delta) from pgbench_history),
                (select count(*) from pgbench_history)",
    );
    let sums: Vec<&str> = sums.trim().split('|').map(str::trim).collect();
    assert!(
        sums[..3].iter().all(|s| *s == sums[3]),
        "balances disagree: {sums:?}"
    );
    assert_eq!(
        sums[4].parse::<u64>().unwrap(),
        direct.0 + pooled.0,
        "history rows = transactions reported"
    );
    assert!(iam.shutdown().await);
}

/// Runs pgbench against `port`; (transactions processed, failed, output), or the output of a
/// run that failed (pgbench exits non-zero when a client aborts on an error).
fn pgbench_counts(port: u16, db: &TestDb, args: &[&str]) -> Result<(u64, u64, String), String> {
    let (ok, out, err) = run(
        Command::new("pgbench")
            .env("PGPASSWORD", &db.password)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", &db.user])
            .args(args)
            .arg(&db.name),
        T,
    );
    let all = format!("{out}\n{err}");
    // "number of transactions actually processed: 640/640" with -t, "4242" with -T.
    let field = |prefix: &str| -> Option<u64> {
        let rest = out.lines().find_map(|l| l.trim().strip_prefix(prefix))?;
        rest.split(|c: char| c.is_whitespace() || c == '/')
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    match (
        ok,
        field("number of transactions actually processed:"),
        field("number of failed transactions:"),
    ) {
        (true, Some(processed), Some(failed)) => Ok((processed, failed, all)),
        _ => Err(all),
    }
}

/// The workload of `tests/drivers/workload.md` for one tokio-postgres client: an explicit
/// `prepare`, `query` with SQL text (a named statement prepared and closed each time), a
/// transaction and a pipelined batch of inserts.
async fn tokio_postgres_client(
    addr: SocketAddr,
    db: TestDb,
    c: i32,
    tag: &'static str,
) -> Result<(i64, i64), String> {
    let err = |e: tokio_postgres::Error| format!("client {c}: {e:?}");
    let mut client = try_connect(addr, &db).await.map_err(err)?;
    let q1 = client
        .prepare("select $1::int + v from items where id = $2")
        .await
        .map_err(err)?;
    let (mut total, mut statements) = (0i64, 0i64);
    for i in 0..ROUNDS {
        let k = (c * 31 + i) % 100 + 1;
        total += i64::from(
            client
                .query_one(&q1, &[&i, &k])
                .await
                .map_err(err)?
                .get::<_, i32>(0),
        );
        let row = client
            .query_one("select name from items where id = $1", &[&k])
            .await
            .map_err(err)?;
        total += row.get::<_, String>(0).len() as i64;
        let row = client
            .query_one("select count(*) from items where v < $1", &[&(3 * k)])
            .await
            .map_err(err)?;
        total += row.get::<_, i64>(0);
        let tx = client.transaction().await.map_err(err)?;
        total += i64::from(
            tx.query_one(&q1, &[&i, &k])
                .await
                .map_err(err)?
                .get::<_, i32>(0),
        );
        tx.commit().await.map_err(err)?;
        statements += 4;
    }
    let insert = client
        .prepare("insert into log (tag, client, i, x) values ($1, $2, $3, $4)")
        .await
        .map_err(err)?;
    let rows: Vec<(i32, i32)> = (0..ROUNDS).map(|i| (i, c * 1000 + i)).collect();
    let params: Vec<[&(dyn ToSql + Sync); 4]> = rows
        .iter()
        .map(|(i, x)| -> [&(dyn ToSql + Sync); 4] { [&tag, &c, i, x] })
        .collect();
    let pipelined = params.iter().map(|p| client.execute(&insert, p));
    futures_util::future::try_join_all(pipelined)
        .await
        .map_err(err)?;
    let sum = client
        .query_one(
            "select sum(x)::int8 from log where tag = $1 and client = $2",
            &[&tag, &c],
        )
        .await
        .map_err(err)?;
    total += sum.get::<_, i64>(0);
    Ok((total, statements + 2))
}

/// 32 tokio-postgres clients at once; (checksum, statements) summed, or every error.
async fn tokio_postgres_workload(
    addr: SocketAddr,
    db: &TestDb,
    tag: &'static str,
) -> Result<(i64, i64), Vec<String>> {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(tokio::time::timeout(
                T,
                tokio_postgres_client(addr, db.clone(), c, tag),
            ))
        })
        .collect();
    let (mut sum, mut errors) = ((0, 0), Vec::new());
    for t in tasks {
        match t
            .await
            .expect("client task")
            .expect("client finishes in time")
        {
            Ok((total, n)) => sum = (sum.0 + total, sum.1 + n),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(sum)
    } else {
        Err(errors)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_and_text_queries() {
    let pg = shared_cluster();
    let db = workload_db("drv_tokio");
    let iam = start(tx_config(pg, &db)).await;
    let direct = tokio_postgres_workload(pg.addr(), &db, "direct")
        .await
        .expect("directly against PostgreSQL");
    let pooled = tokio_postgres_workload(iam.local_addr(), &db, "iampool").await;
    let pooled = pooled.unwrap_or_else(|e| {
        panic!(
            "{} of {CLIENTS} clients failed through iampool, e.g.:\n{}",
            e.len(),
            e[..e.len().min(5)].join("\n")
        )
    });
    assert_eq!(pooled, direct);
    assert!(iam.shutdown().await);
}

/// Runs `f(client index)` for 32 clients at once, each bounded, and fails with the errors.
async fn all_clients<F, Fut>(f: F)
where
    F: Fn(i32) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(tokio::time::timeout(T, f(c))))
        .collect();
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t
            .await
            .expect("client task")
            .expect("client finishes in time")
        {
            errors.push(e);
        }
    }
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} clients failed, e.g.:\n{}",
        errors.len(),
        errors[..errors.len().min(5)].join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_text_with_different_parameter_types() {
    let pg = shared_cluster();
    let db = pg.scratch_db("drv_types");
    let iam = start(tx_config(pg, &db)).await;
    for addr in [pg.addr(), iam.local_addr()] {
        let db = db.clone();
        all_clients(move |c| {
            let db = db.clone();
            async move {
                let err = |e: tokio_postgres::Error| format!("client {c} via {addr}: {e:?}");
                let client = try_connect(addr, &db).await.map_err(err)?;
                // Half the clients prepare the int4 one first, so servers see both orders.
                let (a, b) = if c % 2 == 0 {
                    let a = client
                        .prepare_typed("select $1", &[Type::INT4])
                        .await
                        .map_err(err)?;
                    (
                        a,
                        client
                            .prepare_typed("select $1", &[Type::TEXT])
                            .await
                            .map_err(err)?,
                    )
                } else {
                    let b = client
                        .prepare_typed("select $1", &[Type::TEXT])
                        .await
                        .map_err(err)?;
                    (
                        client
                            .prepare_typed("select $1", &[Type::INT4])
                            .await
                            .map_err(err)?,
                        b,
                    )
                };
                for i in 0..ROUNDS {
                    let n: i32 = client
                        .query_one(&a, &[&(c * 1000 + i)])
                        .await
                        .map_err(err)?
                        .get(0);
                    let s: String = client
                        .query_one(&b, &[&format!("t{i}")])
                        .await
                        .map_err(err)?
                        .get(0);
                    if n != c * 1000 + i || s != format!("t{i}") {
                        return Err(format!("client {c} round {i}: got {n} and {s:?}"));
                    }
                }
                Ok(())
            }
        })
        .await;
    }
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_statements_than_the_server_cache_holds() {
    const MAX: usize = 8;
    let pg = shared_cluster();
    let db = pg.scratch_db("drv_lru");
    let mut cfg = tx_config(pg, &db);
    cfg.max_prepared_statements = MAX;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let db2 = db.clone();
    all_clients(move |c| {
        let db = db2.clone();
        async move {
            let err = |e: tokio_postgres::Error| format!("client {c}: {e:?}");
            let client = try_connect(addr, &db).await.map_err(err)?;
            // 40 statements per client, 60 distinct texts over all clients, kept and reused.
            let mut stmts = Vec::new();
            for j in 0..40 {
                let n = (c * 7 + j) % 60;
                let sql = format!("select $1::int + {n}");
                stmts.push((n, client.prepare(&sql).await.map_err(err)?));
            }
            for round in 0..5 {
                for (n, st) in &stmts {
                    let got: i32 = client.query_one(st, &[&round]).await.map_err(err)?.get(0);
                    if got != round + n {
                        return Err(format!("client {c}: select {round} + {n} gave {got}"));
                    }
                }
            }
            // And 300 distinct texts, each prepared, run and closed by tokio-postgres.
            for j in 0..300 {
                let sql = format!("select $1::int * 0 + {}", c * 1000 + j);
                let got: i32 = client.query_one(&sql, &[&j]).await.map_err(err)?.get(0);
                if got != c * 1000 + j {
                    return Err(format!("client {c}: {sql} gave {got}"));
                }
            }
            Ok(())
        }
    })
    .await;
    // Least recently used statements were closed: no server holds more than the cap.
    let client = try_connect(addr, &db).await.expect("connect");
    for _ in 0..2 * POOL_SIZE {
        let rows = client
            .simple_query("select count(*) from pg_prepared_statements")
            .await
            .expect("count");
        let n: usize = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .expect("a count");
        assert!(
            n <= MAX,
            "a server holds {n} prepared statements, cap {MAX}"
        );
    }
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_error_in_a_pipeline_is_reported_like_postgresql() {
    let pg = shared_cluster();
    let db = pg.scratch_db("drv_parse_err");
    let iam = start(tx_config(pg, &db)).await;
    let expected = parse_error_script(pg.addr(), db.clone()).await;
    assert!(
        expected.iter().any(|r| r.iter().any(|m| m == "E 42601")),
        "the script provokes a parse error: {expected:?}"
    );
    let addr = iam.local_addr();
    let db2 = db.clone();
    all_clients(move |c| {
        let (db, expected) = (db2.clone(), expected.clone());
        async move {
            let got = parse_error_script(addr, db).await;
            for (step, (g, e)) in got.iter().zip(&expected).enumerate() {
                if g != e {
                    return Err(format!(
                        "client {c} step {step}: iampool sent {g:?}, PostgreSQL {e:?}"
                    ));
                }
            }
            Ok(())
        }
    })
    .await;
    assert!(iam.shutdown().await);
}

/// Pipelines with a failing Parse among good ones; returns each Sync's replies.
async fn parse_error_script(addr: SocketAddr, db: TestDb) -> Vec<Vec<String>> {
    let mut r = Raw::login(addr, &db).await;
    let mut replies = Vec::new();
    for round in 0..3 {
        // One Sync batch: good, bad, good. PostgreSQL skips everything after the error.
        r.parse("good1", "select $1::int + 1")
            .bind("good1", &["41"])
            .execute()
            .parse("bad", "selec oops")
            .parse("good2", "select 2")
            .bind("good2", &[])
            .execute()
            .sync();
        replies.push(r.round_trip().await);
        // good1 exists, good2 was never parsed, and the session goes on.
        r.bind("good1", &[&round.to_string()]).execute().sync();
        replies.push(r.round_trip().await);
        r.bind("good2", &[]).execute().sync();
        replies.push(r.round_trip().await);
        // The failed names are free: reuse them for new statements.
        r.parse("good2", "select 'two'")
            .parse("bad", "select 'fixed'")
            .bind("bad", &[])
            .execute()
            .bind("good2", &[])
            .execute()
            .sync();
        replies.push(r.round_trip().await);
        // In a transaction that fails: a statement parsed before the error outlives the
        // rollback (statements are not transactional), one parsed after it never exists.
        r.query("begin");
        replies.push(r.round_trip().await);
        r.parse("in_tx", "select 1/0")
            .bind("in_tx", &[])
            .execute()
            .sync();
        replies.push(r.round_trip().await);
        r.parse("after", "select 3").sync();
        replies.push(r.round_trip().await);
        r.query("rollback");
        replies.push(r.round_trip().await);
        r.bind("after", &[]).execute().sync();
        replies.push(r.round_trip().await);
        r.bind("in_tx", &[]).describe_portal().sync();
        replies.push(r.round_trip().await);
        for name in ["good1", "good2", "bad", "in_tx", "after"] {
            r.close(name);
        }
        r.sync();
        replies.push(r.round_trip().await);
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_do_not_disturb_the_others() {
    let pg = shared_cluster();
    let db = pg.scratch_db("drv_leave");
    let iam = start(tx_config(pg, &db)).await;
    let addr = iam.local_addr();
    // Sixteen clients stay for both phases; every name is prepared by everyone with other text.
    let mut stayers = Vec::new();
    for c in 0..CLIENTS / 2 {
        let mut r = Raw::login(addr, &db).await;
        prepare_shared(&mut r, c, "stayer").await.unwrap();
        stayers.push(tokio::sync::Mutex::new(r));
    }
    let stayers = std::sync::Arc::new(stayers);
    for phase in ["leaver", "newcomer"] {
        let (db, stayers) = (db.clone(), stayers.clone());
        all_clients(move |c| {
            let (db, stayers) = (db.clone(), stayers.clone());
            async move {
                if c % 2 == 0 {
                    let mut r = stayers[(c / 2) as usize].lock().await;
                    return run_shared(&mut r, c, "stayer", ROUNDS).await;
                }
                let mut r = Raw::login(addr, &db).await;
                prepare_shared(&mut r, c, phase).await?;
                if phase == "newcomer" {
                    return run_shared(&mut r, c, phase, ROUNDS).await;
                }
                run_shared(&mut r, c, phase, 3).await?;
                // Leave politely, abruptly, or in the middle of an unsynced pipeline.
                match c % 6 {
                    1 => r.terminate().await,
                    3 => drop(r),
                    _ => {
                        r.bind("shared", &["x"]).execute();
                        r.send().await;
                        drop(r);
                    }
                }
                Ok(())
            }
        })
        .await;
    }
    assert!(iam.shutdown().await);
}

/// Prepares "shared" (text naming `who`) and "other" in one pipeline.
async fn prepare_shared(r: &mut Raw, c: i32, who: &str) -> Result<(), String> {
    r.parse("shared", &format!("select '{who}' || $1::text"))
        .parse("other", "select $1::int * 2")
        .sync();
    expect(r, c, &["1", "1", "Z I"]).await
}

async fn run_shared(r: &mut Raw, c: i32, who: &str, rounds: i32) -> Result<(), String> {
    for i in 0..rounds {
        let arg = i.to_string();
        r.bind("shared", &[&arg])
            .execute()
            .bind("other", &[&arg])
            .execute()
            .sync();
        let (shared, other) = (format!("2 D {who}{i}"), format!("2 D {}", 2 * i));
        expect(r, c, &[&shared, "C SELECT 1", &other, "C SELECT 1", "Z I"]).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_do_not_break_other_clients() {
    let pg = shared_cluster();
    let db = pg.scratch_db("drv_dealloc");
    let iam = start(tx_config(pg, &db)).await;
    let addr = iam.local_addr();
    let db2 = db.clone();
    all_clients(move |c| {
        let db = db2.clone();
        async move {
            let err = |e: tokio_postgres::Error| format!("client {c}: {e:?}");
            let client = try_connect(addr, &db).await.map_err(err)?;
            if c % 4 == 0 {
                // A quarter of the clients drop every prepared statement they can see, and go
                // on with statements prepared afresh (what DEALLOCATE does to a client's own
                // protocol-level statements behind a pooler is not this test's question).
                for i in 0..ROUNDS {
                    vandalize(&client)
                        .await
                        .map_err(|e| format!("vandal {c} round {i}: {e:?}"))?;
                    let m: i32 = client
                        .query_one("select $1::int * 3", &[&i])
                        .await
                        .map_err(err)?
                        .get(0);
                    if m != 3 * i {
                        return Err(format!("vandal {c} round {i}: got {m}"));
                    }
                }
                return Ok(());
            }
            let st = client.prepare("select $1::int + 1").await.map_err(err)?;
            for i in 0..ROUNDS {
                let n: i32 = client.query_one(&st, &[&i]).await.map_err(err)?.get(0);
                let m: i32 = client
                    .query_one("select $1::int * 3", &[&i])
                    .await
                    .map_err(err)?
                    .get(0);
                if (n, m) != (i + 1, 3 * i) {
                    return Err(format!("client {c} round {i}: got {n}, {m}"));
                }
            }
            Ok(())
        }
    })
    .await;
    assert!(iam.shutdown().await);
}

/// `DEALLOCATE` each statement the current server lists (inside one transaction, so on that
/// server), then `DEALLOCATE ALL` and `DISCARD ALL`. Only the last two must succeed: what a
/// pooler does with a client naming statements it never prepared is its own business.
async fn vandalize(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("begin").await?;
    let names = client
        .simple_query("select name from pg_prepared_statements")
        .await?;
    let mut ok = true;
    for m in names {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            let name = row.get(0).unwrap_or_default().to_owned();
            if client
                .batch_execute(&format!("deallocate {}", quote_ident(&name)))
                .await
                .is_err()
            {
                ok = false;
                break;
            }
        }
    }
    client
        .batch_execute(if ok { "commit" } else { "rollback" })
        .await?;
    client.batch_execute("deallocate all").await?;
    client.batch_execute("discard all").await?;
    client.batch_execute("select 1").await
}

/// Reads one round trip and compares it to `want`.
async fn expect(r: &mut Raw, c: i32, want: &[&str]) -> Result<(), String> {
    let got = r.round_trip().await;
    if got.iter().map(String::as_str).eq(want.iter().copied()) {
        Ok(())
    } else {
        Err(format!("client {c}: got {got:?}, want {want:?}"))
    }
}

/// A protocol-level client on a raw socket, for pipelines no driver sends. Messages are
/// queued by the builder methods and sent by `round_trip`; replies are rendered as short
/// strings: "1" ParseComplete, "2 D <col>" BindComplete + DataRow, "C <tag>", "E <sqlstate>",
/// "Z <status>", and the tag byte for anything else.
struct Raw {
    stream: Stream,
    buf: BytesMut,
    out: BytesMut,
}

impl Raw {
    /// Logs in with SCRAM (as both PostgreSQL and iampool ask here) and waits for ReadyForQuery.
    async fn login(addr: SocketAddr, db: &TestDb) -> Raw {
        let s = TcpStream::connect(addr).await.expect("connect");
        let mut r = Raw {
            stream: Stream::Tcp(s),
            buf: BytesMut::new(),
            out: BytesMut::new(),
        };
        messages::startup(&mut r.out, &[("user", &db.user), ("database", &db.name)]);
        r.send().await;
        let mut scram = iampool::protocol::scram::ScramClient::new(&db.password);
        loop {
            let (tag, body) = r.read().await;
            match (
                tag,
                body.get(..4)
                    .map(|b| i32::from_be_bytes(b.try_into().unwrap())),
            ) {
                (backend::AUTHENTICATION, Some(10)) => {
                    let first = scram.client_first();
                    messages::frontend_message(&mut r.out, frontend::PASSWORD, |m| {
                        m.put_slice(b"SCRAM-SHA-256\0");
                        m.put_i32(first.len() as i32);
                        m.put_slice(&first);
                    });
                }
                (backend::AUTHENTICATION, Some(11)) => {
                    let fin = scram
                        .handle_server_first(&body[4..])
                        .expect("SCRAM server-first");
                    messages::frontend_message(&mut r.out, frontend::PASSWORD, |m| {
                        m.put_slice(&fin)
                    });
                }
                (backend::AUTHENTICATION, Some(0 | 12)) => {}
                (backend::READY_FOR_QUERY, _) => return r,
                (backend::ERROR_RESPONSE, _) => {
                    panic!("login failed: {:?}", messages::parse_error_fields(&body))
                }
                (backend::AUTHENTICATION, code) => {
                    panic!("unexpected authentication request {code:?}")
                }
                _ => {}
            }
            r.send().await;
        }
    }

    fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        messages::frontend_message(&mut self.out, frontend::PARSE, |m| {
            put_cstr(m, name);
            put_cstr(m, sql);
            m.put_i16(0);
        });
        self
    }

    /// Binds the unnamed portal with text parameters and text results.
    fn bind(&mut self, stmt: &str, params: &[&str]) -> &mut Self {
        messages::frontend_message(&mut self.out, frontend::BIND, |m| {
            put_cstr(m, "");
            put_cstr(m, stmt);
            m.put_i16(0);
            m.put_i16(params.len() as i16);
            for p in params {
                m.put_i32(p.len() as i32);
                m.put_slice(p.as_bytes());
            }
            m.put_i16(0);
        });
        self
    }

    fn execute(&mut self) -> &mut Self {
        messages::frontend_message(&mut self.out, frontend::EXECUTE, |m| {
            put_cstr(m, "");
            m.put_i32(0);
        });
        self
    }

    fn describe_portal(&mut self) -> &mut Self {
        messages::frontend_message(&mut self.out, frontend::DESCRIBE, |m| {
            m.put_u8(b'P');
            put_cstr(m, "");
        });
        self
    }

    fn close(&mut self, stmt: &str) -> &mut Self {
        messages::frontend_message(&mut self.out, frontend::CLOSE, |m| {
            m.put_u8(b'S');
            put_cstr(m, stmt);
        });
        self
    }

    fn sync(&mut self) -> &mut Self {
        messages::frontend_message(&mut self.out, frontend::SYNC, |_| {});
        self
    }

    fn query(&mut self, sql: &str) -> &mut Self {
        messages::query(&mut self.out, sql);
        self
    }

    async fn terminate(mut self) {
        messages::frontend_message(&mut self.out, frontend::TERMINATE, |_| {});
        self.send().await;
    }

    async fn send(&mut self) {
        self.stream.write_all(&self.out).await.expect("send");
        self.out.clear();
    }

    async fn read(&mut self) -> (u8, BytesMut) {
        let read = read_message(&mut self.stream, &mut self.buf, 1 << 20);
        tokio::time::timeout(T, read)
            .await
            .expect("reply in time")
            .expect("read")
    }

    /// Sends what is queued and renders every reply up to ReadyForQuery.
    async fn round_trip(&mut self) -> Vec<String> {
        self.send().await;
        let mut replies = Vec::new();
        loop {
            let (tag, body) = self.read().await;
            match tag {
                b'1' => replies.push("1".to_owned()),
                b'2' => replies.push("2".to_owned()),
                b'D' => {
                    let col = match i32::from_be_bytes(body[2..6].try_into().unwrap()) {
                        -1 => "NULL".to_owned(),
                        n => String::from_utf8_lossy(&body[6..6 + n as usize]).into_owned(),
                    };
                    // A DataRow right after BindComplete is shown together with it.
                    match replies.last_mut() {
                        Some(last) if last == "2" => last.push_str(&format!(" D {col}")),
                        _ => replies.push(format!("D {col}")),
                    }
                }
                backend::COMMAND_COMPLETE => replies.push(format!(
                    "C {}",
                    String::from_utf8_lossy(&body[..body.len() - 1])
                )),
                backend::ERROR_RESPONSE => {
                    replies.push(format!("E {}", messages::parse_error_fields(&body).code))
                }
                backend::READY_FOR_QUERY => {
                    replies.push(format!("Z {}", body[0] as char));
                    return replies;
                }
                backend::NOTICE_RESPONSE | backend::PARAMETER_STATUS => {}
                other => replies.push((other as char).to_string()),
            }
        }
    }
}

fn put_cstr(m: &mut BytesMut, s: &str) {
    m.put_slice(s.as_bytes());
    m.put_u8(0);
}
