//! One simulated federation: every user of a split is a device; the real coordinator and client machines run rounds through the shared harness.

use std::ops::ControlFlow;
use std::time::{Duration, Instant as WallClock};

use fedrec_shared::danger;
use fedrec_shared::eval::{EvalConfig, Metrics, ReconstructionScorer, evaluate};
use fedrec_shared::harness::{Federation, HarnessConfig, RoundReport};
use fedrec_shared::ledger::{DdpCharge, Ledger, PrivacyBudget, PrivacyPolicy};
use fedrec_shared::model::compact::DownloadEncoding;
use fedrec_shared::privacy::{self, AccountantKind};
use fedrec_shared::round::{
    AdaptiveClip, Coordinator, CoordinatorConfig, CoordinatorEvent, DistributedNoise, SecureAggregation,
    Selection, TaskPrivacy, distributed_params,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::data::Split;

/// Which loss the federation trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// Squared error on ratings.
    Explicit,
    /// Weighted implicit feedback (iALS) on binarised interactions.
    Implicit,
}

/// Which privacy accountant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccountantArg {
    /// Rényi DP.
    Rdp,
    /// Privacy loss distributions.
    Pld,
}

impl From<AccountantArg> for AccountantKind {
    fn from(a: AccountantArg) -> Self {
        match a {
            AccountantArg::Rdp => AccountantKind::Rdp,
            AccountantArg::Pld => AccountantKind::Pld,
        }
    }
}

/// Which server optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam.
    Adam,
    /// SGD with momentum.
    Sgd,
}

/// How the coordinator combines a round's updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AggregationKind {
    /// The coordinator sees each clipped update (for research only).
    Plain,
    /// Secure aggregation (SecAgg+): the coordinator learns only the sum (docs/secagg.md).
    Secure,
}

/// Who adds the noise (`docs/ddp.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MechanismKind {
    /// The coordinator adds discrete Gaussian noise to the (unmasked) sum.
    Central,
    /// Each device adds its share of discrete Gaussian noise before masking (needs
    /// `--aggregation secure`): the coordinator adds none.
    Distributed,
}

/// How devices reach the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The shared harness: the machines exchange messages in memory on a simulated clock.
    Inproc,
    /// The coordinator's QUIC server on loopback and one SDK device per user (see [`crate::quic`]).
    Quic,
}

/// Everything that defines a simulated run; printed and stored with every report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunConfig {
    /// Training rounds.
    pub rounds: usize,
    /// Devices per round (the expected cohort under Poisson sampling).
    pub clients_per_round: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Number of user segments.
    pub n_segments: usize,
    /// Loss.
    pub objective: ObjectiveKind,
    /// Implicit confidence slope α.
    pub alpha: f32,
    /// Ridge on the user vector.
    pub l2_user: f32,
    /// Ridge on the user bias.
    pub l2_user_bias: f32,
    /// L2 on touched item vectors.
    pub l2_item: f32,
    /// L2 on touched item biases.
    pub l2_item_bias: f32,
    /// `ν`: the user ridge is `l2_user · n^ν` for a user with `n` interactions
    /// ([`TrainParams::user_support_exponent`]).
    pub user_support_exponent: f32,
    /// Server optimizer.
    pub optimizer: OptimizerKind,
    /// Server learning rate.
    pub server_lr: f32,
    /// SGD momentum.
    pub momentum: f32,
    /// Clip norm `C`.
    pub clip_norm: f32,
    /// Noise multiplier σ of the update (0 = non-private). Calibrated from `epsilon` when
    /// that is set.
    pub noise_multiplier: f32,
    /// Target ε: the noise is calibrated so that the run spends at most this, and the
    /// coordinator enforces it as its budget. `None`: no target.
    pub epsilon: Option<f64>,
    /// δ of the privacy guarantee.
    pub delta: f64,
    /// Which accountant.
    pub accountant: AccountantArg,
    /// Adaptive clipping (quantile tracking) instead of a fixed clip norm.
    pub adaptive_clip: bool,
    /// Target unclipped fraction under adaptive clipping.
    pub target_quantile: f32,
    /// Step of the adaptive clip-norm update.
    pub clip_learning_rate: f32,
    /// Noise σ_b on the count of unclipped updates (default: expected cohort / 20, as
    /// Andrew et al. 2021 suggest).
    pub clip_count_noise: Option<f32>,
    /// Probability a selected device drops out.
    pub dropout: f64,
    /// Standard deviation of the initial item factors.
    pub init_std: f32,
    /// Evaluate every this many rounds (0 = only at the end).
    pub eval_every: usize,
    /// Evaluate on at most this many users (a fixed random sample when there are more).
    pub eval_users: usize,
    /// Worker threads.
    pub threads: usize,
    /// Seed of every random choice in the run.
    pub seed: u64,
    /// How devices reach the coordinator.
    pub transport: Transport,
    /// How long check-in stays open, in milliseconds. Simulated time in process; over QUIC
    /// it is real time, and a Poisson round lasts at least this long.
    pub checkin_window_ms: u64,
    /// How long selected devices have to report, in milliseconds, from the end of check-in.
    /// Simulated time in process; over QUIC real time, and a round with noise lasts at least
    /// check-in plus this long (it commits only at its deadline).
    pub report_window_ms: u64,
    /// How the coordinator combines the updates.
    pub aggregation: AggregationKind,
    /// Secure aggregation: the dropout fraction the parameter finder plans for.
    pub secagg_dropout: f64,
    /// Secure aggregation: the fraction of devices assumed to collude with the coordinator.
    pub secagg_corrupt: f64,
    /// Who adds the noise.
    pub mechanism: MechanismKind,
    /// Distributed noise: bits per coordinate of the ring.
    pub bits: u32,
    /// Items each round trains, drawn from public randomness (`--items-per-round`): `None`
    /// chooses automatically ([`auto_items_per_round`]), `Some(0)` trains every item.
    pub items_per_round: Option<usize>,
    /// How rounds' models are downloaded (`--download`).
    pub download: DownloadKind,
    /// Subset rounds: what the device reconstructs its user vector from (`--reconstruct`).
    pub reconstruct: ReconstructFrom,
}

/// What a device of a subset round reconstructs its user vector from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReconstructFrom {
    /// The round's rows and the interactions with them (the loss restricted to the subset).
    Subset,
    /// The device's cached model of the whole catalogue and all its interactions (simulated
    /// as a fresh cache: the coordinator's current model).
    Cache,
}

/// How rounds' models are downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DownloadKind {
    /// Every parameter as `f32`.
    F32,
    /// Item factors as 8-bit codes with a scale per row, stochastic rounding.
    Int8,
}

impl From<DownloadKind> for DownloadEncoding {
    fn from(d: DownloadKind) -> Self {
        match d {
            DownloadKind::F32 => DownloadEncoding::F32,
            DownloadKind::Int8 => DownloadEncoding::Int8,
        }
    }
}

/// The automatic choice of items per round, shared with the coordinator's `fedrec.toml`.
pub use fedrec_shared::model::subset::{
    AUTO_ITEMS_PER_ROUND, AUTO_SUBSET_UPLOAD_BYTES, auto_items_per_round,
};

impl RunConfig {
    /// The tuned defaults for an objective (see the README for how they were chosen).
    pub fn defaults(objective: ObjectiveKind) -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        match objective {
            ObjectiveKind::Explicit => Self {
                rounds: 300,
                clients_per_round: 100,
                dim: 32,
                n_segments: 8,
                objective,
                alpha: 0.0,
                l2_user: 6.0,
                l2_user_bias: 5.0,
                l2_item: 0.3,
                l2_item_bias: 0.02,
                // Not 0.5 with `l2_user` 0.5, better without noise but worse with it at every ε
                // measured (see the README's "Support-scaled user regularisation").
                user_support_exponent: 0.0,
                optimizer: OptimizerKind::Adam,
                server_lr: 0.01,
                momentum: 0.9,
                clip_norm: 100.0,
                noise_multiplier: 0.0,
                epsilon: None,
                delta: 1e-6,
                accountant: AccountantArg::Rdp,
                adaptive_clip: false,
                target_quantile: 0.5,
                clip_learning_rate: 0.2,
                clip_count_noise: None,
                dropout: 0.0,
                init_std: 0.1,
                eval_every: 10,
                eval_users: 10_000,
                threads,
                seed: 1,
                transport: Transport::Inproc,
                checkin_window_ms: 60_000,
                report_window_ms: 600_000,
                aggregation: AggregationKind::Plain,
                secagg_dropout: 0.33,
                secagg_corrupt: 0.05,
                mechanism: MechanismKind::Central,
                bits: 16,
                items_per_round: None,
                download: DownloadKind::F32,
                reconstruct: ReconstructFrom::Subset,
            },
            ObjectiveKind::Implicit => Self {
                objective,
                alpha: 1.0,
                l2_user: 5.0,
                // Not 1 with `l2_user` 0.2: better without noise and at ε ≥ 8, worse at ε ≤ 2
                // (see the README's "Support-scaled user regularisation").
                user_support_exponent: 0.0,
                l2_user_bias: 0.0,
                l2_item: 0.1,
                l2_item_bias: 0.0,
                server_lr: 0.005,
                ..Self::defaults(ObjectiveKind::Explicit)
            },
        }
    }

    /// The device-side parameters this config implies.
    pub fn train_params(&self) -> TrainParams {
        TrainParams {
            objective: match self.objective {
                ObjectiveKind::Explicit => Objective::Explicit,
                ObjectiveKind::Implicit => Objective::Implicit { alpha: self.alpha },
            },
            l2_user: self.l2_user,
            l2_user_bias: self.l2_user_bias,
            l2_item: self.l2_item,
            l2_item_bias: self.l2_item_bias,
            user_support_exponent: self.user_support_exponent,
        }
    }
}

/// One line of the learning curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRecord {
    /// Round number, from 1.
    pub round: usize,
    /// Whether the round committed.
    pub committed: bool,
    /// Devices whose upload was aggregated.
    pub n_reported: usize,
    /// Selected devices that dropped out.
    pub n_dropped: usize,
    /// Fraction of reported updates shrunk by clipping (measured on the devices, for study).
    pub clipped_fraction: f64,
    /// The round's clip norm.
    pub clip_norm: f32,
    /// Under adaptive clipping: the coordinator's noised estimate of the unclipped fraction
    /// (what it steers the clip norm with; the only clipping statistic it learns).
    pub unclipped_fraction_estimate: Option<f64>,
    /// Metrics, on rounds where the model was evaluated.
    pub metrics: Option<MetricsRecord>,
}

/// Serializable copy of [`Metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MetricsRecord {
    /// RMSE (explicit objective only).
    pub rmse: Option<f64>,
    /// Recall@20.
    pub recall_at_20: f64,
    /// NDCG@10.
    pub ndcg_at_10: f64,
    /// Users evaluated for ranking.
    pub n_eval_users: usize,
    /// Test ratings in the RMSE.
    pub n_test_ratings: usize,
}

impl From<Metrics> for MetricsRecord {
    fn from(m: Metrics) -> Self {
        Self {
            rmse: m.rmse,
            recall_at_20: m.recall_at_20,
            ndcg_at_10: m.ndcg_at_10,
            n_eval_users: m.n_eval_users,
            n_test_ratings: m.n_test_ratings,
        }
    }
}

/// Per-user train and test interactions in the shared core's types.
#[derive(Debug, Clone)]
pub struct UserData {
    /// Training interactions per user (what each device holds).
    pub train: Vec<Vec<Rating>>,
    /// Held-out interactions per user.
    pub test: Vec<Vec<Rating>>,
    /// Catalogue size.
    pub n_items: usize,
    /// Evaluation settings.
    pub eval: EvalConfig,
}

impl UserData {
    /// Groups a split by user, each user's training interactions in item order. For the
    /// implicit objective, training values become 1 (an interaction happened); test values
    /// keep the rating for the relevance rule.
    pub fn from_split(split: &Split, objective: ObjectiveKind, relevance_threshold: Option<f32>) -> Self {
        let n_users = split.n_users();
        let mut train = vec![Vec::new(); n_users];
        let mut test = vec![Vec::new(); n_users];
        for it in &split.train {
            let value = match objective {
                ObjectiveKind::Explicit => it.rating,
                ObjectiveKind::Implicit => 1.0,
            };
            train[it.user as usize].push(Rating { item: it.item, value });
        }
        for it in &split.test {
            test[it.user as usize].push(Rating { item: it.item, value: it.rating });
        }
        // Each device keeps its interactions in item order, as the SDK may: the model does
        // not depend on the order (up to rounding), and sorted lists spare every round the
        // core's sorts (`train::validate_ratings`, `train::local_update`).
        for user in &mut train {
            user.sort_by_key(|r: &Rating| r.item);
        }
        Self {
            train,
            test,
            n_items: split.n_items(),
            eval: EvalConfig { rating_range: split.rating_range(), relevance_threshold },
        }
    }

    /// `(train, test)` pairs of every user, for evaluation.
    pub fn eval_users(&self) -> Vec<(&[Rating], &[Rating])> {
        self.train.iter().zip(&self.test).map(|(a, b)| (a.as_slice(), b.as_slice())).collect()
    }

    /// `(train, test)` pairs of at most `max` users with test data: all of them, or a fixed
    /// random sample (seeded by `seed`) when there are more.
    pub fn eval_sample(&self, max: usize, seed: u64) -> Vec<(&[Rating], &[Rating])> {
        let mut users: Vec<usize> = (0..self.train.len()).filter(|&u| !self.test[u].is_empty()).collect();
        if users.len() > max {
            let mut rng = danger::seeded_rng(seed ^ 0xe7a1);
            users.shuffle(&mut rng);
            users.truncate(max);
            users.sort_unstable();
        }
        users.into_iter().map(|u| (self.train[u].as_slice(), self.test[u].as_slice())).collect()
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Final metrics.
    pub metrics: Metrics,
    /// Per-round history.
    pub history: Vec<RoundRecord>,
    /// Time spent in rounds (training only, evaluation excluded).
    pub train_seconds: f64,
    /// Device updates aggregated.
    pub client_updates: usize,
    /// The final model.
    pub model: RoundModel,
    /// What the run spent, when it added noise.
    pub privacy: Option<PrivacySpend>,
}

/// The privacy a run spent, as its coordinator's ledger accounts it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrivacySpend {
    /// ε spent at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The accountant.
    pub accountant: AccountantArg,
    /// Poisson sampling probability per round.
    pub q: f64,
    /// The update's noise multiplier.
    pub noise_multiplier: f32,
    /// The combined noise multiplier charged per round (with the clip bits' noise).
    pub effective_noise_multiplier: f64,
    /// Rounds charged (committed rounds).
    pub rounds_charged: usize,
    /// Who added the noise.
    pub mechanism: MechanismKind,
    /// Distributed noise: the ring's bits.
    pub bits: Option<u32>,
    /// Distributed noise: the shares each round's charge counts (`min_reports`).
    pub min_reports: Option<usize>,
    /// Distributed noise: the rounding's inflation of the sensitivity, `γΔ₂/C`.
    pub sensitivity_inflation: Option<f64>,
}

impl RunConfig {
    /// The items each round of a model of `n_items` trains (0: every item).
    pub fn items_per_round_for(&self, n_items: usize) -> usize {
        let k = self.items_per_round.unwrap_or_else(|| auto_items_per_round(n_items, self.dim));
        if k >= n_items { 0 } else { k }
    }

    /// Poisson sampling probability of a run with noise: the cohort over the population.
    pub fn sampling_probability(&self, n_users: usize) -> f64 {
        (self.clients_per_round as f64 / n_users.max(1) as f64).min(1.0)
    }

    /// Noise on the clip-bit count, under adaptive clipping.
    pub fn count_noise(&self) -> f32 {
        self.clip_count_noise.unwrap_or(self.clients_per_round as f32 / 20.0)
    }

    /// `min_reports` of a distributed-noise run: the survivors the shares are calibrated for,
    /// four standard deviations below the expected survivors `e' = clients_per_round ×
    /// (1 − dropout)` (`⌊e' − 4√e'⌋`, at least 1), so that few rounds abort.
    pub fn ddp_min_reports(&self) -> usize {
        let e = self.clients_per_round as f64 * (1.0 - self.dropout);
        ((e - 4.0 * e.sqrt()).floor() as usize).max(1)
    }

    /// [`RunConfig::calibrate`] for a model of `n_items` items: with distributed noise the
    /// calibration (`ddp::noise_for`, the distributed accountant with the rounding's cost)
    /// needs the update's length.
    pub fn calibrate_for(&mut self, n_users: usize, n_items: usize) -> anyhow::Result<()> {
        if self.mechanism == MechanismKind::Central {
            return self.calibrate(n_users);
        }
        let Some(eps) = self.epsilon else { return Ok(()) };
        let template = self.ddp_template(n_users, n_items, 1.0)?;
        let q = self.sampling_probability(n_users);
        let sigma = fedrec_shared::ddp::noise_for(eps, self.delta, q, self.rounds as u64, &template)?;
        self.noise_multiplier = next_up((sigma / f64::from(self.clip_norm)) as f32);
        Ok(())
    }

    /// The distributed-noise parameters (zero seed) a run of this config derives, with
    /// noise multiplier `z`.
    pub fn ddp_template(
        &self,
        n_users: usize,
        n_items: usize,
        z: f32,
    ) -> anyhow::Result<fedrec_shared::ddp::DdpParams> {
        let cfg = RunConfig { noise_multiplier: z, epsilon: None, ..self.clone() };
        let config = coordinator_config(&cfg, n_users)?;
        let privacy = TaskPrivacy::from_config(&config, cfg.clip_norm);
        // The upload covers the round's item subset when rounds train one.
        let rows = match self.items_per_round_for(n_items) {
            0 => n_items,
            k => k,
        };
        let layout = ModelShape { n_items: rows, dim: self.dim, n_segments: self.n_segments }.layout();
        Ok(distributed_params(&privacy, cfg.clip_norm, layout.len(), self.bits, [0; 32])?)
    }

    /// With a target ε: sets `noise_multiplier` to the smallest noise whose accounted spend
    /// over `rounds` rounds meets the target (the update's share of it under adaptive
    /// clipping, whose bits take the rest). Central noise only; distributed noise needs the
    /// model's size ([`RunConfig::calibrate_for`]).
    pub fn calibrate(&mut self, n_users: usize) -> anyhow::Result<()> {
        let Some(eps) = self.epsilon else { return Ok(()) };
        if self.mechanism == MechanismKind::Distributed {
            anyhow::bail!("distributed noise is calibrated for a model size: use calibrate_for");
        }
        let q = self.sampling_probability(n_users);
        // The combined multiplier a round is charged; under adaptive clipping the update's
        // share of it is the inverse of the combination with the bits' noise.
        let z = privacy::calibrate_noise(eps, self.delta, q, self.rounds as u64, self.accountant.into())?;
        self.noise_multiplier = if self.adaptive_clip {
            if self.clip_count_noise.is_none() && f64::from(self.count_noise()) < 2.0 * z {
                // Small cohorts or tight budgets: the count needs more noise than cohort/20
                // for the update to keep most of the budget. 2z leaves it z·1.15.
                self.clip_count_noise = Some((2.0 * z) as f32);
            }
            let zb = f64::from(self.count_noise());
            if zb <= z {
                anyhow::bail!(
                    "adaptive clipping needs the count noise ({zb}) above the calibrated noise multiplier ({z:.3}); raise --clip-count-noise"
                );
            }
            privacy::update_noise_multiplier(z, zb)? as f32
        } else {
            z as f32
        };
        // f32 rounding must not take the noise below what the accountant needs.
        self.noise_multiplier = next_up(self.noise_multiplier);
        Ok(())
    }
}

fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}

/// The coordinator configuration a run uses.
pub fn coordinator_config(cfg: &RunConfig, n_users: usize) -> anyhow::Result<CoordinatorConfig> {
    let distributed = cfg.mechanism == MechanismKind::Distributed;
    if distributed && cfg.aggregation != AggregationKind::Secure {
        anyhow::bail!(
            "--mechanism distributed needs --aggregation secure (the noise shares hide in a masked sum)"
        );
    }
    if distributed && cfg.adaptive_clip {
        anyhow::bail!(
            "--mechanism distributed needs --clip fixed (adaptive clipping's bit would carry no noise)"
        );
    }
    let selection = if cfg.noise_multiplier > 0.0 {
        Selection::Poisson { q: cfg.sampling_probability(n_users) }
    } else {
        Selection::FirstCome { cohort: cfg.clients_per_round }
    };
    let optimizer = match cfg.optimizer {
        OptimizerKind::Adam => ServerOptimizer::adam(cfg.server_lr),
        OptimizerKind::Sgd => ServerOptimizer::Sgd { lr: cfg.server_lr, momentum: cfg.momentum },
    };
    Ok(CoordinatorConfig {
        train: cfg.train_params(),
        optimizer,
        selection,
        // Distributed noise: the survivors the devices' shares are calibrated for.
        min_reports: if distributed { cfg.ddp_min_reports() } else { 1 },
        // Every user checks in each round: the expected cohort is q x n_users, public.
        population: Some(n_users),
        checkin_window: Duration::from_millis(cfg.checkin_window_ms),
        report_window: Duration::from_millis(cfg.report_window_ms),
        clip_norm: cfg.clip_norm,
        adaptive_clip: cfg.adaptive_clip.then(|| AdaptiveClip {
            target_quantile: cfg.target_quantile,
            learning_rate: cfg.clip_learning_rate,
            count_noise_multiplier: cfg.count_noise(),
        }),
        secure: (cfg.aggregation == AggregationKind::Secure).then(|| SecureAggregation {
            dropout: cfg.secagg_dropout,
            corrupt: cfg.secagg_corrupt,
            phase_window: Duration::from_secs(60),
            distributed: distributed.then_some(DistributedNoise { bits: cfg.bits }),
        }),
        privacy: match cfg.epsilon {
            Some(eps) => Some(PrivacyPolicy {
                budget: PrivacyBudget::new(eps, cfg.delta)?,
                accountant: cfg.accountant.into(),
            }),
            None => None,
        },
        noise_multiplier: cfg.noise_multiplier,
        // With noise, a segment needs a count well above the noise to be trusted.
        centroids: CentroidPolicy::with_min_count(1.0),
    })
}

/// `--clip`: how updates are clipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum ClipMode {
    /// Adaptive when the run adds noise, fixed otherwise.
    Auto,
    /// A fixed clip norm (--clip-norm).
    Fixed,
    /// Quantile tracking from --clip-norm (Andrew et al. 2021).
    Adaptive,
}

/// What a run decides about clipping from its options: the mode, whether a clip norm was
/// given, and a configuration file's fixed clip norm.
#[derive(Debug, Clone, Copy)]
pub struct Clipping {
    /// `--clip`.
    pub mode: ClipMode,
    /// Whether `--clip-norm` was given (then `cfg.clip_norm` holds it and stays).
    pub clip_norm_given: bool,
    /// The fixed clip norm of a `--config` file, if any.
    pub file_clip_norm: Option<f32>,
}

impl Clipping {
    /// Fixed or adaptive clipping (`auto`: adaptive when the run is noised on the
    /// coordinator), and the starting clip norm when none was given: quantile tracking starts
    /// small, a fixed norm is the file's or the non-private default.
    pub fn apply(&self, c: &mut RunConfig, noisy_central: bool) {
        c.adaptive_clip = match self.mode {
            ClipMode::Fixed => false,
            ClipMode::Adaptive => true,
            ClipMode::Auto => noisy_central,
        };
        if !self.clip_norm_given {
            c.clip_norm = if c.adaptive_clip {
                1.0
            } else {
                self.file_clip_norm.unwrap_or(RunConfig::defaults(c.objective).clip_norm)
            };
        }
    }
}

/// One run of a privacy/utility sweep as `fedrec-sim sweep` plans it: a target ε (`None`:
/// the non-private run), the mechanism and its bits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedPoint {
    /// The target ε; `None` is the non-private run.
    pub target: Option<f64>,
    /// Who adds the noise.
    pub mechanism: MechanismKind,
    /// Bits of the distributed encoding.
    pub bits: u32,
}

/// The runs of a sweep over `targets`: with `distributed_bits`, at every finite target the
/// central mechanism and then distributed noise at each width; otherwise `base`'s mechanism.
pub fn sweep_plan(targets: &[Option<f64>], base: &RunConfig, distributed_bits: &[u32]) -> Vec<PlannedPoint> {
    let mut plan = Vec::new();
    for &target in targets {
        if target.is_some() && !distributed_bits.is_empty() {
            plan.push(PlannedPoint { target, mechanism: MechanismKind::Central, bits: base.bits });
            plan.extend(distributed_bits.iter().map(|&bits| PlannedPoint {
                target,
                mechanism: MechanismKind::Distributed,
                bits,
            }));
        } else {
            plan.push(PlannedPoint { target, mechanism: base.mechanism, bits: base.bits });
        }
    }
    plan
}

impl PlannedPoint {
    /// `base` for this point: its target ε, mechanism and bits, no noise for the non-private
    /// run (whose mechanism is central), no evaluation between rounds. Clipping is the
    /// caller's, after [`PlannedPoint::noisy_central`].
    pub fn config(&self, base: &RunConfig) -> RunConfig {
        let mut cfg = base.clone();
        cfg.epsilon = self.target;
        cfg.mechanism = if self.target.is_none() { MechanismKind::Central } else { self.mechanism };
        cfg.bits = self.bits;
        if self.target.is_none() {
            cfg.noise_multiplier = 0.0;
        }
        cfg.eval_every = 0;
        cfg
    }

    /// Whether the point is noised on the coordinator.
    pub fn noisy_central(&self) -> bool {
        self.target.is_some() && self.mechanism == MechanismKind::Central
    }
}

/// The model every run starts from (drawn from `cfg.seed`).
pub fn initial_model(data: &UserData, cfg: &RunConfig) -> anyhow::Result<GlobalModel> {
    let shape = ModelShape { n_items: data.n_items, dim: cfg.dim, n_segments: cfg.n_segments };
    let init = ModelInit {
        factor_std: cfg.init_std,
        global_mean: match cfg.objective {
            // A prior from the rating scale, not from the data.
            ObjectiveKind::Explicit => (data.eval.rating_range.0 + data.eval.rating_range.1) / 2.0,
            ObjectiveKind::Implicit => 0.0,
        },
        ..ModelInit::default()
    };
    Ok(GlobalModel::init(shape, init, &mut danger::seeded_rng(cfg.seed))?)
}

/// The seed of the coordinator machine's RNG (selection and noise), the same for both transports.
pub(crate) fn coordinator_seed(cfg: &RunConfig) -> u64 {
    cfg.seed ^ 0x5eed
}

/// The seed of the harness's RNG (check-in order, dropouts).
pub(crate) fn harness_seed(cfg: &RunConfig) -> u64 {
    cfg.seed.wrapping_add(1)
}

/// What the round loop of either transport hands the run after each round.
pub(crate) struct RoundView<'m> {
    /// The devices' side of the round.
    pub report: &'m RoundReport,
    /// The coordinator's model after the round.
    pub model: &'m RoundModel,
    /// The clip norm to record when the round has no close event.
    pub clip_norm: f32,
}

/// What a transport's round loop leaves behind.
pub(crate) struct Finished {
    /// The final model.
    pub model: RoundModel,
    /// Committed rounds the coordinator charged to its ledger.
    pub n_charged: usize,
}

/// Runs a federation of `data`'s users under `cfg`, over `cfg.transport`. `on_round` sees
/// every round's record.
pub fn run(
    data: &UserData,
    cfg: &RunConfig,
    mut on_round: impl FnMut(&RoundRecord),
) -> anyhow::Result<RunResult> {
    run_until(data, cfg, |rec| {
        on_round(rec);
        ControlFlow::Continue(())
    })
}

/// [`run`], stopping after the first round for which `on_round` returns
/// [`ControlFlow::Break`] (early stopping): the result is the model, metrics and privacy
/// spend of the rounds that ran. Same rounds, same numbers as [`run`] up to that round.
pub fn run_until(
    data: &UserData,
    cfg: &RunConfig,
    mut on_round: impl FnMut(&RoundRecord) -> ControlFlow<()>,
) -> anyhow::Result<RunResult> {
    let model = initial_model(data, cfg)?;
    let config = coordinator_config(cfg, data.train.len())?;
    // What one committed round charges (the same for every round of a run).
    let charge = if cfg.mechanism == MechanismKind::Central { config.round_charge(0) } else { None };
    let ddp_charge = match (cfg.mechanism, config.selection) {
        (MechanismKind::Distributed, Selection::Poisson { q }) if cfg.noise_multiplier > 0.0 => {
            let template =
                cfg.ddp_template(data.train.len(), data.n_items, cfg.noise_multiplier)?.validate()?;
            let m = template.params().min_reports;
            let event = fedrec_shared::ddp::DdpEvent::new(&template, m, q, 1)?;
            Some((event, m, template.sensitivity_inflation()))
        }
        _ => None,
    };
    let users = data.eval_sample(cfg.eval_users, cfg.seed);
    let params = cfg.train_params();
    let mut history = Vec::with_capacity(cfg.rounds);
    let mut train_time = Duration::ZERO;
    let mut client_updates = 0;
    let mut clock = WallClock::now();
    let record = |view: RoundView<'_>| -> ControlFlow<()> {
        train_time += clock.elapsed();
        let report = view.report;
        let (committed, n_reported, n_dropped, clip_norm, unclipped) = match &report.event {
            Some(CoordinatorEvent::RoundCommitted { stats, .. }) => {
                (true, stats.n_reported, stats.n_dropped, stats.clip_norm, stats.unclipped_fraction)
            }
            Some(CoordinatorEvent::RoundAbandoned { stats, .. }) => {
                (false, 0, stats.n_dropped, stats.clip_norm, None)
            }
            _ => (false, 0, 0, view.clip_norm, None),
        };
        client_updates += n_reported;
        let round = history.len() + 1;
        let evaluate_now = round == cfg.rounds || (cfg.eval_every > 0 && round % cfg.eval_every == 0);
        let metrics = evaluate_now.then(|| {
            let scorer = ReconstructionScorer { model: view.model, params };
            MetricsRecord::from(evaluate(&scorer, &users, data.n_items, &data.eval, cfg.threads))
        });
        let rec = RoundRecord {
            round,
            committed,
            n_reported,
            n_dropped,
            clip_norm,
            unclipped_fraction_estimate: unclipped,
            clipped_fraction: if report.n_completed > 0 {
                report.n_clipped as f64 / report.n_completed as f64
            } else {
                0.0
            },
            metrics,
        };
        let flow = on_round(&rec);
        history.push(rec);
        clock = WallClock::now();
        flow
    };
    let finished = match cfg.transport {
        Transport::Inproc => run_inproc(data, cfg, config, model, record)?,
        Transport::Quic => crate::quic::run_rounds(data, cfg, config, model, record)?,
    };
    let privacy = match charge {
        Some(charge) => {
            let ledger = Ledger::from_entries(vec![charge; finished.n_charged])?;
            Some(PrivacySpend {
                epsilon: ledger.epsilon(cfg.delta, cfg.accountant.into())?,
                delta: cfg.delta,
                accountant: cfg.accountant,
                q: charge.q,
                noise_multiplier: cfg.noise_multiplier,
                effective_noise_multiplier: charge.noise_multiplier,
                rounds_charged: finished.n_charged,
                mechanism: MechanismKind::Central,
                bits: None,
                min_reports: None,
                sensitivity_inflation: None,
            })
        }
        None => match ddp_charge {
            Some((event, m, inflation)) => {
                let mut ledger = Ledger::new();
                for round in 0..finished.n_charged {
                    ledger.record_ddp(DdpCharge { round: round as u64, event });
                }
                Some(PrivacySpend {
                    epsilon: ledger.epsilon(cfg.delta, cfg.accountant.into())?,
                    delta: cfg.delta,
                    accountant: cfg.accountant,
                    q: event.q(),
                    noise_multiplier: cfg.noise_multiplier,
                    effective_noise_multiplier: event.l2_scale().recip(),
                    rounds_charged: finished.n_charged,
                    mechanism: MechanismKind::Distributed,
                    bits: Some(cfg.bits),
                    min_reports: Some(m),
                    sensitivity_inflation: Some(inflation),
                })
            }
            None => None,
        },
    };
    let scorer = ReconstructionScorer { model: &finished.model, params };
    let metrics = evaluate(&scorer, &users, data.n_items, &data.eval, cfg.threads);
    Ok(RunResult {
        metrics,
        history,
        train_seconds: train_time.as_secs_f64(),
        client_updates,
        model: finished.model,
        privacy,
    })
}

/// The rounds of a run through the in-process harness.
fn run_inproc(
    data: &UserData,
    cfg: &RunConfig,
    config: CoordinatorConfig,
    model: GlobalModel,
    mut on_round: impl FnMut(RoundView<'_>) -> ControlFlow<()>,
) -> anyhow::Result<Finished> {
    let mut coordinator = Coordinator::new(config, model, danger::seeded_rng(coordinator_seed(cfg)))?;
    coordinator.set_items_per_round(cfg.items_per_round_for(data.n_items))?;
    coordinator.set_download_encoding(cfg.download.into());
    coordinator.set_simulated_cache(cfg.reconstruct == ReconstructFrom::Cache);
    let harness = HarnessConfig { dropout: cfg.dropout, n_threads: cfg.threads, ..HarnessConfig::default() };
    let mut fed = Federation::new(coordinator, &data.train, harness, danger::seeded_rng(harness_seed(cfg)));
    fed.run_rounds_until(cfg.rounds, |report, coordinator| {
        on_round(RoundView { report, model: coordinator.model(), clip_norm: coordinator.clip_norm() })
    });
    Ok(Finished {
        model: (**fed.coordinator.model()).clone(),
        n_charged: fed.coordinator.ledger().entries().len() + fed.coordinator.ledger().ddp_entries().len(),
    })
}

/// What one device of a run moves per round, in bytes of protocol v2 frames' payloads as the
/// wire codec encodes them: the task with the round's model (down) and the plain upload (up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WireBytes {
    /// The task response with its model (what a device without a cached model downloads).
    pub down: usize,
    /// The plain upload of a clipped update.
    pub up: usize,
}

/// Measures [`WireBytes`] on the real machines: a coordinator of `cfg` opens one round, the
/// first user with data checks in and trains, and both messages go through the wire encoder.
/// Plain aggregation (a secure round uploads masked words instead: see `bench --aggregation secure`).
pub fn wire_bytes(data: &UserData, cfg: &RunConfig) -> anyhow::Result<WireBytes> {
    use fedrec_shared::round::{ClientMessage, ClientRound, Instant, ServerMessage};
    use fedrec_shared::wire::{self, Request, Response, Upload};
    let model = initial_model(data, cfg)?;
    let mut config = coordinator_config(
        &RunConfig { noise_multiplier: 0.0, epsilon: None, ..cfg.clone() },
        data.train.len(),
    )?;
    config.secure = None;
    config.selection = Selection::FirstCome { cohort: 1 };
    config.privacy = None;
    let mut coordinator = Coordinator::new(config, model, danger::seeded_rng(coordinator_seed(cfg)))?;
    coordinator.set_items_per_round(cfg.items_per_round_for(data.n_items))?;
    coordinator.set_download_encoding(cfg.download.into());
    let now = Instant::ZERO;
    coordinator.start_round(now)?;
    coordinator.handle_message(now, 0, ClientMessage::CheckIn);
    let Some((_, msg @ ServerMessage::Selected { .. })) = coordinator.poll_transmit() else {
        anyhow::bail!("the coordinator did not select the one device");
    };
    let down = wire::encode(&Response::from_server_message(&msg, None, Duration::ZERO))?.len();
    let ratings = data.train.iter().find(|r| !r.is_empty()).map_or(&[][..], |r| &r[..]);
    let mut device = ClientRound::new(ratings, Instant::from_micros(u64::MAX));
    device.handle_message(now, msg);
    let _check_in = device.poll_transmit();
    let Some(ClientMessage::Upload { round, update, within_bound }) = device.poll_transmit() else {
        anyhow::bail!("the device did not upload: {:?}", device.outcome());
    };
    let up = wire::encode(&Request::Upload(Upload::new(round, &update, within_bound, [0; 16])))?.len();
    Ok(WireBytes { down, up })
}
