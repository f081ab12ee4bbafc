//! A scripted, counting credentials provider for the IAM unit tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{self, error::CredentialsError, ProvideCredentials};
use aws_credential_types::Credentials;

use super::clock::{Clock, ManualClock};

/// Hands out `AKIDTEST<n>` credentials living `ttl` from the clock's now; each fetch counts.
#[derive(Debug)]
pub(crate) struct FakeProvider {
    clock: Arc<ManualClock>,
    pub(crate) fetches: AtomicU64,
    pub(crate) fail: AtomicBool,
    /// Each fetch panics when set (as aws-config's IMDS provider can).
    pub(crate) panic: AtomicBool,
    /// Each fetch makes new keys (rotation) when set; otherwise the same key id every time.
    pub(crate) rotate: AtomicBool,
    ttl: Mutex<Option<Duration>>,
    delay: Duration,
}

impl FakeProvider {
    pub(crate) fn new(
        clock: Arc<ManualClock>,
        ttl: Option<Duration>,
        delay: Duration,
    ) -> Arc<Self> {
        Arc::new(FakeProvider {
            clock,
            fetches: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            panic: AtomicBool::new(false),
            rotate: AtomicBool::new(false),
            ttl: Mutex::new(ttl),
            delay,
        })
    }

    pub(crate) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }

    pub(crate) fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    async fn fetch(&self) -> provider::Result {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.panic.load(Ordering::SeqCst) {
            panic!("fake credential provider panicked");
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(CredentialsError::provider_error(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "fake credential endpoint down",
            )));
        }
        let id = if self.rotate.load(Ordering::SeqCst) {
            n
        } else {
            0
        };
        let ttl = *self.ttl.lock().unwrap();
        let expiry: Option<SystemTime> = ttl.map(|t| self.clock.now() + t);
        Ok(Credentials::new(
            format!("AKIDTEST{id}"),
            "fake-secret-key",
            Some("fake-session-token".into()),
            expiry,
            "fake",
        ))
    }
}

/// Lets tests keep an `Arc` to the provider they hand to a `CredentialSource`.
#[derive(Debug, Clone)]
pub(crate) struct Shared(pub(crate) Arc<FakeProvider>);

impl ProvideCredentials for Shared {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(self.0.fetch())
    }
}

/// Polls `cond` (real time) until true or 5 s passed.
pub(crate) async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
