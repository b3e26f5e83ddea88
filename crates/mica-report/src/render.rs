//! Markdown, HTML, JSON and CSV renderings of a [`Comparison`], and its figures.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use mica_core::write_atomic;

use crate::comparison::{Comparison, HeadlineRow};
use crate::plots::{self, ConfusionChart, LineChart, Plot, ScatterChart};
use crate::rundir::RunDir;
use crate::ReportError;

/// Output formats of `mica report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Html,
    Json,
    Csv,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Markdown => "md",
            Format::Html => "html",
            Format::Json => "json",
            Format::Csv => "csv",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "md" | "markdown" => Ok(Format::Markdown),
            "html" => Ok(Format::Html),
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            other => Err(format!("unknown report format `{other}` (expected md, html, json or csv)")),
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}", x * 100.0)
}

fn pct_ci(x: f64, ci: Option<mica_eval::ConfidenceInterval>) -> String {
    match ci {
        Some(c) => format!("{} ({}–{})", pct(x), pct(c.lower), pct(c.upper)),
        None => pct(x),
    }
}

fn f1_ci(x: f64, ci: Option<mica_eval::ConfidenceInterval>) -> String {
    match ci {
        Some(c) => format!("{x:.3} ({:.3}–{:.3})", c.lower, c.upper),
        None => format!("{x:.3}"),
    }
}

use crate::comparison::sig;

/// What the headline table counts as wrong, under it in every format.
const NO_ANSWER_NOTE: &str = "Accuracy and F1 count unparseable, refused and failed answers as wrong. No answer % is all three; Refused % is the part where the model declined to answer. Coverage is the share the filter accepted; the rest goes to a physician.";

/// Column headers and cells of the headline table, shared by every format.
pub const HEADLINE_COLUMNS: [&str; 13] = [
    "Classifier",
    "Accuracy % (95 % CI)",
    "Macro F1 (95 % CI)",
    "Weighted F1 (95 % CI)",
    "Coverage % (acc. on accepted)",
    "No answer %",
    "Refused %",
    "Latency p50 / p90 ms (kind)",
    "Images/s (live)",
    "Wh / 1k img",
    "gCO2e / 1k img",
    "Energy method (scope)",
    "$ / 1k img",
];

pub fn headline_cells(r: &HeadlineRow) -> Vec<String> {
    vec![
        r.name.clone(),
        pct_ci(r.accuracy, r.accuracy_ci),
        f1_ci(r.macro_f1, r.macro_f1_ci),
        f1_ci(r.weighted_f1, r.weighted_f1_ci),
        match (r.coverage, r.accepted_accuracy) {
            (Some(c), Some(a)) => format!("{} ({})", pct_ci(c, r.coverage_ci), pct_ci(a, r.accepted_accuracy_ci)),
            (Some(c), None) => pct_ci(c, r.coverage_ci),
            _ => "100 (none deferred)".into(),
        },
        pct(r.no_answer_share),
        pct(r.refused_share),
        match &r.latency_kind {
            Some(k) => format!("{} / {}, {k}", opt(r.latency_p50_ms, 1), opt(r.latency_p90_ms, 1)),
            None => format!("{} / {}", opt(r.latency_p50_ms, 1), opt(r.latency_p90_ms, 1)),
        },
        match r.images_per_s {
            Some(v) => format!("{v:.1}"),
            None if r.live == 0 && r.cached > 0 => "– (all cached)".into(),
            None => "–".into(),
        },
        if r.wh_per_1000.is_none() && r.live == 0 && r.cached > 0 { "– (all cached)".into() } else { sig(r.wh_per_1000) },
        sig(r.gco2e_per_1000),
        match (&r.energy_method, &r.energy_scope) {
            (Some(m), Some(s)) => format!("{m} ({s})"),
            (Some(m), None) => m.clone(),
            _ => "not measured".into(),
        },
        r.cost_text(),
    ]
}

const CLASS_COLUMNS: [&str; 5] = ["Class", "Precision (95 % CI)", "Recall (95 % CI)", "F1", "Support"];

/// Per-class intervals are Wilson score intervals (small counts); F1 is a point estimate.
const CLASS_NOTE: &str = "Precision and recall with Wilson 95 % score intervals; F1 = 2tp / (2tp + fp + fn), a point estimate; no-answer cases count against recall.";

fn class_cells(r: &crate::comparison::ClassRow) -> Vec<String> {
    vec![
        r.label.clone(),
        match r.precision_ci {
            None => "– (never predicted)".into(),
            ci => f1_ci(r.precision, ci),
        },
        f1_ci(r.recall, r.recall_ci),
        format!("{:.3}", r.f1),
        r.support.to_string(),
    ]
}

/// The second table: every interval and calibration figure the headline leaves out.
pub const QUALITY_COLUMNS: [&str; 7] = [
    "Classifier",
    "Cohen's kappa (95 % CI)",
    "Macro AUC (95 % CI)",
    "ECE",
    "Brier",
    "AURC",
    "Accuracy on shared images %",
];

pub fn quality_cells(cmp: &Comparison, i: usize) -> Vec<String> {
    let r = &cmp.headline[i];
    let opt_ci = |v: Option<f64>, ci| match v {
        Some(x) => f1_ci(x, ci),
        None => "– (undefined)".into(),
    };
    vec![
        r.name.clone(),
        opt_ci(r.kappa, r.kappa_ci),
        match r.auc {
            Some(x) => f1_ci(x, r.auc_ci),
            None => "– (no probabilities)".into(),
        },
        opt(r.ece, 3),
        opt(r.brier, 3),
        opt(r.aurc, 3),
        format!("{} (of {})", pct(cmp.shared_accuracy.get(i).copied().unwrap_or(0.0)), cmp.shared_images),
    ]
}

const QUALITY_NOTE: &str = "ECE (15 equal-width bins), Brier score and AURC (area under the risk-coverage curve; lower is better) are over the labelled cases that state a confidence. Intervals: see Provenance.";

/// The third table: what a classifier costs in time, energy and money, each with its basis.
pub const COST_COLUMNS: [&str; 9] = [
    "Classifier",
    "Live / cached answers",
    "Latency p99 ms",
    "First image ms (cold start)",
    "Wall s (live)",
    "Carbon intensity",
    "Training (Wh, gCO2e, method)",
    "$ replayed (not spent now)",
    "Cost basis",
];

pub fn cost_cells(r: &HeadlineRow) -> Vec<String> {
    vec![
        r.name.clone(),
        format!("{} / {}", r.live, r.cached),
        opt(r.latency_p99_ms, 1),
        opt(r.first_latency_ms, 1),
        sig(r.wall_s),
        r.carbon_intensity.clone().unwrap_or_else(|| "–".into()),
        match &r.training {
            Some(t) => format!("{} Wh, {} g ({})", sig(Some(t.energy_wh)), sig(Some(t.co2e_g)), t.method),
            None if r.family == crate::Family::Cnn => "not metered".into(),
            None if r.family == crate::Family::Onnx => "unknown (trained outside mica)".into(),
            None => "–".into(),
        },
        if r.replayed_usd > 0.0 { format!("{:.4}", r.replayed_usd) } else { "0".into() },
        r.cost_basis.clone(),
    ]
}

pub const BREAK_EVEN_COLUMNS: [&str; 6] = [
    "CNN (training included) vs LLM",
    "Training Wh",
    "Wh per image (CNN / LLM)",
    "Break-even, energy (images)",
    "Break-even, money (images)",
    "Why a figure is missing",
];

fn break_even_rows(cmp: &Comparison) -> Vec<Vec<String>> {
    cmp.break_even
        .iter()
        .map(|b| {
            vec![
                format!("{} vs {}", b.cnn, b.llm),
                sig(Some(b.training_wh)),
                format!("{} / {}", sig(Some(b.cnn_wh_per_image)), sig(b.llm_wh_per_image)),
                b.energy_images.map(|n| format!("{:.0}", n.ceil())).unwrap_or_else(|| "–".into()),
                b.money_images.map(|n| format!("{:.0}", n.ceil())).unwrap_or_else(|| "–".into()),
                if b.notes.is_empty() { "–".into() } else { b.notes.join("; ") },
            ]
        })
        .collect()
}

/// The headline table as aligned plain text, for the terminal.
pub fn headline_text(cmp: &Comparison) -> String {
    let cols: [usize; 10] = [0, 1, 2, 4, 5, 6, 7, 8, 9, 12];
    // Every figure in this table has its method or interval in the full report; the terminal
    // table points there.
    let rows: Vec<Vec<String>> = cmp.headline.iter().map(headline_cells).collect();
    let header: Vec<String> = cols.iter().map(|&c| HEADLINE_COLUMNS[c].to_string()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, &c) in cols.iter().enumerate() {
            widths[i] = widths[i].max(r[c].chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            l.push_str(&" ".repeat(widths[i].saturating_sub(c.chars().count())));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|s| s.as_str()).collect(), &mut out);
    for r in &rows {
        line(cols.iter().map(|&c| r[c].as_str()).collect(), &mut out);
    }
    if cmp.simulated {
        out.push_str("SIMULATED: some rows come from the LLM simulator, not a model.\n");
    }
    out
}

/// Every figure of the report.
pub fn make_plots(run: &RunDir, cmp: &Comparison) -> Result<Vec<Plot>, ReportError> {
    let mut out = Vec::new();
    for (i, sw) in cmp.pilot.sweeps.iter().enumerate() {
        for (axis, stem, x_label, known) in [
            (mica_eval::cascade::CostAxis::Usd, "usd", "API fees, $ per 1,000 images", sw.usd_known),
            (mica_eval::cascade::CostAxis::Wh, "energy", "energy, Wh per 1,000 images", sw.wh_known),
        ] {
            if !known {
                continue;
            }
            let series = crate::pilot::plot_series(sw, axis);
            if series.is_empty() {
                continue;
            }
            out.push(plots::render(
                &format!("cascade-{i}-{stem}"),
                &format!("Cascade {} → {}: accuracy vs {}", sw.first, sw.second, x_label),
                &LineChart {
                    title: format!("Cascade: accuracy vs {x_label}"),
                    x_label: x_label.into(),
                    y_label: "accuracy %".into(),
                    series,
                    x_range: None,
                    y_range: None,
                    log_x: false,
                    diagonal: false,
                    markers: true,
                },
            )?);
        }
    }
    let energy_points: Vec<(String, f64, f64)> = cmp
        .headline
        .iter()
        .filter(|r| r.energy_comparable)
        .filter_map(|r| r.wh_per_1000.map(|w| (r.name.clone(), w, r.accuracy * 100.0)))
        .collect();
    if !energy_points.is_empty() {
        out.push(plots::render(
            "accuracy-vs-energy",
            "Accuracy vs energy",
            &ScatterChart {
                title: "Accuracy vs energy measured here (log scale; simulated and unmetered rows left out)".into(),
                x_label: "Wh per 1,000 images".into(),
                y_label: "accuracy %".into(),
                points: energy_points,
                log_x: true,
            },
        )?);
    }
    // Only known money: unknown prices and the simulator are left out, not drawn at $0.
    let cost_points: Vec<(String, f64, f64)> = cmp
        .headline
        .iter()
        .filter_map(|r| match r.cost_basis.as_str() {
            "api-price" => r.usd_per_1000.map(|c| (r.name.clone(), c, r.accuracy * 100.0)),
            "no-api-fee" => Some((r.name.clone(), 0.0, r.accuracy * 100.0)),
            _ => None,
        })
        .collect();
    out.push(plots::render(
        "accuracy-vs-cost",
        "Accuracy vs cost",
        &ScatterChart {
            title: "Accuracy vs API fees (no-fee models at $0; unknown prices and simulated rows left out)".into(),
            x_label: "$ per 1,000 images".into(),
            y_label: "accuracy %".into(),
            points: cost_points,
            log_x: false,
        },
    )?);
    // The same images as the latency figures of the tables: failed ones left out. The legend
    // says what one value is, since per-request and batch-amortised times differ in kind.
    let latency: Vec<(String, Vec<(f64, f64)>)> = run
        .classifiers
        .iter()
        .zip(&cmp.headline)
        .filter_map(|(c, h)| {
            let mut l: Vec<f64> = c
                .predictions
                .iter()
                .filter(|p| p.outcome != mica_core::Outcome::Failed)
                .map(|p| p.latency_ms.max(1e-3))
                .filter(|v| v.is_finite())
                .collect();
            if l.is_empty() {
                return None;
            }
            l.sort_by(f64::total_cmp);
            let n = l.len() as f64;
            let pts = l.iter().enumerate().map(|(i, &v)| (v, (i + 1) as f64 / n)).collect();
            let label = match &h.latency_kind {
                Some(k) => format!("{} ({k})", h.name),
                None => h.name.clone(),
            };
            Some((label, pts))
        })
        .collect();
    if !latency.is_empty() {
        out.push(plots::render(
            "latency",
            "Latency distribution",
            &LineChart {
                title: "Latency (cumulative share; failed images left out)".into(),
                x_label: "ms (log scale; kind in the legend)".into(),
                y_label: "share of images".into(),
                series: latency,
                x_range: None,
                y_range: Some((0.0, 1.0)),
                log_x: true,
                diagonal: false,
                markers: false,
            },
        )?);
    }
    let rc: Vec<(String, Vec<(f64, f64)>)> = run
        .classifiers
        .iter()
        .zip(&cmp.headline)
        .filter(|(c, _)| c.metrics.risk_coverage.len() > 1)
        .map(|(c, h)| {
            (
                h.name.clone(),
                c.metrics.risk_coverage.iter().map(|p| (p.coverage, p.accuracy)).collect(),
            )
        })
        .collect();
    if !rc.is_empty() {
        out.push(plots::render(
            "risk-coverage",
            "Risk-coverage",
            &LineChart {
                title: "Accuracy on accepted cases vs coverage (confidence threshold)".into(),
                x_label: "coverage (share of all images accepted)".into(),
                y_label: "accuracy on accepted".into(),
                series: rc,
                x_range: Some((0.0, 1.0)),
                y_range: Some((0.0, 1.02)),
                log_x: false,
                diagonal: false,
                markers: false,
            },
        )?);
    }
    let rel: Vec<(String, Vec<(f64, f64)>)> = run
        .classifiers
        .iter()
        .zip(&cmp.headline)
        .map(|(c, h)| {
            (
                h.name.clone(),
                c.metrics
                    .all
                    .reliability
                    .iter()
                    .filter(|b| b.count > 0)
                    .map(|b| (b.confidence, b.accuracy))
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if !rel.is_empty() {
        out.push(plots::render(
            "reliability",
            "Reliability diagram",
            &LineChart {
                title: "Reliability: accuracy vs stated confidence".into(),
                x_label: "mean confidence in bin".into(),
                y_label: "accuracy in bin".into(),
                series: rel,
                x_range: Some((0.0, 1.0)),
                y_range: Some((0.0, 1.02)),
                log_x: false,
                diagonal: true,
                markers: true,
            },
        )?);
    }
    for (c, h) in run.classifiers.iter().zip(&cmp.headline) {
        let cm = &c.metrics.all.confusion;
        out.push(plots::render(
            &format!("confusion-{}", c.slug),
            &format!("Confusion matrix: {}", h.name),
            &ConfusionChart {
                title: format!("{} ({} images)", h.name, c.metrics.images),
                labels: cm.labels.clone(),
                matrix: cm.matrix.clone(),
                no_answer: cm.no_answer.clone(),
            },
        )?);
    }
    Ok(out)
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

fn md_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", header.iter().map(|_| "---|").collect::<String>());
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| md_escape(c)).collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}

fn mcnemar_rows(cmp: &Comparison) -> Vec<Vec<String>> {
    cmp.mcnemar
        .iter()
        .map(|t| {
            vec![
                format!("{} vs {}", t.a, t.b),
                t.n.to_string(),
                format!("{:+.1}", t.difference_points),
                format!("{} / {}", t.a_only, t.b_only),
                format!("{:.4}{}", t.p_value, if t.exact { " (exact)" } else { "" }),
                format!("{:.4}", t.p_holm),
                if t.significant { "yes".into() } else { "no".into() },
            ]
        })
        .collect()
}

const MCNEMAR_HEADER: [&str; 7] = [
    "Pair (A vs B)",
    "Shared images",
    "A − B (points)",
    "Only A right / only B right",
    "p (this pair)",
    "p (Holm-adjusted)",
    "Significant (Holm p < 0.05)",
];

fn mcnemar_note(cmp: &Comparison) -> String {
    format!(
        "McNemar's test on the images both classifiers saw (exact binomial below 25 discordant pairs, else chi-squared with continuity correction). p-values are Holm-adjusted across all {} pairs of this report; significance is decided on the adjusted value.",
        cmp.mcnemar.len()
    )
}

fn provenance_lines(cmp: &Comparison) -> Vec<(String, String)> {
    let p = &cmp.provenance;
    let mut v = vec![
        ("Run".to_string(), cmp.run.clone()),
        ("Dataset".into(), p.dataset.clone().unwrap_or_else(|| "–".into())),
        ("Split".into(), p.split.join(", ")),
        ("Split manifest".into(), p.split_manifest.clone().unwrap_or_else(|| "–".into())),
        ("Split manifest SHA-256".into(), p.split_hash.clone().unwrap_or_else(|| "–".into())),
        ("Seed".into(), p.seed.map(|s| s.to_string()).unwrap_or_else(|| "–".into())),
        ("mica version".into(), p.mica_version.clone().unwrap_or_else(|| "–".into())),
        ("Command".into(), p.command.clone().unwrap_or_else(|| "–".into())),
        ("Created (UTC)".into(), p.created_utc.clone().unwrap_or_else(|| "–".into())),
        ("Intervals".into(), p.intervals.clone().unwrap_or_else(|| "none computed (bootstrap off)".into())),
        ("Timing".into(), p.timing_rule.clone()),
        (
            "Electricity price".into(),
            p.electricity_usd_per_kwh
                .map(|v| format!("{v} USD/kWh (given)"))
                .unwrap_or_else(|| "not given: local energy is not turned into money".into()),
        ),
    ];
    for m in &p.models {
        v.push(("Model version".into(), m.clone()));
    }
    for w in &p.model_warnings {
        v.push(("Model warning".into(), w.clone()));
    }
    for (k, val) in &p.machine {
        v.push((format!("Machine: {k}"), val.clone()));
    }
    for e in &p.energy {
        v.push(("Energy".into(), e.clone()));
    }
    for w in &p.energy_warnings {
        v.push(("Energy warning".into(), w.clone()));
    }
    if !p.simulated_classifiers.is_empty() {
        v.push((
            "SIMULATED".into(),
            format!("{} answered from the LLM simulator", p.simulated_classifiers.join(", ")),
        ));
    }
    v
}

const DISCLAIMER: &str = "Decision support only: these are model predictions with confidence, not diagnoses. Low-confidence and deferred cases are flagged for a physician, who has the final say.";

const PILOT_COLUMNS: [&str; 10] = [
    "Option",
    "Images",
    "Accuracy %",
    "Physician cases",
    "API fees (USD)",
    "Electricity (USD)",
    "Energy (Wh)",
    "CO2 (g)",
    "Wall time",
    "How obtained",
];

const SWEEP_COLUMNS: [&str; 8] = [
    "Threshold",
    "Accuracy %",
    "Accuracy on accepted %",
    "Coverage %",
    "Asked the LLM %",
    "To a physician",
    "USD / 1,000 images",
    "Wh / 1,000 images",
];

const PILOT_NOTE: &str = "Priced from this run's measured figures: API fees at the recorded prices, energy and CO2 as metered here (a CNN's training counted once, so its cost per image falls as the pilot grows), wall time at the measured throughput of one process. Physician cases are those deferred, flagged as low-confidence, or without an answer. A cascade is priced from the sweep below: the LLM's fee and energy are paid only for the images sent to it.";

const SWEEP_NOTE: &str = "Each row is what a cascade:FIRST,SECOND@THRESHOLD run would give on these images, computed from the two standalone runs with the live cascade's own decision rule (no model was asked again). Accuracy counts deferred cases with the label the models offered, as the headline does.";

fn opt_cell(v: Option<f64>, f: impl Fn(f64) -> String, missing: &str) -> String {
    v.map(f).unwrap_or_else(|| missing.to_string())
}

fn pilot_rows(rows: &[crate::pilot::PilotRow]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            vec![
                r.option.clone(),
                crate::pilot::thousands(r.images),
                pct(r.accuracy),
                format!("{:.0}", r.physician_cases),
                opt_cell(r.api_usd, crate::pilot::usd_words, "unknown"),
                opt_cell(r.electricity_usd, crate::pilot::usd_words, "– (no --electricity-price)"),
                opt_cell(r.energy_wh, |w| sig(Some(w)), "not measured"),
                opt_cell(r.co2e_g, |g| sig(Some(g)), "–"),
                opt_cell(r.wall_s, crate::pilot::duration_words, "–"),
                r.notes.join("; "),
            ]
        })
        .collect()
}

fn sweep_rows(sw: &crate::pilot::CascadeSweep) -> Vec<Vec<String>> {
    use mica_eval::cascade::PointKind;
    let mut pts: Vec<(String, &mica_eval::cascade::SweepPoint)> = Vec::new();
    for p in &sw.points {
        match p.kind {
            PointKind::FirstAlone => pts.push((format!("{} alone", sw.first), p)),
            PointKind::SecondAlone => pts.push((format!("{} alone", sw.second), p)),
            PointKind::Cascade => {}
        }
    }
    for p in &sw.table {
        pts.push((format!("{:.3}", p.threshold.unwrap_or(0.0)), p));
    }
    if let Some(c) = &sw.chosen {
        pts.push((format!("{:.3} (chosen: {})", c.threshold.unwrap_or(0.0), sw.chosen_why), c));
    }
    pts.iter()
        .map(|(what, p)| {
            vec![
                what.clone(),
                pct(p.accuracy),
                p.accepted_accuracy.map(pct).unwrap_or_else(|| "–".into()),
                pct(p.coverage),
                pct(p.share_second),
                p.deferred.to_string(),
                if sw.usd_known { format!("{:.3}", p.usd_per_1000) } else { "unknown".into() },
                sig(p.wh_per_1000),
            ]
        })
        .collect()
}

/// What the simulated section says above its tables.
const SIMULATED_NOTE: &str = "These rows were answered by mica's built-in LLM simulator, which draws answers from a confusion model: they show that the LLM arm of the pipeline works (requests, parsing, filter, cost accounting), not how any model performs. They are kept out of the headline, and their energy and cost are never compared with a real row's.";

/// Indices of the headline rows from real classifiers, and of those answered by the simulator,
/// which every format shows in a section of their own.
fn split_simulated(cmp: &Comparison) -> (Vec<usize>, Vec<usize>) {
    (0..cmp.headline.len()).partition(|&i| !cmp.headline[i].simulated)
}

pub fn markdown(cmp: &Comparison, plots: &[Plot]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# mica comparison: {}\n", cmp.run);
    if cmp.simulated {
        let _ = writeln!(
            s,
            "> **SIMULATED**: {} answered from the LLM simulator. Those rows are not model results.\n",
            cmp.provenance.simulated_classifiers.join(", ")
        );
    }
    let _ = writeln!(s, "> {DISCLAIMER}\n");
    let _ = writeln!(s, "## Summary\n");
    for line in &cmp.summary {
        let _ = writeln!(s, "- {line}");
    }
    let _ = writeln!(s, "\n## Headline\n");
    let (real, simulated) = split_simulated(cmp);
    let rows: Vec<Vec<String>> = real.iter().map(|&i| headline_cells(&cmp.headline[i])).collect();
    s.push_str(&md_table(&HEADLINE_COLUMNS, &rows));
    let _ = writeln!(
        s,
        "\n{NO_ANSWER_NOTE}\n"
    );
    let _ = writeln!(s, "## Agreement, discrimination and calibration\n");
    let rows: Vec<Vec<String>> = real.iter().map(|&i| quality_cells(cmp, i)).collect();
    s.push_str(&md_table(&QUALITY_COLUMNS, &rows));
    let _ = writeln!(s, "\n{QUALITY_NOTE}\n");
    let _ = writeln!(s, "## Time, energy and money\n");
    let rows: Vec<Vec<String>> = real.iter().map(|&i| cost_cells(&cmp.headline[i])).collect();
    s.push_str(&md_table(&COST_COLUMNS, &rows));
    let _ = writeln!(s, "\n{}\n", cmp.provenance.timing_rule);
    if !cmp.break_even.is_empty() {
        let _ = writeln!(s, "### Break-even: a trained CNN against an LLM\n");
        s.push_str(&md_table(&BREAK_EVEN_COLUMNS, &break_even_rows(cmp)));
        s.push('\n');
    }
    if !cmp.pilot.tables.is_empty() {
        let _ = writeln!(s, "## Cost of a pilot\n");
        for w in &cmp.pilot.words {
            let _ = writeln!(s, "- {w}");
        }
        let _ = writeln!(s, "\n{PILOT_NOTE}\n");
        for (_, rows) in &cmp.pilot.tables {
            s.push_str(&md_table(&PILOT_COLUMNS, &pilot_rows(rows)));
            s.push('\n');
        }
        for n in &cmp.pilot.notes {
            let _ = writeln!(s, "- {n}");
        }
        for (i, sw) in cmp.pilot.sweeps.iter().enumerate() {
            let _ = writeln!(s, "\n### Cascade sweep: {} first, {} when unsure ({} images)\n\n{SWEEP_NOTE}\n", sw.first, sw.second, sw.images);
            s.push_str(&md_table(&SWEEP_COLUMNS, &sweep_rows(sw)));
            for n in &sw.notes {
                let _ = writeln!(s, "- {n}");
            }
            for p in plots.iter().filter(|p| p.stem.starts_with(&format!("cascade-{i}-"))) {
                let _ = writeln!(s, "\n![{}](plots/{}.png)", p.title, p.stem);
            }
            s.push('\n');
        }
    }
    if !simulated.is_empty() {
        let _ = writeln!(s, "## SIMULATED LLM arm (not a model)\n\n{SIMULATED_NOTE}\n");
        let rows: Vec<Vec<String>> = simulated.iter().map(|&i| headline_cells(&cmp.headline[i])).collect();
        s.push_str(&md_table(&HEADLINE_COLUMNS, &rows));
        s.push('\n');
        let rows: Vec<Vec<String>> = simulated.iter().map(|&i| quality_cells(cmp, i)).collect();
        s.push_str(&md_table(&QUALITY_COLUMNS, &rows));
        s.push('\n');
        let rows: Vec<Vec<String>> = simulated.iter().map(|&i| cost_cells(&cmp.headline[i])).collect();
        s.push_str(&md_table(&COST_COLUMNS, &rows));
        s.push('\n');
    }
    let _ = writeln!(s, "## Per-class results\n\n{CLASS_NOTE}\n");
    for t in &cmp.per_class {
        let _ = writeln!(s, "### {}\n", t.name);
        let rows: Vec<Vec<String>> = t
            .rows
            .iter()
            .map(|r| {
                class_cells(r)
            })
            .collect();
        s.push_str(&md_table(&CLASS_COLUMNS, &rows));
        if let Some(p) = plots.iter().find(|p| p.stem == format!("confusion-{}", t.slug)) {
            let _ = writeln!(s, "\n![{}](plots/{}.png)\n", p.title, p.stem);
        }
    }
    let _ = writeln!(s, "## Figures\n");
    for p in plots.iter().filter(|p| !p.stem.starts_with("confusion-")) {
        let _ = writeln!(s, "![{}](plots/{}.png)\n", p.title, p.stem);
    }
    let _ = writeln!(s, "## Pairwise McNemar tests\n");
    if cmp.mcnemar.is_empty() {
        let _ = writeln!(s, "Only one classifier: nothing to compare.\n");
    } else {
        s.push_str(&md_table(&MCNEMAR_HEADER, &mcnemar_rows(cmp)));
        let _ = writeln!(s, "\n{}\n", mcnemar_note(cmp));
    }
    let _ = writeln!(s, "## Provenance\n");
    let rows: Vec<Vec<String>> = provenance_lines(cmp).into_iter().map(|(k, v)| vec![k, v]).collect();
    s.push_str(&md_table(&["Item", "Value"], &rows));
    if !cmp.skipped.is_empty() {
        let _ = writeln!(s, "\nNot in this report: {}", cmp.skipped.join("; "));
    }
    s
}

/// Text made safe for HTML element content and quoted attribute values: escapes `&`, `<`,
/// `>`, `"` and `'`.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html_table(header: &[&str], rows: &[Vec<String>], class: &str) -> String {
    // Wrapped so a table wider than the page scrolls on its own instead of running off it.
    let mut s = format!("<div class=\"tw\"><table class=\"{class}\"><thead><tr>");
    for c in header {
        let _ = write!(s, "<th>{}</th>", html_escape(c));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", html_escape(c));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></div>\n");
    s
}

/// Strips the XML prolog-free plotters SVG of its fixed size so it scales with the page.
/// One figure of the HTML report: the plot inline (no file to fetch) with its caption.
fn figure_html(p: &Plot) -> String {
    format!(
        "<figure id=\"fig-{}\">{}<figcaption>{}</figcaption></figure>",
        html_escape(&p.stem),
        inline_svg(&p.svg),
        html_escape(&p.title)
    )
}

fn inline_svg(svg: &str) -> String {
    match svg.find('>') {
        Some(end) if svg.starts_with("<svg") => {
            let open = &svg[..end];
            let open = open
                .split(' ')
                .filter(|a| !a.starts_with("width=") && !a.starts_with("height="))
                .collect::<Vec<_>>()
                .join(" ");
            format!("{open} role=\"img\" style=\"width:100%;max-width:720px;height:auto\"{}", &svg[end..])
        }
        _ => svg.to_string(),
    }
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f2f4f7}table.headline{font-size:.8rem}table.headline td:not(:first-child){text-align:right;white-space:nowrap}.tw{overflow-x:auto;max-width:100%}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:.6rem 1rem;font-weight:bold;margin:1rem 0}
.note{background:#eef6fb;border-left:4px solid #0072b2;padding:.5rem 1rem;margin:1rem 0}
.figs{display:flex;flex-wrap:wrap;gap:1rem}.figs figure{margin:0;flex:1 1 520px}figcaption{font-size:.85rem;color:#555}";

pub fn html(cmp: &Comparison, plots: &[Plot]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>mica comparison: {}</title><style>{CSS}</style></head><body>\n",
        html_escape(&cmp.run)
    );
    let _ = writeln!(s, "<h1>mica comparison: {}</h1>", html_escape(&cmp.run));
    if cmp.simulated {
        let _ = writeln!(
            s,
            "<div class=\"banner\" id=\"simulated\">SIMULATED: {} answered from the LLM simulator. Those rows are not model results.</div>",
            html_escape(&cmp.provenance.simulated_classifiers.join(", "))
        );
    }
    let _ = writeln!(s, "<div class=\"note\">{}</div>", html_escape(DISCLAIMER));
    let _ = writeln!(s, "<h2 id=\"summary\">Summary</h2><ul>");
    for line in &cmp.summary {
        let _ = writeln!(s, "<li>{}</li>", html_escape(line));
    }
    s.push_str("</ul>\n<h2 id=\"headline\">Headline</h2>\n");
    let (real, simulated) = split_simulated(cmp);
    let rows: Vec<Vec<String>> = real.iter().map(|&i| headline_cells(&cmp.headline[i])).collect();
    s.push_str(&html_table(&HEADLINE_COLUMNS, &rows, "headline"));
    let _ = writeln!(s, "<p>{}</p>", html_escape(NO_ANSWER_NOTE));
    s.push_str("<h2 id=\"quality\">Agreement, discrimination and calibration</h2>\n");
    let rows: Vec<Vec<String>> = real.iter().map(|&i| quality_cells(cmp, i)).collect();
    s.push_str(&html_table(&QUALITY_COLUMNS, &rows, "quality"));
    let _ = writeln!(s, "<p>{}</p>", html_escape(QUALITY_NOTE));
    s.push_str("<h2 id=\"cost\">Time, energy and money</h2>\n");
    let rows: Vec<Vec<String>> = real.iter().map(|&i| cost_cells(&cmp.headline[i])).collect();
    s.push_str(&html_table(&COST_COLUMNS, &rows, "cost"));
    let _ = writeln!(s, "<p>{}</p>", html_escape(&cmp.provenance.timing_rule));
    if !cmp.break_even.is_empty() {
        s.push_str("<h3 id=\"break-even\">Break-even: a trained CNN against an LLM</h3>\n");
        s.push_str(&html_table(&BREAK_EVEN_COLUMNS, &break_even_rows(cmp), "break-even"));
    }
    if !cmp.pilot.tables.is_empty() {
        s.push_str("<h2 id=\"pilot\">Cost of a pilot</h2>\n<ul>");
        for w in &cmp.pilot.words {
            let _ = write!(s, "<li>{}</li>", html_escape(w));
        }
        let _ = writeln!(s, "</ul><p>{}</p>", html_escape(PILOT_NOTE));
        for (n, rows) in &cmp.pilot.tables {
            s.push_str(&html_table(&PILOT_COLUMNS, &pilot_rows(rows), &format!("pilot-{n}")));
        }
        for n in &cmp.pilot.notes {
            let _ = writeln!(s, "<p>{}</p>", html_escape(n));
        }
        for (i, sw) in cmp.pilot.sweeps.iter().enumerate() {
            let _ = writeln!(
                s,
                "<h3 id=\"cascade-sweep-{i}\">Cascade sweep: {} first, {} when unsure ({} images)</h3><p>{}</p>",
                html_escape(&sw.first),
                html_escape(&sw.second),
                sw.images,
                html_escape(SWEEP_NOTE)
            );
            s.push_str(&html_table(&SWEEP_COLUMNS, &sweep_rows(sw), "cascade-sweep"));
            for n in &sw.notes {
                let _ = writeln!(s, "<p>{}</p>", html_escape(n));
            }
            s.push_str("<div class=\"figs\">");
            for p in plots.iter().filter(|p| p.stem.starts_with(&format!("cascade-{i}-"))) {
                s.push_str(&figure_html(p));
            }
            s.push_str("</div>\n");
        }
    }
    if !simulated.is_empty() {
        s.push_str("<h2 id=\"simulated-arm\">SIMULATED LLM arm (not a model)</h2>\n");
        let _ = writeln!(s, "<p>{}</p>", html_escape(SIMULATED_NOTE));
        let rows: Vec<Vec<String>> = simulated.iter().map(|&i| headline_cells(&cmp.headline[i])).collect();
        s.push_str(&html_table(&HEADLINE_COLUMNS, &rows, "simulated-headline"));
        let rows: Vec<Vec<String>> = simulated.iter().map(|&i| quality_cells(cmp, i)).collect();
        s.push_str(&html_table(&QUALITY_COLUMNS, &rows, "simulated-quality"));
        let rows: Vec<Vec<String>> = simulated.iter().map(|&i| cost_cells(&cmp.headline[i])).collect();
        s.push_str(&html_table(&COST_COLUMNS, &rows, "simulated-cost"));
    }
    s.push_str("<h2 id=\"figures\">Accuracy, energy, cost, latency, selective prediction, calibration</h2><div class=\"figs\">\n");
    for p in plots.iter().filter(|p| !p.stem.starts_with("confusion-")) {
        s.push_str(&figure_html(p));
        s.push('\n');
    }
    s.push_str("</div>\n<h2 id=\"per-class\">Per-class results and confusion matrices</h2>\n");
    let _ = writeln!(s, "<p>{}</p>", html_escape(CLASS_NOTE));
    for t in &cmp.per_class {
        let _ = writeln!(s, "<h3>{}</h3><div class=\"figs\"><div>", html_escape(&t.name));
        let rows: Vec<Vec<String>> = t
            .rows
            .iter()
            .map(|r| {
                class_cells(r)
            })
            .collect();
        s.push_str(&html_table(&CLASS_COLUMNS, &rows, "per-class"));
        s.push_str("</div>");
        if let Some(p) = plots.iter().find(|p| p.stem == format!("confusion-{}", t.slug)) {
            s.push_str(&figure_html(p));
        }
        s.push_str("</div>\n");
    }
    s.push_str("<h2 id=\"mcnemar\">Pairwise McNemar tests</h2>\n");
    if cmp.mcnemar.is_empty() {
        s.push_str("<p>Only one classifier: nothing to compare.</p>\n");
    } else {
        s.push_str(&html_table(&MCNEMAR_HEADER, &mcnemar_rows(cmp), "mcnemar"));
        let _ = writeln!(s, "<p>{}</p>", html_escape(&mcnemar_note(cmp)));
    }
    s.push_str("<h2 id=\"provenance\">Provenance</h2>\n");
    let rows: Vec<Vec<String>> = provenance_lines(cmp).into_iter().map(|(k, v)| vec![k, v]).collect();
    s.push_str(&html_table(&["Item", "Value"], &rows, "provenance"));
    if !cmp.skipped.is_empty() {
        let _ = writeln!(s, "<p>Not in this report: {}</p>", html_escape(&cmp.skipped.join("; ")));
    }
    s.push_str("</body></html>\n");
    s
}

/// The headline table as machine-readable CSV (raw numbers, not formatted cells).
pub fn csv(cmp: &Comparison) -> String {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let row_err = "CSV into memory cannot fail";
    w.write_record(CSV_HEADER).expect(row_err);
    let o = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in &cmp.headline {
        let fam = serde_json::to_value(r.family).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let fields = [
            r.classifier.clone(),
            r.slug.clone(),
            fam,
            r.images.to_string(),
            r.accuracy.to_string(),
            o(r.accuracy_ci.map(|c| c.lower)),
            o(r.accuracy_ci.map(|c| c.upper)),
            r.macro_f1.to_string(),
            o(r.macro_f1_ci.map(|c| c.lower)),
            o(r.macro_f1_ci.map(|c| c.upper)),
            r.weighted_f1.to_string(),
            o(r.weighted_f1_ci.map(|c| c.lower)),
            o(r.weighted_f1_ci.map(|c| c.upper)),
            o(r.kappa),
            o(r.kappa_ci.map(|c| c.lower)),
            o(r.kappa_ci.map(|c| c.upper)),
            o(r.auc),
            o(r.auc_ci.map(|c| c.lower)),
            o(r.auc_ci.map(|c| c.upper)),
            o(r.coverage),
            o(r.coverage_ci.map(|c| c.lower)),
            o(r.coverage_ci.map(|c| c.upper)),
            o(r.accepted_accuracy),
            o(r.accepted_accuracy_ci.map(|c| c.lower)),
            o(r.accepted_accuracy_ci.map(|c| c.upper)),
            r.no_answer_share.to_string(),
            r.refused_share.to_string(),
            o(r.latency_p50_ms),
            o(r.latency_p90_ms),
            o(r.latency_p99_ms),
            r.latency_kind.clone().unwrap_or_default(),
            o(r.first_latency_ms),
            r.live.to_string(),
            r.cached.to_string(),
            o(r.images_per_s),
            o(r.wh_per_1000),
            o(r.gco2e_per_1000),
            r.energy_method.clone().unwrap_or_default(),
            r.energy_scope.clone().unwrap_or_default(),
            o(r.usd_per_1000),
            r.cost_basis.clone(),
            o(r.training.as_ref().map(|t| t.energy_wh)),
            o(r.ece),
            o(r.brier),
            o(r.aurc),
            r.simulated.to_string(),
        ];
        w.write_record(&fields).expect(row_err);
    }
    String::from_utf8(w.into_inner().expect(row_err)).expect("CSV of UTF-8 fields is UTF-8")
}

const CSV_HEADER: [&str; 46] = [
    "classifier",
    "slug",
    "family",
    "images",
    "accuracy",
    "accuracy_ci_lower",
    "accuracy_ci_upper",
    "macro_f1",
    "macro_f1_ci_lower",
    "macro_f1_ci_upper",
    "weighted_f1",
    "weighted_f1_ci_lower",
    "weighted_f1_ci_upper",
    "kappa",
    "kappa_ci_lower",
    "kappa_ci_upper",
    "macro_auc",
    "macro_auc_ci_lower",
    "macro_auc_ci_upper",
    "coverage",
    "coverage_ci_lower",
    "coverage_ci_upper",
    "accepted_accuracy",
    "accepted_accuracy_ci_lower",
    "accepted_accuracy_ci_upper",
    "no_answer_share",
    "refused_share",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_kind",
    "first_latency_ms",
    "live",
    "cached",
    "images_per_s",
    "wh_per_1000",
    "gco2e_per_1000",
    "energy_method",
    "energy_scope",
    "usd_per_1000",
    "cost_basis",
    "training_wh",
    "ece",
    "brier",
    "aurc",
    "simulated",
];

/// Writes `report.<ext>` (and, for md/html, the figures under `plots/`) into the run
/// directory; returns the report's path.
pub fn write_report(run: &RunDir, cmp: &Comparison, format: Format) -> Result<PathBuf, ReportError> {
    let layout = mica_core::RunRoot::new(&run.root);
    let path = layout.report(format.extension());
    let body = match format {
        Format::Json => {
            let mut b = serde_json::to_string_pretty(cmp).expect("comparison serialises");
            b.push('\n');
            b
        }
        Format::Csv => csv(cmp),
        Format::Markdown | Format::Html => {
            let plots = make_plots(run, cmp)?;
            write_plots(&layout.plots(), &plots)?;
            if format == Format::Markdown {
                markdown(cmp, &plots)
            } else {
                html(cmp, &plots)
            }
        }
    };
    write_atomic(&path, body.as_bytes())?;
    Ok(path)
}

fn write_plots(dir: &Path, plots: &[Plot]) -> Result<(), ReportError> {
    for p in plots {
        write_atomic(dir.join(format!("{}.svg", p.stem)), p.svg.as_bytes())?;
        write_atomic(dir.join(format!("{}.png", p.stem)), &p.png)?;
    }
    Ok(())
}
