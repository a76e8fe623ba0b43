//! Sans-IO round state machines: the coordinator's [`Coordinator`] and the device's [`ClientRound`].
//!
//! Both are driven the same way, after quinn-proto: inputs arrive through `handle_*` with
//! the current time, outputs are drained through `poll_*`, and deadlines are reported by
//! `poll_timeout` so that the driver (QUIC server, SDK, or simulator) owns the clock and the
//! sockets. The messages here are internal types; the wire module converts them.
//!
//! A round moves through phases. With plain aggregation: `CheckIn → Report → closed`. With
//! secure aggregation ([`secure`], the protocol of `docs/secagg.md`), `Report` is where the
//! selected devices advertise their round keys instead of uploading, and three phases follow
//! before the close: `ShareKeys → MaskedInput → Unmask`. Both end in the same commit: the
//! secure phases hand it the integer sum the plain aggregator would have computed.

mod client;
mod coordinator;
pub mod secure;

use std::sync::Arc;
use std::time::Duration;

pub use client::{ClientError, ClientOutcome, ClientRound, CraftedUpdate};
pub use coordinator::{
    AbandonReason, AdaptiveClip, Coordinator, CoordinatorConfig, CoordinatorEvent, CoordinatorState,
    DistributedNoise, RoundPhase, RoundStats, SecureAggregation, Selection, StartError, UnmaskJob,
    UnmaskResult, effective_noise_multiplier,
};
pub use secure::{
    DistributedCharge, DistributedPolicy, EncryptedShare, MaskedInputRequest, NeighbourKeys, SecAggSetup,
    ShareKeysRequest, UnmaskRequest, UnmaskShares,
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
    /// The round's privacy parameters, as the task declares them to the device.
    pub privacy: TaskPrivacy,
}

/// The privacy mechanism a round applies to the sum of the uploads, as a task declares it.
///
/// New mechanisms get new codes on the wire; a code a device does not know arrives as
/// [`Mechanism::Unknown`], which a device policy refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mechanism {
    /// No noise: the coordinator releases exact sums (no differential privacy).
    None,
    /// The coordinator adds Gaussian noise of `noise_multiplier · clip_norm` to the sum.
    CentralGaussian,
    /// Each device adds its share of discrete Gaussian noise before masking (`docs/ddp.md`):
    /// `noise_multiplier · clip_norm` is the noise on the sum when `min_reports` devices
    /// survive. Only with secure aggregation.
    DistributedDiscreteGaussian,
    /// A mechanism this version does not know (its wire code).
    Unknown(u16),
}

/// How the coordinator combines the uploads of a round, as a task declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Aggregation {
    /// The coordinator sees every clipped upload (for research; no protection from the
    /// coordinator).
    Plain,
    /// Secure aggregation: the coordinator sees only the sum of the survivors' masked uploads.
    Secure,
    /// A mode this version does not know (its wire code).
    Unknown(u16),
}

/// How devices are selected for a round, as a task declares it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskSelection {
    /// Each checked-in device is selected independently with probability `q`.
    Poisson {
        /// The sampling probability.
        q: f64,
    },
    /// The first `cohort` devices to check in are selected (no sampling the accountant models).
    FirstCome {
        /// The target cohort.
        cohort: u64,
    },
}

/// The privacy parameters of a round as its task declares them to a device: what the device
/// is promised, which its policy checks before it trains. A device cannot verify them (a
/// coordinator that lies about σ is caught only by secure aggregation with distributed
/// noise); they defend against a misconfigured coordinator, and the device records them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskPrivacy {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// The noise multiplier `σ` the round's charge is computed with (under adaptive clipping
    /// the combined multiplier of the update and the clipping bits); 0 without noise.
    pub noise_multiplier: f64,
    /// The L2 bound `C` on each upload.
    pub clip_norm: f32,
    /// The selection.
    pub selection: TaskSelection,
    /// The fewest reports with which a round without noise commits (a round with noise
    /// commits whatever the count: deciding on the exact count would release it).
    pub min_reports: u64,
    /// The configured population the expected cohort `q · population` (the round's public
    /// denominator) is computed from, when the coordinator has one.
    pub population: Option<u64>,
    /// The aggregation mode.
    pub aggregation: Aggregation,
}

impl TaskPrivacy {
    /// What a task that declares nothing promises: no noise, no sampling, no cohort, plain
    /// aggregation. A device policy with any noise floor refuses it.
    pub fn undeclared(clip_norm: f32) -> Self {
        Self {
            mechanism: Mechanism::None,
            noise_multiplier: 0.0,
            clip_norm,
            selection: TaskSelection::FirstCome { cohort: 0 },
            min_reports: 0,
            population: None,
            aggregation: Aggregation::Plain,
        }
    }

    /// The parameters a round of `config` with clip norm `clip_norm` runs with (its
    /// aggregation, central noise when `noise_multiplier > 0`, the combined multiplier under
    /// adaptive clipping).
    pub fn from_config(config: &CoordinatorConfig, clip_norm: f32) -> Self {
        let z = effective_noise_multiplier(config.noise_multiplier, config.adaptive_clip.as_ref());
        let distributed = config.secure.is_some_and(|sa| sa.distributed.is_some());
        Self {
            mechanism: match (z > 0.0, distributed) {
                (false, _) => Mechanism::None,
                (true, false) => Mechanism::CentralGaussian,
                (true, true) => Mechanism::DistributedDiscreteGaussian,
            },
            noise_multiplier: z,
            clip_norm,
            selection: match config.selection {
                Selection::Poisson { q } => TaskSelection::Poisson { q },
                Selection::FirstCome { cohort } => {
                    TaskSelection::FirstCome { cohort: u64::try_from(cohort).unwrap_or(u64::MAX) }
                }
            },
            min_reports: u64::try_from(config.min_reports).unwrap_or(u64::MAX),
            population: config.population.map(|n| u64::try_from(n).unwrap_or(u64::MAX)),
            aggregation: if config.secure.is_some() { Aggregation::Secure } else { Aggregation::Plain },
        }
    }

    /// The sampling probability the accountant charges: `q` under Poisson selection, 1 under
    /// first-come selection (no amplification by sampling).
    pub fn sampling_probability(&self) -> f64 {
        match self.selection {
            TaskSelection::Poisson { q } => q,
            TaskSelection::FirstCome { .. } => 1.0,
        }
    }
}

/// The cohort `n` a distributed-noise round is calibrated for: the most devices whose
/// encodings may enter one sum, `⌈e + 10√e + 10⌉` for the expected cohort `e = q · population`
/// (and at least `min_reports`). A public number, the same in neighbouring worlds: a round
/// whose key advertisement closes with more devices aborts (for a Poisson sample of mean `e`
/// that is a 10-standard-deviation event). `None` without Poisson selection or population.
pub fn ddp_cohort_bound(privacy: &TaskPrivacy) -> Option<usize> {
    let (TaskSelection::Poisson { q }, Some(population)) = (privacy.selection, privacy.population) else {
        return None;
    };
    let e = q * population as f64;
    let bound = (e + 10.0 * e.sqrt() + 10.0).ceil();
    if !(bound.is_finite() && bound >= 1.0 && bound < u32::MAX as f64) {
        return None;
    }
    let m = usize::try_from(privacy.min_reports).ok()?;
    Some((bound as usize).max(m))
}

/// The distributed-noise parameters of a round (`docs/ddp.md`), from what both sides know:
/// the task's declared privacy (noise multiplier `z`, `min_reports`, `q`, population), its
/// clip norm `C`, the update length `dim`, the ring `bits` and the round's public `seed` from
/// the secure-aggregation setup. The coordinator and every device compute them with this one
/// function, so a device derives `γ`, `σ_dev` and `D` itself instead of trusting numbers sent
/// to it. Target noise `σ = z · C`; `β` and the wrap bound are the library's defaults.
pub fn distributed_params(
    privacy: &TaskPrivacy,
    clip_norm: f32,
    dim: usize,
    bits: u32,
    seed: [u8; 32],
) -> Result<crate::ddp::DdpParams, crate::ddp::DdpError> {
    let c = f64::from(clip_norm);
    let min_reports = usize::try_from(privacy.min_reports).unwrap_or(usize::MAX);
    let n_cohort =
        ddp_cohort_bound(privacy).ok_or(crate::ddp::DdpError::Cohort { n_cohort: 0, min_reports })?;
    Ok(crate::ddp::DdpParams {
        dim,
        clip_norm: c,
        noise_std: privacy.noise_multiplier * c,
        n_cohort,
        min_reports,
        bits,
        beta: crate::ddp::params::DEFAULT_BETA,
        max_wrap_probability: crate::ddp::params::DEFAULT_WRAP_PROBABILITY,
        rotation_seed: seed,
    })
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
    /// Secure aggregation, phase 1: the cohort's keys and the round's parameters; the device
    /// answers with [`ClientMessage::EncryptedShares`].
    ShareKeys(ShareKeysRequest),
    /// Secure aggregation, phase 2: the shares the device's neighbours sealed for it; the
    /// device answers with [`ClientMessage::MaskedInput`].
    MaskedInputRequest(MaskedInputRequest),
    /// Secure aggregation, phase 3: which neighbours dropped out and which survived; the
    /// device answers with [`ClientMessage::UnmaskShares`].
    Unmask(UnmaskRequest),
}

/// Messages from a device to the coordinator.
///
/// An upload can only carry a [`ClippedUpdate`] (plain aggregation) or its masked encoding
/// (secure aggregation): the device's interactions have no way onto the network, and its user
/// vector only as the (clipped) k-means statistic inside it.
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
    /// Secure aggregation, phase 0: the device trained and advertises its two public keys for
    /// the round (instead of uploading).
    AdvertiseKeys {
        /// The round.
        round: u64,
        /// X25519 public key that seals shares sent to this device.
        cipher_public: [u8; 32],
        /// X25519 public key the pairwise masks are agreed with.
        mask_public: [u8; 32],
    },
    /// Secure aggregation, phase 1: the device's shares, each sealed for one neighbour.
    EncryptedShares {
        /// The round.
        round: u64,
        /// One sealed share pair per neighbour.
        shares: Vec<EncryptedShare>,
    },
    /// Secure aggregation, phase 2: the device's encoded update plus its masks, mod `2^bits`.
    MaskedInput {
        /// The round.
        round: u64,
        /// The masked words (the update's layout, then the clip bit when the task asks).
        words: Vec<u64>,
    },
    /// Secure aggregation, phase 3: the shares the coordinator asked for.
    UnmaskShares(UnmaskShares),
}
