//! `fedrec-sim tune` end to end through the real binary, on small generated data: the
//! configuration it writes is one `run --config` accepts and reproduces, the test set is never
//! read during the search, and the trial cap bounds the search.

use std::path::{Path, PathBuf};

use fedrec_tests::{Row, fedrec_sim, fedrec_sim_ok, low_rank_ratings, write_tsv};
use serde_json::Value;
use tempfile::TempDir;

/// 150 users × 60 items of rank-3 ratings, 20 per user.
fn rows() -> Vec<Row> {
    low_rank_ratings(150, 60, 3, 20, 0.2, 5)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}\n{text}", path.display()))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} should be a number, is {v}"))
}

/// A short search: trials of at most 27 rounds (the shortest 3), capped at `max_trials`.
fn short_search(max_trials: &str) -> Vec<&str> {
    vec!["--max-rounds", "27", "--max-trials", max_trials, "--budget-seconds", "3600", "--quiet"]
}

/// A folder with the generated ratings as `gen.tsv`.
fn workdir() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gen.tsv");
    write_tsv(&path, &rows()).expect("write ratings");
    (dir, path)
}

/// `trials` without the wall seconds, which differ from run to run.
fn trials_without_time(report: &Value) -> Vec<Value> {
    let trials = report["trials"].as_array().expect("trials is an array");
    trials
        .iter()
        .map(|t| {
            let mut t = t.clone();
            t.as_object_mut().expect("a trial is an object").remove("seconds");
            t
        })
        .collect()
}

#[test]
fn tune_writes_a_config_that_run_reproduces() {
    let (dir, ratings) = workdir();
    let (best, report) = (dir.path().join("best.json"), dir.path().join("tune.json"));
    let mut args =
        vec!["tune", "--ratings", s(&ratings), "--seed", "3", "--out", s(&best), "--json", s(&report)];
    args.extend(short_search("6"));
    fedrec_sim_ok(dir.path(), &args);

    let rep = read_json(&report);
    assert_eq!(rep["command"], "tune");
    assert_eq!(rep["metric"], "rmse", "the explicit objective optimises RMSE");
    let trials = rep["trials"].as_array().expect("trials");
    assert_eq!(trials.len(), 6, "the cap of 6 trials is reached with this budget");
    assert_eq!(rep["search"]["stopped_by"], "max_trials");
    for t in trials {
        assert!(t["error"].is_null(), "trial failed: {t}");
        assert!(num(&t["validation_metric"], "validation metric") > 0.0);
        assert!(t["best_round"].as_u64() <= t["rounds"].as_u64());
    }
    // The best trial is the one with the lowest validation RMSE.
    let lowest = trials.iter().map(|t| num(&t["validation_metric"], "metric")).fold(f64::INFINITY, f64::min);
    assert_eq!(num(&rep["best"]["validation_metric"], "best"), lowest);
    let bias_test = num(&rep["baseline"]["test"]["rmse"], "bias-only test RMSE");
    assert_eq!(rep["baseline"]["method"], "bias");
    let tuned_test = num(&rep["final"]["test_metric"], "final test RMSE");
    assert!(tuned_test.is_finite() && tuned_test > 0.0);
    assert!(bias_test.is_finite());

    // The file holds the best configuration; `run --config` with the same data flags and
    // seed trains the same model and gets the same test metrics.
    let file = read_json(&best);
    assert_eq!(file["model"], rep["best"]["config"]["model"]);
    assert_eq!(file["training"]["objective"], "explicit");
    let run_json = dir.path().join("run.json");
    fedrec_sim_ok(
        dir.path(),
        &[
            "run",
            "--ratings",
            s(&ratings),
            "--seed",
            "3",
            "--config",
            s(&best),
            "--json",
            s(&run_json),
            "--quiet",
        ],
    );
    let run = read_json(&run_json);
    assert_eq!(
        run["config"], rep["final"]["config"],
        "run --config builds the configuration tune's final run used"
    );
    assert_eq!(run["metrics"]["rmse"], rep["final"]["test"]["rmse"]);
    assert_eq!(run["metrics"]["recall_at_20"], rep["final"]["test"]["recall_at_20"]);

    // Flags given on the command line override the file.
    let over_json = dir.path().join("over.json");
    fedrec_sim_ok(
        dir.path(),
        &[
            "run",
            "--ratings",
            s(&ratings),
            "--config",
            s(&best),
            "--dim",
            "3",
            "--rounds",
            "2",
            "--json",
            s(&over_json),
            "--quiet",
        ],
    );
    let over = read_json(&over_json);
    assert_eq!(over["config"]["dim"], 3);
    assert_eq!(over["config"]["rounds"], 2);
    assert_eq!(over["config"]["l2_user"], file["training"]["l2_user"], "what the flags leave is the file's");
}

#[test]
fn a_poisoned_test_set_does_not_change_the_search() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each user's last 4 ratings are the test set.
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (k, row) in rows().into_iter().enumerate() {
        if k % 20 >= 16 { test.push(row) } else { train.push(row) }
    }
    // The poisoned copy: the same users and items (so the same ids and catalogue), the
    // ratings mirrored about the middle of the scale.
    let poisoned: Vec<Row> = test.iter().map(|(u, i, r, t)| (u.clone(), i.clone(), 7.0 - r, *t)).collect();
    let paths = ["train.tsv", "test.tsv", "poisoned.tsv"].map(|f| dir.path().join(f));
    write_tsv(&paths[0], &train).expect("write train");
    write_tsv(&paths[1], &test).expect("write test");
    write_tsv(&paths[2], &poisoned).expect("write poisoned test");

    let tune = |test: &Path, json: &str| -> Value {
        let out = dir.path().join(json);
        let mut args = vec!["tune", "--train", s(&paths[0]), "--test", s(test), "--json", s(&out)];
        args.extend(short_search("5"));
        fedrec_sim_ok(dir.path(), &args);
        read_json(&out)
    };
    let clean = tune(&paths[1], "clean.json");
    let dirty = tune(&paths[2], "dirty.json");
    assert_eq!(trials_without_time(&clean).len(), 5);
    assert_eq!(trials_without_time(&clean), trials_without_time(&dirty), "the search read the test set");
    assert_eq!(clean["best"], dirty["best"]);
    assert_eq!(clean["validation"], dirty["validation"]);
    // The test set is read, by the final run: the poison shows there.
    let (a, b) = (num(&clean["final"]["test_metric"], "clean"), num(&dirty["final"]["test_metric"], "dirty"));
    assert!(b > a + 0.5, "the mirrored ratings should ruin the test RMSE: clean {a}, poisoned {b}");
}

#[test]
fn the_trial_cap_and_a_zero_budget_bound_the_search() {
    let (dir, ratings) = workdir();
    let json = dir.path().join("implicit.json");
    let mut args = vec!["tune", "--ratings", s(&ratings), "--objective", "implicit", "--json", s(&json)];
    args.extend(short_search("4"));
    fedrec_sim_ok(dir.path(), &args);
    let rep = read_json(&json);
    assert_eq!(rep["trials"].as_array().map(Vec::len), Some(4));
    assert_eq!(rep["metric"], "recall_at_20", "the implicit objective optimises Recall@20");
    assert_eq!(rep["baseline"]["method"], "popularity");
    assert!(rep["final"]["test"]["rmse"].is_null());
    assert!(rep["best"]["config"]["training"]["implicit_alpha"].is_number());

    // A zero budget still runs the base configuration once (so there is a best), and no more.
    let zero = dir.path().join("zero.json");
    fedrec_sim_ok(
        dir.path(),
        &[
            "tune",
            "--ratings",
            s(&ratings),
            "--max-rounds",
            "9",
            "--budget-seconds",
            "0",
            "--json",
            s(&zero),
            "--quiet",
        ],
    );
    let rep = read_json(&zero);
    assert_eq!(rep["trials"].as_array().map(Vec::len), Some(1));
    assert_eq!(rep["trials"][0]["config_id"], 0, "the first trial is the base configuration");
    assert_eq!(rep["search"]["stopped_by"], "budget");
}

#[test]
fn run_refuses_a_bad_config_file_and_names_the_key() {
    let (dir, ratings) = workdir();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"training": {"server_lr": -1}}"#).expect("write");
    let out = fedrec_sim(dir.path(), &["run", "--ratings", s(&ratings), "--config", s(&bad), "--quiet"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("training.server_lr"), "{err}");

    std::fs::write(&bad, r#"{"training": {"l2_usr": 1}}"#).expect("write");
    let out = fedrec_sim(dir.path(), &["run", "--ratings", s(&ratings), "--config", s(&bad), "--quiet"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("l2_usr"), "an unknown key is named: {err}");
}
