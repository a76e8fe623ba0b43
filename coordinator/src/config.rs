//! The operator's configuration file (`fedrec.toml`): its format, the commented template `fedrec-coordinator init` writes, and its conversion into the round machine's [`CoordinatorConfig`].
//!
//! The file is input: unknown keys are refused, and every value is checked by the same
//! constructors the library uses. A privacy budget has no default: with noise on, the
//! operator must write `epsilon` and `delta` before `serve` accepts the file. Once a budget
//! is stored (by `init --epsilon --delta` or the first `serve`), the store's budget is the
//! authority: `serve` refuses a file whose budget differs from it, and only
//! `fedrec-coordinator budget raise` (logged, with a reason) changes it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedrec_shared::ledger::{PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::AccountantKind;
use fedrec_shared::round::{
    AdaptiveClip, CoordinatorConfig, DistributedNoise, SecureAggregation, Selection, TaskPrivacy,
    distributed_params,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::{ModelInit, ModelShape, Objective, TrainParams};
use serde::Deserialize;

use crate::auth::ReplayLimits;
use crate::server::{
    DEFAULT_MAX_CONCURRENT_HANDSHAKES, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
    DEFAULT_MAX_INVALID_REQUESTS, DEFAULT_MAX_UPLOAD_MEMORY, DEFAULT_ROUNDS_PER_DEVICE_PER_DAY,
    EligibilityPolicy, UPLOAD_RECEIVE_WINDOW,
};

/// The configuration file's name inside a state directory.
pub const CONFIG_FILE: &str = "fedrec.toml";

/// Shortest check-in and report windows accepted, in milliseconds. A device needs a network
/// round trip to check in and a download, a training step and an upload to report; a shorter
/// window abandons round after round (an idle coordinator with a zero window and no gap wrote
/// 3,317 abandoned rounds in 4 s).
pub const MIN_WINDOW_MS: u64 = 1_000;
/// Longest window or pause between rounds accepted, in milliseconds: one day. Longer values
/// are a mistake in the unit (these are milliseconds), not a policy.
pub const MAX_DURATION_MS: u64 = 86_400_000;

/// The template `init` writes: every setting, with a comment saying what it does.
///
/// It is ready for devices running the SDK once the privacy budget is set (the one thing it
/// leaves out on purpose): the implicit objective the SDK's interaction signals call for, and
/// rounds that can commit.
pub const TEMPLATE: &str = r#"# fedrec coordinator configuration. `fedrec-coordinator serve --dir DIR` reads it.
# Durations are in milliseconds.
#
# Before the first `serve`:
#   1. Set the privacy budget in [privacy] (required: there is no default).
#   2. Make [model] match your catalogue, and open the SDK in the app with the same
#      n_items, dim and n_segments (FedrecCoordinator / SdkConfig::coordinator).
#   3. To accept devices from other machines, listen on a routable address ("0.0.0.0:4433").
# Everything else works as written with devices running the SDK.

# Address the QUIC endpoint listens on.
listen = "127.0.0.1:4433"
# Address of the HTTP endpoint serving Prometheus metrics at GET /metrics (remove the line
# to serve none). It tells anyone who can reach it how the rounds go: keep it private.
metrics_listen = "127.0.0.1:9464"

[model]
# Number of items in the catalogue, factor dimension, number of user segments (k-means).
n_items = 1000
dim = 16
n_segments = 8
# Initialisation of a fresh model (ignored once the store holds a checkpoint).
factor_std = 0.1
global_mean = 0.0      # 0 for implicit feedback; a prior such as 3.5 for explicit ratings
centroid_scale = 0.001
# Items each round trains. Large catalogues: a subset of this many items, drawn from the
# round's public seed (never from any device's data), so that each device's download and
# upload are items_per_round x (dim + 1) x 4 bytes instead of n_items x ...; each item then
# trains in a fraction items_per_round / n_items of the rounds: plan more rounds (the
# README's "Large catalogues" has the measured trade). Left out: every item while a dense
# upload fits in 8 MB (n_items x (dim + 1) x 4 bytes), else 4096. 0 = every item, always.
# items_per_round = 4096
# The round's model download: "f32", or "int8" (item factors as 8-bit codes with one scale
# per row, unbiased stochastic rounding; about 3.5x smaller at dim 32).
download = "f32"

[training]
# What devices learn from. The SDK turns the app's events (views, clicks, purchases, ratings)
# into decayed interaction strengths, not ratings: train it with "implicit" (weighted
# matrix factorization, iALS). "explicit" (squared error on 1-5 star ratings) is for devices
# that hold ratings, such as fedrec-sim's.
objective = "implicit"
# Confidence of an observed item: 1 + implicit_alpha * strength (unobserved items: 1). With
# the SDK's default weights a view adds 1 to an item's strength, a click 2, a purchase 8.
# Only with "implicit".
implicit_alpha = 1.0
# Ridge penalties: user vector, user bias (explicit only), item vectors, item biases. These
# are fedrec-sim's defaults for the implicit objective.
l2_user = 5.0
l2_user_bias = 0.0
l2_item = 0.1
l2_item_bias = 0.0
# How the user ridge grows with the user's number of interactions n: l2_user * n^exponent
# (0: the same for every user; 1: ALS-WR's weighted-lambda; in [0, 2]). An exponent needs a
# much smaller l2_user (measured on ML-100K without noise: exponent 1 with a ridge of 0.2 beats
# the line above; under strong noise it does not): let `fedrec-sim tune` choose both.
user_support_exponent = 0.0
# Server optimizer for the item side: "adam" or "sgd" (sgd uses momentum).
optimizer = "adam"
server_lr = 0.005
# momentum = 0.9

[rounds]
# A round: devices check in during checkin_window_ms; some are selected; the selected ones
# train and report within report_window_ms; the round commits a new model if at least
# min_reports reported, and is abandoned otherwise (nothing released, nothing charged).
#
# Selection "poisson": every device that checks in is selected independently with
#   probability q, so a round has on average  q x (devices checking in during the window)
#   devices. This is what the privacy accountant models, and the only choice with noise.
# Selection "first_come": the first `cohort` devices that check in (write cohort instead
#   of q). Only without noise (noise_multiplier 0).
selection = "poisson"
q = 0.5
# cohort = 100
# The number of devices you expect to check in during a round's window: a public number
# you choose, not a count. With poisson and noise the noised sum is divided by
# q x population whoever took part (a count of this round's devices would reveal who did).
# Required with poisson and noise; set it to your typical check-ins per round.
population = 100
# Fewest reports with which a round commits: at least 1, and at most cohort with first_come
# (serve refuses more). With noise it does not apply: every round commits at its report
# deadline, never earlier, because a decision on the exact number of reports (or an early
# close once all selected devices reported) would itself reveal it. Without noise, keep it well below q x (devices checking
# in), leaving room for dropouts, or every round is abandoned.
min_reports = 10
# How long a round accepts check-ins, and how long selected devices then have to report
# (each from 1000 to 86400000, i.e. 1 s to 1 day).
checkin_window_ms = 30000
report_window_ms = 120000
# Pause between the close of one round and the start of the next (0 to 86400000).
round_gap_ms = 1000

[privacy]
# L2 bound on each device's update (the starting bound with clip = "adaptive").
clip_norm = 1.0
# "fixed": every round clips at clip_norm. "adaptive": the bound tracks a quantile of the
# update norms (Andrew et al. 2021): each device also reports whether its update was within
# the bound; the noised fraction moves the bound by exp(-clip_learning_rate x (fraction -
# target_quantile)). The bits are a second noised release, charged with the update:
# noise z and bit noise b cost as one noise multiplier (z^-2 + b^-2)^-1/2 (z 1, b 10: 0.995).
clip = "fixed"
# With clip = "adaptive" (remove the # of all three):
# target_quantile = 0.5
# clip_learning_rate = 0.2
# clip_count_noise = 10.0
# How the coordinator combines a round's updates. "secure" (SecAgg+, docs/secagg.md): each
# device masks its update and the coordinator learns only the sum of the devices that finish
# the protocol, never one device's update. "plain": the coordinator sees every clipped
# update (for research only). A secure round needs at least 3 devices that advertise keys,
# and devices refuse cohorts below their own minimum (the SDK's production policy: 100).
aggregation = "secure"
# Secure aggregation: the fraction of the cohort expected to drop out during the protocol
# and the fraction that may collude with the coordinator (they set the neighbours k and the
# threshold t: more of either, larger k), and how long each of its three later phases
# (share keys, masked input, unmask) stays open. A round with noise lasts
# checkin_window_ms + report_window_ms + 3 x secagg_phase_window_ms.
secagg_dropout = 0.33
secagg_colluding = 0.05
secagg_phase_window_ms = 30000
# Who adds the noise. "central": the coordinator adds discrete Gaussian noise to the
# unmasked sum (it sees the exact sum first). "distributed" (docs/ddp.md; needs aggregation
# = "secure" and noise_multiplier > 0): each device adds its share of discrete Gaussian noise
# before masking, so no party ever sees an un-noised value. Shares are calibrated so that
# min_reports survivors carry noise_multiplier x clip_norm on the sum; a round whose
# surviving masked inputs are fewer than min_reports aborts and releases nothing. With
# "distributed", bits (8 to 32; 16 recommended, 2^(bits-1) above the calibrated cohort
# q x population + 10 sqrt(q x population) + 10) is the ring width, and clip must be "fixed".
# "distributed" is the recommended deployment: the coordinator is then never trusted with
# an un-noised sum. Its charges are kept in the store's ledger like central ones.
mechanism = "distributed"
bits = 16
# Gaussian noise standard deviation as a multiple of clip_norm (0 = no noise, no privacy).
# With distributed noise: the target noise on the sum of min_reports shares.
noise_multiplier = 1.0
# Accountant: "rdp" (fast, looser) or "pld" (tighter).
accountant = "rdp"
# The (epsilon, delta) budget is REQUIRED when noise_multiplier > 0, and has no default:
# choose it for your population (delta well below 1 / number of devices), then uncomment.
# The coordinator refuses to open a round that could take the spend past epsilon.
# What a budget buys (rdp, delta 1e-6): with this file's q (0.5) and noise_multiplier
# (1.0), epsilon 8 pays for 3 rounds; with q 0.01 (a population 50 times larger for the
# same devices per round) 1000 rounds cost epsilon 2.4. Price a plan with
#   fedrec-sim privacy epsilon --q Q --sigma NOISE_MULTIPLIER --steps ROUNDS --delta DELTA
# The budget is fixed in the store at the first `serve` (or by `init --epsilon --delta`):
# from then on serve refuses a file whose budget differs, and only
#   fedrec-coordinator budget raise --dir DIR --epsilon E --reason "..."
# (logged in the audit log) raises it; then write the new epsilon here too.
# epsilon = 8.0
# delta = 1e-6

[limits]
# Most rounds a device may be *selected* for per UTC day (check-ins that are not selected
# do not count). A device at its quota is refused with RateLimited until the next UTC
# midnight. The counts live in memory: a restart resets them.
rounds_per_device_per_day = 24
# Most concurrent QUIC connections; more are refused (metric reason "connection_cap").
max_connections = 10000
# Requests only a misbehaving peer sends (malformed or oversized frames, forged tokens,
# replays, updates of the wrong shape, non-finite or too large) after which its connection
# is closed with error code cut_off (17). 0 never closes a connection.
max_invalid_requests = 3
# Most concurrent connections from one IP address (0 = no limit; metric reason
# "source_cap"). Devices behind one NAT share an address: keep it above what one may hold.
max_connections_per_source = 64
# MiB that uploads being received may hold at once, all connections together; at least one
# upload of the model (n_items x (dim + 1) x 4 bytes and the centroids) plus 1 MiB. Beyond
# it devices wait (flow control), then are told Busy and retry.
max_upload_memory_mb = 256
# Most QUIC handshakes under way at once (0 = no limit). A burst beyond it is refused at
# once (metric reason "handshake_cap") and devices come back after their backoff with jitter.
max_concurrent_handshakes = 256
# How long a request may take to arrive once its stream is open, and how long a connection
# may stay open without one (1000 to 600000; a timeout is a strike, an idle connection is
# closed). Twice this is the QUIC idle timeout. Raise it for slow links or slow devices.
read_timeout_ms = 10000
# Peak memory, even under attack, is bounded by about max_connections x 64 KiB (here 625
# MiB) + max_upload_memory_mb + the model and its optimizer state.

[eligibility]
# Device states a check-in must report, else it is refused with NotEligible and never
# selected. The host app decides when to participate (typically charging, on Wi-Fi and
# idle) and reports the state; these settings enforce it. The device's claim is not verified.
require_charging = false
require_unmetered = false
require_idle = false

# Where the state lives. Absent: SQLite, state.sqlite in this directory (one serve at a time).
# PostgreSQL lets several serve processes share it: one leads rounds, the others stand by.
# [store]
# backend = "postgres"
# url = "postgres://fedrec@db.internal:5432/fedrec"   # no password here
# password_env = "FEDREC_PG_PASSWORD"                 # or password_file = "pg.password"
# tls = "require"          # default: "require" unless the host is loopback or a Unix socket
# ca_file = "pg-ca.pem"    # the CA that signed the server's certificate; default: the system's
# An existing SQLite store moves with `fedrec-coordinator migrate --dir . --to <url>`.
"#;

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML of this format.
    #[error("invalid configuration file {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or settings contradict each other.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid {
        /// The offending setting.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address of the metrics endpoint (`GET /metrics`); absent serves none.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Model shape and initialisation.
    pub model: ModelSection,
    /// Device-side objective and regularisation, and the server optimizer.
    pub training: TrainingSection,
    /// Round policy.
    pub rounds: RoundsSection,
    /// Clipping, noise and budget.
    pub privacy: PrivacySection,
    /// Per-device and per-connection limits (defaults when the section is absent).
    #[serde(default)]
    pub limits: LimitsSection,
    /// Device states accepted at check-in (nothing required when the section is absent).
    #[serde(default)]
    pub eligibility: EligibilitySection,
    /// Where the state lives (SQLite in the state directory when the section is absent).
    #[serde(default)]
    pub store: crate::store::StoreSection,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Most rounds a device may be selected for per UTC day.
    pub rounds_per_device_per_day: u32,
    /// Most concurrent connections (at least 1).
    pub max_connections: usize,
    /// Strikes after which a misbehaving connection is closed; 0 never closes one.
    pub max_invalid_requests: u32,
    /// Most concurrent connections from one IP address; 0 is no limit.
    pub max_connections_per_source: usize,
    /// MiB that uploads being received may hold at once, all connections together (at least
    /// one upload of the model plus the upload receive window).
    pub max_upload_memory_mb: usize,
    /// Most QUIC handshakes under way at once; 0 is no limit.
    pub max_concurrent_handshakes: usize,
    /// How long a request may take to arrive, and a connection may stay without one (ms).
    pub read_timeout_ms: u64,
}

impl LimitsSection {
    /// [`LimitsSection::max_upload_memory_mb`] in bytes (saturating).
    pub fn max_upload_memory(&self) -> usize {
        self.max_upload_memory_mb.saturating_mul(1 << 20)
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            rounds_per_device_per_day: DEFAULT_ROUNDS_PER_DEVICE_PER_DAY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_invalid_requests: DEFAULT_MAX_INVALID_REQUESTS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_upload_memory_mb: DEFAULT_MAX_UPLOAD_MEMORY >> 20,
            max_concurrent_handshakes: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            read_timeout_ms: u64::try_from(crate::server::DEFAULT_READ_TIMEOUT.as_millis()).unwrap_or(10_000),
        }
    }
}

/// `[eligibility]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EligibilitySection {
    /// Refuse devices that are not charging.
    pub require_charging: bool,
    /// Refuse devices on a metered network.
    pub require_unmetered: bool,
    /// Refuse devices in use.
    pub require_idle: bool,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Items in the catalogue.
    pub n_items: usize,
    /// Factor dimension.
    pub dim: usize,
    /// User segments.
    pub n_segments: usize,
    /// Standard deviation of the initial item factors.
    pub factor_std: f32,
    /// Initial global mean.
    pub global_mean: f32,
    /// Norm of the initial centroids.
    pub centroid_scale: f32,
    /// Items each round trains (0: every item; absent: the automatic choice,
    /// [`fedrec_shared::model::subset::auto_items_per_round`]).
    pub items_per_round: Option<usize>,
    /// The round's model download: `f32` (absent) or `int8`.
    pub download: Option<String>,
}

/// `[training]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// `explicit` or `implicit`.
    pub objective: String,
    /// Confidence slope of the implicit objective.
    pub implicit_alpha: Option<f32>,
    /// Ridge on the user vector.
    pub l2_user: f32,
    /// Ridge on the user bias.
    pub l2_user_bias: f32,
    /// L2 on item vectors.
    pub l2_item: f32,
    /// L2 on item biases.
    pub l2_item_bias: f32,
    /// How the user ridge grows with the user's support (absent: 0).
    #[serde(default)]
    pub user_support_exponent: f32,
    /// `adam` or `sgd`.
    pub optimizer: String,
    /// The server optimizer's learning rate.
    pub server_lr: f32,
    /// SGD momentum.
    pub momentum: Option<f32>,
}

/// `[rounds]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsSection {
    /// `poisson` or `first_come`.
    pub selection: String,
    /// Poisson sampling probability.
    pub q: Option<f64>,
    /// Expected devices checking in per round (public; required with Poisson and noise).
    pub population: Option<usize>,
    /// First-come cohort size.
    pub cohort: Option<usize>,
    /// Fewest reports for a commit.
    pub min_reports: usize,
    /// Check-in window.
    pub checkin_window_ms: u64,
    /// Report window.
    pub report_window_ms: u64,
    /// Pause between rounds.
    pub round_gap_ms: u64,
}

/// `[privacy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// L2 bound on each update (the starting bound under adaptive clipping).
    pub clip_norm: f32,
    /// Fixed or adaptive clipping.
    #[serde(default)]
    pub clip: ClipMode,
    /// Adaptive clipping: the fraction of updates to leave unclipped, in `(0, 1)`.
    pub target_quantile: Option<f32>,
    /// Adaptive clipping: the step of the geometric update of the bound.
    pub clip_learning_rate: Option<f32>,
    /// Adaptive clipping: the noise standard deviation on the sum of the clip bits.
    pub clip_count_noise: Option<f32>,
    /// Noise as a multiple of the clip norm.
    pub noise_multiplier: f32,
    /// `rdp` or `pld`.
    pub accountant: String,
    /// The budget's ε (no default).
    pub epsilon: Option<f64>,
    /// The budget's δ (no default).
    pub delta: Option<f64>,
    /// `secure` or `plain` (files written before secure aggregation existed have none: plain).
    #[serde(default)]
    pub aggregation: AggregationMode,
    /// Secure aggregation: the expected dropout fraction (default 0.33).
    pub secagg_dropout: Option<f64>,
    /// Secure aggregation: the fraction of devices that may collude (default 0.05).
    pub secagg_colluding: Option<f64>,
    /// Secure aggregation: each later phase's window (default 30,000 ms).
    pub secagg_phase_window_ms: Option<u64>,
    /// `central` or `distributed` (files written before distributed noise existed have none:
    /// central).
    #[serde(default)]
    pub mechanism: MechanismMode,
    /// Distributed noise: bits per coordinate of the ring (required with it, refused without).
    pub bits: Option<u32>,
}

/// `[privacy] mechanism`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MechanismMode {
    /// The coordinator noises the (unmasked) sum.
    #[default]
    Central,
    /// Each device adds its share of the noise before masking (`docs/ddp.md`).
    Distributed,
}

/// `[privacy] aggregation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationMode {
    /// The coordinator sees every clipped update (research only).
    #[default]
    Plain,
    /// SecAgg+: the coordinator learns only the sum.
    Secure,
}

/// `[privacy] clip`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipMode {
    /// Every round clips at `clip_norm`.
    #[default]
    Fixed,
    /// The bound tracks a quantile of the update norms.
    Adaptive,
}

impl FileConfig {
    /// The distributed-noise parameters the round machine will derive, checked now so that an
    /// impossible `bits` (too few for the calibrated cohort and noise) names its key.
    fn check_distributed(&self, config: &CoordinatorConfig) -> Result<(), ConfigError> {
        let Some(dn) = config.secure.and_then(|sa| sa.distributed) else { return Ok(()) };
        let privacy = TaskPrivacy::from_config(config, config.clip_norm);
        distributed_params(&privacy, config.clip_norm, self.shape().layout().len(), dn.bits, [0; 32])
            .and_then(|p| p.validate())
            .map(|_| ())
            .map_err(|e| invalid("privacy.bits", format!("no valid distributed noise: {e}")))
    }

    /// Reads and parses `path`; the values are checked by [`FileConfig::coordinator_config`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    /// Parses the text of a configuration file.
    pub fn parse(text: &str) -> Result<Self, Box<toml::de::Error>> {
        toml::from_str(text).map_err(Box::new)
    }

    /// The model shape.
    pub fn shape(&self) -> ModelShape {
        ModelShape { n_items: self.model.n_items, dim: self.model.dim, n_segments: self.model.n_segments }
    }

    /// Items each round trains (0: every item), checked against the catalogue; absent, the
    /// automatic choice for the catalogue's size
    /// ([`fedrec_shared::model::subset::auto_items_per_round`]).
    pub fn items_per_round(&self) -> Result<usize, ConfigError> {
        let Some(k) = self.model.items_per_round else {
            return Ok(fedrec_shared::model::subset::auto_items_per_round(
                self.model.n_items,
                self.model.dim,
            ));
        };
        if k > self.model.n_items {
            return Err(invalid(
                "model.items_per_round",
                format!(
                    "{k} is more than the catalogue's n_items = {} (0 trains every item)",
                    self.model.n_items
                ),
            ));
        }
        Ok(if k == self.model.n_items { 0 } else { k })
    }

    /// The round's model download.
    pub fn download(&self) -> Result<fedrec_shared::model::compact::DownloadEncoding, ConfigError> {
        use fedrec_shared::model::compact::DownloadEncoding;
        match self.model.download.as_deref() {
            None | Some("f32") => Ok(DownloadEncoding::F32),
            Some("int8") => Ok(DownloadEncoding::Int8),
            Some(other) => Err(invalid("model.download", format!("\"{other}\" is not \"f32\" or \"int8\""))),
        }
    }

    /// How a fresh model is initialised.
    pub fn model_init(&self) -> ModelInit {
        ModelInit {
            factor_std: self.model.factor_std,
            global_mean: self.model.global_mean,
            centroid_scale: self.model.centroid_scale,
        }
    }

    /// The `[limits]`, checked: a connection cap of 0 would refuse every device, and an
    /// upload memory that cannot hold one upload of the model would refuse every report.
    pub fn limits(&self) -> Result<&LimitsSection, ConfigError> {
        let l = &self.limits;
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if !(1_000..=600_000).contains(&l.read_timeout_ms) {
            return Err(invalid(
                "limits.read_timeout_ms",
                format!("must be from 1000 to 600000, got {}", l.read_timeout_ms),
            ));
        }
        // The largest request: a plain upload, or a masked input of 8-byte words.
        let needed = fedrec_shared::wire::Limits::for_shape(&self.shape())
            .max_request()
            .saturating_add(UPLOAD_RECEIVE_WINDOW as usize);
        if l.max_upload_memory() < needed {
            return Err(invalid(
                "limits.max_upload_memory_mb",
                format!(
                    "{} MiB cannot hold one upload of this model: it needs {needed} bytes ({} MiB)",
                    l.max_upload_memory_mb,
                    needed.div_ceil(1 << 20)
                ),
            ));
        }
        Ok(l)
    }

    /// The eligibility policy.
    pub fn eligibility(&self) -> EligibilityPolicy {
        let e = &self.eligibility;
        EligibilityPolicy {
            require_charging: e.require_charging,
            require_unmetered: e.require_unmetered,
            require_idle: e.require_idle,
        }
    }

    /// The pause between rounds.
    pub fn round_gap(&self) -> Duration {
        Duration::from_millis(self.rounds.round_gap_ms)
    }

    /// The accountant named in the file.
    pub fn accountant(&self) -> Result<AccountantKind, ConfigError> {
        match self.privacy.accountant.as_str() {
            "rdp" => Ok(AccountantKind::Rdp),
            "pld" => Ok(AccountantKind::Pld),
            other => {
                Err(invalid("privacy.accountant", format!("expected \"rdp\" or \"pld\", got {other:?}")))
            }
        }
    }

    /// The privacy policy, if the file sets a budget. Both `epsilon` and `delta` or neither.
    pub fn privacy_policy(&self) -> Result<Option<PrivacyPolicy>, ConfigError> {
        let p = &self.privacy;
        match (p.epsilon, p.delta) {
            (None, None) => Ok(None),
            (Some(epsilon), Some(delta)) => {
                let budget = PrivacyBudget::new(epsilon, delta)
                    .map_err(|e| invalid("privacy.epsilon/delta", e.to_string()))?;
                Ok(Some(PrivacyPolicy { budget, accountant: self.accountant()? }))
            }
            _ => Err(invalid("privacy.epsilon/delta", "set both epsilon and delta, or neither")),
        }
    }

    /// Refuses round settings with which no round could commit, or that would open rounds
    /// in a busy loop: `min_reports` of 0, above the first-come `cohort`, or above the most
    /// uploads the coordinator accepts in a round; windows under [`MIN_WINDOW_MS`]; any
    /// duration over [`MAX_DURATION_MS`].
    ///
    /// With Poisson selection the number of devices per round is `q` times the devices that
    /// check in, which the file does not know: a `min_reports` above it is not caught here.
    fn check_rounds(&self, selection: &Selection) -> Result<(), ConfigError> {
        let r = &self.rounds;
        if r.min_reports == 0 {
            return Err(invalid(
                "rounds.min_reports",
                "must be at least 1: a round without reports has nothing to commit",
            ));
        }
        if let Selection::FirstCome { cohort } = *selection
            && r.min_reports > cohort
        {
            return Err(invalid(
                "rounds.min_reports",
                format!(
                    "min_reports = {} > cohort = {cohort}: first_come selects at most `cohort` devices \
                     per round, so every round would be abandoned; lower min_reports or raise cohort",
                    r.min_reports
                ),
            ));
        }
        let max_uploads = ReplayLimits::default().max_nonces_per_round;
        if r.min_reports > max_uploads {
            return Err(invalid(
                "rounds.min_reports",
                format!(
                    "min_reports = {} is more than the {max_uploads} uploads the coordinator accepts \
                     in one round, so every round would be abandoned",
                    r.min_reports
                ),
            ));
        }
        let window = |key: &'static str, ms: u64| {
            if (MIN_WINDOW_MS..=MAX_DURATION_MS).contains(&ms) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!(
                        "{ms} ms is outside {MIN_WINDOW_MS}..={MAX_DURATION_MS} (1 s to 1 day, in \
                         milliseconds): a shorter window abandons round after round"
                    ),
                ))
            }
        };
        window("rounds.checkin_window_ms", r.checkin_window_ms)?;
        window("rounds.report_window_ms", r.report_window_ms)?;
        if r.round_gap_ms > MAX_DURATION_MS {
            return Err(invalid(
                "rounds.round_gap_ms",
                format!("{} ms is more than {MAX_DURATION_MS} (1 day, in milliseconds)", r.round_gap_ms),
            ));
        }
        Ok(())
    }

    /// Secure aggregation's settings with `aggregation = "secure"`; none may be set otherwise.
    fn secure_aggregation(&self) -> Result<Option<SecureAggregation>, ConfigError> {
        let p = &self.privacy;
        let set =
            [p.secagg_dropout.is_some(), p.secagg_colluding.is_some(), p.secagg_phase_window_ms.is_some()];
        match p.aggregation {
            AggregationMode::Plain if set.iter().any(|&s| s) => Err(invalid(
                "privacy.aggregation",
                "secagg_dropout, secagg_colluding and secagg_phase_window_ms are for aggregation = \"secure\"",
            )),
            AggregationMode::Plain => Ok(None),
            AggregationMode::Secure => {
                let fraction = |name: &'static str, v: f64| {
                    if (0.0..0.9).contains(&v) {
                        Ok(v)
                    } else {
                        Err(invalid(name, format!("must be in [0, 0.9), got {v}")))
                    }
                };
                let dropout = fraction("privacy.secagg_dropout", p.secagg_dropout.unwrap_or(0.33))?;
                let corrupt = fraction("privacy.secagg_colluding", p.secagg_colluding.unwrap_or(0.05))?;
                if dropout + corrupt >= 0.9 {
                    return Err(invalid(
                        "privacy.secagg_dropout",
                        "secagg_dropout + secagg_colluding must stay below 0.9",
                    ));
                }
                let window = p.secagg_phase_window_ms.unwrap_or(30_000);
                if !(MIN_WINDOW_MS..=MAX_DURATION_MS).contains(&window) {
                    return Err(invalid(
                        "privacy.secagg_phase_window_ms",
                        format!("must be from {MIN_WINDOW_MS} to {MAX_DURATION_MS}, got {window}"),
                    ));
                }
                Ok(Some(SecureAggregation {
                    dropout,
                    corrupt,
                    phase_window: Duration::from_millis(window),
                    distributed: self.distributed_noise()?,
                }))
            }
        }
    }

    /// Distributed noise's settings with `mechanism = "distributed"` (which needs secure
    /// aggregation, noise and fixed clipping); `bits` only then.
    fn distributed_noise(&self) -> Result<Option<DistributedNoise>, ConfigError> {
        let p = &self.privacy;
        match (p.mechanism, p.bits) {
            (MechanismMode::Central, None) => Ok(None),
            (MechanismMode::Central, Some(_)) => {
                Err(invalid("privacy.bits", "bits is for mechanism = \"distributed\""))
            }
            (MechanismMode::Distributed, None) => Err(invalid(
                "privacy.bits",
                "mechanism = \"distributed\" needs bits (the ring width; 16 is a good start)",
            )),
            (MechanismMode::Distributed, Some(bits)) => {
                if p.aggregation != AggregationMode::Secure {
                    return Err(invalid(
                        "privacy.mechanism",
                        "mechanism = \"distributed\" needs aggregation = \"secure\" (the devices' noise shares \
                         are only hidden in a masked sum)",
                    ));
                }
                if p.noise_multiplier.is_nan() || p.noise_multiplier <= 0.0 {
                    return Err(invalid(
                        "privacy.noise_multiplier",
                        "mechanism = \"distributed\" needs noise_multiplier > 0 (the target noise on the sum)",
                    ));
                }
                if p.clip == ClipMode::Adaptive {
                    return Err(invalid(
                        "privacy.clip",
                        "mechanism = \"distributed\" needs clip = \"fixed\": adaptive clipping's bit would be \
                         released without the devices' noise",
                    ));
                }
                if !(DistributedNoise::MIN_BITS..=DistributedNoise::MAX_BITS).contains(&bits) {
                    return Err(invalid(
                        "privacy.bits",
                        format!(
                            "must be from {} to {}, got {bits}",
                            DistributedNoise::MIN_BITS,
                            DistributedNoise::MAX_BITS
                        ),
                    ));
                }
                Ok(Some(DistributedNoise { bits }))
            }
        }
    }

    /// The adaptive clipping settings: all three with `clip = "adaptive"`, none otherwise.
    fn adaptive_clip(&self) -> Result<Option<AdaptiveClip>, ConfigError> {
        let p = &self.privacy;
        let set = [p.target_quantile.is_some(), p.clip_learning_rate.is_some(), p.clip_count_noise.is_some()];
        match p.clip {
            ClipMode::Fixed if set.iter().any(|&s| s) => Err(invalid(
                "privacy.clip",
                "target_quantile, clip_learning_rate and clip_count_noise are for clip = \"adaptive\"",
            )),
            ClipMode::Fixed => Ok(None),
            ClipMode::Adaptive => match (p.target_quantile, p.clip_learning_rate, p.clip_count_noise) {
                (Some(target_quantile), Some(learning_rate), Some(count_noise_multiplier)) => {
                    Ok(Some(AdaptiveClip { target_quantile, learning_rate, count_noise_multiplier }))
                }
                _ => Err(invalid(
                    "privacy.clip",
                    "clip = \"adaptive\" needs target_quantile, clip_learning_rate and clip_count_noise",
                )),
            },
        }
    }

    /// The round machine's configuration. Refuses noise without a budget, and round settings
    /// with which no round could commit (see the bounds on [`MIN_WINDOW_MS`]).
    pub fn coordinator_config(&self) -> Result<CoordinatorConfig, ConfigError> {
        let t = &self.training;
        let objective = match (t.objective.as_str(), t.implicit_alpha) {
            ("explicit", None) => Objective::Explicit,
            ("implicit", Some(alpha)) => Objective::Implicit { alpha },
            ("explicit", Some(_)) => {
                return Err(invalid("training.implicit_alpha", "only the implicit objective has an alpha"));
            }
            ("implicit", None) => {
                return Err(invalid(
                    "training.implicit_alpha",
                    "the implicit objective needs implicit_alpha",
                ));
            }
            (other, _) => {
                return Err(invalid(
                    "training.objective",
                    format!("expected \"explicit\" or \"implicit\", got {other:?}"),
                ));
            }
        };
        let optimizer = match (t.optimizer.as_str(), t.momentum) {
            ("adam", None) => ServerOptimizer::adam(t.server_lr),
            ("sgd", momentum) => ServerOptimizer::Sgd { lr: t.server_lr, momentum: momentum.unwrap_or(0.0) },
            ("adam", Some(_)) => return Err(invalid("training.momentum", "only sgd has a momentum")),
            (other, _) => {
                return Err(invalid(
                    "training.optimizer",
                    format!("expected \"adam\" or \"sgd\", got {other:?}"),
                ));
            }
        };
        let r = &self.rounds;
        if self.privacy.noise_multiplier > 0.0 && r.selection == "poisson" && r.population.is_none() {
            return Err(invalid(
                "rounds.population",
                "poisson selection with noise needs population: the expected number of devices that \
                 check in per round (a public number; the noised sum is divided by q x population)",
            ));
        }
        let selection = match (r.selection.as_str(), r.q, r.cohort) {
            ("poisson", Some(q), None) => Selection::Poisson { q },
            ("first_come", None, Some(cohort)) => Selection::FirstCome { cohort },
            ("poisson", _, _) => {
                return Err(invalid("rounds.q", "poisson selection needs q (and no cohort)"));
            }
            ("first_come", _, _) => {
                return Err(invalid("rounds.cohort", "first_come selection needs cohort (and no q)"));
            }
            (other, _, _) => {
                return Err(invalid(
                    "rounds.selection",
                    format!("expected \"poisson\" or \"first_come\", got {other:?}"),
                ));
            }
        };
        self.check_rounds(&selection)?;
        // Checked even without a budget, so that a typo is caught before it matters.
        self.accountant()?;
        // Checked here too for plain aggregation, which never asks for it.
        self.distributed_noise()?;
        let privacy = self.privacy_policy()?;
        if self.privacy.noise_multiplier > 0.0 && privacy.is_none() {
            return Err(invalid(
                "privacy.epsilon/delta",
                "noise_multiplier > 0 needs a privacy budget: set epsilon and delta (there is no default)",
            ));
        }
        if !(0.0..=2.0).contains(&t.user_support_exponent) {
            return Err(invalid(
                "training.user_support_exponent",
                format!("must be in [0, 2], got {}", t.user_support_exponent),
            ));
        }
        let config = CoordinatorConfig {
            train: TrainParams {
                objective,
                l2_user: t.l2_user,
                l2_user_bias: t.l2_user_bias,
                l2_item: t.l2_item,
                l2_item_bias: t.l2_item_bias,
                user_support_exponent: t.user_support_exponent,
            },
            optimizer,
            selection,
            min_reports: r.min_reports,
            // First-come rounds divide by their reports: the population plays no part.
            population: if matches!(selection, Selection::Poisson { .. }) { r.population } else { None },
            checkin_window: Duration::from_millis(r.checkin_window_ms),
            report_window: Duration::from_millis(r.report_window_ms),
            clip_norm: self.privacy.clip_norm,
            adaptive_clip: self.adaptive_clip()?,
            noise_multiplier: self.privacy.noise_multiplier,
            centroids: CentroidPolicy::with_min_count(1.0),
            privacy,
            secure: self.secure_aggregation()?,
        };
        if self.privacy.mechanism == MechanismMode::Distributed {
            self.check_distributed(&config)?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_parses_but_needs_a_budget_before_it_serves() {
        let cfg = FileConfig::parse(TEMPLATE).expect("the template parses");
        assert_eq!(cfg.listen, SocketAddr::from(([127, 0, 0, 1], 4433)));
        assert_eq!(cfg.metrics_listen, Some(SocketAddr::from(([127, 0, 0, 1], 9464))));
        let err = cfg.coordinator_config().expect_err("noise without a budget is refused");
        assert!(err.to_string().contains("privacy budget"), "{err}");
        let with_budget =
            TEMPLATE.replace("# epsilon = 8.0", "epsilon = 8.0").replace("# delta = 1e-6", "delta = 1e-6");
        let cfg = FileConfig::parse(&with_budget).expect("parses");
        let coordinator = cfg.coordinator_config().expect("valid with a budget");
        assert!(coordinator.privacy.is_some());
    }

    #[test]
    fn limits_and_eligibility_have_safe_defaults_and_are_read() {
        let cfg = FileConfig::parse(TEMPLATE).expect("the template parses");
        let limits = cfg.limits().expect("valid limits");
        assert_eq!(limits.rounds_per_device_per_day, DEFAULT_ROUNDS_PER_DEVICE_PER_DAY);
        assert_eq!(limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(limits.max_invalid_requests, DEFAULT_MAX_INVALID_REQUESTS);
        assert_eq!(cfg.eligibility(), EligibilityPolicy::default());
        // A file from before the sections existed gets the same defaults.
        let cut = TEMPLATE.find("[limits]").expect("the template has [limits]");
        let old = FileConfig::parse(&TEMPLATE[..cut]).expect("parses without the sections");
        assert_eq!(old.limits().expect("valid").max_connections, DEFAULT_MAX_CONNECTIONS);
        let text = TEMPLATE
            .replace("require_charging = false", "require_charging = true")
            .replace("require_idle = false", "require_idle = true")
            .replace("rounds_per_device_per_day = 24", "rounds_per_device_per_day = 2");
        let cfg = FileConfig::parse(&text).expect("parses");
        assert_eq!(cfg.limits().expect("valid").rounds_per_device_per_day, 2);
        let policy = cfg.eligibility();
        assert!(policy.require_charging && policy.require_idle && !policy.require_unmetered);
        let zero = FileConfig::parse(&TEMPLATE.replace("max_connections = 10000", "max_connections = 0"))
            .expect("parses");
        assert!(zero.limits().is_err(), "a cap of zero connections is refused");
        assert_eq!(limits.max_connections_per_source, DEFAULT_MAX_CONNECTIONS_PER_SOURCE);
        assert_eq!(limits.max_upload_memory(), DEFAULT_MAX_UPLOAD_MEMORY);
        assert_eq!(old.limits().expect("valid").max_upload_memory(), DEFAULT_MAX_UPLOAD_MEMORY);
        assert_eq!(limits.read_timeout_ms, 10_000);
        assert_eq!(old.limits().expect("valid").read_timeout_ms, 10_000);
        for bad in ["read_timeout_ms = 999", "read_timeout_ms = 600001"] {
            let cfg = FileConfig::parse(&TEMPLATE.replace("read_timeout_ms = 10000", bad)).expect("parses");
            let err = cfg.limits().expect_err("out of range").to_string();
            assert!(err.contains("limits.read_timeout_ms"), "{err}");
        }
    }

    #[test]
    fn upload_memory_must_hold_one_upload_of_the_model() {
        // 100,000 items x 32: one upload is about 13 MB, a masked input of 8-byte words (the
        // largest request) about 26 MB.
        let big = [("n_items = 1000", "n_items = 100000"), ("dim = 16", "dim = 32")];
        let mut edits = big.to_vec();
        edits.push(("max_upload_memory_mb = 256", "max_upload_memory_mb = 26"));
        let err = template_with(&edits).limits().expect_err("too small").to_string();
        assert!(err.contains("limits.max_upload_memory_mb") && err.contains("27 MiB"), "{err}");
        edits.pop();
        edits.push(("max_upload_memory_mb = 256", "max_upload_memory_mb = 27"));
        assert_eq!(template_with(&edits).limits().expect("valid").max_upload_memory(), 27 << 20);
        let cfg = template_with(&[("max_connections_per_source = 64", "max_connections_per_source = 0")]);
        assert_eq!(cfg.limits().expect("0 is no limit").max_connections_per_source, 0);
    }

    /// The template with a budget and central noise (most tests here are about other keys;
    /// [`the_template_as_written_uses_distributed_noise`] checks the template's own choice),
    /// then `(from, to)` replacements (each `from` must be there).
    fn template_with(edits: &[(&str, &str)]) -> FileConfig {
        let mut text = TEMPLATE
            .replace("# epsilon = 8.0", "epsilon = 8.0")
            .replace("# delta = 1e-6", "delta = 1e-6")
            .replace("mechanism = \"distributed\"", "mechanism = \"central\"")
            .replace("\nbits = 16\n", "\n# bits = 16\n");
        for (from, to) in edits {
            assert!(text.contains(from), "the template has {from:?}");
            text = text.replacen(from, to, 1);
        }
        FileConfig::parse(&text).expect("parses")
    }

    fn refusal(cfg: &FileConfig) -> String {
        cfg.coordinator_config().expect_err("refused").to_string()
    }

    const FIRST_COME: [(&str, &str); 3] = [
        ("selection = \"poisson\"", "selection = \"first_come\""),
        ("q = 0.5", "cohort = 10"),
        ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
    ];

    #[test]
    fn the_template_trains_the_implicit_objective_sdk_devices_hold() {
        let coordinator = template_with(&[]).coordinator_config().expect("valid with a budget");
        assert_eq!(coordinator.train.objective, Objective::Implicit { alpha: 1.0 });
        assert_eq!(template_with(&[]).model_init().global_mean, 0.0);
        assert_eq!(coordinator.selection, Selection::Poisson { q: 0.5 });
        assert!(coordinator.min_reports >= 1);
        // Its comments speak of the README's quantities.
        for words in ["q x (devices checking in", "cohort", "min_reports", "1 s to 1 day", "SDK"] {
            assert!(TEMPLATE.contains(words), "the template explains {words:?}");
        }
    }

    #[test]
    fn min_reports_above_a_first_come_cohort_or_zero_is_refused_naming_the_keys() {
        let mut edits = FIRST_COME.to_vec();
        edits.push(("min_reports = 10", "min_reports = 11"));
        let err = refusal(&template_with(&edits));
        assert!(
            err.contains("rounds.min_reports") && err.contains("min_reports = 11 > cohort = 10"),
            "{err}"
        );
        // Equal is fine: a round where every selected device reports commits.
        edits.pop();
        template_with(&edits).coordinator_config().expect("min_reports = cohort is valid");
        let err = refusal(&template_with(&[("min_reports = 10", "min_reports = 0")]));
        assert!(err.contains("rounds.min_reports") && err.contains("at least 1"), "{err}");
        let err = refusal(&template_with(&[("min_reports = 10", "min_reports = 100001")]));
        assert!(err.contains("rounds.min_reports") && err.contains("100000 uploads"), "{err}");
    }

    #[test]
    fn windows_under_a_second_and_durations_over_a_day_are_refused() {
        for (key, from, bad) in [
            ("rounds.checkin_window_ms", "checkin_window_ms = 30000", "checkin_window_ms = 0"),
            ("rounds.checkin_window_ms", "checkin_window_ms = 30000", "checkin_window_ms = 999"),
            ("rounds.report_window_ms", "report_window_ms = 120000", "report_window_ms = 0"),
            ("rounds.report_window_ms", "report_window_ms = 120000", "report_window_ms = 86400001"),
            ("rounds.round_gap_ms", "round_gap_ms = 1000", "round_gap_ms = 9223372036854775807"),
        ] {
            let err = refusal(&template_with(&[(from, bad)]));
            assert!(err.contains(key), "{bad}: {err}");
        }
        let edges = [
            ("checkin_window_ms = 30000", "checkin_window_ms = 1000"),
            ("report_window_ms = 120000", "report_window_ms = 86400000"),
            ("round_gap_ms = 1000", "round_gap_ms = 0"),
        ];
        let cfg = template_with(&edges).coordinator_config().expect("the bounds themselves are valid");
        assert_eq!(cfg.checkin_window, Duration::from_secs(1));
    }

    #[test]
    fn every_setting_line_of_the_template_occurs_once_so_that_tools_can_edit_it() {
        // Scripts and tests edit the template by replacing `key = value`; a comment quoting a
        // setting would be edited instead.
        for line in TEMPLATE.lines().filter(|l| !l.starts_with('#') && l.contains(" = ")) {
            let setting = line.split(" #").next().unwrap_or(line).trim_end();
            assert_eq!(TEMPLATE.matches(setting).count(), 1, "{setting:?} occurs once");
        }
    }

    /// Issue 10 (5): operators could not deploy adaptive clipping (the file turned it off).
    #[test]
    fn adaptive_clipping_is_configured_from_the_file() {
        assert_eq!(template_with(&[]).coordinator_config().expect("valid").adaptive_clip, None);
        let adaptive = [
            ("clip = \"fixed\"", "clip = \"adaptive\""),
            ("# target_quantile = 0.5", "target_quantile = 0.5"),
            ("# clip_learning_rate = 0.2", "clip_learning_rate = 0.2"),
            ("# clip_count_noise = 10.0", "clip_count_noise = 10.0"),
        ];
        let cfg = template_with(&adaptive).coordinator_config().expect("valid");
        assert_eq!(
            cfg.adaptive_clip,
            Some(AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 10.0 })
        );
        // Half the settings, or settings without the mode, are refused naming the key.
        let err = refusal(&template_with(&adaptive[..2]));
        assert!(err.contains("privacy.clip") && err.contains("clip_count_noise"), "{err}");
        let err = refusal(&template_with(&adaptive[1..]));
        assert!(err.contains("privacy.clip"), "{err}");
    }

    /// Issue 10 (1): the denominator is q x population, so Poisson with noise needs it.
    #[test]
    fn poisson_with_noise_needs_the_population() {
        let cfg = template_with(&[]).coordinator_config().expect("valid");
        assert_eq!(cfg.population, Some(100));
        let err = refusal(&template_with(&[("population = 100", "")]));
        assert!(err.contains("rounds.population"), "{err}");
        // Without noise it may be left out, and first-come ignores it.
        let text = TEMPLATE
            .replace("population = 100", "")
            .replace("noise_multiplier = 1.0", "noise_multiplier = 0.0")
            .replace("mechanism = \"distributed\"", "mechanism = \"central\"")
            .replace("\nbits = 16\n", "\n# bits = 16\n");
        let cfg =
            FileConfig::parse(&text).expect("parses").coordinator_config().expect("valid without noise");
        assert_eq!(cfg.population, None);
        let cfg = template_with(&FIRST_COME).coordinator_config().expect("valid");
        assert_eq!(cfg.population, None);
    }

    const DISTRIBUTED: [(&str, &str); 2] =
        [("mechanism = \"central\"", "mechanism = \"distributed\""), ("# bits = 16", "bits = 16")];

    #[test]
    fn the_user_support_exponent_is_read_and_checked_naming_the_key() {
        let cfg = template_with(&[]);
        assert_eq!(cfg.coordinator_config().expect("valid").train.user_support_exponent, 0.0);
        let cfg = template_with(&[("user_support_exponent = 0.0", "user_support_exponent = 0.5")]);
        assert_eq!(cfg.coordinator_config().expect("valid").train.user_support_exponent, 0.5);
        for bad in ["-0.5", "2.5", "nan"] {
            let cfg =
                template_with(&[("user_support_exponent = 0.0", &format!("user_support_exponent = {bad}"))]);
            let err = cfg.coordinator_config().expect_err("out of range");
            assert!(err.to_string().contains("training.user_support_exponent"), "{err}");
        }
        // A file from before the key: 0.
        let cfg = template_with(&[("user_support_exponent = 0.0\n", "")]);
        assert_eq!(cfg.coordinator_config().expect("valid").train.user_support_exponent, 0.0);
    }

    #[test]
    fn item_subsets_and_the_download_are_configured_and_checked_naming_the_keys() {
        use fedrec_shared::model::compact::DownloadEncoding;
        let cfg = template_with(&[]);
        assert_eq!(
            (cfg.items_per_round().expect("valid"), cfg.download().expect("valid")),
            (0, DownloadEncoding::F32)
        );
        // Left out, as in the template: every item while a dense upload fits in 8 MB (1000
        // items), a subset of 4096 above (100,000 items × 32: 13.2 MB); 0 always every item.
        let large = template_with(&[("n_items = 1000", "n_items = 100000"), ("dim = 16", "dim = 32")]);
        assert_eq!(large.items_per_round().expect("valid"), 4096);
        let dense = template_with(&[
            ("n_items = 1000", "n_items = 100000"),
            ("dim = 16", "dim = 32"),
            ("# items_per_round = 4096", "items_per_round = 0"),
        ]);
        assert_eq!(dense.items_per_round().expect("valid"), 0);
        let cfg = template_with(&[
            ("# items_per_round = 4096", "items_per_round = 64"),
            ("download = \"f32\"", "download = \"int8\""),
        ]);
        assert_eq!(
            (cfg.items_per_round().expect("valid"), cfg.download().expect("valid")),
            (64, DownloadEncoding::Int8)
        );
        let err = template_with(&[("# items_per_round = 4096", "items_per_round = 1001")])
            .items_per_round()
            .expect_err("too many");
        assert!(err.to_string().contains("model.items_per_round"), "{err}");
        let err =
            template_with(&[("download = \"f32\"", "download = \"f16\"")]).download().expect_err("unknown");
        assert!(err.to_string().contains("model.download") && err.to_string().contains("f16"), "{err}");
    }

    #[test]
    fn the_template_as_written_uses_distributed_noise() {
        let text =
            TEMPLATE.replace("# epsilon = 8.0", "epsilon = 8.0").replace("# delta = 1e-6", "delta = 1e-6");
        let cfg =
            FileConfig::parse(&text).expect("parses").coordinator_config().expect("valid with a budget");
        assert_eq!(cfg.secure.and_then(|s| s.distributed), Some(DistributedNoise { bits: 16 }));
        assert!(cfg.noise_multiplier > 0.0);
    }

    #[test]
    fn distributed_noise_is_configured_and_checked_naming_the_keys() {
        assert_eq!(
            template_with(&[]).coordinator_config().expect("valid").secure.and_then(|s| s.distributed),
            None
        );
        let cfg = template_with(&DISTRIBUTED).coordinator_config().expect("valid");
        assert_eq!(cfg.secure.and_then(|s| s.distributed), Some(DistributedNoise { bits: 16 }));
        let mut no_bits = DISTRIBUTED.to_vec();
        no_bits.pop();
        let err = refusal(&template_with(&no_bits));
        assert!(err.contains("privacy.bits") && err.contains("needs bits"), "{err}");
        let err = refusal(&template_with(&[("# bits = 16", "bits = 16")]));
        assert!(err.contains("privacy.bits") && err.contains("distributed"), "{err}");
        let mut plain = DISTRIBUTED.to_vec();
        plain.push(("aggregation = \"secure\"", "aggregation = \"plain\""));
        plain.push(("secagg_dropout = 0.33\n", ""));
        plain.push(("secagg_colluding = 0.05\n", ""));
        plain.push(("secagg_phase_window_ms = 30000\n", ""));
        let err = refusal(&template_with(&plain));
        assert!(err.contains("privacy.mechanism") && err.contains("secure"), "{err}");
        let mut wide = DISTRIBUTED.to_vec();
        wide[1] = ("# bits = 16", "bits = 33");
        let err = refusal(&template_with(&wide));
        assert!(err.contains("privacy.bits") && err.contains("8 to 32"), "{err}");
        // 8 bits cannot hold the calibrated cohort of the template's q and population.
        wide[1] = ("# bits = 16", "bits = 8");
        let err = refusal(&template_with(&wide));
        assert!(err.contains("privacy.bits") && err.contains("no valid distributed noise"), "{err}");
        let mut adaptive = DISTRIBUTED.to_vec();
        adaptive.extend([
            ("clip = \"fixed\"", "clip = \"adaptive\""),
            ("# target_quantile = 0.5", "target_quantile = 0.5"),
            ("# clip_learning_rate = 0.2", "clip_learning_rate = 0.2"),
            ("# clip_count_noise = 10.0", "clip_count_noise = 10.0"),
        ]);
        let err = refusal(&template_with(&adaptive));
        assert!(err.contains("privacy.clip") && err.contains("fixed"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!("{TEMPLATE}\nlisten_port = 1\n");
        assert!(FileConfig::parse(&text).is_err());
    }
}
