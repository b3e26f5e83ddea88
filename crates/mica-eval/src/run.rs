//! `metrics.json`: the metrics of one classifier run, built from its predictions.
//!
//! Three views, because a filter that defers or drops cases must not look better for it:
//! - `all`: every image; unparseable, refused and failed answers count as wrong and sit in
//!   the confusion matrix's `no_answer` column;
//! - `answered`: the images that got a label (answered or deferred), as if no filter ran;
//! - `accepted`: the images the filter let through (outcome `answered`), next to `coverage`.
//!
//! Answers replayed from the response cache (`Prediction::cached`) are results like any other,
//! but they cost nothing now and took no time now: throughput, cost and tokens count only the
//! `live` images (asked in this run); the replayed answers' original cost and tokens are kept
//! apart for reference.

use std::collections::HashSet;
use std::path::Path;

use mica_core::{write_atomic, CoreError, LabelSet, Outcome, Prediction};
use serde::{Deserialize, Serialize};

use crate::latency::{latency_summary, LatencyKind, LatencySummary};
use crate::metrics::{evaluate_with, percentile_interval, stratified_resampler, ConfidenceInterval, EvalReport};
use crate::selective::{risk_coverage, thin_curve, RiskCoveragePoint};
use crate::{EvalError, EvalOptions, NO_ANSWER};

/// Version of the `metrics.json` layout; bumped only for incompatible changes.
pub const RUN_METRICS_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeCounts {
    pub answered: usize,
    pub deferred: usize,
    pub unparseable: usize,
    /// The model declined to answer. Absent from `metrics.json` files written before
    /// refusals were told apart (they counted them as unparseable or as an answer).
    #[serde(default)]
    pub refused: usize,
    pub failed: usize,
}

impl OutcomeCounts {
    /// Images without a label: unparseable + refused + failed.
    pub fn no_answer(&self) -> usize {
        self.unparseable + self.refused + self.failed
    }
}

/// Token totals of the images asked in this run (`live`); per-image means divide by the live
/// images, so they are the cost of attempting one image (0 when every answer was replayed).
/// Replayed answers' tokens are summed apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenTotals {
    /// Live images whose prediction reports tokens.
    pub images_with_tokens: usize,
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    pub prompt_per_image: f64,
    pub completion_per_image: f64,
    pub total_per_image: f64,
    /// Tokens of the answers replayed from the response cache (spent by an earlier run).
    #[serde(default)]
    pub replayed_prompt: u64,
    #[serde(default)]
    pub replayed_completion: u64,
}

/// Cost of the images asked in this run (`live`); replayed answers cost nothing now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostTotals {
    /// Live images whose prediction reports a cost.
    pub images_with_cost: usize,
    pub total_usd: f64,
    /// `total_usd` divided by the live images; 0 when every answer was replayed (a note in
    /// `all.notes` says so).
    pub per_image_usd: f64,
    /// What the replayed answers cost when they were first asked, for reference.
    #[serde(default)]
    pub replayed_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    pub schema: u32,
    pub classifier: String,
    pub dataset: String,
    pub split: String,
    pub labels: Vec<String>,
    pub images: usize,
    pub outcomes: OutcomeCounts,
    /// Every image; no answer counts as wrong.
    pub all: EvalReport,
    /// Images with a label (answered + deferred); None when no image got one.
    pub answered: Option<EvalReport>,
    /// Images the filter accepted; None when it accepted none.
    pub accepted: Option<EvalReport>,
    /// Accepted images / all images.
    pub coverage: f64,
    /// Bootstrap interval of `coverage`, over resamples of all images stratified by true class
    /// (the same resamples as `all`'s intervals).
    #[serde(default)]
    pub coverage_ci: Option<ConfidenceInterval>,
    /// Bootstrap interval of the accuracy among accepted images, on the same resamples
    /// (resamples that accept nothing are skipped).
    #[serde(default)]
    pub accepted_accuracy_ci: Option<ConfidenceInterval>,
    /// Accuracy against coverage as the confidence threshold moves, over the labelled images
    /// that state a confidence (coverage relative to all images).
    pub risk_coverage: Vec<RiskCoveragePoint>,
    /// Per-image latency in milliseconds over the images that got a response (failed images
    /// are left out: they are not answers, and a timeout would stand in for a latency).
    /// Replayed answers keep their original request time; `latency_cached` counts them.
    pub latency_ms: Option<LatencySummary>,
    /// What one latency value measures; set by the caller, who knows how it ran the model.
    #[serde(default)]
    pub latency_kind: Option<LatencyKind>,
    /// Latency of the first request, apart from the summary (cold start); set by the caller.
    #[serde(default)]
    pub first_latency_ms: Option<f64>,
    /// How many values in `latency_ms` come from answers replayed from the cache.
    #[serde(default)]
    pub latency_cached: usize,
    pub wall_seconds: f64,
    /// Live images / wall-clock second; None when no wall time was measured or no image was
    /// asked now (a fully cached rerun claims no throughput).
    pub throughput_images_per_s: Option<f64>,
    /// Answers replayed from the response cache.
    #[serde(default)]
    pub cached: usize,
    /// Images asked in this run: `images - cached`. Files written before cache accounting
    /// read as all live.
    #[serde(default)]
    pub live: usize,
    pub tokens: Option<TokenTotals>,
    pub cost: Option<CostTotals>,
    /// Set for runs against the LLM simulator: their numbers are not model results.
    #[serde(default)]
    pub simulated: bool,
    /// Filled by the energy meter (joules, CO2, provenance); left to `mica-energy`'s schema.
    #[serde(default)]
    pub energy: Option<serde_json::Value>,
    /// Open slot for other crates (training history, filter settings, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One prediction turned into indices, checked against the label set.
#[derive(Clone)]
struct Case {
    truth: usize,
    pred: usize,
    outcome: Outcome,
    probs: Option<Vec<f64>>,
    confidence: Option<f64>,
}

impl RunMetrics {
    /// Builds the metrics of one classifier's predictions on one dataset split. Every
    /// prediction must carry a true label in `labels`, and answered/deferred ones a predicted
    /// label in `labels`; anything else is an error naming the sample, never a silent guess.
    pub fn from_predictions(
        classifier: &str,
        dataset: &str,
        split: &str,
        labels: &LabelSet,
        preds: &[Prediction],
        wall_seconds: f64,
        opts: &EvalOptions,
    ) -> Result<RunMetrics, EvalError> {
        if preds.is_empty() {
            return Err(EvalError::input(format!("{classifier}: no predictions to evaluate")));
        }
        let mut seen = HashSet::new();
        let mut cases = Vec::with_capacity(preds.len());
        let mut outcomes = OutcomeCounts::default();
        let mut notes = Vec::new();
        for p in preds {
            if !seen.insert(p.sample_id.as_str()) {
                return Err(EvalError::input(format!(
                    "{classifier}: sample `{}` has more than one prediction",
                    p.sample_id
                )));
            }
            cases.push(case(labels, p, &mut notes)?);
            match p.outcome {
                Outcome::Answered => outcomes.answered += 1,
                Outcome::Deferred => outcomes.deferred += 1,
                Outcome::Unparseable => outcomes.unparseable += 1,
                Outcome::Refused => outcomes.refused += 1,
                Outcome::Failed => outcomes.failed += 1,
            }
        }
        let images = cases.len();
        let mut all = report(labels, &cases, opts, &notes)?.expect("non-empty");
        let labelled: Vec<&Case> = cases.iter().filter(|c| c.pred != NO_ANSWER).collect();
        let labelled_cases: Vec<Case> = labelled.iter().map(|c| (*c).clone()).collect();
        let answered = report(labels, &labelled_cases, opts, &notes)?;
        let accepted_cases: Vec<Case> = cases
            .iter()
            .filter(|c| c.outcome == Outcome::Answered)
            .cloned()
            .collect();
        let accepted = report(labels, &accepted_cases, opts, &notes)?;

        let with_conf: Vec<(f64, bool)> = labelled
            .iter()
            .filter_map(|c| c.confidence.map(|v| (v, c.pred == c.truth)))
            .collect();
        let (conf, correct): (Vec<f64>, Vec<bool>) = with_conf.into_iter().unzip();
        let curve = thin_curve(risk_coverage(&conf, &correct, images), opts.max_curve_points);

        let (coverage_ci, accepted_accuracy_ci) = run_intervals(labels.len(), &cases, opts);

        // Failed images have no response, so no latency worth summarising.
        let timed: Vec<&Prediction> = preds
            .iter()
            .filter(|p| p.outcome != Outcome::Failed && p.latency_ms.is_finite())
            .collect();
        let latencies: Vec<f64> = timed.iter().map(|p| p.latency_ms).collect();
        let latency_cached = timed.iter().filter(|p| p.cached).count();

        let cached = preds.iter().filter(|p| p.cached).count();
        let live = images - cached;
        let per_live = |x: f64| if live == 0 { 0.0 } else { x / live as f64 };
        let tokens = preds.iter().any(|p| p.tokens.is_some()).then(|| {
            let sum = |replayed: bool, f: fn(&mica_core::TokenUsage) -> u64| -> u64 {
                preds.iter().filter(|p| p.cached == replayed).filter_map(|p| p.tokens.as_ref()).map(f).sum()
            };
            let (prompt, completion) = (sum(false, |t| t.prompt), sum(false, |t| t.completion));
            TokenTotals {
                images_with_tokens: preds.iter().filter(|p| !p.cached && p.tokens.is_some()).count(),
                prompt,
                completion,
                total: prompt + completion,
                prompt_per_image: per_live(prompt as f64),
                completion_per_image: per_live(completion as f64),
                total_per_image: per_live((prompt + completion) as f64),
                replayed_prompt: sum(true, |t| t.prompt),
                replayed_completion: sum(true, |t| t.completion),
            }
        });
        let cost = preds.iter().any(|p| p.cost_usd.is_some()).then(|| {
            let sum = |replayed: bool| -> f64 { preds.iter().filter(|p| p.cached == replayed).filter_map(|p| p.cost_usd).sum() };
            let total = sum(false);
            CostTotals {
                images_with_cost: preds.iter().filter(|p| !p.cached && p.cost_usd.is_some()).count(),
                total_usd: total,
                per_image_usd: per_live(total),
                replayed_usd: sum(true),
            }
        });
        if live == 0 {
            all.notes.push(
                "every answer was replayed from the response cache: no throughput, and live cost and tokens are 0 (the original cost is under cost.replayed_usd)"
                    .to_string(),
            );
        } else if cached > 0 {
            all.notes.push(format!(
                "{cached} of {images} answers were replayed from the response cache: throughput, cost and tokens cover the {live} asked now"
            ));
        }
        Ok(RunMetrics {
            schema: RUN_METRICS_SCHEMA,
            classifier: classifier.to_string(),
            dataset: dataset.to_string(),
            split: split.to_string(),
            labels: labels.names().to_vec(),
            images,
            outcomes,
            all,
            answered,
            accepted,
            coverage: outcomes.answered as f64 / images as f64,
            coverage_ci,
            accepted_accuracy_ci,
            risk_coverage: curve,
            latency_ms: latency_summary(&latencies),
            latency_kind: None,
            first_latency_ms: None,
            latency_cached,
            wall_seconds,
            throughput_images_per_s: (wall_seconds > 0.0 && wall_seconds.is_finite() && live > 0)
                .then(|| live as f64 / wall_seconds),
            cached,
            live,
            tokens,
            cost,
            simulated: false,
            energy: None,
            extra: serde_json::Map::new(),
        })
    }

    /// Writes pretty JSON atomically, so a reader never sees half a file.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), EvalError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("metrics serialise");
        bytes.push(b'\n');
        write_atomic(path, &bytes)?;
        Ok(())
    }

    pub fn read(path: impl AsRef<Path>) -> Result<RunMetrics, EvalError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
        let bad = |e: serde_json::Error| EvalError::File {
            path: path.to_path_buf(),
            message: format!("not a mica metrics.json: {e}"),
        };
        // Parsed straight from the bytes, not through `serde_json::Value`, whose map would
        // reorder the per-class labels alphabetically.
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            live: Option<serde::de::IgnoredAny>,
        }
        let has_live = serde_json::from_slice::<Probe>(&bytes).map_err(bad)?.live.is_some();
        let mut m: RunMetrics = serde_json::from_slice(&bytes).map_err(bad)?;
        if !has_live {
            // Written before cache accounting: every image counts as asked in that run.
            m.live = m.images - m.cached.min(m.images);
        }
        Ok(m)
    }
}

/// Intervals of `coverage` and of the accuracy on accepted images, over the stratified
/// resamples of all images (the same ones as the `all` view's intervals).
fn run_intervals(k: usize, cases: &[Case], opts: &EvalOptions) -> (Option<ConfidenceInterval>, Option<ConfidenceInterval>) {
    let b = opts.bootstrap_resamples;
    if b == 0 {
        return (None, None);
    }
    let truth: Vec<usize> = cases.iter().map(|c| c.truth).collect();
    let mut coverage = Vec::with_capacity(b);
    let mut accuracy = Vec::with_capacity(b);
    for index in stratified_resampler(&truth, k, b, opts.seed) {
        let (mut accepted, mut right) = (0usize, 0usize);
        for &i in &index {
            if cases[i].outcome == Outcome::Answered {
                accepted += 1;
                right += (cases[i].pred == cases[i].truth) as usize;
            }
        }
        coverage.push(accepted as f64 / index.len() as f64);
        if accepted > 0 {
            accuracy.push(right as f64 / accepted as f64);
        }
    }
    let level = opts.confidence_level;
    (percentile_interval(&coverage, b, level), percentile_interval(&accuracy, b, level))
}

fn case(labels: &LabelSet, p: &Prediction, notes: &mut Vec<String>) -> Result<Case, EvalError> {
    let id = &p.sample_id;
    let truth_name = p
        .true_label
        .as_deref()
        .ok_or_else(|| EvalError::input(format!("sample `{id}`: no true label, cannot be evaluated")))?;
    let truth = labels.index_of(truth_name).ok_or_else(|| {
        EvalError::input(format!(
            "sample `{id}`: true label `{truth_name}` is not one of {}",
            labels.names().join(", ")
        ))
    })?;
    let pred = match p.outcome {
        Outcome::Unparseable | Outcome::Refused | Outcome::Failed => NO_ANSWER,
        Outcome::Answered | Outcome::Deferred => {
            let name = p.predicted.as_deref().ok_or_else(|| {
                EvalError::input(format!("sample `{id}`: outcome {} but no predicted label", p.outcome.as_str()))
            })?;
            labels.index_of(name).ok_or_else(|| {
                EvalError::input(format!(
                    "sample `{id}`: predicted label `{name}` is not one of {}",
                    labels.names().join(", ")
                ))
            })?
        }
    };
    let probs = match &p.probabilities {
        None => None,
        Some(m) => {
            if let Some(extra) = m.keys().find(|k| labels.index_of(k).is_none()) {
                return Err(EvalError::input(format!(
                    "sample `{id}`: probability for unknown label `{extra}`"
                )));
            }
            let row: Option<Vec<f64>> = labels.iter().map(|l| m.get(l).copied()).collect();
            if row.is_none() {
                let note = "some probability vectors miss a label, so ROC AUC is not computed".to_string();
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            row
        }
    };
    if let Some(c) = p.confidence {
        if !(0.0..=1.0).contains(&c) {
            return Err(EvalError::input(format!("sample `{id}`: confidence {c} is not within 0..=1")));
        }
    }
    let confidence = p.confidence.or_else(|| {
        let r = probs.as_ref()?;
        (pred != NO_ANSWER).then(|| r[pred])
    });
    Ok(Case {
        truth,
        pred,
        outcome: p.outcome,
        probs,
        confidence,
    })
}

/// Metrics of a subset; probabilities and confidences are used only when every case has them
/// (a partial set would silently change the denominator), with a note saying so otherwise.
fn report(labels: &LabelSet, cases: &[Case], opts: &EvalOptions, notes: &[String]) -> Result<Option<EvalReport>, EvalError> {
    if cases.is_empty() {
        return Ok(None);
    }
    let y_true: Vec<usize> = cases.iter().map(|c| c.truth).collect();
    let y_pred: Vec<usize> = cases.iter().map(|c| c.pred).collect();
    let probs: Option<Vec<Vec<f64>>> = cases.iter().map(|c| c.probs.clone()).collect();
    // A case without an answer has no confidence and is left out of calibration (see
    // `evaluate_with`), so it must not make the confidences of the others count as partial.
    let conf: Option<Vec<f64>> = cases
        .iter()
        .map(|c| if c.pred == NO_ANSWER { Some(c.confidence.unwrap_or(f64::NAN)) } else { c.confidence })
        .collect();
    let mut r = evaluate_with(labels, &y_true, &y_pred, probs.as_deref(), conf.as_deref(), opts)?;
    let some_probs = cases.iter().any(|c| c.probs.is_some());
    if probs.is_none() && some_probs {
        r.notes.push("ROC AUC not computed: not every case has class probabilities".into());
    }
    if conf.is_none() && cases.iter().any(|c| c.confidence.is_some()) {
        r.notes.push(if probs.is_some() {
            "ECE and AURC not computed: not every answered case has a confidence".into()
        } else {
            "ECE, AURC and Brier score not computed: not every answered case has a confidence".into()
        });
    }
    for n in notes {
        if !r.notes.contains(n) {
            r.notes.push(n.clone());
        }
    }
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mica_core::TokenUsage;
    use std::collections::BTreeMap;

    use crate::metrics::percentile_interval;

    fn labels() -> LabelSet {
        LabelSet::new(vec!["glioma".into(), "meningioma".into(), "no_tumor".into()]).unwrap()
    }

    fn pred(id: &str, truth: &str, predicted: Option<&str>, outcome: Outcome, conf: Option<f64>) -> Prediction {
        let mut p = Prediction::new(id, "llm:test", outcome);
        p.true_label = Some(truth.into());
        p.predicted = predicted.map(String::from);
        p.confidence = conf;
        p.latency_ms = 100.0;
        p
    }

    fn sample_preds() -> Vec<Prediction> {
        vec![
            pred("1", "glioma", Some("glioma"), Outcome::Answered, Some(0.9)),
            pred("2", "glioma", Some("meningioma"), Outcome::Deferred, Some(0.4)),
            pred("3", "meningioma", Some("meningioma"), Outcome::Answered, Some(0.8)),
            pred("4", "no_tumor", None, Outcome::Unparseable, None),
            pred("5", "no_tumor", Some("no_tumor"), Outcome::Deferred, Some(0.3)),
            pred("6", "meningioma", None, Outcome::Failed, None),
        ]
    }

    #[test]
    fn three_views_and_outcomes() {
        let opts = EvalOptions { bootstrap_resamples: 50, ..Default::default() };
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &sample_preds(), 2.0, &opts).unwrap();
        assert_eq!(m.images, 6);
        assert_eq!(m.outcomes, OutcomeCounts { answered: 2, deferred: 2, unparseable: 1, refused: 0, failed: 1 });
        // all: right on 1, 3, 5 -> 3/6; the two no-answers are in their own column.
        assert_eq!(m.all.accuracy, 0.5);
        assert_eq!(m.all.confusion.no_answer, vec![0, 1, 1]);
        assert_eq!(m.all.no_answer, 2);
        // answered: 1, 2, 3, 5 -> 3/4
        let a = m.answered.as_ref().unwrap();
        assert_eq!((a.n, a.accuracy), (4, 0.75));
        // accepted: 1 and 3, both right; coverage 2/6
        let acc = m.accepted.as_ref().unwrap();
        assert_eq!((acc.n, acc.accuracy), (2, 1.0));
        assert!((m.coverage - 1.0 / 3.0).abs() < 1e-15);
        // Curve over the 4 labelled cases with confidence: 0.9 R, 0.8 R, 0.4 W, 0.3 R.
        let c: Vec<_> = m.risk_coverage.iter().map(|p| (p.threshold, p.accepted)).collect();
        assert_eq!(c, vec![(0.9, 1), (0.8, 2), (0.4, 3), (0.3, 4)]);
        assert_eq!(m.risk_coverage[3].accuracy, 0.75);
        assert!((m.risk_coverage[3].coverage - 4.0 / 6.0).abs() < 1e-15);
        // Calibration covers the labelled images in both views: the no-answers have no
        // confidence and are left out of `all`'s, with a note.
        assert!(a.ece.is_some());
        assert_eq!((m.all.ece, m.all.aurc, m.all.brier), (a.ece, a.aurc, a.brier));
        assert_eq!(m.all.calibration_cases, Some(4));
        assert_eq!(m.all.brier_kind.as_deref(), Some("confidence"));
        assert!(m.all.notes.iter().any(|n| n.contains("2 without an answer")), "{:?}", m.all.notes);
        assert_eq!(m.throughput_images_per_s, Some(3.0));
        // The failed image has no latency in the summary.
        let l = m.latency_ms.unwrap();
        assert_eq!((l.count, l.mean), (5, 100.0));
        assert_eq!((m.cached, m.live, m.latency_cached), (0, 6, 0));
        assert!(m.tokens.is_none() && m.cost.is_none());
        assert!(m.coverage_ci.is_some() && m.accepted_accuracy_ci.is_some());
    }

    #[test]
    fn coverage_and_accepted_accuracy_intervals_replay_the_stratified_resamples() {
        let opts = EvalOptions { bootstrap_resamples: 300, seed: 5, ..Default::default() };
        let ps = sample_preds();
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &ps, 2.0, &opts).unwrap();
        // Truth by class index: glioma 0, meningioma 1, no_tumor 2; accepted: images 1 and 3,
        // both right.
        let truth = [0, 0, 1, 2, 2, 1];
        let accepted = [true, false, true, false, false, false];
        let (mut cov, mut acc) = (Vec::new(), Vec::new());
        for ix in crate::stratified_resamples(&truth, 3, 300, 5) {
            let a = ix.iter().filter(|&&i| accepted[i]).count();
            cov.push(a as f64 / 6.0);
            if a > 0 {
                acc.push(1.0);
            }
        }
        assert_eq!(m.coverage_ci, percentile_interval(&cov, 300, 0.95));
        // Every resample accepts at least one right image... or none, which is skipped.
        assert_eq!(m.accepted_accuracy_ci, Some(ConfidenceInterval { lower: 1.0, upper: 1.0 }));
        let c = m.coverage_ci.unwrap();
        assert!(c.lower < m.coverage && m.coverage < c.upper, "{c:?}");
        // The same resamples as the `all` view's intervals.
        assert_eq!(m.all.bootstrap.unwrap().seed, 5);
        let off = EvalOptions { bootstrap_resamples: 0, ..Default::default() };
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &ps, 2.0, &off).unwrap();
        assert_eq!((m.coverage_ci, m.accepted_accuracy_ci), (None, None));
    }

    #[test]
    fn replayed_answers_cost_nothing_now_and_claim_no_throughput() {
        let opts = EvalOptions { bootstrap_resamples: 0, ..Default::default() };
        let mut ps = sample_preds();
        for (i, p) in ps.iter_mut().enumerate() {
            p.tokens = Some(TokenUsage { prompt: 100, completion: 10 });
            p.cost_usd = Some(0.01);
            p.latency_ms = 10.0 * (i + 1) as f64;
            // Images 1, 2 and 3 were replayed from the cache.
            p.cached = i < 3;
        }
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &ps, 1.5, &opts).unwrap();
        assert_eq!((m.cached, m.live), (3, 3));
        assert_eq!(m.throughput_images_per_s, Some(2.0));
        let c = m.cost.unwrap();
        assert_eq!(c.images_with_cost, 3);
        assert!((c.total_usd - 0.03).abs() < 1e-15 && (c.replayed_usd - 0.03).abs() < 1e-15, "{c:?}");
        assert!((c.per_image_usd - 0.01).abs() < 1e-15);
        let t = m.tokens.unwrap();
        assert_eq!((t.prompt, t.completion, t.images_with_tokens), (300, 30, 3));
        assert_eq!((t.replayed_prompt, t.replayed_completion), (300, 30));
        assert_eq!(t.total_per_image, 110.0);
        // Latencies 10..60; image 6 failed (60 left out); the three replayed ones are counted.
        let l = m.latency_ms.unwrap();
        assert_eq!((l.count, l.mean, l.max), (5, 30.0, 50.0));
        assert_eq!(m.latency_cached, 3);
        assert!(m.all.notes.iter().any(|n| n.contains("3 of 6 answers were replayed")), "{:?}", m.all.notes);

        // Fully cached rerun: no throughput, no live cost, and a note that says why.
        for p in ps.iter_mut() {
            p.cached = true;
        }
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &ps, 1.5, &opts).unwrap();
        assert_eq!((m.cached, m.live, m.throughput_images_per_s), (6, 0, None));
        let c = m.cost.unwrap();
        assert_eq!((c.total_usd, c.per_image_usd, c.images_with_cost), (0.0, 0.0, 0));
        assert!((c.replayed_usd - 0.06).abs() < 1e-15);
        assert_eq!(m.tokens.unwrap().total_per_image, 0.0);
        assert!(m.all.notes.iter().any(|n| n.contains("every answer was replayed")), "{:?}", m.all.notes);
    }

    #[test]
    fn caller_set_latency_fields_round_trip() {
        let opts = EvalOptions { bootstrap_resamples: 0, ..Default::default() };
        let mut m = RunMetrics::from_predictions("cnn:x", "brain", "test", &labels(), &sample_preds(), 2.0, &opts).unwrap();
        assert_eq!((m.latency_kind, m.first_latency_ms), (None, None));
        m.latency_kind = Some(LatencyKind::PerImageAmortised { batch: 32 });
        m.first_latency_ms = Some(850.0);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""latency_kind":{"kind":"per-image-amortised","batch":32}"#), "{json}");
        assert_eq!(serde_json::from_str::<RunMetrics>(&json).unwrap(), m);
    }

    #[test]
    fn tokens_cost_probabilities_and_round_trip() {
        let mut ps = sample_preds();
        for p in ps.iter_mut().take(3) {
            p.tokens = Some(TokenUsage { prompt: 1000, completion: 20 });
            p.cost_usd = Some(0.003);
        }
        for p in ps.iter_mut() {
            let mut m = BTreeMap::new();
            m.insert("glioma".to_string(), 0.5);
            m.insert("meningioma".to_string(), 0.3);
            m.insert("no_tumor".to_string(), 0.2);
            p.probabilities = Some(m);
        }
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &ps, 0.0, &EvalOptions::default()).unwrap();
        let t = m.tokens.unwrap();
        assert_eq!((t.prompt, t.completion, t.total, t.images_with_tokens), (3000, 60, 3060, 3));
        assert_eq!(t.total_per_image, 510.0);
        let c = m.cost.unwrap();
        assert!((c.per_image_usd - 0.0015).abs() < 1e-15);
        assert_eq!(m.throughput_images_per_s, None);
        assert!(m.all.roc_auc_macro.is_some());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/metrics.json");
        let mut m2 = m.clone();
        m2.simulated = true;
        m2.energy = Some(serde_json::json!({"joules": 12.5}));
        m2.extra.insert("epochs".into(), serde_json::json!(3));
        m2.write(&path).unwrap();
        assert_eq!(RunMetrics::read(&path).unwrap(), m2);
        std::fs::write(&path, "{}").unwrap();
        let err = RunMetrics::read(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.json") && err.contains("not a mica metrics.json"), "{err}");
    }

    #[test]
    fn bad_predictions_name_the_sample() {
        let l = labels();
        let o = EvalOptions::default();
        let mut ps = sample_preds();
        ps[1].predicted = Some("astrocytoma".into());
        let e = RunMetrics::from_predictions("x", "d", "test", &l, &ps, 1.0, &o).unwrap_err().to_string();
        assert!(e.contains("sample `2`") && e.contains("astrocytoma"), "{e}");

        let mut ps = sample_preds();
        ps[0].true_label = None;
        let e = RunMetrics::from_predictions("x", "d", "test", &l, &ps, 1.0, &o).unwrap_err().to_string();
        assert!(e.contains("sample `1`") && e.contains("no true label"), "{e}");

        let mut ps = sample_preds();
        ps.push(ps[0].clone());
        let e = RunMetrics::from_predictions("x", "d", "test", &l, &ps, 1.0, &o).unwrap_err().to_string();
        assert!(e.contains("more than one prediction"), "{e}");

        let mut ps = sample_preds();
        ps[2].predicted = None;
        assert!(RunMetrics::from_predictions("x", "d", "test", &l, &ps, 1.0, &o).is_err());
        assert!(RunMetrics::from_predictions("x", "d", "test", &l, &[], 1.0, &o).is_err());
    }

    #[test]
    fn refused_is_counted_as_no_answer() {
        let mut ps = sample_preds();
        // Image 5 (a deferred right answer) becomes a refusal: it has no label any more.
        ps[4] = pred("5", "no_tumor", None, Outcome::Refused, None);
        ps[4].raw_answer = Some("I'm sorry, I can't assist with that request.".into());
        let opts = EvalOptions { bootstrap_resamples: 0, ..Default::default() };
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &ps, 2.0, &opts).unwrap();
        assert_eq!(m.outcomes, OutcomeCounts { answered: 2, deferred: 1, unparseable: 1, refused: 1, failed: 1 });
        assert_eq!(m.outcomes.no_answer(), 3);
        // all: right on 1 and 3 only -> 2/6; three images in the no-answer column.
        assert!((m.all.accuracy - 2.0 / 6.0).abs() < 1e-15);
        assert_eq!(m.all.no_answer, 3);
        assert_eq!(m.all.confusion.no_answer, vec![0, 1, 2]);
        // answered: 1, 2, 3 -> 2/3; the refusal is not a labelled case.
        let a = m.answered.as_ref().unwrap();
        assert_eq!(a.n, 3);
        assert!((m.coverage - 2.0 / 6.0).abs() < 1e-15);
        // A refusal that carries a label by mistake still counts as no answer.
        ps[4].predicted = Some("no_tumor".into());
        let m2 = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &ps, 2.0, &opts).unwrap();
        assert_eq!(m2.all.no_answer, 3);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""refused":1"#), "{json}");
    }

    #[test]
    fn metrics_written_before_refusals_still_read() {
        let opts = EvalOptions { bootstrap_resamples: 0, ..Default::default() };
        let m = RunMetrics::from_predictions("llm:test", "brain", "test", &labels(), &sample_preds(), 2.0, &opts).unwrap();
        let mut v = serde_json::to_value(&m).unwrap();
        v["outcomes"].as_object_mut().unwrap().remove("refused");
        assert!(!v.to_string().contains("refused"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        let back = RunMetrics::read(&path).unwrap();
        assert_eq!(back.outcomes.refused, 0);
        assert_eq!(back, m);
        // Nor the cache accounting, latency kind, run intervals or calibration extras: the
        // images of such a file were all asked in its run.
        let mut v = serde_json::to_value(&m).unwrap();
        let o = v.as_object_mut().unwrap();
        for key in ["coverage_ci", "accepted_accuracy_ci", "latency_kind", "first_latency_ms", "latency_cached", "cached", "live"] {
            assert!(o.remove(key).is_some(), "{key}");
        }
        for key in ["aurc", "brier", "brier_kind", "calibration_cases", "weighted_f1_ci", "cohen_kappa_ci", "roc_auc_macro_ci"] {
            o["all"].as_object_mut().unwrap().remove(key);
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        let back = RunMetrics::read(&path).unwrap();
        assert_eq!((back.cached, back.live), (0, 6));
        assert_eq!((back.all.aurc, back.coverage_ci), (None, None));
        // And an old predictions line (no refused outcome anywhere) still loads.
        let line = r#"{"sample_id":"a","classifier":"c","true_label":"glioma","predicted":null,"outcome":"unparseable","confidence":null,"latency_ms":1.0}"#;
        let p: Prediction = serde_json::from_str(line).unwrap();
        assert_eq!(p.outcome, Outcome::Unparseable);
    }

    #[test]
    fn nothing_labelled_still_reports_all() {
        let ps = vec![
            pred("1", "glioma", None, Outcome::Failed, None),
            pred("2", "no_tumor", None, Outcome::Unparseable, None),
        ];
        let m = RunMetrics::from_predictions("x", "d", "test", &labels(), &ps, 1.0, &EvalOptions::default()).unwrap();
        assert_eq!(m.all.accuracy, 0.0);
        assert!(m.answered.is_none() && m.accepted.is_none());
        assert_eq!(m.coverage, 0.0);
        assert!(m.risk_coverage.is_empty());
    }
}
