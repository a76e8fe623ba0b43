//! The sans-IO round machines and the in-memory federation: determinism, rejections, dropouts, selection, what leaves a device, and that federated training learns.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::error::{Rejection, UpdateError};
use fedrec_shared::eval::{self, EvalConfig, ReconstructionScorer, Scorer};
use fedrec_shared::harness::{Federation, HarnessConfig};
use fedrec_shared::round::{
    AbandonReason, ClientError, ClientMessage, ClientOutcome, ClientRound, Coordinator, CoordinatorConfig,
    CoordinatorEvent, Instant, RoundPhase, RoundStats, Selection, ServerMessage,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::train::{LocalDataError, local_update, reconstruct};
use fedrec_shared::update::{ClippedUpdate, UpdateVector};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use rand::Rng;
use rand_chacha::ChaCha12Rng;

const EXPLICIT: TrainParams = TrainParams {
    objective: Objective::Explicit,
    l2_user: 0.5,
    l2_user_bias: 0.1,
    l2_item: 0.01,
    l2_item_bias: 0.01,
    user_support_exponent: 0.0,
};

/// The expected population the test rounds declare (Poisson with noise divides by `q` times it).
const POPULATION: usize = 100;

fn config(selection: Selection, min_reports: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        train: EXPLICIT,
        optimizer: ServerOptimizer::adam(0.05),
        selection,
        min_reports,
        population: Some(POPULATION),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 10.0,
        noise_multiplier: 0.0,
        adaptive_clip: None,
        privacy: None,
        secure: None,
        centroids: CentroidPolicy::with_min_count(1.0),
    }
}

fn init_model(shape: ModelShape, seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.1, global_mean: 3.0, centroid_scale: 1e-3 };
    GlobalModel::init(shape, init, &mut seeded_rng(seed)).expect("valid shape")
}

fn model_bits(m: &GlobalModel) -> Vec<u32> {
    m.item_factors
        .iter()
        .chain(m.item_bias.iter())
        .chain(std::iter::once(&m.global_mean))
        .chain(m.centroids.iter())
        .map(|x| x.to_bits())
        .collect()
}

fn run_federation(devices: &[Vec<Rating>], coordinator_seed: u64, n_rounds: usize) -> GlobalModel {
    let shape = ModelShape { n_items: 40, dim: 4, n_segments: 3 };
    let mut cfg = config(Selection::Poisson { q: 0.5 }, 5);
    cfg.noise_multiplier = 0.3;
    let coordinator =
        Coordinator::new(cfg, init_model(shape, 3), seeded_rng(coordinator_seed)).expect("valid config");
    let harness = HarnessConfig { dropout: 0.1, n_threads: 2, latency: Duration::from_millis(20) };
    let mut fed = Federation::new(coordinator, devices, harness, seeded_rng(2));
    for _ in 0..n_rounds {
        let report = fed.run_round();
        assert!(matches!(report.event, Some(CoordinatorEvent::RoundCommitted { .. })), "{report:?}");
    }
    fed.coordinator.model().model.clone()
}

#[test]
fn same_seeds_give_bit_identical_models() {
    let devices = common::low_rank_ratings(60, 40, 3, 10, 0.3, 11);
    let a = run_federation(&devices, 1, 5);
    let b = run_federation(&devices, 1, 5);
    assert_eq!(model_bits(&a), model_bits(&b));
    let c = run_federation(&devices, 4, 5);
    assert_ne!(model_bits(&a), model_bits(&c));
    // The rounds did move the model.
    assert_ne!(model_bits(&a), model_bits(&init_model(a.shape(), 3)));
}

/// Drains the coordinator's outbox.
fn drain<R: Rng + rand::CryptoRng>(c: &mut Coordinator<R>) -> Vec<(u64, ServerMessage)> {
    std::iter::from_fn(|| c.poll_transmit()).collect()
}

fn events<R: Rng + rand::CryptoRng>(c: &mut Coordinator<R>) -> Vec<CoordinatorEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// Starts a first-come round of `cohort`, checks in devices `0..n_check_in` through real
/// [`ClientRound`]s at time zero, and hands each selected device its task.
fn checked_in_round<'a>(
    devices: &'a [Vec<Rating>],
    n_check_in: usize,
    cohort: usize,
    min_reports: usize,
) -> (Coordinator<ChaCha12Rng>, Vec<ClientRound<'a>>, u64) {
    let shape = ModelShape { n_items: 12, dim: 3, n_segments: 2 };
    let cfg = config(Selection::FirstCome { cohort }, min_reports);
    let mut coord = Coordinator::new(cfg, init_model(shape, 5), seeded_rng(6)).expect("valid config");
    let round = coord.start_round(Instant::ZERO).expect("no round is open");
    let far = Instant::ZERO.saturating_add(Duration::from_secs(3600));
    let mut clients: Vec<ClientRound<'a>> = devices.iter().map(|r| ClientRound::new(r, far)).collect();
    for (id, client) in clients.iter_mut().enumerate().take(n_check_in) {
        let msg = client.poll_transmit().expect("a new participation starts with a check-in");
        assert!(matches!(msg, ClientMessage::CheckIn));
        coord.handle_message(Instant::ZERO, id as u64, msg);
    }
    for (to, msg) in drain(&mut coord) {
        clients[to as usize].handle_message(Instant::ZERO, msg);
    }
    (coord, clients, round)
}

fn upload_of(client: &mut ClientRound<'_>) -> ClientMessage {
    let msg = client.poll_transmit().expect("a selected device uploads");
    assert!(matches!(msg, ClientMessage::Upload { .. }));
    assert!(client.poll_transmit().is_none());
    msg
}

/// Sends `msg` from `client` and checks that exactly one rejection, with `want`, comes back
/// both as a message to that client and as an event.
fn expect_rejected<R: Rng + rand::CryptoRng>(
    coord: &mut Coordinator<R>,
    now: Instant,
    client: u64,
    msg: ClientMessage,
    round: u64,
    want: impl Fn(&Rejection) -> bool,
) {
    coord.handle_message(now, client, msg);
    let out = drain(coord);
    assert_eq!(out.len(), 1, "{out:?}");
    match &out[0] {
        (to, ServerMessage::Rejected { round: r, reason }) => {
            assert_eq!((*to, *r), (client, round));
            assert!(want(reason), "unexpected rejection {reason:?}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let ev = coord.poll_event().expect("a rejection event");
    match &ev {
        CoordinatorEvent::Rejected { client: c, reason } => {
            assert_eq!(*c, client);
            assert!(want(reason), "unexpected rejection {reason:?}");
        }
        other => panic!("expected a rejection event, got {other:?}"),
    }
}

fn committed_stats(ev: &CoordinatorEvent) -> &RoundStats {
    match ev {
        CoordinatorEvent::RoundCommitted { stats, .. } => stats,
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[test]
fn coordinator_rejects_misbehaving_uploads_and_commits_the_good_ones() {
    let devices = common::low_rank_ratings(6, 12, 2, 5, 0.3, 21);
    let (mut coord, mut clients, round) = checked_in_round(&devices, 5, 4, 2);
    assert_eq!(coord.phase(), Some(RoundPhase::Report), "the cohort is full");
    assert_eq!(clients[4].outcome(), Some(&ClientOutcome::NotSelected));
    let model = coord.model().clone();
    let layout = model.model.shape().layout();
    let clip = coord.config().clip_norm;
    let t1 = Instant::from_micros(1_000_000);

    // Devices 0 and 1 upload properly.
    let first = upload_of(&mut clients[0]);
    for id in [0usize, 1] {
        let msg = if id == 0 { first.clone() } else { upload_of(&mut clients[id]) };
        coord.handle_message(t1, id as u64, msg);
        let out = drain(&mut coord);
        assert!(
            matches!(out.as_slice(), [(to, ServerMessage::Ack { round: r })] if *to == id as u64 && *r == round)
        );
    }

    // A device that was not selected.
    let update = ClippedUpdate::clip(
        local_update(
            &model,
            &devices[4],
            &reconstruct(&model, &devices[4], &EXPLICIT).expect("definite"),
            &EXPLICIT,
        ),
        clip,
    )
    .expect("finite");
    let msg = ClientMessage::Upload { round, update, within_bound: None };
    expect_rejected(&mut coord, t1, 4, msg, round, |r| *r == Rejection::NotSelected);
    // A replay.
    expect_rejected(&mut coord, t1, 0, first, round, |r| *r == Rejection::Duplicate);
    // Another round.
    let ClientMessage::Upload { update: good2, .. } = upload_of(&mut clients[2]) else { unreachable!() };
    let msg = ClientMessage::Upload { round: round + 1, update: good2, within_bound: None };
    expect_rejected(&mut coord, t1, 2, msg, round, |r| {
        *r == Rejection::WrongRound { got: round + 1, current: round }
    });
    // Another model shape.
    let other = ModelShape { n_items: 13, dim: 3, n_segments: 2 }.layout();
    let update = ClippedUpdate::clip(UpdateVector::zeros_dense(other), clip).expect("finite");
    let msg = ClientMessage::Upload { round, update, within_bound: None };
    expect_rejected(&mut coord, t1, 2, msg, round, |r| {
        *r == Rejection::InvalidUpdate(UpdateError::WrongLength { expected: layout.len(), got: other.len() })
    });
    // Clipped to a looser bound than the task's.
    let big = UpdateVector::from_dense(layout, &vec![1.0; layout.len()]).expect("length");
    let update = ClippedUpdate::clip(big, 2.0 * clip).expect("finite");
    let msg = ClientMessage::Upload { round, update, within_bound: None };
    expect_rejected(&mut coord, t1, 2, msg, round, |r| {
        matches!(r, Rejection::InvalidUpdate(UpdateError::NormTooLarge { .. }))
    });
    assert_eq!(coord.current_round(), Some(round), "rejections do not close the round");

    // Too late: the upload is refused and the deadline closes the round.
    let deadline = coord.poll_timeout().expect("the round is open");
    let late = upload_of(&mut clients[3]);
    expect_rejected(&mut coord, deadline, 3, late, round, |r| *r == Rejection::WrongPhase);
    let evs = events(&mut coord);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let stats = committed_stats(&evs[0]);
    assert_eq!((stats.n_selected, stats.n_reported, stats.n_dropped), (4, 2, 2));
    let mut rejected = stats.rejected.clone();
    rejected.sort_unstable();
    assert_eq!(
        rejected,
        vec![
            ("duplicate", 1),
            ("norm_too_large", 1),
            ("not_selected", 1),
            ("wrong_phase", 1),
            ("wrong_round", 1),
            ("wrong_shape", 1)
        ]
    );
    assert_eq!(coord.model().version, 1);
    assert_eq!(coord.current_round(), None);

    // The rejected uploads left no trace: the same round with only the good devices.
    let (mut clean, mut clean_clients, _) = checked_in_round(&devices, 5, 4, 2);
    for id in [0usize, 1] {
        let msg = upload_of(&mut clean_clients[id]);
        clean.handle_message(t1, id as u64, msg);
    }
    let deadline = clean.poll_timeout().expect("open");
    clean.handle_timeout(deadline);
    assert_eq!(clean.model().version, 1);
    assert_eq!(model_bits(&clean.model().model), model_bits(&coord.model().model));
}

/// Five devices selected, three upload, and the deadline passes.
fn round_with_two_dropouts(min_reports: usize) -> (Coordinator<ChaCha12Rng>, Vec<CoordinatorEvent>) {
    let devices = common::low_rank_ratings(5, 12, 2, 5, 0.3, 31);
    let (mut coord, mut clients, round) = checked_in_round(&devices, 5, 5, min_reports);
    let t1 = Instant::from_micros(2_000_000);
    for (id, client) in clients.iter_mut().enumerate().take(3) {
        let msg = upload_of(client);
        coord.handle_message(t1, id as u64, msg);
    }
    let acks = drain(&mut coord);
    assert_eq!(acks.len(), 3);
    assert!(acks.iter().all(|(_, m)| matches!(m, ServerMessage::Ack { round: r } if *r == round)));
    let deadline = coord.poll_timeout().expect("waiting for two devices");
    coord.handle_timeout(Instant::from_micros(deadline.as_micros() - 1));
    assert_eq!(coord.current_round(), Some(round), "nothing happens before the deadline");
    coord.handle_timeout(deadline);
    assert_eq!(coord.current_round(), None);
    let evs = events(&mut coord);
    (coord, evs)
}

#[test]
fn dropouts_are_counted_and_the_round_commits_with_enough_reports() {
    let (coord, evs) = round_with_two_dropouts(3);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let stats = committed_stats(&evs[0]);
    assert_eq!((stats.n_selected, stats.n_reported, stats.n_dropped), (5, 3, 2));
    assert_eq!(stats.denominator, 3.0);
    assert!(stats.rejected.is_empty());
    assert_eq!(coord.model().version, 1);
}

#[test]
fn too_few_reports_abandon_the_round() {
    let (mut coord, evs) = round_with_two_dropouts(4);
    assert_eq!(evs.len(), 1, "{evs:?}");
    match &evs[0] {
        CoordinatorEvent::RoundAbandoned { stats, reason } => {
            assert_eq!(*reason, AbandonReason::TooFewReports);
            assert_eq!((stats.n_selected, stats.n_reported, stats.n_dropped), (5, 3, 2));
        }
        other => panic!("expected an abandoned round, got {other:?}"),
    }
    assert_eq!(coord.model().version, 0);
    let aborted: BTreeSet<u64> = drain(&mut coord)
        .into_iter()
        .map(|(to, msg)| {
            assert!(matches!(msg, ServerMessage::Aborted { round: 0 }), "{msg:?}");
            to
        })
        .collect();
    assert_eq!(aborted, (0..5).collect());
}

#[test]
fn poisson_selection_has_the_configured_rate() {
    let shape = ModelShape { n_items: 12, dim: 3, n_segments: 2 };
    let mut cfg = config(Selection::Poisson { q: 0.3 }, 1);
    cfg.noise_multiplier = 1.0;
    let mut coord = Coordinator::new(cfg, init_model(shape, 1), seeded_rng(77)).expect("valid config");
    let round = coord.start_round(Instant::ZERO).expect("no round is open");
    let n = 2000u64;
    for id in 0..n {
        coord.handle_message(Instant::ZERO, id, ClientMessage::CheckIn);
    }
    let out = drain(&mut coord);
    assert_eq!(out.len(), n as usize, "one answer per check-in");
    let n_selected = out.iter().filter(|(_, m)| matches!(m, ServerMessage::Selected { .. })).count();
    let n_not = out
        .iter()
        .filter(|(_, m)| matches!(m, ServerMessage::NotSelected { round: r } if *r == round))
        .count();
    assert_eq!(n_selected + n_not, n as usize);
    let sd = (n as f64 * 0.3 * 0.7).sqrt();
    assert!(
        (n_selected as f64 - 600.0).abs() <= 5.0 * sd,
        "{n_selected} selected, expected 600 ± {}",
        5.0 * sd
    );
    // Check-in stays open until its deadline under Poisson selection.
    assert_eq!(coord.phase(), Some(RoundPhase::CheckIn));
    let t = coord.poll_timeout().expect("open");
    coord.handle_timeout(t);
    assert_eq!(coord.phase(), Some(RoundPhase::Report));
    let t = coord.poll_timeout().expect("open");
    coord.handle_timeout(t);
    let evs = events(&mut coord);
    // Nobody reported; with noise the round commits anyway (a noise-only step): its outcome
    // may not reveal the number of reports.
    match evs.as_slice() {
        [CoordinatorEvent::RoundCommitted { stats, .. }] => {
            assert_eq!(
                (stats.n_checked_in, stats.n_selected, stats.n_dropped),
                (2000, n_selected, n_selected)
            );
            assert!(stats.private);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn coordinator_config_validation() {
    let shape = ModelShape { n_items: 12, dim: 3, n_segments: 2 };
    let build = |cfg: CoordinatorConfig| Coordinator::new(cfg, init_model(shape, 1), seeded_rng(1));
    assert!(build(config(Selection::FirstCome { cohort: 3 }, 1)).is_ok());
    assert!(build(config(Selection::Poisson { q: 1.0 }, 1)).is_ok());

    let mut noisy_first_come = config(Selection::FirstCome { cohort: 3 }, 1);
    noisy_first_come.noise_multiplier = 1.0;
    assert_eq!(build(noisy_first_come).map(|_| ()).expect_err("noise needs Poisson").name, "selection");
    let mut noisy_poisson = config(Selection::Poisson { q: 0.1 }, 1);
    noisy_poisson.noise_multiplier = 1.0;
    assert!(build(noisy_poisson).is_ok());

    for q in [0.0, -0.1, 1.0 + 1e-9, 2.0, f64::NAN, f64::INFINITY] {
        let err = build(config(Selection::Poisson { q }, 1)).map(|_| ()).expect_err("q out of range");
        assert_eq!(err.name, "q", "q = {q}");
    }
    for clip_norm in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut cfg = config(Selection::Poisson { q: 0.5 }, 1);
        cfg.clip_norm = clip_norm;
        let err = build(cfg).map(|_| ()).expect_err("clip norm out of range");
        assert_eq!(err.name, "clip_norm", "clip_norm = {clip_norm}");
    }
    let mut cfg = config(Selection::Poisson { q: 0.5 }, 1);
    cfg.noise_multiplier = f32::NAN;
    assert!(build(cfg).is_err());
    assert!(build(config(Selection::FirstCome { cohort: 0 }, 1)).is_err());
    assert!(build(config(Selection::FirstCome { cohort: 3 }, 0)).is_err());
}

#[test]
fn only_the_clipped_update_leaves_the_device() {
    let shape = ModelShape { n_items: 20, dim: 4, n_segments: 2 };
    let ratings = common::low_rank_ratings(1, 20, 2, 8, 0.3, 41).remove(0);
    let implicit = TrainParams { objective: Objective::Implicit { alpha: 3.0 }, ..EXPLICIT };
    for (train, clip_norm) in [(EXPLICIT, 0.5f32), (EXPLICIT, 1e3), (implicit, 0.5), (implicit, 1e3)] {
        let mut cfg = config(Selection::FirstCome { cohort: 1 }, 1);
        cfg.train = train;
        cfg.clip_norm = clip_norm;
        let mut coord = Coordinator::new(cfg, init_model(shape, 2), seeded_rng(3)).expect("valid config");
        let round = coord.start_round(Instant::ZERO).expect("no round open");
        let mut client = ClientRound::new(&ratings, Instant::from_micros(u64::MAX));
        let mut sent = Vec::new();

        let msg = client.poll_transmit().expect("check-in");
        sent.push(msg.clone());
        coord.handle_message(Instant::ZERO, 9, msg);
        let out = drain(&mut coord);
        let [(9, task_msg @ ServerMessage::Selected { .. })] = out.as_slice() else { panic!("{out:?}") };
        let ServerMessage::Selected { task, model } = task_msg.clone() else { unreachable!() };
        client.handle_message(Instant::ZERO, task_msg.clone());
        sent.extend(std::iter::from_fn(|| client.poll_transmit()));

        // Exactly a check-in, then one upload (the secure-aggregation messages belong to secure
        // rounds only, see secure_rounds.rs).
        assert_eq!(sent.len(), 2);
        let mut uploads = Vec::new();
        for (k, msg) in sent.iter().enumerate() {
            match msg {
                ClientMessage::CheckIn => assert_eq!(k, 0),
                ClientMessage::Upload { round: r, update, within_bound } => {
                    assert_eq!((k, *r), (1, round));
                    assert_eq!(*within_bound, None, "the clipping bit is sent only when the task asks");
                    uploads.push(update.clone());
                }
                other => panic!("a plain round's device sent {other:?}"),
            }
        }
        let [update] = uploads.as_slice() else { panic!("one upload") };

        // It is the clipped gradient, recomputed here from the same inputs.
        let user = reconstruct(&model, &ratings, &task.train).expect("definite");
        assert_eq!(client.user_state(), Some(&user), "the user vector stays on the device");
        let want = ClippedUpdate::clip(local_update(&model, &ratings, &user, &task.train), task.clip_norm)
            .expect("finite");
        assert_eq!(update, &want);
        let dense = update.vector().to_dense();
        let norm = dense.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        assert!(norm <= f64::from(task.clip_norm), "norm {norm} > {}", task.clip_norm);
        assert_eq!(update.was_clipped(), clip_norm < 1.0, "norm {norm}");

        // The coordinator accepts it and the device completes.
        coord.handle_message(
            Instant::ZERO,
            9,
            ClientMessage::Upload { round, update: update.clone(), within_bound: None },
        );
        for (_, msg) in drain(&mut coord) {
            client.handle_message(Instant::ZERO, msg);
        }
        let want = ClientOutcome::Completed { round, was_clipped: clip_norm < 1.0 };
        assert_eq!(client.outcome(), Some(&want));
        assert!(client.poll_transmit().is_none());
        assert_eq!(coord.model().version, 1);
    }
}

#[test]
fn local_item_outside_the_catalogue_fails_without_upload() {
    let shape = ModelShape { n_items: 12, dim: 3, n_segments: 2 };
    let ratings = vec![Rating { item: 3, value: 4.0 }, Rating { item: 12, value: 2.0 }];
    let mut coord =
        Coordinator::new(config(Selection::FirstCome { cohort: 1 }, 1), init_model(shape, 1), seeded_rng(1))
            .expect("valid config");
    coord.start_round(Instant::ZERO).expect("no round open");
    let mut client = ClientRound::new(&ratings, Instant::from_micros(u64::MAX));
    let msg = client.poll_transmit().expect("check-in");
    coord.handle_message(Instant::ZERO, 0, msg);
    for (_, msg) in drain(&mut coord) {
        client.handle_message(Instant::ZERO, msg);
    }
    assert_eq!(
        client.outcome(),
        Some(&ClientOutcome::Failed(ClientError::LocalData(LocalDataError::ItemOutOfRange {
            item: 12,
            n_items: 12
        })))
    );
    assert!(client.poll_transmit().is_none(), "nothing is sent");
    assert!(client.user_state().is_none());
    // For the coordinator the device simply dropped out.
    let t = coord.poll_timeout().expect("open");
    coord.handle_timeout(t);
    match events(&mut coord).as_slice() {
        [CoordinatorEvent::RoundAbandoned { stats, reason: AbandonReason::TooFewReports }] => {
            assert_eq!((stats.n_selected, stats.n_dropped), (1, 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn harness_rounds_commit_despite_dropouts() {
    let devices = common::low_rank_ratings(60, 40, 3, 10, 0.3, 51);
    let shape = ModelShape { n_items: 40, dim: 4, n_segments: 2 };
    let coordinator =
        Coordinator::new(config(Selection::FirstCome { cohort: 20 }, 5), init_model(shape, 2), seeded_rng(3))
            .expect("valid config");
    let harness = HarnessConfig { dropout: 0.3, n_threads: 2, latency: Duration::from_millis(20) };
    let mut fed = Federation::new(coordinator, &devices, harness, seeded_rng(4));
    let mut total_vanished = 0;
    for round in 0..6u64 {
        let report = fed.run_round();
        let Some(CoordinatorEvent::RoundCommitted { stats, new_version }) = &report.event else {
            panic!("round {round}: {report:?}")
        };
        assert_eq!(*new_version, round + 1);
        assert_eq!(stats.n_selected, 20);
        assert_eq!(stats.n_dropped, report.n_vanished, "round {round}");
        assert_eq!(stats.n_reported, report.n_completed, "round {round}");
        assert_eq!(report.n_failed, 0);
        total_vanished += report.n_vanished;
    }
    assert!(total_vanished > 0);
    assert_eq!(fed.coordinator.model().version, 6);
}

/// Global mean plus user and item biases, fitted by alternating ridge regressions.
struct BiasScorer {
    mean: f32,
    user: Vec<f32>,
    item: Vec<f32>,
}

impl BiasScorer {
    fn fit(train: &[Vec<Rating>], n_items: usize) -> Self {
        let (lambda_u, lambda_i) = (3.0f32, 3.0f32);
        let all: Vec<f32> = train.iter().flatten().map(|r| r.value).collect();
        let mean = all.iter().sum::<f32>() / all.len() as f32;
        let mut user = vec![0.0f32; train.len()];
        let mut item = vec![0.0f32; n_items];
        for _ in 0..20 {
            let (mut num, mut cnt) = (vec![0.0f32; n_items], vec![0.0f32; n_items]);
            for (u, rs) in train.iter().enumerate() {
                for r in rs {
                    num[r.item as usize] += r.value - mean - user[u];
                    cnt[r.item as usize] += 1.0;
                }
            }
            for i in 0..n_items {
                item[i] = num[i] / (cnt[i] + lambda_i);
            }
            for (u, rs) in train.iter().enumerate() {
                let s: f32 = rs.iter().map(|r| r.value - mean - item[r.item as usize]).sum();
                user[u] = s / (rs.len() as f32 + lambda_u);
            }
        }
        Self { mean, user, item }
    }
}

impl Scorer for BiasScorer {
    fn score_all(&self, user_idx: usize, _train: &[Rating], out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(&self.item) {
            *o = self.mean + self.user[user_idx] + b;
        }
    }

    fn predicts_ratings(&self) -> bool {
        true
    }
}

#[test]
fn federated_training_beats_the_initial_model_and_a_bias_baseline() {
    let (n_users, n_items) = (300, 80);
    let all = common::low_rank_ratings(n_users, n_items, 3, 25, 0.3, 61);
    // Hold out 5 ratings of each user; devices train on the rest.
    let (train, test): (Vec<Vec<Rating>>, Vec<Vec<Rating>>) =
        all.into_iter().map(|mut rs| (rs.split_off(5), rs)).unzip();
    let users: Vec<(&[Rating], &[Rating])> = train.iter().zip(&test).map(|(a, b)| (&a[..], &b[..])).collect();
    let eval_cfg = EvalConfig { rating_range: (1.0, 5.0), relevance_threshold: Some(4.0) };
    let rmse =
        |scorer: &dyn Scorer| eval::evaluate(scorer, &users, n_items, &eval_cfg, 2).rmse.expect("ratings");

    let shape = ModelShape { n_items, dim: 6, n_segments: 2 };
    let model = init_model(shape, 62);
    let initial = rmse(&ReconstructionScorer { model: &RoundModel::new(0, model.clone()), params: EXPLICIT });
    let baseline = rmse(&BiasScorer::fit(&train, n_items));

    let coordinator =
        Coordinator::new(config(Selection::FirstCome { cohort: 50 }, 10), model, seeded_rng(63))
            .expect("valid config");
    let harness = HarnessConfig { dropout: 0.0, n_threads: 2, latency: Duration::from_millis(20) };
    let mut fed = Federation::new(coordinator, &train, harness, seeded_rng(64));
    for _ in 0..40 {
        let report = fed.run_round();
        assert!(matches!(report.event, Some(CoordinatorEvent::RoundCommitted { .. })), "{report:?}");
    }
    let trained = rmse(&ReconstructionScorer { model: fed.coordinator.model(), params: EXPLICIT });
    eprintln!("RMSE: initial {initial:.4}, bias baseline {baseline:.4}, trained {trained:.4}");
    assert!(trained < 0.6 * initial, "trained {trained} vs initial {initial}");
    assert!(trained < 0.7 * baseline, "trained {trained} vs bias-only {baseline}");
}
