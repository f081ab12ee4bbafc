//! Server connection pools: one per (database, user).
