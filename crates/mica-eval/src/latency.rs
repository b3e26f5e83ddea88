//! Latency summaries for timing tables.

use serde::{Deserialize, Serialize};

use crate::stats::quantile_linear;

/// Summary of per-image latencies, in the unit they were given in (milliseconds throughout
/// mica). Percentiles use linear interpolation (numpy's default), so they can be reproduced
/// from `predictions.jsonl` with one line of numpy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// What one latency value measures, so tables do not put a per-request time next to a
/// batch-amortised one without saying so. Serialised as `{"kind": "per-request"}`,
/// `{"kind": "per-image-amortised", "batch": 32}` or `{"kind": "per-image"}`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LatencyKind {
    /// One request to a model server (an LLM call, one image per request).
    PerRequest,
    /// Time of a batch divided by its size: cheaper per image than one image alone.
    PerImageAmortised { batch: usize },
    /// One image processed alone (batch 1).
    PerImage,
}

impl LatencyKind {
    /// Short label for table headers and captions.
    pub fn label(&self) -> String {
        match self {
            LatencyKind::PerRequest => "per request".to_string(),
            LatencyKind::PerImageAmortised { batch } => format!("per image (batch {batch} amortised)"),
            LatencyKind::PerImage => "per image (batch 1)".to_string(),
        }
    }
}

/// None for an empty slice (there is no honest number to report). Non-finite values are
/// ignored, since a missing timing must not poison the mean.
pub fn latency_summary(values: &[f64]) -> Option<LatencySummary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(LatencySummary {
        count: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: quantile_linear(&v, 0.5),
        p90: quantile_linear(&v, 0.9),
        p99: quantile_linear(&v, 0.99),
        min: v[0],
        max: v[v.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_values() {
        let s = latency_summary(&[10.0, 40.0, 20.0, 30.0, f64::NAN]).unwrap();
        assert_eq!(s.count, 4);
        assert_eq!(s.mean, 25.0);
        assert_eq!(s.p50, 25.0);
        // sorted 10 20 30 40, h = 3 * 0.9 = 2.7 -> 37; h = 2.97 -> 39.7
        assert!((s.p90 - 37.0).abs() < 1e-12);
        assert!((s.p99 - 39.7).abs() < 1e-12);
        assert_eq!((s.min, s.max), (10.0, 40.0));
        assert_eq!(latency_summary(&[]), None);
    }

    #[test]
    fn latency_kind_labels_and_json() {
        let k = LatencyKind::PerImageAmortised { batch: 32 };
        assert_eq!(k.label(), "per image (batch 32 amortised)");
        assert_eq!(LatencyKind::PerRequest.label(), "per request");
        assert_eq!(LatencyKind::PerImage.label(), "per image (batch 1)");
        let s = serde_json::to_string(&k).unwrap();
        assert_eq!(s, r#"{"kind":"per-image-amortised","batch":32}"#);
        assert_eq!(serde_json::from_str::<LatencyKind>(&s).unwrap(), k);
        assert_eq!(serde_json::to_string(&LatencyKind::PerRequest).unwrap(), r#"{"kind":"per-request"}"#);
    }
}
