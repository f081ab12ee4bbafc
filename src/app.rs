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
use tracing::{info, warn};

use crate::client::auth::{prepare_users, UserAuth};
use crate::client::cancel::CancelRegistry;
use crate::config::{Config, Database, Upstream, UpstreamAuth};
use crate::pool::{Pool, PoolSettings};
use crate::server::auth::Password;
use crate::server::login_limit::LoginLimiter;
use crate::server::Connector;
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

/// State shared by every connection task.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    users: RwLock<Arc<HashMap<String, UserAuth>>>,
    pools: HashMap<String, Arc<Pool>>,
    pub cancel: CancelRegistry,
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Connections open on the client side (logged in or logging in).
    pub clients: AtomicUsize,
    shutdown: watch::Receiver<bool>,
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
}

fn pool_settings(config: &Config, db: &Database) -> PoolSettings {
    PoolSettings {
        mode: db.pool_mode,
        pool_size: db.pool_size,
        min_pool_size: db.min_pool_size,
        query_wait_timeout: config.query_wait_timeout,
        idle_timeout: config.server_idle_timeout,
        login_retry: config.server_login_retry,
    }
}

fn limiter_key(u: &Upstream) -> String {
    match u.hostaddr {
        Some(ip) => format!("{ip}:{}", u.port),
        None => format!("{}:{}", u.host, u.port),
    }
}

/// A running iampool.
pub struct Running {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
}

impl Running {
    /// The first TCP address clients can connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, tells idle clients to go, and lets linked ones finish their transaction.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
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

    let mut limiters: HashMap<String, Arc<LoginLimiter>> = HashMap::new();
    // AWS configuration is loaded once per region and shared by every IAM upstream.
    let iam_registry = crate::iam::IamRegistry::default();
    let mut pools = HashMap::new();
    for db in &config.databases {
        let u = &db.upstream;
        let limiter = limiters
            .entry(limiter_key(u))
            .or_insert_with(|| Arc::new(LoginLimiter::new(u.max_new_connections_per_second)))
            .clone();
        let password = match &u.auth {
            UpstreamAuth::Password => Password::Static(u.password.clone()),
            UpstreamAuth::Iam(iam) => {
                if iam.region_inferred {
                    info!(database = %db.name, host = %u.host, region = %iam.region,
                        "IAM signing region inferred from the host name");
                }
                let auth = iam_registry
                    .authenticator(iam, &u.host, u.port, &u.user)
                    .await
                    .map_err(|e| StartError::Upstream {
                        database: db.name.clone(),
                        message: e.to_string(),
                    })?;
                Password::Iam(auth)
            }
        };
        let connector = Connector::new(
            u.clone(),
            password,
            limiter,
            config.server_connect_timeout,
            config.server_lifetime,
            config.server_lifetime_jitter,
        )
        .map_err(|e| StartError::Upstream {
            database: db.name.clone(),
            message: e.to_string(),
        })?;
        let pool = Pool::new(db.name.clone(), connector, pool_settings(&config, db));
        pool.spawn_janitor();
        pools.insert(db.name.clone(), pool);
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        config: RwLock::new(Arc::new(config.clone())),
        users: RwLock::new(Arc::new(users)),
        pools,
        cancel: CancelRegistry::default(),
        tls_acceptor,
        clients: AtomicUsize::new(0),
        shutdown: shutdown_rx,
    });

    let mut addrs = Vec::new();
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

    Ok(Running {
        addrs,
        shared,
        shutdown: shutdown_tx,
        listeners,
    })
}

async fn accept_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _peer)) => {
                let _ = tcp.set_nodelay(true);
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
