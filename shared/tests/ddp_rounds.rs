//! Distributed DP in the round machines (issue 12): the sum the coordinator unmasks is already noised with the accountant's variance, dropouts keep the full noise or abort the round, the ledger charges the distributed accountant's event, the device's policy refuses central or weak noise before sending anything, configurations are checked, and the wire carries `D` masked words.

mod common;

use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::ddp::{self, DdpEvent, DdpParams, DdpValidParams};
use fedrec_shared::ledger::{PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::AccountantKind;
use fedrec_shared::round::secure::{
    DeviceSecAgg, DistributedPolicy, SecurePolicy, SecureRefusal, ServerSecAgg,
};
use fedrec_shared::round::{
    AbandonReason, Aggregation, ClientMessage, ClientOutcome, ClientRound, Coordinator, CoordinatorConfig,
    CoordinatorEvent, DistributedNoise, Instant, Mechanism, SecureAggregation, Selection, ServerMessage,
    TaskPrivacy, TaskSelection, distributed_params,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::wire::{self, LEN_PREFIX, Limits, MaskedInput, Request};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, TrainParams};
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha12Rng, ChaCha20Rng};

const EXPLICIT: TrainParams = TrainParams {
    objective: Objective::Explicit,
    l2_user: 0.5,
    l2_user_bias: 0.1,
    l2_item: 0.01,
    l2_item_bias: 0.01,
    user_support_exponent: 0.0,
};

/// A device policy that accepts tiny cohorts: these tests exercise the noise, not SecAgg's policy.
const PERMISSIVE: SecurePolicy = SecurePolicy { min_cohort: 1, corrupt: 0.0, log2_security: -40.0 };

// ---------------------------------------------------------------------------------------------
// Module level: DeviceSecAgg and ServerSecAgg driven by hand.
// ---------------------------------------------------------------------------------------------

fn task_privacy(z: f64, clip: f32, q: f64, population: u64, min_reports: u64) -> TaskPrivacy {
    TaskPrivacy {
        mechanism: Mechanism::DistributedDiscreteGaussian,
        noise_multiplier: z,
        clip_norm: clip,
        selection: TaskSelection::Poisson { q },
        min_reports,
        population: Some(population),
        aggregation: Aggregation::Secure,
    }
}

/// One module-level distributed round: `updates.len()` devices, those with `drop[i]` vanish
/// after sharing keys (before their masked input). Returns the round's parameters, the decoded
/// sum (or why not) and the survivors.
fn module_round(
    privacy: &TaskPrivacy,
    updates: &[Vec<f32>],
    drop: &[bool],
    bits: u32,
    seed: u64,
) -> (DdpValidParams, Result<Vec<f32>, ddp::DdpError>, Vec<usize>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let dim = updates[0].len();
    let clip = privacy.clip_norm;
    let template = distributed_params(privacy, clip, dim, bits, [0; 32]).expect("a task with a cohort");
    let mut server = ServerSecAgg::new_distributed(3, template, 0.4, 0.0);
    let mut devices: Vec<DeviceSecAgg> = Vec::new();
    for (i, x) in updates.iter().enumerate() {
        let noise = DistributedPolicy::default();
        let (d, c, s) =
            DeviceSecAgg::new_distributed(3, x.clone(), *privacy, clip, PERMISSIVE, noise, &mut rng);
        server.add_keys(i as u64, c, s).expect("fresh keys");
        devices.push(d);
    }
    let requests = server.close_keys(&mut rng).expect("a cohort within the calibration");
    for (client, req) in requests {
        let shares = devices[client as usize].share_keys(req, &mut rng).expect("valid parameters");
        server.add_shares(client, shares).expect("shares in order");
    }
    let params = server.ddp_params().expect("keys closed").clone();
    let requests = server.close_shares().expect("enough shared");
    for (client, req) in requests {
        if drop[client as usize] {
            continue;
        }
        let words = devices[client as usize].masked_input(req).expect("a masked input");
        assert_eq!(words.len(), params.padded_dim());
        server.add_masked(client, &words).expect("in the ring");
    }
    let survivors: Vec<usize> = (0..updates.len()).filter(|&i| !drop[i]).collect();
    let requests = match server.close_masked() {
        Ok(r) => r,
        Err(_) => {
            let n = survivors.len();
            let p = *params.params();
            let refused =
                ddp::DdpError::Survivors { n_survivors: n, min_reports: p.min_reports, n_cohort: p.n_cohort };
            return (params, Err(refused), survivors);
        }
    };
    for (client, req) in requests {
        let answer = devices[client as usize].unmask(&req).expect("shares");
        server.add_unmask(client, answer).expect("as asked");
    }
    let (lifted, n) = server.finish().expect("unmasks");
    assert_eq!(n, survivors.len());
    (params.clone(), ddp::decode_centred(&lifted, &params, n), survivors)
}

/// Random updates of length `dim`, each clipped to `clip` (half of them longer before clipping).
fn random_updates(n: usize, dim: usize, clip: f32, rng: &mut ChaCha12Rng) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            let scale = if i % 2 == 0 { 3.0 } else { 0.5 };
            let mut x: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let norm = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let target = f64::from(clip) * scale;
            let s = (target / norm).min(f64::from(clip) / norm);
            x.iter_mut().for_each(|v| *v = (f64::from(*v) * s) as f32);
            x
        })
        .collect()
}

/// The per-coordinate variance of `decoded − Σ_{survivors} x_i`, and the variance the
/// accountant assumes for `n'` shares, `γ² n' σ_dev²` (model units).
fn residual_variance(
    params: &DdpValidParams,
    decoded: &[f32],
    updates: &[Vec<f32>],
    survivors: &[usize],
) -> (f64, f64) {
    let dim = decoded.len();
    let mut truth = vec![0.0f64; dim];
    for &i in survivors {
        for (t, &x) in truth.iter_mut().zip(&updates[i]) {
            *t += f64::from(x);
        }
    }
    let resid: Vec<f64> = decoded.iter().zip(&truth).map(|(&d, &t)| f64::from(d) - t).collect();
    let mean = resid.iter().sum::<f64>() / dim as f64;
    let var = resid.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (dim as f64 - 1.0);
    let want = params.gamma().powi(2) * survivors.len() as f64 * params.device_var();
    (var, want)
}

/// The sum the coordinator unmasks is already noised: after decoding, it differs from the true
/// sum of the clipped updates by noise whose variance per coordinate is the accountant's
/// `γ² n σ_dev²` (within 6 standard errors, plus the rounding's at most `γ² n/4`). Without the
/// devices' shares the residual would be the rounding alone, `≤ γ² n / 4`, far below it.
#[test]
fn the_unmasked_sum_is_already_noised_with_the_accountants_variance() {
    let mut rng = ChaCha12Rng::seed_from_u64(1);
    let (n, dim, clip) = (12, 3000, 2.0f32);
    let privacy = task_privacy(1.0, clip, 0.1, 100, 8);
    let updates = random_updates(n, dim, clip, &mut rng);
    let (params, decoded, survivors) = module_round(&privacy, &updates, &[false; 12], 16, 7);
    let decoded = decoded.expect("12 survivors of a minimum of 8");
    let (var, want) = residual_variance(&params, &decoded, &updates, &survivors);
    let rounding = params.gamma().powi(2) * n as f64 / 4.0;
    let se = want * (2.0 / dim as f64).sqrt();
    println!(
        "n = {n}, D = {}, γ = {:.3e}, σ_dev = {:.1} grid units: residual variance {var:.4e}, accountant {want:.4e} (rounding ≤ {rounding:.2e})",
        params.padded_dim(),
        params.gamma(),
        params.device_var().sqrt()
    );
    assert!(var > want - 6.0 * se, "residual variance {var} below the accountant's {want}");
    assert!(var < want + rounding + 6.0 * se, "residual variance {var} above {want} + rounding {rounding}");
    assert!(rounding < 0.01 * want, "the test needs the noise to dominate the rounding");
    // The target noise σ = z·C is carried by min_reports = 8 shares; 12 carry more.
    let sigma = privacy.noise_multiplier * f64::from(clip);
    assert!(want >= sigma * sigma * 12.0 / 8.0 * (1.0 - 1e-3), "{want} vs σ² = {}", sigma * sigma);
}

/// Dropouts: survivors at or above `min_reports` still carry the full target noise (their
/// shares were calibrated for `min_reports`); fewer, and the coordinator refuses to ask for the
/// unmask shares: nothing is released.
#[test]
fn survivors_above_min_reports_carry_the_full_noise_and_fewer_abort() {
    let mut rng = ChaCha12Rng::seed_from_u64(2);
    let (n, dim, clip) = (12, 3000, 1.0f32);
    let privacy = task_privacy(2.0, clip, 0.1, 100, 8);
    let updates = random_updates(n, dim, clip, &mut rng);
    // Four drop after sharing keys: 8 survivors, exactly min_reports.
    let drop: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
    let (params, decoded, survivors) = module_round(&privacy, &updates, &drop, 16, 8);
    assert_eq!(survivors.len(), 8);
    let decoded = decoded.expect("8 survivors of a minimum of 8");
    let (var, want) = residual_variance(&params, &decoded, &updates, &survivors);
    let sigma = privacy.noise_multiplier * f64::from(clip);
    let se = want * (2.0 / dim as f64).sqrt();
    assert!(want >= sigma * sigma * (1.0 - 1e-3), "8 shares carry {want}, the target is {}", sigma * sigma);
    assert!((var - want).abs() < 6.0 * se + params.gamma().powi(2) * 2.0, "{var} vs {want}");
    // Five drop: 7 survivors, below min_reports: the round stops before unmasking.
    let drop: Vec<bool> = (0..n).map(|i| i < 5).collect();
    let (_, decoded, survivors) = module_round(&privacy, &updates, &drop, 16, 9);
    assert_eq!(survivors.len(), 7);
    assert!(decoded.is_err(), "a sum of 7 shares must not be decoded");
}

// ---------------------------------------------------------------------------------------------
// The real machines: Coordinator and ClientRound, driven single-threaded on a simulated clock.
// ---------------------------------------------------------------------------------------------

const SHAPE: ModelShape = ModelShape { n_items: 40, dim: 4, n_segments: 3 };
const PHASE_WINDOW: Duration = Duration::from_secs(30);

fn init_model(seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.1, global_mean: 3.0, centroid_scale: 1e-3 };
    GlobalModel::init(SHAPE, init, &mut seeded_rng(seed)).expect("valid shape")
}

fn config(
    distributed: Option<DistributedNoise>,
    z: f32,
    min_reports: usize,
    population: usize,
) -> CoordinatorConfig {
    CoordinatorConfig {
        train: EXPLICIT,
        optimizer: ServerOptimizer::Sgd { lr: 1.0, momentum: 0.0 },
        selection: Selection::Poisson { q: 1.0 },
        min_reports,
        population: Some(population),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 1.0,
        noise_multiplier: z,
        adaptive_clip: None,
        privacy: None,
        secure: Some(SecureAggregation {
            dropout: 0.2,
            corrupt: 0.05,
            phase_window: PHASE_WINDOW,
            distributed,
        }),
        centroids: CentroidPolicy::with_min_count(0.5),
    }
}

const BITS16: Option<DistributedNoise> = Some(DistributedNoise { bits: 16 });

/// One round driven by hand: every device checks in at time zero; device `d` vanishes before
/// its masked input when `vanish[d]`. Returns the closing event, the clients' outcomes and every
/// message each client sent.
fn drive(
    coord: &mut Coordinator<ChaCha12Rng>,
    devices: &[Vec<Rating>],
    noise_policy: DistributedPolicy,
    vanish: &[bool],
) -> (CoordinatorEvent, Vec<Option<ClientOutcome>>, Vec<Vec<ClientMessage>>) {
    let mut now = Instant::ZERO;
    coord.start_round(now).expect("a round starts");
    let far = now.saturating_add(Duration::from_secs(24 * 3600));
    let mut clients: Vec<ClientRound<'_>> = devices
        .iter()
        .enumerate()
        .map(|(d, r)| {
            ClientRound::with_rng(r, far, ChaCha20Rng::seed_from_u64(100 + d as u64))
                .with_secure_policy(PERMISSIVE)
                .with_distributed_policy(noise_policy)
        })
        .collect();
    let mut sent: Vec<Vec<ClientMessage>> = vec![Vec::new(); devices.len()];
    loop {
        let mut moved = false;
        for (d, client) in clients.iter_mut().enumerate() {
            while let Some(msg) = client.poll_transmit() {
                moved = true;
                if vanish[d] && matches!(msg, ClientMessage::MaskedInput { .. }) {
                    continue;
                }
                sent[d].push(msg.clone());
                coord.handle_message(now, d as u64, msg);
            }
        }
        while let Some((id, msg)) = coord.poll_transmit() {
            moved = true;
            let d = id as usize;
            if vanish[d] && matches!(msg, ServerMessage::Unmask(_)) {
                continue;
            }
            clients[d].handle_message(now, msg);
        }
        while let Some(event) = coord.poll_event() {
            if matches!(
                event,
                CoordinatorEvent::RoundCommitted { .. } | CoordinatorEvent::RoundAbandoned { .. }
            ) {
                let outcomes = clients.iter().map(|c| c.outcome().cloned()).collect();
                return (event, outcomes, sent);
            }
        }
        if !moved {
            let next = coord.poll_timeout().expect("a round is open");
            now = next.max(now);
            coord.handle_timeout(now);
        }
    }
}

/// A distributed round through the real machines commits without central noise: its stats
/// report the noise of `min_reports` shares, and the ledger holds the distributed accountant's
/// event for `min_reports` shares (not a central charge), whose ε the ledger reports.
#[test]
fn a_distributed_round_commits_and_charges_the_ddp_event() {
    let devices = common::low_rank_ratings(16, SHAPE.n_items, 3, 10, 0.3, 3);
    let mut cfg = config(BITS16, 1.0, 8, 16);
    cfg.privacy = Some(PrivacyPolicy {
        budget: PrivacyBudget::new(1e6, 1e-6).expect("valid"),
        accountant: AccountantKind::Rdp,
    });
    let mut coord = Coordinator::new(cfg, init_model(4), seeded_rng(5)).expect("a valid config");
    assert_eq!(coord.round_charge(0), None, "no central charge with distributed noise");
    let charge = coord.round_ddp_charge(0).expect("a distributed charge");
    let params = coord.ddp_params().expect("distributed").clone();
    assert_eq!(charge.event, DdpEvent::new(&params, 8, 1.0, 1).expect("valid"));
    let (event, outcomes, _) = drive(&mut coord, &devices, DistributedPolicy::default(), &[false; 16]);
    let CoordinatorEvent::RoundCommitted { stats, .. } = event else { panic!("{event:?}") };
    assert!(outcomes.iter().all(|o| matches!(o, Some(ClientOutcome::Completed { .. }))), "{outcomes:?}");
    assert_eq!(stats.n_reported, 16);
    assert_eq!(stats.noise_std, params.survivor_noise_std(8) as f32);
    assert!(coord.ledger().entries().is_empty());
    assert_eq!(coord.ledger().ddp_entries(), &[charge]);
    let eps = coord.ledger().epsilon(1e-6, AccountantKind::Rdp).expect("valid");
    let want = ddp::accountant::epsilon(&[charge.event], 1e-6).expect("valid");
    assert!((eps - want).abs() <= 1e-9 * want, "{eps} vs {want}");
    // The model moved (the round's sum reached the server step).
    assert_ne!(coord.model().model.item_factors, init_model(4).item_factors);
}

/// Dropouts through the real machines: with 10 of 16 masked inputs surviving and
/// `min_reports = 8` the round commits; with 6 it is abandoned as `TooFewNoiseShares`,
/// releases nothing and charges nothing.
#[test]
fn dropouts_below_min_reports_abort_and_charge_nothing() {
    let devices = common::low_rank_ratings(16, SHAPE.n_items, 3, 10, 0.3, 6);
    let vanish: Vec<bool> = (0..16).map(|d| d % 8 < 3).collect();
    let mut coord =
        Coordinator::new(config(BITS16, 1.0, 8, 16), init_model(7), seeded_rng(8)).expect("valid");
    let (event, _, _) = drive(&mut coord, &devices, DistributedPolicy::default(), &vanish);
    let CoordinatorEvent::RoundCommitted { stats, .. } = event else { panic!("{event:?}") };
    assert_eq!(stats.n_reported, 10);
    assert_eq!(coord.ledger().ddp_entries().len(), 1);
    let vanish: Vec<bool> = (0..16).map(|d| d % 8 < 5).collect();
    let mut coord =
        Coordinator::new(config(BITS16, 1.0, 8, 16), init_model(7), seeded_rng(8)).expect("valid");
    let before = coord.model().model.clone();
    let (event, _, _) = drive(&mut coord, &devices, DistributedPolicy::default(), &vanish);
    let CoordinatorEvent::RoundAbandoned { reason, .. } = event else { panic!("{event:?}") };
    assert_eq!(reason, AbandonReason::TooFewNoiseShares);
    assert!(coord.ledger().ddp_entries().is_empty() && coord.ledger().entries().is_empty());
    assert_eq!(coord.model().model, before);
}

/// A device whose policy requires distributed noise refuses a secure round with central noise
/// when the task arrives (it trains nothing and sends nothing after its check-in), and refuses
/// a distributed round whose effective noise multiplier is below its minimum when the
/// share-keys request fixes the parameters (it sends nothing after its keys).
#[test]
fn a_device_that_requires_distributed_noise_refuses_central_or_weak_noise() {
    let devices = common::low_rank_ratings(8, SHAPE.n_items, 3, 10, 0.3, 9);
    let require = DistributedPolicy { require_distributed: true, min_noise_multiplier: 0.9 };
    let mut central = Coordinator::new(config(None, 1.0, 3, 8), init_model(1), seeded_rng(2)).expect("valid");
    let (event, outcomes, sent) = drive(&mut central, &devices, require, &[false; 8]);
    assert!(matches!(event, CoordinatorEvent::RoundAbandoned { .. }), "{event:?}");
    for (o, s) in outcomes.iter().zip(&sent) {
        assert_eq!(o, &Some(ClientOutcome::SecureRefused(SecureRefusal::NotDistributed)));
        assert!(s.iter().all(|m| matches!(m, ClientMessage::CheckIn)), "{s:?}");
    }
    // z = 1 with 16 bits: the effective multiplier σ/(γΔ₂) is just below 1; a device asking
    // for 0.9 takes part, one asking for 1.5 refuses before sharing.
    let mut ok = Coordinator::new(config(BITS16, 1.0, 3, 8), init_model(1), seeded_rng(2)).expect("valid");
    let (event, _, _) = drive(&mut ok, &devices, require, &[false; 8]);
    assert!(matches!(event, CoordinatorEvent::RoundCommitted { .. }), "{event:?}");
    let strict = DistributedPolicy { require_distributed: true, min_noise_multiplier: 1.5 };
    let mut weak = Coordinator::new(config(BITS16, 1.0, 3, 8), init_model(1), seeded_rng(2)).expect("valid");
    let (event, outcomes, sent) = drive(&mut weak, &devices, strict, &[false; 8]);
    assert!(matches!(event, CoordinatorEvent::RoundAbandoned { .. }), "{event:?}");
    for (o, s) in outcomes.iter().zip(&sent) {
        assert!(
            matches!(o, Some(ClientOutcome::SecureRefused(SecureRefusal::DeviceNoiseTooLow(_)))),
            "{o:?}"
        );
        assert!(
            s.iter().all(|m| matches!(m, ClientMessage::CheckIn | ClientMessage::AdvertiseKeys { .. })),
            "{s:?}"
        );
    }
}

/// The configuration is checked with the key named: bits out of range, distributed noise
/// without noise, with adaptive clipping, or with bits too few for the cohort.
#[test]
fn distributed_configurations_are_checked() {
    let refused = |cfg: CoordinatorConfig| {
        Coordinator::new(cfg, init_model(1), seeded_rng(1)).expect_err("refused").to_string()
    };
    for bits in [7, 33] {
        let err = refused(config(Some(DistributedNoise { bits }), 1.0, 3, 8));
        assert!(err.contains("bits"), "{err}");
    }
    let err = refused(config(BITS16, 0.0, 3, 8));
    assert!(err.contains("noise_multiplier"), "{err}");
    let mut adaptive = config(BITS16, 1.0, 3, 8);
    adaptive.adaptive_clip = Some(fedrec_shared::round::AdaptiveClip {
        target_quantile: 0.5,
        learning_rate: 0.2,
        count_noise_multiplier: 5.0,
    });
    let err = refused(adaptive);
    assert!(err.contains("clip") && err.contains("adaptive"), "{err}");
    // 8 bits cannot hold a calibrated cohort of 1000 + 10√1000 + 10.
    let err = refused(config(Some(DistributedNoise { bits: 8 }), 1.0, 3, 1000));
    assert!(err.contains("bits"), "{err}");
    // The task declares the mechanism.
    let coord = Coordinator::new(config(BITS16, 1.0, 3, 8), init_model(1), seeded_rng(1)).expect("valid");
    let p = TaskPrivacy::from_config(coord.config(), 1.0);
    assert_eq!((p.mechanism, p.aggregation), (Mechanism::DistributedDiscreteGaussian, Aggregation::Secure));
}

/// The wire carries a distributed masked input of `D` words (the layout padded to a power of
/// two) of at most 32 bits within the masked-input limit of the layout, and refuses one word
/// more; the same words at 64 bits would not fit, which is why distributed noise takes at most
/// 32 bits.
#[test]
fn the_wire_carries_d_masked_words_and_no_more() {
    let shape = ModelShape { n_items: 1682, dim: 32, n_segments: 8 };
    let layout = shape.layout();
    let padded = layout.len().next_power_of_two();
    assert!(padded > layout.len() + 1);
    let limits = Limits::for_shape(&shape);
    let body = |n: usize, word: u64| {
        let msg = Request::MaskedInput(MaskedInput { round: 1, words: vec![word; n], nonce: [3; 16] });
        let frame = wire::encode(&msg).expect("encodes");
        frame[LEN_PREFIX..].to_vec()
    };
    let ok =
        wire::decode_request(&body(padded, u64::from(u32::MAX)), &limits).expect("D words fit the limit");
    let Request::MaskedInput(m) = ok else { panic!("{ok:?}") };
    assert_eq!(m.words.len(), padded);
    let msg = m.into_client_message(&layout).expect("D words are allowed");
    assert!(matches!(msg, ClientMessage::MaskedInput { ref words, .. } if words.len() == padded));
    for n in [padded - 1, padded + 1] {
        let other = MaskedInput { round: 1, words: vec![0; n], nonce: [0; 16] };
        assert!(other.into_client_message(&layout).is_err(), "{n} words are neither the layout nor D");
    }
    assert!(wire::decode_request(&body(padded, u64::MAX), &limits).is_err(), "64-bit words exceed the limit");
}

/// The calibrated cohort is public: it depends on `q`, the population and `min_reports` only.
#[test]
fn the_calibrated_cohort_is_a_public_bound() {
    let p = task_privacy(1.0, 1.0, 0.01, 100_000, 800);
    // e = 1000: 1000 + 10·31.62 + 10 → 1327.
    assert_eq!(fedrec_shared::round::ddp_cohort_bound(&p), Some(1327));
    let mut first = p;
    first.selection = TaskSelection::FirstCome { cohort: 10 };
    assert_eq!(fedrec_shared::round::ddp_cohort_bound(&first), None);
    let params: DdpParams = distributed_params(&p, 1.0, 55_771, 16, [1; 32]).expect("a cohort");
    assert_eq!((params.n_cohort, params.min_reports, params.bits), (1327, 800, 16));
}
