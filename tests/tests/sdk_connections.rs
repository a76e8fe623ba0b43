//! The SDK's connections to a real coordinator on loopback: each participation closes its connection before it returns, so a small connection cap is never hit and the coordinator holds nothing afterwards; a certificate that is not the pinned one is one attempt and a permanent error.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedrec_client::error::SdkError;
use fedrec_client::net::{CancelToken, Eligibility, NetError, ParticipateOptions, RetryPolicy};
use fedrec_client::policy::PrivacyPolicy;
use fedrec_client::sdk::{Consent, Sdk, SdkConfig};
use fedrec_shared::ModelShape;
use fedrec_shared::round::Selection;
use fedrec_tests::LoopbackServer;
use fedrec_tests::server::{coordinator_config, initial_model};
use tokio::net::UdpSocket;

const SHAPE: ModelShape = ModelShape { n_items: 20, dim: 4, n_segments: 2 };
/// Well under the coordinator's idle timeout (10 s): a connection the SDK left open would
/// still be held when this runs out.
const CLOSED_WITHIN: Duration = Duration::from_secs(5);
/// Safety net for the devices' work, and their time budget.
const WAIT: Duration = Duration::from_secs(60);

fn server(max_connections: usize) -> LoopbackServer {
    LoopbackServer::start(
        coordinator_config(Selection::FirstCome { cohort: 1 }, 1),
        initial_model(SHAPE, 3.0, 7),
        |cfg| cfg.max_connections = max_connections,
    )
}

/// One attempt, no retry: a connection refused at the cap fails the participation.
fn one_attempt() -> ParticipateOptions {
    ParticipateOptions { time_budget: WAIT, retry: RetryPolicy::NONE, eligibility: Eligibility::default() }
}

/// Polls `condition` (the coordinator's gauge has no change notification) until it holds;
/// false after `bound`.
async fn within(bound: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_participations_close_their_connections_under_a_small_cap() {
    const MAX_CONNECTIONS: usize = 4;
    const HANDLES: u64 = 3;
    const ROUNDS: usize = 6;
    let server = server(MAX_CONNECTIONS);
    let dirs: Vec<tempfile::TempDir> =
        (0..HANDLES).map(|_| tempfile::tempdir().expect("a temp dir")).collect();
    let sdks: Vec<Sdk> = dirs
        .iter()
        .zip(1..)
        .map(|(dir, id)| server.open_sdk(id, dir.path(), PrivacyPolicy::unenforced()))
        .collect();

    // `participate` blocks on its own runtime: run the devices on a plain thread. Each
    // participation is one connection; 18 in a row would pass a cap of 4 many times over
    // if any stayed open until the idle timeout.
    let devices = std::thread::spawn(move || {
        let mut outcomes = Vec::new();
        for round in 0..ROUNDS {
            for (k, sdk) in sdks.iter().enumerate() {
                match sdk.participate(&one_attempt(), &CancelToken::new()) {
                    Ok(report) => outcomes.push(report.outcome),
                    Err(e) => return Err(format!("round {round}, handle {k}: {e}")),
                }
            }
        }
        Ok(outcomes)
    });
    let outcomes = tokio::task::spawn_blocking(move || devices.join().expect("the devices' thread ends"))
        .await
        .expect("joined")
        .unwrap_or_else(|e| panic!("every participation succeeds: {e}"));
    assert_eq!(outcomes.len(), ROUNDS * HANDLES as usize);
    println!("outcomes: {outcomes:?}");

    let gauge = &server.metrics().connections_open;
    let closed = within(CLOSED_WITHIN, || gauge.get() == 0.0).await;
    assert!(closed, "{} connections still open, as if left to the idle timeout", gauge.get());
    assert_eq!(server.rejected("connection_cap"), 0, "the cap was never hit");
    server.stop().await;
}

/// A UDP relay in front of `upstream` that counts the QUIC connections clients start: the
/// distinct source connection IDs of their long-header (handshake) packets.
async fn counting_relay(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<HashSet<Vec<u8>>>>) {
    let front = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket");
    let back = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket");
    back.connect(upstream).await.expect("connects");
    let addr = front.local_addr().expect("an address");
    let connections = Arc::new(Mutex::new(HashSet::new()));
    let seen = Arc::clone(&connections);
    tokio::spawn(async move {
        let (mut to_server, mut to_client) = ([0u8; 2048], [0u8; 2048]);
        let mut client = None;
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut to_server) => {
                    client = Some(from);
                    if let Some(scid) = long_header_scid(&to_server[..n]) {
                        seen.lock().expect("not poisoned").insert(scid.to_vec());
                    }
                    let _ = back.send(&to_server[..n]).await;
                }
                Ok(n) = back.recv(&mut to_client) => {
                    if let Some(client) = client {
                        let _ = front.send_to(&to_client[..n], client).await;
                    }
                }
            }
        }
    });
    (addr, connections)
}

/// The source connection ID of a QUIC long-header packet (RFC 9000 §17.2).
fn long_header_scid(packet: &[u8]) -> Option<&[u8]> {
    if packet.first()? & 0x80 == 0 {
        return None;
    }
    let dcid_len = usize::from(*packet.get(5)?);
    let scid_at = 6 + dcid_len;
    let scid_len = usize::from(*packet.get(scid_at)?);
    packet.get(scid_at + 1..scid_at + 1 + scid_len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_is_not_the_pinned_one_is_one_attempt_and_a_permanent_error() {
    let server = server(16);
    let (relay, connections) = counting_relay(server.addr()).await;
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
    let mut cfg = server.net_config(server.token(1));
    cfg.server = relay;
    cfg.server_cert = other.cert.der().to_vec();

    // Retries that would come quickly, many of them: none is made.
    let opts = ParticipateOptions {
        time_budget: WAIT,
        retry: RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        eligibility: Eligibility::default(),
    };
    let mut device = fedrec_client::net::Device::new(cfg.clone()).expect("a device");
    let err = device.participate_with(&[], &opts, &CancelToken::new()).await.expect_err("not trusted");
    device.shutdown().await;
    assert!(matches!(err, NetError::Tls(_)), "{err:?}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("certificate"), "{err}");
    assert_eq!(connections.lock().expect("not poisoned").len(), 1, "exactly one connection attempt");

    // Through the SDK: one more attempt, and the reason is visible to the app.
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut sdk_cfg = SdkConfig::new(dir.path(), [1; 32]);
    sdk_cfg.coordinator = Some(cfg);
    let sdk = Sdk::open(sdk_cfg).expect("opens");
    sdk.set_consent(Consent { personalization: false, training: true }).expect("consent");
    let result = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || sdk.participate(&opts, &CancelToken::new()))
            .join()
            .expect("the thread ends")
    })
    .await
    .expect("joined");
    let err = result.expect_err("not trusted");
    assert!(matches!(&err, SdkError::Network(m) if m.contains("TLS")), "{err:?}");
    assert_eq!(connections.lock().expect("not poisoned").len(), 2, "one attempt per participation");
    assert_eq!(server.metrics().checked_in.get(), 0);
    server.stop().await;
}
