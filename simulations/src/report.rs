//! Reports for people and machines: the terminal table, the JSON report and the per-round CSV.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::data::Split;
use crate::federation::{MechanismKind, MetricsRecord, PrivacySpend, RoundRecord, RunConfig};
use crate::segments::SegmentReport;

/// What the data was.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetInfo {
    /// Dataset label.
    pub name: String,
    /// Users.
    pub n_users: usize,
    /// Items.
    pub n_items: usize,
    /// Training interactions.
    pub n_train: usize,
    /// Held-out interactions.
    pub n_test: usize,
    /// Rating range seen in training.
    pub rating_range: (f32, f32),
    /// How the split was made (`random`, `temporal`, or `given` for train/test files).
    pub split: String,
    /// Held-out fraction per user (0 for given files).
    pub test_fraction: f64,
}

impl DatasetInfo {
    /// Describes a split.
    pub fn of(split: &Split, how: &str, test_fraction: f64) -> Self {
        Self {
            name: split.name.clone(),
            n_users: split.n_users(),
            n_items: split.n_items(),
            n_train: split.train.len(),
            n_test: split.test.len(),
            rating_range: split.rating_range(),
            split: how.to_owned(),
            test_fraction,
        }
    }
}

/// The JSON report of `fedrec-sim run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Always `run`.
    pub command: &'static str,
    /// fedrec version.
    pub fedrec_version: &'static str,
    /// The data.
    pub dataset: DatasetInfo,
    /// The full configuration (rerunning it reproduces the run).
    pub config: RunConfig,
    /// Final metrics.
    pub metrics: MetricsRecord,
    /// Whole run, including loading and evaluation.
    pub wall_seconds: f64,
    /// Rounds only.
    pub train_seconds: f64,
    /// Device updates aggregated.
    pub client_updates: usize,
    /// `client_updates / train_seconds`.
    pub client_updates_per_second: f64,
    /// Learning curve.
    pub history: Vec<RoundRecord>,
    /// Segments report.
    pub segments: SegmentReport,
    /// Privacy spent (absent for a run without noise).
    pub privacy: Option<PrivacySpend>,
}

/// The JSON report of `fedrec-sim baseline`.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    /// Always `baseline`.
    pub command: &'static str,
    /// fedrec version.
    pub fedrec_version: &'static str,
    /// Which method.
    pub method: String,
    /// The data.
    pub dataset: DatasetInfo,
    /// The configuration (the model options matter for ALS only).
    pub config: RunConfig,
    /// Metrics.
    pub metrics: MetricsRecord,
    /// Fitting and evaluation.
    pub wall_seconds: f64,
}

/// Writes `value` as pretty JSON, atomically (temp file, then rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_atomic(path, text.as_bytes())
}

/// Writes bytes to `path` through a temporary file in the same folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all().ok();
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Writes the per-round history as CSV.
pub fn write_history_csv(path: &Path, history: &[RoundRecord]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "round",
        "committed",
        "n_reported",
        "n_dropped",
        "clipped_fraction",
        "clip_norm",
        "rmse",
        "recall_at_20",
        "ndcg_at_10",
    ])?;
    for r in history {
        let m = r.metrics.as_ref();
        let opt = |x: Option<f64>| x.map(|v| format!("{v:.6}")).unwrap_or_default();
        w.write_record([
            r.round.to_string(),
            r.committed.to_string(),
            r.n_reported.to_string(),
            r.n_dropped.to_string(),
            format!("{:.4}", r.clipped_fraction),
            format!("{:.6}", r.clip_norm),
            opt(m.and_then(|m| m.rmse)),
            opt(m.map(|m| m.recall_at_20)),
            opt(m.map(|m| m.ndcg_at_10)),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?;
    write_atomic(path, &bytes)
}

/// A small aligned table for the terminal.
pub fn table(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    out
}

/// The table rows every command shows for its metrics.
pub fn metric_rows(m: &fedrec_shared::eval::Metrics) -> Vec<(&'static str, String)> {
    vec![
        ("RMSE", fmt_opt(m.rmse)),
        ("Recall@20", format!("{:.4}", m.recall_at_20)),
        ("NDCG@10", format!("{:.4}", m.ndcg_at_10)),
        ("users evaluated", m.n_eval_users.to_string()),
    ]
}

/// Formats an optional metric.
pub fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "—".to_owned())
}

/// One point of a privacy/utility frontier.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Target ε (`None`: the non-private run).
    pub target_epsilon: Option<f64>,
    /// The calibrated noise multiplier.
    pub noise_multiplier: f32,
    /// What the run's ledger says it spent.
    pub privacy: Option<PrivacySpend>,
    /// Final metrics.
    pub metrics: MetricsRecord,
    /// Training time.
    pub train_seconds: f64,
    /// The run's full configuration.
    pub config: RunConfig,
}

/// The JSON report of `fedrec-sim sweep`.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Always `sweep`.
    pub command: &'static str,
    /// fedrec version.
    pub fedrec_version: &'static str,
    /// The data.
    pub dataset: DatasetInfo,
    /// One point per ε.
    pub points: Vec<SweepPoint>,
}

/// Writes a sweep as CSV, one row per ε.
pub fn write_sweep_csv(path: &Path, rep: &SweepReport) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "target_epsilon",
        "mechanism",
        "bits",
        "epsilon_spent",
        "noise_multiplier",
        "rmse",
        "recall_at_20",
        "ndcg_at_10",
    ])?;
    for p in &rep.points {
        w.write_record([
            p.target_epsilon.map(|e| e.to_string()).unwrap_or_else(|| "inf".into()),
            match p.config.mechanism {
                MechanismKind::Central => "central".into(),
                MechanismKind::Distributed => "distributed".into(),
            },
            match p.config.mechanism {
                MechanismKind::Central => String::new(),
                MechanismKind::Distributed => p.config.bits.to_string(),
            },
            p.privacy.map(|s| format!("{:.6}", s.epsilon)).unwrap_or_default(),
            format!("{:.6}", p.noise_multiplier),
            p.metrics.rmse.map(|v| format!("{v:.6}")).unwrap_or_default(),
            format!("{:.6}", p.metrics.recall_at_20),
            format!("{:.6}", p.metrics.ndcg_at_10),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?;
    write_atomic(path, &bytes)
}
