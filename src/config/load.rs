//! Gathering raw settings from flags, environment and the TOML file, each with its origin,
//! and merging them flag > env > file. Nothing is parsed here beyond the file's TOML syntax.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};

use super::build;
use super::cli::{self, CliCommand, CliInput};
use super::env;
use super::error::{unknown_fix, ConfigError, ConfigErrors, Origin, Problem};
use super::keys::{self, KEYS};
use super::pgbouncer::{self, Section};
use super::value::Raw;
use super::{url, Command, Loaded, Secret};

/// One raw value and where it came from.
#[derive(Clone, Debug)]
pub(crate) struct Setting {
    pub raw: Raw,
    pub origin: Origin,
    /// Key as errors name it: `pool_size`, or `databases.app.pool_size` when set per database.
    pub label: String,
}

/// The winning setting per key in one context (the globals, or one database).
#[derive(Clone, Debug, Default)]
pub(crate) struct Layer {
    /// `""` for globals, `databases.NAME.` for a database: where provenance is recorded.
    pub prefix: String,
    pub settings: BTreeMap<&'static str, Setting>,
}

/// A `[databases.NAME]` table.
#[derive(Debug)]
pub(crate) struct TableDatabase {
    pub name: String,
    pub upstream: Option<Setting>,
    pub password: Option<(Secret, Origin)>,
    /// Per-database keys set in the table, labelled `databases.NAME.key`.
    pub settings: BTreeMap<&'static str, Setting>,
    pub origin: Origin,
}

/// A `[users.NAME]` table.
#[derive(Debug)]
pub(crate) struct TableUser {
    pub name: String,
    pub password: Secret,
    pub origin: Origin,
}

/// Everything gathered before typed parsing.
#[derive(Debug, Default)]
pub(crate) struct Inputs {
    pub globals: Layer,
    pub databases: Vec<TableDatabase>,
    pub users: Vec<TableUser>,
    pub errors: Vec<ConfigError>,
    /// Mistakes that do not stop a start (unknown `IAMPOOL_*` variables).
    pub warnings: Vec<ConfigError>,
    /// Files whose contents are part of the configuration (the TOML file, `IAMPOOL_<KEY>_FILE`
    /// sources): a change to one is a reason to reload.
    pub watched: Vec<PathBuf>,
    /// The libpq variables ([`PG_VARIABLES`]) that are set and not empty, by name.
    pub pg_env: BTreeMap<&'static str, String>,
}

/// The libpq environment variables iampool reads where an upstream string leaves a value out.
pub(crate) const PG_VARIABLES: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGCONNECT_TIMEOUT",
    "PGAPPNAME",
    "PGOPTIONS",
    "PGTARGETSESSIONATTRS",
    "PGLOADBALANCEHOSTS",
];

pub(crate) fn load<I, T>(
    args: I,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigErrors>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match cli::parse(args) {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => return Err(ConfigErrors(vec![clap_error(&e)])),
        },
    };
    let command = match cli.command {
        CliCommand::Token(ref args) => {
            check_signing_time(args.signing_time.as_deref())?;
            return Ok(Loaded {
                command: Command::Token(args.clone()),
                config: None,
                sources: BTreeMap::new(),
                warnings: Vec::new(),
            });
        }
        CliCommand::Inject(ref args) => {
            return Ok(Loaded {
                command: Command::Inject(args.clone()),
                config: None,
                sources: BTreeMap::new(),
                warnings: Vec::new(),
            });
        }
        CliCommand::ImportPgbouncer(ref args) => {
            return Ok(Loaded {
                command: Command::ImportPgbouncer(args.clone()),
                config: None,
                sources: BTreeMap::new(),
                warnings: Vec::new(),
            });
        }
        CliCommand::Run => Command::Run,
        CliCommand::CheckConfig => Command::CheckConfig,
    };
    let mut inputs = gather(&cli, env);
    let warnings = std::mem::take(&mut inputs.warnings);
    let (config, sources) = build::build(inputs)?;
    Ok(Loaded {
        command,
        config: Some(config),
        sources,
        warnings,
    })
}

/// `text` loaded as the configuration file at `path`, with no environment and no flags:
/// what `iampool --config PATH` would make of it in an empty environment.
pub(crate) fn load_text(text: &str, path: &Path) -> Result<super::Config, ConfigErrors> {
    let mut inputs = Inputs::default();
    read_text(text, path, &mut inputs);
    inputs.watched.push(path.to_path_buf());
    build::build(inputs).map(|(config, _)| config)
}

fn check_signing_time(time: Option<&str>) -> Result<(), ConfigErrors> {
    let Some(time) = time else { return Ok(()) };
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    match time::OffsetDateTime::parse(time, rfc3339) {
        Ok(_) => Ok(()),
        Err(_) => Err(ConfigErrors(vec![ConfigError::new(
            "signing_time",
            &Origin::Flag("--signing-time".into()),
            Problem::new(
                format!("{time:?} is not an RFC 3339 time"),
                "write e.g. 2024-01-02T03:04:05Z",
            ),
        )])),
    }
}

/// clap's own complaint (an unknown flag, a missing value) as a config error, URLs redacted.
fn clap_error(error: &clap::Error) -> ConfigError {
    let rendered = error.render().to_string();
    let redacted = |line: &str| {
        line.split(' ')
            .map(|word| {
                if word.contains("://") {
                    url::redact(word)
                } else {
                    word.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let message = rendered
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    let pgbouncer_fix = match (error.kind(), error.get(ContextKind::InvalidArg)) {
        (ErrorKind::UnknownArgument, Some(ContextValue::String(flag))) => {
            let name = flag.trim_start_matches('-').replace('-', "_");
            let name = name.split('=').next().unwrap_or_default();
            pgbouncer::hint(name, Section::Pgbouncer, &|key| {
                keys::key(key).map_or_else(|| key.to_string(), |key| format!("--{}", key.flag))
            })
        }
        _ => None,
    };
    let fix = rendered
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("tip: "))
        .unwrap_or("run iampool --help to see every flag");
    let fix = pgbouncer_fix.as_deref().unwrap_or(fix);
    ConfigError {
        key: "command line".into(),
        source: "arguments".into(),
        message: redacted(message),
        fix: redacted(fix),
    }
}

/// Flags, env and file merged: flag > env > file.
pub(crate) fn gather(cli: &CliInput, env: impl IntoIterator<Item = (String, String)>) -> Inputs {
    let mut inputs = Inputs::default();
    let env: Vec<(String, String)> = env.into_iter().collect();
    for (var, value) in &env {
        if let Some(name) = PG_VARIABLES.iter().find(|name| **name == var) {
            if !value.is_empty() {
                inputs.pg_env.insert(name, value.clone());
            }
        }
    }
    let (env_layer, env_config) = env::environment(env, &mut inputs);

    let config_path = match (&cli.config, env_config) {
        (Some(path), _) => Some((path.clone(), Origin::Flag("--config".into()))),
        (None, Some(path)) => Some((path, Origin::Env("IAMPOOL_CONFIG".into()))),
        (None, None) => None,
    };
    if let Some((path, origin)) = config_path {
        read_file(Path::new(&path), &origin, &mut inputs);
        inputs.watched.push(PathBuf::from(path));
    }
    inputs.globals.settings.extend(env_layer);
    for (key, value) in &cli.values {
        let origin = Origin::Flag(format!("--{}", key.flag));
        inputs.globals.settings.insert(
            key.name,
            global_setting(key.name, Raw::Text(value.clone()), origin),
        );
    }
    inputs
}

pub(crate) fn global_setting(name: &'static str, raw: Raw, origin: Origin) -> Setting {
    Setting {
        raw,
        origin,
        label: name.to_string(),
    }
}

/// Fix for an unknown global key that is really a per-database-only key.
pub(crate) fn unknown_key_fix(name: &str, otherwise: &str) -> String {
    match keys::key(name) {
        Some(key) if !key.is_global() => format!(
            "{name} is set per database: add ?{name}={} to the upstream URL or set it in [databases.NAME]",
            key.example
        ),
        _ => otherwise.to_string(),
    }
}

fn read_file(path: &Path, path_origin: &Origin, inputs: &mut Inputs) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            inputs.errors.push(ConfigError::new(
                "config",
                path_origin,
                Problem::new(
                    format!("cannot read {}: {e}", path.display()),
                    "check the path, or leave the file out and configure with env and flags only",
                ),
            ));
            return;
        }
    };
    read_text(&text, path, inputs);
}

/// The settings of a configuration file's text.
fn read_text(text: &str, path: &Path, inputs: &mut Inputs) {
    let file_origin = Origin::File(path.to_path_buf());
    // The error's own Display quotes the offending line, which may hold a password.
    let table = match toml::from_str::<toml::Table>(text) {
        Ok(table) => table,
        Err(e) => {
            let at = e
                .span()
                .map(|span| line_and_column(text, span.start))
                .unwrap_or_default();
            let fix = if looks_like_pgbouncer_ini(text) {
                "this looks like a pgbouncer.ini: iampool import-pgbouncer FILE writes the iampool configuration it means"
            } else {
                "fix the TOML syntax"
            };
            inputs.errors.push(ConfigError::new(
                "config",
                &file_origin,
                Problem::new(format!("{at}{}", e.message()), fix),
            ));
            return;
        }
    };
    for (name, value) in table {
        match name.as_str() {
            "databases" => file_databases(value, path, inputs),
            "users" => file_users(value, path, inputs),
            _ => match keys::key(&name).filter(|key| key.is_global()) {
                Some(key) => {
                    let setting = global_setting(key.name, Raw::Toml(value), file_origin.clone());
                    inputs.globals.settings.insert(key.name, setting);
                }
                None => {
                    let candidates = KEYS
                        .iter()
                        .filter(|key| key.is_global())
                        .map(|key| key.name)
                        .chain(["databases", "users"]);
                    let otherwise =
                        unknown_key_fix(&name, "remove it; iampool --help lists every key");
                    let fix = match name.as_str() {
                        "pgbouncer" | "peers" => format!(
                            "[{name}] is a pgbouncer.ini section: iampool import-pgbouncer FILE converts a pgbouncer.ini"
                        ),
                        _ => pgbouncer::hint(&name, Section::Pgbouncer, &str::to_string)
                            .unwrap_or_else(|| unknown_fix(&name, candidates, &otherwise)),
                    };
                    inputs.errors.push(ConfigError::new(
                        name.clone(),
                        &file_origin,
                        Problem::new("unknown key", fix),
                    ));
                }
            },
        }
    }
}

/// A `[pgbouncer]` or `[databases]` section with `name = value` lines TOML cannot read.
fn looks_like_pgbouncer_ini(text: &str) -> bool {
    text.lines()
        .any(|line| matches!(line.trim(), "[pgbouncer]" | "[databases]" | "[peers]"))
}

fn line_and_column(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}: ")
}

/// The sub-tables of `[databases]` or `[users]`, reporting anything that is not a table.
fn sub_tables(
    section: &str,
    value: toml::Value,
    origin: &Origin,
    errors: &mut Vec<ConfigError>,
) -> Vec<(String, toml::Table)> {
    let fix = format!("write [{section}.NAME] tables");
    let fix_for = |name: &str, value: &toml::Value| match (section, value) {
        ("databases", toml::Value::String(_)) => pgbouncer_style_fix(name),
        _ => fix.clone(),
    };
    let toml::Value::Table(table) = value else {
        errors.push(ConfigError::new(
            section,
            origin,
            Problem::new("is not a table", fix),
        ));
        return Vec::new();
    };
    let mut tables = Vec::new();
    for (name, value) in table {
        match value {
            toml::Value::Table(table) => tables.push((name, table)),
            other => errors.push(ConfigError::new(
                format!("{section}.{name}"),
                origin,
                Problem::new("is not a table", fix_for(&name, &other)),
            )),
        }
    }
    tables
}

/// For `[databases]` `NAME = "host=..."`, PgBouncer's way of writing a database.
fn pgbouncer_style_fix(name: &str) -> String {
    format!(
        "write [databases.{name}] with upstream = \"host=... dbname=... user=...\" (the string PgBouncer takes here); iampool import-pgbouncer converts a pgbouncer.ini"
    )
}

/// A string secret from the file; the value itself never reaches a message.
fn secret(
    label: &str,
    value: toml::Value,
    origin: &Origin,
    errors: &mut Vec<ConfigError>,
) -> Option<Secret> {
    match value {
        toml::Value::String(secret) => Some(Secret::new(secret)),
        other => {
            errors.push(ConfigError::new(
                label,
                origin,
                Problem::new(
                    format!("is a {}, not a string", other.type_str()),
                    "write the password in quotes",
                ),
            ));
            None
        }
    }
}

fn file_databases(value: toml::Value, path: &Path, inputs: &mut Inputs) {
    let origin = Origin::File(PathBuf::from(path));
    for (name, table) in sub_tables("databases", value, &origin, &mut inputs.errors) {
        let mut database = TableDatabase {
            name: name.clone(),
            upstream: None,
            password: None,
            settings: BTreeMap::new(),
            origin: origin.clone(),
        };
        for (key_name, value) in table {
            let label = format!("databases.{name}.{key_name}");
            match key_name.as_str() {
                "upstream" => {
                    database.upstream = Some(Setting {
                        raw: Raw::Toml(value),
                        origin: origin.clone(),
                        label,
                    });
                }
                "password" => {
                    database.password = secret(&label, value, &origin, &mut inputs.errors)
                        .map(|secret| (secret, origin.clone()));
                }
                _ => match keys::key(&key_name).filter(|key| key.is_per_database()) {
                    Some(key) => {
                        let setting = Setting {
                            raw: Raw::Toml(value),
                            origin: origin.clone(),
                            label,
                        };
                        database.settings.insert(key.name, setting);
                    }
                    None => {
                        let candidates = KEYS
                            .iter()
                            .filter(|key| key.is_per_database())
                            .map(|key| key.name)
                            .chain(["upstream", "password"]);
                        let fix = pgbouncer::hint(&key_name, Section::Databases, &str::to_string)
                            .unwrap_or_else(|| {
                                unknown_fix(
                                    &key_name,
                                    candidates,
                                    "remove it, or set it at the top level if it applies to every database",
                                )
                            });
                        inputs.errors.push(ConfigError::new(
                            label,
                            &origin,
                            Problem::new("unknown key", fix),
                        ));
                    }
                },
            }
        }
        inputs.databases.push(database);
    }
}

fn file_users(value: toml::Value, path: &Path, inputs: &mut Inputs) {
    let origin = Origin::File(PathBuf::from(path));
    for (name, table) in sub_tables("users", value, &origin, &mut inputs.errors) {
        let mut password = None;
        let mut given = false;
        for (key_name, value) in table {
            let label = format!("users.{name}.{key_name}");
            if key_name == "password" {
                given = true;
                password = secret(&label, value, &origin, &mut inputs.errors);
            } else {
                let fix = pgbouncer::hint(&key_name, Section::Users, &str::to_string)
                    .unwrap_or_else(|| {
                        unknown_fix(&key_name, ["password"], "a user has only a password")
                    });
                inputs.errors.push(ConfigError::new(
                    label,
                    &origin,
                    Problem::new("unknown key", fix),
                ));
            }
        }
        match password {
            Some(password) => inputs.users.push(TableUser {
                name,
                password,
                origin: origin.clone(),
            }),
            None if given => {}
            None => inputs.errors.push(ConfigError::new(
                format!("users.{name}.password"),
                &origin,
                Problem::new(
                    "is missing",
                    "set password = \"...\" (plain, md5..., or SCRAM-SHA-256$...)",
                ),
            )),
        }
    }
}
