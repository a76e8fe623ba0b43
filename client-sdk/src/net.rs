//! The device's network driver: connects to the coordinator over QUIC (TLS 1.3, pinned certificate, ALPN `fedrec/1`) and drives one [`ClientRound`] per participation.
//!
//! A [`Device`] keeps its QUIC endpoint and the last model it downloaded, so a task for a
//! model it already holds arrives without the model. Each participation opens one
//! connection: a check-in stream, then, if selected, an upload stream. Every read has a
//! timeout; whatever the coordinator sends is decoded within the [`Limits`] of the model
//! shape the device was built for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedrec_shared::round::{ClientOutcome, ClientRound, Instant, ServerMessage};
use fedrec_shared::wire::{
    self, ALPN, CheckIn, ErrorCode, Inbound, LEN_PREFIX, Limits, NONCE_LEN, Request, Response, WireError,
};
use fedrec_shared::{ModelShape, Rating, RoundModel};
use quinn::crypto::rustls::QuicClientConfig;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;

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
    /// The coordinator did not answer in time.
    #[error("timed out waiting for the coordinator")]
    Timeout,
    /// The coordinator sent something the protocol does not allow.
    #[error("the coordinator misbehaved: {0}")]
    PeerMisbehaved(#[from] WireError),
    /// The coordinator refused a request with an error code.
    #[error("refused by the coordinator ({code}): {message}")]
    Refused {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// The secure random number generator failed.
    #[error("the random number generator failed")]
    Rng,
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
}

/// One device: its endpoint, its configuration and its cached model.
#[derive(Debug)]
pub struct Device {
    cfg: NetConfig,
    endpoint: quinn::Endpoint,
    limits: Limits,
    cached: Option<Arc<RoundModel>>,
    rng: SystemRandom,
}

impl Device {
    /// Builds the QUIC client endpoint; needs a running tokio runtime.
    pub fn new(cfg: NetConfig) -> Result<Device, NetError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(cfg.server_cert.clone()))
            .map_err(|e| NetError::Setup(format!("server certificate: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| NetError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Setup(e.to_string()))?;
        let bind: SocketAddr = if cfg.server.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| NetError::Setup(e.to_string()))?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let limits = Limits::for_shape(&cfg.shape);
        Ok(Device { cfg, endpoint, limits, cached: None, rng: SystemRandom::new() })
    }

    /// The model the device holds, if any.
    pub fn cached_model(&self) -> Option<&Arc<RoundModel>> {
        self.cached.as_ref()
    }

    /// Opens a session with the coordinator (for callers that send requests themselves).
    pub async fn connect(&self) -> Result<Session, NetError> {
        let connecting = self
            .endpoint
            .connect(self.cfg.server, &self.cfg.server_name)
            .map_err(|e| NetError::Connection(e.to_string()))?;
        let conn = tokio::time::timeout(self.cfg.timeout, connecting)
            .await
            .map_err(|_| NetError::Timeout)?
            .map_err(|e| NetError::Connection(e.to_string()))?;
        Ok(Session { conn, limits: self.limits, timeout: self.cfg.timeout })
    }

    /// The check-in this device sends.
    pub fn check_in(&self) -> CheckIn {
        CheckIn {
            token: self.cfg.token.clone(),
            sdk_version: self.cfg.sdk_version.clone(),
            capabilities: 0,
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
    /// the clipped update. The ratings never leave the device.
    pub async fn participate(&mut self, ratings: &[Rating]) -> Result<Participation, NetError> {
        let session = self.connect().await?;
        let result = self.participate_in(&session, ratings).await;
        session.close();
        result
    }

    async fn participate_in(
        &mut self,
        session: &Session,
        ratings: &[Rating],
    ) -> Result<Participation, NetError> {
        // The machine's clock: time since this participation began.
        let start = tokio::time::Instant::now();
        let now = || Instant::from_micros(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
        let deadline = now().saturating_add(self.cfg.timeout.saturating_mul(4));
        let mut round = ClientRound::new(ratings, deadline);
        let check_in = self.check_in();
        while let Some(msg) = round.poll_transmit() {
            let request = Request::from_client_message(&msg, &check_in, self.nonce()?);
            let response = session.request(&request).await?;
            if let Response::NotSelected { .. } = &response {
                let retry_after = response.retry_after().unwrap_or_default();
                return Ok(Participation::NotSelected { retry_after });
            }
            match response.into_inbound(self.cached.as_ref())? {
                Inbound::Message(msg) => {
                    if let ServerMessage::Selected { model, .. } = &msg {
                        self.cached = Some(Arc::clone(model));
                    }
                    // Training runs here, on the caller's task: a device trains one small
                    // user at a time.
                    round.handle_message(now(), msg);
                }
                Inbound::Error { code, message } => match code.rejection() {
                    Some(reason) => {
                        if let Some(r) = pending_round(&request) {
                            round.handle_message(now(), ServerMessage::Rejected { round: r, reason });
                        }
                    }
                    None => return Err(NetError::Refused { code, message }),
                },
            }
            round.handle_timeout(now());
        }
        match round.outcome() {
            Some(outcome) => Ok(Participation::Outcome(outcome.clone())),
            None => Err(NetError::PeerMisbehaved(WireError::Invalid(
                "the coordinator's answer did not end the round".into(),
            ))),
        }
    }
}

/// The round an upload request is for.
fn pending_round(request: &Request) -> Option<u64> {
    match request {
        Request::Upload(u) => Some(u.round),
        Request::CheckIn(_) => None,
    }
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
        let frame = wire::encode(request)?;
        let exchange = async {
            let (mut send, mut recv) =
                self.conn.open_bi().await.map_err(|e| NetError::Connection(e.to_string()))?;
            send.write_all(&frame).await.map_err(|e| NetError::Connection(e.to_string()))?;
            send.finish().map_err(|e| NetError::Connection(e.to_string()))?;
            let mut prefix = [0u8; LEN_PREFIX];
            recv.read_exact(&mut prefix).await.map_err(|e| NetError::Connection(e.to_string()))?;
            let len = wire::frame_len(prefix, self.limits.max_response())?;
            let mut payload = vec![0u8; len];
            recv.read_exact(&mut payload).await.map_err(|e| NetError::Connection(e.to_string()))?;
            Ok::<_, NetError>(wire::decode_response(&payload, &self.limits)?)
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| NetError::Timeout)?
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}
