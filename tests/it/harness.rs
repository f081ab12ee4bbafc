//! Tests of the test harness itself: the PostgreSQL the other suites stand on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::pg::{shared_cluster, PgCluster, PgOptions};

#[tokio::test]
async fn shared_cluster_accepts_superuser_login_with_expected_settings() {
    let pg = shared_cluster();
    let client = pg
        .connect("postgres", pg.superuser_password(), "postgres")
        .await;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        (150000..160000).contains(&version),
        "server_version_num {version}"
    );
    for (name, want) in [
        ("password_encryption", "scram-sha-256"),
        ("fsync", "off"),
        ("listen_addresses", "127.0.0.1"),
        ("max_connections", "200"),
        ("server_encoding", "UTF8"),
    ] {
        let row = client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), want, "setting {name}");
    }
    assert_eq!(pg.psql("SELECT 1; SELECT 'two';"), "1\ntwo\n");
    assert!(pg.superuser_url().contains(&format!(
        "@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    )));
}

#[tokio::test]
async fn scratch_db_user_logs_in_with_scram_and_wrong_password_fails() {
    let pg = shared_cluster();
    let db = pg.scratch_db("harness_scram");
    let client = pg.connect(&db.user, &db.password, &db.name).await;
    client
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42);")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, (SELECT x FROM t)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db.user);
    assert_eq!(row.get::<_, String>(1), db.name);
    assert_eq!(row.get::<_, i32>(2), 42);
    let stored = pg.psql(&format!(
        "SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = '{}'",
        db.user
    ));
    assert_eq!(stored.trim(), "SCRAM-SHA-256$");

    let err = pg
        .try_connect(&db.user, "wrong", &db.name)
        .await
        .expect_err("wrong password must fail");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );
}

#[tokio::test]
async fn backend_count_follows_connections() {
    let pg = shared_cluster();
    let db = pg.scratch_db("harness_count");
    assert_eq!(pg.backend_count(&db.name, &db.user), 0);
    let a = pg.connect(&db.user, &db.password, &db.name).await;
    let b = pg.connect(&db.user, &db.password, &db.name).await;
    assert_eq!(pg.backend_count(&db.name, &db.user), 2);
    // The superuser's own connections elsewhere are not counted.
    assert_eq!(pg.backend_count(&db.name, "postgres"), 0);
    drop(a);
    let n = pg
        .wait_for_backends(&db.name, &db.user, Duration::from_secs(10), |n| n == 1)
        .await;
    assert_eq!(n, 1);
    b.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn restart_keeps_data_and_port() {
    let mut pg = PgCluster::start(PgOptions::default());
    let port = pg.port();
    let old_pid = pg.postmaster_pid().unwrap();
    pg.psql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here');");
    let client = pg
        .connect("postgres", pg.superuser_password(), "postgres")
        .await;

    pg.restart();
    assert_eq!(pg.port(), port);
    assert_ne!(pg.postmaster_pid().unwrap(), old_pid);
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "a session from before the restart must be gone"
    );
    assert_eq!(pg.psql("SELECT v FROM kept"), "still here\n");
    let client = pg
        .connect("postgres", pg.superuser_password(), "postgres")
        .await;
    client.simple_query("SELECT 1").await.unwrap();

    pg.stop();
    assert!(!pg.is_running());
    assert!(pg
        .try_connect("postgres", pg.superuser_password(), "postgres")
        .await
        .is_err());
    pg.restart();
    assert_eq!(pg.psql("SELECT count(*) FROM kept"), "1\n");
}

#[tokio::test]
async fn drop_leaves_no_postgres_process_or_files() {
    let pg = PgCluster::start(PgOptions::default());
    let _client = pg
        .connect("postgres", pg.superuser_password(), "postgres")
        .await;
    let postmaster = pg.postmaster_pid().unwrap();
    let mut pids = children_of(postmaster);
    assert!(
        !pids.is_empty(),
        "postmaster {postmaster} should have children"
    );
    pids.push(postmaster);
    pids.push(pg.watchdog_pid().unwrap());
    let root = pg.socket_dir().to_path_buf();
    let data = pg.data_dir().to_path_buf();

    drop(pg);
    for pid in &pids {
        assert!(!alive(*pid), "pid {pid} survived drop");
    }
    assert!(!root.exists(), "{} survived drop", root.display());
    assert_no_process_mentions(&data);
}

#[tokio::test]
async fn options_apply_tls_hba_conf_and_files() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_cert(certs.path());
    let mut opts = PgOptions {
        superuser_password: "other pw/with:specials".into(),
        max_connections: 23,
        ..PgOptions::default()
    };
    opts.tls = Some((cert.clone(), key));
    opts.hba
        .push("host all shut_out 127.0.0.1/32 reject".into());
    opts.extra_conf.push("work_mem = '7MB'".into());
    opts.extra_files.push((cert, "copied.pem".into()));
    let pg = PgCluster::start(opts);

    assert_eq!(pg.psql("SHOW ssl; SHOW max_connections;"), "on\n23\n");
    assert_eq!(pg.psql("SHOW work_mem"), "7MB\n");
    let mode = std::fs::metadata(pg.data_dir().join("server.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    assert!(pg.data_dir().join("copied.pem").is_file());

    pg.create_user("shut_out", "pw", false);
    let err = pg
        .try_connect("shut_out", "pw", "postgres")
        .await
        .expect_err("rejected by hba");
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("pg_hba.conf rejects"), "{err:?}");
    // The superuser password with URL-special characters works, as does its URL.
    let client = pg
        .connect("postgres", "other pw/with:specials", "postgres")
        .await;
    client.simple_query("SELECT 1").await.unwrap();
    assert!(pg.superuser_url().contains("other%20pw%2Fwith%3Aspecials"));
}

const CHILD_ENV: &str = "IAMPOOL_HARNESS_WATCHDOG_CHILD";

/// Runs twice: as the test, it re-runs itself in a child process with CHILD_ENV set; the
/// child starts a cluster, reports it, and SIGKILLs itself so no Drop or atexit can run.
#[test]
fn watchdog_stops_cluster_when_owner_is_killed() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let pg = PgCluster::start(PgOptions::default());
        println!(
            "CLUSTER pid={} root={}",
            pg.postmaster_pid().unwrap(),
            pg.socket_dir().display()
        );
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        // SAFETY: kill on our own pid; the point is to die without unwinding.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILL returned");
    }

    let test_name = format!(
        "{}::watchdog_stops_cluster_when_owner_is_killed",
        module_path!().split_once("::").unwrap().1
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            test_name.as_str(),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CLUSTER ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "child reported no cluster: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (pid, root) = line.split_once(' ').unwrap();
    let pid: u32 = pid.strip_prefix("pid=").unwrap().parse().unwrap();
    let root = PathBuf::from(root.strip_prefix("root=").unwrap());

    let deadline = Instant::now() + Duration::from_secs(20);
    while (alive(pid) || root.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(pid), "postmaster {pid} outlived its killed owner");
    assert!(
        !root.exists(),
        "{} outlived its killed owner",
        root.display()
    );
    assert_no_process_mentions(&root);
}

fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// Alive = exists and is not a zombie (an orphan's zombie may wait on a non-reaping init).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|(state, _)| state != "Z"),
        Err(_) => false,
    }
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat_fields(&stat).is_some_and(|(_, ppid)| ppid == parent) {
            pids.push(pid);
        }
    }
    pids
}

/// (state, ppid) from /proc/PID/stat; the command name may hold spaces, so split after ')'.
fn stat_fields(stat: &str) -> Option<(&str, u32)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn assert_no_process_mentions(path: &Path) {
    let out = Command::new("pgrep")
        .arg("-af")
        .arg(path)
        .output()
        .expect("run pgrep (procps; scripts/setup.sh installs it)");
    let found = String::from_utf8_lossy(&out.stdout);
    assert!(
        found.trim().is_empty(),
        "processes still mention {}:\n{found}",
        path.display()
    );
}
