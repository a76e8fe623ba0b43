//! The `Sdk` facade: consent gates every use of the user's data, forget leaves nothing behind, export shows everything, and a round against a real coordinator on loopback uploads only with training consent.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedrec_client::error::SdkError;
use fedrec_client::net::{CancelToken, NetConfig, ParticipateOptions};
use fedrec_client::recommend::{RecommendOptions, Source};
use fedrec_client::rules::Context;
use fedrec_client::sdk::{Consent, ParticipationReport, RoundOutcome, Sdk};
use fedrec_client::signals::{Event, EventKind};
use fedrec_client::store::TEMP_FILE;
use fedrec_coordinator::auth::{DeviceId, Enroller, RevocationList, TokenKey, Verifier};
use fedrec_coordinator::metrics::ServerMetrics;
use fedrec_coordinator::server::{ServeConfig, Server};
use fedrec_shared::round::{CoordinatorConfig, Selection};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::wire::rules::{
    ActivityBound, ActivityWindow, Condition, Rule, Ruleset, SignedRuleset, Slot, signing_input,
};
use fedrec_shared::{ModelShape, Objective, TrainParams};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::Value;
use support::*;

fn export(sdk: &Sdk) -> Value {
    serde_json::from_str(&sdk.export().expect("export")).expect("export is JSON")
}

const PERSONAL: Consent = Consent { personalization: true, training: false };

#[test]
fn consent_is_off_by_default_and_persisted() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = Sdk::open(config(dir.path())).expect("opens");
    assert_eq!(sdk.consent().expect("consent"), Consent { personalization: false, training: false });
    sdk.set_consent(Consent { personalization: false, training: true }).expect("set");
    drop(sdk);
    let sdk = Sdk::open(config(dir.path())).expect("reopens");
    assert_eq!(sdk.consent().expect("consent"), Consent { personalization: false, training: true });
}

#[test]
fn events_need_consent_and_a_finite_non_negative_value() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = Sdk::open(config(dir.path())).expect("opens");
    let err = sdk.record(event(1, EventKind::View, now_s())).expect_err("no consent");
    assert!(matches!(err, SdkError::ConsentRequired { .. }), "{err:?}");
    sdk.set_consent(PERSONAL).expect("set");
    for value in [f32::NAN, f32::INFINITY, -0.5] {
        let e = Event { item: 1, kind: EventKind::Rating, value, timestamp_s: now_s() };
        let err = sdk.record(e).expect_err("refused");
        assert!(matches!(err, SdkError::InvalidArgument(_)), "{err:?}");
    }
    assert!(export(&sdk)["events"].as_array().expect("events").is_empty());
    sdk.record(event(1, EventKind::View, now_s())).expect("recorded");
    // A batch is all or nothing.
    let bad = Event { item: 3, kind: EventKind::View, value: f32::NAN, timestamp_s: now_s() };
    let err = sdk.record_batch(&[event(2, EventKind::View, now_s()), bad]).expect_err("one is invalid");
    assert!(matches!(err, SdkError::InvalidArgument(_)), "{err:?}");
    assert_eq!(export(&sdk)["events"].as_array().expect("events").len(), 1);
    sdk.record_batch(&[event(2, EventKind::View, now_s()), event(3, EventKind::Click, now_s())])
        .expect("batch");
    assert_eq!(export(&sdk)["events"].as_array().expect("events").len(), 3);
}

#[test]
fn recommendations_exclude_consumed_items_and_use_the_user_vector() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    let recs = sdk.recommend(SHAPE.n_items, &RecommendOptions::default()).expect("recommend");
    let consumed = [1, 4, 9, 16];
    assert_eq!(recs.len(), SHAPE.n_items - consumed.len());
    assert!(recs.iter().all(|r| !consumed.contains(&r.item)), "{recs:?}");
    assert!(recs.iter().all(|r| r.source == Source::Collaborative), "{recs:?}");
    let segment = sdk.segment().expect("segment").expect("a user with events has a segment");
    assert!(segment.id < SHAPE.n_segments as u32);
    let why = sdk.explain(recs[0].item).expect("explain");
    assert!(why.because.iter().all(|(item, _)| consumed.contains(item)), "{why:?}");
}

#[test]
fn without_personalization_consent_only_popularity_is_used() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    sdk.recommend(3, &RecommendOptions::default()).expect("a user vector is reconstructed");
    assert!(export(&sdk)["user_vector"].is_object());
    sdk.set_consent(Consent { personalization: false, training: true }).expect("withdraw");
    assert!(export(&sdk)["user_vector"].is_null(), "withdrawing drops the user vector");
    assert_eq!(export(&sdk)["events"].as_array().expect("events").len(), 5, "events stay until forget");
    let recs = sdk.recommend(SHAPE.n_items, &RecommendOptions::default()).expect("recommend");
    assert_eq!(recs.len(), SHAPE.n_items, "the history is not read, so nothing is excluded");
    assert!(recs.iter().all(|r| r.source == Source::Popularity), "{recs:?}");
    for err in [sdk.segment().expect_err("segment"), sdk.explain(0).expect_err("explain")] {
        assert_eq!(err, SdkError::ConsentRequired { purpose: "personalization" });
    }
}

#[test]
fn inference_without_a_model_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = Sdk::open(config(dir.path())).expect("opens");
    sdk.set_consent(PERSONAL).expect("set");
    assert_eq!(sdk.recommend(5, &RecommendOptions::default()).expect_err("no model"), SdkError::NoModel);
    assert_eq!(sdk.segment().expect_err("no model"), SdkError::NoModel);
}

#[test]
fn a_model_over_the_memory_budget_is_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut cfg = config(dir.path());
    cfg.model_budget_bytes = 256;
    let sdk = Sdk::open(cfg).expect("opens");
    let err = sdk.install_model(model(1, SHAPE)).expect_err("over budget");
    assert!(matches!(err, SdkError::TooLarge(_)), "{err:?}");
    assert_eq!(sdk.model_version().expect("version"), None);
}

#[test]
fn export_contains_everything_recorded() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    sdk.recommend(3, &RecommendOptions::default()).expect("recommend");
    let doc = export(&sdk);
    let items: Vec<u64> =
        doc["events"].as_array().expect("events").iter().map(|e| e["item"].as_u64().expect("item")).collect();
    // Oldest first.
    assert_eq!(items, [16, 4, 9, 4, 1]);
    assert!(doc["events"].as_array().expect("events").iter().all(|e| e["kind"] == "click"));
    assert_eq!(doc["consent"]["personalization"], true);
    assert_eq!(doc["consent"]["training"], true);
    assert_eq!(doc["model_version"], 3);
    assert_eq!(doc["user_vector"]["model_version"], 3);
    assert_eq!(doc["user_vector"]["factors"].as_array().expect("factors").len(), SHAPE.dim);
    assert!(doc["segment"]["id"].is_u64(), "{doc}");
}

#[test]
fn forget_leaves_no_store_file_and_closes_the_handle() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    std::fs::write(dir.path().join(TEMP_FILE), b"a leftover of a crashed write").expect("write");
    std::fs::write(dir.path().join("app-settings.json"), b"{}").expect("write");
    sdk.forget().expect("forget");
    assert_eq!(files(dir.path()), ["app-settings.json"], "only the app's own file is left");
    assert_eq!(sdk.forget().expect_err("closed"), SdkError::Closed);
    assert_eq!(sdk.recommend(1, &RecommendOptions::default()).expect_err("closed"), SdkError::Closed);
    assert_eq!(sdk.record(event(1, EventKind::View, now_s())).expect_err("closed"), SdkError::Closed);
    assert_eq!(sdk.export().expect_err("closed").code(), 14);
    drop(sdk);
    let sdk = Sdk::open(config(dir.path())).expect("a fresh store");
    assert!(export(&sdk)["events"].as_array().expect("events").is_empty());
}

#[test]
fn erase_needs_no_key() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    Sdk::erase(dir.path()).expect("erase");
    assert!(files(dir.path()).is_empty());
}

#[test]
fn the_handle_is_shared_between_threads() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = Arc::new(populated(dir.path()));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let sdk = Arc::clone(&sdk);
            std::thread::spawn(move || {
                for k in 0..10 {
                    sdk.record(event(t * 10 + k % 5, EventKind::View, now_s())).expect("record");
                    sdk.recommend(3, &RecommendOptions::default()).expect("recommend");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no thread panicked");
    }
    assert_eq!(export(&sdk)["events"].as_array().expect("events").len(), 5 + 40);
}

/// A ruleset with one slot: "buyer" after a purchase in the last 24 hours, else "generic".
fn signed_ruleset(key: &Ed25519KeyPair, version: u64) -> Vec<u8> {
    let window = ActivityWindow { kind: Some(EventKind::Purchase.code()), hours: 24 };
    let ruleset = Ruleset {
        version,
        slots: vec![Slot {
            name: "banner".into(),
            default: "generic".into(),
            rules: vec![Rule {
                priority: 1,
                variant: "buyer".into(),
                conditions: vec![Condition::Activity { window, bound: ActivityBound::AtLeast(1) }],
            }],
        }],
    };
    let payload = ruleset.to_payload().expect("a valid ruleset");
    let signature = key.sign(&signing_input(&payload)).as_ref().to_vec();
    SignedRuleset { payload, signature }.to_bytes().expect("encodes")
}

#[test]
fn variants_use_local_activity_only_with_consent_and_rulesets_must_be_signed() {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("rng");
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut cfg = config(dir.path());
    cfg.rules_public_key = Some(key.public_key().as_ref().to_vec());
    let sdk = Sdk::open(cfg.clone()).expect("opens");
    let ctx = Context::at(12, 0, 2);
    assert!(matches!(sdk.choose_variant("banner", &ctx), Err(SdkError::NotConfigured(_))));

    let signed = signed_ruleset(&key, 1);
    let mut tampered = signed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(sdk.install_ruleset(&tampered), Err(SdkError::RulesRejected(_))));
    sdk.install_ruleset(&signed).expect("a signed ruleset installs");

    sdk.set_consent(Consent { personalization: false, training: true }).expect("set");
    sdk.record(Event { item: 2, kind: EventKind::Purchase, value: 1.0, timestamp_s: now_s() })
        .expect("record");
    assert_eq!(sdk.choose_variant("banner", &ctx).expect("choose"), "generic", "activity needs consent");
    sdk.set_consent(PERSONAL).expect("set");
    assert_eq!(sdk.choose_variant("banner", &ctx).expect("choose"), "buyer");
    assert!(matches!(sdk.choose_variant("nope", &ctx), Err(SdkError::InvalidArgument(_))));
    drop(sdk);
    let sdk = Sdk::open(cfg).expect("reopens");
    assert_eq!(sdk.choose_variant("banner", &ctx).expect("the ruleset was stored"), "buyer");
}

// ---- Participation against a real coordinator on loopback ----

const NET_SHAPE: ModelShape = ModelShape { n_items: 20, dim: 4, n_segments: 2 };

struct Coordinator {
    addr: SocketAddr,
    cert: Vec<u8>,
    enroller: Enroller,
    metrics: Arc<ServerMetrics>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Coordinator {
    fn start(require_charging: bool) -> Coordinator {
        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        let key = TokenKey::generate(&SystemRandom::new()).expect("the system RNG works");
        let verifier = Verifier::new(vec![key.clone()], RevocationList::new()).expect("one key");
        // Not the SDK's default parameters (alpha 1): the device must adopt the task's.
        let train = TrainParams {
            objective: Objective::Implicit { alpha: 2.5 },
            l2_user: 0.1,
            l2_user_bias: 0.1,
            l2_item: 0.01,
            l2_item_bias: 0.01,
            user_support_exponent: 0.0,
        };
        let coordinator = CoordinatorConfig {
            train,
            optimizer: ServerOptimizer::adam(0.1),
            selection: Selection::FirstCome { cohort: 1 },
            min_reports: 1,
            population: None,
            checkin_window: Duration::from_secs(2),
            report_window: Duration::from_secs(5),
            clip_norm: 10.0,
            adaptive_clip: None,
            noise_multiplier: 0.0,
            centroids: CentroidPolicy::with_min_count(1.0),
            privacy: None,
            secure: None,
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut cfg = ServeConfig::new(listen, coordinator, model(1, NET_SHAPE).model, verifier);
        cfg.round_gap = Duration::from_millis(20);
        cfg.retry_after = Duration::from_millis(50);
        cfg.eligibility.require_charging = require_charging;
        let server = {
            let _guard = rt.enter();
            Server::bind(cfg).expect("the server binds to loopback")
        };
        let (addr, cert, metrics) = (server.local_addr(), server.cert_der().to_vec(), server.metrics());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            let _ = server
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Coordinator { addr, cert, enroller: Enroller::new(key), metrics, rt, stop: Some(stop) }
    }

    fn net_config(&self) -> NetConfig {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64;
        let token = self.enroller.issue(DeviceId::new(1), ms, None).expect("a token");
        NetConfig {
            server: self.addr,
            server_name: "localhost".into(),
            server_cert: self.cert.clone(),
            token: token.to_vec(),
            sdk_version: "test".into(),
            shape: NET_SHAPE,
            timeout: Duration::from_secs(10),
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = &self.rt;
    }
}

fn opts() -> ParticipateOptions {
    ParticipateOptions { time_budget: Duration::from_secs(30), ..ParticipateOptions::default() }
}

/// An SDK in `dir` configured for `server`, with `consent`. The test coordinator adds no
/// noise, so the device's privacy policy is lowered to admit it (and still records it).
fn sdk_for(server: &Coordinator, dir: &std::path::Path, consent: Consent) -> Sdk {
    let mut cfg = config(dir);
    cfg.coordinator = Some(server.net_config());
    cfg.policy = fedrec_client::policy::PrivacyPolicy::unenforced();
    let sdk = Sdk::open(cfg).expect("opens");
    sdk.set_consent(consent).expect("consent");
    sdk
}

/// Participates until the device is selected (a round may not be open yet), for at most 30 s.
fn participate_until_selected(sdk: &Sdk, opts: &ParticipateOptions) -> ParticipationReport {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = sdk.participate(opts, &CancelToken::new()).expect("participates");
        if report.selected || Instant::now() > deadline {
            return report;
        }
    }
}

#[test]
fn participation_needs_training_consent_and_then_completes_a_round() {
    let server = Coordinator::start(false);
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, dir.path(), PERSONAL);
    let now = now_s();
    for item in [2u32, 3, 5, 7, 11] {
        sdk.record(event(item, EventKind::Purchase, now)).expect("record");
    }

    let err = sdk.participate(&opts(), &CancelToken::new()).expect_err("no training consent");
    assert_eq!(err, SdkError::ConsentRequired { purpose: "training" });
    // Nothing reached the coordinator: not a byte, not a connection.
    assert_eq!(server.metrics.bytes_in.get(), 0);
    assert_eq!(server.metrics.checked_in.get(), 0);

    let cancelled = CancelToken::new();
    cancelled.cancel();
    sdk.set_consent(Consent { personalization: true, training: true }).expect("opt in");
    assert_eq!(sdk.participate(&opts(), &cancelled).expect_err("cancelled"), SdkError::Cancelled);

    let report = participate_until_selected(&sdk, &opts());
    assert!(report.completed && report.selected, "{report:?}");
    assert_eq!(report.outcome, RoundOutcome::Completed);
    assert!(server.metrics.bytes_in.get() > 0);
    // The downloaded model is stored and used offline.
    assert_eq!(sdk.model_version().expect("version"), report.model_version);
    assert!(report.model_version.is_some());
    let recs = sdk.recommend(5, &RecommendOptions::default()).expect("recommend");
    assert!(recs.iter().all(|r| ![2, 3, 5, 7, 11].contains(&r.item)));
    // The task's training parameters are kept for solving the user vector on the device.
    let export: serde_json::Value = serde_json::from_str(&sdk.export().expect("export")).expect("JSON");
    assert_eq!(export["training_params"]["objective"], "implicit");
    assert_eq!(export["training_params"]["alpha"], 2.5);
}

#[test]
fn a_coordinator_policy_the_device_does_not_meet_is_not_eligible() {
    let server = Coordinator::start(true);
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, dir.path(), Consent { personalization: false, training: true });
    let err = sdk.participate(&opts(), &CancelToken::new()).expect_err("not charging");
    assert_eq!(err, SdkError::NotEligible);
    let mut charging = opts();
    charging.eligibility.charging = true;
    let report = participate_until_selected(&sdk, &charging);
    assert!(report.selected, "{report:?}");
}

#[test]
fn participation_without_a_coordinator_or_inside_a_runtime_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = Sdk::open(config(dir.path())).expect("opens");
    sdk.set_consent(Consent { personalization: false, training: true }).expect("opt in");
    let err = sdk.participate(&opts(), &CancelToken::new()).expect_err("offline");
    assert!(matches!(err, SdkError::NotConfigured(_)), "{err:?}");

    let server = Coordinator::start(false);
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = sdk_for(&server, dir.path(), Consent { personalization: false, training: true });
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let err =
        rt.block_on(async { sdk.participate(&opts(), &CancelToken::new()) }).expect_err("blocking in async");
    assert!(matches!(err, SdkError::InvalidArgument(_)), "{err:?}");
}

/// A "coordinator" that never answers: a participation against it waits on the network until
/// something stops it. Returns the socket (to see the first packet arrive) and a config.
fn silent_coordinator() -> (std::net::UdpSocket, NetConfig) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
    let net = NetConfig {
        server: socket.local_addr().expect("an address"),
        server_name: "localhost".into(),
        server_cert: cert.cert.der().to_vec(),
        token: vec![1; 16],
        sdk_version: "test".into(),
        shape: NET_SHAPE,
        timeout: Duration::from_secs(60),
    };
    (socket, net)
}

/// Starts a participation on another thread against a silent coordinator, waits until its
/// first packet arrives (the round is under way), runs `interrupt`, and returns what the
/// participation returned. Its own budget is 10 minutes: if the interruption did not stop
/// it, the 60 s deadline on its answer fails the test.
fn interrupted_participation(interrupt: impl FnOnce(&Sdk)) -> Result<ParticipationReport, SdkError> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (socket, net) = silent_coordinator();
    let mut cfg = config(dir.path());
    cfg.coordinator = Some(net);
    let sdk = Arc::new(Sdk::open(cfg).expect("opens"));
    sdk.set_consent(Consent { personalization: true, training: true }).expect("consent");
    sdk.record(event(1, EventKind::Click, now_s())).expect("record");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let sdk = Arc::clone(&sdk);
        std::thread::spawn(move || {
            let opts =
                ParticipateOptions { time_budget: Duration::from_secs(600), ..ParticipateOptions::default() };
            let _ = tx.send(sdk.participate(&opts, &CancelToken::new()));
        });
    }
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("a read timeout");
    let mut buf = [0u8; 2048];
    socket.recv_from(&mut buf).expect("the participation reaches the network");
    interrupt(&sdk);
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the participation stops when interrupted, not at its budget")
}

#[test]
fn withdrawing_training_consent_stops_a_running_participation() {
    let result = interrupted_participation(|sdk| {
        sdk.set_consent(Consent { personalization: true, training: false }).expect("withdraw");
    });
    assert_eq!(result.expect_err("stopped"), SdkError::ConsentRequired { purpose: "training" });
}

#[test]
fn forgetting_stops_a_running_participation() {
    let result = interrupted_participation(|sdk| sdk.forget().expect("forget"));
    assert_eq!(result.expect_err("stopped"), SdkError::Closed);
}
