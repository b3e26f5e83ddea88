//! Selective prediction: what accuracy a classifier reaches if only its more confident answers
//! are accepted and the rest go to a physician. A filter that raises accuracy by deferring half
//! the cases must show that cost; the risk-coverage curve does.

use serde::{Deserialize, Serialize};

/// Accepting every labelled case with `confidence >= threshold` covers `coverage` of all images
/// with `accuracy` on the accepted ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RiskCoveragePoint {
    pub threshold: f64,
    /// Accepted cases / all images (including those that never got a label).
    pub coverage: f64,
    pub accuracy: f64,
    pub accepted: usize,
}

/// One point per distinct confidence, thresholds descending (coverage ascending). `total` is
/// the number of images the coverage is relative to (>= `confidence.len()`, since cases
/// without a label or confidence can never be accepted). Ties enter together, because a
/// threshold cannot separate them.
pub fn risk_coverage(confidence: &[f64], correct: &[bool], total: usize) -> Vec<RiskCoveragePoint> {
    assert_eq!(confidence.len(), correct.len(), "one correctness flag per confidence");
    let total = total.max(confidence.len());
    let mut order: Vec<usize> = (0..confidence.len()).collect();
    order.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
    let mut out = Vec::new();
    let (mut accepted, mut right) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let t = confidence[order[i]];
        while i < order.len() && confidence[order[i]] == t {
            accepted += 1;
            right += correct[order[i]] as usize;
            i += 1;
        }
        out.push(RiskCoveragePoint {
            threshold: t,
            coverage: accepted as f64 / total as f64,
            accuracy: right as f64 / accepted as f64,
            accepted,
        });
    }
    out
}

/// Keeps at most `max` points, evenly spaced by index, always keeping the first and last
/// (the most selective and the full-coverage ends of the curve).
pub fn thin_curve(points: Vec<RiskCoveragePoint>, max: usize) -> Vec<RiskCoveragePoint> {
    if points.len() <= max || max < 2 {
        return points;
    }
    let last = points.len() - 1;
    let mut keep: Vec<usize> = (0..max).map(|j| (j * last + (max - 1) / 2) / (max - 1)).collect();
    keep.dedup();
    keep.into_iter().map(|i| points[i]).collect()
}

/// The best accuracy reachable while still covering at least `min_coverage` of the images,
/// with the threshold that achieves it.
pub fn best_at_coverage(curve: &[RiskCoveragePoint], min_coverage: f64) -> Option<RiskCoveragePoint> {
    curve
        .iter()
        .filter(|p| p.coverage + 1e-12 >= min_coverage)
        .copied()
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy).then(b.coverage.total_cmp(&a.coverage)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_by_hand() {
        // conf 0.9 right, 0.8 wrong, 0.8 right, 0.5 wrong; 5 images (one never labelled)
        let c = risk_coverage(&[0.8, 0.9, 0.5, 0.8], &[false, true, false, true], 5);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], RiskCoveragePoint { threshold: 0.9, coverage: 0.2, accuracy: 1.0, accepted: 1 });
        assert_eq!(c[1], RiskCoveragePoint { threshold: 0.8, coverage: 0.6, accuracy: 2.0 / 3.0, accepted: 3 });
        assert_eq!(c[2], RiskCoveragePoint { threshold: 0.5, coverage: 0.8, accuracy: 0.5, accepted: 4 });
        let best = best_at_coverage(&c, 0.5).unwrap();
        assert_eq!(best.threshold, 0.8);
        assert!(risk_coverage(&[], &[], 3).is_empty());
    }

    #[test]
    fn thinning_keeps_ends() {
        let pts: Vec<_> = (0..1000)
            .map(|i| RiskCoveragePoint { threshold: 1.0 - i as f64 / 1000.0, coverage: i as f64 / 1000.0, accuracy: 1.0, accepted: i })
            .collect();
        let t = thin_curve(pts.clone(), 11);
        assert_eq!(t.len(), 11);
        assert_eq!(t[0], pts[0]);
        assert_eq!(t[10], pts[999]);
        assert_eq!(thin_curve(pts[..5].to_vec(), 11).len(), 5);
    }
}
