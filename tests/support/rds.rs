//! A throwaway PostgreSQL that checks RDS IAM tokens the way RDS does: TLS with a certificate
//! for a fake RDS endpoint name, a role `rds_iam`, and PAM (`pam_exec`) running
//! `rds_iam_verifier.py` for every login of a user granted `rds_iam`.
//!
//! Layout. The PAM stack runs as the server's OS user (`postgres` when the tests run as root),
//! so the verifier, its key file and its logs live in a directory of their own under /tmp that
//! this user owns (0755, files 0644). The PAM service file `/etc/pam.d/<unique name>` is
//! written once the cluster has its port (the verifier checks it; PAM reads the file at each
//! login) and removed on drop.
//!
//! Counting. A small wrapper sits in front of the verifier: it reads the token from stdin,
//! runs the verifier on it in the same Python process, and appends `ok|reject <hash>` to
//! `tokens.log`, where `<hash>` is the first 16 hex digits of SHA-256 of the whole token. So
//! tests can count distinct tokens without any log holding a token. The verifier's own log
//! (one reason line per attempt) stays as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use super::certs::TestPki;
use super::fake_aws::{verifier_keys_json, IssuedKey};
use super::pg::{quote_ident, unique_name, PgCluster, PgOptions};

/// The fake endpoint name the server certificate is issued for and tokens are checked against.
pub const RDS_HOST: &str = "mydb.cluster-iampooltest.us-east-1.rds.amazonaws.com";
pub const RDS_REGION: &str = "us-east-1";

/// Static test credentials (the shape of long-term IAM user keys).
pub const STATIC_ACCESS_KEY_ID: &str = "AKIAIAMPOOLTEST00001";
pub const STATIC_SECRET_ACCESS_KEY: &str = "iampool/test/static+secret/0000000000000";

const VERIFIER_SOURCE: &str = include_str!("rds_iam_verifier.py");

/// Runs the verifier on the token and records a hash of it; see the module docs.
/// argv: tokens-log, then the verifier's own arguments.
const WRAPPER_SOURCE: &str = r#"import hashlib, io, os, sys
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rds_iam_verifier as verifier
raw = sys.stdin.buffer.read(65536)
token = raw.split(b"\0", 1)[0].split(b"\n", 1)[0].strip()
sys.stdin = io.TextIOWrapper(io.BytesIO(token + b"\n"), encoding="utf-8")
try:
    rc = verifier.main(sys.argv[2:])
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else 1
except Exception:
    rc = 1
with open(sys.argv[1], "a", encoding="utf-8") as f:
    f.write("%s %s\n" % ("ok" if rc == 0 else "reject", hashlib.sha256(token).hexdigest()[:16]))
sys.exit(0 if rc == 0 else 1)
"#;

/// How to build an RDS-like server; `Default` is the usual one.
#[derive(Clone, Debug)]
pub struct RdsOptions {
    /// Names on the server certificate (the first one names the files).
    pub cert_names: Vec<String>,
    /// The host name tokens must be signed for.
    pub verifier_host: String,
    pub region: String,
    pub max_connections: u32,
}

impl Default for RdsOptions {
    fn default() -> Self {
        RdsOptions {
            cert_names: vec![RDS_HOST.to_string()],
            verifier_host: RDS_HOST.to_string(),
            region: RDS_REGION.to_string(),
            max_connections: 200,
        }
    }
}

/// What the verifier has seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifierStats {
    pub accepted: usize,
    pub rejected: usize,
    /// Distinct tokens among the accepted logins.
    pub distinct_accepted_tokens: usize,
    /// Distinct tokens among all attempts.
    pub distinct_tokens: usize,
    /// Access key ids that signed accepted tokens.
    pub signers: BTreeSet<String>,
    /// The verifier's reason for each rejection, in order.
    pub reject_reasons: Vec<String>,
}

/// A PostgreSQL 15 cluster configured like RDS for IAM logins; see the module docs.
pub struct RdsPg {
    // Dropped in this order: the PAM file goes first (Drop::drop), then the server.
    pg: PgCluster,
    pki: TestPki,
    _cert_dir: tempfile::TempDir,
    pam_dir: tempfile::TempDir,
    pam_file: PathBuf,
    service: String,
    opts: RdsOptions,
    /// Seconds the verifier's clock is ahead of the real one (negative: behind).
    skew_seconds: i64,
}

impl RdsPg {
    pub fn start(opts: RdsOptions) -> RdsPg {
        let cert_dir = tempfile::Builder::new()
            .prefix("iampool-rds-certs-")
            .tempdir_in("/tmp")
            .expect("temp dir for certificates");
        let pki = TestPki::new(cert_dir.path());
        let names: Vec<&str> = opts.cert_names.iter().map(String::as_str).collect();
        let (cert, key) = pki.issue_server(cert_dir.path(), &names);

        let pam_dir = tempfile::Builder::new()
            .prefix("iampool-rds-pam-")
            .tempdir_in("/tmp")
            .expect("temp dir for the verifier");
        fs::set_permissions(pam_dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod verifier dir");
        let service = unique_name("iampool_rds");
        let rds = |name: &str| pam_dir.path().join(name);
        write_file(&rds("rds_iam_verifier.py"), VERIFIER_SOURCE, 0o644);
        write_file(&rds("wrapper.py"), WRAPPER_SOURCE, 0o644);
        write_file(&rds("keys.json"), "{}", 0o644);
        write_file(&rds("verifier.log"), "", 0o644);
        write_file(&rds("tokens.log"), "", 0o644);
        // The logs are appended to by the server's OS user.
        for p in [
            pam_dir.path().to_path_buf(),
            rds("verifier.log"),
            rds("tokens.log"),
        ] {
            chown_to_server_user(&p);
        }

        let pg = PgCluster::start(PgOptions {
            max_connections: opts.max_connections,
            hba: vec![
                format!("hostssl all +rds_iam 127.0.0.1/32 pam pamservice={service}"),
                // RDS refuses IAM users without TLS; so does this server.
                "host all +rds_iam 127.0.0.1/32 reject".to_string(),
            ],
            tls: Some((cert, key)),
            ..PgOptions::default()
        });
        pg.psql("CREATE ROLE rds_iam NOLOGIN;");

        let pam_file = PathBuf::from("/etc/pam.d").join(&service);
        let mut rds = RdsPg {
            pg,
            pki,
            _cert_dir: cert_dir,
            pam_dir,
            pam_file,
            service,
            opts,
            skew_seconds: 0,
        };
        rds.write_pam_file();
        rds
    }

    fn write_pam_file(&mut self) {
        let dir = self.pam_dir.path();
        let text = format!(
            "# iampool test: RDS-like IAM token check (removed when the test ends)\n\
             auth required pam_exec.so expose_authtok quiet {python} {wrapper} {tokens} \
             --keys {keys} --region {region} --host {host} --port {port} --log {log} \
             --skew-seconds {skew}\n\
             account required pam_permit.so\n",
            python = python3().display(),
            wrapper = dir.join("wrapper.py").display(),
            tokens = dir.join("tokens.log").display(),
            keys = dir.join("keys.json").display(),
            region = self.opts.region,
            host = self.opts.verifier_host,
            port = self.pg.port(),
            log = dir.join("verifier.log").display(),
            skew = self.skew_seconds,
        );
        write_file(&self.pam_file, &text, 0o644);
    }

    /// Checks tokens as if the server's clock were `seconds` ahead of the real one
    /// (negative: behind), i.e. skewed against iampool's signer. Applies to the next login.
    pub fn set_clock_skew(&mut self, seconds: i64) {
        self.skew_seconds = seconds;
        self.write_pam_file();
    }

    pub fn cluster(&self) -> &PgCluster {
        &self.pg
    }

    pub fn port(&self) -> u16 {
        self.pg.port()
    }

    /// The name tokens are checked against (and, by default, the certificate's name).
    pub fn host(&self) -> &str {
        &self.opts.verifier_host
    }

    pub fn region(&self) -> &str {
        &self.opts.region
    }

    /// The test CA that issued the server certificate (`sslrootcert`).
    pub fn ca_path(&self) -> &Path {
        &self.pki.ca_path
    }

    pub fn pam_service(&self) -> &str {
        &self.service
    }

    pub fn pam_file(&self) -> &Path {
        &self.pam_file
    }

    /// `CREATE USER name; GRANT rds_iam TO name;` plus a database `name` it owns.
    pub fn create_iam_user(&self, name: &str) {
        let q = quote_ident(name);
        self.pg.psql(&format!(
            "CREATE USER {q}; GRANT rds_iam TO {q}; CREATE DATABASE {q} OWNER {q};"
        ));
    }

    /// An iampool upstream URL for `user`'s database on this server: IAM, verify-full with the
    /// test CA, dialled through 127.0.0.1. `extra` is appended to the query (`&k=v...`).
    pub fn upstream_url(&self, user: &str, extra: &str) -> String {
        format!(
            "postgres://{user}@{host}:{port}/{user}?auth=iam&region={region}&hostaddr=127.0.0.1\
             &sslmode=verify-full&sslrootcert={ca}{extra}",
            host = self.opts.verifier_host,
            port = self.pg.port(),
            region = self.opts.region,
            ca = self.pki.ca_path.display(),
        )
    }

    /// Replaces the verifier's key file (atomically: write, then rename).
    pub fn set_keys_json(&self, json: &str) {
        let tmp = self.pam_dir.path().join("keys.json.tmp");
        write_file(&tmp, json, 0o644);
        fs::rename(&tmp, self.pam_dir.path().join("keys.json")).expect("install keys.json");
    }

    /// The verifier trusts exactly these fake-issued keys, each until its own expiry.
    pub fn set_issued_keys(&self, keys: &[IssuedKey]) {
        self.set_keys_json(&verifier_keys_json(keys));
    }

    /// The verifier trusts the static test credentials (no expiry) and nothing else.
    pub fn trust_static_key(&self) {
        self.set_static_keys(&[(STATIC_ACCESS_KEY_ID, STATIC_SECRET_ACCESS_KEY, None)]);
    }

    /// (access key id, secret, expiry) triples.
    pub fn set_static_keys(&self, keys: &[(&str, &str, Option<SystemTime>)]) {
        let mut map = serde_json::Map::new();
        for (akid, secret, expires) in keys {
            let mut entry = serde_json::Map::new();
            entry.insert("secret".into(), (*secret).into());
            if let Some(t) = expires {
                let t = time::OffsetDateTime::from(*t)
                    .format(&time::format_description::well_known::Rfc3339)
                    .expect("format expiry");
                entry.insert("expires".into(), t.into());
            }
            map.insert((*akid).to_string(), entry.into());
        }
        self.set_keys_json(&serde_json::Value::Object(map).to_string());
    }

    /// The verifier's own log (reasons, never tokens).
    pub fn verifier_log(&self) -> String {
        fs::read_to_string(self.pam_dir.path().join("verifier.log")).unwrap_or_default()
    }

    /// Counts from both logs. Each login attempt writes one line to each.
    pub fn stats(&self) -> VerifierStats {
        let mut s = VerifierStats::default();
        for line in self.verifier_log().lines() {
            let Some((_, rest)) = line.split_once(" result=") else {
                continue;
            };
            let (result, reason) = rest.split_once(" reason=").unwrap_or((rest, ""));
            match result {
                "ok" => {
                    s.accepted += 1;
                    if let Some(akid) = reason.strip_prefix("valid, signed by ") {
                        s.signers.insert(akid.to_string());
                    }
                }
                _ => {
                    s.rejected += 1;
                    s.reject_reasons.push(reason.to_string());
                }
            }
        }
        let tokens = fs::read_to_string(self.pam_dir.path().join("tokens.log")).unwrap_or_default();
        let mut all = BTreeSet::new();
        let mut accepted = BTreeSet::new();
        for line in tokens.lines() {
            if let Some((result, hash)) = line.split_once(' ') {
                all.insert(hash.to_string());
                if result == "ok" {
                    accepted.insert(hash.to_string());
                }
            }
        }
        s.distinct_tokens = all.len();
        s.distinct_accepted_tokens = accepted.len();
        s
    }

    /// Polls [`RdsPg::stats`] until `done` holds or `timeout` runs out; returns the last.
    /// The verifier logs a moment after the client saw the outcome, so counts need this.
    pub async fn wait_stats(
        &self,
        timeout: Duration,
        done: impl Fn(&VerifierStats) -> bool,
    ) -> VerifierStats {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.stats();
            if done(&s) || std::time::Instant::now() >= deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// psql straight to this server as `user` with `password` (e.g. a token) over
    /// verify-full TLS; returns (success, stdout, stderr). Bounded to 30 s.
    pub fn psql_direct(&self, user: &str, password: &str, sql: &str) -> (bool, String, String) {
        let mut cmd = Command::new(self.pg.bin_dir().join("psql"));
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env_clear()
            .env("LC_ALL", "C")
            .env("PGHOST", &self.opts.verifier_host)
            .env("PGHOSTADDR", "127.0.0.1")
            .env("PGPORT", self.pg.port().to_string())
            .env("PGUSER", user)
            .env("PGDATABASE", user)
            .env("PGPASSWORD", password)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &self.pki.ca_path)
            .env("PGCONNECT_TIMEOUT", "10");
        run_bounded(&mut cmd, Duration::from_secs(30))
    }

    /// Same as [`RdsPg::psql_direct`] but without TLS (`sslmode=disable`).
    pub fn psql_direct_plain(
        &self,
        user: &str,
        password: &str,
        sql: &str,
    ) -> (bool, String, String) {
        let mut cmd = Command::new(self.pg.bin_dir().join("psql"));
        cmd.args(["-X", "-A", "-t", "-c", sql])
            .env_clear()
            .env("LC_ALL", "C")
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.pg.port().to_string())
            .env("PGUSER", user)
            .env("PGDATABASE", user)
            .env("PGPASSWORD", password)
            .env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "10");
        run_bounded(&mut cmd, Duration::from_secs(30))
    }
}

impl Drop for RdsPg {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pam_file);
    }
}

/// A key file entry set for [`RdsPg::set_issued_keys`] merged from several fakes.
pub fn merge_issued(lists: &[Vec<IssuedKey>]) -> Vec<IssuedKey> {
    let mut by_id: BTreeMap<String, IssuedKey> = BTreeMap::new();
    for k in lists.iter().flatten() {
        by_id.insert(k.access_key_id.clone(), k.clone());
    }
    by_id.into_values().collect()
}

/// A Python 3 the server's OS user can run (root's PATH may hold a per-user shim).
fn python3() -> PathBuf {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("no system python3 for the PAM verifier: run scripts/setup.sh");
}

fn write_file(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// As root, hands `path` to OS user `postgres` (the server's user); otherwise a no-op.
fn chown_to_server_user(path: &Path) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown postgres:postgres {path:?} failed");
}

/// Runs `cmd` with a hard bound; returns (success, stdout, stderr).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    // Threads drain the pipes so a chatty child cannot block on a full pipe.
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.success(),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}
