//! Test support shared by the integration tests: a real PostgreSQL, test certificates, fake
//! AWS endpoints and a fault-injecting TCP proxy.
//!
//! Each test module uses only some of these helpers, so unused ones are not dead code.
#![allow(dead_code)]

pub mod certs;
pub mod fake_aws;
pub mod fault_proxy;
pub mod pg;
pub mod rds;
