//! iampool's upstream strings against libpq's: the system psql is given each string of a
//! table, and iampool must accept exactly the strings psql accepts (listed exceptions aside),
//! and for those dial the same hosts and ports in the same order, and sign in with the same
//! user, database, application_name and options.
//!
//! psql "accepts" a string when its error is about connecting: the first port has nothing
//! listening (connection refused), the second is a tiny server of this test that records the
//! startup packet and refuses the login. libpq 15 names every host:port it tried.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iampool::config::{Config, Upstream};

/// Whether iampool should decide as psql does.
enum Expect {
    Same,
    /// iampool decides the other way, deliberately, for this reason.
    Differs(&'static str),
}
use Expect::{Differs, Same};

/// `{refused}`: a port with nothing listening; `{server}`: the recording server's port.
const CASES: &[(&str, Expect)] = &[
    ("postgres://u@127.0.0.1:{server}/db", Same),
    ("postgresql://u@127.0.0.1:{refused},127.0.0.1:{server}/db", Same),
    ("postgres://u@[::1]:{refused},127.0.0.1:{server}/db", Same),
    ("postgres://u@127.0.0.1,[::1]/db?port={refused}", Same),
    ("postgres://u%20x@127.0.0.1:{server}/d%2Fb?application_name=web&connect_timeout=3", Same),
    ("postgres://u@127.0.0.1:{server}/db?bogus=1", Same),
    ("postgres://u@127.0.0.1:99999/db", Same),
    ("postgres://u@[::1:{server}/db", Same),
    ("postgres://u@127.0.0.1:{server}/db?hostaddr=127.0.0.1&sslmode=disable", Same),
    (
        "postgres://u@127.0.0.1:{refused}/db?port={server}",
        Differs("iampool refuses ?port= beside ports in the URL; libpq silently replaces every port of the URL with it"),
    ),
    ("host=127.0.0.1 port={server} user=u dbname=db", Same),
    ("host=127.0.0.1,127.0.0.1 port={refused},{server} user=u", Same),
    ("host=::1,127.0.0.1 port={refused},{server} user=u dbname=app", Same),
    ("host=127.0.0.1,127.0.0.1 port={server} user=u", Same),
    (" host = '127.0.0.1' port= ' {server} ' user='a b' dbname=x\\ y\\'z", Same),
    ("host=127.0.0.1 port={server} user=u options='-c search_path=app' application_name='my app'", Same),
    ("host=10.255.255.1,127.0.0.1 hostaddr=127.0.0.1, port={refused},{server} user=u", Same),
    ("hostaddr=127.0.0.1 port={server} user=u", Same),
    ("host=127.0.0.1 port={server} user=u target_session_attrs=read-write", Same),
    ("host=127.0.0.1 port={refused} user=u sslmode=verify-full", Same),
    ("host=127.0.0.1 port={server} user=u dbname='unterminated", Same),
    ("host=127.0.0.1 port={server} user", Same),
    ("host=127.0.0.1 port={server} user=u bogus=1", Same),
    ("host=127.0.0.1 port={refused},{server} user=u", Same),
    ("host=127.0.0.1,127.0.0.1,127.0.0.1 port={refused},{server} user=u", Same),
    ("host=127.0.0.1,127.0.0.1 hostaddr=127.0.0.1 port={server} user=u", Same),
    ("host=127.0.0.1 hostaddr=not-an-ip port={server} user=u", Same),
    ("host=127.0.0.1 port={server} user=u target_session_attrs=writer", Same),
    ("host=127.0.0.1 port={server} user=u sslmode=bogus", Same),
    ("host=127.0.0.1 port=0 user=u", Same),
    ("host=127.0.0.1 port={server} user=u connect_timeout=abc", Same),
    (
        "host=127.0.0.1 port={server} user=u sslcert=/nonexistent/client.crt",
        Differs("iampool presents no client certificate; it says so rather than ignore sslcert"),
    ),
    (
        "host=127.0.0.1 port={server} user=u gssencmode=disable",
        Differs("iampool has no GSSAPI; it says so rather than ignore gssencmode"),
    ),
    (
        "host=127.0.0.1 port={refused} user=u requiressl=1",
        Differs("requiressl is libpq's deprecated spelling of sslmode=require; iampool asks for sslmode"),
    ),
    (
        "host=127.0.0.1 port={server} user=u load_balance_hosts=random",
        Differs("load_balance_hosts is a libpq 16 keyword; this psql is 15, which does not know it"),
    ),
    (
        "host=127.0.0.1 port={server} user=u sslmode=require sslmode=disable",
        Differs("a keyword given twice is reported; libpq silently takes the last"),
    ),
    (
        "host=127.0.0.1 port={server} user=u connect_timeout=-1",
        Differs("a negative connect_timeout is refused; libpq takes it as no timeout"),
    ),
    (
        "host=127.0.0.1,,127.0.0.1 port={refused} user=u",
        Differs("an empty host is a unix-domain socket to libpq; iampool reaches the upstream over TCP only"),
    ),
    (
        "host=127.0.0.1 port={server}",
        Differs("iampool needs a user (or PGUSER); libpq uses the operating-system user"),
    ),
];

/// A port on 127.0.0.1 (and, where there is IPv6, on ::1) with nothing listening.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let v6_free = match TcpListener::bind(("::1", port)) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
        };
        if port != 5432 && v6_free {
            return port;
        }
    }
}

/// The startup packet parameters a client sent.
type Startup = Vec<(String, String)>;

/// A server on 127.0.0.1 that answers N to SSLRequest/GSSENCRequest, records each startup
/// packet and refuses the login with FATAL 28000.
fn recording_server() -> (u16, Arc<Mutex<Vec<Startup>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            if let Some(startup) = read_startup(&mut conn) {
                record.lock().unwrap().push(startup);
                let _ = conn.write_all(&refusal());
            }
        }
    });
    (port, seen)
}

fn read_packet(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).ok()?;
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    conn.read_exact(&mut body).ok()?;
    Some(body)
}

fn read_startup(conn: &mut TcpStream) -> Option<Startup> {
    loop {
        let body = read_packet(conn)?;
        let code = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        match code {
            // SSLRequest, GSSENCRequest: not here.
            80877103 | 80877104 => conn.write_all(b"N").ok()?,
            196608 => {
                let text = String::from_utf8_lossy(&body[4..]).into_owned();
                let words: Vec<&str> = text.split('\0').collect();
                return Some(
                    words
                        .chunks(2)
                        .filter(|pair| pair.len() == 2 && !pair[0].is_empty())
                        .map(|pair| (pair[0].to_string(), pair[1].to_string()))
                        .collect(),
                );
            }
            _ => return None,
        }
    }
}

fn refusal() -> Vec<u8> {
    let mut fields = Vec::new();
    for (code, text) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "28000"),
        (b'M', "recorded by the conninfo test"),
    ] {
        fields.push(code);
        fields.extend_from_slice(text.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    out.extend(fields);
    out
}

fn psql_path() -> &'static str {
    ["/usr/bin/psql", "/usr/lib/postgresql/15/bin/psql"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("psql is needed for this test: install postgresql-client-15 (/usr/bin/psql or /usr/lib/postgresql/15/bin/psql)")
}

/// psql's stderr for one string, run with no environment of ours (no ~/.pgpass, no service
/// file) and killed if it ever takes more than 20 s.
fn psql(text: &str, home: &Path) -> String {
    let mut child = Command::new(psql_path())
        .args(["-X", "-w", "-d", text, "-c", "select 1"])
        .env_clear()
        .env("HOME", home)
        .env("LC_ALL", "C")
        .env("PGCONNECT_TIMEOUT", "2")
        .env("PGSERVICEFILE", "/nonexistent/pg_service.conf")
        .env("PGSYSCONFDIR", "/nonexistent")
        .env("PGPASSFILE", "/nonexistent/pgpass")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("psql did not finish in 20 s for {text:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    stderr
}

/// The `host:port`s psql names in `connection to server at "HOST" [(ADDR)], port N failed`.
fn tried(stderr: &str) -> Vec<(String, u16)> {
    stderr
        .split("connection to server at \"")
        .skip(1)
        .filter_map(|rest| {
            let (host, rest) = rest.split_once('"')?;
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix('(') {
                Some(inner) => inner.split_once(')')?.1,
                None => rest,
            };
            let port = rest.strip_prefix(", port ")?.trim_start();
            let end = port.find(|c: char| !c.is_ascii_digit())?;
            Some((host.to_string(), port[..end].parse().ok()?))
        })
        .collect()
}

/// Whether psql's error is about connecting (the string itself was fine).
fn psql_accepts(stderr: &str) -> bool {
    let reached = stderr.contains("Connection refused")
        || stderr.contains("recorded by the conninfo test")
        || stderr.contains("Cannot assign requested address")
        || stderr.contains("Network is unreachable");
    let parse_errors = [
        "invalid",
        "missing \"=\"",
        "unterminated",
        "could not match",
        "could not parse",
        "end of string reached",
    ];
    reached && !parse_errors.iter().any(|e| stderr.contains(e))
}

#[test]
fn upstream_strings_parse_as_libpq_parses_them() {
    let refused = free_port();
    let (server, recorded) = recording_server();
    let home = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let (mut compared, mut logins) = (0, 0);
    for (template, expect) in CASES {
        let text = template
            .replace("{refused}", &refused.to_string())
            .replace("{server}", &server.to_string());
        recorded.lock().unwrap().clear();
        let stderr = psql(&text, home.path());
        let libpq = psql_accepts(&stderr);
        let ours = Config::from_args(&["--upstream", &text], &[]);
        let fail = |why: String| format!("{text:?}: {why}\n    psql: {}", stderr.trim());
        match (expect, &ours) {
            (Same, Ok(_)) if !libpq => {
                failures.push(fail("iampool accepts it, psql does not".into()))
            }
            (Same, Err(e)) if libpq => {
                failures.push(fail(format!("psql accepts it, iampool does not: {e}")))
            }
            (Differs(why), ours) if ours.is_ok() == libpq => failures.push(fail(format!(
                "listed as a difference ({why}), but iampool and psql agree"
            ))),
            _ => {}
        }
        let (Same, true, Ok(config)) = (expect, libpq, ours) else {
            continue;
        };
        let u = &config.databases[0].upstream;
        // The hosts libpq tried: ours up to the first that answers (the recording server).
        let ours: Vec<(String, u16)> = u
            .hosts
            .iter()
            .map(|h| {
                let shown = h.addr.map_or(h.name.clone(), |a| a.to_string());
                (shown, h.port)
            })
            .collect();
        let answered = ours
            .iter()
            .position(|(host, port)| host == "127.0.0.1" && *port == server);
        let expected = &ours[..answered.map_or(ours.len(), |i| i + 1)];
        let theirs = tried(&stderr);
        compared += 1;
        if theirs != expected {
            failures.push(fail(format!(
                "psql tried {theirs:?}, iampool would try {expected:?}"
            )));
        }
        let startups = recorded.lock().unwrap().clone();
        if answered.is_some() {
            logins += 1;
            check_startup(u, &startups).unwrap_or_else(|why| failures.push(fail(why)));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // Not vacuous: most accepted strings were compared host by host, many down to the login.
    assert!(
        compared >= 15 && logins >= 10,
        "{compared} compared, {logins} logins"
    );
}

/// The user, database, application_name and options libpq sent are iampool's.
fn check_startup(u: &Upstream, startups: &[Startup]) -> Result<(), String> {
    let [startup] = startups else {
        return Err(format!("the server saw {} logins, not 1", startups.len()));
    };
    let get = |name: &str| {
        startup
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let want = [
        ("user", Some(u.user.as_str())),
        ("database", Some(u.dbname.as_str())),
        // psql's fallback_application_name is psql.
        (
            "application_name",
            Some(u.application_name.as_deref().unwrap_or("psql")),
        ),
        ("options", u.options.as_deref()),
    ];
    for (name, value) in want {
        if get(name) != value {
            return Err(format!(
                "libpq sent {name}={:?}, iampool would send {value:?} (startup {startup:?})",
                get(name)
            ));
        }
    }
    Ok(())
}
