//! The simulator over real QUIC on loopback: the same seed gives the same federation as in process (library and binary), unsupported options are refused, and a tiny load benchmark against a coordinator process reports its numbers.

use std::path::Path;

use fedrec_shared::Rating;
use fedrec_shared::eval::EvalConfig;
use fedrec_sim::federation::{self, ObjectiveKind, RunConfig, RunResult, Transport, UserData};
use fedrec_tests::{fedrec_coordinator_bin, fedrec_sim, fedrec_sim_ok, low_rank_ratings, write_tsv};
use serde_json::Value;

const N_USERS: usize = 40;
const N_ITEMS: usize = 30;
const PER_USER: usize = 15;
const N_TEST: usize = 3;

/// Generated low-rank ratings, the last `N_TEST` of each user held out.
fn data() -> UserData {
    let mut train = vec![Vec::new(); N_USERS];
    for (user, item, value, _) in low_rank_ratings(N_USERS, N_ITEMS, 3, PER_USER, 0.2, 5) {
        let u: usize = user[1..].parse().expect("generated user ids are u{n}");
        let i: u32 = item[1..].parse().expect("generated item ids are i{n}");
        train[u].push(Rating { item: i, value });
    }
    let test = train.iter_mut().map(|r: &mut Vec<Rating>| r.split_off(PER_USER - N_TEST)).collect();
    UserData {
        train,
        test,
        n_items: N_ITEMS,
        eval: EvalConfig { rating_range: (1.0, 5.0), relevance_threshold: Some(4.0) },
    }
}

fn small_config() -> RunConfig {
    let mut cfg = RunConfig::defaults(ObjectiveKind::Explicit);
    cfg.rounds = 4;
    cfg.clients_per_round = 12;
    cfg.dim = 4;
    cfg.n_segments = 2;
    cfg.server_lr = 0.05;
    cfg.l2_user = 1.0;
    cfg.l2_item = 0.05;
    cfg.eval_every = 2;
    cfg.threads = 2;
    cfg.seed = 11;
    cfg
}

fn run(data: &UserData, cfg: &RunConfig, transport: Transport) -> RunResult {
    let cfg = RunConfig { transport, ..cfg.clone() };
    federation::run(data, &cfg, |_| {}).expect("the federation runs")
}

/// Largest elementwise difference between the two runs' final models.
fn max_model_diff(a: &RunResult, b: &RunResult) -> f32 {
    let (a, b) = (&a.model.model, &b.model.model);
    assert_eq!(a.shape(), b.shape());
    let pairs = a
        .item_factors
        .iter()
        .zip(&b.item_factors)
        .chain(a.item_bias.iter().zip(&b.item_bias))
        .chain(a.centroids.iter().zip(&b.centroids))
        .chain(std::iter::once((&a.global_mean, &b.global_mean)));
    pairs.map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn assert_same_run(inproc: &RunResult, quic: &RunResult) {
    let diff = max_model_diff(inproc, quic);
    // Same selection, same noise, same summation order: the models agree to the last bit
    // (the tolerance only keeps the failure message readable).
    assert!(diff <= 1e-6, "the QUIC run's model differs from the in-process one by up to {diff}");
    assert_eq!(inproc.model.version, quic.model.version);
    assert_eq!(inproc.history, quic.history, "per-round records differ");
    assert_eq!(inproc.metrics, quic.metrics);
    assert_eq!(inproc.client_updates, quic.client_updates);
}

#[test]
fn quic_run_trains_the_same_model_as_the_in_process_run() {
    let data = data();
    let cfg = small_config();
    let inproc = run(&data, &cfg, Transport::Inproc);
    let quic = run(&data, &cfg, Transport::Quic);
    assert_eq!(quic.client_updates, cfg.rounds * cfg.clients_per_round, "every round filled its cohort");
    assert_eq!(quic.model.version, cfg.rounds as u64, "every round committed once");
    assert_same_run(&inproc, &quic);
    // The run is not trivially the same: another seed trains another model.
    let other = run(&data, &RunConfig { seed: 12, ..cfg.clone() }, Transport::Quic);
    assert!(max_model_diff(&quic, &other) > 1e-3, "the seed does not matter over QUIC");
}

/// Issue 13: a run with per-round item subsets and 8-bit downloads trains the same model over
/// QUIC (the server draws the subsets, serves compact tasks and decodes subset uploads; the
/// SDK devices redraw the subset and train on it) as in process; and it is not the dense run.
#[test]
fn item_subsets_and_int8_downloads_over_quic_train_the_same_model_as_in_process() {
    let data = data();
    let mut cfg = small_config();
    cfg.items_per_round = Some(10);
    cfg.download = federation::DownloadKind::Int8;
    let inproc = run(&data, &cfg, Transport::Inproc);
    let quic = run(&data, &cfg, Transport::Quic);
    assert_eq!(quic.model.version, cfg.rounds as u64, "every round committed once");
    assert_same_run(&inproc, &quic);
    let dense = run(&data, &small_config(), Transport::Quic);
    assert!(max_model_diff(&quic, &dense) > 1e-3, "the subsets changed nothing");
}

#[test]
fn noisy_quic_run_draws_the_same_selection_and_noise_as_in_process() {
    let data = data();
    let mut cfg = small_config();
    cfg.rounds = 2;
    cfg.noise_multiplier = 0.3;
    cfg.clip_norm = 5.0;
    // Poisson check-in stays open for its whole (here real) window.
    cfg.checkin_window_ms = 1500;
    // A round with noise commits only at its report deadline (real time here).
    cfg.report_window_ms = 1500;
    let inproc = run(&data, &cfg, Transport::Inproc);
    let quic = run(&data, &cfg, Transport::Quic);
    assert_same_run(&inproc, &quic);
    let (a, b) = (inproc.privacy.expect("a noisy run spends"), quic.privacy.expect("a noisy run spends"));
    assert_eq!(a, b);
    assert_eq!(b.rounds_charged, cfg.rounds);
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the report exists")).expect("valid JSON")
}

fn ratings_file(dir: &Path) -> String {
    let path = dir.join("ratings.tsv");
    write_tsv(&path, &low_rank_ratings(N_USERS, N_ITEMS, 3, PER_USER, 0.2, 6)).expect("write ratings");
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

#[test]
fn the_binary_reports_the_same_run_over_quic_and_in_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ratings = ratings_file(dir.path());
    let run = |transport: &str| -> Value {
        let json = dir.path().join(format!("{transport}.json"));
        let json = json.to_str().expect("a UTF-8 temp path");
        fedrec_sim_ok(
            dir.path(),
            &[
                "run",
                "--ratings",
                &ratings,
                "--transport",
                transport,
                "--seed",
                "3",
                "--rounds",
                "3",
                "--clients-per-round",
                "10",
                "--dim",
                "4",
                "--segments",
                "2",
                "--eval-every",
                "1",
                "--threads",
                "2",
                "--json",
                json,
                "--quiet",
            ],
        );
        read_json(Path::new(json))
    };
    let (inproc, quic) = (run("inproc"), run("quic"));
    assert_eq!(quic["config"]["transport"], "quic");
    assert_eq!(inproc["config"]["transport"], "inproc");
    for key in ["dataset", "metrics", "client_updates", "history", "segments"] {
        assert_eq!(inproc[key], quic[key], "{key} differs between the transports");
    }
    assert_eq!(quic["client_updates"], 30);
}

#[test]
fn dropouts_over_quic_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ratings = ratings_file(dir.path());
    let out = fedrec_sim(
        dir.path(),
        &[
            "run",
            "--ratings",
            &ratings,
            "--transport",
            "quic",
            "--dropout",
            "0.1",
            "--rounds",
            "1",
            "--quiet",
        ],
    );
    assert!(!out.status.success(), "a dropout over QUIC must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--dropout") && stderr.contains("--transport inproc"), "{stderr}");
}

#[test]
fn a_tiny_load_benchmark_against_a_coordinator_process_reports_its_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ratings = ratings_file(dir.path());
    let json = dir.path().join("bench.json");
    let coordinator = fedrec_coordinator_bin();
    let out = fedrec_sim_ok(
        dir.path(),
        &[
            "bench",
            "--transport",
            "quic",
            "--devices",
            "20",
            "--rounds",
            "2",
            "--ratings",
            &ratings,
            "--dim",
            "4",
            "--segments",
            "2",
            "--threads",
            "2",
            "--coordinator-bin",
            coordinator.to_str().expect("a UTF-8 path"),
            "--json",
            json.to_str().expect("a UTF-8 temp path"),
        ],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("coordinator peak RSS"), "{table}");
    let rep = read_json(&json);
    assert_eq!(rep["devices"], 20);
    assert_eq!(rep["cohort"], 20, "by default every device trains in every round");
    assert_eq!(rep["errors"], serde_json::json!([]), "{rep}");
    assert_eq!(rep["fedrec"]["device_updates"], serde_json::json!([20, 20]), "{rep}");
    assert_eq!(rep["raw_quinn"]["device_updates"], serde_json::json!([20, 20]), "{rep}");
    for path in [
        "/fedrec/rounds_per_minute",
        "/fedrec/device_updates_per_second",
        "/raw_quinn/rounds_per_minute",
        "/fedrec_over_raw_throughput",
        "/coordinator/cpu_seconds",
    ] {
        let v = rep.pointer(path).and_then(Value::as_f64).unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{path} = {v}");
    }
    let rss = rep.pointer("/coordinator/peak_rss_bytes").and_then(Value::as_u64).unwrap_or(0);
    assert!(rss > 1 << 20, "the coordinator's peak RSS is {rss} bytes");
    let frames = &rep["frame_bytes"];
    let task = frames["task"].as_u64().unwrap_or(0);
    // The task carries the whole model: 30 items × (4 factors + 1 bias) floats at least.
    assert!(task > (N_ITEMS * 5 * 4) as u64, "{frames}");
}
