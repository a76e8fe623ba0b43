//! Criterion benchmark of on-device recommendation: top-20 over an ML-100K-sized and a 100,000-item catalogue (32 dimensions), collaborative and hybrid.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_main};
use fedrec_client::content::ContentIndex;
use fedrec_client::recommend::{RecommendOptions, Scratch, recommend, recommend_with};
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::train::reconstruct;
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use rand::Rng;
use rand::seq::index::sample;

const DIM: usize = 32;
const K: usize = 20;
/// Interactions of the benchmarked user.
const N_CONSUMED: usize = 100;
/// Distinct tags in the catalogue, and at most this many per item.
const N_TAGS: usize = 200;
const TAGS_PER_ITEM: usize = 4;

fn model(n_items: usize) -> RoundModel {
    let mut rng = seeded_rng(1);
    let shape = ModelShape { n_items, dim: DIM, n_segments: 8 };
    let init = ModelInit { factor_std: 0.1, global_mean: 0.0, centroid_scale: 1e-3 };
    let m = GlobalModel::init(shape, init, &mut rng).expect("valid shape");
    RoundModel::new(0, m)
}

fn ratings(n_items: usize) -> Vec<Rating> {
    let mut rng = seeded_rng(2);
    sample(&mut rng, n_items, N_CONSUMED)
        .into_iter()
        .map(|i| Rating { item: i as u32, value: f32::from(rng.random_range(1u8..=5)) })
        .collect()
}

fn content(n_items: usize) -> ContentIndex {
    let mut rng = seeded_rng(3);
    let names: Vec<String> = (0..N_TAGS).map(|t| format!("tag{t}")).collect();
    let mut c = ContentIndex::new(n_items);
    for item in 0..n_items as u32 {
        let tags: Vec<&str> = (0..rng.random_range(1..=TAGS_PER_ITEM))
            .map(|_| names[rng.random_range(0..N_TAGS)].as_str())
            .collect();
        c.set_tags(item, &tags).expect("valid tags");
    }
    c
}

fn recommend_top20(c: &mut Criterion) {
    let params = TrainParams {
        objective: Objective::Implicit { alpha: 10.0 },
        l2_user: 0.1,
        l2_user_bias: 0.1,
        l2_item: 0.01,
        l2_item_bias: 0.01,
        user_support_exponent: 0.0,
    };
    let mut group = c.benchmark_group("recommend_top20");
    for n_items in [1682, 100_000] {
        let model = model(n_items);
        let consumed = ratings(n_items);
        let user = reconstruct(&model, &consumed, &params).expect("ridge makes the system definite");
        let index = content(n_items);
        // Weights are rebuilt once after tags change, not per request.
        index.vectors();
        let cf = RecommendOptions { content_blend: 0.0, ..RecommendOptions::default() };
        let hybrid = RecommendOptions { content_blend: 0.25, ..RecommendOptions::default() };
        group.bench_function(BenchmarkId::new("collaborative", n_items), |b| {
            b.iter(|| recommend(black_box(&model), Some(&user), &consumed, None, K, &cf).expect("valid"))
        });
        group.bench_function(BenchmarkId::new("hybrid", n_items), |b| {
            b.iter(|| {
                recommend(black_box(&model), Some(&user), &consumed, Some(&index), K, &hybrid).expect("valid")
            })
        });
        let content_only = RecommendOptions { content_blend: 1.0, ..RecommendOptions::default() };
        group.bench_function(BenchmarkId::new("content_only", n_items), |b| {
            b.iter(|| {
                recommend(black_box(&model), Some(&user), &consumed, Some(&index), K, &content_only)
                    .expect("valid")
            })
        });
        let mut scratch = Scratch::default();
        group.bench_function(BenchmarkId::new("hybrid_reused_buffers", n_items), |b| {
            b.iter(|| {
                recommend_with(
                    &mut scratch,
                    black_box(&model),
                    Some(&user),
                    &consumed,
                    Some(&index),
                    K,
                    &hybrid,
                )
                .expect("valid")
            })
        });
        group.bench_function(BenchmarkId::new("popularity", n_items), |b| {
            b.iter(|| recommend(black_box(&model), None, &[], None, K, &cf).expect("valid"))
        });
    }
    group.finish();
}

/// The TF-IDF weights are rebuilt at the first request after tags change (here: one item's).
fn content_rebuild(c: &mut Criterion) {
    let index = content(100_000);
    c.bench_function("content_vectors_rebuild/100000", |b| {
        b.iter_batched(
            || index.clone(),
            |mut fresh| {
                fresh.set_tags(0, &["tag1", "tag2"]).expect("valid tags");
                fresh.vectors().row(0).len()
            },
            BatchSize::LargeInput,
        )
    });
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
    use super::{config, content_rebuild, recommend_top20};

    criterion::criterion_group! {
        name = benches;
        config = config();
        targets = recommend_top20, content_rebuild
    }
}
criterion_main!(group::benches);
