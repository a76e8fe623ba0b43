//! Compact model downloads: item factors as 8-bit codes with one scale per row, rounded stochastically so that the decoded value is unbiased.
//!
//! Row `i` with largest magnitude `mᵢ` gets the scale `sᵢ = mᵢ / 127`; each value `x` becomes
//! `q = ⌊x / sᵢ + U⌋` with `U` uniform in `[0, 1)`, so `E[q sᵢ] = x` exactly and
//! `|q sᵢ − x| < sᵢ`. A row of `d` factors costs `d + 4` bytes instead of `4d`.

use rand::Rng;

/// How the round's model is downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DownloadEncoding {
    /// Every parameter as `f32` (4 bytes).
    #[default]
    F32,
    /// Item factors as 8-bit codes with an `f32` scale per row, stochastic rounding; biases,
    /// the mean and the centroids as `f32`.
    Int8,
}

/// Item factors in 8-bit codes with one scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    dim: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Rows {
    /// Encodes row-major `values` (rows of `dim`) with stochastic rounding from `rng`.
    /// Non-finite values encode as 0 (a model never holds one: it is checked on every path in).
    pub fn encode<R: Rng + ?Sized>(values: &[f32], dim: usize, rng: &mut R) -> Self {
        let dim = dim.max(1);
        let mut codes = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(values.len() / dim);
        for row in values.chunks(dim) {
            let max = row.iter().filter(|x| x.is_finite()).fold(0.0f32, |m, &x| m.max(x.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
            scales.push(scale);
            for &x in row {
                let q = if scale > 0.0 && x.is_finite() {
                    let u: f32 = rng.random();
                    (x / scale + u).floor().clamp(-127.0, 127.0)
                } else {
                    0.0
                };
                codes.push(q as i8);
            }
        }
        Self { dim, codes, scales }
    }

    /// Rebuilds from the wire: `codes.len()` must be `scales.len() · dim`, every scale finite
    /// and ≥ 0.
    pub fn from_parts(dim: usize, codes: Vec<i8>, scales: Vec<f32>) -> Option<Self> {
        let ok = dim > 0
            && scales.len().checked_mul(dim) == Some(codes.len())
            && scales.iter().all(|s| s.is_finite() && *s >= 0.0);
        ok.then_some(Self { dim, codes, scales })
    }

    /// The decoded values, row-major.
    pub fn decode(&self) -> Vec<f32> {
        self.codes
            .chunks(self.dim)
            .zip(&self.scales)
            .flat_map(|(row, &s)| row.iter().map(move |&q| f32::from(q) * s))
            .collect()
    }

    /// The codes, row-major.
    pub fn codes(&self) -> &[i8] {
        &self.codes
    }

    /// One scale per row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }
}
