//! Databases: each upstream string (a URL or a keyword=value string, top-level `upstream` or
//! `[databases.NAME]`) layered over the global upstream defaults, which are layered over the
//! libpq environment variables (PGSSLMODE, ...), with the IAM rules (TLS, region, no password)
//! checked. What the string leaves out of its own parts comes from PGHOST, PGPORT, PGUSER, ...

use super::build::{is_set, label_and_origin, usize_count, Reader, Reported};
use super::error::{unknown_fix, Origin, Problem};
use super::keys::{self, Key, KEYS};
use super::load::{Inputs, Layer, Setting, TableDatabase};
use super::url::{self, Form, HostPart, Parts};
use super::value::{self, Named, Raw};
use super::{
    Database, Host, IamConfig, LoadBalanceHosts, PoolMode, Secret, SslMode, TargetSessionAttrs,
    Upstream, UpstreamAuth,
};

type PgEnv = std::collections::BTreeMap<&'static str, String>;

/// The per-database keys a libpq variable sets when neither the string nor iampool does.
const PG_KEYS: &[(&str, &str)] = &[
    ("PGHOSTADDR", "hostaddr"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGAPPNAME", "application_name"),
    ("PGOPTIONS", "options"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
];

/// libpq's connection keywords that iampool does not take, and what to do instead.
const UNSUPPORTED: &[(&[&str], &str)] = &[
    (
        &["sslcert", "sslkey", "sslpassword", "sslcertmode"],
        "iampool does not present a client certificate to the upstream: remove it, and sign in with auth=iam or a password",
    ),
    (
        &["gssencmode", "krbsrvname", "gsslib", "gssdelegation"],
        "iampool has no GSSAPI/Kerberos: remove it (iampool connects without GSS encryption, as gssencmode=disable)",
    ),
    (
        &["service"],
        "iampool reads no pg_service.conf: write the service's settings into the string itself",
    ),
    (
        &["passfile"],
        "iampool reads no .pgpass: give the password in the string, as the password key, or with PGPASSWORD",
    ),
    (
        &["requiressl"],
        "requiressl is libpq's old spelling: write sslmode=require (or verify-full) instead",
    ),
    (
        &["sslcompression"],
        "TLS compression is obsolete and never used: remove it",
    ),
    (
        &["sslcrl", "sslcrldir"],
        "iampool does not check certificate revocation lists: remove it",
    ),
    (
        &["sslsni"],
        "iampool always sends the host name (SNI) in TLS: remove it",
    ),
    (
        &["sslnegotiation"],
        "iampool asks for TLS the standard way (SSLRequest): remove it",
    ),
    (
        &["ssl_min_protocol_version", "ssl_max_protocol_version"],
        "iampool speaks TLS 1.2 and 1.3 to the upstream: remove it",
    ),
    (
        &["channel_binding", "require_auth"],
        "iampool chooses the upstream authentication itself (auth, allow_cleartext_password): remove it",
    ),
    (
        &["client_encoding"],
        "each client sets its own client_encoding: remove it",
    ),
    (
        &["fallback_application_name"],
        "use application_name, or let clients set their own",
    ),
    (
        &["keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout"],
        "iampool uses the system's TCP settings for upstream connections: remove it",
    ),
    (
        &["replication"],
        "iampool pools ordinary sessions, not replication connections: remove it",
    ),
    (
        &["requirepeer"],
        "iampool reaches the upstream over TCP, where requirepeer does not apply: remove it",
    ),
];

/// An upstream URL's user and password, offered as a client user.
pub(crate) struct UrlUser {
    pub user: String,
    pub secret: Secret,
    pub origin: Origin,
}

/// One upstream string (URL or keyword=value) to turn into a database.
struct Spec<'a> {
    url: String,
    origin: Origin,
    /// Key errors about the URL itself are reported on.
    label: String,
    table: Option<&'a TableDatabase>,
}

pub(crate) fn databases(
    r: &mut Reader,
    inputs: &Inputs,
) -> (Result<Vec<Database>, Reported>, Vec<UrlUser>) {
    let globals = &inputs.globals;
    check_global_defaults(r, globals);
    let mut specs = Vec::new();
    let mut failed = false;
    match r.get(globals, "upstream", value::upstreams) {
        Ok(urls) => {
            let (label, origin) = label_and_origin(globals, "upstream");
            for url in urls.unwrap_or_default() {
                specs.push(Spec {
                    url,
                    origin: origin.clone(),
                    label: label.clone(),
                    table: None,
                });
            }
        }
        Err(Reported) => failed = true,
    }
    for table in &inputs.databases {
        let label = format!("databases.{}.upstream", table.name);
        let url = match &table.upstream {
            Some(setting) => value::text(&setting.raw, upstream_key()),
            None => Err(Problem::new(
                "is missing",
                format!(
                    "set upstream = \"postgres://user@host:5432/dbname\" in [databases.{}]",
                    table.name
                ),
            )),
        };
        match url {
            Ok(url) => specs.push(Spec {
                url,
                origin: table.origin.clone(),
                label,
                table: Some(table),
            }),
            Err(problem) => {
                r.report(&label, &table.origin, problem);
                failed = true;
            }
        }
    }
    if specs.is_empty() && !failed {
        r.blame(
            globals,
            "upstream",
            Problem::new(
                "no database is configured",
                "set --upstream postgres://user@host:5432/dbname (or IAMPOOL_UPSTREAM, or [databases.NAME] in the file)",
            ),
        );
        failed = true;
    }

    let mut databases: Vec<Database> = Vec::new();
    let mut users = Vec::new();
    for spec in &specs {
        match database(r, globals, &inputs.pg_env, spec) {
            Ok((database, user)) => {
                if databases.iter().any(|seen| seen.name == database.name) {
                    r.report(
                        &format!("databases.{}", database.name),
                        &spec.origin,
                        Problem::new(
                            "is defined twice",
                            "give each database its own client-facing name (?name=... in the URL, or the [databases.NAME] table name)",
                        ),
                    );
                    failed = true;
                }
                databases.push(database);
                users.extend(user);
            }
            Err(Reported) => failed = true,
        }
    }
    if !failed {
        failed = !check_read_only_routes(r, &databases, &specs);
    }
    (if failed { Err(Reported) } else { Ok(databases) }, users)
}

/// Each `read_only_database` names another database, in transaction mode as this one is.
fn check_read_only_routes(r: &mut Reader, databases: &[Database], specs: &[Spec<'_>]) -> bool {
    let mut ok = true;
    for (d, spec) in databases.iter().zip(specs) {
        let Some(target) = &d.read_only_database else {
            continue;
        };
        let label = format!("databases.{}.read_only_database", d.name);
        let found = databases.iter().find(|other| other.name == *target);
        let problem = match found {
            _ if *target == d.name => Some(Problem::new(
                "names this database itself",
                "name the database of the reader endpoint, or remove the key",
            )),
            None => Some(Problem::new(
                format!("names {target:?}, which is not a configured database"),
                format!(
                    "add [databases.{target}] with the reader endpoint as its upstream (and target_session_attrs = \"read-only\"), or fix the name"
                ),
            )),
            Some(_) if d.pool_mode != PoolMode::Transaction => Some(Problem::new(
                "needs pool_mode = transaction (a session keeps one server)",
                "remove read_only_database, or set pool_mode = \"transaction\"",
            )),
            Some(other) if other.pool_mode != PoolMode::Transaction => Some(Problem::new(
                format!("names {target:?}, whose pool_mode is session"),
                format!("set pool_mode = \"transaction\" in [databases.{target}]"),
            )),
            Some(_) => None,
        };
        if let Some(problem) = problem {
            r.report(&label, &spec.origin, problem);
            ok = false;
        }
    }
    ok
}

fn upstream_key() -> &'static Key {
    keys::key("upstream").expect("upstream is in the table")
}

/// Syntax of the global per-database defaults, checked even when no database reads them.
fn check_global_defaults(r: &mut Reader, globals: &Layer) {
    for (name, setting) in &globals.settings {
        let key = keys::key(name).expect("gathered keys are in the table");
        if key.is_per_database() {
            if let Err(problem) = value::check(&setting.raw, key) {
                r.report(&setting.label, &setting.origin, problem);
            }
        }
    }
}

fn database(
    r: &mut Reader,
    globals: &Layer,
    pg: &PgEnv,
    spec: &Spec<'_>,
) -> Result<(Database, Option<UrlUser>), Reported> {
    let parsed = url::parse_parts(&spec.url)
        .map_err(|problem| r.report(&spec.label, &spec.origin, problem))?;
    let before = r.errors.len();
    let url_origin = match parsed.form {
        Form::Url => Origin::Url(Box::new(spec.origin.clone())),
        Form::Keywords => Origin::Keywords(Box::new(spec.origin.clone())),
    };
    let user = from_string_or_env(&parsed.user, pg, "PGUSER", &url_origin);
    let dbname = from_string_or_env(&parsed.dbname, pg, "PGDATABASE", &url_origin).or_else(|| {
        user.clone()
            .map(|(user, _)| (user, Origin::Derived("the user name")))
    });
    let name = client_name(
        r,
        spec,
        &parsed,
        dbname.as_ref().map(|(d, _)| d.as_str()),
        &url_origin,
    );
    let layer = database_layer(r, globals, pg, spec, &parsed, &name, &url_origin);
    r.sources
        .insert(format!("{}upstream", layer.prefix), spec.origin.clone());
    let user = match user {
        Some((user, origin)) => {
            r.sources.insert(format!("{}user", layer.prefix), origin);
            Some(user)
        }
        None => {
            let fix = match parsed.form {
                Form::Url => "write postgres://USER@host/dbname, or set PGUSER",
                Form::Keywords => "add user=USER, or set PGUSER",
            };
            r.report(&spec.label, &url_origin, Problem::new("names no user", fix));
            None
        }
    };
    if let Some((_, origin)) = &dbname {
        r.sources
            .insert(format!("{}dbname", layer.prefix), origin.clone());
    }

    let password = password(r, spec, &parsed, &layer, &url_origin, pg);
    let pool_mode = r.req(&layer, "pool_mode", value::named::<PoolMode>);
    let pool_size = r.req(&layer, "pool_size", usize_count);
    let min_pool_size = r.req(&layer, "min_pool_size", usize_count);
    let reserve_pool_size = r.req(&layer, "reserve_pool_size", usize_count);
    let max_db_connections = r.req(&layer, "max_db_connections", usize_count);
    let read_only_database = r.get(&layer, "read_only_database", value::name);
    if let (Ok(min), Ok(max)) = (&min_pool_size, &pool_size) {
        if min > max {
            let blamed = if is_set(&layer, "min_pool_size") {
                "min_pool_size"
            } else {
                "pool_size"
            };
            r.blame(
                &layer,
                blamed,
                Problem::new(
                    format!("min_pool_size {min} is more than pool_size {max}"),
                    "lower min_pool_size or raise pool_size",
                ),
            );
        }
    }
    let hosts = hosts(r, &layer, pg, &parsed, &url_origin);
    let upstream = match (hosts, user) {
        (Ok(hosts), Some(user)) => {
            let dbname = dbname.map(|(d, _)| d).unwrap_or_else(|| user.clone());
            upstream(r, &layer, hosts, user, dbname, password.clone())
        }
        _ => Err(Reported),
    };
    if r.errors.len() > before {
        return Err(Reported);
    }
    let upstream = upstream?;
    let url_user = match (&upstream.auth, password) {
        (UpstreamAuth::Password, Some((secret, origin))) => Some(UrlUser {
            user: upstream.user.clone(),
            secret,
            origin,
        }),
        _ => None,
    };
    let database = Database {
        name: name.unwrap_or_default(),
        upstream,
        pool_mode: pool_mode?,
        pool_size: pool_size?,
        min_pool_size: min_pool_size?,
        reserve_pool_size: reserve_pool_size?,
        max_db_connections: max_db_connections?,
        read_only_database: read_only_database?,
    };
    Ok((database, url_user))
}

/// The string's own value, else the libpq variable's.
fn from_string_or_env(
    own: &Option<String>,
    pg: &PgEnv,
    var: &'static str,
    url_origin: &Origin,
) -> Option<(String, Origin)> {
    match own {
        Some(value) => Some((value.clone(), url_origin.clone())),
        None => pg
            .get(var)
            .map(|value| (value.clone(), Origin::Env(var.to_string()))),
    }
}

/// The string's hosts, ports and hostaddrs (or PGHOST, PGPORT and the hostaddr key or
/// PGHOSTADDR) as one host list, by libpq's rules.
fn hosts(
    r: &mut Reader,
    layer: &Layer,
    pg: &PgEnv,
    parsed: &Parts,
    url_origin: &Origin,
) -> Result<Vec<Host>, Reported> {
    let list = |text: &str| text.split(',').map(str::to_string).collect::<Vec<_>>();
    let names = match &parsed.hosts {
        Some(hosts) => Some((hosts.clone(), url_origin.clone())),
        None => pg
            .get("PGHOST")
            .map(|hosts| (list(hosts), Origin::Env("PGHOST".into()))),
    };
    let ports = match &parsed.ports {
        Some(ports) => Some((ports.clone(), url_origin.clone())),
        None => pg
            .get("PGPORT")
            .map(|ports| (list(ports), Origin::Env("PGPORT".into()))),
    };
    let hostaddrs = r.get(layer, "hostaddr", value::ips)?.flatten();
    let host_label = format!("{}host", layer.prefix);
    let port_label = format!("{}port", layer.prefix);
    if names.is_none() && hostaddrs.is_none() {
        let fix = match parsed.form {
            Form::Url => "write postgres://user@HOST:5432/dbname, or set PGHOST",
            Form::Keywords => "add host=HOST, or set PGHOST",
        };
        return Err(r.report(&host_label, url_origin, Problem::new("names no host", fix)));
    }
    let (names, names_origin) = names.unwrap_or((Vec::new(), Origin::Default));
    let (ports, ports_origin) = match ports {
        Some((ports, origin)) => (Some(ports), origin),
        None => (None, Origin::Default),
    };
    r.sources.insert(host_label.clone(), names_origin.clone());
    r.sources.insert(port_label.clone(), ports_origin.clone());
    let resolved = url::resolve_hosts(&names, ports.as_deref(), hostaddrs.as_deref());
    match resolved {
        Ok(hosts) => Ok(hosts
            .into_iter()
            .map(|h| Host {
                name: h.host,
                port: h.port,
                addr: h.hostaddr,
            })
            .collect()),
        Err((HostPart::Host, problem)) => Err(r.report(&host_label, &names_origin, problem)),
        Err((HostPart::Port, problem)) => Err(r.report(&port_label, &ports_origin, problem)),
        Err((HostPart::Hostaddr, problem)) => Err(r.blame(layer, "hostaddr", problem)),
    }
}

/// `?name=`, the `[databases.NAME]` table name, or the database name; `None` on a conflict.
fn client_name(
    r: &mut Reader,
    spec: &Spec<'_>,
    parsed: &Parts,
    dbname: Option<&str>,
    url_origin: &Origin,
) -> Option<String> {
    let param = parsed
        .params
        .iter()
        .find(|(name, _)| name == "name")
        .map(|(_, v)| v.clone());
    match (spec.table, param) {
        (Some(table), Some(param)) if param != table.name => {
            r.report(
                &format!("databases.{}.upstream", table.name),
                url_origin,
                Problem::new(
                    format!("?name={param} differs from the table name {}", table.name),
                    "drop ?name= from the URL; the table name is the client-facing name",
                ),
            );
            None
        }
        (Some(table), _) => Some(table.name.clone()),
        (None, Some(param)) if param.is_empty() => {
            r.report(
                &spec.label,
                url_origin,
                Problem::new("?name= is empty", "give a name or drop it"),
            );
            None
        }
        (None, Some(param)) => Some(param),
        // Without a database name the user is missing too, and that is reported.
        (None, None) => Some(dbname.unwrap_or("?").to_string()),
    }
}

/// Global per-database defaults, overridden by the table's keys and the URL's parameters.
fn database_layer(
    r: &mut Reader,
    globals: &Layer,
    pg: &PgEnv,
    spec: &Spec<'_>,
    parsed: &Parts,
    name: &Option<String>,
    url_origin: &Origin,
) -> Layer {
    let prefix = format!("databases.{}.", name.as_deref().unwrap_or("?"));
    let mut settings = std::collections::BTreeMap::new();
    for (var, key) in PG_KEYS {
        if let (Some(value), Some(key)) = (pg.get(var), keys::key(key)) {
            let setting = Setting {
                raw: Raw::Text(value.clone()),
                origin: Origin::Env(var.to_string()),
                label: format!("{prefix}{}", key.name),
            };
            settings.insert(key.name, setting);
        }
    }
    settings.extend(
        globals
            .settings
            .iter()
            .filter(|(name, _)| keys::key(name).is_some_and(Key::is_per_database))
            .map(|(name, setting)| (*name, setting.clone())),
    );
    if let Some(table) = spec.table {
        settings.extend(table.settings.iter().map(|(k, s)| (*k, s.clone())));
    }
    for (param, value) in &parsed.params {
        let label = format!("{prefix}{param}");
        let key = keys::key(param).filter(|key| key.is_per_database());
        match key {
            _ if param == "name" => {}
            Some(key)
                if spec
                    .table
                    .is_some_and(|t| t.settings.contains_key(key.name)) =>
            {
                r.report(
                    &label,
                    url_origin,
                    Problem::new(
                        format!(
                            "is set both in the URL and in [databases.{}]",
                            name.as_deref().unwrap_or("?")
                        ),
                        "keep one of the two",
                    ),
                );
            }
            Some(key) => {
                let raw = Raw::Text(value.clone());
                settings.insert(
                    key.name,
                    Setting {
                        raw,
                        origin: url_origin.clone(),
                        label,
                    },
                );
            }
            None if UNSUPPORTED
                .iter()
                .any(|(names, _)| names.contains(&param.as_str())) =>
            {
                let (_, fix) = UNSUPPORTED
                    .iter()
                    .find(|(names, _)| names.contains(&param.as_str()))
                    .expect("just found");
                r.report(
                    &label,
                    url_origin,
                    Problem::new(format!("libpq's {param} is not supported by iampool"), *fix),
                );
            }
            None if param == "password" => {
                r.report(
                    &label,
                    url_origin,
                    Problem::new(
                        "a password is not a URL parameter here",
                        "write it as postgres://user:PASSWORD@host/..., or as password in [databases.NAME]",
                    ),
                );
            }
            None => {
                let candidates = KEYS
                    .iter()
                    .filter(|k| k.is_per_database())
                    .map(|k| k.name)
                    .chain(["name", "host", "port", "user", "dbname"]);
                let (what, otherwise) = match parsed.form {
                    Form::Url => (
                        "URL parameter",
                        "remove it; iampool --help lists the URL parameters",
                    ),
                    Form::Keywords => (
                        "connection keyword",
                        "remove it; iampool --help lists the keys, which are the keywords besides host, port, user, password and dbname",
                    ),
                };
                let fix = super::pgbouncer::hint(
                    param,
                    super::pgbouncer::Section::Databases,
                    &str::to_string,
                )
                .unwrap_or_else(|| unknown_fix(param, candidates, otherwise));
                r.report(
                    &label,
                    url_origin,
                    Problem::new(format!("unknown {what} {param:?}"), fix),
                );
            }
        }
    }
    Layer { prefix, settings }
}

fn password(
    r: &mut Reader,
    spec: &Spec<'_>,
    parsed: &Parts,
    layer: &Layer,
    url_origin: &Origin,
    pg: &PgEnv,
) -> Option<(Secret, Origin)> {
    let from_table = spec.table.and_then(|table| table.password.clone());
    let password = match (parsed.password.clone(), from_table) {
        (Some(_), Some((_, origin))) => {
            r.report(
                &format!("{}password", layer.prefix),
                &origin,
                Problem::new(
                    "is given both in the URL and as the password key",
                    "keep one of the two",
                ),
            );
            return None;
        }
        (Some(secret), None) => Some((secret, url_origin.clone())),
        (None, Some(table)) => Some(table),
        (None, None) => pg
            .get("PGPASSWORD")
            .map(|p| (Secret::new(p.clone()), Origin::Env("PGPASSWORD".into()))),
    };
    if let Some((_, origin)) = &password {
        r.sources
            .insert(format!("{}password", layer.prefix), origin.clone());
    }
    password
}

fn upstream(
    r: &mut Reader,
    layer: &Layer,
    hosts: Vec<Host>,
    user: String,
    dbname: String,
    password: Option<(Secret, Origin)>,
) -> Result<Upstream, Reported> {
    let is_iam = r
        .req(layer, "auth", value::choice)
        .map(|auth| auth == "iam");
    let sslmode = r.get(layer, "sslmode", value::named::<SslMode>);
    let sslrootcert = r.get(layer, "sslrootcert", value::path);
    let allow_cleartext_password = r.req(layer, "allow_cleartext_password", value::boolean);
    let insecure_unverified_tls = r.req(layer, "insecure_unverified_tls", value::boolean);
    let max_new_connections_per_second =
        r.req(layer, "max_new_connections_per_second", |raw, key| {
            value::count_in(raw, key, 1, 1000).map(|n| n as u32)
        });
    let reauth_interval = r.req(layer, "reauth_interval", value::optional_duration);
    let target_session_attrs = r.req(
        layer,
        "target_session_attrs",
        value::named::<TargetSessionAttrs>,
    );
    let load_balance_hosts = r.req(
        layer,
        "load_balance_hosts",
        value::named::<LoadBalanceHosts>,
    );
    let connect_timeout = r.req(layer, "connect_timeout", value::connect_timeout);
    let application_name = r.get(layer, "application_name", value::optional_text);
    let options = r.get(layer, "options", value::optional_text);

    let is_iam = is_iam?;
    if let (true, Some((_, origin))) = (is_iam, &password) {
        let fix = match origin {
            Origin::Env(var) => format!(
                "unset {var} for iampool (the IAM token replaces it), or drop auth=iam to sign in with the password"
            ),
            _ => "remove the password, or drop auth=iam to sign in with the password".to_string(),
        };
        r.report(
            &format!("{}password", layer.prefix),
            origin,
            Problem::new(
                "a password cannot be combined with auth=iam (the IAM token is the password)",
                fix,
            ),
        );
    }
    // The first host names the region: the hosts of one cluster are in one region.
    let iam = is_iam.then(|| iam(r, layer, &hosts[0].name));
    let insecure_unverified_tls = insecure_unverified_tls?;
    // The weakest TLS an IAM token may travel over: verified, unless a test setup says otherwise.
    let weakest = if insecure_unverified_tls {
        SslMode::Require
    } else {
        SslMode::VerifyCa
    };
    let sslmode = match (sslmode?, is_iam) {
        (Some(mode), true) if mode < weakest => Err(r.blame(
            layer,
            "sslmode",
            Problem::new(
                if mode < SslMode::Require {
                    format!(
                        "sslmode={} is too weak for auth=iam: the IAM token is sent as a cleartext password",
                        mode.name()
                    )
                } else {
                    format!(
                        "sslmode={} does not verify the server, so the IAM token would go to whoever answers",
                        mode.name()
                    )
                },
                "use sslmode=verify-full (with sslrootcert for a private CA); for a test setup only, \
                 insecure_unverified_tls = true allows sslmode=require",
            ),
        )),
        (Some(mode), _) => Ok(mode),
        (None, true) => {
            r.derived(layer, "sslmode", "verify-full, as auth=iam");
            Ok(SslMode::VerifyFull)
        }
        (None, false) => Ok(SslMode::Prefer),
    };
    let auth = match iam {
        Some(iam) => UpstreamAuth::Iam(iam?),
        None => UpstreamAuth::Password,
    };
    Ok(Upstream {
        hosts,
        user,
        password: password.map(|(secret, _)| secret),
        dbname,
        sslmode: sslmode?,
        sslrootcert: sslrootcert?,
        auth,
        allow_cleartext_password: allow_cleartext_password?,
        insecure_unverified_tls,
        max_new_connections_per_second: max_new_connections_per_second?,
        reauth_interval: reauth_interval?,
        target_session_attrs: target_session_attrs?,
        load_balance_hosts: load_balance_hosts?,
        connect_timeout: connect_timeout?,
        application_name: application_name?.flatten(),
        options: options?.flatten(),
    })
}

const MIN_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(900);

fn iam(r: &mut Reader, layer: &Layer, host: &str) -> Result<IamConfig, Reported> {
    let region = r.get(layer, "region", value::region);
    let assume_role_arns = r.get(layer, "assume_role_arn", value::arns);
    let external_id = r.get(layer, "external_id", value::name);
    let role_session_name = r.req(layer, "role_session_name", role_session_name);
    let token_lifetime = r.req(layer, "token_lifetime", |raw, key| {
        let lifetime = value::duration(raw, key)?;
        if !(MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME).contains(&lifetime) {
            return Err(Problem::new(
                format!("{lifetime:?} is out of range"),
                "set between 10s and 900s (an RDS IAM token is valid for at most 15 minutes), e.g. 600s",
            ));
        }
        Ok(lifetime)
    });
    if let (Ok(Some(_)), Ok(None)) = (&external_id, &assume_role_arns) {
        r.blame(
            layer,
            "external_id",
            Problem::new(
                "is set without assume_role_arn",
                "set assume_role_arn, or remove external_id",
            ),
        );
    }
    let (region, region_inferred) = match region? {
        Some(region) => (region, false),
        None => match url::infer_region(host) {
            Some(region) => {
                r.derived(layer, "region", "inferred from the host name");
                (region, true)
            }
            None => {
                let (_, auth_origin) = label_and_origin(layer, "auth");
                return Err(r.report(
                    &format!("{}region", layer.prefix),
                    &auth_origin,
                    Problem::new(
                        format!("auth=iam needs a signing region, and host {host:?} does not name one (*.REGION.rds.amazonaws.com)"),
                        "set the region, e.g. &region=us-east-1 in the URL, IAMPOOL_REGION=us-east-1, or region = \"us-east-1\" in the file",
                    ),
                ));
            }
        },
    };
    Ok(IamConfig {
        region,
        region_inferred,
        assume_role_arns: assume_role_arns?.unwrap_or_default(),
        external_id: external_id?,
        role_session_name: role_session_name?,
        token_lifetime: token_lifetime?,
    })
}

/// AWS allows 2 to 64 of `[A-Za-z0-9+=,.@_-]`.
fn role_session_name(raw: &Raw, key: &Key) -> Result<String, Problem> {
    let name = value::name(raw, key)?;
    let allowed = |c: char| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c);
    if !(2..=64).contains(&name.len()) || !name.chars().all(allowed) {
        return Err(Problem::new(
            format!("{name:?} is not a valid role session name"),
            format!(
                "use 2 to 64 letters, digits or +=,.@_- e.g. {}",
                key.example
            ),
        ));
    }
    Ok(name)
}
