//! Upstream authentication: answering the server's Authentication requests.
//!
//! SCRAM-SHA-256, md5 and cleartext. A cleartext password (which is what an IAM token
//! is) only goes over TLS unless the configuration explicitly allows otherwise.

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use super::connect::LoginError;
use crate::config::Secret;
use crate::iam::token::IamToken;
use crate::iam::IamAuthenticator;
use crate::protocol::md5::{md5_password_hash, md5_salted_response};
use crate::protocol::messages::{self, auth, backend, frontend, parse_error_fields, BodyReader};
use crate::protocol::scram::ScramClient;
use crate::stream::{read_message, Stream};

const MAX_AUTH_MESSAGE: usize = 64 * 1024;

/// Where the upstream password comes from.
pub enum Password {
    /// A static password from the configuration (or none, for trust/peer upstreams); a
    /// reload may replace it, for the logins that follow.
    Static(std::sync::RwLock<Option<Secret>>),
    /// A short-lived RDS IAM token, from the token cache.
    Iam(IamAuthenticator),
}

/// The secret for one login, and the IAM token it came from (to drop it if it is refused).
pub struct LoginSecret {
    pub secret: Option<Secret>,
    pub token: Option<IamToken>,
}

impl Password {
    pub async fn resolve(&self) -> Result<LoginSecret, LoginError> {
        match self {
            Password::Static(p) => Ok(LoginSecret {
                secret: p.read().unwrap_or_else(|e| e.into_inner()).clone(),
                token: None,
            }),
            Password::Iam(auth) => {
                let token = auth
                    .token()
                    .await
                    .map_err(|e| LoginError::Iam(e.to_string()))?;
                Ok(LoginSecret {
                    secret: Some(Secret::new(token.expose())),
                    token: Some(token),
                })
            }
        }
    }

    /// A login with this token was refused: never use it again.
    pub fn refused(&self, secret: &LoginSecret) {
        if let (Password::Iam(auth), Some(token)) = (self, &secret.token) {
            auth.invalidate(token);
        }
    }

    /// A static password for the configuration's value.
    pub fn fixed(secret: Option<Secret>) -> Password {
        Password::Static(std::sync::RwLock::new(secret))
    }

    /// Replaces a static password (a rotated one, on reload); false for IAM, which has none.
    pub fn replace(&self, secret: Option<Secret>) -> bool {
        match self {
            Password::Static(p) => {
                *p.write().unwrap_or_else(|e| e.into_inner()) = secret;
                true
            }
            Password::Iam(_) => false,
        }
    }

    pub fn is_iam(&self) -> bool {
        matches!(self, Password::Iam(_))
    }
}

fn protocol(e: impl std::fmt::Display) -> LoginError {
    LoginError::Protocol(e.to_string())
}

fn need(p: &Option<Secret>, method: &str) -> Result<Secret, LoginError> {
    p.clone().ok_or_else(|| {
        LoginError::Config(format!(
            "the server asks for {method} authentication but no password is configured for this upstream"
        ))
    })
}

/// Runs the authentication exchange up to and including AuthenticationOk.
pub async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    secret: &Option<Secret>,
    cleartext_allowed: bool,
) -> Result<(), LoginError> {
    let mut scram: Option<ScramClient> = None;
    let mut out = BytesMut::with_capacity(256);
    loop {
        let (tag, body) = read_message(stream, buf, MAX_AUTH_MESSAGE).await?;
        match tag {
            backend::AUTHENTICATION => {}
            backend::ERROR_RESPONSE => return Err(LoginError::Server(parse_error_fields(&body))),
            backend::NEGOTIATE_PROTOCOL_VERSION => continue,
            other => {
                return Err(protocol(format!(
                    "unexpected message {:?} during authentication",
                    other as char
                )))
            }
        }
        let mut r = BodyReader::new(&body);
        let code = r.i32().map_err(protocol)?;
        out.clear();
        match code {
            auth::OK => return Ok(()),
            auth::CLEARTEXT_PASSWORD => {
                if !cleartext_allowed {
                    return Err(LoginError::Config(
                        "the server asks for a cleartext password, and iampool has not verified it \
                         (no TLS, or sslmode below verify-ca); use sslmode=verify-full, or set \
                         allow_cleartext_password = true to send it anyway"
                            .into(),
                    ));
                }
                let p = need(secret, "cleartext password")?;
                messages::frontend_message(&mut out, frontend::PASSWORD, |b| {
                    b.put_slice(p.expose().as_bytes());
                    b.put_u8(0);
                });
            }
            auth::MD5_PASSWORD => {
                let salt = r.bytes(4).map_err(protocol)?;
                let p = need(secret, "md5")?;
                let stored = md5_password_hash(user, p.expose());
                let resp = md5_salted_response(&stored, [salt[0], salt[1], salt[2], salt[3]]);
                messages::frontend_message(&mut out, frontend::PASSWORD, |b| {
                    b.put_slice(resp.as_bytes());
                    b.put_u8(0);
                });
            }
            auth::SASL => {
                let mut offered = Vec::new();
                while let Ok(m) = r.cstr() {
                    if m.is_empty() {
                        break;
                    }
                    offered.push(m);
                }
                if !offered.contains(&"SCRAM-SHA-256") {
                    return Err(protocol(format!(
                        "server offers SASL mechanisms {offered:?}, none of which iampool supports"
                    )));
                }
                let p = need(secret, "SCRAM-SHA-256")?;
                let mut client = ScramClient::new(p.expose());
                let first = client.client_first();
                messages::frontend_message(&mut out, frontend::PASSWORD, |b| {
                    b.put_slice(b"SCRAM-SHA-256\0");
                    b.put_i32(first.len() as i32);
                    b.put_slice(&first);
                });
                scram = Some(client);
            }
            auth::SASL_CONTINUE => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| protocol("SASLContinue before SASL"))?;
                let fin = client
                    .handle_server_first(r.remaining())
                    .map_err(|e| protocol(format!("SCRAM: {e}")))?;
                messages::frontend_message(&mut out, frontend::PASSWORD, |b| b.put_slice(&fin));
            }
            auth::SASL_FINAL => {
                let client = scram
                    .as_ref()
                    .ok_or_else(|| protocol("SASLFinal before SASL"))?;
                client
                    .verify_server_final(r.remaining())
                    .map_err(|e| protocol(format!("SCRAM server signature: {e}")))?;
                continue;
            }
            other => {
                return Err(protocol(format!(
                    "unsupported authentication request {other}"
                )))
            }
        }
        stream.write_all(&out).await?;
        stream.flush().await?;
    }
}
