//! `fedrec.simulate`, `fedrec.sweep`, `fedrec.audit` and the trained `Model`: the federation of `fedrec-sim run` (`fedrec_sim::federation::run`), configured from keyword arguments exactly as the CLI configures it from flags.

use std::ops::ControlFlow;
use std::time::Instant;

use clap::ValueEnum;
use fedrec_shared::eval::{ReconstructionScorer, evaluate, score_items};
use fedrec_shared::train::{reconstruct, validate_ratings};
use fedrec_shared::{Rating, RoundModel, TrainParams};
use fedrec_sim::federation::{
    self, AccountantArg, AggregationKind, MechanismKind, MetricsRecord, ObjectiveKind, OptimizerKind,
    RunConfig, Transport, UserData,
};
use fedrec_sim::report::{RunReport, SweepPoint, SweepReport};
use fedrec_sim::segments;
use fedrec_sim::tune::ConfigFile;
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::to_py;
use crate::data::PySplit;
use crate::errors::{DataError, SimulationError, config_err, sim_err};
use fedrec_sim::audit;

/// A run's configuration from keyword arguments, and what the data loading needs.
struct Options {
    cfg: RunConfig,
    clipping: federation::Clipping,
    relevance_threshold: Option<f32>,
}

/// Every keyword `simulate`, `sweep` and `audit` accept: the `fedrec-sim run` flags with
/// underscores (data flags excepted: the data is the `Split` argument).
pub const OPTION_NAMES: [&str; 39] = [
    "config",
    "objective",
    "rounds",
    "clients_per_round",
    "dim",
    "segments",
    "l2_user",
    "l2_user_bias",
    "l2_item",
    "l2_item_bias",
    "user_support_exponent",
    "alpha",
    "optimizer",
    "server_lr",
    "momentum",
    "clip_norm",
    "noise_multiplier",
    "dropout",
    "epsilon",
    "delta",
    "accountant",
    "clip",
    "target_quantile",
    "clip_lr",
    "clip_count_noise",
    "init_std",
    "eval_every",
    "eval_users",
    "threads",
    "seed",
    "transport",
    "checkin_window_ms",
    "report_window_ms",
    "aggregation",
    "secagg_dropout",
    "secagg_corrupt",
    "mechanism",
    "bits",
    "relevance_threshold",
];

fn get<'py, T: FromPyObjectOwned<'py>>(opts: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>> {
    match opts.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.extract::<T>().map(Some).map_err(|e| {
            let e: PyErr = e.into();
            config_err(format!("{key}: {e}"))
        }),
    }
}

fn get_enum<E: ValueEnum>(opts: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<E>> {
    let Some(s) = get::<String>(opts, key)? else { return Ok(None) };
    E::from_str(&s, false).map(Some).map_err(|_| {
        let names: Vec<String> = E::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
            .collect();
        config_err(format!("{key}: invalid value {s:?} (possible values: {})", names.join(", ")))
    })
}

/// `RunArgs::config` of the CLI, from a dict of keyword arguments (None = the flag not given).
fn options(opts: &Bound<'_, PyDict>) -> PyResult<Options> {
    for key in opts.keys() {
        let key: String = key.extract()?;
        if !OPTION_NAMES.contains(&key.as_str()) {
            return Err(config_err(format!("unknown option {key:?}")));
        }
    }
    let file = match get::<std::path::PathBuf>(opts, "config")? {
        Some(path) => Some(ConfigFile::read(&path).map_err(|e| config_err(format!("config: {e}")))?),
        None => None,
    };
    let file_objective = file.as_ref().and_then(|f| f.objective());
    let objective =
        get_enum::<ObjectiveKind>(opts, "objective")?.or(file_objective).unwrap_or(ObjectiveKind::Explicit);
    let mut c = RunConfig::defaults(objective);
    if let Some(file) = &file {
        file.apply(&mut c);
    }
    macro_rules! set {
        ($($f:literal => $t:ident),*) => { $( if let Some(v) = get(opts, $f)? { c.$t = v; } )* };
    }
    set!("rounds" => rounds, "clients_per_round" => clients_per_round, "dim" => dim, "segments" => n_segments,
         "l2_user" => l2_user, "l2_user_bias" => l2_user_bias, "l2_item" => l2_item, "l2_item_bias" => l2_item_bias,
         "user_support_exponent" => user_support_exponent, "alpha" => alpha, "server_lr" => server_lr, "momentum" => momentum, "clip_norm" => clip_norm,
         "noise_multiplier" => noise_multiplier, "dropout" => dropout, "init_std" => init_std,
         "eval_every" => eval_every, "eval_users" => eval_users, "threads" => threads,
         "delta" => delta, "target_quantile" => target_quantile, "clip_lr" => clip_learning_rate,
         "checkin_window_ms" => checkin_window_ms, "report_window_ms" => report_window_ms,
         "secagg_dropout" => secagg_dropout, "secagg_corrupt" => secagg_corrupt);
    c.aggregation = get_enum::<AggregationKind>(opts, "aggregation")?.unwrap_or(AggregationKind::Plain);
    c.mechanism = get_enum::<MechanismKind>(opts, "mechanism")?.unwrap_or(MechanismKind::Central);
    if let Some(bits) = get(opts, "bits")? {
        c.bits = bits;
    }
    c.transport = get_enum::<Transport>(opts, "transport")?.unwrap_or(Transport::Inproc);
    c.epsilon = get(opts, "epsilon")?;
    c.clip_count_noise = get(opts, "clip_count_noise")?;
    if let Some(a) = get_enum::<AccountantArg>(opts, "accountant")? {
        c.accountant = a;
    }
    let clipping = federation::Clipping {
        mode: get_enum::<federation::ClipMode>(opts, "clip")?.unwrap_or(federation::ClipMode::Auto),
        clip_norm_given: get::<f32>(opts, "clip_norm")?.is_some(),
        file_clip_norm: file.as_ref().and_then(|f| f.clip_norm()),
    };
    let noisy_central =
        (c.epsilon.is_some() || c.noise_multiplier > 0.0) && c.mechanism == MechanismKind::Central;
    clipping.apply(&mut c, noisy_central);
    if let Some(o) = get_enum::<OptimizerKind>(opts, "optimizer")? {
        c.optimizer = o;
    }
    c.seed = get(opts, "seed")?.unwrap_or(1);
    Ok(Options { cfg: c, clipping, relevance_threshold: get(opts, "relevance_threshold")? })
}

/// The CLI's `load` after the split: the checks, the relevance rule, the per-user data.
fn user_data(
    split: &PySplit,
    objective: ObjectiveKind,
    relevance_threshold: Option<f32>,
) -> PyResult<UserData> {
    let s = &split.inner;
    if s.train.is_empty() {
        return Err(SimulationError::new_err("the training set is empty"));
    }
    if s.test.is_empty() {
        return Err(SimulationError::new_err(
            "the test set is empty: raise --test-fraction or give a --test file",
        ));
    }
    let threshold = relevance_threshold.or_else(|| {
        let (lo, hi) = s.rating_range();
        (lo < hi).then_some(4.0)
    });
    Ok(UserData::from_split(s, objective, threshold))
}

/// What the per-round callback did.
#[derive(Default)]
struct Callback {
    /// The round after which it returned `False`.
    stop_requested: Option<usize>,
    /// The exception it raised (or a pending KeyboardInterrupt), re-raised after the run.
    error: Option<PyErr>,
}

impl Callback {
    /// Calls `f` with the round's record as a dict; the run stops after this round when it
    /// returned `False` or raised.
    fn call(&mut self, f: &Py<PyAny>, rec: &federation::RoundRecord) -> ControlFlow<()> {
        if self.stop_requested.is_some() || self.error.is_some() {
            return ControlFlow::Break(());
        }
        Python::attach(|py| {
            let out = py.check_signals().and_then(|()| to_py(py, rec)).and_then(|d| f.call1(py, (d,)));
            match out {
                Ok(v) => {
                    if matches!(v.extract::<bool>(py), Ok(false)) {
                        self.stop_requested = Some(rec.round);
                    }
                }
                Err(e) => self.error = Some(e),
            }
        });
        if self.stop_requested.is_some() || self.error.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// A trained model: the coordinator's global model after the run, and the device-side
/// parameters that reconstruct a user from it.
#[pyclass(frozen, module = "fedrec._fedrec", name = "Model")]
pub struct PyModel {
    model: RoundModel,
    params: TrainParams,
    objective: ObjectiveKind,
    threads: usize,
}

fn ratings_of(
    items: &PyReadonlyArray1<'_, i64>,
    values: &PyReadonlyArray1<'_, f32>,
) -> PyResult<Vec<Rating>> {
    let (items, values) = (items.as_array(), values.as_array());
    if items.len() != values.len() {
        return Err(config_err(format!("{} items but {} values", items.len(), values.len())));
    }
    items
        .iter()
        .zip(values.iter())
        .map(|(&i, &v)| {
            let item = u32::try_from(i)
                .map_err(|_| DataError::new_err(format!("item {i} is not a dense item index")))?;
            Ok(Rating { item, value: v })
        })
        .collect()
}

impl PyModel {
    fn user(
        &self,
        items: &PyReadonlyArray1<'_, i64>,
        values: &PyReadonlyArray1<'_, f32>,
    ) -> PyResult<fedrec_shared::UserState> {
        let ratings = ratings_of(items, values)?;
        validate_ratings(&ratings, self.model.model.item_factors.nrows(), &self.params.objective)
            .map_err(|e| DataError::new_err(e.to_string()))?;
        reconstruct(&self.model, &ratings, &self.params)
            .map_err(|e| SimulationError::new_err(format!("reconstructing the user: {e}")))
    }
}

#[pymethods]
impl PyModel {
    /// Item factors, `n_items × dim`, float32.
    #[getter]
    fn item_factors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = &self.model.model;
        PyArray1::from_slice(py, m.factors_slice()).reshape([m.item_factors.nrows(), m.item_factors.ncols()])
    }

    /// Item biases, `n_items`, float32.
    #[getter]
    fn item_bias<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_iter(py, self.model.model.item_bias.iter().copied())
    }

    /// Segment centroids, `n_segments × dim`, float32.
    #[getter]
    fn centroids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = &self.model.model;
        PyArray1::from_slice(py, m.centroids_slice()).reshape([m.centroids.nrows(), m.centroids.ncols()])
    }

    /// The global mean rating.
    #[getter]
    fn global_mean(&self) -> f32 {
        self.model.model.global_mean
    }

    /// The model version (committed rounds).
    #[getter]
    fn version(&self) -> u64 {
        self.model.version
    }

    /// `explicit` or `implicit`.
    #[getter]
    fn objective(&self) -> &'static str {
        match self.objective {
            ObjectiveKind::Explicit => "explicit",
            ObjectiveKind::Implicit => "implicit",
        }
    }

    /// The user vector and bias a device computes from its interactions (closed form).
    fn reconstruct<'py>(
        &self,
        py: Python<'py>,
        items: PyReadonlyArray1<'py, i64>,
        values: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, f32)> {
        let u = self.user(&items, &values)?;
        Ok((PyArray1::from_vec(py, u.factors), u.bias))
    }

    /// Every item's score for the user those interactions reconstruct.
    fn scores<'py>(
        &self,
        py: Python<'py>,
        items: PyReadonlyArray1<'py, i64>,
        values: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let u = self.user(&items, &values)?;
        let mut out = vec![0.0f32; self.model.model.item_factors.nrows()];
        score_items(&self.model, &u, &mut out);
        Ok(PyArray1::from_vec(py, out))
    }

    /// The nearest centroid to a user vector and its squared distance.
    fn segment(&self, user_vector: PyReadonlyArray1<'_, f32>) -> PyResult<(usize, f32)> {
        let u = user_vector.as_array();
        let d = self.model.model.centroids.ncols();
        if u.len() != d {
            return Err(config_err(format!(
                "the user vector has {} entries, the model's dimension is {d}",
                u.len()
            )));
        }
        Ok(self.model.model.nearest_segment(&u.to_vec()))
    }

    /// The README's metrics of this model on a split, evaluated as the run evaluates.
    #[pyo3(signature = (split, relevance_threshold=None, eval_users=10_000, seed=1, threads=None))]
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        split: &PySplit,
        relevance_threshold: Option<f32>,
        eval_users: usize,
        seed: u64,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let users = user_data(split, self.objective, relevance_threshold)?;
        if users.n_items != self.model.model.item_factors.nrows() {
            return Err(config_err(format!(
                "the split has {} items, the model {}",
                users.n_items,
                self.model.model.item_factors.nrows()
            )));
        }
        let threads = threads.unwrap_or(self.threads);
        let m = py.detach(|| {
            let sample = users.eval_sample(eval_users, seed);
            let scorer = ReconstructionScorer { model: &self.model, params: self.params };
            evaluate(&scorer, &sample, users.n_items, &users.eval, threads)
        });
        to_py(py, &MetricsRecord::from(m))
    }

    fn __repr__(&self) -> String {
        let m = &self.model.model;
        format!(
            "Model({} items, dim {}, {} segments, version {}, {})",
            m.item_factors.nrows(),
            m.item_factors.ncols(),
            m.centroids.nrows(),
            self.model.version,
            self.objective()
        )
    }
}

/// Runs `fedrec-sim run` on a split. Returns the CLI's JSON report as a dict, the model, and
/// the round after which the callback asked to stop.
#[pyfunction]
#[pyo3(signature = (split, options, on_round=None))]
fn simulate<'py>(
    py: Python<'py>,
    split: &PySplit,
    options: &Bound<'py, PyDict>,
    on_round: Option<Py<PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, PyModel, Option<usize>)> {
    let t0 = Instant::now();
    let Options { mut cfg, relevance_threshold, .. } = self::options(options)?;
    let users = user_data(split, cfg.objective, relevance_threshold)?;
    let info = split.dataset_info();
    cfg.calibrate_for(users.train.len(), users.n_items).context_err("calibrating the noise to --epsilon")?;
    let mut cb = Callback::default();
    let (res, segments) = py
        .detach(|| {
            let res = federation::run_until(&users, &cfg, |rec| match &on_round {
                Some(f) => cb.call(f, rec),
                None => ControlFlow::Continue(()),
            })?;
            let segments = segments::report(&res.model, &cfg.train_params(), &users.train, cfg.seed);
            anyhow::Ok((res, segments))
        })
        .map_err(|e| sim_err(&e))?;
    if let Some(e) = cb.error {
        return Err(e);
    }
    let wall = t0.elapsed().as_secs_f64();
    let per_sec = res.client_updates as f64 / res.train_seconds.max(1e-9);
    let rep = RunReport {
        command: "run",
        fedrec_version: env!("CARGO_PKG_VERSION"),
        dataset: info,
        config: cfg.clone(),
        metrics: res.metrics.into(),
        wall_seconds: wall,
        train_seconds: res.train_seconds,
        client_updates: res.client_updates,
        client_updates_per_second: per_sec,
        history: res.history,
        segments,
        privacy: res.privacy,
    };
    let model = PyModel {
        model: res.model,
        params: cfg.train_params(),
        objective: cfg.objective,
        threads: cfg.threads,
    };
    Ok((to_py(py, &rep)?, model, cb.stop_requested))
}

/// Runs `fedrec-sim sweep` on a split: one run per target ε (`None`: the non-private run),
/// and with `distributed_bits` the central mechanism and distributed noise at each bit width
/// per finite ε (a distributed point the bit width cannot reach is skipped, as the CLI skips
/// it). Returns the CLI's JSON report as a dict.
#[pyfunction]
#[pyo3(signature = (split, epsilons, distributed_bits, options, on_point=None))]
fn sweep<'py>(
    py: Python<'py>,
    split: &PySplit,
    epsilons: Vec<Option<f64>>,
    distributed_bits: Vec<u32>,
    options: &Bound<'py, PyDict>,
    on_point: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let Options { cfg: base, clipping, relevance_threshold } = self::options(options)?;
    let users = user_data(split, base.objective, relevance_threshold)?;
    for e in epsilons.iter().flatten() {
        if !(*e > 0.0 && e.is_finite()) {
            return Err(config_err(format!("--epsilons: {e} is not a positive ε")));
        }
    }
    let mut points = Vec::new();
    for point in federation::sweep_plan(&epsilons, &base, &distributed_bits) {
        let target = point.target;
        let mut cfg = point.config(&base);
        clipping.apply(&mut cfg, point.noisy_central());
        if let Err(e) = cfg.calibrate_for(users.train.len(), users.n_items) {
            if cfg.mechanism == MechanismKind::Distributed {
                continue;
            }
            return Err(sim_err(&e.context("calibrating the noise")));
        }
        let res = py.detach(|| federation::run(&users, &cfg, |_| {})).map_err(|e| sim_err(&e))?;
        let point = SweepPoint {
            target_epsilon: target,
            noise_multiplier: cfg.noise_multiplier,
            privacy: res.privacy,
            metrics: res.metrics.into(),
            train_seconds: res.train_seconds,
            config: cfg,
        };
        if let Some(f) = &on_point {
            let out = py.check_signals().and_then(|()| to_py(py, &point)).and_then(|d| f.call1(py, (d,)));
            if matches!(out?.extract::<bool>(py), Ok(false)) {
                points.push(point);
                break;
            }
        }
        points.push(point);
    }
    let rep = SweepReport {
        command: "sweep",
        fedrec_version: env!("CARGO_PKG_VERSION"),
        dataset: split.dataset_info(),
        points,
    };
    to_py(py, &rep)
}

/// Runs `fedrec-sim audit` on a split. Returns the CLI's JSON report as a dict.
#[pyfunction]
#[pyo3(signature = (split, canaries, guesses, confidence, danger_weaken_noise, options))]
fn audit_run<'py>(
    py: Python<'py>,
    split: &PySplit,
    canaries: usize,
    guesses: Option<usize>,
    confidence: f64,
    danger_weaken_noise: Option<f32>,
    options: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(config_err("--confidence must be in (0, 1)"));
    }
    let Options { cfg, relevance_threshold, .. } = self::options(options)?;
    let users = user_data(split, cfg.objective, relevance_threshold)?;
    let conf = audit::AuditConfig { canaries, guesses, confidence, weaken_noise: danger_weaken_noise };
    let rep = py.detach(|| audit::run(&users, &cfg, &conf)).map_err(|e| sim_err(&e))?;
    to_py(py, &audit::report_json(&split.dataset_info(), &rep))
}

/// The configuration `simulate` would run with these options on this split (noise
/// calibrated), as the `config` of the CLI's report.
#[pyfunction]
fn run_config<'py>(
    py: Python<'py>,
    split: &PySplit,
    options: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let Options { mut cfg, .. } = self::options(options)?;
    cfg.calibrate_for(split.inner.n_users(), split.inner.n_items())
        .context_err("calibrating the noise to --epsilon")?;
    to_py(py, &cfg)
}

/// The CLI's `Result::context` for a PyErr-producing call.
trait ContextErr<T> {
    fn context_err(self, context: &str) -> PyResult<T>;
}

impl<T> ContextErr<T> for anyhow::Result<T> {
    fn context_err(self, context: &str) -> PyResult<T> {
        self.map_err(|e| sim_err(&e.context(context.to_owned())))
    }
}

/// Adds the classes and functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add("OPTION_NAMES", OPTION_NAMES.to_vec())?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(sweep, m)?)?;
    m.add_function(wrap_pyfunction!(audit_run, m)?)?;
    m.add_function(wrap_pyfunction!(run_config, m)?)?;
    Ok(())
}
