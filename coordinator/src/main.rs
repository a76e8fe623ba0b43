//! `fedrec-coordinator`: the operator's command line — create a state directory, enroll devices, serve rounds over QUIC, and report what the store holds.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use fedrec_coordinator::auth::{DeviceId, Enroller, RevocationList, TokenKey, Verifier};
use fedrec_coordinator::config::{CONFIG_FILE, FileConfig, TEMPLATE};
use fedrec_coordinator::rules;
use fedrec_coordinator::server::{ServeConfig, Server, TlsIdentity};
use fedrec_coordinator::store::{Store, StoreError};
use fedrec_shared::GlobalModel;
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
/// The SQLite store.
const STORE_FILE: &str = "state.sqlite";

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
    },
    /// Enroll new devices: print one hex token per line.
    Enroll {
        /// The state directory.
        #[arg(long)]
        dir: PathBuf,
        /// How many devices.
        #[arg(long)]
        count: u32,
        /// Write the tokens to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
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
        Command::Init { dir } => init(&dir),
        Command::Enroll { dir, count, out } => enroll(&dir, count, out.as_deref()),
        Command::Serve { dir } => serve(&dir),
        Command::Status { dir } => status(&dir),
        Command::Rules { command } => rules(command),
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

/// Writes a new file readable only by its owner; refuses to overwrite.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

fn init(dir: &Path) -> Result<()> {
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
    Store::open(&store_path).with_context(|| format!("cannot create the store {}", store_path.display()))?;
    // The config last: its presence marks a complete state directory.
    std::fs::write(&config, TEMPLATE).with_context(|| format!("cannot write {}", config.display()))?;
    eprintln!(
        "initialised {}: edit {} (set the privacy budget), then `fedrec-coordinator serve --dir {}`",
        dir.display(),
        config.display(),
        dir.display()
    );
    Ok(())
}

/// Opens the store of an initialised directory (never creates one).
fn open_store(dir: &Path) -> Result<Store> {
    let path = dir.join(STORE_FILE);
    if !path.is_file() {
        bail!(
            "{} does not exist: run `fedrec-coordinator init --dir {}` first",
            path.display(),
            dir.display()
        );
    }
    Store::open(&path).with_context(|| format!("cannot open the store {}", path.display()))
}

fn token_key(dir: &Path) -> Result<TokenKey> {
    let path = dir.join(TOKEN_KEY_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    TokenKey::from_bytes(&bytes).with_context(|| format!("invalid token key {}", path.display()))
}

fn enroll(dir: &Path, count: u32, out: Option<&Path>) -> Result<()> {
    let enroller = Enroller::new(token_key(dir)?);
    let mut store = open_store(dir)?;
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
        let token = enroller.issue(device, now, None).context("cannot issue a token")?;
        for b in token.as_bytes() {
            lines.push_str(&format!("{b:02x}"));
        }
        lines.push('\n');
    }
    match out {
        Some(path) => write_private(path, lines.as_bytes())?,
        None => print!("{lines}"),
    }
    Ok(())
}

fn load_config(dir: &Path) -> Result<FileConfig> {
    Ok(FileConfig::load(&dir.join(CONFIG_FILE))?)
}

fn serve(dir: &Path) -> Result<()> {
    let file = load_config(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    let coordinator = file.coordinator_config().with_context(|| format!("in {}", config_path.display()))?;
    let store = open_store(dir)?;
    let revoked: RevocationList = store
        .list_devices()
        .context("cannot read the devices")?
        .into_iter()
        .filter(|d| d.is_revoked())
        .map(|d| d.device_id)
        .collect();
    let verifier = Verifier::new(vec![token_key(dir)?], revoked).context("cannot build the verifier")?;
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
    cfg.eligibility = file.eligibility();

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(cfg).context("cannot start the server")?;
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
                match &s.last_close {
                    Some(CoordinatorEvent::RoundCommitted { stats, new_version }) => eprintln!(
                        "round {} committed: model version {new_version}, {} checked in, {} selected, {} reported, {} dropped",
                        stats.round, stats.n_checked_in, stats.n_selected, stats.n_reported, stats.n_dropped
                    ),
                    Some(CoordinatorEvent::RoundAbandoned { stats, reason }) => eprintln!(
                        "round {} abandoned ({reason:?}): {} checked in, {} selected, {} reported",
                        stats.round, stats.n_checked_in, stats.n_selected, stats.n_reported
                    ),
                    _ => {}
                }
                if let (Some(e), false) = (&s.start_refused, refused_logged) {
                    eprintln!("no more rounds: {e}");
                    refused_logged = true;
                }
            }
        });
        server.run(shutdown_signal()).await.context("the server stopped")?;
        eprintln!("stopped");
        Ok(())
    })
}

/// Completes at SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
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
    match file.privacy_policy().with_context(|| format!("in {}", dir.join(CONFIG_FILE).display()))? {
        Some(policy) => {
            let ledger = store
                .load_latest()
                .context("cannot load the ledger")?
                .map(|st| st.ledger)
                .unwrap_or_default();
            let delta = policy.budget.delta();
            let spent = ledger.epsilon(delta, policy.accountant).context("cannot account the ledger")?;
            println!(
                "privacy spent: epsilon = {spent:.4} of {:.4} (delta = {delta:e})",
                policy.budget.epsilon()
            );
        }
        None => println!("privacy spent: no budget configured"),
    }
    println!("devices enrolled: {}", s.n_devices_enrolled);
    println!("devices revoked: {}", s.n_devices_revoked);
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
