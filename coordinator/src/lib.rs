//! The fedrec coordinator: drives the shared round state machine for a population of devices. Today: its durable state (SQLite) and device authentication; the QUIC server lands next.
#![forbid(unsafe_code)]

pub mod auth;
pub mod server;
pub mod store;
