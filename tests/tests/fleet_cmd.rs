//! `fedrec-sim fleet` against a `fedrec-coordinator serve` process it did not start: an operator's smoke test of a deployment, end to end through both real binaries.

use std::path::Path;

use fedrec_tests::coordinator::{CoordinatorDir, describe};
use fedrec_tests::{encode_hex, fedrec_sim};

const N_DEVICES: usize = 6;

/// A plain first-come coordinator where the six devices make a round.
fn prepare(dir: &Path) -> CoordinatorDir {
    CoordinatorDir::init_plain(
        dir,
        &[
            ("n_items = 1000", "n_items = 40"),
            ("dim = 16", "dim = 4"),
            ("n_segments = 8", "n_segments = 2"),
            ("selection = \"poisson\"", "selection = \"first_come\""),
            ("q = 0.5", "cohort = 6"),
            ("min_reports = 10", "min_reports = 3"),
            ("checkin_window_ms = 30000", "checkin_window_ms = 5000"),
            ("report_window_ms = 120000", "report_window_ms = 30000"),
            ("round_gap_ms = 1000", "round_gap_ms = 50"),
            ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
        ],
    )
}

/// Runs `fedrec-sim fleet` against `addr` with the devices of `tokens` and `extra` arguments.
fn fleet(
    dir: &Path,
    addr: &str,
    state: &Path,
    tokens: &Path,
    json: &Path,
    extra: &[&str],
) -> std::process::Output {
    let cert = state.join("cert.der");
    let (cert, tokens, json) = (cert.to_string_lossy(), tokens.to_string_lossy(), json.to_string_lossy());
    let mut args = vec![
        "fleet",
        "--coordinator",
        addr,
        "--cert",
        &cert,
        "--tokens",
        &tokens,
        "--dataset",
        "synthetic",
        "--items",
        "40",
        "--dim",
        "4",
        "--segments",
        "2",
        "--rounds",
        "2",
        "--json",
        &json,
    ];
    args.extend(extra);
    // The test's runtime threads wait on nothing meanwhile: the coordinator is another process.
    tokio::task::block_in_place(|| fedrec_sim(dir, &args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_takes_part_in_a_running_coordinators_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = prepare(&dir.path().join("state"));
    let tokens = state.enroll(N_DEVICES);
    let token_file = dir.path().join("tokens.txt");
    std::fs::write(&token_file, tokens.iter().map(|t| encode_hex(t) + "\n").collect::<String>())
        .expect("writing the tokens");
    let serve = state.serve().await;
    let addr = serve.addr().to_string();
    let json = dir.path().join("fleet.json");
    let out = fleet(dir.path(), &addr, state.path(), &token_file, &json, &["--timeout-secs", "60"]);
    assert!(out.status.success(), "fedrec-sim fleet failed:\n{}", describe(&out));

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the report is written")).expect("JSON");
    assert_eq!(report["command"], "fleet");
    assert_eq!(report["devices"], N_DEVICES);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        // Every device is in the first-come cohort of six and its update is acknowledged.
        assert_eq!(r["completed"], N_DEVICES, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
    }
    // The coordinator committed what the devices sent, once per fleet round.
    serve.wait_for_line("round 0's commit", |l| l.starts_with("round 0 ") && l.contains("committed")).await;
    serve.wait_for_line("round 1's commit", |l| l.starts_with("round 1 ") && l.contains("committed")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_and_a_too_small_dataset_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = prepare(&dir.path().join("state"));
    state.enroll(1);
    let serve = state.serve().await;
    let addr = serve.addr().to_string();
    let json = dir.path().join("fleet.json");

    // Tokens the coordinator never issued: every device is refused, and the run says so.
    let forged = dir.path().join("forged.txt");
    std::fs::write(&forged, format!("{}\n{}\n", "ab".repeat(40), "cd".repeat(40))).expect("writing tokens");
    // A short budget: the devices' refusals are permanent, their time budget bounds the rest.
    let out =
        fleet(dir.path(), &addr, state.path(), &forged, &json, &["--users", "6", "--timeout-secs", "5"]);
    assert!(!out.status.success(), "forged tokens must fail the run:\n{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no device completed a round"),
        "{}",
        describe(&out)
    );

    // More tokens than the data has users: refused before any device connects.
    let many = dir.path().join("many.txt");
    std::fs::write(&many, format!("{}\n", "ab".repeat(40)).repeat(8)).expect("writing tokens");
    let out = fleet(dir.path(), &addr, state.path(), &many, &json, &["--users", "6"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("8 tokens but the dataset has 6 users"),
        "{}",
        describe(&out)
    );

    // A token file that is not hex names the line.
    let garbled = dir.path().join("garbled.txt");
    std::fs::write(&garbled, "not a token\n").expect("writing tokens");
    let out = fleet(dir.path(), &addr, state.path(), &garbled, &json, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"), "{}", describe(&out));
}
