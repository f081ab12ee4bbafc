//! The IAM token signer against botocore itself: a few hundred generated cases (host case,
//! ports, partitions, session tokens, special characters in user names), each signed by
//! iampool and by botocore's `generate_db_auth_token` with its clock frozen at the same time.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use iampool::iam::signer::sign_token;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const CASES: usize = 300;

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.gen_range(0..from.len())]
}

fn word(rng: &mut StdRng, alphabet: &[u8], len: std::ops::RangeInclusive<usize>) -> String {
    let n = rng.gen_range(len);
    (0..n)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

/// One generated case: what both signers are given.
fn case(rng: &mut StdRng) -> Value {
    const HOST: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-";
    let labels = rng.gen_range(1..=5);
    let host = (0..labels)
        .map(|_| word(rng, HOST, 1..=12))
        .collect::<Vec<_>>()
        .join(".");
    let host = match rng.gen_range(0..4) {
        0 => format!("{host}.rds.amazonaws.com"),
        1 => format!("{host}.RDS.AMAZONAWS.COM"),
        2 => format!("{host}.rds.amazonaws.com.cn"),
        _ => host,
    };
    let port: u16 = match rng.gen_range(0..6) {
        0 => 443,
        1 => 80,
        2 => 5432,
        3 => 1,
        4 => 65535,
        _ => rng.gen_range(1..=65535),
    };
    let user = match rng.gen_range(0..4) {
        0 => word(rng, b"abcdefghijklmnopqrstuvwxyz_0123456789", 1..=16),
        1 => word(rng, b"aZ09-_.~ !\"#$%&'()*+,/:;<=>?@[\\]^`{|}", 1..=24),
        2 => pick(
            rng,
            &["jörg", "ünïcödé", "用户", "o'neil+ops/ü x", "app@corp"],
        )
        .to_owned(),
        _ => word(rng, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij%+=", 1..=63),
    };
    let region = pick(
        rng,
        &[
            "us-east-1",
            "eu-west-1",
            "ap-southeast-5",
            "il-central-1",
            "cn-north-1",
            "cn-northwest-1",
            "us-gov-west-1",
            "us-iso-east-1",
            "eu-isoe-west-1",
        ],
    );
    let session_token = rng.gen_bool(0.5).then(|| {
        word(
            rng,
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
            16..=400,
        )
    });
    json!({
        "host": host,
        "port": port,
        "user": user,
        "region": region,
        "access_key_id": format!("AKIA{}", word(rng, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16..=16)),
        "secret_access_key": word(rng, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", 40..=40),
        "session_token": session_token,
        // 2001-09-09 to 2033-05-18.
        "unix_time": rng.gen_range(1_000_000_000u64..2_000_000_000),
    })
}

fn ours(c: &Value) -> String {
    let s = |k: &str| c[k].as_str().unwrap().to_owned();
    let creds = Credentials::new(
        s("access_key_id"),
        s("secret_access_key"),
        c["session_token"].as_str().map(str::to_owned),
        None,
        "differential test",
    );
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(c["unix_time"].as_u64().unwrap());
    let port = c["port"].as_u64().unwrap() as u16;
    sign_token(&creds, &s("host"), port, &s("user"), &s("region"), at).expect("iampool signs")
}

fn botocore(cases: &[Value]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/driver-venv/bin/python");
    assert!(
        python.exists(),
        "botocore's venv is missing ({}): run scripts/setup.sh",
        python.display()
    );
    let mut child = Command::new(python)
        .arg(root.join("tests/support/botocore_tokens.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let input = serde_json::to_vec(cases).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().expect("python runs");
    assert!(
        out.status.success(),
        "botocore_tokens.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON list of tokens")
}

#[test]
fn signer_matches_botocore_for_generated_inputs() {
    let mut rng = StdRng::seed_from_u64(0x1a3_9001);
    let cases: Vec<Value> = (0..CASES).map(|_| case(&mut rng)).collect();
    let theirs = botocore(&cases);
    assert_eq!(theirs.len(), CASES);
    let mut differ = Vec::new();
    for (c, want) in cases.iter().zip(&theirs) {
        let got = ours(c);
        if &got != want {
            differ.push(format!("{c}\n  iampool:  {got}\n  botocore: {want}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {CASES} cases differ from botocore; first:\n{}",
        differ.len(),
        differ.first().unwrap()
    );
}
