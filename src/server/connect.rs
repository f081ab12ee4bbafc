//! Opening a server connection: TCP, TLS per sslmode, startup and upstream authentication.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
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
use crate::config::{Named, Secret, SslMode, Upstream, UpstreamAuth};
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
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<rustls_pki_types::ServerName<'static>>,
    password: Password,
    limiter: Arc<LoginLimiter>,
    connect_timeout: Duration,
    lifetime: Duration,
    lifetime_jitter: Duration,
    next_id: AtomicU64,
}

/// What a successful login returns besides the connection: every ParameterStatus, in order.
pub type ServerParamList = Vec<(String, String)>;

impl Connector {
    pub fn new(
        upstream: Upstream,
        password: Password,
        limiter: Arc<LoginLimiter>,
        connect_timeout: Duration,
        lifetime: Duration,
        lifetime_jitter: Duration,
    ) -> Result<Connector, LoginError> {
        let tls = super::tls::upstream_client_config(
            upstream.sslmode,
            &upstream.hosts[0].name,
            upstream.sslrootcert.as_deref(),
        )
        .map_err(|e| LoginError::Config(e.to_string()))?;
        let server_name = match tls {
            Some(_) => Some(
                super::tls::server_name(&upstream.hosts[0].name)
                    .map_err(|e| LoginError::Config(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Connector {
            upstream,
            tls,
            server_name,
            password,
            limiter,
            connect_timeout,
            lifetime,
            lifetime_jitter,
            next_id: AtomicU64::new(1),
        })
    }

    /// A rotated upstream password, for the logins that follow; connections already signed
    /// in are not affected. False for IAM upstreams.
    pub fn replace_password(&self, secret: Option<Secret>) -> bool {
        self.password.replace(secret)
    }

    /// The IAM authenticator, for IAM upstreams.
    pub fn iam(&self) -> Option<&crate::iam::IamAuthenticator> {
        match &self.password {
            Password::Iam(a) => Some(a),
            Password::Static(_) => None,
        }
    }

    /// Opens and logs in one server connection, within `server_connect_timeout`.
    pub async fn connect(&self) -> Result<(ServerConn, ServerParamList), LoginError> {
        self.limiter.acquire().await;
        let started = Instant::now();
        let u = &self.upstream;
        let result = tokio::time::timeout(self.connect_timeout, self.connect_inner()).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(LoginError::Timeout(format!(
                "{}:{}",
                u.hosts[0].name, u.hosts[0].port
            ))),
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        // Who signed: the IAM access key id (not a secret), like RDS's log_connections audit.
        let signer = match self.iam() {
            Some(a) => format!(
                "{} via {}",
                a.credentials_identity()
                    .unwrap_or_else(|| "no credentials".into()),
                a.credentials_chain()
            ),
            None => "password".to_owned(),
        };
        match &result {
            Ok((conn, _)) => info!(
                target: "iampool::login",
                host = %u.hosts[0].name, port = u.hosts[0].port, user = %u.user, database = %u.dbname,
                signer = %signer, backend_pid = conn.backend_pid,
                duration_ms = format_args!("{ms:.1}"), result = "ok", "upstream login"
            ),
            Err(e) => warn!(
                target: "iampool::login",
                host = %u.hosts[0].name, port = u.hosts[0].port, user = %u.user, database = %u.dbname,
                signer = %signer, duration_ms = format_args!("{ms:.1}"), result = e.kind(),
                error = %e, "upstream login failed"
            ),
        }
        result
    }

    async fn connect_inner(&self) -> Result<(ServerConn, ServerParamList), LoginError> {
        let secret = self.password.resolve().await?;
        let result = self.attempt_per_sslmode(&secret).await;
        match result {
            // A refused IAM token (expired, revoked, signed by rotated-out credentials): drop
            // it, mint a fresh one and try once more after a short pause.
            Err(LoginError::Server(e)) if self.password.is_iam() && token_refused(&e) => {
                self.password.refused(&secret);
                warn!(
                    target: "iampool::login",
                    host = %self.upstream.hosts[0].name, user = %self.upstream.user,
                    "IAM token refused; retrying once with a fresh token"
                );
                tokio::time::sleep(IAM_RETRY_BACKOFF).await;
                let fresh = self.password.resolve().await?;
                let result = self.attempt_per_sslmode(&fresh).await;
                if let Err(LoginError::Server(e)) = &result {
                    if token_refused(e) {
                        self.password.refused(&fresh);
                    }
                }
                result
            }
            r => r,
        }
    }

    async fn attempt_per_sslmode(
        &self,
        secret: &LoginSecret,
    ) -> Result<(ServerConn, ServerParamList), LoginError> {
        match self.upstream.sslmode {
            SslMode::Allow => match self.attempt(false, secret).await {
                // No pg_hba entry for a non-TLS connection: try again with TLS, as libpq does.
                Err(LoginError::Server(e)) if e.code == "28000" => self.attempt(true, secret).await,
                r => r,
            },
            SslMode::Disable => self.attempt(false, secret).await,
            _ => self.attempt(true, secret).await,
        }
    }

    async fn dial(&self) -> Result<(TcpStream, SocketAddr), LoginError> {
        let u = &self.upstream;
        let addr_text = format!("{}:{}", u.hosts[0].name, u.hosts[0].port);
        let tcp = match u.hosts[0].addr {
            Some(ip) => TcpStream::connect(SocketAddr::new(ip, u.hosts[0].port)).await,
            None => TcpStream::connect((u.hosts[0].name.as_str(), u.hosts[0].port)).await,
        }
        .map_err(|source| LoginError::Connect {
            addr: addr_text,
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr()?;
        Ok((tcp, peer))
    }

    async fn attempt(
        &self,
        want_tls: bool,
        secret: &LoginSecret,
    ) -> Result<(ServerConn, ServerParamList), LoginError> {
        let u = &self.upstream;
        let (mut tcp, peer) = self.dial().await?;
        let mut stream = match (&self.tls, &self.server_name) {
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
                                host: u.hosts[0].name.clone(),
                                message: super::tls::describe_failure(
                                    &e,
                                    &u.hosts[0].name,
                                    u.sslrootcert.as_deref(),
                                ),
                            }
                        })?;
                        Stream::TlsClient(Box::new(tls))
                    }
                    b'N' if u.sslmode <= SslMode::Prefer => Stream::Tcp(tcp),
                    b'N' => {
                        return Err(LoginError::Tls {
                            host: u.hosts[0].name.clone(),
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
        let target = u.target_session_attrs;
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
                    addr: format!("{}:{} ({peer})", u.hosts[0].name, u.hosts[0].port),
                    found: role.describe(),
                    wanted: target.name(),
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
