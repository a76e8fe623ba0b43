//! On-device inference: top-k against brute force, exclusions and filters, the hybrid blend, cold start, exact explanations, content vectors and argument checks.

use fedrec_client::content::{ContentError, ContentIndex, MAX_TAG_LEN, MAX_TAGS_PER_ITEM};
use fedrec_client::recommend::{
    EXPLAIN_TOP, RecommendError, RecommendOptions, Recommendation, Source, explain, recommend, segment,
};
use fedrec_shared::danger::seeded_rng;
use fedrec_shared::linalg::dot;
use fedrec_shared::train::reconstruct;
use fedrec_shared::{GlobalModel, ModelShape, Objective, Rating, RoundModel, TrainParams, UserState};
use proptest::prelude::*;
use rand::Rng;
use rand::seq::index::sample;

const TAGS: [&str; 6] = ["drama", "comedy", "action", "sci-fi", "noir", "romance"];

/// A random model; `with_bias` false gives the all-zero biases of an implicit-feedback model.
fn model(shape: ModelShape, seed: u64, with_bias: bool) -> RoundModel {
    let mut rng = seeded_rng(seed);
    let mut normal = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
    let factors = normal(shape.n_items * shape.dim);
    let bias = if with_bias { normal(shape.n_items) } else { vec![0.0; shape.n_items] };
    let centroids = normal(shape.n_segments * shape.dim);
    let m = GlobalModel::from_flat(shape, factors, bias, if with_bias { 3.5 } else { 0.0 }, centroids)
        .expect("valid random model");
    RoundModel::new(1, m)
}

fn user(dim: usize, seed: u64) -> UserState {
    let mut rng = seeded_rng(seed);
    UserState { factors: (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect(), bias: 0.3 }
}

/// `n` distinct items with values 1–5.
fn ratings(n_items: usize, n: usize, seed: u64) -> Vec<Rating> {
    let mut rng = seeded_rng(seed);
    sample(&mut rng, n_items, n.min(n_items))
        .into_iter()
        .map(|i| Rating { item: i as u32, value: f32::from(rng.random_range(1u8..=5)) })
        .collect()
}

/// Every item gets one to three of [`TAGS`]; some get none.
fn content(n_items: usize, seed: u64) -> ContentIndex {
    let mut rng = seeded_rng(seed);
    let mut c = ContentIndex::new(n_items);
    for item in 0..n_items as u32 {
        let n = rng.random_range(0..=3);
        let tags: Vec<&str> = (0..n).map(|_| TAGS[rng.random_range(0..TAGS.len())]).collect();
        c.set_tags(item, &tags).expect("valid tags");
    }
    c
}

fn opts(blend: f32) -> RecommendOptions {
    RecommendOptions { content_blend: blend, ..RecommendOptions::default() }
}

/// The reference: score every allowed item, sort by score descending then item id, take `k`.
fn brute_force(
    n_items: usize,
    k: usize,
    allowed: impl Fn(u32) -> bool,
    score: impl Fn(u32) -> f32,
) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> =
        (0..n_items as u32).filter(|&i| allowed(i)).map(|i| (i, score(i))).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn pairs(recs: &[Recommendation]) -> Vec<(u32, f32)> {
    recs.iter().map(|r| (r.item, r.score)).collect()
}

fn items(recs: &[Recommendation]) -> Vec<u32> {
    recs.iter().map(|r| r.item).collect()
}

/// Content score of every item as the hybrid defines it: cosine with the rating-weighted profile.
fn content_score(c: &ContentIndex, consumed: &[Rating], item: u32) -> f32 {
    let v = c.vectors();
    let mut profile = vec![0.0f32; c.n_tags()];
    for r in consumed {
        for &(t, x) in v.row(r.item as usize) {
            profile[t as usize] += r.value * x;
        }
    }
    let norm = profile.iter().map(|p| p * p).sum::<f32>().sqrt();
    v.dot_dense(item as usize, &profile) / norm
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn consumed_items_are_never_recommended(
        n_items in 1usize..80,
        dim in 1usize..6,
        n_segments in 1usize..4,
        n_consumed in 0usize..40,
        k in 0usize..100,
        seed in any::<u64>(),
        has_user in any::<bool>(),
        blend in prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..=1.0],
        with_content in any::<bool>(),
    ) {
        let shape = ModelShape { n_items, dim, n_segments };
        let m = model(shape, seed, seed % 2 == 0);
        let consumed = ratings(n_items, n_consumed, seed ^ 1);
        let u = user(dim, seed ^ 2);
        let c = content(n_items, seed ^ 3);
        let recs = recommend(&m, has_user.then_some(&u), &consumed, with_content.then_some(&c), k, &opts(blend))
            .expect("valid request");
        for r in &recs {
            prop_assert!(consumed.iter().all(|c| c.item != r.item), "consumed item recommended");
        }
        let mut unique = items(&recs);
        unique.sort_unstable();
        unique.dedup();
        prop_assert_eq!(unique.len(), recs.len(), "an item recommended twice");
        prop_assert_eq!(recs.len(), k.min(n_items - consumed.len()));
    }

    #[test]
    fn top_k_equals_a_full_sort(
        n_items in 2usize..120,
        dim in 1usize..8,
        k in 1usize..130,
        seed in any::<u64>(),
    ) {
        let shape = ModelShape { n_items, dim, n_segments: 2 };
        let m = model(shape, seed, true);
        // With no consumed items the stored vector counts as stale (cold start), tested below.
        let consumed = ratings(n_items, (n_items / 3).max(1), seed ^ 1);
        let u = user(dim, seed ^ 2);
        let recs = recommend(&m, Some(&u), &consumed, None, k, &opts(0.0)).expect("valid request");
        let expected =
            brute_force(n_items, k, |i| consumed.iter().all(|r| r.item != i), |i| u.score(&m, i as usize));
        prop_assert_eq!(pairs(&recs), expected);
        prop_assert!(recs.iter().all(|r| r.source == Source::Collaborative));
    }
}

#[test]
fn ties_are_broken_by_item_id() {
    let shape = ModelShape { n_items: 6, dim: 2, n_segments: 1 };
    // Items 1, 3 and 4 have identical rows, so identical scores.
    let factors = vec![0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, -1.0, 0.0];
    let m = GlobalModel::from_flat(shape, factors, vec![0.0; 6], 0.0, vec![0.0, 0.0]).expect("valid");
    let m = RoundModel::new(1, m);
    let u = UserState { factors: vec![1.0, 1.0], bias: 0.0 };
    let consumed = [Rating { item: 0, value: 1.0 }];
    let recs = recommend(&m, Some(&u), &consumed, None, 4, &opts(0.0)).expect("valid request");
    assert_eq!(items(&recs), vec![1, 3, 4, 2]);
}

#[test]
fn filters_are_respected() {
    let shape = ModelShape { n_items: 50, dim: 4, n_segments: 2 };
    let m = model(shape, 7, true);
    let u = user(4, 8);
    let consumed = ratings(50, 10, 9);
    let include: Vec<u32> = (0..50).step_by(2).chain([4, 4, 6]).collect();
    let exclude = vec![10, 12, 13];
    let o = RecommendOptions { include_only: Some(include.clone()), exclude: exclude.clone(), ..opts(0.0) };
    let recs = recommend(&m, Some(&u), &consumed, None, 50, &o).expect("valid request");
    let allowed =
        |i: u32| include.contains(&i) && !exclude.contains(&i) && consumed.iter().all(|r| r.item != i);
    assert_eq!(pairs(&recs), brute_force(50, 50, allowed, |i| u.score(&m, i as usize)));

    // The same filters on the content side of the hybrid (scored item by item for a list).
    let c = content(50, 10);
    let o = RecommendOptions { content_blend: 1.0, ..o };
    let recs = recommend(&m, Some(&u), &consumed, Some(&c), 50, &o).expect("valid request");
    assert_eq!(items(&recs), items_of(&brute_force(50, 50, allowed, |i| content_score(&c, &consumed, i))));

    // Keeping consumed items in, on request.
    let keep = RecommendOptions { exclude_consumed: false, ..opts(0.0) };
    let all = recommend(&m, Some(&u), &consumed, None, 50, &keep).expect("valid request");
    assert_eq!(pairs(&all), brute_force(50, 50, |_| true, |i| u.score(&m, i as usize)));
}

#[test]
fn k_zero_and_k_beyond_the_catalogue() {
    let m = model(ModelShape { n_items: 30, dim: 3, n_segments: 2 }, 1, true);
    let u = user(3, 2);
    let consumed = ratings(30, 5, 3);
    assert!(recommend(&m, Some(&u), &consumed, None, 0, &opts(0.0)).expect("valid").is_empty());
    assert_eq!(recommend(&m, Some(&u), &consumed, None, 1000, &opts(0.0)).expect("valid").len(), 25);
}

#[test]
fn hybrid_blend_zero_is_collaborative_and_one_is_content() {
    let n = 200;
    let m = model(ModelShape { n_items: n, dim: 8, n_segments: 3 }, 11, true);
    let u = user(8, 12);
    let consumed = ratings(n, 15, 13);
    let c = content(n, 14);
    let not_consumed = |i: u32| consumed.iter().all(|r| r.item != i);

    let cf_only = recommend(&m, Some(&u), &consumed, None, 20, &opts(0.0)).expect("valid");
    let blend0 = recommend(&m, Some(&u), &consumed, Some(&c), 20, &opts(0.0)).expect("valid");
    assert_eq!(blend0, cf_only);
    assert!(blend0.iter().all(|r| r.source == Source::Collaborative));

    let blend1 = recommend(&m, Some(&u), &consumed, Some(&c), 20, &opts(1.0)).expect("valid");
    assert!(blend1.iter().all(|r| r.source == Source::Hybrid));
    let expected = brute_force(n, 20, not_consumed, |i| content_score(&c, &consumed, i));
    assert_eq!(items(&blend1), items_of(&expected));
    for (got, want) in blend1.iter().zip(&expected) {
        assert!((got.score - want.1).abs() < 1e-5, "{} vs {}", got.score, want.1);
    }

    // In between, the score is the blend of z-scores over the candidates.
    let beta = 0.4f32;
    let mixed = recommend(&m, Some(&u), &consumed, Some(&c), 20, &opts(beta)).expect("valid");
    let cands: Vec<u32> = (0..n as u32).filter(|&i| not_consumed(i)).collect();
    let z = |xs: Vec<f32>| {
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32).sqrt();
        xs.into_iter().map(move |x| (x - mean) / sd).collect::<Vec<_>>()
    };
    let zc = z(cands.iter().map(|&i| u.score(&m, i as usize)).collect());
    let zt = z(cands.iter().map(|&i| content_score(&c, &consumed, i)).collect());
    for r in &mixed {
        let pos = cands.iter().position(|&i| i == r.item).expect("a candidate");
        let want = (1.0 - beta) * zc[pos] + beta * zt[pos];
        assert!((r.score - want).abs() < 1e-3, "{} vs {want}", r.score);
    }
    assert!(mixed.windows(2).all(|w| w[0].score >= w[1].score));
}

fn items_of(pairs: &[(u32, f32)]) -> Vec<u32> {
    pairs.iter().map(|p| p.0).collect()
}

#[test]
fn cold_start_uses_the_segment_then_popularity() {
    let n = 40;
    let m = model(ModelShape { n_items: n, dim: 4, n_segments: 3 }, 21, true);
    let stale = user(4, 22);

    // No signal at all: popularity, i.e. the item biases.
    let pop = recommend(&m, None, &[], None, 10, &opts(0.0)).expect("valid");
    assert!(pop.iter().all(|r| r.source == Source::Popularity));
    assert_eq!(items(&pop), items_of(&brute_force(n, 10, |_| true, |i| m.model.item_bias[i as usize])));

    // A user vector but no consumed items: the centroid of its segment.
    let seg = segment(&m, &stale).expect("the model has segments");
    let d = 4;
    let centroid = UserState {
        factors: m.model.centroids_slice()[seg.id as usize * d..(seg.id as usize + 1) * d].to_vec(),
        bias: 0.0,
    };
    let by_segment = recommend(&m, Some(&stale), &[], None, 10, &opts(0.0)).expect("valid");
    assert!(by_segment.iter().all(|r| r.source == Source::Segment));
    assert_eq!(pairs(&by_segment), brute_force(n, 10, |_| true, |i| centroid.score(&m, i as usize)));

    // An all-zero user vector carries no signal.
    let zero = UserState { factors: vec![0.0; 4], bias: 0.0 };
    assert_eq!(recommend(&m, Some(&zero), &[], None, 10, &opts(0.0)).expect("valid"), pop);

    // Without a vector, consumed items pick the segment whose centroid predicts them highest.
    let factors = vec![1.0, 0.0, 0.9, 0.1, -1.0, 0.0, 0.0, 1.0];
    let centroids = vec![-1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
    let shape = ModelShape { n_items: 4, dim: 2, n_segments: 3 };
    let small =
        RoundModel::new(1, GlobalModel::from_flat(shape, factors, vec![0.0; 4], 0.0, centroids).expect("ok"));
    let recs =
        recommend(&small, None, &[Rating { item: 0, value: 2.0 }], None, 3, &opts(0.0)).expect("valid");
    assert!(recs.iter().all(|r| r.source == Source::Segment));
    assert_eq!(items(&recs), vec![1, 3, 2], "segment 1 (centroid [1, 0]) ranks item 1 first");
}

#[test]
fn popularity_without_biases_ranks_by_factor_norm() {
    let n = 60;
    let m = model(ModelShape { n_items: n, dim: 5, n_segments: 2 }, 31, false);
    let recs = recommend(&m, None, &[], None, 10, &opts(0.0)).expect("valid");
    assert!(recs.iter().all(|r| r.source == Source::Popularity));
    let norm = |i: u32| dot(m.model.item_row(i as usize), m.model.item_row(i as usize)).sqrt();
    assert_eq!(items(&recs), items_of(&brute_force(n, 10, |_| true, norm)));
}

#[test]
fn segment_reports_the_nearest_centroid_and_its_distance() {
    let factors = vec![0.0; 4];
    let centroids = vec![0.0, 0.0, 3.0, 4.0];
    let shape = ModelShape { n_items: 2, dim: 2, n_segments: 2 };
    let m =
        RoundModel::new(1, GlobalModel::from_flat(shape, factors, vec![0.0; 2], 0.0, centroids).expect("ok"));
    let s = segment(&m, &UserState { factors: vec![3.0, 3.0], bias: 0.0 }).expect("segments");
    assert_eq!(s.id, 1);
    assert!((s.distance - 1.0).abs() < 1e-6);
    assert_eq!(segment(&m, &UserState { factors: vec![1.0], bias: 0.0 }), None, "wrong dimension");
}

fn params(objective: Objective) -> TrainParams {
    TrainParams {
        objective,
        l2_user: 0.1,
        l2_user_bias: 0.1,
        l2_item: 0.01,
        l2_item_bias: 0.01,
        user_support_exponent: 0.0,
    }
}

#[test]
fn explain_contributions_sum_to_the_user_part_of_the_score() {
    let n = 300;
    for (objective, with_bias) in [(Objective::Explicit, true), (Objective::Implicit { alpha: 5.0 }, false)] {
        let m = model(ModelShape { n_items: n, dim: 16, n_segments: 4 }, 41, with_bias);
        let p = params(objective);
        let consumed = ratings(n, 25, 42);
        let u = reconstruct(&m, &consumed, &p).expect("solvable");
        let c = content(n, 43);
        for item in [0u32, 17, 299, consumed[3].item] {
            let e = explain(&m, &p, Some(&u), &consumed, Some(&c), item).expect("valid");
            let user_part = dot(&u.factors, m.model.item_row(item as usize)) + u.bias;
            let tol = 1e-3 * (1.0 + user_part.abs());
            assert!(
                (e.collaborative - user_part).abs() < tol,
                "{objective:?}: {} vs {user_part}",
                e.collaborative
            );
            assert_eq!(e.item, item);
            assert!(e.because.len() == EXPLAIN_TOP);
            assert!(e.because.windows(2).all(|w| w[0].1 >= w[1].1));
            assert!(e.because.iter().all(|(j, _)| consumed.iter().any(|r| r.item == *j)));
            assert_eq!(e.segment, segment(&m, &u));
            let sim = e.content_similarity.expect("a content index was given");
            assert!((sim - content_score(&c, &consumed, item)).abs() < 1e-5);
        }
        // Without a user vector the segment comes from the vector reconstructed from the ratings.
        let e = explain(&m, &p, None, &consumed, None, 5).expect("valid");
        assert_eq!(e.segment, segment(&m, &u));
        assert_eq!(e.content_similarity, None);
    }
}

#[test]
fn explain_ranks_the_consumed_item_that_drives_the_score_first() {
    // Item 2 is item 0's twin; item 1 is orthogonal. Item 0 must explain item 2.
    let shape = ModelShape { n_items: 3, dim: 2, n_segments: 1 };
    let factors = vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0];
    let m = RoundModel::new(
        1,
        GlobalModel::from_flat(shape, factors, vec![0.0; 3], 0.0, vec![0.0; 2]).expect("ok"),
    );
    let consumed = [Rating { item: 0, value: 1.0 }, Rating { item: 1, value: 1.0 }];
    let e =
        explain(&m, &params(Objective::Implicit { alpha: 1.0 }), None, &consumed, None, 2).expect("valid");
    assert_eq!(e.because[0].0, 0);
    assert!(e.because[0].1 > 0.1 && e.because[1].1.abs() < 1e-6, "{:?}", e.because);
}

#[test]
fn invalid_arguments_are_errors() {
    let n = 20;
    let m = model(ModelShape { n_items: n, dim: 3, n_segments: 2 }, 51, true);
    let u = user(3, 52);
    let consumed = ratings(n, 4, 53);
    let rec = |user: Option<&UserState>, consumed: &[Rating], o: &RecommendOptions| {
        recommend(&m, user, consumed, None, 5, o).expect_err("must be refused")
    };
    for blend in [f32::NAN, -0.1, 1.1, f32::INFINITY] {
        assert_eq!(rec(Some(&u), &consumed, &opts(blend)), RecommendError::InvalidBlend);
    }
    let out_of_range = [Rating { item: n as u32, value: 1.0 }];
    assert!(matches!(
        rec(None, &out_of_range, &opts(0.0)),
        RecommendError::ItemOutOfRange { what: "consumed", .. }
    ));
    let nan = [Rating { item: 1, value: f32::NAN }];
    assert!(matches!(rec(None, &nan, &opts(0.0)), RecommendError::NonFinite(_)));
    let include = RecommendOptions { include_only: Some(vec![1, 99]), ..opts(0.0) };
    assert!(matches!(rec(None, &[], &include), RecommendError::ItemOutOfRange { what: "include_only", .. }));
    let exclude = RecommendOptions { exclude: vec![20], ..opts(0.0) };
    assert!(matches!(rec(None, &[], &exclude), RecommendError::ItemOutOfRange { what: "exclude", .. }));
    let short = UserState { factors: vec![1.0], bias: 0.0 };
    assert!(matches!(rec(Some(&short), &[], &opts(0.0)), RecommendError::DimensionMismatch { .. }));
    let c = ContentIndex::new(n + 1);
    assert!(matches!(
        recommend(&m, None, &[], Some(&c), 5, &opts(0.5)),
        Err(RecommendError::CatalogueMismatch { .. })
    ));

    let p = params(Objective::Explicit);
    assert!(matches!(
        explain(&m, &p, Some(&u), &consumed, None, n as u32),
        Err(RecommendError::ItemOutOfRange { what: "item", .. })
    ));
    let bad = TrainParams { l2_user: f32::NAN, ..p };
    assert!(matches!(explain(&m, &bad, Some(&u), &consumed, None, 0), Err(RecommendError::Params(_))));
    // Error messages carry no item ids.
    let msg = rec(None, &[Rating { item: 12_345, value: 1.0 }], &opts(0.0)).to_string();
    assert!(!msg.contains("12345"), "{msg}");
}

#[test]
fn content_vectors_are_l2_normalised_tf_idf() {
    let mut c = ContentIndex::new(4);
    c.set_tags(0, &["Drama", " noir ", "drama"]).expect("valid");
    c.set_tags(1, &["drama"]).expect("valid");
    c.set_tags(2, &["comedy"]).expect("valid");
    assert_eq!(c.tags(0).expect("in range"), vec!["drama", "noir"]);
    // N = 3 tagged items; df(drama) = 2, df(noir) = 1.
    let idf = |df: f32| (4.0f32 / (1.0 + df)).ln() + 1.0;
    let (drama, noir) = (idf(2.0), idf(1.0));
    let norm = (drama * drama + noir * noir).sqrt();
    let row = c.vectors().row(0);
    assert_eq!(row.len(), 2);
    assert!((row[0].1 - drama / norm).abs() < 1e-6 && (row[1].1 - noir / norm).abs() < 1e-6, "{row:?}");
    assert!((c.vectors().cosine(0, 1) - drama / norm).abs() < 1e-6);
    assert_eq!(c.vectors().cosine(0, 2), 0.0);
    assert!(c.vectors().row(3).is_empty());

    // Replacing tags updates the weights: now nobody shares "drama" with item 1.
    c.set_tags(0, &["noir"]).expect("valid");
    assert_eq!(c.vectors().cosine(0, 1), 0.0);
    assert!((c.vectors().cosine(0, 0) - 1.0).abs() < 1e-6);
    c.set_tags(1, &[]).expect("clearing is allowed");
    assert!(c.vectors().row(1).is_empty());
}

#[test]
fn content_rejects_bad_tags_and_keeps_the_old_ones() {
    let mut c = ContentIndex::new(2);
    c.set_tags(0, &["kept"]).expect("valid");
    let long = "x".repeat(MAX_TAG_LEN + 1);
    let many: Vec<&str> = (0..=MAX_TAGS_PER_ITEM).map(|_| "t").collect();
    assert_eq!(c.set_tags(2, &["a"]), Err(ContentError::ItemOutOfRange { n_items: 2 }));
    assert_eq!(c.set_tags(0, &[long.as_str()]), Err(ContentError::TagTooLong { max: MAX_TAG_LEN }));
    assert_eq!(c.set_tags(0, &many), Err(ContentError::TooManyTags { max: MAX_TAGS_PER_ITEM }));
    assert_eq!(c.set_tags(0, &["ok", "  "]), Err(ContentError::EmptyTag));
    assert_eq!(c.tags(0).expect("in range"), vec!["kept"]);
    assert_eq!(c.n_tags(), 1, "a refused call adds nothing to the vocabulary");
}
