//! Federations over real QUIC on loopback: the coordinator's [`Server`] and one SDK [`Device`] per user, driving the same round machines as the in-process harness.
//!
//! A run with `--transport quic` reproduces the harness's run: the server's coordinator gets
//! the same seeded RNG (through [`fedrec_coordinator::danger`]), devices check in one after
//! another in the harness's order (each waits for the previous answer), the selected devices
//! train at once and upload in selection order. The coordinator therefore selects the same
//! devices, draws the same noise and sums the same updates in the same order: the model equals
//! the in-process one. Wall time is real here, so dropouts, which the harness resolves by
//! jumping its clock to the report deadline, are refused.
//!
//! [`Fleet`] is the device side on its own, also used by the load benchmark
//! ([`crate::loadbench`]) against a coordinator process, with many devices at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use fedrec_client::net::{
    CancelToken, Device, NetConfig, ParticipateOptions, Participation, RetryPolicy, SHUTDOWN_WAIT, Session,
    client_endpoint, secure_rng,
};
use fedrec_client::policy::AdmitAll;
use fedrec_coordinator::auth::{DeviceId, Enroller, RevocationList, TokenKey, Verifier};
use fedrec_coordinator::danger::seed_coordinator_rng;
use fedrec_coordinator::server::{ServeConfig, Server, ServerStatus};
use fedrec_shared::danger;
use fedrec_shared::harness::RoundReport;
use fedrec_shared::round::{
    Aggregation, ClientOutcome, ClientRound, CoordinatorConfig, CoordinatorEvent, Instant, Selection,
    ServerMessage,
};
use fedrec_shared::wire::{Inbound, Request};
use fedrec_shared::{GlobalModel, ModelShape, Rating};
use rand::Rng;
use rand::seq::SliceRandom;
use ring::rand::SystemRandom;
use tokio::sync::{Semaphore, oneshot, watch};

use crate::federation::{Finished, RoundView, RunConfig, UserData, coordinator_seed, harness_seed};

/// How a device's participation clock is read: time since the fleet started.
type Clock = tokio::time::Instant;

/// How devices reach one coordinator.
#[derive(Clone, Debug)]
pub struct Target {
    /// The coordinator's address.
    pub addr: SocketAddr,
    /// The name its certificate is for (`localhost` for a coordinator `init` made).
    pub server_name: String,
    /// Its certificate (DER), which the devices pin.
    pub cert: Vec<u8>,
    /// The model shape (bounds what devices read).
    pub shape: ModelShape,
}

/// Whether a round's devices take turns, as the harness does, or all go at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Check-ins one after another in the given order, uploads in selection order:
    /// reproduces the in-process run.
    InTurn,
    /// Devices take part through the SDK's own loop ([`Device::participate_with`], with its
    /// retries, backoff and honouring of the coordinator's retry hints), at most `in_flight`
    /// at once: load, as a fleet of apps makes it. With a cohort smaller than the fleet, a
    /// device that checks in after a quick round committed joins the next round.
    AllAtOnce {
        /// Most participations under way at any moment.
        in_flight: usize,
    },
}

/// The devices' side of one round.
#[derive(Debug, Clone, Default)]
pub struct FleetRound {
    /// What the devices saw, in the harness's terms (`event` is left empty).
    pub report: RoundReport,
    /// Devices selected.
    pub n_selected: usize,
    /// Participations that failed on the network or the protocol (not the device's own
    /// training), and the first such error.
    pub n_errors: usize,
    /// The first network or protocol error, if any.
    pub first_error: Option<String>,
    /// Wall time the devices spent training, summed over devices ([`Pace::InTurn`] only: the
    /// SDK's loop does not report it).
    pub train_seconds: f64,
    /// Devices the coordinator told that the federation is finished.
    pub n_finished: usize,
}

/// Devices in flight at once that share one QUIC endpoint (UDP socket) of the fleet's pool.
/// Each has its own connections, keys and state; only the socket and quinn's receive buffer
/// are shared. Below the coordinator's default `max_connections_per_source` (64), so a
/// fleet also runs against a coordinator configured for phones.
pub const DEVICES_PER_ENDPOINT: usize = 32;

/// The device side: one SDK [`Device`] per user, each with its own token and ratings. The
/// devices in flight share a pool of endpoints ([`DEVICES_PER_ENDPOINT`] each): a thousand
/// simulated phones on one machine then hold 32 sockets and receive buffers, not a thousand,
/// and a large population does not hold a socket per user.
#[derive(Debug)]
pub struct Fleet {
    target: Target,
    tokens: Vec<Vec<u8>>,
    ratings: Arc<[Vec<Rating>]>,
    timeout: Duration,
    start: Clock,
    endpoints: std::sync::Mutex<Vec<quinn::Endpoint>>,
}

/// A turnstile: step `k` may go once `k` steps have passed.
#[derive(Debug)]
struct Turns(watch::Sender<usize>);

impl Turns {
    fn new() -> Arc<Self> {
        Arc::new(Turns(watch::channel(0).0))
    }

    async fn wait(&self, k: usize) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = rx.wait_for(|&t| t >= k).await;
    }

    fn pass(&self) {
        self.0.send_modify(|t| *t += 1);
    }
}

/// What one device's participation came to.
enum Outcome {
    NotSelected,
    /// The coordinator said the federation is finished (its budget is spent).
    Finished,
    Done(ClientOutcome),
}

/// What the tasks of one round share.
struct RoundCtx {
    pace: Pace,
    in_flight: Arc<Semaphore>,
    n_devices: usize,
    /// Endpoints of the pool this round's devices use.
    n_slots: usize,
    check_ins: Arc<Turns>,
    uploads: Arc<Turns>,
    n_selected: AtomicUsize,
    train_micros: AtomicU64,
}

impl Fleet {
    /// Devices for `ratings[i]` with `tokens[i]`, reaching `target`. Every wait for the
    /// coordinator times out after `timeout`.
    pub fn new(target: Target, tokens: Vec<Vec<u8>>, ratings: Arc<[Vec<Rating>]>, timeout: Duration) -> Self {
        Fleet { target, tokens, ratings, timeout, start: Clock::now(), endpoints: Default::default() }
    }

    /// Closes the pool's endpoints and waits (at most [`SHUTDOWN_WAIT`]) until their closes
    /// are sent: call it before the runtime that drives them stops.
    pub async fn shutdown(&self) {
        let endpoints = match self.endpoints.lock() {
            Ok(mut pool) => std::mem::take(&mut *pool),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, async {
            for endpoint in &endpoints {
                endpoint.wait_idle().await;
            }
        })
        .await;
    }

    /// Endpoint `slot` of the pool, opened on first use (needs a tokio runtime).
    fn endpoint(&self, slot: usize) -> anyhow::Result<quinn::Endpoint> {
        let mut pool = self.endpoints.lock().map_err(|_| anyhow::anyhow!("the endpoint pool is poisoned"))?;
        while pool.len() <= slot {
            pool.push(client_endpoint(self.target.addr).context("opening a fleet endpoint")?);
        }
        Ok(pool[slot].clone())
    }

    /// Device `idx` on endpoint `slot` of the pool.
    fn device_on(&self, idx: usize, slot: usize) -> anyhow::Result<Device> {
        Device::with_endpoint(self.net_config(idx), self.endpoint(slot)?)
            .with_context(|| format!("device {idx}"))
    }

    /// Devices in the fleet.
    pub fn len(&self) -> usize {
        self.ratings.len()
    }

    /// Whether the fleet has no devices.
    pub fn is_empty(&self) -> bool {
        self.ratings.is_empty()
    }

    /// Device `idx`'s SDK device (a fresh endpoint; needs a tokio runtime).
    pub fn device(&self, idx: usize) -> anyhow::Result<Device> {
        Device::new(self.net_config(idx)).with_context(|| format!("device {idx}"))
    }

    /// Device `idx`'s ratings.
    pub fn ratings(&self, idx: usize) -> &[Rating] {
        &self.ratings[idx]
    }

    fn net_config(&self, idx: usize) -> NetConfig {
        NetConfig {
            server: self.target.addr,
            server_name: self.target.server_name.clone(),
            server_cert: self.target.cert.clone(),
            token: self.tokens[idx].clone(),
            sdk_version: concat!("fedrec-sim/", env!("CARGO_PKG_VERSION")).into(),
            shape: self.target.shape,
            timeout: self.timeout,
        }
    }

    /// One round: every device in `order` checks in; the selected ones train (on the runtime's
    /// worker threads) and upload. Must run on a multi-threaded tokio runtime.
    pub async fn round(self: &Arc<Self>, order: &[usize], pace: Pace) -> FleetRound {
        let in_flight = match pace {
            Pace::InTurn => order.len(),
            Pace::AllAtOnce { in_flight } => in_flight,
        };
        let ctx = Arc::new(RoundCtx {
            pace,
            in_flight: Arc::new(Semaphore::new(in_flight.clamp(1, Semaphore::MAX_PERMITS))),
            n_devices: order.len(),
            n_slots: in_flight.min(order.len()).div_ceil(DEVICES_PER_ENDPOINT).max(1),
            check_ins: Turns::new(),
            uploads: Turns::new(),
            n_selected: AtomicUsize::new(0),
            train_micros: AtomicU64::new(0),
        });
        let tasks: Vec<_> = order
            .iter()
            .enumerate()
            .map(|(pos, &idx)| {
                let (fleet, ctx) = (Arc::clone(self), Arc::clone(&ctx));
                tokio::spawn(async move { fleet.participate(idx, pos, &ctx).await })
            })
            .collect();
        let mut out = FleetRound::default();
        for task in tasks {
            let result = task.await.unwrap_or_else(|e| Err(anyhow::anyhow!("a device task failed: {e}")));
            match result {
                Ok(Outcome::NotSelected) => {}
                Ok(Outcome::Finished) => out.n_finished += 1,
                Ok(Outcome::Done(o)) => match o {
                    ClientOutcome::Completed { was_clipped, .. } => {
                        out.report.n_completed += 1;
                        out.report.n_clipped += usize::from(was_clipped);
                    }
                    ClientOutcome::Failed(_) => out.report.n_failed += 1,
                    _ => {}
                },
                Err(e) => {
                    out.n_errors += 1;
                    out.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        out.n_selected = ctx.n_selected.load(Ordering::Relaxed);
        out.train_seconds = ctx.train_micros.load(Ordering::Relaxed) as f64 * 1e-6;
        out
    }

    /// Device `idx`'s participation, `pos`-th in the round's order.
    async fn participate(&self, idx: usize, pos: usize, ctx: &RoundCtx) -> anyhow::Result<Outcome> {
        let in_turn = ctx.pace == Pace::InTurn;
        // The semaphore is never closed.
        let Ok(_permit) = Arc::clone(&ctx.in_flight).acquire_owned().await else {
            bail!("device {idx}: the round was cancelled")
        };
        // Devices in flight together sit on different slots, DEVICES_PER_ENDPOINT to a slot.
        let slot = pos % ctx.n_slots;
        if !in_turn {
            let outcome = self.participate_as_app(idx, slot).await?;
            if matches!(&outcome, Outcome::Done(o) if !matches!(o, ClientOutcome::NotSelected)) {
                ctx.n_selected.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(outcome);
        }
        if in_turn {
            ctx.check_ins.wait(pos).await;
        }
        let checked_in = self.check_in(idx, slot).await;
        // Selection ranks follow check-in order, which is only known while the turn is held.
        let rank = matches!(checked_in, Ok(Some(_))).then(|| ctx.n_selected.fetch_add(1, Ordering::Relaxed));
        ctx.check_ins.pass();
        let Some((mut device, session, task)) = checked_in? else { return Ok(Outcome::NotSelected) };
        // A secure round's sum does not depend on the order of the masked inputs, and its
        // phases wait for every device: its devices do not take turns to upload.
        let secure = matches!(&task, ServerMessage::Selected { task, .. } if task.privacy.aggregation == Aggregation::Secure);
        let mut round = ClientRound::with_rng(&self.ratings[idx], self.deadline(), secure_rng());
        let _check_in = round.poll_transmit();
        // Training is CPU work: keep the runtime's other tasks moving while it runs.
        let t0 = Clock::now();
        tokio::task::block_in_place(|| round.handle_message(self.now(), task));
        let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        ctx.train_micros.fetch_add(micros, Ordering::Relaxed);
        if in_turn {
            // Uploads start once every device has its answer, as in the harness (an early
            // commit would put late check-ins into the next round), in selection order
            // (a secure round's sum does not depend on it).
            ctx.check_ins.wait(ctx.n_devices).await;
        }
        let in_turn = in_turn && !secure;
        if in_turn {
            ctx.uploads.wait(rank.unwrap_or(0)).await;
        }
        // The rest is the SDK's own driver: the upload (or the secure phases) and the answers.
        let check_in = device.check_in();
        let now = || self.now();
        let sent = device
            .drive(&session, &mut round, &check_in, &mut AdmitAll, &now)
            .await
            .with_context(|| format!("device {idx}"));
        if in_turn {
            ctx.uploads.pass();
        }
        session.close();
        device.shutdown().await;
        sent?;
        match round.outcome() {
            Some(o) => Ok(Outcome::Done(o.clone())),
            None => bail!("device {idx}: the coordinator's answer did not end the round"),
        }
    }

    /// Device `idx` takes part as an app's SDK does: [`Device::participate_with`], which
    /// retries lost connections and `Busy` answers after the coordinator's hint; a device
    /// that was not selected (e.g. it came between two rounds) checks in again after the
    /// coordinator's hint, as an app would, until it takes part or its time budget is spent.
    async fn participate_as_app(&self, idx: usize, slot: usize) -> anyhow::Result<Outcome> {
        let mut device = self.device_on(idx, slot)?;
        let budget_end = Clock::now() + self.timeout;
        let outcome = loop {
            let left = budget_end.saturating_duration_since(Clock::now());
            let opts = ParticipateOptions {
                time_budget: left,
                retry: RetryPolicy { max_attempts: 20, ..RetryPolicy::default() },
                ..ParticipateOptions::default()
            };
            let result = device.participate_with(&self.ratings[idx], &opts, &CancelToken::new()).await;
            match result.with_context(|| format!("device {idx}")) {
                Ok(Participation::NotSelected { retry_after }) => {
                    // At least 10 ms, plus up to 10 % jitter, as the SDK paces its retries.
                    let wait = retry_after.max(Duration::from_millis(10));
                    let wait = wait + wait.mul_f64(rand::rng().random_range(0.0..0.1));
                    if Clock::now() + wait >= budget_end {
                        break Ok(Outcome::NotSelected);
                    }
                    tokio::time::sleep(wait).await;
                }
                Ok(Participation::Outcome(o)) => break Ok(Outcome::Done(o)),
                Ok(Participation::Finished { .. }) => break Ok(Outcome::Finished),
                // Refused by its own policy, or a kind of answer added later.
                Ok(_) => break Ok(Outcome::NotSelected),
                Err(e) => break Err(e),
            }
        };
        device.shutdown().await;
        outcome
    }

    /// Checks device `idx` in; its session and task when it is selected.
    async fn check_in(
        &self,
        idx: usize,
        slot: usize,
    ) -> anyhow::Result<Option<(Device, Session, ServerMessage)>> {
        let device = self.device_on(idx, slot)?;
        let session = device.connect().await.with_context(|| format!("device {idx}: connecting"))?;
        let response = session
            .request(&Request::CheckIn(device.check_in()))
            .await
            .with_context(|| format!("device {idx}: check-in"))?;
        match response.into_inbound(None).with_context(|| format!("device {idx}: check-in answer"))? {
            Inbound::Message(task @ ServerMessage::Selected { .. }) => Ok(Some((device, session, task))),
            // The turn is held here: the runtime lives on and sends the close without waiting.
            Inbound::Message(_) | Inbound::Finished { .. } => {
                session.close();
                Ok(None)
            }
            Inbound::Error { code, message } => {
                session.close();
                bail!("device {idx}: check-in refused ({code}): {message}")
            }
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    /// A device gives up on a round after a day, as in the harness (the network timeouts
    /// fire long before).
    fn deadline(&self) -> Instant {
        self.now().saturating_add(Duration::from_secs(24 * 3600))
    }
}

/// Fresh enrollment tokens for devices `1..=n`, and the verifier that accepts them.
pub fn enroll(n: usize) -> anyhow::Result<(Vec<Vec<u8>>, Verifier)> {
    let key = TokenKey::generate(&SystemRandom::new()).context("drawing a token key")?;
    let verifier = Verifier::new(vec![key.clone()], RevocationList::new())?;
    let enroller = Enroller::new(key);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let tokens = (1..=n as u64)
        .map(|id| Ok(enroller.issue(DeviceId::new(id), now_ms, None)?.to_vec()))
        .collect::<anyhow::Result<_>>()?;
    Ok((tokens, verifier))
}

/// A multi-threaded tokio runtime with `threads` workers.
pub fn runtime(threads: usize, name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .context("starting a tokio runtime")
}

/// Checks that a run can go over QUIC as it would in process.
fn check_supported(cfg: &RunConfig) -> anyhow::Result<()> {
    if cfg.dropout > 0.0 {
        bail!(
            "--dropout > 0 is not supported with --transport quic: a dropped device holds its round open \
             until the real report deadline, where the in-process harness jumps its simulated clock; \
             use --transport inproc"
        );
    }
    if cfg.reconstruct == crate::federation::ReconstructFrom::Cache
        && cfg.items_per_round.is_some_and(|k| k > 0)
    {
        bail!(
            "--reconstruct cache simulates a fresh full model on every device, which devices over QUIC do not \
             hold (they reconstruct from the round's rows): use --transport inproc, or --reconstruct subset"
        );
    }
    Ok(())
}

/// The rounds of a run over QUIC on loopback: an in-process [`Server`] seeded like the
/// in-process coordinator, and one device per user of `data`.
pub(crate) fn run_rounds(
    data: &UserData,
    cfg: &RunConfig,
    config: CoordinatorConfig,
    model: GlobalModel,
    mut on_round: impl FnMut(RoundView<'_>) -> std::ops::ControlFlow<()>,
) -> anyhow::Result<Finished> {
    check_supported(cfg)?;
    let poisson = matches!(config.selection, Selection::Poisson { .. });
    let secure_phases = config.secure.map_or(Duration::ZERO, |sa| sa.phase_window * 3);
    let close_wait = config.checkin_window + config.report_window + secure_phases + Duration::from_secs(60);
    let shape = model.shape();
    let (tokens, verifier) = enroll(data.train.len())?;
    let mut serve = ServeConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), config, model, verifier);
    // Item subsets and the download encoding, as the in-process coordinator has them.
    serve.items_per_round = cfg.items_per_round_for(data.n_items);
    serve.download = cfg.download.into();
    // The next round opens at once, before any later request: check-ins never race it.
    serve.round_gap = Duration::ZERO;
    // Devices take part as often as the run selects them, as in process.
    serve.rounds_per_device_per_day = u32::MAX;
    serve.max_connections = serve.max_connections.max(data.train.len() + 1);
    // Every device is on 127.0.0.1, and a selected one holds its connection until its turn.
    serve.max_connections_per_source = 0;
    // A selected device's connection waits for the devices before it; keep it open meanwhile.
    serve.read_timeout = Duration::from_secs(600);
    // The coordinator selects and adds noise exactly as the in-process one does: same seed,
    // same stream. Like every simulation, the noise is then known to whoever knows the seed.
    seed_coordinator_rng(&mut serve, coordinator_seed(cfg));
    // The server gets its own runtime, so that the devices' training never delays it.
    let server_rt = runtime(1, "fedrec-coordinator")?;
    let server = {
        let _enter = server_rt.enter();
        Server::bind(serve).context("starting the coordinator on loopback")?
    };
    let target = Target {
        addr: server.local_addr(),
        server_name: "localhost".into(),
        cert: server.cert_der().to_vec(),
        shape,
    };
    let mut status = server.status();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = server_rt.spawn(server.run(async {
        let _ = stopped.await;
    }));
    let fleet = Arc::new(Fleet::new(target, tokens, Arc::from(data.train.clone()), Duration::from_secs(600)));
    let device_rt = runtime(cfg.threads, "fedrec-device")?;
    let mut order_rng = danger::seeded_rng(harness_seed(cfg));
    let rounds = device_rt.block_on(async {
        // Recorded for a round the budget refused (which has no close): the last round's
        // clip norm, where the in-process run records the next one's. Only adaptive
        // clipping tells them apart.
        let mut clip_norm = cfg.clip_norm;
        for round in 0..cfg.rounds {
            let closes_before = n_closes(&status.borrow());
            let mut order: Vec<usize> = (0..fleet.len()).collect();
            order.shuffle(&mut order_rng);
            let mut devices = fleet.round(&order, Pace::InTurn).await;
            if let Some(e) = devices.first_error.take() {
                bail!("round {}: {} devices failed over QUIC; the first: {e}", round + 1, devices.n_errors);
            }
            // The harness draws every selected device's dropout; keep its RNG in step.
            for _ in 0..devices.n_selected {
                order_rng.random_bool(cfg.dropout);
            }
            let s = tokio::time::timeout(
                close_wait,
                status.wait_for(|s| n_closes(s) > closes_before || s.start_refused.is_some()),
            )
            .await
            .with_context(|| format!("round {}: the coordinator did not close it", round + 1))?
            .context("the coordinator stopped")?
            .clone();
            let closed = n_closes(&s) > closes_before;
            devices.report.event = if closed { s.last_close.clone() } else { None };
            if let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &devices.report.event {
                clip_norm = stats.clip_norm;
                if poisson && stats.n_checked_in < fleet.len() {
                    bail!(
                        "round {}: only {} of {} devices checked in before check-in closed; raise --checkin-window-ms",
                        round + 1,
                        stats.n_checked_in,
                        fleet.len()
                    );
                }
            }
            if on_round(RoundView { report: &devices.report, model: &s.model, clip_norm }).is_break() {
                break;
            }
        }
        fleet.shutdown().await;
        let s = status.borrow().clone();
        Ok(Finished { model: (*s.model).clone(), n_charged: s.n_ledger_entries })
    });
    let _ = stop.send(());
    let stopped = server_rt.block_on(served);
    let finished = rounds?;
    stopped.context("the coordinator task")?.context("the coordinator")?;
    Ok(finished)
}

/// Rounds the server has closed.
fn n_closes(s: &ServerStatus) -> u64 {
    s.n_committed + s.n_abandoned
}
