//! Databases: each upstream URL (top-level `upstream` or `[databases.NAME]`) layered over the
//! global upstream defaults, with the IAM rules (TLS, region, no password) checked.

use super::build::{is_set, label_and_origin, usize_count, Reader, Reported};
use super::error::{unknown_fix, Origin, Problem};
use super::keys::{self, Key, KEYS};
use super::load::{Inputs, Layer, Setting, TableDatabase};
use super::url::{self, UpstreamUrl};
use super::value::{self, Named, Raw};
use super::{
    Database, IamConfig, PoolMode, Secret, SslMode, TargetSessionAttrs, Upstream, UpstreamAuth,
};

/// An upstream URL's user and password, offered as a client user.
pub(crate) struct UrlUser {
    pub user: String,
    pub secret: Secret,
    pub origin: Origin,
}

/// One URL to turn into a database.
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
    match r.get(globals, "upstream", value::urls) {
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
        match database(r, globals, spec) {
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
    spec: &Spec<'_>,
) -> Result<(Database, Option<UrlUser>), Reported> {
    let parsed =
        url::parse(&spec.url).map_err(|problem| r.report(&spec.label, &spec.origin, problem))?;
    let before = r.errors.len();
    let url_origin = Origin::Url(Box::new(spec.origin.clone()));
    let name = client_name(r, spec, &parsed, &url_origin);
    let layer = database_layer(r, globals, spec, &parsed, &name, &url_origin);
    r.sources
        .insert(format!("{}upstream", layer.prefix), spec.origin.clone());

    let password = password(r, spec, &parsed, &layer, &url_origin);
    let pool_mode = r.req(&layer, "pool_mode", value::named::<PoolMode>);
    let pool_size = r.req(&layer, "pool_size", usize_count);
    let min_pool_size = r.req(&layer, "min_pool_size", usize_count);
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
    let upstream = upstream(r, &layer, parsed, password.clone());
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
        read_only_database: read_only_database?,
    };
    Ok((database, url_user))
}

/// `?name=`, the `[databases.NAME]` table name, or the database name; `None` on a conflict.
fn client_name(
    r: &mut Reader,
    spec: &Spec<'_>,
    parsed: &UpstreamUrl,
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
        (None, param) => Some(param.unwrap_or_else(|| parsed.dbname.clone())),
    }
}

/// Global per-database defaults, overridden by the table's keys and the URL's parameters.
fn database_layer(
    r: &mut Reader,
    globals: &Layer,
    spec: &Spec<'_>,
    parsed: &UpstreamUrl,
    name: &Option<String>,
    url_origin: &Origin,
) -> Layer {
    let prefix = format!("databases.{}.", name.as_deref().unwrap_or("?"));
    let mut settings = globals.settings.clone();
    settings.retain(|name, _| keys::key(name).is_some_and(Key::is_per_database));
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
                    .chain(["name"]);
                let fix = unknown_fix(
                    param,
                    candidates,
                    "remove it; iampool --help lists the URL parameters",
                );
                r.report(
                    &label,
                    url_origin,
                    Problem::new(format!("unknown URL parameter {param:?}"), fix),
                );
            }
        }
    }
    Layer { prefix, settings }
}

fn password(
    r: &mut Reader,
    spec: &Spec<'_>,
    parsed: &UpstreamUrl,
    layer: &Layer,
    url_origin: &Origin,
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
        (None, table) => table,
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
    parsed: UpstreamUrl,
    password: Option<(Secret, Origin)>,
) -> Result<Upstream, Reported> {
    let is_iam = r
        .req(layer, "auth", value::choice)
        .map(|auth| auth == "iam");
    let sslmode = r.get(layer, "sslmode", value::named::<SslMode>);
    let sslrootcert = r.get(layer, "sslrootcert", value::path);
    let hostaddr = r.get(layer, "hostaddr", value::ip);
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

    let is_iam = is_iam?;
    if let (true, Some((_, origin))) = (is_iam, &password) {
        r.report(
            &format!("{}password", layer.prefix),
            origin,
            Problem::new(
                "a password cannot be combined with auth=iam (the IAM token is the password)",
                "remove the password, or drop auth=iam to sign in with the password",
            ),
        );
    }
    let iam = is_iam.then(|| iam(r, layer, &parsed.host));
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
        host: parsed.host,
        hostaddr: hostaddr?,
        port: parsed.port,
        user: parsed.user,
        password: password.map(|(secret, _)| secret),
        dbname: parsed.dbname,
        sslmode: sslmode?,
        sslrootcert: sslrootcert?,
        auth,
        allow_cleartext_password: allow_cleartext_password?,
        insecure_unverified_tls,
        max_new_connections_per_second: max_new_connections_per_second?,
        reauth_interval: reauth_interval?,
        target_session_attrs: target_session_attrs?,
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
