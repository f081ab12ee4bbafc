//! The client-facing side: parameters across server switches, client TLS, the unix socket,
//! GSSENC and psql's Ctrl-C.

use std::time::Duration;

use iampool::config::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pooler::{self, connect, run, start};
use crate::support::certs::TestPki;
use crate::support::pg::shared_cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_follow_clients_across_servers() {
    let pg = shared_cluster();
    let db = pg.scratch_db("params");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let (zone, app) = if i % 2 == 0 {
                ("Asia/Tokyo", format!("client_{i}"))
            } else {
                ("UTC", format!("other_{i}"))
            };
            let mut cfg = pooler::client_config(addr, &db);
            cfg.application_name(&app);
            let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            c.batch_execute(&format!("set timezone = '{zone}'"))
                .await
                .unwrap();
            for _ in 0..30 {
                let rows = c
                    .simple_query("select current_setting('TimeZone'), current_setting('application_name'), pg_backend_pid()")
                    .await
                    .unwrap();
                let row = rows
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                        _ => None,
                    })
                    .unwrap();
                assert_eq!(row.get(0), Some(zone), "client {i}");
                assert_eq!(row.get(1), Some(app.as_str()), "client {i}");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_allow_and_require() {
    let pg = shared_cluster();
    let db = pg.scratch_db("ctls");
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let (cert, key) = pki.issue_server(dir.path(), &["localhost", "127.0.0.1"]);

    for mode in [ClientTls::Allow, ClientTls::Require] {
        let mut cfg = pooler::config(pg, &db);
        cfg.client_tls = mode;
        cfg.client_tls_cert_file = Some(cert.clone());
        cfg.client_tls_key_file = Some(key.clone());
        let iam = start(cfg).await;
        let port = iam.local_addr().port().to_string();
        let psql = |sslmode: &str| {
            let (db, port, ca, sslmode) = (
                db.clone(),
                port.clone(),
                pki.ca_path.clone(),
                sslmode.to_owned(),
            );
            tokio::task::spawn_blocking(move || {
                run(
                    std::process::Command::new("psql")
                        .env("PGPASSWORD", &db.password)
                        .arg(format!(
                            "host=127.0.0.1 port={port} user={} dbname={} sslmode={sslmode} sslrootcert={}",
                            db.user,
                            db.name,
                            ca.display()
                        ))
                        .args(["-Atc", "select 'tls ok'"]),
                    Duration::from_secs(30),
                )
            })
        };
        let (ok, out, err) = psql("verify-ca").await.unwrap();
        assert!(ok, "{mode:?} verify-ca: {err}");
        assert_eq!(out.trim(), "tls ok");
        let (ok, out, err) = psql("disable").await.unwrap();
        match mode {
            ClientTls::Require => {
                assert!(!ok, "plaintext accepted under require: {out}");
                assert!(err.contains("TLS is required"), "{err}");
            }
            _ => assert!(ok, "{mode:?} plaintext: {err}"),
        }
        assert!(iam.shutdown().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_gssenc_decline() {
    let pg = shared_cluster();
    let db = pg.scratch_db("unix");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = pooler::config(pg, &db);
    cfg.unix_socket_dir = Some(dir.path().to_path_buf());
    let iam = start(cfg).await;
    let port = iam.local_addr().port();

    let (db2, sock) = (db.clone(), dir.path().to_path_buf());
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(
            std::process::Command::new("psql")
                .env("PGPASSWORD", &db2.password)
                .args(["-h"])
                .arg(&sock)
                .args(["-p", &port.to_string(), "-U", &db2.user, "-d", &db2.name])
                .args(["-Atc", "select 'via unix'"]),
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "via unix");

    // GSSENCRequest is declined with 'N'; the client may then go on without it.
    let mut s = tokio::net::TcpStream::connect(iam.local_addr())
        .await
        .unwrap();
    let mut req = 8i32.to_be_bytes().to_vec();
    req.extend_from_slice(&80_877_104i32.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_a_running_query() {
    let pg = shared_cluster();
    let db = pg.scratch_db("ctrlc");
    let iam = start(pooler::config(pg, &db)).await;
    let port = iam.local_addr().port();
    let db2 = db.clone();
    let child = pooler::psql_command(port, &db2)
        .args(["-c", "select pg_sleep(30)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the query runs upstream, then press Ctrl-C.
    let sql = format!(
        "select count(*) from pg_stat_activity where datname = '{}' and state = 'active' \
         and query = 'select pg_sleep(30)'",
        db.name
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pg.psql(&sql).trim() != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the query never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("canceling statement due to user request"),
        "psql said: {err}"
    );
    // The session is still usable through iampool afterwards.
    let c = connect(iam.local_addr(), &db).await;
    c.simple_query("select 1").await.unwrap();
    assert!(iam.shutdown().await);
}
