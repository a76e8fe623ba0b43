//! The QUIC server: accepts devices over QUIC (TLS 1.3, ALPN `fedrec/1`), checks their tokens and uploads, and drives the coordinator round machine from one owning task.
//!
//! # Tasks
//!
//! - The **owner** task holds the [`Coordinator`], the [`Verifier`] and the [`ReplayGuard`]:
//!   every piece of round state has this one owner. It opens rounds (a configurable gap after
//!   the previous one closes), calls `handle_timeout` at the machine's deadlines, and answers
//!   the requests the stream tasks forward to it.
//! - The **accept** loop spawns a task per connection, which spawns a task per bidirectional
//!   stream. A stream carries one request and its response: the stream task reads the frame
//!   (length prefix checked against [`Limits::max_request`] before the payload is read, every
//!   read under a timeout), decodes it, sends it to the owner with a oneshot reply channel,
//!   writes the encoded answer and finishes the stream.
//!
//! A peer that sends something invalid gets an error response with the matching code; the
//! server keeps serving everyone else. Round closes are published on a
//! [`tokio::sync::watch`] channel ([`Server::status`]) so that callers can await them.
//!
//! # Limits
//!
//! - **Connections:** at most [`ServeConfig::max_connections`] at once. Each connection task
//!   holds an owned semaphore permit (as mini-redis does); an incoming connection when none
//!   is left is refused at once (QUIC `CONNECTION_REFUSED`) and counted as
//!   `fedrec_rejected_total{reason="connection_cap"}`.
//! - **Misbehaving peers:** a refusal that no honest device provokes (malformed or
//!   oversized frames, a wrong protocol version, forged or malformed tokens, replays,
//!   uploads without a check-in, updates of the wrong shape, non-finite or above the clip
//!   norm) is a strike against its connection. At [`ServeConfig::max_invalid_requests`]
//!   strikes the connection is closed with the application error code
//!   [`ErrorCode::CutOff`] and counted as `reason="cut_off"`. Refusals an honest device can
//!   meet (not selected, rate limited, not eligible, an expired or revoked token, a late
//!   upload) are never strikes.
//! - **Daily quota:** a device is selected for at most
//!   [`ServeConfig::rounds_per_device_per_day`] rounds per UTC day ([`DailyQuota`]). The
//!   quota counts *selections*, the rounds a device takes part in; a device that checks in
//!   and is not selected uses none of it. A device at its quota is refused at check-in with
//!   [`ErrorCode::RateLimited`] and a retry hint until the next UTC midnight. The counts live
//!   in memory: a restart resets them.
//! - **Eligibility:** a check-in whose capability bits ([`CheckIn::capabilities`]) do not
//!   meet the [`EligibilityPolicy`] is refused with [`ErrorCode::NotEligible`] before the
//!   round machine sees it, so an ineligible device is never selected (and uses no quota).
//!
//! # Persistence
//!
//! With a [`Store`] ([`ServeConfig::store`]) the server resumes from the store's newest
//! checkpoint, or saves its starting state to a fresh store. The owner writes every committed
//! round ([`Store::commit_round`]) *before* it publishes the close or opens the next round;
//! if that write fails the server stops with [`ServerError::Store`] rather than run on with a
//! round that is not on disk. Abandoned rounds are recorded too. When the privacy budget
//! refuses the next round, the server stops opening rounds and says why in
//! [`ServerStatus::start_refused`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedrec_shared::round::{
    ClientId, ClientMessage, Coordinator, CoordinatorConfig, CoordinatorEvent, Instant, StartError,
};
use fedrec_shared::wire::{self, ALPN, CheckIn, ErrorCode, LEN_PREFIX, Limits, Request, Response, WireError};
use fedrec_shared::{GlobalModel, ParamError, RoundModel};
use quinn::crypto::rustls::QuicServerConfig;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::auth::{AuthError, DailyQuota, DeviceId, ReplayGuard, ReplayLimits, Verifier};
use crate::metrics::{ServerMetrics, serve_http};
use crate::store::{Store, StoreError};

/// The server's TLS identity.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TlsIdentity {
    /// A fresh self-signed certificate for these DNS names (devices pin it).
    SelfSigned {
        /// Subject alternative names, e.g. `localhost`.
        names: Vec<String>,
    },
    /// A certificate chain and its PKCS#8 private key, DER-encoded.
    Der {
        /// The chain, leaf first.
        chain: Vec<Vec<u8>>,
        /// The leaf's private key (PKCS#8).
        key: Vec<u8>,
    },
}

/// Default of [`ServeConfig::read_timeout`] (also the connections' idle timeout).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServeConfig::max_streams_per_connection`].
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 4;
/// Default of [`ServeConfig::rounds_per_device_per_day`].
pub const DEFAULT_ROUNDS_PER_DEVICE_PER_DAY: u32 = 24;
/// Default of [`ServeConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of [`ServeConfig::max_invalid_requests`].
pub const DEFAULT_MAX_INVALID_REQUESTS: u32 = 3;

/// Which device states the coordinator accepts at check-in, as the capability bits of
/// [`CheckIn`] report them. The default requires nothing: the host app owns scheduling and
/// should only call for participation when the device is charging, on an unmetered network
/// and idle; the policy is a second line of defence against apps that do not. The bits are
/// the device's own claim: the coordinator cannot verify them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EligibilityPolicy {
    /// Refuse devices that are not charging ([`CheckIn::CHARGING`]).
    pub require_charging: bool,
    /// Refuse devices on a metered network ([`CheckIn::UNMETERED`]).
    pub require_unmetered: bool,
    /// Refuse devices that are in use ([`CheckIn::IDLE`]).
    pub require_idle: bool,
}

impl EligibilityPolicy {
    /// The capability bits a check-in must carry.
    pub fn required_bits(&self) -> u32 {
        let bit = |on: bool, bit: u32| if on { bit } else { 0 };
        bit(self.require_charging, CheckIn::CHARGING)
            | bit(self.require_unmetered, CheckIn::UNMETERED)
            | bit(self.require_idle, CheckIn::IDLE)
    }

    /// Whether a check-in with these capability bits is eligible.
    pub fn admits(&self, capabilities: u32) -> bool {
        let required = self.required_bits();
        capabilities & required == required
    }
}

/// Everything [`Server::bind`] needs.
#[derive(Debug)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The TLS identity.
    pub tls: TlsIdentity,
    /// The round machine's configuration.
    pub coordinator: CoordinatorConfig,
    /// The starting model (of a fresh store; a store's checkpoint must have its shape).
    pub model: GlobalModel,
    /// Checks the devices' enrollment tokens.
    pub verifier: Verifier,
    /// Limits of the upload replay guard.
    pub replay_limits: ReplayLimits,
    /// Time between the close of one round and the start of the next.
    pub round_gap: Duration,
    /// Longest wait for a request's bytes, and the idle timeout of a connection.
    pub read_timeout: Duration,
    /// The retry hint sent with `NotSelected`.
    pub retry_after: Duration,
    /// Most bidirectional streams a connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Where rounds are persisted; `None` keeps everything in memory.
    pub store: Option<Store>,
    /// Where the Prometheus metrics are served over HTTP (`GET /metrics`); `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// The signed context ruleset devices fetch; `None` answers that there is none.
    pub rules: Option<Arc<crate::rules::PublishedRuleset>>,
    /// Most rounds a device may be selected for per UTC day (0 refuses every device).
    pub rounds_per_device_per_day: u32,
    /// Most concurrent connections; more are refused.
    pub max_connections: usize,
    /// Strikes (refusals that only a misbehaving peer provokes) after which a connection is
    /// closed with [`ErrorCode::CutOff`]; 0 never closes one.
    pub max_invalid_requests: u32,
    /// The device states accepted at check-in.
    pub eligibility: EligibilityPolicy,
    /// Seed of the coordinator's RNG; `None` (always, outside simulations) draws it from the
    /// operating system. Set only through [`crate::danger::seed_coordinator_rng`].
    pub(crate) insecure_seed: Option<u64>,
}

impl ServeConfig {
    /// A configuration with the defaults: a self-signed certificate for `localhost`, default
    /// replay limits, a gap of 100 ms between rounds, reads timing out after 10 s, a retry
    /// hint of 1 s, 4 concurrent streams per connection, no store, no metrics endpoint,
    /// [`DEFAULT_ROUNDS_PER_DEVICE_PER_DAY`], [`DEFAULT_MAX_CONNECTIONS`],
    /// [`DEFAULT_MAX_INVALID_REQUESTS`] and no eligibility requirement.
    pub fn new(
        listen: SocketAddr,
        coordinator: CoordinatorConfig,
        model: GlobalModel,
        verifier: Verifier,
    ) -> Self {
        Self {
            listen,
            tls: TlsIdentity::SelfSigned { names: vec!["localhost".to_owned()] },
            coordinator,
            model,
            verifier,
            replay_limits: ReplayLimits::default(),
            round_gap: Duration::from_millis(100),
            read_timeout: DEFAULT_READ_TIMEOUT,
            retry_after: Duration::from_secs(1),
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            store: None,
            metrics_listen: None,
            rules: None,
            rounds_per_device_per_day: DEFAULT_ROUNDS_PER_DEVICE_PER_DAY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_invalid_requests: DEFAULT_MAX_INVALID_REQUESTS,
            eligibility: EligibilityPolicy::default(),
            insecure_seed: None,
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The coordinator configuration or model is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ParamError),
    /// The certificate could not be generated or used.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The socket could not be bound.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    /// The store could not be read or a round could not be written to it.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The store's checkpoint does not fit the configured model.
    #[error("the stored model has shape {stored:?}, the configuration {configured:?}")]
    ShapeMismatch {
        /// The checkpoint's shape.
        stored: fedrec_shared::ModelShape,
        /// The configured shape.
        configured: fedrec_shared::ModelShape,
    },
}

/// What the server has done so far, published after every round close.
#[derive(Debug, Clone)]
pub struct ServerStatus {
    /// Rounds committed since the server started.
    pub n_committed: u64,
    /// Rounds abandoned since the server started.
    pub n_abandoned: u64,
    /// The current model.
    pub model: Arc<RoundModel>,
    /// The event that closed the latest round.
    pub last_close: Option<CoordinatorEvent>,
    /// Index of the next round to open (after a restart, where the store left off).
    pub next_round: u64,
    /// Entries in the privacy ledger (committed rounds that were charged, ever).
    pub n_ledger_entries: usize,
    /// Why the server stopped opening rounds (the privacy budget is spent), if it did.
    pub start_refused: Option<StartError>,
}

/// A bound server, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    cert_der: Vec<u8>,
    owner: Owner,
    status_rx: watch::Receiver<ServerStatus>,
    limits: Limits,
    read_timeout: Duration,
    max_connections: usize,
    max_invalid_requests: u32,
    metrics: Arc<ServerMetrics>,
    metrics_listener: Option<std::net::TcpListener>,
    metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Validates the configuration, builds the TLS identity and binds the UDP socket.
    pub fn bind(cfg: ServeConfig) -> Result<Server, ServerError> {
        let shape = cfg.model.shape();
        let limits = Limits::for_shape(&shape);
        let rng = cfg.insecure_seed.map_or_else(StdRng::from_os_rng, crate::danger::seeded_std_rng);
        let mut store = cfg.store;
        let coordinator = match store.as_mut() {
            None => Coordinator::new(cfg.coordinator, cfg.model, rng)?,
            Some(store) => match store.load_latest()? {
                Some(state) => {
                    let stored = state.model.shape();
                    if stored != shape {
                        return Err(ServerError::ShapeMismatch { stored, configured: shape });
                    }
                    Coordinator::restore(cfg.coordinator, state, rng)?
                }
                None => {
                    let coordinator = Coordinator::new(cfg.coordinator, cfg.model, rng)?;
                    let state = coordinator.state().expect("no round is open before the first start");
                    store.save_initial(&state, unix_ms())?;
                    coordinator
                }
            },
        };
        let (chain, key) = identity(cfg.tls)?;
        let cert_der =
            chain.first().map(|c| c.to_vec()).ok_or_else(|| ServerError::Tls("empty chain".into()))?;
        let server_config = quic_server_config(chain, key, cfg.max_streams_per_connection, cfg.read_timeout)?;
        let endpoint = quinn::Endpoint::server(server_config, cfg.listen)?;
        let local_addr = endpoint.local_addr()?;
        let status = ServerStatus {
            n_committed: 0,
            n_abandoned: 0,
            model: Arc::clone(coordinator.model()),
            last_close: None,
            next_round: coordinator.state().map_or(0, |s| s.next_round),
            n_ledger_entries: coordinator.ledger().entries().len(),
            start_refused: None,
        };
        let (status_tx, status_rx) = watch::channel(status);
        let metrics = Arc::new(ServerMetrics::new());
        metrics.model_version.set(coordinator.model().version as f64);
        let metrics_listener = match cfg.metrics_listen {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(std::net::TcpListener::local_addr).transpose()?;
        let owner = Owner {
            coordinator,
            verifier: cfg.verifier,
            replay: ReplayGuard::new(cfg.replay_limits),
            round_gap: cfg.round_gap,
            retry_after: cfg.retry_after,
            status: status_tx,
            sessions: HashMap::new(),
            store,
            metrics: Arc::clone(&metrics),
            quota: DailyQuota::new(cfg.rounds_per_device_per_day),
            eligibility: cfg.eligibility,
            rules: cfg.rules,
        };
        owner.update_epsilon();
        Ok(Server {
            endpoint,
            local_addr,
            cert_der,
            owner,
            status_rx,
            limits,
            read_timeout: cfg.read_timeout,
            max_connections: cfg.max_connections.min(Semaphore::MAX_PERMITS),
            max_invalid_requests: cfg.max_invalid_requests,
            metrics,
            metrics_listener,
            metrics_addr,
        })
    }

    /// The address the metrics endpoint listens on, if one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The server's metrics (what `GET /metrics` renders).
    pub fn metrics(&self) -> Arc<ServerMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The DER certificate devices pin.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A receiver of the server's status, updated at every round close.
    pub fn status(&self) -> watch::Receiver<ServerStatus> {
        self.status_rx.clone()
    }

    /// Serves until `shutdown` completes, then closes every connection and returns.
    ///
    /// Returns early with an error if the owner fails (a round could not be persisted).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            endpoint,
            owner,
            limits,
            read_timeout,
            max_connections,
            max_invalid_requests,
            metrics,
            metrics_listener,
            ..
        } = self;
        let metrics_task = match metrics_listener {
            Some(listener) => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                Some(tokio::spawn(serve_http(listener, Arc::clone(&metrics))))
            }
            None => None,
        };
        let (req_tx, req_rx) = mpsc::channel::<Command>(256);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut owner_task = tokio::spawn(owner.run(req_rx, stop_rx));
        let ctx = Arc::new(StreamCtx {
            limits,
            read_timeout,
            requests: req_tx,
            metrics,
            max_invalid_requests,
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
        });
        let mut owner_result = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                result = &mut owner_task => {
                    owner_result = Some(result);
                    break;
                }
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    match Arc::clone(&ctx.connections).try_acquire_owned() {
                        Ok(permit) => {
                            ctx.count_connections();
                            tokio::spawn(serve_connection(incoming, Arc::clone(&ctx), permit));
                        }
                        Err(_) => {
                            ctx.metrics.rejected("connection_cap");
                            tracing::warn!(reason = "connection_cap", "refused a connection");
                            incoming.refuse();
                        }
                    }
                }
            }
        }
        endpoint.close(0u32.into(), b"shutting down");
        // The owner stops even while stream tasks still hold request senders.
        let _ = stop_tx.send(true);
        drop(ctx);
        let owner_result = match owner_result {
            Some(r) => r,
            None => owner_task.await,
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        if let Some(task) = metrics_task {
            task.abort();
        }
        match owner_result {
            Ok(result) => result,
            // The owner panicked: re-raise it here rather than report a clean stop.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// The server's QUIC configuration: TLS 1.3 only (ring), ALPN `fedrec/1`, at most
/// `max_streams` concurrent bidirectional streams and no unidirectional ones per connection,
/// and `read_timeout` as the idle timeout. Public so that benchmarks measure the transport
/// with exactly the settings the coordinator runs with.
pub fn quic_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    max_streams: u32,
    read_timeout: Duration,
) -> Result<quinn::ServerConfig, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(max_streams.into());
    transport.max_concurrent_uni_streams(0u32.into());
    let idle = quinn::IdleTimeout::try_from(read_timeout)
        .map_err(|_| ServerError::Tls("read timeout too long for an idle timeout".into()))?;
    transport.max_idle_timeout(Some(idle));
    server_config.transport_config(Arc::new(transport));
    Ok(server_config)
}

/// The certificate chain and key of `tls`.
fn identity(tls: TlsIdentity) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerError> {
    match tls {
        TlsIdentity::SelfSigned { names } => {
            let certified =
                rcgen::generate_simple_self_signed(names).map_err(|e| ServerError::Tls(e.to_string()))?;
            let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
            Ok((vec![certified.cert.der().clone()], key.into()))
        }
        TlsIdentity::Der { chain, key } => {
            Ok((chain.into_iter().map(CertificateDer::from).collect(), PrivatePkcs8KeyDer::from(key).into()))
        }
    }
}

/// What connection and stream tasks tell the owner.
#[derive(Debug)]
enum Command {
    /// A request on connection `conn`, with the channel for its answer.
    Request { conn: usize, request: Request, reply: oneshot::Sender<Reply> },
    /// Connection `conn` is gone: forget which device it was.
    Closed { conn: usize },
}

/// The owner's answer to a request, and whether the request was a strike against its
/// connection (see [`is_misbehaviour`]).
#[derive(Debug)]
struct Reply {
    response: Response,
    misbehaved: bool,
}

impl Reply {
    /// An answer that is no strike.
    fn ok(response: Response) -> Self {
        Self { response, misbehaved: false }
    }

    /// A refusal, a strike if [`is_misbehaviour`] says so for its code.
    fn refused(response: Response) -> Self {
        let misbehaved = matches!(&response, Response::Error { code, .. } if is_misbehaviour(*code));
        Self { response, misbehaved }
    }
}

/// Whether a refusal with `code` means the peer misbehaved: nothing an honest device running
/// the SDK sends is refused this way. `BadToken` depends on why (a forged token is a strike,
/// an expired or revoked one is not), so the auth path decides it with
/// [`AuthError::is_peer_misbehaviour`]; timing refusals (`NotSelected`, `WrongRound`,
/// `WrongPhase`, `Duplicate`), `RateLimited`, `NotEligible` and `Internal` never count.
fn is_misbehaviour(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::VersionMismatch
            | ErrorCode::Replay
            | ErrorCode::WrongShape
            | ErrorCode::NonFinite
            | ErrorCode::NormTooLarge
            | ErrorCode::TooLarge
            | ErrorCode::Malformed
            | ErrorCode::MissingClipBit
    )
}

/// What every stream task shares.
#[derive(Debug)]
struct StreamCtx {
    limits: Limits,
    read_timeout: Duration,
    requests: mpsc::Sender<Command>,
    metrics: Arc<ServerMetrics>,
    max_invalid_requests: u32,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    max_connections: usize,
}

impl StreamCtx {
    /// Updates the open-connections gauge.
    fn count_connections(&self) {
        let open = self.max_connections.saturating_sub(self.connections.available_permits());
        self.metrics.connections_open.set(open as f64);
    }
}

/// One connection and its strikes.
#[derive(Debug)]
struct Peer {
    id: usize,
    conn: quinn::Connection,
    strikes: AtomicU32,
}

impl Peer {
    /// Whether the connection has used up its strikes.
    fn is_cut_off(&self, max: u32) -> bool {
        max > 0 && self.strikes.load(Ordering::Relaxed) >= max
    }

    /// Adds a strike; whether this one reaches the limit (true exactly once).
    fn strike(&self, max: u32) -> bool {
        max > 0 && self.strikes.fetch_add(1, Ordering::Relaxed).saturating_add(1) == max
    }
}

async fn serve_connection(incoming: quinn::Incoming, ctx: Arc<StreamCtx>, permit: OwnedSemaphorePermit) {
    if let Ok(conn) = incoming.await {
        let peer = Arc::new(Peer { id: conn.stable_id(), conn, strikes: AtomicU32::new(0) });
        while let Ok((send, recv)) = peer.conn.accept_bi().await {
            tokio::spawn(serve_stream(Arc::clone(&peer), send, recv, Arc::clone(&ctx)));
        }
        let _ = ctx.requests.send(Command::Closed { conn: peer.id }).await;
    }
    drop(permit);
    ctx.count_connections();
}

async fn serve_stream(
    peer: Arc<Peer>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: Arc<StreamCtx>,
) {
    if peer.is_cut_off(ctx.max_invalid_requests) {
        // The close is on its way: let it, not a reset stream, tell the peer why.
        let _ = tokio::time::timeout(ctx.read_timeout, peer.conn.closed()).await;
        return;
    }
    let reply = match read_request(&mut recv, &ctx).await {
        Ok(request) => {
            let (tx, rx) = oneshot::channel();
            let shutting_down =
                || Reply::ok(Response::error(ErrorCode::Internal, "the coordinator is shutting down"));
            if ctx.requests.send(Command::Request { conn: peer.id, request, reply: tx }).await.is_err() {
                shutting_down()
            } else {
                rx.await.unwrap_or_else(|_| shutting_down())
            }
        }
        Err(StreamError::Wire(e)) => {
            let label = e.code().label();
            ctx.metrics.rejected(label);
            tracing::warn!(reason = label, "refused a request");
            // Every decoding error is the peer's doing.
            Reply { response: Response::error(e.code(), &e.to_string()), misbehaved: true }
        }
        Err(StreamError::Timeout) => {
            ctx.metrics.rejected("timeout");
            tracing::warn!(reason = "timeout", "refused a request");
            // A slow network is no misbehaviour; the idle timeout ends a silent connection.
            Reply::ok(Response::error(ErrorCode::Malformed, "request not received in time"))
        }
        Err(StreamError::Read) => return,
    };
    let cut_off = reply.misbehaved && peer.strike(ctx.max_invalid_requests);
    let Ok(frame) = wire::encode(&reply.response) else { return };
    ctx.metrics.bytes_out.add(frame.len() as u64);
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
        // Wait for the peer to read the answer (or go away) before the stream is dropped.
        let _ = tokio::time::timeout(ctx.read_timeout, send.stopped()).await;
    }
    if cut_off {
        let label = ErrorCode::CutOff.label();
        ctx.metrics.rejected(label);
        tracing::warn!(reason = label, strikes = ctx.max_invalid_requests, "closed a misbehaving connection");
        peer.conn.close(ErrorCode::CutOff.as_u16().into(), b"too many invalid requests");
    }
}

enum StreamError {
    Wire(WireError),
    Timeout,
    Read,
}

async fn read_request(recv: &mut quinn::RecvStream, ctx: &StreamCtx) -> Result<Request, StreamError> {
    let read = async {
        let mut prefix = [0u8; LEN_PREFIX];
        recv.read_exact(&mut prefix).await.map_err(|_| StreamError::Read)?;
        ctx.metrics.bytes_in.add(LEN_PREFIX as u64);
        let len = wire::frame_len(prefix, ctx.limits.max_request()).map_err(StreamError::Wire)?;
        let mut payload = vec![0u8; len];
        recv.read_exact(&mut payload).await.map_err(|_| StreamError::Read)?;
        ctx.metrics.bytes_in.add(len as u64);
        wire::decode_request(&payload, &ctx.limits).map_err(StreamError::Wire)
    };
    tokio::time::timeout(ctx.read_timeout, read).await.unwrap_or(Err(StreamError::Timeout))
}

/// The owner of the round state.
#[derive(Debug)]
struct Owner {
    coordinator: Coordinator<StdRng>,
    verifier: Verifier,
    replay: ReplayGuard,
    round_gap: Duration,
    retry_after: Duration,
    status: watch::Sender<ServerStatus>,
    /// The device each connection proved to be by its check-in.
    sessions: HashMap<usize, DeviceId>,
    /// Where rounds are persisted.
    store: Option<Store>,
    /// Updated at every event the owner sees.
    metrics: Arc<ServerMetrics>,
    /// Rounds each device was selected for today.
    quota: DailyQuota,
    /// The device states accepted at check-in.
    eligibility: EligibilityPolicy,
    /// The signed ruleset devices fetch.
    rules: Option<Arc<crate::rules::PublishedRuleset>>,
}

impl Owner {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ServerError> {
        let start = tokio::time::Instant::now();
        let now =
            move || Instant::from_micros(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
        let to_tokio = move |t: Instant| start + Duration::from_micros(t.as_micros());
        let mut next_start = Some(now());
        loop {
            if self.coordinator.current_round().is_none()
                && let Some(at) = next_start
                && now() >= at
            {
                match self.coordinator.start_round(now()) {
                    Ok(round) => tracing::info!(round, "round opened"),
                    Err(StartError::RoundOpen(_)) => {}
                    // The budget (or the accountant) refuses: no later round can do better,
                    // so stop opening rounds and keep answering devices with `NotSelected`.
                    Err(e) => {
                        tracing::warn!(reason = %e, "no more rounds");
                        next_start = None;
                        self.status.send_modify(|s| s.start_refused = Some(e));
                    }
                }
            }
            let wake = match (self.coordinator.poll_timeout(), next_start) {
                (Some(t), _) | (None, Some(t)) => Some(to_tokio(t)),
                (None, None) => None,
            };
            let sleep = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                job = requests.recv() => {
                    match job {
                        None => return Ok(()),
                        Some(Command::Request { conn, request, reply }) => {
                            let response = self.handle_request(now(), conn, request);
                            let _ = reply.send(response);
                        }
                        Some(Command::Closed { conn }) => {
                            self.sessions.remove(&conn);
                        }
                    }
                }
                () = sleep => {
                    self.coordinator.handle_timeout(now());
                }
            }
            if self.drain_events()? && next_start.is_some() {
                next_start = Some(now().saturating_add(self.round_gap));
            }
        }
    }

    /// Persists and publishes round closes; whether a round closed. A round that cannot be
    /// persisted is an error: the server must not run on with it.
    fn drain_events(&mut self) -> Result<bool, ServerError> {
        let mut closed = false;
        while let Some(event) = self.coordinator.poll_event() {
            let round = match &event {
                CoordinatorEvent::RoundCommitted { stats, .. }
                | CoordinatorEvent::RoundAbandoned { stats, .. } => stats.round,
                CoordinatorEvent::Rejected { reason, .. } => {
                    self.metrics.rejected(reason.label());
                    tracing::warn!(reason = reason.label(), "refused a message");
                    continue;
                }
                _ => continue,
            };
            closed = true;
            if let Some(store) = self.store.as_mut() {
                match &event {
                    CoordinatorEvent::RoundCommitted { stats, .. } => {
                        let state = self.coordinator.state().ok_or_else(|| {
                            StoreError::Inconsistent("a round is open right after a commit".into())
                        })?;
                        store.commit_round(&state, stats, unix_ms())?;
                    }
                    CoordinatorEvent::RoundAbandoned { stats, reason } => {
                        store.record_abandoned(stats, *reason, unix_ms())?;
                    }
                    _ => {}
                }
            }
            self.replay.forget_rounds_before(round.saturating_add(1));
            let epsilon = self.update_epsilon();
            self.record_close(&event, epsilon);
            let model = Arc::clone(self.coordinator.model());
            let next_round = round.saturating_add(1);
            let n_ledger_entries = self.coordinator.ledger().entries().len();
            self.status.send_modify(|s| {
                match &event {
                    CoordinatorEvent::RoundCommitted { .. } => s.n_committed += 1,
                    _ => s.n_abandoned += 1,
                }
                s.model = model;
                s.next_round = next_round;
                s.n_ledger_entries = n_ledger_entries;
                s.last_close = Some(event);
            });
        }
        // Messages for devices that are not waiting (aborts at a close) have nowhere to go.
        while self.coordinator.poll_transmit().is_some() {}
        Ok(closed)
    }

    /// Updates the metrics and logs a round close.
    fn record_close(&self, event: &CoordinatorEvent, epsilon: Option<f64>) {
        let m = &self.metrics;
        let (stats, outcome) = match event {
            CoordinatorEvent::RoundCommitted { stats, .. } => {
                m.rounds_committed.inc();
                (stats, "committed")
            }
            CoordinatorEvent::RoundAbandoned { stats, .. } => {
                m.rounds_abandoned.inc();
                (stats, "abandoned")
            }
            _ => return,
        };
        m.checked_in.add(stats.n_checked_in as u64);
        m.selected.add(stats.n_selected as u64);
        m.reported.add(stats.n_reported as u64);
        m.round_duration.observe(stats.duration.as_secs_f64());
        m.model_version.set(self.coordinator.model().version as f64);
        tracing::info!(
            round = stats.round,
            outcome,
            n_reported = stats.n_reported,
            n_dropped = stats.n_dropped,
            noise_std = stats.noise_std,
            epsilon,
            "round closed"
        );
    }

    /// Recomputes `fedrec_epsilon_spent` when a budget is configured; the spend.
    fn update_epsilon(&self) -> Option<f64> {
        let policy = self.coordinator.config().privacy.as_ref()?;
        let epsilon = self.coordinator.ledger().epsilon(policy.budget.delta(), policy.accountant).ok()?;
        self.metrics.set_epsilon_spent(epsilon);
        Some(epsilon)
    }

    /// Counts and logs a refused peer (by reason label only: no tokens, no ids).
    fn refuse(&self, label: &'static str) {
        self.metrics.rejected(label);
        tracing::warn!(reason = label, "refused a peer");
    }

    fn handle_request(&mut self, now: Instant, conn: usize, request: Request) -> Reply {
        match request {
            Request::CheckIn(check_in) => {
                let now_ms = unix_ms();
                let device = match self.verifier.verify(&check_in.token, now_ms) {
                    Ok(d) => d,
                    Err(e) => return self.auth_refusal(e),
                };
                self.sessions.insert(conn, device);
                // Before the machine sees the check-in, so that it cannot select the device.
                if !self.eligibility.admits(check_in.capabilities) {
                    self.refuse(ErrorCode::NotEligible.label());
                    return Reply::ok(Response::error(
                        ErrorCode::NotEligible,
                        "the device's state does not meet the eligibility policy",
                    ));
                }
                if let Err(e) = self.quota.check(device, now_ms) {
                    self.refuse(e.label());
                    let retry_after = DailyQuota::until_reset(now_ms);
                    return Reply::ok(Response::error_with_retry(e.code(), &e.to_string(), retry_after));
                }
                let client: ClientId = device.get();
                self.coordinator.handle_message(now, client, ClientMessage::CheckIn);
                let response = self.answer(client, check_in.cached_model_version);
                if let Response::Task(_) = response {
                    self.quota.record(device, now_ms);
                }
                Reply::ok(response)
            }
            Request::Upload(upload) => {
                // An upload carries no token: it comes from the device whose check-in on the
                // same connection was verified. An honest device always checks in first.
                let Some(&device) = self.sessions.get(&conn) else {
                    self.refuse(ErrorCode::BadToken.label());
                    let response =
                        Response::error(ErrorCode::BadToken, "upload on a connection without a check-in");
                    return Reply { response, misbehaved: true };
                };
                let Some(current) = self.coordinator.current_round() else {
                    self.refuse(ErrorCode::WrongRound.label());
                    return Reply::refused(Response::error(ErrorCode::WrongRound, "no round is open"));
                };
                if upload.round != current {
                    self.refuse(ErrorCode::WrongRound.label());
                    return Reply::refused(Response::error(
                        ErrorCode::WrongRound,
                        "upload for a round that is not open",
                    ));
                }
                if let Err(e) = self.replay.check_and_record(device, upload.round, upload.nonce) {
                    return self.auth_refusal(e);
                }
                let layout = self.coordinator.model().model.shape().layout();
                let msg = match upload.into_client_message(&layout, self.coordinator.clip_norm()) {
                    Ok(m) => m,
                    Err(e) => {
                        self.refuse(e.code().label());
                        return Reply::refused(Response::error(e.code(), &e.to_string()));
                    }
                };
                let client: ClientId = device.get();
                self.coordinator.handle_message(now, client, msg);
                Reply::refused(self.answer(client, None))
            }
            Request::FetchRules(fetch) => match self.verifier.verify(&fetch.token, unix_ms()) {
                Ok(_) => Reply::ok(crate::rules::answer(self.rules.as_deref(), fetch.have_version)),
                Err(e) => self.auth_refusal(e),
            },
        }
    }

    /// Counts, logs and answers an authentication, replay or quota failure; a strike when the
    /// peer misbehaved.
    fn auth_refusal(&self, e: AuthError) -> Reply {
        self.refuse(e.label());
        let response = match e.code() {
            ErrorCode::RateLimited => Response::error_with_retry(e.code(), &e.to_string(), self.retry_after),
            code => Response::error(code, &e.to_string()),
        };
        Reply { response, misbehaved: e.is_peer_misbehaviour() }
    }

    /// The machine's answer to `client`, if it queued one.
    fn answer(&mut self, client: ClientId, cached_model_version: Option<u64>) -> Response {
        let mut answer = None;
        while let Some((to, msg)) = self.coordinator.poll_transmit() {
            if to == client {
                answer = Some(msg);
            }
        }
        match answer {
            Some(msg) => Response::from_server_message(&msg, cached_model_version, self.retry_after),
            None => Response::error(ErrorCode::Internal, "no answer from the round"),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligibility_policy_requires_exactly_its_bits() {
        assert!(EligibilityPolicy::default().admits(0), "the default requires nothing");
        let policy =
            EligibilityPolicy { require_charging: true, require_unmetered: true, require_idle: false };
        assert_eq!(policy.required_bits(), CheckIn::CHARGING | CheckIn::UNMETERED);
        assert!(policy.admits(CheckIn::CHARGING | CheckIn::UNMETERED));
        assert!(policy.admits(CheckIn::CHARGING | CheckIn::UNMETERED | CheckIn::IDLE | 1 << 20));
        assert!(!policy.admits(CheckIn::CHARGING | CheckIn::IDLE));
        assert!(!policy.admits(0));
    }

    #[test]
    fn only_refusals_an_honest_device_cannot_meet_are_strikes() {
        let strikes: Vec<ErrorCode> = ErrorCode::ALL.into_iter().filter(|&c| is_misbehaviour(c)).collect();
        for code in [
            ErrorCode::NotSelected,
            ErrorCode::RateLimited,
            ErrorCode::NotEligible,
            ErrorCode::WrongRound,
            ErrorCode::WrongPhase,
            ErrorCode::Duplicate,
            ErrorCode::Internal,
            ErrorCode::BadToken,
        ] {
            assert!(!strikes.contains(&code), "{code}");
        }
        for code in [ErrorCode::Malformed, ErrorCode::TooLarge, ErrorCode::Replay, ErrorCode::NonFinite] {
            assert!(strikes.contains(&code), "{code}");
        }
        let late = Reply::refused(Response::error(ErrorCode::WrongRound, "late"));
        assert!(!late.misbehaved);
        let nan = Reply::refused(Response::error(ErrorCode::NonFinite, "nan"));
        assert!(nan.misbehaved);
    }
}
