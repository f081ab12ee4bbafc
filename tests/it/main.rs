//! The one integration-test binary (one link, one shared PostgreSQL); each module is a suite.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod cancel;
mod client_auth;
mod client_knobs;
mod conninfo;
mod core;
mod drivers;
mod faults;
mod fidelity;
mod frontend;
mod harness;
mod iam;
mod inject;
mod knobs;
mod observability;
mod pgbench;
mod pgbouncer_import;
mod pooler;
mod prepared;
mod session_state;
mod signer;
mod topology;
mod upstream_auth;
