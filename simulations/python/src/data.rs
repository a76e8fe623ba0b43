//! `fedrec.data`: MovieLens-100K (fetched and checked by `fedrec_sim::data`, as `fedrec-sim fetch` does), ratings files in the CLI's formats, synthetic populations and the splits, as numpy arrays.

use std::collections::HashMap;
use std::path::PathBuf;

use fedrec_sim::data::{self, DataSource, Dataset, Interaction, Split, SplitKind, SyntheticParams};
use fedrec_sim::report::DatasetInfo;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::to_py;
use crate::errors::{DataError, config_err, data_err};

/// A loaded dataset: dense user and item indices (`0..n`, in order of first appearance) and
/// the original ids. Wraps `fedrec_sim::data::Dataset`.
#[pyclass(frozen, module = "fedrec._fedrec", name = "Dataset")]
pub struct PyDataset {
    /// The simulator's dataset.
    pub inner: Dataset,
}

/// A train/test split over one index space. Wraps `fedrec_sim::data::Split` and remembers how
/// it was made (for the report's dataset description).
#[pyclass(frozen, module = "fedrec._fedrec", name = "Split")]
pub struct PySplit {
    /// The simulator's split.
    pub inner: Split,
    /// `random`, `temporal` or `given`.
    pub how: String,
    /// The held-out fraction (0 for given files).
    pub test_fraction: f64,
}

impl PySplit {
    /// What the CLI's reports say about the data.
    pub fn dataset_info(&self) -> DatasetInfo {
        DatasetInfo::of(&self.inner, &self.how, self.test_fraction)
    }
}

/// The columns of interactions as a dict of numpy arrays: `user`, `item` (int64 dense
/// indices), `rating` (float32), `timestamp` (int64, or `None` when no interaction has one;
/// a missing timestamp among present ones is -1).
fn columns<'py>(py: Python<'py>, xs: &[Interaction]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("user", PyArray1::from_iter(py, xs.iter().map(|x| i64::from(x.user))))?;
    d.set_item("item", PyArray1::from_iter(py, xs.iter().map(|x| i64::from(x.item))))?;
    d.set_item("rating", PyArray1::from_iter(py, xs.iter().map(|x| x.rating)))?;
    if xs.iter().any(|x| x.timestamp.is_some()) {
        d.set_item("timestamp", PyArray1::from_iter(py, xs.iter().map(|x| x.timestamp.unwrap_or(-1))))?;
    } else {
        d.set_item("timestamp", py.None())?;
    }
    Ok(d)
}

fn split_kind(kind: &str) -> PyResult<SplitKind> {
    kind.parse::<SplitKind>().map_err(|e| config_err(e.to_string()))
}

#[pymethods]
impl PyDataset {
    /// A short label, such as `ml-100k`.
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// Distinct users.
    #[getter]
    fn n_users(&self) -> usize {
        self.inner.n_users()
    }

    /// Distinct items.
    #[getter]
    fn n_items(&self) -> usize {
        self.inner.n_items()
    }

    /// Original id of each dense user index.
    #[getter]
    fn user_ids(&self) -> Vec<String> {
        self.inner.user_ids.clone()
    }

    /// Original id of each dense item index.
    #[getter]
    fn item_ids(&self) -> Vec<String> {
        self.inner.item_ids.clone()
    }

    /// Interactions.
    fn __len__(&self) -> usize {
        self.inner.interactions.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Dataset({:?}: {} users, {} items, {} interactions)",
            self.inner.name,
            self.inner.n_users(),
            self.inner.n_items(),
            self.inner.interactions.len()
        )
    }

    /// The interactions as a dict of numpy arrays (`pandas.DataFrame(ds.columns())`).
    fn columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        columns(py, &self.inner.interactions)
    }

    /// A per-user holdout, as `fedrec-sim` makes it from `--test-fraction`, `--split`, `--seed`.
    #[pyo3(signature = (test_fraction=0.2, kind="random", seed=1))]
    fn split(&self, py: Python<'_>, test_fraction: f64, kind: &str, seed: u64) -> PyResult<PySplit> {
        if !(0.0..1.0).contains(&test_fraction) {
            return Err(config_err(format!("test fraction must be in [0, 1), got {test_fraction}")));
        }
        let kind = split_kind(kind)?;
        let inner = py.detach(|| data::split(&self.inner, test_fraction, kind, seed));
        Ok(PySplit { inner, how: kind.as_str().to_owned(), test_fraction })
    }
}

#[pymethods]
impl PySplit {
    /// A short label, taken from the dataset.
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// Users in the shared index space.
    #[getter]
    fn n_users(&self) -> usize {
        self.inner.n_users()
    }

    /// Items in the shared index space.
    #[getter]
    fn n_items(&self) -> usize {
        self.inner.n_items()
    }

    /// Original id of each dense user index.
    #[getter]
    fn user_ids(&self) -> Vec<String> {
        self.inner.user_ids.clone()
    }

    /// Original id of each dense item index.
    #[getter]
    fn item_ids(&self) -> Vec<String> {
        self.inner.item_ids.clone()
    }

    /// `random`, `temporal` or `given`.
    #[getter]
    fn kind(&self) -> &str {
        &self.how
    }

    /// Smallest and largest training rating.
    #[getter]
    fn rating_range(&self) -> (f32, f32) {
        self.inner.rating_range()
    }

    /// Training interactions as a dict of numpy arrays.
    #[getter]
    fn train<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        columns(py, &self.inner.train)
    }

    /// Held-out interactions as a dict of numpy arrays.
    #[getter]
    fn test<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        columns(py, &self.inner.test)
    }

    /// The dataset description of the CLI's reports (`dataset` in `--json`).
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.dataset_info())
    }

    fn __repr__(&self) -> String {
        format!(
            "Split({:?}, {}: {} users, {} items, {} train / {} test)",
            self.inner.name,
            self.how,
            self.inner.n_users(),
            self.inner.n_items(),
            self.inner.train.len(),
            self.inner.test.len()
        )
    }
}

/// `$FEDREC_DATA` or `data`, as the CLI.
#[pyfunction]
fn data_default_dir() -> PathBuf {
    data::default_data_dir()
}

/// Downloads MovieLens-100K into `data_dir/ml-100k/` (checked by SHA-256) unless it is there.
#[pyfunction]
#[pyo3(signature = (data_dir=None))]
fn data_fetch_ml100k(py: Python<'_>, data_dir: Option<PathBuf>) -> PyResult<PathBuf> {
    let dir = data_dir.unwrap_or_else(data::default_data_dir);
    py.detach(|| data::fetch_ml100k(&dir)).map_err(|e| data_err(&e))
}

/// MovieLens-100K, fetched when missing.
#[pyfunction]
#[pyo3(signature = (data_dir=None))]
fn data_ml100k(py: Python<'_>, data_dir: Option<PathBuf>) -> PyResult<PyDataset> {
    let data_dir = data_dir.unwrap_or_else(data::default_data_dir);
    load(py, DataSource::MovieLens100k { data_dir })
}

/// A ratings file in any format the CLI reads (`--ratings`).
#[pyfunction]
fn data_load_ratings(py: Python<'_>, path: PathBuf) -> PyResult<PyDataset> {
    load(py, DataSource::Ratings(path))
}

fn load(py: Python<'_>, source: DataSource) -> PyResult<PyDataset> {
    let inner = py.detach(|| data::load(&source)).map_err(|e| data_err(&e))?;
    Ok(PyDataset { inner })
}

/// Explicit train and test files (`--train`, `--test`).
#[pyfunction]
fn data_load_train_test(py: Python<'_>, train: PathBuf, test: PathBuf) -> PyResult<PySplit> {
    let source = DataSource::TrainTest { train, test };
    let inner =
        py.detach(|| data::load_split(&source, 0.0, SplitKind::Random, 0)).map_err(|e| data_err(&e))?;
    Ok(PySplit { inner, how: "given".to_owned(), test_fraction: 0.0 })
}

/// The synthetic population `--dataset synthetic` generates.
#[pyfunction]
#[pyo3(signature = (users, items, seed, preference_strength=None, popularity_exponent=None))]
fn data_synthetic(
    py: Python<'_>,
    users: usize,
    items: usize,
    seed: u64,
    preference_strength: Option<f64>,
    popularity_exponent: Option<f64>,
) -> PyResult<PyDataset> {
    let mut p = SyntheticParams::movielens_like(users, items, seed);
    p.preference_strength = preference_strength.unwrap_or(p.preference_strength);
    p.popularity_exponent = popularity_exponent.unwrap_or(p.popularity_exponent);
    load(py, DataSource::Synthetic(p))
}

/// Dense indices for ids, in order of first appearance.
#[derive(Default)]
struct Ids {
    index: HashMap<String, u32>,
    ids: Vec<String>,
}

impl Ids {
    fn intern(&mut self, id: &str) -> PyResult<u32> {
        if let Some(&i) = self.index.get(id) {
            return Ok(i);
        }
        let i =
            u32::try_from(self.ids.len()).map_err(|_| DataError::new_err("more than 2^32 distinct ids"))?;
        self.index.insert(id.to_owned(), i);
        self.ids.push(id.to_owned());
        Ok(i)
    }
}

/// A dataset from columns, under the rules of the file loader: dense indices in order of
/// first appearance, a duplicate (user, item) pair keeps its last occurrence, ratings finite.
#[pyfunction]
#[pyo3(signature = (users, items, ratings, timestamps, name))]
fn data_from_columns(
    users: Vec<String>,
    items: Vec<String>,
    ratings: PyReadonlyArray1<'_, f32>,
    timestamps: Option<PyReadonlyArray1<'_, i64>>,
    name: String,
) -> PyResult<PyDataset> {
    let ratings = ratings.as_array();
    let timestamps = timestamps.as_ref().map(|t| t.as_array());
    let n = users.len();
    if items.len() != n || ratings.len() != n || timestamps.as_ref().is_some_and(|t| t.len() != n) {
        return Err(config_err(format!(
            "columns of different lengths: {} users, {} items, {} ratings{}",
            n,
            items.len(),
            ratings.len(),
            timestamps.as_ref().map(|t| format!(", {} timestamps", t.len())).unwrap_or_default()
        )));
    }
    if n == 0 {
        return Err(DataError::new_err(format!("{name}: no interactions found")));
    }
    let (mut user_ids, mut item_ids) = (Ids::default(), Ids::default());
    let mut interactions = Vec::with_capacity(n);
    let mut last: HashMap<(u32, u32), usize> = HashMap::with_capacity(n);
    let mut keep = vec![true; n];
    for k in 0..n {
        let rating = ratings[k];
        if !rating.is_finite() {
            return Err(DataError::new_err(format!("{name}: row {k}: the rating is not a finite number")));
        }
        let user = user_ids.intern(&users[k])?;
        let item = item_ids.intern(&items[k])?;
        if let Some(prev) = last.insert((user, item), k) {
            keep[prev] = false;
        }
        interactions.push(Interaction { user, item, rating, timestamp: timestamps.as_ref().map(|t| t[k]) });
    }
    let interactions = interactions.into_iter().zip(keep).filter_map(|(x, kept)| kept.then_some(x)).collect();
    Ok(PyDataset { inner: Dataset { name, user_ids: user_ids.ids, item_ids: item_ids.ids, interactions } })
}

/// Adds the classes and functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDataset>()?;
    m.add_class::<PySplit>()?;
    m.add("RECBOLE_VERSION", data::RECBOLE_VERSION)?;
    m.add("RECBOLE_WHEEL_SHA256", data::RECBOLE_WHEEL_SHA256)?;
    m.add_function(wrap_pyfunction!(data_default_dir, m)?)?;
    m.add_function(wrap_pyfunction!(data_fetch_ml100k, m)?)?;
    m.add_function(wrap_pyfunction!(data_ml100k, m)?)?;
    m.add_function(wrap_pyfunction!(data_load_ratings, m)?)?;
    m.add_function(wrap_pyfunction!(data_load_train_test, m)?)?;
    m.add_function(wrap_pyfunction!(data_synthetic, m)?)?;
    m.add_function(wrap_pyfunction!(data_from_columns, m)?)?;
    Ok(())
}
