//! The randomised Hadamard rotation of distributed DP: pad to a power of two, flip signs drawn from a public seed, apply the orthonormal fast Walsh–Hadamard transform; and its inverse.
//!
//! `U = (1/√D) · H · diag(ξ)` (Kairouz, Liu & Steinke, ICML 2021, §4.2; Suresh et al., ICML 2017,
//! §3): `H` is the `D × D` Walsh–Hadamard matrix with entries ±1 (`H·H = D·I`, `H` symmetric),
//! computed in `O(D log D)` by [`fwht`], and `ξ ∈ {±1}^D` are the bits of the ChaCha20 keystream
//! under key `seed` and nonce [`SIGN_NONCE`] (bit `i` is bit `i % 8` of byte `i / 8`, least
//! significant first; `0 → +1`, `1 → −1`). `U` is orthonormal: it keeps norms, and
//! `U⁻¹ = diag(ξ) · (1/√D) · H`. Every device of a round uses the same `U`, so the rotation of the
//! sum is the sum of the rotations.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};

use super::DdpError;

/// The ChaCha20 nonce of the sign stream (12 bytes), distinct from the other uses of a round's
/// public seed (the secure-aggregation graph uses `"fedrec/graph"`).
pub const SIGN_NONCE: [u8; 12] = *b"fedrec/rotat";

/// The longest update the rotation accepts: `2^40` coordinates (the padded length must be a
/// power of two that fits, and its signs a ChaCha20 keystream).
pub const MAX_DIM: usize = 1 << 40;

/// `d` padded to the next power of two (`1` for `d = 1`), or `None` for `d = 0` or
/// `d >` [`MAX_DIM`].
pub fn padded_dim(dim: usize) -> Option<usize> {
    if dim == 0 || dim > MAX_DIM { None } else { dim.checked_next_power_of_two() }
}

/// The orthonormal fast Walsh–Hadamard transform in place: `v ← (1/√D) H v` for `D = v.len()`, a
/// power of two. It is its own inverse. Refuses a length that is not a power of two.
pub fn fwht(v: &mut [f64]) -> Result<(), DdpError> {
    let n = v.len();
    if !n.is_power_of_two() {
        return Err(DdpError::Dim { dim: n });
    }
    let mut h = 1;
    while h < n {
        for block in v.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let (s, t) = (*x + *y, *x - *y);
                *x = s;
                *y = t;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f64).sqrt();
    v.iter_mut().for_each(|x| *x *= norm);
    Ok(())
}

/// One round's rotation for updates of length `d`: the padded length `D` and the signs `ξ`.
#[derive(Clone, PartialEq, Eq)]
pub struct Rotation {
    dim: usize,
    /// `ξ_i = −1` where the bit is set; `D` bits, packed as in the keystream.
    signs: Vec<u8>,
    padded: usize,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation").field("dim", &self.dim).field("padded_dim", &self.padded).finish()
    }
}

impl Rotation {
    /// The rotation of updates of length `dim` under the round's public `seed`. Refuses `dim = 0`
    /// and `dim >` [`MAX_DIM`].
    pub fn new(seed: &[u8; 32], dim: usize) -> Result<Self, DdpError> {
        let padded = padded_dim(dim).ok_or(DdpError::Dim { dim })?;
        let mut signs = vec![0u8; padded.div_ceil(8)];
        let mut cipher = ChaCha20::new(seed.into(), &SIGN_NONCE.into());
        // 2^40 bits are 2^37 bytes, inside one ChaCha20 keystream (2^38 bytes).
        cipher.try_apply_keystream(&mut signs).map_err(|_| DdpError::Dim { dim })?;
        Ok(Self { dim, signs, padded })
    }

    /// The update length `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The padded length `D`, a power of two.
    pub fn padded_dim(&self) -> usize {
        self.padded
    }

    /// `ξ_i`, `+1.0` or `−1.0`, for `i < D`.
    pub fn sign(&self, i: usize) -> f64 {
        if self.signs[i / 8] >> (i % 8) & 1 == 1 { -1.0 } else { 1.0 }
    }

    /// `U x` for `x` of length `d` (padded with zeros to `D`): a vector of length `D`.
    pub fn forward(&self, x: &[f64]) -> Result<Vec<f64>, DdpError> {
        if x.len() != self.dim {
            return Err(DdpError::UpdateLength { expected: self.dim, got: x.len() });
        }
        let mut v = vec![0.0; self.padded];
        for (i, (out, &xi)) in v.iter_mut().zip(x).enumerate() {
            *out = self.sign(i) * xi;
        }
        fwht(&mut v)?;
        Ok(v)
    }

    /// `U⁻¹ y` for `y` of length `D`: all `D` coordinates (the last `D − d` are the padding,
    /// zero up to rounding for `y = U x`).
    pub fn inverse_padded(&self, y: &[f64]) -> Result<Vec<f64>, DdpError> {
        if y.len() != self.padded {
            return Err(DdpError::UpdateLength { expected: self.padded, got: y.len() });
        }
        let mut v = y.to_vec();
        fwht(&mut v)?;
        for (i, out) in v.iter_mut().enumerate() {
            *out *= self.sign(i);
        }
        Ok(v)
    }

    /// `U⁻¹ y` without the padding: the first `d` coordinates.
    pub fn inverse(&self, y: &[f64]) -> Result<Vec<f64>, DdpError> {
        let mut v = self.inverse_padded(y)?;
        v.truncate(self.dim);
        Ok(v)
    }
}
