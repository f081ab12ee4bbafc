//! The server side: connecting upstream, TLS, upstream authentication, server connection state.

pub mod tls;
