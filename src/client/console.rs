//! The console's front door, as the client side sees it: which database names reach the
//! admin console, who may use it, and what a console client is greeted with. The console
//! itself (`admin/`) is served through [`super::Context::serve_console`], so the client side
//! never reaches up into it.

use std::sync::Arc;

use bytes::BytesMut;

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

/// A client that signed in to the console: handed to [`super::Context::serve_console`].
pub struct ConsoleLogin {
    pub stream: Stream,
    /// Bytes the client sent after its startup packet.
    pub buf: BytesMut,
    pub role: Role,
    pub user: String,
    /// The client's slot: the console session ends when asked to through it.
    pub slot: Arc<crate::client::cancel::CancelSlot>,
}
