//! What the PostgreSQL fail-over and migration tests share: a Poisson-sampled, noised configuration of a 40 × 4 model, its devices' ratings, the states after central then distributed rounds (both kinds of ledger charge), devices that keep taking part against a `serve` process, and its `round N committed` lines.

use std::time::Duration;

use fedrec_client::net::{Device, Participation};
use tokio::task::JoinHandle;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::harness::{Federation, HarnessConfig};
use fedrec_shared::round::secure::SecurePolicy;
use fedrec_shared::round::{
    Coordinator, CoordinatorConfig, CoordinatorEvent, CoordinatorState, DistributedNoise, SecureAggregation,
    Selection,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, TrainParams};

use crate::{low_rank_ratings, net_config, ratings_by_user};

/// The model's shape.
pub const SHAPE: ModelShape = ModelShape { n_items: 40, dim: 4, n_segments: 2 };

/// Poisson selection with noise, so that the ledger fills.
pub fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        train: TrainParams {
            objective: Objective::Explicit,
            l2_user: 0.5,
            l2_user_bias: 0.1,
            l2_item: 0.01,
            l2_item_bias: 0.01,
            user_support_exponent: 0.0,
        },
        optimizer: ServerOptimizer::adam(0.05),
        selection: Selection::Poisson { q: 0.5 },
        min_reports: 2,
        population: Some(30),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 2.0,
        adaptive_clip: None,
        noise_multiplier: 1.0,
        centroids: CentroidPolicy::with_min_count(1.0),
        privacy: None,
        secure: None,
    }
}

/// Ratings of `n_users` devices, drawn from a rank-3 model of the catalogue.
pub fn ratings(n_users: usize) -> Vec<Vec<Rating>> {
    ratings_by_user(n_users, low_rank_ratings(n_users, SHAPE.n_items, 3, 12, 0.1, 11))
}

/// A coordinator's states before the first round and after each of `n_central` central-noise
/// rounds, then (the coordinator restored with distributed noise) `n_distributed` rounds: the
/// ledger holds both kinds of charge.
pub fn history(
    n_central: usize,
    n_distributed: usize,
) -> (CoordinatorState, Vec<(CoordinatorState, CoordinatorEvent)>) {
    let devices = ratings(30);
    let init = ModelInit { factor_std: 0.1, global_mean: 3.0, centroid_scale: 1e-3 };
    let model = GlobalModel::init(SHAPE, init, &mut seeded_rng(1)).expect("valid shape");
    let coordinator = Coordinator::new(config(), model, seeded_rng(2)).expect("valid config");
    let harness = HarnessConfig { dropout: 0.0, n_threads: 1, latency: Duration::from_millis(5) };
    let mut fed = Federation::new(coordinator, &devices, harness, seeded_rng(3));
    let initial = fed.coordinator.state().expect("no round open");
    let mut rounds = Vec::new();
    for _ in 0..n_central {
        let event = fed.run_round().event.expect("the round closed");
        rounds.push((fed.coordinator.state().expect("no round open"), event));
    }
    let mut distributed = config();
    distributed.secure = Some(SecureAggregation {
        dropout: 0.1,
        corrupt: 0.0,
        phase_window: Duration::from_secs(3),
        distributed: Some(DistributedNoise { bits: 16 }),
    });
    let state = fed.coordinator.state().expect("no round open");
    let coordinator = Coordinator::restore(distributed, state, seeded_rng(4)).expect("restores");
    let permissive = SecurePolicy { min_cohort: 1, corrupt: 0.0, log2_security: -40.0 };
    let mut fed =
        Federation::new(coordinator, &devices, harness, seeded_rng(5)).with_secure_policy(permissive);
    for _ in 0..n_distributed {
        let event = fed.run_round().event.expect("the round closed");
        rounds.push((fed.coordinator.state().expect("no round open"), event));
    }
    (initial, rounds)
}

/// Devices participating in a loop against `addr`.
pub fn participate(addr: std::net::SocketAddr, cert: &[u8], tokens: &[Vec<u8>]) -> Vec<JoinHandle<()>> {
    let data = ratings(tokens.len());
    tokens
        .iter()
        .zip(data)
        .map(|(token, train)| {
            let cfg = net_config(addr, cert.to_vec(), token.clone(), SHAPE, Duration::from_secs(5));
            let mut device = Device::new(cfg).expect("the client endpoint binds");
            tokio::spawn(async move {
                loop {
                    let pause = match device.participate(&train).await {
                        Ok(Participation::NotSelected { retry_after }) => {
                            retry_after.min(Duration::from_millis(60))
                        }
                        _ => Duration::from_millis(20),
                    };
                    // Pacing between attempts (not a wait for a condition).
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect()
}

/// The round index of a `round N committed` line.
pub fn committed_round(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("round ")?;
    let (n, tail) = rest.split_once(' ')?;
    tail.starts_with("committed").then(|| n.parse().ok()).flatten()
}
