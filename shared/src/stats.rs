//! Small statistical tests the privacy tests use: the chi-square tail and the two-sample chi-square test of homogeneity on histograms of words (is what a coordinator receives independent of the update?).

/// `P(χ²_df > x)`, the regularised upper incomplete gamma function `Q(df/2, x/2)` (series below
/// `a + 1`, continued fraction above; Numerical Recipes §6.2).
pub fn chi2_sf(x: f64, df: f64) -> f64 {
    let (a, x) = (df / 2.0, x / 2.0);
    if x <= 0.0 {
        return 1.0;
    }
    let ln_prefactor = -x + a * x.ln() - ln_gamma(a);
    if x < a + 1.0 {
        let (mut ap, mut del) = (a, 1.0 / a);
        let mut sum = del;
        for _ in 0..10_000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * ln_prefactor.exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        ln_prefactor.exp() * h
    }
}

/// `ln Γ(x)` for `x > 0` (Lanczos, as in Numerical Recipes' `gammln`).
fn ln_gamma(x: f64) -> f64 {
    const COF: [f64; 6] = [
        76.18009172947146,
        -86.50532032941677,
        24.01409824083091,
        -1.231739572450155,
        0.1208650973866179e-2,
        -0.5395239384953e-5,
    ];
    let mut y = x;
    let tmp = x + 5.5;
    let tmp = tmp - (x + 0.5) * tmp.ln();
    let mut ser = 1.000000000190015;
    for c in COF {
        y += 1.0;
        ser += c / y;
    }
    -tmp + (2.5066282746310005 * ser / x).ln()
}

/// The p-value of the two-sample chi-square test of homogeneity on histograms `a` and `b`
/// (bins empty in both are left out).
pub fn chi2_two_sample(a: &[u64], b: &[u64]) -> f64 {
    let (na, nb) = (a.iter().sum::<u64>() as f64, b.iter().sum::<u64>() as f64);
    let mut stat = 0.0;
    let mut bins = 0;
    for (&x, &y) in a.iter().zip(b) {
        let col = (x + y) as f64;
        if col == 0.0 {
            continue;
        }
        bins += 1;
        let (ea, eb) = (na * col / (na + nb), nb * col / (na + nb));
        stat += (x as f64 - ea).powi(2) / ea + (y as f64 - eb).powi(2) / eb;
    }
    chi2_sf(stat, (bins - 1).max(1) as f64)
}

/// The histogram of `(w >> shift) & (2^width − 1)` over `words` (`2^width` bins).
pub fn histogram(words: &[u64], shift: u32, width: u32) -> Vec<u64> {
    let mask = (1u64 << width) - 1;
    let mut h = vec![0u64; 1 << width];
    for &w in words {
        h[((w >> shift) & mask) as usize] += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi2_tail_matches_tables() {
        // Upper quantiles of χ² with 15 degrees of freedom (any statistics table).
        assert!((chi2_sf(30.578, 15.0) - 0.01).abs() < 2e-4);
        assert!((chi2_sf(7.261, 15.0) - 0.95).abs() < 2e-3);
        assert!((chi2_sf(3.841, 1.0) - 0.05).abs() < 2e-4);
        assert_eq!(chi2_sf(0.0, 3.0), 1.0);
    }

    #[test]
    fn the_two_sample_test_tells_different_histograms_apart() {
        let same = chi2_two_sample(&[100, 100, 100, 100], &[98, 103, 101, 99]);
        let different = chi2_two_sample(&[100, 100, 100, 100], &[200, 50, 100, 50]);
        assert!(same > 0.5, "{same}");
        assert!(different < 1e-6, "{different}");
        assert_eq!(histogram(&[0x00, 0x11, 0x1f, 0x20], 4, 4)[..3], [1, 2, 1]);
    }
}
