//! `fedrec-coordinator`: the operator's command line — create a state directory, enroll devices, serve rounds over QUIC, govern the privacy budget, and report what the store holds.
//!
//! The privacy budget lives in the store: `init --epsilon --delta` or the first `serve` fixes
//! it, `serve` refuses a `fedrec.toml` whose budget differs (or that turns noise off while a
//! budget exists), and only `budget raise` / `budget lower` change it, each with a reason
//! written to the audit log. `serve` also refuses a store whose ledger hash chain is broken,
//! or that is behind the ledger head file ([`HEAD_FILE`]) this tool keeps next to it.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use fedrec_coordinator::auth::{DeviceId, Enroller, MAX_KEYS, RevocationList, TokenKey, Verifier};
use fedrec_coordinator::config::{CONFIG_FILE, FileConfig, TEMPLATE};
use fedrec_coordinator::rules;
use fedrec_coordinator::server::{ServeConfig, Server, TlsIdentity};
use fedrec_coordinator::store::{BackendKind, ChainReport, Store, StoreError, StoreLocation, StoreSection};
use fedrec_shared::GlobalModel;
use fedrec_shared::ledger::{PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::AccountantKind;
use fedrec_shared::round::CoordinatorEvent;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use ring::rand::{SecureRandom as _, SystemRandom};

/// The certificate devices pin (DER).
const CERT_FILE: &str = "cert.der";
/// The certificate's PKCS#8 private key (DER).
const KEY_FILE: &str = "key.der";
/// The HMAC key enrollment tokens are signed with.
const TOKEN_KEY_FILE: &str = "token.key";
/// Earlier token keys that still verify tokens (not sign them) after `rotate-key`: one hex
/// key per line, newest first. Absent when there are none.
const RETIRED_KEYS_FILE: &str = "token.key.retired";
/// The SQLite store.
const STORE_FILE: &str = "state.sqlite";
/// The ledger head file: how many ledger and budget rows the store held, and the head of
/// their hash chains, when a command of this tool last saw it (after every round while
/// `serve` runs). A store behind it (restored from an older copy, or deleted and recreated)
/// is refused.
const HEAD_FILE: &str = "ledger.head";

/// The fedrec coordinator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a state directory: a commented config file, a self-signed certificate, a token
    /// key and an empty store.
    Init {
        /// The state directory (created; must not hold a config yet).
        #[arg(long)]
        dir: PathBuf,
        /// Fix the privacy budget's epsilon now (with --delta): it is stored and written into
        /// fedrec.toml. Without it, the first `serve` fixes the budget fedrec.toml then holds.
        #[arg(long, requires = "delta")]
        epsilon: Option<f64>,
        /// The budget's delta (with --epsilon).
        #[arg(long, requires = "epsilon")]
        delta: Option<f64>,
    },
    /// Change the stored privacy budget (logged in the audit log with the reason); then set
    /// the same epsilon in fedrec.toml and restart `serve`.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Enroll new devices: print one hex token per line.
    ///
    /// With --out the file is created (it must not exist) before any device is enrolled; if
    /// the tokens cannot be written, the devices just enrolled are revoked.
    Enroll {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
        /// How many devices.
        #[arg(long)]
        count: u32,
        /// Write the tokens to this new file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke devices: their tokens are refused (BadToken) from the next `serve` start.
    Revoke {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
        /// Device ids, as `devices` lists them.
        #[arg(long = "device", value_name = "ID", num_args = 1..)]
        devices: Vec<u64>,
        /// Enrollment tokens (hex), as `enroll` wrote them.
        #[arg(long = "token", value_name = "HEX", num_args = 1..)]
        tokens: Vec<String>,
        /// A file of tokens, one hex token per line (an `enroll --out` file).
        #[arg(long, value_name = "FILE")]
        tokens_file: Option<PathBuf>,
    },
    /// List the enrolled devices: id, enrollment time and revocation time (Unix ms).
    Devices {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Draw a new token key: `enroll` signs with it from now on, and the previous key still
    /// verifies the tokens it signed until `retire-old-keys`. Restart `serve` to apply.
    RotateKey {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop accepting tokens signed by keys that `rotate-key` replaced: devices holding them
    /// must re-enroll. Restart `serve` to apply.
    RetireOldKeys {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve rounds until SIGINT or SIGTERM.
    Serve {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Report what the store holds.
    Status {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Publish context rules, signed with the directory's rules key.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Copy the directory's SQLite store into an empty PostgreSQL database in one
    /// transaction, check the copy (chain head, resume state, counts), and print the [store]
    /// lines that switch fedrec.toml to it. Stop `serve` first; the SQLite file is only read.
    Migrate(MigrateArgs),
}

/// `migrate`: the target database, given as the `[store]` keys it prints.
#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// The state directory (its store must be SQLite).
    #[arg(long)]
    dir: PathBuf,
    /// The PostgreSQL database (as store.url: no password in it).
    #[arg(long, value_name = "URL")]
    to: String,
    /// The environment variable holding the password (as store.password_env).
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// A file whose first line is the password, relative to --dir (as store.password_file).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// TLS to the server (as store.tls; default: require unless the host is loopback).
    #[arg(long, value_parser = ["require", "disable"])]
    tls: Option<String>,
    /// The CA certificates to trust (PEM), relative to --dir (as store.ca_file).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum BudgetCommand {
    /// Raise epsilon (delta and the accountant stay as first fixed).
    Raise(BudgetChange),
    /// Lower epsilon (rounds stop once the spend reaches it).
    Lower(BudgetChange),
}

/// A change of the stored budget's epsilon.
#[derive(Debug, clap::Args)]
struct BudgetChange {
    /// The state directory.
    #[arg(long)]
    dir: PathBuf,
    /// The new epsilon: above the current one to raise, below it to lower.
    #[arg(long)]
    epsilon: f64,
    /// Why (kept in the audit log).
    #[arg(long)]
    reason: String,
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Sign a TOML rules file as the next ruleset version; `serve` loads it at its next start.
    Publish {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
        /// The operator's rules file (TOML).
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the rules public key (hex) that apps verify rulesets with.
    Key {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Init { dir, epsilon, delta } => init(&dir, epsilon.zip(delta)),
        Command::Budget { command } => match command {
            BudgetCommand::Raise(c) => change_budget(&c.dir, c.epsilon, &c.reason, true),
            BudgetCommand::Lower(c) => change_budget(&c.dir, c.epsilon, &c.reason, false),
        },
        Command::Enroll { dir, count, out } => enroll(&dir, count, out.as_deref()),
        Command::Revoke { dir, devices, tokens, tokens_file } => {
            revoke(&dir, &devices, &tokens, tokens_file.as_deref())
        }
        Command::Devices { dir } => devices(&dir),
        Command::RotateKey { dir } => rotate_key(&dir),
        Command::RetireOldKeys { dir } => retire_old_keys(&dir),
        Command::Serve { dir } => serve(&dir),
        Command::Status { dir } => status(&dir),
        Command::Rules { command } => rules(command),
        Command::Migrate(args) => migrate(&args),
    }
}

/// Structured logs to standard error, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Creates a new file readable only by its owner; refuses to overwrite.
fn create_private(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// Writes `bytes` to `file` (at `path`) and syncs it.
fn write_synced(mut file: &File, path: &Path, bytes: &[u8]) -> Result<()> {
    file.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))
}

/// Writes a new file readable only by its owner; refuses to overwrite.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_synced(&create_private(path)?, path, bytes)
}

/// Replaces `path` with a file readable only by its owner holding `bytes`, atomically: a
/// crash leaves the old file or the new one.
fn replace_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().context("a file path")?.to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    // A leftover of an earlier crash: it never replaced anything.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", tmp.display()));
        }
        _ => {}
    }
    write_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    sync_parent(path)
}

/// Syncs the directory holding `path`, so that a rename or removal in it is durable.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", parent.display()))
}

/// Lower-case hex of `bytes`.
fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The bytes of a hex string (surrounding whitespace ignored); `None` if it is not hex.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

fn init(dir: &Path, budget: Option<(f64, f64)>) -> Result<()> {
    let budget = budget
        .map(|(epsilon, delta)| PrivacyBudget::new(epsilon, delta))
        .transpose()
        .context("invalid --epsilon/--delta")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join(CONFIG_FILE);
    if config.exists() {
        bail!("{} already exists: refusing to overwrite a state directory", config.display());
    }
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .context("cannot generate a self-signed certificate")?;
    write_private(&dir.join(KEY_FILE), &certified.key_pair.serialize_der())?;
    std::fs::write(dir.join(CERT_FILE), certified.cert.der())
        .with_context(|| format!("cannot write {}", dir.join(CERT_FILE).display()))?;
    let key = TokenKey::generate(&SystemRandom::new()).context("cannot draw a token key")?;
    write_private(&dir.join(TOKEN_KEY_FILE), &key.to_bytes())?;
    rules::SigningKey::create(dir).context("cannot create the rules signing key")?;
    let store_path = dir.join(STORE_FILE);
    let mut store = Store::open(&store_path)
        .with_context(|| format!("cannot create the store {}", store_path.display()))?;
    let mut text = TEMPLATE.to_owned();
    if let Some(budget) = budget {
        // The template's accountant.
        let policy = PrivacyPolicy { budget, accountant: AccountantKind::Rdp };
        store.set_budget(policy, "fixed by init", unix_ms()).context("cannot store the budget")?;
        text = text.replacen("# epsilon = 8.0", &format!("epsilon = {:?}", budget.epsilon()), 1).replacen(
            "# delta = 1e-6",
            &format!("delta = {:?}", budget.delta()),
            1,
        );
    }
    write_head(dir, &store.verify_chain().context("cannot read the ledger")?)?;
    // The config last: its presence marks a complete state directory.
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    let what = if budget.is_some() { "check the settings" } else { "set the privacy budget" };
    eprintln!(
        "initialised {}: edit {} ({what}), then `fedrec-coordinator serve --dir {}`",
        dir.display(),
        config.display(),
        dir.display()
    );
    Ok(())
}

/// Lower-case hex of a chain head.
fn head_hex(head: &[u8; 32]) -> String {
    encode_hex(head)
}

/// What [`HEAD_FILE`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadRecord {
    n_ledger: usize,
    n_budget: usize,
    head: [u8; 32],
}

/// Writes [`HEAD_FILE`] for the store's chains as `report` found them.
fn write_head(dir: &Path, report: &ChainReport) -> Result<()> {
    let text = format!(
        "# fedrec ledger head: the store's chains when fedrec-coordinator last saw them. Do not edit.\n\
         ledger_rows {}\nbudget_rows {}\nhead {}\n",
        report.ledger_hashes.len(),
        report.budget_hashes.len(),
        head_hex(&report.head())
    );
    replace_private(&dir.join(HEAD_FILE), text.as_bytes())
}

/// [`HEAD_FILE`], if there is one.
fn read_head(dir: &Path) -> Result<Option<HeadRecord>> {
    let path = dir.join(HEAD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .with_context(|| format!("{}: no {name:?} line", path.display()))
    };
    let count = |name: &str| -> Result<usize> {
        field(name)?.parse().with_context(|| format!("{}: {name:?} is not a count", path.display()))
    };
    let head = decode_hex(field("head ")?)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| format!("{}: the head is not 32 hex bytes", path.display()))?;
    Ok(Some(HeadRecord { n_ledger: count("ledger_rows ")?, n_budget: count("budget_rows ")?, head }))
}

/// How the store's chains compare with [`HEAD_FILE`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum HeadCheck {
    /// No head file.
    Absent,
    /// The store holds what the head file recorded (and perhaps more).
    Matches,
    /// The store is behind the head file, or differs from it: rolled back or replaced.
    Mismatch(String),
}

fn check_head(dir: &Path, report: &ChainReport) -> Result<HeadCheck> {
    let Some(recorded) = read_head(dir)? else { return Ok(HeadCheck::Absent) };
    Ok(match report.head_at(recorded.n_ledger, recorded.n_budget) {
        None => HeadCheck::Mismatch(format!(
            "the store holds {} ledger and {} budget rows, fewer than the {} and {} {} records: it was \
             restored from an older copy, or deleted and recreated, and would forget privacy spend",
            report.ledger_hashes.len(),
            report.budget_hashes.len(),
            recorded.n_ledger,
            recorded.n_budget,
            HEAD_FILE
        )),
        Some(head) if head != recorded.head => HeadCheck::Mismatch(format!(
            "the store's first {} ledger and {} budget rows do not hash to the head {} records: the \
             store was replaced or its chain rebuilt",
            recorded.n_ledger, recorded.n_budget, HEAD_FILE
        )),
        Some(_) => HeadCheck::Matches,
    })
}

/// Refuses a store whose chain is broken or that is behind [`HEAD_FILE`]; the chains.
fn checked_chain(dir: &Path, store: &Store) -> Result<ChainReport> {
    let report = store.verify_chain().context("cannot read the privacy ledger")?;
    if let Some(b) = report.broken {
        bail!(
            "the privacy ledger's hash chain is broken at {b}: a row was edited, inserted or deleted \
             outside fedrec-coordinator. Refusing to continue; restore a good copy of {STORE_FILE} \
             (`fedrec-coordinator status --dir {}` shows the chain)",
            dir.display()
        );
    }
    match check_head(dir, &report)? {
        HeadCheck::Mismatch(why) => bail!(
            "{why}. Refusing to continue. If this is deliberate (a new deployment), move {} away.",
            dir.join(HEAD_FILE).display()
        ),
        HeadCheck::Absent if !report.ledger_hashes.is_empty() || !report.budget_hashes.is_empty() => {
            eprintln!(
                "warning: no {HEAD_FILE}: a rollback of the store cannot be detected this time; writing one"
            );
        }
        _ => {}
    }
    Ok(report)
}

/// Reconciles fedrec.toml's budget with the store's before `serve`: the first budget is
/// stored; a different one, or none while one is stored, is refused with what to do.
fn reconcile_budget(dir: &Path, store: &mut Store, file: Option<PrivacyPolicy>) -> Result<()> {
    let stored = store.budget().context("cannot read the stored budget")?;
    let config_path = dir.join(CONFIG_FILE);
    let describe = |p: &PrivacyPolicy| {
        format!(
            "epsilon = {:?}, delta = {:?}, accountant {:?}",
            p.budget.epsilon(),
            p.budget.delta(),
            p.accountant
        )
    };
    match (stored, file) {
        (None, None) => Ok(()),
        (None, Some(policy)) => {
            store
                .set_budget(policy, "fixed at the first serve from fedrec.toml", unix_ms())
                .context("cannot store the budget")?;
            eprintln!(
                "privacy budget fixed in the store: {}; from now on only `fedrec-coordinator budget raise` changes it",
                describe(&policy)
            );
            Ok(())
        }
        (Some(stored), None) => bail!(
            "the store holds a privacy budget ({}), and {} sets none: a round without noise is refused \
             while a budget exists. Set noise_multiplier > 0 and epsilon = {:?}, delta = {:?} in [privacy]",
            describe(&stored.policy),
            config_path.display(),
            stored.policy.budget.epsilon(),
            stored.policy.budget.delta()
        ),
        (Some(stored), Some(policy)) if stored.policy != policy => bail!(
            "{}'s privacy budget ({}) differs from the stored budget ({}), which is the one in force. To \
             raise it: `fedrec-coordinator budget raise --dir {} --epsilon E --reason \"...\"` (logged), then \
             write the same epsilon in {}; otherwise write the stored values back",
            config_path.display(),
            describe(&policy),
            describe(&stored.policy),
            dir.display(),
            config_path.display()
        ),
        (Some(_), Some(_)) => Ok(()),
    }
}

fn change_budget(dir: &Path, epsilon: f64, reason: &str, raise: bool) -> Result<()> {
    let mut store = open_store(dir)?;
    checked_chain(dir, &store)?;
    let stored = store.budget().context("cannot read the stored budget")?.with_context(|| {
        format!(
            "no budget is stored: set epsilon and delta in {} (the first serve fixes them) or use `init --epsilon --delta`",
            dir.join(CONFIG_FILE).display()
        )
    })?;
    let current = stored.policy.budget.epsilon();
    if raise && epsilon <= current {
        bail!(
            "`budget raise` needs an epsilon above the current {current:?} (use `budget lower` to lower it)"
        );
    }
    if !raise && epsilon >= current {
        bail!(
            "`budget lower` needs an epsilon below the current {current:?} (use `budget raise` to raise it)"
        );
    }
    let budget = PrivacyBudget::new(epsilon, stored.policy.budget.delta()).context("invalid --epsilon")?;
    let policy = PrivacyPolicy { budget, ..stored.policy };
    store.set_budget(policy, reason, unix_ms()).context("cannot change the budget")?;
    write_head(dir, &store.verify_chain().context("cannot read the privacy ledger")?)?;
    eprintln!(
        "budget {} from epsilon = {current:?} to {epsilon:?} (logged in the audit log with your reason); \
         set `epsilon = {epsilon:?}` in {} and restart `serve`",
        if raise { "raised" } else { "lowered" },
        dir.join(CONFIG_FILE).display()
    );
    Ok(())
}

/// Where the directory's state lives: `[store]` of its fedrec.toml (only that section is
/// read, so that commands other than `serve` work while another part of the file is being
/// edited), SQLite in the directory when the section or the file is absent.
fn store_location(dir: &Path) -> Result<StoreLocation> {
    let path = dir.join(CONFIG_FILE);
    let section = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let table: toml::Table =
                text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?;
            match table.get("store") {
                Some(value) => value
                    .clone()
                    .try_into::<StoreSection>()
                    .with_context(|| format!("invalid [store] in {}", path.display()))?,
                None => StoreSection::default(),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreSection::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    section.location(dir, Path::new(STORE_FILE)).with_context(|| format!("in {}", path.display()))
}

/// Opens the store of an initialised directory (never creates a SQLite file; creates the
/// schema of an empty PostgreSQL database).
fn open_store(dir: &Path) -> Result<Store> {
    match store_location(dir)? {
        StoreLocation::Sqlite(path) => {
            if !path.is_file() {
                bail!(
                    "{} does not exist: run `fedrec-coordinator init --dir {}` first",
                    path.display(),
                    dir.display()
                );
            }
            Store::open(&path).with_context(|| format!("cannot open the store {}", path.display()))
        }
        location => Store::open_location(&location, Default::default())
            .context("cannot open the PostgreSQL store (store.url in fedrec.toml)"),
    }
}

/// Waits until this process leads (PostgreSQL: holds the leader lock; at once with SQLite),
/// saying that it stands by meanwhile.
fn lead(store: &mut Store) -> Result<()> {
    if store.backend() != BackendKind::Postgres {
        return Ok(());
    }
    let start = std::time::Instant::now();
    let mut said = false;
    store
        .lead(std::time::Duration::from_secs(1), || {
            if !said {
                eprintln!("standing by: another serve leads; taking over when its session ends");
                said = true;
            }
        })
        .context("cannot take the leader lock")?;
    eprintln!("leading: holding the leader lock (waited {} ms)", start.elapsed().as_millis());
    Ok(())
}

/// The key `enroll` signs with.
fn token_key(dir: &Path) -> Result<TokenKey> {
    let path = dir.join(TOKEN_KEY_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    TokenKey::from_bytes(&bytes).with_context(|| format!("invalid token key {}", path.display()))
}

/// The keys `rotate-key` replaced that still verify tokens, newest first, without the
/// signing key (a rotation interrupted between its two writes may have listed it already).
fn retired_keys(dir: &Path, signing: &TokenKey) -> Result<Vec<TokenKey>> {
    let path = dir.join(RETIRED_KEYS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let key = decode_hex(line)
            .and_then(|bytes| TokenKey::from_bytes(&bytes).ok())
            .with_context(|| format!("{} line {}: not a hex token key", path.display(), i + 1))?;
        if key.to_bytes() != signing.to_bytes() {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Every key that verifies tokens, newest (the signing key) first.
fn verifying_keys(dir: &Path) -> Result<Vec<TokenKey>> {
    let signing = token_key(dir)?;
    let mut keys = retired_keys(dir, &signing)?;
    keys.insert(0, signing);
    Ok(keys)
}

/// A verifier with every key and no revocation, to read the device id out of a token.
fn token_reader(dir: &Path) -> Result<Verifier> {
    Verifier::new(verifying_keys(dir)?, RevocationList::new()).context("cannot load the token keys")
}

fn enroll(dir: &Path, count: u32, out: Option<&Path>) -> Result<()> {
    let enroller = Enroller::new(token_key(dir)?);
    let mut store = open_store(dir)?;
    // The output before the first device: a file that cannot be created costs no device.
    let file = out.map(|path| create_private(path).map(|file| (file, path))).transpose()?;
    let mut enrolled = Vec::new();
    let written = issue_tokens(&enroller, &mut store, count, &mut enrolled).and_then(|lines| match &file {
        Some((file, path)) => write_synced(file, path, lines.as_bytes()),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(lines.as_bytes())
                .and_then(|()| stdout.flush())
                .context("cannot write the tokens")
        }
    });
    let Err(e) = written else { return Ok(()) };
    // Nobody holds these tokens (or only part of them): devices nothing could revoke later.
    if let Some((file, path)) = file {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    let now = unix_ms();
    let failed: Vec<String> = enrolled
        .iter()
        .filter(|&&device| store.revoke_device(device, now).is_err())
        .map(|device| device.get().to_string())
        .collect();
    if failed.is_empty() {
        Err(e.context(format!("enrolled {} devices, then revoked them again", enrolled.len())))
    } else {
        Err(e.context(format!(
            "enrolled {} devices and could not revoke {} of them: revoke them with `fedrec-coordinator revoke --dir {} --device {}`",
            enrolled.len(),
            failed.len(),
            dir.display(),
            failed.join(" ")
        )))
    }
}

/// Enrolls `count` devices (pushing each onto `enrolled` as soon as it is stored); their
/// tokens, one hex line each.
fn issue_tokens(
    enroller: &Enroller,
    store: &mut Store,
    count: u32,
    enrolled: &mut Vec<DeviceId>,
) -> Result<String> {
    let rng = SystemRandom::new();
    let mut lines = String::new();
    let now = unix_ms();
    for _ in 0..count {
        // Random ids: a device id says nothing about when or in what order it enrolled.
        let device = loop {
            let mut bytes = [0u8; 8];
            rng.fill(&mut bytes).map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
            let device = DeviceId::new(u64::from_le_bytes(bytes));
            match store.insert_device(device, now, None) {
                Ok(()) => break device,
                Err(StoreError::DuplicateDevice(_)) => continue,
                Err(e) => return Err(e).context("cannot record the device"),
            }
        };
        enrolled.push(device);
        let token = enroller.issue(device, now, None).context("cannot issue a token")?;
        lines.push_str(&encode_hex(token.as_bytes()));
        lines.push('\n');
    }
    Ok(lines)
}

fn revoke(dir: &Path, ids: &[u64], tokens: &[String], tokens_file: Option<&Path>) -> Result<()> {
    let mut store = open_store(dir)?;
    let mut texts: Vec<(String, String)> =
        tokens.iter().enumerate().map(|(i, t)| (format!("--token #{}", i + 1), t.clone())).collect();
    if let Some(path) = tokens_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        texts.extend(
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| (format!("{} line {}", path.display(), i + 1), l.to_owned())),
        );
    }
    if ids.is_empty() && texts.is_empty() {
        bail!("name the devices to revoke: --device ID, --token HEX or --tokens-file FILE");
    }
    // Everything is checked before anything is revoked: a typo revokes nothing.
    let mut devices: Vec<DeviceId> = ids.iter().copied().map(DeviceId::new).collect();
    if !texts.is_empty() {
        let reader = token_reader(dir)?;
        for (what, text) in &texts {
            let bytes = decode_hex(text).with_context(|| format!("{what}: not hex"))?;
            let claims = reader
                .authenticate(&bytes)
                .map_err(|e| anyhow::anyhow!("{what}: not a token of this coordinator ({e})"))?;
            devices.push(claims.device);
        }
    }
    devices.sort_unstable();
    devices.dedup();
    for &device in &devices {
        if store.device(device).context("cannot read the devices")?.is_none() {
            bail!("device {} is not enrolled here: nothing was revoked", device.get());
        }
    }
    let now = unix_ms();
    let (mut n_revoked, mut n_already) = (0, 0);
    for &device in &devices {
        match store.revoke_device(device, now) {
            Ok(()) => n_revoked += 1,
            Err(StoreError::AlreadyRevoked(_)) => n_already += 1,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot revoke device {} ({n_revoked} revoked before it)", device.get())
                });
            }
        }
    }
    eprintln!(
        "revoked {n_revoked} devices ({n_already} were already revoked); restart `serve` to refuse their tokens"
    );
    Ok(())
}

fn devices(dir: &Path) -> Result<()> {
    let store = open_store(dir)?;
    let mut stdout = std::io::stdout().lock();
    let mut text = String::from("device_id enrolled_at_ms revoked_at_ms\n");
    for d in store.list_devices().context("cannot read the devices")? {
        let revoked = d.revoked_at_ms.map_or_else(|| "-".to_owned(), |ms| ms.to_string());
        let _ = writeln!(text, "{} {} {revoked}", d.device_id.get(), d.enrolled_at_ms);
    }
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).context("cannot write the list")
}

fn rotate_key(dir: &Path) -> Result<()> {
    open_store(dir)?;
    let current = token_key(dir)?;
    let mut retired = retired_keys(dir, &current)?;
    if retired.len() + 2 > MAX_KEYS {
        bail!(
            "{} retired keys still verify tokens, and a verifier holds at most {MAX_KEYS} keys: run \
             `fedrec-coordinator retire-old-keys --dir {}` first (devices holding tokens of them \
             must then re-enroll)",
            retired.len(),
            dir.display()
        );
    }
    retired.insert(0, current);
    let new = TokenKey::generate(&SystemRandom::new()).context("cannot draw a token key")?;
    // Retired list first: a crash between the two writes leaves the old key both signing and
    // retired, which is harmless; the other order could lose it.
    let mut text = String::new();
    for key in &retired {
        text.push_str(&encode_hex(&key.to_bytes()));
        text.push('\n');
    }
    replace_private(&dir.join(RETIRED_KEYS_FILE), text.as_bytes())?;
    replace_private(&dir.join(TOKEN_KEY_FILE), &new.to_bytes())?;
    eprintln!(
        "rotated the token key: `enroll` signs with the new key; tokens signed by earlier keys \
         ({} kept) keep working. Restart `serve` to accept the new tokens. Once every device holds a \
         new token, `fedrec-coordinator retire-old-keys --dir {}` stops accepting the old ones \
         (run it now if the old key leaked: every device must then re-enroll).",
        retired.len(),
        dir.display()
    );
    Ok(())
}

fn retire_old_keys(dir: &Path) -> Result<()> {
    open_store(dir)?;
    let current = token_key(dir)?;
    let retired = retired_keys(dir, &current)?;
    let path = dir.join(RETIRED_KEYS_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_parent(&path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    eprintln!(
        "retired {} old token keys: only tokens signed by the current key verify from the next \
         `serve` start; devices holding older tokens are refused (bad_token) and must re-enroll",
        retired.len()
    );
    Ok(())
}

fn load_config(dir: &Path) -> Result<FileConfig> {
    Ok(FileConfig::load(&dir.join(CONFIG_FILE))?)
}

fn serve(dir: &Path) -> Result<()> {
    let file = load_config(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    let coordinator = file.coordinator_config().with_context(|| format!("in {}", config_path.display()))?;
    let mut store = open_store(dir)?;
    // A stand-by does nothing (not even bind its socket) until it leads.
    lead(&mut store)?;
    checked_chain(dir, &store)?;
    reconcile_budget(dir, &mut store, coordinator.privacy)?;
    write_head(dir, &store.verify_chain().context("cannot read the privacy ledger")?)?;
    // A second connection to keep the head file current after every round.
    let head_store = open_store(dir)?;
    let head_dir = dir.to_owned();
    let revoked: RevocationList = store
        .list_devices()
        .context("cannot read the devices")?
        .into_iter()
        .filter(|d| d.is_revoked())
        .map(|d| d.device_id)
        .collect();
    let verifier = Verifier::new(verifying_keys(dir)?, revoked).context("cannot build the verifier")?;
    let model = GlobalModel::init(file.shape(), file.model_init(), &mut StdRng::from_os_rng())
        .with_context(|| format!("invalid [model] in {}", config_path.display()))?;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut cfg = ServeConfig::new(file.listen, coordinator, model, verifier);
    cfg.tls = TlsIdentity::Der { chain: vec![read(CERT_FILE)?], key: read(KEY_FILE)? };
    cfg.round_gap = file.round_gap();
    cfg.store = Some(store);
    cfg.metrics_listen = file.metrics_listen;
    cfg.rules = rules::PublishedRuleset::load(dir).context("cannot load the rules")?.map(Arc::new);
    match &cfg.rules {
        Some(r) => eprintln!("serving rules version {}", r.version()),
        None => eprintln!("no rules published"),
    }
    let limits = file.limits().with_context(|| format!("in {}", config_path.display()))?;
    cfg.rounds_per_device_per_day = limits.rounds_per_device_per_day;
    cfg.max_connections = limits.max_connections;
    cfg.max_invalid_requests = limits.max_invalid_requests;
    cfg.max_connections_per_source = limits.max_connections_per_source;
    cfg.max_concurrent_handshakes = limits.max_concurrent_handshakes;
    cfg.read_timeout = std::time::Duration::from_millis(limits.read_timeout_ms);
    cfg.max_upload_memory = limits.max_upload_memory();
    cfg.eligibility = file.eligibility();
    cfg.items_per_round = file.items_per_round().with_context(|| format!("in {}", config_path.display()))?;
    cfg.download = file.download().with_context(|| format!("in {}", config_path.display()))?;

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(cfg).context("cannot start the server")?;
        // The handlers are in place before anyone can read that the server listens: a SIGTERM
        // right after that line is a clean stop, not the default action's kill.
        let shutdown = shutdown_signal()?;
        eprintln!("listening on {}", server.local_addr());
        if let Some(addr) = server.metrics_addr() {
            eprintln!("metrics on {addr}");
        }
        let mut status = server.status();
        {
            let s = status.borrow_and_update();
            eprintln!("resuming at round {} with model version {}", s.next_round, s.model.version);
        }
        tokio::spawn(async move {
            let mut refused_logged = false;
            while status.changed().await.is_ok() {
                let s = status.borrow_and_update().clone();
                // A round with noise logs no counts: they would reveal its sample.
                match &s.last_close {
                    Some(CoordinatorEvent::RoundCommitted { stats, new_version }) if stats.private => {
                        eprintln!("round {} committed: model version {new_version}", stats.round)
                    }
                    Some(CoordinatorEvent::RoundCommitted { stats, new_version }) => eprintln!(
                        "round {} committed: model version {new_version}, {} checked in, {} selected, {} reported, {} dropped",
                        stats.round, stats.n_checked_in, stats.n_selected, stats.n_reported, stats.n_dropped
                    ),
                    Some(CoordinatorEvent::RoundAbandoned { stats, reason }) if stats.private => {
                        eprintln!("round {} abandoned ({reason:?})", stats.round)
                    }
                    Some(CoordinatorEvent::RoundAbandoned { stats, reason }) => eprintln!(
                        "round {} abandoned ({reason:?}): {} checked in, {} selected, {} reported",
                        stats.round, stats.n_checked_in, stats.n_selected, stats.n_reported
                    ),
                    _ => {}
                }
                if s.last_close.is_some() {
                    match head_store.verify_chain() {
                        Ok(report) => {
                            if let Err(e) = write_head(&head_dir, &report) {
                                eprintln!("warning: cannot update {HEAD_FILE}: {e:#}");
                            }
                        }
                        Err(e) => eprintln!("warning: cannot read the ledger to update {HEAD_FILE}: {e}"),
                    }
                }
                if let (Some(e), false) = (&s.start_refused, refused_logged) {
                    eprintln!("no more rounds: {e}");
                    refused_logged = true;
                }
            }
        });
        server.run(shutdown).await.context("the server stopped")?;
        eprintln!("stopped");
        Ok(())
    })
}

/// Registers the SIGINT and SIGTERM handlers now (inside the runtime) and returns what
/// completes at the first of them.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

fn status(dir: &Path) -> Result<()> {
    let file = load_config(dir)?;
    let store = open_store(dir)?;
    let s = store.status().context("cannot read the store's status")?;
    println!("rounds committed: {}", s.n_rounds_committed);
    println!("rounds abandoned: {}", s.n_rounds_abandoned);
    match s.last_model_version {
        Some(v) => println!("last model version: {v}"),
        None => println!("last model version: none (never served)"),
    }
    println!("ledger entries: {}", s.n_ledger_entries);
    let file_policy =
        file.privacy_policy().with_context(|| format!("in {}", dir.join(CONFIG_FILE).display()))?;
    let stored = store.budget().context("cannot read the stored budget")?;
    let ledger = || -> Result<_> {
        Ok(store.load_latest().context("cannot load the ledger")?.map(|st| st.ledger).unwrap_or_default())
    };
    match (&stored, file_policy) {
        (Some(stored), _) => {
            let policy = stored.policy;
            let delta = policy.budget.delta();
            let spent = ledger()?.epsilon(delta, policy.accountant).context("cannot account the ledger")?;
            println!(
                "privacy spent: epsilon = {spent:.4} of {:.4} (delta = {delta:e})",
                policy.budget.epsilon()
            );
            println!(
                "privacy budget: stored (change {}: {:?}), accountant {:?}",
                stored.seq, stored.reason, policy.accountant
            );
            if file_policy.is_some_and(|f| f != policy) || file_policy.is_none() {
                println!(
                    "warning: {}'s budget differs from the stored one: serve refuses it (see `budget raise`)",
                    CONFIG_FILE
                );
            }
        }
        (None, Some(policy)) => {
            let delta = policy.budget.delta();
            let spent = ledger()?.epsilon(delta, policy.accountant).context("cannot account the ledger")?;
            println!(
                "privacy spent: epsilon = {spent:.4} of {:.4} (delta = {delta:e})",
                policy.budget.epsilon()
            );
            println!(
                "privacy budget: from {CONFIG_FILE}, not yet fixed in the store (the first serve fixes it)"
            );
        }
        (None, None) => println!("privacy spent: no budget configured"),
    }
    println!("devices enrolled: {}", s.n_devices_enrolled);
    println!("devices revoked: {}", s.n_devices_revoked);
    let signing = token_key(dir)?;
    println!("retired token keys still verifying: {}", retired_keys(dir, &signing)?.len());
    // The chains last: a broken one makes the command fail after everything is printed.
    let report = store.verify_chain().context("cannot read the privacy ledger")?;
    let mut ok = true;
    match report.broken {
        None => println!(
            "ledger chain: ok ({} charges, {} budget rows)",
            report.ledger_hashes.len(),
            report.budget_hashes.len()
        ),
        Some(b) => {
            println!("ledger chain: BROKEN at {b} (a row was edited, inserted or deleted)");
            ok = false;
        }
    }
    println!("ledger head: {} (keep a copy elsewhere to detect a rebuilt chain)", head_hex(&report.head()));
    match check_head(dir, &report)? {
        HeadCheck::Absent => println!("ledger head file: absent"),
        HeadCheck::Matches => println!("ledger head file: matches"),
        HeadCheck::Mismatch(why) => {
            println!("ledger head file: MISMATCH: {why}");
            ok = false;
        }
    }
    if !ok {
        bail!("the privacy ledger failed verification: serve refuses this store");
    }
    Ok(())
}

fn rules(command: RulesCommand) -> Result<()> {
    match command {
        RulesCommand::Publish { dir, file } => {
            open_store(&dir)?;
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let published = rules::publish(&dir, &text).with_context(|| format!("in {}", file.display()))?;
            let key = rules::SigningKey::load(&dir)?;
            eprintln!(
                "published rules version {} into {}; restart `serve` to distribute it",
                published.version(),
                dir.join(rules::RULES_FILE).display()
            );
            eprintln!("apps verify it with the public key {}", rules::hex(&key.public_key()));
        }
        RulesCommand::Key { dir } => {
            open_store(&dir)?;
            println!("{}", rules::hex(&rules::SigningKey::load_or_create(&dir)?.public_key()));
        }
    }
    Ok(())
}

/// `migrate`: SQLite to an empty PostgreSQL database, checked, then the lines to switch.
fn migrate(args: &MigrateArgs) -> Result<()> {
    use fedrec_coordinator::store::{TlsMode, migrate_sqlite_to_postgres};
    let dir = &args.dir;
    let StoreLocation::Sqlite(sqlite) = store_location(dir)? else {
        bail!("the store of {} is already PostgreSQL ([store] in {CONFIG_FILE})", dir.display());
    };
    if !sqlite.is_file() {
        bail!("{} does not exist: nothing to migrate", sqlite.display());
    }
    let section = StoreSection {
        backend: BackendKind::Postgres,
        url: Some(args.to.clone()),
        password_env: args.password_env.clone(),
        password_file: args.password_file.clone(),
        tls: args.tls.as_deref().map(|t| if t == "disable" { TlsMode::Disable } else { TlsMode::Require }),
        ca_file: args.ca_file.clone(),
    };
    let StoreLocation::Postgres(target) = section.location(dir, Path::new(STORE_FILE))? else {
        bail!("--to must name a PostgreSQL database");
    };
    let report = migrate_sqlite_to_postgres(&sqlite, &target)
        .with_context(|| format!("cannot migrate {} to PostgreSQL", sqlite.display()))?;
    let s = &report.status;
    println!(
        "copied {} into PostgreSQL in one transaction (tls = {})",
        sqlite.display(),
        target.tls_mode().as_str()
    );
    println!(
        "rows: {} rounds ({} committed, {} abandoned), {} checkpoints, {} ledger charges, {} budget rows, \
         {} audit lines, {} devices ({} revoked)",
        s.n_rounds_committed + s.n_rounds_abandoned,
        s.n_rounds_committed,
        s.n_rounds_abandoned,
        s.n_checkpoints,
        s.n_ledger_entries,
        report.n_budget_rows,
        report.n_audit_lines,
        s.n_devices_enrolled + s.n_devices_revoked,
        s.n_devices_revoked
    );
    println!("ledger head: {} (equal in SQLite and PostgreSQL)", head_hex(&report.head));
    match report.next_round {
        Some(r) => println!("serve resumes at round {r}"),
        None => println!("serve starts from a fresh model (the store held no checkpoint)"),
    }
    println!(
        "{} was only read. To switch, stop serve and put this in {}:",
        sqlite.display(),
        dir.join(CONFIG_FILE).display()
    );
    let quote = |v: &str| toml::Value::String(v.to_owned()).to_string();
    let path = |p: &Path| quote(&p.to_string_lossy());
    println!("[store]\nbackend = \"postgres\"\nurl = {}", quote(&args.to));
    if let Some(v) = &args.password_env {
        println!("password_env = {}", quote(v));
    }
    if let Some(p) = &args.password_file {
        println!("password_file = {}", path(p));
    }
    println!("tls = \"{}\"", target.tls_mode().as_str());
    if let Some(p) = &args.ca_file {
        println!("ca_file = {}", path(p));
    }
    Ok(())
}
