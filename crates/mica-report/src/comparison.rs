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
    /// A model trained outside mica (`onnx:`), run on this machine like a CNN: no API fee,
    /// energy metered the same way, training cost unknown.
    Onnx,
    Other,
}

impl Family {
    /// Runs on this machine from its own weights (a CNN or an ONNX model): what the report
    /// sets against the LLMs.
    pub fn is_local_model(self) -> bool {
        matches!(self, Family::Cnn | Family::Onnx)
    }
}

/// One row of the headline table.
#[derive(Debug, Clone, Serialize)]
pub struct HeadlineRow {
    pub slug: String,
    pub classifier: String,
    /// The name as every table and sentence prints it: stamped `[SIMULATED]` for simulator
    /// rows, so a simulated figure can never be quoted under a model's bare name.
    pub name: String,
    pub family: Family,
    pub images: usize,
    pub accuracy: f64,
    pub accuracy_ci: Option<ConfidenceInterval>,
    pub macro_f1: f64,
    pub macro_f1_ci: Option<ConfidenceInterval>,
    pub weighted_f1: f64,
    pub weighted_f1_ci: Option<ConfidenceInterval>,
    pub kappa: Option<f64>,
    pub kappa_ci: Option<ConfidenceInterval>,
    pub auc: Option<f64>,
    pub auc_ci: Option<ConfidenceInterval>,
    /// Share of images the filter accepted; `None` when nothing was deferred (no filter, or a
    /// filter that kept everything: coverage is then simply 1).
    pub coverage: Option<f64>,
    pub coverage_ci: Option<ConfidenceInterval>,
    /// Accuracy on the accepted cases, shown next to coverage for filtered classifiers.
    pub accepted_accuracy: Option<f64>,
    pub accepted_accuracy_ci: Option<ConfidenceInterval>,
    /// (unparseable + refused + failed) / images: every image without a label.
    pub no_answer_share: f64,
    /// refused / images: the part of `no_answer_share` where the model declined to answer.
    pub refused_share: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// What one latency value is (per request, per image amortised over a batch of n, per
    /// image), printed next to every latency figure.
    pub latency_kind: Option<String>,
    /// The first image's latency: the cold start, inside every other figure too.
    pub first_latency_ms: Option<f64>,
    /// Images asked now, and images whose answer was replayed from the response cache.
    pub live: usize,
    pub cached: usize,
    /// Live images / wall second; `None` when nothing was asked live.
    pub images_per_s: Option<f64>,
    /// Wall-clock seconds of the metered windows.
    pub wall_s: Option<f64>,
    pub wh_per_1000: Option<f64>,
    pub gco2e_per_1000: Option<f64>,
    pub energy_method: Option<String>,
    /// What the energy figure covers (mica's process, a local model server, the machine).
    pub energy_scope: Option<String>,
    /// Carbon intensity the CO2 figure used, with its source.
    pub carbon_intensity: Option<String>,
    /// The energy figure may be put in a ratio with another row's: it is measured or
    /// estimated here (not at a remote API, not a server it could not see), from live
    /// answers, and not the simulator's.
    pub energy_comparable: bool,
    /// API money per 1,000 live images; `None` when there is none or it is unknown
    /// (`cost_basis` says which).
    pub usd_per_1000: Option<f64>,
    /// `api-price`, `unknown-price`, `no-api-fee` or `simulated`.
    pub cost_basis: String,
    /// What the replayed answers cost when they were first asked (not spent in this run).
    pub replayed_usd: f64,
    pub ece: Option<f64>,
    pub brier: Option<f64>,
    pub aurc: Option<f64>,
    pub simulated: bool,
    /// The classifier was given metadata that names or implies the class, by explicit request.
    #[serde(default)]
    pub label_like_context: bool,
    /// What training the CNN cost, when it was metered (`mica train` or a run's `cnn-train:`).
    pub training: Option<TrainingCost>,
}

/// The metered cost of training a CNN.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingCost {
    pub seconds: Option<f64>,
    pub energy_wh: f64,
    pub co2e_g: f64,
    pub method: String,
}

/// Energy figures are shown with enough significant digits for tiny CNN numbers.
pub fn sig(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => {
            let a = x.abs();
            if a == 0.0 {
                "0".into()
            } else if a >= 100.0 {
                format!("{x:.0}")
            } else if a >= 1.0 {
                format!("{x:.2}")
            } else if a >= 0.001 {
                format!("{x:.4}")
            } else {
                format!("{x:.2e}")
            }
        }
        _ => "–".into(),
    }
}

/// Prints a classifier's name with its stamps.
pub fn stamped(classifier: &str, simulated: bool, label_like_context: bool) -> String {
    let mut name = classifier.to_string();
    if simulated {
        name.push_str(" [SIMULATED]");
    }
    if label_like_context {
        name.push_str(" [LABEL-LIKE CONTEXT]");
    }
    name
}

impl HeadlineRow {
    pub fn from_metrics(run: &ClassifierRun) -> HeadlineRow {
        let m = &run.metrics;
        let deferred = m.outcomes.deferred > 0;
        let label_like_context = m.extra.contains_key("label_like_context");
        let family = family(m, &run.predictions);
        let cost_basis = m
            .extra
            .get("cost_basis")
            .and_then(|v| v.as_str())
            .map(String::from)
            .unwrap_or_else(|| match (m.simulated, m.cost.is_some(), family) {
                (true, _, _) => "simulated".into(),
                (false, true, _) => "api-price".into(),
                // Older runs did not record it: an LLM without a cost may be an unpriced API.
                (false, false, Family::Llm) => "unknown-price".into(),
                (false, false, _) => "no-api-fee".into(),
            });
        let energy = run.energy.as_ref();
        let not_measured = energy.is_some_and(|e| e.method.contains("not-measured:local-server"));
        let remote = energy.is_some_and(|e| e.method.contains("remote"));
        let wh_per_1000 = energy.and_then(|e| e.per_1000_images.map(|p| p.energy_wh)).filter(|_| !not_measured);
        let training = m.extra.get("training").and_then(|t| {
            Some(TrainingCost {
                seconds: t.get("energy_seconds").or_else(|| t.get("train_seconds")).and_then(|v| v.as_f64()),
                energy_wh: t.get("energy_wh")?.as_f64()?,
                co2e_g: t.get("co2e_g")?.as_f64()?,
                method: t.get("energy_method")?.as_str()?.to_string(),
            })
        });
        HeadlineRow {
            slug: run.slug.clone(),
            classifier: m.classifier.clone(),
            name: stamped(&m.classifier, m.simulated, label_like_context),
            family,
            images: m.images,
            accuracy: m.all.accuracy,
            accuracy_ci: m.all.accuracy_ci,
            macro_f1: m.all.macro_f1,
            macro_f1_ci: m.all.macro_f1_ci,
            weighted_f1: m.all.weighted_f1,
            weighted_f1_ci: m.all.weighted_f1_ci,
            kappa: m.all.cohen_kappa,
            kappa_ci: m.all.cohen_kappa_ci,
            auc: m.all.roc_auc_macro,
            auc_ci: m.all.roc_auc_macro_ci,
            coverage: deferred.then_some(m.coverage),
            coverage_ci: if deferred { m.coverage_ci } else { None },
            accepted_accuracy: if deferred {
                m.accepted.as_ref().map(|a| a.accuracy)
            } else {
                None
            },
            accepted_accuracy_ci: if deferred { m.accepted_accuracy_ci } else { None },
            no_answer_share: m.outcomes.no_answer() as f64 / m.images.max(1) as f64,
            refused_share: m.outcomes.refused as f64 / m.images.max(1) as f64,
            latency_p50_ms: m.latency_ms.as_ref().map(|l| l.p50),
            latency_p90_ms: m.latency_ms.as_ref().map(|l| l.p90),
            latency_p99_ms: m.latency_ms.as_ref().map(|l| l.p99),
            latency_kind: m.latency_kind.map(|k| k.label()),
            first_latency_ms: m.first_latency_ms,
            live: m.live,
            cached: m.cached,
            images_per_s: m.throughput_images_per_s,
            wall_s: (m.wall_seconds > 0.0).then_some(m.wall_seconds),
            wh_per_1000,
            gco2e_per_1000: energy.and_then(|e| e.per_1000_images.map(|p| p.co2e_g)).filter(|_| !not_measured),
            energy_method: energy.map(|e| e.method.clone()),
            energy_scope: energy
                .map(|e| if e.scope.is_empty() { e.tracking_mode.clone() } else { e.scope.clone() })
                .filter(|s| !s.is_empty()),
            carbon_intensity: energy.map(|e| {
                format!("{:.0} gCO2e/kWh ({})", e.carbon.intensity_g_per_kwh, e.carbon.source_detail)
            }),
            energy_comparable: !m.simulated
                && !remote
                && !not_measured
                && energy.is_some_and(|e| e.is_complete())
                && wh_per_1000.is_some_and(|w| w > 0.0),
            // No live call, no price per image: a replay's $0 is not what the model costs.
            usd_per_1000: m
                .cost
                .filter(|_| cost_basis == "api-price" && m.live > 0)
                .map(|c| c.per_image_usd * 1000.0),
            cost_basis,
            replayed_usd: m.cost.map(|c| c.replayed_usd).unwrap_or(0.0),
            ece: m.all.ece,
            brier: m.all.brier,
            aurc: m.all.aurc,
            simulated: m.simulated,
            label_like_context,
            training,
        }
    }

    /// The money column: a price, "unknown", "no API fee" or "simulated"; never a 0 that
    /// stands for "we do not know".
    pub fn cost_text(&self) -> String {
        match (self.cost_basis.as_str(), self.usd_per_1000) {
            ("api-price", Some(c)) => format!("{c:.2}"),
            ("api-price", None) => "– (no live call)".into(),
            ("unknown-price", _) => "unknown (no price)".into(),
            ("simulated", _) => "– (simulated)".into(),
            _ => "0 (no API fee)".into(),
        }
    }
}

fn family(m: &RunMetrics, preds: &[Prediction]) -> Family {
    let name = m.classifier.to_ascii_lowercase();
    // A cascade is its own kind (a CNN and an LLM together): never counted as either family
    // in the CNN-against-LLM sentences, break-even points or the pilot's arms.
    if name.starts_with("cascade") {
        return Family::Other;
    }
    if name.starts_with("cnn") {
        Family::Cnn
    } else if name.starts_with("onnx") {
        Family::Onnx
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
    /// McNemar's p-value for this pair alone.
    pub p_value: f64,
    /// Holm-adjusted across every pair of the report: what `significant` is decided on, so
    /// testing many pairs does not manufacture a difference.
    pub p_holm: f64,
    pub exact: bool,
    /// `p_holm` < [`ALPHA`].
    pub significant: bool,
}

/// Per-class precision/recall/F1 of one classifier (from `metrics.json`'s `all` view).
#[derive(Debug, Clone, Serialize)]
pub struct ClassTable {
    pub slug: String,
    pub classifier: String,
    /// Stamped name, as in the headline.
    pub name: String,
    pub rows: Vec<ClassRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassRow {
    pub label: String,
    pub precision: f64,
    /// Wilson 95 % interval of the precision (a proportion of the predictions of the class).
    pub precision_ci: Option<ConfidenceInterval>,
    pub recall: f64,
    /// Wilson 95 % interval of the recall (a proportion of the class's images).
    pub recall_ci: Option<ConfidenceInterval>,
    pub f1: f64,
    pub support: u64,
}

/// Wilson score interval at 95 % for `k` successes in `n` trials; None for `n = 0`. Chosen over
/// the normal approximation because per-class counts are small and often 0 or n.
pub fn wilson(k: u64, n: u64) -> Option<ConfidenceInterval> {
    if n == 0 {
        return None;
    }
    const Z: f64 = 1.959_963_984_540_054;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let denom = 1.0 + Z * Z / n;
    let center = (p + Z * Z / (2.0 * n)) / denom;
    let half = Z * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt() / denom;
    Some(ConfidenceInterval {
        lower: (center - half).max(0.0),
        upper: (center + half).min(1.0),
    })
}

/// Everything the report says, in one serialisable value (`--format json`).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub run: String,
    pub simulated: bool,
    /// Images every classifier of the report answered (or failed on): the set the summary's
    /// accuracy ranking is computed on.
    pub shared_images: usize,
    /// Accuracy of each classifier (headline order) on the shared images.
    pub shared_accuracy: Vec<f64>,
    pub headline: Vec<HeadlineRow>,
    /// After how many images a trained CNN's training plus inference costs less than an LLM's
    /// inference, per CNN and LLM pair.
    pub break_even: Vec<BreakEven>,
    pub per_class: Vec<ClassTable>,
    pub mcnemar: Vec<PairTest>,
    pub summary: Vec<String>,
    pub provenance: Provenance,
    /// Unfinished classifiers left out of this report.
    pub skipped: Vec<String>,
    /// The cascade sweep and the "Cost of a pilot" figures.
    pub pilot: crate::pilot::Pilot,
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
    /// `created_unix` in ISO 8601 UTC.
    pub created_utc: Option<String>,
    /// How the intervals were computed (method, resamples, seed, level).
    pub intervals: Option<String>,
    /// The rule every classifier's timing follows.
    pub timing_rule: String,
    /// The model versions that answered, per classifier (snapshot, fingerprint, digest).
    pub models: Vec<String>,
    /// The model changed mid-run, and similar warnings about what answered.
    pub model_warnings: Vec<String>,
    /// USD per kWh used to put local energy into money, when given.
    pub electricity_usd_per_kwh: Option<f64>,
    pub machine: Vec<(String, String)>,
    /// One line per classifier: energy method, carbon intensity and its source, PUE.
    pub energy: Vec<String>,
    /// Energy warnings (estimates, world-average fallback, remote energy not measured).
    pub energy_warnings: Vec<String>,
    pub simulated_classifiers: Vec<String>,
}

impl Comparison {
    pub fn build(run: &RunDir) -> Comparison {
        Self::build_with(run, crate::pilot::PilotOptions::default())
    }

    /// [`Comparison::build`] with the business-case options (`mica report --budget`).
    pub fn build_with(run: &RunDir, pilot_options: crate::pilot::PilotOptions) -> Comparison {
        let headline: Vec<HeadlineRow> = run.classifiers.iter().map(HeadlineRow::from_metrics).collect();
        let per_class = run
            .classifiers
            .iter()
            .zip(&headline)
            .map(|(c, h)| ClassTable {
                slug: c.slug.clone(),
                classifier: c.metrics.classifier.clone(),
                name: h.name.clone(),
                rows: {
                    let cm = &c.metrics.all.confusion;
                    c.metrics
                        .all
                        .per_class
                        .iter()
                        .enumerate()
                        .map(|(i, (label, m))| {
                            let tp = cm.matrix.get(i).and_then(|r| r.get(i)).copied().unwrap_or(0);
                            let predicted: u64 = cm.matrix.iter().filter_map(|r| r.get(i)).sum();
                            ClassRow {
                                label: label.to_string(),
                                precision: m.precision,
                                precision_ci: wilson(tp, predicted),
                                recall: m.recall,
                                recall_ci: wilson(tp, m.support),
                                f1: m.f1,
                                support: m.support,
                            }
                        })
                        .collect()
                },
            })
            .collect();
        let mcnemar = pair_tests(run);
        let provenance = provenance(run);
        let (shared_images, shared_accuracy) = shared_accuracy(run);
        let break_even = break_even(&headline, provenance.electricity_usd_per_kwh);
        let summary = summary(&headline, &mcnemar, run, (shared_images, &shared_accuracy), &break_even);
        let pilot = crate::pilot::build(run, &headline, provenance.electricity_usd_per_kwh, pilot_options);
        Comparison {
            pilot,
            run: run.name(),
            simulated: run.simulated(),
            shared_images,
            shared_accuracy,
            headline,
            break_even,
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
    let adjusted = mica_eval::stats::holm(&out.iter().map(|t| t.p_value).collect::<Vec<_>>());
    for (t, p) in out.iter_mut().zip(adjusted) {
        t.p_holm = p;
        t.significant = p < ALPHA;
    }
    out
}

/// Correct answers of one classifier on one image: a label equal to the truth.
fn is_correct(p: &Prediction) -> bool {
    matches!(p.outcome, Outcome::Answered | Outcome::Deferred) && p.predicted.is_some() && p.predicted == p.true_label
}

/// The images every classifier has a prediction for, and each classifier's accuracy on them:
/// a ranking of classifiers that saw different images would compare different tests.
fn shared_accuracy(run: &RunDir) -> (usize, Vec<f64>) {
    let mut shared: Option<std::collections::HashSet<&str>> = None;
    for c in &run.classifiers {
        let ids: std::collections::HashSet<&str> = c.predictions.iter().map(|p| p.sample_id.as_str()).collect();
        shared = Some(match shared {
            None => ids,
            Some(s) => s.intersection(&ids).copied().collect(),
        });
    }
    let shared = shared.unwrap_or_default();
    let acc = run
        .classifiers
        .iter()
        .map(|c| {
            let right = c
                .predictions
                .iter()
                .filter(|p| shared.contains(p.sample_id.as_str()) && is_correct(p))
                .count();
            if shared.is_empty() {
                0.0
            } else {
                right as f64 / shared.len() as f64
            }
        })
        .collect();
    (shared.len(), acc)
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
    let name = |c: &ClassifierRun| stamped(&c.metrics.classifier, c.metrics.simulated, c.metrics.extra.contains_key("label_like_context"));
    Some(PairTest {
        a: name(a),
        b: name(b),
        n: m.n,
        a_only: m.b,
        b_only: m.c,
        difference_points: (acc(&pa) - acc(&pb)) * 100.0,
        p_value: m.p_value,
        // Set over all pairs by `pair_tests`.
        p_holm: m.p_value,
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
    // One line per distinct warning, naming every classifier it applies to.
    let mut warnings: Vec<(String, Vec<String>)> = Vec::new();
    let mut models = Vec::new();
    let mut model_warnings = Vec::new();
    for c in &run.classifiers {
        let name = stamped(&c.metrics.classifier, c.metrics.simulated, false);
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
                    "{name}: {} ({}) over {:.1} s for {} live images; carbon intensity {:.0} gCO2e/kWh ({}); PUE {:.2}{cpu}{gpu}{}",
                    e.method,
                    if e.scope.is_empty() { &e.tracking_mode } else { &e.scope },
                    e.duration_s,
                    e.images,
                    e.carbon.intensity_g_per_kwh,
                    e.carbon.source_detail,
                    e.carbon.pue,
                    if e.not_measured.is_empty() {
                        String::new()
                    } else {
                        format!("; NOT in the totals: {}", e.not_measured.join(", "))
                    }
                ));
                for w in &e.warnings {
                    match warnings.iter_mut().find(|(t, _)| t == w) {
                        Some((_, who)) => who.push(name.clone()),
                        None => warnings.push((w.clone(), vec![name.clone()])),
                    }
                }
            }
            None => energy.push(format!("{name}: no energy measurement recorded")),
        }
        if let Some(why) = c.metrics.extra.get("training").and_then(|t| t.get("unknown")).and_then(|v| v.as_str()) {
            energy.push(format!("{name} training: unknown ({why})"));
        } else if let Some(t) = c.metrics.extra.get("training") {
            match (t.get("energy_wh").and_then(|v| v.as_f64()), t.get("energy_method").and_then(|v| v.as_str())) {
                (Some(wh), Some(method)) => energy.push(format!(
                    "{name} training: {} Wh, {} gCO2e ({method}) over {} s",
                    sig(Some(wh)),
                    sig(t.get("co2e_g").and_then(|v| v.as_f64())),
                    sig(t.get("energy_seconds").and_then(|v| v.as_f64()))
                )),
                _ => energy.push(format!("{name} training: not metered (trained outside mica, or before mica metered training)")),
            }
        }
        if let Some(ck) = c.metrics.extra.get("checkpoint") {
            let get = |k: &str| ck.get(k).map(|v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string()));
            if let (Some(arch), Some(epoch), Some(w)) = (get("arch"), get("epoch"), get("weights_fnv64")) {
                models.push(format!("{name}: {arch}, weights of epoch {epoch}, weights file fnv64:{w}"));
            }
        }
        if let Some(p) = c.metrics.extra.get("provenance").and_then(|v| v.as_object()) {
            let list = |k: &str| -> String {
                p.get(k)
                    .and_then(|v| v.as_object())
                    .map(|m| m.iter().map(|(v, n)| format!("{v} ({n})")).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            };
            let mut parts = Vec::new();
            for (k, what) in [
                ("resolved_models", "answered by"),
                ("system_fingerprints", "system fingerprint"),
                ("model_digests", "weights digest"),
                ("finish_reasons", "finish reasons"),
            ] {
                let l = list(k);
                if !l.is_empty() {
                    parts.push(format!("{what} {l}"));
                }
            }
            if !parts.is_empty() {
                models.push(format!("{name}: {}", parts.join("; ")));
            }
        }
        for w in c.metrics.extra.get("provenance_warnings").and_then(|v| v.as_array()).into_iter().flatten() {
            if let Some(w) = w.as_str() {
                model_warnings.push(format!("{name}: {w}"));
            }
        }
    }
    let intervals = first.all.bootstrap.as_ref().map(|b| {
        format!(
            "{:.0} % intervals: {} bootstrap over images, {} resamples, seed {}",
            b.level * 100.0,
            match b.method {
                mica_eval::BootstrapMethod::StratifiedPercentile => "stratified (by true class) percentile",
                mica_eval::BootstrapMethod::Percentile => "percentile",
            },
            b.resamples,
            b.seed
        )
    });
    let electricity_usd_per_kwh = cfg
        .and_then(|c| c.pointer("/experiment/energy/electricity_usd_per_kwh"))
        .and_then(|v| v.as_f64());
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
        created_utc: m.map(|m| {
            mica_core::time::iso_utc(std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.created_unix))
        }),
        intervals,
        timing_rule: TIMING_RULE.to_string(),
        models,
        model_warnings,
        electricity_usd_per_kwh,
        machine: m
            .map(|m| m.machine.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        energy,
        energy_warnings: warnings
            .into_iter()
            .map(|(w, who)| if who.len() == run.classifiers.len() && who.len() > 1 {
                format!("{w} (every classifier)")
            } else {
                format!("{w} ({})", who.join(", "))
            })
            .collect(),
        simulated_classifiers: run
            .classifiers
            .iter()
            .filter(|c| c.metrics.simulated)
            .map(|c| c.metrics.classifier.clone())
            .collect(),
    }
}

/// The warm-up and timing rule, the same for every classifier.
pub const TIMING_RULE: &str = "No classifier is warmed up: timing, energy and throughput start with the first image, so a cold start (model load, first request) is inside them; the first image's latency is shown apart. Failed images are left out of latency. Replayed (cached) answers keep their original latency and are left out of throughput, energy and cost.";

/// Break-even of one trained CNN against one LLM.
#[derive(Debug, Clone, Serialize)]
pub struct BreakEven {
    pub cnn: String,
    pub llm: String,
    pub training_wh: f64,
    pub cnn_wh_per_image: f64,
    /// `None` where the LLM's energy is not measured here (a remote API, a server mica could
    /// not see) or not comparable (simulated).
    pub llm_wh_per_image: Option<f64>,
    /// Images after which training + CNN inference has used less energy than the LLM.
    pub energy_images: Option<f64>,
    pub training_usd: Option<f64>,
    pub cnn_usd_per_image: Option<f64>,
    pub llm_usd_per_image: Option<f64>,
    /// Images after which training + CNN inference costs less money than the LLM.
    pub money_images: Option<f64>,
    /// Why a figure is missing, in words.
    pub notes: Vec<String>,
}

fn break_even(rows: &[HeadlineRow], usd_per_kwh: Option<f64>) -> Vec<BreakEven> {
    let mut out = Vec::new();
    for cnn in rows.iter().filter(|r| r.family == Family::Cnn && !r.simulated) {
        let Some(t) = &cnn.training else { continue };
        let Some(cnn_wh) = cnn.wh_per_1000.filter(|_| cnn.energy_comparable).map(|w| w / 1000.0) else { continue };
        for llm in rows.iter().filter(|r| r.family == Family::Llm) {
            let mut notes = Vec::new();
            let llm_wh = if llm.simulated {
                notes.push(format!("{} is simulated: its energy and cost are not compared with a real model's", llm.name));
                None
            } else if llm.energy_comparable {
                llm.wh_per_1000.map(|w| w / 1000.0)
            } else {
                notes.push(format!("{}'s energy is not measured on this machine", llm.name));
                None
            };
            let images = |fixed: f64, a: f64, b: f64| (b > a).then(|| fixed / (b - a));
            let energy_images = llm_wh.and_then(|l| {
                let n = images(t.energy_wh, cnn_wh, l);
                if n.is_none() {
                    notes.push(format!("{} uses no more energy per image than {}: no break-even", llm.name, cnn.name));
                }
                n
            });
            let to_usd = |wh: f64| usd_per_kwh.map(|p| wh / 1000.0 * p);
            let training_usd = to_usd(t.energy_wh);
            let cnn_usd = to_usd(cnn_wh);
            let llm_usd = if llm.simulated {
                None
            } else {
                match llm.cost_basis.as_str() {
                    "api-price" => llm.usd_per_1000.map(|c| c / 1000.0),
                    "no-api-fee" => llm_wh.and_then(to_usd),
                    _ => {
                        notes.push(format!("{}'s price is unknown", llm.name));
                        None
                    }
                }
            };
            if usd_per_kwh.is_none() && !llm.simulated {
                notes.push("no electricity price given (--electricity-price USD_PER_KWH): the CNN's cost in money is unknown".into());
            }
            let money_images = match (training_usd, cnn_usd, llm_usd) {
                (Some(f), Some(a), Some(b)) => images(f, a, b),
                _ => None,
            };
            out.push(BreakEven {
                cnn: cnn.name.clone(),
                llm: llm.name.clone(),
                training_wh: t.energy_wh,
                cnn_wh_per_image: cnn_wh,
                llm_wh_per_image: llm_wh,
                energy_images,
                training_usd,
                cnn_usd_per_image: cnn_usd,
                llm_usd_per_image: llm_usd,
                money_images,
                notes,
            });
        }
    }
    out
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
    if r >= 10.0 {
        format!("{:.0} times", r)
    } else {
        format!("{:.1} times", r)
    }
}

fn ci_words(ci: Option<ConfidenceInterval>) -> String {
    ci.map(|c| format!(" (95 % CI {:.1}–{:.1} %)", c.lower * 100.0, c.upper * 100.0)).unwrap_or_default()
}

/// Whole images, rounded up: a break-even point is reached on an image, not between two.
fn images_words(n: f64) -> String {
    let n = n.ceil().max(1.0);
    if n == 1.0 {
        "1 image".into()
    } else if n >= 1e9 {
        format!("{n:.2e} images")
    } else {
        let s = format!("{n:.0}");
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        out + " images"
    }
}

/// The plain-language summary: every sentence is built from the table's numbers.
fn summary(
    rows: &[HeadlineRow],
    tests: &[PairTest],
    run: &RunDir,
    (shared, shared_acc): (usize, &[f64]),
    break_even: &[BreakEven],
) -> Vec<String> {
    let mut out = Vec::new();
    if rows.is_empty() {
        return out;
    }
    // The ranking is on the images every classifier saw; the first of equally accurate
    // classifiers (experiment order) wins.
    let best = (0..rows.len())
        .fold(None::<usize>, |b, i| match b {
            Some(b) if shared_acc[b] >= shared_acc[i] => Some(b),
            _ => Some(i),
        })
        .expect("non-empty");
    let r = &rows[best];
    let same_set = r.images == shared;
    let ci = if same_set { ci_words(r.accuracy_ci) } else { String::new() };
    let scope = if rows.len() == 1 {
        format!("On this data ({shared} test images), {} reaches", r.name)
    } else if rows.iter().all(|x| x.images == shared) {
        format!("On the {shared} test images every classifier saw, the most accurate is {} with", r.name)
    } else {
        format!(
            "On the {shared} test images every classifier saw (the classifiers saw {} to {} images in all), the most accurate is {} with",
            rows.iter().map(|x| x.images).min().unwrap_or(0),
            rows.iter().map(|x| x.images).max().unwrap_or(0),
            r.name
        )
    };
    out.push(format!(
        "{scope} {} accuracy{ci} and macro F1 {:.3}{}.",
        pct(shared_acc[best]),
        r.macro_f1,
        if same_set { "" } else { " (macro F1 over its own images)" }
    ));
    let n_tests = tests.len();
    let cnn = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.family.is_local_model())
        .max_by(|(i, _), (j, _)| shared_acc[*i].total_cmp(&shared_acc[*j]))
        .map(|(_, r)| r);
    if let Some(cnn) = cnn {
        for llm in rows.iter().filter(|r| r.family == Family::Llm) {
            let Some(t) = tests
                .iter()
                .find(|t| (t.a == cnn.name && t.b == llm.name) || (t.b == cnn.name && t.a == llm.name))
            else {
                continue;
            };
            let diff = if t.a == cnn.name { t.difference_points } else { -t.difference_points };
            let direction = if diff >= 0.0 { "more" } else { "less" };
            let holm = if n_tests > 1 { format!(", Holm-adjusted over {n_tests} pairs") } else { String::new() };
            let sig = format!(
                " ({} difference, McNemar p = {:.3}{holm})",
                if t.significant { "a significant" } else { "not a significant" },
                t.p_holm
            );
            let energy = if llm.simulated || cnn.simulated {
                "; a simulated classifier's energy is not compared with a model's".to_string()
            } else if llm.energy_method.as_deref().is_some_and(|m| m.contains("remote")) {
                // The provider's servers did the work: local watts say nothing about it.
                format!("; {}'s energy at the provider is not measured, so no energy ratio is given", llm.name)
            } else if llm.energy_method.as_deref().is_some_and(|m| m.contains("not-measured")) {
                format!("; {}'s model server could not be metered, so no energy ratio is given", llm.name)
            } else if let (true, true, Some(a), Some(b)) =
                (cnn.energy_comparable, llm.energy_comparable, cnn.wh_per_1000, llm.wh_per_1000)
            {
                ratio_words(a, b)
                    .map(|w| {
                        format!(
                            " and {w} on this machine ({} vs {})",
                            cnn.energy_method.as_deref().unwrap_or("?"),
                            llm.energy_method.as_deref().unwrap_or("?")
                        )
                    })
                    .unwrap_or_default()
            } else {
                String::new()
            };
            out.push(format!(
                "On the {} images both saw, the {} {} is {:.1} points {direction} accurate than {}{sig}{energy}.",
                t.n,
                if cnn.family == Family::Onnx { "ONNX model" } else { "CNN" },
                cnn.name,
                diff.abs(),
                llm.name
            ));
        }
    }
    for r in rows {
        if let (Some(cov), Some(acc)) = (r.coverage, r.accepted_accuracy) {
            let change = if acc >= r.accuracy { "raises" } else { "changes" };
            out.push(format!(
                "The filter {change} {} to {} accuracy{} on the {} of cases it accepts (from {} on all cases), and sends the remaining {} to a physician.",
                r.name,
                pct(acc),
                ci_words(r.accepted_accuracy_ci),
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
                r.name,
                pct(r.no_answer_share)
            ));
        }
        if r.cached > 0 {
            if r.live == 0 {
                out.push(format!(
                    "{}: all {} answers were replayed from the response cache: 0 live calls, no cost in this run, and no throughput or energy claim.",
                    r.name, r.cached
                ));
            } else {
                out.push(format!(
                    "{}: {} of {} answers were replayed from the response cache; throughput, energy and cost are of the {} live calls only (the replays cost $0 now; ${:.4} when first asked).",
                    r.name,
                    r.cached,
                    r.images,
                    r.live,
                    r.replayed_usd
                ));
            }
        }
        match (r.cost_basis.as_str(), r.usd_per_1000) {
            ("api-price", Some(c)) if c > 0.0 => {
                out.push(format!("{} costs ${c:.2} per 1,000 images in API fees.", r.name))
            }
            ("unknown-price", _) => out.push(format!(
                "{}'s API price is unknown (the model is not in the price table): its cost is not reported.",
                r.name
            )),
            _ => {}
        }
    }
    for b in break_even {
        let mut parts = Vec::new();
        if let (Some(n), Some(l)) = (b.energy_images, b.llm_wh_per_image) {
            parts.push(format!(
                "after {} in energy (training {} Wh, then {} Wh per image against {})",
                images_words(n),
                sig(Some(b.training_wh)),
                sig(Some(b.cnn_wh_per_image)),
                sig(Some(l))
            ));
        }
        if let (Some(n), Some(f), Some(l)) = (b.money_images, b.training_usd, b.llm_usd_per_image) {
            parts.push(format!(
                "after {} in money (training ${}, then ${} per image against ${})",
                images_words(n),
                sig(Some(f)),
                sig(b.cnn_usd_per_image),
                sig(Some(l))
            ));
        }
        if parts.is_empty() {
            out.push(format!(
                "Break-even of {} (training included) against {}: not computed: {}.",
                b.cnn,
                b.llm,
                b.notes.join("; ")
            ));
        } else {
            out.push(format!(
                "Training included, {} costs less than {} {}.",
                b.cnn,
                b.llm,
                parts.join(" and ")
            ));
        }
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
    if rows.iter().any(|r| r.energy_method.as_deref().is_some_and(|m| m.contains("not-measured:local-server"))) {
        out.push("A local model server's energy could not be metered (not-measured:local-server): its energy is left out and no ratio involving it is given.".into());
    }
    if run.simulated() {
        out.push(
            "SIMULATED: at least one classifier answered from the LLM simulator; its numbers are not model results, and its energy and cost are never compared with a model's."
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
