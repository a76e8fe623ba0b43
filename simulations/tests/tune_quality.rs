//! `fedrec_sim::tune` as a library (issue 14): tuning under distributed noise calibrates
//! with the model's size.

use std::time::Duration;

use fedrec_sim::data::{DataSource, SplitKind, SyntheticParams};
use fedrec_sim::federation::{AggregationKind, MechanismKind, ObjectiveKind, RunConfig};
use fedrec_sim::tune::{TuneParams, tune};

/// A small generated population: enough users for a cohort, few items to keep rounds cheap.
fn source(n_users: usize, n_items: usize, seed: u64) -> DataSource {
    let mut p = SyntheticParams::movielens_like(n_users, n_items, seed);
    p.median_activity = 25.0;
    DataSource::Synthetic(p)
}

fn params(source: DataSource, max_rounds: usize, max_trials: usize) -> TuneParams {
    TuneParams {
        source,
        split: SplitKind::Random,
        test_fraction: 0.2,
        relevance_threshold: None,
        val_fraction: 0.2,
        val_seed: 2,
        metric: None,
        budget: Duration::from_secs(3600),
        max_trials: Some(max_trials),
        max_rounds: Some(max_rounds),
        min_rounds: None,
        eta: 3,
        jobs: Some(1),
        fixed: Vec::new(),
        quiet: true,
    }
}

fn small_base(objective: ObjectiveKind) -> RunConfig {
    let mut base = RunConfig::defaults(objective);
    base.rounds = 9;
    base.clients_per_round = 20;
    base.dim = 8;
    base.n_segments = 2;
    base.threads = 1;
    base.seed = 3;
    base
}

/// Regression (issue 14): `tune --mechanism distributed --aggregation secure --epsilon …`
/// failed every trial with "distributed noise is calibrated for a model size: use
/// calibrate_for", because the trials and the final run called `RunConfig::calibrate`.
#[test]
fn tune_calibrates_distributed_noise_for_the_model_size() {
    let mut base = small_base(ObjectiveKind::Explicit);
    base.rounds = 3;
    base.aggregation = AggregationKind::Secure;
    base.mechanism = MechanismKind::Distributed;
    base.epsilon = Some(20.0);
    base.clip_norm = 1.0;
    let rep = tune(&base, &params(source(60, 40, 7), 3, 2)).expect("tuning with distributed noise runs");
    for t in &rep.trials {
        assert!(t.error.is_none(), "trial {} failed: {:?}", t.trial, t.error);
    }
    assert!(rep.final_run.config.noise_multiplier > 0.0, "the final run is calibrated to ε");
    assert!(rep.final_run.test.rmse.is_some_and(f64::is_finite));
}

