//! The coordinator's limits over real QUIC on loopback — daily quota, connection cap, cutting off misbehaving peers, eligibility — and the device's retries, cancellation and time budget.

use std::net::SocketAddr;
use std::time::Duration;

use fedrec_client::net::{
    CancelToken, Device, Eligibility, NetConfig, NetError, ParticipateOptions, Participation, RetryPolicy,
};
use fedrec_coordinator::auth::TokenKey;
use fedrec_coordinator::server::{EligibilityPolicy, ServeConfig, ServerError, ServerStatus, TlsIdentity};
use fedrec_shared::round::{ClientOutcome, CoordinatorConfig, Selection};
use fedrec_shared::wire::{ErrorCode, Request, Response};
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::server::{coordinator_config, initial_model};
use fedrec_tests::{LoopbackServer, net_config, scrape_metrics};
use ring::rand::SystemRandom;

const SHAPE: ModelShape = ModelShape { n_items: 20, dim: 4, n_segments: 2 };
/// Safety net for every wait on a condition, and the devices' time budget.
const WAIT: Duration = Duration::from_secs(30);
/// Pacing between a device's attempts (not a wait for a condition).
const PACE: Duration = Duration::from_millis(20);

/// First come, one device per round, short windows: every round needs one report.
fn first_come_one() -> CoordinatorConfig {
    CoordinatorConfig {
        checkin_window: Duration::from_millis(200),
        ..coordinator_config(Selection::FirstCome { cohort: 1 }, 1)
    }
}

fn ratings() -> Vec<Rating> {
    (0..12).map(|i| Rating { item: i, value: 1.0 + (i % 5) as f32 }).collect()
}

/// A server on a free loopback port with the test's defaults, then `configure`.
fn start(configure: impl FnOnce(&mut ServeConfig)) -> LoopbackServer {
    LoopbackServer::start(first_come_one(), initial_model(SHAPE, 3.0, 3), configure)
}

/// A server on `listen` accepting tokens signed by `key`, with the test's defaults, then `configure`.
fn try_start(
    listen: SocketAddr,
    key: TokenKey,
    configure: impl FnOnce(&mut ServeConfig),
) -> Result<LoopbackServer, ServerError> {
    LoopbackServer::try_start(listen, key, first_come_one(), initial_model(SHAPE, 3.0, 3), configure)
}

fn device_config(server: SocketAddr, server_cert: Vec<u8>, token: Vec<u8>, timeout: Duration) -> NetConfig {
    net_config(server, server_cert, token, SHAPE, timeout)
}

/// Fast retries, for tests.
fn quick_retries() -> ParticipateOptions {
    ParticipateOptions {
        time_budget: WAIT,
        retry: RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        },
        eligibility: Eligibility::default(),
    }
}

/// Participates until the device is selected and its round ends; panics on any error.
async fn complete(device: &mut Device, opts: &ParticipateOptions) -> ClientOutcome {
    let cancel = CancelToken::new();
    let run = async {
        loop {
            match device.participate_with(&ratings(), opts, &cancel).await {
                Ok(Participation::NotSelected { .. }) => tokio::time::sleep(PACE).await,
                Ok(Participation::Outcome(o)) => return o,
                Ok(other) => panic!("unexpected participation {other:?}"),
                Err(e) => panic!("the device is served: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, run).await.expect("the device completes a round in time")
}

/// Polls `condition` until it holds; panics with `what` after [`WAIT`].
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(PACE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_daily_quota_is_rate_limited_while_another_completes() {
    let server = start(|cfg| cfg.rounds_per_device_per_day = 1);
    let opts = quick_retries();
    let mut first = server.device(1);
    let outcome = complete(&mut first, &opts).await;
    assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");

    // The hint (until the next UTC midnight) is longer than the time budget: no retry.
    match first.participate_with(&ratings(), &opts, &CancelToken::new()).await {
        Err(e @ NetError::Refused { code: ErrorCode::RateLimited, .. }) => {
            let hint = e.retry_after().expect("a rate limit comes with a retry hint");
            assert!(hint > Duration::ZERO && hint <= Duration::from_secs(86_400), "{hint:?}");
        }
        other => panic!("a second round on the same day must be RateLimited, got {other:?}"),
    }
    let mut second = server.device(2);
    let outcome = complete(&mut second, &opts).await;
    assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    assert!(server.rejected("rate_limited") >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_while_the_open_ones_are_served() {
    let server = start(|cfg| {
        cfg.max_connections = 2;
        cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    });
    let (one, two, three) = (server.device(1), server.device(2), server.device(3));
    let s1 = one.connect().await.expect("the first connection is accepted");
    let s2 = two.connect().await.expect("the second connection is accepted");
    match three.connect().await {
        Err(e @ NetError::Connection(_)) => assert!(e.is_transient(), "a full server is worth a retry"),
        Err(other) => panic!("the third connection must be refused, got {other}"),
        Ok(_) => panic!("the third connection must be refused"),
    }
    for (session, device) in [(&s1, &one), (&s2, &two)] {
        let answer = session.request(&Request::CheckIn(device.check_in())).await.expect("answered");
        assert!(matches!(answer, Response::Task(_) | Response::NotSelected { .. }), "{answer:?}");
    }
    assert_eq!(server.rejected("connection_cap"), 1);

    // The refusal shows on the operator's endpoint.
    let text = scrape_metrics(server.metrics_addr().expect("a metrics endpoint")).await;
    assert!(text.contains("fedrec_rejected_total{reason=\"connection_cap\"} 1\n"), "{text}");
    assert!(text.contains("fedrec_connections_open 2\n"), "{text}");

    // Closing a connection frees its slot.
    s1.close();
    let deadline = tokio::time::Instant::now() + WAIT;
    let s3 = loop {
        match three.connect().await {
            Ok(s) => break s,
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "no slot was freed"),
        }
        tokio::time::sleep(PACE).await;
    };
    let answer = s3.request(&Request::CheckIn(three.check_in())).await.expect("answered");
    assert!(matches!(answer, Response::Task(_) | Response::NotSelected { .. }), "{answer:?}");
    s2.close();
    s3.close();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_garbage_is_cut_off_while_a_good_device_completes() {
    let server = start(|cfg| cfg.max_invalid_requests = 3);
    let mut good = server.device(7);
    let good = tokio::spawn(async move { complete(&mut good, &quick_retries()).await });

    let forger = Device::new(server.net_config(vec![1; 57])).expect("the client endpoint binds");
    let session = forger.connect().await.expect("connects");
    let forged = Request::CheckIn(forger.check_in());
    let garbage =
        Request::CheckIn(fedrec_shared::wire::CheckIn { token: b"garbage".to_vec(), ..forger.check_in() });
    for request in [&forged, &garbage, &forged] {
        match session.request(request).await {
            Ok(Response::Error { code: ErrorCode::BadToken, .. }) => {}
            other => panic!("a forged token must be refused with BadToken, got {other:?}"),
        }
    }
    // Three strikes: the coordinator has closed the connection and says why.
    match session.request(&forged).await {
        Err(e @ NetError::Refused { code: ErrorCode::CutOff, .. }) => assert!(!e.is_transient()),
        other => panic!("the connection must be cut off, got {other:?}"),
    }
    assert_eq!(server.rejected("cut_off"), 1);
    // Issue 9: a token the coordinator did not issue counts as bad_token, whatever check refused it
    // (a forged one used to count as unsupported_version).
    assert_eq!(server.rejected("bad_token"), 3);
    assert_eq!(server.rejected("unsupported_version") + server.rejected("bad_tag"), 0);

    // A peer that is cut off may come back on a new connection: the strikes are per connection.
    let again = forger.connect().await.expect("a new connection is accepted");
    let answer = again.request(&forged).await.expect("answered");
    assert!(matches!(answer, Response::Error { code: ErrorCode::BadToken, .. }), "{answer:?}");
    again.close();

    let outcome = good.await.expect("the good device's task ends");
    assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ineligible_device_is_refused_never_selected_and_not_cut_off() {
    let policy = EligibilityPolicy { require_charging: true, require_unmetered: true, require_idle: false };
    let server = start(|cfg| cfg.eligibility = policy);
    let on_battery = Eligibility { charging: false, unmetered: true, idle: true };
    let mut device = server.device(5);
    let opts = ParticipateOptions { eligibility: on_battery, ..quick_retries() };
    match device.participate_with(&ratings(), &opts, &CancelToken::new()).await {
        Err(e @ NetError::Refused { code: ErrorCode::NotEligible, .. }) => {
            assert!(!e.is_transient(), "not retried");
            assert_eq!(e.refusal(), Some(ErrorCode::NotEligible));
        }
        other => panic!("an ineligible device must be refused with NotEligible, got {other:?}"),
    }

    // More ineligible check-ins on one connection than the strike limit, spread over several
    // check-in windows: always NotEligible, never cut off, never checked in to a round, and
    // (rounds open at a check-in that could be selected) no round opened for it.
    let session = device.connect().await.expect("connects");
    let check_in = Request::CheckIn(device.check_in_as(on_battery));
    let closed = |s: &ServerStatus| s.n_committed + s.n_abandoned;
    let first_close = closed(&server.status().borrow());
    for _ in 0..15 {
        let answer = session.request(&check_in).await.expect("answered, not cut off");
        assert!(matches!(answer, Response::Error { code: ErrorCode::NotEligible, .. }), "{answer:?}");
        tokio::time::sleep(PACE).await;
    }
    assert_eq!(closed(&server.status().borrow()), first_close, "an ineligible device opens no round");
    assert_eq!(server.metrics().checked_in.get(), 0, "no round saw the ineligible device");
    assert_eq!(server.metrics().selected.get(), 0);
    assert_eq!(server.rejected("cut_off"), 0);
    assert!(server.rejected("not_eligible") > 3);

    // The same device, now charging, is served on the same connection.
    let eligible = Eligibility { charging: true, ..on_battery };
    let answer = session.request(&Request::CheckIn(device.check_in_as(eligible))).await.expect("answered");
    assert!(matches!(answer, Response::Task(_) | Response::NotSelected { .. }), "{answer:?}");
    session.close();
    server.stop().await;
}

/// A self-signed certificate for `localhost`: (certificate, private key), DER.
fn self_signed() -> (Vec<u8>, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    (certified.cert.der().to_vec(), certified.key_pair.serialize_der())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_retries_until_the_coordinator_listens() {
    let (cert, key) = self_signed();
    let tls = || TlsIdentity::Der { chain: vec![cert.clone()], key: key.clone() };
    let token_key = TokenKey::generate(&SystemRandom::new()).expect("the system RNG works");
    // Stands in for a coordinator that is not serving yet: it refuses every connection.
    let refusing = try_start(SocketAddr::from(([127, 0, 0, 1], 0)), token_key.clone(), |cfg| {
        cfg.tls = tls();
        cfg.max_connections = 0;
    })
    .expect("binds");
    let addr = refusing.addr();
    let token = refusing.token(11);
    let mut device = Device::new(device_config(addr, cert.clone(), token, Duration::from_secs(1)))
        .expect("the endpoint binds");
    let participation = tokio::spawn(async move {
        let result = device.participate_with(&ratings(), &quick_retries(), &CancelToken::new()).await;
        (result, device)
    });

    // The first attempt has been refused: replace the stand-in by the real coordinator.
    until("the first attempt", || refusing.rejected("connection_cap") >= 1).await;
    refusing.stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let server = loop {
        match try_start(addr, token_key.clone(), |cfg| cfg.tls = tls()) {
            Ok(s) => break s,
            // The stand-in's socket is released asynchronously.
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "cannot listen on {addr}: {e}"),
        }
        tokio::time::sleep(PACE).await;
    };

    let (result, mut device) = participation.await.expect("the participation task ends");
    match result {
        Ok(Participation::Outcome(ClientOutcome::Completed { .. }) | Participation::NotSelected { .. }) => {}
        other => panic!("the retried participation must be served, got {other:?}"),
    }
    let outcome = complete(&mut device, &quick_retries()).await;
    assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    server.stop().await;
}

/// A UDP socket that never answers, and a device pointed at it that waits up to a minute
/// for each network step.
fn silent_coordinator() -> (std::net::UdpSocket, Device) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("binds");
    socket.set_read_timeout(Some(WAIT)).expect("sets a timeout");
    let addr = socket.local_addr().expect("an address");
    let (cert, _) = self_signed();
    let device = Device::new(device_config(addr, cert, vec![1; 57], Duration::from_secs(60))).expect("binds");
    (socket, device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_interrupts_a_participation_waiting_for_the_network() {
    let (socket, mut device) = silent_coordinator();
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let participation =
        tokio::spawn(async move { device.participate_with(&ratings(), &quick_retries(), &token).await });
    // The device's first packet has arrived: it is now waiting for an answer that never comes.
    let received = tokio::task::spawn_blocking(move || socket.recv_from(&mut [0u8; 2048]).map(|_| socket))
        .await
        .expect("the receiving task ends");
    let _socket = received.expect("the device sends a packet");
    cancel.cancel();
    let result = participation.await.expect("the participation task ends");
    assert!(matches!(result, Err(NetError::Cancelled)), "{result:?}");

    // A token cancelled beforehand stops a participation before it starts.
    let (_socket, mut device) = silent_coordinator();
    let result = device.participate_with(&ratings(), &quick_retries(), &cancel).await;
    assert!(matches!(result, Err(NetError::Cancelled)), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participation_stops_at_its_time_budget() {
    let (_socket, mut device) = silent_coordinator();
    let opts = ParticipateOptions { time_budget: Duration::from_millis(200), ..quick_retries() };
    let result = device.participate_with(&ratings(), &opts, &CancelToken::new()).await;
    assert!(matches!(result, Err(NetError::BudgetExceeded)), "{result:?}");
}
