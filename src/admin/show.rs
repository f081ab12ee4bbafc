//! SHOW POOLS, DATABASES, CONFIG, VERSION and TOKENS.
//!
//! Columns are PgBouncer 1.25's, names, order and types (`int4` for its counts), so its
//! exporters and scripts read iampool too. Columns for states iampool does not have (cancel
//! requests queued, servers being tested) are present and 0, each saying why.

use std::sync::Arc;

use super::reply::{Cell, Table, Ty};
use super::Context;
use crate::config::keys::{DefaultValue, Scope, KEYS};
use crate::config::Named;
use crate::pool::Pool;

use Ty::{Int4, Int8, Text};

/// Pools sorted by database name, so output is stable.
pub(super) fn pools(ctx: &dyn Context) -> Vec<Arc<Pool>> {
    let mut pools = ctx.pools();
    pools.sort_by(|a, b| a.database.cmp(&b.database));
    pools
}

static POOLS: [(&str, Ty); 17] = [
    ("database", Text),
    ("user", Text),
    ("cl_active", Int4),
    ("cl_waiting", Int4),
    ("cl_active_cancel_req", Int4),
    ("cl_waiting_cancel_req", Int4),
    ("sv_active", Int4),
    ("sv_active_cancel", Int4),
    ("sv_being_canceled", Int4),
    ("sv_idle", Int4),
    ("sv_used", Int4),
    ("sv_tested", Int4),
    ("sv_login", Int4),
    ("maxwait", Int4),
    ("maxwait_us", Int4),
    ("pool_mode", Text),
    ("load_balance_hosts", Text),
];

/// The pool's `load_balance_hosts` when its upstream lists several hosts, as PgBouncer
/// shows it (NULL for one host).
fn load_balance_hosts(p: &Pool) -> Option<&'static str> {
    let u = &p.connector().upstream;
    (u.hosts.len() > 1).then(|| u.load_balance_hosts.name())
}

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
            load_balance_hosts(&p).into(),
        ]);
    }
    t
}

static DATABASES: [(&str, Ty); 17] = [
    ("name", Text),
    ("host", Text),
    ("port", Int4),
    ("database", Text),
    ("force_user", Text),
    ("pool_size", Int4),
    ("min_pool_size", Int4),
    ("reserve_pool_size", Int4),
    ("server_lifetime", Int4),
    ("pool_mode", Text),
    ("load_balance_hosts", Text),
    ("max_connections", Int4),
    ("current_connections", Int4),
    ("max_client_connections", Int4),
    ("current_client_connections", Int4),
    ("paused", Int4),
    ("disabled", Int4),
];

/// Every pool signs in as its upstream user, which is PgBouncer's `force_user`.
/// `max_connections` is max_db_connections (counted per upstream database); there is no cap
/// on client connections per database: 0, which is PgBouncer's "none". `pool_mode` is the mode in force (every database has one here).
pub fn databases_table(ctx: &dyn Context) -> Table {
    let lifetime = ctx.config().server_lifetime.as_secs();
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
            st.reserve_pool_size.into(),
            lifetime.into(),
            st.mode.map(|m| m.name()).into(),
            load_balance_hosts(&p).into(),
            st.max_db_connections.into(),
            (st.idle + st.active + st.connecting).into(),
            0i64.into(),
            st.sessions.into(),
            st.paused.into(),
            st.disabled.into(),
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
