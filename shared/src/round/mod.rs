//! Sans-IO round state machines: the coordinator's [`Coordinator`] and the device's [`ClientRound`].
//!
//! Both are driven the same way, after quinn-proto: inputs arrive through `handle_*` with
//! the current time, outputs are drained through `poll_*`, and deadlines are reported by
//! `poll_timeout` so that the driver (QUIC server, SDK, or simulator) owns the clock and the
//! sockets. The messages here are internal types; the wire module converts them.
//!
//! A round moves through phases (`CheckIn → Report → closed`). Secure aggregation will add
//! its key-exchange and unmasking phases between `Report` and the close, and swap the
//! plain [`crate::aggregate::Aggregator`] for a masked one, without touching the others.

mod client;
mod coordinator;

use std::sync::Arc;
use std::time::Duration;

pub use client::{ClientError, ClientOutcome, ClientRound};
pub use coordinator::{
    AbandonReason, AdaptiveClip, Coordinator, CoordinatorConfig, CoordinatorEvent, CoordinatorState,
    RoundPhase, RoundStats, Selection, StartError,
};

use crate::model::RoundModel;
use crate::train::TrainParams;
use crate::update::ClippedUpdate;

/// A point in time on the driver's clock, in microseconds since an arbitrary epoch.
///
/// The machines never read a clock: the driver passes `now` in, so a simulator can run a
/// round of an hour in a microsecond and tests are deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The epoch.
    pub const ZERO: Instant = Instant(0);

    /// `micros` microseconds after the epoch.
    pub fn from_micros(micros: u64) -> Self {
        Instant(micros)
    }

    /// Microseconds since the epoch.
    pub fn as_micros(self) -> u64 {
        self.0
    }

    /// This instant plus `d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        Instant(self.0.saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)))
    }

    /// Time elapsed since `earlier` (zero if `earlier` is later).
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

/// The coordinator's handle for one connected device (assigned by the driver, opaque here).
pub type ClientId = u64;

/// What a selected device is asked to do in a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The round.
    pub round: u64,
    /// The device's training hyper-parameters.
    pub train: TrainParams,
    /// The L2 bound the upload must respect.
    pub clip_norm: f32,
    /// Whether to report if the update was within the bound (adaptive clipping).
    pub report_clip_bit: bool,
    /// Time the device has to report, from receipt.
    pub report_window: Duration,
}

/// Messages from the coordinator to one device.
#[derive(Debug, Clone)]
pub enum ServerMessage {
    /// The device is selected: here are the task and the model to train on.
    Selected {
        /// What to do.
        task: Task,
        /// The model (shared, not copied, between devices in one process).
        model: Arc<RoundModel>,
    },
    /// The device is not selected this round.
    NotSelected {
        /// The round.
        round: u64,
    },
    /// The upload was accepted.
    Ack {
        /// The round.
        round: u64,
    },
    /// The upload was refused.
    Rejected {
        /// The round.
        round: u64,
        /// Why.
        reason: crate::error::Rejection,
    },
    /// The round was abandoned; nothing the device sent will be used.
    Aborted {
        /// The round.
        round: u64,
    },
}

/// Messages from a device to the coordinator.
///
/// An upload can only carry a [`ClippedUpdate`]: the device's interactions have no way onto
/// the network, and its user vector only as the (clipped) k-means statistic inside it.
#[derive(Debug, Clone)]
pub enum ClientMessage {
    /// The device is available for a round.
    CheckIn,
    /// The device's clipped update for `round`.
    Upload {
        /// The round.
        round: u64,
        /// The update.
        update: ClippedUpdate,
        /// Whether the update was within the bound before clipping; sent only when the task
        /// asks (adaptive clipping), where it is summed and noised like the update.
        within_bound: Option<bool>,
    },
}
