//! KILL and KILL_CLIENT: ending sessions and their server connections at once.
//!
//! A session is asked to end through its client's slot; the one it is in ends at its next
//! step (an idle client at once, with a FATAL). A session that holds a server would go on
//! until its transaction ends, so that server's socket is cut as well: the session loses
//! its server, which PostgreSQL takes as the end of the transaction, and then ends.

use std::sync::Arc;

use super::Context;
use crate::client::cancel::Ending;
use crate::pool::Pool;

/// Admin KILL of `pools`: each one's client sessions are ended and its server connections
/// closed, and it stays paused until RESUME (as in PgBouncer, clients that come meanwhile
/// wait). Returns (sessions ended, sockets cut).
pub fn kill(ctx: &dyn Context, pools: Vec<Arc<Pool>>) -> (usize, usize) {
    let mut sessions = 0;
    let mut servers = 0;
    for pool in pools {
        // Sessions first: one whose server is cut next must end rather than carry on.
        for (_, c) in ctx.clients().snapshot() {
            if c.database == pool.database {
                c.cancel.end(Ending::Kill);
                sessions += 1;
            }
        }
        servers += pool.kill();
    }
    (sessions, servers)
}

/// Admin KILL_CLIENT `id`: ends that session, and cuts the server it holds, if any.
/// `None` if there is no such client; else how many sockets were cut (0 or 1).
pub fn kill_client(ctx: &dyn Context, id: u64) -> Option<usize> {
    let client = ctx.clients().get(id)?;
    client.cancel.end(Ending::KillClient);
    // Under the slot's lock the server cannot leave this client for another one.
    let cut = client.cancel.with_target(|target| {
        let Some(t) = target else { return 0 };
        ctx.pools()
            .iter()
            .map(|p| {
                p.servers
                    .cut(|s| s.addr == t.addr && s.backend_pid == t.pid)
            })
            .sum()
    });
    Some(cut)
}
