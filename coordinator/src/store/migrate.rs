//! Copying a SQLite store into an empty PostgreSQL database: every table, row for row, in one transaction, checked by reading it back and by comparing the ledger chain heads.
//!
//! The SQLite file is opened read-only and read in one snapshot ([`Snapshot`]). The copy is
//! written with the PostgreSQL backend's own insert functions (the ledger through the same
//! append that a round commit uses, so its hash chain is recomputed, not copied), and read
//! back inside the transaction: it commits only if every row reads back equal. Then a new
//! session opens the database as `serve` would and checks that the ledger and budget chain
//! head, the state to resume from and the status counts equal SQLite's.

use std::path::Path;

use super::*;

/// Every row a store holds, read in one snapshot, as the backends store them (`fedrec_meta`
/// and the schema version aside).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Snapshot {
    /// `rounds`, by round.
    pub(super) rounds: Vec<RoundRow>,
    /// `checkpoints`, by model version.
    pub(super) checkpoints: Vec<StoredCheckpoint>,
    /// `ledger` and `ddp_ledger`, in round order, with their stored hashes.
    pub(super) ledger: Vec<LedgerRow>,
    /// `budget`, by `seq`.
    pub(super) budget: Vec<BudgetRow>,
    /// `audit_log`, by id.
    pub(super) audit: Vec<AuditRecord>,
    /// `devices`, by the id's stored bits.
    pub(super) devices: Vec<DeviceRecord>,
}

/// A `checkpoints` row with the two columns [`CheckpointRow`] does not carry.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StoredCheckpoint {
    /// The round that produced it (`None`: the initial model).
    pub(super) round: Option<i64>,
    /// When it was written.
    pub(super) saved_at_ms: i64,
    /// The rest of the row.
    pub(super) row: CheckpointRow,
}

impl Snapshot {
    /// The ledger of the snapshot, its charges checked as a ledger.
    pub(super) fn ledger(&self) -> Result<Ledger, StoreError> {
        let charges: Vec<Charge> = self.ledger.iter().map(|r| r.charge).collect();
        let (central, ddp) = split_charges(&charges);
        Ledger::from_parts(central, ddp).map_err(|e| corrupt("ledger", e.to_string()))
    }
}

impl RoundRow {
    /// A `rounds` row as read back; `outcome` must agree with `abandon_reason`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stored(
        round: i64,
        model_version: i64,
        at_ms: i64,
        counts: [Option<i64>; 4],
        noise_std: f64,
        clip_norm: f64,
        unclipped_fraction: Option<f64>,
        outcome: &str,
        abandon_reason: Option<&str>,
    ) -> Result<Self, StoreError> {
        let what = || format!("rounds row {round}");
        let abandon_reason = match (outcome, abandon_reason) {
            ("committed", None) => None,
            ("abandoned", Some(reason)) => Some(match reason {
                "too_few_selected" => "too_few_selected",
                "too_few_reports" => "too_few_reports",
                "other" => "other",
                other => return Err(corrupt(what(), format!("unknown abandon reason {other:?}"))),
            }),
            _ => return Err(corrupt(what(), "outcome and abandon_reason disagree")),
        };
        let [n_checked_in, n_selected, n_reported, n_dropped] = counts;
        Ok(Self {
            round,
            model_version,
            at_ms,
            n_checked_in,
            n_selected,
            n_reported,
            n_dropped,
            noise_std,
            clip_norm,
            unclipped_fraction,
            abandon_reason,
        })
    }
}

impl Checkpoint {
    /// The checkpoint a stored row holds, for writing it elsewhere; the row is checked as
    /// [`Store::load_latest`] checks it.
    pub(super) fn from_row(row: &CheckpointRow) -> Result<Self, StoreError> {
        row.clone().decode()?;
        let what = |column: &str| format!("checkpoint {}: {column}", row.model_version);
        let f32_of = |column: &str, v: f64| f32_from_sql(&what(column), v);
        let opt = |column: &str, v: Option<f64>| v.map(|v| f32_of(column, v)).transpose();
        let optimizer = match row.optimizer.as_str() {
            "sgd" => "sgd",
            "adam" => "adam",
            _ => return Err(corrupt(what("optimizer"), "unknown optimizer")),
        };
        Ok(Self {
            model_version: row.model_version,
            next_round: row.next_round,
            clip_norm: f32_of("clip_norm", row.clip_norm)?,
            n_items: row.n_items,
            dim: row.dim,
            n_segments: row.n_segments,
            item_factors: row.item_factors.clone(),
            item_bias: row.item_bias.clone(),
            global_mean: f32_of("global_mean", row.global_mean)?,
            centroids: row.centroids.clone(),
            optimizer,
            lr: f32_of("lr", row.lr)?,
            momentum: opt("momentum", row.momentum)?,
            beta1: opt("beta1", row.beta1)?,
            beta2: opt("beta2", row.beta2)?,
            eps: opt("eps", row.eps)?,
            first_moment: row.first_moment.clone(),
            second_moment: row.second_moment.clone(),
            step: row.step,
            centroid_mass: row.centroid_mass.clone(),
        })
    }
}

/// What [`migrate_sqlite_to_postgres`] copied and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// The head of the ledger and budget hash chains ([`ChainReport::head`]), equal in both
    /// stores.
    pub head: [u8; 32],
    /// The counts of the PostgreSQL store, equal to SQLite's.
    pub status: Status,
    /// The round a `serve` on the copy resumes at (`None`: no checkpoint yet).
    pub next_round: Option<u64>,
    /// Budget rows copied.
    pub n_budget_rows: u64,
    /// Audit log lines copied.
    pub n_audit_lines: u64,
}

/// Copies the SQLite store at `sqlite` into the PostgreSQL database `target`, which must hold
/// no coordinator state ([`StoreError::TargetNotEmpty`] otherwise, and nothing is written).
///
/// Every row is copied in one transaction, which commits only if the copy reads back equal
/// to the SQLite snapshot; then a new session checks that the chain head, the state to
/// resume from and the status counts equal SQLite's. The SQLite file is opened read-only; a
/// store whose hash chain is broken, or written by an older or newer version, is refused.
/// Stop every `serve` on the SQLite file first: rounds it commits afterwards are not copied
/// (the final check then fails, as the two stores differ).
pub fn migrate_sqlite_to_postgres(sqlite: &Path, target: &PgTarget) -> Result<MigrationReport, StoreError> {
    let source = sqlite::SqliteStore::open_read_only(sqlite)?;
    let snapshot = source.snapshot()?;
    let source_chain = chain_report(snapshot.ledger.clone(), &snapshot.budget)?;
    if let Some(broken) = source_chain.broken {
        return Err(StoreError::Inconsistent(format!(
            "the SQLite store's hash chain is broken at {broken}; refusing to copy it"
        )));
    }
    pg::PgStore::import(target, &snapshot)?;

    // Read back as `serve` will: a new session, the schema checked, every value decoded.
    let copy = Store::open_postgres(target, StoreOptions::default())?;
    let chain = copy.verify_chain()?;
    if chain.broken.is_some() || chain.head() != source_chain.head() {
        return Err(StoreError::Inconsistent(format!(
            "after the copy, the PostgreSQL chain head {} differs from SQLite's {} (broken: {:?})",
            hex(&chain.head()),
            hex(&source_chain.head()),
            chain.broken
        )));
    }
    let state = copy.load_latest()?;
    if state != source.load_latest()? {
        return Err(StoreError::Inconsistent(
            "after the copy, the state to resume from differs from SQLite's (did a serve write to the SQLite file meanwhile?)".into(),
        ));
    }
    let status = copy.status()?;
    if status != source.status()? {
        return Err(StoreError::Inconsistent(
            "after the copy, the status counts differ from SQLite's (did a serve write to the SQLite file meanwhile?)".into(),
        ));
    }
    Ok(MigrationReport {
        head: chain.head(),
        status,
        next_round: state.map(|s| s.next_round),
        n_budget_rows: snapshot.budget.len() as u64,
        n_audit_lines: snapshot.audit.len() as u64,
    })
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
