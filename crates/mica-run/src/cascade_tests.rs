//! The cascade through the real engine: a CNN trained on the run's split, an OpenAI-format
//! stub server that keeps every request, and the offline sweep checked against real runs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mica_core::{Outcome, Prediction};
use mica_eval::cascade::{sweep, ArmCosts, CascadeRecord, PointKind, Stage, SweepPoint};
use mica_eval::RunMetrics;

use crate::experiment::{ClassifierConfig, Experiment, Kind};
use crate::run::{run_experiment, RunOptions};
use crate::testing::Server;

const PRICES: &str = "[models.\"openai-compatible/m\"]\ninput_per_million = 5.0\noutput_per_million = 15.0\nas_of = \"2026-12\"\n";

/// What the stub LLM answers for one image: a label and a stated confidence.
type Answers = HashMap<String, (String, f64)>;

/// The test images as the LLM client sends them (base64 PNG, 16 px so never downscaled), each
/// with its sample id; and the stub's answer for each: right on two images in three, wrong on
/// the third, confidence 0.9 or 0.55 in turn.
fn wire_images(data: &Path) -> (HashMap<String, String>, Answers) {
    let ds = mica_data::layout::load(data).unwrap();
    let mut samples: Vec<&mica_core::Sample> = ds.samples.iter().collect();
    samples.sort_by(|a, b| a.id.cmp(&b.id));
    let (mut ids, mut answers) = (HashMap::new(), HashMap::new());
    for (k, s) in samples.into_iter().enumerate() {
        let img = mica_data::image::load_gray(&s.source).unwrap();
        let b64 = mica_llm::imgenc::base64(&mica_llm::imgenc::encode_png(&img, 512));
        let truth = s.label;
        let label = if k % 3 == 2 { (truth + 1) % ds.labels.len() } else { truth };
        let conf = if k % 2 == 0 { 0.9 } else { 0.55 };
        answers.insert(b64.clone(), (ds.labels.name(label).to_string(), conf));
        ids.insert(b64, s.id.clone());
    }
    (ids, answers)
}

/// The base64 image a chat request carries (OpenAI's `image_url` data URL).
fn image_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let content = v["messages"].as_array().unwrap().iter().flat_map(|m| m["content"].as_array().cloned().unwrap_or_default());
    for part in content {
        if let Some(url) = part["image_url"]["url"].as_str() {
            return url.split_once("base64,").unwrap().1.to_string();
        }
    }
    panic!("no image in the request: {body}")
}

/// The user text of a chat request.
fn user_text(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let mut out = String::new();
    for m in v["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "user") {
        match &m["content"] {
            serde_json::Value::String(s) => out.push_str(s),
            serde_json::Value::Array(parts) => {
                for p in parts {
                    if let Some(t) = p["text"].as_str() {
                        out.push_str(t);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// An OpenAI-format server answering each image as `answers` says, keeping every request.
fn llm_server(answers: Arc<Answers>, up: Arc<AtomicBool>) -> Server {
    Server::start_routed(move |r| {
        if !up.load(Ordering::SeqCst) {
            return (503, r#"{"error":{"message":"The server is overloaded","type":"server_error"}}"#.into());
        }
        let (label, conf) = answers.get(&image_of(&r.body)).cloned().expect("a test image");
        let content = serde_json::json!({"label": label, "confidence": conf, "rationale": "pattern"}).to_string();
        let body = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
        });
        (200, body.to_string())
    })
}

fn experiment(data: &Path, out: &Path, classifiers: Vec<ClassifierConfig>) -> Experiment {
    let mut exp: Experiment = toml::from_str(&format!(
        "output = \"{}\"\n[dataset]\npath = \"{}\"\nseed = 7\n[energy]\ncountry = \"FRA\"\ntdp_w = 15.0\n[eval]\nbootstrap_resamples = 0\n",
        out.display(),
        data.display()
    ))
    .unwrap();
    exp.classifiers = classifiers;
    exp.validate().unwrap();
    exp
}

/// The LLM settings every LLM entry (and every cascade's LLM stage) of these tests uses.
fn llm_settings(c: &mut ClassifierConfig, prices: &Path) {
    c.filter = Some("none".into());
    c.llm.no_cache = Some(true);
    c.llm.max_attempts = Some(1);
    c.llm.concurrency = Some(2);
    c.llm.prices = Some(prices.to_path_buf());
}

fn cascade(first: &str, url: &str, threshold: f64, second_threshold: Option<f64>, prices: &Path) -> ClassifierConfig {
    let mut c = ClassifierConfig {
        first: Some(first.to_string()),
        second: Some(format!("llm:openai-compatible/m@{url}")),
        threshold: Some(threshold),
        second_threshold,
        ..ClassifierConfig::new(Kind::Cascade)
    };
    llm_settings(&mut c, prices);
    c
}

fn predictions(dir: &Path) -> Vec<Prediction> {
    let mut p = mica_core::read_predictions(dir.join("predictions.jsonl")).unwrap();
    p.sort_by(|a, b| a.sample_id.cmp(&b.sample_id));
    p
}

/// The sample ids a server was asked about, each once.
fn asked(server: &Server, ids: &HashMap<String, String>) -> BTreeSet<String> {
    let bodies = server.bodies();
    let set: BTreeSet<String> = bodies.iter().map(|b| ids[&image_of(b)].clone()).collect();
    assert_eq!(set.len(), bodies.len(), "an image was asked twice");
    set
}

/// A threshold between two distinct confidences of the CNN, near the `q` quantile, so a
/// last-bit difference between two inference runs cannot move an image across it.
fn threshold_between(confs: &[f64], q: f64) -> f64 {
    let mut c = confs.to_vec();
    c.sort_by(f64::total_cmp);
    c.dedup_by(|a, b| (*a - *b).abs() < 1e-4);
    assert!(c.len() >= 3, "the CNN gives too few distinct confidences to split: {c:?}");
    let i = ((c.len() - 1) as f64 * q).floor() as usize;
    let i = i.min(c.len() - 2);
    (c[i] + c[i + 1]) / 2.0
}

#[test]
fn the_llm_is_asked_exactly_about_the_unsure_images_and_the_sweep_equals_real_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    crate::testing::tiny_dataset(&data, 20, 11, 3);
    let prices = tmp.path().join("prices.toml");
    std::fs::write(&prices, PRICES).unwrap();
    let (ids, answers) = wire_images(&data);
    let answers = Arc::new(answers);
    let up = Arc::new(AtomicBool::new(true));
    let (llm_alone, at_t1, at_t2, with_context) = (
        llm_server(answers.clone(), up.clone()),
        llm_server(answers.clone(), up.clone()),
        llm_server(answers.clone(), up.clone()),
        llm_server(answers.clone(), up.clone()),
    );

    // 1. Each arm alone, on the same split: a CNN trained on the run's train split, the LLM.
    let arms_dir = tmp.path().join("arms");
    let cnn = ClassifierConfig { train: Some("small".into()), epochs: Some(2), slug: Some("cnn".into()), ..ClassifierConfig::new(Kind::Cnn) };
    let mut llm = Experiment::classifier_from_flag(&format!("llm:openai-compatible/m@{}", llm_alone.url)).unwrap();
    llm_settings(&mut llm, &prices);
    llm.slug = Some("llm".into());
    run_experiment(&experiment(&data, &arms_dir, vec![cnn, llm]), &RunOptions::default(), &mut |_| {}).unwrap();
    let cnn_preds = predictions(&arms_dir.join("cnn"));
    let llm_preds = predictions(&arms_dir.join("llm"));
    assert_eq!(cnn_preds.len(), llm_preds.len());
    let confs: Vec<f64> = cnn_preds.iter().filter_map(|p| p.confidence).collect();
    let (t1, t2) = (threshold_between(&confs, 0.3), threshold_between(&confs, 0.7));
    assert!(t1 < t2, "{t1} {t2}");

    // 2. Cascades over that CNN (its model directory) and the same LLM, at two thresholds,
    //    and once with the CNN's top two labels in the prompt.
    let model = format!("cnn:{}", arms_dir.join("models").join("cnn").display());
    let mut ctx = cascade(&model, &with_context.url, t1, Some(0.7), &prices);
    ctx.cascade_context = true;
    ctx.slug = Some("context".into());
    let runs_dir = tmp.path().join("cascades");
    let exp = experiment(
        &data,
        &runs_dir,
        vec![
            ClassifierConfig { slug: Some("t1".into()), ..cascade(&model, &at_t1.url, t1, Some(0.7), &prices) },
            ClassifierConfig { slug: Some("t2".into()), ..cascade(&model, &at_t2.url, t2, Some(0.7), &prices) },
            ctx,
        ],
    );
    run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();

    // (a) The second stage was asked exactly about the images whose CNN confidence is below
    //     the threshold, as the server's request log shows.
    for (server, t, slug) in [(&at_t1, t1, "t1"), (&at_t2, t2, "t2"), (&with_context, t1, "context")] {
        let unsure: BTreeSet<String> = cnn_preds
            .iter()
            .filter(|p| p.outcome != Outcome::Answered || p.confidence.is_none_or(|c| c < t))
            .map(|p| p.sample_id.clone())
            .collect();
        assert!(!unsure.is_empty() && unsure.len() < cnn_preds.len(), "{slug}: the threshold {t} splits nothing");
        assert_eq!(asked(server, &ids), unsure, "{slug}: asked about exactly the unsure images");
        let preds = predictions(&runs_dir.join(slug));
        for p in &preds {
            let r = CascadeRecord::of(p).unwrap();
            assert_eq!(r.reached_second(), unsure.contains(&p.sample_id), "{slug} {}", p.sample_id);
            assert_eq!(r.stage == Stage::First, !unsure.contains(&p.sample_id));
        }
    }
    assert_eq!(llm_alone.requests(), cnn_preds.len(), "the LLM arm alone saw every image");

    // (b) The offline sweep over the two standalone arms equals the real cascade runs.
    let points = sweep(&cnn_preds, &llm_preds, &[t1, t2], Some(0.7), &ArmCosts::default());
    assert_eq!((points[0].kind, points[1].kind), (PointKind::FirstAlone, PointKind::SecondAlone));
    let llm_m = RunMetrics::read(arms_dir.join("llm").join("metrics.json")).unwrap();
    assert!((points[1].accuracy - llm_m.all.accuracy).abs() < 1e-12);
    let mut distinct = BTreeSet::new();
    for (point, slug) in points[2..].iter().zip(["t1", "t2"]) {
        let m = RunMetrics::read(runs_dir.join(slug).join("metrics.json")).unwrap();
        let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-12, "{slug} {what}: sweep {a}, run {b}");
        close(point.accuracy, m.all.accuracy, "accuracy");
        close(point.coverage, m.coverage, "coverage");
        assert_eq!(point.accepted_accuracy.is_some(), m.accepted.is_some());
        if let (Some(a), Some(b)) = (point.accepted_accuracy, m.accepted.as_ref()) {
            close(a, b.accuracy, "accepted accuracy");
        }
        assert_eq!(point.deferred, m.outcomes.deferred, "{slug} deferred");
        assert_eq!(point.images, m.images);
        let run_usd = m.cost.map(|c| c.per_image_usd * 1000.0).unwrap_or(0.0);
        close(point.usd_per_1000, run_usd, "USD per 1,000");
        assert!(point.usd_per_1000 > 0.0, "{slug}: some images reached the priced LLM");
        let summary = &m.extra["cascade"];
        close(point.share_second, summary["share_second"].as_f64().unwrap(), "share reaching the LLM");
        let recorded: SweepPoint = serde_json::from_value(summary["point"].clone()).unwrap();
        assert_eq!(&recorded, point, "{slug}: the run's own point");
        assert_eq!(m.extra["family"], "cascade");
        assert_eq!(m.extra["cost_basis"], "api-price");
        assert_eq!(m.extra["cascade_stages"]["second"]["spec"].as_str().unwrap(), format!("llm:openai-compatible/m@{}", if slug == "t1" { &at_t1.url } else { &at_t2.url }));
        distinct.insert(format!("{:.6}/{:.6}", point.share_second, point.accuracy));
    }
    assert_eq!(distinct.len(), 2, "the two thresholds give two different cascades");

    // (c) With --cascade-context the prompt carries the CNN's top two labels, marked as a
    //     second opinion, and nothing that names the file.
    for body in with_context.bodies() {
        let id = &ids[&image_of(&body)];
        let cnn = cnn_preds.iter().find(|p| &p.sample_id == id).unwrap();
        let note = crate::cascade::suggestion(cnn).unwrap();
        let text = user_text(&body);
        assert!(text.contains(&format!("{} {note}", mica_llm::SUGGESTION_MARKER)), "{text}");
        let file = Path::new(id).file_stem().unwrap().to_string_lossy().into_owned();
        assert!(!body.contains(&file) && !body.contains(id.as_str()), "the file name reached the LLM: {body}");
    }
    for body in at_t1.bodies() {
        assert!(!body.contains(mica_llm::SUGGESTION_MARKER), "no suggestion without --cascade-context");
    }
    let ctx_preds = predictions(&runs_dir.join("context"));
    assert!(ctx_preds.iter().filter(|p| CascadeRecord::of(p).unwrap().reached_second()).all(|p| p.extra.contains_key("suggestion")));
}

#[test]
fn a_failed_second_stage_is_asked_again_on_resume_and_finished_images_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    crate::testing::tiny_dataset(&data, 10, 7, 5);
    let prices = tmp.path().join("prices.toml");
    std::fs::write(&prices, PRICES).unwrap();
    let (ids, answers) = wire_images(&data);
    let up = Arc::new(AtomicBool::new(false));
    let server = llm_server(Arc::new(answers), up.clone());
    // The pixel baseline as first stage (its confidences are softmax weights), at a threshold
    // between its confidences so some images go on and some do not.
    let alone = run_experiment(&experiment(&data, &tmp.path().join("alone"), vec![ClassifierConfig::new(Kind::Baseline)]), &RunOptions::default(), &mut |_| {}).unwrap();
    let confs: Vec<f64> = predictions(&alone.classifiers[0].dir).iter().filter_map(|p| p.confidence).collect();
    let t = threshold_between(&confs, 0.5);
    let out = tmp.path().join("run");
    let exp = experiment(&data, &out, vec![cascade("baseline", &server.url, t, None, &prices)]);
    let first = run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
    let c = &first.classifiers[0];
    let asked_first = asked(&server, &ids);
    assert!(!asked_first.is_empty() && asked_first.len() < c.images, "{c:?}");
    assert_eq!(c.failed, asked_first.len(), "a failed LLM fails the cascade's image, no physician case");
    let preds = predictions(&c.dir);
    assert!(preds.iter().filter(|p| p.outcome == Outcome::Failed).all(|p| !p.needs_review && p.http_status == Some(503)));

    up.store(true, Ordering::SeqCst);
    let again = run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
    let c2 = &again.classifiers[0];
    assert_eq!((c2.asked, c2.failed), (asked_first.len(), 0), "only the failed images asked again");
    assert_eq!(server.requests(), 2 * asked_first.len());
    let m = RunMetrics::read(c2.dir.join("metrics.json")).unwrap();
    assert_eq!((m.images, m.outcomes.failed), (c2.images, 0));
    assert_eq!(m.extra["cascade"]["reached_second"].as_u64().unwrap() as usize, asked_first.len());
    // A third run finds everything done and asks nothing.
    let third = run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
    assert!(third.classifiers[0].reused);
    assert_eq!(server.requests(), 2 * asked_first.len());
}

#[test]
fn the_toml_entry_and_the_spec_are_the_same_cascade() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("exp.toml");
    let write = |body: &str| std::fs::write(&p, format!("[dataset]\npath = \"d\"\n[[classifier]]\n{body}")).unwrap();
    write("kind = \"cascade\"\nfirst = \"cnn:runs/cnn\"\nsecond = \"llm:openai/gpt-4o\"\nthreshold = 0.8\nsecond_threshold = 0.6\nfilter = \"none\"\ncascade_context = true\n");
    let typed = Experiment::load(&p).unwrap().classifiers.remove(0);
    write("spec = \"cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.8/0.6\"\nfilter = \"none\"\ncascade_context = true\n");
    let from_spec = Experiment::load(&p).unwrap().classifiers.remove(0);
    assert_eq!(typed, from_spec);
    assert_eq!(typed.spec().unwrap().to_string(), "cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.8/0.6");
    assert_eq!(typed.display_name(), "cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.8/0.6+context");
    assert_eq!(typed.slug(), "cascade-cnn-cnn-llm-openai-gpt-4o-t0.8-t0.6-context");
    // The stages get the entry's settings by family, and their own slugs.
    let second = typed.stage(crate::CascadeStage::Second).unwrap();
    assert_eq!((second.kind, second.filter.as_deref()), (Kind::Llm, Some("none")));
    assert_eq!(second.slug.as_deref(), Some("cascade-cnn-cnn-llm-openai-gpt-4o-t0.8-t0.6-context-second"));
    let first = typed.stage(crate::CascadeStage::First).unwrap();
    assert_eq!((first.kind, first.filter.as_deref()), (Kind::Cnn, None));

    for (body, want) in [
        ("kind = \"cascade\"\nfirst = \"cnn:runs/cnn\"\nsecond = \"llm:openai/gpt-4o\"\n", "needs `first"),
        ("kind = \"cascade\"\nfirst = \"cnn:runs/cnn\"\nsecond = \"llm:openai/gpt-4o\"\nthreshold = 2.0\n", "outside 0..=1"),
        ("kind = \"cascade\"\nfirst = \"cnn:runs/cnn\"\nsecond = \"svm\"\nthreshold = 0.5\n", "two classifier specs"),
        ("kind = \"cascade\"\nfirst = \"cnn:runs/cnn\"\nsecond = \"llm:gpt-4o\"\nthreshold = 0.5\n", "second stage: "),
        ("kind = \"llm\"\nmodel = \"openai/gpt-4o\"\ncascade_context = true\n", "belong to `kind = \"cascade\"`"),
        ("spec = \"cascade:cnn:a,llm:openai/gpt-4o@0.5\"\nthreshold = 0.5\n", "not both"),
        ("kind = \"cascade\"\nfirst = \"cnn:a\"\nsecond = \"llm:openai/gpt-4o\"\nthreshold = 0.5\nthird = \"x\"\n", "third"),
    ] {
        write(body);
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("exp.toml") && e.contains(want), "{body}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn context_needs_a_second_stage_that_reads_a_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    crate::testing::tiny_dataset(&data, 5, 7, 5);
    let mut c = ClassifierConfig {
        first: Some("baseline".into()),
        second: Some("baseline".into()),
        threshold: Some(0.5),
        ..ClassifierConfig::new(Kind::Cascade)
    };
    c.cascade_context = true;
    let exp = experiment(&data, &tmp.path().join("run"), vec![c]);
    let e = run_experiment(&exp, &RunOptions::default(), &mut |_| {}).err().unwrap();
    assert!(e.is_usage() && e.to_string().contains("reads no prompt"), "{e}");
}
