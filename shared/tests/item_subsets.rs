//! Per-round item subsets and compact downloads (issue 13): the sampler, the real round machines over a subset, the 8-bit encoding and their wire form.

use std::sync::Arc;
use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::harness::{Federation, HarnessConfig, RoundReport};
use fedrec_shared::model::compact::{DownloadEncoding, Int8Rows};
use fedrec_shared::model::subset::ItemSubset;
use fedrec_shared::round::secure::SecurePolicy;
use fedrec_shared::round::{
    ClientMessage, ClientRound, Coordinator, CoordinatorConfig, CoordinatorEvent, DistributedNoise, Instant,
    SecureAggregation, Selection, ServerMessage,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::update::ClippedUpdate;
use fedrec_shared::wire::{self, Inbound, Limits, Response};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use rand::Rng;
use rand_chacha::ChaCha12Rng;

const SHAPE: ModelShape = ModelShape { n_items: 200, dim: 4, n_segments: 2 };
const K: usize = 30;

const IMPLICIT: TrainParams = TrainParams {
    objective: Objective::Implicit { alpha: 2.0 },
    l2_user: 0.5,
    l2_user_bias: 0.0,
    l2_item: 0.01,
    l2_item_bias: 0.0,
    user_support_exponent: 0.0,
};

const PERMISSIVE: SecurePolicy = SecurePolicy { min_cohort: 1, corrupt: 0.0, log2_security: -40.0 };

fn init_model(seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.3, global_mean: 0.0, centroid_scale: 1e-3 };
    GlobalModel::init(SHAPE, init, &mut seeded_rng(seed)).expect("valid shape")
}

fn config(
    selection: Selection,
    secure: Option<SecureAggregation>,
    noise_multiplier: f32,
) -> CoordinatorConfig {
    CoordinatorConfig {
        train: IMPLICIT,
        optimizer: ServerOptimizer::Sgd { lr: 1.0, momentum: 0.0 },
        selection,
        min_reports: 3,
        population: Some(40),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 10.0,
        noise_multiplier,
        adaptive_clip: None,
        privacy: None,
        secure,
        centroids: CentroidPolicy::with_min_count(0.5),
    }
}

/// 40 devices, each with 12 distinct items spread over the catalogue.
fn devices() -> Vec<Vec<Rating>> {
    let mut rng = seeded_rng(5);
    (0..40)
        .map(|_| {
            let mut items: Vec<u32> = Vec::new();
            while items.len() < 12 {
                let i = rng.random_range(0..SHAPE.n_items as u32);
                if !items.contains(&i) {
                    items.push(i);
                }
            }
            items.into_iter().map(|item| Rating { item, value: 1.0 + (item % 3) as f32 }).collect()
        })
        .collect()
}

fn selected(coordinator: &mut Coordinator<ChaCha12Rng>, client: u64) -> ServerMessage {
    coordinator.handle_message(Instant::ZERO, client, ClientMessage::CheckIn);
    match coordinator.poll_transmit() {
        Some((c, msg @ ServerMessage::Selected { .. })) if c == client => msg,
        other => panic!("device {client} was not selected: {other:?}"),
    }
}

fn train(msg: ServerMessage, ratings: &[Rating]) -> ClippedUpdate {
    let mut device = ClientRound::new(ratings, Instant::from_micros(u64::MAX));
    device.handle_message(Instant::ZERO, msg);
    assert!(matches!(device.poll_transmit(), Some(ClientMessage::CheckIn)));
    match device.poll_transmit() {
        Some(ClientMessage::Upload { update, .. }) => update,
        other => panic!("no upload: {other:?}, outcome {:?}", device.outcome()),
    }
}

// ---------------------------------------------------------------------------------------------
// The sampler.
// ---------------------------------------------------------------------------------------------

/// Known answer: the subset is a pure function of (n, K, seed), so the coordinator and every
/// device, on any platform and version, draw the same one. The expected values come from an
/// independent implementation (Python, OpenSSL's ChaCha20 through `cryptography`, key = seed,
/// nonce `fedrec/items`, counter 0; little-endian u64 words; the same rejection and Floyd steps).
#[test]
fn subset_sampler_known_answer() {
    let s = ItemSubset::draw(100, 5, [0; 32]).expect("valid");
    assert_eq!(s.items(), &[5, 19, 59, 81, 93]);
    let s = ItemSubset::draw(1_000_000, 4, [7; 32]).expect("valid");
    assert_eq!(s.items(), &[115_368, 364_255, 513_275, 916_546]);
}

#[test]
fn subset_sampler_is_deterministic_distinct_sorted_and_seeded() {
    for (n, k) in [(1, 1), (10, 10), (200, 30), (100_000, 4096)] {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(n as u64 * 31 + k as u64).to_le_bytes());
        let a = ItemSubset::draw(n, k, seed).expect("valid");
        let b = ItemSubset::draw(n, k, seed).expect("valid");
        assert_eq!(a, b, "deterministic from the seed");
        assert_eq!(a.len(), k);
        assert!(a.items().windows(2).all(|w| w[0] < w[1]), "ascending and distinct");
        assert!(a.items().iter().all(|&i| (i as usize) < n));
        for (pos, &item) in a.items().iter().enumerate() {
            assert_eq!(a.position(item), Some(pos));
        }
        if k < n {
            seed[31] ^= 1;
            assert_ne!(ItemSubset::draw(n, k, seed).expect("valid").items(), a.items(), "another seed");
        }
    }
}

/// Every item is in the subset with probability K/n, and every pair of items together with
/// probability K(K−1)/(n(n−1)) (as for a uniform K-subset): inclusion counts over 6,000 seeds
/// against their binomial means, within 5 standard deviations.
#[test]
fn subset_sampler_is_uniform() {
    let (n, k, draws) = (12usize, 4usize, 6000usize);
    let mut single = vec![0usize; n];
    let mut pair = vec![vec![0usize; n]; n];
    for t in 0..draws {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(t as u64).to_le_bytes());
        let s = ItemSubset::draw(n, k, seed).expect("valid");
        for &a in s.items() {
            single[a as usize] += 1;
            for &b in s.items() {
                pair[a as usize][b as usize] += 1;
            }
        }
    }
    let check = |count: usize, p: f64, what: &str| {
        let mean = draws as f64 * p;
        let sd = (draws as f64 * p * (1.0 - p)).sqrt();
        assert!((count as f64 - mean).abs() < 5.0 * sd, "{what}: {count} vs {mean:.1} ± {sd:.1}");
    };
    for (i, &c) in single.iter().enumerate() {
        check(c, k as f64 / n as f64, &format!("item {i}"));
    }
    let p_pair = (k * (k - 1)) as f64 / (n * (n - 1)) as f64;
    for (a, row) in pair.iter().enumerate() {
        for (b, &count) in row.iter().enumerate().skip(a + 1) {
            check(count, p_pair, &format!("pair {a},{b}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The round machines over a subset.
// ---------------------------------------------------------------------------------------------

/// What a device sends in a subset round has the subset's layout whatever it touched, and its
/// contents depend on its interactions with the round's items only: two devices that agree on
/// S_t and differ everywhere else upload the very same vector; one with nothing in S_t still
/// uploads a full-length vector.
#[test]
fn upload_depends_only_on_the_round_subset() {
    let mut coordinator =
        Coordinator::new(config(Selection::FirstCome { cohort: 4 }, None, 0.0), init_model(1), seeded_rng(2))
            .expect("valid config");
    coordinator.set_items_per_round(K).expect("K below the catalogue");
    coordinator.start_round(Instant::ZERO).expect("round opens");
    let layout = coordinator.upload_layout();
    assert_eq!(layout, ModelShape { n_items: K, ..SHAPE }.layout());
    let msg = selected(&mut coordinator, 1);
    let ServerMessage::Selected { model, .. } = &msg else { unreachable!() };
    let subset = model.subset().expect("a subset round").clone();
    assert_eq!(subset.len(), K);
    assert_eq!(model.model.shape().n_items, K);
    let inside: Vec<u32> = subset.items().iter().step_by(3).copied().collect();
    let outside: Vec<u32> = (0..SHAPE.n_items as u32).filter(|i| subset.position(*i).is_none()).collect();
    let with = |extra: &[u32]| -> Vec<Rating> {
        inside.iter().chain(extra).map(|&item| Rating { item, value: 2.0 }).collect()
    };
    let a = train(msg.clone(), &with(&outside[..5]));
    let b = train(msg.clone(), &with(&outside[40..80]));
    let none: Vec<Rating> = outside[..20].iter().map(|&item| Rating { item, value: 1.0 }).collect();
    let c = train(msg.clone(), &none);
    for u in [&a, &b, &c] {
        assert_eq!(*u.vector().layout(), layout, "the subset's layout");
        assert_eq!(u.vector().to_dense().len(), layout.len());
    }
    assert_eq!(a.vector().to_dense(), b.vector().to_dense(), "items outside S_t change nothing");
    // What goes on the wire has one length for all three.
    let len = |u: &ClippedUpdate| {
        let up = wire::Upload::new(0, u, None, [0; wire::NONCE_LEN]);
        wire::encode(&wire::Request::Upload(up)).expect("encodes").len()
    };
    assert_eq!(len(&a), len(&c));
    assert_eq!(len(&b), len(&c));
    // The coordinator takes all three.
    for (client, u) in [(2u64, a), (3, b), (4, c)] {
        let msg = selected(&mut coordinator, client);
        drop(msg);
        coordinator.handle_message(
            Instant::ZERO,
            client,
            ClientMessage::Upload { round: 0, update: u, within_bound: None },
        );
        assert!(matches!(coordinator.poll_transmit(), Some((_, ServerMessage::Ack { .. }))));
    }
}

/// A committed subset round moves the subset's rows and leaves every other item's factors and
/// bias exactly as they were.
#[test]
fn a_subset_round_moves_only_its_items() {
    let devices = devices();
    let cfg = config(Selection::FirstCome { cohort: 20 }, None, 0.0);
    let mut coordinator = Coordinator::new(cfg, init_model(3), seeded_rng(4)).expect("valid config");
    coordinator.set_items_per_round(K).expect("valid");
    let before = coordinator.model().model.clone();
    let harness = HarnessConfig { dropout: 0.0, n_threads: 2, latency: Duration::from_millis(20) };
    let mut fed = Federation::new(coordinator, &devices, harness, seeded_rng(6));
    let report = fed.run_round();
    assert!(matches!(report.event, Some(CoordinatorEvent::RoundCommitted { .. })), "{report:?}");
    // The round's subset, redrawn the way the devices did: from the seed in its task. The
    // harness does not expose the task, so compare row by row instead.
    let after = &fed.coordinator.model().model;
    let moved: Vec<usize> = (0..SHAPE.n_items)
        .filter(|&i| before.item_row(i) != after.item_row(i) || before.item_bias[i] != after.item_bias[i])
        .collect();
    assert!(!moved.is_empty() && moved.len() <= K, "{} rows moved, at most K = {K}", moved.len());
}

fn committed(report: &RoundReport) -> bool {
    matches!(report.event, Some(CoordinatorEvent::RoundCommitted { .. }))
}

/// Secure aggregation and central noise work over the subset vector: the masked inputs have
/// the subset's length and the round commits; with distributed noise too.
#[test]
fn secure_and_distributed_rounds_run_over_the_subset() {
    let devices = devices();
    let secure = SecureAggregation {
        dropout: 0.1,
        corrupt: 0.0,
        phase_window: Duration::from_secs(30),
        distributed: None,
    };
    for (secure, z) in [
        (secure, 0.5f32),
        (SecureAggregation { distributed: Some(DistributedNoise { bits: 20 }), ..secure }, 0.5),
    ] {
        let cfg = config(Selection::Poisson { q: 0.5 }, Some(secure), z);
        let mut coordinator = Coordinator::new(cfg, init_model(7), seeded_rng(8)).expect("valid config");
        coordinator.set_items_per_round(K).expect("valid");
        let before = coordinator.model().model.clone();
        let harness = HarnessConfig { dropout: 0.0, n_threads: 2, latency: Duration::from_millis(20) };
        let mut fed =
            Federation::new(coordinator, &devices, harness, seeded_rng(9)).with_secure_policy(PERMISSIVE);
        let report = fed.run_round();
        assert!(committed(&report), "{:?}: {report:?}", secure.distributed);
        let after = &fed.coordinator.model().model;
        let moved = (0..SHAPE.n_items).filter(|&i| before.item_row(i) != after.item_row(i)).count();
        assert!(moved > 0 && moved <= K, "{moved} rows moved");
    }
}

#[test]
fn items_per_round_is_checked() {
    let mut c =
        Coordinator::new(config(Selection::FirstCome { cohort: 4 }, None, 0.0), init_model(1), seeded_rng(2))
            .expect("valid config");
    c.set_items_per_round(SHAPE.n_items + 5).expect("at least the catalogue: every item");
    assert_eq!(c.items_per_round(), 0);
    assert_eq!(c.upload_layout(), SHAPE.layout());
    c.start_round(Instant::ZERO).expect("opens");
    assert!(c.set_items_per_round(K).is_err(), "not while a round is open");
}

// ---------------------------------------------------------------------------------------------
// The 8-bit download.
// ---------------------------------------------------------------------------------------------

/// Each decoded value is within one step of its row's scale of the original, and the mean of
/// many independent encodings converges to the original (stochastic rounding is unbiased):
/// 4,000 encodings, each coordinate's mean within 5 standard errors (the rounding error of one
/// encoding is at most one step, so its standard deviation is at most half a step).
#[test]
fn int8_rows_round_trip_and_are_unbiased() {
    let dim = 8;
    let values: Vec<f32> = vec![
        0.5, -0.25, 0.1, 0.0, 0.333, -0.49, 0.01, 0.2, // row 0, max 0.5
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, // a zero row
        1e-3, -2e-3, 7e-4, 0.0, 1e-4, -1e-4, 3e-4, 2e-3, // a tiny row
    ];
    let mut rng = seeded_rng(11);
    let once = Int8Rows::encode(&values, dim, &mut rng);
    assert_eq!(once.codes().len(), values.len());
    assert_eq!(once.scales().len(), 3);
    let decoded = once.decode();
    for (row, (d, v)) in decoded.chunks(dim).zip(values.chunks(dim)).enumerate() {
        let step = once.scales()[row];
        for (a, b) in d.iter().zip(v) {
            assert!((a - b).abs() <= step * 1.0001, "row {row}: {a} vs {b} (step {step})");
        }
    }
    assert!(decoded[dim..2 * dim].iter().all(|&x| x == 0.0), "a zero row stays zero");
    let n = 4000;
    let mut mean = vec![0.0f64; values.len()];
    for _ in 0..n {
        for (m, x) in mean.iter_mut().zip(Int8Rows::encode(&values, dim, &mut rng).decode()) {
            *m += f64::from(x) / n as f64;
        }
    }
    for (i, (m, &v)) in mean.iter().zip(&values).enumerate() {
        let step = f64::from(once.scales()[i / dim]);
        let se = 0.5 * step / (n as f64).sqrt();
        assert!((m - f64::from(v)).abs() <= 5.0 * se + 1e-9, "coordinate {i}: mean {m} vs {v}");
    }
    assert!(Int8Rows::from_parts(dim, vec![0; 7], vec![1.0]).is_none(), "codes must fill the rows");
    assert!(Int8Rows::from_parts(dim, vec![0; 8], vec![f32::NAN]).is_none(), "finite scales");
}

/// With an 8-bit download every device of the round trains on exactly what it decoded, and
/// the wire carries 1 byte per factor plus a scale per row.
#[test]
fn int8_subset_task_survives_the_wire() {
    let mut coordinator =
        Coordinator::new(config(Selection::FirstCome { cohort: 4 }, None, 0.0), init_model(1), seeded_rng(2))
            .expect("valid config");
    coordinator.set_items_per_round(K).expect("valid");
    coordinator.set_download_encoding(DownloadEncoding::Int8);
    coordinator.start_round(Instant::ZERO).expect("opens");
    let msg = selected(&mut coordinator, 1);
    let ServerMessage::Selected { model: served, .. } = &msg else { unreachable!() };
    assert_eq!(served.encoding(), DownloadEncoding::Int8);
    let response = Response::from_server_message(&msg, Some(0), Duration::ZERO);
    assert!(matches!(response, Response::CompactTask(_)), "a subset task is always compact, cache or not");
    let bytes = wire::encode(&response).expect("encodes");
    // The same round (same seeds, so the same subset) downloaded in f32: 3 bytes less per
    // factor, 4 more per row for its scale (up to the length prefixes' varints).
    let mut f32_round =
        Coordinator::new(config(Selection::FirstCome { cohort: 4 }, None, 0.0), init_model(1), seeded_rng(2))
            .expect("valid config");
    f32_round.set_items_per_round(K).expect("valid");
    f32_round.start_round(Instant::ZERO).expect("opens");
    let f32_msg = selected(&mut f32_round, 1);
    let f32_bytes =
        wire::encode(&Response::from_server_message(&f32_msg, None, Duration::ZERO)).expect("encodes");
    let saved = f32_bytes.len() as i64 - bytes.len() as i64;
    let want = (K * SHAPE.dim * 3) as i64 - (K * 4) as i64;
    assert!((saved - want).abs() <= 4, "saved {saved} bytes, want {want}");
    let decoded =
        wire::decode_response(&bytes[wire::LEN_PREFIX..], &Limits::for_shape(&SHAPE)).expect("decodes");
    let Inbound::Message(ServerMessage::Selected { model, .. }) = decoded.into_inbound(None).expect("valid")
    else {
        panic!("not a task");
    };
    assert_eq!(model.model, served.model, "the device trains on exactly the served values");
    assert_eq!(model.subset(), served.subset(), "the device redraws the same subset from the seed");
    let rebuilt: Arc<RoundModel> = model;
    assert_eq!(rebuilt.n_catalogue_items(), SHAPE.n_items);
}
