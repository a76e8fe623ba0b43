//! The SDK against a scripted coordinator on loopback QUIC: `Busy` (pace steering) is retried after its hint, and a finished federation's final model is stored.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedrec_client::error::SdkError;
use fedrec_client::net::{CancelToken, Eligibility, NetConfig, ParticipateOptions, RetryPolicy};
use fedrec_client::sdk::{Consent, RoundOutcome, Sdk};
use fedrec_client::signals::EventKind;
use fedrec_shared::ModelShape;
use fedrec_shared::wire::{self, ALPN, CheckIn, ErrorCode, LEN_PREFIX, Limits, Request, Response};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use support::*;

const NET_SHAPE: ModelShape = ModelShape { n_items: 20, dim: 4, n_segments: 2 };

/// The answer to the `n`-th check-in (0 for the first).
type Script = dyn Fn(usize, &CheckIn) -> Response + Send + Sync;

/// When each check-in arrived, and the model version the device said it holds.
type CheckIns = Arc<Mutex<Vec<(Instant, Option<u64>)>>>;

/// A QUIC server that speaks the wire protocol and answers each check-in from a script; it
/// records when each check-in arrived and which model version the device said it holds.
struct Scripted {
    addr: SocketAddr,
    cert: Vec<u8>,
    check_ins: CheckIns,
    _rt: tokio::runtime::Runtime,
}

impl Scripted {
    fn start(script: impl Fn(usize, &CheckIn) -> Response + Send + Sync + 'static) -> Scripted {
        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
        let cert = certified.cert.der().to_vec();
        let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert.clone())], key.into())
            .expect("a certificate and its key");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).expect("a QUIC TLS configuration");
        let endpoint = {
            let _guard = rt.enter();
            quinn::Endpoint::server(
                quinn::ServerConfig::with_crypto(Arc::new(quic)),
                SocketAddr::from(([127, 0, 0, 1], 0)),
            )
            .expect("binds to loopback")
        };
        let addr = endpoint.local_addr().expect("an address");
        let check_ins: CheckIns = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let seen = Arc::clone(&check_ins);
        rt.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (script, seen) = (Arc::clone(&script), Arc::clone(&seen));
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let limits = Limits::for_shape(&NET_SHAPE);
                        let mut prefix = [0u8; LEN_PREFIX];
                        recv.read_exact(&mut prefix).await.expect("a length prefix");
                        let len = wire::frame_len(prefix, limits.max_request()).expect("a valid length");
                        let mut payload = vec![0u8; len];
                        recv.read_exact(&mut payload).await.expect("a request");
                        let Request::CheckIn(check_in) =
                            wire::decode_request(&payload, &limits).expect("a valid request")
                        else {
                            panic!("the script only answers check-ins");
                        };
                        let n = {
                            let mut seen = seen.lock().expect("not poisoned");
                            seen.push((Instant::now(), check_in.cached_model_version));
                            seen.len() - 1
                        };
                        let frame = wire::encode(&script(n, &check_in)).expect("encodes");
                        send.write_all(&frame).await.expect("the answer is sent");
                        send.finish().expect("the stream finishes");
                    }
                });
            }
        });
        Scripted { addr, cert, check_ins, _rt: rt }
    }

    fn net_config(&self) -> NetConfig {
        NetConfig {
            server: self.addr,
            server_name: "localhost".into(),
            server_cert: self.cert.clone(),
            token: vec![1; 16],
            sdk_version: "test".into(),
            shape: NET_SHAPE,
            timeout: Duration::from_secs(10),
        }
    }

    fn check_ins(&self) -> Vec<(Instant, Option<u64>)> {
        self.check_ins.lock().expect("not poisoned").clone()
    }
}

/// An SDK in `dir` for `server`, with training consent and one event.
fn sdk_for(server: &Scripted, dir: &std::path::Path) -> Sdk {
    let mut cfg = config(dir);
    cfg.coordinator = Some(server.net_config());
    let sdk = Sdk::open(cfg).expect("opens");
    sdk.set_consent(Consent { personalization: true, training: true }).expect("consent");
    sdk.record(event(3, EventKind::Click, now_s())).expect("record");
    sdk
}

/// Quick retries, so that only the coordinator's hint makes a wait long.
fn quick(max_attempts: u32) -> ParticipateOptions {
    ParticipateOptions {
        time_budget: Duration::from_secs(60),
        retry: RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        },
        eligibility: Eligibility::default(),
    }
}

const HINT: Duration = Duration::from_millis(300);

#[test]
fn a_busy_coordinator_is_retried_after_its_hint() {
    let server = Scripted::start(|n, _| match n {
        0 => Response::error_with_retry(ErrorCode::Busy, "at capacity", HINT),
        _ => Response::NotSelected { round: 1, retry_after_ms: 50 },
    });
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, dir.path());
    let report = sdk.participate(&quick(5), &CancelToken::new()).expect("served after the hint");
    assert_eq!(report.outcome, RoundOutcome::NotSelected);
    assert_eq!(report.retry_after, Some(Duration::from_millis(50)));
    let check_ins = server.check_ins();
    assert_eq!(check_ins.len(), 2, "one retry");
    let waited = check_ins[1].0 - check_ins[0].0;
    // The hint, not the 10 ms backoff, paced the retry (the jitter only adds to it).
    assert!(waited >= HINT, "retried after {waited:?}, before the hint");
}

#[test]
fn busy_with_no_attempt_left_is_a_network_error() {
    let server = Scripted::start(|_, _| Response::error_with_retry(ErrorCode::Busy, "at capacity", HINT));
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, dir.path());
    let err = sdk.participate(&quick(1), &CancelToken::new()).expect_err("busy");
    assert!(matches!(&err, SdkError::Network(m) if m.contains("busy")), "{err:?}");
    assert_eq!(server.check_ins().len(), 1);
}

#[test]
fn a_finished_federation_hands_over_its_final_model_which_is_stored() {
    let last = model(7, NET_SHAPE);
    let server = Scripted::start(move |_, check_in| Response::finished(&last, check_in.cached_model_version));
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, dir.path());
    sdk.install_model(model(3, NET_SHAPE)).expect("an older model");

    let report = sdk.participate(&quick(3), &CancelToken::new()).expect("finished is not an error");
    assert_eq!(report.outcome, RoundOutcome::Finished);
    assert!(!report.selected && !report.completed, "{report:?}");
    assert_eq!(report.model_version, Some(7));
    assert_eq!(sdk.model_version().expect("version"), Some(7), "the final model is installed");
    assert_eq!(sdk.recommend(3, &Default::default()).expect("recommend").len(), 3);
    drop(sdk);

    // Stored, not only in memory: it survives a restart, and the next check-in says so, so
    // the coordinator leaves the model out.
    let sdk = sdk_for(&server, dir.path());
    assert_eq!(sdk.model_version().expect("version"), Some(7));
    let report = sdk.participate(&quick(3), &CancelToken::new()).expect("finished again");
    assert_eq!(report.outcome, RoundOutcome::Finished);
    assert_eq!(sdk.model_version().expect("version"), Some(7));
    let announced: Vec<Option<u64>> = server.check_ins().iter().map(|c| c.1).collect();
    assert_eq!(announced, [Some(3), Some(7)]);

    // A new device, with no model at all, gets the final model too.
    let fresh = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, fresh.path());
    let report = sdk.participate(&quick(3), &CancelToken::new()).expect("finished");
    assert_eq!((report.outcome, report.model_version), (RoundOutcome::Finished, Some(7)));
    assert_eq!(sdk.model_version().expect("version"), Some(7));
}

#[test]
fn finished_without_the_model_the_device_lacks_is_refused() {
    // A coordinator that leaves the final model out for a device that does not hold it.
    let server = Scripted::start(|_, _| Response::Finished { model_version: 9, model: None });
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, dir.path());
    let err = sdk.participate(&quick(3), &CancelToken::new()).expect_err("no model to hold");
    assert!(matches!(&err, SdkError::Network(m) if m.contains("misbehaved")), "{err:?}");
    assert_eq!(sdk.model_version().expect("version"), None);
}
