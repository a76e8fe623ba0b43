//! The PostgreSQL backend of the store: the same tables and guarantees as SQLite's, shared by every `serve` of a deployment, with leadership held as a session-level advisory lock.
//!
//! # Leadership
//!
//! [`PgStore::lead`] takes `pg_advisory_lock(LEADER_LOCK)` on the store's own session and
//! keeps it for the life of the connection: every round is written on the session that holds
//! the lock. When the leader dies (even by `kill -9`) its connection closes and PostgreSQL
//! releases the lock; a stand-by waiting in [`PgStore::lead`] gets it at once. A leader whose
//! connection is lost cannot write another round (a new session would not hold the lock), so
//! it stops with an error rather than run beside a new leader. The round index is the primary
//! key of `rounds` and of `ledger`: a round written twice fails, it is never charged twice.
//!
//! # TLS
//!
//! With `store.tls = "require"` the session is TLS 1.3 through rustls (ring provider) by the
//! `tokio-postgres-rustls` adapter: the server's certificate must chain to `store.ca_file`'s
//! roots (or the system's) and name the host of `store.url`, else the connection fails
//! ([`StoreError::PostgresConnect`]); `sslmode` is `require`, never `prefer`, so there is no
//! fallback to plaintext. SCRAM authentication binds to the TLS channel when the server offers
//! it (`tls-server-end-point`).
//!
//! # Calls from async code
//!
//! The `postgres` client drives its socket with its own small tokio runtime, which cannot be
//! entered from a thread that is already running a runtime (the coordinator's owner task is
//! one). Every call is therefore made on a scoped helper thread when a runtime is running on
//! the caller's thread, and directly otherwise; the caller blocks until it returns, exactly
//! as it blocks on SQLite's `fsync`.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::time::Duration;

use fedrec_shared::ledger::{Ledger, PrivacyPolicy};
use fedrec_shared::round::{AbandonReason, CoordinatorState, RoundStats};
use postgres::error::SqlState;
use postgres::{Client, NoTls, Transaction};
use rustls::ClientConfig;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::*;
use crate::auth::DeviceId;

/// The schema version this build writes in `fedrec_meta`, and the newest it can read.
pub const PG_SCHEMA_VERSION: u32 = 2;

/// The advisory lock key the leader holds (`fedrec` in ASCII, as a number).
pub const LEADER_LOCK: i64 = 0x6665_6472_6563;

/// The advisory lock key held (per transaction) while the schema is created or upgraded.
const MIGRATION_LOCK: i64 = LEADER_LOCK + 1;

/// Migration `i` takes the schema from version `i` to `i + 1` (version 1 creates it).
const MIGRATIONS: [&str; PG_SCHEMA_VERSION as usize] = [SCHEMA_V1, SCHEMA_V2];

/// Version 2 (issue 12): the charges of distributed-noise rounds, chained with `ledger`.
const SCHEMA_V2: &str = "
CREATE TABLE ddp_ledger (
    round      BIGINT PRIMARY KEY CHECK (round >= 0),
    q          DOUBLE PRECISION NOT NULL,
    l2         DOUBLE PRECISION NOT NULL,
    l1         DOUBLE PRECISION NOT NULL,
    device_var DOUBLE PRECISION NOT NULL,
    shares     BIGINT NOT NULL CHECK (shares >= 1),
    dim        BIGINT NOT NULL CHECK (dim >= 1),
    hash       BYTEA NOT NULL
);
COMMENT ON TABLE ddp_ledger IS 'One charge per committed distributed-noise round (docs/ddp.md); one hash chain with ledger, in round order';
";

const SCHEMA_V1: &str = "
CREATE TABLE fedrec_meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

CREATE TABLE rounds (
    round              BIGINT PRIMARY KEY CHECK (round >= 0),
    model_version      BIGINT NOT NULL CHECK (model_version >= 0),
    committed_at_ms    BIGINT NOT NULL,
    n_checked_in       BIGINT CHECK (n_checked_in >= 0),
    n_selected         BIGINT CHECK (n_selected >= 0),
    n_reported         BIGINT CHECK (n_reported >= 0),
    n_dropped          BIGINT CHECK (n_dropped >= 0),
    noise_std          DOUBLE PRECISION NOT NULL,
    clip_norm          DOUBLE PRECISION NOT NULL,
    unclipped_fraction DOUBLE PRECISION,
    outcome            TEXT NOT NULL CHECK (outcome IN ('committed', 'abandoned')),
    abandon_reason     TEXT CHECK ((outcome = 'abandoned') = (abandon_reason IS NOT NULL))
);

CREATE TABLE checkpoints (
    model_version BIGINT PRIMARY KEY CHECK (model_version >= 0),
    round         BIGINT REFERENCES rounds (round),
    saved_at_ms   BIGINT NOT NULL,
    next_round    BIGINT NOT NULL CHECK (next_round >= 0),
    clip_norm     DOUBLE PRECISION NOT NULL,
    n_items       BIGINT NOT NULL,
    dim           BIGINT NOT NULL,
    n_segments    BIGINT NOT NULL,
    item_factors  BYTEA NOT NULL,
    item_bias     BYTEA NOT NULL,
    global_mean   DOUBLE PRECISION NOT NULL,
    centroids     BYTEA NOT NULL,
    optimizer     TEXT NOT NULL CHECK (optimizer IN ('sgd', 'adam')),
    lr            DOUBLE PRECISION NOT NULL,
    momentum      DOUBLE PRECISION,
    beta1         DOUBLE PRECISION,
    beta2         DOUBLE PRECISION,
    eps           DOUBLE PRECISION,
    first_moment  BYTEA NOT NULL,
    second_moment BYTEA NOT NULL,
    step          BIGINT NOT NULL CHECK (step >= 0),
    centroid_mass BYTEA NOT NULL
);

CREATE TABLE ledger (
    round            BIGINT PRIMARY KEY CHECK (round >= 0),
    q                DOUBLE PRECISION NOT NULL,
    noise_multiplier DOUBLE PRECISION NOT NULL,
    clip_bits_noise  DOUBLE PRECISION,
    hash             BYTEA NOT NULL
);

CREATE TABLE budget (
    seq        BIGINT PRIMARY KEY CHECK (seq >= 0),
    set_at_ms  BIGINT NOT NULL,
    epsilon    DOUBLE PRECISION NOT NULL,
    delta      DOUBLE PRECISION NOT NULL,
    accountant TEXT NOT NULL CHECK (accountant IN ('rdp', 'pld')),
    reason     TEXT NOT NULL,
    hash       BYTEA NOT NULL
);

CREATE TABLE audit_log (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms  BIGINT NOT NULL,
    event  TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE TABLE devices (
    device_id      BIGINT PRIMARY KEY,
    enrolled_at_ms BIGINT NOT NULL,
    revoked_at_ms  BIGINT,
    label          TEXT
);
";

/// Runs `f` where the synchronous client may block: on a scoped thread when the caller's
/// thread runs a tokio runtime, on the caller's thread otherwise.
fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// A connection to the store's database.
pub(super) struct PgStore {
    /// `None` only while being dropped. A mutex, so that reads can take `&self` like SQLite's.
    client: std::sync::Mutex<Option<Client>>,
    options: StoreOptions,
    leader: bool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("options", &self.options).field("leader", &self.leader).finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing the client blocks on its runtime too.
        let client = match self.client.get_mut() {
            Ok(c) => c.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(client) = client {
            off_runtime(move || drop(client));
        }
    }
}

/// A round commit checked and encoded, written by [`PgStore::write_commit`].
pub(super) struct PgCommit {
    ckpt: Checkpoint,
    row: RoundRow,
    ledger: Ledger,
    detail: String,
}

impl std::fmt::Debug for PgCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCommit").field("round", &self.row.round).finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects and creates or checks the schema.
    pub(super) fn connect(target: &PgTarget, options: StoreOptions) -> Result<Self, StoreError> {
        let client = off_runtime(move || -> Result<Client, StoreError> {
            let mut client = open_session(target)?;
            migrate(&mut client)?;
            Ok(client)
        })?;
        Ok(Self { client: std::sync::Mutex::new(Some(client)), options, leader: false })
    }

    /// Copies `snapshot` into the database `target`, which must hold no coordinator state,
    /// in one transaction: the schema is created if absent, every table is locked and checked
    /// empty ([`StoreError::TargetNotEmpty`] otherwise), the rows are inserted, and the
    /// transaction commits only if they read back equal to `snapshot`.
    pub(super) fn import(target: &PgTarget, snapshot: &migrate::Snapshot) -> Result<(), StoreError> {
        // Checked before anything is sent: what cannot be read back is not written.
        let ledger = snapshot.ledger()?;
        let checkpoints = snapshot
            .checkpoints
            .iter()
            .map(|c| Checkpoint::from_row(&c.row))
            .collect::<Result<Vec<_>, _>>()?;
        off_runtime(move || {
            let mut client = open_session(target)?;
            let mut tx = client.transaction()?;
            ensure_schema(&mut tx)?;
            tx.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", DATA_TABLES.join(", ")))?;
            for table in DATA_TABLES {
                let n: i64 = tx.query_one(&format!("SELECT count(*) FROM {table}"), &[])?.try_get(0)?;
                if n != 0 {
                    return Err(StoreError::TargetNotEmpty {
                        table: table.to_owned(),
                        rows: u64::try_from(n).unwrap_or(0),
                    });
                }
            }
            for row in &snapshot.rounds {
                insert_round(&mut tx, row)?;
            }
            for (stored, ckpt) in snapshot.checkpoints.iter().zip(&checkpoints) {
                insert_checkpoint(&mut tx, ckpt, stored.round, stored.saved_at_ms)?;
            }
            sync_ledger(&mut tx, &ledger)?;
            for row in &snapshot.budget {
                insert_budget(&mut tx, row)?;
            }
            for line in &snapshot.audit {
                tx.execute(
                    "INSERT INTO audit_log (id, at_ms, event, detail) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4)",
                    &[&to_sql("audit_log.id", line.id)?, &to_sql("audit_log.at_ms", line.at_ms)?, &line.event, &line.detail],
                )?;
            }
            // The next line written gets the id after the last copied one.
            tx.execute(
                "SELECT setval(pg_get_serial_sequence('audit_log', 'id'), max(id)) FROM audit_log HAVING count(*) > 0",
                &[],
            )?;
            for d in &snapshot.devices {
                tx.execute(
                    "INSERT INTO devices (device_id, enrolled_at_ms, revoked_at_ms, label) VALUES ($1, $2, $3, $4)",
                    &[
                        &d.device_id.to_i64_bits(),
                        &to_sql("devices.enrolled_at_ms", d.enrolled_at_ms)?,
                        &d.revoked_at_ms.map(|t| to_sql("devices.revoked_at_ms", t)).transpose()?,
                        &d.label,
                    ],
                )?;
            }
            let back = snapshot_of(&mut tx)?;
            if let Some(table) = first_difference(snapshot, &back) {
                return Err(StoreError::Inconsistent(format!(
                    "the copy of table {table} does not read back equal to the source; nothing was written"
                )));
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn with<R: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, StoreError> + Send,
    ) -> Result<R, StoreError> {
        // A panic in an earlier call left the session in an unknown state: refuse to use it.
        let mut guard = self
            .client
            .lock()
            .map_err(|_| StoreError::Inconsistent("an earlier store call panicked".into()))?;
        let client = guard.as_mut().ok_or_else(|| StoreError::Inconsistent("the store is closed".into()))?;
        off_runtime(move || f(client))
    }

    pub(super) fn options(&self) -> StoreOptions {
        self.options
    }

    /// Waits until this session holds the leader lock, `wait` at a time, calling `waiting`
    /// after each wait that did not get it. Returns at once when already the leader.
    pub(super) fn lead(&mut self, wait: Duration, mut waiting: impl FnMut()) -> Result<(), StoreError> {
        if self.leader {
            return Ok(());
        }
        let timeout = format!("SET lock_timeout = {}", wait.as_millis().max(1));
        loop {
            let got = self.with(|c| {
                c.batch_execute(&timeout)?;
                // Waits in the server's lock queue: the lock is granted the moment the
                // leader's session ends, not at the next poll.
                let got = match c.execute("SELECT pg_advisory_lock($1)", &[&LEADER_LOCK]) {
                    Ok(_) => true,
                    Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => false,
                    Err(e) => return Err(e.into()),
                };
                c.batch_execute("RESET lock_timeout")?;
                Ok(got)
            })?;
            if got {
                self.leader = true;
                return Ok(());
            }
            waiting();
        }
    }

    /// Whether this session holds the leader lock.
    pub(super) fn is_leader(&self) -> bool {
        self.leader
    }

    pub(super) fn save_initial(&mut self, state: &CoordinatorState, at_ms: u64) -> Result<(), StoreError> {
        let ckpt = Checkpoint::of(state)?;
        let at = to_sql("at_ms", at_ms)?;
        let keep = self.options.keep_checkpoints;
        let ledger = state.ledger.clone();
        let (version, next_round) = (state.version, state.next_round);
        self.with(move |c| {
            let mut tx = c.transaction()?;
            tx.execute("LOCK TABLE checkpoints IN EXCLUSIVE MODE", &[])?;
            let n: i64 = tx.query_one("SELECT count(*) FROM checkpoints", &[])?.try_get(0)?;
            if n > 0 {
                return Err(StoreError::Inconsistent(
                    "the store already holds checkpoints; save_initial is for a fresh store".into(),
                ));
            }
            let n_new = sync_ledger(&mut tx, &ledger)?;
            insert_checkpoint(&mut tx, &ckpt, None, at)?;
            let n_pruned = prune(&mut tx, keep)?;
            let detail = format!(
                "model_version={version} next_round={next_round} ledger_entries_added={n_new} checkpoints_pruned={n_pruned}"
            );
            audit(&mut tx, at, "initialized", &detail)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Checks and encodes a round commit; nothing is written.
    pub(super) fn prepare_commit(
        state: &CoordinatorState,
        stats: &RoundStats,
        at_ms: u64,
    ) -> Result<PgCommit, StoreError> {
        if stats.round >= state.next_round {
            return Err(invalid(format!(
                "round {} committed, but the state's next round is {}",
                stats.round, state.next_round
            )));
        }
        Ok(PgCommit {
            ckpt: Checkpoint::of(state)?,
            row: RoundRow::of(stats, state.version, None, at_ms)?,
            ledger: state.ledger.clone(),
            detail: round_detail(stats, state.version),
        })
    }

    /// Writes a prepared round commit in one transaction.
    pub(super) fn write_commit(&self, commit: PgCommit) -> Result<(), StoreError> {
        let keep = self.options.keep_checkpoints;
        self.with(move |c| {
            let PgCommit { ckpt, row, ledger, mut detail } = commit;
            let mut tx = c.transaction()?;
            insert_round(&mut tx, &row)?;
            let n_new = sync_ledger(&mut tx, &ledger)?;
            let newest: Option<i64> =
                tx.query_one("SELECT max(model_version) FROM checkpoints", &[])?.try_get(0)?;
            if let Some(newest) = newest
                && newest >= ckpt.model_version
            {
                return Err(StoreError::Inconsistent(format!(
                    "model version {} is not newer than the stored checkpoint {newest}",
                    ckpt.model_version
                )));
            }
            insert_checkpoint(&mut tx, &ckpt, Some(row.round), row.at_ms)?;
            let n_pruned = prune(&mut tx, keep)?;
            let _ = write!(detail, " ledger_entries_added={n_new} checkpoints_pruned={n_pruned}");
            audit(&mut tx, row.at_ms, "round_committed", &detail)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn record_abandoned(
        &mut self,
        stats: &RoundStats,
        reason: AbandonReason,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let row = RoundRow::of(stats, stats.base_version, Some(reason), at_ms)?;
        let mut detail = round_detail(stats, stats.base_version);
        let _ = write!(detail, " reason={}", abandon_label(reason));
        self.with(move |c| {
            let mut tx = c.transaction()?;
            insert_round(&mut tx, &row)?;
            audit(&mut tx, row.at_ms, "round_abandoned", &detail)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn load_latest(&self) -> Result<Option<CoordinatorState>, StoreError> {
        self.with(|c| {
            // One snapshot: the checkpoint, the ledger and the rounds agree.
            let mut tx =
                c.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start()?;
            let row = tx.query_opt("SELECT * FROM checkpoints ORDER BY model_version DESC LIMIT 1", &[])?;
            let Some(row) = row else { return Ok(None) };
            let ckpt = read_checkpoint(&row)?.decode()?;
            let charges = read_ledger(&mut tx)?;
            let last_round: Option<i64> = tx.query_one("SELECT max(round) FROM rounds", &[])?.try_get(0)?;
            tx.commit()?;
            resume_state(ckpt, charges, last_round).map(Some)
        })
    }

    pub(super) fn budget(&self) -> Result<Option<StoredBudget>, StoreError> {
        self.with(|c| {
            let row =
                c.query_opt(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq DESC LIMIT 1"), &[])?;
            row.map(|r| read_budget(&r)?.decode()).transpose()
        })
    }

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
        self.with(move |c| {
            let mut tx = c.transaction()?;
            tx.execute("LOCK TABLE budget IN EXCLUSIVE MODE", &[])?;
            let last = tx
                .query_opt(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq DESC LIMIT 1"), &[])?
                .map(|r| read_budget(&r))
                .transpose()?;
            let (row, event, detail) = plan_budget(last.as_ref(), policy, reason, at)?;
            insert_budget(&mut tx, &row)?;
            audit(&mut tx, at, event, &detail)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn verify_chain(&self) -> Result<ChainReport, StoreError> {
        self.with(|c| {
            let mut tx =
                c.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start()?;
            let ledger = read_ledger(&mut tx)?;
            let budget = tx
                .query(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq"), &[])?
                .iter()
                .map(read_budget)
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            chain_report(ledger, &budget)
        })
    }

    pub(super) fn status(&self) -> Result<Status, StoreError> {
        self.with(|c| {
            let row = c.query_one(
                "SELECT
                   (SELECT count(*) FROM rounds WHERE outcome = 'committed'),
                   (SELECT count(*) FROM rounds WHERE outcome = 'abandoned'),
                   (SELECT max(round) FROM rounds),
                   (SELECT max(model_version) FROM checkpoints),
                   (SELECT count(*) FROM checkpoints),
                   (SELECT count(*) FROM ledger) + (SELECT count(*) FROM ddp_ledger),
                   (SELECT count(*) FROM devices WHERE revoked_at_ms IS NULL),
                   (SELECT count(*) FROM devices WHERE revoked_at_ms IS NOT NULL)",
                &[],
            )?;
            let count = |i: usize, what: &str| -> Result<u64, StoreError> { from_sql(what, row.try_get(i)?) };
            let max = |i: usize, what: &str| -> Result<Option<u64>, StoreError> {
                row.try_get::<_, Option<i64>>(i)?.map(|v| from_sql(what, v)).transpose()
            };
            Ok(Status {
                n_rounds_committed: count(0, "rounds")?,
                n_rounds_abandoned: count(1, "rounds")?,
                last_round: max(2, "rounds.round")?,
                last_model_version: max(3, "checkpoints.model_version")?,
                n_checkpoints: count(4, "checkpoints")?,
                n_ledger_entries: count(5, "ledger")?,
                n_devices_enrolled: count(6, "devices")?,
                n_devices_revoked: count(7, "devices")?,
            })
        })
    }

    pub(super) fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |c| {
            c.query(
                "SELECT id, at_ms, event, detail FROM
                   (SELECT * FROM audit_log ORDER BY id DESC LIMIT $1) AS newest ORDER BY id",
                &[&limit],
            )?
            .iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: from_sql("audit_log.id", r.try_get(0)?)?,
                    at_ms: from_sql("audit_log.at_ms", r.try_get(1)?)?,
                    event: r.try_get(2)?,
                    detail: r.try_get(3)?,
                })
            })
            .collect()
        })
    }

    pub(super) fn insert_device(
        &mut self,
        device_id: DeviceId,
        enrolled_at_ms: u64,
        label: Option<&str>,
    ) -> Result<(), StoreError> {
        let at = to_sql("enrolled_at_ms", enrolled_at_ms)?;
        let label = label.map(str::to_owned);
        let n = self.with(move |c| {
            Ok(c.execute(
                "INSERT INTO devices (device_id, enrolled_at_ms, revoked_at_ms, label) VALUES ($1, $2, NULL, $3)
                 ON CONFLICT (device_id) DO NOTHING",
                &[&device_id.to_i64_bits(), &at, &label],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::DuplicateDevice(device_id));
        }
        Ok(())
    }

    pub(super) fn revoke_device(&mut self, device_id: DeviceId, at_ms: u64) -> Result<(), StoreError> {
        let at = to_sql("revoked_at_ms", at_ms)?;
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE devices SET revoked_at_ms = $2 WHERE device_id = $1 AND revoked_at_ms IS NULL",
                &[&device_id.to_i64_bits(), &at],
            )?;
            if n == 0 {
                let exists: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM devices WHERE device_id = $1)",
                        &[&device_id.to_i64_bits()],
                    )?
                    .try_get(0)?;
                return Err(if exists {
                    StoreError::AlreadyRevoked(device_id)
                } else {
                    StoreError::UnknownDevice(device_id)
                });
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn device(&self, device_id: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.with(move |c| {
            c.query_opt(
                "SELECT device_id, enrolled_at_ms, revoked_at_ms, label FROM devices WHERE device_id = $1",
                &[&device_id.to_i64_bits()],
            )?
            .map(|r| read_device(&r)?.decode())
            .transpose()
        })
    }

    pub(super) fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.with(|c| {
            c.query(
                "SELECT device_id, enrolled_at_ms, revoked_at_ms, label FROM devices ORDER BY device_id",
                &[],
            )?
            .iter()
            .map(|r| read_device(r)?.decode())
            .collect()
        })
    }
}

/// The tables that hold coordinator state (all but `fedrec_meta`), parents before children.
const DATA_TABLES: [&str; 7] =
    ["rounds", "checkpoints", "ledger", "ddp_ledger", "budget", "audit_log", "devices"];

/// Opens a session with the TLS `target` asks for; a failure says which mode was tried.
fn open_session(target: &PgTarget) -> Result<Client, StoreError> {
    let connected = match &target.tls {
        PgTls::Disable => target.config.connect(NoTls),
        PgTls::Require(tls) => target.config.connect(MakeRustlsConnect::new(ClientConfig::clone(tls))),
    };
    connected.map_err(|error| StoreError::PostgresConnect { tls: target.tls_mode(), error })
}

/// Every row of the coordinator's tables, read in `tx`.
fn snapshot_of(tx: &mut Transaction<'_>) -> Result<migrate::Snapshot, StoreError> {
    let rounds = tx
        .query(
            "SELECT round, model_version, committed_at_ms, n_checked_in, n_selected, n_reported,
                n_dropped, noise_std, clip_norm, unclipped_fraction, outcome, abandon_reason
             FROM rounds ORDER BY round",
            &[],
        )?
        .iter()
        .map(|r| {
            let outcome: String = r.try_get(10)?;
            let reason: Option<String> = r.try_get(11)?;
            RoundRow::stored(
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                [r.try_get(3)?, r.try_get(4)?, r.try_get(5)?, r.try_get(6)?],
                r.try_get(7)?,
                r.try_get(8)?,
                r.try_get(9)?,
                &outcome,
                reason.as_deref(),
            )
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let checkpoints = tx
        .query("SELECT * FROM checkpoints ORDER BY model_version", &[])?
        .iter()
        .map(|r| {
            Ok(migrate::StoredCheckpoint {
                round: r.try_get("round")?,
                saved_at_ms: r.try_get("saved_at_ms")?,
                row: read_checkpoint(r)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let ledger = read_ledger(tx)?;
    let budget = tx
        .query(&format!("SELECT {BUDGET_COLUMNS} FROM budget ORDER BY seq"), &[])?
        .iter()
        .map(read_budget)
        .collect::<Result<Vec<_>, _>>()?;
    let audit = tx
        .query("SELECT id, at_ms, event, detail FROM audit_log ORDER BY id", &[])?
        .iter()
        .map(|r| {
            Ok(AuditRecord {
                id: from_sql("audit_log.id", r.try_get(0)?)?,
                at_ms: from_sql("audit_log.at_ms", r.try_get(1)?)?,
                event: r.try_get(2)?,
                detail: r.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let devices = tx
        .query("SELECT device_id, enrolled_at_ms, revoked_at_ms, label FROM devices ORDER BY device_id", &[])?
        .iter()
        .map(|r| read_device(r)?.decode())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(migrate::Snapshot { rounds, checkpoints, ledger, budget, audit, devices })
}

/// The first table whose rows differ between two snapshots.
fn first_difference(a: &migrate::Snapshot, b: &migrate::Snapshot) -> Option<&'static str> {
    [
        ("rounds", a.rounds == b.rounds),
        ("checkpoints", a.checkpoints == b.checkpoints),
        ("ledger", a.ledger == b.ledger),
        ("budget", a.budget == b.budget),
        ("audit_log", a.audit == b.audit),
        ("devices", a.devices == b.devices),
    ]
    .into_iter()
    .find(|(_, same)| !same)
    .map(|(table, _)| table)
}

fn insert_budget(tx: &mut Transaction<'_>, row: &BudgetRow) -> Result<(), StoreError> {
    tx.execute(
        &format!("INSERT INTO budget ({BUDGET_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
        &[&row.seq, &row.set_at_ms, &row.epsilon, &row.delta, &row.accountant, &row.reason, &row.hash],
    )?;
    Ok(())
}

/// Creates the schema in an empty database, or checks the version of an existing one. Two
/// processes starting at once take turns on an advisory transaction lock.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    if ensure_schema(&mut tx)? {
        tx.commit()?;
    }
    Ok(())
}

/// [`migrate`] inside `tx`; whether it changed anything (to commit).
fn ensure_schema(tx: &mut Transaction<'_>) -> Result<bool, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let exists: bool = tx.query_one("SELECT to_regclass('fedrec_meta') IS NOT NULL", &[])?.try_get(0)?;
    if exists {
        let found: Option<i64> = tx
            .query_opt("SELECT value FROM fedrec_meta WHERE key = 'schema_version'", &[])?
            .map(|r| r.try_get(0))
            .transpose()?;
        let found = found.ok_or_else(|| corrupt("fedrec_meta", "no schema_version"))?;
        let found = u32::try_from(found).map_err(|_| corrupt("schema_version", format!("{found}")))?;
        if found > PG_SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found, supported: PG_SCHEMA_VERSION });
        }
        if found == PG_SCHEMA_VERSION {
            return Ok(false);
        }
        for migration in MIGRATIONS.iter().skip(found as usize) {
            tx.batch_execute(migration)?;
        }
        tx.execute(
            "UPDATE fedrec_meta SET value = $1 WHERE key = 'schema_version'",
            &[&i64::from(PG_SCHEMA_VERSION)],
        )?;
        return Ok(true);
    }
    for migration in MIGRATIONS {
        tx.batch_execute(migration)?;
    }
    tx.execute(
        "INSERT INTO fedrec_meta (key, value) VALUES ('schema_version', $1)",
        &[&i64::from(PG_SCHEMA_VERSION)],
    )?;
    Ok(true)
}

fn insert_round(tx: &mut Transaction<'_>, r: &RoundRow) -> Result<(), StoreError> {
    let outcome = if r.abandon_reason.is_some() { "abandoned" } else { "committed" };
    let n = tx.execute(
        "INSERT INTO rounds (round, model_version, committed_at_ms, n_checked_in, n_selected, n_reported,
            n_dropped, noise_std, clip_norm, unclipped_fraction, outcome, abandon_reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (round) DO NOTHING",
        &[
            &r.round,
            &r.model_version,
            &r.at_ms,
            &r.n_checked_in,
            &r.n_selected,
            &r.n_reported,
            &r.n_dropped,
            &r.noise_std,
            &r.clip_norm,
            &r.unclipped_fraction,
            &outcome,
            &r.abandon_reason,
        ],
    )?;
    if n == 0 {
        return Err(StoreError::Inconsistent(format!("round {} is already recorded", r.round)));
    }
    Ok(())
}

fn insert_checkpoint(
    tx: &mut Transaction<'_>,
    c: &Checkpoint,
    round: Option<i64>,
    at: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO checkpoints (model_version, round, saved_at_ms, next_round, clip_norm,
            n_items, dim, n_segments, item_factors, item_bias, global_mean, centroids,
            optimizer, lr, momentum, beta1, beta2, eps, first_moment, second_moment, step, centroid_mass)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
        &[
            &c.model_version,
            &round,
            &at,
            &c.next_round,
            &f64::from(c.clip_norm),
            &c.n_items,
            &c.dim,
            &c.n_segments,
            &c.item_factors,
            &c.item_bias,
            &f64::from(c.global_mean),
            &c.centroids,
            &c.optimizer,
            &f64::from(c.lr),
            &c.momentum.map(f64::from),
            &c.beta1.map(f64::from),
            &c.beta2.map(f64::from),
            &c.eps.map(f64::from),
            &c.first_moment,
            &c.second_moment,
            &c.step,
            &c.centroid_mass,
        ],
    )?;
    Ok(())
}

fn prune(tx: &mut Transaction<'_>, keep: NonZeroUsize) -> Result<u64, StoreError> {
    let keep = i64::try_from(keep.get()).unwrap_or(i64::MAX);
    Ok(tx.execute(
        "DELETE FROM checkpoints WHERE model_version NOT IN
           (SELECT model_version FROM checkpoints ORDER BY model_version DESC LIMIT $1)",
        &[&keep],
    )?)
}

/// Every charge stored, both tables, in round order, with its stored hash.
fn read_ledger(tx: &mut Transaction<'_>) -> Result<Vec<LedgerRow>, StoreError> {
    let mut rows = Vec::new();
    for r in
        tx.query("SELECT round, q, noise_multiplier, clip_bits_noise, hash FROM ledger ORDER BY round", &[])?
    {
        let charge = central_charge(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)?;
        rows.push(LedgerRow { charge: Charge::Central(charge), hash: r.try_get(4)? });
    }
    for r in tx.query(&format!("SELECT {DDP_COLUMNS} FROM ddp_ledger ORDER BY round"), &[])? {
        let row = DdpRow {
            round: r.try_get(0)?,
            q: r.try_get(1)?,
            l2: r.try_get(2)?,
            l1: r.try_get(3)?,
            device_var: r.try_get(4)?,
            shares: r.try_get(5)?,
            dim: r.try_get(6)?,
        };
        rows.push(LedgerRow { charge: Charge::Distributed(row.decode()?), hash: r.try_get(7)? });
    }
    merge_rows(rows)
}

/// Checks that the stored ledger is a prefix of `ledger` and appends the rest, each charge to
/// its table, extending the one hash chain; returns how many charges it appended. Both
/// ledger tables are locked for the transaction, so that two writers cannot both extend the
/// same chain head.
fn sync_ledger(tx: &mut Transaction<'_>, ledger: &Ledger) -> Result<usize, StoreError> {
    tx.batch_execute("LOCK TABLE ledger, ddp_ledger IN EXCLUSIVE MODE")?;
    let stored = read_ledger(tx)?;
    let new = charges_to_append(&stored, ledger)?;
    for (charge, hash) in &new {
        match charge {
            Charge::Central(e) => {
                tx.execute(
                    "INSERT INTO ledger (round, q, noise_multiplier, clip_bits_noise, hash) VALUES ($1, $2, $3, $4, $5)",
                    &[&to_sql("ledger round", e.round)?, &e.q, &e.noise_multiplier, &e.clip_bits_noise, &hash.as_slice()],
                )?;
            }
            Charge::Distributed(c) => {
                let r = DdpRow::of(c)?;
                tx.execute(
                    &format!(
                        "INSERT INTO ddp_ledger ({DDP_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    ),
                    &[&r.round, &r.q, &r.l2, &r.l1, &r.device_var, &r.shares, &r.dim, &hash.as_slice()],
                )?;
            }
        }
    }
    Ok(new.len())
}

fn audit(tx: &mut Transaction<'_>, at_ms: i64, event: &str, detail: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit_log (at_ms, event, detail) VALUES ($1, $2, $3)",
        &[&at_ms, &event, &detail],
    )?;
    Ok(())
}

fn read_checkpoint(r: &postgres::Row) -> Result<CheckpointRow, StoreError> {
    Ok(CheckpointRow {
        model_version: r.try_get("model_version")?,
        next_round: r.try_get("next_round")?,
        clip_norm: r.try_get("clip_norm")?,
        n_items: r.try_get("n_items")?,
        dim: r.try_get("dim")?,
        n_segments: r.try_get("n_segments")?,
        item_factors: r.try_get("item_factors")?,
        item_bias: r.try_get("item_bias")?,
        global_mean: r.try_get("global_mean")?,
        centroids: r.try_get("centroids")?,
        optimizer: r.try_get("optimizer")?,
        lr: r.try_get("lr")?,
        momentum: r.try_get("momentum")?,
        beta1: r.try_get("beta1")?,
        beta2: r.try_get("beta2")?,
        eps: r.try_get("eps")?,
        first_moment: r.try_get("first_moment")?,
        second_moment: r.try_get("second_moment")?,
        step: r.try_get("step")?,
        centroid_mass: r.try_get("centroid_mass")?,
    })
}

fn read_budget(r: &postgres::Row) -> Result<BudgetRow, StoreError> {
    Ok(BudgetRow {
        seq: r.try_get(0)?,
        set_at_ms: r.try_get(1)?,
        epsilon: r.try_get(2)?,
        delta: r.try_get(3)?,
        accountant: r.try_get(4)?,
        reason: r.try_get(5)?,
        hash: r.try_get(6)?,
    })
}

fn read_device(r: &postgres::Row) -> Result<DeviceRow, StoreError> {
    Ok(DeviceRow {
        device_id: r.try_get(0)?,
        enrolled_at_ms: r.try_get(1)?,
        revoked_at_ms: r.try_get(2)?,
        label: r.try_get(3)?,
    })
}
