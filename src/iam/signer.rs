//! The RDS IAM token signer: a SigV4 presigned `GET /?Action=connect` URL without its scheme.
//!
//! Pure and local: no AWS call is made, so this signs happily with expired credentials;
//! deciding whether a token is still usable is the cache's job.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningParams, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::IamError;

/// SigV4 service name of RDS IAM database authentication.
pub const SERVICE: &str = "rds-db";

/// `X-Amz-Expires` of every token: the maximum RDS accepts. iampool's own, shorter
/// `token_lifetime` only limits how long the cache hands a token out.
pub const TOKEN_EXPIRES: Duration = Duration::from_secs(900);

/// RFC 3986 unreserved characters stay as they are; everything else is %XX-encoded.
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Query parameters aws-sigv4 adds, in the order botocore (`generate_db_auth_token`) writes them.
const SIGV4_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
];

/// Signs an RDS IAM token for `user` at `host:port` in `region`, as of `signing_time`.
///
/// The result is `HOST:PORT/?Action=connect&DBUser=...&X-Amz-...&X-Amz-Signature=HEX`,
/// byte for byte what botocore's `generate_db_auth_token` produces.
pub fn sign_token(
    creds: &Credentials,
    host: &str,
    port: u16,
    user: &str,
    region: &str,
    signing_time: SystemTime,
) -> Result<String, IamError> {
    check_input(host, user, region)?;
    let host_port = format!("{host}:{port}");
    let base = format!(
        "{host_port}/?Action=connect&DBUser={}",
        utf8_percent_encode(user, RFC3986)
    );
    let uri = format!("https://{base}");
    // The Host header botocore signs: the host in lower case, and no port when it is the
    // https default (its URL handling drops :443). The token text keeps the host as given.
    let signed_host = match port {
        443 => host.to_ascii_lowercase(),
        _ => format!("{}:{port}", host.to_ascii_lowercase()),
    };

    let identity: Identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_EXPIRES);
    let params: SigningParams<'_> = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(signing_time)
        .settings(settings)
        .build()
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into();

    let request = SignableRequest::new(
        "GET",
        uri.as_str(),
        std::iter::once(("host", signed_host.as_str())),
        SignableBody::empty(),
    )
    .map_err(|e| IamError::Signing(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into_parts();

    let added = instructions.params();
    if let Some((name, _)) = added.iter().find(|(n, _)| !SIGV4_PARAMS.contains(n)) {
        return Err(IamError::Signing(format!(
            "aws-sigv4 added an unexpected query parameter {name}"
        )));
    }
    let mut token = base;
    for name in SIGV4_PARAMS {
        if let Some((_, value)) = added.iter().find(|(n, _)| *n == name) {
            token.push('&');
            token.push_str(name);
            token.push('=');
            token.extend(utf8_percent_encode(value, RFC3986));
        }
    }
    Ok(token)
}

fn check_input(host: &str, user: &str, region: &str) -> Result<(), IamError> {
    let bad_host = host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#@".contains(c));
    if bad_host {
        return Err(IamError::InvalidInput(format!(
            "host {host:?} is not a host name"
        )));
    }
    if user.is_empty() {
        return Err(IamError::InvalidInput("empty database user".into()));
    }
    let bad_region = region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if bad_region {
        return Err(IamError::InvalidInput(format!(
            "region {region:?} is not an AWS region name"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Vector {
        host: String,
        port: u16,
        user: String,
        region: String,
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
        signing_time: String,
        expected_token: String,
    }

    fn vectors() -> Vec<Vector> {
        serde_json::from_str(include_str!("../../tests/data/rds-iam-tokens.json"))
            .expect("tests/data/rds-iam-tokens.json parses")
    }

    fn at(rfc3339: &str) -> SystemTime {
        let t =
            time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
                .expect("RFC 3339 time");
        t.into()
    }

    fn creds(akid: &str, secret: &str, token: Option<&str>) -> Credentials {
        Credentials::new(akid, secret, token.map(str::to_owned), None, "test")
    }

    #[test]
    fn reproduces_botocore_vectors_byte_for_byte() {
        let vectors = vectors();
        assert!(vectors.len() >= 2);
        for v in vectors {
            let c = creds(
                &v.access_key_id,
                &v.secret_access_key,
                v.session_token.as_deref(),
            );
            let token = sign_token(&c, &v.host, v.port, &v.user, &v.region, at(&v.signing_time))
                .expect("signs");
            assert_eq!(token, v.expected_token, "vector for {}", v.host);
        }
    }

    #[test]
    fn user_name_is_rfc3986_encoded() {
        let c = creds("AKIDEXAMPLE", "secret", None);
        let t = at("2024-01-01T00:00:00Z");
        let token = sign_token(&c, "db.example.com", 5432, "o'neil+ops/ü x", "us-east-1", t)
            .expect("signs");
        assert!(
            token.starts_with(
                "db.example.com:5432/?Action=connect&DBUser=o%27neil%2Bops%2F%C3%BC%20x&X-Amz-Algorithm="
            ),
            "{token}"
        );
        // A different user must give a different signature: the name is really signed.
        let other =
            sign_token(&c, "db.example.com", 5432, "o'neil+ops/ü", "us-east-1", t).expect("signs");
        let sig = |s: &str| s.rsplit("X-Amz-Signature=").next().map(str::to_owned);
        assert_ne!(sig(&token), sig(&other));
        // Unreserved characters stay literal.
        let plain =
            sign_token(&c, "db.example.com", 5432, "a-b_c.d~e", "us-east-1", t).expect("signs");
        assert!(plain.contains("&DBUser=a-b_c.d~e&"), "{plain}");
    }

    #[test]
    fn expires_is_always_900_and_only_host_is_signed() {
        let c = creds("AKIDEXAMPLE", "secret", Some("tok"));
        let token = sign_token(
            &c,
            "h.example",
            1,
            "u",
            "eu-west-1",
            at("2030-05-06T07:08:09Z"),
        )
        .expect("signs");
        assert!(token.contains("&X-Amz-Expires=900&"), "{token}");
        assert!(token.contains("&X-Amz-SignedHeaders=host&"), "{token}");
        assert!(token.contains("&X-Amz-Date=20300506T070809Z&"), "{token}");
        assert!(token.contains("&X-Amz-Security-Token=tok&"), "{token}");
    }

    /// botocore signs the lower-cased host, and no port for 443; the token text keeps the
    /// host and port as given. Expected values from botocore 1.44.8's generate_db_auth_token.
    #[test]
    fn host_case_and_port_443_sign_as_botocore_does() {
        let c = creds(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
        );
        let t = at("2026-01-02T03:04:05Z");
        let sig = |s: &str| s.rsplit("X-Amz-Signature=").next().unwrap().to_owned();
        let upper = sign_token(&c, "MyDB.Example.COM", 5432, "app", "us-east-1", t).unwrap();
        assert!(upper.starts_with("MyDB.Example.COM:5432/?Action=connect&DBUser=app&"));
        let lower = "5431dde4a27ea86ddb4cfa271db27c37e16521211718c2ffc9060d3f642b4292";
        assert_eq!(sig(&upper), lower);
        let https = sign_token(&c, "mydb.example.com", 443, "app", "us-east-1", t).unwrap();
        assert!(https.starts_with("mydb.example.com:443/?Action=connect&"));
        assert_eq!(
            sig(&https),
            "207c93142d823c051e43d58506b3049d87e8fe6c49f09efe9e9a77d378adc521"
        );
        let http = sign_token(&c, "mydb.example.com", 80, "app", "us-east-1", t).unwrap();
        assert_eq!(
            sig(&http),
            "95c03134e068876891aae5c6d7b9565c20069336232992772c34d84638ef6522"
        );
    }

    #[test]
    fn rejects_nonsense_input() {
        let c = creds("AKIDEXAMPLE", "secret", None);
        let t = SystemTime::UNIX_EPOCH;
        assert!(sign_token(&c, "", 5432, "u", "us-east-1", t).is_err());
        assert!(sign_token(&c, "h/x", 5432, "u", "us-east-1", t).is_err());
        assert!(sign_token(&c, "h", 5432, "", "us-east-1", t).is_err());
        assert!(sign_token(&c, "h", 5432, "u", "", t).is_err());
        assert!(sign_token(&c, "h", 5432, "u", "us east", t).is_err());
    }
}
