//! Devices enforce their own privacy policy: a σ = 0, first-come, min_reports = 1 coordinator is refused under the default policy before anything is trained or sent, and a device stops at its own limit whatever the coordinator says.

use std::time::Duration;

use fedrec_client::net::{CancelToken, Eligibility, ParticipateOptions, RetryPolicy};
use fedrec_client::policy::{PrivacyPolicy, PrivacyRecord, RefusalReason};
use fedrec_client::sdk::{ParticipationReport, RoundOutcome, Sdk, SdkConfig};
use fedrec_shared::ModelShape;
use fedrec_shared::round::{SecureAggregation, Selection, TaskPrivacy};
use fedrec_tests::LoopbackServer;
use fedrec_tests::server::{coordinator_config, initial_model};

const SHAPE: ModelShape = ModelShape { n_items: 20, dim: 4, n_segments: 2 };

fn server() -> LoopbackServer {
    LoopbackServer::start(
        coordinator_config(Selection::FirstCome { cohort: 1 }, 1),
        initial_model(SHAPE, 3.0, 7),
        |_| {},
    )
}

/// Runs `f` on a plain thread (`Sdk::participate` blocks on its own runtime) without
/// blocking the server's runtime.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(move || std::thread::spawn(f).join().expect("the device's thread ends"))
        .await
        .expect("joined")
}

fn opts() -> ParticipateOptions {
    ParticipateOptions {
        time_budget: Duration::from_secs(60),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        },
        eligibility: Eligibility::default(),
    }
}

/// Participates until the device gets a task (a round may not be open yet): at most 40 tries.
fn until_offered(sdk: &Sdk) -> ParticipationReport {
    for _ in 0..40 {
        let report = sdk.participate(&opts(), &CancelToken::new()).expect("participates");
        if report.selected {
            return report;
        }
        std::thread::sleep(report.retry_after.unwrap_or_default().min(Duration::from_millis(200)));
    }
    panic!("the device never got a task");
}

/// The test coordinator's round (σ = 0, first-come, min_reports = 1, plain aggregation), as its
/// task declares it, is refused for each of its four weaknesses: the first the production
/// policy checks is the noise, and lowering each check in turn reveals the next.
#[test]
fn a_noiseless_first_come_tiny_plain_round_fails_the_production_policy_four_times_over() {
    let task = TaskPrivacy::from_config(&coordinator_config(Selection::FirstCome { cohort: 1 }, 1), 10.0);
    let record = PrivacyRecord::default();
    let production = PrivacyPolicy::production();
    assert_eq!(production.admit(&task, &record).err(), Some(RefusalReason::NoiseTooLow));
    let noise_waived = PrivacyPolicy { min_noise_multiplier: 0.0, ..production };
    assert_eq!(noise_waived.admit(&task, &record).err(), Some(RefusalReason::NotSampled));
    let sampling_waived = PrivacyPolicy { require_sampling: false, ..noise_waived };
    assert_eq!(sampling_waived.admit(&task, &record).err(), Some(RefusalReason::CohortTooSmall));
    let cohort_waived = PrivacyPolicy { min_cohort: 1, ..sampling_waived };
    assert_eq!(cohort_waived.admit(&task, &record).err(), Some(RefusalReason::SecureAggregationRequired));
    let secure_waived = PrivacyPolicy { require_secure_aggregation: false, ..cohort_waived };
    assert_eq!(secure_waived.admit(&task, &record).err(), Some(RefusalReason::EpsilonTooHigh));
    // A noised Poisson round of a large population passes the same production policy, with
    // secure aggregation only.
    let mut noised = coordinator_config(Selection::Poisson { q: 0.01 }, 1);
    noised.noise_multiplier = 2.0;
    noised.population = Some(100_000);
    let plain = production.admit(&TaskPrivacy::from_config(&noised, 10.0), &record);
    assert_eq!(plain.err(), Some(RefusalReason::SecureAggregationRequired));
    noised.secure = Some(SecureAggregation {
        dropout: 0.33,
        corrupt: 0.05,
        phase_window: Duration::from_secs(30),
        distributed: None,
    });
    let charge = production.admit(&TaskPrivacy::from_config(&noised, 10.0), &record).expect("admitted");
    assert!(charge.epsilon > 0.0 && charge.epsilon <= production.max_epsilon_per_round, "{charge:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_refuses_the_coordinators_task_and_sends_nothing() {
    let server = server();
    let dir = tempfile::tempdir().expect("a temp dir");
    let device = server.open_sdk(1, dir.path(), SdkConfig::new(dir.path(), [0; 32]).policy);
    let report = off_runtime(move || {
        let report = until_offered(&device);
        (report, device.export().expect("export"), device.privacy_record().expect("record"))
    })
    .await;
    let (report, export, record) = report;
    assert_eq!(report.outcome, RoundOutcome::PolicyRefused, "{report:?}");
    assert_eq!(report.refusal, Some(RefusalReason::NoiseTooLow));
    assert!(report.selected && !report.completed && report.round.is_some());
    // The coordinator got no upload: the device was a dropout, and the round (min_reports 1)
    // is abandoned at its report deadline. The metrics have no change notification: poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.metrics().rounds_abandoned.get() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.metrics().rounds_abandoned.get() >= 1, "the round was not abandoned");
    assert_eq!(server.metrics().reported.get(), 0);
    assert_eq!(server.metrics().rounds_committed.get(), 0);
    // The device recorded nothing.
    assert_eq!(record.n_rounds(), 0);
    assert!(export.contains("\"rounds_contributed\": 0"), "{export}");
    server.stop().await;
}

/// A device whose policy admits the noiseless round records it (ε = ∞: it has lost its
/// guarantee), and, reopened under the production policy, refuses every further round
/// without even checking in: its own limit holds whatever the coordinator offers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_records_what_it_contributed_and_stops_at_its_own_limit() {
    let server = server();
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().to_owned();
    let open = server.open_sdk(2, &path, PrivacyPolicy::unenforced());
    let token = server.token(2);
    let net = server.net_config(token);
    let (report, export) = off_runtime(move || {
        let mut report = until_offered(&open);
        for _ in 0..40 {
            if report.completed {
                break;
            }
            report = until_offered(&open);
        }
        let export = open.export().expect("export");
        (report, export)
    })
    .await;
    assert_eq!(report.outcome, RoundOutcome::Completed, "{report:?}");
    assert!(export.contains("\"rounds_contributed\": 1"), "{export}");
    assert!(export.contains("\"epsilon\": \"inf\""), "{export}");
    let checked_in = server.metrics().checked_in.get();

    let (strict_report, record) = off_runtime(move || {
        let mut cfg = SdkConfig::new(&path, [2; 32]);
        cfg.coordinator = Some(net);
        let strict = Sdk::open(cfg).expect("reopens with the production policy");
        let report = strict.participate(&opts(), &CancelToken::new()).expect("participates");
        (report, strict.privacy_record().expect("record"))
    })
    .await;
    assert_eq!(strict_report.outcome, RoundOutcome::PolicyRefused);
    assert_eq!(strict_report.refusal, Some(RefusalReason::DeviceBudgetSpent));
    assert_eq!(record.n_rounds(), 1, "the record survived the reopen");
    assert_eq!(server.metrics().checked_in.get(), checked_in, "a spent device does not check in");
    server.stop().await;
}

/// A device whose policy requires distributed noise refuses the coordinator's round (plain
/// aggregation, no noise) however permissive the rest of its policy, and sends nothing: the
/// coordinator cannot take the noise away from such a device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_requires_distributed_noise_sends_nothing_to_a_central_round() {
    let server = server();
    let dir = tempfile::tempdir().expect("a temp dir");
    let policy = PrivacyPolicy { require_distributed_noise: true, ..PrivacyPolicy::unenforced() };
    assert!(policy.distributed_policy().require_distributed);
    let device = server.open_sdk(3, dir.path(), policy);
    let report = off_runtime(move || until_offered(&device)).await;
    assert!(report.selected && !report.completed, "{report:?}");
    assert_ne!(report.outcome, RoundOutcome::Completed, "{report:?}");
    // Nothing reached the coordinator: the round is abandoned without a report.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.metrics().rounds_abandoned.get() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.metrics().rounds_abandoned.get() >= 1, "the round was not abandoned");
    assert_eq!(server.metrics().reported.get(), 0);
}
