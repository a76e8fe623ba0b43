//! fedrec-sim: the researchers' simulator — datasets, splits, in-process federations over the real round state machines, baselines, reports and plots.
#![forbid(unsafe_code)]

pub mod audit;
pub mod baseline;
pub mod data;
pub mod federation;
pub mod fleet;
pub mod loadbench;
pub mod plot;
pub mod quic;
pub mod report;
pub mod secbench;
pub mod segments;
pub mod tune;
