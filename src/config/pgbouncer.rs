//! PgBouncer's settings and what iampool makes of each: the one table that the hint for a
//! PgBouncer key in an iampool configuration, `iampool import-pgbouncer` and the README's
//! "Coming from PgBouncer" table are all read from.
//!
//! The table lists every setting of PgBouncer 1.25's `[pgbouncer]`, `[databases]`, `[users]`
//! and `[peers]` sections. A setting iampool plans but lacks is [`Fate::NotYet`] with the key
//! it is planned under: once that key is in the key table, the hint names it and the import
//! carries the setting, without an edit here (then make it a [`Fate::Key`] and regenerate the
//! README with `UPDATE_EXAMPLE=1 cargo test --lib config::`).

use std::fmt::Write;

use super::keys::{self, Key};
use Fate::{Converted, Key as Same, NotNeeded, Unsupported};
use Section::{Databases, Peers, Pgbouncer, Users};

/// The section of pgbouncer.ini a setting belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// `[pgbouncer]`: the pooler's own settings.
    Pgbouncer,
    /// A keyword of a `[databases]` connection string.
    Databases,
    /// A keyword of a `[users]` entry: per-user settings.
    Users,
    /// A keyword of a `[peers]` entry.
    Peers,
}

impl Section {
    pub const ALL: [Section; 4] = [
        Section::Pgbouncer,
        Section::Databases,
        Section::Users,
        Section::Peers,
    ];

    /// The section's name in pgbouncer.ini.
    pub fn name(self) -> &'static str {
        match self {
            Section::Pgbouncer => "pgbouncer",
            Section::Databases => "databases",
            Section::Users => "users",
            Section::Peers => "peers",
        }
    }
}

/// What iampool makes of one PgBouncer setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// This iampool key means the same; the value is carried over in iampool's units.
    Key(&'static str),
    /// Carried into this iampool key by a conversion the text describes.
    Converted(&'static str, &'static str),
    /// iampool needs no setting for it; the text says why.
    NotNeeded(&'static str),
    /// iampool cannot do it; the text says why and what to do instead.
    Unsupported(&'static str),
    /// iampool has no such setting yet; it is planned as this key (issue 14, PgBouncer's
    /// knobs), and the text says what it does.
    NotYet(&'static str, &'static str),
}

/// One PgBouncer setting.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    pub name: &'static str,
    pub section: Section,
    pub fate: Fate,
}

impl Setting {
    /// The iampool key that takes this setting's value now: a [`Fate::Key`] or
    /// [`Fate::Converted`] key, or a [`Fate::NotYet`] key once the key table has it.
    pub fn iampool_key(&self) -> Option<&'static str> {
        match self.fate {
            Fate::Key(key) | Fate::Converted(key, _) => Some(key),
            Fate::NotYet(key, _) => keys::key(key).map(|key| key.name),
            Fate::NotNeeded(_) | Fate::Unsupported(_) => None,
        }
    }

    /// The key-table entry of [`Setting::iampool_key`] (`None` for `password`, which is a
    /// `[databases.NAME]` key outside the table).
    pub fn key(&self) -> Option<&'static Key> {
        self.iampool_key().and_then(keys::key)
    }
}

const fn s(name: &'static str, section: Section, fate: Fate) -> Setting {
    Setting {
        name,
        section,
        fate,
    }
}

const LISTEN: &str = "listen_addr and listen_port together are one list of IP:port, e.g. listen = \"0.0.0.0:6432\" (* is 0.0.0.0; iampool takes addresses, not host names)";
const NO_LOG_FILE: &str = "iampool logs to stderr (text or JSON, log_format) for systemd, the container runtime or Kubernetes to collect";
const NO_SYSLOG: &str =
    "iampool logs to stderr only, which journald or the container runtime collects";
const LOGGED_BY_LEVEL: &str = "log_level decides what is logged: client logins and session ends at debug (log_level = \"iampool=debug\"), every upstream login at info; logins are counted in iampool_client_logins_total";
const NO_PEERING: &str = "iampool has no peering: a cancel request that reaches another iampool process is not forwarded; give each iampool its own address, or balance clients by source address";
const NO_AUTH_QUERY: &str = "iampool does not look passwords up in the database: list client users in auth_file or [users.NAME]";
const NO_CLIENT_CERTS: &str =
    "iampool does not ask clients for certificates; clients prove a password (auth_type)";
const RUSTLS_CLIENT: &str = "iampool's client TLS is TLS 1.2 and 1.3 with rustls's cipher suites and key exchange, not configurable";
const RUSTLS_SERVER: &str =
    "iampool speaks TLS 1.2 and 1.3 to the upstream with rustls's cipher suites, not configurable";
const NO_SERVER_CERT: &str =
    "iampool presents no client certificate to the upstream: sign in with a password or auth=iam";
const CLIENT_LIMIT: &str = "iampool limits client connections only in total (max_client_conn)";
const NO_USER_SETTINGS: &str = "iampool has no per-user settings: a setting applies to a database ([databases.NAME]) or to all";
const OPTIONS: &str = "sent to the server at login as options = \"-c NAME=VALUE\" (a client that sets its own still wins)";
const UNIX_SOCKET_USER: &str = "the socket is made with iampool's umask: control who may connect with the directory's permissions";

/// Every setting of PgBouncer 1.25, by section, in the order of PgBouncer's documentation.
pub static SETTINGS: &[Setting] = &[
    // [pgbouncer]: generic settings.
    s("logfile", Pgbouncer, NotNeeded(NO_LOG_FILE)),
    s("pidfile", Pgbouncer, NotNeeded("iampool does not daemonize: run it under systemd or a container runtime, which track its process")),
    s("listen_addr", Pgbouncer, Converted("listen", LISTEN)),
    s("listen_port", Pgbouncer, Converted("listen", LISTEN)),
    s("unix_socket_dir", Pgbouncer, Converted("unix_socket_dir", "the same directory for the client socket (iampool makes none unless it is set; PgBouncer's default was /tmp); iampool reaches servers over TCP only, and abstract sockets (@name) are not supported")),
    s("unix_socket_mode", Pgbouncer, Unsupported(UNIX_SOCKET_USER)),
    s("unix_socket_group", Pgbouncer, Unsupported(UNIX_SOCKET_USER)),
    s("user", Pgbouncer, NotNeeded("start iampool as that user (systemd User=, a container's runAsUser); it does not switch users itself")),
    s("pool_mode", Pgbouncer, Converted("pool_mode", "session and transaction as in PgBouncer; there is no statement mode (transaction is the nearest); PgBouncer's default is session, iampool's transaction")),
    s("max_client_conn", Pgbouncer, Same("max_client_conn")),
    s("default_pool_size", Pgbouncer, Same("pool_size")),
    s("min_pool_size", Pgbouncer, Same("min_pool_size")),
    s("reserve_pool_size", Pgbouncer, Same("reserve_pool_size")),
    s("reserve_pool_timeout", Pgbouncer, Same("reserve_pool_timeout")),
    s("max_db_connections", Pgbouncer, Same("max_db_connections")),
    s("max_db_client_connections", Pgbouncer, Unsupported(CLIENT_LIMIT)),
    s("max_user_connections", Pgbouncer, Same("max_user_connections")),
    s("max_user_client_connections", Pgbouncer, Unsupported(CLIENT_LIMIT)),
    s("server_round_robin", Pgbouncer, Unsupported("iampool reuses the most recently released server first, as PgBouncer does by default; load_balance_hosts = random spreads new logins over the hosts")),
    s("track_extra_parameters", Pgbouncer, NotNeeded("iampool follows every parameter PostgreSQL reports (IntervalStyle, search_path, ...) and applies other startup parameters to each server a client gets")),
    s("ignore_startup_parameters", Pgbouncer, Same("ignore_startup_parameters")),
    s("peer_id", Pgbouncer, Unsupported(NO_PEERING)),
    s("disable_pqexec", Pgbouncer, Unsupported("iampool relays the simple query protocol as PostgreSQL accepts it")),
    s("application_name_add_host", Pgbouncer, Same("application_name_add_host")),
    s("conffile", Pgbouncer, NotNeeded("the file is --config (or IAMPOOL_CONFIG); RELOAD and SIGHUP read it again")),
    s("service_name", Pgbouncer, NotNeeded("it names a Windows service; iampool runs on Linux")),
    s("job_name", Pgbouncer, NotNeeded("it names a Windows service; iampool runs on Linux")),
    s("stats_period", Pgbouncer, NotNeeded("statistics are read when /metrics is scraped (metrics_listen) or SHOW STATS asks; none are written to the log")),
    s("max_prepared_statements", Pgbouncer, Same("max_prepared_statements")),
    s("scram_iterations", Pgbouncer, Unsupported("iampool makes SCRAM verifiers of plain passwords with PostgreSQL's default of 4096 iterations; store a SCRAM-SHA-256$ verifier in auth_file for another count")),
    // Authentication.
    s("auth_type", Pgbouncer, Converted("auth_type", "md5, scram-sha-256 and trust as in PgBouncer (iampool's trust accepts any user name); any becomes trust; plain, cert, hba, ldap and pam become scram-sha-256 (md5 when the auth file holds md5 hashes), as iampool never asks for a cleartext password and has no certificate, HBA, LDAP or PAM authentication; PgBouncer's default is md5, iampool's scram-sha-256")),
    s("auth_hba_file", Pgbouncer, Unsupported("iampool has no HBA rules: every client authenticates with auth_type; limit who can reach it with listen and the network")),
    s("auth_ident_file", Pgbouncer, Unsupported("iampool has no ident maps: there is no peer or certificate authentication to map")),
    s("auth_file", Pgbouncer, Same("auth_file")),
    s("auth_user", Pgbouncer, Unsupported(NO_AUTH_QUERY)),
    s("auth_query", Pgbouncer, Unsupported(NO_AUTH_QUERY)),
    s("auth_dbname", Pgbouncer, Unsupported(NO_AUTH_QUERY)),
    s("auth_ldap_options", Pgbouncer, Unsupported("iampool has no LDAP authentication")),
    // Logging.
    s("syslog", Pgbouncer, Unsupported(NO_SYSLOG)),
    s("syslog_ident", Pgbouncer, Unsupported(NO_SYSLOG)),
    s("syslog_facility", Pgbouncer, Unsupported(NO_SYSLOG)),
    s("log_connections", Pgbouncer, NotNeeded(LOGGED_BY_LEVEL)),
    s("log_disconnections", Pgbouncer, NotNeeded(LOGGED_BY_LEVEL)),
    s("log_pooler_errors", Pgbouncer, NotNeeded(LOGGED_BY_LEVEL)),
    s("log_stats", Pgbouncer, NotNeeded("statistics are in /metrics and SHOW STATS, not the log")),
    s("verbose", Pgbouncer, Converted("log_level", "verbose = 1 is log_level = \"iampool=debug,info\", 2 or more \"iampool=trace,info\"")),
    // Console access.
    s("admin_users", Pgbouncer, Same("admin_users")),
    s("stats_users", Pgbouncer, Same("stats_users")),
    // Connection sanity checks and timeouts.
    s("server_reset_query", Pgbouncer, Same("server_reset_query")),
    s("server_reset_query_always", Pgbouncer, Unsupported("in transaction mode iampool resets only what a client changed (RESET ALL after its SET, ...); server_reset_query runs in session mode")),
    s("server_check_delay", Pgbouncer, Same("server_check_delay")),
    s("server_check_query", Pgbouncer, Same("server_check_query")),
    s("server_fast_close", Pgbouncer, Unsupported("iampool has no setting to close session-mode servers before their session ends")),
    s("server_lifetime", Pgbouncer, Same("server_lifetime")),
    s("server_idle_timeout", Pgbouncer, Same("server_idle_timeout")),
    s("server_connect_timeout", Pgbouncer, Same("server_connect_timeout")),
    s("server_login_retry", Pgbouncer, Same("server_login_retry")),
    s("client_login_timeout", Pgbouncer, Same("client_login_timeout")),
    s("autodb_idle_timeout", Pgbouncer, Unsupported("iampool has no automatic databases (the * entry): it serves the databases it lists")),
    s("dns_max_ttl", Pgbouncer, NotNeeded("iampool caches no DNS answers: every login resolves the host again")),
    s("dns_nxdomain_ttl", Pgbouncer, NotNeeded("iampool caches no DNS answers: every login resolves the host again")),
    s("dns_zone_check_period", Pgbouncer, NotNeeded("iampool caches no DNS answers: every login resolves the host again")),
    s("resolv_conf", Pgbouncer, Unsupported("iampool uses the system resolver (/etc/resolv.conf)")),
    s("query_wait_notify", Pgbouncer, Unsupported("iampool sends no notice to a client waiting for a server")),
    // TLS.
    s("client_tls_sslmode", Pgbouncer, Converted("client_tls", "disable, allow and require as in PgBouncer; prefer becomes allow; verify-ca and verify-full become require, as iampool does not check client certificates")),
    s("client_tls_key_file", Pgbouncer, Same("client_tls_key_file")),
    s("client_tls_cert_file", Pgbouncer, Same("client_tls_cert_file")),
    s("client_tls_ca_file", Pgbouncer, Unsupported(NO_CLIENT_CERTS)),
    s("client_tls_protocols", Pgbouncer, Unsupported(RUSTLS_CLIENT)),
    s("client_tls_ciphers", Pgbouncer, Unsupported(RUSTLS_CLIENT)),
    s("client_tls13_ciphers", Pgbouncer, Unsupported(RUSTLS_CLIENT)),
    s("client_tls_ecdhcurve", Pgbouncer, Unsupported(RUSTLS_CLIENT)),
    s("client_tls_dheparams", Pgbouncer, Unsupported(RUSTLS_CLIENT)),
    s("server_tls_sslmode", Pgbouncer, Same("sslmode")),
    s("server_tls_ca_file", Pgbouncer, Same("sslrootcert")),
    s("server_tls_key_file", Pgbouncer, Unsupported(NO_SERVER_CERT)),
    s("server_tls_cert_file", Pgbouncer, Unsupported(NO_SERVER_CERT)),
    s("server_tls_protocols", Pgbouncer, Unsupported(RUSTLS_SERVER)),
    s("server_tls_ciphers", Pgbouncer, Unsupported(RUSTLS_SERVER)),
    s("server_tls13_ciphers", Pgbouncer, Unsupported(RUSTLS_SERVER)),
    // Dangerous timeouts.
    s("query_timeout", Pgbouncer, Same("query_timeout")),
    s("query_wait_timeout", Pgbouncer, Same("query_wait_timeout")),
    s("cancel_wait_timeout", Pgbouncer, NotNeeded("a cancel request goes straight to the server running the client's query; it never waits for a pool")),
    s("client_idle_timeout", Pgbouncer, Same("client_idle_timeout")),
    s("idle_transaction_timeout", Pgbouncer, Same("idle_transaction_timeout")),
    s("transaction_timeout", Pgbouncer, Unsupported("iampool limits idle time inside a transaction (idle_transaction_timeout), not a transaction's length; PostgreSQL 17 can: options = \"-c transaction_timeout=60s\"")),
    s("suspend_timeout", Pgbouncer, Unsupported("iampool has no SUSPEND or online restart (-R): SIGTERM drains it (shutdown_timeout)")),
    // Low-level network settings.
    s("pkt_buf", Pgbouncer, NotNeeded("iampool sizes its buffers itself")),
    s("max_packet_size", Pgbouncer, Converted("max_message_size", "the largest message a client may send, 8kB to 1GB (server messages are bounded by PostgreSQL's 1GB)")),
    s("listen_backlog", Pgbouncer, Unsupported("iampool's listen backlog is fixed")),
    s("sbuf_loopcnt", Pgbouncer, NotNeeded("iampool's runtime takes turns between connections itself")),
    s("so_reuseport", Pgbouncer, NotNeeded("one iampool uses every core (worker_threads), so there is no need for several on one port")),
    s("tcp_defer_accept", Pgbouncer, Unsupported("not set; a client that connects and sends nothing is closed after client_login_timeout")),
    s("tcp_socket_buffer", Pgbouncer, Unsupported("the system's socket buffer sizes apply")),
    s("tcp_keepalive", Pgbouncer, Same("tcp_keepalive")),
    s("tcp_keepcnt", Pgbouncer, Same("tcp_keepcnt")),
    s("tcp_keepidle", Pgbouncer, Same("tcp_keepidle")),
    s("tcp_keepintvl", Pgbouncer, Same("tcp_keepintvl")),
    s("tcp_user_timeout", Pgbouncer, Converted("tcp_user_timeout", "PgBouncer's number is milliseconds: 5000 becomes 5s")),
    // [databases] connection string keywords.
    s("dbname", Databases, Converted("upstream", "the upstream string's dbname (default: the entry's name, as in PgBouncer)")),
    s("host", Databases, Converted("upstream", "the upstream string's host; a list is tried as libpq tries it (see load_balance_hosts); unix sockets are not supported (iampool reaches servers over TCP)")),
    s("port", Databases, Converted("upstream", "the upstream string's port")),
    s("user", Databases, Converted("upstream", "the upstream string's user: iampool signs in as one user per database, so an entry without user= needs one")),
    s("password", Databases, Same("password")),
    s("auth_user", Databases, Unsupported(NO_AUTH_QUERY)),
    s("auth_query", Databases, Unsupported(NO_AUTH_QUERY)),
    s("auth_dbname", Databases, Unsupported(NO_AUTH_QUERY)),
    s("pool_size", Databases, Same("pool_size")),
    s("min_pool_size", Databases, Same("min_pool_size")),
    s("reserve_pool_size", Databases, Same("reserve_pool_size")),
    s("reserve_pool", Databases, Same("reserve_pool_size")),
    s("connect_query", Databases, Unsupported("iampool runs no query at login; options = \"-c NAME=VALUE\" sets parameters at login")),
    s("pool_mode", Databases, Converted("pool_mode", "session and transaction as in PgBouncer; there is no statement mode (transaction is the nearest)")),
    s("load_balance_hosts", Databases, Converted("load_balance_hosts", "round-robin becomes random (the hosts shuffled for each login), disable stays disable (in order, next after a failure); PgBouncer's default is round-robin, iampool's disable")),
    s("max_db_connections", Databases, Same("max_db_connections")),
    s("max_db_client_connections", Databases, Unsupported(CLIENT_LIMIT)),
    s("server_lifetime", Databases, Unsupported("iampool's server_lifetime is one setting for every database: set it at the top level")),
    s("client_encoding", Databases, Converted("options", OPTIONS)),
    s("datestyle", Databases, Converted("options", OPTIONS)),
    s("timezone", Databases, Converted("options", OPTIONS)),
    s("application_name", Databases, Same("application_name")),
    // [users] keywords.
    s("pool_size", Users, Unsupported(NO_USER_SETTINGS)),
    s("reserve_pool_size", Users, Unsupported(NO_USER_SETTINGS)),
    s("pool_mode", Users, Unsupported(NO_USER_SETTINGS)),
    s("max_user_connections", Users, Unsupported(NO_USER_SETTINGS)),
    s("query_timeout", Users, Unsupported(NO_USER_SETTINGS)),
    s("idle_transaction_timeout", Users, Unsupported(NO_USER_SETTINGS)),
    s("transaction_timeout", Users, Unsupported(NO_USER_SETTINGS)),
    s("client_idle_timeout", Users, Unsupported(NO_USER_SETTINGS)),
    s("max_user_client_connections", Users, Unsupported(NO_USER_SETTINGS)),
    // [peers] keywords.
    s("host", Peers, Unsupported(NO_PEERING)),
    s("port", Peers, Unsupported(NO_PEERING)),
    s("pool_size", Peers, Unsupported(NO_PEERING)),
];

/// The PgBouncer setting of this name in this section.
pub fn setting(name: &str, section: Section) -> Option<&'static Setting> {
    SETTINGS
        .iter()
        .find(|s| s.section == section && s.name.eq_ignore_ascii_case(name))
}

/// The fix for `name`, unknown to iampool where it was written, when it is a PgBouncer
/// setting of `section`; `spell` writes an iampool key as the place it was found spells
/// keys (`pool_size`, `IAMPOOL_POOL_SIZE`, `--pool-size`).
pub fn hint(name: &str, section: Section, spell: &dyn Fn(&str) -> String) -> Option<String> {
    let setting = setting(name, section)?;
    let theirs = format!("PgBouncer's {}", setting.name);
    Some(match (setting.fate, setting.iampool_key()) {
        (Fate::Converted(key, how), _) => format!("{theirs} is iampool's {}: {how}", spell(key)),
        (_, Some(key)) => format!("{theirs} is iampool's {}", spell(key)),
        (Fate::NotYet(_, what), None) => {
            format!("{theirs} ({what}) is not in iampool yet; remove it")
        }
        (Fate::NotNeeded(why), _) => format!("{theirs} is not needed by iampool: {why}; remove it"),
        (Fate::Unsupported(why), _) => {
            format!("{theirs} has no counterpart in iampool: {why}; remove it")
        }
        (Fate::Key(_), None) => unreachable!("a Key fate always names a key"),
    })
}

/// The README's "Coming from PgBouncer" table: every setting, by section.
pub fn markdown_table() -> String {
    let mut out = String::new();
    for section in Section::ALL {
        let _ = writeln!(out, "| `[{}]` | iampool |", section.name());
        out.push_str("|---|---|\n");
        for setting in SETTINGS.iter().filter(|s| s.section == section) {
            let cell = match (setting.fate, setting.iampool_key()) {
                (Fate::Converted(key, how), _) => format!("`{key}`: {how}"),
                (_, Some(key)) => format!("`{key}`"),
                (Fate::NotYet(key, what), None) => format!("not yet ({what}; planned as `{key}`)"),
                (Fate::NotNeeded(why), _) => format!("not needed: {why}"),
                (Fate::Unsupported(why), _) => format!("not supported: {why}"),
                (Fate::Key(_), None) => unreachable!("a Key fate always names a key"),
            };
            let _ = writeln!(out, "| `{}` | {} |", setting.name, cell.replace('|', "\\|"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_listed_once_per_section() {
        for (i, a) in SETTINGS.iter().enumerate() {
            assert!(
                SETTINGS[i + 1..]
                    .iter()
                    .all(|b| b.section != a.section || b.name != a.name),
                "{} twice in [{}]",
                a.name,
                a.section.name()
            );
        }
        let count = |section| SETTINGS.iter().filter(|s| s.section == section).count();
        // PgBouncer 1.25's documented settings (and reserve_pool, the old name it still reads).
        assert_eq!(count(Pgbouncer), 99);
        assert_eq!(count(Databases), 22);
        assert_eq!(count(Users), 9);
        assert_eq!(count(Peers), 3);
    }

    #[test]
    fn named_iampool_keys_exist_where_the_setting_lives() {
        for setting in SETTINGS {
            let named = match setting.fate {
                Fate::Key(key) | Fate::Converted(key, _) => key,
                _ => continue,
            };
            if named == "password" {
                assert_eq!(setting.section, Databases);
                continue;
            }
            let key = keys::key(named)
                .unwrap_or_else(|| panic!("{} names {named}, not a key", setting.name));
            match setting.section {
                Pgbouncer => assert!(key.is_global(), "{}: {named}", setting.name),
                Databases => assert!(
                    key.is_per_database() || named == "upstream",
                    "{}: {named}",
                    setting.name
                ),
                Users | Peers => panic!("iampool has no per-user or peer keys"),
            }
        }
    }

    #[test]
    fn not_yet_settings_name_keys_iampool_lacks_or_carry_them() {
        for setting in SETTINGS {
            if let Fate::NotYet(key, _) = setting.fate {
                assert_eq!(
                    setting.iampool_key().is_some(),
                    keys::key(key).is_some(),
                    "{}",
                    setting.name
                );
            }
        }
    }

    #[test]
    fn hints_name_the_iampool_key_as_the_place_spells_it() {
        let file = |k: &str| k.to_string();
        let env = |k: &str| format!("IAMPOOL_{}", k.to_ascii_uppercase());
        assert_eq!(
            hint("default_pool_size", Pgbouncer, &file).unwrap(),
            "PgBouncer's default_pool_size is iampool's pool_size"
        );
        assert_eq!(
            hint("DEFAULT_POOL_SIZE", Pgbouncer, &env).unwrap(),
            "PgBouncer's default_pool_size is iampool's IAMPOOL_POOL_SIZE"
        );
        let listen = hint("listen_port", Pgbouncer, &file).unwrap();
        assert!(
            listen.starts_with("PgBouncer's listen_port is iampool's listen: "),
            "{listen}"
        );
        let pidfile = hint("pidfile", Pgbouncer, &file).unwrap();
        assert!(
            pidfile.contains("not needed") && pidfile.ends_with("remove it"),
            "{pidfile}"
        );
        let hba = hint("auth_hba_file", Pgbouncer, &file).unwrap();
        assert!(
            hba.contains("no counterpart") && hba.contains("HBA"),
            "{hba}"
        );
        if keys::key("query_timeout").is_none() {
            let not_yet = hint("query_timeout", Pgbouncer, &file).unwrap();
            assert!(not_yet.contains("not in iampool yet"), "{not_yet}");
        }
        assert_eq!(
            hint("timezone", Databases, &file).unwrap(),
            format!("PgBouncer's timezone is iampool's options: {OPTIONS}")
        );
        assert!(hint("pool_size", Users, &file)
            .unwrap()
            .contains("per-user"));
        assert_eq!(hint("pool_sise", Pgbouncer, &file), None);
    }

    #[test]
    fn readme_table_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let (begin, end) = (
            "<!-- pgbouncer-settings: generated by src/config/pgbouncer.rs -->\n",
            "<!-- end of pgbouncer-settings -->\n",
        );
        let readme = std::fs::read_to_string(path).expect("README.md");
        let start = readme.find(begin).expect("README has the PgBouncer table") + begin.len();
        let stop = start + readme[start..].find(end).expect("the table's end marker");
        let table = markdown_table();
        if std::env::var_os("UPDATE_EXAMPLE").is_some() && readme[start..stop] != table {
            let updated = format!("{}{table}{}", &readme[..start], &readme[stop..]);
            std::fs::write(path, updated).expect("write README.md");
            return;
        }
        assert!(
            readme[start..stop] == table,
            "README.md's PgBouncer table is out of date: run UPDATE_EXAMPLE=1 cargo test --lib config::"
        );
    }
}
