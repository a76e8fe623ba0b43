//! Devices behind a lossy link (5% loss each way, 100 ms RTT, jitter, reordering) still complete rounds with a real coordinator over QUIC; the completion rate and round time are measured against a clean link through the same relay.
//!
//! Run with `cargo test -p fedrec-tests --test lossy_link -- --nocapture` to see the
//! comparison; set `FEDREC_LOSSY_JSON=<path>` to also write it as JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fedrec_client::net::{
    CancelToken, Device, Eligibility, NetError, ParticipateOptions, Participation, RetryPolicy,
};
use fedrec_coordinator::server::ServerStatus;
use fedrec_shared::round::{ClientOutcome, CoordinatorEvent, RoundStats, Selection};
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::relay::{DirectionCounters, LinkProfile, Relay, RelayCounters};
use fedrec_tests::server::{coordinator_config, initial_model};
use fedrec_tests::{LoopbackServer, low_rank_ratings, net_config, ratings_by_user};
use rand::Rng as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const N_DEVICES: usize = 20;
/// Rounds that must commit on each link.
const ROUNDS: u64 = 5;
const SHAPE: ModelShape = ModelShape { n_items: 200, dim: 8, n_segments: 4 };
/// First come, this many devices per round.
const COHORT: usize = 8;
/// Reports a round needs to commit.
const MIN_REPORTS: usize = 6;
/// The generous bound on each link's run: reaching it fails the test (it is no speed target).
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// How long a device waits for the connection or any answer (the SDK's per-step timeout).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// 5% loss each way, 50 ms one way (100 ms RTT), up to 10 ms of jitter, 2% held back.
const LOSSY: LinkProfile = LinkProfile {
    loss: 0.05,
    one_way_delay: Duration::from_millis(50),
    jitter: Duration::from_millis(10),
    reorder: 0.02,
    seed: 2026,
};

/// Transient failures are retried quickly; the budget is far above a round's length.
fn options() -> ParticipateOptions {
    ParticipateOptions {
        time_budget: Duration::from_secs(60),
        retry: RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        },
        eligibility: Eligibility::default(),
    }
}

/// How one device's participations ended.
#[derive(Debug, Default)]
struct DeviceLog {
    /// Rounds whose upload the coordinator acknowledged.
    completed: Vec<u64>,
    /// Participations that ended with a refusal (a rejected upload, an aborted round, or a
    /// refusal code), by label.
    refused: Vec<String>,
    /// Participations that ended with an error other than a refusal, after the retries.
    failed: Vec<String>,
    /// Check-ins that were not selected.
    n_not_selected: u64,
    /// How long each participation (one `participate_with` call, retries included) took.
    durations: Vec<Duration>,
}

/// Runs participations until `stop` is set; the log of how they ended.
async fn run_device(mut device: Device, ratings: Vec<Rating>, stop: Arc<AtomicBool>) -> DeviceLog {
    let mut log = DeviceLog::default();
    let opts = options();
    let cancel = CancelToken::new();
    while !stop.load(Ordering::Relaxed) {
        let mut pause = Duration::ZERO;
        let started = tokio::time::Instant::now();
        let result = device.participate_with(&ratings, &opts, &cancel).await;
        log.durations.push(started.elapsed());
        match result {
            // A device that checks in again in a round it already reported in is told so (an
            // acknowledgement): one contribution, counted once.
            Ok(Participation::Outcome(ClientOutcome::Completed { round, .. })) => {
                if !log.completed.contains(&round) {
                    log.completed.push(round);
                }
            }
            Ok(Participation::NotSelected { retry_after }) => {
                log.n_not_selected += 1;
                pause = retry_after;
            }
            Ok(Participation::Outcome(ClientOutcome::Rejected(reason))) => {
                log.refused.push(reason.label().into())
            }
            Ok(Participation::Outcome(other)) => log.refused.push(format!("{other:?}")),
            Ok(other) => log.failed.push(format!("unexpected participation {other:?}")),
            Err(NetError::Refused { code, .. }) => log.refused.push(code.label().into()),
            Err(e) => log.failed.push(e.to_string()),
        }
        // Pacing between attempts (not a wait for a condition), randomised so the devices
        // do not move in lockstep.
        pause += Duration::from_millis(rand::rng().random_range(0..50));
        tokio::time::sleep(pause).await;
    }
    log
}

/// Every round close the server publishes, until it stops. `watch` keeps only the latest
/// value, so a close overwritten before this task runs would be missed; rounds open 100 ms
/// after a close, and the report says how many of the closes were seen.
async fn watch_closes(mut status: watch::Receiver<ServerStatus>) -> Vec<CoordinatorEvent> {
    let mut closes = Vec::new();
    let mut n_seen = 0;
    loop {
        {
            let s = status.borrow_and_update();
            if s.n_committed + s.n_abandoned > n_seen {
                n_seen = s.n_committed + s.n_abandoned;
                closes.extend(s.last_close.clone());
            }
        }
        if status.changed().await.is_err() {
            return closes;
        }
    }
}

/// What one link measured.
#[derive(Debug)]
struct LinkReport {
    name: &'static str,
    profile: LinkProfile,
    /// From the first device starting to the `ROUNDS`-th commit.
    time_to_rounds: Duration,
    n_committed: u64,
    n_abandoned: u64,
    /// Committed rounds whose close was observed.
    committed: Vec<RoundStats>,
    /// Closes observed (of `n_committed + n_abandoned`).
    n_closes_seen: usize,
    /// Over the rounds that closed: devices selected and uploads accepted (server side).
    n_selected: u64,
    n_reported: u64,
    /// Acknowledged uploads of rounds that closed, refusals and failures (device side).
    n_completed: u64,
    n_refused: u64,
    failures: Vec<String>,
    n_not_selected: u64,
    /// Every participation's duration, sorted.
    participations: Vec<Duration>,
    /// From the `ROUNDS`-th commit until every device had finished its participation.
    time_to_stop: Duration,
    relay: RelayCounters,
}

impl LinkReport {
    /// Completed participations over selected ones.
    fn completion_rate(&self) -> f64 {
        if self.n_selected == 0 { 0.0 } else { self.n_completed as f64 / self.n_selected as f64 }
    }

    /// The committed rounds' durations (open to commit), sorted.
    fn round_times(&self) -> Vec<Duration> {
        sorted(self.committed.iter().map(|s| s.duration).collect())
    }

    fn median_round_time(&self) -> Duration {
        quantile(&self.round_times(), 0.5)
    }

    fn print(&self) {
        let times: Vec<String> = self.round_times().iter().map(|t| format!("{:.0}", ms(*t))).collect();
        let direction = |d: &DirectionCounters| {
            format!(
                "{} seen, {} dropped ({:.1}%), {} reordered, {} overflowed",
                d.seen,
                d.dropped,
                100.0 * d.loss_rate(),
                d.reordered,
                d.overflowed
            )
        };
        eprintln!(
            "{:<5} link (loss {:.0}% each way, one-way delay {:?}, jitter {:?}, reorder {:.0}%):\n  \
             completion rate {:.3} ({} completed / {} selected; {} accepted by the server, {} refusals, {} failures)\n  \
             median round time {:.0} ms (committed rounds, ms: [{}]); {} committed, {} abandoned \
             ({} closes seen); {} rounds in {:.2} s\n  \
             participations (check-in, and upload if selected, on a new connection): {} took \
             median {:.0} ms, p90 {:.0} ms, max {:.0} ms; devices stopped {:.2} s after the last commit \
             needed\n  \
             {} check-ins not selected; relay to server: {}; to devices: {}",
            self.name,
            100.0 * self.profile.loss,
            self.profile.one_way_delay,
            self.profile.jitter,
            100.0 * self.profile.reorder,
            self.completion_rate(),
            self.n_completed,
            self.n_selected,
            self.n_reported,
            self.n_refused,
            self.failures.len(),
            ms(self.median_round_time()),
            times.join(", "),
            self.n_committed,
            self.n_abandoned,
            self.n_closes_seen,
            ROUNDS,
            self.time_to_rounds.as_secs_f64(),
            self.participations.len(),
            ms(quantile(&self.participations, 0.5)),
            ms(quantile(&self.participations, 0.9)),
            ms(self.participations.last().copied().unwrap_or_default()),
            self.time_to_stop.as_secs_f64(),
            self.n_not_selected,
            direction(&self.relay.to_server),
            direction(&self.relay.to_device),
        );
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "loss": self.profile.loss,
            "one_way_delay_ms": ms(self.profile.one_way_delay),
            "jitter_ms": ms(self.profile.jitter),
            "reorder": self.profile.reorder,
            "completion_rate": self.completion_rate(),
            "n_selected": self.n_selected,
            "n_completed": self.n_completed,
            "n_refused": self.n_refused,
            "n_failed": self.failures.len(),
            "n_committed": self.n_committed,
            "n_abandoned": self.n_abandoned,
            "n_closes_seen": self.n_closes_seen,
            "median_round_ms": ms(self.median_round_time()),
            "round_ms": self.round_times().iter().map(|t| ms(*t)).collect::<Vec<_>>(),
            "time_to_rounds_s": self.time_to_rounds.as_secs_f64(),
            "participation_ms": {
                "n": self.participations.len(),
                "median": ms(quantile(&self.participations, 0.5)),
                "p90": ms(quantile(&self.participations, 0.9)),
                "max": ms(self.participations.last().copied().unwrap_or_default()),
            },
            "time_to_stop_s": self.time_to_stop.as_secs_f64(),
            "relay": {
                "to_server": counters_json(&self.relay.to_server),
                "to_device": counters_json(&self.relay.to_device),
            },
        })
    }
}

fn counters_json(d: &DirectionCounters) -> serde_json::Value {
    serde_json::json!({
        "seen": d.seen,
        "dropped": d.dropped,
        "reordered": d.reordered,
        "overflowed": d.overflowed,
        "forwarded": d.forwarded,
    })
}

fn sorted(mut durations: Vec<Duration>) -> Vec<Duration> {
    durations.sort_unstable();
    durations
}

/// The `q`-quantile of `sorted` (the median of the middle two for an even count at 0.5),
/// zero when it is empty.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n if q == 0.5 && n % 2 == 0 => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
        n => sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A coordinator on loopback and `N_DEVICES` devices that reach it only through a relay
/// shaped by `profile`, until `ROUNDS` rounds have committed.
async fn run_link(name: &'static str, profile: LinkProfile, users: &[Vec<Rating>]) -> LinkReport {
    let coordinator = coordinator_config(Selection::FirstCome { cohort: COHORT }, MIN_REPORTS);
    // Rounds 100 ms apart, so that the status watcher sees every close.
    let server = LoopbackServer::start(coordinator, initial_model(SHAPE, 3.5, 3), |cfg| {
        cfg.round_gap = Duration::from_millis(100);
    });
    let relay = Relay::start(server.addr(), profile).await.expect("the relay starts on loopback");
    let watcher = tokio::spawn(watch_closes(server.status().clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = tokio::time::Instant::now();
    let devices: Vec<JoinHandle<DeviceLog>> = users
        .iter()
        .enumerate()
        .map(|(idx, ratings)| {
            let token = server.token(idx as u64 + 1);
            let cfg = net_config(relay.addr(), server.cert().to_vec(), token, SHAPE, STEP_TIMEOUT);
            let device = Device::new(cfg).expect("the client endpoint binds");
            tokio::spawn(run_device(device, ratings.clone(), Arc::clone(&stop)))
        })
        .collect();

    let mut status = server.status().clone();
    let run = async {
        let reached = status.wait_for(|s| s.n_committed >= ROUNDS).await.expect("the server runs");
        drop(reached);
        let time_to_rounds = started.elapsed();
        // Devices finish the participation they are in, then stop.
        stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::with_capacity(devices.len());
        for device in devices {
            logs.push(device.await.expect("a device task ends cleanly"));
        }
        (time_to_rounds, started.elapsed() - time_to_rounds, logs)
    };
    let (time_to_rounds, time_to_stop, logs) = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("{name} link: {ROUNDS} rounds did not commit within {RUN_LIMIT:?}"));
    // Read after the server stopped, so that they cover exactly the rounds that closed.
    let (selected, reported) = (server.metrics().selected.clone(), server.metrics().reported.clone());
    let last = server.stop().await;
    let (n_selected, n_reported) = (selected.get(), reported.get());
    let relay = relay.shutdown().await;
    let closes = watcher.await.expect("the watcher ends when the server stops");

    // Only rounds that closed are counted on either side.
    let closed = |round: &u64| *round < last.next_round;
    let committed: Vec<RoundStats> = closes
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::RoundCommitted { stats, .. } => Some(stats.clone()),
            _ => None,
        })
        .collect();
    LinkReport {
        name,
        profile,
        time_to_rounds,
        n_committed: last.n_committed,
        n_abandoned: last.n_abandoned,
        committed,
        n_closes_seen: closes.len(),
        n_selected,
        n_reported,
        n_completed: logs.iter().flat_map(|l| &l.completed).filter(|r| closed(r)).count() as u64,
        n_refused: logs.iter().map(|l| l.refused.len() as u64).sum(),
        failures: logs.iter().flat_map(|l| l.failed.iter().cloned()).collect(),
        n_not_selected: logs.iter().map(|l| l.n_not_selected).sum(),
        participations: sorted(logs.iter().flat_map(|l| l.durations.iter().copied()).collect()),
        time_to_stop,
        relay,
    }
}

/// What must hold on any link.
fn check(report: &LinkReport) {
    let name = report.name;
    assert!(report.n_committed >= ROUNDS, "{name}: {} rounds committed", report.n_committed);
    assert!(!report.committed.is_empty(), "{name}: no commit was observed");
    for stats in &report.committed {
        assert!(
            stats.n_reported >= MIN_REPORTS && stats.n_reported <= stats.n_selected,
            "{name}: round {} committed with {} reports of {} selected",
            stats.round,
            stats.n_reported,
            stats.n_selected
        );
    }
    assert!(report.failures.is_empty(), "{name}: participations failed: {:?}", report.failures);
    // Every upload the coordinator accepted was acknowledged to its device.
    assert_eq!(report.n_completed, report.n_reported, "{name}: accepted uploads vs acknowledged ones");
    // Every selected device completed or was told no: none was dropped without a word.
    let n_dropped = report.n_selected - report.n_reported;
    assert!(
        n_dropped <= report.n_refused,
        "{name}: {n_dropped} selected devices did not report but only {} refusals reached devices",
        report.n_refused
    );
    let to_server = &report.relay.to_server;
    let to_device = &report.relay.to_device;
    assert_eq!(to_server.overflowed + to_device.overflowed, 0, "{name}: the relay's queue overflowed");
    if report.profile.loss > 0.0 {
        assert!(to_server.dropped > 0 && to_device.dropped > 0, "{name}: the link dropped nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_behind_a_lossy_link_still_complete_rounds() {
    let users = ratings_by_user(N_DEVICES, low_rank_ratings(N_DEVICES, SHAPE.n_items, 3, 30, 0.3, 41));
    let clean = run_link("clean", LinkProfile::clean(LOSSY.seed), &users).await;
    clean.print();
    let lossy = run_link("lossy", LOSSY, &users).await;
    lossy.print();
    if let Some(path) = std::env::var_os("FEDREC_LOSSY_JSON") {
        let report = serde_json::json!({
            "test": "lossy_link",
            "n_devices": N_DEVICES,
            "rounds": ROUNDS,
            "cohort": COHORT,
            "min_reports": MIN_REPORTS,
            "model": { "n_items": SHAPE.n_items, "dim": SHAPE.dim, "n_segments": SHAPE.n_segments },
            "clean": clean.json(),
            "lossy": lossy.json(),
        });
        let text = serde_json::to_string_pretty(&report).expect("a JSON value serializes");
        std::fs::write(&path, text).expect("the JSON report is written");
    }
    check(&clean);
    check(&lossy);
}
