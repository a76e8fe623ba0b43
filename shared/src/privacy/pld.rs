//! Privacy loss distributions (PLDs) of the Poisson-subsampled Gaussian mechanism, composed
//! by FFT: a tighter (ε, δ) accountant than RDP, and still an upper bound.
//!
//! A PLD is the distribution of the privacy loss `ln(P(o)/Q(o))` for `o ~ P`, where `P` and
//! `Q` are the mechanism's output distributions on neighbouring datasets; δ(ε) is its hockey
//! stick divergence `E[(1 − e^{ε−L})₊]`, and composing mechanisms convolves their PLDs.
//! This module follows Google's dp-accounting `PLDAccountant` (with its defaults:
//! connect-the-dots, pessimistic, noise tails of mass `e^-50`, composition tails of `1e-15`):
//!
//! - **Adjacency.** Under add/remove-one with Poisson sampling the two directions differ, so
//!   there are two PLDs: *remove* (`P = (1−q)N(0,σ²) + qN(−1,σ²)`, `Q = N(0,σ²)`) and *add*
//!   (`P = N(0,σ²)`, `Q = (1−q)N(0,σ²) + qN(1,σ²)`). Each is composed on its own and δ(ε) is
//!   the larger of the two. For `q = 1` they coincide and one is kept.
//! - **Discretisation.** One step's PLD is put on the grid `k·d` by the pessimistic
//!   connect-the-dots construction (Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022): the
//!   masses are chosen so that the discrete PLD's δ(ε) lies above the true one at every grid
//!   point, and the noise tails beyond `e^-50` go to `+∞` loss.
//! - **Composition.** `n` steps are one FFT, a pointwise `n`-th power and an inverse FFT, on a
//!   window cut by Chernoff bounds so that at most `1e-15` of mass falls outside; that mass is
//!   counted at `+∞` loss. Different events are convolved, their cut tails again counted at
//!   `+∞` (right) or moved onto the lowest kept loss (left), both pessimistic.

use super::fft::{self, Fft};
use super::special::{log_add, log_ndtr, ndtr, ndtri_from_log};
use super::{PrivacyError, PrivacyEvent, check_delta, check_epsilon};

/// dp-accounting's default discretisation interval of the privacy loss.
pub const DEFAULT_DISCRETIZATION: f64 = 1e-4;

/// The largest number of grid points a PLD may use (2^25: 256 MiB of complex FFT buffer).
pub const MAX_POINTS: u64 = 1 << 25;

/// Natural log of the noise mass cut from each tail before discretising (as dp-accounting).
const LOG_MASS_TRUNCATION_BOUND: f64 = -50.0;

/// Mass allowed outside the window kept when composing (as dp-accounting).
const TAIL_MASS_TRUNCATION: f64 = 1e-15;

/// A discretised privacy loss distribution: mass `probs[i]` at loss `(lower + i) · d`, and
/// `infinity_mass` at `+∞`.
#[derive(Debug, Clone, PartialEq)]
struct Pmf {
    lower: i64,
    probs: Vec<f64>,
    infinity_mass: f64,
}

/// The privacy loss distribution of a composition of events, on a grid of one
/// discretisation interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Pld {
    discretization: f64,
    remove: Pmf,
    /// `None` when the add PLD equals the remove PLD (`q = 1`, or no events).
    add: Option<Pmf>,
}

impl Pld {
    /// The PLD of a mechanism that reveals nothing: all mass at loss 0.
    pub fn identity(discretization: f64) -> Result<Self, PrivacyError> {
        check_discretization(discretization)?;
        Ok(Self { discretization, remove: Pmf::identity(), add: None })
    }

    /// The PLD of `event`: its single-step PLD composed `steps` times.
    pub fn from_event(event: &PrivacyEvent, discretization: f64) -> Result<Self, PrivacyError> {
        check_discretization(discretization)?;
        if event.is_free() {
            return Self::identity(discretization);
        }
        let (q, sigma, steps) = (event.q(), event.noise_multiplier(), event.steps());
        let one_step = |adjacency| {
            SubsampledGaussian { q, sigma, adjacency }.connect_the_dots(discretization)?.self_compose(steps)
        };
        let remove = one_step(Adjacency::Remove)?;
        let add = if q < 1.0 { Some(one_step(Adjacency::Add)?) } else { None };
        Ok(Self { discretization, remove, add })
    }

    /// The PLD of running both mechanisms. Both must use the same discretisation interval.
    pub fn compose(&self, other: &Pld) -> Result<Self, PrivacyError> {
        if self.discretization != other.discretization {
            return Err(PrivacyError::DiscretizationMismatch {
                left: self.discretization,
                right: other.discretization,
            });
        }
        let remove = self.remove.compose(&other.remove)?;
        let add = match (&self.add, &other.add) {
            (None, None) => None,
            (a, b) => Some(a.as_ref().unwrap_or(&self.remove).compose(b.as_ref().unwrap_or(&other.remove))?),
        };
        Ok(Self { discretization: self.discretization, remove, add })
    }

    /// The discretisation interval of the loss grid.
    pub fn discretization(&self) -> f64 {
        self.discretization
    }

    /// The smallest ε ≥ 0 whose hockey-stick divergence is at most `delta` in both directions;
    /// `f64::INFINITY` when more than `delta` of mass sits at infinite loss. Searched at
    /// `delta · (1 − FLOAT_SLACK)`, so that the FFT's round-off cannot make ε too small.
    pub fn epsilon_for_delta(&self, delta: f64) -> Result<f64, PrivacyError> {
        check_delta(delta)?;
        let d = self.discretization;
        let delta = delta * (1.0 - FLOAT_SLACK);
        let remove = self.remove.epsilon_for_delta(delta, d);
        Ok(self.add.as_ref().map_or(remove, |add| remove.max(add.epsilon_for_delta(delta, d))))
    }

    /// The hockey-stick divergence at `epsilon`, the larger of the two directions: the δ for
    /// which the composition is (ε, δ)-DP (raised by `FLOAT_SLACK`, see there).
    pub fn delta_for_epsilon(&self, epsilon: f64) -> Result<f64, PrivacyError> {
        check_epsilon(epsilon)?;
        let d = self.discretization;
        let remove = self.remove.delta_for_epsilon(epsilon, d);
        let delta = self.add.as_ref().map_or(remove, |add| remove.max(add.delta_for_epsilon(epsilon, d)));
        Ok((delta * (1.0 + FLOAT_SLACK)).min(1.0))
    }
}

/// Relative slack on δ for floating-point error. Composition by FFT leaves round-off of
/// about `N · 2⁻⁵²` on each probability of an `N`-point grid (≈ 10⁻¹¹ at 10⁵ points), which
/// can move a δ near 10⁻⁵ by about 10⁻⁶ relative and make ε a few 10⁻⁸ too small (seen
/// against dp-accounting at 100–10⁴ steps). Every ε is therefore read at `δ (1 − 10⁻⁵)` and
/// every δ reported 10⁻⁵ higher: ten times the error, in the safe direction, and far inside
/// the accountant's tolerance.
const FLOAT_SLACK: f64 = 1e-5;

/// The PLD of the composition of `events`.
pub fn compose(events: &[PrivacyEvent], discretization: f64) -> Result<Pld, PrivacyError> {
    let mut composed: Option<Pld> = None;
    for event in events.iter().filter(|event| !event.is_free()) {
        let next = Pld::from_event(event, discretization)?;
        composed = Some(match composed {
            None => next,
            Some(pld) => pld.compose(&next)?,
        });
    }
    composed.map_or_else(|| Pld::identity(discretization), Ok)
}

/// ε of the composition of `events` for the given δ, on a loss grid of `discretization`.
pub fn epsilon(events: &[PrivacyEvent], delta: f64, discretization: f64) -> Result<f64, PrivacyError> {
    check_delta(delta)?;
    compose(events, discretization)?.epsilon_for_delta(delta)
}

/// δ of the composition of `events` for the given ε, on a loss grid of `discretization`.
pub fn delta(events: &[PrivacyEvent], epsilon: f64, discretization: f64) -> Result<f64, PrivacyError> {
    check_epsilon(epsilon)?;
    compose(events, discretization)?.delta_for_epsilon(epsilon)
}

fn check_discretization(d: f64) -> Result<(), PrivacyError> {
    if d > 0.0 && d.is_finite() { Ok(()) } else { Err(PrivacyError::Discretization(d)) }
}

fn check_points(points: u64) -> Result<usize, PrivacyError> {
    if points > MAX_POINTS {
        return Err(PrivacyError::PldTooLarge { points, limit: MAX_POINTS });
    }
    usize::try_from(points).map_err(|_| PrivacyError::PldTooLarge { points, limit: MAX_POINTS })
}

/// The two directions of add/remove-one adjacency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adjacency {
    /// `P = N(0,σ²)`, `Q = (1−q)N(0,σ²) + qN(1,σ²)`.
    Add,
    /// `P = (1−q)N(0,σ²) + qN(−1,σ²)`, `Q = N(0,σ²)`.
    Remove,
}

/// One step of the Poisson-subsampled Gaussian mechanism with sensitivity 1, seen in one
/// direction. Its privacy loss `L(x) = ln(P(x)/Q(x))` decreases in the output `x`.
struct SubsampledGaussian {
    q: f64,
    sigma: f64,
    adjacency: Adjacency,
}

impl SubsampledGaussian {
    /// The privacy loss at output `x`.
    fn loss(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Remove => self.loss_remove(x),
            // By the symmetry of the Gaussian, L_add(x) = −L_remove(−x).
            Adjacency::Add => -self.loss_remove(-x),
        }
    }

    /// `ln((1−q) + q·e^{ℓ(x)})` with `ℓ(x) = (−1/2 − x)/σ²`, the unsampled Gaussian's loss.
    fn loss_remove(&self, x: f64) -> f64 {
        let unsampled = (-0.5 - x) / (self.sigma * self.sigma);
        if self.q == 1.0 {
            unsampled
        } else if unsampled == 0.0 {
            0.0
        } else {
            log_add(unsampled + self.q.ln(), (-self.q).ln_1p())
        }
    }

    /// The largest `x` whose loss is at least `loss`.
    fn inverse_loss(&self, loss: f64) -> f64 {
        let var = self.sigma * self.sigma;
        match self.adjacency {
            // L_remove(x) = loss ⇔ ℓ(x) = ln(1 + (e^loss − 1)/q).
            Adjacency::Remove => -0.5 - self.unsampled_loss(loss) * var,
            // L_add(x) = loss ⇔ ℓ(−x) = ln(1 + (e^−loss − 1)/q) and x = 1 + (−1/2 − ℓ_add σ²).
            Adjacency::Add => 0.5 + self.unsampled_loss(-loss) * var,
        }
    }

    /// `ln(1 + (e^b − 1)/q)` for `b > ln(1 − q)`, computed as dp-accounting does.
    fn unsampled_loss(&self, b: f64) -> f64 {
        if self.q == 1.0 || b == 0.0 {
            return b;
        }
        let d = b + (1.0 / self.q).ln();
        let c = (1.0 / self.q - 1.0).ln();
        d + (-(c - d).exp()).ln_1p()
    }

    /// `P(X ≤ x)`.
    fn upper_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.adjacency {
            Adjacency::Add => ndtr(x / s),
            Adjacency::Remove if self.q == 1.0 => ndtr((x + 1.0) / s),
            Adjacency::Remove => (1.0 - self.q) * ndtr(x / s) + self.q * ndtr((x + 1.0) / s),
        }
    }

    /// `ln Q(X ≤ x)`.
    fn lower_log_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.adjacency {
            Adjacency::Remove => log_ndtr(x / s),
            Adjacency::Add if self.q == 1.0 => log_ndtr((x - 1.0) / s),
            Adjacency::Add => {
                log_add((-self.q).ln_1p() + log_ndtr(x / s), self.q.ln() + log_ndtr((x - 1.0) / s))
            }
        }
    }

    /// The hockey-stick divergence `sup_S P(S) − e^ε Q(S)`: since the loss decreases in `x`,
    /// the worst set is `{X ≤ L⁻¹(ε)}`.
    fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let log_1mq = (-self.q).ln_1p();
        match self.adjacency {
            // Losses never exceed −ln(1 − q).
            Adjacency::Add if self.q < 1.0 && (epsilon >= -log_1mq || is_close(epsilon, -log_1mq)) => {
                return 0.0;
            }
            // Losses never fall below ln(1 − q): the whole space is the worst set.
            Adjacency::Remove if self.q < 1.0 && (epsilon <= log_1mq || is_close(epsilon, log_1mq)) => {
                return (-epsilon.exp_m1()).clamp(0.0, 1.0);
            }
            _ => {}
        }
        let x = self.inverse_loss(epsilon);
        (self.upper_cdf(x) - (epsilon + self.lower_log_cdf(x)).exp()).clamp(0.0, 1.0)
    }

    /// The pessimistic connect-the-dots PMF on the grid of `d`, over the losses of outputs
    /// within the noise's `e^-50` truncation.
    fn connect_the_dots(&self, d: f64) -> Result<Pmf, PrivacyError> {
        let z = ndtri_from_log(-std::f64::consts::LN_2 + LOG_MASS_TRUNCATION_BOUND);
        let mut lower_x = self.sigma * z;
        let mut upper_x = -lower_x;
        match self.adjacency {
            Adjacency::Add => upper_x += 1.0,
            Adjacency::Remove => lower_x -= 1.0,
        }
        let k_upper = (self.loss(lower_x) / d).ceil();
        let k_lower = (self.loss(upper_x) / d).floor();
        let span = k_upper - k_lower + 1.0;
        if !(span.is_finite() && span >= 1.0 && span <= MAX_POINTS as f64) {
            let points = if span.is_finite() && span >= 1.0 { span as u64 } else { u64::MAX };
            return Err(PrivacyError::PldTooLarge { points, limit: MAX_POINTS });
        }
        // Both ends are integers within ±2^53 here: the casts are exact.
        let (k_lower, n) = (k_lower as i64, span as usize);

        let mut deltas: Vec<f64> =
            (0..n).map(|i| self.delta_for_epsilon((k_lower + i as i64) as f64 * d)).collect();
        // δ(ε) is non-increasing; iron out round-off.
        for i in 1..n {
            deltas[i] = deltas[i].min(deltas[i - 1]);
        }
        let infinity_mass = deltas[n - 1];
        if n == 1 {
            return Ok(Pmf { lower: k_lower, probs: vec![1.0 - deltas[0]], infinity_mass });
        }
        // Mass at each grid loss so that the PMF's δ(ε) matches at the grid points and lies
        // above the (convex) true δ(ε) between them.
        let (e_d, em1_d) = (d.exp(), d.exp_m1());
        let mut probs = vec![0.0; n];
        probs[0] = 1.0 - deltas[0] + (deltas[1] - deltas[0]) / em1_d;
        for i in 1..n - 1 {
            probs[i] = ((deltas[i + 1] - deltas[i]) - (deltas[i] - deltas[i - 1]) * e_d) / em1_d;
        }
        probs[n - 1] = (deltas[n - 1] - deltas[n - 2]) / (-d).exp_m1();
        for p in &mut probs {
            *p = p.max(0.0);
        }
        Ok(Pmf { lower: k_lower, probs, infinity_mass })
    }
}

/// Python's `math.isclose` with its default relative tolerance.
fn is_close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

impl Pmf {
    fn identity() -> Self {
        Self { lower: 0, probs: vec![1.0], infinity_mass: 0.0 }
    }

    /// The PMF of `n` independent copies' total loss.
    fn self_compose(self, n: u64) -> Result<Self, PrivacyError> {
        if n <= 1 {
            return Ok(self);
        }
        let len = self.probs.len();
        let (lo, hi) = self.chernoff_window(n, TAIL_MASS_TRUNCATION);
        let out_len = check_points(hi.saturating_sub(lo).saturating_add(1))?;
        let fft_len = check_points(out_len.max(len).next_power_of_two() as u64)?;

        // The n-fold circular self-convolution modulo fft_len; the mass it wraps around
        // comes from outside the Chernoff window, so it is below the tail bound.
        let fft = Fft::new(fft_len);
        let mut data = fft::padded(&self.probs, fft_len);
        fft.forward(&mut data);
        for z in &mut data {
            *z = z.powu(n);
        }
        fft.inverse(&mut data);
        let lo_mod = usize::try_from(lo % fft_len as u64).unwrap_or(0);
        let probs = (0..out_len).map(|i| data[(lo_mod + i) % fft_len].re).collect();

        // The mass lost to the window, and 1 − (1 − p∞)^n, go to +∞.
        let infinity_mass = TAIL_MASS_TRUNCATION - (n as f64 * (-self.infinity_mass).ln_1p()).exp_m1();
        let lower = i64::try_from(n)
            .ok()
            .and_then(|n| self.lower.checked_mul(n))
            .and_then(|l| l.checked_add(i64::try_from(lo).ok()?))
            .ok_or(PrivacyError::PldTooLarge { points: u64::MAX, limit: MAX_POINTS })?;
        Ok(Self { lower, probs, infinity_mass })
    }

    /// Indices `[lo, hi]` (relative to `n · lower`) outside which the `n`-fold convolution has
    /// at most `tail` mass, by Chernoff bounds at moment orders ±1…±20 over the length.
    fn chernoff_window(&self, n: u64, tail: f64) -> (u64, u64) {
        let len = self.probs.len();
        let mut upper = ((len - 1) as u64).saturating_mul(n);
        let mut lower = 0u64;
        let nf = n as f64;
        let log_2_over_tail = (2.0 / tail).ln();
        for k in (-20i32..=20).filter(|&k| k != 0) {
            let order = f64::from(k) / len as f64;
            let log_mgf = log_mgf(&self.probs, order);
            let bound = (nf * log_mgf + log_2_over_tail) / order;
            if !bound.is_finite() {
                continue;
            }
            if k > 0 {
                // Saturating casts: a bound beyond the range leaves the window as it is.
                upper = upper.min(bound.ceil().max(0.0) as u64);
            } else {
                lower = lower.max(bound.floor().max(0.0) as u64);
            }
        }
        (lower, upper.max(lower))
    }

    /// Convolves two PMFs and cuts tails of at most `1e-15` pessimistically.
    fn compose(&self, other: &Pmf) -> Result<Self, PrivacyError> {
        check_points((self.probs.len() + other.probs.len()) as u64)?;
        let probs = fft::convolve(&self.probs, &other.probs);
        let infinity_mass =
            self.infinity_mass + other.infinity_mass - self.infinity_mass * other.infinity_mass;
        let mut pmf = Self { lower: self.lower + other.lower, probs, infinity_mass };
        pmf.truncate_tails(TAIL_MASS_TRUNCATION);
        Ok(pmf)
    }

    /// Drops the longest prefix and suffix of mass at most `tail/2` each: the prefix's mass
    /// moves onto the lowest kept loss, the suffix's goes to `+∞` (both over-state δ).
    fn truncate_tails(&mut self, tail: f64) {
        let prefix_len = |probs: &mut dyn Iterator<Item = &f64>| {
            let mut sum = 0.0;
            let mut count = 0;
            for p in probs {
                sum += p;
                if sum > tail / 2.0 {
                    break;
                }
                count += 1;
            }
            count
        };
        let len = self.probs.len();
        let left = prefix_len(&mut self.probs.iter());
        let right = (len - prefix_len(&mut self.probs.iter().rev())).max(left + 1).min(len);
        let left = left.min(right - 1);
        let left_mass: f64 = self.probs[..left].iter().sum();
        let right_mass: f64 = self.probs[right..].iter().sum();
        self.probs.truncate(right);
        self.probs.drain(..left);
        self.probs[0] += left_mass;
        self.lower += left as i64;
        self.infinity_mass += right_mass;
    }

    /// The smallest ε ≥ 0 with `δ(ε) ≤ delta`, walking down from the largest loss.
    fn epsilon_for_delta(&self, delta: f64, d: f64) -> f64 {
        if self.infinity_mass > delta {
            return f64::INFINITY;
        }
        // δ(ε) = Σ_{L > ε} p_L − e^ε Σ_{L > ε} p_L e^{−L}: accumulate both sums downwards.
        let mut mass_upper = self.infinity_mass;
        let mut mass_lower = 0.0;
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let loss = (self.lower + i as i64) as f64 * d;
            if mass_upper > delta && mass_lower > 0.0 && ((mass_upper - delta) / mass_lower).ln() >= loss {
                break;
            }
            mass_upper += p;
            mass_lower += (-loss).exp() * p;
            if mass_upper >= delta && mass_lower == 0.0 {
                // Only when e^{−loss} underflows: the loss itself is the answer.
                return loss.max(0.0);
            }
        }
        if mass_upper <= mass_lower + delta { 0.0 } else { ((mass_upper - delta) / mass_lower).ln() }
    }

    /// The hockey-stick divergence `p∞ + Σ_{L > ε} p_L (1 − e^{ε−L})`.
    fn delta_for_epsilon(&self, epsilon: f64, d: f64) -> f64 {
        let tail: f64 = self
            .probs
            .iter()
            .enumerate()
            .map(|(i, &p)| ((self.lower + i as i64) as f64 * d, p))
            .filter(|&(loss, _)| loss > epsilon)
            .map(|(loss, p)| -(epsilon - loss).exp_m1() * p)
            .sum();
        self.infinity_mass + tail
    }
}

/// `ln Σᵢ pᵢ e^{i·t}` over the positive `pᵢ`, for `|t| · len ≤ 20` (so no term overflows).
fn log_mgf(probs: &[f64], t: f64) -> f64 {
    // e^{i·t} by running products, re-anchored with an exact exp every 256 terms so that
    // round-off stays near 1e-14 relative: the bound only needs a few digits.
    let step = t.exp();
    let mut sum = 0.0;
    let mut power = 1.0;
    for (i, &p) in probs.iter().enumerate() {
        if i % 256 == 0 {
            power = (i as f64 * t).exp();
        }
        if p > 0.0 {
            sum += p * power;
        }
        power *= step;
    }
    sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_mass_and_moves_tails_pessimistically() {
        let mut pmf =
            Pmf { lower: -3, probs: vec![1e-17, 2e-16, 0.5, 0.5 - 4e-16, 1e-16, 1e-17], infinity_mass: 0.0 };
        pmf.truncate_tails(1e-15);
        assert_eq!(pmf.lower, -1);
        assert_eq!(pmf.probs.len(), 2);
        let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.infinity_mass;
        assert!((total - 1.0).abs() < 1e-15);
        assert!(pmf.infinity_mass > 0.0);
    }

    #[test]
    fn self_compose_matches_repeated_convolution() {
        let pmf = Pmf { lower: -1, probs: vec![0.2, 0.5, 0.3], infinity_mass: 0.01 };
        let fast = pmf.clone().self_compose(5).expect("small PMF");
        let mut slow = pmf.clone();
        for _ in 1..5 {
            slow = Pmf {
                lower: slow.lower + pmf.lower,
                probs: fft::convolve(&slow.probs, &pmf.probs),
                infinity_mass: 0.0,
            };
        }
        for (i, p) in fast.probs.iter().enumerate() {
            let k = usize::try_from(fast.lower - slow.lower).expect("window inside") + i;
            assert!((p - slow.probs[k]).abs() < 1e-14, "index {i}: {p} vs {}", slow.probs[k]);
        }
        let want_inf = 1.0 - 0.99f64.powi(5) + TAIL_MASS_TRUNCATION;
        assert!((fast.infinity_mass - want_inf).abs() < 1e-15);
    }
}
