//! The segments report: federated centroids against centralized k-means (Lloyd with k-means++ seeding) on the same reconstructed user vectors.

use fedrec_shared::train::reconstruct;
use fedrec_shared::{RoundModel, TrainParams, danger};
use rand::Rng;
use serde::Serialize;

/// Sizes and tightness of one clustering.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Clustering {
    /// Users per segment.
    pub sizes: Vec<usize>,
    /// Mean Euclidean distance of a user vector to its segment's centroid.
    pub mean_distance: f64,
}

/// Federated centroids vs centralized k-means on the same user vectors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentReport {
    /// The centroids the federation trained.
    pub federated: Clustering,
    /// Lloyd's algorithm with k-means++ seeding, run centrally (the reference).
    pub centralized: Clustering,
}

/// Reconstructs every user's vector from their training interactions (as their device
/// would) and compares the federated centroids with centralized k-means.
pub fn report(
    model: &RoundModel,
    params: &TrainParams,
    train: &[Vec<fedrec_shared::Rating>],
    seed: u64,
) -> SegmentReport {
    let d = model.model.item_factors.ncols();
    let users: Vec<Vec<f32>> = train
        .iter()
        .filter(|rs| !rs.is_empty())
        .filter_map(|rs| reconstruct(model, rs, params).ok())
        .map(|u| u.factors)
        .collect();
    let fed = model.model.centroids_slice().to_vec();
    let k = model.model.centroids.nrows();
    let federated = assess(&users, &fed, d);
    let central = kmeans(&users, k, d, 50, seed);
    let centralized = assess(&users, &central, d);
    SegmentReport { federated, centralized }
}

fn nearest(u: &[f32], centroids: &[f32], d: usize) -> (usize, f32) {
    let mut best = (0, f32::INFINITY);
    for (j, c) in centroids.chunks_exact(d).enumerate() {
        let dist: f32 = c.iter().zip(u).map(|(a, b)| (a - b) * (a - b)).sum();
        if dist < best.1 {
            best = (j, dist);
        }
    }
    best
}

fn assess(users: &[Vec<f32>], centroids: &[f32], d: usize) -> Clustering {
    let k = centroids.len() / d.max(1);
    let mut sizes = vec![0usize; k];
    let mut total = 0.0f64;
    for u in users {
        let (j, dist) = nearest(u, centroids, d);
        sizes[j] += 1;
        total += f64::from(dist.sqrt());
    }
    Clustering { sizes, mean_distance: if users.is_empty() { 0.0 } else { total / users.len() as f64 } }
}

/// Lloyd's algorithm with k-means++ seeding; returns the centroids, row-major `k × d`.
pub fn kmeans(users: &[Vec<f32>], k: usize, d: usize, iterations: usize, seed: u64) -> Vec<f32> {
    let mut rng = danger::seeded_rng(seed);
    let mut centroids = Vec::with_capacity(k * d);
    if users.is_empty() {
        return vec![0.0; k * d];
    }
    centroids.extend_from_slice(&users[rng.random_range(0..users.len())]);
    let mut dist: Vec<f32> = users.iter().map(|u| nearest(u, &centroids, d).1).collect();
    while centroids.len() < k * d {
        let total: f64 = dist.iter().map(|&x| f64::from(x)).sum();
        let pick = if total > 0.0 {
            let mut t = rng.random::<f64>() * total;
            let mut idx = users.len() - 1;
            for (i, &x) in dist.iter().enumerate() {
                t -= f64::from(x);
                if t <= 0.0 {
                    idx = i;
                    break;
                }
            }
            idx
        } else {
            rng.random_range(0..users.len())
        };
        centroids.extend_from_slice(&users[pick]);
        let new = &centroids[centroids.len() - d..];
        for (dv, u) in dist.iter_mut().zip(users) {
            let nd: f32 = new.iter().zip(u).map(|(a, b)| (a - b) * (a - b)).sum();
            *dv = dv.min(nd);
        }
    }
    for _ in 0..iterations {
        let mut sums = vec![0.0f64; k * d];
        let mut counts = vec![0usize; k];
        for u in users {
            let (j, _) = nearest(u, &centroids, d);
            counts[j] += 1;
            for (s, &x) in sums[j * d..(j + 1) * d].iter_mut().zip(u) {
                *s += f64::from(x);
            }
        }
        let mut moved = false;
        for j in 0..k {
            if counts[j] == 0 {
                continue; // an empty cluster keeps its centroid
            }
            for t in 0..d {
                let c = (sums[j * d + t] / counts[j] as f64) as f32;
                moved |= c != centroids[j * d + t];
                centroids[j * d + t] = c;
            }
        }
        if !moved {
            break;
        }
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_separates_two_obvious_clusters() {
        let mut users = Vec::new();
        for i in 0..20 {
            let e = i as f32 * 0.01;
            users.push(vec![10.0 + e, 0.0]);
            users.push(vec![-10.0 - e, 0.0]);
        }
        let c = kmeans(&users, 2, 2, 20, 3);
        let a = assess(&users, &c, 2);
        assert_eq!(a.sizes.iter().copied().max(), Some(20));
        assert!(a.mean_distance < 0.2, "{}", a.mean_distance);
    }
}
