//! SHOW USERS, LISTS, MEM and STATE, and the SHOWs of things iampool does not have (peers,
//! a DNS cache), which answer with PgBouncer 1.25's columns and no rows.

use std::collections::BTreeSet;
use std::mem::size_of;

use super::reply::{Table, Ty};
use super::Context;

use Ty::{Int4, Int8, Text};

/// Every user name iampool knows: client users (configured or from the auth file), console
/// users, and the users pools sign in upstream as.
fn user_names(ctx: &dyn Context) -> BTreeSet<String> {
    let config = ctx.config();
    let mut names: BTreeSet<String> = config.users.keys().cloned().collect();
    names.extend(config.admin_users.iter().cloned());
    names.extend(config.stats_users.iter().cloned());
    names.extend(ctx.pools().iter().map(|p| p.user.clone()));
    names
}

static USERS: [(&str, Ty); 8] = [
    ("name", Text),
    ("pool_size", Text),
    ("reserve_pool_size", Text),
    ("pool_mode", Text),
    ("max_user_connections", Int4),
    ("current_connections", Int4),
    ("max_user_client_connections", Int4),
    ("current_client_connections", Int4),
];

/// iampool sets no pool size, reserve or mode per user: empty and NULL, PgBouncer's "not
/// set"; `max_user_connections` is the one setting for every user (0: none), and there is
/// no cap on client connections per user. `current_connections` counts server
/// connections signed in as the user, `current_client_connections` clients logged in as it.
pub fn users_table(ctx: &dyn Context) -> Table {
    let pools = ctx.pools();
    let clients = ctx.clients().snapshot();
    let max_user_connections = ctx.config().max_user_connections;
    let mut t = Table::new(&USERS);
    for name in user_names(ctx) {
        let servers: usize = pools
            .iter()
            .filter(|p| p.user == name)
            .map(|p| {
                let st = p.status();
                st.idle + st.active + st.connecting
            })
            .sum();
        let logged_in = clients.iter().filter(|(_, c)| c.user == name).count();
        t.push(vec![
            name.into(),
            "".into(),
            "".into(),
            None::<&str>.into(),
            max_user_connections.into(),
            servers.into(),
            0i64.into(),
            logged_in.into(),
        ]);
    }
    t
}

static LISTS: [(&str, Ty); 2] = [("list", Text), ("items", Int4)];

/// PgBouncer's object counts. iampool keeps no free lists (a connection's memory goes back
/// to the allocator when it closes), no peers and no DNS cache (each login resolves its
/// host anew), so those rows are 0. `databases` counts configured databases (the console is
/// not one); `used_clients` every client connection, logging in or logged in;
/// `used_servers` every server connection, logging in or open.
pub fn lists_table(ctx: &dyn Context) -> Table {
    let pools = ctx.pools();
    let servers: usize = pools
        .iter()
        .map(|p| {
            let st = p.status();
            st.idle + st.active + st.connecting
        })
        .sum();
    let rows: [(&str, usize); 14] = [
        ("databases", ctx.config().databases.len()),
        ("users", user_names(ctx).len()),
        ("peers", 0),
        ("pools", pools.len()),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", ctx.open_clients()),
        ("login_clients", ctx.pending_logins()),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    let mut t = Table::new(&LISTS);
    for (list, items) in rows {
        t.push(vec![list.into(), items.into()]);
    }
    t
}

static MEM: [(&str, Ty); 5] = [
    ("name", Text),
    ("size", Int4),
    ("used", Int4),
    ("free", Int4),
    ("memtotal", Int4),
];

/// PgBouncer reports its slab caches here. iampool has none: each object is allocated when
/// it is needed and freed when it ends. So the rows are the kinds of object iampool keeps,
/// under PgBouncer's cache names: `size` is the fixed size of one (the structs iampool
/// keeps for it), `used` how many exist, `free` always 0, and `memtotal` size x used. That
/// is a floor: message buffers and strings are not counted (iampool holds no buffer for
/// a connection between requests).
pub fn mem_table(ctx: &dyn Context) -> Table {
    use crate::client::{cancel::CancelSlot, registry::ClientInfo, relay::Session};
    use crate::server::{listing::ServerInfo, ServerConn};
    let pools = ctx.pools();
    let servers: usize = pools.iter().map(|p| p.servers.snapshot().len()).sum();
    let config = ctx.config();
    let rows: [(&str, usize, usize); 5] = [
        (
            "user_cache",
            size_of::<crate::client::auth::UserAuth>(),
            config.users.len(),
        ),
        (
            "db_cache",
            size_of::<crate::config::Database>(),
            config.databases.len(),
        ),
        ("pool_cache", size_of::<crate::pool::Pool>(), pools.len()),
        (
            "server_cache",
            size_of::<ServerConn>() + size_of::<ServerInfo>(),
            servers,
        ),
        (
            "client_cache",
            size_of::<Session>() + size_of::<ClientInfo>() + size_of::<CancelSlot>(),
            ctx.clients().len(),
        ),
    ];
    let mut t = Table::new(&MEM);
    for (name, size, used) in rows {
        t.push(vec![
            name.into(),
            size.into(),
            used.into(),
            0i64.into(),
            size.saturating_mul(used).into(),
        ]);
    }
    t
}

static STATE: [(&str, Ty); 2] = [("key", Text), ("value", Text)];

/// `paused` once every pool is paused (PAUSE without a database); iampool never suspends.
pub fn state_table(ctx: &dyn Context) -> Table {
    let pools = ctx.pools();
    let paused = !pools.is_empty() && pools.iter().all(|p| p.status().paused);
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut t = Table::new(&STATE);
    for (key, value) in [
        ("active", !paused),
        ("paused", paused),
        ("suspended", false),
    ] {
        t.push(vec![key.into(), yes_no(value).into()]);
    }
    t
}

static PEERS: [(&str, Ty); 4] = [
    ("peer_id", Int4),
    ("host", Text),
    ("port", Int4),
    ("pool_size", Int4),
];
static PEER_POOLS: [(&str, Ty); 5] = [
    ("peer_id", Int4),
    ("cl_active_cancel_req", Int4),
    ("cl_waiting_cancel_req", Int4),
    ("sv_active_cancel", Int4),
    ("sv_login", Int4),
];
static DNS_HOSTS: [(&str, Ty); 3] = [("hostname", Text), ("ttl", Int8), ("addrs", Text)];
static DNS_ZONES: [(&str, Ty); 3] = [("zonename", Text), ("serial", Int8), ("count", Int4)];

/// iampool has no peers (a cancel request reaches the iampool that issued its key, or
/// none) and no DNS cache: these answer with no rows.
pub fn peers_table() -> Table {
    Table::new(&PEERS)
}

pub fn peer_pools_table() -> Table {
    Table::new(&PEER_POOLS)
}

pub fn dns_hosts_table() -> Table {
    Table::new(&DNS_HOSTS)
}

pub fn dns_zones_table() -> Table {
    Table::new(&DNS_ZONES)
}
