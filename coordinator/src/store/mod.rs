//! The coordinator's durable state — model checkpoints, the privacy ledger, the round history, an audit log and the enrolled devices — behind one [`Store`], in an embedded SQLite file (the default) or a shared PostgreSQL database, each write in one transaction.
//!
//! The backends (SQLite in `store/sqlite.rs`, PostgreSQL in `store/pg.rs`) hold the
//! same tables and keep the same guarantees; the checks of what is written and read back live
//! here, once. `[store]` in `fedrec.toml` ([`StoreSection`]) picks one. With PostgreSQL, any
//! number of `serve` processes share the database and one of them leads ([`Store::lead`]).
//! The connection to PostgreSQL is TLS with the server's certificate verified, or plaintext
//! ([`TlsMode`], `store.tls`); [`migrate_sqlite_to_postgres`] moves a SQLite store into an
//! empty PostgreSQL database.
//!
//! # Guarantees
//!
//! - **A committed round survives a crash.** [`Store::commit_round`] writes the round's row,
//!   the checkpoint of the model after it, the new ledger entries and an audit line in one
//!   transaction (SQLite: WAL mode with `synchronous=FULL`; PostgreSQL: a committed
//!   transaction, durable as the server's `synchronous_commit` makes it): after it returns,
//!   the round is on disk;
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
//! - **The ledger and the budget are tamper-evident.** Each `ledger`, `ddp_ledger` and `budget` row stores
//!   `hash = SHA-256(previous row's hash || the row's canonical bytes)` (the first row chains
//!   from 32 zero bytes; the two ledger tables form one chain, in round order).
//!   [`Store::verify_chain`] recomputes both chains and names the first
//!   row that does not match. This detects an edited, inserted or deleted row; it does not
//!   stop someone who can write the file from rebuilding the whole chain, nor from replacing
//!   the file by an older copy. Keeping the head ([`ChainReport::head`]) elsewhere detects
//!   both.
//! - **The budget is fixed in the store.** [`Store::set_budget`] appends a budget row (the
//!   first fixes it; a later one changes ε only, with a reason, and writes an audit line).
//!
//! # Schema (SQLite: version [`SCHEMA_VERSION`], kept in `PRAGMA user_version`; PostgreSQL: the same tables with `BIGINT`, `DOUBLE PRECISION` and `BYTEA` columns, its version in `fedrec_meta`)
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
//! | `ddp_ledger` | distributed-noise charge (schema 3) | `round` (key; never also in `ledger`), `q`, `l2`, `l1` (the rounded sensitivities Δ₂, Δ₁), `device_var` (σ_dev², per device and coordinate), `shares` (the noise shares charged: `min_reports`), `dim` (the padded dimension D), `hash` (the chain, shared with `ledger`: one chain over the charges of both tables in round order) |
//! | `budget` | budget setting | `seq` (key, from 0), `set_at_ms`, `epsilon`, `delta`, `accountant` (`rdp` or `pld`), `reason`, `hash` (the chain); the newest row is the budget |
//! | `audit_log` | event | `id` (key), `at_ms`, `event`, `detail` (counts only; none for a round with noise; the reason of a budget change) |
//! | `devices` | enrolled device | `device_id` (key; [`DeviceId::to_i64_bits`]), `enrolled_at_ms`, `revoked_at_ms` (NULL while enrolled), `label` |
//!
//! Only the newest [`StoreOptions::keep_checkpoints`] checkpoints are kept; the ledger, the
//! round history and the audit log are never pruned.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use fedrec_shared::ddp::DdpEvent;
use fedrec_shared::ledger::{DdpCharge, Ledger, LedgerEntry, PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::{AccountantKind, PrivacyError};
use fedrec_shared::round::{AbandonReason, CoordinatorState, RoundStats};
use fedrec_shared::server::{ServerOptimizer, ServerState, ServerStateParts};
use fedrec_shared::{GlobalModel, ModelShape, ParamError};

use crate::auth::DeviceId;

mod migrate;
mod pg;
mod sqlite;

pub use migrate::{MigrationReport, migrate_sqlite_to_postgres};

/// The schema version this build writes, and the newest it can read.
pub const SCHEMA_VERSION: u32 = 3;

/// How many checkpoints [`StoreOptions::default`] keeps.
pub const DEFAULT_KEEP_CHECKPOINTS: NonZeroUsize = NonZeroUsize::new(10).expect("10 is not zero");

/// The hash the first row of a chain chains from.
const CHAIN_START: [u8; 32] = [0; 32];

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
    /// PostgreSQL failed (authentication, a constraint, a lost session).
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// No session could be opened with the PostgreSQL server: unreachable, the TLS handshake
    /// failed (a certificate not signed by a trusted CA, or issued for another name), or the
    /// server refused the connection (for instance plaintext where `pg_hba.conf` has only
    /// `hostssl` lines, or a wrong password).
    #[error("cannot connect to PostgreSQL (store.tls = \"{}\"): {}", tls.as_str(), with_causes(error))]
    PostgresConnect {
        /// The TLS mode of the attempt.
        tls: TlsMode,
        /// What the client said (its causes are part of the message: a TLS failure's reason
        /// is one).
        error: ::postgres::Error,
    },
    /// `migrate` refuses a database that already holds coordinator state; nothing was
    /// written.
    #[error(
        "the target database is not empty: table {table} holds {rows} rows; migrate only into an empty database"
    )]
    TargetNotEmpty {
        /// A table that holds rows.
        table: String,
        /// How many.
        rows: u64,
    },
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

/// `error`, then each of its causes, separated by `: `.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let _ = write!(text, ": {c}");
        cause = c.source();
    }
    text
}

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into(), reason: reason.into() }
}

fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::InvalidState(StateError::Invalid(reason.into()))
}

/// `[store]` of `fedrec.toml`: which database holds the coordinator's state.
///
/// ```toml
/// [store]
/// backend = "postgres"                         # or "sqlite" (the default)
/// url = "postgres://fedrec@db.internal/fedrec" # no password in the URL
/// password_env = "FEDREC_PG_PASSWORD"          # or password_file = "pg.password"
/// tls = "require"                              # the default for a host that is not loopback
/// ca_file = "pg-ca.pem"                        # the CA to trust; the system's roots without it
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// The backend.
    #[serde(default)]
    pub backend: BackendKind,
    /// PostgreSQL only: a `postgres://` URL or a `key=value` connection string, without a
    /// password.
    pub url: Option<String>,
    /// PostgreSQL only: the environment variable that holds the password.
    pub password_env: Option<String>,
    /// PostgreSQL only: a file whose first line is the password (relative to the state
    /// directory).
    pub password_file: Option<PathBuf>,
    /// PostgreSQL only: TLS to the server. Absent: [`TlsMode::Disable`] when every host of
    /// `url` is a loopback address, `localhost` or a Unix socket (the traffic never leaves the
    /// machine), [`TlsMode::Require`] otherwise.
    pub tls: Option<TlsMode>,
    /// PostgreSQL only, with `tls = "require"`: a PEM file of the CA certificates to trust
    /// (relative to the state directory). Absent: the operating system's roots.
    pub ca_file: Option<PathBuf>,
}

/// `store.tls`: whether the connection to PostgreSQL is encrypted. There is no mode that
/// encrypts without checking the server's certificate, and none that falls back to plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsMode {
    /// Plaintext (the server's `pg_hba.conf` must allow `host` connections).
    Disable,
    /// TLS 1.3 (rustls, ring), the server's certificate verified against `store.ca_file` or
    /// the system's roots and its name against the host of `url`; no plaintext fallback.
    Require,
}

impl TlsMode {
    /// The word `fedrec.toml` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Require => "require",
        }
    }
}

impl<'de> serde::Deserialize<'de> for TlsMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        match word.as_str() {
            "disable" => Ok(TlsMode::Disable),
            "require" => Ok(TlsMode::Require),
            other => Err(serde::de::Error::custom(format!(
                "store.tls: expected \"disable\" or \"require\", found {other:?}"
            ))),
        }
    }
}

/// `store.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackendKind {
    /// One SQLite file in the state directory: one `serve` at a time.
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by any number of `serve` processes, one of which leads.
    Postgres,
}

/// A `[store]` section that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("store.{key}: {reason}")]
pub struct StoreConfigError {
    /// The key under `[store]`.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn config_error(key: &'static str, reason: impl Into<String>) -> StoreConfigError {
    StoreConfigError { key, reason: reason.into() }
}

/// Where the state lives, resolved from a [`StoreSection`] (the password read, never shown:
/// the PostgreSQL configuration's `Debug` redacts it).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(Box<PgTarget>),
}

/// A PostgreSQL database and how to reach it: the connection settings and the TLS
/// configuration (with its trusted roots loaded).
#[derive(Clone)]
pub struct PgTarget {
    config: ::postgres::Config,
    tls: PgTls,
}

#[derive(Clone)]
enum PgTls {
    Disable,
    Require(std::sync::Arc<rustls::ClientConfig>),
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration's own `Debug` redacts the password.
        f.debug_struct("PgTarget").field("config", &self.config).field("tls", &self.tls_mode()).finish()
    }
}

impl PgTarget {
    /// The connection settings (host, port, user, database, timeouts).
    pub fn config(&self) -> &::postgres::Config {
        &self.config
    }

    /// Whether the connection uses TLS.
    pub fn tls_mode(&self) -> TlsMode {
        match self.tls {
            PgTls::Disable => TlsMode::Disable,
            PgTls::Require(_) => TlsMode::Require,
        }
    }
}

/// Whether every host of `config` is on this machine: a loopback address, `localhost`, or a
/// Unix socket.
fn is_local(config: &::postgres::Config) -> bool {
    use ::postgres::config::Host;
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    (!hosts.is_empty() || !addrs.is_empty())
        && hosts.iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        })
        && addrs.iter().all(|a| a.is_loopback())
}

/// The rustls configuration for `store.tls = "require"`: TLS 1.3 over ring, the roots of
/// `ca_file` (PEM) or else the system's, no client certificate.
fn tls_config(dir: &Path, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, StoreConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            let path = dir.join(file);
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_error("ca_file", format!("cannot read {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(config_error("ca_file", format!("{} holds no PEM certificate", path.display())));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    config_error("ca_file", format!("{}: not a usable CA certificate: {e}", path.display()))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (n_added, _) = roots.add_parsable_certificates(found.certs);
            if n_added == 0 {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(config_error(
                    "ca_file",
                    format!(
                        "not set, and the system has no CA certificates to trust{why}; name the CA of the PostgreSQL server's certificate here"
                    ),
                ));
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error("tls", format!("no TLS version is available: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

impl StoreSection {
    /// Resolves the section for the state directory `dir`; `sqlite_file` is the SQLite
    /// file's path there. Reads the password (from the environment or a file).
    pub fn location(&self, dir: &Path, sqlite_file: &Path) -> Result<StoreLocation, StoreConfigError> {
        match self.backend {
            BackendKind::Sqlite => {
                for (key, set) in [
                    ("url", self.url.is_some()),
                    ("password_env", self.password_env.is_some()),
                    ("password_file", self.password_file.is_some()),
                    ("tls", self.tls.is_some()),
                    ("ca_file", self.ca_file.is_some()),
                ] {
                    if set {
                        return Err(config_error(key, "only for backend = \"postgres\""));
                    }
                }
                Ok(StoreLocation::Sqlite(dir.join(sqlite_file)))
            }
            BackendKind::Postgres => {
                let url = self
                    .url
                    .as_deref()
                    .ok_or_else(|| config_error("url", "required with backend = \"postgres\""))?;
                let mut config: ::postgres::Config = url.parse().map_err(|e: ::postgres::Error| {
                    config_error("url", format!("not a PostgreSQL connection string: {e}"))
                })?;
                if config.get_password().is_some() {
                    return Err(config_error(
                        "url",
                        "holds a password; put it in the variable named by store.password_env or the file named by store.password_file",
                    ));
                }
                let password = match (&self.password_env, &self.password_file) {
                    (Some(_), Some(_)) => {
                        return Err(config_error(
                            "password_file",
                            "set store.password_env or this, not both",
                        ));
                    }
                    (Some(var), None) => Some(std::env::var(var).map_err(|_| {
                        config_error("password_env", format!("the environment variable {var} is not set"))
                    })?),
                    (None, Some(file)) => {
                        let path = dir.join(file);
                        let text = std::fs::read_to_string(&path).map_err(|e| {
                            config_error("password_file", format!("cannot read {}: {e}", path.display()))
                        })?;
                        Some(text.lines().next().unwrap_or_default().to_owned())
                    }
                    (None, None) => None,
                };
                if let Some(password) = password {
                    config.password(password);
                }
                if config.get_connect_timeout().is_none() {
                    config.connect_timeout(std::time::Duration::from_secs(10));
                }
                if config.get_application_name().is_none() {
                    config.application_name("fedrec-coordinator");
                }
                // A leader whose host vanishes without closing its socket loses the lock when
                // the server's keepalives give up on it; ours notice a dead server.
                config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(10));
                let tls = self.pg_tls(dir, &mut config)?;
                Ok(StoreLocation::Postgres(Box::new(PgTarget { config, tls })))
            }
        }
    }
}

impl StoreSection {
    /// Resolves `tls` and `ca_file` and sets the URL's `sslmode` to match: `store.tls`
    /// decides, so an `sslmode` in the URL is refused (`prefer`, the client's default, cannot
    /// be told from an absent one and is replaced: it would fall back to plaintext).
    fn pg_tls(&self, dir: &Path, config: &mut ::postgres::Config) -> Result<PgTls, StoreConfigError> {
        use ::postgres::config::{Host, SslMode};
        if config.get_ssl_mode() != SslMode::Prefer {
            return Err(config_error(
                "url",
                "sets sslmode; set store.tls = \"require\" or \"disable\" instead",
            ));
        }
        let unix = config.get_hosts().iter().any(|h| matches!(h, Host::Unix(_)));
        let mode = self.tls.unwrap_or(if is_local(config) { TlsMode::Disable } else { TlsMode::Require });
        match mode {
            TlsMode::Disable => {
                if self.ca_file.is_some() {
                    return Err(config_error("ca_file", "only with store.tls = \"require\""));
                }
                config.ssl_mode(SslMode::Disable);
                Ok(PgTls::Disable)
            }
            TlsMode::Require => {
                if unix {
                    return Err(config_error(
                        "tls",
                        "\"require\" cannot apply to a Unix socket host in store.url (PostgreSQL has no TLS there); connect over TCP or set \"disable\"",
                    ));
                }
                let tls = tls_config(dir, self.ca_file.as_deref())?;
                config.ssl_mode(SslMode::Require);
                Ok(PgTls::Require(std::sync::Arc::new(tls)))
            }
        }
    }
}

#[derive(Debug)]
enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(Box<pg::PgStore>),
}

/// The coordinator's database, SQLite or PostgreSQL. One writer of rounds: the task that owns
/// the coordinator (with PostgreSQL, of the `serve` that holds the leader lock).
#[derive(Debug)]
pub struct Store {
    backend: Backend,
}

/// A round commit checked and not yet durable: [`Self::commit`] makes it so, dropping it
/// rolls everything back (as a crash before the commit would).
///
/// With SQLite the writes are made inside an open transaction; with PostgreSQL they are
/// checked and encoded, and the transaction runs in [`Self::commit`].
#[derive(Debug)]
#[must_use = "dropping a prepared commit rolls it back"]
pub struct PreparedCommit<'a> {
    inner: Prepared<'a>,
}

#[derive(Debug)]
enum Prepared<'a> {
    Sqlite(sqlite::SqlitePrepared<'a>),
    Postgres(&'a pg::PgStore, Box<pg::PgCommit>),
}

impl PreparedCommit<'_> {
    /// Commits the transaction; when this returns `Ok`, the round is durable.
    pub fn commit(self) -> Result<(), StoreError> {
        match self.inner {
            Prepared::Sqlite(p) => p.commit(),
            Prepared::Postgres(store, commit) => store.write_commit(*commit),
        }
    }
}

/// Calls the same method on whichever backend holds the state.
macro_rules! dispatch {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            Backend::Sqlite($s) => $call,
            Backend::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens (or creates) the SQLite database at `path` with the default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the SQLite database at `path`: WAL journal, `synchronous=FULL`,
    /// foreign keys on, and the schema migrated to [`SCHEMA_VERSION`] (a newer schema is
    /// refused). A database that cannot use WAL (`:memory:`) is refused as
    /// [`StoreError::Inconsistent`].
    pub fn open_with(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        Ok(Self { backend: Backend::Sqlite(sqlite::SqliteStore::open_with(path, options)?) })
    }

    /// Connects to a PostgreSQL database and creates the schema if it has none (a newer
    /// schema is refused). The session does not lead until [`Store::lead`].
    pub fn open_postgres(target: &PgTarget, options: StoreOptions) -> Result<Self, StoreError> {
        Ok(Self { backend: Backend::Postgres(Box::new(pg::PgStore::connect(target, options)?)) })
    }

    /// Opens the store at `location`.
    pub fn open_location(location: &StoreLocation, options: StoreOptions) -> Result<Self, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => Self::open_with(path, options),
            StoreLocation::Postgres(config) => Self::open_postgres(config, options),
        }
    }

    /// Which backend holds the state.
    pub fn backend(&self) -> BackendKind {
        match self.backend {
            Backend::Sqlite(_) => BackendKind::Sqlite,
            Backend::Postgres(_) => BackendKind::Postgres,
        }
    }

    /// Makes this store the one that writes rounds. PostgreSQL: waits until this session
    /// holds the leader lock (a session-level advisory lock), in waits of
    /// at most `wait` (the lock is granted as soon as the leader's session ends), calling
    /// `waiting` after each wait that did not get it. SQLite: returns at once (one `serve`
    /// per file).
    pub fn lead(&mut self, wait: std::time::Duration, waiting: impl FnMut()) -> Result<(), StoreError> {
        match &mut self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(s) => s.lead(wait, waiting),
        }
    }

    /// Whether this store may write rounds: always with SQLite, after [`Store::lead`] with
    /// PostgreSQL.
    pub fn is_leader(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(_) => true,
            Backend::Postgres(s) => s.is_leader(),
        }
    }

    /// The options the store was opened with.
    pub fn options(&self) -> StoreOptions {
        dispatch!(&self.backend, s => s.options())
    }

    /// Writes the checkpoint of a fresh model (before round 0) and its ledger, if any.
    /// Refused if the store already holds a checkpoint.
    pub fn save_initial(&mut self, state: &CoordinatorState, at_ms: u64) -> Result<(), StoreError> {
        dispatch!(&mut self.backend, s => s.save_initial(state, at_ms))
    }

    /// Records a committed round in one transaction: its row, the checkpoint of `state` (the
    /// coordinator's state after the round), the ledger entries not stored yet, the pruning
    /// of old checkpoints and an audit line.
    ///
    /// The ledger stored must be a prefix of `state.ledger` ([`StoreError::LedgerMismatch`]
    /// otherwise), `state.version` must be newer than every stored checkpoint, and the round
    /// must not be recorded yet (its index is the table's key). On any error nothing is
    /// written.
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
        let inner = match &mut self.backend {
            Backend::Sqlite(s) => Prepared::Sqlite(s.prepare_commit_round(state, stats, at_ms)?),
            Backend::Postgres(s) => {
                Prepared::Postgres(s, Box::new(pg::PgStore::prepare_commit(state, stats, at_ms)?))
            }
        };
        Ok(PreparedCommit { inner })
    }

    /// Records an abandoned round: its row and an audit line; no checkpoint, no ledger entry
    /// (an abandoned round releases nothing and is not charged).
    pub fn record_abandoned(
        &mut self,
        stats: &RoundStats,
        reason: AbandonReason,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        dispatch!(&mut self.backend, s => s.record_abandoned(stats, reason, at_ms))
    }

    /// The state to resume from: the newest checkpoint with the full ledger, every value
    /// checked. `None` when the store holds no checkpoint.
    ///
    /// `next_round` is the checkpoint's, or one past the newest recorded round if that is
    /// later (rounds abandoned after the checkpoint keep their indices: a round index is
    /// never reused).
    pub fn load_latest(&self) -> Result<Option<CoordinatorState>, StoreError> {
        dispatch!(&self.backend, s => s.load_latest())
    }

    /// The budget in force (the newest `budget` row), if one was ever set.
    pub fn budget(&self) -> Result<Option<StoredBudget>, StoreError> {
        dispatch!(&self.backend, s => s.budget())
    }

    /// Sets the budget: the first call fixes it (`budget_set` in the audit log); a later one
    /// may change ε only (`budget_raised` or `budget_lowered`, with the old and new ε and
    /// `reason`). A change of δ or of the accountant, an unchanged ε and an empty reason are
    /// refused ([`StoreError::Budget`]). The new row extends the budget's hash chain.
    pub fn set_budget(&mut self, policy: PrivacyPolicy, reason: &str, at_ms: u64) -> Result<(), StoreError> {
        dispatch!(&mut self.backend, s => s.set_budget(policy, reason, at_ms))
    }

    /// Recomputes the hash chains of the ledger and the budget from their rows and compares
    /// them with the stored hashes; the first row that differs is [`ChainReport::broken`].
    pub fn verify_chain(&self) -> Result<ChainReport, StoreError> {
        dispatch!(&self.backend, s => s.verify_chain())
    }

    /// Counts for a status report.
    pub fn status(&self) -> Result<Status, StoreError> {
        dispatch!(&self.backend, s => s.status())
    }

    /// The newest `limit` lines of the audit log, oldest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        dispatch!(&self.backend, s => s.audit_log(limit))
    }

    /// Stores a newly enrolled device. [`StoreError::DuplicateDevice`] if the id is already
    /// stored, revoked or not (ids are not reused).
    pub fn insert_device(
        &mut self,
        device_id: DeviceId,
        enrolled_at_ms: u64,
        label: Option<&str>,
    ) -> Result<(), StoreError> {
        dispatch!(&mut self.backend, s => s.insert_device(device_id, enrolled_at_ms, label))
    }

    /// Marks a device revoked at `at_ms`. [`StoreError::UnknownDevice`] if it is not stored,
    /// [`StoreError::AlreadyRevoked`] if it was revoked before (the first time is kept).
    pub fn revoke_device(&mut self, device_id: DeviceId, at_ms: u64) -> Result<(), StoreError> {
        dispatch!(&mut self.backend, s => s.revoke_device(device_id, at_ms))
    }

    /// The stored device with this id, if any.
    pub fn device(&self, device_id: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        dispatch!(&self.backend, s => s.device(device_id))
    }

    /// Every stored device, enrolled or revoked, by id (in the order of their stored bits).
    pub fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        dispatch!(&self.backend, s => s.list_devices())
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
#[derive(Debug, Clone, PartialEq)]
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

/// One charge of the privacy ledger: a central-noise round's [`LedgerEntry`] (table
/// `ledger`) or a distributed-noise round's [`DdpCharge`] (table `ddp_ledger`). Both tables
/// form one ledger: one hash chain over the charges of both in round order, a round charged
/// at most once.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Charge {
    Central(LedgerEntry),
    Distributed(DdpCharge),
}

impl Charge {
    fn round(&self) -> u64 {
        match self {
            Charge::Central(e) => e.round,
            Charge::Distributed(c) => c.round,
        }
    }

    fn canonical_bytes(&self) -> Vec<u8> {
        match self {
            Charge::Central(e) => e.canonical_bytes(),
            Charge::Distributed(c) => c.canonical_bytes(),
        }
    }

    /// Bitwise equality: a charge read back must be exactly the charge made.
    fn same_bits(&self, other: &Charge) -> bool {
        self.canonical_bytes() == other.canonical_bytes()
    }
}

/// The ledger's charges in round order; two charges of one round are refused.
fn charges_of(central: &[LedgerEntry], ddp: &[DdpCharge]) -> Result<Vec<Charge>, StoreError> {
    let mut all: Vec<Charge> = central
        .iter()
        .map(|&e| Charge::Central(e))
        .chain(ddp.iter().map(|&c| Charge::Distributed(c)))
        .collect();
    all.sort_by_key(Charge::round);
    for pair in all.windows(2) {
        if pair[1].round() == pair[0].round() {
            return Err(invalid(format!("round {} is charged twice", pair[0].round())));
        }
    }
    Ok(all)
}

/// Splits charges back into the ledger's two lists.
fn split_charges(charges: &[Charge]) -> (Vec<LedgerEntry>, Vec<DdpCharge>) {
    let mut central = Vec::new();
    let mut ddp = Vec::new();
    for c in charges {
        match *c {
            Charge::Central(e) => central.push(e),
            Charge::Distributed(d) => ddp.push(d),
        }
    }
    (central, ddp)
}

/// A `ddp_ledger` row as stored, before any check.
struct DdpRow {
    round: i64,
    q: f64,
    l2: f64,
    l1: f64,
    device_var: f64,
    shares: i64,
    dim: i64,
}

impl DdpRow {
    /// The row as a distributed charge; its event is rebuilt by the checking constructor.
    fn decode(&self) -> Result<DdpCharge, StoreError> {
        let shares = from_sql("ddp_ledger.shares", self.shares)?;
        let dim = from_sql("ddp_ledger.dim", self.dim)?;
        let event = DdpEvent::from_parts(
            self.q,
            1,
            self.l2,
            self.l1,
            self.device_var,
            usize::try_from(shares).map_err(|_| corrupt("ddp_ledger.shares", "too large"))?,
            usize::try_from(dim).map_err(|_| corrupt("ddp_ledger.dim", "too large"))?,
        )
        .map_err(|e| corrupt("ddp_ledger", e.to_string()))?;
        Ok(DdpCharge { round: from_sql("ddp_ledger.round", self.round)?, event })
    }

    /// The columns of `charge`, in [`DDP_COLUMNS`] order without the hash.
    fn of(charge: &DdpCharge) -> Result<Self, StoreError> {
        let e = &charge.event;
        Ok(Self {
            round: to_sql("ddp_ledger round", charge.round)?,
            q: e.q(),
            l2: e.l2(),
            l1: e.l1(),
            device_var: e.device_var(),
            shares: count_to_sql("ddp_ledger shares", e.n_survivors())?,
            dim: count_to_sql("ddp_ledger dim", e.dim())?,
        })
    }
}

/// The columns of `ddp_ledger`, in the order both backends read and write them.
const DDP_COLUMNS: &str = "round, q, l2, l1, device_var, shares, dim, hash";

/// A ledger row as stored (of either table), before any check of its hash.
#[derive(Debug, Clone, PartialEq)]
struct LedgerRow {
    charge: Charge,
    hash: Option<Vec<u8>>,
}

/// A central `ledger` row's charge; the values are checked when the ledger is rebuilt.
fn central_charge(
    round: i64,
    q: f64,
    noise_multiplier: f64,
    clip_bits_noise: Option<f64>,
) -> Result<LedgerEntry, StoreError> {
    Ok(LedgerEntry { round: from_sql("ledger.round", round)?, q, noise_multiplier, clip_bits_noise })
}

/// Both tables' rows in round order; a round in both is refused.
fn merge_rows(mut rows: Vec<LedgerRow>) -> Result<Vec<LedgerRow>, StoreError> {
    rows.sort_by_key(|r| r.charge.round());
    for pair in rows.windows(2) {
        if pair[1].charge.round() == pair[0].charge.round() {
            return Err(corrupt(
                "ledger",
                format!("round {} is charged in both ledgers", pair[0].charge.round()),
            ));
        }
    }
    Ok(rows)
}

/// Recomputes both hash chains from their rows; the first row whose stored hash differs is
/// [`ChainReport::broken`].
fn chain_report(ledger: Vec<LedgerRow>, budget: &[BudgetRow]) -> Result<ChainReport, StoreError> {
    let ledger = merge_rows(ledger)?;
    let mut broken = None;
    let mut ledger_hashes = Vec::with_capacity(ledger.len());
    let mut prev = CHAIN_START;
    for row in ledger {
        let hash = chain_hash(&prev, &row.charge.canonical_bytes());
        if broken.is_none() && row.hash.as_deref() != Some(hash.as_slice()) {
            broken = Some(ChainBreak::Ledger { round: row.charge.round() });
        }
        ledger_hashes.push(hash);
        prev = hash;
    }
    let mut budget_hashes = Vec::with_capacity(budget.len());
    let mut prev = CHAIN_START;
    for row in budget {
        let hash = chain_hash(&prev, &row.bytes());
        if broken.is_none() && row.hash.as_slice() != hash.as_slice() {
            broken = Some(ChainBreak::Budget { seq: from_sql("budget.seq", row.seq)? });
        }
        budget_hashes.push(hash);
        prev = hash;
    }
    Ok(ChainReport { ledger_hashes, budget_hashes, broken })
}

/// The state to resume from: the newest checkpoint, the full ledger, and one past the newest
/// recorded round if that is later than the checkpoint's next round.
fn resume_state(
    ckpt: LoadedCheckpoint,
    charges: Vec<LedgerRow>,
    last_round: Option<i64>,
) -> Result<CoordinatorState, StoreError> {
    let charges: Vec<Charge> = merge_rows(charges)?.into_iter().map(|r| r.charge).collect();
    if let Some(last) = charges.last()
        && last.round() >= ckpt.next_round
    {
        return Err(StoreError::Inconsistent(format!(
            "the ledger charges round {} but checkpoint {} resumes at round {}",
            last.round(),
            ckpt.version,
            ckpt.next_round
        )));
    }
    let (central, ddp) = split_charges(&charges);
    let ledger = Ledger::from_parts(central, ddp).map_err(|e| corrupt("ledger", e.to_string()))?;
    let next_round = match last_round {
        Some(r) => ckpt.next_round.max(from_sql("rounds.round", r)?.saturating_add(1)),
        None => ckpt.next_round,
    };
    Ok(CoordinatorState {
        model: ckpt.model,
        version: ckpt.version,
        server: ckpt.server,
        ledger,
        next_round,
        clip_norm: ckpt.clip_norm,
    })
}

/// The charges of `ledger` not stored yet, each with its hash in the chain, after checking
/// that the ledger stored (`stored`, both tables in round order) is a prefix of it, bit for
/// bit ([`StoreError::LedgerMismatch`] otherwise).
fn charges_to_append(stored: &[LedgerRow], ledger: &Ledger) -> Result<Vec<(Charge, [u8; 32])>, StoreError> {
    let all = charges_of(ledger.entries(), ledger.ddp_entries())?;
    for (k, old) in stored.iter().enumerate() {
        if !all.get(k).is_some_and(|new| new.same_bits(&old.charge)) {
            return Err(StoreError::LedgerMismatch { round: old.charge.round() });
        }
    }
    let mut prev = match stored.last() {
        None => CHAIN_START,
        Some(row) => row
            .hash
            .as_deref()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(|| corrupt("ledger.hash", "the newest row has no valid hash"))?,
    };
    Ok(all[stored.len()..]
        .iter()
        .map(|&charge| {
            prev = chain_hash(&prev, &charge.canonical_bytes());
            (charge, prev)
        })
        .collect())
}

/// The budget row [`Store::set_budget`] appends after `last` (the newest row), with its
/// audit event and detail; the rules of a budget change are checked here, once for every
/// backend. `reason` is already trimmed and not empty.
fn plan_budget(
    last: Option<&BudgetRow>,
    policy: PrivacyPolicy,
    reason: &str,
    at: i64,
) -> Result<(BudgetRow, &'static str, String), StoreError> {
    let (epsilon, delta) = (policy.budget.epsilon(), policy.budget.delta());
    let accountant = accountant_label(policy.accountant);
    let (seq, prev, event, detail) = match last {
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
    let hash = chain_hash(&prev, &BudgetRow::canonical_bytes(seq, at, epsilon, delta, accountant, reason));
    let row = BudgetRow {
        seq,
        set_at_ms: at,
        epsilon,
        delta,
        accountant: accountant.to_owned(),
        reason: reason.to_owned(),
        hash: hash.to_vec(),
    };
    Ok((row, event, detail))
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
        check_ledger(&state.ledger, state.next_round)?;
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

/// The ledger's charges are valid events, in strictly increasing rounds (each round charged
/// once, in either table), all before `next_round`.
fn check_ledger(ledger: &Ledger, next_round: u64) -> Result<(), StoreError> {
    Ledger::from_parts(ledger.entries().to_vec(), ledger.ddp_entries().to_vec())?;
    for list in [
        ledger.entries().iter().map(|e| e.round).collect::<Vec<_>>(),
        ledger.ddp_entries().iter().map(|c| c.round).collect(),
    ] {
        if let Some(pair) = list.windows(2).find(|p| p[1] <= p[0]) {
            return Err(invalid(format!("ledger rounds are not increasing at round {}", pair[1])));
        }
    }
    if let Some(last) = charges_of(ledger.entries(), ledger.ddp_entries())?.last()
        && last.round() >= next_round
    {
        return Err(invalid(format!(
            "the ledger charges round {} but the next round is {next_round}",
            last.round()
        )));
    }
    Ok(())
}

/// A checkpoint row as read, before any check.
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
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

struct DeviceRow {
    device_id: i64,
    enrolled_at_ms: i64,
    revoked_at_ms: Option<i64>,
    label: Option<String>,
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
