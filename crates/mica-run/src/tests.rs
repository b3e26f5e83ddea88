//! End-to-end runs over a tiny generated image-folder dataset with the pixel baseline, which
//! trains in milliseconds, so resume and shard behaviour is tested on real files.

use std::path::{Path, PathBuf};

use super::*;

fn make_dataset(root: &Path, per_class: usize) {
    crate::testing::tiny_dataset(root, per_class, 7, 5);
}

fn experiment(data: &Path, out: &Path) -> Experiment {
    let text = format!(
        r#"
        name = "tiny"
        output = "{}"
        [dataset]
        path = "{}"
        seed = 7
        [[classifier]]
        kind = "baseline"
        [[classifier]]
        kind = "baseline"
        slug = "baseline-b"
        limit_per_class = 2
        [energy]
        country = "FRA"
        tdp_w = 15.0
        [eval]
        bootstrap_resamples = 100
        "#,
        out.display(),
        data.display()
    );
    let exp: Experiment = toml::from_str(&text).unwrap();
    exp.validate().unwrap();
    exp
}

/// The parts of a report that must not depend on timing: every accuracy, F1, CI, confusion
/// matrix, per-class row, McNemar test and image count.
fn deterministic(dir: &Path) -> serde_json::Value {
    let (_, cmp) = mica_report::load(dir).unwrap();
    let mut v = serde_json::to_value(&cmp).unwrap();
    for row in v["headline"].as_array_mut().unwrap() {
        let o = row.as_object_mut().unwrap();
        for k in [
            "latency_p50_ms",
            "latency_p90_ms",
            "latency_p99_ms",
            "first_latency_ms",
            "wall_s",
            "images_per_s",
            "wh_per_1000",
            "gco2e_per_1000",
            "energy_method",
        ] {
            o.remove(k);
        }
    }
    let mut confusions = Vec::new();
    for c in std::fs::read_dir(dir).unwrap().flatten() {
        let m = c.path().join("metrics.json");
        if m.is_file() {
            let metrics = mica_eval::RunMetrics::read(&m).unwrap();
            confusions.push((c.file_name().to_string_lossy().into_owned(), metrics.all.confusion.matrix, metrics.images));
        }
    }
    confusions.sort();
    serde_json::json!({
        "headline": v["headline"],
        "per_class": v["per_class"],
        "mcnemar": v["mcnemar"],
        "confusions": confusions,
        "summary_first": v["summary"][0],
    })
}

fn run(exp: &Experiment, opts: &RunOptions) -> RunOutcome {
    run_experiment(exp, opts, &mut |_| {}).unwrap()
}

#[test]
fn compare_writes_a_run_directory_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 20);
    let out = tmp.path().join("runs/tiny");
    let exp = experiment(&data, &out);
    let mut events = Vec::new();
    let outcome = run_experiment(
        &exp,
        &RunOptions {
            report: true,
            store: Some(tmp.path().join("store.sqlite")),
            ..Default::default()
        },
        &mut |e| events.push(e),
    )
    .unwrap();
    assert_eq!(outcome.test_images, 16, "20 % of 20 per class x 4 classes");
    for f in ["manifest.json", "split.csv", "baseline-centroid/predictions.jsonl", "baseline-centroid/metrics.json", "baseline-centroid/energy.csv", "report.html", "report.md"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let full = mica_eval::RunMetrics::read(out.join("baseline-centroid/metrics.json")).unwrap();
    let limited = mica_eval::RunMetrics::read(out.join("baseline-b/metrics.json")).unwrap();
    assert_eq!(full.images, 16);
    assert_eq!(limited.images, 8, "limit_per_class = 2 over 4 classes");
    assert!(full.all.accuracy > 0.5, "baseline separates the patterns: {}", full.all.accuracy);
    assert!(full.energy.is_some(), "each classifier has its energy window");
    assert!(outcome.store_id.is_some());
    // Provenance: the report's split hash is `sha256sum split.csv`.
    let (_, cmp) = mica_report::load(&outcome.dir).unwrap();
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(outcome.dir.join("split.csv")).unwrap()))
    };
    assert_eq!(cmp.provenance.split_hash.as_deref(), Some(sha.as_str()));
    assert!(events.iter().any(|e| matches!(e, Event::Done { reused: false, .. })));
    // Running again reuses everything.
    let mut reused = 0;
    run_experiment(&exp, &RunOptions::default(), &mut |e| {
        if let Event::Done { reused: true, .. } = e {
            reused += 1;
        }
    })
    .unwrap();
    assert_eq!(reused, 2);
}

#[test]
fn killed_then_resumed_compare_gives_the_same_report() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 20);
    let whole = tmp.path().join("whole");
    run(&experiment(&data, &whole), &RunOptions::default());

    let killed = tmp.path().join("killed");
    let exp = experiment(&data, &killed);
    run(&exp, &RunOptions::default());
    // Recreate exactly what a kill mid-classifier leaves: no metrics.json for the first
    // classifier, half its prediction lines, a torn last line; the second never started.
    let c = killed.join("baseline-centroid");
    std::fs::remove_file(c.join("metrics.json")).unwrap();
    let text = std::fs::read_to_string(c.join("predictions.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut cut = lines[..lines.len() / 2].join("\n");
    cut.push('\n');
    cut.push_str(&lines[lines.len() / 2][..20]);
    std::fs::write(c.join("predictions.jsonl"), cut).unwrap();
    std::fs::remove_dir_all(killed.join("baseline-b")).unwrap();

    let mut starts = Vec::new();
    run_experiment(&exp, &RunOptions::default(), &mut |e| {
        if let Event::Start { slug, todo, total, .. } = e {
            starts.push((slug, todo, total));
        }
    })
    .unwrap();
    assert_eq!(starts[0], ("baseline-centroid".to_string(), 8, 16), "only the unfinished half is redone");
    let lines = std::fs::read_to_string(c.join("predictions.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 16, "no duplicates, no torn line");
    assert_eq!(deterministic(&whole), deterministic(&killed));
}

#[test]
fn shards_cover_the_test_set_and_merge_to_the_unsharded_result() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 20);
    let whole = tmp.path().join("whole");
    run(&experiment(&data, &whole), &RunOptions::default());
    let sharded: PathBuf = tmp.path().join("sharded");
    let exp = experiment(&data, &sharded);
    let mut sizes = Vec::new();
    for k in 1..=3 {
        let o = run(&exp, &RunOptions { shard: Some((k, 3)), ..Default::default() });
        assert!(o.report.is_none(), "a shard writes no report");
        sizes.push(o.test_images);
    }
    assert_eq!(sizes.iter().sum::<usize>(), 16);
    assert_eq!(deterministic(&whole), deterministic(&sharded));
}

#[test]
fn a_changed_experiment_refuses_to_resume_into_the_old_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    let out = tmp.path().join("run");
    let exp = experiment(&data, &out);
    run(&exp, &RunOptions::default());
    let mut changed = exp.clone();
    changed.eval.bootstrap_resamples = 50;
    let err = run_experiment(&changed, &RunOptions::default(), &mut |_| {}).unwrap_err();
    assert!(err.is_usage());
    assert!(err.to_string().contains("use a new output directory"), "{err}");
}

use crate::testing::{completion, Server, INVALID_KEY};

fn llm_experiment(data: &Path, out: &Path, url: &str) -> Experiment {
    let mut exp = experiment(data, out);
    let mut c = Experiment::classifier_from_flag(&format!("llm:openai-compatible/m@{url}")).unwrap();
    c.filter = Some("none".into());
    c.llm.no_cache = Some(true);
    c.llm.max_attempts = Some(1);
    c.llm.concurrency = Some(2);
    exp.classifiers = vec![c];
    exp
}

#[test]
fn a_key_the_server_refuses_stops_the_run_within_a_handful_of_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 20);
    let server = Server::start(|_| (401, INVALID_KEY.to_string()));
    let out = tmp.path().join("run");
    let err = run_experiment(&llm_experiment(&data, &out, &server.url), &RunOptions::default(), &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RunError::FailFast { status: Some(401), .. }), "{msg}");
    assert!(msg.contains("HTTP 401") && msg.contains("Incorrect API key"), "{msg}");
    assert!(server.requests() <= run::FAIL_FAST_AFTER, "{} requests", server.requests());
    let recorded = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("predictions.jsonl").is_file())
        .map(|e| std::fs::read_to_string(e.path().join("predictions.jsonl")).unwrap().lines().count())
        .sum::<usize>();
    assert_eq!(recorded, 0, "nothing recorded for the refused images");
}

#[test]
fn failed_images_are_asked_again_on_resume() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    // Down (503, retryable, one attempt each) for the first run, answering afterwards.
    let up = std::sync::Arc::new(AtomicBool::new(false));
    let flag = up.clone();
    let server = Server::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            (200, completion("bright"))
        } else {
            (503, r#"{"error":{"message":"The server is overloaded","type":"server_error"}}"#.into())
        }
    });
    let out = tmp.path().join("run");
    let exp = llm_experiment(&data, &out, &server.url);
    let first = run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
    let c = first.classifiers[0].clone();
    assert!(c.all_failed() && c.images == 8, "{c:?}");
    assert_eq!(server.requests(), 8);

    up.store(true, Ordering::SeqCst);
    let keep = RunOptions { failed: mica_core::FailedOnResume::Keep, ..Default::default() };
    let kept = run_experiment(&exp, &keep, &mut |_| {}).unwrap();
    assert!(kept.classifiers[0].reused && server.requests() == 8, "--keep-failed asks nothing");

    let again = run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
    let c2 = &again.classifiers[0];
    assert_eq!((c2.asked, c2.failed, server.requests()), (8, 0, 16), "every failed image asked again, once");
    let log = std::fs::read_to_string(c2.dir.join("predictions.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 16, "the failures stay on record");
    let preds = mica_core::read_predictions(c2.dir.join("predictions.jsonl")).unwrap();
    assert!(preds.iter().all(|p| p.outcome == mica_core::Outcome::Answered), "readers see the answers");
    let m = mica_eval::RunMetrics::read(c2.dir.join("metrics.json")).unwrap();
    assert_eq!((m.images, m.outcomes.failed), (8, 0));
}

#[test]
fn a_second_writer_is_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 5);
    let out = tmp.path().join("run");
    let exp = experiment(&data, &out);
    let held = mica_core::RunRoot::new(&out).lock().unwrap();
    let err = run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap_err();
    assert!(err.is_usage() && err.to_string().contains("another mica process"), "{err}");
    assert!(!out.join("manifest.json").exists(), "nothing written");
    drop(held);
    run(&exp, &RunOptions::default());
}

#[test]
fn no_prompt_of_any_context_mode_carries_a_label_like_column() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    // Metadata built to tempt: a diagnosis column, free text that names the class, a harmless
    // age, and a `context` column that is allowed through in image+clinical mode.
    let mut meta = String::from("path,diagnosis,notes,age,context\n");
    for class in crate::testing::CLASSES {
        for i in 0..10 {
            meta.push_str(&format!(
                "{class}/{class}_{i:03}.png,proven-{class}-case-{i},report 9931 says {class},{},cough for {i} days\n",
                40 + i
            ));
        }
    }
    std::fs::write(data.join("metadata.csv"), meta).unwrap();
    let server = Server::start(|_| (200, completion("bright")));
    let mut exp = llm_experiment(&data, &tmp.path().join("run"), &server.url);
    exp.classifiers = ["image", "image+clinical", "image+findings", "findings"]
        .iter()
        .map(|mode| {
            let mut c = exp.classifiers[0].clone();
            c.context = Some(mode.to_string());
            c.slug = Some(format!("llm-{mode}"));
            c
        })
        .collect();
    exp.dataset.context_columns = vec!["age".into()];
    run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
    let bodies = server.bodies();
    assert_eq!(bodies.len(), 4 * 8, "every mode asked about every test image");
    for b in &bodies {
        assert!(!b.contains("proven-") && !b.contains("9931"), "a label-like value reached a prompt: {b}");
    }
    let clinical = bodies.iter().filter(|b| b.contains("cough for")).count();
    assert_eq!(clinical, 8, "the context column and the age reach image+clinical prompts only");
    assert!(bodies.iter().filter(|b| b.contains("age: 4")).count() == 8);

    // Asking for the label-like columns is refused, naming the column, before anything is sent.
    for col in ["diagnosis", "notes"] {
        let mut bad = exp.clone();
        bad.output = Some(tmp.path().join(format!("bad-{col}")));
        bad.dataset.context_columns = vec![col.into()];
        let before = server.requests();
        let err = run_experiment(&bad, &RunOptions::default(), &mut |_| {}).unwrap_err();
        assert!(err.is_usage() && err.to_string().contains(&format!("column `{col}`")), "{err}");
        assert_eq!(server.requests(), before);
    }

    // By explicit request it goes through, and the run says so in its metrics.
    let mut forced = exp.clone();
    forced.output = Some(tmp.path().join("forced"));
    forced.classifiers.truncate(2);
    forced.dataset.context_columns = vec!["diagnosis".into()];
    forced.dataset.allow_label_like_context = true;
    let out = run_experiment(&forced, &RunOptions::default(), &mut |_| {}).unwrap();
    let m = mica_eval::RunMetrics::read(out.classifiers[1].dir.join("metrics.json")).unwrap();
    assert_eq!(m.extra["label_like_context"], serde_json::json!(["diagnosis"]));
    let (_, cmp) = mica_report::load(&out.dir).unwrap();
    let stamped: Vec<String> = cmp.headline.iter().map(|r| mica_report::render::headline_cells(r)[0].clone()).collect();
    assert!(stamped.iter().any(|n| n.ends_with("[LABEL-LIKE CONTEXT]")), "{stamped:?}");
    assert!(stamped.iter().any(|n| !n.contains("LABEL-LIKE")), "only the classifier shown the column");
    assert!(cmp.summary.iter().any(|s| s.starts_with("LABEL-LIKE CONTEXT:")), "{:?}", cmp.summary);
}

#[test]
fn a_comparison_reports_an_acquisition_shortcut_in_plain_words() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    let out = tmp.path().join("plain");
    run(&experiment(&data, &out), &RunOptions::default());
    let (_, cmp) = mica_report::load(&out).unwrap();
    // These phantoms' classes are brightness patterns, so mean intensity is flagged (rightly:
    // it is what tells them apart); the size is the same for all.
    assert!(!cmp.summary.iter().any(|s| s.contains("SHORTCUT: Native width")), "{:?}", cmp.summary);

    // Re-save two classes at another size: the size now tells the class group.
    for class in ["left", "top"] {
        for e in std::fs::read_dir(data.join(class)).unwrap().flatten() {
            let img = image::open(e.path()).unwrap().to_luma8();
            image::imageops::resize(&img, 24, 16, image::imageops::FilterType::Nearest).save(e.path()).unwrap();
        }
    }
    let out = tmp.path().join("tied");
    run(&experiment(&data, &out), &RunOptions::default());
    let (_, cmp) = mica_report::load(&out).unwrap();
    assert!(
        cmp.summary.iter().any(|s| s.starts_with("SHORTCUT: Native width alone predicts the class with")),
        "{:?}",
        cmp.summary
    );
}

#[test]
fn credentials_in_a_server_address_are_written_nowhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 5);
    let server = Server::start(|_| (503, r#"{"error":{"message":"overloaded","type":"server_error"}}"#.into()));
    let url = server.url.replace("http://", "http://user:s3cret-pw@") + "/?api_key=tok-123";
    let out = tmp.path().join("run");
    let exp = llm_experiment(&data, &out, &url);
    run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
    assert!(server.requests() > 0);
    let mut files = vec![];
    let mut stack = vec![out.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        assert!(!text.contains("s3cret") && !text.contains("tok-123"), "{} holds a credential", f.display());
    }
    // Resuming with the same address is the same run.
    run_experiment(&exp, &RunOptions::default(), &mut |_| {}).unwrap();
}

/// A priced OpenAI-compatible model "m" at the stub, answering from a shared response cache.
fn cached_llm_experiment(data: &Path, out: &Path, url: &str, cache: &Path, prices: &Path) -> Experiment {
    let mut exp = llm_experiment(data, out, url);
    let c = &mut exp.classifiers[0];
    c.llm.no_cache = Some(false);
    c.llm.cache_dir = Some(cache.to_path_buf());
    c.llm.prices = Some(prices.to_path_buf());
    exp
}

#[test]
fn a_fully_cached_rerun_claims_no_live_call_no_cost_and_no_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    let prices = tmp.path().join("prices.toml");
    std::fs::write(&prices, "[models.\"openai-compatible/m\"]\ninput_per_million = 5.0\noutput_per_million = 15.0\nas_of = \"2026-12\"\n").unwrap();
    let cache = tmp.path().join("cache");
    let server = Server::start(|_| (200, completion("bright")));

    let first = cached_llm_experiment(&data, &tmp.path().join("first"), &server.url, &cache, &prices);
    let one = run(&first, &RunOptions::default());
    let asked = server.requests();
    assert_eq!(asked, 8);
    let m1 = mica_eval::RunMetrics::read(one.classifiers[0].dir.join("metrics.json")).unwrap();
    assert_eq!((m1.live, m1.cached), (8, 0));
    let cost1 = m1.cost.unwrap();
    assert!((cost1.total_usd - 8.0 * (100.0 * 5.0 + 20.0 * 15.0) / 1e6).abs() < 1e-12, "{cost1:?}");
    assert_eq!(m1.extra["cost_basis"], "api-price");

    // The same images into a new run directory: every answer comes from the cache.
    let second = cached_llm_experiment(&data, &tmp.path().join("second"), &server.url, &cache, &prices);
    let two = run(&second, &RunOptions::default());
    assert_eq!(server.requests(), asked, "a fully cached rerun makes no request");
    let m2 = mica_eval::RunMetrics::read(two.classifiers[0].dir.join("metrics.json")).unwrap();
    assert_eq!((m2.live, m2.cached, m2.images), (0, 8, 8));
    assert_eq!(m2.throughput_images_per_s, None, "no throughput claim from replays");
    let cost2 = m2.cost.unwrap();
    assert_eq!(cost2.total_usd, 0.0, "replays cost nothing in this run");
    assert!((cost2.replayed_usd - cost1.total_usd).abs() < 1e-12, "their original cost is kept: {cost2:?}");
    let energy = m2.energy.as_ref().unwrap();
    assert!(energy["per_1000_images"].is_null(), "no per-image energy from replays: {energy}");

    let (_, cmp) = mica_report::load(&two.dir).unwrap();
    let row = &cmp.headline[0];
    assert_eq!((row.live, row.cached, row.images_per_s), (0, 8, None));
    assert_eq!(row.usd_per_1000, None);
    assert!(cmp.summary.iter().any(|s| s.contains("0 live calls") && s.contains("no cost")), "{:#?}", cmp.summary);
    let md = mica_report::render::markdown(&cmp, &[]);
    assert!(md.contains("– (all cached)"), "{md}");
}

#[test]
fn a_model_server_on_this_machine_is_metered_with_the_run_and_never_called_remote() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    let server = Server::start(|_| (200, completion("bright")));
    let out = tmp.path().join("run");
    let mut exp = llm_experiment(&data, &out, &server.url);
    exp.classifiers.insert(0, Experiment::classifier_from_flag("baseline").unwrap());
    let outcome = run(&exp, &RunOptions::default());
    let m = mica_eval::RunMetrics::read(outcome.classifiers[1].dir.join("metrics.json")).unwrap();
    assert_eq!(m.extra["cost_basis"], "no-api-fee", "an unpriced model served here has no API fee");
    let energy: mica_energy::EnergyReport = serde_json::from_value(m.energy.clone().unwrap()).unwrap();
    assert!(energy.remote.is_empty(), "a loopback server is not a remote API: {energy:?}");
    assert!(!energy.method.contains("remote"), "{}", energy.method);
    let (_, cmp) = mica_report::load(&outcome.dir).unwrap();
    let llm = &cmp.headline[1];
    if energy.method.contains("not-measured:local-server") {
        assert!(!llm.energy_comparable && llm.wh_per_1000.is_none());
        assert!(!cmp.summary.iter().any(|s| s.contains("times less energy") || s.contains("times more energy")), "{:#?}", cmp.summary);
    } else {
        // Measured: the figure says it covers the server (here the stub inside this process).
        assert!(energy.scope.contains("server") || energy.scope.contains("machine"), "{}", energy.scope);
    }
    assert_eq!(m.latency_kind, Some(mica_eval::LatencyKind::PerRequest));
    assert!(m.first_latency_ms.is_some());
}

#[test]
fn three_classifiers_get_holm_adjusted_mcnemar_tests() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 12);
    let out = tmp.path().join("run");
    let mut exp = experiment(&data, &out);
    let mut third = Experiment::classifier_from_flag("baseline").unwrap();
    third.slug = Some("baseline-c".into());
    third.limit_per_class = Some(1);
    exp.classifiers.push(third);
    let outcome = run(&exp, &RunOptions::default());
    let (_, cmp) = mica_report::load(&outcome.dir).unwrap();
    assert_eq!(cmp.mcnemar.len(), 3);
    let raw: Vec<f64> = cmp.mcnemar.iter().map(|t| t.p_value).collect();
    let holm = mica_eval::holm(&raw);
    for (t, h) in cmp.mcnemar.iter().zip(&holm) {
        assert_eq!(t.p_holm, *h);
        assert!(t.p_holm >= t.p_value);
        assert_eq!(t.significant, t.p_holm < 0.05);
    }
    let md = mica_report::render::markdown(&cmp, &[]);
    assert!(md.contains("p (Holm-adjusted)") && md.contains("Holm-adjusted across all 3 pairs"), "{md}");
    // The CNN-free summary still ranks on the images every classifier saw.
    assert_eq!(cmp.shared_images, 4, "limit 1 per class x 4 classes");
    assert!(cmp.summary[0].contains("test images every classifier saw"), "{}", cmp.summary[0]);
}

#[test]
fn the_model_that_answered_is_recorded_and_a_mid_run_snapshot_change_is_warned() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let server = Server::start(move |_| {
        // The alias moves to a new snapshot after the first three answers.
        let snapshot = if n.fetch_add(1, Ordering::SeqCst) < 3 { "m-2024-08-06" } else { "m-2024-11-20" };
        let body = completion("bright").replace(r#""model":"m""#, &format!(r#""model":"{snapshot}","system_fingerprint":"fp_1""#));
        (200, body)
    });
    let out = tmp.path().join("run");
    let outcome = run(&llm_experiment(&data, &out, &server.url), &RunOptions::default());
    let m = mica_eval::RunMetrics::read(outcome.classifiers[0].dir.join("metrics.json")).unwrap();
    let prov = &m.extra["provenance"];
    assert_eq!(prov["resolved_models"]["m-2024-08-06"], 3, "{prov}");
    assert_eq!(prov["resolved_models"]["m-2024-11-20"], 5, "{prov}");
    assert_eq!(prov["system_fingerprints"]["fp_1"], 8, "{prov}");
    assert_eq!(prov["finish_reasons"]["stop"], 8, "{prov}");
    let warnings = m.extra["provenance_warnings"].as_array().unwrap();
    assert!(warnings[0].as_str().unwrap().contains("the model changed mid-run"), "{warnings:?}");
    let (_, cmp) = mica_report::load(&outcome.dir).unwrap();
    assert!(cmp.provenance.models[0].contains("answered by m-2024-08-06 (3), m-2024-11-20 (5)"), "{:?}", cmp.provenance.models);
    assert_eq!(cmp.provenance.model_warnings.len(), 1);
    let preds = mica_core::read_predictions(outcome.classifiers[0].dir.join("predictions.jsonl")).unwrap();
    assert!(preds.iter().all(|p| p.resolved_model.is_some() && p.finish_reason.as_deref() == Some("stop")));
}

#[test]
fn a_local_server_that_cannot_be_metered_is_labelled_and_never_in_a_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10);
    let server = Server::start(|_| (200, completion("bright")));
    let out = tmp.path().join("run");
    let mut exp = llm_experiment(&data, &out, &server.url);
    exp.classifiers.insert(0, Experiment::classifier_from_flag("baseline").unwrap());
    // No RAPL, no NVML and a /proc that shows no process: nothing can see the server.
    let empty_proc = tmp.path().join("proc");
    std::fs::create_dir_all(&empty_proc).unwrap();
    let opts = RunOptions {
        meter: mica_energy::MeterConfig {
            powercap_root: tmp.path().join("no-powercap"),
            try_nvml: false,
            proc_root: empty_proc,
            ..Default::default()
        },
        ..Default::default()
    };
    let outcome = run(&exp, &opts);
    let m = mica_eval::RunMetrics::read(outcome.classifiers[1].dir.join("metrics.json")).unwrap();
    let energy: mica_energy::EnergyReport = serde_json::from_value(m.energy.clone().unwrap()).unwrap();
    assert!(energy.method.contains("not-measured:local-server"), "{}", energy.method);
    assert!(!energy.is_complete());
    let (_, cmp) = mica_report::load(&outcome.dir).unwrap();
    let llm = &cmp.headline[1];
    assert!(!llm.energy_comparable && llm.wh_per_1000.is_none(), "{llm:?}");
    let s = cmp.summary.join("\n");
    assert!(!s.contains("less energy per image") && !s.contains("more energy per image"), "{s}");
    assert!(s.contains("not-measured:local-server"), "{s}");
    let md = mica_report::render::markdown(&cmp, &[]);
    assert!(md.contains("NOT in the totals: local server on port"), "{md}");
}
