//! Small dense linear algebra for the per-user (and per-item) ridge solves: normal equations and a Cholesky solver.
//!
//! The systems are `d × d` (or `(d+1) × (d+1)` with a bias), with `d` in the tens, so a
//! hand-written Cholesky in `f64` is both faster and lighter than a LAPACK dependency.

use crate::error::SolveError;

/// Normal equations `A x = b` of a weighted ridge regression, built one observation at a time.
///
/// Observations are feature rows `x` (optionally extended with a constant 1 for a bias
/// term). `A` accumulates `w_a · x xᵀ` and `b` accumulates `w_b · x`; the split weights let one
/// builder serve both squared error (`w_a = 1`, `w_b = target`) and the implicit-feedback
/// objective (`w_a = c − 1` on top of a Gramian, `w_b = c · p`). Rows are buffered (scaled
/// by `√w_a`) and the lower triangle of `A` is formed at solve time from dot products of
/// the buffered columns, which vectorises far better than rank-one updates.
///
/// Every entry of `A` is one `dot_f64` of two columns (lane `l` sums the observations
/// `≡ l (mod 8)` in order), whichever way it is computed, so the solution does not depend
/// on the number of observations choosing one kernel or the other.
#[derive(Debug, Clone)]
pub struct NormalEquations {
    n: usize,
    /// Row stride of `rows`: `n` rounded up to a multiple of [`BLOCK`], padded with zeros.
    stride: usize,
    /// Row-major `n × n`; only the lower triangle is read.
    a: Vec<f64>,
    b: Vec<f64>,
    /// Buffered rows, `m × stride`, each scaled by `√w_a`.
    rows: Vec<f64>,
    with_bias: bool,
}

/// Columns of `A` computed together by the row kernel ([`add_gram_rows`]): one 256-bit
/// vector of `f64`.
const BLOCK: usize = 4;

/// The largest row buffer a thread keeps for its next system (4 MiB).
const MAX_KEPT_ROWS: usize = 1 << 19;

thread_local! {
    /// The row buffer of the last system this thread solved, for the next one. A device with
    /// a few hundred ratings needs a buffer large enough that the allocator maps it afresh,
    /// and faulting in those zero-filled pages for every device cost more than its solve.
    static SPARE_ROWS: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

impl NormalEquations {
    /// Empty system for `dim` features, plus one bias unknown if `with_bias`.
    pub fn new(dim: usize, with_bias: bool) -> Self {
        Self::with_capacity(dim, with_bias, 0)
    }

    /// Empty system with room for `n_obs` observations.
    pub fn with_capacity(dim: usize, with_bias: bool, n_obs: usize) -> Self {
        let n = dim + usize::from(with_bias);
        let stride = n.div_ceil(BLOCK) * BLOCK;
        let mut rows = SPARE_ROWS.with(std::cell::Cell::take);
        rows.clear();
        rows.reserve(n_obs * stride);
        Self { n, stride, a: vec![0.0; n * n], b: vec![0.0; n], rows, with_bias }
    }

    /// Number of unknowns (features plus the bias, if any).
    pub fn n_unknowns(&self) -> usize {
        self.n
    }

    /// Adds a full symmetric `dim × dim` matrix (row-major) to the feature block of `A`.
    ///
    /// # Panics
    /// If `gram` is not `dim × dim` — a programming error, not an input error.
    pub fn add_matrix(&mut self, gram: &[f64]) {
        let dim = self.n - usize::from(self.with_bias);
        assert_eq!(gram.len(), dim * dim, "Gramian shape must match the system");
        for r in 0..dim {
            for c in 0..=r {
                self.a[r * self.n + c] += gram[r * dim + c];
            }
        }
    }

    /// Adds one observation: `A += w_a · x̃ x̃ᵀ`, `b += w_b · x̃`, where `x̃ = [x, 1]` with a
    /// bias. `w_a` must be non-negative (a negative one is treated as 0).
    #[inline]
    pub fn add(&mut self, x: &[f32], w_a: f64, w_b: f64) {
        debug_assert_eq!(x.len() + usize::from(self.with_bias), self.n);
        let s = w_a.max(0.0).sqrt();
        for (b, &v) in self.b.iter_mut().zip(x) {
            *b += w_b * f64::from(v);
        }
        self.rows.extend(x.iter().map(|&v| s * f64::from(v)));
        if self.with_bias {
            self.b[self.n - 1] += w_b;
            self.rows.push(s);
        }
        self.rows.extend(std::iter::repeat_n(0.0, self.stride - self.n));
    }

    /// Solves `(A + diag(ridge)) x = b`, with `ridge[i]` added to the `i`-th diagonal entry.
    pub fn solve(mut self, ridge: &[f64]) -> Result<Vec<f64>, SolveError> {
        assert_eq!(ridge.len(), self.n, "one ridge term per unknown");
        let n = self.n;
        let m = self.rows.len() / self.stride.max(1);
        if m > 0 && !add_gram_rows(&mut self.a, &self.rows, n, self.stride) {
            // No row kernel for this width: columns of the buffered rows, contiguous, so
            // that A[r][c] is one dot product.
            let mut cols = Vec::with_capacity(n * m);
            for k in 0..n {
                cols.extend(self.rows.chunks_exact(self.stride).map(|row| row[k]));
            }
            for r in 0..n {
                let cr = &cols[r * m..(r + 1) * m];
                for c in 0..=r {
                    self.a[r * n + c] += dot_f64(cr, &cols[c * m..(c + 1) * m]);
                }
            }
        }
        if self.rows.capacity() <= MAX_KEPT_ROWS {
            SPARE_ROWS.with(|spare| spare.set(std::mem::take(&mut self.rows)));
        }
        for (i, r) in ridge.iter().enumerate() {
            self.a[i * n + i] += r;
        }
        cholesky_solve_in_place(&mut self.a, &mut self.b, n)?;
        Ok(self.b)
    }
}

/// Adds to the lower triangle of the row-major `n × n` matrix `a` the dot products of the
/// columns of `rows` (row-major, `stride` a multiple of [`BLOCK`], at least `n`), each
/// exactly as [`dot_f64`] of the two columns computes it.
///
/// For a block of [`BLOCK`] adjacent columns the products of one observation are adjacent
/// in its row, so one vector multiply and add serves the block; and the eight lanes' sums
/// and the remainder, which [`dot_f64`] adds up one entry at a time, are added a block at
/// a time. The row length is a constant of the kernel, so that the loops need no bounds
/// checks; `false` if `stride` has no kernel.
fn add_gram_rows(a: &mut [f64], rows: &[f64], n: usize, stride: usize) -> bool {
    macro_rules! dispatch {
        ($($s:literal)*) => {
            match stride {
                $($s => add_gram_rows_of::<$s>(a, rows.as_chunks::<$s>().0, n),)*
                _ => return false,
            }
        };
    }
    dispatch!(4 8 12 16 20 24 28 32 36 40 44 48 52 56 60 64 68);
    true
}

/// [`add_gram_rows`] for rows of `S` values.
fn add_gram_rows_of<const S: usize>(a: &mut [f64], rows: &[[f64; S]], n: usize) {
    assert!(n <= S && S.is_multiple_of(BLOCK));
    let (main, rest) = rows.split_at(rows.len() - rows.len() % 8);
    let main = main.as_chunks::<8>().0;
    // The sum of no values, which `Iterator::sum` (and so `dot_f64`) starts from.
    let zero: f64 = std::iter::empty::<f64>().sum();
    for r in 0..n {
        for c in (0..=r).step_by(BLOCK) {
            let mut acc = [[0.0f64; BLOCK]; 8];
            for chunk in main {
                for (acc, row) in acc.iter_mut().zip(chunk) {
                    let (x, y) = (row[r], &row[c..c + BLOCK]);
                    for (s, &v) in acc.iter_mut().zip(y) {
                        *s += x * v;
                    }
                }
            }
            let mut sum = [zero; BLOCK];
            for lane in &acc {
                for (s, &v) in sum.iter_mut().zip(lane) {
                    *s += v;
                }
            }
            let mut tail = [zero; BLOCK];
            for row in rest {
                let (x, y) = (row[r], &row[c..c + BLOCK]);
                for (t, &v) in tail.iter_mut().zip(y) {
                    *t += x * v;
                }
            }
            // Entries past the diagonal (or past column n − 1) are not wanted.
            let out = &mut a[r * n + c..r * n + (r + 1)];
            for ((o, s), t) in out.iter_mut().zip(sum).zip(tail) {
                *o += s + t;
            }
        }
    }
}

/// Dot product of two `f64` slices in eight independent lanes (so that the additions do
/// not wait on each other even without wide vector units).
#[inline]
fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Solves `A x = b` for symmetric positive definite `A`, reading only its lower triangle.
///
/// On success `b` holds `x`; `a` is overwritten with the Cholesky factor.
pub fn cholesky_solve_in_place(a: &mut [f64], b: &mut [f64], n: usize) -> Result<(), SolveError> {
    assert_eq!(a.len(), n * n);
    assert_eq!(b.len(), n);
    for j in 0..n {
        let row_j = &mut a[j * n..(j + 1) * n];
        let d = row_j[j] - dot_f64(&row_j[..j], &row_j[..j]);
        if d.is_nan() || d <= 0.0 || !d.is_finite() {
            return Err(SolveError::NotPositiveDefinite);
        }
        let d = d.sqrt();
        row_j[j] = d;
        for i in j + 1..n {
            let (upper, lower) = a.split_at_mut(i * n);
            let row_j = &upper[j * n..j * n + j];
            let row_i = &mut lower[..n];
            row_i[j] = (row_i[j] - dot_f64(&row_i[..j], row_j)) / d;
        }
    }
    // Forward substitution L y = b, then back substitution Lᵀ x = y.
    for i in 0..n {
        let s = b[i] - dot_f64(&a[i * n..i * n + i], &b[..i]);
        b[i] = s / a[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= a[k * n + i] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    Ok(())
}

/// The Gramian `Mᵀ M` of a row-major `rows × dim` matrix, as a full `dim × dim` matrix in `f64`.
pub fn gramian(m: &[f32], dim: usize) -> Vec<f64> {
    let mut g = vec![0.0f64; dim * dim];
    if dim == 0 {
        return g;
    }
    for row in m.chunks_exact(dim) {
        for r in 0..dim {
            let xr = f64::from(row[r]);
            let g_row = &mut g[r * dim..r * dim + r + 1];
            for (gv, &xc) in g_row.iter_mut().zip(&row[..=r]) {
                *gv += xr * f64::from(xc);
            }
        }
    }
    for r in 0..dim {
        for c in 0..r {
            g[c * dim + r] = g[r * dim + c];
        }
    }
    g
}

/// Dot product of two equal-length `f32` slices, accumulated in eight lanes for speed.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Squared L2 norm of a slice, with a relative error below `2e-6` for any finite input.
///
/// Blocks of 256 values are summed in sixteen `f32` lanes (sixteen terms per lane, so the
/// rounding error stays near `16 · 2⁻²⁴`), blocks are summed in `f64`. Inputs whose squares
/// overflow `f32`, or may fall below its normal range, take an exact `f64` path instead, so
/// a finite input never yields infinity nor loses precision to subnormals.
pub fn norm_sq_f64(x: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(256) {
        let mut acc = [0.0f32; 16];
        let chunks = block.chunks_exact(16);
        let rem = chunks.remainder();
        for c in chunks {
            for l in 0..16 {
                acc[l] += c[l] * c[l];
            }
        }
        total += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
        total += rem.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
    }
    // Squares below f32::MIN_POSITIVE (~1.2e-38) lose precision in the f32 lanes; a total
    // this small means some may have. Recompute exactly, which is cheap and rare.
    if total.is_finite() && total > 1e-30 {
        total
    } else {
        x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_known_system() {
        // A = [[4,2],[2,3]], b = [2, 1] → x = [0.5, 0]
        let mut a = vec![4.0, 0.0, 2.0, 3.0];
        let mut b = vec![2.0, 1.0];
        cholesky_solve_in_place(&mut a, &mut b, 2).expect("SPD");
        assert!((b[0] - 0.5).abs() < 1e-12 && b[1].abs() < 1e-12, "{b:?}");
    }

    #[test]
    fn cholesky_rejects_indefinite() {
        let mut a = vec![1.0, 0.0, 2.0, 1.0];
        let mut b = vec![1.0, 1.0];
        assert_eq!(cholesky_solve_in_place(&mut a, &mut b, 2), Err(SolveError::NotPositiveDefinite));
    }

    /// The solver as first written: one eight-lane dot product per entry of `A` (the
    /// Cholesky factor's too), from the columns of the unpadded `m × n` rows.
    fn reference_solve(
        rows: &[f64],
        n: usize,
        mut a: Vec<f64>,
        mut b: Vec<f64>,
        ridge: &[f64],
    ) -> Option<Vec<f64>> {
        let col = |k: usize| -> Vec<f64> { rows.chunks_exact(n).map(|row| row[k]).collect() };
        for r in 0..n {
            for c in 0..=r {
                a[r * n + c] += reference_dot(&col(r), &col(c));
            }
        }
        for (i, r) in ridge.iter().enumerate() {
            a[i * n + i] += r;
        }
        for j in 0..n {
            let d = a[j * n + j] - reference_dot(&a[j * n..j * n + j], &a[j * n..j * n + j]);
            if d.is_nan() || d <= 0.0 || !d.is_finite() {
                return None;
            }
            let d = d.sqrt();
            a[j * n + j] = d;
            for i in j + 1..n {
                let s = reference_dot(&a[i * n..i * n + j], &a[j * n..j * n + j]);
                a[i * n + j] = (a[i * n + j] - s) / d;
            }
        }
        for i in 0..n {
            let s = b[i] - reference_dot(&a[i * n..i * n + i], &b[..i]);
            b[i] = s / a[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = b[i];
            for k in i + 1..n {
                s -= a[k * n + i] * b[k];
            }
            b[i] = s / a[i * n + i];
        }
        Some(b)
    }

    /// The eight-lane dot product as first written.
    fn reference_dot(a: &[f64], b: &[f64]) -> f64 {
        let mut acc = [0.0f64; 8];
        let ca = a.chunks_exact(8);
        let cb = b.chunks_exact(8);
        let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        acc.iter().sum::<f64>() + tail
    }

    /// Both Gramian kernels (rows for widths up to 68, columns beyond) give every entry bit
    /// for bit as one dot product at a time did, zeros' signs included.
    #[test]
    fn solve_is_bit_identical_to_one_dot_product_per_entry() {
        use rand::Rng;
        let mut rng = crate::danger::seeded_rng(7);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut n_checked = 0;
        for dim in [1usize, 3, 4, 7, 8, 9, 16, 31, 32, 33, 40, 67, 70] {
            for with_bias in [false, true] {
                for n_obs in [0usize, 1, 5, 8, 13, 64, 85, 203] {
                    let mut ne = NormalEquations::with_capacity(dim, with_bias, n_obs);
                    if rng.random_bool(0.5) {
                        let m: Vec<f32> = (0..3 * dim).map(|_| rng.random::<f32>() - 0.5).collect();
                        ne.add_matrix(&gramian(&m, dim));
                    }
                    for _ in 0..n_obs {
                        // Some zero rows and zero weights, so that signed zeros meet.
                        let zero_row = rng.random_bool(0.1);
                        let x: Vec<f32> = (0..dim)
                            .map(|_| if zero_row { -0.0 } else { rng.random::<f32>() - 0.5 })
                            .collect();
                        let w_a = if rng.random_bool(0.1) { 0.0 } else { rng.random_range(0.0..3.0) };
                        ne.add(&x, w_a, rng.random_range(-2.0..5.0));
                    }
                    let n = ne.n_unknowns();
                    let ridge: Vec<f64> = (0..n).map(|_| rng.random_range(1e-3..2.0)).collect();
                    let rows: Vec<f64> =
                        ne.rows.chunks_exact(ne.stride).flat_map(|row| &row[..n]).copied().collect();
                    let expected = reference_solve(&rows, n, ne.a.clone(), ne.b.clone(), &ridge)
                        .expect("a ridge makes the system definite");
                    let got = ne.solve(&ridge).expect("a ridge makes the system definite");
                    assert_eq!(
                        bits(&got),
                        bits(&expected),
                        "dim {dim}, bias {with_bias}, {n_obs} observations"
                    );
                    n_checked += 1;
                }
            }
        }
        assert_eq!(n_checked, 13 * 2 * 8);
    }

    #[test]
    fn gramian_matches_naive() {
        let m = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let g = gramian(&m, 2);
        assert_eq!(g, vec![35.0, 44.0, 44.0, 56.0]);
    }

    #[test]
    fn norm_is_accurate_and_never_overflows_on_finite_input() {
        let x: Vec<f32> = (0..10_007).map(|i| ((i * 7919) % 1000) as f32 * 0.001 - 0.5).collect();
        let exact: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((norm_sq_f64(&x) / exact - 1.0).abs() < 2e-6);
        let big = vec![1e30f32, -1e30];
        assert!((norm_sq_f64(&big) / 2e60 - 1.0).abs() < 1e-6);
        assert!(norm_sq_f64(&[f32::NAN]).is_nan());
    }

    #[test]
    fn dot_matches_naive_for_odd_lengths() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }
}
