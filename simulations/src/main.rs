//! The `fedrec-sim` command line: fetch datasets, run federations, baselines and benchmarks.

use std::path::PathBuf;

/// The simulator allocates and frees a dense update per device per round on worker threads;
/// glibc hands those pages back to the kernel every round and faults them in again, which
/// cost more than training. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fedrec_sim::data::{self, DataSource, SplitKind};
use fedrec_sim::federation::{self, ObjectiveKind, OptimizerKind, RunConfig, UserData};

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
    #[value(name = "ml-100k")]
    Ml100k,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ObjectiveArg {
    Explicit,
    Implicit,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OptimizerArg {
    Adam,
    Sgd,
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
    fn source(&self) -> DataSource {
        if let Some(path) = &self.ratings {
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
    /// Training objective.
    #[arg(long, value_enum, default_value_t = ObjectiveArg::Explicit)]
    objective: ObjectiveArg,
    /// Rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Devices per round.
    #[arg(long)]
    clients_per_round: Option<usize>,
    /// Embedding dimension.
    #[arg(long)]
    dim: Option<usize>,
    /// Number of user segments.
    #[arg(long)]
    segments: Option<usize>,
    /// Ridge on user vectors.
    #[arg(long)]
    l2_user: Option<f32>,
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
    optimizer: Option<OptimizerArg>,
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
    /// Standard deviation of the initial item factors.
    #[arg(long)]
    init_std: Option<f32>,
    /// Evaluate every N rounds (0: only at the end).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the split and of every random choice in the run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl RunArgs {
    fn config(&self) -> RunConfig {
        let objective = match self.objective {
            ObjectiveArg::Explicit => ObjectiveKind::Explicit,
            ObjectiveArg::Implicit => ObjectiveKind::Implicit,
        };
        let mut c = RunConfig::defaults(objective);
        macro_rules! set {
            ($($f:ident => $t:ident),*) => { $( if let Some(v) = self.$f { c.$t = v; } )* };
        }
        set!(rounds => rounds, clients_per_round => clients_per_round, dim => dim, segments => n_segments,
             l2_user => l2_user, l2_user_bias => l2_user_bias, l2_item => l2_item, l2_item_bias => l2_item_bias,
             alpha => alpha, server_lr => server_lr, momentum => momentum, clip_norm => clip_norm,
             noise_multiplier => noise_multiplier, dropout => dropout, init_std => init_std,
             eval_every => eval_every, threads => threads);
        if let Some(o) = self.optimizer {
            c.optimizer = match o {
                OptimizerArg::Adam => OptimizerKind::Adam,
                OptimizerArg::Sgd => OptimizerKind::Sgd,
            };
        }
        c.seed = self.seed;
        c
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch { dataset: DatasetName::Ml100k, data_dir } => {
            let dir = data_dir.unwrap_or_else(data::default_data_dir);
            let out = data::fetch_ml100k(&dir).context("fetching MovieLens-100K")?;
            println!("MovieLens-100K is in {}", out.display());
            Ok(())
        }
        Command::Run(args) => run(&args),
        Command::Baseline(args) => baseline(&args),
    }
}

fn load(args: &RunArgs, cfg: &RunConfig) -> Result<UserData> {
    let kind = match args.data.split {
        SplitArg::Random => SplitKind::Random,
        SplitArg::Temporal => SplitKind::Temporal,
    };
    let split = data::load_split(&args.data.source(), args.data.test_fraction, kind, args.seed)?;
    if split.train.is_empty() {
        bail!("the training set is empty");
    }
    let threshold = args.data.relevance_threshold.or_else(|| {
        let (lo, hi) = split.rating_range();
        (lo < hi).then_some(4.0)
    });
    Ok(UserData::from_split(&split, cfg.objective, threshold))
}

fn baseline(args: &BaselineArgs) -> Result<()> {
    let cfg = args.run.config();
    let users = load(&args.run, &cfg)?;
    let t0 = std::time::Instant::now();
    let m = match args.method {
        Method::Als => {
            let model = fedrec_sim::baseline::als(&users, &cfg, args.iterations)?;
            fedrec_sim::baseline::evaluate_model(&users, &model, cfg.train_params(), cfg.threads)
        }
        Method::Bias => {
            let b = fedrec_sim::baseline::BiasModel::fit(&users, args.bias_l2);
            fedrec_shared::eval::evaluate(&b, &users.eval_users(), users.n_items, &users.eval, cfg.threads)
        }
        Method::Popularity => {
            let p = fedrec_sim::baseline::Popularity::fit(&users);
            fedrec_shared::eval::evaluate(&p, &users.eval_users(), users.n_items, &users.eval, cfg.threads)
        }
    };
    println!(
        "{:?}: rmse {:?} recall@20 {:.4} ndcg@10 {:.4} users {} ({:.2}s)",
        args.method,
        m.rmse,
        m.recall_at_20,
        m.ndcg_at_10,
        m.n_eval_users,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run(args: &RunArgs) -> Result<()> {
    let cfg = args.config();
    let users = load(args, &cfg)?;
    eprintln!("config: {}", serde_json::to_string(&cfg)?);
    let res = federation::run(&users, &cfg, |r| {
        if let Some(m) = &r.metrics {
            eprintln!(
                "round {:4}  rmse {:?}  recall@20 {:.4}  ndcg@10 {:.4}  clipped {:.2}",
                r.round + 1,
                m.rmse.map(|x| (x * 10000.0).round() / 10000.0),
                m.recall_at_20,
                m.ndcg_at_10,
                r.clipped_fraction
            );
        }
    })?;
    println!(
        "final: rmse {:?} recall@20 {:.4} ndcg@10 {:.4} users {} train {:.3}s updates {}",
        res.metrics.rmse,
        res.metrics.recall_at_20,
        res.metrics.ndcg_at_10,
        res.metrics.n_eval_users,
        res.train_seconds,
        res.client_updates
    );
    Ok(())
}
