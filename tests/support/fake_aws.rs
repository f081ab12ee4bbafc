//! Fake AWS credential endpoints on 127.0.0.1 for tests: ECS container credentials, IMDSv2, STS.
//!
//! Each fake is a tiny hand-rolled HTTP/1.1 server (one request per connection,
//! `Connection: close`) with request counters, a [`FailMode`] switch for "endpoint down"
//! scenarios, and a configurable credential lifetime so tests can rotate keys quickly.
//! Keys are derived deterministically from a seed (the role ARN for STS) and a generation
//! that advances when the previous keys expire (or on `rotate()`), so a test can assert
//! which keys signed a token and write the token verifier's key file with
//! [`verifier_keys_json`].
//!
//! Point aws-config at them with `AWS_CONTAINER_CREDENTIALS_FULL_URI` = [`FakeEcs::uri`],
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT` = [`FakeImds::endpoint`], `AWS_ENDPOINT_URL_STS`
//! (or `SdkConfig` `endpoint_url`) = [`FakeSts::endpoint`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How a fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Normal answers.
    Healthy,
    /// Every request gets `500 Internal Server Error`.
    Status500,
    /// Every connection is closed without an answer.
    Close,
}

/// Keys a fake has handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedKey {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
}

impl IssuedKey {
    /// `Expiration` as the AWS APIs write it: RFC 3339, whole seconds, UTC.
    pub fn expiration_rfc3339(&self) -> String {
        rfc3339(self.expiration)
    }
}

/// The token verifier's key file: `{"AKID": {"secret": "...", "expires": "RFC3339"}}`.
pub fn verifier_keys_json(keys: &[IssuedKey]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|k| {
            (
                k.access_key_id.clone(),
                serde_json::json!({
                    "secret": k.secret_access_key,
                    "expires": k.expiration_rfc3339(),
                }),
            )
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// Deterministic keys for `(seed, generation)`: `ASIA` + 12 hex of SHA-256(seed) + 4 hex of
/// the generation (20 characters, like real access key ids).
pub fn derive_key(seed: &str, generation: u64, expiration: SystemTime) -> IssuedKey {
    let seed_hash = hex::encode_upper(Sha256::digest(seed.as_bytes()));
    let full = hex::encode(Sha256::digest(format!("{seed}#{generation}").as_bytes()));
    IssuedKey {
        access_key_id: format!("ASIA{}{:04X}", &seed_hash[..12], generation & 0xffff),
        secret_access_key: format!("fake/{}+k", &full[..30]),
        session_token: format!("FakeSessionToken//{}+=", &full[30..]),
        expiration,
    }
}

// ---------------------------------------------------------------------------------------------
// Key issuing shared by the fakes

#[derive(Debug)]
struct Issuer {
    ttl: Mutex<Duration>,
    /// Per seed: (generation, current key).
    current: Mutex<HashMap<String, (u64, IssuedKey)>>,
    issued: Mutex<Vec<IssuedKey>>,
}

impl Issuer {
    fn new(ttl: Duration) -> Self {
        Issuer {
            ttl: Mutex::new(ttl),
            current: Mutex::new(HashMap::new()),
            issued: Mutex::new(Vec::new()),
        }
    }

    /// The seed's current keys; new ones once they have expired.
    fn key_for(&self, seed: &str) -> IssuedKey {
        let now = SystemTime::now();
        let mut current = lock(&self.current);
        match current.get(seed) {
            Some((_, key)) if key.expiration > now => key.clone(),
            existing => {
                let generation = existing.map_or(0, |(g, _)| g + 1);
                self.issue(&mut current, seed, generation)
            }
        }
    }

    fn issue(
        &self,
        current: &mut HashMap<String, (u64, IssuedKey)>,
        seed: &str,
        generation: u64,
    ) -> IssuedKey {
        let expiration = whole_seconds(SystemTime::now() + *lock(&self.ttl));
        let key = derive_key(seed, generation, expiration);
        current.insert(seed.to_owned(), (generation, key.clone()));
        lock(&self.issued).push(key.clone());
        key
    }

    /// Forces new keys for every seed on the next request.
    fn rotate(&self) {
        let mut current = lock(&self.current);
        for (_, key) in current.values_mut() {
            key.expiration = SystemTime::UNIX_EPOCH;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ECS container credentials

/// `AWS_CONTAINER_CREDENTIALS_FULL_URI` endpoint: `GET /creds` answers
/// `{AccessKeyId, SecretAccessKey, Token, Expiration}`.
pub struct FakeEcs {
    server: Server,
    state: Arc<EcsState>,
}

struct EcsState {
    issuer: Issuer,
    auth_token: Mutex<Option<String>>,
    requests: AtomicU64,
    unauthorized: AtomicU64,
}

impl FakeEcs {
    /// Starts with credentials that live `ttl`.
    pub async fn start(ttl: Duration) -> FakeEcs {
        let state = Arc::new(EcsState {
            issuer: Issuer::new(ttl),
            auth_token: Mutex::new(None),
            requests: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
        });
        let s = Arc::clone(&state);
        let server = Server::start(move |req| ecs_answer(&s, req)).await;
        FakeEcs { server, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }
    /// Value for `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub fn uri(&self) -> String {
        format!("http://{}/creds", self.server.addr)
    }
    /// Require `Authorization: <token>` (`AWS_CONTAINER_AUTHORIZATION_TOKEN`).
    pub fn require_authorization(&self, token: Option<&str>) {
        *lock(&self.state.auth_token) = token.map(str::to_owned);
    }
    pub fn set_fail(&self, mode: FailMode) {
        self.server.set_fail(mode);
    }
    pub fn set_ttl(&self, ttl: Duration) {
        *lock(&self.state.issuer.ttl) = ttl;
    }
    pub fn rotate(&self) {
        self.state.issuer.rotate();
    }
    /// Credential requests answered (successfully or not), excluding forced failures.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }
    /// Every connection, including forced failures.
    pub fn connections(&self) -> u64 {
        self.server.connections()
    }
    pub fn unauthorized(&self) -> u64 {
        self.state.unauthorized.load(Ordering::SeqCst)
    }
    pub fn issued(&self) -> Vec<IssuedKey> {
        lock(&self.state.issuer.issued).clone()
    }
    /// Keys a request now would get.
    pub fn current_key(&self) -> IssuedKey {
        self.state.issuer.key_for("ecs")
    }
}

fn ecs_answer(state: &EcsState, req: &Request) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if req.method != "GET" || req.path_only() != "/creds" {
        return Response::text(404, "not found");
    }
    if let Some(expected) = lock(&state.auth_token).as_deref() {
        if req.header("authorization") != Some(expected) {
            state.unauthorized.fetch_add(1, Ordering::SeqCst);
            return Response::text(401, "unauthorized");
        }
    }
    let key = state.issuer.key_for("ecs");
    let body = serde_json::json!({
        "AccessKeyId": key.access_key_id,
        "SecretAccessKey": key.secret_access_key,
        "Token": key.session_token,
        "Expiration": key.expiration_rfc3339(),
        "RoleArn": "arn:aws:iam::111122223333:role/fake-ecs-task",
    });
    Response::json(200, body.to_string())
}

// ---------------------------------------------------------------------------------------------
// IMDSv2

/// `AWS_EC2_METADATA_SERVICE_ENDPOINT` endpoint: the IMDSv2 token PUT and the
/// `iam/security-credentials/` role name and credentials, which require the token header.
pub struct FakeImds {
    server: Server,
    state: Arc<ImdsState>,
}

struct ImdsState {
    issuer: Issuer,
    role: String,
    session_tokens: Mutex<Vec<String>>,
    token_puts: AtomicU64,
    role_gets: AtomicU64,
    credential_gets: AtomicU64,
    unauthorized: AtomicU64,
}

const IMDS_CREDS: &str = "/latest/meta-data/iam/security-credentials/";

impl FakeImds {
    pub async fn start(role: &str, ttl: Duration) -> FakeImds {
        let state = Arc::new(ImdsState {
            issuer: Issuer::new(ttl),
            role: role.to_owned(),
            session_tokens: Mutex::new(Vec::new()),
            token_puts: AtomicU64::new(0),
            role_gets: AtomicU64::new(0),
            credential_gets: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
        });
        let s = Arc::clone(&state);
        let server = Server::start(move |req| imds_answer(&s, req)).await;
        FakeImds { server, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }
    /// Value for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/", self.server.addr)
    }
    pub fn set_fail(&self, mode: FailMode) {
        self.server.set_fail(mode);
    }
    pub fn set_ttl(&self, ttl: Duration) {
        *lock(&self.state.issuer.ttl) = ttl;
    }
    pub fn rotate(&self) {
        self.state.issuer.rotate();
    }
    pub fn token_puts(&self) -> u64 {
        self.state.token_puts.load(Ordering::SeqCst)
    }
    pub fn role_gets(&self) -> u64 {
        self.state.role_gets.load(Ordering::SeqCst)
    }
    pub fn credential_gets(&self) -> u64 {
        self.state.credential_gets.load(Ordering::SeqCst)
    }
    /// Metadata requests refused for a missing or unknown token.
    pub fn unauthorized(&self) -> u64 {
        self.state.unauthorized.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> u64 {
        self.server.connections()
    }
    pub fn issued(&self) -> Vec<IssuedKey> {
        lock(&self.state.issuer.issued).clone()
    }
}

fn imds_answer(state: &ImdsState, req: &Request) -> Response {
    if req.method == "PUT" && req.path_only() == "/latest/api/token" {
        let Some(ttl) = req.header("x-aws-ec2-metadata-token-ttl-seconds") else {
            return Response::text(400, "missing ttl");
        };
        let ttl = ttl.to_owned();
        let n = state.token_puts.fetch_add(1, Ordering::SeqCst);
        let token = format!("FakeImdsToken{n:04}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==");
        lock(&state.session_tokens).push(token.clone());
        let mut resp = Response::text(200, &token);
        resp.headers
            .push(("X-aws-ec2-metadata-token-ttl-seconds".into(), ttl));
        return resp;
    }
    if req.method != "GET" {
        return Response::text(405, "method not allowed");
    }
    let authorized = req
        .header("x-aws-ec2-metadata-token")
        .is_some_and(|t| lock(&state.session_tokens).iter().any(|known| known == t));
    if !authorized {
        state.unauthorized.fetch_add(1, Ordering::SeqCst);
        return Response::text(401, "");
    }
    let path = req.path_only();
    if path == IMDS_CREDS {
        state.role_gets.fetch_add(1, Ordering::SeqCst);
        return Response::text(200, &state.role);
    }
    if path.strip_prefix(IMDS_CREDS) == Some(state.role.as_str()) {
        state.credential_gets.fetch_add(1, Ordering::SeqCst);
        let key = state.issuer.key_for(&state.role);
        let body = serde_json::json!({
            "Code": "Success",
            "LastUpdated": rfc3339(whole_seconds(SystemTime::now())),
            "Type": "AWS-HMAC",
            "AccessKeyId": key.access_key_id,
            "SecretAccessKey": key.secret_access_key,
            "Token": key.session_token,
            "Expiration": key.expiration_rfc3339(),
        });
        return Response::json(200, body.to_string());
    }
    Response::text(404, "not found")
}

// ---------------------------------------------------------------------------------------------
// STS

/// One STS call as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsCall {
    /// `AssumeRole` or `AssumeRoleWithWebIdentity`.
    pub action: String,
    pub role_arn: String,
    pub role_session_name: Option<String>,
    pub external_id: Option<String>,
    /// Access key id from the SigV4 `Authorization` header (`None` when unsigned).
    pub caller_access_key_id: Option<String>,
    pub web_identity_token: Option<String>,
    /// Access key id handed back (`None` when refused).
    pub issued_access_key_id: Option<String>,
}

/// `AWS_ENDPOINT_URL_STS` endpoint: form-encoded `AssumeRole` / `AssumeRoleWithWebIdentity`,
/// answered with the XML real STS returns. Keys derive from the role ARN
/// (see [`FakeSts::key_for`]).
pub struct FakeSts {
    server: Server,
    state: Arc<StsState>,
}

struct StsState {
    issuer: Issuer,
    calls: Mutex<Vec<StsCall>>,
    /// Role ARN -> the ExternalId its trust policy demands.
    external_ids: Mutex<HashMap<String, String>>,
    /// Role ARN -> the only caller access key ids it trusts.
    trusted_callers: Mutex<HashMap<String, Vec<String>>>,
    requests: AtomicU64,
}

impl FakeSts {
    pub async fn start(ttl: Duration) -> FakeSts {
        let state = Arc::new(StsState {
            issuer: Issuer::new(ttl),
            calls: Mutex::new(Vec::new()),
            external_ids: Mutex::new(HashMap::new()),
            trusted_callers: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        });
        let s = Arc::clone(&state);
        let server = Server::start(move |req| sts_answer(&s, req)).await;
        FakeSts { server, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }
    /// Value for `AWS_ENDPOINT_URL_STS`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr)
    }
    pub fn set_fail(&self, mode: FailMode) {
        self.server.set_fail(mode);
    }
    pub fn set_ttl(&self, ttl: Duration) {
        *lock(&self.state.issuer.ttl) = ttl;
    }
    pub fn rotate(&self) {
        self.state.issuer.rotate();
    }
    /// Refuse `AssumeRole` on `role_arn` unless `ExternalId` equals `external_id`.
    pub fn require_external_id(&self, role_arn: &str, external_id: &str) {
        lock(&self.state.external_ids).insert(role_arn.to_owned(), external_id.to_owned());
    }
    /// Refuse `AssumeRole` on `role_arn` unless signed by one of these access key ids.
    pub fn trust_only(&self, role_arn: &str, caller_access_key_ids: &[&str]) {
        lock(&self.state.trusted_callers).insert(
            role_arn.to_owned(),
            caller_access_key_ids
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        );
    }
    pub fn calls(&self) -> Vec<StsCall> {
        lock(&self.state.calls).clone()
    }
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> u64 {
        self.server.connections()
    }
    pub fn issued(&self) -> Vec<IssuedKey> {
        lock(&self.state.issuer.issued).clone()
    }
    /// The access key id `role_arn`'s first credentials get (generation 0).
    pub fn key_for(role_arn: &str) -> String {
        derive_key(role_arn, 0, SystemTime::UNIX_EPOCH).access_key_id
    }
}

fn sts_answer(state: &StsState, req: &Request) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if req.method != "POST" {
        return sts_error(405, "Sender", "InvalidAction", "STS takes POST");
    }
    let form = parse_form(&String::from_utf8_lossy(&req.body));
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let action = get("Action").unwrap_or_default();
    if action != "AssumeRole" && action != "AssumeRoleWithWebIdentity" {
        return sts_error(400, "Sender", "InvalidAction", "unsupported action");
    }
    let Some(role_arn) = get("RoleArn") else {
        return sts_error(400, "Sender", "MissingParameter", "RoleArn is required");
    };
    let mut call = StsCall {
        action: action.clone(),
        role_arn: role_arn.clone(),
        role_session_name: get("RoleSessionName"),
        external_id: get("ExternalId"),
        caller_access_key_id: req.header("authorization").and_then(credential_akid),
        web_identity_token: get("WebIdentityToken"),
        issued_access_key_id: None,
    };
    let refusal = sts_refusal(state, &call);
    if let Some(message) = refusal {
        lock(&state.calls).push(call);
        return sts_error(403, "Sender", "AccessDenied", &message);
    }
    let key = state.issuer.key_for(&role_arn);
    call.issued_access_key_id = Some(key.access_key_id.clone());
    let session = call
        .role_session_name
        .clone()
        .unwrap_or_else(|| "session".into());
    lock(&state.calls).push(call);
    Response::xml(200, sts_success(&action, &role_arn, &session, &key))
}

fn sts_refusal(state: &StsState, call: &StsCall) -> Option<String> {
    if call.action == "AssumeRole" && call.caller_access_key_id.is_none() {
        return Some("AssumeRole must be signed".into());
    }
    if call.action == "AssumeRoleWithWebIdentity" && call.web_identity_token.is_none() {
        return Some("WebIdentityToken is required".into());
    }
    if let Some(required) = lock(&state.external_ids).get(&call.role_arn) {
        if call.external_id.as_deref() != Some(required.as_str()) {
            return Some(format!(
                "not authorized to perform sts:AssumeRole on {} (ExternalId)",
                call.role_arn
            ));
        }
    }
    if let Some(trusted) = lock(&state.trusted_callers).get(&call.role_arn) {
        let caller = call.caller_access_key_id.as_deref().unwrap_or("");
        if !trusted.iter().any(|t| t == caller) {
            return Some(format!(
                "{caller} is not authorized to perform sts:AssumeRole on {}",
                call.role_arn
            ));
        }
    }
    None
}

fn sts_success(action: &str, role_arn: &str, session: &str, key: &IssuedKey) -> String {
    // arn:aws:iam::ACCOUNT:role/NAME -> arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION
    let account = role_arn.split(':').nth(4).unwrap_or("000000000000");
    let role_name = role_arn.rsplit('/').next().unwrap_or("role");
    let role_id = &key.access_key_id[4..];
    let extra = if action == "AssumeRoleWithWebIdentity" {
        "<SubjectFromWebIdentityToken>system:serviceaccount:default:iampool</SubjectFromWebIdentityToken>\
         <Audience>sts.amazonaws.com</Audience><Provider>arn:aws:iam::000000000000:oidc-provider/fake</Provider>"
    } else {
        "<PackedPolicySize>6</PackedPolicySize>"
    };
    format!(
        "<{action}Response xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n\
         <{action}Result>\n\
         <AssumedRoleUser>\n\
         <Arn>arn:aws:sts::{account}:assumed-role/{role_name}/{session}</Arn>\n\
         <AssumedRoleId>AROA{role_id}:{session}</AssumedRoleId>\n\
         </AssumedRoleUser>\n\
         <Credentials>\n\
         <AccessKeyId>{akid}</AccessKeyId>\n\
         <SecretAccessKey>{secret}</SecretAccessKey>\n\
         <SessionToken>{token}</SessionToken>\n\
         <Expiration>{exp}</Expiration>\n\
         </Credentials>\n\
         {extra}\n\
         </{action}Result>\n\
         <ResponseMetadata>\n\
         <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>\n\
         </ResponseMetadata>\n\
         </{action}Response>\n",
        akid = xml_escape(&key.access_key_id),
        secret = xml_escape(&key.secret_access_key),
        token = xml_escape(&key.session_token),
        exp = key.expiration_rfc3339(),
        session = xml_escape(session),
    )
}

fn sts_error(status: u16, kind: &str, code: &str, message: &str) -> Response {
    Response::xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n\
             <Error>\n<Type>{kind}</Type>\n<Code>{code}</Code>\n<Message>{}</Message>\n</Error>\n\
             <RequestId>4f3b2c1a-0000-4000-8000-000000000000</RequestId>\n\
             </ErrorResponse>\n",
            xml_escape(message)
        ),
    )
}

/// `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/sts/aws4_request, ...` -> `AKID`.
fn credential_akid(authorization: &str) -> Option<String> {
    let rest = authorization.split("Credential=").nth(1)?;
    let akid = rest.split('/').next()?;
    (!akid.is_empty()).then(|| akid.to_owned())
}

fn parse_form(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_encoding::percent_decode_str(&s)
            .decode_utf8_lossy()
            .into_owned()
    };
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

// ---------------------------------------------------------------------------------------------
// The minimal HTTP/1.1 server

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path with query string.
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
}

#[derive(Debug, Clone)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn with_type(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body,
        }
    }
    fn text(status: u16, body: &str) -> Self {
        Self::with_type(status, "text/plain", body.as_bytes().to_vec())
    }
    fn json(status: u16, body: String) -> Self {
        Self::with_type(status, "application/json", body.into_bytes())
    }
    fn xml(status: u16, body: String) -> Self {
        Self::with_type(status, "text/xml", body.into_bytes())
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Internal Server Error",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

struct Server {
    addr: SocketAddr,
    fail: Arc<AtomicU8>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake AWS endpoint binds 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let fail = Arc::new(AtomicU8::new(FailMode::Healthy as u8));
        let connections = Arc::new(AtomicU64::new(0));
        let handler: Handler = Arc::new(handler);
        let (f, c) = (Arc::clone(&fail), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let mode = f.load(Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let _ = serve(stream, mode, handler).await;
                });
            }
        });
        Server {
            addr,
            fail,
            connections,
            task,
        }
    }

    fn set_fail(&self, mode: FailMode) {
        self.fail.store(mode as u8, Ordering::SeqCst);
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, mode: u8, handler: Handler) -> std::io::Result<()> {
    if mode == FailMode::Close as u8 {
        return Ok(()); // dropped: the client sees the connection closed
    }
    let Some(request) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let response = if mode == FailMode::Status500 as u8 {
        Response::text(500, "fake endpoint down")
    } else {
        handler(&request)
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    const MAX_HEAD: usize = 64 * 1024;
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
    }))
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(whole_seconds(t))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
