//! A curious coordinator over real QUIC: from everything the coordinator's server receives from a device in a secure round (its masked input with the self-mask removed by the revealed shares) the inversion that recovers a plain upload's user vector, rated items and residuals fails, masked inputs of very different updates are indistinguishable, and no message carries the update in the clear; the same attacks on a plain round succeed.
//!
//! The coordinator is the real `Server` on loopback, the devices the SDK's `Device`s; the
//! server's request observer hands the test every round message a verified device sends.
//! Each device's true update is recomputed here from its ratings and the server's initial
//! model, and checked against the plain upload (plain round) and the unmasked sum (secure).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fedrec_shared::round::{ClientOutcome, CoordinatorEvent, SecureAggregation, Selection};
use fedrec_shared::secagg::encode::{encode, ring_add, to_ring};
use fedrec_shared::train::{local_update, reconstruct};
use fedrec_shared::update::ClippedUpdate;
use fedrec_shared::wire::Request;
use fedrec_shared::{GlobalModel, ModelShape, Rating, RoundModel, UpdateLayout, danger};
use fedrec_tests::curious::{
    Recorder, SecureView, auc, chi2_sf, chi2_two_sample, correlation, cosine, histogram, invert, jaccard,
    payload_bytes,
};
use fedrec_tests::server::{TRAIN, coordinator_config, initial_model};
use fedrec_tests::{LoopbackServer, low_rank_ratings, ratings_by_user};

/// Wide enough that chance agreement is small: a random direction has cosine about
/// `1/√64 = 0.125` with the user vector, and 100 residuals correlate by chance about 0.1.
const SHAPE: ModelShape = ModelShape { n_items: 300, dim: 64, n_segments: 4 };
const N_DEVICES: usize = 12;
const PER_USER: usize = 100;
/// The last device rates only this many items: its update is very different from the others'.
const FEW: usize = 5;
/// `coordinator_config`'s clip norm.
const CLIP: f32 = 10.0;
const DROPOUT: f64 = 0.2;
const CORRUPT: f64 = 0.05;

/// Device `id` (1-based) has the ratings `users()[id - 1]`.
fn users() -> Vec<Vec<Rating>> {
    let mut users =
        ratings_by_user(N_DEVICES, low_rank_ratings(N_DEVICES, SHAPE.n_items, 3, PER_USER, 0.1, 41));
    users[N_DEVICES - 1].truncate(FEW);
    users
}

fn model() -> GlobalModel {
    initial_model(SHAPE, 3.0, 5)
}

fn layout() -> UpdateLayout {
    SHAPE.layout()
}

/// The attacked devices: every device but the last. Any `n − 1` of the inputs with their
/// self-masks removed are jointly uniform (the pairwise masks of a connected graph), so the
/// targets' statistics are independent draws under the hypothesis that nothing leaks; the
/// `n`-th is fixed by the others and the sum.
fn targets() -> impl Iterator<Item = u64> {
    1..N_DEVICES as u64
}

/// One device's update as the device computes it, recomputed here.
struct Truth {
    user: Vec<f64>,
    segment: usize,
    rated: BTreeSet<u32>,
    /// `rating − prediction` per item (0 for unrated items).
    residuals: Vec<f64>,
    clipped: ClippedUpdate,
    dense: Vec<f32>,
}

fn truth(ratings: &[Rating]) -> Truth {
    let model = RoundModel::new(0, model());
    let user = reconstruct(&model, ratings, &TRAIN).expect("the ridge system is definite");
    let clipped =
        ClippedUpdate::clip(local_update(&model, ratings, &user, &TRAIN), CLIP).expect("a finite update");
    let mut residuals = vec![0.0; SHAPE.n_items];
    for r in ratings {
        residuals[r.item as usize] = f64::from(r.value - user.score(&model, r.item as usize));
    }
    Truth {
        user: user.factors.iter().map(|&x| f64::from(x)).collect(),
        segment: model.model.nearest_segment(&user.factors).0,
        rated: ratings.iter().map(|r| r.item).collect(),
        residuals,
        dense: clipped.vector().to_dense(),
        clipped,
    }
}

/// Runs one round (secure or plain) of all devices over QUIC against a fresh server whose
/// observer records every round message; returns what it recorded once the round committed
/// with every device in it.
async fn round(secure: bool, users: &Arc<Vec<Vec<Rating>>>) -> Vec<(u64, Request)> {
    let mut config = coordinator_config(Selection::FirstCome { cohort: N_DEVICES }, N_DEVICES);
    if secure {
        config.secure = Some(SecureAggregation {
            dropout: DROPOUT,
            corrupt: CORRUPT,
            phase_window: Duration::from_secs(30),
            distributed: None,
        });
    }
    let recorder = Recorder::new();
    let observer = recorder.observer();
    let server = LoopbackServer::start(config, model(), move |serve| serve.observer = Some(observer));
    for outcome in server.participate_all(Arc::clone(users)).await {
        assert!(matches!(outcome, ClientOutcome::Completed { .. }), "{outcome:?}");
    }
    let mut status = server.status().clone();
    let s = status.wait_for(|s| s.n_committed >= 1).await.expect("the server runs").clone();
    let Some(CoordinatorEvent::RoundCommitted { stats, .. }) = &s.last_close else {
        panic!("{:?}", s.last_close)
    };
    assert_eq!((stats.n_selected, stats.n_reported), (N_DEVICES, N_DEVICES));
    server.stop().await;
    let requests = recorder.requests();
    // What each device sent about its update, and nothing else.
    let kinds = |id: u64| -> Vec<&'static str> {
        requests
            .iter()
            .filter(|(d, _)| *d == id)
            .map(|(_, r)| match r {
                Request::Upload(_) => "upload",
                Request::AdvertiseKeys(_) => "keys",
                Request::EncryptedShares(_) => "shares",
                Request::MaskedInput(_) => "masked",
                Request::UnmaskShares(_) => "unmask",
                Request::CheckIn(_) | Request::FetchRules(_) => "other",
            })
            .collect()
    };
    let want: &[&str] = if secure { &["keys", "shares", "masked", "unmask"] } else { &["upload"] };
    for id in 1..=N_DEVICES as u64 {
        assert_eq!(kinds(id), want, "device {id}");
    }
    requests
}

fn upload_of(requests: &[(u64, Request)], id: u64) -> Vec<f32> {
    requests
        .iter()
        .find_map(|(d, r)| match r {
            Request::Upload(u) if *d == id => Some(u.update.clone()),
            _ => None,
        })
        .expect("the device uploaded")
}

fn secure_view(requests: &[(u64, Request)]) -> SecureView {
    let view = SecureView::new(requests, &layout(), CLIP, DROPOUT, CORRUPT, false).expect("a secure round");
    assert_eq!((view.n, view.index.len()), (N_DEVICES, N_DEVICES));
    view
}

/// What the inversion gets right about one device.
#[derive(Debug)]
struct Score {
    cosine: f64,
    correlation: f64,
    auc: f64,
    /// Jaccard index of the exact-zero rows with the unrated items.
    unrated_jaccard: f64,
    segment_hit: bool,
    nonzero_counts: usize,
    count: f64,
    norm: f64,
}

fn score(dense: &[f64], truth: &Truth) -> Score {
    let inv = invert(&layout(), dense);
    let rated: Vec<usize> = truth.rated.iter().map(|&i| i as usize).collect();
    let guessed: Vec<f64> = rated.iter().map(|&i| inv.residuals[i]).collect();
    let real: Vec<f64> = rated.iter().map(|&i| truth.residuals[i]).collect();
    let all: BTreeSet<u32> = (0..SHAPE.n_items as u32).collect();
    let zero_rows: BTreeSet<u32> = all.difference(&inv.rated).copied().collect();
    let unrated: BTreeSet<u32> = all.difference(&truth.rated).copied().collect();
    Score {
        cosine: cosine(&inv.user, &truth.user),
        correlation: correlation(&guessed, &real),
        auc: auc(&inv.row_norms, &truth.rated),
        unrated_jaccard: jaccard(&zero_rows, &unrated),
        segment_hit: inv.segment == truth.segment,
        nonzero_counts: inv.nonzero_counts,
        count: inv.count,
        norm: inv.norm,
    }
}

fn rms(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
}

/// The design's inversion of an upload — user vector = centroid row / count, rated items =
/// non-zero rows, residuals = −bias gradient / count — recovers everything from a plain
/// upload, and nothing from what the coordinator holds of a device after a secure round,
/// even with the device's self-mask removed (rebuilt from the `t` self-mask shares the
/// unmask phase reveals): only the pairwise masks remain, and they suffice.
///
/// Thresholds are on the 11 targets pooled, so that they are many standard deviations from
/// both chance and the plain round: with nothing leaking, `64·Σcos²` and `100·Σr²` are about
/// χ²₁₁ (RMS cosine 0.3 and RMS correlation 0.25 are at p ≈ 10⁻⁹), and the mean AUC of the
/// row norms has a standard deviation of 0.011 around 0.5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_curious_coordinator_recovers_nothing_from_a_secure_round() {
    let users = Arc::new(users());
    let truths: Vec<Truth> = users.iter().map(|r| truth(r)).collect();
    let truth_of = |id: u64| &truths[id as usize - 1];

    // Control: the plain round. The upload is the recomputed update, and the inversion
    // recovers the user vector, the segment, the rated items and the residuals.
    let plain = round(false, &users).await;
    for id in 1..=N_DEVICES as u64 {
        let upload = upload_of(&plain, id);
        let diff = upload.iter().zip(&truth_of(id).dense).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6, "device {id}: the upload is not the recomputed update (max diff {diff})");
    }
    let plain_scores: Vec<Score> = targets()
        .map(|id| {
            let upload: Vec<f64> = upload_of(&plain, id).iter().map(|&x| f64::from(x)).collect();
            score(&upload, truth_of(id))
        })
        .collect();
    for (id, s) in targets().zip(&plain_scores) {
        assert!(s.cosine > 0.99, "plain, device {id}: user vector not recovered: {s:?}");
        assert!(s.correlation > 0.99, "plain, device {id}: residuals not recovered: {s:?}");
        assert_eq!(s.auc, 1.0, "plain, device {id}: {s:?}");
        assert_eq!(s.unrated_jaccard, 1.0, "plain, device {id}: the zero rows are not the unrated items");
        assert!(s.segment_hit && s.nonzero_counts == 1, "plain, device {id}: {s:?}");
        assert!(s.count > 0.0 && s.count <= 1.0 && s.norm <= f64::from(CLIP), "plain, device {id}: {s:?}");
    }

    // The secure round.
    let secure = round(true, &users).await;
    let view = secure_view(&secure);
    let step = view.grid.step();
    // The decoding is right: the devices' inputs with their self-masks removed add up (the
    // pairwise masks cancel) to the sum of the recomputed updates, within one grid step per
    // device and coordinate.
    let mut sum = vec![0u64; layout().len()];
    for id in 1..=N_DEVICES as u64 {
        let words = view.without_self_mask(id).expect("the self-mask seed is rebuilt");
        ring_add(&mut sum, &words, view.bits).expect("words in the ring");
    }
    let sum = view.decode(&sum).expect("a ring sum");
    let worst = (0..layout().len())
        .map(|c| (sum[c] - truths.iter().map(|t| f64::from(t.dense[c])).sum::<f64>()).abs())
        .fold(0.0, f64::max);
    assert!(worst <= N_DEVICES as f64 * step * 1.001, "the unmasked sum is off by {worst} (step {step})");
    // And the decoding has power on this ring and grid: had the words been the encoding
    // without the pairwise masks, the inversion would recover everything.
    let mut rng = danger::seeded_rng(3);
    for id in targets() {
        let t = truth_of(id);
        let encoded = encode(&t.clipped, &view.grid, None, &mut rng).expect("encodes");
        let words = to_ring(&encoded, view.bits).expect("fits");
        let s = score(&view.decode(&words).expect("ring words"), t);
        assert!(s.cosine > 0.99 && s.correlation > 0.99, "unmasked encoding, device {id}: {s:?}");
        assert!(
            s.auc == 1.0 && s.unrated_jaccard == 1.0 && s.segment_hit,
            "unmasked encoding, device {id}: {s:?}"
        );
    }

    let scores: Vec<Score> = targets()
        .map(|id| {
            let words = view.without_self_mask(id).expect("the self-mask seed is rebuilt");
            score(&view.decode(&words).expect("ring words"), truth_of(id))
        })
        .collect();
    for (id, s) in targets().zip(&scores) {
        // No row is exactly zero, so no item is revealed as unrated; every segment count is
        // non-zero, so the segment is not revealed by position; and the "update" is far
        // outside the clip ball: it is not an update at all.
        assert!(s.unrated_jaccard < 0.05, "secure, device {id}: zero rows match the unrated items: {s:?}");
        assert!(s.nonzero_counts >= SHAPE.n_segments - 1, "secure, device {id}: {s:?}");
        assert!(s.norm > 10.0 * f64::from(CLIP), "secure, device {id}: {s:?}");
    }
    let cos_rms = rms(scores.iter().map(|s| s.cosine));
    let corr_rms = rms(scores.iter().map(|s| s.correlation));
    let auc_mean = scores.iter().map(|s| s.auc).sum::<f64>() / scores.len() as f64;
    let hits = scores.iter().filter(|s| s.segment_hit).count();
    let plain_cos = plain_scores.iter().map(|s| s.cosine).fold(1.0, f64::min);
    let plain_corr = plain_scores.iter().map(|s| s.correlation).fold(1.0, f64::min);
    println!(
        "plain (min over {} targets): cosine {plain_cos:.6}, residual correlation {plain_corr:.6}, \
         rated set exact, AUC 1, segment {}/{}",
        plain_scores.len(),
        plain_scores.iter().filter(|s| s.segment_hit).count(),
        plain_scores.len()
    );
    println!(
        "secure (n = {}, k = {}, t = {}, bits = {}): RMS cosine {cos_rms:.3}, RMS residual correlation \
         {corr_rms:.3}, mean row-norm AUC {auc_mean:.3}, exact-zero rows 0, segment {hits}/{} \
         (chance 1/{}), max |cosine| {:.3}, max |correlation| {:.3}, min norm {:.0}",
        view.n,
        view.params.k,
        view.params.t,
        view.bits,
        scores.len(),
        SHAPE.n_segments,
        scores.iter().map(|s| s.cosine.abs()).fold(0.0, f64::max),
        scores.iter().map(|s| s.correlation.abs()).fold(0.0, f64::max),
        scores.iter().map(|s| s.norm).fold(f64::INFINITY, f64::min),
    );
    assert!(cos_rms < 0.3, "the user vectors leak: RMS cosine {cos_rms}");
    assert!(corr_rms < 0.25, "the ratings leak: RMS residual correlation {corr_rms}");
    assert!((auc_mean - 0.5).abs() < 0.06, "the rated items leak: mean AUC {auc_mean}");
}

/// The coordinator's best decoding of a masked input (self-mask removed) is uniform whatever
/// the update: the words of a device that rated 100 items and of one that rated 5 pass a
/// two-sample chi-square test on their low byte and on their top 4 bits, while the same test
/// on the two devices' unmasked encodings tells them apart at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_inputs_of_different_updates_are_indistinguishable() {
    assert!((chi2_sf(30.578, 15.0) - 0.01).abs() < 2e-4, "χ² tail self-check");
    assert!((chi2_sf(7.261, 15.0) - 0.95).abs() < 2e-3, "χ² tail self-check");
    let users = Arc::new(users());
    let (many, few) = (1u64, N_DEVICES as u64);
    assert_eq!((users[0].len(), users[N_DEVICES - 1].len()), (PER_USER, FEW));
    let secure = round(true, &users).await;
    let view = secure_view(&secure);
    let masked = [many, few].map(|id| view.without_self_mask(id).expect("the self-mask seed is rebuilt"));
    // The unmasked encodings of the same two updates, on the round's grid and ring.
    let mut rng = danger::seeded_rng(7);
    let clear = [many, few].map(|id| {
        let t = truth(&users[id as usize - 1]);
        to_ring(&encode(&t.clipped, &view.grid, None, &mut rng).expect("encodes"), view.bits).expect("fits")
    });
    let bits = view.bits;
    for (what, shift, width) in [("low byte", 0, 8), ("top 4 bits", bits - 4, 4)] {
        let p_masked =
            chi2_two_sample(&histogram(&masked[0], shift, width), &histogram(&masked[1], shift, width));
        let p_clear =
            chi2_two_sample(&histogram(&clear[0], shift, width), &histogram(&clear[1], shift, width));
        println!(
            "{what} of {} words per device (bits = {bits}): p = {p_masked:.4} masked, {p_clear:.3e} unmasked",
            masked[0].len()
        );
        assert!(p_masked > 1e-4, "{what}: masked inputs distinguishable, p = {p_masked}");
        assert!(p_clear < 1e-9, "{what}: the test has no power, p = {p_clear}");
    }
}

/// No message a device sends in a secure round (keys, sealed shares, masked words, revealed
/// shares) contains 8 consecutive bytes of its plain update's `f32` encoding, or of its
/// fixed-point encoding (two consecutive ring words, any rounding, or one coordinate as
/// `i64`); the same search finds every such window of the `f32` encoding in its plain upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_carries_the_update_in_the_clear() {
    let users = Arc::new(users());
    let target = 1u64;
    let t = truth(&users[target as usize - 1]);
    // 8-byte windows of the update that are not all zero bytes.
    let f32_bytes: Vec<u8> = t.dense.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f32_windows: Vec<u64> = (0..t.dense.len() - 1)
        .map(|c| u64::from_le_bytes(f32_bytes[4 * c..4 * c + 8].try_into().expect("8 bytes")))
        .filter(|&w| w != 0)
        .collect();
    let windows_of = |messages: &[&Request]| -> HashSet<u64> {
        messages
            .iter()
            .flat_map(|r| {
                let b = payload_bytes(r);
                (0..b.len().saturating_sub(7))
                    .map(|i| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes")))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let from = |requests: &[(u64, Request)]| -> Vec<Request> {
        requests.iter().filter(|(d, _)| *d == target).map(|(_, r)| r.clone()).collect()
    };

    // Power: the plain upload holds every window.
    let plain = from(&round(false, &users).await);
    let plain_windows = windows_of(&plain.iter().collect::<Vec<_>>());
    let found = f32_windows.iter().filter(|w| plain_windows.contains(w)).count();
    assert_eq!(found, f32_windows.len(), "the search misses windows of the plain upload");

    let all = round(true, &users).await;
    let view = secure_view(&all);
    let secure = from(&all);
    let sent = windows_of(&secure.iter().collect::<Vec<_>>());
    let found = f32_windows.iter().filter(|w| sent.contains(w)).count();
    assert_eq!(found, 0, "{found} windows of the f32 update in the secure messages");
    // The fixed-point encoding: each coordinate is x/step rounded down or up.
    let step = view.grid.step();
    let roundings: Vec<[i64; 2]> = t
        .dense
        .iter()
        .map(|&x| {
            let v = f64::from(x) / step;
            [v.floor() as i64, v.ceil() as i64]
        })
        .collect();
    let mut int_windows = Vec::new();
    for c in 0..roundings.len() - 1 {
        for a in roundings[c] {
            for b in roundings[c + 1] {
                let words = to_ring(&[a, b], view.bits).expect("fits");
                if view.bits <= 32 {
                    int_windows.push(words[0] | (words[1] << 32));
                } else {
                    int_windows.push(words[0]);
                }
            }
            int_windows.push(a as u64);
        }
    }
    int_windows.retain(|&w| w != 0);
    let found = int_windows.iter().filter(|w| sent.contains(w)).count();
    println!(
        "{} f32 windows: all in the plain upload, 0 in the secure messages; {} fixed-point windows: {found} found",
        f32_windows.len(),
        int_windows.len()
    );
    assert_eq!(found, 0, "{found} windows of the fixed-point encoding in the secure messages");
}
