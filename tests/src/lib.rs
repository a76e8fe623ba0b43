//! Helpers for the end-to-end tests in `tests/`: synthetic rating data, the workspace's binaries, a coordinator process or an in-process server on loopback, and devices that reach them.
#![forbid(unsafe_code)]

pub mod coordinator;
pub mod curious;
pub mod postgres;
pub mod relay;
pub mod server;
pub mod store_history;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedrec_client::net::NetConfig;
use fedrec_shared::{ModelShape, Rating, danger};
use rand::Rng;
use rand_distr::{Distribution, Gumbel, Normal};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub use coordinator::{CoordinatorDir, CoordinatorProcess};
pub use server::LoopbackServer;

/// Safety net for every wait on a coordinator: a test that gets this far has failed.
pub const WAIT: Duration = Duration::from_secs(60);

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

/// `rows` of users `u0` … `u{n_users - 1}` (as [`low_rank_ratings`] makes them) grouped by
/// user: entry `u` holds user `u{u}`'s ratings in the order of `rows`.
pub fn ratings_by_user(n_users: usize, rows: Vec<Row>) -> Vec<Vec<Rating>> {
    let mut users: Vec<Vec<Rating>> = vec![Vec::new(); n_users];
    for (user, item, value, _) in rows {
        let u: usize = user[1..].parse().expect("generated user ids are u{n}");
        let i: u32 = item[1..].parse().expect("generated item ids are i{n}");
        users[u].push(Rating { item: i, value });
    }
    users
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

/// Builds the workspace's tests and binaries once per test process and returns cargo's
/// output folder for them (`target/debug`).
///
/// `CARGO_BIN_EXE_*` only exists for the integration tests of the package that owns the
/// binary, so this crate builds the workspace's binaries itself. It asks for exactly what the
/// README's `cargo test --workspace` builds (every package's tests, the `test` profile), so
/// after that command cargo finds everything fresh: built for one package alone (`-p`) or in
/// the `dev` profile, the same crates would resolve other features or other settings and be
/// compiled a second time, which on a fresh machine doubles the build's time and disk. Panics
/// with cargo's output when the build fails.
fn workspace_built() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        cargo_build(&["--workspace", "--tests", "--profile", "test"]);
        target_dir().join("debug")
    })
    .clone()
}

/// The path of `name` in [`workspace_built()`]'s folder, which must exist.
fn built_artifact(name: &str) -> PathBuf {
    let path = workspace_built().join(name);
    assert!(path.is_file(), "cargo built the workspace but {} is missing", path.display());
    path
}

/// Runs `cargo build <args>` in the workspace; panics with cargo's output when the build
/// fails.
///
/// Without the variables cargo sets for a running test (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`, ...): build scripts that read one of them (ring's reads
/// `CARGO_MANIFEST_DIR`) are re-run when its value differs from the outer build's, and
/// everything above them is recompiled.
fn cargo_build(args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_tests = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            );
        if set_for_tests {
            command.env_remove(key);
        }
    }
    let output = command
        .arg("build")
        .args(args)
        .arg("--message-format=short")
        .arg("--target-dir")
        .arg(target_dir())
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("cargo can be started");
    assert!(
        output.status.success(),
        "cargo build {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The `fedrec-sim` binary, built once per test process.
pub fn fedrec_sim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_artifact(&format!("fedrec-sim{}", std::env::consts::EXE_SUFFIX))).clone()
}

/// Runs the `fedrec-sim` binary in `dir` with `args`, with no data folder or backtrace
/// settings from the environment (backtraces would mix source paths into the messages tests
/// look at).
pub fn fedrec_sim(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(fedrec_sim_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("FEDREC_DATA")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("fedrec-sim starts")
}

/// [`fedrec_sim()`], panicking with its standard error when it fails.
pub fn fedrec_sim_ok(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = fedrec_sim(dir, args);
    assert!(
        out.status.success(),
        "fedrec-sim {} failed with {}:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `fedrec-coordinator` binary, built once per test process.
pub fn fedrec_coordinator_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_artifact(&format!("fedrec-coordinator{}", std::env::consts::EXE_SUFFIX))).clone()
}

/// The SDK's static library (`libfedrec_client.a`, `test` profile) that C programs link
/// against, built once per test process. Its header is `client-sdk/include/fedrec.h`.
///
/// Built as a dependency of the tests, the library stays in `deps/` (a static library's
/// name carries no hash there); asking cargo for it as a root (`--lib`) would build the
/// Python module's library too, which `cargo test` does not.
pub fn fedrec_client_staticlib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| built_artifact("deps/libfedrec_client.a")).clone()
}

/// Milliseconds since the Unix epoch, the clock enrollment tokens are issued and checked on.
pub fn unix_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970");
    u64::try_from(since.as_millis()).expect("milliseconds fit in u64")
}

/// The bytes of a hex string (as `enroll` prints tokens); panics on anything else.
pub fn decode_hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "hex has an even length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// Lower-case hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
        s
    })
}

/// How a test device reaches a coordinator on `server` that presents `server_cert` for
/// `localhost`.
pub fn net_config(
    server: SocketAddr,
    server_cert: Vec<u8>,
    token: Vec<u8>,
    shape: ModelShape,
    timeout: Duration,
) -> NetConfig {
    NetConfig {
        server,
        server_name: "localhost".into(),
        server_cert,
        token,
        sdk_version: "test".into(),
        shape,
        timeout,
    }
}

/// The text a Prometheus endpoint serves at `GET /metrics` (with the HTTP head), read within
/// [`WAIT`].
pub async fn scrape_metrics(addr: SocketAddr) -> String {
    let scrape = async {
        let mut http = tokio::net::TcpStream::connect(addr).await.expect("the metrics endpoint accepts");
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("the request is sent");
        let mut text = String::new();
        http.read_to_string(&mut text).await.expect("the metrics are read");
        text
    };
    tokio::time::timeout(WAIT, scrape).await.expect("the metrics endpoint answers in time")
}

/// The value of the Prometheus series `series` (name and labels, as rendered) in `text`.
pub fn series<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines().find_map(|l| Some(l.strip_prefix(series)?.strip_prefix(' ')?.trim()))
}
