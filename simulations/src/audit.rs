//! An empirical privacy audit with canary devices: a one-run lower bound on ε (Steinke, Nasr, Jagielski 2023) and a canary-cosine estimate (after Andrew et al. 2024), next to the accountant's ε.
//!
//! **Design.** `m` canary devices join the population. Canary `i` owns a fixed random
//! direction `cᵢ` (Rademacher signs, unit norm, drawn from a seeded RNG) over the item-side
//! coordinates of the update (item factors and item biases), and when it is selected it
//! uploads `cᵢ · C` — the largest update the clip norm allows — through the same message path
//! as a trained update ([`Federation::with_crafted`]): a plain upload, or with
//! `--aggregation secure` the device's own secure-aggregation protocol, and with
//! `--mechanism distributed` its distributed-noise encoding and noise share
//! ([`fedrec_shared::round::ClientRound::with_crafted_update`]). Each canary takes part independently
//! with probability ½: those are the secret bits `Sᵢ` of one-run auditing. The real
//! coordinator machine runs the rounds, with its real selection, noise and server step.
//!
//! **Observation.** What anyone who sees the released models sees: the item-side model before
//! and after the run. The server descends along the noised sum, so the score of canary `i` is
//! `cos(θ₀ − θ_T, cᵢ)`. For a canary that did not take part the score is independent of `cᵢ`
//! and follows the null `≈ N(0, 1/D)` (`D` the item-side dimension).
//!
//! **Lower bound.** Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
//! NeurIPS 2023: guess `Sᵢ = 1` for the `k₊` highest scores and `Sᵢ = 0` for the `k₋` lowest
//! (abstain on the rest). If the mechanism is (ε, δ)-DP, the number `W` of correct guesses out
//! of `r = k₊ + k₋` satisfies (their Theorem 3 for δ = 0, Theorem 5.2 / Algorithm 2 with δ)
//!
//! ```text
//! P[W ≥ v] ≤ f(v) + 2mδ · max_{1≤i≤v} (f(v−i) − f(v)) / i,   f(u) = P[Binomial(r, e^ε/(1+e^ε)) ≥ u],
//! ```
//!
//! so an observed `v` rejects every ε whose right-hand side is at most β. The audit reports
//! the largest such ε (a lower bound on the true ε with confidence 1 − β), found by bisection
//! since the right-hand side increases with ε. With δ = 0 and every guess correct it solves
//! `(e^ε/(1+e^ε))^r = β`.
//!
//! **Estimate.** Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy
//! Estimation for Federated Learning", ICLR 2024: fit a Gaussian to the scores of the canaries
//! that took part and one to those that did not, and read off the ε at δ of the Gaussian
//! mechanism that separates them, `μ = (mean₁ − mean₀) / pooled std`:
//! `δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`. This is an estimate, not a bound (it assumes
//! Gaussian scores with equal spread).
//!
//! **Power.** [`AuditConfig::weaken_noise`] divides the released noise through
//! [`fedrec_shared::danger::weaken_release_noise`] while the ledger still charges the
//! configured noise: a mechanism that adds less noise than it claims. The audit's lower bound
//! then exceeds the claimed ε; on the real mechanism it stays below.

use anyhow::{Context, bail};
use fedrec_shared::danger;
use fedrec_shared::harness::{Federation, HarnessConfig};
use fedrec_shared::round::{Coordinator, Task};
use fedrec_shared::update::{ClippedUpdate, UpdateVector};
use rand::Rng;
use serde::Serialize;

use crate::federation::{self, RunConfig, UserData};
use crate::report::DatasetInfo;

/// What the audit adds to a run's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditConfig {
    /// Canary devices `m` (each takes part with probability ½).
    pub canaries: usize,
    /// Guesses `r` (half on the highest scores, half on the lowest); `None`: `m / 5`.
    pub guesses: Option<usize>,
    /// Confidence `1 − β` of the lower bound.
    pub confidence: f64,
    /// Divide the released noise by this (a deliberately broken mechanism); `None`: the real one.
    pub weaken_noise: Option<f32>,
}

/// The audit's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    /// The accountant's ε for the rounds the coordinator charged.
    pub epsilon: f64,
    /// δ of both ε values.
    pub delta: f64,
    /// The one-run empirical lower bound on ε, at `confidence`.
    pub epsilon_lower_bound: f64,
    /// Confidence of the lower bound.
    pub confidence: f64,
    /// Canary devices `m`.
    pub canaries: usize,
    /// Canaries that took part (`Sᵢ = 1`).
    pub canaries_included: usize,
    /// Guesses `r`.
    pub guesses: usize,
    /// Correct guesses `v`.
    pub correct: usize,
    /// The canary-cosine ε estimate (Andrew et al. 2024), when the scores separate.
    pub epsilon_canary_cosine: Option<f64>,
    /// Separation `μ` of the included and excluded canaries' scores, in pooled standard deviations.
    pub canary_cosine_mu: f64,
    /// Mean score of the included canaries.
    pub mean_cosine_included: f64,
    /// Mean score of the excluded canaries.
    pub mean_cosine_excluded: f64,
    /// Item-side dimension `D` (the null standard deviation of a score is about `1/√D`).
    pub dimension: usize,
    /// The update's noise multiplier the ledger charged.
    pub noise_multiplier: f32,
    /// The divisor of the released noise (1 for the real mechanism).
    pub noise_divisor: f32,
    /// Rounds the coordinator charged.
    pub rounds_charged: usize,
    /// Poisson sampling probability per round (over real users and canaries).
    pub q: f64,
}

/// Why the inputs of the bound are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BoundError {
    /// More correct guesses than guesses, or more guesses than canaries.
    #[error("inconsistent counts: {correct} correct of {guesses} guesses with {canaries} canaries")]
    Counts {
        /// m.
        canaries: usize,
        /// r.
        guesses: usize,
        /// v.
        correct: usize,
    },
    /// δ outside `[0, 1)` or β outside `(0, 1)`.
    #[error("δ must be in [0, 1) and β in (0, 1): got δ = {delta}, β = {beta}")]
    Parameters {
        /// δ.
        delta: f64,
        /// β.
        beta: f64,
    },
}

/// `ln k!` for `k = 0..=n`.
fn ln_factorials(n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    let mut acc = 0.0;
    out.push(acc);
    for k in 1..=n {
        acc += (k as f64).ln();
        out.push(acc);
    }
    out
}

/// The right-hand side of Steinke, Nasr, Jagielski (2023), Theorem 5.2 as computed by their
/// Algorithm 2: an upper bound on `P[W ≥ v]` for an (ε, δ)-DP mechanism audited with `m`
/// canaries and `r` guesses, capped at 1.
pub fn one_run_p_value(m: usize, r: usize, v: usize, epsilon: f64, delta: f64) -> f64 {
    let lnf = ln_factorials(r);
    // q = e^ε / (1 + e^ε), in logs for large ε.
    let ln_q = -(-epsilon).exp().ln_1p();
    let ln_1q = -epsilon.exp().ln_1p();
    let pmf = |k: usize| (lnf[r] - lnf[k] - lnf[r - k] + k as f64 * ln_q + (r - k) as f64 * ln_1q).exp();
    let tail: f64 = (v..=r).map(pmf).sum();
    let mut alpha = 0.0f64;
    let mut partial = 0.0;
    for i in 1..=v {
        partial += pmf(v - i);
        alpha = alpha.max(partial / i as f64);
    }
    (tail + 2.0 * m as f64 * delta * alpha).min(1.0)
}

/// The largest ε that `v` correct guesses out of `r` (with `m` canaries) reject at level
/// `β = 1 − confidence` under (ε, δ)-DP: the one-run lower bound on ε. 0 when nothing is
/// rejected.
pub fn one_run_lower_bound(
    m: usize,
    r: usize,
    v: usize,
    delta: f64,
    confidence: f64,
) -> Result<f64, BoundError> {
    let beta = 1.0 - confidence;
    if v > r || r > m {
        return Err(BoundError::Counts { canaries: m, guesses: r, correct: v });
    }
    if !((0.0..1.0).contains(&delta) && beta > 0.0 && beta < 1.0) {
        return Err(BoundError::Parameters { delta, beta });
    }
    let rejects = |eps: f64| one_run_p_value(m, r, v, eps, delta) <= beta;
    if r == 0 || !rejects(0.0) {
        return Ok(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while rejects(hi) {
        lo = hi;
        hi *= 2.0;
        if hi > 1e3 {
            return Ok(lo);
        }
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if rejects(mid) { lo = mid } else { hi = mid }
    }
    Ok(lo)
}

/// `erfc(x)` (Numerical Recipes' Chebyshev fit, relative error below 1.2·10⁻⁷).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The standard normal CDF.
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// ε at `delta` of the Gaussian mechanism with sensitivity-to-noise ratio `mu`
/// (`δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`, decreasing in ε). `None` for `mu ≤ 0`.
pub fn gaussian_epsilon(mu: f64, delta: f64) -> Option<f64> {
    if !(mu > 0.0 && mu.is_finite()) {
        return None;
    }
    let delta_at = |eps: f64| normal_cdf(-eps / mu + mu / 2.0) - eps.exp() * normal_cdf(-eps / mu - mu / 2.0);
    if delta_at(0.0) <= delta {
        return Some(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while delta_at(hi) > delta {
        lo = hi;
        hi *= 2.0;
        if hi > 1e3 {
            return Some(hi);
        }
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if delta_at(mid) > delta { lo = mid } else { hi = mid }
    }
    Some(hi)
}

/// Canary `i`'s direction: `D` Rademacher signs over `√D` (unit norm), from its own seed.
fn canary_direction(seed: u64, i: usize, dim: usize) -> Vec<f32> {
    let mut rng = danger::seeded_rng(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let x = 1.0 / (dim as f32).sqrt();
    let mut out = Vec::with_capacity(dim);
    while out.len() < dim {
        // One draw gives 64 independent fair signs.
        let bits: u64 = rng.random();
        let n = (dim - out.len()).min(64);
        out.extend((0..n).map(|k| if bits >> k & 1 == 1 { x } else { -x }));
    }
    out
}

/// The item-side parameters of a model: item factors, then item biases.
fn item_side(model: &fedrec_shared::GlobalModel) -> Vec<f32> {
    let mut v = model.factors_slice().to_vec();
    v.extend(model.item_bias.iter());
    v
}

/// The JSON report of `fedrec-sim audit --json` (and of the Python package's `audit`).
pub fn report_json(dataset: &DatasetInfo, rep: &AuditReport) -> serde_json::Value {
    serde_json::json!({
        "command": "audit",
        "fedrec_version": env!("CARGO_PKG_VERSION"),
        "dataset": dataset,
        "audit": rep,
        "epsilon": rep.epsilon,
        "epsilon_lower_bound": rep.epsilon_lower_bound,
        "confidence": rep.confidence,
        "canaries": rep.canaries,
        "guesses": rep.guesses,
        "correct": rep.correct,
        "epsilon_canary_cosine": rep.epsilon_canary_cosine,
    })
}

/// Runs the federation of `data`'s users plus the canaries under `cfg` (the noise calibrated
/// to `cfg.epsilon` over real users and canaries) and audits it.
pub fn run(data: &UserData, cfg: &RunConfig, audit: &AuditConfig) -> anyhow::Result<AuditReport> {
    let m = audit.canaries;
    if m < 2 {
        bail!("--canaries must be at least 2");
    }
    let guesses = audit.guesses.unwrap_or(m / 5).max(2);
    if guesses > m {
        bail!("--guesses ({guesses}) must not exceed --canaries ({m})");
    }
    if cfg.epsilon.is_none() && cfg.noise_multiplier <= 0.0 {
        bail!("an audit needs a private run: give --epsilon or --noise-multiplier");
    }
    if audit.weaken_noise.is_some() && cfg.mechanism == crate::federation::MechanismKind::Distributed {
        bail!(
            "--danger-weaken-noise divides the coordinator's noise, and with --mechanism distributed the \
             coordinator adds none (the devices do): weaken a central run instead"
        );
    }
    // Every canary is part of the public population, whether it takes part or not.
    let population = data.train.len() + m;
    let mut cfg = cfg.clone();
    cfg.calibrate_for(population, data.n_items).context("calibrating the noise to --epsilon")?;
    let audit_seed = cfg.seed ^ 0xa0d1_7ca4_a41e_5eed;
    let mut bits = danger::seeded_rng(audit_seed);
    let included: Vec<bool> = (0..m).map(|_| bits.random_bool(0.5)).collect();
    let members: Vec<usize> = (0..m).filter(|&i| included[i]).collect();

    let model = federation::initial_model(data, &cfg)?;
    let before = item_side(&model);
    let dim = before.len();
    let layout = model.shape().layout();
    let config = federation::coordinator_config(&cfg, population)?;
    let q = match config.selection {
        fedrec_shared::round::Selection::Poisson { q } => q,
        fedrec_shared::round::Selection::FirstCome { .. } => 1.0,
    };
    let mut coordinator = Coordinator::new(config, model, danger::seeded_rng(cfg.seed ^ 0x5eed))?;
    let divisor = audit.weaken_noise.unwrap_or(1.0);
    if audit.weaken_noise.is_some() {
        danger::weaken_release_noise(&mut coordinator, divisor)?;
    }
    // With distributed noise the devices' shares are calibrated for the whole population
    // checking in, so every canary takes part: an excluded one (Sᵢ = 0) uploads a zero update,
    // adding its noise share and nothing of its direction. Otherwise only the included ones.
    let distributed = cfg.mechanism == crate::federation::MechanismKind::Distributed;
    let n_crafted = if distributed { m } else { members.len() };
    let craft = |j: usize, task: &Task| -> Option<ClippedUpdate> {
        let i = if distributed { j } else { *members.get(j)? };
        let scale = if included[i] { task.clip_norm } else { 0.0 };
        let c = canary_direction(audit_seed, i, dim);
        let mut dense = vec![0.0f32; layout.len()];
        for (x, &ci) in dense.iter_mut().zip(&c) {
            *x = ci * scale;
        }
        let v = UpdateVector::from_dense(layout, &dense).ok()?;
        ClippedUpdate::clip(v, task.clip_norm).ok()
    };
    let harness = HarnessConfig { dropout: cfg.dropout, n_threads: cfg.threads, ..HarnessConfig::default() };
    let mut fed =
        Federation::new(coordinator, &data.train, harness, danger::seeded_rng(cfg.seed.wrapping_add(1)))
            .with_crafted(n_crafted, &craft);
    fed.run_rounds(cfg.rounds, |_, _| {});
    let after = item_side(&fed.coordinator.model().model);
    let ledger = fed.coordinator.ledger();
    let epsilon = ledger.epsilon(cfg.delta, cfg.accountant.into())?;
    let rounds_charged = ledger.entries().len() + ledger.ddp_entries().len();

    // The server descends along the sum: the canaries' trace is in θ₀ − θ_T.
    let observed: Vec<f64> = before.iter().zip(&after).map(|(&b, &a)| f64::from(b) - f64::from(a)).collect();
    let norm = observed.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    let scores: Vec<f64> = (0..m)
        .map(|i| {
            let c = canary_direction(audit_seed, i, dim);
            c.iter().zip(&observed).map(|(&ci, &o)| f64::from(ci) * o).sum::<f64>() / norm
        })
        .collect();

    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let k_plus = guesses / 2;
    let k_minus = guesses - k_plus;
    let correct = order[..k_plus].iter().filter(|&&i| included[i]).count()
        + order[m - k_minus..].iter().filter(|&&i| !included[i]).count();
    let epsilon_lower_bound = one_run_lower_bound(m, guesses, correct, cfg.delta, audit.confidence)?;

    let stats = |inc: bool| {
        let xs: Vec<f64> = (0..m).filter(|&i| included[i] == inc).map(|i| scores[i]).collect();
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let ss = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
        (mean, ss, xs.len())
    };
    let (mean1, ss1, n1) = stats(true);
    let (mean0, ss0, n0) = stats(false);
    let pooled = (((ss1 + ss0) / (n1 + n0).saturating_sub(2).max(1) as f64).sqrt()).max(f64::MIN_POSITIVE);
    let mu = (mean1 - mean0) / pooled;
    Ok(AuditReport {
        epsilon,
        delta: cfg.delta,
        epsilon_lower_bound,
        confidence: audit.confidence,
        canaries: m,
        canaries_included: members.len(),
        guesses,
        correct,
        epsilon_canary_cosine: gaussian_epsilon(mu, cfg.delta),
        canary_cosine_mu: mu,
        mean_cosine_included: mean1,
        mean_cosine_excluded: mean0,
        dimension: dim,
        noise_multiplier: cfg.noise_multiplier,
        noise_divisor: divisor,
        rounds_charged,
        q,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// δ = 0 and every guess correct: the bound solves `(e^ε/(1+e^ε))^r = β`, so
    /// `ε = logit(β^{1/r})`.
    #[test]
    fn all_correct_without_delta_matches_the_closed_form() {
        for r in [10usize, 50, 200] {
            let got = one_run_lower_bound(1000, r, r, 0.0, 0.95).expect("valid");
            let p = 0.05f64.powf(1.0 / r as f64);
            let want = (p / (1.0 - p)).ln();
            assert!((got - want).abs() < 1e-9, "r {r}: {got} vs {want}");
        }
    }

    /// One wrong guess out of r with δ = 0: `P[W ≥ r−1] = q^r + r q^{r−1}(1−q)`; check the
    /// bound against that tail at the returned ε (it must equal β there).
    #[test]
    fn one_wrong_guess_matches_the_binomial_tail() {
        let r = 100;
        let eps = one_run_lower_bound(500, r, r - 1, 0.0, 0.95).expect("valid");
        let q = eps.exp() / (1.0 + eps.exp());
        let tail = q.powi(r as i32) + r as f64 * q.powi(r as i32 - 1) * (1.0 - q);
        assert!((tail - 0.05).abs() < 1e-9, "tail {tail} at ε {eps}");
        let all = one_run_lower_bound(500, r, r, 0.0, 0.95).expect("valid");
        assert!(eps < all);
    }

    /// Chance-level accuracy proves nothing, and δ only weakens the bound.
    #[test]
    fn chance_accuracy_gives_zero_and_delta_loosens() {
        assert_eq!(one_run_lower_bound(1000, 200, 100, 1e-5, 0.95).expect("valid"), 0.0);
        let without = one_run_lower_bound(1000, 200, 190, 0.0, 0.95).expect("valid");
        let with = one_run_lower_bound(1000, 200, 190, 1e-3, 0.95).expect("valid");
        assert!(with < without && with > 0.0, "{with} vs {without}");
        // By hand: with δ the p-value is the δ = 0 tail plus 2mδ·α, α ≥ pmf(v−1) > 0.
        let p0 = one_run_p_value(1000, 200, 190, 2.0, 0.0);
        let p1 = one_run_p_value(1000, 200, 190, 2.0, 1e-3);
        assert!(p1 > p0);
        assert!(one_run_lower_bound(10, 20, 5, 0.0, 0.95).is_err());
        assert!(one_run_lower_bound(100, 20, 5, 1.5, 0.95).is_err());
    }

    /// The Gaussian mechanism's ε: μ = 1 at δ = 10⁻⁵ is ε = 4.3772 (the same equation solved
    /// by bisection with Python's `math.erfc`; Balle & Wang 2018), and δ(ε) at the answer is δ.
    #[test]
    fn gaussian_epsilon_inverts_the_tradeoff() {
        let eps = gaussian_epsilon(1.0, 1e-5).expect("positive μ");
        let d = normal_cdf(-eps + 0.5) - eps.exp() * normal_cdf(-eps - 0.5);
        assert!((d - 1e-5).abs() < 1e-8, "δ {d} at ε {eps}");
        assert!((eps - 4.377_18).abs() < 1e-3, "{eps}");
        assert!(gaussian_epsilon(0.0, 1e-5).is_none());
        assert!(gaussian_epsilon(2.0, 1e-5) > gaussian_epsilon(1.0, 1e-5));
        assert!((normal_cdf(1.959_963_985) - 0.975).abs() < 1e-6);
    }
}
