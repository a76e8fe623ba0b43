//! Helpers shared by the integration tests of fedrec-shared: generated device data.

use fedrec_shared::Rating;
use fedrec_shared::danger::seeded_rng;
use rand::seq::index::sample;
use rand_distr::{Distribution, Normal};

/// Ratings from a low-rank model: `3.5 + b_u + b_i + u·v + noise`, clipped to `[1, 5]`,
/// `per_user` distinct random items per user.
pub fn low_rank_ratings(
    n_users: usize,
    n_items: usize,
    rank: usize,
    per_user: usize,
    noise: f32,
    seed: u64,
) -> Vec<Vec<Rating>> {
    let mut rng = seeded_rng(seed);
    // Factors with std (1/rank)^¼, so that u·v has unit variance.
    let f = Normal::new(0.0f32, (1.0 / rank as f32).powf(0.25)).expect("valid std");
    let user_f: Vec<Vec<f32>> =
        (0..n_users).map(|_| (0..rank).map(|_| f.sample(&mut rng)).collect()).collect();
    let item_f: Vec<Vec<f32>> =
        (0..n_items).map(|_| (0..rank).map(|_| f.sample(&mut rng)).collect()).collect();
    let bu = Normal::new(0.0f32, 0.3).expect("valid std");
    let bi = Normal::new(0.0f32, 0.4).expect("valid std");
    let e = Normal::new(0.0f32, noise).expect("valid std");
    let user_b: Vec<f32> = (0..n_users).map(|_| bu.sample(&mut rng)).collect();
    let item_b: Vec<f32> = (0..n_items).map(|_| bi.sample(&mut rng)).collect();
    (0..n_users)
        .map(|u| {
            sample(&mut rng, n_items, per_user)
                .into_iter()
                .map(|i| {
                    let dot: f32 = user_f[u].iter().zip(&item_f[i]).map(|(a, b)| a * b).sum();
                    let value = (3.5 + user_b[u] + item_b[i] + dot + e.sample(&mut rng)).clamp(1.0, 5.0);
                    Rating { item: i as u32, value }
                })
                .collect()
        })
        .collect()
}
