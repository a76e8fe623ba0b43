//! The device's learning step against independent oracles: reconstruction is the optimum of the local loss, uploads are its gradient, and the k-means tail holds the user.

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::train::{LocalDataError, local_loss, local_update, reconstruct, validate_ratings};
use fedrec_shared::update::UpdateVector;
use fedrec_shared::{
    GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams, UserState,
};
use rand::Rng;
use rand::seq::index::sample;

const SHAPE: ModelShape = ModelShape { n_items: 30, dim: 4, n_segments: 3 };

const EXPLICIT: TrainParams = TrainParams {
    objective: Objective::Explicit,
    l2_user: 0.1,
    l2_user_bias: 0.05,
    l2_item: 0.02,
    l2_item_bias: 0.03,
    user_support_exponent: 0.0,
};

const IMPLICIT: TrainParams = TrainParams {
    objective: Objective::Implicit { alpha: 2.0 },
    l2_user: 0.1,
    l2_user_bias: 0.0,
    l2_item: 0.02,
    l2_item_bias: 0.0,
    user_support_exponent: 0.0,
};

/// A random model with non-trivial biases, mean and centroids.
fn random_model(seed: u64) -> GlobalModel {
    let mut rng = seeded_rng(seed);
    let init = ModelInit { factor_std: 0.5, global_mean: 0.0, centroid_scale: 0.5 };
    let mut m = GlobalModel::init(SHAPE, init, &mut rng).expect("valid shape");
    m.item_bias.mapv_inplace(|_| rng.random_range(-0.5..0.5));
    m.global_mean = rng.random_range(2.5..3.5);
    m
}

/// `n` ratings of distinct random items; star-like values for explicit data, positive
/// strengths for implicit data.
fn random_ratings(seed: u64, n: usize, params: &TrainParams) -> Vec<Rating> {
    let mut rng = seeded_rng(seed);
    sample(&mut rng, SHAPE.n_items, n)
        .into_iter()
        .map(|i| {
            let value = match params.objective {
                Objective::Explicit => rng.random_range(1.0..5.0),
                Objective::Implicit { .. } => rng.random_range(0.5..4.0),
            };
            Rating { item: i as u32, value }
        })
        .collect()
}

fn random_user(seed: u64, params: &TrainParams) -> UserState {
    let mut rng = seeded_rng(seed);
    let factors = (0..SHAPE.dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let bias = match params.objective {
        Objective::Explicit => rng.random_range(-0.5..0.5),
        Objective::Implicit { .. } => 0.0,
    };
    UserState { factors, bias }
}

fn row_f64(m: &GlobalModel, i: usize) -> Vec<f64> {
    m.item_row(i).iter().map(|&x| f64::from(x)).collect()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The local loss of the module documentation, written out independently and entirely in `f64`.
fn loss_f64(m: &GlobalModel, ratings: &[Rating], u: &[f64], bu: f64, p: &TrainParams) -> f64 {
    let mut loss = 0.5 * ridge_f64(p, ratings) * dot64(u, u);
    match p.objective {
        Objective::Explicit => {
            loss += 0.5 * f64::from(p.l2_user_bias) * bu * bu;
            for r in ratings {
                let i = r.item as usize;
                let v = row_f64(m, i);
                let bi = f64::from(m.item_bias[i]);
                let e = f64::from(r.value) - f64::from(m.global_mean) - bu - bi - dot64(u, &v);
                loss += 0.5 * e * e + 0.5 * f64::from(p.l2_item) * dot64(&v, &v);
                loss += 0.5 * f64::from(p.l2_item_bias) * bi * bi;
            }
        }
        Objective::Implicit { alpha } => {
            for j in 0..m.item_factors.nrows() {
                let v = row_f64(m, j);
                let s = dot64(u, &v);
                match ratings.iter().find(|r| r.item as usize == j) {
                    None => loss += 0.5 * s * s,
                    Some(r) => {
                        let c = 1.0 + f64::from(alpha) * f64::from(r.value);
                        loss += 0.5 * c * (1.0 - s).powi(2) + 0.5 * f64::from(p.l2_item) * dot64(&v, &v);
                    }
                }
            }
        }
    }
    loss
}

/// Gradient of [`loss_f64`] with respect to `(u, b_u)`, and a bound on the largest
/// eigenvalue of its (constant) Hessian.
fn user_grad_f64(
    m: &GlobalModel,
    ratings: &[Rating],
    u: &[f64],
    bu: f64,
    p: &TrainParams,
) -> (Vec<f64>, f64) {
    let mut g: Vec<f64> = u.iter().map(|&x| ridge_f64(p, ratings) * x).collect();
    let mut gb = 0.0;
    match p.objective {
        Objective::Explicit => {
            gb = f64::from(p.l2_user_bias) * bu;
            for r in ratings {
                let i = r.item as usize;
                let v = row_f64(m, i);
                let e = f64::from(r.value)
                    - f64::from(m.global_mean)
                    - bu
                    - f64::from(m.item_bias[i])
                    - dot64(u, &v);
                for (gk, vk) in g.iter_mut().zip(&v) {
                    *gk -= e * vk;
                }
                gb -= e;
            }
        }
        Objective::Implicit { alpha } => {
            for j in 0..m.item_factors.nrows() {
                let v = row_f64(m, j);
                let (c, target) = match ratings.iter().find(|r| r.item as usize == j) {
                    None => (1.0, 0.0),
                    Some(r) => (1.0 + f64::from(alpha) * f64::from(r.value), 1.0),
                };
                let s = dot64(u, &v);
                for (gk, vk) in g.iter_mut().zip(&v) {
                    *gk += c * (s - target) * vk;
                }
            }
        }
    }
    (g, gb)
}

fn hessian_bound(m: &GlobalModel, ratings: &[Rating], p: &TrainParams) -> f64 {
    let mut bound = ridge_f64(p, ratings) + f64::from(p.l2_user_bias);
    match p.objective {
        Objective::Explicit => {
            for r in ratings {
                let v = row_f64(m, r.item as usize);
                bound += dot64(&v, &v) + 1.0;
            }
        }
        Objective::Implicit { alpha } => {
            for j in 0..m.item_factors.nrows() {
                let v = row_f64(m, j);
                let c = ratings
                    .iter()
                    .find(|r| r.item as usize == j)
                    .map_or(1.0, |r| 1.0 + f64::from(alpha) * f64::from(r.value));
                bound += c * dot64(&v, &v);
            }
        }
    }
    bound
}

/// Minimises [`loss_f64`] over the user part by plain gradient descent with step `1/L`.
fn gradient_descent(m: &GlobalModel, ratings: &[Rating], p: &TrainParams) -> (Vec<f64>, f64) {
    let with_bias = matches!(p.objective, Objective::Explicit);
    let step = 1.0 / hessian_bound(m, ratings, p);
    let mut u = vec![0.0; m.item_factors.ncols()];
    let mut bu = 0.0;
    for _ in 0..500_000 {
        let (g, gb) = user_grad_f64(m, ratings, &u, bu, p);
        let gb = if with_bias { gb } else { 0.0 };
        if (dot64(&g, &g) + gb * gb).sqrt() < 1e-11 {
            return (u, bu);
        }
        for (x, gk) in u.iter_mut().zip(&g) {
            *x -= step * gk;
        }
        bu -= step * gb;
    }
    panic!("gradient descent did not converge");
}

/// The user ridge, written from its definition: `λ_u · max(n, 1)^ν` for `n` interactions.
fn ridge_f64(p: &TrainParams, ratings: &[Rating]) -> f64 {
    f64::from(p.l2_user) * (ratings.len().max(1) as f64).powf(f64::from(p.user_support_exponent))
}

/// Both objectives, each with the same ridge for every user and with one scaled to the
/// user's support (`ν = 0.5`, and ALS-WR's `ν = 1` with a smaller `λ_u`).
fn both() -> [TrainParams; 6] {
    let scaled =
        |p: TrainParams, nu: f32, l2: f32| TrainParams { user_support_exponent: nu, l2_user: l2, ..p };
    [
        EXPLICIT,
        IMPLICIT,
        scaled(EXPLICIT, 0.5, 0.05),
        scaled(IMPLICIT, 0.5, 0.05),
        scaled(EXPLICIT, 1.0, 0.02),
        scaled(IMPLICIT, 1.0, 0.02),
    ]
}

/// The support exponent is the ridge's only dependence on the user: with `ν = 1` the solve is
/// the one of `ν = 0` with `λ_u · n`, and exponents outside `[0, 2]` (or NaN) are refused.
#[test]
fn the_support_scaled_ridge_is_the_plain_ridge_times_the_support() {
    let model = random_model(3);
    let rm = RoundModel::new(0, model);
    for base in [EXPLICIT, IMPLICIT] {
        let ratings = random_ratings(77, 9, &base);
        let scaled = TrainParams { user_support_exponent: 1.0, ..base };
        let plain = TrainParams { l2_user: base.l2_user * 9.0, ..base };
        assert!((scaled.user_ridge(9) - plain.user_ridge(9)).abs() < 1e-6 * plain.user_ridge(9));
        assert_eq!(ratings.len(), 9);
        let a = reconstruct(&rm, &ratings, &scaled).expect("definite");
        let b = reconstruct(&rm, &ratings, &plain).expect("definite");
        for (x, y) in a.factors.iter().zip(&b.factors) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        assert_ne!(a, reconstruct(&rm, &ratings, &base).expect("definite"), "the exponent changes the solve");
        // A user with no interactions gets λ_u (n counts as 1).
        assert_eq!(scaled.user_ridge(0), f64::from(base.l2_user));
        for bad in [-0.1, 2.5, f32::NAN] {
            let p = TrainParams { user_support_exponent: bad, ..base };
            let err = p.validate().expect_err("out of range");
            assert!(err.to_string().contains("user_support_exponent"), "{err}");
        }
    }
}

#[test]
fn oracle_loss_is_the_library_loss() {
    for params in both() {
        for seed in 0..5 {
            let model = random_model(seed);
            let rm = RoundModel::new(0, model.clone());
            let ratings = random_ratings(100 + seed, 9, &params);
            let user = random_user(200 + seed, &params);
            let u: Vec<f64> = user.factors.iter().map(|&x| f64::from(x)).collect();
            let want = loss_f64(&model, &ratings, &u, f64::from(user.bias), &params);
            let got = local_loss(&rm, &ratings, &user, &params);
            assert!((got - want).abs() <= 1e-5 * want.abs(), "{:?}: {got} vs {want}", params.objective);
        }
    }
}

#[test]
fn reconstruction_is_the_minimiser_of_the_local_loss() {
    let mut rng = seeded_rng(7);
    for params in both() {
        for seed in 0..4 {
            for n_rated in [0, 1, 7, SHAPE.n_items] {
                let model = random_model(seed);
                let rm = RoundModel::new(0, model.clone());
                let ratings = random_ratings(50 + seed, n_rated, &params);
                let user = reconstruct(&rm, &ratings, &params).expect("ridge makes the system definite");
                let (u_gd, b_gd) = gradient_descent(&model, &ratings, &params);
                for (k, (&got, want)) in user.factors.iter().zip(&u_gd).enumerate() {
                    assert!(
                        (f64::from(got) - want).abs() < 1e-4,
                        "{:?}, {n_rated} rated, u[{k}]: closed form {got}, descent {want}",
                        params.objective
                    );
                }
                assert!((f64::from(user.bias) - b_gd).abs() < 1e-4, "bias {} vs {b_gd}", user.bias);
                if matches!(params.objective, Objective::Implicit { .. }) {
                    assert_eq!(user.bias, 0.0);
                }

                // No nearby user state does better.
                let best = local_loss(&rm, &ratings, &user, &params);
                for _ in 0..20 {
                    let mut near = user.clone();
                    for x in &mut near.factors {
                        *x += rng.random_range(-0.05..0.05);
                    }
                    if matches!(params.objective, Objective::Explicit) {
                        near.bias += rng.random_range(-0.05..0.05);
                    }
                    let l = local_loss(&rm, &ratings, &near, &params);
                    assert!(l >= best, "{:?}: perturbed loss {l} < reconstructed {best}", params.objective);
                }
            }
        }
    }
}

/// Sets one model parameter; the index is in the layout's order (factors, biases, mean).
fn set_param(m: &mut GlobalModel, idx: usize, x: f32) {
    let layout = m.shape().layout();
    let d = m.shape().dim;
    if layout.item_factors().contains(&idx) {
        m.item_factors[[idx / d, idx % d]] = x;
    } else if layout.item_bias().contains(&idx) {
        m.item_bias[idx - layout.item_bias().start] = x;
    } else {
        assert_eq!(idx, layout.global_mean());
        m.global_mean = x;
    }
}

fn param(m: &GlobalModel, idx: usize) -> f32 {
    let layout = m.shape().layout();
    let d = m.shape().dim;
    if layout.item_factors().contains(&idx) {
        m.item_factors[[idx / d, idx % d]]
    } else if layout.item_bias().contains(&idx) {
        m.item_bias[idx - layout.item_bias().start]
    } else {
        m.global_mean
    }
}

/// Central difference of `f` in model parameter `idx`. Each evaluation gets a fresh
/// `RoundModel`, so the Gramian cache never outlives a perturbation.
fn central_difference(model: &GlobalModel, idx: usize, h: f32, f: impl Fn(&RoundModel) -> f64) -> f64 {
    let x0 = param(model, idx);
    let (xp, xm) = (x0 + h, x0 - h);
    let eval = |x: f32| {
        let mut m = model.clone();
        set_param(&mut m, idx, x);
        f(&RoundModel::new(0, m))
    };
    (eval(xp) - eval(xm)) / (f64::from(xp) - f64::from(xm))
}

#[test]
fn update_is_the_gradient_of_the_local_loss() {
    let layout = SHAPE.layout();
    let d = SHAPE.dim;
    for params in both() {
        for seed in 0..3 {
            let model = random_model(10 + seed);
            let rm = RoundModel::new(0, model.clone());
            let ratings = random_ratings(20 + seed, 8, &params);
            let user = random_user(30 + seed, &params);
            let grad = local_update(&rm, &ratings, &user, &params).to_dense();
            assert_eq!(grad.len(), layout.len());
            let rated = |i: usize| ratings.iter().any(|r| r.item as usize == i);
            for idx in layout.trainable() {
                let g = f64::from(grad[idx]);
                let fd = central_difference(&model, idx, 1e-2, |m| local_loss(m, &ratings, &user, &params));
                let item = if layout.item_factors().contains(&idx) {
                    Some(idx / d)
                } else if layout.item_bias().contains(&idx) {
                    Some(idx - layout.item_bias().start)
                } else {
                    None
                };
                let what = format!("{:?}, seed {seed}, index {idx} (item {item:?})", params.objective);
                match (params.objective, item) {
                    // An item the user did not rate does not enter the explicit loss at all.
                    (Objective::Explicit, Some(i)) if !rated(i) => {
                        assert_eq!(g, 0.0, "{what}");
                        assert_eq!(fd, 0.0, "{what}");
                    }
                    // The implicit loss has no biases and no mean.
                    (Objective::Implicit { .. }, _) if !layout.item_factors().contains(&idx) => {
                        assert_eq!(g, 0.0, "{what}");
                        assert_eq!(fd, 0.0, "{what}");
                    }
                    _ => {
                        assert!(
                            (g - fd).abs() <= 1e-3 + 1e-2 * fd.abs(),
                            "{what}: update {g}, finite difference {fd}"
                        );
                    }
                }
            }
            if matches!(params.objective, Objective::Implicit { .. }) {
                // Every item the user did not touch still gets a gradient: u·vⱼ u ≠ 0.
                for i in (0..SHAPE.n_items).filter(|&i| !rated(i)) {
                    let row = &grad[i * d..(i + 1) * d];
                    assert!(row.iter().any(|&x| x != 0.0), "unrated item {i} has a zero implicit gradient");
                }
            }
        }
    }
}

#[test]
fn update_at_the_reconstruction_is_the_total_derivative() {
    let layout = SHAPE.layout();
    let d = SHAPE.dim;
    for params in both() {
        for seed in 0..3 {
            let model = random_model(40 + seed);
            let rm = RoundModel::new(0, model.clone());
            let ratings = random_ratings(50 + seed, 10, &params);
            let user = reconstruct(&rm, &ratings, &params).expect("definite");
            let grad = local_update(&rm, &ratings, &user, &params).to_dense();
            let unrated = (0..SHAPE.n_items).find(|&i| ratings.iter().all(|r| r.item as usize != i));
            let unrated = unrated.expect("10 of 30 items rated");
            let first = ratings[0].item as usize;
            let second = ratings[1].item as usize;
            let mut indices = vec![
                first * d,
                first * d + d - 1,
                second * d + 1,
                unrated * d,
                unrated * d + 2,
                layout.item_bias().start + first,
                layout.global_mean(),
            ];
            indices.sort_unstable();
            let j = |m: &RoundModel| {
                let u = reconstruct(m, &ratings, &params).expect("definite");
                local_loss(m, &ratings, &u, &params)
            };
            for idx in indices {
                let g = f64::from(grad[idx]);
                let fd = central_difference(&model, idx, 1e-2, j);
                assert!(
                    (g - fd).abs() <= 2e-3 + 2e-2 * fd.abs(),
                    "{:?}, seed {seed}, index {idx}: partial gradient {g}, total derivative {fd}",
                    params.objective
                );
            }
        }
    }
}

#[test]
fn kmeans_tail_holds_the_user_in_its_nearest_segment() {
    let layout = SHAPE.layout();
    let d = SHAPE.dim;
    let mut segments_seen = [false; 3];
    for params in both() {
        for seed in 0..12 {
            let mut model = random_model(60 + seed);
            // Centroids on the scale of user vectors, so that every segment can be nearest.
            let mut rng = seeded_rng(70 + seed);
            model.centroids.mapv_inplace(|_| rng.random_range(-1.0..1.0));
            let rm = RoundModel::new(0, model.clone());
            let ratings = random_ratings(80 + seed, 12, &params);
            let user = reconstruct(&rm, &ratings, &params).expect("definite");
            let dense = local_update(&rm, &ratings, &user, &params).to_dense();
            let (seg, dist) = model.nearest_segment(&user.factors);

            // Nearest by an independent f64 search.
            let dists: Vec<f64> = (0..SHAPE.n_segments)
                .map(|j| {
                    let c = model.centroids.row(j);
                    c.iter().zip(&user.factors).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum()
                })
                .collect();
            let best =
                (0..SHAPE.n_segments).min_by(|&a, &b| dists[a].total_cmp(&dists[b])).expect("segments");
            assert_eq!(seg, best);
            assert!((f64::from(dist) - dists[best]).abs() < 1e-5);
            segments_seen[seg] = true;

            let sums = &dense[layout.centroid_sums()];
            let counts = &dense[layout.centroid_counts()];
            for j in 0..SHAPE.n_segments {
                let row = &sums[j * d..(j + 1) * d];
                if j == seg {
                    assert_eq!(row, user.factors.as_slice());
                    assert_eq!(counts[j], 1.0);
                } else {
                    assert!(row.iter().all(|&x| x == 0.0), "segment {j} row {row:?}");
                    assert_eq!(counts[j], 0.0);
                }
            }
        }
    }
    assert!(segments_seen.iter().filter(|&&s| s).count() >= 2, "the test should exercise several segments");
}

#[test]
fn explicit_updates_store_rated_rows_and_implicit_ones_every_row() {
    let layout = SHAPE.layout();
    let model = random_model(90);
    let rm = RoundModel::new(0, model);
    for params in both() {
        let ratings = random_ratings(91, 6, &params);
        let user = reconstruct(&rm, &ratings, &params).expect("definite");
        let upd: UpdateVector = local_update(&rm, &ratings, &user, &params);
        assert_eq!(upd.to_dense().len(), layout.len());
        assert_eq!(*upd.layout(), layout);
        match params.objective {
            Objective::Explicit => {
                let mut want: Vec<u32> = ratings.iter().map(|r| r.item).collect();
                want.sort_unstable();
                assert_eq!(upd.rows(), Some(want.as_slice()));
            }
            Objective::Implicit { .. } => assert_eq!(upd.rows(), None),
        }
    }
    // No ratings: an explicit update stores no rows but still has the full length.
    let empty = UserState { factors: vec![0.0; SHAPE.dim], bias: 0.0 };
    let upd = local_update(&rm, &[], &empty, &EXPLICIT);
    assert_eq!(upd.rows(), Some(&[][..]));
    assert_eq!(upd.to_dense().len(), layout.len());
}

#[test]
fn order_of_the_interactions_does_not_change_the_update_or_the_checks() {
    let model = random_model(92);
    let rm = RoundModel::new(0, model);
    for params in both() {
        let shuffled = random_ratings(93, 9, &params);
        let mut sorted = shuffled.clone();
        sorted.sort_by_key(|r| r.item);
        assert_ne!(shuffled, sorted, "the sample is not already in item order");
        let user = reconstruct(&rm, &shuffled, &params).expect("definite");
        // The same user vector for both, so only the order differs: sorted input takes the
        // path without a sort, shuffled input the one with.
        let a = local_update(&rm, &shuffled, &user, &params);
        let b = local_update(&rm, &sorted, &user, &params);
        assert_eq!(a, b, "{:?}", params.objective);
        for ratings in [&shuffled, &sorted] {
            assert_eq!(validate_ratings(ratings, SHAPE.n_items, &params.objective), Ok(()));
            // A repeated item is refused wherever it sits, in order or not.
            for at in [0, ratings.len() - 1] {
                let mut twice = ratings.clone();
                twice.insert(at, Rating { value: 3.0, ..ratings[ratings.len() / 2] });
                let item = ratings[ratings.len() / 2].item;
                assert_eq!(
                    validate_ratings(&twice, SHAPE.n_items, &params.objective),
                    Err(LocalDataError::DuplicateItem(item))
                );
            }
            let mut adjacent = sorted.clone();
            adjacent.insert(4, sorted[4]);
            assert_eq!(
                validate_ratings(&adjacent, SHAPE.n_items, &params.objective),
                Err(LocalDataError::DuplicateItem(sorted[4].item))
            );
        }
    }
}
