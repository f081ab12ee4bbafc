//! A throwaway PostgreSQL 15 cluster for integration tests: initdb, start, connect, stop.
//!
//! Orphan safety. Every running postmaster is paired with a watchdog: a tiny `sh` whose stdin
//! is a pipe whose only write end lives in this test process (std opens it close-on-exec, so no
//! other child inherits it). The normal paths (`stop`, `restart`, `Drop`) stop the postmaster
//! themselves and then write `disarm` to the pipe. If the test process dies any other way
//! (a `static` cluster at exit, a panic that aborts, SIGKILL, Ctrl-C), the kernel closes the
//! pipe, the watchdog reads EOF, shuts the postmaster down immediately (SIGQUIT, then SIGKILL)
//! and removes the temp dir. The watchdog and the postmaster run in their own process groups,
//! so a terminal's Ctrl-C reaches only the test process and the watchdog still gets to clean up.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Superuser password used when [`PgOptions::superuser_password`] is left at its default.
pub const DEFAULT_SUPERUSER_PASSWORD: &str = "iampool-test-superuser";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const LOG_FILE: &str = "postgres.log";
/// Temp dirs carry this prefix; the watchdog refuses to remove anything else.
const DIR_PREFIX: &str = "iampool-pg-";

/// `$1` = postmaster pid, `$2` = temp dir. Waits for one line on stdin; see the module docs.
const WATCHDOG: &str = r#"
read -r cmd
[ "$cmd" = disarm ] && exit 0
kill -QUIT "$1" 2>/dev/null
# Gone, or a zombie: an orphan's zombie may wait on an init that never reaps.
alive() { [ -r "/proc/$1/stat" ] && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }
n=0
while alive "$1" && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n+1)); done
kill -KILL "$1" 2>/dev/null
case "$2" in */iampool-pg-*) rm -rf "$2" ;; esac
"#;

/// How to build a cluster. `Default` gives the plain cluster most tests want.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub superuser_password: String,
    pub max_connections: u32,
    /// Lines appended to postgresql.conf after ours, so they win.
    pub extra_conf: Vec<String>,
    /// pg_hba.conf lines placed before the defaults, so they match first.
    pub hba: Vec<String>,
    /// (certificate, key) PEM files: copied into the data dir as `server.crt`/`server.key`,
    /// owned by the server user with mode 0600, and `ssl = on`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// (source, file name) pairs copied into the data dir (owned by the server user, mode
    /// 0600), e.g. a CA bundle for `ssl_ca_file`; refer to them by bare name in `extra_conf`.
    pub extra_files: Vec<(PathBuf, String)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            superuser_password: DEFAULT_SUPERUSER_PASSWORD.to_string(),
            max_connections: 200,
            extra_conf: Vec::new(),
            hba: Vec::new(),
            tls: None,
            extra_files: Vec::new(),
        }
    }
}

/// A login role plus a database it owns, made by [`PgCluster::scratch_db`].
#[derive(Clone, Debug)]
pub struct TestDb {
    pub name: String,
    pub user: String,
    pub password: String,
}

/// The OS user that owns and runs the cluster when the tests run as root.
#[derive(Clone, Copy, Debug)]
struct Owner {
    uid: u32,
    gid: u32,
}

struct Running {
    postmaster: Child,
    watchdog: Child,
    watchdog_pipe: ChildStdin,
}

/// One PostgreSQL cluster in its own temp dir, stopped and removed on drop.
pub struct PgCluster {
    opts: PgOptions,
    bin: PathBuf,
    owner: Option<Owner>,
    port: u16,
    root: tempfile::TempDir,
    data: PathBuf,
    running: Option<Running>,
}

/// The cluster shared by every test in this test binary. Tests stay independent by creating
/// their own roles and databases in it ([`PgCluster::scratch_db`]). It is never dropped; the
/// watchdog stops it and removes its files when the test process exits.
pub fn shared_cluster() -> &'static PgCluster {
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    SHARED.get_or_init(|| PgCluster::start(PgOptions::default()))
}

/// A name unique within this machine's test runs: `<prefix>_<pid>_<n>`, lower case.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}_{}_{n}", prefix.to_lowercase(), std::process::id())
}

/// `'text'` with quotes doubled, for SQL built by the harness.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `"name"` with quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

enum LaunchError {
    PortInUse,
    Failed(String),
}

impl PgCluster {
    /// initdb, configure and start a new cluster; panics (with the server log) if it cannot.
    pub fn start(opts: PgOptions) -> PgCluster {
        let cluster = PgCluster::unstarted(opts, pg_bindir(), server_owner());
        cluster.initdb();
        cluster.write_hba();
        cluster.install_files();
        cluster.launch_on_a_free_port("PostgreSQL")
    }

    /// A cluster directory of our own, owned by the server user, with nothing in it yet.
    fn unstarted(opts: PgOptions, bin: PathBuf, owner: Option<Owner>) -> PgCluster {
        let root = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(temp_base())
            .expect("create temp dir for PostgreSQL");
        let data = root.path().join("data");
        let cluster = PgCluster {
            opts,
            bin,
            owner,
            port: 0,
            root,
            data,
            running: None,
        };
        cluster.chown(cluster.root.path());
        cluster
    }

    /// Writes our settings for a free port and starts; another port if that one was taken.
    fn launch_on_a_free_port(mut self, what: &str) -> PgCluster {
        for _ in 0..5 {
            self.port = pick_port();
            self.write_conf();
            match self.launch() {
                Ok(()) => return self,
                Err(LaunchError::PortInUse) => continue,
                Err(LaunchError::Failed(why)) => panic!("{what} did not start: {why}"),
            }
        }
        panic!("{what} did not start: every port tried was in use");
    }

    /// A streaming hot standby of `primary` (pg_basebackup -R), started. The primary must let
    /// the superuser replicate over its socket: `local replication postgres trust` in `hba`.
    pub fn start_standby(primary: &PgCluster) -> PgCluster {
        let cluster =
            PgCluster::unstarted(primary.opts.clone(), primary.bin.clone(), primary.owner);
        let out = cluster
            .as_owner(&cluster.bin.join("pg_basebackup"))
            .arg("-D")
            .arg(&cluster.data)
            .arg("-h")
            .arg(primary.socket_dir())
            .args(["-p", &primary.port.to_string(), "-U", "postgres"])
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"])
            .output()
            .expect("spawn pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.launch_on_a_free_port("the standby")
    }

    /// `pg_ctl promote`: a standby becomes a primary (waits until it is).
    pub fn promote(&self) {
        let out = self
            .as_owner(&self.bin.join("pg_ctl"))
            .args(["promote", "-w", "-t", "30", "-D"])
            .arg(&self.data)
            .output()
            .expect("spawn pg_ctl promote");
        assert!(
            out.status.success(),
            "pg_ctl promote failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(20)
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Directory holding the `.s.PGSQL.<port>` unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.root.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    pub fn superuser_password(&self) -> &str {
        &self.opts.superuser_password
    }

    pub fn superuser_url(&self) -> String {
        self.url("postgres", &self.opts.superuser_password, "postgres")
    }

    /// `postgres://user:password@127.0.0.1:port/db?sslmode=disable`, percent-encoded.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}?sslmode=disable",
            url_encode(user),
            url_encode(password),
            self.port,
            url_encode(db)
        )
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.path().join(LOG_FILE)
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The running postmaster's pid, if any.
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.postmaster.id())
    }

    /// The running watchdog's pid, if any.
    pub fn watchdog_pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.watchdog.id())
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Connect over TCP without TLS; the connection task is spawned on the current runtime.
    pub async fn connect(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
        match self.try_connect(user, password, db).await {
            Ok(client) => client,
            Err(e) => panic!("connect as {user} to {db} on port {}: {e}", self.port),
        }
    }

    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Run SQL as the superuser in database `postgres`; see [`PgCluster::psql_db`].
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// Run SQL (one or more statements, fed on stdin) through psql over the unix socket as
    /// the superuser. Returns stdout in unaligned, tuples-only form (`SELECT 1` gives "1\n");
    /// panics with psql's stderr if any statement fails.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-f", "-"])
            .env_clear()
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        let script = sql.to_string();
        // A thread, so a long script cannot deadlock against psql's full stdout pipe.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(script.as_bytes());
        });
        let out = child.wait_with_output().expect("wait for psql");
        let _ = writer.join();
        if !out.status.success() {
            panic!(
                "psql failed ({}) running:\n{sql}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8(out.stdout).expect("psql output is UTF-8")
    }

    /// `CREATE ROLE name LOGIN PASSWORD '...'` (stored as SCRAM-SHA-256).
    pub fn create_user(&self, name: &str, password: &str, superuser: bool) {
        let superuser = if superuser { " SUPERUSER" } else { "" };
        self.psql(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {}{superuser};",
            quote_ident(name),
            quote_literal(password)
        ));
    }

    pub fn create_database(&self, name: &str, owner: &str) {
        self.psql(&format!(
            "CREATE DATABASE {} OWNER {};",
            quote_ident(name),
            quote_ident(owner)
        ));
    }

    /// A fresh role and a database it owns, both named from `prefix` and unique.
    pub fn scratch_db(&self, prefix: &str) -> TestDb {
        let name = unique_name(prefix);
        let db = TestDb {
            user: format!("{name}_user"),
            password: format!("{name}_pw"),
            name,
        };
        self.create_user(&db.user, &db.password, false);
        self.create_database(&db.name, &db.user);
        db
    }

    /// Client backends connected to `db` as `user`, not counting the harness's own query.
    pub fn backend_count(&self, db: &str, user: &str) -> i64 {
        let out = self.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = {} AND usename = {} \
             AND backend_type = 'client backend' AND pid <> pg_backend_pid();",
            quote_literal(db),
            quote_literal(user)
        ));
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("backend count {out:?}: {e}"))
    }

    /// Poll [`PgCluster::backend_count`] until `done(count)` holds; returns the last count
    /// (which fails `done` only when `timeout` ran out). Backends exit a moment after their
    /// client disconnects, so assertions about closes need this rather than one look.
    pub async fn wait_for_backends(
        &self,
        db: &str,
        user: &str,
        timeout: Duration,
        done: impl Fn(i64) -> bool,
    ) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.backend_count(db, user);
            if done(n) || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fast shutdown (sessions are terminated), then start again on the same port and data.
    pub fn restart(&mut self) {
        self.shutdown(libc::SIGINT);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return,
                // Someone took the port in between; it may be a short-lived client socket.
                Err(LaunchError::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(LaunchError::PortInUse) => panic!("restart: port {} stays in use", self.port),
                Err(LaunchError::Failed(why)) => panic!("PostgreSQL did not restart: {why}"),
            }
        }
    }

    /// Fast shutdown; the data dir stays until drop, and `restart` starts it again.
    pub fn stop(&mut self) {
        self.shutdown(libc::SIGINT);
    }

    fn initdb(&self) {
        let pwfile = self.root.path().join("pwfile");
        fs::write(&pwfile, format!("{}\n", self.opts.superuser_password)).expect("write pwfile");
        self.chown(&pwfile);
        let out = self
            .as_owner(&self.bin.join("initdb"))
            .arg("-D")
            .arg(&self.data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("spawn initdb");
        let _ = fs::remove_file(&pwfile);
        if !out.status.success() {
            panic!(
                "initdb failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn write_hba(&self) {
        let mut hba = String::from("# written by the iampool test harness\n");
        for line in &self.opts.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str("local all postgres trust\n");
        hba.push_str("host all all 127.0.0.1/32 scram-sha-256\n");
        hba.push_str("host all all ::1/128 scram-sha-256\n");
        self.write_data_file("pg_hba.conf", hba.as_bytes(), 0o600);
    }

    fn install_files(&self) {
        let mut files = self.opts.extra_files.clone();
        if let Some((cert, key)) = &self.opts.tls {
            files.push((cert.clone(), "server.crt".into()));
            files.push((key.clone(), "server.key".into()));
        }
        for (src, name) in files {
            let bytes = fs::read(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
            self.write_data_file(&name, &bytes, 0o600);
        }
        let conf = self.data.join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .expect("open postgresql.conf");
        writeln!(f, "\ninclude 'iampool_test.conf'").expect("append include");
    }

    /// Our settings, in a file of their own so a port change rewrites only this.
    fn write_conf(&self) {
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = {}\n\
             max_connections = {}\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = '32MB'\n\
             logging_collector = off\n\
             log_destination = 'stderr'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            self.port,
            quote_literal(&self.root.path().display().to_string()),
            self.opts.max_connections,
        );
        if self.opts.tls.is_some() {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for line in &self.opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        self.write_data_file("iampool_test.conf", conf.as_bytes(), 0o600);
    }

    fn write_data_file(&self, name: &str, bytes: &[u8], mode: u32) {
        let path = self.data.join(name);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        self.chown(&path);
    }

    /// Start the postmaster and its watchdog, and wait until it takes TCP connections.
    fn launch(&mut self) -> Result<(), LaunchError> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open server log");
        let log_start = log.seek(SeekFrom::End(0)).expect("seek log");
        let postmaster = self
            .as_owner(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .process_group(0)
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log.try_clone().expect("dup log"))
            .spawn()
            .expect("spawn postgres");
        let mut watchdog = Command::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("iampool-pg-watchdog")
            .arg(postmaster.id().to_string())
            .arg(self.root.path())
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn watchdog sh");
        let watchdog_pipe = watchdog.stdin.take().expect("watchdog stdin");
        self.running = Some(Running {
            postmaster,
            watchdog,
            watchdog_pipe,
        });
        let outcome = self.wait_ready(log_start);
        if outcome.is_err() {
            self.shutdown(libc::SIGQUIT);
        }
        outcome
    }

    fn wait_ready(&mut self, log_start: u64) -> Result<(), LaunchError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.log_since(log_start);
            let exited = self
                .running
                .as_mut()
                .and_then(|r| r.postmaster.try_wait().ok().flatten());
            if let Some(status) = exited {
                if log.contains("could not create any TCP/IP sockets") {
                    return Err(LaunchError::PortInUse);
                }
                return Err(LaunchError::Failed(format!(
                    "postgres exited ({status}):\n{log}"
                )));
            }
            // A hot standby says "ready to accept read-only connections".
            if (log.contains("database system is ready to accept connections")
                || log.contains("database system is ready to accept read-only connections"))
                && TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Failed(format!(
                    "not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.log_tail(40)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
        }
        text
    }

    /// Signal the postmaster (SIGINT = fast, SIGQUIT = immediate), reap it (SIGKILL if it
    /// overstays), then disarm the watchdog. Best effort: it also runs inside Drop.
    fn shutdown(&mut self, signal: libc::c_int) {
        let Some(mut run) = self.running.take() else {
            return;
        };
        let pid = run.postmaster.id() as libc::pid_t;
        // Safe against pid reuse: the child is not reaped until wait_timeout sees it exit.
        unsafe { libc::kill(pid, signal) };
        if wait_timeout(&mut run.postmaster, STOP_TIMEOUT).is_none() {
            let _ = run.postmaster.kill();
            let _ = run.postmaster.wait();
        }
        let _ = run.watchdog_pipe.write_all(b"disarm\n");
        drop(run.watchdog_pipe);
        if wait_timeout(&mut run.watchdog, Duration::from_secs(5)).is_none() {
            let _ = run.watchdog.kill();
            let _ = run.watchdog.wait();
        }
    }

    /// A command that runs as the server's OS user (`postgres` when we are root).
    fn as_owner(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.root.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some(owner) = self.owner {
            // std also drops root's supplementary groups when it switches uid.
            cmd.uid(owner.uid).gid(owner.gid);
        }
        cmd
    }

    fn chown(&self, path: &Path) {
        if let Some(owner) = self.owner {
            std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.shutdown(libc::SIGQUIT);
        // The TempDir field then removes the directory.
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// A port nobody listens on right now, never handed out twice by this process.
fn pick_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
}

/// Where the PostgreSQL binaries live: `IAMPOOL_PG_BINDIR`, Debian's path, or `PATH`.
fn pg_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IAMPOOL_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let debian = Path::new("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").is_file() {
        return debian.to_path_buf();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
            return dir;
        }
    }
    panic!(
        "PostgreSQL 15 server binaries (initdb, postgres) not found: run scripts/setup.sh \
         or set IAMPOOL_PG_BINDIR"
    );
}

/// PostgreSQL refuses to run as root, so as root the cluster belongs to OS user `postgres`.
/// The OS user (uid, gid) that servers run as when the tests run as root: `postgres`.
/// PgBouncer, like PostgreSQL, refuses to run as root.
pub fn server_uid_gid() -> Option<(u32, u32)> {
    server_owner().map(|o| (o.uid, o.gid))
}

fn server_owner() -> Option<Owner> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == "postgres" {
            let uid = fields[2].parse().expect("postgres uid");
            let gid = fields[3].parse().expect("postgres gid");
            return Some(Owner { uid, gid });
        }
    }
    panic!("running as root, but OS user `postgres` does not exist: run scripts/setup.sh");
}

/// `TMPDIR`, unless that would push the unix socket path past its ~107-byte limit.
fn temp_base() -> PathBuf {
    let base = std::env::temp_dir();
    if base.as_os_str().len() > 60 {
        PathBuf::from("/tmp")
    } else {
        base
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
