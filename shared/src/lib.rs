//! fedrec-shared: the math and the protocol both sides of fedrec agree on — model, learning steps, clipping, noise, evaluation metrics and the sans-IO round state machines. No I/O, no clock, no ambient randomness.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod danger;
pub mod ddp;
pub mod error;
pub mod eval;
pub mod harness;
pub mod ledger;
pub mod linalg;
pub mod model;
pub mod privacy;
pub mod round;
pub mod secagg;
pub mod server;
pub mod stats;
pub mod train;
pub mod update;
pub mod wire;

pub use error::{ParamError, Rejection, SolveError, UpdateError};
pub use model::{GlobalModel, ModelInit, ModelShape, RoundModel, UpdateLayout};
pub use train::{Objective, Rating, TrainParams, UserState};
