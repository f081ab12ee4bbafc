//! The client side: listener, startup handshake, client authentication and the relay.

pub mod tls;
