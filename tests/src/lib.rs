//! Helpers for the end-to-end tests in `tests/`: synthetic rating data and the `fedrec-sim` binary.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use fedrec_shared::danger;
use rand::Rng;
use rand_distr::{Distribution, Gumbel, Normal};

/// One generated rating: user id, item id, rating, timestamp.
pub type Row = (String, String, f32, i64);

/// Ratings drawn from a known low-rank model, so that a matrix factorization has something
/// to find that a bias-only model cannot.
///
/// Each user and item gets a `rank`-dimensional factor and a bias. A user's true affinity
/// for an item is `3.5 + b_u + b_i + u·v`, with the interaction term scaled to a standard
/// deviation of about 0.8. Each user picks `per_user` distinct items, preferring those with
/// a high affinity (a Gumbel top-k), so which items a user rated is itself informative, as
/// in real logs and as the implicit objective needs. The rating is the affinity plus
/// Gaussian noise of standard deviation `noise`, rounded to two decimals.
///
/// Ids are `u{n}` and `i{n}`; timestamps grow through each user's history. The output is
/// ordered by user, then by timestamp, and only depends on the arguments.
pub fn low_rank_ratings(
    n_users: usize,
    n_items: usize,
    rank: usize,
    per_user: usize,
    noise: f32,
    seed: u64,
) -> Vec<Row> {
    assert!(rank > 0 && per_user <= n_items, "need rank ≥ 1 and per_user ≤ n_items");
    let mut rng = danger::seeded_rng(seed);
    // u·v is a sum of `rank` products of N(0, s²) pairs: variance rank · s⁴ = 0.8².
    let s = (0.64 / rank as f64).powf(0.25);
    let factor = Normal::new(0.0, s).expect("a positive standard deviation");
    let bias = Normal::new(0.0, 0.3).expect("a positive standard deviation");
    let noise = Normal::new(0.0, f64::from(noise.max(0.0))).expect("a non-negative standard deviation");
    let gumbel = Gumbel::new(0.0, 1.0).expect("a positive scale");
    let draw = |n: usize, rng: &mut _| -> Vec<f64> { (0..n).map(|_| factor.sample(rng)).collect() };
    let users: Vec<Vec<f64>> = (0..n_users).map(|_| draw(rank, &mut rng)).collect();
    let items: Vec<Vec<f64>> = (0..n_items).map(|_| draw(rank, &mut rng)).collect();
    let user_bias: Vec<f64> = (0..n_users).map(|_| bias.sample(&mut rng)).collect();
    let item_bias: Vec<f64> = (0..n_items).map(|_| bias.sample(&mut rng)).collect();
    let mut rows = Vec::with_capacity(n_users * per_user);
    for (u, factors) in users.iter().enumerate() {
        let affinity: Vec<f64> = items
            .iter()
            .zip(&item_bias)
            .map(|(v, bi)| 3.5 + user_bias[u] + bi + factors.iter().zip(v).map(|(a, b)| a * b).sum::<f64>())
            .collect();
        // Gumbel top-k: sampling without replacement with weights exp(affinity).
        let mut keyed: Vec<(f64, usize)> =
            affinity.iter().enumerate().map(|(i, a)| (a + gumbel.sample(&mut rng), i)).collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        let start: i64 = 1_000_000_000 + rng.random_range(0..1_000_000);
        for (k, &(_, i)) in keyed.iter().take(per_user).enumerate() {
            let rating = ((affinity[i] + noise.sample(&mut rng)) * 100.0).round() / 100.0;
            rows.push((format!("u{u}"), format!("i{i}"), rating as f32, start + 60 * k as i64));
        }
    }
    rows
}

/// Writes `rows` as `user<TAB>item<TAB>rating<TAB>timestamp` lines, without a header.
pub fn write_tsv(path: &Path, rows: &[Row]) -> std::io::Result<()> {
    let mut out = String::with_capacity(rows.len() * 24);
    for (user, item, rating, timestamp) in rows {
        writeln!(out, "{user}\t{item}\t{rating}\t{timestamp}").expect("writing to a String cannot fail");
    }
    std::fs::write(path, out)
}

/// The workspace's target folder: `$CARGO_TARGET_DIR`, or `target/` at the workspace root.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    }
}

/// Builds `bin` of `package` (debug profile) and returns its path.
///
/// `CARGO_BIN_EXE_*` only exists for the integration tests of the package that owns the
/// binary, so this crate builds the workspace's binaries itself; cargo's own up-to-date check
/// makes repeat calls cheap. Panics with cargo's output when the build fails.
fn build_bin(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = target_dir();
    let output = Command::new(cargo)
        .args(["build", "-p", package, "--bin", bin, "--message-format=short"])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("cargo can be started");
    assert!(output.status.success(), "building {bin} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let path = target.join("debug").join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.is_file(), "cargo built {bin} but {} is missing", path.display());
    path
}

/// The `fedrec-sim` binary, built once per test process.
pub fn fedrec_sim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("fedrec-sim", "fedrec-sim")).clone()
}

/// The `fedrec-coordinator` binary, built once per test process.
pub fn fedrec_coordinator_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("fedrec-coordinator", "fedrec-coordinator")).clone()
}
