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
        let v = match optimizer {
            ServerOptimizer::Adam { .. } => vec![0.0; n_params],
            ServerOptimizer::Sgd { .. } => Vec::new(),
        };
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
        let n = parts.first_moment.len();
        let want_v = match parts.optimizer {
            ServerOptimizer::Adam { .. } => n,
            ServerOptimizer::Sgd { .. } => 0,
        };
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
        // The optimizer state's index of gradient coordinate `j`.
        let full_index = |j: usize| -> usize {
            match items {
                None => j,
                Some(items) if j < n_rows * d => items[j / d] as usize * d + j % d,
                Some(items) if j < n_rows * d + n_rows => n_fac_full + items[j - n_rows * d] as usize,
                Some(_) => n_fac_full + n_full,
            }
        };
        if items.is_some_and(|it| it.len() != n_rows || it.iter().any(|&i| i as usize >= n_full))
            || (items.is_none() && n_rows != n_full)
        {
            // A sum that does not fit the model moves nothing (the round machine never builds one).
            return;
        }
        self.step += 1;
        let factors = model.item_factors.as_slice_mut().expect("item factors are kept in standard layout");
        let bias = model.item_bias.as_slice_mut().expect("item biases are contiguous");
        let param = |factors: &mut [f32],
                     bias: &mut [f32],
                     mean: &mut f32,
                     idx: usize,
                     f: &mut dyn FnMut(&mut f32)| {
            if idx < n_fac_full {
                f(&mut factors[idx]);
            } else if idx < n_fac_full + n_full {
                f(&mut bias[idx - n_fac_full]);
            } else {
                f(mean);
            }
        };
        let mean = &mut model.global_mean;
        match self.optimizer {
            ServerOptimizer::Sgd { lr, momentum } => {
                for (j, &g) in grad.iter().enumerate() {
                    let idx = full_index(j);
                    let mi = &mut self.m[idx];
                    *mi = momentum * *mi + g * scale;
                    let step = lr * *mi;
                    param(factors, bias, mean, idx, &mut |p| *p -= step);
                }
            }
            ServerOptimizer::Adam { lr, beta1, beta2, eps } => {
                let t = self.step as i32;
                let bc1 = 1.0 - beta1.powi(t);
                let bc2 = 1.0 - beta2.powi(t);
                let step_size = lr * bc2.sqrt() / bc1;
                for (j, &g) in grad.iter().enumerate() {
                    let idx = full_index(j);
                    let g = g * scale;
                    let mi = &mut self.m[idx];
                    let vi = &mut self.v[idx];
                    *mi = beta1 * *mi + (1.0 - beta1) * g;
                    *vi = beta2 * *vi + (1.0 - beta2) * g * g;
                    let step = step_size * *mi / (vi.sqrt() + eps);
                    param(factors, bias, mean, idx, &mut |p| *p -= step);
                }
            }
        }
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
}
