//! Criterion benchmark of the device's training step (reconstruct the user vector, then the item-side update) for users with 100 and 2,000 interactions over an ML-100K-sized model.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_main};
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::train::{local_update, reconstruct};
use fedrec_shared::update::UpdateVector;
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use rand::Rng;

/// MovieLens-100K's catalogue, the SDK's embedding size and segment count.
const SHAPE: ModelShape = ModelShape { n_items: 1682, dim: 32, n_segments: 8 };

/// The SDK trains on implicit feedback; explicit ratings are benched for comparison.
const OBJECTIVES: [(&str, Objective); 2] =
    [("implicit", Objective::Implicit { alpha: 10.0 }), ("explicit", Objective::Explicit)];

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

fn model() -> RoundModel {
    let mut rng = seeded_rng(1);
    let init = ModelInit { factor_std: 0.1, global_mean: 3.5, centroid_scale: 1e-3 };
    let mut m = GlobalModel::init(SHAPE, init, &mut rng).expect("valid shape");
    m.item_bias.mapv_inplace(|_| rng.random_range(-0.5..0.5));
    RoundModel::new(0, m)
}

/// `n` interactions with strengths 1–5 on random items, aggregated per item as the SDK's
/// signals are (strengths add up): 100 interactions give 99 distinct items, 2,000 give
/// 1,169 of the 1,682.
fn ratings(n: usize) -> Vec<Rating> {
    let mut rng = seeded_rng(n as u64);
    let mut strength = vec![0.0f32; SHAPE.n_items];
    for _ in 0..n {
        strength[rng.random_range(0..SHAPE.n_items)] += f32::from(rng.random_range(1u8..=5));
    }
    (0u32..)
        .zip(strength)
        .filter(|&(_, value)| value > 0.0)
        .map(|(item, value)| Rating { item, value })
        .collect()
}

fn step(model: &RoundModel, ratings: &[Rating], params: &TrainParams) -> UpdateVector {
    let user = reconstruct(model, ratings, params).expect("ridge makes the system definite");
    local_update(model, ratings, &user, params)
}

fn train_step(c: &mut Criterion) {
    let model = model();
    // Devices derive the Gramian once per model version, not once per step.
    model.gramian();
    let mut group = c.benchmark_group("train_step");
    for (name, objective) in OBJECTIVES {
        let params = params(objective);
        for n in [100, 2000] {
            let r = ratings(n);
            println!("{n} interactions: {} distinct items", r.len());
            group.bench_with_input(BenchmarkId::new(name, n), &r, |b, r| {
                b.iter(|| step(black_box(&model), black_box(r), &params))
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .without_plots()
}

/// The group lives in a private module: the macro defines a `pub fn`, which needs no docs there.
mod group {
    use super::{config, train_step};

    criterion::criterion_group! {
        name = benches;
        config = config();
        targets = train_step
    }
}
criterion_main!(group::benches);
