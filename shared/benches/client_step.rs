//! Criterion benchmark of the device step on an ML-100K-sized model (reconstruct, gradient, clip) and of adding one update to the coordinator's sum.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_main};
use fedrec_shared::aggregate::Aggregator;
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::linalg::gramian;
use fedrec_shared::train::{local_update, reconstruct};
use fedrec_shared::update::ClippedUpdate;
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use rand::Rng;
use rand::seq::index::sample;

/// MovieLens-100K's catalogue, a typical embedding size and segment count.
const SHAPE: ModelShape = ModelShape { n_items: 1682, dim: 32, n_segments: 8 };
const CLIP: f32 = 1.0;

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

const OBJECTIVES: [(&str, Objective); 2] =
    [("explicit", Objective::Explicit), ("implicit", Objective::Implicit { alpha: 10.0 })];

fn model() -> RoundModel {
    let mut rng = seeded_rng(1);
    let init = ModelInit { factor_std: 0.1, global_mean: 3.5, centroid_scale: 1e-3 };
    let mut m = GlobalModel::init(SHAPE, init, &mut rng).expect("valid shape");
    m.item_bias.mapv_inplace(|_| rng.random_range(-0.5..0.5));
    RoundModel::new(0, m)
}

/// `n` distinct items rated 1–5 stars.
fn ratings(n: usize, seed: u64) -> Vec<Rating> {
    let mut rng = seeded_rng(seed);
    sample(&mut rng, SHAPE.n_items, n)
        .into_iter()
        .map(|i| Rating { item: i as u32, value: f32::from(rng.random_range(1u8..=5)) })
        .collect()
}

fn step(model: &RoundModel, ratings: &[Rating], params: &TrainParams) -> ClippedUpdate {
    let user = reconstruct(model, ratings, params).expect("ridge makes the system definite");
    ClippedUpdate::clip(local_update(model, ratings, &user, params), CLIP).expect("finite")
}

fn device_step(c: &mut Criterion) {
    let model = model();
    // Devices derive the Gramian once per model version, not once per step.
    model.gramian();
    let mut group = c.benchmark_group("device_step");
    for (name, objective) in OBJECTIVES {
        let params = params(objective);
        for n in [20, 100, 500] {
            let r = ratings(n, n as u64);
            group.bench_with_input(BenchmarkId::new(name, n), &r, |b, r| {
                b.iter(|| step(black_box(&model), black_box(r), &params))
            });
        }
    }
    group.finish();
}

fn per_version(c: &mut Criterion) {
    let model = model();
    c.bench_function("gramian_once_per_version", |b| {
        b.iter(|| gramian(black_box(model.model.factors_slice()), SHAPE.dim))
    });
}

fn aggregate_add(c: &mut Criterion) {
    let model = model();
    let mut group = c.benchmark_group("aggregator_add");
    for (name, objective) in OBJECTIVES {
        let update = step(&model, &ratings(100, 7), &params(objective));
        let mut agg = Aggregator::new(SHAPE.layout(), CLIP);
        group
            .bench_function(name, |b| b.iter(|| agg.add(black_box(&update)).expect("same layout and bound")));
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .without_plots()
}

/// The group lives in a private module: the macro defines a `pub fn`, which needs no docs there.
mod group {
    use super::{aggregate_add, config, device_step, per_version};

    criterion::criterion_group! {
        name = benches;
        config = config();
        targets = device_step, per_version, aggregate_add
    }
}
criterion_main!(group::benches);
