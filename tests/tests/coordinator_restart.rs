//! A coordinator with a store survives a restart: a new server resumes at the right round with the same model version and privacy ledger; a spent budget stops rounds visibly; the `fedrec-coordinator` binary initialises, enrolls and reports.

use std::net::SocketAddr;
use std::time::Duration;

use fedrec_client::net::Participation;
use fedrec_coordinator::auth::{RevocationList, TokenKey, Verifier};
use fedrec_coordinator::server::ServerStatus;
use fedrec_coordinator::store::Store;
use fedrec_shared::ledger::{PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::AccountantKind;
use fedrec_shared::round::{CoordinatorConfig, CoordinatorEvent, Selection, StartError};
use fedrec_shared::server::ServerOptimizer;
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::server::{coordinator_config, initial_model};
use fedrec_tests::{CoordinatorDir, LoopbackServer, decode_hex, low_rank_ratings, ratings_by_user, unix_ms};
use ring::rand::SystemRandom;
use tokio::task::JoinHandle;

const N_USERS: usize = 16;
const N_ITEMS: usize = 30;
const SHAPE: ModelShape = ModelShape { n_items: N_ITEMS, dim: 4, n_segments: 2 };

/// Poisson selection with noise and a budget of `epsilon` at δ = 1e-5.
fn poisson_config(epsilon: f64) -> CoordinatorConfig {
    CoordinatorConfig {
        optimizer: ServerOptimizer::adam(0.05),
        checkin_window: Duration::from_millis(300),
        report_window: Duration::from_secs(3),
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        privacy: Some(PrivacyPolicy {
            budget: PrivacyBudget::new(epsilon, 1e-5).expect("a valid budget"),
            accountant: AccountantKind::Rdp,
        }),
        ..coordinator_config(Selection::Poisson { q: 0.5 }, 2)
    }
}

fn ratings() -> Vec<Vec<Rating>> {
    ratings_by_user(N_USERS, low_rank_ratings(N_USERS, N_ITEMS, 3, 12, 0.1, 5))
}

/// A running server with devices participating in a loop.
struct Running {
    server: LoopbackServer,
    devices: Vec<JoinHandle<()>>,
}

impl Running {
    /// Starts a server on `store` (the model is only used if the store is fresh) and `n_devices`
    /// devices with tokens signed by `key`.
    fn start(key: &TokenKey, store: Store, epsilon: f64, n_devices: usize) -> Running {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        // A different starting model each time: a restored server must ignore it.
        let model = initial_model(SHAPE, 3.5, unix_ms());
        let server = LoopbackServer::try_start(listen, key.clone(), poisson_config(epsilon), model, |cfg| {
            cfg.store = Some(store);
        })
        .expect("the server binds to loopback");
        let devices = ratings()
            .into_iter()
            .take(n_devices)
            .enumerate()
            .map(|(idx, train)| {
                let mut device = server.device(idx as u64 + 1);
                tokio::spawn(async move {
                    loop {
                        let pause = match device.participate(&train).await {
                            Ok(Participation::NotSelected { retry_after }) => retry_after,
                            _ => Duration::from_millis(20),
                        };
                        // Pacing between attempts (not a wait for a condition).
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Running { server, devices }
    }

    /// The server's status now.
    fn status(&self) -> ServerStatus {
        self.server.status().borrow().clone()
    }

    /// Waits until `done` holds for the status (at most 20 s), then stops everything and
    /// returns the final status.
    async fn run_until(self, done: impl FnMut(&ServerStatus) -> bool) -> ServerStatus {
        let mut status = self.server.status().clone();
        tokio::time::timeout(Duration::from_secs(20), status.wait_for(done))
            .await
            .expect("the server gets there within 20 s")
            .expect("the server is running");
        for d in &self.devices {
            d.abort();
        }
        self.server.stop().await
    }
}

fn round_of(event: Option<&CoordinatorEvent>) -> Option<u64> {
    match event? {
        CoordinatorEvent::RoundCommitted { stats, .. } | CoordinatorEvent::RoundAbandoned { stats, .. } => {
            Some(stats.round)
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_from_its_store() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("state.sqlite");
    let key = TokenKey::generate(&SystemRandom::new()).expect("the system RNG works");
    const EPSILON: f64 = 1000.0;

    let first = Running::start(&key, Store::open(&path).expect("a fresh store"), EPSILON, N_USERS);
    assert_eq!(first.status().next_round, 0);
    let a = first.run_until(|s| s.n_committed >= 3).await;
    assert!(a.n_committed >= 3);
    assert!(a.start_refused.is_none(), "{:?}", a.start_refused);
    // Every committed round was charged (Poisson + noise).
    assert_eq!(a.n_ledger_entries as u64, a.n_committed);
    assert_eq!(a.model.version, a.n_committed);

    let stored = Store::open(&path).expect("the store reopens");
    let state_a = stored.load_latest().expect("readable").expect("a checkpoint");
    assert_eq!(state_a.version, a.model.version);
    assert_eq!(state_a.ledger.entries().len(), a.n_ledger_entries);
    assert_eq!(state_a.next_round, a.next_round);
    let status_a = stored.status().expect("status");
    assert_eq!(status_a.n_rounds_committed, a.n_committed);
    assert_eq!(status_a.n_rounds_abandoned, a.n_abandoned);
    drop(stored);

    let second = Running::start(&key, Store::open(&path).expect("the store reopens"), EPSILON, N_USERS);
    {
        let resumed = second.status();
        assert_eq!(resumed.next_round, a.next_round, "resumes at the round after the last one closed");
        assert_eq!(resumed.model.version, a.model.version);
        assert_eq!(resumed.model.model, state_a.model, "the restored model is the stored one");
        assert_eq!(resumed.n_ledger_entries, a.n_ledger_entries);
        assert_eq!(resumed.n_committed, 0, "counts are per server run");
    }
    let b = second.run_until(|s| s.n_committed >= 2).await;
    assert!(b.n_committed >= 2);
    assert!(round_of(b.last_close.as_ref()).expect("a round closed") >= a.next_round);
    assert_eq!(b.model.version, a.model.version + b.n_committed);

    let stored = Store::open(&path).expect("the store reopens");
    let state_b = stored.load_latest().expect("readable").expect("a checkpoint");
    assert_eq!(state_b.version, b.model.version);
    let (old, new) = state_b.ledger.entries().split_at(a.n_ledger_entries);
    assert_eq!(old, state_a.ledger.entries(), "the old ledger is kept as it was");
    assert_eq!(new.len() as u64, b.n_committed, "one new entry per new commit");
    assert!(new.iter().all(|e| e.round >= a.next_round), "new charges are for new rounds: {new:?}");
    let status_b = stored.status().expect("status");
    assert_eq!(status_b.n_rounds_committed, a.n_committed + b.n_committed);
    assert_eq!(status_b.n_ledger_entries, (a.n_ledger_entries as u64) + b.n_committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_stops_rounds_and_says_so() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path().join("state.sqlite")).expect("a fresh store");
    let key = TokenKey::generate(&SystemRandom::new()).expect("the system RNG works");
    // Too small for even one round.
    let server = Running::start(&key, store, 0.01, 2);
    let s = server.run_until(|s| s.start_refused.is_some()).await;
    assert!(matches!(s.start_refused, Some(StartError::BudgetExhausted { .. })), "{:?}", s.start_refused);
    assert_eq!(s.n_committed, 0);
    assert_eq!(s.n_ledger_entries, 0);
}

#[test]
fn the_binary_initialises_enrolls_and_reports() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = CoordinatorDir::new(tmp.path().join("state"));
    let dir = state.path();

    let missing = state.command(&["status"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("fedrec.toml"), "the error names the file");

    let init = state.command(&["init"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    for file in ["fedrec.toml", "cert.der", "key.der", "token.key", "state.sqlite"] {
        assert!(dir.join(file).is_file(), "init writes {file}");
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("token.key")).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token key is private");
    }
    let again = state.command(&["init"]);
    assert!(!again.status.success(), "init refuses to overwrite");

    let enroll = state.command(&["enroll", "--count", "3"]);
    assert!(enroll.status.success(), "{}", String::from_utf8_lossy(&enroll.stderr));
    let tokens = String::from_utf8(enroll.stdout).expect("hex is UTF-8");
    let key = TokenKey::from_bytes(&std::fs::read(dir.join("token.key")).expect("readable")).expect("a key");
    let verifier = Verifier::new(vec![key], RevocationList::new()).expect("one key");
    let lines: Vec<&str> = tokens.lines().collect();
    assert_eq!(lines.len(), 3);
    for line in lines {
        verifier.verify(&decode_hex(line), unix_ms()).expect("the token verifies");
    }

    // The template's noise needs a budget: serve refuses and says where.
    let serve = state.command(&["serve"]);
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("privacy budget"));

    let status = state.command(&["status"]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let text = String::from_utf8(status.stdout).expect("UTF-8");
    assert!(text.contains("rounds committed: 0"), "{text}");
    assert!(text.contains("devices enrolled: 3"), "{text}");
    assert!(text.contains("no budget configured"), "{text}");
}
