//! IAM sign-in end to end: the real iampool binary in front of an RDS-like PostgreSQL whose
//! PAM stack checks every token (tests/support/rds.rs), with credentials from the
//! environment or from fake AWS endpoints on 127.0.0.1.
//!
//! iampool runs as a subprocess: the AWS credential chain reads process environment
//! variables, which parallel tests in one binary could not set independently. Each process
//! gets `env_clear()` plus exactly the variables its scenario needs, a temp HOME (no real
//! ~/.aws), and `AWS_EC2_METADATA_DISABLED=true` unless the scenario is IMDS.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::support::fake_aws::{derive_key, FailMode, FakeEcs, FakeImds, FakeSts, IssuedKey};
use crate::support::pg::quote_ident;
use crate::support::rds::{
    merge_issued, run_bounded, RdsOptions, RdsPg, RDS_HOST, RDS_REGION, STATIC_ACCESS_KEY_ID,
    STATIC_SECRET_ACCESS_KEY,
};

/// Hang guard for single steps (a login, a query); never an assertion about speed.
pub(crate) const T: Duration = Duration::from_secs(60);
pub(crate) const APP: &str = "app";

// ---------------------------------------------------------------------------------------------
// iampool as a subprocess

/// A running iampool binary; killed (and its log shown, if the test failed) on drop.
pub(crate) struct Iampool {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Iampool {
    /// Starts `iampool ARGS --listen 127.0.0.1:<free port>` with only `env` (plus PATH, a temp
    /// HOME, and IMDS disabled unless `env` points at an IMDS) and waits until it listens.
    pub(crate) fn start(args: &[String], env: &[(&str, String)]) -> Iampool {
        let dir = tempfile::Builder::new()
            .prefix("iampool-proc-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let log = dir.path().join("iampool.log");
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = iampool_command(dir.path(), env);
            cmd.args(args)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .stdout(File::create(&log).expect("log file"))
                .stderr(File::options().append(true).open(&log).expect("log file"));
            let mut child = cmd.spawn().expect("spawn iampool");
            match wait_listening(&mut child, port, &log) {
                Ok(()) => return Iampool { child, port, dir },
                Err(text) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if text.contains("in use") {
                        continue;
                    }
                    panic!("iampool did not start: {text}");
                }
            }
        }
        panic!("iampool did not start: every port tried was in use");
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("iampool.log")).unwrap_or_default()
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://{APP}@127.0.0.1:{}/{db}", self.port)
    }

    pub(crate) async fn try_client(
        &self,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(APP)
            .dbname(db)
            .connect_timeout(Duration::from_secs(20))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Connects and runs `SELECT current_user`; the first error (login or query) otherwise.
    pub(crate) async fn try_query(&self, db: &str) -> Result<String, tokio_postgres::Error> {
        let work = async {
            let c = self.try_client(db).await?;
            // The simple protocol: this suite is about sign-in, not prepared statements.
            let rows = c.simple_query("SELECT current_user").await?;
            Ok(rows
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap_or_default())
        };
        tokio::time::timeout(T, work)
            .await
            .unwrap_or_else(|_| panic!("a login or query through iampool hung\n{}", self.log()))
    }

    pub(crate) async fn query_ok(&self, db: &str) -> String {
        match self.try_query(db).await {
            Ok(user) => user,
            Err(e) => panic!(
                "query through iampool failed: {e:?}\niampool log:\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for Iampool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- iampool log ----\n{}\n---- end ----", self.log());
        }
    }
}

/// The binary with a clean environment; see [`Iampool::start`].
fn iampool_command(home: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iampool"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    if !env
        .iter()
        .any(|(k, _)| *k == "AWS_EC2_METADATA_SERVICE_ENDPOINT")
    {
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the binary to completion (bounded); returns (success, stdout, stderr).
fn run_iampool(args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let home = tempfile::tempdir().expect("temp HOME");
    let mut cmd = iampool_command(home.path(), env);
    cmd.args(args);
    run_bounded(&mut cmd, Duration::from_secs(60))
}

/// Polls until `port` takes TCP connections; the log if the process exits or never listens.
fn wait_listening(child: &mut Child, port: u16, log: &Path) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(30);
    let log_text = || fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Err(format!("exited ({status}):\n{}", log_text()));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("not listening after 30 s:\n{}", log_text()));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

pub(crate) fn static_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", STATIC_ACCESS_KEY_ID.to_string()),
        (
            "AWS_SECRET_ACCESS_KEY",
            STATIC_SECRET_ACCESS_KEY.to_string(),
        ),
    ]
}

/// `--upstream URL --auth-type trust` plus `extra` flags.
pub(crate) fn args(url: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--upstream".to_string(),
        url.to_string(),
        "--auth-type".to_string(),
        "trust".to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// An RDS-like server with IAM user `app` (and its database `app`).
pub(crate) fn rds_with_app(opts: RdsOptions) -> RdsPg {
    let rds = RdsPg::start(opts);
    rds.create_iam_user(APP);
    rds
}

// ---------------------------------------------------------------------------------------------
// pgbench

struct Bench {
    processed: u64,
    failed: u64,
    success: bool,
    output: String,
}

/// `pgbench -i -s 1` into database `app` as the superuser, tables then owned by `app`.
fn pgbench_init(rds: &RdsPg) {
    let pg = rds.cluster();
    let mut cmd = Command::new(pg.bin_dir().join("pgbench"));
    cmd.args(["-i", "-q", "-s", "1", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres", APP])
        .env_clear()
        .env("LC_ALL", "C");
    let (ok, out, err) = run_bounded(&mut cmd, Duration::from_secs(120));
    assert!(ok, "pgbench -i failed:\n{out}\n{err}");
    let owner = quote_ident(APP);
    let alter: String = ["accounts", "branches", "history", "tellers"]
        .iter()
        .map(|t| format!("ALTER TABLE pgbench_{t} OWNER TO {owner};"))
        .collect();
    pg.psql_db(APP, &alter);
}

/// pgbench through iampool, run on a blocking thread while `tick` runs every 100 ms on this
/// task (sampling backends, updating the verifier's keys).
async fn pgbench_through(
    iampool: &Iampool,
    clients: u32,
    seconds: u32,
    mut tick: impl FnMut(),
) -> Bench {
    let bin = PathBuf::from("/usr/lib/postgresql/15/bin/pgbench");
    let bin = if bin.is_file() {
        bin
    } else {
        PathBuf::from("pgbench")
    };
    let mut cmd = Command::new(bin);
    cmd.args(["-n", "-c", &clients.to_string(), "-j", "2", "-T"])
        .arg(seconds.to_string())
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &iampool.port.to_string(),
            "-U",
            APP,
            APP,
        ])
        .env_clear()
        .env("LC_ALL", "C")
        .env("PGSSLMODE", "disable");
    let limit = Duration::from_secs(u64::from(seconds) + 90);
    let handle = tokio::task::spawn_blocking(move || run_bounded(&mut cmd, limit));
    while !handle.is_finished() {
        tick();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (success, out, err) = handle.await.expect("pgbench thread");
    let output = format!("{out}\n{err}");
    let number = |prefix: &str| -> Option<u64> {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.parse().ok())
    };
    Bench {
        processed: number("number of transactions actually processed:")
            .unwrap_or_else(|| panic!("no transaction count in pgbench output:\n{output}")),
        failed: number("number of failed transactions:")
            .unwrap_or_else(|| panic!("no failed-transaction count in pgbench output:\n{output}")),
        success,
        output,
    }
}

/// The fake's issued keys, plus the next `ahead` generations announced with an expiry no
/// later than the one they will really get (issued later, so expiring later), so the
/// verifier knows keys the moment they are handed out without trusting any key for longer
/// than its real life.
pub(crate) fn keys_with_next(
    issued: Vec<IssuedKey>,
    seed: &str,
    ttl: Duration,
    ahead: u64,
) -> Vec<IssuedKey> {
    let n = issued.len() as u64;
    let secs = (SystemTime::now() + ttl)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let provisional = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let mut keys = issued;
    keys.extend((n..n + ahead).map(|g| derive_key(seed, g, provisional)));
    merge_issued(&[keys])
}

pub(crate) fn assert_secret_free(text: &str, what: &str) {
    for needle in [
        "X-Amz-Signature",
        "X-Amz-Credential",
        "Action=connect",
        STATIC_SECRET_ACCESS_KEY,
    ] {
        assert!(
            !text.contains(needle),
            "{what} leaks token material ({needle}): {text}"
        );
    }
}

pub(crate) fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.message().to_string()),
        None => (String::new(), e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// The RDS-like server itself

/// The server checks tokens like RDS: a fresh token signs in over verify-full TLS; a token
/// past its window, a token for another user, garbage, and a non-TLS login are refused with
/// RDS's messages. Also proves the PAM file exists only while the server does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rds_like_server_checks_tokens_like_rds() {
    let rds = rds_with_app(RdsOptions::default());
    rds.create_iam_user("app2");
    rds.trust_static_key();
    let pam_file = rds.pam_file().to_path_buf();
    assert!(pam_file.is_file());
    let sign = |user: &str, at: Option<String>| -> String {
        let port = rds.port().to_string();
        let mut a = vec![
            "token", "--host", RDS_HOST, "--port", &port, "--user", user, "--region", RDS_REGION,
        ];
        if let Some(at) = at.as_deref() {
            a.extend(["--signing-time", at]);
        }
        let (ok, out, err) = run_iampool(&a, &static_env());
        assert!(ok, "iampool token failed: {err}");
        assert_eq!(out.trim().lines().count(), 1, "one token line: {out:?}");
        out.trim().to_string()
    };

    let fresh = sign(APP, None);
    assert!(fresh.starts_with(&format!("{RDS_HOST}:{}/?Action=connect&", rds.port())));
    let (ok, out, err) = rds.psql_direct(APP, &fresh, "SELECT current_user");
    assert!(ok, "a fresh token must sign in: {err}");
    assert_eq!(out.trim(), APP);

    // Signed 20 minutes ago: X-Amz-Expires (900 s) has run out.
    let old = time::OffsetDateTime::now_utc() - time::Duration::minutes(20);
    let old = old
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let stale = sign(APP, Some(old));
    let (ok, _, err) = rds.psql_direct(APP, &stale, "SELECT 1");
    assert!(!ok, "a token past its window must be refused");
    assert!(
        err.contains("FATAL:  PAM authentication failed for user \"app\""),
        "RDS's message: {err}"
    );
    assert_secret_free(&err, "psql's error");

    // A token for `app` presented by `app2`.
    let (ok, _, err) = rds.psql_direct("app2", &fresh, "SELECT 1");
    assert!(!ok);
    assert!(
        err.contains("PAM authentication failed for user \"app2\""),
        "{err}"
    );

    let (ok, _, err) = rds.psql_direct(APP, "not-a-token", "SELECT 1");
    assert!(!ok);
    assert!(
        err.contains("PAM authentication failed for user \"app\""),
        "{err}"
    );

    // Without TLS an IAM user is refused before any token is looked at.
    let (ok, _, err) = rds.psql_direct_plain(APP, &fresh, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("pg_hba.conf rejects connection"), "{err}");

    let s = rds.stats();
    assert_eq!(s.accepted, 1, "{s:?}");
    assert_eq!(s.rejected, 3, "{s:?}");
    assert_eq!(s.distinct_tokens, 3, "fresh, stale, garbage: {s:?}");
    assert_eq!(
        s.signers,
        BTreeSet::from([STATIC_ACCESS_KEY_ID.to_string()])
    );
    assert!(s.reject_reasons[0].starts_with("token expired at"), "{s:?}");
    assert!(
        s.reject_reasons[1].contains("does not match PAM user 'app2'"),
        "{s:?}"
    );
    let log = rds.verifier_log();
    assert!(
        !log.contains(&fresh) && !log.contains("X-Amz-Signature"),
        "{log}"
    );

    // The SQLSTATE, through a real driver: 28P01.
    let err = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(rds.port())
        .user(APP)
        .dbname(APP)
        .password(stale.as_str())
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("no TLS, no login");
    let (code, message) = db_error(&err);
    assert_eq!(code, "28000", "{message}"); // pg_hba reject without TLS

    drop(rds);
    assert!(
        !pam_file.exists(),
        "the PAM service file is removed on drop"
    );
}

// ---------------------------------------------------------------------------------------------
// Scenarios through iampool

/// Static credentials from the environment: psql and tokio-postgres through iampool, then
/// pgbench across many token lifetimes and constant re-logins with no failed transaction,
/// never more backends than pool_size, and logins signed by more than one token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_credentials_end_to_end_with_pgbench_across_token_lifetimes() {
    let rds = rds_with_app(RdsOptions::default());
    rds.trust_static_key();
    pgbench_init(&rds);
    let pool_size = 5;
    let iampool = Iampool::start(
        &args(
            &rds.upstream_url(APP, ""),
            &[
                "--pool-size",
                &pool_size.to_string(),
                "--token-lifetime",
                "10s",
                "--server-lifetime",
                "3s",
                "--server-lifetime-jitter",
                "1s",
            ],
        ),
        &static_env(),
    );

    // psql through iampool with trust client auth.
    let mut psql = Command::new(rds.cluster().bin_dir().join("psql"));
    psql.args([
        "-X",
        "-A",
        "-t",
        "-c",
        "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    ])
    .arg(iampool.url(APP))
    .env_clear()
    .env("LC_ALL", "C");
    let (ok, out, err) = run_bounded(&mut psql, T);
    assert!(ok, "psql through iampool: {err}\n{}", iampool.log());
    assert_eq!(out.trim(), "app|t", "signed in as app over TLS");

    // tokio-postgres through iampool.
    assert_eq!(iampool.query_ok(APP).await, APP);

    let mut max_backends = 0;
    let bench = pgbench_through(&iampool, 20, 15, || {
        max_backends = max_backends.max(rds.cluster().backend_count(APP, APP));
    })
    .await;
    let stats = rds.stats();
    println!(
        "static/pgbench: {} transactions, {} failed; verifier accepted {} logins with {} \
         distinct tokens, rejected {}; max backends {max_backends}",
        bench.processed,
        bench.failed,
        stats.accepted,
        stats.distinct_accepted_tokens,
        stats.rejected
    );
    assert!(
        bench.success,
        "pgbench failed:\n{}\n{}",
        bench.output,
        iampool.log()
    );
    assert_eq!(bench.failed, 0, "{}", bench.output);
    assert!(bench.processed > 0, "{}", bench.output);
    assert!(
        max_backends <= pool_size,
        "{max_backends} backends > pool_size {pool_size}"
    );
    assert!(
        stats.distinct_accepted_tokens > 1,
        "15 s of 10 s tokens must use more than one token: {stats:?}"
    );
    assert!(
        stats.accepted > pool_size as usize,
        "server lifetime 3 s forces re-logins: {stats:?}"
    );
    assert_eq!(stats.rejected, 0, "{stats:?}");
    assert_eq!(
        stats.signers,
        BTreeSet::from([STATIC_ACCESS_KEY_ID.to_string()])
    );
    assert_secret_free(&iampool.log(), "iampool's log");
}

/// Container credentials that rotate mid-run (20 s lifetime, plus a forced rotation): the
/// verifier trusts each issued key only until its expiry, and pgbench across the rotation
/// sees no failed transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_container_credentials_under_pgbench() {
    let ttl = Duration::from_secs(20);
    let ecs = FakeEcs::start(ttl).await;
    let rds = rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&keys_with_next(ecs.issued(), "ecs", ttl, 2));
    pgbench_init(&rds);
    let iampool = Iampool::start(
        &args(
            &rds.upstream_url(APP, ""),
            &[
                "--pool-size",
                "5",
                "--token-lifetime",
                "10s",
                "--server-lifetime",
                "2s",
            ],
        ),
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", ecs.uri())],
    );
    assert_eq!(iampool.query_ok(APP).await, APP);

    let started = Instant::now();
    let mut rotated = false;
    let bench = pgbench_through(&iampool, 10, 25, || {
        if !rotated && started.elapsed() >= Duration::from_secs(8) {
            ecs.rotate();
            rotated = true;
        }
        rds.set_issued_keys(&keys_with_next(ecs.issued(), "ecs", ttl, 2));
    })
    .await;
    let stats = rds.stats();
    let issued = ecs.issued();
    println!(
        "rotation/pgbench: {} transactions, {} failed; {} credential requests, {} keys issued; \
         verifier accepted {} logins ({} tokens, signers {:?}), rejected {}",
        bench.processed,
        bench.failed,
        ecs.requests(),
        issued.len(),
        stats.accepted,
        stats.distinct_accepted_tokens,
        stats.signers,
        stats.rejected
    );
    assert!(rotated);
    assert!(
        bench.success,
        "pgbench failed:\n{}\n{}",
        bench.output,
        iampool.log()
    );
    assert_eq!(bench.failed, 0, "{}", bench.output);
    assert!(issued.len() >= 2, "the run crossed a rotation: {issued:?}");
    assert!(
        stats.signers.len() >= 2,
        "logins were signed by the rotated keys too: {stats:?}"
    );
    assert!(stats
        .signers
        .iter()
        .all(|s| issued.iter().any(|k| &k.access_key_id == s)));
    assert_eq!(
        stats.rejected, 0,
        "no token signed by stale keys: {stats:?}"
    );
}

/// The credential endpoint goes down: tokens already minted keep serving new server logins;
/// once the credentials behind them expire, a client gets a clean error (no hang, no token in
/// it); when the endpoint is back, logins recover with new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_endpoint_outage_then_clean_error_then_recovery() {
    let ttl = Duration::from_secs(20);
    let ecs = FakeEcs::start(ttl).await;
    let rds = rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&keys_with_next(ecs.issued(), "ecs", ttl, 1));
    let iampool = Iampool::start(
        &args(
            &rds.upstream_url(APP, ""),
            &[
                "--pool-size",
                "2",
                "--token-lifetime",
                "10s",
                "--server-lifetime",
                "1s",
                "--server-lifetime-jitter",
                "0",
                "--server-login-retry",
                "500ms",
                "--query-wait-timeout",
                "5s",
            ],
        ),
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", ecs.uri())],
    );
    assert_eq!(iampool.query_ok(APP).await, APP);
    let first_key = ecs.issued()[0].clone();
    rds.set_issued_keys(&keys_with_next(ecs.issued(), "ecs", ttl, 1));

    ecs.set_fail(FailMode::Status500);
    let down_at = Instant::now();
    let accepted_before = rds.stats().accepted;
    // New server logins during the outage (server_lifetime 1 s retires each connection).
    let mut served = 0;
    let failure = loop {
        match iampool.try_query(APP).await {
            Ok(user) => {
                assert_eq!(user, APP);
                served += 1;
            }
            Err(e) => break e,
        }
        assert!(
            down_at.elapsed() < Duration::from_secs(60),
            "credentials that expire after 20 s still serve after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
    };
    let during = rds.stats();
    let (code, message) = db_error(&failure);
    println!(
        "outage: {served} queries served after the endpoint went down, {} new logins; then \
         {code}: {message}",
        during.accepted - accepted_before
    );
    assert!(
        during.accepted > accepted_before,
        "valid tokens kept signing new server logins: {during:?}"
    );
    assert!(
        !code.is_empty(),
        "a server-side error with a SQLSTATE: {failure:?}"
    );
    assert_ne!(code, "28P01", "no expired token was sent: {message}");
    assert_eq!(during.rejected, 0, "{during:?}");
    assert!(
        SystemTime::now() + Duration::from_secs(2) >= first_key.expiration,
        "the error came only once the credentials ran out"
    );
    assert_secret_free(&message, "the client's error");
    assert_secret_free(&iampool.log(), "iampool's log");

    let requests_at_recovery = ecs.requests();
    ecs.set_fail(FailMode::Healthy);
    let back_at = Instant::now();
    loop {
        rds.set_issued_keys(&keys_with_next(ecs.issued(), "ecs", ttl, 1));
        if iampool.try_query(APP).await.is_ok() {
            break;
        }
        assert!(
            back_at.elapsed() < T,
            "no recovery after the endpoint came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Recovery: credentials were fetched again from the endpoint once it came back (the fake
    // may re-issue the same key id with a new expiry), and every login since was accepted.
    let after = rds.stats();
    assert!(
        ecs.requests() > requests_at_recovery,
        "credentials fetched again after the endpoint came back"
    );
    assert_eq!(after.rejected, 0, "{after:?}");
    // And a fresh login now works too (new clients, new servers).
    rds.set_issued_keys(&keys_with_next(ecs.issued(), "ecs", ttl, 1));
    iampool
        .try_query(APP)
        .await
        .expect("queries keep working after recovery");
}

/// 50 clients at once on a cold iampool (pool_size 10): one credential fetch, one token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_new_clients_mints_one_token() {
    let ttl = Duration::from_secs(3600);
    let ecs = FakeEcs::start(ttl).await;
    let rds = rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&keys_with_next(ecs.issued(), "ecs", ttl, 1));
    let iampool = Iampool::start(
        &args(&rds.upstream_url(APP, ""), &["--pool-size", "10"]),
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", ecs.uri())],
    );
    let iampool = &iampool;
    let tasks: Vec<_> = (0..50)
        .map(|_| async move {
            let c = iampool.try_client(APP).await?;
            c.simple_query("SELECT pg_sleep(0.2)").await?;
            Ok::<_, tokio_postgres::Error>(())
        })
        .collect();
    let results = tokio::time::timeout(T, futures_util::future::join_all(tasks))
        .await
        .expect("50 clients hung");
    for r in &results {
        if let Err(e) = r {
            panic!("a burst client failed: {e:?}\n{}", iampool.log());
        }
    }
    let stats = rds.stats();
    println!(
        "burst: 50 clients, {} credential requests, {} server logins, {} distinct tokens",
        ecs.requests(),
        stats.accepted,
        stats.distinct_tokens
    );
    assert_eq!(ecs.requests(), 1, "one credential fetch for the burst");
    assert_eq!(
        stats.distinct_tokens, 1,
        "one token for the burst: {stats:?}"
    );
    assert!((1..=10).contains(&stats.accepted), "{stats:?}");
    assert_eq!(stats.rejected, 0);
}

/// A token signed for another host name, or another region, is refused: the client gets the
/// server's FATAL (SQLSTATE and message passed through), and iampool tried exactly twice (the
/// login and one retry with a freshly minted token). PostgreSQL reports a failed PAM login as
/// 28000 (`auth_failed()` sets 28P01 only for password methods), and Aurora answers the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_wrong_host_or_region_is_refused_after_one_retry() {
    let other = "other.cluster-iampooltest.us-east-1.rds.amazonaws.com";
    let rds = rds_with_app(RdsOptions {
        // TLS accepts both names; the verifier only the real one.
        cert_names: vec![RDS_HOST.to_string(), other.to_string()],
        ..RdsOptions::default()
    });
    rds.trust_static_key();
    let wrong_host = rds.upstream_url(APP, "").replacen(RDS_HOST, other, 1);
    let wrong_region = rds
        .upstream_url(APP, "")
        .replace("region=us-east-1", "region=us-west-2");
    let mut before = 0;
    let mut before_tokens = 0;
    for (url, reason) in [
        (wrong_host, format!("signed for {other}:")),
        (wrong_region, "signed for region us-west-2".to_string()),
    ] {
        let iampool = Iampool::start(&args(&url, &[]), &static_env());
        let err = iampool
            .try_query(APP)
            .await
            .expect_err("a wrong token must fail");
        let (code, message) = db_error(&err);
        println!("wrong token ({reason}): {code}: {message}");
        assert_eq!(code, "28000", "the server's SQLSTATE: {err:?}");
        assert!(
            message.contains("PAM authentication failed for user \"app\""),
            "the upstream's message reaches the client: {message}"
        );
        assert_secret_free(&message, "the client's error");
        // Logins may be in flight in parallel (the start-up warm-up and the client's own):
        // wait until the count is stable, then every failed login must have made exactly
        // two attempts.
        let mut stats = rds.wait_stats(T, |s| s.rejected > before).await;
        loop {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let again = rds.wait_stats(T, |_| true).await;
            if again.rejected == stats.rejected {
                break;
            }
            stats = again;
        }
        let attempts = stats.rejected - before;
        let failed_logins = iampool
            .log()
            .lines()
            .filter(|l| l.contains("upstream login failed"))
            .count();
        assert_eq!(stats.accepted, 0);
        assert!(
            stats.reject_reasons[before..]
                .iter()
                .all(|r| r.starts_with(&reason)),
            "{stats:?}"
        );
        assert!(failed_logins >= 1, "{}", iampool.log());
        assert_eq!(
            attempts,
            2 * failed_logins,
            "a refused token is dropped and each login retried exactly once with a fresh one \
             (a PAM refusal is 28000): {stats:?}\n{}",
            iampool.log()
        );
        // Concurrent logins share the cached token, then the same freshly minted one
        // (single-flight): each retry used a token different from its first attempt.
        assert!(
            stats.distinct_tokens >= before_tokens + 2,
            "the retry used a new token: {stats:?}"
        );
        before = stats.rejected;
        before_tokens = stats.distinct_tokens;
    }
}

/// auth=iam with sslmode=disable or require never starts: the token would go out in cleartext,
/// or to a server nobody verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_with_sslmode_disable_is_refused_at_start() {
    let url =
        format!("postgres://app@{RDS_HOST}:5432/app?auth=iam&region={RDS_REGION}&sslmode=disable");
    let (ok, out, err) = run_iampool(&["--upstream", &url, "--auth-type", "trust"], &static_env());
    let text = format!("{out}{err}");
    assert!(!ok, "iampool must refuse to start:\n{text}");
    assert!(text.contains("sslmode"), "names sslmode: {text}");
    assert!(
        text.contains("verify-full") || text.contains("require"),
        "names the fix: {text}"
    );

    let (ok, out, err) = run_iampool(&["--upstream", &url, "check-config"], &static_env());
    let checked = format!("{out}{err}");
    assert!(!ok, "check-config reports the mistake:\n{checked}");
    assert!(checked.contains("sslmode"), "{checked}");

    // TLS that encrypts without verifying the server is refused as well, unless the loudly
    // named test-setup opt-out is set.
    let require = url.replace("sslmode=disable", "sslmode=require");
    let (ok, out, err) = run_iampool(&["--upstream", &require, "check-config"], &static_env());
    let text = format!("{out}{err}");
    assert!(!ok, "sslmode=require must be refused for auth=iam:\n{text}");
    assert!(text.contains("does not verify the server"), "{text}");
    assert!(
        text.contains("insecure_unverified_tls"),
        "names the opt-out: {text}"
    );
    let opted_out = format!("{require}&insecure_unverified_tls=true");
    let (ok, out, err) = run_iampool(&["--upstream", &opted_out, "check-config"], &static_env());
    assert!(ok, "the opt-out is honoured: {out}{err}");

    // The right configuration passes check-config and shows verify-full.
    let good = url.replace("&sslmode=disable", "");
    let (ok, out, err) = run_iampool(&["--upstream", &good, "check-config"], &static_env());
    assert!(ok, "check-config of a good config: {out}{err}");
    assert!(out.contains("verify-full"), "{out}");
}

/// Under verify-full a server certificate for another name is refused, before any token
/// leaves iampool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_another_host_is_refused() {
    let rds = rds_with_app(RdsOptions {
        cert_names: vec!["db.somewhere-else.example".to_string()],
        ..RdsOptions::default()
    });
    rds.trust_static_key();
    let iampool = Iampool::start(&args(&rds.upstream_url(APP, ""), &[]), &static_env());
    let err = iampool.try_query(APP).await.expect_err("TLS must fail");
    let (code, message) = db_error(&err);
    println!("wrong certificate: {code}: {message}");
    assert_eq!(code, "08001", "{err:?}");
    assert!(message.contains("TLS"), "names TLS: {message}");
    assert_secret_free(&message, "the client's error");
    let stats = rds.stats();
    assert_eq!(
        stats.accepted + stats.rejected,
        0,
        "no token reached the server: {stats:?}"
    );
}

/// EKS IRSA: a web identity token file and a role ARN; STS (fake) hands out the role's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_credentials_sign_logins() {
    let ttl = Duration::from_secs(3600);
    let sts = FakeSts::start(ttl).await;
    let role = "arn:aws:iam::111122223333:role/iampool-irsa";
    let rds = rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&keys_with_next(vec![], role, ttl, 1));
    let jwt_dir = tempfile::tempdir().unwrap();
    let jwt = jwt_dir.path().join("token");
    fs::write(&jwt, "eyJhbGciOiJSUzI1NiJ9.fake-service-account-token.sig").unwrap();
    let iampool = Iampool::start(
        &args(&rds.upstream_url(APP, ""), &[]),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", jwt.display().to_string()),
            ("AWS_ROLE_ARN", role.to_string()),
            ("AWS_ROLE_SESSION_NAME", "iampool-test".to_string()),
            ("AWS_ENDPOINT_URL_STS", sts.endpoint()),
            ("AWS_REGION", RDS_REGION.to_string()),
        ],
    );
    assert_eq!(iampool.query_ok(APP).await, APP);
    let calls = sts.calls();
    println!("web identity: STS calls {calls:?}");
    assert!(!calls.is_empty());
    for c in &calls {
        assert_eq!(c.action, "AssumeRoleWithWebIdentity");
        assert_eq!(c.role_arn, role);
        assert!(c
            .web_identity_token
            .as_deref()
            .unwrap_or("")
            .contains("fake-service-account"));
    }
    assert_eq!(
        rds.stats().signers,
        BTreeSet::from([FakeSts::key_for(role)])
    );
}

/// A cross-account role chain: env keys -> role 1 -> role 2 (which demands an external id and
/// trusts only role 1's keys). Only role 2's keys may sign, and STS saw each hop's caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assume_role_chain_signs_with_the_final_role() {
    let ttl = Duration::from_secs(3600);
    let sts = FakeSts::start(ttl).await;
    let arn1 = "arn:aws:iam::111122223333:role/hop-one";
    let arn2 = "arn:aws:iam::444455556666:role/db-connect";
    sts.trust_only(arn1, &[STATIC_ACCESS_KEY_ID]);
    let key1 = FakeSts::key_for(arn1);
    sts.trust_only(arn2, &[key1.as_str()]);
    sts.require_external_id(arn2, "ext-7788");
    let rds = rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&keys_with_next(vec![], arn2, ttl, 1));
    let mut env = static_env();
    env.push(("AWS_ENDPOINT_URL_STS", sts.endpoint()));
    let iampool = Iampool::start(
        &args(
            &rds.upstream_url(APP, ""),
            &[
                "--assume-role-arn",
                &format!("{arn1},{arn2}"),
                "--external-id",
                "ext-7788",
            ],
        ),
        &env,
    );
    assert_eq!(iampool.query_ok(APP).await, APP);
    let calls = sts.calls();
    println!("role chain: STS calls {calls:?}");
    let hop = |arn: &str| {
        calls
            .iter()
            .find(|c| c.role_arn == arn && c.issued_access_key_id.is_some())
            .unwrap_or_else(|| panic!("no successful AssumeRole of {arn}: {calls:?}"))
            .clone()
    };
    let (h1, h2) = (hop(arn1), hop(arn2));
    assert_eq!(h1.action, "AssumeRole");
    assert_eq!(
        h1.caller_access_key_id.as_deref(),
        Some(STATIC_ACCESS_KEY_ID)
    );
    assert_eq!(h2.caller_access_key_id.as_deref(), Some(key1.as_str()));
    assert_eq!(h2.external_id.as_deref(), Some("ext-7788"));
    assert!(
        calls.iter().all(|c| c.issued_access_key_id.is_some()),
        "no refused hop: {calls:?}"
    );
    assert_eq!(
        rds.stats().signers,
        BTreeSet::from([FakeSts::key_for(arn2)])
    );
}

/// EC2 instance role through IMDSv2 (session token PUT, then the role's credentials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imdsv2_credentials_sign_logins() {
    let ttl = Duration::from_secs(3600);
    let imds = FakeImds::start("iampool-instance-role", ttl).await;
    let rds = rds_with_app(RdsOptions::default());
    rds.set_issued_keys(&keys_with_next(vec![], "iampool-instance-role", ttl, 1));
    let iampool = Iampool::start(
        &args(&rds.upstream_url(APP, ""), &[]),
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())],
    );
    assert_eq!(iampool.query_ok(APP).await, APP);
    println!(
        "imds: {} token PUTs, {} role GETs, {} credential GETs, {} unauthorized",
        imds.token_puts(),
        imds.role_gets(),
        imds.credential_gets(),
        imds.unauthorized()
    );
    assert!(imds.token_puts() >= 1, "IMDSv2 session token requested");
    assert!(imds.credential_gets() >= 1);
    assert_eq!(
        imds.unauthorized(),
        0,
        "every metadata GET carried the session token"
    );
    let issued = imds.issued();
    assert_eq!(
        rds.stats().signers,
        issued
            .iter()
            .map(|k| k.access_key_id.clone())
            .collect::<BTreeSet<_>>()
    );
}

/// At log_level=trace, a whole IAM login (env keys, a two-hop AssumeRole chain through STS,
/// a signed token, the upstream login, a client's SCRAM login) logs no secret: no key, no
/// session token, no token or signature, whatever a dependency logs; and, written to a file,
/// no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_level_iam_login_logs_no_secret() {
    let ttl = Duration::from_secs(3600);
    let sts = FakeSts::start(ttl).await;
    let arn1 = "arn:aws:iam::111122223333:role/hop-one";
    let arn2 = "arn:aws:iam::444455556666:role/db-connect";
    let rds = rds_with_app(RdsOptions::default());
    let keys = keys_with_next(vec![], arn2, ttl, 1);
    rds.set_issued_keys(&keys);
    let mut env = static_env();
    env.push(("AWS_ENDPOINT_URL_STS", sts.endpoint()));
    let iampool = Iampool::start(
        &args(
            &rds.upstream_url(APP, ""),
            &[
                "--assume-role-arn",
                &format!("{arn1},{arn2}"),
                "--log-level",
                "trace",
            ],
        ),
        &env,
    );
    assert_eq!(iampool.query_ok(APP).await, APP);
    let log = iampool.log();
    assert!(
        log.contains("TRACE"),
        "the log is at trace level: {}",
        &log[..log.len().min(2000)]
    );
    assert!(
        !log.contains('\x1b'),
        "no colour codes in a log that is not a terminal"
    );
    assert_secret_free(&log, "iampool's trace log");
    let mut secrets = vec![
        ("the env secret key", STATIC_SECRET_ACCESS_KEY.to_string()),
        (
            "a session token parameter",
            "X-Amz-Security-Token".to_string(),
        ),
    ];
    for k in &keys {
        secrets.push(("a role's secret key", k.secret_access_key.clone()));
        secrets.push(("a role's session token", k.session_token.clone()));
    }
    for (what, secret) in &secrets {
        assert!(!log.contains(secret.as_str()), "the trace log shows {what}");
    }
}

/// A profile whose credentials come from `credential_process` (as `aws configure` writes it
/// for external tools): iampool signs logins with what the process prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_process_profile_signs_logins() {
    let rds = rds_with_app(RdsOptions::default());
    rds.trust_static_key();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("creds.sh");
    let calls = dir.path().join("calls");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho called >> {}\nprintf '%s' '{{\"Version\": 1, \"AccessKeyId\": \"{STATIC_ACCESS_KEY_ID}\", \"SecretAccessKey\": \"{STATIC_SECRET_ACCESS_KEY}\"}}'\n",
            calls.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = dir.path().join("config");
    fs::write(
        &config,
        format!(
            "[profile db-tools]\nregion = {RDS_REGION}\ncredential_process = {}\n",
            script.display()
        ),
    )
    .unwrap();
    let iampool = Iampool::start(
        &args(&rds.upstream_url(APP, ""), &[]),
        &[
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_PROFILE", "db-tools".to_string()),
        ],
    );
    assert_eq!(iampool.query_ok(APP).await, APP, "{}", iampool.log());
    assert!(
        fs::read_to_string(&calls)
            .unwrap_or_default()
            .contains("called"),
        "the process was run"
    );
    assert_eq!(
        rds.stats().signers,
        BTreeSet::from([STATIC_ACCESS_KEY_ID.to_string()])
    );
    assert_secret_free(&iampool.log(), "iampool's log");
}

/// `iampool token` signs with what iampool itself would use: `--profile` picks a profile's
/// keys, and `--assume-role-arn` chains roles through STS; RDS accepts the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_takes_a_profile_and_a_role_chain() {
    let rds = rds_with_app(RdsOptions::default());
    rds.trust_static_key();
    let port = rds.port().to_string();
    let base = ["token", "--host", RDS_HOST, "--port", &port, "--user", APP];

    // A named profile in the shared credentials file; no keys in the environment.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = AKIAWRONGDEFAULT0000\naws_secret_access_key = wrong\n\
             [ops]\naws_access_key_id = {STATIC_ACCESS_KEY_ID}\naws_secret_access_key = {STATIC_SECRET_ACCESS_KEY}\n"
        ),
    )
    .unwrap();
    let env = [
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
        (
            "AWS_CONFIG_FILE",
            dir.path().join("none").display().to_string(),
        ),
    ];
    let mut args = base.to_vec();
    args.extend(["--profile", "ops"]);
    let (ok, out, err) = run_iampool(&args, &env);
    assert!(ok, "iampool token --profile: {err}");
    let token = out.trim();
    assert!(
        token.contains(&format!("X-Amz-Credential={STATIC_ACCESS_KEY_ID}%2F")),
        "signed with the profile's key: {token}"
    );
    let (ok, who, err) = rds.psql_direct(APP, token, "SELECT current_user");
    assert!(ok, "RDS accepts the profile's token: {err}");
    assert_eq!(who.trim(), APP);

    // A two-hop role chain through STS.
    let ttl = Duration::from_secs(3600);
    let sts = FakeSts::start(ttl).await;
    let (arn1, arn2) = (
        "arn:aws:iam::111122223333:role/hop-one",
        "arn:aws:iam::444455556666:role/db-connect",
    );
    sts.require_external_id(arn2, "ext-1");
    rds.set_issued_keys(&keys_with_next(vec![], arn2, ttl, 1));
    let mut env = static_env();
    env.push(("AWS_ENDPOINT_URL_STS", sts.endpoint()));
    let chain = format!("{arn1},{arn2}");
    let mut args = base.to_vec();
    args.extend(["--assume-role-arn", &chain, "--external-id", "ext-1"]);
    let (ok, out, err) = run_iampool(&args, &env);
    assert!(ok, "iampool token --assume-role-arn: {err}");
    let token = out.trim();
    assert!(
        token.contains(&format!("X-Amz-Credential={}%2F", FakeSts::key_for(arn2))),
        "signed with the last role's key: {token}"
    );
    let (ok, who, err) = rds.psql_direct(APP, token, "SELECT current_user");
    assert!(ok, "RDS accepts the role chain's token: {err}");
    assert_eq!(who.trim(), APP);
}

/// Several hosts of one IAM upstream: each is signed for its own name (and verified under
/// it): two RDS-like servers that each accept only tokens for their own host name, behind one
/// load-balanced upstream, both take logins and refuse none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_of_an_upstream_gets_a_token_signed_for_it() {
    let names = [
        "writer-a.cluster-iampooltest.us-east-1.rds.amazonaws.com",
        "writer-b.cluster-iampooltest.us-east-1.rds.amazonaws.com",
    ];
    let servers: Vec<RdsPg> = names
        .iter()
        .map(|name| {
            let rds = rds_with_app(RdsOptions {
                cert_names: vec![name.to_string()],
                verifier_host: name.to_string(),
                ..RdsOptions::default()
            });
            rds.trust_static_key();
            rds
        })
        .collect();
    let bundle = tempfile::NamedTempFile::new().unwrap();
    let pems: String = servers
        .iter()
        .map(|s| fs::read_to_string(s.ca_path()).unwrap())
        .collect();
    fs::write(bundle.path(), pems).unwrap();
    let upstream = format!(
        "host={},{} hostaddr=127.0.0.1,127.0.0.1 port={},{} user={APP} dbname={APP} auth=iam \
         region={RDS_REGION} sslmode=verify-full sslrootcert={} load_balance_hosts=random",
        names[0],
        names[1],
        servers[0].port(),
        servers[1].port(),
        bundle.path().display()
    );
    let iampool = Iampool::start(&args(&upstream, &["--pool-size", "8"]), &static_env());
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(
            iampool
                .try_client(APP)
                .await
                .expect("a login through iampool"),
        );
    }
    let open = clients.iter().map(|c| c.simple_query("BEGIN; SELECT 1"));
    for r in futures_util::future::join_all(open).await {
        r.unwrap_or_else(|e| panic!("{e:?}\n{}", iampool.log()));
    }
    for (name, rds) in names.iter().zip(&servers) {
        let stats = rds.stats();
        assert!(stats.accepted >= 1, "{name}: {stats:?}\n{}", iampool.log());
        assert_eq!(stats.rejected, 0, "{name}: {stats:?}");
    }
}
