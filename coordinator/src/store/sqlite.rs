//! The SQLite backend of the store: one file, WAL journal, `synchronous=FULL`, the schema in `PRAGMA user_version`.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use fedrec_shared::ledger::{Ledger, PrivacyPolicy};
use fedrec_shared::round::{AbandonReason, CoordinatorState, RoundStats};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use super::*;
use crate::auth::DeviceId;

/// How long a writer waits for another connection (an operator's `sqlite3` shell, say) to
/// release its lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

/// Version 3 (issue 12): the charges of distributed-noise rounds. One hash chain runs through
/// `ledger` and `ddp_ledger` in round order; a round is charged in one of them at most.
const SCHEMA_V3: &str = "
-- One charge per committed round with distributed noise (docs/ddp.md): the distributed
-- accountant's event. Append-only, never pruned.
CREATE TABLE ddp_ledger (
    round      INTEGER PRIMARY KEY CHECK (round >= 0),
    -- Poisson sampling probability of the round.
    q          REAL NOT NULL,
    -- The rounded sensitivities (L2 and L1) of one device's scaled, rounded update.
    l2         REAL NOT NULL,
    l1         REAL NOT NULL,
    -- sigma_dev^2: each device's discrete Gaussian variance per coordinate.
    device_var REAL NOT NULL,
    -- The noise shares charged (min_reports: the fewest a round commits with).
    shares     INTEGER NOT NULL CHECK (shares >= 1),
    -- The padded (power-of-two) dimension.
    dim        INTEGER NOT NULL CHECK (dim >= 1),
    -- SHA-256(previous charge's hash, of either ledger table || canonical bytes of this row).
    hash       BLOB NOT NULL
) STRICT;
";

/// Version 2 (issue 10): round counts may be NULL (rounds with noise store none), the ledger
/// gets its hash chain (filled in for existing rows by [`migrate`]), and the budget its table.
const SCHEMA_V2: &str = "
CREATE TABLE rounds_v2 (
    round              INTEGER PRIMARY KEY CHECK (round >= 0),
    -- The model version after the round (unchanged when it was abandoned).
    model_version      INTEGER NOT NULL CHECK (model_version >= 0),
    -- When the outcome was recorded (committed or abandoned), ms since the Unix epoch.
    committed_at_ms    INTEGER NOT NULL,
    -- Exact counts: NULL for a round with noise (they would reveal its sample).
    n_checked_in       INTEGER CHECK (n_checked_in >= 0),
    n_selected         INTEGER CHECK (n_selected >= 0),
    n_reported         INTEGER CHECK (n_reported >= 0),
    n_dropped          INTEGER CHECK (n_dropped >= 0),
    -- Noise standard deviation per coordinate (0 without noise or when abandoned).
    noise_std          REAL NOT NULL,
    clip_norm          REAL NOT NULL,
    -- Noised fraction of updates within the clip norm (adaptive clipping only).
    unclipped_fraction REAL,
    outcome            TEXT NOT NULL CHECK (outcome IN ('committed', 'abandoned')),
    abandon_reason     TEXT CHECK ((outcome = 'abandoned') = (abandon_reason IS NOT NULL))
) STRICT;
INSERT INTO rounds_v2 SELECT * FROM rounds;
DROP TABLE rounds;
ALTER TABLE rounds_v2 RENAME TO rounds;

-- SHA-256(previous row's hash || canonical bytes of this row); the first row chains from
-- 32 zero bytes. Filled in for rows written before version 2 when the store is upgraded.
ALTER TABLE ledger ADD COLUMN hash BLOB;

-- The privacy budget: the newest row is in force. The first row fixes it (init or the first
-- serve); later rows change epsilon, each with the operator's reason. Chained like the ledger.
CREATE TABLE budget (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 0),
    set_at_ms  INTEGER NOT NULL,
    epsilon    REAL NOT NULL,
    delta      REAL NOT NULL,
    accountant TEXT NOT NULL CHECK (accountant IN ('rdp', 'pld')),
    reason     TEXT NOT NULL,
    hash       BLOB NOT NULL
) STRICT;
";

const SCHEMA_V1: &str = "
CREATE TABLE rounds (
    round              INTEGER PRIMARY KEY CHECK (round >= 0),
    -- The model version after the round (unchanged when it was abandoned).
    model_version      INTEGER NOT NULL CHECK (model_version >= 0),
    -- When the outcome was recorded (committed or abandoned), ms since the Unix epoch.
    committed_at_ms    INTEGER NOT NULL,
    n_checked_in       INTEGER NOT NULL CHECK (n_checked_in >= 0),
    n_selected         INTEGER NOT NULL CHECK (n_selected >= 0),
    n_reported         INTEGER NOT NULL CHECK (n_reported >= 0),
    n_dropped          INTEGER NOT NULL CHECK (n_dropped >= 0),
    -- Noise standard deviation per coordinate (0 without noise or when abandoned).
    noise_std          REAL NOT NULL,
    clip_norm          REAL NOT NULL,
    -- Noised fraction of updates within the clip norm (adaptive clipping only).
    unclipped_fraction REAL,
    outcome            TEXT NOT NULL CHECK (outcome IN ('committed', 'abandoned')),
    abandon_reason     TEXT CHECK ((outcome = 'abandoned') = (abandon_reason IS NOT NULL))
) STRICT;

CREATE TABLE checkpoints (
    model_version INTEGER PRIMARY KEY CHECK (model_version >= 0),
    -- The round whose commit produced this model; NULL for the initial model.
    round         INTEGER REFERENCES rounds (round),
    saved_at_ms   INTEGER NOT NULL,
    next_round    INTEGER NOT NULL CHECK (next_round >= 0),
    -- The clip norm of the next round (adaptive clipping moves it).
    clip_norm     REAL NOT NULL,
    n_items       INTEGER NOT NULL,
    dim           INTEGER NOT NULL,
    n_segments    INTEGER NOT NULL,
    -- Float arrays: little-endian f32, row-major. item_factors is n_items x dim.
    item_factors  BLOB NOT NULL,
    item_bias     BLOB NOT NULL,
    global_mean   REAL NOT NULL,
    -- n_segments x dim.
    centroids     BLOB NOT NULL,
    -- The server optimizer: 'sgd' (lr, momentum) or 'adam' (lr, beta1, beta2, eps).
    optimizer     TEXT NOT NULL CHECK (optimizer IN ('sgd', 'adam')),
    lr            REAL NOT NULL,
    momentum      REAL,
    beta1         REAL,
    beta2         REAL,
    eps           REAL,
    -- SGD momentum or Adam first moment, one per trainable parameter.
    first_moment  BLOB NOT NULL,
    -- Adam second moment (empty for SGD).
    second_moment BLOB NOT NULL,
    step          INTEGER NOT NULL CHECK (step >= 0),
    -- Decayed member count of each centroid (empty before the first round).
    centroid_mass BLOB NOT NULL
) STRICT;

-- The privacy ledger: one charge per committed noisy round. Append-only, never pruned.
CREATE TABLE ledger (
    round            INTEGER PRIMARY KEY CHECK (round >= 0),
    q                REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    -- Noise on the adaptive-clipping bits; NULL without adaptive clipping.
    clip_bits_noise  REAL
) STRICT;

-- What happened, when. Counts only: never the ids of the devices a round selected.
CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    event  TEXT NOT NULL,
    detail TEXT NOT NULL
) STRICT;

CREATE TABLE devices (
    -- The device id's 64 bits as a signed integer (ids above 2^63 - 1 show as negative).
    device_id      INTEGER PRIMARY KEY,
    enrolled_at_ms INTEGER NOT NULL,
    -- NULL while the device is enrolled.
    revoked_at_ms  INTEGER,
    label          TEXT
) STRICT;
";

/// A read error: a value of the wrong type or range is corruption, anything else is SQLite's.
fn read_error(what: &str, e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => corrupt(what, e.to_string()),
        other => StoreError::Sqlite(other),
    }
}
impl BudgetRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: r.get(0)?,
            set_at_ms: r.get(1)?,
            epsilon: r.get(2)?,
            delta: r.get(3)?,
            accountant: r.get(4)?,
            reason: r.get(5)?,
            hash: r.get(6)?,
        })
    }
}

/// The coordinator's database. One writer: the task that owns the coordinator.
#[derive(Debug)]
pub(super) struct SqliteStore {
    conn: Connection,
    options: StoreOptions,
}

/// A round commit written inside an open transaction and not yet durable: [`Self::commit`]
/// makes it so, dropping it rolls everything back (as a crash before the commit would).
#[derive(Debug)]
#[must_use = "dropping a prepared commit rolls it back"]
pub(super) struct SqlitePrepared<'a> {
    tx: Transaction<'a>,
}

impl SqlitePrepared<'_> {
    /// Commits the transaction; when this returns `Ok`, the round is on disk.
    pub(super) fn commit(self) -> Result<(), StoreError> {
        self.tx.commit()?;
        Ok(())
    }
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`: WAL journal, `synchronous=FULL`, foreign
    /// keys on, and the schema migrated to [`SCHEMA_VERSION`] (a newer schema is refused).
    /// A database that cannot use WAL (`:memory:`) is refused as [`StoreError::Inconsistent`].
    pub(super) fn open_with(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // The first statement that reads the file: a file that is not a database fails here.
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Inconsistent(format!(
                "the database refused WAL journaling (journal_mode = {mode})"
            )));
        }
        // Durability over speed: a committed round must survive a power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The file is input: its schema may not run functions with side effects.
        conn.pragma_update(None, "trusted_schema", false)?;
        // Foreign keys off while migrating: a migration rebuilds a referenced table.
        conn.pragma_update(None, "foreign_keys", false)?;
        migrate(&mut conn)?;
        conn.pragma_update(None, "foreign_keys", true)?;
        Ok(Self { conn, options })
    }

    /// Opens the database at `path` read-only, to copy it: nothing is migrated, so its schema
    /// must be [`SCHEMA_VERSION`] (an older one is upgraded by opening it once the usual way,
    /// e.g. with `fedrec-coordinator status`).
    pub(super) fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "trusted_schema", false)?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let found =
            u32::try_from(found).map_err(|_| corrupt("schema_version", format!("negative ({found})")))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found, supported: SCHEMA_VERSION });
        }
        if found < SCHEMA_VERSION {
            return Err(StoreError::Inconsistent(format!(
                "the SQLite store has schema version {found}, this coordinator writes {SCHEMA_VERSION}; \
                 open it once with this version (e.g. `fedrec-coordinator status`) to upgrade it, then copy it"
            )));
        }
        Ok(Self { conn, options: StoreOptions::default() })
    }

    /// Every row, in one read transaction.
    pub(super) fn snapshot(&self) -> Result<migrate::Snapshot, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let rounds = {
            let mut stmt = tx.prepare(
                "SELECT round, model_version, committed_at_ms, n_checked_in, n_selected, n_reported,
                    n_dropped, noise_std, clip_norm, unclipped_fraction, outcome, abandon_reason
                 FROM rounds ORDER BY round",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    (r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?),
                    [r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?],
                    (r.get::<_, f64>(7)?, r.get::<_, f64>(8)?, r.get::<_, Option<f64>>(9)?),
                    (r.get::<_, String>(10)?, r.get::<_, Option<String>>(11)?),
                ))
            })?;
            rows.map(|row| {
                let ((round, version, at), counts, (noise, clip, unclipped), (outcome, reason)) =
                    row.map_err(|e| read_error("rounds", e))?;
                RoundRow::stored(
                    round,
                    version,
                    at,
                    counts,
                    noise,
                    clip,
                    unclipped,
                    &outcome,
                    reason.as_deref(),
                )
            })
            .collect::<Result<Vec<_>, StoreError>>()?
        };
        let checkpoints = {
            let mut stmt = tx.prepare("SELECT * FROM checkpoints ORDER BY model_version")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, Option<i64>>("round")?,
                    r.get::<_, i64>("saved_at_ms")?,
                    CheckpointRow::read(r)?,
                ))
            })?;
            rows.map(|row| {
                let (round, saved_at_ms, row) = row.map_err(|e| read_error("checkpoints", e))?;
                Ok(migrate::StoredCheckpoint { round, saved_at_ms, row })
            })
            .collect::<Result<Vec<_>, StoreError>>()?
        };
        let ledger = read_ledger(&tx)?;
        let budget: Vec<BudgetRow> = {
            let mut stmt = tx.prepare(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq"))?;
            let rows = stmt.query_map([], |r| Ok(BudgetRow::read(r)))?;
            rows.map(|row| row?.map_err(|e| read_error("budget", e))).collect::<Result<_, StoreError>>()?
        };
        let audit = self.audit_log(usize::MAX)?;
        let devices = self.list_devices()?;
        tx.commit()?;
        Ok(migrate::Snapshot { rounds, checkpoints, ledger, budget, audit, devices })
    }

    /// The options the store was opened with.
    pub(super) fn options(&self) -> StoreOptions {
        self.options
    }

    /// Writes the checkpoint of a fresh model (before round 0) and its ledger, if any.
    /// Refused if the store already holds a checkpoint.
    pub(super) fn save_initial(&mut self, state: &CoordinatorState, at_ms: u64) -> Result<(), StoreError> {
        let ckpt = Checkpoint::of(state)?;
        let at = to_sql("at_ms", at_ms)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n: i64 = tx.query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0))?;
        if n > 0 {
            return Err(StoreError::Inconsistent(
                "the store already holds checkpoints; save_initial is for a fresh store".into(),
            ));
        }
        let n_new = sync_ledger(&tx, &state.ledger)?;
        insert_checkpoint(&tx, &ckpt, None, at)?;
        let n_pruned = prune(&tx, self.options.keep_checkpoints)?;
        let detail = format!(
            "model_version={} next_round={} ledger_entries_added={n_new} checkpoints_pruned={n_pruned}",
            state.version, state.next_round
        );
        audit(&tx, at, "initialized", &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Does all of [`Store::commit_round`] but the final commit, which the caller makes with
    /// [`PreparedCommit::commit`]; dropping the result rolls the round back.
    pub(super) fn prepare_commit_round(
        &mut self,
        state: &CoordinatorState,
        stats: &RoundStats,
        at_ms: u64,
    ) -> Result<SqlitePrepared<'_>, StoreError> {
        if stats.round >= state.next_round {
            return Err(invalid(format!(
                "round {} committed, but the state's next round is {}",
                stats.round, state.next_round
            )));
        }
        let ckpt = Checkpoint::of(state)?;
        let row = RoundRow::of(stats, state.version, None, at_ms)?;
        let round = to_sql("round", stats.round)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_round(&tx, &row)?;
        let n_new = sync_ledger(&tx, &state.ledger)?;
        let newest: Option<i64> =
            tx.query_row("SELECT max(model_version) FROM checkpoints", [], |r| r.get(0))?;
        if let Some(newest) = newest
            && newest >= ckpt.model_version
        {
            return Err(StoreError::Inconsistent(format!(
                "model version {} is not newer than the stored checkpoint {newest}",
                state.version
            )));
        }
        insert_checkpoint(&tx, &ckpt, Some(round), row.at_ms)?;
        let n_pruned = prune(&tx, self.options.keep_checkpoints)?;
        let mut detail = round_detail(stats, state.version);
        let _ = write!(detail, " ledger_entries_added={n_new} checkpoints_pruned={n_pruned}");
        audit(&tx, row.at_ms, "round_committed", &detail)?;
        Ok(SqlitePrepared { tx })
    }

    /// Records an abandoned round: its row and an audit line; no checkpoint, no ledger entry
    /// (an abandoned round releases nothing and is not charged).
    pub(super) fn record_abandoned(
        &mut self,
        stats: &RoundStats,
        reason: AbandonReason,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let row = RoundRow::of(stats, stats.base_version, Some(reason), at_ms)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_round(&tx, &row)?;
        let mut detail = round_detail(stats, stats.base_version);
        let _ = write!(detail, " reason={}", abandon_label(reason));
        audit(&tx, row.at_ms, "round_abandoned", &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// The state to resume from: the newest checkpoint with the full ledger, every value
    /// checked. `None` when the store holds no checkpoint.
    ///
    /// `next_round` is the checkpoint's, or one past the newest recorded round if that is
    /// later (rounds abandoned after the checkpoint keep their indices: a round index is
    /// never reused).
    pub(super) fn load_latest(&self) -> Result<Option<CoordinatorState>, StoreError> {
        // One read transaction: the checkpoint, the ledger and the rounds are one snapshot.
        let tx = self.conn.unchecked_transaction()?;
        let row = tx
            .query_row("SELECT * FROM checkpoints ORDER BY model_version DESC LIMIT 1", [], |r| {
                Ok(CheckpointRow::read(r))
            })
            .optional()?;
        let Some(row) = row else { return Ok(None) };
        let ckpt = row.map_err(|e| read_error("checkpoint", e))?.decode()?;
        let charges = read_ledger(&tx)?;
        let last_round: Option<i64> = tx
            .query_row("SELECT max(round) FROM rounds", [], |r| r.get(0))
            .map_err(|e| read_error("rounds", e))?;
        resume_state(ckpt, charges, last_round).map(Some)
    }

    /// The budget in force (the newest `budget` row), if one was ever set.
    pub(super) fn budget(&self) -> Result<Option<StoredBudget>, StoreError> {
        let row = self
            .conn
            .query_row(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq DESC LIMIT 1"), [], |r| {
                Ok(BudgetRow::read(r))
            })
            .optional()?;
        row.map(|r| r.map_err(|e| read_error("budget", e))?.decode()).transpose()
    }

    /// Sets the budget: the first call fixes it (`budget_set` in the audit log); a later one
    /// may change ε only (`budget_raised` or `budget_lowered`, with the old and new ε and
    /// `reason`). A change of δ or of the accountant, an unchanged ε and an empty reason are
    /// refused ([`StoreError::Budget`]). The new row extends the budget's hash chain.
    pub(super) fn set_budget(
        &mut self,
        policy: PrivacyPolicy,
        reason: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(StoreError::Budget("a reason is required".into()));
        }
        let at = to_sql("at_ms", at_ms)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last = tx
            .query_row(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq DESC LIMIT 1"), [], |r| {
                Ok(BudgetRow::read(r))
            })
            .optional()?
            .map(|r| r.map_err(|e| read_error("budget", e)))
            .transpose()?;
        let (row, event, detail) = plan_budget(last.as_ref(), policy, reason, at)?;
        tx.execute(
            &format!("INSERT INTO budget ({BUDGET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![row.seq, row.set_at_ms, row.epsilon, row.delta, row.accountant, row.reason, row.hash],
        )?;
        audit(&tx, at, event, &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Recomputes the hash chains of the ledger and the budget from their rows and compares
    /// them with the stored hashes; the first row that differs is [`ChainReport::broken`].
    pub(super) fn verify_chain(&self) -> Result<ChainReport, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let ledger = read_ledger(&tx)?;
        let budget: Vec<BudgetRow> = {
            let mut stmt = tx.prepare(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq"))?;
            let rows = stmt.query_map([], |r| Ok(BudgetRow::read(r)))?;
            rows.map(|row| row?.map_err(|e| read_error("budget", e))).collect::<Result<_, _>>()?
        };
        chain_report(ledger, &budget)
    }

    /// Counts for a status report.
    pub(super) fn status(&self) -> Result<Status, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let count = |sql: &str, what: &str| -> Result<u64, StoreError> {
            let n: i64 = tx.query_row(sql, [], |r| r.get(0)).map_err(|e| read_error(what, e))?;
            from_sql(what, n)
        };
        let max = |sql: &str, what: &str| -> Result<Option<u64>, StoreError> {
            let v: Option<i64> = tx.query_row(sql, [], |r| r.get(0)).map_err(|e| read_error(what, e))?;
            v.map(|v| from_sql(what, v)).transpose()
        };
        Ok(Status {
            n_rounds_committed: count("SELECT count(*) FROM rounds WHERE outcome = 'committed'", "rounds")?,
            n_rounds_abandoned: count("SELECT count(*) FROM rounds WHERE outcome = 'abandoned'", "rounds")?,
            last_round: max("SELECT max(round) FROM rounds", "rounds.round")?,
            last_model_version: max(
                "SELECT max(model_version) FROM checkpoints",
                "checkpoints.model_version",
            )?,
            n_checkpoints: count("SELECT count(*) FROM checkpoints", "checkpoints")?,
            n_ledger_entries: count("SELECT count(*) FROM ledger", "ledger")?
                + count("SELECT count(*) FROM ddp_ledger", "ddp_ledger")?,
            n_devices_enrolled: count("SELECT count(*) FROM devices WHERE revoked_at_ms IS NULL", "devices")?,
            n_devices_revoked: count(
                "SELECT count(*) FROM devices WHERE revoked_at_ms IS NOT NULL",
                "devices",
            )?,
        })
    }

    /// The newest `limit` lines of the audit log, oldest first.
    pub(super) fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare(
            "SELECT id, at_ms, event, detail FROM
               (SELECT * FROM audit_log ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
        })?;
        rows.map(|row| {
            let (id, at_ms, event, detail) = row.map_err(|e| read_error("audit_log", e))?;
            Ok(AuditRecord {
                id: from_sql("audit_log.id", id)?,
                at_ms: from_sql("audit_log.at_ms", at_ms)?,
                event,
                detail,
            })
        })
        .collect()
    }

    /// Stores a newly enrolled device. [`StoreError::DuplicateDevice`] if the id is already
    /// stored, revoked or not (ids are not reused).
    pub(super) fn insert_device(
        &mut self,
        device_id: DeviceId,
        enrolled_at_ms: u64,
        label: Option<&str>,
    ) -> Result<(), StoreError> {
        let at = to_sql("enrolled_at_ms", enrolled_at_ms)?;
        let n = self.conn.execute(
            "INSERT INTO devices (device_id, enrolled_at_ms, revoked_at_ms, label) VALUES (?1, ?2, NULL, ?3)
             ON CONFLICT (device_id) DO NOTHING",
            params![device_id.to_i64_bits(), at, label],
        )?;
        if n == 0 {
            return Err(StoreError::DuplicateDevice(device_id));
        }
        Ok(())
    }

    /// Marks a device revoked at `at_ms`. [`StoreError::UnknownDevice`] if it is not stored,
    /// [`StoreError::AlreadyRevoked`] if it was revoked before (the first time is kept).
    pub(super) fn revoke_device(&mut self, device_id: DeviceId, at_ms: u64) -> Result<(), StoreError> {
        let at = to_sql("revoked_at_ms", at_ms)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE devices SET revoked_at_ms = ?2 WHERE device_id = ?1 AND revoked_at_ms IS NULL",
            params![device_id.to_i64_bits(), at],
        )?;
        if n == 0 {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE device_id = ?1)",
                [device_id.to_i64_bits()],
                |r| r.get(0),
            )?;
            return Err(if exists {
                StoreError::AlreadyRevoked(device_id)
            } else {
                StoreError::UnknownDevice(device_id)
            });
        }
        tx.commit()?;
        Ok(())
    }

    /// The stored device with this id, if any.
    pub(super) fn device(&self, device_id: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT device_id, enrolled_at_ms, revoked_at_ms, label FROM devices WHERE device_id = ?1",
                [device_id.to_i64_bits()],
                |r| Ok(read_device(r)),
            )
            .optional()?;
        row.map(|r| r.map_err(|e| read_error("devices", e)).and_then(DeviceRow::decode)).transpose()
    }

    /// Every stored device, enrolled or revoked, by id (in the order of their stored bits).
    pub(super) fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT device_id, enrolled_at_ms, revoked_at_ms, label FROM devices ORDER BY device_id",
        )?;
        let rows = stmt.query_map([], |r| Ok(read_device(r)))?;
        rows.map(|row| row?.map_err(|e| read_error("devices", e)).and_then(DeviceRow::decode)).collect()
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let found = u32::try_from(found).map_err(|_| corrupt("schema_version", format!("negative ({found})")))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found, supported: SCHEMA_VERSION });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    for migration in MIGRATIONS.iter().skip(found as usize) {
        tx.execute_batch(migration)?;
    }
    if found < 2 {
        // The chain of a store written before version 2 attests to what it held when upgraded.
        let mut prev = CHAIN_START;
        for row in read_ledger(&tx)? {
            let hash = chain_hash(&prev, &row.charge.canonical_bytes());
            tx.execute(
                "UPDATE ledger SET hash = ?2 WHERE round = ?1",
                params![to_sql("ledger round", row.charge.round())?, hash.as_slice()],
            )?;
            prev = hash;
        }
        let bad: Option<String> = tx.query_row("PRAGMA foreign_key_check", [], |r| r.get(0)).optional()?;
        if let Some(table) = bad {
            return Err(StoreError::Inconsistent(format!(
                "after the upgrade, {table} has a dangling foreign key"
            )));
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn insert_checkpoint(
    tx: &Transaction<'_>,
    c: &Checkpoint,
    round: Option<i64>,
    at: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO checkpoints (model_version, round, saved_at_ms, next_round, clip_norm,
            n_items, dim, n_segments, item_factors, item_bias, global_mean, centroids,
            optimizer, lr, momentum, beta1, beta2, eps, first_moment, second_moment, step, centroid_mass)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
        params![
            c.model_version,
            round,
            at,
            c.next_round,
            f64::from(c.clip_norm),
            c.n_items,
            c.dim,
            c.n_segments,
            c.item_factors,
            c.item_bias,
            f64::from(c.global_mean),
            c.centroids,
            c.optimizer,
            f64::from(c.lr),
            c.momentum.map(f64::from),
            c.beta1.map(f64::from),
            c.beta2.map(f64::from),
            c.eps.map(f64::from),
            c.first_moment,
            c.second_moment,
            c.step,
            c.centroid_mass,
        ],
    )?;
    Ok(())
}

/// Deletes all but the newest `keep` checkpoints; returns how many it deleted.
fn prune(tx: &Transaction<'_>, keep: NonZeroUsize) -> Result<usize, StoreError> {
    let keep = i64::try_from(keep.get()).unwrap_or(i64::MAX);
    let n = tx.execute(
        "DELETE FROM checkpoints WHERE model_version NOT IN
           (SELECT model_version FROM checkpoints ORDER BY model_version DESC LIMIT ?1)",
        [keep],
    )?;
    Ok(n)
}

/// Every charge stored, both tables, in round order, with its stored hash.
fn read_ledger(tx: &Transaction<'_>) -> Result<Vec<LedgerRow>, StoreError> {
    let mut rows = Vec::new();
    let mut stmt =
        tx.prepare("SELECT round, q, noise_multiplier, clip_bits_noise, hash FROM ledger ORDER BY round")?;
    let central = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, f64>(1)?,
            r.get::<_, f64>(2)?,
            r.get::<_, Option<f64>>(3)?,
            r.get(4)?,
        ))
    })?;
    for row in central {
        let (round, q, z, zb, hash) = row.map_err(|e| read_error("ledger", e))?;
        rows.push(LedgerRow { charge: Charge::Central(central_charge(round, q, z, zb)?), hash });
    }
    let mut stmt = tx.prepare(&format!("SELECT {DDP_COLUMNS} FROM ddp_ledger ORDER BY round"))?;
    let ddp = stmt.query_map([], |r| {
        Ok((
            DdpRow {
                round: r.get(0)?,
                q: r.get(1)?,
                l2: r.get(2)?,
                l1: r.get(3)?,
                device_var: r.get(4)?,
                shares: r.get(5)?,
                dim: r.get(6)?,
            },
            r.get(7)?,
        ))
    })?;
    for row in ddp {
        let (row, hash) = row.map_err(|e| read_error("ddp_ledger", e))?;
        rows.push(LedgerRow { charge: Charge::Distributed(row.decode()?), hash });
    }
    merge_rows(rows)
}

/// Checks that the stored ledger is a prefix of `ledger` and appends the rest, each charge to
/// its table, extending the one hash chain; returns how many charges it appended.
fn sync_ledger(tx: &Transaction<'_>, ledger: &Ledger) -> Result<usize, StoreError> {
    let stored = read_ledger(tx)?;
    let new = charges_to_append(&stored, ledger)?;
    for (charge, hash) in &new {
        match charge {
            Charge::Central(e) => {
                tx.execute(
                    "INSERT INTO ledger (round, q, noise_multiplier, clip_bits_noise, hash) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        to_sql("ledger round", e.round)?,
                        e.q,
                        e.noise_multiplier,
                        e.clip_bits_noise,
                        hash.as_slice()
                    ],
                )?;
            }
            Charge::Distributed(c) => {
                let r = DdpRow::of(c)?;
                tx.execute(
                    &format!(
                        "INSERT INTO ddp_ledger ({DDP_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                    ),
                    params![r.round, r.q, r.l2, r.l1, r.device_var, r.shares, r.dim, hash.as_slice()],
                )?;
            }
        }
    }
    Ok(new.len())
}

impl CheckpointRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            model_version: r.get("model_version")?,
            next_round: r.get("next_round")?,
            clip_norm: r.get("clip_norm")?,
            n_items: r.get("n_items")?,
            dim: r.get("dim")?,
            n_segments: r.get("n_segments")?,
            item_factors: r.get("item_factors")?,
            item_bias: r.get("item_bias")?,
            global_mean: r.get("global_mean")?,
            centroids: r.get("centroids")?,
            optimizer: r.get("optimizer")?,
            lr: r.get("lr")?,
            momentum: r.get("momentum")?,
            beta1: r.get("beta1")?,
            beta2: r.get("beta2")?,
            eps: r.get("eps")?,
            first_moment: r.get("first_moment")?,
            second_moment: r.get("second_moment")?,
            step: r.get("step")?,
            centroid_mass: r.get("centroid_mass")?,
        })
    }
}

fn insert_round(tx: &Transaction<'_>, r: &RoundRow) -> Result<(), StoreError> {
    let outcome = if r.abandon_reason.is_some() { "abandoned" } else { "committed" };
    let n = tx.execute(
        "INSERT INTO rounds (round, model_version, committed_at_ms, n_checked_in, n_selected, n_reported,
            n_dropped, noise_std, clip_norm, unclipped_fraction, outcome, abandon_reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (round) DO NOTHING",
        params![
            r.round,
            r.model_version,
            r.at_ms,
            r.n_checked_in,
            r.n_selected,
            r.n_reported,
            r.n_dropped,
            r.noise_std,
            r.clip_norm,
            r.unclipped_fraction,
            outcome,
            r.abandon_reason,
        ],
    )?;
    if n == 0 {
        return Err(StoreError::Inconsistent(format!("round {} is already recorded", r.round)));
    }
    Ok(())
}

fn audit(tx: &Transaction<'_>, at_ms: i64, event: &str, detail: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit_log (at_ms, event, detail) VALUES (?1, ?2, ?3)",
        params![at_ms, event, detail],
    )?;
    Ok(())
}

fn read_device(r: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        device_id: r.get(0)?,
        enrolled_at_ms: r.get(1)?,
        revoked_at_ms: r.get(2)?,
        label: r.get(3)?,
    })
}
