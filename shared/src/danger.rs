//! Footguns that weaken privacy, kept out of the way: seeded randomness for reproducible simulations.
//!
//! Noise drawn from a seeded generator is reproducible, and so is removable by anyone who
//! knows the seed. Production paths must seed from the operating system instead.

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

/// A deterministic RNG for simulations and tests. **Never use it for noise in production.**
pub fn seeded_rng(seed: u64) -> ChaCha12Rng {
    ChaCha12Rng::seed_from_u64(seed)
}
