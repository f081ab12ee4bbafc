//! Test support shared by the integration tests: a real PostgreSQL, fake AWS endpoints, and
//! (once added) test certificates.
//!
//! Each test module uses only some of these helpers, so unused ones are not dead code.
#![allow(dead_code)]

pub mod fake_aws;
pub mod pg;
