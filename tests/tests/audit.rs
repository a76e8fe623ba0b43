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

/// Issue 12: `audit --mechanism distributed`: the canaries run the devices' secure protocol
/// with distributed noise (their crafted update rotated, rounded, noised and masked like any
/// device's). At ε = 2 the one-run lower bound stays below the accountant's ε; at ε = 64 (little
/// noise) the same audit finds the canaries, which shows they did reach the released model
/// through the distributed path (an audit whose canaries were dropped would find nothing).
#[test]
fn a_distributed_audit_stays_below_epsilon_and_sees_its_canaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, epsilon: &str| -> Value {
        let out = dir.path().join(format!("{name}.json"));
        let args = [
            "audit",
            "--dataset",
            "synthetic",
            "--users",
            "30",
            "--items",
            "200",
            "--dim",
            "8",
            "--segments",
            "2",
            "--rounds",
            "1",
            "--clients-per-round",
            "330",
            "--canaries",
            "300",
            "--epsilon",
            epsilon,
            "--delta",
            "1e-5",
            "--aggregation",
            "secure",
            "--mechanism",
            "distributed",
            "--bits",
            "20",
            "--dropout",
            "0",
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
            out.to_str().expect("utf-8 path"),
        ];
        fedrec_sim_ok(dir.path(), &args);
        serde_json::from_str(&std::fs::read_to_string(&out).expect("report written")).expect("valid JSON")
    };
    let private = run("eps2", "2");
    let loose = run("eps64", "64");
    for (rep, eps) in [(&private, 2.0), (&loose, 64.0)] {
        assert!(
            num(&rep["epsilon"]) <= eps * 1.001,
            "the ledger's ε {} within the target {eps}",
            rep["epsilon"]
        );
        assert_eq!(rep["audit"]["rounds_charged"], 1, "{rep}");
    }
    let lb = num(&private["epsilon_lower_bound"]);
    assert!(lb < num(&private["epsilon"]), "lower bound {lb} above the accountant's ε");
    let lb_loose = num(&loose["epsilon_lower_bound"]);
    assert!(lb_loose > 1.0, "at ε = 64 the canaries are found: lower bound {lb_loose}");
    assert!(num(&loose["audit"]["canary_cosine_mu"]) > num(&private["audit"]["canary_cosine_mu"]));
}
