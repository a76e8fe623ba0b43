//! The distributed discrete Gaussian accountant (`fedrec_shared::ddp::accountant`) against the DDGauss authors' own accounting code, one-sided: known answers in `tests/data/ddgauss_reference.txt` (written by `simulations/python/tools/ddgauss_reference.py`).
//!
//! The reference is `ddgauss_epsilon` and `ddgauss_params` of `distributed_dp/accounting_utils.py`
//! in google-research/federated at commit 5e27a86323a35c2018fb97fbbe755c7ade9370ab (Kairouz,
//! Liu & Steinke, ICML 2021). The two parameterisations differ (the authors choose the grid
//! step `γ` with `k = 2` or `4` standard deviations and a `γ²/4` rounding variance, fedrec with
//! `k = √(2 ln(2D/p))` and `|R_j| < n`), so the accountant is compared like for like: every row
//! gives `γ` and one device's noise, and both sides derive `Δ₂`, `Δ₁`, `τ` and ε from them. The
//! calibrations are compared separately ([`calibration_against_the_authors`]).
//!
//! No ε printed in the papers was found in the sources searched (their results are plots;
//! the DDGauss paper gives formulas and the figures' settings), so the authors' code is the
//! reference. Measured: like for like, our ε is within `[−2.5·10⁻¹⁴, +9.8·10⁻¹⁴]` of theirs
//! on all 236 comparable rows.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedrec_shared::ddp::accountant::{self, DdpEvent};
use fedrec_shared::ddp::params::DEFAULT_WRAP_PROBABILITY;
use fedrec_shared::ddp::rounding::rounded_l2_bound;
use fedrec_shared::ddp::{DdpError, DdpParams, noise_for};

/// How far our ε may fall below the reference, relative: floating-point noise only. Below that
/// would be a bug (we would promise more privacy than the authors' own accounting).
const BELOW: f64 = 1e-9;

/// How far our ε may rise above the reference with the same inputs, relative. The formulas are
/// the same (DDGauss Proposition 14 with its three terms, Proposition 22 for `Δ₂`,
/// `Δ₁ = min(√D Δ₂, Δ₂²)`, Zhu & Wang Theorem 5 at the orders 2..128 and 256, and the
/// Canonne–Kamath–Steinke conversion), so only rounding separates them: measured
/// `[−2.5·10⁻¹⁴, +9.8·10⁻¹⁴]` over the file's rows (the test prints it).
const ABOVE: f64 = 1e-9;

/// `DdpParams` charges `Δ₂ (1 + 10⁻⁹)` (a margin for the `f64` arithmetic of `⌊Δ₂²⌋`): `2·10⁻⁹`
/// more on every `ε(α)`, which the Zhu–Wang bound at `q = 0.01` turns into up to `4.2·10⁻⁹`
/// more ε (measured). The production path may be this much above the reference.
const ABOVE_WITH_MARGIN: f64 = 1e-8;

/// The production path adds more noise than the reference is told: the sampler's `σ_dev²` is
/// the target rounded up to its grid of `2^-12` (`SIGMA_SQ_DENOMINATOR`), a relative excess `r`
/// of up to `2^-12/σ_dev²` (5.3·10⁻⁴ at `σ_dev = 0.52`). More noise, less ε: the production ε
/// may fall below the reference by this many times `r`. Measured: at most 5.3 `r` (at
/// `σ_dev = 0.52`, where the `τD` term of Proposition 14 dominates and the excess also shrinks
/// `τ`), 2.7 `r` at `σ_dev = 1.02`, about `r` where `τ` is negligible.
const SAMPLER_EXCESS_FACTOR: f64 = 10.0;

/// The sampler's grid for `σ_dev²` (grid units squared).
const SAMPLER_GRID: f64 = 1.0 / 4096.0;

/// One row of the data file.
#[derive(Debug, Clone)]
struct Case {
    source: String,
    n: usize,
    dim: usize,
    bits: u32,
    clip: f64,
    beta: f64,
    q: f64,
    steps: u64,
    delta: f64,
    target_eps: Option<f64>,
    calibrated: bool,
    gamma: f64,
    local_std: f64,
    ref_eps: f64,
}

impl Case {
    /// One device's noise variance in grid units.
    fn grid_var(&self) -> f64 {
        let s = self.local_std / self.gamma;
        s * s
    }

    /// The event with the reference's inputs: `Δ₂` by Proposition 22 at `c = C/γ`, no margin.
    fn event(&self) -> Result<DdpEvent, DdpError> {
        let l2 = rounded_l2_bound(self.clip / self.gamma, self.dim, self.beta);
        let l1 = l2 * (self.dim as f64).sqrt().min(l2);
        DdpEvent::from_parts(self.q, self.steps, l2, l1, self.grid_var(), self.n, self.dim)
    }

    /// fedrec's parameters for this cohort (all `n` must survive) with target noise `sigma`.
    fn params(&self, sigma: f64) -> DdpParams {
        DdpParams {
            dim: self.dim,
            clip_norm: self.clip,
            noise_std: sigma,
            n_cohort: self.n,
            min_reports: self.n,
            bits: self.bits,
            beta: self.beta,
            max_wrap_probability: DEFAULT_WRAP_PROBABILITY,
            rotation_seed: [0; 32],
        }
    }

    fn label(&self) -> String {
        format!(
            "{} n={} D={} bits={} q={} steps={} γ={:.4e} σ_dev={:.4} grid units",
            self.source,
            self.n,
            self.dim,
            self.bits,
            self.q,
            self.steps,
            self.gamma,
            self.grid_var().sqrt()
        )
    }
}

/// Reads the data file: `#` lines are comments, the first other line the header, then one
/// comma-separated row per case.
fn load() -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/ddgauss_reference.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    let header: Vec<&str> = lines.next().expect("a header line").split(',').collect();
    lines
        .map(|line| {
            let cells: BTreeMap<&str, &str> = header.iter().copied().zip(line.split(',')).collect();
            assert_eq!(cells.len(), header.len(), "bad row {line:?}");
            let cell = |c: &str| *cells.get(c).unwrap_or_else(|| panic!("no column {c}"));
            let num = |c: &str| -> f64 {
                cell(c).parse().unwrap_or_else(|e| panic!("{c} = {:?} in {line:?}: {e}", cell(c)))
            };
            let int = |c: &str| -> u64 {
                cell(c).parse().unwrap_or_else(|e| panic!("{c} = {:?} in {line:?}: {e}", cell(c)))
            };
            Case {
                source: cell("source").to_owned(),
                n: int("n") as usize,
                dim: int("dim") as usize,
                bits: int("bits") as u32,
                clip: num("clip"),
                beta: num("beta"),
                q: num("q"),
                steps: int("steps"),
                delta: num("delta"),
                target_eps: (cell("target_eps") != "-").then(|| num("target_eps")),
                calibrated: int("calibrated") == 1,
                gamma: num("gamma"),
                local_std: num("local_std"),
                ref_eps: num("ref_eps"),
            }
        })
        .collect()
}

/// Signed relative difference of `ours` from `reference` (positive: ours is larger).
fn rel(ours: f64, reference: f64) -> f64 {
    if ours == reference { 0.0 } else { (ours - reference) / reference }
}

/// Like for like: with the same `γ`, device noise, survivors, `D`, `β`, `q`, rounds and δ, our ε
/// is never below the authors' `ddgauss_epsilon` (beyond [`BELOW`]) and never above it by more
/// than [`ABOVE`]. Covers fedrec's own grid (144 rows minus those refused below), the authors'
/// `dme_run.py` settings (k = 2, D = 256, 10–16 bits), `plot_client_dropout.py` (32 bits,
/// D = 2^20, 1500 rounds, 40–100 of 100 devices surviving) and federated settings with
/// Poisson sampling.
#[test]
fn epsilon_matches_the_authors_ddgauss_epsilon() {
    let cases = load();
    let mut compared = 0;
    let (mut lowest, mut highest) = (0.0f64, 0.0f64);
    for case in cases.iter().filter(|c| c.grid_var() >= 0.25) {
        let event = case.event().unwrap_or_else(|e| panic!("{}: {e}", case.label()));
        let ours = accountant::epsilon(&[event], case.delta).expect("valid delta");
        let d = rel(ours, case.ref_eps);
        assert!(
            d >= -BELOW,
            "{}: our ε {ours} is below the reference {} by {:e} relative",
            case.label(),
            case.ref_eps,
            -d
        );
        assert!(
            d <= ABOVE,
            "{}: our ε {ours} is above the reference {} by {d:e} relative",
            case.label(),
            case.ref_eps
        );
        lowest = lowest.min(d);
        highest = highest.max(d);
        compared += 1;
    }
    println!("{compared} rows: our ε / reference ε − 1 in [{lowest:e}, {highest:e}]");
    // The file has rows from every source; losing them would make this test say little.
    for source in ["grid", "dme_run", "dropout", "fl", "calib"] {
        assert!(
            cases.iter().any(|c| c.source == source && c.grid_var() >= 0.25),
            "no comparable {source} rows"
        );
    }
    assert!(compared >= 200, "only {compared} rows compared");
}

/// Rows whose device noise is below 1/2 grid unit (where DDGauss Theorem 1 does not apply; the
/// reference still prints an ε for them) are refused by our accountant and, for fedrec's own
/// grid, by the parameters: ours refuses where theirs would answer, never the reverse.
#[test]
fn device_noise_below_half_a_grid_unit_is_refused() {
    let cases = load();
    let small: Vec<&Case> = cases.iter().filter(|c| c.grid_var() < 0.25).collect();
    assert!(!small.is_empty(), "the file has no such row: the test would say nothing");
    for case in small {
        assert!(
            matches!(case.event(), Err(DdpError::DeviceNoiseTooSmall { .. })),
            "{}: the accountant accepted it",
            case.label()
        );
        if case.source == "grid" {
            let sigma = case.local_std * (case.n as f64).sqrt();
            assert!(
                matches!(case.params(sigma).validate(), Err(DdpError::DeviceNoiseTooSmall { .. })),
                "{}: the parameters accepted it",
                case.label()
            );
        }
    }
}

/// fedrec's own grid rows are what `DdpParams` really derives (same `γ` to 1e-12, `σ_dev²` the
/// row's rounded up by less than [`SAMPLER_GRID`]), and the production event (`DdpEvent::new`:
/// the sampler's `σ_dev²` and `Δ₂` with its `10⁻⁹` margin) is never above the reference by
/// more than [`ABOVE_WITH_MARGIN`], nor below it by more than [`SAMPLER_EXCESS_FACTOR`] times
/// the noise it adds beyond the row's.
#[test]
fn fedrecs_own_parameters_against_the_reference() {
    let cases = load();
    let mut checked = 0;
    let (mut lowest, mut highest) = (0.0f64, 0.0f64);
    for case in cases.iter().filter(|c| c.source == "grid" && c.grid_var() >= 0.25) {
        let sigma = case.local_std * (case.n as f64).sqrt();
        let valid = case.params(sigma).validate().unwrap_or_else(|e| panic!("{}: {e}", case.label()));
        assert!(
            rel(valid.gamma(), case.gamma).abs() <= 1e-12,
            "{}: DdpParams gives γ = {:e}",
            case.label(),
            valid.gamma()
        );
        let excess = valid.device_var() - case.grid_var();
        assert!(
            (0.0..=SAMPLER_GRID * (1.0 + 1e-9)).contains(&excess),
            "{}: the sampler's σ_dev² is {excess:e} above the row's",
            case.label()
        );
        let r = excess / case.grid_var();
        let event = DdpEvent::new(&valid, case.n, case.q, case.steps).expect("n = min_reports");
        let ours = accountant::epsilon(&[event], case.delta).expect("valid delta");
        let d = rel(ours, case.ref_eps);
        assert!(
            d >= -SAMPLER_EXCESS_FACTOR * r - BELOW && d <= ABOVE_WITH_MARGIN,
            "{}: production ε {ours} vs reference {} ({d:e} relative, extra noise {r:e})",
            case.label(),
            case.ref_eps
        );
        lowest = lowest.min(d);
        highest = highest.max(d);
        checked += 1;
    }
    println!("{checked} grid rows through DdpParams: relative difference in [{lowest:e}, {highest:e}]");
    assert!(checked >= 100, "only {checked} grid rows");
}

/// The two calibrations for the same (n, D, bits, C, ε, δ, q, rounds): the authors'
/// `ddgauss_params` (their `γ` for `k` standard deviations, their local noise) and fedrec's
/// `noise_for` (its `γ` for `k = √(2 ln(2D/p))`, `p = 10⁻⁹`, and `|R_j| < n`). fedrec's grid is
/// coarser wherever it is feasible, so its rounded sensitivity `γΔ₂` is larger and, with the
/// same accountant, it needs at least the authors' noise: `σ_fedrec ≥ σ_authors (1 − 2·10⁻³)`
/// (the authors' optimiser stops within 10⁻³ of the target ε, checked by the generator, and
/// `noise_for` within 10⁻⁴). Where fedrec's parameters are infeasible (`2^{b−1} ≤ n`, or too few
/// bits for half a grid unit of device noise) it refuses; the test prints every ratio.
///
/// The price of fedrec's wider margins is small from 16 bits on: `σ_fedrec ≤ 1.05 σ_authors`
/// there (measured at most 1.019, at n = 1000, D = 2^20, 16 bits), with `γ` 2.0–2.2 times the
/// authors' at their `k = 4` and 3.7–3.8 times at `k = 2`. Below 16 bits it is large and the
/// test only prints it: 1.03–2.3 at n = 100 (`D = 256`, 10–14 bits; 1.31 at `D = 2^16`, 12
/// bits), 1.15–7.0 at n = 1000 (`D = 256`, 12–14 bits), and fedrec refuses where
/// `2^{b−1} ≤ n` (10 bits, n = 1000) or where no noise reaches the target (12 bits at
/// `D ≥ 2^16`, except n = 100 at `D = 2^16`).
#[test]
fn calibration_against_the_authors() {
    let cases = load();
    let mut compared = 0;
    let mut refused = 0;
    println!("source n D bits q steps ε | γ_fedrec/γ_authors σ_fedrec/σ_authors");
    for case in cases.iter().filter(|c| c.calibrated && c.source != "grid") {
        let target = case.target_eps.expect("calibrated rows have a target");
        let theirs = case.local_std * (case.n as f64).sqrt();
        let label = format!(
            "{} {} {} {} {} {} {target}",
            case.source, case.n, case.dim, case.bits, case.q, case.steps
        );
        let sigma = match noise_for(target, case.delta, case.q, case.steps, &case.params(theirs)) {
            Ok(sigma) => sigma,
            Err(e) => {
                println!("{label} | fedrec refuses: {e}");
                refused += 1;
                continue;
            }
        };
        let valid = case.params(sigma).validate().expect("noise_for returns feasible noise");
        let (g, s) = (valid.gamma() / case.gamma, sigma / theirs);
        println!("{label} | {g:.3} {s:.4}");
        assert!(s >= 1.0 - 2e-3, "{label}: fedrec calibrates σ = {sigma}, the authors {theirs}");
        assert!(case.bits < 16 || s <= 1.05, "{label}: fedrec needs {s} times the authors' noise");
        compared += 1;
    }
    println!("{compared} calibrations compared, {refused} refused by fedrec");
    assert!(compared >= 30, "only {compared} calibrations compared");
}
