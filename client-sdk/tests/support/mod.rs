//! Helpers shared by the SDK's integration tests: a configuration in a temporary folder, a small deterministic model, events.
#![allow(dead_code)] // Each test crate uses a different subset.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use fedrec_client::error::SdkError;
use fedrec_client::sdk::{Consent, Sdk, SdkConfig};
use fedrec_client::signals::{Event, EventKind};
use fedrec_client::store::STORE_FILE;
use fedrec_shared::{GlobalModel, ModelShape, RoundModel};

pub const KEY: [u8; 32] = [7; 32];
pub const OTHER_KEY: [u8; 32] = [8; 32];
pub const SHAPE: ModelShape = ModelShape { n_items: 20, dim: 4, n_segments: 2 };

pub fn config(dir: &Path) -> SdkConfig {
    SdkConfig::new(dir, KEY)
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// A model with fixed, distinct parameters (no RNG needed).
pub fn model(version: u64, shape: ModelShape) -> RoundModel {
    let f = |i: usize| ((i * 7919) % 101) as f32 / 101.0 - 0.5;
    let factors = (0..shape.n_items * shape.dim).map(f).collect();
    let bias = (0..shape.n_items).map(|i| f(i + 3) * 0.1).collect();
    let centroids = (0..shape.n_segments * shape.dim).map(|i| f(i + 11)).collect();
    let m = GlobalModel::from_flat(shape, factors, bias, 0.0, centroids).expect("a valid model");
    RoundModel::new(version, m)
}

pub fn event(item: u32, kind: EventKind, timestamp_s: i64) -> Event {
    Event { item, kind, value: 1.0, timestamp_s }
}

/// An SDK in `dir` with both consents, a model and a few events.
pub fn populated(dir: &Path) -> Sdk {
    let sdk = Sdk::open(config(dir)).expect("opens");
    sdk.set_consent(Consent { personalization: true, training: true }).expect("consent");
    sdk.install_model(model(3, SHAPE)).expect("model");
    let now = now_s();
    for (k, item) in [1u32, 4, 9, 4, 16].into_iter().enumerate() {
        sdk.record(event(item, EventKind::Click, now - 3600 * k as i64)).expect("record");
    }
    sdk
}

pub fn store_path(dir: &Path) -> PathBuf {
    dir.join(STORE_FILE)
}

pub fn store_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(store_path(dir)).expect("the store file exists")
}

/// The names of the files in `dir`, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("the folder exists")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Safety net for a call that must not block; reaching it fails the test.
pub const NEVER: Duration = Duration::from_secs(30);

/// Opens `cfg` on another thread; the result, or a panic if it blocks.
pub fn open_without_blocking(cfg: SdkConfig) -> Result<Sdk, SdkError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Sdk::open(cfg));
    });
    rx.recv_timeout(NEVER).expect("open blocked")
}
