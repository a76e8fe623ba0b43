//! Exact discrete Gaussian noise on a fixed-point grid: the sampler (Canonne, Kamath & Steinke
//! 2020) with integer arithmetic only, and the grid that turns a sum of clipped updates into an
//! integer query of known L2 sensitivity.
//!
//! # Why
//!
//! A floating-point Gaussian added in `f32` leaks through the low-order bits of its output: at
//! noise scale 1.59, 37% of the `f32` values just above 1.59 cannot occur when the true sum is
//! 0, and many of them can when it is 0.3, so one output can tell two sums apart with
//! certainty (Mironov 2012; Jin et al., S&P 2022). Noise that is an exact integer, added to an
//! integer, has no such gaps: every integer has positive probability under every sum.
//!
//! # The mechanism
//!
//! For a round with clip norm `C` and update length `d`:
//!
//! 1. **Grid.** `G = ⌈√d / (2 · 0.01)⌉ = ⌈50 √d⌉` steps per clip norm, step `γ = C / G`
//!    ([`Grid::for_sum`]). Then `γ √d / 2 ≤ 0.01 · C`: rounding moves an update by at most
//!    1% of the clip norm.
//! 2. **To the grid.** The coordinator rounds each coordinate of each clipped update to the
//!    nearest grid point as it adds it, `k_i = round(x_i / γ)`, and sums the integers exactly
//!    ([`Grid::to_grid`]). Deterministic rounding to nearest moves each coordinate by at most
//!    `1/2` grid step, so a rounded update has norm at most `G + √d / 2` in grid units. That
//!    bound, with a relative margin of [`SENSITIVITY_MARGIN`] for the `f64` arithmetic of
//!    the rounding, is the sensitivity `Δ` of the integer sum when one device is added or
//!    removed ([`Grid::sensitivity`]); in real units `Δ₂ = γ Δ ≤ 1.01 C`.
//!    *Why deterministic rounding:* it needs no randomness on the add path, cannot fail, and
//!    its bound holds for every input, not with high probability. The conditional randomized
//!    rounding of Kairouz, Liu & Steinke (2021) gives a tighter bound (`≈ √(C² + γ²d/4)`) at
//!    the price of an RNG per update and a resampling loop; at a 1% bound there is little to
//!    win.
//! 3. **Integer noise.** Each coordinate of the integer sum gets independent discrete
//!    Gaussian noise `N_Z(0, σ_z²)` with `σ_z = z · Δ` for the configured noise multiplier
//!    `z` ([`Grid::noise`]). `σ_z²` is a rational rounded *up* (denominator at most
//!    [`SIGMA_SQ_DENOMINATOR`]), so the noise multiplier relative to the true sensitivity,
//!    `σ_z / Δ` ([`DiscreteGaussian::sigma`] over [`Grid::sensitivity`]), is never below `z`.
//! 4. **Back to real units.** The noised integers are multiplied by `γ`: the released
//!    coordinate is `γ · (Σ k_i + noise)`. This is post-processing of an integer output, so it
//!    cannot weaken the guarantee, and every output value is `γ` times an integer that has
//!    positive probability under any true sum.
//!
//! The real-unit noise standard deviation is `γ σ_z = z Δ₂ ≈ 1.01 z C`: 1% more noise than the
//! floating-point mechanism for the same charge.
//!
//! # The sampler
//!
//! [`DiscreteGaussian::sample`] is Algorithm 3 of Canonne, Kamath & Steinke (2020), "The
//! Discrete Gaussian for Differential Privacy" (NeurIPS), built from their Algorithm 1
//! ([`sample_bernoulli_exp`], Bernoulli(exp(−γ)) for rational γ) and Algorithm 2
//! ([`sample_discrete_laplace`]). All arithmetic is on `u128`; the one quantity that can
//! exceed it, the square in the acceptance test, is divided in 256-bit arithmetic. The only
//! source of randomness is uniform integers drawn by rejection from the passed-in RNG's
//! 64-bit words, so the output distribution is exactly `N_Z(0, σ²)`. Parameters are limited
//! so that nothing overflows ([`MAX_SIGMA`]).
//!
//! # Accounting
//!
//! What the accountant relies on:
//! - **Without sampling** the multivariate discrete Gaussian with an integer shift `v` and
//!   parameter `σ` has `D_α(N_Z(v, σ²) ‖ N_Z(0, σ²)) ≤ α ‖v‖² / (2σ²)` at every order
//!   `α > 1`, with equality when every `α v_i` is an integer (CKS 2020, Proposition 5 and its
//!   multivariate form for independent coordinates): the same Rényi curve as the continuous
//!   Gaussian, i.e. `½ (Δ/σ)²`-concentrated DP.
//! - **With Poisson sampling** at rate `q`, for the *removal* direction and *integer* orders
//!   `α`, the divergence of the mixture `(1−q) N_Z(0) + q N_Z(v)` from `N_Z(0)` expands
//!   binomially into `Σ_k C(α,k) (1−q)^{α−k} q^k exp((k−1) D_k)`, and with the equality above
//!   every term equals the continuous Gaussian's. The expansion is exactly how Mironov, Talwar
//!   & Zhang (2019, Section 3.3) compute the sampled Gaussian at integer orders, so there the
//!   ledger's RDP is exact for the discrete mechanism (and an upper bound when `‖v‖ < Δ`).
//! - **Not proven here:** the *addition* direction and the fractional orders (1.1 … 10.9) of
//!   the default grid, and the PLD accountant. Mironov, Talwar & Zhang prove the addition
//!   direction is dominated only for the continuous Gaussian. We have not found a published
//!   proof for the sampled discrete Gaussian; `shared/tests/discrete_gaussian.rs`
//!   (`subsampled_discrete_gaussian_rdp_is_bounded_by_the_accountant`) checks numerically, in
//!   one dimension, that both directions at integer and fractional orders are at most the
//!   accountant's value. Treat those orders as relying on that check, not on a theorem.
//!
//! The accountant is charged the configured `z`; the effective multiplier `σ_z / Δ` is at
//! least `z` (step 3), so the charge is conservative by the rounding of `σ_z²` (relative
//! `≤ 2⁻¹²` for `σ_z ≥ 1`) and nothing else. Calibration returns `z` and so already is the
//! effective multiplier.

use rand::Rng;
use thiserror::Error;

/// Largest denominator of `σ²` that [`DiscreteGaussian::at_least`] uses: `σ²` is rounded up
/// to a multiple of `1/4096` (relative error at most `2⁻¹²` when `σ ≥ 1`), or coarser when
/// `σ` is so large that a finer fraction could overflow.
pub const SIGMA_SQ_DENOMINATOR: u64 = 1 << 12;

/// Largest `σ` a [`DiscreteGaussian`] accepts: with `t = ⌊σ⌋ + 1`, the sampler needs
/// `t² · den ≤ 2⁶²` (see [`DiscreteGaussian::new`]), so at most `2³¹` with denominator 1.
pub const MAX_SIGMA: f64 = 2_147_483_647.0;

/// Share of the clip norm that rounding to the grid may add to an update's norm:
/// `γ √d / 2 ≤ GRID_ROUNDING_SHARE · C`.
pub const GRID_ROUNDING_SHARE: f64 = 0.01;

/// Relative margin on the grid sensitivity for the `f64` arithmetic of the rounding.
pub const SENSITIVITY_MARGIN: f64 = 1e-6;

/// How much finer the grid of a secure-aggregation round is than a plain round's
/// ([`Grid::for_secure_sum`]): each device rounds its own update there (stochastically), so
/// without noise the rounding error of the sum grows with the cohort. Eight times finer cuts
/// its variance 64-fold while a cohort of about 22,000 ML-100K-sized updates still sums in
/// 32-bit words (`n · G < 2³¹`, `G = 8 · 50√d`).
pub const SECURE_GRID_REFINEMENT: f64 = 8.0;

/// Bound on `t² · den` that keeps every intermediate of the sampler inside `u128`.
const T2_DEN_LIMIT: u128 = 1 << 62;

/// Why discrete Gaussian parameters were refused.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum DiscreteNoiseError {
    /// `σ²` with a zero numerator or denominator.
    #[error("sigma² must be a positive fraction, got {num}/{den}")]
    ZeroSigma {
        /// Numerator given.
        num: u64,
        /// Denominator given.
        den: u64,
    },
    /// `σ` not a positive finite number.
    #[error("sigma must be positive and finite, got {0}")]
    Sigma(f64),
    /// `σ` (with its denominator) too large for exact `u128` arithmetic.
    #[error("sigma {sigma} is too large for the exact sampler (limit {limit})")]
    SigmaTooLarge {
        /// The σ asked for.
        sigma: f64,
        /// The largest σ accepted with this denominator.
        limit: f64,
    },
    /// A `σ²` denominator above `2⁶²` (after reducing the fraction): too fine for exact
    /// `u128` arithmetic.
    #[error("sigma² denominator {0} is above 2^62")]
    DenominatorTooLarge(u64),
    /// A noise multiplier that is negative or not finite.
    #[error("noise multiplier must be finite and ≥ 0, got {0}")]
    NoiseMultiplier(f64),
    /// A grid for a clip norm that is not positive and finite, or for an empty vector.
    #[error("grid needs a positive finite clip norm and a non-empty vector (got C = {clip_norm}, d = {dim})")]
    Grid {
        /// The clip norm given.
        clip_norm: f64,
        /// The vector length given.
        dim: usize,
    },
    /// A Bernoulli or uniform parameter with a zero denominator or a probability above 1.
    #[error("invalid rational parameter {num}/{den}")]
    Rational {
        /// Numerator.
        num: u128,
        /// Denominator.
        den: u128,
    },
}

/// The discrete Gaussian `N_Z(0, σ²)` with rational `σ² = num / den`:
/// `P[X = x] ∝ exp(−x² / (2σ²))` for every integer `x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteGaussian {
    /// `σ²` numerator (reduced).
    num: u128,
    /// `σ²` denominator (reduced).
    den: u128,
    /// Scale of the discrete Laplace proposal, `⌊σ⌋ + 1` (CKS 2020, Algorithm 3).
    t: u128,
    /// `t · den`, for the acceptance numerator `|y| t den − num`.
    t_den: u128,
    /// `2 num t² den`, the acceptance denominator.
    accept_den: u128,
}

impl DiscreteGaussian {
    /// `N_Z(0, num/den)`. Refuses a zero numerator or denominator, a denominator above `2⁶²`,
    /// and parameters for which
    /// `t² · den > 2⁶²` (after reducing the fraction), where `t = ⌊σ⌋ + 1`: beyond that the
    /// acceptance test could leave `u128`.
    pub fn new(num: u64, den: u64) -> Result<Self, DiscreteNoiseError> {
        if num == 0 || den == 0 {
            return Err(DiscreteNoiseError::ZeroSigma { num, den });
        }
        let g = gcd(num, den);
        let (num, den) = (u128::from(num / g), u128::from(den / g));
        if den > T2_DEN_LIMIT {
            return Err(DiscreteNoiseError::DenominatorTooLarge(den as u64));
        }
        // ⌊σ⌋ = ⌊√⌊σ²⌋⌋: k ≤ √x ⇔ k² ≤ x ⇔ k² ≤ ⌊x⌋ for integer k.
        let t = (num / den).isqrt() + 1;
        let too_large = || DiscreteNoiseError::SigmaTooLarge {
            sigma: (num as f64 / den as f64).sqrt(),
            limit: ((T2_DEN_LIMIT / den) as f64).sqrt() - 1.0,
        };
        let t2_den = t.checked_mul(t).and_then(|t2| t2.checked_mul(den)).ok_or_else(too_large)?;
        if t2_den > T2_DEN_LIMIT {
            return Err(too_large());
        }
        // num < t² den ≤ 2⁶², so 2 num t² den < 2¹²⁵.
        let accept_den = 2 * num * t2_den;
        Ok(Self { num, den, t, t_den: t * den, accept_den })
    }

    /// The discrete Gaussian with the smallest `σ²` on a grid of `1/den` that is at least
    /// `sigma²`, where `den` is [`SIGMA_SQ_DENOMINATOR`] or, for very large `sigma`, the
    /// largest power of two that keeps the sampler exact. Refuses `sigma` that is not
    /// positive and finite, or above [`MAX_SIGMA`].
    pub fn at_least(sigma: f64) -> Result<Self, DiscreteNoiseError> {
        if !(sigma > 0.0 && sigma.is_finite()) {
            return Err(DiscreteNoiseError::Sigma(sigma));
        }
        if sigma > MAX_SIGMA {
            return Err(DiscreteNoiseError::SigmaTooLarge { sigma, limit: MAX_SIGMA });
        }
        let mut den = SIGMA_SQ_DENOMINATOR;
        loop {
            // f64 products are exact to 2⁻⁵²; a relative margin of 2⁻⁴⁰ plus the ceiling
            // makes num/den ≥ σ² for sure.
            let scaled = sigma * sigma * den as f64 * (1.0 + f64::powi(2.0, -40));
            let num = scaled.ceil();
            if num < u64::MAX as f64 {
                match Self::new(num as u64, den) {
                    Ok(dg) => return Ok(dg),
                    Err(DiscreteNoiseError::SigmaTooLarge { .. }) if den > 1 => {}
                    Err(e) => return Err(e),
                }
            }
            if den == 1 {
                return Err(DiscreteNoiseError::SigmaTooLarge { sigma, limit: MAX_SIGMA });
            }
            den /= 2;
        }
    }

    /// `σ²` as the reduced fraction `(num, den)`.
    pub fn sigma_sq(&self) -> (u128, u128) {
        (self.num, self.den)
    }

    /// `σ` as a float (for reporting; the sampler never uses it).
    pub fn sigma(&self) -> f64 {
        (self.num as f64 / self.den as f64).sqrt()
    }

    /// One exact sample (CKS 2020, Algorithm 3).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> i128 {
        loop {
            // Algorithm 3, line 3: a discrete Laplace proposal with scale t.
            let y = discrete_laplace(rng, self.t);
            let m = y.unsigned_abs();
            // Line 4: accept with probability exp(−(|y| − σ²/t)² / (2σ²))
            //   = exp(−(|y| t den − num)² / (2 num t² den)).
            let Some(a) = m.checked_mul(self.t_den).map(|p| p.abs_diff(self.num)) else {
                // |y| t den ≥ 2¹²⁸ needs |y| ≥ 2¹²⁸ / (t den) ≥ 2⁶⁶ / t, i.e. more than 2⁶⁴
                // iterations of the geometric loop: unreachable in any real run.
                continue;
            };
            if bernoulli_exp_square_over(rng, a, self.accept_den) {
                return y;
            }
        }
    }
}

/// The fixed-point grid of one round's sum: step `γ = C / G` with `G = ⌈√d / (2 · 0.01)⌉`,
/// and the L2 sensitivity of the rounded integer sum (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    dim: usize,
    steps_per_clip: f64,
    step: f64,
    clip_norm: f64,
    sensitivity: f64,
}

impl Grid {
    /// The grid for sums of `dim`-long updates clipped to `clip_norm`.
    pub fn for_sum(clip_norm: f32, dim: usize) -> Result<Self, DiscreteNoiseError> {
        let c = f64::from(clip_norm);
        if !(c > 0.0 && c.is_finite()) || dim == 0 {
            return Err(DiscreteNoiseError::Grid { clip_norm: c, dim });
        }
        let half_sqrt_d = (dim as f64).sqrt() / 2.0;
        let g = (half_sqrt_d / GRID_ROUNDING_SHARE).ceil();
        Ok(Self {
            dim,
            steps_per_clip: g,
            step: c / g,
            clip_norm: c,
            sensitivity: (g + half_sqrt_d) * (1.0 + SENSITIVITY_MARGIN),
        })
    }

    /// The grid of a secure-aggregation round: [`Grid::for_sum`] with
    /// [`SECURE_GRID_REFINEMENT`] times as many steps per clip norm. It depends only on public
    /// values (`C`, `d`), so devices and the coordinator agree on it before the cohort is known;
    /// the sensitivity bound `(G + √d/2)(1 + 10⁻⁶)` holds on it as on every grid.
    pub fn for_secure_sum(clip_norm: f32, dim: usize) -> Result<Self, DiscreteNoiseError> {
        let plain = Self::for_sum(clip_norm, dim)?;
        let half_sqrt_d = (dim as f64).sqrt() / 2.0;
        let g = plain.steps_per_clip * SECURE_GRID_REFINEMENT;
        Ok(Self {
            dim,
            steps_per_clip: g,
            step: plain.clip_norm / g,
            clip_norm: plain.clip_norm,
            sensitivity: (g + half_sqrt_d) * (1.0 + SENSITIVITY_MARGIN),
        })
    }

    /// The length `d` of the updates the grid was built for.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The grid step `γ` in real units.
    pub fn step(&self) -> f64 {
        self.step
    }

    /// `G = C / γ`, grid steps per clip norm.
    pub fn steps_per_clip(&self) -> f64 {
        self.steps_per_clip
    }

    /// Nearest grid point of `x` in grid units, `round(x / γ)`. A value of magnitude at most
    /// `C` maps into `[−G, G]`; anything larger saturates (clipped updates never are).
    pub fn to_grid(&self, x: f32) -> i64 {
        // `as` saturates and maps NaN to 0; clipped updates are finite and ≤ C.
        (f64::from(x) * self.steps_per_clip / self.clip_norm).round() as i64
    }

    /// Sensitivity `Δ` of the integer sum, in grid units: the largest L2 norm of one
    /// rounded update, `(G + √d / 2)(1 + 10⁻⁶)`.
    pub fn sensitivity(&self) -> f64 {
        self.sensitivity
    }

    /// The same in real units, `Δ₂ = γ Δ` (at most `1.01 C` plus the margin).
    pub fn sensitivity_real(&self) -> f64 {
        self.sensitivity * self.step
    }

    /// The noise standard deviation parameter in real units, `γ σ_z`, that a release with
    /// noise multiplier `z` adds (what `NoisedSum::noise_std` reports, before its cast to
    /// `f32`): `z Δ₂` rounded up by the `σ_z²` fraction. 0 for `z = 0`.
    pub fn noise_std(&self, noise_multiplier: f64) -> Result<f64, DiscreteNoiseError> {
        Ok(self.noise(noise_multiplier)?.map_or(0.0, |dg| dg.sigma() * self.step))
    }

    /// The per-coordinate noise for noise multiplier `z` relative to [`Grid::sensitivity`]:
    /// `N_Z(0, σ_z²)` with `σ_z² ≥ (z Δ)²`, or `None` when `z = 0`.
    pub fn noise(&self, noise_multiplier: f64) -> Result<Option<DiscreteGaussian>, DiscreteNoiseError> {
        noise_for(noise_multiplier, self.sensitivity)
    }
}

/// Noise for an integer count of sensitivity 1 (one device adds at most 1), such as the
/// adaptive-clipping bit sum: `N_Z(0, σ²)` with `σ ≥ noise_multiplier`, or `None` for 0.
pub fn count_noise(noise_multiplier: f64) -> Result<Option<DiscreteGaussian>, DiscreteNoiseError> {
    noise_for(noise_multiplier, 1.0)
}

fn noise_for(
    noise_multiplier: f64,
    sensitivity: f64,
) -> Result<Option<DiscreteGaussian>, DiscreteNoiseError> {
    if !(noise_multiplier >= 0.0 && noise_multiplier.is_finite()) {
        return Err(DiscreteNoiseError::NoiseMultiplier(noise_multiplier));
    }
    if noise_multiplier == 0.0 {
        return Ok(None);
    }
    // One more relative margin for the product; at_least rounds σ² up again.
    DiscreteGaussian::at_least(noise_multiplier * sensitivity * (1.0 + f64::powi(2.0, -40))).map(Some)
}

/// Bernoulli(exp(−num/den)) for any non-negative rational (CKS 2020, Algorithm 1).
/// Refuses `den = 0`.
pub fn sample_bernoulli_exp<R: Rng + ?Sized>(
    rng: &mut R,
    num: u128,
    den: u128,
) -> Result<bool, DiscreteNoiseError> {
    if den == 0 {
        return Err(DiscreteNoiseError::Rational { num, den });
    }
    Ok(bernoulli_exp(rng, num, den))
}

/// Discrete Laplace with scale `t ≥ 1`: `P[Y = y] ∝ exp(−|y| / t)` for every integer `y`
/// (CKS 2020, Algorithm 2 with `s = 1`). Refuses `t = 0`.
pub fn sample_discrete_laplace<R: Rng + ?Sized>(rng: &mut R, t: u64) -> Result<i128, DiscreteNoiseError> {
    if t == 0 {
        return Err(DiscreteNoiseError::Rational { num: 1, den: 0 });
    }
    Ok(discrete_laplace(rng, u128::from(t)))
}

/// Bernoulli(num/den) for `num ≤ den`, `den ≥ 1`: one uniform integer below `den`.
pub fn sample_bernoulli<R: Rng + ?Sized>(
    rng: &mut R,
    num: u128,
    den: u128,
) -> Result<bool, DiscreteNoiseError> {
    if den == 0 || num > den {
        return Err(DiscreteNoiseError::Rational { num, den });
    }
    Ok(bernoulli(rng, num, den))
}

/// Uniform on `{0, …, n − 1}` (`n ≥ 1`) by rejection from the smallest power of two above it.
fn uniform_below<R: Rng + ?Sized>(rng: &mut R, n: u128) -> u128 {
    debug_assert!(n >= 1);
    if n == 1 {
        return 0;
    }
    let bits = 128 - (n - 1).leading_zeros();
    loop {
        let x = if bits <= 64 {
            u128::from(rng.next_u64()) >> (64 - bits)
        } else {
            ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())) >> (128 - bits)
        };
        if x < n {
            return x;
        }
    }
}

/// Bernoulli(num/den), `num ≤ den`, `den ≥ 1`.
fn bernoulli<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    uniform_below(rng, den) < num
}

/// Bernoulli(exp(−num/den)) (CKS 2020, Algorithm 1): for `γ > 1`, `exp(−γ)` is
/// `exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋))`, a conjunction of independent draws.
fn bernoulli_exp<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut whole = num / den;
    while whole > 0 {
        if !bernoulli_exp_at_most_one(rng, 1, 1) {
            return false;
        }
        whole -= 1;
    }
    bernoulli_exp_at_most_one(rng, num % den, den)
}

/// Bernoulli(exp(−γ)) for `γ = num/den ∈ [0, 1]` (CKS 2020, Algorithm 1, first branch):
/// `K ← 1`; while Bernoulli(γ/K) succeeds, `K ← K + 1`; return whether `K` is odd.
/// Bernoulli(γ/K) is drawn as Bernoulli(γ) ∧ Bernoulli(1/K), which needs no product that
/// could overflow.
fn bernoulli_exp_at_most_one<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    while bernoulli(rng, num, den) && bernoulli(rng, 1, k) {
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(−a² / b)) for `a < 2¹²⁸`, `b ≥ 1`: the integer part of `a² / b` (up to
/// 2²⁵⁶) is spent as that many Bernoulli(exp(−1)) draws, stopping at the first failure, and
/// the fractional part as one more draw (CKS 2020, Algorithm 1).
fn bernoulli_exp_square_over<R: Rng + ?Sized>(rng: &mut R, a: u128, b: u128) -> bool {
    let (mut whole_hi, mut whole_lo, rem) = if a <= u128::from(u64::MAX) {
        let sq = a * a;
        (0, sq / b, sq % b)
    } else {
        let (hi, lo) = mul_wide(a, a);
        div_rem_wide(hi, lo, b)
    };
    while whole_hi != 0 || whole_lo != 0 {
        if !bernoulli_exp_at_most_one(rng, 1, 1) {
            return false;
        }
        if whole_lo == 0 {
            whole_hi -= 1;
            whole_lo = u128::MAX;
        } else {
            whole_lo -= 1;
        }
    }
    bernoulli_exp_at_most_one(rng, rem, b)
}

/// Discrete Laplace with scale `t ≥ 1` (CKS 2020, Algorithm 2, `s = 1`).
fn discrete_laplace<R: Rng + ?Sized>(rng: &mut R, t: u128) -> i128 {
    loop {
        // Line 3–5: U uniform on {0, …, t−1}, kept with probability exp(−U/t).
        let u = uniform_below(rng, t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        // Line 6–7: V geometric, P[V = v] = (1 − e⁻¹) e⁻ᵛ.
        let mut v: u128 = 0;
        while bernoulli_exp_at_most_one(rng, 1, 1) {
            v += 1;
        }
        // Line 8–9: X = U + t V (with s = 1, Y = X).
        let Some(x) = t.checked_mul(v).and_then(|tv| tv.checked_add(u)).and_then(|x| i128::try_from(x).ok())
        else {
            // Needs v ≥ 2¹²⁷ / t ≥ 2⁶³ geometric steps: unreachable in any real run.
            continue;
        };
        // Line 10–12: a fair sign; reject (negative, 0) so that 0 is not counted twice.
        let negative = bernoulli(rng, 1, 2);
        if negative && x == 0 {
            continue;
        }
        return if negative { -x } else { x };
    }
}

/// Full 256-bit product `a · b` as `(high, low)`.
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    const LOW: u128 = u64::MAX as u128;
    let (a1, a0) = (a >> 64, a & LOW);
    let (b1, b0) = (b >> 64, b & LOW);
    let (mid, mid_carry) = (a0 * b1).overflowing_add(a1 * b0);
    let (lo, lo_carry) = (a0 * b0).overflowing_add(mid << 64);
    let hi = a1 * b1 + (mid >> 64) + (u128::from(mid_carry) << 64) + u128::from(lo_carry);
    (hi, lo)
}

/// `(hi · 2¹²⁸ + lo) / d` as `(quotient high, quotient low, remainder)`, `d ≥ 1`.
fn div_rem_wide(hi: u128, lo: u128, d: u128) -> (u128, u128, u128) {
    let q_hi = hi / d;
    let mut r = hi % d;
    let mut q_lo = 0u128;
    for i in (0..128).rev() {
        // r < d before the shift, so 2r + 1 < 2d: one subtraction suffices, and a carry out
        // of bit 127 means the true value exceeds d.
        let carry = r >> 127;
        r = (r << 1) | ((lo >> i) & 1);
        if carry == 1 || r >= d {
            r = r.wrapping_sub(d);
            q_lo |= 1 << i;
        }
    }
    (q_hi, q_lo, r)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_arithmetic_matches_u128_where_it_fits_and_known_values_beyond() {
        for (a, b) in
            [(0u128, 5u128), (3, 7), (u128::from(u64::MAX), u128::from(u64::MAX)), (1 << 100, 1 << 27)]
        {
            assert_eq!(mul_wide(a, b), (0, a * b));
        }
        assert_eq!(mul_wide(u128::MAX, u128::MAX), (u128::MAX - 1, 1));
        assert_eq!(mul_wide(1 << 127, 4), (2, 0));
        let (q_hi, q_lo, r) = div_rem_wide(u128::MAX - 1, 1, u128::MAX);
        // (2¹²⁸ − 1)² / (2¹²⁸ − 1) = 2¹²⁸ − 1, remainder 0.
        assert_eq!((q_hi, q_lo, r), (0, u128::MAX, 0));
        let (q_hi, q_lo, r) = div_rem_wide(5, 7, 3);
        // (5 · 2¹²⁸ + 7) / 3: 2¹²⁸ ≡ 1 (mod 3), so the remainder is (5 + 7) mod 3 = 0.
        assert_eq!(q_hi, 1);
        assert_eq!(r, 0);
        let (back_hi, back_lo) = mul_wide(q_lo, 3);
        assert_eq!((back_hi + 3 * q_hi, back_lo), (5, 7));
    }

    #[test]
    fn parameters_are_validated() {
        assert!(matches!(DiscreteGaussian::new(0, 1), Err(DiscreteNoiseError::ZeroSigma { .. })));
        assert!(matches!(DiscreteGaussian::new(1, 0), Err(DiscreteNoiseError::ZeroSigma { .. })));
        assert!(matches!(DiscreteGaussian::new(u64::MAX, 1), Err(DiscreteNoiseError::SigmaTooLarge { .. })));
        let dg = DiscreteGaussian::new(8, 2).expect("σ² = 4");
        assert_eq!(dg.sigma_sq(), (4, 1));
        assert_eq!(dg.t, 3);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 3e9] {
            assert!(DiscreteGaussian::at_least(bad).is_err(), "{bad}");
        }
        let big = DiscreteGaussian::at_least(2.0e9).expect("below MAX_SIGMA");
        assert!(big.sigma() >= 2.0e9);
        assert!(Grid::for_sum(0.0, 10).is_err());
        assert!(Grid::for_sum(1.0, 0).is_err());
        assert!(Grid::for_sum(f32::NAN, 10).is_err());
    }

    #[test]
    fn at_least_rounds_sigma_squared_up_and_not_much() {
        for sigma in [1e-3, 0.1, 0.5, 1.0, 1.1, 1.59, 7.3, 1234.5678, 8_750.0 * 3.7, 3.0e7] {
            let dg = DiscreteGaussian::at_least(sigma).expect("in range");
            let (num, den) = dg.sigma_sq();
            // Exact check in integers where it fits: num ≥ σ² den (σ² den from the f64).
            assert!(num as f64 / den as f64 >= sigma * sigma, "{sigma}");
            if sigma >= 1.0 {
                assert!(dg.sigma() / sigma - 1.0 < 2e-4, "{sigma}: {}", dg.sigma());
            }
        }
    }

    #[test]
    fn grid_bounds_the_rounding_and_the_sensitivity() {
        for (c, d) in [(1.0f32, 1usize), (0.8, 30_000), (1e-4, 1_000_000), (1e6, 7)] {
            let g = Grid::for_sum(c, d).expect("valid");
            let half_sqrt_d = (d as f64).sqrt() / 2.0;
            assert!(g.step() * half_sqrt_d <= GRID_ROUNDING_SHARE * f64::from(c) * (1.0 + 1e-12));
            assert!(g.sensitivity() >= g.steps_per_clip() + half_sqrt_d);
            assert!(g.sensitivity_real() <= f64::from(c) * 1.0101);
            assert_eq!(g.to_grid(c), g.steps_per_clip() as i64);
            assert_eq!(g.to_grid(-c), -(g.steps_per_clip() as i64));
            assert_eq!(g.to_grid(0.0), 0);
        }
    }
}
