//! Cancels: a late cancel cannot hit another client's query, and a client that leaves
//! while its query runs does not leave that query running.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::pooler::{self, code, connect, start};
use crate::support::pg::shared_cluster;

/// Client A's short queries get cancels timed to land around their end; client B's queries
/// share A's only server. A cancel that was looked up while A held the server must not be
/// delivered once B has it (PgBouncer holds such a server out of the pool until the cancel
/// connection has finished; so does iampool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_cancel_never_hits_another_clients_query() {
    let pg = shared_cluster();
    let db = pg.scratch_db("cancel_race");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 1;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let a = connect(addr, &db).await;
    let b = connect(addr, &db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let b_cancelled = Arc::new(AtomicUsize::new(0));
    let b_ran = Arc::new(AtomicUsize::new(0));
    let bq = {
        let (stop, cancelled, ran) = (stop.clone(), b_cancelled.clone(), b_ran.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match b.simple_query("select pg_sleep(0.002)").await {
                    Ok(_) => {}
                    Err(e) if code(&e) == "57014" => {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("client B: {e:?}"),
                }
                ran.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut a_cancelled = 0;
    for i in 0..300u64 {
        let token = a.cancel_token();
        // Spread the cancels over the end of A's 3 ms query (its round trip through the
        // pool adds a little): some land inside it, some just after.
        let delay = Duration::from_micros(2_000 + (i * 37) % 3_000);
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            token.cancel_query(tokio_postgres::NoTls).await
        });
        match a.simple_query("select pg_sleep(0.003)").await {
            Ok(_) => {}
            Err(e) if code(&e) == "57014" => a_cancelled += 1,
            Err(e) => panic!("client A: {e:?}"),
        }
        cancel.await.unwrap().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    bq.await.unwrap();
    assert!(a_cancelled > 0, "the cancels reached A's own queries");
    assert!(b_ran.load(Ordering::Relaxed) > 0, "B ran queries alongside");
    assert_eq!(
        b_cancelled.load(Ordering::Relaxed),
        0,
        "a cancel meant for A hit B's query ({} of B's queries ran; A was cancelled {a_cancelled} times)",
        b_ran.load(Ordering::Relaxed)
    );
    // The server went back to the pool once each cancel was delivered.
    let pool = iam.shared().pool(&db.name).expect("the pool");
    for _ in 0..100 {
        if pool.status().being_canceled == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pool.status().being_canceled, 0);
    assert!(iam.shutdown().await);
}

/// Clients that disconnect while their query runs: the queries are cancelled, and the
/// upstream never runs more backends for the pool than pool_size while the queued clients
/// are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_leaves_mid_query_has_it_cancelled() {
    let pg = shared_cluster();
    let db = pg.scratch_db("cancel_leave");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let backends = |state: &str| {
        pg.psql(&format!(
            "select count(*) from pg_stat_activity where usename = '{}' and datname = '{}' {state}",
            db.user, db.name
        ))
        .trim()
        .parse::<usize>()
        .unwrap()
    };
    let mut gone = Vec::new();
    for _ in 0..4 {
        let mut s = crate::core::login_raw(addr, &db).await;
        let mut q = bytes::BytesMut::new();
        iampool::protocol::messages::query(&mut q, "select pg_sleep(60)");
        s.write_all(&q).await.unwrap();
        gone.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        backends("and state = 'active'"),
        2,
        "two sleeps run, two clients wait"
    );
    drop(gone);
    // Waiting clients that left are forgotten; the running queries are cancelled (after a
    // short grace for answers in flight, such as a COMMIT's).
    let mut max_seen = 0;
    let mut active = usize::MAX;
    for _ in 0..100 {
        max_seen = max_seen.max(backends(""));
        active = backends("and query = 'select pg_sleep(60)' and state = 'active'");
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(active, 0, "the abandoned queries were cancelled");
    assert!(max_seen <= 2, "at most pool_size backends, saw {max_seen}");
    // New clients are served at once.
    let c = connect(addr, &db).await;
    assert_eq!(
        c.query_one("select 1::int", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    assert!(backends("") <= 2);
    assert!(iam.shutdown().await);
}
