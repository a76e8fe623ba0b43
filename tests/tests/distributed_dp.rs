//! Distributed DP over real QUIC (issue 12): SDK devices add their noise shares before masking, the coordinator's server unmasks and decodes the sum and commits it without central noise.

use std::sync::Arc;
use std::time::Duration;

use fedrec_coordinator::auth::TokenKey;
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
/// report), the coordinator adding none; the model moves. The store keeps the round's
/// distributed charge: a server restarted on it resumes with the same ledger (same ε), runs
/// the next round, and the store then holds both charges in one unbroken chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_round_commits_over_quic_and_resumes_with_its_charge() {
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
    for outcome in server.participate_all(Arc::clone(&users)).await {
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
    let first_round = stats.round;
    server.stop().await;

    // The store holds the distributed charge the coordinator's ledger made for the round.
    let stored =
        Store::open(&db).expect("the store reopens").load_latest().expect("readable").expect("a state");
    let want = local.round_ddp_charge(first_round).expect("a distributed charge");
    assert!(stored.ledger.entries().is_empty(), "no central charge");
    assert_eq!(stored.ledger.ddp_entries(), &[want]);
    let eps = stored.ledger.epsilon(1e-6, fedrec_shared::privacy::AccountantKind::Rdp).expect("an ε");
    assert!(eps > 0.0 && eps.is_finite(), "{eps}");

    // A restarted server resumes from it (same ledger) and runs the next round.
    let db2 = db.clone();
    let resumed = LoopbackServer::try_start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        TokenKey::generate(&SystemRandom::new()).expect("the system RNG works"),
        config,
        model,
        move |cfg| cfg.store = Some(Store::open(&db2).expect("the store reopens")),
    )
    .expect("a distributed run resumes from its store");
    assert_eq!(resumed.status().borrow().n_ledger_entries, 1, "the resumed ledger holds the charge");
    for outcome in resumed.participate_all(users).await {
        assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    }
    let mut status = resumed.status().clone();
    status.wait_for(|s| s.n_committed >= 1).await.expect("the server runs");
    resumed.stop().await;
    let store = Store::open(&db).expect("the store reopens");
    let state = store.load_latest().expect("readable").expect("a state");
    let rounds: Vec<u64> = state.ledger.ddp_entries().iter().map(|c| c.round).collect();
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    assert_eq!(rounds[0], first_round);
    assert!(rounds[1] > first_round);
    assert!(state.ledger.epsilon(1e-6, fedrec_shared::privacy::AccountantKind::Rdp).expect("an ε") > eps);
    let chain = store.verify_chain().expect("the chain reads");
    assert_eq!((chain.broken, chain.ledger_hashes.len()), (None, 2));
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
