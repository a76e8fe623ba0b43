//! Datasets for the simulator: loading rating files, per-user train/test splits and fetching MovieLens-100K.
//!
//! Everything here works on dense indices: users and items get `0..n` in order of first
//! appearance, and the original string ids are kept alongside for reports.
//!
//! Supported rating formats, detected from the first non-empty line of each file:
//!
//! - `::`-separated, as MovieLens 1M/10M `ratings.dat`: `user::item::rating::timestamp`;
//! - tab-separated, as MovieLens-100K `u.data`, recbole's `.inter` files or any generic
//!   `user<TAB>item<TAB>rating[<TAB>timestamp]` file;
//! - comma-separated, as MovieLens 20M/25M `ratings.csv`: `userId,movieId,rating,timestamp`.
//!
//! See [`load`] for the exact rules (headers, blank lines, duplicates, encodings).

mod error;
mod fetch;
mod parse;
mod split;
mod synthetic;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use error::DataError;
pub use fetch::{ML100K_FILES, RECBOLE_VERSION, RECBOLE_WHEEL_SHA256, fetch_ml100k};
pub use parse::load_item_genres;
pub use split::split;
pub use synthetic::{SyntheticParams, synthetic};

/// One rating/interaction with dense indices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    /// Dense user index, `0..n_users`.
    pub user: u32,
    /// Dense item index, `0..n_items`.
    pub item: u32,
    /// The rating as given in the file (a finite number).
    pub rating: f32,
    /// Seconds since the Unix epoch, when the file has a timestamp column.
    pub timestamp: Option<i64>,
}

/// A loaded dataset: dense user/item indices, with the original string ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// A short label for reports, such as `ml-100k`.
    pub name: String,
    /// Original user id of each dense user index.
    pub user_ids: Vec<String>,
    /// Original item id of each dense item index.
    pub item_ids: Vec<String>,
    /// The interactions, in file order (after removing duplicates).
    pub interactions: Vec<Interaction>,
}

impl Dataset {
    /// Number of distinct users.
    pub fn n_users(&self) -> usize {
        self.user_ids.len()
    }

    /// Number of distinct items.
    pub fn n_items(&self) -> usize {
        self.item_ids.len()
    }
}

/// A train/test split over one shared index space (items = every item seen in train or test).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// A short label for reports, taken from the dataset.
    pub name: String,
    /// Original user id of each dense user index (users of train and test).
    pub user_ids: Vec<String>,
    /// Original item id of each dense item index (items of train and test).
    pub item_ids: Vec<String>,
    /// Training interactions, ordered by user, then by original order.
    pub train: Vec<Interaction>,
    /// Held-out interactions, ordered by user, then by original order.
    pub test: Vec<Interaction>,
}

impl Split {
    /// Number of users in the shared index space.
    pub fn n_users(&self) -> usize {
        self.user_ids.len()
    }

    /// Number of items in the shared index space.
    pub fn n_items(&self) -> usize {
        self.item_ids.len()
    }

    /// Smallest and largest rating in the training set, or `(0.0, 0.0)` when it is empty.
    pub fn rating_range(&self) -> (f32, f32) {
        let mut ratings = self.train.iter().map(|x| x.rating);
        let Some(first) = ratings.next() else {
            return (0.0, 0.0);
        };
        ratings.fold((first, first), |(lo, hi), r| (lo.min(r), hi.max(r)))
    }
}

/// How [`split`] chooses each user's held-out interactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SplitKind {
    /// A seeded random subset of each user's interactions.
    Random,
    /// Each user's latest interactions by timestamp.
    Temporal,
}

impl SplitKind {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SplitKind::Random => "random",
            SplitKind::Temporal => "temporal",
        }
    }
}

impl fmt::Display for SplitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SplitKind {
    type Err = DataError;

    /// Parses `random` or `temporal` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("random") {
            Ok(SplitKind::Random)
        } else if s.eq_ignore_ascii_case("temporal") {
            Ok(SplitKind::Temporal)
        } else {
            Err(DataError::InvalidArgument(format!(
                "unknown split kind {:?}: expected \"random\" or \"temporal\"",
                parse::truncate_for_message(s)
            )))
        }
    }
}

/// Where a dataset comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// MovieLens-100K from the recbole wheel, fetched into `data_dir` when missing.
    MovieLens100k {
        /// Folder holding (or receiving) `ml-100k/`.
        data_dir: PathBuf,
    },
    /// One ratings file in any supported format (auto-detected).
    Ratings(PathBuf),
    /// A generated population (see [`synthetic`]).
    Synthetic(SyntheticParams),
    /// Explicit train and test files, generic TSV format.
    ///
    /// The format is auto-detected as for [`DataSource::Ratings`], so the other formats work too.
    TrainTest {
        /// The training interactions.
        train: PathBuf,
        /// The held-out interactions.
        test: PathBuf,
    },
}

/// Loads a single-file dataset (MovieLens100k or Ratings). Errors for TrainTest (use [`load_split`]).
///
/// Rules shared by every format:
///
/// - dense indices are assigned in order of first appearance, so loading is deterministic;
/// - blank lines are skipped; line numbers in errors count every line, 1-based;
/// - for tab- and comma-separated files, a *first* record whose rating field is not a
///   number is a header and is skipped (`::` files have no header);
/// - comma-separated files follow CSV quoting (a quoted field may hold commas or newlines);
///   tab-separated files have none, so a `"` there is an ordinary character;
/// - columns beyond the fourth are ignored, and an empty fourth column means "no timestamp";
/// - ids are trimmed of surrounding whitespace; a field that is not valid UTF-8 is read as
///   Latin-1 (the original MovieLens files are Latin-1), so no file fails on its encoding;
/// - a duplicate (user, item) pair keeps only its last occurrence, at that occurrence's
///   position;
/// - a file without any interaction is [`DataError::Empty`].
///
/// `MovieLens100k` first calls [`fetch_ml100k`], which downloads the files when missing.
pub fn load(source: &DataSource) -> Result<Dataset, DataError> {
    match source {
        DataSource::MovieLens100k { data_dir } => {
            let dir = fetch_ml100k(data_dir)?;
            let mut ds = parse::load_file(&dir.join(fetch::ML100K_INTER))?;
            ds.name = "ml-100k".to_owned();
            Ok(ds)
        }
        DataSource::Ratings(path) => parse::load_file(path),
        DataSource::Synthetic(params) => synthetic(params),
        DataSource::TrainTest { .. } => Err(DataError::InvalidArgument(
            "a train/test source holds two files; load it with load_split".to_owned(),
        )),
    }
}

/// Loads and splits.
///
/// For MovieLens100k/Ratings this is a per-user holdout via [`split`]; `test_fraction` must
/// lie in `[0, 1)`. For TrainTest the files are used as given (`test_fraction`, `kind` and
/// `seed` are ignored): one shared id space, ids mapped in order of first appearance across
/// train then test. Duplicates are removed within each file, not across them, and each set
/// is ordered by user, then file order, as [`split`] orders its output.
pub fn load_split(
    source: &DataSource,
    test_fraction: f64,
    kind: SplitKind,
    seed: u64,
) -> Result<Split, DataError> {
    match source {
        DataSource::TrainTest { train, test } => parse::load_train_test(train, test),
        DataSource::MovieLens100k { .. } | DataSource::Ratings(_) | DataSource::Synthetic(_) => {
            if !(0.0..1.0).contains(&test_fraction) {
                return Err(DataError::InvalidArgument(format!(
                    "test fraction must be in [0, 1), got {test_fraction}"
                )));
            }
            let ds = load(source)?;
            Ok(split(&ds, test_fraction, kind, seed))
        }
    }
}

/// Default data dir: `$FEDREC_DATA` or `data`.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("FEDREC_DATA") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("data"),
    }
}

/// A short label for a dataset read from `path`: the file name without its extension.
fn name_from_path(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "dataset".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_kind_round_trips_through_strings() {
        for kind in [SplitKind::Random, SplitKind::Temporal] {
            assert_eq!(kind.to_string().parse::<SplitKind>().expect("parses"), kind);
        }
        assert_eq!("Temporal".parse::<SplitKind>().expect("parses"), SplitKind::Temporal);
        assert!(matches!("sideways".parse::<SplitKind>(), Err(DataError::InvalidArgument(_))));
    }

    #[test]
    fn rating_range_covers_train_only() {
        let at = |rating| Interaction { user: 0, item: 0, rating, timestamp: None };
        let s = Split {
            name: "t".into(),
            user_ids: vec!["u".into()],
            item_ids: vec!["i".into()],
            train: vec![at(2.0), at(4.5), at(3.0)],
            test: vec![at(0.5), at(5.0)],
        };
        assert_eq!(s.rating_range(), (2.0, 4.5));
        let empty = Split { train: vec![], ..s };
        assert_eq!(empty.rating_range(), (0.0, 0.0));
    }

    #[test]
    fn load_rejects_train_test_and_load_split_checks_the_fraction() {
        let tt = DataSource::TrainTest { train: "a".into(), test: "b".into() };
        assert!(matches!(load(&tt), Err(DataError::InvalidArgument(_))));
        let r = DataSource::Ratings("does-not-matter.tsv".into());
        for bad in [-0.1, 1.0, f64::NAN] {
            assert!(matches!(load_split(&r, bad, SplitKind::Random, 1), Err(DataError::InvalidArgument(_))));
        }
    }

    #[test]
    fn names_come_from_file_stems() {
        assert_eq!(name_from_path(Path::new("data/ml-1m/ratings.dat")), "ratings");
        assert_eq!(name_from_path(Path::new("u1.base")), "u1");
    }
}
