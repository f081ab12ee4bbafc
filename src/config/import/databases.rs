//! `[databases]` entries as `[databases.NAME]` tables (the connection string's host, port,
//! dbname and user become the upstream string, the rest go through the table in
//! [`super::super::pgbouncer`]), and notes for the `[users]` and `[peers]` entries, which
//! iampool has no place for.

use super::super::error::did_you_mean;
use super::super::pgbouncer::{self, Fate, Section, Setting};
use super::super::UserSecret;
use super::convert::{shown, Database, Import, Item};
use super::ini::{self, Entry};
use super::report::Kind;
use super::value::{self, Bad};

/// `[databases]` keywords taken by hand rather than through the table.
#[cfg(test)]
pub const BY_HAND: &[&str] = &[
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "pool_mode",
    "load_balance_hosts",
    "client_encoding",
    "datestyle",
    "timezone",
];

const PAIRS_FIX: &str =
    "write keyword=value pairs separated by spaces, a value with spaces in single quotes";

/// The upstream parts of one entry.
#[derive(Default)]
struct Parts {
    host: Option<String>,
    port: Option<String>,
    dbname: Option<String>,
    user: Option<String>,
    password: Option<String>,
}

impl Import<'_> {
    pub fn databases(&mut self, entries: &[&Entry]) {
        for entry in entries {
            if let Some(database) = self.database(entry) {
                self.plan.databases.push(database);
            }
        }
    }

    fn database(&mut self, entry: &Entry) -> Option<Database> {
        let name = entry.key.as_str();
        if !self.servable(entry) {
            return None;
        }
        let pairs = match ini::pairs(&entry.value) {
            Ok(pairs) => last_wins(pairs),
            Err(message) => {
                self.error(
                    &entry.at,
                    format!("[databases] {name}: {message}"),
                    PAIRS_FIX,
                );
                return None;
            }
        };
        let mut database = Database {
            name: name.to_string(),
            at: entry.at.clone(),
            items: Vec::new(),
        };
        let mut parts = Parts::default();
        for (keyword, text) in &pairs {
            let slot = match keyword.as_str() {
                "host" => &mut parts.host,
                "port" => &mut parts.port,
                "dbname" => &mut parts.dbname,
                "user" => &mut parts.user,
                "password" => &mut parts.password,
                _ => continue,
            };
            *slot = Some(text.clone());
        }
        let upstream = self.upstream(entry, &mut parts)?;
        database.items.push(Item {
            key: "upstream",
            value: toml::Value::String(upstream),
            from: format!("{} host, port, dbname, user", entry.at),
            secret: false,
        });
        self.password(&mut database, entry, &parts);
        let several_hosts = parts.host.as_deref().is_some_and(|h| h.contains(','));
        self.settings(&mut database, entry, pairs, several_hosts);
        Some(database)
    }

    /// Whether the entry names a database iampool can serve under that name.
    fn servable(&mut self, entry: &Entry) -> bool {
        let name = entry.key.as_str();
        let at = Some(&entry.at);
        if name == "*" {
            self.report.note(
                Kind::NotCarried,
                at,
                "* (the fallback database): iampool serves only the databases it lists, each one pool with its own upstream login; add an entry for each database clients use",
            );
            return false;
        }
        if crate::client::console::is_console_database(name) {
            self.report.note(
                Kind::NotCarried,
                at,
                format!("[databases] {name}: iampool's admin console answers to {name}; give the database another name"),
            );
            return false;
        }
        true
    }

    /// The entry's keywords besides the upstream's parts.
    fn settings(
        &mut self,
        database: &mut Database,
        entry: &Entry,
        pairs: Vec<(String, String)>,
        several_hosts: bool,
    ) {
        let name = database.name.clone();
        let at = Some(&entry.at);
        let mut options = Vec::new();
        let mut hosts_order = None;
        for (keyword, text) in pairs {
            match keyword.as_str() {
                "host" | "port" | "dbname" | "user" | "password" => {}
                "pool_mode" => {
                    let what = format!("{name}: pool_mode");
                    if let Some(mode) = self.mode(entry, &what, &text) {
                        push(database, "pool_mode", mode, entry, &keyword);
                    }
                }
                "load_balance_hosts" => hosts_order = Some(text),
                "client_encoding" | "datestyle" | "timezone" => {
                    self.report.note(
                        Kind::Carried,
                        at,
                        format!("{name}: {keyword}={text} -> options (-c {keyword}=...)"),
                    );
                    options.push((keyword, text));
                }
                _ => match pgbouncer::setting(&keyword, Section::Databases) {
                    Some(setting) => self.keyword(database, entry, setting, &text),
                    None => {
                        let known = pgbouncer::SETTINGS
                            .iter()
                            .filter(|s| s.section == Section::Databases)
                            .map(|s| s.name);
                        let hint = match did_you_mean(&keyword, known) {
                            Some(close) => format!(" (did you mean {close}?)"),
                            None => String::new(),
                        };
                        self.report.note(
                            Kind::NotCarried,
                            at,
                            format!("{name}: {keyword} is not a PgBouncer 1.25 connection keyword{hint}"),
                        );
                    }
                },
            }
        }
        self.hosts_order(database, entry, hosts_order, several_hosts);
        if !options.is_empty() {
            let names: Vec<&str> = options.iter().map(|(k, _)| k.as_str()).collect();
            let words: Vec<String> = options.iter().map(|(k, v)| value::option(k, v)).collect();
            push(
                database,
                "options",
                toml::Value::String(words.join(" ")),
                entry,
                &names.join(", "),
            );
        }
    }

    /// A keyword through the table: to the database's iampool key, or a note.
    fn keyword(&mut self, database: &mut Database, entry: &Entry, setting: &Setting, text: &str) {
        let name = &database.name;
        let at = Some(&entry.at);
        let keyword = setting.name;
        match (setting.fate, setting.key()) {
            (_, Some(key)) if key.is_per_database() => match value::for_key(key, text) {
                Ok(converted) => {
                    self.report.note(
                        Kind::Carried,
                        at,
                        format!("{name}: {keyword}={text} -> {} = {converted}", key.name),
                    );
                    push(database, key.name, converted, entry, keyword);
                }
                Err(Bad::Pgbouncer(message)) => self.error(
                    &entry.at,
                    format!("[databases] {name}: {keyword}: {message}"),
                    "fix the value in pgbouncer.ini (PgBouncer would refuse it too)",
                ),
                Err(Bad::Iampool(message)) => {
                    self.report
                        .note(Kind::NotCarried, at, format!("{name}: {message}"));
                }
            },
            (Fate::NotYet(key, what), None) => self.report.note(
                Kind::NotYet,
                at,
                format!("{name}: {keyword}={text}: {what} (planned as iampool's {key})"),
            ),
            (Fate::NotNeeded(why), _) => {
                self.report
                    .note(Kind::NotNeeded, at, format!("{name}: {keyword}: {why}"));
            }
            (Fate::Unsupported(why), _) => self.report.note(
                Kind::NotCarried,
                at,
                format!("{name}: {}: {why}", shown(keyword, text)),
            ),
            (_, _) => self.report.note(
                Kind::NotCarried,
                at,
                format!("{name}: {keyword}: iampool has no per-database key for it"),
            ),
        }
    }

    /// The libpq keyword=value string of the entry's server, or `None` (with a note) when
    /// iampool cannot reach it as written.
    fn upstream(&mut self, entry: &Entry, parts: &mut Parts) -> Option<String> {
        let name = entry.key.as_str();
        let at = Some(&entry.at);
        let host = match parts.host.as_deref() {
            None => {
                self.report.note(
                    Kind::NotCarried,
                    at,
                    format!("[databases] {name}: no host=, so PgBouncer connects over its unix socket; iampool reaches servers over TCP only: add host=127.0.0.1 (or the server's address) and import again"),
                );
                return None;
            }
            Some(host) if host.split(',').any(|h| h.starts_with(['/', '@'])) => {
                self.report.note(
                    Kind::NotCarried,
                    at,
                    format!("[databases] {name}: host={host} is a unix socket; iampool reaches servers over TCP only: write the server's address and import again"),
                );
                return None;
            }
            Some(host) => host.to_string(),
        };
        if let Some(port) = &parts.port {
            if !value::integer(port).is_some_and(|p| (1..=65535).contains(&p)) {
                self.error(
                    &entry.at,
                    format!("[databases] {name}: port={port:?} is not a port"),
                    "write a port number from 1 to 65535",
                );
                return None;
            }
        }
        let user = match parts.user.clone() {
            Some(user) => user,
            None => self.only_user(entry)?,
        };
        parts.user = Some(user.clone());
        let mut words = vec![format!("host={}", value::libpq_quoted(&host))];
        if let Some(port) = &parts.port {
            words.push(format!("port={port}"));
        }
        let dbname = parts.dbname.as_deref().unwrap_or(name);
        words.push(format!("dbname={}", value::libpq_quoted(dbname)));
        words.push(format!("user={}", value::libpq_quoted(&user)));
        let upstream = words.join(" ");
        self.report.note(
            Kind::Carried,
            at,
            format!("[databases] {name} -> [databases.{name}] upstream = {upstream:?}"),
        );
        Some(upstream)
    }

    /// The one user an entry without user= can sign in as: the auth file's only user besides
    /// admin_users and stats_users.
    fn only_user(&mut self, entry: &Entry) -> Option<String> {
        let name = entry.key.as_str();
        let candidates: Vec<&str> = self
            .users
            .iter()
            .map(|(user, _)| user.as_str())
            .filter(|user| !self.console_users.iter().any(|c| c == user))
            .collect();
        if let [only] = candidates.as_slice() {
            let only = only.to_string();
            self.report.note(
                Kind::Changed,
                Some(&entry.at),
                format!("[databases] {name}: no user=, so PgBouncer signed in as each client; iampool signs in as one user per database: {only}, the auth file's only user besides admin_users and stats_users"),
            );
            return Some(only);
        }
        let listed = match candidates.len() {
            0 => "the auth file lists none besides admin_users and stats_users".to_string(),
            _ => format!("the auth file lists {}", candidates.join(", ")),
        };
        self.report.note(
            Kind::NotCarried,
            Some(&entry.at),
            format!("[databases] {name}: no user=, so PgBouncer signed in as each client; iampool signs in as one user per database, and {listed}: add user=NAME (and password=) to the entry and import again"),
        );
        None
    }

    /// The server password: the entry's own, else the auth file's plain password for its
    /// user (as PgBouncer takes it), else a note.
    fn password(&mut self, database: &mut Database, entry: &Entry, parts: &Parts) {
        let name = database.name.clone();
        let user = parts.user.clone().unwrap_or_default();
        let at = Some(&entry.at);
        let in_auth_file = self.users.iter().find(|(u, _)| *u == user);
        let (password, from) = match (&parts.password, in_auth_file) {
            (Some(password), _) => (password.clone(), format!("{} password", entry.at)),
            (None, Some((_, UserSecret::Plain(password)))) => {
                self.report.note(
                    Kind::Carried,
                    at,
                    format!("{name}: the password of {user} from the auth file -> [databases.{name}] password (not shown), as PgBouncer signs in with it"),
                );
                (
                    password.expose().to_string(),
                    format!("the auth file's password of {user}"),
                )
            }
            (None, found) => {
                let why = match found {
                    Some((_, UserSecret::Md5(_))) => "the auth file holds only an md5 hash of it",
                    Some(_) => "the auth file holds only a SCRAM secret of it",
                    None => "neither the entry nor the auth file has it",
                };
                self.report.note(
                    Kind::NotCarried,
                    at,
                    format!("{name}: the server password of {user}: {why}, and iampool signs in with the password itself; set password in [databases.{name}] (or PGPASSWORD), or sign in with auth=iam"),
                );
                return;
            }
        };
        if parts.password.is_some() {
            self.report.note(
                Kind::Carried,
                at,
                format!("{name}: password=(not shown) -> [databases.{name}] password"),
            );
        }
        if in_auth_file.is_none() {
            self.report.note(
                Kind::Changed,
                at,
                format!("{name}: iampool also lets {user} log in as a client with the server password, as {user} is not in the auth file (PgBouncer did not)"),
            );
        }
        database.items.push(Item {
            key: "password",
            value: toml::Value::String(password),
            from,
            secret: true,
        });
    }

    fn hosts_order(
        &mut self,
        database: &mut Database,
        entry: &Entry,
        given: Option<String>,
        several_hosts: bool,
    ) {
        let name = database.name.clone();
        let at = Some(&entry.at);
        let order = match given.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None if several_hosts => {
                self.report.note(
                    Kind::Changed,
                    at,
                    format!("{name}: PgBouncer takes a host list round-robin by default -> load_balance_hosts = \"random\" (each login shuffles the hosts, and tries the next one after a failure)"),
                );
                "random"
            }
            None => return,
            Some("round-robin") => {
                self.report.note(
                    Kind::Changed,
                    at,
                    format!("{name}: load_balance_hosts=round-robin -> load_balance_hosts = \"random\" (each login shuffles the hosts)"),
                );
                "random"
            }
            Some("disable") => {
                self.report.note(
                    Kind::Carried,
                    at,
                    format!(
                        "{name}: load_balance_hosts=disable -> load_balance_hosts = \"disable\""
                    ),
                );
                "disable"
            }
            Some(other) => {
                self.error(
                    &entry.at,
                    format!("[databases] {name}: load_balance_hosts={other:?} is not a choice"),
                    "PgBouncer takes round-robin or disable",
                );
                return;
            }
        };
        push(
            database,
            "load_balance_hosts",
            toml::Value::String(order.into()),
            entry,
            "load_balance_hosts",
        );
    }

    /// Notes for `[users]` entries: iampool has no per-user settings.
    pub fn users_section(&mut self, entries: &[&Entry]) {
        for entry in entries {
            let user = &entry.key;
            let pairs = match ini::pairs(&entry.value) {
                Ok(pairs) => pairs,
                Err(message) => {
                    self.error(&entry.at, format!("[users] {user}: {message}"), PAIRS_FIX);
                    continue;
                }
            };
            for (keyword, text) in last_wins(pairs) {
                let why = match pgbouncer::setting(&keyword, Section::Users).map(|s| s.fate) {
                    Some(Fate::Unsupported(why)) => why.to_string(),
                    _ => "not a PgBouncer 1.25 [users] keyword".into(),
                };
                self.report.note(
                    Kind::NotCarried,
                    Some(&entry.at),
                    format!("[users] {user}: {keyword}={text}: {why}"),
                );
            }
        }
    }

    /// Notes for `[peers]` entries.
    pub fn peers_section(&mut self, entries: &[&Entry]) {
        let why = match pgbouncer::setting("host", Section::Peers).map(|s| s.fate) {
            Some(Fate::Unsupported(why)) => why,
            _ => unreachable!("[peers] host is in the table as unsupported"),
        };
        for entry in entries {
            self.report.note(
                Kind::NotCarried,
                Some(&entry.at),
                format!("[peers] {}: {why}", entry.key),
            );
        }
    }
}

/// Each keyword once, with the value written last, in the order first written.
fn last_wins(pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut kept: Vec<(String, String)> = Vec::new();
    for (keyword, text) in pairs {
        match kept.iter_mut().find(|(k, _)| *k == keyword) {
            Some(slot) => slot.1 = text,
            None => kept.push((keyword, text)),
        }
    }
    kept
}

fn push(database: &mut Database, key: &'static str, value: toml::Value, entry: &Entry, what: &str) {
    database.items.push(Item {
        key,
        value,
        from: format!("{} {what}", entry.at),
        secret: false,
    });
}
