//! Releasing a sum of clipped updates: the updates are rounded to a grid, the integer sum gets discrete Gaussian noise of standard deviation σ·Δ (Δ the grid sensitivity), the result is scaled back by the grid step, and σ = 0 releases the exact sum.

use fedrec_shared::aggregate::Aggregator;
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::privacy::discrete::Grid;
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

/// The sum rounded to the grid, in grid units, as the aggregator must compute it.
fn grid_sum(updates: &[ClippedUpdate], grid: &Grid, layout: UpdateLayout) -> Vec<i64> {
    let mut sum = vec![0i64; layout.len()];
    for u in updates {
        for (s, x) in sum.iter_mut().zip(u.vector().to_dense()) {
            *s += grid.to_grid(x);
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
    let grid = agg.grid().expect("valid clip norm");
    // The grid costs at most 1% of the clip norm: γ√d/2 ≤ 0.01·C, Δ₂ = γΔ ≤ 1.01·C.
    let d = layout.len() as f64;
    assert!(grid.step() * d.sqrt() / 2.0 <= 0.01 * f64::from(CLIP) * (1.0 + 1e-12));
    assert!(grid.sensitivity_real() <= 1.0101 * f64::from(CLIP));
    let released = agg.release(sigma, &mut seeded_rng(2));
    assert_eq!(released.n_updates(), updates.len());
    assert_eq!(released.grid(), Some(grid));
    assert_eq!(released.as_slice().len(), layout.len());
    // The released std is σ·Δ₂ = γ·σ·Δ: the multiplier is relative to the real sensitivity.
    let want = f64::from(sigma) * grid.sensitivity_real();
    assert!(
        (f64::from(released.noise_std()) / want - 1.0).abs() < 1e-3,
        "{} vs {want}",
        released.noise_std()
    );

    // Every released value is γ times an integer; the integer minus the grid sum is the noise.
    let rounded = grid_sum(&updates, &grid, layout);
    let noise_units: Vec<i64> = released
        .as_slice()
        .iter()
        .zip(&rounded)
        .map(|(&x, &k)| {
            let j = (f64::from(x) / grid.step()).round();
            assert_eq!((j * grid.step()) as f32, x, "not on the grid");
            j as i64 - k
        })
        .collect();
    // Rounding moved each coordinate of the sum by at most n·γ/2 from the exact sum.
    for (&k, e) in rounded.iter().zip(&exact) {
        assert!(
            (k as f64 * grid.step() - e).abs() <= updates.len() as f64 * grid.step() / 2.0 * (1.0 + 1e-9)
        );
    }

    let noise: Vec<f64> = noise_units.iter().map(|&z| z as f64 * grid.step()).collect();
    let n = noise.len() as f64;
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
    // Every coordinate is noised, rows no update touched and the tail included: each part
    // has the full scale (the tail has 37 coordinates, hence its looser tolerance).
    let tail = layout.global_mean()..layout.len();
    for (range, tol) in [(layout.item_factors(), 0.05), (layout.item_bias(), 0.05), (tail, 0.5)] {
        let part = &noise[range.clone()];
        let rms = (part.iter().map(|x| x * x).sum::<f64>() / part.len() as f64).sqrt();
        assert!((rms / want - 1.0).abs() < tol, "part {range:?}: rms {rms}");
    }
}

/// Several σ and clip norms: the std of the released coordinates of an empty sum is σ·Δ₂
/// (fixed seeds, six standard errors).
#[test]
fn released_std_is_sigma_times_the_real_sensitivity() {
    let layout = ModelShape { n_items: 5_000, dim: 4, n_segments: 2 }.layout();
    for (seed, sigma, clip) in [(10, 0.3f32, 1.0f32), (11, 1.0, 0.05), (12, 4.5, 20.0), (13, 60.0, 1e-3)] {
        let agg = Aggregator::new(layout, clip);
        let want = f64::from(sigma) * agg.grid().expect("valid").sensitivity_real();
        let out = agg.release(sigma, &mut seeded_rng(seed));
        let n = out.as_slice().len() as f64;
        let var = out.as_slice().iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n;
        assert!(
            (var.sqrt() / want - 1.0).abs() < 6.0 * (1.0 / (2.0 * n)).sqrt(),
            "σ {sigma}: std {} want {want}",
            var.sqrt()
        );
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
