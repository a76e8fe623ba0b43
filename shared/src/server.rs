//! The coordinator's learning step: turn a noised sum into a new model (server optimizer on the item side, federated k-means on the centroids).

use crate::aggregate::NoisedSum;
use crate::error::ParamError;
use crate::model::GlobalModel;

/// The server optimizer applied to the averaged item-side gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptimizer {
    /// SGD with heavy-ball momentum.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum coefficient in `[0, 1)`.
        momentum: f32,
    },
    /// Adam (Kingma & Ba), with bias correction.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator guard.
        eps: f32,
    },
}

impl ServerOptimizer {
    /// Adam with the usual decays and the given learning rate.
    pub fn adam(lr: f32) -> Self {
        ServerOptimizer::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }

    /// Length of the second moment for `n_params` parameters: Adam keeps one per parameter,
    /// SGD none.
    fn second_moment_len(&self, n_params: usize) -> usize {
        match self {
            ServerOptimizer::Adam { .. } => n_params,
            ServerOptimizer::Sgd { .. } => 0,
        }
    }

    /// Checks every value is finite and in range.
    pub fn validate(&self) -> Result<(), ParamError> {
        let lr = match *self {
            ServerOptimizer::Sgd { lr, momentum } => {
                if !(0.0..1.0).contains(&momentum) {
                    return Err(ParamError::new("momentum", "must be in [0, 1)"));
                }
                lr
            }
            ServerOptimizer::Adam { lr, beta1, beta2, eps } => {
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return Err(ParamError::new("beta", "Adam decays must be in [0, 1)"));
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(ParamError::new("eps", "must be finite and > 0"));
                }
                lr
            }
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(ParamError::new("server_lr", format!("must be finite and > 0, got {lr}")));
        }
        Ok(())
    }
}

/// How the k-means centroids are updated from the noised statistics.
///
/// Each round sees a sample of users, so the update is mini-batch k-means (Sculley 2010):
/// a centroid moves toward the round's mean of its members by `n_j / mass_j`, where the
/// mass is an exponentially decayed count of the users it has absorbed (decay `memory`),
/// so old rounds — whose user vectors came from an older item model — fade out.
/// A segment whose mass falls below `starve_fraction` of the average takes over half of
/// the heaviest segment (split along a fixed direction), so that no segment stays empty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CentroidPolicy {
    /// A segment whose (noised) count this round is below this does not move: empty
    /// segments, and segments too small for their noised mean to mean anything.
    pub min_count: f32,
    /// With noise, the count must also exceed this many noise standard deviations.
    pub noise_multiple: f32,
    /// Decay of the per-segment mass per round, in `[0, 1)`.
    pub memory: f32,
    /// Relative mass below which a segment is re-seeded by splitting the heaviest one.
    pub starve_fraction: f32,
}

impl CentroidPolicy {
    /// The policy used by default: no movement on fewer than `min_count` members (nor on
    /// fewer than three noise standard deviations), a memory of about ten rounds, re-seeding
    /// below 5% of the average mass.
    pub fn with_min_count(min_count: f32) -> Self {
        Self { min_count, noise_multiple: 3.0, memory: 0.9, starve_fraction: 0.05 }
    }
}

/// A [`ServerState`] taken apart, for storage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerStateParts<'a> {
    /// The optimizer and its hyper-parameters.
    pub optimizer: ServerOptimizer,
    /// Momentum (SGD) or first moment (Adam), one per trainable parameter.
    pub first_moment: &'a [f32],
    /// Adam's second moment (empty for SGD).
    pub second_moment: &'a [f32],
    /// Optimizer steps taken.
    pub step: u64,
    /// Decayed member count of each centroid.
    pub centroid_mass: &'a [f32],
}

/// Optimizer state the coordinator carries from round to round.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    optimizer: ServerOptimizer,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
    /// Decayed number of users each centroid has absorbed.
    centroid_mass: Vec<f32>,
}

impl ServerState {
    /// Fresh state for a model whose trainable part has `n_params` values.
    pub fn new(optimizer: ServerOptimizer, n_params: usize) -> Self {
        let v = vec![0.0; optimizer.second_moment_len(n_params)];
        Self { optimizer, m: vec![0.0; n_params], v, step: 0, centroid_mass: Vec::new() }
    }

    /// The state's parts, for persistence.
    pub fn parts(&self) -> ServerStateParts<'_> {
        ServerStateParts {
            optimizer: self.optimizer,
            first_moment: &self.m,
            second_moment: &self.v,
            step: self.step,
            centroid_mass: &self.centroid_mass,
        }
    }

    /// Rebuilds a state from persisted parts, checking that they fit together: finite
    /// values, a second moment exactly when the optimizer is Adam, of the same length as the
    /// first, and non-negative masses.
    pub fn from_parts(parts: ServerStateParts<'_>) -> Result<Self, ParamError> {
        parts.optimizer.validate()?;
        let want_v = parts.optimizer.second_moment_len(parts.first_moment.len());
        if parts.second_moment.len() != want_v {
            return Err(ParamError::new("server_state", "second moment does not match the optimizer"));
        }
        let finite = |x: &[f32]| x.iter().all(|v| v.is_finite());
        if !finite(parts.first_moment) || !finite(parts.second_moment) || !finite(parts.centroid_mass) {
            return Err(ParamError::new("server_state", "non-finite optimizer state"));
        }
        if parts.second_moment.iter().chain(parts.centroid_mass).any(|&v| v < 0.0) {
            return Err(ParamError::new("server_state", "negative second moment or centroid mass"));
        }
        Ok(Self {
            optimizer: parts.optimizer,
            m: parts.first_moment.to_vec(),
            v: parts.second_moment.to_vec(),
            step: parts.step,
            centroid_mass: parts.centroid_mass.to_vec(),
        })
    }

    /// Number of optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Switches to `optimizer` (a restarted coordinator's configuration wins over the saved
    /// one). Moments carry over when the kind of optimizer is the same, else start afresh.
    pub fn set_optimizer(&mut self, optimizer: ServerOptimizer) {
        let same_kind = std::mem::discriminant(&optimizer) == std::mem::discriminant(&self.optimizer);
        if !same_kind {
            *self = Self {
                centroid_mass: std::mem::take(&mut self.centroid_mass),
                ..Self::new(optimizer, self.m.len())
            };
        }
        self.optimizer = optimizer;
    }

    /// Number of trainable parameters the state is for.
    pub fn n_params(&self) -> usize {
        self.m.len()
    }

    /// Applies one round: the item side takes an optimizer step along
    /// `noised.trainable / denominator`; centroids move to the noised means.
    ///
    /// `denominator` is the public expected cohort `q · population` under Poisson sampling
    /// (so that the sensitivity of the average is `C / denominator`, and the noise scale of
    /// the step, `σ C / denominator`, is the same whoever took part), or the number of reports
    /// of a round without noise.
    pub fn apply(
        &mut self,
        model: &mut GlobalModel,
        noised: &NoisedSum,
        denominator: f64,
        centroids: &CentroidPolicy,
    ) {
        self.apply_rows(model, noised, denominator, centroids, None);
    }

    /// [`ServerState::apply`] for a round that trained the item subset `items` (ascending):
    /// `noised` is laid out over those items only, and only their rows (their factors,
    /// biases and optimizer moments) and the global mean move; every other item keeps its
    /// parameters and moments (lazy updates). `None` is every item.
    pub fn apply_rows(
        &mut self,
        model: &mut GlobalModel,
        noised: &NoisedSum,
        denominator: f64,
        centroids: &CentroidPolicy,
        items: Option<&[u32]>,
    ) {
        let layout = *noised.layout();
        let sum = noised.as_slice();
        let scale = (1.0 / denominator.max(1.0)) as f32;
        let grad = &sum[layout.trainable()];
        let d = layout.shape().dim;
        let n_rows = layout.shape().n_items;
        let n_full = model.item_factors.nrows();
        let n_fac_full = n_full * d;
        if items.is_some_and(|it| it.len() != n_rows || it.iter().any(|&i| i as usize >= n_full))
            || (items.is_none() && n_rows != n_full)
            || self.m.len() != n_fac_full + n_full + 1
            || self.v.len() != self.optimizer.second_moment_len(self.m.len())
        {
            // A sum that does not fit the model or the state moves nothing (the round machine
            // never builds one).
            return;
        }
        self.step += 1;
        let opt = OptimizerStep::new(self.optimizer, self.step, scale);
        let factors = model.item_factors.as_slice_mut().expect("item factors are kept in standard layout");
        let bias = model.item_bias.as_slice_mut().expect("item biases are contiguous");
        let mean = std::slice::from_mut(&mut model.global_mean);
        // The state's moments in the parameters' order: factors, biases, the global mean.
        let (m_fac, m_rest) = self.m.split_at_mut(n_fac_full);
        let (m_bias, m_mean) = m_rest.split_at_mut(n_full);
        let (v_fac, v_bias, v_mean) = if self.v.is_empty() {
            (&mut [][..], &mut [][..], &mut [][..])
        } else {
            let (v_fac, v_rest) = self.v.split_at_mut(n_fac_full);
            let (v_bias, v_mean) = v_rest.split_at_mut(n_full);
            (v_fac, v_bias, v_mean)
        };
        let (g_fac, g_rest) = grad.split_at(n_rows * d);
        let (g_bias, g_mean) = g_rest.split_at(n_rows);
        match items {
            None => {
                opt.apply(g_fac, m_fac, v_fac, factors);
                opt.apply(g_bias, m_bias, v_bias, bias);
            }
            Some(items) => {
                // Only the subset's rows move; the other items keep their moments (lazy).
                let sub = |x: &[f32], i: usize, w: usize| -> std::ops::Range<usize> {
                    if x.is_empty() { 0..0 } else { i * w..(i + 1) * w }
                };
                for (r, &item) in items.iter().enumerate() {
                    let i = item as usize;
                    let (rf, rv) = (sub(m_fac, i, d), sub(v_fac, i, d));
                    opt.apply(
                        &g_fac[r * d..(r + 1) * d],
                        &mut m_fac[rf],
                        &mut v_fac[rv],
                        &mut factors[i * d..(i + 1) * d],
                    );
                    let (bf, bv) = (sub(m_bias, i, 1), sub(v_bias, i, 1));
                    opt.apply(&g_bias[r..r + 1], &mut m_bias[bf], &mut v_bias[bv], &mut bias[i..i + 1]);
                }
            }
        }
        opt.apply(g_mean, m_mean, v_mean, mean);
        let d = layout.shape().dim;
        let k = layout.shape().n_segments;
        let sums = &sum[layout.centroid_sums()];
        let counts = &sum[layout.centroid_counts()];
        let cents = model.centroids.as_slice_mut().expect("centroids are kept in standard layout");
        let min_count = centroids.min_count.max(centroids.noise_multiple * noised.noise_std());
        let policy = CentroidPolicy { min_count, ..*centroids };
        update_centroids(cents, &mut self.centroid_mass, sums, counts, d, k, &policy);
    }
}

/// One server-optimizer step, with its per-step constants computed once.
#[derive(Clone, Copy)]
enum OptimizerStep {
    Sgd { lr: f32, momentum: f32, scale: f32 },
    Adam { beta1: f32, beta2: f32, eps: f32, step_size: f32, scale: f32 },
}

impl OptimizerStep {
    /// The step numbered `step` (from 1) on gradient sums scaled by `scale`.
    fn new(optimizer: ServerOptimizer, step: u64, scale: f32) -> Self {
        match optimizer {
            ServerOptimizer::Sgd { lr, momentum } => Self::Sgd { lr, momentum, scale },
            ServerOptimizer::Adam { lr, beta1, beta2, eps } => {
                let t = i32::try_from(step).unwrap_or(i32::MAX);
                let bc1 = 1.0 - beta1.powi(t);
                let bc2 = 1.0 - beta2.powi(t);
                Self::Adam { beta1, beta2, eps, step_size: lr * bc2.sqrt() / bc1, scale }
            }
        }
    }

    /// Applies the step to a block of parameters `p` with gradient sums `g` and moments `m`
    /// (and, for Adam, `v`), all of one length; element by element, so any partition of the
    /// parameters into blocks gives the same result.
    fn apply(self, g: &[f32], m: &mut [f32], v: &mut [f32], p: &mut [f32]) {
        match self {
            Self::Sgd { lr, momentum, scale } => {
                for ((&g, mi), p) in g.iter().zip(m.iter_mut()).zip(p.iter_mut()) {
                    *mi = momentum * *mi + g * scale;
                    *p -= lr * *mi;
                }
            }
            Self::Adam { beta1, beta2, eps, step_size, scale } => {
                for (((&g, mi), vi), p) in g.iter().zip(m.iter_mut()).zip(v.iter_mut()).zip(p.iter_mut()) {
                    let g = g * scale;
                    *mi = beta1 * *mi + (1.0 - beta1) * g;
                    *vi = beta2 * *vi + (1.0 - beta2) * g * g;
                    *p -= step_size * *mi / (vi.sqrt() + eps);
                }
            }
        }
    }
}

fn update_centroids(
    cents: &mut [f32],
    mass: &mut Vec<f32>,
    sums: &[f32],
    counts: &[f32],
    d: usize,
    k: usize,
    policy: &CentroidPolicy,
) {
    mass.resize(k, 0.0);
    for j in 0..k {
        mass[j] *= policy.memory;
        let n = counts[j];
        if n >= policy.min_count.max(f32::MIN_POSITIVE) && n.is_finite() {
            mass[j] += n;
            let eta = n / mass[j];
            for (c, &s) in cents[j * d..(j + 1) * d].iter_mut().zip(&sums[j * d..(j + 1) * d]) {
                *c += eta * (s / n - *c);
            }
        }
    }
    let avg = mass.iter().sum::<f32>() / k as f32;
    if avg <= 0.0 {
        return;
    }
    for j in 0..k {
        if mass[j] >= policy.starve_fraction * avg {
            continue;
        }
        let big = (0..k).max_by(|&a, &b| mass[a].total_cmp(&mass[b])).unwrap_or(j);
        if big == j {
            continue;
        }
        // Split the heaviest centroid in two along a fixed ± pattern.
        let norm = cents[big * d..(big + 1) * d].iter().map(|x| x * x).sum::<f32>().sqrt();
        let delta = 0.05 * norm.max(1e-3) / (d as f32).sqrt();
        for t in 0..d {
            let sign = if t % 2 == 0 { 1.0 } else { -1.0 };
            let c = cents[big * d + t];
            cents[j * d + t] = c + sign * delta;
            cents[big * d + t] = c - sign * delta;
        }
        mass[big] /= 2.0;
        mass[j] = mass[big];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_are_checked() {
        let mut st = ServerState::new(ServerOptimizer::adam(0.1), 3);
        st.m = vec![0.1, -0.2, 0.3];
        st.v = vec![0.01, 0.02, 0.03];
        st.step = 7;
        st.centroid_mass = vec![1.0, 2.0];
        let back = ServerState::from_parts(st.parts()).expect("consistent parts");
        assert_eq!(back, st);
        let mut bad = st.parts();
        bad.second_moment = &[0.1];
        assert!(ServerState::from_parts(bad).is_err(), "length mismatch");
        let mut bad = st.parts();
        bad.first_moment = &[f32::NAN, 0.0, 0.0];
        assert!(ServerState::from_parts(bad).is_err(), "non-finite");
        let mut bad = st.parts();
        bad.optimizer = ServerOptimizer::Sgd { lr: 0.1, momentum: 0.9 };
        assert!(ServerState::from_parts(bad).is_err(), "SGD has no second moment");
    }

    /// The step each parameter should take, written out coordinate by coordinate: `j` is the
    /// coordinate of the sum, `idx` the parameter's index in the full model's order.
    fn reference(
        st: &mut ServerState,
        model: &mut GlobalModel,
        sum: &[f32],
        scale: f32,
        items: Option<&[u32]>,
    ) {
        let d = model.item_factors.ncols();
        let n_full = model.item_factors.nrows();
        let n_rows = items.map_or(n_full, <[u32]>::len);
        st.step += 1;
        for (j, &g) in sum[..n_rows * d + n_rows + 1].iter().enumerate() {
            let idx = match items {
                None => j,
                Some(it) if j < n_rows * d => it[j / d] as usize * d + j % d,
                Some(it) if j < n_rows * d + n_rows => n_full * d + it[j - n_rows * d] as usize,
                Some(_) => n_full * d + n_full,
            };
            let step = match st.optimizer {
                ServerOptimizer::Sgd { lr, momentum } => {
                    st.m[idx] = momentum * st.m[idx] + g * scale;
                    lr * st.m[idx]
                }
                ServerOptimizer::Adam { lr, beta1, beta2, eps } => {
                    let t = st.step as i32;
                    let size = lr * (1.0 - beta2.powi(t)).sqrt() / (1.0 - beta1.powi(t));
                    let g = g * scale;
                    st.m[idx] = beta1 * st.m[idx] + (1.0 - beta1) * g;
                    st.v[idx] = beta2 * st.v[idx] + (1.0 - beta2) * g * g;
                    size * st.m[idx] / (st.v[idx].sqrt() + eps)
                }
            };
            let p = if idx < n_full * d {
                &mut model.item_factors.as_slice_mut().expect("standard layout")[idx]
            } else if idx < n_full * d + n_full {
                &mut model.item_bias[idx - n_full * d]
            } else {
                &mut model.global_mean
            };
            *p -= step;
        }
    }

    #[test]
    fn every_parameter_takes_its_optimizer_step_and_a_subset_moves_only_its_rows() {
        use crate::model::{ModelInit, ModelShape};
        let full = ModelShape { n_items: 7, dim: 3, n_segments: 2 };
        let mut rng = crate::danger::seeded_rng(5);
        let model0 = GlobalModel::init(full, ModelInit::default(), &mut rng).expect("valid shape");
        let n_params = full.layout().trainable().len();
        let policy = CentroidPolicy::with_min_count(1.0);
        let subset: &[u32] = &[1, 4, 6];
        for optimizer in [ServerOptimizer::adam(0.05), ServerOptimizer::Sgd { lr: 0.3, momentum: 0.9 }] {
            for items in [None, Some(subset)] {
                let shape = ModelShape { n_items: items.map_or(full.n_items, <[u32]>::len), ..full };
                let (mut got, mut want) = (model0.clone(), model0.clone());
                let mut st_got = ServerState::new(optimizer, n_params);
                let mut st_want = st_got.clone();
                for round in 0..3u8 {
                    let sum: Vec<f32> = (0..shape.layout().len())
                        .map(|j| ((j * 37 + usize::from(round) * 11) % 23) as f32 / 7.0 - 1.5)
                        .collect();
                    let noised = NoisedSum::from_distributed(shape.layout(), sum.clone(), 4, 0.0);
                    st_got.apply_rows(&mut got, &noised, 4.0, &policy, items);
                    reference(&mut st_want, &mut want, &sum, 0.25, items);
                }
                let what = format!("{optimizer:?} over {items:?}");
                assert_eq!(got.item_factors, want.item_factors, "{what}");
                assert_eq!(got.item_bias, want.item_bias, "{what}");
                assert_eq!(got.global_mean.to_bits(), want.global_mean.to_bits(), "{what}");
                assert_eq!(
                    (&st_got.m, &st_got.v, st_got.step),
                    (&st_want.m, &st_want.v, st_want.step),
                    "{what}"
                );
                if let Some(items) = items {
                    for i in (0..full.n_items).filter(|i| !items.contains(&(*i as u32))) {
                        assert_eq!(got.item_factors.row(i), model0.item_factors.row(i), "row {i} moved");
                        assert!(
                            st_got.m[i * 3..(i + 1) * 3].iter().all(|&m| m == 0.0),
                            "row {i}'s moment moved"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_state_for_another_model_moves_nothing() {
        use crate::model::{ModelInit, ModelShape};
        let shape = ModelShape { n_items: 4, dim: 2, n_segments: 1 };
        let model0 = GlobalModel::init(shape, ModelInit::default(), &mut crate::danger::seeded_rng(1))
            .expect("valid shape");
        let noised = NoisedSum::from_distributed(shape.layout(), vec![1.0; shape.layout().len()], 1, 0.0);
        let mut st = ServerState::new(ServerOptimizer::adam(0.1), 5);
        let mut model = model0.clone();
        st.apply_rows(&mut model, &noised, 1.0, &CentroidPolicy::with_min_count(1.0), None);
        assert_eq!((model, st.step()), (model0, 0));
    }
}
