//! `fedrec-sim bench --aggregation secure`: what secure aggregation costs one cohort — device CPU beyond a plain round, bytes on the wire, the coordinator's unmasking — measured on the real `DeviceSecAgg` and `ServerSecAgg` machines.
//!
//! One measured round is a cohort of `N` devices on the run's model (users reused when `N`
//! exceeds the data's users: the protocol's cost does not depend on which ratings). Each device
//! does the plain device step (reconstruct, local update, clip), then the secure steps: encode
//! and fresh keys, share keys, masked input, unmask. Each device vanishes with probability `D`
//! before one of its four secure messages, drawn uniformly, as the harness does. Device steps
//! of one phase run on worker threads and are timed one device at a time with a wall clock; the
//! coordinator's calls run alone between phases and are timed as a whole. Bytes are the wire
//! frames (protocol v2, length prefix included) of every message a device sends and receives.

use std::sync::Arc;
use std::time::{Duration, Instant as WallClock};

use anyhow::{Context, bail};
use fedrec_shared::danger;
use fedrec_shared::ddp;
use fedrec_shared::privacy::discrete::Grid;
use fedrec_shared::round::secure::{DeviceSecAgg, DistributedPolicy, SecurePolicy, ServerSecAgg};
use fedrec_shared::round::{
    ClientId, ClientMessage, EncryptedShare, MaskedInputRequest, ServerMessage, ShareKeysRequest, Task,
    TaskPrivacy, UnmaskRequest, UnmaskShares, distributed_params,
};
use fedrec_shared::secagg::encode;
use fedrec_shared::train::{local_update, reconstruct, validate_ratings};
use fedrec_shared::update::ClippedUpdate;
use fedrec_shared::wire::{self, CheckIn, NONCE_LEN, Request, Response};
use fedrec_shared::{Rating, RoundModel};
use rand::Rng;
use serde::Serialize;

use crate::federation::{self, AggregationKind, MechanismKind, RunConfig, UserData};

/// What to measure: every cohort size with every dropout rate, `repeat` rounds each.
#[derive(Debug, Clone, PartialEq)]
pub struct SecBenchConfig {
    /// Cohort sizes `N` (devices selected into the round).
    pub cohorts: Vec<usize>,
    /// Probabilities that a device vanishes before one of its four secure messages.
    pub dropouts: Vec<f64>,
    /// Measured rounds per (cohort, dropout).
    pub repeat: usize,
}

/// One measured secure round (one object of the JSON report's `runs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecRun {
    /// Devices selected into the round (`N`).
    pub cohort: usize,
    /// Which repetition of this (cohort, dropout), from 0.
    pub repetition: usize,
    /// Probability that a device vanished before one of its four secure messages.
    pub dropout: f64,
    /// The protocol's `n`: devices whose keys arrived (U1); `k`, `t` and `bits` are for it.
    /// 0 when too few keys arrived for any parameters.
    pub n: usize,
    /// Neighbours per device (`n − 1`: the complete graph).
    pub k: u32,
    /// Shares that rebuild a secret.
    pub t: u32,
    /// Ring width: masked words live in `Z/2^bits`.
    pub bits: u32,
    /// Devices that vanished.
    pub vanished: usize,
    /// Devices that stopped the round themselves (their policy or the protocol refused).
    pub refused: usize,
    /// Devices whose shares arrived (U2).
    pub shared: usize,
    /// Devices whose masked input is in the sum (U3).
    pub survivors: usize,
    /// Devices whose unmask shares arrived (U4): they ran the whole protocol.
    pub unmasked: usize,
    /// Whether the coordinator unmasked the sum (false: the round aborted).
    pub completed: bool,
    /// Why the round aborted, when it did.
    pub abort: Option<String>,
    /// Median over devices that ran every secure step of the time of those steps (encode +
    /// `DeviceSecAgg::new` + `share_keys` + `masked_input` + `unmask`), in ms.
    pub device_ms_median: f64,
    /// 95th percentile (nearest rank) of the same.
    pub device_ms_p95: f64,
    /// Medians of each secure step alone: encode + keys, share keys, masked input, unmask (ms).
    pub device_step_ms_median: [f64; 4],
    /// Median over devices of the plain device step (reconstruct, local update, clip), in ms.
    pub plain_device_ms_median: f64,
    /// 95th percentile of the same.
    pub plain_device_ms_p95: f64,
    /// Mean bytes a device that ran the whole protocol sent: `AdvertiseKeys`,
    /// `EncryptedShares`, `MaskedInput`, `UnmaskShares`.
    pub bytes_up_per_device: f64,
    /// Mean bytes it received: the task (with the model), `ShareKeys`, `MaskedInputRequest`,
    /// `Unmask`, the acknowledgement.
    pub bytes_down_per_device: f64,
    /// Bytes a device sends in a plain round: the upload.
    pub plain_bytes_up_per_device: f64,
    /// Bytes it receives: the task (with the model) and the acknowledgement.
    pub plain_bytes_down_per_device: f64,
    /// (secure up + down − plain up − plain down) / (plain up + down).
    pub extra_bytes_fraction: f64,
    /// (secure up − plain up) / plain up.
    pub extra_bytes_up_fraction: f64,
    /// Time in `ServerSecAgg` for the round: every `add_*`, `close_*` and `finish`, in ms.
    pub coordinator_ms: f64,
    /// Time in `ServerSecAgg::finish` alone (rebuilding secrets and removing masks), in ms.
    pub coordinator_unmask_ms: f64,
    /// Wall time of the whole measured round, in seconds.
    pub wall_seconds: f64,
    /// Distributed noise (`--mechanism distributed`): what the device's encoding costs.
    pub distributed: Option<DdpCost>,
}

/// What distributed noise adds on the device (`docs/ddp.md`), measured in a round with
/// `--mechanism distributed`: the rotation, scaling, conditional rounding, the noise share and
/// the wrap ([`ddp::encode`], the function the device's share-keys step calls), timed alone
/// on the round's parameters, and the masked input's size against the central secure round's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DdpCost {
    /// Ring width `b` of the noised words.
    pub bits: u32,
    /// Coordinates of the update (`d`).
    pub dim: usize,
    /// Padded dimension `D` (the next power of two): words in the masked input.
    pub padded_dim: usize,
    /// Median over the devices that encoded of the time of [`ddp::encode`], in ms.
    pub encode_ms_median: f64,
    /// 95th percentile (nearest rank) of the same.
    pub encode_ms_p95: f64,
    /// Bytes of the `MaskedInput` frame with distributed noise (`D` words, in the narrowest
    /// width the ring needs: 2 bytes for up to 16 bits).
    pub masked_input_bytes: usize,
    /// Bytes of the `MaskedInput` frame of a central secure round on the same model (`d`
    /// words, plus the clip bit when asked for, at 4 bytes each: a ring of at most 32 bits).
    pub central_masked_input_bytes: usize,
}

/// The medians over the repetitions of one (cohort, dropout): one row of the summary table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecRow {
    /// Devices selected.
    pub cohort: usize,
    /// Dropout probability.
    pub dropout: f64,
    /// Neighbours (of the first repetition).
    pub k: u32,
    /// Threshold (of the first repetition).
    pub t: u32,
    /// Ring width (of the first repetition).
    pub bits: u32,
    /// Median of the runs' `survivors`.
    pub survivors: f64,
    /// Repetitions whose round completed.
    pub completed_rounds: usize,
    /// Repetitions.
    pub rounds: usize,
    /// Median of the runs' `device_ms_median`.
    pub device_ms_median: f64,
    /// Median of the runs' `device_ms_p95`.
    pub device_ms_p95: f64,
    /// Median of the runs' `plain_device_ms_median`.
    pub plain_device_ms_median: f64,
    /// Median of the runs' `bytes_up_per_device`.
    pub bytes_up_per_device: f64,
    /// Median of the runs' `bytes_down_per_device`.
    pub bytes_down_per_device: f64,
    /// Plain upload bytes.
    pub plain_bytes_up_per_device: f64,
    /// Plain task and acknowledgement bytes.
    pub plain_bytes_down_per_device: f64,
    /// Median of the runs' `extra_bytes_fraction`.
    pub extra_bytes_fraction: f64,
    /// Median of the runs' `coordinator_ms`.
    pub coordinator_ms: f64,
    /// Median of the runs' `coordinator_unmask_ms`.
    pub coordinator_unmask_ms: f64,
}

/// The whole measurement: every run and the summary table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecBenchReport {
    /// Every measured round.
    pub runs: Vec<SecRun>,
    /// One row per (cohort, dropout), and how the devices were run.
    pub summary: SecSummary,
}

/// The summary of a measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecSummary {
    /// One row per (cohort, dropout).
    pub rows: Vec<SecRow>,
    /// Worker threads the device steps of one phase ran on (each device timed alone).
    pub device_threads: usize,
    /// Coordinates of an update (the model's layout, plus the clip bit when the task asks).
    pub update_len: usize,
    /// The finder's planned dropout δ and colluding fraction γ (`--secagg-dropout`,
    /// `--secagg-corrupt`).
    pub finder_dropout: f64,
    /// See `finder_dropout`.
    pub finder_corrupt: f64,
    /// The largest `device_ms_median` of the rows.
    pub max_device_ms_median: f64,
    /// The largest `extra_bytes_fraction` of the rows.
    pub max_extra_bytes_fraction: f64,
}

/// How far a device got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Still answering.
    Active,
    /// Vanished before a message.
    Vanished,
    /// Stopped the round itself.
    Refused,
}

/// A request of the coordinator waiting for a device.
enum Inbox {
    Share(ShareKeysRequest),
    Mask(MaskedInputRequest),
    Unmask(UnmaskRequest),
}

/// A device's answer, for the coordinator.
enum Reply {
    Shares(Vec<EncryptedShare>),
    Words(Vec<u64>),
    Unmask(UnmaskShares),
}

/// A device's generator of secrets (the simulator's seeded ChaCha20, from [`danger`]).
trait DeviceRng: rand::RngCore + rand::CryptoRng + Send {}

impl<R: rand::RngCore + rand::CryptoRng + Send> DeviceRng for R {}

/// One simulated device and what it spent.
struct Device<'a> {
    id: ClientId,
    ratings: &'a [Rating],
    /// The secure message (0 keys … 3 unmask) it vanishes before, if any.
    vanish_at: Option<u8>,
    rng: Box<dyn DeviceRng>,
    sec: Option<DeviceSecAgg>,
    inbox: Option<Inbox>,
    status: Status,
    /// Secure steps done (0..=4) and their times in ms.
    steps: usize,
    step_ms: [f64; 4],
    plain_ms: f64,
    up: usize,
    down: usize,
    plain_up: usize,
    /// Distributed noise: the clipped update (dense), kept to time [`ddp::encode`] alone once
    /// the round's parameters are known, and that time in ms.
    dense: Option<Vec<f32>>,
    ddp_encode_ms: Option<f64>,
}

/// What every device of a round shares: the model, the run, the secure grid, the check-in.
struct Shared<'m> {
    model: &'m Arc<RoundModel>,
    cfg: &'m RunConfig,
    grid: Grid,
    clip_bit: bool,
    check_in: CheckIn,
    /// Distributed noise: the task's privacy declaration the devices derive the noise from.
    ddp: Option<TaskPrivacy>,
}

fn frame_len_request(msg: &ClientMessage, check_in: &CheckIn) -> anyhow::Result<usize> {
    let req = Request::from_client_message(msg, check_in, [0u8; NONCE_LEN]);
    Ok(wire::encode(&req).context("encoding a device's message")?.len())
}

fn frame_len_response(msg: &ServerMessage) -> anyhow::Result<usize> {
    let resp = Response::from_server_message(msg, None, Duration::from_secs(1));
    Ok(wire::encode(&resp).context("encoding a coordinator message")?.len())
}

fn millis(since: WallClock) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Device<'_> {
    /// The plain device step (timed, with its upload's frame), then, unless the device
    /// vanishes before its keys, secure phase 0: encode and fresh keys (timed). Returns the
    /// keys to advertise.
    fn start(&mut self, sh: &Shared<'_>) -> anyhow::Result<Option<([u8; 32], [u8; 32])>> {
        let params = sh.cfg.train_params();
        let t0 = WallClock::now();
        validate_ratings(self.ratings, sh.model.model.shape().n_items, &params.objective)?;
        let user = reconstruct(sh.model, self.ratings, &params)?;
        let update =
            ClippedUpdate::clip(local_update(sh.model, self.ratings, &user, &params), sh.cfg.clip_norm)?;
        self.plain_ms = millis(t0);
        let was_clipped = update.was_clipped();
        let within_bound = sh.clip_bit.then_some(!was_clipped);
        let upload = ClientMessage::Upload { round: 0, update, within_bound };
        self.plain_up = frame_len_request(&upload, &sh.check_in)?;
        let ClientMessage::Upload { update, .. } = upload else { bail!("the upload changed kind") };
        if self.vanish_at == Some(0) {
            self.status = Status::Vanished;
            return Ok(None);
        }
        let t0 = WallClock::now();
        let (sec, cipher_public, mask_public) = match sh.ddp {
            // Distributed noise: the device holds its update until share-keys brings the
            // round's seed, and encodes it then (timed in step 1, and alone in `ddp_encode_ms`).
            Some(privacy) => {
                let dense = update.vector().to_dense();
                self.dense = Some(dense.clone());
                DeviceSecAgg::new_distributed(
                    0,
                    dense,
                    privacy,
                    sh.cfg.clip_norm,
                    SecurePolicy::default(),
                    DistributedPolicy::default(),
                    &mut self.rng,
                )
            }
            None => {
                let encoded = encode::encode(&update, &sh.grid, within_bound, &mut self.rng)
                    .context("encoding an update for secure aggregation")?;
                DeviceSecAgg::new(0, encoded, sh.grid, sh.clip_bit, SecurePolicy::default(), &mut self.rng)
            }
        };
        drop(update);
        self.step_ms[0] = millis(t0);
        self.steps = 1;
        self.sec = Some(sec);
        let advertise = ClientMessage::AdvertiseKeys { round: 0, cipher_public, mask_public };
        self.up += frame_len_request(&advertise, &sh.check_in)?;
        Ok(Some((cipher_public, mask_public)))
    }

    /// Secure phases 1–3: receives the waiting request (its frame counted), then vanishes,
    /// refuses, or answers (timed, its frame counted).
    fn step(&mut self, check_in: &CheckIn) -> anyhow::Result<Option<Reply>> {
        let Some(inbox) = self.inbox.take() else { return Ok(None) };
        if self.status != Status::Active {
            return Ok(None);
        }
        let Some(sec) = self.sec.as_mut() else { return Ok(None) };
        let (phase, msg) = match inbox {
            Inbox::Share(r) => (1u8, ServerMessage::ShareKeys(r)),
            Inbox::Mask(r) => (2, ServerMessage::MaskedInputRequest(r)),
            Inbox::Unmask(r) => (3, ServerMessage::Unmask(r)),
        };
        self.down += frame_len_response(&msg)?;
        if self.vanish_at == Some(phase) {
            self.status = Status::Vanished;
            self.sec = None;
            return Ok(None);
        }
        let t0 = WallClock::now();
        let answer = match msg {
            ServerMessage::ShareKeys(req) => sec
                .share_keys(req, &mut self.rng)
                .map(|shares| ClientMessage::EncryptedShares { round: 0, shares }),
            ServerMessage::MaskedInputRequest(req) => {
                sec.masked_input(req).map(|words| ClientMessage::MaskedInput { round: 0, words })
            }
            ServerMessage::Unmask(req) => sec.unmask(&req).map(ClientMessage::UnmaskShares),
            _ => bail!("not a secure request"),
        };
        self.step_ms[usize::from(phase)] = millis(t0);
        let answer = match answer {
            Ok(a) => a,
            Err(_) => {
                self.status = Status::Refused;
                self.sec = None;
                return Ok(None);
            }
        };
        self.steps += 1;
        self.up += frame_len_request(&answer, check_in)?;
        Ok(Some(match answer {
            ClientMessage::EncryptedShares { shares, .. } => Reply::Shares(shares),
            ClientMessage::MaskedInput { words, .. } => Reply::Words(words),
            ClientMessage::UnmaskShares(a) => Reply::Unmask(a),
            _ => bail!("not a secure answer"),
        }))
    }
}

/// Runs `f` on every item of `items` on up to `threads` scoped threads (contiguous chunks),
/// returning the results in order.
fn par_map<T: Send, U: Send>(
    items: &mut [T],
    threads: usize,
    f: impl Fn(&mut T) -> anyhow::Result<U> + Sync,
) -> anyhow::Result<Vec<U>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let chunk = items.len().div_ceil(threads.max(1));
    let f = &f;
    let parts: Vec<anyhow::Result<Vec<U>>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            items.chunks_mut(chunk).map(|c| s.spawn(move || c.iter_mut().map(f).collect())).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a device thread panicked"))))
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Timed calls into the coordinator's machine.
struct Timed {
    total: Duration,
}

impl Timed {
    fn run<U>(&mut self, f: impl FnOnce() -> U) -> U {
        let t0 = WallClock::now();
        let out = f();
        self.total += t0.elapsed();
        out
    }
}

/// Runs one phase's requests through the devices in batches (the devices' steps on worker
/// threads), handing each batch's answers to `deliver` in device order. Batches keep at most a
/// batch of masked inputs in memory.
fn phase<'a>(
    devices: &mut [Device<'a>],
    threads: usize,
    check_in: &CheckIn,
    mut deliver: impl FnMut(ClientId, Reply) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let batch = (threads.max(1) * 16).max(1);
    for chunk in devices.chunks_mut(batch) {
        let replies = par_map(chunk, threads, |d| d.step(check_in))?;
        for (d, reply) in chunk.iter().zip(replies) {
            if let Some(r) = reply {
                deliver(d.id, r)?;
            }
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// The nearest-rank quantile (NaN for an empty list).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn mean(v: &[usize]) -> f64 {
    if v.is_empty() { f64::NAN } else { v.iter().sum::<usize>() as f64 / v.len() as f64 }
}

/// One measured secure round of `cohort` devices with dropout `dropout`.
fn one_round(
    data: &UserData,
    users: &[usize],
    cfg: &RunConfig,
    cohort: usize,
    dropout: f64,
    repetition: usize,
) -> anyhow::Result<SecRun> {
    let wall = WallClock::now();
    let model = Arc::new(RoundModel::new(0, federation::initial_model(data, cfg)?));
    let layout = model.model.shape().layout();
    let grid = Grid::for_secure_sum(cfg.clip_norm, layout.len()).context("the secure grid")?;
    let clip_bit = cfg.adaptive_clip;
    let n_users = data.train.len();
    let task_frame = |aggregation| -> anyhow::Result<usize> {
        // A plain round's task has central noise (distributed noise needs a masked sum).
        let mechanism =
            if aggregation == AggregationKind::Plain { MechanismKind::Central } else { cfg.mechanism };
        let c = RunConfig { aggregation, mechanism, ..cfg.clone() };
        let config = federation::coordinator_config(&c, n_users)?;
        let task = Task {
            round: 0,
            train: cfg.train_params(),
            clip_norm: cfg.clip_norm,
            report_clip_bit: clip_bit,
            report_window: config.report_window,
            privacy: TaskPrivacy::from_config(&config, cfg.clip_norm),
        };
        frame_len_response(&ServerMessage::Selected { task, model: Arc::clone(&model) })
    };
    let plain_task = task_frame(AggregationKind::Plain)?;
    let secure_task = task_frame(AggregationKind::Secure)?;
    let distributed = cfg.mechanism == MechanismKind::Distributed;
    // Distributed noise: the task's declaration, as the coordinator would send it.
    let ddp_privacy = if distributed {
        // Calibrated for this cohort: the round's expected size is the measured cohort.
        let c = RunConfig { aggregation: AggregationKind::Secure, clients_per_round: cohort, ..cfg.clone() };
        Some(TaskPrivacy::from_config(
            &federation::coordinator_config(&c, n_users.max(cohort))?,
            cfg.clip_norm,
        ))
    } else {
        None
    };
    let ack = frame_len_response(&ServerMessage::Ack { round: 0 })?;
    let check_in = CheckIn {
        token: Vec::new(),
        sdk_version: String::new(),
        capabilities: 0,
        cached_model_version: None,
    };
    let sh = Shared { model: &model, cfg, grid, clip_bit, check_in, ddp: ddp_privacy };

    // Reproducible per (seed, cohort, dropout, repetition).
    let mut rng = danger::seeded_rng(
        cfg.seed
            ^ (cohort as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ dropout.to_bits().rotate_left(17)
            ^ (repetition as u64) << 48,
    );
    let mut devices: Vec<Device<'_>> = (0..cohort)
        .map(|d| {
            let vanish_at = rng.random_bool(dropout).then(|| rng.random_range(0..4u8));
            Device {
                id: d as ClientId,
                ratings: &data.train[users[d % users.len()]],
                vanish_at,
                rng: Box::new(danger::seeded_device_rng(rng.random())),
                dense: None,
                ddp_encode_ms: None,
                sec: None,
                inbox: None,
                status: Status::Active,
                steps: 0,
                step_ms: [0.0; 4],
                plain_ms: 0.0,
                up: 0,
                down: secure_task,
                plain_up: 0,
            }
        })
        .collect();
    let mut coord_rng = danger::seeded_rng(rng.random());
    let mut server = match &sh.ddp {
        Some(privacy) => {
            let template = distributed_params(privacy, cfg.clip_norm, layout.len(), cfg.bits, [0; 32])
                .context("distributed noise for this run (--bits, --noise-multiplier / --epsilon)")?;
            ServerSecAgg::new_distributed(0, template, cfg.secagg_dropout, cfg.secagg_corrupt)
        }
        None => ServerSecAgg::new(0, layout.len(), grid, clip_bit, cfg.secagg_dropout, cfg.secagg_corrupt),
    };
    let mut timed = Timed { total: Duration::ZERO };
    let threads = cfg.threads.max(1);

    // Phase 0: train, encode, keys.
    let batch = threads * 16;
    for chunk in devices.chunks_mut(batch) {
        let keys = par_map(chunk, threads, |d| d.start(&sh))?;
        for (d, k) in chunk.iter().zip(keys) {
            if let Some((c, m)) = k {
                timed
                    .run(|| server.add_keys(d.id, c, m))
                    .map_err(|e| anyhow::anyhow!("the coordinator refused device {}'s keys: {e}", d.id))?;
            }
        }
    }
    let mut abort = None;
    let mut unmask_ms = 0.0;
    let mut completed = false;
    let mut setup = None;
    'round: {
        let requests = match timed.run(|| server.close_keys(&mut coord_rng)) {
            Ok(r) => r,
            Err(e) => {
                abort = Some(e.to_string());
                break 'round;
            }
        };
        setup = server.setup();
        if let Some(params) = server.ddp_params().cloned() {
            // The encoding alone, on the round's parameters: the device's extra work.
            let params = &params;
            par_map(&mut devices, threads, |d| {
                if let Some(dense) = d.dense.take() {
                    let t0 = WallClock::now();
                    ddp::encode(&dense, params, &mut d.rng).context("encoding with distributed noise")?;
                    d.ddp_encode_ms = Some(millis(t0));
                }
                Ok(())
            })?;
        }
        for (id, req) in requests {
            devices[id as usize].inbox = Some(Inbox::Share(req));
        }
        phase(&mut devices, threads, &sh.check_in, |id, r| match r {
            Reply::Shares(s) => timed
                .run(|| server.add_shares(id, s))
                .map_err(|e| anyhow::anyhow!("the coordinator refused device {id}'s shares: {e}")),
            _ => bail!("an answer out of phase"),
        })?;
        let requests = match timed.run(|| server.close_shares()) {
            Ok(r) => r,
            Err(e) => {
                abort = Some(e.to_string());
                break 'round;
            }
        };
        for (id, req) in requests {
            devices[id as usize].inbox = Some(Inbox::Mask(req));
        }
        phase(&mut devices, threads, &sh.check_in, |id, r| match r {
            Reply::Words(w) => timed
                .run(|| server.add_masked(id, &w))
                .map_err(|e| anyhow::anyhow!("the coordinator refused device {id}'s masked input: {e}")),
            _ => bail!("an answer out of phase"),
        })?;
        let requests = match timed.run(|| server.close_masked()) {
            Ok(r) => r,
            Err(e) => {
                abort = Some(e.to_string());
                break 'round;
            }
        };
        for (id, req) in requests {
            devices[id as usize].inbox = Some(Inbox::Unmask(req));
        }
        phase(&mut devices, threads, &sh.check_in, |id, r| match r {
            Reply::Unmask(a) => timed
                .run(|| server.add_unmask(id, a))
                .map_err(|e| anyhow::anyhow!("the coordinator refused device {id}'s unmask shares: {e}")),
            _ => bail!("an answer out of phase"),
        })?;
    }
    let (n_shared, n_masked, n_unmasked) = (server.n_shared(), server.n_masked(), server.n_unmasked());
    let server_ddp = server.ddp_params().map(|p| (p.bits(), p.padded_dim()));
    if abort.is_none() {
        let t0 = WallClock::now();
        let finished = timed.run(|| server.finish());
        unmask_ms = millis(t0);
        match finished {
            Ok(_) => completed = true,
            Err(e) => abort = Some(e.to_string()),
        }
    }
    // Devices that ran every secure step get the acknowledgement when the round completed.
    let full: Vec<&Device<'_>> =
        devices.iter().filter(|d| d.status == Status::Active && d.steps == 4).collect();
    let secure_ms: Vec<f64> = full.iter().map(|d| d.step_ms.iter().sum()).collect();
    let step_median = |i: usize| median(&full.iter().map(|d| d.step_ms[i]).collect::<Vec<_>>());
    let plain_ms: Vec<f64> = devices.iter().map(|d| d.plain_ms).collect();
    let up = mean(&full.iter().map(|d| d.up).collect::<Vec<_>>());
    let down = mean(&full.iter().map(|d| d.down + if completed { ack } else { 0 }).collect::<Vec<_>>());
    let plain_up = mean(&devices.iter().map(|d| d.plain_up).collect::<Vec<_>>());
    let plain_down = (plain_task + ack) as f64;
    let setup_n = setup.map_or(0, |s| s.n as usize);
    let distributed = match server_ddp {
        Some((bits, padded_dim)) => {
            let encode_ms: Vec<f64> = devices.iter().filter_map(|d| d.ddp_encode_ms).collect();
            let words =
                |n: usize| ClientMessage::MaskedInput { round: 0, words: vec![u64::MAX >> (64 - bits); n] };
            let central_len = layout.len() + usize::from(clip_bit);
            Some(DdpCost {
                bits,
                dim: layout.len(),
                padded_dim,
                encode_ms_median: median(&encode_ms),
                encode_ms_p95: quantile(&encode_ms, 0.95),
                masked_input_bytes: frame_len_request(&words(padded_dim), &sh.check_in)?,
                central_masked_input_bytes: frame_len_request(
                    &ClientMessage::MaskedInput { round: 0, words: vec![u64::from(u32::MAX); central_len] },
                    &sh.check_in,
                )?,
            })
        }
        None => None,
    };
    Ok(SecRun {
        cohort,
        repetition,
        dropout,
        n: setup_n,
        k: setup.map_or(0, |s| s.k),
        t: setup.map_or(0, |s| s.t),
        bits: setup.map_or(0, |s| s.bits),
        vanished: devices.iter().filter(|d| d.status == Status::Vanished).count(),
        refused: devices.iter().filter(|d| d.status == Status::Refused).count(),
        shared: n_shared,
        survivors: n_masked,
        unmasked: n_unmasked,
        completed,
        abort,
        device_ms_median: median(&secure_ms),
        device_ms_p95: quantile(&secure_ms, 0.95),
        device_step_ms_median: [step_median(0), step_median(1), step_median(2), step_median(3)],
        plain_device_ms_median: median(&plain_ms),
        plain_device_ms_p95: quantile(&plain_ms, 0.95),
        bytes_up_per_device: up,
        bytes_down_per_device: down,
        plain_bytes_up_per_device: plain_up,
        plain_bytes_down_per_device: plain_down,
        extra_bytes_fraction: (up + down - plain_up - plain_down) / (plain_up + plain_down),
        extra_bytes_up_fraction: (up - plain_up) / plain_up,
        coordinator_ms: timed.total.as_secs_f64() * 1e3,
        coordinator_unmask_ms: unmask_ms,
        wall_seconds: wall.elapsed().as_secs_f64(),
        distributed,
    })
}

/// Measures every (cohort, dropout) of `bench` on `data`'s model under `cfg` (its dimension,
/// segments, clip norm, adaptive clipping, finder δ and γ, threads and seed). `on_run` sees
/// each run as it finishes.
pub fn run(
    data: &UserData,
    cfg: &RunConfig,
    bench: &SecBenchConfig,
    mut on_run: impl FnMut(&SecRun),
) -> anyhow::Result<SecBenchReport> {
    if bench.cohorts.is_empty() || bench.cohorts.contains(&0) {
        bail!("--cohorts / --clients-per-round: give at least one cohort, each at least 1");
    }
    if let Some(d) = bench.dropouts.iter().find(|d| !(0.0..1.0).contains(*d)) {
        bail!("--dropouts / --dropout: {d} is not a probability in [0, 1)");
    }
    if bench.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let users: Vec<usize> = (0..data.train.len()).filter(|&u| !data.train[u].is_empty()).collect();
    if users.is_empty() {
        bail!("no user has training data");
    }
    let mut runs = Vec::new();
    let mut rows = Vec::new();
    for &cohort in &bench.cohorts {
        for &dropout in &bench.dropouts {
            let mut these = Vec::with_capacity(bench.repeat);
            for repetition in 0..bench.repeat {
                let r = one_round(data, &users, cfg, cohort, dropout, repetition)
                    .with_context(|| format!("secure round of {cohort} devices at dropout {dropout}"))?;
                on_run(&r);
                these.push(r);
            }
            let med = |f: &dyn Fn(&SecRun) -> f64| median(&these.iter().map(f).collect::<Vec<_>>());
            rows.push(SecRow {
                cohort,
                dropout,
                k: these[0].k,
                t: these[0].t,
                bits: these[0].bits,
                survivors: med(&|r| r.survivors as f64),
                completed_rounds: these.iter().filter(|r| r.completed).count(),
                rounds: these.len(),
                device_ms_median: med(&|r| r.device_ms_median),
                device_ms_p95: med(&|r| r.device_ms_p95),
                plain_device_ms_median: med(&|r| r.plain_device_ms_median),
                bytes_up_per_device: med(&|r| r.bytes_up_per_device),
                bytes_down_per_device: med(&|r| r.bytes_down_per_device),
                plain_bytes_up_per_device: med(&|r| r.plain_bytes_up_per_device),
                plain_bytes_down_per_device: med(&|r| r.plain_bytes_down_per_device),
                extra_bytes_fraction: med(&|r| r.extra_bytes_fraction),
                coordinator_ms: med(&|r| r.coordinator_ms),
                coordinator_unmask_ms: med(&|r| r.coordinator_unmask_ms),
            });
            runs.extend(these);
        }
    }
    let fold_max =
        |f: fn(&SecRow) -> f64| rows.iter().map(f).filter(|x| !x.is_nan()).fold(f64::NAN, f64::max);
    let shape = fedrec_shared::ModelShape { n_items: data.n_items, dim: cfg.dim, n_segments: cfg.n_segments };
    let summary = SecSummary {
        device_threads: cfg.threads.max(1),
        update_len: shape.layout().len() + usize::from(cfg.adaptive_clip),
        finder_dropout: cfg.secagg_dropout,
        finder_corrupt: cfg.secagg_corrupt,
        max_device_ms_median: fold_max(|r| r.device_ms_median),
        max_extra_bytes_fraction: fold_max(|r| r.extra_bytes_fraction),
        rows,
    };
    Ok(SecBenchReport { runs, summary })
}

/// The summary as a plain-text table (one line per row).
pub fn table(report: &SecBenchReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7} {:>5} {:>9} {:>3} {:>4} {:>9} {:>10} {:>9} {:>9} {:>10} {:>10} {:>7} {:>10} {:>10}",
        "N",
        "drop",
        "k/t",
        "b",
        "done",
        "survivors",
        "device ms",
        "dev p95",
        "plain ms",
        "up B",
        "down B",
        "extra",
        "coord ms",
        "unmask ms"
    );
    for r in &report.summary.rows {
        let _ = writeln!(
            out,
            "{:>7} {:>5} {:>9} {:>3} {:>4} {:>9.0} {:>10.2} {:>9.2} {:>9.3} {:>10.0} {:>10.0} {:>6.2}% {:>10.1} {:>10.1}",
            r.cohort,
            r.dropout,
            format!("{}/{}", r.k, r.t),
            r.bits,
            format!("{}/{}", r.completed_rounds, r.rounds),
            r.survivors,
            r.device_ms_median,
            r.device_ms_p95,
            r.plain_device_ms_median,
            r.bytes_up_per_device,
            r.bytes_down_per_device,
            r.extra_bytes_fraction * 100.0,
            r.coordinator_ms,
            r.coordinator_unmask_ms
        );
    }
    out
}

/// The command: measures `bench`, prints each run and the table, and writes the JSON report
/// (`command`, `dataset`, `config`, `runs`, `summary`) to `json` when given.
pub fn cli(
    data: &UserData,
    info: &crate::report::DatasetInfo,
    cfg: &RunConfig,
    bench: &SecBenchConfig,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    eprintln!(
        "secure aggregation cost on {} ({} users, {} items, d = {}): device steps on {} threads, each timed alone",
        info.name,
        info.n_users,
        info.n_items,
        cfg.dim,
        cfg.threads.max(1)
    );
    let report = run(data, cfg, bench, |r| {
        eprintln!(
            "N = {} dropout {}: n = {}, k = {}, t = {}, {} vanished, {} refused, {} survivors, {}; device {:.2} ms (p95 {:.2}), coordinator {:.1} ms (unmask {:.1}); {:.1} s",
            r.cohort,
            r.dropout,
            r.n,
            r.k,
            r.t,
            r.vanished,
            r.refused,
            r.survivors,
            if r.completed {
                "completed".to_owned()
            } else {
                format!("aborted: {}", r.abort.as_deref().unwrap_or("?"))
            },
            r.device_ms_median,
            r.device_ms_p95,
            r.coordinator_ms,
            r.coordinator_unmask_ms,
            r.wall_seconds
        );
        if let Some(c) = &r.distributed {
            eprintln!(
                "  distributed noise, {} bits: encode (rotation, rounding, noise, wrap) {:.2} ms (p95 {:.2}) per device; \
                 masked input {} B ({} words) vs {} B central",
                c.bits,
                c.encode_ms_median,
                c.encode_ms_p95,
                c.masked_input_bytes,
                c.padded_dim,
                c.central_masked_input_bytes
            );
        }
    })?;
    print!("{}", table(&report));
    if let Some(path) = json {
        crate::report::write_json(
            path,
            &serde_json::json!({
                "command": "bench",
                "aggregation": "secure",
                "fedrec_version": env!("CARGO_PKG_VERSION"),
                "dataset": info,
                "config": cfg,
                "runs": report.runs,
                "summary": report.summary,
            }),
        )?;
    }
    Ok(())
}
