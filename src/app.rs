//! Composition root: builds the shared state from a [`Config`] and runs the listeners.
//!
//! Nothing is global: tests call [`start`] with a config on port 0 and get a handle back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::client::auth::{prepare_users, UserAuth};
use crate::client::cancel::CancelRegistry;
use crate::client::console::ConsoleLogin;
use crate::client::guard::LoginGuard;
use crate::client::registry::ClientRegistry;
use crate::config::{
    Config, Database, Host, ReloadReport, SessionStateMode, Upstream, UpstreamAuth,
};
use crate::metrics::http::Health;
use crate::metrics::{Metrics, PoolsCollector};
use crate::pool::{Pool, PoolSettings, SharedCount};
use crate::server::auth::Password;
use crate::server::connect::{Connector, Target};
use crate::server::listing::ServerList;
use crate::server::login_limit::LoginLimiter;
use crate::stream::Stream;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database {database:?}: {message}")]
    Upstream { database: String, message: String },
    #[error("client TLS: {0}")]
    Tls(String),
    #[error("users: {0}")]
    Users(String),
}

/// Re-reads the configuration from where it came from (file, environment, flags).
pub type ConfigSource = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;
/// Applies a new log filter.
pub type LogReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// State shared by every connection task.
pub struct Shared {
    config_source: std::sync::OnceLock<ConfigSource>,
    log_reloader: std::sync::OnceLock<LogReloader>,
    metrics: Arc<Metrics>,
    /// Draining: /readyz is false and no new client is accepted.
    draining: std::sync::atomic::AtomicBool,
    /// SIGTERM arrived and `min_sigterm_delay` runs: still serving, but /readyz is false.
    terminating: std::sync::atomic::AtomicBool,
    config: RwLock<Arc<Config>>,
    /// The configuration iampool started with: what restart-only settings still are.
    started: Arc<Config>,
    users: RwLock<Arc<HashMap<String, UserAuth>>>,
    pools: HashMap<String, Arc<Pool>>,
    cancel: CancelRegistry,
    login_guard: LoginGuard,
    tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Connections open on the client side (logged in or logging in).
    clients: AtomicUsize,
    /// Logged-in clients, for the admin console's SHOW CLIENTS and SHOW SERVERS.
    client_registry: ClientRegistry,
    shutdown: watch::Receiver<bool>,
    shutdown_tx: watch::Sender<bool>,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn users(&self) -> Arc<HashMap<String, UserAuth>> {
        self.users.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn pool(&self, database: &str) -> Option<Arc<Pool>> {
        self.pools.get(database).cloned()
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Client connections still logging in.
    pub fn pending_logins(&self) -> usize {
        self.login_guard.pending()
    }

    /// Client connections open (logging in or logged in).
    pub fn open_client_count(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// True once a shutdown began: /readyz says no and no new client is accepted.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// SIGTERM with a `min_sigterm_delay`: readiness fails from now on, so Kubernetes stops
    /// sending new work, while clients are still accepted and served until the drain.
    pub fn begin_terminating(&self) {
        self.terminating.store(true, Ordering::Release);
    }

    /// Starts a graceful shutdown (admin SHUTDOWN; `main` then drains and exits).
    pub fn request_shutdown(&self) {
        self.draining.store(true, Ordering::Release);
        let _ = self.shutdown_tx.send(true);
    }

    /// Where RELOAD and SIGHUP re-read the configuration (set once by `main`).
    pub fn set_config_source(&self, source: ConfigSource) {
        let _ = self.config_source.set(source);
    }

    pub fn set_log_reloader(&self, reloader: LogReloader) {
        let _ = self.log_reloader.set(reloader);
    }

    /// Re-reads the configuration and applies what can change live.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let source = self
            .config_source
            .get()
            .ok_or("this iampool was started without a configuration source to re-read")?;
        let new = source()?;
        Ok(self.apply(new))
    }

    /// Applies reloadable settings from `new`: pool sizes and timeouts, upstream passwords,
    /// users, log level and client limits. Everything else is reported as needing a
    /// restart, measured against what is actually running, so a later reload still reports
    /// a restart that has not happened.
    pub fn apply(&self, new: Config) -> ReloadReport {
        let old = self.config();
        let started = &self.started;
        let mut report = ReloadReport::default();
        for key in old.changed_keys(&new) {
            if crate::config::is_reloadable(key) {
                report.applied.push(key.to_owned());
            }
        }
        for key in started.changed_keys(&new) {
            if !crate::config::is_reloadable(key) {
                report.needs_restart.push(key.to_owned());
            }
        }
        // Databases: settings and passwords of existing pools apply; new, removed or
        // re-pointed ones wait for a restart.
        for db in &new.databases {
            let pool = self.pools.get(&db.name);
            match (pool, started.database(&db.name)) {
                (Some(pool), Some(first)) if same_but_password(&first.upstream, &db.upstream) => {
                    pool.update_settings(pool_settings(&new, db));
                    let before = old
                        .database(&db.name)
                        .and_then(|d| d.upstream.password.as_ref());
                    if before != db.upstream.password.as_ref()
                        && pool
                            .connector()
                            .replace_password(db.upstream.password.clone())
                    {
                        report
                            .applied
                            .push(format!("databases.{}.password", db.name));
                    }
                }
                _ => report.needs_restart.push(format!("databases.{}", db.name)),
            }
        }
        for db in &started.databases {
            if new.database(&db.name).is_none() {
                report.needs_restart.push(format!("databases.{}", db.name));
            }
        }
        match prepare_users(&new.users) {
            Ok(users) => *self.users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users),
            Err(e) => warn!(error = %e, "reload: users not applied"),
        }
        if new.log_level != old.log_level {
            if let Some(reload) = self.log_reloader.get() {
                if let Err(e) = reload(&new.log_level) {
                    warn!(error = %e, "reload: log_level not applied");
                }
            }
        }
        report.needs_restart.sort();
        report.needs_restart.dedup();
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        info!(applied = ?report.applied, needs_restart = ?report.needs_restart, "configuration reloaded");
        report
    }
}

/// The client side's view of the process.
impl crate::client::Context for Shared {
    fn config(&self) -> Arc<Config> {
        Shared::config(self)
    }
    fn users(&self) -> Arc<HashMap<String, UserAuth>> {
        Shared::users(self)
    }
    fn pool(&self, database: &str) -> Option<Arc<Pool>> {
        Shared::pool(self, database)
    }
    fn cancel_keys(&self) -> &CancelRegistry {
        &self.cancel
    }
    fn login_guard(&self) -> &LoginGuard {
        &self.login_guard
    }
    fn tls_acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls_acceptor.as_ref()
    }
    fn open_clients(&self) -> &AtomicUsize {
        &self.clients
    }
    fn clients(&self) -> &ClientRegistry {
        &self.client_registry
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn shutdown_signal(&self) -> watch::Receiver<bool> {
        Shared::shutdown_signal(self)
    }
    async fn serve_console(self: Arc<Self>, login: ConsoleLogin) {
        crate::admin::serve(self, login).await
    }
}

/// The admin console's view of the process.
impl crate::admin::Context for Shared {
    fn config(&self) -> Arc<Config> {
        Shared::config(self)
    }
    fn pools(&self) -> Vec<Arc<Pool>> {
        Shared::pools(self).cloned().collect()
    }
    fn pool(&self, database: &str) -> Option<Arc<Pool>> {
        Shared::pool(self, database)
    }
    fn clients(&self) -> &ClientRegistry {
        &self.client_registry
    }
    fn started_at(&self) -> i64 {
        self.metrics.started.get()
    }
    fn open_clients(&self) -> usize {
        self.open_client_count()
    }
    fn pending_logins(&self) -> usize {
        Shared::pending_logins(self)
    }
    fn reload(&self) -> Result<ReloadReport, String> {
        Shared::reload(self)
    }
    fn request_shutdown(&self) {
        Shared::request_shutdown(self)
    }
    fn shutdown_signal(&self) -> watch::Receiver<bool> {
        Shared::shutdown_signal(self)
    }
}

/// Whether two upstreams are the same server, user and settings, whatever their passwords.
fn same_but_password(a: &Upstream, b: &Upstream) -> bool {
    let unkeyed = |u: &Upstream| Upstream {
        password: None,
        ..u.clone()
    };
    unkeyed(a) == unkeyed(b)
}

fn pool_settings(config: &Config, db: &Database) -> PoolSettings {
    PoolSettings {
        mode: db.pool_mode,
        pool_size: db.pool_size,
        min_pool_size: db.min_pool_size,
        reserve_pool_size: db.reserve_pool_size,
        reserve_pool_timeout: config.reserve_pool_timeout,
        max_db_connections: db.max_db_connections,
        max_user_connections: config.max_user_connections,
        query_wait_timeout: config.query_wait_timeout,
        idle_timeout: config.server_idle_timeout,
        server_check_query: config.server_check_query.clone(),
        server_check_delay: config.server_check_delay,
        server_check_limit: config.server_connect_timeout,
        login_retry: config.server_login_retry,
        pin_session_state: config.session_state == SessionStateMode::Pin,
        max_pinned_servers: config
            .max_pinned_servers
            .unwrap_or((db.pool_size / 2).max(1)),
    }
}

/// What makes two database entries one upstream database for max_db_connections: the same
/// hosts (in the same order) and dbname.
fn upstream_database(u: &Upstream) -> String {
    let hosts: Vec<String> = u.hosts.iter().map(limiter_key).collect();
    format!("{}/{}", hosts.join(","), u.dbname)
}

/// Logins to one address share a rate limit, whichever pools they are for.
fn limiter_key(host: &Host) -> String {
    match host.addr {
        Some(ip) => format!("{ip}:{}", host.port),
        None => format!("{}:{}", host.name, host.port),
    }
}

/// A running iampool.
pub struct Running {
    addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    listeners: Vec<JoinHandle<()>>,
}

impl Running {
    /// The first TCP address clients can connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Where /metrics and the health endpoints listen, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, tells idle clients to go, and lets linked ones finish their transaction.
    pub fn begin_shutdown(&self) {
        self.shared.request_shutdown();
        for l in &self.listeners {
            l.abort();
        }
    }

    /// Waits until every client is gone, at most `timeout`. Returns true if all left.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.shared.clients.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Full shutdown: stop, drain up to `shutdown_timeout`, close the pools.
    pub async fn shutdown(self) -> bool {
        self.begin_shutdown();
        let timeout = self.shared.config().shutdown_timeout;
        let drained = self.drain(timeout).await;
        for pool in self.shared.pools() {
            pool.close();
        }
        drained
    }
}

/// Builds everything from `config` and starts listening.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let users = prepare_users(&config.users).map_err(StartError::Users)?;
    let tls_acceptor = match (&config.client_tls_cert_file, &config.client_tls_key_file) {
        (Some(cert), Some(key)) => Some(
            crate::client::tls::acceptor(cert, key).map_err(|e| StartError::Tls(e.to_string()))?,
        ),
        _ => None,
    };

    let metrics = Arc::new(Metrics::new());
    let mut limiters: HashMap<String, Arc<LoginLimiter>> = HashMap::new();
    // AWS configuration is loaded once per region and shared by every IAM upstream.
    let iam_registry = crate::iam::IamRegistry::default();
    let mut pools = HashMap::new();
    // Server connection ids, unique across pools (the admin console's SHOW SERVERS).
    let server_ids = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Server connections per upstream database and per upstream user, across pools.
    let mut db_counts: HashMap<String, Arc<SharedCount>> = HashMap::new();
    let mut user_counts: HashMap<String, Arc<SharedCount>> = HashMap::new();
    for db in &config.databases {
        let u = &db.upstream;
        if let UpstreamAuth::Iam(iam) = &u.auth {
            if iam.region_inferred {
                info!(database = %db.name, host = %u.hosts[0].name, region = %iam.region,
                    "IAM signing region inferred from the host name");
            }
        }
        let upstream_error = |message: String| StartError::Upstream {
            database: db.name.clone(),
            message,
        };
        // Each host its own TLS name, IAM token (signed for the host dialled) and login
        // limit (shared by every pool to that address).
        let mut targets = Vec::with_capacity(u.hosts.len());
        for host in &u.hosts {
            let limiter = limiters
                .entry(limiter_key(host))
                .or_insert_with(|| Arc::new(LoginLimiter::new(u.max_new_connections_per_second)))
                .clone();
            let password = match &u.auth {
                UpstreamAuth::Password => Password::fixed(u.password.clone()),
                UpstreamAuth::Iam(iam) => Password::Iam(
                    iam_registry
                        .authenticator(iam, &host.name, host.port, &u.user)
                        .await
                        .map_err(|e| upstream_error(e.to_string()))?,
                ),
            };
            let target = Target::new(u, host.clone(), password, limiter)
                .map_err(|e| upstream_error(e.to_string()))?;
            targets.push(target);
        }
        let connector = Connector::new(
            u.clone(),
            targets,
            // libpq's connect_timeout bounds one host attempt.
            u.connect_timeout.unwrap_or(config.server_connect_timeout),
            config.server_lifetime,
            config.server_lifetime_jitter,
        )
        .with_tcp(config.tcp);
        let pool_metrics = metrics.pool(&db.name, &u.user);
        if let Some(auth) = connector.iam() {
            auth.set_sign_histogram(metrics.sign_histogram(&db.name, &u.user));
        }
        let pool = Pool::new(
            db.name.clone(),
            connector,
            pool_settings(&config, db),
            pool_metrics,
            Arc::new(ServerList::new(server_ids.clone())),
            (
                db_counts.entry(upstream_database(u)).or_default().clone(),
                user_counts.entry(u.user.clone()).or_default().clone(),
            ),
        );
        pool.spawn_janitor();
        pools.insert(db.name.clone(), pool);
    }

    metrics.register_pools(PoolsCollector::new(pools.values().cloned().collect()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        config_source: std::sync::OnceLock::new(),
        terminating: std::sync::atomic::AtomicBool::new(false),
        log_reloader: std::sync::OnceLock::new(),
        metrics: metrics.clone(),
        draining: std::sync::atomic::AtomicBool::new(false),
        config: RwLock::new(Arc::new(config.clone())),
        started: Arc::new(config.clone()),
        users: RwLock::new(Arc::new(users)),
        pools,
        cancel: CancelRegistry::default(),
        login_guard: LoginGuard::default(),
        tls_acceptor,
        clients: AtomicUsize::new(0),
        client_registry: Default::default(),
        shutdown: shutdown_rx,
        shutdown_tx,
    });

    let mut addrs = Vec::new();
    spawn_memory_trim(Arc::downgrade(&shared));
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let local = l.local_addr().map_err(|source| StartError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        info!(addr = %local, "listening");
        addrs.push(local);
        let shared = shared.clone();
        listeners.push(tokio::spawn(accept_tcp(l, shared)));
    }
    if let Some(dir) = &config.unix_socket_dir {
        let port = addrs.first().map(|a| a.port()).unwrap_or(6432);
        let path: PathBuf = dir.join(format!(".s.PGSQL.{port}"));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).map_err(|source| StartError::Listen {
            addr: path.display().to_string(),
            source,
        })?;
        info!(path = %path.display(), "listening");
        let shared = shared.clone();
        listeners.push(tokio::spawn(accept_unix(l, shared)));
    }

    // Warm every pool: checks the upstream (and IAM) now rather than at the first client,
    // and fills the welcome parameters. Until a login succeeds the startup probe fails, so
    // it keeps trying (the pool spaces the logins) while nothing else would.
    for pool in shared.pools() {
        tokio::spawn(warm(pool.clone(), shared.shutdown_signal()));
    }
    if !config.reload_check_interval.is_zero() {
        tokio::spawn(watch_files(
            Arc::downgrade(&shared),
            config.reload_check_interval,
        ));
    }

    let mut metrics_addr = None;
    if let Some(addr) = config.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        metrics_addr = l.local_addr().ok();
        let health: Arc<dyn Health> = Arc::new(AppHealth(shared.clone()));
        let routes = crate::metrics::http::Routes {
            quitquitquit: config.quitquitquit,
        };
        tokio::spawn(crate::metrics::http::serve(
            l,
            metrics.clone(),
            health,
            routes,
        ));
    }

    Ok(Running {
        addrs,
        metrics_addr,
        shared,
        listeners,
    })
}

/// Readiness as Kubernetes sees it.
struct AppHealth(Arc<Shared>);

impl Health for AppHealth {
    fn ready(&self) -> bool {
        !self.0.is_draining()
            && !self.0.terminating.load(Ordering::Acquire)
            && self.0.pools().all(|p| {
                let st = p.status();
                st.warmed && (st.last_login_ok || st.idle + st.active > 0)
            })
    }

    /// Every pool has logged in once: iampool can serve. A native sidecar's application
    /// starts only after this, so its first query does not wait for iampool's first login.
    fn started(&self) -> bool {
        self.0.pools().all(|p| p.status().warmed)
    }

    fn quit(&self) {
        info!("POST /quitquitquit: draining");
        self.0.request_shutdown();
    }
}

/// Logs in to `pool` until that succeeds once (or shutdown). The first failure is a warning,
/// later ones are repeated only now and then; the pool's own login backoff spaces attempts.
async fn warm(pool: Arc<Pool>, mut shutdown: watch::Receiver<bool>) {
    const RETRY: Duration = Duration::from_secs(1);
    for attempt in 1u64.. {
        let failure = tokio::select! {
            result = pool.welcome_params() => match result {
                Ok(_) => return,
                Err(e) => e,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        if attempt == 1 || attempt.is_power_of_two() {
            warn!(pool = %pool.database, attempt, error = %failure, "not started yet: no upstream login has succeeded; trying again");
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Every `reload_check_interval`, the files the configuration came from (`watched_files`)
/// are read; when one changed (a rotated Kubernetes Secret is a new file behind the same
/// path), the configuration is reloaded as on SIGHUP.
async fn watch_files(shared: std::sync::Weak<Shared>, interval: Duration) {
    let mut seen: Option<Vec<Option<[u8; 32]>>> = None;
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let config = shared.config();
        let now: Vec<Option<[u8; 32]>> = config
            .watched_files
            .iter()
            .map(|p| fingerprint(p))
            .collect();
        let before = seen.replace(now.clone());
        let changed: Vec<_> = match before {
            Some(before) if before.len() == now.len() => config
                .watched_files
                .iter()
                .zip(before.iter().zip(&now))
                .filter(|(_, (a, b))| a != b)
                .map(|(path, _)| path.display().to_string())
                .collect(),
            // First look, or a reload changed the list: remember and compare next time.
            _ => Vec::new(),
        };
        if !changed.is_empty() {
            info!(files = %changed.join(", "), "configuration files changed: reloading");
            if let Err(e) = shared.reload() {
                warn!(error = %e, "reload after a file change failed; keeping the current configuration");
            }
        }
        drop(shared);
        tokio::time::sleep(interval).await;
    }
}

/// A file's contents as a SHA-256, or None when it cannot be read right now.
fn fingerprint(path: &std::path::Path) -> Option<[u8; 32]> {
    use sha2::Digest;
    std::fs::read(path)
        .ok()
        .map(|bytes| sha2::Sha256::digest(bytes).into())
}

async fn accept_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let options = shared.started.tcp;
    loop {
        match listener.accept().await {
            Ok((tcp, _peer)) => {
                let _ = tcp.set_nodelay(true);
                if let Err(e) = crate::tcp::apply(&tcp, &options) {
                    debug!(error = %e, "could not set TCP options on a client socket");
                }
                tokio::spawn(crate::client::serve(shared.clone(), Stream::Tcp(tcp)));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_unix(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(crate::client::serve(shared.clone(), Stream::Unix(s)));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// After a burst of clients has left, gives the memory their sessions used back to the
/// system: the allocator keeps freed memory for reuse, so without this a sidecar's resident
/// size would stay at its peak.
fn spawn_memory_trim(shared: std::sync::Weak<Shared>) {
    /// Clients gone since the peak before memory is trimmed.
    const TRIM_AFTER: usize = 256;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut peak = 0;
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = shared.clients.load(std::sync::atomic::Ordering::Relaxed);
            peak = peak.max(now);
            if peak - now >= TRIM_AFTER {
                trim_heap();
                peak = now;
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory held by glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}
