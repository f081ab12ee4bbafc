//! The table of configuration keys: name, kind, default, unit, whether it reloads, and help.
//!
//! `--help`, `config/iampool.example.toml` and [`is_reloadable`] are all generated from this
//! table, so the documentation cannot drift from what the loader accepts.

use super::value::Named;
use super::{
    AuthType, ClientTls, LoadBalanceHosts, LogFormat, PoolMode, SessionStateMode, SslMode,
    TargetSessionAttrs,
};

/// Where a key may be set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Top level of the file, `IAMPOOL_<KEY>`, `--<key>`.
    Global,
    /// As `Global`, and also per database (`[databases.NAME]` or a URL parameter), which wins.
    PerDatabase,
    /// Only per database: `[databases.NAME]` or a URL parameter.
    DatabaseOnly,
}

/// What a key's value looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Comma-separated `host:port` list (an array in the file).
    Addrs,
    /// One `host:port`.
    Addr,
    /// A directory that must exist.
    Dir,
    /// A file that must exist.
    File,
    /// A whole number of `Key::unit`.
    Count,
    /// Seconds, or a number with a unit: us, ms, s, min, h, d.
    Duration,
    /// Bytes, or a number with a unit: B, kB, MB, GB.
    Size,
    Text,
    /// One of these names.
    Choice(&'static [&'static str]),
    /// A tracing `EnvFilter` directive string.
    LogFilter,
    /// Comma-separated names (an array in the file).
    Names,
    /// Whitespace-separated upstream URLs, or one libpq keyword=value string (a string, or an
    /// array of either, in the file).
    Urls,
    /// One IAM role ARN or a comma-separated chain (an array in the file).
    Arns,
    Bool,
    /// IP address literals, comma-separated (libpq's hostaddr list).
    Ip,
    /// An AWS region name.
    Region,
}

impl Kind {
    /// Whether repeated flags append rather than override.
    pub fn is_list(self) -> bool {
        matches!(self, Kind::Addrs | Kind::Names | Kind::Urls | Kind::Arns)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultValue {
    /// Parsed by the same code as a user's value.
    Value(&'static str),
    Unset,
    /// Computed from other settings; the text says how.
    Derived(&'static str),
}

#[derive(Clone, Copy, Debug)]
pub struct Key {
    /// Name in the file; the env var is `IAMPOOL_` + upper case.
    pub name: &'static str,
    /// Long flag without the leading dashes (the name with `-` for `_`).
    pub flag: &'static str,
    pub kind: Kind,
    pub default: DefaultValue,
    /// Unit of a `Count` ("server connections"), used in docs and fixes.
    pub unit: &'static str,
    /// Takes effect on RELOAD; otherwise needs a restart.
    pub reload: bool,
    pub scope: Scope,
    /// `--help` heading and example-file section.
    pub group: &'static str,
    pub help: &'static str,
    /// A valid value other than the default, used in docs and fixes.
    pub example: &'static str,
}

impl Key {
    const fn new(name: &'static str, flag: &'static str, kind: Kind, group: &'static str) -> Key {
        Key {
            name,
            flag,
            kind,
            default: DefaultValue::Unset,
            unit: "",
            reload: true,
            scope: Scope::Global,
            group,
            help: "",
            example: "",
        }
    }
    const fn default(mut self, value: &'static str) -> Key {
        self.default = DefaultValue::Value(value);
        self
    }
    const fn derived(mut self, how: &'static str) -> Key {
        self.default = DefaultValue::Derived(how);
        self
    }
    const fn unit(mut self, unit: &'static str) -> Key {
        self.unit = unit;
        self
    }
    const fn restart(mut self) -> Key {
        self.reload = false;
        self
    }
    const fn per_database(mut self) -> Key {
        self.scope = Scope::PerDatabase;
        self
    }
    const fn database_only(mut self) -> Key {
        self.scope = Scope::DatabaseOnly;
        self
    }
    const fn help(mut self, help: &'static str) -> Key {
        self.help = help;
        self
    }
    const fn example(mut self, example: &'static str) -> Key {
        self.example = example;
        self
    }

    /// `IAMPOOL_POOL_SIZE` for `pool_size`.
    pub fn env_var(&self) -> String {
        format!("IAMPOOL_{}", self.name.to_ascii_uppercase())
    }

    /// Whether the key can be set at the top level / in env / as a flag.
    pub fn is_global(&self) -> bool {
        self.scope != Scope::DatabaseOnly
    }

    /// Whether the key can be set per database.
    pub fn is_per_database(&self) -> bool {
        self.scope != Scope::Global
    }
}

const LISTENING: &str = "Listening";
const POOLS: &str = "Pools";
const TIMEOUTS: &str = "Timeouts and limits";
const CLIENTS: &str = "Client authentication and TLS";
const LOGGING: &str = "Logging, metrics and admin";
const UPSTREAM: &str = "Upstream: database URLs, and defaults each database may override";
const DATABASE: &str = "Per database only (URL parameter or [databases.NAME] key)";

/// The upstream `auth` choices.
pub const UPSTREAM_AUTH_NAMES: &[&str] = &["password", "iam"];

pub static KEYS: &[Key] = &[
    Key::new("listen", "listen", Kind::Addrs, LISTENING)
        .default("127.0.0.1:6432")
        .restart()
        .help("TCP addresses clients connect to, comma-separated host:port ([::1]:6432 for IPv6)")
        .example("0.0.0.0:6432"),
    Key::new("unix_socket_dir", "unix-socket-dir", Kind::Dir, LISTENING)
        .restart()
        .help("Directory for a .s.PGSQL.<port> unix socket (unset: no unix socket)")
        .example("/var/run/iampool"),
    Key::new("worker_threads", "worker-threads", Kind::Count, LISTENING)
        .restart()
        .default("0")
        .unit("threads")
        .help("Threads serving clients: 0 for one per CPU core (tokio's work-stealing scheduler), 1 for a single thread that does everything itself (no cross-thread wakeups, least CPU per transaction, like PgBouncer); other values are taken as given")
        .example("1"),
    Key::new("max_client_conn", "max-client-conn", Kind::Count, LISTENING)
        .default("1000")
        .unit("client connections")
        .help("Most client connections accepted at once")
        .example("5000"),
    Key::new("max_pending_logins", "max-pending-logins", Kind::Count, LISTENING)
        .default("256")
        .unit("connections")
        .help("Most client connections still logging in at once; a connection beyond it is refused (53300) without counting toward max_client_conn, so stalled or slow logins cannot take logged-in clients' places; 0 for no separate limit")
        .example("20"),
    Key::new("pool_mode", "pool-mode", Kind::Choice(PoolMode::NAMES), POOLS)
        .default("transaction")
        .per_database()
        .help("transaction: a server connection is held for one transaction; session: for the whole client session")
        .example("session"),
    Key::new("max_prepared_statements", "max-prepared-statements", Kind::Count, POOLS)
        .default("200")
        .unit("statements per server connection")
        .help("Named prepared statements kept on each server connection in transaction mode (least recently used are closed); 0 passes statement names through untouched")
        .example("500"),
    Key::new("pool_size", "pool-size", Kind::Count, POOLS)
        .default("10")
        .unit("server connections")
        .per_database()
        .help("Most server connections per database pool")
        .example("20"),
    Key::new("min_pool_size", "min-pool-size", Kind::Count, POOLS)
        .default("0")
        .unit("server connections")
        .per_database()
        .help("Server connections kept open even when idle; at most pool_size")
        .example("2"),
    Key::new("reserve_pool_size", "reserve-pool-size", Kind::Count, POOLS)
        .default("0")
        .unit("server connections")
        .per_database()
        .help("Extra server connections a pool may open beyond pool_size once a client has waited reserve_pool_timeout for one, as PgBouncer's reserve pool; an extra connection serves clients that have waited that long and is closed when it comes back with none waiting so long; 0 for no reserve")
        .example("5"),
    Key::new("reserve_pool_timeout", "reserve-pool-timeout", Kind::Duration, POOLS)
        .default("5s")
        .help("How long a client waits for a server before its pool may use reserve_pool_size; 0 uses the reserve as soon as the pool is full")
        .example("1s"),
    Key::new("max_db_connections", "max-db-connections", Kind::Count, POOLS)
        .default("0")
        .unit("server connections per upstream database")
        .per_database()
        .help("Most server connections to one upstream database, counted across every database entry whose upstream names the same hosts and dbname (iampool has one pool per entry, so one entry alone is already bounded by pool_size); a pool at the limit waits for a connection of another to close, and closes one of their idle servers when they have no client waiting; 0 for no limit")
        .example("50"),
    Key::new("max_user_connections", "max-user-connections", Kind::Count, POOLS)
        .default("0")
        .unit("server connections per upstream user")
        .help("Most server connections signed in as one upstream user, counted across every pool that logs in as that user name; waits and makes room as max_db_connections; 0 for no limit")
        .example("50"),
    Key::new("read_only_database", "read-only-database", Kind::Text, POOLS)
        .restart()
        .per_database()
        .help("Another database (its client-facing name, usually a reader endpoint with target_session_attrs = read-only) that takes this database's transactions that declare themselves read-only: BEGIN READ ONLY, START TRANSACTION READ ONLY, and every transaction of a client whose startup sets default_transaction_read_only = on. Transaction mode only; unset: every transaction goes to this database's own servers")
        .example("app_readers"),
    Key::new("server_lifetime", "server-lifetime", Kind::Duration, POOLS)
        .default("3600s")
        .help("A server connection is closed this long after it opened, when next released")
        .example("30min"),
    Key::new("server_lifetime_jitter", "server-lifetime-jitter", Kind::Duration, POOLS)
        .derived("10% of server_lifetime")
        .help("Up to this much is added at random to each server lifetime so connections do not all expire together")
        .example("5min"),
    Key::new("server_idle_timeout", "server-idle-timeout", Kind::Duration, POOLS)
        .default("600s")
        .help("Idle server connections above min_pool_size are closed after this long")
        .example("5min"),
    Key::new("server_reset_query", "server-reset-query", Kind::Text, POOLS)
        .default("DISCARD ALL")
        .help("Run on a server connection before it goes back to the pool in session mode; empty for none")
        .example("RESET ALL"),
    Key::new("session_state", "session-state", Kind::Choice(SessionStateMode::NAMES), POOLS)
        .default("pin")
        .help("Transaction mode, a client that makes session state no other server can carry (a temporary table, a session advisory lock, a WITH HOLD cursor, SQL PREPARE, a LISTEN inside a transaction): pin keeps its server for it until the state is gone (DISCARD ALL, DROP, unlock, DEALLOCATE, CLOSE, UNLISTEN) or the client leaves, then resets it with server_reset_query; warn only logs a warning and hands the server on with the state, as PgBouncer does")
        .example("warn"),
    Key::new("max_pinned_servers", "max-pinned-servers", Kind::Count, POOLS)
        .derived("half of each pool's pool_size, at least 1")
        .unit("server connections per pool")
        .help("Most servers of one pool that clients may keep for their session state (session_state = pin); a statement that would pin one more fails with 53400 and the client keeps its connection")
        .example("4"),
    Key::new("server_connect_timeout", "server-connect-timeout", Kind::Duration, TIMEOUTS)
        .default("15s")
        .help("Give up opening a server connection (TCP, TLS and login) after this long")
        .example("5s"),
    Key::new("server_check_query", "server-check-query", Kind::Text, TIMEOUTS)
        .default("")
        .help("Run on a server that sat idle in its pool for server_check_delay or longer before a client gets it; a server that does not answer within server_connect_timeout, or is not idle afterwards, is closed and the client gets another. A server handed straight from one client to a waiting one is not checked (it has just answered). Empty (PgBouncer 1.25's default) for no check; iampool notices a server that closed while idle either way")
        .example("select 1"),
    Key::new("server_check_delay", "server-check-delay", Kind::Duration, TIMEOUTS)
        .default("30s")
        .help("How long a server may sit idle in its pool and still be handed out without server_check_query; 0 checks every server taken from the idle list")
        .example("10s"),
    Key::new("tcp_keepalive", "tcp-keepalive", Kind::Bool, TIMEOUTS)
        .default("true")
        .restart()
        .help("TCP keepalive on every client and server socket, so a peer that vanished without a word (a pulled cable, a NAT that dropped its state) is found; with tcp_keepidle, tcp_keepintvl and tcp_keepcnt at 0 the system's timing applies (Linux: first probe after 2 h)")
        .example("false"),
    Key::new("tcp_keepidle", "tcp-keepidle", Kind::Duration, TIMEOUTS)
        .default("0")
        .restart()
        .help("With tcp_keepalive, how long a socket is idle before the first probe, in whole seconds up to 32767s; 0 keeps the system's value")
        .example("60s"),
    Key::new("tcp_keepintvl", "tcp-keepintvl", Kind::Duration, TIMEOUTS)
        .default("0")
        .restart()
        .help("With tcp_keepalive, time between unanswered probes, in whole seconds up to 32767s; 0 keeps the system's value")
        .example("10s"),
    Key::new("tcp_keepcnt", "tcp-keepcnt", Kind::Count, TIMEOUTS)
        .default("0")
        .unit("probes")
        .restart()
        .help("With tcp_keepalive, unanswered probes before the connection is dropped, up to 127; 0 keeps the system's value")
        .example("5"),
    Key::new("tcp_user_timeout", "tcp-user-timeout", Kind::Duration, TIMEOUTS)
        .default("0")
        .restart()
        .help("TCP_USER_TIMEOUT on every client and server socket: a connection whose sent data stays unacknowledged this long is dropped (milliseconds count; PgBouncer's bare number is milliseconds, iampool's seconds: write 5000ms); 0 keeps the system's behaviour")
        .example("30s"),
    Key::new("server_login_retry", "server-login-retry", Kind::Duration, TIMEOUTS)
        .default("2s")
        .help("Wait this long before trying again after a failed server login")
        .example("500ms"),
    Key::new("query_wait_timeout", "query-wait-timeout", Kind::Duration, TIMEOUTS)
        .default("120s")
        .help("A client waiting this long for a server connection gets an error")
        .example("30s"),
    Key::new("client_login_timeout", "client-login-timeout", Kind::Duration, TIMEOUTS)
        .default("60s")
        .help("A client that has not finished logging in after this long is disconnected")
        .example("10s"),
    Key::new("idle_transaction_timeout", "idle-transaction-timeout", Kind::Duration, TIMEOUTS)
        .default("0")
        .help("A client idle inside a transaction this long is disconnected; 0 disables")
        .example("5min"),
    Key::new("query_timeout", "query-timeout", Kind::Duration, TIMEOUTS)
        .default("0")
        .help("A request (a Query, or an extended-protocol batch up to its Sync) still unanswered after this long is cut off as PgBouncer's query_timeout: its server connection is closed (the pool cancels the query first) and the client gets 57014 naming query_timeout. Transaction mode: an ERROR, and the client keeps its connection as when a server is lost (an open transaction is rolled back); session mode, a client pinned to its server for session state, COPY, or a reply already half sent: a FATAL. Meant for network trouble, a little above the server's statement_timeout; 0 disables. New clients get a changed value")
        .example("5min"),
    Key::new("client_idle_timeout", "client-idle-timeout", Kind::Duration, TIMEOUTS)
        .default("0")
        .help("A client that holds no server and has sent nothing for this long (between transactions in transaction mode; never one whose session-mode or pinned server stays linked) is disconnected, as by PgBouncer's, with a FATAL naming client_idle_timeout (57P05, PostgreSQL's idle_session_timeout code); 0 disables. Set it above the application's own pool idle limits. New clients get a changed value")
        .example("1h"),
    Key::new("max_message_size", "max-message-size", Kind::Size, TIMEOUTS)
        .default("256MB")
        .help("Largest protocol message accepted from a client, 8kB to 1GB (larger ones get 08P01); a long Query, Bind or unnamed Parse is streamed to the server as it arrives, never held whole (a named Parse is kept whole while rewriting is on: its text is what the pool prepares on other servers). Server messages are bounded by PostgreSQL's own 1GB")
        .example("64MB"),
    Key::new("shutdown_timeout", "shutdown-timeout", Kind::Duration, TIMEOUTS)
        .default("30s")
        .restart()
        .help("On shutdown, wait this long for clients to finish before closing them")
        .example("10s"),
    Key::new("min_sigterm_delay", "min-sigterm-delay", Kind::Duration, TIMEOUTS)
        .default("0")
        .help("After SIGTERM, keep accepting clients this long (readiness fails meanwhile, so a Service or the app stops sending new work), then drain; 0 drains at once")
        .example("10s"),
    Key::new("reload_check_interval", "reload-check-interval", Kind::Duration, TIMEOUTS)
        .default("10s")
        .restart()
        .help("How often the config file, auth_file and every IAMPOOL_<KEY>_FILE are checked for changes (a rotated Kubernetes Secret); a change reloads as SIGHUP does; 0 disables")
        .example("30s"),
    Key::new("auth_failure_delay", "auth-failure-delay", Kind::Duration, CLIENTS)
        .default("500ms")
        .help("A failed client login gets its error this much later, as PostgreSQL's auth_delay, so passwords cannot be guessed at speed; 0 disables")
        .example("2s"),
    Key::new("auth_failure_limit", "auth-failure-limit", Kind::Count, CLIENTS)
        .default("20")
        .unit("failed logins per minute")
        .help("Failed client logins from one source address in a minute before further logins from it are refused (53300) for the rest of that minute; 0 disables")
        .example("5"),
    Key::new("auth_type", "auth-type", Kind::Choice(AuthType::NAMES), CLIENTS)
        .default("scram-sha-256")
        .help("How clients prove their password to iampool: scram-sha-256, md5, or trust (no password)")
        .example("md5"),
    Key::new("auth_file", "auth-file", Kind::File, CLIENTS)
        .help("PgBouncer-style user list, one \"user\" \"secret\" per line; secrets plain, md5... or SCRAM-SHA-256$...")
        .example("/etc/iampool/userlist.txt"),
    Key::new("application_name_add_host", "application-name-add-host", Kind::Bool, CLIENTS)
        .default("false")
        .help("At login, append \" - ADDRESS:PORT\" of the client (\" - unix\" on the unix socket) to the application_name it sent (\"app\" when it sent none), as PgBouncer's; the client's servers and SHOW CLIENTS see it. A later SET application_name is left alone. New clients get a changed value")
        .example("true"),
    Key::new("ignore_startup_parameters", "ignore-startup-parameters", Kind::Names, CLIENTS)
        .default("")
        .help("Startup parameters a client may send that iampool drops instead of applying to the client's servers (comma-separated; an array in the file; case-insensitive), e.g. extra_float_digits from drivers that a server or proxy does not accept. A -c NAME=VALUE in the options parameter is dropped the same way, and options itself drops the whole options parameter. iampool applies every other startup parameter with set_config, so an unknown one fails the client's first request; user and database cannot be listed. New clients get a changed value")
        .example("extra_float_digits,options"),
    Key::new("client_tls", "client-tls", Kind::Choice(ClientTls::NAMES), CLIENTS)
        .derived("allow if client_tls_cert_file is set, else disable")
        .restart()
        .help("TLS for clients: disable, allow (the client chooses) or require; allow and require need client_tls_cert_file and client_tls_key_file")
        .example("require"),
    Key::new("client_tls_cert_file", "client-tls-cert-file", Kind::File, CLIENTS)
        .restart()
        .help("PEM certificate chain presented to clients")
        .example("/etc/iampool/tls.crt"),
    Key::new("client_tls_key_file", "client-tls-key-file", Kind::File, CLIENTS)
        .restart()
        .help("PEM private key of client_tls_cert_file")
        .example("/etc/iampool/tls.key"),
    Key::new("log_level", "log-level", Kind::LogFilter, LOGGING)
        .default("info")
        .help("Log filter in tracing EnvFilter syntax, e.g. debug or iampool=debug,warn")
        .example("iampool=debug,info"),
    Key::new("log_format", "log-format", Kind::Choice(LogFormat::NAMES), LOGGING)
        .default("text")
        .restart()
        .help("Log line format: text or json")
        .example("json"),
    Key::new("metrics_listen", "metrics-listen", Kind::Addr, LOGGING)
        .restart()
        .help("host:port serving Prometheus metrics (unset: no metrics listener)")
        .example("127.0.0.1:9187"),
    Key::new("quitquitquit", "quitquitquit", Kind::Bool, LOGGING)
        .default("false")
        .restart()
        .help("Serve POST /quitquitquit on metrics_listen, to callers on 127.0.0.1 or ::1 only: it starts a graceful shutdown, so a Job's main container can end an iampool sidecar where native sidecars are not available")
        .example("true"),
    Key::new("admin_users", "admin-users", Kind::Names, LOGGING)
        .default("")
        .help("Users allowed to run admin commands (comma-separated; an array in the file)")
        .example("admin"),
    Key::new("stats_users", "stats-users", Kind::Names, LOGGING)
        .default("")
        .help("Users allowed to read statistics (comma-separated; an array in the file)")
        .example("monitor"),
    Key::new("upstream", "upstream", Kind::Urls, UPSTREAM)
        .help("Upstream database, as libpq writes it: a URL postgres://user[:password]@host[:port][,host2[:port2]...]/dbname?param=value (several URLs, separated by whitespace, are several databases), or one keyword=value string such as host=db.example.com port=5432 dbname=app user=app sslmode=verify-full (libpq's quoting: 'a b', \\'). What the string leaves out is taken from PGHOST, PGHOSTADDR, PGPORT, PGDATABASE, PGUSER and PGPASSWORD (not with auth=iam), as libpq does; the per-database keys sslmode, sslrootcert, connect_timeout, application_name, options, target_session_attrs and load_balance_hosts fall back to PGSSLMODE, PGSSLROOTCERT, PGCONNECT_TIMEOUT, PGAPPNAME, PGOPTIONS, PGTARGETSESSIONATTRS and PGLOADBALANCEHOSTS when iampool's own setting is unset. A reload applies a changed password to the logins that follow; any other change needs a restart")
        .example("postgres://app@mydb.abc123.us-east-1.rds.amazonaws.com/appdb?auth=iam"),
    Key::new("sslmode", "sslmode", Kind::Choice(SslMode::NAMES), UPSTREAM)
        .restart()
        .derived("verify-full with auth=iam, else prefer")
        .per_database()
        .help("TLS to the upstream, as libpq's sslmode; auth=iam needs verify-ca or verify-full (the token goes only to a server iampool has verified)")
        .example("verify-full"),
    Key::new("target_session_attrs", "target-session-attrs", Kind::Choice(TargetSessionAttrs::NAMES), UPSTREAM)
        .default("any")
        .restart()
        .per_database()
        .help("Which servers a pool accepts, as libpq's target_session_attrs: read-write or primary for a writer, read-only or standby for a reader. Checked at every login (a server of the wrong kind is closed and the login retried, so a stale DNS answer during a failover does not get a writer pool a reader), and followed after: a server that turns hot standby leaves a read-write pool")
        .example("read-write"),
    Key::new("load_balance_hosts", "load-balance-hosts", Kind::Choice(LoadBalanceHosts::NAMES), UPSTREAM)
        .default("disable")
        .restart()
        .per_database()
        .help("Order in which an upstream's hosts are tried, as libpq's load_balance_hosts: disable tries them in the order written, random in a random order for each connection")
        .example("random"),
    Key::new("connect_timeout", "connect-timeout", Kind::Count, UPSTREAM)
        .default("0")
        .unit("seconds")
        .restart()
        .per_database()
        .help("Limit on each host attempt (TCP, TLS and login), in whole seconds, as libpq's connect_timeout (1 counts as 2, as in libpq); 0 uses server_connect_timeout")
        .example("10"),
    Key::new("application_name", "application-name", Kind::Text, UPSTREAM)
        .restart()
        .per_database()
        .help("application_name sent to the upstream when a server connection logs in (unset: none); a client's own application_name still applies to its session")
        .example("orders-api"),
    Key::new("options", "options", Kind::Text, UPSTREAM)
        .restart()
        .per_database()
        .help("Command-line options sent to the upstream when a server connection logs in, as libpq's options, e.g. -c search_path=app (unset: none)")
        .example("-c search_path=app"),
    Key::new("sslrootcert", "sslrootcert", Kind::File, UPSTREAM)
        .restart()
        .per_database()
        .help("PEM CA bundle that verifies the upstream certificate (unset: the built-in roots)")
        .example("/etc/iampool/rds-ca.pem"),
    Key::new("region", "region", Kind::Region, UPSTREAM)
        .restart()
        .derived("inferred from a *.REGION.rds.amazonaws.com host; never guessed otherwise")
        .per_database()
        .help("AWS region IAM tokens are signed for")
        .example("us-east-1"),
    Key::new("assume_role_arn", "assume-role-arn", Kind::Arns, UPSTREAM)
        .restart()
        .per_database()
        .help("IAM role assumed before signing; several (comma-separated; an array in the file) form a chain, each assumed with the previous role's credentials")
        .example("arn:aws:iam::123456789012:role/db-connect"),
    Key::new("external_id", "external-id", Kind::Text, UPSTREAM)
        .restart()
        .per_database()
        .help("External ID sent when assuming assume_role_arn")
        .example("my-external-id"),
    Key::new("role_session_name", "role-session-name", Kind::Text, UPSTREAM)
        .restart()
        .default("iampool")
        .per_database()
        .help("Session name when assuming assume_role_arn (shown in CloudTrail)")
        .example("iampool-orders"),
    Key::new("token_lifetime", "token-lifetime", Kind::Duration, UPSTREAM)
        .restart()
        .default("900s")
        .per_database()
        .help("How long one IAM token is used for new logins, 10s to 900s")
        .example("600s"),
    Key::new("max_new_connections_per_second", "max-new-connections-per-second", Kind::Count, UPSTREAM)
        .restart()
        .default("50")
        .unit("logins per second")
        .per_database()
        .help("Most new server logins per second to one host, 1 to 1000 (AWS advises under 200 IAM logins per second)")
        .example("100"),
    Key::new("reauth_interval", "reauth-interval", Kind::Duration, UPSTREAM)
        .restart()
        .default("0")
        .per_database()
        .help("Close a pooled server connection this long after its login so it signs in again; 0 disables")
        .example("12h"),
    Key::new("allow_cleartext_password", "allow-cleartext-password", Kind::Bool, UPSTREAM)
        .restart()
        .default("false")
        .per_database()
        .help("Allow sending a cleartext password to an upstream iampool has not verified (no TLS, or sslmode below verify-ca)")
        .example("true"),
    Key::new("insecure_unverified_tls", "insecure-unverified-tls", Kind::Bool, UPSTREAM)
        .restart()
        .default("false")
        .per_database()
        .help("TEST SETUPS ONLY: let auth=iam send its token over sslmode=require, which encrypts but does not verify the server, so whoever answers gets the token")
        .example("true"),
    Key::new("auth", "auth", Kind::Choice(UPSTREAM_AUTH_NAMES), DATABASE)
        .default("password")
        .database_only()
        .help("How iampool signs in to the upstream: password, or iam (an RDS IAM token, over TLS)")
        .example("iam"),
    Key::new("hostaddr", "hostaddr", Kind::Ip, DATABASE)
        .restart()
        .database_only()
        .help("IP address dialled instead of resolving the host, as libpq's hostaddr; with several hosts, one per host, comma-separated, an empty entry resolving that host's name (10.0.0.1,,10.0.0.3). The host name is still verified by TLS and signed for IAM")
        .example("10.0.0.12"),
];

/// The key with this name.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.name == name)
}

/// Whether a change to `key` takes effect on RELOAD. Accepts `databases.NAME.key` too.
/// Databases and users are reloadable; unknown keys are not.
pub fn is_reloadable(key: &str) -> bool {
    if key == "databases" || key == "users" || key.starts_with("users.") {
        return true;
    }
    let name = match key.strip_prefix("databases.") {
        Some(rest) => rest.rsplit('.').next().unwrap_or(rest),
        None => key,
    };
    self::key(name).is_some_and(|key| key.reload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_names_with_dashes() {
        for key in KEYS {
            assert_eq!(key.flag, key.name.replace('_', "-"), "{}", key.name);
            assert!(
                !key.help.is_empty() && !key.example.is_empty(),
                "{}",
                key.name
            );
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, key) in KEYS.iter().enumerate() {
            assert!(KEYS[i + 1..].iter().all(|other| other.name != key.name));
        }
    }

    #[test]
    fn reloadable_keys() {
        assert!(is_reloadable("pool_size"));
        assert!(is_reloadable("databases.app.pool_size"));
        assert!(is_reloadable("auth_file"));
        assert!(!is_reloadable("listen"));
        assert!(!is_reloadable("client_tls"));
        assert!(!is_reloadable("no_such_key"));
    }
}
