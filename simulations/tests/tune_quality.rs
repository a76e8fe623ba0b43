//! `fedrec_sim::tune` as a library (issue 14): tuning under distributed noise calibrates
//! with the model's size, and the search never returns a configuration that does worse on
//! validation than the configuration it started from.

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

/// The starting configuration is trial 0 and trains for the longest trials' rounds, so the
/// configuration tune returns is never worse on validation than it, even when the trial cap
/// stops the search after a few short trials. (Before: the starting configuration was the
/// first of the first bracket, at its shortest rounds.)
#[test]
fn the_starting_configuration_runs_at_full_length_and_is_never_beaten_on_validation() {
    let base = small_base(ObjectiveKind::Explicit);
    let p = params(source(120, 60, 11), 27, 4);
    let rep = tune(&base, &p).expect("tune runs");
    let first = &rep.trials[0];
    assert_eq!(first.config_id, 0, "trial 0 is the starting configuration");
    assert_eq!(first.rounds, 27, "the starting configuration trains for --max-rounds");
    assert!(first.error.is_none(), "{:?}", first.error);
    let start = first.validation_metric.expect("the starting configuration is scored");
    assert!(rep.trials[1..].iter().all(|t| t.config_id != 0), "the starting configuration runs once");
    assert!(
        rep.best.validation_metric <= start,
        "tune returned validation RMSE {} worse than the starting configuration's {start}",
        rep.best.validation_metric
    );
}

/// With a random split the finalists (the starting configuration and the best others) are
/// trained again on a second validation split, and the one with the best mean of the two
/// validation values is returned; the final run trains exactly that configuration.
#[test]
fn the_finalists_are_confirmed_on_a_second_validation_split() {
    let base = small_base(ObjectiveKind::Implicit);
    let p = params(source(120, 60, 13), 27, 8);
    let rep = tune(&base, &p).expect("tune runs");
    let c = rep.confirmation.as_ref().expect("a random split has a confirmation");
    assert_eq!(c.seed, p.val_seed + 1);
    assert_eq!(c.finalists[0].config_id, 0, "the starting configuration is a finalist");
    assert!(c.finalists.len() >= 2 && c.finalists.len() <= 4, "{} finalists", c.finalists.len());
    // Recall@20: higher is better; the chosen one has the highest mean of the two splits.
    let mean = |f: &fedrec_sim::tune::FinalistRecord| {
        f.second_validation_metric.map_or(f64::NEG_INFINITY, |v| (v + f.validation_metric) / 2.0)
    };
    let chosen =
        c.finalists.iter().find(|f| f.trial == c.chosen_trial).expect("the chosen one is a finalist");
    for f in &c.finalists {
        assert!(f.error.is_none(), "{:?}", f.error);
        assert!(
            mean(f) <= mean(chosen),
            "trial {} has a better mean than the chosen {}",
            f.trial,
            chosen.trial
        );
    }
    assert_eq!(rep.best.trial, c.chosen_trial, "the chosen finalist is the best");
    let mut cfg = base.clone();
    rep.best.config.apply(&mut cfg);
    assert_eq!(rep.final_run.config.l2_user, cfg.l2_user);
    assert_eq!(rep.final_run.config.rounds, cfg.rounds);

    // The temporal rule has one validation split only: nothing to confirm on.
    let temporal = TuneParams { split: SplitKind::Temporal, ..params(source(120, 60, 13), 27, 4) };
    let rep = tune(&base, &temporal).expect("tune runs");
    assert!(rep.confirmation.is_none());
}

/// The preset the README recommends for non-private explicit studies reads as a configuration
/// file and sets what it says.
#[test]
fn the_explicit_nonprivate_preset_reads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/explicit-nonprivate.json");
    let file = fedrec_sim::tune::ConfigFile::read(&path).expect("the preset is a valid configuration file");
    let mut cfg = RunConfig::defaults(ObjectiveKind::Explicit);
    file.apply(&mut cfg);
    assert_eq!((cfg.dim, cfg.rounds), (64, 180));
    assert_eq!(file.objective(), Some(ObjectiveKind::Explicit));
    assert_eq!(file.clip_norm(), Some(7.0));
    // Its ridge was chosen without a support exponent, and the file says so.
    assert_eq!((cfg.l2_user, cfg.user_support_exponent), (8.0, 0.0));
}

/// A configuration file written before the support exponent existed keeps its meaning: its
/// `l2_user` is the same for every user (exponent 0), whatever exponent the run starts from; a
/// file that names the exponent gets it; one without `l2_user` leaves the starting pair.
#[test]
fn a_file_without_the_exponent_keeps_a_plain_ridge() {
    use fedrec_sim::tune::ConfigFile;
    // A base that scales the ridge (as `--user-support-exponent 1 --l2-user 0.2` gives).
    let defaults = RunConfig {
        user_support_exponent: 1.0,
        l2_user: 0.2,
        ..RunConfig::defaults(ObjectiveKind::Implicit)
    };
    let read = |json: &str| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("c.json");
        std::fs::write(&path, json).expect("write");
        let file = ConfigFile::read(&path).expect("valid");
        let mut cfg = defaults.clone();
        file.apply(&mut cfg);
        (cfg.l2_user, cfg.user_support_exponent)
    };
    assert_eq!(read(r#"{"training": {"l2_user": 5.0}}"#), (5.0, 0.0));
    assert_eq!(read(r#"{"training": {"l2_user": 0.3, "user_support_exponent": 1.0}}"#), (0.3, 1.0));
    assert_eq!(read(r#"{"model": {"dim": 16}}"#), (defaults.l2_user, defaults.user_support_exponent));
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"training": {"user_support_exponent": 3.0}}"#).expect("write");
    let err = ConfigFile::read(&path).expect_err("out of range");
    assert!(err.to_string().contains("training.user_support_exponent"), "{err}");
}
