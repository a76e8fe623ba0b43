//! Real QUIC on loopback: a coordinator server and many device SDK clients train a model together; bad tokens and replayed uploads are refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fedrec_client::net::{Device, NetError, Participation};
use fedrec_shared::eval::{EvalConfig, ReconstructionScorer, Scorer, evaluate};
use fedrec_shared::round::{
    ClientOutcome, ClientRound, CoordinatorConfig, Instant, Selection, ServerMessage,
};
use fedrec_shared::wire::{ErrorCode, Inbound, Request, Response};
use fedrec_shared::{GlobalModel, ModelShape, Rating};
use fedrec_tests::server::{TRAIN, coordinator_config, initial_model};
use fedrec_tests::{LoopbackServer, low_rank_ratings, ratings_by_user};
use rand::Rng;
use tokio::task::JoinHandle;

const N_USERS: usize = 50;
const N_ITEMS: usize = 40;
const PER_USER: usize = 24;
const N_TEST: usize = 4;
const SHAPE: ModelShape = ModelShape { n_items: N_ITEMS, dim: 4, n_segments: 2 };

/// First come, `cohort` devices per round.
fn first_come(cohort: usize, min_reports: usize) -> CoordinatorConfig {
    coordinator_config(Selection::FirstCome { cohort }, min_reports)
}

fn model(global_mean: f32) -> GlobalModel {
    initial_model(SHAPE, global_mean, 3)
}

fn start(coordinator: CoordinatorConfig, model: GlobalModel) -> LoopbackServer {
    LoopbackServer::start(coordinator, model, |_| {})
}

/// Per user: training ratings (all but the last `N_TEST`) and held-out ones.
fn split() -> Vec<(Vec<Rating>, Vec<Rating>)> {
    ratings_by_user(N_USERS, low_rank_ratings(N_USERS, N_ITEMS, 3, PER_USER, 0.0, 17))
        .into_iter()
        .map(|mut r| {
            let test = r.split_off(r.len() - N_TEST);
            (r, test)
        })
        .collect()
}

/// Global mean, item and user biases, ridge-regularised: the baseline to beat.
struct Biases {
    mean: f32,
    item: Vec<f32>,
}

impl Biases {
    const L2: f32 = 5.0;

    fn fit(users: &[(Vec<Rating>, Vec<Rating>)]) -> Self {
        let all: Vec<&Rating> = users.iter().flat_map(|(train, _)| train).collect();
        let mean = all.iter().map(|r| r.value).sum::<f32>() / all.len() as f32;
        let mut sum = [0.0f32; N_ITEMS];
        let mut n = [0.0f32; N_ITEMS];
        for r in all {
            sum[r.item as usize] += r.value - mean;
            n[r.item as usize] += 1.0;
        }
        let item = sum.iter().zip(&n).map(|(s, n)| s / (n + Self::L2)).collect();
        Biases { mean, item }
    }
}

impl Scorer for Biases {
    fn score_all(&self, _user_idx: usize, train: &[Rating], out: &mut [f32]) {
        let residual: f32 = train.iter().map(|r| r.value - self.mean - self.item[r.item as usize]).sum();
        let user = residual / (train.len() as f32 + Self::L2);
        for (o, b) in out.iter_mut().zip(&self.item) {
            *o = self.mean + b + user;
        }
    }

    fn predicts_ratings(&self) -> bool {
        true
    }
}

fn rmse(scorer: &dyn Scorer, users: &[(Vec<Rating>, Vec<Rating>)]) -> f64 {
    let pairs: Vec<(&[Rating], &[Rating])> =
        users.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
    let cfg = EvalConfig { rating_range: (1.0, 5.0), relevance_threshold: Some(4.0) };
    let m = evaluate(scorer, &pairs, N_ITEMS, &cfg, 1);
    m.rmse.expect("explicit scores predict ratings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_train_a_model_over_quic() {
    const ROUNDS: u64 = 20;
    let users = split();
    let mean = Biases::fit(&users).mean;
    let server = start(first_come(10, 5), model(mean));
    let completed = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let clients: Vec<JoinHandle<()>> = users
        .iter()
        .enumerate()
        .map(|(idx, (train, _))| {
            let mut device = server.device(idx as u64 + 1);
            let train = train.clone();
            let (completed, failures) = (Arc::clone(&completed), Arc::clone(&failures));
            tokio::spawn(async move {
                loop {
                    match device.participate(&train).await {
                        Ok(Participation::Outcome(ClientOutcome::Completed { .. })) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Pacing between attempts, randomised so the devices do not move in lockstep.
                    let pause = rand::rng().random_range(5..40);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            })
        })
        .collect();

    let mut status = server.status().clone();
    let reached = tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| s.n_committed >= ROUNDS))
        .await
        .expect("20 rounds commit within a minute")
        .expect("the server is running")
        .clone();
    for c in &clients {
        c.abort();
    }
    server.stop().await;

    let n_completed = completed.load(Ordering::Relaxed);
    assert!(n_completed >= ROUNDS as usize * 5, "only {n_completed} uploads were acknowledged");
    assert!(reached.model.version >= ROUNDS, "model version {}", reached.model.version);
    let federated = rmse(&ReconstructionScorer { model: &reached.model, params: TRAIN }, &users);
    let biases = rmse(&Biases::fit(&users), &users);
    eprintln!(
        "federated RMSE {federated:.3}, biases {biases:.3}, {n_completed} uploads, {} abandoned, {} failed attempts",
        reached.n_abandoned,
        failures.load(Ordering::Relaxed)
    );
    assert!(federated < biases, "federated RMSE {federated} does not beat the biases' {biases}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_while_a_good_device_completes_a_round() {
    let users = split();
    let server = start(first_come(1, 1), model(3.5));

    let mut forger = Device::new(server.net_config(vec![1; 57])).expect("the client endpoint binds");
    match forger.participate(&users[0].0).await {
        Err(NetError::Refused { code: ErrorCode::BadToken, .. }) => {}
        other => panic!("a forged token must be refused with BadToken, got {other:?}"),
    }
    let mut garbage = Device::new(server.net_config(b"not a token".to_vec())).expect("endpoint");
    assert!(matches!(
        garbage.participate(&users[0].0).await,
        Err(NetError::Refused { code: ErrorCode::BadToken, .. })
    ));

    let mut device = server.device(7);
    let outcome = loop {
        match device.participate(&users[1].0).await.expect("an enrolled device is served") {
            Participation::NotSelected { retry_after } => tokio::time::sleep(retry_after).await,
            Participation::Outcome(o) => break o,
            other => panic!("unexpected participation {other:?}"),
        }
    };
    assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    let mut status = server.status().clone();
    let committed = status.wait_for(|s| s.n_committed >= 1).await.expect("the server is running").n_committed;
    assert!(committed >= 1);
    assert!(device.cached_model().is_some(), "the device keeps the model it trained on");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_upload_is_refused() {
    // A cohort of two keeps the round open after one upload.
    let server = start(first_come(2, 1), model(3.5));
    replay_and_duplicate(&server).await;
    // Without noise every refusal is counted on /metrics.
    assert_eq!((server.rejected("replay"), server.rejected("duplicate")), (1, 1));
    server.stop().await;
}

/// Issue 10: with noise, a refusal that depends on which devices were selected (here a
/// selected device's duplicate upload) is not counted on `/metrics`, where a scrape between
/// rounds would attribute it to one round; a replayed frame (an authentication failure,
/// whoever sent it) still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_noise_round_refusals_stay_off_the_metrics() {
    let config =
        CoordinatorConfig { noise_multiplier: 1.0, ..coordinator_config(Selection::Poisson { q: 1.0 }, 1) };
    let server = start(config, model(3.5));
    replay_and_duplicate(&server).await;
    assert_eq!((server.rejected("replay"), server.rejected("duplicate")), (1, 0));
    server.stop().await;
}

/// A selected device uploads, replays the same frame, then uploads again with a fresh nonce;
/// checks the answers.
async fn replay_and_duplicate(server: &LoopbackServer) {
    let users = split();
    let device = server.device(9);
    let session = device.connect().await.expect("connects");

    let far = Instant::ZERO.saturating_add(Duration::from_secs(3600));
    let check_in = device.check_in();
    let task = loop {
        match session.request(&Request::CheckIn(check_in.clone())).await.expect("answered") {
            Response::NotSelected { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            other => break other,
        }
    };
    let Inbound::Message(selected @ ServerMessage::Selected { .. }) =
        task.into_inbound(None).expect("a valid task")
    else {
        panic!("the device is selected");
    };
    let mut round = ClientRound::new(&users[2].0, far);
    let _ = round.poll_transmit();
    round.handle_message(Instant::ZERO, selected);
    let upload = round.poll_transmit().expect("an upload");
    let request = Request::from_client_message(&upload, &check_in, [7; 16]);

    // An upload on a connection that has not checked in has no device behind it.
    let stranger = device.connect().await.expect("connects");
    let orphan = stranger.request(&request).await.expect("answered");
    assert!(matches!(orphan, Response::Error { code: ErrorCode::BadToken, .. }), "{orphan:?}");
    stranger.close();

    let first = session.request(&request).await.expect("answered");
    assert!(matches!(first, Response::Ack { .. }), "{first:?}");
    let replay = session.request(&request).await.expect("answered");
    assert!(matches!(replay, Response::Error { code: ErrorCode::Replay, .. }), "{replay:?}");
    // A fresh nonce does not make a second upload acceptable either.
    let again = Request::from_client_message(&upload, &check_in, [8; 16]);
    let duplicate = session.request(&again).await.expect("answered");
    assert!(matches!(duplicate, Response::Error { code: ErrorCode::Duplicate, .. }), "{duplicate:?}");
    session.close();
}
