//! The LLM-specific section of `metrics.json`: how answers were parsed, what each filter stage
//! kept and deferred, tokens and dollars with the price used, retries, cache hits, server
//! timings, and whether the run was against the simulator.

use std::collections::BTreeMap;

use mica_core::{Outcome, Prediction};
use serde::{Deserialize, Serialize};

use crate::filter::STAGES;
use crate::{FilterSpec, PriceEntry};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageCount {
    pub stage: String,
    /// Cases that reached this stage.
    pub input: usize,
    pub kept: usize,
    pub deferred: usize,
    pub unparseable: usize,
    /// Answers in which the model declined (label validation only).
    #[serde(default)]
    pub refused: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceUsed {
    pub key: String,
    #[serde(flatten)]
    pub entry: PriceEntry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmSummary {
    /// True when any answer came from `mica llm-sim`: the numbers are not model results.
    pub simulated: bool,
    pub images: usize,
    pub outcomes: BTreeMap<String, usize>,
    /// How many labels each parsing stage produced, plus `unparseable` and `refused`.
    pub parse_stages: BTreeMap<String, usize>,
    pub filter_spec: FilterSpec,
    pub filter_stages: Vec<StageCount>,
    /// Images whose answers all came from the response cache.
    pub cached_images: usize,
    /// HTTP attempts over all images (1 per request when nothing was retried).
    pub attempts: u64,
    pub images_retried: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub prompt_tokens_per_image: f64,
    pub completion_tokens_per_image: f64,
    /// None when the model has no entry in the price table (unknown is not free).
    pub cost_usd: Option<f64>,
    pub cost_usd_per_image: Option<f64>,
    pub price: Option<PriceUsed>,
    /// The date of the price used (`price.as_of`), at the top level so every place that
    /// shows a cost can show when the price was read. `None` with no price entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_as_of: Option<String>,
    /// Hidden reasoning tokens over the run (OpenAI reasoning models): part of
    /// `completion_tokens` and of the cost already, shown apart because the answer's visible
    /// text does not account for them.
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Predictions asked without the structured-output schema because the server rejected
    /// it (JSON asked for in the prompt instead).
    #[serde(default)]
    pub structured_fallback_images: usize,
    /// Ollama's timings summed over the run: model load apart from inference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_timings_ms: Option<BTreeMap<String, f64>>,
}

impl LlmSummary {
    pub fn from_predictions(
        preds: &[Prediction],
        filter: &FilterSpec,
        price: Option<&(String, PriceEntry)>,
    ) -> Self {
        let n = preds.len();
        let mut outcomes: BTreeMap<String, usize> = Outcome::ALL
            .iter()
            .map(|o| (o.as_str().to_string(), 0))
            .collect();
        let mut parse_stages: BTreeMap<String, usize> = [
            "json",
            "exact",
            "synonym",
            "fuzzy",
            "unparseable",
            "refused",
        ]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
        let mut stages: Vec<StageCount> = STAGES
            .iter()
            .map(|s| StageCount {
                stage: s.to_string(),
                ..StageCount::default()
            })
            .collect();
        let (mut cached, mut attempts, mut retried) = (0, 0u64, 0);
        let (mut pt, mut ct) = (0u64, 0u64);
        let mut timings: BTreeMap<String, f64> = BTreeMap::new();
        let mut simulated = false;
        let mut any_cost = false;
        let mut cost = 0.0;
        for p in preds {
            *outcomes.entry(p.outcome.as_str().to_string()).or_default() += 1;
            match (&p.parse_stage, p.outcome) {
                (Some(s), _) => *parse_stages.entry(s.clone()).or_default() += 1,
                (None, Outcome::Unparseable) => *parse_stages.get_mut("unparseable").unwrap() += 1,
                (None, Outcome::Refused) => *parse_stages.get_mut("refused").unwrap() += 1,
                _ => {}
            }
            for f in &p.filter {
                if let Some(s) = stages.iter_mut().find(|s| s.stage == f.stage) {
                    s.input += 1;
                    match f.verdict.as_str() {
                        "kept" => s.kept += 1,
                        "deferred" => s.deferred += 1,
                        "refused" => s.refused += 1,
                        _ => s.unparseable += 1,
                    }
                }
            }
            let get = |k: &str| p.extra.get(k);
            cached += usize::from(p.cached);
            let a = get("attempts").and_then(|v| v.as_u64()).unwrap_or(0);
            attempts += a;
            simulated |= p.simulated;
            if let Some(t) = get("server_timings").and_then(|v| v.as_object()) {
                for (k, v) in t {
                    *timings.entry(k.clone()).or_default() += v.as_f64().unwrap_or(0.0);
                }
            }
            if let Some(t) = p.tokens {
                pt += t.prompt;
                ct += t.completion;
            }
            if let Some(c) = p.cost_usd {
                any_cost = true;
                cost += c;
            }
            // More attempts than requests made means something was retried.
            let requests = p
                .extra
                .get("answers")
                .and_then(|v| v.as_array())
                .map_or(1, |a| a.len()) as u64;
            retried += usize::from(a > requests || (p.outcome == Outcome::Failed && a > 1));
        }
        // Stages not configured stay out of the table.
        stages.retain(|s| {
            s.input > 0
                || match s.stage.as_str() {
                    "label_validation" => true,
                    "confidence" => filter.confidence.is_some(),
                    "self_consistency" => filter.consistency.is_some(),
                    _ => filter.crosscheck.is_some(),
                }
        });
        let per = |x: u64| if n > 0 { x as f64 / n as f64 } else { 0.0 };
        LlmSummary {
            simulated,
            images: n,
            outcomes,
            parse_stages,
            filter_spec: filter.clone(),
            filter_stages: stages,
            cached_images: cached,
            attempts,
            images_retried: retried,
            prompt_tokens: pt,
            completion_tokens: ct,
            prompt_tokens_per_image: per(pt),
            completion_tokens_per_image: per(ct),
            cost_usd: any_cost.then_some(cost),
            cost_usd_per_image: (any_cost && n > 0).then(|| cost / n as f64),
            price_as_of: price.map(|(_, e)| e.as_of.clone()),
            reasoning_tokens: preds
                .iter()
                .filter_map(|p| p.extra.get("reasoning_tokens").and_then(|v| v.as_u64()))
                .sum(),
            structured_fallback_images: preds
                .iter()
                .filter(|p| {
                    p.extra.get("structured_fallback").and_then(|v| v.as_bool()) == Some(true)
                })
                .count(),
            price: price.map(|(k, e)| PriceUsed {
                key: k.clone(),
                entry: e.clone(),
            }),
            server_timings_ms: (!timings.is_empty()).then_some(timings),
        }
    }

    /// One line per filter stage, for terminals and reports.
    pub fn stage_lines(&self) -> Vec<String> {
        self.filter_stages
            .iter()
            .map(|s| {
                let mut l = format!(
                    "{:<17} in {:>5}  kept {:>5}  deferred {:>5}",
                    s.stage, s.input, s.kept, s.deferred
                );
                if s.unparseable > 0 {
                    l.push_str(&format!("  unparseable {:>5}", s.unparseable));
                }
                if s.refused > 0 {
                    l.push_str(&format!("  refused {:>5}", s.refused));
                }
                l
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mica_core::FilterStage;

    fn pred(outcome: Outcome, stage: Option<&str>, verdicts: &[(&str, &str)]) -> Prediction {
        let mut p = Prediction::new("x", "llm:test", outcome);
        p.parse_stage = stage.map(String::from);
        p.filter = verdicts
            .iter()
            .map(|(s, v)| FilterStage {
                stage: s.to_string(),
                verdict: v.to_string(),
                detail: None,
            })
            .collect();
        p
    }

    #[test]
    fn refusals_are_counted_in_label_validation_and_on_their_own() {
        let preds = [
            pred(
                Outcome::Answered,
                Some("json"),
                &[("label_validation", "kept"), ("confidence", "kept")],
            ),
            pred(Outcome::Refused, None, &[("label_validation", "refused")]),
            pred(Outcome::Refused, None, &[("label_validation", "refused")]),
            pred(
                Outcome::Unparseable,
                None,
                &[("label_validation", "unparseable")],
            ),
        ];
        let s = LlmSummary::from_predictions(&preds, &FilterSpec::default(), None);
        assert_eq!(s.outcomes["refused"], 2);
        assert_eq!(s.outcomes["unparseable"], 1);
        assert_eq!(s.outcomes.len(), Outcome::ALL.len());
        assert_eq!(
            (s.parse_stages["refused"], s.parse_stages["unparseable"]),
            (2, 1)
        );
        let v = &s.filter_stages[0];
        assert_eq!(v.stage, "label_validation");
        assert_eq!((v.input, v.kept, v.unparseable, v.refused), (4, 1, 1, 2));
        assert!(
            s.stage_lines()[0].contains("refused     2"),
            "{:?}",
            s.stage_lines()
        );
        // A summary written before refusals were counted still reads.
        let old: StageCount = serde_json::from_str(
            r#"{"stage":"label_validation","input":3,"kept":2,"deferred":0,"unparseable":1}"#,
        )
        .unwrap();
        assert_eq!(old.refused, 0);
    }
}
