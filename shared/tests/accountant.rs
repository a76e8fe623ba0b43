//! The privacy accountants against Google's dp-accounting (known-answer vectors in
//! `tests/data/`, written by `scripts/accountant_vectors.py`) and against the properties any
//! accountant must have: the q = 1 closed form, monotonicity, additivity, round trips.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedrec_shared::privacy::calibrate::{RELATIVE_TOLERANCE, SIGMA_MAX, calibrate_noise_with};
use fedrec_shared::privacy::rdp::{self, DEFAULT_ORDERS};
use fedrec_shared::privacy::{
    AccountantKind, PrivacyError, PrivacyEvent, calibrate_noise, delta, epsilon, pld,
};

/// One parsed CSV file: rows as column name → cell.
struct Table {
    name: &'static str,
    rows: Vec<BTreeMap<String, String>>,
}

impl Table {
    /// Reads `tests/data/<name>`: `#` lines are comments, the first other line is the header,
    /// cells are plain numbers or words (no quoting), separated by commas.
    fn load(name: &'static str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let header: Vec<String> =
            lines.next().expect("a header line").split(',').map(str::to_owned).collect();
        let rows = lines
            .map(|line| {
                let cells: Vec<&str> = line.split(',').collect();
                assert_eq!(cells.len(), header.len(), "{name}: bad row {line:?}");
                header.iter().cloned().zip(cells.into_iter().map(str::to_owned)).collect()
            })
            .collect();
        Self { name, rows }
    }

    fn f64(&self, row: &BTreeMap<String, String>, column: &str) -> f64 {
        let cell = row.get(column).unwrap_or_else(|| panic!("{}: no column {column}", self.name));
        cell.parse().unwrap_or_else(|e| panic!("{}: {column} = {cell:?}: {e}", self.name))
    }

    fn u64(&self, row: &BTreeMap<String, String>, column: &str) -> u64 {
        let cell = row.get(column).unwrap_or_else(|| panic!("{}: no column {column}", self.name));
        cell.parse().unwrap_or_else(|e| panic!("{}: {column} = {cell:?}: {e}", self.name))
    }
}

fn event(q: f64, sigma: f64, steps: u64) -> PrivacyEvent {
    PrivacyEvent::new(q, sigma, steps).expect("valid event")
}

fn rel_err(got: f64, want: f64) -> f64 {
    if got == want { 0.0 } else { ((got - want) / want).abs() }
}

/// How far below a reference a value may fall, relative to it: floating-point noise only.
/// Everything we compute may err only on the side that protects the users.
const BELOW_REFERENCE: f64 = 1e-9;

/// Checks that `got` is not below `want` by more than [`BELOW_REFERENCE`] relative, and not
/// above it by more than `above` relative (or `above_abs` absolute, for values near 0).
/// Returns the signed relative difference (positive: `got` is above).
fn one_sided(what: &str, got: f64, want: f64, above: f64, above_abs: f64) -> f64 {
    let signed = if got == want { 0.0 } else { (got - want) / want.abs() };
    assert!(
        got >= want || want - got <= BELOW_REFERENCE * want.abs(),
        "{what}: below the reference by {:e} relative (at most {BELOW_REFERENCE:e} allowed)",
        -signed
    );
    assert!(
        signed <= above || got - want <= above_abs,
        "{what}: above the reference by {signed:e} relative (at most {above:e} allowed)"
    );
    signed
}

/// Keys for grouping rows by exact float values.
fn key(values: &[f64]) -> Vec<u64> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn rdp_matches_dp_accounting() {
    let table = Table::load("accountant_rdp.csv");
    assert_eq!(table.rows.len(), 360);
    // One-step RDP curves per (q, σ); steps only scale them.
    let mut curves: BTreeMap<Vec<u64>, Vec<f64>> = BTreeMap::new();
    let (mut max_rel, mut worst) = (0.0f64, String::new());
    for row in &table.rows {
        let (q, sigma, steps, delta, want) = (
            table.f64(row, "q"),
            table.f64(row, "sigma"),
            table.u64(row, "steps"),
            table.f64(row, "delta"),
            table.f64(row, "epsilon"),
        );
        let curve = curves
            .entry(key(&[q, sigma]))
            .or_insert_with(|| rdp::compose(&[event(q, sigma, 1)], &DEFAULT_ORDERS).expect("valid orders"));
        let total: Vec<f64> = curve.iter().map(|r| r * steps as f64).collect();
        let (got, _order) = rdp::epsilon_from_rdp(&DEFAULT_ORDERS, &total, delta).expect("valid curve");
        let what = format!("q={q} σ={sigma} steps={steps} δ={delta}: got {got}, dp-accounting {want}");
        if want.is_infinite() {
            assert_eq!(got, want, "{what}");
            continue;
        }
        let rel = one_sided(&what, got, want, 5e-4, 1e-6);
        if rel > max_rel {
            (max_rel, worst) = (rel, what);
        }
    }
    eprintln!("RDP: at most {max_rel:e} above dp-accounting over {} rows ({worst})", table.rows.len());
}

#[test]
fn rdp_event_api_matches_the_curve_api() {
    // rdp::epsilon(events) is compose + epsilon_from_rdp; spot-check it on the vectors.
    let table = Table::load("accountant_rdp.csv");
    for row in table.rows.iter().step_by(37) {
        let (q, sigma, steps, delta, want) = (
            table.f64(row, "q"),
            table.f64(row, "sigma"),
            table.u64(row, "steps"),
            table.f64(row, "delta"),
            table.f64(row, "epsilon"),
        );
        let got = epsilon(&[event(q, sigma, steps)], delta, AccountantKind::Rdp).expect("valid inputs");
        one_sided(&format!("q={q} σ={sigma} steps={steps}: {got} vs {want}"), got, want, 5e-4, 1e-6);
    }
}

#[test]
fn pld_matches_dp_accounting() {
    let table = Table::load("accountant_pld.csv");
    // The full grid on d = 1e-3 (1e-2 where ε is in the hundreds), plus 16 rows on d = 1e-4.
    assert_eq!(table.rows.len(), 376);
    let mut plds: BTreeMap<Vec<u64>, pld::Pld> = BTreeMap::new();
    let (mut max_rel, mut worst) = (0.0f64, String::new());
    for row in &table.rows {
        let (q, sigma, steps, delta, d, want) = (
            table.f64(row, "q"),
            table.f64(row, "sigma"),
            table.u64(row, "steps"),
            table.f64(row, "delta"),
            table.f64(row, "discretization"),
            table.f64(row, "epsilon"),
        );
        let pld = plds
            .entry(key(&[q, sigma, steps as f64, d]))
            .or_insert_with(|| pld::compose(&[event(q, sigma, steps)], d).expect("PLD fits"));
        let got = pld.epsilon_for_delta(delta).expect("valid delta");
        let what = format!("q={q} σ={sigma} steps={steps} δ={delta} d={d}: got {got}, dp-accounting {want}");
        if want.is_infinite() {
            assert_eq!(got, want, "{what}");
            continue;
        }
        let rel = one_sided(&what, got, want, 1e-2, 0.0);
        if rel > max_rel {
            (max_rel, worst) = (rel, what);
        }
    }
    eprintln!("PLD: at most {max_rel:e} above dp-accounting over {} rows ({worst})", table.rows.len());
}

#[test]
fn calibration_matches_dp_accounting() {
    let table = Table::load("accountant_calibration.csv");
    assert_eq!(table.rows.len(), 12);
    let mut max_rel = 0.0f64;
    for row in &table.rows {
        let (target, delta, q, steps, d, want) = (
            table.f64(row, "target_epsilon"),
            table.f64(row, "delta"),
            table.f64(row, "q"),
            table.u64(row, "steps"),
            table.f64(row, "discretization"),
            table.f64(row, "sigma"),
        );
        let accountant = row.get("accountant").map(String::as_str);
        let eps_of = |sigma: f64| match accountant {
            Some("rdp") => epsilon(&[event(q, sigma, steps)], delta, AccountantKind::Rdp),
            Some("pld") => pld::epsilon(&[event(q, sigma, steps)], delta, d),
            other => panic!("unknown accountant {other:?}"),
        };
        let got = if accountant == Some("rdp") {
            calibrate_noise(target, delta, q, steps, AccountantKind::Rdp).expect("reachable")
        } else {
            calibrate_noise_with(target, eps_of).expect("reachable")
        };
        let what = format!("{accountant:?} ε={target} q={q} steps={steps}: σ {got} vs dp-accounting {want}");
        // Less noise than dp-accounting's σ would spend more than the target.
        let rel = one_sided(&what, got, want, 2.0 * RELATIVE_TOLERANCE, 0.0);
        assert!(eps_of(got).expect("valid") <= target, "{what}: the returned σ misses the target");
        max_rel = max_rel.max(rel);
    }
    eprintln!("calibration: at most {max_rel:e} above dp-accounting over {} rows", table.rows.len());
}

#[test]
fn full_sampling_is_the_gaussian_mechanism() {
    for sigma in [0.5, 1.0, 3.7] {
        let curve = rdp::compose(&[event(1.0, sigma, 7)], &DEFAULT_ORDERS).expect("valid orders");
        for (&alpha, &got) in DEFAULT_ORDERS.iter().zip(&curve) {
            let want = 7.0 * alpha / (2.0 * sigma * sigma);
            assert!(rel_err(got, want) < 1e-12, "α={alpha} σ={sigma}: {got} vs {want}");
        }
    }
}

#[test]
fn rdp_special_cases() {
    assert_eq!(rdp::rdp_sampled_gaussian(0.0, 1.0, 2.0), Ok(0.0));
    assert_eq!(rdp::rdp_sampled_gaussian(0.1, 0.0, 2.5), Ok(f64::INFINITY));
    assert_eq!(rdp::rdp_sampled_gaussian(0.1, 1.0, f64::INFINITY), Ok(f64::INFINITY));
    assert_eq!(rdp::rdp_sampled_gaussian(1.0, 2.0, 3.0), Ok(3.0 / 8.0));
    // A small q at a moderate order is close to the q² α / σ² regime, far below q = 1.
    let small = rdp::rdp_sampled_gaussian(0.01, 1.0, 2.0).expect("valid");
    assert!(small > 0.0 && small < 2.0 * 0.01 * 0.01 * 2.0, "{small}");
}

#[test]
fn rdp_grows_with_q_and_shrinks_with_noise() {
    let orders: [f64; 8] = [1.5, 2.0, 2.5, 4.0, 7.3, 16.0, 64.0, 256.0];
    let qs = [0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 1.0];
    let sigmas = [0.5, 0.8, 1.0, 2.0, 5.0, 10.0];
    // Fractional orders follow dp-accounting's series, which sums binomial coefficients in
    // absolute value: an over-estimate that at large q can exceed even q = 1 (dp-accounting
    // gives 0.0130 at q = 0.3, σ = 10, α = 1.5 against 0.0075 at q = 1), or not settle at all
    // (then ∞, which excludes the order). Over-estimates only make ε conservative. So
    // fractional orders are checked for q ≤ 0.1 and finite values, integer orders everywhere.
    let finite = |values: Vec<f64>| -> Vec<f64> { values.into_iter().filter(|v| v.is_finite()).collect() };
    for &alpha in &orders {
        let qs: &[f64] = if alpha.fract() == 0.0 { &qs } else { &qs[..5] };
        for &sigma in &sigmas {
            let by_q = finite(
                qs.iter().map(|&q| rdp::rdp_sampled_gaussian(q, sigma, alpha).expect("valid")).collect(),
            );
            assert!(by_q.len() >= 3, "α={alpha} σ={sigma}: too few finite values {by_q:?}");
            for w in by_q.windows(2) {
                assert!(w[0] <= w[1] * (1.0 + 1e-12), "α={alpha} σ={sigma}: not monotone in q: {by_q:?}");
            }
        }
        for &q in &qs[1..] {
            let by_sigma = finite(
                sigmas.iter().map(|&s| rdp::rdp_sampled_gaussian(q, s, alpha).expect("valid")).collect(),
            );
            for w in by_sigma.windows(2) {
                assert!(w[0] * (1.0 + 1e-12) >= w[1], "α={alpha} q={q}: not monotone in 1/σ: {by_sigma:?}");
            }
        }
    }
    // Integer orders use the exact finite sum: always finite, so the check is complete there.
    for alpha in [2.0, 3.0, 10.0, 64.0, 1024.0] {
        for &sigma in &sigmas {
            for &q in &qs {
                assert!(rdp::rdp_sampled_gaussian(q, sigma, alpha).expect("valid").is_finite());
            }
        }
    }
    // And so ε, for both accountants.
    for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
        let eps = |q, sigma, steps| epsilon(&[event(q, sigma, steps)], 1e-5, kind).expect("valid");
        assert!(eps(0.01, 1.0, 100) < eps(0.02, 1.0, 100), "{kind:?}");
        assert!(eps(0.01, 1.5, 100) < eps(0.01, 1.0, 100), "{kind:?}");
        assert!(eps(0.01, 1.0, 100) < eps(0.01, 1.0, 200), "{kind:?}");
    }
}

#[test]
fn composition_adds_up() {
    let a = event(0.01, 1.1, 300);
    let b = event(0.05, 2.0, 40);
    let ab = rdp::compose(&[a, b], &DEFAULT_ORDERS).expect("valid");
    let (ra, rb) = (
        rdp::compose(&[a], &DEFAULT_ORDERS).expect("valid"),
        rdp::compose(&[b], &DEFAULT_ORDERS).expect("valid"),
    );
    for ((x, y), z) in ra.iter().zip(&rb).zip(&ab) {
        assert!(rel_err(x + y, *z) < 1e-12);
    }
    // Splitting an event's steps changes nothing (exactly for RDP, to the grid for PLD).
    let whole = [event(0.02, 1.0, 50)];
    let split = [event(0.02, 1.0, 20), event(0.02, 1.0, 30)];
    let rdp_whole = rdp::epsilon(&whole, 1e-6).expect("valid");
    assert!(rel_err(rdp::epsilon(&split, 1e-6).expect("valid"), rdp_whole) < 1e-12);
    let pld_whole = pld::epsilon(&whole, 1e-6, 1e-3).expect("valid");
    let pld_split = pld::epsilon(&split, 1e-6, 1e-3).expect("valid");
    assert!(rel_err(pld_split, pld_whole) < 1e-3, "{pld_split} vs {pld_whole}");
    // Composing costs more than either part, and no more than their sum.
    for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
        let (ea, eb) = (epsilon(&[a], 1e-6, kind).expect("valid"), epsilon(&[b], 1e-6, kind).expect("valid"));
        let eab = epsilon(&[a, b], 1e-6, kind).expect("valid");
        assert!(eab > ea.max(eb) && eab < ea + eb, "{kind:?}: {ea} + {eb} → {eab}");
    }
    // Nothing spent costs nothing.
    for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
        assert_eq!(epsilon(&[], 1e-6, kind), Ok(0.0));
        assert_eq!(epsilon(&[event(0.0, 1.0, 10), event(0.5, 1.0, 0)], 1e-6, kind), Ok(0.0));
    }
}

#[test]
fn pld_handles_distributions_of_a_few_points() {
    // So much noise that one step's loss spans three grid cells.
    let eps = pld::epsilon(&[event(1e-6, 100.0, 1)], 1e-6, 1e-2).expect("valid");
    assert!((0.0..=0.01).contains(&eps), "{eps}");
    let eps = pld::epsilon(&[event(1e-6, 100.0, 1000)], 1e-6, 1e-2).expect("valid");
    assert!((0.0..=0.05).contains(&eps), "{eps}");
}

#[test]
fn pld_is_tighter_than_rdp() {
    for (q, sigma, steps) in [(0.01, 1.0, 1000), (0.05, 2.0, 100), (0.1, 5.0, 10), (1.0, 1.0, 10)] {
        let events = [event(q, sigma, steps)];
        let r = rdp::epsilon(&events, 1e-6).expect("valid");
        let p = pld::epsilon(&events, 1e-6, 1e-3).expect("valid");
        assert!(p < r, "q={q} σ={sigma} steps={steps}: PLD {p} vs RDP {r}");
    }
}

#[test]
fn epsilon_and_delta_invert_each_other() {
    let events = [event(0.02, 1.2, 400), event(0.01, 0.9, 100)];
    for target_delta in [1e-5, 1e-7] {
        let eps = rdp::epsilon(&events, target_delta).expect("valid");
        let back = rdp::delta(&events, eps).expect("valid");
        assert!(
            back <= target_delta * (1.0 + 1e-9) && back > 0.5 * target_delta,
            "RDP: {target_delta} → {eps} → {back}"
        );

        let p = pld::compose(&events, 1e-3).expect("fits");
        let eps = p.epsilon_for_delta(target_delta).expect("valid");
        let back = p.delta_for_epsilon(eps).expect("valid");
        assert!(rel_err(back, target_delta) < 1e-6, "PLD: {target_delta} → {eps} → {back}");
    }
    // The public dispatcher agrees with the modules.
    let eps = epsilon(&events, 1e-5, AccountantKind::Rdp).expect("valid");
    assert_eq!(delta(&events, eps, AccountantKind::Rdp), rdp::delta(&events, eps));
}

#[test]
fn calibration_round_trips() {
    let check = |what: &str, got: f64, sigma: f64| {
        assert!(
            rel_err(got, sigma) <= 2.0 * RELATIVE_TOLERANCE,
            "{what}: calibrates to σ={got}, not {sigma}"
        );
    };
    for (q, sigma, steps) in [(0.02, 1.3, 500), (0.1, 0.8, 20), (1.0, 4.0, 3)] {
        let eps = epsilon(&[event(q, sigma, steps)], 1e-5, AccountantKind::Rdp).expect("valid");
        check(
            &format!("RDP q={q} steps={steps}"),
            calibrate_noise(eps, 1e-5, q, steps, AccountantKind::Rdp).expect("reachable"),
            sigma,
        );
        // The PLD on a 1e-3 grid (the default 1e-4 grid costs ten times as much per step).
        let pld_eps = |s| pld::epsilon(&[event(q, s, steps)], 1e-5, 1e-3);
        let eps = pld_eps(sigma).expect("valid");
        check(
            &format!("PLD q={q} steps={steps}"),
            calibrate_noise_with(eps, pld_eps).expect("reachable"),
            sigma,
        );
    }
    // And once through the public entry point with the default grid, on a cheap mechanism.
    let (q, sigma, steps) = (0.2, 3.0, 5);
    let eps = epsilon(&[event(q, sigma, steps)], 1e-5, AccountantKind::Pld).expect("valid");
    check(
        "PLD default grid",
        calibrate_noise(eps, 1e-5, q, steps, AccountantKind::Pld).expect("reachable"),
        sigma,
    );
}

#[test]
fn invalid_inputs_are_refused() {
    for q in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(PrivacyEvent::new(q, 1.0, 1), Err(PrivacyError::SamplingProbability(_))), "q={q}");
    }
    for sigma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(PrivacyEvent::new(0.1, sigma, 1), Err(PrivacyError::NoiseMultiplier(_))),
            "σ={sigma}"
        );
    }
    let events = [event(0.1, 1.0, 10)];
    for bad_delta in [0.0, 1.0, -1e-5, f64::NAN] {
        for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
            assert!(
                matches!(epsilon(&events, bad_delta, kind), Err(PrivacyError::Delta(_))),
                "δ={bad_delta}"
            );
        }
    }
    assert!(matches!(delta(&events, -1.0, AccountantKind::Rdp), Err(PrivacyError::Epsilon(_))));
    assert!(matches!(delta(&events, f64::NAN, AccountantKind::Pld), Err(PrivacyError::Epsilon(_))));
    assert!(matches!(rdp::rdp_sampled_gaussian(0.1, 1.0, 1.0), Err(PrivacyError::Order(_))));
    assert!(matches!(rdp::rdp_sampled_gaussian(0.1, 1.0, f64::NAN), Err(PrivacyError::Order(_))));
    assert!(matches!(rdp::rdp_sampled_gaussian(0.1, -1.0, 2.0), Err(PrivacyError::NoiseMultiplier(_))));
    assert!(matches!(
        rdp::rdp_sampled_gaussian(f64::NAN, 1.0, 2.0),
        Err(PrivacyError::SamplingProbability(_))
    ));
    assert!(matches!(
        rdp::epsilon_from_rdp(&[2.0, 3.0], &[0.1], 1e-5),
        Err(PrivacyError::OrdersMismatch { orders: 2, values: 1 })
    ));
    for d in [0.0, -1e-3, f64::NAN] {
        assert!(matches!(pld::epsilon(&events, 1e-5, d), Err(PrivacyError::Discretization(_))), "d={d}");
    }
    assert!(matches!(pld::epsilon(&events, 1e-5, 1e-9), Err(PrivacyError::PldTooLarge { .. })));
    let (p3, p4) = (pld::compose(&events, 1e-3).expect("fits"), pld::compose(&events, 1e-4).expect("fits"));
    assert!(matches!(p3.compose(&p4), Err(PrivacyError::DiscretizationMismatch { .. })));
}

#[test]
fn calibration_reports_what_it_cannot_do() {
    let kind = AccountantKind::Rdp;
    assert_eq!(calibrate_noise(1.0, 1e-5, 0.0, 100, kind), Err(PrivacyError::NothingToCalibrate));
    assert_eq!(calibrate_noise(1.0, 1e-5, 0.1, 0, kind), Err(PrivacyError::NothingToCalibrate));
    for target in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        assert!(
            matches!(calibrate_noise(target, 1e-5, 0.1, 10, kind), Err(PrivacyError::Epsilon(_))),
            "{target}"
        );
    }
    assert!(matches!(calibrate_noise(1.0, 0.0, 0.1, 10, kind), Err(PrivacyError::Delta(_))));
    // A billion unsampled releases: even σ = SIGMA_MAX leaves ε ≈ 0.1.
    match calibrate_noise(1e-3, 1e-5, 1.0, 1_000_000_000, kind) {
        Err(PrivacyError::Unreachable { noise_multiplier, epsilon, .. }) => {
            assert_eq!(noise_multiplier, SIGMA_MAX);
            assert!(epsilon > 1e-3);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}
