//! What one round costs, and its inverse: the noise a round needs for a target budget.
//!
//! A round may release two Gaussian queries on the same Poisson sample: the update sum, with
//! noise multiplier `z`, and (under adaptive clipping) the count of unclipped updates, with
//! noise `σ_b` on a sum of sensitivity 1. Together they are one Gaussian query with
//! `z_c = (z⁻² + σ_b⁻²)^(−½)`, and that combined multiplier is what a round is charged:
//! [`combined_noise_multiplier`] goes forward, and [`update_noise_multiplier`] back: after
//! [`super::calibrate_noise`] found the combined multiplier a budget needs, it gives the
//! update's share. The coordinator's ledger,
//! the device's record and the simulator all price rounds with these functions.

use super::PrivacyError;
use super::rdp::{self, DEFAULT_ORDERS};
use crate::ledger::LedgerEntry;
use crate::round::{CoordinatorConfig, Selection};

/// The noise multiplier a round with update noise `noise_multiplier` and clip-bit noise
/// `clip_bits_noise` (when adaptive clipping adds one) is charged: `(z⁻² + σ_b⁻²)^(−½)`, or
/// `z` alone. Zero means the round is not private: no update noise, or a clip-bit count
/// released without noise.
pub fn combined_noise_multiplier(noise_multiplier: f64, clip_bits_noise: Option<f64>) -> f64 {
    if noise_multiplier <= 0.0 {
        return 0.0;
    }
    match clip_bits_noise {
        None => noise_multiplier,
        Some(zb) if zb <= 0.0 => 0.0,
        Some(zb) => (noise_multiplier.powi(-2) + zb.powi(-2)).powf(-0.5),
    }
}

/// The inverse of [`combined_noise_multiplier`]: the update noise multiplier `(z_c⁻² − σ_b⁻²)^(−½)`
/// that, combined with clip-bit noise `clip_bits_noise`, is charged `combined`.
///
/// Errors with [`PrivacyError::NoiseMultiplier`] unless `combined` is positive and finite
/// and `clip_bits_noise` finite and above it (the bits alone would already cost more).
pub fn update_noise_multiplier(combined: f64, clip_bits_noise: f64) -> Result<f64, PrivacyError> {
    if !(combined > 0.0 && combined.is_finite()) {
        return Err(PrivacyError::NoiseMultiplier(combined));
    }
    if !(clip_bits_noise.is_finite() && clip_bits_noise > combined) {
        return Err(PrivacyError::NoiseMultiplier(clip_bits_noise));
    }
    Ok((combined.powi(-2) - clip_bits_noise.powi(-2)).powf(-0.5))
}

/// One round's RDP curve over [`DEFAULT_ORDERS`] for sampling probability `q` and (combined)
/// noise multiplier `noise_multiplier`; `∞` at every order without noise (`q > 0`), and
/// wherever the inputs are refused, so that a bad input can only over-charge.
pub fn round_rdp(q: f64, noise_multiplier: f64) -> Vec<f64> {
    DEFAULT_ORDERS
        .iter()
        .map(|&order| rdp::rdp_sampled_gaussian(q, noise_multiplier, order).unwrap_or(f64::INFINITY))
        .collect()
}

impl CoordinatorConfig {
    /// The combined noise multiplier one round of this configuration is charged
    /// ([`combined_noise_multiplier`] of the update's and the clip bits' noise); zero when
    /// its rounds are not private.
    pub fn charged_noise_multiplier(&self) -> f64 {
        combined_noise_multiplier(
            f64::from(self.noise_multiplier),
            self.adaptive_clip.map(|a| f64::from(a.count_noise_multiplier)),
        )
    }

    /// The ledger entry one committed round `round` of this configuration makes, if it makes
    /// one: Poisson selection with noise.
    pub fn round_charge(&self, round: u64) -> Option<LedgerEntry> {
        let z = self.charged_noise_multiplier();
        match self.selection {
            Selection::Poisson { q } if z > 0.0 => Some(LedgerEntry {
                round,
                q,
                noise_multiplier: z,
                clip_bits_noise: self.adaptive_clip.map(|a| f64::from(a.count_noise_multiplier)),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_undoes_the_combination() {
        for (z, zb) in [(0.7, 1.3), (1.0, 5.0), (3.0, 3.0001), (0.2, 40.0)] {
            let c = combined_noise_multiplier(z, Some(zb));
            assert!(c < z, "combining can only lower the multiplier: {z}, {zb} → {c}");
            let back = update_noise_multiplier(c, zb).expect("zb > c");
            assert!(((back - z) / z).abs() < 1e-12, "{z}, {zb} → {c} → {back}");
        }
        assert_eq!(combined_noise_multiplier(1.5, None), 1.5);
        assert_eq!(combined_noise_multiplier(0.0, Some(2.0)), 0.0);
        assert_eq!(combined_noise_multiplier(1.0, Some(0.0)), 0.0);
        assert!(update_noise_multiplier(1.0, 1.0).is_err());
        assert!(update_noise_multiplier(0.0, 2.0).is_err());
        assert!(update_noise_multiplier(1.0, f64::INFINITY).is_err());
    }

    #[test]
    fn calibrated_update_noise_meets_the_target_with_the_bits() {
        use super::super::AccountantKind;
        let (eps, delta, q, steps) = (2.0, 1e-6, 0.05, 50);
        let kind = AccountantKind::Rdp;
        let combined = super::super::calibrate_noise(eps, delta, q, steps, kind).expect("reachable");
        let z = update_noise_multiplier(combined, 4.0).expect("bits noisier than the target");
        let charged = combined_noise_multiplier(z, Some(4.0));
        let events = [super::super::PrivacyEvent::new(q, charged, steps).expect("valid")];
        let spent = super::super::epsilon(&events, delta, kind).expect("valid");
        assert!(spent <= eps, "{spent} > {eps}");
        // Without the bits the update needs less noise.
        assert!(combined < z, "{combined} vs {z}");
    }

    #[test]
    fn a_round_without_noise_costs_infinity() {
        assert!(round_rdp(0.1, 0.0).iter().all(|r| r.is_infinite()));
        assert!(round_rdp(0.0, 0.0).iter().all(|&r| r == 0.0));
        // With noise every order costs something, and the integer orders a finite amount.
        let curve = round_rdp(0.1, 1.0);
        assert!(curve.iter().all(|r| *r > 0.0));
        assert!(DEFAULT_ORDERS.iter().zip(&curve).all(|(a, r)| a.fract() != 0.0 || r.is_finite()));
    }
}
