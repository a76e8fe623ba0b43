//! The coordinator's SQLite store on real files: states round-trip bit for bit and resume identically, failed or unfinished commits leave the previous state, spend cannot be rewritten, and tampered files give typed errors.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedrec_coordinator::auth::DeviceId;
use fedrec_coordinator::store::{SCHEMA_VERSION, Store, StoreError, StoreOptions};
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::harness::{Federation, HarnessConfig};
use fedrec_shared::ledger::{Ledger, LedgerEntry};
use fedrec_shared::round::{
    AbandonReason, AdaptiveClip, Coordinator, CoordinatorConfig, CoordinatorEvent, CoordinatorState,
    RoundStats, Selection,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, TrainParams};
use rand::Rng;
use rand::seq::SliceRandom;
use rusqlite::Connection;

const SHAPE: ModelShape = ModelShape { n_items: 12, dim: 3, n_segments: 2 };
const N_DEVICES: usize = 40;

fn ratings(seed: u64) -> Vec<Vec<Rating>> {
    let mut rng = seeded_rng(seed);
    (0..N_DEVICES)
        .map(|_| {
            let mut items: Vec<u32> = (0..SHAPE.n_items as u32).collect();
            items.shuffle(&mut rng);
            items[..5].iter().map(|&item| Rating { item, value: rng.random_range(1.0f32..5.0) }).collect()
        })
        .collect()
}

/// Poisson selection with noise (so the ledger fills); Adam with adaptive clipping, or SGD
/// with momentum and a fixed clip norm.
fn config(adam: bool, min_reports: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        train: TrainParams {
            objective: Objective::Explicit,
            l2_user: 0.5,
            l2_user_bias: 0.1,
            l2_item: 0.01,
            l2_item_bias: 0.01,
            user_support_exponent: 0.0,
        },
        optimizer: if adam {
            ServerOptimizer::adam(0.05)
        } else {
            ServerOptimizer::Sgd { lr: 0.5, momentum: 0.9 }
        },
        selection: Selection::Poisson { q: 0.5 },
        min_reports,
        population: Some(N_DEVICES),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 2.0,
        adaptive_clip: adam.then_some(AdaptiveClip {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_multiplier: 2.0,
        }),
        noise_multiplier: 1.0,
        centroids: CentroidPolicy::with_min_count(1.0),
        privacy: None,
        secure: None,
    }
}

fn init_model(seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.1, global_mean: 3.0, centroid_scale: 1e-3 };
    GlobalModel::init(SHAPE, init, &mut seeded_rng(seed)).expect("valid shape")
}

fn harness() -> HarnessConfig {
    HarnessConfig { dropout: 0.1, n_threads: 1, latency: Duration::from_millis(20) }
}

/// A coordinator's states: before the first round, and after each round with its event.
struct History {
    initial: CoordinatorState,
    rounds: Vec<(CoordinatorState, CoordinatorEvent)>,
}

impl History {
    fn run(cfg: CoordinatorConfig, n_rounds: usize, seed: u64) -> Self {
        let devices = ratings(seed);
        let coordinator =
            Coordinator::new(cfg, init_model(seed), seeded_rng(seed + 1)).expect("valid config");
        let mut fed = Federation::new(coordinator, &devices, harness(), seeded_rng(seed + 2));
        let initial = fed.coordinator.state().expect("no round open");
        let rounds = (0..n_rounds)
            .map(|_| {
                let event = fed.run_round().event.expect("the round closed");
                (fed.coordinator.state().expect("no round open"), event)
            })
            .collect();
        Self { initial, rounds }
    }

    fn state(&self, k: usize) -> &CoordinatorState {
        &self.rounds[k].0
    }

    fn stats(&self, k: usize) -> &RoundStats {
        stats_of(&self.rounds[k].1)
    }
}

fn stats_of(event: &CoordinatorEvent) -> &RoundStats {
    match event {
        CoordinatorEvent::RoundCommitted { stats, .. } | CoordinatorEvent::RoundAbandoned { stats, .. } => {
            stats
        }
        other => panic!("not a round's close: {other:?}"),
    }
}

fn at(round: u64) -> u64 {
    1_700_000_000_000 + 60_000 * round
}

/// Writes what the coordinator's driver would after `event`.
fn persist(store: &mut Store, state: &CoordinatorState, event: &CoordinatorEvent) -> Result<(), StoreError> {
    match event {
        CoordinatorEvent::RoundCommitted { stats, .. } => store.commit_round(state, stats, at(stats.round)),
        CoordinatorEvent::RoundAbandoned { stats, reason } => {
            store.record_abandoned(stats, *reason, at(stats.round))
        }
        other => panic!("not a round's close: {other:?}"),
    }
}

/// A store at `path` holding `history`'s initial state and its first `n` rounds.
fn store_with(path: &Path, history: &History, n: usize, options: StoreOptions) -> Store {
    let mut store = Store::open_with(path, options).expect("a new database");
    store.save_initial(&history.initial, at(0)).expect("initial checkpoint");
    for (state, event) in &history.rounds[..n] {
        persist(&mut store, state, event).expect("commit");
    }
    store
}

fn bits(values: impl IntoIterator<Item = f32>) -> Vec<u32> {
    values.into_iter().map(f32::to_bits).collect()
}

/// Equal, and equal bit for bit where floats are concerned.
fn assert_same_state(got: &CoordinatorState, want: &CoordinatorState) {
    assert_eq!(got, want);
    let (g, w) = (&got.model, &want.model);
    assert_eq!(bits(g.item_factors.iter().copied()), bits(w.item_factors.iter().copied()));
    assert_eq!(bits(g.item_bias.iter().copied()), bits(w.item_bias.iter().copied()));
    assert_eq!(g.global_mean.to_bits(), w.global_mean.to_bits());
    assert_eq!(bits(g.centroids.iter().copied()), bits(w.centroids.iter().copied()));
    let (g, w) = (got.server.parts(), want.server.parts());
    assert_eq!(g.optimizer, w.optimizer);
    assert_eq!(bits(g.first_moment.iter().copied()), bits(w.first_moment.iter().copied()));
    assert_eq!(bits(g.second_moment.iter().copied()), bits(w.second_moment.iter().copied()));
    assert_eq!(bits(g.centroid_mass.iter().copied()), bits(w.centroid_mass.iter().copied()));
    assert_eq!(g.step, w.step);
    let ledger_bits = |l: &Ledger| -> Vec<(u64, u64, u64, Option<u64>)> {
        l.entries()
            .iter()
            .map(|e| {
                (e.round, e.q.to_bits(), e.noise_multiplier.to_bits(), e.clip_bits_noise.map(f64::to_bits))
            })
            .collect()
    };
    assert_eq!(ledger_bits(&got.ledger), ledger_bits(&want.ledger));
    assert_eq!((got.version, got.next_round), (want.version, want.next_round));
    assert_eq!(got.clip_norm.to_bits(), want.clip_norm.to_bits());
}

fn load(store: &Store) -> CoordinatorState {
    store.load_latest().expect("a readable store").expect("a checkpoint")
}

/// Row counts of every table: a failed write must leave them all unchanged.
fn counts(path: &Path) -> [i64; 5] {
    let conn = Connection::open(path).expect("open");
    ["rounds", "checkpoints", "ledger", "audit_log", "devices"].map(|table| {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).expect("count")
    })
}

fn db_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn states_round_trip_exactly_and_resume_identically() {
    let dir = tempfile::tempdir().expect("tempdir");
    for adam in [true, false] {
        let cfg = config(adam, 1);
        let path = db_path(&dir, if adam { "adam.db" } else { "sgd.db" });
        let devices = ratings(11);
        let coordinator =
            Coordinator::new(cfg.clone(), init_model(11), seeded_rng(12)).expect("valid config");
        let mut fed = Federation::new(coordinator, &devices, harness(), seeded_rng(13));
        let mut store = Store::open(&path).expect("a new database");
        assert_eq!(store.load_latest().expect("empty store"), None);
        store.save_initial(&fed.coordinator.state().expect("no round open"), at(0)).expect("initial");
        for _ in 0..6 {
            let event = fed.run_round().event.expect("the round closed");
            assert!(matches!(event, CoordinatorEvent::RoundCommitted { .. }), "{event:?}");
            let state = fed.coordinator.state().expect("no round open");
            persist(&mut store, &state, &event).expect("commit");
            assert_same_state(&load(&store), &state);
        }
        drop(store);

        // A new process: reopen the file and load.
        let store = Store::open(&path).expect("an existing database");
        let saved = fed.coordinator.state().expect("no round open");
        let loaded = load(&store);
        assert_same_state(&loaded, &saved);
        assert_eq!(loaded.ledger.entries().len(), 6, "every committed noisy round is charged");
        assert_eq!(loaded.ledger.entries()[0].clip_bits_noise.is_some(), adam);
        assert_eq!(loaded.clip_norm != cfg.clip_norm, adam, "only adaptive clipping moves C");
        let status = store.status().expect("status");
        assert_eq!((status.n_rounds_committed, status.n_rounds_abandoned), (6, 0));
        assert_eq!((status.last_round, status.last_model_version), (Some(5), Some(6)));
        assert_eq!((status.n_checkpoints, status.n_ledger_entries), (7, 6));

        // Restored from the original state and from the loaded one with the same seeded RNG,
        // the coordinators continue in lockstep, bit for bit.
        let resume = |state: CoordinatorState| {
            let c = Coordinator::restore(cfg.clone(), state, seeded_rng(99)).expect("a valid state");
            let mut fed = Federation::new(c, &devices, harness(), seeded_rng(98));
            fed.run_rounds(2, |_, _| {});
            fed.coordinator.state().expect("no round open")
        };
        let (from_saved, from_loaded) = (resume(saved), resume(loaded));
        assert_eq!(from_loaded.version, 8);
        assert_same_state(&from_loaded, &from_saved);
    }
}

#[test]
fn failed_or_unfinished_commits_leave_the_previous_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "crash.db");
    let history = History::run(config(true, 1), 4, 21);
    assert!(history.rounds.iter().all(|(_, e)| matches!(e, CoordinatorEvent::RoundCommitted { .. })));
    let mut store = store_with(&path, &history, 2, StoreOptions::default());
    let before = counts(&path);
    let unchanged = |store: &Store| {
        assert_same_state(&load(store), history.state(1));
        assert_eq!(counts(&path), before, "no partial write");
    };

    // The ledger check fails after the round row is written.
    let mut bad = history.state(2).clone();
    let mut entries = bad.ledger.entries().to_vec();
    entries[0].q = 0.25;
    bad.ledger = Ledger::from_entries(entries.clone()).expect("valid entries");
    let err = store.commit_round(&bad, history.stats(2), at(2)).expect_err("spend rewritten");
    assert!(matches!(err, StoreError::LedgerMismatch { round } if round == entries[0].round), "{err:?}");
    unchanged(&store);

    // The checkpoint fails after the round row and the ledger are written: its model
    // version is already stored.
    let mut dup = history.state(1).clone();
    dup.next_round = history.state(2).next_round;
    let err = store.commit_round(&dup, history.stats(2), at(2)).expect_err("duplicate version");
    assert!(matches!(err, StoreError::Inconsistent(_)), "{err:?}");
    unchanged(&store);

    // SQLite itself fails on the checkpoint insert.
    let raw = Connection::open(&path).expect("open");
    raw.execute_batch(
        "CREATE TRIGGER fail_checkpoint BEFORE INSERT ON checkpoints BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    )
    .expect("trigger");
    let err = store.commit_round(history.state(2), history.stats(2), at(2)).expect_err("injected failure");
    assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");
    unchanged(&store);
    raw.execute_batch("DROP TRIGGER fail_checkpoint;").expect("drop trigger");
    drop(raw);

    // A commit written but never committed: the process goes away first.
    let prepared =
        store.prepare_commit_round(history.state(2), history.stats(2), at(2)).expect("the writes succeed");
    drop(prepared);
    drop(store);
    let mut store = Store::open(&path).expect("reopen");
    unchanged(&store);

    // Nothing is stuck: the same round commits now.
    store.commit_round(history.state(2), history.stats(2), at(2)).expect("commit");
    assert_same_state(&load(&store), history.state(2));
    // And a round cannot be recorded twice.
    let err = store.commit_round(history.state(3), history.stats(2), at(3)).expect_err("round 2 again");
    assert!(matches!(err, StoreError::Inconsistent(_)), "{err:?}");
    assert_same_state(&load(&store), history.state(2));
}

#[test]
fn spend_cannot_be_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "spend.db");
    let history = History::run(config(false, 1), 4, 31);
    let mut store = store_with(&path, &history, 3, StoreOptions::default());
    let before = counts(&path);
    let next = history.state(3);
    let stored = history.state(2).ledger.entries().to_vec();
    assert_eq!(stored.len(), 3);
    let with_ledger = |entries: Vec<LedgerEntry>| CoordinatorState {
        ledger: Ledger::from_entries(entries).expect("valid entries"),
        ..next.clone()
    };
    let mut cases: Vec<(CoordinatorState, u64)> = Vec::new();
    // A charge forgotten.
    let mut forgot = next.ledger.entries().to_vec();
    forgot.remove(1);
    cases.push((with_ledger(forgot), stored[1].round));
    // A charge lowered.
    let mut lowered = next.ledger.entries().to_vec();
    lowered[2].noise_multiplier *= 2.0;
    cases.push((with_ledger(lowered), stored[2].round));
    // Clip-bit noise added after the fact.
    let mut relabelled = next.ledger.entries().to_vec();
    relabelled[0].clip_bits_noise = Some(100.0);
    cases.push((with_ledger(relabelled), stored[0].round));
    // Only the new round's charge (a coordinator restarted without its ledger).
    cases.push((with_ledger(next.ledger.entries()[3..].to_vec()), stored[0].round));
    for (state, round) in cases {
        let err = store.commit_round(&state, history.stats(3), at(3)).expect_err("spend rewritten");
        assert!(matches!(err, StoreError::LedgerMismatch { round: r } if r == round), "{err:?}");
        assert_eq!(counts(&path), before, "nothing written");
        assert_same_state(&load(&store), history.state(2));
    }
    store.commit_round(next, history.stats(3), at(3)).expect("the true ledger commits");
    assert_same_state(&load(&store), next);
}

/// A store file with two committed rounds, tampered with by `sql` through a raw connection.
fn tampered(
    dir: &tempfile::TempDir,
    name: &str,
    history: &History,
    tamper: impl FnOnce(&Connection),
) -> PathBuf {
    let path = db_path(dir, name);
    drop(store_with(&path, history, 2, StoreOptions::default()));
    let raw = Connection::open(&path).expect("open");
    tamper(&raw);
    path
}

fn newest_blob(conn: &Connection, column: &str) -> Vec<u8> {
    conn.query_row(
        &format!("SELECT {column} FROM checkpoints ORDER BY model_version DESC LIMIT 1"),
        [],
        |r| r.get(0),
    )
    .expect("a checkpoint")
}

fn set_newest(conn: &Connection, assignment: &str) {
    conn.execute_batch(&format!(
        "PRAGMA ignore_check_constraints = ON;
         UPDATE checkpoints SET {assignment} WHERE model_version = (SELECT max(model_version) FROM checkpoints);"
    ))
    .expect("tamper");
}

fn set_newest_blob(conn: &Connection, column: &str, blob: &[u8]) {
    conn.execute(
        &format!(
            "UPDATE checkpoints SET {column} = ?1 WHERE model_version = (SELECT max(model_version) FROM checkpoints)"
        ),
        [blob],
    )
    .expect("tamper");
}

#[test]
fn tampered_files_give_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let history = History::run(config(true, 1), 2, 41);
    type Tamper = Box<dyn Fn(&Connection)>;
    let corrupt_cases: Vec<(&str, Tamper)> = vec![
        (
            "item_factors one byte short",
            Box::new(|c| {
                let b = newest_blob(c, "item_factors");
                set_newest_blob(c, "item_factors", &b[..b.len() - 1]);
            }),
        ),
        (
            "item_factors one value short",
            Box::new(|c| {
                let b = newest_blob(c, "item_factors");
                set_newest_blob(c, "item_factors", &b[..b.len() - 4]);
            }),
        ),
        (
            "NaN in item_factors",
            Box::new(|c| {
                let mut b = newest_blob(c, "item_factors");
                b[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
                set_newest_blob(c, "item_factors", &b);
            }),
        ),
        (
            "infinity in the first moment",
            Box::new(|c| {
                let mut b = newest_blob(c, "first_moment");
                b[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
                set_newest_blob(c, "first_moment", &b);
            }),
        ),
        (
            "negative second moment",
            Box::new(|c| {
                let mut b = newest_blob(c, "second_moment");
                b[..4].copy_from_slice(&(-1.0f32).to_le_bytes());
                set_newest_blob(c, "second_moment", &b);
            }),
        ),
        ("second moment missing", Box::new(|c| set_newest_blob(c, "second_moment", &[]))),
        ("unknown optimizer", Box::new(|c| set_newest(c, "optimizer = 'rmsprop'"))),
        ("SGD with Adam's hyper-parameters", Box::new(|c| set_newest(c, "optimizer = 'sgd'"))),
        ("Adam with a momentum", Box::new(|c| set_newest(c, "momentum = 0.5"))),
        ("beta1 out of range", Box::new(|c| set_newest(c, "beta1 = 1.5"))),
        ("more items than the blobs hold", Box::new(|c| set_newest(c, "n_items = n_items + 1"))),
        ("negative dimension", Box::new(|c| set_newest(c, "dim = -3"))),
        ("zero segments", Box::new(|c| set_newest(c, "n_segments = 0"))),
        ("a global mean that is no f32", Box::new(|c| set_newest(c, "global_mean = 1e300"))),
        ("a clip norm that is no f32", Box::new(|c| set_newest(c, "clip_norm = 0.1"))),
        ("a negative clip norm", Box::new(|c| set_newest(c, "clip_norm = -1.0"))),
        ("a negative step", Box::new(|c| set_newest(c, "step = -1"))),
        (
            "negative versions",
            Box::new(|c| {
                c.execute_batch(
                    "PRAGMA ignore_check_constraints = ON; UPDATE checkpoints SET model_version = -1 - model_version;",
                )
                .expect("tamper")
            }),
        ),
        (
            "an invalid ledger entry",
            Box::new(|c| c.execute_batch("UPDATE ledger SET q = 2.0 WHERE round = 0;").expect("tamper")),
        ),
        (
            "a ledger entry with a negative round",
            Box::new(|c| {
                c.execute_batch(
                    "PRAGMA ignore_check_constraints = ON; UPDATE ledger SET round = -1 WHERE round = 0;",
                )
                .expect("tamper")
            }),
        ),
    ];
    for (k, (name, tamper)) in corrupt_cases.into_iter().enumerate() {
        let path = tampered(&dir, &format!("corrupt{k}.db"), &history, tamper);
        let store = Store::open(&path).expect("the schema is intact");
        match store.load_latest() {
            Err(StoreError::Corrupt { what, reason }) => assert!(!what.is_empty() && !reason.is_empty()),
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
    }

    // Checkpoint and ledger that do not fit together.
    let path = tampered(&dir, "inconsistent.db", &history, |c| set_newest(c, "next_round = 0"));
    let err = Store::open(&path).expect("open").load_latest().expect_err("ledger ahead of the checkpoint");
    assert!(matches!(err, StoreError::Inconsistent(_)), "{err:?}");
    // The newest checkpoint deleted: the older one does not cover the ledger's last round.
    let path = tampered(&dir, "rolled_back.db", &history, |c| {
        c.execute_batch(
            "DELETE FROM checkpoints WHERE model_version = (SELECT max(model_version) FROM checkpoints);",
        )
        .expect("tamper")
    });
    let err = Store::open(&path).expect("open").load_latest().expect_err("a rolled-back model");
    assert!(matches!(err, StoreError::Inconsistent(_)), "{err:?}");

    // A newer schema.
    let path =
        tampered(&dir, "newer.db", &history, |c| c.pragma_update(None, "user_version", 99).expect("tamper"));
    let err = Store::open(&path).expect_err("schema from the future");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, supported } if supported == SCHEMA_VERSION),
        "{err:?}"
    );

    // Not a database at all.
    let path = db_path(&dir, "not_a_db.db");
    std::fs::write(&path, b"this is not a database, it is a shopping list\n".repeat(100)).expect("write");
    let err = Store::open(&path).expect_err("not SQLite");
    assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");

    // A real database whose first page is overwritten.
    let path = db_path(&dir, "mangled.db");
    drop(store_with(&path, &history, 2, StoreOptions::default()));
    let mut bytes = std::fs::read(&path).expect("read");
    for (k, b) in bytes.iter_mut().enumerate().skip(100).take(3000) {
        *b = (k * 7919 % 251) as u8;
    }
    std::fs::write(&path, bytes).expect("write");
    let result = Store::open(&path).and_then(|s| s.load_latest());
    assert!(result.is_err(), "{result:?}");
}

#[test]
fn pruning_keeps_the_newest_checkpoints_and_all_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "prune.db");
    let history = History::run(config(true, 1), 6, 51);
    let keep = StoreOptions { keep_checkpoints: NonZeroUsize::new(3).expect("3 is not zero") };
    let store = store_with(&path, &history, 6, keep);
    let conn = Connection::open(&path).expect("open");
    let versions: Vec<i64> = conn
        .prepare("SELECT model_version FROM checkpoints ORDER BY model_version")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(versions, [4, 5, 6]);
    let status = store.status().expect("status");
    assert_eq!(status.n_checkpoints, 3);
    assert_eq!(status.n_rounds_committed, 6);
    assert_eq!(status.n_ledger_entries, 6, "the ledger is never pruned");
    assert_same_state(&load(&store), history.state(5));
    // The audit log has every event, with counts only.
    let log = store.audit_log(100).expect("audit log");
    let events: Vec<&str> = log.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(events, ["initialized"].into_iter().chain(["round_committed"; 6]).collect::<Vec<_>>());
    for record in &log {
        for pair in record.detail.split(' ') {
            let (name, value) = pair.split_once('=').expect("name=value");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{pair}");
            assert!(value.parse::<u64>().is_ok(), "{pair}: counts only");
        }
    }
    assert!(log[3].detail.contains("checkpoints_pruned=1"), "{}", log[3].detail);
    assert_eq!(store.audit_log(2).expect("audit log").len(), 2);
}

#[test]
fn abandoned_rounds_have_no_checkpoint_and_no_charge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "abandoned.db");
    // More reports required than there are devices: every round is abandoned (without
    // noise: a round with noise commits whatever the number of reports).
    let mut cfg = config(true, N_DEVICES + 1);
    cfg.noise_multiplier = 0.0;
    let history = History::run(cfg, 3, 61);
    assert!(history.rounds.iter().all(|(_, e)| matches!(
        e,
        CoordinatorEvent::RoundAbandoned { reason: AbandonReason::TooFewSelected, .. }
    )));
    let mut store = store_with(&path, &history, 3, StoreOptions::default());
    let status = store.status().expect("status");
    assert_eq!((status.n_rounds_committed, status.n_rounds_abandoned), (0, 3));
    assert_eq!((status.n_checkpoints, status.n_ledger_entries), (1, 0));
    assert_eq!((status.last_round, status.last_model_version), (Some(2), Some(0)));
    // The loaded state is the coordinator's: same model, and round indices are not reused.
    let loaded = load(&store);
    assert_same_state(&loaded, history.state(2));
    assert_eq!(loaded.next_round, 3);
    let conn = Connection::open(&path).expect("open");
    let rows: Vec<(i64, i64, String, Option<String>)> = conn
        .prepare("SELECT round, model_version, outcome, abandon_reason FROM rounds ORDER BY round")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let want: Vec<_> = (0..3)
        .map(|round| (round, 0, "abandoned".to_string(), Some("too_few_selected".to_string())))
        .collect();
    assert_eq!(rows, want);
    // Recording the same round again is refused.
    let err =
        store.record_abandoned(history.stats(0), AbandonReason::TooFewReports, at(9)).expect_err("twice");
    assert!(matches!(err, StoreError::Inconsistent(_)), "{err:?}");
    // A store that already has a checkpoint refuses a second initial one.
    let err = store.save_initial(&history.initial, at(9)).expect_err("initialized twice");
    assert!(matches!(err, StoreError::Inconsistent(_)), "{err:?}");
}

#[test]
fn devices_are_inserted_revoked_and_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(db_path(&dir, "devices.db")).expect("a new database");
    let (a, b, big) = (DeviceId::new(7), DeviceId::new(3), DeviceId::new(u64::MAX - 1));
    store.insert_device(a, 1_000, Some("pixel test phone")).expect("insert");
    store.insert_device(b, 2_000, None).expect("insert");
    store.insert_device(big, 3_000, None).expect("ids above i64::MAX are stored by their bits");
    let err = store.insert_device(a, 4_000, None).expect_err("duplicate");
    assert!(matches!(err, StoreError::DuplicateDevice(id) if id == a), "{err:?}");

    let got = store.device(a).expect("read").expect("stored");
    assert_eq!((got.device_id, got.enrolled_at_ms, got.revoked_at_ms), (a, 1_000, None));
    assert_eq!(got.label.as_deref(), Some("pixel test phone"));
    assert!(!got.is_revoked());
    assert_eq!(store.device(DeviceId::new(8)).expect("read"), None);
    assert_eq!(store.device(big).expect("read").expect("stored").device_id, big);

    store.revoke_device(a, 5_000).expect("revoke");
    let err = store.revoke_device(a, 6_000).expect_err("revoked twice");
    assert!(matches!(err, StoreError::AlreadyRevoked(id) if id == a), "{err:?}");
    let err = store.revoke_device(DeviceId::new(8), 6_000).expect_err("unknown");
    assert!(matches!(err, StoreError::UnknownDevice(id) if id == DeviceId::new(8)), "{err:?}");
    assert_eq!(
        store.device(a).expect("read").expect("stored").revoked_at_ms,
        Some(5_000),
        "first revocation kept"
    );
    let err = store.insert_device(a, 7_000, None).expect_err("a revoked id is not reused");
    assert!(matches!(err, StoreError::DuplicateDevice(_)), "{err:?}");

    let all = store.list_devices().expect("list");
    let ids: Vec<DeviceId> = all.iter().map(|d| d.device_id).collect();
    assert_eq!(ids, [big, b, a], "ordered by stored bits");
    assert_eq!(all.iter().filter(|d| d.is_revoked()).count(), 1);
    let status = store.status().expect("status");
    assert_eq!((status.n_devices_enrolled, status.n_devices_revoked), (2, 1));
    assert_eq!((status.n_checkpoints, status.last_model_version, status.last_round), (0, None, None));

    let err = store.insert_device(DeviceId::new(9), u64::MAX, None).expect_err("time out of range");
    assert!(matches!(err, StoreError::OutOfRange { .. }), "{err:?}");
}

/// Every column of every `rounds` row, as text, and the audit details, of the store at `path`.
fn rows_and_audit(path: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let conn = Connection::open(path).expect("open");
    let rows = conn
        .prepare(
            "SELECT round, model_version, committed_at_ms, n_checked_in, n_selected, n_reported, n_dropped,
                    noise_std, clip_norm, unclipped_fraction, outcome, abandon_reason FROM rounds ORDER BY round",
        )
        .expect("prepare")
        .query_map([], |r| {
            let cols: Vec<String> =
                (0..12).map(|i| r.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}"))).collect::<Result<_, _>>()?;
            Ok(cols.join(" "))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let audit = conn
        .prepare("SELECT event, detail FROM audit_log ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("audit");
    (rows, audit)
}

/// Issue 10 (1): the rounds table and the audit log stored the exact number of devices that
/// checked in, were selected, reported and dropped — a membership signal. Two coordinators
/// on neighbouring device sets (one device apart), same seeds, no adaptive clipping: every
/// stored round row and audit line is identical, and the counts are NULL.
#[test]
fn issue_10_stored_rows_of_noised_rounds_do_not_reveal_the_sample() {
    let dir = tempfile::tempdir().expect("tempdir");
    let devices = ratings(71);
    let mut stored = Vec::new();
    for (name, world) in [("all.db", &devices[..]), ("one_fewer.db", &devices[1..])] {
        let coordinator = Coordinator::new(config(false, 1), init_model(71), seeded_rng(72)).expect("valid");
        let mut fed = Federation::new(coordinator, world, harness(), seeded_rng(73));
        let path = db_path(&dir, name);
        let mut store = Store::open(&path).expect("a new database");
        store.save_initial(&fed.coordinator.state().expect("no round open"), at(0)).expect("initial");
        let mut checked_in = Vec::new();
        for _ in 0..3 {
            let event = fed.run_round().event.expect("the round closed");
            checked_in.push(stats_of(&event).n_checked_in);
            persist(&mut store, &fed.coordinator.state().expect("no round open"), &event).expect("commit");
        }
        assert_eq!(checked_in, vec![world.len(); 3], "the worlds differ in what the coordinator saw");
        drop(store);
        stored.push(rows_and_audit(&path));
    }
    let (rows, audit) = &stored[0];
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(
            row.matches("Null").count(),
            6,
            "four NULL counts, no unclipped fraction or abandon reason: {row}"
        );
    }
    assert!(audit.iter().all(|(_, d)| !d.contains("n_")), "{audit:?}");
    assert_eq!(stored[0], stored[1], "the stored rows tell the worlds apart");
}

/// Issue 10 (4): each ledger and budget row carries a hash chained from the previous one;
/// an edited, deleted or inserted row is reported, by the first row that fails.
#[test]
fn issue_10_an_edited_ledger_row_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "chain.db");
    let history = History::run(config(false, 1), 4, 81);
    let mut store = store_with(&path, &history, 4, StoreOptions::default());
    let policy = fedrec_shared::ledger::PrivacyPolicy {
        budget: fedrec_shared::ledger::PrivacyBudget::new(8.0, 1e-6).expect("valid"),
        accountant: fedrec_shared::privacy::AccountantKind::Rdp,
    };
    store.set_budget(policy, "initial budget", at(0)).expect("first budget");
    let good = store.verify_chain().expect("readable");
    assert_eq!(good.broken, None);
    assert_eq!((good.ledger_hashes.len(), good.budget_hashes.len()), (4, 1));
    let head = good.head();
    assert_eq!(store.verify_chain().expect("readable").head(), head, "the head is a function of the rows");
    assert_eq!(good.head_at(4, 1), Some(head));
    assert_eq!(good.head_at(5, 1), None, "a head past the rows");
    assert_ne!(good.head_at(3, 1), Some(head));
    drop(store);

    let tamper = |name: &str, sql: &str| {
        let copy = db_path(&dir, name);
        std::fs::copy(&path, &copy).expect("copy");
        let conn = Connection::open(&copy).expect("open");
        conn.execute_batch(sql).expect("tamper");
        drop(conn);
        let store = Store::open(&copy).expect("still opens");
        store.verify_chain().expect("readable")
    };
    use fedrec_coordinator::store::ChainBreak;
    // A lower charge for round 1: still a valid event, so only the chain can tell.
    let edited = tamper("edited.db", "UPDATE ledger SET noise_multiplier = 50.0 WHERE round = 1;");
    assert_eq!(edited.broken, Some(ChainBreak::Ledger { round: 1 }));
    assert_ne!(edited.head(), head);
    let deleted = tamper("deleted.db", "DELETE FROM ledger WHERE round = 2;");
    assert_eq!(deleted.broken, Some(ChainBreak::Ledger { round: 3 }), "the row after the gap fails");
    let truncated = tamper("truncated.db", "DELETE FROM ledger WHERE round = 3;");
    assert_eq!(truncated.broken, None, "dropping the newest row keeps a valid chain ...");
    assert_ne!(truncated.head(), head, "... but not the head an operator kept");
    assert_eq!(truncated.head_at(4, 1), None);
    let budget = tamper("budget.db", "UPDATE budget SET epsilon = 80.0;");
    assert_eq!(budget.broken, Some(ChainBreak::Budget { seq: 0 }));
}

/// Issue 10 (4): the budget is fixed in the store; a change is a new row with a reason and an
/// audit line; δ and the accountant cannot change; an empty reason is refused.
#[test]
fn issue_10_budget_changes_are_explicit_and_logged() {
    use fedrec_shared::ledger::{PrivacyBudget, PrivacyPolicy};
    use fedrec_shared::privacy::AccountantKind;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(db_path(&dir, "budget.db")).expect("a new database");
    let policy = |eps: f64, delta: f64, accountant| PrivacyPolicy {
        budget: PrivacyBudget::new(eps, delta).expect("valid"),
        accountant,
    };
    assert_eq!(store.budget().expect("readable"), None);
    let err = store.set_budget(policy(4.0, 1e-6, AccountantKind::Rdp), "  ", at(0)).expect_err("no reason");
    assert!(matches!(err, StoreError::Budget(_)), "{err:?}");
    store.set_budget(policy(4.0, 1e-6, AccountantKind::Rdp), "launch", at(0)).expect("first");
    let b = store.budget().expect("readable").expect("set");
    assert_eq!((b.seq, b.policy, b.reason.as_str()), (0, policy(4.0, 1e-6, AccountantKind::Rdp), "launch"));
    for (bad, why) in [
        (policy(4.0, 1e-6, AccountantKind::Rdp), "unchanged"),
        (policy(6.0, 1e-5, AccountantKind::Rdp), "delta"),
        (policy(6.0, 1e-6, AccountantKind::Pld), "accountant"),
    ] {
        let err = store.set_budget(bad, "reason", at(1)).expect_err(why);
        assert!(matches!(err, StoreError::Budget(_)), "{why}: {err:?}");
    }
    store
        .set_budget(policy(6.0, 1e-6, AccountantKind::Rdp), "board approved 2027 plan", at(2))
        .expect("raise");
    store.set_budget(policy(5.0, 1e-6, AccountantKind::Rdp), "tighten", at(3)).expect("lower");
    let b = store.budget().expect("readable").expect("set");
    assert_eq!((b.seq, b.policy.budget.epsilon(), b.set_at_ms), (2, 5.0, at(3)));
    let log = store.audit_log(10).expect("audit log");
    let events: Vec<(&str, &str)> = log.iter().map(|r| (r.event.as_str(), r.detail.as_str())).collect();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].0, "budget_set");
    assert_eq!(events[1].0, "budget_raised");
    assert!(
        events[1].1.contains("epsilon=4->6") && events[1].1.contains("reason=board approved 2027 plan"),
        "{events:?}"
    );
    assert_eq!(events[2].0, "budget_lowered");
    assert_eq!(store.verify_chain().expect("readable").broken, None);
}

/// A store written by the version-1 schema (counts NOT NULL, no hashes, no budget table)
/// opens: its rows are kept and its ledger gets a chain.
#[test]
fn a_version_1_store_is_upgraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "v1.db");
    {
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(include_str!("data/schema_v1.sql")).expect("the v1 schema");
        conn.execute_batch(
            "INSERT INTO rounds VALUES (0, 1, 1700000000000, 10, 5, 4, 1, 2.0, 2.0, NULL, 'committed', NULL);
             INSERT INTO ledger VALUES (0, 0.5, 1.0, NULL);
             INSERT INTO audit_log (at_ms, event, detail) VALUES (1700000000000, 'round_committed', 'round=0');
             PRAGMA user_version = 1;",
        )
        .expect("v1 rows");
    }
    let store = Store::open(&path).expect("a v1 store opens");
    let chain = store.verify_chain().expect("readable");
    assert_eq!((chain.broken, chain.ledger_hashes.len()), (None, 1));
    drop(store);
    let conn = Connection::open(&path).expect("open");
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("version");
    assert_eq!(version, SCHEMA_VERSION);
    let counts: (i64, i64) = conn
        .query_row("SELECT n_checked_in, n_reported FROM rounds", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("row");
    assert_eq!(counts, (10, 4), "old rows are kept");
    // The upgraded table accepts the NULL counts of a noised round.
    conn.execute(
        "INSERT INTO rounds VALUES (1, 2, 1700000060000, NULL, NULL, NULL, NULL, 2.0, 2.0, NULL, 'committed', NULL)",
        [],
    )
    .expect("NULL counts");
}

/// Issue 12: a history of two central rounds, then (the same coordinator restored with
/// distributed noise) two distributed rounds.
fn mixed_history(seed: u64) -> (History, usize) {
    use fedrec_shared::round::secure::SecurePolicy;
    use fedrec_shared::round::{DistributedNoise, SecureAggregation};
    let devices = ratings(seed);
    let harness = HarnessConfig { dropout: 0.0, ..harness() };
    let mut central = config(false, 4);
    central.selection = Selection::Poisson { q: 0.5 };
    let coordinator =
        Coordinator::new(central.clone(), init_model(seed), seeded_rng(seed + 1)).expect("valid config");
    let mut fed = Federation::new(coordinator, &devices, harness, seeded_rng(seed + 2));
    let initial = fed.coordinator.state().expect("no round open");
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let event = fed.run_round().event.expect("the round closed");
        rounds.push((fed.coordinator.state().expect("no round open"), event));
    }
    let mut distributed = central;
    distributed.secure = Some(SecureAggregation {
        dropout: 0.1,
        corrupt: 0.0,
        phase_window: Duration::from_secs(3),
        distributed: Some(DistributedNoise { bits: 16 }),
    });
    let state = rounds[1].0.clone();
    let coordinator = Coordinator::restore(distributed, state, seeded_rng(seed + 3)).expect("restores");
    let permissive = SecurePolicy { min_cohort: 1, corrupt: 0.0, log2_security: -40.0 };
    let mut fed =
        Federation::new(coordinator, &devices, harness, seeded_rng(seed + 4)).with_secure_policy(permissive);
    for _ in 0..2 {
        let event = fed.run_round().event.expect("the round closed");
        rounds.push((fed.coordinator.state().expect("no round open"), event));
    }
    (History { initial, rounds }, 2)
}

/// Issue 12: distributed-noise charges are stored in `ddp_ledger`, chained with the central
/// ledger in round order, read back bit for bit (a resumed coordinator spends from the same
/// ε), and cannot be forgotten, lowered or edited.
#[test]
fn distributed_charges_are_stored_chained_and_resumed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "ddp.db");
    let (history, n_central) = mixed_history(91);
    for k in 0..history.rounds.len() {
        assert!(
            matches!(history.rounds[k].1, CoordinatorEvent::RoundCommitted { .. }),
            "round {k}: {:?}",
            history.rounds[k].1
        );
    }
    let last = history.state(3);
    assert_eq!((last.ledger.entries().len(), last.ledger.ddp_entries().len()), (n_central, 2));
    let mut store = store_with(&path, &history, 3, StoreOptions::default());
    let ddp_bytes = |l: &Ledger| l.ddp_entries().iter().map(|c| c.canonical_bytes()).collect::<Vec<_>>();

    // Read back exactly; the resumed ledger spends from the same ε.
    let got = load(&store);
    assert_same_state(&got, history.state(2));
    assert_eq!(ddp_bytes(&got.ledger), ddp_bytes(&history.state(2).ledger));
    let eps = |l: &Ledger| l.epsilon(1e-6, fedrec_shared::privacy::AccountantKind::Rdp).expect("an ε");
    assert_eq!(eps(&got.ledger).to_bits(), eps(&history.state(2).ledger).to_bits());
    assert!(eps(&got.ledger) > eps(&history.state(1).ledger), "the distributed round costs ε");
    assert_eq!(store.status().expect("status").n_ledger_entries, 3);

    // A distributed charge forgotten, or lowered (four times the noise): refused, nothing written.
    let next = history.state(3);
    let before = counts(&path);
    let central = next.ledger.entries().to_vec();
    let mut lowered = next.ledger.ddp_entries().to_vec();
    let e = lowered[0].event;
    lowered[0].event = fedrec_shared::ddp::DdpEvent::from_parts(
        e.q(),
        e.steps(),
        e.l2(),
        e.l1(),
        4.0 * e.device_var(),
        e.n_survivors(),
        e.dim(),
    )
    .expect("a valid event");
    let ddp_round = next.ledger.ddp_entries()[0].round;
    for ddp in [next.ledger.ddp_entries()[1..].to_vec(), lowered] {
        let state = CoordinatorState {
            ledger: Ledger::from_parts(central.clone(), ddp).expect("valid charges"),
            ..next.clone()
        };
        let err = store.commit_round(&state, history.stats(3), at(3)).expect_err("spend rewritten");
        assert!(matches!(err, StoreError::LedgerMismatch { round } if round == ddp_round), "{err:?}");
        assert_eq!(counts(&path), before, "nothing written");
    }
    store.commit_round(next, history.stats(3), at(3)).expect("the true ledger commits");
    let got = load(&store);
    assert_same_state(&got, next);
    assert_eq!(ddp_bytes(&got.ledger), ddp_bytes(&next.ledger));

    // One chain through both tables, in round order.
    let chain = store.verify_chain().expect("readable");
    assert_eq!((chain.broken, chain.ledger_hashes.len()), (None, 4));
    drop(store);
    let tamper = |name: &str, sql: &str| {
        let copy = db_path(&dir, name);
        std::fs::copy(&path, &copy).expect("copy");
        Connection::open(&copy).expect("open").execute_batch(sql).expect("tamper");
        Store::open(&copy).expect("still opens")
    };
    use fedrec_coordinator::store::ChainBreak;
    let edited = tamper(
        "edited.db",
        &format!("UPDATE ddp_ledger SET device_var = device_var * 4 WHERE round = {ddp_round};"),
    );
    assert_eq!(
        edited.verify_chain().expect("readable").broken,
        Some(ChainBreak::Ledger { round: ddp_round })
    );
    let moved = tamper(
        "moved.db",
        &format!(
            "DELETE FROM ledger WHERE round = 1; UPDATE ddp_ledger SET round = 1 WHERE round = {ddp_round};"
        ),
    );
    assert_eq!(moved.verify_chain().expect("readable").broken, Some(ChainBreak::Ledger { round: 1 }));
    let twice = tamper(
        "twice.db",
        &format!(
            "INSERT INTO ledger (round, q, noise_multiplier, clip_bits_noise, hash) VALUES ({ddp_round}, 0.5, 1.0, NULL, x'00');"
        ),
    );
    let err = twice.load_latest().expect_err("a round charged in both tables");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let weak =
        tamper("weak.db", &format!("UPDATE ddp_ledger SET device_var = 0.01 WHERE round = {ddp_round};"));
    let err = weak.load_latest().expect_err("σ_dev below the accountant's range");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

/// A store written by the version-2 schema (no `ddp_ledger`) opens, gets the table, and its
/// chain is unchanged.
#[test]
fn a_version_2_store_is_upgraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir, "v2.db");
    let history = History::run(config(false, 1), 2, 17);
    let head = {
        let store = store_with(&path, &history, 2, StoreOptions::default());
        store.verify_chain().expect("readable").head()
    };
    {
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("DROP TABLE ddp_ledger; PRAGMA user_version = 2;").expect("back to v2");
    }
    let store = Store::open(&path).expect("a v2 store opens");
    assert_eq!(store.verify_chain().expect("readable").head(), head);
    assert_same_state(&load(&store), history.state(1));
    let conn = Connection::open(&path).expect("open");
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("version");
    assert_eq!(version, SCHEMA_VERSION);
    let n: i64 = conn.query_row("SELECT count(*) FROM ddp_ledger", [], |r| r.get(0)).expect("the new table");
    assert_eq!(n, 0);
}
