//! The numbers of a report, computed once from a [`RunDir`] and rendered by every format.
//!
//! Every figure here is read from the classifier's `metrics.json` (never recomputed), so the
//! report and the file a reviewer opens agree to the last digit. Only what `metrics.json` does
//! not hold is derived from `predictions.jsonl`: the paired McNemar tests (which need both
//! classifiers' answers per image) and the latency distributions.

use std::collections::HashMap;

use mica_core::{Outcome, Prediction};
use mica_eval::{mcnemar, ConfidenceInterval, RunMetrics, NO_ANSWER};
use serde::Serialize;

use crate::rundir::{ClassifierRun, RunDir};

/// Significance level used to call a McNemar difference significant.
pub const ALPHA: f64 = 0.05;

/// How a classifier family is named in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Cnn,
    Llm,
    Other,
}

/// One row of the headline table.
#[derive(Debug, Clone, Serialize)]
pub struct HeadlineRow {
    pub slug: String,
    pub classifier: String,
    pub family: Family,
    pub images: usize,
    pub accuracy: f64,
    pub accuracy_ci: Option<ConfidenceInterval>,
    pub macro_f1: f64,
    pub macro_f1_ci: Option<ConfidenceInterval>,
    pub weighted_f1: f64,
    /// Share of images the filter accepted; `None` when nothing was deferred (no filter, or a
    /// filter that kept everything: coverage is then simply 1).
    pub coverage: Option<f64>,
    /// Accuracy on the accepted cases, shown next to coverage for filtered classifiers.
    pub accepted_accuracy: Option<f64>,
    /// (unparseable + refused + failed) / images: every image without a label.
    pub no_answer_share: f64,
    /// refused / images: the part of `no_answer_share` where the model declined to answer.
    pub refused_share: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub images_per_s: Option<f64>,
    pub wh_per_1000: Option<f64>,
    pub gco2e_per_1000: Option<f64>,
    pub energy_method: Option<String>,
    /// API money per 1,000 images; `None` when the classifier reports no cost (local models).
    pub usd_per_1000: Option<f64>,
    pub ece: Option<f64>,
    pub simulated: bool,
    /// The classifier was given metadata that names or implies the class, by explicit request.
    #[serde(default)]
    pub label_like_context: bool,
}

impl HeadlineRow {
    pub fn from_metrics(run: &ClassifierRun) -> HeadlineRow {
        let m = &run.metrics;
        let deferred = m.outcomes.deferred > 0;
        HeadlineRow {
            slug: run.slug.clone(),
            classifier: m.classifier.clone(),
            family: family(m, &run.predictions),
            images: m.images,
            accuracy: m.all.accuracy,
            accuracy_ci: m.all.accuracy_ci,
            macro_f1: m.all.macro_f1,
            macro_f1_ci: m.all.macro_f1_ci,
            weighted_f1: m.all.weighted_f1,
            coverage: deferred.then_some(m.coverage),
            accepted_accuracy: if deferred {
                m.accepted.as_ref().map(|a| a.accuracy)
            } else {
                None
            },
            no_answer_share: m.outcomes.no_answer() as f64 / m.images.max(1) as f64,
            refused_share: m.outcomes.refused as f64 / m.images.max(1) as f64,
            latency_p50_ms: m.latency_ms.as_ref().map(|l| l.p50),
            latency_p90_ms: m.latency_ms.as_ref().map(|l| l.p90),
            latency_p99_ms: m.latency_ms.as_ref().map(|l| l.p99),
            images_per_s: m.throughput_images_per_s,
            wh_per_1000: run
                .energy
                .as_ref()
                .and_then(|e| e.per_1000_images.map(|p| p.energy_wh)),
            gco2e_per_1000: run
                .energy
                .as_ref()
                .and_then(|e| e.per_1000_images.map(|p| p.co2e_g)),
            energy_method: run.energy.as_ref().map(|e| e.method.clone()),
            usd_per_1000: m.cost.map(|c| c.per_image_usd * 1000.0),
            ece: m.all.ece,
            simulated: m.simulated,
            label_like_context: m.extra.contains_key("label_like_context"),
        }
    }
}

fn family(m: &RunMetrics, preds: &[Prediction]) -> Family {
    let name = m.classifier.to_ascii_lowercase();
    if name.starts_with("cnn") {
        Family::Cnn
    } else if name.starts_with("llm") || m.tokens.is_some() || preds.iter().any(|p| p.raw_answer.is_some()) {
        Family::Llm
    } else {
        Family::Other
    }
}

/// One pairwise McNemar test on the images both classifiers saw.
#[derive(Debug, Clone, Serialize)]
pub struct PairTest {
    pub a: String,
    pub b: String,
    pub n: usize,
    /// Images A got right and B wrong.
    pub a_only: u64,
    /// Images B got right and A wrong.
    pub b_only: u64,
    /// Accuracy of A minus accuracy of B on the shared images, in points.
    pub difference_points: f64,
    pub p_value: f64,
    pub exact: bool,
    pub significant: bool,
}

/// Per-class precision/recall/F1 of one classifier (from `metrics.json`'s `all` view).
#[derive(Debug, Clone, Serialize)]
pub struct ClassTable {
    pub slug: String,
    pub classifier: String,
    pub rows: Vec<ClassRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassRow {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

/// Everything the report says, in one serialisable value (`--format json`).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub run: String,
    pub simulated: bool,
    pub headline: Vec<HeadlineRow>,
    pub per_class: Vec<ClassTable>,
    pub mcnemar: Vec<PairTest>,
    pub summary: Vec<String>,
    pub provenance: Provenance,
    /// Unfinished classifiers left out of this report.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub dataset: Option<String>,
    pub split: Vec<String>,
    pub split_manifest: Option<String>,
    pub split_hash: Option<String>,
    pub seed: Option<u64>,
    pub mica_version: Option<String>,
    pub command: Option<String>,
    pub created_unix: Option<u64>,
    pub machine: Vec<(String, String)>,
    /// One line per classifier: energy method, carbon intensity and its source, PUE.
    pub energy: Vec<String>,
    /// Energy warnings (estimates, world-average fallback, remote energy not measured).
    pub energy_warnings: Vec<String>,
    pub simulated_classifiers: Vec<String>,
}

impl Comparison {
    pub fn build(run: &RunDir) -> Comparison {
        let headline: Vec<HeadlineRow> = run.classifiers.iter().map(HeadlineRow::from_metrics).collect();
        let per_class = run
            .classifiers
            .iter()
            .map(|c| ClassTable {
                slug: c.slug.clone(),
                classifier: c.metrics.classifier.clone(),
                rows: c
                    .metrics
                    .all
                    .per_class
                    .iter()
                    .map(|(label, m)| ClassRow {
                        label: label.to_string(),
                        precision: m.precision,
                        recall: m.recall,
                        f1: m.f1,
                        support: m.support,
                    })
                    .collect(),
            })
            .collect();
        let mcnemar = pair_tests(run);
        let provenance = provenance(run);
        let summary = summary(&headline, &mcnemar, run);
        Comparison {
            run: run.name(),
            simulated: run.simulated(),
            headline,
            per_class,
            mcnemar,
            summary,
            provenance,
            skipped: run.skipped.clone(),
        }
    }
}

/// Class index of the label a prediction carries (deferred cases keep theirs, as in the
/// `all` view of `metrics.json`), or [`NO_ANSWER`].
fn pred_index(labels: &[String], p: &Prediction) -> usize {
    match p.outcome {
        Outcome::Answered | Outcome::Deferred => p
            .predicted
            .as_deref()
            .and_then(|l| labels.iter().position(|x| x == l))
            .unwrap_or(NO_ANSWER),
        Outcome::Unparseable | Outcome::Refused | Outcome::Failed => NO_ANSWER,
    }
}

fn pair_tests(run: &RunDir) -> Vec<PairTest> {
    let mut out = Vec::new();
    let cs = &run.classifiers;
    for i in 0..cs.len() {
        for j in (i + 1)..cs.len() {
            if let Some(t) = pair_test(&cs[i], &cs[j]) {
                out.push(t);
            }
        }
    }
    out
}

fn pair_test(a: &ClassifierRun, b: &ClassifierRun) -> Option<PairTest> {
    let labels = &a.metrics.labels;
    if *labels != b.metrics.labels {
        return None;
    }
    let b_by_id: HashMap<&str, &Prediction> =
        b.predictions.iter().map(|p| (p.sample_id.as_str(), p)).collect();
    let (mut y, mut pa, mut pb) = (Vec::new(), Vec::new(), Vec::new());
    for p in &a.predictions {
        let Some(q) = b_by_id.get(p.sample_id.as_str()) else { continue };
        let Some(t) = p.true_label.as_deref().and_then(|l| labels.iter().position(|x| x == l)) else {
            continue;
        };
        y.push(t);
        pa.push(pred_index(labels, p));
        pb.push(pred_index(labels, q));
    }
    if y.is_empty() {
        return None;
    }
    let m = mcnemar(&y, &pa, &pb).ok()?;
    let acc = |p: &[usize]| p.iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64;
    Some(PairTest {
        a: a.metrics.classifier.clone(),
        b: b.metrics.classifier.clone(),
        n: m.n,
        a_only: m.b,
        b_only: m.c,
        difference_points: (acc(&pa) - acc(&pb)) * 100.0,
        p_value: m.p_value,
        exact: m.exact,
        significant: m.p_value < ALPHA,
    })
}

fn provenance(run: &RunDir) -> Provenance {
    let m = run.manifest.as_ref();
    let first = &run.classifiers[0].metrics;
    let cfg = m.map(|m| &m.config);
    let get_str = |k: &str| cfg.and_then(|c| c.get(k)).and_then(|v| v.as_str()).map(String::from);
    let mut energy = Vec::new();
    let mut warnings = Vec::new();
    for c in &run.classifiers {
        match &c.energy {
            Some(e) => {
                let cpu = e
                    .cpu
                    .as_ref()
                    .map(|cpu| format!("; CPU {} (TDP {:.0} W, {})", cpu.model, cpu.tdp_w, cpu.tdp_source_detail))
                    .unwrap_or_default();
                let gpu = e
                    .gpu
                    .as_ref()
                    .map(|g| format!("; GPU {} x{}", g.model, g.count))
                    .unwrap_or_default();
                energy.push(format!(
                    "{}: {} over {:.1} s; carbon intensity {:.0} gCO2e/kWh ({}); PUE {:.2}{cpu}{gpu}",
                    c.metrics.classifier,
                    e.method,
                    e.duration_s,
                    e.carbon.intensity_g_per_kwh,
                    e.carbon.source_detail,
                    e.carbon.pue
                ));
                for w in &e.warnings {
                    let line = format!("{}: {w}", c.metrics.classifier);
                    if !warnings.contains(&line) {
                        warnings.push(line);
                    }
                }
            }
            None => energy.push(format!("{}: no energy measurement recorded", c.metrics.classifier)),
        }
    }
    Provenance {
        dataset: m
            .map(|m| m.dataset.display().to_string())
            .or_else(|| Some(first.dataset.clone())),
        split: run
            .classifiers
            .iter()
            .map(|c| c.metrics.split.clone())
            .fold(Vec::new(), |mut v, s| {
                if !v.contains(&s) {
                    v.push(s)
                }
                v
            }),
        split_manifest: m.and_then(|m| m.split_manifest.as_ref()).map(|p| p.display().to_string()),
        split_hash: get_str("split_sha256"),
        seed: m.and_then(|m| m.seed),
        mica_version: m.map(|m| m.mica_version.clone()),
        command: m.map(|m| m.command.clone()),
        created_unix: m.map(|m| m.created_unix),
        machine: m
            .map(|m| m.machine.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        energy,
        energy_warnings: warnings,
        simulated_classifiers: run
            .classifiers
            .iter()
            .filter(|c| c.metrics.simulated)
            .map(|c| c.metrics.classifier.clone())
            .collect(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

fn ratio_words(a: f64, b: f64) -> Option<String> {
    if !(a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite()) {
        return None;
    }
    let r = b / a;
    Some(if r >= 1.05 {
        format!("uses {} less energy per image", times(r))
    } else if r <= 1.0 / 1.05 {
        format!("uses {} more energy per image", times(1.0 / r))
    } else {
        "uses about the same energy per image".to_string()
    })
}

fn times(r: f64) -> String {
    if r >= 100.0 {
        format!("{:.0} times", r)
    } else if r >= 10.0 {
        format!("{:.0} times", r)
    } else {
        format!("{:.1} times", r)
    }
}

/// The plain-language summary: every sentence is built from the table's numbers.
fn summary(rows: &[HeadlineRow], tests: &[PairTest], run: &RunDir) -> Vec<String> {
    let mut out = Vec::new();
    if rows.is_empty() {
        return out;
    }
    let n = rows.iter().map(|r| r.images).max().unwrap_or(0);
    // The first of equally accurate classifiers (experiment order), not the last.
    let best = rows
        .iter()
        .fold(None::<&HeadlineRow>, |b, r| match b {
            Some(b) if b.accuracy >= r.accuracy => Some(b),
            _ => Some(r),
        })
        .expect("non-empty");
    let ci = best
        .accuracy_ci
        .map(|c| format!(" (95 % CI {:.1}–{:.1} %)", c.lower * 100.0, c.upper * 100.0))
        .unwrap_or_default();
    out.push(format!(
        "On this data ({n} test images), the most accurate classifier is {} with {} accuracy{ci} and macro F1 {:.3}.",
        best.classifier,
        pct(best.accuracy),
        best.macro_f1
    ));
    let cnn = rows
        .iter()
        .filter(|r| r.family == Family::Cnn)
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
    if let Some(cnn) = cnn {
        for llm in rows.iter().filter(|r| r.family == Family::Llm) {
            let diff = (cnn.accuracy - llm.accuracy) * 100.0;
            let direction = if diff >= 0.0 { "more" } else { "less" };
            let sig = tests
                .iter()
                .find(|t| {
                    (t.a == cnn.classifier && t.b == llm.classifier)
                        || (t.b == cnn.classifier && t.a == llm.classifier)
                })
                .map(|t| {
                    if t.significant {
                        format!(" (a significant difference, McNemar p = {:.3})", t.p_value)
                    } else {
                        format!(" (not a significant difference, McNemar p = {:.3})", t.p_value)
                    }
                })
                .unwrap_or_default();
            let remote = llm.energy_method.as_deref().is_some_and(|m| m.contains("remote"));
            let energy = match (cnn.wh_per_1000, llm.wh_per_1000) {
                // The provider's servers did the work: local watts say nothing about it.
                _ if remote => format!("; {}'s energy at the provider is not measured, so no energy ratio is given", llm.classifier),
                (Some(a), Some(b)) => ratio_words(a, b)
                    .map(|w| format!(" and {w} on this machine"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            out.push(format!(
                "The CNN {} is {:.1} points {direction} accurate than {}{sig}{energy}.",
                cnn.classifier,
                diff.abs(),
                llm.classifier
            ));
        }
    }
    for r in rows {
        if let (Some(cov), Some(acc)) = (r.coverage, r.accepted_accuracy) {
            let change = if acc >= r.accuracy { "raises" } else { "changes" };
            out.push(format!(
                "The filter {change} {} to {} accuracy on the {} of cases it accepts (from {} on all cases), and sends the remaining {} to a physician.",
                r.classifier,
                pct(acc),
                pct(cov),
                pct(r.accuracy),
                pct(1.0 - cov)
            ));
        }
        if r.no_answer_share > 0.0 {
            let refused = if r.refused_share > 0.0 {
                format!(" (it declined to answer {})", pct(r.refused_share))
            } else {
                String::new()
            };
            out.push(format!(
                "{} gave no usable answer for {} of images{refused}; these count as wrong.",
                r.classifier,
                pct(r.no_answer_share)
            ));
        }
    }
    let cheapest_paid = rows.iter().filter_map(|r| r.usd_per_1000.map(|c| (r, c))).filter(|(_, c)| *c > 0.0);
    for (r, c) in cheapest_paid {
        out.push(format!("{} costs ${c:.2} per 1,000 images in API fees.", r.classifier));
    }
    if rows.iter().any(|r| r.energy_method.as_deref().is_some_and(|m| m.contains("estimated"))) {
        out.push(
            "Some energy figures are estimates (CPU time x TDP), not meter readings; the method column says which."
                .into(),
        );
    }
    if rows.iter().any(|r| r.energy_method.as_deref().is_some_and(|m| m.contains("remote"))) {
        out.push("Energy spent on a remote API's servers is not measured and not in the totals.".into());
    }
    if run.simulated() {
        out.push(
            "SIMULATED: at least one classifier answered from the LLM simulator; its numbers are not model results."
                .into(),
        );
    }
    let warnings = run.manifest.as_ref().and_then(|m| m.config.get("shortcut_warnings")).and_then(|v| v.as_array());
    for w in warnings.into_iter().flatten().filter_map(|w| w.as_str()) {
        out.push(format!("SHORTCUT: {w}."));
    }
    for c in &run.classifiers {
        if let Some(cols) = c.metrics.extra.get("label_like_context").and_then(|v| v.as_array()) {
            let cols: Vec<&str> = cols.iter().filter_map(|v| v.as_str()).collect();
            out.push(format!(
                "LABEL-LIKE CONTEXT: {} was given metadata columns that name or imply the class ({}), by explicit request (--allow-label-like-context); its figures do not measure what the image alone shows.",
                c.name(),
                cols.join(", ")
            ));
        }
    }
    out.push(
        "These are model predictions for decision support, not diagnoses: low-confidence and deferred cases go to a physician, who has the final say."
            .into(),
    );
    out
}
