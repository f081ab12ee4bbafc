//! Observability end to end: the metrics move as they should under pgbench load, a real
//! Prometheus (Debian's package) scrapes iampool and answers every query of the Grafana
//! dashboard with data, SIGTERM drains with /readyz going 503 while /metrics still answers,
//! and SIGHUP applies a new pool_size without dropping a connected client.
//!
//! Scenarios that signal the process or need AWS credentials from the environment run the
//! real binary as a subprocess (see tests/it/iam.rs for why the environment forces that).
//! Deadlines here are hang guards, never assertions about speed.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use iampool::config::{Secret, UserSecret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pooler::{self, run, start, try_connect};
use crate::support::fake_aws::{derive_key, FakeEcs};
use crate::support::pg::{shared_cluster, PgCluster, TestDb};
use crate::support::rds::{RdsOptions, RdsPg};

/// Hang guard for one step (a login, a scrape, a poll loop).
const T: Duration = Duration::from_secs(60);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/grafana/iampool-dashboard.json"
);
/// What `$__rate_interval` becomes: wide enough to cover the whole load phase, so a rate
/// evaluated just after the load still sees it.
const RATE_INTERVAL: &str = "30s";

// ---------------------------------------------------------------------------------------------
// HTTP and the exposition format

/// `GET path` over HTTP/1.0 (so no chunked bodies); (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

/// `METHOD path` over HTTP/1.0 with an empty body; (status, body).
async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("HTTP request timed out")))
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "/metrics: {body}");
    body
}

/// The sum of every sample of `name` whose labels include all of `labels`; None if no
/// sample matches.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some(parts) => parts,
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest.trim_start()),
            None => continue,
        };
        let matches = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        if matches {
            if let Ok(v) = value.trim().parse::<f64>() {
                *total.get_or_insert(0.0) += v;
            }
        }
    }
    total
}

/// Polls `/metrics` until `done` holds; the last scrape either way.
async fn scrape_until(addr: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let text = scrape(addr).await;
        if done(&text) || Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `promtool check metrics` on `text`, bounded; (success, stdout + stderr).
fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool (scripts/setup.sh installs Debian's prometheus)");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let deadline = Instant::now() + T;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("promtool check metrics did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = writer.join();
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------------------------
// Subprocesses: iampool, Prometheus

/// A long-running child (iampool or Prometheus) with its log in a temp dir; killed on drop,
/// its log shown if the test failed.
struct Daemon {
    name: &'static str,
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, dir: tempfile::TempDir) -> Daemon {
        let log = dir.path().join("log");
        cmd.stdin(Stdio::null())
            .stdout(File::create(&log).expect("log file"))
            .stderr(File::options().append(true).open(&log).expect("log file"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon { name, child, dir }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    fn log(&self) -> String {
        let raw = fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        strip_ansi(&raw)
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped while `self` lives.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.name);
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit (hang guard `limit`).
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls until `addr` answers `path` with `status`, or panics with the log.
    async fn wait_http(&mut self, addr: SocketAddr, path: &str, status: u16) {
        let deadline = Instant::now() + T;
        loop {
            if let Some(s) = self.exited() {
                panic!("{} exited ({s}):\n{}", self.name, self.log());
            }
            if matches!(http_get(addr, path).await, Ok((code, _)) if code == status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never answered {path} with {status}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the log until it has a line holding every one of `needles`.
    async fn wait_log_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + T;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}\n---- end ----", self.name, self.log());
        }
    }
}

/// tracing's text format colours field names even into a file.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// The iampool binary as a subprocess: a clean environment plus `env`, a temp HOME.
struct Iampool {
    daemon: Daemon,
    port: u16,
    metrics: SocketAddr,
}

impl Iampool {
    /// Starts `iampool ARGS`, with `--listen` and `--metrics-listen` on free ports unless
    /// `ports` fixes them (then `args` names them itself, e.g. in a config file), and waits
    /// until /healthz answers. Retries on a port taken meanwhile.
    async fn start(
        args: impl Fn(u16, u16) -> Vec<String>,
        env: &[(&str, String)],
        flags_for_ports: bool,
    ) -> Iampool {
        let env = |_, _| {
            env.iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        Iampool::launch(args, env, flags_for_ports).await
    }

    /// As `start`, with an environment that may name the ports (listen, metrics).
    async fn launch(
        args: impl Fn(u16, u16) -> Vec<String>,
        env: impl Fn(u16, u16) -> Vec<(String, String)>,
        flags_for_ports: bool,
    ) -> Iampool {
        for _ in 0..5 {
            let (port, mport) = (free_port(), free_port());
            let dir = temp_dir("iampool-obs-");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_iampool"));
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", dir.path())
                .env("LC_ALL", "C")
                .env("AWS_EC2_METADATA_DISABLED", "true");
            for (k, v) in env(port, mport) {
                cmd.env(k, v);
            }
            cmd.args(args(port, mport));
            if flags_for_ports {
                cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                    .args(["--metrics-listen", &format!("127.0.0.1:{mport}")]);
            }
            let mut daemon = Daemon::spawn("iampool", cmd, dir);
            let metrics = local(mport);
            let deadline = Instant::now() + T;
            loop {
                if let Some(status) = daemon.exited() {
                    let log = daemon.log();
                    if log.contains("in use") {
                        break;
                    }
                    panic!("iampool exited ({status}) at start:\n{log}");
                }
                if matches!(http_get(metrics, "/healthz").await, Ok((200, _)))
                    && tokio::net::TcpStream::connect(local(port)).await.is_ok()
                {
                    return Iampool {
                        daemon,
                        port,
                        metrics,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "iampool not listening:\n{}",
                    daemon.log()
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        panic!("iampool did not start: every port tried was in use");
    }

    fn addr(&self) -> SocketAddr {
        local(self.port)
    }
}

/// Prometheus from Debian's package, scraping `targets` every second.
struct Prometheus {
    daemon: Daemon,
    addr: SocketAddr,
}

impl Prometheus {
    async fn start(targets: &[SocketAddr]) -> Prometheus {
        for _ in 0..5 {
            let dir = temp_dir("iampool-prometheus-");
            let config = dir.path().join("prometheus.yml");
            let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            fs::write(
                &config,
                format!(
                    "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                     scrape_configs:\n  - job_name: iampool\n    static_configs:\n      \
                     - targets: [{}]\n",
                    list.join(", ")
                ),
            )
            .expect("prometheus.yml");
            let port = free_port();
            let mut cmd = Command::new("prometheus");
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .current_dir(dir.path());
            let mut daemon = Daemon::spawn("prometheus", cmd, dir);
            let addr = local(port);
            let deadline = Instant::now() + T;
            loop {
                if let Some(status) = daemon.exited() {
                    let log = daemon.log();
                    if log.contains("address already in use") {
                        break;
                    }
                    panic!("prometheus exited ({status}):\n{log}");
                }
                if matches!(http_get(addr, "/-/ready").await, Ok((200, _))) {
                    return Prometheus { daemon, addr };
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready:\n{}",
                    daemon.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("prometheus did not start: every port tried was in use");
    }

    /// An instant query; the `data.result` array.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let q = percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={q}"))
            .await
            .expect("Prometheus query");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Prometheus answer is not JSON ({e}): {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "query {expr} failed: {body}"
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Test data

/// `pgbench -i -s 1` straight into `db`, as its owner.
fn pgbench_init(pg: &PgCluster, db: &TestDb) {
    let (ok, _, err) = run(
        Command::new("pgbench")
            .env("PGPASSWORD", &db.password)
            .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1"])
            .args(["-p", &pg.port().to_string(), "-U", &db.user, &db.name]),
        Duration::from_secs(120),
    );
    assert!(ok, "pgbench -i: {err}");
}

/// pgbench through iampool on a blocking thread: (processed, failed, output).
fn pgbench_bg(
    port: u16,
    db: &TestDb,
    args: &'static [&'static str],
) -> tokio::task::JoinHandle<(u64, u64, String)> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || crate::pgbench::pgbench(port, &db, args))
}

fn upstream_url(pg: &PgCluster, user: &str, password: &str, db: &str) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!(
        "postgres://{}:{}@127.0.0.1:{}/{}?sslmode=disable",
        enc(user),
        enc(password),
        pg.port(),
        enc(db)
    )
}

/// A client straight to PostgreSQL, bypassing iampool.
async fn direct(pg: &PgCluster, db: &TestDb) -> tokio_postgres::Client {
    try_connect(pg.addr(), db)
        .await
        .expect("direct connection to PostgreSQL")
}

/// Connects through an iampool subprocess as `db`'s user.
async fn through(iampool: &Iampool, db: &TestDb) -> tokio_postgres::Client {
    match try_connect(iampool.addr(), db).await {
        Ok(c) => c,
        Err(e) => panic!("connect through iampool: {e:?}\n{}", iampool.daemon.log()),
    }
}

// ---------------------------------------------------------------------------------------------
// a. The metrics move under load

/// pool_size 5 and 50 pgbench clients: clients wait, the wait histogram grows, transactions
/// are counted; a pool whose upstream password is wrong counts login failures under SQLSTATE
/// class 28; and the exposition passes `promtool check metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_pgbench_load() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_load");
    let bad = pg.scratch_db("obs_badpw");
    pgbench_init(pg, &db);

    let mut cfg = pooler::config(pg, &db);
    cfg.databases[0].pool_size = 5;
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut wrong = cfg.databases[0].clone();
    wrong.name = bad.name.clone();
    wrong.upstream.user = bad.user.clone();
    wrong.upstream.dbname = bad.name.clone();
    wrong.upstream.password = Some(Secret::new("not-the-password".to_owned()));
    cfg.databases.push(wrong);
    cfg.users.insert(
        bad.user.clone(),
        UserSecret::Plain(Secret::new(bad.password.clone())),
    );
    let iam = start(cfg).await;
    let maddr = iam.metrics_addr().expect("metrics listener");

    let before = scrape(maddr).await;
    let name = db.name.as_str();
    let pool = [("database", name)];
    let wait_count = |t: &str| sample(t, "iampool_client_wait_seconds_count", &pool).unwrap_or(0.0);
    let count_before = wait_count(&before);

    let bench = pgbench_bg(
        iam.local_addr().port(),
        &db,
        &["-c", "50", "-j", "2", "-T", "5"],
    );
    let (mut max_waiting, mut counts) = (0.0f64, Vec::new());
    while !bench.is_finished() {
        let text = scrape(maddr).await;
        let waiting = sample(
            &text,
            "iampool_pool_clients",
            &[("database", name), ("state", "waiting")],
        );
        max_waiting = max_waiting.max(waiting.expect("a waiting-clients gauge for the pool"));
        counts.push(wait_count(&text));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (processed, failed, out) = bench.await.expect("pgbench thread");
    assert_eq!(failed, 0, "{out}");
    assert!(processed > 0, "{out}");

    // A transaction is counted when its server is unlinked, a moment after the client saw
    // its ReadyForQuery.
    let transactions = |t: &str| sample(t, "iampool_transactions_total", &pool).unwrap_or(0.0);
    let after = scrape_until(maddr, |t| transactions(t) >= processed as f64).await;
    println!(
        "load: {processed} transactions; max waiting {max_waiting}; wait count {count_before} -> {}",
        wait_count(&after)
    );
    assert!(
        max_waiting > 0.0,
        "50 clients on 5 servers: some scrape saw waiting clients"
    );
    assert!(
        counts.windows(2).any(|w| w[1] > w[0]),
        "the wait histogram grew during the run: {counts:?}"
    );
    assert!(wait_count(&after) > count_before);
    assert!(
        transactions(&after) >= processed as f64,
        "every transaction pgbench finished is counted: {} < {processed}",
        transactions(&after)
    );
    assert_eq!(sample(&after, "iampool_pool_size_limit", &pool), Some(5.0));

    // The wrong upstream password: the client is refused, the failure counted as class 28.
    let err = try_connect(iam.local_addr(), &bad)
        .await
        .expect_err("an upstream login with a wrong password fails");
    println!("wrong upstream password, client sees: {err:?}");
    let bad_class = [("database", bad.name.as_str()), ("class", "28")];
    let text = scrape_until(maddr, |t| {
        sample(t, "iampool_server_login_failures_total", &bad_class).unwrap_or(0.0) >= 1.0
    })
    .await;
    assert!(
        sample(&text, "iampool_server_login_failures_total", &bad_class).unwrap_or(0.0) >= 1.0,
        "login failures under class 28:\n{text}"
    );
    // Failure classes exist from the start at 0 (so rate() sees the first one); the good
    // pool's all stay there.
    let good_failures: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("iampool_server_login_failures_total{")
                && l.contains(&format!("database=\"{name}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(good_failures, 0.0, "no failure for the good pool:\n{text}");

    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool check metrics:\n{report}\n{text}");
    assert!(iam.shutdown().await);
}

// ---------------------------------------------------------------------------------------------
// b. Prometheus answers every dashboard query

/// Every PromQL expression of the dashboard's panels, with Grafana's variables substituted.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = fs::read_to_string(DASHBOARD).expect("read the dashboard JSON");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out.into_iter()
        .map(|(title, expr)| {
            let expr = expr
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("${database}", ".*")
                .replace("$database", ".*")
                .replace("${instance}", ".*")
                .replace("$instance", ".*");
            assert!(
                !expr.contains('$'),
                "unsubstituted variable in {title}: {expr}"
            );
            (title, expr)
        })
        .collect()
}

/// True when some series of `result` has a finite value (not NaN, not ±Inf).
fn has_finite(result: &[serde_json::Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// Keeps one IAM client querying (server_lifetime forces new server logins, so tokens are
/// requested, signed and cached all along) until `stop`.
fn iam_traffic(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(addr.port())
            .user("app")
            .password("app-client-password")
            .dbname("app")
            .connect_timeout(Duration::from_secs(20))
            .connect(tokio_postgres::NoTls)
            .await
            .expect("IAM client through iampool");
        tokio::spawn(conn);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            tokio::time::timeout(T, client.simple_query("SELECT current_user"))
                .await
                .expect("IAM query hung")
                .expect("IAM query through iampool");
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    })
}

/// A real Prometheus scrapes one iampool with three pools (pgbench load, an IAM upstream
/// with expiring container credentials, a wrong password); then every expression of the
/// Grafana dashboard, evaluated through the HTTP API, returns data with a finite value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_dashboard_query() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());

    let pg = shared_cluster();
    let db = pg.scratch_db("obs_prom");
    let bad = pg.scratch_db("obs_prom_bad");
    pgbench_init(pg, &db);

    // IAM: an RDS-like server that checks tokens; credentials that expire (container).
    let ttl = Duration::from_secs(3600);
    let ecs = FakeEcs::start(ttl).await;
    let rds = RdsPg::start(RdsOptions::default());
    rds.create_iam_user("app");
    // The key the fake will issue first, announced with an expiry no later than its own.
    let expiry = (SystemTime::now() + ttl)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    rds.set_issued_keys(&[derive_key(
        "ecs",
        0,
        SystemTime::UNIX_EPOCH + Duration::from_secs(expiry),
    )]);

    let dir = temp_dir("iampool-obs-config-");
    let config = dir.path().join("iampool.toml");
    fs::write(
        &config,
        format!(
            r#"server_lifetime = "2s"
server_lifetime_jitter = "0"
token_lifetime = "10s"
server_login_retry = "500ms"

[users.app]
password = "app-client-password"

[databases.{bench}]
upstream = "{bench_url}"
pool_size = 5

[databases.{bad}]
upstream = "{bad_url}"

[databases.app]
upstream = "{iam_url}"
pool_size = 2
"#,
            bench = db.name,
            bench_url = upstream_url(pg, &db.user, &db.password, &db.name),
            bad = bad.name,
            bad_url = upstream_url(pg, &bad.user, "not-the-password", &bad.name),
            iam_url = rds.upstream_url("app", ""),
        ),
    )
    .expect("write config");
    let config_arg = config.display().to_string();
    let iampool = Iampool::start(
        |_, _| vec!["--config".to_owned(), config_arg.clone()],
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", ecs.uri())],
        true,
    )
    .await;
    let prometheus = Prometheus::start(&[iampool.metrics]).await;
    let deadline = Instant::now() + T;
    while prometheus
        .query("up{job=\"iampool\"} == 1")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped iampool:\n{}",
            prometheus.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let iam = iam_traffic(iampool.addr(), stop.clone());
    // Failed client logins (a wrong password) and a pool whose upstream refuses its password.
    let mut wrong = db.clone();
    wrong.password = "wrong-client-password".to_owned();
    let err = try_connect(iampool.addr(), &wrong)
        .await
        .expect_err("wrong password refused");
    assert_eq!(pooler::code(&err), "28P01", "{err:?}");
    assert!(try_connect(iampool.addr(), &bad).await.is_err());

    let bench = pgbench_bg(iampool.port, &db, &["-c", "50", "-j", "2", "-T", "8"]);
    let (processed, failed, out) = bench.await.expect("pgbench thread");
    assert_eq!(failed, 0, "{out}");
    assert!(processed > 0, "{out}");

    // Every panel query, retried until it answers (Prometheus scrapes once a second).
    let mut missing = Vec::new();
    for (title, expr) in &queries {
        let deadline = Instant::now() + Duration::from_secs(30);
        let result = loop {
            let result = prometheus.query(expr).await;
            if has_finite(&result) || Instant::now() >= deadline {
                break result;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        println!(
            "{title}: {expr}\n    -> {}",
            serde_json::Value::from(result.clone())
        );
        if !has_finite(&result) {
            missing.push(format!("{title}: {expr} -> {result:?}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let iam_queries = iam.await.expect("IAM traffic task");
    assert!(iam_queries > 0);
    assert!(
        missing.is_empty(),
        "dashboard queries without data:\n{}\n\nlast scrape:\n{}",
        missing.join("\n"),
        scrape(iampool.metrics).await
    );
    drop(prometheus);
    assert!(
        rds.stats().accepted > 0,
        "the IAM pool signed in with tokens"
    );
}

// ---------------------------------------------------------------------------------------------
// c. SIGTERM drains

/// `iampool --upstream URL` for `db` on free ports with `extra` flags.
async fn iampool_for(pg: &PgCluster, db: &TestDb, extra: &[&str]) -> Iampool {
    let url = upstream_url(pg, &db.user, &db.password, &db.name);
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Iampool::start(
        |_, _| {
            let mut a = vec!["--upstream".to_owned(), url.clone()];
            a.extend(extra.iter().cloned());
            a
        },
        &[],
        true,
    )
    .await
}

fn create_table(pg: &PgCluster, db: &TestDb) {
    pg.psql_db(
        &db.name,
        &format!(
            "CREATE TABLE drained (id int PRIMARY KEY); ALTER TABLE drained OWNER TO {};",
            crate::support::pg::quote_ident(&db.user)
        ),
    );
}

/// Rows in `create_table`'s table, read directly from PostgreSQL.
async fn drained_rows(pg: &PgCluster, db: &TestDb) -> i64 {
    direct(pg, db)
        .await
        .query_one("SELECT count(*) FROM drained", &[])
        .await
        .unwrap()
        .get(0)
}

/// A transaction in flight survives SIGTERM: /readyz turns 503 while /metrics still answers,
/// no new client gets in, COMMIT succeeds on the same connection, the row is there, and the
/// process exits 0 once the client is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_transaction_in_flight_then_exits_zero() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_drain");
    create_table(pg, &db);
    let mut iampool = iampool_for(pg, &db, &["--shutdown-timeout", "120s"]).await;
    iampool
        .daemon
        .wait_http(iampool.metrics, "/readyz", 200)
        .await;

    let client = through(&iampool, &db).await;
    client
        .batch_execute("BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .expect("BEGIN; INSERT");
    iampool.daemon.signal(libc::SIGTERM);
    iampool
        .daemon
        .wait_http(iampool.metrics, "/readyz", 503)
        .await;
    let (status, body) = http_get(iampool.metrics, "/metrics")
        .await
        .expect("/metrics");
    assert_eq!(status, 200, "/metrics answers while draining");
    assert!(
        sample(&body, "iampool_pool_clients", &[("state", "active")]) == Some(1.0),
        "the client in its transaction is still active:\n{body}"
    );
    assert!(
        try_connect(iampool.addr(), &db).await.is_err(),
        "no new client while draining"
    );
    assert_eq!(
        iampool.daemon.exited(),
        None,
        "still running for the open transaction"
    );

    client
        .batch_execute("COMMIT")
        .await
        .expect("COMMIT while draining");
    drop(client);
    let status = iampool.daemon.wait_exit(T).await;
    assert!(status.success(), "exit {status}:\n{}", iampool.daemon.log());

    assert_eq!(drained_rows(pg, &db).await, 1, "the committed row is there");
}

/// A second SIGTERM during the drain exits at once, without waiting for the open transaction
/// (shutdown_timeout is far beyond the hang guard); the exit status is 1, and the client's
/// transaction is lost with its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_drain2");
    create_table(pg, &db);
    let mut iampool = iampool_for(pg, &db, &["--shutdown-timeout", "1h"]).await;
    let client = through(&iampool, &db).await;
    client
        .batch_execute("BEGIN; INSERT INTO drained VALUES (2)")
        .await
        .expect("BEGIN; INSERT");
    iampool.daemon.signal(libc::SIGTERM);
    iampool
        .daemon
        .wait_http(iampool.metrics, "/readyz", 503)
        .await;
    iampool.daemon.signal(libc::SIGTERM);
    let status = iampool.daemon.wait_exit(T).await;
    assert_eq!(status.code(), Some(1), "{}", iampool.daemon.log());
    assert!(iampool.daemon.log().contains("second signal"));
    assert!(client.batch_execute("COMMIT").await.is_err());
    assert_eq!(
        drained_rows(pg, &db).await,
        0,
        "the uncommitted row is gone"
    );
}

// ---------------------------------------------------------------------------------------------
// d. SIGHUP reloads

fn write_config(path: &Path, listen: u16, metrics: u16, pool_size: usize, url: &str, db: &str) {
    fs::write(
        path,
        format!(
            "listen = \"127.0.0.1:{listen}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
             pool_size = {pool_size}\n\n[databases.{db}]\nupstream = \"{url}\"\n"
        ),
    )
    .expect("write config");
}

/// pool_size changed in the file and SIGHUP: iampool_pool_size_limit shows the new value and
/// a client in the middle of a transaction keeps it. A changed `listen` is logged as needing
/// a restart, and the old address keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_pool_size_and_flags_listen_for_restart() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_reload");
    let url = upstream_url(pg, &db.user, &db.password, &db.name);
    let dir = temp_dir("iampool-obs-reload-");
    let config: PathBuf = dir.path().join("iampool.toml");
    let config_arg = config.display().to_string();
    let (name, url2) = (db.name.clone(), url.clone());
    let path = config.clone();
    let mut iampool = Iampool::start(
        move |port, mport| {
            write_config(&path, port, mport, 3, &url2, &name);
            vec!["--config".to_owned(), config_arg.clone()]
        },
        &[],
        false,
    )
    .await;
    let pool = [("database", db.name.as_str())];
    let limit = |t: &str| sample(t, "iampool_pool_size_limit", &pool);
    assert_eq!(limit(&scrape(iampool.metrics).await), Some(3.0));

    let client = through(&iampool, &db).await;
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let before: i64 = client
        .query_one("SELECT txid_current()::bigint", &[])
        .await
        .expect("txid")
        .get(0);

    write_config(
        &config,
        iampool.port,
        iampool.metrics.port(),
        7,
        &url,
        &db.name,
    );
    iampool.daemon.signal(libc::SIGHUP);
    let text = scrape_until(iampool.metrics, |t| limit(t) == Some(7.0)).await;
    assert_eq!(limit(&text), Some(7.0), "{}", iampool.daemon.log());
    let after: i64 = client
        .query_one("SELECT txid_current()::bigint", &[])
        .await
        .expect("the client's connection survives the reload")
        .get(0);
    assert_eq!(before, after, "same transaction on the same server");
    client.batch_execute("COMMIT").await.expect("COMMIT");

    let other = free_port();
    write_config(&config, other, iampool.metrics.port(), 7, &url, &db.name);
    iampool.daemon.signal(libc::SIGHUP);
    let line = iampool
        .daemon
        .wait_log_line(&["configuration reloaded", "needs_restart", "\"listen\""])
        .await;
    println!("reload with a new listen: {line}");
    assert!(iampool.daemon.exited().is_none());
    let again = through(&iampool, &db).await;
    again
        .simple_query("SELECT 1")
        .await
        .expect("old listen still serves");
    client
        .simple_query("SELECT 1")
        .await
        .expect("first client still connected");
}

// ---------------------------------------------------------------------------------------------
// e. Kubernetes: probes, the SIGTERM delay, /quitquitquit, configuration from the environment

/// SIGTERM with min_sigterm_delay: /readiness turns 503 while iampool still serves (a new
/// client gets in and works, /liveness stays 200); a second SIGTERM ends the delay early and
/// starts the drain, in which the transaction that was open all along still commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_delay_keeps_serving_while_not_ready_then_drains() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_delay");
    create_table(pg, &db);
    let mut iampool = iampool_for(
        pg,
        &db,
        &["--min-sigterm-delay", "1h", "--shutdown-timeout", "120s"],
    )
    .await;
    iampool
        .daemon
        .wait_http(iampool.metrics, "/readiness", 200)
        .await;
    let open = through(&iampool, &db).await;
    open.batch_execute("BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .expect("BEGIN; INSERT");

    iampool.daemon.signal(libc::SIGTERM);
    iampool
        .daemon
        .wait_http(iampool.metrics, "/readiness", 503)
        .await;
    assert_eq!(
        http_get(iampool.metrics, "/liveness")
            .await
            .expect("/liveness")
            .0,
        200
    );
    let late = through(&iampool, &db).await;
    late.batch_execute("INSERT INTO drained VALUES (2)")
        .await
        .expect("a client that came during the delay is served");
    drop(late);
    assert_eq!(iampool.daemon.exited(), None, "serving through the delay");

    iampool.daemon.signal(libc::SIGTERM);
    iampool
        .daemon
        .wait_log_line(&["second SIGTERM: draining now"])
        .await;
    let deadline = Instant::now() + T;
    while try_connect(iampool.addr(), &db).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting while draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open.batch_execute("COMMIT")
        .await
        .expect("COMMIT while draining");
    drop(open);
    let status = iampool.daemon.wait_exit(T).await;
    assert!(status.success(), "exit {status}:\n{}", iampool.daemon.log());
    assert_eq!(drained_rows(pg, &db).await, 2, "both rows committed");
}

/// A short min_sigterm_delay ends by itself: with no client left, iampool then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_delay_ends_by_itself() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_delay2");
    let mut iampool = iampool_for(pg, &db, &["--min-sigterm-delay", "200ms"]).await;
    iampool.daemon.signal(libc::SIGTERM);
    let status = iampool.daemon.wait_exit(T).await;
    assert!(status.success(), "exit {status}:\n{}", iampool.daemon.log());
    let log = iampool.daemon.log();
    assert!(log.contains("min_sigterm_delay over: draining"), "{log}");
}

/// /quitquitquit: 404 unless enabled; enabled, GET is 405 and POST (from 127.0.0.1) starts
/// the drain, and iampool exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_ends_iampool_only_when_enabled() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_quit");
    let off = iampool_for(pg, &db, &[]).await;
    let (status, _) = http_request(off.metrics, "POST", "/quitquitquit")
        .await
        .unwrap();
    assert_eq!(status, 404, "off by default");

    let mut on = iampool_for(pg, &db, &["--quitquitquit", "true"]).await;
    assert_eq!(http_get(on.metrics, "/quitquitquit").await.unwrap().0, 405);
    assert_eq!(on.daemon.exited(), None, "GET does not stop it");
    let (status, body) = http_request(on.metrics, "POST", "/quitquitquit")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let status = on.daemon.wait_exit(T).await;
    assert!(status.success(), "exit {status}:\n{}", on.daemon.log());
    assert!(on.daemon.log().contains("POST /quitquitquit: draining"));
    assert_eq!(off.daemon.log().matches("draining").count(), 0);
}

/// /startup stays 503 while the upstream refuses connections (so a native sidecar's
/// application does not start yet) and /liveness is 200 meanwhile; once the upstream takes
/// connections, iampool's own retries log in and /startup turns 200 with no client asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_probe_waits_for_the_first_upstream_login() {
    use crate::support::fault_proxy::{FaultProxy, NewConns};
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_startup");
    let proxy = FaultProxy::start(pg.addr()).await;
    proxy.set_new(NewConns::Refuse);
    let url = upstream_url(pg, &db.user, &db.password, &db.name)
        .replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port()));
    let mut iampool = Iampool::start(
        |_, _| {
            vec![
                "--upstream".into(),
                url.clone(),
                "--server-login-retry".into(),
                "100ms".into(),
            ]
        },
        &[],
        true,
    )
    .await;
    iampool
        .daemon
        .wait_log_line(&["not started yet: no upstream login has succeeded"])
        .await;
    assert_eq!(http_get(iampool.metrics, "/startup").await.unwrap().0, 503);
    assert_eq!(http_get(iampool.metrics, "/liveness").await.unwrap().0, 200);
    assert_eq!(
        http_get(iampool.metrics, "/readiness").await.unwrap().0,
        503
    );
    proxy.set_new(NewConns::Forward);
    iampool
        .daemon
        .wait_http(iampool.metrics, "/startup", 200)
        .await;
    iampool
        .daemon
        .wait_http(iampool.metrics, "/readiness", 200)
        .await;
}

/// Writes `contents` to `path` the way the kubelet updates a Secret volume: a new file
/// renamed over the old one.
fn replace_file(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    fs::write(&next, contents).expect("write");
    fs::rename(&next, path).expect("rename");
}

/// iampool with nothing but IAMPOOL_* variables (the upstream URL, password included, from
/// IAMPOOL_UPSTREAM_FILE as a mounted Secret would give it) serves pgbench; rotating the
/// password (ALTER ROLE, then the file) is picked up without a signal: the old password no
/// longer logs in, the new one does, and new server logins use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_only_configuration_serves_pgbench_and_follows_a_rotated_secret() {
    let pg = shared_cluster();
    let db = pg.scratch_db("obs_env");
    pgbench_init(pg, &db);
    let secrets = temp_dir("iampool-secret-");
    let url_file = secrets.path().join("upstream");
    fs::write(
        &url_file,
        format!("{}\n", upstream_url(pg, &db.user, &db.password, &db.name)),
    )
    .unwrap();
    let file = url_file.display().to_string();
    let iampool = Iampool::launch(
        |_, _| Vec::new(),
        |port, mport| {
            [
                ("IAMPOOL_UPSTREAM_FILE", file.clone()),
                ("IAMPOOL_LISTEN", format!("127.0.0.1:{port}")),
                ("IAMPOOL_METRICS_LISTEN", format!("127.0.0.1:{mport}")),
                ("IAMPOOL_POOL_SIZE", "3".into()),
                ("IAMPOOL_RELOAD_CHECK_INTERVAL", "100ms".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
        },
        false,
    )
    .await;
    let (processed, failed, _) =
        crate::pgbench::pgbench(iampool.port, &db, &["-c", "8", "-T", "3", "-n"]);
    assert!(
        processed > 0 && failed == 0,
        "{processed} processed, {failed} failed"
    );

    let rotated = format!("{}-rotated", db.password);
    pg.psql(&format!(
        "ALTER ROLE {} PASSWORD {}",
        crate::support::pg::quote_ident(&db.user),
        crate::support::pg::quote_literal(&rotated)
    ));
    replace_file(&url_file, &upstream_url(pg, &db.user, &rotated, &db.name));
    iampool
        .daemon
        .wait_log_line(&["configuration files changed: reloading", "upstream"])
        .await;
    iampool
        .daemon
        .wait_log_line(&["configuration reloaded"])
        .await;
    // Server logins from now on need the new password: close every server iampool has.
    pg.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {}",
        crate::support::pg::quote_literal(&db.name)
    ));
    let new_db = TestDb {
        password: rotated,
        ..db.clone()
    };
    let client = through(&iampool, &new_db).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "the new password logs in, and so does iampool");
    let old = try_connect(iampool.addr(), &db).await;
    assert!(old.is_err(), "the old password no longer logs in");
    let log = iampool.daemon.log();
    assert!(!log.contains(&db.password), "a password in the log:\n{log}");
}
