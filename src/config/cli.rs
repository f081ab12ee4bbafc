//! The command line: subcommands and one flag per key, with help generated from the key table.
//!
//! Flags are collected as raw strings; the loader parses them with env and file values so that
//! every mistake is reported together, not clap's first one.

use clap::{Arg, ArgAction, ArgMatches};

use super::keys::{DefaultValue, Key, Kind, KEYS};
use super::{ImportArgs, InjectArgs, TokenArgs};

/// What the command line asked for, before any value is parsed.
pub(crate) struct CliInput {
    pub command: CliCommand,
    /// `--config FILE`.
    pub config: Option<String>,
    /// Flag values in key-table order; repeated list flags are joined.
    pub values: Vec<(&'static Key, String)>,
}

pub(crate) enum CliCommand {
    Run,
    CheckConfig,
    Token(TokenArgs),
    Inject(InjectArgs),
    ImportPgbouncer(ImportArgs),
}

const PRECEDENCE: &str = "\
Every key can be set in the TOML file (--config FILE, or IAMPOOL_CONFIG), as an environment \
variable IAMPOOL_<KEY> (e.g. IAMPOOL_POOL_SIZE=20), or as a flag --<key-with-dashes>. \
A flag beats the environment, which beats the file, which beats the default. \
`iampool --upstream URL` is a complete configuration; URL parameters (e.g. ?auth=iam&region=us-east-1) \
set per-database keys.

Durations are seconds or a number with a unit (500ms, 30s, 5min, 1h); sizes are bytes or a number \
with a unit (64kB, 8MB, 1GB); booleans are true/false, on/off or 1/0. \
Keys marked [reload] take effect on RELOAD; [restart] keys need a restart.";

/// The whole command line, for parsing and for `--help`.
pub fn command() -> clap::Command {
    let check = with_key_args(
        clap::Command::new("check-config")
            .about("Validate the configuration and print it with secrets redacted")
            .after_help(PRECEDENCE),
    );
    let root = clap::Command::new("iampool")
        .version(env!("CARGO_PKG_VERSION"))
        .about("PostgreSQL connection pooler sidecar that signs in to RDS and Aurora with IAM")
        .after_help(PRECEDENCE)
        .subcommand(check)
        .subcommand(token_command())
        .subcommand(inject_command())
        .subcommand(import_command());
    with_key_args(root)
}

fn token_command() -> clap::Command {
    clap::Command::new("token")
        .about("Print an RDS IAM token for a host, port and user")
        .arg(
            Arg::new("host")
                .long("host")
                .required(true)
                .value_name("HOST")
                .help("Database endpoint name the token is signed for"),
        )
        .arg(
            Arg::new("port")
                .long("port")
                .value_name("PORT")
                .default_value("5432")
                .value_parser(clap::value_parser!(u16).range(1..))
                .help("Database port"),
        )
        .arg(
            Arg::new("user")
                .long("user")
                .required(true)
                .value_name("USER")
                .help("Database user"),
        )
        .arg(
            Arg::new("region")
                .long("region")
                .value_name("REGION")
                .help("Signing region (default: inferred from the host)"),
        )
        .arg(
            Arg::new("signing-time")
                .long("signing-time")
                .value_name("RFC3339")
                .help("Sign as of this time instead of now, e.g. 2024-01-02T03:04:05Z"),
        )
        .arg(
            Arg::new("profile")
                .long("profile")
                .value_name("NAME")
                .help("AWS profile whose credentials sign (default: AWS_PROFILE, else the default chain)"),
        )
        .arg(
            Arg::new("assume-role-arn")
                .long("assume-role-arn")
                .value_name("ARN")
                .action(ArgAction::Append)
                .value_delimiter(',')
                .help("Roles to assume in order (comma-separated or repeated), as the assume_role_arn setting"),
        )
        .arg(
            Arg::new("external-id")
                .long("external-id")
                .value_name("ID")
                .help("External id for the assumed roles"),
        )
        .arg(
            Arg::new("role-session-name")
                .long("role-session-name")
                .value_name("NAME")
                .default_value("iampool")
                .help("Session name of the assumed roles"),
        )
}

fn inject_command() -> clap::Command {
    use crate::inject::{
        DEFAULT_CPU_REQUEST, DEFAULT_IMAGE, DEFAULT_MEMORY_LIMIT, DEFAULT_MEMORY_REQUEST,
    };
    let text = |id: &'static str, value: &'static str, help: &'static str| {
        Arg::new(id).long(id).value_name(value).help(help)
    };
    clap::Command::new("inject")
        .about("Add an iampool sidecar to Kubernetes workloads (YAML from a file or stdin, to stdout)")
        .after_help(
            "Example: iampool inject deploy.yaml | kubectl apply -f -\n\
             Each Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and Pod gets iampool as \
             a native sidecar (an init container with restartPolicy: Always, Kubernetes 1.29+); the \
             application's DATABASE_URL moves to the sidecar and is replaced by \
             postgres://user@127.0.0.1:6432/dbname. Other documents, and workloads that already have \
             the sidecar, are written back unchanged.",
        )
        .arg(
            Arg::new("file")
                .value_name("FILE")
                .default_value("-")
                .help("Kubernetes YAML (several documents and Lists allowed); - for stdin"),
        )
        .arg(text("upstream", "URL", "The database (default: the application's DATABASE_URL); a URL without a password signs in with IAM"))
        .arg(text("env-var", "NAME", "The application's variable with the database URL").default_value("DATABASE_URL"))
        .arg(
            text("container", "NAME", "Point only this container at the sidecar (repeatable; default: every container that sets the variable)")
                .action(ArgAction::Append),
        )
        .arg(text("image", "IMAGE", "The iampool image").default_value(DEFAULT_IMAGE))
        .arg(text("region", "REGION", "AWS region for IAM (default: inferred from an RDS host name)"))
        .arg(
            text("pool-size", "N", "Server connections per pod (pods x pool size must fit the database's max_connections)")
                .default_value("10")
                .value_parser(clap::value_parser!(u32).range(1..)),
        )
        .arg(
            text("port", "PORT", "Port the sidecar listens on, on 127.0.0.1")
                .default_value("6432")
                .value_parser(clap::value_parser!(u16).range(1..)),
        )
        .arg(
            text("http-port", "PORT", "Port of the sidecar's probes and metrics")
                .default_value("9090")
                .value_parser(clap::value_parser!(u16).range(1..)),
        )
        .arg(text("service-account", "NAME", "Set the pod's serviceAccountName (for IRSA: one annotated eks.amazonaws.com/role-arn)"))
        .arg(text("cpu-request", "CPU", "The sidecar's CPU request").default_value(DEFAULT_CPU_REQUEST))
        .arg(text("memory-request", "SIZE", "The sidecar's memory request").default_value(DEFAULT_MEMORY_REQUEST))
        .arg(text("memory-limit", "SIZE", "The sidecar's memory limit").default_value(DEFAULT_MEMORY_LIMIT))
}

fn import_command() -> clap::Command {
    let path =
        |id: &'static str| Arg::new(id).value_parser(clap::value_parser!(std::path::PathBuf));
    clap::Command::new("import-pgbouncer")
        .about("Write the iampool configuration a pgbouncer.ini means (TOML, to stdout), and on stderr what was carried over, what was changed and what could not be, and why")
        .after_help(
            "Example: iampool import-pgbouncer /etc/pgbouncer/pgbouncer.ini -o iampool.toml\n\
             %include files are read as PgBouncer reads them. The users of the auth file (the \
             USERLIST given, else pgbouncer.ini's auth_file) stay in that file, which iampool \
             reads as PgBouncer does; a password PgBouncer would take from it for a server login \
             is written into the database's table. No password appears in the report.\n\
             Exit status: 0 when the configuration is written and loads; 1 when it is written \
             but does not load here as it is (the report says why, e.g. a file that exists only \
             on the PgBouncer host); 2 when nothing is written (a mistake in the input, with its \
             file and line)",
        )
        .arg(
            path("ini")
                .value_name("PGBOUNCER_INI")
                .required(true)
                .help("PgBouncer's configuration file"),
        )
        .arg(
            path("userlist")
                .value_name("USERLIST")
                .help("PgBouncer's auth file (default: the auth_file pgbouncer.ini names)"),
        )
        .arg(
            path("output")
                .long("output")
                .short('o')
                .value_name("FILE")
                .help("Write the configuration here (mode 0600) instead of stdout"),
        )
}

fn import_args(matches: &ArgMatches) -> ImportArgs {
    let path = |id: &str| matches.get_one::<std::path::PathBuf>(id).cloned();
    ImportArgs {
        ini: path("ini").unwrap_or_default(),
        userlist: path("userlist"),
        output: path("output"),
    }
}

fn inject_args(matches: &ArgMatches) -> InjectArgs {
    let text = |id: &str| matches.get_one::<String>(id).cloned();
    let defaults = crate::inject::Options::default();
    InjectArgs {
        file: text("file").unwrap_or_else(|| "-".into()),
        options: crate::inject::Options {
            upstream: text("upstream"),
            env_var: text("env-var").unwrap_or(defaults.env_var),
            containers: matches
                .get_many::<String>("container")
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
            image: text("image").unwrap_or(defaults.image),
            region: text("region"),
            pool_size: matches
                .get_one::<u32>("pool-size")
                .copied()
                .unwrap_or(defaults.pool_size),
            port: matches
                .get_one::<u16>("port")
                .copied()
                .unwrap_or(defaults.port),
            http_port: matches
                .get_one::<u16>("http-port")
                .copied()
                .unwrap_or(defaults.http_port),
            service_account: text("service-account"),
            cpu_request: text("cpu-request").unwrap_or(defaults.cpu_request),
            memory_request: text("memory-request").unwrap_or(defaults.memory_request),
            memory_limit: text("memory-limit").unwrap_or(defaults.memory_limit),
        },
    }
}

fn with_key_args(command: clap::Command) -> clap::Command {
    let config = Arg::new("config")
        .long("config")
        .short('c')
        .value_name("FILE")
        .help("TOML configuration file [env: IAMPOOL_CONFIG]");
    KEYS.iter().filter(|key| key.is_global()).fold(
        command.args_override_self(true).arg(config),
        |command, key| {
            command.arg(
                Arg::new(key.name)
                    .long(key.flag)
                    .value_name(value_name(key.kind))
                    .help(arg_help(key))
                    .help_heading(key.group)
                    .action(if key.kind.is_list() {
                        ArgAction::Append
                    } else {
                        ArgAction::Set
                    }),
            )
        },
    )
}

fn value_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Addrs => "HOST:PORT[,...]",
        Kind::Addr => "HOST:PORT",
        Kind::Dir | Kind::File => "PATH",
        Kind::Count => "N",
        Kind::Duration => "DURATION",
        Kind::Size => "SIZE",
        Kind::Text | Kind::LogFilter => "TEXT",
        Kind::Choice(_) => "CHOICE",
        Kind::Names => "NAME[,...]",
        Kind::Urls => "URL",
        Kind::Arns => "ARN[,...]",
        Kind::Bool => "BOOL",
        Kind::Ip => "IP",
        Kind::Region => "REGION",
    }
}

/// The help line of a key: text, default, env var and reload behaviour.
pub(crate) fn arg_help(key: &Key) -> String {
    let choices = match key.kind {
        Kind::Choice(names) => format!(" [one of: {}]", names.join(", ")),
        _ => String::new(),
    };
    format!(
        "{}{choices} [default: {}] [env: {}] [{}]",
        key.help,
        default_text(key),
        key.env_var(),
        if key.reload { "reload" } else { "restart" }
    )
}

/// The default as documentation shows it.
pub(crate) fn default_text(key: &Key) -> String {
    match key.default {
        DefaultValue::Value("") => "empty".to_string(),
        DefaultValue::Value(value) => value.to_string(),
        DefaultValue::Unset => "unset".to_string(),
        DefaultValue::Derived(how) => how.to_string(),
    }
}

pub(crate) fn parse<I, T>(args: I) -> Result<CliInput, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let mut input = collect(&matches, CliCommand::Run);
    match matches.subcommand() {
        Some(("check-config", sub)) => {
            // Flags after the subcommand win over flags before it.
            let after = collect(sub, CliCommand::CheckConfig);
            input.command = CliCommand::CheckConfig;
            input.config = after.config.or(input.config);
            for (key, value) in after.values {
                input.values.retain(|(seen, _)| seen.name != key.name);
                input.values.push((key, value));
            }
        }
        Some(("token", sub)) => input.command = CliCommand::Token(token_args(sub)),
        Some(("inject", sub)) => input.command = CliCommand::Inject(inject_args(sub)),
        Some(("import-pgbouncer", sub)) => {
            input.command = CliCommand::ImportPgbouncer(import_args(sub));
        }
        _ => {}
    }
    Ok(input)
}

fn collect(matches: &ArgMatches, command: CliCommand) -> CliInput {
    let values = KEYS
        .iter()
        .filter(|key| key.is_global())
        .filter_map(|key| {
            let given: Vec<&String> = matches.get_many::<String>(key.name)?.collect();
            let separator = if key.kind == Kind::Urls { " " } else { "," };
            let joined = given
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(separator);
            Some((key, joined))
        })
        .collect();
    CliInput {
        command,
        config: matches.get_one::<String>("config").cloned(),
        values,
    }
}

fn token_args(matches: &ArgMatches) -> TokenArgs {
    let text = |id: &str| matches.get_one::<String>(id).cloned();
    TokenArgs {
        host: text("host").unwrap_or_default(),
        port: matches.get_one::<u16>("port").copied().unwrap_or(5432),
        user: text("user").unwrap_or_default(),
        region: text("region"),
        signing_time: text("signing-time"),
        profile: text("profile"),
        assume_role_arns: matches
            .get_many::<String>("assume-role-arn")
            .map(|v| v.filter(|s| !s.is_empty()).cloned().collect())
            .unwrap_or_default(),
        external_id: text("external-id"),
        role_session_name: text("role-session-name").unwrap_or_else(|| "iampool".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn help_documents_every_key_env_and_precedence() {
        let help = command().render_help().to_string();
        let flowing = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for key in KEYS.iter().filter(|key| key.is_global()) {
            assert!(help.contains(&format!("--{}", key.flag)), "{}", key.name);
            assert!(help.contains(&key.env_var()), "{}", key.name);
        }
        assert!(help.contains("IAMPOOL_<KEY>"));
        assert!(flowing.contains("A flag beats the environment, which beats the file"));
        assert!(help.contains("check-config") && help.contains("token"));
    }

    #[test]
    fn version_and_help_are_clap_displays() {
        let err = command()
            .try_get_matches_from(["iampool", "--version"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        let err = command()
            .try_get_matches_from(["iampool", "--help"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn flags_are_raw_strings_and_lists_append() {
        let input = parse([
            "iampool",
            "--pool-size",
            "ten",
            "--upstream",
            "postgres://a@h/x",
            "--upstream",
            "postgres://b@h/y",
            "--admin-users",
            "a",
            "--admin-users",
            "b",
        ])
        .unwrap();
        let value = |name: &str| {
            input
                .values
                .iter()
                .find(|(k, _)| k.name == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(value("pool_size"), Some("ten"));
        assert_eq!(value("upstream"), Some("postgres://a@h/x postgres://b@h/y"));
        assert_eq!(value("admin_users"), Some("a,b"));
    }

    #[test]
    fn token_subcommand() {
        let input = parse([
            "iampool",
            "token",
            "--host",
            "h.rds.amazonaws.com",
            "--user",
            "u",
            "--region",
            "us-east-1",
        ])
        .unwrap();
        let CliCommand::Token(args) = input.command else {
            panic!("not token")
        };
        assert_eq!(
            (args.host.as_str(), args.port, args.user.as_str()),
            ("h.rds.amazonaws.com", 5432, "u")
        );
        assert_eq!(args.region.as_deref(), Some("us-east-1"));
        assert_eq!((args.profile, args.external_id), (None, None));
        assert!(args.assume_role_arns.is_empty());
        assert!(parse(["iampool", "token", "--host", "h"]).is_err());
        let input = parse([
            "iampool",
            "token",
            "--host",
            "h",
            "--user",
            "u",
            "--profile",
            "ops",
            "--assume-role-arn",
            "arn:aws:iam::1:role/a,arn:aws:iam::2:role/b",
            "--assume-role-arn",
            "arn:aws:iam::3:role/c",
            "--external-id",
            "x-1",
        ])
        .unwrap();
        let CliCommand::Token(args) = input.command else {
            panic!("not token")
        };
        assert_eq!(args.profile.as_deref(), Some("ops"));
        assert_eq!(
            args.assume_role_arns,
            [
                "arn:aws:iam::1:role/a",
                "arn:aws:iam::2:role/b",
                "arn:aws:iam::3:role/c"
            ]
        );
        assert_eq!(args.external_id.as_deref(), Some("x-1"));
        assert_eq!(args.role_session_name, "iampool");
    }
}
