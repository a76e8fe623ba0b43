//! Secure aggregation over real QUIC: SDK devices run SecAgg+ against the coordinator's server on loopback (long-polled phases, per-device mailboxes), the round commits the survivors' sum, and devices that vanish mid-protocol are unmasked around.

use std::sync::Arc;
use std::time::Duration;

use fedrec_shared::round::{ClientOutcome, CoordinatorEvent, SecureAggregation, Selection};
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::server::{coordinator_config, initial_model};
use fedrec_tests::{LoopbackServer, low_rank_ratings, ratings_by_user};

const SHAPE: ModelShape = ModelShape { n_items: 40, dim: 4, n_segments: 2 };
const N_DEVICES: usize = 16;

fn ratings() -> Vec<Vec<Rating>> {
    ratings_by_user(N_DEVICES, low_rank_ratings(N_DEVICES, SHAPE.n_items, 3, 8, 0.1, 23))
}

fn secure_server(cohort: usize, phase_window: Duration) -> LoopbackServer {
    let mut config = coordinator_config(Selection::FirstCome { cohort }, 1);
    config.secure = Some(SecureAggregation { dropout: 0.2, corrupt: 0.05, phase_window, distributed: None });
    LoopbackServer::start(config, initial_model(SHAPE, 3.0, 5), |_| {})
}

/// Every device of a secure round completes through the SDK's own participation loop, and
/// the round commits well before any phase deadline: each phase closes as soon as every
/// device has answered, and the answers travel on the devices' long-polled requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_commits_over_quic() {
    let users = Arc::new(ratings());
    let server = secure_server(N_DEVICES, Duration::from_secs(30));
    let started = std::time::Instant::now();
    for outcome in server.participate_all(users).await {
        assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    }
    let mut status = server.status().clone();
    let s = status.wait_for(|s| s.n_committed >= 1).await.expect("the server runs").clone();
    let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &s.last_close else {
        panic!("{:?}", s.last_close)
    };
    assert_eq!((stats.n_selected, stats.n_reported), (N_DEVICES, N_DEVICES));
    // No phase ran to its 30 s deadline.
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    server.stop().await;
}
