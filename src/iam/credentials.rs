//! AWS credentials for signing: aws-config's chain, an optional role chain, and our own cache.
//!
//! `provide_credentials()` does not cache (each call fetches again), so this file keeps the
//! current credentials until shortly before their `expiry()`, refreshes them ahead of time in
//! the background, lets one fetch run at a time (its result, success or failure, is shared
//! with everyone who waited on it), and keeps serving still-valid credentials while a
//! refresh fails. Secret keys and session tokens are never logged; access key ids are.
//!
//! Role chain: `assume_role_arns[0]` is assumed with the default chain's credentials, each
//! next role with the previous role's. Every hop uses `role_session_name`, and `external_id`
//! is sent on *every* hop: STS ignores an ExternalId that a trust policy does not check, so
//! sending it everywhere works whichever hop (often the cross-account one) requires it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use aws_config::sts::AssumeRoleProvider;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;

use super::clock::{system_clock, SharedClock};
use super::error::format_time;
use super::IamError;
use crate::config::IamConfig;

/// Credentials are refreshed this long before expiry at most, so that a token signed from
/// fresh credentials can live its full 900 s.
const MAX_REFRESH_AHEAD: Duration = Duration::from_secs(15 * 60);
/// Credentials are not used within this long of their expiry (at most; 10 % of their life
/// for short-lived credentials).
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(60);
/// Bounds on how often a refresh that failed (or returned the same credentials) is retried.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Counters for metrics: plain monotonic totals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CredentialStats {
    /// Calls answered from the cache.
    pub hits: u64,
    /// Fetches from the provider that returned usable credentials.
    pub fetch_ok: u64,
    /// Fetches that failed (or returned already-expired credentials).
    pub fetch_failed: u64,
}

/// The AWS credentials iampool signs with: one per distinct credential configuration,
/// shared (cheap `Clone`) by every token cache that uses it.
#[derive(Clone, Debug)]
pub struct CredentialSource {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    provider: SharedCredentialsProvider,
    /// Human description of the source for messages, e.g. `default chain -> assume role ARN`.
    chain: String,
    clock: SharedClock,
    state: Mutex<State>,
    /// Held while a fetch runs: the single flight.
    fetch: tokio::sync::Mutex<()>,
    background: AtomicBool,
    hits: AtomicU64,
    fetch_ok: AtomicU64,
    fetch_failed: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    current: Option<Cached>,
    /// Completed fetch attempts, so waiters can tell a fetch finished while they waited.
    attempts: u64,
    last_error: Option<IamError>,
    /// Earliest time a background refresh may be tried again.
    next_attempt: Option<SystemTime>,
}

#[derive(Debug, Clone)]
struct Cached {
    creds: Credentials,
    fetched_at: SystemTime,
}

impl Cached {
    fn life(&self) -> Option<Duration> {
        let expiry = self.creds.expiry()?;
        Some(expiry.duration_since(self.fetched_at).unwrap_or_default())
    }

    /// Usable = more than the safety margin left (credentials without expiry always are).
    fn usable(&self, now: SystemTime) -> bool {
        self.usable_until().is_none_or(|until| now < until)
    }

    fn usable_until(&self) -> Option<SystemTime> {
        let (expiry, life) = (self.creds.expiry()?, self.life()?);
        Some(expiry - safety_margin(life))
    }

    fn refresh_due(&self, now: SystemTime) -> bool {
        match (self.creds.expiry(), self.life()) {
            (Some(expiry), Some(life)) => now + refresh_ahead(life) >= expiry,
            _ => false,
        }
    }

    fn retry_interval(&self) -> Duration {
        self.life().map_or(MAX_RETRY, retry_interval)
    }
}

fn safety_margin(life: Duration) -> Duration {
    MAX_SAFETY_MARGIN.min(life / 10)
}

fn refresh_ahead(life: Duration) -> Duration {
    MAX_REFRESH_AHEAD.min(life / 2)
}

fn retry_interval(life: Duration) -> Duration {
    (life / 60).clamp(MIN_RETRY, MAX_RETRY)
}

impl CredentialSource {
    /// Loads the AWS configuration once (default chain, `config.region`) and builds the
    /// role chain on top of it.
    pub async fn load(config: &IamConfig) -> Result<Self, IamError> {
        let sdk = load_sdk_config(Some(&config.region), None).await;
        Self::from_sdk_config(&sdk, config, system_clock()).await
    }

    /// Builds on an already loaded configuration: its credentials provider is the base of
    /// the role chain, and its region, endpoint overrides and HTTP client are used for STS.
    /// Tests point `endpoint_url` at a fake STS here instead of touching the environment.
    pub async fn from_sdk_config(
        sdk: &SdkConfig,
        config: &IamConfig,
        clock: SharedClock,
    ) -> Result<Self, IamError> {
        let base = sdk.credentials_provider().ok_or_else(|| {
            IamError::InvalidInput("the AWS configuration has no credentials provider".into())
        })?;
        let mut provider = base;
        let mut chain = String::from("default chain");
        for arn in &config.assume_role_arns {
            let mut builder = AssumeRoleProvider::builder(arn.as_str())
                .session_name(config.role_session_name.as_str())
                .configure(sdk);
            if let Some(id) = &config.external_id {
                builder = builder.external_id(id.as_str());
            }
            let hop = builder.build_from_provider(provider).await;
            provider = SharedCredentialsProvider::new(hop);
            chain.push_str(" -> assume role ");
            chain.push_str(arn);
        }
        Ok(Self::from_provider(provider, chain, clock))
    }

    /// Wraps any provider (tests, or a caller with its own chain).
    pub fn from_provider(
        provider: impl ProvideCredentials + 'static,
        chain: impl Into<String>,
        clock: SharedClock,
    ) -> Self {
        CredentialSource {
            inner: Arc::new(Inner {
                provider: SharedCredentialsProvider::new(provider),
                chain: chain.into(),
                clock,
                state: Mutex::new(State::default()),
                fetch: tokio::sync::Mutex::new(()),
                background: AtomicBool::new(false),
                hits: AtomicU64::new(0),
                fetch_ok: AtomicU64::new(0),
                fetch_failed: AtomicU64::new(0),
            }),
        }
    }

    /// Current credentials: cached while usable, fetched (once, for all callers) otherwise.
    pub async fn credentials(&self) -> Result<Credentials, IamError> {
        Ok(self.credentials_until().await?.0)
    }

    /// Credentials and the time they stop being usable (expiry minus the safety margin;
    /// `None` for credentials that never expire).
    pub(crate) async fn credentials_until(
        &self,
    ) -> Result<(Credentials, Option<SystemTime>), IamError> {
        let seen = {
            let now = self.inner.clock.now();
            let state = self.inner.state();
            if let Some(c) = state.current.as_ref().filter(|c| c.usable(now)) {
                let due = c.refresh_due(now) && state.next_attempt.is_none_or(|t| now >= t);
                let creds = (c.creds.clone(), c.usable_until());
                drop(state);
                if due {
                    self.spawn_refresh();
                }
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(creds);
            }
            state.attempts
        };
        // The fetch runs in a task of its own, which holds the single flight: a caller that
        // gives up (a login bounded by server_connect_timeout) does not cancel it, so a
        // source slower than that timeout still fills the cache for the next caller.
        let inner = Arc::clone(&self.inner);
        let fetch = async move {
            let _flight = inner.fetch.lock().await;
            {
                let now = inner.clock.now();
                let state = inner.state();
                if let Some(c) = state.current.as_ref().filter(|c| c.usable(now)) {
                    inner.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok((c.creds.clone(), c.usable_until()));
                }
                if state.attempts != seen {
                    if let Some(e) = &state.last_error {
                        return Err(e.clone());
                    }
                }
            }
            inner.fetch_now().await
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.spawn(fetch).await.unwrap_or_else(|e| {
                Err(IamError::credentials(
                    &self.inner.chain,
                    CredentialsError::unhandled(format!("the credential fetch failed: {e}")),
                ))
            }),
            Err(_) => fetch.await,
        }
    }

    /// A login signed with the key `access_key_id` was refused: the credentials may have
    /// been revoked or rotated, so they are not used again; the next caller fetches anew
    /// from the provider. Newer credentials fetched meanwhile are left alone.
    pub fn invalidate(&self, access_key_id: &str) -> bool {
        let mut state = self.inner.state();
        let stale = state
            .current
            .as_ref()
            .is_some_and(|c| c.creds.access_key_id() == access_key_id);
        if stale {
            state.current = None;
        }
        stale
    }

    /// Access key id of the cached credentials (even if no longer usable), for cache keys
    /// and logs. Not a secret.
    pub fn identity(&self) -> Option<String> {
        let state = self.inner.state();
        state
            .current
            .as_ref()
            .map(|c| c.creds.access_key_id().to_owned())
    }

    /// Expiry of the cached credentials; `None` if none are cached or they never expire.
    pub fn expiry(&self) -> Option<SystemTime> {
        let state = self.inner.state();
        state.current.as_ref().and_then(|c| c.creds.expiry())
    }

    /// Seconds until the cached credentials expire (negative once expired).
    pub fn seconds_until_expiry(&self) -> Option<f64> {
        let expiry = self.expiry()?;
        Some(signed_seconds(self.inner.clock.now(), expiry))
    }

    /// Description of the source, e.g. `default chain -> assume role arn:...`.
    pub fn chain(&self) -> &str {
        &self.inner.chain
    }

    pub(crate) fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    pub fn stats(&self) -> CredentialStats {
        CredentialStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            fetch_ok: self.inner.fetch_ok.load(Ordering::Relaxed),
            fetch_failed: self.inner.fetch_failed.load(Ordering::Relaxed),
        }
    }

    fn spawn_refresh(&self) {
        if self.inner.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.background.store(false, Ordering::Release);
            return;
        };
        let inner = Arc::clone(&self.inner);
        runtime.spawn(async move {
            // Cleared however the task ends, a panic in the provider included (aws-config
            // panics on an IMDS token that is not UTF-8): left set, no background refresh
            // would ever start again. Declared first, so dropped after the single flight.
            let _running = ClearOnDrop(&inner.background);
            let _flight = inner.fetch.lock().await;
            let now = inner.clock.now();
            let still_due = {
                let state = inner.state();
                let due = state.current.as_ref().is_none_or(|c| c.refresh_due(now));
                due && state.next_attempt.is_none_or(|t| now >= t)
            };
            if still_due {
                // The outcome is recorded (and logged) by fetch_now.
                let _ = inner.fetch_now().await;
            }
        });
    }
}

/// Stores `false` when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One fetch from the provider; the caller holds `fetch`.
    async fn fetch_now(&self) -> Result<(Credentials, Option<SystemTime>), IamError> {
        let result = self.provider.provide_credentials().await;
        let now = self.clock.now();
        let mut state = self.state();
        state.attempts += 1;
        let fetched = match result {
            Ok(creds) => {
                let cached = Cached {
                    creds,
                    fetched_at: now,
                };
                if cached.usable(now) {
                    Ok(cached)
                } else {
                    let expiry = cached.creds.expiry().unwrap_or(now);
                    Err(IamError::expired(
                        &self.chain,
                        cached.creds.access_key_id(),
                        expiry,
                    ))
                }
            }
            Err(e) => Err(IamError::credentials(&self.chain, e)),
        };
        match fetched {
            Ok(cached) => {
                self.fetch_ok.fetch_add(1, Ordering::Relaxed);
                let expiry = cached.creds.expiry();
                let changed = state
                    .current
                    .as_ref()
                    .is_none_or(|old| old.creds.access_key_id() != cached.creds.access_key_id());
                tracing::info!(
                    access_key_id = cached.creds.access_key_id(),
                    expires = expiry.map(format_time).as_deref().unwrap_or("never"),
                    chain = %self.chain,
                    rotated = changed,
                    "AWS credentials loaded"
                );
                // If the provider handed back credentials that are already due (e.g. IMDS
                // before it rotates), wait a little before asking again.
                state.next_attempt = Some(now + cached.retry_interval());
                state.last_error = None;
                let creds = (cached.creds.clone(), cached.usable_until());
                state.current = Some(cached);
                Ok(creds)
            }
            Err(e) => {
                self.fetch_failed.fetch_add(1, Ordering::Relaxed);
                let retry = state
                    .current
                    .as_ref()
                    .map_or(MIN_RETRY, Cached::retry_interval);
                state.next_attempt = Some(now + retry);
                match state.current.as_ref().filter(|c| c.usable(now)) {
                    Some(c) => tracing::warn!(
                        error = %e,
                        access_key_id = c.creds.access_key_id(),
                        expires = c.creds.expiry().map(format_time).as_deref().unwrap_or("never"),
                        "AWS credentials refresh failed; still serving the cached credentials"
                    ),
                    None => tracing::warn!(error = %e, "AWS credentials unavailable"),
                }
                state.last_error = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Loads aws-config's defaults once; the region is the one given, else the chain's own.
pub(crate) async fn load_sdk_config(region: Option<&str>, profile: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(profile) = profile {
        loader = loader.profile_name(profile);
    }
    loader.load().await
}

/// `to - from` in seconds, negative when `to` is in the past.
pub(crate) fn signed_seconds(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[cfg(test)]
#[path = "credentials_tests.rs"]
mod tests;
