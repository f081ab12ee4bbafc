//! The one integration-test binary (one link, one shared PostgreSQL); each module is a suite.

#[path = "../support/mod.rs"]
mod support;

mod core;
mod drivers;
mod harness;
mod iam;
mod pgbench;
mod pooler;
mod prepared;
