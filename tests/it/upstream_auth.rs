//! Upstream sign-in in password mode: md5, and cleartext only over TLS unless allowed.

use iampool::config::Secret;

use crate::pooler::{self, code, connect, message, start, try_connect};
use crate::support::pg::{PgCluster, PgOptions, TestDb};

/// A cluster whose pg_hba asks `md5user` for md5 and `plainuser` for a cleartext password.
fn cluster() -> (PgCluster, TestDb, TestDb) {
    let pg = PgCluster::start(PgOptions {
        hba: vec![
            "host all md5user 127.0.0.1/32 md5".into(),
            "host all plainuser 127.0.0.1/32 password".into(),
        ],
        ..PgOptions::default()
    });
    pg.psql(
        "set password_encryption = 'md5'; \
         create user md5user password 'md5-secret'; create database md5db owner md5user; \
         create user plainuser password 'plain-secret'; create database plaindb owner plainuser;",
    );
    let md5 = TestDb {
        name: "md5db".into(),
        user: "md5user".into(),
        password: "md5-secret".into(),
    };
    let plain = TestDb {
        name: "plaindb".into(),
        user: "plainuser".into(),
        password: "plain-secret".into(),
    };
    (pg, md5, plain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_cleartext_upstreams() {
    let (pg, md5, plain) = cluster();

    // md5: answered with the salted hash.
    let iam = start(pooler::config(&pg, &md5)).await;
    let c = connect(iam.local_addr(), &md5).await;
    let who: String = c
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "md5user");
    assert!(iam.shutdown().await);

    // Cleartext over a connection without TLS is refused by default: the client is told why.
    let iam = start(pooler::config(&pg, &plain)).await;
    let err = try_connect(iam.local_addr(), &plain).await.unwrap_err();
    let msg = message(&err);
    assert_eq!(code(&err), "08001", "{err:?}");
    assert!(msg.contains("cleartext password"), "{msg}");
    assert!(!msg.contains("plain-secret"));
    assert!(iam.shutdown().await);

    // ... and works when explicitly allowed.
    let mut cfg = pooler::config(&pg, &plain);
    cfg.databases[0].upstream.allow_cleartext_password = true;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &plain).await;
    c.simple_query("select 1").await.unwrap();
    assert!(iam.shutdown().await);

    // A wrong md5 password: the upstream's own error reaches the client.
    let mut cfg = pooler::config(&pg, &md5);
    cfg.databases[0].upstream.password = Some(Secret::new("wrong"));
    let iam = start(cfg).await;
    let err = try_connect(iam.local_addr(), &md5).await.unwrap_err();
    assert_eq!(code(&err), "28P01", "{err:?}");
    assert!(iam.shutdown().await);
}

/// A cleartext password goes only to a server iampool has verified: over TLS that only
/// encrypts (sslmode=require) it is refused unless explicitly allowed; verify-full sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_password_goes_only_to_a_verified_server() {
    use crate::support::certs::{install_for_postgres, TestPki};
    use iampool::config::SslMode;

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let (cert, key) = pki.issue_server(dir.path(), &["127.0.0.1"]);
    let pg_files = tempfile::tempdir().unwrap();
    let (cert, key) = install_for_postgres(&cert, &key, pg_files.path());
    let pg = PgCluster::start(PgOptions {
        hba: vec!["hostssl all plainuser 127.0.0.1/32 password".into()],
        tls: Some((cert, key)),
        ..PgOptions::default()
    });
    pg.psql(
        "create user plainuser password 'plain-secret'; create database plaindb owner plainuser;",
    );
    let plain = TestDb {
        name: "plaindb".into(),
        user: "plainuser".into(),
        password: "plain-secret".into(),
    };

    let config = |mode: SslMode| {
        let mut cfg = pooler::config(&pg, &plain);
        cfg.databases[0].upstream.sslmode = mode;
        cfg.databases[0].upstream.sslrootcert = Some(pki.ca_path.clone());
        cfg
    };
    // Encrypted but not verified: whoever answers would get the password.
    let iam = start(config(SslMode::Require)).await;
    let err = try_connect(iam.local_addr(), &plain).await.unwrap_err();
    let msg = message(&err);
    assert_eq!(code(&err), "08001", "{err:?}");
    assert!(msg.contains("not verified"), "{msg}");
    assert!(msg.contains("verify-full"), "names the fix: {msg}");
    assert!(!msg.contains("plain-secret"));
    assert!(iam.shutdown().await);

    // Verified: sent.
    for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
        let iam = start(config(mode)).await;
        let c = connect(iam.local_addr(), &plain).await;
        c.simple_query("select 1").await.unwrap();
        assert!(iam.shutdown().await);
    }

    // Unverified, but explicitly allowed.
    let mut cfg = config(SslMode::Require);
    cfg.databases[0].upstream.allow_cleartext_password = true;
    let iam = start(cfg).await;
    let c = connect(iam.local_addr(), &plain).await;
    c.simple_query("select 1").await.unwrap();
    assert!(iam.shutdown().await);
}

/// An upstream that refuses every login (53300, as a full server does) sees them spaced by
/// the backoff, however many clients keep trying; the clients are told why after a short
/// grace, not at query_wait_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_upstream_sees_logins_spaced_by_the_backoff() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // A server that reads each startup packet and answers FATAL 53300.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let logins = Arc::new(AtomicUsize::new(0));
    let counted = logins.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut rest = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
                if s.read_exact(&mut rest).await.is_err() {
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let mut b = bytes::BytesMut::new();
                iampool::protocol::messages::error_response(
                    &mut b,
                    iampool::protocol::messages::Severity::Fatal,
                    "53300",
                    "sorry, too many clients already",
                );
                let _ = s.write_all(&b).await;
            });
        }
    });

    let pg = crate::support::pg::shared_cluster();
    let db = pg.scratch_db("backoff");
    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].upstream.hosts[0].port = port;
    cfg.databases[0].pool_size = 10;
    cfg.server_login_retry = Duration::from_millis(200);
    let iam = start(cfg).await;
    let addr = iam.local_addr();

    // Eight clients keep trying for four seconds.
    let until = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while Instant::now() < until {
                let e = try_connect(addr, &db)
                    .await
                    .expect_err("the upstream refuses");
                let msg = e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| format!("{e:?}"));
                errors.push((code(&e), msg));
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let attempts = logins.load(Ordering::SeqCst);
    println!(
        "{attempts} upstream logins for {} client attempts",
        errors.len()
    );
    // 200 ms doubling, jittered down to half at most: 100+200+400+800+1600 ms already
    // passes 3 s, so four seconds hold at most seven logins (plus the warm-up one).
    assert!(attempts <= 8, "{attempts} logins in 4 s: not backing off");
    assert!(attempts >= 2, "it does try again: {attempts}");
    for (code, msg) in &errors {
        assert_eq!(code, "08001", "message: {msg:?}");
        assert!(
            msg.contains("too many clients already") || msg.contains("cannot be reached"),
            "says why: {msg}"
        );
    }
    assert!(
        errors.iter().any(|(_, m)| m.contains("cannot be reached")),
        "clients are told the upstream cannot be reached"
    );
    server.abort();
    assert!(iam.shutdown().await);
}
