//! The distributed-DP library (`fedrec_shared::ddp`, docs/ddp.md): the rotation (known answers, inverse and norm), the conditional rounding (bound, mean, retry cap), the device noise (mean, variance, known first values, dropout calibration), the parameters (scale, wrap bound, refusals), the accountant (against the central discrete Gaussian, one-sided) and the whole pipeline end to end, with fixed seeds and explicit tolerances.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::ddp::accountant::{self, DdpEvent, ORDERS};
use fedrec_shared::ddp::params::{DEFAULT_BETA, DEFAULT_WRAP_PROBABILITY};
use fedrec_shared::ddp::rotation::{SIGN_NONCE, fwht, padded_dim};
use fedrec_shared::ddp::rounding::{conditional_round, rounded_l2_bound};
use fedrec_shared::ddp::{
    DdpError, DdpParams, DdpValidParams, Rotation, add_wrapped, clip, decode, encode, encode_rounded,
    unwrap_centred,
};
use fedrec_shared::privacy::rdp::{epsilon_from_rdp, rdp_sampled_gaussian};
use proptest::prelude::*;
use rand::Rng;

fn params(dim: usize, n_cohort: usize, min_reports: usize, bits: u32, noise_std: f64) -> DdpParams {
    DdpParams {
        dim,
        clip_norm: 1.0,
        noise_std,
        n_cohort,
        min_reports,
        bits,
        beta: DEFAULT_BETA,
        max_wrap_probability: DEFAULT_WRAP_PROBABILITY,
        rotation_seed: [7; 32],
    }
}

fn valid(p: DdpParams) -> DdpValidParams {
    p.validate().expect("valid parameters")
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

// ---------------------------------------------------------------------------------------------
// 1. Rotation
// ---------------------------------------------------------------------------------------------

/// By hand: H₄ = [[1,1,1,1],[1,−1,1,−1],[1,1,−1,−1],[1,−1,−1,1]], so (1/2)H₄(1,2,3,4) =
/// (10, −2, −4, 0)/2, and (1/2)H₄ e₁ = (½, ½, ½, ½).
#[test]
fn fwht_known_answers() {
    let mut v = [1.0, 2.0, 3.0, 4.0];
    fwht(&mut v).expect("power of two");
    assert_eq!(v, [5.0, -1.0, -2.0, 0.0]);
    let mut e = [1.0, 0.0, 0.0, 0.0];
    fwht(&mut e).expect("power of two");
    assert_eq!(e, [0.5; 4]);
    let mut one = [3.0];
    fwht(&mut one).expect("power of two");
    assert_eq!(one, [3.0]);
    assert_eq!(fwht(&mut [1.0, 2.0, 3.0]), Err(DdpError::Dim { dim: 3 }));
}

/// The signs are the bits of the ChaCha20 keystream under the seed and "fedrec/rotat", least
/// significant bit first; a 3-long update is padded to 4 and `U x = ½ H₄ (ξ ⊙ x)`, computed here
/// by hand from the signs.
#[test]
fn rotation_known_answer() {
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let mut stream = [0u8; 2];
    ChaCha20::new((&seed).into(), &SIGN_NONCE.into()).apply_keystream(&mut stream);
    let r = Rotation::new(&seed, 10).expect("valid");
    assert_eq!(r.padded_dim(), 16);
    for i in 0..16 {
        let bit = stream[i / 8] >> (i % 8) & 1;
        assert_eq!(r.sign(i), if bit == 1 { -1.0 } else { 1.0 }, "sign {i}");
    }

    let r = Rotation::new(&seed, 3).expect("valid");
    let s: Vec<f64> = (0..4).map(|i| r.sign(i)).collect();
    let x = [1.0, 2.0, 3.0];
    let (a, b, c) = (s[0] * 1.0, s[1] * 2.0, s[2] * 3.0);
    let want = [(a + b + c) / 2.0, (a - b + c) / 2.0, (a + b - c) / 2.0, (a - b - c) / 2.0];
    assert_eq!(r.forward(&x).expect("length"), want);
    // Not the identity's answer: at least one sign is −1 for this seed, or the test says nothing.
    assert!(s.contains(&-1.0), "signs {s:?}");
    let back = r.inverse(&want).expect("length");
    for (u, v) in back.iter().zip(x) {
        assert!((u - v).abs() < 1e-12);
    }
    assert_eq!(r.forward(&[1.0]), Err(DdpError::UpdateLength { expected: 3, got: 1 }));
    assert_eq!(padded_dim(0), None);
    assert_eq!(padded_dim(1), Some(1));
    assert_eq!(padded_dim(55_771), Some(65_536));
}

/// Different seeds give different rotations (the seed is used at all).
#[test]
fn rotation_depends_on_the_seed() {
    let a = Rotation::new(&[1; 32], 256).expect("valid");
    let b = Rotation::new(&[2; 32], 256).expect("valid");
    let differ = (0..256).filter(|&i| a.sign(i) != b.sign(i)).count();
    assert!((80..=176).contains(&differ), "{differ} of 256 signs differ");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// inverse ∘ forward = id to 1e-12 (relative to the norm), the padding comes back zero, and
    /// the norm is preserved.
    #[test]
    fn rotation_is_orthonormal(dim in 1usize..300, seed in any::<[u8; 32]>(), data_seed in any::<u64>()) {
        let r = Rotation::new(&seed, dim).expect("valid");
        let mut rng = seeded_rng(data_seed);
        let x: Vec<f64> = (0..dim).map(|_| rng.random::<f64>() * 20.0 - 10.0).collect();
        let y = r.forward(&x).expect("length");
        prop_assert_eq!(y.len(), r.padded_dim());
        let scale = norm(&x).max(1.0);
        prop_assert!((norm(&y) - norm(&x)).abs() <= 1e-12 * scale);
        let back = r.inverse_padded(&y).expect("length");
        for (i, b) in back.iter().enumerate() {
            let want = if i < dim { x[i] } else { 0.0 };
            prop_assert!((b - want).abs() <= 1e-12 * scale, "coordinate {} is {} not {}", i, b, want);
        }
    }

    // -----------------------------------------------------------------------------------------
    // 2. Conditional rounding: the bound always holds
    // -----------------------------------------------------------------------------------------

    /// Every rounded vector is within `⌊Δ₂²⌋` for any input of norm ≤ c, any β, and within one
    /// unit of the input per coordinate.
    #[test]
    fn conditional_rounding_meets_the_bound(
        log_d in 0u32..9,
        c in 0.5f64..200.0,
        beta in prop::sample::select(vec![0.0, 1e-6, 0.01, DEFAULT_BETA, 0.9]),
        seed in any::<u64>(),
    ) {
        let d = 1usize << log_d;
        let mut rng = seeded_rng(seed);
        let mut z: Vec<f64> = (0..d).map(|_| rng.random::<f64>() - 0.5).collect();
        let s = c * rng.random::<f64>().sqrt() / norm(&z).max(1e-300);
        z.iter_mut().for_each(|x| *x *= s);
        let bound = rounded_l2_bound(c, d, beta);
        let bound_sq = (bound * bound).floor() as u128;
        let k = conditional_round(&z, bound_sq, &mut rng, 1000).expect("a draw meets the bound");
        let sq: u128 = k.iter().map(|&v| (v as i128 * v as i128) as u128).sum();
        prop_assert!(sq <= bound_sq, "{} > {}", sq, bound_sq);
        for (a, b) in k.iter().zip(&z) {
            prop_assert!((*a as f64 - b).abs() < 1.0);
        }
    }
}

/// Unbiased: over 20,000 draws each coordinate's mean is within 5 standard errors (0.5/√N each)
/// of the input, with β small enough that conditioning hardly moves it. A rounding that always
/// went down, or to nearest, fails this by far on the fractional parts chosen.
#[test]
fn conditional_rounding_mean_is_the_input() {
    let z = [0.1, -0.3, 2.5, 7.9, -4.75, 0.0, 3.33, -0.01];
    let bound = rounded_l2_bound(norm(&z), z.len(), 1e-3);
    let bound_sq = (bound * bound).floor() as u128;
    let mut rng = seeded_rng(11);
    let n = 20_000;
    let mut sums = [0i64; 8];
    for _ in 0..n {
        let k = conditional_round(&z, bound_sq, &mut rng, 1000).expect("meets");
        sums.iter_mut().zip(&k).for_each(|(s, v)| *s += v);
    }
    let tol = 5.0 * 0.5 / (n as f64).sqrt();
    for (s, want) in sums.iter().zip(z) {
        let mean = *s as f64 / n as f64;
        assert!((mean - want).abs() < tol, "mean {mean} vs {want} (tolerance {tol})");
    }
}

/// With a bound no draw can meet, rounding gives up with the typed error after the cap.
#[test]
fn conditional_rounding_gives_up_with_a_typed_error() {
    let mut rng = seeded_rng(1);
    // (1.5, 1.5) rounds to a squared norm of 2, 5 or 8: never within 1.
    assert_eq!(
        conditional_round(&[1.5, 1.5], 1, &mut rng, 25),
        Err(DdpError::RoundingFailed { attempts: 25 })
    );
    // An exact integer vector on the bound needs no draw and is accepted.
    assert_eq!(conditional_round(&[3.0, -4.0], 25, &mut rng, 1), Ok(vec![3, -4]));
    assert!(matches!(
        conditional_round(&[f64::NAN], 10, &mut rng, 1),
        Err(DdpError::CoordinateTooLarge { index: 0, .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// 3. Device noise
// ---------------------------------------------------------------------------------------------

/// The device share's first values at a fixed seed (a change of sampler or of calibration
/// changes them), and its mean and variance over 200,000 draws: mean within 5 standard errors
/// of 0, variance within 5 standard errors (√(2/N) σ²) of σ_dev².
#[test]
fn device_noise_known_values_mean_and_variance() {
    let p = valid(params(100, 20, 10, 16, 1.0));
    let var = p.device_var();
    assert!((var.sqrt() - 632.0).abs() < 20.0, "σ_dev = {}", var.sqrt());
    let noise = p.device_noise();
    let mut rng = seeded_rng(2024);
    let first: Vec<i128> = (0..6).map(|_| noise.sample(&mut rng)).collect();
    assert_eq!(first, KAT_NOISE, "σ_dev² = {var}");

    let n = 200_000;
    let mut rng = seeded_rng(5);
    let (mut s1, mut s2) = (0f64, 0f64);
    for _ in 0..n {
        let x = noise.sample(&mut rng) as f64;
        s1 += x;
        s2 += x * x;
    }
    let mean = s1 / n as f64;
    let emp_var = s2 / n as f64 - mean * mean;
    assert!(mean.abs() < 5.0 * (var / n as f64).sqrt(), "mean {mean}");
    let se = (2.0 / n as f64).sqrt() * var;
    assert!((emp_var - var).abs() < 5.0 * se, "variance {emp_var} vs {var}");
}

/// Pinned by running the sampler once; see `device_noise_known_values_mean_and_variance`.
const KAT_NOISE: [i128; 6] = [542, 97, -113, -764, 1546, 174];

/// Each device adds σ²/(mγ²) (rounded up by at most 2⁻¹² relative): m survivors carry the
/// target σ, no less; all n carry √(n/m)·σ.
#[test]
fn noise_is_calibrated_for_min_reports() {
    for (n, m, sigma) in [(20, 10, 1.0), (1000, 700, 0.37), (5, 5, 12.0), (300, 1, 2.0)] {
        let p = valid(params(1000, n, m, 20, sigma));
        let at_m = p.survivor_noise_std(m);
        assert!(at_m >= sigma && at_m <= sigma * (1.0 + 1e-3), "n {n} m {m}: {at_m} vs {sigma}");
        let at_n = p.survivor_noise_std(n);
        let want = sigma * (n as f64 / m as f64).sqrt();
        assert!((at_n / want - 1.0).abs() < 1e-3, "{at_n} vs {want}");
        // One survivor fewer than m would carry less than the target.
        if m > 1 {
            assert!(p.survivor_noise_std(m - 1) < sigma);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Parameters
// ---------------------------------------------------------------------------------------------

/// γ by the formula, by hand for one case; the wrap bound is at most p for many parameter sets
/// and grows above it when b shrinks by one at the same γ.
#[test]
fn scale_and_wrap_bound() {
    let p = valid(params(100, 20, 10, 16, 1.0));
    let (d, n, m) = (128.0f64, 20.0f64, 10.0f64);
    let k = (2.0 * (2.0 * d / 1e-9f64).ln()).sqrt();
    let gamma = k * (n * n / d + n / m * (1.0 + 1.0 / 1024.0)).sqrt() / (32768.0 - n);
    assert!((p.gamma() / gamma - 1.0).abs() < 1e-12, "{} vs {gamma}", p.gamma());
    assert_eq!(p.padded_dim(), 128);

    for dim in [1, 100, 4097, 55_771] {
        for (n, m) in [(2, 1), (100, 60), (1000, 800)] {
            for bits in [12, 16, 20, 32] {
                for sigma in [0.1, 1.0, 10.0] {
                    match params(dim, n, m, bits, sigma).validate() {
                        Ok(p) => {
                            let w = p.wrap_probability_bound();
                            assert!(w <= 1e-9, "dim {dim} n {n} bits {bits} σ {sigma}: {w}");
                            assert!(p.survivor_noise_std(m) >= sigma);
                            assert!(p.sensitivity_inflation() >= 1.0);
                        }
                        // Few bits, or a short vector whose coordinates carry the whole signal.
                        Err(DdpError::DeviceNoiseTooSmall { .. }) => {
                            assert!(bits <= 16 || dim == 1, "{bits}")
                        }
                        Err(e) => panic!("dim {dim} n {n} bits {bits}: {e}"),
                    }
                }
            }
        }
    }
}

/// More bits: finer grid, less sensitivity inflation (DDGauss: accuracy approaches central).
#[test]
fn more_bits_less_inflation() {
    let infl: Vec<f64> = [14, 16, 18, 20, 24]
        .iter()
        .map(|&b| valid(params(55_771, 1000, 800, b, 1.0)).sensitivity_inflation())
        .collect();
    assert!(infl.windows(2).all(|w| w[1] < w[0]), "{infl:?}");
    assert!(infl[4] < 1.001, "{infl:?}");
    assert!(infl[0] > 1.1, "{infl:?}");
}

#[test]
fn invalid_parameters_are_refused() {
    let ok = params(100, 20, 10, 16, 1.0);
    assert_eq!(DdpParams { dim: 0, ..ok }.validate().map(|_| ()), Err(DdpError::Dim { dim: 0 }));
    assert_eq!(
        DdpParams { min_reports: 0, ..ok }.validate().map(|_| ()),
        Err(DdpError::Cohort { n_cohort: 20, min_reports: 0 })
    );
    assert_eq!(
        DdpParams { min_reports: 21, ..ok }.validate().map(|_| ()),
        Err(DdpError::Cohort { n_cohort: 20, min_reports: 21 })
    );
    assert_eq!(DdpParams { bits: 65, ..ok }.validate().map(|_| ()), Err(DdpError::Bits(65)));
    assert_eq!(
        DdpParams { bits: 5, ..ok }.validate().map(|_| ()),
        Err(DdpError::TooFewBits { bits: 5, n_cohort: 20 })
    );
    assert_eq!(DdpParams { beta: 1.0, ..ok }.validate().map(|_| ()), Err(DdpError::Beta(1.0)));
    assert_eq!(DdpParams { noise_std: 0.0, ..ok }.validate().map(|_| ()), Err(DdpError::NoiseStd(0.0)));
    assert!(matches!(DdpParams { clip_norm: f64::NAN, ..ok }.validate(), Err(DdpError::ClipNorm(_))));
    assert!(matches!(
        DdpParams { bits: 6, ..ok }.validate().map(|_| ()),
        Err(DdpError::DeviceNoiseTooSmall { .. })
    ));
    let p = valid(ok);
    let mut rng = seeded_rng(1);
    assert_eq!(encode(&[0.0; 99], &p, &mut rng), Err(DdpError::UpdateLength { expected: 100, got: 99 }));
    let mut bad = vec![0.0f32; 100];
    bad[3] = f32::NAN;
    assert_eq!(encode(&bad, &p, &mut rng), Err(DdpError::NonFinite { index: 3 }));
    let zero = vec![0u64; 128];
    for n in [9, 21] {
        assert!(matches!(decode(&zero, &p, n), Err(DdpError::Survivors { .. })), "{n}");
    }
    assert_eq!(decode(&[0; 127], &p, 10), Err(DdpError::UpdateLength { expected: 128, got: 127 }));
    assert!(matches!(decode(&[1 << 16; 128], &p, 10), Err(DdpError::NotInRing { index: 0, .. })));
    assert_eq!(unwrap_centred(&[0, 1, 127, 128, 255], 8), Ok(vec![0, 1, 127, -128, -1]));
    let mut acc = vec![255u64, 1];
    assert!(add_wrapped(&mut acc, &[256, 0], 8).is_err());
    add_wrapped(&mut acc, &[1, 255], 8).expect("valid");
    assert_eq!(acc, vec![0, 0]);
}

// ---------------------------------------------------------------------------------------------
// 5. Accountant
// ---------------------------------------------------------------------------------------------

/// One share (τ = 0) without sampling is the central discrete Gaussian: α/(2z²) at every order,
/// the continuous Gaussian's curve (CKS 2020 Proposition 5), as the central ledger charges.
#[test]
fn one_share_without_sampling_is_the_central_discrete_gaussian() {
    for z in [0.5, 1.0, 3.0] {
        let l2 = 1000.0;
        let event = DdpEvent::from_parts(1.0, 1, l2, l2 * 30.0, (z * l2) * (z * l2), 1, 1024).expect("valid");
        assert_eq!(event.tau(), 0.0);
        for &a in &ORDERS {
            let got = accountant::rdp_round(&event, a as u32);
            let central = rdp_sampled_gaussian(1.0, z, a).expect("valid");
            assert!((got / central - 1.0).abs() < 1e-12, "z {z} α {a}: {got} vs {central}");
        }
    }
}

/// One-sided against the central sampled Gaussian at the same noise multiplier Δ₂/σ_t (the
/// exact computation of Mironov, Talwar & Zhang that the central ledger uses): the distributed
/// accountant is never below it and falls as each share's noise grows (τ → 0). Without sampling
/// it then equals the central value; at q = 0.01 it stays above it by the looseness of the
/// Zhu–Wang bound for general mechanisms (measured: ε 5.14 vs 4.30 at z = 0.8, 2.83 vs 2.44 at
/// z = 1, 1.04 vs 0.78 at z = 2; 1000 rounds, δ = 10⁻⁶).
#[test]
fn distributed_epsilon_tends_to_central_from_above() {
    let (q, steps, delta, n, dim) = (0.01, 1000u64, 1e-6, 100usize, 65_536usize);
    for z in [0.8, 1.0, 2.0] {
        let central_rdp: Vec<f64> =
            ORDERS.iter().map(|&a| steps as f64 * rdp_sampled_gaussian(q, z, a).expect("valid")).collect();
        let central = epsilon_from_rdp(&ORDERS, &central_rdp, delta).expect("valid").0;
        let mut last = f64::INFINITY;
        for sigma_dev in [0.5, 0.6, 0.8, 1.0, 2.0, 8.0] {
            let var = sigma_dev * sigma_dev;
            let l2 = (n as f64 * var).sqrt() / z;
            let event =
                DdpEvent::from_parts(q, steps, l2, l2 * (dim as f64).sqrt(), var, n, dim).expect("valid");
            let eps = accountant::epsilon(&[event], delta).expect("valid");
            assert!(eps >= central * (1.0 - 1e-9), "z {z} σ_dev {sigma_dev}: {eps} < central {central}");
            assert!(eps <= last, "not decreasing in σ_dev: {eps} after {last}");
            last = eps;
            for &a in &ORDERS {
                let per = accountant::rdp_round(&event, a as u32);
                let c = rdp_sampled_gaussian(q, z, a).expect("valid");
                assert!(per >= c * (1.0 - 1e-9), "α {a}: {per} < {c}");
            }
        }
        assert!(last <= central * 1.4, "z {z}: {last} vs central {central}");
        // Without sampling, τ → 0 gives the central curve.
        let var: f64 = 64.0;
        let l2 = (n as f64 * var).sqrt() / z;
        let event = DdpEvent::from_parts(1.0, 1, l2, l2 * (dim as f64).sqrt(), var, n, dim).expect("valid");
        let ddp = accountant::epsilon(&[event], delta).expect("valid");
        let rdp: Vec<f64> = ORDERS.iter().map(|&a| rdp_sampled_gaussian(1.0, z, a).expect("valid")).collect();
        let central_one = epsilon_from_rdp(&ORDERS, &rdp, delta).expect("valid").0;
        assert!((ddp / central_one - 1.0).abs() < 1e-9, "z {z}: {ddp} vs {central_one}");
        eprintln!("z {z}: distributed {last:.4} central {central:.4}");
    }
}

/// The device's record keeps dp-accounting's orders (fractional below 11, up to 1024): the
/// distributed curve on them is the integer curve at `⌈α⌉`, so exact at integer orders, never
/// below the true curve at fractional ones (checked where the truth is known: one share
/// without sampling is `α/(2z²)`), and non-decreasing in the order, as Rényi divergence is.
#[test]
fn the_distributed_curve_on_the_devices_orders_bounds_it_from_above() {
    use fedrec_shared::privacy::rdp::DEFAULT_ORDERS;
    let z: f64 = 1.3;
    let l2 = 1000.0;
    let one = DdpEvent::from_parts(1.0, 1, l2, l2 * 30.0, (z * l2) * (z * l2), 1, 1024).expect("valid");
    let sampled = DdpEvent::from_parts(0.01, 1, 40.0, 400.0, 16.0, 100, 4096).expect("valid");
    for event in [one, sampled] {
        let curve = accountant::rdp_at_orders(&event, &DEFAULT_ORDERS);
        assert_eq!(curve.len(), DEFAULT_ORDERS.len());
        for (&a, &v) in DEFAULT_ORDERS.iter().zip(&curve) {
            let at_ceil = accountant::rdp_round(&event, (a.ceil() as u32).max(2));
            assert_eq!(v, at_ceil, "α {a}");
            if event.q() == 1.0 {
                assert!(v >= a / (2.0 * z * z) * (1.0 - 1e-12), "α {a}: {v} below the truth");
            }
        }
        assert!(curve.windows(2).all(|w| w[0] <= w[1]), "not monotone in the order");
    }
    let bad = accountant::rdp_at_orders(&sampled, &[0.5, f64::NAN, f64::INFINITY]);
    assert!(bad.iter().all(|v| v.is_infinite()), "{bad:?}");
}

/// Small per-device noise makes τ large and the charge much higher than the central one with
/// the same total variance: the accountant sees the sum is not a discrete Gaussian.
#[test]
fn small_shares_cost_more() {
    let (n, dim) = (1000, 4096);
    let var: f64 = 0.25;
    let l2 = (n as f64 * var).sqrt();
    let event = DdpEvent::from_parts(1.0, 1, l2, l2 * 64.0, var, n, dim).expect("valid");
    assert!(event.tau() > 1.0, "τ = {}", event.tau());
    let got = accountant::rdp_round(&event, 2);
    assert!(got > 2.0 * rdp_sampled_gaussian(1.0, 1.0, 2.0).expect("valid"), "{got}");
}

/// Calibration: the σ `noise_for` returns meets the target and 0.1% less misses it; it is never
/// below the central mechanism's, and fewer bits never need less. Measured (ε = 4, δ = 10⁻⁶,
/// q = 0.01, 1000 rounds, d = 55,771, n = 1000, m = 800): 0.8723 C at 24 and 20 bits, 0.8728 C at
/// 18 bits, against 0.8211 C for the central ledger: the 6% are the Zhu–Wang sampling bound.
#[test]
fn noise_for_meets_the_target_tightly() {
    let (q, steps, delta) = (0.01, 1000u64, 1e-6);
    let target = 4.0;
    let central_z = fedrec_shared::privacy::calibrate_noise(
        target,
        delta,
        q,
        steps,
        fedrec_shared::privacy::AccountantKind::Rdp,
    )
    .expect("reachable");
    let mut last = f64::INFINITY;
    for bits in [24, 20, 18] {
        let template = params(55_771, 1000, 800, bits, 1.0);
        let sigma = accountant::noise_for(target, delta, q, steps, &template).expect("reachable");
        let eps_of = |s: f64| {
            let p = valid(DdpParams { noise_std: s, ..template });
            accountant::epsilon(&[DdpEvent::new(&p, 800, q, steps).expect("valid")], delta).expect("valid")
        };
        assert!(eps_of(sigma) <= target, "{bits} bits");
        assert!(eps_of(sigma * 0.999) > target, "{bits} bits: not tight");
        assert!(sigma >= central_z, "{bits} bits: {sigma} below central {central_z}");
        eprintln!("{bits} bits: σ = {sigma:.4} C (central {central_z:.4} C)");
        assert!(sigma >= last * 0.999 || last == f64::INFINITY, "fewer bits needed less noise");
        last = sigma.min(last);
    }
    let sigma24 =
        accountant::noise_for(target, delta, q, steps, &params(55_771, 1000, 800, 24, 1.0)).expect("ok");
    assert!(sigma24 <= central_z * 1.08, "{sigma24} vs central {central_z}");
}

// ---------------------------------------------------------------------------------------------
// 6. End to end
// ---------------------------------------------------------------------------------------------

/// n devices encode, 15 of 20 survive (m = 10), their words are summed mod 2^b and decoded:
/// the result minus the sum of the survivors' clipped updates has mean ≈ 0 and per-coordinate
/// variance γ²(n' σ_dev² + rounding) within 8% (the standard error of the estimate is 1.4%).
#[test]
fn end_to_end_sum_carries_the_accountants_noise() {
    let (dim, n, m, survivors) = (100, 20, 10, 15);
    let p = valid(params(dim, n, m, 16, 0.5));
    let mut rng = seeded_rng(77);
    let reps = 80;
    let (mut s1, mut s2, mut count) = (0f64, 0f64, 0usize);
    for _ in 0..reps {
        let mut acc = vec![0u64; p.padded_dim()];
        let mut exact = vec![0f64; dim];
        for _ in 0..survivors {
            // Norms from 0.1 C to 3 C: some are clipped.
            let scale = 3.0 * rng.random::<f64>() + 0.1;
            let u: Vec<f32> = (0..dim).map(|_| ((rng.random::<f64>() - 0.5) * scale / 2.9) as f32).collect();
            let c = clip(&u, &p).expect("valid");
            assert!(norm(&c) <= 1.0 + 1e-12);
            exact.iter_mut().zip(&c).for_each(|(e, x)| *e += x);
            add_wrapped(&mut acc, &encode(&u, &p, &mut rng).expect("encodes"), p.bits()).expect("same width");
        }
        let got = decode(&acc, &p, survivors).expect("decodes");
        for (g, e) in got.iter().zip(&exact) {
            let err = f64::from(*g) - e;
            s1 += err;
            s2 += err * err;
            count += 1;
        }
    }
    let mean = s1 / count as f64;
    let var = s2 / count as f64 - mean * mean;
    let noise_sd = p.survivor_noise_std(survivors);
    // Rounding adds at most γ²/4 per device and coordinate; it is < 10⁻⁵ of the noise here.
    let want = noise_sd * noise_sd;
    assert!(mean.abs() < 5.0 * (want / count as f64).sqrt(), "mean {mean}");
    assert!((var / want - 1.0).abs() < 0.08, "variance {var} vs accountant {want}");
    // The accountant's σ for this round: the same total noise in grid units.
    let event = DdpEvent::new(&p, survivors, 1.0, 1).expect("valid");
    assert!((event.total_sigma() * p.gamma() / noise_sd - 1.0).abs() < 1e-12);
}

/// The encoding before noise is within the bound; the encoding with noise is not the encoding
/// without it (the device adds noise), and decoding a single device's sum gives back its update
/// up to that noise.
#[test]
fn a_device_encoding_is_noised_and_bounded() {
    let p = valid(params(100, 20, 1, 16, 0.5));
    let u: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 400.0).collect();
    let mut rng = seeded_rng(3);
    let k = encode_rounded(&u, &p, &mut rng).expect("encodes");
    let sq: u128 = k.iter().map(|&v| (v as i128 * v as i128) as u128).sum();
    assert!(sq <= p.l2_sq_bound());
    let w = encode(&u, &p, &mut rng).expect("encodes");
    let lifted = unwrap_centred(&w, p.bits()).expect("reduced");
    let diff: Vec<f64> = lifted.iter().zip(&k).map(|(a, b)| (a - b) as f64).collect();
    let sd = (diff.iter().map(|d| d * d).sum::<f64>() / diff.len() as f64).sqrt();
    let want = p.device_var().sqrt();
    assert!(sd > 0.7 * want && sd < 1.3 * want, "noise sd {sd} vs σ_dev {want}");
}

/// The boundary: all n devices send the largest update (norm ≥ C, clipped to C) in the same
/// direction. At the chosen b nothing wraps: the decoded sum is n·C·e₁ up to the noise (6σ per
/// coordinate), and every centred coordinate of the ring sum is inside [−2^{b−1}, 2^{b−1}); the
/// largest is above 2^{b−4}, so three bits fewer at this γ would have wrapped.
#[test]
fn largest_aligned_updates_never_wrap() {
    for (bits, n, dim, seed) in [(12u32, 20usize, 100usize, 1u64), (16, 200, 1000, 2), (20, 1000, 300, 3)] {
        let p = valid(params(dim, n, n, bits, 1.0));
        let mut rng = seeded_rng(seed);
        let mut u = vec![0f32; dim];
        u[0] = 5.0;
        let mut acc = vec![0u64; p.padded_dim()];
        for _ in 0..n {
            add_wrapped(&mut acc, &encode(&u, &p, &mut rng).expect("encodes"), bits).expect("width");
        }
        let lifted = unwrap_centred(&acc, bits).expect("reduced");
        let max = lifted.iter().map(|v| v.unsigned_abs()).max().expect("non-empty");
        assert!(max < 1 << (bits - 1));
        assert!(max >= 1 << (bits - 4), "{bits} bits: max {max} leaves more than 3 bits unused");
        let got = decode(&acc, &p, n).expect("decodes");
        let sd = p.survivor_noise_std(n);
        for (i, g) in got.iter().enumerate() {
            let want = if i == 0 { n as f64 } else { 0.0 };
            assert!((f64::from(*g) - want).abs() < 6.0 * sd, "{bits} bits, coordinate {i}: {g} vs {want}");
        }
        eprintln!(
            "{bits} bits, n {n}: max |coordinate| {max} of {}, wrap bound {:.2e}",
            1u64 << (bits - 1),
            p.wrap_probability_bound()
        );
    }
}
