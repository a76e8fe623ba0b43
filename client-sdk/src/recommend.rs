//! Offline inference on the device: top-k recommendations, the user's segment, and explanations.
//!
//! Everything here is a pure function of the cached model, the user's local state and the
//! request: no I/O, no locks, no clock. The [`Sdk`](crate::sdk) facade holds the state and
//! calls in.
//!
//! # Scores
//!
//! * **Collaborative**: the model's prediction `μ + b_u + b_i + u·v_i` ([`UserState::score`]).
//! * **Segment** (cold start): the same with the centroid of the user's segment as `u` and no
//!   user bias. Used when the user vector is missing or all zero, or when the user has no
//!   consumed items (then the stored vector is stale: a ridge solve over nothing is zero).
//!   The segment is the nearest centroid to the user vector, or, without a vector, the
//!   centroid that predicts the consumed items highest (`argmax_s Σ_j w_j c_s·v_j`).
//! * **Popularity**: `μ + b_i` when the model has item biases. The implicit (iALS) objective
//!   trains no biases (they stay 0), so for such models the proxy is the item-factor norm
//!   `‖v_i‖`: in iALS an item's vector is pulled towards the vectors of every user who
//!   interacted with it and shrunk otherwise, so frequently consumed items get long vectors.
//! * **Hybrid**: with a [`ContentIndex`] and `content_blend = β > 0`, the user's content
//!   profile is the mean of the consumed items' TF-IDF vectors weighted by the ratings'
//!   values (negative values count 0), and an item's content score is its cosine with the
//!   profile. The two scores live on unrelated scales (a dot product of embeddings vs. a
//!   cosine in `[0, 1]`), so each is turned into a z-score over the candidate items and the
//!   result is `(1 − β)·z_cf + β·z_content`. z-scores, not rank normalisation: they are one
//!   O(n) pass (ranks need a full O(n log n) sort, which would dominate the cost for 10⁵
//!   items), they keep how much better an item is rather than only its position, and being
//!   affine they leave each ranking unchanged at β = 0 and β = 1. At β = 1 the score is the
//!   cosine itself; at β = 0 content is not computed.
//!
//! # Cost
//!
//! Top-k goes through a bounded min-heap (O(n + k log k) for the usual case, no allocation
//! per item); ties are broken by the smaller item id. A collaborative request is one pass
//! over the candidates (one `d`-dimensional dot product each). A hybrid one first computes
//! every item's content dot product tag by tag ([`ContentVectors::add_dots_to`]), then one
//! pass computes the collaborative scores into a buffer with the moments of both scores,
//! and a second pass blends and selects. Candidates are the catalogue minus a bitset of
//! excluded items, or the allow-list itself. [`recommend_with`] reuses its buffers across
//! calls.

use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use fedrec_shared::linalg::{NormalEquations, dot};
use fedrec_shared::train::reconstruct;
use fedrec_shared::{
    GlobalModel, Objective, ParamError, Rating, RoundModel, SolveError, TrainParams, UserState,
};

use crate::content::{ContentIndex, ContentVectors};

/// Default weight of content in the hybrid score (used only when a content index is given).
pub const DEFAULT_CONTENT_BLEND: f32 = 0.25;
/// How many consumed items an [`Explanation`] lists.
pub const EXPLAIN_TOP: usize = 5;

/// Options of one [`recommend`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct RecommendOptions {
    /// Leave out the items the user consumed (default `true`).
    pub exclude_consumed: bool,
    /// Recommend only among these items (`None`: the whole catalogue). The candidates are
    /// then just this list, so a short allow-list is also a fast one. Duplicates count once.
    pub include_only: Option<Vec<u32>>,
    /// Never recommend these items.
    pub exclude: Vec<u32>,
    /// Weight of content in `[0, 1]`: 0 is pure collaborative, 1 pure content.
    pub content_blend: f32,
}

impl Default for RecommendOptions {
    fn default() -> Self {
        Self {
            exclude_consumed: true,
            include_only: None,
            exclude: Vec::new(),
            content_blend: DEFAULT_CONTENT_BLEND,
        }
    }
}

/// What a recommendation's score is based on (the same for every item of one call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// The user's own vector.
    Collaborative,
    /// A blend of a collaborative (or cold-start) score with content similarity.
    Hybrid,
    /// Cold start: the centroid of the user's segment.
    Segment,
    /// Cold start without any signal: item popularity.
    Popularity,
}

/// One recommended item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recommendation {
    /// Item index in the catalogue.
    pub item: u32,
    /// Its score; higher is better. Comparable only within one call.
    pub score: f32,
    /// What the score is based on.
    pub source: Source,
}

/// The user's segment (k-means cluster of user vectors), computed on the device and never sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    /// Segment index.
    pub id: u32,
    /// Euclidean distance from the user vector to the segment's centroid.
    pub distance: f32,
}

/// Why an item scores as it does for this user.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The explained item.
    pub item: u32,
    /// The consumed items that contribute most to the collaborative score, as
    /// `(item, contribution)`, largest contribution first, at most [`EXPLAIN_TOP`].
    pub because: Vec<(u32, f32)>,
    /// The user part of the collaborative score, `u·v_i` (+ `b_u` for explicit ratings), which
    /// is exactly the sum of every consumed item's contribution.
    pub collaborative: f32,
    /// The user's segment.
    pub segment: Option<Segment>,
    /// Cosine between the item and the user's content profile, with a content index.
    pub content_similarity: Option<f32>,
    /// The consumed items that contribute most to `content_similarity` (they sum to it),
    /// largest first, at most [`EXPLAIN_TOP`].
    pub content_because: Vec<(u32, f32)>,
}

/// Why a request was refused. Messages never contain item ids or values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RecommendError {
    /// `content_blend` is NaN or outside `[0, 1]`.
    #[error("content_blend must be a number in [0, 1]")]
    InvalidBlend,
    /// An item id is outside the model's catalogue.
    #[error("an item id in `{what}` is outside the catalogue of {n_items} items")]
    ItemOutOfRange {
        /// Which argument held it.
        what: &'static str,
        /// Catalogue size.
        n_items: usize,
    },
    /// The user vector does not have the model's dimension.
    #[error("the user vector has {got} dimensions, the model has {expected}")]
    DimensionMismatch {
        /// The model's dimension.
        expected: usize,
        /// The user vector's.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("`{0}` holds a non-finite value")]
    NonFinite(&'static str),
    /// The content index was built for another catalogue size.
    #[error("the content index covers {content} items, the model {model}")]
    CatalogueMismatch {
        /// The model's catalogue size.
        model: usize,
        /// The content index's.
        content: usize,
    },
    /// The training parameters are invalid.
    #[error("invalid training parameters: {0}")]
    Params(#[from] ParamError),
    /// The user's normal equations could not be solved.
    #[error(transparent)]
    Solve(#[from] SolveError),
}

/// Buffers reused across [`recommend_with`] calls, so that a long-lived caller allocates
/// nothing in proportion to the catalogue per request once they have grown to its size.
#[derive(Debug, Default)]
pub struct Scratch {
    excluded: Vec<u64>,
    items: Vec<u32>,
    cf: Vec<f32>,
    content: Vec<f32>,
    profile: Vec<f32>,
}

impl Scratch {
    /// Overwrites every buffer with zeros (they hold which items the user consumed and
    /// personalised scores), for `forget()`.
    pub fn wipe(&mut self) {
        self.excluded.fill(0);
        self.items.fill(0);
        self.cf.fill(0.0);
        self.content.fill(0.0);
        self.profile.fill(0.0);
        std::hint::black_box(&self);
    }
}

/// The top `k` items for the user, best first (fewer if fewer candidates remain).
///
/// `user` is the reconstructed user state, `consumed` the user's interactions (the items to
/// exclude, the content profile and the cold-start signal). See the module documentation for
/// how scores and the fallbacks work.
pub fn recommend(
    model: &RoundModel,
    user: Option<&UserState>,
    consumed: &[Rating],
    content: Option<&ContentIndex>,
    k: usize,
    opts: &RecommendOptions,
) -> Result<Vec<Recommendation>, RecommendError> {
    recommend_with(&mut Scratch::default(), model, user, consumed, content, k, opts)
}

/// [`recommend`] with caller-owned buffers.
pub fn recommend_with(
    scratch: &mut Scratch,
    model: &RoundModel,
    user: Option<&UserState>,
    consumed: &[Rating],
    content: Option<&ContentIndex>,
    k: usize,
    opts: &RecommendOptions,
) -> Result<Vec<Recommendation>, RecommendError> {
    let m = &model.model;
    let n = m.item_factors.nrows();
    let blend = opts.content_blend;
    if !(0.0..=1.0).contains(&blend) {
        return Err(RecommendError::InvalidBlend);
    }
    check_request(m, user, consumed, content)?;
    check_items("include_only", opts.include_only.as_deref().unwrap_or_default(), n)?;
    check_items("exclude", &opts.exclude, n)?;
    if k == 0 {
        return Ok(Vec::new());
    }

    let Scratch { excluded, items, cf, content: ct, profile } = scratch;
    excluded.clear();
    excluded.resize(n.div_ceil(64), 0);
    if opts.exclude_consumed {
        consumed.iter().for_each(|r| set_bit(excluded, r.item));
    }
    opts.exclude.iter().for_each(|&i| set_bit(excluded, i));
    let candidates = Candidates::new(n, opts.include_only.as_deref(), excluded, items);

    let bias = bias_slice(m);
    let (base, base_source) = choose_base(model, user, consumed);
    let scorer = Scorer { d: m.item_factors.ncols(), factors: m.factors_slice(), bias: &bias, base };
    let mut top = TopK::new(k.min(n));
    let hybrid = match content {
        Some(c) if blend > 0.0 => {
            content_profile(c.vectors(), consumed, profile).map(|norm| (c.vectors(), norm))
        }
        _ => None,
    };
    let Some((vectors, norm)) = hybrid else {
        candidates.for_each(|i| top.push(i, scorer.score(i)));
        return Ok(top.into_recommendations(base_source));
    };
    // Content scores (dot products with the profile), by item.
    ct.clear();
    ct.resize(n, 0.0);
    candidates.content_dots(vectors, profile, ct);
    if blend == 1.0 {
        candidates.for_each(|i| top.push(i, ct[i as usize] / norm));
        return Ok(top.into_recommendations(Source::Hybrid));
    }

    // Pass 1: collaborative scores into the buffer, and the moments of both scores over the
    // candidates. z-scores do not depend on the scale of the content score, so it needs no
    // division by the norm.
    cf.clear();
    let (mut cf_moments, mut content_moments) = (Moments::default(), Moments::default());
    candidates.for_each(|i| {
        let (a, b) = (scorer.score(i), ct[i as usize]);
        if a.is_finite() && b.is_finite() {
            cf_moments.add(a);
            content_moments.add(b);
        }
        cf.push(a);
    });
    // Pass 2: the same candidates in the same order, scored `(1 − β)·z_cf + β·z_content`.
    let blended = Affine::blend(&cf_moments, 1.0 - blend, &content_moments, blend);
    let mut cf_scores = cf.iter().copied();
    candidates.for_each(|i| {
        let a = cf_scores.next().unwrap_or(f32::NAN);
        top.push(i, blended.apply(a, ct[i as usize]));
    });
    Ok(top.into_recommendations(Source::Hybrid))
}

/// The user's segment: the nearest centroid to the user vector and its distance. `None` if
/// the model has no segments or the vector does not have the model's dimension.
pub fn segment(model: &RoundModel, user: &UserState) -> Option<Segment> {
    let m = &model.model;
    if m.centroids.nrows() == 0 || user.factors.len() != m.centroids.ncols() {
        return None;
    }
    let (id, dist_sq) = m.nearest_segment(&user.factors);
    Some(Segment { id: u32::try_from(id).ok()?, distance: dist_sq.sqrt() })
}

/// Explains the score of `item` for this user.
///
/// The user vector is the ridge solve `x = A⁻¹ Σ_j t_j x̃_j` over the consumed items `j`
/// (see `fedrec_shared::train::reconstruct`): for explicit ratings `x̃_j = [v_j; 1]`,
/// `t_j = r_j − μ − b_j` and `A = Σ_j x̃_j x̃_jᵀ + diag(λ_u, …, λ_ub)`; for implicit feedback
/// `x̃_j = v_j`, `t_j = c_j = 1 + α r_j` and `A = VᵀV + Σ_j (c_j − 1) v_j v_jᵀ + λ_u I`. So the
/// user part of the score, `x̃_iᵀ x`, is exactly `Σ_j t_j x̃_iᵀ A⁻¹ x̃_j`: one `d × d` solve
/// for `A⁻¹ x̃_i` gives every consumed item's exact contribution. It is exact for the user
/// vector `reconstruct` gives with the same `params`; it says nothing about the item bias,
/// which is the same for every user. Contributions can be negative: the solve
/// "explains away" items that are similar to others the user consumed.
///
/// The segment is the nearest centroid to `user`, or, without a user vector, to the vector
/// reconstructed from `consumed`. The content part decomposes the cosine with the content
/// profile the same way: item `j` contributes `w_j x_j·x_i / ‖Σ_k w_k x_k‖`.
pub fn explain(
    model: &RoundModel,
    params: &TrainParams,
    user: Option<&UserState>,
    consumed: &[Rating],
    content: Option<&ContentIndex>,
    item: u32,
) -> Result<Explanation, RecommendError> {
    let m = &model.model;
    check_request(m, user, consumed, content)?;
    check_items("item", &[item], m.item_factors.nrows())?;
    params.validate()?;

    let with_bias = matches!(params.objective, Objective::Explicit);
    let mut ne = NormalEquations::with_capacity(m.item_factors.ncols(), with_bias, consumed.len() + 1);
    let mut targets = Vec::with_capacity(consumed.len());
    match params.objective {
        Objective::Explicit => {
            for r in consumed {
                ne.add(m.item_row(r.item as usize), 1.0, 0.0);
                targets.push(f64::from(r.value - m.global_mean - m.item_bias[r.item as usize]));
            }
        }
        Objective::Implicit { alpha } => {
            ne.add_matrix(model.gramian());
            for r in consumed {
                let c = 1.0 + f64::from(alpha) * f64::from(r.value);
                if !(c >= 1.0 && c.is_finite()) {
                    return Err(SolveError::NotPositiveDefinite.into());
                }
                ne.add(m.item_row(r.item as usize), c - 1.0, 0.0);
                targets.push(c);
            }
        }
    }
    // The right-hand side is x̃_i (weight 0 in A), so the solve gives y = A⁻¹ x̃_i.
    ne.add(m.item_row(item as usize), 0.0, 1.0);
    let mut ridge = vec![params.user_ridge(consumed.len()); ne.n_unknowns()];
    if with_bias {
        // As in `reconstruct`, so that the decomposition is of the same solve.
        ridge[m.item_factors.ncols()] = f64::from(params.l2_user_bias).max(1e-9);
    }
    let y = ne.solve(&ridge)?;
    let mut because: Vec<(u32, f32)> = consumed
        .iter()
        .zip(&targets)
        .map(|(r, t)| {
            let v = m.item_row(r.item as usize);
            let yv: f64 = y.iter().zip(v).map(|(a, &b)| a * f64::from(b)).sum();
            let bias_term = if with_bias { y[v.len()] } else { 0.0 };
            (r.item, (t * (yv + bias_term)) as f32)
        })
        .collect();
    let collaborative = because.iter().map(|&(_, c)| f64::from(c)).sum::<f64>() as f32;
    top_contributions(&mut because);

    let segment = match user {
        Some(u) => segment(model, u),
        None if !consumed.is_empty() => segment(model, &reconstruct(model, consumed, params)?),
        None => None,
    };

    let (content_similarity, content_because) = match content {
        Some(c) => {
            let vectors = c.vectors();
            let mut profile = Vec::new();
            match content_profile(vectors, consumed, &mut profile) {
                Some(norm) => {
                    let mut parts: Vec<(u32, f32)> = consumed
                        .iter()
                        .map(|r| {
                            let w = r.value.max(0.0);
                            (r.item, w * vectors.cosine(r.item as usize, item as usize) / norm)
                        })
                        .collect();
                    let total = parts.iter().map(|&(_, c)| c).sum::<f32>();
                    top_contributions(&mut parts);
                    (Some(total), parts)
                }
                None => (Some(0.0), Vec::new()),
            }
        }
        None => (None, Vec::new()),
    };
    Ok(Explanation { item, because, collaborative, segment, content_similarity, content_because })
}

/// Sorts contributions largest first (ties by item id) and keeps [`EXPLAIN_TOP`].
fn top_contributions(parts: &mut Vec<(u32, f32)>) {
    parts.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    parts.truncate(EXPLAIN_TOP);
}

/// Checks what `recommend` and `explain` share: ratings, user vector and content index
/// against the model.
fn check_request(
    m: &GlobalModel,
    user: Option<&UserState>,
    consumed: &[Rating],
    content: Option<&ContentIndex>,
) -> Result<(), RecommendError> {
    let n = m.item_factors.nrows();
    if consumed.iter().any(|r| r.item as usize >= n) {
        return Err(RecommendError::ItemOutOfRange { what: "consumed", n_items: n });
    }
    if !consumed.iter().all(|r| r.value.is_finite()) {
        return Err(RecommendError::NonFinite("consumed"));
    }
    if let Some(u) = user {
        if u.factors.len() != m.item_factors.ncols() {
            return Err(RecommendError::DimensionMismatch {
                expected: m.item_factors.ncols(),
                got: u.factors.len(),
            });
        }
        if !(u.bias.is_finite() && u.factors.iter().all(|x| x.is_finite())) {
            return Err(RecommendError::NonFinite("user"));
        }
    }
    match content {
        Some(c) if c.n_items() != n => {
            Err(RecommendError::CatalogueMismatch { model: n, content: c.n_items() })
        }
        _ => Ok(()),
    }
}

fn check_items(what: &'static str, items: &[u32], n_items: usize) -> Result<(), RecommendError> {
    match items.iter().any(|&i| i as usize >= n_items) {
        true => Err(RecommendError::ItemOutOfRange { what, n_items }),
        false => Ok(()),
    }
}

/// The item biases as a slice (copied only if the array is not contiguous).
fn bias_slice(m: &GlobalModel) -> Cow<'_, [f32]> {
    m.item_bias.as_slice().map_or_else(|| Cow::Owned(m.item_bias.to_vec()), Cow::Borrowed)
}

/// What the collaborative part of a score is computed from.
enum Base<'a> {
    /// `offset + b_i + u·v_i`.
    Vector { u: &'a [f32], offset: f32 },
    /// `μ + b_i`.
    Bias { mean: f32 },
    /// `‖v_i‖`, for models without biases.
    Norm,
}

fn choose_base<'a>(
    model: &'a RoundModel,
    user: Option<&'a UserState>,
    consumed: &[Rating],
) -> (Base<'a>, Source) {
    let m = &model.model;
    let user = user.filter(|u| u.factors.iter().any(|&x| x != 0.0));
    if let (Some(u), false) = (user, consumed.is_empty()) {
        return (Base::Vector { u: &u.factors, offset: m.global_mean + u.bias }, Source::Collaborative);
    }
    let seg = match user {
        Some(u) => segment(model, u).map(|s| s.id as usize),
        None => segment_of_consumed(m, consumed),
    };
    if let Some(s) = seg {
        let d = m.centroids.ncols();
        let centroid = &m.centroids_slice()[s * d..(s + 1) * d];
        return (Base::Vector { u: centroid, offset: m.global_mean }, Source::Segment);
    }
    if m.item_bias.iter().any(|&b| b != 0.0) {
        (Base::Bias { mean: m.global_mean }, Source::Popularity)
    } else {
        (Base::Norm, Source::Popularity)
    }
}

/// The segment whose centroid, taken as a user vector, predicts the consumed items highest
/// (weighted by their values): `argmax_s c_s · Σ_j w_j v_j`. `None` without positive weight.
fn segment_of_consumed(m: &GlobalModel, consumed: &[Rating]) -> Option<usize> {
    let d = m.item_factors.ncols();
    let mut sum = vec![0.0f32; d];
    let mut total = 0.0f32;
    for r in consumed {
        let w = r.value.max(0.0);
        total += w;
        for (s, &v) in sum.iter_mut().zip(m.item_row(r.item as usize)) {
            *s += w * v;
        }
    }
    if total <= 0.0 || m.centroids.nrows() == 0 {
        return None;
    }
    let mut best: Option<(usize, f32)> = None;
    for (s, c) in m.centroids_slice().chunks_exact(d).enumerate() {
        let score = dot(c, &sum);
        if score.is_finite() && best.is_none_or(|(_, b)| score > b) {
            best = Some((s, score));
        }
    }
    best.map(|(s, _)| s)
}

struct Scorer<'a> {
    d: usize,
    factors: &'a [f32],
    bias: &'a [f32],
    base: Base<'a>,
}

impl Scorer<'_> {
    #[inline]
    fn score(&self, item: u32) -> f32 {
        let i = item as usize;
        let v = &self.factors[i * self.d..(i + 1) * self.d];
        match self.base {
            Base::Vector { u, offset } => offset + self.bias[i] + dot(u, v),
            Base::Bias { mean } => mean + self.bias[i],
            Base::Norm => dot(v, v).sqrt(),
        }
    }
}

/// The user's content profile `Σ_j w_j x_j` (dense over the vocabulary) into `profile`, and
/// its norm; `None` if it is zero (no consumed item with tags and positive weight).
fn content_profile(vectors: &ContentVectors, consumed: &[Rating], profile: &mut Vec<f32>) -> Option<f32> {
    profile.clear();
    for r in consumed {
        let w = r.value.max(0.0);
        for &(t, x) in vectors.row(r.item as usize) {
            let t = t as usize;
            if profile.len() <= t {
                profile.resize(t + 1, 0.0);
            }
            profile[t] += w * x;
        }
    }
    let norm = profile.iter().map(|p| p * p).sum::<f32>().sqrt();
    (norm > 0.0 && norm.is_finite()).then_some(norm)
}

#[inline]
fn set_bit(bits: &mut [u64], i: u32) {
    bits[i as usize / 64] |= 1 << (i % 64);
}

#[inline]
fn bit(bits: &[u64], i: u32) -> bool {
    bits[i as usize / 64] >> (i % 64) & 1 == 1
}

/// The items a request ranks: the whole catalogue minus the excluded ones, or the allow-list
/// minus them (each item once).
enum Candidates<'a> {
    All { n: u32, excluded: &'a [u64] },
    List(&'a [u32]),
}

impl<'a> Candidates<'a> {
    fn new(n: usize, include: Option<&[u32]>, excluded: &'a mut [u64], list: &'a mut Vec<u32>) -> Self {
        match include {
            // Catalogues are indexed by `u32` (items are checked against `n` before this).
            None => Candidates::All { n: u32::try_from(n).unwrap_or(u32::MAX), excluded },
            Some(include) => {
                list.clear();
                for &i in include {
                    if !bit(excluded, i) {
                        set_bit(excluded, i);
                        list.push(i);
                    }
                }
                Candidates::List(list)
            }
        }
    }

    /// Writes each candidate's content dot product with `profile` to `out[item]`: by tag for the
    /// whole catalogue, by item for an allow-list.
    fn content_dots(&self, vectors: &ContentVectors, profile: &[f32], out: &mut [f32]) {
        match *self {
            Candidates::All { .. } => vectors.add_dots_to(profile, out),
            Candidates::List(list) => {
                list.iter().for_each(|&i| out[i as usize] = vectors.dot_dense(i as usize, profile))
            }
        }
    }

    #[inline]
    fn for_each(&self, mut f: impl FnMut(u32)) {
        match *self {
            Candidates::All { n, excluded } => (0..n).filter(|&i| !bit(excluded, i)).for_each(f),
            Candidates::List(list) => list.iter().for_each(|&i| f(i)),
        }
    }
}

/// Running count, sum and sum of squares, in `f64`.
#[derive(Default)]
struct Moments {
    n: f64,
    sum: f64,
    sum_sq: f64,
}

impl Moments {
    #[inline]
    fn add(&mut self, x: f32) {
        let x = f64::from(x);
        self.n += 1.0;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Mean and `1 / standard deviation`; the latter is 0 if the values do not vary.
    fn mean_inv_std(&self) -> (f64, f64) {
        let n = self.n.max(1.0);
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        (mean, if var > 0.0 && var.is_finite() { 1.0 / var.sqrt() } else { 0.0 })
    }
}

/// `(a, b) ↦ wa·a + wb·b + c`.
struct Affine {
    wa: f32,
    wb: f32,
    c: f32,
}

impl Affine {
    /// `(a, b) ↦ β_a·z_a(a) + β_b·z_b(b)` for the z-scores of the two moment sets.
    fn blend(a: &Moments, beta_a: f32, b: &Moments, beta_b: f32) -> Self {
        let ((mean_a, inv_a), (mean_b, inv_b)) = (a.mean_inv_std(), b.mean_inv_std());
        let (wa, wb) = (f64::from(beta_a) * inv_a, f64::from(beta_b) * inv_b);
        Self { wa: wa as f32, wb: wb as f32, c: (-wa * mean_a - wb * mean_b) as f32 }
    }

    #[inline]
    fn apply(&self, a: f32, b: f32) -> f32 {
        self.wa * a + self.wb * b + self.c
    }
}

/// A candidate; the greater one is better (higher score, then smaller item id).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    item: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then(other.item.cmp(&self.item))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}

/// The best `k` candidates seen, in a min-heap whose root is the worst of them.
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Candidate>>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, heap: BinaryHeap::with_capacity(k) }
    }

    #[inline]
    fn push(&mut self, item: u32, score: f32) {
        if !score.is_finite() {
            return;
        }
        let c = Candidate { score, item };
        if self.heap.len() < self.k {
            self.heap.push(Reverse(c));
        } else {
            match self.heap.peek_mut() {
                Some(mut worst) if c > worst.0 => *worst = Reverse(c),
                _ => {}
            }
        }
    }

    fn into_recommendations(self, source: Source) -> Vec<Recommendation> {
        // Ascending in `Reverse` order is best first.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(c)| Recommendation { item: c.item, score: c.score, source })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use fedrec_shared::{GlobalModel, ModelShape};

    use super::*;

    #[test]
    fn wiping_the_scratch_leaves_only_zeros() {
        let shape = ModelShape { n_items: 6, dim: 2, n_segments: 1 };
        let factors = (0..12).map(|i| i as f32 / 10.0 - 0.5).collect();
        let model = GlobalModel::from_flat(shape, factors, vec![0.1; 6], 0.0, vec![0.3, -0.2])
            .expect("a valid model");
        let model = RoundModel::new(1, model);
        let user = UserState { factors: vec![0.4, -0.7], bias: 0.0 };
        let consumed = [Rating { item: 1, value: 1.0 }, Rating { item: 4, value: 2.0 }];
        let mut scratch = Scratch::default();
        recommend_with(&mut scratch, &model, Some(&user), &consumed, None, 3, &RecommendOptions::default())
            .expect("recommends");
        assert!(scratch.excluded.iter().any(|&w| w != 0), "the consumed items are marked");
        scratch.wipe();
        assert!(scratch.excluded.iter().all(|&w| w == 0) && scratch.items.iter().all(|&i| i == 0));
        assert!(scratch.cf.iter().chain(&scratch.content).chain(&scratch.profile).all(|&x| x == 0.0));
    }
}
