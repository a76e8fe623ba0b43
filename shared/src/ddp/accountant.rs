//! The accountant of the distributed discrete Gaussian: Rényi DP of the sum of the survivors' noise shares (Kairouz, Liu & Steinke 2021, Theorem 1 and Proposition 14), Poisson subsampling by Zhu & Wang 2019 (Theorem 5), composition over rounds, (ε, δ), and calibration.
//!
//! One round with `n'` survivors releases the integer sum of the rounded updates plus, per
//! coordinate, the sum of `n'` independent `N_Z(0, σ_dev²)`. With `σ_t = √n' σ_dev`,
//! `τ = 10 Σ_{k=1}^{n'−1} exp(−2π² σ_dev² k/(k+1))` ([`tau`]) and the rounded sensitivities
//! `Δ₂`, `Δ₁` (grid units) in `D` dimensions, order `α` costs at most ([`rdp_unsampled`])
//!
//! ```text
//! ε(α) = min{ αΔ₂²/(2σ_t²) + τD , (α/2)(Δ₂²/σ_t² + 2τΔ₁/σ_t + τ²D) , (α/2)(Δ₂/σ_t + τ√D)² }
//! ```
//!
//! (DDGauss Proposition 14, Eq. 17; for `n' = 1`, `τ = 0` and this is the discrete Gaussian's
//! exact curve, CKS 2020 Proposition 5). Poisson sampling with probability `q` at integer
//! `α ≥ 2` uses the general upper bound of Zhu & Wang, "Poisson Subsampled Rényi Differential
//! Privacy" (ICML 2019), Theorem 5, valid for any mechanism under add/remove-one neighbours; the
//! charge is its minimum with the unsampled curve ([`rdp_round`]). Rounds add; (ε, δ) comes from
//! [`crate::privacy::rdp::epsilon_from_rdp`] over [`ORDERS`].

use crate::privacy::calibrate::calibrate_noise_with;
use crate::privacy::rdp::{delta_from_rdp, epsilon_from_rdp};
use crate::privacy::{PrivacyError, check_delta, check_q};

use super::DdpError;
use super::params::{DdpParams, DdpValidParams};

/// Number of [`ORDERS`].
pub const N_ORDERS: usize = 128;

/// The Rényi orders of the accountant: the integers 2, …, 128, and 256 (the orders of the
/// DDGauss authors' accounting; Zhu & Wang's bound needs integers).
pub const ORDERS: [f64; N_ORDERS] = orders();

const fn orders() -> [f64; N_ORDERS] {
    let mut out = [0.0; N_ORDERS];
    let mut i = 0;
    while i < N_ORDERS - 1 {
        out[i] = (i + 2) as f64;
        i += 1;
    }
    out[N_ORDERS - 1] = 256.0;
    out
}

/// One accounting entry: `steps` rounds, each sampling devices with probability `q`, whose sums
/// carry `n_survivors` noise shares of `N_Z(0, device_var)` in `dim` coordinates, with rounded
/// sensitivities `l2`, `l1` (grid units).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpEvent {
    q: f64,
    steps: u64,
    l2: f64,
    l1: f64,
    device_var: f64,
    n_survivors: usize,
    dim: usize,
}

impl DdpEvent {
    /// The event of `steps` rounds of `params` in which `n_survivors` devices' shares entered
    /// each sum. Refuses `q ∉ [0, 1]` and `n_survivors` below `min_reports` (such a sum does not
    /// carry the target noise and must not be released).
    pub fn new(params: &DdpValidParams, n_survivors: usize, q: f64, steps: u64) -> Result<Self, DdpError> {
        let p = params.params();
        if n_survivors < p.min_reports {
            return Err(DdpError::Survivors {
                n_survivors,
                min_reports: p.min_reports,
                n_cohort: p.n_cohort,
            });
        }
        Self::from_parts(
            q,
            steps,
            params.l2_sensitivity(),
            params.l1_sensitivity(),
            params.device_var(),
            n_survivors,
            params.padded_dim(),
        )
    }

    /// An event from its raw parts (grid units): for tests and for mechanisms described
    /// elsewhere. Refuses `q ∉ [0, 1]`, non-positive or non-finite `l2`, `l1`, `device_var`,
    /// `device_var < 1/4` (DDGauss Theorem 1 needs `σ_dev ≥ 1/2`), and `n_survivors = 0` or
    /// `dim = 0`.
    pub fn from_parts(
        q: f64,
        steps: u64,
        l2: f64,
        l1: f64,
        device_var: f64,
        n_survivors: usize,
        dim: usize,
    ) -> Result<Self, DdpError> {
        check_q(q)?;
        for x in [l2, l1] {
            if !(x > 0.0 && x.is_finite()) {
                return Err(DdpError::Sensitivity(x));
            }
        }
        if !(device_var >= 0.25 && device_var.is_finite()) {
            return Err(DdpError::DeviceNoiseTooSmall { sigma_dev: device_var.sqrt() });
        }
        if n_survivors == 0 || dim == 0 {
            return Err(DdpError::Survivors { n_survivors, min_reports: 1, n_cohort: n_survivors });
        }
        Ok(Self { q, steps, l2, l1, device_var, n_survivors, dim })
    }

    /// The sampling probability.
    pub fn q(&self) -> f64 {
        self.q
    }

    /// The number of rounds.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// `σ_t = √n' σ_dev`, the standard deviation parameter of the summed noise in grid units.
    pub fn total_sigma(&self) -> f64 {
        (self.n_survivors as f64 * self.device_var).sqrt()
    }

    /// `Δ₂ / σ_t`: the noise multiplier a central discrete Gaussian with the same variance would
    /// have.
    pub fn l2_scale(&self) -> f64 {
        self.l2 / self.total_sigma()
    }

    /// [`tau`] of this event.
    pub fn tau(&self) -> f64 {
        tau(self.device_var, self.n_survivors)
    }

    /// The rounded L2 sensitivity `Δ₂` (grid units).
    pub fn l2(&self) -> f64 {
        self.l2
    }

    /// The rounded L1 sensitivity `Δ₁` (grid units).
    pub fn l1(&self) -> f64 {
        self.l1
    }

    /// Each share's `σ_dev²` (grid units).
    pub fn device_var(&self) -> f64 {
        self.device_var
    }

    /// The number of noise shares charged.
    pub fn n_survivors(&self) -> usize {
        self.n_survivors
    }

    /// The number of coordinates `D`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The same round repeated `steps` times (for grouping equal charges).
    pub fn with_steps(self, steps: u64) -> Self {
        Self { steps, ..self }
    }
}

/// `τ = 10 Σ_{k=1}^{n−1} exp(−2π² σ² k/(k+1))` for `n` shares of `N_Z(0, σ²)` (DDGauss
/// Theorem 1): how far their sum is from one discrete Gaussian. `0` for `n ≤ 1`.
pub fn tau(device_var: f64, n: usize) -> f64 {
    let two_pi_sq = 2.0 * std::f64::consts::PI * std::f64::consts::PI;
    let mut sum = 0.0;
    for k in 1..n {
        let kf = k as f64;
        let term = (-two_pi_sq * device_var * kf / (kf + 1.0)).exp();
        // The terms decrease in k: once one is 0 in f64, so are the rest.
        if term == 0.0 {
            break;
        }
        sum += term;
    }
    10.0 * sum
}

/// The RDP of one round without sampling at order `alpha > 1` (DDGauss Proposition 14).
pub fn rdp_unsampled(event: &DdpEvent, alpha: f64) -> f64 {
    unsampled(event, alpha, event.tau())
}

/// [`rdp_unsampled`] with the event's `τ` computed once (it sums `n' − 1` terms).
fn unsampled(event: &DdpEvent, alpha: f64, tau: f64) -> f64 {
    let d = event.dim as f64;
    let s = event.l2_scale();
    let s1 = event.l1 / event.total_sigma();
    let t1 = alpha * s * s / 2.0 + tau * d;
    let t2 = alpha / 2.0 * (s * s + 2.0 * tau * s1 + tau * tau * d);
    let t3 = alpha / 2.0 * (s + d.sqrt() * tau).powi(2);
    t1.min(t2).min(t3)
}

/// The RDP of one Poisson-sampled round at integer order `alpha ≥ 2`: the minimum of Zhu &
/// Wang's Theorem 5 and [`rdp_unsampled`].
pub fn rdp_round(event: &DdpEvent, alpha: u32) -> f64 {
    let a = f64::from(alpha);
    let tau = event.tau();
    let eps = |order: u32| unsampled(event, f64::from(order), tau);
    let q = event.q;
    if q == 0.0 {
        return 0.0;
    }
    if q == 1.0 {
        return eps(alpha);
    }
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    // ln C(α, l) by the recurrence C(α, l) = C(α, l−1)(α − l + 1)/l.
    let mut log_binom = (a * (a - 1.0) / 2.0).ln();
    let mut terms = vec![
        (a - 1.0) * log_1mq + (a * q - q + 1.0).ln(),
        log_binom + 2.0 * log_q + (a - 2.0) * log_1mq + eps(2),
    ];
    for l in 3..=alpha {
        let lf = f64::from(l);
        log_binom += (a - lf + 1.0).ln() - lf.ln();
        terms.push(3f64.ln() + log_binom + lf * log_q + (a - lf) * log_1mq + (lf - 1.0) * eps(l));
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sampled = (max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()) / (a - 1.0);
    sampled.min(eps(alpha))
}

/// One round of `event` (its `steps` ignored) as an RDP curve over any `orders ≥ 1`, for a
/// record kept on another grid (the device's, over
/// [`crate::privacy::rdp::DEFAULT_ORDERS`]): order `α` is charged [`rdp_round`] at `⌈α⌉` (at
/// least 2). Rényi divergence does not decrease with the order (van Erven & Harremoës 2014,
/// Theorem 3), so the value at `⌈α⌉` bounds the one at `α`: the curve is an upper bound,
/// exact at integer orders. Infinite for an order that is not finite or below 1.
pub fn rdp_at_orders(event: &DdpEvent, orders: &[f64]) -> Vec<f64> {
    // Neighbouring orders share `⌈α⌉` (ten of dp-accounting's fractional orders per integer):
    // each integer order is computed once while the orders run through it.
    let mut last: Option<(u32, f64)> = None;
    orders
        .iter()
        .map(|&alpha| {
            if !(alpha >= 1.0 && alpha.is_finite()) || alpha > f64::from(u32::MAX) {
                return f64::INFINITY;
            }
            // In range: 1 ≤ ⌈α⌉ ≤ u32::MAX.
            let order = (alpha.ceil() as u32).max(2);
            match last {
                Some((o, v)) if o == order => v,
                _ => {
                    let v = rdp_round(event, order);
                    last = Some((order, v));
                    v
                }
            }
        })
        .collect()
}

/// The RDP curve over [`ORDERS`] of the composition of `events`.
pub fn compose(events: &[DdpEvent]) -> Vec<f64> {
    let mut total = vec![0.0; N_ORDERS];
    for event in events.iter().filter(|e| e.steps > 0 && e.q > 0.0) {
        let steps = event.steps as f64;
        for (acc, &order) in total.iter_mut().zip(&ORDERS) {
            *acc += steps * rdp_round(event, order as u32);
        }
    }
    total
}

/// The smallest ε for which the composition of `events` is (ε, δ)-DP by this accountant.
pub fn epsilon(events: &[DdpEvent], delta: f64) -> Result<f64, DdpError> {
    check_delta(delta)?;
    Ok(epsilon_from_rdp(&ORDERS, &compose(events), delta)?.0)
}

/// The smallest δ for which the composition of `events` is (ε, δ)-DP by this accountant.
pub fn delta(events: &[DdpEvent], epsilon: f64) -> Result<f64, DdpError> {
    Ok(delta_from_rdp(&ORDERS, &compose(events), epsilon)?.0)
}

/// The smallest target noise `σ` (model units, to a relative `10⁻⁴`) for which `steps` rounds of
/// `template` (its `noise_std` ignored) with sampling probability `q` meet (`target_epsilon`,
/// `delta`) when each round commits with `min_reports` survivors. `γ`, `Δ₂` and `σ_dev` are
/// recomputed for every candidate `σ`, so the rounding's cost is included.
///
/// Errors: the template's checks ([`DdpParams::validate`]), [`PrivacyError::NothingToCalibrate`]
/// for `q = 0` or no steps, and [`PrivacyError::Unreachable`] when no `σ ≤ 10⁶ C` meets the
/// target (at a fixed `b`, the effective noise multiplier `σ/(γΔ₂)` is bounded).
pub fn noise_for(
    target_epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
    template: &DdpParams,
) -> Result<f64, DdpError> {
    check_delta(delta)?;
    check_q(q)?;
    template.check_static()?;
    if q == 0.0 || steps == 0 {
        return Err(PrivacyError::NothingToCalibrate.into());
    }
    let c = template.clip_norm;
    let multiplier = calibrate_noise_with(target_epsilon, |z| {
        let params = DdpParams { noise_std: z * c, ..*template };
        // Too little noise for the grid (σ_dev < 1/2) cannot meet any target this accountant
        // covers: count it as infinite ε, which only pushes the result up.
        let Ok(grid) = params.grid() else { return Ok(f64::INFINITY) };
        let event = DdpEvent::from_parts(
            q,
            steps,
            grid.l2,
            grid.l1,
            grid.device_var(),
            template.min_reports,
            grid.padded_dim,
        );
        match event {
            Ok(event) => Ok(epsilon_from_rdp(&ORDERS, &compose(&[event]), delta)?.0),
            Err(_) => Ok(f64::INFINITY),
        }
    })?;
    Ok(multiplier * c)
}
