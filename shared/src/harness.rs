//! A deterministic in-memory federation: the real [`Coordinator`] and [`ClientRound`] machines wired together on a simulated clock, with dropouts. Tests and the simulator both drive rounds through it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{CryptoRng, Rng};
use rand_chacha::ChaCha12Rng;

use crate::round::secure::SecurePolicy;
use crate::round::{
    ClientId, ClientMessage, ClientOutcome, ClientRound, Coordinator, CoordinatorEvent, Instant, RoundPhase,
    ServerMessage,
};
use crate::train::Rating;

/// What a crafted device uploads when it is given `task`: `(crafted device index, task)` to
/// an update within the task's clip norm, or `None` to stay silent (the device's
/// [`crate::round::CraftedUpdate`]).
pub type Craft<'a> = crate::round::CraftedUpdate<'a>;

/// Devices that send a crafted update instead of training (see [`Federation::with_crafted`]).
struct Crafted<'a> {
    n: usize,
    craft: Craft<'a>,
}

impl std::fmt::Debug for Crafted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crafted").field("n", &self.n).finish_non_exhaustive()
    }
}

/// Behaviour of the simulated devices and network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HarnessConfig {
    /// Probability that a selected device vanishes before uploading.
    pub dropout: f64,
    /// Threads that run the devices' training steps: the round loop's own thread and
    /// `n_threads − 1` workers.
    pub n_threads: usize,
    /// Simulated one-way latency of every message.
    pub latency: Duration,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        Self { dropout: 0.0, n_threads: 1, latency: Duration::from_millis(20) }
    }
}

/// What happened to the devices in one round, seen from the outside.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundReport {
    /// The coordinator's event that closed the round.
    pub event: Option<CoordinatorEvent>,
    /// Devices whose upload was acknowledged.
    pub n_completed: usize,
    /// Of those, how many had their update shrunk by clipping.
    pub n_clipped: usize,
    /// Devices that vanished (simulated dropouts).
    pub n_vanished: usize,
    /// Devices that failed to compute an update.
    pub n_failed: usize,
    /// Devices that stopped a secure round under their own policy.
    pub n_refused: usize,
}

/// A device's training job: its slot, its machine, its id, the task, the time.
type Job<'a> = (usize, ClientRound<'a>, ClientId, ServerMessage, Instant);
/// A finished job.
type Done<'a> = (usize, ClientRound<'a>, ClientId);

/// The devices' work: a queue of jobs that the workers and the round loop's own thread take
/// from, and the finished jobs. A round queues all its jobs at once, so a thread waits and
/// wakes about once per round, not once per device (on two cores, a wake-up per device cost
/// as much as a tenth of the run).
struct Pool<'a> {
    state: Mutex<PoolState<'a>>,
    /// Workers wait here for jobs (or for the pool to close).
    work: Condvar,
    /// The round loop waits here for finished jobs.
    done: Condvar,
}

struct PoolState<'a> {
    queue: VecDeque<Job<'a>>,
    finished: Vec<Done<'a>>,
    /// Jobs a worker has taken and not finished.
    running: usize,
    idle_workers: usize,
    loop_waiting: bool,
    closed: bool,
    /// A job panicked on a worker: its result will never come.
    panicked: bool,
}

impl<'a> Pool<'a> {
    fn new() -> Self {
        let state = PoolState {
            queue: VecDeque::new(),
            finished: Vec::new(),
            running: 0,
            idle_workers: 0,
            loop_waiting: false,
            closed: false,
            panicked: false,
        };
        Self { state: Mutex::new(state), work: Condvar::new(), done: Condvar::new() }
    }

    /// The state. No code panics while holding the lock, so a poisoned lock's state is sound.
    fn lock(&self) -> MutexGuard<'_, PoolState<'a>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues jobs.
    fn submit(&self, jobs: impl IntoIterator<Item = Job<'a>>) {
        let mut st = self.lock();
        st.queue.extend(jobs);
        if st.idle_workers > 0 {
            self.work.notify_all();
        }
    }

    /// A worker's loop: runs queued jobs until the pool closes.
    fn work(&self) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                st.running += 1;
                drop(st);
                let guard = PanicGuard(self);
                let done = run_job(job);
                std::mem::forget(guard);
                st = self.lock();
                st.running -= 1;
                st.finished.push(done);
                if st.loop_waiting {
                    self.done.notify_one();
                }
                continue;
            }
            if st.closed {
                return;
            }
            st.idle_workers += 1;
            st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.idle_workers -= 1;
        }
    }

    /// For the round loop: moves the finished jobs into `out`; if none has finished, runs a
    /// queued job on this thread, or else waits for a running one. Returns `false` when no
    /// job is queued, running or finished.
    fn collect(&self, out: &mut Vec<Done<'a>>) -> bool {
        let mut st = self.lock();
        loop {
            if !st.finished.is_empty() {
                out.append(&mut st.finished);
                return true;
            }
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                out.push(run_job(job));
                return true;
            }
            if st.running == 0 {
                return false;
            }
            assert!(!st.panicked, "a device's step panicked on a worker thread");
            st.loop_waiting = true;
            st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.loop_waiting = false;
        }
    }

    /// Ends the workers' loops once the queue is empty.
    fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }
}

/// Tells the round loop when a job panics on a worker (instead of leaving it waiting).
struct PanicGuard<'p, 'a>(&'p Pool<'a>);

impl Drop for PanicGuard<'_, '_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.panicked = true;
        self.0.done.notify_all();
    }
}

/// Closes the pool when the round loop ends, even by a panic (the scope then joins the workers).
struct CloseOnDrop<'p, 'a>(&'p Pool<'a>);

impl Drop for CloseOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A device's step: it handles the message it was given.
fn run_job(job: Job<'_>) -> Done<'_> {
    let (k, mut client, id, msg, now) = job;
    client.handle_message(now, msg);
    (k, client, id)
}

/// N devices, each with its own interactions, and one coordinator.
#[derive(Debug)]
pub struct Federation<'a, R> {
    /// The coordinator machine (public so callers can inspect the model).
    pub coordinator: Coordinator<R>,
    devices: &'a [Vec<Rating>],
    config: HarnessConfig,
    rng: ChaCha12Rng,
    now: Instant,
    crafted: Option<Crafted<'a>>,
    secure_policy: SecurePolicy,
    /// Seeds of the simulated devices' secure-aggregation secrets: another stream of the
    /// harness's generator, so that a secure run checks devices in and drops them exactly as
    /// a plain run of the same seed does.
    device_rng: ChaCha12Rng,
    /// A round's selected devices, kept between rounds so that their memory is reused
    /// rather than allocated (and faulted in) afresh every round.
    selected: Vec<(ClientRound<'a>, ClientId, ServerMessage)>,
    /// The same for the devices as they finish training, in selection order.
    slots: Vec<Option<(ClientRound<'a>, ClientId)>>,
}

impl<'a, R: Rng + CryptoRng> Federation<'a, R> {
    /// A federation of `devices` (device `i` has client id `i`). `rng` drives the check-in
    /// order and the dropouts, not the coordinator.
    pub fn new(
        coordinator: Coordinator<R>,
        devices: &'a [Vec<Rating>],
        config: HarnessConfig,
        rng: ChaCha12Rng,
    ) -> Self {
        let mut device_rng = rng.clone();
        device_rng.set_stream(rng.get_stream().wrapping_add(1));
        Self {
            coordinator,
            devices,
            config,
            rng,
            now: Instant::ZERO,
            crafted: None,
            secure_policy: SecurePolicy::default(),
            device_rng,
            selected: Vec::new(),
            slots: Vec::new(),
        }
    }

    /// What every device requires of a secure round (default: [`SecurePolicy::default`]).
    pub fn with_secure_policy(mut self, policy: SecurePolicy) -> Self {
        self.secure_policy = policy;
        self
    }

    /// Adds `n` crafted devices with client ids `devices.len()..devices.len() + n`, as a
    /// privacy audit's canaries are: they check in like every device (in the same random
    /// order), and when selected they upload `craft(j, task)` through the same message path
    /// as a trained update (never dropping out), after the trained devices' uploads.
    pub fn with_crafted(mut self, n: usize, craft: Craft<'a>) -> Self {
        self.crafted = Some(Crafted { n, craft });
        self
    }

    /// The simulated clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Runs one round (see [`Federation::run_rounds`]).
    pub fn run_round(&mut self) -> RoundReport {
        let mut out = RoundReport::default();
        self.run_rounds(1, |report, _| out = report.clone());
        out
    }

    /// Runs `n_rounds` rounds, calling `on_round` after each with its report and the
    /// coordinator. The devices' training runs on this thread and worker threads that live
    /// for all the rounds (a pool per call, not per round: fresh threads would fault in fresh
    /// memory).
    pub fn run_rounds(&mut self, n_rounds: usize, mut on_round: impl FnMut(&RoundReport, &Coordinator<R>)) {
        self.run_rounds_until(n_rounds, |report, coordinator| {
            on_round(report, coordinator);
            std::ops::ControlFlow::Continue(())
        });
    }

    /// [`Federation::run_rounds`], stopping early after the first round for which `on_round`
    /// returns [`std::ops::ControlFlow::Break`] (e.g. a researcher's early stopping). Returns
    /// the number of rounds run.
    pub fn run_rounds_until(
        &mut self,
        n_rounds: usize,
        mut on_round: impl FnMut(&RoundReport, &Coordinator<R>) -> std::ops::ControlFlow<()>,
    ) -> usize {
        let mut n_run = 0;
        let n_workers = self.config.n_threads.max(1) - 1;
        let pool = Pool::new();
        std::thread::scope(|s| {
            for _ in 0..n_workers {
                s.spawn(|| pool.work());
            }
            // Closing the pool (also if a round panics) lets the workers finish.
            let _close = CloseOnDrop(&pool);
            for _ in 0..n_rounds {
                let report = self.round(&pool);
                n_run += 1;
                if on_round(&report, &self.coordinator).is_break() {
                    break;
                }
            }
        });
        n_run
    }

    /// One round to its close: every device checks in (in a random order), selected
    /// devices train on the pool, uploads arrive in selection order, and the clock jumps to
    /// the next deadline whenever the machines wait for one.
    fn round(&mut self, pool: &Pool<'a>) -> RoundReport {
        let mut report = RoundReport::default();
        if self.coordinator.start_round(self.now).is_err() {
            return report;
        }
        let lat = self.config.latency;
        let give_up = self.now.saturating_add(Duration::from_secs(24 * 3600));
        let n_devices = self.devices.len();
        let secure = self.coordinator.is_secure();
        // In a plain round canaries upload directly; in a secure round each runs the device's
        // protocol with its crafted update (masking, distributed noise).
        let n_crafted = self.crafted.as_ref().map_or(0, |c| c.n);
        let mut order: Vec<usize> = (0..n_devices + n_crafted).collect();
        order.shuffle(&mut self.rng);
        // Check-in. A selected device's task is held back so that training runs in parallel.
        let mut selected = std::mem::take(&mut self.selected);
        selected.clear();
        let mut crafted_uploads: Vec<(ClientId, ClientMessage)> = Vec::new();
        for &idx in &order {
            if let Some(crafted) = self.crafted.as_ref().filter(|_| !secure && idx >= n_devices) {
                let id = idx as ClientId;
                self.coordinator.handle_message(self.now, id, ClientMessage::CheckIn);
                while let Some((_, msg)) = self.coordinator.poll_transmit() {
                    if let ServerMessage::Selected { task, .. } = msg
                        && let Some(update) = (crafted.craft)(idx - n_devices, &task)
                    {
                        let within_bound = task.report_clip_bit.then_some(true);
                        crafted_uploads
                            .push((id, ClientMessage::Upload { round: task.round, update, within_bound }));
                    }
                }
                continue;
            }
            let mut client = if secure {
                let canary = self.crafted.as_ref().filter(|_| idx >= n_devices);
                let ratings: &'a [Rating] = if canary.is_some() { &[] } else { &self.devices[idx] };
                // Seeded from the harness: a simulated round is reproducible.
                let client = ClientRound::with_rng(
                    ratings,
                    give_up,
                    crate::danger::seeded_device_rng(self.device_rng.random()),
                )
                .with_secure_policy(self.secure_policy);
                match canary {
                    Some(c) => client.with_crafted_update(c.craft, idx - n_devices),
                    None => client,
                }
            } else {
                // Plain rounds draw nothing on the device (and keep the harness's stream as it was).
                ClientRound::new(&self.devices[idx], give_up)
            };
            let id = idx as ClientId;
            while let Some(msg) = client.poll_transmit() {
                self.coordinator.handle_message(self.now, id, msg);
            }
            let mut task = None;
            while let Some((_, msg)) = self.coordinator.poll_transmit() {
                match msg {
                    ServerMessage::Selected { .. } => task = Some(msg),
                    other => client.handle_message(self.now, other),
                }
            }
            if let Some(msg) = task {
                selected.push((client, id, msg));
            }
        }
        // Poisson selection keeps check-in open until its deadline.
        if self.coordinator.phase() == Some(RoundPhase::CheckIn)
            && let Some(t) = self.coordinator.poll_timeout()
        {
            self.now = self.now.max(t);
            self.coordinator.handle_timeout(self.now);
        }
        if secure {
            return self.secure_round(pool, selected, report);
        }
        // Vanishing is decided up front so that the run does not depend on thread timing.
        let vanish: Vec<bool> = selected.iter().map(|_| self.rng.random_bool(self.config.dropout)).collect();
        let task_time = self.now.saturating_add(lat);
        let upload_time = task_time.saturating_add(lat);
        let n_sel = selected.len();
        pool.submit(
            selected.drain(..).enumerate().map(|(k, (client, id, msg))| (k, client, id, msg, task_time)),
        );
        self.selected = selected;
        // Uploads reach the coordinator strictly in selection order, as they finish, so the
        // sum (and the run) is deterministic while aggregation overlaps training.
        let mut slots = std::mem::take(&mut self.slots);
        slots.clear();
        slots.resize_with(n_sel, || None);
        let mut next = 0;
        let mut finished = Vec::new();
        while next < n_sel && pool.collect(&mut finished) {
            for (k, client, id) in finished.drain(..) {
                slots[k] = Some((client, id));
            }
            while next < n_sel {
                let Some((client, id)) = slots[next].as_mut() else { break };
                if !vanish[next] {
                    while let Some(msg) = client.poll_transmit() {
                        self.coordinator.handle_message(upload_time, *id, msg);
                    }
                }
                next += 1;
            }
        }
        for (id, msg) in crafted_uploads {
            self.coordinator.handle_message(upload_time, id, msg);
        }
        self.now = upload_time;
        report.n_vanished = vanish.iter().filter(|&&v| v).count();
        let index: HashMap<ClientId, usize> = slots
            .iter()
            .enumerate()
            .filter(|&(k, _)| !vanish[k])
            .filter_map(|(k, slot)| slot.as_ref().map(|(_, id)| (*id, k)))
            .collect();
        // Let deadlines pass while the round waits for missing devices.
        while self.coordinator.current_round().is_some() {
            match self.coordinator.poll_timeout() {
                Some(t) => {
                    self.now = self.now.max(t);
                    self.coordinator.handle_timeout(self.now);
                }
                None => break,
            }
        }
        self.now = self.now.saturating_add(lat);
        while let Some((to, msg)) = self.coordinator.poll_transmit() {
            if let Some((client, _)) = index.get(&to).and_then(|&k| slots[k].as_mut()) {
                client.handle_message(self.now, msg);
            }
        }
        for (client, _) in slots.iter().flatten() {
            match client.outcome() {
                Some(ClientOutcome::Completed { was_clipped, .. }) => {
                    report.n_completed += 1;
                    report.n_clipped += usize::from(*was_clipped);
                }
                Some(ClientOutcome::Failed(_)) => report.n_failed += 1,
                _ => {}
            }
        }
        slots.clear();
        self.slots = slots;
        while let Some(ev) = self.coordinator.poll_event() {
            if matches!(ev, CoordinatorEvent::RoundCommitted { .. } | CoordinatorEvent::RoundAbandoned { .. })
            {
                report.event = Some(ev);
            }
        }
        report
    }

    /// The rest of a secure round (docs/secagg.md): selected devices train on the pool and
    /// advertise keys; then waves of coordinator requests are delivered (each device's step
    /// runs on the pool: sharing, masking and unmasking are the devices' work) and answered in
    /// selection order, the clock jumping to the next deadline whenever the machines wait.
    /// A device that vanishes does so before one of its four messages, drawn up front.
    fn secure_round(
        &mut self,
        pool: &Pool<'a>,
        selected: Vec<(ClientRound<'a>, ClientId, ServerMessage)>,
        mut report: RoundReport,
    ) -> RoundReport {
        let lat = self.config.latency;
        let vanish_at: Vec<Option<u8>> = selected
            .iter()
            .map(|_| self.rng.random_bool(self.config.dropout).then(|| self.device_rng.random_range(0..4u8)))
            .collect();
        let n_sel = selected.len();
        let mut slots: Vec<Option<(ClientRound<'a>, ClientId)>> = (0..n_sel).map(|_| None).collect();
        let index: HashMap<ClientId, usize> =
            selected.iter().enumerate().map(|(k, (_, id, _))| (*id, k)).collect();
        let mut wave: Vec<(usize, ServerMessage)> = selected
            .into_iter()
            .enumerate()
            .map(|(k, (client, id, msg))| {
                slots[k] = Some((client, id));
                (k, msg)
            })
            .collect();
        let mut pending: std::collections::VecDeque<(usize, ServerMessage)> =
            std::collections::VecDeque::new();
        loop {
            if !wave.is_empty() {
                self.now = self.now.saturating_add(lat);
                let now = self.now;
                pool.submit(
                    wave.drain(..)
                        .filter_map(|(k, msg)| slots[k].take().map(|(client, id)| (k, client, id, msg, now))),
                );
                let mut finished = Vec::new();
                while pool.collect(&mut finished) {
                    for (k, client, id) in finished.drain(..) {
                        slots[k] = Some((client, id));
                    }
                }
                self.now = self.now.saturating_add(lat);
                for (k, slot) in slots.iter_mut().enumerate() {
                    let Some((client, id)) = slot.as_mut() else { continue };
                    while let Some(msg) = client.poll_transmit() {
                        if vanish_at[k].is_none_or(|p| secure_phase(&msg) < p) {
                            self.coordinator.handle_message(self.now, *id, msg);
                        }
                    }
                }
            }
            // The coordinator's answers form the next wave, one message per device per wave.
            while let Some((to, msg)) = self.coordinator.poll_transmit() {
                if let Some(&k) = index.get(&to) {
                    pending.push_back((k, msg));
                }
            }
            let mut taken = vec![false; n_sel];
            let mut later = std::collections::VecDeque::new();
            while let Some((k, msg)) = pending.pop_front() {
                if taken[k] {
                    later.push_back((k, msg));
                } else {
                    taken[k] = true;
                    wave.push((k, msg));
                }
            }
            pending = later;
            if !wave.is_empty() {
                continue;
            }
            if self.coordinator.current_round().is_none() {
                break;
            }
            match self.coordinator.poll_timeout() {
                Some(t) => {
                    self.now = self.now.max(t);
                    self.coordinator.handle_timeout(self.now);
                }
                None => break,
            }
        }
        report.n_vanished = vanish_at.iter().filter(|v| v.is_some()).count();
        for (client, _) in slots.iter().flatten() {
            match client.outcome() {
                Some(ClientOutcome::Completed { was_clipped, .. }) => {
                    report.n_completed += 1;
                    report.n_clipped += usize::from(*was_clipped);
                }
                Some(ClientOutcome::Failed(_)) => report.n_failed += 1,
                Some(ClientOutcome::SecureRefused(_)) => report.n_refused += 1,
                _ => {}
            }
        }
        while let Some(ev) = self.coordinator.poll_event() {
            if matches!(ev, CoordinatorEvent::RoundCommitted { .. } | CoordinatorEvent::RoundAbandoned { .. })
            {
                report.event = Some(ev);
            }
        }
        report
    }
}

/// The phase a device's secure message belongs to (0: keys, 1: shares, 2: masked input,
/// 3: unmask; anything else counts as 0).
fn secure_phase(msg: &ClientMessage) -> u8 {
    match msg {
        ClientMessage::EncryptedShares { .. } => 1,
        ClientMessage::MaskedInput { .. } => 2,
        ClientMessage::UnmaskShares(_) => 3,
        _ => 0,
    }
}
