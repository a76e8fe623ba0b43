//! `fedrec-sim tune`: a hyperparameter search (Hyperband: random search with successive
//! halving over rounds) on a validation split carved from the training data only, then one
//! run of the best configuration on the full training set, scored on the test set.
//!
//! The search never sees the test interactions: [`validation_split`] builds its data from
//! the training side of the split alone, and the test side is read only by the final run.
//! Every trial is a real federation ([`federation::run`]) of the validation data; a trial's
//! score is its best validation checkpoint, and the round of that checkpoint becomes the
//! configuration's `rounds` (early stopping chosen on validation).

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedrec_shared::eval::evaluate;
use fedrec_shared::{Rating, danger};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::baseline::{BiasModel, Popularity};
use crate::data::{self, DataSource, Dataset, Split, SplitKind};
use crate::federation::{self, MetricsRecord, ObjectiveKind, OptimizerKind, RunConfig, UserData};
use crate::report::{self, DatasetInfo};

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a configuration (bad JSON, unknown key, wrong type).
    #[error("{path} is not a fedrec-sim configuration: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The JSON error (names the line and the key).
        source: serde_json::Error,
    },
    /// A key holds a value no run can use.
    #[error("{path}: `{key}` {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The key, as `section.key`.
        key: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The training objective, as a configuration file spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileObjective {
    /// Squared error on ratings.
    Explicit,
    /// Weighted implicit feedback.
    Implicit,
}

impl From<FileObjective> for ObjectiveKind {
    fn from(o: FileObjective) -> Self {
        match o {
            FileObjective::Explicit => ObjectiveKind::Explicit,
            FileObjective::Implicit => ObjectiveKind::Implicit,
        }
    }
}

impl From<ObjectiveKind> for FileObjective {
    fn from(o: ObjectiveKind) -> Self {
        match o {
            ObjectiveKind::Explicit => FileObjective::Explicit,
            ObjectiveKind::Implicit => FileObjective::Implicit,
        }
    }
}

/// The server optimizer, as a configuration file spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileOptimizer {
    /// Adam.
    Adam,
    /// SGD with momentum.
    Sgd,
}

impl From<FileOptimizer> for OptimizerKind {
    fn from(o: FileOptimizer) -> Self {
        match o {
            FileOptimizer::Adam => OptimizerKind::Adam,
            FileOptimizer::Sgd => OptimizerKind::Sgd,
        }
    }
}

impl From<OptimizerKind> for FileOptimizer {
    fn from(o: OptimizerKind) -> Self {
        match o {
            OptimizerKind::Adam => FileOptimizer::Adam,
            OptimizerKind::Sgd => FileOptimizer::Sgd,
        }
    }
}

/// The configuration file `tune --out` writes and `run --config` reads (JSON).
///
/// `model` and `training` use the key names of a coordinator's `fedrec.toml` sections of
/// the same names, so their values can be copied there; `federation` holds what the
/// coordinator sets elsewhere (`clip_norm` is `[privacy] clip_norm`, `clients_per_round` is
/// `[rounds] cohort`, or `q × population`) or not at all (`rounds`). Every key is optional:
/// a missing key keeps the default, and command-line flags override the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Free text saying where the file came from; ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Keys of `fedrec.toml`'s `[model]`.
    #[serde(default)]
    pub model: ModelKeys,
    /// Keys of `fedrec.toml`'s `[training]`.
    #[serde(default)]
    pub training: TrainingKeys,
    /// The federation's shape: rounds, cohort and clip norm.
    #[serde(default)]
    pub federation: FederationKeys,
}

/// `model` of a [`ConfigFile`]: `fedrec.toml`'s `[model]` keys that do not depend on the catalogue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelKeys {
    /// Factor dimension (`--dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<usize>,
    /// User segments (`--segments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_segments: Option<usize>,
    /// Standard deviation of the initial item factors (`--init-std`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor_std: Option<f32>,
}

/// `training` of a [`ConfigFile`]: `fedrec.toml`'s `[training]` keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingKeys {
    /// `explicit` or `implicit` (`--objective`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<FileObjective>,
    /// Implicit confidence slope α (`--alpha`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implicit_alpha: Option<f32>,
    /// Ridge on the user vector (`--l2-user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_user: Option<f32>,
    /// Ridge on the user bias (`--l2-user-bias`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_user_bias: Option<f32>,
    /// L2 on item vectors (`--l2-item`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_item: Option<f32>,
    /// L2 on item biases (`--l2-item-bias`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_item_bias: Option<f32>,
    /// How the user ridge grows with the user's support (`--user-support-exponent`). A file
    /// that sets `l2_user` without it (one written before the exponent existed) means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_support_exponent: Option<f32>,
    /// `adam` or `sgd` (`--optimizer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<FileOptimizer>,
    /// Server learning rate (`--server-lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_lr: Option<f32>,
    /// SGD momentum (`--momentum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f32>,
}

/// `federation` of a [`ConfigFile`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationKeys {
    /// Rounds (`--rounds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<usize>,
    /// Devices per round (`--clients-per-round`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_per_round: Option<usize>,
    /// Clip norm of each update under fixed clipping (`--clip-norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f32>,
}

impl ConfigFile {
    /// Reads and checks a configuration file.
    pub fn read(path: &Path) -> Result<Self, ConfigFileError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigFileError::Read { path: name.clone(), source })?;
        let file: Self = serde_json::from_str(&text)
            .map_err(|source| ConfigFileError::Parse { path: name.clone(), source })?;
        file.check().map_err(|(key, reason)| ConfigFileError::Invalid { path: name, key, reason })?;
        Ok(file)
    }

    /// For clap's `value_parser`: reads the file named by `arg`.
    pub fn parse_arg(arg: &str) -> Result<Self, String> {
        Self::read(Path::new(arg)).map_err(|e| e.to_string())
    }

    /// Every key a run uses, taken from `cfg`.
    pub fn from_config(cfg: &RunConfig) -> Self {
        let implicit = cfg.objective == ObjectiveKind::Implicit;
        Self {
            comment: None,
            model: ModelKeys {
                dim: Some(cfg.dim),
                n_segments: Some(cfg.n_segments),
                factor_std: Some(cfg.init_std),
            },
            training: TrainingKeys {
                objective: Some(cfg.objective.into()),
                implicit_alpha: implicit.then_some(cfg.alpha),
                l2_user: Some(cfg.l2_user),
                l2_user_bias: Some(cfg.l2_user_bias),
                l2_item: Some(cfg.l2_item),
                l2_item_bias: Some(cfg.l2_item_bias),
                user_support_exponent: Some(cfg.user_support_exponent),
                optimizer: Some(cfg.optimizer.into()),
                server_lr: Some(cfg.server_lr),
                momentum: (cfg.optimizer == OptimizerKind::Sgd).then_some(cfg.momentum),
            },
            federation: FederationKeys {
                rounds: Some(cfg.rounds),
                clients_per_round: Some(cfg.clients_per_round),
                clip_norm: Some(cfg.clip_norm),
            },
        }
    }

    /// The objective the file names; a caller picks the defaults of this objective before
    /// [`ConfigFile::apply`].
    pub fn objective(&self) -> Option<ObjectiveKind> {
        self.training.objective.map(Into::into)
    }

    /// The fixed clip norm the file sets.
    pub fn clip_norm(&self) -> Option<f32> {
        self.federation.clip_norm
    }

    /// Sets every key the file holds in `c` (all but the objective; see [`ConfigFile::objective`]).
    pub fn apply(&self, c: &mut RunConfig) {
        let (m, t, f) = (&self.model, &self.training, &self.federation);
        macro_rules! set {
            ($($src:expr => $dst:ident),*) => { $( if let Some(v) = $src { c.$dst = v.into(); } )* };
        }
        set!(m.dim => dim, m.n_segments => n_segments, m.factor_std => init_std,
             t.implicit_alpha => alpha, t.l2_user => l2_user, t.l2_user_bias => l2_user_bias,
             t.l2_item => l2_item, t.l2_item_bias => l2_item_bias,
             t.user_support_exponent => user_support_exponent, t.optimizer => optimizer,
             t.server_lr => server_lr, t.momentum => momentum,
             f.rounds => rounds, f.clients_per_round => clients_per_round, f.clip_norm => clip_norm);
        // A file that sets the user ridge but not its exponent predates the exponent: its
        // ridge is the same for every user.
        if t.l2_user.is_some() && t.user_support_exponent.is_none() {
            c.user_support_exponent = 0.0;
        }
    }

    /// Checks every value; the error names the key.
    fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let positive_int = [
            ("model.dim", self.model.dim),
            ("model.n_segments", self.model.n_segments),
            ("federation.rounds", self.federation.rounds),
            ("federation.clients_per_round", self.federation.clients_per_round),
        ];
        for (key, v) in positive_int {
            if v == Some(0) {
                return Err((key, "must be at least 1"));
            }
        }
        let t = &self.training;
        let non_negative = [
            ("model.factor_std", self.model.factor_std),
            ("training.implicit_alpha", t.implicit_alpha),
            ("training.l2_user", t.l2_user),
            ("training.l2_user_bias", t.l2_user_bias),
            ("training.l2_item", t.l2_item),
            ("training.l2_item_bias", t.l2_item_bias),
        ];
        for (key, v) in non_negative {
            if v.is_some_and(|x| !(x.is_finite() && x >= 0.0)) {
                return Err((key, "must be a finite number ≥ 0"));
            }
        }
        if t.user_support_exponent.is_some_and(|x| !(0.0..=2.0).contains(&x)) {
            return Err(("training.user_support_exponent", "must be in [0, 2]"));
        }
        for (key, v) in
            [("training.server_lr", t.server_lr), ("federation.clip_norm", self.federation.clip_norm)]
        {
            if v.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                return Err((key, "must be a finite number > 0"));
            }
        }
        if t.momentum.is_some_and(|x| !(0.0..1.0).contains(&x)) {
            return Err(("training.momentum", "must lie in [0, 1)"));
        }
        Ok(())
    }
}

/// What the search optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum TuneMetric {
    /// RMSE (lower is better; explicit objective only).
    #[serde(rename = "rmse")]
    Rmse,
    /// Recall@20 (higher is better).
    #[serde(rename = "recall_at_20")]
    Recall20,
    /// NDCG@10 (higher is better).
    #[serde(rename = "ndcg_at_10")]
    Ndcg10,
}

impl TuneMetric {
    /// The metric that follows the objective: RMSE for ratings, Recall@20 for implicit data.
    pub fn for_objective(objective: ObjectiveKind) -> Self {
        match objective {
            ObjectiveKind::Explicit => TuneMetric::Rmse,
            ObjectiveKind::Implicit => TuneMetric::Recall20,
        }
    }

    /// The metric's value in `m` (NaN when `m` has none).
    pub fn value(self, m: &MetricsRecord) -> f64 {
        match self {
            TuneMetric::Rmse => m.rmse.unwrap_or(f64::NAN),
            TuneMetric::Recall20 => m.recall_at_20,
            TuneMetric::Ndcg10 => m.ndcg_at_10,
        }
    }

    /// What the search minimises: the value, or its negation for metrics where higher is
    /// better; a run that diverged (NaN) is the worst.
    pub fn loss(self, m: &MetricsRecord) -> f64 {
        let v = self.value(m);
        let l = if self == TuneMetric::Rmse { v } else { -v };
        if l.is_nan() { f64::INFINITY } else { l }
    }

    /// The name in tables.
    pub fn label(self) -> &'static str {
        match self {
            TuneMetric::Rmse => "RMSE",
            TuneMetric::Recall20 => "Recall@20",
            TuneMetric::Ndcg10 => "NDCG@10",
        }
    }
}

/// A parameter the search may change; the command line fixes one by giving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    /// `dim`.
    Dim,
    /// `l2_user`.
    L2User,
    /// `user_support_exponent` (sampled from {0, ½, 1}; the sampled `l2_user` is then the
    /// ridge of a user with the median support).
    UserSupportExponent,
    /// `l2_user_bias` (explicit only).
    L2UserBias,
    /// `l2_item`.
    L2Item,
    /// `l2_item_bias` (explicit only).
    L2ItemBias,
    /// `alpha` (implicit only).
    Alpha,
    /// `optimizer` (and with it `server_lr` and `momentum` when they are not fixed).
    Optimizer,
    /// `server_lr`.
    ServerLr,
    /// `momentum` (SGD only).
    Momentum,
    /// `clip_norm` (fixed clipping only).
    ClipNorm,
    /// `clients_per_round`.
    ClientsPerRound,
    /// `init_std`.
    InitStd,
}

/// Everything `tune` needs besides the base configuration.
#[derive(Debug, Clone)]
pub struct TuneParams {
    /// Where the data comes from.
    pub source: DataSource,
    /// How the test set is held out (and, from the training data, the validation set).
    pub split: SplitKind,
    /// Test fraction per user (ignored for given train/test files).
    pub test_fraction: f64,
    /// Relevance threshold for ranking (default: 4, or every item for single-valued data).
    pub relevance_threshold: Option<f32>,
    /// Validation fraction of each user's training interactions.
    pub val_fraction: f64,
    /// Seed of the validation split.
    pub val_seed: u64,
    /// The metric to optimise (default: [`TuneMetric::for_objective`]).
    pub metric: Option<TuneMetric>,
    /// Wall-clock budget of the search; the final run comes on top when it overruns.
    pub budget: Duration,
    /// At most this many trials.
    pub max_trials: Option<usize>,
    /// Rounds of the longest trials (default: twice the base configuration's rounds).
    pub max_rounds: Option<usize>,
    /// Rounds of the shortest trials (default: `max_rounds / eta²`).
    pub min_rounds: Option<usize>,
    /// Successive-halving factor: each rung keeps 1/eta of its trials and gives them eta times the rounds.
    pub eta: usize,
    /// Trials run at once (default: the base configuration's threads).
    pub jobs: Option<usize>,
    /// Parameters the search keeps at the base configuration's value.
    pub fixed: Vec<Param>,
    /// No progress bar.
    pub quiet: bool,
}

/// How the validation split was made.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationInfo {
    /// `random` or `temporal`.
    pub split: String,
    /// Fraction of each user's training interactions held out.
    pub fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Interactions the trials train on.
    pub n_train: usize,
    /// Interactions the trials are scored on.
    pub n_validation: usize,
}

/// One trial: one configuration trained for one rung's rounds on the validation data.
#[derive(Debug, Clone, Serialize)]
pub struct TrialRecord {
    /// Trial number, from 0, in the order of the schedule.
    pub trial: usize,
    /// Which sampled configuration (the same across the rungs it was promoted to); 0 is the base configuration.
    pub config_id: usize,
    /// Hyperband bracket, from 1; bracket 0 is the starting configuration's full-length trial.
    pub bracket: usize,
    /// Rung within the bracket, from 0.
    pub rung: usize,
    /// Rounds trained.
    pub rounds: usize,
    /// The configuration (`federation.rounds` is the best checkpoint's round).
    pub params: ConfigFile,
    /// Round of the best validation checkpoint.
    pub best_round: usize,
    /// The optimised metric at that checkpoint (absent when the trial failed).
    pub validation_metric: Option<f64>,
    /// Every metric at that checkpoint.
    pub validation: Option<MetricsRecord>,
    /// Wall seconds of the trial (training and checkpoints).
    pub seconds: f64,
    /// Why the trial failed, if it did.
    pub error: Option<String>,
}

/// How the search went.
#[derive(Debug, Clone, Serialize)]
pub struct SearchInfo {
    /// The budget, in seconds.
    pub budget_seconds: f64,
    /// The trial cap, if any.
    pub max_trials: Option<usize>,
    /// Rounds of the longest trials.
    pub max_rounds: usize,
    /// Rounds of the shortest trials.
    pub min_rounds: usize,
    /// Successive-halving factor.
    pub eta: usize,
    /// Trials at once.
    pub jobs: usize,
    /// Brackets started (the starting configuration's trial counts as bracket 0).
    pub brackets: usize,
    /// Seconds the search took.
    pub search_seconds: f64,
    /// What ended it: `budget` or `max_trials`.
    pub stopped_by: &'static str,
    /// Parameters kept fixed.
    pub fixed: Vec<Param>,
}

/// The chosen configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BestRecord {
    /// The trial it came from.
    pub trial: usize,
    /// The configuration `--out` writes.
    pub config: ConfigFile,
    /// The optimised metric on the validation set.
    pub validation_metric: f64,
    /// Every metric on the validation set.
    pub validation: MetricsRecord,
}

/// The best configuration trained on the full training set.
#[derive(Debug, Clone, Serialize)]
pub struct FinalRecord {
    /// The full configuration (what `run --config` with the same data flags and seed uses).
    pub config: RunConfig,
    /// The optimised metric on the test set.
    pub test_metric: f64,
    /// Every metric on the test set.
    pub test: MetricsRecord,
    /// Training seconds.
    pub train_seconds: f64,
}

/// One finalist re-scored on the second validation split.
#[derive(Debug, Clone, Serialize)]
pub struct FinalistRecord {
    /// The trial the configuration comes from (0: the starting configuration).
    pub trial: usize,
    /// Its sampled configuration.
    pub config_id: usize,
    /// The optimised metric on the first validation split (the search's).
    pub validation_metric: f64,
    /// The optimised metric on the second validation split (absent when the run failed).
    pub second_validation_metric: Option<f64>,
    /// Every metric on the second validation split.
    pub second_validation: Option<MetricsRecord>,
    /// Wall seconds of the run.
    pub seconds: f64,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

/// The confirmation: the best few configurations of the search and the starting one,
/// trained again on a second validation split (the same rule, another seed) and chosen by
/// the mean of their two validation values. The first split's best is optimistic (it won
/// among many noisy trials); the second split is independent of that choice.
#[derive(Debug, Clone, Serialize)]
pub struct ConfirmationInfo {
    /// Seed of the second validation split.
    pub seed: u64,
    /// Interactions the finalists train on.
    pub n_train: usize,
    /// Interactions they are scored on.
    pub n_validation: usize,
    /// The finalists, the starting configuration first.
    pub finalists: Vec<FinalistRecord>,
    /// The trial chosen.
    pub chosen_trial: usize,
}

/// The reference a tuned model must beat clearly.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineRecord {
    /// `bias` (explicit) or `popularity` (implicit).
    pub method: &'static str,
    /// Fitted on the search's training data, scored on the validation set.
    pub validation: MetricsRecord,
    /// Fitted on the full training set, scored on the test set.
    pub test: MetricsRecord,
}

/// The JSON report of `fedrec-sim tune`.
#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    /// Always `tune`.
    pub command: &'static str,
    /// fedrec version.
    pub fedrec_version: &'static str,
    /// The data (the test split).
    pub dataset: DatasetInfo,
    /// The validation split.
    pub validation: ValidationInfo,
    /// The optimised metric.
    pub metric: TuneMetric,
    /// How the search went.
    pub search: SearchInfo,
    /// Every trial.
    pub trials: Vec<TrialRecord>,
    /// The confirmation of the finalists on a second validation split (absent with a
    /// temporal split, whose validation split has one form only, or when one configuration finished).
    pub confirmation: Option<ConfirmationInfo>,
    /// The chosen configuration.
    pub best: BestRecord,
    /// The chosen configuration on the test set.
    #[serde(rename = "final")]
    pub final_run: FinalRecord,
    /// The baseline on both sets.
    pub baseline: BaselineRecord,
    /// Seconds, all included.
    pub wall_seconds: f64,
}

/// The validation split: each user's training interactions split again, by the same per-user
/// rule as the test split, with its own seed. It is built from `train` alone; `train.test`
/// (the test set) is not read.
pub fn validation_split(train: &Split, fraction: f64, kind: SplitKind, seed: u64) -> Split {
    let ds = Dataset {
        name: train.name.clone(),
        user_ids: train.user_ids.clone(),
        item_ids: train.item_ids.clone(),
        interactions: train.train.clone(),
    };
    data::split(&ds, fraction, kind, seed)
}

/// Runs the search and the final run; writes `--out` and `--json` when given and prints a summary.
pub fn cli(
    base: &RunConfig,
    p: &TuneParams,
    out: Option<&Path>,
    json: Option<&Path>,
) -> anyhow::Result<TuneReport> {
    let rep = tune(base, p)?;
    print_summary(&rep);
    if let Some(path) = out {
        report::write_json(path, &rep.best.config)?;
        eprintln!("wrote the best configuration to {} (fedrec-sim run --config {0})", path.display());
    }
    if let Some(path) = json {
        report::write_json(path, &rep)?;
    }
    Ok(rep)
}

/// The search, the final run and the baselines.
pub fn tune(base: &RunConfig, p: &TuneParams) -> anyhow::Result<TuneReport> {
    let t0 = Instant::now();
    let metric = p.metric.unwrap_or(TuneMetric::for_objective(base.objective));
    if metric == TuneMetric::Rmse && base.objective == ObjectiveKind::Implicit {
        bail!("--metric rmse needs the explicit objective: implicit scores are not ratings");
    }
    if !(p.val_fraction > 0.0 && p.val_fraction < 1.0) {
        bail!("--val-fraction must lie in (0, 1), got {}", p.val_fraction);
    }
    if p.eta < 2 {
        bail!("--eta must be at least 2");
    }
    let (split, threshold, info) = load_split(p, base.seed)?;
    let val = validation_split(&split, p.val_fraction, p.split, p.val_seed);
    if val.test.is_empty() {
        bail!(
            "the validation set is empty: every user has too few training interactions; raise --val-fraction"
        );
    }
    let val_data = UserData::from_split(&val, base.objective, threshold);
    // The second validation split of the confirmation: another seed, so it only exists for
    // the random rule (the temporal rule gives the same split whatever the seed).
    let second_seed = p.val_seed.wrapping_add(1);
    let second = (p.split == SplitKind::Random)
        .then(|| validation_split(&split, p.val_fraction, p.split, second_seed))
        .filter(|v| !v.test.is_empty())
        .map(|v| (v.train.len(), v.test.len(), UserData::from_split(&v, base.objective, threshold)));
    let validation = ValidationInfo {
        split: p.split.as_str().to_owned(),
        fraction: p.val_fraction,
        seed: p.val_seed,
        n_train: val.train.len(),
        n_validation: val.test.len(),
    };
    drop(val);
    eprintln!(
        "dataset {}: {} users, {} items; search on {} train / {} validation interactions (the {} test interactions wait for the final run)",
        info.name, info.n_users, info.n_items, validation.n_train, validation.n_validation, info.n_test
    );

    let max_rounds = p.max_rounds.unwrap_or(2 * base.rounds).max(1);
    let min_rounds = p.min_rounds.unwrap_or(max_rounds / (p.eta * p.eta)).clamp(1, max_rounds);
    let jobs = p.jobs.unwrap_or(base.threads).max(1);
    let space = Space::new(base, &val_data.train, &p.fixed);
    let mut search = Search {
        data: &val_data,
        metric,
        base,
        space,
        budget: p.budget,
        max_trials: p.max_trials,
        jobs,
        start: Instant::now(),
        launched: AtomicUsize::new(0),
        out_of_time: AtomicBool::new(false),
        cost: Mutex::new(CostModel::default()),
        trials: Mutex::new(Vec::new()),
        bar: progress_bar(p),
        next_config_id: 0,
        rng: danger::seeded_rng(base.seed ^ 0x7e57_7e57),
        early_stop: base.epsilon.is_none(),
        local_search: false,
        reserve_runs: if second.is_some() { 1.0 + (FINALISTS + 1) as f64 / jobs as f64 } else { 1.0 },
    };
    let brackets = search.hyperband(max_rounds, min_rounds, p.eta);
    let search_seconds = search.start.elapsed().as_secs_f64();
    search.bar.finish_and_clear();
    let stopped_by = if search.out_of_time.load(Ordering::Relaxed) { "budget" } else { "max_trials" };
    let mut trials = search.trials.into_inner().unwrap_or_else(|e| e.into_inner());
    trials.sort_by_key(|t| t.trial);
    let best = trials
        .iter()
        .filter_map(|t| t.validation.map(|m| (t, m)))
        .min_by(|a, b| metric.loss(&a.1).total_cmp(&metric.loss(&b.1)).then(a.0.trial.cmp(&b.0.trial)))
        .map(|(t, m)| BestRecord {
            trial: t.trial,
            config: t.params.clone(),
            validation_metric: metric.value(&m),
            validation: m,
        });
    let Some(mut best) = best else {
        let why = trials.iter().find_map(|t| t.error.clone()).unwrap_or_else(|| "no trial ran".to_owned());
        bail!("no trial finished: {why}");
    };
    let confirmation = match &second {
        Some((n_train, n_validation, data)) => {
            confirm(base, data, &trials, metric, jobs).map(|(finalists, chosen)| ConfirmationInfo {
                seed: second_seed,
                n_train: *n_train,
                n_validation: *n_validation,
                finalists,
                chosen_trial: chosen,
            })
        }
        None => None,
    };
    if let Some(c) = &confirmation
        && let Some(t) = trials.iter().find(|t| t.trial == c.chosen_trial)
        && let Some(m) = t.validation
    {
        best = BestRecord {
            trial: t.trial,
            config: t.params.clone(),
            validation_metric: metric.value(&m),
            validation: m,
        };
    }
    let confirmed = confirmation.as_ref().map_or(String::new(), |c| {
        let mean = c
            .finalists
            .iter()
            .find(|f| f.trial == c.chosen_trial)
            .and_then(|f| f.second_validation_metric.map(|v| (v + f.validation_metric) / 2.0));
        format!(
            "; chosen among {} finalists by the mean over two validation splits (seeds {}, {}): {}",
            c.finalists.len(),
            p.val_seed,
            c.seed,
            mean.map_or_else(|| "—".to_owned(), |m| format!("{m:.4}"))
        )
    });
    best.config.comment = Some(format!(
        "fedrec-sim tune: trial {} of {}, validation {} {:.4} on {} ({} split, validation fraction {}, seed {}){confirmed}",
        best.trial,
        trials.len(),
        metric.label(),
        best.validation_metric,
        info.name,
        validation.split,
        p.val_fraction,
        p.val_seed
    ));

    // The final run: the best configuration on the full training set, scored on the test set,
    // configured exactly as `run --config` would configure it.
    let data = UserData::from_split(&split, base.objective, threshold);
    let mut cfg = base.clone();
    best.config.apply(&mut cfg);
    cfg.calibrate_for(data.train.len(), data.n_items).context("calibrating the noise of the final run")?;
    eprintln!("final run on the full training set: {}", serde_json::to_string(&best.config)?);
    let res = federation::run(&data, &cfg, |_| {})?;
    let test = MetricsRecord::from(res.metrics);
    let final_run =
        FinalRecord { config: cfg, test_metric: metric.value(&test), test, train_seconds: res.train_seconds };
    let baseline = baselines(&val_data, &data, base);

    Ok(TuneReport {
        command: "tune",
        fedrec_version: env!("CARGO_PKG_VERSION"),
        dataset: info,
        validation,
        metric,
        search: SearchInfo {
            budget_seconds: p.budget.as_secs_f64(),
            max_trials: p.max_trials,
            max_rounds,
            min_rounds,
            eta: p.eta,
            jobs,
            brackets,
            search_seconds,
            stopped_by,
            fixed: p.fixed.clone(),
        },
        trials,
        confirmation,
        best,
        final_run,
        baseline,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// How many of the search's best configurations (besides the starting one) the confirmation
/// trains again on the second validation split.
const FINALISTS: usize = 3;

/// The confirmation: the starting configuration's trial and the trials of the [`FINALISTS`]
/// best other configurations (each at its best trial), trained again with their chosen rounds
/// on `second` and scored at the end. Returns the finalists and the chosen trial: the lowest
/// mean loss over the two validation splits, ties going to the earlier trial (the starting
/// configuration first). `None` when fewer than two configurations finished.
fn confirm(
    base: &RunConfig,
    second: &UserData,
    trials: &[TrialRecord],
    metric: TuneMetric,
    jobs: usize,
) -> Option<(Vec<FinalistRecord>, usize)> {
    // Each configuration's best trial.
    let mut best_of: Vec<(f64, &TrialRecord)> = Vec::new();
    for t in trials {
        let Some(m) = t.validation else { continue };
        let loss = metric.loss(&m);
        match best_of.iter_mut().find(|(_, b)| b.config_id == t.config_id) {
            Some(slot) if loss < slot.0 => *slot = (loss, t),
            Some(_) => {}
            None => best_of.push((loss, t)),
        }
    }
    best_of.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.trial.cmp(&b.1.trial)));
    let start = best_of.iter().find(|(_, t)| t.config_id == 0).map(|&(_, t)| t);
    let others = best_of.iter().filter(|(_, t)| t.config_id != 0).take(FINALISTS).map(|&(_, t)| t);
    let finalists: Vec<&TrialRecord> = start.into_iter().chain(others).collect();
    if finalists.len() < 2 {
        return None;
    }
    let workers = jobs.min(finalists.len()).max(1);
    let threads = (base.threads / workers).max(1);
    let next = AtomicUsize::new(0);
    let records: Vec<Mutex<Option<FinalistRecord>>> = finalists.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(t) = finalists.get(k) else { break };
                    let t0 = Instant::now();
                    let mut cfg = base.clone();
                    t.params.apply(&mut cfg);
                    cfg.threads = threads;
                    cfg.eval_every = 0;
                    let outcome = cfg
                        .calibrate_for(second.train.len(), second.n_items)
                        .and_then(|()| federation::run(second, &cfg, |_| {}));
                    let (second_validation, error) = match outcome {
                        Ok(res) => (Some(MetricsRecord::from(res.metrics)), None),
                        Err(e) => (None, Some(format!("{e:#}"))),
                    };
                    let rec = FinalistRecord {
                        trial: t.trial,
                        config_id: t.config_id,
                        validation_metric: t.validation_metric.unwrap_or(f64::NAN),
                        second_validation_metric: second_validation.map(|m| metric.value(&m)),
                        second_validation,
                        seconds: t0.elapsed().as_secs_f64(),
                        error,
                    };
                    *records[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(rec);
                }
            });
        }
    });
    let records: Vec<FinalistRecord> =
        records.into_iter().filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
    let score = |f: &FinalistRecord| -> f64 {
        let (Some(m), Some(t)) = (f.second_validation, finalists.iter().find(|t| t.trial == f.trial)) else {
            return f64::INFINITY;
        };
        t.validation.map_or(f64::INFINITY, |v| (metric.loss(&v) + metric.loss(&m)) / 2.0)
    };
    let chosen = records
        .iter()
        .map(|f| (score(f), f.trial))
        .filter(|(s, _)| s.is_finite())
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))?
        .1;
    Some((records, chosen))
}

/// Loads the data and splits off the test set exactly as `run` does (same seed, same rule).
fn load_split(p: &TuneParams, seed: u64) -> anyhow::Result<(Split, Option<f32>, DatasetInfo)> {
    let split = data::load_split(&p.source, p.test_fraction, p.split, seed)?;
    if split.train.is_empty() {
        bail!("the training set is empty");
    }
    if split.test.is_empty() {
        bail!("the test set is empty: raise --test-fraction or give a --test file");
    }
    let threshold = p.relevance_threshold.or_else(|| {
        let (lo, hi) = split.rating_range();
        (lo < hi).then_some(4.0)
    });
    let info = match p.source {
        DataSource::TrainTest { .. } => DatasetInfo::of(&split, "given", 0.0),
        _ => DatasetInfo::of(&split, p.split.as_str(), p.test_fraction),
    };
    Ok((split, threshold, info))
}

/// Bias-only (explicit) or popularity (implicit), on the validation and on the test set.
fn baselines(val: &UserData, full: &UserData, base: &RunConfig) -> BaselineRecord {
    let on = |d: &UserData| -> MetricsRecord {
        let m = match base.objective {
            ObjectiveKind::Explicit => {
                evaluate(&BiasModel::fit(d, 10.0), &d.eval_users(), d.n_items, &d.eval, base.threads)
            }
            ObjectiveKind::Implicit => {
                evaluate(&Popularity::fit(d), &d.eval_users(), d.n_items, &d.eval, base.threads)
            }
        };
        m.into()
    };
    BaselineRecord {
        method: match base.objective {
            ObjectiveKind::Explicit => "bias",
            ObjectiveKind::Implicit => "popularity",
        },
        validation: on(val),
        test: on(full),
    }
}

fn progress_bar(p: &TuneParams) -> ProgressBar {
    if p.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(p.budget.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} s of budget  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

fn print_summary(rep: &TuneReport) {
    let label = rep.metric.label();
    let mut ranked: Vec<&TrialRecord> = rep.trials.iter().filter(|t| t.validation.is_some()).collect();
    ranked.sort_by(|a, b| {
        let la = a.validation.map_or(f64::INFINITY, |m| rep.metric.loss(&m));
        let lb = b.validation.map_or(f64::INFINITY, |m| rep.metric.loss(&m));
        la.total_cmp(&lb)
    });
    println!(
        "tune on {} ({} users, {} items): {} trials in {:.0} s ({} brackets, rounds {}..{}, stopped by {})",
        rep.dataset.name,
        rep.dataset.n_users,
        rep.dataset.n_items,
        rep.trials.len(),
        rep.search.search_seconds,
        rep.search.brackets,
        rep.search.min_rounds,
        rep.search.max_rounds,
        rep.search.stopped_by
    );
    println!("  best trials by validation {label}:");
    for t in ranked.iter().take(5) {
        let c = &t.params;
        println!(
            "    #{:<4} {label} {:.4} at round {:>4}  d {:>3}  l2_user {:.3} · n^{}  l2_item {:.4}  {:?} lr {:.4}  clients {}",
            t.trial,
            t.validation_metric.unwrap_or(f64::NAN),
            t.best_round,
            c.model.dim.unwrap_or(0),
            c.training.l2_user.unwrap_or(f32::NAN),
            c.training.user_support_exponent.unwrap_or(0.0),
            c.training.l2_item.unwrap_or(f32::NAN),
            c.training.optimizer.unwrap_or(FileOptimizer::Adam),
            c.training.server_lr.unwrap_or(f32::NAN),
            c.federation.clients_per_round.unwrap_or(0),
        );
    }
    if let Some(c) = &rep.confirmation {
        println!(
            "  finalists on the second validation split (seed {}), chosen by the mean of the two:",
            c.seed
        );
        for f in &c.finalists {
            let second = f.second_validation_metric;
            println!(
                "    #{:<4} {label} {:.4} / {}  mean {}{}{}",
                f.trial,
                f.validation_metric,
                second.map_or_else(|| "failed".to_owned(), |v| format!("{v:.4}")),
                second.map_or_else(|| "—".to_owned(), |v| format!("{:.4}", (v + f.validation_metric) / 2.0)),
                if f.config_id == 0 { "  (starting configuration)" } else { "" },
                if f.trial == c.chosen_trial { "  ← chosen" } else { "" },
            );
        }
    }
    let b = &rep.baseline;
    print!(
        "{}",
        report::table(&[
            (
                "validation",
                format!(
                    "{label} {:.4} (trial {}; {} {:.4})",
                    rep.best.validation_metric,
                    rep.best.trial,
                    b.method,
                    rep.metric.value(&b.validation)
                ),
            ),
            (
                "test (full training set)",
                format!(
                    "{label} {:.4} ({} {:.4})",
                    rep.final_run.test_metric,
                    b.method,
                    rep.metric.value(&b.test)
                ),
            ),
            ("test RMSE", report::fmt_opt(rep.final_run.test.rmse)),
            ("test Recall@20", format!("{:.4}", rep.final_run.test.recall_at_20)),
            ("test NDCG@10", format!("{:.4}", rep.final_run.test.ndcg_at_10)),
            ("wall seconds", format!("{:.1}", rep.wall_seconds)),
        ])
    );
}

/// Seconds per (round × client × dimension), learned from finished trials, to tell whether a
/// trial still fits in the budget.
#[derive(Debug, Default)]
struct CostModel {
    /// The rate of every finished trial.
    rates: Vec<f64>,
}

fn cost_units(cfg: &RunConfig) -> f64 {
    cfg.rounds as f64 * cfg.clients_per_round as f64 * cfg.dim.max(8) as f64
}

impl CostModel {
    fn observe(&mut self, cfg: &RunConfig, seconds: f64) {
        self.rates.push(seconds / cost_units(cfg).max(1.0));
    }

    /// The median rate, with a margin, times the trial's size. Small trials pay more per unit
    /// (checkpoints, round overheads), so the largest rate would be far too pessimistic for
    /// large ones, and one expensive draw would end the search.
    fn estimate(&self, cfg: &RunConfig) -> f64 {
        if self.rates.is_empty() {
            return 0.0;
        }
        let mut r = self.rates.clone();
        r.sort_by(f64::total_cmp);
        1.25 * r[r.len() / 2] * cost_units(cfg)
    }
}

/// The search space: where each parameter is drawn from.
#[derive(Debug, Clone)]
struct Space {
    objective: ObjectiveKind,
    n_users: usize,
    fixed: Vec<Param>,
    adaptive_clip: bool,
    /// The median number of training interactions per user: with a support exponent `ν`, the
    /// sampled `l2_user` is the ridge of this user, `l2_user · median^ν`.
    median_support: f64,
}

const DIMS: [usize; 5] = [8, 16, 32, 64, 128];
const CLIENTS: [usize; 4] = [50, 100, 200, 400];
const MOMENTA: [f32; 4] = [0.0, 0.5, 0.9, 0.95];
/// The support exponents the search tries: none, the square root, ALS-WR's linear one.
const SUPPORT_EXPONENTS: [f32; 3] = [0.0, 0.5, 1.0];

impl Space {
    fn new(base: &RunConfig, train: &[Vec<Rating>], fixed: &[Param]) -> Self {
        let mut support: Vec<usize> = train.iter().map(Vec::len).collect();
        support.sort_unstable();
        let median_support = support.get(support.len() / 2).map_or(1.0, |&n| n.max(1) as f64);
        Self {
            objective: base.objective,
            n_users: train.len(),
            fixed: fixed.to_vec(),
            adaptive_clip: base.adaptive_clip,
            median_support,
        }
    }

    /// `median^ν`: what `l2_user` is multiplied by for the median user.
    fn support_scale(&self, nu: f32) -> f32 {
        self.median_support.powf(f64::from(nu)) as f32
    }

    /// The log-uniform range of a continuous parameter in `c`'s units: `l2_user`'s range is
    /// that of the median user's ridge, divided by [`Space::support_scale`] of `c`'s exponent.
    fn range_for(&self, p: Param, c: &RunConfig) -> (f32, f32) {
        let (lo, hi) = self.range(p, c.optimizer);
        if p == Param::L2User {
            let scale = self.support_scale(c.user_support_exponent);
            (lo / scale, hi / scale)
        } else {
            (lo, hi)
        }
    }

    /// Whether the search varies `p`.
    fn free(&self, p: Param) -> bool {
        let applies = match p {
            Param::L2UserBias | Param::L2ItemBias => self.objective == ObjectiveKind::Explicit,
            Param::Alpha => self.objective == ObjectiveKind::Implicit,
            Param::ClipNorm => !self.adaptive_clip,
            // The exponent rescales the user ridge: searched only with it.
            Param::UserSupportExponent => !self.fixed.contains(&Param::L2User),
            _ => true,
        };
        applies && !self.fixed.contains(&p)
    }

    /// The log-uniform range of a continuous parameter.
    fn range(&self, p: Param, optimizer: OptimizerKind) -> (f32, f32) {
        let implicit = self.objective == ObjectiveKind::Implicit;
        match p {
            Param::L2User if implicit => (0.3, 100.0),
            Param::L2User => (0.3, 30.0),
            Param::L2UserBias => (0.3, 30.0),
            Param::L2Item if implicit => (0.003, 3.0),
            Param::L2Item => (0.01, 3.0),
            Param::L2ItemBias => (0.001, 1.0),
            Param::Alpha => (0.1, 50.0),
            Param::ServerLr if optimizer == OptimizerKind::Adam => (0.001, 0.1),
            Param::ServerLr => (0.005, 3.0),
            Param::ClipNorm => (0.3, 300.0),
            Param::InitStd => (0.01, 0.5),
            Param::Dim
            | Param::Optimizer
            | Param::Momentum
            | Param::ClientsPerRound
            | Param::UserSupportExponent => (1.0, 1.0),
        }
    }

    fn clients(&self) -> Vec<usize> {
        let c: Vec<usize> = CLIENTS.iter().copied().filter(|&c| c <= self.n_users).collect();
        if c.is_empty() { vec![self.n_users.max(1)] } else { c }
    }

    fn field(c: &mut RunConfig, p: Param) -> Option<&mut f32> {
        match p {
            Param::L2User => Some(&mut c.l2_user),
            Param::L2UserBias => Some(&mut c.l2_user_bias),
            Param::L2Item => Some(&mut c.l2_item),
            Param::L2ItemBias => Some(&mut c.l2_item_bias),
            Param::Alpha => Some(&mut c.alpha),
            Param::ServerLr => Some(&mut c.server_lr),
            Param::ClipNorm => Some(&mut c.clip_norm),
            Param::InitStd => Some(&mut c.init_std),
            Param::Dim
            | Param::Optimizer
            | Param::Momentum
            | Param::ClientsPerRound
            | Param::UserSupportExponent => None,
        }
    }

    const CONTINUOUS: [Param; 8] = [
        Param::L2User,
        Param::L2UserBias,
        Param::L2Item,
        Param::L2ItemBias,
        Param::Alpha,
        Param::ServerLr,
        Param::ClipNorm,
        Param::InitStd,
    ];

    /// A fresh random configuration around `base`.
    fn sample(&self, base: &RunConfig, rng: &mut impl Rng) -> RunConfig {
        let mut c = base.clone();
        if self.free(Param::Dim) {
            c.dim = DIMS[rng.random_range(0..DIMS.len())];
        }
        if self.free(Param::ClientsPerRound) {
            let cs = self.clients();
            c.clients_per_round = cs[rng.random_range(0..cs.len())];
        }
        if self.free(Param::Optimizer) {
            // Adam is the default for good reason; SGD gets a quarter of the draws.
            c.optimizer = if rng.random_bool(0.25) { OptimizerKind::Sgd } else { OptimizerKind::Adam };
        }
        if self.free(Param::Momentum) && c.optimizer == OptimizerKind::Sgd {
            c.momentum = MOMENTA[rng.random_range(0..MOMENTA.len())];
        }
        if self.free(Param::UserSupportExponent) {
            c.user_support_exponent = SUPPORT_EXPONENTS[rng.random_range(0..SUPPORT_EXPONENTS.len())];
        }
        for p in Self::CONTINUOUS {
            if self.free(p) {
                let (lo, hi) = self.range_for(p, &c);
                if let Some(x) = Self::field(&mut c, p) {
                    *x = log_uniform(rng, lo, hi);
                }
            }
        }
        c
    }

    /// A neighbour of `best`: each continuous value times e^N(0, 0.5²), discrete ones moved a
    /// step now and then.
    fn perturb(&self, best: &RunConfig, rng: &mut impl Rng) -> RunConfig {
        let mut c = best.clone();
        let step = Normal::new(0.0f64, 0.5).expect("a positive standard deviation");
        if self.free(Param::Dim) && rng.random_bool(0.3) {
            let k = DIMS.iter().position(|&d| d == c.dim).unwrap_or(2);
            let k = if rng.random_bool(0.5) { k.saturating_sub(1) } else { (k + 1).min(DIMS.len() - 1) };
            c.dim = DIMS[k];
        }
        if self.free(Param::ClientsPerRound) && rng.random_bool(0.3) {
            let cs = self.clients();
            let k = cs.iter().position(|&n| n == c.clients_per_round).unwrap_or(0);
            let k = if rng.random_bool(0.5) { k.saturating_sub(1) } else { (k + 1).min(cs.len() - 1) };
            c.clients_per_round = cs[k];
        }
        if self.free(Param::Momentum) && c.optimizer == OptimizerKind::Sgd && rng.random_bool(0.3) {
            c.momentum = MOMENTA[rng.random_range(0..MOMENTA.len())];
        }
        if self.free(Param::UserSupportExponent) && rng.random_bool(0.3) {
            // A step to a neighbouring exponent, keeping the median user's ridge.
            let k = SUPPORT_EXPONENTS.iter().position(|&e| e == c.user_support_exponent).unwrap_or(0);
            let k = if rng.random_bool(0.5) {
                k.saturating_sub(1)
            } else {
                (k + 1).min(SUPPORT_EXPONENTS.len() - 1)
            };
            let old = self.support_scale(c.user_support_exponent);
            c.user_support_exponent = SUPPORT_EXPONENTS[k];
            c.l2_user *= old / self.support_scale(c.user_support_exponent);
        }
        for p in Self::CONTINUOUS {
            if self.free(p) {
                let (lo, hi) = self.range_for(p, &c);
                let factor = step.sample(rng).exp() as f32;
                if let Some(x) = Self::field(&mut c, p) {
                    *x = (*x * factor).clamp(lo, hi);
                }
            }
        }
        c
    }
}

fn log_uniform(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    let (a, b) = (f64::from(lo).ln(), f64::from(hi).ln());
    (a + rng.random::<f64>() * (b - a)).exp() as f32
}

/// The state of one search.
struct Search<'a, R> {
    data: &'a UserData,
    metric: TuneMetric,
    base: &'a RunConfig,
    space: Space,
    budget: Duration,
    max_trials: Option<usize>,
    jobs: usize,
    start: Instant,
    launched: AtomicUsize,
    out_of_time: AtomicBool,
    cost: Mutex<CostModel>,
    trials: Mutex<Vec<TrialRecord>>,
    bar: ProgressBar,
    next_config_id: usize,
    rng: R,
    early_stop: bool,
    /// Full-length runs to leave time for after the search, in units of one run on all
    /// threads: the final run, and the confirmation's finalists when there is one.
    reserve_runs: f64,
    /// Whether half the new configurations are drawn around the best so far.
    local_search: bool,
}

/// A configuration taking part in a bracket.
#[derive(Clone)]
struct Candidate {
    config_id: usize,
    cfg: RunConfig,
}

impl<R: Rng + Send + Sync> Search<'_, R> {
    fn stopped(&self) -> bool {
        self.out_of_time.load(Ordering::Relaxed)
            || self.max_trials.is_some_and(|m| self.launched.load(Ordering::Relaxed) >= m)
    }

    /// The starting configuration at full length (trial 0, bracket 0), then Hyperband
    /// brackets (from 1), from the most exploratory down to plain random search, repeated
    /// until the budget or the trial cap ends the search. Returns the brackets started,
    /// the starting configuration's counted as one.
    ///
    /// The starting configuration runs first and always at `max_rounds`: it is always a
    /// candidate with its best checkpoint, so the search never returns a configuration that
    /// does worse on validation than the one it started from, whatever the budget.
    fn hyperband(&mut self, max_rounds: usize, min_rounds: usize, eta: usize) -> usize {
        let start = self.next_candidate();
        self.run_rung(std::slice::from_ref(&start), 0, 0, max_rounds);
        let mut s_max = 0;
        while min_rounds * eta.pow(s_max as u32 + 1) <= max_rounds {
            s_max += 1;
        }
        let shortest = (max_rounds / eta.pow(s_max as u32)).max(1);
        let mut bracket = 1;
        while !self.stopped() {
            let s = s_max - (bracket - 1) % (s_max + 1);
            let n = ((s_max + 1) as f64 / (s + 1) as f64 * eta.pow(s as u32) as f64).ceil() as usize;
            // The first bracket explores the whole space; local draws around the best start
            // after it (the starting configuration alone would pull them to the defaults).
            self.local_search = bracket > 1;
            let mut candidates: Vec<Candidate> = (0..n).map(|_| self.next_candidate()).collect();
            for rung in 0..=s {
                let rounds =
                    if rung == s { max_rounds } else { (max_rounds / eta.pow((s - rung) as u32)).max(1) };
                let Some(results) = self.run_rung(&candidates, bracket, rung, rounds) else {
                    // Nothing of this rung fits what is left. At the cheapest rounds nothing
                    // will; a longer rung ends only its bracket, and cheaper trials may follow.
                    if rounds <= shortest {
                        self.out_of_time.store(true, Ordering::Relaxed);
                    }
                    break;
                };
                if rung == s || self.stopped() {
                    break;
                }
                let mut done: Vec<(f64, Candidate)> = results
                    .into_iter()
                    .zip(&candidates)
                    .filter_map(|(loss, c)| loss.map(|l| (l, c.clone())))
                    .collect();
                done.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.config_id.cmp(&b.1.config_id)));
                let keep = (candidates.len() / eta).max(1);
                candidates = done.into_iter().take(keep).map(|(_, c)| c).collect();
                if candidates.is_empty() {
                    break;
                }
            }
            bracket += 1;
        }
        bracket
    }

    /// The next configuration: the base first, then a random draw or, half the time after
    /// the first bracket, a neighbour of the best so far.
    fn next_candidate(&mut self) -> Candidate {
        let config_id = self.next_config_id;
        self.next_config_id += 1;
        let cfg = if config_id == 0 {
            let mut c = self.base.clone();
            c.clients_per_round = c.clients_per_round.min(self.space.n_users.max(1));
            c
        } else {
            let best = self.best_config();
            match best {
                Some(b) if self.local_search && self.rng.random_bool(0.5) => {
                    self.space.perturb(&b, &mut self.rng)
                }
                _ => self.space.sample(self.base, &mut self.rng),
            }
        };
        Candidate { config_id, cfg }
    }

    fn best_config(&self) -> Option<RunConfig> {
        let trials = self.trials.lock().unwrap_or_else(|e| e.into_inner());
        trials
            .iter()
            .filter_map(|t| t.validation.map(|m| (self.metric.loss(&m), t)))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.trial.cmp(&b.1.trial)))
            .map(|(_, t)| {
                let mut c = self.base.clone();
                t.params.apply(&mut c);
                c
            })
    }

    /// Runs one rung's trials, `jobs` at a time. Returns each candidate's loss (`None`: not
    /// run, or failed), or `None` when the rung had trials to run and none fitted the budget.
    fn run_rung(
        &self,
        candidates: &[Candidate],
        bracket: usize,
        rung: usize,
        rounds: usize,
    ) -> Option<Vec<Option<f64>>> {
        // Trial numbers and the trial cap are settled before anything runs, so they do not
        // depend on which worker finishes first.
        let first = self.launched.load(Ordering::Relaxed);
        let allowed =
            self.max_trials.map_or(candidates.len(), |m| m.saturating_sub(first).min(candidates.len()));
        let workers = self.jobs.min(allowed).max(1);
        let threads = (self.base.threads / workers).max(1);
        let results: Vec<Mutex<Option<f64>>> = candidates.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let ran = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= allowed {
                            break;
                        }
                        let mut cfg = candidates[k].cfg.clone();
                        cfg.rounds = rounds;
                        cfg.threads = threads;
                        if !self.fits(&cfg, first + k) {
                            // Too expensive for what is left; a cheaper one may still fit.
                            continue;
                        }
                        ran.fetch_add(1, Ordering::Relaxed);
                        self.launched.fetch_max(first + k + 1, Ordering::Relaxed);
                        let rec = self.trial(first + k, &candidates[k], bracket, rung, cfg);
                        let loss = rec.validation.map(|m| self.metric.loss(&m));
                        *results[k].lock().unwrap_or_else(|e| e.into_inner()) = loss;
                        self.bar.set_position(self.start.elapsed().as_secs());
                        if let Some(best) = self.best_value() {
                            self.bar.set_message(format!(
                                "{} trials  best validation {} {best:.4}",
                                self.launched.load(Ordering::Relaxed),
                                self.metric.label()
                            ));
                        }
                        self.trials.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
                    }
                });
            }
        });
        // A trial skipped for time leaves a gap in the numbering.
        if allowed > 0 && ran.load(Ordering::Relaxed) == 0 {
            return None;
        }
        Some(results.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect())
    }

    fn best_value(&self) -> Option<f64> {
        let trials = self.trials.lock().unwrap_or_else(|e| e.into_inner());
        trials
            .iter()
            .filter_map(|t| t.validation)
            .min_by(|a, b| self.metric.loss(a).total_cmp(&self.metric.loss(b)))
            .map(|m| self.metric.value(&m))
    }

    /// Whether trial `trial` of config `cfg` may start: the first always does; the others
    /// when the estimate of their cost, plus that of the final run, fits in what is left.
    fn fits(&self, cfg: &RunConfig, trial: usize) -> bool {
        if trial == 0 {
            return true;
        }
        if self.out_of_time.load(Ordering::Relaxed) {
            return false;
        }
        let left = self.budget.as_secs_f64() - self.start.elapsed().as_secs_f64();
        if left <= 0.0 {
            self.out_of_time.store(true, Ordering::Relaxed);
            return false;
        }
        let cost = self.cost.lock().unwrap_or_else(|e| e.into_inner());
        // Room for the final run (and the confirmation) too, estimated as this configuration
        // at full length.
        let mut final_run = cfg.clone();
        final_run.rounds = final_run.rounds.max(self.base.rounds);
        cost.estimate(cfg) + self.reserve_runs * cost.estimate(&final_run) < left
    }

    /// One federation of the validation data; its score is the best checkpoint.
    fn trial(
        &self,
        trial: usize,
        cand: &Candidate,
        bracket: usize,
        rung: usize,
        mut cfg: RunConfig,
    ) -> TrialRecord {
        let t0 = Instant::now();
        // Early stopping picks a round among checkpoints, about twelve per trial (on ML-100K
        // an evaluation costs as much as a few dozen rounds). A noisy run is calibrated for
        // its full length, so it is scored at its end only.
        cfg.eval_every = if self.early_stop { (cfg.rounds / 12).max(1) } else { 0 };
        let mut best: Option<(usize, MetricsRecord)> = None;
        let outcome = cfg.calibrate_for(self.data.train.len(), self.data.n_items).and_then(|()| {
            federation::run(self.data, &cfg, |rec| {
                if let Some(m) = rec.metrics {
                    let better = best.is_none_or(|(_, b)| self.metric.loss(&m) < self.metric.loss(&b));
                    if better {
                        best = Some((rec.round, m));
                    }
                }
            })
        });
        let seconds = t0.elapsed().as_secs_f64();
        self.cost.lock().unwrap_or_else(|e| e.into_inner()).observe(&cfg, seconds);
        let rounds = cfg.rounds;
        let error = outcome.err().map(|e| format!("{e:#}"));
        let best = if error.is_none() { best } else { None };
        let best_round = best.map_or(rounds, |(r, _)| r);
        let mut params = cand.cfg.clone();
        params.rounds = best_round;
        TrialRecord {
            trial,
            config_id: cand.config_id,
            bracket,
            rung,
            rounds,
            params: ConfigFile::from_config(&params),
            best_round,
            validation_metric: best.map(|(_, m)| self.metric.value(&m)),
            validation: best.map(|(_, m)| m),
            seconds,
            error,
        }
    }
}
