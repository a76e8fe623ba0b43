//! Per-user train/test holdout of a loaded dataset.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::{Dataset, Interaction, Split, SplitKind};

/// Positions of each user's interactions in `interactions`, in original order.
///
/// Has at least `n_users` entries, more if some interaction names a larger user index.
pub(super) fn positions_by_user(interactions: &[Interaction], n_users: usize) -> Vec<Vec<usize>> {
    let n = interactions.iter().map(|x| x.user as usize + 1).max().unwrap_or(0).max(n_users);
    let mut counts = vec![0usize; n];
    for x in interactions {
        counts[x.user as usize] += 1;
    }
    let mut by_user: Vec<Vec<usize>> = counts.into_iter().map(Vec::with_capacity).collect();
    for (pos, x) in interactions.iter().enumerate() {
        by_user[x.user as usize].push(pos);
    }
    by_user
}

/// Per-user holdout of `test_fraction` of each user's interactions.
///
/// Each user with `n_u` interactions gives `round(test_fraction * n_u)` of them to the test
/// set, but always keeps at least one in train (so a user with one interaction keeps it).
/// `test_fraction` is meant to lie in `[0, 1)`; other values are clamped to `[0, 1]` and NaN
/// counts as 0. [`super::load_split`] rejects them instead.
///
/// - [`SplitKind::Random`] draws each user's held-out set from one `StdRng` seeded with
///   `seed`, users taken in index order, so a seed always gives the same split (for a given
///   version of `rand`).
/// - [`SplitKind::Temporal`] holds out each user's latest interactions by timestamp, ties
///   going by file order. A user with any interaction lacking a timestamp is split by file
///   order instead: the last lines are the latest. `seed` is not used.
///
/// Both sets are ordered by user, then by their order in `ds.interactions`.
pub fn split(ds: &Dataset, test_fraction: f64, kind: SplitKind, seed: u64) -> Split {
    let fraction = if test_fraction.is_nan() { 0.0 } else { test_fraction.clamp(0.0, 1.0) };
    let by_user = positions_by_user(&ds.interactions, ds.n_users());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut in_test = vec![false; ds.interactions.len()];
    let mut order = Vec::new();
    for positions in &by_user {
        let n_u = positions.len();
        let n_test = ((fraction * n_u as f64).round() as usize).min(n_u.saturating_sub(1));
        if n_test == 0 {
            continue;
        }
        order.clear();
        order.extend_from_slice(positions);
        let held_out = match kind {
            SplitKind::Random => {
                order.shuffle(&mut rng);
                &order[..n_test]
            }
            SplitKind::Temporal => {
                let timestamps: Option<Vec<i64>> =
                    order.iter().map(|&p| ds.interactions[p].timestamp).collect();
                if let Some(timestamps) = timestamps {
                    // Positions ascend, so a stable sort breaks ties by file order.
                    let mut keyed: Vec<(i64, usize)> =
                        timestamps.into_iter().zip(order.iter().copied()).collect();
                    keyed.sort_by_key(|&(t, _)| t);
                    order.clear();
                    order.extend(keyed.into_iter().map(|(_, p)| p));
                }
                &order[n_u - n_test..]
            }
        };
        for &p in held_out {
            in_test[p] = true;
        }
    }
    let n_test_total = in_test.iter().filter(|&&t| t).count();
    let mut train = Vec::with_capacity(ds.interactions.len() - n_test_total);
    let mut test = Vec::with_capacity(n_test_total);
    for positions in &by_user {
        for &p in positions {
            let x = ds.interactions[p];
            if in_test[p] {
                test.push(x);
            } else {
                train.push(x);
            }
        }
    }
    Split { name: ds.name.clone(), user_ids: ds.user_ids.clone(), item_ids: ds.item_ids.clone(), train, test }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n_users` users with `per_user` interactions each, interleaved across users as in a
    /// real log; timestamps run backwards through the file so file order is not time order.
    fn dataset(n_users: u32, per_user: u32) -> Dataset {
        let mut interactions = Vec::new();
        for k in 0..per_user {
            for user in 0..n_users {
                interactions.push(Interaction {
                    user,
                    item: k,
                    rating: (k % 5 + 1) as f32,
                    timestamp: Some(i64::from(1_000 - k)),
                });
            }
        }
        Dataset {
            name: "synthetic".into(),
            user_ids: (0..n_users).map(|u| format!("u{u}")).collect(),
            item_ids: (0..per_user).map(|i| format!("i{i}")).collect(),
            interactions,
        }
    }

    fn per_user_counts(xs: &[Interaction], n_users: usize) -> Vec<usize> {
        let mut counts = vec![0; n_users];
        for x in xs {
            counts[x.user as usize] += 1;
        }
        counts
    }

    /// Users ascend, and within a user the original (here: item) order is kept.
    fn assert_ordered(xs: &[Interaction]) {
        for w in xs.windows(2) {
            assert!((w[0].user, w[0].item) < (w[1].user, w[1].item), "{w:?}");
        }
    }

    #[test]
    fn random_split_holds_out_the_fraction_of_every_user() {
        let ds = dataset(10, 10);
        let s = split(&ds, 0.2, SplitKind::Random, 7);
        assert_eq!(per_user_counts(&s.test, 10), vec![2; 10]);
        assert_eq!(per_user_counts(&s.train, 10), vec![8; 10]);
        assert_ordered(&s.train);
        assert_ordered(&s.test);
        let mut all: Vec<_> = s.train.iter().chain(&s.test).map(|x| (x.user, x.item)).collect();
        all.sort_unstable();
        let mut expected: Vec<_> = ds.interactions.iter().map(|x| (x.user, x.item)).collect();
        expected.sort_unstable();
        assert_eq!(all, expected);
        assert_eq!((s.name.as_str(), s.n_users(), s.n_items()), ("synthetic", 10, 10));
    }

    #[test]
    fn random_split_is_deterministic_per_seed() {
        let ds = dataset(10, 10);
        let a = split(&ds, 0.3, SplitKind::Random, 42);
        let b = split(&ds, 0.3, SplitKind::Random, 42);
        let c = split(&ds, 0.3, SplitKind::Random, 43);
        assert_eq!(a, b);
        assert_ne!(a.test, c.test);
    }

    #[test]
    fn temporal_split_holds_out_the_latest() {
        let ds = dataset(4, 10);
        let s = split(&ds, 0.3, SplitKind::Temporal, 0);
        // Timestamps fall as items rise, so the latest are items 0, 1 and 2.
        for user in 0..4 {
            let held: Vec<u32> = s.test.iter().filter(|x| x.user == user).map(|x| x.item).collect();
            assert_eq!(held, [0, 1, 2]);
        }
        assert_eq!(s, split(&ds, 0.3, SplitKind::Temporal, 99), "seed is unused");
    }

    #[test]
    fn temporal_ties_and_missing_timestamps_go_by_file_order() {
        let mut ds = dataset(2, 5);
        for x in &mut ds.interactions {
            x.timestamp = if x.user == 0 { Some(5) } else { None };
        }
        // One user with a timestamp among missing ones still goes by file order.
        ds.interactions[1].timestamp = Some(i64::MAX);
        let s = split(&ds, 0.4, SplitKind::Temporal, 0);
        let held = |user| -> Vec<u32> { s.test.iter().filter(|x| x.user == user).map(|x| x.item).collect() };
        assert_eq!(held(0), [3, 4]);
        assert_eq!(held(1), [3, 4]);
    }

    #[test]
    fn users_keep_at_least_one_training_interaction() {
        let mut ds = dataset(3, 4);
        // User 0 keeps one interaction, user 1 two.
        ds.interactions.retain(|x| match x.user {
            0 => x.item == 0,
            1 => x.item < 2,
            _ => true,
        });
        for kind in [SplitKind::Random, SplitKind::Temporal] {
            let s = split(&ds, 0.9, kind, 3);
            assert_eq!(per_user_counts(&s.train, 3), [1, 1, 1], "{kind}");
            assert_eq!(per_user_counts(&s.test, 3), [0, 1, 3], "{kind}");
            // Out-of-range fractions are clamped, never panic.
            let s = split(&ds, 5.0, kind, 3);
            assert_eq!(per_user_counts(&s.train, 3), [1, 1, 1], "{kind}");
            let s = split(&ds, f64::NAN, kind, 3);
            assert!(s.test.is_empty());
        }
    }

    #[test]
    fn zero_fraction_keeps_everything_in_train() {
        let ds = dataset(3, 3);
        let s = split(&ds, 0.0, SplitKind::Random, 1);
        assert!(s.test.is_empty());
        assert_eq!(s.train.len(), 9);
        assert_ordered(&s.train);
    }
}
