//! Tests over small hand-made run directories.

use std::path::Path;

use mica_core::{LabelSet, Outcome, Prediction, RunManifest, TokenUsage};
use mica_energy::{CarbonConfig, EnergyReport};
use mica_eval::{EvalOptions, RunMetrics};

use super::*;

const LABELS: [&str; 4] = ["glioma", "meningioma", "pituitary", "no_tumor"];

fn labels() -> LabelSet {
    LabelSet::new(LABELS.iter().map(|s| s.to_string()).collect()).unwrap()
}

fn opts() -> EvalOptions {
    EvalOptions {
        bootstrap_resamples: 200,
        ..EvalOptions::default()
    }
}

/// 40 images; `wrong_every` decides how often the classifier errs, `defer_below` makes it an
/// LLM whose filter defers low-confidence cases.
fn predictions(name: &str, wrong_every: usize, llm: bool) -> Vec<Prediction> {
    (0..40)
        .map(|i| {
            let truth = LABELS[i % 4];
            let wrong = i % wrong_every == 0;
            let pred = if wrong { LABELS[(i + 1) % 4] } else { truth };
            let confidence = if wrong { 0.55 } else { 0.6 + (i % 7) as f64 * 0.05 };
            let outcome = if llm && i == 39 {
                Outcome::Unparseable
            } else if llm && confidence < 0.6 {
                Outcome::Deferred
            } else {
                Outcome::Answered
            };
            let mut p = Prediction::new(format!("img{i:03}.png"), name, outcome);
            p.true_label = Some(truth.into());
            if outcome != Outcome::Unparseable {
                p.predicted = Some(pred.into());
                p.confidence = Some(confidence);
            }
            p.latency_ms = if llm { 800.0 + i as f64 } else { 2.0 + (i % 3) as f64 };
            if llm {
                p.tokens = Some(TokenUsage {
                    prompt: 900,
                    completion: 40,
                });
                p.cost_usd = Some(0.0025);
                p.raw_answer = Some(format!("{{\"label\":\"{pred}\"}}"));
            }
            p
        })
        .collect()
}

fn energy(wh: f64, images: usize) -> serde_json::Value {
    let carbon = CarbonConfig::resolve(Some("FRA"), None, None).unwrap();
    let mut e = EnergyReport {
        project_name: "test".into(),
        run_id: "r".into(),
        timestamp: "2026-01-01T00:00:00Z".into(),
        method: "estimated:cpu-time*tdp".into(),
        duration_s: 3.0,
        images,
        components: vec![],
        energy_wh: wh,
        facility_energy_wh: wh,
        co2e_g: carbon.co2e_g(wh * 3600.0),
        per_image: None,
        per_1000_images: None,
        cpu: None,
        gpu: None,
        tracking_mode: "process".into(),
        carbon,
        remote: vec![],
        unavailable: vec![],
        warnings: vec!["CPU energy is an estimate".into()],
        scope: "mica process".into(),
        not_measured: vec![],
        experiment_id: String::new(),
        cpu_count: None,
        ram_total_gb: None,
    };
    e.set_images(images);
    serde_json::to_value(e).unwrap()
}

fn write_classifier(dir: &Path, name: &str, preds: &[Prediction], wh: f64, simulated: bool) -> RunMetrics {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for p in preds {
        text.push_str(&serde_json::to_string(p).unwrap());
        text.push('\n');
    }
    std::fs::write(dir.join("predictions.jsonl"), text).unwrap();
    let mut m = RunMetrics::from_predictions(name, "brain", "test", &labels(), preds, 2.0, &opts()).unwrap();
    m.simulated = simulated;
    m.energy = Some(energy(wh, preds.len()));
    m.write(dir.join("metrics.json")).unwrap();
    m
}

fn write_manifest(root: &Path, slugs: &[&str]) {
    let m = RunManifest {
        mica_version: "0.1.0".into(),
        command: "mica compare --config exp.toml".into(),
        dataset: "data/brain".into(),
        split_manifest: Some("split.csv".into()),
        seed: Some(42),
        created_unix: 1_700_000_000,
        created_utc: None,
        machine: [("cpu".to_string(), "test cpu".to_string())].into_iter().collect(),
        config: serde_json::json!({
            "classifier_slugs": slugs,
            "split_sha256": "abc123",
            "eval": opts(),
        }),
    };
    std::fs::write(root.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn fixture(root: &Path) -> (RunMetrics, RunMetrics) {
    write_manifest(root, &["cnn-small", "llm-sim"]);
    let a = write_classifier(&root.join("cnn-small"), "cnn:small", &predictions("cnn:small", 10, false), 0.02, false);
    let b = write_classifier(&root.join("llm-sim"), "llm:sim/gpt-4o", &predictions("llm:sim/gpt-4o", 3, true), 4.0, true);
    (a, b)
}

#[test]
fn report_figures_equal_metrics_json() {
    let dir = tempfile::tempdir().unwrap();
    let (cnn, llm) = fixture(dir.path());
    let path = render(dir.path(), Format::Json).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let rows = v["headline"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, m) in rows.iter().zip([&cnn, &llm]) {
        // Re-read metrics.json from disk so the comparison is with the file, not memory.
        let slug = row["slug"].as_str().unwrap();
        let file = RunMetrics::read(dir.path().join(slug).join("metrics.json")).unwrap();
        assert_eq!(&file, m);
        assert_eq!(row["accuracy"].as_f64().unwrap(), file.all.accuracy);
        assert_eq!(row["macro_f1"].as_f64().unwrap(), file.all.macro_f1);
        assert_eq!(row["weighted_f1"].as_f64().unwrap(), file.all.weighted_f1);
        let ci = file.all.accuracy_ci.unwrap();
        assert_eq!(row["accuracy_ci"]["lower"].as_f64().unwrap(), ci.lower);
        assert_eq!(row["latency_p50_ms"].as_f64().unwrap(), file.latency_ms.unwrap().p50);
        let e: EnergyReport = serde_json::from_value(file.energy.clone().unwrap()).unwrap();
        assert_eq!(row["wh_per_1000"].as_f64().unwrap(), e.per_1000_images.unwrap().energy_wh);
        let per_class = v["per_class"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["slug"] == slug)
            .unwrap();
        for (i, (label, cm)) in file.all.per_class.iter().enumerate() {
            assert_eq!(per_class["rows"][i]["label"], label);
            assert_eq!(per_class["rows"][i]["f1"].as_f64().unwrap(), cm.f1);
        }
    }
    assert_eq!(rows[1]["coverage"].as_f64().unwrap(), llm.coverage);
    // The simulator's "cost" is no money: never shown as a price.
    assert!(rows[1]["usd_per_1000"].is_null() && rows[1]["cost_basis"] == "simulated", "{}", rows[1]);
    assert_eq!(rows[0]["cost_basis"], "no-api-fee");
    assert!(rows[0]["coverage"].is_null(), "CNN without a filter has no coverage column value");

    // The formatted HTML and Markdown show the same numbers, rounded.
    let html = std::fs::read_to_string(render(dir.path(), Format::Html).unwrap()).unwrap();
    let md = std::fs::read_to_string(render(dir.path(), Format::Markdown).unwrap()).unwrap();
    for m in [&cnn, &llm] {
        let acc = format!("{:.1} (", m.all.accuracy * 100.0);
        assert!(html.contains(&acc) && md.contains(&acc), "accuracy {acc} missing");
        let f1 = format!("{:.3} (", m.all.macro_f1);
        assert!(html.contains(&f1) && md.contains(&f1), "macro F1 {f1} missing");
    }
    let csv = std::fs::read_to_string(render(dir.path(), Format::Csv).unwrap()).unwrap();
    let line = csv.lines().nth(1).unwrap();
    assert!(line.starts_with(&format!("cnn:small,cnn-small,cnn,40,{},", cnn.all.accuracy)), "{line}");
}

#[test]
fn html_is_self_contained_with_inline_plots_and_simulated_stamp() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let html = std::fs::read_to_string(render(dir.path(), Format::Html).unwrap()).unwrap();
    assert!(html.contains("id=\"simulated\""), "SIMULATED banner missing");
    assert!(!html.contains("http://") || !html.contains("src=\"http"), "no network references");
    assert!(!html.contains("<script"), "no scripts");
    assert!(!html.contains("<img"), "figures are inline, not linked");
    for fig in ["accuracy-vs-energy", "accuracy-vs-cost", "latency", "risk-coverage", "reliability", "confusion-cnn-small", "confusion-llm-sim"] {
        assert!(html.contains(&format!("id=\"fig-{fig}\"><svg")), "figure {fig} missing");
        assert!(dir.path().join("plots").join(format!("{fig}.png")).is_file());
    }
    assert!(html.contains("abc123"), "split hash in provenance");
    assert!(html.contains("Pairwise McNemar"));
    assert!(html.contains("decision support") || html.contains("Decision support"));
}

#[test]
fn summary_sentences_follow_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (cnn, llm) = fixture(dir.path());
    let (_, cmp) = load(dir.path()).unwrap();
    let diff = (cnn.all.accuracy - llm.all.accuracy) * 100.0;
    let s = cmp.summary.join("\n");
    assert!(s.contains(&format!("{diff:.1} points more accurate than llm:sim/gpt-4o")), "{s}");
    // The simulator's energy is never put in a ratio with a model's.
    assert!(s.contains("a simulated classifier's energy is not compared"), "{s}");
    assert!(!s.contains("times less energy"), "{s}");
    let acc = llm.accepted.as_ref().unwrap().accuracy;
    let ci = llm.accepted_accuracy_ci.unwrap();
    assert!(
        s.contains(&format!(
            "to {:.1} % accuracy (95 % CI {:.1}–{:.1} %) on the {:.1} % of cases it accepts",
            acc * 100.0,
            ci.lower * 100.0,
            ci.upper * 100.0,
            llm.coverage * 100.0
        )),
        "{s}"
    );
    assert!(s.contains("SIMULATED"));
    let pair = &cmp.mcnemar[0];
    assert_eq!(pair.n, 40);
    assert!((pair.difference_points - diff).abs() < 1e-9, "paired difference equals the headline difference here");
    let text = headline_text(&cmp);
    assert!(text.lines().count() >= 3 && text.contains("cnn:small"), "{text}");

    // The same LLM as a real, locally metered model: now the ratio is given, with both methods.
    let path = dir.path().join("llm-sim/metrics.json");
    let mut m = RunMetrics::read(&path).unwrap();
    m.simulated = false;
    m.write(&path).unwrap();
    let (_, cmp) = load(dir.path()).unwrap();
    let s = cmp.summary.join("\n");
    let ratio = 4.0 / 0.02;
    assert!(s.contains(&format!("uses {ratio:.0} times less energy per image on this machine (estimated:cpu-time*tdp vs estimated:cpu-time*tdp)")), "{s}");
}

#[test]
fn shards_merge_into_the_same_metrics_as_one_run() {
    let whole = tempfile::tempdir().unwrap();
    write_manifest(whole.path(), &["cnn-small"]);
    let preds = predictions("cnn:small", 4, false);
    let full = write_classifier(&whole.path().join("cnn-small"), "cnn:small", &preds, 0.04, false);

    let sharded = tempfile::tempdir().unwrap();
    write_manifest(sharded.path(), &["cnn-small"]);
    let (a, b): (Vec<_>, Vec<_>) = preds.iter().cloned().enumerate().partition(|(i, _)| i % 3 == 0);
    let a: Vec<Prediction> = a.into_iter().map(|x| x.1).collect();
    let b: Vec<Prediction> = b.into_iter().map(|x| x.1).collect();
    let s1 = sharded.path().join("shards").join(shard_dir_name(1, 2));
    write_classifier(&s1.join("cnn-small"), "cnn:small", &a, 0.01, false);
    // Only one of two shards: the report refuses to merge a subset.
    let err = load(sharded.path()).unwrap_err().to_string();
    assert!(err.contains("2-of-2") && err.contains("not present"), "{err}");
    let s2 = sharded.path().join("shards").join(shard_dir_name(2, 2));
    write_classifier(&s2.join("cnn-small"), "cnn:small", &b, 0.03, false);
    let (run, _) = load(sharded.path()).unwrap();
    let merged = &run.classifiers[0].metrics;
    assert_eq!(merged.images, 40);
    assert_eq!(merged.all, full.all, "same confusion, F1 and bootstrap CIs as the unsharded run");
    let e = run.classifiers[0].energy.as_ref().unwrap();
    assert!((e.energy_wh - 0.04).abs() < 1e-12);
    assert!((e.per_1000_images.unwrap().energy_wh - 1.0).abs() < 1e-9);
}

#[test]
fn store_indexes_lists_and_reindexes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("brain");
    std::fs::create_dir_all(&run_dir).unwrap();
    let (cnn, _) = fixture(&run_dir);
    let (run, cmp) = load(&run_dir).unwrap();
    let mut store = Store::open(dir.path().join("db/runs.sqlite")).unwrap();
    let id = store.index(&run, &cmp).unwrap();
    assert_eq!(store.index(&run, &cmp).unwrap(), id, "same directory, same id");
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "brain");
    assert_eq!(list[0].classifiers, 2);
    assert!(list[0].simulated);
    assert_eq!(list[0].best_classifier.as_deref(), Some("cnn:small"));
    let found = store.find("brain").unwrap().unwrap();
    assert_eq!(found.id, id);
    assert!(store.find("nope").unwrap().is_none());
    let results = store.results(id).unwrap();
    assert_eq!(results[0].accuracy, cnn.all.accuracy);
    assert!(store.report_json(id).unwrap().is_some());
}

#[test]
fn bad_inputs_give_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = RunDir::open(dir.path().join("missing")).unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("no such folder"), "{err}");
    let err = RunDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no finished classifier"), "{err}");
    std::fs::create_dir_all(dir.path().join("x")).unwrap();
    std::fs::write(dir.path().join("x/metrics.json"), "{not json").unwrap();
    let err = RunDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("x/metrics.json") && err.contains("not a mica metrics.json"), "{err}");
    assert!(!err.contains('\n'));
    assert!(parse_shard("3/2").is_err() && parse_shard("0/2").is_err() && parse_shard("a").is_err());
    assert_eq!(parse_shard("2/8").unwrap(), (2, 8));
}

#[test]
fn remote_api_energy_is_not_compared_as_if_measured() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let path = dir.path().join("llm-sim/metrics.json");
    let mut m = RunMetrics::read(&path).unwrap();
    m.simulated = false;
    let mut e: EnergyReport = serde_json::from_value(m.energy.clone().unwrap()).unwrap();
    e.method = "estimated:cpu-time*tdp+not-measured:remote-api".into();
    m.energy = Some(serde_json::to_value(e).unwrap());
    m.write(&path).unwrap();
    let (_, cmp) = load(dir.path()).unwrap();
    let s = cmp.summary.join("\n");
    assert!(s.contains("energy at the provider is not measured"), "{s}");
    assert!(!s.contains("times less energy"), "{s}");
    assert!(s.contains("remote API's servers is not measured"), "{s}");
}

#[test]
fn refusals_have_their_own_column_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &["cnn-small", "llm-sim"]);
    write_classifier(&dir.path().join("cnn-small"), "cnn:small", &predictions("cnn:small", 10, false), 0.02, false);
    let mut llm = predictions("llm:sim/gpt-4o", 3, true);
    // Two refusals (no label, the model's words kept) next to the one unparseable answer.
    for p in llm.iter_mut().take(2) {
        p.outcome = Outcome::Refused;
        p.predicted = None;
        p.confidence = None;
        p.raw_answer = Some("I'm sorry, I can't assist with that request.".into());
    }
    let m = write_classifier(&dir.path().join("llm-sim"), "llm:sim/gpt-4o", &llm, 4.0, true);
    assert_eq!((m.outcomes.refused, m.outcomes.unparseable), (2, 1));

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(render(dir.path(), Format::Json).unwrap()).unwrap()).unwrap();
    let row = &v["headline"][1];
    assert_eq!(row["refused_share"].as_f64().unwrap(), 2.0 / 40.0);
    assert_eq!(row["no_answer_share"].as_f64().unwrap(), 3.0 / 40.0, "refusals are no answer");
    assert_eq!(v["headline"][0]["refused_share"].as_f64().unwrap(), 0.0);

    let md = std::fs::read_to_string(render(dir.path(), Format::Markdown).unwrap()).unwrap();
    let html = std::fs::read_to_string(render(dir.path(), Format::Html).unwrap()).unwrap();
    for doc in [&md, &html] {
        assert!(doc.contains("No answer %") && doc.contains("Refused %"));
        assert!(doc.contains("unparseable, refused and failed answers as wrong"));
    }
    let header = md.lines().find(|l| l.contains("No answer %")).unwrap();
    let cells: Vec<&str> = header.split('|').map(str::trim).collect();
    let at = cells.iter().position(|c| *c == "No answer %").unwrap();
    assert_eq!(cells[at + 1], "Refused %", "next to the no-answer column");
    let llm_row = md.lines().find(|l| l.contains("llm:sim/gpt-4o [SIMULATED]") && l.starts_with('|')).unwrap();
    let cells: Vec<&str> = llm_row.split('|').map(str::trim).collect();
    assert_eq!((cells[at], cells[at + 1]), ("7.5", "5.0"), "{llm_row}");

    let csv = std::fs::read_to_string(render(dir.path(), Format::Csv).unwrap()).unwrap();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = head.iter().position(|c| *c == "refused_share").unwrap();
    assert_eq!(head[i - 1], "no_answer_share");
    let llm_line: Vec<&str> = lines.nth(1).unwrap().split(',').collect();
    assert_eq!(llm_line[i], (2.0f64 / 40.0).to_string());

    let (_, cmp) = load(dir.path()).unwrap();
    assert!(cmp.summary.iter().any(|s| s.contains("declined to answer 5.0 %")), "{:?}", cmp.summary);
    assert!(headline_text(&cmp).contains("Refused %"));
}

#[test]
fn wilson_intervals_match_published_values() {
    // statsmodels.stats.proportion.proportion_confint(k, n, method="wilson")
    let c = crate::comparison::wilson(5, 10).unwrap();
    assert!((c.lower - 0.236_593_090_512_564).abs() < 1e-9 && (c.upper - 0.763_406_909_487_436_1).abs() < 1e-9, "{c:?}");
    let c = crate::comparison::wilson(0, 10).unwrap();
    assert!(c.lower == 0.0 && (c.upper - 0.277_532_799_862_889_2).abs() < 1e-9, "{c:?}");
    assert!(crate::comparison::wilson(0, 0).is_none());
}

#[test]
fn break_even_counts_training_energy_and_money_against_a_real_llm() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    // A real (not simulated) LLM with a price, a CNN whose training was metered (1 Wh), and an
    // electricity price in the experiment.
    let llm_path = dir.path().join("llm-sim/metrics.json");
    let mut llm = RunMetrics::read(&llm_path).unwrap();
    llm.simulated = false;
    llm.write(&llm_path).unwrap();
    let cnn_path = dir.path().join("cnn-small/metrics.json");
    let mut cnn = RunMetrics::read(&cnn_path).unwrap();
    cnn.extra.insert(
        "training".into(),
        serde_json::json!({"energy_wh": 1.0, "co2e_g": 0.056, "energy_method": "estimated:cpu-time*tdp", "energy_seconds": 60.0}),
    );
    cnn.write(&cnn_path).unwrap();
    let manifest_path = dir.path().join("manifest.json");
    let mut m: RunManifest = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    m.config["experiment"] = serde_json::json!({"energy": {"electricity_usd_per_kwh": 0.2}});
    std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();

    let (_, cmp) = load(dir.path()).unwrap();
    assert_eq!(cmp.break_even.len(), 1);
    let b = &cmp.break_even[0];
    // CNN 0.02 Wh / 40 images, LLM 4 Wh / 40 images: 1 Wh / (0.1 - 0.0005) Wh per image.
    assert!((b.energy_images.unwrap() - 1.0 / (0.1 - 0.0005)).abs() < 1e-9, "{b:?}");
    // Money: training 1 Wh at $0.2/kWh = $0.0002 against $0.0025 per LLM image.
    let cnn_usd = 0.0005 / 1000.0 * 0.2;
    assert!((b.money_images.unwrap() - 0.0002 / (0.0025 - cnn_usd)).abs() < 1e-12, "{b:?}");
    let s = cmp.summary.join("\n");
    assert!(s.contains("Training included, cnn:small costs less than llm:sim/gpt-4o after 11 images in energy"), "{s}");
    assert!(s.contains("after 1 image in money"), "{s}");
    let md = render::markdown(&cmp, &[]);
    assert!(md.contains("Break-even: a trained CNN against an LLM") && md.contains("0.2 USD/kWh (given)"), "{md}");
    let row = cmp.headline.iter().find(|r| r.slug == "cnn-small").unwrap();
    assert_eq!(row.training.as_ref().unwrap().energy_wh, 1.0);
}

/// A CNN and a real (priced) LLM on the same 40 images: the sweep, the chosen cascade and the
/// pilot's money follow from the hand-counted answers.
#[test]
fn pilot_prices_the_cnn_the_llm_and_the_chosen_cascade() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &["cnn-small", "llm-openai"]);
    // CNN: wrong (at confidence 0.55) on images 0, 10, 20, 30; 36/40 right.
    write_classifier(&dir.path().join("cnn-small"), "cnn:small", &predictions("cnn:small", 10, false), 0.02, false);
    // LLM: wrong only on image 0 (deferred), no answer on image 39; 38/40 right; $0.0025 each.
    write_classifier(&dir.path().join("llm-openai"), "llm:openai/gpt-4o", &predictions("llm:openai/gpt-4o", 1000, true), 4.0, false);
    let (_, cmp) = load(dir.path()).unwrap();
    let sw = &cmp.pilot.sweeps[0];
    assert_eq!(sw.images, 40);
    let alone = |k| sw.points.iter().find(|p| p.kind == k).unwrap();
    assert_eq!(alone(mica_eval::cascade::PointKind::FirstAlone).accuracy, 0.9);
    assert_eq!(alone(mica_eval::cascade::PointKind::SecondAlone).accuracy, 0.95);
    assert!((alone(mica_eval::cascade::PointKind::SecondAlone).usd_per_1000 - 2.5).abs() < 1e-9);
    // Sending the four 0.55 cases (images 0, 10, 20, 30) to the LLM fixes three of them:
    // 39/40 for 4 x $0.0025, the cheapest threshold reaching the LLM's 95 %.
    let chosen = sw.chosen.as_ref().unwrap();
    assert!(sw.chosen_why.contains("cheapest threshold that reaches"), "{}", sw.chosen_why);
    assert_eq!(chosen.accuracy, 0.975);
    assert_eq!(chosen.threshold, Some(0.6));
    assert!((chosen.usd_per_1000 - 0.25).abs() < 1e-9);
    assert_eq!(chosen.share_second, 0.1);

    let (n, rows) = &cmp.pilot.tables[1];
    assert_eq!(*n, 100_000);
    assert_eq!(rows.len(), 3, "CNN, LLM, cascade");
    assert_eq!(rows[0].api_usd, Some(0.0));
    assert!((rows[1].api_usd.unwrap() - 250.0).abs() < 1e-6);
    assert!((rows[2].api_usd.unwrap() - 25.0).abs() < 1e-6);
    // The CNN's physician cases: none flagged or deferred in this fixture; the LLM's: image 0
    // (deferred) and image 39 (no answer), 2 of 40.
    assert!((rows[1].physician_cases - 5_000.0).abs() < 1e-6);
    assert!(cmp.pilot.words.iter().any(|w| w.contains("100,000 images")));

    let html = std::fs::read_to_string(render(dir.path(), Format::Html).unwrap()).unwrap();
    assert!(html.contains("id=\"pilot\"") && html.contains("Cost of a pilot"));
    assert!(html.contains("id=\"fig-cascade-0-usd\"><svg"), "sweep plot missing");
    let md = std::fs::read_to_string(render(dir.path(), Format::Markdown).unwrap()).unwrap();
    assert!(md.contains("## Cost of a pilot") && md.contains("0.600 (chosen"), "{md}");

    // A budget of $0.10 per 1,000 images leaves only the cascades that never ask the LLM.
    let (_, cmp) = load_with(dir.path(), pilot::PilotOptions { budget_usd_per_1000: Some(0.1) }).unwrap();
    let c = cmp.pilot.sweeps[0].chosen.as_ref().unwrap();
    assert_eq!((c.accuracy, c.usd_per_1000), (0.9, 0.0));
    assert!(cmp.pilot.sweeps[0].chosen_why.contains("budget"));
}

#[test]
fn the_simulated_llm_is_neither_swept_nor_priced() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let (_, cmp) = load(dir.path()).unwrap();
    assert!(cmp.pilot.sweeps.is_empty());
    assert!(cmp.pilot.notes.iter().any(|n| n.contains("simulated LLM is not swept")));
    assert!(cmp.pilot.tables.iter().all(|(_, rows)| rows.iter().all(|r| !r.option.contains("SIMULATED"))));
    let html = std::fs::read_to_string(render(dir.path(), Format::Html).unwrap()).unwrap();
    let headline = html.split("id=\"headline\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(!headline.contains("SIMULATED"), "simulated row in the headline table");
    assert!(html.contains("id=\"simulated-arm\""));
}
