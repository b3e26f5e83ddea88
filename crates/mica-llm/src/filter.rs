//! The "enhanced data filtering" of the study as explicit, switchable stages, each recorded on
//! every prediction so every deferral can be explained and counted:
//!
//! 1. `label_validation`: the answer must map onto the label set (strict JSON or exact label;
//!    with the stage on, also by synonym or fuzzily), else `unparseable`; an answer in which
//!    the model declines is `refused` (verdict `refused`);
//! 2. `confidence`: below the threshold the case is `deferred` to a physician;
//! 3. `self_consistency`: k samples (or k prompt variants) must agree, else `deferred`;
//! 4. `cnn_crosscheck`: disagreement with a CNN's predictions file is `deferred`.
//!
//! Stages run in this order and stop at the first deferral.
//!
//! Refusals under self-consistency (k answers): a refusal is a vote for "refused" next to the
//! votes for labels (unparseable answers are no vote). The majority answer, ties going to the
//! earlier answer as for labels, is the lead answer. If the lead answer is a refusal, the image
//! is `refused`, even when a minority of the answers named a label. Otherwise the refusals
//! count against the agreement like any other dissenting answer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mica_core::{FilterStage, Outcome};
use serde::{Deserialize, Serialize};

use crate::parse::{ParseOptions, ParsedAnswer};
use crate::LlmError;

pub const STAGE_VALIDATION: &str = "label_validation";
pub const STAGE_CONFIDENCE: &str = "confidence";
pub const STAGE_CONSISTENCY: &str = "self_consistency";
pub const STAGE_CROSSCHECK: &str = "cnn_crosscheck";
pub const STAGES: [&str; 4] = [
    STAGE_VALIDATION,
    STAGE_CONFIDENCE,
    STAGE_CONSISTENCY,
    STAGE_CROSSCHECK,
];

/// The default confidence threshold of `--filter default`.
pub const DEFAULT_THRESHOLD: f64 = 0.5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Consistency {
    /// Number of answers asked per image (>= 2).
    pub k: usize,
    /// `true`: k prompt variants (class order rotated) at the run's temperature;
    /// `false`: k samples with seeds seed..seed+k at `temperature`.
    pub variants: bool,
    pub temperature: f64,
    /// Share of the k answers that must name the majority label (1.0 = unanimous).
    pub min_agreement: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterSpec {
    /// Synonym and fuzzy mapping on (strict JSON and exact labels are always accepted).
    pub validate: bool,
    pub confidence: Option<f64>,
    pub consistency: Option<Consistency>,
    /// A CNN run's `predictions.jsonl`.
    pub crosscheck: Option<PathBuf>,
}

impl Default for FilterSpec {
    fn default() -> Self {
        FilterSpec {
            validate: true,
            confidence: Some(DEFAULT_THRESHOLD),
            consistency: None,
            crosscheck: None,
        }
    }
}

impl FilterSpec {
    pub fn none() -> Self {
        FilterSpec {
            validate: false,
            confidence: None,
            consistency: None,
            crosscheck: None,
        }
    }

    /// `none`, `default` (= `validate,confidence=0.5`), or a comma list of `validate`,
    /// `confidence=T`, `consistency=K[:MIN_AGREEMENT]`, `variants=K[:MIN_AGREEMENT]`,
    /// `crosscheck=PATH` (a CNN's predictions.jsonl); `default` may be combined with others.
    pub fn parse(spec: &str) -> Result<Self, LlmError> {
        let err = |m: String| LlmError::Filter {
            spec: spec.to_string(),
            message: m,
        };
        let mut f = FilterSpec::none();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (part, None),
            };
            match (name, value) {
                ("none", None) => {}
                ("default", None) => {
                    f.validate = true;
                    f.confidence.get_or_insert(DEFAULT_THRESHOLD);
                }
                ("validate", None) => f.validate = true,
                ("confidence", Some(v)) => {
                    let t: f64 = v
                        .parse()
                        .ok()
                        .filter(|t: &f64| (0.0..=1.0).contains(t))
                        .ok_or_else(|| {
                            err(format!(
                                "confidence threshold `{v}` must be a number in 0..1"
                            ))
                        })?;
                    f.confidence = Some(t);
                }
                ("consistency" | "variants", Some(v)) => {
                    let (k, agree) = match v.split_once(':') {
                        Some((k, a)) => (k, Some(a)),
                        None => (v, None),
                    };
                    let k: usize =
                        k.parse()
                            .ok()
                            .filter(|k| (2..=20).contains(k))
                            .ok_or_else(|| {
                                err(format!("{name} needs a count k in 2..20, got `{k}`"))
                            })?;
                    let min_agreement = match agree {
                        None => 1.0,
                        Some(a) => a
                            .parse()
                            .ok()
                            .filter(|a: &f64| *a > 0.0 && *a <= 1.0)
                            .ok_or_else(|| err(format!("agreement `{a}` must be in (0, 1]")))?,
                    };
                    f.consistency = Some(Consistency {
                        k,
                        variants: name == "variants",
                        temperature: 0.7,
                        min_agreement,
                    });
                }
                ("crosscheck", Some(p)) if !p.is_empty() => f.crosscheck = Some(PathBuf::from(p)),
                _ => {
                    return Err(err(format!(
                        "unknown stage `{part}` (expected none, default, validate, confidence=T, \
                         consistency=K, variants=K, crosscheck=PATH)"
                    )))
                }
            }
        }
        Ok(f)
    }

    pub fn parse_options(&self) -> ParseOptions {
        ParseOptions {
            synonyms: self.validate,
            fuzzy: self.validate,
            ..ParseOptions::default()
        }
    }

    /// Answers asked per image.
    pub fn k(&self) -> usize {
        self.consistency.as_ref().map_or(1, |c| c.k)
    }
}

/// The CNN's label per sample id, from its `predictions.jsonl`.
pub fn load_crosscheck(path: &Path) -> Result<HashMap<String, String>, LlmError> {
    if !path.is_file() {
        return Err(LlmError::file(
            path,
            "CNN predictions file for the cross-check not found",
        ));
    }
    let preds = mica_core::read_predictions(path)?;
    Ok(preds
        .into_iter()
        .filter_map(|p| p.predicted.map(|l| (p.sample_id, l)))
        .collect())
}

/// The filter's verdict on one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub predicted: Option<String>,
    pub confidence: Option<f64>,
    /// Share of the k answers naming `predicted`.
    pub agreement: Option<f64>,
    pub stages: Vec<FilterStage>,
}

fn stage(name: &str, verdict: &str, detail: String) -> FilterStage {
    FilterStage {
        stage: name.into(),
        verdict: verdict.into(),
        detail: Some(detail),
    }
}

/// Applies the stages to the k parsed answers of one image. `confidences[i]` is the confidence
/// to use for answer i (stated, or logprob-derived). `cnn` is `None` when no cross-check runs,
/// `Some(None)` when the CNN has no prediction for this image.
pub fn decide(
    spec: &FilterSpec,
    answers: &[ParsedAnswer],
    confidences: &[Option<f64>],
    cnn: Option<Option<&str>>,
) -> Decision {
    let mut stages = Vec::new();
    // Majority vote over mapped labels and refusals (`None`), ties broken by first appearance.
    let mut votes: Vec<(Option<String>, usize)> = Vec::new();
    for a in answers {
        let vote = match (&a.label, a.refused) {
            (Some(l), _) => Some(l.clone()),
            (None, true) => None,
            (None, false) => continue,
        };
        match votes.iter_mut().find(|(v, _)| *v == vote) {
            Some(v) => v.1 += 1,
            None => votes.push((vote, 1)),
        }
    }
    let best = votes
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(std::cmp::Ordering::Greater));
    if let Some((None, n)) = best {
        let why = answers
            .iter()
            .find(|a| a.refused)
            .and_then(|a| a.note.clone())
            .unwrap_or_else(|| "the model declined to answer".into());
        let why = if answers.len() > 1 {
            format!("{n}/{} answers refused: {why}", answers.len())
        } else {
            why
        };
        stages.push(stage(STAGE_VALIDATION, "refused", why));
        return Decision {
            outcome: Outcome::Refused,
            predicted: None,
            confidence: None,
            agreement: None,
            stages,
        };
    }
    let Some((Some(label), n)) = best.cloned() else {
        let why = answers
            .iter()
            .find_map(|a| a.note.clone())
            .unwrap_or_else(|| "no answer maps onto the label set".into());
        stages.push(stage(STAGE_VALIDATION, "unparseable", why));
        return Decision {
            outcome: Outcome::Unparseable,
            predicted: None,
            confidence: None,
            agreement: None,
            stages,
        };
    };
    let agreeing: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i].label.as_deref() == Some(label.as_str()))
        .collect();
    let first = agreeing[0];
    let how = answers[first].stage.map_or("?", |s| s.as_str());
    stages.push(stage(STAGE_VALIDATION, "kept", format!("mapped by {how}")));
    let confs: Vec<f64> = agreeing
        .iter()
        .filter_map(|&i| confidences.get(i).copied().flatten())
        .collect();
    let confidence = (!confs.is_empty()).then(|| confs.iter().sum::<f64>() / confs.len() as f64);
    let agreement = n as f64 / answers.len().max(1) as f64;
    let mut d = Decision {
        outcome: Outcome::Answered,
        predicted: Some(label.clone()),
        confidence,
        agreement: (answers.len() > 1).then_some(agreement),
        stages,
    };
    if let Some(t) = spec.confidence {
        match confidence {
            Some(c) if c >= t => {
                d.stages
                    .push(stage(STAGE_CONFIDENCE, "kept", format!("{c:.3} >= {t}")))
            }
            Some(c) => {
                d.stages
                    .push(stage(STAGE_CONFIDENCE, "deferred", format!("{c:.3} < {t}")));
                d.outcome = Outcome::Deferred;
                return d;
            }
            None => {
                d.stages.push(stage(
                    STAGE_CONFIDENCE,
                    "deferred",
                    "no confidence stated".into(),
                ));
                d.outcome = Outcome::Deferred;
                return d;
            }
        }
    }
    if let Some(c) = &spec.consistency {
        let detail = format!("{n}/{} answers agree on {label}", answers.len());
        if agreement + 1e-9 >= c.min_agreement {
            d.stages.push(stage(STAGE_CONSISTENCY, "kept", detail));
        } else {
            d.stages.push(stage(STAGE_CONSISTENCY, "deferred", detail));
            d.outcome = Outcome::Deferred;
            return d;
        }
    }
    if let Some(cnn) = cnn {
        match cnn {
            Some(c) if c == label => {
                d.stages
                    .push(stage(STAGE_CROSSCHECK, "kept", format!("CNN agrees ({c})")))
            }
            Some(c) => {
                d.stages
                    .push(stage(STAGE_CROSSCHECK, "deferred", format!("CNN says {c}")));
                d.outcome = Outcome::Deferred;
            }
            None => d.stages.push(stage(
                STAGE_CROSSCHECK,
                "kept",
                "no CNN prediction for this image".into(),
            )),
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::ParseStage;

    fn ans(label: Option<&str>) -> ParsedAnswer {
        ParsedAnswer {
            label: label.map(|s| s.into()),
            stage: label.map(|_| ParseStage::Json),
            note: label.is_none().then(|| "nonsense".into()),
            ..ParsedAnswer::default()
        }
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(FilterSpec::parse("default").unwrap(), FilterSpec::default());
        assert_eq!(FilterSpec::parse("none").unwrap(), FilterSpec::none());
        let f = FilterSpec::parse(
            "validate, confidence=0.7, variants=3:0.6, crosscheck=runs/cnn/predictions.jsonl",
        )
        .unwrap();
        assert_eq!(f.confidence, Some(0.7));
        let c = f.consistency.clone().unwrap();
        assert!(c.variants && c.k == 3 && (c.min_agreement - 0.6).abs() < 1e-12);
        assert_eq!(f.k(), 3);
        assert_eq!(
            f.crosscheck.unwrap(),
            PathBuf::from("runs/cnn/predictions.jsonl")
        );
        for bad in [
            "confidence=2",
            "consistency=1",
            "bogus",
            "crosscheck=",
            "variants=3:0",
        ] {
            assert!(FilterSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_are_their_own_outcome() {
        let refused = ParsedAnswer::refusal("I'm sorry, I can't assist with that request.");
        let d = decide(&FilterSpec::default(), std::slice::from_ref(&refused), &[None], None);
        assert_eq!(
            (d.outcome, d.predicted.as_deref()),
            (Outcome::Refused, None)
        );
        assert_eq!(d.stages.len(), 1);
        assert_eq!(d.stages[0].verdict, "refused");
        assert!(d.stages[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("can't assist"));
        // k answers: the majority answer leads; a refusal majority refuses the image...
        let f = FilterSpec::parse("consistency=3:0.6").unwrap();
        let d = decide(
            &f,
            &[refused.clone(), ans(Some("a")), refused.clone()],
            &[None; 3],
            None,
        );
        assert_eq!(
            (d.outcome, d.predicted.as_deref()),
            (Outcome::Refused, None)
        );
        assert!(d.stages[0]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("2/3 answers refused"));
        // ... a tie goes to the earlier answer ...
        let f2 = FilterSpec::parse("consistency=2:0.5").unwrap();
        let d = decide(&f2, &[refused.clone(), ans(Some("a"))], &[None; 2], None);
        assert_eq!(d.outcome, Outcome::Refused);
        let d = decide(&f2, &[ans(Some("a")), refused.clone()], &[None; 2], None);
        assert_eq!(
            (d.outcome, d.predicted.as_deref()),
            (Outcome::Answered, Some("a"))
        );
        // ... a label majority wins, and a refusal counts against the agreement ...
        let d = decide(
            &f,
            &[ans(Some("a")), refused.clone(), ans(Some("a"))],
            &[None; 3],
            None,
        );
        assert_eq!(
            (d.outcome, d.predicted.as_deref()),
            (Outcome::Answered, Some("a"))
        );
        assert!((d.agreement.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        let unanimous = FilterSpec::parse("consistency=3").unwrap();
        let d = decide(
            &unanimous,
            &[ans(Some("a")), refused.clone(), ans(Some("a"))],
            &[None; 3],
            None,
        );
        assert_eq!(d.outcome, Outcome::Deferred);
        // ... and unparseable answers are no vote.
        let d = decide(
            &f,
            &[ans(None), refused.clone(), ans(None)],
            &[None; 3],
            None,
        );
        assert_eq!(d.outcome, Outcome::Refused);
    }

    #[test]
    fn validation_stage_marks_unparseable() {
        let d = decide(&FilterSpec::default(), &[ans(None)], &[None], None);
        assert_eq!(d.outcome, Outcome::Unparseable);
        assert_eq!(d.predicted, None);
        assert_eq!(d.stages[0].verdict, "unparseable");
        assert_eq!(d.stages[0].detail.as_deref(), Some("nonsense"));
    }

    #[test]
    fn confidence_stage_defers_low_and_missing_confidence() {
        let f = FilterSpec::parse("confidence=0.6").unwrap();
        let d = decide(&f, &[ans(Some("covid"))], &[Some(0.59)], None);
        assert_eq!(
            (d.outcome, d.predicted.as_deref()),
            (Outcome::Deferred, Some("covid"))
        );
        assert_eq!(d.stages.last().unwrap().stage, STAGE_CONFIDENCE);
        let d = decide(&f, &[ans(Some("covid"))], &[Some(0.6)], None);
        assert_eq!(d.outcome, Outcome::Answered);
        let d = decide(&f, &[ans(Some("covid"))], &[None], None);
        assert_eq!(d.outcome, Outcome::Deferred);
        let d = decide(&FilterSpec::none(), &[ans(Some("covid"))], &[None], None);
        assert_eq!(d.outcome, Outcome::Answered);
        assert_eq!(d.stages.len(), 1);
    }

    #[test]
    fn consistency_stage_needs_agreement() {
        let f = FilterSpec::parse("consistency=3").unwrap();
        let three = [ans(Some("a")), ans(Some("b")), ans(Some("a"))];
        let d = decide(&f, &three, &[Some(0.9), Some(0.5), Some(0.7)], None);
        assert_eq!(
            (d.outcome, d.predicted.as_deref()),
            (Outcome::Deferred, Some("a"))
        );
        assert!((d.agreement.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert!((d.confidence.unwrap() - 0.8).abs() < 1e-9);
        let f = FilterSpec::parse("consistency=3:0.6").unwrap();
        assert_eq!(
            decide(&f, &three, &[None; 3], None).outcome,
            Outcome::Answered
        );
        let same = [ans(Some("a")), ans(Some("a")), ans(None)];
        let f = FilterSpec::parse("consistency=3").unwrap();
        assert_eq!(
            decide(&f, &same, &[None; 3], None).outcome,
            Outcome::Deferred
        );
    }

    #[test]
    fn crosscheck_stage_defers_disagreement() {
        let f = FilterSpec::none();
        let a = [ans(Some("glioma"))];
        assert_eq!(
            decide(&f, &a, &[None], Some(Some("glioma"))).outcome,
            Outcome::Answered
        );
        let d = decide(&f, &a, &[None], Some(Some("meningioma")));
        assert_eq!(d.outcome, Outcome::Deferred);
        assert_eq!(
            d.stages.last().unwrap().detail.as_deref(),
            Some("CNN says meningioma")
        );
        assert_eq!(
            decide(&f, &a, &[None], Some(None)).outcome,
            Outcome::Answered
        );
    }

    #[test]
    fn crosscheck_file_must_exist() {
        let e = load_crosscheck(Path::new("/nonexistent/predictions.jsonl")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/predictions.jsonl"));
    }
}
