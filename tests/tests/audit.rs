//! `fedrec-sim audit` end to end: on a small synthetic population the one-run lower bound stays below the accountant's ε for the real mechanism, and exceeds it when the released noise is secretly divided by 10 (fixed seeds).

use std::path::Path;

use fedrec_tests::fedrec_sim_ok;
use serde_json::Value;

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Audits one run of 50 synthetic users and 500 canaries (one round, every device selected,
/// plain SGD so the model delta is the noised sum), optionally with the noise weakened.
fn audit(dir: &Path, name: &str, weaken: Option<&str>) -> Value {
    let out = dir.join(format!("{name}.json"));
    let mut args = vec![
        "audit",
        "--dataset",
        "synthetic",
        "--users",
        "50",
        "--items",
        "2000",
        "--dim",
        "16",
        "--segments",
        "2",
        "--rounds",
        "1",
        "--clients-per-round",
        "550",
        "--canaries",
        "500",
        "--epsilon",
        "2",
        "--delta",
        "1e-5",
        "--optimizer",
        "sgd",
        "--momentum",
        "0",
        "--server-lr",
        "1",
        "--clip",
        "fixed",
        "--clip-norm",
        "1",
        "--eval-users",
        "10",
        "--threads",
        "2",
        "--seed",
        "7",
        "--json",
    ];
    args.push(out.to_str().expect("utf-8 path"));
    if let Some(f) = weaken {
        args.extend(["--danger-weaken-noise", f]);
    }
    fedrec_sim_ok(dir, &args);
    let text = std::fs::read_to_string(&out).expect("report written");
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn audit_bound_stays_below_epsilon_on_the_real_mechanism_and_catches_weakened_noise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = audit(dir.path(), "real", None);
    let weak = audit(dir.path(), "weak", Some("10"));
    for rep in [&real, &weak] {
        assert!((num(&rep["epsilon"]) - 2.0).abs() < 0.01, "accountant's ε {}", rep["epsilon"]);
        assert_eq!(rep["canaries"], 500);
        assert_eq!(rep["guesses"], 100);
        assert!(num(&rep["confidence"]) == 0.95);
    }
    let (lb_real, lb_weak) = (num(&real["epsilon_lower_bound"]), num(&weak["epsilon_lower_bound"]));
    // The real mechanism is (2, 1e-5)-DP: a sound audit cannot exceed that (at 95%).
    assert!(lb_real < num(&real["epsilon"]), "real mechanism: lower bound {lb_real}");
    // Noise / 10 is about a 10x larger ε; the audit must see it through the claimed ε.
    assert!(lb_weak > num(&weak["epsilon"]), "weakened mechanism: lower bound {lb_weak}");
    assert!(num(&weak["correct"]) > num(&real["correct"]));
    // The canary-cosine estimate tells the two apart as well.
    let est = |r: &Value| r["epsilon_canary_cosine"].as_f64().unwrap_or(0.0);
    assert!(est(&real) < 3.0 && est(&weak) > 10.0, "estimates {} {}", est(&real), est(&weak));
}

/// The canaries upload crafted plain updates: an audit asked to run with secure aggregation
/// refuses, naming the option, instead of silently running without canaries.
#[test]
fn an_audit_with_secure_aggregation_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "audit",
        "--dataset",
        "synthetic",
        "--users",
        "50",
        "--items",
        "200",
        "--rounds",
        "1",
        "--canaries",
        "10",
        "--epsilon",
        "2",
        "--delta",
        "1e-5",
        "--aggregation",
        "secure",
    ];
    let out = fedrec_tests::fedrec_sim(dir.path(), &args);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--aggregation plain"), "{said}");
}
