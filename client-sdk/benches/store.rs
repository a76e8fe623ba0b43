//! Criterion benchmarks of the sealed store: open and save with 10,000 events and a 1,682 × 32 model.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_main};
use fedrec_client::sdk::{Consent, Sdk, SdkConfig};
use fedrec_client::signals::{Event, EventKind};
use fedrec_client::store::{Contents, Store, decode, encode};
use fedrec_shared::{GlobalModel, ModelShape, RoundModel};

const N_EVENTS: usize = 10_000;
const SHAPE: ModelShape = ModelShape { n_items: 1682, dim: 32, n_segments: 8 };
const KEY: [u8; 32] = [42; 32];

fn model() -> RoundModel {
    let f = |i: usize| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5;
    let factors = (0..SHAPE.n_items * SHAPE.dim).map(f).collect();
    let bias = (0..SHAPE.n_items).map(|i| f(i + 1) * 0.1).collect();
    let centroids = (0..SHAPE.n_segments * SHAPE.dim).map(|i| f(i + 2)).collect();
    let m = GlobalModel::from_flat(SHAPE, factors, bias, 0.0, centroids).expect("a valid model");
    RoundModel::new(1, m)
}

fn contents() -> Contents {
    let kinds = [EventKind::View, EventKind::Click, EventKind::Purchase, EventKind::Rating];
    let events = (0..N_EVENTS)
        .map(|k| Event {
            item: (k * 31 % SHAPE.n_items) as u32,
            kind: kinds[k % kinds.len()],
            value: 1.0,
            timestamp_s: 1_700_000_000 + k as i64,
        })
        .collect();
    Contents {
        consent: Consent { personalization: true, training: true },
        events,
        model: Some(Arc::new(model())),
        ..Contents::default()
    }
}

fn bench_store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut store = Store::new(dir.path(), &KEY, 64 << 20).expect("a store");
    let contents = contents();
    store.save(&contents).expect("save");
    let size = std::fs::metadata(store.path()).expect("the file exists").len();
    eprintln!("store file with {N_EVENTS} events and a {}x{} model: {size} bytes", SHAPE.n_items, SHAPE.dim);

    let mut g = c.benchmark_group("store_10k_events_1682x32");
    g.sample_size(30);
    g.bench_function("encode", |b| b.iter(|| encode(black_box(&contents), 1)));
    let payload = encode(&contents, 1);
    g.bench_function("decode", |b| b.iter(|| decode(black_box(&payload)).expect("decodes")));
    g.bench_function("save (seal + write + fsync + rename + fsync dir, store and counter)", |b| {
        b.iter(|| store.save(black_box(&contents)).expect("save"))
    });
    g.bench_function("load (read + open + decode)", |b| b.iter(|| store.load().expect("load")));
    // The folder's lock goes with the store.
    drop(store);
    g.bench_function("Sdk::open", |b| b.iter(|| Sdk::open(SdkConfig::new(dir.path(), KEY)).expect("open")));
    let sdk = Sdk::open(SdkConfig::new(dir.path(), KEY)).expect("open");
    let mut t = 1_800_000_000i64;
    g.bench_function("Sdk::record (one event, persisted)", |b| {
        b.iter(|| {
            t += 1;
            sdk.record(Event { item: 7, kind: EventKind::Click, value: 1.0, timestamp_s: t }).expect("record")
        })
    });
    g.finish();
}

/// The group lives in a private module: the macro defines a `pub fn`, which needs no docs there.
mod group {
    criterion::criterion_group!(benches, super::bench_store);
}
criterion_main!(group::benches);
