//! The PostgreSQL wire protocol: framing, message tags and the few messages iampool
//! builds or inspects. No I/O happens here, so all of it is unit-tested and fuzzable.

pub mod exchange;
pub mod framing;
pub mod md5;
pub mod messages;
pub mod scram;
pub mod session_state;
pub mod statements;
pub mod tx_modes;
