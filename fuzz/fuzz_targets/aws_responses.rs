//! The AWS credential responses iampool depends on: IMDSv2 (token, role name, credentials
//! JSON), the ECS / EKS Pod Identity container endpoint (JSON), STS AssumeRoleWithWebIdentity
//! and AssumeRole (XML), as aws-config and aws-sdk-sts parse them. iampool does not parse
//! these itself, so the target drives the real chain the way `CredentialSource::load` does
//! (`aws_config::defaults(BehaviorVersion::latest())` with iampool's region, then
//! `CredentialSource::from_sdk_config` for the role chain and `credentials()` for the
//! fetch), with the environment, files, clock and HTTP client replaced: every request gets
//! the next response from the input.
//!
//! Input: a first line of digits, then responses separated by a line `%%`.
//!
//! * digit 1, the base credentials: 0 IMDSv2, 1 ECS / EKS container endpoint, 2 web
//!   identity (IRSA), 3 static keys in the environment, 4 a profile (`~/.aws/config`).
//! * digit 2: iampool's role chain, `assume_role_arns` of 0, 1 or 2 roles (digit % 3; at
//!   least 1 for static keys), `external_id` set when (digit / 3) is odd.
//! * digit 3, the variant: IMDS endpoint mode; the container URI and its authorization
//!   token (env or file); a session name or none for web identity; the profile's shape
//!   (source_profile, web_identity_token_file, credential_source, a two-role chain).
//! * each response: a status line (`200`, or `ERR` / `TIMEOUT` / `HANG` for a connection
//!   error, a timeout error or no answer until the client's read timeout), `Name: value`
//!   header lines, an empty line, the body. Requests past the last response get `ERR`.
//!
//! Invariants: any response sequence gives credentials or an error, never a panic or a hang;
//! credentials that are returned are still valid at the (fixed) time of the fetch; the
//! Display and Debug of the error never contain the secret access key (8 bytes or longer)
//! that a 2xx response carried in a `SecretAccessKey` field, unless the same error, from the
//! same input with that field's value replaced, still shows it (then it is the error's own
//! wording or another field); returned credentials' Debug never shows their secret key.
//!
//! Panics that the AWS crates are known to raise on some answers (`KNOWN_PANICS`) end
//! the fetch's task, which iampool turns into an error, as in production; any other panic
//! aborts. The SDK's retry token buckets are process-wide (aws-smithy-runtime), so whether
//! a failed request is retried can depend on earlier inputs: a replayed input starts with
//! full buckets.
//!
//! `AWS_RESPONSES_DEBUG=1 cargo +nightly fuzz run aws_responses FILE` prints the exchange.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region};
use aws_smithy_async::time::StaticTimeSource;
use aws_smithy_runtime_api::client::http::{
    http_client_fn, HttpConnector, HttpConnectorFuture, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::http::{Response, StatusCode};
use aws_smithy_types::body::SdkBody;
use aws_types::os_shim_internal::{Env, Fs};
use iampool::config::IamConfig;
use iampool::iam::{CredentialSource, ManualClock};
use libfuzzer_sys::fuzz_target;

/// The time of every fetch (AWS time source and iampool's clock): 2024-06-01T00:00:00Z.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_717_200_000)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    // Paused time: the SDK's retry back-off and timeouts are tokio sleeps, which complete at
    // once when nothing else can run, so retries cost no wall time.
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("AWS_RESPONSES_DEBUG").is_some())
}

/// Panics in the AWS crates that this target found (dependency bugs, not ours to fix):
/// file, line, and the response that causes it. iampool runs each fetch in a task of its
/// own, so in production such a panic becomes an error ("the credential fetch failed: task
/// panicked"); here too, instead of aborting, so that the search goes on and iampool's
/// handling of it is exercised. Any other panic aborts. AWS_RESPONSES_STRICT=1 aborts on
/// these as well (to see one).
const KNOWN_PANICS: &[(&str, u32, &str)] = &[
    // `TokenSigner` (aws-config imds/client/token.rs) puts the IMDS session token, taken
    // as `HeaderValue::from_bytes`, into `Headers::append`, which unwraps its UTF-8 form.
    (
        "aws-smithy-runtime-api-1.19.2/src/http/headers.rs",
        272,
        "an IMDS session token that is not UTF-8",
    ),
    // `imds::Client::get` builds the credentials request from the role name unescaped,
    // `.expect("valid request")`.
    (
        "aws-config-1.13.0/src/imds/client.rs",
        494,
        "an IMDS role name with a byte a URI cannot hold (space, newline, non-ASCII)",
    ),
    // SigV4 (`apply_signing_instructions`) unwraps `HeaderValue::from_str` of the
    // Authorization and X-Amz-Security-Token values when the next call (an STS hop) is
    // signed with the credentials a previous response gave.
    (
        "aws-runtime-1.10.2/src/auth.rs",
        296,
        "an access key id or session token with a control character, used for the next hop",
    ),
];

fn tolerate_known_panics() {
    let abort = std::panic::take_hook();
    let strict = std::env::var_os("AWS_RESPONSES_STRICT").is_some();
    std::panic::set_hook(Box::new(move |info| {
        let known = info.location().and_then(|l| {
            KNOWN_PANICS
                .iter()
                .find(|(file, line, _)| l.file().ends_with(file) && l.line() == *line)
        });
        match known {
            Some((_, _, cause)) if !strict => {
                if debug() {
                    eprintln!("known panic in a dependency ({cause}): {info}");
                }
            }
            _ => abort(info),
        }
    }));
}

#[derive(Clone, Debug)]
enum Answer {
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Refused,
    Timeout,
    Hang,
}

/// The input, parsed.
#[derive(Clone, Debug)]
struct Case {
    base: u8,
    hops: usize,
    external_id: bool,
    variant: u8,
    answers: Vec<Answer>,
}

const SEPARATOR: &[u8] = b"\n%%\n";

fn digit(line: &[u8], i: usize) -> u8 {
    line.get(i).map_or(0, |b| b.wrapping_sub(b'0'))
}

fn parse(data: &[u8]) -> Case {
    let (line, mut rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let base = digit(line, 0) % 5;
    let hop = digit(line, 1);
    let mut hops = (hop % 3) as usize;
    if base == 3 && hops == 0 {
        hops = 1; // static keys alone make no request
    }
    let mut answers = Vec::new();
    while !rest.is_empty() {
        let (chunk, tail) = match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => (&rest[..i], &rest[i + SEPARATOR.len()..]),
            None => (rest, &[][..]),
        };
        answers.push(answer(chunk));
        rest = tail;
        if answers.len() >= 16 {
            break;
        }
    }
    Case {
        base,
        hops,
        external_id: (hop / 3) % 2 == 1,
        variant: digit(line, 2),
        answers,
    }
}

fn answer(chunk: &[u8]) -> Answer {
    let mut lines = chunk.split_inclusive(|&b| b == b'\n');
    let status_line = lines.next().unwrap_or_default();
    let status_text = String::from_utf8_lossy(status_line);
    let status_text = status_text.trim();
    match status_text {
        "ERR" => return Answer::Refused,
        "TIMEOUT" => return Answer::Timeout,
        "HANG" => return Answer::Hang,
        _ => {}
    }
    let Some(status) = status_text
        .parse::<u16>()
        .ok()
        .filter(|s| (100..=599).contains(s))
    else {
        return Answer::Refused;
    };
    let mut consumed = status_line.len();
    let mut headers = Vec::new();
    for line in lines {
        consumed += line.len();
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            break;
        }
        if let Some((name, value)) = text.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    Answer::Http {
        status,
        headers,
        body: chunk[consumed.min(chunk.len())..].to_vec(),
    }
}

/// The in-memory endpoint: each request takes the next answer.
#[derive(Debug)]
struct Exchange {
    answers: Vec<Answer>,
    next: Mutex<usize>,
}

#[derive(Debug)]
struct Connector {
    exchange: Arc<Exchange>,
    read_timeout: Duration,
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let n = {
            let mut next = self.exchange.next.lock().unwrap();
            *next += 1;
            *next - 1
        };
        let answer = self
            .exchange
            .answers
            .get(n)
            .cloned()
            .unwrap_or(Answer::Refused);
        if debug() {
            let auth = request.headers().get("authorization").unwrap_or("-");
            eprintln!(
                "request {n}: {} {} (authorization {auth}) -> {answer:?}",
                request.method(),
                request.uri()
            );
        }
        match answer {
            Answer::Refused => HttpConnectorFuture::ready(Err(ConnectorError::io(
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
            ))),
            Answer::Timeout => {
                HttpConnectorFuture::ready(Err(ConnectorError::timeout("read timed out".into())))
            }
            Answer::Hang => {
                let wait = self.read_timeout;
                HttpConnectorFuture::new(async move {
                    tokio::time::sleep(wait).await;
                    Err(ConnectorError::timeout("no answer".into()))
                })
            }
            Answer::Http {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(
                    StatusCode::try_from(status).expect("100..=599"),
                    SdkBody::from(body),
                );
                for (name, value) in headers {
                    let _ = response.headers_mut().try_append(name, value);
                }
                HttpConnectorFuture::ready(Ok(response))
            }
        }
    }
}

const HOME: &str = "/home/iampool";
const STATIC_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
const STATIC_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const ROLE_ARNS: [&str; 2] = [
    "arn:aws:iam::111122223333:role/hop1",
    "arn:aws:iam::444455556666:role/hop2",
];
const IRSA_TOKEN_FILE: &str = "/var/run/secrets/eks.amazonaws.com/serviceaccount/token";
const POD_IDENTITY_TOKEN_FILE: &str =
    "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token";
const JWT: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGI6aWFtcG9vbCJ9.c2ln";

/// Environment variables, and files (path, contents).
type Environment = (Vec<(&'static str, String)>, Vec<(String, Vec<u8>)>);

/// The environment and files of each base: what an EC2 instance, an ECS task, an EKS pod
/// (IRSA or Pod Identity) or a laptop with a profile would have.
fn environment(case: &Case) -> Environment {
    let mut env = vec![("HOME", HOME.to_owned())];
    let mut files = Vec::new();
    let v = case.variant;
    match case.base {
        0 => match v % 3 {
            0 => {}
            1 => env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6".into())),
            _ => env.push((
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                "http://169.254.169.254:80/".into(),
            )),
        },
        1 => match v % 4 {
            0 => {
                env.push((
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "http://169.254.170.23/v1/credentials".into(),
                ));
                env.push((
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                    POD_IDENTITY_TOKEN_FILE.into(),
                ));
                files.push((POD_IDENTITY_TOKEN_FILE.to_owned(), JWT.as_bytes().to_vec()));
            }
            1 => env.push((
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "/v2/credentials/6f1e1d5e-2d7a-4a5c-9b1d-3c0f5e6a7b8c".into(),
            )),
            2 => {
                env.push((
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "http://127.0.0.1:51679/creds".into(),
                ));
                env.push((
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                    "Basic aWFtcG9vbA==".into(),
                ));
            }
            _ => env.push((
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://[fd00:ec2::23]/v1/credentials".into(),
            )),
        },
        2 => {
            env.push(("AWS_WEB_IDENTITY_TOKEN_FILE", IRSA_TOKEN_FILE.into()));
            env.push(("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/irsa".into()));
            if v.is_multiple_of(2) {
                env.push(("AWS_ROLE_SESSION_NAME", "iampool-irsa".into()));
            }
            files.push((IRSA_TOKEN_FILE.to_owned(), JWT.as_bytes().to_vec()));
        }
        3 => {
            env.push(("AWS_ACCESS_KEY_ID", STATIC_KEY_ID.into()));
            env.push(("AWS_SECRET_ACCESS_KEY", STATIC_SECRET.into()));
        }
        _ => {
            let keys = format!(
                "aws_access_key_id = {STATIC_KEY_ID}\naws_secret_access_key = {STATIC_SECRET}\n"
            );
            let profile = match v % 5 {
                0 => format!(
                    "[default]\nrole_arn = arn:aws:iam::123456789012:role/profile\nsource_profile = base\n\n[profile base]\n{keys}"
                ),
                1 => {
                    files.push((IRSA_TOKEN_FILE.to_owned(), JWT.as_bytes().to_vec()));
                    format!(
                        "[default]\nrole_arn = arn:aws:iam::123456789012:role/profile\nweb_identity_token_file = {IRSA_TOKEN_FILE}\nrole_session_name = iampool\n"
                    )
                }
                2 => "[default]\nrole_arn = arn:aws:iam::123456789012:role/profile\ncredential_source = Ec2InstanceMetadata\n".to_owned(),
                3 => {
                    env.push((
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                        "/v2/credentials/6f1e1d5e".into(),
                    ));
                    "[default]\nrole_arn = arn:aws:iam::123456789012:role/profile\ncredential_source = EcsContainer\n".to_owned()
                }
                _ => format!(
                    "[default]\nrole_arn = arn:aws:iam::123456789012:role/second\nsource_profile = first\nexternal_id = ext-2\n\n[profile first]\nrole_arn = arn:aws:iam::123456789012:role/first\nsource_profile = base\n\n[profile base]\n{keys}"
                ),
            };
            files.push((format!("{HOME}/.aws/config"), profile.into_bytes()));
        }
    }
    (env, files)
}

enum Outcome {
    Ok {
        debug: String,
        secret: String,
        /// The fields that Debug prints (as Debug prints them).
        shown: Vec<String>,
    },
    Err {
        text: String,
    },
}

impl Outcome {
    fn text(&self) -> &str {
        match self {
            Outcome::Ok { debug, .. } => debug,
            Outcome::Err { text } => text,
        }
    }
}

/// One fetch through iampool's credential source; the number of requests it made.
fn run(case: &Case) -> (Outcome, usize) {
    let (env, files) = environment(case);
    let env_pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let env = Env::from_slice(&env_pairs);
    let fs = Fs::from_map(files.into_iter().collect());
    let exchange = Arc::new(Exchange {
        answers: case.answers.clone(),
        next: Mutex::new(0),
    });
    let for_client = Arc::clone(&exchange);
    let client = http_client_fn(move |settings, _components| {
        SharedHttpConnector::new(Connector {
            exchange: Arc::clone(&for_client),
            read_timeout: settings.read_timeout().unwrap_or(Duration::from_secs(30)),
        })
    });
    let config = IamConfig {
        region: "us-east-1".into(),
        region_inferred: false,
        assume_role_arns: ROLE_ARNS[..case.hops]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        external_id: case.external_id.then(|| "iampool-external".to_owned()),
        role_session_name: "iampool".into(),
        token_lifetime: Duration::from_secs(900),
    };
    let outcome = runtime().block_on(async {
        let fetch = async {
            // As `credentials::load_sdk_config` (region given, default profile), with the
            // environment, files, time and HTTP client replaced.
            let sdk = aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(config.region.clone()))
                .env(env)
                .fs(fs)
                .time_source(StaticTimeSource::new(now()))
                .http_client(client)
                .load()
                .await;
            let source = CredentialSource::from_sdk_config(&sdk, &config, ManualClock::new(now()))
                .await
                .expect("the default chain has a credentials provider");
            source.credentials().await
        };
        // Virtual time: an hour passes only if nothing at all is left to run.
        tokio::time::timeout(Duration::from_secs(3600), fetch)
            .await
            .expect("the credential fetch hangs")
    });
    let requests = *exchange.next.lock().unwrap();
    let outcome = match outcome {
        Ok(creds) => {
            if let Some(expiry) = creds.expiry() {
                assert!(
                    expiry > now(),
                    "credentials returned already expired: {creds:?}"
                );
            }
            Outcome::Ok {
                debug: format!("{creds:?}"),
                secret: creds.secret_access_key().to_owned(),
                shown: [
                    Some(creds.access_key_id()),
                    creds.account_id().map(|a| a.as_str()),
                ]
                .into_iter()
                .flatten()
                .map(|s| format!("{s:?}"))
                .collect(),
            }
        }
        Err(e) => Outcome::Err {
            text: format!("{e}\n{e:?}"),
        },
    };
    (outcome, requests)
}

/// Byte ranges of the values of `SecretAccessKey` fields: JSON (keys matched without case,
/// as aws-config does) and XML elements. Values with escapes are left out (their raw bytes
/// are not the secret).
fn secret_fields(body: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let lower = body.to_ascii_lowercase();
    let key = b"\"secretaccesskey\"";
    let mut from = 0;
    while let Some(i) = find(&lower[from..], key) {
        let mut at = from + i + key.len();
        from = at;
        while at < body.len() && body[at].is_ascii_whitespace() {
            at += 1;
        }
        if body.get(at) != Some(&b':') {
            continue;
        }
        at += 1;
        while at < body.len() && body[at].is_ascii_whitespace() {
            at += 1;
        }
        if body.get(at) != Some(&b'"') {
            continue;
        }
        let start = at + 1;
        if let Some(len) = body[start..].iter().position(|&b| b == b'"') {
            if !body[start..start + len].contains(&b'\\') {
                out.push((start, start + len));
            }
        }
    }
    let (open, close) = (&b"<SecretAccessKey>"[..], &b"</SecretAccessKey>"[..]);
    let mut from = 0;
    while let Some(i) = find(&body[from..], open) {
        let start = from + i + open.len();
        from = start;
        if let Some(len) = find(&body[start..], close) {
            let value = &body[start..start + len];
            if !value.contains(&b'&') && !value.contains(&b'<') {
                out.push((start, start + len));
            }
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Secrets the responses carried (2xx, `SecretAccessKey` fields, 8 bytes or more).
fn secrets(case: &Case) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in &case.answers {
        if let Answer::Http { status, body, .. } = a {
            if (200..300).contains(status) {
                for (s, e) in secret_fields(body) {
                    if let Ok(v) = std::str::from_utf8(&body[s..e]) {
                        if v.len() >= 8 && !out.iter().any(|o| o == v) {
                            out.push(v.to_owned());
                        }
                    }
                }
            }
        }
    }
    out
}

/// The case with every `SecretAccessKey` field whose value is `secret` given another value
/// of the same length.
fn without(case: &Case, secret: &str) -> Case {
    let mut other = case.clone();
    let fill: Vec<u8> = (0..secret.len())
        .map(|i| {
            if secret.as_bytes()[i] == b'Q' {
                b'z'
            } else {
                b'Q'
            }
        })
        .collect();
    for a in &mut other.answers {
        if let Answer::Http { status, body, .. } = a {
            if (200..300).contains(status) {
                for (s, e) in secret_fields(body) {
                    if &body[s..e] == secret.as_bytes() {
                        body[s..e].copy_from_slice(&fill);
                    }
                }
            }
        }
    }
    other
}

fuzz_target!(init: tolerate_known_panics(), |data: &[u8]| {
    let case = parse(data);
    if debug() {
        eprintln!(
            "base {} hops {} external_id {} variant {} ({} answers)",
            case.base,
            case.hops,
            case.external_id,
            case.variant,
            case.answers.len()
        );
    }
    let (outcome, requests) = run(&case);
    if debug() {
        eprintln!("{requests} requests; {}", outcome.text());
    }
    match &outcome {
        Outcome::Ok {
            debug,
            secret,
            shown,
        } => {
            // Real secret keys are base64: a key of letters only may be a word of the Debug
            // output itself ("Credentials", "redacted", a feature name).
            let wordlike = secret.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_');
            if secret.len() >= 8 && !wordlike {
                // The access key id and account id are printed; a secret inside them is not
                // a leak.
                let mut rest = debug.clone();
                for field in shown {
                    rest = rest.replace(field.as_str(), "");
                }
                assert!(!rest.contains(secret.as_str()), "secret key in {debug}");
            }
        }
        Outcome::Err { text } => {
            for secret in secrets(&case) {
                if !text.contains(&secret) {
                    continue;
                }
                // The same input with that secret replaced: if its error still shows the
                // value, the value is the error's wording or another field's, not the key.
                let (again, _) = run(&without(&case, &secret));
                if !again.text().contains(&secret) {
                    panic!("secret access key {secret:?} in the error: {text}");
                }
            }
        }
    }
});
