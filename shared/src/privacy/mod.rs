//! Privacy accounting: what a sequence of Poisson-subsampled Gaussian releases costs in
//! user-level (ε, δ)-differential privacy, and how much noise a target budget needs.
//!
//! The mechanism is the one the coordinator runs: each device takes part in a round
//! independently with probability `q` (Poisson sampling), the clipped updates are rounded to
//! a fixed-point grid and summed as integers, and exact discrete Gaussian noise with parameter
//! `noise_multiplier × Δ` is added, `Δ` the rounded sum's L2 sensitivity ([`discrete`]).
//! Neighbouring datasets differ by adding or removing one user (dp-accounting's
//! `ADD_OR_REMOVE_ONE`). The accountants below are those of the *continuous* sampled
//! Gaussian with the same noise multiplier; [`discrete`] states what that relies on (exact at
//! integer orders for removal, by Canonne, Kamath & Steinke 2020; a numerical check in one
//! dimension for addition, fractional orders and the PLD).
//!
//! What a round is charged (the update's and the clip bits' noise combined) and the inverse,
//! the update noise a target budget needs, are in [`charge`]: the coordinator, the device and
//! the simulator all price rounds there.
//!
//! Two accountants, both pure functions of the events:
//! - [`rdp`]: Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019),
//!   added over steps and events, converted to (ε, δ) with the bound of Canonne, Kamath &
//!   Steinke 2020 minimised over [`rdp::DEFAULT_ORDERS`].
//! - [`pld`]: privacy loss distributions discretised with pessimistic "connect the dots"
//!   (Doroshenko et al. 2022) and composed by FFT; tighter, and still an upper bound.
//!
//! Both reproduce Google's dp-accounting (0.6.0); `shared/tests/accountant.rs` checks them
//! against vectors that `scripts/accountant_vectors.py` computed with it.

use thiserror::Error;

pub mod calibrate;
pub mod charge;
pub mod discrete;
mod fft;
pub mod pld;
pub mod rdp;
mod special;

pub use calibrate::calibrate_noise;
pub use charge::{combined_noise_multiplier, round_rdp, update_noise_multiplier};

/// Why an accountant refused its inputs.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum PrivacyError {
    /// A sampling probability outside `[0, 1]`, or NaN.
    #[error("sampling probability must be in [0, 1], got {0}")]
    SamplingProbability(f64),
    /// A noise multiplier that is not a positive finite number.
    #[error("noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    /// A δ outside the open interval `(0, 1)`, or NaN.
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    /// An ε that is negative or NaN (or, as a calibration target, not positive and finite).
    #[error("epsilon must be a non-negative number (a calibration target: positive and finite), got {0}")]
    Epsilon(f64),
    /// A Rényi order that is not above 1, or NaN.
    #[error("Rényi orders must be greater than 1, got {0}")]
    Order(f64),
    /// RDP values and orders of different lengths, or none at all.
    #[error("{orders} Rényi orders for {values} RDP values (need as many, and at least one)")]
    OrdersMismatch {
        /// Number of orders given.
        orders: usize,
        /// Number of RDP values given.
        values: usize,
    },
    /// A PLD discretisation interval that is not a positive finite number.
    #[error("PLD discretization interval must be positive and finite, got {0}")]
    Discretization(f64),
    /// Two PLDs on different grids cannot be composed.
    #[error("cannot compose PLDs discretized at {left} and {right}")]
    DiscretizationMismatch {
        /// Interval of the left operand.
        left: f64,
        /// Interval of the right operand.
        right: f64,
    },
    /// The PLD would need more grid points than [`pld::MAX_POINTS`]: ε is enormous, or the
    /// discretisation interval too fine for it.
    #[error(
        "the privacy loss distribution would need {points} grid points (limit {limit}); use a coarser discretization"
    )]
    PldTooLarge {
        /// Points the distribution would need.
        points: u64,
        /// The limit.
        limit: u64,
    },
    /// Calibration was asked for a mechanism that releases nothing private (`q = 0` or no
    /// steps): any noise meets any target.
    #[error("nothing to calibrate: with q = 0 or no steps every noise multiplier meets the target")]
    NothingToCalibrate,
    /// Even the largest noise multiplier the calibration tries misses the target.
    #[error(
        "target epsilon {target_epsilon} is unreachable: noise multiplier {noise_multiplier} still gives {epsilon}"
    )]
    Unreachable {
        /// The target asked for.
        target_epsilon: f64,
        /// The largest noise multiplier tried ([`calibrate::SIGMA_MAX`]).
        noise_multiplier: f64,
        /// The ε it gives.
        epsilon: f64,
    },
}

/// One entry of the privacy ledger: `steps` rounds, each sampling every user independently
/// with probability `q` and adding Gaussian noise with standard deviation
/// `noise_multiplier × clip_norm` to the sum of clipped updates.
///
/// Only [`PrivacyEvent::new`] builds one, so every event an accountant sees is valid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyEvent {
    q: f64,
    noise_multiplier: f64,
    steps: u64,
}

impl PrivacyEvent {
    /// Checks and builds an event: `q` in `[0, 1]`, `noise_multiplier` positive and finite.
    /// `steps` may be 0 (an event that costs nothing).
    pub fn new(q: f64, noise_multiplier: f64, steps: u64) -> Result<Self, PrivacyError> {
        check_q(q)?;
        if !(noise_multiplier > 0.0 && noise_multiplier.is_finite()) {
            return Err(PrivacyError::NoiseMultiplier(noise_multiplier));
        }
        Ok(Self { q, noise_multiplier, steps })
    }

    /// The Poisson sampling probability of each round.
    pub fn q(&self) -> f64 {
        self.q
    }

    /// The noise standard deviation in units of the clip norm.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The number of rounds.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// True when the event costs no privacy at all (`q = 0` or no steps).
    pub fn is_free(&self) -> bool {
        self.q == 0.0 || self.steps == 0
    }
}

/// Which accountant turns events into (ε, δ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountantKind {
    /// Rényi DP over [`rdp::DEFAULT_ORDERS`]. Fast and simple; looser.
    Rdp,
    /// Privacy loss distributions on a grid of [`pld::DEFAULT_DISCRETIZATION`]. Tighter;
    /// its cost grows with ε / discretization. [`pld::epsilon`] takes another grid.
    Pld,
}

/// The smallest ε for which the composition of `events` is (ε, δ)-DP, as the chosen
/// accountant bounds it. No events cost ε = 0; the result may be `f64::INFINITY`.
pub fn epsilon(events: &[PrivacyEvent], delta: f64, kind: AccountantKind) -> Result<f64, PrivacyError> {
    match kind {
        AccountantKind::Rdp => rdp::epsilon(events, delta),
        AccountantKind::Pld => pld::epsilon(events, delta, pld::DEFAULT_DISCRETIZATION),
    }
}

/// The smallest δ for which the composition of `events` is (ε, δ)-DP, as the chosen
/// accountant bounds it.
pub fn delta(events: &[PrivacyEvent], epsilon: f64, kind: AccountantKind) -> Result<f64, PrivacyError> {
    match kind {
        AccountantKind::Rdp => rdp::delta(events, epsilon),
        AccountantKind::Pld => pld::delta(events, epsilon, pld::DEFAULT_DISCRETIZATION),
    }
}

pub(crate) fn check_q(q: f64) -> Result<(), PrivacyError> {
    if (0.0..=1.0).contains(&q) { Ok(()) } else { Err(PrivacyError::SamplingProbability(q)) }
}

pub(crate) fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if delta > 0.0 && delta < 1.0 { Ok(()) } else { Err(PrivacyError::Delta(delta)) }
}

pub(crate) fn check_epsilon(epsilon: f64) -> Result<(), PrivacyError> {
    if epsilon >= 0.0 { Ok(()) } else { Err(PrivacyError::Epsilon(epsilon)) }
}
