//! The device's network driver: connects to the coordinator over QUIC (TLS 1.3, pinned certificate, ALPN `fedrec/2`) and drives one [`ClientRound`] per participation.
//!
//! A [`Device`] keeps its QUIC endpoint and the last model it downloaded, so a task for a
//! model it already holds arrives without the model. Each participation attempt opens one
//! connection: a check-in stream, then, if selected, an upload stream; the connection is
//! closed when the attempt ends. Every read has a timeout; whatever the coordinator sends is
//! decoded within the [`Limits`] of the model shape the device was built for. Before its
//! runtime stops, a device's owner calls [`Device::shutdown`], so that the coordinator learns
//! of every close at once instead of holding the connection until its idle timeout.
//!
//! [`Device::participate_with`] is the call an app makes: it sends the device's
//! [`Eligibility`] with the check-in, retries transient failures with exponential backoff
//! and jitter ([`RetryPolicy`], honouring the coordinator's retry hint, e.g. of
//! [`ErrorCode::Busy`]), stops at the time budget ([`NetError::BudgetExceeded`]) and can be
//! cancelled from another task ([`CancelToken`], [`NetError::Cancelled`]), even while it
//! waits for the network. A certificate that is not the pinned one fails at once
//! ([`NetError::Tls`]): no retry makes it trusted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedrec_shared::round::{ClientMessage, ClientOutcome, ClientRound, Instant, ServerMessage};
use fedrec_shared::wire::{
    self, ALPN, CheckIn, ErrorCode, Inbound, LEN_PREFIX, Limits, NONCE_LEN, Request, Response, WireError,
};
use fedrec_shared::{ModelShape, Rating, RoundModel, TrainParams};

use crate::policy::{AdmitAll, RefusalReason, TaskGate, TaskOffer};
use quinn::crypto::rustls::QuicClientConfig;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

/// Longest wait in [`Device::shutdown`] for the endpoint's closed connections to drain.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// Largest UDP payload a device's endpoint accepts (its QUIC `max_udp_payload_size`): an
/// Ethernet frame's, above every path MTU QUIC discovers by default (1452). quinn sizes an
/// endpoint's receive buffer by it (payload × GRO segments × batch), so the default of
/// 65,527 reserves 128 MiB of address space per endpoint where this reserves 3 MiB.
pub const MAX_UDP_PAYLOAD: u16 = 1472;

/// A QUIC client endpoint as a device uses it: a UDP socket on the wildcard address of the
/// server's family and [`MAX_UDP_PAYLOAD`]. Needs a running tokio runtime. Several
/// [`Device`]s may share one ([`Device::with_endpoint`]), as a simulator's fleet does.
pub fn client_endpoint(server: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let bind: SocketAddr =
        if server.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| NetError::Setup(e.to_string()))?;
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).map_err(|e| NetError::Setup(e.to_string()))?;
    let runtime = quinn::default_runtime().ok_or_else(|| NetError::Setup("no async runtime".into()))?;
    quinn::Endpoint::new(config, None, socket, runtime).map_err(|e| NetError::Setup(e.to_string()))
}

/// How a device reaches its coordinator. `Debug` leaves the token out: it is a bearer credential.
#[derive(Clone)]
pub struct NetConfig {
    /// The coordinator's address.
    pub server: SocketAddr,
    /// The name in the coordinator's certificate (e.g. `localhost`).
    pub server_name: String,
    /// The coordinator's certificate (DER): the only one trusted.
    pub server_cert: Vec<u8>,
    /// The device's enrollment token.
    pub token: Vec<u8>,
    /// The SDK version sent with each check-in.
    pub sdk_version: String,
    /// The largest model shape the device accepts (bounds every response it reads).
    pub shape: ModelShape,
    /// Longest wait for the connection or for any response.
    pub timeout: Duration,
}

impl std::fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetConfig")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("sdk_version", &self.sdk_version)
            .field("shape", &self.shape)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why a participation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The client could not be set up (TLS configuration, socket).
    #[error("setup failed: {0}")]
    Setup(String),
    /// The connection could not be made or was lost.
    #[error("connection failed: {0}")]
    Connection(String),
    /// The TLS handshake failed: the coordinator's certificate is not the pinned one (or
    /// not valid for the server name), or the two sides share no protocol version, cipher
    /// suite or ALPN. A configuration error, never retried.
    #[error("TLS handshake failed (is the pinned coordinator certificate the right one?): {0}")]
    Tls(String),
    /// The coordinator did not answer in time.
    #[error("timed out waiting for the coordinator")]
    Timeout,
    /// The coordinator sent something the protocol does not allow.
    #[error("the coordinator misbehaved: {0}")]
    PeerMisbehaved(#[from] WireError),
    /// The coordinator refused a request with an error code, or closed the connection with
    /// one ([`ErrorCode::CutOff`]).
    #[error("refused by the coordinator ({code}): {message}")]
    Refused {
        /// Why, for machines: e.g. [`ErrorCode::NotEligible`], [`ErrorCode::RateLimited`].
        code: ErrorCode,
        /// Why, for people.
        message: String,
        /// When the coordinator suggests trying again, if it said.
        retry_after: Option<Duration>,
    },
    /// The secure random number generator failed.
    #[error("the random number generator failed")]
    Rng,
    /// The participation was cancelled through its [`CancelToken`].
    #[error("the participation was cancelled")]
    Cancelled,
    /// The participation's time budget ran out.
    #[error("the participation's time budget ran out")]
    BudgetExceeded,
}

impl NetError {
    /// Whether trying again later may succeed: a lost or refused connection, a timeout, or a
    /// refusal with [`ErrorCode::RateLimited`], [`ErrorCode::Internal`] or
    /// [`ErrorCode::Busy`]. A failed TLS handshake (a certificate that is not the pinned
    /// one), a bad token, a version mismatch, an ineligible device, a cut-off connection, a
    /// misbehaving coordinator, a cancellation or a spent budget are permanent for this
    /// participation.
    pub fn is_transient(&self) -> bool {
        match self {
            NetError::Connection(_) | NetError::Timeout => true,
            NetError::Refused { code, .. } => {
                matches!(code, ErrorCode::RateLimited | ErrorCode::Internal | ErrorCode::Busy)
            }
            _ => false,
        }
    }

    /// The coordinator's refusal code, if it refused.
    pub fn refusal(&self) -> Option<ErrorCode> {
        match self {
            NetError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The coordinator's retry hint, if it refused with one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            NetError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The device's state as the host app knows it, sent with each check-in as the capability
/// bits [`CheckIn::CHARGING`], [`CheckIn::UNMETERED`] and [`CheckIn::IDLE`]. The coordinator
/// refuses a device whose state its policy does not accept with [`ErrorCode::NotEligible`].
/// The default claims nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Eligibility {
    /// The device is charging.
    pub charging: bool,
    /// The device is on an unmetered network (e.g. Wi-Fi).
    pub unmetered: bool,
    /// The user is not using the device.
    pub idle: bool,
}

impl Eligibility {
    /// The capability bits of a check-in.
    pub fn capabilities(self) -> u32 {
        let bit = |on: bool, bit: u32| if on { bit } else { 0 };
        bit(self.charging, CheckIn::CHARGING)
            | bit(self.unmetered, CheckIn::UNMETERED)
            | bit(self.idle, CheckIn::IDLE)
    }
}

/// How a participation retries transient failures ([`NetError::is_transient`]).
///
/// Retry `k` (0 for the first) waits a random time between half and all of
/// `min(max_backoff, initial_backoff · 2^k)` ("equal jitter", so devices that failed
/// together do not come back together), or, if the coordinator gave a retry hint (pace
/// steering with [`ErrorCode::Busy`], a rate limit) that is longer, the hint plus a random
/// 0–10 % of it ([`RetryPolicy::after_hint`]), so that devices told the same hint spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (0 counts as 1).
    pub max_attempts: u32,
    /// The backoff before the first retry (before jitter).
    pub initial_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub const NONE: RetryPolicy =
        RetryPolicy { max_attempts: 1, initial_backoff: Duration::ZERO, max_backoff: Duration::ZERO };

    /// The wait before retry `retry` (0 for the first) for a `jitter` drawn uniformly from
    /// `[0, 1)`: between half and all of `min(max_backoff, initial_backoff · 2^retry)`.
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let growth = 2u32.checked_pow(retry).unwrap_or(u32::MAX);
        let full = self.initial_backoff.saturating_mul(growth).min(self.max_backoff);
        let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
        full.div_f64(2.0).saturating_add(full.div_f64(2.0).mul_f64(jitter))
    }

    /// The wait before a retry the coordinator gave `hint` for, for a `jitter` drawn uniformly
    /// from `[0, 1)`: between the hint and 10 % more, never less than [`RetryPolicy::backoff`]
    /// would wait (`backoff`).
    pub fn after_hint(hint: Duration, backoff: Duration, jitter: f64) -> Duration {
        let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
        hint.saturating_add(hint.div_f64(10.0).mul_f64(jitter)).max(backoff)
    }
}

impl Default for RetryPolicy {
    /// 5 attempts, backoff from 1 s doubling up to 60 s.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// How one [`Device::participate_with`] call behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParticipateOptions {
    /// Longest time the whole participation (every attempt and wait) may take.
    pub time_budget: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// The device's state, sent with the check-in.
    pub eligibility: Eligibility,
}

impl Default for ParticipateOptions {
    /// A budget of 10 minutes, the default [`RetryPolicy`], no eligibility claimed.
    fn default() -> Self {
        Self {
            time_budget: Duration::from_secs(600),
            retry: RetryPolicy::default(),
            eligibility: Eligibility::default(),
        }
    }
}

/// Cancels a participation from another task or thread. Cheap to clone; every clone cancels
/// the same participations. Once cancelled it stays cancelled: use a new token for the next
/// participation.
#[derive(Debug, Clone)]
pub struct CancelToken(Arc<watch::Sender<bool>>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    /// Cancels every participation using this token (or a clone of it).
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when the token is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`, so the wait only ends by cancellation.
        let _ = rx.wait_for(|&cancelled| cancelled).await;
    }
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

/// How a participation ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Participation {
    /// The round machine's outcome (completed, not selected, rejected, aborted, ...).
    Outcome(ClientOutcome),
    /// Not selected; the coordinator suggests checking in again after this long.
    NotSelected {
        /// The coordinator's hint.
        retry_after: Duration,
    },
    /// The federation is finished (its privacy budget is spent): no round will open again,
    /// so the device should stop checking in. The final model is now the device's cached
    /// model ([`Device::cached_model`]).
    Finished {
        /// The final model's version.
        model_version: u64,
    },
    /// The device's [`TaskGate`] refused the task: nothing was trained or sent, and the
    /// coordinator counts the device as a dropout. The task's model is not kept.
    PolicyRefused {
        /// The round.
        round: u64,
        /// Why.
        reason: RefusalReason,
    },
}

/// One device: its endpoint, its configuration and its cached model.
#[derive(Debug)]
pub struct Device {
    cfg: NetConfig,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    /// Whether the endpoint is the device's own (then [`Device::shutdown`] drains it).
    owns_endpoint: bool,
    limits: Limits,
    cached: Option<Arc<RoundModel>>,
    /// The training parameters of the latest task.
    task_params: Option<TrainParams>,
    rng: SystemRandom,
}

impl Device {
    /// Builds the device with its own QUIC client endpoint ([`client_endpoint`]); needs a
    /// running tokio runtime.
    pub fn new(cfg: NetConfig) -> Result<Device, NetError> {
        let endpoint = client_endpoint(cfg.server)?;
        Device::build(cfg, endpoint, true)
    }

    /// Builds the device on an endpoint it shares with others (e.g. one of a simulator's
    /// pool from [`client_endpoint`]): one UDP socket for many simulated devices. Its
    /// connections are its own; [`Device::shutdown`] then leaves the endpoint to its owner,
    /// who drains it with `quinn::Endpoint::wait_idle` before the runtime stops.
    pub fn with_endpoint(cfg: NetConfig, endpoint: quinn::Endpoint) -> Result<Device, NetError> {
        Device::build(cfg, endpoint, false)
    }

    fn build(cfg: NetConfig, endpoint: quinn::Endpoint, owns_endpoint: bool) -> Result<Device, NetError> {
        let client_config = quic_client_config(&cfg.server_cert)?;
        let limits = Limits::for_shape(&cfg.shape);
        Ok(Device {
            cfg,
            endpoint,
            client_config,
            owns_endpoint,
            limits,
            cached: None,
            task_params: None,
            rng: SystemRandom::new(),
        })
    }

    /// Starts the device with a model it already holds (e.g. from its local store), so that
    /// a check-in for that model version is answered without sending the model again. A
    /// model larger than the configured shape in any dimension is not used.
    pub fn with_cached_model(mut self, model: Arc<RoundModel>) -> Device {
        let (have, max) = (model.model.shape(), self.cfg.shape);
        if have.n_items <= max.n_items && have.dim <= max.dim && have.n_segments <= max.n_segments {
            self.cached = Some(model);
        }
        self
    }

    /// The model the device holds, if any.
    pub fn cached_model(&self) -> Option<&Arc<RoundModel>> {
        self.cached.as_ref()
    }

    /// The training parameters of the latest task the coordinator sent, if any: the
    /// objective and regularisation the device should also use to solve its user vector for
    /// inference, so that what it recommends matches what it trained.
    pub fn task_params(&self) -> Option<TrainParams> {
        self.task_params
    }

    /// Opens a session with the coordinator (for callers that send requests themselves).
    /// Close it with [`Session::close`] when done.
    pub async fn connect(&self) -> Result<Session, NetError> {
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), self.cfg.server, &self.cfg.server_name)
            .map_err(|e| NetError::Setup(e.to_string()))?;
        let conn = tokio::time::timeout(self.cfg.timeout, connecting)
            .await
            .map_err(|_| NetError::Timeout)?
            .map_err(connection_error)?;
        Ok(Session { conn, limits: self.limits, timeout: self.cfg.timeout })
    }

    /// Closes every connection of the device's endpoint and waits (at most [`SHUTDOWN_WAIT`])
    /// until the closes are sent and drained. Call it before the tokio runtime that drives
    /// the endpoint is dropped: a runtime dropped first never sends the QUIC
    /// `CONNECTION_CLOSE`, and the coordinator holds each such connection (and its slot of
    /// the connection cap) until its idle timeout. The device can still connect afterwards.
    /// On a shared endpoint ([`Device::with_endpoint`]) it returns at once: the other
    /// devices' connections are not its to wait for.
    pub async fn shutdown(&self) {
        if !self.owns_endpoint {
            return;
        }
        // Every session is closed by now: explicitly, or implicitly by quinn when an attempt
        // cut short (cancelled, out of time budget) dropped its last handle.
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, self.endpoint.wait_idle()).await;
    }

    /// The check-in this device sends, claiming no [`Eligibility`].
    pub fn check_in(&self) -> CheckIn {
        self.check_in_as(Eligibility::default())
    }

    /// The check-in this device sends in state `eligibility`.
    pub fn check_in_as(&self, eligibility: Eligibility) -> CheckIn {
        CheckIn {
            token: self.cfg.token.clone(),
            sdk_version: self.cfg.sdk_version.clone(),
            capabilities: eligibility.capabilities(),
            cached_model_version: self.cached.as_ref().map(|m| m.version),
        }
    }

    /// Fresh random bytes for an upload's nonce.
    pub fn nonce(&self) -> Result<[u8; NONCE_LEN], NetError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| NetError::Rng)?;
        Ok(nonce)
    }

    /// Takes part in one round: checks in, and if selected trains on `ratings` and uploads
    /// the clipped update. The ratings never leave the device. One attempt, no retry, no
    /// eligibility claimed; see [`Device::participate_with`].
    pub async fn participate(&mut self, ratings: &[Rating]) -> Result<Participation, NetError> {
        self.attempt(ratings, Eligibility::default(), &mut AdmitAll).await
    }

    /// Takes part in one round like [`Device::participate`], with `opts`: the device's
    /// eligibility goes with the check-in, transient failures are retried (see
    /// [`RetryPolicy`]; a wait that would end past the time budget is not started, and the
    /// last error is returned instead), the whole call ends with
    /// [`NetError::BudgetExceeded`] at `opts.time_budget`, and with [`NetError::Cancelled`]
    /// as soon as `cancel` is cancelled, even in the middle of a network wait.
    ///
    /// Cancellation is checked at every wait; training itself (milliseconds) is not
    /// interrupted. `Ok(Participation::NotSelected)` is not retried: the caller schedules
    /// the next participation after its hint. Permanent refusals (e.g.
    /// [`ErrorCode::NotEligible`], [`ErrorCode::BadToken`]) come back as
    /// [`NetError::Refused`]; [`NetError::refusal`] tells them apart.
    pub async fn participate_with(
        &mut self,
        ratings: &[Rating],
        opts: &ParticipateOptions,
        cancel: &CancelToken,
    ) -> Result<Participation, NetError> {
        self.participate_gated(ratings, opts, cancel, &mut AdmitAll).await
    }

    /// [`Device::participate_with`], with `gate` deciding on every task before the device
    /// trains (e.g. a [`crate::policy::PolicyGate`]): a refused task ends the participation
    /// with [`Participation::PolicyRefused`], and nothing is trained or sent for it.
    pub async fn participate_gated(
        &mut self,
        ratings: &[Rating],
        opts: &ParticipateOptions,
        cancel: &CancelToken,
        gate: &mut (dyn TaskGate + Send),
    ) -> Result<Participation, NetError> {
        if cancel.is_cancelled() {
            return Err(NetError::Cancelled);
        }
        // A budget too large to represent is no budget (about 30 years: the same thing).
        let now = tokio::time::Instant::now();
        let budget_end = now
            .checked_add(opts.time_budget)
            .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30));
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(NetError::Cancelled),
            result = tokio::time::timeout_at(budget_end, self.attempts(ratings, opts, budget_end, gate)) => {
                result.unwrap_or(Err(NetError::BudgetExceeded))
            }
        }
    }

    /// Attempts until one succeeds, fails permanently, or the policy or budget says stop.
    async fn attempts(
        &mut self,
        ratings: &[Rating],
        opts: &ParticipateOptions,
        budget_end: tokio::time::Instant,
        gate: &mut (dyn TaskGate + Send),
    ) -> Result<Participation, NetError> {
        let mut retry = 0u32;
        loop {
            let err = match self.attempt(ratings, opts.eligibility, gate).await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            if !err.is_transient() || retry.saturating_add(1) >= opts.retry.max_attempts {
                return Err(err);
            }
            let backoff = opts.retry.backoff(retry, self.jitter()?);
            let wait = match err.retry_after() {
                Some(hint) => RetryPolicy::after_hint(hint, backoff, self.jitter()?),
                None => backoff,
            };
            if tokio::time::Instant::now().checked_add(wait).is_none_or(|end| end >= budget_end) {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
            retry += 1;
        }
    }

    /// A uniform draw from `[0, 1)` for the backoff's jitter.
    fn jitter(&self) -> Result<f64, NetError> {
        let mut bytes = [0u8; 8];
        self.rng.fill(&mut bytes).map_err(|_| NetError::Rng)?;
        // The top 53 bits: every value is an exact f64.
        Ok((u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// One attempt: a connection, a check-in and, if selected, an upload.
    async fn attempt(
        &mut self,
        ratings: &[Rating],
        eligibility: Eligibility,
        gate: &mut (dyn TaskGate + Send),
    ) -> Result<Participation, NetError> {
        let session = self.connect().await?;
        let result = self.participate_in(&session, ratings, eligibility, gate).await;
        session.close();
        result
    }

    async fn participate_in(
        &mut self,
        session: &Session,
        ratings: &[Rating],
        eligibility: Eligibility,
        gate: &mut (dyn TaskGate + Send),
    ) -> Result<Participation, NetError> {
        // The machine's clock: time since this participation began.
        let start = tokio::time::Instant::now();
        let now =
            move || Instant::from_micros(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
        let deadline = now().saturating_add(self.cfg.timeout.saturating_mul(4));
        let mut round = ClientRound::with_rng(ratings, deadline, secure_rng())
            .with_secure_policy(gate.secure_policy())
            .with_distributed_policy(gate.distributed_policy());
        let check_in = self.check_in_as(eligibility);
        if let Some(ended) = self.drive(session, &mut round, &check_in, gate, &now).await? {
            return Ok(ended);
        }
        match round.outcome() {
            Some(outcome) => Ok(Participation::Outcome(outcome.clone())),
            None => Err(NetError::PeerMisbehaved(WireError::Invalid(
                "the coordinator's answer did not end the round".into(),
            ))),
        }
    }

    /// Drives `round` over `session` until the machine has nothing more to send: every
    /// message it emits (a check-in, an upload, the secure-aggregation messages) goes out as
    /// a request and the answer comes back into it. The one device driver: the SDK's
    /// participation is this loop from the check-in on, and a simulator's fleet calls it for
    /// whatever the machine has to say after the steps it orders itself (see
    /// `fedrec-sim --transport quic`). A secure-aggregation message is answered when the
    /// coordinator's phase closes: it waits until the round's own deadline.
    ///
    /// Returns the participation when it ended before the machine did (not selected, refused
    /// by `gate`, the federation finished), `None` when the machine is done (see
    /// [`ClientRound::outcome`]). `now` is the machine's clock.
    pub async fn drive(
        &mut self,
        session: &Session,
        round: &mut ClientRound<'_>,
        check_in: &CheckIn,
        gate: &mut (dyn TaskGate + Send),
        now: &(dyn Fn() -> Instant + Sync),
    ) -> Result<Option<Participation>, NetError> {
        while let Some(msg) = round.poll_transmit() {
            let mut request = Request::from_client_message(&msg, check_in, self.nonce()?);
            let response = loop {
                let response = match &msg {
                    ClientMessage::AdvertiseKeys { .. }
                    | ClientMessage::EncryptedShares { .. }
                    | ClientMessage::MaskedInput { .. } => {
                        let until = round.poll_timeout().unwrap_or(now()).saturating_duration_since(now());
                        session.request_within(&request, until.max(self.cfg.timeout)).await?
                    }
                    _ => session.request(&request).await?,
                };
                // The coordinator had no memory for this upload yet (pace steering): send the
                // same message again after its hint, within the round, on the same connection.
                // Starting over would lose a secure round's keys and shares.
                // (A check-in told Busy is the participation's to retry, with its attempts.)
                let busy = matches!(&response, Response::Error { code: ErrorCode::Busy, .. })
                    && !matches!(msg, ClientMessage::CheckIn);
                let left = round.poll_timeout().unwrap_or(now()).saturating_duration_since(now());
                match response.error_retry_after() {
                    Some(hint) if busy && hint < left => {
                        tokio::time::sleep(RetryPolicy::after_hint(hint, Duration::ZERO, self.jitter()?))
                            .await;
                        request = Request::from_client_message(&msg, check_in, self.nonce()?);
                    }
                    _ => break response,
                }
            };
            if let Response::NotSelected { .. } = &response {
                let retry_after = response.retry_after().unwrap_or_default();
                return Ok(Some(Participation::NotSelected { retry_after }));
            }
            let offered = match &response {
                Response::Task(task) => Some(task),
                Response::CompactTask(compact) => Some(&compact.task),
                _ => None,
            };
            if let Some(task) = offered {
                // The policy decides before the model is decoded or anything is trained.
                let offer = TaskOffer {
                    round: task.round,
                    model_version: task.model_version,
                    privacy: task.task_privacy()?,
                };
                if let Err(reason) = gate.admit(&offer) {
                    return Ok(Some(Participation::PolicyRefused { round: task.round, reason }));
                }
            }
            let retry_after = response.error_retry_after();
            match response.into_inbound(self.cached.as_ref())? {
                Inbound::Message(msg) => {
                    if let ServerMessage::Selected { model, task } = &msg {
                        // A round's item subset is not the catalogue: the cached full model
                        // (for offline recommendations) stays.
                        if model.subset().is_none() {
                            self.cached = Some(Arc::clone(model));
                        }
                        self.task_params = Some(task.train);
                    }
                    // A subset round: the device reconstructs its user vector from the full
                    // model it holds (all its interactions), as the simulator's `--reconstruct
                    // cache` does; without one, from the round's rows.
                    let msg = match (msg, &self.cached) {
                        (ServerMessage::Selected { model, task }, Some(cached))
                            if model
                                .subset()
                                .is_some_and(|s| s.n_items() == cached.model.shape().n_items) =>
                        {
                            let model = Arc::new((*model).clone().with_reference(Arc::clone(cached)));
                            ServerMessage::Selected { model, task }
                        }
                        (msg, _) => msg,
                    };
                    // Training runs here, on the caller's task: a device trains one small
                    // user at a time.
                    round.handle_message(now(), msg);
                    // A distributed round's exact price is known now (share-keys): the record
                    // is topped up to it before the shares go out, or the round ends here.
                    if let Some(charge) = round.take_distributed_charge()
                        && let Err(reason) = gate.reprice(&charge)
                    {
                        return Ok(Some(Participation::PolicyRefused { round: charge.round, reason }));
                    }
                }
                Inbound::Finished { model_version, model } => {
                    match model {
                        Some(model) => self.cached = Some(model),
                        // The final model is left out only for a device that holds it.
                        None if self.cached.as_ref().map(|m| m.version) != Some(model_version) => {
                            return Err(NetError::PeerMisbehaved(WireError::Invalid(
                                "finished without the final model, which the device does not hold".into(),
                            )));
                        }
                        None => {}
                    }
                    return Ok(Some(Participation::Finished { model_version }));
                }
                Inbound::Error { code, message } => match code.rejection() {
                    Some(reason) => {
                        if let Some(r) = pending_round(&request) {
                            round.handle_message(now(), ServerMessage::Rejected { round: r, reason });
                        }
                    }
                    None => return Err(NetError::Refused { code, message, retry_after }),
                },
            }
            round.handle_timeout(now());
        }
        Ok(None)
    }
}

/// A fresh generator for one round's secure-aggregation secrets (keys, self-mask seed,
/// shares, stochastic rounding), seeded by the operating system: what
/// [`ClientRound::with_rng`] needs from a real device.
pub fn secure_rng() -> rand_chacha::ChaCha20Rng {
    use rand::SeedableRng;
    rand_chacha::ChaCha20Rng::from_os_rng()
}

/// The device's QUIC configuration: TLS 1.3 only (ring), ALPN `fedrec/1`, and `server_cert`
/// (DER) as the only trusted certificate. Public so that benchmarks measure the transport
/// with exactly the settings devices use.
pub fn quic_client_config(server_cert: &[u8]) -> Result<quinn::ClientConfig, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(server_cert.to_vec()))
        .map_err(|e| NetError::Setup(format!("server certificate: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Setup(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    // A secure-aggregation request waits for its phase to close, possibly longer than the
    // connection's idle timeout: PINGs keep the connection alive meanwhile.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// How often an otherwise silent connection sends a PING (well under the coordinator's idle
/// timeout, twice its read timeout: 20 s by default).
const KEEP_ALIVE: Duration = Duration::from_secs(4);

/// A failed connection attempt: a TLS failure on either side (a QUIC `CRYPTO_ERROR`, codes
/// 0x100–0x1ff, which carry a TLS alert) is permanent, anything else may pass.
fn connection_error(e: quinn::ConnectionError) -> NetError {
    match &e {
        quinn::ConnectionError::TransportError(t) if crypto(t.code.into()) => NetError::Tls(e.to_string()),
        quinn::ConnectionError::ConnectionClosed(c) if crypto(c.error_code.into()) => {
            NetError::Tls(e.to_string())
        }
        _ => NetError::Connection(e.to_string()),
    }
}

/// Whether a QUIC transport error code is a `CRYPTO_ERROR` (RFC 9001 §4.8: 0x100 + a TLS alert).
fn crypto(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

/// The round an upload request is for.
fn pending_round(request: &Request) -> Option<u64> {
    request.round()
}

/// One connection to the coordinator.
#[derive(Debug)]
pub struct Session {
    conn: quinn::Connection,
    limits: Limits,
    timeout: Duration,
}

impl Session {
    /// Sends `request` on a fresh stream and reads the response, within the timeout and the limits.
    pub async fn request(&self, request: &Request) -> Result<Response, NetError> {
        self.request_within(request, self.timeout).await
    }

    /// [`Session::request`] with its own timeout (a secure-aggregation request waits for its
    /// phase to close).
    pub async fn request_within(&self, request: &Request, timeout: Duration) -> Result<Response, NetError> {
        let frame = wire::encode(request)?;
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
            send.write_all(&frame).await.map_err(|e| self.lost(e))?;
            send.finish().map_err(|e| self.lost(e))?;
            let mut prefix = [0u8; LEN_PREFIX];
            recv.read_exact(&mut prefix).await.map_err(|e| self.lost(e))?;
            let len = wire::frame_len(prefix, self.limits.max_response())?;
            let mut payload = vec![0u8; len];
            recv.read_exact(&mut payload).await.map_err(|e| self.lost(e))?;
            Ok::<_, NetError>(wire::decode_response(&payload, &self.limits)?)
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| NetError::Timeout)?
    }

    /// The error for a failed stream operation: the coordinator's refusal if it closed the
    /// connection with an error code (e.g. [`ErrorCode::CutOff`]), else a lost connection.
    fn lost(&self, e: impl std::fmt::Display) -> NetError {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close)) if close.error_code.into_inner() != 0 => {
                let code =
                    u16::try_from(close.error_code.into_inner()).map_or(ErrorCode::Unknown, ErrorCode::from);
                NetError::Refused {
                    code,
                    message: "the coordinator closed the connection".into(),
                    retry_after: None,
                }
            }
            _ => NetError::Connection(e.to_string()),
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 10,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };

    #[test]
    fn backoff_stays_between_half_and_all_of_the_doubling_base() {
        for retry in 0..4 {
            let base = Duration::from_millis(100 << retry);
            assert_eq!(POLICY.backoff(retry, 0.0), base / 2, "retry {retry}");
            let top = POLICY.backoff(retry, 0.999_999);
            assert!(top <= base && top > base.mul_f64(0.99), "retry {retry}: {top:?}");
            let mid = POLICY.backoff(retry, 0.5);
            assert_eq!(mid, base.mul_f64(0.75), "retry {retry}");
        }
    }

    #[test]
    fn backoff_grows_then_is_capped() {
        let lows: Vec<Duration> = (0..8).map(|k| POLICY.backoff(k, 0.0)).collect();
        assert!(lows.windows(2).all(|w| w[0] <= w[1]), "{lows:?}");
        // 100 ms · 2^4 = 1.6 s is past the 1 s cap.
        for retry in [4, 5, 31, 32, 1000, u32::MAX] {
            assert!(POLICY.backoff(retry, 0.999) <= POLICY.max_backoff, "retry {retry}");
            assert_eq!(POLICY.backoff(retry, 0.0), POLICY.max_backoff / 2, "retry {retry}");
        }
        // Out-of-range jitter is clamped, never a panic or a longer wait.
        for jitter in [-1.0, 2.0, f64::NAN, f64::INFINITY] {
            assert!(POLICY.backoff(0, jitter) <= POLICY.initial_backoff, "{jitter}");
        }
        assert_eq!(RetryPolicy::NONE.backoff(3, 0.5), Duration::ZERO);
    }

    #[test]
    fn transient_and_permanent_failures() {
        let refused = |code| NetError::Refused { code, message: String::new(), retry_after: None };
        assert!(NetError::Connection("lost".into()).is_transient());
        assert!(NetError::Timeout.is_transient());
        assert!(refused(ErrorCode::RateLimited).is_transient());
        assert!(refused(ErrorCode::Internal).is_transient());
        // Pace steering: the coordinator is at capacity and says when to come back.
        assert!(refused(ErrorCode::Busy).is_transient());
        assert_eq!(refused(ErrorCode::Busy).refusal(), Some(ErrorCode::Busy));
        // A certificate that is not the pinned one stays so however often it is retried.
        assert!(!NetError::Tls("invalid peer certificate: UnknownIssuer".into()).is_transient());
        assert!(!NetError::Setup("x".into()).is_transient());
        for code in
            [ErrorCode::BadToken, ErrorCode::VersionMismatch, ErrorCode::NotEligible, ErrorCode::CutOff]
        {
            assert!(!refused(code).is_transient(), "{code}");
            assert_eq!(refused(code).refusal(), Some(code));
        }
        assert!(!NetError::PeerMisbehaved(WireError::Malformed("x".into())).is_transient());
        assert!(!NetError::Cancelled.is_transient());
        assert!(!NetError::BudgetExceeded.is_transient());
    }

    #[test]
    fn a_retry_hint_is_honoured_with_up_to_ten_percent_of_jitter() {
        let hint = Duration::from_secs(2);
        let small = Duration::from_millis(100);
        assert_eq!(RetryPolicy::after_hint(hint, small, 0.0), hint);
        assert_eq!(RetryPolicy::after_hint(hint, small, 0.5), Duration::from_millis(2100));
        let top = RetryPolicy::after_hint(hint, small, 0.999_999);
        assert!(top > Duration::from_millis(2199) && top <= Duration::from_millis(2200), "{top:?}");
        // Never shorter than the backoff; never a panic on odd input.
        assert_eq!(RetryPolicy::after_hint(small, hint, 0.3), hint);
        for jitter in [-1.0, 2.0, f64::NAN, f64::INFINITY] {
            assert!(RetryPolicy::after_hint(hint, small, jitter) <= Duration::from_millis(2200), "{jitter}");
        }
        assert_eq!(RetryPolicy::after_hint(Duration::MAX, small, 0.9), Duration::MAX);
    }

    #[test]
    fn tls_alerts_are_crypto_errors_and_other_transport_errors_are_not() {
        // bad_certificate (42), unknown_ca (48), no_application_protocol (120).
        for alert in [42u8, 48, 120] {
            assert!(crypto(quinn::TransportErrorCode::crypto(alert).into()), "{alert}");
        }
        for code in
            [quinn::TransportErrorCode::CONNECTION_REFUSED, quinn::TransportErrorCode::PROTOCOL_VIOLATION]
        {
            assert!(!crypto(code.into()), "{code:?}");
        }
        assert!(matches!(connection_error(quinn::ConnectionError::TimedOut), NetError::Connection(_)));
        assert!(matches!(connection_error(quinn::ConnectionError::Reset), NetError::Connection(_)));
    }

    #[test]
    fn eligibility_is_sent_as_capability_bits() {
        assert_eq!(Eligibility::default().capabilities(), 0);
        let all = Eligibility { charging: true, unmetered: true, idle: true };
        assert_eq!(all.capabilities(), CheckIn::CHARGING | CheckIn::UNMETERED | CheckIn::IDLE);
        assert_eq!(
            Eligibility { unmetered: true, ..Eligibility::default() }.capabilities(),
            CheckIn::UNMETERED
        );
    }

    #[tokio::test]
    async fn a_cancel_token_wakes_every_clone() {
        let token = CancelToken::new();
        let clone = token.clone();
        assert!(!clone.is_cancelled());
        let waiter = tokio::spawn(async move { clone.cancelled().await });
        token.cancel();
        waiter.await.expect("the waiter ends");
        assert!(token.is_cancelled());
        // Already cancelled: returns at once.
        token.cancelled().await;
    }

    #[tokio::test]
    async fn a_cached_model_is_announced_at_check_in_unless_it_is_too_large() {
        let cfg = test_config(SocketAddr::from(([127, 0, 0, 1], 9)), Duration::from_secs(1));
        let shape = cfg.shape;
        let model = |n_items| {
            let shape = ModelShape { n_items, ..shape };
            let flat = |n| vec![0.0f32; n];
            let global =
                fedrec_shared::GlobalModel::from_flat(shape, flat(n_items * 2), flat(n_items), 0.0, flat(2))
                    .expect("a valid model");
            Arc::new(RoundModel::new(7, global))
        };
        let device = Device::new(cfg.clone()).expect("a device").with_cached_model(model(3));
        assert_eq!(device.check_in().cached_model_version, Some(7));
        let device = Device::new(cfg).expect("a device").with_cached_model(model(4));
        assert_eq!(device.check_in().cached_model_version, None);
    }

    #[tokio::test]
    async fn budgets_and_backoffs_too_large_to_add_do_not_panic() {
        // A silent "coordinator": the first attempt times out (transient), and the retry's
        // backoff of Duration::MAX is past any budget, so the call returns that error.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let cfg = test_config(socket.local_addr().expect("an address"), Duration::from_millis(200));
        let mut device = Device::new(cfg).expect("a device");
        let opts = ParticipateOptions {
            time_budget: Duration::MAX,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::MAX,
                max_backoff: Duration::MAX,
            },
            eligibility: Eligibility::default(),
        };
        let err = device.participate_with(&[], &opts, &CancelToken::new()).await.expect_err("no coordinator");
        assert!(matches!(err, NetError::Timeout), "{err:?}");
    }

    /// A device configuration for `server` with a throwaway certificate and token.
    fn test_config(server: SocketAddr, timeout: Duration) -> NetConfig {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
        NetConfig {
            server,
            server_name: "localhost".into(),
            server_cert: cert.cert.der().to_vec(),
            token: vec![1],
            sdk_version: "test".into(),
            shape: ModelShape { n_items: 3, dim: 2, n_segments: 1 },
            timeout,
        }
    }
}
