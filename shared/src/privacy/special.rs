//! Special functions the accountants need, written out here so that `fedrec-shared` takes no
//! numerics dependency: `erfc` and its logarithm, the standard normal CDF, its logarithm and
//! inverse, and sums in log space.
//!
//! `erf` comes from its everywhere-positive power series for small arguments; `erfc` from its
//! continued fraction for the rest, kept scaled by `exp(x²)` so that logarithms of far tails
//! (down to `log erfc(1e150)`) never underflow. Both converge to full double precision; the
//! unit tests check them against SciPy's values.

use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI, LN_2};

/// Below this argument `erfc` is `1 - erf` (series); at and above it, the continued fraction.
const SERIES_LIMIT: f64 = 1.5;

/// `erf(x)` for `0 <= x < SERIES_LIMIT`, from `erf(x) = 2/√π · e^{-x²} · Σ 2ⁿ x^{2n+1} / (2n+1)!!`.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    // All terms are positive and, past n ≈ x², shrink geometrically: at most ~40 of them.
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    FRAC_2_SQRT_PI * (-x2).exp() * sum
}

/// `exp(x²)·erfc(x)` for `x >= SERIES_LIMIT`, by the modified Lentz method on
/// `erfc(x) = e^{-x²}/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …))))`.
/// A `const fn` so that [`ERFCX_TABLE`] is built at compile time.
const fn erfcx_continued_fraction(x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut f = x;
    let mut c = x;
    let mut d = 0.0;
    // About 90 terms at x = 1.5, 30 at x = 3, fewer further out.
    let mut n = 1;
    while n <= 500 {
        let a = n as f64 * 0.5;
        d = x + a * d;
        if d == 0.0 {
            d = TINY;
        }
        d = 1.0 / d;
        c = x + a / c;
        if c == 0.0 {
            c = TINY;
        }
        let step = c * d;
        f *= step;
        if (step - 1.0).abs() < 1e-16 {
            break;
        }
        n += 1;
    }
    0.5 * FRAC_2_SQRT_PI / f
}

/// Spacing of the [`ERFCX_TABLE`] centres.
const TABLE_STEP: f64 = 1.0 / 32.0;
/// Past this argument the continued fraction needs few terms and is used directly.
const TABLE_END: f64 = 8.0;
const TABLE_LEN: usize = ((TABLE_END - SERIES_LIMIT) / TABLE_STEP) as usize + 1;

/// `exp(x²)·erfc(x)` at `SERIES_LIMIT + k·TABLE_STEP`, from the continued fraction.
static ERFCX_TABLE: [f64; TABLE_LEN] = {
    let mut table = [0.0; TABLE_LEN];
    let mut k = 0;
    while k < TABLE_LEN {
        table[k] = erfcx_continued_fraction(SERIES_LIMIT + k as f64 * TABLE_STEP);
        k += 1;
    }
    table
};

/// `exp(x²)·erfc(x)` for `x >= SERIES_LIMIT`. Between `SERIES_LIMIT` and `TABLE_END`, where
/// the continued fraction is slow, a Taylor series about the nearest table centre `x₀`
/// (`|x − x₀| ≤ 1/64`), whose derivatives follow from `y' = 2xy − 2/√π`:
/// `y⁽ⁿ⁺¹⁾ = 2x₀y⁽ⁿ⁾ + 2n·y⁽ⁿ⁻¹⁾`. About a dozen terms reach full precision.
fn erfcx(x: f64) -> f64 {
    if x >= TABLE_END {
        return erfcx_continued_fraction(x);
    }
    // x ≥ SERIES_LIMIT here, so the index is non-negative and below TABLE_LEN.
    let k = ((x - SERIES_LIMIT) / TABLE_STEP).round() as usize;
    let x0 = SERIES_LIMIT + k as f64 * TABLE_STEP;
    let t = x - x0;
    let y0 = ERFCX_TABLE[k];
    // c_n = y⁽ⁿ⁾(x₀) tⁿ / n!, so c_{n+1} = (2x₀t·c_n + 2t²·c_{n−1}) / (n + 1).
    let mut prev = y0;
    let mut cur = (2.0 * x0 * y0 - FRAC_2_SQRT_PI) * t;
    let mut sum = prev + cur;
    let mut n = 1.0;
    while n < 40.0 && cur.abs() > 1e-17 * sum.abs() {
        let next = (2.0 * x0 * t * cur + 2.0 * t * t * prev) / (n + 1.0);
        prev = cur;
        cur = next;
        sum += cur;
        n += 1.0;
    }
    sum
}

/// The complementary error function.
pub(crate) fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x < 0.0 {
        2.0 - erfc(-x)
    } else if x < SERIES_LIMIT {
        1.0 - erf_series(x)
    } else if x > 27.5 {
        // erfc(27.5) < 1e-330: below the smallest subnormal.
        0.0
    } else {
        (-x * x).exp() * erfcx(x)
    }
}

/// `ln(erfc(x))`, accurate also where `erfc(x)` underflows.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x < 0.0 {
        // erfc(x) = 2 - erfc(-x), in (1, 2].
        LN_2 + (-0.5 * erfc(-x)).ln_1p()
    } else if x < SERIES_LIMIT {
        (-erf_series(x)).ln_1p()
    } else if x == f64::INFINITY {
        f64::NEG_INFINITY
    } else {
        -x * x + erfcx(x).ln()
    }
}

/// The standard normal CDF `Φ(z)`.
pub(crate) fn ndtr(z: f64) -> f64 {
    0.5 * erfc(-z * FRAC_1_SQRT_2)
}

/// `ln Φ(z)`, accurate in both tails.
pub(crate) fn log_ndtr(z: f64) -> f64 {
    if z > 0.0 {
        // Φ(z) = 1 − Φ(−z): keep the tiny Φ(−z) rather than adding and removing ln 2.
        (-0.5 * erfc(z * FRAC_1_SQRT_2)).ln_1p()
    } else {
        -LN_2 + log_erfc(-z * FRAC_1_SQRT_2)
    }
}

/// The `z` with `ln Φ(z) = log_p`, for `log_p < ln(1/2)` (a lower-tail quantile), by Newton's
/// method on the concave `ln Φ`.
pub(crate) fn ndtri_from_log(log_p: f64) -> f64 {
    debug_assert!(log_p < -LN_2, "ndtri_from_log is for lower-tail quantiles");
    // Start from the leading term of the tail asymptotics, ln Φ(z) ≈ -z²/2.
    let mut z = -(-2.0 * log_p).sqrt();
    for _ in 0..100 {
        let log_cdf = log_ndtr(z);
        // d/dz ln Φ(z) = φ(z) / Φ(z).
        let slope = (-0.5 * z * z - 0.5 * (2.0 * std::f64::consts::PI).ln() - log_cdf).exp();
        let step = (log_cdf - log_p) / slope;
        z -= step;
        if step.abs() <= 1e-15 * z.abs() {
            break;
        }
    }
    z
}

/// `ln(eᵃ + eᵇ)`, exact when either side is `-∞`.
pub(crate) fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_rel(got: f64, want: f64, tol: f64, what: &str) {
        let err = if want == 0.0 { got.abs() } else { ((got - want) / want).abs() };
        assert!(err <= tol, "{what}: got {got:e}, want {want:e} (relative error {err:e})");
    }

    /// Values from SciPy 1.17 (`scipy.special.erfc`).
    #[test]
    fn erfc_matches_known_values() {
        let cases = [
            (-3.0, 1.9999779095030015),
            (-1.0, 1.8427007929497148),
            (0.0, 1.0),
            (0.1, 0.8875370839817152),
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028516),
            (1.4999, 0.033906748337704726),
            (1.5, 0.03389485352468927),
            (2.0, 0.004677734981047266),
            (3.0, 2.2090496998585445e-05),
            (5.0, 1.5374597944280347e-12),
            (10.0, 2.0884875837625446e-45),
            (26.0, 5.663192408856145e-296),
        ];
        for (x, want) in cases {
            assert_rel(erfc(x), want, 1e-14, &format!("erfc({x})"));
            assert_rel(log_erfc(x), want.ln(), 1e-14, &format!("log_erfc({x})"));
        }
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
        assert!(erfc(f64::NAN).is_nan());
    }

    /// Values from SciPy 1.17 (`scipy.special.log_ndtr`, `ndtr`, `ndtri`).
    #[test]
    fn normal_cdf_matches_known_values() {
        let cases = [
            (-60.0, -1805.0135606805675, 0.0),
            (-38.0, -726.5572160188201, 0.0),
            (-20.0, -203.9171553710973, 2.7536241186061556e-89),
            (-8.0, -35.01343715991456, 6.22096057427174e-16),
            (-1.0, -1.8410216450092634, 0.15865525393145707),
            (0.0, -LN_2, 0.5),
            (1.0, -0.1727537790234499, 0.8413447460685429),
            (3.0, -0.0013508099647481925, 0.9986501019683699),
            (8.0, -6.220960574271742e-16, 0.9999999999999993),
            (20.0, -2.7536241186061556e-89, 1.0),
        ];
        for (z, log_cdf, cdf) in cases {
            assert_rel(log_ndtr(z), log_cdf, 1e-13, &format!("log_ndtr({z})"));
            assert_rel(ndtr(z), cdf, 1e-14, &format!("ndtr({z})"));
        }
        let p = 0.5 * (-50.0f64).exp();
        assert_rel(ndtri_from_log(p.ln()), -9.745474864965935, 1e-14, "ndtri(0.5 e^-50)");
    }

    #[test]
    fn tabulated_erfcx_matches_the_continued_fraction() {
        let mut x = SERIES_LIMIT;
        while x < TABLE_END + 0.5 {
            assert_rel(erfcx(x), erfcx_continued_fraction(x), 5e-15, &format!("erfcx({x})"));
            x += 0.001_3;
        }
    }

    #[test]
    fn log_add_handles_infinities() {
        assert_eq!(log_add(f64::NEG_INFINITY, 3.0), 3.0);
        assert_eq!(log_add(3.0, f64::NEG_INFINITY), 3.0);
        assert_rel(log_add(0.0, 0.0), LN_2, 1e-16, "log_add(0, 0)");
        assert_rel(log_add(1000.0, 1000.0), 1000.0 + LN_2, 1e-16, "log_add(1000, 1000)");
    }
}
