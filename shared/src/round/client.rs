//! The device's round state machine: check in, train on the task's model if selected, upload only the clipped update, await the acknowledgement.

use std::collections::VecDeque;

use rand_chacha::ChaCha20Rng;

use super::secure::{DeviceSecAgg, DistributedCharge, DistributedPolicy, SecurePolicy, SecureRefusal};
use super::{Aggregation, ClientMessage, Instant, Mechanism, ServerMessage};
use crate::error::{ParamError, SolveError, UpdateError};
use crate::model::RoundModel;
use crate::privacy::discrete::Grid;
use crate::train::{
    LocalDataError, Rating, UserState, local_update, reconstruct, round_ratings, validate_ratings,
};
use crate::update::ClippedUpdate;

/// Why a device could not take part (its own failure, never the coordinator's input crashing it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The task's parameters are invalid.
    #[error("invalid task: {0}")]
    InvalidTask(#[from] ParamError),
    /// The device's interactions cannot be trained on with this model.
    #[error("local data: {0}")]
    LocalData(#[from] LocalDataError),
    /// The local solve failed.
    #[error("reconstruction failed: {0}")]
    Solve(#[from] SolveError),
    /// The update could not be clipped.
    #[error("update: {0}")]
    Update(#[from] UpdateError),
    /// The update could not be encoded for secure aggregation.
    #[error("secure aggregation encoding: {0}")]
    Encoding(String),
    /// A crafted device ([`ClientRound::with_crafted_update`]) had no update for the task.
    #[error("the crafted device has no update for this task")]
    Crafted,
}

/// What a crafted device sends instead of its trained update, given its index among the
/// crafted devices and the task (see [`ClientRound::with_crafted_update`]).
pub type CraftedUpdate<'a> = &'a (dyn Fn(usize, &super::Task) -> Option<ClippedUpdate> + Sync);

/// A crafted device's update source and index.
struct Crafted<'a> {
    craft: CraftedUpdate<'a>,
    index: usize,
}

impl std::fmt::Debug for Crafted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crafted").field("index", &self.index).finish_non_exhaustive()
    }
}

/// How a device's round ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientOutcome {
    /// The coordinator accepted the upload.
    Completed {
        /// The round.
        round: u64,
        /// Whether clipping shrank the update.
        was_clipped: bool,
    },
    /// The device was not selected.
    NotSelected,
    /// The coordinator refused the upload.
    Rejected(crate::error::Rejection),
    /// The coordinator abandoned the round.
    Aborted,
    /// The device gave up waiting.
    TimedOut,
    /// The device could not compute its update; nothing was sent.
    Failed(ClientError),
    /// The device stopped a secure round itself: the cohort, the parameters or a message did
    /// not meet its policy or the protocol. It sent nothing after its public keys, or after the
    /// message the refusal answers.
    SecureRefused(SecureRefusal),
}

#[derive(Debug)]
enum State {
    ExpectTask,
    ExpectAck {
        round: u64,
        was_clipped: bool,
    },
    /// In the secure phases of `round` (docs/secagg.md); the acknowledgement comes after the
    /// unmask shares.
    Secure {
        round: u64,
        was_clipped: bool,
        secagg: Box<DeviceSecAgg>,
    },
    Done(ClientOutcome),
}

/// One device's participation in one round.
///
/// Holds a borrow of the device's interactions; what it emits is a check-in and, if
/// selected, a [`ClippedUpdate`]. The reconstructed user vector stays here, readable by the
/// device through [`ClientRound::user_state`]; it reaches the upload only as the k-means
/// statistic inside the clipped vector (see [`crate::train::UserState`]).
#[derive(Debug)]
pub struct ClientRound<'a> {
    ratings: &'a [Rating],
    state: State,
    deadline: Instant,
    outbox: VecDeque<ClientMessage>,
    user: Option<UserState>,
    /// Secure aggregation's keys, self-mask seed, shares and stochastic rounding.
    rng: Option<ChaCha20Rng>,
    secure_policy: SecurePolicy,
    noise_policy: DistributedPolicy,
    crafted: Option<Crafted<'a>>,
}

impl<'a> ClientRound<'a> {
    /// Starts a participation: queues a check-in; gives up at `deadline`. Without a generator
    /// it can take part in plain rounds only: a secure task ends it with
    /// [`ClientError::Encoding`]. Drivers build it with [`ClientRound::with_rng`].
    pub fn new(ratings: &'a [Rating], deadline: Instant) -> Self {
        Self {
            ratings,
            state: State::ExpectTask,
            deadline,
            outbox: VecDeque::from([ClientMessage::CheckIn]),
            user: None,
            rng: None,
            secure_policy: SecurePolicy::default(),
            noise_policy: DistributedPolicy::default(),
            crafted: None,
        }
    }

    /// Sends `craft(index, task)` instead of training: the canary devices of a privacy audit
    /// (`fedrec-sim audit`), which upload an update of their choosing, as any device could (the
    /// coordinator cannot tell where an update comes from). The update is still a
    /// [`ClippedUpdate`] (norm at most the task's clip norm) and takes the device's own path:
    /// a plain upload, or secure aggregation's masking with distributed noise's encoding and
    /// noise share. `None` from `craft` ends the round for this device
    /// ([`ClientError::Crafted`]; nothing is sent).
    pub fn with_crafted_update(mut self, craft: CraftedUpdate<'a>, index: usize) -> Self {
        self.crafted = Some(Crafted { craft, index });
        self
    }

    /// [`ClientRound::new`] with the generator of the device's secure-aggregation secrets (keys,
    /// self-mask seed, shares, stochastic rounding): the driver seeds it from the operating
    /// system (the SDK), or a simulation from [`crate::danger`] to be reproducible. This crate
    /// draws no ambient randomness.
    pub fn with_rng(ratings: &'a [Rating], deadline: Instant, rng: ChaCha20Rng) -> Self {
        Self { rng: Some(rng), ..Self::new(ratings, deadline) }
    }

    /// What the device requires of a secure round (default: [`SecurePolicy::default`]).
    pub fn with_secure_policy(mut self, policy: SecurePolicy) -> Self {
        self.secure_policy = policy;
        self
    }

    /// What the device requires of the round's noise (default: nothing, see
    /// [`DistributedPolicy`]). A task that does not declare distributed noise on a secure
    /// round is refused before training when the policy requires it.
    pub fn with_distributed_policy(mut self, policy: DistributedPolicy) -> Self {
        self.noise_policy = policy;
        self
    }

    /// A message from the coordinator arrived.
    pub fn handle_message(&mut self, now: Instant, msg: ServerMessage) {
        let next = match (&self.state, msg) {
            (State::ExpectTask, ServerMessage::Selected { task, .. })
                if self.noise_policy.require_distributed
                    && !(task.privacy.aggregation == Aggregation::Secure
                        && task.privacy.mechanism == Mechanism::DistributedDiscreteGaussian) =>
            {
                // Refused before anything is trained or sent.
                State::Done(ClientOutcome::SecureRefused(SecureRefusal::NotDistributed))
            }
            (State::ExpectTask, ServerMessage::Selected { task, model })
                if task.privacy.aggregation == Aggregation::Secure =>
            {
                self.deadline = self.deadline.min(now.saturating_add(task.report_window));
                match self.train(&model, &task).and_then(|update| self.start_secure(&task, update)) {
                    Ok(state) => state,
                    Err(e) => State::Done(ClientOutcome::Failed(e)),
                }
            }
            (State::ExpectTask, ServerMessage::Selected { task, model }) => {
                self.deadline = self.deadline.min(now.saturating_add(task.report_window));
                match self.train(&model, &task) {
                    Ok(update) => {
                        let was_clipped = update.was_clipped();
                        let within_bound = task.report_clip_bit.then_some(!was_clipped);
                        self.outbox.push_back(ClientMessage::Upload {
                            round: task.round,
                            update,
                            within_bound,
                        });
                        State::ExpectAck { round: task.round, was_clipped }
                    }
                    Err(e) => State::Done(ClientOutcome::Failed(e)),
                }
            }
            (State::ExpectTask, ServerMessage::NotSelected { .. }) => State::Done(ClientOutcome::NotSelected),
            // A check-in of a device whose upload this round already took (its acknowledgement
            // was lost and it tried again): it did contribute. Whether that upload was clipped
            // is not known here.
            (State::ExpectTask, ServerMessage::Ack { round }) => {
                State::Done(ClientOutcome::Completed { round, was_clipped: false })
            }
            (State::ExpectAck { round, was_clipped }, ServerMessage::Ack { round: r }) if *round == r => {
                State::Done(ClientOutcome::Completed { round: r, was_clipped: *was_clipped })
            }
            (State::ExpectAck { round, .. }, ServerMessage::Rejected { round: r, reason }) if *round == r => {
                State::Done(ClientOutcome::Rejected(reason))
            }
            (
                State::ExpectTask | State::ExpectAck { .. } | State::Secure { .. },
                ServerMessage::Aborted { .. },
            ) => State::Done(ClientOutcome::Aborted),
            (State::Secure { round, was_clipped, .. }, ServerMessage::Ack { round: r }) if *round == r => {
                State::Done(ClientOutcome::Completed { round: r, was_clipped: *was_clipped })
            }
            (State::Secure { round, .. }, ServerMessage::Rejected { round: r, reason }) if *round == r => {
                State::Done(ClientOutcome::Rejected(reason))
            }
            (
                State::Secure { .. },
                msg @ (ServerMessage::ShareKeys(_)
                | ServerMessage::MaskedInputRequest(_)
                | ServerMessage::Unmask(_)),
            ) => match self.step_secure(msg) {
                Ok(()) => return,
                Err(refusal) => {
                    self.outbox.clear();
                    State::Done(ClientOutcome::SecureRefused(refusal))
                }
            },
            // Anything else is stale or out of order: ignore it.
            _ => return,
        };
        self.state = next;
    }

    fn train(&mut self, model: &RoundModel, task: &super::Task) -> Result<ClippedUpdate, ClientError> {
        task.train.validate()?;
        if !(task.clip_norm.is_finite() && task.clip_norm > 0.0) {
            return Err(ParamError { name: "clip_norm", reason: "must be finite and > 0".into() }.into());
        }
        if let Some(c) = &self.crafted {
            return (c.craft)(c.index, task).ok_or(ClientError::Crafted);
        }
        validate_ratings(self.ratings, model.n_catalogue_items(), &task.train.objective)?;
        // In a round that trains an item subset, the model holds its rows only: the update is
        // dense over the subset whatever items the device has.
        let ratings = round_ratings(model, self.ratings);
        // The user vector from every interaction when the device holds a model of the whole
        // catalogue (of the same catalogue size), else from the round's rows alone.
        let user = match model.reference() {
            Some(full) if model.subset().is_some_and(|s| s.n_items() == full.model.shape().n_items) => {
                reconstruct(full, self.ratings, &task.train)?
            }
            _ => reconstruct(model, &ratings, &task.train)?,
        };
        let update = local_update(model, &ratings, &user, &task.train);
        self.user = Some(user);
        Ok(ClippedUpdate::clip(update, task.clip_norm)?)
    }

    /// Secure phase 0: encodes the clipped update on the round's grid and advertises fresh
    /// keys instead of uploading.
    fn start_secure(&mut self, task: &super::Task, update: ClippedUpdate) -> Result<State, ClientError> {
        let Some(rng) = self.rng.as_mut() else {
            return Err(ClientError::Encoding(
                "a secure round needs a generator for the device's secrets (ClientRound::with_rng)".into(),
            ));
        };
        let was_clipped = update.was_clipped();
        if task.privacy.mechanism == Mechanism::DistributedDiscreteGaussian {
            if task.report_clip_bit {
                return Err(ClientError::Encoding(
                    "a clip bit cannot be sent with distributed noise (it would carry no noise)".into(),
                ));
            }
            let dense = update.vector().to_dense();
            // The clipped update itself goes no further than its encoding.
            drop(update);
            let (secagg, cipher_public, mask_public) = DeviceSecAgg::new_distributed(
                task.round,
                dense,
                task.privacy,
                task.clip_norm,
                self.secure_policy,
                self.noise_policy,
                rng,
            );
            self.outbox.push_back(ClientMessage::AdvertiseKeys {
                round: task.round,
                cipher_public,
                mask_public,
            });
            return Ok(State::Secure { round: task.round, was_clipped, secagg: Box::new(secagg) });
        }
        let layout = *update.vector().layout();
        let grid = Grid::for_secure_sum(task.clip_norm, layout.len())
            .map_err(|e| ClientError::Encoding(e.to_string()))?;
        let clip_bit = task.report_clip_bit.then_some(!was_clipped);
        let encoded = crate::secagg::encode::encode(&update, &grid, clip_bit, rng)
            .map_err(|e| ClientError::Encoding(e.to_string()))?;
        // The clipped update itself goes no further than its encoding.
        drop(update);
        let (secagg, cipher_public, mask_public) =
            DeviceSecAgg::new(task.round, encoded, grid, clip_bit.is_some(), self.secure_policy, rng);
        self.outbox.push_back(ClientMessage::AdvertiseKeys { round: task.round, cipher_public, mask_public });
        Ok(State::Secure { round: task.round, was_clipped, secagg: Box::new(secagg) })
    }

    /// Secure phases 1–3: answers the coordinator's request of the current phase.
    fn step_secure(&mut self, msg: ServerMessage) -> Result<(), SecureRefusal> {
        let State::Secure { round, secagg, .. } = &mut self.state else { return Ok(()) };
        let round = *round;
        let wrong_round = SecureRefusal::Protocol("a request for another round");
        let reply = match msg {
            ServerMessage::ShareKeys(req) => {
                if req.round != round {
                    return Err(wrong_round);
                }
                let rng = self.rng.as_mut().ok_or(SecureRefusal::Protocol("no generator"))?;
                let shares = secagg.share_keys(req, rng)?;
                ClientMessage::EncryptedShares { round, shares }
            }
            ServerMessage::MaskedInputRequest(req) => {
                if req.round != round {
                    return Err(wrong_round);
                }
                let words = secagg.masked_input(req)?;
                ClientMessage::MaskedInput { round, words }
            }
            ServerMessage::Unmask(req) => {
                if req.round != round {
                    return Err(wrong_round);
                }
                ClientMessage::UnmaskShares(secagg.unmask(&req)?)
            }
            _ => return Ok(()),
        };
        self.outbox.push_back(reply);
        Ok(())
    }

    /// The deadline passed without an answer.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.deadline && !matches!(self.state, State::Done(_)) {
            self.state = State::Done(ClientOutcome::TimedOut);
            self.outbox.clear();
        }
    }

    /// The price of a distributed-noise round, once share-keys has fixed it — taken once, by
    /// the driver, before it sends the device's shares (the next
    /// [`ClientRound::poll_transmit`]): a driver that keeps a privacy record tops it up to this
    /// charge, or stops here (nothing that depends on the update has left the device yet).
    pub fn take_distributed_charge(&mut self) -> Option<DistributedCharge> {
        let State::Secure { round, secagg, .. } = &mut self.state else { return None };
        secagg.take_distributed_event().map(|event| DistributedCharge { round: *round, event })
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<ClientMessage> {
        self.outbox.pop_front()
    }

    /// When [`ClientRound::handle_timeout`] must be called, while the round is running.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!matches!(self.state, State::Done(_))).then_some(self.deadline)
    }

    /// How the participation ended, once it has.
    pub fn outcome(&self) -> Option<&ClientOutcome> {
        match &self.state {
            State::Done(o) => Some(o),
            _ => None,
        }
    }

    /// The user vector reconstructed in this round (local only).
    pub fn user_state(&self) -> Option<&UserState> {
        self.user.as_ref()
    }
}
