//! The server side: connecting upstream, TLS, upstream authentication, server connection state.

pub mod auth;
pub mod cancel;
pub mod conn;
pub mod connect;
pub mod listing;
pub mod login_limit;
pub mod params;
pub mod role;
pub mod session;
pub mod tls;

pub use cancel::{CancelGate, CancelPass};
pub use conn::ServerConn;
pub use connect::{Connector, LoginError};
