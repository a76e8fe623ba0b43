//! The study tools of the `fedrec-sim` binary end to end: `privacy epsilon`, `privacy sigma`, `run --epsilon`, `sweep` (checked against the library's accountant) and synthetic populations.

use std::path::Path;
use std::process::Command;

use fedrec_shared::privacy::{self, AccountantKind, PrivacyEvent};
use fedrec_tests::{fedrec_sim_bin, fedrec_sim_ok, low_rank_ratings, write_tsv};
use serde_json::Value;

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("valid JSON")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn privacy_epsilon_reports_what_the_accountant_computes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (acc, kind) in [("rdp", AccountantKind::Rdp), ("pld", AccountantKind::Pld)] {
        let out = dir.path().join(format!("eps-{acc}.json"));
        fedrec_sim_ok(
            dir.path(),
            &["privacy", "epsilon", "--q", "0.01", "--sigma", "1.1", "--steps", "500", "--delta", "1e-5"]
                .into_iter()
                .chain(["--accountant", acc, "--json", out.to_str().expect("utf-8 path")])
                .collect::<Vec<_>>(),
        );
        let want = privacy::epsilon(&[PrivacyEvent::new(0.01, 1.1, 500).expect("valid")], 1e-5, kind)
            .expect("valid");
        let got = num(&json(&out)["epsilon"]);
        assert!((got - want).abs() <= 1e-9 * want, "{acc}: {got} vs {want}");
    }
}

#[test]
fn privacy_sigma_meets_the_target_and_is_tight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("sigma.json");
    fedrec_sim_ok(
        dir.path(),
        &[
            "privacy",
            "sigma",
            "--epsilon",
            "2",
            "--delta",
            "1e-6",
            "--q",
            "0.02",
            "--steps",
            "300",
            "--json",
            out.to_str().expect("utf-8 path"),
        ],
    );
    let report = json(&out);
    let sigma = num(&report["sigma"]);
    let spent = |s: f64| {
        privacy::epsilon(&[PrivacyEvent::new(0.02, s, 300).expect("valid")], 1e-6, AccountantKind::Rdp)
            .expect("valid")
    };
    assert!(spent(sigma) <= 2.0, "σ = {sigma} spends {}", spent(sigma));
    assert!(spent(sigma * 0.999) > 2.0, "σ = {sigma} is not the smallest that meets ε = 2");
    assert!((num(&report["epsilon_spent"]) - spent(sigma)).abs() < 1e-9);
}

#[test]
fn run_with_a_target_epsilon_spends_at_most_it_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("gen.tsv");
    write_tsv(&data, &low_rank_ratings(300, 40, 3, 10, 0.2, 5)).expect("write ratings");
    let out = dir.path().join("run.json");
    fedrec_sim_ok(
        dir.path(),
        &[
            "run",
            "--ratings",
            "gen.tsv",
            "--rounds",
            "12",
            "--clients-per-round",
            "60",
            "--dim",
            "4",
            "--epsilon",
            "3",
            "--delta",
            "1e-5",
            "--quiet",
            "--json",
            out.to_str().expect("utf-8 path"),
        ],
    );
    let report = json(&out);
    let p = &report["privacy"];
    let (q, z_eff, eps) = (num(&p["q"]), num(&p["effective_noise_multiplier"]), num(&p["epsilon"]));
    assert!((q - 60.0 / 300.0).abs() < 1e-12, "q = {q}");
    assert!(eps <= 3.0 && eps > 2.9, "spent {eps} of ε = 3 (calibration is tight)");
    assert_eq!(p["rounds_charged"], 12);
    // The reported spend is what the accountant gives for the charged rounds.
    let want =
        privacy::epsilon(&[PrivacyEvent::new(q, z_eff, 12).expect("valid")], 1e-5, AccountantKind::Rdp)
            .expect("valid");
    assert!((eps - want).abs() < 1e-9, "{eps} vs {want}");
    // Adaptive clipping is on by default with noise, and logged per round.
    assert_eq!(report["config"]["adaptive_clip"], true);
    let history = report["history"].as_array().expect("history");
    assert!(history.iter().all(|h| h["unclipped_fraction_estimate"].is_number()), "{history:?}");
    assert!(num(&report["config"]["noise_multiplier"]) > 0.0);
}

#[test]
fn sweep_writes_one_point_per_epsilon_with_table_json_csv_and_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("gen.tsv");
    write_tsv(&data, &low_rank_ratings(200, 30, 3, 8, 0.2, 6)).expect("write ratings");
    let (out, csv, svg) = (dir.path().join("s.json"), dir.path().join("s.csv"), dir.path().join("s.svg"));
    let stdout = fedrec_sim_ok(
        dir.path(),
        &[
            "sweep",
            "--ratings",
            "gen.tsv",
            "--rounds",
            "5",
            "--clients-per-round",
            "40",
            "--dim",
            "4",
            "--epsilons",
            "2,8,inf",
            "--quiet",
            "--json",
            out.to_str().expect("utf-8"),
            "--csv",
            csv.to_str().expect("utf-8"),
            "--plot",
            svg.to_str().expect("utf-8"),
        ],
    )
    .stdout;
    assert_eq!(String::from_utf8_lossy(&stdout).lines().filter(|l| l.contains("Recall@20")).count(), 3);
    let report = json(&out);
    let points = report["points"].as_array().expect("points");
    assert_eq!(points.len(), 3);
    assert_eq!(points[0]["target_epsilon"], 2.0);
    assert!(points[2]["target_epsilon"].is_null() && points[2]["privacy"].is_null(), "inf is non-private");
    // More budget, less noise; each spend within its target.
    let sigma: Vec<f64> = points.iter().map(|p| num(&p["noise_multiplier"])).collect();
    assert!(sigma[0] > sigma[1] && sigma[2] == 0.0, "{sigma:?}");
    for p in &points[..2] {
        assert!(num(&p["privacy"]["epsilon"]) <= num(&p["target_epsilon"]));
    }
    assert_eq!(std::fs::read_to_string(&csv).expect("csv").lines().count(), 4);
    assert!(std::fs::read_to_string(&svg).expect("svg").contains("<svg"));
}

/// Issue 12: a sweep with `--distributed-bits` plots one line per mechanism, with a legend.
#[test]
fn a_distributed_sweep_plots_one_line_per_mechanism() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("gen.tsv");
    write_tsv(&data, &low_rank_ratings(200, 30, 3, 8, 0.2, 6)).expect("write ratings");
    let svg = dir.path().join("d.svg");
    fedrec_sim_ok(
        dir.path(),
        &[
            "sweep",
            "--ratings",
            "gen.tsv",
            "--rounds",
            "3",
            "--clients-per-round",
            "40",
            "--dim",
            "4",
            "--aggregation",
            "secure",
            "--clip",
            "fixed",
            "--epsilons",
            "8,inf",
            "--distributed-bits",
            "16",
            "--quiet",
            "--plot",
            svg.to_str().expect("utf-8"),
        ],
    );
    let text = std::fs::read_to_string(&svg).expect("svg");
    assert!(text.contains("central") && text.contains("distributed, 16 bits"), "a legend per mechanism");
}

#[test]
fn bad_privacy_arguments_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["privacy", "epsilon", "--q", "1.5", "--sigma", "1", "--steps", "10"][..],
        &["privacy", "epsilon", "--q", "0.1", "--sigma", "0", "--steps", "10"][..],
        &["privacy", "sigma", "--epsilon", "0", "--q", "0.1", "--steps", "10"][..],
        &["privacy", "sigma", "--epsilon", "1", "--delta", "2", "--q", "0.1", "--steps", "10"][..],
    ] {
        let out = Command::new(fedrec_sim_bin())
            .args(args)
            .current_dir(dir.path())
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("fedrec-sim starts");
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty(), "{args:?} failed silently");
    }
}

#[test]
fn synthetic_population_runs_end_to_end_and_is_reproducible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str| {
        let out = dir.path().join(name);
        fedrec_sim_ok(
            dir.path(),
            &[
                "run",
                "--dataset",
                "synthetic",
                "--users",
                "400",
                "--items",
                "80",
                "--rounds",
                "5",
                "--clients-per-round",
                "50",
                "--dim",
                "4",
                "--objective",
                "implicit",
                "--quiet",
                "--json",
                out.to_str().expect("utf-8"),
            ],
        );
        json(&out)
    };
    let (a, b) = (run("a.json"), run("b.json"));
    assert_eq!(a["dataset"]["n_users"], 400);
    assert_eq!(a["dataset"]["n_items"], 80);
    assert!(num(&a["dataset"]["n_train"]) >= 400.0 * 16.0, "at least 20 interactions per user, 80% in train");
    assert_eq!(a["metrics"], b["metrics"], "same seed, same population, same run");
}
