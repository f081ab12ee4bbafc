//! iampool: a PostgreSQL connection pooler sidecar that signs in to RDS and Aurora with IAM.
//!
//! `main.rs` is thin; [`app`] is the composition root that builds the shared state and
//! hands it down. Nothing here is a process global, so tests start the real server
//! in-process on port 0.

pub mod admin;
pub mod app;
pub mod client;
pub mod config;
pub mod iam;
pub mod inject;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod stream;
pub mod tcp;
