//! Releasing a sum of clipped updates: the noise added is Gaussian with standard deviation σ·C around the exact sum, and σ = 0 releases the exact sum.

use fedrec_shared::aggregate::Aggregator;
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::update::{ClippedUpdate, UpdateVector};
use fedrec_shared::{ModelShape, UpdateLayout};
use rand::Rng;

const CLIP: f32 = 0.8;

fn layout() -> UpdateLayout {
    ModelShape { n_items: 12_000, dim: 8, n_segments: 4 }.layout()
}

/// A mix of dense (implicit-like) and sparse (explicit-like) updates, some larger than the
/// clip norm and some smaller, clipped.
fn clipped_updates(layout: UpdateLayout, seed: u64) -> Vec<ClippedUpdate> {
    let mut rng = seeded_rng(seed);
    let shape = layout.shape();
    (0..8)
        .map(|k| {
            let scale: f32 = if k % 3 == 0 { 1e-4 } else { 0.05 };
            let mut v = if k % 2 == 0 {
                UpdateVector::zeros_dense(layout)
            } else {
                let mut rows: Vec<u32> = (0..50).map(|_| rng.random_range(0..shape.n_items as u32)).collect();
                rows.sort_unstable();
                rows.dedup();
                UpdateVector::zeros_rows(layout, rows).expect("sorted, unique, in range")
            };
            let (f, b, t) = v.parts_mut();
            for x in f.iter_mut().chain(b.iter_mut()).chain(t.iter_mut()) {
                *x = scale * rng.random_range(-1.0f32..1.0);
            }
            ClippedUpdate::clip(v, CLIP).expect("finite")
        })
        .collect()
}

fn exact_sum(updates: &[ClippedUpdate], layout: UpdateLayout) -> Vec<f64> {
    let mut sum = vec![0.0f64; layout.len()];
    for u in updates {
        for (s, x) in sum.iter_mut().zip(u.vector().to_dense()) {
            *s += f64::from(x);
        }
    }
    sum
}

#[test]
fn noise_around_a_known_sum_has_the_calibrated_scale() {
    let layout = layout();
    let updates = clipped_updates(layout, 1);
    assert!(updates.iter().any(|u| u.was_clipped()) && updates.iter().any(|u| !u.was_clipped()));
    let exact = exact_sum(&updates, layout);
    let sigma = 1.1f32;
    let mut agg = Aggregator::new(layout, CLIP);
    for u in &updates {
        agg.add(u).expect("same layout and bound");
    }
    let released = agg.release(sigma, &mut seeded_rng(2));
    assert_eq!(released.n_updates(), updates.len());
    assert_eq!(released.noise_std(), sigma * CLIP);
    assert_eq!(released.as_slice().len(), layout.len());

    let noise: Vec<f64> = released.as_slice().iter().zip(&exact).map(|(&x, e)| f64::from(x) - e).collect();
    let n = noise.len() as f64;
    let want = f64::from(sigma * CLIP);
    let mean = noise.iter().sum::<f64>() / n;
    let var = noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    // Tolerances: six standard errors of each estimate.
    assert!(mean.abs() < 6.0 * want / n.sqrt(), "mean {mean}");
    assert!(
        (var.sqrt() / want - 1.0).abs() < 6.0 * (1.0 / (2.0 * n)).sqrt(),
        "std {} want {want}",
        var.sqrt()
    );
    // Gaussian, not merely the right variance: P(|z| < 1) ≈ 0.6827 and P(|z| < 2) ≈ 0.9545.
    let within = |k: f64| noise.iter().filter(|x| x.abs() < k * want).count() as f64 / n;
    for (k, p) in [(1.0, 0.682_689), (2.0, 0.954_500)] {
        let se = (p * (1.0 - p) / n).sqrt();
        assert!((within(k) - p).abs() < 6.0 * se, "P(|z| < {k}) = {} want {p}", within(k));
    }
    // Every coordinate is noised, rows no update touched and the tail included, and the
    // large parts each have the full scale.
    assert!(noise.iter().all(|&x| x != 0.0));
    for range in [layout.item_factors(), layout.item_bias()] {
        let part = &noise[range.clone()];
        let rms = (part.iter().map(|x| x * x).sum::<f64>() / part.len() as f64).sqrt();
        assert!((rms / want - 1.0).abs() < 0.05, "part {range:?}: rms {rms}");
    }
}

#[test]
fn zero_noise_multiplier_releases_the_exact_sum() {
    let layout = layout();
    let updates = clipped_updates(layout, 3);
    let mut agg = Aggregator::new(layout, CLIP);
    let mut want = vec![0.0f32; layout.len()];
    for u in &updates {
        agg.add(u).expect("same layout and bound");
        u.vector().add_to(&mut want);
    }
    let released = agg.release(0.0, &mut seeded_rng(4));
    assert_eq!(released.noise_std(), 0.0);
    assert_eq!(released.n_updates(), updates.len());
    // Bit for bit what adding the vectors in the same order gives.
    assert_eq!(released.as_slice(), want.as_slice());
    // And the f32 sum is the exact sum up to rounding.
    let exact = exact_sum(&updates, layout);
    for (&x, e) in released.as_slice().iter().zip(&exact) {
        assert!((f64::from(x) - e).abs() <= 1e-6 * (1.0 + e.abs()));
    }
}

#[test]
fn noise_differs_between_seeds_and_repeats_with_the_same_seed() {
    let layout = ModelShape { n_items: 100, dim: 4, n_segments: 2 }.layout();
    let release =
        |seed| Aggregator::new(layout, CLIP).release(1.0, &mut seeded_rng(seed)).as_slice().to_vec();
    assert_eq!(release(5), release(5));
    assert_ne!(release(5), release(6));
}
