//! The `[pgbouncer]` settings as iampool's top-level keys: each setting through the table in
//! [`super::super::pgbouncer`], a few by hand (listening, the pool mode, the log level, the
//! message size here; client authentication and TLS in `auth.rs`), and PgBouncer's defaults
//! written out where iampool's differ.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::super::cli::default_text;
use super::super::error::did_you_mean;
use super::super::pgbouncer::{self, Fate, Section, Setting};
use super::super::UserSecret;
use super::ini::{Entry, InputError, Location};
use super::report::{Kind, Report};
use super::value::{self, Bad};

/// One key of the written configuration.
#[derive(Clone, Debug)]
pub struct Item {
    pub key: &'static str,
    pub value: toml::Value,
    /// Where it came from, for the comment above it.
    pub from: String,
    /// A password: written, never reported.
    pub secret: bool,
}

/// One `[databases.NAME]` table.
#[derive(Clone, Debug)]
pub struct Database {
    pub name: String,
    pub at: Location,
    pub items: Vec<Item>,
}

/// The configuration to write.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub globals: Vec<Item>,
    pub databases: Vec<Database>,
}

/// The state of one import.
pub struct Import<'a> {
    pub plan: Plan,
    pub report: Report,
    pub errors: Vec<InputError>,
    /// The auth file given on the command line, if any.
    pub userlist_arg: Option<&'a Path>,
    /// The auth file's users, once read.
    pub users: Vec<(String, UserSecret)>,
    /// `admin_users` and `stats_users`.
    pub console_users: Vec<String>,
}

/// `[pgbouncer]` settings taken by hand rather than through the table.
pub const BY_HAND: &[&str] = &[
    "tcp_user_timeout",
    "listen_addr",
    "listen_port",
    "unix_socket_dir",
    "pool_mode",
    "default_pool_size",
    "max_client_conn",
    "auth_type",
    "auth_file",
    "client_tls_sslmode",
    "verbose",
    "max_packet_size",
];

/// iampool keys whose 0 is a real zero where PgBouncer's 0 turns the limit off.
const ZERO_IS_OFF: &[&str] = &[
    "query_wait_timeout",
    "client_login_timeout",
    "server_connect_timeout",
];

/// What a note shows of a setting: its value, unless it may hold a secret.
pub fn shown(name: &str, value: &str) -> String {
    if name.contains("password") || name == "auth_ldap_options" {
        format!("{name} = (not shown)")
    } else {
        format!("{name} = {value}")
    }
}

impl Import<'_> {
    pub fn global(&mut self, key: &'static str, value: toml::Value, from: impl Into<String>) {
        self.plan.globals.push(Item {
            key,
            value,
            from: from.into(),
            secret: false,
        });
    }

    pub fn error(&mut self, at: &Location, message: String, fix: &str) {
        self.errors.push(InputError::new(at, message, fix));
    }

    /// Every `[pgbouncer]` setting (the last of each name).
    pub fn globals(&mut self, entries: &[&Entry]) {
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.key.eq_ignore_ascii_case(name))
                .copied()
        };
        for name in ["admin_users", "stats_users"] {
            if let Some(entry) = find(name) {
                let names = entry.value.split(',').map(|n| n.trim().to_string());
                self.console_users.extend(names.filter(|n| !n.is_empty()));
            }
        }
        self.listen(find("listen_addr"), find("listen_port"));
        self.unix_socket_dir(find("unix_socket_dir"));
        self.pool_mode(find("pool_mode"));
        self.with_default(find("default_pool_size"), "default_pool_size", "20");
        self.with_default(find("max_client_conn"), "max_client_conn", "100");
        self.auth_file(find("auth_file"));
        self.auth_type(find("auth_type"));
        self.client_tls(find("client_tls_sslmode"), find("client_tls_cert_file"));
        if let Some(entry) = find("verbose") {
            self.verbose(entry);
        }
        if let Some(entry) = find("max_packet_size") {
            self.max_packet_size(entry);
        }
        if let Some(entry) = find("tcp_user_timeout") {
            self.tcp_user_timeout(entry);
        }
        for entry in entries {
            let name = entry.key.to_ascii_lowercase();
            if BY_HAND.contains(&name.as_str()) {
                continue;
            }
            match pgbouncer::setting(&name, Section::Pgbouncer) {
                Some(setting) => self.through_table(entry, setting),
                None => {
                    let known = pgbouncer::SETTINGS
                        .iter()
                        .filter(|s| s.section == Section::Pgbouncer)
                        .map(|s| s.name);
                    let hint = match did_you_mean(&name, known) {
                        Some(close) => format!(" (did you mean {close}?)"),
                        None => String::new(),
                    };
                    self.report.note(
                        Kind::NotCarried,
                        Some(&entry.at),
                        format!("{name}: not a PgBouncer 1.25 setting{hint}"),
                    );
                }
            }
        }
    }

    /// A setting the table maps: to its iampool key, or a note saying why not.
    pub fn through_table(&mut self, entry: &Entry, setting: &Setting) {
        let name = setting.name;
        let at = Some(&entry.at);
        match (setting.fate, setting.key()) {
            (_, Some(key)) => {
                let off = ZERO_IS_OFF.contains(&key.name)
                    && value::seconds(&entry.value).is_some_and(|t| t.is_zero());
                if off {
                    let text = format!(
                        "{name} = 0: PgBouncer takes 0 as no limit, iampool always has one; its default ({}) applies: set a long {} instead",
                        default_text(key),
                        key.name
                    );
                    self.report.note(Kind::NotCarried, at, text);
                    return;
                }
                match value::for_key(key, &entry.value) {
                    Ok(converted) => {
                        let text = format!(
                            "{} -> {} = {converted}",
                            shown(name, &entry.value),
                            key.name
                        );
                        self.report.note(Kind::Carried, at, text);
                        self.global(key.name, converted, format!("{} {name}", entry.at));
                    }
                    Err(Bad::Pgbouncer(message)) => self.error(
                        &entry.at,
                        format!("{name}: {message}"),
                        "fix the value in pgbouncer.ini (PgBouncer would refuse it too)",
                    ),
                    Err(Bad::Iampool(message)) => {
                        self.report
                            .note(Kind::NotCarried, at, format!("{name}: {message}"));
                    }
                }
            }
            (Fate::NotYet(key, what), None) => self.report.note(
                Kind::NotYet,
                at,
                format!(
                    "{}: {what} (planned as iampool's {key})",
                    shown(name, &entry.value)
                ),
            ),
            (Fate::NotNeeded(why), _) => {
                self.report
                    .note(Kind::NotNeeded, at, format!("{name}: {why}"));
            }
            (Fate::Unsupported(why), _) => {
                self.report
                    .note(Kind::NotCarried, at, format!("{name}: {why}"));
            }
            (Fate::Key(key) | Fate::Converted(key, _), None) => self.report.note(
                Kind::NotCarried,
                at,
                format!("{name}: iampool's {key} is not a top-level key"),
            ),
        }
    }

    /// A table setting whose PgBouncer default differs from iampool's: written either way.
    fn with_default(&mut self, entry: Option<&Entry>, name: &str, default: &str) {
        let setting = pgbouncer::setting(name, Section::Pgbouncer).expect("in the table");
        match entry {
            Some(entry) => self.through_table(entry, setting),
            None => {
                let key = setting.key().expect("maps to a key");
                let value = value::for_key(key, default).expect("PgBouncer's default is valid");
                self.report.note(
                    Kind::Carried,
                    None,
                    format!(
                        "{} = {value}: PgBouncer's default {name} (iampool's own is {})",
                        key.name,
                        default_text(key)
                    ),
                );
                self.global(key.name, value, format!("PgBouncer's default {name}"));
            }
        }
    }

    fn listen(&mut self, addr: Option<&Entry>, port: Option<&Entry>) {
        let number = match port {
            Some(entry) => match value::integer(&entry.value).and_then(|p| u16::try_from(p).ok()) {
                Some(port) => port,
                None => {
                    self.error(
                        &entry.at,
                        format!("listen_port: {:?} is not a port", entry.value),
                        "set a port number from 1 to 65535",
                    );
                    return;
                }
            },
            None => 6432,
        };
        let at = addr.or(port).map(|e| &e.at);
        let listed = addr.map(|e| e.value.trim()).filter(|v| !v.is_empty());
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for item in listed.unwrap_or_default().split(',').map(str::trim) {
            match item {
                "" => {}
                "*" => addrs.push(SocketAddr::from(([0, 0, 0, 0], number))),
                _ => match item.trim_matches(['[', ']']).parse::<IpAddr>() {
                    Ok(ip) => addrs.push(SocketAddr::new(ip, number)),
                    Err(_) => match (item, number).to_socket_addrs() {
                        Ok(found) => {
                            let found: Vec<SocketAddr> = found.collect();
                            let list: Vec<String> =
                                found.iter().map(|a| a.ip().to_string()).collect();
                            self.report.note(
                                Kind::Changed,
                                at,
                                format!(
                                    "listen_addr {item} resolved here to {} (iampool listens on addresses, PgBouncer resolved the name when it started)",
                                    list.join(", ")
                                ),
                            );
                            addrs.extend(found);
                        }
                        Err(e) => self.report.note(
                            Kind::NotCarried,
                            at,
                            format!("listen_addr {item}: cannot resolve it here ({e}): write its address instead"),
                        ),
                    },
                },
            }
        }
        addrs.dedup();
        if addrs.is_empty() {
            addrs.push(SocketAddr::from(([127, 0, 0, 1], number)));
            let why = match listed {
                None => {
                    "listen_addr is not set, so PgBouncer took connections on its unix socket only"
                }
                Some(_) => "no address of listen_addr is left",
            };
            self.report.note(
                Kind::Changed,
                at,
                format!("{why}; iampool always listens on TCP: listen = \"127.0.0.1:{number}\""),
            );
        }
        let list: Vec<toml::Value> = addrs
            .iter()
            .map(|a| toml::Value::String(a.to_string()))
            .collect();
        let value = toml::Value::Array(list);
        let mut text = format!(
            "listen_addr = {}, listen_port = {number} -> listen = {value}",
            listed.unwrap_or("(unset)")
        );
        if listed.is_some_and(|l| l.split(',').any(|a| a.trim() == "*")) {
            text.push_str(&format!(
                " (* is every IPv4 address; for IPv6 as well write \"[::]:{number}\" instead, which on Linux takes IPv4 too)"
            ));
        }
        self.report.note(Kind::Carried, at, text);
        self.global("listen", value, "listen_addr, listen_port");
    }

    fn unix_socket_dir(&mut self, entry: Option<&Entry>) {
        let Some(entry) = entry else {
            self.report.note(
                Kind::Carried,
                None,
                "unix_socket_dir = \"/tmp\": PgBouncer's default (iampool makes no unix socket unless it is set)",
            );
            self.global(
                "unix_socket_dir",
                toml::Value::String("/tmp".into()),
                "PgBouncer's default unix_socket_dir",
            );
            return;
        };
        let at = Some(&entry.at);
        match entry.value.as_str() {
            "" => self.report.note(
                Kind::Carried,
                at,
                "unix_socket_dir is empty: no unix socket, as in PgBouncer",
            ),
            dir if dir.starts_with('@') => self.report.note(
                Kind::NotCarried,
                at,
                format!("unix_socket_dir = {dir}: iampool makes no abstract-namespace sockets; set a directory"),
            ),
            dir => {
                self.report.note(
                    Kind::Carried,
                    at,
                    format!("unix_socket_dir = {dir} -> unix_socket_dir = {dir:?} (for clients; iampool reaches servers over TCP)"),
                );
                self.global(
                    "unix_socket_dir",
                    toml::Value::String(dir.into()),
                    format!("{} unix_socket_dir", entry.at),
                );
            }
        }
    }

    fn pool_mode(&mut self, entry: Option<&Entry>) {
        let Some(entry) = entry else {
            self.report.note(
                Kind::Carried,
                None,
                "pool_mode = \"session\": PgBouncer's default (iampool's own is transaction)",
            );
            self.global(
                "pool_mode",
                toml::Value::String("session".into()),
                "PgBouncer's default pool_mode",
            );
            return;
        };
        if let Some(mode) = self.mode(entry, "pool_mode", &entry.value) {
            self.global("pool_mode", mode, format!("{} pool_mode", entry.at));
        }
    }

    /// A pool mode (global or a database's): session and transaction as they are, statement
    /// as transaction.
    pub fn mode(&mut self, entry: &Entry, what: &str, mode: &str) -> Option<toml::Value> {
        let at = Some(&entry.at);
        let carried = match mode.to_ascii_lowercase().as_str() {
            mode @ ("session" | "transaction") => {
                self.report.note(
                    Kind::Carried,
                    at,
                    format!("{what} = {mode} -> pool_mode = {mode:?}"),
                );
                mode.to_string()
            }
            "statement" => {
                self.report.note(
                    Kind::Changed,
                    at,
                    format!("{what} = statement -> pool_mode = \"transaction\": iampool has no statement mode; transaction mode also lets a transaction span statements"),
                );
                "transaction".into()
            }
            other => {
                self.error(
                    &entry.at,
                    format!("{what}: {other:?} is not a pool mode"),
                    "PgBouncer takes session, transaction or statement",
                );
                return None;
            }
        };
        Some(toml::Value::String(carried))
    }

    fn verbose(&mut self, entry: &Entry) {
        let level = match value::integer(&entry.value) {
            Some(0) => {
                self.report.note(
                    Kind::Carried,
                    Some(&entry.at),
                    "verbose = 0: log_level stays info",
                );
                return;
            }
            Some(1) => "iampool=debug,info",
            Some(n) if n > 1 => "iampool=trace,info",
            _ => {
                self.error(
                    &entry.at,
                    format!("verbose: {:?} is not 0, 1, 2 or 3", entry.value),
                    "fix the value in pgbouncer.ini (PgBouncer would refuse it too)",
                );
                return;
            }
        };
        self.report.note(
            Kind::Carried,
            Some(&entry.at),
            format!("verbose = {} -> log_level = {level:?}", entry.value),
        );
        self.global(
            "log_level",
            toml::Value::String(level.into()),
            format!("{} verbose", entry.at),
        );
    }

    /// PgBouncer's tcp_user_timeout is a number of milliseconds, not seconds.
    fn tcp_user_timeout(&mut self, entry: &Entry) {
        let Some(ms) = value::integer(&entry.value).filter(|n| *n >= 0) else {
            self.error(
                &entry.at,
                format!(
                    "tcp_user_timeout: {:?} is not a number of milliseconds",
                    entry.value
                ),
                "fix the value in pgbouncer.ini (PgBouncer would refuse it too)",
            );
            return;
        };
        let carried = value::duration(std::time::Duration::from_millis(ms as u64));
        let text = format!("tcp_user_timeout = {ms} -> tcp_user_timeout = {carried}");
        self.report.note(Kind::Carried, Some(&entry.at), text);
        self.global(
            "tcp_user_timeout",
            carried,
            format!("{} tcp_user_timeout", entry.at),
        );
    }

    fn max_packet_size(&mut self, entry: &Entry) {
        let at = Some(&entry.at);
        let Some(bytes) = value::integer(&entry.value).filter(|n| *n > 0) else {
            self.error(
                &entry.at,
                format!(
                    "max_packet_size: {:?} is not a number of bytes",
                    entry.value
                ),
                "fix the value in pgbouncer.ini (PgBouncer would refuse it too)",
            );
            return;
        };
        let (least, most) = (8 << 10, 1 << 30);
        let carried = bytes.clamp(least, most);
        let text = format!("max_packet_size = {bytes} -> max_message_size = {carried}");
        if carried == bytes {
            self.report.note(Kind::Carried, at, text);
        } else {
            self.report.note(
                Kind::Changed,
                at,
                format!("{text}: iampool takes 8kB to 1GB (PgBouncer's limit also covered server messages; PostgreSQL's own is 1GB)"),
            );
        }
        self.global(
            "max_message_size",
            toml::Value::Integer(carried),
            format!("{} max_packet_size", entry.at),
        );
    }
}
