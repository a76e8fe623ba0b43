//! The messages of protocol v3 as plain serializable data; see the parent module for their byte layout.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::WireError;
use super::rules::{FetchRules, RulesAnswer};

/// Longest enrollment token a check-in may carry, in bytes.
pub const MAX_TOKEN_LEN: usize = 512;
/// Longest SDK version string a check-in may carry, in bytes.
pub const MAX_SDK_VERSION_LEN: usize = 64;
/// Longest message an error response may carry, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 256;
/// Length of an upload's nonce, in bytes.
pub const NONCE_LEN: usize = 16;
/// Length of an X25519 public key, in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of a secure round's public seed, in bytes.
pub const SEED_LEN: usize = 32;
/// Length of one sealed share pair on the wire ([`crate::round::secure::SEALED_PAIR_BYTES`]).
pub const SEALED_PAIR_LEN: usize = crate::round::secure::SEALED_PAIR_BYTES;
/// Length of one revealed Shamir share on the wire ([`crate::secagg::shamir::SHARE_BYTES`]).
pub const SHARE_LEN: usize = crate::secagg::shamir::SHARE_BYTES;
/// Most neighbours a device may have in a secure round, and so the longest list of keys,
/// sealed pairs or indices any secure message carries (an unmask answer carries one more
/// share: the device's own).
///
/// The parameter finder gives `k ≤ ~100` for cohorts up to 10⁵ at 33% dropout and 5%
/// colluders (`docs/secagg.md` §6); below a few hundred devices it picks the complete graph,
/// where `k = n − 1`. 1,024 therefore admits every SecAgg+ graph the finder draws and caps a
/// complete-graph cohort at 1,025 devices.
pub const MAX_NEIGHBOURS: usize = 1024;

/// A device offers to take part in the next round.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckIn {
    /// The enrollment token the coordinator issued to this device (≤ [`MAX_TOKEN_LEN`] bytes).
    #[serde(with = "byte_string")]
    pub token: Vec<u8>,
    /// The SDK's version, for the coordinator's logs and compatibility decisions (≤ [`MAX_SDK_VERSION_LEN`] bytes).
    pub sdk_version: String,
    /// The device's state and optional features, as bit flags: the eligibility bits
    /// [`CheckIn::CHARGING`], [`CheckIn::UNMETERED`] and [`CheckIn::IDLE`], as the host app
    /// reports them. The coordinator ignores bits it does not know.
    pub capabilities: u32,
    /// The model version the device holds, if any: a task for that version omits the model.
    pub cached_model_version: Option<u64>,
}

impl CheckIn {
    /// Capability bit: the device is charging.
    pub const CHARGING: u32 = 1;
    /// Capability bit: the device is on an unmetered network (e.g. Wi-Fi).
    pub const UNMETERED: u32 = 2;
    /// Capability bit: the device is idle (the user is not using it).
    pub const IDLE: u32 = 4;
}

/// The token is a credential: `Debug` shows only its length.
impl fmt::Debug for CheckIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckIn")
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("sdk_version", &self.sdk_version)
            .field("capabilities", &self.capabilities)
            .field("cached_model_version", &self.cached_model_version)
            .finish()
    }
}

/// A selected device's clipped update, always dense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    /// The round the update is for.
    pub round: u64,
    /// Every value of the update vector, in the layout's order (zeros included).
    #[serde(with = "f32_array")]
    pub update: Vec<f32>,
    /// Whether the update was within the clip norm before clipping, when the task asked.
    pub within_bound: Option<bool>,
    /// Fresh random bytes per upload, for the coordinator's replay check.
    pub nonce: [u8; NONCE_LEN],
}

/// Secure aggregation, phase 0: a selected device's two public keys for the round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// The round.
    pub round: u64,
    /// X25519 public key that seals shares sent to this device.
    pub cipher_public: [u8; PUBLIC_KEY_LEN],
    /// X25519 public key the pairwise masks are agreed with.
    pub mask_public: [u8; PUBLIC_KEY_LEN],
    /// Fresh random bytes per message, for the coordinator's replay check.
    pub nonce: [u8; NONCE_LEN],
}

/// One sealed share pair relayed between two devices: from a device it names the receiver,
/// to a device the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSealedPair {
    /// The other device's index in the cohort.
    pub peer: u32,
    /// ChaCha20-Poly1305 of the two shares: exactly [`SEALED_PAIR_LEN`] bytes.
    #[serde(with = "byte_string")]
    pub ciphertext: Vec<u8>,
}

/// Secure aggregation, phase 1: a device's share pairs, each sealed for one neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShares {
    /// The round.
    pub round: u64,
    /// One sealed pair per neighbour (at most [`MAX_NEIGHBOURS`]).
    #[serde(with = "bounded_list")]
    pub shares: Vec<WireSealedPair>,
    /// Fresh random bytes per message, for the coordinator's replay check.
    pub nonce: [u8; NONCE_LEN],
}

/// Secure aggregation, phase 2: a device's masked input, as fixed-width little-endian words.
///
/// The words are uniform modulo `2^bits` (varints would not shrink them): each takes the
/// narrowest of 1, 2, 4 and 8 bytes that every word fits — in practice `⌈bits/8⌉` rounded up
/// to a power of two (2 bytes for distributed noise's 16-bit ring, 4 for a 25-bit central
/// ring). The width depends only on the masked words, which are uniform whatever the update,
/// so it reveals nothing about the update. Whether every word is below `2^bits` is the
/// coordinator machine's check (it knows the round's `bits`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// The round.
    pub round: u64,
    /// The masked words: the update's layout, then the clip bit when the task asks.
    #[serde(with = "word_array")]
    pub words: Vec<u64>,
    /// Fresh random bytes per message, for the coordinator's replay check.
    pub nonce: [u8; NONCE_LEN],
}

/// One Shamir share of a device's secret, revealed in the unmask phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRevealedShare {
    /// Whose secret it is a share of (that device's index in the cohort).
    pub owner: u32,
    /// The share: evaluation point and five field elements ([`SHARE_LEN`] bytes, raw).
    #[serde(with = "fixed_bytes")]
    pub share: [u8; SHARE_LEN],
}

/// Secure aggregation, phase 3: the shares the coordinator asked a device for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskShares {
    /// The round.
    pub round: u64,
    /// Shares of the dropped neighbours' mask keys.
    #[serde(with = "bounded_list")]
    pub mask_key_shares: Vec<WireRevealedShare>,
    /// Shares of the surviving neighbours' self-mask seeds, and of the device's own. Both
    /// lists together hold at most [`MAX_NEIGHBOURS`]` + 1` shares.
    #[serde(with = "bounded_list")]
    pub self_mask_shares: Vec<WireRevealedShare>,
    /// Fresh random bytes per message, for the coordinator's replay check.
    pub nonce: [u8; NONCE_LEN],
}

/// A message from a device to the coordinator. The variant order is the wire's variant index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Index 0.
    CheckIn(CheckIn),
    /// Index 1.
    Upload(Upload),
    /// Index 2: ask for the current context ruleset.
    FetchRules(FetchRules),
    /// Index 3: secure aggregation, the device's public keys.
    AdvertiseKeys(AdvertiseKeys),
    /// Index 4: secure aggregation, the device's sealed share pairs.
    EncryptedShares(EncryptedShares),
    /// Index 5: secure aggregation, the device's masked input.
    MaskedInput(MaskedInput),
    /// Index 6: secure aggregation, the shares the coordinator asked for.
    UnmaskShares(UnmaskShares),
}

impl Request {
    /// The round a round message names (`None` for a check-in or a rules request).
    pub fn round(&self) -> Option<u64> {
        match self {
            Request::CheckIn(_) | Request::FetchRules(_) => None,
            Request::Upload(u) => Some(u.round),
            Request::AdvertiseKeys(m) => Some(m.round),
            Request::EncryptedShares(m) => Some(m.round),
            Request::MaskedInput(m) => Some(m.round),
            Request::UnmaskShares(m) => Some(m.round),
        }
    }

    /// The replay nonce of a message that carries no token (an upload or a secure-aggregation
    /// message): such a message is accepted only on a connection whose check-in was verified,
    /// and only once.
    pub fn nonce(&self) -> Option<[u8; NONCE_LEN]> {
        match self {
            Request::CheckIn(_) | Request::FetchRules(_) => None,
            Request::Upload(u) => Some(u.nonce),
            Request::AdvertiseKeys(m) => Some(m.nonce),
            Request::EncryptedShares(m) => Some(m.nonce),
            Request::MaskedInput(m) => Some(m.nonce),
            Request::UnmaskShares(m) => Some(m.nonce),
        }
    }
}

impl From<CheckIn> for Request {
    fn from(c: CheckIn) -> Self {
        Request::CheckIn(c)
    }
}

impl From<Upload> for Request {
    fn from(u: Upload) -> Self {
        Request::Upload(u)
    }
}

/// The training objective, as sent with a task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum WireObjective {
    /// Index 0: squared error on explicit ratings.
    Explicit,
    /// Index 1: weighted implicit feedback (iALS).
    Implicit {
        /// Confidence slope `α`.
        alpha: f32,
    },
}

/// The device's training hyper-parameters, as sent with a task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WireTrainParams {
    /// The loss.
    pub objective: WireObjective,
    /// Ridge on the user vector.
    pub l2_user: f32,
    /// Ridge on the user bias.
    pub l2_user_bias: f32,
    /// L2 on the item vectors.
    pub l2_item: f32,
    /// L2 on the item biases.
    pub l2_item_bias: f32,
    /// How the user ridge grows with the user's support (protocol 3).
    pub user_support_exponent: f32,
}

/// A global model and its version, as downloaded with a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireModel {
    /// The model version (devices cache by it).
    pub version: u64,
    /// Number of items.
    pub n_items: u64,
    /// Embedding dimension.
    pub dim: u64,
    /// Number of segments.
    pub n_segments: u64,
    /// Item embeddings, row-major `n_items × dim`.
    #[serde(with = "f32_array")]
    pub item_factors: Vec<f32>,
    /// Item biases, `n_items` values.
    #[serde(with = "f32_array")]
    pub item_bias: Vec<f32>,
    /// Global mean.
    pub global_mean: f32,
    /// Segment centroids, row-major `n_segments × dim`.
    #[serde(with = "f32_array")]
    pub centroids: Vec<f32>,
}

/// What a selected device is asked to do, with the model unless the device already has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTask {
    /// The round.
    pub round: u64,
    /// The version of the model to train on.
    pub model_version: u64,
    /// Training hyper-parameters.
    pub train: WireTrainParams,
    /// The L2 bound the upload must respect.
    pub clip_norm: f32,
    /// Whether the upload must say if the update was within the bound (adaptive clipping).
    pub report_clip_bit: bool,
    /// Time the device has to upload, from receipt, in milliseconds.
    pub report_window_ms: u64,
    /// The round's privacy parameters, which the device's policy checks before it trains.
    pub privacy: WirePrivacy,
    /// The model, or `None` when the device's cached version is `model_version`.
    pub model: Option<WireModel>,
}

/// A task of a round that trains an item subset or downloads a compact model
/// ([`Response::CompactTask`]): the task, the public subset and the model always with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireCompactTask {
    /// The task; its `model` is `None` (the model is below).
    pub task: WireTask,
    /// The round's item subset, when it trains one: the device redraws it from the seed.
    pub subset: Option<WireSubset>,
    /// The round's model: the subset's rows, or every row.
    pub model: WireCompactModel,
}

/// A round's item subset as public parameters (`fedrec_shared::model::subset`): `K` is the
/// model's row count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireSubset {
    /// The catalogue size `n`.
    pub n_items: u64,
    /// The round's public seed.
    pub seed: [u8; SEED_LEN],
}

/// A round's model with its item factors in a compact form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireCompactModel {
    /// The global model version it was taken from.
    pub version: u64,
    /// Rows (items of the subset, or of the catalogue).
    pub n_rows: u64,
    /// Embedding dimension.
    pub dim: u64,
    /// Number of segments.
    pub n_segments: u64,
    /// Item factors, row-major `n_rows × dim`.
    pub factors: WireFactors,
    /// Item biases, `n_rows` values.
    #[serde(with = "f32_array")]
    pub item_bias: Vec<f32>,
    /// Global mean.
    pub global_mean: f32,
    /// Segment centroids, row-major `n_segments × dim`.
    #[serde(with = "f32_array")]
    pub centroids: Vec<f32>,
}

/// Item factors on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireFactors {
    /// Index 0: `f32` values.
    F32(#[serde(with = "f32_array")] Vec<f32>),
    /// Index 1: 8-bit codes (two's complement bytes) and one `f32` scale per row.
    Int8 {
        /// The codes, row-major.
        codes: Vec<u8>,
        /// One scale per row.
        #[serde(with = "f32_array")]
        scales: Vec<f32>,
    },
}

/// A round's privacy mechanism, as a `u16` on the wire. Codes are stable; a code this side
/// does not know decodes as [`WireMechanism::Unknown`] with its number, so that a device can
/// refuse a mechanism it does not know instead of failing to read the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum WireMechanism {
    /// Code 0: no noise.
    None,
    /// Code 1: central Gaussian noise added by the coordinator.
    CentralGaussian,
    /// Code 2: distributed discrete Gaussian noise (device shares under secure aggregation).
    DistributedDiscreteGaussian,
    /// Any other code.
    Unknown(u16),
}

impl From<u16> for WireMechanism {
    fn from(n: u16) -> Self {
        match n {
            0 => WireMechanism::None,
            1 => WireMechanism::CentralGaussian,
            2 => WireMechanism::DistributedDiscreteGaussian,
            n => WireMechanism::Unknown(n),
        }
    }
}

impl From<WireMechanism> for u16 {
    fn from(m: WireMechanism) -> u16 {
        match m {
            WireMechanism::None => 0,
            WireMechanism::CentralGaussian => 1,
            WireMechanism::DistributedDiscreteGaussian => 2,
            WireMechanism::Unknown(n) => n,
        }
    }
}

/// A round's aggregation mode, as a `u16` on the wire; unknown codes decode as
/// [`WireAggregation::Unknown`] (see [`WireMechanism`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum WireAggregation {
    /// Code 0: the coordinator sees each clipped upload.
    Plain,
    /// Code 1: secure aggregation; the coordinator sees only sums.
    Secure,
    /// Any other code.
    Unknown(u16),
}

impl From<u16> for WireAggregation {
    fn from(n: u16) -> Self {
        match n {
            0 => WireAggregation::Plain,
            1 => WireAggregation::Secure,
            n => WireAggregation::Unknown(n),
        }
    }
}

impl From<WireAggregation> for u16 {
    fn from(a: WireAggregation) -> u16 {
        match a {
            WireAggregation::Plain => 0,
            WireAggregation::Secure => 1,
            WireAggregation::Unknown(n) => n,
        }
    }
}

/// How the round selects devices, as sent with a task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum WireSelection {
    /// Index 0: Poisson sampling of the checked-in devices with probability `q`.
    Poisson {
        /// The sampling probability, in `(0, 1]`.
        q: f64,
    },
    /// Index 1: the first `cohort` devices to check in.
    FirstCome {
        /// The target cohort.
        cohort: u64,
    },
}

/// A round's privacy parameters, as sent with a task (the clip norm is the task's own
/// `clip_norm`). Declared by the coordinator; the device checks them against its policy and
/// records them, but cannot verify them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WirePrivacy {
    /// The mechanism.
    pub mechanism: WireMechanism,
    /// The noise multiplier `σ` the round is charged with (0 without noise).
    pub noise_multiplier: f32,
    /// The selection.
    pub selection: WireSelection,
    /// The fewest reports with which the round commits.
    pub min_reports: u64,
    /// The population the expected cohort is computed from, if the coordinator has one.
    pub population: Option<u64>,
    /// The aggregation mode.
    pub aggregation: WireAggregation,
}

/// A message from the coordinator to a device. The variant order is the wire's variant index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Index 0: the device is selected.
    Task(WireTask),
    /// Index 1: the device is not selected; it may check in again after the hint.
    NotSelected {
        /// The round.
        round: u64,
        /// When to check in again, in milliseconds.
        retry_after_ms: u64,
    },
    /// Index 2: the upload was accepted.
    Ack {
        /// The round.
        round: u64,
    },
    /// Index 3: the request was refused.
    Error {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, for people (≤ [`MAX_ERROR_MESSAGE_LEN`] bytes; never user data).
        message: String,
        /// When the device may try again, in milliseconds, for refusals that pass (rate limits).
        retry_after_ms: Option<u64>,
    },
    /// Index 4: the round was abandoned; nothing the device sent will be used.
    Aborted {
        /// The round.
        round: u64,
    },
    /// Index 5: the answer to [`Request::FetchRules`].
    Rules(RulesAnswer),
    /// Index 6: the federation is finished (its privacy budget is spent): no round will open
    /// again, and the device should stop checking in. Carries the final model unless the
    /// device said it holds that version.
    Finished {
        /// The final model's version.
        model_version: u64,
        /// The final model, or `None` when the device's cached version is `model_version`.
        model: Option<WireModel>,
    },
    /// Index 7: secure aggregation, phase 1: the round's parameters and the device's
    /// neighbours' keys; the device answers with [`Request::EncryptedShares`].
    ShareKeys(WireShareKeys),
    /// Index 8: secure aggregation, phase 2: the pairs the device's neighbours sealed for it;
    /// the device answers with [`Request::MaskedInput`].
    MaskedInputRequest {
        /// The round.
        round: u64,
        /// One sealed pair per neighbour that shared, naming its sender (at most [`MAX_NEIGHBOURS`]).
        #[serde(with = "bounded_list")]
        shares: Vec<WireSealedPair>,
    },
    /// Index 9: secure aggregation, phase 3: which neighbours dropped after sharing and which
    /// sent their masked input; the device answers with [`Request::UnmaskShares`].
    Unmask {
        /// The round.
        round: u64,
        /// Neighbours whose mask key is to be rebuilt.
        #[serde(with = "bounded_list")]
        dropped: Vec<u32>,
        /// Neighbours whose self-mask is to be removed. Both lists together name at most
        /// [`MAX_NEIGHBOURS`] devices.
        #[serde(with = "bounded_list")]
        survivors: Vec<u32>,
    },
    /// Index 10: the device is selected for a round that trains an item subset or downloads a
    /// compact model; the model is always included.
    CompactTask(WireCompactTask),
}

/// A neighbour's index in the cohort and its two public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireNeighbour {
    /// The neighbour's index.
    pub index: u32,
    /// Its key for sealing shares.
    pub cipher_public: [u8; PUBLIC_KEY_LEN],
    /// Its key for agreeing masks.
    pub mask_public: [u8; PUBLIC_KEY_LEN],
}

/// Secure aggregation, phase 1, coordinator → device: the round's public parameters, the
/// device's index and its neighbours' keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireShareKeys {
    /// The round.
    pub round: u64,
    /// The round's public randomness (salts the key derivations, defines the graph).
    pub seed: [u8; SEED_LEN],
    /// Devices whose keys arrived.
    pub n: u32,
    /// Neighbours per device (`n − 1`: the complete graph).
    pub k: u32,
    /// Shares that reconstruct a secret.
    pub t: u32,
    /// The ring `Z/2^bits` of the masked inputs.
    pub bits: u32,
    /// The receiving device's index in the cohort.
    pub index: u32,
    /// Its neighbours, by index (at most [`MAX_NEIGHBOURS`]).
    #[serde(with = "bounded_list")]
    pub neighbours: Vec<WireNeighbour>,
}

impl Response {
    /// An error response; `message` is cut to [`MAX_ERROR_MESSAGE_LEN`] bytes at a character boundary.
    pub fn error(code: ErrorCode, message: &str) -> Self {
        let mut end = message.len().min(MAX_ERROR_MESSAGE_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Response::Error { code, message: message[..end].to_owned(), retry_after_ms: None }
    }

    /// An error response with a retry hint (see [`Response::error`] for the message).
    pub fn error_with_retry(code: ErrorCode, message: &str, retry_after: Duration) -> Self {
        let mut response = Response::error(code, message);
        if let Response::Error { retry_after_ms, .. } = &mut response {
            *retry_after_ms = Some(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX));
        }
        response
    }

    /// The retry hint of an error response, if it has one.
    pub fn error_retry_after(&self) -> Option<Duration> {
        match self {
            Response::Error { retry_after_ms: Some(ms), .. } => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }
}

impl From<WireTask> for Response {
    fn from(t: WireTask) -> Self {
        Response::Task(t)
    }
}

/// Why a request was refused, as a `u16` on the wire. Codes are stable: new ones may be
/// added, existing ones never renumbered; a code this side does not know decodes as
/// [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
#[non_exhaustive]
#[repr(u16)]
pub enum ErrorCode {
    /// A code this version of the protocol does not define.
    Unknown = 0,
    /// The message's protocol version is not the coordinator's.
    VersionMismatch = 1,
    /// The enrollment token is missing, invalid or revoked.
    BadToken = 2,
    /// The message repeats one already received (same nonce).
    Replay = 3,
    /// The device was not selected for this round.
    NotSelected = 4,
    /// The device already reported in this round.
    Duplicate = 5,
    /// The message names a round that is not the current one.
    WrongRound = 6,
    /// The round does not accept this message in its current phase.
    WrongPhase = 7,
    /// The update does not have the model's layout.
    WrongShape = 8,
    /// The update holds NaN or an infinity.
    NonFinite = 9,
    /// The update's norm exceeds the clip norm.
    NormTooLarge = 10,
    /// The message exceeds its size limit.
    TooLarge = 11,
    /// The message could not be decoded, or breaks a rule of the protocol.
    Malformed = 12,
    /// The device sends too often; it may retry later.
    RateLimited = 13,
    /// The coordinator failed; not the device's fault.
    Internal = 14,
    /// Adaptive clipping is on and the upload lacks the "within the bound" bit.
    MissingClipBit = 15,
    /// The device's state (charging, network, idle: [`CheckIn::capabilities`]) does not meet
    /// the coordinator's eligibility policy; it may check in again when it does.
    NotEligible = 16,
    /// The connection sent too many invalid requests. Not sent in a response: the
    /// coordinator closes such a connection with this code as the QUIC application error code.
    CutOff = 17,
    /// The coordinator is at capacity (pace steering): the device should check in again
    /// after the response's retry hint, which the coordinator spreads with jitter. Never a
    /// strike.
    Busy = 18,
}

impl ErrorCode {
    /// Every defined code, `Unknown` first.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::Unknown,
        ErrorCode::VersionMismatch,
        ErrorCode::BadToken,
        ErrorCode::Replay,
        ErrorCode::NotSelected,
        ErrorCode::Duplicate,
        ErrorCode::WrongRound,
        ErrorCode::WrongPhase,
        ErrorCode::WrongShape,
        ErrorCode::NonFinite,
        ErrorCode::NormTooLarge,
        ErrorCode::TooLarge,
        ErrorCode::Malformed,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
        ErrorCode::MissingClipBit,
        ErrorCode::NotEligible,
        ErrorCode::CutOff,
        ErrorCode::Busy,
    ];

    /// The code's number on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// A short stable label, matching [`crate::Rejection::label`] where both name the same reason.
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::Unknown => "unknown",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::Replay => "replay",
            ErrorCode::NotSelected => "not_selected",
            ErrorCode::Duplicate => "duplicate",
            ErrorCode::WrongRound => "wrong_round",
            ErrorCode::WrongPhase => "wrong_phase",
            ErrorCode::WrongShape => "wrong_shape",
            ErrorCode::NonFinite => "non_finite",
            ErrorCode::NormTooLarge => "norm_too_large",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Malformed => "malformed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::MissingClipBit => "missing_clip_bit",
            ErrorCode::NotEligible => "not_eligible",
            ErrorCode::CutOff => "cut_off",
            ErrorCode::Busy => "busy",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c.as_u16()
    }
}

impl From<u16> for ErrorCode {
    fn from(n: u16) -> ErrorCode {
        ErrorCode::ALL.get(usize::from(n)).copied().unwrap_or(ErrorCode::Unknown)
    }
}

/// Checks the bounds the types cannot express; the same on both sides, so that an encoder
/// refuses to send what the peer's decoder would refuse.
pub(super) fn check_request(r: &Request) -> Result<(), WireError> {
    if let Request::CheckIn(c) = r {
        check_len("token", c.token.len(), MAX_TOKEN_LEN)?;
        check_len("sdk_version", c.sdk_version.len(), MAX_SDK_VERSION_LEN)?;
    }
    match r {
        Request::FetchRules(f) => check_len("token", f.token.len(), MAX_TOKEN_LEN)?,
        Request::EncryptedShares(m) => check_sealed_pairs(&m.shares)?,
        Request::UnmaskShares(m) => check_count(
            "revealed shares",
            m.mask_key_shares.len() + m.self_mask_shares.len(),
            MAX_NEIGHBOURS + 1,
        )?,
        _ => {}
    }
    Ok(())
}

/// See [`check_request`].
pub(super) fn check_response(r: &Response) -> Result<(), WireError> {
    if let Response::Error { message, .. } = r {
        check_len("error message", message.len(), MAX_ERROR_MESSAGE_LEN)?;
    }
    match r {
        Response::Rules(RulesAnswer::Ruleset(signed)) => signed.check()?,
        Response::ShareKeys(m) => check_count("neighbours", m.neighbours.len(), MAX_NEIGHBOURS)?,
        Response::MaskedInputRequest { shares, .. } => check_sealed_pairs(shares)?,
        Response::Unmask { dropped, survivors, .. } => {
            check_count("dropped and surviving neighbours", dropped.len() + survivors.len(), MAX_NEIGHBOURS)?
        }
        _ => {}
    }
    Ok(())
}

/// At most [`MAX_NEIGHBOURS`] sealed pairs, each exactly [`SEALED_PAIR_LEN`] bytes.
fn check_sealed_pairs(shares: &[WireSealedPair]) -> Result<(), WireError> {
    check_count("sealed pairs", shares.len(), MAX_NEIGHBOURS)?;
    if let Some(bad) = shares.iter().find(|s| s.ciphertext.len() != SEALED_PAIR_LEN) {
        return Err(WireError::Invalid(format!(
            "a sealed pair is {} bytes, it must be {SEALED_PAIR_LEN}",
            bad.ciphertext.len()
        )));
    }
    Ok(())
}

fn check_count(what: &str, n: usize, max: usize) -> Result<(), WireError> {
    if n > max {
        return Err(WireError::Invalid(format!("{n} {what}, at most {max} are allowed")));
    }
    Ok(())
}

fn check_len(field: &str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::Invalid(format!("{field} is {len} bytes, at most {max} are allowed")));
    }
    Ok(())
}

/// A byte vector as a postcard byte string (the same bytes as a `Vec<u8>`), decoded from the
/// input slice without pre-allocating by the announced length.
pub(super) mod byte_string {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub(in crate::wire) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(in crate::wire) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
                Ok(b.to_vec())
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

/// A list as a postcard sequence (varint count, then the elements), decoded without
/// pre-allocating by the announced count and refused beyond [`MAX_NEIGHBOURS`]` + 1` elements
/// (the longest list of any message; [`check_request`] and [`check_response`] apply each
/// message's own bound).
mod bounded_list {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::{Serialize, Serializer};

    const MAX_LEN: usize = super::MAX_NEIGHBOURS + 1;

    pub(super) fn serialize<S: Serializer, T: Serialize>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        struct List<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for List<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX_LEN} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                if seq.size_hint().is_some_and(|n| n > MAX_LEN) {
                    return Err(A::Error::custom(format_args!("a list longer than {MAX_LEN} elements")));
                }
                // Grows as elements arrive: never more than twice what the payload held.
                let mut out = Vec::new();
                while let Some(x) = seq.next_element()? {
                    if out.len() == MAX_LEN {
                        return Err(A::Error::custom(format_args!("a list longer than {MAX_LEN} elements")));
                    }
                    out.push(x);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(List(PhantomData))
    }
}

/// A byte array of fixed length as its raw bytes (a postcard tuple of `u8`s, no length), for
/// lengths serde's derive does not cover.
mod fixed_bytes {
    use std::fmt;

    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::{SerializeTuple, Serializer};

    pub(super) fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(N)?;
        for b in v {
            t.serialize_element(b)?;
        }
        t.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        struct Array<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for Array<N> {
            type Value = [u8; N];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{N} bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; N], A::Error> {
                let mut out = [0u8; N];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
        }
        d.deserialize_tuple(N, Array::<N>)
    }
}

/// Masked words as a postcard byte string: one width byte `w` (1, 2, 4 or 8), then each word as
/// `w` little-endian bytes. The encoder takes the narrowest width every word fits (2 bytes for a
/// 16-bit ring). The decoder sees the bytes before it allocates, and refuses another width or a
/// length that is not `1 + w·d`.
mod word_array {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    /// The word widths, in bytes, narrowest first.
    const WIDTHS: [usize; 4] = [1, 2, 4, 8];

    pub(super) fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let max = v.iter().copied().max().unwrap_or(0);
        let width = WIDTHS.into_iter().find(|&w| w == 8 || max >> (8 * w) == 0).unwrap_or(8);
        let mut bytes = Vec::with_capacity(1 + v.len() * width);
        bytes.push(width as u8);
        for &w in v {
            bytes.extend_from_slice(&w.to_le_bytes()[..width]);
        }
        s.serialize_bytes(&bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        struct Words;
        impl Visitor<'_> for Words {
            type Value = Vec<u64>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a width byte (1, 2, 4 or 8), then little-endian words of that width")
            }
            fn visit_bytes<E: Error>(self, b: &[u8]) -> Result<Vec<u64>, E> {
                let Some((&width, words)) = b.split_first() else {
                    return Err(E::custom("masked words without a width byte"));
                };
                let width = usize::from(width);
                if !WIDTHS.contains(&width) {
                    return Err(E::custom(format_args!("word width {width}, must be 1, 2, 4 or 8")));
                }
                if !words.len().is_multiple_of(width) {
                    return Err(E::custom("masked words length is not a multiple of the width"));
                }
                Ok(words
                    .chunks_exact(width)
                    .map(|c| {
                        let mut w = [0u8; 8];
                        w[..width].copy_from_slice(c);
                        u64::from_le_bytes(w)
                    })
                    .collect())
            }
        }
        d.deserialize_bytes(Words)
    }
}

/// An `f32` array as a postcard byte string of little-endian values: the decoder sees the
/// bytes in the input before it allocates, and allocates exactly what they hold.
mod f32_array {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        s.serialize_bytes(&bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        struct Floats;
        impl Visitor<'_> for Floats {
            type Value = Vec<f32>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string of little-endian f32 values")
            }
            fn visit_bytes<E: Error>(self, b: &[u8]) -> Result<Vec<f32>, E> {
                if !b.len().is_multiple_of(4) {
                    return Err(E::custom("float array length is not a multiple of 4"));
                }
                Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
        }
        d.deserialize_bytes(Floats)
    }
}
