//! Unit tests of the token cache: single flight, refresh ahead, failures, invalidation.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::iam::clock::ManualClock;
use crate::iam::test_provider::{eventually, FakeProvider, Shared};
use crate::iam::{CredentialSource, IamAuthenticator, TokenCache};

fn start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

struct Setup {
    auth: IamAuthenticator,
    cache: TokenCache,
    fake: Arc<FakeProvider>,
    clock: Arc<ManualClock>,
}

fn setup(cred_ttl: Option<Duration>, token_lifetime: Duration, delay: Duration) -> Setup {
    let clock = ManualClock::new(start());
    let fake = FakeProvider::new(clock.clone(), cred_ttl, delay);
    let creds = CredentialSource::from_provider(Shared(fake.clone()), "fake chain", clock.clone());
    let cache = TokenCache::new(creds, "us-east-1", token_lifetime);
    let auth = IamAuthenticator::new(
        cache.clone(),
        "db.cluster-x.us-east-1.rds.amazonaws.com",
        5432,
        "app",
    );
    Setup {
        auth,
        cache,
        fake,
        clock,
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const TEN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_on_a_cold_key_mints_exactly_one_token() {
    let s = setup(
        Some(HOUR),
        Duration::from_secs(900),
        Duration::from_millis(30),
    );
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let auth = s.auth.clone();
            tokio::spawn(async move { auth.token().await })
        })
        .collect();
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().unwrap());
    }
    assert!(tokens.iter().all(|t| t == &tokens[0]));
    let stats = s.auth.stats();
    assert_eq!(stats.signed, 1, "{stats:?}");
    assert_eq!(s.fake.fetches(), 1);
    assert_eq!(stats.hits + stats.misses, 100);
    assert!(tokens[0]
        .expose()
        .starts_with("db.cluster-x.us-east-1.rds.amazonaws.com:5432/?Action=connect&DBUser=app&"));
    assert!(tokens[0].expose().contains("AKIDTEST0%2F"));
}

#[tokio::test]
async fn serves_from_cache_then_refreshes_ahead() {
    let s = setup(Some(HOUR), TEN, Duration::ZERO);
    let first = s.auth.token().await.unwrap();
    assert_eq!(first.signed_at(), start());
    assert_eq!(first.expires_at(), start() + Duration::from_secs(9));
    assert_eq!(s.auth.token_seconds_remaining(), Some(9.0));
    s.clock.advance(Duration::from_secs(5));
    assert_eq!(s.auth.token().await.unwrap(), first);
    assert_eq!(s.auth.stats().signed, 1);
    // Past 2/3 of the usable life (6 s): still the old token, a new one in the background.
    s.clock.advance(Duration::from_secs(2));
    assert_eq!(s.auth.token().await.unwrap(), first);
    assert!(eventually(|| s.auth.stats().refresh_ok == 1).await);
    let second = s.auth.token().await.unwrap();
    assert_eq!(second.signed_at(), start() + Duration::from_secs(7));
    assert_ne!(second.expose(), first.expose());
    assert_eq!(s.auth.stats().signed, 2);
}

#[tokio::test]
async fn never_hands_out_a_token_inside_its_margin() {
    let s = setup(Some(HOUR), TEN, Duration::ZERO);
    let first = s.auth.token().await.unwrap();
    s.clock.advance(Duration::from_secs(9));
    let next = s.auth.token().await.unwrap();
    assert_ne!(next, first);
    assert_eq!(next.signed_at(), start() + Duration::from_secs(9));
    assert_eq!(s.auth.stats().misses, 2);
}

#[tokio::test]
async fn a_failing_source_keeps_the_valid_token_then_errors_cleanly() {
    // Credentials live 20 s (usable until 18 s: 10 % margin); tokens 10 s with a 1 s margin.
    let s = setup(Some(Duration::from_secs(20)), TEN, Duration::ZERO);
    s.auth.token().await.unwrap();
    assert_eq!(s.auth.credentials_seconds_remaining(), Some(20.0));
    s.fake.set_fail(true);
    // Signed at 12 s from the still-usable credentials: capped where they stop being usable.
    s.clock.set(start() + Duration::from_secs(12));
    let t = s.auth.token().await.unwrap();
    assert_eq!(t.signed_at(), start() + Duration::from_secs(12));
    assert_eq!(t.expires_at(), start() + Duration::from_secs(18));
    // The credential refresh keeps failing; tokens keep being served while valid.
    for ms in [13_000, 15_000, 17_000, 17_900] {
        s.clock.set(start() + Duration::from_millis(ms));
        let served = s.auth.token().await.unwrap();
        assert!(
            served.expires_at() > start() + Duration::from_millis(ms),
            "at {ms} ms"
        );
        tokio::task::yield_now().await;
    }
    assert!(eventually(|| s.auth.credentials_identity().is_some() && s.fake.fetches() >= 2).await);
    s.clock.set(start() + Duration::from_millis(18_000));
    let err = s.auth.token().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("fake credential endpoint down"), "{text}");
    assert!(!text.contains("X-Amz-Signature"), "{text}");
    assert!(s.auth.stats().errors >= 1);
    assert!(s.auth.token_seconds_remaining().unwrap() <= 0.0);
    // The source comes back.
    s.fake.set_fail(false);
    let fresh = s.auth.token().await.unwrap();
    assert_eq!(fresh.signed_at(), start() + Duration::from_millis(18_000));
}

#[tokio::test]
async fn invalidate_drops_the_refused_token() {
    let s = setup(Some(HOUR), Duration::from_secs(900), Duration::ZERO);
    let first = s.auth.token().await.unwrap();
    s.clock.advance(Duration::from_secs(1));
    s.auth.invalidate(&first);
    let second = s.auth.token().await.unwrap();
    assert_ne!(second, first);
    assert_eq!(s.auth.stats().invalidated, 1);
    assert_eq!(s.auth.stats().signed, 2);
    // Invalidating an older token leaves the current one alone.
    s.auth.invalidate(&first);
    assert_eq!(s.auth.token().await.unwrap(), second);
    assert_eq!(s.auth.stats().invalidated, 1);
}

/// A refused token may mean revoked or rotated credentials: the retry's token is signed
/// with credentials fetched anew, not with the cached ones that signed the refused token.
#[tokio::test]
async fn a_refused_token_refetches_the_credentials() {
    let s = setup(Some(HOUR), Duration::from_secs(900), Duration::ZERO);
    s.fake.rotate.store(true, Ordering::SeqCst);
    let first = s.auth.token().await.unwrap();
    let fetches = s.fake.fetches();
    s.clock.advance(Duration::from_secs(1));
    s.auth.invalidate(&first);
    let retry = s.auth.token().await.unwrap();
    assert_eq!(s.fake.fetches(), fetches + 1, "fetched again");
    assert_ne!(
        retry.access_key_id(),
        first.access_key_id(),
        "signed by the new credentials"
    );
    // Refusing a token of the old credentials again leaves the new ones alone.
    s.auth.invalidate(&first);
    assert_eq!(s.auth.token().await.unwrap(), retry);
    assert_eq!(s.fake.fetches(), fetches + 1);
}

#[tokio::test]
async fn invalidate_by_key() {
    let s = setup(Some(HOUR), Duration::from_secs(900), Duration::ZERO);
    let first = s.auth.token().await.unwrap();
    let key = crate::iam::TokenKey {
        access_key_id: "AKIDTEST0".into(),
        region: "us-east-1".into(),
        host: s.auth.host().into(),
        port: 5432,
        user: "app".into(),
    };
    s.clock.advance(Duration::from_secs(1));
    s.cache.invalidate(&key);
    assert_ne!(s.auth.token().await.unwrap(), first);
}

#[tokio::test]
async fn rotated_credentials_sign_new_tokens() {
    let s = setup(
        Some(Duration::from_secs(120)),
        Duration::from_secs(900),
        Duration::ZERO,
    );
    s.fake.rotate.store(true, Ordering::SeqCst);
    let first = s.auth.token().await.unwrap();
    assert_eq!(first.access_key_id(), "AKIDTEST0");
    // Credentials (usable until 108 s) refresh ahead from 60 s; the token (until 108 s)
    // refreshes from 72 s, from whichever credentials are current; then the new ones sign.
    s.clock.set(start() + Duration::from_secs(75));
    let _ = s.auth.token().await.unwrap();
    assert!(eventually(|| s.auth.credentials_identity().as_deref() == Some("AKIDTEST1")).await);
    let next = s.auth.token().await.unwrap();
    assert_eq!(next.access_key_id(), "AKIDTEST1");
    assert!(next.expose().contains("AKIDTEST1%2F"));
}

#[tokio::test]
async fn cold_failure_names_the_credential_source() {
    let s = setup(Some(HOUR), TEN, Duration::ZERO);
    s.fake.set_fail(true);
    let err = s.auth.token().await.unwrap_err();
    assert!(err.to_string().contains("fake chain"), "{err}");
    assert!(err.is_transient());
    assert_eq!(s.auth.stats().errors, 1);
}
