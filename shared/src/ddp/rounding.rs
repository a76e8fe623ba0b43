//! Conditional randomised rounding (Kairouz, Liu & Steinke, ICML 2021, §4.1): unbiased stochastic rounding to integers, redrawn until the rounded L2 norm is within the bound the accountant is charged.
//!
//! Each coordinate `z_i` becomes `⌊z_i⌋ + 1` with probability `z_i − ⌊z_i⌋` and `⌊z_i⌋`
//! otherwise, so `E[z̃_i] = z_i` and `|z̃_i − z_i| < 1`. For `‖z‖₂ ≤ c` in `D` dimensions the
//! rounded vector satisfies ([`rounded_l2_bound`]; DDGauss Theorem 1 / Proposition 22)
//!
//! ```text
//! ‖z̃‖₂ ≤ Δ₂ = min( c + √D , √( c² + D/4 + √(2 ln(1/β)) · (c + √D/2) ) )
//! ```
//!
//! the first term always, the second with probability at least `1 − β`. [`conditional_round`]
//! draws again while the exact integer squared norm exceeds `⌊Δ₂²⌋`, at most
//! [`MAX_ROUNDING_ATTEMPTS`] times (all fail with probability at most `β^1000`), and then gives up
//! with [`DdpError::RoundingFailed`]: it never returns a vector above the bound.

use rand::Rng;

use super::DdpError;

/// Draws of the stochastic rounding before [`conditional_round`] gives up.
pub const MAX_ROUNDING_ATTEMPTS: u32 = 1000;

/// Largest `|z_i|` [`conditional_round`] accepts: `2^52`, so that `⌊z_i⌋` is exact in `f64`. The
/// squared norm is summed in `u128` and saturates (and is then refused) only far beyond the
/// grids [`super::DdpParams::validate`] builds (at most `2^40` steps per clip norm).
pub const MAX_COORDINATE: f64 = 4_503_599_627_370_496.0;

/// The bound `Δ₂` on `‖z̃‖₂` for `‖z‖₂ ≤ c` in `padded_dim` dimensions (module documentation).
/// `β = 0` gives the bound that always holds, `c + √D`. `β` must be in `[0, 1)` and `c ≥ 0`
/// (unchecked here; [`super::DdpParams::validate`] checks them).
pub fn rounded_l2_bound(c: f64, padded_dim: usize, beta: f64) -> f64 {
    let sqrt_d = (padded_dim as f64).sqrt();
    let always = c + sqrt_d;
    if beta <= 0.0 {
        return always;
    }
    let whp =
        (c * c + padded_dim as f64 / 4.0 + (2.0 * (1.0 / beta).ln()).sqrt() * (c + sqrt_d / 2.0)).sqrt();
    always.min(whp)
}

/// Rounds `z` by conditional randomised rounding: unbiased stochastic rounding, redrawn while the
/// squared norm (exact, in integers) exceeds `bound_sq`, at most `max_attempts` draws. Refuses a
/// coordinate that is not finite or above [`MAX_COORDINATE`] in magnitude.
pub fn conditional_round<R: Rng + ?Sized>(
    z: &[f64],
    bound_sq: u128,
    rng: &mut R,
    max_attempts: u32,
) -> Result<Vec<i64>, DdpError> {
    if let Some((index, &value)) = z.iter().enumerate().find(|(_, x)| x.is_nan() || x.abs() > MAX_COORDINATE)
    {
        return Err(DdpError::CoordinateTooLarge { index, value });
    }
    let mut out = vec![0i64; z.len()];
    for _ in 0..max_attempts {
        let mut norm_sq = 0u128;
        for (k, &x) in out.iter_mut().zip(z) {
            let floor = x.floor();
            let frac = x - floor;
            // `floor` is an integer of magnitude ≤ 2^52: exact, and the cast is exact.
            *k = floor as i64 + i64::from(frac > 0.0 && rng.random::<f64>() < frac);
            norm_sq = norm_sq.saturating_add(u128::from(k.unsigned_abs()).pow(2));
        }
        if norm_sq <= bound_sq {
            return Ok(out);
        }
    }
    Err(DdpError::RoundingFailed { attempts: max_attempts })
}
