//! The fixed-point encoding of a clipped update for secure aggregation: conditional unbiased stochastic rounding to the round's grid, then integers mod `2^b` with `b` chosen so that the sum of a cohort never wraps.
//!
//! # Encoding
//!
//! [`encode`] turns a [`ClippedUpdate`] into a dense vector of integers over the whole update
//! layout, in the same index order the plain [`Aggregator`](crate::aggregate::Aggregator) rounds
//! to the grid (item factors, item biases from `layout.item_bias()`, then the tail from
//! `layout.global_mean()`): coordinate `x` becomes `⌊x/γ⌋` or `⌊x/γ⌋ + 1`, up with probability
//! equal to the fractional part of `x/γ` (`γ` = [`Grid::step`]). Each coordinate is then
//! unbiased, `E[k] = x/γ`, and off by less than one grid step.
//!
//! Stochastic rounding can move a vector by up to `√d` steps instead of the `√d/2` of rounding
//! to nearest, so on its own it could break the sensitivity `Δ` the accountant is charged
//! ([`Grid::sensitivity`]). This is the *conditional randomized rounding* of Kairouz, Liu &
//! Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
//! Aggregation" (ICML 2021, §4.1): the whole vector is drawn again while its squared norm, an
//! exact integer, is above `⌊(G + √d/2)²⌋` (also computed exactly in integers; `G` =
//! [`Grid::steps_per_clip`], `d` = the layout length). With `G = ⌈50 √d⌉` the slack `G √d ≈ 50 d`
//! in the squared norm is about `√d` standard deviations of the rounding noise, so a redraw is
//! rare and a second one rarer. After [`MAX_ATTEMPTS`] draws that all failed (which needs a
//! broken RNG in practice), the encoding falls back to rounding to nearest, exactly
//! [`Grid::to_grid`] as the plain aggregator does, whose norm is at most `‖x/γ‖ + √d/2 ≤ G +
//! √d/2` for every clipped update. Either way every device's encoding has norm at most
//! `G + √d/2 ≤ Δ`, so the accountant's `Δ` holds exactly as for the plain aggregator.
//! Conditioning makes the rounding slightly biased in the rare vectors where it bites; the
//! bias is bounded in Kairouz et al. (Theorem 4.5) and is no privacy matter.
//!
//! The optional clip bit (adaptive clipping) is one more coordinate at the end, `0` or `1`.
//! It does not count in the norm: it is released as its own count with sensitivity 1.
//!
//! # The ring
//!
//! Every coordinate of one encoding is in `[−G, G]` (`|x| ≤ C`), the clip bit in `[0, 1]`.
//! [`bits_for`] picks the smallest `b ∈ 8..=64` with `n_max · G ≤ 2^(b−1) − 1`, so the sum of
//! up to `n_max` encodings lies in `[−2^(b−1), 2^(b−1) − 1]` and survives the trip through
//! `Z/2^b`: [`to_ring`] (two's complement mod `2^b`), [`ring_add`] (wrapping addition, what
//! masking and unmasking do) and [`from_ring`] (the centred lift back to signed integers) give
//! the integer sum exactly.

use rand::{CryptoRng, Rng};
use thiserror::Error;

use crate::privacy::discrete::Grid;
use crate::update::ClippedUpdate;

/// Draws of the stochastic rounding before [`encode`] falls back to rounding to nearest.
pub const MAX_ATTEMPTS: u32 = 1000;

/// Fewest bits per ring element [`bits_for`] returns and the ring functions accept.
pub const MIN_BITS: u32 = 8;

/// Most bits per ring element (one `u64` word).
pub const MAX_BITS: u32 = 64;

/// Relative slack on `|x/γ| ≤ G` for the `f64` arithmetic of the division; values inside it are
/// clamped to `[−G, G]`, values beyond it are refused.
const RANGE_SLACK: f64 = 1e-9;

/// Why an encoding or a ring operation was refused.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The grid was not built for an update of this length (`Grid::for_sum(C, layout.len())`).
    #[error("the grid was not built for updates of length {dim}")]
    GridMismatch {
        /// The update's layout length.
        dim: usize,
    },
    /// The update was clipped to a larger norm than the grid's clip norm.
    #[error("update clipped to {clip_norm}, above the grid's clip norm {grid_clip_norm}")]
    ClipNormAboveGrid {
        /// The update's clip norm.
        clip_norm: f64,
        /// The grid's clip norm `C = γ G`.
        grid_clip_norm: f64,
    },
    /// A coordinate beyond `[−C, C]` or not finite (a clipped update within the grid's clip
    /// norm never has one).
    #[error("coordinate {index} is {value} grid steps, outside [-G, G] for G = {steps_per_clip}")]
    CoordinateOutOfRange {
        /// Index in the layout.
        index: usize,
        /// The coordinate in grid units.
        value: f64,
        /// `G`.
        steps_per_clip: f64,
    },
    /// Even rounding to nearest gave a squared norm above the bound (a clipped update within
    /// the grid's clip norm never does).
    #[error("encoded squared norm {norm_sq} above the bound {bound_sq}")]
    NormAboveBound {
        /// Squared norm in grid units.
        norm_sq: u128,
        /// `⌊(G + √d/2)²⌋`.
        bound_sq: u128,
    },
    /// `n_max` encodings need more than [`MAX_BITS`] bits.
    #[error("the sum of {n_max} encodings with G = {steps_per_clip} does not fit in 64 bits")]
    TooManyForBits {
        /// Number of encodings asked for.
        n_max: usize,
        /// `G`.
        steps_per_clip: f64,
    },
    /// A ring width outside [`MIN_BITS`]`..=`[`MAX_BITS`].
    #[error("ring width {0} bits is outside {MIN_BITS}..={MAX_BITS}")]
    Bits(u32),
    /// A signed value that does not fit in `b` bits, `[−2^(b−1), 2^(b−1) − 1]`.
    #[error("value {value} at index {index} does not fit in {bits} signed bits")]
    DoesNotFit {
        /// Index in the vector.
        index: usize,
        /// The value.
        value: i64,
        /// The ring width.
        bits: u32,
    },
    /// A ring element that is not reduced mod `2^b`.
    #[error("ring element {value} at index {index} is not below 2^{bits}")]
    NotInRing {
        /// Index in the vector.
        index: usize,
        /// The value.
        value: u64,
        /// The ring width.
        bits: u32,
    },
    /// Two ring vectors of different lengths.
    #[error("ring vectors of lengths {expected} and {got}")]
    LengthMismatch {
        /// Length of the accumulator.
        expected: usize,
        /// Length of the vector added.
        got: usize,
    },
}

/// Encodes `update` on `grid` as a dense integer vector of length `layout.len()` (plus one last
/// coordinate, `0` or `1`, when `clip_bit` is `Some`), by conditional unbiased stochastic
/// rounding (see the module documentation). Rows a sparse update does not store are zeros and
/// encode to zero.
///
/// Every coordinate but the clip bit is in `[−G, G]`, and the squared norm over them is at most
/// `⌊(G + √d/2)²⌋` (`d = layout.len()`), so at most [`Grid::sensitivity`].
///
/// Fails if `grid` was not built for this layout's length, or for a smaller clip norm than the
/// update's.
pub fn encode<R: Rng + CryptoRng + ?Sized>(
    update: &ClippedUpdate,
    grid: &Grid,
    clip_bit: Option<bool>,
    rng: &mut R,
) -> Result<Vec<i64>, EncodeError> {
    encode_with_attempts(update, grid, clip_bit, rng, MAX_ATTEMPTS).map(|(v, _)| v)
}

/// How [`encode_with_attempts`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rounding {
    /// Stochastic rounding, accepted at this draw (1-based).
    Stochastic(u32),
    /// Every draw was above the bound: rounded to nearest.
    Nearest,
}

/// [`encode`] with the number of draws as a parameter, and how it ended.
fn encode_with_attempts<R: Rng + ?Sized>(
    update: &ClippedUpdate,
    grid: &Grid,
    clip_bit: Option<bool>,
    rng: &mut R,
    max_attempts: u32,
) -> Result<(Vec<i64>, Rounding), EncodeError> {
    let v = update.vector();
    let layout = *v.layout();
    let dim = layout.len();
    if grid.dim() != dim {
        return Err(EncodeError::GridMismatch { dim });
    }
    let g = grid.steps_per_clip();
    let grid_clip_norm = grid.step() * g;
    let clip_norm = f64::from(update.clip_norm());
    if clip_norm > grid_clip_norm * (1.0 + RANGE_SLACK) {
        return Err(EncodeError::ClipNormAboveGrid { clip_norm, grid_clip_norm });
    }
    let bound_sq = bound_sq(g, dim).ok_or(EncodeError::GridMismatch { dim })?;

    let mut out = vec![0i64; dim + usize::from(clip_bit.is_some())];
    if let Some(bit) = clip_bit {
        out[dim] = i64::from(bit);
    }
    let inv_step = 1.0 / grid.step();
    let limit = g * (1.0 + RANGE_SLACK);
    for attempt in 1..=max_attempts {
        let mut norm_sq = 0u128;
        let mut round = |index: usize, x: f32| -> Result<(), EncodeError> {
            let y = f64::from(x) * inv_step;
            if y.is_nan() || y.abs() > limit {
                return Err(EncodeError::CoordinateOutOfRange { index, value: y, steps_per_clip: g });
            }
            let y = y.clamp(-g, g);
            let floor = y.floor();
            let frac = y - floor;
            // `floor` is an integer in [−G, G], exactly representable; `frac == 0` needs no draw,
            // so zeros (and the rows a sparse update does not store) cost nothing.
            let k = floor as i64 + i64::from(frac > 0.0 && rng.random::<f64>() < frac);
            norm_sq = norm_sq.saturating_add(u128::from(k.unsigned_abs()).pow(2));
            out[index] = k;
            Ok(())
        };
        for_each_coordinate(update, &mut round)?;
        if norm_sq <= bound_sq {
            return Ok((out, Rounding::Stochastic(attempt)));
        }
    }

    // Fallback: rounding to nearest, as `Aggregator::add_to_grid` does.
    let mut norm_sq = 0u128;
    let mut nearest = |index: usize, x: f32| -> Result<(), EncodeError> {
        let k = grid.to_grid(x).clamp(-(g as i64), g as i64);
        norm_sq = norm_sq.saturating_add(u128::from(k.unsigned_abs()).pow(2));
        out[index] = k;
        Ok(())
    };
    for_each_coordinate(update, &mut nearest)?;
    if norm_sq > bound_sq {
        return Err(EncodeError::NormAboveBound { norm_sq, bound_sq });
    }
    Ok((out, Rounding::Nearest))
}

/// Calls `f(index, x)` for every stored coordinate of `update` in layout order: factor rows
/// (all, or the stored ones ascending), their biases, then the tail. The indices are those of
/// `Aggregator::add_to_grid`.
fn for_each_coordinate(
    update: &ClippedUpdate,
    f: &mut impl FnMut(usize, f32) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let v = update.vector();
    let l = *v.layout();
    let d = l.shape().dim;
    let bias_start = l.item_bias().start;
    let tail_start = l.global_mean();
    let (factors, bias, tail) = v.parts();
    match v.rows() {
        None => {
            for (i, &x) in factors.iter().enumerate() {
                f(i, x)?;
            }
            for (i, &x) in bias.iter().enumerate() {
                f(bias_start + i, x)?;
            }
        }
        Some(rows) => {
            for (k, &r) in rows.iter().enumerate() {
                let r = r as usize;
                for (j, &x) in factors[k * d..(k + 1) * d].iter().enumerate() {
                    f(r * d + j, x)?;
                }
            }
            for (&r, &x) in rows.iter().zip(bias) {
                f(bias_start + r as usize, x)?;
            }
        }
    }
    for (i, &x) in tail.iter().enumerate() {
        f(tail_start + i, x)?;
    }
    Ok(())
}

/// `⌊(G + √d/2)²⌋` exactly, for integer `G`: `(G + √d/2)² = (4G² + d + √(16 G² d)) / 4`, and
/// for an integer `a` and a real `r ≥ 0`, `⌊(a + r)/4⌋ = ⌊(a + ⌊r⌋)/4⌋`. `None` on overflow
/// (beyond `d ≈ 10¹⁶`).
fn bound_sq(steps_per_clip: f64, dim: usize) -> Option<u128> {
    let g = steps_per_clip as u128;
    let d = u128::try_from(dim).ok()?;
    let g_sq = g.checked_mul(g)?;
    let cross = g_sq.checked_mul(16)?.checked_mul(d)?.isqrt();
    Some(g_sq.checked_mul(4)?.checked_add(d)?.checked_add(cross)? / 4)
}

/// The smallest ring width `b ∈ 8..=64` such that the sum of up to `n_max` encodings on `grid`
/// never wraps mod `2^b`: `n_max · G ≤ 2^(b−1) − 1` (each coordinate of one encoding is in
/// `[−G, G]`; the clip bit, if any, in `[0, 1]`). Fails if even 64 bits do not suffice.
pub fn bits_for(n_max: usize, grid: &Grid, with_clip_bit: bool) -> Result<u32, EncodeError> {
    let g = grid.steps_per_clip();
    // G ≥ 50 for every grid, so the clip bit never widens the ring; kept for clarity.
    let largest = if with_clip_bit { g.max(1.0) } else { g } as u128;
    let too_many = || EncodeError::TooManyForBits { n_max, steps_per_clip: g };
    let total = (n_max as u128).checked_mul(largest).ok_or_else(too_many)?;
    (MIN_BITS..=MAX_BITS).find(|&b| total < 1u128 << (b - 1)).ok_or_else(too_many)
}

/// Checks a ring width and returns `2^b − 1`.
fn ring_mask(bits: u32) -> Result<u64, EncodeError> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(EncodeError::Bits(bits));
    }
    Ok(u64::MAX >> (64 - bits))
}

/// Signed integers to `Z/2^b` by two's complement (`v mod 2^b`). Refuses a width outside
/// [`MIN_BITS`]`..=`[`MAX_BITS`] and a value outside `[−2^(b−1), 2^(b−1) − 1]` (it would not
/// come back by [`from_ring`]).
pub fn to_ring(v: &[i64], bits: u32) -> Result<Vec<u64>, EncodeError> {
    let mask = ring_mask(bits)?;
    let half = 1i128 << (bits - 1);
    v.iter()
        .enumerate()
        .map(|(index, &x)| {
            if !(-half..half).contains(&i128::from(x)) {
                return Err(EncodeError::DoesNotFit { index, value: x, bits });
            }
            Ok(x as u64 & mask)
        })
        .collect()
}

/// Elements of `Z/2^b` back to signed integers by the centred lift: values `≥ 2^(b−1)` are
/// negative. Refuses a width outside [`MIN_BITS`]`..=`[`MAX_BITS`] and an element not below
/// `2^b`.
pub fn from_ring(v: &[u64], bits: u32) -> Result<Vec<i64>, EncodeError> {
    let mask = ring_mask(bits)?;
    let half = 1u64 << (bits - 1);
    v.iter()
        .enumerate()
        .map(|(index, &x)| {
            if x & !mask != 0 {
                return Err(EncodeError::NotInRing { index, value: x, bits });
            }
            // x ≥ 2^(b−1) stands for x − 2^b; in i64 that is x with the bits above b set.
            Ok(if x >= half { (x | !mask) as i64 } else { x as i64 })
        })
        .collect()
}

/// `acc += v` in `Z/2^b`, element by element (wrapping). Refuses a width outside
/// [`MIN_BITS`]`..=`[`MAX_BITS`], vectors of different lengths, and an element of `v` or `acc`
/// not below `2^b`; on refusal `acc` is unchanged.
pub fn ring_add(acc: &mut [u64], v: &[u64], bits: u32) -> Result<(), EncodeError> {
    let mask = ring_mask(bits)?;
    if acc.len() != v.len() {
        return Err(EncodeError::LengthMismatch { expected: acc.len(), got: v.len() });
    }
    for w in [&*acc, v] {
        if let Some((index, &value)) = w.iter().enumerate().find(|&(_, &x)| x & !mask != 0) {
            return Err(EncodeError::NotInRing { index, value, bits });
        }
    }
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = a.wrapping_add(x) & mask;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::danger;
    use crate::model::{ModelShape, UpdateLayout};
    use crate::update::UpdateVector;
    use proptest::prelude::*;

    /// An RNG that returns one word forever: with 0, `random::<f64>()` is 0 and stochastic
    /// rounding rounds every non-integer coordinate up ([`always_up`]); with all ones it is
    /// `1 − 2⁻⁵³` and rounds down ([`always_down`]). It makes the extremes of the rounding
    /// certain.
    struct Constant(u64);

    fn always_up() -> Constant {
        Constant(0)
    }

    fn always_down() -> Constant {
        Constant(u64::MAX)
    }

    impl rand::RngCore for Constant {
        fn next_u32(&mut self) -> u32 {
            self.0 as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.fill(self.0 as u8);
        }
    }

    impl rand::CryptoRng for Constant {}

    /// The layout of length 5: one item, d = 1, one segment.
    fn five() -> UpdateLayout {
        ModelShape { n_items: 1, dim: 1, n_segments: 1 }.layout()
    }

    fn clipped(layout: UpdateLayout, data: &[f32], clip: f32) -> ClippedUpdate {
        let v = UpdateVector::from_dense(layout, data).expect("layout length");
        ClippedUpdate::clip(v, clip).expect("finite")
    }

    fn norm_sq(v: &[i64]) -> u128 {
        v.iter().map(|&k| u128::from(k.unsigned_abs()).pow(2)).sum()
    }

    /// The exact bound against a float computation, and that it lies below Δ².
    #[test]
    fn bound_is_the_floor_of_the_squared_sensitivity_bound() {
        for dim in [1usize, 2, 5, 16, 100, 55_771, 1_000_003] {
            let grid = Grid::for_sum(1.0, dim).expect("valid");
            let g = grid.steps_per_clip();
            let b = bound_sq(g, dim).expect("no overflow");
            let real = (g + (dim as f64).sqrt() / 2.0).powi(2);
            assert!((b as f64 - real.floor()).abs() <= 1.0 + real * 1e-15, "{dim}: {b} vs {real}");
            assert!((b as f64) <= real);
            assert!((b as f64) <= grid.sensitivity().powi(2));
        }
        // d = 4: (G + 1)² exactly, G = 100.
        assert_eq!(bound_sq(100.0, 4), Some(101 * 101));
    }

    /// The encoding uses the plain aggregator's index layout: coordinate by coordinate it is
    /// within one step of `x/γ` and of rounding to nearest ([`Grid::to_grid`] of the dense
    /// vector), and the clip bit comes last.
    #[test]
    fn coordinates_follow_the_aggregator_layout() {
        let layout = ModelShape { n_items: 7, dim: 3, n_segments: 2 }.layout();
        let mut rng = danger::seeded_rng(5);
        let data: Vec<f32> =
            (0..layout.len()).map(|i| (i as f32 + 1.0) * if i % 2 == 0 { 1.0 } else { -0.7 }).collect();
        let update = clipped(layout, &data, 3.0);
        let grid = Grid::for_sum(3.0, layout.len()).expect("valid");
        let dense = update.vector().to_dense();
        for clip_bit in [None, Some(false), Some(true)] {
            let enc = encode(&update, &grid, clip_bit, &mut rng).expect("encodes");
            assert_eq!(enc.len(), layout.len() + usize::from(clip_bit.is_some()));
            for (i, &x) in dense.iter().enumerate() {
                let y = f64::from(x) / grid.step();
                assert!((enc[i] as f64 - y).abs() < 1.0, "coordinate {i}: {} vs {y}", enc[i]);
                assert!((enc[i] - grid.to_grid(x)).abs() <= 1, "coordinate {i}");
            }
            if let Some(bit) = clip_bit {
                assert_eq!(enc[layout.len()], i64::from(bit));
            }
        }
    }

    /// A sparse update encodes exactly as its dense form with the same seed: missing rows are
    /// zeros, zeros draw no randomness, and the order of the draws is the layout order.
    #[test]
    fn sparse_rows_encode_as_their_dense_form() {
        let layout = ModelShape { n_items: 6, dim: 2, n_segments: 2 }.layout();
        let mut sparse = UpdateVector::zeros_rows(layout, vec![1, 4]).expect("valid rows");
        {
            let (f, b, t) = sparse.parts_mut();
            f.copy_from_slice(&[0.31, -0.12, 0.05, 0.44]);
            b.copy_from_slice(&[-0.2, 0.17]);
            for (i, x) in t.iter_mut().enumerate() {
                *x = 0.03 * i as f32 - 0.1;
            }
        }
        let dense = UpdateVector::from_dense(layout, &sparse.to_dense()).expect("length");
        let sparse = ClippedUpdate::clip(sparse, 1.0).expect("finite");
        let dense = ClippedUpdate::clip(dense, 1.0).expect("finite");
        let grid = Grid::for_sum(1.0, layout.len()).expect("valid");
        for seed in 0..20 {
            let a = encode(&sparse, &grid, Some(true), &mut danger::seeded_rng(seed)).expect("encodes");
            let b = encode(&dense, &grid, Some(true), &mut danger::seeded_rng(seed)).expect("encodes");
            assert_eq!(a, b, "seed {seed}");
            // Rows 0, 2, 3, 5 (factors and biases) are zero.
            for r in [0usize, 2, 3, 5] {
                assert_eq!(&a[r * 2..r * 2 + 2], &[0, 0]);
                assert_eq!(a[layout.item_bias().start + r], 0);
            }
        }
    }

    /// The mean of many encodings of a fixed vector is `x/γ` per coordinate, within six
    /// standard errors of a Bernoulli with the coordinate's fractional part (fixed seed).
    /// Rounding to nearest would fail it.
    #[test]
    fn stochastic_rounding_is_unbiased() {
        let layout = ModelShape { n_items: 4, dim: 2, n_segments: 1 }.layout();
        let mut rng = danger::seeded_rng(11);
        let raw: Vec<f32> = (0..layout.len()).map(|_| rng.random::<f32>() - 0.5).collect();
        let n = raw.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let clip = 2.0f32;
        let data: Vec<f32> = raw.iter().map(|&x| (f64::from(x) / n * 0.8 * f64::from(clip)) as f32).collect();
        let update = clipped(layout, &data, clip);
        let grid = Grid::for_sum(clip, layout.len()).expect("valid");
        let draws = 20_000;
        let mut sum = vec![0i64; layout.len()];
        for _ in 0..draws {
            let enc = encode(&update, &grid, None, &mut rng).expect("encodes");
            for (s, k) in sum.iter_mut().zip(enc) {
                *s += k;
            }
        }
        for (i, (&s, &x)) in sum.iter().zip(&data).enumerate() {
            let y = f64::from(x) / grid.step();
            let frac = y - y.floor();
            let se = (frac * (1.0 - frac)).max(0.01).sqrt() / f64::from(draws).sqrt();
            let mean = s as f64 / f64::from(draws);
            assert!((mean - y).abs() < 6.0 * se, "coordinate {i}: mean {mean}, x/γ {y}, se {se}");
        }
    }

    /// Two coordinates at `C/√2` on d = 5: rounding both up (probability ≈ 4%) gives a
    /// squared norm of 12 800 against a bound of 12 795. Unconditional rounding exceeds the
    /// bound in this run; `encode` never does.
    #[test]
    fn every_encoding_is_within_the_bound_and_the_condition_matters() {
        let layout = five();
        let grid = Grid::for_sum(1.0, layout.len()).expect("valid");
        let g = grid.steps_per_clip();
        assert_eq!(g, 112.0);
        let bound = bound_sq(g, layout.len()).expect("no overflow");
        let x = (0.5f64.sqrt() * (1.0 - 2e-5)) as f32;
        let update = clipped(layout, &[x, x, 0.0, 0.0, 0.0], 1.0);
        assert!(!update.was_clipped());
        let y = f64::from(x) / grid.step();
        let mut rng = danger::seeded_rng(7);
        let mut unconditional_over = 0;
        for _ in 0..2_000 {
            let enc = encode(&update, &grid, None, &mut rng).expect("encodes");
            assert!(norm_sq(&enc) <= bound, "{enc:?}");
            let plain: Vec<i64> =
                (0..2).map(|_| y.floor() as i64 + i64::from(rng.random::<f64>() < y - y.floor())).collect();
            unconditional_over += usize::from(norm_sq(&plain) > bound);
        }
        assert!(unconditional_over > 0, "the crafted vector should exceed the bound unconditioned");
        // The same attempt count is visible: some encodings needed a second draw.
        let mut redraws = 0;
        for _ in 0..500 {
            let (_, how) =
                encode_with_attempts(&update, &grid, None, &mut rng, MAX_ATTEMPTS).expect("encodes");
            redraws += usize::from(how != Rounding::Stochastic(1));
        }
        assert!(redraws > 0);
    }

    /// With an RNG that always rounds up and five coordinates at `C/√5`, every draw has
    /// squared norm 5 · 51² = 13 005 > 12 795: after the cap the encoding is rounding to
    /// nearest (5 · 50²), equal to `Grid::to_grid` coordinate by coordinate.
    #[test]
    fn falls_back_to_nearest_after_the_cap() {
        let layout = five();
        let grid = Grid::for_sum(1.0, layout.len()).expect("valid");
        let x = (0.2f64.sqrt() * (1.0 - 2e-5)) as f32;
        let update = clipped(layout, &[x; 5], 1.0);
        let (enc, how) = encode_with_attempts(&update, &grid, Some(true), &mut always_up(), MAX_ATTEMPTS)
            .expect("falls back");
        assert_eq!(how, Rounding::Nearest);
        assert_eq!(enc, vec![50, 50, 50, 50, 50, 1]);
        assert_eq!(&enc[..5], &[grid.to_grid(x); 5]);
        assert_eq!(encode(&update, &grid, Some(true), &mut always_up()), Ok(enc));
        // Below the bound, the same RNG is accepted at once (all up).
        let small = clipped(layout, &[x / 2.0; 5], 1.0);
        let (enc, how) = encode_with_attempts(&small, &grid, None, &mut always_up(), 3).expect("encodes");
        assert_eq!(how, Rounding::Stochastic(1));
        assert_eq!(enc, vec![26; 5]);
    }

    #[test]
    fn refuses_a_grid_of_another_length_or_a_smaller_clip_norm() {
        let layout = five();
        let update = clipped(layout, &[0.1; 5], 1.0);
        let mut rng = danger::seeded_rng(1);
        let other = Grid::for_sum(1.0, 6).expect("valid");
        assert_eq!(encode(&update, &other, None, &mut rng), Err(EncodeError::GridMismatch { dim: 5 }));
        let tighter = Grid::for_sum(0.5, 5).expect("valid");
        assert!(matches!(
            encode(&update, &tighter, None, &mut rng),
            Err(EncodeError::ClipNormAboveGrid { .. })
        ));
        // A looser grid is fine (the update is within it).
        let looser = Grid::for_sum(2.0, 5).expect("valid");
        assert!(encode(&update, &looser, None, &mut rng).is_ok());
    }

    #[test]
    fn bits_for_is_the_smallest_width_that_cannot_wrap() {
        let grid = Grid::for_sum(1.0, 5).expect("valid"); // G = 112
        assert_eq!(bits_for(0, &grid, true), Ok(8));
        assert_eq!(bits_for(1, &grid, false), Ok(8)); // 112 ≤ 127
        assert_eq!(bits_for(2, &grid, false), Ok(9)); // 224 ≤ 255
        assert_eq!(bits_for(292, &grid, true), Ok(16)); // 32 704 ≤ 32 767
        assert_eq!(bits_for(293, &grid, true), Ok(17)); // 32 816
        let max63 = (i64::MAX / 112) as usize;
        assert_eq!(bits_for(max63, &grid, false), Ok(64));
        assert!(matches!(bits_for(max63 + 1, &grid, false), Err(EncodeError::TooManyForBits { .. })));
        assert!(matches!(bits_for(usize::MAX, &grid, false), Err(EncodeError::TooManyForBits { .. })));
    }

    /// The sum of `count` copies of `ring` in `Z/2^bits`, lifted back.
    fn ring_sum(ring: &[u64], count: usize, bits: u32) -> Vec<i64> {
        let mut acc = vec![0u64; ring.len()];
        for _ in 0..count {
            ring_add(&mut acc, ring, bits).expect("same width");
        }
        from_ring(&acc, bits).expect("reduced")
    }

    /// At the boundary: `n_max` encodings with all their mass on one coordinate at `+C` or `−C`
    /// (each exactly `±G`, rounded away from zero by a constant RNG) sum exactly through the
    /// ring of `bits_for(n_max)` bits; one more at `+C` wraps, and so does the same cohort one
    /// bit narrower, so the check matters. Two grids: `G = 112` (d = 5) and `G = 1024`
    /// (d = 419), where `n_max · G` can be exactly `2^(b−1)`.
    #[test]
    fn boundary_cohort_sums_exactly_and_one_more_wraps() {
        for n_items in [1usize, 208] {
            let layout = ModelShape { n_items, dim: 1, n_segments: 1 }.layout();
            let d = layout.len();
            let grid = Grid::for_sum(1.0, d).expect("valid");
            let g = grid.steps_per_clip() as i64;
            assert_eq!((d, g), if n_items == 1 { (5, 112) } else { (419, 1024) });
            let at = |sign: f32| {
                let mut data = vec![0.0; d];
                data[1] = sign;
                clipped(layout, &data, 1.0)
            };
            for target in [8u32, 12, 16, 20] {
                let n_max = ((1i64 << (target - 1)) - 1) / g;
                if n_max == 0 {
                    assert!(bits_for(1, &grid, true).expect("fits") > target);
                    continue;
                }
                let n = usize::try_from(n_max).expect("small");
                let bits = bits_for(n, &grid, true).expect("fits");
                assert_eq!(bits, target, "G = {g}");
                for sign in [1i64, -1] {
                    // ±C(1 − 10⁻⁵) after clipping: rounding away from zero gives exactly ±G.
                    let mut rng = if sign > 0 { always_up() } else { always_down() };
                    let enc = encode(&at(sign as f32), &grid, Some(true), &mut rng).expect("encodes");
                    let mut want = vec![0; d + 1];
                    (want[1], want[d]) = (sign * g, 1);
                    assert_eq!(enc, want);
                    let ring = to_ring(&enc, bits).expect("fits");
                    let sum = ring_sum(&ring, n, bits);
                    want.iter_mut().for_each(|w| *w *= n_max);
                    assert_eq!(sum, want, "G = {g}, {target} bits, sign {sign}");
                }
                let plus = encode(&at(1.0), &grid, Some(true), &mut always_up()).expect("encodes");
                let wrapped = ring_sum(&to_ring(&plus, bits).expect("fits"), n + 1, bits);
                assert!(wrapped[1] < 0, "G = {g}, {target} bits: {} should have wrapped", wrapped[1]);
                if bits > MIN_BITS {
                    // One bit narrower, either one encoding alone does not fit or the sum wraps.
                    match to_ring(&plus, bits - 1) {
                        Err(EncodeError::DoesNotFit { index: 1, .. }) => assert!(n == 1),
                        Err(e) => panic!("{e}"),
                        Ok(narrow) => {
                            let sum = ring_sum(&narrow, n, bits - 1);
                            assert!(sum[1] < 0, "G = {g}, {} bits: {} should have wrapped", bits - 1, sum[1]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_bits_and_malformed_ring_vectors_are_refused() {
        for bits in [0u32, 1, 7, 65, 128] {
            assert_eq!(to_ring(&[0], bits), Err(EncodeError::Bits(bits)));
            assert_eq!(from_ring(&[0], bits), Err(EncodeError::Bits(bits)));
            assert_eq!(ring_add(&mut [0], &[0], bits), Err(EncodeError::Bits(bits)));
        }
        // An encoding of G = 112 does not fit 8 signed bits when negative beyond −128…
        assert_eq!(to_ring(&[127, -128], 8), Ok(vec![127, 128]));
        assert_eq!(to_ring(&[0, 128], 8), Err(EncodeError::DoesNotFit { index: 1, value: 128, bits: 8 }));
        assert_eq!(to_ring(&[-129], 8), Err(EncodeError::DoesNotFit { index: 0, value: -129, bits: 8 }));
        assert_eq!(to_ring(&[i64::MIN, i64::MAX], 64), Ok(vec![1 << 63, (1 << 63) - 1]));
        assert_eq!(from_ring(&[1 << 63, (1 << 63) - 1], 64), Ok(vec![i64::MIN, i64::MAX]));
        assert_eq!(from_ring(&[256], 8), Err(EncodeError::NotInRing { index: 0, value: 256, bits: 8 }));
        let mut acc = vec![1u64, 2];
        assert_eq!(ring_add(&mut acc, &[1], 8), Err(EncodeError::LengthMismatch { expected: 2, got: 1 }));
        assert_eq!(
            ring_add(&mut acc, &[1, 300], 8),
            Err(EncodeError::NotInRing { index: 1, value: 300, bits: 8 })
        );
        assert_eq!(acc, vec![1, 2]);
        ring_add(&mut acc, &[255, 255], 8).expect("valid");
        assert_eq!(acc, vec![0, 1]);
    }

    proptest! {
        /// The ring round trip: any value that fits comes back.
        #[test]
        fn ring_round_trip(bits in MIN_BITS..=MAX_BITS, seed in any::<u64>()) {
            let half = 1i128 << (bits - 1);
            let mut rng = danger::seeded_rng(seed);
            let v: Vec<i64> = (0..64).map(|_| (rng.random::<i128>().rem_euclid(2 * half) - half) as i64).collect();
            let ring = to_ring(&v, bits).expect("fits");
            prop_assert!(ring.iter().all(|&x| bits == 64 || x < 1 << bits));
            prop_assert_eq!(from_ring(&ring, bits).expect("reduced"), v);
        }

        /// The sum of `n` encodings, each taken to the ring of `bits_for(n_max)` bits
        /// (`n ≤ n_max`), added mod 2^b and lifted back, is the integer sum exactly; every
        /// encoding is within the bound and within one step of `x/γ`.
        #[test]
        fn ring_sum_of_encodings_is_the_integer_sum(
            n_items in 1usize..6,
            dim in 1usize..4,
            n in 1usize..12,
            extra in 0usize..100,
            sparse in any::<bool>(),
            clip in prop::sample::select(vec![1e-3f32, 0.5, 1.0, 40.0]),
            seed in any::<u64>(),
        ) {
            let layout = ModelShape { n_items, dim, n_segments: 2 }.layout();
            let grid = Grid::for_sum(clip, layout.len()).expect("valid");
            let bound = bound_sq(grid.steps_per_clip(), layout.len()).expect("no overflow");
            let mut rng = danger::seeded_rng(seed);
            let bits = bits_for(n + extra, &grid, true).expect("fits");
            let mut acc = vec![0u64; layout.len() + 1];
            let mut exact = vec![0i64; layout.len() + 1];
            for _ in 0..n {
                // Scales up to 4C: some are clipped to the boundary.
                let scale = 4.0 * clip * rng.random::<f32>();
                let data: Vec<f32> = (0..layout.len()).map(|_| scale * (rng.random::<f32>() - 0.5)).collect();
                let mut v = UpdateVector::from_dense(layout, &data).expect("length");
                if sparse {
                    let rows = vec![0u32];
                    let mut s = UpdateVector::zeros_rows(layout, rows).expect("valid");
                    let (df, db, dt) = v.parts();
                    let (f, b, t) = s.parts_mut();
                    f.copy_from_slice(&df[..dim]);
                    b[0] = db[0];
                    t.copy_from_slice(dt);
                    v = s;
                }
                let u = ClippedUpdate::clip(v, clip).expect("finite");
                let enc = encode(&u, &grid, Some(u.was_clipped()), &mut rng).expect("encodes");
                prop_assert!(norm_sq(&enc[..layout.len()]) <= bound);
                for (i, &x) in u.vector().to_dense().iter().enumerate() {
                    prop_assert!((enc[i] as f64 - f64::from(x) / grid.step()).abs() < 1.0);
                }
                prop_assert_eq!(enc[layout.len()], i64::from(u.was_clipped()));
                ring_add(&mut acc, &to_ring(&enc, bits).expect("fits"), bits).expect("same width");
                for (e, k) in exact.iter_mut().zip(&enc) {
                    *e += k;
                }
            }
            prop_assert_eq!(from_ring(&acc, bits).expect("reduced"), exact);
        }
    }
}
