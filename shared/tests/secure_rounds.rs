//! Secure aggregation in the round machines (SecAgg+, docs/secagg.md): the unmasked sum is exactly the survivors' under every dropout pattern or the round aborts, secure rounds train like plain ones and compose with noise, devices enforce their own policy and never reveal both shares of one device, and what the coordinator sees of one device is indistinguishable from uniform.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::eval::{self, EvalConfig, ReconstructionScorer};
use fedrec_shared::harness::{Federation, HarnessConfig, RoundReport};
use fedrec_shared::privacy::discrete::Grid;
use fedrec_shared::round::secure::{DeviceSecAgg, RevealedShare, SecurePolicy, SecureRefusal, ServerSecAgg};
use fedrec_shared::round::{
    AbandonReason, AdaptiveClip, ClientId, ClientMessage, ClientOutcome, ClientRound, Coordinator,
    CoordinatorConfig, CoordinatorEvent, EncryptedShare, Instant, NeighbourKeys, RoundStats, SecAggSetup,
    SecureAggregation, Selection, ServerMessage, ShareKeysRequest, UnmaskRequest,
};
use fedrec_shared::secagg::crypto::KeyPair;
use fedrec_shared::secagg::encode::{bits_for, to_ring};
use fedrec_shared::secagg::graph::Graph;
use fedrec_shared::secagg::params::{FinderInput, find_params};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::stats::{chi2_sf, chi2_two_sample, histogram};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha12Rng, ChaCha20Rng};

const EXPLICIT: TrainParams = TrainParams {
    objective: Objective::Explicit,
    l2_user: 0.5,
    l2_user_bias: 0.1,
    l2_item: 0.01,
    l2_item_bias: 0.01,
    user_support_exponent: 0.0,
};

/// A device policy that accepts tiny cohorts and assumes no collusion: the module-level tests
/// exercise the protocol, not the policy.
const PERMISSIVE: SecurePolicy = SecurePolicy { min_cohort: 1, corrupt: 0.0, log2_security: -40.0 };

// ---------------------------------------------------------------------------------------------
// Module level: DeviceSecAgg and ServerSecAgg driven by hand.
// ---------------------------------------------------------------------------------------------

/// Where a device stops in a module-level round: before its keys (0), its shares (1), its
/// masked input (2), its unmask shares (3); [`NEVER`] means it answers everything.
const NEVER: u8 = 4;

/// Where a module-level round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// `close_keys` refused (no parameters for the cohort).
    Keys,
    /// `close_shares` refused (fewer than `t` devices shared).
    Shares,
    /// `close_masked` refused (fewer than `t` masked inputs).
    Masked,
    /// `finish` refused (a needed secret had fewer than `t` shares).
    Finish,
    /// `finish` returned this sum of this many updates.
    Sum(Vec<i64>, usize),
}

/// What a module-level round did.
#[derive(Debug)]
struct ModuleRun {
    stage: Stage,
    /// Devices (by number) whose masked input is in the sum.
    u3: BTreeSet<usize>,
    /// Devices that shared but sent no masked input (their pairwise masks must be rebuilt).
    u2_not_u3: BTreeSet<usize>,
}

/// Runs a module-level round of `encoded.len()` devices (client id = device number) through
/// every phase, device `d` stopping at `drop_at[d]`, and checks at each step that the machines
/// do what the protocol says they must: each close fails exactly when too few devices are
/// left, a device refuses its masked input exactly when too few neighbours shared, and
/// `finish` succeeds exactly when every needed secret has `t` shares, with the exact sum of the
/// masked inputs' encodings.
#[allow(clippy::too_many_arguments)]
fn run_module_round(
    round: u64,
    encoded: &[Vec<i64>],
    grid: Grid,
    clip_bit: bool,
    layout_len: usize,
    (dropout, corrupt): (f64, f64),
    drop_at: &[u8],
    rng: &mut ChaCha12Rng,
) -> ModuleRun {
    let n = encoded.len();
    let mut devices: Vec<DeviceSecAgg> = Vec::with_capacity(n);
    let mut server = ServerSecAgg::new(round, layout_len, grid, clip_bit, dropout, corrupt);
    for (d, x) in encoded.iter().enumerate() {
        let (device, c, s) = DeviceSecAgg::new(round, x.clone(), grid, clip_bit, PERMISSIVE, rng);
        devices.push(device);
        if drop_at[d] > 0 {
            server.add_keys(d as ClientId, c, s).expect("keys of a selected device");
        }
    }
    let mut run = ModuleRun { stage: Stage::Keys, u3: BTreeSet::new(), u2_not_u3: BTreeSet::new() };
    let u1: Vec<usize> = (0..n).filter(|&d| drop_at[d] > 0).collect();
    let feasible = find_params(&FinderInput::new(u1.len(), dropout, corrupt)).is_ok();
    let requests = match server.close_keys(rng) {
        Ok(r) => r,
        Err(e) => {
            assert!(!feasible, "close_keys refused a cohort of {} the finder accepts: {e}", u1.len());
            return run;
        }
    };
    assert!(feasible, "close_keys accepted a cohort of {} the finder refuses", u1.len());
    assert_eq!(requests.len(), u1.len());
    let setup = requests[0].1.setup;
    let t = setup.t as usize;
    // The graph as the requests state it, by index, and index ↔ device.
    let mut device_of = vec![0usize; u1.len()];
    let mut nbrs: Vec<Vec<u32>> = vec![Vec::new(); u1.len()];
    for (client, req) in &requests {
        assert_eq!(req.setup, setup, "every device gets the same parameters");
        device_of[req.index as usize] = *client as usize;
        nbrs[req.index as usize] = req.neighbours.iter().map(|nb| nb.index).collect();
    }
    let index_of: BTreeMap<usize, u32> = device_of.iter().enumerate().map(|(i, &d)| (d, i as u32)).collect();

    // Phase 1: shares.
    let mut u2: BTreeSet<u32> = BTreeSet::new();
    for (client, req) in requests {
        let d = client as usize;
        if drop_at[d] <= 1 {
            continue;
        }
        let index = req.index;
        let shares = devices[d].share_keys(req, rng).expect("an honest request under a permissive policy");
        server.add_shares(client, shares).expect("an honest device's shares");
        u2.insert(index);
    }
    let mask_requests = match server.close_shares() {
        Ok(r) => r,
        Err(e) => {
            assert!(u2.len() < t, "close_shares refused {} senders at t = {t}: {e}", u2.len());
            run.stage = Stage::Shares;
            return run;
        }
    };
    assert!(u2.len() >= t, "close_shares went on with {} senders at t = {t}", u2.len());

    // Phase 2: masked inputs.
    let mut u3: BTreeSet<u32> = BTreeSet::new();
    for (client, req) in mask_requests {
        let d = client as usize;
        let i = index_of[&d];
        let shared_neighbours = nbrs[i as usize].iter().filter(|j| u2.contains(j)).count();
        let senders: BTreeSet<u32> = req.shares.iter().map(|s| s.peer).collect();
        let want: BTreeSet<u32> = nbrs[i as usize].iter().copied().filter(|j| u2.contains(j)).collect();
        assert_eq!(senders, want, "device {i} gets the pairs of exactly its neighbours that shared");
        match devices[d].masked_input(req) {
            Ok(words) => {
                assert!(
                    shared_neighbours + 1 >= t,
                    "device {i} masked with {shared_neighbours} sharers, t = {t}"
                );
                if drop_at[d] > 2 {
                    server.add_masked(client, &words).expect("an honest masked input");
                    u3.insert(i);
                }
            }
            Err(e) => {
                assert!(
                    shared_neighbours + 1 < t,
                    "device {i} refused with {shared_neighbours} sharers: {e}"
                );
            }
        }
    }
    run.u3 = u3.iter().map(|&i| device_of[i as usize]).collect();
    run.u2_not_u3 = u2.difference(&u3).map(|&i| device_of[i as usize]).collect();
    let unmask_requests = match server.close_masked() {
        Ok(r) => r,
        Err(e) => {
            assert!(u3.len() < t, "close_masked refused {} masked inputs at t = {t}: {e}", u3.len());
            run.stage = Stage::Masked;
            return run;
        }
    };
    assert!(u3.len() >= t, "close_masked went on with {} masked inputs at t = {t}", u3.len());

    // Phase 3: unmasking.
    let mut u4: BTreeSet<u32> = BTreeSet::new();
    for (client, req) in unmask_requests {
        let d = client as usize;
        let i = index_of[&d];
        let want_dropped: Vec<u32> =
            nbrs[i as usize].iter().copied().filter(|j| u2.contains(j) && !u3.contains(j)).collect();
        let want_survivors: Vec<u32> = nbrs[i as usize].iter().copied().filter(|j| u3.contains(j)).collect();
        assert_eq!(sorted(&req.dropped), want_dropped, "device {i}: dropped = N(i) ∩ (U2 \\ U3)");
        assert_eq!(sorted(&req.survivors), want_survivors, "device {i}: survivors = N(i) ∩ U3");
        if drop_at[d] <= 3 {
            continue;
        }
        match devices[d].unmask(&req) {
            Ok(answer) => {
                server.add_unmask(client, answer).expect("an honest unmask answer");
                u4.insert(i);
            }
            // The one refusal an honest request may meet: too few surviving neighbours.
            Err(e) => assert!(want_survivors.len() + 1 < t, "device {i} refused an honest request: {e}"),
        }
    }
    // Which secrets can be rebuilt: b_j of every j in U3 from its neighbours in U4 and itself,
    // s_j of every j in U2 \ U3 from its neighbours in U4.
    let holders = |j: u32| nbrs[j as usize].iter().filter(|k| u4.contains(k)).count();
    let rebuildable = u3.iter().all(|&j| holders(j) + usize::from(u4.contains(&j)) >= t)
        && u2.difference(&u3).all(|&j| holders(j) >= t);
    match server.finish() {
        Ok((sum, count)) => {
            assert!(rebuildable, "finish unmasked although a secret had fewer than t = {t} shares");
            run.stage = Stage::Sum(sum, count);
        }
        Err(e) => {
            assert!(!rebuildable, "finish refused although every secret had t = {t} shares: {e}");
            run.stage = Stage::Finish;
        }
    }
    run
}

fn sorted(v: &[u32]) -> Vec<u32> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

/// The coordinate-wise sum of the encodings of `devices`.
fn sum_of(encoded: &[Vec<i64>], devices: &BTreeSet<usize>) -> Vec<i64> {
    let mut sum = vec![0i64; encoded[0].len()];
    for &d in devices {
        for (s, &x) in sum.iter_mut().zip(&encoded[d]) {
            *s += x;
        }
    }
    sum
}

/// Encodings as the device produces them: `len` coordinates in `[−G, G]` (uniform, or all at
/// `±G` when `extreme`, which puts the sum at the edge of the ring), then the clip bit.
fn random_encodings(
    n: usize,
    len: usize,
    grid: &Grid,
    clip_bit: bool,
    extreme: bool,
    rng: &mut ChaCha12Rng,
) -> Vec<Vec<i64>> {
    let g = grid.steps_per_clip() as i64;
    (0..n)
        .map(|_| {
            let sign = if rng.random_bool(0.5) { 1 } else { -1 };
            let mut x: Vec<i64> =
                (0..len).map(|_| if extreme { sign * g } else { rng.random_range(-g..=g) }).collect();
            if clip_bit {
                x.push(i64::from(extreme || rng.random_bool(0.5)));
            }
            x
        })
        .collect()
}

/// Drop points: with probability `rate` a device stops before a uniformly drawn message.
fn random_drops(n: usize, rate: f64, rng: &mut ChaCha12Rng) -> Vec<u8> {
    (0..n).map(|_| if rng.random_bool(rate) { rng.random_range(0..NEVER) } else { NEVER }).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever drops out when, a secure round either returns exactly the sum of the encodings
    /// of the devices whose masked input it took, or aborts (and it aborts exactly when the
    /// protocol says it must).
    #[test]
    fn the_unmasked_sum_is_exact_or_the_round_aborts(
        n in 3usize..=12,
        len in 1usize..=12,
        clip_bit in any::<bool>(),
        extreme in any::<bool>(),
        refined in any::<bool>(),
        dropout in prop::sample::select(vec![0.0, 0.1, 0.25, 0.4]),
        corrupt in prop::sample::select(vec![0.0, 0.1]),
        rate in prop::sample::select(vec![0.0, 0.1, 0.25, 0.5, 0.8]),
        seed in any::<u64>(),
    ) {
        let mut rng = seeded_rng(seed);
        // The secure rounds' grid, or the plain one (coarser: a narrower ring).
        let grid = if refined { Grid::for_secure_sum(1.0, len) } else { Grid::for_sum(1.0, len) };
        let grid = grid.expect("a valid grid");
        let encoded = random_encodings(n, len, &grid, clip_bit, extreme, &mut rng);
        let drop_at = random_drops(n, rate, &mut rng);
        let run = run_module_round(seed, &encoded, grid, clip_bit, len, (dropout, corrupt), &drop_at, &mut rng);
        if let Stage::Sum(sum, count) = &run.stage {
            prop_assert_eq!(*count, run.u3.len());
            prop_assert_eq!(sum, &sum_of(&encoded, &run.u3));
        }
    }
}

/// The property above is not vacuous: over fixed seeds the rounds end at every point the
/// protocol can end, including a successful unmasking after devices dropped between sharing
/// and masking (their pairwise masks rebuilt from s-shares) and a failed reconstruction
/// after every masked input arrived.
#[test]
fn dropout_patterns_reach_every_ending() {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for seed in 0..300u64 {
        let mut rng = seeded_rng(1000 + seed);
        let n = rng.random_range(3..=12usize);
        let len = rng.random_range(1..=6usize);
        let grid = Grid::for_sum(1.0, len).expect("a valid grid");
        let encoded = random_encodings(n, len, &grid, true, false, &mut rng);
        let rate = [0.0, 0.15, 0.4, 0.8][(seed % 4) as usize];
        let drop_at = random_drops(n, rate, &mut rng);
        let run = run_module_round(seed, &encoded, grid, true, len, (0.25, 0.0), &drop_at, &mut rng);
        let label = match &run.stage {
            Stage::Keys => "keys",
            Stage::Shares => "shares",
            Stage::Masked => "masked",
            Stage::Finish => "finish",
            Stage::Sum(sum, count) => {
                assert_eq!(*count, run.u3.len());
                assert_eq!(sum, &sum_of(&encoded, &run.u3), "seed {seed}");
                if run.u2_not_u3.is_empty() { "sum" } else { "sum after rebuilding pairwise masks" }
            }
        };
        *counts.entry(label).or_default() += 1;
    }
    for label in ["keys", "shares", "masked", "finish", "sum", "sum after rebuilding pairwise masks"] {
        assert!(counts.get(label).copied().unwrap_or(0) > 0, "no round ended with {label}: {counts:?}");
    }
}

/// A module-level round in which every device answers, except that `silent` devices stop
/// after sharing (before their masked input). Client id = device number = cohort index.
struct Honest {
    devices: Vec<DeviceSecAgg>,
    server: ServerSecAgg,
    setup: SecAggSetup,
    keys: Vec<([u8; 32], [u8; 32])>,
    share_requests: Vec<ShareKeysRequest>,
    sent_shares: Vec<Vec<EncryptedShare>>,
    masked: Vec<Option<Vec<u64>>>,
    unmask_requests: BTreeMap<usize, UnmaskRequest>,
}

fn honest_round(
    round: u64,
    encoded: &[Vec<i64>],
    grid: Grid,
    clip_bit: bool,
    corrupt: f64,
    silent: &[usize],
    rng: &mut ChaCha12Rng,
) -> Honest {
    let layout_len = encoded[0].len() - usize::from(clip_bit);
    let mut server = ServerSecAgg::new(round, layout_len, grid, clip_bit, 0.0, corrupt);
    let mut devices = Vec::new();
    let mut keys = Vec::new();
    for (d, x) in encoded.iter().enumerate() {
        let (device, c, s) = DeviceSecAgg::new(round, x.clone(), grid, clip_bit, PERMISSIVE, rng);
        server.add_keys(d as ClientId, c, s).expect("fresh keys");
        devices.push(device);
        keys.push((c, s));
    }
    let requests = server.close_keys(rng).expect("parameters for the cohort");
    let setup = requests[0].1.setup;
    let mut share_requests = Vec::new();
    let mut sent_shares = Vec::new();
    for (client, req) in requests {
        assert_eq!(req.index as usize, client as usize, "indices follow client ids");
        let shares = devices[client as usize].share_keys(req.clone(), rng).expect("an honest request");
        server.add_shares(client, shares.clone()).expect("honest shares");
        share_requests.push(req);
        sent_shares.push(shares);
    }
    let mut masked = vec![None; encoded.len()];
    for (client, req) in server.close_shares().expect("everyone shared") {
        let words = devices[client as usize].masked_input(req).expect("an honest request");
        if !silent.contains(&(client as usize)) {
            server.add_masked(client, &words).expect("an honest masked input");
            masked[client as usize] = Some(words);
        }
    }
    let unmask_requests = server
        .close_masked()
        .expect("enough masked inputs")
        .into_iter()
        .map(|(c, r)| (c as usize, r))
        .collect();
    Honest { devices, server, setup, keys, share_requests, sent_shares, masked, unmask_requests }
}

/// A device answers one unmask request and refuses everything after; it refuses lists that
/// overlap, that leave out or add a device it holds shares of, or that name itself; and the
/// coordinator never receives both shares of one device.
#[test]
fn a_device_never_reveals_both_shares_of_one_device() {
    let mut rng = seeded_rng(500);
    let (len, n) = (6, 12);
    let silent = n - 1;
    let grid = Grid::for_sum(1.0, len).expect("a valid grid");
    let encoded = random_encodings(n, len, &grid, false, false, &mut rng);
    // The last device shares but sends no masked input: its neighbours are asked for its
    // s-share, the others only for b-shares.
    let mut h = honest_round(3, &encoded, grid, false, 0.0, &[silent], &mut rng);
    let req = |h: &Honest, d: usize| h.unmask_requests[&d].clone();
    let near: Vec<usize> = h.share_requests[silent].neighbours.iter().map(|nb| nb.index as usize).collect();
    let far: Vec<usize> = (0..silent).filter(|d| !near.contains(d)).collect();
    assert!(near.len() >= 2 && far.len() >= 5, "k = {}", h.setup.k);

    // A neighbour of the silent device answers once. The same request again, or the lists
    // swapped (which would give the b-share of the dropped device and the s-shares of the
    // survivors), are refused.
    let a = near[0];
    let first = req(&h, a);
    assert_eq!(first.dropped, vec![silent as u32]);
    let answer = h.devices[a].unmask(&first).expect("an honest request");
    assert_eq!(owners(&answer.mask_key_shares), first.dropped);
    let mut want_b = first.survivors.clone();
    want_b.push(a as u32);
    assert_eq!(
        sorted(&owners(&answer.self_mask_shares)),
        sorted(&want_b),
        "own b-share included, never own s"
    );
    assert!(matches!(h.devices[a].unmask(&first), Err(SecureRefusal::Protocol(_))));
    let swapped =
        UnmaskRequest { round: 3, dropped: first.survivors.clone(), survivors: first.dropped.clone() };
    assert!(matches!(h.devices[a].unmask(&swapped), Err(SecureRefusal::Protocol(_))));
    h.server.add_unmask(a as ClientId, answer).expect("an honest answer");

    // Bad lists, each to a device that has not answered yet (one refusal ends its round).
    let mut bad: Vec<(usize, &str, UnmaskRequest)> = Vec::new();
    let mut r = req(&h, near[1]);
    r.dropped.clear();
    bad.push((near[1], "the dropped neighbour left out", r));
    let mut r = req(&h, far[0]);
    r.dropped.push(r.survivors[0]);
    bad.push((far[0], "overlapping lists", r));
    let mut r = req(&h, far[1]);
    r.survivors.pop();
    bad.push((far[1], "a surviving neighbour left out", r));
    let mut r = req(&h, far[2]);
    r.survivors.push(far[2] as u32);
    bad.push((far[2], "itself listed as a survivor", r));
    let mut r = req(&h, far[3]);
    r.dropped.push(far[3] as u32);
    bad.push((far[3], "itself listed as dropped", r));
    let mut r = req(&h, far[4]);
    r.survivors.push(r.survivors[0]);
    bad.push((far[4], "a survivor listed twice", r));
    let stranger =
        (0..silent as u32).find(|j| !h.share_requests[far[4]].neighbours.iter().any(|nb| nb.index == *j));
    if let (Some(j), Some(&d)) = (stranger.filter(|&j| j as usize != far[4]), far.get(5)) {
        let mut r = req(&h, d);
        r.dropped.push(j);
        bad.push((d, "a device it holds no share of", r));
    }
    for (d, what, r) in &bad {
        assert!(
            matches!(h.devices[*d].unmask(r), Err(SecureRefusal::Protocol(_))),
            "device {d} answered a request with {what}: {r:?}"
        );
        // Refused once, it refuses the honest request too: it is out of the round.
        let honest = req(&h, *d);
        assert!(h.devices[*d].unmask(&honest).is_err(), "device {d} answered after refusing");
    }

    // A fresh honest round to the end: across all answers, no owner's s-share and b-share
    // both reach the coordinator, and the sum is exactly that of the devices that masked.
    let mut h = honest_round(4, &encoded, grid, false, 0.0, &[silent], &mut rng);
    let mut s_owners = BTreeSet::new();
    let mut b_owners = BTreeSet::new();
    for d in 0..silent {
        let honest = req(&h, d);
        let answer = h.devices[d].unmask(&honest).expect("an honest request");
        s_owners.extend(owners(&answer.mask_key_shares));
        b_owners.extend(owners(&answer.self_mask_shares));
        h.server.add_unmask(d as ClientId, answer).expect("an honest answer");
    }
    assert_eq!(s_owners, BTreeSet::from([silent as u32]));
    assert_eq!(b_owners, (0..silent as u32).collect::<BTreeSet<u32>>());
    let (sum, count) = h.server.finish().expect("every secret has its shares");
    assert_eq!(count, silent);
    assert_eq!(sum, sum_of(&encoded, &(0..silent).collect()));
}

fn owners(v: &[RevealedShare]) -> Vec<u32> {
    v.iter().map(|s| s.owner).collect()
}

/// docs/secagg.md §8 and the protocol note: a device refuses an unmask request whose survivor
/// list leaves fewer than `t − 1` of its neighbours (`|survivors| + 1 < t`): it would help
/// unmask a sum of too few inputs.
#[test]
fn a_device_refuses_to_unmask_below_the_threshold() {
    let mut rng = seeded_rng(510);
    let (len, n) = (4, 6);
    let grid = Grid::for_sum(1.0, len).expect("a valid grid");
    let encoded = random_encodings(n, len, &grid, false, false, &mut rng);
    // A corrupt fraction of 1/3 makes the finder pick t ≥ 3 for six devices.
    let mut h = honest_round(5, &encoded, grid, false, 0.34, &[], &mut rng);
    let t = h.setup.t as usize;
    assert!(t >= 3, "the premise needs t ≥ 3, got {t}");
    // The lists still cover exactly the neighbours that shared, and are disjoint, but name one
    // survivor: |survivors| + 1 = 2 < t.
    let honest = h.unmask_requests[&0].clone();
    let mut all = honest.survivors.clone();
    all.extend(&honest.dropped);
    all.sort_unstable();
    let crafted = UnmaskRequest { round: 5, survivors: vec![all[0]], dropped: all[1..].to_vec() };
    let got = h.devices[0].unmask(&crafted);
    assert!(matches!(got, Err(SecureRefusal::Protocol(_))), "answered {got:?}");
}

/// Random public keys for `n` devices (only their public halves matter to a neighbour).
fn random_publics(n: usize, rng: &mut ChaCha12Rng) -> Vec<([u8; 32], [u8; 32])> {
    (0..n).map(|_| (KeyPair::generate(rng).public(), KeyPair::generate(rng).public())).collect()
}

fn neighbour_keys(list: &[u32], publics: &[([u8; 32], [u8; 32])]) -> Vec<NeighbourKeys> {
    list.iter()
        .map(|&j| NeighbourKeys {
            index: j,
            cipher_public: publics[j as usize].0,
            mask_public: publics[j as usize].1,
        })
        .collect()
}

/// A device (index 0 of a hand-built round) checks its neighbour list against the graph the
/// public seed defines: a list from another seed, with a stranger swapped in, with one missing,
/// repeated, or with itself in it, is refused at share-keys.
#[test]
fn share_keys_refuses_neighbours_other_than_the_seeds_graph() {
    let mut rng = seeded_rng(520);
    let len = 5;
    let grid = Grid::for_sum(1.0, len).expect("a valid grid");
    let (n, k, t) = (12usize, 4usize, 3u32);
    let bits = bits_for(n, &grid, false).expect("a ring");
    let seed: [u8; 32] = rng.random();
    let setup = SecAggSetup { seed, n: n as u32, k: k as u32, t, bits };
    let graph = Graph::harary(n, k, &seed).expect("a Harary graph");
    let publics = random_publics(n, &mut rng);
    let own: Vec<u32> = graph.neighbours(0).to_vec();
    let stranger = (1..n as u32).find(|j| !own.contains(j)).expect("k < n − 1 leaves strangers");
    let other_seed_list = (0u8..=255)
        .map(|b| Graph::harary(n, k, &[b; 32]).expect("a graph").neighbours(0).to_vec())
        .find(|l| *l != own)
        .expect("another seed gives another neighbourhood");

    let encoded = vec![1i64; len];
    let mut try_list = |list: Vec<u32>| {
        let (mut device, _, _) = DeviceSecAgg::new(9, encoded.clone(), grid, false, PERMISSIVE, &mut rng);
        let req = ShareKeysRequest { round: 9, setup, index: 0, neighbours: neighbour_keys(&list, &publics) };
        device.share_keys(req, &mut rng)
    };
    let shares = try_list(own.clone()).expect("the graph's own list");
    assert_eq!(shares.iter().map(|s| s.peer).collect::<Vec<u32>>(), own);

    let mut swapped = own.clone();
    swapped[0] = stranger;
    swapped.sort_unstable();
    let mut missing = own.clone();
    missing.pop();
    let mut repeated = own.clone();
    repeated[1] = repeated[0];
    let mut with_self = own.clone();
    with_self[0] = 0;
    with_self.sort_unstable();
    let cases = [
        ("another seed's graph", other_seed_list),
        ("a stranger swapped in", swapped),
        ("a neighbour missing", missing),
        ("a neighbour repeated", repeated),
        ("itself in the list", with_self),
    ];
    for (what, list) in cases {
        let got = try_list(list.clone());
        assert!(matches!(got, Err(SecureRefusal::Protocol(_))), "{what} ({list:?}) gave {got:?}");
    }
}

/// A device refuses parameters below its policy: a cohort below its minimum, a threshold of
/// 1, a threshold that a colluding fraction of the cohort could reach among its neighbours,
/// and a ring too narrow for the cohort's sum; the finder's parameters for its own policy
/// pass.
#[test]
fn share_keys_refuses_parameters_below_the_device_policy() {
    let mut rng = seeded_rng(530);
    let len = 5;
    let grid = Grid::for_sum(1.0, len).expect("a valid grid");
    let policy = SecurePolicy::default();
    assert!(policy.corrupt > 0.0 && policy.min_cohort > 5);
    let n = 200usize;
    let publics = random_publics(n, &mut rng);
    let bits = bits_for(n, &grid, false).expect("a ring");
    let good = find_params(&FinderInput::new(n, 0.0, policy.corrupt)).expect("parameters");
    assert!(good.t >= 3, "{good:?}");
    let seed: [u8; 32] = rng.random();
    let encoded = vec![0i64; len];
    let mut ask = |n: usize, k: usize, t: usize, bits: u32| {
        let graph = Graph::harary(n, k, &seed).expect("a graph");
        let setup = SecAggSetup { seed, n: n as u32, k: k as u32, t: t as u32, bits };
        let neighbours = neighbour_keys(graph.neighbours(0), &publics);
        let (mut device, _, _) = DeviceSecAgg::new(2, encoded.clone(), grid, false, policy, &mut rng);
        device.share_keys(ShareKeysRequest { round: 2, setup, index: 0, neighbours }, &mut rng)
    };
    assert!(ask(n, good.k, good.t, bits).is_ok(), "the finder's parameters for the policy: {good:?}");

    let weak = |r: Result<Vec<EncryptedShare>, SecureRefusal>| {
        matches!(r, Err(SecureRefusal::WeakParameters { .. }))
    };
    // With γ = 5% of 200 devices colluding, a threshold one below the finder's gives them t
    // shares of some honest device with more than 2^-41 probability.
    let r = ask(n, good.k, good.t - 1, bits);
    assert!(weak(r.clone()), "t − 1: {r:?}");
    // The complete graph with t = 2: ten colluders hold two shares of everyone.
    let r = ask(n, n - 1, 2, bits);
    assert!(weak(r.clone()), "complete graph, t = 2: {r:?}");
    let r = ask(n, good.k, 1, bits);
    assert!(weak(r.clone()), "t = 1: {r:?}");
    let r = ask(n, good.k, good.t, bits - 1);
    assert!(weak(r.clone()), "a ring one bit too narrow: {r:?}");
    // A cohort below the minimum, whatever the parameters.
    let small = policy.min_cohort as usize - 1;
    let r = ask(small, small - 1, small - 1, bits_for(small, &grid, false).expect("a ring"));
    assert_eq!(r, Err(SecureRefusal::CohortTooSmall { n: small as u32, min: policy.min_cohort }));
}

// ---------------------------------------------------------------------------------------------
// What the coordinator sees of one device.
// ---------------------------------------------------------------------------------------------

/// Whether `needle` occurs as a contiguous run in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The coordinator's view of one device is uniform whatever its update: over many rounds with
/// fresh keys, the masked words of an all-zero update and of one at the clip norm (with
/// opposite clip bits) pass a two-sample chi-square test on their low and high 4 bits, while
/// the same test on the unmasked encodings tells them apart at once. No message the device
/// sends contains its encoding in the clear.
#[test]
fn masked_inputs_do_not_reveal_the_update() {
    assert!((chi2_sf(30.578, 15.0) - 0.01).abs() < 2e-4, "χ² tail self-check");
    assert!((chi2_sf(7.261, 15.0) - 0.95).abs() < 2e-3, "χ² tail self-check");
    let mut rng = seeded_rng(600);
    let (len, n, rounds) = (32usize, 5usize, 150u64);
    let grid = Grid::for_sum(1.0, len).expect("a valid grid");
    let g = grid.steps_per_clip() as i64;
    // All zeros and within the bound, against a vector of L2 norm ≈ G (the clip norm), clipped.
    let zeros = vec![0i64; len + 1];
    let per = ((g * g) as f64 / len as f64).sqrt().floor() as i64;
    let mut at_clip: Vec<i64> = (0..len).map(|i| if i % 3 == 0 { -per } else { per }).collect();
    assert!(at_clip.iter().map(|x| x * x).sum::<i64>() <= g * g);
    at_clip.push(1);
    let others = random_encodings(n - 1, len, &grid, true, false, &mut rng);
    let bits = bits_for(n, &grid, true).expect("a ring");

    let mut masked: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut clip_coordinate_in_clear = 0;
    for round in 0..rounds {
        for (which, target) in [&zeros, &at_clip].into_iter().enumerate() {
            let mut encoded = vec![target.clone()];
            encoded.extend(others.iter().cloned());
            let mut h = honest_round(round, &encoded, grid, true, 0.0, &[], &mut rng);
            assert_eq!(h.setup.bits, bits);
            let words = h.masked[0].clone().expect("device 0 masked");
            let clear = to_ring(target, bits).expect("in the ring");
            // Nothing in the clear: no four consecutive coordinates of the encoding appear in
            // the masked words, and the clip bit's coordinate is masked like the others.
            let as_u16 = |w: &[u64]| w.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect::<Vec<u8>>();
            let masked_bytes = as_u16(&words);
            for window in clear.windows(4) {
                assert!(!contains(&masked_bytes, &as_u16(window)), "round {round}: {window:?} in the clear");
            }
            clip_coordinate_in_clear += usize::from(words[len] == clear[len]);
            // The other three messages: keys, sealed shares, revealed shares.
            let answer = h.devices[0].unmask(&h.unmask_requests[&0]).expect("an honest request");
            let mut sent: Vec<Vec<u8>> = vec![h.keys[0].0.to_vec(), h.keys[0].1.to_vec()];
            sent.extend(h.sent_shares[0].iter().map(|s| s.ciphertext.clone()));
            sent.extend(
                answer.self_mask_shares.iter().chain(&answer.mask_key_shares).map(|s| s.share.to_vec()),
            );
            let forms: [Vec<u8>; 3] = [
                target.iter().take(4).flat_map(|&x| x.to_le_bytes()).collect(),
                clear.iter().take(4).flat_map(|&x| (x as u32).to_le_bytes()).collect(),
                as_u16(&clear[..4]),
            ];
            for (m, form) in sent.iter().flat_map(|m| forms.iter().map(move |f| (m, f))) {
                assert!(!contains(m, form), "round {round}: a message holds the encoding");
            }
            h.server.add_unmask(0, answer).expect("an honest answer");
            for d in 1..n {
                let a = h.devices[d].unmask(&h.unmask_requests[&d]).expect("an honest request");
                h.server.add_unmask(d as ClientId, a).expect("an honest answer");
            }
            let (sum, _) = h.server.finish().expect("everyone answered");
            assert_eq!(sum, sum_of(&encoded, &(0..n).collect()), "round {round}");
            masked[which].extend(words);
        }
    }
    // A masked coordinate equals the clear one with probability 2^-bits.
    assert!(clip_coordinate_in_clear <= 3, "the clip bit was in the clear {clip_coordinate_in_clear} times");

    let clear_words = |x: &Vec<i64>| -> Vec<u64> {
        (0..rounds).flat_map(|_| to_ring(x, bits).expect("in the ring")).collect()
    };
    let (clear_zero, clear_clip) = (clear_words(&zeros), clear_words(&at_clip));
    for (what, shift) in [("low", 0), ("high", bits - 4)] {
        let p_masked = chi2_two_sample(&histogram(&masked[0], shift, 4), &histogram(&masked[1], shift, 4));
        let p_clear = chi2_two_sample(&histogram(&clear_zero, shift, 4), &histogram(&clear_clip, shift, 4));
        println!("{what} 4 bits: p = {p_masked:.4} masked, {p_clear:.3e} in the clear");
        assert!(p_masked > 1e-4, "{what} bits: masked inputs distinguishable, p = {p_masked}");
        assert!(p_clear < 1e-9, "{what} bits: the test has no power, p = {p_clear}");
    }
}

// ---------------------------------------------------------------------------------------------
// Round level: the coordinator and client machines.
// ---------------------------------------------------------------------------------------------

const SHAPE: ModelShape = ModelShape { n_items: 40, dim: 4, n_segments: 3 };
const PHASE_WINDOW: Duration = Duration::from_secs(30);

fn init_model(seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.1, global_mean: 3.0, centroid_scale: 1e-3 };
    GlobalModel::init(SHAPE, init, &mut seeded_rng(seed)).expect("valid shape")
}

fn secure(dropout: f64) -> Option<SecureAggregation> {
    Some(SecureAggregation { dropout, corrupt: 0.05, phase_window: PHASE_WINDOW, distributed: None })
}

fn config(selection: Selection, secure: Option<SecureAggregation>) -> CoordinatorConfig {
    CoordinatorConfig {
        train: EXPLICIT,
        optimizer: ServerOptimizer::Sgd { lr: 1.0, momentum: 0.0 },
        selection,
        min_reports: 5,
        population: Some(60),
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 10.0,
        noise_multiplier: 0.0,
        adaptive_clip: None,
        privacy: None,
        secure,
        centroids: CentroidPolicy::with_min_count(0.5),
    }
}

fn federation<'a>(
    cfg: CoordinatorConfig,
    devices: &'a [Vec<Rating>],
    dropout: f64,
    seed: u64,
) -> Federation<'a, ChaCha12Rng> {
    let coordinator = Coordinator::new(cfg, init_model(seed), seeded_rng(seed + 1)).expect("valid config");
    let harness = HarnessConfig { dropout, n_threads: 2, latency: Duration::from_millis(20) };
    Federation::new(coordinator, devices, harness, seeded_rng(seed + 2))
}

fn committed(report: &RoundReport) -> &RoundStats {
    match &report.event {
        Some(CoordinatorEvent::RoundCommitted { stats, .. }) => stats,
        other => panic!("the round did not commit: {other:?} ({report:?})"),
    }
}

/// The trainable part (item factors, biases, global mean) and the centroids.
fn params(m: &GlobalModel) -> (Vec<f32>, Vec<f32>) {
    let trainable = m.item_factors.iter().chain(m.item_bias.iter()).chain(std::iter::once(&m.global_mean));
    (trainable.copied().collect(), m.centroids.iter().copied().collect())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The grid step of the secure test rounds (clip norm 10 over the update layout).
fn grid_step() -> f64 {
    Grid::for_secure_sum(10.0, SHAPE.layout().len()).expect("a valid grid").step()
}

/// Compares two models after one SGD round (learning rate 1) over the same devices: each
/// device's encoding is within one grid step of its update per coordinate, the denominator is
/// the number of updates, so the trainable parameters differ by less than one step. Returns
/// the difference and how far the plain round moved the model.
fn compare_one_round(plain: &GlobalModel, secure: &GlobalModel, init: &GlobalModel) -> (f32, f32) {
    let (p, pc) = params(plain);
    let (s, sc) = params(secure);
    let (i, _) = params(init);
    let diff = max_abs_diff(&p, &s);
    let moved = max_abs_diff(&p, &i);
    let step = grid_step() as f32;
    assert!(diff <= step * 1.001 + 1e-5, "trainable parameters differ by {diff}, the grid step is {step}");
    assert!(moved > 20.0 * step, "the round moved the model by only {moved} (step {step})");
    // Centroids move to the round's mean of their members, sum over count; sum and count are
    // each within a step per member: |Δc| ≤ (|Δs| + |c| |Δn|) / (n − |Δn|) ≈ step (1 + |c|) for
    // unclipped members (count 1 each), doubled for clipped ones. (The policy's minimum count
    // is 0.5 so that no segment sits at the threshold, where rounding could flip whether it
    // moves.)
    let cdiff = max_abs_diff(&pc, &sc);
    let cmax = pc.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let bound = 2.0 * step * (1.0 + cmax);
    assert!(cdiff <= bound, "centroids differ by {cdiff} (bound {bound})");
    (diff, moved)
}

/// A secure round without noise over the same 20 devices as a plain one (first-come
/// selection, the same seeds) gives the same model up to the grid's rounding.
#[test]
fn a_secure_round_gives_the_plain_model_up_to_rounding() {
    let devices = common::low_rank_ratings(60, SHAPE.n_items, 3, 10, 0.3, 11);
    let selection = Selection::FirstCome { cohort: 20 };
    let mut plain = federation(config(selection, None), &devices, 0.0, 20);
    let mut secure_fed = federation(config(selection, secure(0.1)), &devices, 0.0, 20);
    let p = plain.run_round();
    let s = secure_fed.run_round();
    let (ps, ss) = (committed(&p), committed(&s));
    assert_eq!((ss.n_selected, ss.n_reported, ss.n_dropped), (20, 20, 0), "{s:?}");
    assert_eq!(s.n_completed, 20);
    assert_eq!(ps.denominator, ss.denominator);
    let (diff, moved) = compare_one_round(
        &plain.coordinator.model().model,
        &secure_fed.coordinator.model().model,
        &init_model(20),
    );
    println!(
        "one round: max |plain − secure| = {diff:.2e} (grid step {:.2e}), moved {moved:.3}",
        grid_step()
    );
}

/// The phase a device's secure message belongs to (`None`: not a secure message).
fn secure_phase(msg: &ClientMessage) -> Option<u8> {
    match msg {
        ClientMessage::AdvertiseKeys { .. } => Some(0),
        ClientMessage::EncryptedShares { .. } => Some(1),
        ClientMessage::MaskedInput { .. } => Some(2),
        ClientMessage::UnmaskShares(_) => Some(3),
        _ => None,
    }
}

/// One round driven by hand.
struct Driven<'a> {
    clients: Vec<ClientRound<'a>>,
    events: Vec<CoordinatorEvent>,
    /// Devices whose masked input reached the coordinator.
    masked: BTreeSet<usize>,
    /// Devices whose unmask shares reached the coordinator.
    unmasked: BTreeSet<usize>,
}

impl Driven<'_> {
    fn end(&self) -> &CoordinatorEvent {
        self.events
            .iter()
            .find(|e| {
                matches!(e, CoordinatorEvent::RoundCommitted { .. } | CoordinatorEvent::RoundAbandoned { .. })
            })
            .expect("the round closed")
    }
}

/// Runs one round of `coord` in which every device of `devices` (client id = position) checks
/// in at time zero, single-threaded on a simulated clock, device `d` vanishing before its
/// secure message of phase `vanish[d]` (0 keys, 1 shares, 2 masked input, 3 unmask shares).
/// With `device_timers` the devices give up at their own deadline, as the SDK does.
fn drive<'a>(
    coord: &mut Coordinator<ChaCha12Rng>,
    devices: &'a [Vec<Rating>],
    policy: SecurePolicy,
    vanish: &[Option<u8>],
    seed: u64,
    device_timers: bool,
) -> Driven<'a> {
    let lat = Duration::from_millis(20);
    let mut now = Instant::ZERO;
    coord.start_round(now).expect("a round starts");
    let far = now.saturating_add(Duration::from_secs(24 * 3600));
    let mut clients: Vec<ClientRound<'a>> = devices
        .iter()
        .enumerate()
        .map(|(d, r)| {
            ClientRound::with_rng(r, far, ChaCha20Rng::seed_from_u64(seed ^ (d as u64) << 20))
                .with_secure_policy(policy)
        })
        .collect();
    let mut gone = vec![false; devices.len()];
    let (mut masked, mut unmasked) = (BTreeSet::new(), BTreeSet::new());
    let mut events = Vec::new();
    loop {
        let mut moved = false;
        for (d, client) in clients.iter_mut().enumerate() {
            while let Some(msg) = client.poll_transmit() {
                moved = true;
                let phase = secure_phase(&msg);
                if gone[d] || phase.zip(vanish[d]).is_some_and(|(p, v)| p >= v) {
                    gone[d] = true;
                    continue;
                }
                match phase {
                    Some(2) => masked.insert(d),
                    Some(3) => unmasked.insert(d),
                    _ => false,
                };
                coord.handle_message(now, d as ClientId, msg);
            }
        }
        now = now.saturating_add(lat);
        while let Some((to, msg)) = coord.poll_transmit() {
            moved = true;
            if !gone[to as usize] {
                clients[to as usize].handle_message(now, msg);
            }
        }
        events.extend(std::iter::from_fn(|| coord.poll_event()));
        now = now.saturating_add(lat);
        if moved {
            continue;
        }
        if coord.current_round().is_none() {
            break;
        }
        // The next timer: the coordinator's, or (when devices keep their own deadlines, as the
        // SDK does) the earliest of a device still in the round.
        let device_deadline = clients
            .iter()
            .zip(&gone)
            .filter(|(_, gone)| device_timers && !**gone)
            .filter_map(|(c, _)| c.poll_timeout())
            .min();
        match [coord.poll_timeout(), device_deadline].into_iter().flatten().min() {
            Some(t) => {
                now = now.max(t);
                coord.handle_timeout(now);
                if device_timers {
                    clients.iter_mut().for_each(|c| c.handle_timeout(now));
                }
            }
            None => break,
        }
    }
    for e in &events {
        assert!(!matches!(e, CoordinatorEvent::Rejected { .. }), "an honest device was refused: {e:?}");
    }
    Driven { clients, events, masked, unmasked }
}

/// Devices drop at each of the four secure messages; the round commits with exactly the
/// devices whose masked input arrived (`n_reported`), acknowledges those that unmasked, and
/// its model is that of a plain round over exactly those devices, up to rounding: the
/// dropped devices' updates are not in the sum and their masks are all removed.
#[test]
fn a_secure_round_with_dropouts_sums_exactly_its_survivors() {
    let devices = common::low_rank_ratings(20, SHAPE.n_items, 3, 10, 0.3, 31);
    let mut vanish = vec![None; 20];
    for (d, p) in [(3, 0), (7, 1), (11, 2), (12, 2), (15, 3), (18, 3)] {
        vanish[d] = Some(p);
    }
    let mut coord = Coordinator::new(
        config(Selection::FirstCome { cohort: 20 }, secure(0.3)),
        init_model(40),
        seeded_rng(41),
    )
    .expect("valid config");
    let run = drive(&mut coord, &devices, SecurePolicy::default(), &vanish, 42, false);
    let CoordinatorEvent::RoundCommitted { stats, .. } = run.end() else { panic!("{:?}", run.events) };
    let u3: BTreeSet<usize> = (0..20).filter(|d| vanish[*d].is_none_or(|p| p > 2)).collect();
    assert_eq!(run.masked, u3);
    assert_eq!((stats.n_selected, stats.n_reported, stats.n_dropped), (20, 16, 4));
    let acked: BTreeSet<usize> = (0..20)
        .filter(|&d| matches!(run.clients[d].outcome(), Some(ClientOutcome::Completed { .. })))
        .collect();
    assert_eq!(acked, run.unmasked);
    assert_eq!(acked.len(), 14);

    // The plain round over exactly the survivors.
    let survivors: Vec<Vec<Rating>> = u3.iter().map(|&d| devices[d].clone()).collect();
    let mut plain = Coordinator::new(
        config(Selection::FirstCome { cohort: u3.len() }, None),
        init_model(40),
        seeded_rng(41),
    )
    .expect("valid config");
    let plain_run = drive(&mut plain, &survivors, SecurePolicy::default(), &vec![None; u3.len()], 42, false);
    let CoordinatorEvent::RoundCommitted { stats: plain_stats, .. } = plain_run.end() else { panic!() };
    assert_eq!(plain_stats.n_reported, 16);
    let (diff, _) = compare_one_round(&plain.model().model, &coord.model().model, &init_model(40));
    println!("with dropouts: max |plain(U3) − secure| = {diff:.2e}");
}

/// Several secure rounds with harness dropouts commit, count their reports consistently, and
/// train about as well as plain rounds from the same seeds.
#[test]
fn secure_rounds_train_like_plain_rounds() {
    let (n_users, n_items) = (120, SHAPE.n_items);
    let all = common::low_rank_ratings(n_users, n_items, 3, 15, 0.3, 61);
    let (train, test): (Vec<Vec<Rating>>, Vec<Vec<Rating>>) =
        all.into_iter().map(|mut rs| (rs.split_off(4), rs)).unzip();
    let users: Vec<(&[Rating], &[Rating])> = train.iter().zip(&test).map(|(a, b)| (&a[..], &b[..])).collect();
    let eval_cfg = EvalConfig { rating_range: (1.0, 5.0), relevance_threshold: Some(4.0) };
    let rmse = |m: &RoundModel| {
        eval::evaluate(&ReconstructionScorer { model: m, params: EXPLICIT }, &users, n_items, &eval_cfg, 2)
            .rmse
            .expect("ratings")
    };
    let initial = rmse(&RoundModel::new(0, init_model(70)));
    let selection = Selection::FirstCome { cohort: 30 };
    let mut cfg = config(selection, None);
    cfg.optimizer = ServerOptimizer::adam(0.05);
    let mut plain = federation(cfg.clone(), &train, 0.3, 70);
    cfg.secure = secure(0.3);
    let mut secure_fed = federation(cfg, &train, 0.3, 70);
    let mut vanished = 0;
    for round in 0..8 {
        committed(&plain.run_round());
        let report = secure_fed.run_round();
        let stats = committed(&report);
        // The sum holds every masked input (U3): the devices acknowledged after unmasking and
        // those that vanished before their unmask shares.
        assert!(
            report.n_completed <= stats.n_reported
                && stats.n_reported <= report.n_completed + report.n_vanished,
            "round {round}: {report:?}"
        );
        assert_eq!(stats.n_dropped, stats.n_selected - stats.n_reported);
        assert_eq!(stats.n_selected, report.n_completed + report.n_vanished, "round {round}: {report:?}");
        assert_eq!((report.n_failed, report.n_refused), (0, 0));
        vanished += report.n_vanished;
    }
    assert!(vanished > 20, "the harness dropped {vanished} devices over 8 rounds");
    let (p, s) = (rmse(plain.coordinator.model()), rmse(secure_fed.coordinator.model()));
    println!("RMSE: initial {initial:.4}, plain {p:.4}, secure {s:.4}");
    assert!(s < initial - 0.05, "secure rounds did not train: {initial} → {s}");
    assert!((s - p).abs() < 0.02 * p, "secure {s} vs plain {p}");
}

fn noised_config(secure: Option<SecureAggregation>) -> CoordinatorConfig {
    CoordinatorConfig {
        selection: Selection::Poisson { q: 0.5 },
        noise_multiplier: 1.0,
        ..config(Selection::Poisson { q: 0.5 }, secure)
    }
}

/// With 95% of the devices vanishing, a secure round with noise aborts for secure
/// aggregation: the model is unchanged and nothing is charged.
#[test]
fn heavy_dropout_abandons_the_round_without_a_charge() {
    let devices = common::low_rank_ratings(60, SHAPE.n_items, 3, 10, 0.3, 81);
    let mut fed = federation(noised_config(secure(0.1)), &devices, 0.95, 80);
    let before = fed.coordinator.model().clone();
    let report = fed.run_round();
    match &report.event {
        Some(CoordinatorEvent::RoundAbandoned { reason: AbandonReason::SecureAggregation, stats }) => {
            assert!(stats.n_selected > 10, "{stats:?}");
        }
        other => panic!("{other:?} ({report:?})"),
    }
    assert_eq!(fed.coordinator.model().version, before.version);
    assert_eq!(params(&fed.coordinator.model().model), params(&before.model));
    assert!(fed.coordinator.ledger().entries().is_empty());
    // The next round, without the dropouts, commits and is charged: the abort was the dropout.
    let harness = HarnessConfig { dropout: 0.0, n_threads: 2, latency: Duration::from_millis(20) };
    let mut fed = Federation::new(fed.coordinator, &devices, harness, seeded_rng(83));
    committed(&fed.run_round());
    assert_eq!(fed.coordinator.ledger().entries().len(), 1);
}

/// Every masked input arrives but every device vanishes before unmasking: the coordinator holds
/// the masked sum and cannot unmask it, so the round aborts and nothing is released or charged.
#[test]
fn masked_inputs_without_unmask_shares_abort() {
    let devices = common::low_rank_ratings(20, SHAPE.n_items, 3, 10, 0.3, 91);
    let mut coord = Coordinator::new(
        CoordinatorConfig { population: Some(20), ..noised_config(secure(0.1)) },
        init_model(90),
        seeded_rng(91),
    )
    .expect("valid config");
    let run = drive(&mut coord, &devices, SecurePolicy::default(), &[Some(3); 20], 92, false);
    assert!(run.masked.len() >= 10, "{:?}", run.masked);
    assert!(run.unmasked.is_empty());
    assert!(
        matches!(
            run.end(),
            CoordinatorEvent::RoundAbandoned { reason: AbandonReason::SecureAggregation, .. }
        ),
        "{:?}",
        run.events
    );
    assert_eq!(coord.model().version, 0);
    assert!(coord.ledger().entries().is_empty());
}

/// A cohort below the devices' minimum: every device refuses at share-keys, the coordinator
/// gets no shares and the round aborts; with a minimum the cohort meets, the round commits.
#[test]
fn devices_refuse_a_cohort_below_their_minimum() {
    let devices = common::low_rank_ratings(6, SHAPE.n_items, 3, 10, 0.3, 101);
    let cfg = config(Selection::FirstCome { cohort: 6 }, secure(0.1));
    let policy = SecurePolicy::default();
    assert!(policy.min_cohort > 6);
    let mut coord = Coordinator::new(cfg.clone(), init_model(100), seeded_rng(101)).expect("valid config");
    let run = drive(&mut coord, &devices, policy, &[None; 6], 102, false);
    for (d, client) in run.clients.iter().enumerate() {
        assert_eq!(
            client.outcome(),
            Some(&ClientOutcome::SecureRefused(SecureRefusal::CohortTooSmall {
                n: 6,
                min: policy.min_cohort
            })),
            "device {d}"
        );
    }
    assert!(
        matches!(
            run.end(),
            CoordinatorEvent::RoundAbandoned { reason: AbandonReason::SecureAggregation, .. }
        ),
        "{:?}",
        run.events
    );
    assert_eq!(coord.model().version, 0);

    let mut coord = Coordinator::new(cfg, init_model(100), seeded_rng(101)).expect("valid config");
    let run = drive(&mut coord, &devices, SecurePolicy { min_cohort: 6, ..policy }, &[None; 6], 102, false);
    assert!(matches!(run.end(), CoordinatorEvent::RoundCommitted { .. }), "{:?}", run.events);
}

/// Secure aggregation composes with central noise: a noised secure round commits at its
/// planned end (check-in, report and three phase windows), is charged once like a plain one,
/// and its noise is the plain round's.
#[test]
fn noised_secure_rounds_commit_at_the_planned_end_and_are_charged_once() {
    let devices = common::low_rank_ratings(60, SHAPE.n_items, 3, 10, 0.3, 111);
    let mut plain = federation(noised_config(None), &devices, 0.0, 110);
    let mut secure_fed = federation(noised_config(secure(0.1)), &devices, 0.0, 110);
    let planned = Duration::from_secs(60 + 120) + 3 * PHASE_WINDOW;
    for round in 0..2u64 {
        let p = plain.run_round();
        let s = secure_fed.run_round();
        let (ps, ss) = (committed(&p), committed(&s));
        assert_eq!(ss.n_reported, ss.n_selected, "round {round}: every device answered");
        assert_eq!(ss.duration, planned, "round {round}");
        // σ = z Δ₂ on each round's grid (the secure grid is finer, so its Δ₂ is closer to C):
        // at least z C in both, and the plain one exactly as before.
        let len = SHAPE.layout().len();
        let want = |grid: Result<Grid, _>| grid.expect("a grid").noise_std(1.0).expect("noise") as f32;
        assert_eq!(ss.noise_std, want(Grid::for_secure_sum(ss.clip_norm, len)), "round {round}");
        assert_eq!(ps.noise_std, want(Grid::for_sum(ps.clip_norm, len)), "round {round}");
        assert!(
            ss.noise_std >= ss.clip_norm && ss.noise_std <= ps.noise_std,
            "{} vs {}",
            ss.noise_std,
            ps.noise_std
        );
        assert_eq!(ss.denominator, ps.denominator);
    }
    let ledger = secure_fed.coordinator.ledger();
    assert_eq!(ledger.entries().len(), 2);
    assert_eq!(ledger, plain.coordinator.ledger());
    assert_eq!(ledger.entries()[1], secure_fed.coordinator.round_charge(1).expect("a charge"));

    // Without noise the same secure round closes as soon as every phase is answered: the wait
    // above is the noise's, not the protocol's.
    let mut fast = federation(config(Selection::Poisson { q: 0.5 }, secure(0.1)), &devices, 0.0, 110);
    let report = fast.run_round();
    assert!(committed(&report).duration < planned, "{report:?}");
}

/// A device that keeps its own deadline (as the SDK does) stays for the whole protocol: with
/// Poisson selection the devices check in at the start of the check-in window, and one device
/// vanishing at each secure message makes every phase run to its deadline; the others must
/// still be waiting when the unmask request comes, and the round commits.
#[test]
fn devices_wait_for_every_phase_when_phases_run_to_their_deadlines() {
    let devices = common::low_rank_ratings(20, SHAPE.n_items, 3, 10, 0.3, 121);
    let mut vanish = vec![None; 20];
    for (d, p) in [(2, 0), (5, 1), (9, 2), (14, 3)] {
        vanish[d] = Some(p);
    }
    let cfg =
        CoordinatorConfig { population: Some(20), ..config(Selection::Poisson { q: 1.0 }, secure(0.3)) };
    // Without device deadlines the round commits: the protocol itself copes with the dropouts.
    let mut coord = Coordinator::new(cfg.clone(), init_model(120), seeded_rng(121)).expect("valid config");
    let run = drive(&mut coord, &devices, SecurePolicy::default(), &vanish, 122, false);
    assert!(matches!(run.end(), CoordinatorEvent::RoundCommitted { .. }), "{:?}", run.events);
    // With them, the devices must not give up before their last request.
    let mut coord = Coordinator::new(cfg, init_model(120), seeded_rng(121)).expect("valid config");
    let run = drive(&mut coord, &devices, SecurePolicy::default(), &vanish, 122, true);
    let timed_out: Vec<usize> = (0..20)
        .filter(|&d| vanish[d].is_none() && run.clients[d].outcome() == Some(&ClientOutcome::TimedOut))
        .collect();
    assert!(timed_out.is_empty(), "devices {timed_out:?} gave up while the round ran: {:?}", run.end());
    assert!(matches!(run.end(), CoordinatorEvent::RoundCommitted { .. }), "{:?}", run.events);
}

/// Under adaptive clipping the clip bit rides in the secure sum as its last coordinate: without
/// noise, a secure round estimates the same unclipped fraction, and so moves the clip norm
/// exactly as a plain round over the same devices.
#[test]
fn the_clip_bit_is_summed_securely() {
    let devices = common::low_rank_ratings(60, SHAPE.n_items, 3, 10, 0.3, 131);
    let mut cfg = config(Selection::FirstCome { cohort: 20 }, None);
    cfg.clip_norm = 0.5;
    cfg.adaptive_clip =
        Some(AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 0.0 });
    let mut plain = federation(cfg.clone(), &devices, 0.0, 130);
    cfg.secure = secure(0.1);
    let mut secure_fed = federation(cfg, &devices, 0.0, 130);
    for round in 0..3 {
        let (p, s) = (plain.run_round(), secure_fed.run_round());
        let (ps, ss) = (committed(&p), committed(&s));
        let fraction = ss.unclipped_fraction.expect("adaptive clipping reports its fraction");
        assert_eq!(Some(fraction), ps.unclipped_fraction, "round {round}");
        assert_eq!(fraction, (s.n_completed - s.n_clipped) as f64 / 20.0, "round {round}");
        assert_eq!(secure_fed.coordinator.clip_norm(), plain.coordinator.clip_norm(), "round {round}");
    }
    // The clip norm did move, from both sides of the target.
    assert_ne!(secure_fed.coordinator.clip_norm(), 0.5);
}

/// Sends `msg` from `client` and returns the coordinator's answers (not delivered anywhere).
fn send(
    coord: &mut Coordinator<ChaCha12Rng>,
    now: Instant,
    client: ClientId,
    msg: ClientMessage,
) -> Vec<(ClientId, ServerMessage)> {
    coord.handle_message(now, client, msg);
    std::iter::from_fn(|| coord.poll_transmit()).collect()
}

/// Sends `msg` from `client` and checks that the coordinator refuses it with `want`, telling
/// the client, and changes nothing else.
fn expect_refused(
    coord: &mut Coordinator<ChaCha12Rng>,
    now: Instant,
    client: ClientId,
    msg: ClientMessage,
    want: &str,
) {
    let phase = coord.phase();
    let out = send(coord, now, client, msg);
    match out.as_slice() {
        [(to, ServerMessage::Rejected { reason, .. })] if *to == client => {
            assert_eq!(reason.label(), want, "{reason:?}");
        }
        other => panic!("expected a {want} refusal to {client}, got {other:?}"),
    }
    assert_eq!(coord.phase(), phase, "a refused message moved the round");
}

/// The coordinator takes each secure message once, from a selected device, in its own phase,
/// for its own round, well-formed; a masked input that arrives after its phase closed is
/// refused and not in the sum; the refusals are counted in the round's stats.
#[test]
fn the_coordinator_refuses_secure_messages_out_of_turn() {
    let n = 12;
    let devices = common::low_rank_ratings(n, SHAPE.n_items, 3, 10, 0.3, 141);
    let mut coord = Coordinator::new(
        config(Selection::FirstCome { cohort: n }, secure(0.2)),
        init_model(140),
        seeded_rng(141),
    )
    .expect("valid config");
    let mut now = Instant::ZERO;
    let round = coord.start_round(now).expect("a round starts");
    let far = now.saturating_add(Duration::from_secs(24 * 3600));
    let mut clients: Vec<ClientRound<'_>> = devices
        .iter()
        .enumerate()
        .map(|(d, r)| ClientRound::with_rng(r, far, ChaCha20Rng::seed_from_u64(140 + d as u64)))
        .collect();
    let deliver = |clients: &mut [ClientRound<'_>], out: Vec<(ClientId, ServerMessage)>, now: Instant| {
        for (to, msg) in out {
            clients[to as usize].handle_message(now, msg);
        }
    };
    let mut out = Vec::new();
    for (d, c) in clients.iter_mut().enumerate() {
        let msg = c.poll_transmit().expect("a check-in");
        out.extend(send(&mut coord, now, d as ClientId, msg));
    }
    deliver(&mut clients, out, now);
    let next = |clients: &mut [ClientRound<'_>]| -> Vec<ClientMessage> {
        clients.iter_mut().map(|c| c.poll_transmit().expect("an answer")).collect()
    };

    // Keys.
    let keys = next(&mut clients);
    for (d, msg) in keys.iter().enumerate().take(n - 1) {
        assert!(send(&mut coord, now, d as ClientId, msg.clone()).is_empty());
    }
    expect_refused(&mut coord, now, 0, keys[0].clone(), "duplicate");
    expect_refused(&mut coord, now, 99, keys[0].clone(), "not_selected");
    let ClientMessage::AdvertiseKeys { cipher_public, mask_public, .. } = keys[n - 1].clone() else {
        panic!()
    };
    let next_round = ClientMessage::AdvertiseKeys { round: round + 1, cipher_public, mask_public };
    expect_refused(&mut coord, now, (n - 1) as ClientId, next_round, "wrong_round");
    let early = ClientMessage::MaskedInput { round, words: vec![0; SHAPE.layout().len()] };
    expect_refused(&mut coord, now, 1, early, "wrong_phase");
    let out = send(&mut coord, now, (n - 1) as ClientId, keys[n - 1].clone());
    let bits = match &out[0].1 {
        ServerMessage::ShareKeys(req) => req.setup.bits,
        other => panic!("{other:?}"),
    };
    assert_eq!(out.len(), n);
    now = now.saturating_add(Duration::from_millis(40));
    deliver(&mut clients, out, now);

    // Shares.
    let shares = next(&mut clients);
    for (d, msg) in shares.iter().enumerate().take(n - 1) {
        assert!(send(&mut coord, now, d as ClientId, msg.clone()).is_empty());
    }
    expect_refused(&mut coord, now, 0, shares[0].clone(), "duplicate");
    let out = send(&mut coord, now, (n - 1) as ClientId, shares[n - 1].clone());
    assert_eq!(out.len(), n);
    now = now.saturating_add(Duration::from_millis(40));
    deliver(&mut clients, out, now);

    // Masked inputs; the last device's arrives after the phase closed.
    let masked = next(&mut clients);
    let ClientMessage::MaskedInput { words, .. } = masked[0].clone() else { panic!() };
    let short = ClientMessage::MaskedInput { round, words: words[1..].to_vec() };
    expect_refused(&mut coord, now, 0, short, "malformed");
    let mut outside = words.clone();
    outside[0] = 1u64 << bits;
    expect_refused(&mut coord, now, 0, ClientMessage::MaskedInput { round, words: outside }, "malformed");
    for (d, msg) in masked.iter().enumerate().take(n - 1) {
        assert!(send(&mut coord, now, d as ClientId, msg.clone()).is_empty());
    }
    expect_refused(&mut coord, now, 0, masked[0].clone(), "duplicate");
    now = coord.poll_timeout().expect("the masked-input deadline");
    coord.handle_timeout(now);
    let out: Vec<(ClientId, ServerMessage)> = std::iter::from_fn(|| coord.poll_transmit()).collect();
    assert_eq!(out.len(), n - 1, "the late device is not asked to unmask");
    expect_refused(&mut coord, now, (n - 1) as ClientId, masked[n - 1].clone(), "wrong_phase");
    deliver(&mut clients, out, now);

    // Unmasking.
    let answers: Vec<ClientMessage> =
        clients[..n - 1].iter_mut().map(|c| c.poll_transmit().expect("shares")).collect();
    for (d, a) in answers.iter().enumerate() {
        let out = send(&mut coord, now, d as ClientId, a.clone());
        assert!(matches!(out.as_slice(), [(_, ServerMessage::Ack { .. })]), "{out:?}");
        if d == 0 {
            expect_refused(&mut coord, now, 0, a.clone(), "duplicate");
        }
    }
    let events: Vec<CoordinatorEvent> = std::iter::from_fn(|| coord.poll_event()).collect();
    let Some(CoordinatorEvent::RoundCommitted { stats, .. }) =
        events.iter().find(|e| matches!(e, CoordinatorEvent::RoundCommitted { .. }))
    else {
        panic!("{events:?}")
    };
    assert_eq!((stats.n_reported, stats.n_dropped), (n - 1, 1));
    let mut rejected = stats.rejected.clone();
    rejected.sort();
    assert_eq!(
        rejected,
        vec![("duplicate", 4), ("malformed", 2), ("not_selected", 1), ("wrong_phase", 2), ("wrong_round", 1)]
    );
}
