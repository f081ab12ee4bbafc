//! Named prepared statements in transaction mode, across server switches.

use std::time::Duration;

use crate::pgbench::pgbench;
use crate::pooler::{self, connect, run, start};
use crate::support::pg::shared_cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_named_statements_across_servers() {
    let pg = shared_cluster();
    let db = pg.scratch_db("prep_tp");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 4;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let mut tasks = Vec::new();
    for i in 0..32i32 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(addr, &db).await;
            let add = c.prepare("select $1::int4 + $2::int4").await.unwrap();
            let echo = c.prepare("select $1::text || '!'").await.unwrap();
            for j in 0..40i32 {
                let v: i32 = c.query_one(&add, &[&i, &j]).await.unwrap().get(0);
                assert_eq!(v, i + j);
                let s: String = c
                    .query_one(&echo, &[&format!("c{i}")])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(s, format!("c{i}!"));
                // A transaction around a prepared statement keeps its server.
                if j % 10 == 0 {
                    c.batch_execute("begin").await.unwrap();
                    let v: i32 = c.query_one(&add, &[&1i32, &1i32]).await.unwrap().get(0);
                    assert_eq!(v, 2);
                    c.batch_execute("commit").await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("bounded")
            .expect("client");
    }
    let backends = pg.backend_count(&db.name, &db.user);
    assert!(backends <= 4, "{backends} backends for pool_size 4");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_64_clients_10_servers() {
    let pg = shared_cluster();
    let db = pg.scratch_db("prep_pgb");
    let (ok, _, err) = run(
        std::process::Command::new("pgbench")
            .env("PGPASSWORD", &db.password)
            .args(["-i", "-s", "2", "-q", "-h", "127.0.0.1", "-p"])
            .arg(pg.port().to_string())
            .args(["-U", &db.user, &db.name]),
        Duration::from_secs(120),
    );
    assert!(ok, "pgbench -i: {err}");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 10;
    let iam = start(cfg).await;
    let port = iam.local_addr().port();
    let db2 = db.clone();
    let (processed, failed, out) = tokio::task::spawn_blocking(move || {
        pgbench(
            port,
            &db2,
            &["-c", "64", "-j", "2", "-T", "5", "-M", "prepared"],
        )
    })
    .await
    .unwrap();
    assert_eq!(failed, 0, "{out}");
    assert!(processed > 0, "{out}");
    assert!(iam.shutdown().await);
}

/// Large parameter values go through a renamed statement intact, on whichever server the
/// client gets (iampool passes a long Bind on as it arrives, behind its rewritten start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bind_values_through_renamed_statements() {
    let pg = shared_cluster();
    let db = pg.scratch_db("prep_big");
    pooler::create_owned_table(pg, &db, "t (id int primary key, b bytea not null)");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let mut tasks = Vec::new();
    for client in 0..3i32 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(addr, &db).await;
            let put = c
                .prepare("insert into t values ($1, $2) returning length(b)")
                .await
                .unwrap();
            let get = c.prepare("select b from t where id = $1").await.unwrap();
            for round in 0..3i32 {
                let id = client * 10 + round;
                let len = (3 << 20) + 4099 * id as usize;
                let value: Vec<u8> = (0..len).map(|i| (i * 31 + id as usize) as u8).collect();
                let stored: i32 = c.query_one(&put, &[&id, &value]).await.unwrap().get(0);
                assert_eq!(stored as usize, len);
                let back: Vec<u8> = c.query_one(&get, &[&id]).await.unwrap().get(0);
                assert!(
                    back == value,
                    "client {client} round {round}: value changed"
                );
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("bounded")
            .expect("client");
    }
    assert!(iam.shutdown().await);
}
