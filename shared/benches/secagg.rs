//! Criterion benchmark of the SecAgg+ building blocks: one mask over an ML-100K-sized update, the pairwise seed and share-key derivations, and Shamir split/combine of a 32-byte key.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_main};
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::secagg::crypto::{KeyPair, RoundContext, add_mask, mask_seed, share_key};
use fedrec_shared::secagg::shamir::{combine, split};

/// Coordinates of one upload of the ML-100K model (1682 items, d = 32, 8 segments), the size
/// the lead's brief names.
const COORDINATES: usize = 55_771;

fn masks(c: &mut Criterion) {
    let mut group = c.benchmark_group("secagg_mask");
    let mut acc = vec![0u64; COORDINATES];
    let seed = [7u8; 32];
    for bits in [20u32, 32, 40] {
        let word = if bits <= 32 { 4 } else { 8 };
        group.throughput(Throughput::Bytes((COORDINATES * word) as u64));
        group.bench_with_input(BenchmarkId::new("add_mask_55771", bits), &bits, |b, &bits| {
            b.iter(|| add_mask(black_box(&mut acc), black_box(&seed), bits, false).expect("valid width"))
        });
    }
    group.finish();
}

fn keys(c: &mut Criterion) {
    let mut rng = seeded_rng(1);
    let (own, peer) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
    let ctx = RoundContext { round: 1, seed: [3; 32] };
    let mut group = c.benchmark_group("secagg_keys");
    group.bench_function("generate", |b| b.iter(|| KeyPair::generate(&mut rng)));
    group.bench_function("mask_seed", |b| {
        b.iter(|| mask_seed(&own, black_box(&peer.public()), &ctx, 0, 1).expect("valid key"))
    });
    let plaintext = [0u8; 88];
    group.bench_function("share_key_seal_88B", |b| {
        b.iter(|| share_key(&own, black_box(&peer.public()), &ctx, 0, 1).expect("valid key").seal(&plaintext))
    });
    group.finish();
}

fn shamir(c: &mut Criterion) {
    let mut rng = seeded_rng(2);
    let secret = [9u8; 32];
    let mut group = c.benchmark_group("secagg_shamir");
    for (n, t) in [(20usize, 11usize), (100, 51), (500, 251)] {
        let xs: Vec<u32> = (1..=n as u32).collect();
        group.bench_with_input(BenchmarkId::new("split", format!("n{n}_t{t}")), &t, |b, &t| {
            b.iter(|| split(&secret, t, &xs, &mut rng).expect("valid"))
        });
        let shares = split(&secret, t, &xs, &mut rng).expect("valid");
        group.bench_with_input(BenchmarkId::new("combine", format!("t{t}")), &t, |b, &t| {
            b.iter(|| combine(black_box(&shares), t).expect("consistent"))
        });
    }
    group.finish();
}

fn benches() {
    let mut c = Criterion::default().configure_from_args();
    masks(&mut c);
    keys(&mut c);
    shamir(&mut c);
}

criterion_main!(benches);
