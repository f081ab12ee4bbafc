//! The token cache: one current token per (credential identity, region, host, port, user).
//!
//! A cold key is minted once however many callers ask at the same time (single flight,
//! failures shared too); a warm token is handed out until its `expires_at` (margin already
//! deducted) and refreshed in the background once 2/3 of its usable life has passed. While
//! a refresh fails the current token keeps serving; when nothing usable remains the caller
//! gets the cause (usually the credential source's error). Refresh is driven by use: an
//! upstream nobody logs in to costs nothing, and its first login after a pause mints anew.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use moka::future::Cache;

use super::clock::SharedClock;
use super::credentials::CredentialSource;
use super::signer::TOKEN_EXPIRES;
use super::token::{IamToken, TokenKey};
use super::IamError;

/// Slots nobody asked for in this long are dropped (their tokens are long expired).
const SLOT_IDLE: Duration = Duration::from_secs(3600);
const MAX_SLOTS: u64 = 100_000;
/// After a failed background refresh, wait this long (at most) before the next try.
const MAX_REFRESH_RETRY: Duration = Duration::from_secs(5);

/// Per-upstream counters (plain monotonic totals, for metrics).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) signed: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) refresh_ok: AtomicU64,
    pub(crate) refresh_failed: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) invalidated: AtomicU64,
    /// Time spent signing, when metrics are on (set once by the composition root).
    pub(crate) sign_seconds: std::sync::OnceLock<prometheus::Histogram>,
}

impl Counters {
    /// Signs through `mint`, timing it into the signing histogram.
    fn timed<T>(&self, mint: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let out = mint();
        if let Some(h) = self.sign_seconds.get() {
            h.observe(started.elapsed().as_secs_f64());
        }
        out
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What one upstream's tokens are signed for, minus the credential identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
}

/// Tokens for every upstream that shares one credential source and region.
#[derive(Clone, Debug)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    credentials: CredentialSource,
    region: String,
    lifetime: Duration,
    clock: SharedClock,
    slots: Cache<TokenKey, Arc<Slot>>,
}

#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    /// Held while this key's token is being minted: the single flight.
    mint: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
}

#[derive(Debug, Default)]
struct SlotState {
    current: Option<IamToken>,
    /// Completed mint attempts, so waiters can tell one finished while they waited.
    attempts: u64,
    last_error: Option<IamError>,
    /// Earliest next background refresh after a failed one.
    retry_at: Option<SystemTime>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, now: SystemTime) -> Option<IamToken> {
        self.state().current.clone().filter(|t| t.usable(now))
    }

    /// Drops `token` if it is still the current one (a newer token stays).
    pub(crate) fn invalidate(&self, token: &IamToken) -> bool {
        let mut state = self.state();
        if state.current.as_ref() == Some(token) {
            state.current = None;
            return true;
        }
        false
    }

    fn record(self: &Arc<Self>, result: &mut Result<IamToken, IamError>) {
        let mut state = self.state();
        state.attempts += 1;
        match result {
            Ok(token) => {
                token.slot = Arc::downgrade(self);
                state.current = Some(token.clone());
                state.last_error = None;
                state.retry_at = None;
            }
            Err(e) => state.last_error = Some(e.clone()),
        }
    }
}

impl TokenCache {
    /// `token_lifetime` is capped at 900 s (the token's own `X-Amz-Expires`).
    pub fn new(credentials: CredentialSource, region: &str, token_lifetime: Duration) -> Self {
        let clock = credentials.clock().clone();
        TokenCache {
            inner: Arc::new(Inner {
                credentials,
                region: region.to_owned(),
                lifetime: token_lifetime.min(TOKEN_EXPIRES),
                clock,
                slots: Cache::builder()
                    .max_capacity(MAX_SLOTS)
                    .time_to_idle(SLOT_IDLE)
                    .build(),
            }),
        }
    }

    pub fn credentials(&self) -> &CredentialSource {
        &self.inner.credentials
    }

    pub fn region(&self) -> &str {
        &self.inner.region
    }

    pub(crate) fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// Drops the current token of `key`, e.g. after the server refused it (SQLSTATE 28P01);
    /// the next request mints a new one.
    pub fn invalidate(&self, key: &TokenKey) {
        if let Some((_, slot)) = self.inner.slots.iter().find(|(k, _)| **k == *key) {
            slot.state().current = None;
        }
    }

    pub(crate) fn key(&self, access_key_id: &str, target: &Target) -> TokenKey {
        TokenKey {
            access_key_id: access_key_id.to_owned(),
            region: self.inner.region.clone(),
            host: target.host.clone(),
            port: target.port,
            user: target.user.clone(),
        }
    }

    /// A usable token for `target`, minting or refreshing as needed.
    pub(crate) async fn token(
        &self,
        target: &Arc<Target>,
        counters: &Arc<Counters>,
    ) -> Result<IamToken, IamError> {
        let (creds, until) = match self.inner.credentials.credentials_until().await {
            Ok(found) => found,
            Err(e) => {
                // No usable credentials, but a token they signed earlier may still be valid.
                if let Some(token) = self.last_token(target).await {
                    bump(&counters.hits);
                    return Ok(token);
                }
                bump(&counters.errors);
                return Err(e);
            }
        };
        let key = self.key(creds.access_key_id(), target);
        let slot = self.slot(&key).await;
        let now = self.inner.clock.now();
        if let Some(token) = slot.usable(now) {
            bump(&counters.hits);
            if token.refresh_due(now) {
                self.spawn_refresh(key, slot, target, counters);
            }
            return Ok(token);
        }
        bump(&counters.misses);
        let seen = slot.state().attempts;
        let _flight = slot.mint.lock().await;
        let now = self.inner.clock.now();
        if let Some(token) = slot.usable(now) {
            return Ok(token);
        }
        if slot.state().attempts != seen {
            if let Some(e) = slot.state().last_error.clone() {
                bump(&counters.errors);
                return Err(e);
            }
        }
        let mut result =
            counters.timed(|| IamToken::mint(&creds, until, &key, self.inner.lifetime, now));
        slot.record(&mut result);
        match &result {
            Ok(_) => bump(&counters.signed),
            Err(_) => bump(&counters.errors),
        }
        result
    }

    async fn slot(&self, key: &TokenKey) -> Arc<Slot> {
        self.inner
            .slots
            .get_with_by_ref(key, async { Arc::new(Slot::default()) })
            .await
    }

    /// The token signed by the last known credential identity, if still usable.
    async fn last_token(&self, target: &Target) -> Option<IamToken> {
        let identity = self.inner.credentials.identity()?;
        let slot = self.inner.slots.get(&self.key(&identity, target)).await?;
        slot.usable(self.inner.clock.now())
    }

    fn spawn_refresh(
        &self,
        key: TokenKey,
        slot: Arc<Slot>,
        target: &Arc<Target>,
        counters: &Arc<Counters>,
    ) {
        let now = self.inner.clock.now();
        if slot.state().retry_at.is_some_and(|t| now < t) {
            return;
        }
        if slot.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            slot.refreshing.store(false, Ordering::Release);
            return;
        };
        let (cache, target, counters) = (self.clone(), Arc::clone(target), Arc::clone(counters));
        runtime.spawn(async move {
            cache.refresh(&key, &slot, &target, &counters).await;
            slot.refreshing.store(false, Ordering::Release);
        });
    }

    async fn refresh(
        &self,
        key: &TokenKey,
        slot: &Arc<Slot>,
        target: &Target,
        counters: &Counters,
    ) {
        let (creds, until) = match self.inner.credentials.credentials_until().await {
            Ok(found) => found,
            Err(e) => {
                self.refresh_failed(key, slot, counters, &e);
                return;
            }
        };
        // Rotated credentials mean a new key: mint there; callers move to it on their own.
        let new_key = self.key(creds.access_key_id(), target);
        let into = if new_key == *key {
            Arc::clone(slot)
        } else {
            self.slot(&new_key).await
        };
        let _flight = into.mint.lock().await;
        let now = self.inner.clock.now();
        let due = into.usable(now).is_none_or(|t| t.refresh_due(now));
        if !due {
            return;
        }
        let mut result =
            counters.timed(|| IamToken::mint(&creds, until, &new_key, self.inner.lifetime, now));
        into.record(&mut result);
        match result {
            Ok(_) => {
                bump(&counters.signed);
                bump(&counters.refresh_ok);
            }
            Err(e) => self.refresh_failed(key, slot, counters, &e),
        }
    }

    fn refresh_failed(&self, key: &TokenKey, slot: &Slot, counters: &Counters, e: &IamError) {
        bump(&counters.refresh_failed);
        let now = self.inner.clock.now();
        let mut state = slot.state();
        let left = state
            .current
            .as_ref()
            .map(|t| t.expires_at().duration_since(now).unwrap_or_default())
            .unwrap_or_default();
        state.retry_at = Some(now + MAX_REFRESH_RETRY.min(left / 10));
        tracing::warn!(
            error = %e,
            host = %key.host,
            port = key.port,
            user = %key.user,
            access_key_id = %key.access_key_id,
            seconds_left = left.as_secs(),
            "IAM token refresh failed; the current token keeps serving until it expires"
        );
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
