//! The coordinator's round state machine: check-in, selection, reports, and the commit that turns a noised sum into the next model.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::{CryptoRng, Rng};

use super::secure::{SecureAbort, SecureReject, ServerSecAgg};
use super::{ClientId, ClientMessage, Instant, ServerMessage, Task, TaskPrivacy};
use crate::aggregate::{Aggregator, NoisedSum};
use crate::ddp::{DdpEvent, DdpValidParams};
use crate::error::{ParamError, Rejection};
use crate::ledger::{DdpCharge, Ledger, LedgerEntry, PrivacyPolicy};
use crate::model::compact::DownloadEncoding;
use crate::model::subset::ItemSubset;
use crate::model::{GlobalModel, ModelShape, RoundModel, UpdateLayout};
use crate::privacy::PrivacyError;
use crate::privacy::discrete::Grid;
use crate::server::{CentroidPolicy, ServerOptimizer, ServerState};
use crate::train::TrainParams;

/// How devices that check in are selected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// The first `cohort` devices to check in are selected; the check-in phase closes as soon
    /// as the cohort is full. Not a sampling scheme the DP accountant can model: use it only
    /// without noise.
    FirstCome {
        /// Target cohort size.
        cohort: usize,
    },
    /// Each device that checks in before the check-in deadline is selected independently
    /// with probability `q` (Poisson sampling, which the accountant models). The update sum
    /// is normalised by the public expected cohort `q · population`
    /// ([`CoordinatorConfig::population`]), never by a count of this round's devices.
    Poisson {
        /// Sampling probability.
        q: f64,
    },
}

/// Adaptive clipping by quantile tracking (Andrew et al. 2021, "Differentially Private
/// Learning with Adaptive Clipping").
///
/// Each device also reports one bit: whether its update was within the current bound. The
/// coordinator sums the bits, adds Gaussian noise of standard deviation
/// `count_noise_multiplier` (the sum has sensitivity 1), estimates the fraction `b̄` of
/// unclipped updates over the expected cohort, and sets `C ← C · exp(−η (b̄ − γ))`. The bit
/// is a second Gaussian mechanism on the same sample: the accountant charges the combined
/// noise multiplier `(z⁻² + σ_b⁻²)^(−½)` (see [`Coordinator::effective_noise_multiplier`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClip {
    /// Target fraction `γ` of updates left unclipped, in `(0, 1)`.
    pub target_quantile: f32,
    /// Step `η` of the geometric update.
    pub learning_rate: f32,
    /// Noise `σ_b` on the sum of bits (an absolute standard deviation; sensitivity is 1).
    pub count_noise_multiplier: f32,
}

/// Secure aggregation (SecAgg+, `docs/secagg.md`): selected devices advertise keys instead of
/// uploading, and three more phases (share keys, masked input, unmask) follow, so that the
/// coordinator learns only the sum of the survivors' encoded updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureAggregation {
    /// Expected fraction `δ` of the cohort that drops out during the protocol (the parameter
    /// finder's input), in `[0, 1)`.
    pub dropout: f64,
    /// Fraction `γ` of devices that may collude with the coordinator, in `[0, 1)`.
    pub corrupt: f64,
    /// How long each of the three phases after key advertisement stays open.
    pub phase_window: Duration,
    /// Distributed noise (`docs/ddp.md`): each device adds its share of discrete Gaussian
    /// noise before masking, and the coordinator adds none; `None` is central noise (the
    /// coordinator noises the unmasked sum).
    pub distributed: Option<DistributedNoise>,
}

/// Distributed differential privacy on a secure round (`docs/ddp.md`, issue 12): devices
/// rotate, scale, round and noise their clipped update and wrap it to `bits` bits; SecAgg masks
/// those words; the coordinator decodes the unmasked sum and commits it without adding noise.
/// The noise multiplier `z` is the target: `min_reports` surviving shares carry `z · C` on the
/// sum, and a round with fewer survivors aborts. The cohort it is calibrated for is
/// [`super::ddp_cohort_bound`]. Adaptive clipping is refused with it (its clip bit would need
/// its own noise share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistributedNoise {
    /// Bits `b` per coordinate of the ring `Z/2^b`, in [`DistributedNoise::MIN_BITS`]`..=`[`DistributedNoise::MAX_BITS`].
    pub bits: u32,
}

impl DistributedNoise {
    /// Fewest bits (the secure-aggregation ring's minimum).
    pub const MIN_BITS: u32 = crate::secagg::encode::MIN_BITS;
    /// Most bits: 32, so that every masked word travels in 4 bytes and the `D < 2 · d` words
    /// of an encoding fit the masked-input limit of the layout (`wire::masked_input_limit`,
    /// 8 bytes per layout word); 32 bits are far more than any cohort needs.
    pub const MAX_BITS: u32 = 32;
}

/// The combined noise multiplier of the update and (under adaptive clipping) the clip bits.
/// ([`crate::privacy::combined_noise_multiplier`], the one formula).
pub fn effective_noise_multiplier(noise_multiplier: f32, adaptive: Option<&AdaptiveClip>) -> f64 {
    crate::privacy::combined_noise_multiplier(
        f64::from(noise_multiplier),
        adaptive.map(|a| f64::from(a.count_noise_multiplier)),
    )
}

/// Everything the coordinator needs to run rounds. Validated by [`Coordinator::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// Device-side hyper-parameters, sent with each task.
    pub train: TrainParams,
    /// Server optimizer for the item side.
    pub optimizer: ServerOptimizer,
    /// Selection policy.
    pub selection: Selection,
    /// Fewest reports with which a round may commit; fewer and it is abandoned. Only
    /// without noise: with noise every round commits, at its report deadline and never
    /// earlier, because a decision on the exact number of reports, or an early close once all
    /// selected devices reported, would itself release that number.
    pub min_reports: usize,
    /// The expected number of devices that check in per round: a public, configured number
    /// (in a simulation, the number of users). With Poisson selection the sum is divided by
    /// `q · population`, which does not depend on who took part (fixed-denominator
    /// DP-FedAvg, McMahan et al. 2018). Required with Poisson selection and noise; without
    /// noise and without it, the denominator falls back to `q ·` the devices that checked in
    /// (which is not private, and there is no privacy without noise anyway).
    pub population: Option<usize>,
    /// How long check-in stays open.
    pub checkin_window: Duration,
    /// How long selected devices have to report, from the end of check-in.
    pub report_window: Duration,
    /// L2 bound `C` on each upload (the starting value under adaptive clipping).
    pub clip_norm: f32,
    /// Adaptive clipping: `C` tracks a quantile of the update norms.
    pub adaptive_clip: Option<AdaptiveClip>,
    /// Noise standard deviation as a multiple of `C` (0 = no noise, no privacy).
    pub noise_multiplier: f32,
    /// Centroid update policy.
    pub centroids: CentroidPolicy,
    /// The privacy budget rounds may not exceed, and its accountant. Required whenever the
    /// coordinator adds noise in production; a simulation may leave it out and still read
    /// the spend from the ledger.
    pub privacy: Option<PrivacyPolicy>,
    /// Secure aggregation; `None` is plain aggregation (the coordinator sees each update).
    pub secure: Option<SecureAggregation>,
}

impl CoordinatorConfig {
    fn validate(&self) -> Result<(), ParamError> {
        self.train.validate()?;
        self.optimizer.validate()?;
        match self.selection {
            Selection::FirstCome { cohort: 0 } => {
                return Err(ParamError::new("cohort", "must be at least 1"));
            }
            Selection::Poisson { q } if !(q > 0.0 && q <= 1.0) => {
                return Err(ParamError::new("q", format!("sampling probability must be in (0, 1], got {q}")));
            }
            Selection::FirstCome { .. } if self.noise_multiplier > 0.0 => {
                return Err(ParamError::new(
                    "selection",
                    "noise requires Poisson selection: first-come selection is not what the accountant models",
                ));
            }
            Selection::Poisson { .. } if self.noise_multiplier > 0.0 && self.population.is_none() => {
                return Err(ParamError::new(
                    "population",
                    "Poisson selection with noise needs the expected population: the sum is divided by \
                     q x population, a public number, never by a count of this round's devices",
                ));
            }
            _ => {}
        }
        if self.population == Some(0) {
            return Err(ParamError::new("population", "must be at least 1"));
        }
        if self.min_reports == 0 {
            return Err(ParamError::new("min_reports", "must be at least 1"));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(ParamError::new(
                "clip_norm",
                format!("must be finite and > 0, got {}", self.clip_norm),
            ));
        }
        if let Some(a) = &self.adaptive_clip {
            if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                return Err(ParamError::new("target_quantile", "must be in (0, 1)"));
            }
            if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) {
                return Err(ParamError::new("clip_learning_rate", "must be finite and > 0"));
            }
            if !(a.count_noise_multiplier.is_finite() && a.count_noise_multiplier >= 0.0) {
                return Err(ParamError::new("count_noise_multiplier", "must be finite and ≥ 0"));
            }
            if self.noise_multiplier > 0.0 && a.count_noise_multiplier <= 0.0 {
                return Err(ParamError::new(
                    "count_noise_multiplier",
                    "with noise on the update, the clipping bits need noise too (> 0)",
                ));
            }
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(ParamError::new("noise_multiplier", "must be finite and ≥ 0"));
        }
        if self.privacy.is_some() && self.noise_multiplier <= 0.0 {
            return Err(ParamError::new("noise_multiplier", "a privacy budget needs noise (> 0)"));
        }
        if let Some(sa) = &self.secure {
            if !(0.0..1.0).contains(&sa.dropout) {
                return Err(ParamError::new("secagg_dropout", "must be in [0, 1)"));
            }
            if !(0.0..1.0).contains(&sa.corrupt) {
                return Err(ParamError::new("secagg_corrupt", "must be in [0, 1)"));
            }
            if sa.phase_window.is_zero() {
                return Err(ParamError::new("secagg_phase_window", "must be positive"));
            }
            if let Some(dn) = &sa.distributed {
                if !(DistributedNoise::MIN_BITS..=DistributedNoise::MAX_BITS).contains(&dn.bits) {
                    return Err(ParamError::new(
                        "bits",
                        format!(
                            "must be in {}..={}, got {}",
                            DistributedNoise::MIN_BITS,
                            DistributedNoise::MAX_BITS,
                            dn.bits
                        ),
                    ));
                }
                if self.noise_multiplier <= 0.0 {
                    return Err(ParamError::new(
                        "noise_multiplier",
                        "distributed noise needs a noise multiplier > 0 (the devices' shares carry it)",
                    ));
                }
                if self.adaptive_clip.is_some() {
                    return Err(ParamError::new(
                        "clip",
                        "adaptive clipping is refused with distributed noise: its clip bit would be \
                         released without the devices' noise",
                    ));
                }
            }
        }
        if !(self.centroids.noise_multiple.is_finite() && self.centroids.noise_multiple >= 0.0) {
            return Err(ParamError::new("centroid_noise_multiple", "must be finite and ≥ 0"));
        }
        if !(self.centroids.min_count.is_finite() && self.centroids.min_count >= 0.0) {
            return Err(ParamError::new("centroid_min_count", "must be finite and ≥ 0"));
        }
        if !(0.0..1.0).contains(&self.centroids.memory) {
            return Err(ParamError::new("centroid_memory", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.centroids.starve_fraction) {
            return Err(ParamError::new("centroid_starve_fraction", "must be in [0, 1]"));
        }
        Ok(())
    }
}

/// Why [`Coordinator::start_round`] refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A round is already open.
    #[error("round {0} is still open")]
    RoundOpen(u64),
    /// The round could take the spend past the budget.
    #[error(
        "privacy budget: one more round would spend ε = {would_spend:.4} of ε = {budget:.4} (δ = {delta:e}); spent so far ε = {spent:.4}"
    )]
    BudgetExhausted {
        /// ε spent so far.
        spent: f64,
        /// ε after the round.
        would_spend: f64,
        /// The budget's ε.
        budget: f64,
        /// The budget's δ.
        delta: f64,
    },
    /// The accountant refused its inputs.
    #[error("privacy accounting failed: {0}")]
    Accounting(#[from] PrivacyError),
    /// The round's fixed-point grid cannot be built (a clip norm that is not positive and
    /// finite), which secure aggregation needs.
    #[error("secure aggregation: {0}")]
    Encoding(crate::privacy::discrete::DiscreteNoiseError),
}

/// What the coordinator carries from round to round: everything a restart needs.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorState {
    /// The model.
    pub model: GlobalModel,
    /// Its version.
    pub version: u64,
    /// Optimizer and centroid state.
    pub server: ServerState,
    /// Every charge so far.
    pub ledger: Ledger,
    /// Index of the next round.
    pub next_round: u64,
    /// The clip norm of the next round (adaptive clipping moves it).
    pub clip_norm: f32,
}

/// Why a round was abandoned (no model change, nothing charged to the privacy budget).
/// Rounds with noise are abandoned only when secure aggregation cannot unmask their sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AbandonReason {
    /// Fewer devices were selected than `min_reports`.
    TooFewSelected,
    /// Fewer devices reported before the deadline than `min_reports`.
    TooFewReports,
    /// Secure aggregation could not complete (too few devices left for the threshold, or a
    /// secret could not be rebuilt): the sum cannot be unmasked, nothing is released.
    SecureAggregation,
    /// Distributed noise: fewer masked inputs survived than `min_reports`, so the sum carries
    /// less than the target noise and is not released (or more devices advertised keys than
    /// the cohort the noise is calibrated for).
    TooFewNoiseShares,
}

/// Counters of one round. Dropouts are data: they are reported here, not raised.
///
/// The counts (`n_checked_in`, `n_selected`, `n_reported`, `n_dropped`, `rejected`) are
/// exact and unnoised: they are for the driver in memory (a simulator's report). When
/// [`RoundStats::private`] is set they must not be stored, exported or logged: they would
/// reveal the round's sample, which only the noised sum may. Every other field is either
/// public configuration, a function of noised values, or the round's timing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundStats {
    /// Round index.
    pub round: u64,
    /// The round ran with noise (a differentially private round): its exact counts stay in
    /// memory.
    pub private: bool,
    /// Devices that checked in.
    pub n_checked_in: usize,
    /// Devices selected.
    pub n_selected: usize,
    /// Devices whose upload was accepted.
    pub n_reported: usize,
    /// Selected devices that never reported (dropouts, stragglers).
    pub n_dropped: usize,
    /// Refused messages, by [`Rejection::label`].
    pub rejected: Vec<(&'static str, usize)>,
    /// The normaliser the sum was divided by (public: `q · population`, or the reports of a
    /// round without noise).
    pub denominator: f64,
    /// Noise standard deviation per coordinate.
    pub noise_std: f32,
    /// The clip norm of this round.
    pub clip_norm: f32,
    /// Noised estimate of the fraction of updates within the clip norm (adaptive clipping).
    pub unclipped_fraction: Option<f64>,
    /// Model version the round trained on.
    pub base_version: u64,
    /// Time from the round's start to its close, on the driver's clock.
    pub duration: Duration,
}

/// What the coordinator tells its driver.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CoordinatorEvent {
    /// A round committed: the model advanced to `new_version`.
    RoundCommitted {
        /// The round's counters.
        stats: RoundStats,
        /// Version of the new model.
        new_version: u64,
    },
    /// A round was abandoned; the model is unchanged.
    RoundAbandoned {
        /// The round's counters.
        stats: RoundStats,
        /// Why.
        reason: AbandonReason,
    },
    /// A device's message was refused (the device was told).
    Rejected {
        /// Who.
        client: ClientId,
        /// Why.
        reason: Rejection,
    },
}

/// The phases of a round, as the driver sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoundPhase {
    /// Devices check in and are selected.
    CheckIn,
    /// Selected devices train and upload (secure aggregation: advertise their keys).
    Report,
    /// Secure aggregation: devices seal shares of their secrets for their neighbours.
    ShareKeys,
    /// Secure aggregation: devices send their masked inputs.
    MaskedInput,
    /// Secure aggregation: devices reveal the shares that unmask the sum (and then the
    /// coordinator unmasks it).
    Unmask,
    /// The sum is ready; a round with noise waits for its planned end to commit.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    CheckIn { deadline: Instant },
    Report { deadline: Instant },
    ShareKeys { deadline: Instant },
    MaskedInput { deadline: Instant },
    Unmask { deadline: Instant },
    Unmasking { deadline: Instant },
    Closing { deadline: Instant },
}

impl Phase {
    fn deadline(self) -> Instant {
        match self {
            Phase::CheckIn { deadline }
            | Phase::Report { deadline }
            | Phase::ShareKeys { deadline }
            | Phase::MaskedInput { deadline }
            | Phase::Unmask { deadline }
            | Phase::Unmasking { deadline }
            | Phase::Closing { deadline } => deadline,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Participant {
    /// Checked in, not selected: a repeated check-in in the same round gets the same answer
    /// (no second draw) and is not counted twice.
    NotSelected,
    Selected,
    Reported,
}

/// The task every selected device of `round` gets. Under secure aggregation the device
/// takes part until the last phase closes, at most check-in, report and three phase windows
/// after its selection (it may be selected as check-in opens).
fn round_task(config: &CoordinatorConfig, round: &Round) -> Task {
    let window = match config.secure {
        None => config.report_window,
        Some(sa) => config.checkin_window + config.report_window + sa.phase_window * 3,
    };
    Task {
        round: round.idx,
        train: config.train,
        clip_norm: round.clip_norm,
        report_clip_bit: config.adaptive_clip.is_some(),
        report_window: window,
        privacy: TaskPrivacy::from_config(config, round.clip_norm),
    }
}

/// Why a round whose secure phases failed is abandoned.
fn abandon_reason(e: &SecureAbort) -> AbandonReason {
    match e {
        SecureAbort::CohortOutsideCalibration { .. } => AbandonReason::TooFewNoiseShares,
        _ => AbandonReason::SecureAggregation,
    }
}

/// How long a deferred unmasking may take before the round is abandoned.
const UNMASK_GIVE_UP: Duration = Duration::from_secs(24 * 3600);

/// A secure round's unmasking, taken out of the machine so that a driver can run it off its
/// own task (see [`Coordinator::set_deferred_unmask`]).
#[derive(Debug)]
pub struct UnmaskJob {
    round: u64,
    secagg: Box<ServerSecAgg>,
}

impl UnmaskJob {
    /// Rebuilds the secrets and removes the masks: the survivors' integer sum, or why not.
    /// With distributed noise the sum is also decoded here (unrotated, `D log D`), off the
    /// owner's task like the unmasking.
    pub fn run(self) -> UnmaskResult {
        let ddp = self.secagg.ddp_params().cloned();
        let sum = self.secagg.finish();
        let decoded = match (&ddp, &sum) {
            (Some(params), Ok((lifted, n))) => Some(crate::ddp::decode_centred(lifted, params, *n)),
            _ => None,
        };
        UnmaskResult { round: self.round, sum, ddp: ddp.zip(decoded) }
    }
}

/// What an [`UnmaskJob`] found, for [`Coordinator::complete_unmask`].
#[derive(Debug)]
pub struct UnmaskResult {
    round: u64,
    sum: Result<(Vec<i64>, usize), SecureAbort>,
    /// Distributed noise: the round's parameters and the decoded sum (or why not).
    ddp: Option<(DdpValidParams, Result<Vec<f32>, crate::ddp::DdpError>)>,
}

/// How a round combines its devices' updates.
#[derive(Debug)]
enum Combine {
    /// The coordinator sums the clipped updates it receives.
    Plain(Aggregator),
    /// Secure aggregation: the coordinator sums masked inputs and unmasks only the total.
    Secure(Box<ServerSecAgg>),
    /// Secure aggregation while the survivors' sum is being unmasked.
    Unmasking,
    /// Secure aggregation after unmasking: the survivors' sum, on the round's grid.
    Unmasked(Aggregator),
    /// Distributed noise after unmasking and decoding: the survivors' sum, already noised by
    /// their shares.
    Decoded(NoisedSum),
}

#[derive(Debug)]
struct Round {
    idx: u64,
    started: Instant,
    phase: Phase,
    n_checked_in: usize,
    /// Every device that checked in this round, and what became of it.
    participants: HashMap<ClientId, Participant>,
    n_selected: usize,
    combine: Combine,
    /// Devices whose contribution is in the sum (plain: uploads accepted; secure: masked
    /// inputs unmasked).
    n_reported: usize,
    clip_norm: f32,
    /// What this round's devices get: the model, or its item subset's rows, as downloaded.
    served: Arc<RoundModel>,
    /// Sum of the devices' "within the bound" bits (adaptive clipping only).
    n_unclipped: usize,
    rejected: Vec<(&'static str, usize)>,
}

impl Round {
    fn count_rejection(&mut self, reason: &Rejection) {
        let label = reason.label();
        match self.rejected.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => self.rejected.push((label, 1)),
        }
    }
}

/// The coordinator: owns the global model, the optimizer state and the open round.
///
/// `R` must be a cryptographically secure RNG: it draws the selection and the noise.
#[derive(Debug)]
pub struct Coordinator<R> {
    config: CoordinatorConfig,
    layout: UpdateLayout,
    model: Arc<RoundModel>,
    server: ServerState,
    rng: R,
    round: Option<Round>,
    next_round: u64,
    clip_norm: f32,
    ledger: Ledger,
    outbox: VecDeque<(ClientId, ServerMessage)>,
    events: VecDeque<CoordinatorEvent>,
    /// The released noise is the configured noise divided by this; always 1 except after
    /// [`crate::danger::weaken_release_noise`] (privacy audits of a broken mechanism). The
    /// ledger charges the configured noise regardless.
    release_noise_divisor: f32,
    defer_unmask: bool,
    unmask_job: Option<UnmaskJob>,
    /// Distributed noise: the round's parameters with a zero seed (for the charge and the
    /// secure phases, which draw the real seed).
    ddp_template: Option<DdpValidParams>,
    /// Items each round trains (0: every item); see [`Coordinator::set_items_per_round`].
    items_per_round: usize,
    /// How rounds' models are downloaded; see [`Coordinator::set_download_encoding`].
    download: DownloadEncoding,
    /// Subset rounds: devices reconstruct from their cached full model; see
    /// [`Coordinator::set_simulated_cache`].
    simulated_cache: bool,
}

impl<R: Rng + CryptoRng> Coordinator<R> {
    /// A coordinator that starts from `model` at version 0.
    pub fn new(config: CoordinatorConfig, model: GlobalModel, rng: R) -> Result<Self, ParamError> {
        config.validate()?;
        let shape = model.shape();
        shape.validate()?;
        let layout = shape.layout();
        // The exact samplers have a range: refuse here what `release` could not noise.
        let out_of_range =
            |name, e: crate::privacy::discrete::DiscreteNoiseError| ParamError::new(name, e.to_string());
        let grid = match config.secure {
            None => Grid::for_sum(config.clip_norm, layout.len()),
            Some(_) => Grid::for_secure_sum(config.clip_norm, layout.len()),
        };
        grid.and_then(|grid| grid.noise(f64::from(config.noise_multiplier)))
            .map_err(|e| out_of_range("noise_multiplier", e))?;
        if let Some(a) = &config.adaptive_clip {
            crate::privacy::discrete::count_noise(f64::from(a.count_noise_multiplier))
                .map_err(|e| out_of_range("count_noise_multiplier", e))?;
        }
        let server = ServerState::new(config.optimizer, layout.trainable().len());
        let clip_norm = config.clip_norm;
        let ddp_template = Self::ddp_template_for(&config, clip_norm, layout.len())?;
        Ok(Self {
            config,
            layout,
            model: Arc::new(RoundModel::new(0, model)),
            server,
            rng,
            round: None,
            next_round: 0,
            clip_norm,
            ledger: Ledger::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            release_noise_divisor: 1.0,
            defer_unmask: false,
            unmask_job: None,
            ddp_template,
            items_per_round: 0,
            download: DownloadEncoding::F32,
            simulated_cache: false,
        })
    }

    fn ddp_template_for(
        config: &CoordinatorConfig,
        clip_norm: f32,
        len: usize,
    ) -> Result<Option<DdpValidParams>, ParamError> {
        match config.secure.and_then(|sa| sa.distributed) {
            None => Ok(None),
            Some(dn) => {
                let privacy = TaskPrivacy::from_config(config, clip_norm);
                let params = super::distributed_params(&privacy, clip_norm, len, dn.bits, [0; 32])
                    .and_then(crate::ddp::DdpParams::validate)
                    .map_err(|e| ParamError::new("bits", format!("distributed noise: {e}")))?;
                Ok(Some(params))
            }
        }
    }

    /// Every later round trains `k` items drawn from public randomness (a fresh 32-byte seed
    /// per round from this machine's generator, sent with the task, see
    /// [`crate::model::subset`]); each device downloads their rows and uploads densely over
    /// them, the sum and its noise cover the `k · (d + 1)` item coordinates plus the mean and the
    /// centroid statistics, and the server step moves only those rows. `0`, or `k` at least
    /// the catalogue, trains every item (the default). The sensitivity is unchanged: each
    /// upload is still clipped to `C` as a whole. Refused while a round is open.
    pub fn set_items_per_round(&mut self, k: usize) -> Result<(), ParamError> {
        if let Some(r) = &self.round {
            return Err(ParamError::new("items_per_round", format!("round {} is open", r.idx)));
        }
        let n_items = self.layout.shape().n_items;
        let k = if k >= n_items { 0 } else { k };
        let len = if k == 0 {
            self.layout.len()
        } else {
            ModelShape { n_items: k, ..self.layout.shape() }.layout().len()
        };
        let grid = match self.config.secure {
            None => Grid::for_sum(self.config.clip_norm, len),
            Some(_) => Grid::for_secure_sum(self.config.clip_norm, len),
        };
        grid.and_then(|grid| grid.noise(f64::from(self.config.noise_multiplier)))
            .map_err(|e| ParamError::new("noise_multiplier", e.to_string()))?;
        self.ddp_template = Self::ddp_template_for(&self.config, self.clip_norm, len)?;
        self.items_per_round = k;
        Ok(())
    }

    /// For simulations of subset rounds: each device is handed the current full model as its
    /// cached model ([`RoundModel::with_reference`]) and reconstructs its user vector from all
    /// its interactions; the update still covers the subset only. This models a device whose
    /// cache is fresh (on a real device, the model it holds, which may be older); nothing of it
    /// goes on the wire.
    pub fn set_simulated_cache(&mut self, on: bool) {
        self.simulated_cache = on;
    }

    /// The items each round trains (0: every item).
    pub fn items_per_round(&self) -> usize {
        self.items_per_round
    }

    /// How later rounds' models are downloaded (default [`DownloadEncoding::F32`]). With
    /// [`DownloadEncoding::Int8`] the coordinator rounds the factors stochastically once per
    /// round, and every device of the round trains on exactly the decoded values.
    pub fn set_download_encoding(&mut self, encoding: DownloadEncoding) {
        self.download = encoding;
    }

    /// The layout of the uploads of the open round (or of the next one): the model's, or over
    /// the round's item subset. A server decodes uploads and masked inputs with it.
    pub fn upload_layout(&self) -> UpdateLayout {
        match &self.round {
            Some(r) => r.served.model.shape().layout(),
            None if self.items_per_round > 0 => {
                ModelShape { n_items: self.items_per_round, ..self.layout.shape() }.layout()
            }
            None => self.layout,
        }
    }

    /// Divides the noise of every later release by `divisor` without changing what the
    /// ledger charges: a broken mechanism, reachable only through
    /// [`crate::danger::weaken_release_noise`].
    pub(crate) fn weaken_release_noise(&mut self, divisor: f32) {
        self.release_noise_divisor = divisor;
    }

    /// A coordinator resuming from `state` (as saved by [`Coordinator::state`]).
    pub fn restore(config: CoordinatorConfig, state: CoordinatorState, rng: R) -> Result<Self, ParamError> {
        let mut c = Self::new(config, state.model, rng)?;
        if state.server.n_params() != c.layout.trainable().len() {
            return Err(ParamError::new("state", "optimizer state does not match the model's shape"));
        }
        if !(state.clip_norm.is_finite() && state.clip_norm > 0.0) {
            return Err(ParamError::new("state", "clip norm must be finite and > 0"));
        }
        c.model = Arc::new(RoundModel::new(state.version, c.model.model.clone()));
        c.server = state.server;
        // The configuration wins where the operator may have changed it: the optimizer's
        // hyper-parameters, and a fixed clip norm (only adaptive clipping carries C over).
        c.server.set_optimizer(c.config.optimizer);
        if c.config.adaptive_clip.is_some() {
            c.clip_norm = state.clip_norm;
        }
        c.ledger = state.ledger;
        c.next_round = state.next_round;
        Ok(c)
    }

    /// Everything a restart needs, between rounds (`None` while a round is open: its
    /// progress is not persisted, and a restart abandons it).
    pub fn state(&self) -> Option<CoordinatorState> {
        if self.round.is_some() {
            return None;
        }
        Some(CoordinatorState {
            model: self.model.model.clone(),
            version: self.model.version,
            server: self.server.clone(),
            ledger: self.ledger.clone(),
            next_round: self.next_round,
            clip_norm: self.clip_norm,
        })
    }

    /// The privacy ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The charge one round of this configuration makes, if it makes one, with central noise
    /// (`None` with distributed noise: see [`Coordinator::round_ddp_charge`]).
    pub fn round_charge(&self, round: u64) -> Option<LedgerEntry> {
        if self.ddp_template.is_some() {
            return None;
        }
        self.config.round_charge(round)
    }

    /// The charge one committed round makes with distributed noise: the distributed
    /// accountant's event for `min_reports` noise shares, Poisson-sampled with the round's `q`
    /// (`docs/ddp.md`). `None` with central noise.
    pub fn round_ddp_charge(&self, round: u64) -> Option<DdpCharge> {
        let params = self.ddp_template.as_ref()?;
        let Selection::Poisson { q } = self.config.selection else { return None };
        let event = DdpEvent::new(params, params.params().min_reports, q, 1).ok()?;
        Some(DdpCharge { round, event })
    }

    /// The distributed-noise parameters of every round (with a zero rotation seed; each round
    /// draws its own), if rounds use distributed noise.
    pub fn ddp_params(&self) -> Option<&DdpValidParams> {
        self.ddp_template.as_ref()
    }

    /// The current model.
    pub fn model(&self) -> &Arc<RoundModel> {
        &self.model
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The clip norm the next round will use.
    pub fn clip_norm(&self) -> f32 {
        self.clip_norm
    }

    /// The noise multiplier one round costs in privacy: the update's, combined with the
    /// clipping bits' under adaptive clipping (two Gaussian queries on the same sample are
    /// one Gaussian query with `z = (z₁⁻² + z₂⁻²)^(−½)`). Zero means no privacy.
    pub fn effective_noise_multiplier(&self) -> f64 {
        effective_noise_multiplier(self.config.noise_multiplier, self.config.adaptive_clip.as_ref())
    }

    /// Whether rounds run with noise: their outcome and released values must not depend on
    /// the exact counts of the sample.
    pub fn is_private(&self) -> bool {
        self.config.noise_multiplier > 0.0
    }

    /// The phase of the open round, if any.
    pub fn phase(&self) -> Option<RoundPhase> {
        self.round.as_ref().map(|r| match r.phase {
            Phase::CheckIn { .. } => RoundPhase::CheckIn,
            Phase::Report { .. } => RoundPhase::Report,
            Phase::ShareKeys { .. } => RoundPhase::ShareKeys,
            Phase::MaskedInput { .. } => RoundPhase::MaskedInput,
            Phase::Unmask { .. } | Phase::Unmasking { .. } => RoundPhase::Unmask,
            Phase::Closing { .. } => RoundPhase::Closing,
        })
    }

    /// Whether rounds use secure aggregation.
    pub fn is_secure(&self) -> bool {
        self.config.secure.is_some()
    }

    /// Index of the open round, if any.
    pub fn current_round(&self) -> Option<u64> {
        self.round.as_ref().map(|r| r.idx)
    }

    /// Opens the next round; check-in is open until `now + checkin_window`.
    pub fn start_round(&mut self, now: Instant) -> Result<u64, StartError> {
        if let Some(r) = &self.round {
            return Err(StartError::RoundOpen(r.idx));
        }
        let idx = self.next_round;
        if let Some(policy) = &self.config.privacy {
            // What the ledger would have spent after this round (central or distributed).
            let delta = policy.budget.delta();
            let would_spend = match (self.round_charge(idx), self.round_ddp_charge(idx)) {
                (Some(charge), _) => Some(self.ledger.epsilon_with(&charge, delta, policy.accountant)?),
                (None, Some(charge)) => Some(self.ledger.epsilon_with_ddp(&charge, delta)?),
                (None, None) => None,
            };
            if let Some(would_spend) = would_spend.filter(|&e| e > policy.budget.epsilon()) {
                let spent = self.ledger.epsilon(delta, policy.accountant)?;
                return Err(StartError::BudgetExhausted {
                    spent,
                    would_spend,
                    budget: policy.budget.epsilon(),
                    delta,
                });
            }
        }
        // The model this round's devices get: the item subset's rows (from a fresh public
        // seed), encoded for download. Neither: the model itself, shared.
        let subset = if self.items_per_round > 0 {
            let mut seed = [0u8; 32];
            self.rng.fill(&mut seed);
            Some(
                ItemSubset::draw(self.layout.shape().n_items, self.items_per_round, seed)
                    .expect("items_per_round is checked against the catalogue when set"),
            )
        } else {
            None
        };
        let served = if subset.is_none() && self.download == DownloadEncoding::F32 {
            Arc::clone(&self.model)
        } else {
            let with_cache = self.simulated_cache && subset.is_some();
            let m = RoundModel::for_round(
                self.model.version,
                &self.model.model,
                subset,
                self.download,
                &mut self.rng,
            );
            Arc::new(if with_cache { m.with_reference(Arc::clone(&self.model)) } else { m })
        };
        let layout = served.model.shape().layout();
        let combine = match (self.config.secure, &self.ddp_template) {
            // Without noise the exact sum is released: no grid to round onto.
            (None, _) if !self.is_private() => {
                Combine::Plain(Aggregator::without_noise(layout, self.clip_norm))
            }
            (None, _) => Combine::Plain(Aggregator::new(layout, self.clip_norm)),
            (Some(sa), Some(template)) => Combine::Secure(Box::new(ServerSecAgg::new_distributed(
                idx,
                *template.params(),
                sa.dropout,
                sa.corrupt,
            ))),
            (Some(sa), None) => {
                let grid =
                    Grid::for_secure_sum(self.clip_norm, layout.len()).map_err(StartError::Encoding)?;
                let clip_bit = self.config.adaptive_clip.is_some();
                Combine::Secure(Box::new(ServerSecAgg::new(
                    idx,
                    layout.len(),
                    grid,
                    clip_bit,
                    sa.dropout,
                    sa.corrupt,
                )))
            }
        };
        self.next_round += 1;
        self.round = Some(Round {
            idx,
            started: now,
            phase: Phase::CheckIn { deadline: now.saturating_add(self.config.checkin_window) },
            n_checked_in: 0,
            participants: HashMap::new(),
            n_selected: 0,
            combine,
            n_reported: 0,
            clip_norm: self.clip_norm,
            served,
            n_unclipped: 0,
            rejected: Vec::new(),
        });
        Ok(idx)
    }

    /// A message arrived from `client`.
    pub fn handle_message(&mut self, now: Instant, client: ClientId, msg: ClientMessage) {
        let (round, result) = match msg {
            ClientMessage::CheckIn => {
                self.handle_check_in(now, client);
                self.handle_timeout(now);
                return;
            }
            ClientMessage::Upload { round, update, within_bound } => {
                (round, self.accept_upload(now, client, round, update, within_bound))
            }
            ClientMessage::AdvertiseKeys { round, .. }
            | ClientMessage::EncryptedShares { round, .. }
            | ClientMessage::MaskedInput { round, .. } => {
                (round, self.accept_secure(now, client, round, msg))
            }
            ClientMessage::UnmaskShares(ref u) => {
                let round = u.round;
                (round, self.accept_secure(now, client, round, msg))
            }
        };
        if let Err(reason) = result {
            let current = self.current_round().unwrap_or(round);
            if let Some(r) = self.round.as_mut() {
                r.count_rejection(&reason);
            }
            self.outbox
                .push_back((client, ServerMessage::Rejected { round: current, reason: reason.clone() }));
            self.events.push_back(CoordinatorEvent::Rejected { client, reason });
        }
        self.handle_timeout(now);
    }

    /// A secure-aggregation message: accepted only from a selected device, in its phase.
    fn accept_secure(
        &mut self,
        now: Instant,
        client: ClientId,
        msg_round: u64,
        msg: ClientMessage,
    ) -> Result<(), Rejection> {
        let round = self.round.as_mut().ok_or(Rejection::WrongPhase)?;
        if msg_round != round.idx {
            return Err(Rejection::WrongRound { got: msg_round, current: round.idx });
        }
        match round.participants.get(&client) {
            None | Some(Participant::NotSelected) => return Err(Rejection::NotSelected),
            Some(Participant::Reported) => return Err(Rejection::Duplicate),
            Some(Participant::Selected) => {}
        }
        let sa = match &mut round.combine {
            Combine::Secure(sa) => sa,
            Combine::Unmasking | Combine::Unmasked(_) | Combine::Decoded(_) => {
                return Err(Rejection::WrongPhase);
            }
            Combine::Plain(_) => {
                return Err(Rejection::Malformed("a secure-aggregation message in a plain round"));
            }
        };
        let open = now < round.phase.deadline();
        let reject = |e: SecureReject| match e {
            SecureReject::NotExpected => Rejection::WrongPhase,
            SecureReject::Duplicate => Rejection::Duplicate,
            SecureReject::Malformed(what) => Rejection::Malformed(what),
        };
        match (msg, round.phase) {
            (
                ClientMessage::AdvertiseKeys { cipher_public, mask_public, .. },
                Phase::CheckIn { .. } | Phase::Report { .. },
            ) if open => sa.add_keys(client, cipher_public, mask_public).map_err(reject),
            (ClientMessage::EncryptedShares { shares, .. }, Phase::ShareKeys { .. }) if open => {
                sa.add_shares(client, shares).map_err(reject)
            }
            (ClientMessage::MaskedInput { words, .. }, Phase::MaskedInput { .. }) if open => {
                sa.add_masked(client, &words).map_err(reject)
            }
            (ClientMessage::UnmaskShares(answer), Phase::Unmask { .. }) if open => {
                sa.add_unmask(client, answer).map_err(reject)?;
                round.participants.insert(client, Participant::Reported);
                self.outbox.push_back((client, ServerMessage::Ack { round: round.idx }));
                Ok(())
            }
            _ => Err(Rejection::WrongPhase),
        }
    }

    fn handle_check_in(&mut self, now: Instant, client: ClientId) {
        let Some(round) = self.round.as_mut() else {
            // No round open: the device will check in again later.
            self.outbox.push_back((client, ServerMessage::NotSelected { round: self.next_round }));
            return;
        };
        // A selected device that checks in again (its task was lost on the way, or it was told
        // to come back) gets its task again while it may still report; one that reported
        // learns that its upload was taken. Neither is counted or drawn again.
        let may_report = match round.phase {
            Phase::CheckIn { .. } => true,
            Phase::Report { deadline } => now < deadline,
            // Secure aggregation past its key advertisement: a device that lost its state
            // cannot rejoin the protocol.
            _ => false,
        };
        match round.participants.get(&client) {
            Some(Participant::Selected) if may_report => {
                let task = round_task(&self.config, round);
                self.outbox
                    .push_back((client, ServerMessage::Selected { task, model: Arc::clone(&round.served) }));
                return;
            }
            Some(Participant::Reported) => {
                self.outbox.push_back((client, ServerMessage::Ack { round: round.idx }));
                return;
            }
            _ => {}
        }
        let open = matches!(round.phase, Phase::CheckIn { deadline } if now < deadline);
        if !open || round.participants.contains_key(&client) {
            self.outbox.push_back((client, ServerMessage::NotSelected { round: round.idx }));
            return;
        }
        round.n_checked_in += 1;
        let selected = match self.config.selection {
            Selection::FirstCome { cohort } => round.n_selected < cohort,
            Selection::Poisson { q } => self.rng.random_bool(q),
        };
        if !selected {
            round.participants.insert(client, Participant::NotSelected);
            self.outbox.push_back((client, ServerMessage::NotSelected { round: round.idx }));
            return;
        }
        round.participants.insert(client, Participant::Selected);
        round.n_selected += 1;
        let task = round_task(&self.config, round);
        self.outbox.push_back((client, ServerMessage::Selected { task, model: Arc::clone(&round.served) }));
        if let Selection::FirstCome { cohort } = self.config.selection
            && round.n_selected >= cohort
        {
            round.phase = Phase::Report { deadline: now.saturating_add(self.config.report_window) };
        }
    }

    fn accept_upload(
        &mut self,
        now: Instant,
        client: ClientId,
        round_idx: u64,
        update: crate::update::ClippedUpdate,
        within_bound: Option<bool>,
    ) -> Result<(), Rejection> {
        let round = self.round.as_mut().ok_or(Rejection::WrongPhase)?;
        if round_idx != round.idx {
            return Err(Rejection::WrongRound { got: round_idx, current: round.idx });
        }
        let Combine::Plain(aggregator) = &mut round.combine else {
            return Err(Rejection::Malformed("a plain upload in a secure round"));
        };
        match round.participants.get(&client) {
            None | Some(Participant::NotSelected) => return Err(Rejection::NotSelected),
            Some(Participant::Reported) => return Err(Rejection::Duplicate),
            Some(Participant::Selected) => {}
        }
        let deadline = match round.phase {
            Phase::CheckIn { .. } => None,
            phase => Some(phase.deadline()),
        };
        if deadline.is_some_and(|d| now >= d) {
            return Err(Rejection::WrongPhase);
        }
        let bit = match (self.config.adaptive_clip.is_some(), within_bound) {
            (true, Some(bit)) => usize::from(bit),
            (true, None) => return Err(Rejection::MissingClipBit),
            // Not asked for: not looked at, not kept.
            (false, _) => 0,
        };
        aggregator.add(&update)?;
        round.n_reported += 1;
        round.n_unclipped += bit;
        round.participants.insert(client, Participant::Reported);
        self.outbox.push_back((client, ServerMessage::Ack { round: round.idx }));
        Ok(())
    }

    /// Advances phases whose deadline has passed or whose work is done; commits or abandons.
    pub fn handle_timeout(&mut self, now: Instant) {
        let private = self.is_private();
        let phase_window = self.config.secure.map_or(Duration::ZERO, |sa| sa.phase_window);
        loop {
            let Some(round) = self.round.as_mut() else { return };
            let n_selected = round.n_selected;
            let n_reported = round.n_reported;
            match (round.phase, &mut round.combine) {
                (Phase::CheckIn { deadline }, _) => {
                    if now < deadline {
                        return;
                    }
                    if !private && n_selected < self.config.min_reports {
                        self.close(now, Err(AbandonReason::TooFewSelected));
                        return;
                    }
                    round.phase =
                        Phase::Report { deadline: deadline.saturating_add(self.config.report_window) };
                }
                (Phase::Report { deadline }, Combine::Plain(_)) => {
                    // Without noise a round closes as soon as every selected device reported.
                    // With noise only at its deadline: an early close would tell anyone who sees
                    // when the next round opens that every selected device reported in time.
                    if (!private && n_reported == n_selected) || now >= deadline {
                        self.close(now, Ok(()));
                    }
                    return;
                }
                // Secure aggregation (docs/secagg.md). Each phase closes once every device it
                // waits for has answered, or at its deadline; a round with noise still
                // commits only at its planned end (`Phase::Closing`).
                (Phase::Report { deadline }, Combine::Secure(sa)) => {
                    if sa.n_keys() < n_selected && now < deadline {
                        return;
                    }
                    match sa.close_keys(&mut self.rng) {
                        Ok(requests) => {
                            for (client, req) in requests {
                                self.outbox.push_back((client, ServerMessage::ShareKeys(req)));
                            }
                            round.phase = Phase::ShareKeys { deadline: now.saturating_add(phase_window) };
                        }
                        Err(e) => return self.close(now, Err(abandon_reason(&e))),
                    }
                }
                (Phase::ShareKeys { deadline }, Combine::Secure(sa)) => {
                    if sa.n_shared() < sa.cohort_len() && now < deadline {
                        return;
                    }
                    match sa.close_shares() {
                        Ok(requests) => {
                            for (client, req) in requests {
                                self.outbox.push_back((client, ServerMessage::MaskedInputRequest(req)));
                            }
                            round.phase = Phase::MaskedInput { deadline: now.saturating_add(phase_window) };
                        }
                        Err(e) => return self.close(now, Err(abandon_reason(&e))),
                    }
                }
                (Phase::MaskedInput { deadline }, Combine::Secure(sa)) => {
                    if sa.n_masked() < sa.n_shared() && now < deadline {
                        return;
                    }
                    match sa.close_masked() {
                        Ok(requests) => {
                            for (client, req) in requests {
                                self.outbox.push_back((client, ServerMessage::Unmask(req)));
                            }
                            round.phase = Phase::Unmask { deadline: now.saturating_add(phase_window) };
                        }
                        Err(e) => return self.close(now, Err(abandon_reason(&e))),
                    }
                }
                (Phase::Unmask { deadline }, Combine::Secure(sa)) => {
                    if !sa.unmask_complete() && now < deadline {
                        return;
                    }
                    let Combine::Secure(sa) = std::mem::replace(&mut round.combine, Combine::Unmasking)
                    else {
                        return;
                    };
                    let job = UnmaskJob { round: round.idx, secagg: sa };
                    if self.defer_unmask {
                        // The driver runs the job off its own task and hands the result back
                        // (`complete_unmask`); a day is far beyond any unmasking.
                        round.phase = Phase::Unmasking { deadline: now.saturating_add(UNMASK_GIVE_UP) };
                        self.unmask_job = Some(job);
                        return;
                    }
                    let result = job.run();
                    return self.complete_unmask(now, result);
                }
                (Phase::Unmasking { deadline }, _) => {
                    if now >= deadline {
                        self.unmask_job = None;
                        return self.close(now, Err(AbandonReason::SecureAggregation));
                    }
                    return;
                }
                (Phase::Closing { deadline }, _) => {
                    if now >= deadline {
                        self.close(now, Ok(()));
                    }
                    return;
                }
                // Unreachable: a plain round never enters the secure phases, and a secure one
                // leaves them only for `Unmasking` and `Closing`. Close what there is.
                (
                    Phase::ShareKeys { .. } | Phase::MaskedInput { .. } | Phase::Unmask { .. },
                    Combine::Plain(_) | Combine::Unmasking | Combine::Unmasked(_) | Combine::Decoded(_),
                )
                | (Phase::Report { .. }, Combine::Unmasking | Combine::Unmasked(_) | Combine::Decoded(_)) => {
                    self.close(now, Ok(()));
                    return;
                }
            }
        }
    }

    /// Whether the unmasking (the heaviest step of a secure round: rebuilding secrets and
    /// recomputing masks) is handed to the driver as an [`UnmaskJob`] instead of running inside
    /// [`Coordinator::handle_timeout`]; a server sets it to keep its owner task responsive.
    pub fn set_deferred_unmask(&mut self, defer: bool) {
        self.defer_unmask = defer;
    }

    /// The unmasking job of a secure round whose last phase closed, when unmasking is deferred
    /// (see [`Coordinator::set_deferred_unmask`]). Run it anywhere ([`UnmaskJob::run`]) and
    /// give the result to [`Coordinator::complete_unmask`].
    pub fn take_unmask_job(&mut self) -> Option<UnmaskJob> {
        self.unmask_job.take()
    }

    /// The result of the open round's unmasking: commits (at the planned end with noise) or
    /// abandons. A result for another round, or one that comes when no unmasking is awaited,
    /// is ignored.
    pub fn complete_unmask(&mut self, now: Instant, result: UnmaskResult) {
        let private = self.is_private();
        let phase_window = self.config.secure.map_or(Duration::ZERO, |sa| sa.phase_window);
        let adaptive = self.config.adaptive_clip.is_some();
        let Some(round) = self.round.as_mut() else { return };
        let layout = round.served.model.shape().layout();
        if round.idx != result.round || !matches!(round.combine, Combine::Unmasking) {
            return;
        }
        let planned_end = round
            .started
            .saturating_add(self.config.checkin_window + self.config.report_window + phase_window * 3);
        if let Some((params, decoded)) = result.ddp {
            // Distributed noise: the decoded sum already carries the survivors' noise shares.
            // Fewer survivors than min_reports carry less than the target: nothing is released.
            let n = result.sum.as_ref().map_or(0, |(_, n)| *n);
            let m = params.params().min_reports;
            let Ok(sum) = decoded else {
                let reason =
                    if n < m { AbandonReason::TooFewNoiseShares } else { AbandonReason::SecureAggregation };
                return self.close(now, Err(reason));
            };
            round.n_reported = n;
            let noise_std = params.survivor_noise_std(m) as f32;
            round.combine = Combine::Decoded(NoisedSum::from_distributed(layout, sum, n, noise_std));
            if private && now < planned_end {
                round.phase = Phase::Closing { deadline: planned_end };
                return;
            }
            return self.close(now, Ok(()));
        }
        let grid = Grid::for_secure_sum(round.clip_norm, layout.len());
        let (Ok((mut sum, n)), Ok(grid)) = (result.sum, grid) else {
            return self.close(now, Err(AbandonReason::SecureAggregation));
        };
        // The clip-bit count is the last coordinate. Each device adds 0 or 1; a device that
        // did not is out of the protocol.
        let bits = if adaptive { sum.pop().unwrap_or(0) } else { 0 };
        round.n_unclipped = usize::try_from(bits.max(0)).unwrap_or(0).min(n);
        round.n_reported = n;
        // The same integers the plain aggregator would have summed, up to rounding.
        round.combine = Combine::Unmasked(Aggregator::from_grid_sum(layout, grid, sum, n));
        if private && now < planned_end {
            round.phase = Phase::Closing { deadline: planned_end };
            return;
        }
        self.close(now, Ok(()));
    }

    fn close(&mut self, now: Instant, outcome: Result<(), AbandonReason>) {
        let Some(round) = self.round.take() else { return };
        let n_selected = round.n_selected;
        let private = self.is_private();
        // Without noise, too few reports abandon the round (with noise the outcome may not
        // depend on the number of reports).
        let outcome = match outcome {
            Ok(()) if !private && round.n_reported < self.config.min_reports => {
                Err(AbandonReason::TooFewReports)
            }
            o => o,
        };
        let n_reported = round.n_reported;
        let mut stats = RoundStats {
            round: round.idx,
            private,
            n_checked_in: round.n_checked_in,
            n_selected,
            n_reported,
            n_dropped: n_selected.saturating_sub(n_reported),
            rejected: round.rejected,
            denominator: 0.0,
            noise_std: 0.0,
            clip_norm: round.clip_norm,
            unclipped_fraction: None,
            base_version: self.model.version,
            duration: now.saturating_duration_since(round.started),
        };
        let abort = |outbox: &mut VecDeque<_>, participants: HashMap<ClientId, Participant>| {
            let selected = participants.into_iter().filter(|(_, p)| *p != Participant::NotSelected);
            for (client, _) in selected {
                outbox.push_back((client, ServerMessage::Aborted { round: round.idx }));
            }
        };
        if let Err(reason) = outcome {
            abort(&mut self.outbox, round.participants);
            self.events.push_back(CoordinatorEvent::RoundAbandoned { stats, reason });
            return;
        }
        // The sum to release: the plain aggregator's, or the secure phases' unmasked one, or
        // (distributed noise) the decoded sum the devices already noised.
        let aggregator = match round.combine {
            Combine::Plain(aggregator) | Combine::Unmasked(aggregator) => Ok(aggregator),
            Combine::Decoded(noised) => Err(noised),
            Combine::Secure(_) | Combine::Unmasking => {
                // Unreachable: a secure round commits only once its sum is unmasked.
                self.events.push_back(CoordinatorEvent::RoundAbandoned {
                    stats,
                    reason: AbandonReason::SecureAggregation,
                });
                return;
            }
        };
        let n_unclipped = round.n_unclipped;
        let denominator = match (self.config.selection, self.config.population) {
            // Public: the same in neighbouring worlds.
            (Selection::Poisson { q }, Some(population)) => q * population as f64,
            // Only without noise (validated): no privacy to keep.
            (Selection::Poisson { q }, None) => q * round.n_checked_in as f64,
            (Selection::FirstCome { .. }, _) => n_reported as f64,
        };
        let noised = match aggregator {
            Ok(aggregator) => {
                aggregator.release(self.config.noise_multiplier / self.release_noise_divisor, &mut self.rng)
            }
            // No central noise: the survivors' shares are the noise.
            Err(noised) => noised,
        };
        // The clipping bits' count gets exact integer noise too (checked in range at `new`;
        // should it fail anyway, the clip norm stays as it is and nothing is released).
        let noisy_bits = self.config.adaptive_clip.and_then(|a| {
            let noisy =
                crate::aggregate::release_count(n_unclipped as u64, a.count_noise_multiplier, &mut self.rng);
            noisy.ok().map(|noisy| (a, noisy))
        });
        if let Some((a, noisy)) = noisy_bits {
            let fraction = noisy / denominator.max(1.0);
            let step = (-f64::from(a.learning_rate) * (fraction - f64::from(a.target_quantile))).exp();
            self.clip_norm = (f64::from(self.clip_norm) * step).clamp(1e-6, 1e9) as f32;
            stats.unclipped_fraction = Some(fraction);
        }
        if let Some(charge) = self.round_charge(round.idx) {
            self.ledger.record(charge);
        }
        if let Some(charge) = self.round_ddp_charge(round.idx) {
            self.ledger.record_ddp(charge);
        }
        let items = round.served.subset().map(|s| s.items().to_vec());
        // The round's served model may be the global model itself: let it go, so that the
        // step can update the model in place when nobody else holds it (no copy of a large
        // catalogue per round).
        drop(round.served);
        let new_version = self.model.version + 1;
        match Arc::get_mut(&mut self.model) {
            Some(current) => {
                let centroids = &self.config.centroids;
                self.server.apply_rows(&mut current.model, &noised, denominator, centroids, items.as_deref());
                current.advance(new_version);
            }
            None => {
                let mut model = self.model.model.clone();
                let centroids = &self.config.centroids;
                self.server.apply_rows(&mut model, &noised, denominator, centroids, items.as_deref());
                self.model = Arc::new(RoundModel::new(new_version, model));
            }
        }
        stats.denominator = denominator;
        stats.noise_std = noised.noise_std();
        self.events.push_back(CoordinatorEvent::RoundCommitted { stats, new_version });
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<(ClientId, ServerMessage)> {
        self.outbox.pop_front()
    }

    /// The next event for the driver, if any.
    pub fn poll_event(&mut self) -> Option<CoordinatorEvent> {
        self.events.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must next be called, if a round is open.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.round.as_ref().map(|r| r.phase.deadline())
    }
}
