//! The per-upstream handle the pool asks for tokens, and the registry that shares sources.
//!
//! The composition root builds one [`IamRegistry`]; each IAM upstream gets an
//! [`IamAuthenticator`] from it. Upstreams with the same credential settings share one AWS
//! configuration, one credential cache and one token cache; each authenticator keeps its own
//! counters so metrics can be labelled per pool.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::cache::{Counters, Target, TokenCache};
use super::clock::{system_clock, SharedClock};
use super::credentials::{load_sdk_config, signed_seconds, CredentialSource};
use super::token::IamToken;
use super::IamError;
use crate::config::IamConfig;
use aws_config::SdkConfig;

/// Snapshot of one upstream's token counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IamStats {
    /// Tokens signed (cold mints and refreshes).
    pub signed: u64,
    /// Requests answered with a cached token.
    pub hits: u64,
    /// Requests that found no usable token and waited for one.
    pub misses: u64,
    pub refresh_ok: u64,
    pub refresh_failed: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Tokens dropped after a login failure.
    pub invalidated: u64,
}

/// Tokens for one upstream (host, port, user). Cheap to clone.
#[derive(Clone, Debug)]
pub struct IamAuthenticator {
    cache: TokenCache,
    target: Arc<Target>,
    counters: Arc<Counters>,
    last_expiry: Arc<Mutex<Option<SystemTime>>>,
}

impl IamAuthenticator {
    /// A stand-alone authenticator: loads the AWS configuration for `config` itself.
    /// Prefer [`IamRegistry::authenticator`] when there are several upstreams.
    pub async fn from_config(
        config: &IamConfig,
        host: &str,
        port: u16,
        user: &str,
    ) -> Result<Self, IamError> {
        let credentials = CredentialSource::load(config).await?;
        let cache = TokenCache::new(credentials, &config.region, config.token_lifetime);
        Ok(Self::new(cache, host, port, user))
    }

    /// An authenticator on a shared token cache. `host` is the name signed (the RDS
    /// endpoint), which may differ from the address dialled.
    pub fn new(cache: TokenCache, host: &str, port: u16, user: &str) -> Self {
        IamAuthenticator {
            cache,
            target: Arc::new(Target {
                host: host.to_owned(),
                port,
                user: user.to_owned(),
            }),
            counters: Arc::default(),
            last_expiry: Arc::default(),
        }
    }

    /// A token usable now (its safety margin not yet reached).
    pub async fn token(&self) -> Result<IamToken, IamError> {
        let token = self.cache.token(&self.target, &self.counters).await?;
        let mut last = self.last_expiry.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some(token.expires_at());
        Ok(token)
    }

    /// The server refused `token` (SQLSTATE 28P01): stop handing it out, and stop using
    /// the credentials that signed it (they may have been revoked or rotated), so the retry
    /// is signed with credentials fetched anew. A newer token or newer credentials that
    /// replaced them meanwhile are left alone.
    pub fn invalidate(&self, token: &IamToken) {
        let dropped = token
            .slot
            .upgrade()
            .is_some_and(|slot| slot.invalidate(token));
        if self.cache.credentials().invalidate(token.access_key_id()) {
            tracing::info!(
                access_key_id = token.access_key_id(),
                "AWS credentials dropped after a refused login; fetching them again"
            );
        }
        if dropped {
            self.counters.invalidated.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                host = %self.target.host,
                port = self.target.port,
                user = %self.target.user,
                access_key_id = token.access_key_id(),
                "IAM token invalidated after a login failure"
            );
        }
    }

    pub fn host(&self) -> &str {
        &self.target.host
    }

    pub fn port(&self) -> u16 {
        self.target.port
    }

    pub fn user(&self) -> &str {
        &self.target.user
    }

    pub fn region(&self) -> &str {
        self.cache.region()
    }

    /// Seconds until the last token handed out stops being handed out (negative after).
    pub fn token_seconds_remaining(&self) -> Option<f64> {
        let expiry = (*self.last_expiry.lock().unwrap_or_else(|e| e.into_inner()))?;
        Some(signed_seconds(self.cache.clock().now(), expiry))
    }

    /// Seconds until the cached AWS credentials expire; `None` if none or they never expire.
    pub fn credentials_seconds_remaining(&self) -> Option<f64> {
        self.cache.credentials().seconds_until_expiry()
    }

    /// Where the signing credentials come from, e.g. `default chain -> arn:aws:iam::...:role/x`.
    pub fn credentials_chain(&self) -> String {
        self.cache.credentials().chain().to_owned()
    }

    /// Access key id of the cached credentials (not a secret).
    pub fn credentials_identity(&self) -> Option<String> {
        self.cache.credentials().identity()
    }

    /// Times every signing of this upstream's tokens into `histogram` (set once).
    pub fn set_sign_histogram(&self, histogram: prometheus::Histogram) {
        let _ = self.counters.sign_seconds.set(histogram);
    }

    pub fn stats(&self) -> IamStats {
        let c = &self.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        IamStats {
            signed: load(&c.signed),
            hits: load(&c.hits),
            misses: load(&c.misses),
            refresh_ok: load(&c.refresh_ok),
            refresh_failed: load(&c.refresh_failed),
            errors: load(&c.errors),
            invalidated: load(&c.invalidated),
        }
    }
}

/// Builds authenticators, loading each region's AWS configuration once and sharing one
/// credential and token cache per distinct credential setting. Not a global: the
/// composition root owns it.
#[derive(Debug)]
pub struct IamRegistry {
    clock: SharedClock,
    state: tokio::sync::Mutex<RegistryState>,
}

#[derive(Debug, Default)]
struct RegistryState {
    sdk_configs: Vec<(String, SdkConfig)>,
    caches: Vec<(IamConfig, TokenCache)>,
}

impl Default for IamRegistry {
    fn default() -> Self {
        Self::new(system_clock())
    }
}

impl IamRegistry {
    pub fn new(clock: SharedClock) -> Self {
        IamRegistry {
            clock,
            state: tokio::sync::Mutex::new(RegistryState::default()),
        }
    }

    /// Registers an already loaded configuration for `region` (tests: fake endpoints).
    pub async fn with_sdk_config(self, region: &str, sdk: SdkConfig) -> Self {
        self.state
            .lock()
            .await
            .sdk_configs
            .push((region.to_owned(), sdk));
        self
    }

    /// The authenticator for one upstream.
    pub async fn authenticator(
        &self,
        config: &IamConfig,
        host: &str,
        port: u16,
        user: &str,
    ) -> Result<IamAuthenticator, IamError> {
        let mut state = self.state.lock().await;
        let same = |c: &IamConfig| IamConfig {
            region_inferred: false,
            ..c.clone()
        };
        let wanted = same(config);
        if let Some((_, cache)) = state.caches.iter().find(|(c, _)| *c == wanted) {
            return Ok(IamAuthenticator::new(cache.clone(), host, port, user));
        }
        let sdk = match state.sdk_configs.iter().find(|(r, _)| *r == config.region) {
            Some((_, sdk)) => sdk.clone(),
            None => {
                let sdk = load_sdk_config(Some(&config.region), None).await;
                state.sdk_configs.push((config.region.clone(), sdk.clone()));
                sdk
            }
        };
        let credentials =
            CredentialSource::from_sdk_config(&sdk, config, self.clock.clone()).await?;
        let cache = TokenCache::new(credentials, &config.region, config.token_lifetime);
        state.caches.push((wanted, cache.clone()));
        Ok(IamAuthenticator::new(cache, host, port, user))
    }
}
