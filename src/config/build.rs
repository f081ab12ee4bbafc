//! Typed parsing and validation of the gathered settings into a [`Config`], collecting every
//! mistake instead of stopping at the first.

use std::collections::btree_map::{BTreeMap, Entry};
use std::path::PathBuf;
use std::time::Duration;

use super::auth_file;
use super::database::{self, UrlUser};
use super::error::{ConfigError, ConfigErrors, Origin, Problem};
use super::keys::{self, DefaultValue, Key};
use super::load::{Inputs, Layer, Setting};
use super::value::{self, Named, Raw};
use super::{AuthType, ClientTls, Config, LogFormat, SessionStateMode, TcpOptions, UserSecret};

/// Marks a value whose mistake is already recorded in the [`Reader`].
#[derive(Debug)]
pub(crate) struct Reported;

/// Reads typed values out of layers, recording mistakes and where each value came from.
#[derive(Default)]
pub(crate) struct Reader {
    pub errors: Vec<ConfigError>,
    pub sources: BTreeMap<String, Origin>,
}

impl Reader {
    /// The key's value: set, its table default, or `None` when unset without a fixed default.
    pub fn get<T>(
        &mut self,
        layer: &Layer,
        name: &'static str,
        parse: impl Fn(&Raw, &Key) -> Result<T, Problem>,
    ) -> Result<Option<T>, Reported> {
        let key = keys::key(name).expect("the key is in the table");
        let provenance = format!("{}{name}", layer.prefix);
        if let Some(setting) = layer.settings.get(name) {
            self.sources.insert(provenance, setting.origin.clone());
            return match parse(&setting.raw, key) {
                Ok(value) => Ok(Some(value)),
                Err(problem) => Err(self.report(&setting.label, &setting.origin, problem)),
            };
        }
        self.sources.insert(provenance, Origin::Default);
        match key.default {
            DefaultValue::Value(default) => {
                let value = parse(&Raw::Text(default.to_string()), key)
                    .expect("every table default parses");
                Ok(Some(value))
            }
            DefaultValue::Unset | DefaultValue::Derived(_) => Ok(None),
        }
    }

    /// The value of a key that has a fixed default.
    pub fn req<T>(
        &mut self,
        layer: &Layer,
        name: &'static str,
        parse: impl Fn(&Raw, &Key) -> Result<T, Problem>,
    ) -> Result<T, Reported> {
        Ok(self
            .get(layer, name, parse)?
            .expect("the key has a fixed default"))
    }

    pub fn report(&mut self, label: &str, origin: &Origin, problem: Problem) -> Reported {
        self.errors.push(ConfigError::new(label, origin, problem));
        Reported
    }

    /// Reports a problem on the key as set in `layer` (or its default).
    pub fn blame(&mut self, layer: &Layer, name: &str, problem: Problem) -> Reported {
        let (label, origin) = label_and_origin(layer, name);
        self.report(&label, &origin, problem)
    }

    /// Records a derived value's provenance.
    pub fn derived(&mut self, layer: &Layer, name: &str, how: &'static str) {
        self.sources
            .insert(format!("{}{name}", layer.prefix), Origin::Derived(how));
    }
}

pub(crate) fn label_and_origin(layer: &Layer, name: &str) -> (String, Origin) {
    match layer.settings.get(name) {
        Some(Setting { label, origin, .. }) => (label.clone(), origin.clone()),
        None => (format!("{}{name}", layer.prefix), Origin::Default),
    }
}

pub(crate) fn is_set(layer: &Layer, name: &str) -> bool {
    layer.settings.contains_key(name)
}

pub(crate) fn usize_count(raw: &Raw, key: &Key) -> Result<usize, Problem> {
    value::count(raw, key).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

const MIN_MESSAGE_SIZE: u64 = 8 << 10;
const MAX_MESSAGE_SIZE: u64 = 1 << 30;

fn message_size(raw: &Raw, key: &Key) -> Result<usize, Problem> {
    let size = value::size(raw, key)?;
    if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&size) {
        return Err(Problem::new(
            format!("{size} bytes is out of range"),
            format!("set between 8kB and 1GB, e.g. {}", key.example),
        ));
    }
    Ok(usize::try_from(size).unwrap_or(usize::MAX))
}

/// Startup parameter names, lower case; the ones a session cannot do without are refused.
fn ignored_parameters(raw: &Raw, key: &Key) -> Result<Vec<String>, Problem> {
    let names: Vec<String> = value::names(raw, key)?
        .iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    if let Some(n) = names
        .iter()
        .find(|n| matches!(n.as_str(), "user" | "database"))
    {
        return Err(Problem::new(
            format!("{n} cannot be ignored: iampool needs it to know who the client is"),
            format!("remove {n} from the list, e.g. {}", key.example),
        ));
    }
    Ok(names)
}

/// The typed configuration and the origin of every value, or every mistake found.
pub(crate) fn build(inputs: Inputs) -> Result<(Config, BTreeMap<String, Origin>), ConfigErrors> {
    let mut reader = Reader {
        errors: inputs.errors.clone(),
        sources: BTreeMap::new(),
    };
    let config = config(&mut reader, &inputs);
    match config {
        Ok(config) if reader.errors.is_empty() => Ok((config, reader.sources)),
        _ => Err(ConfigErrors::deduplicated(reader.errors)),
    }
}

fn config(r: &mut Reader, inputs: &Inputs) -> Result<Config, Reported> {
    let g = &inputs.globals;
    let listen = r.req(g, "listen", value::addrs);
    let unix_socket_dir = r.get(g, "unix_socket_dir", value::path);
    let worker_threads = r.req(g, "worker_threads", usize_count);
    let max_client_conn = r.req(g, "max_client_conn", usize_count);
    let max_pending_logins = r.req(g, "max_pending_logins", usize_count);
    let auth_failure_delay = r.req(g, "auth_failure_delay", value::duration);
    let auth_failure_limit = r.req(g, "auth_failure_limit", usize_count);
    let max_prepared_statements = r.req(g, "max_prepared_statements", usize_count);
    let server_lifetime = r.req(g, "server_lifetime", value::duration);
    let server_lifetime_jitter = lifetime_jitter(r, g, &server_lifetime);
    let server_idle_timeout = r.req(g, "server_idle_timeout", value::duration);
    let server_connect_timeout = r.req(g, "server_connect_timeout", value::duration);
    let server_check_query = r.req(g, "server_check_query", value::text);
    let server_check_delay = r.req(g, "server_check_delay", value::duration);
    let tcp = tcp_options(r, g);
    let server_login_retry = r.req(g, "server_login_retry", value::duration);
    let query_wait_timeout = r.req(g, "query_wait_timeout", value::duration);
    let reserve_pool_timeout = r.req(g, "reserve_pool_timeout", value::duration);
    let max_user_connections = r.req(g, "max_user_connections", usize_count);
    let client_login_timeout = r.req(g, "client_login_timeout", value::duration);
    let idle_transaction_timeout = r.req(g, "idle_transaction_timeout", value::optional_duration);
    let query_timeout = r.req(g, "query_timeout", value::optional_duration);
    let client_idle_timeout = r.req(g, "client_idle_timeout", value::optional_duration);
    let max_message_size = r.req(g, "max_message_size", message_size);
    let server_reset_query = r.req(g, "server_reset_query", value::text);
    let session_state = r.req(g, "session_state", value::named::<SessionStateMode>);
    let max_pinned_servers = r.get(g, "max_pinned_servers", usize_count);
    let auth_type = r.req(g, "auth_type", value::named::<AuthType>);
    let auth_file = r.get(g, "auth_file", value::path);
    let application_name_add_host = r.req(g, "application_name_add_host", value::boolean);
    let ignore_startup_parameters = r.req(g, "ignore_startup_parameters", ignored_parameters);
    let (client_tls, client_tls_cert_file, client_tls_key_file) = client_tls(r, g);
    let shutdown_timeout = r.req(g, "shutdown_timeout", value::duration);
    let min_sigterm_delay = r.req(g, "min_sigterm_delay", value::duration);
    let reload_check_interval = r.req(g, "reload_check_interval", value::duration);
    let quitquitquit = r.req(g, "quitquitquit", value::boolean);
    let log_level = r.req(g, "log_level", value::log_filter);
    let log_format = r.req(g, "log_format", value::named::<LogFormat>);
    let metrics_listen = r.get(g, "metrics_listen", value::addr);
    let admin_users = r.req(g, "admin_users", value::names);
    let stats_users = r.req(g, "stats_users", value::names);
    let (databases, url_users) = database::databases(r, inputs);
    let users = users(
        r,
        inputs,
        auth_file.as_ref().ok().and_then(Option::as_ref),
        url_users,
    );
    if let (Ok(auth_type), Ok(users)) = (&auth_type, &users) {
        check_users_fit_auth_type(r, g, *auth_type, users);
    }

    Ok(Config {
        listen: listen?,
        unix_socket_dir: unix_socket_dir?,
        worker_threads: worker_threads?,
        max_client_conn: max_client_conn?,
        max_pending_logins: max_pending_logins?,
        auth_failure_delay: auth_failure_delay?,
        auth_failure_limit: auth_failure_limit?,
        max_prepared_statements: max_prepared_statements?,
        server_lifetime: server_lifetime?,
        server_lifetime_jitter: server_lifetime_jitter?,
        server_idle_timeout: server_idle_timeout?,
        server_connect_timeout: server_connect_timeout?,
        server_check_query: server_check_query?,
        server_check_delay: server_check_delay?,
        tcp: tcp?,
        server_login_retry: server_login_retry?,
        query_wait_timeout: query_wait_timeout?,
        reserve_pool_timeout: reserve_pool_timeout?,
        max_user_connections: max_user_connections?,
        client_login_timeout: client_login_timeout?,
        idle_transaction_timeout: idle_transaction_timeout?,
        query_timeout: query_timeout?,
        client_idle_timeout: client_idle_timeout?,
        max_message_size: max_message_size?,
        server_reset_query: server_reset_query?,
        session_state: session_state?,
        max_pinned_servers: max_pinned_servers?,
        auth_type: auth_type?,
        auth_file: auth_file.as_ref().map_err(|_| Reported)?.clone(),
        application_name_add_host: application_name_add_host?,
        ignore_startup_parameters: ignore_startup_parameters?,
        users: users?,
        client_tls: client_tls?,
        client_tls_cert_file: client_tls_cert_file?,
        client_tls_key_file: client_tls_key_file?,
        shutdown_timeout: shutdown_timeout?,
        min_sigterm_delay: min_sigterm_delay?,
        reload_check_interval: reload_check_interval?,
        quitquitquit: quitquitquit?,
        log_level: log_level?,
        log_format: log_format?,
        metrics_listen: metrics_listen?,
        admin_users: admin_users?,
        stats_users: stats_users?,
        databases: databases?,
        watched_files: inputs
            .watched
            .iter()
            .cloned()
            .chain(auth_file.ok().flatten())
            .collect(),
    })
}

/// The tcp_* keys; 0 keeps the system's value. The kernel takes keepalive times in whole
/// seconds (at most 32767) and at most 127 probes, so anything else is refused here rather
/// than rounded or rejected at the first connection.
fn tcp_options(r: &mut Reader, g: &Layer) -> Result<TcpOptions, Reported> {
    let keepalive = r.req(g, "tcp_keepalive", value::boolean);
    let keepidle = r.req(g, "tcp_keepidle", keepalive_seconds);
    let keepintvl = r.req(g, "tcp_keepintvl", keepalive_seconds);
    let keepcnt = r.req(g, "tcp_keepcnt", keepalive_probes);
    let user_timeout = r.req(g, "tcp_user_timeout", user_timeout);
    Ok(TcpOptions {
        keepalive: keepalive?,
        keepidle: keepidle?,
        keepintvl: keepintvl?,
        keepcnt: keepcnt?,
        user_timeout: user_timeout?,
    })
}

fn keepalive_seconds(raw: &Raw, key: &Key) -> Result<Option<Duration>, Problem> {
    let time = value::duration(raw, key)?;
    if time.is_zero() {
        return Ok(None);
    }
    if time.subsec_nanos() != 0 || time.as_secs() > 32767 {
        return Err(Problem::new(
            format!("{time:?} is not a whole number of seconds from 1s to 32767s"),
            format!(
                "set whole seconds, e.g. {}, or 0 for the system's value",
                key.example
            ),
        ));
    }
    Ok(Some(time))
}

fn keepalive_probes(raw: &Raw, key: &Key) -> Result<Option<u32>, Problem> {
    match usize_count(raw, key)? {
        0 => Ok(None),
        n @ 1..=127 => Ok(Some(n as u32)),
        n => Err(Problem::new(
            format!("{n} probes is more than the kernel's 127"),
            format!(
                "set 1 to 127, e.g. {}, or 0 for the system's value",
                key.example
            ),
        )),
    }
}

fn user_timeout(raw: &Raw, key: &Key) -> Result<Option<Duration>, Problem> {
    let time = value::duration(raw, key)?;
    if time.as_millis() > u128::from(u32::MAX) || (!time.is_zero() && time.as_millis() == 0) {
        return Err(Problem::new(
            format!("{time:?} is out of range"),
            format!(
                "set 1ms to 49 days, e.g. {}, or 0 for the system's behaviour",
                key.example
            ),
        ));
    }
    Ok((!time.is_zero()).then_some(time))
}

/// Default 10% of the lifetime; never more than the lifetime itself.
fn lifetime_jitter(
    r: &mut Reader,
    g: &Layer,
    lifetime: &Result<Duration, Reported>,
) -> Result<Duration, Reported> {
    let jitter = r.get(g, "server_lifetime_jitter", value::duration)?;
    let Ok(lifetime) = lifetime else {
        return Err(Reported);
    };
    match jitter {
        None => {
            r.derived(g, "server_lifetime_jitter", "10% of server_lifetime");
            Ok(*lifetime / 10)
        }
        Some(jitter) if jitter > *lifetime => Err(r.blame(
            g,
            "server_lifetime_jitter",
            Problem::new(
                "is longer than server_lifetime",
                "set it to at most server_lifetime, or leave it unset for 10% of it",
            ),
        )),
        Some(jitter) => Ok(jitter),
    }
}

type TlsSettings = (
    Result<ClientTls, Reported>,
    Result<Option<PathBuf>, Reported>,
    Result<Option<PathBuf>, Reported>,
);

fn client_tls(r: &mut Reader, g: &Layer) -> TlsSettings {
    let mode = r.get(g, "client_tls", value::named::<ClientTls>);
    let cert = r.get(g, "client_tls_cert_file", value::path);
    let key = r.get(g, "client_tls_key_file", value::path);
    let (Ok(cert_path), Ok(key_path)) = (&cert, &key) else {
        return (mode.map(|m| m.unwrap_or(ClientTls::Disable)), cert, key);
    };
    let both = cert_path.is_some() && key_path.is_some();
    for (set, missing) in [
        ("client_tls_cert_file", "client_tls_key_file"),
        ("client_tls_key_file", "client_tls_cert_file"),
    ] {
        if is_set(g, set) && !is_set(g, missing) {
            r.blame(
                g,
                set,
                Problem::new(
                    format!("is set without {missing}"),
                    format!("set {missing} too"),
                ),
            );
        }
    }
    let mode = match mode {
        Ok(None) if cert_path.is_some() => {
            r.derived(g, "client_tls", "allow, as client_tls_cert_file is set");
            Ok(ClientTls::Allow)
        }
        Ok(Some(mode @ (ClientTls::Allow | ClientTls::Require))) if !both => Err(r.blame(
            g,
            "client_tls",
            Problem::new(
                format!("{} needs a certificate and key", mode.name()),
                "set client_tls_cert_file and client_tls_key_file, or client_tls = disable",
            ),
        )),
        other => other.map(|mode| mode.unwrap_or(ClientTls::Disable)),
    };
    (mode, cert, key)
}

/// `[users]` first, then the auth file, then users of upstream URLs that carry a password.
fn users(
    r: &mut Reader,
    inputs: &Inputs,
    auth_file: Option<&PathBuf>,
    url_users: Vec<UrlUser>,
) -> Result<BTreeMap<String, UserSecret>, Reported> {
    let before = r.errors.len();
    // In order of precedence: the first offer of a user name wins.
    let mut offers: Vec<(String, UserSecret, Origin)> = Vec::new();
    for user in &inputs.users {
        match auth_file::classify(user.password.expose()) {
            Ok(secret) => offers.push((user.name.clone(), secret, user.origin.clone())),
            Err(problem) => {
                let label = format!("users.{}.password", user.name);
                r.report(&label, &user.origin, problem);
            }
        }
    }
    if let Some(path) = auth_file {
        let origin = Origin::AuthFile(path.clone());
        for (name, secret) in read_auth_file(r, &inputs.globals, path) {
            offers.push((name, secret, origin.clone()));
        }
    }
    for user in url_users {
        offers.push((user.user, UserSecret::Plain(user.secret), user.origin));
    }
    let mut users = BTreeMap::new();
    for (name, secret, origin) in offers {
        if let Entry::Vacant(slot) = users.entry(name) {
            r.sources.insert(format!("users.{}", slot.key()), origin);
            slot.insert(secret);
        }
    }
    if r.errors.len() > before {
        return Err(Reported);
    }
    Ok(users)
}

fn read_auth_file(r: &mut Reader, g: &Layer, path: &PathBuf) -> Vec<(String, UserSecret)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            r.blame(
                g,
                "auth_file",
                Problem::new(
                    format!("cannot read {}: {e}", path.display()),
                    "check the path and that iampool may read it",
                ),
            );
            return Vec::new();
        }
    };
    let (users, errors) = auth_file::parse(&text);
    for error in errors {
        r.errors.push(ConfigError {
            key: "auth_file".into(),
            source: format!("{} line {}", path.display(), error.line),
            message: error.problem.message,
            fix: error.problem.fix,
        });
    }
    users
}

/// SCRAM needs a plain password or a SCRAM verifier; an md5 hash cannot answer it.
fn check_users_fit_auth_type(
    r: &mut Reader,
    g: &Layer,
    auth_type: AuthType,
    users: &BTreeMap<String, UserSecret>,
) {
    if auth_type != AuthType::ScramSha256 {
        return;
    }
    let md5_users: Vec<&str> = users
        .iter()
        .filter(|(_, secret)| matches!(secret, UserSecret::Md5(_)))
        .map(|(name, _)| name.as_str())
        .collect();
    if !md5_users.is_empty() {
        r.blame(
            g,
            "auth_type",
            Problem::new(
                format!(
                    "scram-sha-256 cannot check the md5 secrets of {}",
                    md5_users.join(", ")
                ),
                "give those users a plain password or a SCRAM-SHA-256 verifier, or set auth_type = md5",
            ),
        );
    }
}
