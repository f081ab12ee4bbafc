//! Test support shared by the integration tests: a real PostgreSQL, a real PgBouncer, test
//! certificates, fake AWS endpoints, a fault-injecting TCP proxy and a commit ledger.
//!
//! Each test module uses only some of these helpers, so unused ones are not dead code.
#![allow(dead_code)]

pub mod certs;
pub mod fake_aws;
pub mod fault_proxy;
pub mod ledger;
pub mod pg;
pub mod pgbouncer;
pub mod rds;
