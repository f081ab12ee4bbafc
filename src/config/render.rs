//! Writing configuration out: the effective configuration as TOML (secrets redacted, each value's
//! source in a trailing comment), the list of changed keys for RELOAD, and the example file.

use std::fmt::Write;
use std::time::Duration;

use super::cli::default_text;
use super::keys::{DefaultValue, Key, Kind, Scope, KEYS};
use super::value::Named;
use super::{url, Config, Database, UpstreamAuth, UserSecret};

const REDACTED: &str = "<redacted>";

/// A key's effective value in TOML, or `None` when unset.
type Shown = Option<toml::Value>;

fn string(text: impl Into<String>) -> Shown {
    Some(toml::Value::String(text.into()))
}

fn integer(n: impl TryInto<i64>) -> Shown {
    Some(toml::Value::Integer(n.try_into().unwrap_or(i64::MAX)))
}

fn strings<T: ToString>(items: &[T]) -> Shown {
    Some(toml::Value::Array(
        items
            .iter()
            .map(|item| toml::Value::String(item.to_string()))
            .collect(),
    ))
}

fn path(path: &Option<std::path::PathBuf>) -> Shown {
    path.as_ref().and_then(|p| string(p.display().to_string()))
}

/// `1h`, `5min`, `30s`, `500ms`: the largest unit that is exact; `0` for zero.
pub(crate) fn duration(d: Duration) -> Shown {
    let micros = d.as_micros();
    let units = [
        (86_400_000_000, "d"),
        (3_600_000_000, "h"),
        (60_000_000, "min"),
        (1_000_000, "s"),
        (1_000, "ms"),
        (1, "us"),
    ];
    match units
        .iter()
        .find(|(size, _)| micros > 0 && micros % size == 0)
    {
        Some((size, unit)) => string(format!("{}{unit}", micros / size)),
        None => integer(0),
    }
}

fn optional_duration(d: Option<Duration>) -> Shown {
    duration(d.unwrap_or_default())
}

fn size(bytes: usize) -> Shown {
    let units = [(1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB")];
    match units
        .iter()
        .find(|(unit, _)| bytes > 0 && bytes % unit == 0)
    {
        Some((unit, name)) => string(format!("{}{name}", bytes / unit)),
        None => integer(bytes),
    }
}

/// The effective value of a global key; `None` for keys that are not global `Config` fields.
fn global_value(c: &Config, name: &str) -> Option<Shown> {
    Some(match name {
        "listen" => string(
            c.listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        "unix_socket_dir" => path(&c.unix_socket_dir),
        "worker_threads" => integer(c.worker_threads),
        "max_client_conn" => integer(c.max_client_conn),
        "max_pending_logins" => integer(c.max_pending_logins),
        "auth_failure_delay" => duration(c.auth_failure_delay),
        "auth_failure_limit" => integer(c.auth_failure_limit),
        "max_prepared_statements" => integer(c.max_prepared_statements),
        "server_lifetime" => duration(c.server_lifetime),
        "server_lifetime_jitter" => duration(c.server_lifetime_jitter),
        "server_idle_timeout" => duration(c.server_idle_timeout),
        "server_reset_query" => string(c.server_reset_query.clone()),
        "session_state" => string(c.session_state.name()),
        "max_pinned_servers" => c.max_pinned_servers.and_then(integer),
        "server_connect_timeout" => duration(c.server_connect_timeout),
        "server_check_query" => string(c.server_check_query.clone()),
        "server_check_delay" => duration(c.server_check_delay),
        "tcp_keepalive" => Some(toml::Value::Boolean(c.tcp.keepalive)),
        "tcp_keepidle" => optional_duration(c.tcp.keepidle),
        "tcp_keepintvl" => optional_duration(c.tcp.keepintvl),
        "tcp_keepcnt" => integer(c.tcp.keepcnt.unwrap_or(0)),
        "tcp_user_timeout" => optional_duration(c.tcp.user_timeout),
        "server_login_retry" => duration(c.server_login_retry),
        "query_wait_timeout" => duration(c.query_wait_timeout),
        "reserve_pool_timeout" => duration(c.reserve_pool_timeout),
        "max_user_connections" => integer(c.max_user_connections),
        "client_login_timeout" => duration(c.client_login_timeout),
        "idle_transaction_timeout" => optional_duration(c.idle_transaction_timeout),
        "query_timeout" => optional_duration(c.query_timeout),
        "client_idle_timeout" => optional_duration(c.client_idle_timeout),
        "application_name_add_host" => Some(toml::Value::Boolean(c.application_name_add_host)),
        "ignore_startup_parameters" => strings(&c.ignore_startup_parameters),
        "max_message_size" => size(c.max_message_size),
        "shutdown_timeout" => duration(c.shutdown_timeout),
        "min_sigterm_delay" => duration(c.min_sigterm_delay),
        "reload_check_interval" => duration(c.reload_check_interval),
        "quitquitquit" => Some(toml::Value::Boolean(c.quitquitquit)),
        "auth_type" => string(c.auth_type.name()),
        "auth_file" => path(&c.auth_file),
        "client_tls" => string(c.client_tls.name()),
        "client_tls_cert_file" => path(&c.client_tls_cert_file),
        "client_tls_key_file" => path(&c.client_tls_key_file),
        "log_level" => string(c.log_level.clone()),
        "log_format" => string(c.log_format.name()),
        "metrics_listen" => c.metrics_listen.and_then(|a| string(a.to_string())),
        "admin_users" => strings(&c.admin_users),
        "stats_users" => strings(&c.stats_users),
        _ => return None,
    })
}

/// Per-database keys of one database, in table order.
fn database_values(d: &Database) -> Vec<(&'static str, Shown)> {
    let u = &d.upstream;
    let iam = match &u.auth {
        UpstreamAuth::Iam(iam) => Some(iam),
        UpstreamAuth::Password => None,
    };
    KEYS.iter()
        .filter(|key| key.scope == Scope::PerDatabase)
        .filter_map(|key| {
            let shown = match key.name {
                "pool_mode" => string(d.pool_mode.name()),
                "pool_size" => integer(d.pool_size),
                "min_pool_size" => integer(d.min_pool_size),
                "reserve_pool_size" => integer(d.reserve_pool_size),
                "max_db_connections" => integer(d.max_db_connections),
                "read_only_database" => d.read_only_database.clone().and_then(string),
                "sslmode" => string(u.sslmode.name()),
                "sslrootcert" => path(&u.sslrootcert),
                "target_session_attrs" => string(u.target_session_attrs.name()),
                "load_balance_hosts" => string(u.load_balance_hosts.name()),
                "connect_timeout" => integer(u.connect_timeout.map_or(0, |t| t.as_secs())),
                "application_name" => u.application_name.clone().and_then(string),
                "options" => u.options.clone().and_then(string),
                "max_new_connections_per_second" => integer(u.max_new_connections_per_second),
                "reauth_interval" => optional_duration(u.reauth_interval),
                "allow_cleartext_password" => {
                    Some(toml::Value::Boolean(u.allow_cleartext_password))
                }
                "insecure_unverified_tls" => Some(toml::Value::Boolean(u.insecure_unverified_tls)),
                // IAM keys only for IAM databases; an inferred region is a comment of its own.
                "region" => match iam? {
                    iam if iam.region_inferred => return None,
                    iam => string(iam.region.clone()),
                },
                "assume_role_arn" => strings(&iam?.assume_role_arns),
                "external_id" => iam?.external_id.clone().and_then(string),
                "role_session_name" => string(iam?.role_session_name.clone()),
                "token_lifetime" => duration(iam?.token_lifetime),
                _ => return None,
            };
            Some((key.name, shown))
        })
        .collect()
}

/// Every host (with its hostaddr) in one URL, which loads back to the same hosts.
fn upstream_url(d: &Database) -> String {
    let u = &d.upstream;
    let mut params = Vec::new();
    if matches!(u.auth, UpstreamAuth::Iam(_)) {
        params.push(("auth", "iam".to_string()));
    }
    let hosts: Vec<url::UrlHost> = u
        .hosts
        .iter()
        .map(|h| url::UrlHost {
            host: h.name.clone(),
            port: h.port,
            hostaddr: h.addr,
        })
        .collect();
    url::format(&hosts, &u.user, &u.dbname, &params)
}

/// A TOML key or table name, quoted when it is not bare.
fn toml_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        name.to_string()
    } else {
        toml::Value::String(name.to_string()).to_string()
    }
}

fn line(out: &mut String, key: &str, shown: &Shown, source: Option<String>) {
    let text = match shown {
        Some(value) => format!("{} = {value}", toml_key(key)),
        None => format!("# {key} is unset"),
    };
    let _ = match source {
        Some(source) => writeln!(out, "{text:<48} # {source}"),
        None => writeln!(out, "{text}"),
    };
}

/// The effective configuration as TOML; `source(label)` names where each value came from.
pub(crate) fn render(c: &Config, source: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::from("# iampool effective configuration; secrets are redacted.\n");
    for key in KEYS.iter().filter(|key| key.scope == Scope::Global) {
        if let Some(shown) = global_value(c, key.name) {
            line(&mut out, key.name, &shown, source(key.name));
        }
    }
    for d in &c.databases {
        let prefix = format!("databases.{}.", d.name);
        let label = |key: &str| source(&format!("{prefix}{key}"));
        let _ = writeln!(out, "\n[databases.{}]", toml_key(&d.name));
        line(
            &mut out,
            "upstream",
            &string(upstream_url(d)),
            label("upstream"),
        );
        if d.upstream.password.is_some() {
            line(&mut out, "password", &string(REDACTED), label("password"));
        }
        for (key, shown) in database_values(d) {
            line(&mut out, key, &shown, label(key));
        }
        if let UpstreamAuth::Iam(iam) = &d.upstream.auth {
            if iam.region_inferred {
                let _ = writeln!(
                    out,
                    "# region = {:?} is inferred from the host name",
                    iam.region
                );
            }
        }
    }
    for (name, secret) in &c.users {
        let kind = match secret {
            UserSecret::Plain(_) => "plain password",
            UserSecret::Md5(_) => "md5 hash",
            UserSecret::Scram(_) => "SCRAM-SHA-256 verifier",
        };
        let from = source(&format!("users.{name}")).map(|s| format!("{kind}; {s}"));
        let _ = writeln!(out, "\n[users.{}]", toml_key(name));
        line(
            &mut out,
            "password",
            &string(REDACTED),
            from.or(Some(kind.to_string())),
        );
    }
    out
}

/// Global keys whose effective value differs, then `databases` and `users` when those differ.
/// RELOAD reports the ones [`is_reloadable`](super::is_reloadable) rejects as needing a restart.
pub(crate) fn changed_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed: Vec<&'static str> = KEYS
        .iter()
        .filter(|key| global_value(old, key.name) != global_value(new, key.name))
        .map(|key| key.name)
        .collect();
    if old.databases != new.databases {
        changed.push("databases");
    }
    if old.users != new.users {
        changed.push("users");
    }
    changed
}

/// A key's default or example as it would be written in the file.
fn literal(key: &Key, text: &str) -> String {
    match key.kind {
        Kind::Count | Kind::Bool => text.to_string(),
        Kind::Duration | Kind::Size if text.bytes().all(|b| b.is_ascii_digit()) => text.to_string(),
        Kind::Names | Kind::Arns => {
            let items: Vec<String> = text
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| format!("{s:?}"))
                .collect();
            format!("[{}]", items.join(", "))
        }
        _ => toml::Value::String(text.to_string()).to_string(),
    }
}

fn document_key(out: &mut String, key: &Key) {
    let choices = match key.kind {
        Kind::Choice(names) => format!("one of {}; ", names.join(", ")),
        _ => String::new(),
    };
    let unit = if key.unit.is_empty() {
        String::new()
    } else {
        format!("unit: {}; ", key.unit)
    };
    let reload = if key.reload {
        "reloads"
    } else {
        "needs a restart"
    };
    let value = match key.default {
        DefaultValue::Value(default) if !default.is_empty() => default,
        _ => key.example,
    };
    let _ = writeln!(out, "\n# {}", key.help);
    let _ = writeln!(
        out,
        "# {choices}{unit}default: {}; {reload}.",
        default_text(key)
    );
    if key.is_global() {
        let _ = writeln!(out, "# env: {}; flag: --{}", key.env_var(), key.flag);
    }
    let _ = writeln!(out, "#{} = {}", key.name, literal(key, value));
}

const EXAMPLE_HEADER: &str = "\
# iampool example configuration.
#
# Generated from the key table in src/config/keys.rs; do not edit by hand. Regenerate with
#   UPDATE_EXAMPLE=1 cargo test --lib config::render
#
# Every global key can also be set as an environment variable IAMPOOL_<KEY> or a flag
# --<key-with-dashes>. Precedence: flag > environment > this file > default.
# Durations are seconds or a whole number with a unit (500ms, 30s, 5min, 1h); sizes are bytes or
# a whole number with a unit (64kB, 8MB, 1GB); booleans are true/false (also on/off, 1/0).
# Keys that \"reload\" take effect on RELOAD; the others need a restart.
# Commented-out lines show defaults (or, for unset keys, an example value).
";

const EXAMPLE_DATABASES: &str = "\
# Databases. Each [databases.NAME] is one pool; NAME is the database name clients ask for.
# `upstream` is a libpq-style URL: postgres://user[:password]@host[:port][,host2[:port2]...]/dbname?param=value
# (percent-encode special characters; IPv6 hosts in brackets; port 5432 and dbname = user by default),
# or a libpq keyword=value string: host=h1,h2 port=5432 dbname=app user=app sslmode=verify-full.
# Hosts are tried in order (load_balance_hosts = random shuffles them). What the string leaves out
# comes from PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD (not with auth=iam), as in libpq.
# `password` may be given as a key instead of in the URL. Any key of the \"Pools\" and \"Upstream\"
# sections, and the keys below, may be set here or as a URL parameter, overriding the global value.
# A top-level `upstream` (or IAMPOOL_UPSTREAM / --upstream: several URLs separated by whitespace,
# or one keyword=value string; an array in the file may list several of either) defines databases too; its client-facing name is the URL's ?name= parameter, else its dbname.
# With auth=iam: TLS must be require or stronger, no password is allowed, and the region must be
# set or inferable from a *.REGION.rds.amazonaws.com host.
#
# Users. Clients sign in with [users.NAME] password = \"...\" (plain, md5..., or SCRAM-SHA-256$...),
# the users of auth_file, and the user of any upstream URL that carries a password; [users] wins
# over auth_file, and both over URL users.
";

const EXAMPLE_TABLES: &str = "\
[databases.app]
upstream = \"postgres://app@mydb.abc123xyz.us-east-1.rds.amazonaws.com:5432/appdb?auth=iam\"
# pool_size = 20

# [databases.legacy]
# upstream = \"postgres://legacy@10.0.0.5/legacy\"
# password = \"...\"
# pool_mode = \"session\"

# [users.alice]
# password = \"SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>\"
";

/// The documented example configuration file, generated from the key table.
pub fn example_toml() -> String {
    let mut out = String::from(EXAMPLE_HEADER);
    let mut group = "";
    for key in KEYS {
        if key.group != group {
            group = key.group;
            let _ = writeln!(out, "\n## {group}");
            if key.scope == Scope::DatabaseOnly {
                out.push('\n');
                out.push_str(EXAMPLE_DATABASES);
            }
        }
        document_key(&mut out, key);
    }
    out.push('\n');
    out.push_str(EXAMPLE_TABLES);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_render_in_the_largest_exact_unit() {
        let d = |secs| duration(Duration::from_secs(secs)).unwrap().to_string();
        assert_eq!(d(3600), "\"1h\"");
        assert_eq!(d(90), "\"90s\"");
        assert_eq!(d(300), "\"5min\"");
        assert_eq!(
            duration(Duration::from_millis(1500)).unwrap().to_string(),
            "\"1500ms\""
        );
        assert_eq!(duration(Duration::ZERO).unwrap().to_string(), "0");
        assert_eq!(size(256 << 20).unwrap().to_string(), "\"256MB\"");
        assert_eq!(size(1000).unwrap().to_string(), "1000");
    }

    #[test]
    fn example_file_is_current_and_documents_every_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/iampool.example.toml");
        let generated = example_toml();
        if std::env::var_os("UPDATE_EXAMPLE").is_some() {
            std::fs::write(path, &generated).expect("write the example file");
        }
        let file = std::fs::read_to_string(path).expect("config/iampool.example.toml exists");
        for key in KEYS {
            assert!(
                file.contains(&format!("#{} = ", key.name)),
                "{} is not documented",
                key.name
            );
        }
        assert!(
            file == generated,
            "config/iampool.example.toml is out of date: run UPDATE_EXAMPLE=1 cargo test --lib config::render"
        );
    }

    #[test]
    fn every_global_key_is_rendered() {
        let config =
            crate::config::Config::from_args(&["--upstream", "postgres://u@h/d"], &[]).unwrap();
        for key in KEYS
            .iter()
            .filter(|k| k.scope == Scope::Global && k.name != "upstream")
        {
            assert!(global_value(&config, key.name).is_some(), "{}", key.name);
        }
    }
}
