//! The exact discrete Gaussian and its sub-samplers against their exact distributions (fixed
//! seeds, explicit tolerances), the support-gap attack on the old f32 mechanism and on the new
//! one, and a numerical check of what the accountant relies on for the sampled discrete
//! Gaussian.

use fedrec_shared::aggregate::Aggregator;
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::privacy::discrete::{
    DiscreteGaussian, DiscreteNoiseError, MAX_SIGMA, sample_bernoulli, sample_bernoulli_exp,
    sample_discrete_laplace,
};
use fedrec_shared::privacy::rdp::rdp_sampled_gaussian;
use fedrec_shared::update::{ClippedUpdate, UpdateVector};
use fedrec_shared::{ModelShape, UpdateLayout};
use rand_distr::{Distribution, StandardNormal};

/// Six standard errors of a frequency estimated from `n` draws.
fn six_se(p: f64, n: usize) -> f64 {
    6.0 * (p * (1.0 - p) / n as f64).sqrt()
}

/// Upper critical value of χ² with `df` degrees of freedom at z = 5 (p ≈ 3·10⁻⁷), by the
/// Wilson–Hilferty approximation: a correct sampler fails this with a fixed seed essentially
/// never, a sampler off by a few percent in any well-filled bin always.
fn chi2_critical(df: usize) -> f64 {
    let k = df as f64;
    let h = 2.0 / (9.0 * k);
    k * (1.0 - h + 5.0 * h.sqrt()).powi(3)
}

/// χ² of observed counts against an exact pmf over integers `lo..=hi`, tails folded into the
/// end bins, bins with fewer than 5 expected merged into their neighbour. Returns (χ², df).
fn chi_square(
    counts: &std::collections::BTreeMap<i128, u64>,
    pmf: impl Fn(i128) -> f64,
    n: u64,
) -> (f64, usize) {
    // Expected mass over a wide range; everything beyond it is negligible for the σ used here.
    let (lo, hi) = (-400i128, 400i128);
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (expected, observed)
    let (mut e_acc, mut o_acc) = (0.0, 0.0);
    for k in lo..=hi {
        e_acc += pmf(k) * n as f64;
        o_acc += *counts.get(&k).unwrap_or(&0) as f64;
        if e_acc >= 5.0 {
            bins.push((e_acc, o_acc));
            (e_acc, o_acc) = (0.0, 0.0);
        }
    }
    let outside: u64 = counts.iter().filter(|(k, _)| **k < lo || **k > hi).map(|(_, c)| c).sum();
    o_acc += outside as f64;
    if let Some(last) = bins.last_mut() {
        last.0 += e_acc;
        last.1 += o_acc;
    }
    let chi2 = bins.iter().map(|(e, o)| (o - e) * (o - e) / e).sum();
    (chi2, bins.len() - 1)
}

/// The exact pmf of N_Z(0, σ²) in f64 (normalised over |k| ≤ 40σ + 50).
fn dg_pmf(sigma_sq: f64) -> impl Fn(i128) -> f64 {
    let r = (40.0 * sigma_sq.sqrt() + 50.0) as i128;
    let norm: f64 = (-r..=r).map(|k| (-((k * k) as f64) / (2.0 * sigma_sq)).exp()).sum();
    move |k| (-((k * k) as f64) / (2.0 * sigma_sq)).exp() / norm
}

#[test]
fn bernoulli_has_its_probability() {
    let mut rng = seeded_rng(1);
    let n = 200_000;
    for (num, den) in [(0u128, 1u128), (1, 1), (1, 2), (1, 3), (2, 7), (5, 1000), (u128::MAX / 3, u128::MAX)]
    {
        let hits = (0..n).filter(|_| sample_bernoulli(&mut rng, num, den).expect("valid")).count();
        let p = num as f64 / den as f64;
        let freq = hits as f64 / n as f64;
        assert!((freq - p).abs() <= six_se(p, n), "{num}/{den}: {freq}");
    }
    assert!(matches!(sample_bernoulli(&mut rng, 2, 1), Err(DiscreteNoiseError::Rational { .. })));
    assert!(matches!(sample_bernoulli(&mut rng, 0, 0), Err(DiscreteNoiseError::Rational { .. })));
}

#[test]
fn bernoulli_exp_has_probability_exp_minus_gamma() {
    let mut rng = seeded_rng(2);
    let n = 200_000;
    for (num, den) in
        [(0u128, 1u128), (1, 3), (1, 1), (5, 2), (7, 1), (1, 1_000_000_000), (10_000_001, 10_000_000)]
    {
        let hits = (0..n).filter(|_| sample_bernoulli_exp(&mut rng, num, den).expect("valid")).count();
        let p = (-(num as f64) / den as f64).exp();
        let freq = hits as f64 / n as f64;
        assert!((freq - p).abs() <= six_se(p, n).max(1e-12), "exp(-{num}/{den}) = {p}: {freq}");
    }
    assert!(sample_bernoulli_exp(&mut rng, 1, 0).is_err());
}

#[test]
fn discrete_laplace_matches_its_pmf() {
    let mut rng = seeded_rng(3);
    let n = 200_000u64;
    for t in [1u64, 3, 10] {
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            *counts.entry(sample_discrete_laplace(&mut rng, t).expect("t ≥ 1")).or_insert(0u64) += 1;
        }
        let r = (-1.0 / t as f64).exp();
        let pmf = |k: i128| (1.0 - r) / (1.0 + r) * r.powf(k.unsigned_abs() as f64);
        let (chi2, df) = chi_square(&counts, pmf, n);
        assert!(chi2 < chi2_critical(df), "t = {t}: χ² = {chi2} with {df} df");
    }
    assert!(sample_discrete_laplace(&mut rng, 0).is_err());
}

/// The empirical pmf against the exact one for small σ, including σ < 1 where the discrete
/// Gaussian's variance is visibly below σ².
#[test]
fn discrete_gaussian_matches_the_exact_pmf() {
    let mut rng = seeded_rng(4);
    let n = 200_000u64;
    for (num, den) in [(1u64, 4u64), (1, 1), (9, 4), (10, 1), (1_000_001, 10_000)] {
        let dg = DiscreteGaussian::new(num, den).expect("valid");
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            *counts.entry(dg.sample(&mut rng)).or_insert(0u64) += 1;
        }
        let (chi2, df) = chi_square(&counts, dg_pmf(num as f64 / den as f64), n);
        assert!(chi2 < chi2_critical(df), "σ² = {num}/{den}: χ² = {chi2} with {df} df");
    }
}

/// Known answers with a fixed seed: mean 0 and the exact variance (≈ σ² for σ ≥ 1) within six
/// standard errors.
#[test]
fn discrete_gaussian_mean_and_variance_with_a_fixed_seed() {
    let mut rng = seeded_rng(5);
    let n = 100_000;
    for sigma in [0.7, 1.59, 7.3, 1000.0, 8_750.0 * 2.92] {
        let dg = DiscreteGaussian::at_least(sigma).expect("in range");
        let draws: Vec<f64> = (0..n).map(|_| dg.sample(&mut rng) as f64).collect();
        let (num, den) = dg.sigma_sq();
        let s2 = num as f64 / den as f64;
        let pmf = dg_pmf(s2);
        let r = (40.0 * s2.sqrt() + 50.0) as i128;
        let var_exact: f64 = if s2 < 100.0 { (-r..=r).map(|k| (k * k) as f64 * pmf(k)).sum() } else { s2 };
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|x| x * x).sum::<f64>() / n as f64;
        assert!(mean.abs() < 6.0 * var_exact.sqrt() / (n as f64).sqrt(), "σ {sigma}: mean {mean}");
        // Var of x² is 2σ⁴ for a Gaussian; the discrete one is within a hair of it.
        assert!(
            (var / var_exact - 1.0).abs() < 6.0 * (2.0 / n as f64).sqrt(),
            "σ {sigma}: var {var} vs {var_exact}"
        );
    }
}

/// P[X = k] = P[X = −k]: as many positive as negative draws, and the same for |X| = 1.
#[test]
fn discrete_gaussian_is_symmetric() {
    let mut rng = seeded_rng(6);
    let dg = DiscreteGaussian::new(3, 1).expect("valid");
    let n = 200_000;
    let draws: Vec<i128> = (0..n).map(|_| dg.sample(&mut rng)).collect();
    let pos = draws.iter().filter(|&&x| x > 0).count();
    let neg = draws.iter().filter(|&&x| x < 0).count();
    let nonzero = pos + neg;
    assert!((pos as f64 / nonzero as f64 - 0.5).abs() < six_se(0.5, nonzero), "{pos} vs {neg}");
    let plus1 = draws.iter().filter(|&&x| x == 1).count();
    let minus1 = draws.iter().filter(|&&x| x == -1).count();
    let ones = plus1 + minus1;
    assert!((plus1 as f64 / ones as f64 - 0.5).abs() < six_se(0.5, ones), "{plus1} vs {minus1}");
}

/// Extreme parameters neither panic nor hang, and ones beyond the exact range are refused.
#[test]
fn extreme_parameters_do_not_panic() {
    let mut rng = seeded_rng(7);
    // σ² = 2⁻⁶²: essentially always 0; a finer fraction is refused.
    let tiny = DiscreteGaussian::new(1, 1 << 62).expect("valid");
    assert!((0..1000).all(|_| tiny.sample(&mut rng) == 0));
    // The largest σ accepted; draws are of the right magnitude.
    let huge = DiscreteGaussian::at_least(MAX_SIGMA * 0.999).expect("in range");
    for _ in 0..200 {
        assert!(huge.sample(&mut rng).unsigned_abs() < 10 * MAX_SIGMA as u128);
    }
    assert!(DiscreteGaussian::at_least(MAX_SIGMA * 1.001).is_err());
    assert!(DiscreteGaussian::new(u64::MAX, 3).is_err());
    assert_eq!(DiscreteGaussian::new(1, u64::MAX), Err(DiscreteNoiseError::DenominatorTooLarge(u64::MAX)));
    // Bernoulli(exp(−γ)) for huge and degenerate rationals.
    assert_eq!(sample_bernoulli_exp(&mut rng, u128::MAX, 1), Ok(false));
    assert_eq!(sample_bernoulli_exp(&mut rng, 0, u128::MAX), Ok(true));
    for _ in 0..100 {
        sample_bernoulli_exp(&mut rng, u128::MAX, u128::MAX).expect("γ = 1");
        sample_bernoulli_exp(&mut rng, u128::MAX - 1, u128::MAX).expect("γ < 1");
    }
    for _ in 0..100 {
        sample_discrete_laplace(&mut rng, u64::MAX).expect("t ≥ 1");
    }
}

// ---------------------------------------------------------------------------------------
// The support-gap attack (issue 10, item 2).

/// A private copy of the mechanism this crate used before: an f32 standard normal, scaled by
/// the noise std and added in f32.
fn old_float_release(sum: f32, std: f32, rng: &mut impl rand::Rng) -> f32 {
    let z: f32 = StandardNormal.sample(rng);
    sum + std * z
}

/// Whether the old mechanism can output `y` when the true sum is 0: some f32 `z` with
/// `fl(std · z) = y`. Rounded multiplication is monotone in `z`, and a solution is within
/// one ulp of `y / std`, so a few ulps around it decide.
fn old_reachable_from_zero(y: f32, std: f32) -> bool {
    let mut z = (f64::from(y) / f64::from(std)) as f32;
    for _ in 0..4 {
        z = z.next_down();
    }
    (0..9).any(|_| {
        let hit = 0.0f32 + std * z == y;
        z = z.next_up();
        hit
    })
}

/// The attack has power against the old mechanism: at σC = 1.59, about 37% of the f32 values
/// just above 1.59 are impossible when the sum is 0 (1 − 1/1.59 of them are skipped by
/// scaling the finer f32 grid around 1), and with the sum at 0.3 thousands of them occur.
#[test]
fn support_gap_attack_finds_the_sum_through_the_old_float_mechanism() {
    let std = 1.59f32;
    // The window [1.59, 1.59 + 20000 ulps): count the unreachable values exactly.
    let mut y = 1.59f32;
    let mut unreachable = 0;
    let window = 20_000;
    for _ in 0..window {
        unreachable += usize::from(!old_reachable_from_zero(y, std));
        y = y.next_up();
    }
    let share = unreachable as f64 / window as f64;
    assert!((share - (1.0 - 1.0 / 1.59)).abs() < 0.01, "unreachable share {share}");

    // The oracle is right about what the mechanism does at sum 0: nothing it outputs is
    // called unreachable.
    let mut rng = seeded_rng(8);
    for _ in 0..200_000 {
        let y = old_float_release(0.0, std, &mut rng);
        assert!(old_reachable_from_zero(y, std), "{y} came from sum 0");
    }
    // At sum 0.3, outputs in [1.59, 2) that sum 0 cannot produce: each one proves the sum
    // was not 0.
    let mut rng = seeded_rng(9);
    let telling = (0..1_000_000)
        .map(|_| old_float_release(0.3, std, &mut rng))
        .filter(|&y| (1.59..2.0).contains(&y) && !old_reachable_from_zero(y, std))
        .count();
    assert!(telling > 1_000, "only {telling} distinguishing outputs");
}

fn one_coordinate_layout() -> UpdateLayout {
    ModelShape { n_items: 1, dim: 1, n_segments: 1 }.layout()
}

/// One release of a sum that is `value` in coordinate 0 and 0 elsewhere, through the real
/// aggregator; returns coordinate 0 and the grid step.
fn new_release(value: f32, sigma: f32, clip: f32, rng: &mut impl rand::CryptoRng) -> (f32, f64) {
    let layout = one_coordinate_layout();
    let mut dense = vec![0.0f32; layout.len()];
    dense[0] = value;
    let update =
        ClippedUpdate::clip(UpdateVector::from_dense(layout, &dense).expect("length"), clip).expect("finite");
    assert!(!update.was_clipped());
    let mut agg = Aggregator::new(layout, clip);
    agg.add(&update).expect("same layout");
    let out = agg.release(sigma, rng);
    let grid = out.grid().expect("noised on a grid");
    (out.as_slice()[0], grid.step())
}

/// Whether the new mechanism can output `y`: it is the f32 of γ times an integer, and every
/// integer has positive probability under the discrete Gaussian whatever the true sum, so
/// the answer does not depend on the sum at all.
fn new_reachable(y: f32, step: f64) -> bool {
    let j = (f64::from(y) / step).round();
    [j - 1.0, j, j + 1.0].iter().any(|&i| (i * step) as f32 == y)
}

/// The same attack finds nothing against the new mechanism: with sums 0 and 0.3 (on the
/// grid), every output either world produces is reachable in the other, at the noise scale
/// of the attack above.
#[test]
fn support_gap_attack_finds_nothing_in_the_discrete_mechanism() {
    let clip = 1.0f32;
    let sigma = 1.59f32; // noise std ≈ 1.59 · 1.01 · C
    let mut rng = seeded_rng(10);
    let mut step_seen = None;
    let mut outputs = [Vec::new(), Vec::new()];
    for (world, value) in [0.0f32, 0.3].into_iter().enumerate() {
        for _ in 0..50_000 {
            let (y, step) = new_release(value, sigma, clip, &mut rng);
            assert_eq!(*step_seen.get_or_insert(step), step, "both worlds use one grid");
            outputs[world].push(y);
        }
    }
    let step = step_seen.expect("released");
    // Every output of each world is reachable in the other (the reachable set is the same).
    for ys in &outputs {
        let gaps = ys.iter().filter(|&&y| !new_reachable(y, step)).count();
        assert_eq!(gaps, 0);
    }
    // Over the window of the float attack, the reachable values are exactly the grid points,
    // for both sums; and the outputs really spread over that window.
    let in_window = |ys: &Vec<f32>| ys.iter().filter(|y| (1.59..2.0).contains(*y)).count();
    assert!(in_window(&outputs[0]) > 1_000 && in_window(&outputs[1]) > 1_000);
    // The two worlds differ where they should: the mean moved by ≈ 0.3.
    let mean = |ys: &Vec<f32>| ys.iter().map(|&y| f64::from(y)).sum::<f64>() / ys.len() as f64;
    let se = 1.6 * (2.0f64 / 50_000.0).sqrt();
    assert!((mean(&outputs[1]) - mean(&outputs[0]) - 0.3).abs() < 6.0 * se);
}

// ---------------------------------------------------------------------------------------
// What the accountant relies on.

/// `log Σ exp(x_i)` without overflow.
fn log_sum_exp(xs: impl Iterator<Item = f64>) -> f64 {
    let xs: Vec<f64> = xs.collect();
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// In one dimension, with an integer shift `v` and parameter `σ` (grid units), the Rényi
/// divergence of the Poisson-sampled discrete Gaussian — removal,
/// `D_α((1−q)N_Z(0) + q N_Z(v) ‖ N_Z(0))`, and addition, `D_α(N_Z(0) ‖ (1−q)N_Z(0) + q N_Z(v))`
/// — computed by summing over the integers, is at most what the ledger's accountant charges
/// for the continuous sampled Gaussian with noise multiplier `σ / v`, at integer and
/// fractional orders. With `q = 1` and integer `α v` the two are equal (CKS 2020, Prop. 5).
#[test]
fn subsampled_discrete_gaussian_rdp_is_bounded_by_the_accountant() {
    let orders = [1.1, 1.5, 2.0, 2.5, 3.0, 4.7, 8.0, 10.9, 16.0, 32.0, 63.0];
    let mut checked = 0;
    for (sigma, v) in [(0.8f64, 1i64), (1.0, 1), (2.0, 1), (3.0, 2), (5.0, 3), (12.0, 7)] {
        let s2 = sigma * sigma;
        let r = (64.0 * v as f64 + 40.0 * sigma + 50.0) as i64;
        let log_norm = log_sum_exp((-r..=r).map(|k| -((k * k) as f64) / (2.0 * s2)));
        let log_p0 = |k: i64| -((k * k) as f64) / (2.0 * s2) - log_norm;
        let log_p1 = |k: i64| log_p0(k - v);
        for q in [0.01f64, 0.1, 0.35, 0.9, 1.0] {
            let log_mix = |k: i64| {
                let (a, b) = ((1.0 - q).ln() + log_p0(k), q.ln() + log_p1(k));
                if q == 1.0 { b } else { log_sum_exp([a, b].into_iter()) }
            };
            for &alpha in &orders {
                let remove = log_sum_exp((-r..=r).map(|k| alpha * log_mix(k) + (1.0 - alpha) * log_p0(k)))
                    / (alpha - 1.0);
                let add = log_sum_exp((-r..=r).map(|k| alpha * log_p0(k) + (1.0 - alpha) * log_mix(k)))
                    / (alpha - 1.0);
                let charged = rdp_sampled_gaussian(q, sigma / v as f64, alpha).expect("valid");
                let tol = 1e-9 * (1.0 + charged.abs());
                assert!(
                    remove <= charged + tol,
                    "σ {sigma} v {v} q {q} α {alpha}: remove {remove} > {charged}"
                );
                assert!(add <= charged + tol, "σ {sigma} v {v} q {q} α {alpha}: add {add} > {charged}");
                if q == 1.0 && (alpha * v as f64).fract() == 0.0 {
                    assert!(
                        (remove - charged).abs() <= 1e-7 * (1.0 + charged),
                        "equality at q = 1: {remove} vs {charged}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 6 * 5 * 11);
}
