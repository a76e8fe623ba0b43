//! The fedrec coordinator: drives the shared round state machine for a population of devices — its QUIC server, durable SQLite state, device authentication and configuration (the `fedrec-coordinator` binary is `src/main.rs`).
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod danger;
pub mod log_throttle;
pub mod metrics;
pub mod rules;
pub mod server;
pub mod store;
