//! A small radix-2 complex FFT, enough for composing privacy loss distributions: in-place,
//! iterative, with twiddle factors computed directly (not by recurrence) so that round-off
//! stays at a few ulps of the largest value even for millions of points.

use std::f64::consts::PI;
use std::ops::{Add, Mul, Sub};

/// A complex number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Complex {
    pub(crate) re: f64,
    pub(crate) im: f64,
}

impl Complex {
    pub(crate) const ZERO: Self = Self { re: 0.0, im: 0.0 };
    pub(crate) const ONE: Self = Self { re: 1.0, im: 0.0 };

    fn conj(self) -> Self {
        Self { re: self.re, im: -self.im }
    }

    /// `self^n` by repeated squaring.
    pub(crate) fn powu(self, mut n: u64) -> Self {
        let mut base = self;
        let mut acc = Self::ONE;
        while n > 0 {
            if n & 1 == 1 {
                acc = acc * base;
            }
            base = base * base;
            n >>= 1;
        }
        acc
    }
}

impl Add for Complex {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self { re: self.re + o.re, im: self.im + o.im }
    }
}

impl Sub for Complex {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self { re: self.re - o.re, im: self.im - o.im }
    }
}

impl Mul for Complex {
    type Output = Self;
    fn mul(self, o: Self) -> Self {
        Self { re: self.re * o.re - self.im * o.im, im: self.re * o.im + self.im * o.re }
    }
}

/// Transforms of one power-of-two length, with its twiddle factors.
pub(crate) struct Fft {
    len: usize,
    /// `e^{-2πik/len}` for `k < len/2`.
    twiddles: Vec<Complex>,
}

impl Fft {
    /// Plans transforms of length `len`, which must be a power of two.
    pub(crate) fn new(len: usize) -> Self {
        assert!(len.is_power_of_two(), "FFT length {len} is not a power of two");
        let twiddles = (0..len / 2)
            .map(|k| {
                let (sin, cos) = (-2.0 * PI * k as f64 / len as f64).sin_cos();
                Complex { re: cos, im: sin }
            })
            .collect();
        Self { len, twiddles }
    }

    /// The forward transform `X_k = Σ_j x_j e^{-2πijk/n}`, in place.
    pub(crate) fn forward(&self, data: &mut [Complex]) {
        self.transform(data, false);
    }

    /// The inverse transform, scaled by `1/n` so that it undoes [`Fft::forward`], in place.
    pub(crate) fn inverse(&self, data: &mut [Complex]) {
        self.transform(data, true);
        let scale = 1.0 / self.len as f64;
        for z in data.iter_mut() {
            z.re *= scale;
            z.im *= scale;
        }
    }

    fn transform(&self, data: &mut [Complex], inverse: bool) {
        let n = self.len;
        assert_eq!(data.len(), n, "FFT input has the wrong length");
        if n <= 1 {
            return;
        }
        let bits = n.trailing_zeros();
        for i in 0..n {
            let j = i.reverse_bits() >> (usize::BITS - bits);
            if i < j {
                data.swap(i, j);
            }
        }
        let mut size = 2;
        while size <= n {
            let half = size / 2;
            let stride = n / size;
            for block in data.chunks_exact_mut(size) {
                let (lo, hi) = block.split_at_mut(half);
                for (k, (u, v)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
                    let w = self.twiddles[k * stride];
                    let w = if inverse { w.conj() } else { w };
                    let t = *v * w;
                    *v = *u - t;
                    *u = *u + t;
                }
            }
            size *= 2;
        }
    }
}

/// The linear convolution of two real sequences.
pub(crate) fn convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let out_len = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 64 {
        let mut out = vec![0.0; out_len];
        for (i, &x) in a.iter().enumerate() {
            for (o, &y) in out[i..].iter_mut().zip(b) {
                *o += x * y;
            }
        }
        return out;
    }
    let len = out_len.next_power_of_two();
    let fft = Fft::new(len);
    let mut fa = padded(a, len);
    let mut fb = padded(b, len);
    fft.forward(&mut fa);
    fft.forward(&mut fb);
    for (x, y) in fa.iter_mut().zip(&fb) {
        *x = *x * *y;
    }
    fft.inverse(&mut fa);
    fa.iter().take(out_len).map(|z| z.re).collect()
}

/// `values` as complex numbers, zero-padded to `len`.
pub(crate) fn padded(values: &[f64], len: usize) -> Vec<Complex> {
    let mut out = vec![Complex::ZERO; len];
    for (o, &v) in out.iter_mut().zip(values) {
        o.re = v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fft_convolution_matches_direct_convolution() {
        let a: Vec<f64> = (0..300).map(|i| ((i * 37 % 101) as f64) / 101.0).collect();
        let b: Vec<f64> = (0..200).map(|i| ((i * 53 % 89) as f64) / 89.0).collect();
        let fast = convolve(&a, &b);
        let mut slow = vec![0.0; a.len() + b.len() - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                slow[i + j] += x * y;
            }
        }
        for (f, s) in fast.iter().zip(&slow) {
            assert!((f - s).abs() < 1e-10, "{f} vs {s}");
        }
    }

    #[test]
    fn forward_then_inverse_is_identity() {
        let values: Vec<f64> = (0..1024).map(|i| (i as f64 * 0.37).sin()).collect();
        let fft = Fft::new(1024);
        let mut data = padded(&values, 1024);
        fft.forward(&mut data);
        fft.inverse(&mut data);
        for (z, v) in data.iter().zip(&values) {
            assert!((z.re - v).abs() < 1e-14 && z.im.abs() < 1e-14);
        }
    }

    #[test]
    fn powu_is_repeated_multiplication() {
        let z = Complex { re: 0.6, im: -0.7 };
        let mut slow = Complex::ONE;
        for _ in 0..13 {
            slow = slow * z;
        }
        let fast = z.powu(13);
        assert!((fast.re - slow.re).abs() < 1e-15 && (fast.im - slow.im).abs() < 1e-15);
    }
}
