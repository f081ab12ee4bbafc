//! KILL and KILL_CLIENT: ending sessions and their server connections at once.
//!
//! A session is asked to end through its client's slot; an idle one ends at once, with a
//! FATAL that names the command. One that holds a server is given a moment to let it go
//! (a session-mode client between transactions does, and its server goes back clean);
//! after that the server's socket is cut: the session loses its server, which PostgreSQL
//! takes as the end of the transaction, and then ends.

use std::sync::Arc;
use std::time::Duration;

use super::Context;
use crate::client::cancel::{CancelSlot, Ending};
use crate::pool::Pool;

/// How long a session that holds a server has to end by itself.
const GRACE: Duration = Duration::from_millis(200);

/// Waits (up to GRACE) until none of `slots` holds a server.
async fn let_go(slots: &[Arc<CancelSlot>]) {
    let deadline = tokio::time::Instant::now() + GRACE;
    while slots.iter().any(|s| s.target().is_some()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Admin KILL of `pools`: each one's client sessions are ended and its server connections
/// closed, and it stays paused until RESUME (as in PgBouncer, clients that come meanwhile
/// wait). Returns (sessions ended, sockets cut).
pub async fn kill(ctx: &dyn Context, pools: Vec<Arc<Pool>>) -> (usize, usize) {
    let slots: Vec<Arc<CancelSlot>> = ctx
        .clients()
        .snapshot()
        .into_iter()
        .filter(|(_, c)| pools.iter().any(|p| p.database == c.database))
        .map(|(_, c)| c.cancel.clone())
        .collect();
    for s in &slots {
        s.end(Ending::Kill);
    }
    let_go(&slots).await;
    let cut = pools.iter().map(|p| p.kill()).sum();
    (slots.len(), cut)
}

/// Admin KILL_CLIENT `id`: ends that session, and cuts the server it holds, if any.
/// `None` if there is no such client; else how many sockets were cut (0 or 1).
pub async fn kill_client(ctx: &dyn Context, id: u64) -> Option<usize> {
    let client = ctx.clients().get(id)?;
    client.cancel.end(Ending::KillClient);
    let_go(std::slice::from_ref(&client.cancel)).await;
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
