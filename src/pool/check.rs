//! server_check_query: a server that sat idle in the pool for server_check_delay or longer
//! answers it before a client gets it, and is closed instead if it does not.

use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{PoolSettings, Server};
use crate::server::session::SessionError;

/// The check `conn`, just taken from the idle list, needs before a client gets it, if any.
pub(super) fn due(settings: &PoolSettings, conn: &Server, now: Instant) -> bool {
    !settings.server_check_query.trim().is_empty()
        && now.saturating_duration_since(conn.idle_since) >= settings.server_check_delay
}

/// Whether `conn` may go to a client: it answered `sql` within `limit`. A server that
/// answers with an error is alive and idle (the query is at fault, not the server), so it
/// is handed out and the mistake logged; one that does not answer, or is left in a
/// transaction, is not.
pub(super) async fn passes(conn: &mut Server, sql: &str, limit: Duration) -> bool {
    match conn.check_alive(sql, limit).await {
        Ok(()) => true,
        Err(SessionError::Server { code, message }) => {
            warn!(backend_pid = conn.backend_pid, code = %code, error = %message,
                "server_check_query fails on a live server: fix it; the server is used anyway");
            true
        }
        Err(e) => {
            debug!(backend_pid = conn.backend_pid, error = %e,
                "server failed server_check_query; closing it");
            false
        }
    }
}
