//! Distributed differential privacy (issue 12): each device rotates, scales, rounds and noises its clipped update and wraps it to `b` bits, so that the sum secure aggregation reveals already carries the noise; the coordinator unwraps, unscales and unrotates it. The mechanism and its citations are in `docs/ddp.md`.
//!
//! The pipeline, after Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for
//! Federated Learning with Secure Aggregation" (ICML 2021):
//!
//! - device, [`encode`]: clip to `C`; pad to `D = 2^⌈log₂ d⌉` and rotate by the randomised
//!   Hadamard transform of the round's public seed ([`rotation`], §4.2); scale by `1/γ`;
//!   conditional randomised rounding to integers within `Δ₂` ([`rounding`], §4.1); add the
//!   device's share `N_Z(0, σ_dev²)` of exact discrete Gaussian noise (Canonne, Kamath &
//!   Steinke 2020), calibrated so that `min_reports` shares carry the target `σ`
//!   ([`params`]); wrap mod `2^b` (§4.3).
//! - coordinator, [`decode`]: the centred lift of the unmasked sum, times `γ`, inverse
//!   rotation, padding dropped.
//! - [`accountant`]: the privacy of a round's sum (Theorem 1 and Proposition 14 of the paper;
//!   Poisson subsampling by Zhu & Wang 2019) and the calibration of `σ`.
//!
//! No ambient randomness: the rotation comes from a seed, the rounding and the noise from the
//! `CryptoRng` passed in.

use rand::{CryptoRng, RngCore};
use thiserror::Error;

use crate::privacy::PrivacyError;
use crate::privacy::discrete::DiscreteNoiseError;

pub mod accountant;
pub mod params;
pub mod rotation;
pub mod rounding;

pub use accountant::{DdpEvent, noise_for};
pub use params::{DdpParams, DdpValidParams};
pub use rotation::Rotation;

/// Why a distributed-DP operation was refused.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum DdpError {
    /// An update length of 0, above [`rotation::MAX_DIM`], or (for [`rotation::fwht`]) not a
    /// power of two.
    #[error("unsupported vector length {dim}")]
    Dim {
        /// The length given.
        dim: usize,
    },
    /// A vector of the wrong length.
    #[error("expected a vector of length {expected}, got {got}")]
    UpdateLength {
        /// The length the parameters need.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// An update coordinate that is NaN or infinite.
    #[error("update coordinate {index} is not finite")]
    NonFinite {
        /// Index in the update.
        index: usize,
    },
    /// A clip norm that is not positive and finite.
    #[error("clip norm must be positive and finite, got {0}")]
    ClipNorm(f64),
    /// A target noise that is not positive and finite.
    #[error("noise standard deviation must be positive and finite, got {0}")]
    NoiseStd(f64),
    /// `min_reports` of 0 or above the cohort.
    #[error("min_reports {min_reports} must be in 1..=n_cohort ({n_cohort})")]
    Cohort {
        /// The cohort size.
        n_cohort: usize,
        /// The minimum number of reports.
        min_reports: usize,
    },
    /// Bits outside [`params::MIN_BITS`]`..=`[`params::MAX_BITS`].
    #[error("bits {0} outside {min}..={max}", min = params::MIN_BITS, max = params::MAX_BITS)]
    Bits(u32),
    /// `2^{b−1} ≤ n`: the rounding errors of the cohort alone could wrap.
    #[error("{bits} bits cannot hold the sum of a cohort of {n_cohort}: need 2^(bits-1) > n_cohort")]
    TooFewBits {
        /// The bits asked for.
        bits: u32,
        /// The cohort size.
        n_cohort: usize,
    },
    /// `β` outside `[0, 1)`.
    #[error("beta must be in [0, 1), got {0}")]
    Beta(f64),
    /// A wrap probability target outside `(0, 1)`.
    #[error("the wrap probability bound must be in (0, 1), got {0}")]
    WrapProbability(f64),
    /// A sensitivity that is not positive and finite.
    #[error("sensitivity must be positive and finite, got {0}")]
    Sensitivity(f64),
    /// The device noise would be below `1/2` grid unit (DDGauss Theorem 1 needs at least that):
    /// too few bits for this cohort and noise.
    #[error("device noise sigma {sigma_dev} grid units is below 1/2: use more bits or fewer devices")]
    DeviceNoiseTooSmall {
        /// `σ_dev` in grid units.
        sigma_dev: f64,
    },
    /// The exact sampler refused the device noise.
    #[error(transparent)]
    Noise(#[from] DiscreteNoiseError),
    /// Every draw of the conditional rounding was above the bound (probability at most
    /// `β^attempts`: in practice a broken RNG).
    #[error("conditional rounding failed {attempts} times")]
    RoundingFailed {
        /// Draws made.
        attempts: u32,
    },
    /// A scaled coordinate too large (or not finite) to round exactly.
    #[error("scaled coordinate {index} is {value}, too large to round exactly")]
    CoordinateTooLarge {
        /// Index in the rotated vector.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A ring element not below `2^b`.
    #[error("ring element {value} at index {index} is not below 2^{bits}")]
    NotInRing {
        /// Index in the vector.
        index: usize,
        /// The value.
        value: u64,
        /// The ring width.
        bits: u32,
    },
    /// A sum of survivors outside `min_reports..=n_cohort`: fewer than `min_reports` do not carry
    /// the target noise, more than the cohort may have wrapped.
    #[error("{n_survivors} survivors outside min_reports ({min_reports}) ..= cohort ({n_cohort})")]
    Survivors {
        /// Survivors given.
        n_survivors: usize,
        /// The fewest allowed.
        min_reports: usize,
        /// The most allowed.
        n_cohort: usize,
    },
    /// The accountant refused its inputs.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
}

/// The device's encoding of `update`: clipped to `C`, rotated, scaled by `1/γ`, rounded
/// conditionally within `Δ₂`, noised with `N_Z(0, σ_dev²)` per coordinate and wrapped mod `2^b`.
/// `D` words, each below `2^b`, ready for masking.
///
/// Refuses an update of the wrong length or with a non-finite coordinate, and fails with
/// [`DdpError::RoundingFailed`] if the rounding never meets its bound.
pub fn encode<R: RngCore + CryptoRng + ?Sized>(
    update: &[f32],
    params: &DdpValidParams,
    rng: &mut R,
) -> Result<Vec<u64>, DdpError> {
    let rounded = encode_rounded(update, params, rng)?;
    let noise = params.device_noise();
    let mask = ring_mask(params.bits());
    Ok(rounded
        .iter()
        .map(|&k| {
            // Wrapping in i128 then truncating to u64 is exact mod 2^64, hence mod 2^b.
            (i128::from(k).wrapping_add(noise.sample(rng)) as u64) & mask
        })
        .collect())
}

/// The steps of [`encode`] before the noise: the clipped, rotated, scaled and conditionally
/// rounded update, `D` integers of squared norm at most [`DdpValidParams::l2_sq_bound`]. For
/// tests and audits; a device must send [`encode`]'s output.
pub fn encode_rounded<R: RngCore + CryptoRng + ?Sized>(
    update: &[f32],
    params: &DdpValidParams,
    rng: &mut R,
) -> Result<Vec<i64>, DdpError> {
    let clipped = clip(update, params)?;
    let mut z = params.rotation().forward(&clipped)?;
    let inv_gamma = 1.0 / params.gamma();
    z.iter_mut().for_each(|x| *x *= inv_gamma);
    rounding::conditional_round(&z, params.l2_sq_bound(), rng, rounding::MAX_ROUNDING_ATTEMPTS)
}

/// `update` in `f64`, scaled down to L2 norm `C` if it is longer (the clipping `encode` applies).
pub fn clip(update: &[f32], params: &DdpValidParams) -> Result<Vec<f64>, DdpError> {
    if update.len() != params.dim() {
        return Err(DdpError::UpdateLength { expected: params.dim(), got: update.len() });
    }
    if let Some(index) = update.iter().position(|x| !x.is_finite()) {
        return Err(DdpError::NonFinite { index });
    }
    let mut x: Vec<f64> = update.iter().map(|&v| f64::from(v)).collect();
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let c = params.params().clip_norm;
    if norm > c {
        let s = c / norm;
        x.iter_mut().for_each(|v| *v *= s);
    }
    Ok(x)
}

/// The coordinator's decoding of the unmasked sum of `n_survivors` encodings: the centred lift
/// of each word, times `γ`, the inverse rotation, the padding dropped. The result is the sum of
/// the survivors' clipped updates plus their rounding errors and noise.
///
/// Refuses a sum of the wrong length or with a word not below `2^b`, and `n_survivors` outside
/// `min_reports..=n_cohort`: fewer shares than `min_reports` carry less than the target noise,
/// and such a sum must not be released.
pub fn decode(sum: &[u64], params: &DdpValidParams, n_survivors: usize) -> Result<Vec<f32>, DdpError> {
    let p = params.params();
    if n_survivors < p.min_reports || n_survivors > p.n_cohort {
        return Err(DdpError::Survivors { n_survivors, min_reports: p.min_reports, n_cohort: p.n_cohort });
    }
    let lifted = unwrap_centred(sum, params.bits())?;
    decode_centred(&lifted, params, n_survivors)
}

/// [`decode`] of a sum already lifted to signed integers (the centred lift of the ring sum,
/// as secure aggregation's unmasking returns it). Same checks as [`decode`].
pub fn decode_centred(
    lifted: &[i64],
    params: &DdpValidParams,
    n_survivors: usize,
) -> Result<Vec<f32>, DdpError> {
    let p = params.params();
    if n_survivors < p.min_reports || n_survivors > p.n_cohort {
        return Err(DdpError::Survivors { n_survivors, min_reports: p.min_reports, n_cohort: p.n_cohort });
    }
    if lifted.len() != params.padded_dim() {
        return Err(DdpError::UpdateLength { expected: params.padded_dim(), got: lifted.len() });
    }
    let gamma = params.gamma();
    let scaled: Vec<f64> = lifted.iter().map(|&k| k as f64 * gamma).collect();
    Ok(params.rotation().inverse(&scaled)?.into_iter().map(|v| v as f32).collect())
}

/// The centred lift of elements of `Z/2^b`: `x ≥ 2^{b−1}` stands for `x − 2^b`. Refuses bits
/// outside [`params::MIN_BITS`]`..=`[`params::MAX_BITS`] and elements not below `2^b`.
pub fn unwrap_centred(v: &[u64], bits: u32) -> Result<Vec<i64>, DdpError> {
    if !(params::MIN_BITS..=params::MAX_BITS).contains(&bits) {
        return Err(DdpError::Bits(bits));
    }
    let mask = ring_mask(bits);
    let half = 1u64 << (bits - 1);
    v.iter()
        .enumerate()
        .map(|(index, &x)| {
            if x & !mask != 0 {
                return Err(DdpError::NotInRing { index, value: x, bits });
            }
            // Setting the bits above b gives x − 2^b in two's complement.
            Ok(if x >= half { (x | !mask) as i64 } else { x as i64 })
        })
        .collect()
}

/// `acc += v` in `Z/2^b` element by element, what secure aggregation computes. Refuses bits out
/// of range, vectors of different lengths and elements not below `2^b`; `acc` is then unchanged.
pub fn add_wrapped(acc: &mut [u64], v: &[u64], bits: u32) -> Result<(), DdpError> {
    if !(params::MIN_BITS..=params::MAX_BITS).contains(&bits) {
        return Err(DdpError::Bits(bits));
    }
    if acc.len() != v.len() {
        return Err(DdpError::UpdateLength { expected: acc.len(), got: v.len() });
    }
    let mask = ring_mask(bits);
    for w in [&*acc, v] {
        if let Some((index, &value)) = w.iter().enumerate().find(|&(_, &x)| x & !mask != 0) {
            return Err(DdpError::NotInRing { index, value, bits });
        }
    }
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = a.wrapping_add(x) & mask;
    }
    Ok(())
}

/// `2^b − 1` for `b ∈ 1..=64`.
fn ring_mask(bits: u32) -> u64 {
    u64::MAX >> (64 - bits)
}
