//! pgbench through iampool in transaction mode: many clients, few servers, no failures.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::pooler::{self, run, start};
use crate::support::pg::{shared_cluster, TestDb};

/// Runs pgbench and returns (processed, failed) from its summary.
pub fn pgbench(port: u16, db: &TestDb, args: &[&str]) -> (u64, u64, String) {
    let (ok, out, err) = run(
        std::process::Command::new("pgbench")
            .env("PGPASSWORD", &db.password)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", &db.user])
            .args(args)
            .arg(&db.name),
        Duration::from_secs(300),
    );
    assert!(ok, "pgbench failed:\n{out}\n{err}");
    let field = |prefix: &str| -> u64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{out}"))
    };
    (
        field("number of transactions actually processed:"),
        field("number of failed transactions:"),
        out,
    )
}

async fn bench_mode(mode: &str) {
    let pg = shared_cluster();
    let db = pg.scratch_db(&format!("pgb_{mode}"));
    let (ok, _, err) = run(
        std::process::Command::new("pgbench")
            .env("PGPASSWORD", &db.password)
            .args([
                "-i",
                "-s",
                "2",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port().to_string(),
                "-U",
                &db.user,
                &db.name,
            ]),
        Duration::from_secs(120),
    );
    assert!(ok, "pgbench -i: {err}");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 10;
    let iam = start(cfg).await;
    let port = iam.local_addr().port();

    let max_seen = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (max_seen, stop, name, user) = (
            max_seen.clone(),
            stop.clone(),
            db.name.clone(),
            db.user.clone(),
        );
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                max_seen.fetch_max(
                    shared_cluster().backend_count(&name, &user),
                    Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let db2 = db.clone();
    let mode2 = mode.to_owned();
    let result = tokio::task::spawn_blocking(move || {
        pgbench(
            port,
            &db2,
            &["-c", "100", "-j", "2", "-T", "5", "-M", &mode2],
        )
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let (processed, failed, out) = result.unwrap();
    assert_eq!(failed, 0, "{out}");
    assert!(processed > 0, "{out}");
    let max = max_seen.load(Ordering::Relaxed);
    assert!(
        (1..=10).contains(&max),
        "saw {max} server backends for pool_size 10"
    );
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_100_clients_10_servers() {
    bench_mode("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_100_clients_10_servers() {
    bench_mode("extended").await;
}
