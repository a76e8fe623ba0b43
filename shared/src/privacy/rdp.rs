//! Rényi DP of the Poisson-subsampled Gaussian mechanism and its conversion to (ε, δ).
//!
//! The RDP of one step at order α is `ln(A_α) / (α − 1)` (Mironov, Talwar & Zhang 2019,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism"): for integer α, `A_α` is
//! the finite binomial sum of their Section 3.2; for fractional α, the two-sided series of
//! Section 3.3, summed until both halves shrink below `e^-30` of the total, and given up
//! (the order is then excluded, as infinite) after 1000 terms. RDP adds over steps and over
//! events. This follows Google's dp-accounting `RdpAccountant` line by line, so that both
//! give the same numbers to many more digits than the three the design asks for.

use super::special::{log_add, log_erfc};
use super::{PrivacyError, PrivacyEvent, check_delta, check_epsilon, check_q};

/// Number of orders in [`DEFAULT_ORDERS`].
pub const N_DEFAULT_ORDERS: usize = 99 + 53 + 4;

/// dp-accounting's default Rényi orders: 1.1, 1.2, …, 10.9, then 11, 12, …, 63, then 128,
/// 256, 512 and 1024.
pub const DEFAULT_ORDERS: [f64; N_DEFAULT_ORDERS] = default_orders();

const fn default_orders() -> [f64; N_DEFAULT_ORDERS] {
    let mut orders = [0.0; N_DEFAULT_ORDERS];
    let mut i = 0;
    while i < 99 {
        // Computed as dp-accounting does (1 + x / 10.0) so the orders match bit for bit.
        orders[i] = 1.0 + (i + 1) as f64 / 10.0;
        i += 1;
    }
    while i < 99 + 53 {
        orders[i] = (i - 99 + 11) as f64;
        i += 1;
    }
    orders[152] = 128.0;
    orders[153] = 256.0;
    orders[154] = 512.0;
    orders[155] = 1024.0;
    orders
}

/// Terms of the fractional-order series summed before giving up on an order.
const MAX_FRACTIONAL_TERMS: u32 = 1000;

/// The RDP at `order` of one step of the Poisson-subsampled Gaussian mechanism with sampling
/// probability `q` and noise multiplier `sigma`.
///
/// Special cases as in dp-accounting: `q = 0` costs 0; `sigma = 0` or an infinite order cost
/// `∞`; `q = 1` is the plain Gaussian mechanism, `order / (2σ²)`. A fractional order whose
/// series does not settle within 1000 terms also gives `∞`, which excludes it from the
/// (ε, δ) conversion rather than under-reporting it.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, order: f64) -> Result<f64, PrivacyError> {
    check_q(q)?;
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return Err(PrivacyError::NoiseMultiplier(sigma));
    }
    if order.is_nan() || order <= 1.0 {
        return Err(PrivacyError::Order(order));
    }
    Ok(rdp_unchecked(q, sigma, order))
}

fn rdp_unchecked(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 0.0 {
        0.0
    } else if order.is_infinite() || sigma == 0.0 {
        f64::INFINITY
    } else if q == 1.0 {
        order / (2.0 * sigma * sigma)
    } else if order.fract() == 0.0 {
        log_a_integer(q, sigma, order) / (order - 1.0)
    } else {
        log_a_fractional(q, sigma, order) / (order - 1.0)
    }
}

/// `ln A_α` for integer α and `0 < q < 1`: `A_α = Σᵢ C(α,i) qⁱ (1−q)^{α−i} e^{(i²−i)/(2σ²)}`.
fn log_a_integer(q: f64, sigma: f64, alpha: f64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let mut log_a = f64::NEG_INFINITY;
    // ln C(α, i), by the recurrence C(α, i) = C(α, i−1) (α − i + 1) / i.
    let mut log_binom = 0.0;
    let mut i = 0.0;
    while i <= alpha {
        if i > 0.0 {
            log_binom += (alpha - i + 1.0).ln() - i.ln();
        }
        let log_coef = log_binom + i * log_q + (alpha - i) * log_1mq;
        log_a = log_add(log_a, log_coef + (i * i - i) / two_var);
        i += 1.0;
    }
    log_a
}

/// `ln A_α` for fractional α and `0 < q < 1`, by the series of Mironov et al. Section 3.3 as
/// dp-accounting sums it (binomial coefficients in absolute value), or `∞` if it does not
/// settle within [`MAX_FRACTIONAL_TERMS`] terms.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let scale = std::f64::consts::SQRT_2 * sigma;
    let log_half = -std::f64::consts::LN_2;

    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    // ln |C(α, i)|, by the recurrence |C(α, i)| = |C(α, i−1)| |α − i + 1| / i.
    let mut log_binom = 0.0;
    for n in 0..MAX_FRACTIONAL_TERMS {
        let i = f64::from(n);
        if n > 0 {
            log_binom += (alpha - i + 1.0).abs().ln() - i.ln();
        }
        let j = alpha - i;
        let log_t0 = log_binom + i * log_q + j * log_1mq;
        let log_t1 = log_binom + j * log_q + i * log_1mq;
        let log_e0 = log_half + log_erfc((i - z0) / scale);
        let log_e1 = log_half + log_erfc((z0 - j) / scale);
        let log_s0 = log_t0 + (i * i - i) / two_var + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_var + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// The RDP curve of the composition of `events` at each of `orders`: per-step RDP times steps,
/// added over events. Orders must all exceed 1.
pub fn compose(events: &[PrivacyEvent], orders: &[f64]) -> Result<Vec<f64>, PrivacyError> {
    if let Some(&bad) = orders.iter().find(|&&order| order.is_nan() || order <= 1.0) {
        return Err(PrivacyError::Order(bad));
    }
    let mut total = vec![0.0; orders.len()];
    for event in events.iter().filter(|event| !event.is_free()) {
        // u64 → f64 rounds only above 2^53 steps, far beyond any ledger.
        let steps = event.steps() as f64;
        for (acc, &order) in total.iter_mut().zip(orders) {
            *acc += steps * rdp_unchecked(event.q(), event.noise_multiplier(), order);
        }
    }
    Ok(total)
}

/// The smallest ε, over `orders`, for which a mechanism with RDP curve `rdp` is (ε, δ)-DP,
/// and the order attaining it.
///
/// Per order α: ε = 0 where the KL bound `δ ≥ √(1 − e^{−rdp})` already holds, else (for
/// α > 1.01, where it is numerically stable) `rdp + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)`
/// (Canonne, Kamath & Steinke 2020, Proposition 12; Asoodeh et al. 2020), else `∞`. A
/// negative RDP value (only from numerical trouble) counts as ε = 0, as in dp-accounting.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), PrivacyError> {
    check_delta(delta)?;
    check_curve(orders, rdp)?;
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// The smallest δ, over `orders`, for which a mechanism with RDP curve `rdp` is (ε, δ)-DP,
/// and the order attaining it: the same bounds as [`epsilon_from_rdp`], solved for δ.
pub fn delta_from_rdp(orders: &[f64], rdp: &[f64], epsilon: f64) -> Result<(f64, f64), PrivacyError> {
    check_epsilon(epsilon)?;
    check_curve(orders, rdp)?;
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        let mut log_delta = if r <= 0.0 { f64::NEG_INFINITY } else { 0.5 * (-(-r).exp()).ln_1p() };
        if r > 0.0 && a > 1.01 {
            let bound = (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln();
            log_delta = log_delta.min(bound);
        }
        if log_delta < best.0 {
            best = (log_delta, a);
        }
    }
    Ok((best.0.exp().min(1.0), best.1))
}

fn check_curve(orders: &[f64], rdp: &[f64]) -> Result<(), PrivacyError> {
    if orders.is_empty() || orders.len() != rdp.len() {
        return Err(PrivacyError::OrdersMismatch { orders: orders.len(), values: rdp.len() });
    }
    match orders.iter().find(|&&order| order.is_nan() || order < 1.0) {
        Some(&bad) => Err(PrivacyError::Order(bad)),
        None => Ok(()),
    }
}

/// ε of the composition of `events` for the given δ, over [`DEFAULT_ORDERS`].
pub fn epsilon(events: &[PrivacyEvent], delta: f64) -> Result<f64, PrivacyError> {
    check_delta(delta)?;
    let rdp = compose(events, &DEFAULT_ORDERS)?;
    Ok(epsilon_from_rdp(&DEFAULT_ORDERS, &rdp, delta)?.0)
}

/// δ of the composition of `events` for the given ε, over [`DEFAULT_ORDERS`].
pub fn delta(events: &[PrivacyEvent], epsilon: f64) -> Result<f64, PrivacyError> {
    check_epsilon(epsilon)?;
    let rdp = compose(events, &DEFAULT_ORDERS)?;
    Ok(delta_from_rdp(&DEFAULT_ORDERS, &rdp, epsilon)?.0)
}
