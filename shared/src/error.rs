//! Typed errors of the shared core: bad parameters, numerical failures and peers that misbehave.

use thiserror::Error;

/// A linear solve failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SolveError {
    /// The system matrix was not positive definite (or held a non-finite value).
    #[error("the normal equations are not positive definite")]
    NotPositiveDefinite,
}

/// A parameter failed validation; the message names the parameter and the accepted range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid parameter `{name}`: {reason}")]
pub struct ParamError {
    /// Which parameter.
    pub name: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ParamError {
    pub(crate) fn new(name: &'static str, reason: impl Into<String>) -> Self {
        Self { name, reason: reason.into() }
    }
}

/// Why an update vector was refused. Raised for local bugs and for peers alike.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// The vector does not have the layout's length.
    #[error("update has {got} values, the model's layout needs {expected}")]
    WrongLength {
        /// Length of the layout.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// A sparse update's rows are not ascending, unique and within the catalogue.
    #[error("update rows are not ascending, unique and within the catalogue")]
    BadRows,
    /// The vector holds NaN or an infinity.
    #[error("update holds a non-finite value")]
    NonFinite,
    /// The vector's L2 norm exceeds the clip norm (a peer that did not clip).
    #[error("update norm {norm} exceeds the clip norm {clip_norm}")]
    NormTooLarge {
        /// Measured norm.
        norm: f64,
        /// Bound it had to respect.
        clip_norm: f64,
    },
}

/// Why the coordinator refused a message from a device: the peer misbehaved or was late.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The message names a round that is not the current one.
    #[error("message for round {got}, current round is {current}")]
    WrongRound {
        /// Round named in the message.
        got: u64,
        /// The coordinator's current round.
        current: u64,
    },
    /// The device was not selected for this round.
    #[error("device was not selected for this round")]
    NotSelected,
    /// The device already reported in this round (a replay or a duplicate).
    #[error("device already reported in this round")]
    Duplicate,
    /// The round no longer accepts this message (its phase is over).
    #[error("the round is not accepting this message in its current phase")]
    WrongPhase,
    /// Adaptive clipping is on and the upload lacks the "within the bound" bit.
    #[error("the upload lacks the clipping bit adaptive clipping needs")]
    MissingClipBit,
    /// The update itself is malformed.
    #[error("invalid update: {0}")]
    InvalidUpdate(#[from] UpdateError),
    /// A secure-aggregation message does not follow the protocol (wrong length, unknown
    /// peer, a value outside the ring, shares other than those asked for).
    #[error("malformed secure-aggregation message: {0}")]
    Malformed(&'static str),
}

impl Rejection {
    /// A short stable label for counting rejections by reason (metrics, reports).
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::WrongRound { .. } => "wrong_round",
            Rejection::NotSelected => "not_selected",
            Rejection::Duplicate => "duplicate",
            Rejection::WrongPhase => "wrong_phase",
            Rejection::MissingClipBit => "missing_clip_bit",
            Rejection::InvalidUpdate(UpdateError::WrongLength { .. } | UpdateError::BadRows) => "wrong_shape",
            Rejection::InvalidUpdate(UpdateError::NonFinite) => "non_finite",
            Rejection::InvalidUpdate(UpdateError::NormTooLarge { .. }) => "norm_too_large",
            Rejection::Malformed(_) => "malformed",
        }
    }
}
