//! The privacy budget as the rounds see it: no sequence of rounds overspends, a restart never forgets spend, the configurations that would weaken privacy are refused, and adaptive clipping tracks its quantile and is charged for its bits.

mod common;

use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::error::Rejection;
use fedrec_shared::harness::{Federation, HarnessConfig, RoundReport};
use fedrec_shared::ledger::{Ledger, LedgerEntry, PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::{self, AccountantKind, PrivacyEvent};
use fedrec_shared::round::{
    AdaptiveClip, ClientMessage, ClientOutcome, ClientRound, Coordinator, CoordinatorConfig,
    CoordinatorEvent, CoordinatorState, Instant, RoundStats, Selection, ServerMessage, StartError,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer, ServerState};
use fedrec_shared::train::{local_update, reconstruct};
use fedrec_shared::{
    GlobalModel, ModelInit, ModelShape, Objective, ParamError, Rating, RoundModel, TrainParams,
};
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

const SHAPE: ModelShape = ModelShape { n_items: 10, dim: 2, n_segments: 2 };
const N_DEVICES: usize = 50;
const DELTA: f64 = 1e-5;

fn config(selection: Selection, noise_multiplier: f32, min_reports: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        train: EXPLICIT,
        optimizer: ServerOptimizer::adam(0.05),
        selection,
        min_reports,
        population: Some(N_DEVICES),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 2.0,
        adaptive_clip: None,
        noise_multiplier,
        centroids: CentroidPolicy::with_min_count(1.0),
        privacy: None,
        secure: None,
    }
}

fn policy(epsilon: f64, accountant: AccountantKind) -> PrivacyPolicy {
    PrivacyPolicy { budget: PrivacyBudget::new(epsilon, DELTA).expect("a valid budget"), accountant }
}

fn init_model(seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.1, global_mean: 3.0, centroid_scale: 1e-3 };
    GlobalModel::init(SHAPE, init, &mut seeded_rng(seed)).expect("valid shape")
}

fn devices() -> Vec<Vec<Rating>> {
    common::low_rank_ratings(N_DEVICES, SHAPE.n_items, 2, 5, 0.3, 101)
}

fn federation<'a>(
    cfg: CoordinatorConfig,
    devices: &'a [Vec<Rating>],
    dropout: f64,
    seed: u64,
) -> Federation<'a, ChaCha12Rng> {
    let coordinator = Coordinator::new(cfg, init_model(seed), seeded_rng(seed + 1)).expect("valid config");
    let harness = HarnessConfig { dropout, n_threads: 1, latency: Duration::from_millis(20) };
    Federation::new(coordinator, devices, harness, seeded_rng(seed + 2))
}

/// The combined noise multiplier of an update at `z` and clip bits at `z_bits`, computed
/// here from its definition rather than by the coordinator.
fn combined(z: f32, z_bits: f32) -> f64 {
    (f64::from(z).powi(-2) + f64::from(z_bits).powi(-2)).powf(-0.5)
}

/// ε of `n` identical rounds, straight from the accountant.
fn epsilon_of(q: f64, z: f64, n: u64, kind: AccountantKind) -> f64 {
    let event = PrivacyEvent::new(q, z, n).expect("a valid event");
    privacy::epsilon(&[event], DELTA, kind).expect("accountable")
}

/// The largest `n` with ε(n rounds) ≤ `budget`, found without the ledger or the coordinator.
fn max_rounds_within(q: f64, z: f64, kind: AccountantKind, budget: f64) -> u64 {
    let mut prev = 0.0;
    for n in 1..=1000 {
        let eps = epsilon_of(q, z, n, kind);
        assert!(eps >= prev, "ε must not shrink with more rounds: ε({n}) = {eps} < {prev}");
        if eps > budget {
            return n - 1;
        }
        prev = eps;
    }
    panic!("a budget of ε = {budget} allows more than 1000 rounds");
}

fn next_round(c: &Coordinator<ChaCha12Rng>) -> u64 {
    c.state().expect("no round is open between harness rounds").next_round
}

/// What happened while rounds ran until the coordinator refused one.
#[derive(Debug, Default)]
struct BudgetRun {
    committed: Vec<u64>,
    abandoned: Vec<u64>,
    /// The round index the coordinator refused to start.
    refused: u64,
}

/// Runs harness rounds until the coordinator refuses to start one, checking after each
/// round that the spend is within the budget, that abandoned rounds are not charged, and
/// that the refusal comes exactly when one more charge would exceed the budget.
fn run_until_refused(
    fed: &mut Federation<'_, ChaCha12Rng>,
    policy: &PrivacyPolicy,
    max_rounds: usize,
) -> BudgetRun {
    run_until_refused_with(fed, policy, max_rounds, |_| {})
}

/// [`run_until_refused`], showing each committed round's stats to `on_commit`.
fn run_until_refused_with(
    fed: &mut Federation<'_, ChaCha12Rng>,
    policy: &PrivacyPolicy,
    max_rounds: usize,
    mut on_commit: impl FnMut(&RoundStats),
) -> BudgetRun {
    let (budget, delta, kind) = (policy.budget.epsilon(), policy.budget.delta(), policy.accountant);
    let mut run = BudgetRun::default();
    for _ in 0..max_rounds {
        let before = fed.coordinator.ledger().clone();
        let idx = next_round(&fed.coordinator);
        let charge = fed.coordinator.round_charge(idx).expect("a noisy Poisson round is charged");
        let would = before.epsilon_with(&charge, delta, kind).expect("accountable");
        let report = fed.run_round();
        match &report.event {
            None => {
                assert!(
                    would > budget,
                    "round {idx} refused although it would only spend {would} ≤ {budget}"
                );
                assert_eq!(fed.coordinator.ledger(), &before, "a refused round charges nothing");
                assert_eq!(next_round(&fed.coordinator), idx, "a refused round uses no index");
                // The refusal, observed directly, names the right numbers and is stable.
                let spent = before.epsilon(delta, kind).expect("accountable");
                let want = StartError::BudgetExhausted { spent, would_spend: would, budget, delta };
                for _ in 0..2 {
                    assert_eq!(fed.coordinator.start_round(fed.now()), Err(want.clone()));
                    assert_eq!(fed.coordinator.current_round(), None);
                }
                assert_eq!(fed.coordinator.ledger(), &before);
                run.refused = idx;
                return run;
            }
            Some(CoordinatorEvent::RoundCommitted { stats, .. }) => {
                assert_eq!(stats.round, idx);
                on_commit(stats);
                assert!(would <= budget, "round {idx} started although it spends {would} > {budget}");
                run.committed.push(idx);
                let spent = fed.coordinator.ledger().epsilon(delta, kind).expect("accountable");
                assert!(spent <= budget, "after round {idx}: spent {spent} > budget {budget}");
                assert_eq!(spent, would, "the charge made is the charge checked");
            }
            Some(CoordinatorEvent::RoundAbandoned { stats, .. }) => {
                assert_eq!(stats.round, idx);
                run.abandoned.push(idx);
                assert_eq!(fed.coordinator.ledger(), &before, "abandoned round {idx} was charged");
            }
            Some(other) => panic!("unexpected event {other:?}"),
        }
        let ledger = fed.coordinator.ledger();
        assert_eq!(ledger.entries().len(), run.committed.len());
        let charged: Vec<u64> = ledger.entries().iter().map(|e| e.round).collect();
        assert_eq!(charged, run.committed, "exactly the committed rounds are charged");
        assert!(ledger.entries().iter().all(|e| *e == LedgerEntry { round: e.round, ..charge }));
    }
    panic!("no refusal within {max_rounds} rounds: {run:?}");
}

#[test]
fn no_sequence_of_rounds_overspends_the_budget() {
    let devices = devices();
    let adaptive = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 2.0 };
    // (accountant, q, z, adaptive clipping, budget). PLD costs about 0.1 s per evaluation
    // here, so its case stops after a few rounds; its budget sits exactly on ε(3 rounds),
    // which must still be allowed (the check is "would exceed", not "would reach").
    let pld_budget = epsilon_of(0.5, 2.0, 3, AccountantKind::Pld);
    let cases = [
        (AccountantKind::Rdp, 0.2, 1.0f32, None, 7.0),
        (AccountantKind::Rdp, 0.3, 1.5, Some(adaptive), 5.0),
        (AccountantKind::Pld, 0.5, 2.0, None, pld_budget),
    ];
    for (case, &(kind, q, z, adaptive, budget)) in cases.iter().enumerate() {
        let mut cfg = config(Selection::Poisson { q }, z, 1);
        cfg.adaptive_clip = adaptive;
        cfg.privacy = Some(policy(budget, kind));
        let z_charged = adaptive.map_or(f64::from(z), |a| combined(z, a.count_noise_multiplier));
        let n_max = max_rounds_within(q, z_charged, kind, budget);
        assert!((2..=60).contains(&n_max), "case {case}: the budget allows {n_max} rounds");

        let mut fed = federation(cfg.clone(), &devices, 0.0, 10 + case as u64);
        let run = run_until_refused(&mut fed, cfg.privacy.as_ref().expect("set"), 100);
        assert!(run.abandoned.is_empty(), "case {case}: {run:?}");
        assert_eq!(run.committed.len() as u64, n_max, "case {case}: {run:?}");
        assert_eq!(run.refused, n_max);
        // The ledger is exactly n_max rounds at (q, z): one grouped event.
        let events = fed.coordinator.ledger().events().expect("valid");
        assert_eq!(events, vec![PrivacyEvent::new(q, z_charged, n_max).expect("valid")], "case {case}");
    }
}

/// Issue 10: with noise a round commits whatever the number of reports (here min_reports is
/// about the expected reports, and dropouts take many rounds below it): the outcome must not
/// reveal the count. Spend stays within the budget after every prefix.
#[test]
fn spend_stays_within_budget_and_noised_rounds_commit_whatever_the_reports() {
    let devices = devices();
    let mut rng = seeded_rng(2024);
    let (mut total_committed, mut total_short) = (0, 0);
    for case in 0..10u64 {
        let q: f64 = rng.random_range(0.1..0.6);
        let z: f32 = rng.random_range(0.7..2.5);
        let adaptive = rng.random_bool(0.3).then(|| AdaptiveClip {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_multiplier: rng.random_range(1.0..4.0),
        });
        let z_charged = adaptive.map_or(f64::from(z), |a| combined(z, a.count_noise_multiplier));
        let n_target: u64 = rng.random_range(1..=10);
        let lo = epsilon_of(q, z_charged, n_target, AccountantKind::Rdp);
        let hi = epsilon_of(q, z_charged, n_target + 1, AccountantKind::Rdp);
        // Every third budget sits exactly on ε(n_target); the others strictly between.
        let budget = if case % 3 == 0 { lo } else { lo + rng.random_range(0.01..0.99) * (hi - lo) };
        let dropout = [0.0, 0.3, 0.6][case as usize % 3];
        // About half the rounds fall short of min_reports (which applies only without noise).
        let min_reports = ((N_DEVICES as f64 * q * (1.0 - dropout)).round() as usize).max(1);

        let mut cfg = config(Selection::Poisson { q }, z, min_reports);
        cfg.adaptive_clip = adaptive;
        cfg.privacy = Some(policy(budget, AccountantKind::Rdp));
        assert_eq!(max_rounds_within(q, z_charged, AccountantKind::Rdp, budget), n_target);
        let mut fed = federation(cfg.clone(), &devices, dropout, 100 + case);
        let mut short = 0;
        let run = run_until_refused_with(&mut fed, cfg.privacy.as_ref().expect("set"), 400, |stats| {
            short += usize::from(stats.n_reported < min_reports);
        });
        let desc = format!("case {case}: q {q}, z {z}, {adaptive:?}, budget {budget}, {run:?}");
        assert!(run.abandoned.is_empty(), "{desc}");
        assert_eq!(run.committed.len() as u64, n_target, "{desc}");
        assert_eq!(run.refused as usize, run.committed.len(), "{desc}");
        total_committed += run.committed.len();
        total_short += short;
    }
    assert!(total_short >= 5, "only {total_short} rounds fell short of min_reports");
    assert!(total_committed >= 10);
}

/// A budget of about `n` rounds at `(q, z)` under RDP.
fn budget_for_rounds(q: f64, z: f64, n: u64) -> f64 {
    0.5 * (epsilon_of(q, z, n, AccountantKind::Rdp) + epsilon_of(q, z, n + 1, AccountantKind::Rdp))
}

#[test]
fn restart_never_forgets_spend() {
    let devices = devices();
    let adaptive = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 3.0 };
    for (case, adaptive) in [None, Some(adaptive)].into_iter().enumerate() {
        let (q, z) = (0.3, 1.2f32);
        let z_charged = adaptive.map_or(f64::from(z), |a| combined(z, a.count_noise_multiplier));
        let budget = budget_for_rounds(q, z_charged, 9);
        let mut cfg = config(Selection::Poisson { q }, z, 1);
        cfg.adaptive_clip = adaptive;
        cfg.privacy = Some(policy(budget, AccountantKind::Rdp));
        let mut original = federation(cfg.clone(), &devices, 0.0, 30 + case as u64);
        for _ in 0..5 {
            let report = original.run_round();
            assert!(matches!(report.event, Some(CoordinatorEvent::RoundCommitted { .. })), "{report:?}");
        }
        // No snapshot while a round is open: its progress is not persisted. Nobody checks
        // in; with noise the round still commits (a noise-only step) and is charged: its
        // outcome may not depend on how many devices took part.
        let now = original.now();
        original.coordinator.start_round(now).expect("within budget");
        assert_eq!(original.coordinator.state(), None);
        original.coordinator.handle_timeout(now.saturating_add(Duration::from_secs(3600)));
        let _ = std::iter::from_fn(|| original.coordinator.poll_transmit()).count();
        let empty = std::iter::from_fn(|| original.coordinator.poll_event()).collect::<Vec<_>>();
        assert!(
            matches!(empty.as_slice(), [CoordinatorEvent::RoundCommitted { stats, .. }] if stats.n_reported == 0),
            "{empty:?}"
        );

        let saved = original.coordinator.state().expect("between rounds");
        assert_eq!(saved.ledger.entries().len(), 6);
        assert_eq!((saved.version, saved.next_round), (6, 6));
        assert_eq!(saved.clip_norm != cfg.clip_norm, adaptive.is_some(), "only adaptive clipping moves C");
        // A different RNG: the randomness is not part of the state, the spend is.
        let restored =
            Coordinator::restore(cfg.clone(), saved.clone(), seeded_rng(999)).expect("valid state");
        assert_eq!(restored.state().as_ref(), Some(&saved));
        assert_eq!(restored.ledger(), original.coordinator.ledger());
        assert_eq!(restored.model().version, original.coordinator.model().version);
        assert_eq!(restored.clip_norm(), original.coordinator.clip_norm());
        let spent =
            |c: &Coordinator<ChaCha12Rng>| c.ledger().epsilon(DELTA, AccountantKind::Rdp).expect("ok");
        assert_eq!(spent(&restored), spent(&original.coordinator));
        assert!(spent(&restored) > 0.0);

        // Both continue in lockstep and refuse the same round.
        let harness = HarnessConfig { dropout: 0.0, n_threads: 1, latency: Duration::from_millis(20) };
        let mut resumed = Federation::new(restored, &devices, harness, seeded_rng(77));
        let mut n_more = 0;
        loop {
            let idx = next_round(&original.coordinator);
            assert_eq!(next_round(&resumed.coordinator), idx);
            let (a, b) = (original.run_round(), resumed.run_round());
            let round_of = |r: &RoundReport| match &r.event {
                None => None,
                Some(CoordinatorEvent::RoundCommitted { stats, .. }) => Some(stats.round),
                Some(other) => panic!("unexpected {other:?}"),
            };
            assert_eq!(round_of(&a), round_of(&b), "case {case}, round {idx}");
            assert_eq!(original.coordinator.ledger(), resumed.coordinator.ledger());
            if a.event.is_none() {
                break;
            }
            n_more += 1;
            assert!(n_more < 50, "no refusal");
        }
        let n_max = max_rounds_within(q, z_charged, AccountantKind::Rdp, budget);
        assert_eq!(n_max, 9);
        assert_eq!(original.coordinator.ledger().entries().len() as u64, n_max, "case {case}");
        assert_eq!(n_more, 3, "case {case}: 6 rounds before the restart, 3 after");
        let (ta, tb) = (original.now(), resumed.now());
        let refusal = original.coordinator.start_round(ta);
        assert!(matches!(refusal, Err(StartError::BudgetExhausted { .. })), "{refusal:?}");
        assert_eq!(resumed.coordinator.start_round(tb), refusal);

        // Restoring the final state refuses at once, whatever the new RNG.
        let last = original.coordinator.state().expect("between rounds");
        let mut again = Coordinator::restore(cfg, last, seeded_rng(5)).expect("valid state");
        assert_eq!(again.start_round(Instant::ZERO), refusal);
    }
}

#[test]
fn restored_ledgers_and_states_are_checked() {
    // A ledger read back from storage: every entry must be a valid event.
    let good = LedgerEntry { round: 0, q: 0.2, noise_multiplier: 1.0, clip_bits_noise: None };
    for bad in [
        LedgerEntry { q: 1.5, ..good },
        LedgerEntry { q: -0.1, ..good },
        LedgerEntry { q: f64::NAN, ..good },
        LedgerEntry { noise_multiplier: 0.0, ..good },
        LedgerEntry { noise_multiplier: -1.0, ..good },
        LedgerEntry { noise_multiplier: f64::NAN, ..good },
        LedgerEntry { noise_multiplier: f64::INFINITY, ..good },
    ] {
        let entries = vec![good, LedgerEntry { round: 1, ..bad }, LedgerEntry { round: 2, ..good }];
        assert!(Ledger::from_entries(entries).is_err(), "{bad:?} was accepted");
    }
    let entries: Vec<LedgerEntry> = (0..4).map(|round| LedgerEntry { round, ..good }).collect();
    let ledger = Ledger::from_entries(entries.clone()).expect("valid entries");
    assert_eq!(ledger.entries(), entries.as_slice());
    let want = epsilon_of(0.2, 1.0, 4, AccountantKind::Rdp);
    assert_eq!(ledger.epsilon(DELTA, AccountantKind::Rdp), Ok(want));

    // A state whose optimizer state is for another model shape, or whose clip norm is
    // invalid, is refused.
    let devices = devices();
    let mut cfg = config(Selection::Poisson { q: 0.3 }, 1.0, 1);
    cfg.privacy = Some(policy(20.0, AccountantKind::Rdp));
    let mut fed = federation(cfg.clone(), &devices, 0.0, 40);
    fed.run_round();
    let state = fed.coordinator.state().expect("between rounds");
    let n_params = SHAPE.layout().trainable().len();
    assert_eq!(state.server.n_params(), n_params);
    let restore = |s: CoordinatorState| Coordinator::restore(cfg.clone(), s, seeded_rng(1)).map(|_| ());
    assert_eq!(restore(state.clone()), Ok(()));
    for n in [0, n_params - 1, n_params + 1] {
        let mut s = state.clone();
        s.server = ServerState::new(ServerOptimizer::adam(0.05), n);
        let err: ParamError = restore(s).expect_err("wrong optimizer shape");
        assert_eq!(err.name, "state", "{n} parameters: {err}");
    }
    for clip_norm in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut s = state.clone();
        s.clip_norm = clip_norm;
        assert_eq!(restore(s).expect_err("bad clip norm").name, "state", "clip norm {clip_norm}");
    }
    // A restore validates the configuration like a fresh start.
    let mut bad = cfg.clone();
    bad.noise_multiplier = 0.0;
    assert!(Coordinator::restore(bad, state, seeded_rng(1)).is_err());
}

#[test]
fn configurations_that_would_weaken_privacy_are_refused() {
    let build = |cfg: CoordinatorConfig| Coordinator::new(cfg, init_model(1), seeded_rng(1)).map(|_| ());
    let name = |cfg: CoordinatorConfig| build(cfg).expect_err("must be refused").name;
    let budget = policy(1.0, AccountantKind::Rdp);
    let poisson = Selection::Poisson { q: 0.2 };
    let first_come = Selection::FirstCome { cohort: 5 };

    // A budget without noise.
    let mut cfg = config(poisson, 0.0, 1);
    cfg.privacy = Some(budget);
    assert_eq!(name(cfg.clone()), "noise_multiplier");
    cfg.noise_multiplier = 1.0;
    assert_eq!(build(cfg), Ok(()));
    // Issue 10: Poisson selection with noise needs the public population (the denominator).
    let mut cfg = config(poisson, 1.0, 1);
    cfg.population = None;
    assert_eq!(name(cfg.clone()), "population");
    cfg.noise_multiplier = 0.0;
    assert_eq!(build(cfg.clone()), Ok(()), "without noise the population may be left out");
    cfg.population = Some(0);
    assert_eq!(name(cfg), "population");
    // Noise with a selection the accountant does not model, with or without a budget.
    assert_eq!(name(config(first_come, 1.0, 1)), "selection");
    let mut cfg = config(first_come, 1.0, 1);
    cfg.privacy = Some(budget);
    assert_eq!(name(cfg), "selection");
    let mut cfg = config(first_come, 0.0, 1);
    cfg.privacy = Some(budget);
    assert!(build(cfg).is_err());

    let valid = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 1.0 };
    let with = |adaptive: AdaptiveClip, z: f32| {
        let mut cfg = config(poisson, z, 1);
        cfg.adaptive_clip = Some(adaptive);
        cfg
    };
    assert_eq!(build(with(valid, 1.0)), Ok(()));
    assert_eq!(build(with(AdaptiveClip { count_noise_multiplier: 0.0, ..valid }, 0.0)), Ok(()));
    for gamma in [0.0, 1.0, -0.5, 1.5, f32::NAN] {
        let err = name(with(AdaptiveClip { target_quantile: gamma, ..valid }, 1.0));
        assert_eq!(err, "target_quantile", "γ = {gamma}");
    }
    for eta in [0.0, -0.1, f32::NAN, f32::INFINITY] {
        let err = name(with(AdaptiveClip { learning_rate: eta, ..valid }, 1.0));
        assert_eq!(err, "clip_learning_rate", "η = {eta}");
    }
    // Noise on the update but none on the bits would leave the bits unprotected.
    let err = name(with(AdaptiveClip { count_noise_multiplier: 0.0, ..valid }, 1.0));
    assert_eq!(err, "count_noise_multiplier");
    for zb in [-1.0, f32::NAN, f32::INFINITY] {
        let err = name(with(AdaptiveClip { count_noise_multiplier: zb, ..valid }, 1.0));
        assert_eq!(err, "count_noise_multiplier", "σ_b = {zb}");
    }
    // Budgets themselves: no zero, infinite or NaN ε, no δ outside (0, 1).
    for (eps, delta) in
        [(0.0, 1e-5), (-1.0, 1e-5), (f64::INFINITY, 1e-5), (f64::NAN, 1e-5), (1.0, 0.0), (1.0, 1.0)]
    {
        assert!(PrivacyBudget::new(eps, delta).is_err(), "ε = {eps}, δ = {delta}");
    }
}

/// The L2 norm of a device's unclipped update against `model`, recomputed here.
fn update_norm(model: &RoundModel, ratings: &[Rating]) -> f64 {
    let user = reconstruct(model, ratings, &EXPLICIT).expect("definite");
    local_update(model, ratings, &user, &EXPLICIT).norm_sq().sqrt()
}

/// The L2 norms of every device's unclipped update against `model`, sorted.
fn update_norms(model: &RoundModel, devices: &[Vec<Rating>]) -> Vec<f64> {
    let mut norms: Vec<f64> = devices.iter().map(|r| update_norm(model, r)).collect();
    norms.sort_by(f64::total_cmp);
    norms
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) }
}

#[test]
fn adaptive_clipping_tracks_the_median_update_norm() {
    let devices = devices();
    let n_rounds = 150;
    for selection in [Selection::FirstCome { cohort: N_DEVICES }, Selection::Poisson { q: 0.6 }] {
        for start in [1e-3f32, 1e3] {
            let mut cfg = config(selection, 0.0, 1);
            cfg.clip_norm = start;
            let a = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 0.0 };
            cfg.adaptive_clip = Some(a);
            let mut fed = federation(cfg, &devices, 0.0, 50);
            let initial = median(&update_norms(fed.coordinator.model(), &devices));
            assert!(f64::from(start) < initial / 100.0 || f64::from(start) > initial * 100.0, "{initial}");

            let mut history: Vec<(RoundStats, usize, usize)> = Vec::new();
            fed.run_rounds(n_rounds, |report, _| {
                let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &report.event else {
                    panic!("{report:?}")
                };
                history.push((stats.clone(), report.n_completed, report.n_clipped));
            });
            let desc = format!("{selection:?}, start {start}");
            // Each round's fraction is the devices' bits over the expected cohort, and moves
            // C by exp(−η (b̄ − γ)).
            for (k, (stats, n_completed, n_clipped)) in history.iter().enumerate() {
                let denominator = match selection {
                    Selection::FirstCome { .. } => *n_completed as f64,
                    // The configured population, not the devices that checked in.
                    Selection::Poisson { q } => q * N_DEVICES as f64,
                };
                let want = (n_completed - n_clipped) as f64 / denominator;
                let got = stats.unclipped_fraction.expect("adaptive clipping reports the fraction");
                assert!((got - want).abs() < 1e-12, "{desc}, round {k}: fraction {got} vs {want}");
                let next = history.get(k + 1).map_or(fed.coordinator.clip_norm(), |h| h.0.clip_norm);
                let step = (-0.2 * (got - 0.5)).exp();
                let expected = f64::from(stats.clip_norm) * step;
                assert!(
                    (f64::from(next) / expected - 1.0).abs() < 1e-6,
                    "{desc}, round {k}: C {} → {next}, expected {expected}",
                    stats.clip_norm
                );
            }
            let last: Vec<f64> =
                history[n_rounds - 20..].iter().map(|h| h.0.unclipped_fraction.expect("set")).collect();
            let mean = last.iter().sum::<f64>() / last.len() as f64;
            assert!((0.3..=0.7).contains(&mean), "{desc}: unclipped fraction over the last 20 rounds {mean}");
            let norms = update_norms(fed.coordinator.model(), &devices);
            let target = median(&norms);
            let clip = f64::from(fed.coordinator.clip_norm());
            assert!(
                clip / target < 1.5 && target / clip < 1.5,
                "{desc}: clip norm {clip} vs median update norm {target} (norms {norms:?})"
            );
        }
    }
}

/// Drains the coordinator's outbox.
fn drain(c: &mut Coordinator<ChaCha12Rng>) -> Vec<(u64, ServerMessage)> {
    std::iter::from_fn(|| c.poll_transmit()).collect()
}

/// Checks in devices `0..n` through real [`ClientRound`]s and hands them their tasks.
fn check_in<'a>(
    coord: &mut Coordinator<ChaCha12Rng>,
    devices: &'a [Vec<Rating>],
    n: usize,
) -> Vec<ClientRound<'a>> {
    let far = Instant::from_micros(u64::MAX);
    let mut clients: Vec<ClientRound<'a>> = devices[..n].iter().map(|r| ClientRound::new(r, far)).collect();
    for (id, client) in clients.iter_mut().enumerate() {
        let msg = client.poll_transmit().expect("a check-in");
        coord.handle_message(Instant::ZERO, id as u64, msg);
    }
    for (to, msg) in drain(coord) {
        if let ServerMessage::Selected { task, .. } = &msg {
            assert_eq!(task.report_clip_bit, coord.config().adaptive_clip.is_some());
        }
        clients[to as usize].handle_message(Instant::ZERO, msg);
    }
    clients
}

#[test]
fn clip_bits_are_sent_only_when_asked_and_required_under_adaptive_clipping() {
    let devices = devices();
    let model = RoundModel::new(0, init_model(60));
    let norms: Vec<f64> = devices[..3].iter().map(|r| update_norm(&model, r)).collect();
    let mut sorted = norms.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(sorted[1] / sorted[0] > 1.05, "{norms:?}");
    // Between the smallest and the middle norm: one device within the bound, two clipped.
    let clip = (0.5 * (sorted[0] + sorted[1])) as f32;
    let within = |k: usize| norms[k] < f64::from(clip);

    for adaptive in [false, true] {
        let mut cfg = config(Selection::FirstCome { cohort: 3 }, 0.0, 1);
        cfg.clip_norm = clip;
        cfg.adaptive_clip = adaptive.then_some(AdaptiveClip {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_multiplier: 0.0,
        });
        let mut coord = Coordinator::new(cfg, init_model(60), seeded_rng(61)).expect("valid config");
        let round = coord.start_round(Instant::ZERO).expect("no budget");
        let mut clients = check_in(&mut coord, &devices, 3);
        let t1 = Instant::from_micros(1_000_000);
        let mut uploads = Vec::new();
        for (k, client) in clients.iter_mut().enumerate() {
            let msg = client.poll_transmit().expect("a selected device uploads");
            let ClientMessage::Upload { within_bound, update, .. } = &msg else { panic!("{msg:?}") };
            let want = adaptive.then_some(within(k));
            assert_eq!(*within_bound, want, "adaptive {adaptive}, device {k}");
            assert_eq!(update.was_clipped(), !within(k));
            uploads.push(msg);
        }
        // Under adaptive clipping an upload without the bit is refused, and the device may
        // still send a proper one; otherwise a bit nobody asked for is ignored.
        let ClientMessage::Upload { update, .. } = uploads[0].clone() else { unreachable!() };
        let stripped = ClientMessage::Upload { round, update: update.clone(), within_bound: None };
        coord.handle_message(t1, 0, stripped);
        let out = drain(&mut coord);
        if adaptive {
            let [(0, ServerMessage::Rejected { reason, .. })] = out.as_slice() else { panic!("{out:?}") };
            assert_eq!(*reason, Rejection::MissingClipBit);
            for (k, msg) in uploads.into_iter().enumerate() {
                coord.handle_message(t1, k as u64, msg);
            }
        } else {
            assert!(matches!(out.as_slice(), [(0, ServerMessage::Ack { .. })]), "{out:?}");
            for (to, msg) in out {
                clients[to as usize].handle_message(t1, msg);
            }
            for (k, msg) in uploads.into_iter().enumerate().skip(1) {
                let ClientMessage::Upload { round, update, .. } = msg else { unreachable!() };
                coord.handle_message(
                    t1,
                    k as u64,
                    ClientMessage::Upload { round, update, within_bound: Some(true) },
                );
            }
        }
        for (to, msg) in drain(&mut coord) {
            assert!(matches!(msg, ServerMessage::Ack { .. }), "{msg:?}");
            clients[to as usize].handle_message(t1, msg);
        }
        let events: Vec<CoordinatorEvent> = std::iter::from_fn(|| coord.poll_event()).collect();
        let stats = events
            .iter()
            .find_map(|e| match e {
                CoordinatorEvent::RoundCommitted { stats, .. } => Some(stats),
                _ => None,
            })
            .expect("all three reported: the round commits");
        assert_eq!(stats.n_reported, 3);
        if adaptive {
            assert_eq!(stats.rejected, vec![("missing_clip_bit", 1)]);
            assert_eq!(stats.unclipped_fraction, Some(1.0 / 3.0));
            // C moves by exp(−0.2 (1/3 − 1/2)).
            let want = f64::from(clip) * (0.2f64 / 6.0).exp();
            assert!((f64::from(coord.clip_norm()) / want - 1.0).abs() < 1e-6);
        } else {
            assert!(stats.rejected.is_empty());
            assert_eq!(stats.unclipped_fraction, None);
            assert_eq!(coord.clip_norm(), clip);
        }
        for (k, c) in clients.iter().enumerate() {
            assert_eq!(c.outcome(), Some(&ClientOutcome::Completed { round, was_clipped: !within(k) }));
        }
    }
}

#[test]
fn adaptive_clipping_is_charged_for_its_bits() {
    let devices = devices();
    let (q, z, zb) = (0.4, 1.0f32, 2.0f32);
    let mut cfg = config(Selection::Poisson { q }, z, 1);
    cfg.adaptive_clip =
        Some(AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: zb });
    let mut fed = federation(cfg, &devices, 0.0, 70);
    let z_eff = fed.coordinator.effective_noise_multiplier();
    assert!((z_eff - 1.25f64.powf(-0.5)).abs() < 1e-12, "{z_eff}");
    assert!((z_eff - combined(z, zb)).abs() < 1e-15);
    assert_eq!(
        fed.coordinator.round_charge(7),
        Some(LedgerEntry { round: 7, q, noise_multiplier: z_eff, clip_bits_noise: Some(f64::from(zb)) })
    );
    for round in 0..3u64 {
        let report = fed.run_round();
        let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &report.event else {
            panic!("{report:?}")
        };
        assert_eq!(stats.round, round);
        // The update itself is noised at z·C; the bits at σ_b; the charge combines them.
        assert_noise_std(stats.noise_std, z * stats.clip_norm);
        assert!(stats.unclipped_fraction.is_some());
    }
    let ledger = fed.coordinator.ledger();
    let want: Vec<LedgerEntry> = (0..3)
        .map(|round| LedgerEntry { round, q, noise_multiplier: z_eff, clip_bits_noise: Some(f64::from(zb)) })
        .collect();
    assert_eq!(ledger.entries(), want.as_slice());
    let spent = ledger.epsilon(DELTA, AccountantKind::Rdp).expect("ok");
    assert_eq!(spent, epsilon_of(q, z_eff, 3, AccountantKind::Rdp));
    // The bits are not free: the same rounds without them would cost less.
    assert!(spent > epsilon_of(q, f64::from(z), 3, AccountantKind::Rdp) * 1.05);
}

/// Compiles only for a cryptographically secure generator.
fn assert_csprng<R: rand::CryptoRng>(_: &R) {}

#[test]
fn the_charge_is_the_configured_sampling_rate_and_noise() {
    let devices = devices();
    let (q, z) = (0.35, 0.85f32);
    let mut fed = federation(config(Selection::Poisson { q }, z, 1), &devices, 0.2, 80);
    // The coordinator draws selection and noise from a CSPRNG (its type demands one).
    assert_csprng(&seeded_rng(0));
    assert_eq!(fed.coordinator.effective_noise_multiplier(), f64::from(z));
    let mut committed = Vec::new();
    for _ in 0..4 {
        let report = fed.run_round();
        match &report.event {
            Some(CoordinatorEvent::RoundCommitted { stats, .. }) => {
                assert_noise_std(stats.noise_std, z * stats.clip_norm);
                assert_eq!(stats.denominator, q * N_DEVICES as f64);
                assert_eq!(stats.n_checked_in, N_DEVICES);
                committed.push(stats.round);
            }
            other => panic!("{other:?}"),
        }
    }
    // Without a budget the spend is still recorded, at exactly the configured q and z.
    for (e, &round) in fed.coordinator.ledger().entries().iter().zip(&committed) {
        assert_eq!(*e, LedgerEntry { round, q, noise_multiplier: f64::from(z), clip_bits_noise: None });
    }
    assert_eq!(fed.coordinator.ledger().entries().len(), committed.len());

    // Rounds without noise claim no privacy, and so record none.
    for selection in [Selection::FirstCome { cohort: 10 }, Selection::Poisson { q }] {
        let mut fed = federation(config(selection, 0.0, 1), &devices, 0.0, 90);
        assert_eq!(fed.coordinator.round_charge(0), None);
        for _ in 0..2 {
            let report = fed.run_round();
            assert!(matches!(report.event, Some(CoordinatorEvent::RoundCommitted { .. })), "{report:?}");
        }
        assert!(fed.coordinator.ledger().entries().is_empty());
    }
}

/// A restart takes the operator's new configuration where it may change (a fixed clip norm,
/// the optimizer's hyper-parameters) and never the spend: the ledger comes from the state.
#[test]
fn restart_takes_the_new_configuration_but_keeps_the_spend() {
    let devices = devices();
    let mut cfg = config(Selection::Poisson { q: 0.3 }, 1.2, 1);
    cfg.privacy = Some(policy(budget_for_rounds(0.3, 1.2, 9), AccountantKind::Rdp));
    let mut fed = federation(cfg.clone(), &devices, 0.0, 77);
    for _ in 0..3 {
        fed.run_round();
    }
    let saved = fed.coordinator.state().expect("between rounds");
    let mut changed = cfg.clone();
    changed.clip_norm = cfg.clip_norm * 0.5;
    changed.optimizer = ServerOptimizer::adam(0.001);
    let restored = Coordinator::restore(changed.clone(), saved.clone(), seeded_rng(5)).expect("valid state");
    assert_eq!(restored.clip_norm(), changed.clip_norm, "a fixed clip norm comes from the configuration");
    assert_eq!(restored.ledger(), &saved.ledger, "the spend comes from the state");
    // Switching optimizer kind restarts its moments rather than misreading them.
    changed.optimizer = ServerOptimizer::Sgd { lr: 0.1, momentum: 0.5 };
    let sgd = Coordinator::restore(changed, saved, seeded_rng(6)).expect("valid state");
    assert_eq!(sgd.state().map(|s| s.server.step()), Some(0));
}

/// Issue 10 (1): the noised sum used to be divided by `q ×` the devices that checked in, an
/// unnoised count that moves by one with a user's presence, and the step's noise scale
/// carried it. Two worlds that differ by one device now divide by the same public number,
/// and the noise on the step, `σ C / denominator`, is the same in both.
#[test]
fn issue_10_the_denominator_is_the_same_in_neighbouring_worlds() {
    let all = devices();
    let without_one = &all[1..];
    let (q, z) = (0.4, 1.0f32);
    let cfg = config(Selection::Poisson { q }, z, 1);
    let mut seen = Vec::new();
    for world in [&all[..], without_one] {
        let mut fed = federation(cfg.clone(), world, 0.0, 300);
        for _ in 0..3 {
            let report = fed.run_round();
            let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &report.event else {
                panic!("{report:?}")
            };
            assert_eq!(stats.n_checked_in, world.len(), "every device checks in");
            assert!(stats.private, "a round with noise is private");
            seen.push((stats.denominator, stats.noise_std));
        }
    }
    assert!(seen.iter().all(|&s| s == seen[0]), "{seen:?}");
    assert_eq!(seen[0].0, q * N_DEVICES as f64, "q x population");
    assert_noise_std(seen[0].1, z * cfg.clip_norm);
}

/// Issue 10 (1): with noise the outcome of a round may not depend on how many devices
/// reported, so it commits (a noise-only step if nobody did) and is charged; without noise
/// `min_reports` still abandons a short round.
#[test]
fn issue_10_a_noised_round_commits_whatever_the_number_of_reports() {
    let all = devices();
    let (q, z) = (0.5, 1.0f32);
    for dropout in [0.0, 1.0] {
        let mut fed = federation(config(Selection::Poisson { q }, z, N_DEVICES + 1), &all, dropout, 310);
        let report = fed.run_round();
        let Some(CoordinatorEvent::RoundCommitted { stats, new_version }) = &report.event else {
            panic!("dropout {dropout}: {report:?}")
        };
        assert_eq!(*new_version, 1);
        assert!(stats.n_reported < N_DEVICES + 1);
        assert_eq!(stats.n_reported == 0, dropout == 1.0, "{stats:?}");
        assert_eq!(fed.coordinator.ledger().entries().len(), 1, "the round is charged");
    }
    let mut fed = federation(config(Selection::Poisson { q }, 0.0, N_DEVICES + 1), &all, 0.0, 320);
    let report = fed.run_round();
    assert!(
        matches!(&report.event, Some(CoordinatorEvent::RoundAbandoned { stats, .. }) if !stats.private),
        "{report:?}"
    );
}

/// The noise a round reports is `z·C`, up to the discrete Gaussian's grid, whose standard
/// deviation is slightly (about 1%) above the continuous one.
fn assert_noise_std(got: f32, z_c: f32) {
    assert!(got >= z_c && got <= 1.02 * z_c, "noise std {got} vs z·C = {z_c}");
}

/// Issue 10: a round with noise commits at its report deadline and never earlier, even when
/// every selected device reported long before it (an early close would release that they
/// all did); a round without noise still closes as soon as every selected device reported.
#[test]
fn issue_10_a_noised_round_commits_only_at_its_deadline() {
    let all = devices();
    let cfg = config(Selection::Poisson { q: 0.5 }, 1.0, 1);
    let full = cfg.checkin_window + cfg.report_window;
    let duration = |z: f32| {
        let mut fed = federation(CoordinatorConfig { noise_multiplier: z, ..cfg.clone() }, &all, 0.0, 330);
        let report = fed.run_round();
        let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &report.event else {
            panic!("{report:?}")
        };
        assert!(stats.n_reported > 0 && stats.n_reported == stats.n_selected, "{stats:?}");
        stats.duration
    };
    assert_eq!(duration(1.0), full, "a noised round closes at its deadline");
    assert!(duration(0.0) < full, "a round without noise closes once everyone reported");
}
