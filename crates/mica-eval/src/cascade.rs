//! The cascade's decision rule and its offline threshold sweep.
//!
//! A cascade runs a cheap first stage (usually a CNN) on every image, asks a second stage
//! (usually an LLM) only when the first is unsure, and sends the case to a physician when the
//! second is unsure too. [`combine`] is the one place that rule is written: the live engine
//! (`mica-run`'s `CascadeClassifier`) and the offline [`sweep`] both call it, so a swept
//! threshold and a real run at that threshold cannot disagree.
//!
//! The sweep needs no extra model calls: given one standalone run of each arm on the same
//! images, the cascade at any threshold is fully determined, because the second arm's answer
//! for an image does not depend on whether the first was asked. (With `--cascade-context` the
//! second stage is told the first's answer, so its answers differ from a standalone run and the
//! sweep no longer describes that mode exactly.)
//!
//! Definitions, shared with `metrics.json` ([`crate::RunMetrics`]) so a point can be checked
//! against a real run:
//! - `accuracy`: images whose label is right (answered or deferred with that label) / all
//!   images, which is `metrics.json`'s `all.accuracy`: a deferred case counts with the label
//!   the models offered, no answer counts as wrong;
//! - `accepted_accuracy`: right among the accepted (outcome `answered`) images, `accepted.accuracy`;
//! - `coverage`: accepted images / all images;
//! - `share_second`: images the second stage was asked about / all images;
//! - `deferred`: images sent to the physician;
//! - cost: the sum over the stages that ran of each prediction's own `cost_usd` (absent = 0,
//!   e.g. a local model), per 1,000 images; energy: each arm's measured Wh per image times the
//!   images it ran on, per 1,000 images (None when an arm that ran has no comparable figure).

use std::collections::{BTreeSet, HashMap};

use mica_core::{FilterStage, Outcome, Prediction};
use serde::{Deserialize, Serialize};

/// Confidence thresholds of a cascade.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CascadeThresholds {
    /// The first stage answers at or above this confidence.
    pub first: f64,
    /// The second stage answers at or above this confidence; None: any accepted answer of the
    /// second stage stands.
    #[serde(default)]
    pub second: Option<f64>,
}

/// Which stage settled an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    First,
    Second,
    Physician,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::First => "first",
            Stage::Second => "second",
            Stage::Physician => "physician",
        }
    }
}

/// One stage's answer as recorded in `extra.cascade`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageAnswer {
    pub label: Option<String>,
    pub confidence: Option<f64>,
    pub outcome: Outcome,
    /// Set when the answer was replayed from a response cache (cost nothing now).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
}

impl StageAnswer {
    fn of(p: &Prediction) -> StageAnswer {
        StageAnswer {
            label: p.predicted.clone(),
            confidence: p.confidence,
            outcome: p.outcome,
            cached: p.cached,
        }
    }
}

/// `extra.cascade` of a cascade prediction: how the image was settled and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeRecord {
    /// The stage whose answer stands (`physician` for deferred cases). For a failed second
    /// stage this is `second`, and the prediction's outcome is `failed`.
    pub stage: Stage,
    pub threshold: f64,
    #[serde(default)]
    pub second_threshold: Option<f64>,
    pub first: StageAnswer,
    /// None when the second stage was not asked.
    pub second: Option<StageAnswer>,
    /// Plain words, e.g. "first confidence 0.62 < 0.80".
    pub reason: String,
}

impl CascadeRecord {
    /// The record of a cascade prediction, None for any other prediction.
    pub fn of(p: &Prediction) -> Option<CascadeRecord> {
        serde_json::from_value(p.extra.get("cascade")?.clone()).ok()
    }

    /// True when the second stage was asked about this image.
    pub fn reached_second(&self) -> bool {
        self.second.is_some()
    }
}

/// The first stage answers when it produced an accepted label with a confidence at or above
/// the threshold. A missing confidence never passes: an unsure-by-omission answer must not
/// skip the second opinion.
pub fn first_answers(first: &Prediction, t: &CascadeThresholds) -> bool {
    first.outcome == Outcome::Answered
        && first.predicted.is_some()
        && first.confidence.is_some_and(|c| c >= t.first)
}

fn second_answers(second: &Prediction, t: &CascadeThresholds) -> bool {
    second.outcome == Outcome::Answered
        && second.predicted.is_some()
        && match t.second {
            None => true,
            Some(th) => second.confidence.is_some_and(|c| c >= th),
        }
}

fn conf_words(c: Option<f64>) -> String {
    c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "none".into())
}

fn first_reason(first: &Prediction, t: &CascadeThresholds) -> String {
    if first_answers(first, t) {
        format!("first confident ({} >= {:.2})", conf_words(first.confidence), t.first)
    } else if first.outcome != Outcome::Answered {
        format!("first stage {}", first.outcome.as_str())
    } else if first.confidence.is_none() {
        "first stage stated no confidence".to_string()
    } else {
        format!("first confidence {} < {:.2}", conf_words(first.confidence), t.first)
    }
}

fn sum_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

/// The cascade's prediction for one image, from the first stage's prediction and, when the
/// first was unsure, the second's.
///
/// - First confident ([`first_answers`]): its prediction stands, stage `first`.
/// - Otherwise the second is needed. An accepted second answer (at or above `t.second` when
///   set) stands, stage `second`.
/// - A second stage that **failed** (HTTP error after retries, unreadable response, ...) makes
///   the cascade prediction `failed`, not a physician case: the failure says nothing about the
///   image, and a failed prediction is what the run engine asks again on resume.
/// - Any other second answer (below its threshold, deferred by its own filter, unparseable,
///   refused) sends the case to the physician: outcome `deferred`, `needs_review`, and the
///   label offered is the second's if it has one, else the first's. Only when neither stage
///   produced a label does the outcome stay the second's no-answer (a deferred case must carry
///   a label), still with `needs_review` and stage `physician`.
/// - `second` None where it was needed (a caller that did not ask) is a failed prediction
///   naming that, never a silent first-stage answer.
///
/// Latency and cost are the sums over the stages that ran; tokens and the LLM's audit fields
/// come from the second stage. `classifier` is the first stage's name: the engine renames it.
pub fn combine(first: &Prediction, second: Option<&Prediction>, t: &CascadeThresholds) -> Prediction {
    let mut out = first.clone();
    let reason_first = first_reason(first, t);
    let record = |stage: Stage, second: Option<&Prediction>, reason: String| CascadeRecord {
        stage,
        threshold: t.first,
        second_threshold: t.second,
        first: StageAnswer::of(first),
        second: second.map(StageAnswer::of),
        reason,
    };
    let cascade_filter = |verdict: &str, detail: &str| FilterStage {
        stage: "cascade".into(),
        verdict: verdict.into(),
        detail: Some(detail.into()),
    };
    let rec = if first_answers(first, t) {
        out.filter.push(cascade_filter("kept", &reason_first));
        record(Stage::First, None, reason_first)
    } else if let Some(second) = second {
        // The second stage's answer and audit fields, with the first's cost and time added.
        let mut extra = first.extra.clone();
        extra.extend(second.extra.clone());
        out = second.clone();
        out.sample_id = first.sample_id.clone();
        out.classifier = first.classifier.clone();
        out.true_label = first.true_label.clone().or_else(|| second.true_label.clone());
        out.latency_ms = first.latency_ms + second.latency_ms;
        out.cost_usd = sum_opt(first.cost_usd, second.cost_usd);
        out.simulated = first.simulated || second.simulated;
        out.cached = first.cached && second.cached;
        out.extra = extra;
        if second.outcome == Outcome::Failed {
            let reason = format!("{reason_first}; second stage failed");
            record(Stage::Second, Some(second), reason)
        } else if second_answers(second, t) {
            let reason = match t.second {
                Some(th) => format!("{reason_first}; second confident ({} >= {th:.2})", conf_words(second.confidence)),
                None => format!("{reason_first}; second answered"),
            };
            out.filter.push(cascade_filter("kept", &reason));
            record(Stage::Second, Some(second), reason)
        } else {
            let why = if second.outcome != Outcome::Answered {
                format!("second stage {}", second.outcome.as_str())
            } else if second.confidence.is_none() {
                "second stage stated no confidence".to_string()
            } else {
                format!("second confidence {} < {:.2}", conf_words(second.confidence), t.second.unwrap_or(0.0))
            };
            let reason = format!("{reason_first}; {why}: deferred to a physician");
            out.needs_review = true;
            if second.predicted.is_some() {
                out.outcome = Outcome::Deferred;
            } else if first.predicted.is_some() && matches!(first.outcome, Outcome::Answered | Outcome::Deferred) {
                out.outcome = Outcome::Deferred;
                out.predicted = first.predicted.clone();
                out.confidence = first.confidence;
                out.probabilities = first.probabilities.clone();
            }
            out.filter.push(cascade_filter("deferred", &reason));
            record(Stage::Physician, Some(second), reason)
        }
    } else {
        let reason = format!("{reason_first}; second stage not run");
        out.outcome = Outcome::Failed;
        out.error = Some("cascade: the second stage was needed but not asked".into());
        record(Stage::Second, None, reason)
    };
    out.extra.insert("cascade".into(), serde_json::to_value(&rec).expect("cascade record serialises"));
    out
}

/// Energy each arm spent per image, in Wh, when measured and comparable (None otherwise, e.g.
/// a remote API whose energy is not measurable). Money comes from each prediction's own
/// `cost_usd`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmCosts {
    pub first_wh_per_image: Option<f64>,
    pub second_wh_per_image: Option<f64>,
}

/// What a point of the sweep describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// The cascade at `threshold`.
    Cascade,
    /// The first arm's standalone run (no second stage, no physician beyond its own filter).
    FirstAlone,
    /// The second arm's standalone run (the first never ran).
    SecondAlone,
}

/// One configuration on the accuracy/cost plane. See the module docs for the definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub kind: PointKind,
    /// The first-stage threshold; None for the standalone arms.
    pub threshold: Option<f64>,
    pub images: usize,
    pub accuracy: f64,
    /// None when nothing was accepted.
    pub accepted_accuracy: Option<f64>,
    pub coverage: f64,
    pub share_second: f64,
    pub deferred: usize,
    /// Images without any label (unparseable, refused or failed).
    pub no_answer: usize,
    pub usd_per_1000: f64,
    pub wh_per_1000: Option<f64>,
}

/// Which axis "cheaper" is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostAxis {
    Usd,
    Wh,
}

impl SweepPoint {
    pub fn cost(&self, axis: CostAxis) -> Option<f64> {
        match axis {
            CostAxis::Usd => Some(self.usd_per_1000),
            CostAxis::Wh => self.wh_per_1000,
        }
    }

    /// A point from predictions already decided (a cascade run's, or one arm's);
    /// `reached_second` counts the images the second stage was asked about, `wh` is the
    /// energy spent over all of them (None when not comparable).
    pub fn from_predictions(
        kind: PointKind,
        threshold: Option<f64>,
        preds: &[&Prediction],
        reached_second: usize,
        wh: Option<f64>,
    ) -> SweepPoint {
        let images = preds.len();
        let right = |p: &&&Prediction| p.predicted.is_some() && p.predicted == p.true_label;
        let labelled_right = preds
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Answered | Outcome::Deferred))
            .filter(right)
            .count();
        let accepted: Vec<&&Prediction> = preds.iter().filter(|p| p.outcome == Outcome::Answered).collect();
        let accepted_right = accepted.iter().filter(|p| p.predicted.is_some() && p.predicted == p.true_label).count();
        let per = |x: f64| if images == 0 { 0.0 } else { x / images as f64 };
        SweepPoint {
            kind,
            threshold,
            images,
            accuracy: per(labelled_right as f64),
            accepted_accuracy: (!accepted.is_empty()).then(|| accepted_right as f64 / accepted.len() as f64),
            coverage: per(accepted.len() as f64),
            share_second: per(reached_second as f64),
            deferred: preds.iter().filter(|p| p.outcome == Outcome::Deferred).count(),
            no_answer: preds.iter().filter(|p| p.outcome.is_no_answer()).count(),
            usd_per_1000: per(preds.iter().filter_map(|p| p.cost_usd).sum::<f64>()) * 1000.0,
            wh_per_1000: wh.map(|w| per(w) * 1000.0),
        }
    }
}

/// The pairs of predictions both arms have, in the first arm's order (images only one arm
/// has are left out: the cascade is defined only where both could run).
pub fn join<'a>(first: &'a [Prediction], second: &'a [Prediction]) -> Vec<(&'a Prediction, &'a Prediction)> {
    let by_id: HashMap<&str, &Prediction> = second.iter().map(|p| (p.sample_id.as_str(), p)).collect();
    first
        .iter()
        .filter_map(|f| by_id.get(f.sample_id.as_str()).map(|s| (f, *s)))
        .collect()
}

/// The thresholds at which the cascade changes: 0, every distinct confidence of the first
/// arm, and 1, ascending. Sweeping these gives every distinct cascade.
pub fn candidate_thresholds(first: &[Prediction]) -> Vec<f64> {
    let mut set: BTreeSet<u64> = [0.0f64, 1.0].iter().map(|v| v.to_bits()).collect();
    for c in first.iter().filter_map(|p| p.confidence).filter(|c| (0.0..=1.0).contains(c)) {
        set.insert(c.to_bits());
    }
    // Non-negative floats order like their bit patterns.
    set.into_iter().map(f64::from_bits).collect()
}

/// The cascade at every threshold, from one standalone run of each arm, plus the two arms
/// alone: the result starts with the [`PointKind::FirstAlone`] and [`PointKind::SecondAlone`]
/// points, then one [`PointKind::Cascade`] point per threshold in the order given. Each
/// cascade point is computed by [`combine`], the rule the live engine uses.
pub fn sweep(
    first: &[Prediction],
    second: &[Prediction],
    thresholds: &[f64],
    second_threshold: Option<f64>,
    per_image: &ArmCosts,
) -> Vec<SweepPoint> {
    let pairs = join(first, second);
    let n = pairs.len() as f64;
    let firsts: Vec<&Prediction> = pairs.iter().map(|(f, _)| *f).collect();
    let seconds: Vec<&Prediction> = pairs.iter().map(|(_, s)| *s).collect();
    let mut out = vec![
        SweepPoint::from_predictions(PointKind::FirstAlone, None, &firsts, 0, per_image.first_wh_per_image.map(|w| w * n)),
        SweepPoint::from_predictions(
            PointKind::SecondAlone,
            None,
            &seconds,
            pairs.len(),
            per_image.second_wh_per_image.map(|w| w * n),
        ),
    ];
    for &th in thresholds {
        let t = CascadeThresholds { first: th, second: second_threshold };
        let mut reached = 0usize;
        let decided: Vec<Prediction> = pairs
            .iter()
            .map(|(f, s)| {
                if first_answers(f, &t) {
                    combine(f, None, &t)
                } else {
                    reached += 1;
                    combine(f, Some(s), &t)
                }
            })
            .collect();
        let refs: Vec<&Prediction> = decided.iter().collect();
        let wh = match (per_image.first_wh_per_image, per_image.second_wh_per_image) {
            (Some(a), _) if reached == 0 => Some(a * n),
            (Some(a), Some(b)) => Some(a * n + b * reached as f64),
            _ => None,
        };
        out.push(SweepPoint::from_predictions(PointKind::Cascade, Some(th), &refs, reached, wh));
    }
    out
}

/// The points no other point beats on both accuracy and cost (on `axis`), cheapest first.
/// Points without a figure on the axis are left out.
pub fn pareto_front(points: &[SweepPoint], axis: CostAxis) -> Vec<&SweepPoint> {
    let mut with_cost: Vec<(&SweepPoint, f64)> = points.iter().filter_map(|p| p.cost(axis).map(|c| (p, c))).collect();
    // Cheapest first; at equal cost the most accurate first, so it alone is kept.
    with_cost.sort_by(|a, b| a.1.total_cmp(&b.1).then(b.0.accuracy.total_cmp(&a.0.accuracy)));
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for (p, _) in with_cost {
        if p.accuracy > best {
            best = p.accuracy;
            front.push(p);
        }
    }
    front
}

/// Tolerance for "reaches" an accuracy: sums of the same counts in another order may differ in
/// the last bit.
const EPS: f64 = 1e-12;

/// The cheapest point (USD per 1,000 images) whose accuracy reaches `target_accuracy`; at equal
/// cost the more accurate. None when no point reaches it.
pub fn cheapest_reaching(points: &[SweepPoint], target_accuracy: f64) -> Option<&SweepPoint> {
    points
        .iter()
        .filter(|p| p.accuracy + EPS >= target_accuracy)
        .min_by(|a, b| a.usd_per_1000.total_cmp(&b.usd_per_1000).then(b.accuracy.total_cmp(&a.accuracy)))
}

/// The most accurate point costing at most `usd_per_1000`; at equal accuracy the cheaper. None
/// when every point costs more.
pub fn best_within_budget(points: &[SweepPoint], usd_per_1000: f64) -> Option<&SweepPoint> {
    points
        .iter()
        .filter(|p| p.usd_per_1000 <= usd_per_1000 + EPS)
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy).then(b.usd_per_1000.total_cmp(&a.usd_per_1000)))
}

/// One stage's share of a cascade run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageMetrics {
    /// Images this stage settled.
    pub images: usize,
    /// `images` / all images.
    pub share: f64,
    /// Right among the images this stage settled (for the physician stage: the label the
    /// models offered); None when it settled none.
    pub accuracy: Option<f64>,
}

/// `metrics.json`'s `extra.cascade`: how a cascade run split its images between the stages
/// and what it spent. Computed from the predictions' `extra.cascade` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeSummary {
    pub threshold: f64,
    pub second_threshold: Option<f64>,
    pub images: usize,
    pub first: StageMetrics,
    pub second: StageMetrics,
    pub physician: StageMetrics,
    /// Images the second stage was asked about (including those it failed on).
    pub reached_second: usize,
    pub share_second: f64,
    /// Images the second stage failed on (outcome failed; asked again on resume).
    pub second_failed: usize,
    /// Images sent to the physician: `physician.images`.
    pub deferred: usize,
    /// Mean over all images of the summed per-stage latency, in ms.
    pub latency_ms_per_image: f64,
    /// Mean over all images of the summed per-stage `cost_usd` (absent = 0).
    pub usd_per_image: f64,
    /// The same as a [`SweepPoint`], so a run can be put on the sweep's plot.
    pub point: SweepPoint,
}

impl CascadeSummary {
    /// None when no prediction carries a cascade record.
    pub fn from_predictions(preds: &[Prediction]) -> Option<CascadeSummary> {
        let records: Vec<(&Prediction, CascadeRecord)> =
            preds.iter().filter_map(|p| CascadeRecord::of(p).map(|r| (p, r))).collect();
        let (_, r0) = records.first()?;
        let (threshold, second_threshold) = (r0.threshold, r0.second_threshold);
        let images = records.len();
        let stage = |s: Stage| {
            let mine: Vec<&Prediction> = records
                .iter()
                .filter(|(p, r)| r.stage == s && p.outcome != Outcome::Failed)
                .map(|(p, _)| *p)
                .collect();
            let right = mine.iter().filter(|p| p.predicted.is_some() && p.predicted == p.true_label).count();
            StageMetrics {
                images: mine.len(),
                share: mine.len() as f64 / images as f64,
                accuracy: (!mine.is_empty()).then(|| right as f64 / mine.len() as f64),
            }
        };
        let reached_second = records.iter().filter(|(_, r)| r.reached_second()).count();
        let second_failed = records
            .iter()
            .filter(|(_, r)| r.second.as_ref().is_some_and(|s| s.outcome == Outcome::Failed))
            .count();
        let physician = stage(Stage::Physician);
        let refs: Vec<&Prediction> = records.iter().map(|(p, _)| *p).collect();
        let point = SweepPoint::from_predictions(PointKind::Cascade, Some(threshold), &refs, reached_second, None);
        Some(CascadeSummary {
            threshold,
            second_threshold,
            images,
            first: stage(Stage::First),
            second: stage(Stage::Second),
            physician,
            reached_second,
            share_second: reached_second as f64 / images as f64,
            second_failed,
            deferred: physician.images,
            latency_ms_per_image: refs.iter().map(|p| p.latency_ms).sum::<f64>() / images as f64,
            usd_per_image: point.usd_per_1000 / 1000.0,
            point,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mica_core::TokenUsage;

    fn p(id: &str, truth: &str, pred: Option<&str>, outcome: Outcome, conf: Option<f64>, cost: Option<f64>) -> Prediction {
        let mut x = Prediction::new(id, "arm", outcome);
        x.true_label = Some(truth.into());
        x.predicted = pred.map(String::from);
        x.confidence = conf;
        x.cost_usd = cost;
        x.latency_ms = 10.0;
        x
    }

    const T: CascadeThresholds = CascadeThresholds { first: 0.8, second: None };

    #[test]
    fn first_answers_needs_an_accepted_label_and_enough_confidence() {
        assert!(first_answers(&p("a", "x", Some("x"), Outcome::Answered, Some(0.8), None), &T));
        assert!(!first_answers(&p("a", "x", Some("x"), Outcome::Answered, Some(0.79), None), &T));
        assert!(!first_answers(&p("a", "x", Some("x"), Outcome::Answered, None, None), &T));
        assert!(!first_answers(&p("a", "x", Some("x"), Outcome::Deferred, Some(0.99), None), &T));
        assert!(!first_answers(&p("a", "x", None, Outcome::Unparseable, Some(0.99), None), &T));
    }

    #[test]
    fn confident_first_stands_alone() {
        let f = p("a", "x", Some("x"), Outcome::Answered, Some(0.93), Some(0.001));
        let c = combine(&f, None, &T);
        let r = CascadeRecord::of(&c).unwrap();
        assert_eq!(r.stage, Stage::First);
        assert_eq!(r.reason, "first confident (0.93 >= 0.80)");
        assert!(r.second.is_none());
        assert_eq!((c.outcome, c.predicted.as_deref(), c.confidence), (Outcome::Answered, Some("x"), Some(0.93)));
        assert_eq!((c.latency_ms, c.cost_usd), (10.0, Some(0.001)));
        // Serialised with lowercase stage names.
        assert_eq!(c.extra["cascade"]["stage"], "first");
        assert_eq!(c.extra["cascade"]["second"], serde_json::Value::Null);
    }

    #[test]
    fn unsure_first_takes_the_second_and_sums_costs() {
        let f = p("a", "x", Some("y"), Outcome::Answered, Some(0.62), None);
        let mut s = p("a", "x", Some("x"), Outcome::Answered, Some(0.7), Some(0.01));
        s.tokens = Some(TokenUsage { prompt: 100, completion: 5 });
        s.raw_answer = Some("x".into());
        let c = combine(&f, Some(&s), &T);
        let r = CascadeRecord::of(&c).unwrap();
        assert_eq!(r.stage, Stage::Second);
        assert_eq!(r.reason, "first confidence 0.62 < 0.80; second answered");
        assert_eq!(r.first.label.as_deref(), Some("y"));
        assert_eq!(r.second.as_ref().unwrap().confidence, Some(0.7));
        assert_eq!((c.outcome, c.predicted.as_deref(), c.confidence), (Outcome::Answered, Some("x"), Some(0.7)));
        assert_eq!((c.latency_ms, c.cost_usd), (20.0, Some(0.01)));
        assert_eq!(c.tokens, Some(TokenUsage { prompt: 100, completion: 5 }));
        assert_eq!(c.classifier, "arm");
        assert!(!c.needs_review);
    }

    #[test]
    fn unsure_second_goes_to_the_physician_with_the_best_label_offered() {
        let t = CascadeThresholds { first: 0.8, second: Some(0.9) };
        let f = p("a", "x", Some("y"), Outcome::Answered, Some(0.5), Some(0.001));
        let s = p("a", "x", Some("x"), Outcome::Answered, Some(0.6), Some(0.01));
        let c = combine(&f, Some(&s), &t);
        let r = CascadeRecord::of(&c).unwrap();
        assert_eq!(r.stage, Stage::Physician);
        assert_eq!(r.reason, "first confidence 0.50 < 0.80; second confidence 0.60 < 0.90: deferred to a physician");
        assert_eq!((c.outcome, c.predicted.as_deref(), c.needs_review), (Outcome::Deferred, Some("x"), true));
        assert!((c.cost_usd.unwrap() - 0.011).abs() < 1e-15);
        assert_eq!(c.filter.last().unwrap().verdict, "deferred");
        // An unparseable second: the first's label is offered.
        let s = p("a", "x", None, Outcome::Unparseable, None, Some(0.01));
        let c = combine(&f, Some(&s), &t);
        assert_eq!((c.outcome, c.predicted.as_deref(), c.confidence), (Outcome::Deferred, Some("y"), Some(0.5)));
        assert_eq!(CascadeRecord::of(&c).unwrap().reason, "first confidence 0.50 < 0.80; second stage unparseable: deferred to a physician");
        // Neither stage has a label: still the physician's, but no label to defer with.
        let f = p("a", "x", None, Outcome::Unparseable, None, None);
        let c = combine(&f, Some(&s), &t);
        assert_eq!((c.outcome, c.needs_review), (Outcome::Unparseable, true));
        assert_eq!(CascadeRecord::of(&c).unwrap().stage, Stage::Physician);
    }

    #[test]
    fn a_failed_second_fails_the_cascade_so_resume_asks_again() {
        let f = p("a", "x", Some("y"), Outcome::Answered, Some(0.5), None);
        let mut s = p("a", "x", None, Outcome::Failed, None, None);
        s.http_status = Some(503);
        s.error = Some("HTTP 503".into());
        let c = combine(&f, Some(&s), &T);
        assert_eq!((c.outcome, c.http_status, c.needs_review), (Outcome::Failed, Some(503), false));
        assert_eq!(CascadeRecord::of(&c).unwrap().reason, "first confidence 0.50 < 0.80; second stage failed");
        let c = combine(&f, None, &T);
        assert_eq!(c.outcome, Outcome::Failed);
    }

    /// Four images; first-arm confidences 0.95 (right), 0.7 (wrong), 0.6 (right), 0.4 (wrong);
    /// the second arm is right on 1, 2 and 4 (confidence 0.9, 0.9, 0.5), wrong on 3 (0.9),
    /// at $0.01 an image; the first costs nothing.
    fn arms() -> (Vec<Prediction>, Vec<Prediction>) {
        let first = vec![
            p("1", "a", Some("a"), Outcome::Answered, Some(0.95), None),
            p("2", "b", Some("a"), Outcome::Answered, Some(0.7), None),
            p("3", "c", Some("c"), Outcome::Answered, Some(0.6), None),
            p("4", "a", Some("b"), Outcome::Answered, Some(0.4), None),
        ];
        let second = vec![
            p("4", "a", Some("a"), Outcome::Answered, Some(0.5), Some(0.01)),
            p("3", "c", Some("b"), Outcome::Answered, Some(0.9), Some(0.01)),
            p("2", "b", Some("b"), Outcome::Answered, Some(0.9), Some(0.01)),
            p("1", "a", Some("a"), Outcome::Answered, Some(0.9), Some(0.01)),
            p("9", "a", Some("a"), Outcome::Answered, Some(0.9), Some(0.01)),
        ];
        (first, second)
    }

    #[test]
    fn sweep_hand_computed() {
        let (first, second) = arms();
        let costs = ArmCosts { first_wh_per_image: Some(0.1), second_wh_per_image: Some(2.0) };
        let pts = sweep(&first, &second, &[0.0, 0.65, 0.8], Some(0.6), &costs);
        assert_eq!(pts.len(), 5);
        let (cnn, llm) = (&pts[0], &pts[1]);
        // Image 9 is only in the second arm: left out.
        assert_eq!((cnn.kind, cnn.images, cnn.accuracy, cnn.coverage), (PointKind::FirstAlone, 4, 0.5, 1.0));
        assert_eq!((cnn.usd_per_1000, cnn.wh_per_1000, cnn.share_second), (0.0, Some(100.0), 0.0));
        assert_eq!((llm.kind, llm.accuracy, llm.share_second, llm.deferred), (PointKind::SecondAlone, 0.75, 1.0, 0));
        assert!((llm.usd_per_1000 - 10.0).abs() < 1e-12);
        assert_eq!(llm.wh_per_1000, Some(2000.0));
        // t = 0: the CNN answers everything.
        assert_eq!((pts[2].threshold, pts[2].accuracy, pts[2].share_second, pts[2].usd_per_1000), (Some(0.0), 0.5, 0.0, 0.0));
        // t = 0.65: images 3 and 4 go to the LLM; 3 -> "b" (0.9, wrong), 4 -> "a" at 0.5 < 0.6:
        // physician with the LLM's label "a" (right). Right: 1, 4 (deferred) -> 2/4;
        // accepted 1, 2, 3 -> right only 1 -> 1/3; coverage 3/4.
        let q = &pts[3];
        assert_eq!((q.accuracy, q.coverage, q.share_second, q.deferred), (0.5, 0.75, 0.5, 1));
        assert!((q.accepted_accuracy.unwrap() - 1.0 / 3.0).abs() < 1e-15);
        assert!((q.usd_per_1000 - 5.0).abs() < 1e-12);
        // Wh: 0.1 x 4 + 2 x 2 = 4.4 over 4 images -> 1100 per 1,000.
        assert!((q.wh_per_1000.unwrap() - 1100.0).abs() < 1e-9);
        // t = 0.8: images 2, 3, 4 go to the LLM: 2 right, 3 wrong, 4 physician (right label).
        let q = &pts[4];
        assert_eq!((q.accuracy, q.coverage, q.share_second, q.deferred), (0.75, 0.75, 0.75, 1));
        assert!((q.accepted_accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-15);
        assert!((q.usd_per_1000 - 7.5).abs() < 1e-12);
        // Energy unknown for the LLM: only points that never reach it have a figure.
        let pts = sweep(&first, &second, &[0.0, 0.8], None, &ArmCosts { first_wh_per_image: Some(0.1), second_wh_per_image: None });
        assert_eq!((pts[1].wh_per_1000, pts[2].wh_per_1000, pts[3].wh_per_1000), (None, Some(100.0), None));
    }

    #[test]
    fn candidate_thresholds_are_the_breakpoints() {
        let (first, _) = arms();
        assert_eq!(candidate_thresholds(&first), vec![0.0, 0.4, 0.6, 0.7, 0.95, 1.0]);
    }

    fn pt(acc: f64, usd: f64, wh: Option<f64>) -> SweepPoint {
        SweepPoint {
            kind: PointKind::Cascade,
            threshold: Some(acc),
            images: 10,
            accuracy: acc,
            accepted_accuracy: None,
            coverage: 1.0,
            share_second: 0.0,
            deferred: 0,
            no_answer: 0,
            usd_per_1000: usd,
            wh_per_1000: wh,
        }
    }

    #[test]
    fn pareto_cheapest_and_budget() {
        let pts = vec![
            pt(0.5, 0.0, Some(1.0)),
            pt(0.7, 5.0, Some(3.0)),
            pt(0.6, 6.0, Some(2.0)), // dominated on USD by (0.7, 5)
            pt(0.8, 10.0, None),
            pt(0.75, 10.0, Some(9.0)), // same cost as 0.8, less accurate
        ];
        let acc = |v: Vec<&SweepPoint>| v.iter().map(|p| p.accuracy).collect::<Vec<_>>();
        assert_eq!(acc(pareto_front(&pts, CostAxis::Usd)), vec![0.5, 0.7, 0.8]);
        assert_eq!(acc(pareto_front(&pts, CostAxis::Wh)), vec![0.5, 0.6, 0.7, 0.75]);
        assert_eq!(cheapest_reaching(&pts, 0.65).unwrap().accuracy, 0.7);
        assert_eq!(cheapest_reaching(&pts, 0.8).unwrap().accuracy, 0.8);
        assert!(cheapest_reaching(&pts, 0.81).is_none());
        assert_eq!(best_within_budget(&pts, 6.0).unwrap().accuracy, 0.7);
        assert_eq!(best_within_budget(&pts, 0.0).unwrap().accuracy, 0.5);
        assert!(best_within_budget(&pts, -1.0).is_none());
    }

    #[test]
    fn summary_splits_images_by_stage() {
        let (first, second) = arms();
        let t = CascadeThresholds { first: 0.8, second: Some(0.6) };
        let mut preds: Vec<Prediction> = join(&first, &second)
            .into_iter()
            .map(|(f, s)| if first_answers(f, &t) { combine(f, None, &t) } else { combine(f, Some(s), &t) })
            .collect();
        // Image 2's second stage failed instead.
        let failed = p("2", "b", None, Outcome::Failed, None, None);
        preds[1] = combine(&first[1], Some(&failed), &t);
        let s = CascadeSummary::from_predictions(&preds).unwrap();
        assert_eq!((s.images, s.reached_second, s.second_failed, s.deferred), (4, 3, 1, 1));
        assert_eq!((s.first.images, s.first.accuracy), (1, Some(1.0)));
        // Second settled image 3 only (wrong); image 2 failed and belongs to no stage.
        assert_eq!((s.second.images, s.second.accuracy), (1, Some(0.0)));
        assert_eq!((s.physician.images, s.physician.accuracy), (1, Some(1.0)));
        assert_eq!(s.share_second, 0.75);
        // $0.01 for images 3 and 4 (the failed one reported none) over 4 images.
        assert!((s.usd_per_image - 0.005).abs() < 1e-15);
        assert_eq!(s.latency_ms_per_image, (10.0 + 20.0 + 20.0 + 20.0) / 4.0);
        assert_eq!(s.point.accuracy, 0.5);
        assert!(CascadeSummary::from_predictions(&first).is_none());
    }
}
