//! Composition root: builds shared state from a [`Config`](crate::config::Config) and runs.
