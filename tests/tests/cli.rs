//! The `fedrec-sim` binary end to end: small runs and baselines on generated files in every
//! supported format, the JSON, CSV and SVG outputs, and the errors users see.

use std::path::{Path, PathBuf};
use std::process::Output;

use fedrec_tests::{Row, fedrec_sim, fedrec_sim_ok, low_rank_ratings, write_tsv};
use serde_json::Value;
use tempfile::TempDir;

/// Users, items and ratings per user of the generated files: 2000 ratings in all.
const N_USERS: usize = 200;
const N_ITEMS: usize = 60;
const PER_USER: usize = 10;

fn rows() -> Vec<Row> {
    low_rank_ratings(N_USERS, N_ITEMS, 3, PER_USER, 0.2, 11)
}

/// A fresh folder holding the generated ratings as `gen.tsv`.
fn workdir() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gen.tsv");
    write_tsv(&path, &rows()).expect("write ratings");
    (dir, path)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `fedrec-sim`, checks it failed, and returns its stderr.
fn sim_err(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = fedrec_sim(dir, args);
    assert!(!out.status.success(), "fedrec-sim {} should fail", args.join(" "));
    let err = stderr(&out);
    assert!(!err.trim().is_empty(), "fedrec-sim {} failed without a message", args.join(" "));
    (out.status.code(), err)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}\n{text}", path.display()))
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} should be a number, is {v}"))
}

fn count(v: &Value, what: &str) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{what} should be a non-negative integer, is {v}"))
}

fn str_path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Checks the `dataset` object of a report and returns `(n_users, n_items, n_train, n_test)`.
fn check_dataset(report: &Value) -> (u64, u64, u64, u64) {
    let ds = &report["dataset"];
    assert!(ds["name"].as_str().is_some_and(|s| !s.is_empty()), "dataset.name: {ds}");
    let sizes = ["n_users", "n_items", "n_train", "n_test"].map(|k| count(&ds[k], &format!("dataset.{k}")));
    let range = ds["rating_range"].as_array().unwrap_or_else(|| panic!("dataset.rating_range: {ds}"));
    assert_eq!(range.len(), 2, "dataset.rating_range: {ds}");
    let (lo, hi) = (num(&range[0], "rating_range[0]"), num(&range[1], "rating_range[1]"));
    assert!(lo.is_finite() && hi.is_finite() && lo < hi, "dataset.rating_range: {ds}");
    sizes.into()
}

/// Checks a metrics object; `rmse` must be a positive number when `explicit`, else null.
fn check_metrics(m: &Value, explicit: bool) {
    if explicit {
        let rmse = num(&m["rmse"], "metrics.rmse");
        assert!(rmse.is_finite() && rmse > 0.0, "metrics: {m}");
    } else {
        assert!(m["rmse"].is_null(), "metrics.rmse should be null: {m}");
    }
    for k in ["recall_at_20", "ndcg_at_10"] {
        let x = num(&m[k], k);
        assert!((0.0..=1.0).contains(&x), "metrics.{k}: {m}");
    }
    assert!(count(&m["n_eval_users"], "n_eval_users") > 0, "metrics: {m}");
    count(&m["n_test_ratings"], "n_test_ratings");
}

#[test]
fn run_writes_json_csv_and_svg_reports() {
    let (dir, ratings) = workdir();
    let out_json = dir.path().join("out.json");
    let out_csv = dir.path().join("out.csv");
    let out_svg = dir.path().join("out.svg");
    let args = [
        "run",
        "--ratings",
        str_path(&ratings),
        "--rounds",
        "20",
        "--clients-per-round",
        "50",
        "--dim",
        "8",
        "--server-lr",
        "0.05",
        "--json",
        str_path(&out_json),
        "--csv",
        str_path(&out_csv),
        "--plot",
        str_path(&out_svg),
        "--quiet",
    ];
    fedrec_sim_ok(dir.path(), &args);

    let report = read_json(&out_json);
    assert_eq!(report["command"], "run");
    let (n_users, n_items, n_train, n_test) = check_dataset(&report);
    assert_eq!(n_users, N_USERS as u64);
    assert!(0 < n_items && n_items <= N_ITEMS as u64);
    assert_eq!(n_train + n_test, (N_USERS * PER_USER) as u64);
    // The default holdout is 20% of each user's ratings.
    assert_eq!(n_test, (N_USERS * PER_USER / 5) as u64);

    let config = &report["config"];
    for key in [
        "rounds",
        "clients_per_round",
        "dim",
        "objective",
        "alpha",
        "l2_user",
        "l2_item",
        "l2_user_bias",
        "l2_item_bias",
        "optimizer",
        "server_lr",
        "momentum",
        "clip_norm",
        "noise_multiplier",
        "dropout",
        "eval_every",
        "threads",
        "seed",
    ] {
        assert!(!config[key].is_null(), "config.{key} is missing: {config}");
    }
    assert!(!config["n_segments"].is_null() || !config["segments"].is_null(), "no segment count: {config}");
    assert_eq!(config["rounds"], 20);
    assert_eq!(config["clients_per_round"], 50);
    assert_eq!(config["dim"], 8);
    assert_eq!(config["seed"], 1, "the default seed");
    assert_eq!(config["objective"], "explicit");
    assert!((num(&config["server_lr"], "server_lr") - 0.05).abs() < 1e-6, "{config}");

    let metrics = &report["metrics"];
    check_metrics(metrics, true);
    assert_eq!(metrics["n_test_ratings"], n_test);
    assert!(count(&metrics["n_eval_users"], "n_eval_users") <= n_users);

    let wall = num(&report["wall_seconds"], "wall_seconds");
    let train = num(&report["train_seconds"], "train_seconds");
    assert!(wall.is_finite() && train.is_finite() && 0.0 <= train && train <= wall, "{wall} {train}");
    // No dropouts: every round aggregates a full cohort.
    assert_eq!(report["client_updates"], 20 * 50);

    let history = report["history"].as_array().expect("history is an array");
    assert_eq!(history.len(), 20);
    let first_round = count(&history[0]["round"], "history[0].round");
    assert_eq!(first_round, 1, "rounds are numbered from 1, as in the CSV");
    for (k, h) in history.iter().enumerate() {
        assert_eq!(count(&h["round"], "round"), first_round + k as u64, "rounds are consecutive");
        assert_eq!(h["committed"], true, "{h}");
        assert_eq!(h["n_reported"], 50, "{h}");
        assert_eq!(h["n_dropped"], 0, "{h}");
        let clipped = num(&h["clipped_fraction"], "clipped_fraction");
        assert!((0.0..=1.0).contains(&clipped), "{h}");
        assert!(h.get("metrics").is_some(), "history[{k}] has no metrics field: {h}");
    }
    // The default evaluates every 10 rounds; the last evaluation is the final model.
    let evaluated: Vec<usize> = (0..history.len()).filter(|&k| !history[k]["metrics"].is_null()).collect();
    assert_eq!(evaluated, [9, 19]);
    for &k in &evaluated {
        check_metrics(&history[k]["metrics"], true);
    }
    assert_eq!(history[19]["metrics"]["rmse"], metrics["rmse"]);

    for kind in ["federated", "centralized"] {
        let seg = &report["segments"][kind];
        let sizes: Vec<u64> = seg["sizes"]
            .as_array()
            .unwrap_or_else(|| panic!("segments.{kind}.sizes: {seg}"))
            .iter()
            .map(|s| count(s, "segment size"))
            .collect();
        assert!(!sizes.is_empty() && sizes.iter().sum::<u64>() > 0, "segments.{kind}: {seg}");
        assert!(sizes.iter().sum::<u64>() <= n_users, "segments.{kind}: {seg}");
        let distance = &seg["mean_distance"];
        assert!(
            distance.is_null() || distance.as_f64().is_some_and(|d| d.is_finite() && d >= 0.0),
            "segments.{kind}.mean_distance: {seg}"
        );
    }

    let csv = std::fs::read_to_string(&out_csv).expect("the CSV exists");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 21, "a header and one row per round:\n{csv}");
    let header: Vec<&str> = lines[0].split(',').map(|h| h.trim().trim_matches('"')).collect();
    let column = |name: &str| {
        header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name} column in {header:?}"))
    };
    let (round_col, rmse_col) = (column("round"), column("rmse"));
    let metric_cols = [rmse_col, column("recall_at_20"), column("ndcg_at_10")];
    for (k, line) in lines[1..].iter().enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        assert_eq!(fields.len(), header.len(), "row {k}: {line}");
        assert!(fields[round_col].parse::<u64>().is_ok(), "row {k}: {line}");
        for &c in &metric_cols {
            if evaluated.contains(&k) {
                let x: f64 = fields[c].parse().unwrap_or_else(|_| panic!("row {k}, column {c}: {line}"));
                assert!(x.is_finite(), "row {k}: {line}");
            } else {
                assert!(fields[c].is_empty(), "row {k} was not evaluated: {line}");
            }
        }
    }
    let csv_rmse: f64 = lines[20].split(',').nth(rmse_col).and_then(|x| x.trim().parse().ok()).expect("rmse");
    assert!((csv_rmse - num(&metrics["rmse"], "rmse")).abs() < 1e-6, "{csv_rmse} vs {metrics}");

    let svg = std::fs::read_to_string(&out_svg).expect("the SVG exists");
    let start = svg.trim_start();
    assert!(
        start.starts_with("<svg") || start.starts_with("<?xml"),
        "not SVG: {}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.contains("svg") && svg.trim_end().ends_with('>'), "not SVG");
}

#[test]
fn same_seed_same_report_and_every_run_option_is_recorded() {
    let (dir, ratings) = workdir();
    let run = |name: &str, seed: &str| -> Value {
        let json = dir.path().join(name);
        fedrec_sim_ok(
            dir.path(),
            &[
                "run",
                "--ratings",
                str_path(&ratings),
                "--test-fraction",
                "0.3",
                "--split",
                "temporal",
                "--relevance-threshold",
                "3.5",
                "--seed",
                seed,
                "--objective",
                "implicit",
                "--rounds",
                "6",
                "--clients-per-round",
                "30",
                "--dim",
                "4",
                "--segments",
                "3",
                "--l2-user",
                "2",
                "--l2-item",
                "0.2",
                "--l2-user-bias",
                "1.5",
                "--l2-item-bias",
                "0.25",
                "--alpha",
                "2",
                "--optimizer",
                "sgd",
                "--server-lr",
                "0.02",
                "--momentum",
                "0.5",
                "--clip-norm",
                "5",
                "--noise-multiplier",
                "0.5",
                "--dropout",
                "0.1",
                "--eval-every",
                "2",
                "--threads",
                "1",
                "--json",
                str_path(&json),
                "--quiet",
            ],
        );
        read_json(&json)
    };
    let a = run("a.json", "7");
    let config = &a["config"];
    for (key, want) in [
        ("rounds", 6.0),
        ("clients_per_round", 30.0),
        ("dim", 4.0),
        ("l2_user", 2.0),
        ("l2_item", 0.2),
        ("l2_user_bias", 1.5),
        ("l2_item_bias", 0.25),
        ("alpha", 2.0),
        ("server_lr", 0.02),
        ("momentum", 0.5),
        ("clip_norm", 5.0),
        ("noise_multiplier", 0.5),
        ("dropout", 0.1),
        ("eval_every", 2.0),
        ("threads", 1.0),
        ("seed", 7.0),
    ] {
        let got = num(&config[key], key);
        assert!((got - want).abs() < 1e-6, "config.{key} is {got}, expected {want}: {config}");
    }
    let segments = if config["n_segments"].is_null() { &config["segments"] } else { &config["n_segments"] };
    assert_eq!(segments, 3, "{config}");
    assert_eq!(config["objective"], "implicit");
    assert_eq!(config["optimizer"], "sgd");

    let (n_users, _, n_train, n_test) = check_dataset(&a);
    assert_eq!(n_users, N_USERS as u64);
    assert_eq!((n_train, n_test), ((N_USERS * 7) as u64, (N_USERS * 3) as u64), "30% of 10 per user");
    check_metrics(&a["metrics"], false);
    let history = a["history"].as_array().expect("history");
    assert_eq!(history.len(), 6);
    let evaluated = history.iter().filter(|h| !h["metrics"].is_null()).count();
    assert_eq!(evaluated, 3, "every second round");

    // Everything but the timings is a function of the seed.
    let b = run("b.json", "7");
    for key in ["dataset", "config", "metrics", "client_updates", "history", "segments"] {
        assert_eq!(a[key], b[key], "{key} differs between two runs with one seed");
    }
    let c = run("c.json", "8");
    assert_ne!(a["history"], c["history"], "another seed, another run");
}

#[test]
fn baselines_report_their_metrics() {
    let (dir, ratings) = workdir();
    let mut rmse = Vec::new();
    for method in ["bias", "popularity", "als"] {
        let json = dir.path().join(format!("{method}.json"));
        fedrec_sim_ok(
            dir.path(),
            &[
                "baseline",
                "--method",
                method,
                "--ratings",
                str_path(&ratings),
                "--dim",
                "8",
                "--json",
                str_path(&json),
            ],
        );
        let report = read_json(&json);
        assert_eq!(report["command"], "baseline", "{report}");
        assert_eq!(report["method"], method, "{report}");
        let (n_users, _, _, n_test) = check_dataset(&report);
        assert_eq!(n_users, N_USERS as u64);
        let explicit = method != "popularity";
        check_metrics(&report["metrics"], explicit);
        if explicit {
            assert_eq!(report["metrics"]["n_test_ratings"], n_test);
            rmse.push(num(&report["metrics"]["rmse"], "rmse"));
        }
        let wall = num(&report["wall_seconds"], "wall_seconds");
        assert!(wall.is_finite() && wall >= 0.0, "{report}");
    }
    // The data is low-rank, so factors beat biases.
    assert!(rmse[1] < rmse[0], "ALS RMSE {} is not below the biases' {}", rmse[1], rmse[0]);
}

/// Writes `rows` to `dir/name`, one `line(row)` each, after `header` when given.
fn write_lines(
    dir: &Path,
    name: &str,
    header: Option<&str>,
    rows: &[Row],
    line: impl Fn(&Row) -> String,
) -> PathBuf {
    let mut text = header.map(|h| format!("{h}\n")).unwrap_or_default();
    for row in rows {
        text.push_str(&line(row));
        text.push('\n');
    }
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write ratings");
    path
}

/// The number in a generated id such as `u17`.
fn numeric(id: &str) -> &str {
    id.trim_start_matches(['u', 'i'])
}

/// A rating on MovieLens' integer 1–5 scale.
fn stars(r: f32) -> f32 {
    r.round().clamp(1.0, 5.0)
}

#[test]
fn every_ratings_format_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = rows();
    let files = [
        // MovieLens-100K `u.data`: tabs, no header.
        write_lines(dir.path(), "u.data", None, &rows, |(u, i, r, t)| {
            format!("{}\t{}\t{}\t{t}", numeric(u), numeric(i), stars(*r))
        }),
        // MovieLens-1M `ratings.dat`: `::`, no header.
        write_lines(dir.path(), "ratings.dat", None, &rows, |(u, i, r, t)| {
            format!("{}::{}::{}::{t}", numeric(u), numeric(i), stars(*r))
        }),
        // MovieLens-20M `ratings.csv`: commas, a header, half stars.
        write_lines(
            dir.path(),
            "ratings.csv",
            Some("userId,movieId,rating,timestamp"),
            &rows,
            |(u, i, r, t)| {
                format!("{},{},{:.1},{t}", numeric(u), numeric(i), ((r * 2.0).round() / 2.0).clamp(0.5, 5.0))
            },
        ),
        // Generic TSV: string ids, a header, no timestamps.
        write_lines(dir.path(), "likes.tsv", Some("user\titem\trating"), &rows, |(u, i, r, _)| {
            format!("user {u}\t{i} (1999)\t{r}")
        }),
    ];
    for file in &files {
        let json = dir.path().join("out.json");
        fedrec_sim_ok(
            dir.path(),
            &[
                "run",
                "--ratings",
                str_path(file),
                "--rounds",
                "3",
                "--dim",
                "4",
                "--json",
                str_path(&json),
                "--quiet",
            ],
        );
        let report = read_json(&json);
        let (n_users, n_items, n_train, n_test) = check_dataset(&report);
        assert_eq!(n_users, N_USERS as u64, "{}", file.display());
        assert!(n_items <= N_ITEMS as u64, "{}", file.display());
        assert_eq!(n_train + n_test, rows.len() as u64, "{}", file.display());
        check_metrics(&report["metrics"], true);
    }
}

#[test]
fn train_and_test_files_are_used_as_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The rows come grouped by user: the last two of each user are the test set.
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (k, row) in rows().into_iter().enumerate() {
        if k % PER_USER < PER_USER - 2 { train.push(row) } else { test.push(row) }
    }
    let train_path = dir.path().join("a.tsv");
    let test_path = dir.path().join("b.tsv");
    write_tsv(&train_path, &train).expect("write train");
    write_tsv(&test_path, &test).expect("write test");
    let json = dir.path().join("out.json");
    fedrec_sim_ok(
        dir.path(),
        &[
            "run",
            "--train",
            str_path(&train_path),
            "--test",
            str_path(&test_path),
            "--rounds",
            "5",
            "--dim",
            "4",
            "--json",
            str_path(&json),
            "--quiet",
        ],
    );
    let report = read_json(&json);
    let (n_users, _, n_train, n_test) = check_dataset(&report);
    assert_eq!(n_users, N_USERS as u64);
    assert_eq!((n_train, n_test), (train.len() as u64, test.len() as u64));
    check_metrics(&report["metrics"], true);
    assert_eq!(report["metrics"]["n_test_ratings"], test.len());
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-ratings.tsv");
    let (_, err) = sim_err(dir.path(), &["run", "--ratings", str_path(&missing), "--rounds", "1"]);
    assert!(err.contains("no-such-ratings.tsv"), "stderr does not name the file:\n{err}");
    let (_, err) = sim_err(dir.path(), &["baseline", "--method", "bias", "--ratings", str_path(&missing)]);
    assert!(err.contains("no-such-ratings.tsv"), "stderr does not name the file:\n{err}");
}

#[test]
fn malformed_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad-ratings.tsv");
    std::fs::write(&bad, "u1\ti1\t4\t10\nu1\ti2\t3\t11\nu2\ti1\tabc\t12\nu2\ti2\t5\t13\n").expect("write");
    let (_, err) = sim_err(dir.path(), &["run", "--ratings", str_path(&bad), "--rounds", "1"]);
    // Data errors read `<file>:<line>: <reason>`.
    assert!(err.contains(&format!("{}:3:", bad.display())), "stderr does not name file and line 3:\n{err}");
    assert!(err.contains("abc"), "stderr does not quote the bad rating:\n{err}");

    // The same in a test file given with --train/--test, after a blank line.
    let train = dir.path().join("train.tsv");
    let test = dir.path().join("test-set.tsv");
    std::fs::write(&train, "u1\ti1\t4\nu2\ti2\t3\n").expect("write");
    std::fs::write(&test, "u1\ti2\t4\n\nu2\ti1\t\n").expect("write");
    let (_, err) = sim_err(
        dir.path(),
        &["run", "--train", str_path(&train), "--test", str_path(&test), "--rounds", "1"],
    );
    assert!(err.contains(&format!("{}:3:", test.display())), "stderr does not name file and line 3:\n{err}");
}

#[test]
fn empty_file_is_rejected_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, contents) in [("empty.tsv", ""), ("header-only.csv", "userId,movieId,rating,timestamp\n")] {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        let (_, err) = sim_err(dir.path(), &["run", "--ratings", str_path(&path), "--rounds", "1"]);
        assert!(err.contains(name), "stderr does not name the file:\n{err}");
        assert!(err.contains("no interactions"), "stderr does not say the file is empty:\n{err}");
    }
}

#[test]
fn out_of_range_test_fraction_is_rejected() {
    let (dir, ratings) = workdir();
    for fraction in ["1.5", "-0.1", "1"] {
        // `=` keeps a negative value from reading as a flag.
        let flag = format!("--test-fraction={fraction}");
        let (_, err) = sim_err(dir.path(), &["run", "--ratings", str_path(&ratings), &flag, "--rounds", "1"]);
        assert!(err.contains(fraction), "stderr does not show the bad fraction {fraction}:\n{err}");
    }
}

#[test]
fn bad_flags_are_usage_errors() {
    let (dir, ratings) = workdir();
    let r = str_path(&ratings);
    let cases: [&[&str]; 6] = [
        &["run", "--ratings", r, "--no-such-flag"],
        &["run", "--ratings", r, "--rounds", "many"],
        &["run", "--ratings", r, "--objective", "quadratic"],
        &["baseline", "--method", "magic", "--ratings", r],
        &["run", "--ratings", r, "--train", r, "--test", r],
        &["run", "--train", r],
    ];
    for args in cases {
        let (code, err) = sim_err(dir.path(), args);
        assert_eq!(code, Some(2), "fedrec-sim {} should be a usage error:\n{err}", args.join(" "));
    }
    let (_, err) = sim_err(dir.path(), &["run", "--ratings", r, "--no-such-flag"]);
    assert!(err.contains("--no-such-flag"), "{err}");
}
