//! t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2^61 − 1), used to share each device's mask key and self-mask seed with its neighbours.
//!
//! Shamir, "How to Share a Secret", CACM 22(11), 1979: a secret `s` is the constant term of a
//! random polynomial `f` of degree `t − 1`; share `i` is `(x_i, f(x_i))`. Any `t` shares give
//! `f(0) = s` by Lagrange interpolation; any `t − 1` shares are consistent with every secret
//! (for each candidate secret there is exactly one polynomial through it and the `t − 1`
//! points), so they reveal nothing. Bonawitz et al. (CCS 2017, §4) share both the mask key and
//! the self-mask seed of each device this way; Bell et al. (CCS 2020) share them only among a
//! device's neighbours.
//!
//! The field is GF(p) with the Mersenne prime `p = 2^61 − 1`, so a product reduces with a
//! shift and an add. A 32-byte secret does not fit one field element, so it is cut into five
//! little-endian chunks (`7, 7, 7, 7, 4` bytes); each chunk is below `2^56 < p` and is shared
//! with its own independent polynomial. A reconstructed chunk at or above its bound can only
//! come from inconsistent shares (mixed rounds, corruption) and is refused.

use std::borrow::Borrow;

use rand::{CryptoRng, Rng};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The field modulus, the Mersenne prime `2^61 − 1`.
pub const PRIME: u64 = (1 << 61) - 1;

/// Number of field elements one 32-byte secret is cut into.
pub const CHUNKS: usize = 5;

/// Size of an encoded [`Share`]: the 4-byte x-coordinate, then 5 little-endian `u64` values.
pub const SHARE_BYTES: usize = 4 + 8 * CHUNKS;

/// Byte length of each chunk of the secret: four of 7 bytes, the last of 4 (7·4 + 4 = 32).
const CHUNK_LEN: [usize; CHUNKS] = [7, 7, 7, 7, 4];

/// Why sharing or reconstruction failed. Reconstruction errors on shares a peer sent mean that
/// the peer (or the coordinator forwarding them) misbehaved.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ShamirError {
    /// The threshold is 0, or larger than the number of evaluation points.
    #[error("threshold {threshold} must be between 1 and the number of shares {n_shares}")]
    InvalidThreshold {
        /// The threshold asked for.
        threshold: usize,
        /// How many shares there were to make.
        n_shares: usize,
    },
    /// An evaluation point is 0: the share would be the secret itself.
    #[error("evaluation point 0 would reveal the secret")]
    ZeroX,
    /// Two shares have the same evaluation point.
    #[error("evaluation point {0} appears twice")]
    DuplicateX(u32),
    /// Fewer shares than the threshold were given.
    #[error("{got} shares given, {threshold} needed")]
    TooFewShares {
        /// The threshold.
        threshold: usize,
        /// Shares given.
        got: usize,
    },
    /// An encoded share does not have [`SHARE_BYTES`] bytes.
    #[error("an encoded share has {0} bytes, expected 44")]
    WrongLength(usize),
    /// An encoded share holds a value that is not a field element (≥ [`PRIME`]).
    #[error("an encoded share holds a value outside the field")]
    OutOfField,
    /// The shares interpolate to a value that no secret encodes: they do not belong together.
    #[error("the shares are inconsistent (they do not come from one sharing)")]
    Inconsistent,
}

/// One share of a 32-byte secret: the evaluation point `x` (1-based, never 0) and the five
/// polynomial values, one per chunk. Zeroized on drop; deliberately neither `Clone` nor
/// serializable, and its `Debug` shows only `x`. No `PartialEq` outside tests: comparing
/// secret values is not something the protocol needs (and `==` is not constant-time).
#[derive(Zeroize, ZeroizeOnDrop)]
#[cfg_attr(test, derive(PartialEq, Eq))]
pub struct Share {
    x: u32,
    y: [u64; CHUNKS],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share").field("x", &self.x).finish_non_exhaustive()
    }
}

impl Share {
    /// The evaluation point (in the protocol, the holder's device index + 1).
    pub fn x(&self) -> u32 {
        self.x
    }

    /// The share as 44 bytes: `x` (u32, little-endian) then the five values (u64,
    /// little-endian). The caller keeps the bytes secret (e.g. seals them at once).
    pub fn to_bytes(&self) -> Zeroizing<[u8; SHARE_BYTES]> {
        let mut out = Zeroizing::new([0u8; SHARE_BYTES]);
        out[..4].copy_from_slice(&self.x.to_le_bytes());
        for (c, y) in self.y.iter().enumerate() {
            out[4 + 8 * c..12 + 8 * c].copy_from_slice(&y.to_le_bytes());
        }
        out
    }

    /// Parses [`Share::to_bytes`] output. Refuses a wrong length, `x = 0` and values that
    /// are not field elements, so every parsed share is a well-formed point.
    pub fn from_bytes(bytes: &[u8]) -> Result<Share, ShamirError> {
        if bytes.len() != SHARE_BYTES {
            return Err(ShamirError::WrongLength(bytes.len()));
        }
        let mut x = [0u8; 4];
        x.copy_from_slice(&bytes[..4]);
        let x = u32::from_le_bytes(x);
        if x == 0 {
            return Err(ShamirError::ZeroX);
        }
        let mut share = Share { x, y: [0; CHUNKS] };
        for c in 0..CHUNKS {
            let mut word = Zeroizing::new([0u8; 8]);
            word.copy_from_slice(&bytes[4 + 8 * c..12 + 8 * c]);
            let y = u64::from_le_bytes(*word);
            if y >= PRIME {
                return Err(ShamirError::OutOfField);
            }
            share.y[c] = y;
        }
        Ok(share)
    }
}

/// Splits `secret` into one share per evaluation point in `xs`, such that any `threshold` of
/// them reconstruct it and fewer reveal nothing (Shamir 1979).
///
/// Each of the five chunks gets its own polynomial of degree `threshold − 1` with coefficients
/// drawn uniformly from GF(p) by rejection sampling. Fails for `threshold` of 0 or above
/// `xs.len()`, and for a zero or repeated evaluation point.
pub fn split<R: Rng + CryptoRng + ?Sized>(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u32],
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(ShamirError::InvalidThreshold { threshold, n_shares: xs.len() });
    }
    check_points(xs.iter().copied())?;
    // coefficients[c * threshold + d] is the coefficient of x^d in chunk c's polynomial; the
    // constant term is the chunk itself.
    let chunks = to_chunks(secret);
    let mut coefficients = Zeroizing::new(vec![0u64; CHUNKS * threshold]);
    for c in 0..CHUNKS {
        coefficients[c * threshold] = chunks[c];
        for d in 1..threshold {
            coefficients[c * threshold + d] = random_element(rng);
        }
    }
    Ok(evaluate(&coefficients, threshold, xs))
}

/// Reconstructs the secret from the first `threshold` shares by Lagrange interpolation at 0.
///
/// Shares beyond the first `threshold` are not read. Fails if there are fewer than
/// `threshold` shares (or `threshold` is 0), if two of the used shares have the same `x`, or if
/// the result is not the encoding of any secret, which means the shares are inconsistent
/// (for unrelated shares this is detected except with probability about 2^−54).
/// Accepts `&[Share]` and `&[&Share]`.
pub fn combine<S: Borrow<Share>>(shares: &[S], threshold: usize) -> Result<Zeroizing<[u8; 32]>, ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::InvalidThreshold { threshold, n_shares: shares.len() });
    }
    if shares.len() < threshold {
        return Err(ShamirError::TooFewShares { threshold, got: shares.len() });
    }
    let used: Vec<&Share> = shares[..threshold].iter().map(Borrow::borrow).collect();
    check_points(used.iter().map(|s| s.x))?;
    let chunks = Zeroizing::new(interpolate(&used, 0));
    from_chunks(&chunks)
}

/// Refuses a zero or repeated evaluation point.
fn check_points(xs: impl Iterator<Item = u32>) -> Result<(), ShamirError> {
    let mut seen: Vec<u32> = xs.collect();
    if seen.contains(&0) {
        return Err(ShamirError::ZeroX);
    }
    seen.sort_unstable();
    match seen.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(ShamirError::DuplicateX(w[0])),
        None => Ok(()),
    }
}

/// Evaluates the five polynomials (`coefficients`, `degree + 1 = threshold` per chunk, lowest
/// degree first) at each point by Horner's rule.
fn evaluate(coefficients: &[u64], threshold: usize, xs: &[u32]) -> Vec<Share> {
    xs.iter()
        .map(|&x| {
            let x_f = u64::from(x);
            let mut y = [0u64; CHUNKS];
            for (c, y_c) in y.iter_mut().enumerate() {
                let poly = &coefficients[c * threshold..(c + 1) * threshold];
                *y_c = poly.iter().rev().fold(0, |acc, &a| add(mul(acc, x_f), a));
            }
            Share { x, y }
        })
        .collect()
}

/// Lagrange interpolation of the shares' polynomials at `at`:
/// `Σ_i y_i · Π_{j≠i} (at − x_j) / (x_i − x_j)`. The callers have checked that the points are
/// distinct, so every denominator is non-zero.
fn interpolate(shares: &[&Share], at: u64) -> [u64; CHUNKS] {
    let mut acc = [0u64; CHUNKS];
    for (i, si) in shares.iter().enumerate() {
        let xi = u64::from(si.x);
        let mut num = 1u64;
        let mut den = 1u64;
        for (j, sj) in shares.iter().enumerate() {
            if i != j {
                let xj = u64::from(sj.x);
                num = mul(num, sub(at, xj));
                den = mul(den, sub(xi, xj));
            }
        }
        let coefficient = mul(num, inverse(den));
        for (a, &y) in acc.iter_mut().zip(&si.y) {
            *a = add(*a, mul(coefficient, y));
        }
    }
    acc
}

/// Cuts a secret into its five little-endian chunks.
fn to_chunks(secret: &[u8; 32]) -> Zeroizing<[u64; CHUNKS]> {
    let mut chunks = Zeroizing::new([0u64; CHUNKS]);
    let mut offset = 0;
    for (c, len) in CHUNK_LEN.iter().enumerate() {
        let mut word = Zeroizing::new([0u8; 8]);
        word[..*len].copy_from_slice(&secret[offset..offset + len]);
        chunks[c] = u64::from_le_bytes(*word);
        offset += len;
    }
    chunks
}

/// Joins five chunks into a secret, refusing a chunk above its byte length.
fn from_chunks(chunks: &[u64; CHUNKS]) -> Result<Zeroizing<[u8; 32]>, ShamirError> {
    let mut secret = Zeroizing::new([0u8; 32]);
    let mut offset = 0;
    for (c, len) in CHUNK_LEN.iter().enumerate() {
        if chunks[c] >> (8 * len) != 0 {
            return Err(ShamirError::Inconsistent);
        }
        let word = Zeroizing::new(chunks[c].to_le_bytes());
        secret[offset..offset + len].copy_from_slice(&word[..*len]);
        offset += len;
    }
    Ok(secret)
}

/// A uniform element of GF(p): 61 random bits, redrawn in the one case (`p` itself) that is
/// not a field element, so there is no modulo bias.
fn random_element<R: Rng + CryptoRng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let candidate = rng.next_u64() >> 3;
        if candidate < PRIME {
            return candidate;
        }
    }
}

/// `a + b mod p` for `a, b < p`.
fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // < 2^62, no overflow
    if s >= PRIME { s - PRIME } else { s }
}

/// `a − b mod p` for `a, b < p`.
fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + PRIME - b }
}

/// `a · b mod p` for `a, b < p`: since `2^61 ≡ 1 (mod p)`, the high part of the product folds
/// onto the low part (reduction modulo a Mersenne prime).
fn mul(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b); // < 2^122
    // Low 61 bits + high bits: each < 2^61, so the sum is < 2^62. Truncation is exact.
    let folded = (product as u64 & PRIME) + (product >> 61) as u64;
    let folded = (folded & PRIME) + (folded >> 61);
    if folded >= PRIME { folded - PRIME } else { folded }
}

/// `a^(p−2) = a^−1 mod p` for `a ≠ 0` (Fermat's little theorem).
fn inverse(a: u64) -> u64 {
    let mut result = 1u64;
    let mut base = a;
    let mut e = PRIME - 2;
    while e > 0 {
        if e & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::danger::seeded_rng;
    use proptest::prelude::*;

    fn share(x: u32, y: [u64; CHUNKS]) -> Share {
        Share { x, y }
    }

    #[test]
    fn field_arithmetic_known_answers() {
        assert_eq!(mul(PRIME - 1, PRIME - 1), 1); // (−1)² = 1
        assert_eq!(mul(1 << 60, 2), 1); // 2^61 ≡ 1
        assert_eq!(mul(1 << 60, 3), (1 << 60) + 1);
        assert_eq!(add(PRIME - 1, 2), 1);
        assert_eq!(sub(0, 1), PRIME - 1);
        assert_eq!(mul(inverse(2), 2), 1);
        assert_eq!(inverse(2), 1 << 60); // 2 · 2^60 = 2^61 ≡ 1
        let mut rng = seeded_rng(1);
        for _ in 0..1000 {
            let a = random_element(&mut rng);
            if a != 0 {
                assert_eq!(mul(a, inverse(a)), 1);
            }
            let b = random_element(&mut rng);
            assert_eq!(u128::from(mul(a, b)), u128::from(a) * u128::from(b) % u128::from(PRIME));
        }
    }

    /// Secret chunks (5, 0xff, 0, 0, 0) shared with t = 2 and linear coefficients
    /// (p − 1, 3, 0, 2^60, 7): f_c(x) = s_c + a_c·x mod p, computed by hand.
    fn hand_example() -> ([u8; 32], Vec<u64>, Share, Share) {
        let mut secret = [0u8; 32];
        secret[0] = 5; // chunk 0 = 5
        secret[7] = 0xff; // chunk 1 = 0xff
        let coefficients = vec![5, PRIME - 1, 0xff, 3, 0, 0, 0, 1 << 60, 0, 7];
        // x = 1: 5 − 1 = 4, 255 + 3 = 258, 0, 2^60, 7.
        let at1 = share(1, [4, 258, 0, 1 << 60, 7]);
        // x = 3: 5 − 3 = 2, 255 + 9 = 264, 0, 3·2^60 = 2^61 + 2^60 ≡ 2^60 + 1, 21.
        let at3 = share(3, [2, 264, 0, (1 << 60) + 1, 21]);
        (secret, coefficients, at1, at3)
    }

    #[test]
    fn known_answer_t2() {
        let (secret, coefficients, at1, at3) = hand_example();
        assert_eq!(to_chunks(&secret)[..], [5, 0xff, 0, 0, 0]);
        let shares = evaluate(&coefficients, 2, &[1, 3]);
        assert_eq!(shares, vec![share(1, at1.y), share(3, at3.y)]);
        assert_eq!(*combine(&[&at1, &at3], 2).expect("valid in this test"), secret);
        assert_eq!(*combine(&[&at3, &at1], 2).expect("valid in this test"), secret);
        // Read as a threshold-1 sharing, one share alone is its own constant term; chunk 3 of
        // `at1` is 2^60, which no secret encodes.
        assert_eq!(combine(&[&at1], 1), Err(ShamirError::Inconsistent));
        // A wrong value changes the result: f(0) = (3/2)·y(1) − (1/2)·y(3) = 6 − 0 in chunk 0.
        let wrong = share(3, [0, 264, 0, (1 << 60) + 1, 21]);
        assert_eq!(combine(&[&at1, &wrong], 2).expect("valid in this test")[0], 6);
    }

    #[test]
    fn share_bytes_round_trip_and_layout() {
        let (_, _, at1, _) = hand_example();
        let bytes = at1.to_bytes();
        assert_eq!(&bytes[..4], &[1, 0, 0, 0]);
        assert_eq!(&bytes[4..12], &4u64.to_le_bytes());
        assert_eq!(&bytes[36..44], &7u64.to_le_bytes());
        assert_eq!(Share::from_bytes(&bytes[..]).expect("valid in this test"), at1);
    }

    #[test]
    fn malformed_bytes_refused() {
        let (_, _, at1, _) = hand_example();
        let good = at1.to_bytes();
        assert_eq!(Share::from_bytes(&good[..43]), Err(ShamirError::WrongLength(43)));
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(Share::from_bytes(&long), Err(ShamirError::WrongLength(45)));
        assert_eq!(Share::from_bytes(&[]), Err(ShamirError::WrongLength(0)));
        let mut zero_x = *good;
        zero_x[..4].copy_from_slice(&[0; 4]);
        assert_eq!(Share::from_bytes(&zero_x), Err(ShamirError::ZeroX));
        for c in 0..CHUNKS {
            for bad in [PRIME, PRIME + 1, u64::MAX] {
                let mut out_of_field = *good;
                out_of_field[4 + 8 * c..12 + 8 * c].copy_from_slice(&bad.to_le_bytes());
                assert_eq!(Share::from_bytes(&out_of_field), Err(ShamirError::OutOfField));
            }
            let mut largest = *good;
            largest[4 + 8 * c..12 + 8 * c].copy_from_slice(&(PRIME - 1).to_le_bytes());
            assert!(Share::from_bytes(&largest).is_ok());
        }
    }

    #[test]
    fn bad_parameters_refused() {
        let mut rng = seeded_rng(2);
        let secret = [7u8; 32];
        assert_eq!(
            split(&secret, 0, &[1, 2], &mut rng),
            Err(ShamirError::InvalidThreshold { threshold: 0, n_shares: 2 })
        );
        assert_eq!(
            split(&secret, 3, &[1, 2], &mut rng),
            Err(ShamirError::InvalidThreshold { threshold: 3, n_shares: 2 })
        );
        assert_eq!(split(&secret, 2, &[1, 2, 1], &mut rng), Err(ShamirError::DuplicateX(1)));
        assert_eq!(split(&secret, 2, &[3, 0, 1], &mut rng), Err(ShamirError::ZeroX));

        let shares = split(&secret, 2, &[1, 2, 3], &mut rng).expect("valid in this test");
        assert_eq!(combine(&shares[..1], 2), Err(ShamirError::TooFewShares { threshold: 2, got: 1 }));
        assert!(matches!(combine(&shares, 0), Err(ShamirError::InvalidThreshold { .. })));
        // The same share twice is a duplicate x, not two shares.
        assert_eq!(combine(&[&shares[1], &shares[1]], 2), Err(ShamirError::DuplicateX(2)));
        // A share with the same x but another value is refused the same way.
        let forged = share(2, [0; CHUNKS]);
        assert_eq!(combine(&[&shares[1], &forged, &shares[0]], 2), Err(ShamirError::DuplicateX(2)));
        assert_eq!(*combine(&[&shares[2], &shares[0]], 2).expect("valid in this test"), secret);
    }

    #[test]
    fn inconsistent_shares_detected() {
        let mut rng = seeded_rng(3);
        let a = split(&[1u8; 32], 2, &[1, 2, 3], &mut rng).expect("valid in this test");
        let b = split(&[2u8; 32], 2, &[1, 2, 3], &mut rng).expect("valid in this test");
        // Shares of two different sharings interpolate to a uniform field element, which
        // decodes (all five chunks in range) with probability ≈ 2^−54.
        assert_eq!(combine(&[&a[0], &b[1]], 2), Err(ShamirError::Inconsistent));
        // A chunk exactly at its bound is refused, one below is accepted.
        let top = share(1, [(1 << 56) - 1, 0, 0, 0, (1 << 32) - 1]);
        assert!(combine(&[&top], 1).is_ok());
        assert_eq!(combine(&[&share(1, [1 << 56, 0, 0, 0, 0])], 1), Err(ShamirError::Inconsistent));
        assert_eq!(combine(&[&share(1, [0, 0, 0, 0, 1 << 32])], 1), Err(ShamirError::Inconsistent));
    }

    #[test]
    fn debug_does_not_print_values() {
        let (_, _, at1, _) = hand_example();
        let printed = format!("{at1:?}");
        assert!(printed.contains("x: 1"));
        assert!(!printed.contains("258"));
    }

    /// Chi-square statistic of `values` (in `[0, p)`) over 16 equal buckets of the top bits.
    fn chi_square_16(values: &[u64]) -> f64 {
        let mut counts = [0u64; 16];
        for v in values {
            counts[(v >> 57) as usize] += 1;
        }
        let expected = values.len() as f64 / 16.0;
        counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
    }

    /// With t = 2 one share's values are uniform on GF(p) whatever the secret: the chunk
    /// values of the share at x = 1 pass a chi-square test (16 buckets, 15 degrees of freedom,
    /// critical value 56.49 at p = 10^−6) for an all-zero and an all-0xff secret, while the
    /// secret's own chunks (constant) fail it, showing the test has power.
    #[test]
    fn one_share_of_two_is_uniform_whatever_the_secret() {
        const CRITICAL: f64 = 56.49;
        let mut rng = seeded_rng(4);
        for secret in [[0u8; 32], [0xffu8; 32]] {
            let mut values = Vec::new();
            for _ in 0..8_000 {
                let shares = split(&secret, 2, &[1, 2], &mut rng).expect("valid in this test");
                values.extend_from_slice(&shares[0].y[..4]); // the four 7-byte chunks
            }
            let statistic = chi_square_16(&values);
            assert!(statistic < CRITICAL, "chi-square {statistic} for secret {secret:?}");
        }
        let constant = vec![to_chunks(&[0xffu8; 32])[0]; 32_000];
        assert!(chi_square_16(&constant) > CRITICAL);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any t of n shares, in any order, give the secret back.
        #[test]
        fn any_t_of_n_reconstruct(
            secret in any::<[u8; 32]>(),
            n in 1usize..=40,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
            first_x in 1u32..1000,
        ) {
            let t = 1 + ((n as f64 - 1.0) * t_frac) as usize;
            let mut rng = seeded_rng(seed);
            let xs: Vec<u32> = (0..n as u32).map(|i| first_x + 3 * i).collect();
            let shares = split(&secret, t, &xs, &mut rng).expect("valid in this test");
            prop_assert_eq!(shares.len(), n);
            for (s, &x) in shares.iter().zip(&xs) {
                prop_assert_eq!(s.x(), x);
            }
            let mut order: Vec<usize> = (0..n).collect();
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
            let subset: Vec<&Share> = order[..t].iter().map(|&i| &shares[i]).collect();
            prop_assert_eq!(*combine(&subset, t).expect("valid in this test"), secret);
            // Through bytes, as shares travel.
            let parsed: Vec<Share> = subset
                .iter()
                .map(|s| Share::from_bytes(&s.to_bytes()[..]).expect("valid in this test"))
                .collect();
            prop_assert_eq!(*combine(&parsed, t).expect("valid in this test"), secret);
        }

        /// t − 1 shares are consistent with every candidate secret: for any other secret there
        /// is a polynomial through it and the t − 1 shares, i.e. a t-th share that completes
        /// them to that secret. So t − 1 shares cannot tell secrets apart.
        #[test]
        fn t_minus_one_shares_fit_any_secret(
            secret in any::<[u8; 32]>(),
            candidate in any::<[u8; 32]>(),
            t in 2usize..10,
            seed in any::<u64>(),
        ) {
            let mut rng = seeded_rng(seed);
            let xs: Vec<u32> = (1..=t as u32 + 2).collect();
            let shares = split(&secret, t, &xs, &mut rng).expect("valid in this test");
            let known: Vec<&Share> = shares[..t - 1].iter().collect();
            // The polynomial through (0, candidate) and the t − 1 known points, evaluated at
            // a fresh x (a point at x = 0 can be built here, never parsed).
            let fresh_x = 1000u32;
            let candidate_point = share(0, *to_chunks(&candidate));
            let mut points = known.clone();
            points.push(&candidate_point);
            let y = interpolate(&points, u64::from(fresh_x));
            let completing = share(fresh_x, y);
            let mut with_it = known.clone();
            with_it.push(&completing);
            prop_assert_eq!(*combine(&with_it, t).expect("valid in this test"), candidate);
            // And the real t-th share still gives the real secret.
            let mut real = known;
            real.push(&shares[t - 1]);
            prop_assert_eq!(*combine(&real, t).expect("valid in this test"), secret);
        }
    }
}
