//! SHOW CLIENTS and SHOW SERVERS: one row per connection, with PgBouncer 1.25's 21 columns.
//!
//! `ptr` is the address of the object iampool keeps for the connection (its listing), and
//! `link` the `ptr` of the connection it is paired with; `id` is what KILL_CLIENT takes.
//! iampool refuses replication connections, so `replication` is always `none`. SHOW CLIENTS
//! has one column of iampool's own after PgBouncer's (`pinned`), as PgBouncer itself adds
//! columns at the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::reply::{Cell, Table, Ty};
use super::show::pools;
use super::Context;
use crate::client::registry::ClientInfo;
use crate::server::listing::{ServerInfo, ServerState};

use Ty::{Int4, Text};

/// PgBouncer 1.25's columns, both SHOWs; CLIENTS adds `pinned`.
macro_rules! connection_columns {
    ($($extra:expr),*) => {
        [
            ("type", Text),
            ("user", Text),
            ("database", Text),
            ("replication", Text),
            ("state", Text),
            ("addr", Text),
            ("port", Int4),
            ("local_addr", Text),
            ("local_port", Int4),
            ("connect_time", Text),
            ("request_time", Text),
            ("wait", Int4),
            ("wait_us", Int4),
            ("close_needed", Int4),
            ("ptr", Text),
            ("link", Text),
            ("remote_pid", Int4),
            ("tls", Text),
            ("application_name", Text),
            ("prepared_statements", Int4),
            ("id", Int4),
            $($extra),*
        ]
    };
}
static SERVERS: [(&str, Ty); 21] = connection_columns!();
static CLIENTS: [(&str, Ty); 22] = connection_columns!(("pinned", Text));

/// `2024-05-01 12:00:00 UTC`, as PgBouncer prints times.
pub(super) fn timestamp(t: SystemTime) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from(t)
        .format(&fmt)
        .unwrap_or_default()
}

fn ptr<T>(object: &Arc<T>) -> String {
    format!("{:p}", Arc::as_ptr(object))
}

/// A server is known to its client by its address and backend pid (the client's cancel
/// target).
type ServerKey = (SocketAddr, i32);

/// Every live server connection (closing ones left out), by the key its client knows.
fn servers(ctx: &dyn Context) -> HashMap<ServerKey, Arc<ServerInfo>> {
    ctx.pools()
        .iter()
        .flat_map(|p| p.servers.snapshot())
        .filter(|s| s.state() != ServerState::Closing)
        .map(|s| ((s.addr, s.backend_pid), s))
        .collect()
}

/// One row per logged-in client (the console's own included). `state` is `active` while
/// the client holds a server, `waiting` while it is queued for one, and `idle` otherwise;
/// `request_time` is when it last asked for a server (in session mode, which keeps one
/// server, that is its first request), `wait` how long it has been queued.
/// `application_name` is the one it logged in with. `close_needed` is unused for clients
/// (0, as in PgBouncer), and so is `prepared_statements`: the statements a client prepared
/// are its session's, not exported to the console. `remote_pid` is the client's process
/// over a unix socket, 0 over TCP. `pinned` names the session state a transaction-mode client
/// keeps its server for (empty when it is not pinned).
pub fn clients_table(ctx: &dyn Context) -> Table {
    let servers = servers(ctx);
    let now = SystemTime::now();
    let mut t = Table::new(&CLIENTS);
    for (id, c) in ctx.clients().snapshot() {
        let server = c.cancel.target();
        let linked = server.is_some();
        let waiting = !linked && c.cancel.waiting();
        let requested = c.cancel.requested_at();
        let wait = match requested {
            Some(since) if waiting => now.duration_since(since).unwrap_or_default(),
            _ => Duration::ZERO,
        };
        let link = server
            .and_then(|s| servers.get(&(s.addr, s.pid)))
            .map(ptr)
            .unwrap_or_default();
        t.push(vec![
            "C".into(),
            c.user.as_str().into(),
            c.database.as_str().into(),
            "none".into(),
            if linked {
                "active"
            } else if waiting {
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
            timestamp(requested.unwrap_or(c.connected_at)).into(),
            wait.as_secs().into(),
            i64::from(wait.subsec_micros()).into(),
            0i64.into(),
            ptr(&c).into(),
            link.into(),
            c.remote_pid.into(),
            c.tls.as_str().into(),
            c.application_name.as_str().into(),
            0i64.into(),
            id.into(),
            crate::protocol::session_state::names(c.cancel.pinned()).into(),
        ]);
    }
    t
}

/// One row per server connection, by database: `idle` in the pool, `active` while a client
/// has it, `being_canceled` while held back for a cancel on its way to it. Connections still
/// logging in (SHOW POOLS' sv_login) have no socket details yet and are not listed, nor are
/// those being closed. `request_time` is when a client last got it (to the pool's clock
/// tick), `close_needed` 1 once RECONNECT or a failover marked it to close when it comes
/// back, `application_name` its client's. `prepared_statements` counts the statements
/// iampool had prepared on it when it last changed hands. `wait` is unused for servers (0).
pub fn servers_table(ctx: &dyn Context) -> Table {
    // Which client holds each server.
    let holders: HashMap<ServerKey, Arc<ClientInfo>> = ctx
        .clients()
        .snapshot()
        .into_iter()
        .filter_map(|(_, c)| c.cancel.target().map(|s| ((s.addr, s.pid), c)))
        .collect();
    let mut t = Table::new(&SERVERS);
    for pool in pools(ctx) {
        for s in pool.servers.snapshot() {
            let state = s.state();
            if state == ServerState::Closing {
                continue;
            }
            let holder = holders.get(&(s.addr, s.backend_pid));
            let (local_addr, local_port) = match s.local {
                Some(a) => (a.ip().to_string(), a.port()),
                None => ("unix".to_owned(), 0),
            };
            let row: Vec<Cell> = vec![
                "S".into(),
                pool.user.as_str().into(),
                pool.database.as_str().into(),
                "none".into(),
                state.name().into(),
                s.addr.ip().to_string().into(),
                i64::from(s.addr.port()).into(),
                local_addr.into(),
                i64::from(local_port).into(),
                timestamp(s.connected_at).into(),
                timestamp(s.request_time()).into(),
                0i64.into(),
                0i64.into(),
                pool.close_needed(s.created()).into(),
                ptr(&s).into(),
                holder.map(ptr).unwrap_or_default().into(),
                s.backend_pid.into(),
                s.tls.as_str().into(),
                holder
                    .map(|c| c.application_name.clone())
                    .unwrap_or_default()
                    .into(),
                s.prepared_statements().into(),
                s.id.into(),
            ];
            t.push(row);
        }
    }
    t
}
