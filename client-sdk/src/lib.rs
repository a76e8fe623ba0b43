//! The fedrec on-device SDK: keeps the user's data on the device and drives the shared client round machine.

pub mod net;
