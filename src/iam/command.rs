//! `iampool token`: print one RDS IAM token, like `aws rds generate-db-auth-token`.

use std::time::SystemTime;

use super::clock::system_clock;
use super::credentials::{load_sdk_config, CredentialSource};
use super::signer::sign_token;
use super::IamError;
use crate::config::{IamConfig, TokenArgs};

/// Signs one token, with the credentials iampool itself would use: the default chain (or
/// `--profile`), then the role chain of `--assume-role-arn`.
///
/// Region: `--region`, else inferred from an `*.REGION.rds.amazonaws.com` host, else the AWS
/// configuration's (`AWS_REGION`, profile), else an error. `--signing-time` (RFC 3339) makes
/// the output reproducible; without it the token is signed now.
pub async fn token_command(args: &TokenArgs) -> Result<String, IamError> {
    let host = args.host.as_str();
    let signing_time = match &args.signing_time {
        Some(s) => parse_rfc3339(s)?,
        None => SystemTime::now(),
    };
    let explicit = args
        .region
        .clone()
        .or_else(|| region_from_host(host).map(str::to_owned));
    let sdk = load_sdk_config(explicit.as_deref(), args.profile.as_deref()).await;
    let region = match explicit {
        Some(r) => r,
        None => sdk
            .region()
            .map(|r| r.as_ref().to_owned())
            .ok_or_else(|| IamError::NoRegion {
                host: host.to_owned(),
            })?,
    };
    let iam = IamConfig {
        region: region.clone(),
        region_inferred: false,
        assume_role_arns: args.assume_role_arns.clone(),
        external_id: args.external_id.clone(),
        role_session_name: args.role_session_name.clone(),
        token_lifetime: super::signer::TOKEN_EXPIRES,
    };
    let source = CredentialSource::from_sdk_config(&sdk, &iam, system_clock()).await?;
    let creds = source.credentials().await?;
    sign_token(&creds, host, args.port, &args.user, &region, signing_time)
}

/// `REGION` of `NAME.REGION.rds.amazonaws.com` (also `.rds.amazonaws.com.cn`); `None` otherwise.
pub fn region_from_host(host: &str) -> Option<&str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let rest = host
        .strip_suffix(".rds.amazonaws.com")
        .or_else(|| host.strip_suffix(".rds.amazonaws.com.cn"))?;
    let region = rest.rsplit('.').next()?;
    let plausible = rest.contains('.')
        && region.split('-').count() >= 3
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    plausible.then_some(region)
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, IamError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| IamError::InvalidInput(format!("signing time {s:?} is not RFC 3339: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infers_region_from_rds_host_names() {
        let cases = [
            (
                "mydb.cluster-abc123.us-east-1.rds.amazonaws.com",
                Some("us-east-1"),
            ),
            (
                "mydb.cluster-ro-abc123.eu-west-2.rds.amazonaws.com.",
                Some("eu-west-2"),
            ),
            (
                "db.c9akciq32.cn-north-1.rds.amazonaws.com.cn",
                Some("cn-north-1"),
            ),
            (
                "x.abc.us-gov-west-1.rds.amazonaws.com",
                Some("us-gov-west-1"),
            ),
            ("rds.amazonaws.com", None),
            ("db.example.com", None),
            ("db.localhost", None),
            ("db.notaregion.rds.amazonaws.com", None),
        ];
        for (host, want) in cases {
            assert_eq!(region_from_host(host), want, "{host}");
        }
    }

    #[test]
    fn signing_time_must_be_rfc3339() {
        assert!(parse_rfc3339("2024-01-01T00:00:00Z").is_ok());
        assert!(parse_rfc3339("2024-01-01 00:00").is_err());
    }
}
