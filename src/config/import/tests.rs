//! Imports end to end: a realistic pgbouncer.ini through to a configuration iampool loads,
//! PgBouncer's defaults, every mistake at once, and no secret in the report.

use std::path::{Path, PathBuf};

use super::super::pgbouncer::{Fate, Section, SETTINGS};
use super::super::{AuthType, ClientTls, LoadBalanceHosts, PoolMode, UserSecret};
use super::*;

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

const USERLIST: &str =
    "\"admin\" \"admin-pw-1\"\n\"monitor\" \"monitor-pw-2\"\n\"reporter\" \"reporter-pw-3\"\n";

fn realistic(files: &Files) -> PathBuf {
    let userlist = files.write("userlist.txt", USERLIST);
    let extra = files.write("extra.ini", "max_client_conn = 500\n");
    files.write(
        "pgbouncer.ini",
        &format!(
            ";; the shop's PgBouncer
[databases]
shop = host=127.0.0.1 port=5432 dbname=shop user=shop_app password=shop-secret-1 pool_size=30
reports = host=db-ro1,db-ro2 dbname=reporting user=reporter pool_mode=session client_encoding=UTF8 timezone='Europe/Paris' reserve_pool=3
legacy = host=127.0.0.1 dbname=legacy_db
socketdb = dbname=x user=y
* = host=127.0.0.1

[users]
reporter = pool_mode=session max_user_connections=5

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6433
auth_type = scram-sha-256
auth_file = {}
admin_users = admin
stats_users = monitor
pool_mode = transaction
default_pool_size = 25
%include {}
server_lifetime = 1800
server_idle_timeout = 120.5
query_wait_timeout = 0
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
reserve_pool_size = 5
tcp_keepalive = 1
tcp_user_timeout = 2500
auth_hba_file = /etc/pgbouncer/hba.conf
unix_socket_dir =
ignore_startup_parameters = extra_float_digits
bogus_setting = 1

[peers]
1 = host=10.0.0.1
",
            userlist.display(),
            extra.display()
        ),
    )
}

fn has(report: &Report, kind: Kind, needle: &str) -> bool {
    report.of(kind).any(|n| n.text.contains(needle))
}

#[test]
fn a_realistic_pgbouncer_ini_becomes_a_configuration_iampool_loads() {
    let files = Files::new();
    let ini = realistic(&files);
    let imported = import(&ini, None, None).expect("imports");
    let report = &imported.report;
    let config = imported
        .config
        .as_ref()
        .unwrap_or_else(|| panic!("loads:\n{report}\n{}", imported.toml));

    assert_eq!(config.listen, ["127.0.0.1:6433".parse().unwrap()]);
    assert_eq!(config.max_client_conn, 500);
    assert_eq!(config.server_lifetime.as_secs(), 1800);
    assert_eq!(config.server_idle_timeout.as_millis(), 120_500);
    assert_eq!(
        config.query_wait_timeout.as_secs(),
        120,
        "iampool's default"
    );
    assert_eq!(config.auth_type, AuthType::ScramSha256);
    assert_eq!(config.admin_users, ["admin"]);
    assert_eq!(config.stats_users, ["monitor"]);
    assert_eq!(config.unix_socket_dir, None);
    assert!(
        matches!(&config.users["reporter"], UserSecret::Plain(p) if p.expose() == "reporter-pw-3")
    );
    let mut names: Vec<&str> = config.databases.iter().map(|d| d.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["legacy", "reports", "shop"]);

    let shop = config.database("shop").unwrap();
    assert_eq!(
        (shop.pool_size, shop.pool_mode),
        (30, PoolMode::Transaction)
    );
    assert_eq!(shop.upstream.user, "shop_app");
    assert_eq!(shop.upstream.dbname, "shop");
    assert_eq!(
        shop.upstream.password.as_ref().unwrap().expose(),
        "shop-secret-1"
    );
    let reports = config.database("reports").unwrap();
    assert_eq!(
        (reports.pool_size, reports.pool_mode),
        (25, PoolMode::Session)
    );
    let hosts: Vec<&str> = reports
        .upstream
        .hosts
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(hosts, ["db-ro1", "db-ro2"]);
    assert_eq!(
        reports.upstream.load_balance_hosts,
        LoadBalanceHosts::Random
    );
    assert_eq!(
        reports.upstream.options.as_deref(),
        Some("-c client_encoding=UTF8 -c timezone=Europe/Paris")
    );
    assert_eq!(
        reports.upstream.password.as_ref().unwrap().expose(),
        "reporter-pw-3"
    );
    let legacy = config.database("legacy").unwrap();
    assert_eq!(
        (
            legacy.upstream.user.as_str(),
            legacy.upstream.dbname.as_str()
        ),
        ("reporter", "legacy_db")
    );

    assert!(has(
        report,
        Kind::Carried,
        "default_pool_size = 25 -> pool_size = 25"
    ));
    assert!(has(
        report,
        Kind::Carried,
        "listen_addr = 127.0.0.1, listen_port = 6433 -> listen = [\"127.0.0.1:6433\"]"
    ));
    assert!(has(report, Kind::Carried, "its 3 users stay in that file"));
    assert!(has(
        report,
        Kind::Carried,
        "ignore_startup_parameters = extra_float_digits -> ignore_startup_parameters = [\"extra_float_digits\"]"
    ));
    assert!(has(
        report,
        Kind::Carried,
        "tcp_keepalive = 1 -> tcp_keepalive = true"
    ));
    assert!(has(
        report,
        Kind::Carried,
        "reserve_pool_size = 5 -> reserve_pool_size = 5"
    ));
    assert!(has(
        report,
        Kind::Carried,
        "reports: reserve_pool=3 -> reserve_pool_size = 3"
    ));
    assert!(has(
        report,
        Kind::Carried,
        "tcp_user_timeout = 2500 -> tcp_user_timeout = \"2500ms\""
    ));
    assert!(has(report, Kind::Changed, "legacy: no user="));
    assert!(has(report, Kind::Changed, "shop_app log in as a client"));
    assert!(has(report, Kind::Changed, "round-robin"));
    assert!(has(report, Kind::NotNeeded, "logfile"));
    assert!(has(report, Kind::NotNeeded, "pidfile"));
    for gone in [
        "auth_hba_file",
        "query_wait_timeout = 0",
        "* (the fallback database)",
        "socketdb: no host=",
        "[users] reporter: pool_mode=session",
        "[users] reporter: max_user_connections=5",
        "[peers] 1",
        "bogus_setting: not a PgBouncer 1.25 setting",
    ] {
        assert!(has(report, Kind::NotCarried, gone), "{gone}:\n{report}");
    }
    assert!(
        report
            .read
            .iter()
            .any(|r| r.contains("extra.ini (%include at")),
        "{:?}",
        report.read
    );
    assert!(report.load_errors.is_empty());
    assert!(imported.has_secrets);

    let shown = report.to_string();
    for secret in [
        "shop-secret-1",
        "reporter-pw-3",
        "admin-pw-1",
        "monitor-pw-2",
    ] {
        assert!(!shown.contains(secret), "{secret} in the report:\n{shown}");
    }
    // Every [pgbouncer] setting is accounted for.
    let text = std::fs::read_to_string(&ini).unwrap();
    let section = text
        .split("[pgbouncer]")
        .nth(1)
        .unwrap()
        .split("[peers]")
        .next()
        .unwrap();
    for line in section.lines().filter(|l| l.contains('=')) {
        let name = line.split('=').next().unwrap().trim();
        assert!(
            report.notes.iter().any(|n| n.text.contains(name)),
            "{name} has no note:\n{shown}"
        );
    }
}

#[test]
fn pgbouncers_defaults_are_written_where_iampools_differ() {
    let files = Files::new();
    let ini = files.write(
        "pgbouncer.ini",
        "[databases]\napp = host=db.internal dbname=app user=app password=pw\n",
    );
    let imported = import(&ini, None, None).unwrap();
    let config = imported.config.expect("loads");
    let app = config.database("app").unwrap();
    assert_eq!((app.pool_mode, app.pool_size), (PoolMode::Session, 20));
    assert_eq!(config.max_client_conn, 100);
    assert_eq!(config.auth_type, AuthType::Md5);
    assert_eq!(config.listen, ["127.0.0.1:6432".parse().unwrap()]);
    assert_eq!(config.unix_socket_dir.as_deref(), Some(Path::new("/tmp")));
    assert!(has(
        &imported.report,
        Kind::Changed,
        "unix socket only; iampool always listens on TCP"
    ));
    assert!(
        has(
            &imported.report,
            Kind::Carried,
            "PgBouncer's default pool_mode"
        ) || has(
            &imported.report,
            Kind::Carried,
            "pool_mode = \"session\": PgBouncer's default"
        )
    );
}

#[test]
fn conversions_that_change_behaviour_say_so() {
    let files = Files::new();
    let cert = files.write("server.crt", "not read by the loader");
    let key = files.write("server.key", "not read by the loader");
    let userlist = files.write(
        "users.txt",
        "\"old\" \"md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n",
    );
    let ini = files.write(
        "pgbouncer.ini",
        &format!(
            "[pgbouncer]\npool_mode = statement\nauth_type = hba\nclient_tls_sslmode = verify-full\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\nverbose = 2\nmax_packet_size = 2147483647\nlisten_addr = *\n[databases]\nold = host=h dbname=old user=old\n",
            cert.display(),
            key.display()
        ),
    );
    let imported = import(&ini, Some(&userlist), None).unwrap();
    let report = &imported.report;
    let config = imported
        .config
        .as_ref()
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(config.databases[0].pool_mode, PoolMode::Transaction);
    assert_eq!(
        config.auth_type,
        AuthType::Md5,
        "md5 hashes in the user list"
    );
    assert_eq!(config.client_tls, ClientTls::Require);
    assert_eq!(config.log_level, "iampool=trace,info");
    assert_eq!(config.max_message_size, 1 << 30);
    assert_eq!(config.listen, ["0.0.0.0:6432".parse().unwrap()]);
    assert_eq!(config.auth_file.as_deref(), Some(userlist.as_path()));
    assert!(config.databases[0].upstream.password.is_none());
    for changed in [
        "no statement mode",
        "no HBA rules",
        "does not check client certificates",
        "8kB to 1GB",
    ] {
        assert!(has(report, Kind::Changed, changed), "{changed}:\n{report}");
    }
    assert!(
        has(report, Kind::NotCarried, "only an md5 hash"),
        "{report}"
    );
    assert!(has(report, Kind::Carried, "\"[::]:6432\""), "{report}");
}

#[test]
fn every_mistake_in_the_input_is_reported_at_once_with_its_line() {
    let files = Files::new();
    let ini = files.write(
        "pgbouncer.ini",
        "[pgbouncer]\nlisten_port = sixty\ndefault_pool_size = 20 ; twenty\nauth_type = magic\n[databases]\na = host=h user=u pool_size=many\nb = host=h user=u password='hunter2\nc = host=h user=u port=99999\n",
    );
    let errors = import(&ini, None, None).unwrap_err();
    let lines: Vec<String> = errors
        .iter()
        .map(|e| e.at.rsplit(':').next().unwrap().to_string())
        .collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(sorted, ["2", "3", "4", "6", "7", "8"], "{errors:#?}");
    let all: String = errors.iter().map(|e| format!("{e}\n")).collect();
    assert!(!all.contains("hunter2"), "{all}");
    assert!(all.contains("start of a line"), "{all}");
    let missing = import(&ini, Some(Path::new("/no/such/userlist.txt")), None).unwrap_err();
    assert!(
        missing.iter().any(|e| e.at == "/no/such/userlist.txt"),
        "{missing:#?}"
    );
}

#[test]
fn an_output_that_does_not_load_here_says_why() {
    let files = Files::new();
    let ini = files.write(
        "pgbouncer.ini",
        "[pgbouncer]\nauth_file = /etc/pgbouncer/not-here.txt\n[databases]\napp = host=h dbname=app user=app\n",
    );
    let imported = import(&ini, None, Some(Path::new("out.toml"))).unwrap();
    assert!(imported.config.is_none());
    assert!(has(
        &imported.report,
        Kind::NotCarried,
        "cannot read it here"
    ));
    assert!(
        imported
            .report
            .load_errors
            .iter()
            .any(|e| e.starts_with("auth_file (from out.toml)")),
        "{:?}",
        imported.report.load_errors
    );
}

#[test]
fn an_owner_only_file_for_secrets() {
    use std::os::unix::fs::PermissionsExt;
    let files = Files::new();
    let out = files.write("out.toml", "old");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_output(Some(&out), "new", true).unwrap();
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "new");
}

#[test]
fn every_converted_setting_is_taken_by_hand() {
    for setting in SETTINGS {
        let by_hand = match setting.section {
            Section::Pgbouncer => convert::BY_HAND,
            Section::Databases => databases::BY_HAND,
            Section::Users | Section::Peers => continue,
        };
        if let Fate::Converted(..) = setting.fate {
            assert!(
                by_hand.contains(&setting.name),
                "{} is converted but not by hand",
                setting.name
            );
        }
    }
    for name in convert::BY_HAND {
        assert!(
            super::super::pgbouncer::setting(name, Section::Pgbouncer).is_some(),
            "{name}"
        );
    }
    for name in databases::BY_HAND {
        assert!(
            super::super::pgbouncer::setting(name, Section::Databases).is_some(),
            "{name}"
        );
    }
}

#[test]
fn arbitrary_input_is_an_error_or_a_report_never_a_panic() {
    // Lines built by a small deterministic generator from what pgbouncer.ini is made of.
    let sections = [
        "[databases]",
        "[pgbouncer]",
        "[users]",
        "[peers]",
        "[",
        "[x]",
    ];
    let names = [
        "app",
        "*",
        "'my db'",
        "\"q\"\"d\"",
        "iampool",
        "listen_addr",
        "listen_port",
        "auth_type",
        "auth_file",
        "pool_mode",
        "default_pool_size",
        "max_packet_size",
        "verbose",
        "client_tls_sslmode",
        "unix_socket_dir",
        "query_wait_timeout",
        "reserve_pool_size",
        "admin_users",
        "server_lifetime",
        "bogus",
        "1",
        "",
    ];
    let values = [
        "",
        "0",
        "1",
        "-1",
        "0x1f",
        "99999",
        "5.5",
        "session",
        "statement",
        "hba",
        "md5",
        "any",
        "verify-full",
        "*",
        "localhost",
        "127.0.0.1,::1",
        "@sock",
        "/",
        "a,b",
        "é",
        "\u{1}x",
        "host=h user=u",
        "host=h,i dbname='d b' user=u password=p pool_size=2",
        "host=/tmp user=u",
        "host=h user=u timezone='A B' load_balance_hosts=round-robin",
        "host=h user=u pool_mode=statement reserve_pool=1 max_db_connections=3",
        "host=h user=u password='x",
        "pool_size=1",
        "=x",
        "host=h port=0 user=u",
    ];
    let files = Files::new();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut loaded = 0;
    for _ in 0..300 {
        let mut text = String::from("[databases]\nbase = host=h user=u\n[pgbouncer]\n");
        for _ in 0..next(8) {
            match next(5) {
                0 => text.push_str(sections[next(sections.len())]),
                1 => text.push_str(&format!("; {}", values[next(values.len())])),
                _ => text.push_str(&format!(
                    "{} = {}",
                    names[next(names.len())],
                    values[next(values.len())]
                )),
            }
            text.push('\n');
        }
        let ini = files.write("fuzz.ini", &text);
        match import(&ini, None, None) {
            Ok(imported) => {
                let _ = imported.report.to_string();
                if let Err(e) = toml::from_str::<toml::Table>(&imported.toml) {
                    panic!("{e}\n{text:?}\n{}", imported.toml);
                }
                loaded += usize::from(imported.config.is_some());
            }
            Err(errors) => assert!(!errors.is_empty()),
        }
    }
    assert!(
        loaded > 10,
        "the generator should make some configurations that load: {loaded}"
    );
}
