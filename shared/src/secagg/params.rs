//! The SecAgg+ parameter finder: the fewest neighbours `k` and the Shamir threshold `t` that keep a round secure and correct for a cohort size, a dropout rate and a fraction of colluding devices.
//!
//! # The model
//!
//! The analysis is Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation
//! with (Poly)Logarithmic Overhead" (CCS 2020), for the Harary graph of [`super::graph`], in
//! the form Google's production finder uses it (`fcp/secagg/server/graph_parameter_finder.cc`
//! in google-parfait/federated-compute, semi-honest "curious server" class; read, not copied).
//! The coordinator follows the protocol; up to `c = ⌊γ·n⌋` devices collude with it and up to
//! `d = ⌊δ·n⌋` devices drop out. Each device shares its secrets with its `k` neighbours and
//! keeps a share itself, so `k + 1` shares exist and `t` of them reconstruct. Three bad events,
//! each bounded exactly (hypergeometric tails summed in log space, no normal or Chernoff
//! approximation) and by a union bound over the `n` devices:
//!
//! 1. **Corrupt shares** (security): some honest device has `≥ t` corrupt neighbours, who could
//!    rebuild its secrets. The corrupt neighbours of a device are modelled as
//!    `X ~ Hypergeometric(n, c, k)`; the bound is `n · P[X ≥ t]`.
//! 2. **Disconnection** (security): removing the corrupt and dropped devices cuts the Harary
//!    ring, so the masks no longer hide the honest survivors' inputs behind a single sum. A cut
//!    needs `k/2` consecutive ring positions removed in two places: at most `n(n − k − 1)/2`
//!    such pairs, each fully bad with probability `(b)_k / (n)_k` for `b = c + d` bad devices
//!    (falling factorials). The complete graph cannot be cut.
//! 3. **Too few survivors** (correctness): some device has fewer than `t` surviving neighbours,
//!    so its self-mask seed (if it survived) or its mask-key (if it dropped) cannot be rebuilt
//!    and the round aborts. Surviving neighbours `S ~ Hypergeometric(n, n − d, k)`; the bound
//!    is `n · P[S ≤ t − 1]`. The device's own share is not counted, since a dropped device's
//!    mask-key must be rebuilt from its neighbours alone.
//!
//! The security target `2^log2_security` is split evenly between events 1 and 2
//! (each `< 2^(log2_security − 1)`); event 3 must stay `< 2^log2_failure`.
//!
//! # The choice
//!
//! [`find_params`] tries `k = 2, 4, 6, …` while `k < n − 1` and returns the first `k` that
//! admits a threshold: `t` is the smallest value that makes event 1 rare enough (raised to
//! [`MIN_THRESHOLD`]), and that `t` must make event 3 rare enough too. If no Harary graph
//! works, the complete graph (`k = n − 1`, the SecAgg of Bonawitz et al., CCS 2017) is tried
//! with the same conditions; there `X` and `S` are nearly deterministic and the conditions
//! become Bonawitz et al.'s semi-honest `c < t ≤ n − d − 1`. Any `t` between the returned one
//! and the largest that passes event 3 is safe; the smallest keeps reconstruction cheap and
//! tolerates the most dropouts.
//!
//! There is no separate relation between `t` and `k` in the semi-honest model: `t ≈ k/3` in
//! the reference case comes from the two tails. A coordinator that may lie about who dropped
//! (Bell et al.'s semi-malicious server) could ask some neighbours of a device for its
//! self-mask share and others for its mask-key share; excluding that needs `2t > k + (corrupt
//! neighbours)`, i.e. `t > k/2` or more, and a larger `k`. This finder does not cover that
//! class: our threat model has a semi-honest coordinator.
//!
//! The reference case of Google's finder, `n = 10,000`, `γ = 5%`, `δ = 33%`, `2^-40`
//! security, `2^-20` failure, gives `k = 86`, `t = 29` here too, and so do the other
//! semi-honest rows of its test table that were checked (n = 10 … 1,000,000, γ and δ up to
//! 45%; the test `other_semi_honest_rows_of_googles_table`). One deliberate
//! difference: Google checks correctness before raising `t` to 2, so for `n = 10`,
//! `γ = 5%`, `δ = 33%` it returns `k = 4, t = 2`, where a device has 2 surviving neighbours
//! with probability only 29/30; this finder checks the `t` it returns and gives `k = 6, t = 2`.
//!
//! # Table
//!
//! `k`, `t` for `2^-40` security and `2^-20` failure (from the test
//! `table_of_parameters`, which prints it; the same numbers come from an independent
//! exact big-integer Python model):
//!
//! | n | δ (dropout) | γ = 0 | γ = 5% |
//! | ---: | ---: | ---: | ---: |
//! | 100 | 0 | k 2, t 2 | k 6, t 6 |
//! | 100 | 5% | k 8, t 2 | k 12, t 6 |
//! | 100 | 33% | k 26, t 2 | k 28, t 6 |
//! | 1,000 | 0 | k 2, t 2 | k 14, t 13 |
//! | 1,000 | 5% | k 14, t 2 | k 30, t 17 |
//! | 1,000 | 33% | k 38, t 2 | k 72, t 24 |
//! | 10,000 | 0 | k 2, t 2 | k 16, t 15 |
//! | 10,000 | 5% | k 16, t 2 | k 34, t 20 |
//! | 10,000 | 33% | k 42, t 2 | k 86, t 29 |
//! | 100,000 | 0 | k 2, t 2 | k 18, t 16 |
//! | 100,000 | 5% | k 18, t 2 | k 36, t 21 |
//! | 100,000 | 33% | k 46, t 2 | k 96, t 32 |
//!
//! `γ = 0` trusts every device not to collude with the coordinator; with `δ = 0` too, a ring
//! (`k = 2`) suffices in this model. Deployments should state a realistic `γ` and `δ`.

use thiserror::Error;

/// The default correctness target: a round fails for lack of shares with probability
/// below `2^-20`.
pub const DEFAULT_LOG2_FAILURE: f64 = -20.0;

/// The default security target: the coordinator and the colluding devices learn more than the
/// survivors' sum with probability below `2^-40`.
pub const DEFAULT_LOG2_SECURITY: f64 = -40.0;

/// The smallest threshold the finder returns: with `t = 1` every single share is the secret.
pub const MIN_THRESHOLD: usize = 2;

/// The largest cohort the finder accepts. Nothing breaks above it; it bounds the search time.
pub const MAX_COHORT: usize = 1_000_000;

/// The largest `dropout + corrupt` the finder accepts. Above it parameters either do not exist
/// or approach the complete graph, and the search would run long.
pub const MAX_BAD_FRACTION: f64 = 0.9;

/// The smallest accepted `log2_failure` / `log2_security`.
pub const MIN_LOG2_TARGET: f64 = -256.0;

/// Counts are `⌊fraction · n⌋`; this slack keeps a product that should be an integer but lands
/// just below it (`0.07 · 100 = 7.000000000000001` is fine, `0.29 · 100 = 28.999999999999996` is
/// not) from rounding down to fewer corrupt or dropped devices than the operator meant.
const ROUNDING_SLACK: f64 = 1e-12;

/// What the finder needs to know about a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FinderInput {
    /// Devices in the cohort (those whose keys arrived), `1 ..= MAX_COHORT`.
    pub n: usize,
    /// Expected fraction δ of the cohort that drops out during the protocol, in `[0, 1)`.
    pub dropout: f64,
    /// Fraction γ of the cohort that may collude with the coordinator, in `[0, 1)`.
    pub corrupt: f64,
    /// log2 of the accepted probability that the round aborts for lack of shares (< 0).
    pub log2_failure: f64,
    /// log2 of the accepted probability that the coordinator and the colluding devices learn
    /// more than the survivors' sum (< 0).
    pub log2_security: f64,
}

impl FinderInput {
    /// A round of `n` devices with the default targets ([`DEFAULT_LOG2_FAILURE`],
    /// [`DEFAULT_LOG2_SECURITY`]).
    pub fn new(n: usize, dropout: f64, corrupt: f64) -> Self {
        FinderInput {
            n,
            dropout,
            corrupt,
            log2_failure: DEFAULT_LOG2_FAILURE,
            log2_security: DEFAULT_LOG2_SECURITY,
        }
    }
}

/// The graph degree and Shamir threshold of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecAggParams {
    /// Neighbours per device; `n − 1` means the complete graph.
    pub k: usize,
    /// Shares needed to reconstruct a secret (`t − 1` reveal nothing).
    pub t: usize,
}

impl SecAggParams {
    /// Whether these parameters use the complete graph on a cohort of `n`.
    pub fn is_complete(&self, n: usize) -> bool {
        self.k >= n.saturating_sub(1)
    }
}

/// Why no parameters came back.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ParamsError {
    /// A field of [`FinderInput`] is out of range.
    #[error("invalid secure-aggregation input `{name}`: {reason}")]
    InvalidInput {
        /// Which field.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `k` or `t` cannot describe a round of this cohort (odd or zero `k` below `n − 1`,
    /// `t` of 0 or above `k + 1`).
    #[error("invalid secure-aggregation parameters k = {k}, t = {t} for {n} devices")]
    InvalidParams {
        /// Cohort size.
        n: usize,
        /// Neighbours per device.
        k: usize,
        /// Threshold.
        t: usize,
    },
    /// No `k ≤ n − 1` meets the targets: the cohort is too small for its dropout and
    /// collusion rates.
    #[error(
        "no secure-aggregation parameters for {n} devices with dropout {dropout} and corrupt \
         fraction {corrupt}: the cohort is too small or too many devices drop out or collude"
    )]
    Infeasible {
        /// Cohort size.
        n: usize,
        /// Dropout fraction asked for.
        dropout: f64,
        /// Corrupt fraction asked for.
        corrupt: f64,
    },
}

/// The three union bounds of the model (see the module docs), as log2 of probabilities,
/// capped at 0. `-inf` means the event cannot happen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Some honest device has at least `t` corrupt neighbours (security, event 1).
    pub log2_corrupt_shares: f64,
    /// The honest survivors' graph is cut (security, event 2).
    pub log2_disconnected: f64,
    /// Some device has fewer than `t` surviving neighbours (correctness, event 3).
    pub log2_failure: f64,
}

impl Bounds {
    /// log2 of the total security failure bound (events 1 and 2 together).
    pub fn log2_security(&self) -> f64 {
        ln_add(self.log2_corrupt_shares * LN_2, self.log2_disconnected * LN_2).min(0.0) / LN_2
    }

    /// Whether each security event stays below half of `input.log2_security`, the finder's rule.
    pub fn is_secure(&self, input: &FinderInput) -> bool {
        let per_event = input.log2_security - 1.0;
        self.log2_corrupt_shares < per_event && self.log2_disconnected < per_event
    }

    /// Whether the failure bound stays below `input.log2_failure`.
    pub fn is_correct(&self, input: &FinderInput) -> bool {
        self.log2_failure < input.log2_failure
    }
}

/// The fewest neighbours `k` (even, or `n − 1` for the complete graph) and the threshold `t`
/// that meet `input`'s security and failure targets; see the module docs for the model.
///
/// Fails for out-of-range input ([`ParamsError::InvalidInput`], including
/// `dropout + corrupt > MAX_BAD_FRACTION`) and when not even the complete graph meets the
/// targets ([`ParamsError::Infeasible`], e.g. `n ≤ 2`, where `t ≥ 2` shares from neighbours
/// cannot be guaranteed).
pub fn find_params(input: &FinderInput) -> Result<SecAggParams, ParamsError> {
    let cohort = Cohort::new(input)?;
    let n = input.n;
    let security_target = (input.log2_security - 1.0) * LN_2;
    let failure_target = input.log2_failure * LN_2;
    let admits = |k: usize| -> Option<usize> {
        if cohort.ln_disconnected(k) >= security_target {
            return None;
        }
        let t = cohort.smallest_secure_threshold(k, security_target).max(MIN_THRESHOLD);
        (t <= k && cohort.ln_failure(k, t) < failure_target).then_some(t)
    };
    let harary = (2..n.saturating_sub(1)).step_by(2);
    for k in harary.chain(std::iter::once(n - 1)) {
        if let Some(t) = admits(k) {
            return Ok(SecAggParams { k, t });
        }
    }
    Err(ParamsError::Infeasible { n, dropout: input.dropout, corrupt: input.corrupt })
}

/// The union bounds of the model for given `params` (`k ≥ n − 1` is read as the complete
/// graph). The finder's output always passes [`Bounds::is_secure`] and [`Bounds::is_correct`];
/// a device can call this to check a coordinator's `k` and `t` against its own policy.
pub fn bounds(input: &FinderInput, params: SecAggParams) -> Result<Bounds, ParamsError> {
    let cohort = Cohort::new(input)?;
    let n = input.n;
    let k = params.k.min(n - 1);
    let t = params.t;
    let harary_ok = k >= n - 1 || (k >= 2 && k.is_multiple_of(2));
    if !harary_ok || t == 0 || t > k + 1 {
        return Err(ParamsError::InvalidParams { n, k: params.k, t });
    }
    let log2 = |ln: f64| ln.min(0.0) / LN_2;
    Ok(Bounds {
        log2_corrupt_shares: log2(cohort.ln_corrupt_shares(k, t)),
        log2_disconnected: log2(cohort.ln_disconnected(k)),
        log2_failure: log2(cohort.ln_failure(k, t)),
    })
}

/// The probability bound that the coordinator and the colluding devices learn more than the
/// survivors' sum with these parameters (events 1 and 2 of the module docs).
pub fn security_bound(input: &FinderInput, params: SecAggParams) -> Result<f64, ParamsError> {
    Ok(bounds(input, params)?.log2_security().exp2())
}

/// The probability bound that a round with these parameters aborts for lack of shares
/// (event 3 of the module docs).
pub fn failure_probability(input: &FinderInput, params: SecAggParams) -> Result<f64, ParamsError> {
    Ok(bounds(input, params)?.log2_failure.exp2())
}

const LN_2: f64 = std::f64::consts::LN_2;

/// A validated input, in counts.
struct Cohort {
    n: usize,
    corrupt: usize,
    dropped: usize,
    ln_n: f64,
}

impl Cohort {
    fn new(input: &FinderInput) -> Result<Cohort, ParamsError> {
        let invalid = |name, reason: String| Err(ParamsError::InvalidInput { name, reason });
        if input.n == 0 || input.n > MAX_COHORT {
            return invalid("n", format!("must be in 1..={MAX_COHORT}, got {}", input.n));
        }
        for (name, value) in [("dropout", input.dropout), ("corrupt", input.corrupt)] {
            if !(0.0..1.0).contains(&value) {
                return invalid(name, format!("must be a fraction in [0, 1), got {value}"));
            }
        }
        if input.dropout + input.corrupt > MAX_BAD_FRACTION {
            return invalid(
                "dropout",
                format!(
                    "dropout + corrupt must be at most {MAX_BAD_FRACTION}, got {} + {}",
                    input.dropout, input.corrupt
                ),
            );
        }
        for (name, value) in [("log2_failure", input.log2_failure), ("log2_security", input.log2_security)] {
            if !(MIN_LOG2_TARGET..0.0).contains(&value) {
                return invalid(name, format!("must be in [{MIN_LOG2_TARGET}, 0), got {value}"));
            }
        }
        let n = input.n;
        // Both fractions are in [0, 0.9], so the floors are in 0..=n and the casts are exact.
        let count = |fraction: f64| (((fraction + ROUNDING_SLACK) * n as f64).floor() as usize).min(n);
        Ok(Cohort { n, corrupt: count(input.corrupt), dropped: count(input.dropout), ln_n: (n as f64).ln() })
    }

    /// Corrupt neighbours of one device.
    fn corrupt_neighbours(&self, k: usize) -> Hypergeometric {
        Hypergeometric { population: self.n, marked: self.corrupt, draws: k }
    }

    /// Surviving neighbours of one device.
    fn surviving_neighbours(&self, k: usize) -> Hypergeometric {
        Hypergeometric { population: self.n, marked: self.n - self.dropped, draws: k }
    }

    /// ln of the union bound `n · P[X ≥ t]` (event 1).
    fn ln_corrupt_shares(&self, k: usize, t: usize) -> f64 {
        self.ln_n + self.corrupt_neighbours(k).ln_upper_tail(t)
    }

    /// ln of the union bound `n · P[S ≤ t − 1]` (event 3).
    fn ln_failure(&self, k: usize, t: usize) -> f64 {
        match t.checked_sub(1) {
            Some(below) => self.ln_n + self.surviving_neighbours(k).ln_lower_tail(below),
            None => f64::NEG_INFINITY,
        }
    }

    /// ln of the bound on a cut of the honest survivors' ring (event 2); `-inf` for the
    /// complete graph and when fewer than `k` devices are bad.
    fn ln_disconnected(&self, k: usize) -> f64 {
        let bad = (self.corrupt + self.dropped).min(self.n);
        if k + 1 >= self.n || k > bad {
            return f64::NEG_INFINITY;
        }
        let pairs = self.ln_n + ((self.n - k - 1) as f64).ln() - LN_2;
        pairs + ln_falling_ratio(bad, self.n, k)
    }

    /// The smallest `t` with `ln_corrupt_shares(k, t) < target`, walking the upper tail of
    /// `X` down from its top (only the tail is summed).
    fn smallest_secure_threshold(&self, k: usize, target: f64) -> usize {
        let x = self.corrupt_neighbours(k);
        let (low, high) = x.support();
        let mut t = high + 1; // P[X ≥ high + 1] = 0.
        let mut tail = f64::NEG_INFINITY;
        let mut pmf = x.ln_pmf(high);
        for v in (low..=high).rev() {
            tail = ln_add(tail, pmf);
            if self.ln_n + tail >= target {
                break;
            }
            t = v;
            if v > low {
                pmf += x.ln_ratio_down(v);
            }
        }
        t
    }
}

/// The number of marked items among `draws` drawn without replacement from `population`
/// items of which `marked` are marked.
#[derive(Debug, Clone, Copy)]
struct Hypergeometric {
    population: usize,
    marked: usize,
    draws: usize,
}

impl Hypergeometric {
    /// The values with positive probability, `low ..= high`.
    fn support(&self) -> (usize, usize) {
        let unmarked = self.population - self.marked;
        (self.draws.saturating_sub(unmarked), self.draws.min(self.marked))
    }

    /// `ln P[X = x]`, from log-binomials.
    fn ln_pmf(&self, x: usize) -> f64 {
        let (low, high) = self.support();
        if x < low || x > high {
            return f64::NEG_INFINITY;
        }
        let unmarked = self.population - self.marked;
        ln_choose(self.marked, x) + ln_choose(unmarked, self.draws - x)
            - ln_choose(self.population, self.draws)
    }

    /// `ln (P[X = x − 1] / P[X = x])` for `low < x ≤ high`.
    fn ln_ratio_down(&self, x: usize) -> f64 {
        let unmarked = self.population - self.marked;
        let num = x as f64 * (unmarked + x - self.draws) as f64;
        let den = (self.marked - x + 1) as f64 * (self.draws - x + 1) as f64;
        (num / den).ln()
    }

    /// `ln (P[X = x + 1] / P[X = x])` for `low ≤ x < high`.
    fn ln_ratio_up(&self, x: usize) -> f64 {
        let unmarked = self.population - self.marked;
        let num = (self.marked - x) as f64 * (self.draws - x) as f64;
        let den = (x + 1) as f64 * (unmarked + x + 1 - self.draws) as f64;
        (num / den).ln()
    }

    /// `ln P[X ≥ x]`, summed from the top of the support down to `x`.
    fn ln_upper_tail(&self, x: usize) -> f64 {
        let (low, high) = self.support();
        if x > high {
            return f64::NEG_INFINITY;
        }
        if x <= low {
            return 0.0;
        }
        let mut pmf = self.ln_pmf(high);
        let mut tail = pmf;
        for v in (x + 1..=high).rev() {
            pmf += self.ln_ratio_down(v);
            tail = ln_add(tail, pmf);
        }
        tail.min(0.0)
    }

    /// `ln P[X ≤ x]`, summed from the bottom of the support up to `x`.
    fn ln_lower_tail(&self, x: usize) -> f64 {
        let (low, high) = self.support();
        if x < low {
            return f64::NEG_INFINITY;
        }
        if x >= high {
            return 0.0;
        }
        let mut pmf = self.ln_pmf(low);
        let mut tail = pmf;
        for v in low..x {
            pmf += self.ln_ratio_up(v);
            tail = ln_add(tail, pmf);
        }
        tail.min(0.0)
    }
}

/// `ln(e^a + e^b)` without overflow; `-inf` is the empty sum.
fn ln_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln C(n, k)` as a sum of `min(k, n − k)` logarithms of ratios: each term is rounded once,
/// so the result is accurate to about `min(k, n − k) · 2^-52` even when `n!` is astronomically
/// larger than the coefficient (log-factorial differences would lose digits at `n = 10^6`).
fn ln_choose(n: usize, k: usize) -> f64 {
    let k = k.min(n - k);
    (0..k).map(|i| ((n - i) as f64 / (k - i) as f64).ln()).sum()
}

/// `ln((a)_k / (b)_k)`, the ratio of falling factorials `a (a − 1) … (a − k + 1)` over
/// `b (b − 1) … (b − k + 1)`, for `k ≤ a ≤ b`.
fn ln_falling_ratio(a: usize, b: usize, k: usize) -> f64 {
    (0..k).map(|i| ((a - i) as f64 / (b - i) as f64).ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(n: usize, dropout: f64, corrupt: f64) -> Result<SecAggParams, ParamsError> {
        find_params(&FinderInput::new(n, dropout, corrupt))
    }

    fn kt(k: usize, t: usize) -> SecAggParams {
        SecAggParams { k, t }
    }

    #[test]
    fn reference_case_matches_googles_finder() {
        // federated-compute graph_parameter_finder_test.cc, semi-honest, 2^-40 / 2^-20.
        assert_eq!(find(10_000, 0.33, 0.05), Ok(kt(86, 29)));
    }

    #[test]
    fn other_semi_honest_rows_of_googles_table() {
        // (n, γ, δ) → (k, t) from the same test file; a sample of the semi-honest rows, which the
        // independent Python model in `table_of_parameters` reproduces too.
        let rows = [
            (100, 0.05, 0.33, 28, 6),
            (1_000, 0.05, 0.33, 72, 24),
            (100_000, 0.05, 0.33, 96, 32),
            (100, 0.33, 0.33, 68, 34),
            (1_000, 0.33, 0.33, 286, 150),
            (10_000, 0.33, 0.33, 422, 221),
            (10_000, 0.33, 0.05, 92, 70),
            (1_000, 0.05, 0.05, 30, 17),
            (100, 0.33, 0.0, 26, 25),
            (10_000, 0.0, 0.33, 42, 2),
            (10_000, 0.0, 0.0, 2, 2),
            (100, 0.45, 0.45, 92, 46),
            (10, 0.33, 0.05, 4, 4),
            (1_000_000, 0.05, 0.33, 102, 34),
            (100_000, 0.45, 0.45, 5508, 2788),
            (1_000_000, 0.45, 0.45, 6240, 3156),
        ];
        for (n, corrupt, dropout, k, t) in rows {
            assert_eq!(find(n, dropout, corrupt), Ok(kt(k, t)), "n = {n}, γ = {corrupt}, δ = {dropout}");
        }
    }

    #[test]
    fn threshold_is_checked_after_raising_it_to_two() {
        // Google's finder returns k = 4, t = 2 here, but a device's 4 neighbours then hold at
        // least 2 survivors only with probability 1 − 7/210 (n = 10, 7 survivors).
        assert_eq!(find(10, 0.33, 0.05), Ok(kt(6, 2)));
        let input = FinderInput::new(10, 0.33, 0.05);
        let k4 = bounds(&input, kt(4, 2)).expect("valid");
        assert!(!k4.is_correct(&input));
        assert!((k4.log2_failure - (10.0 * 7.0 / 210.0f64).log2()).abs() < 1e-12);
    }

    #[test]
    fn table_of_parameters() {
        // Printed with `--nocapture`. The expected numbers come from an exact big-integer model
        // written independently of this file (Python 3, math.comb; every comparison is between
        // integers, so there is no rounding at all):
        //
        //   from math import comb, floor, perm
        //   def find(n, g, d, sec=40, cor=20):
        //       c = floor((g + 1e-12) * n); dr = floor((d + 1e-12) * n); s = n - dr; bad = c + dr
        //       def check(k, complete):
        //           if not complete and k <= bad and \
        //              n * (n - k - 1) * perm(bad, k) * 2**(sec + 1) >= 2 * perm(n, k):
        //               return None                                  # ring may be cut
        //           tot = comb(n, k); t = k + 1; acc = 0
        //           for x in range(k, -1, -1):                       # smallest secure t
        //               acc += comb(c, x) * comb(n - c, k - x)
        //               if acc * n * 2**(sec + 1) < tot: t = x
        //               else: break
        //           t = max(t, 2)
        //           low = sum(comb(s, i) * comb(n - s, k - i) for i in range(t))
        //           return t if t <= k and low * n * 2**cor < tot else None
        //       for k in range(2, n - 1, 2):
        //           if (t := check(k, False)): return k, t
        //       return (n - 1, t) if n >= 2 and (t := check(n - 1, True)) else None
        let expected = [
            (100, 0.0, 0.0, 2, 2),
            (100, 0.0, 0.05, 6, 6),
            (100, 0.05, 0.0, 8, 2),
            (100, 0.05, 0.05, 12, 6),
            (100, 0.33, 0.0, 26, 2),
            (100, 0.33, 0.05, 28, 6),
            (1_000, 0.0, 0.0, 2, 2),
            (1_000, 0.0, 0.05, 14, 13),
            (1_000, 0.05, 0.0, 14, 2),
            (1_000, 0.05, 0.05, 30, 17),
            (1_000, 0.33, 0.0, 38, 2),
            (1_000, 0.33, 0.05, 72, 24),
            (10_000, 0.0, 0.0, 2, 2),
            (10_000, 0.0, 0.05, 16, 15),
            (10_000, 0.05, 0.0, 16, 2),
            (10_000, 0.05, 0.05, 34, 20),
            (10_000, 0.33, 0.0, 42, 2),
            (10_000, 0.33, 0.05, 86, 29),
            (100_000, 0.0, 0.0, 2, 2),
            (100_000, 0.0, 0.05, 18, 16),
            (100_000, 0.05, 0.0, 18, 2),
            (100_000, 0.05, 0.05, 36, 21),
            (100_000, 0.33, 0.0, 46, 2),
            (100_000, 0.33, 0.05, 96, 32),
        ];
        println!("| n | δ | γ | k | t | log2 security | log2 failure |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (n, dropout, corrupt, k, t) in expected {
            let input = FinderInput::new(n, dropout, corrupt);
            let params = find_params(&input).expect("feasible");
            let b = bounds(&input, params).expect("valid");
            println!(
                "| {n} | {dropout} | {corrupt} | {} | {} | {:.1} | {:.1} |",
                params.k,
                params.t,
                b.log2_security(),
                b.log2_failure
            );
            assert_eq!(params, kt(k, t), "n = {n}, δ = {dropout}, γ = {corrupt}");
        }
    }

    #[test]
    fn found_parameters_meet_their_targets_and_are_minimal() {
        for n in [10, 50, 100, 1_000, 10_000] {
            for dropout in [0.0, 0.1, 0.33, 0.5] {
                for corrupt in [0.0, 0.05, 0.2] {
                    let input = FinderInput::new(n, dropout, corrupt);
                    let Ok(params) = find_params(&input) else { continue };
                    let b = bounds(&input, params).expect("valid");
                    assert!(b.is_secure(&input) && b.is_correct(&input), "{input:?} → {params:?}: {b:?}");
                    assert!(b.log2_security() < input.log2_security);
                    // t is the smallest secure threshold (or MIN_THRESHOLD).
                    if params.t > MIN_THRESHOLD {
                        let lower = bounds(&input, kt(params.k, params.t - 1)).expect("valid");
                        assert!(!lower.is_secure(&input), "{input:?}: t − 1 also secure");
                    }
                    // No smaller even k admits any threshold.
                    for k in (2..params.k.min(n - 1)).step_by(2) {
                        for t in 1..=k + 1 {
                            let b = bounds(&input, kt(k, t)).expect("valid");
                            let ok = b.is_secure(&input) && b.is_correct(&input) && t >= MIN_THRESHOLD;
                            assert!(!ok, "{input:?}: k = {k}, t = {t} also works");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn more_dropout_or_corruption_never_lowers_k() {
        let dropouts = [0.0, 0.01, 0.05, 0.1, 0.2, 0.33, 0.45, 0.6];
        let corrupts = [0.0, 0.01, 0.05, 0.1, 0.2, 0.3];
        for n in [20, 100, 1_000, 10_000] {
            let k = |d: f64, c: f64| find(n, d, c).map(|p| p.k).ok();
            for (i, &d) in dropouts.iter().enumerate() {
                for (j, &c) in corrupts.iter().enumerate() {
                    let Some(here) = k(d, c) else { continue };
                    if let Some(&d2) = dropouts.get(i + 1)
                        && let Some(more) = k(d2, c)
                    {
                        assert!(more >= here, "n = {n}: δ {d} → {d2} lowered k {here} → {more}");
                    }
                    if let Some(&c2) = corrupts.get(j + 1)
                        && let Some(more) = k(d, c2)
                    {
                        assert!(more >= here, "n = {n}: γ {c} → {c2} lowered k {here} → {more}");
                    }
                }
            }
        }
    }

    #[test]
    fn small_cohorts_get_the_complete_graph() {
        // Bonawitz et al. semi-honest: c < t ≤ n − d − 1 on the complete graph.
        for (n, dropout, corrupt, t) in
            [(3, 0.0, 0.0, 2), (5, 0.2, 0.2, 2), (6, 0.5, 0.2, 2), (7, 0.33, 0.3, 3), (10, 0.5, 0.3, 4)]
        {
            let params = find(n, dropout, corrupt).expect("feasible");
            assert_eq!(params, kt(n - 1, t), "n = {n}, δ = {dropout}, γ = {corrupt}");
            assert!(params.is_complete(n));
            let input = FinderInput::new(n, dropout, corrupt);
            let b = bounds(&input, params).expect("valid");
            assert_eq!(b.log2_disconnected, f64::NEG_INFINITY);
            assert_eq!((b.log2_corrupt_shares, b.log2_failure), (f64::NEG_INFINITY, f64::NEG_INFINITY));
        }
        assert!(!find(10_000, 0.33, 0.05).expect("feasible").is_complete(10_000));
    }

    #[test]
    fn infeasible_and_invalid_inputs_are_errors() {
        // One or two devices cannot give anyone two shares held by neighbours.
        assert!(matches!(find(1, 0.0, 0.0), Err(ParamsError::Infeasible { n: 1, .. })));
        assert!(matches!(find(2, 0.0, 0.0), Err(ParamsError::Infeasible { n: 2, .. })));
        // Too many dropouts for a small cohort: 4 of 6 drop, nobody keeps 2 surviving neighbours.
        assert!(matches!(find(6, 0.67, 0.0), Err(ParamsError::Infeasible { .. })));
        // Too many bad devices overall.
        for (dropout, corrupt) in [(0.95, 0.0), (0.5, 0.45), (1.0, 0.0)] {
            assert!(
                matches!(
                    find(1_000, dropout, corrupt),
                    Err(ParamsError::InvalidInput { name: "dropout", .. })
                ),
                "δ = {dropout}, γ = {corrupt}"
            );
        }
        for (dropout, corrupt) in [(f64::NAN, 0.0), (-0.1, 0.0), (0.0, f64::INFINITY), (0.0, -1.0)] {
            assert!(matches!(find(1_000, dropout, corrupt), Err(ParamsError::InvalidInput { .. })));
        }
        assert!(matches!(find(0, 0.1, 0.1), Err(ParamsError::InvalidInput { name: "n", .. })));
        assert!(matches!(find(MAX_COHORT + 1, 0.1, 0.1), Err(ParamsError::InvalidInput { name: "n", .. })));
        let mut input = FinderInput::new(1_000, 0.1, 0.1);
        input.log2_security = 0.0;
        assert!(matches!(find_params(&input), Err(ParamsError::InvalidInput { name: "log2_security", .. })));
        input.log2_security = -40.0;
        input.log2_failure = f64::NAN;
        assert!(matches!(find_params(&input), Err(ParamsError::InvalidInput { name: "log2_failure", .. })));
    }

    #[test]
    fn bounds_refuse_shapes_no_graph_has() {
        let input = FinderInput::new(100, 0.1, 0.05);
        for (k, t) in [(3, 2), (0, 1), (10, 0), (10, 12)] {
            assert_eq!(bounds(&input, kt(k, t)), Err(ParamsError::InvalidParams { n: 100, k, t }));
        }
        // k ≥ n − 1 is the complete graph, whatever its parity.
        assert!(bounds(&input, kt(99, 10)).is_ok());
        assert!(bounds(&input, kt(500, 10)).is_ok());
    }

    #[test]
    fn stricter_targets_need_more_neighbours() {
        let loose = find(10_000, 0.33, 0.05).expect("feasible");
        let mut input = FinderInput::new(10_000, 0.33, 0.05);
        input.log2_security = -80.0;
        input.log2_failure = -40.0;
        let strict = find_params(&input).expect("feasible");
        assert!(strict.k > loose.k, "{strict:?} vs {loose:?}");
        let b = bounds(&input, strict).expect("valid");
        assert!(b.is_secure(&input) && b.is_correct(&input));
    }

    #[test]
    fn probabilities_match_exact_known_answers() {
        // Exact values from Python's math.comb and big integers:
        //   lg(N, K, n, lo, hi) = log2(sum(comb(K, i) * comb(N-K, n-i) for i in lo..=hi) / comb(N, n))
        let upper = [
            ((10_000, 500, 86, 29), -54.479861725196656),
            ((10_000, 500, 86, 10), -6.585760185138952),
            ((1_000_000, 50_000, 102, 34), -61.75001248912645),
            ((20, 7, 10, 5), -2.5152113922787382),
        ];
        for ((population, marked, draws, x), want) in upper {
            let got = Hypergeometric { population, marked, draws }.ln_upper_tail(x) / LN_2;
            assert!(
                (got - want).abs() < 1e-9,
                "P[X ≥ {x}] of ({population}, {marked}, {draws}): {got} vs {want}"
            );
        }
        let lower = [
            ((10_000, 6_700, 86, 28), -34.01448517913889),
            ((100, 67, 28, 5), -32.3327279745429),
            ((1_000, 670, 72, 23), -31.776754111133187),
            ((20, 7, 10, 2), -2.5152113922787382),
        ];
        for ((population, marked, draws, x), want) in lower {
            let got = Hypergeometric { population, marked, draws }.ln_lower_tail(x) / LN_2;
            assert!(
                (got - want).abs() < 1e-9,
                "P[X ≤ {x}] of ({population}, {marked}, {draws}): {got} vs {want}"
            );
        }
        // Only 5 corrupt devices: never 6 corrupt neighbours.
        assert_eq!(
            Hypergeometric { population: 100, marked: 5, draws: 28 }.ln_upper_tail(6),
            f64::NEG_INFINITY
        );
        // Disconnection: log2(n (n − k − 1) / 2 · (bad)_k / (n)_k) via math.perm.
        for ((n, dropout, corrupt, k), want) in [
            ((10_000, 0.33, 0.05, 86), -95.35640431026081),
            ((10_000, 0.33, 0.05, 84), -92.52385493689599),
            ((1_000, 0.33, 0.05, 72), -88.28326648087432),
        ] {
            let got =
                Cohort::new(&FinderInput::new(n, dropout, corrupt)).expect("valid").ln_disconnected(k) / LN_2;
            assert!((got - want).abs() < 1e-9, "disconnection n = {n}, k = {k}: {got} vs {want}");
        }
    }

    #[test]
    fn tails_agree_with_summed_pmfs() {
        for (population, marked, draws) in
            [(20, 7, 10), (50, 0, 10), (50, 50, 10), (60, 45, 59), (300, 100, 40)]
        {
            let h = Hypergeometric { population, marked, draws };
            let pmf: Vec<f64> = (0..=draws).map(|x| h.ln_pmf(x).exp()).collect();
            let total: f64 = pmf.iter().sum();
            assert!((total - 1.0).abs() < 1e-12, "pmf of {h:?} sums to {total}");
            for x in 0..=draws + 1 {
                let up: f64 = pmf.iter().skip(x).sum();
                let down: f64 = pmf.iter().take(x + 1).sum();
                assert!((h.ln_upper_tail(x).exp() - up).abs() < 1e-12, "{h:?} P[X ≥ {x}]");
                assert!((h.ln_lower_tail(x).exp() - down).abs() < 1e-12, "{h:?} P[X ≤ {x}]");
            }
        }
    }

    #[test]
    fn log_binomials_match_exact_integers() {
        // math.log(math.comb(n, k)) in Python: comb(10^6, 102) → 1036.1974568523824,
        // comb(100, 50) → 66.78384165201743; comb(52, 5) = 2598960.
        assert!((ln_choose(52, 5) - 2_598_960f64.ln()).abs() < 1e-13);
        assert!((ln_choose(100, 50) - 66.78384165201743).abs() < 1e-12);
        assert!((ln_choose(1_000_000, 102) - 1036.1974568523824).abs() < 1e-10);
        assert_eq!((ln_choose(7, 0), ln_choose(7, 7)), (0.0, 0.0));
        // (5)_2 / (8)_2 = 20 / 56.
        assert!((ln_falling_ratio(5, 8, 2) - (20.0f64 / 56.0).ln()).abs() < 1e-15);
    }

    #[test]
    fn helper_probabilities_are_consistent() {
        let input = FinderInput::new(10_000, 0.33, 0.05);
        let params = find_params(&input).expect("feasible");
        let security = security_bound(&input, params).expect("valid");
        let failure = failure_probability(&input, params).expect("valid");
        assert!(security > 0.0 && security < 2f64.powi(-40), "{security}");
        assert!(failure > 0.0 && failure < 2f64.powi(-20), "{failure}");
        // One neighbour fewer in the threshold breaks security; one more than the survivors
        // can supply breaks correctness.
        assert!(security_bound(&input, kt(86, 28)).expect("valid") > 2f64.powi(-41));
        assert!(failure_probability(&input, kt(86, 40)).expect("valid") > 2f64.powi(-20));
    }
}
