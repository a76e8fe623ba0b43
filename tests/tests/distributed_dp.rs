//! Distributed DP over real QUIC (issue 12): SDK devices add their noise shares before masking, the coordinator's server unmasks and decodes the sum and commits it without central noise.

use std::sync::Arc;
use std::time::Duration;

use fedrec_coordinator::auth::TokenKey;
use fedrec_coordinator::server::ServerError;
use fedrec_coordinator::store::Store;
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::round::{
    ClientOutcome, Coordinator, CoordinatorEvent, DistributedNoise, SecureAggregation, Selection,
};
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::server::{coordinator_config, initial_model};
use fedrec_tests::{LoopbackServer, low_rank_ratings, ratings_by_user};
use ring::rand::SystemRandom;

const SHAPE: ModelShape = ModelShape { n_items: 40, dim: 4, n_segments: 2 };
const N_DEVICES: usize = 16;
const MIN_REPORTS: usize = 12;

fn ratings() -> Vec<Vec<Rating>> {
    ratings_by_user(N_DEVICES, low_rank_ratings(N_DEVICES, SHAPE.n_items, 3, 8, 0.1, 29))
}

/// Every SDK device of a distributed round (Poisson selection with q = 1, noise multiplier 1,
/// 16 bits) completes through the SDK's own loop against the real server, and the round
/// commits all 16 masked inputs with the noise of `min_reports` shares (what its stats
/// report), the coordinator adding none; the model moves. Its store then refuses to be resumed
/// with distributed noise (it does not keep distributed charges yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_round_commits_over_quic() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = dir.path().join("state.sqlite");
    let users = Arc::new(ratings());
    let config = distributed_config();
    // The parameters the server's machine derives (the same function, the same config).
    let model = initial_model(SHAPE, 3.0, 5);
    let local = Coordinator::new(config.clone(), model.clone(), seeded_rng(1)).expect("a valid config");
    let want_noise = local.ddp_params().expect("distributed").survivor_noise_std(MIN_REPORTS) as f32;
    let store_path = db.clone();
    let server = LoopbackServer::start(config.clone(), model.clone(), move |cfg| {
        cfg.store = Some(Store::open(&store_path).expect("a fresh store"));
    });
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

    // The store does not keep distributed charges yet: resuming from it would forget the
    // round's spend, so the server refuses to start on it rather than charge from zero.
    let resumed = LoopbackServer::try_start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        TokenKey::generate(&SystemRandom::new()).expect("the system RNG works"),
        config,
        model,
        |cfg| cfg.store = Some(Store::open(&db).expect("the store reopens")),
    );
    match resumed {
        Err(e @ ServerError::DistributedResume { rounds }) => {
            assert!(rounds >= 1, "{e}");
            assert!(e.to_string().contains("privacy.mechanism"), "{e}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("the server resumed a distributed run whose spend its store does not hold"),
    }
}

/// Poisson selection with q = 1, noise multiplier 1, secure aggregation with 16-bit
/// distributed noise.
fn distributed_config() -> fedrec_shared::round::CoordinatorConfig {
    let mut config = coordinator_config(Selection::Poisson { q: 1.0 }, MIN_REPORTS);
    config.noise_multiplier = 1.0;
    config.secure = Some(SecureAggregation {
        dropout: 0.2,
        corrupt: 0.05,
        phase_window: Duration::from_secs(3),
        distributed: Some(DistributedNoise { bits: 16 }),
    });
    config
}
