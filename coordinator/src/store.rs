//! The coordinator's durable state in one SQLite file: model checkpoints, the privacy ledger, the round history, an audit log and the enrolled devices, each written in one transaction.
//!
//! # Guarantees
//!
//! - **A committed round survives a crash.** [`Store::commit_round`] writes the round's row,
//!   the checkpoint of the model after it, the new ledger entries and an audit line in one
//!   transaction, in WAL mode with `synchronous=FULL`: after it returns, the round is on disk;
//!   if anything fails (or the process dies) before it returns, none of it is.
//! - **Spend is never rewritten or forgotten.** The ledger is append-only: a commit first
//!   checks that the ledger already stored is a prefix of the state's ledger
//!   ([`StoreError::LedgerMismatch`] otherwise), and [`Store::load_latest`] always returns the
//!   full ledger, whichever checkpoint it loads.
//! - **The file is input, not trusted.** Everything read back is checked: blob lengths
//!   against the shape, finite values, known optimizer names, the checking constructors of
//!   `fedrec-shared` ([`ServerState::from_parts`], [`Ledger::from_entries`]). A tampered or
//!   corrupted file gives a [`StoreError`], never a panic.
//! - **The audit log holds counts only**, never the ids of the devices a round selected,
//!   and for a round with noise ([`RoundStats::private`]) not even those: the exact number of
//!   devices that checked in, were selected, reported or dropped would reveal the round's
//!   sample, so the `rounds` row stores NULL counts and the audit line none.
//! - **The ledger and the budget are tamper-evident.** Each `ledger` and `budget` row stores
//!   `hash = SHA-256(previous row's hash || the row's canonical bytes)` (the first row chains
//!   from 32 zero bytes). [`Store::verify_chain`] recomputes both chains and names the first
//!   row that does not match. This detects an edited, inserted or deleted row; it does not
//!   stop someone who can write the file from rebuilding the whole chain, nor from replacing
//!   the file by an older copy. Keeping the head ([`ChainReport::head`]) elsewhere detects
//!   both.
//! - **The budget is fixed in the store.** [`Store::set_budget`] appends a budget row (the
//!   first fixes it; a later one changes ε only, with a reason, and writes an audit line).
//!
//! # Schema (version [`SCHEMA_VERSION`], kept in `PRAGMA user_version`)
//!
//! Operators can read every table with the `sqlite3` shell (`.schema` shows the comments).
//! Integers are SQLite's signed 64-bit `INTEGER`; times are milliseconds since the Unix epoch.
//! Float arrays are `BLOB`s of little-endian `f32`, 4 bytes per value, row-major.
//!
//! | table | one row per | columns |
//! | --- | --- | --- |
//! | `rounds` | closed round | `round` (key), `model_version` (after the round), `committed_at_ms` (when the outcome was recorded), `n_checked_in`, `n_selected`, `n_reported`, `n_dropped` (all four NULL for a round with noise), `noise_std`, `clip_norm`, `unclipped_fraction` (NULL without adaptive clipping), `outcome` (`committed` or `abandoned`), `abandon_reason` (`too_few_selected`, `too_few_reports`; NULL when committed) |
//! | `checkpoints` | model version kept | `model_version` (key), `round` (the round that produced it; NULL for the initial model), `saved_at_ms`, `next_round`, `clip_norm`, `n_items`, `dim`, `n_segments`, `item_factors`, `item_bias`, `global_mean`, `centroids`, `optimizer` (`sgd` or `adam`), `lr`, `momentum` (SGD only), `beta1`, `beta2`, `eps` (Adam only), `first_moment`, `second_moment` (empty for SGD), `step`, `centroid_mass` |
//! | `ledger` | privacy charge | `round` (key), `q`, `noise_multiplier`, `clip_bits_noise` (NULL without adaptive clipping), `hash` (the chain) |
//! | `budget` | budget setting | `seq` (key, from 0), `set_at_ms`, `epsilon`, `delta`, `accountant` (`rdp` or `pld`), `reason`, `hash` (the chain); the newest row is the budget |
//! | `audit_log` | event | `id` (key), `at_ms`, `event`, `detail` (counts only; none for a round with noise; the reason of a budget change) |
//! | `devices` | enrolled device | `device_id` (key; [`DeviceId::to_i64_bits`]), `enrolled_at_ms`, `revoked_at_ms` (NULL while enrolled), `label` |
//!
//! Only the newest [`StoreOptions::keep_checkpoints`] checkpoints are kept; the ledger, the
//! round history and the audit log are never pruned.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use fedrec_shared::ledger::{Ledger, LedgerEntry, PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::{AccountantKind, PrivacyError};
use fedrec_shared::round::{AbandonReason, CoordinatorState, RoundStats};
use fedrec_shared::server::{ServerOptimizer, ServerState, ServerStateParts};
use fedrec_shared::{GlobalModel, ModelShape, ParamError};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use crate::auth::DeviceId;

/// The schema version this build writes, and the newest it can read.
pub const SCHEMA_VERSION: u32 = 2;

/// How many checkpoints [`StoreOptions::default`] keeps.
pub const DEFAULT_KEEP_CHECKPOINTS: NonZeroUsize = NonZeroUsize::new(10).expect("10 is not zero");

/// How long a writer waits for another connection (an operator's `sqlite3` shell, say) to
/// release its lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [SCHEMA_V1, SCHEMA_V2];

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

/// The hash the first row of a chain chains from.
const CHAIN_START: [u8; 32] = [0; 32];

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

/// Why the state is not one the store can write (so that it could read it back).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A parameter of the state failed its check (model shape, optimizer state).
    #[error(transparent)]
    Param(#[from] ParamError),
    /// A ledger entry is not a valid privacy event.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    /// A value the store would have to write is out of its range.
    #[error("{0}")]
    Invalid(String),
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (I/O, locking, a constraint, or a file that is not a database).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file holds a value that cannot be what the store wrote: a blob of the wrong
    /// length, a shape that does not fit, a non-finite value, an unknown optimizer.
    #[error("corrupt database: {what}: {reason}")]
    Corrupt {
        /// Which value.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file was written by a newer version of the coordinator.
    #[error("database schema version {found} is newer than the {supported} this coordinator supports")]
    SchemaTooNew {
        /// The file's schema version.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// The ledger stored differs from the state's at `round`: committing would rewrite or
    /// drop privacy spend. Nothing was written.
    #[error("the stored privacy ledger differs from the state's at round {round}; refusing to rewrite spend")]
    LedgerMismatch {
        /// The first round where they differ.
        round: u64,
    },
    /// The stored state does not fit together, or a write does not fit what is stored.
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
    /// The state handed to the store is invalid; nothing was written.
    #[error("invalid coordinator state: {0}")]
    InvalidState(#[from] StateError),
    /// A value does not fit SQLite's signed 64-bit integers.
    #[error("{what} = {value} does not fit a signed 64-bit integer")]
    OutOfRange {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// [`Store::insert_device`] on an id that is already stored (enrolled or revoked).
    #[error("device {0} is already stored")]
    DuplicateDevice(DeviceId),
    /// The device is not stored.
    #[error("device {0} is not enrolled")]
    UnknownDevice(DeviceId),
    /// [`Store::revoke_device`] on a device already revoked.
    #[error("device {0} is already revoked")]
    AlreadyRevoked(DeviceId),
    /// [`Store::set_budget`] refused the change.
    #[error("budget: {0}")]
    Budget(String),
}

impl From<ParamError> for StoreError {
    fn from(e: ParamError) -> Self {
        StoreError::InvalidState(StateError::Param(e))
    }
}

impl From<PrivacyError> for StoreError {
    fn from(e: PrivacyError) -> Self {
        StoreError::InvalidState(StateError::Privacy(e))
    }
}

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into(), reason: reason.into() }
}

fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::InvalidState(StateError::Invalid(reason.into()))
}

/// A read error: a value of the wrong type or range is corruption, anything else is SQLite's.
fn read_error(what: &str, e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => corrupt(what, e.to_string()),
        other => StoreError::Sqlite(other),
    }
}

/// Options of [`Store::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// How many of the newest checkpoints to keep; older ones are deleted in the transaction
    /// that writes a new one.
    pub keep_checkpoints: NonZeroUsize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { keep_checkpoints: DEFAULT_KEEP_CHECKPOINTS }
    }
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Its id.
    pub device_id: DeviceId,
    /// When it was enrolled, ms since the Unix epoch.
    pub enrolled_at_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<u64>,
    /// An operator's label.
    pub label: Option<String>,
}

impl DeviceRecord {
    /// Whether the device has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Its position in the log.
    pub id: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What happened: `initialized`, `round_committed` or `round_abandoned`.
    pub event: String,
    /// Counts, as `name=value` pairs separated by spaces.
    pub detail: String,
}

/// A summary of the store, for a `status` command (ε spent is the accountant's job, from
/// [`Store::load_latest`]'s ledger).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Rounds recorded as committed.
    pub n_rounds_committed: u64,
    /// Rounds recorded as abandoned.
    pub n_rounds_abandoned: u64,
    /// The newest round recorded, whatever its outcome.
    pub last_round: Option<u64>,
    /// The newest checkpoint's model version.
    pub last_model_version: Option<u64>,
    /// Checkpoints kept.
    pub n_checkpoints: u64,
    /// Entries in the privacy ledger.
    pub n_ledger_entries: u64,
    /// Devices enrolled and not revoked.
    pub n_devices_enrolled: u64,
    /// Devices revoked.
    pub n_devices_revoked: u64,
}

/// A privacy budget as stored: the newest row of the `budget` table.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBudget {
    /// Its position in the budget's history (0: the budget first fixed).
    pub seq: u64,
    /// When it was set, ms since the Unix epoch.
    pub set_at_ms: u64,
    /// The budget and its accountant.
    pub policy: PrivacyPolicy,
    /// The operator's reason.
    pub reason: String,
}

/// The first row of a chain whose stored hash does not match its recomputed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainBreak {
    /// The ledger row of this round.
    Ledger {
        /// The row's round.
        round: u64,
    },
    /// The budget row of this sequence number.
    Budget {
        /// The row's `seq`.
        seq: u64,
    },
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainBreak::Ledger { round } => write!(f, "the ledger row of round {round}"),
            ChainBreak::Budget { seq } => write!(f, "the budget row seq {seq}"),
        }
    }
}

/// The hash chains of the ledger and the budget, recomputed from the rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// The recomputed hash after each ledger row, oldest first.
    pub ledger_hashes: Vec<[u8; 32]>,
    /// The recomputed hash after each budget row, oldest first.
    pub budget_hashes: Vec<[u8; 32]>,
    /// The first row (ledger first, then budget) whose stored hash differs, if any.
    pub broken: Option<ChainBreak>,
}

impl ChainReport {
    /// The head of the store: one hash of both chains' last hashes. Keep it somewhere else
    /// (it is printed by `status`): a store whose head differs was rewritten or replaced.
    pub fn head(&self) -> [u8; 32] {
        let (l, b) = (self.ledger_hashes.len(), self.budget_hashes.len());
        self.head_at(l, b).unwrap_or(CHAIN_START)
    }

    /// The head the store had when it held the first `n_ledger` ledger rows and `n_budget`
    /// budget rows; `None` if it holds fewer.
    pub fn head_at(&self, n_ledger: usize, n_budget: usize) -> Option<[u8; 32]> {
        let last = |hashes: &[[u8; 32]], n: usize| match n {
            0 => Some(CHAIN_START),
            n => hashes.get(n - 1).copied(),
        };
        let (l, b) = (last(&self.ledger_hashes, n_ledger)?, last(&self.budget_hashes, n_budget)?);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"fedrec-head-v1\0");
        ctx.update(&l);
        ctx.update(&b);
        Some(digest32(ctx.finish()))
    }
}

fn digest32(d: ring::digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `SHA-256(prev || bytes)`.
fn chain_hash(prev: &[u8; 32], bytes: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev);
    ctx.update(bytes);
    digest32(ctx.finish())
}

fn accountant_label(kind: AccountantKind) -> &'static str {
    match kind {
        AccountantKind::Rdp => "rdp",
        AccountantKind::Pld => "pld",
    }
}

/// A budget row as stored, before any check.
struct BudgetRow {
    seq: i64,
    set_at_ms: i64,
    epsilon: f64,
    delta: f64,
    accountant: String,
    reason: String,
    hash: Vec<u8>,
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

    /// The row's canonical bytes: a tag, `seq`, `set_at_ms` (u64), ε and δ (f64 bits), the
    /// accountant and the reason (each a u64 length and UTF-8 bytes), little-endian.
    fn canonical_bytes(
        seq: i64,
        set_at_ms: i64,
        epsilon: f64,
        delta: f64,
        accountant: &str,
        reason: &str,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + reason.len());
        out.extend_from_slice(b"fedrec-budget-v1\0");
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&set_at_ms.to_le_bytes());
        out.extend_from_slice(&epsilon.to_bits().to_le_bytes());
        out.extend_from_slice(&delta.to_bits().to_le_bytes());
        for text in [accountant, reason] {
            out.extend_from_slice(&(text.len() as u64).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        out
    }

    fn bytes(&self) -> Vec<u8> {
        Self::canonical_bytes(
            self.seq,
            self.set_at_ms,
            self.epsilon,
            self.delta,
            &self.accountant,
            &self.reason,
        )
    }

    fn decode(&self) -> Result<StoredBudget, StoreError> {
        let accountant = match self.accountant.as_str() {
            "rdp" => AccountantKind::Rdp,
            "pld" => AccountantKind::Pld,
            other => return Err(corrupt("budget.accountant", format!("unknown accountant {other:?}"))),
        };
        let budget =
            PrivacyBudget::new(self.epsilon, self.delta).map_err(|e| corrupt("budget", e.to_string()))?;
        Ok(StoredBudget {
            seq: from_sql("budget.seq", self.seq)?,
            set_at_ms: from_sql("budget.set_at_ms", self.set_at_ms)?,
            policy: PrivacyPolicy { budget, accountant },
            reason: self.reason.clone(),
        })
    }
}

const BUDGET_COLUMNS: &str = "seq, set_at_ms, epsilon, delta, accountant, reason, hash";

/// The coordinator's database. One writer: the task that owns the coordinator.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    options: StoreOptions,
}

/// A round commit written inside an open transaction and not yet durable: [`Self::commit`]
/// makes it so, dropping it rolls everything back (as a crash before the commit would).
#[derive(Debug)]
#[must_use = "dropping a prepared commit rolls it back"]
pub struct PreparedCommit<'a> {
    tx: Transaction<'a>,
}

impl PreparedCommit<'_> {
    /// Commits the transaction; when this returns `Ok`, the round is on disk.
    pub fn commit(self) -> Result<(), StoreError> {
        self.tx.commit()?;
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) the database at `path` with the default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the database at `path`: WAL journal, `synchronous=FULL`, foreign
    /// keys on, and the schema migrated to [`SCHEMA_VERSION`] (a newer schema is refused).
    /// A database that cannot use WAL (`:memory:`) is refused as [`StoreError::Inconsistent`].
    pub fn open_with(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
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

    /// The options the store was opened with.
    pub fn options(&self) -> StoreOptions {
        self.options
    }

    /// Writes the checkpoint of a fresh model (before round 0) and its ledger, if any.
    /// Refused if the store already holds a checkpoint.
    pub fn save_initial(&mut self, state: &CoordinatorState, at_ms: u64) -> Result<(), StoreError> {
        let ckpt = Checkpoint::of(state)?;
        let at = to_sql("at_ms", at_ms)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n: i64 = tx.query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0))?;
        if n > 0 {
            return Err(StoreError::Inconsistent(
                "the store already holds checkpoints; save_initial is for a fresh store".into(),
            ));
        }
        let n_new = sync_ledger(&tx, state.ledger.entries())?;
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

    /// Records a committed round in one transaction: its row, the checkpoint of `state` (the
    /// coordinator's state after the round), the ledger entries not stored yet, the pruning
    /// of old checkpoints and an audit line.
    ///
    /// The ledger stored must be a prefix of `state.ledger` ([`StoreError::LedgerMismatch`]
    /// otherwise), and `state.version` must be newer than every stored checkpoint. On any
    /// error nothing is written.
    pub fn commit_round(
        &mut self,
        state: &CoordinatorState,
        stats: &RoundStats,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.prepare_commit_round(state, stats, at_ms)?.commit()
    }

    /// Does all of [`Store::commit_round`] but the final commit, which the caller makes with
    /// [`PreparedCommit::commit`]; dropping the result rolls the round back.
    pub fn prepare_commit_round(
        &mut self,
        state: &CoordinatorState,
        stats: &RoundStats,
        at_ms: u64,
    ) -> Result<PreparedCommit<'_>, StoreError> {
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
        let n_new = sync_ledger(&tx, state.ledger.entries())?;
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
        Ok(PreparedCommit { tx })
    }

    /// Records an abandoned round: its row and an audit line; no checkpoint, no ledger entry
    /// (an abandoned round releases nothing and is not charged).
    pub fn record_abandoned(
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
    pub fn load_latest(&self) -> Result<Option<CoordinatorState>, StoreError> {
        // One read transaction: the checkpoint, the ledger and the rounds are one snapshot.
        let tx = self.conn.unchecked_transaction()?;
        let row = tx
            .query_row("SELECT * FROM checkpoints ORDER BY model_version DESC LIMIT 1", [], |r| {
                Ok(CheckpointRow::read(r))
            })
            .optional()?;
        let Some(row) = row else { return Ok(None) };
        let ckpt = row.map_err(|e| read_error("checkpoint", e))?.decode()?;
        let entries = read_ledger(&tx)?;
        let ledger = Ledger::from_entries(entries).map_err(|e| corrupt("ledger", e.to_string()))?;
        if let Some(last) = ledger.entries().last()
            && last.round >= ckpt.next_round
        {
            return Err(StoreError::Inconsistent(format!(
                "the ledger charges round {} but checkpoint {} resumes at round {}",
                last.round, ckpt.version, ckpt.next_round
            )));
        }
        let last_round: Option<i64> = tx
            .query_row("SELECT max(round) FROM rounds", [], |r| r.get(0))
            .map_err(|e| read_error("rounds", e))?;
        let next_round = match last_round {
            Some(r) => ckpt.next_round.max(from_sql("rounds.round", r)?.saturating_add(1)),
            None => ckpt.next_round,
        };
        Ok(Some(CoordinatorState {
            model: ckpt.model,
            version: ckpt.version,
            server: ckpt.server,
            ledger,
            next_round,
            clip_norm: ckpt.clip_norm,
        }))
    }

    /// The budget in force (the newest `budget` row), if one was ever set.
    pub fn budget(&self) -> Result<Option<StoredBudget>, StoreError> {
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
    pub fn set_budget(&mut self, policy: PrivacyPolicy, reason: &str, at_ms: u64) -> Result<(), StoreError> {
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
        let (epsilon, delta) = (policy.budget.epsilon(), policy.budget.delta());
        let accountant = accountant_label(policy.accountant);
        let (seq, prev, event, detail) = match &last {
            None => (
                0,
                CHAIN_START,
                "budget_set",
                format!("epsilon={epsilon} delta={delta:e} accountant={accountant} reason={reason}"),
            ),
            Some(old) => {
                let stored = old.decode()?;
                if stored.policy.budget.delta().to_bits() != delta.to_bits()
                    || stored.policy.accountant != policy.accountant
                {
                    return Err(StoreError::Budget(format!(
                        "delta ({:e}) and the accountant ({}) are fixed when the budget is first set; only epsilon may change",
                        stored.policy.budget.delta(),
                        accountant_label(stored.policy.accountant)
                    )));
                }
                let old_eps = stored.policy.budget.epsilon();
                if old_eps.to_bits() == epsilon.to_bits() {
                    return Err(StoreError::Budget(format!("epsilon is already {old_eps}")));
                }
                let prev: [u8; 32] =
                    old.hash.as_slice().try_into().map_err(|_| corrupt("budget.hash", "not 32 bytes"))?;
                let event = if epsilon > old_eps { "budget_raised" } else { "budget_lowered" };
                (
                    old.seq.checked_add(1).ok_or_else(|| corrupt("budget.seq", "overflows"))?,
                    prev,
                    event,
                    format!(
                        "epsilon={old_eps}->{epsilon} delta={delta:e} accountant={accountant} reason={reason}"
                    ),
                )
            }
        };
        let hash =
            chain_hash(&prev, &BudgetRow::canonical_bytes(seq, at, epsilon, delta, accountant, reason));
        tx.execute(
            &format!("INSERT INTO budget ({BUDGET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![seq, at, epsilon, delta, accountant, reason, hash.as_slice()],
        )?;
        audit(&tx, at, event, &detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Recomputes the hash chains of the ledger and the budget from their rows and compares
    /// them with the stored hashes; the first row that differs is [`ChainReport::broken`].
    pub fn verify_chain(&self) -> Result<ChainReport, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut broken = None;
        let mut ledger_hashes = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT round, q, noise_multiplier, clip_bits_noise, hash FROM ledger ORDER BY round",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, Option<f64>>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })?;
            let mut prev = CHAIN_START;
            for row in rows {
                let (round, q, noise_multiplier, clip_bits_noise, stored) =
                    row.map_err(|e| read_error("ledger", e))?;
                let entry = LedgerEntry {
                    round: from_sql("ledger.round", round)?,
                    q,
                    noise_multiplier,
                    clip_bits_noise,
                };
                let hash = chain_hash(&prev, &entry.canonical_bytes());
                if broken.is_none() && stored.as_deref() != Some(hash.as_slice()) {
                    broken = Some(ChainBreak::Ledger { round: entry.round });
                }
                ledger_hashes.push(hash);
                prev = hash;
            }
        }
        let mut budget_hashes = Vec::new();
        {
            let mut stmt = tx.prepare(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq"))?;
            let rows = stmt.query_map([], |r| Ok(BudgetRow::read(r)))?;
            let mut prev = CHAIN_START;
            for row in rows {
                let row = row?.map_err(|e| read_error("budget", e))?;
                let hash = chain_hash(&prev, &row.bytes());
                if broken.is_none() && row.hash.as_slice() != hash.as_slice() {
                    broken = Some(ChainBreak::Budget { seq: from_sql("budget.seq", row.seq)? });
                }
                budget_hashes.push(hash);
                prev = hash;
            }
        }
        Ok(ChainReport { ledger_hashes, budget_hashes, broken })
    }

    /// Counts for a status report.
    pub fn status(&self) -> Result<Status, StoreError> {
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
            n_ledger_entries: count("SELECT count(*) FROM ledger", "ledger")?,
            n_devices_enrolled: count("SELECT count(*) FROM devices WHERE revoked_at_ms IS NULL", "devices")?,
            n_devices_revoked: count(
                "SELECT count(*) FROM devices WHERE revoked_at_ms IS NOT NULL",
                "devices",
            )?,
        })
    }

    /// The newest `limit` lines of the audit log, oldest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
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
    pub fn insert_device(
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
    pub fn revoke_device(&mut self, device_id: DeviceId, at_ms: u64) -> Result<(), StoreError> {
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
    pub fn device(&self, device_id: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
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
    pub fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
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
        let entries = read_ledger(&tx)?;
        let mut prev = CHAIN_START;
        for e in &entries {
            let hash = chain_hash(&prev, &e.canonical_bytes());
            tx.execute(
                "UPDATE ledger SET hash = ?2 WHERE round = ?1",
                params![to_sql("ledger round", e.round)?, hash.as_slice()],
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

fn to_sql(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

fn count_to_sql(what: &'static str, value: usize) -> Result<i64, StoreError> {
    to_sql(what, value as u64)
}

fn from_sql(what: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(what, format!("negative value {value}")))
}

/// An `f32` stored as a `REAL`: it must be finite and exactly an `f32`.
fn f32_from_sql(what: &str, value: f64) -> Result<f32, StoreError> {
    let x = value as f32;
    if !value.is_finite() || f64::from(x) != value {
        return Err(corrupt(what, "not a finite 32-bit float"));
    }
    Ok(x)
}

fn encode_f32s(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// Decodes a blob of `expected` little-endian `f32`s, all finite.
fn decode_f32s(what: &str, bytes: &[u8], expected: usize) -> Result<Vec<f32>, StoreError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(corrupt(what, format!("blob of {} bytes is not a whole number of f32s", bytes.len())));
    }
    if bytes.len() / 4 != expected {
        return Err(corrupt(what, format!("{} values, the shape needs {expected}", bytes.len() / 4)));
    }
    let values: Vec<f32> =
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(corrupt(what, "holds a non-finite value"));
    }
    Ok(values)
}

/// A checkpoint as written: checked and encoded before the transaction opens.
#[derive(Debug)]
struct Checkpoint {
    model_version: i64,
    next_round: i64,
    clip_norm: f32,
    n_items: i64,
    dim: i64,
    n_segments: i64,
    item_factors: Vec<u8>,
    item_bias: Vec<u8>,
    global_mean: f32,
    centroids: Vec<u8>,
    optimizer: &'static str,
    lr: f32,
    momentum: Option<f32>,
    beta1: Option<f32>,
    beta2: Option<f32>,
    eps: Option<f32>,
    first_moment: Vec<u8>,
    second_moment: Vec<u8>,
    step: i64,
    centroid_mass: Vec<u8>,
}

impl Checkpoint {
    /// Checks that `state` is one [`Store::load_latest`] will read back, and encodes it.
    fn of(state: &CoordinatorState) -> Result<Self, StoreError> {
        let model = &state.model;
        let shape = model.shape();
        shape.validate()?;
        if model.item_bias.len() != shape.n_items {
            return Err(invalid("item biases do not match the number of items"));
        }
        if model.centroids.ncols() != shape.dim {
            return Err(invalid("centroids do not have the embedding dimension"));
        }
        if !(model.item_factors.iter().all(|v| v.is_finite())
            && model.item_bias.iter().all(|v| v.is_finite())
            && model.global_mean.is_finite()
            && model.centroids.iter().all(|v| v.is_finite()))
        {
            return Err(invalid("the model holds a non-finite value"));
        }
        if !(state.clip_norm.is_finite() && state.clip_norm > 0.0) {
            return Err(invalid("the clip norm must be finite and > 0"));
        }
        // The same checks the loader makes: what is written can be read back.
        let parts = state.server.parts();
        ServerState::from_parts(parts)?;
        check_server_lengths(&parts, shape).map_err(invalid)?;
        check_ledger(state.ledger.entries(), state.next_round)?;
        let (optimizer, lr, momentum, beta1, beta2, eps) = match parts.optimizer {
            ServerOptimizer::Sgd { lr, momentum } => ("sgd", lr, Some(momentum), None, None, None),
            ServerOptimizer::Adam { lr, beta1, beta2, eps } => {
                ("adam", lr, None, Some(beta1), Some(beta2), Some(eps))
            }
        };
        Ok(Self {
            model_version: to_sql("model_version", state.version)?,
            next_round: to_sql("next_round", state.next_round)?,
            clip_norm: state.clip_norm,
            n_items: count_to_sql("n_items", shape.n_items)?,
            dim: count_to_sql("dim", shape.dim)?,
            n_segments: count_to_sql("n_segments", shape.n_segments)?,
            // Iterating (rather than taking the slice) accepts any memory layout.
            item_factors: encode_f32s(model.item_factors.iter().copied()),
            item_bias: encode_f32s(model.item_bias.iter().copied()),
            global_mean: model.global_mean,
            centroids: encode_f32s(model.centroids.iter().copied()),
            optimizer,
            lr,
            momentum,
            beta1,
            beta2,
            eps,
            first_moment: encode_f32s(parts.first_moment.iter().copied()),
            second_moment: encode_f32s(parts.second_moment.iter().copied()),
            step: to_sql("step", parts.step)?,
            centroid_mass: encode_f32s(parts.centroid_mass.iter().copied()),
        })
    }
}

/// Lengths of the optimizer state for a model of `shape` (what `Coordinator::restore` needs).
fn check_server_lengths(parts: &ServerStateParts<'_>, shape: ModelShape) -> Result<(), String> {
    let n_params = shape.layout().trainable().len();
    if parts.first_moment.len() != n_params {
        return Err(format!(
            "the optimizer state has {} parameters, the model {n_params}",
            parts.first_moment.len()
        ));
    }
    if !(parts.centroid_mass.is_empty() || parts.centroid_mass.len() == shape.n_segments) {
        return Err(format!(
            "{} centroid masses for {} segments",
            parts.centroid_mass.len(),
            shape.n_segments
        ));
    }
    Ok(())
}

/// Ledger entries are valid events, in strictly increasing rounds, all before `next_round`.
fn check_ledger(entries: &[LedgerEntry], next_round: u64) -> Result<(), StoreError> {
    Ledger::from_entries(entries.to_vec())?;
    for pair in entries.windows(2) {
        if pair[1].round <= pair[0].round {
            return Err(invalid(format!("ledger rounds are not increasing at round {}", pair[1].round)));
        }
    }
    if let Some(last) = entries.last()
        && last.round >= next_round
    {
        return Err(invalid(format!(
            "the ledger charges round {} but the next round is {next_round}",
            last.round
        )));
    }
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

fn read_ledger(tx: &Transaction<'_>) -> Result<Vec<LedgerEntry>, StoreError> {
    let mut stmt =
        tx.prepare("SELECT round, q, noise_multiplier, clip_bits_noise FROM ledger ORDER BY round")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?, r.get::<_, f64>(2)?, r.get::<_, Option<f64>>(3)?))
    })?;
    rows.map(|row| {
        let (round, q, noise_multiplier, clip_bits_noise) = row.map_err(|e| read_error("ledger", e))?;
        Ok(LedgerEntry { round: from_sql("ledger.round", round)?, q, noise_multiplier, clip_bits_noise })
    })
    .collect()
}

/// Checks that the stored ledger is a prefix of `entries` and appends the rest; returns how
/// many entries it appended.
fn sync_ledger(tx: &Transaction<'_>, entries: &[LedgerEntry]) -> Result<usize, StoreError> {
    let stored = read_ledger(tx)?;
    for (k, old) in stored.iter().enumerate() {
        // Bitwise: a charge read back must be exactly the charge made.
        let same = entries.get(k).is_some_and(|new| {
            new.round == old.round
                && new.q.to_bits() == old.q.to_bits()
                && new.noise_multiplier.to_bits() == old.noise_multiplier.to_bits()
                && new.clip_bits_noise.map(f64::to_bits) == old.clip_bits_noise.map(f64::to_bits)
        });
        if !same {
            return Err(StoreError::LedgerMismatch { round: old.round });
        }
    }
    let new = &entries[stored.len()..];
    if new.is_empty() {
        return Ok(0);
    }
    let last: Option<Option<Vec<u8>>> =
        tx.query_row("SELECT hash FROM ledger ORDER BY round DESC LIMIT 1", [], |r| r.get(0)).optional()?;
    let mut prev = match last {
        None => CHAIN_START,
        Some(hash) => hash
            .as_deref()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(|| corrupt("ledger.hash", "the newest row has no valid hash"))?,
    };
    let mut stmt = tx.prepare(
        "INSERT INTO ledger (round, q, noise_multiplier, clip_bits_noise, hash) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for e in new {
        let hash = chain_hash(&prev, &e.canonical_bytes());
        stmt.execute(params![
            to_sql("ledger round", e.round)?,
            e.q,
            e.noise_multiplier,
            e.clip_bits_noise,
            hash.as_slice()
        ])?;
        prev = hash;
    }
    Ok(new.len())
}

/// A checkpoint row as read, before any check.
struct CheckpointRow {
    model_version: i64,
    next_round: i64,
    clip_norm: f64,
    n_items: i64,
    dim: i64,
    n_segments: i64,
    item_factors: Vec<u8>,
    item_bias: Vec<u8>,
    global_mean: f64,
    centroids: Vec<u8>,
    optimizer: String,
    lr: f64,
    momentum: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    first_moment: Vec<u8>,
    second_moment: Vec<u8>,
    step: i64,
    centroid_mass: Vec<u8>,
}

/// A checkpoint read back and checked.
struct LoadedCheckpoint {
    model: GlobalModel,
    version: u64,
    server: ServerState,
    next_round: u64,
    clip_norm: f32,
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

    fn decode(self) -> Result<LoadedCheckpoint, StoreError> {
        let version = from_sql("checkpoints.model_version", self.model_version)?;
        let what = |column: &str| format!("checkpoint {version}: {column}");
        let size = |column: &str, v: i64| -> Result<usize, StoreError> {
            usize::try_from(v).map_err(|_| corrupt(what(column), format!("{v} is not a size")))
        };
        let shape = ModelShape {
            n_items: size("n_items", self.n_items)?,
            dim: size("dim", self.dim)?,
            n_segments: size("n_segments", self.n_segments)?,
        };
        shape.validate().map_err(|e| corrupt(what("shape"), e.to_string()))?;
        let n_factors = shape
            .n_items
            .checked_mul(shape.dim)
            .ok_or_else(|| corrupt(what("shape"), "n_items × dim overflows"))?;
        // Bounded by validate(): dim ≤ 1024, n_segments ≤ 4096.
        let n_centroid_values = shape.n_segments * shape.dim;
        let item_factors = decode_f32s(&what("item_factors"), &self.item_factors, n_factors)?;
        let item_bias = decode_f32s(&what("item_bias"), &self.item_bias, shape.n_items)?;
        let global_mean = f32_from_sql(&what("global_mean"), self.global_mean)?;
        let centroids = decode_f32s(&what("centroids"), &self.centroids, n_centroid_values)?;
        let model = GlobalModel::from_flat(shape, item_factors, item_bias, global_mean, centroids)
            .map_err(|e| corrupt(what("model"), e.to_string()))?;

        let lr = f32_from_sql(&what("lr"), self.lr)?;
        let hyper = |column: &str, v: f64| f32_from_sql(&what(column), v);
        let optimizer = match (self.optimizer.as_str(), self.momentum, self.beta1, self.beta2, self.eps) {
            ("sgd", Some(momentum), None, None, None) => {
                ServerOptimizer::Sgd { lr, momentum: hyper("momentum", momentum)? }
            }
            ("adam", None, Some(beta1), Some(beta2), Some(eps)) => ServerOptimizer::Adam {
                lr,
                beta1: hyper("beta1", beta1)?,
                beta2: hyper("beta2", beta2)?,
                eps: hyper("eps", eps)?,
            },
            ("sgd" | "adam", ..) => {
                return Err(corrupt(what("optimizer"), "hyper-parameter columns do not match the optimizer"));
            }
            _ => return Err(corrupt(what("optimizer"), "unknown optimizer (expected 'sgd' or 'adam')")),
        };
        optimizer.validate().map_err(|e| corrupt(what("optimizer"), e.to_string()))?;
        let n_params = shape.layout().trainable().len();
        let first_moment = decode_f32s(&what("first_moment"), &self.first_moment, n_params)?;
        let n_second = match optimizer {
            ServerOptimizer::Adam { .. } => n_params,
            ServerOptimizer::Sgd { .. } => 0,
        };
        let second_moment = decode_f32s(&what("second_moment"), &self.second_moment, n_second)?;
        let n_mass = if self.centroid_mass.is_empty() { 0 } else { shape.n_segments };
        let centroid_mass = decode_f32s(&what("centroid_mass"), &self.centroid_mass, n_mass)?;
        let parts = ServerStateParts {
            optimizer,
            first_moment: &first_moment,
            second_moment: &second_moment,
            step: from_sql(&what("step"), self.step)?,
            centroid_mass: &centroid_mass,
        };
        check_server_lengths(&parts, shape).map_err(|e| corrupt(what("optimizer state"), e))?;
        let server =
            ServerState::from_parts(parts).map_err(|e| corrupt(what("optimizer state"), e.to_string()))?;
        let clip_norm = f32_from_sql(&what("clip_norm"), self.clip_norm)?;
        if clip_norm <= 0.0 {
            return Err(corrupt(what("clip_norm"), "must be > 0"));
        }
        Ok(LoadedCheckpoint {
            model,
            version,
            server,
            next_round: from_sql(&what("next_round"), self.next_round)?,
            clip_norm,
        })
    }
}

/// A `rounds` row as written.
struct RoundRow {
    round: i64,
    model_version: i64,
    at_ms: i64,
    /// The exact counts; `None` for a round with noise.
    n_checked_in: Option<i64>,
    n_selected: Option<i64>,
    n_reported: Option<i64>,
    n_dropped: Option<i64>,
    noise_std: f64,
    clip_norm: f64,
    unclipped_fraction: Option<f64>,
    abandon_reason: Option<&'static str>,
}

impl RoundRow {
    fn of(
        stats: &RoundStats,
        model_version: u64,
        abandoned: Option<AbandonReason>,
        at_ms: u64,
    ) -> Result<Self, StoreError> {
        // A round with noise keeps its exact counts out of the store.
        let count = |what: &'static str, n: usize| -> Result<Option<i64>, StoreError> {
            if stats.private { Ok(None) } else { count_to_sql(what, n).map(Some) }
        };
        Ok(Self {
            round: to_sql("round", stats.round)?,
            model_version: to_sql("model_version", model_version)?,
            at_ms: to_sql("at_ms", at_ms)?,
            n_checked_in: count("n_checked_in", stats.n_checked_in)?,
            n_selected: count("n_selected", stats.n_selected)?,
            n_reported: count("n_reported", stats.n_reported)?,
            n_dropped: count("n_dropped", stats.n_dropped)?,
            noise_std: f64::from(stats.noise_std),
            clip_norm: f64::from(stats.clip_norm),
            // SQLite stores NaN as NULL; say so explicitly.
            unclipped_fraction: stats.unclipped_fraction.filter(|f| f.is_finite()),
            abandon_reason: abandoned.map(abandon_label),
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

fn abandon_label(reason: AbandonReason) -> &'static str {
    match reason {
        AbandonReason::TooFewSelected => "too_few_selected",
        AbandonReason::TooFewReports => "too_few_reports",
        _ => "other",
    }
}

/// The audit detail of a round: counts only, and for a round with noise not even those.
fn round_detail(stats: &RoundStats, model_version: u64) -> String {
    if stats.private {
        return format!("round={} model_version={model_version}", stats.round);
    }
    let mut s = format!(
        "round={} model_version={model_version} n_checked_in={} n_selected={} n_reported={} n_dropped={}",
        stats.round, stats.n_checked_in, stats.n_selected, stats.n_reported, stats.n_dropped
    );
    for (label, n) in &stats.rejected {
        let _ = write!(s, " rejected_{label}={n}");
    }
    s
}

fn audit(tx: &Transaction<'_>, at_ms: i64, event: &str, detail: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit_log (at_ms, event, detail) VALUES (?1, ?2, ?3)",
        params![at_ms, event, detail],
    )?;
    Ok(())
}

struct DeviceRow {
    device_id: i64,
    enrolled_at_ms: i64,
    revoked_at_ms: Option<i64>,
    label: Option<String>,
}

fn read_device(r: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        device_id: r.get(0)?,
        enrolled_at_ms: r.get(1)?,
        revoked_at_ms: r.get(2)?,
        label: r.get(3)?,
    })
}

impl DeviceRow {
    fn decode(self) -> Result<DeviceRecord, StoreError> {
        Ok(DeviceRecord {
            device_id: DeviceId::from_i64_bits(self.device_id),
            enrolled_at_ms: from_sql("devices.enrolled_at_ms", self.enrolled_at_ms)?,
            revoked_at_ms: self.revoked_at_ms.map(|t| from_sql("devices.revoked_at_ms", t)).transpose()?,
            label: self.label,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_blobs_round_trip_and_are_checked() {
        let values = [0.0f32, -0.0, 1.5, -3.25e-7, f32::MAX, f32::MIN_POSITIVE];
        let bytes = encode_f32s(values);
        assert_eq!(bytes.len(), 4 * values.len());
        let back = decode_f32s("x", &bytes, values.len()).expect("valid blob");
        assert!(back.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(matches!(
            decode_f32s("x", &bytes[..bytes.len() - 1], values.len()),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(decode_f32s("x", &bytes, values.len() + 1), Err(StoreError::Corrupt { .. })));
        let nan = encode_f32s([1.0, f32::NAN]);
        assert!(matches!(decode_f32s("x", &nan, 2), Err(StoreError::Corrupt { .. })));
        assert_eq!(decode_f32s("x", &[], 0).expect("empty is fine"), Vec::<f32>::new());
    }

    #[test]
    fn stored_f32s_must_be_exact() {
        assert_eq!(f32_from_sql("x", 0.5).expect("exact"), 0.5);
        assert!(f32_from_sql("x", 0.1).is_err(), "0.1 is not an f32");
        assert!(f32_from_sql("x", f64::INFINITY).is_err());
        assert!(f32_from_sql("x", 1e300).is_err());
    }
}
