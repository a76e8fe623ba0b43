//! `fedrec-sim bench --aggregation secure` end to end: on small generated data, a cohort of 12 devices without and with dropouts writes one JSON object per run with the cost fields, completed rounds, more bytes than a plain round, and the parameters the finder gives for the cohort that advertised keys.

use std::path::Path;

use fedrec_shared::privacy::discrete::Grid;
use fedrec_shared::secagg::encode::bits_for;
use fedrec_shared::secagg::params::{FinderInput, find_params};
use fedrec_tests::{fedrec_sim_ok, low_rank_ratings, write_tsv};
use serde_json::Value;

const COHORT: usize = 12;
const DROPOUTS: [f64; 2] = [0.0, 0.3];

fn num(run: &Value, key: &str) -> f64 {
    run[key].as_f64().unwrap_or_else(|| panic!("`{key}` should be a number in {run}"))
}

fn count(run: &Value, key: &str) -> usize {
    let v = run[key].as_u64().unwrap_or_else(|| panic!("`{key}` should be a count in {run}"));
    usize::try_from(v).expect("a small count")
}

fn str_path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

#[test]
fn secure_bench_reports_the_cost_of_a_completed_round_per_dropout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ratings = dir.path().join("gen.tsv");
    // 40 users, fewer than some cohorts would need: the bench reuses users.
    write_tsv(&ratings, &low_rank_ratings(40, 30, 3, 8, 0.2, 5)).expect("write ratings");
    let out = dir.path().join("secbench.json");
    let dropouts = DROPOUTS.map(|d| d.to_string()).join(",");
    let cohort = COHORT.to_string();
    fedrec_sim_ok(
        dir.path(),
        &[
            "bench",
            "--aggregation",
            "secure",
            "--ratings",
            str_path(&ratings),
            "--dim",
            "4",
            "--segments",
            "3",
            "--clients-per-round",
            &cohort,
            "--dropouts",
            &dropouts,
            "--threads",
            "2",
            "--json",
            str_path(&out),
        ],
    );
    let text = std::fs::read_to_string(&out).expect("the JSON report was written");
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    assert_eq!(report["command"], "bench");
    assert_eq!(report["aggregation"], "secure");
    let config = &report["config"];
    let (delta, gamma) = (num(config, "secagg_dropout"), num(config, "secagg_corrupt"));
    let clip_norm = num(config, "clip_norm") as f32;
    let summary = &report["summary"];
    let update_len = count(summary, "update_len");
    let grid = Grid::for_secure_sum(clip_norm, update_len).expect("a valid grid");

    let runs = report["runs"].as_array().expect("`runs` is a list");
    assert_eq!(runs.len(), DROPOUTS.len(), "one run per dropout (repeat defaults to 1): {runs:?}");
    for (run, dropout) in runs.iter().zip(DROPOUTS) {
        for key in [
            "n",
            "dropout",
            "k",
            "t",
            "bits",
            "device_ms_median",
            "device_ms_p95",
            "plain_device_ms_median",
            "bytes_up_per_device",
            "bytes_down_per_device",
            "plain_bytes_up_per_device",
            "plain_bytes_down_per_device",
            "extra_bytes_fraction",
            "coordinator_ms",
            "coordinator_unmask_ms",
            "survivors",
            "completed",
        ] {
            assert!(!run[key].is_null(), "`{key}` missing from {run}");
        }
        assert_eq!(count(run, "cohort"), COHORT);
        assert_eq!(num(run, "dropout"), dropout);
        assert_eq!(run["completed"], true, "the round should complete: {run}");
        let n = count(run, "n");
        let survivors = count(run, "survivors");
        assert!(n <= COHORT && survivors <= n && survivors > 0, "{run}");
        if dropout == 0.0 {
            assert_eq!((n, survivors, count(run, "vanished")), (COHORT, COHORT, 0), "{run}");
        } else {
            assert!(count(run, "vanished") > 0, "a 30% dropout over 12 devices vanished none: {run}");
        }
        // k and t are the finder's for the cohort that advertised keys, under the run's δ, γ.
        let params = find_params(&FinderInput::new(n, delta, gamma)).expect("the finder has parameters");
        assert_eq!((count(run, "k"), count(run, "t")), (params.k, params.t), "{run}");
        let bits = bits_for(n, &grid, false).expect("the sum fits a ring");
        assert_eq!(count(run, "bits"), bits as usize, "{run}");
        // Secure aggregation costs bytes on top of a plain round, both ways.
        assert!(num(run, "extra_bytes_fraction") > 0.0, "{run}");
        assert!(num(run, "bytes_up_per_device") > num(run, "plain_bytes_up_per_device"), "{run}");
        assert!(num(run, "bytes_down_per_device") > num(run, "plain_bytes_down_per_device"), "{run}");
        let plain = num(run, "plain_bytes_up_per_device") + num(run, "plain_bytes_down_per_device");
        let secure = num(run, "bytes_up_per_device") + num(run, "bytes_down_per_device");
        assert!((num(run, "extra_bytes_fraction") - (secure - plain) / plain).abs() < 1e-9, "{run}");
        // Times are measured (positive, finite), not asserted against a bound.
        for key in ["device_ms_median", "device_ms_p95", "plain_device_ms_median", "coordinator_unmask_ms"] {
            let x = num(run, key);
            assert!(x.is_finite() && x > 0.0, "`{key}` = {x} in {run}");
        }
        assert!(num(run, "device_ms_p95") >= num(run, "device_ms_median"), "{run}");
        assert!(num(run, "coordinator_ms") >= num(run, "coordinator_unmask_ms"), "{run}");
    }
    let rows = summary["rows"].as_array().expect("`summary.rows` is a list");
    assert_eq!(rows.len(), DROPOUTS.len());
    for (row, run) in rows.iter().zip(runs) {
        assert_eq!(row["k"], run["k"]);
        assert_eq!(row["completed_rounds"], 1);
    }
}

/// Issue 12: with `--mechanism distributed` the bench runs the devices' distributed encoding
/// (the round completes) and reports its cost: the encoding alone per device, `D` the next
/// power of two of the update's length, and the masked input's frame of `D` words against the
/// central round's `d`.
#[test]
fn distributed_bench_reports_the_encoding_cost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ratings = dir.path().join("gen.tsv");
    write_tsv(&ratings, &low_rank_ratings(40, 30, 3, 8, 0.2, 5)).expect("write ratings");
    let out = dir.path().join("ddp.json");
    fedrec_sim_ok(
        dir.path(),
        &[
            "bench",
            "--aggregation",
            "secure",
            "--mechanism",
            "distributed",
            "--bits",
            "16",
            "--noise-multiplier",
            "1.0",
            "--clip",
            "fixed",
            "--ratings",
            str_path(&ratings),
            "--dim",
            "4",
            "--segments",
            "3",
            "--clients-per-round",
            "12",
            "--dropouts",
            "0",
            "--threads",
            "2",
            "--json",
            str_path(&out),
        ],
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("written")).expect("the report is JSON");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["completed"], true, "{run}");
    let c = &run["distributed"];
    assert_eq!(c["bits"], 16, "{c}");
    let dim = count(c, "dim");
    let padded = count(c, "padded_dim");
    assert!(padded.is_power_of_two() && padded >= dim && padded < 2 * dim, "{c}");
    assert!(num(c, "encode_ms_median") > 0.0, "{c}");
    let (ddp_bytes, central_bytes) = (count(c, "masked_input_bytes"), count(c, "central_masked_input_bytes"));
    // 16-bit words travel in 2 bytes, the central ring's in 4: the frames differ by that (and
    // at most a few bytes of length prefix).
    let extra = (ddp_bytes as i64 - 2 * padded as i64) - (central_bytes as i64 - 4 * dim as i64);
    assert!(extra.abs() <= 3, "{c}");
}
