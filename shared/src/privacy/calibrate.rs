//! Noise calibration: the smallest noise multiplier whose accounted ε meets a target.
//!
//! ε falls as the noise multiplier σ grows, so the search doubles or halves σ from 1 until it
//! brackets the target, then bisects in log space until the bracket is narrower than
//! [`RELATIVE_TOLERANCE`]. It returns the bracket's upper end: a σ that meets the target,
//! at most that much larger than the smallest one that does.

use super::{AccountantKind, PrivacyError, PrivacyEvent, check_delta, check_q, epsilon};

/// The smallest noise multiplier calibration returns. Below it no useful privacy remains; if
/// it already meets the target, calibration returns it.
pub const SIGMA_MIN: f64 = 0.1;

/// The largest noise multiplier calibration tries before reporting the target unreachable.
pub const SIGMA_MAX: f64 = 1e6;

/// Relative width of the final bracket: the result exceeds the smallest noise multiplier
/// meeting the target by at most this fraction.
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

/// The smallest noise multiplier (to [`RELATIVE_TOLERANCE`]) for which `steps` rounds with
/// sampling probability `q` are (`target_epsilon`, `delta`)-DP under `accountant`.
///
/// Errors on invalid inputs, with [`PrivacyError::NothingToCalibrate`] when `q = 0` or
/// `steps = 0`, and with [`PrivacyError::Unreachable`] when even [`SIGMA_MAX`] misses.
pub fn calibrate_noise(
    target_epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
    accountant: AccountantKind,
) -> Result<f64, PrivacyError> {
    check_delta(delta)?;
    check_q(q)?;
    if q == 0.0 || steps == 0 {
        return Err(PrivacyError::NothingToCalibrate);
    }
    calibrate_noise_with(target_epsilon, |sigma| {
        epsilon(&[PrivacyEvent::new(q, sigma, steps)?], delta, accountant)
    })
}

/// [`calibrate_noise`] for any accountant: `epsilon_of` maps a noise multiplier to its ε and
/// must be non-increasing. A [`PrivacyError::PldTooLarge`] from it counts as an infinite ε
/// (PLDs grow with ε), which can only push the result up, never below what the target needs.
pub fn calibrate_noise_with<F>(target_epsilon: f64, mut epsilon_of: F) -> Result<f64, PrivacyError>
where
    F: FnMut(f64) -> Result<f64, PrivacyError>,
{
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(PrivacyError::Epsilon(target_epsilon));
    }
    let mut meets = |sigma: f64| match epsilon_of(sigma) {
        Ok(eps) => Ok(eps <= target_epsilon),
        Err(PrivacyError::PldTooLarge { .. }) => Ok(false),
        Err(e) => Err(e),
    };

    // Bracket: lo misses the target, hi meets it.
    let (mut lo, mut hi) = (1.0, 1.0);
    if meets(hi)? {
        loop {
            lo = (hi / 2.0).max(SIGMA_MIN);
            if !meets(lo)? {
                break;
            }
            if lo <= SIGMA_MIN {
                return Ok(SIGMA_MIN);
            }
            hi = lo;
        }
    } else {
        loop {
            hi = (lo * 2.0).min(SIGMA_MAX);
            if meets(hi)? {
                break;
            }
            if hi >= SIGMA_MAX {
                return Err(PrivacyError::Unreachable {
                    target_epsilon,
                    noise_multiplier: SIGMA_MAX,
                    epsilon: epsilon_of(SIGMA_MAX).unwrap_or(f64::INFINITY),
                });
            }
            lo = hi;
        }
    }

    while hi / lo - 1.0 > RELATIVE_TOLERANCE {
        let mid = (lo * hi).sqrt();
        if meets(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}
