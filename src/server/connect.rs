//! Opening a server connection: TCP, TLS per sslmode, startup and upstream authentication.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use rand::seq::SliceRandom;
use rand::Rng;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth::{authenticate, LoginSecret, Password};
use super::conn::ServerConn;
use super::login_limit::LoginLimiter;
use super::params::SessionParams;
use super::role::ServerRole;
use crate::config::{
    Host, LoadBalanceHosts, Named, Secret, SslMode, TargetSessionAttrs, Upstream, UpstreamAuth,
};
use crate::protocol::framing::SSL_REQUEST;
use crate::protocol::messages::{self, backend, parse_error_fields, ErrorFields};
use crate::stream::{read_message, Stream};

/// The server refused the password (an IAM token). RDS checks tokens through PAM, and
/// PostgreSQL reports a failed PAM login as 28000 "PAM authentication failed", not 28P01;
/// other 28000 errors (a pg_hba reject) are not about the token and are not retried.
fn token_refused(e: &ErrorFields) -> bool {
    e.code == "28P01" || (e.code == "28000" && e.message.starts_with("PAM authentication failed"))
}

/// Pause before retrying a login whose IAM token was refused. Over a second, because SigV4
/// dates have one-second resolution: a token re-signed within the same second with the same
/// credentials is byte for byte the one just refused.
const IAM_RETRY_BACKOFF: Duration = Duration::from_millis(1100);

/// Messages during login are small; this bounds what an upstream can make us buffer.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum LoginError {
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("TLS to {host}: {message}")]
    Tls { host: String, message: String },
    #[error("{}", .0.message)]
    Server(ErrorFields),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("connection lost during login: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("IAM token: {0}")]
    Iam(String),
    /// The server is not what the pool's target_session_attrs asks for (a stale DNS answer
    /// during a failover, a reader behind a writer endpoint).
    #[error("{addr} is {found}, but target_session_attrs is {wanted}")]
    Role {
        addr: String,
        found: &'static str,
        wanted: &'static str,
    },
}

impl LoginError {
    /// Failures that retrying cannot fix without a configuration change.
    pub fn is_permanent(&self) -> bool {
        match self {
            LoginError::Server(e) => {
                e.code.starts_with("28") || e.code == "3D000" || e.code.starts_with("42")
            }
            // No token can be had (credentials unavailable): waiting clients learn it now
            // rather than at query_wait_timeout; the next client tries again.
            LoginError::Tls { .. } | LoginError::Config(_) | LoginError::Iam(_) => true,
            _ => false,
        }
    }

    /// SQLSTATE and message a client may be told. Never contains a secret: server messages
    /// do not echo passwords, and iampool's own messages never include one.
    pub fn client_error(&self) -> (String, String) {
        match self {
            LoginError::Server(e) => (
                e.code.clone(),
                format!("server login failed: {}", e.message),
            ),
            other => (
                messages::sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH.to_owned(),
                format!("server login failed: {other}"),
            ),
        }
    }

    /// The SQLSTATE class (or a kind) for metrics and logs.
    pub fn kind(&self) -> &str {
        match self {
            LoginError::Server(e) => &e.code,
            LoginError::Connect { .. } => "connect",
            LoginError::Timeout(_) => "timeout",
            LoginError::Tls { .. } => "tls",
            LoginError::Protocol(_) => "protocol",
            LoginError::Io(_) => "io",
            LoginError::Config(_) => "config",
            LoginError::Iam(_) => "iam",
            LoginError::Role { .. } => "role",
        }
    }
}

/// Everything needed to open connections to one upstream (database + user).
pub struct Connector {
    pub upstream: Upstream,
    /// One per host, in the order written: each is dialled, verified and signed for itself.
    targets: Vec<Target>,
    /// One host attempt (libpq's connect_timeout, else server_connect_timeout).
    connect_timeout: Duration,
    lifetime: Duration,
    lifetime_jitter: Duration,
    /// Keepalive and TCP_USER_TIMEOUT for each socket dialled.
    tcp: crate::config::TcpOptions,
    next_id: AtomicU64,
}

/// One host of an upstream: the name dialled (unless `hostaddr`), verified in TLS and
/// signed for IAM, with its own TLS configuration, token and login rate limit.
pub struct Target {
    pub host: Host,
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<rustls_pki_types::ServerName<'static>>,
    password: Password,
    limiter: Arc<LoginLimiter>,
}

impl Target {
    /// `host` with its password (a fixed one, or IAM tokens signed for it) and the login
    /// limiter of its address.
    pub fn new(
        upstream: &Upstream,
        host: Host,
        password: Password,
        limiter: Arc<LoginLimiter>,
    ) -> Result<Target, LoginError> {
        let tls = super::tls::upstream_client_config(
            upstream.sslmode,
            &host.name,
            upstream.sslrootcert.as_deref(),
        )
        .map_err(|e| LoginError::Config(e.to_string()))?;
        let server_name = match tls {
            Some(_) => Some(
                super::tls::server_name(&host.name)
                    .map_err(|e| LoginError::Config(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Target {
            host,
            tls,
            server_name,
            password,
            limiter,
        })
    }

    fn addr_text(&self) -> String {
        match self.host.name.contains(':') {
            true => format!("[{}]:{}", self.host.name, self.host.port),
            false => format!("{}:{}", self.host.name, self.host.port),
        }
    }
}

/// What a successful login returns besides the connection: every ParameterStatus, in order.
pub type ServerParamList = Vec<(String, String)>;

impl Connector {
    pub fn new(
        upstream: Upstream,
        targets: Vec<Target>,
        connect_timeout: Duration,
        lifetime: Duration,
        lifetime_jitter: Duration,
    ) -> Connector {
        assert!(!targets.is_empty(), "an upstream has at least one host");
        Connector {
            upstream,
            targets,
            connect_timeout,
            lifetime,
            lifetime_jitter,
            tcp: crate::config::TcpOptions::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Keepalive and TCP_USER_TIMEOUT for the sockets it dials (default: PgBouncer's).
    pub fn with_tcp(mut self, tcp: crate::config::TcpOptions) -> Connector {
        self.tcp = tcp;
        self
    }

    /// A rotated upstream password, for the logins that follow; connections already signed
    /// in are not affected. False for IAM upstreams.
    pub fn replace_password(&self, secret: Option<Secret>) -> bool {
        let mut replaced = false;
        for t in &self.targets {
            replaced |= t.password.replace(secret.clone());
        }
        replaced
    }

    /// The IAM authenticator of the first host, for IAM upstreams (metrics and SHOW).
    pub fn iam(&self) -> Option<&crate::iam::IamAuthenticator> {
        match &self.targets[0].password {
            Password::Iam(a) => Some(a),
            Password::Static(_) => None,
        }
    }

    /// Opens and logs in one server connection, trying the hosts as libpq does: in order
    /// (or shuffled, with load_balance_hosts = random), each within the connect timeout; the
    /// next host is tried after a failure to reach or log in to one, or a server of the
    /// wrong role, but not after a refusal that another host would repeat (a password, a
    /// missing database). prefer-standby tries every host for a standby first, then any.
    pub async fn connect(&self) -> Result<(ServerConn, ServerParamList), LoginError> {
        let mut order: Vec<usize> = (0..self.targets.len()).collect();
        if self.upstream.load_balance_hosts == LoadBalanceHosts::Random {
            order.shuffle(&mut rand::thread_rng());
        }
        let target = self.upstream.target_session_attrs;
        let passes: &[TargetSessionAttrs] = match target {
            TargetSessionAttrs::PreferStandby => {
                &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any]
            }
            _ => std::slice::from_ref(&self.upstream.target_session_attrs),
        };
        let mut last = None;
        for &wanted in passes {
            for &i in &order {
                match self.connect_to(&self.targets[i], wanted).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) if e.is_permanent() => return Err(e),
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.expect("at least one host was tried"))
    }

    /// Opens and logs in one server connection to one host, within the connect timeout.
    async fn connect_to(
        &self,
        t: &Target,
        wanted: TargetSessionAttrs,
    ) -> Result<(ServerConn, ServerParamList), LoginError> {
        t.limiter.acquire().await;
        let started = Instant::now();
        let u = &self.upstream;
        let result =
            tokio::time::timeout(self.connect_timeout, self.connect_inner(t, wanted)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(LoginError::Timeout(t.addr_text())),
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        // Who signed: the IAM access key id (not a secret), like RDS's log_connections audit.
        let signer = match &t.password {
            Password::Iam(a) => format!(
                "{} via {}",
                a.credentials_identity()
                    .unwrap_or_else(|| "no credentials".into()),
                a.credentials_chain()
            ),
            Password::Static(_) => "password".to_owned(),
        };
        match &result {
            Ok((conn, _)) => info!(
                target: "iampool::login",
                host = %t.host.name, port = t.host.port, user = %u.user, database = %u.dbname,
                signer = %signer, backend_pid = conn.backend_pid,
                duration_ms = format_args!("{ms:.1}"), result = "ok", "upstream login"
            ),
            Err(e) => warn!(
                target: "iampool::login",
                host = %t.host.name, port = t.host.port, user = %u.user, database = %u.dbname,
                signer = %signer, duration_ms = format_args!("{ms:.1}"), result = e.kind(),
                error = %e, "upstream login failed"
            ),
        }
        result
    }

    async fn connect_inner(
        &self,
        t: &Target,
        wanted: TargetSessionAttrs,
    ) -> Result<(ServerConn, ServerParamList), LoginError> {
        let secret = t.password.resolve().await?;
        let result = self.attempt_per_sslmode(t, wanted, &secret).await;
        match result {
            // A refused IAM token (expired, revoked, signed by rotated-out credentials): drop
            // it, mint a fresh one and try once more after a short pause.
            Err(LoginError::Server(e)) if t.password.is_iam() && token_refused(&e) => {
                t.password.refused(&secret);
                warn!(
                    target: "iampool::login",
                    host = %t.host.name, user = %self.upstream.user,
                    "IAM token refused; retrying once with a fresh token"
                );
                tokio::time::sleep(IAM_RETRY_BACKOFF).await;
                let fresh = t.password.resolve().await?;
                let result = self.attempt_per_sslmode(t, wanted, &fresh).await;
                if let Err(LoginError::Server(e)) = &result {
                    if token_refused(e) {
                        t.password.refused(&fresh);
                    }
                }
                result
            }
            r => r,
        }
    }

    async fn attempt_per_sslmode(
        &self,
        t: &Target,
        wanted: TargetSessionAttrs,
        secret: &LoginSecret,
    ) -> Result<(ServerConn, ServerParamList), LoginError> {
        match self.upstream.sslmode {
            SslMode::Allow => match self.attempt(t, wanted, false, secret).await {
                // No pg_hba entry for a non-TLS connection: try again with TLS, as libpq does.
                Err(LoginError::Server(e)) if e.code == "28000" => {
                    self.attempt(t, wanted, true, secret).await
                }
                r => r,
            },
            SslMode::Disable => self.attempt(t, wanted, false, secret).await,
            _ => self.attempt(t, wanted, true, secret).await,
        }
    }

    /// Dials the host's address (`hostaddr`), or resolves its name again for every login: the
    /// system resolver's answer, never cached here, so a failover's DNS change is seen as
    /// soon as the record's TTL lets the resolver see it.
    async fn dial(&self, t: &Target) -> Result<(TcpStream, SocketAddr), LoginError> {
        let h = &t.host;
        let tcp = match h.addr {
            Some(ip) => TcpStream::connect(SocketAddr::new(ip, h.port)).await,
            None => TcpStream::connect((h.name.as_str(), h.port)).await,
        }
        .map_err(|source| LoginError::Connect {
            addr: t.addr_text(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        if let Err(e) = crate::tcp::apply(&tcp, &self.tcp) {
            debug!(error = %e, "could not set TCP options on a server socket");
        }
        let peer = tcp.peer_addr()?;
        Ok((tcp, peer))
    }

    async fn attempt(
        &self,
        t: &Target,
        wanted: TargetSessionAttrs,
        want_tls: bool,
        secret: &LoginSecret,
    ) -> Result<(ServerConn, ServerParamList), LoginError> {
        let u = &self.upstream;
        let host = &t.host.name;
        let (mut tcp, peer) = self.dial(t).await?;
        let mut stream = match (&t.tls, &t.server_name) {
            (Some(cfg), Some(name)) if want_tls => {
                let mut req = [0u8; 8];
                req[..4].copy_from_slice(&8i32.to_be_bytes());
                req[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
                tcp.write_all(&req).await?;
                let answer = tcp.read_u8().await?;
                match answer {
                    b'S' => {
                        let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                        let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                            LoginError::Tls {
                                host: host.clone(),
                                message: super::tls::describe_failure(
                                    &e,
                                    host,
                                    u.sslrootcert.as_deref(),
                                ),
                            }
                        })?;
                        Stream::TlsClient(Box::new(tls))
                    }
                    b'N' if u.sslmode <= SslMode::Prefer => Stream::Tcp(tcp),
                    b'N' => {
                        return Err(LoginError::Tls {
                            host: host.clone(),
                            message: format!(
                                "server does not support TLS, but sslmode is {:?}",
                                u.sslmode
                            ),
                        })
                    }
                    other => {
                        return Err(LoginError::Protocol(format!(
                            "unexpected answer {other:#x} to SSLRequest"
                        )))
                    }
                }
            }
            _ => Stream::Tcp(tcp),
        };

        let mut out = BytesMut::with_capacity(256);
        let mut params = vec![("user", u.user.as_str()), ("database", u.dbname.as_str())];
        if let Some(name) = &u.application_name {
            params.push(("application_name", name.as_str()));
        }
        if let Some(options) = &u.options {
            params.push(("options", options.as_str()));
        }
        messages::startup(&mut out, &params);
        stream.write_all(&out).await?;
        stream.flush().await?;

        let mut buf = BytesMut::with_capacity(1024);
        let cleartext = cleartext_allowed(&self.upstream, stream.is_tls());
        authenticate(&mut stream, &mut buf, &u.user, &secret.secret, cleartext).await?;

        // After AuthenticationOk: ParameterStatus*, BackendKeyData, ReadyForQuery.
        let mut params = ServerParamList::new();
        let mut session = SessionParams::default();
        let mut key = None;
        loop {
            let (tag, body) = read_message(&mut stream, &mut buf, MAX_LOGIN_MESSAGE).await?;
            match tag {
                backend::PARAMETER_STATUS => {
                    let (n, v) = messages::parse_parameter_status(&body)
                        .map_err(|e| LoginError::Protocol(format!("ParameterStatus: {e}")))?;
                    session.set_reported(n, v);
                    params.push((n.to_owned(), v.to_owned()));
                }
                backend::BACKEND_KEY_DATA => {
                    let mut r = messages::BodyReader::new(&body);
                    let pid = r.i32().map_err(|e| LoginError::Protocol(e.to_string()))?;
                    let secret = r.i32().map_err(|e| LoginError::Protocol(e.to_string()))?;
                    key = Some((pid, secret));
                }
                backend::READY_FOR_QUERY => break,
                backend::ERROR_RESPONSE => {
                    return Err(LoginError::Server(parse_error_fields(&body)))
                }
                backend::NOTICE_RESPONSE => {
                    debug!(message = %parse_error_fields(&body).message, "upstream notice at login")
                }
                other => {
                    return Err(LoginError::Protocol(format!(
                        "unexpected message {:?} after authentication",
                        other as char
                    )))
                }
            }
        }
        let (backend_pid, backend_secret) =
            key.ok_or_else(|| LoginError::Protocol("no BackendKeyData".into()))?;
        // The pass's role (prefer-standby's first pass wants a standby), reported as the
        // pool's setting.
        let target = wanted;
        if super::role::must_check(target) {
            let role = match ServerRole::reported(&session) {
                Some(role) => role,
                None => super::role::query(&mut stream, &mut buf)
                    .await
                    .map_err(LoginError::Protocol)?,
            };
            if !role.accepted_by(target) {
                let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
                let _ = stream.shutdown().await;
                return Err(LoginError::Role {
                    addr: format!("{} ({peer})", t.addr_text()),
                    found: role.describe(),
                    wanted: u.target_session_attrs.name(),
                });
            }
        }
        let now = Instant::now();
        let jitter = if self.lifetime_jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..=self.lifetime_jitter)
        };
        let mut lifetime = self.lifetime + jitter;
        if let Some(reauth) = self.upstream.reauth_interval {
            lifetime = lifetime.min(reauth);
        }
        let mut leftover = BytesMut::new();
        if !buf.is_empty() {
            leftover.put_slice(&buf);
        }
        let conn = ServerConn {
            listing: None,
            stream,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            backend_pid,
            backend_secret,
            cancel_addr: peer,
            params: session,
            created_at: now,
            retire_at: now + lifetime,
            idle_since: now,
            leftover,
            renewing: false,
            statements: Default::default(),
            exchange: Default::default(),
            cancels: Default::default(),
        };
        Ok((conn, params))
    }
}

/// Whether a password (or IAM token) may go to this server in cleartext: only once the server
/// is verified, unless the configuration says otherwise for this upstream.
fn cleartext_allowed(u: &Upstream, tls: bool) -> bool {
    let verified = tls && u.sslmode >= SslMode::VerifyCa;
    verified
        || u.allow_cleartext_password
        || (tls && u.insecure_unverified_tls && matches!(u.auth, UpstreamAuth::Iam(_)))
}
