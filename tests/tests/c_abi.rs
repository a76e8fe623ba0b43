//! The SDK's C ABI used from C: `tests/c/sdk_smoke.c` is compiled with the system `cc` against `include/fedrec.h` and the static library, and run against a real `fedrec-coordinator` on loopback.
//!
//! The C program checks every status itself and exits non-zero on the first surprise; these
//! tests build it, hold a store folder open while it tries to open the same folder, prepare
//! the coordinator (one device is enough for a round, charging required, a signed ruleset
//! published), pass the addresses, certificate, token and keys through the environment, and
//! check on the coordinator's side what the device did: nothing at all without training
//! consent, one reported update with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use fedrec_tests::coordinator::describe;
use fedrec_tests::{CoordinatorDir, CoordinatorProcess, encode_hex, fedrec_client_staticlib};

/// The model shape; `N_ITEMS`, `DIM` and `N_SEGMENTS` in sdk_smoke.c are the same.
const N_ITEMS: usize = 40;
const DIM: usize = 4;
const N_SEGMENTS: usize = 2;

/// The operator's rules: on a phone on Saturday the banner is `weekend_phone`.
const RULES: &str = r#"
[[slot]]
name = "home_banner"
default = "generic"

[[slot.rule]]
variant = "weekend_phone"
priority = 10
weekdays = ["sat"]
device_types = ["phone"]
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Compiles sdk_smoke.c with the system C compiler (`$CC`, else `cc`), warnings as errors,
/// linked against the SDK's static library.
fn compile_smoke(dir: &Path) -> PathBuf {
    let lib = fedrec_client_staticlib();
    let exe = dir.join("sdk_smoke");
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let out = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(workspace().join("client-sdk").join("include"))
        .arg(workspace().join("tests").join("c").join("sdk_smoke.c"))
        .arg(lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("the C compiler starts");
    assert!(out.status.success(), "compiling sdk_smoke.c failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// `init`s a state directory where one charging device makes a round, publishes the rules
/// and enrolls one device; returns its token (hex).
fn prepare(dir: &Path) -> (CoordinatorDir, String) {
    let state = CoordinatorDir::init_plain(
        dir,
        &[
            ("n_items = 1000", format!("n_items = {N_ITEMS}")),
            ("dim = 16", format!("dim = {DIM}")),
            ("n_segments = 8", format!("n_segments = {N_SEGMENTS}")),
            // The template already trains the implicit objective SDK devices need (alpha 1).
            ("selection = \"poisson\"", "selection = \"first_come\"".to_owned()),
            ("q = 0.5", "cohort = 1".to_owned()),
            ("min_reports = 10", "min_reports = 1".to_owned()),
            ("checkin_window_ms = 30000", "checkin_window_ms = 5000".to_owned()),
            ("report_window_ms = 120000", "report_window_ms = 20000".to_owned()),
            ("round_gap_ms = 1000", "round_gap_ms = 50".to_owned()),
            // First-come selection is only allowed without noise.
            ("noise_multiplier = 1.0", "noise_multiplier = 0.0".to_owned()),
            ("require_charging = false", "require_charging = true".to_owned()),
        ],
    );
    let published = state.publish_rules(RULES);
    assert!(published.status.success(), "rules publish failed:\n{}", describe(&published));
    let tokens = state.enroll(1);
    (state, encode_hex(&tokens[0]))
}

/// Runs the C program in `mode` with the coordinator's coordinates and a fresh store folder.
fn run_smoke(
    exe: &Path,
    mode: &str,
    store: &Path,
    state: &CoordinatorDir,
    serve: &CoordinatorProcess,
    token: &str,
) -> Output {
    let started = Instant::now();
    let out = Command::new(exe)
        .arg(mode)
        .env("FEDREC_STORE_DIR", store)
        .env("FEDREC_COORDINATOR", serve.addr().to_string())
        .env("FEDREC_CERT", state.path().join("cert.der"))
        .env("FEDREC_TOKEN", token)
        .env("FEDREC_RULES_KEY", state.path().join("rules_signing.pub"))
        .env("FEDREC_RULES_SIGNED", state.path().join("rules.signed"))
        .output()
        .expect("sdk_smoke starts");
    // Shown with --nocapture: what the C program saw, for people reading a CI log.
    println!("sdk_smoke {mode} ({:.1} s):\n{}", started.elapsed().as_secs_f64(), describe(&out));
    out
}

#[test]
fn c_program_misusing_the_abi_gets_errors_not_crashes() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let exe = compile_smoke(tmp.path());
    let out = Command::new(&exe)
        .arg("misuse")
        .env("FEDREC_STORE_DIR", tmp.path().join("store"))
        .output()
        .expect("sdk_smoke starts");
    assert!(out.status.success(), "sdk_smoke misuse failed:\n{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"), "{}", describe(&out));
}

#[test]
fn c_program_is_refused_a_folder_another_process_holds() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let exe = compile_smoke(tmp.path());
    let store = tmp.path().join("store");
    // This process holds the folder (the C program's key: the lock does not care).
    let held = fedrec_client::sdk::Sdk::open(fedrec_client::sdk::SdkConfig::new(&store, [9; 32]))
        .expect("the SDK opens");
    let out =
        Command::new(&exe).arg("locked").env("FEDREC_STORE_DIR", &store).output().expect("sdk_smoke starts");
    assert!(out.status.success(), "sdk_smoke locked failed:\n{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"), "{}", describe(&out));
    held.consent().expect("the holder is unaffected");
}

#[tokio::test]
async fn c_program_takes_part_in_a_round_against_a_real_coordinator() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let exe = compile_smoke(tmp.path());
    let (state, token) = prepare(&tmp.path().join("coordinator"));
    let serve = state.serve().await;

    // Without training consent the SDK refuses before connecting: the coordinator received
    // not a single byte.
    let store = tmp.path().join("store-no-consent");
    let out = run_smoke(&exe, "no-consent", &store, &state, &serve, &token);
    assert!(out.status.success(), "sdk_smoke no-consent failed:\n{}", describe(&out));
    assert_eq!(
        serve.metric(r#"fedrec_bytes_total{direction="in"}"#).await,
        0.0,
        "the coordinator saw a request"
    );

    // With consent: a full round, recommendations, segment, rules, export and forget.
    let store = tmp.path().join("store");
    let out = run_smoke(&exe, "full", &store, &state, &serve, &token);
    assert!(out.status.success(), "sdk_smoke full failed:\n{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"), "{}", describe(&out));
    assert!(
        !store.exists() || std::fs::read_dir(&store).expect("readable").next().is_none(),
        "forget left files"
    );

    // The coordinator's view: the round the device reported to was committed.
    serve.wait_for_line("a committed round", |l| l.contains("committed")).await;
    assert!(serve.metric(r#"fedrec_clients_total{event="reported"}"#).await >= 1.0);
    assert!(serve.metric(r#"fedrec_bytes_total{direction="in"}"#).await > 0.0);
}
