//! Footguns that weaken privacy, kept out of the way: seeded randomness for reproducible simulations, and a deliberately weakened noise release for privacy audits.
//!
//! Noise drawn from a seeded generator is reproducible, and so is removable by anyone who
//! knows the seed. Production paths must seed from the operating system instead.

use rand::SeedableRng;
use rand_chacha::{ChaCha12Rng, ChaCha20Rng};

/// A deterministic RNG for simulations and tests. **Never use it for noise in production.**
pub fn seeded_rng(seed: u64) -> ChaCha12Rng {
    ChaCha12Rng::seed_from_u64(seed)
}

/// A deterministic generator for a simulated device's secure-aggregation secrets (keys,
/// self-mask seed, shares, rounding). **Never on a real device:** whoever knows the seed can
/// unmask its input.
pub fn seeded_device_rng(seed: [u8; 32]) -> ChaCha20Rng {
    ChaCha20Rng::from_seed(seed)
}

/// **Breaks the privacy guarantee on purpose.** Divides the noise of every later release of
/// `coordinator` by `divisor` while its ledger keeps charging the configured noise, so the
/// accountant's ε no longer holds. It exists to show that a privacy audit
/// (`fedrec-sim audit --danger-weaken-noise`) catches a mechanism that adds less noise than
/// it claims; nothing else may call it.
///
/// Fails for a divisor that is not finite or is below 1 (that would add noise, not remove it).
pub fn weaken_release_noise<R: rand::Rng + rand::CryptoRng>(
    coordinator: &mut crate::round::Coordinator<R>,
    divisor: f32,
) -> Result<(), crate::error::ParamError> {
    if !(divisor.is_finite() && divisor >= 1.0) {
        return Err(crate::error::ParamError::new(
            "divisor",
            format!("must be finite and ≥ 1, got {divisor}"),
        ));
    }
    coordinator.weaken_release_noise(divisor);
    Ok(())
}
