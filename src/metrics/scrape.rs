//! Gauges read at scrape time: pool saturation, IAM token state, the process itself.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts};

use crate::pool::Pool;

/// Reads every pool (and its IAM authenticator) when Prometheus scrapes.
pub struct PoolsCollector {
    pools: Vec<Arc<Pool>>,
}

impl PoolsCollector {
    pub fn new(pools: Vec<Arc<Pool>>) -> PoolsCollector {
        PoolsCollector { pools }
    }
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge")
}

fn fgauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

impl Collector for PoolsCollector {
    fn desc(&self) -> Vec<&Desc> {
        Vec::new()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let l = &["database", "user"];
        let ls = &["database", "user", "state"];
        let clients = gauge(
            "iampool_pool_clients",
            "Client connections by state: active (holding a server), waiting (for one), idle",
            ls,
        );
        let servers = gauge(
            "iampool_pool_servers",
            "Server connections by state: active (linked to a client), idle, login (being opened)",
            ls,
        );
        let size = gauge(
            "iampool_pool_size",
            "Server connections that exist or are being opened",
            l,
        );
        let limit = gauge(
            "iampool_pool_size_limit",
            "pool_size: most server connections for the pool",
            l,
        );
        let longest = fgauge(
            "iampool_pool_longest_wait_seconds",
            "How long the longest-waiting client has waited so far",
            l,
        );
        let pinned = gauge(
            "iampool_pool_servers_pinned",
            "Server connections kept by transaction-mode clients for session state no other server can carry (temporary tables, session advisory locks, WITH HOLD cursors, SQL PREPARE, LISTEN)",
            l,
        );
        let pinned_limit = gauge(
            "iampool_pool_servers_pinned_limit",
            "max_pinned_servers: most servers of the pool clients may pin",
            l,
        );
        let paused = gauge(
            "iampool_pool_paused",
            "1 while the pool is paused (admin PAUSE)",
            l,
        );
        let signed = counter(
            "iampool_iam_tokens_signed_total",
            "RDS IAM tokens signed",
            l,
        );
        let cache = counter(
            "iampool_iam_token_cache_requests_total",
            "Token requests by result: hit (a cached token) or miss (waited for one)",
            &["database", "user", "result"],
        );
        let refreshes = counter(
            "iampool_iam_token_refreshes_total",
            "Background token refreshes by result",
            &["database", "user", "result"],
        );
        let errors = counter(
            "iampool_iam_token_errors_total",
            "Token requests answered with an error (no valid token, credentials unavailable)",
            l,
        );
        let invalidated = counter(
            "iampool_iam_tokens_invalidated_total",
            "Tokens dropped after the upstream refused them",
            l,
        );
        let token_exp = fgauge(
            "iampool_iam_token_expiry_seconds",
            "Seconds until the current IAM token stops being used (negative: expired)",
            l,
        );
        let cred_exp = fgauge(
            "iampool_iam_credentials_expiry_seconds",
            "Seconds until the AWS credentials that sign tokens expire",
            l,
        );

        for pool in &self.pools {
            let (db, user) = (pool.database.as_str(), pool.user.as_str());
            let st = pool.status();
            let active = st.linked_clients as i64;
            let waiting = st.waiting as i64;
            let idle = (st.sessions as i64 - active - waiting).max(0);
            clients.with_label_values(&[db, user, "active"]).set(active);
            clients
                .with_label_values(&[db, user, "waiting"])
                .set(waiting);
            clients.with_label_values(&[db, user, "idle"]).set(idle);
            servers
                .with_label_values(&[db, user, "active"])
                .set(st.active as i64);
            servers
                .with_label_values(&[db, user, "idle"])
                .set(st.idle as i64);
            servers
                .with_label_values(&[db, user, "login"])
                .set(st.connecting as i64);
            size.with_label_values(&[db, user])
                .set((st.active + st.idle + st.connecting) as i64);
            limit
                .with_label_values(&[db, user])
                .set(st.pool_size as i64);
            longest
                .with_label_values(&[db, user])
                .set(st.longest_wait.as_secs_f64());
            paused.with_label_values(&[db, user]).set(st.paused as i64);
            pinned.with_label_values(&[db, user]).set(st.pinned as i64);
            pinned_limit
                .with_label_values(&[db, user])
                .set(st.max_pinned as i64);
            if let Some(auth) = pool.connector().iam() {
                let s = auth.stats();
                signed.with_label_values(&[db, user]).inc_by(s.signed);
                cache.with_label_values(&[db, user, "hit"]).inc_by(s.hits);
                cache
                    .with_label_values(&[db, user, "miss"])
                    .inc_by(s.misses);
                refreshes
                    .with_label_values(&[db, user, "ok"])
                    .inc_by(s.refresh_ok);
                refreshes
                    .with_label_values(&[db, user, "error"])
                    .inc_by(s.refresh_failed);
                errors.with_label_values(&[db, user]).inc_by(s.errors);
                invalidated
                    .with_label_values(&[db, user])
                    .inc_by(s.invalidated);
                if let Some(t) = auth.token_seconds_remaining() {
                    token_exp.with_label_values(&[db, user]).set(t);
                }
                if let Some(c) = auth.credentials_seconds_remaining() {
                    cred_exp.with_label_values(&[db, user]).set(c);
                }
            }
        }

        let build = gauge(
            "iampool_build_info",
            "Always 1; labels carry the version",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let process = process_families();

        let mut out = Vec::new();
        out.extend(clients.collect());
        out.extend(servers.collect());
        out.extend(size.collect());
        out.extend(limit.collect());
        out.extend(pinned.collect());
        out.extend(pinned_limit.collect());
        out.extend(longest.collect());
        out.extend(paused.collect());
        for c in [&signed, &cache, &refreshes, &errors, &invalidated] {
            out.extend(c.collect());
        }
        out.extend(token_exp.collect());
        out.extend(cred_exp.collect());
        out.extend(build.collect());
        out.extend(process);
        out.retain(|f| !f.get_metric().is_empty());
        out
    }
}

/// Open file descriptors, memory and CPU time, read from /proc (Linux).
fn process_families() -> Vec<MetricFamily> {
    let mut out = Vec::new();
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let g = IntGaugeVec::new(Opts::new("process_open_fds", "Open file descriptors"), &[])
        .expect("gauge");
    g.with_label_values(&[] as &[&str]).set(fds as i64);
    out.extend(g.collect());
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n,
        _ => 4096,
    };
    // SAFETY: as above.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut it = statm
            .split_whitespace()
            .map(|v| v.parse::<i64>().unwrap_or(0));
        let (virt, rss) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        let g = IntGaugeVec::new(
            Opts::new("process_resident_memory_bytes", "Resident memory"),
            &[],
        )
        .expect("gauge");
        g.with_label_values(&[] as &[&str]).set(rss * page);
        out.extend(g.collect());
        let g = IntGaugeVec::new(
            Opts::new("process_virtual_memory_bytes", "Virtual memory"),
            &[],
        )
        .expect("gauge");
        g.with_label_values(&[] as &[&str]).set(virt * page);
        out.extend(g.collect());
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name: utime and stime are the 12th and 13th.
        if let Some(rest) = stat.rsplit(')').next() {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let secs = (ticks(11) + ticks(12)) / hz;
            let c =
                prometheus::Counter::new("process_cpu_seconds_total", "CPU time (user + system)")
                    .expect("counter");
            c.inc_by(secs);
            out.extend(c.collect());
        }
    }
    out
}
