//! Client authentication: SCRAM-SHA-256 (server side), md5 and trust.
//!
//! Secrets are prepared once at start (a plain password becomes a SCRAM verifier and an md5
//! hash), so a login never runs PBKDF2 on the stored side. Unknown users go through the same
//! exchange against a stand-in verifier (a stable salt per name, derived from a per-process
//! secret, as PostgreSQL's mock authentication) with the same work, and fail the same way, so
//! a client cannot probe which user names exist.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use pgwire::messages::startup::Authentication;
use rand::RngCore;
use tokio::io::AsyncWriteExt;

use crate::config::{AuthType, UserSecret};
use crate::protocol::md5::{md5_password_hash, md5_verify};
use crate::protocol::messages::{self, frontend, sqlstate, BodyReader};
use crate::protocol::scram::{ScramError, ScramServer, ScramVerifier};
use crate::stream::{read_message, Stream};

/// Password messages during authentication are small.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// A client user's secrets, ready for either method.
#[derive(Clone)]
pub struct UserAuth {
    pub scram: Option<ScramVerifier>,
    pub md5: Option<String>,
}

/// Prepares every configured user's secrets.
pub fn prepare_users(
    users: &std::collections::BTreeMap<String, UserSecret>,
) -> Result<HashMap<String, UserAuth>, String> {
    let mut out = HashMap::new();
    for (name, secret) in users {
        let auth = match secret {
            UserSecret::Plain(p) => UserAuth {
                scram: Some(ScramVerifier::generate(p.expose())),
                md5: Some(md5_password_hash(name, p.expose())),
            },
            UserSecret::Md5(h) => UserAuth {
                scram: None,
                md5: Some(h.expose().to_owned()),
            },
            UserSecret::Scram(v) => UserAuth {
                scram: Some(
                    ScramVerifier::parse(v.expose()).map_err(|e| format!("user {name:?}: {e}"))?,
                ),
                md5: None,
            },
        };
        out.insert(name.clone(), auth);
    }
    Ok(out)
}

/// The key unknown users' stand-in verifiers are derived from: random, drawn once per process.
fn mock_secret() -> &'static [u8; 32] {
    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        let mut s = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut s);
        s
    })
}

/// Why authentication failed: (SQLSTATE, message) for the client's FATAL.
pub type AuthFailure = (&'static str, String);

fn failed(user: &str) -> AuthFailure {
    (
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

fn protocol(msg: impl Into<String>) -> AuthFailure {
    (sqlstate::PROTOCOL_VIOLATION, msg.into())
}

async fn send(stream: &mut Stream, auth: Authentication) -> Result<(), AuthFailure> {
    let mut b = BytesMut::new();
    messages::authentication(&mut b, auth);
    stream
        .write_all(&b)
        .await
        .map_err(|_| protocol("connection lost during authentication"))?;
    stream
        .flush()
        .await
        .map_err(|_| protocol("connection lost during authentication"))
}

async fn read_password(stream: &mut Stream, buf: &mut BytesMut) -> Result<BytesMut, AuthFailure> {
    let (tag, body) = read_message(stream, buf, MAX_AUTH_MESSAGE)
        .await
        .map_err(|e| protocol(format!("authentication: {e}")))?;
    if tag != frontend::PASSWORD {
        return Err(protocol(format!(
            "expected password response, got message type {tag}"
        )));
    }
    Ok(body)
}

/// Authenticates `user`; on success AuthenticationOk has been sent.
pub async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    auth_type: AuthType,
    users: &HashMap<String, UserAuth>,
    user: &str,
) -> Result<(), AuthFailure> {
    let entry = users.get(user);
    let ok = match auth_type {
        AuthType::Trust => true,
        // md5 when the stored secret allows it; a SCRAM-only secret upgrades to SCRAM, as PostgreSQL does.
        AuthType::Md5 if entry.is_none_or(|e| e.md5.is_some()) => {
            md5_exchange(stream, buf, entry.and_then(|e| e.md5.as_deref()), user).await?
        }
        AuthType::Md5 | AuthType::ScramSha256 => match entry {
            Some(UserAuth { scram: Some(v), .. }) => scram_exchange(stream, buf, v.clone()).await?,
            Some(UserAuth { md5: Some(h), .. }) => md5_exchange(stream, buf, Some(h), user).await?,
            _ => {
                // Unknown user: the same exchange against a stand-in verifier (the same salt
                // for the same name every time, and no more work than a real user's), failing
                // at the end exactly as a wrong password does.
                let mock = ScramVerifier::mock(mock_secret(), user);
                scram_exchange(stream, buf, mock).await?;
                false
            }
        },
    };
    if !ok {
        return Err(failed(user));
    }
    send(stream, Authentication::Ok).await
}

async fn md5_exchange(
    stream: &mut Stream,
    buf: &mut BytesMut,
    stored: Option<&str>,
    _user: &str,
) -> Result<bool, AuthFailure> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    send(stream, Authentication::MD5Password(salt.to_vec())).await?;
    let body = read_password(stream, buf).await?;
    let response = BodyReader::new(&body)
        .cbytes()
        .map_err(|_| protocol("malformed password message"))?;
    // An unknown user's answer is checked against a stand-in hash all the same, so both
    // cost the same.
    let mock;
    let hash = match stored {
        Some(h) => h,
        None => {
            mock = format!("md5{}", hex::encode(&mock_secret()[..16]));
            &mock
        }
    };
    let ok = md5_verify(hash, salt, response);
    Ok(stored.is_some() && ok)
}

async fn scram_exchange(
    stream: &mut Stream,
    buf: &mut BytesMut,
    verifier: ScramVerifier,
) -> Result<bool, AuthFailure> {
    send(
        stream,
        Authentication::SASL(vec!["SCRAM-SHA-256".to_owned()]),
    )
    .await?;
    let body = read_password(stream, buf).await?;
    let mut r = BodyReader::new(&body);
    let mechanism = r
        .cstr()
        .map_err(|_| protocol("malformed SASLInitialResponse"))?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(protocol(format!(
            "client selected an invalid SASL authentication mechanism {mechanism:?}"
        )));
    }
    let len = r
        .i32()
        .map_err(|_| protocol("malformed SASLInitialResponse"))?;
    let data = usize::try_from(len)
        .ok()
        .and_then(|n| r.bytes(n).ok())
        .ok_or_else(|| protocol("malformed SASLInitialResponse"))?;
    let mut server = ScramServer::new(verifier);
    let first = server.server_first(data).map_err(scram_failure)?;
    send(stream, Authentication::SASLContinue(Bytes::from(first))).await?;
    let body = read_password(stream, buf).await?;
    match server.server_final(&body) {
        Ok(fin) => {
            send(stream, Authentication::SASLFinal(Bytes::from(fin))).await?;
            Ok(true)
        }
        Err(ScramError::AuthFailed) => Ok(false),
        Err(e) => Err(scram_failure(e)),
    }
}

fn scram_failure(e: ScramError) -> AuthFailure {
    match e {
        ScramError::AuthFailed => (sqlstate::INVALID_PASSWORD, e.to_string()),
        other => protocol(other.to_string()),
    }
}
