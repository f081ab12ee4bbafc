//! Configuration: one typed, validated value built from file, environment and flags.
//!
//! The types in this file are the contract the rest of the crate reads. Loading, merging
//! (flag > env > file), validation and documentation live in the sibling files.

pub mod auth_file;
mod build;
mod cli;
mod conninfo;
mod database;
mod env;
mod error;
pub mod import;
pub mod keys;
mod load;
pub mod pgbouncer;
mod render;
#[cfg(test)]
mod tests;
pub mod url;
mod value;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use cli::command as cli_command;
pub use error::{ConfigError, ConfigErrors, Origin, Problem};
pub use keys::is_reloadable;
pub use render::example_toml;
pub use value::Named;

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub applied: Vec<String>,
    /// Changed keys that only take effect after a restart.
    pub needs_restart: Vec<String>,
}

/// A secret value (password, verifier). Never printed: `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself. Call sites are the only places a secret leaves this type.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// The server is held for one transaction (released at ReadyForQuery 'I').
    Transaction,
    /// The server is held for the whole client session.
    Session,
}

/// How clients authenticate to iampool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthType {
    ScramSha256,
    Md5,
    Trust,
}

/// Client-facing TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTls {
    Disable,
    Allow,
    Require,
}

/// libpq's sslmode, for the upstream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// libpq's target_session_attrs: which servers a pool accepts, checked at every login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    Any,
    /// Not in hot standby and not read-only by default: a writer.
    ReadWrite,
    /// In hot standby, or read-only by default.
    ReadOnly,
    /// Not in recovery.
    Primary,
    /// In recovery (a streaming standby or an Aurora reader).
    Standby,
    /// A standby if one answers, else any (with one host: any).
    PreferStandby,
}

/// What transaction mode does with a client that makes session state no other server can
/// carry (temporary tables, session advisory locks, WITH HOLD cursors, SQL PREPARE, a LISTEN
/// that reaches a server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStateMode {
    /// The client keeps its server until the state is gone (up to max_pinned_servers).
    Pin,
    /// A warning only, and the server goes back to the pool with the state (PgBouncer).
    Warn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How iampool signs in to the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// Password from the URL / config (SCRAM-SHA-256, md5 or cleartext, as the server asks).
    Password,
    /// A short-lived RDS IAM token sent as the cleartext password, over verified TLS only.
    Iam(IamConfig),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IamConfig {
    /// Signing region: explicit, or inferred from an `*.REGION.rds.amazonaws.com` host.
    pub region: String,
    /// True when `region` was inferred from the host name (logged at start).
    pub region_inferred: bool,
    /// Roles assumed in order (cross-account chains): the first with the default chain's
    /// credentials, each next one with the previous role's.
    pub assume_role_arns: Vec<String>,
    pub external_id: Option<String>,
    pub role_session_name: String,
    /// Usable life of a token; at most 900 s.
    pub token_lifetime: Duration,
}

/// libpq's load_balance_hosts: the order the hosts are tried in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalanceHosts {
    /// In the order written.
    Disable,
    /// In a random order, shuffled for each connection.
    Random,
}

/// One upstream host, as libpq's host, port and hostaddr lists give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Host name: the name dialled (unless `addr`), verified in TLS and signed for IAM.
    pub name: String,
    pub port: u16,
    /// Address dialled instead of resolving `name` (libpq's hostaddr).
    pub addr: Option<IpAddr>,
}

/// Where and how to reach one upstream database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The hosts to try, in the order written; never empty.
    pub hosts: Vec<Host>,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub auth: UpstreamAuth,
    /// Send a cleartext password to a server that is not verified (off by default).
    pub allow_cleartext_password: bool,
    /// auth=iam over TLS that does not verify the server (test setups only; off by default).
    pub insecure_unverified_tls: bool,
    /// New server logins per second to this host, shared by every pool to it.
    pub max_new_connections_per_second: u32,
    /// Optional bound on how long a pooled session lives after its login (IAM re-authentication).
    pub reauth_interval: Option<Duration>,
    /// Which servers are accepted (writer, reader, ...), checked at login and followed after.
    pub target_session_attrs: TargetSessionAttrs,
    /// The order `hosts` are tried in.
    pub load_balance_hosts: LoadBalanceHosts,
    /// libpq's connect_timeout: the limit on one host attempt; `None` (0 or unset) means
    /// `server_connect_timeout`. Never under 2 s (libpq raises 1 to 2).
    pub connect_timeout: Option<Duration>,
    /// Sent in the upstream startup packet when set.
    pub application_name: Option<String>,
    /// libpq's options (command-line options for the server, e.g. `-c search_path=app`),
    /// sent in the upstream startup packet when set.
    pub options: Option<String>,
}

/// One client-facing database (= one pool).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Database {
    /// Name clients put in their startup packet.
    pub name: String,
    pub upstream: Upstream,
    pub pool_mode: PoolMode,
    pub pool_size: usize,
    pub min_pool_size: usize,
    /// Extra servers beyond pool_size for clients that waited reserve_pool_timeout.
    pub reserve_pool_size: usize,
    /// Most server connections to this upstream database (same hosts and dbname) across
    /// pools; 0: no limit.
    pub max_db_connections: usize,
    /// The database whose pool takes transactions that declare themselves read-only.
    pub read_only_database: Option<String>,
}

/// TCP options set on every client and server socket (PgBouncer's tcp_* settings); `None`
/// keeps the system's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    pub keepalive: bool,
    /// Idle time before the first keepalive probe (whole seconds).
    pub keepidle: Option<Duration>,
    /// Time between unanswered probes (whole seconds).
    pub keepintvl: Option<Duration>,
    /// Unanswered probes before the connection is dropped.
    pub keepcnt: Option<u32>,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged.
    pub user_timeout: Option<Duration>,
}

impl Default for TcpOptions {
    /// PgBouncer's defaults: keepalive on, the system's timing.
    fn default() -> Self {
        TcpOptions {
            keepalive: true,
            keepidle: None,
            keepintvl: None,
            keepcnt: None,
            user_timeout: None,
        }
    }
}

/// A client user's stored secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserSecret {
    /// Plain password (config file or auth file).
    Plain(Secret),
    /// `md5` + md5(password + user), as in pg_authid / PgBouncer's auth file.
    Md5(Secret),
    /// `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    Scram(Secret),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// TCP listen addresses (default 127.0.0.1:6432).
    pub listen: Vec<SocketAddr>,
    /// Directory for a `.s.PGSQL.<port>` unix socket, if any.
    pub unix_socket_dir: Option<PathBuf>,
    /// 0: one per core (multi-threaded scheduler); 1: a single-threaded runtime.
    pub worker_threads: usize,
    pub max_client_conn: usize,
    /// Client connections still logging in; 0 = no separate limit.
    pub max_pending_logins: usize,
    /// Wait before a failed client login's error.
    pub auth_failure_delay: Duration,
    /// Failed logins per source address per minute; 0 = no limit.
    pub auth_failure_limit: usize,
    /// Named prepared statements per server connection in transaction mode; 0 disables the rewriting.
    pub max_prepared_statements: usize,
    pub server_lifetime: Duration,
    /// Up to this much is added at random to each server's lifetime so they do not expire together.
    pub server_lifetime_jitter: Duration,
    pub server_idle_timeout: Duration,
    pub server_connect_timeout: Duration,
    /// Run on a server idle this long or longer before a client gets it; empty: no check.
    pub server_check_query: String,
    pub server_check_delay: Duration,
    /// Keepalive and TCP_USER_TIMEOUT on client and server sockets.
    pub tcp: TcpOptions,
    pub server_login_retry: Duration,
    pub query_wait_timeout: Duration,
    /// A client waiting this long for a server lets its pool use its reserve.
    pub reserve_pool_timeout: Duration,
    /// Most server connections signed in as one upstream user across pools; 0: no limit.
    pub max_user_connections: usize,
    pub client_login_timeout: Duration,
    /// None = disabled.
    pub idle_transaction_timeout: Option<Duration>,
    /// A request unanswered this long is cut off (its server closed); None = disabled.
    pub query_timeout: Option<Duration>,
    /// A client holding no server idle this long is disconnected; None = disabled.
    pub client_idle_timeout: Option<Duration>,
    pub max_message_size: usize,
    pub server_reset_query: String,
    pub session_state: SessionStateMode,
    /// Servers each pool lets clients pin; None: half of the pool's pool_size, at least 1.
    pub max_pinned_servers: Option<usize>,
    pub auth_type: AuthType,
    pub auth_file: Option<PathBuf>,
    /// Append the client's address to its startup application_name.
    pub application_name_add_host: bool,
    /// Startup parameters dropped at login, lower case (`options` drops the whole parameter).
    pub ignore_startup_parameters: Vec<String>,
    /// Client users: from `[users.NAME]`, the auth file, and upstream URLs that carry a password.
    pub users: BTreeMap<String, UserSecret>,
    pub client_tls: ClientTls,
    pub client_tls_cert_file: Option<PathBuf>,
    pub client_tls_key_file: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    /// After SIGTERM, keep serving (not ready) this long before draining.
    pub min_sigterm_delay: Duration,
    /// How often watched files are checked for changes; zero: never.
    pub reload_check_interval: Duration,
    /// Serve `POST /quitquitquit` on the metrics listener.
    pub quitquitquit: bool,
    pub log_level: String,
    pub log_format: LogFormat,
    pub metrics_listen: Option<SocketAddr>,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    pub databases: Vec<Database>,
    /// Files this configuration was read from (the TOML file, `auth_file`, each
    /// `IAMPOOL_<KEY>_FILE`): checked every `reload_check_interval`, a change reloads.
    pub watched_files: Vec<PathBuf>,
}

impl Config {
    pub fn database(&self, name: &str) -> Option<&Database> {
        self.databases.iter().find(|d| d.name == name)
    }
}

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the pooler (no subcommand).
    Run,
    /// Validate the configuration and print [`Loaded::render_redacted`].
    CheckConfig,
    /// Print an IAM token; no configuration is loaded.
    Token(TokenArgs),
    /// Add the sidecar to Kubernetes YAML; no configuration is loaded.
    Inject(InjectArgs),
    /// Write the iampool configuration a pgbouncer.ini means; no configuration is loaded.
    ImportPgbouncer(ImportArgs),
}

/// Arguments of `iampool import-pgbouncer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportArgs {
    pub ini: PathBuf,
    /// PgBouncer's auth_file, when not the one pgbouncer.ini names.
    pub userlist: Option<PathBuf>,
    /// Where the configuration goes; stdout when unset.
    pub output: Option<PathBuf>,
}

/// Arguments of `iampool inject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectArgs {
    /// A path, or `-` for stdin.
    pub file: String,
    pub options: crate::inject::Options,
}

/// Arguments of `iampool token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenArgs {
    pub host: String,
    /// Default 5432.
    pub port: u16,
    pub user: String,
    /// Unset: infer from the host ([`url::infer_region`]).
    pub region: Option<String>,
    /// RFC 3339, checked to parse; unset means now.
    pub signing_time: Option<String>,
    /// AWS profile for the base credentials (unset: AWS_PROFILE or the default chain).
    pub profile: Option<String>,
    /// Roles assumed in order on top of the base credentials.
    pub assume_role_arns: Vec<String>,
    pub external_id: Option<String>,
    pub role_session_name: String,
}

/// The result of a full load.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub command: Command,
    /// `None` for [`Command::Token`].
    pub config: Option<Config>,
    /// Where each effective value came from, by key: `listen`, `databases.app.sslmode`,
    /// `databases.app.password`, `users.alice`. Values not listed are defaults.
    pub sources: BTreeMap<String, Origin>,
    /// Mistakes that do not stop the start (an unknown `IAMPOOL_*` variable): to be logged.
    pub warnings: Vec<ConfigError>,
}

impl Loaded {
    /// [`Config::render_redacted`] with the source of each value in a trailing comment.
    pub fn render_redacted(&self) -> String {
        match &self.config {
            Some(config) => render::render(config, &|label| {
                Some(
                    self.sources
                        .get(label)
                        .unwrap_or(&Origin::Default)
                        .to_string(),
                )
            }),
            None => String::new(),
        }
    }
}

impl Config {
    /// Full load from process args (including argv[0]) and an environment, flag > env > file >
    /// default. Every mistake is reported together. Like clap's `parse`, `--help` and
    /// `--version` print and exit the process.
    pub fn load(
        args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, ConfigErrors> {
        load::load(args, env)
    }

    /// For tests: `load(["iampool", ..args], env)`, for the run or check-config command.
    pub fn from_args(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let args = std::iter::once("iampool").chain(args.iter().copied());
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let loaded = Config::load(args, env)?;
        loaded.config.ok_or_else(|| {
            ConfigErrors(vec![ConfigError {
                key: "command line".into(),
                source: "arguments".into(),
                message: "the token command loads no configuration".into(),
                fix: "use Config::load for the token command".into(),
            }])
        })
    }

    /// `text` read as the configuration file at `path`, with no environment and no flags.
    pub fn from_toml(text: &str, path: &std::path::Path) -> Result<Config, ConfigErrors> {
        load::load_text(text, path)
    }

    /// The effective configuration as TOML with secrets redacted. Without provenance; use
    /// [`Loaded::render_redacted`] for each value's source.
    pub fn render_redacted(&self) -> String {
        render::render(self, &|_| None)
    }

    /// Keys whose effective value differs in `new` (global key names, then `databases` and
    /// `users`). RELOAD applies those [`is_reloadable`] accepts and reports the rest.
    pub fn changed_keys(&self, new: &Config) -> Vec<&'static str> {
        render::changed_keys(self, new)
    }
}
