//! The fedrec on-device SDK: keeps the user's data on the device and drives the shared client round machine.
//!
//! - [`sdk::Sdk`] is the API an app uses: one handle over the sealed local store, consent,
//!   signals, offline inference, context rules and participation in training rounds.
//! - [`policy`] is the device's own privacy policy and record: which tasks it accepts.
//! - [`ffi`] exposes that API to C (and so to Kotlin, Swift, ...). It is the only module that
//!   may contain `unsafe`.
#![deny(unsafe_code)]

pub mod content;
pub mod error;
pub mod ffi;
pub mod net;
pub mod policy;
pub mod recommend;
pub mod rules;
pub mod sdk;
pub mod signals;
pub mod store;
