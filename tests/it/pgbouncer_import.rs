//! Coming from PgBouncer: a realistic pgbouncer.ini and userlist.txt imported by the real
//! binary, loaded by iampool's loader and serving pgbench against real PostgreSQL; and an
//! `IAMPOOL_*` variable that is no setting, a warning in the log of an iampool that starts.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iampool::config::{AuthType, Config, PoolMode};

use crate::pgbench::pgbench;
use crate::pooler::{self, run, start};
use crate::support::pg::{quote_literal, shared_cluster, PgCluster, TestDb};

const LIMIT: Duration = Duration::from_secs(120);

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn pgbench_init(pg: &PgCluster, db: &TestDb) {
    let (ok, _, err) = run(
        Command::new("pgbench")
            .env("PGPASSWORD", &db.password)
            .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1"])
            .args(["-p", &pg.port().to_string(), "-U", &db.user, &db.name]),
        LIMIT,
    );
    assert!(ok, "pgbench -i: {err}");
}

/// pgbench through iampool, which must not fail; the most upstream backends seen meanwhile.
async fn bench_watching(port: u16, client: TestDb, upstream: &TestDb, args: &[&str]) -> i64 {
    let most = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (most, stop) = (most.clone(), stop.clone());
        let (name, user) = (upstream.name.clone(), upstream.user.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(
                    shared_cluster().backend_count(&name, &user),
                    Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let result = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pgbench(port, &client, &args)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let (processed, failed, out) = result.expect("pgbench ran");
    assert_eq!(failed, 0, "{out}");
    assert!(processed > 0, "{out}");
    most.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_pgbouncer_ini_serves_pgbench() {
    let pg = shared_cluster();
    let shop = pg.scratch_db("pgbi_shop");
    let reports = pg.scratch_db("pgbi_reports");
    let admin = pg.scratch_db("pgbi_admin");
    pgbench_init(pg, &shop);
    pgbench_init(pg, &reports);
    let scram = pg.psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = {}",
        quote_literal(&shop.user)
    ));
    let dir = tempfile::tempdir().unwrap();
    let socket_dir = dir.path().join("sockets");
    std::fs::create_dir(&socket_dir).unwrap();
    let userlist = dir.path().join("userlist.txt");
    // As PgBouncer's docs suggest for SCRAM servers: the shop user's verifier copied from
    // pg_authid; the reports user's plain password, which PgBouncer also signs in with.
    std::fs::write(
        &userlist,
        format!(
            "\"{}\" \"{}\"\n\"{}\" \"{}\"\n\"{}\" \"{}\" \"an ignored third field\"\n",
            shop.user,
            scram.trim(),
            reports.user,
            reports.password,
            admin.user,
            admin.password
        ),
    )
    .unwrap();
    let port = free_port();
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            ";; pgbouncer.ini of the shop
[databases]
shop = host=127.0.0.1 port={pg_port} dbname={shop_db} user={shop_user} password={shop_pw} pool_size=4
reports = host=127.0.0.1 port={pg_port} dbname={reports_db} user={reports_user} pool_mode=transaction pool_size=3 reserve_pool=2
* = host=127.0.0.1 port={pg_port}

[users]
{reports_user} = pool_mode=session max_user_connections=10

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {sockets}
auth_type = scram-sha-256
auth_file = {userlist}
admin_users = {admin_user}
pool_mode = session
default_pool_size = 20
max_client_conn = 200
server_lifetime = 600
server_idle_timeout = 30.5
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
reserve_pool_size = 3
query_timeout = 30
tcp_keepalive = 1
auth_hba_file = /etc/pgbouncer/pg_hba.conf
",
            pg_port = pg.port(),
            shop_db = shop.name,
            shop_user = shop.user,
            shop_pw = shop.password,
            reports_db = reports.name,
            reports_user = reports.user,
            sockets = socket_dir.display(),
            userlist = userlist.display(),
            admin_user = admin.user,
        ),
    )
    .unwrap();

    let out = dir.path().join("iampool.toml");
    let (ok, stdout, report) = run(
        Command::new(env!("CARGO_BIN_EXE_iampool"))
            .arg("import-pgbouncer")
            .arg(&ini)
            .arg("-o")
            .arg(&out),
        LIMIT,
    );
    assert!(ok, "import failed:\n{report}");
    assert!(stdout.is_empty(), "{stdout}");
    for secret in [
        &shop.password,
        &reports.password,
        &admin.password,
        &scram.trim().to_string(),
    ] {
        assert!(
            !report.contains(secret.as_str()),
            "a secret in the report:\n{report}"
        );
    }
    let section = |heading: &str| -> String {
        let start = report
            .find(heading)
            .unwrap_or_else(|| panic!("no {heading:?} in:\n{report}"));
        let rest = &report[start..];
        rest[..rest.find("\n\n").unwrap_or(rest.len())].to_string()
    };
    let carried = section("carried over (");
    for knob in [
        "reserve_pool_size = 3 -> reserve_pool_size = 3",
        "tcp_keepalive = 1 -> tcp_keepalive = true",
        "reports: reserve_pool=2 -> reserve_pool_size = 2",
    ] {
        assert!(carried.contains(knob), "{knob}:\n{report}");
    }
    assert!(
        report.contains("query_timeout = 30 -> query_timeout = "),
        "{report}"
    );
    let not_carried = section("not carried over (");
    for gone in [
        "auth_hba_file",
        "* (the fallback database)",
        "max_user_connections=10",
    ] {
        assert!(not_carried.contains(gone), "{gone}:\n{report}");
    }
    let not_needed = section("not needed by iampool");
    assert!(
        not_needed.contains("logfile") && not_needed.contains("pidfile"),
        "{report}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the file holds a server password");

    // The output loads with iampool's own loader, as PgBouncer had it.
    let out_path = out.to_str().unwrap();
    let config = Config::from_args(&["--config", out_path], &[])
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&out).unwrap()));
    assert_eq!(config.listen, [SocketAddr::from(([127, 0, 0, 1], port))]);
    assert_eq!(
        config.unix_socket_dir.as_deref(),
        Some(socket_dir.as_path())
    );
    assert_eq!(config.auth_type, AuthType::ScramSha256);
    assert_eq!(config.auth_file.as_deref(), Some(userlist.as_path()));
    assert_eq!(config.admin_users, std::slice::from_ref(&admin.user));
    assert_eq!(config.max_client_conn, 200);
    assert_eq!(config.server_idle_timeout, Duration::from_millis(30_500));
    let shop_pool = config.database("shop").expect("shop");
    assert_eq!(
        (shop_pool.pool_mode, shop_pool.pool_size),
        (PoolMode::Session, 4)
    );
    let reports_pool = config.database("reports").expect("reports");
    assert_eq!(
        (reports_pool.pool_mode, reports_pool.pool_size),
        (PoolMode::Transaction, 3)
    );
    assert_eq!(config.databases.len(), 2, "no database for *");

    // It serves: pgbench through each database, within each pool's size.
    let mut config = config;
    config.auth_failure_delay = Duration::ZERO;
    let iampool = start(config).await;
    assert_eq!(iampool.local_addr().port(), port);
    let as_client = |db: &TestDb, name: &str| TestDb {
        name: name.into(),
        user: db.user.clone(),
        password: db.password.clone(),
    };
    let most = bench_watching(
        port,
        as_client(&shop, "shop"),
        &shop,
        &["-c", "4", "-j", "2", "-T", "3", "-S"],
    )
    .await;
    assert!(
        (1..=4).contains(&most),
        "{most} backends for the shop's pool of 4"
    );
    let most = bench_watching(
        port,
        as_client(&reports, "reports"),
        &reports,
        &["-c", "12", "-j", "2", "-T", "3", "-M", "extended"],
    )
    .await;
    assert!(
        (1..=3).contains(&most),
        "{most} backends for the reports pool of 3"
    );

    // The unix socket, the admin console, and no fallback database.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(&socket_dir)
        .port(port)
        .user(&shop.user)
        .password(&shop.password)
        .dbname("shop")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("through the unix socket");
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), shop.name);
    let console = pooler::connect(addr, &as_client(&admin, "pgbouncer")).await;
    console
        .simple_query("SHOW VERSION")
        .await
        .expect("the admin console");
    let Err(err) = pooler::try_connect(addr, &as_client(&shop, &shop.name)).await else {
        panic!("a database not listed was served: there is no fallback database");
    };
    assert_eq!(pooler::code(&err), "3D000", "{err}");
    drop((client, console));
    assert!(iampool.shutdown().await);
}

#[test]
fn an_unknown_iampool_variable_is_a_warning_in_the_log_of_an_iampool_that_starts() {
    let pg = shared_cluster();
    let db = pg.scratch_db("pgbi_env");
    let upstream = format!(
        "postgres://{}:{}@127.0.0.1:{}/{}?sslmode=disable",
        db.user,
        db.password,
        pg.port(),
        db.name
    );
    let command = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_iampool"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("IAMPOOL_UPSTREAM", &upstream)
            .env("IAMPOOL_LISTEN", "127.0.0.1:0")
            .env("IAMPOOL_LOG_FORMAT", "json")
            .env("IAMPOOL_RELOAD_CHECK_INTERVAL", "0");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    };
    let mut child = command(&[
        ("IAMPOOL_BIN", "/usr/local/bin/iampool"),
        ("IAMPOOL_DEFAULT_POOL_SIZE", "5"),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn iampool");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + LIMIT;
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("iampool ready")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("iampool did not get ready:\n{}", log.join("\n"));
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warning = |var: &str| -> serde_json::Value {
        log.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["level"] == "WARN" && v["fields"]["source"] == var)
            .unwrap_or_else(|| panic!("no warning about {var}:\n{}", log.join("\n")))
    };
    let bin = warning("IAMPOOL_BIN");
    assert_eq!(
        bin["fields"]["message"],
        "unknown environment variable, ignored"
    );
    let pool = warning("IAMPOOL_DEFAULT_POOL_SIZE");
    assert_eq!(
        pool["fields"]["fix"],
        "PgBouncer's default_pool_size is iampool's IAMPOOL_POOL_SIZE"
    );

    // A key in the wrong place still stops the start, naming it.
    let (ok, _, err) = run(&mut command(&[("IAMPOOL_AUTH", "iam")]), LIMIT);
    assert!(!ok);
    assert!(
        err.contains("IAMPOOL_AUTH") && err.contains("?auth=iam"),
        "{err}"
    );
}
