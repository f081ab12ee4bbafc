//! The SHOW commands: pools, stats, clients, servers, databases, config, version and tokens.
//!
//! Column names follow PgBouncer where the concept is the same, so its dashboards and
//! scripts read iampool too. Columns for states iampool does not have (cancel requests
//! queued, servers being tested) are present and 0; values iampool cannot know are left out
//! rather than made up.

use std::sync::Arc;
use std::time::SystemTime;

use super::reply::{Cell, Table, Ty};
use super::Context;
use crate::config::keys::{DefaultValue, Scope, KEYS};
use crate::config::Named;
use crate::pool::Pool;

use Ty::{Int4, Int8, Text};

/// Pools sorted by database name, so output is stable.
fn pools(ctx: &dyn Context) -> Vec<Arc<Pool>> {
    let mut pools = ctx.pools();
    pools.sort_by(|a, b| a.database.cmp(&b.database));
    pools
}

static POOLS: [(&str, Ty); 16] = [
    ("database", Text),
    ("user", Text),
    ("cl_active", Int8),
    ("cl_waiting", Int8),
    ("cl_active_cancel_req", Int8),
    ("cl_waiting_cancel_req", Int8),
    ("sv_active", Int8),
    ("sv_active_cancel", Int8),
    ("sv_being_canceled", Int8),
    ("sv_idle", Int8),
    ("sv_used", Int8),
    ("sv_tested", Int8),
    ("sv_login", Int8),
    ("maxwait", Int8),
    ("maxwait_us", Int8),
    ("pool_mode", Text),
];

/// Clients are active (logged in, not queued for a server) or waiting; cancel requests are
/// forwarded at once and never queue, and servers are never "used" or "tested" here. A
/// server whose query a cancel is on its way to is `sv_being_canceled` until the cancel has
/// been delivered, and only then goes back to the pool.
pub fn pools_table(ctx: &dyn Context) -> Table {
    let mut t = Table::new(&POOLS);
    for p in pools(ctx) {
        let st = p.status();
        let waiting = st.waiting.min(st.sessions);
        let wait = st.longest_wait;
        t.push(vec![
            p.database.as_str().into(),
            p.user.as_str().into(),
            (st.sessions - waiting).into(),
            waiting.into(),
            0i64.into(),
            0i64.into(),
            (st.active - st.being_canceled).into(),
            0i64.into(),
            st.being_canceled.into(),
            st.idle.into(),
            0i64.into(),
            0i64.into(),
            st.connecting.into(),
            wait.as_secs().into(),
            i64::from(wait.subsec_micros()).into(),
            st.mode.map(|m| m.name()).into(),
        ]);
    }
    t
}

static STATS: [(&str, Ty); 15] = [
    ("database", Text),
    ("total_xact_count", Int8),
    ("total_query_count", Int8),
    ("total_received", Int8),
    ("total_sent", Int8),
    ("total_xact_time", Int8),
    ("total_query_time", Int8),
    ("total_wait_time", Int8),
    ("avg_xact_count", Int8),
    ("avg_query_count", Int8),
    ("avg_recv", Int8),
    ("avg_sent", Int8),
    ("avg_xact_time", Int8),
    ("avg_query_time", Int8),
    ("avg_wait_time", Int8),
];

/// Totals since start (times in microseconds, as PgBouncer). The `avg_*` rates are per
/// second since start and the `avg_*_time` values are means per transaction, query and
/// wait, rather than PgBouncer's last-period figures: iampool keeps no periods.
pub fn stats_table(ctx: &dyn Context) -> Table {
    let started = ctx.started_at();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(started);
    let uptime = (now - started).max(1);
    let secs_to_us = |s: f64| (s * 1e6) as i64;
    let mean = |sum: i64, n: u64| if n == 0 { 0 } else { sum / n as i64 };
    let mut t = Table::new(&STATS);
    for p in pools(ctx) {
        let m = &p.metrics;
        let (xacts, queries) = (m.transactions.get(), m.queries.get());
        let (recv, sent) = (m.bytes_in.get(), m.bytes_out.get());
        let xact_time = secs_to_us(m.transaction.get_sample_sum());
        let query_time = secs_to_us(m.query.get_sample_sum());
        let wait_time = secs_to_us(m.wait.get_sample_sum());
        let rate = |n: u64| n as i64 / uptime;
        t.push(vec![
            p.database.as_str().into(),
            xacts.into(),
            queries.into(),
            recv.into(),
            sent.into(),
            xact_time.into(),
            query_time.into(),
            wait_time.into(),
            rate(xacts).into(),
            rate(queries).into(),
            rate(recv).into(),
            rate(sent).into(),
            mean(xact_time, m.transaction.get_sample_count()).into(),
            mean(query_time, m.query.get_sample_count()).into(),
            mean(wait_time, m.wait.get_sample_count()).into(),
        ]);
    }
    t
}

/// `2024-05-01 12:00:00 UTC`, as PgBouncer prints times.
fn timestamp(t: SystemTime) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from(t)
        .format(&fmt)
        .unwrap_or_default()
}

fn client_ptr(id: u64) -> String {
    format!("{id:#x}")
}

fn server_ptr(backend_pid: i32) -> String {
    format!("{backend_pid:#x}")
}

static CLIENTS: [(&str, Ty); 13] = [
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("local_addr", Text),
    ("local_port", Int4),
    ("connect_time", Text),
    ("ptr", Text),
    ("link", Text),
    ("tls", Text),
    ("application_name", Text),
];

/// One row per logged-in client (the console's own included). `state` is `active` while
/// the client holds a server, `waiting` while it is queued for one, and `idle` otherwise;
/// `link` is the server it holds (its `ptr` in SHOW SERVERS).
pub fn clients_table(ctx: &dyn Context) -> Table {
    let mut t = Table::new(&CLIENTS);
    for (id, c) in ctx.clients().snapshot() {
        let server = c.cancel.target();
        t.push(vec![
            "C".into(),
            c.user.as_str().into(),
            c.database.as_str().into(),
            if server.is_some() {
                "active"
            } else if c.cancel.waiting() {
                "waiting"
            } else {
                "idle"
            }
            .into(),
            c.peer.addr.as_str().into(),
            i64::from(c.peer.port).into(),
            c.local.addr.as_str().into(),
            i64::from(c.local.port).into(),
            timestamp(c.connected_at).into(),
            client_ptr(id).into(),
            server.map(|s| server_ptr(s.pid)).into(),
            c.tls.clone().into(),
            c.application_name.as_str().into(),
        ]);
    }
    t
}

static SERVERS: [(&str, Ty); 10] = [
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int8),
    ("application_name", Text),
];

/// One row per server connection in use, found through the client holding it.
pub fn servers_table(ctx: &dyn Context) -> Table {
    let mut t = Table::new(&SERVERS);
    for (id, c) in ctx.clients().snapshot() {
        let Some(server) = c.cancel.target() else {
            continue;
        };
        let user = ctx
            .pool(&c.database)
            .map(|p| p.user.clone())
            .unwrap_or_default();
        t.push(vec![
            "S".into(),
            user.into(),
            c.database.as_str().into(),
            "active".into(),
            server.addr.ip().to_string().into(),
            i64::from(server.addr.port()).into(),
            server_ptr(server.pid).into(),
            client_ptr(id).into(),
            i64::from(server.pid).into(),
            c.application_name.as_str().into(),
        ]);
    }
    for pool in ctx.pools() {
        for (pid, addr) in pool.idle_servers() {
            t.push(vec![
                "S".into(),
                pool.user.as_str().into(),
                pool.database.as_str().into(),
                "idle".into(),
                addr.ip().to_string().into(),
                i64::from(addr.port()).into(),
                server_ptr(pid).into(),
                "".into(),
                i64::from(pid).into(),
                "".into(),
            ]);
        }
    }
    t
}

static DATABASES: [(&str, Ty); 13] = [
    ("name", Text),
    ("host", Text),
    ("port", Int4),
    ("database", Text),
    ("force_user", Text),
    ("pool_size", Int4),
    ("min_pool_size", Int4),
    ("reserve_pool", Int4),
    ("pool_mode", Text),
    ("max_connections", Int4),
    ("current_connections", Int4),
    ("paused", Int4),
    ("disabled", Int4),
];

/// Every pool signs in as its upstream user, which is PgBouncer's `force_user`; iampool has
/// no reserve pool and no per-database connection cap (0 = none, as in PgBouncer).
pub fn databases_table(ctx: &dyn Context) -> Table {
    let mut t = Table::new(&DATABASES);
    for p in pools(ctx) {
        let st = p.status();
        let u = &p.connector().upstream;
        // The first host: where a login goes first when the hosts are tried in order.
        let host = &u.hosts[0];
        t.push(vec![
            p.database.as_str().into(),
            host.name.as_str().into(),
            i64::from(host.port).into(),
            u.dbname.as_str().into(),
            u.user.as_str().into(),
            st.pool_size.into(),
            st.min_pool_size.into(),
            0i64.into(),
            st.mode.map(|m| m.name()).into(),
            0i64.into(),
            (st.idle + st.active + st.connecting).into(),
            st.paused.into(),
            0i64.into(),
        ]);
    }
    t
}

static CONFIG: [(&str, Ty); 4] = [
    ("key", Text),
    ("value", Text),
    ("default", Text),
    ("changeable", Text),
];

/// Global keys with their effective values, read back from the redacted rendering so that
/// no secret can reach this table; per-database values are in SHOW DATABASES.
pub fn config_table(ctx: &dyn Context) -> Table {
    let rendered = ctx.config().render_redacted();
    let values: toml::Table = toml::from_str(&rendered).unwrap_or_default();
    let mut t = Table::new(&CONFIG);
    for key in KEYS.iter().filter(|k| k.scope == Scope::Global) {
        let value = values.get(key.name).map(toml_text).unwrap_or_default();
        let default = match key.default {
            DefaultValue::Value(v) => v.to_owned(),
            DefaultValue::Unset => String::new(),
            DefaultValue::Derived(how) => how.to_owned(),
        };
        t.push(vec![
            key.name.into(),
            value.into(),
            default.into(),
            if key.reload { "yes" } else { "no" }.into(),
        ]);
    }
    t
}

fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(toml_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

static VERSION: [(&str, Ty); 1] = [("version", Text)];

pub fn version_table() -> Table {
    let mut t = Table::new(&VERSION);
    t.push(vec![concat!("iampool ", env!("CARGO_PKG_VERSION")).into()]);
    t
}

static TOKENS: [(&str, Ty); 14] = [
    ("database", Text),
    ("user", Text),
    ("host", Text),
    ("auth", Text),
    ("region", Text),
    ("credential_identity", Text),
    ("token_expires_in", Int8),
    ("credentials_expire_in", Int8),
    ("tokens_signed", Int8),
    ("cache_hits", Int8),
    ("cache_misses", Int8),
    ("refresh_ok", Int8),
    ("refresh_failed", Int8),
    ("errors", Int8),
];

/// One row per upstream. IAM columns are NULL for password upstreams; times are whole
/// seconds (negative once passed), NULL before the first token or for credentials that do
/// not expire. The identity is the access key id, never the secret.
pub fn tokens_table(ctx: &dyn Context) -> Table {
    let mut t = Table::new(&TOKENS);
    for p in pools(ctx) {
        let u = &p.connector().upstream;
        let mut row: Vec<Cell> = vec![
            p.database.as_str().into(),
            u.user.as_str().into(),
            u.hosts[0].name.as_str().into(),
        ];
        match p.connector().iam() {
            None => {
                row.push("password".into());
                row.resize(TOKENS.len(), Cell::Null);
            }
            Some(iam) => {
                let s = iam.stats();
                let secs = |v: Option<f64>| v.map(|s| s.floor() as i64);
                row.extend([
                    "iam".into(),
                    iam.region().into(),
                    iam.credentials_identity().into(),
                    secs(iam.token_seconds_remaining()).into(),
                    secs(iam.credentials_seconds_remaining()).into(),
                    s.signed.into(),
                    s.hits.into(),
                    s.misses.into(),
                    s.refresh_ok.into(),
                    s.refresh_failed.into(),
                    s.errors.into(),
                ]);
            }
        }
        t.push(row);
    }
    t
}
