//! Explicit conversions between the wire messages and the round machines' internal types, checking everything a peer sent.

use std::sync::Arc;
use std::time::Duration;

use super::WireError;
use super::messages::{
    AdvertiseKeys, CheckIn, EncryptedShares, ErrorCode, MAX_NEIGHBOURS, MaskedInput, NONCE_LEN, Request,
    Response, SEALED_PAIR_LEN, UnmaskShares, Upload, WireAggregation, WireCompactModel, WireCompactTask,
    WireFactors, WireMechanism, WireModel, WireNeighbour, WireObjective, WirePrivacy, WireRevealedShare,
    WireSealedPair, WireSelection, WireShareKeys, WireSubset, WireTask, WireTrainParams,
};
use crate::error::{Rejection, UpdateError};
use crate::model::compact::Int8Rows;
use crate::model::subset::ItemSubset;
use crate::model::{GlobalModel, ModelShape, RoundModel, UpdateLayout};
use crate::round::secure::RevealedShare;
use crate::round::{
    Aggregation, ClientMessage, EncryptedShare, MaskedInputRequest, Mechanism, NeighbourKeys, SecAggSetup,
    ServerMessage, ShareKeysRequest, Task, TaskPrivacy, TaskSelection, UnmaskRequest,
};
use crate::train::{Objective, TrainParams};
use crate::update::{ClippedUpdate, UpdateVector};

impl From<Objective> for WireObjective {
    fn from(o: Objective) -> Self {
        match o {
            Objective::Explicit => WireObjective::Explicit,
            Objective::Implicit { alpha } => WireObjective::Implicit { alpha },
        }
    }
}

impl From<WireObjective> for Objective {
    fn from(o: WireObjective) -> Self {
        match o {
            WireObjective::Explicit => Objective::Explicit,
            WireObjective::Implicit { alpha } => Objective::Implicit { alpha },
        }
    }
}

impl From<TrainParams> for WireTrainParams {
    fn from(p: TrainParams) -> Self {
        Self {
            objective: p.objective.into(),
            l2_user: p.l2_user,
            l2_user_bias: p.l2_user_bias,
            l2_item: p.l2_item,
            l2_item_bias: p.l2_item_bias,
            user_support_exponent: p.user_support_exponent,
        }
    }
}

/// Not validated here: the device's round machine validates the parameters of every task
/// (and reports invalid ones as its outcome), whatever their origin.
impl From<WireTrainParams> for TrainParams {
    fn from(p: WireTrainParams) -> Self {
        Self {
            objective: p.objective.into(),
            l2_user: p.l2_user,
            l2_user_bias: p.l2_user_bias,
            l2_item: p.l2_item,
            l2_item_bias: p.l2_item_bias,
            user_support_exponent: p.user_support_exponent,
        }
    }
}

impl WireModel {
    /// The wire form of `model` at `version`.
    pub fn from_global(version: u64, model: &GlobalModel) -> Self {
        let shape = model.shape();
        Self {
            version,
            // usize is at most 64 bits on every supported target: these casts are lossless.
            n_items: shape.n_items as u64,
            dim: shape.dim as u64,
            n_segments: shape.n_segments as u64,
            // Iterating (rather than taking the slice) accepts any memory layout of the arrays.
            item_factors: model.item_factors.iter().copied().collect(),
            item_bias: model.item_bias.iter().copied().collect(),
            global_mean: model.global_mean,
            centroids: model.centroids.iter().copied().collect(),
        }
    }

    /// The shape the model claims, validated ([`ModelShape::validate`]).
    pub fn shape(&self) -> Result<ModelShape, WireError> {
        let shape = ModelShape {
            n_items: to_usize("n_items", self.n_items)?,
            dim: to_usize("dim", self.dim)?,
            n_segments: to_usize("n_segments", self.n_segments)?,
        };
        shape.validate().map_err(|e| WireError::Invalid(format!("model shape: {e}")))?;
        Ok(shape)
    }

    /// The version and the model, after checking the shape, that every array has the
    /// shape's length, and that every value is finite.
    pub fn into_global(self) -> Result<(u64, GlobalModel), WireError> {
        let shape = self.shape()?;
        let model = GlobalModel::from_flat(
            shape,
            self.item_factors,
            self.item_bias,
            self.global_mean,
            self.centroids,
        )
        .map_err(|e| WireError::Invalid(format!("model: {e}")))?;
        Ok((self.version, model))
    }
}

fn to_usize(name: &str, v: u64) -> Result<usize, WireError> {
    usize::try_from(v).map_err(|_| WireError::Invalid(format!("model shape: {name} does not fit in usize")))
}

impl From<&RoundModel> for WireModel {
    fn from(m: &RoundModel) -> Self {
        WireModel::from_global(m.version, &m.model)
    }
}

impl TryFrom<WireModel> for GlobalModel {
    type Error = WireError;
    /// See [`WireModel::into_global`]; the version is dropped.
    fn try_from(m: WireModel) -> Result<Self, WireError> {
        m.into_global().map(|(_, model)| model)
    }
}

impl TryFrom<WireModel> for RoundModel {
    type Error = WireError;
    /// See [`WireModel::into_global`].
    fn try_from(m: WireModel) -> Result<Self, WireError> {
        let (version, model) = m.into_global()?;
        Ok(RoundModel::new(version, model))
    }
}

impl Upload {
    /// The wire form of a clipped update: every value of the layout, whatever the vector
    /// stores in memory. `nonce` must be fresh random bytes (the driver draws them).
    pub fn new(
        round: u64,
        update: &ClippedUpdate,
        within_bound: Option<bool>,
        nonce: [u8; NONCE_LEN],
    ) -> Self {
        Self { round, update: update.vector().to_dense(), within_bound, nonce }
    }

    /// Checks a peer's upload against the round's layout and clip norm: the length, finite
    /// values, the norm ([`ClippedUpdate::verify_received`]). Returns the round, the update and
    /// the clip bit. The nonce is the driver's to check, before this.
    pub fn verify(
        self,
        layout: &UpdateLayout,
        clip_norm: f32,
    ) -> Result<(u64, ClippedUpdate, Option<bool>), WireError> {
        let vector = UpdateVector::from_dense(*layout, &self.update)?;
        let update = ClippedUpdate::verify_received(vector, layout, clip_norm)?;
        Ok((self.round, update, self.within_bound))
    }

    /// [`Upload::verify`], as the message the coordinator machine takes.
    pub fn into_client_message(
        self,
        layout: &UpdateLayout,
        clip_norm: f32,
    ) -> Result<ClientMessage, WireError> {
        let (round, update, within_bound) = self.verify(layout, clip_norm)?;
        Ok(ClientMessage::Upload { round, update, within_bound })
    }
}

impl Request {
    /// The wire form of a device machine's message. The machine's check-in carries nothing:
    /// the driver supplies the device's `check_in` (token, version, cached model); an upload
    /// takes the driver's fresh `nonce`.
    pub fn from_client_message(msg: &ClientMessage, check_in: &CheckIn, nonce: [u8; NONCE_LEN]) -> Request {
        match msg {
            ClientMessage::CheckIn => Request::CheckIn(check_in.clone()),
            ClientMessage::Upload { round, update, within_bound } => {
                Request::Upload(Upload::new(*round, update, *within_bound, nonce))
            }
            ClientMessage::AdvertiseKeys { round, cipher_public, mask_public } => {
                Request::AdvertiseKeys(AdvertiseKeys {
                    round: *round,
                    cipher_public: *cipher_public,
                    mask_public: *mask_public,
                    nonce,
                })
            }
            ClientMessage::EncryptedShares { round, shares } => Request::EncryptedShares(EncryptedShares {
                round: *round,
                shares: shares.iter().map(WireSealedPair::from).collect(),
                nonce,
            }),
            ClientMessage::MaskedInput { round, words } => {
                Request::MaskedInput(MaskedInput { round: *round, words: words.clone(), nonce })
            }
            ClientMessage::UnmaskShares(answer) => Request::UnmaskShares(UnmaskShares {
                round: answer.round,
                mask_key_shares: answer.mask_key_shares.iter().map(WireRevealedShare::from).collect(),
                self_mask_shares: answer.self_mask_shares.iter().map(WireRevealedShare::from).collect(),
                nonce,
            }),
        }
    }
}

impl From<&EncryptedShare> for WireSealedPair {
    fn from(s: &EncryptedShare) -> Self {
        Self { peer: s.peer, ciphertext: s.ciphertext.clone() }
    }
}

impl From<WireSealedPair> for EncryptedShare {
    fn from(s: WireSealedPair) -> Self {
        Self { peer: s.peer, ciphertext: s.ciphertext }
    }
}

impl From<&RevealedShare> for WireRevealedShare {
    fn from(s: &RevealedShare) -> Self {
        Self { owner: s.owner, share: s.share }
    }
}

impl From<WireRevealedShare> for RevealedShare {
    fn from(s: WireRevealedShare) -> Self {
        Self { owner: s.owner, share: s.share }
    }
}

/// The sealed pairs of a peer's message, after checking their count and every ciphertext's
/// length (the decoder checked both already; a value built in memory is checked here).
fn sealed_pairs(shares: Vec<WireSealedPair>) -> Result<Vec<EncryptedShare>, WireError> {
    if shares.len() > MAX_NEIGHBOURS {
        return Err(WireError::Invalid(format!(
            "{} sealed pairs, at most {MAX_NEIGHBOURS} are allowed",
            shares.len()
        )));
    }
    if shares.iter().any(|s| s.ciphertext.len() != SEALED_PAIR_LEN) {
        return Err(WireError::Invalid(format!("a sealed pair that is not {SEALED_PAIR_LEN} bytes")));
    }
    Ok(shares.into_iter().map(EncryptedShare::from).collect())
}

impl AdvertiseKeys {
    /// The message the coordinator machine takes. The nonce is the driver's to check, before
    /// this; whether the keys are usable is the devices' check (an all-zero agreement is refused).
    pub fn into_client_message(self) -> ClientMessage {
        ClientMessage::AdvertiseKeys {
            round: self.round,
            cipher_public: self.cipher_public,
            mask_public: self.mask_public,
        }
    }
}

impl EncryptedShares {
    /// The message the coordinator machine takes, after the structural checks: at most
    /// [`MAX_NEIGHBOURS`] pairs, each [`SEALED_PAIR_LEN`] bytes. Whether they name exactly
    /// the sender's neighbours is the machine's check.
    pub fn into_client_message(self) -> Result<ClientMessage, WireError> {
        Ok(ClientMessage::EncryptedShares { round: self.round, shares: sealed_pairs(self.shares)? })
    }
}

impl MaskedInput {
    /// The message the coordinator machine takes, after checking that there are at most
    /// `layout.len() + 1` words (the layout and the clip bit) or exactly `D` (the layout padded
    /// to the next power of two: a distributed-noise encoding, whose at most 32-bit words still
    /// fit the byte limit). Whether there are exactly as many as the round's encoding and each
    /// is below `2^bits` is the machine's check.
    pub fn into_client_message(self, layout: &UpdateLayout) -> Result<ClientMessage, WireError> {
        let max = layout.len().saturating_add(1);
        let padded = layout.len().checked_next_power_of_two();
        if self.words.len() > max && Some(self.words.len()) != padded {
            return Err(WireError::Invalid(format!(
                "a masked input of {} words, the layout allows at most {max} (or {} with distributed noise)",
                self.words.len(),
                padded.unwrap_or(max)
            )));
        }
        Ok(ClientMessage::MaskedInput { round: self.round, words: self.words })
    }
}

impl UnmaskShares {
    /// The message the coordinator machine takes, after checking that both lists together
    /// hold at most [`MAX_NEIGHBOURS`]` + 1` shares. Whether they are the shares asked for,
    /// each parses and each is at the sender's point is the machine's check.
    pub fn into_client_message(self) -> Result<ClientMessage, WireError> {
        let n = self.mask_key_shares.len() + self.self_mask_shares.len();
        if n > MAX_NEIGHBOURS + 1 {
            return Err(WireError::Invalid(format!(
                "{n} revealed shares, at most {} are allowed",
                MAX_NEIGHBOURS + 1
            )));
        }
        Ok(ClientMessage::UnmaskShares(crate::round::UnmaskShares {
            round: self.round,
            mask_key_shares: self.mask_key_shares.into_iter().map(RevealedShare::from).collect(),
            self_mask_shares: self.self_mask_shares.into_iter().map(RevealedShare::from).collect(),
        }))
    }
}

impl From<&ShareKeysRequest> for WireShareKeys {
    fn from(r: &ShareKeysRequest) -> Self {
        let SecAggSetup { seed, n, k, t, bits } = r.setup;
        Self {
            round: r.round,
            seed,
            n,
            k,
            t,
            bits,
            index: r.index,
            neighbours: r
                .neighbours
                .iter()
                .map(|nb| WireNeighbour {
                    index: nb.index,
                    cipher_public: nb.cipher_public,
                    mask_public: nb.mask_public,
                })
                .collect(),
        }
    }
}

impl WireShareKeys {
    /// The device machine's share-keys request, after checking the neighbour count
    /// ([`MAX_NEIGHBOURS`]). Everything else (the cohort, `k`, `t`, `bits`, the neighbours
    /// against the graph, the keys) is the device machine's check.
    pub fn into_request(self) -> Result<ShareKeysRequest, WireError> {
        if self.neighbours.len() > MAX_NEIGHBOURS {
            return Err(WireError::Invalid(format!(
                "{} neighbours, at most {MAX_NEIGHBOURS} are allowed",
                self.neighbours.len()
            )));
        }
        Ok(ShareKeysRequest {
            round: self.round,
            setup: SecAggSetup { seed: self.seed, n: self.n, k: self.k, t: self.t, bits: self.bits },
            index: self.index,
            neighbours: self
                .neighbours
                .into_iter()
                .map(|nb| NeighbourKeys {
                    index: nb.index,
                    cipher_public: nb.cipher_public,
                    mask_public: nb.mask_public,
                })
                .collect(),
        })
    }
}

impl From<&UpdateError> for ErrorCode {
    fn from(e: &UpdateError) -> Self {
        match e {
            UpdateError::WrongLength { .. } | UpdateError::BadRows => ErrorCode::WrongShape,
            UpdateError::NonFinite => ErrorCode::NonFinite,
            UpdateError::NormTooLarge { .. } => ErrorCode::NormTooLarge,
        }
    }
}

impl From<&Rejection> for ErrorCode {
    fn from(r: &Rejection) -> Self {
        match r {
            Rejection::WrongRound { .. } => ErrorCode::WrongRound,
            Rejection::NotSelected => ErrorCode::NotSelected,
            Rejection::Duplicate => ErrorCode::Duplicate,
            Rejection::WrongPhase => ErrorCode::WrongPhase,
            Rejection::MissingClipBit => ErrorCode::MissingClipBit,
            Rejection::InvalidUpdate(e) => ErrorCode::from(e),
            Rejection::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

impl ErrorCode {
    /// The rejection this code stands for, when the code alone says everything the
    /// rejection holds. Codes whose rejection carries details (round numbers, lengths,
    /// norms) give `None`: the wire does not carry them, and they are not made up here.
    pub fn rejection(self) -> Option<Rejection> {
        match self {
            ErrorCode::NotSelected => Some(Rejection::NotSelected),
            ErrorCode::Duplicate => Some(Rejection::Duplicate),
            ErrorCode::WrongPhase => Some(Rejection::WrongPhase),
            ErrorCode::MissingClipBit => Some(Rejection::MissingClipBit),
            ErrorCode::NonFinite => Some(Rejection::InvalidUpdate(UpdateError::NonFinite)),
            _ => None,
        }
    }
}

impl From<Mechanism> for WireMechanism {
    fn from(m: Mechanism) -> Self {
        match m {
            Mechanism::None => WireMechanism::None,
            Mechanism::CentralGaussian => WireMechanism::CentralGaussian,
            Mechanism::DistributedDiscreteGaussian => WireMechanism::DistributedDiscreteGaussian,
            Mechanism::Unknown(n) => WireMechanism::Unknown(n),
        }
    }
}

impl From<WireMechanism> for Mechanism {
    fn from(m: WireMechanism) -> Self {
        match m {
            WireMechanism::None => Mechanism::None,
            WireMechanism::CentralGaussian => Mechanism::CentralGaussian,
            WireMechanism::DistributedDiscreteGaussian => Mechanism::DistributedDiscreteGaussian,
            WireMechanism::Unknown(n) => Mechanism::Unknown(n),
        }
    }
}

impl From<Aggregation> for WireAggregation {
    fn from(a: Aggregation) -> Self {
        match a {
            Aggregation::Plain => WireAggregation::Plain,
            Aggregation::Secure => WireAggregation::Secure,
            Aggregation::Unknown(n) => WireAggregation::Unknown(n),
        }
    }
}

impl From<WireAggregation> for Aggregation {
    fn from(a: WireAggregation) -> Self {
        match a {
            WireAggregation::Plain => Aggregation::Plain,
            WireAggregation::Secure => Aggregation::Secure,
            WireAggregation::Unknown(n) => Aggregation::Unknown(n),
        }
    }
}

impl From<&TaskPrivacy> for WirePrivacy {
    fn from(p: &TaskPrivacy) -> Self {
        Self {
            mechanism: p.mechanism.into(),
            // σ is sent as f32; rounding moves it by less than one part in 10⁷.
            noise_multiplier: p.noise_multiplier as f32,
            selection: match p.selection {
                TaskSelection::Poisson { q } => WireSelection::Poisson { q },
                TaskSelection::FirstCome { cohort } => WireSelection::FirstCome { cohort },
            },
            min_reports: p.min_reports,
            population: p.population,
            aggregation: p.aggregation.into(),
        }
    }
}

impl WirePrivacy {
    /// The internal form, with the task's `clip_norm`, after checking the numbers a peer
    /// sent: `σ` finite and ≥ 0, `q` in `(0, 1]`. (Whether they are good enough is the
    /// device policy's question, not the decoder's.)
    pub fn to_task_privacy(self, clip_norm: f32) -> Result<TaskPrivacy, WireError> {
        let z = self.noise_multiplier;
        if !(z.is_finite() && z >= 0.0) {
            return Err(WireError::Invalid(format!(
                "task privacy: noise multiplier {z} is not finite and ≥ 0"
            )));
        }
        let selection = match self.selection {
            WireSelection::Poisson { q } if !(q > 0.0 && q <= 1.0) => {
                return Err(WireError::Invalid(format!("task privacy: q = {q} is not in (0, 1]")));
            }
            WireSelection::Poisson { q } => TaskSelection::Poisson { q },
            WireSelection::FirstCome { cohort } => TaskSelection::FirstCome { cohort },
        };
        Ok(TaskPrivacy {
            mechanism: self.mechanism.into(),
            noise_multiplier: f64::from(z),
            clip_norm,
            selection,
            min_reports: self.min_reports,
            population: self.population,
            aggregation: self.aggregation.into(),
        })
    }
}

impl WireTask {
    /// The wire form of a task on `model`; the model is left out when the device holds
    /// `cached_model_version` and that is the model's version. The privacy parameters are
    /// [`TaskPrivacy::undeclared`] until [`WireTask::with_privacy`] sets them: a coordinator
    /// that does not declare its round's noise gets refused by every device policy with a
    /// noise floor.
    pub fn new(task: &Task, model: &RoundModel, cached_model_version: Option<u64>) -> Self {
        Self {
            round: task.round,
            model_version: model.version,
            train: task.train.into(),
            clip_norm: task.clip_norm,
            report_clip_bit: task.report_clip_bit,
            report_window_ms: u64::try_from(task.report_window.as_millis()).unwrap_or(u64::MAX),
            privacy: WirePrivacy::from(&task.privacy),
            model: (cached_model_version != Some(model.version)).then(|| WireModel::from(model)),
        }
    }

    /// This task declaring `privacy` (e.g. [`TaskPrivacy::from_config`] of the coordinator's
    /// configuration). Its clip norm is the task's own.
    pub fn with_privacy(mut self, privacy: &TaskPrivacy) -> Self {
        self.privacy = WirePrivacy::from(privacy);
        self
    }

    /// The privacy parameters the task declares, checked (σ finite and ≥ 0, q in (0, 1]).
    pub fn task_privacy(&self) -> Result<TaskPrivacy, WireError> {
        self.privacy.to_task_privacy(self.clip_norm)
    }

    /// The device machine's `Selected` message. The model comes from the task, checked
    /// ([`WireModel::into_global`]) and of the task's model version, or, when the task omits
    /// it, from `cached`, which must have that version.
    pub fn into_server_message(self, cached: Option<&Arc<RoundModel>>) -> Result<ServerMessage, WireError> {
        let privacy = self.task_privacy()?;
        let model = match (self.model, cached) {
            (Some(m), _) => {
                if m.version != self.model_version {
                    return Err(WireError::Invalid(format!(
                        "task is for model version {} but carries version {}",
                        self.model_version, m.version
                    )));
                }
                Arc::new(RoundModel::try_from(m)?)
            }
            (None, Some(c)) if c.version == self.model_version => Arc::clone(c),
            (None, _) => {
                return Err(WireError::Invalid(format!(
                    "task omits model version {} and no cached model has it",
                    self.model_version
                )));
            }
        };
        let task = Task {
            round: self.round,
            train: self.train.into(),
            clip_norm: self.clip_norm,
            report_clip_bit: self.report_clip_bit,
            report_window: Duration::from_millis(self.report_window_ms),
            privacy,
        };
        Ok(ServerMessage::Selected { task, model })
    }
}

impl WireCompactModel {
    /// The wire form of a round's model: its factors as it encoded them.
    pub fn from_round(m: &RoundModel) -> Self {
        let shape = m.model.shape();
        let factors = match m.int8_factors() {
            Some(rows) => WireFactors::Int8 {
                codes: rows.codes().iter().map(|&q| q as u8).collect(),
                scales: rows.scales().to_vec(),
            },
            None => WireFactors::F32(m.model.item_factors.iter().copied().collect()),
        };
        Self {
            version: m.version,
            n_rows: shape.n_items as u64,
            dim: shape.dim as u64,
            n_segments: shape.n_segments as u64,
            factors,
            item_bias: m.model.item_bias.iter().copied().collect(),
            global_mean: m.model.global_mean,
            centroids: m.model.centroids.iter().copied().collect(),
        }
    }

    /// The round model, checked: the shape, every length, finite values and scales, and, with
    /// a subset, that it has one row per item of the subset redrawn from its seed.
    pub fn into_round(self, subset: Option<WireSubset>) -> Result<RoundModel, WireError> {
        let shape = ModelShape {
            n_items: to_usize("n_rows", self.n_rows)?,
            dim: to_usize("dim", self.dim)?,
            n_segments: to_usize("n_segments", self.n_segments)?,
        };
        shape.validate().map_err(|e| WireError::Invalid(format!("model shape: {e}")))?;
        let subset = match subset {
            None => None,
            Some(s) => {
                let n_items = to_usize("n_items", s.n_items)?;
                // The device recomputes the subset; the catalogue bound keeps that cheap.
                if n_items > MAX_CATALOGUE {
                    return Err(WireError::Invalid(format!(
                        "a catalogue of {n_items} items, at most {MAX_CATALOGUE}"
                    )));
                }
                Some(
                    ItemSubset::draw(n_items, shape.n_items, s.seed)
                        .map_err(|e| WireError::Invalid(format!("item subset: {e}")))?,
                )
            }
        };
        let (factors, int8) = match self.factors {
            WireFactors::F32(v) => (v, None),
            WireFactors::Int8 { codes, scales } => {
                let codes = codes.into_iter().map(|b| b as i8).collect();
                let rows = Int8Rows::from_parts(shape.dim, codes, scales)
                    .ok_or_else(|| WireError::Invalid("model: 8-bit factors do not fit the shape".into()))?;
                (rows.decode(), Some(rows))
            }
        };
        let model = GlobalModel::from_flat(shape, factors, self.item_bias, self.global_mean, self.centroids)
            .map_err(|e| WireError::Invalid(format!("model: {e}")))?;
        RoundModel::from_parts(self.version, model, subset, int8)
            .map_err(|e| WireError::Invalid(format!("model: {e}")))
    }
}

/// The largest catalogue a subset task may name (a device redraws the subset over it).
pub const MAX_CATALOGUE: usize = 1 << 28;

impl WireCompactTask {
    /// The wire form of `task` on the round model `model` (with its subset, if any).
    pub fn new(task: &Task, model: &RoundModel) -> Self {
        let mut wire_task = WireTask::new(task, model, Some(model.version));
        wire_task.model = None;
        Self {
            task: wire_task,
            subset: model.subset().map(|s| WireSubset { n_items: s.n_items() as u64, seed: s.seed() }),
            model: WireCompactModel::from_round(model),
        }
    }

    /// The device machine's `Selected` message, checked (see [`WireCompactModel::into_round`]).
    pub fn into_server_message(self) -> Result<ServerMessage, WireError> {
        if self.task.model.is_some() {
            return Err(WireError::Invalid("a compact task carries its model outside the task".into()));
        }
        if self.model.version != self.task.model_version {
            return Err(WireError::Invalid(format!(
                "task is for model version {} but carries version {}",
                self.task.model_version, self.model.version
            )));
        }
        let model = Arc::new(self.model.into_round(self.subset)?);
        self.task.into_server_message(Some(&model))
    }
}

impl Response {
    /// The task response for a device holding `cached_model_version`: a [`Response::Task`],
    /// or, for a round that trains an item subset or downloads a compact model, a
    /// [`Response::CompactTask`] (always with its model: a cached full model is not the
    /// round's).
    pub fn task(task: &Task, model: &RoundModel, cached_model_version: Option<u64>) -> Response {
        if model.subset().is_some() || model.int8_factors().is_some() {
            Response::CompactTask(WireCompactTask::new(task, model))
        } else {
            Response::Task(WireTask::new(task, model, cached_model_version))
        }
    }
}

/// A response as the device's driver sees it: a message for its round machine, or an error
/// code for the driver itself to act on (back off, re-enroll, report).
#[derive(Debug, Clone)]
pub enum Inbound {
    /// Feed this to the round machine.
    Message(ServerMessage),
    /// The federation is finished: no round will open again. The final model, checked, when
    /// the response carried one (it omits the model the device said it holds).
    Finished {
        /// The final model's version.
        model_version: u64,
        /// The final model, if the response carried it.
        model: Option<Arc<RoundModel>>,
    },
    /// The coordinator refused the request. [`ErrorCode::rejection`] says whether the round
    /// machine can take it as a rejection of its upload.
    Error {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
}

impl Response {
    /// The wire form of a coordinator machine's message to one device, which said in its
    /// check-in that it holds `cached_model_version`. `retry_after` is the hint sent with
    /// `NotSelected`.
    pub fn from_server_message(
        msg: &ServerMessage,
        cached_model_version: Option<u64>,
        retry_after: Duration,
    ) -> Response {
        match msg {
            ServerMessage::Selected { task, model } => Response::task(task, model, cached_model_version),
            ServerMessage::NotSelected { round } => Response::NotSelected {
                round: *round,
                retry_after_ms: u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
            },
            ServerMessage::Ack { round } => Response::Ack { round: *round },
            ServerMessage::Rejected { reason, .. } => {
                Response::error(reason.into(), &rejection_message(reason))
            }
            ServerMessage::Aborted { round } => Response::Aborted { round: *round },
            ServerMessage::ShareKeys(req) => Response::ShareKeys(WireShareKeys::from(req)),
            ServerMessage::MaskedInputRequest(req) => Response::MaskedInputRequest {
                round: req.round,
                shares: req.shares.iter().map(WireSealedPair::from).collect(),
            },
            ServerMessage::Unmask(req) => Response::Unmask {
                round: req.round,
                dropped: req.dropped.clone(),
                survivors: req.survivors.clone(),
            },
        }
    }

    /// The check-in retry hint of a `NotSelected` response.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Response::NotSelected { retry_after_ms, .. } => Some(Duration::from_millis(*retry_after_ms)),
            _ => None,
        }
    }

    /// The final answer of a finished federation (see [`Response::Finished`]): the model is
    /// left out when the device holds `cached_model_version` and that is the model's version.
    pub fn finished(model: &RoundModel, cached_model_version: Option<u64>) -> Response {
        Response::Finished {
            model_version: model.version,
            model: (cached_model_version != Some(model.version)).then(|| WireModel::from(model)),
        }
    }

    /// What the device's driver does with this response; `cached` is the model the device
    /// holds (see [`WireTask::into_server_message`]).
    pub fn into_inbound(self, cached: Option<&Arc<RoundModel>>) -> Result<Inbound, WireError> {
        Ok(Inbound::Message(match self {
            Response::Task(task) => task.into_server_message(cached)?,
            Response::CompactTask(task) => task.into_server_message()?,
            Response::NotSelected { round, .. } => ServerMessage::NotSelected { round },
            Response::Ack { round } => ServerMessage::Ack { round },
            Response::Error { code, message, .. } => return Ok(Inbound::Error { code, message }),
            Response::Aborted { round } => ServerMessage::Aborted { round },
            Response::Rules(_) => {
                return Err(WireError::Invalid("a rules answer is not a round message".into()));
            }
            Response::Finished { model_version, model } => {
                let model = match model {
                    Some(m) if m.version != model_version => {
                        return Err(WireError::Invalid(format!(
                            "finished for model version {model_version} but carries version {}",
                            m.version
                        )));
                    }
                    Some(m) => Some(Arc::new(RoundModel::try_from(m)?)),
                    None => None,
                };
                return Ok(Inbound::Finished { model_version, model });
            }
            Response::ShareKeys(req) => ServerMessage::ShareKeys(req.into_request()?),
            Response::MaskedInputRequest { round, shares } => {
                ServerMessage::MaskedInputRequest(MaskedInputRequest { round, shares: sealed_pairs(shares)? })
            }
            Response::Unmask { round, dropped, survivors } => {
                let n = dropped.len() + survivors.len();
                if n > MAX_NEIGHBOURS {
                    return Err(WireError::Invalid(format!(
                        "an unmask request naming {n} devices, at most {MAX_NEIGHBOURS} are allowed"
                    )));
                }
                ServerMessage::Unmask(UnmaskRequest { round, dropped, survivors })
            }
        }))
    }
}

/// The rejection's text, without the measured norm: that is a statistic of the device's data.
fn rejection_message(reason: &Rejection) -> String {
    match reason {
        Rejection::InvalidUpdate(UpdateError::NormTooLarge { .. }) => {
            "invalid update: the update's norm exceeds the clip norm".to_owned()
        }
        other => other.to_string(),
    }
}
