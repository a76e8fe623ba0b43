//! One regression test per bug found in the shared core, each named after the bug it pins down.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::eval::top_k;
use fedrec_shared::linalg::norm_sq_f64;
use fedrec_shared::round::{
    ClientMessage, ClientOutcome, ClientRound, Coordinator, CoordinatorConfig, CoordinatorEvent, Instant,
    Selection, ServerMessage,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::train::{local_loss, reconstruct};
use fedrec_shared::update::{ClippedUpdate, UpdateVector};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};

fn params(objective: Objective) -> TrainParams {
    TrainParams {
        objective,
        l2_user: 0.1,
        l2_user_bias: 0.1,
        l2_item: 0.01,
        l2_item_bias: 0.01,
        user_support_exponent: 0.0,
    }
}

fn config(train: TrainParams, selection: Selection, noise_multiplier: f32) -> CoordinatorConfig {
    CoordinatorConfig {
        train,
        optimizer: ServerOptimizer::adam(0.05),
        selection,
        min_reports: 1,
        population: Some(200),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(60),
        clip_norm: 1e3,
        noise_multiplier,
        adaptive_clip: None,
        privacy: None,
        secure: None,
        centroids: CentroidPolicy::with_min_count(1.0),
    }
}

fn model(shape: ModelShape) -> GlobalModel {
    let init = ModelInit { factor_std: 0.5, global_mean: 3.0, centroid_scale: 1e-3 };
    GlobalModel::init(shape, init, &mut seeded_rng(1)).expect("valid shape")
}

/// Drives one device through check-in and its task on a fresh first-come round; returns
/// the coordinator's task model and the device's upload, if any.
fn participate<'a>(
    ratings: &'a [Rating],
    train: TrainParams,
    shape: ModelShape,
) -> (ClientRound<'a>, std::sync::Arc<RoundModel>, Option<ClippedUpdate>) {
    let cfg = config(train, Selection::FirstCome { cohort: 1 }, 0.0);
    let mut coord = Coordinator::new(cfg, model(shape), seeded_rng(2)).expect("valid config");
    coord.start_round(Instant::ZERO).expect("no round open");
    let mut client = ClientRound::new(ratings, Instant::from_micros(u64::MAX));
    let msg = client.poll_transmit().expect("check-in");
    coord.handle_message(Instant::ZERO, 0, msg);
    let task_model = coord.model().clone();
    while let Some((_, msg)) = coord.poll_transmit() {
        client.handle_message(Instant::ZERO, msg);
    }
    let upload = client.poll_transmit().map(|m| match m {
        ClientMessage::Upload { update, .. } => update,
        other => panic!("a plain round's device sent {other:?}"),
    });
    (client, task_model, upload)
}

/// `top_k(scores, 0)` computed `best[k - 1]` with `k = 0` and panicked on overflow.
#[test]
fn top_k_of_zero_items_is_empty_not_a_panic() {
    let got = catch_unwind(|| top_k(&[1.0, 2.0, 3.0], 0));
    assert_eq!(got.ok(), Some(Vec::new()), "top_k(.., 0) panicked");
}

/// `norm_sq_f64` promises a relative error below 2e-6 "for any finite input", but squares
/// below f32's normal range are summed in f32 lanes, where they lose their precision
/// (subnormals) or vanish. A clip norm that small then lets an update through unclipped.
#[test]
fn norm_of_tiny_values_keeps_its_relative_accuracy() {
    for x in [1e-20f32, 3e-23, 1e-30] {
        let v = vec![x; 32];
        let exact = 32.0 * f64::from(x) * f64::from(x);
        let got = norm_sq_f64(&v);
        assert!((got / exact - 1.0).abs() < 2e-6, "x = {x:e}: norm² {got:e}, exact {exact:e}");
    }
    let layout = ModelShape { n_items: 8, dim: 3, n_segments: 1 }.layout();
    let tiny = UpdateVector::from_dense(layout, &vec![1e-23; layout.len()]).expect("length");
    let clip = 1e-25;
    let c = ClippedUpdate::clip(tiny, clip).expect("finite");
    let norm = c.vector().to_dense().iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    assert!(norm <= f64::from(clip), "clipped norm {norm:e} exceeds the clip norm {clip:e}");
}

/// Under Poisson selection the coordinator remembered only selected devices, so a device
/// that was not selected could check in again in the same round and get a fresh coin flip,
/// and every check-in counted in `n_checked_in` (the normaliser `q · n_checked_in`). The
/// sampling probability the accountant assumes then no longer holds.
#[test]
fn poisson_rechecking_in_does_not_redraw_the_selection() {
    let shape = ModelShape { n_items: 5, dim: 2, n_segments: 1 };
    let cfg = config(params(Objective::Explicit), Selection::Poisson { q: 0.3 }, 1.0);
    let mut coord = Coordinator::new(cfg, model(shape), seeded_rng(4)).expect("valid config");
    coord.start_round(Instant::ZERO).expect("no round open");
    // 200 devices check in five times each, interleaved.
    let (n_devices, n_tries) = (200u64, 5);
    let mut answers = vec![Vec::new(); n_devices as usize];
    for _ in 0..n_tries {
        for id in 0..n_devices {
            coord.handle_message(Instant::ZERO, id, ClientMessage::CheckIn);
            while let Some((to, msg)) = coord.poll_transmit() {
                answers[to as usize].push(matches!(msg, ServerMessage::Selected { .. }));
            }
        }
    }
    // The first answer decides: later check-ins get the same answer (a selected device its
    // task again, see issue 9 below), never a new draw.
    let redrawn: Vec<u64> = (0..n_devices)
        .filter(|&id| {
            let a = &answers[id as usize];
            a[1..].iter().any(|&later| later != a[0])
        })
        .collect();
    // Each device is in the cohort with probability q: 60 ± 5 sd of 6.5 (with a fresh draw
    // per check-in it would be 1 − 0.7⁵ ≈ 83%).
    let n_selected = answers.iter().filter(|a| a.contains(&true)).count();
    for _ in 0..2 {
        let t = coord.poll_timeout().expect("open");
        coord.handle_timeout(t);
    }
    let stats = std::iter::from_fn(|| coord.poll_event())
        .find_map(|ev| match ev {
            CoordinatorEvent::RoundAbandoned { stats, .. }
            | CoordinatorEvent::RoundCommitted { stats, .. } => Some(stats),
            _ => None,
        })
        .expect("the round closed");
    let summary = format!(
        "{} devices answered differently on a re-check-in, {n_selected} of {n_devices} selected at q = 0.3, n_checked_in = {}",
        redrawn.len(),
        stats.n_checked_in
    );
    assert!(redrawn.is_empty(), "{summary}");
    assert!((n_selected as f64 - 60.0).abs() < 5.0 * 6.5, "{summary}");
    assert_eq!(stats.n_checked_in, n_devices as usize, "{summary}");
}

/// Implicit interaction strengths come from the device's own data. A NaN or a negative
/// strength makes the weight `c − 1` of `NormalEquations::add` negative or NaN, which trips
/// its `debug_assert!(w_a >= 0.0)`: the device panics (in debug builds) instead of failing
/// its round with a `ClientError`.
#[test]
fn bad_implicit_strengths_fail_the_round_instead_of_panicking() {
    let shape = ModelShape { n_items: 6, dim: 2, n_segments: 1 };
    let train = params(Objective::Implicit { alpha: 1.0 });
    let mut panicked = Vec::new();
    for value in [f32::NAN, -3.0, -0.5] {
        let ratings = [Rating { item: 1, value: 1.0 }, Rating { item: 4, value }];
        let run = catch_unwind(AssertUnwindSafe(|| {
            let (client, _, upload) = participate(&ratings, train, shape);
            (client.outcome().cloned(), upload.is_some())
        }));
        match run {
            Err(_) => panicked.push(value),
            Ok((outcome, uploaded)) => {
                if value.is_nan() {
                    assert!(matches!(outcome, Some(ClientOutcome::Failed(_))), "{outcome:?}");
                    assert!(!uploaded);
                }
            }
        }
    }
    assert!(panicked.is_empty(), "the device panicked on strengths {panicked:?}");
}

/// `local_update` requires each item at most once, and `ClientRound` passes the device's
/// data through unchecked. With an item listed twice, `reconstruct` uses both entries;
/// the explicit `local_update` keeps one of them while `local_loss` counts both, and the
/// implicit `local_loss` and `local_update` keep the last. The upload is then not the
/// gradient of the loss the user was reconstructed for.
#[test]
fn device_data_naming_an_item_twice_gives_a_consistent_update() {
    let shape = ModelShape { n_items: 6, dim: 2, n_segments: 1 };
    let mut wrong = Vec::new();
    for objective in [Objective::Explicit, Objective::Implicit { alpha: 2.0 }] {
        let train = params(objective);
        // The user rated item 2 twice (a re-rating), and item 4 once.
        let ratings =
            [Rating { item: 2, value: 5.0 }, Rating { item: 4, value: 3.0 }, Rating { item: 2, value: 1.0 }];
        let (client, task_model, upload) = participate(&ratings, train, shape);
        let Some(upload) = upload else {
            // Refusing such data is a consistent answer too.
            assert!(matches!(client.outcome(), Some(ClientOutcome::Failed(_))));
            continue;
        };
        let user = reconstruct(&task_model, &ratings, &train).expect("definite");
        let dense = upload.vector().to_dense();
        // d/dV₂₀ of the same loss, by central differences (the loss is quadratic in it).
        let h = 1e-2f32;
        let loss_at = |x: f32| {
            let mut m = task_model.model.clone();
            m.item_factors[[2, 0]] = x;
            local_loss(&RoundModel::new(0, m), &ratings, &user, &train)
        };
        let x0 = task_model.model.item_factors[[2, 0]];
        let fd = (loss_at(x0 + h) - loss_at(x0 - h)) / (f64::from(x0 + h) - f64::from(x0 - h));
        let g = f64::from(dense[2 * shape.dim]);
        if (g - fd).abs() > 1e-3 + 1e-2 * fd.abs() {
            wrong.push(format!("{objective:?}: upload {g}, gradient of the loss {fd}"));
        }
        // And the reconstructed user minimises that same loss.
        let best = local_loss(&task_model, &ratings, &user, &train);
        for k in 0..shape.dim {
            for step in [-0.05f32, 0.05] {
                let mut near = user.clone();
                near.factors[k] += step;
                let l = local_loss(&task_model, &ratings, &near, &train);
                if l < best {
                    wrong.push(format!(
                        "{objective:?}: moving u[{k}] by {step} lowers the loss to {l} < {best}"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Issue 9 (lossy links): a selected device whose task was lost on the way, and which checks
/// in again, was told `NotSelected` and silently dropped from the round; a device whose
/// acknowledgement was lost was told `NotSelected` though its upload counted. Now the first
/// gets its task again and the second an acknowledgement; neither is counted or drawn twice.
#[test]
fn a_selected_device_that_checks_in_again_gets_its_task_again_and_a_reported_one_its_ack() {
    let shape = ModelShape { n_items: 6, dim: 2, n_segments: 1 };
    let train = params(Objective::Explicit);
    let cfg = CoordinatorConfig { min_reports: 2, ..config(train, Selection::FirstCome { cohort: 2 }, 0.0) };
    let mut coord = Coordinator::new(cfg, model(shape), seeded_rng(3)).expect("valid config");
    coord.start_round(Instant::ZERO).expect("no round open");
    let answers = |coord: &mut Coordinator<_>| -> Vec<(u64, ServerMessage)> {
        std::iter::from_fn(|| coord.poll_transmit()).collect()
    };
    coord.handle_message(Instant::ZERO, 7, ClientMessage::CheckIn);
    let first = answers(&mut coord);
    assert!(matches!(first.as_slice(), [(7, ServerMessage::Selected { .. })]), "{first:?}");
    // The task was lost: the device checks in again and gets the same task.
    coord.handle_message(Instant::ZERO, 7, ClientMessage::CheckIn);
    let again = answers(&mut coord);
    match (&first[0].1, again.as_slice()) {
        (ServerMessage::Selected { task: t1, .. }, [(7, ServerMessage::Selected { task: t2, .. })]) => {
            assert_eq!(t1, t2)
        }
        other => panic!("the same task again: {other:?}"),
    }
    // The second device fills the cohort; the round moves to its report phase.
    coord.handle_message(Instant::ZERO, 8, ClientMessage::CheckIn);
    let _ = answers(&mut coord);
    // Device 7 trains on its task and reports; then its acknowledgement is lost.
    let ratings = [Rating { item: 1, value: 4.0 }, Rating { item: 3, value: 2.0 }];
    let mut client = ClientRound::new(&ratings, Instant::from_micros(u64::MAX));
    let _check_in = client.poll_transmit();
    client.handle_message(Instant::ZERO, first[0].1.clone());
    let upload = client.poll_transmit().expect("an upload");
    coord.handle_message(Instant::ZERO, 7, upload);
    let _lost_ack = answers(&mut coord);
    // Its next participation's check-in learns that the upload was taken.
    let mut retry = ClientRound::new(&ratings, Instant::from_micros(u64::MAX));
    let check_in = retry.poll_transmit().expect("check-in");
    coord.handle_message(Instant::ZERO, 7, check_in);
    for (to, msg) in answers(&mut coord) {
        assert_eq!(to, 7);
        assert!(matches!(msg, ServerMessage::Ack { .. }), "{msg:?}");
        retry.handle_message(Instant::ZERO, msg);
    }
    assert!(matches!(retry.outcome(), Some(ClientOutcome::Completed { .. })), "{:?}", retry.outcome());
    assert!(retry.poll_transmit().is_none(), "nothing is sent twice");
}

/// Issue 10: the adaptive-clipping bits were noised with a floating-point Gaussian; their
/// count now gets exact integer noise like the sum, so the released fraction times the public
/// denominator is an integer. A noise multiplier the exact sampler cannot serve is refused
/// when the coordinator is built, not answered with a silent fallback at release.
#[test]
fn the_clip_bit_count_gets_integer_noise_and_out_of_range_noise_is_refused_up_front() {
    use fedrec_shared::round::AdaptiveClip;
    let shape = ModelShape { n_items: 6, dim: 2, n_segments: 1 };
    let adaptive = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 3.0 };
    let cfg = CoordinatorConfig {
        adaptive_clip: Some(adaptive),
        ..config(params(Objective::Explicit), Selection::Poisson { q: 1.0 }, 1.0)
    };
    let mut coord = Coordinator::new(cfg.clone(), model(shape), seeded_rng(4)).expect("valid config");
    coord.start_round(Instant::ZERO).expect("no round open");
    let ratings = [Rating { item: 1, value: 4.0 }, Rating { item: 3, value: 2.0 }];
    for id in 0..5u64 {
        let mut client = ClientRound::new(&ratings, Instant::from_micros(u64::MAX));
        let check_in = client.poll_transmit().expect("check-in");
        coord.handle_message(Instant::ZERO, id, check_in);
        while let Some((_, msg)) = coord.poll_transmit() {
            client.handle_message(Instant::ZERO, msg);
        }
        if let Some(upload) = client.poll_transmit() {
            coord.handle_message(Instant::ZERO, id, upload);
        }
    }
    let deadline = coord.poll_timeout().expect("a deadline");
    coord.handle_timeout(deadline);
    let deadline = coord.poll_timeout().unwrap_or(deadline);
    coord.handle_timeout(deadline);
    let stats = std::iter::from_fn(|| coord.poll_event())
        .find_map(|ev| match ev {
            CoordinatorEvent::RoundCommitted { stats, .. } => Some(stats),
            _ => None,
        })
        .expect("the noised round commits");
    let fraction = stats.unclipped_fraction.expect("adaptive clipping releases the noised fraction");
    let count = fraction * stats.denominator;
    assert!((count - count.round()).abs() < 1e-9, "the noised count {count} is an integer");

    let too_much = CoordinatorConfig { noise_multiplier: 1e12, ..cfg.clone() };
    let err =
        Coordinator::new(too_much, model(shape), seeded_rng(4)).expect_err("out of the sampler's range");
    assert!(err.to_string().contains("noise_multiplier"), "{err}");
    let bits_too_noisy = CoordinatorConfig {
        adaptive_clip: Some(AdaptiveClip { count_noise_multiplier: 1e12, ..adaptive }),
        ..cfg
    };
    let err = Coordinator::new(bits_too_noisy, model(shape), seeded_rng(4)).expect_err("out of range");
    assert!(err.to_string().contains("count_noise_multiplier"), "{err}");
}
