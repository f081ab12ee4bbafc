//! An RDS IAM token with the times that govern its use, and the key tokens are cached under.
//!
//! Usable life: from signing until `signed_at + token_lifetime` (capped at 900 s) minus a
//! safety margin of `min(60 s, 10 % of token_lifetime)`, and never past the moment the signing
//! credentials stop being usable (their expiry minus the credential cache's margin, see
//! `credentials.rs`; expiry minus the token margin when that is unknown). So a token is never
//! handed out just before the server would reject it. A refresh is due once 2/3 of the usable
//! life has passed.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;

use super::cache::Slot;
use super::signer::{sign_token, TOKEN_EXPIRES};
use super::IamError;

const MAX_MARGIN: Duration = Duration::from_secs(60);

/// `min(60 s, 10 % of the configured token lifetime)`: an absolute allowance for clock skew
/// and login latency, so it does not shrink when the credentials' expiry cuts a token short.
pub fn safety_margin(token_lifetime: Duration) -> Duration {
    MAX_MARGIN.min(token_lifetime.min(TOKEN_EXPIRES) / 10)
}

/// What a token is signed for and with: credential identity, region, host, port, user.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// Access key id of the signing credentials (not a secret).
    pub access_key_id: String,
    pub region: String,
    /// The name signed (the RDS endpoint name, not necessarily the address dialled).
    pub host: String,
    pub port: u16,
    pub user: String,
}

/// A signed token. `Debug` never shows the token itself.
#[derive(Clone)]
pub struct IamToken {
    token: Arc<str>,
    access_key_id: Arc<str>,
    signed_at: SystemTime,
    expires_at: SystemTime,
    refresh_at: SystemTime,
    /// The cache slot it came from, so a refused token can be dropped without a lookup.
    pub(crate) slot: Weak<Slot>,
}

impl PartialEq for IamToken {
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token && self.signed_at == other.signed_at
    }
}

impl Eq for IamToken {}

impl IamToken {
    /// Signs a token for `key` with `creds` at `now`, usable for at most `lifetime`.
    pub(crate) fn mint(
        creds: &Credentials,
        creds_usable_until: Option<SystemTime>,
        key: &TokenKey,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IamToken, IamError> {
        let token = sign_token(creds, &key.host, key.port, &key.user, &key.region, now)?;
        let lifetime = lifetime.min(TOKEN_EXPIRES);
        let margin = safety_margin(lifetime);
        let mut expires_at = now + lifetime - margin;
        match (creds_usable_until, creds.expiry()) {
            (Some(until), _) => expires_at = expires_at.min(until),
            (None, Some(expiry)) => {
                let until = expiry.checked_sub(margin).unwrap_or(SystemTime::UNIX_EPOCH);
                expires_at = expires_at.min(until);
            }
            (None, None) => {}
        }
        if expires_at <= now {
            return Err(IamError::expired(
                "the signing credentials",
                creds.access_key_id(),
                creds.expiry().unwrap_or(now),
            ));
        }
        let usable = expires_at.duration_since(now).unwrap_or_default();
        Ok(IamToken {
            token: token.into(),
            access_key_id: creds.access_key_id().into(),
            signed_at: now,
            expires_at,
            refresh_at: now + usable * 2 / 3,
            slot: Weak::new(),
        })
    }

    /// The token, for the PasswordMessage. The only place it leaves this type.
    pub fn expose(&self) -> &str {
        &self.token
    }

    /// The `X-Amz-Date` of the token.
    pub fn signed_at(&self) -> SystemTime {
        self.signed_at
    }

    /// After this iampool no longer hands the token out (safety margin already deducted).
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// From this time on a background refresh is started.
    pub fn refresh_at(&self) -> SystemTime {
        self.refresh_at
    }

    /// Access key id of the credentials that signed it.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub(crate) fn usable(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }

    pub(crate) fn refresh_due(&self, now: SystemTime) -> bool {
        now >= self.refresh_at
    }
}

impl fmt::Debug for IamToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IamToken")
            .field("token", &"<redacted>")
            .field("access_key_id", &self.access_key_id)
            .field("signed_at", &self.signed_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey {
            access_key_id: "AKIDEXAMPLE".into(),
            region: "us-east-1".into(),
            host: "db.example.com".into(),
            port: 5432,
            user: "app".into(),
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn full_lifetime_loses_a_sixty_second_margin() {
        let c = Credentials::new("AKIDEXAMPLE", "s", None, None, "t");
        let t = IamToken::mint(&c, None, &key(), Duration::from_secs(900), at(1_000_000)).unwrap();
        assert_eq!(t.signed_at(), at(1_000_000));
        assert_eq!(t.expires_at(), at(1_000_000 + 840));
        assert_eq!(t.refresh_at(), at(1_000_000 + 560));
        assert!(t.expose().contains("X-Amz-Expires=900"));
    }

    #[test]
    fn lifetime_is_capped_at_900_seconds() {
        let c = Credentials::new("AKIDEXAMPLE", "s", None, None, "t");
        let t = IamToken::mint(&c, None, &key(), Duration::from_secs(3600), at(1_000_000)).unwrap();
        assert_eq!(t.expires_at(), at(1_000_000 + 840));
    }

    #[test]
    fn short_lifetime_uses_a_ten_percent_margin() {
        let c = Credentials::new("AKIDEXAMPLE", "s", None, None, "t");
        let t = IamToken::mint(&c, None, &key(), Duration::from_secs(10), at(1_000_000)).unwrap();
        assert_eq!(t.expires_at(), at(1_000_000 + 9));
        assert_eq!(t.refresh_at(), at(1_000_000 + 6));
    }

    #[test]
    fn never_outlives_the_signing_credentials() {
        let c = Credentials::new("ASIA1", "s", Some("t".into()), Some(at(1_000_300)), "t");
        let t = IamToken::mint(&c, None, &key(), Duration::from_secs(900), at(1_000_000)).unwrap();
        assert_eq!(t.expires_at(), at(1_000_000 + 240));
        let until = Some(at(1_000_100));
        let t = IamToken::mint(&c, until, &key(), Duration::from_secs(900), at(1_000_000)).unwrap();
        assert_eq!(t.expires_at(), at(1_000_100));
        // Less than the margin left: no token.
        let expired = Credentials::new("ASIA1", "s", None, Some(at(1_000_059)), "t");
        let err = IamToken::mint(
            &expired,
            None,
            &key(),
            Duration::from_secs(900),
            at(1_000_000),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ASIA1"), "{err}");
    }

    #[test]
    fn debug_redacts_the_token() {
        let c = Credentials::new("AKIDEXAMPLE", "s", None, None, "t");
        let t = IamToken::mint(&c, None, &key(), Duration::from_secs(900), at(1_000_000)).unwrap();
        let shown = format!("{t:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("Signature"), "{shown}");
    }
}
