//! Evaluation metrics, defined exactly so that numbers compare with other tools: RMSE, Recall@20 and NDCG@10.
//!
//! * **RMSE** over all test ratings, predictions clipped to the rating range seen in training.
//! * **Ranking** on the implicit view: a user's relevant items are their test items with
//!   rating ≥ the relevance threshold (every test item for implicit data); users with none
//!   are skipped. Candidates are all catalogue items minus the user's training items.
//!   Recall@20 = hits in the top 20 / min(20, n_relevant); NDCG@10 uses binary gains,
//!   discount `log2(rank + 1)` and the ideal DCG over min(10, n_relevant) items. Both are
//!   averaged over the evaluated users. Ties in score go to the lower item index.

use crate::model::RoundModel;
use crate::train::{Rating, TrainParams, UserState, reconstruct};

/// Length of the list Recall is computed on.
pub const RECALL_K: usize = 20;
/// Length of the list NDCG is computed on.
pub const NDCG_K: usize = 10;

/// Anything that can score every item for a user given the user's training interactions.
pub trait Scorer: Sync {
    /// Fills `out` (one slot per item) with scores for the user `user_idx` whose training
    /// interactions are `train`.
    fn score_all(&self, user_idx: usize, train: &[Rating], out: &mut [f32]);
    /// Whether scores are rating predictions (RMSE is reported only then).
    fn predicts_ratings(&self) -> bool;
}

/// Evaluation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalConfig {
    /// Rating range seen in training: predictions are clipped to it for RMSE.
    pub rating_range: (f32, f32),
    /// Test items rated at least this are relevant; `None`: every test item is relevant.
    pub relevance_threshold: Option<f32>,
}

/// Metrics over a set of users.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    /// RMSE over all test ratings (`None` if the scorer does not predict ratings).
    pub rmse: Option<f64>,
    /// Mean Recall@20 over evaluated users.
    pub recall_at_20: f64,
    /// Mean NDCG@10 over evaluated users.
    pub ndcg_at_10: f64,
    /// Users with at least one relevant test item.
    pub n_eval_users: usize,
    /// Test ratings RMSE was computed on.
    pub n_test_ratings: usize,
}

/// Partial sums for one user or a group of users; merged, then finished into [`Metrics`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricSums {
    sq_err: f64,
    n_ratings: usize,
    recall: f64,
    ndcg: f64,
    n_users: usize,
}

impl MetricSums {
    /// Adds another group's sums.
    pub fn merge(&mut self, o: &MetricSums) {
        self.sq_err += o.sq_err;
        self.n_ratings += o.n_ratings;
        self.recall += o.recall;
        self.ndcg += o.ndcg;
        self.n_users += o.n_users;
    }

    /// The averages.
    pub fn finish(&self, predicts_ratings: bool) -> Metrics {
        let per_user = |x: f64| if self.n_users > 0 { x / self.n_users as f64 } else { 0.0 };
        Metrics {
            rmse: (predicts_ratings && self.n_ratings > 0)
                .then(|| (self.sq_err / self.n_ratings as f64).sqrt()),
            recall_at_20: per_user(self.recall),
            ndcg_at_10: per_user(self.ndcg),
            n_eval_users: self.n_users,
            n_test_ratings: self.n_ratings,
        }
    }
}

/// Scores one user's test items given the scores of every item, adding to `sums`.
/// `scores` is modified (training items are masked out).
pub fn score_user(
    scores: &mut [f32],
    train: &[Rating],
    test: &[Rating],
    cfg: &EvalConfig,
    predicts_ratings: bool,
    sums: &mut MetricSums,
) {
    if predicts_ratings {
        let (lo, hi) = cfg.rating_range;
        for r in test {
            let p = scores[r.item as usize].clamp(lo, hi);
            sums.sq_err += f64::from(p - r.value).powi(2);
            sums.n_ratings += 1;
        }
    }
    let relevant: Vec<u32> = test
        .iter()
        .filter(|r| cfg.relevance_threshold.is_none_or(|t| r.value >= t))
        .map(|r| r.item)
        .collect();
    if relevant.is_empty() {
        return;
    }
    for r in train {
        scores[r.item as usize] = f32::NEG_INFINITY;
    }
    let top = top_k(scores, RECALL_K);
    let is_rel = |item: usize| relevant.iter().any(|&r| r as usize == item);
    let hits = top.iter().filter(|&&i| is_rel(i)).count();
    sums.recall += hits as f64 / relevant.len().min(RECALL_K) as f64;
    let dcg: f64 = top
        .iter()
        .take(NDCG_K)
        .enumerate()
        .filter(|&(_, &i)| is_rel(i))
        .map(|(rank, _)| 1.0 / (rank as f64 + 2.0).log2())
        .sum();
    let idcg: f64 = (0..relevant.len().min(NDCG_K)).map(|rank| 1.0 / (rank as f64 + 2.0).log2()).sum();
    sums.ndcg += dcg / idcg;
    sums.n_users += 1;
}

/// Indices of the `k` highest finite scores, best first; ties go to the lower index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (i, &s) in scores.iter().enumerate() {
        if !s.is_finite() || (best.len() == k && s <= best[k - 1].0) {
            continue;
        }
        let pos = best.partition_point(|&(b, _)| b >= s);
        best.insert(pos, (s, i));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// Evaluates `scorer` on users given as `(train, test)` pairs, split over `n_threads`.
pub fn evaluate<S: Scorer + ?Sized>(
    scorer: &S,
    users: &[(&[Rating], &[Rating])],
    n_items: usize,
    cfg: &EvalConfig,
    n_threads: usize,
) -> Metrics {
    let predicts = scorer.predicts_ratings();
    let chunk = users.len().div_ceil(n_threads.max(1)).max(1);
    let mut total = MetricSums::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = users
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    let mut sums = MetricSums::default();
                    let mut scores = vec![0.0f32; n_items];
                    for (k, (train, test)) in part.iter().enumerate() {
                        scorer.score_all(c * chunk + k, train, &mut scores);
                        score_user(&mut scores, train, test, cfg, predicts, &mut sums);
                    }
                    sums
                })
            })
            .collect();
        for h in handles {
            total.merge(&h.join().expect("evaluation threads do not panic"));
        }
    });
    total.finish(predicts)
}

/// Scores items the way a device does: reconstruct the user from their training
/// interactions and the model, then score every item.
#[derive(Debug)]
pub struct ReconstructionScorer<'a> {
    /// The model.
    pub model: &'a RoundModel,
    /// The device-side parameters used for reconstruction.
    pub params: TrainParams,
}

impl Scorer for ReconstructionScorer<'_> {
    fn score_all(&self, _user_idx: usize, train: &[Rating], out: &mut [f32]) {
        let user = reconstruct(self.model, train, &self.params)
            .unwrap_or(UserState { factors: vec![0.0; self.model.model.item_factors.ncols()], bias: 0.0 });
        score_items(self.model, &user, out);
    }

    fn predicts_ratings(&self) -> bool {
        matches!(self.params.objective, crate::train::Objective::Explicit)
    }
}

/// Fills `out` with the user's score for every item.
pub fn score_items(model: &RoundModel, user: &UserState, out: &mut [f32]) {
    let m = &model.model;
    let d = m.item_factors.ncols();
    let base = m.global_mean + user.bias;
    for ((o, v), b) in out.iter_mut().zip(m.factors_slice().chunks_exact(d)).zip(m.item_bias.iter()) {
        *o = base + b + crate::linalg::dot(&user.factors, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(item: u32, value: f32) -> Rating {
        Rating { item, value }
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let s = [0.5, 2.0, f32::NEG_INFINITY, 2.0, 1.0];
        assert_eq!(top_k(&s, 3), vec![1, 3, 4]);
        assert_eq!(top_k(&s, 10), vec![1, 3, 4, 0]);
    }

    #[test]
    fn metrics_match_hand_computation() {
        // 30 items; scores descend with index, so the ranking is 0, 1, 2, ...
        let n = 30;
        let cfg = EvalConfig { rating_range: (1.0, 5.0), relevance_threshold: Some(4.0) };
        let train = [r(0, 5.0)]; // item 0 masked: ranking is 1, 2, 3, ...
        let test = [r(2, 5.0), r(12, 4.0), r(25, 3.0), r(29, 4.5)];
        let mut scores: Vec<f32> = (0..n).map(|i| 10.0 - i as f32 * 0.1).collect();
        let mut sums = MetricSums::default();
        score_user(&mut scores, &train, &test, &cfg, true, &mut sums);
        let m = sums.finish(true);
        // Relevant: 2, 12, 29 (25 is rated 3). Top-20 = items 1..=20: hits 2 and 12.
        assert!((m.recall_at_20 - 2.0 / 3.0).abs() < 1e-12);
        // Ranks (1-based) of hits in the top 10: item 2 at rank 2 only.
        let dcg = 1.0 / 3f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2() + 1.0 / 4f64.log2();
        assert!((m.ndcg_at_10 - dcg / idcg).abs() < 1e-12);
        // RMSE with clipping to [1, 5]: predictions 9.8, 8.8, 7.5, 7.1 all clip to 5.
        let want = ((0.0f64 + 1.0 + 4.0 + 0.25) / 4.0).sqrt();
        assert!((m.rmse.expect("ratings") - want).abs() < 1e-6);
        assert_eq!(m.n_eval_users, 1);
    }

    #[test]
    fn users_without_relevant_items_are_skipped() {
        let cfg = EvalConfig { rating_range: (1.0, 5.0), relevance_threshold: Some(4.0) };
        let mut scores = vec![0.0; 5];
        let mut sums = MetricSums::default();
        score_user(&mut scores, &[], &[r(1, 2.0)], &cfg, true, &mut sums);
        let m = sums.finish(true);
        assert_eq!(m.n_eval_users, 0);
        assert_eq!(m.n_test_ratings, 1);
    }
}
