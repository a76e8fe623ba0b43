//! An in-process coordinator [`Server`] on loopback QUIC, with the test defaults and what a test needs to reach, watch and stop it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedrec_client::net::{Device, NetConfig, Participation};
use fedrec_client::policy::PrivacyPolicy;
use fedrec_client::sdk::{Consent, Sdk, SdkConfig};
use fedrec_client::signals::{Event, EventKind};
use fedrec_coordinator::auth::{DeviceId, Enroller, RevocationList, TokenKey, Verifier};
use fedrec_coordinator::metrics::ServerMetrics;
use fedrec_coordinator::server::{ServeConfig, Server, ServerError, ServerStatus};
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::round::{ClientOutcome, CoordinatorConfig, Selection};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, TrainParams};
use ring::rand::SystemRandom;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::{net_config, series, unix_ms};

/// Explicit ratings with the regularisation every in-process test uses.
pub const TRAIN: TrainParams = TrainParams {
    objective: Objective::Explicit,
    l2_user: 1.0,
    l2_user_bias: 0.1,
    l2_item: 0.05,
    l2_item_bias: 0.01,
    user_support_exponent: 0.0,
};

/// The expected population [`coordinator_config`] declares: Poisson selection with noise
/// divides the sum by `q` times it.
pub const POPULATION: usize = 16;

/// A round configuration without noise or budget: [`TRAIN`], Adam at 0.1, a check-in window
/// of 2 s, a report window of 5 s, clipping at 10, centroids from a single member, an expected
/// population of [`POPULATION`] devices.
pub fn coordinator_config(selection: Selection, min_reports: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        train: TRAIN,
        optimizer: ServerOptimizer::adam(0.1),
        selection,
        min_reports,
        population: Some(POPULATION),
        checkin_window: Duration::from_secs(2),
        report_window: Duration::from_secs(5),
        clip_norm: 10.0,
        adaptive_clip: None,
        noise_multiplier: 0.0,
        centroids: CentroidPolicy::with_min_count(1.0),
        privacy: None,
        secure: None,
    }
}

/// A fresh model of `shape` with small random factors drawn from `seed`.
pub fn initial_model(shape: ModelShape, global_mean: f32, seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.1, global_mean, centroid_scale: 1e-3 };
    GlobalModel::init(shape, init, &mut seeded_rng(seed)).expect("valid shape")
}

/// A [`Server`] running on a tokio task, with its address, certificate, status and metrics,
/// and an enroller for its devices' tokens.
#[derive(Debug)]
pub struct LoopbackServer {
    addr: SocketAddr,
    cert: Vec<u8>,
    shape: ModelShape,
    status: watch::Receiver<ServerStatus>,
    metrics: Arc<ServerMetrics>,
    metrics_addr: Option<SocketAddr>,
    enroller: Enroller,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl LoopbackServer {
    /// A server on a free loopback port with a fresh token key; see [`LoopbackServer::try_start`].
    pub fn start(
        coordinator: CoordinatorConfig,
        model: GlobalModel,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> LoopbackServer {
        let key = TokenKey::generate(&SystemRandom::new()).expect("the system RNG works");
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::try_start(listen, key, coordinator, model, configure).expect("the server binds to loopback")
    }

    /// Binds a server on `listen` that accepts tokens signed by `key`, with a round gap of
    /// 20 ms and a retry hint of 50 ms, then `configure`; runs it until [`LoopbackServer::stop`].
    pub fn try_start(
        listen: SocketAddr,
        key: TokenKey,
        coordinator: CoordinatorConfig,
        model: GlobalModel,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> Result<LoopbackServer, ServerError> {
        let verifier = Verifier::new(vec![key.clone()], RevocationList::new()).expect("one key");
        let shape = model.shape();
        let mut cfg = ServeConfig::new(listen, coordinator, model, verifier);
        cfg.round_gap = Duration::from_millis(20);
        cfg.retry_after = Duration::from_millis(50);
        configure(&mut cfg);
        let server = Server::bind(cfg)?;
        let (stop, stopped) = oneshot::channel::<()>();
        Ok(LoopbackServer {
            addr: server.local_addr(),
            cert: server.cert_der().to_vec(),
            shape,
            status: server.status(),
            metrics: server.metrics(),
            metrics_addr: server.metrics_addr(),
            enroller: Enroller::new(key),
            stop,
            task: tokio::spawn(async move {
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("the server runs and stops cleanly");
            }),
        })
    }

    /// An SDK for device `id` in `dir`, pointed at this server, under `policy`, with both
    /// consents given and six clicks recorded (items below 20).
    pub fn open_sdk(&self, id: u64, dir: &std::path::Path, policy: PrivacyPolicy) -> Sdk {
        let mut cfg = SdkConfig::new(dir, [id as u8; 32]);
        cfg.coordinator = Some(self.net_config(self.token(id)));
        cfg.policy = policy;
        let sdk = Sdk::open(cfg).expect("the SDK opens");
        sdk.set_consent(Consent { personalization: true, training: true }).expect("consent");
        let now = i64::try_from(unix_ms() / 1000).expect("in range");
        let events: Vec<Event> = (0..6u32)
            .map(|k| Event {
                item: (k * 3 + id as u32) % 20,
                kind: EventKind::Click,
                value: 1.0,
                timestamp_s: now,
            })
            .collect();
        sdk.record_batch(&events).expect("events");
        sdk
    }

    /// The QUIC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's certificate (DER).
    pub fn cert(&self) -> &[u8] {
        &self.cert
    }

    /// The status the server publishes after every round close.
    pub fn status(&self) -> &watch::Receiver<ServerStatus> {
        &self.status
    }

    /// The server's counters.
    pub fn metrics(&self) -> &ServerMetrics {
        &self.metrics
    }

    /// The metrics endpoint, if one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The number of `fedrec_rejected_total` refusals with `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        let text = self.metrics.render();
        series(&text, &format!("fedrec_rejected_total{{reason=\"{reason}\"}}"))
            .map_or(0, |n| n.parse().expect("a counter is an integer"))
    }

    /// A valid token for device `id`.
    pub fn token(&self, id: u64) -> Vec<u8> {
        self.enroller.issue(DeviceId::new(id), unix_ms(), None).expect("a token").to_vec()
    }

    /// How a device with `token` reaches this server, waiting up to 10 s for each step.
    pub fn net_config(&self, token: Vec<u8>) -> NetConfig {
        net_config(self.addr, self.cert.clone(), token, self.shape, Duration::from_secs(10))
    }

    /// Enrolled device `id`.
    pub fn device(&self, id: u64) -> Device {
        Device::new(self.net_config(self.token(id))).expect("the client endpoint binds")
    }

    /// Devices `1..=ratings.len()` take part at once through the SDK's own loop, each with its
    /// ratings (device `id` has `ratings[id - 1]`), checking in again after every "not
    /// selected" until it has an outcome; the outcomes, in device order.
    pub async fn participate_all(&self, ratings: Arc<Vec<Vec<Rating>>>) -> Vec<ClientOutcome> {
        let mut tasks = Vec::new();
        for id in 1..=ratings.len() as u64 {
            let mut device = self.device(id);
            let ratings = Arc::clone(&ratings);
            tasks.push(tokio::spawn(async move {
                let mine = &ratings[id as usize - 1];
                let outcome = loop {
                    match device.participate(mine).await.expect("the device is served") {
                        Participation::NotSelected { retry_after } => tokio::time::sleep(retry_after).await,
                        Participation::Outcome(o) => break o,
                        other => panic!("unexpected participation {other:?}"),
                    }
                };
                device.shutdown().await;
                outcome
            }));
        }
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(task.await.expect("the device task"));
        }
        outcomes
    }

    /// Stops the server and waits for its task; the last status it published.
    pub async fn stop(self) -> ServerStatus {
        let _ = self.stop.send(());
        self.task.await.expect("the server task ends cleanly");
        // The sender is gone; the last value published is the final state.
        self.status.borrow().clone()
    }
}
