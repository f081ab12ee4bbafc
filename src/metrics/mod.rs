//! Prometheus metrics: the registry is built once at start and passed in; every pool gets
//! its handles resolved up front, so the hot path never looks up a label.
//!
//! Saturation gauges (clients active/waiting/idle, servers active/idle/in login, longest
//! wait) and the IAM token state are read from the pools and authenticators at scrape time
//! rather than kept up to date on every change. Every metric is documented in
//! `docs/metrics.md`.

pub mod http;
mod scrape;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub use scrape::PoolsCollector;

/// Buckets for waits and latencies, 100 µs to ~100 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 100.0,
];

/// Buckets for token signing (microseconds to milliseconds).
/// A failover takes seconds (RDS Multi-AZ: 60-120 s; Aurora: under 30 s).
const FAILOVER_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
const SIGN_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.05,
];

/// Every labelled family; per-pool handles are resolved from these once.
pub struct Metrics {
    pub registry: Registry,
    wait: HistogramVec,
    transaction: HistogramVec,
    query: HistogramVec,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    bytes: IntCounterVec,
    messages: IntCounterVec,
    checkout_timeouts: IntCounterVec,
    failovers: IntCounterVec,
    failover_recovery: HistogramVec,
    login: HistogramVec,
    login_failures: IntCounterVec,
    sign: HistogramVec,
    pub client_logins: IntCounterVec,
    pub unsupported_state: IntCounterVec,
    pub started: IntGauge,
}

/// One pool's handles.
#[derive(Clone)]
pub struct PoolMetrics {
    pub wait: Histogram,
    pub transaction: Histogram,
    pub query: Histogram,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub messages_in: IntCounter,
    pub messages_out: IntCounter,
    pub checkout_timeouts: IntCounter,
    pub failovers: IntCounter,
    pub failover_recovery: Histogram,
    pub login_ok: Histogram,
    pub login_failed: Histogram,
    login_failures: IntCounterVec,
    session_state: IntCounterVec,
    labels: [String; 2],
}

impl PoolMetrics {
    /// Counts a failed upstream login by SQLSTATE class (or failure kind). Logins are rare:
    /// the label lookup here is off the hot path.
    pub fn login_failure(&self, kind: &str) {
        let class = if kind.len() == 5 && kind.is_ascii() {
            &kind[..2]
        } else {
            kind
        };
        self.login_failures
            .with_label_values(&[&self.labels[0], &self.labels[1], class])
            .inc();
    }

    /// Counts a statement that created session state transaction mode cannot carry (rare).
    pub fn session_state(&self, kind: &str) {
        self.session_state
            .with_label_values(&[&self.labels[0], &self.labels[1], kind])
            .inc();
    }
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let pool = &["database", "user"];
        let m = Metrics {
            registry: Registry::new(),
            wait: histogram(
                "iampool_client_wait_seconds",
                "Time clients waited for a server connection",
                pool,
                LATENCY_BUCKETS,
            ),
            transaction: histogram(
                "iampool_transaction_duration_seconds",
                "Time a client held a server in transaction mode (one transaction)",
                pool,
                LATENCY_BUCKETS,
            ),
            query: histogram(
                "iampool_query_duration_seconds",
                "Time from a client's request to the server's ReadyForQuery",
                pool,
                LATENCY_BUCKETS,
            ),
            transactions: counter(
                "iampool_transactions_total",
                "Transactions (server links in transaction mode, sessions in session mode)",
                pool,
            ),
            queries: counter(
                "iampool_queries_total",
                "Request cycles answered by ReadyForQuery",
                pool,
            ),
            bytes: counter(
                "iampool_relayed_bytes_total",
                "Bytes relayed, by direction (client_to_server, server_to_client)",
                &["database", "user", "direction"],
            ),
            messages: counter(
                "iampool_relayed_messages_total",
                "Protocol messages relayed, by direction",
                &["database", "user", "direction"],
            ),
            checkout_timeouts: counter(
                "iampool_checkout_timeouts_total",
                "Clients that gave up waiting for a server (query_wait_timeout)",
                pool,
            ),
            failovers: counter(
                "iampool_failovers_total",
                "Failovers detected (a server shut down or reset, changed role, or refused a write as read-only)",
                pool,
            ),
            failover_recovery: histogram(
                "iampool_failover_recovery_seconds",
                "Time from a detected failover until a server of the right role logged in",
                pool,
                FAILOVER_BUCKETS,
            ),
            login: histogram(
                "iampool_server_login_duration_seconds",
                "Upstream login time (TCP + TLS + authentication), by result",
                &["database", "user", "result"],
                LATENCY_BUCKETS,
            ),
            login_failures: counter(
                "iampool_server_login_failures_total",
                "Failed upstream logins by SQLSTATE class (or connect/tls/timeout/iam)",
                &["database", "user", "class"],
            ),
            sign: histogram(
                "iampool_iam_token_sign_seconds",
                "Time to sign an RDS IAM token",
                pool,
                SIGN_BUCKETS,
            ),
            client_logins: counter(
                "iampool_client_logins_total",
                "Client login attempts by result (ok, or the SQLSTATE sent)",
                &["result"],
            ),
            unsupported_state: counter(
                "iampool_session_state_statements_total",
                "Statements creating session state that transaction mode cannot carry across servers",
                &["database", "user", "kind"],
            ),
            started: IntGauge::new(
                "iampool_start_time_seconds",
                "Unix time iampool started",
            )
            .expect("valid gauge"),
        };
        for c in [
            Box::new(m.wait.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.transaction.clone()),
            Box::new(m.query.clone()),
            Box::new(m.transactions.clone()),
            Box::new(m.queries.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.messages.clone()),
            Box::new(m.checkout_timeouts.clone()),
            Box::new(m.failovers.clone()),
            Box::new(m.failover_recovery.clone()),
            Box::new(m.login.clone()),
            Box::new(m.login_failures.clone()),
            Box::new(m.sign.clone()),
            Box::new(m.client_logins.clone()),
            Box::new(m.unsupported_state.clone()),
            Box::new(m.started.clone()),
        ] {
            m.registry.register(c).expect("unique metric names");
        }
        // Bounded label values exist from the start at 0, so rate() sees their first event.
        for result in [
            "ok", "timeout", "28P01", "28000", "3D000", "53300", "08P01", "0A000", "57P01", "08001",
        ] {
            m.client_logins.with_label_values(&[result]);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        m.started.set(now);
        m
    }

    /// Resolves every handle one pool needs.
    pub fn pool(&self, database: &str, user: &str) -> PoolMetrics {
        let l = [database, user];
        for class in [
            "28", "08", "3D", "53", "57", "connect", "timeout", "tls", "iam", "protocol", "io",
        ] {
            self.login_failures
                .with_label_values(&[database, user, class]);
        }
        let dir = |v: &IntCounterVec, d: &str| v.with_label_values(&[database, user, d]);
        PoolMetrics {
            wait: self.wait.with_label_values(&l),
            transaction: self.transaction.with_label_values(&l),
            query: self.query.with_label_values(&l),
            transactions: self.transactions.with_label_values(&l),
            queries: self.queries.with_label_values(&l),
            bytes_in: dir(&self.bytes, "client_to_server"),
            bytes_out: dir(&self.bytes, "server_to_client"),
            messages_in: dir(&self.messages, "client_to_server"),
            messages_out: dir(&self.messages, "server_to_client"),
            checkout_timeouts: self.checkout_timeouts.with_label_values(&l),
            failovers: self.failovers.with_label_values(&l),
            failover_recovery: self.failover_recovery.with_label_values(&l),
            login_ok: self.login.with_label_values(&[database, user, "ok"]),
            login_failed: self.login.with_label_values(&[database, user, "error"]),
            login_failures: self.login_failures.clone(),
            session_state: self.unsupported_state.clone(),
            labels: [database.to_owned(), user.to_owned()],
        }
    }

    /// The token-signing histogram of an IAM pool (password pools have none).
    pub fn sign_histogram(&self, database: &str, user: &str) -> Histogram {
        self.sign.with_label_values(&[database, user])
    }

    /// Registers the scrape-time collector for pools and IAM state.
    pub fn register_pools(&self, collector: PoolsCollector) {
        self.registry
            .register(Box::new(collector))
            .expect("pools collector registered once");
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
