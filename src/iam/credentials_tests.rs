//! Unit tests of the credential cache (scripted provider) and of the role chain (fake STS).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;

use super::*;
use crate::iam::clock::ManualClock;
use crate::iam::fake_aws::{FailMode, FakeImds, FakeSts};
use crate::iam::test_provider::{eventually, FakeProvider, Shared};

fn start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn source(
    ttl: Option<Duration>,
    delay: Duration,
) -> (CredentialSource, Arc<FakeProvider>, Arc<ManualClock>) {
    let clock = ManualClock::new(start());
    let fake = FakeProvider::new(clock.clone(), ttl, delay);
    let src = CredentialSource::from_provider(Shared(fake.clone()), "fake chain", clock.clone());
    (src, fake, clock)
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn fetches_once_and_serves_from_cache() {
    let (src, fake, _clock) = source(Some(HOUR), Duration::ZERO);
    for _ in 0..3 {
        let c = src.credentials().await.unwrap();
        assert_eq!(c.access_key_id(), "AKIDTEST0");
    }
    assert_eq!(fake.fetches(), 1);
    assert_eq!(src.identity().as_deref(), Some("AKIDTEST0"));
    assert_eq!(src.expiry(), Some(start() + HOUR));
    assert_eq!(src.seconds_until_expiry(), Some(3600.0));
    assert_eq!(src.stats().fetch_ok, 1);
    assert_eq!(src.stats().hits, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_calls_fetch_once() {
    let (src, fake, _clock) = source(Some(HOUR), Duration::from_millis(50));
    let calls = (0..100).map(|_| {
        let src = src.clone();
        tokio::spawn(async move { src.credentials().await })
    });
    for call in calls.collect::<Vec<_>>() {
        assert_eq!(call.await.unwrap().unwrap().access_key_id(), "AKIDTEST0");
    }
    assert_eq!(fake.fetches(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fetch_is_shared_with_its_waiters() {
    let (src, fake, _clock) = source(Some(HOUR), Duration::from_millis(50));
    fake.set_fail(true);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let src = src.clone();
            tokio::spawn(async move { src.credentials().await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("fake chain"), "{text}");
        assert!(text.contains("fake credential endpoint down"), "{text}");
    }
    assert_eq!(fake.fetches(), 1);
    // A later call tries again.
    fake.set_fail(false);
    assert!(src.credentials().await.is_ok());
    assert_eq!(fake.fetches(), 2);
}

#[tokio::test]
async fn refreshes_ahead_in_the_background() {
    let (src, fake, clock) = source(Some(HOUR), Duration::ZERO);
    src.credentials().await.unwrap();
    fake.rotate.store(true, std::sync::atomic::Ordering::SeqCst);
    // 15 minutes before expiry the refresh starts; the caller is not kept waiting.
    clock.advance(Duration::from_secs(46 * 60));
    let c = src.credentials().await.unwrap();
    assert_eq!(c.access_key_id(), "AKIDTEST0");
    assert!(eventually(|| src.identity().as_deref() == Some("AKIDTEST1")).await);
    assert_eq!(fake.fetches(), 2);
    assert_eq!(
        src.expiry(),
        Some(start() + Duration::from_secs(46 * 60) + HOUR)
    );
}

/// The `aws_responses` fuzz target found aws-config panicking inside
/// `provide_credentials` (an IMDS token that is not UTF-8). A background refresh that
/// panicked used to leave its "running" flag set, so none was ever started again.
#[tokio::test]
async fn a_refresh_that_panics_does_not_stop_later_refreshes() {
    use std::sync::atomic::Ordering::SeqCst;
    let (src, fake, clock) = source(Some(HOUR), Duration::ZERO);
    src.credentials().await.unwrap();
    fake.panic.store(true, SeqCst);
    clock.advance(Duration::from_secs(46 * 60));
    assert_eq!(
        src.credentials().await.unwrap().access_key_id(),
        "AKIDTEST0"
    );
    assert!(eventually(|| fake.fetches() == 2).await);
    tokio::task::yield_now().await;
    fake.panic.store(false, SeqCst);
    fake.rotate.store(true, SeqCst);
    // Still due: the next caller starts another refresh, which succeeds.
    assert_eq!(
        src.credentials().await.unwrap().access_key_id(),
        "AKIDTEST0"
    );
    assert!(eventually(|| src.identity().as_deref() == Some("AKIDTEST2")).await);
    assert_eq!(fake.fetches(), 3);
}

#[tokio::test]
async fn keeps_serving_valid_credentials_while_refresh_fails() {
    let (src, fake, clock) = source(Some(HOUR), Duration::ZERO);
    src.credentials().await.unwrap();
    fake.set_fail(true);
    clock.advance(Duration::from_secs(50 * 60));
    for _ in 0..5 {
        assert_eq!(
            src.credentials().await.unwrap().access_key_id(),
            "AKIDTEST0"
        );
        clock.advance(Duration::from_secs(31));
        tokio::task::yield_now().await;
    }
    assert!(eventually(|| src.stats().fetch_failed >= 1).await);
    // Inside the 60 s margin the cached credentials are no longer used.
    clock.set(start() + HOUR - Duration::from_secs(59));
    let err = src.credentials().await.unwrap_err();
    assert!(
        err.to_string().contains("fake credential endpoint down"),
        "{err}"
    );
    // The endpoint comes back: new credentials.
    fake.set_fail(false);
    assert!(src.credentials().await.is_ok());
}

#[tokio::test]
async fn static_credentials_never_refresh() {
    let (src, fake, clock) = source(None, Duration::ZERO);
    src.credentials().await.unwrap();
    clock.advance(Duration::from_secs(10 * 24 * 3600));
    src.credentials().await.unwrap();
    assert_eq!(fake.fetches(), 1);
    assert_eq!(src.expiry(), None);
}

#[tokio::test]
async fn expired_credentials_from_the_source_are_refused() {
    let (src, _fake, _clock) = source(Some(Duration::ZERO), Duration::ZERO);
    let err = src.credentials().await.unwrap_err();
    assert!(matches!(err, IamError::CredentialsExpired { .. }), "{err}");
    assert!(err.to_string().contains("AKIDTEST0"), "{err}");
}

async fn sdk_with_fake_sts(sts: &FakeSts) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDBASE",
            "base-secret",
            None,
            None,
            "static",
        ))
        .endpoint_url(sts.endpoint())
        .retry_config(RetryConfig::disabled())
        .load()
        .await
}

fn iam_config(roles: &[&str], external_id: Option<&str>) -> IamConfig {
    IamConfig {
        region: "us-east-1".into(),
        region_inferred: false,
        assume_role_arns: roles.iter().map(|r| (*r).to_owned()).collect(),
        external_id: external_id.map(str::to_owned),
        role_session_name: "iampool-test".into(),
        token_lifetime: Duration::from_secs(900),
    }
}

const MGMT: &str = "arn:aws:iam::111111111111:role/iampool-broker";
const DB: &str = "arn:aws:iam::222222222222:role/db-connect";

#[tokio::test]
async fn role_chain_assumes_each_hop_with_the_previous_credentials() {
    let sts = FakeSts::start(HOUR).await;
    sts.require_external_id(DB, "ext-123");
    sts.trust_only(DB, &[&FakeSts::key_for(MGMT)]);
    let sdk = sdk_with_fake_sts(&sts).await;
    let config = iam_config(&[MGMT, DB], Some("ext-123"));
    let src = CredentialSource::from_sdk_config(&sdk, &config, crate::iam::clock::system_clock())
        .await
        .unwrap();
    assert_eq!(
        src.chain(),
        format!("default chain -> assume role {MGMT} -> assume role {DB}")
    );
    let c = src.credentials().await.unwrap();
    assert_eq!(c.access_key_id(), FakeSts::key_for(DB));
    assert!(c.session_token().is_some());
    let calls = sts.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].role_arn, MGMT);
    assert_eq!(calls[0].caller_access_key_id.as_deref(), Some("AKIDBASE"));
    assert_eq!(calls[1].role_arn, DB);
    assert_eq!(calls[1].caller_access_key_id, Some(FakeSts::key_for(MGMT)));
    for call in &calls {
        assert_eq!(call.external_id.as_deref(), Some("ext-123"));
        assert_eq!(call.role_session_name.as_deref(), Some("iampool-test"));
    }
    // Cached: no further STS calls.
    src.credentials().await.unwrap();
    assert_eq!(sts.calls().len(), 2);
}

#[tokio::test]
async fn sts_refusal_and_outage_name_the_cause() {
    let sts = FakeSts::start(HOUR).await;
    sts.require_external_id(DB, "ext-123");
    let sdk = sdk_with_fake_sts(&sts).await;
    let src = CredentialSource::from_sdk_config(
        &sdk,
        &iam_config(&[DB], None),
        crate::iam::clock::system_clock(),
    )
    .await
    .unwrap();
    let err = src.credentials().await.unwrap_err().to_string();
    assert!(
        err.contains("AccessDenied") || err.contains("ExternalId"),
        "{err}"
    );
    assert!(!err.contains("base-secret"), "{err}");

    let sts = FakeSts::start(HOUR).await;
    sts.set_fail(FailMode::Status500);
    let sdk = sdk_with_fake_sts(&sts).await;
    let src = CredentialSource::from_sdk_config(
        &sdk,
        &iam_config(&[DB], None),
        crate::iam::clock::system_clock(),
    )
    .await
    .unwrap();
    let err = src.credentials().await.unwrap_err().to_string();
    assert!(err.contains(DB), "{err}");
}

#[tokio::test]
async fn imds_v2_credentials_through_the_fake() {
    use aws_config::imds::{client::Client, credentials::ImdsCredentialsProvider};
    let imds = FakeImds::start("iampool-instance-role", HOUR).await;
    let client = Client::builder().endpoint(imds.endpoint()).unwrap().build();
    let provider = ImdsCredentialsProvider::builder()
        .imds_client(client)
        .build();
    let src = CredentialSource::from_provider(provider, "imds", crate::iam::clock::system_clock());
    let c = src.credentials().await.unwrap();
    let issued = imds.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(c.access_key_id(), issued[0].access_key_id);
    assert_eq!(c.expiry(), Some(issued[0].expiration));
    assert!(imds.token_puts() >= 1);
    assert_eq!(imds.credential_gets(), 1);
    assert_eq!(imds.unauthorized(), 0);
}
