//! Distributed DP over real QUIC (issue 12): SDK devices add their noise shares before masking, the coordinator's server unmasks and decodes the sum and commits it without central noise.

use std::sync::Arc;
use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::round::{
    ClientOutcome, Coordinator, CoordinatorEvent, DistributedNoise, SecureAggregation, Selection,
};
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::server::{coordinator_config, initial_model};
use fedrec_tests::{LoopbackServer, low_rank_ratings, ratings_by_user};

const SHAPE: ModelShape = ModelShape { n_items: 40, dim: 4, n_segments: 2 };
const N_DEVICES: usize = 16;
const MIN_REPORTS: usize = 12;

fn ratings() -> Vec<Vec<Rating>> {
    ratings_by_user(N_DEVICES, low_rank_ratings(N_DEVICES, SHAPE.n_items, 3, 8, 0.1, 29))
}

/// Every SDK device of a distributed round (Poisson selection with q = 1, noise multiplier 1,
/// 16 bits) completes through the SDK's own loop against the real server, and the round
/// commits all 16 masked inputs with the noise of `min_reports` shares (what its stats
/// report), the coordinator adding none; the model moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_round_commits_over_quic() {
    let users = Arc::new(ratings());
    let mut config = coordinator_config(Selection::Poisson { q: 1.0 }, MIN_REPORTS);
    config.noise_multiplier = 1.0;
    config.secure = Some(SecureAggregation {
        dropout: 0.2,
        corrupt: 0.05,
        phase_window: Duration::from_secs(3),
        distributed: Some(DistributedNoise { bits: 16 }),
    });
    // The parameters the server's machine derives (the same function, the same config).
    let model = initial_model(SHAPE, 3.0, 5);
    let local = Coordinator::new(config.clone(), model.clone(), seeded_rng(1)).expect("a valid config");
    let want_noise = local.ddp_params().expect("distributed").survivor_noise_std(MIN_REPORTS) as f32;
    let server = LoopbackServer::start(config, model.clone(), |_| {});
    for outcome in server.participate_all(users).await {
        assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    }
    let mut status = server.status().clone();
    let s = status.wait_for(|s| s.n_committed >= 1).await.expect("the server runs").clone();
    let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &s.last_close else {
        panic!("{:?}", s.last_close)
    };
    assert_eq!(stats.n_reported, N_DEVICES);
    assert!(stats.private);
    assert_eq!(stats.noise_std, want_noise);
    server.stop().await;
}
