//! Test support shared by the integration tests: a real PostgreSQL, test certificates, and
//! fake AWS endpoints.
//!
//! Each test module uses only some of these helpers, so unused ones are not dead code.
#![allow(dead_code)]

pub mod certs;
pub mod fake_aws;
pub mod pg;
pub mod rds;
