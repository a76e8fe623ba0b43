//! Footguns that weaken privacy, kept out of the way: a seeded coordinator RNG, so that a simulation over real QUIC reproduces an in-process run.
//!
//! The coordinator's RNG draws the Poisson selection and the noise. Seeded, both are
//! reproducible by anyone who knows the seed, so the noise can be subtracted: the
//! `fedrec-coordinator` binary never calls anything here.

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::server::ServeConfig;

/// Makes the server seed its coordinator's RNG with `seed` instead of drawing it from the
/// operating system. The stream equals [`fedrec_shared::danger::seeded_rng`]`(seed)`'s, so a
/// server seeded like an in-process simulation selects and adds noise exactly like it.
/// **Never use it for a deployment: the noise no longer protects anyone.**
pub fn seed_coordinator_rng(cfg: &mut ServeConfig, seed: u64) {
    cfg.insecure_seed = Some(seed);
}

/// The seeded generator behind [`seed_coordinator_rng`].
pub(crate) fn seeded_std_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use rand::RngCore;

    use super::*;

    #[test]
    fn the_seeded_server_rng_draws_the_same_stream_as_the_simulators() {
        let mut server = seeded_std_rng(0x5eed);
        let mut sim = fedrec_shared::danger::seeded_rng(0x5eed);
        for _ in 0..1000 {
            assert_eq!(server.next_u64(), sim.next_u64());
        }
    }
}
