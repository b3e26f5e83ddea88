//! The headline classification metrics and their report.
//!
//! Conventions (all chosen to equal scikit-learn's defaults):
//! - zero division gives 0 (precision of a class never predicted, recall of a class never
//!   present), as `zero_division="warn"` does;
//! - macro and weighted averages run over the classes that occur in `y_true` or `y_pred`, as
//!   scikit-learn does when `labels=None`; classes of the label set that occur nowhere are still
//!   listed per class (all zeros) but do not drag the macro average down;
//! - a "no answer" prediction ([`crate::NO_ANSWER`]) is wrong: it lowers the recall of its true
//!   class and the accuracy, adds to no class's precision, and is its own column in the
//!   confusion matrix and in Cohen's kappa (scikit-learn with an extra label that is never
//!   true);
//! - ROC AUC is one-vs-rest, macro-averaged, from the given probabilities (for two classes:
//!   the AUC of the second class's score, as scikit-learn's binary case); it is undefined (None,
//!   with a note) when some class has no positive or no negative case;
//! - calibration (ECE, AURC, Brier) covers the answered cases only, since a case without an
//!   answer states no confidence; a note gives the count left out;
//! - bootstrap intervals resample within each true class ([`stratified_resamples`]), so each
//!   resample has the test set's class counts, and are percentile intervals
//!   ([`percentile_interval`]).

use std::collections::BTreeMap;

use mica_core::LabelSet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::stats::quantile_linear;
use crate::{EvalError, EvalOptions, NO_ANSWER};

/// Values keyed by label name that keep the label order in JSON (a plain map would sort them).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap<T>(pub Vec<(String, T)>);

impl<T> LabelMap<T> {
    pub fn get(&self, label: &str) -> Option<&T> {
        self.0.iter().find(|(l, _)| l == label).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.0.iter().map(|(l, v)| (l.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: Serialize> Serialize for LabelMap<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for LabelMap<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = LabelMap<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from label name to value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(LabelMap(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Number of cases whose true label is this class.
    pub support: u64,
}

/// Rows are true classes, columns predicted classes, both in label order; `no_answer[i]` counts
/// the cases of true class `i` that got no label (unparseable, refused or failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    pub labels: Vec<String>,
    pub matrix: Vec<Vec<u64>>,
    pub no_answer: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn total(&self) -> u64 {
        self.matrix.iter().flatten().sum::<u64>() + self.no_answer.iter().sum::<u64>()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceInterval {
    pub lower: f64,
    pub upper: f64,
}

/// How the bootstrap resamples were drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootstrapMethod {
    /// Cases drawn with replacement from the whole set; what `metrics.json` files written
    /// before stratification used, hence the default when the field is absent.
    #[default]
    Percentile,
    /// Cases drawn with replacement within each true class, so every resample keeps the
    /// class counts of the evaluated set (see [`stratified_resamples`]); percentile intervals.
    StratifiedPercentile,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootstrapSettings {
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
    #[serde(default)]
    pub method: BootstrapMethod,
}

/// One bin of a reliability diagram: bins are `(lower, upper]`, the first also holds 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
    /// Mean confidence of the cases in the bin (0 when empty).
    pub confidence: f64,
    /// Share of the bin's cases that were right (0 when empty).
    pub accuracy: f64,
}

/// All metrics of one set of predictions. Field names are part of the `metrics.json` schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub labels: Vec<String>,
    /// Number of cases evaluated.
    pub n: usize,
    /// Cases without a label (counted as wrong).
    pub no_answer: usize,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub per_class: LabelMap<ClassMetrics>,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    pub weighted_f1: f64,
    /// None when undefined (chance agreement is total, e.g. one class everywhere).
    pub cohen_kappa: Option<f64>,
    pub confusion: ConfusionMatrix,
    /// One-vs-rest macro ROC AUC; None without probabilities or when undefined.
    pub roc_auc_macro: Option<f64>,
    /// Expected calibration error on the confidence of the given answer; None without
    /// confidences. Like every calibration figure here it covers only the cases that got an
    /// answer (`calibration_cases` of them): a case without an answer has no confidence.
    pub ece: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reliability: Vec<ReliabilityBin>,
    /// Area under the risk-coverage curve (see [`aurc`]); lower is better. None without
    /// confidences.
    #[serde(default)]
    pub aurc: Option<f64>,
    /// Brier score (see [`brier_multiclass`] and [`brier_confidence`]); which of the two is
    /// named by `brier_kind`.
    #[serde(default)]
    pub brier: Option<f64>,
    /// `"multiclass"` (probability vectors given) or `"confidence"` (only a confidence in the
    /// given answer).
    #[serde(default)]
    pub brier_kind: Option<String>,
    /// Cases the calibration figures (ECE, AURC, Brier) are computed over: the answered ones.
    #[serde(default)]
    pub calibration_cases: Option<usize>,
    pub accuracy_ci: Option<ConfidenceInterval>,
    pub macro_f1_ci: Option<ConfidenceInterval>,
    #[serde(default)]
    pub weighted_f1_ci: Option<ConfidenceInterval>,
    /// Over the resamples where kappa is defined; None when fewer than half of them are.
    #[serde(default)]
    pub cohen_kappa_ci: Option<ConfidenceInterval>,
    /// Over the resamples where the AUC is defined; None without probabilities.
    #[serde(default)]
    pub roc_auc_macro_ci: Option<ConfidenceInterval>,
    pub bootstrap: Option<BootstrapSettings>,
    /// Why an optional metric is missing, in words, for reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Metrics from class indices. `y_pred` may hold [`NO_ANSWER`]; `probs` rows are class
/// probabilities in label order. ECE uses the maximum probability as the confidence of the
/// given prediction.
pub fn evaluate(
    labels: &LabelSet,
    y_true: &[usize],
    y_pred: &[usize],
    probs: Option<&[Vec<f64>]>,
    opts: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    let conf: Option<Vec<f64>> =
        probs.map(|p| p.iter().map(|r| r.iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect());
    evaluate_with(labels, y_true, y_pred, probs, conf.as_deref(), opts)
}

/// [`evaluate`] with explicit per-case confidences, for classifiers (LLMs) that state a
/// confidence but give no probability vector. `confidence` wins over `probs` for ECE and AURC;
/// `probs` win for the Brier score (the multi-class score uses the whole vector).
///
/// Calibration (ECE, AURC, Brier) covers only the cases with an answer: a [`NO_ANSWER`] case
/// has no confidence in any label, so its `confidence` entry is ignored (it may be NaN) and a
/// note says how many cases were left out. It still counts as wrong everywhere else.
pub fn evaluate_with(
    labels: &LabelSet,
    y_true: &[usize],
    y_pred: &[usize],
    probs: Option<&[Vec<f64>]>,
    confidence: Option<&[f64]>,
    opts: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    let k = labels.len();
    let n = y_true.len();
    if n == 0 {
        return Err(EvalError::Empty);
    }
    if y_pred.len() != n {
        return Err(EvalError::input(format!(
            "{} true labels but {} predictions",
            n,
            y_pred.len()
        )));
    }
    for (i, &t) in y_true.iter().enumerate() {
        if t >= k {
            return Err(EvalError::input(format!("case {i}: true class index {t} is outside the {k} labels")));
        }
    }
    for (i, &p) in y_pred.iter().enumerate() {
        if p >= k && p != NO_ANSWER {
            return Err(EvalError::input(format!("case {i}: predicted class index {p} is outside the {k} labels")));
        }
    }
    if let Some(p) = probs {
        check_probs(p, n, k)?;
    }
    if let Some(c) = confidence {
        if c.len() != n {
            return Err(EvalError::input(format!("{} confidences for {} cases", c.len(), n)));
        }
        let bad = c
            .iter()
            .zip(y_pred)
            .enumerate()
            .find(|(_, (v, &p))| p != NO_ANSWER && !(0.0..=1.0).contains(*v));
        if let Some((i, (v, _))) = bad {
            return Err(EvalError::input(format!("case {i}: confidence {v} is not within 0..=1")));
        }
    }

    let mut notes = Vec::new();
    let counts = Counts::from_indices(k, y_true, y_pred, None);
    let (per_class_raw, core) = counts.metrics();
    let per_class = LabelMap(
        labels
            .iter()
            .zip(per_class_raw)
            .map(|(l, m)| (l.to_string(), m))
            .collect(),
    );
    let cohen_kappa = cohen_kappa(&counts.matrix, &counts.no_answer);
    if cohen_kappa.is_none() {
        notes.push("Cohen's kappa is undefined: expected chance agreement is 1".to_string());
    }

    let all: Vec<usize> = (0..n).collect();
    let roc_auc_macro = match probs {
        None => None,
        Some(p) => match roc_auc_ovr_macro(y_true, p, k, &all) {
            Ok(v) => Some(v),
            Err(why) => {
                notes.push(format!("ROC AUC is undefined: {}", why(labels)));
                None
            }
        },
    };

    let calibration = calibration(y_true, y_pred, probs, confidence, opts, &mut notes);

    let boot = if opts.bootstrap_resamples > 0 {
        let auc_probs = probs.filter(|_| roc_auc_macro.is_some());
        Some(bootstrap_cis(k, y_true, y_pred, auc_probs, cohen_kappa.is_some(), opts, &mut notes))
    } else {
        None
    };
    let ci = |f: fn(&BootstrapCis) -> Option<ConfidenceInterval>| boot.as_ref().and_then(f);

    Ok(EvalReport {
        labels: labels.names().to_vec(),
        n,
        no_answer: counts.no_answer.iter().sum::<u64>() as usize,
        accuracy: core.accuracy,
        balanced_accuracy: core.balanced_accuracy,
        per_class,
        macro_precision: core.macro_precision,
        macro_recall: core.macro_recall,
        macro_f1: core.macro_f1,
        weighted_f1: core.weighted_f1,
        cohen_kappa,
        confusion: ConfusionMatrix {
            labels: labels.names().to_vec(),
            matrix: counts.matrix,
            no_answer: counts.no_answer,
        },
        roc_auc_macro,
        ece: calibration.ece,
        reliability: calibration.reliability,
        aurc: calibration.aurc,
        brier: calibration.brier,
        brier_kind: calibration.brier_kind.map(str::to_string),
        calibration_cases: calibration.cases,
        accuracy_ci: ci(|b| b.accuracy),
        macro_f1_ci: ci(|b| b.macro_f1),
        weighted_f1_ci: ci(|b| b.weighted_f1),
        cohen_kappa_ci: ci(|b| b.cohen_kappa),
        roc_auc_macro_ci: ci(|b| b.roc_auc_macro),
        bootstrap: boot.as_ref().map(|_| BootstrapSettings {
            resamples: opts.bootstrap_resamples,
            seed: opts.seed,
            level: opts.confidence_level,
            method: BootstrapMethod::StratifiedPercentile,
        }),
        notes,
    })
}

#[derive(Default)]
struct Calibration {
    ece: Option<f64>,
    reliability: Vec<ReliabilityBin>,
    aurc: Option<f64>,
    brier: Option<f64>,
    brier_kind: Option<&'static str>,
    cases: Option<usize>,
}

/// ECE, AURC and Brier over the answered cases (see [`evaluate_with`]).
fn calibration(
    y_true: &[usize],
    y_pred: &[usize],
    probs: Option<&[Vec<f64>]>,
    confidence: Option<&[f64]>,
    opts: &EvalOptions,
    notes: &mut Vec<String>,
) -> Calibration {
    if probs.is_none() && confidence.is_none() {
        return Calibration::default();
    }
    let answered: Vec<usize> = (0..y_true.len()).filter(|&i| y_pred[i] != NO_ANSWER).collect();
    let left_out = y_true.len() - answered.len();
    if answered.is_empty() {
        notes.push("ECE, AURC and Brier score are not computed: no case got an answer".to_string());
        return Calibration::default();
    }
    if left_out > 0 {
        notes.push(format!(
            "ECE, AURC and Brier score cover the {} answered cases; the {left_out} without an answer have no confidence and are left out",
            answered.len()
        ));
    }
    let correct: Vec<bool> = answered.iter().map(|&i| y_true[i] == y_pred[i]).collect();
    let mut out = Calibration {
        cases: Some(answered.len()),
        ..Calibration::default()
    };
    if let Some(c) = confidence {
        let conf: Vec<f64> = answered.iter().map(|&i| c[i]).collect();
        let bins = reliability_bins(&conf, &correct, opts.ece_bins.max(1));
        out.ece = Some(ece_from_bins(&bins, conf.len()));
        out.reliability = bins;
        out.aurc = aurc(&conf, &correct);
    }
    if let Some(p) = probs {
        let rows: Vec<&[f64]> = answered.iter().map(|&i| p[i].as_slice()).collect();
        let truth: Vec<usize> = answered.iter().map(|&i| y_true[i]).collect();
        out.brier = Some(brier_multiclass(&rows, &truth));
        out.brier_kind = Some("multiclass");
    } else if let Some(c) = confidence {
        let conf: Vec<f64> = answered.iter().map(|&i| c[i]).collect();
        out.brier = Some(brier_confidence(&conf, &correct));
        out.brier_kind = Some("confidence");
    }
    out
}

/// Multi-class Brier score: the mean over cases of `sum_k (p_k - 1[y = k])^2`, range 0..=2
/// (scikit-learn's `brier_score_loss(y, P, labels=..., scale_by_half=False)`; for two classes
/// this is twice the usual binary score).
pub fn brier_multiclass(probs: &[&[f64]], y_true: &[usize]) -> f64 {
    assert_eq!(probs.len(), y_true.len(), "one probability row per case");
    if probs.is_empty() {
        return 0.0;
    }
    let total: f64 = probs
        .iter()
        .zip(y_true)
        .map(|(row, &t)| {
            row.iter()
                .enumerate()
                .map(|(j, &p)| {
                    let d = p - if j == t { 1.0 } else { 0.0 };
                    d * d
                })
                .sum::<f64>()
        })
        .sum();
    total / probs.len() as f64
}

/// Brier score of a stated confidence against correctness: the mean of
/// `(confidence - 1[answer right])^2`, range 0..=1 (scikit-learn's binary
/// `brier_score_loss(correct, confidence)`). For classifiers that give no probability vector.
pub fn brier_confidence(confidence: &[f64], correct: &[bool]) -> f64 {
    assert_eq!(confidence.len(), correct.len(), "one correctness flag per confidence");
    if confidence.is_empty() {
        return 0.0;
    }
    let total: f64 = confidence
        .iter()
        .zip(correct)
        .map(|(&c, &ok)| {
            let d = c - if ok { 1.0 } else { 0.0 };
            d * d
        })
        .sum();
    total / confidence.len() as f64
}

/// Area under the risk-coverage curve: with the cases ordered by descending confidence,
/// `AURC = (1/n) sum_{m=1..n} risk(m)`, where `risk(m)` is the error rate among the `m` most
/// confident cases. Ties: within a run of equal confidences the order is arbitrary, so the
/// errors of the run are spread evenly over it, i.e. the `m`-th case of a run of `s` cases with
/// `e` errors adds `e / s` errors. This is the expectation over random tie-breaking, and makes
/// the value independent of the input order. None for no cases.
pub fn aurc(confidence: &[f64], correct: &[bool]) -> Option<f64> {
    assert_eq!(confidence.len(), correct.len(), "one correctness flag per confidence");
    let n = confidence.len();
    if n == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
    let (mut before, mut errors_before, mut sum) = (0usize, 0usize, 0.0f64);
    let mut i = 0;
    while i < n {
        let c = confidence[order[i]];
        let mut j = i;
        let mut errors = 0usize;
        while j < n && confidence[order[j]] == c {
            errors += !correct[order[j]] as usize;
            j += 1;
        }
        let size = j - i;
        for m in 1..=size {
            let expected = errors_before as f64 + m as f64 * errors as f64 / size as f64;
            sum += expected / (before + m) as f64;
        }
        before += size;
        errors_before += errors;
        i = j;
    }
    Some(sum / n as f64)
}

fn check_probs(p: &[Vec<f64>], n: usize, k: usize) -> Result<(), EvalError> {
    if p.len() != n {
        return Err(EvalError::input(format!("{} probability rows for {} cases", p.len(), n)));
    }
    for (i, row) in p.iter().enumerate() {
        if row.len() != k {
            return Err(EvalError::input(format!(
                "case {i}: {} probabilities for {k} labels",
                row.len()
            )));
        }
        if let Some(v) = row.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(EvalError::input(format!("case {i}: probability {v} is not within 0..=1")));
        }
    }
    Ok(())
}

/// Confusion counts; the basis of every count-based metric and of each bootstrap resample.
struct Counts {
    matrix: Vec<Vec<u64>>,
    no_answer: Vec<u64>,
}

struct CoreMetrics {
    accuracy: f64,
    balanced_accuracy: f64,
    macro_precision: f64,
    macro_recall: f64,
    macro_f1: f64,
    weighted_f1: f64,
}

impl Counts {
    /// `index` picks the cases (a bootstrap resample); None means all, in order.
    fn from_indices(k: usize, y_true: &[usize], y_pred: &[usize], index: Option<&[usize]>) -> Counts {
        let mut matrix = vec![vec![0u64; k]; k];
        let mut no_answer = vec![0u64; k];
        let mut add = |i: usize| {
            let t = y_true[i];
            match y_pred[i] {
                NO_ANSWER => no_answer[t] += 1,
                p => matrix[t][p] += 1,
            }
        };
        match index {
            None => (0..y_true.len()).for_each(&mut add),
            Some(ix) => ix.iter().copied().for_each(&mut add),
        }
        Counts { matrix, no_answer }
    }

    fn metrics(&self) -> (Vec<ClassMetrics>, CoreMetrics) {
        let k = self.matrix.len();
        let support: Vec<u64> = (0..k)
            .map(|i| self.matrix[i].iter().sum::<u64>() + self.no_answer[i])
            .collect();
        let predicted: Vec<u64> = (0..k).map(|j| (0..k).map(|i| self.matrix[i][j]).sum()).collect();
        let n: u64 = support.iter().sum();
        let tp: Vec<u64> = (0..k).map(|i| self.matrix[i][i]).collect();
        let per_class: Vec<ClassMetrics> = (0..k)
            .map(|i| {
                let precision = ratio(tp[i], predicted[i]);
                let recall = ratio(tp[i], support[i]);
                // scikit-learn >= 1.3 computes F1 from counts: 2tp / (2tp + fp + fn).
                let f1 = ratio(2 * tp[i], predicted[i] + support[i]);
                ClassMetrics {
                    precision,
                    recall,
                    f1,
                    support: support[i],
                }
            })
            .collect();
        let present: Vec<usize> = (0..k).filter(|&i| support[i] > 0 || predicted[i] > 0).collect();
        let mean_over = |f: &dyn Fn(&ClassMetrics) -> f64| -> f64 {
            if present.is_empty() {
                0.0
            } else {
                present.iter().map(|&i| f(&per_class[i])).sum::<f64>() / present.len() as f64
            }
        };
        let with_support: Vec<usize> = (0..k).filter(|&i| support[i] > 0).collect();
        let balanced_accuracy = if with_support.is_empty() {
            0.0
        } else {
            with_support.iter().map(|&i| per_class[i].recall).sum::<f64>() / with_support.len() as f64
        };
        let weighted_f1 = if n == 0 {
            0.0
        } else {
            (0..k).map(|i| per_class[i].f1 * support[i] as f64).sum::<f64>() / n as f64
        };
        let core = CoreMetrics {
            accuracy: ratio(tp.iter().sum(), n),
            balanced_accuracy,
            macro_precision: mean_over(&|m| m.precision),
            macro_recall: mean_over(&|m| m.recall),
            macro_f1: mean_over(&|m| m.f1),
            weighted_f1,
        };
        (per_class, core)
    }
}

/// Macro F1 alone (the same number as [`EvalReport::macro_f1`]), for callers that need it
/// often and cheaply, such as a training loop's validation pass: the mean over the classes that
/// occur in `y_true` or `y_pred` of `2tp / (2tp + fp + fn)`; 0 when no class occurs. `y_pred`
/// may hold [`NO_ANSWER`]; indices must be below `classes`.
pub fn macro_f1(y_true: &[usize], y_pred: &[usize], classes: usize) -> f64 {
    Counts::from_indices(classes, y_true, y_pred, None).metrics().1.macro_f1
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Cohen's kappa on the k x (k+1) table (the extra column is "no answer", a category that is
/// never true), in scikit-learn's form `1 - observed disagreement / expected disagreement`.
pub(crate) fn cohen_kappa(matrix: &[Vec<u64>], no_answer: &[u64]) -> Option<f64> {
    let k = matrix.len();
    let rows: Vec<f64> = (0..k)
        .map(|i| (matrix[i].iter().sum::<u64>() + no_answer[i]) as f64)
        .collect();
    let mut cols: Vec<f64> = (0..k).map(|j| (0..k).map(|i| matrix[i][j]).sum::<u64>() as f64).collect();
    cols.push(no_answer.iter().sum::<u64>() as f64);
    let n: f64 = rows.iter().sum();
    let mut observed = 0.0;
    let mut expected = 0.0;
    for i in 0..k {
        for j in 0..=k {
            if i == j {
                continue;
            }
            observed += if j == k { no_answer[i] as f64 } else { matrix[i][j] as f64 };
            expected += rows[i] * cols[j] / n;
        }
    }
    if expected == 0.0 {
        None
    } else {
        Some(1.0 - observed / expected)
    }
}

type AucFailure = Box<dyn Fn(&LabelSet) -> String>;

/// One-vs-rest macro ROC AUC as scikit-learn computes it with `multi_class="ovr"`, over the
/// cases `index` picks (all of them, or a bootstrap resample).
pub(crate) fn roc_auc_ovr_macro(y_true: &[usize], probs: &[Vec<f64>], k: usize, index: &[usize]) -> Result<f64, AucFailure> {
    if k < 2 {
        return Err(Box::new(|_| "it needs at least two classes".to_string()));
    }
    let classes: Vec<usize> = if k == 2 { vec![1] } else { (0..k).collect() };
    let mut sum = 0.0;
    for &c in &classes {
        let positive: Vec<bool> = index.iter().map(|&i| y_true[i] == c).collect();
        let scores: Vec<f64> = index.iter().map(|&i| probs[i][c]).collect();
        match binary_auc(&positive, &scores) {
            Some(a) => sum += a,
            None => {
                let all_pos = positive.iter().all(|&p| p);
                return Err(Box::new(move |l: &LabelSet| {
                    if all_pos {
                        format!("every case is `{}`, so its one-vs-rest curve has no negatives", l.name(c))
                    } else {
                        format!("no case is truly `{}`", l.name(c))
                    }
                }));
            }
        }
    }
    Ok(sum / classes.len() as f64)
}

/// Area under the ROC curve = probability that a random positive scores above a random negative,
/// ties counting one half (identical to the trapezoidal area scikit-learn computes).
pub fn binary_auc(positive: &[bool], scores: &[f64]) -> Option<f64> {
    let pos = positive.iter().filter(|&&p| p).count();
    let neg = positive.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut neg_below = 0u64;
    let mut twice_wins = 0u64; // counted in halves to stay exact
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        let (mut p_g, mut n_g) = (0u64, 0u64);
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            if positive[order[j]] {
                p_g += 1;
            } else {
                n_g += 1;
            }
            j += 1;
        }
        twice_wins += p_g * (2 * neg_below + n_g);
        neg_below += n_g;
        i = j;
    }
    Some(twice_wins as f64 / (2.0 * pos as f64 * neg as f64))
}

/// Reliability bins: `bins` equal-width bins on [0, 1], bin `b` holding confidences in
/// `(b/bins, (b+1)/bins]` (a confidence of exactly 0 falls in the first bin).
pub fn reliability_bins(confidence: &[f64], correct: &[bool], bins: usize) -> Vec<ReliabilityBin> {
    let mut count = vec![0u64; bins];
    let mut conf_sum = vec![0.0f64; bins];
    let mut right = vec![0u64; bins];
    for (&c, &ok) in confidence.iter().zip(correct) {
        let b = ece_bin(c, bins);
        count[b] += 1;
        conf_sum[b] += c;
        right[b] += ok as u64;
    }
    (0..bins)
        .map(|b| ReliabilityBin {
            lower: b as f64 / bins as f64,
            upper: (b + 1) as f64 / bins as f64,
            count: count[b],
            confidence: if count[b] == 0 { 0.0 } else { conf_sum[b] / count[b] as f64 },
            accuracy: ratio(right[b], count[b]),
        })
        .collect()
}

fn ece_bin(c: f64, bins: usize) -> usize {
    // The smallest b with c <= (b+1)/bins, using the same boundaries as the report shows.
    (0..bins)
        .find(|&b| c <= (b + 1) as f64 / bins as f64)
        .unwrap_or(bins - 1)
}

/// ECE = sum over bins of (bin share of cases) x |bin accuracy - bin mean confidence|.
pub fn ece_from_bins(bins: &[ReliabilityBin], n: usize) -> f64 {
    bins.iter()
        .filter(|b| b.count > 0)
        .map(|b| b.count as f64 / n as f64 * (b.accuracy - b.confidence).abs())
        .sum()
}

/// Expected calibration error of confidences against correctness (see [`reliability_bins`]).
pub fn expected_calibration_error(confidence: &[f64], correct: &[bool], bins: usize) -> f64 {
    ece_from_bins(&reliability_bins(confidence, correct, bins.max(1)), confidence.len())
}

/// Bootstrap resamples stratified by true class, drawn one at a time (see
/// [`stratified_resamples`] for the exact rule).
pub struct StratifiedResampler {
    groups: Vec<Vec<usize>>,
    rng: ChaCha8Rng,
    left: usize,
    n: usize,
}

impl Iterator for StratifiedResampler {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut out = Vec::with_capacity(self.n);
        for members in &self.groups {
            for _ in 0..members.len() {
                out.push(members[self.rng.random_range(0..members.len())]);
            }
        }
        Some(out)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for StratifiedResampler {}

/// The resamples [`stratified_resamples`] returns, without holding them all in memory.
pub fn stratified_resampler(y_true: &[usize], k: usize, resamples: usize, seed: u64) -> StratifiedResampler {
    let classes = y_true.iter().map(|&t| t + 1).max().unwrap_or(0).max(k);
    let mut groups = vec![Vec::new(); classes];
    for (i, &t) in y_true.iter().enumerate() {
        groups[t].push(i);
    }
    groups.retain(|g| !g.is_empty());
    StratifiedResampler {
        groups,
        rng: ChaCha8Rng::seed_from_u64(seed),
        left: resamples,
        n: y_true.len(),
    }
}

/// Bootstrap resamples stratified by true class: each resample is a list of case indices
/// that, for every class in ascending order, draws as many cases as the class has, uniformly
/// with replacement from that class's cases (in input order), using one ChaCha8 generator
/// seeded with `seed` for all draws in turn. Every resample therefore keeps the class counts
/// of `y_true`, so a rare class cannot vanish from a resample and no resample has a different
/// prevalence than the test set. These are exactly the resamples behind every interval of
/// [`evaluate_with`] (and of the run-level intervals of [`crate::RunMetrics`]), so they can be
/// replayed elsewhere (the scipy cross-check does). `k` is the number of classes; a larger
/// index in `y_true` is still its own class.
pub fn stratified_resamples(y_true: &[usize], k: usize, resamples: usize, seed: u64) -> Vec<Vec<usize>> {
    stratified_resampler(y_true, k, resamples, seed).collect()
}

/// Percentile interval of the values a statistic took on the resamples where it was defined:
/// the linear-interpolated quantiles (numpy's default method) at `a = (1 - level) / 2` and
/// `1 - a` (scipy's `bootstrap(method="percentile")` rule). `attempted` is the number of
/// resamples drawn; with fewer than half of them defined the interval would describe a
/// selected minority of resamples, so it is None, as it is for no values at all.
pub fn percentile_interval(values: &[f64], attempted: usize, level: f64) -> Option<ConfidenceInterval> {
    if values.is_empty() || values.len() * 2 < attempted {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let lo = (1.0 - level) / 2.0;
    Some(ConfidenceInterval {
        lower: quantile_linear(&v, lo),
        upper: quantile_linear(&v, 1.0 - lo),
    })
}

struct BootstrapCis {
    accuracy: Option<ConfidenceInterval>,
    macro_f1: Option<ConfidenceInterval>,
    weighted_f1: Option<ConfidenceInterval>,
    cohen_kappa: Option<ConfidenceInterval>,
    roc_auc_macro: Option<ConfidenceInterval>,
}

/// Intervals over the [`stratified_resamples`] of `opts`: each statistic is recomputed on every
/// resample; kappa and AUC skip the resamples where they are undefined (see
/// [`percentile_interval`] for when too many are). `probs` is given only when the AUC of the
/// whole set is defined: stratified resamples keep the class counts, so it is then defined on
/// every resample too.
fn bootstrap_cis(
    k: usize,
    y_true: &[usize],
    y_pred: &[usize],
    probs: Option<&[Vec<f64>]>,
    kappa_defined: bool,
    opts: &EvalOptions,
    notes: &mut Vec<String>,
) -> BootstrapCis {
    let b = opts.bootstrap_resamples;
    let mut accs = Vec::with_capacity(b);
    let mut f1s = Vec::with_capacity(b);
    let mut wf1s = Vec::with_capacity(b);
    let mut kappas = Vec::with_capacity(b);
    let mut aucs = Vec::with_capacity(if probs.is_some() { b } else { 0 });
    for index in stratified_resampler(y_true, k, b, opts.seed) {
        let counts = Counts::from_indices(k, y_true, y_pred, Some(&index));
        let (_, m) = counts.metrics();
        accs.push(m.accuracy);
        f1s.push(m.macro_f1);
        wf1s.push(m.weighted_f1);
        if let Some(v) = cohen_kappa(&counts.matrix, &counts.no_answer) {
            kappas.push(v);
        }
        if let Some(p) = probs {
            if let Ok(v) = roc_auc_ovr_macro(y_true, p, k, &index) {
                aucs.push(v);
            }
        }
    }
    let level = opts.confidence_level;
    let cohen_kappa = percentile_interval(&kappas, b, level);
    // An undefined kappa on the whole set is noted already; its resamples need no second note.
    if kappas.len() < b && (kappa_defined || !kappas.is_empty()) {
        notes.push(format!(
            "Cohen's kappa is undefined on {} of {b} bootstrap resamples{}",
            b - kappas.len(),
            if cohen_kappa.is_some() { ", which its interval skips" } else { ", too many for an interval" }
        ));
    }
    let roc_auc_macro = probs.and_then(|_| percentile_interval(&aucs, b, level));
    BootstrapCis {
        accuracy: percentile_interval(&accs, b, level),
        macro_f1: percentile_interval(&f1s, b, level),
        weighted_f1: percentile_interval(&wf1s, b, level),
        cohen_kappa,
        roc_auc_macro,
    }
}

/// Per-label counts of predictions, for summaries that want them by name.
pub fn label_counts(labels: &LabelSet, y: &[usize]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for &v in y {
        let key = if v == NO_ANSWER { "(no answer)".to_string() } else { labels.name(v).to_string() };
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> LabelSet {
        LabelSet::new(names.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    fn no_boot() -> EvalOptions {
        EvalOptions {
            bootstrap_resamples: 0,
            ..Default::default()
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn macro_f1_alone_matches_the_report_and_skips_absent_classes() {
        let (t, p) = ([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]);
        let r = evaluate(&labels(&["a", "b", "c", "d"]), &t, &p, None, &no_boot()).unwrap();
        assert_eq!(macro_f1(&t, &p, 4), r.macro_f1);
        close(macro_f1(&t, &p, 4), (0.8 + 0.5 + 2.0 / 3.0) / 3.0);
        // Class 2 only in the truth counts (F1 0); class 3 occurs nowhere and is skipped.
        close(macro_f1(&[0, 0, 1, 2], &[0, 1, 1, 1], 4), (2.0 / 3.0 + 0.5 + 0.0) / 3.0);
        assert_eq!(macro_f1(&[], &[], 3), 0.0);
    }

    /// Hand-checked 3-class example:
    /// true  = a a a b b c
    /// pred  = a a b b c c
    /// confusion [[2,1,0],[0,1,1],[0,0,1]]
    #[test]
    fn three_class_fixed_values() {
        let l = labels(&["a", "b", "c"]);
        let r = evaluate(&l, &[0, 0, 0, 1, 1, 2], &[0, 0, 1, 1, 2, 2], None, &no_boot()).unwrap();
        assert_eq!(r.confusion.matrix, vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
        close(r.accuracy, 4.0 / 6.0);
        let a = r.per_class.get("a").unwrap();
        close(a.precision, 1.0);
        close(a.recall, 2.0 / 3.0);
        close(a.f1, 0.8);
        let b = r.per_class.get("b").unwrap();
        close(b.precision, 0.5);
        close(b.recall, 0.5);
        close(b.f1, 0.5);
        let c = r.per_class.get("c").unwrap();
        close(c.precision, 0.5);
        close(c.recall, 1.0);
        close(c.f1, 2.0 / 3.0);
        close(r.macro_f1, (0.8 + 0.5 + 2.0 / 3.0) / 3.0);
        close(r.weighted_f1, (0.8 * 3.0 + 0.5 * 2.0 + 2.0 / 3.0) / 6.0);
        close(r.balanced_accuracy, (2.0 / 3.0 + 0.5 + 1.0) / 3.0);
        // rows 3,2,1; cols 2,2,2; pe = (6+4+2)/36 = 1/3; po = 2/3; kappa = (2/3-1/3)/(2/3) = 0.5
        close(r.cohen_kappa.unwrap(), 0.5);
        assert_eq!(r.roc_auc_macro, None);
        assert_eq!(r.ece, None);
    }

    #[test]
    fn zero_division_gives_zero_and_absent_classes_skip_the_macro_mean() {
        // class c: never true, never predicted -> listed with zeros, excluded from macro.
        // class b: true once, never predicted -> precision 0 (0/0), recall 0.
        let l = labels(&["a", "b", "c"]);
        let r = evaluate(&l, &[0, 0, 1], &[0, 0, 0], None, &no_boot()).unwrap();
        let b = r.per_class.get("b").unwrap();
        assert_eq!((b.precision, b.recall, b.f1, b.support), (0.0, 0.0, 0.0, 1));
        let c = r.per_class.get("c").unwrap();
        assert_eq!((c.precision, c.recall, c.f1, c.support), (0.0, 0.0, 0.0, 0));
        // a: P = 2/3, R = 1, F1 = 0.8; macro over {a, b} = 0.4
        close(r.macro_f1, 0.4);
        close(r.macro_precision, 1.0 / 3.0);
        close(r.balanced_accuracy, 0.5);
        // rows a:2 b:1, cols a:3 -> pe = 6/9, po = 2/3 -> kappa 0
        close(r.cohen_kappa.unwrap(), 0.0);
    }

    #[test]
    fn no_answer_is_wrong_and_has_its_own_column() {
        let l = labels(&["a", "b"]);
        let r = evaluate(&l, &[0, 0, 1, 1], &[0, NO_ANSWER, 1, NO_ANSWER], None, &no_boot()).unwrap();
        assert_eq!(r.no_answer, 2);
        assert_eq!(r.confusion.no_answer, vec![1, 1]);
        assert_eq!(r.confusion.matrix, vec![vec![1, 0], vec![0, 1]]);
        assert_eq!(r.confusion.total(), 4);
        close(r.accuracy, 0.5);
        let a = r.per_class.get("a").unwrap();
        assert_eq!((a.precision, a.recall), (1.0, 0.5));
        // rows 2,2; cols a:1 b:1 none:2; observed off-diagonal = 2;
        // expected off-diagonal = (2*1 + 2*2 + 2*1 + 2*2)/4 = 3 -> kappa = 1 - 2/3
        close(r.cohen_kappa.unwrap(), 1.0 / 3.0);
    }

    #[test]
    fn kappa_undefined_when_everything_is_one_class() {
        let l = labels(&["a", "b"]);
        let r = evaluate(&l, &[0, 0], &[0, 0], None, &no_boot()).unwrap();
        assert_eq!(r.cohen_kappa, None);
        assert!(r.notes.iter().any(|n| n.contains("kappa")));
        close(r.macro_f1, 1.0);
    }

    #[test]
    fn auc_with_ties_counts_half() {
        // positives score 0.8, 0.4; negatives 0.4, 0.1 -> pairs: (0.8>0.4)=1,(0.8>0.1)=1,
        // (0.4=0.4)=0.5,(0.4>0.1)=1 -> 3.5/4
        let a = binary_auc(&[true, true, false, false], &[0.8, 0.4, 0.4, 0.1]).unwrap();
        close(a, 0.875);
        assert_eq!(binary_auc(&[true, true], &[0.1, 0.2]), None);
    }

    #[test]
    fn ovr_macro_auc_three_classes() {
        let l = labels(&["a", "b", "c"]);
        let probs = vec![
            vec![0.7, 0.2, 0.1],
            vec![0.3, 0.4, 0.3],
            vec![0.2, 0.5, 0.3],
            vec![0.1, 0.3, 0.6],
        ];
        let r = evaluate(&l, &[0, 1, 1, 2], &[0, 1, 1, 2], Some(&probs), &no_boot()).unwrap();
        // a: pos {0.7} vs {0.3,0.2,0.1} = 1; b: pos {0.4,0.5} vs {0.2,0.3} = 1;
        // c: pos {0.6} vs {0.1,0.3,0.3} = 1
        close(r.roc_auc_macro.unwrap(), 1.0);
        let r2 = evaluate(&l, &[0, 1, 2, 2], &[0, 1, 1, 2], Some(&probs), &no_boot()).unwrap();
        // a: 1; b: pos {0.4} vs {0.2,0.5,0.3} -> 2/3; c: pos {0.3,0.6} vs {0.1,0.3}: 0.3 vs
        // (0.1 win, 0.3 tie) = 1.5, 0.6 vs both = 2 -> 3.5/4
        close(r2.roc_auc_macro.unwrap(), (1.0 + 2.0 / 3.0 + 0.875) / 3.0);
        let r3 = evaluate(&l, &[0, 1, 1, 1], &[0, 1, 1, 2], Some(&probs), &no_boot()).unwrap();
        assert_eq!(r3.roc_auc_macro, None);
        assert!(r3.notes.iter().any(|n| n.contains("`c`")), "{:?}", r3.notes);
    }

    #[test]
    fn binary_auc_uses_second_class_score() {
        let l = labels(&["neg", "pos"]);
        let probs = vec![vec![0.9, 0.1], vec![0.4, 0.6], vec![0.3, 0.7], vec![0.2, 0.8]];
        let r = evaluate(&l, &[0, 1, 0, 1], &[0, 1, 1, 1], Some(&probs), &no_boot()).unwrap();
        // pos {0.6,0.8} vs neg {0.1,0.7}: 0.6>0.1, 0.6<0.7, 0.8>both -> 3/4
        close(r.roc_auc_macro.unwrap(), 0.75);
    }

    #[test]
    fn ece_hand_computed() {
        // 15 bins. conf 0.95 (right), 0.95 (wrong) -> bin 14: acc 0.5, conf 0.95 -> gap 0.45
        // conf 0.5 (right) -> bin 7 ((7/15, 8/15]): gap 0.5
        // conf 0.0 (wrong) -> bin 0: gap 0
        // ECE = 2/4 * 0.45 + 1/4 * 0.5 + 0 = 0.35
        let e = expected_calibration_error(&[0.95, 0.95, 0.5, 0.0], &[true, false, true, false], 15);
        close(e, 0.35);
        let bins = reliability_bins(&[0.95, 0.95, 0.5, 0.0], &[true, false, true, false], 15);
        assert_eq!(bins[14].count, 2);
        assert_eq!(bins[7].count, 1);
        assert_eq!(bins[0].count, 1);
        // A boundary value belongs to the bin it closes: 1/15 -> bin 0, 1.0 -> bin 14.
        assert_eq!(ece_bin(1.0 / 15.0, 15), 0);
        assert_eq!(ece_bin(1.0, 15), 14);
        // Perfect calibration at confidence 1.
        close(expected_calibration_error(&[1.0, 1.0], &[true, true], 15), 0.0);
    }

    #[test]
    fn ece_from_probabilities_uses_the_max_probability() {
        let l = labels(&["a", "b"]);
        let probs = vec![vec![0.8, 0.2], vec![0.3, 0.7]];
        // confidences 0.8 (pred a, true a: right), 0.7 (pred a, true b: wrong)
        // 0.8 in bin 11 ((11/15, 12/15]); 0.7 in bin 10 ((10/15, 11/15]).
        // ECE = 1/2 * |1 - 0.8| + 1/2 * |0 - 0.7| = 0.45
        let r = evaluate(&l, &[0, 1], &[0, 0], Some(&probs), &no_boot()).unwrap();
        close(r.ece.unwrap(), 0.45);
        assert_eq!(r.reliability.len(), 15);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_sensibly() {
        let l = labels(&["a", "b"]);
        let opts = EvalOptions::default();
        // All right: every resample has accuracy 1 and macro F1 1.
        let r = evaluate(&l, &[0, 1, 0, 1], &[0, 1, 0, 1], None, &opts).unwrap();
        assert_eq!(r.accuracy_ci, Some(ConfidenceInterval { lower: 1.0, upper: 1.0 }));
        assert_eq!(r.macro_f1_ci, Some(ConfidenceInterval { lower: 1.0, upper: 1.0 }));
        // One case per class: a stratified resample can only redraw the same two cases, so
        // the interval collapses onto the point estimate.
        let r = evaluate(&l, &[0, 1], &[0, 0], None, &opts).unwrap();
        assert_eq!(r.accuracy_ci, Some(ConfidenceInterval { lower: 0.5, upper: 0.5 }));
        // Class a: one right and one wrong case, drawn twice -> 0, 1 or 2 right with
        // probabilities 1/4, 1/2, 1/4; class b: always 2 right. Accuracy is 0.5, 0.75 or 1, so
        // the 2.5 % and 97.5 % percentiles of 1000 resamples are 0.5 and 1.
        let r = evaluate(&l, &[0, 0, 1, 1], &[0, 1, 1, 1], None, &opts).unwrap();
        assert_eq!(r.accuracy_ci, Some(ConfidenceInterval { lower: 0.5, upper: 1.0 }));
        assert_eq!(r.bootstrap.unwrap().method, BootstrapMethod::StratifiedPercentile);
        // Same seed, same interval; another seed, (almost surely) another one on a larger case.
        let t: Vec<usize> = (0..60).map(|i| i % 2).collect();
        let p: Vec<usize> = (0..60).map(|i| if i % 5 == 0 { 1 - i % 2 } else { i % 2 }).collect();
        let a = evaluate(&l, &t, &p, None, &opts).unwrap();
        let b = evaluate(&l, &t, &p, None, &opts).unwrap();
        assert_eq!(a.accuracy_ci, b.accuracy_ci);
        let c = evaluate(&l, &t, &p, None, &EvalOptions { seed: 7, ..opts.clone() }).unwrap();
        assert_ne!(a.macro_f1_ci, c.macro_f1_ci);
        let ci = a.accuracy_ci.unwrap();
        assert!(ci.lower < a.accuracy && a.accuracy < ci.upper, "{ci:?} {}", a.accuracy);
        assert_eq!(a.bootstrap.unwrap().resamples, 1000);
    }

    #[test]
    fn stratified_resamples_keep_class_counts_and_are_seeded() {
        let t = [2, 0, 0, 1, 0, 2, 0];
        let rs = stratified_resamples(&t, 4, 50, 9);
        assert_eq!(rs.len(), 50);
        for r in &rs {
            assert_eq!(r.len(), t.len());
            // Class by class in ascending order: four draws from class 0, one from 1, two from 2.
            let classes: Vec<usize> = r.iter().map(|&i| t[i]).collect();
            assert_eq!(classes, vec![0, 0, 0, 0, 1, 2, 2]);
            assert_eq!(r[4], 3, "the only case of class 1 is always drawn");
        }
        assert_eq!(rs, stratified_resamples(&t, 4, 50, 9));
        assert_ne!(rs, stratified_resamples(&t, 4, 50, 10));
        // Uniform within a class: over many resamples every class-0 case turns up.
        let drawn: std::collections::BTreeSet<usize> = rs.iter().flat_map(|r| r[..4].to_vec()).collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), vec![1, 2, 4, 6]);
        let it = stratified_resampler(&t, 4, 3, 9);
        assert_eq!(it.len(), 3);
        assert_eq!(it.collect::<Vec<_>>(), rs[..3].to_vec());
        assert!(stratified_resamples(&[], 3, 2, 1).iter().all(|r| r.is_empty()));
    }

    #[test]
    fn percentile_interval_rule() {
        let v = [0.4, 0.1, 0.3, 0.2, 0.5];
        // sorted 0.1..0.5, level 0.5: a = 0.25 -> h = 1 -> 0.2; 0.75 -> h = 3 -> 0.4
        let ci = percentile_interval(&v, 5, 0.5).unwrap();
        assert!((ci.lower - 0.2).abs() < 1e-15 && (ci.upper - 0.4).abs() < 1e-15, "{ci:?}");
        // Fewer than half of the resamples defined: no interval; exactly half is enough.
        assert_eq!(percentile_interval(&v, 11, 0.5), None);
        assert!(percentile_interval(&v, 10, 0.5).is_some());
        assert_eq!(percentile_interval(&[], 0, 0.95), None);
    }

    #[test]
    fn all_intervals_and_kappa_resamples_that_are_skipped() {
        let l = labels(&["a", "b", "c"]);
        let opts = EvalOptions { bootstrap_resamples: 200, ..Default::default() };
        let t: Vec<usize> = (0..30).map(|i| i % 3).collect();
        let p: Vec<usize> = (0..30).map(|i| if i % 4 == 0 { (i + 1) % 3 } else { i % 3 }).collect();
        let probs: Vec<Vec<f64>> = (0..30)
            .map(|i| {
                let mut r = vec![0.2; 3];
                r[p[i]] = 0.6;
                r
            })
            .collect();
        let r = evaluate(&l, &t, &p, Some(&probs), &opts).unwrap();
        for (name, ci, point) in [
            ("weighted F1", r.weighted_f1_ci, r.weighted_f1),
            ("kappa", r.cohen_kappa_ci, r.cohen_kappa.unwrap()),
            ("AUC", r.roc_auc_macro_ci, r.roc_auc_macro.unwrap()),
        ] {
            let ci = ci.unwrap_or_else(|| panic!("{name}: no interval"));
            assert!(ci.lower < point && point < ci.upper, "{name}: {ci:?} {point}");
        }
        assert!(!r.notes.iter().any(|n| n.contains("resamples")), "{:?}", r.notes);
        // Without probabilities there is no AUC interval.
        assert_eq!(evaluate(&l, &t, &p, None, &opts).unwrap().roc_auc_macro_ci, None);

        // One true class, predicted right 9 times out of 10: kappa is 0 on the whole set
        // (defined), but a resample that never draws the wrong case has every case in one cell,
        // where kappa is undefined (probability 0.9^10, about 35 %).
        let t = vec![0; 10];
        let mut p = vec![0; 10];
        p[3] = 1;
        let r = evaluate(&l, &t, &p, None, &opts).unwrap();
        assert_eq!(r.cohen_kappa, Some(0.0));
        let skipped = stratified_resamples(&t, 3, 200, opts.seed).iter().filter(|ix| !ix.contains(&3)).count();
        assert!(skipped > 0 && skipped < 100, "{skipped}");
        let note = format!("Cohen's kappa is undefined on {skipped} of 200 bootstrap resamples, which its interval skips");
        assert!(r.notes.contains(&note), "{:?}", r.notes);
        // Every defined resample has kappa 0 (a single true class), so the interval is [0, 0].
        assert_eq!(r.cohen_kappa_ci, Some(ConfidenceInterval { lower: 0.0, upper: 0.0 }));
        // Undefined on the whole set, so on every resample: no interval, and one note only.
        let r = evaluate(&l, &[1, 1, 1], &[1, 1, 1], None, &opts).unwrap();
        assert_eq!((r.cohen_kappa, r.cohen_kappa_ci), (None, None));
        assert_eq!(r.notes.iter().filter(|n| n.contains("kappa")).count(), 1, "{:?}", r.notes);
    }

    #[test]
    fn aurc_hand_values_and_ties() {
        // conf 0.9 R, 0.8 W, 0.7 R: risks 0/1, 1/2, 1/3 -> (0 + 0.5 + 1/3) / 3
        close(aurc(&[0.8, 0.9, 0.7], &[false, true, true]).unwrap(), (0.5 + 1.0 / 3.0) / 3.0);
        // Ties: 0.9 R, then {0.5 R, 0.5 W}: the run's one error is spread as 1/2 per case:
        // risks 0, (0.5)/2, (1)/3 -> (0 + 0.25 + 1/3) / 3, whatever the input order.
        let want = (0.25 + 1.0 / 3.0) / 3.0;
        close(aurc(&[0.5, 0.9, 0.5], &[true, true, false]).unwrap(), want);
        close(aurc(&[0.5, 0.9, 0.5], &[false, true, true]).unwrap(), want);
        // All wrong: risk 1 everywhere; all right: 0.
        close(aurc(&[0.3, 0.3, 0.9], &[false; 3]).unwrap(), 1.0);
        close(aurc(&[0.3, 0.2], &[true; 2]).unwrap(), 0.0);
        assert_eq!(aurc(&[], &[]), None);
    }

    #[test]
    fn brier_hand_values() {
        // (0.7,0.2,0.1) true 0: 0.09 + 0.04 + 0.01 = 0.14; (0.5,0.5,0) true 2: 0.25+0.25+1 = 1.5
        let rows: Vec<&[f64]> = vec![&[0.7, 0.2, 0.1], &[0.5, 0.5, 0.0]];
        close(brier_multiclass(&rows, &[0, 2]), (0.14 + 1.5) / 2.0);
        // confidence 0.9 right: 0.01; 0.6 wrong: 0.36
        close(brier_confidence(&[0.9, 0.6], &[true, false]), 0.185);
    }

    #[test]
    fn calibration_leaves_out_cases_without_an_answer() {
        let l = labels(&["a", "b"]);
        let o = no_boot();
        // Case 2 has no answer; its confidence (NaN) is ignored, not an error.
        let conf = [0.9, 0.6, f64::NAN];
        let r = evaluate_with(&l, &[0, 1, 1], &[0, 0, NO_ANSWER], None, Some(&conf), &o).unwrap();
        assert_eq!(r.calibration_cases, Some(2));
        // bins: 0.9 right (gap 0.1), 0.6 wrong (gap 0.6), over the 2 answered cases
        close(r.ece.unwrap(), (0.1 + 0.6) / 2.0);
        close(r.brier.unwrap(), 0.185);
        assert_eq!(r.brier_kind.as_deref(), Some("confidence"));
        close(r.aurc.unwrap(), (0.0 + 0.5) / 2.0);
        assert!(r.notes.iter().any(|n| n.contains("2 answered cases") && n.contains("1 without an answer")), "{:?}", r.notes);
        // A confidence out of range on an answered case is still an error.
        assert!(evaluate_with(&l, &[0, 1, 1], &[0, 0, NO_ANSWER], None, Some(&[f64::NAN, 0.5, 0.5]), &o).is_err());
        // With probabilities the Brier score is the multi-class one, over the answered cases.
        let probs = vec![vec![0.8, 0.2], vec![0.4, 0.6], vec![0.5, 0.5]];
        let r = evaluate(&l, &[0, 1, 1], &[0, 0, NO_ANSWER], Some(&probs), &o).unwrap();
        assert_eq!(r.brier_kind.as_deref(), Some("multiclass"));
        close(r.brier.unwrap(), (0.04 + 0.04 + 0.16 + 0.16) / 2.0);
        // Nothing answered: no calibration at all, with a note.
        let r = evaluate_with(&l, &[0, 1], &[NO_ANSWER, NO_ANSWER], None, Some(&[0.5, 0.5]), &o).unwrap();
        assert!(r.ece.is_none() && r.aurc.is_none() && r.brier.is_none() && r.calibration_cases.is_none());
        assert!(r.notes.iter().any(|n| n.contains("no case got an answer")), "{:?}", r.notes);
    }

    #[test]
    fn reports_written_before_the_new_fields_still_read() {
        let l = labels(&["a", "b"]);
        let r = evaluate(&l, &[0, 1, 1, 0], &[0, 1, 0, 0], Some(&[vec![0.9, 0.1], vec![0.2, 0.8], vec![0.6, 0.4], vec![0.7, 0.3]]), &EvalOptions { bootstrap_resamples: 20, ..Default::default() }).unwrap();
        let mut v = serde_json::to_value(&r).unwrap();
        let o = v.as_object_mut().unwrap();
        for key in ["aurc", "brier", "brier_kind", "calibration_cases", "weighted_f1_ci", "cohen_kappa_ci", "roc_auc_macro_ci"] {
            assert!(o.remove(key).is_some(), "{key}");
        }
        o["bootstrap"].as_object_mut().unwrap().remove("method");
        let back: EvalReport = serde_json::from_value(v).unwrap();
        assert_eq!((back.aurc, back.brier, back.weighted_f1_ci), (None, None, None));
        // An old file's intervals were not stratified; it must not claim they were.
        assert_eq!(back.bootstrap.unwrap().method, BootstrapMethod::Percentile);
        assert_eq!(back.accuracy_ci, r.accuracy_ci);
        assert!(serde_json::to_string(&r).unwrap().contains(r#""method":"stratified-percentile""#));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let l = labels(&["a", "b"]);
        let o = no_boot();
        assert!(matches!(evaluate(&l, &[], &[], None, &o), Err(EvalError::Empty)));
        assert!(evaluate(&l, &[0], &[0, 1], None, &o).unwrap_err().to_string().contains("1 true labels but 2"));
        assert!(evaluate(&l, &[2], &[0], None, &o).is_err());
        assert!(evaluate(&l, &[0], &[5], None, &o).is_err());
        assert!(evaluate(&l, &[0], &[0], Some(&[vec![0.5]]), &o).is_err());
        assert!(evaluate(&l, &[0], &[0], Some(&[vec![1.5, 0.0]]), &o).is_err());
        assert!(evaluate(&l, &[0], &[0], Some(&[vec![f64::NAN, 0.0]]), &o).is_err());
    }

    #[test]
    fn report_round_trips_through_json_keeping_label_order() {
        let l = labels(&["zeta", "alpha"]);
        let r = evaluate(&l, &[0, 1, 1], &[0, 1, NO_ANSWER], Some(&[vec![0.9, 0.1], vec![0.2, 0.8], vec![0.5, 0.5]]), &EvalOptions::default()).unwrap();
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.find("\"zeta\":").unwrap() < s.find("\"alpha\":").unwrap());
        let back: EvalReport = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
    }
}
