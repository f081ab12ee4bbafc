//! A real PgBouncer to compare iampool's admin console with: started from a given binary
//! with one (unreachable) database and a trust console, on a free port, as the `postgres`
//! OS user when the tests run as root. Stopped on drop.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The console user: in `admin_users`, signs in without a password.
pub const ADMIN: &str = "admin";

pub struct PgBouncer {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

/// `PgBouncer 1.25.2` from `bin --version`.
pub fn version(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{} --version: {e}", bin.display()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl PgBouncer {
    pub fn start(bin: &Path) -> PgBouncer {
        let dir = tempfile::Builder::new()
            .prefix("iampool-pgbouncer-")
            .tempdir_in("/tmp")
            .expect("temp dir for PgBouncer");
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let path = |name: &str| -> PathBuf { dir.path().join(name) };
        fs::write(path("users.txt"), format!("\"{ADMIN}\" \"\"\n")).unwrap();
        fs::write(
            path("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 app = host=127.0.0.1 port=9 dbname=app\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {}\n\
                 admin_users = {ADMIN}\n\
                 logfile = {}\n",
                path("users.txt").display(),
                path("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        let owner = crate::support::pg::server_uid_gid();
        if let Some((uid, gid)) = owner {
            for p in [
                dir.path().to_path_buf(),
                path("users.txt"),
                path("pgbouncer.ini"),
            ] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut cmd = Command::new(bin);
        cmd.arg(path("pgbouncer.ini"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(path("stderr.log")).unwrap());
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut bouncer = PgBouncer {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            dir,
        };
        bouncer.wait_ready();
        bouncer
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "PgBouncer did not start ({exited:?}): {}{}",
                    self.log("stderr.log"),
                    self.log("pgbouncer.log")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
