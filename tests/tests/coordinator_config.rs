//! The real `fedrec-coordinator` binary and its configuration file: `serve` refuses round settings with which no round can commit (`min_reports` above the first-come cohort, windows under a second) before it opens any, and the template `init` writes serves devices running the SDK once a budget is set.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fedrec_client::net::{CancelToken, ParticipateOptions, Participation};
use fedrec_shared::round::ClientOutcome;
use fedrec_shared::wire::Request;
use fedrec_shared::{ModelShape, Objective, Rating};
use fedrec_tests::coordinator::describe;
use fedrec_tests::{CoordinatorDir, WAIT, fedrec_coordinator_bin};

/// The template's model shape.
const TEMPLATE_SHAPE: ModelShape = ModelShape { n_items: 1000, dim: 16, n_segments: 8 };

/// Runs `serve` on `state`, which must exit (at most [`WAIT`]) with a failure; its output.
/// A `serve` that accepts the file keeps running: it is killed and the test fails.
fn serve_must_refuse(state: &CoordinatorDir) -> Output {
    let child = Command::new(fedrec_coordinator_bin())
        .arg("serve")
        .arg("--dir")
        .arg(state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the coordinator binary starts");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => {
            let out = out.expect("the child is reaped");
            assert!(!out.status.success(), "serve must refuse the file:\n{}", describe(&out));
            let status = state.run(&["status"]);
            assert!(status.contains("rounds abandoned: 0"), "no round was opened:\n{status}");
            out
        }
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("serve accepted a configuration with which no round can commit");
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_refuses_min_reports_above_the_first_come_cohort_naming_both_keys() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = CoordinatorDir::init_plain(
        tmp.path().join("state"),
        &[
            ("selection = \"poisson\"", "selection = \"first_come\""),
            ("q = 0.5", "cohort = 5"),
            ("min_reports = 10", "min_reports = 6"),
            ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
        ],
    );
    let said = stderr(&serve_must_refuse(&state));
    assert!(said.contains("rounds.min_reports"), "{said}");
    assert!(said.contains("min_reports = 6 > cohort = 5"), "{said}");
    assert!(said.contains("fedrec.toml"), "the error names the file: {said}");
}

#[test]
fn serve_refuses_round_windows_under_a_second_naming_the_key() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    // The settings that wrote 3,317 abandoned rounds in 4 s.
    let state = CoordinatorDir::init_plain(
        tmp.path().join("state"),
        &[
            ("checkin_window_ms = 30000", "checkin_window_ms = 0"),
            ("round_gap_ms = 1000", "round_gap_ms = 0"),
            ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
        ],
    );
    let said = stderr(&serve_must_refuse(&state));
    assert!(said.contains("rounds.checkin_window_ms") && said.contains("1000"), "{said}");

    state.edit_config(&[("checkin_window_ms = 0", "checkin_window_ms = 1000")]);
    state.edit_config(&[("report_window_ms = 120000", "report_window_ms = 999")]);
    let said = stderr(&serve_must_refuse(&state));
    assert!(said.contains("rounds.report_window_ms"), "{said}");
}

#[test]
fn serve_refuses_an_upload_memory_that_cannot_hold_one_upload() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = CoordinatorDir::init_plain(
        tmp.path().join("state"),
        &[
            ("n_items = 1000", "n_items = 100000"),
            ("dim = 16", "dim = 32"),
            ("max_upload_memory_mb = 256", "max_upload_memory_mb = 26"),
            ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
        ],
    );
    // The largest request is a masked input of 8-byte words (about 26 MB here).
    let said = stderr(&serve_must_refuse(&state));
    assert!(said.contains("limits.max_upload_memory_mb") && said.contains("27 MiB"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_caps_the_connections_of_one_source_address_as_configured() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = CoordinatorDir::init_plain(
        tmp.path().join("state"),
        &[
            ("max_connections_per_source = 64", "max_connections_per_source = 1"),
            ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
        ],
    );
    let token = state.enroll(1).remove(0);
    let serve = state.serve().await;
    let first = serve.device(token.clone(), TEMPLATE_SHAPE, Duration::from_secs(10));
    let held = first.connect().await.expect("the first connection is accepted");
    held.request(&Request::CheckIn(first.check_in())).await.expect("and served");
    // Both devices are on 127.0.0.1: the second connection is over the cap of one.
    let second = serve.device(token, TEMPLATE_SHAPE, Duration::from_secs(10));
    let refused = match second.connect().await {
        Err(_) => true,
        Ok(session) => session.request(&Request::CheckIn(second.check_in())).await.is_err(),
    };
    assert!(refused, "a second connection from the same address is refused");
    assert!(serve.metric("fedrec_rejected_total{reason=\"source_cap\"}").await >= 1.0);
    held.close();
}

/// What the SDK holds for device `d`: decayed interaction strengths (a view is 1, a click 2,
/// a purchase 8, halved per half-life), not ratings.
fn signals(d: usize) -> Vec<Rating> {
    let strengths = [1.0, 2.0, 8.0, 0.5, 3.0, 1.5];
    (0..15)
        .map(|k| Rating {
            item: u32::try_from((d * 37 + k * 61) % TEMPLATE_SHAPE.n_items).expect("fits"),
            value: strengths[(d + k) % strengths.len()],
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_with_a_budget_serves_a_round_to_sdk_devices() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    // Nothing but the budget and shorter windows (and the free loopback ports `init` picks
    // for tests): secure aggregation, noise, Poisson selection as the template has them. A
    // round with noise commits only at its planned end, check-in + report + 3 phase windows.
    let state = CoordinatorDir::init(
        tmp.path().join("state"),
        &[
            ("# epsilon = 8.0", "epsilon = 8.0"),
            ("# delta = 1e-6", "delta = 1e-6"),
            ("checkin_window_ms = 30000", "checkin_window_ms = 3000"),
            ("report_window_ms = 120000", "report_window_ms = 5000"),
            ("secagg_phase_window_ms = 30000", "secagg_phase_window_ms = 3000"),
        ],
    );
    // q = 0.5 and min_reports = 10: with 60 devices checking in, fewer than 10 are selected
    // with probability about 2e-8.
    let n_devices = 60;
    let tokens = state.enroll(n_devices);
    let serve = state.serve().await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for (d, token) in tokens.into_iter().enumerate() {
        let mut device = serve.device(token, TEMPLATE_SHAPE, WAIT);
        tasks.push(tokio::spawn(async move {
            let opts = ParticipateOptions { time_budget: WAIT * 2, ..ParticipateOptions::default() };
            let result = device.participate_with(&signals(d), &opts, &CancelToken::new()).await;
            (result, device.task_params())
        }));
    }
    let committed =
        serve.wait_for_line("a committed round", |l| l.contains("committed: model version")).await;
    let mut n_completed = 0;
    for task in tasks {
        let (result, params) = task.await.expect("the device task ends");
        match result.expect("every device is served") {
            Participation::Outcome(ClientOutcome::Completed { .. }) => {
                n_completed += 1;
                let params = params.expect("a selected device has its task's parameters");
                assert_eq!(
                    params.objective,
                    Objective::Implicit { alpha: 1.0 },
                    "the template trains implicit"
                );
            }
            Participation::NotSelected { .. } | Participation::Outcome(ClientOutcome::NotSelected) => {}
            other => panic!("unexpected participation {other:?}"),
        }
    }
    assert!(n_completed >= 10, "{n_completed} devices completed; {committed}");
    // Shown with --nocapture.
    println!(
        "{n_completed} of {n_devices} devices completed in {:.1} s: {committed}",
        started.elapsed().as_secs_f64()
    );
    println!("{:#?}", serve.lines());
    let status = state.run(&["status"]);
    assert!(!status.contains("rounds committed: 0"), "{status}");
    assert!(status.contains("privacy spent: epsilon = "), "{status}");
}
