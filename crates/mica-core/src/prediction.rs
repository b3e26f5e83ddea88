//! One classifier's answer for one image: the line format of `predictions.jsonl`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What became of an image. Only `Answered` and `Deferred` carry a label; the other three are
/// reported as their own outcomes and never silently counted as some class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A label the filter (if any) accepted.
    Answered,
    /// A label was produced, but a filter stage sent the case to a physician.
    Deferred,
    /// The model answered, but nothing in the answer maps onto the label set.
    Unparseable,
    /// The model declined to answer (an OpenAI `refusal`, or prose such as "I can't help with
    /// medical images"); counted as no answer. Its text is kept in `raw_answer`.
    Refused,
    /// No answer at all (HTTP error after all retries, unreadable image, ...).
    Failed,
}

impl Outcome {
    /// Every outcome, in report order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Answered,
        Outcome::Deferred,
        Outcome::Unparseable,
        Outcome::Refused,
        Outcome::Failed,
    ];

    /// True for the outcomes that carry no label (unparseable, refused, failed): they count as
    /// wrong in accuracy over all images.
    pub fn is_no_answer(self) -> bool {
        matches!(self, Outcome::Unparseable | Outcome::Refused | Outcome::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Deferred => "deferred",
            Outcome::Unparseable => "unparseable",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
}

/// The verdict of one filter stage on one prediction, kept so every deferral can be explained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterStage {
    pub stage: String,
    /// `kept` or `deferred` (or `unparseable` / `refused` for label validation).
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub sample_id: String,
    pub classifier: String,
    /// Ground truth, when the dataset has it.
    pub true_label: Option<String>,
    /// The label the classifier chose (also set for deferred cases).
    pub predicted: Option<String>,
    pub outcome: Outcome,
    /// Confidence in `predicted`, 0..=1: the softmax maximum for CNNs, the stated (or
    /// logprob-derived) confidence for LLMs.
    pub confidence: Option<f64>,
    /// Class probabilities keyed by label name, when the classifier gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<BTreeMap<String, f64>>,
    /// Wall-clock time spent on this image (for batched inference: batch time / batch size).
    pub latency_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// The model's raw text answer (LLMs), kept for audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_answer: Option<String>,
    /// Which parsing stage produced the label (`json`, `exact`, `synonym`, `fuzzy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_stage: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<FilterStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The HTTP status of the request that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The failure would repeat on every further request (bad key, unknown model, a parameter
    /// the server rejects, an exhausted quota): the run stops early instead of asking again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub permanent_error: bool,
    /// The answer came from mica's LLM simulator, not a model: never a real figure.
    #[serde(default, skip_serializing_if = "is_false")]
    pub simulated: bool,
    /// The answer was replayed from the response cache rather than asked now.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cached: bool,
    /// Confidence is below the review threshold: a physician must look at this case.
    #[serde(default, skip_serializing_if = "is_false")]
    pub needs_review: bool,
    /// The model the server says answered (`model` in the response body), which for an alias
    /// such as `gpt-4o` names the dated snapshot behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_model: Option<String>,
    /// OpenAI's `system_fingerprint`: changes when the serving configuration behind a model does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Content digest of the model weights, where the server reports one (Ollama).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_digest: Option<String>,
    /// Why generation stopped (`stop`, `length`, `content_filter`, ...): a `length` answer was
    /// cut off, which explains many unparseable ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Backend-specific extras (e.g. Ollama's load/eval durations, attempts made).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Prediction {
    /// A prediction with only the identifying fields set; backends fill in the rest.
    pub fn new(sample_id: impl Into<String>, classifier: impl Into<String>, outcome: Outcome) -> Self {
        Prediction {
            sample_id: sample_id.into(),
            classifier: classifier.into(),
            true_label: None,
            predicted: None,
            outcome,
            confidence: None,
            probabilities: None,
            latency_ms: 0.0,
            tokens: None,
            cost_usd: None,
            raw_answer: None,
            parse_stage: None,
            filter: Vec::new(),
            rationale: None,
            error: None,
            http_status: None,
            permanent_error: false,
            simulated: false,
            cached: false,
            needs_review: false,
            resolved_model: None,
            system_fingerprint: None,
            model_digest: None,
            finish_reason: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Moves the flags that older files carried in `extra` (`simulated`, `cached`,
    /// `needs_review`, `http_status`) into their typed fields, so old run directories load
    /// with the same meaning.
    pub fn upgrade_legacy(&mut self) {
        for (key, field) in [
            ("simulated", &mut self.simulated),
            ("cached", &mut self.cached),
            ("needs_review", &mut self.needs_review),
        ] {
            if let Some(v) = self.extra.remove(key) {
                *field |= v.as_bool() == Some(true);
            }
        }
        if let Some(v) = self.extra.remove("http_status") {
            if self.http_status.is_none() {
                self.http_status = v.as_u64().and_then(|s| u16::try_from(s).ok());
            }
        }
    }

    /// True when the case carries a label that the filter accepted.
    pub fn is_accepted(&self) -> bool {
        self.outcome == Outcome::Answered
    }
}

/// Numerically stable softmax of one row of logits: the class probabilities every local
/// classifier (mica's CNN engine, ONNX models that output logits) reports.
pub fn softmax(z: &[f32]) -> Vec<f32> {
    let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_from_older_files_land_in_typed_fields() {
        let line = r#"{"sample_id":"a","classifier":"c","true_label":null,"predicted":"x","outcome":"answered","confidence":0.4,"latency_ms":1.0,"extra":{"simulated":true,"cached":false,"needs_review":true,"http_status":401,"attempts":2}}"#;
        let mut p: Prediction = serde_json::from_str(line).unwrap();
        p.upgrade_legacy();
        assert!(p.simulated && !p.cached && p.needs_review);
        assert_eq!(p.http_status, Some(401));
        assert_eq!(p.extra.len(), 1, "only backend extras stay: {:?}", p.extra);
        let back = serde_json::to_string(&p).unwrap();
        assert!(back.contains(r#""simulated":true"#) && !back.contains("cached"), "{back}");
    }

    #[test]
    fn refused_is_its_own_outcome_and_old_outcomes_still_read() {
        let line = r#"{"sample_id":"a","classifier":"c","true_label":"x","predicted":null,"outcome":"refused","confidence":null,"latency_ms":1.0,"raw_answer":"I can't help with that."}"#;
        let p: Prediction = serde_json::from_str(line).unwrap();
        assert_eq!(p.outcome, Outcome::Refused);
        assert!(p.outcome.is_no_answer() && !p.is_accepted());
        assert!(serde_json::to_string(&p).unwrap().contains(r#""outcome":"refused""#));
        for o in Outcome::ALL {
            let s = serde_json::to_string(&o).unwrap();
            assert_eq!(s, format!("\"{}\"", o.as_str()));
            assert_eq!(serde_json::from_str::<Outcome>(&s).unwrap(), o);
        }
        assert!(!Outcome::Answered.is_no_answer() && !Outcome::Deferred.is_no_answer());
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let p: Vec<Vec<f32>> = [[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]].iter().map(|r| softmax(r)).collect();
        for row in &p {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert!(p[0][2] > p[0][1] && p[0][1] > p[0][0]);
        assert_eq!(p[1][0], 1.0);
    }
}
