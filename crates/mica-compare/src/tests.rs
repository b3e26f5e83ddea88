//! End-to-end runs over a tiny generated image-folder dataset with the pixel baseline, which
//! trains in milliseconds, so resume and shard behaviour is tested on real files.

use std::path::{Path, PathBuf};

use super::*;

const CLASSES: [&str; 4] = ["bright", "dark", "left", "top"];

/// 4 classes x `per_class` 16x16 PNGs with class-specific patterns plus noise; some noise is
/// strong enough that the baseline makes mistakes, so metrics are not trivially perfect.
pub(crate) fn make_dataset(root: &Path, per_class: usize) {
    let mut state: u64 = 7;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 256) as i32
    };
    for (c, name) in CLASSES.iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let strength = if i % 5 == 0 { 2 } else { 6 };
            let img = image::GrayImage::from_fn(16, 16, |x, y| {
                let base: i32 = match c {
                    0 => 190,
                    1 => 60,
                    2 => if x < 8 { 200 } else { 50 },
                    _ => if y < 8 { 200 } else { 50 },
                };
                let n = (noise() - 128) * strength / 4;
                image::Luma([(base + n).clamp(0, 255) as u8])
            });
            img.save(dir.join(format!("{name}_{i:03}.png"))).unwrap();
        }
    }
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
        for k in ["latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "images_per_s", "wh_per_1000", "gco2e_per_1000", "energy_method"] {
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
    changed.dataset.limit_per_class = Some(1);
    let err = run_experiment(&changed, &RunOptions::default(), &mut |_| {}).unwrap_err();
    assert!(err.is_usage());
    assert!(err.to_string().contains("use a new output directory"), "{err}");
}
