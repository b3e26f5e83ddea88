//! The business case: the offline cascade sweep (a CNN first, an LLM only when the CNN is
//! unsure) and the "Cost of a pilot" table, both computed from the run directory alone.
//!
//! No model is asked again. Given one standalone run of a local model and one of an LLM on
//! the same images, `mica_eval::cascade::sweep` applies the live engine's own decision rule at
//! every threshold, so each point of the sweep is what a `cascade:` run at that threshold would
//! have produced (the engine's tests check this against real runs). What is not known is said:
//! a remote API's energy is not measured, an unknown price is not $0, the simulator is never
//! put beside a real model.

use mica_core::Prediction;
use mica_eval::cascade::{self, ArmCosts, CostAxis, PointKind, SweepPoint};
use serde::Serialize;

use crate::comparison::{Family, HeadlineRow};
use crate::rundir::RunDir;

/// The pilot sizes the report prices.
pub const PILOT_SIZES: [usize; 2] = [1_000, 100_000];

/// Thresholds listed in the sweep table (the plots draw every distinct threshold).
const TABLE_THRESHOLDS: [f64; 8] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0];

/// What the user asked the sweep to optimise (`mica report --budget`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PilotOptions {
    /// Most USD per 1,000 images the pilot may spend on API fees: the chosen cascade is then
    /// the most accurate within it, instead of the cheapest that reaches the LLM's accuracy.
    pub budget_usd_per_1000: Option<f64>,
}

/// The sweep of one local model (first stage) against one LLM (second stage).
#[derive(Debug, Clone, Serialize)]
pub struct CascadeSweep {
    pub first: String,
    pub second: String,
    /// Images both arms answered or failed on (the cascade is defined only there).
    pub images: usize,
    /// `FirstAlone`, `SecondAlone`, then one cascade point per distinct threshold, ascending.
    pub points: Vec<SweepPoint>,
    /// The points listed in the report's table: cascades at round thresholds.
    pub table: Vec<SweepPoint>,
    /// The cascade the pilot table prices, and why it was chosen.
    pub chosen: Option<SweepPoint>,
    pub chosen_why: String,
    /// The money axis is meaningful (the LLM's price is known or it has no fee).
    pub usd_known: bool,
    /// Both arms' energy is measured here and comparable.
    pub wh_known: bool,
    /// Why a figure is missing, in words.
    pub notes: Vec<String>,
}

/// One priced option of the pilot table.
#[derive(Debug, Clone, Serialize)]
pub struct PilotRow {
    pub option: String,
    pub images: usize,
    pub accuracy: f64,
    /// Cases a physician must read first-hand: deferred, flagged as low-confidence, or
    /// without an answer.
    pub physician_cases: f64,
    /// API fees; None when unknown.
    pub api_usd: Option<f64>,
    /// Local electricity in USD (training included), when a price per kWh was given.
    pub electricity_usd: Option<f64>,
    /// Energy spent on this machine, training included; None when not measured.
    pub energy_wh: Option<f64>,
    pub co2e_g: Option<f64>,
    /// Wall time at the measured throughput, one process, training included.
    pub wall_s: Option<f64>,
    /// Why a figure is missing or how it was obtained.
    pub notes: Vec<String>,
}

/// The report's business-case figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pilot {
    pub sweeps: Vec<CascadeSweep>,
    /// Per pilot size, the priced options.
    pub tables: Vec<(usize, Vec<PilotRow>)>,
    /// Plain-language sentences, written before the table.
    pub words: Vec<String>,
    pub notes: Vec<String>,
    pub options: PilotOptions,
}

/// Share of `preds` a physician must read first-hand (see [`PilotRow::physician_cases`]).
fn physician_share(preds: &[Prediction]) -> f64 {
    if preds.is_empty() {
        return 0.0;
    }
    let n = preds
        .iter()
        .filter(|p| p.needs_review || p.outcome == mica_core::Outcome::Deferred || p.outcome.is_no_answer())
        .count();
    n as f64 / preds.len() as f64
}

fn energy_per_image(r: &HeadlineRow) -> Option<f64> {
    r.wh_per_1000.filter(|_| r.energy_comparable).map(|w| w / 1000.0)
}

/// gCO2e per Wh, as the row's own figures imply (its carbon intensity).
fn co2_per_wh(r: &HeadlineRow) -> Option<f64> {
    match (r.gco2e_per_1000, r.wh_per_1000) {
        (Some(g), Some(w)) if w > 0.0 => Some(g / w),
        _ => None,
    }
}

fn is_cascade(r: &HeadlineRow) -> bool {
    r.classifier.starts_with("cascade")
}

/// The sweeps and the pilot table of a run.
pub fn build(run: &RunDir, rows: &[HeadlineRow], usd_per_kwh: Option<f64>, options: PilotOptions) -> Pilot {
    let mut pilot = Pilot { options, ..Default::default() };
    let by_slug = |slug: &str| run.classifiers.iter().find(|c| c.slug == slug);
    // The first stage: the most accurate local model that states a confidence.
    let first = rows
        .iter()
        .filter(|r| r.family.is_local_model() && !r.simulated && !is_cascade(r))
        .filter(|r| by_slug(&r.slug).is_some_and(|c| c.predictions.iter().any(|p| p.confidence.is_some())))
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
    let llms: Vec<&HeadlineRow> = rows.iter().filter(|r| r.family == Family::Llm && !is_cascade(r)).collect();
    if llms.iter().any(|r| r.simulated) {
        pilot.notes.push(
            "The simulated LLM is not swept or priced: its answers, energy and cost are not a model's.".into(),
        );
    }
    let Some(first) = first else {
        if !rows.is_empty() {
            pilot.notes.push("No local model with confidences in this run: no cascade to sweep.".into());
        }
        return pilot;
    };
    let first_run = by_slug(&first.slug).expect("filtered above");
    // The real LLMs, each with its predictions; one sweep each, in the same order.
    let arms: Vec<(&HeadlineRow, &[Prediction])> = llms
        .iter()
        .filter(|r| !r.simulated)
        .filter_map(|r| by_slug(&r.slug).map(|c| (*r, c.predictions.as_slice())))
        .collect();
    let live_cascades: Vec<(&HeadlineRow, &[Prediction])> = rows
        .iter()
        .filter(|r| is_cascade(r) && !r.simulated)
        .filter_map(|r| by_slug(&r.slug).map(|c| (r, c.predictions.as_slice())))
        .collect();
    let first_preds = first_run.predictions.as_slice();
    for (llm, preds) in &arms {
        pilot.sweeps.push(sweep_pair(first, first_preds, llm, preds, options));
    }

    for &n in &PILOT_SIZES {
        let mut table = vec![standalone_row(first, first_preds, n, usd_per_kwh, true)];
        for ((llm, preds), sw) in arms.iter().zip(&pilot.sweeps) {
            table.push(standalone_row(llm, preds, n, usd_per_kwh, false));
            if let Some(c) = &sw.chosen {
                table.push(cascade_row(first, llm, c, sw, n, usd_per_kwh));
            }
        }
        for (r, preds) in &live_cascades {
            table.push(standalone_row(r, preds, n, usd_per_kwh, false));
        }
        pilot.tables.push((n, table));
    }
    pilot.words = words(&pilot);
    pilot
}

fn sweep_pair(
    first: &HeadlineRow,
    first_preds: &[Prediction],
    llm: &HeadlineRow,
    llm_preds: &[Prediction],
    options: PilotOptions,
) -> CascadeSweep {
    let mut notes = Vec::new();
    let costs = ArmCosts {
        first_wh_per_image: energy_per_image(first),
        second_wh_per_image: energy_per_image(llm),
    };
    let usd_known = matches!(llm.cost_basis.as_str(), "api-price" | "no-api-fee");
    if !usd_known {
        notes.push(format!("{}'s price is unknown: the sweep's money axis is left out", llm.name));
    }
    let wh_known = costs.first_wh_per_image.is_some() && costs.second_wh_per_image.is_some();
    if !wh_known {
        notes.push(format!(
            "energy per image is not measured here for {}: the energy axis covers only the cascade points that never ask it",
            if costs.first_wh_per_image.is_none() { &first.name } else { &llm.name }
        ));
    }
    let pairs = cascade::join(first_preds, llm_preds);
    let firsts: Vec<Prediction> = pairs.iter().map(|(f, _)| (*f).clone()).collect();
    let thresholds = cascade::candidate_thresholds(&firsts);
    let points = cascade::sweep(first_preds, llm_preds, &thresholds, None, &costs);
    let table_points: Vec<SweepPoint> = cascade::sweep(first_preds, llm_preds, &TABLE_THRESHOLDS, None, &costs)
        .into_iter()
        .filter(|p| p.kind == PointKind::Cascade)
        .collect();
    let cascades: Vec<SweepPoint> = points.iter().filter(|p| p.kind == PointKind::Cascade).cloned().collect();
    let llm_alone = points.iter().find(|p| p.kind == PointKind::SecondAlone).cloned();
    let (chosen, chosen_why) = if !usd_known {
        (None, "no cascade is chosen: the LLM's price is unknown".to_string())
    } else if let Some(b) = options.budget_usd_per_1000 {
        match cascade::best_within_budget(&cascades, b) {
            Some(p) => (Some(p.clone()), format!("the most accurate threshold within the budget of ${b:.2} per 1,000 images")),
            None => (None, format!("no threshold stays within the budget of ${b:.2} per 1,000 images")),
        }
    } else {
        let target = llm_alone.as_ref().map_or(1.0, |p| p.accuracy);
        match cascade::cheapest_reaching(&cascades, target) {
            Some(p) => (Some(p.clone()), format!("the cheapest threshold that reaches the LLM's accuracy ({:.1} %)", target * 100.0)),
            None => {
                let best = cascades.iter().max_by(|a, b| a.accuracy.total_cmp(&b.accuracy).then(b.usd_per_1000.total_cmp(&a.usd_per_1000)));
                (
                    best.cloned(),
                    format!("no threshold reaches the LLM's accuracy ({:.1} %): the most accurate cascade", target * 100.0),
                )
            }
        }
    };
    CascadeSweep {
        first: first.name.clone(),
        second: llm.name.clone(),
        images: pairs.len(),
        points,
        table: table_points,
        chosen,
        chosen_why,
        usd_known,
        wh_known,
        notes,
    }
}

fn standalone_row(r: &HeadlineRow, preds: &[Prediction], n: usize, usd_per_kwh: Option<f64>, local_training: bool) -> PilotRow {
    let scale = n as f64;
    let mut notes = Vec::new();
    let training = r.training.as_ref().filter(|_| local_training);
    let run_wh = energy_per_image(r).map(|w| w * scale);
    let energy_wh = match (run_wh, training) {
        (Some(w), Some(t)) => Some(w + t.energy_wh),
        (Some(w), None) => {
            if r.family.is_local_model() {
                notes.push(match r.family {
                    Family::Onnx => "training cost unknown (trained outside mica)".to_string(),
                    _ => "training not metered".to_string(),
                });
            }
            Some(w)
        }
        (None, _) => {
            notes.push(match r.energy_method.as_deref() {
                Some(m) if m.contains("remote") => "energy at the provider not measured (remote API)".to_string(),
                _ => "energy not measured on this machine".to_string(),
            });
            None
        }
    };
    let co2e_g = match (run_wh, co2_per_wh(r)) {
        (Some(w), Some(k)) => Some(w * k + training.map_or(0.0, |t| t.co2e_g)),
        _ => None,
    };
    let api_usd = match r.cost_basis.as_str() {
        "api-price" => r.usd_per_1000.map(|c| c * scale / 1000.0),
        "no-api-fee" => Some(0.0),
        _ => {
            notes.push("API price unknown".into());
            None
        }
    };
    let wall_s = r.images_per_s.filter(|v| *v > 0.0).map(|ips| scale / ips + training.and_then(|t| t.seconds).unwrap_or(0.0));
    if training.is_some() {
        notes.push("training included once".into());
    }
    PilotRow {
        option: r.name.clone(),
        images: n,
        accuracy: r.accuracy,
        physician_cases: physician_share(preds) * scale,
        api_usd,
        electricity_usd: energy_wh.and_then(|w| usd_per_kwh.map(|p| w / 1000.0 * p)),
        energy_wh,
        co2e_g,
        wall_s,
        notes,
    }
}

fn cascade_row(first: &HeadlineRow, llm: &HeadlineRow, p: &SweepPoint, sw: &CascadeSweep, n: usize, usd_per_kwh: Option<f64>) -> PilotRow {
    let scale = n as f64;
    let mut notes = vec![format!(
        "threshold {:.3}: {}; asks the LLM about {:.1} % of images",
        p.threshold.unwrap_or(0.0),
        sw.chosen_why,
        p.share_second * 100.0
    )];
    let training = first.training.as_ref();
    let energy_wh = p.wh_per_1000.map(|w| w * scale / 1000.0 + training.map_or(0.0, |t| t.energy_wh));
    if energy_wh.is_none() {
        notes.push(format!("energy not measured for {}", llm.name));
    }
    let co2e_g = match (p.wh_per_1000, co2_per_wh(first)) {
        (Some(w), Some(k)) => Some(w * scale / 1000.0 * k + training.map_or(0.0, |t| t.co2e_g)),
        _ => None,
    };
    let wall_s = match (first.images_per_s, llm.images_per_s) {
        (Some(a), Some(b)) if a > 0.0 && b > 0.0 => {
            Some(scale / a + p.share_second * scale / b + training.and_then(|t| t.seconds).unwrap_or(0.0))
        }
        _ => None,
    };
    PilotRow {
        option: format!("cascade {} → {} @ {:.3}", first.name, llm.name, p.threshold.unwrap_or(0.0)),
        images: n,
        accuracy: p.accuracy,
        physician_cases: (p.deferred + p.no_answer) as f64 / p.images.max(1) as f64 * scale,
        api_usd: sw.usd_known.then_some(p.usd_per_1000 * scale / 1000.0),
        electricity_usd: energy_wh.and_then(|w| usd_per_kwh.map(|k| w / 1000.0 * k)),
        energy_wh,
        co2e_g,
        wall_s,
        notes,
    }
}

/// Money in words: cents below a dollar, no false precision above.
pub fn usd_words(x: f64) -> String {
    if x == 0.0 {
        "$0".into()
    } else if x < 1.0 {
        format!("${x:.3}")
    } else if x < 100.0 {
        format!("${x:.2}")
    } else {
        format!("${x:.0}")
    }
}

/// Seconds as the largest sensible unit.
pub fn duration_words(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 48.0 * 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} days", s / 86400.0)
    }
}

fn words(p: &Pilot) -> Vec<String> {
    let mut out = Vec::new();
    let Some((n, rows)) = p.tables.last() else { return out };
    for r in rows {
        let mut parts = vec![format!("{:.1} % accuracy", r.accuracy * 100.0)];
        parts.push(match r.api_usd {
            Some(0.0) => "no API fees".into(),
            Some(x) => format!("{} in API fees", usd_words(x)),
            None => "API fees unknown".into(),
        });
        if let Some(w) = r.energy_wh {
            parts.push(format!("{:.1} Wh on this machine", w));
        }
        if let Some(s) = r.wall_s {
            parts.push(format!("{} of compute", duration_words(s)));
        }
        parts.push(format!("{:.0} cases for a physician to read first-hand", r.physician_cases));
        out.push(format!("For {} images, {}: {}.", thousands(*n), r.option, parts.join(", ")));
    }
    for sw in &p.sweeps {
        if let Some(c) = &sw.chosen {
            out.push(format!(
                "Sending only the images where {} is below {:.3} confidence to {} ({}) gives {:.1} % accuracy and asks the LLM about {:.1} % of images.",
                sw.first,
                c.threshold.unwrap_or(0.0),
                sw.second,
                sw.chosen_why,
                c.accuracy * 100.0,
                c.share_second * 100.0
            ));
        }
    }
    out
}

/// 100000 as "100,000".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Which points a sweep plot draws on `axis`: every cascade threshold, the Pareto front, and
/// the standalone arms and chosen cascade as single marked points.
pub fn plot_series(sw: &CascadeSweep, axis: CostAxis) -> Vec<(String, Vec<(f64, f64)>)> {
    let xy = |p: &SweepPoint| p.cost(axis).map(|c| (c, p.accuracy * 100.0));
    let mut all: Vec<(f64, f64)> = sw.points.iter().filter(|p| p.kind == PointKind::Cascade).filter_map(xy).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let front: Vec<(f64, f64)> = cascade::pareto_front(&sw.points, axis).into_iter().filter_map(xy).collect();
    let mut out = vec![("cascade thresholds".to_string(), all), ("Pareto front".to_string(), front)];
    for (kind, name) in [(PointKind::FirstAlone, &sw.first), (PointKind::SecondAlone, &sw.second)] {
        if let Some(pt) = sw.points.iter().find(|p| p.kind == kind).and_then(xy) {
            out.push((format!("{name} alone"), vec![pt]));
        }
    }
    if let Some(pt) = sw.chosen.as_ref().and_then(xy) {
        out.push((format!("chosen @ {:.3}", sw.chosen.as_ref().and_then(|c| c.threshold).unwrap_or(0.0)), vec![pt]));
    }
    out.retain(|(_, pts)| !pts.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_plain() {
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(usd_words(0.0), "$0");
        assert_eq!(usd_words(0.4567), "$0.457");
        assert_eq!(usd_words(1234.4), "$1234");
        assert_eq!(duration_words(30.0), "30 s");
        assert_eq!(duration_words(600.0), "10 min");
        assert_eq!(duration_words(3.0 * 86400.0), "3.0 days");
    }
}
