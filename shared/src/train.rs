//! The device's learning step: reconstruct the user vector in closed form (Federated Reconstruction), then compute the item-side gradient and the k-means statistics.
//!
//! Losses (`½` factors keep the gradients clean):
//!
//! * explicit: `½ Σᵢ (rᵢ − μ − b_u − bᵢ − u·vᵢ)² + ½ λ_u‖u‖² + ½ λ_ub b_u²
//!   + ½ λ_v Σᵢ‖vᵢ‖² + ½ λ_b Σᵢ bᵢ²` over the user's rated items `i`;
//! * implicit (iALS): `½ Σⱼ cⱼ (pⱼ − u·vⱼ)² + ½ λ_u‖u‖² + ½ λ_v Σᵢ‖vᵢ‖²` over *all*
//!   items `j`, with `pⱼ = 1, cⱼ = 1 + α rⱼ` for observed items and `pⱼ = 0, cⱼ = 1` otherwise.
//!
//! The user part is minimised exactly; by the envelope theorem the gradient of the
//! reconstructed loss with respect to the item side is its partial gradient at that minimum.

use crate::error::{ParamError, SolveError};
use crate::linalg::{NormalEquations, dot};
use crate::model::RoundModel;
use crate::update::UpdateVector;

/// One of the device's interactions: an item index and a value (a rating, or an
/// implicit-feedback strength).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rating {
    /// Item index in the global catalogue.
    pub item: u32,
    /// Rating or interaction strength.
    pub value: f32,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Squared error on explicit ratings, with global mean, user and item biases.
    Explicit,
    /// Weighted implicit-feedback objective (iALS): confidence `1 + alpha · value` on observed items.
    Implicit {
        /// Confidence slope `α`.
        alpha: f32,
    },
}

/// Hyper-parameters of the device's step. The coordinator sends them with the task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainParams {
    /// The loss.
    pub objective: Objective,
    /// Ridge on the user vector, `λ_u`: a user with `n` interactions in the solve gets
    /// `λ_u · max(n, 1)^ν` ([`TrainParams::user_ridge`]).
    pub l2_user: f32,
    /// Ridge on the user bias, `λ_ub` (explicit only).
    pub l2_user_bias: f32,
    /// L2 on the item vectors the user touched, `λ_v`.
    pub l2_item: f32,
    /// L2 on the item biases the user touched, `λ_b` (explicit only).
    pub l2_item_bias: f32,
    /// `ν` in `[0, 2]`: how the user ridge grows with the user's support (0: the same ridge
    /// for every user; 1: ALS-WR's weighted-λ regularisation, Zhou et al., "Large-scale
    /// parallel collaborative filtering for the Netflix Prize", AAIM 2008; fractional
    /// exponents as the frequency-scaled regularisation of Rendle et al., "Revisiting the
    /// performance of iALS on item recommendation benchmarks", RecSys 2022). Items need no
    /// such term: each device that touched an item adds its `λ_v`, so an item's
    /// regularisation already grows with its support.
    pub user_support_exponent: f32,
}

impl TrainParams {
    /// Checks every value is finite and in range.
    pub fn validate(&self) -> Result<(), ParamError> {
        let nonneg = |name, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(ParamError::new(name, format!("must be finite and ≥ 0, got {v}")))
            }
        };
        nonneg("l2_user", self.l2_user)?;
        nonneg("l2_user_bias", self.l2_user_bias)?;
        nonneg("l2_item", self.l2_item)?;
        nonneg("l2_item_bias", self.l2_item_bias)?;
        if let Objective::Implicit { alpha } = self.objective {
            nonneg("alpha", alpha)?;
        }
        if !(0.0..=2.0).contains(&self.user_support_exponent) {
            return Err(ParamError::new(
                "user_support_exponent",
                format!("must be in [0, 2], got {}", self.user_support_exponent),
            ));
        }
        if self.l2_user <= 0.0 {
            return Err(ParamError::new("l2_user", "must be > 0 so that reconstruction is well posed"));
        }
        Ok(())
    }

    /// The ridge on the user vector of a user with `n_interactions` in the solve:
    /// `λ_u · max(n, 1)^ν`.
    pub fn user_ridge(&self, n_interactions: usize) -> f64 {
        let support = (n_interactions.max(1) as f64).powf(f64::from(self.user_support_exponent));
        f64::from(self.l2_user) * support
    }

    fn has_bias(&self) -> bool {
        matches!(self.objective, Objective::Explicit)
    }
}

/// The device's private state, reconstructed each round and never sent as such. Its only
/// trace in an upload is the k-means statistic (the vector, scaled by the clip factor, in its
/// segment's row of the clipped update), which the coordinator sees only inside a sum under
/// secure aggregation, and only noised under differential privacy.
#[derive(Debug, Clone, PartialEq)]
pub struct UserState {
    /// User vector `u`.
    pub factors: Vec<f32>,
    /// User bias `b_u` (0 for implicit feedback).
    pub bias: f32,
}

impl UserState {
    /// Predicted score of `item` under `model`.
    #[inline]
    pub fn score(&self, model: &RoundModel, item: usize) -> f32 {
        let m = &model.model;
        m.global_mean + self.bias + m.item_bias[item] + dot(&self.factors, m.item_row(item))
    }
}

/// Why a device's interactions cannot be trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalDataError {
    /// An interaction names an item outside the model's catalogue.
    #[error("an interaction names item {item}, the catalogue has {n_items}")]
    ItemOutOfRange {
        /// The item.
        item: u32,
        /// Catalogue size.
        n_items: usize,
    },
    /// An interaction value is NaN or infinite.
    #[error("an interaction value is not finite")]
    NonFinite,
    /// An implicit-feedback strength is negative (its confidence would fall below 1).
    #[error("an implicit-feedback strength is negative")]
    NegativeStrength,
    /// An item appears twice (aggregate repeated events per item first).
    #[error("item {0} appears more than once")]
    DuplicateItem(u32),
}

/// Checks a device's interactions against a model and objective: items in range, finite
/// values, non-negative implicit strengths, each item at most once.
pub fn validate_ratings(
    ratings: &[Rating],
    n_items: usize,
    objective: &Objective,
) -> Result<(), LocalDataError> {
    for r in ratings {
        if r.item as usize >= n_items {
            return Err(LocalDataError::ItemOutOfRange { item: r.item, n_items });
        }
        if !r.value.is_finite() {
            return Err(LocalDataError::NonFinite);
        }
        if matches!(objective, Objective::Implicit { .. }) && r.value < 0.0 {
            return Err(LocalDataError::NegativeStrength);
        }
    }
    // Interactions kept in item order need no sort to show there is no repeat.
    if by_ascending_item(ratings) {
        return Ok(());
    }
    // Sorting the device's own items costs O(r log r), not a pass over the catalogue.
    let mut items: Vec<u32> = ratings.iter().map(|r| r.item).collect();
    items.sort_unstable();
    match items.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(LocalDataError::DuplicateItem(w[0])),
        None => Ok(()),
    }
}

/// Whether the items strictly ascend (so none repeats): a device that keeps its interactions
/// in item order spares the core its sorts; any order gives the same update.
fn by_ascending_item(ratings: &[Rating]) -> bool {
    ratings.windows(2).all(|w| w[0].item < w[1].item)
}

/// The interactions a round's model can see: all of them, or, in a round that trains an item
/// subset, those with items in the subset, renumbered to the subset's rows. The others stay
/// on the device unused this round (the round reconstructs the user vector from the subset:
/// the loss restricted to `S_t`).
pub fn round_ratings<'r>(model: &RoundModel, ratings: &'r [Rating]) -> std::borrow::Cow<'r, [Rating]> {
    match model.subset() {
        None => std::borrow::Cow::Borrowed(ratings),
        Some(s) => std::borrow::Cow::Owned(
            ratings
                .iter()
                .filter_map(|r| s.position(r.item).map(|k| Rating { item: k as u32, value: r.value }))
                .collect(),
        ),
    }
}

/// Reconstructs the user vector (and bias) that minimises the local loss for the current
/// item side, in closed form. `ratings` must pass [`validate_ratings`] (devices check
/// before training); values that would make the system indefinite give an error.
pub fn reconstruct(
    model: &RoundModel,
    ratings: &[Rating],
    params: &TrainParams,
) -> Result<UserState, SolveError> {
    let m = &model.model;
    let d = m.item_factors.ncols();
    let with_bias = params.has_bias();
    let mut ne = NormalEquations::with_capacity(d, with_bias, ratings.len());
    match params.objective {
        Objective::Explicit => {
            for r in ratings {
                let i = r.item as usize;
                let target = f64::from(r.value - m.global_mean - m.item_bias[i]);
                ne.add(m.item_row(i), 1.0, target);
            }
        }
        Objective::Implicit { alpha } => {
            ne.add_matrix(model.gramian());
            for r in ratings {
                let c = 1.0 + f64::from(alpha) * f64::from(r.value);
                if !(c >= 1.0 && c.is_finite()) {
                    return Err(SolveError::NotPositiveDefinite);
                }
                ne.add(m.item_row(r.item as usize), c - 1.0, c);
            }
        }
    }
    let mut ridge = vec![params.user_ridge(ratings.len()); ne.n_unknowns()];
    if with_bias {
        ridge[d] = f64::from(params.l2_user_bias).max(1e-9);
    }
    let x = ne.solve(&ridge)?;
    let factors = x[..d].iter().map(|&v| v as f32).collect();
    let bias = if with_bias { x[d] as f32 } else { 0.0 };
    Ok(UserState { factors, bias })
}

/// The device's update: the gradient of the local loss w.r.t. the item side at `user`,
/// and the k-means statistics of `user`.
///
/// The vector is dense over all items. For the implicit objective every row is non-zero
/// and stored; for the explicit one only the rated rows can be non-zero, so only they are
/// stored (see [`UpdateVector`]) — the vector, and what goes on the wire, is the same.
/// `ratings` must name each item at most once.
pub fn local_update(
    model: &RoundModel,
    ratings: &[Rating],
    user: &UserState,
    params: &TrainParams,
) -> UpdateVector {
    let m = &model.model;
    let layout = m.shape().layout();
    let d = m.item_factors.ncols();
    let u = &user.factors;
    let mut out = match params.objective {
        Objective::Explicit => {
            let sorted;
            let rated = if by_ascending_item(ratings) {
                ratings
            } else {
                let mut copy = ratings.to_vec();
                copy.sort_unstable_by_key(|r| r.item);
                copy.dedup_by_key(|r| r.item);
                sorted = copy;
                &sorted[..]
            };
            let rows: Vec<u32> = rated.iter().map(|r| r.item).collect();
            let mut out = UpdateVector::zeros_rows(layout, rows)
                .expect("rows are sorted, unique, and were checked against the catalogue");
            let (grad, grad_bias, tail) = out.parts_mut();
            let mut grad_mean = 0.0f32;
            for (k, &Rating { item, value }) in rated.iter().enumerate() {
                let i = item as usize;
                let v = m.item_row(i);
                let e = value - user.score(model, i);
                for ((g, &uk), &vk) in grad[k * d..(k + 1) * d].iter_mut().zip(u).zip(v) {
                    *g = -e * uk + params.l2_item * vk;
                }
                grad_bias[k] = -e + params.l2_item_bias * m.item_bias[i];
                grad_mean -= e;
            }
            tail[0] = grad_mean;
            out
        }
        Objective::Implicit { alpha } => {
            let mut out = UpdateVector::zeros_dense(layout);
            let (grad, _, _) = out.parts_mut();
            // Unobserved items: c = 1, p = 0 → ∂/∂vⱼ = (u·vⱼ) u.
            for (g, v) in grad.chunks_exact_mut(d).zip(m.factors_slice().chunks_exact(d)) {
                let s = dot(u, v);
                for (gk, &uk) in g.iter_mut().zip(u) {
                    *gk = s * uk;
                }
            }
            // Observed items: ∂/∂vᵢ = cᵢ (u·vᵢ − 1) u + λ_v vᵢ.
            for r in ratings {
                let i = r.item as usize;
                let v = m.item_row(i);
                let c = 1.0 + alpha * r.value;
                let s = dot(u, v);
                for ((gk, &uk), &vk) in grad[i * d..(i + 1) * d].iter_mut().zip(u).zip(v) {
                    *gk = c * (s - 1.0) * uk + params.l2_item * vk;
                }
            }
            out
        }
    };
    // k-means statistics, in the tail after the global mean.
    let (seg, _) = m.nearest_segment(u);
    let n_seg = layout.shape().n_segments;
    let (_, _, tail) = out.parts_mut();
    let (sums, counts) = tail[1..].split_at_mut(n_seg * d);
    for (s, &x) in sums[seg * d..(seg + 1) * d].iter_mut().zip(u) {
        *s += x;
    }
    counts[seg] += 1.0;
    out
}

/// The local loss at `user` (not minimised over it), for tests and diagnostics.
pub fn local_loss(model: &RoundModel, ratings: &[Rating], user: &UserState, params: &TrainParams) -> f64 {
    let m = &model.model;
    let u = &user.factors;
    let uu: f64 = u.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let mut loss = 0.5 * params.user_ridge(ratings.len()) * uu;
    match params.objective {
        Objective::Explicit => {
            loss += 0.5 * f64::from(params.l2_user_bias) * f64::from(user.bias).powi(2);
            for r in ratings {
                let i = r.item as usize;
                let e = f64::from(r.value) - f64::from(user.score(model, i));
                let vv: f64 = m.item_row(i).iter().map(|&x| f64::from(x).powi(2)).sum();
                loss += 0.5 * e * e
                    + 0.5 * f64::from(params.l2_item) * vv
                    + 0.5 * f64::from(params.l2_item_bias) * f64::from(m.item_bias[i]).powi(2);
            }
        }
        Objective::Implicit { alpha } => {
            let n = m.item_factors.nrows();
            let mut observed = vec![None; n];
            for r in ratings {
                observed[r.item as usize] = Some(r.value);
            }
            for (j, obs) in observed.iter().enumerate() {
                let s = f64::from(dot(u, m.item_row(j)));
                match obs {
                    None => loss += 0.5 * s * s,
                    Some(val) => {
                        let c = 1.0 + f64::from(alpha) * f64::from(*val);
                        let vv: f64 = m.item_row(j).iter().map(|&x| f64::from(x).powi(2)).sum();
                        loss += 0.5 * c * (1.0 - s).powi(2) + 0.5 * f64::from(params.l2_item) * vv;
                    }
                }
            }
        }
    }
    loss
}
