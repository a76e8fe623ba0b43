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

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fedrec_shared::model::compact::DownloadEncoding;
use fedrec_shared::round::{
    ClientId, ClientMessage, Coordinator, CoordinatorConfig, CoordinatorEvent, Instant, ServerMessage,
    StartError, Task, UnmaskResult,
};
use fedrec_shared::wire::{self, ALPN, CheckIn, ErrorCode, LEN_PREFIX, Limits, Request, Response, WireError};
use fedrec_shared::{GlobalModel, ParamError, RoundModel};
use quinn::crypto::rustls::QuicServerConfig;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::auth::{AuthError, DailyQuota, DeviceId, ReplayGuard, ReplayLimits, Verifier};
use crate::log_throttle::LogThrottle;
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

/// Default of [`ServeConfig::read_timeout`] (twice it is the connections' QUIC idle timeout).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServeConfig::max_streams_per_connection`].
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 4;
/// Default of [`ServeConfig::rounds_per_device_per_day`].
pub const DEFAULT_ROUNDS_PER_DEVICE_PER_DAY: u32 = 24;
/// Default of [`ServeConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of [`ServeConfig::max_invalid_requests`].
pub const DEFAULT_MAX_INVALID_REQUESTS: u32 = 3;
/// Default of [`ServeConfig::max_connections_per_source`].
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 64;
/// Default of [`ServeConfig::max_concurrent_handshakes`].
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 256;
/// Default of [`ServeConfig::max_upload_memory`]: 256 MiB.
pub const DEFAULT_MAX_UPLOAD_MEMORY: usize = 256 << 20;
/// The QUIC receive window (bytes all streams of a connection may have in flight unread) of
/// a connection that is not reading an upload: enough for a few check-ins, never more. It is
/// what an unauthenticated peer can make the server buffer per connection.
pub const SMALL_RECEIVE_WINDOW: u32 = 64 * 1024;
/// The receive window while a connection reads an admitted upload (see [`ServeConfig::max_upload_memory`]).
pub const UPLOAD_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// The UDP socket's receive and send buffer sizes the server asks for. A burst of devices
/// (thousands of handshakes at the top of the hour) overflows the kernel's default (about
/// 208 KB on Linux) and loses datagrams; Linux grants at most `net.core.rmem_max` /
/// `wmem_max`, and the server logs what it got.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

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
    /// Longest wait for a request's bytes, for upload memory, and for a connection's next
    /// request (a connection that opens no stream for this long is closed); twice it is the
    /// QUIC idle timeout.
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
    /// Called with every round message (an upload, a secure-aggregation message) a verified
    /// device sends, as decoded: everything a device tells the coordinator about its update.
    /// For tests and audits of what a curious coordinator could learn; `None` in production.
    pub observer: Option<RequestObserver>,
    /// Most rounds a device may be selected for per UTC day (0 refuses every device).
    pub rounds_per_device_per_day: u32,
    /// Most concurrent connections; more are refused.
    pub max_connections: usize,
    /// Strikes (refusals that only a misbehaving peer provokes) after which a connection is
    /// closed with [`ErrorCode::CutOff`]; 0 never closes one.
    pub max_invalid_requests: u32,
    /// The device states accepted at check-in.
    pub eligibility: EligibilityPolicy,
    /// Most concurrent connections from one IP address (0: no limit). Devices behind one NAT
    /// share an address, so keep it well above the devices one address may hold.
    pub max_connections_per_source: usize,
    /// Bytes that uploads being received may hold at once, all connections together. An
    /// upload (or a secure-aggregation message: the requests larger than
    /// [`Limits::check_in`]) is read only on a
    /// connection whose device was given a task in the open round, and only once this budget
    /// has room for its announced length plus [`UPLOAD_RECEIVE_WINDOW`]; until then the peer
    /// is held by flow control (backpressure), and after [`ServeConfig::read_timeout`] it is
    /// told [`ErrorCode::Busy`] with a retry hint. Must hold at least one upload.
    pub max_upload_memory: usize,
    /// Most QUIC handshakes under way at once (0: no limit). A burst beyond it is refused at
    /// once (QUIC `CONNECTION_REFUSED`, counted as `reason="handshake_cap"`), which costs the
    /// server one packet; devices retry after their backoff with jitter, so a burst is spread
    /// out instead of overflowing the socket and the CPU. Past half of it, peers must first
    /// prove their address (a stateless QUIC Retry), so spoofed sources hold at most half.
    pub max_concurrent_handshakes: usize,
    /// Items each round trains (`[model] items_per_round`; 0 = every item): a subset drawn
    /// from the round's public seed, the download and the upload over its rows only
    /// ([`Coordinator::set_items_per_round`]).
    pub items_per_round: usize,
    /// How the round's model is downloaded (`[model] download`): `f32`, or 8-bit item factors
    /// with a scale per row ([`Coordinator::set_download_encoding`]).
    pub download: DownloadEncoding,
    /// Seed of the coordinator's RNG; `None` (always, outside simulations) draws it from the
    /// operating system. Set only through [`crate::danger::seed_coordinator_rng`].
    pub(crate) insecure_seed: Option<u64>,
}

impl ServeConfig {
    /// A configuration with the defaults: a self-signed certificate for `localhost`, default
    /// replay limits, a gap of 100 ms between rounds, reads timing out after 10 s, a retry
    /// hint of 1 s, 4 concurrent streams per connection, no store, no metrics endpoint,
    /// [`DEFAULT_ROUNDS_PER_DEVICE_PER_DAY`], [`DEFAULT_MAX_CONNECTIONS`],
    /// [`DEFAULT_MAX_INVALID_REQUESTS`], no eligibility requirement,
    /// [`DEFAULT_MAX_CONNECTIONS_PER_SOURCE`], [`DEFAULT_MAX_UPLOAD_MEMORY`] and
    /// [`DEFAULT_MAX_CONCURRENT_HANDSHAKES`].
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
            observer: None,
            rounds_per_device_per_day: DEFAULT_ROUNDS_PER_DEVICE_PER_DAY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_invalid_requests: DEFAULT_MAX_INVALID_REQUESTS,
            eligibility: EligibilityPolicy::default(),
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_upload_memory: DEFAULT_MAX_UPLOAD_MEMORY,
            max_concurrent_handshakes: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            items_per_round: 0,
            download: DownloadEncoding::F32,
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
    /// [`ServeConfig::max_upload_memory`] cannot hold one upload of the model.
    #[error("max_upload_memory is {budget} bytes, but one upload needs {needed}")]
    UploadMemory {
        /// The configured budget.
        budget: usize,
        /// One upload of the model plus [`UPLOAD_RECEIVE_WINDOW`].
        needed: usize,
    },
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
    max_connections_per_source: usize,
    max_upload_memory: usize,
    max_concurrent_handshakes: usize,
    metrics: Arc<ServerMetrics>,
    metrics_listener: Option<std::net::TcpListener>,
    metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Validates the configuration, builds the TLS identity and binds the UDP socket.
    pub fn bind(cfg: ServeConfig) -> Result<Server, ServerError> {
        let shape = cfg.model.shape();
        let limits = Limits::for_shape(&shape);
        let needed = upload_charge(limits.upload());
        if cfg.max_upload_memory < needed {
            return Err(ServerError::UploadMemory { budget: cfg.max_upload_memory, needed });
        }
        let rng = cfg.insecure_seed.map_or_else(StdRng::from_os_rng, crate::danger::seeded_std_rng);
        let mut store = cfg.store;
        let mut coordinator = match store.as_mut() {
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
        coordinator.set_items_per_round(cfg.items_per_round)?;
        coordinator.set_download_encoding(cfg.download);
        // Unmasking a secure round (rebuilding secrets, recomputing masks) runs on the blocking
        // pool, not on the owner task that answers every device.
        coordinator.set_deferred_unmask(true);
        let (chain, key) = identity(cfg.tls)?;
        let cert_der =
            chain.first().map(|c| c.to_vec()).ok_or_else(|| ServerError::Tls("empty chain".into()))?;
        let server_config = quic_server_config(chain, key, cfg.max_streams_per_connection, cfg.read_timeout)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            udp_socket(cfg.listen)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let status = ServerStatus {
            n_committed: 0,
            n_abandoned: 0,
            model: Arc::clone(coordinator.model()),
            last_close: None,
            next_round: coordinator.state().map_or(0, |s| s.next_round),
            n_ledger_entries: coordinator.ledger().entries().len() + coordinator.ledger().ddp_entries().len(),
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
            next_start: Some(Instant::ZERO),
            open_round: Arc::new(AtomicU64::new(0)),
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
            quota_counted: HashSet::new(),
            eligibility: cfg.eligibility,
            rules: cfg.rules,
            observer: cfg.observer,
            log: Arc::new(LogThrottle::default()),
            task_frames: TaskFrames::default(),
            parked: HashMap::new(),
            mail: HashMap::new(),
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
            max_connections_per_source: cfg.max_connections_per_source,
            max_upload_memory: cfg.max_upload_memory,
            max_concurrent_handshakes: cfg.max_concurrent_handshakes,
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
            max_connections_per_source,
            max_upload_memory,
            max_concurrent_handshakes,
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
        let open_round = Arc::clone(&owner.open_round);
        let log = Arc::clone(&owner.log);
        let mut owner_task = tokio::spawn(owner.run(req_rx, stop_rx));
        let upload_units = max_upload_memory.div_ceil(UPLOAD_UNIT).min(Semaphore::MAX_PERMITS);
        let ctx = Arc::new(StreamCtx {
            limits,
            read_timeout,
            requests: req_tx,
            metrics,
            max_invalid_requests,
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            sources: std::sync::Mutex::new(HashMap::new()),
            max_connections_per_source,
            upload_memory: Arc::new(Semaphore::new(upload_units)),
            open_round,
            log,
            handshakes: AtomicUsize::new(0),
            max_concurrent_handshakes,
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
                    let (busy, cap) = (ctx.handshakes.load(Ordering::Relaxed), ctx.max_concurrent_handshakes);
                    if cap > 0 && busy >= cap {
                        refusal(&ctx.metrics, &ctx.log, "handshake_cap", "refused a connection");
                        incoming.refuse();
                        continue;
                    }
                    // Past half the cap, a peer must first prove its address with a QUIC Retry
                    // (stateless: one packet, no state kept): a spoofed source never answers,
                    // so it can hold at most half of the handshake slots.
                    if cap > 1 && busy >= cap / 2 && !incoming.remote_address_validated() && incoming.may_retry() {
                        ctx.metrics.registry.counter(RETRIES, RETRIES_HELP, &[]).inc();
                        let _ = incoming.retry();
                        continue;
                    }
                    let Some(source) = SourceSlot::take(&ctx, incoming.remote_address().ip()) else {
                        refusal(&ctx.metrics, &ctx.log, "source_cap", "refused a connection");
                        incoming.refuse();
                        continue;
                    };
                    match Arc::clone(&ctx.connections).try_acquire_owned() {
                        Ok(permit) => {
                            ctx.count_connections();
                            ctx.handshakes.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(serve_connection(incoming, Arc::clone(&ctx), permit, source));
                        }
                        Err(_) => {
                            refusal(&ctx.metrics, &ctx.log, "connection_cap", "refused a connection");
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
/// twice `read_timeout` as the idle timeout, and a receive window of [`SMALL_RECEIVE_WINDOW`]
/// (raised to [`UPLOAD_RECEIVE_WINDOW`] only while an admitted upload is read). Public so
/// that benchmarks measure the transport with exactly the settings the coordinator runs with.
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
    // Flow control bounds what quinn buffers for a peer that sends faster than it is read.
    transport.receive_window(SMALL_RECEIVE_WINDOW.into());
    transport.stream_receive_window(UPLOAD_RECEIVE_WINDOW.into());
    // Twice the read timeout: a request may wait a read timeout for upload memory, silent
    // but for flow control, before it is read. Silent connections are closed by the
    // server's own rule (no request for a read timeout), which PINGs do not satisfy.
    let idle = quinn::IdleTimeout::try_from(read_timeout.saturating_mul(2))
        .map_err(|_| ServerError::Tls("read timeout too long for an idle timeout".into()))?;
    transport.max_idle_timeout(Some(idle));
    server_config.transport_config(Arc::new(transport));
    Ok(server_config)
}

/// The server's UDP socket on `listen`, with buffers of [`UDP_BUFFER_BYTES`] where the
/// kernel allows them.
fn udp_socket(listen: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(listen), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer works, it only loses more datagrams in a burst.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    let (recv, send) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    // Linux reports twice what it grants (the doubling covers its bookkeeping).
    if recv < UDP_BUFFER_BYTES || send < UDP_BUFFER_BYTES {
        tracing::warn!(
            recv_buffer = recv,
            send_buffer = send,
            wanted = UDP_BUFFER_BYTES,
            "the UDP socket buffers are smaller than asked: raise net.core.rmem_max and wmem_max for bursts"
        );
    }
    socket.bind(&listen.into())?;
    Ok(socket.into())
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

/// A function that sees every round message a verified device sends (see
/// [`ServeConfig::observer`]): the device's id and the decoded request.
#[derive(Clone)]
pub struct RequestObserver(pub Arc<ObserverFn>);

/// The function a [`RequestObserver`] calls: the device's id and the decoded request.
pub type ObserverFn = dyn Fn(u64, &Request) + Send + Sync;

impl std::fmt::Debug for RequestObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestObserver")
    }
}

/// What connection and stream tasks tell the owner.
#[derive(Debug)]
enum Command {
    /// A request on connection `conn`, with the channel for its answer, and one that says
    /// the owner has taken the request in (its memory may go; the answer may come much later,
    /// for a secure-aggregation request waiting for its phase to close).
    Request { conn: usize, request: Request, reply: oneshot::Sender<Reply>, taken: oneshot::Sender<()> },
    /// Connection `conn` is gone: forget which device it was.
    Closed { conn: usize },
}

/// The owner's answer to a request, whether the request was a strike against its connection
/// (see [`is_misbehaviour`]), and the round whose task it hands out, if it is one.
#[derive(Debug)]
struct Reply {
    answer: Answer,
    misbehaved: bool,
    /// The round whose task this answer carries: the connection may then upload once.
    task_round: Option<u64>,
}

impl Reply {
    /// An answer that is no strike.
    fn ok(response: Response) -> Self {
        let task_round = match &response {
            Response::Task(task) => Some(task.round),
            _ => None,
        };
        Self { answer: Answer::Response(Box::new(response)), misbehaved: false, task_round }
    }

    /// A task for `round`, sent as the shared `frame`.
    fn task(round: u64, frame: Bytes) -> Self {
        Self { answer: Answer::Frame(frame), misbehaved: false, task_round: Some(round) }
    }

    /// A refusal, a strike if [`is_misbehaviour`] says so for its code.
    fn refused(response: Response) -> Self {
        let misbehaved = matches!(&response, Response::Error { code, .. } if is_misbehaviour(*code));
        Self { answer: Answer::Response(Box::new(response)), misbehaved, task_round: None }
    }

    /// A refusal that is a strike.
    fn strike(response: Response) -> Self {
        Self { answer: Answer::Response(Box::new(response)), misbehaved: true, task_round: None }
    }
}

/// What goes back on the stream.
#[derive(Debug)]
enum Answer {
    /// No answer yet: the device's next secure-aggregation message comes when its phase
    /// closes, and the stream waits for it (the owner resolves this, streams never see it).
    Park(ClientId),
    /// A response to encode.
    Response(Box<Response>),
    /// A response already encoded and shared with every other device it goes to (a task: one
    /// copy of the model per round, whatever the number of devices).
    Frame(Bytes),
}

/// Whether a refusal with `code` means the peer misbehaved: nothing an honest device running
/// the SDK sends is refused this way. `BadToken` depends on why (a forged token is a strike,
/// an expired or revoked one is not), so the auth path decides it with
/// [`AuthError::is_peer_misbehaviour`]; timing refusals (`NotSelected`, `WrongRound`,
/// `WrongPhase`, `Duplicate`), `RateLimited`, `Busy`, `NotEligible` and `Internal` never count.
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

/// The counter of completed handshakes.
const HANDSHAKES: &str = "fedrec_handshakes_total";
const HANDSHAKES_HELP: &str = "QUIC handshakes completed (connections accepted).";
/// The counter of address validations asked for (QUIC Retry) under handshake load.
const RETRIES: &str = "fedrec_handshake_retries_total";
const RETRIES_HELP: &str = "QUIC Retry packets sent to validate a peer's address under handshake load.";

/// The unit of [`StreamCtx::upload_memory`]'s permits, in bytes.
const UPLOAD_UNIT: usize = 1024;

/// What an upload of `len` bytes is charged against [`ServeConfig::max_upload_memory`]: its
/// buffer and what quinn may hold unread meanwhile.
fn upload_charge(len: usize) -> usize {
    len.saturating_add(UPLOAD_RECEIVE_WINDOW as usize)
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
    /// Open connections per source address.
    sources: std::sync::Mutex<HashMap<IpAddr, usize>>,
    max_connections_per_source: usize,
    /// [`ServeConfig::max_upload_memory`], in [`UPLOAD_UNIT`]s.
    upload_memory: Arc<Semaphore>,
    /// The open round plus one, 0 when none is open (written by the owner).
    open_round: Arc<AtomicU64>,
    /// Keeps refusals from flooding the log.
    log: Arc<LogThrottle>,
    /// Handshakes under way.
    handshakes: AtomicUsize,
    max_concurrent_handshakes: usize,
}

impl StreamCtx {
    /// Updates the open-connections gauge.
    fn count_connections(&self) {
        let open = self.max_connections.saturating_sub(self.connections.available_permits());
        self.metrics.connections_open.set(open as f64);
    }
}

/// A connection's place in its source address's count; given back when dropped.
#[derive(Debug)]
struct SourceSlot {
    ctx: Arc<StreamCtx>,
    ip: IpAddr,
}

impl SourceSlot {
    /// A slot for `ip`, or `None` when it holds [`ServeConfig::max_connections_per_source`].
    fn take(ctx: &Arc<StreamCtx>, ip: IpAddr) -> Option<SourceSlot> {
        let mut sources = ctx.sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = sources.entry(ip).or_insert(0);
        if ctx.max_connections_per_source > 0 && *open >= ctx.max_connections_per_source {
            return None;
        }
        *open += 1;
        Some(SourceSlot { ctx: Arc::clone(ctx), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut sources = self.ctx.sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = sources.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

/// One connection, its strikes and what it may upload.
#[derive(Debug)]
struct Peer {
    id: usize,
    conn: quinn::Connection,
    strikes: AtomicU32,
    /// The round whose task this connection received, plus one (0: none).
    task_round: AtomicU64,
    /// Whether an upload is being read on this connection (at most one at a time).
    uploading: AtomicBool,
    /// Streams being served.
    active_streams: AtomicU32,
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

/// Counts a stream as active while it lives.
struct ActiveStream(Arc<Peer>);

impl ActiveStream {
    fn new(peer: &Arc<Peer>) -> Self {
        peer.active_streams.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(peer))
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upload admitted on a connection: its share of the upload memory and the connection's
/// raised receive window, both given back when dropped.
struct UploadAdmission {
    peer: Arc<Peer>,
    _memory: OwnedSemaphorePermit,
}

impl Drop for UploadAdmission {
    fn drop(&mut self) {
        self.peer.conn.set_receive_window(SMALL_RECEIVE_WINDOW.into());
        self.peer.uploading.store(false, Ordering::Release);
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    ctx: Arc<StreamCtx>,
    permit: OwnedSemaphorePermit,
    source: SourceSlot,
) {
    // Counted up by the accept loop, before this task was spawned.
    let handshake = incoming.await;
    ctx.handshakes.fetch_sub(1, Ordering::Relaxed);
    match handshake {
        Ok(conn) => {
            ctx.metrics.registry.counter(HANDSHAKES, HANDSHAKES_HELP, &[]).inc();
            let peer = Arc::new(Peer {
                id: conn.stable_id(),
                conn,
                strikes: AtomicU32::new(0),
                task_round: AtomicU64::new(0),
                uploading: AtomicBool::new(false),
                active_streams: AtomicU32::new(0),
            });
            loop {
                // A connection must keep asking: one that opens no stream for a read timeout
                // while none is being served (only PINGs, say) gives its slot back.
                match tokio::time::timeout(ctx.read_timeout, peer.conn.accept_bi()).await {
                    Ok(Ok((send, recv))) => {
                        let active = ActiveStream::new(&peer);
                        tokio::spawn(serve_stream(Arc::clone(&peer), send, recv, Arc::clone(&ctx), active));
                    }
                    Ok(Err(_)) => break,
                    Err(_) if peer.active_streams.load(Ordering::Relaxed) == 0 => {
                        refusal(&ctx.metrics, &ctx.log, "idle", "closed an idle connection");
                        peer.conn.close(ErrorCode::CutOff.as_u16().into(), b"no request in time");
                        break;
                    }
                    Err(_) => {}
                }
            }
            let _ = ctx.requests.send(Command::Closed { conn: peer.id }).await;
        }
        Err(_) => {
            // Wrong ALPN, TLS 1.2, a bad handshake, or a peer that never finished it.
            refusal(&ctx.metrics, &ctx.log, "handshake", "refused a handshake");
        }
    }
    drop(source);
    drop(permit);
    ctx.count_connections();
}

async fn serve_stream(
    peer: Arc<Peer>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: Arc<StreamCtx>,
    _active: ActiveStream,
) {
    if peer.is_cut_off(ctx.max_invalid_requests) {
        // The close is on its way: let it, not a reset stream, tell the peer why.
        let _ = tokio::time::timeout(ctx.read_timeout, peer.conn.closed()).await;
        return;
    }
    let reply = match read_request(&mut recv, &peer, &ctx).await {
        // The upload's memory stays charged until the owner has taken the update in.
        Ok((request, admission)) => {
            let (tx, rx) = oneshot::channel();
            let (taken, taken_rx) = oneshot::channel();
            let shutting_down =
                || Reply::ok(Response::error(ErrorCode::Internal, "the coordinator is shutting down"));
            let command = Command::Request { conn: peer.id, request, reply: tx, taken };
            if ctx.requests.send(command).await.is_err() {
                shutting_down()
            } else {
                let _ = taken_rx.await;
                drop(admission);
                rx.await.unwrap_or_else(|_| shutting_down())
            }
        }
        Err(StreamError::Wire(e)) => {
            refusal(&ctx.metrics, &ctx.log, e.code().label(), "refused a request");
            // Every decoding error is the peer's doing.
            Reply::strike(Response::error(e.code(), &e.to_string()))
        }
        Err(StreamError::Timeout) => {
            refusal(&ctx.metrics, &ctx.log, "timeout", "refused a request");
            // An honest device sends its request at once; a slow trickle holds a slot.
            Reply::strike(Response::error(ErrorCode::Malformed, "request not received in time"))
        }
        Err(StreamError::NotAdmitted(why)) => {
            let _ = recv.stop(0u32.into());
            refusal(&ctx.metrics, &ctx.log, "not_admitted", "refused an upload before reading it");
            Reply::strike(Response::error(ErrorCode::TooLarge, why))
        }
        Err(StreamError::Late) => {
            let _ = recv.stop(0u32.into());
            refusal(&ctx.metrics, &ctx.log, ErrorCode::WrongRound.label(), "refused a late upload");
            Reply::refused(Response::error(ErrorCode::WrongRound, "upload for a round that is not open"))
        }
        Err(StreamError::Busy) => {
            let _ = recv.stop(0u32.into());
            refusal(&ctx.metrics, &ctx.log, ErrorCode::Busy.label(), "no upload memory in time");
            let retry = jittered(ctx.read_timeout);
            Reply::refused(Response::error_with_retry(
                ErrorCode::Busy,
                "the coordinator is at capacity",
                retry,
            ))
        }
        Err(StreamError::Read) => return,
    };
    if let Some(round) = reply.task_round {
        peer.task_round.store(round.saturating_add(1), Ordering::Release);
    }
    let cut_off = reply.misbehaved && peer.strike(ctx.max_invalid_requests);
    let frame = match reply.answer {
        Answer::Frame(frame) => frame,
        Answer::Park(_) => {
            match wire::encode(&Response::error(ErrorCode::Internal, "no answer from the round")) {
                Ok(frame) => Bytes::from(frame),
                Err(_) => return,
            }
        }
        Answer::Response(response) => match wire::encode(&*response) {
            Ok(frame) => Bytes::from(frame),
            Err(_) => return,
        },
    };
    ctx.metrics.bytes_out.add(frame.len() as u64);
    if send.write_chunk(frame).await.is_ok() {
        let _ = send.finish();
        // Wait for the peer to read the answer (or go away) before the stream is dropped.
        let _ = tokio::time::timeout(ctx.read_timeout, send.stopped()).await;
    }
    if cut_off {
        refusal(&ctx.metrics, &ctx.log, ErrorCode::CutOff.label(), "closed a misbehaving connection");
        peer.conn.close(ErrorCode::CutOff.as_u16().into(), b"too many invalid requests");
    }
}

/// Counts a refusal under `label` and logs it, at most one line per label and second (the
/// line says how many were held back): one attack must not flood the log.
fn refusal(metrics: &ServerMetrics, log: &LogThrottle, label: &'static str, what: &'static str) {
    metrics.rejected(label);
    log.warn(label, |suppressed| tracing::warn!(reason = label, suppressed, "{what}"));
}

/// `base` stretched by a uniform factor in [1, 2): devices told to come back do not come
/// back together.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(1.0 + rand::random::<f64>())
}

enum StreamError {
    Wire(WireError),
    Timeout,
    Read,
    /// A frame larger than any request but an upload, on a connection that may not upload.
    NotAdmitted(&'static str),
    /// An upload for a round that is no longer open.
    Late,
    /// The upload memory stayed full for a read timeout.
    Busy,
}

/// Reads one request. A frame larger than a check-in can only be an upload: it is admitted
/// (see [`admit_upload`]) before a byte of its payload is read, and the buffer grows with the
/// bytes received, never with the length announced.
async fn read_request(
    recv: &mut quinn::RecvStream,
    peer: &Arc<Peer>,
    ctx: &StreamCtx,
) -> Result<(Request, Option<UploadAdmission>), StreamError> {
    let timeout = ctx.read_timeout;
    let len = tokio::time::timeout(timeout, async {
        let mut prefix = [0u8; LEN_PREFIX];
        recv.read_exact(&mut prefix).await.map_err(|_| StreamError::Read)?;
        ctx.metrics.bytes_in.add(LEN_PREFIX as u64);
        wire::frame_len(prefix, ctx.limits.max_request()).map_err(StreamError::Wire)
    })
    .await
    .unwrap_or(Err(StreamError::Timeout))?;
    let admission =
        if len > ctx.limits.check_in() { Some(admit_upload(peer, len, ctx).await?) } else { None };
    let payload =
        tokio::time::timeout(timeout, read_payload(recv, len)).await.unwrap_or(Err(StreamError::Timeout))?;
    ctx.metrics.bytes_in.add(len as u64);
    let request = wire::decode_request(&payload, &ctx.limits).map_err(StreamError::Wire)?;
    Ok((request, admission))
}

/// Admits an upload of `len` bytes: the connection's device was given a task in the round
/// that is open, no other upload is being read on the connection, and the upload memory has
/// room (waiting up to a read timeout for it, while flow control holds the peer).
async fn admit_upload(peer: &Arc<Peer>, len: usize, ctx: &StreamCtx) -> Result<UploadAdmission, StreamError> {
    let task_round = peer.task_round.load(Ordering::Acquire);
    if task_round == 0 {
        return Err(StreamError::NotAdmitted(
            "a frame this large is an upload, and this connection has no task",
        ));
    }
    if task_round != ctx.open_round.load(Ordering::Acquire) {
        return Err(StreamError::Late);
    }
    if peer.uploading.swap(true, Ordering::AcqRel) {
        return Err(StreamError::NotAdmitted("another upload is being read on this connection"));
    }
    let units = u32::try_from(upload_charge(len).div_ceil(UPLOAD_UNIT)).unwrap_or(u32::MAX);
    let memory = Arc::clone(&ctx.upload_memory);
    match tokio::time::timeout(ctx.read_timeout, memory.acquire_many_owned(units)).await {
        Ok(Ok(permit)) => {
            peer.conn.set_receive_window(UPLOAD_RECEIVE_WINDOW.into());
            Ok(UploadAdmission { peer: Arc::clone(peer), _memory: permit })
        }
        _ => {
            peer.uploading.store(false, Ordering::Release);
            Err(StreamError::Busy)
        }
    }
}

/// Reads exactly `len` bytes into a buffer that grows with what arrives (its capacity never
/// passes `len`).
async fn read_payload(recv: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>, StreamError> {
    const FIRST: usize = 16 * 1024;
    let mut payload = Vec::with_capacity(len.min(FIRST));
    while payload.len() < len {
        let chunk = match recv.read_chunk(len - payload.len(), true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) | Err(_) => return Err(StreamError::Read),
        };
        let needed = payload.len() + chunk.len();
        if needed > payload.capacity() {
            let target = payload.capacity().saturating_mul(2).max(needed).min(len);
            payload.reserve_exact(target - payload.len());
        }
        payload.extend_from_slice(&chunk);
    }
    Ok(payload)
}

/// The owner of the round state.
#[derive(Debug)]
struct Owner {
    /// When the next round may open (at the first check-in from then on); `None` once the
    /// budget refused a round: the federation is finished.
    next_start: Option<Instant>,
    /// The open round plus one, 0 when none is open: what stream tasks admit uploads for.
    open_round: Arc<AtomicU64>,
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
    /// The (round, device) selections already counted against the quota; forgotten when
    /// the round closes.
    quota_counted: HashSet<(u64, DeviceId)>,
    /// The device states accepted at check-in.
    eligibility: EligibilityPolicy,
    /// The signed ruleset devices fetch.
    rules: Option<Arc<crate::rules::PublishedRuleset>>,
    /// Keeps refusals from flooding the log (shared with the stream tasks).
    log: Arc<LogThrottle>,
    /// The current task, encoded once.
    task_frames: TaskFrames,
    /// Sees every round message (tests and audits).
    observer: Option<RequestObserver>,
    /// Secure aggregation: the streams of devices waiting for their next phase's message
    /// (a long poll), by device.
    parked: HashMap<ClientId, oneshot::Sender<Reply>>,
    /// Secure aggregation: messages for devices that are not waiting yet; cleared at a close.
    mail: HashMap<ClientId, VecDeque<ServerMessage>>,
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
        let (unmasked_tx, mut unmasked) = mpsc::channel::<UnmaskResult>(1);
        loop {
            // Rounds open at a check-in (see `open_round_if_due`): an idle server sleeps
            // until a device comes, and records nothing meanwhile.
            let wake = self.coordinator.poll_timeout().map(to_tokio);
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
                        Some(Command::Request { conn, request, reply, taken }) => {
                            let response = self.handle_request(now(), conn, request);
                            let _ = taken.send(());
                            match response.answer {
                                Answer::Park(client) => self.park(client, reply),
                                _ => {
                                    let _ = reply.send(response);
                                }
                            }
                        }
                        Some(Command::Closed { conn }) => {
                            if let Some(device) = self.sessions.remove(&conn) {
                                self.parked.remove(&device.get());
                            }
                        }
                    }
                }
                () = sleep => {
                    self.coordinator.handle_timeout(now());
                    self.route_outbox();
                }
                Some(result) = unmasked.recv() => {
                    self.coordinator.complete_unmask(now(), result);
                    self.route_outbox();
                }
            }
            if let Some(job) = self.coordinator.take_unmask_job() {
                let tx = unmasked_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = tx.blocking_send(job.run());
                });
            }
            if self.drain_events()? && self.next_start.is_some() {
                self.next_start = Some(now().saturating_add(self.round_gap));
            }
            self.publish_open_round();
        }
    }

    /// Opens a round if none is open and the gap after the last one has passed. When the
    /// budget (or the accountant) refuses, no later round can do better: the federation is
    /// finished, and devices are told so from then on.
    fn open_round_if_due(&mut self, now: Instant) {
        if self.coordinator.current_round().is_some() || self.next_start.is_none_or(|at| now < at) {
            return;
        }
        match self.coordinator.start_round(now) {
            Ok(round) => tracing::info!(round, "round opened"),
            Err(StartError::RoundOpen(_)) => {}
            Err(e) => {
                tracing::warn!(reason = %e, "no more rounds: the federation is finished");
                self.next_start = None;
                self.status.send_modify(|s| s.start_refused = Some(e));
            }
        }
        self.publish_open_round();
    }

    /// Tells the stream tasks which round is open.
    fn publish_open_round(&self) {
        let open = self.coordinator.current_round().map_or(0, |r| r.saturating_add(1));
        self.open_round.store(open, Ordering::Release);
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
                    self.refuse_round(reason.label());
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
            self.quota_counted.retain(|&(r, _)| r > round);
            let epsilon = self.update_epsilon();
            self.record_close(&event, epsilon);
            let model = Arc::clone(self.coordinator.model());
            let next_round = round.saturating_add(1);
            let ledger = self.coordinator.ledger();
            let n_ledger_entries = ledger.entries().len() + ledger.ddp_entries().len();
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
        // Messages at a close (acknowledgements, aborts) go to the devices that wait for
        // them; for the others they have nowhere to go.
        self.route_outbox();
        if closed {
            self.mail.clear();
            // A device still waiting has no message coming: its round is over.
            for (_, reply) in self.parked.drain() {
                let _ = reply.send(Reply::ok(Response::error(ErrorCode::WrongRound, "the round closed")));
            }
        }
        Ok(closed)
    }

    /// Hands every queued machine message to its device's waiting stream, or keeps it for
    /// the device's next request (secure aggregation only: a plain round's devices wait for
    /// nothing but the answer to their own request).
    fn route_outbox(&mut self) {
        while let Some((to, msg)) = self.coordinator.poll_transmit() {
            self.deliver(to, msg);
        }
    }

    fn deliver(&mut self, to: ClientId, msg: ServerMessage) {
        if let Some(reply) = self.parked.remove(&to) {
            let _ = reply.send(self.reply_for(msg));
        } else if self.coordinator.is_secure() {
            self.mail.entry(to).or_default().push_back(msg);
        }
    }

    /// A waiting device's stream: answered at once with a kept message, or parked.
    fn park(&mut self, client: ClientId, reply: oneshot::Sender<Reply>) {
        match self.mail.get_mut(&client).and_then(VecDeque::pop_front) {
            Some(msg) => {
                let _ = reply.send(self.reply_for(msg));
            }
            None => {
                // A second request while one waits (a device that retried): the newer wins.
                if let Some(old) = self.parked.insert(client, reply) {
                    let _ = old.send(Reply::ok(Response::error(ErrorCode::Duplicate, "superseded")));
                }
            }
        }
    }

    /// The wire answer for a machine message to one device.
    fn reply_for(&mut self, msg: ServerMessage) -> Reply {
        match msg {
            ServerMessage::Selected { task, model } => match self.task_frames.frame(&task, &model, None) {
                Ok(frame) => Reply::task(task.round, frame),
                Err(e) => Reply::ok(Response::error(ErrorCode::Internal, &e.to_string())),
            },
            msg => Reply::ok(Response::from_server_message(&msg, None, self.retry_after)),
        }
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
        m.model_version.set(self.coordinator.model().version as f64);
        // A round with noise exports and logs none of its exact counts, nor its duration
        // (which tells whether every selected device reported before the deadline): they
        // would reveal its sample. Its outcome, version, noise and spend are public.
        if stats.private {
            tracing::info!(
                round = stats.round,
                outcome,
                noise_std = stats.noise_std,
                epsilon,
                "round closed"
            );
            return;
        }
        m.checked_in.add(stats.n_checked_in as u64);
        m.selected.add(stats.n_selected as u64);
        m.reported.add(stats.n_reported as u64);
        m.round_duration.observe(stats.duration.as_secs_f64());
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
        refusal(&self.metrics, &self.log, label, "refused a peer");
    }

    /// A refusal of an authenticated device's round traffic (a late, duplicate or malformed
    /// upload, an exhausted quota, a message the round machine refused). These depend on
    /// which devices were selected, so with noise they are logged at debug level only and
    /// not counted on `/metrics`: a scrape between two rounds could attribute them to one,
    /// and only the noised sum may reveal a round's sample. Without noise they are counted
    /// like every refusal.
    fn refuse_round(&self, label: &'static str) {
        if self.coordinator.is_private() {
            self.log.warn(label, |suppressed| {
                tracing::debug!(reason = label, suppressed, "refused a round message")
            });
        } else {
            refusal(&self.metrics, &self.log, label, "refused a round message");
        }
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
                // A device already selected for the open round is not refused its own task.
                let selected_now = self
                    .coordinator
                    .current_round()
                    .is_some_and(|r| self.quota_counted.contains(&(r, device)));
                if let Err(e) = self.quota.check(device, now_ms)
                    && !selected_now
                {
                    self.refuse_round(e.label());
                    let retry_after = DailyQuota::until_reset(now_ms);
                    return Reply::ok(Response::error_with_retry(e.code(), &e.to_string(), retry_after));
                }
                // Only a device that could be selected opens a round.
                self.open_round_if_due(now);
                if self.next_start.is_none() {
                    let model = self.coordinator.model();
                    return Reply::ok(Response::finished(model, check_in.cached_model_version));
                }
                let client: ClientId = device.get();
                self.coordinator.handle_message(now, client, ClientMessage::CheckIn);
                let reply = self.answer(client, check_in.cached_model_version);
                // A selected device that checks in again gets its task again: one selection.
                if let Some(round) = reply.task_round
                    && self.quota_counted.insert((round, device))
                {
                    self.quota.record(device, now_ms);
                }
                reply
            }
            request @ (Request::Upload(_)
            | Request::AdvertiseKeys(_)
            | Request::EncryptedShares(_)
            | Request::MaskedInput(_)
            | Request::UnmaskShares(_)) => {
                // An upload (or a secure-aggregation message) carries no token: it comes from
                // the device whose check-in on the same connection was verified. An honest
                // device always checks in first.
                let Some(&device) = self.sessions.get(&conn) else {
                    self.refuse(ErrorCode::BadToken.label());
                    return Reply::strike(Response::error(
                        ErrorCode::BadToken,
                        "upload on a connection without a check-in",
                    ));
                };
                let Some(current) = self.coordinator.current_round() else {
                    self.refuse_round(ErrorCode::WrongRound.label());
                    return Reply::refused(Response::error(ErrorCode::WrongRound, "no round is open"));
                };
                let round = request.round().unwrap_or(u64::MAX);
                if round != current {
                    self.refuse_round(ErrorCode::WrongRound.label());
                    return Reply::refused(Response::error(
                        ErrorCode::WrongRound,
                        "upload for a round that is not open",
                    ));
                }
                let nonce = request.nonce().unwrap_or_default();
                if let Err(e) = self.replay.check_and_record(device, round, nonce) {
                    return self.auth_refusal(e);
                }
                if let Some(observer) = &self.observer {
                    (observer.0)(device.get(), &request);
                }
                // The round's uploads cover its item subset when it trains one.
                let layout = self.coordinator.upload_layout();
                let converted = match request {
                    Request::Upload(upload) => {
                        upload.into_client_message(&layout, self.coordinator.clip_norm())
                    }
                    Request::AdvertiseKeys(m) => Ok(m.into_client_message()),
                    Request::EncryptedShares(m) => m.into_client_message(),
                    Request::MaskedInput(m) => m.into_client_message(&layout),
                    Request::UnmaskShares(m) => m.into_client_message(),
                    Request::CheckIn(_) | Request::FetchRules(_) => {
                        return Reply::ok(Response::error(ErrorCode::Internal, "not a round message"));
                    }
                };
                let msg = match converted {
                    Ok(m) => m,
                    Err(e) => {
                        self.refuse_round(e.code().label());
                        return Reply::refused(Response::error(e.code(), &e.to_string()));
                    }
                };
                let client: ClientId = device.get();
                self.coordinator.handle_message(now, client, msg);
                match self.answer(client, None).answer {
                    Answer::Park(client) => {
                        Reply { answer: Answer::Park(client), misbehaved: false, task_round: None }
                    }
                    Answer::Response(response) => Reply::refused(*response),
                    Answer::Frame(_) => {
                        Reply::ok(Response::error(ErrorCode::Internal, "a task in answer to an upload"))
                    }
                }
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
        if e.is_peer_misbehaviour() { Reply::strike(response) } else { Reply::ok(response) }
    }

    /// The machine's answer to `client`, if it queued one.
    fn answer(&mut self, client: ClientId, cached_model_version: Option<u64>) -> Reply {
        let mut answer = None;
        while let Some((to, msg)) = self.coordinator.poll_transmit() {
            if to == client && answer.is_none() {
                answer = Some(msg);
            } else {
                self.deliver(to, msg);
            }
        }
        if answer.is_none() && self.coordinator.is_secure() {
            answer = self.mail.get_mut(&client).and_then(VecDeque::pop_front);
        }
        match answer {
            Some(ServerMessage::Selected { task, model }) => {
                match self.task_frames.frame(&task, &model, cached_model_version) {
                    Ok(frame) => Reply::task(task.round, frame),
                    Err(e) => Reply::ok(Response::error(ErrorCode::Internal, &e.to_string())),
                }
            }
            Some(msg) => {
                Reply::ok(Response::from_server_message(&msg, cached_model_version, self.retry_after))
            }
            // Secure aggregation: the next message comes when the phase closes.
            None if self.coordinator.is_secure() => {
                Reply { answer: Answer::Park(client), misbehaved: false, task_round: None }
            }
            None => Reply::ok(Response::error(ErrorCode::Internal, "no answer from the round")),
        }
    }
}

/// The encoded task frames of the latest task, with and without the model: encoded once and
/// shared by every device of the round (quinn sends from the shared buffer).
#[derive(Debug, Default)]
struct TaskFrames {
    /// The task and model version the frames encode.
    key: Option<(Task, u64)>,
    /// With the model, for devices that do not hold it.
    with_model: Option<Bytes>,
    /// Without, for devices that said they hold the model's version.
    without_model: Option<Bytes>,
}

impl TaskFrames {
    /// The frame of `task` on `model` for a device holding `cached_model_version`.
    fn frame(
        &mut self,
        task: &Task,
        model: &RoundModel,
        cached_model_version: Option<u64>,
    ) -> Result<Bytes, WireError> {
        if self.key.as_ref().is_none_or(|(t, v)| t != task || *v != model.version) {
            *self = TaskFrames { key: Some((task.clone(), model.version)), ..TaskFrames::default() };
        }
        let holds_model = cached_model_version == Some(model.version);
        let slot = if holds_model { &mut self.without_model } else { &mut self.with_model };
        if let Some(frame) = slot {
            return Ok(frame.clone());
        }
        // A subset round's rows (or 8-bit rows) go as a compact task, always with its model.
        let response = Response::task(task, model, cached_model_version);
        let frame = Bytes::from(wire::encode(&response)?);
        *slot = Some(frame.clone());
        Ok(frame)
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
