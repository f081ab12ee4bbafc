//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: stored verifiers, the
//! server side of a client login and the client side of an upstream login. No I/O.
//!
//! Only `SCRAM-SHA-256` is offered, never `-PLUS`, so there is no channel binding: a client
//! may send the gs2 flag `n` or `y`, and `p=` is refused. The user name inside
//! client-first is ignored, as PostgreSQL does; the user comes from the startup packet.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The SASL mechanism name iampool offers and uses.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// Iterations used by [`ScramVerifier::generate`]; PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Largest iteration count the client side accepts from an upstream server.
///
/// Each iteration is one HMAC-SHA-256, so this caps one upstream login at a few seconds of
/// CPU: far above PostgreSQL's default of 4096 and anything a sane `scram_iterations`
/// uses, and low enough that a hostile or misconfigured server cannot stall a worker
/// for minutes. Stored verifiers may use anything PostgreSQL accepts (up to `i32::MAX`),
/// because the server side never runs PBKDF2.
pub const MAX_CLIENT_ITERATIONS: u32 = 10_000_000;

/// Longest SCRAM message either side accepts. Real messages are under 200 bytes; this only
/// bounds work on garbage.
pub const MAX_MESSAGE_LEN: usize = 4096;

const NONCE_RANDOM_BYTES: usize = 18;
const SALT_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// PostgreSQL keeps iteration counts in a signed int.
const MAX_VERIFIER_ITERATIONS: u32 = i32::MAX as u32;

type HmacSha256 = Hmac<Sha256>;

/// Why a SCRAM exchange stopped. Messages are static so that no client-supplied or secret
/// bytes can reach a log line or an error sent to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The peer sent a malformed or out-of-order message (SQLSTATE 08P01).
    #[error("malformed SCRAM message: {0}")]
    Protocol(&'static str),
    /// The client's proof did not match: wrong password (SQLSTATE 28P01).
    #[error("password authentication failed")]
    AuthFailed,
    /// The upstream server's signature did not match: it does not know the password, so it
    /// may not be the server we meant to reach.
    #[error("upstream server's SCRAM signature is invalid: it does not know the password (check the host, or a man in the middle)")]
    ServerSignature,
    /// The upstream server ended the exchange with `e=...`.
    #[error("upstream server rejected the SCRAM exchange")]
    ServerRejected,
    /// A stored verifier is not in PostgreSQL's `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` form.
    #[error("invalid SCRAM verifier: {0}; expected SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>")]
    InvalidVerifier(&'static str),
}

impl ScramError {
    /// The SQLSTATE to report to a client for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramError::Protocol(_) => "08P01",
            ScramError::AuthFailed => "28P01",
            ScramError::ServerSignature | ScramError::ServerRejected => "28000",
            ScramError::InvalidVerifier(_) => "XX000",
        }
    }
}

/// A stored SCRAM-SHA-256 secret, in the same form PostgreSQL keeps in `pg_authid`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>`.
    pub fn parse(text: &str) -> Result<ScramVerifier, ScramError> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::InvalidVerifier("missing SCRAM-SHA-256$ prefix"))?;
        let (iter_salt, keys) = rest
            .split_once('$')
            .ok_or(ScramError::InvalidVerifier("missing '$' before the keys"))?;
        let (iter, salt) = iter_salt
            .split_once(':')
            .ok_or(ScramError::InvalidVerifier(
                "missing ':' after the iteration count",
            ))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(ScramError::InvalidVerifier("missing ':' between the keys"))?;
        let iterations = parse_iterations(iter.as_bytes(), MAX_VERIFIER_ITERATIONS).ok_or(
            ScramError::InvalidVerifier("iteration count is not a number in 1..=2147483647"),
        )?;
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::InvalidVerifier("salt is not base64"))?;
        if salt.is_empty() {
            return Err(ScramError::InvalidVerifier("salt is empty"));
        }
        let stored_key = decode_key(stored).ok_or(ScramError::InvalidVerifier(
            "StoredKey is not 32 bytes of base64",
        ))?;
        let server_key = decode_key(server).ok_or(ScramError::InvalidVerifier(
            "ServerKey is not 32 bytes of base64",
        ))?;
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// Derives the verifier PostgreSQL would store for `password` with this salt and count.
    ///
    /// Panics if `iterations` is 0 (a caller bug, not input).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        assert!(iterations > 0, "SCRAM iteration count must be at least 1");
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A fresh verifier for `password` with a random 16-byte salt and 4096 iterations.
    pub fn generate(password: &str) -> ScramVerifier {
        let mut salt = [0u8; SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        ScramVerifier::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    /// The stand-in verifier for a user name that does not exist, as PostgreSQL's mock
    /// authentication: derived from `secret` (random per process) and the name, so the same
    /// name always gets the same salt, and built without PBKDF2 so the exchange costs what a
    /// real user's does. No password matches it: its keys are not derived from one.
    pub fn mock(secret: &[u8], user: &str) -> ScramVerifier {
        let derive = |what: &[u8]| {
            let mut m = Vec::with_capacity(what.len() + user.len());
            m.extend_from_slice(what);
            m.extend_from_slice(user.as_bytes());
            hmac(secret, &m)
        };
        ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: derive(b"salt\0")[..SALT_LEN].to_vec(),
            stored_key: derive(b"stored key\0"),
            server_key: derive(b"server key\0"),
        }
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }
}

impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// The keys are secrets (StoredKey plus a sniffed exchange is enough to log in), so Debug
/// shows only the public parameters.
impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt", &B64.encode(&self.salt))
            .finish_non_exhaustive()
    }
}

impl std::str::FromStr for ScramVerifier {
    type Err = ScramError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScramVerifier::parse(s)
    }
}

/// The gs2 channel-binding flag a client sent; both mean "no channel binding here".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gs2Flag {
    N,
    Y,
}

impl Gs2Flag {
    fn header(self) -> &'static [u8] {
        match self {
            Gs2Flag::N => b"n,,",
            Gs2Flag::Y => b"y,,",
        }
    }
}

enum ServerState {
    AwaitingClientFirst,
    AwaitingClientFinal {
        gs2: Gs2Flag,
        nonce: Vec<u8>,
        /// client-first-bare "," server-first ","; client-final-without-proof follows.
        auth_message_prefix: Vec<u8>,
    },
    Done,
}

/// The server side of one SCRAM-SHA-256 login.
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    state: ServerState,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    pub fn new(verifier: ScramVerifier) -> ScramServer {
        ScramServer::with_nonce(verifier, random_nonce())
    }

    fn with_nonce(verifier: ScramVerifier, server_nonce: String) -> ScramServer {
        ScramServer {
            verifier,
            server_nonce,
            state: ServerState::AwaitingClientFirst,
        }
    }

    /// Takes the client's SASLInitialResponse data and returns server-first-message.
    pub fn server_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ServerState::AwaitingClientFirst) {
            return Err(ScramError::Protocol("client-first-message out of order"));
        }
        // Any failure ends the exchange; there is no retry within one login.
        self.state = ServerState::Done;
        let first = parse_client_first(client_first)?;
        let mut nonce = first.client_nonce.to_vec();
        nonce.extend_from_slice(self.server_nonce.as_bytes());

        let mut server_first = Vec::with_capacity(nonce.len() + 64);
        server_first.extend_from_slice(b"r=");
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(B64.encode(&self.verifier.salt).as_bytes());
        server_first.extend_from_slice(format!(",i={}", self.verifier.iterations).as_bytes());

        let mut auth_message_prefix = Vec::with_capacity(256);
        auth_message_prefix.extend_from_slice(first.bare);
        auth_message_prefix.push(b',');
        auth_message_prefix.extend_from_slice(&server_first);
        auth_message_prefix.push(b',');

        self.state = ServerState::AwaitingClientFinal {
            gs2: first.gs2,
            nonce,
            auth_message_prefix,
        };
        Ok(server_first)
    }

    /// Takes client-final-message, checks the proof and returns server-final-message
    /// (`v=<ServerSignature>`). A wrong password is [`ScramError::AuthFailed`].
    pub fn server_final(&mut self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let ServerState::AwaitingClientFinal {
            gs2,
            nonce,
            auth_message_prefix,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(ScramError::Protocol("client-final-message out of order"));
        };
        let fin = parse_client_final(client_final)?;
        if B64.decode(fin.channel_binding).ok().as_deref() != Some(gs2.header()) {
            return Err(ScramError::Protocol(
                "channel binding data does not match the gs2 header of client-first-message",
            ));
        }
        if fin.nonce != nonce.as_slice() {
            return Err(ScramError::Protocol("nonce does not match"));
        }

        let mut auth_message = auth_message_prefix;
        auth_message.extend_from_slice(fin.without_proof);
        let client_signature = hmac(&self.verifier.stored_key, &auth_message);
        let mut client_key = fin.proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let candidate: [u8; KEY_LEN] = Sha256::digest(client_key).into();
        if !constant_time_eq(&candidate, &self.verifier.stored_key) {
            return Err(ScramError::AuthFailed);
        }
        let server_signature = hmac(&self.verifier.server_key, &auth_message);
        let mut out = b"v=".to_vec();
        out.extend_from_slice(B64.encode(server_signature).as_bytes());
        Ok(out)
    }
}

enum ClientState {
    Initial,
    FirstSent,
    FinalSent { server_signature: [u8; KEY_LEN] },
    Failed,
}

/// The client side of one SCRAM-SHA-256 login to an upstream server. Needs the plain
/// password: a stored verifier cannot produce a client proof.
pub struct ScramClient {
    password: String,
    client_first_bare: String,
    nonce: String,
    state: ClientState,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient").finish_non_exhaustive()
    }
}

impl ScramClient {
    pub fn new(password: &str) -> ScramClient {
        // libpq sends an empty user name; the server takes the user from the startup packet.
        ScramClient::with_parts(password, "", random_nonce())
    }

    fn with_parts(password: &str, user: &str, nonce: String) -> ScramClient {
        ScramClient {
            password: password.to_owned(),
            client_first_bare: format!("n={user},r={nonce}"),
            nonce,
            state: ClientState::Initial,
        }
    }

    /// client-first-message, for SASLInitialResponse.
    pub fn client_first(&mut self) -> Vec<u8> {
        self.state = ClientState::FirstSent;
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Takes server-first-message and returns client-final-message.
    pub fn handle_server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ClientState::FirstSent) {
            return Err(ScramError::Protocol("server-first-message out of order"));
        }
        self.state = ClientState::Failed;
        let first = parse_server_first(msg)?;
        if !first.nonce.starts_with(self.nonce.as_bytes()) || first.nonce.len() == self.nonce.len()
        {
            return Err(ScramError::Protocol(
                "server nonce does not extend the client nonce",
            ));
        }
        let salted = salted_password(&self.password, &first.salt, first.iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; KEY_LEN] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");

        // The nonce was checked to be printable ASCII.
        let nonce = std::str::from_utf8(first.nonce)
            .map_err(|_| ScramError::Protocol("server nonce is not printable"))?;
        let without_proof = format!("c=biws,r={nonce}");
        let mut auth_message = Vec::with_capacity(256);
        auth_message.extend_from_slice(self.client_first_bare.as_bytes());
        auth_message.push(b',');
        auth_message.extend_from_slice(msg);
        auth_message.push(b',');
        auth_message.extend_from_slice(without_proof.as_bytes());

        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(hmac(&stored_key, &auth_message)) {
            *p ^= s;
        }
        self.state = ClientState::FinalSent {
            server_signature: hmac(&server_key, &auth_message),
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks server-final-message: the server must prove it knows the password too.
    pub fn verify_server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let ClientState::FinalSent { server_signature } = &self.state else {
            return Err(ScramError::Protocol("server-final-message out of order"));
        };
        if msg.len() > MAX_MESSAGE_LEN {
            return Err(ScramError::Protocol("message too long"));
        }
        if msg.starts_with(b"e=") {
            return Err(ScramError::ServerRejected);
        }
        let mut attrs = Attrs::new(msg);
        let v = attrs.expect(b'v')?;
        // Extensions after the verifier are allowed by RFC 5802 and ignored.
        let got = decode_key_bytes(v).ok_or(ScramError::Protocol(
            "server signature is not 32 bytes of base64",
        ))?;
        if constant_time_eq(&got, server_signature) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

struct ClientFirst<'a> {
    gs2: Gs2Flag,
    bare: &'a [u8],
    client_nonce: &'a [u8],
}

fn parse_client_first(msg: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Protocol("message too long"));
    }
    let gs2 = match msg.first() {
        Some(b'n') => Gs2Flag::N,
        Some(b'y') => Gs2Flag::Y,
        Some(b'p') => {
            return Err(ScramError::Protocol(
                "client requires channel binding, but SCRAM-SHA-256 without channel binding was selected",
            ))
        }
        _ => return Err(ScramError::Protocol("unexpected gs2 channel-binding flag")),
    };
    if msg.get(1) != Some(&b',') {
        return Err(ScramError::Protocol("expected ',' after the gs2 flag"));
    }
    if msg.get(2) != Some(&b',') {
        return Err(ScramError::Protocol(
            "authorization identity is not supported",
        ));
    }
    let bare = &msg[3..];
    let mut attrs = Attrs::new(bare);
    if attrs.peek_name() == Some(b'm') {
        return Err(ScramError::Protocol(
            "mandatory extensions are not supported",
        ));
    }
    // PostgreSQL ignores the user name; the user is the one from the startup packet.
    attrs.expect(b'n')?;
    let client_nonce = attrs.expect(b'r')?;
    check_nonce(client_nonce)?;
    while !attrs.is_empty() {
        attrs.any()?;
    }
    Ok(ClientFirst {
        gs2,
        bare,
        client_nonce,
    })
}

struct ClientFinal<'a> {
    channel_binding: &'a [u8],
    nonce: &'a [u8],
    without_proof: &'a [u8],
    proof: [u8; KEY_LEN],
}

fn parse_client_final(msg: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Protocol("message too long"));
    }
    let mut attrs = Attrs::new(msg);
    let channel_binding = attrs.expect(b'c')?;
    let nonce = attrs.expect(b'r')?;
    loop {
        let start = attrs.offset();
        let (name, value) = attrs
            .any()
            .map_err(|_| ScramError::Protocol("missing client proof"))?;
        if name == b'p' {
            if !attrs.is_empty() {
                return Err(ScramError::Protocol(
                    "client proof must be the last attribute",
                ));
            }
            // `start` is just past the ',' that precedes "p=".
            let without_proof = &msg[..start.saturating_sub(1)];
            let proof = decode_key_bytes(value).ok_or(ScramError::Protocol(
                "client proof is not 32 bytes of base64",
            ))?;
            return Ok(ClientFinal {
                channel_binding,
                nonce,
                without_proof,
                proof,
            });
        }
    }
}

struct ServerFirst<'a> {
    nonce: &'a [u8],
    salt: Vec<u8>,
    iterations: u32,
}

fn parse_server_first(msg: &[u8]) -> Result<ServerFirst<'_>, ScramError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Protocol("message too long"));
    }
    let mut attrs = Attrs::new(msg);
    if attrs.peek_name() == Some(b'm') {
        return Err(ScramError::Protocol(
            "mandatory extensions are not supported",
        ));
    }
    let nonce = attrs.expect(b'r')?;
    check_nonce(nonce)?;
    let salt = B64
        .decode(attrs.expect(b's')?)
        .map_err(|_| ScramError::Protocol("salt is not base64"))?;
    if salt.is_empty() {
        return Err(ScramError::Protocol("salt is empty"));
    }
    let iterations = parse_iterations(attrs.expect(b'i')?, MAX_CLIENT_ITERATIONS).ok_or(
        ScramError::Protocol("iteration count is not in 1..=10000000"),
    )?;
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// A cursor over `a=value,b=value` attribute lists; never panics on any input.
struct Attrs<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Attrs<'a> {
    fn new(buf: &'a [u8]) -> Attrs<'a> {
        Attrs { buf, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn offset(&self) -> usize {
        self.pos
    }

    fn peek_name(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// The next attribute, whatever its name. Names are single ASCII letters.
    fn any(&mut self) -> Result<(u8, &'a [u8]), ScramError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let (&name, after) = rest
            .split_first()
            .ok_or(ScramError::Protocol("unexpected end of message"))?;
        if !name.is_ascii_alphabetic() || after.first() != Some(&b'=') {
            return Err(ScramError::Protocol("expected an attribute"));
        }
        let value_start = self.pos + 2;
        let tail = self.buf.get(value_start..).unwrap_or_default();
        let len = tail.iter().position(|&b| b == b',').unwrap_or(tail.len());
        let value = &tail[..len];
        // Skip the value and its trailing ',' (if any); a trailing ',' with nothing after
        // it is malformed.
        self.pos = value_start + len;
        if self.pos < self.buf.len() {
            self.pos += 1;
            if self.pos == self.buf.len() {
                return Err(ScramError::Protocol("trailing ','"));
            }
        }
        Ok((name, value))
    }

    fn expect(&mut self, name: u8) -> Result<&'a [u8], ScramError> {
        match self.any() {
            Ok((n, value)) if n == name => Ok(value),
            Ok(_) => Err(ScramError::Protocol(match name {
                b'n' => "expected user name attribute 'n='",
                b'r' => "expected nonce attribute 'r='",
                b's' => "expected salt attribute 's='",
                b'i' => "expected iteration count attribute 'i='",
                b'c' => "expected channel binding attribute 'c='",
                b'v' => "expected server signature attribute 'v='",
                _ => "unexpected attribute",
            })),
            Err(e) => Err(e),
        }
    }
}

/// RFC 5802: a nonce is one or more printable ASCII characters other than ','.
fn check_nonce(nonce: &[u8]) -> Result<(), ScramError> {
    if nonce.is_empty()
        || !nonce
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        return Err(ScramError::Protocol("nonce is empty or not printable"));
    }
    Ok(())
}

fn parse_iterations(digits: &[u8], max: u32) -> Option<u32> {
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (1..=u64::from(max)).contains(&n).then_some(n as u32)
}

fn decode_key(text: &str) -> Option<[u8; KEY_LEN]> {
    decode_key_bytes(text.as_bytes())
}

fn decode_key_bytes(text: &[u8]) -> Option<[u8; KEY_LEN]> {
    // 32 bytes encode to 44 characters; refuse anything longer before decoding.
    if text.len() != 44 {
        return None;
    }
    B64.decode(text).ok()?.try_into().ok()
}

fn random_nonce() -> String {
    let mut raw = [0u8; NONCE_RANDOM_BYTES];
    OsRng.fill_bytes(&mut raw);
    B64.encode(raw)
}

/// PostgreSQL runs the password through SASLprep, and uses the raw bytes when that fails
/// (invalid UTF-8 cannot occur in a `&str`; prohibited or unassigned characters can).
fn normalize_password(password: &str) -> std::borrow::Cow<'_, str> {
    match stringprep::saslprep(password) {
        Ok(prepared) if !prepared.is_empty() || password.is_empty() => prepared,
        _ => std::borrow::Cow::Borrowed(password),
    }
}

fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(
        normalize_password(password).as_bytes(),
        salt,
        iterations,
        &mut out,
    );
    out
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; KEY_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Compares without an early exit, so timing does not reveal how many bytes matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    /// The RFC 7677 secret, computed independently with Python's hashlib/hmac.
    const RFC_VERIFIER: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    fn rfc_verifier() -> ScramVerifier {
        ScramVerifier::parse(RFC_VERIFIER).unwrap()
    }

    fn with_salt_of(verifier: &str, password: &str) -> String {
        let v = ScramVerifier::parse(verifier).unwrap();
        ScramVerifier::from_password(password, v.salt(), v.iterations()).to_string()
    }

    #[test]
    fn verifier_matches_independent_computation() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::from_password("pencil", &salt, 4096);
        assert_eq!(v.to_string(), RFC_VERIFIER);
        assert_eq!(rfc_verifier(), v);
    }

    /// Verifiers produced by PostgreSQL 15 (`CREATE ROLE ... PASSWORD`, scram-sha-256),
    /// including passwords SASLprep changes and passwords it rejects (then raw bytes count).
    #[test]
    fn verifiers_match_postgresql() {
        let cases = [
            ("pencil", "SCRAM-SHA-256$4096:/Ch9JkLUWaWqHQ98DQai6g==$ccTfxgO9R2UQmuXj8PyRm7ObscAHXar88fiY7yYFzzM=:xOWBfPc0QpBFWt/MTuPDyTPsL182aR5PPY82W0vEV50="),
            // Soft hyphen maps to nothing; ROMAN NUMERAL NINE NFKC-normalises to "IX".
            ("I\u{AD}X\u{2168}", "SCRAM-SHA-256$4096:psnAT8oQwDyLObbPSzmpZg==$5gygA9hl7rBmPMxKyLHgkEebu4OqseFaivDcAbcxP+k=:FYCPKQ4hKRbkx9AMmnPPD9zm8WmijBUdz5T5EitTDXs="),
            // U+FFFD is prohibited: raw bytes.
            ("\u{E9}\u{FFFD}", "SCRAM-SHA-256$4096:CL3H/dFuMwbHx3R5hCT+Kg==$37LDmUsUV9FW6RlCVvpdgX+ykp4KQwW8eXu2TQbfJ6k=:n0UYgKLZH58W4um+FPK1eS/jqdKSF0H25Oa1zzXlpvI="),
            // ASCII control character: PostgreSQL passes ASCII through untouched.
            ("a\u{7}b", "SCRAM-SHA-256$4096:YVpOPNMdgHD59men2WMoQw==$F4R+/Tlkyu36UItvFC3frwoGjOb5IvOqY2WN1emb5Bw=:lmobgTUZG+GXxvmIdUbNxnU3zXQhVvB59Np6RhHnbV8="),
            // Combining acute accent composes under NFKC.
            ("e\u{301}", "SCRAM-SHA-256$4096:tnvBzk4cbh/5EPxJPeltMw==$kFOC41JO3dgCr7vxABVmF3f5NdlAprkerdHKYM7POic=:QA1m/z3lPavBVkYtqNAQ97fWxOIPpslj11qrgC6re4k="),
            // Maps to the empty string, which PostgreSQL refuses: raw bytes.
            ("\u{AD}", "SCRAM-SHA-256$4096:6GRnQJdvHdXX3gkF6EVkug==$Nh/ETPCJUQpYWDlvodW+0/vhdAcWfF9ae+HYqTAG/Ms=:ZnRzPOBqAF3tuqoHPeRSLD4DpRXA3wJArK5wY/QX4oY="),
            // Bidi violation (RandALCat then LCat): raw bytes.
            ("\u{5D0}a", "SCRAM-SHA-256$4096:LWvaqwYdOmyJj7qv7tjTzQ==$5lSGiQLN0huyA/jeyo0eoQgfGL61Qn7fS0po6tb0CSg=:0wGMd/0+OPGj7kvL2GtIiqgvWBeszyQeCarArmLMFxs="),
        ];
        for (password, pg) in cases {
            assert_eq!(with_salt_of(pg, password), pg, "password {password:?}");
        }
    }

    #[test]
    fn generate_round_trips_and_differs() {
        let a = ScramVerifier::generate("pw");
        let b = ScramVerifier::generate("pw");
        assert_eq!(a.iterations(), DEFAULT_ITERATIONS);
        assert_eq!(a.salt().len(), 16);
        assert_ne!(a, b);
        assert_eq!(ScramVerifier::parse(&a.to_string()).unwrap(), a);
        assert_eq!(a.to_string().parse::<ScramVerifier>().unwrap(), a);
    }

    #[test]
    fn debug_hides_keys() {
        let shown = format!("{:?}", rfc_verifier());
        assert!(!shown.contains("WG5d8oPm"), "{shown}");
        assert!(!format!("{:?}", ScramClient::new("hunter2")).contains("hunter2"));
    }

    #[test]
    fn verifier_parse_rejects_malformed() {
        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$2147483648:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$-1:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$4096:$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$4096:!!!$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=:x",
        ] {
            assert!(
                matches!(ScramVerifier::parse(bad), Err(ScramError::InvalidVerifier(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rfc7677_client_byte_for_byte() {
        let mut client = ScramClient::with_parts("pencil", "user", RFC_CLIENT_NONCE.into());
        assert_eq!(client.client_first(), RFC_CLIENT_FIRST.as_bytes());
        let fin = client
            .handle_server_first(RFC_SERVER_FIRST.as_bytes())
            .unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), RFC_CLIENT_FINAL);
        client
            .verify_server_final(RFC_SERVER_FINAL.as_bytes())
            .unwrap();
    }

    #[test]
    fn rfc7677_server_byte_for_byte() {
        let mut server = ScramServer::with_nonce(rfc_verifier(), RFC_SERVER_NONCE.into());
        let first = server.server_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(first).unwrap(), RFC_SERVER_FIRST);
        let fin = server.server_final(RFC_CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), RFC_SERVER_FINAL);
    }

    fn run(client_password: &str, verifier: ScramVerifier) -> Result<(), ScramError> {
        let mut client = ScramClient::new(client_password);
        let mut server = ScramServer::new(verifier);
        let first = server.server_first(&client.client_first())?;
        let fin = client.handle_server_first(&first)?;
        let server_final = server.server_final(&fin)?;
        client.verify_server_final(&server_final)
    }

    #[test]
    fn client_and_server_agree() {
        run("s3cret", ScramVerifier::generate("s3cret")).unwrap();
        run("I\u{AD}X", ScramVerifier::generate("IX")).unwrap();
        assert_eq!(
            run("wrong", ScramVerifier::generate("s3cret")),
            Err(ScramError::AuthFailed)
        );
        assert_eq!(ScramError::AuthFailed.sqlstate(), "28P01");
        assert_eq!(ScramError::Protocol("x").sqlstate(), "08P01");
    }

    #[test]
    fn client_nonce_is_random_and_long() {
        let a = ScramClient::new("p").client_first();
        let b = ScramClient::new("p").client_first();
        assert_ne!(a, b);
        assert!(a.starts_with(b"n,,n=,r="));
        assert_eq!(a.len(), "n,,n=,r=".len() + 24);
    }

    #[test]
    fn server_accepts_y_flag_and_rejects_channel_binding() {
        let mut server = ScramServer::with_nonce(rfc_verifier(), RFC_SERVER_NONCE.into());
        server
            .server_first(b"y,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        // "c=" must then carry base64("y,,") = "eSws", so the RFC's "biws" is refused.
        assert!(matches!(
            server.server_final(RFC_CLIENT_FINAL.as_bytes()),
            Err(ScramError::Protocol(_))
        ));

        let mut server = ScramServer::new(rfc_verifier());
        assert!(matches!(
            server.server_first(b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::Protocol(_))
        ));
        let mut server = ScramServer::new(rfc_verifier());
        assert!(matches!(
            server.server_first(b"n,a=admin,n=,r=abc"),
            Err(ScramError::Protocol(_))
        ));
        let mut server = ScramServer::new(rfc_verifier());
        assert!(matches!(
            server.server_first(b"n,,m=ext,n=,r=abc"),
            Err(ScramError::Protocol(_))
        ));
    }

    #[test]
    fn server_rejects_wrong_nonce_and_misordered_calls() {
        let mut server = ScramServer::with_nonce(rfc_verifier(), "other".into());
        server.server_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        assert!(matches!(
            server.server_final(RFC_CLIENT_FINAL.as_bytes()),
            Err(ScramError::Protocol(_))
        ));
        // The exchange is over after a failure.
        assert!(server.server_final(RFC_CLIENT_FINAL.as_bytes()).is_err());
        assert!(server.server_first(RFC_CLIENT_FIRST.as_bytes()).is_err());

        let mut server = ScramServer::new(rfc_verifier());
        assert!(server.server_final(RFC_CLIENT_FINAL.as_bytes()).is_err());
    }

    #[test]
    fn server_rejects_tampered_proof() {
        let mut server = ScramServer::with_nonce(rfc_verifier(), RFC_SERVER_NONCE.into());
        server.server_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        let tampered = RFC_CLIENT_FINAL.replace("p=dHzb", "p=dHzc");
        assert_eq!(
            server.server_final(tampered.as_bytes()),
            Err(ScramError::AuthFailed)
        );
    }

    #[test]
    fn client_rejects_foreign_nonce_bad_iterations_and_bad_signature() {
        let fresh = || {
            let mut c = ScramClient::with_parts("pencil", "user", RFC_CLIENT_NONCE.into());
            c.client_first();
            c
        };
        for bad in [
            "r=XXprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=10000001",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999999999999",
            "r=rOprNGfwEbeRWgbNEkqOx,s=,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==",
            "m=x,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        ] {
            assert!(
                matches!(
                    fresh().handle_server_first(bad.as_bytes()),
                    Err(ScramError::Protocol(_))
                ),
                "{bad}"
            );
        }
        let mut c = fresh();
        c.handle_server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(
            c.verify_server_final(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::ServerSignature)
        );
        assert_eq!(
            c.verify_server_final(b"e=invalid-proof"),
            Err(ScramError::ServerRejected)
        );
        assert!(matches!(
            c.verify_server_final(b"v=short"),
            Err(ScramError::Protocol(_))
        ));
        // Out of order: no server-first handled yet.
        assert!(fresh()
            .verify_server_final(RFC_SERVER_FINAL.as_bytes())
            .is_err());
    }

    /// Feeds truncations, garbage and huge inputs to every parser; none may panic.
    #[test]
    fn never_panics_on_garbage() {
        let mut inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0; 100_000],
            vec![b','; 5000],
            b"n".to_vec(),
            b"n,".to_vec(),
            b"n,,".to_vec(),
            b"n,,n".to_vec(),
            b"n,,n=".to_vec(),
            b"n,,n=,".to_vec(),
            b"n,,n=,r".to_vec(),
            b"n,,n=,r=".to_vec(),
            b"n,,n=,r=a,".to_vec(),
            b"=,=,=".to_vec(),
            b"c=,r=,p=".to_vec(),
            b"c=biws,r=x,p=,p=".to_vec(),
            "n,,n=\u{e9},r=\u{e9}".as_bytes().to_vec(),
        ];
        for msg in [
            RFC_CLIENT_FIRST,
            RFC_SERVER_FIRST,
            RFC_CLIENT_FINAL,
            RFC_SERVER_FINAL,
        ] {
            for end in 0..=msg.len() {
                inputs.push(msg.as_bytes()[..end].to_vec());
            }
        }
        let mut rng = rand::thread_rng();
        for _ in 0..2000 {
            let len = (rng.next_u32() % 200) as usize;
            let mut buf = vec![0u8; len];
            rng.fill_bytes(&mut buf);
            // Bias towards the characters the grammar cares about.
            for b in buf.iter_mut() {
                if *b < 64 {
                    *b = b",=nrcpsiv"[(*b as usize) % 9];
                }
            }
            inputs.push(buf);
        }
        let cheap_first = RFC_SERVER_FIRST.replace("i=4096", "i=1");
        for input in &inputs {
            let mut server = ScramServer::with_nonce(rfc_verifier(), RFC_SERVER_NONCE.into());
            let _ = server.server_first(input);
            let mut server = ScramServer::with_nonce(rfc_verifier(), RFC_SERVER_NONCE.into());
            server.server_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
            let _ = server.server_final(input);

            let mut client = ScramClient::with_parts("pencil", "user", RFC_CLIENT_NONCE.into());
            client.client_first();
            // Only the RFC message's own prefixes get past the nonce check to PBKDF2.
            let _ = client.handle_server_first(input);
            let mut client = ScramClient::with_parts("pencil", "user", RFC_CLIENT_NONCE.into());
            client.client_first();
            // One iteration keeps this loop fast in debug builds.
            client.handle_server_first(cheap_first.as_bytes()).unwrap();
            let _ = client.verify_server_final(input);

            let _ = ScramVerifier::parse(&String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
