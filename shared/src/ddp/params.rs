//! The parameters of one distributed-DP round: from the public inputs (n, m, d, C, σ, b, β, p) to the grid step γ, the rounded sensitivities, each device's discrete Gaussian share and the modular-clipping bound.
//!
//! Formulas (docs/ddp.md, "Bits, scale and the modular-clipping probability"), with
//! `D = 2^⌈log₂ d⌉`, `L = 2^{b−1} − n` and `k = √(2 ln(2D/p))`:
//!
//! ```text
//! γ      = k · √( n²C²/D + (n/m)·σ²·(1 + 2⁻¹⁰) ) / L           (DDGauss §4.4, Eq. 61)
//! σ_dev² ≥ σ² / (m γ²)                                           (grid units, per device)
//! P[wrap] ≤ 2D · exp( −L² / (2 (n²C²/(Dγ²) + n σ_dev²)) )
//! ```
//!
//! `γ` is never finer than `C / 2^40` nor than `σ / (√m · 2^30)`, so that every integer stays
//! exact and `σ_dev` stays within the exact sampler's range; a coarser `γ` only lowers the wrap
//! probability.

use crate::privacy::discrete::DiscreteGaussian;

use super::DdpError;
use super::rotation::{Rotation, padded_dim};
use super::rounding::rounded_l2_bound;

/// The default bound on the probability that any coordinate of a round's sum wraps.
pub const DEFAULT_WRAP_PROBABILITY: f64 = 1e-9;

/// The `β` of DDGauss's experiments, `e^{−1/2}`: a draw of the rounding is redrawn with
/// probability at most 0.61, and the bound `Δ₂` is close to `√(c² + D/4)`.
pub const DEFAULT_BETA: f64 = 0.606_530_659_712_633_4;

/// Fewest bits per coordinate.
pub const MIN_BITS: u32 = 2;

/// Most bits per coordinate (one `u64` word).
pub const MAX_BITS: u32 = 64;

/// Smallest device noise DDGauss Theorem 1 covers, in grid units.
pub const MIN_DEVICE_SIGMA: f64 = 0.5;

/// Most grid steps per clip norm (`C/γ ≤ 2^40`).
const MAX_STEPS_PER_CLIP: f64 = 1_099_511_627_776.0;

/// Largest device noise `σ_dev` in grid units `γ` is chosen for (`2^30`, below the exact
/// sampler's limit).
const MAX_DEVICE_SIGMA: f64 = 1_073_741_824.0;

/// Relative margin on `σ²` in the choice of `γ`, for the sampler's rounding of `σ_dev²` up onto
/// multiples of `1/4096` (an absolute error: relative at most `2⁻¹⁰` at the smallest allowed
/// `σ_dev = ½`, which this margin covers).
const SIGMA_SQ_MARGIN: f64 = 1.0 / 1024.0;

/// Relative margin on `Δ₂` for the `f64` arithmetic of `⌊Δ₂²⌋`.
const SENSITIVITY_MARGIN: f64 = 1e-9;

/// The public inputs of a distributed-DP round. No `Default`: every value is a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpParams {
    /// Update length `d`.
    pub dim: usize,
    /// L2 clip norm `C` of one update, model units.
    pub clip_norm: f64,
    /// Target standard deviation `σ` of the noise on the sum when exactly `min_reports`
    /// devices survive, model units.
    pub noise_std: f64,
    /// Cohort `n`: the most devices whose inputs can enter one sum.
    pub n_cohort: usize,
    /// `m`: the fewest survivors a round may commit with; each device's share is calibrated so
    /// that `m` shares carry the whole `σ`.
    pub min_reports: usize,
    /// Bits `b` per coordinate of the ring `Z/2^b`.
    pub bits: u32,
    /// Conditional rounding parameter `β ∈ [0, 1)` ([`DEFAULT_BETA`]).
    pub beta: f64,
    /// Target bound `p ∈ (0, 1)` on the probability that a round's sum wraps
    /// ([`DEFAULT_WRAP_PROBABILITY`]).
    pub max_wrap_probability: f64,
    /// The round's 32 public random bytes for the rotation, drawn after the updates are fixed.
    pub rotation_seed: [u8; 32],
}

/// Validated parameters and everything derived from them: the only way to [`super::encode`] and
/// [`super::decode`].
#[derive(Debug, Clone)]
pub struct DdpValidParams {
    params: DdpParams,
    rotation: Rotation,
    grid: DdpGrid,
}

/// The seed-free part of the derived parameters (what the accountant and calibration need).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DdpGrid {
    pub(crate) padded_dim: usize,
    pub(crate) gamma: f64,
    pub(crate) l2: f64,
    pub(crate) l2_sq_floor: u128,
    pub(crate) l1: f64,
    pub(crate) device_noise: DiscreteGaussian,
}

impl DdpParams {
    /// Checks the inputs and derives `γ`, `Δ₂`, `Δ₁` and the device noise.
    ///
    /// Refuses: `d = 0` or too long; `C`, `σ` not positive and finite; `m = 0` or `m > n`;
    /// `b` outside [`MIN_BITS`]`..=`[`MAX_BITS`] or `2^{b−1} ≤ n`; `β ∉ [0, 1)`; `p ∉ (0, 1)`; and
    /// parameters whose device noise falls below [`MIN_DEVICE_SIGMA`] grid units (too few bits
    /// for this cohort and noise).
    pub fn validate(self) -> Result<DdpValidParams, DdpError> {
        let grid = self.grid()?;
        let rotation = Rotation::new(&self.rotation_seed, self.dim)?;
        Ok(DdpValidParams { params: self, rotation, grid })
    }

    /// The checks of [`DdpParams::validate`] that do not involve the noise.
    pub(crate) fn check_static(&self) -> Result<usize, DdpError> {
        let padded = padded_dim(self.dim).ok_or(DdpError::Dim { dim: self.dim })?;
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return Err(DdpError::ClipNorm(self.clip_norm));
        }
        if self.min_reports == 0 || self.min_reports > self.n_cohort {
            return Err(DdpError::Cohort { n_cohort: self.n_cohort, min_reports: self.min_reports });
        }
        if !(MIN_BITS..=MAX_BITS).contains(&self.bits) {
            return Err(DdpError::Bits(self.bits));
        }
        if (self.n_cohort as u128) >= 1u128 << (self.bits - 1) {
            return Err(DdpError::TooFewBits { bits: self.bits, n_cohort: self.n_cohort });
        }
        if !(0.0..1.0).contains(&self.beta) {
            return Err(DdpError::Beta(self.beta));
        }
        if !(self.max_wrap_probability > 0.0 && self.max_wrap_probability < 1.0) {
            return Err(DdpError::WrapProbability(self.max_wrap_probability));
        }
        Ok(padded)
    }

    pub(crate) fn grid(&self) -> Result<DdpGrid, DdpError> {
        let padded = self.check_static()?;
        if !(self.noise_std > 0.0 && self.noise_std.is_finite()) {
            return Err(DdpError::NoiseStd(self.noise_std));
        }
        let (n, m, d) = (self.n_cohort as f64, self.min_reports as f64, padded as f64);
        let (c, sigma) = (self.clip_norm, self.noise_std);
        let k = (2.0 * (2.0 * d / self.max_wrap_probability).ln()).sqrt();
        let room = 2f64.powi(self.bits as i32 - 1) - n;
        let spread = (n * n * c * c / d + n / m * sigma * sigma * (1.0 + SIGMA_SQ_MARGIN)).sqrt();
        let gamma =
            (k * spread / room).max(c / MAX_STEPS_PER_CLIP).max(sigma / (m.sqrt() * MAX_DEVICE_SIGMA));
        if !(gamma > 0.0 && gamma.is_finite()) {
            return Err(DdpError::NoiseStd(self.noise_std));
        }
        let sigma_dev = sigma / (gamma * m.sqrt());
        if sigma_dev < MIN_DEVICE_SIGMA {
            return Err(DdpError::DeviceNoiseTooSmall { sigma_dev });
        }
        let device_noise = DiscreteGaussian::at_least(sigma_dev)?;
        let l2_formula = rounded_l2_bound(c / gamma, padded, self.beta);
        let l2_sq_floor = (l2_formula * l2_formula).floor() as u128;
        let l2 = l2_formula * (1.0 + SENSITIVITY_MARGIN);
        let l1 = (d.sqrt() * l2).min(l2 * l2);
        Ok(DdpGrid { padded_dim: padded, gamma, l2, l2_sq_floor, l1, device_noise })
    }
}

impl DdpGrid {
    /// `σ_dev²` in grid units, from the sampler's exact rational.
    pub(crate) fn device_var(&self) -> f64 {
        let (num, den) = self.device_noise.sigma_sq();
        num as f64 / den as f64
    }
}

impl DdpValidParams {
    /// The inputs these were derived from.
    pub fn params(&self) -> &DdpParams {
        &self.params
    }

    /// The round's rotation.
    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    /// Update length `d`.
    pub fn dim(&self) -> usize {
        self.params.dim
    }

    /// Padded length `D`: the number of words a device sends.
    pub fn padded_dim(&self) -> usize {
        self.grid.padded_dim
    }

    /// Bits `b` per word.
    pub fn bits(&self) -> u32 {
        self.params.bits
    }

    /// The grid step `γ` in model units (the scale is `1/γ`).
    pub fn gamma(&self) -> f64 {
        self.grid.gamma
    }

    /// The rounded L2 sensitivity `Δ₂` in grid units (with a `10⁻⁹` margin): no encoding has a
    /// larger norm before its noise.
    pub fn l2_sensitivity(&self) -> f64 {
        self.grid.l2
    }

    /// `⌊Δ₂²⌋` (before the margin): the exact bound on an encoding's squared norm.
    pub fn l2_sq_bound(&self) -> u128 {
        self.grid.l2_sq_floor
    }

    /// The rounded L1 sensitivity `Δ₁ = min(√D Δ₂, Δ₂²)` in grid units.
    pub fn l1_sensitivity(&self) -> f64 {
        self.grid.l1
    }

    /// `γ Δ₂ / C`: how much the rounding inflates the sensitivity (1 would be none).
    pub fn sensitivity_inflation(&self) -> f64 {
        self.grid.gamma * self.grid.l2 / self.params.clip_norm
    }

    /// Each device's noise, `N_Z(0, σ_dev²)` in grid units.
    pub fn device_noise(&self) -> &DiscreteGaussian {
        &self.grid.device_noise
    }

    /// `σ_dev²` in grid units (the sampler's exact parameter, at least `σ²/(mγ²)`).
    pub fn device_var(&self) -> f64 {
        self.grid.device_var()
    }

    /// The standard deviation parameter, in model units, of the noise that `n_survivors`
    /// devices added together: `γ √(n' σ_dev²)` (what the ledger should record). At least the
    /// target `σ` when `n' ≥ m`.
    pub fn survivor_noise_std(&self, n_survivors: usize) -> f64 {
        self.grid.gamma * (n_survivors as f64 * self.grid.device_var()).sqrt()
    }

    /// The bound on the probability that any coordinate of a sum of at most `n` encodings wraps
    /// mod `2^b`: `2D exp(−L²/(2v))` with `L = 2^{b−1} − n`, `v = n²C²/(Dγ²) + n σ_dev²`
    /// (at most `p` by the choice of `γ`).
    pub fn wrap_probability_bound(&self) -> f64 {
        let n = self.params.n_cohort as f64;
        let d = self.grid.padded_dim as f64;
        let room = 2f64.powi(self.params.bits as i32 - 1) - n;
        let c = self.params.clip_norm / self.grid.gamma;
        let v = n * n * c * c / d + n * self.grid.device_var();
        (2.0 * d * (-room * room / (2.0 * v)).exp()).min(1.0)
    }
}
