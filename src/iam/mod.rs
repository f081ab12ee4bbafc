//! AWS IAM database authentication: credentials, the RDS token signer and the token cache.
//!
//! - [`signer`]: the pure SigV4 presigner that turns credentials into an RDS IAM token.
//! - [`credentials`]: aws-config's chain plus an optional role chain, cached by us.
//! - [`token`]: a signed token and the times that govern its use.
//! - [`cache`]: one current token per (identity, region, host, port, user), refreshed ahead.
//! - [`authenticator`]: the per-upstream handle the pool uses, and the registry sharing sources.
//! - [`command`]: `iampool token`, like `aws rds generate-db-auth-token`.

pub mod authenticator;
pub mod cache;
pub mod clock;
pub mod command;
pub mod credentials;
mod error;
pub mod signer;
pub mod token;

pub use authenticator::{IamAuthenticator, IamRegistry, IamStats};
pub use cache::TokenCache;
pub use clock::{Clock, ManualClock, SystemClock};
pub use command::{region_from_host, token_command};
pub use credentials::{CredentialSource, CredentialStats};
pub use error::IamError;
pub use signer::sign_token;
pub use token::{IamToken, TokenKey};

#[cfg(test)]
mod test_provider;

/// The fake AWS endpoints of the integration tests, reused by this module's unit tests.
#[cfg(test)]
#[path = "../../tests/support/fake_aws.rs"]
pub(crate) mod fake_aws;
