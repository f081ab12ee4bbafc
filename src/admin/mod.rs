//! The admin console: database `pgbouncer` (or `iampool`) speaks PgBouncer's SHOW, PAUSE,
//! RESUME, RECONNECT, RELOAD and SHUTDOWN over the simple query protocol.
//!
//! Users sign in exactly as to any database (auth_type, users); then `admin_users` may run
//! everything and `stats_users` only SHOW. A configured database of the same name wins, so
//! adding the console never takes a database away from its clients.

mod clients;
#[doc(hidden)] // pub for the fuzz targets
pub mod command;
mod execute;
mod reply;
mod session;
mod show;

use std::sync::Arc;

use bytes::BytesMut;

pub use clients::{ClientInfo, ClientRegistry, Endpoint, Registered};

use crate::app::Shared;
use crate::config::Config;
use crate::server::connect::ServerParamList;
use crate::stream::Stream;

/// Database names that reach the console.
pub const CONSOLE_DATABASES: [&str; 2] = ["pgbouncer", "iampool"];

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `admin_users`: every command.
    Admin,
    /// `stats_users`: SHOW only.
    Stats,
}

pub fn is_console_database(database: &str) -> bool {
    CONSOLE_DATABASES.contains(&database)
}

/// The user's console role, if any; admin wins when a user is in both lists.
pub fn role(config: &Config, user: &str) -> Option<Role> {
    if config.admin_users.iter().any(|u| u == user) {
        Some(Role::Admin)
    } else if config.stats_users.iter().any(|u| u == user) {
        Some(Role::Stats)
    } else {
        None
    }
}

/// The ParameterStatus set a console client gets at login. `server_version` names iampool
/// the way PgBouncer names itself, so clients can tell they reached the console.
pub fn welcome_params() -> Arc<ServerParamList> {
    let params = [
        (
            "server_version",
            concat!(env!("CARGO_PKG_VERSION"), "/iampool"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ];
    Arc::new(
        params
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    )
}

/// Serves a logged-in console client until it leaves or iampool shuts down.
pub async fn serve(shared: Arc<Shared>, stream: Stream, buf: BytesMut, role: Role, user: String) {
    session::Console {
        shared,
        stream,
        buf,
        role,
        user,
    }
    .run()
    .await
}
