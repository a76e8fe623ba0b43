//! Centralized reference methods on the same data and metrics: ALS of the same model (the non-federated upper reference), a bias-only predictor and a popularity ranker.

use fedrec_shared::eval::{Metrics, ReconstructionScorer, Scorer, evaluate};
use fedrec_shared::linalg::{NormalEquations, gramian};
use fedrec_shared::train::reconstruct;
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams, danger};

use crate::federation::{RunConfig, UserData};

/// Alternating least squares of exactly the objective the federation minimises.
///
/// The user step is the devices' own reconstruction; the item step solves, per item, the
/// ridge problem with the same per-interaction item regularisation (`λ_v` once per
/// interaction of the item). The global mean is fixed at the training mean.
pub fn als(data: &UserData, cfg: &RunConfig, iterations: usize) -> anyhow::Result<RoundModel> {
    let params = cfg.train_params();
    let shape = ModelShape { n_items: data.n_items, dim: cfg.dim, n_segments: cfg.n_segments };
    let mut rng = danger::seeded_rng(cfg.seed);
    let init = ModelInit { factor_std: cfg.init_std, ..ModelInit::default() };
    let mut model = GlobalModel::init(shape, init, &mut rng)?;
    if matches!(params.objective, Objective::Explicit) {
        let (sum, n) =
            data.train.iter().flatten().fold((0.0f64, 0usize), |(s, n), r| (s + f64::from(r.value), n + 1));
        model.global_mean = (sum / n.max(1) as f64) as f32;
    }
    // Item → (user, value) lists.
    let mut by_item: Vec<Vec<(u32, f32)>> = vec![Vec::new(); data.n_items];
    for (u, rs) in data.train.iter().enumerate() {
        for r in rs {
            by_item[r.item as usize].push((u as u32, r.value));
        }
    }
    let d = cfg.dim;
    let mut rm = RoundModel::new(0, model);
    for it in 0..iterations {
        // User step: every user reconstructs, as a device would.
        let users: Vec<_> =
            data.train.iter().map(|rs| reconstruct(&rm, rs, &params)).collect::<Result<_, _>>()?;
        let mut model = rm.model.clone();
        let mut user_factors = vec![0.0f32; users.len() * d];
        for (k, u) in users.iter().enumerate() {
            user_factors[k * d..(k + 1) * d].copy_from_slice(&u.factors);
        }
        let user_gram = gramian(&user_factors, d);
        // Item step.
        for (i, list) in by_item.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let n_i = list.len() as f64;
            let (sol, has_bias) = match params.objective {
                Objective::Explicit => {
                    let mut ne = NormalEquations::new(d, true);
                    for &(u, value) in list {
                        let us = &users[u as usize];
                        ne.add(&us.factors, 1.0, f64::from(value - model.global_mean - us.bias));
                    }
                    let mut ridge = vec![f64::from(params.l2_item) * n_i; d + 1];
                    ridge[d] = (f64::from(params.l2_item_bias) * n_i).max(1e-9);
                    (ne.solve(&ridge)?, true)
                }
                Objective::Implicit { alpha } => {
                    let mut ne = NormalEquations::new(d, false);
                    ne.add_matrix(&user_gram);
                    for &(u, value) in list {
                        let c = 1.0 + f64::from(alpha) * f64::from(value);
                        ne.add(&users[u as usize].factors, c - 1.0, c);
                    }
                    let ridge = vec![(f64::from(params.l2_item) * n_i).max(1e-9); d];
                    (ne.solve(&ridge)?, false)
                }
            };
            let mut row = model.item_factors.row_mut(i);
            for k in 0..d {
                row[k] = sol[k] as f32;
            }
            if has_bias {
                model.item_bias[i] = sol[d] as f32;
            }
        }
        rm = RoundModel::new(it as u64 + 1, model);
    }
    Ok(rm)
}

/// Evaluates a model the way devices would (reconstruction from training interactions).
pub fn evaluate_model(data: &UserData, model: &RoundModel, params: TrainParams, threads: usize) -> Metrics {
    let scorer = ReconstructionScorer { model, params };
    evaluate(&scorer, &data.eval_users(), data.n_items, &data.eval, threads)
}

/// Global mean plus regularised user and item biases, fitted by alternating updates.
#[derive(Debug, Clone)]
pub struct BiasModel {
    mean: f32,
    item_bias: Vec<f32>,
    l2: f32,
}

impl BiasModel {
    /// Fits the biases with ridge `l2` (10 alternating sweeps).
    pub fn fit(data: &UserData, l2: f32) -> Self {
        let all: Vec<&Rating> = data.train.iter().flatten().collect();
        let mean = (all.iter().map(|r| f64::from(r.value)).sum::<f64>() / all.len().max(1) as f64) as f32;
        let mut item_bias = vec![0.0f32; data.n_items];
        let mut user_bias = vec![0.0f32; data.train.len()];
        for _ in 0..10 {
            for (u, rs) in data.train.iter().enumerate() {
                let s: f32 = rs.iter().map(|r| r.value - mean - item_bias[r.item as usize]).sum();
                user_bias[u] = s / (l2 + rs.len() as f32);
            }
            let mut sum = vec![0.0f32; data.n_items];
            let mut cnt = vec![0.0f32; data.n_items];
            for (u, rs) in data.train.iter().enumerate() {
                for r in rs {
                    sum[r.item as usize] += r.value - mean - user_bias[u];
                    cnt[r.item as usize] += 1.0;
                }
            }
            for i in 0..data.n_items {
                item_bias[i] = sum[i] / (l2 + cnt[i]);
            }
        }
        Self { mean, item_bias, l2 }
    }
}

impl Scorer for BiasModel {
    fn score_all(&self, _user_idx: usize, train: &[Rating], out: &mut [f32]) {
        // The user bias is re-derived from the user's training ratings, as a device would.
        let s: f32 = train.iter().map(|r| r.value - self.mean - self.item_bias[r.item as usize]).sum();
        let bu = s / (self.l2 + train.len() as f32);
        for (o, b) in out.iter_mut().zip(&self.item_bias) {
            *o = self.mean + bu + b;
        }
    }

    fn predicts_ratings(&self) -> bool {
        true
    }
}

/// Ranks items by their number of training interactions.
#[derive(Debug, Clone)]
pub struct Popularity {
    counts: Vec<f32>,
}

impl Popularity {
    /// Counts interactions per item.
    pub fn fit(data: &UserData) -> Self {
        let mut counts = vec![0.0f32; data.n_items];
        for r in data.train.iter().flatten() {
            counts[r.item as usize] += 1.0;
        }
        Self { counts }
    }
}

impl Scorer for Popularity {
    fn score_all(&self, _user_idx: usize, _train: &[Rating], out: &mut [f32]) {
        out.copy_from_slice(&self.counts);
    }

    fn predicts_ratings(&self) -> bool {
        false
    }
}
