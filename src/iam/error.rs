//! The IAM layer's error: what failed, in words safe to log (never a token or a secret).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use aws_credential_types::provider::error::CredentialsError;

/// Why no IAM token (or no AWS credentials) could be produced.
///
/// Every message is safe to log: it names the cause (the credential source's error, the
/// access key id, times) and never contains a token, a secret key or a session token.
/// The type is `Clone` so that one failed fetch can be handed to every caller that was
/// waiting on it (single-flight).
///
/// `Debug` is written by hand, without `source`: the SDK error's own `Debug` shows the raw
/// HTTP response, body included, and a 200 answer that failed to parse (an STS `Expiration`
/// that is not a date) carries the secret key and session token there. `detail` already
/// holds the text of every cause.
#[derive(Clone, thiserror::Error)]
pub enum IamError {
    /// The credential source (default chain, and the role chain if any) failed.
    #[error("AWS credentials unavailable from {chain}: {detail}")]
    Credentials {
        /// Which source failed, e.g. `default chain -> assume role arn:aws:iam::1:role/db`.
        chain: String,
        /// The source error and its causes, joined with ": ".
        detail: String,
        #[source]
        source: Arc<CredentialsError>,
    },
    /// The credential source returned credentials that are already (nearly) expired.
    #[error(
        "AWS credentials {access_key_id} from {chain} expire at {expires}, too soon to sign a usable token"
    )]
    CredentialsExpired {
        chain: String,
        access_key_id: String,
        expires: String,
    },
    /// No region: not given, not inferable from the host, not in the AWS configuration.
    #[error("no AWS region for {host}: pass --region, use an *.REGION.rds.amazonaws.com host, or set AWS_REGION / a profile region")]
    NoRegion { host: String },
    /// A bad host, user, region or signing time given to the signer.
    #[error("invalid IAM token request: {0}")]
    InvalidInput(String),
    /// aws-sigv4 refused to sign.
    #[error("signing the RDS IAM token failed: {0}")]
    Signing(String),
}

impl fmt::Debug for IamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IamError::Credentials { chain, detail, .. } => f
                .debug_struct("Credentials")
                .field("chain", chain)
                .field("detail", detail)
                .finish_non_exhaustive(),
            IamError::CredentialsExpired {
                chain,
                access_key_id,
                expires,
            } => f
                .debug_struct("CredentialsExpired")
                .field("chain", chain)
                .field("access_key_id", access_key_id)
                .field("expires", expires)
                .finish(),
            IamError::NoRegion { host } => f.debug_struct("NoRegion").field("host", host).finish(),
            IamError::InvalidInput(s) => f.debug_tuple("InvalidInput").field(s).finish(),
            IamError::Signing(s) => f.debug_tuple("Signing").field(s).finish(),
        }
    }
}

impl IamError {
    pub(crate) fn credentials(chain: &str, source: CredentialsError) -> Self {
        let detail = error_chain(&source);
        IamError::Credentials {
            chain: chain.to_owned(),
            detail,
            source: Arc::new(source),
        }
    }

    pub(crate) fn expired(chain: &str, access_key_id: &str, expires: SystemTime) -> Self {
        IamError::CredentialsExpired {
            chain: chain.to_owned(),
            access_key_id: access_key_id.to_owned(),
            expires: format_time(expires),
        }
    }

    /// True when retrying later may succeed (an endpoint down, credentials not yet rotated).
    /// False for configuration mistakes that a retry cannot fix.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            IamError::Credentials { .. } | IamError::CredentialsExpired { .. }
        )
    }

    /// What a PostgreSQL client may be told: no AWS detail, no identity.
    pub fn client_message(&self) -> &'static str {
        "iampool could not obtain an IAM token for the upstream database"
    }
}

/// `e: cause: cause's cause`, the way operators want to read a credential failure.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// RFC 3339 (UTC) for messages; falls back to seconds since the epoch.
pub(crate) fn format_time(t: SystemTime) -> String {
    let odt = time::OffsetDateTime::from(t);
    odt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{}s since epoch", odt.unix_timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_error_names_every_cause() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connect refused");
        let e = IamError::credentials("default chain", CredentialsError::provider_error(inner));
        let text = e.to_string();
        assert!(text.contains("default chain"), "{text}");
        assert!(text.contains("connect refused"), "{text}");
        assert!(e.is_transient());
    }

    /// Found by the `aws_responses` fuzz target: an STS answer with status 200 whose
    /// `Expiration` is not a date fails as a service error that keeps the raw response, and
    /// the SDK error's `Debug` prints its body, secret key and session token included.
    #[test]
    fn debug_leaves_out_the_raw_response() {
        use aws_smithy_runtime_api::client::result::SdkError;
        use aws_smithy_runtime_api::http::{Response, StatusCode};
        let body = "<AssumeRoleResponse><AssumeRoleResult><Credentials>\
            <AccessKeyId>ASIAHOPEXAMPLE000001</AccessKeyId>\
            <SecretAccessKey>hopSecret/K7MDENG+bPxRfiCYEXAMPLEKEY0001</SecretAccessKey>\
            <SessionToken>FwoGZXIvYXdzEStsSessionTokenExample</SessionToken>\
            <Expiration>tomorrow</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>";
        let raw = Response::new(StatusCode::try_from(200).unwrap(), body.to_owned());
        let parse = std::io::Error::other("error parsing XML: expected (timestamp)");
        let e = IamError::credentials(
            "default chain -> assume role arn:aws:iam::1:role/db",
            CredentialsError::provider_error(SdkError::service_error(parse, raw)),
        );
        // The SDK error itself shows the body; iampool's error must not.
        let sdk = format!("{:?}", e.source().unwrap());
        assert!(sdk.contains("hopSecret/K7MDENG"), "{sdk}");
        for text in [e.to_string(), format!("{e:?}"), format!("{e:#?}")] {
            assert!(!text.contains("hopSecret/K7MDENG"), "{text}");
            assert!(!text.contains("FwoGZXIvYXdzEStsSessionToken"), "{text}");
            assert!(text.contains("expected (timestamp)"), "{text}");
            assert!(text.contains("role/db"), "{text}");
        }
    }

    #[test]
    fn time_is_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_704_067_200);
        assert_eq!(format_time(t), "2024-01-01T00:00:00Z");
    }
}
