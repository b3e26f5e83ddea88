//! Small statistics: quantiles, McNemar's test and Holm's correction for multiple tests.

use serde::{Deserialize, Serialize};

use crate::{EvalError, NO_ANSWER};

/// Quantile of sorted data with linear interpolation between order statistics (numpy's default
/// `percentile` method): position `h = (n - 1) q`.
pub fn quantile_linear(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of nothing");
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = h - lo as f64;
    // numpy's "linear" form, which stays exact when both neighbours are equal.
    sorted[lo] + frac * (sorted[hi] - sorted[lo])
}

/// McNemar's test on the cases where exactly one of two classifiers is right.
///
/// `b` = A right and B wrong, `c` = A wrong and B right. With `b + c < 25` the test is exact:
/// `statistic = min(b, c)` and the two-sided binomial p-value `min(1, 2 P(X <= min(b, c)))`,
/// X ~ Bin(b + c, 1/2). Otherwise the chi-squared approximation with continuity correction:
/// `statistic = (|b - c| - 1)^2 / (b + c)`, p from the chi-squared distribution with 1 degree of
/// freedom. Both match statsmodels' `mcnemar(table, exact=..., correction=True)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// Cases compared.
    pub n: usize,
    pub b: u64,
    pub c: u64,
    pub statistic: f64,
    pub p_value: f64,
    pub exact: bool,
}

impl McNemar {
    /// Share of cases A got right minus share B got right (positive: A better).
    pub fn accuracy_difference(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            (self.b as f64 - self.c as f64) / self.n as f64
        }
    }
}

/// Below this many discordant pairs the exact binomial test is used.
pub const MCNEMAR_EXACT_BELOW: u64 = 25;

/// McNemar's test of A against B on the same cases; a [`NO_ANSWER`] prediction is wrong.
pub fn mcnemar(y_true: &[usize], pred_a: &[usize], pred_b: &[usize]) -> Result<McNemar, EvalError> {
    if y_true.len() != pred_a.len() || y_true.len() != pred_b.len() {
        return Err(EvalError::input(format!(
            "McNemar needs paired predictions: {} true labels, {} from A, {} from B",
            y_true.len(),
            pred_a.len(),
            pred_b.len()
        )));
    }
    if y_true.is_empty() {
        return Err(EvalError::Empty);
    }
    let (mut b, mut c) = (0u64, 0u64);
    for i in 0..y_true.len() {
        let a_ok = pred_a[i] == y_true[i] && pred_a[i] != NO_ANSWER;
        let b_ok = pred_b[i] == y_true[i] && pred_b[i] != NO_ANSWER;
        match (a_ok, b_ok) {
            (true, false) => b += 1,
            (false, true) => c += 1,
            _ => {}
        }
    }
    Ok(mcnemar_from_counts(y_true.len(), b, c))
}

pub fn mcnemar_from_counts(n: usize, b: u64, c: u64) -> McNemar {
    let d = b + c;
    if d < MCNEMAR_EXACT_BELOW {
        let m = b.min(c);
        let p = if d == 0 { 1.0 } else { (2.0 * binom_cdf_half(m, d)).min(1.0) };
        McNemar {
            n,
            b,
            c,
            statistic: m as f64,
            p_value: p,
            exact: true,
        }
    } else {
        let diff = (b as f64 - c as f64).abs() - 1.0;
        let stat = diff * diff / d as f64;
        McNemar {
            n,
            b,
            c,
            statistic: stat,
            p_value: chi2_sf_1(stat),
            exact: false,
        }
    }
}

/// P(X <= m) for X ~ Bin(d, 1/2); exact in f64 for the small d it is used with.
fn binom_cdf_half(m: u64, d: u64) -> f64 {
    let mut coef = 1.0f64; // C(d, 0)
    let mut sum = 0.0f64;
    for i in 0..=m {
        if i > 0 {
            coef = coef * (d - i + 1) as f64 / i as f64;
        }
        sum += coef;
    }
    sum / 2f64.powi(d as i32)
}

/// Survival function of chi-squared with 1 degree of freedom: erfc(sqrt(x / 2)).
pub fn chi2_sf_1(x: f64) -> f64 {
    if x <= 0.0 {
        1.0
    } else {
        libm::erfc((x / 2.0).sqrt())
    }
}

/// Holm-Bonferroni step-down adjusted p-values, in the input order: with the `m` p-values
/// sorted ascending, the `i`-th (1-based) becomes `max_{j <= i} min(1, (m - j + 1) p_(j))`, so
/// the adjusted values are monotone in the raw ones and capped at 1. Rejecting where the
/// adjusted value is `<= alpha` controls the family-wise error rate at `alpha` (statsmodels'
/// `multipletests(p, method="holm")[1]`). A NaN p-value is no test: it stays NaN and does not
/// count towards `m`. Equal p-values keep their input order, which leaves their adjusted
/// values equal (the running maximum carries the larger one).
pub fn holm(p_values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p_values.len()).filter(|&i| !p_values[i].is_nan()).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let m = order.len();
    let mut out = vec![f64::NAN; p_values.len()];
    let mut running = 0.0f64;
    for (j, &i) in order.iter().enumerate() {
        let scaled = ((m - j) as f64 * p_values[i]).min(1.0);
        running = running.max(scaled);
        out[i] = running;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holm_hand_values() {
        // sorted 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06)
        let a = holm(&[0.03, 0.01, 0.04, 0.02]);
        let want = [0.06, 0.04, 0.06, 0.06];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-15, "{a:?}");
        }
        // Monotone step-down: 0.001 x3 = 0.003; 0.5 x2 = 1 (capped); 0.6 -> max(1, 0.6) = 1.
        assert_eq!(holm(&[0.6, 0.001, 0.5]), vec![1.0, 0.003, 1.0]);
        // A later smaller product cannot drop below an earlier one: 0.02 x2 = 0.04, 0.03 x1 -> 0.04.
        let b = holm(&[0.03, 0.02]);
        assert!((b[0] - 0.04).abs() < 1e-15 && (b[1] - 0.04).abs() < 1e-15, "{b:?}");
        // Ties get equal values; one test is unchanged; NaN is no test.
        assert_eq!(holm(&[0.2, 0.2]), vec![0.4, 0.4]);
        assert_eq!(holm(&[0.3]), vec![0.3]);
        let c = holm(&[0.01, f64::NAN, 0.04]);
        assert!(c[1].is_nan());
        assert!((c[0] - 0.02).abs() < 1e-15 && (c[2] - 0.04).abs() < 1e-15, "{c:?}");
        assert!(holm(&[]).is_empty());
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_linear(&v, 0.0), 1.0);
        assert_eq!(quantile_linear(&v, 1.0), 4.0);
        // h = 3 * 0.5 = 1.5 -> 2.5 ; h = 3 * 0.9 = 2.7 -> 3.7
        assert_eq!(quantile_linear(&v, 0.5), 2.5);
        assert!((quantile_linear(&v, 0.9) - 3.7).abs() < 1e-12);
        assert_eq!(quantile_linear(&[5.0], 0.3), 5.0);
    }

    #[test]
    fn exact_mcnemar_hand_values() {
        // b = 1, c = 4: P(X <= 1 | 5, 1/2) = (1 + 5) / 32 -> p = 12/32 = 0.375
        let m = mcnemar_from_counts(10, 1, 4);
        assert!(m.exact);
        assert_eq!(m.statistic, 1.0);
        assert!((m.p_value - 0.375).abs() < 1e-15);
        // b = c: p = 1 (clipped)
        assert_eq!(mcnemar_from_counts(10, 3, 3).p_value, 1.0);
        assert_eq!(mcnemar_from_counts(10, 0, 0).p_value, 1.0);
        // b = 0, c = 10: 2 / 1024
        assert!((mcnemar_from_counts(10, 0, 10).p_value - 2.0 / 1024.0).abs() < 1e-15);
    }

    #[test]
    fn chi2_mcnemar_hand_values() {
        // b = 30, c = 10: (20 - 1)^2 / 40 = 9.025; chi2.sf(9.025, 1) = 0.0026635...
        let m = mcnemar_from_counts(100, 30, 10);
        assert!(!m.exact);
        assert!((m.statistic - 9.025).abs() < 1e-12);
        assert!((m.p_value - 0.002663119259).abs() < 1e-9, "{}", m.p_value);
        // chi2.sf(3.841458820694124, 1) = 0.05
        assert!((chi2_sf_1(3.841458820694124) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn mcnemar_counts_discordant_pairs_and_no_answer_is_wrong() {
        let t = [0, 1, 0, 1, 0];
        let a = [0, 1, 1, NO_ANSWER, 0];
        let b = [0, 0, 0, 1, NO_ANSWER];
        let m = mcnemar(&t, &a, &b).unwrap();
        // A right only on 1 and 4; B right only on 2 and 3.
        assert_eq!((m.b, m.c, m.n), (2, 2, 5));
        assert_eq!(m.accuracy_difference(), 0.0);
        assert!(mcnemar(&t, &a, &b[..4]).is_err());
    }
}
