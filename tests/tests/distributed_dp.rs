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

/// Devices that keep a privacy record (the SDK's gate over `Device::participate_gated`) are
/// charged a distributed round at its exact price: the DDGauss event the round's 12-bit grid
/// fixes at share-keys, with `min_reports` shares — above the central price of the same
/// multiplier, which is all the task declares at admission. A device whose limit lies between
/// the two is admitted, trains, and then stops at share-keys (`DeviceBudgetSpent`): it sends no
/// share and no masked input, and the round commits without it. Two of the devices are SDKs,
/// whose records are read back from their encrypted stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_charged_the_exact_distributed_price_and_one_over_its_limit_sends_no_share() {
    use fedrec_client::net::{CancelToken, ParticipateOptions, Participation};
    use fedrec_client::policy::{PolicyGate, PrivacyPolicy, PrivacyRecord, RefusalReason};
    use fedrec_client::sdk::RoundOutcome;
    use fedrec_shared::ddp::accountant::rdp_at_orders;
    use fedrec_shared::privacy::rdp::{DEFAULT_ORDERS, epsilon_from_rdp};

    let users = Arc::new(ratings());
    let mut config = distributed_config();
    if let Some(secure) = config.secure.as_mut() {
        secure.distributed = Some(DistributedNoise { bits: 12 });
    }
    let model = initial_model(SHAPE, 3.0, 5);
    let local = Coordinator::new(config.clone(), model.clone(), seeded_rng(1)).expect("a valid config");
    let params = local.ddp_params().expect("distributed");
    let event = fedrec_shared::ddp::DdpEvent::new(params, MIN_REPORTS, 1.0, 1).expect("an event");
    let open = PrivacyPolicy::unenforced();
    let eps = |curve: &[f64]| epsilon_from_rdp(&DEFAULT_ORDERS, curve, open.delta).expect("an ε").0;
    let central_curve = fedrec_shared::privacy::round_rdp(1.0, 1.0);
    let exact_curve: Vec<f64> =
        central_curve.iter().zip(rdp_at_orders(&event, &DEFAULT_ORDERS)).map(|(c, x)| c.max(x)).collect();
    let (central, exact) = (eps(&central_curve), eps(&exact_curve));
    assert!(exact > central * 1.001, "the exact price {exact} vs central {central}");
    let strict = PrivacyPolicy { max_total_epsilon: (central + exact) / 2.0, ..open };

    let server = LoopbackServer::start(config, model, |_| {});
    // Devices 1 (strict) and 2 run the SDK itself (its record persisted in its encrypted
    // store); the others a `PolicyGate` over the same device loop.
    let dirs = [tempfile::tempdir().expect("a temp dir"), tempfile::tempdir().expect("a temp dir")];
    let mut sdks = Vec::new();
    for (id, dir) in (1..=2u64).zip(&dirs) {
        let sdk = server.open_sdk(id, dir.path(), if id == 1 { strict } else { open });
        // `Sdk::participate` runs its own runtime: on a plain thread.
        sdks.push(tokio::task::spawn_blocking(move || {
            std::thread::spawn(move || {
                let opts = ParticipateOptions {
                    time_budget: Duration::from_secs(120),
                    ..ParticipateOptions::default()
                };
                for _ in 0..200 {
                    let report = sdk.participate(&opts, &CancelToken::new()).expect("participates");
                    if report.selected {
                        return (report, sdk.privacy_record().expect("the stored record"));
                    }
                    std::thread::sleep(
                        report.retry_after.unwrap_or_default().min(Duration::from_millis(200)),
                    );
                }
                panic!("device {id} never got a task");
            })
            .join()
            .expect("the SDK's thread ends")
        }));
    }
    let mut tasks = Vec::new();
    for id in 3..=N_DEVICES as u64 {
        let mut device = server.device(id);
        let users = Arc::clone(&users);
        let policy = open;
        tasks.push(tokio::spawn(async move {
            let mut gate = PolicyGate { policy, record: PrivacyRecord::default() };
            let (opts, cancel) = (ParticipateOptions::default(), CancelToken::new());
            let mine = &users[id as usize - 1];
            let ended = loop {
                match device.participate_gated(mine, &opts, &cancel, &mut gate).await.expect("served") {
                    Participation::NotSelected { retry_after } => tokio::time::sleep(retry_after).await,
                    other => break other,
                }
            };
            device.shutdown().await;
            (ended, gate.record)
        }));
    }
    let mut completed = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let (ended, record) = task.await.expect("the device task");
        let got = record.epsilon(open.delta);
        assert_eq!(record.n_rounds(), 1, "device {}", i + 3);
        assert!(matches!(ended, Participation::Outcome(ClientOutcome::Completed { .. })), "{ended:?}");
        assert!((got - exact).abs() < 1e-9 * exact, "device {}: {got} vs {exact}", i + 3);
        completed += 1;
    }
    for (i, sdk) in sdks.into_iter().enumerate() {
        let (report, record) = sdk.await.expect("the SDK's thread");
        let got = record.epsilon(open.delta);
        assert_eq!(record.n_rounds(), 1, "SDK device {}", i + 1);
        if i == 0 {
            assert_eq!(report.outcome, RoundOutcome::PolicyRefused, "{report:?}");
            assert_eq!(report.refusal, Some(RefusalReason::DeviceBudgetSpent));
            // Charged at admission (it trained), not topped up: it sent nothing further.
            assert!((got - central).abs() < 1e-9 * central, "{got} vs {central}");
        } else {
            assert_eq!(report.outcome, RoundOutcome::Completed, "{report:?}");
            assert!((got - exact).abs() < 1e-9 * exact, "SDK device 2: {got} vs {exact}");
            completed += 1;
        }
    }
    eprintln!("one round, q = 1, σ = 1, 12 bits, δ = 1e-6: central ε {central:.4}, exact {exact:.4}");
    assert_eq!(completed, N_DEVICES - 1);
    let mut status = server.status().clone();
    let s = status.wait_for(|s| s.n_committed >= 1).await.expect("the server runs").clone();
    let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &s.last_close else {
        panic!("{:?}", s.last_close)
    };
    assert_eq!(stats.n_reported, N_DEVICES - 1, "the refused device's input is not in the sum");
    server.stop().await;
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
