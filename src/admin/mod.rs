//! The admin console: database `pgbouncer` (or `iampool`) speaks PgBouncer 1.25's console
//! over the simple query protocol: its SHOW commands with its columns, PAUSE, RESUME,
//! RECONNECT, KILL, KILL_CLIENT, WAIT_CLOSE, ENABLE, DISABLE, RELOAD and SHUTDOWN, and a
//! clear refusal of what iampool cannot do (SUSPEND, SHOW FDS, SET).
//!
//! Users sign in exactly as to any database (auth_type, users); then `admin_users` may run
//! everything and `stats_users` only SHOW. A configured database of the same name wins, so
//! adding the console never takes a database away from its clients.

#[doc(hidden)] // pub for the fuzz targets
pub mod command;
mod connections;
mod control;
mod execute;
mod inventory;
mod reply;
mod session;
mod show;
mod stats;

use std::sync::Arc;

use tokio::sync::watch;

use crate::client::console::ConsoleLogin;
pub use crate::client::console::Role;
use crate::client::registry::ClientRegistry;
use crate::config::{Config, ReloadReport};
use crate::pool::Pool;

/// What the console reads and controls. The composition root (`app::Shared`) provides it;
/// the console sees nothing else of the process.
pub trait Context: Send + Sync {
    /// The configuration in force (RELOAD replaces it).
    fn config(&self) -> Arc<Config>;
    /// Every pool, in no particular order.
    fn pools(&self) -> Vec<Arc<Pool>>;
    fn pool(&self, database: &str) -> Option<Arc<Pool>>;
    /// Logged-in clients, for SHOW CLIENTS and SHOW SERVERS.
    fn clients(&self) -> &ClientRegistry;
    /// When iampool started, in seconds since the Unix epoch.
    fn started_at(&self) -> i64;
    /// Client connections open, logging in or logged in.
    fn open_clients(&self) -> usize;
    /// Client connections still logging in.
    fn pending_logins(&self) -> usize;
    /// Re-reads the configuration and applies what can change live.
    fn reload(&self) -> Result<ReloadReport, String>;
    /// Starts a graceful shutdown.
    fn request_shutdown(&self);
    fn shutdown_signal(&self) -> watch::Receiver<bool>;
}

/// Serves a logged-in console client until it leaves or iampool shuts down.
pub async fn serve(ctx: Arc<dyn Context>, login: ConsoleLogin) {
    let ConsoleLogin {
        stream,
        buf,
        role,
        user,
        slot,
    } = login;
    session::Console {
        ctx,
        stream,
        buf,
        role,
        user,
        slot,
    }
    .run()
    .await
}
