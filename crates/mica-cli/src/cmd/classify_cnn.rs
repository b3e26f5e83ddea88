//! `mica classify --classifier cnn:RUN_DIR` (owned by the CNN work).
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use mica_cnn::CnnClassifier;
use mica_core::{Classifier, Dataset, Outcome, Prediction, PredictionLog, Sample, Split};

use crate::exit::usage;

/// Flags that only the CNN arm reads.
#[derive(clap::Args, Debug, Default)]
pub struct CnnArgs {
    /// Inference batch size [default: 32].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Flag predictions whose confidence is below this for physician review
    /// (`needs_review` in predictions.jsonl).
    #[arg(long, default_value_t = 0.6)]
    pub review_below: f64,
}

/// Loads a dataset and gives every image a split (the layout's own where it has one, else a
/// seeded stratified one), so train and classify see the same images in the same splits.
pub fn load_split_dataset(path: &Path, seed: u64) -> anyhow::Result<Dataset> {
    if !path.exists() {
        return Err(usage(format!("{}: no such dataset folder", path.display())));
    }
    let mut ds = mica_data::load(path).map_err(data_err)?;
    // Keeps an official split (carving val out of train where it lacks one); splits the rest.
    let cfg = mica_data::split::SplitConfig { seed, ..Default::default() };
    mica_data::split::assign(&mut ds, &cfg).map_err(data_err)?;
    Ok(ds)
}

fn data_err(e: mica_data::DataError) -> anyhow::Error {
    if e.is_usage() {
        usage(e.to_string())
    } else {
        anyhow::Error::new(e)
    }
}

pub fn run(
    common: &super::classify::ClassifyArgs,
    run_dir: &std::path::Path,
) -> anyhow::Result<super::classify::ClassifyOutcome> {
    let split: Split = common.split.parse().map_err(usage)?;
    if !run_dir.is_dir() {
        return Err(usage(format!("{}: no such CNN run directory", run_dir.display())));
    }
    if let Some(b) = common.cnn.batch {
        if b == 0 {
            return Err(usage("--batch must be at least 1"));
        }
    }
    if !(0.0..=1.0).contains(&common.cnn.review_below) {
        return Err(usage("--review-below must be between 0 and 1"));
    }
    let ds = load_split_dataset(&common.dataset, common.seed)?;
    let mut clf = CnnClassifier::load(run_dir, &mut |m| eprintln!("note: {m}"))?;
    clf.meta().check_labels(&ds.labels, run_dir)?;
    clf.batch = common.cnn.batch.unwrap_or(32);
    clf.review_below = Some(common.cnn.review_below);

    let mut samples: Vec<&Sample> = ds.split(split).collect();
    if let Some(n) = common.limit_per_class {
        let mut counts = vec![0usize; ds.labels.len()];
        samples.retain(|s| {
            let c = &mut counts[s.label.min(ds.labels.len() - 1)];
            *c += 1;
            *c <= n
        });
    }
    if samples.is_empty() {
        anyhow::bail!("{}: the {split} split is empty", common.dataset.display());
    }
    let out = common.out.clone().unwrap_or_else(|| run_dir.join(format!("classify-{split}")));
    let outcome = classify_into(&mut clf, &ds, split, &samples, &out)?;
    Ok(outcome)
}

/// Classifies `samples` into `out/predictions.jsonl` (resuming past finished images), then
/// writes `out/metrics.json` and prints throughput and latency. Shared with `mica demo`.
pub fn classify_into(
    clf: &mut CnnClassifier,
    ds: &Dataset,
    split: Split,
    samples: &[&Sample],
    out: &Path,
) -> anyhow::Result<super::classify::ClassifyOutcome> {
    let log_path = out.join("predictions.jsonl");
    let (mut log, existing) = PredictionLog::open(&log_path)?;
    let name = clf.name().to_string();
    let todo: Vec<Sample> = samples
        .iter()
        .filter(|s| !log.is_done(&name, &s.id))
        .map(|s| (*s).clone())
        .collect();
    if !existing.is_empty() && !todo.is_empty() {
        eprintln!("note: resuming: {} images already classified", samples.len() - todo.len());
    }
    clf.warm_up();
    let t0 = Instant::now();
    let mut fresh = 0usize;
    for chunk in todo.chunks(clf.batch.max(1)) {
        for (s, r) in chunk.iter().zip(clf.classify(chunk)) {
            let p = match r {
                Ok(p) => p,
                Err(e) => {
                    let mut p = Prediction::new(&s.id, &name, Outcome::Failed);
                    p.true_label = Some(ds.labels.name(s.label).to_string());
                    p.error = Some(e.message);
                    p
                }
            };
            log.append(&p)?;
            fresh += 1;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    if clf.resized_images() > 0 {
        eprintln!(
            "note: {} images were not {}x{} and were resized to the checkpoint's input size",
            clf.resized_images(),
            clf.meta().input_size,
            clf.meta().input_size
        );
    }
    drop(log);

    // Metrics over every prediction of this classifier on these samples (resumed ones too).
    let wanted: std::collections::HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    let preds: Vec<Prediction> = mica_core::read_predictions(&log_path)?
        .into_iter()
        .filter(|p| p.classifier == name && wanted.contains(p.sample_id.as_str()))
        .collect();
    let opts = mica_eval::EvalOptions::default();
    let mut metrics = mica_eval::RunMetrics::from_predictions(
        &name,
        &ds.root.display().to_string(),
        split.as_str(),
        &ds.labels,
        &preds,
        wall,
        &opts,
    )
    .with_context(|| format!("computing metrics for {}", log_path.display()))?;
    if fresh > 0 {
        metrics.throughput_images_per_s = Some(fresh as f64 / wall.max(1e-9));
    }
    metrics.extra.insert("device".into(), clf.device().as_str().into());
    metrics.extra.insert("batch".into(), clf.batch.into());
    metrics.extra.insert("checkpoint".into(), serde_json::to_value(clf.meta()).expect("meta serialises"));
    let needs_review = preds
        .iter()
        .filter(|p| p.extra.get("needs_review").and_then(|v| v.as_bool()) == Some(true))
        .count();
    metrics.extra.insert("needs_review".into(), needs_review.into());
    metrics.write(out.join("metrics.json"))?;

    let acc = metrics.all.accuracy;
    let f1 = metrics.all.macro_f1;
    println!(
        "{name} on {} {split}: accuracy {acc:.3}, macro F1 {f1:.3}, {needs_review} of {} flagged for review",
        ds.root.display(),
        preds.len()
    );
    if fresh > 0 {
        let lat = mica_eval::latency_summary(&preds.iter().map(|p| p.latency_ms).collect::<Vec<_>>());
        if let Some(l) = lat {
            println!(
                "throughput {:.1} images/s on {} (batch {}); latency per image p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
                fresh as f64 / wall.max(1e-9),
                clf.device(),
                clf.batch,
                l.p50,
                l.p90,
                l.p99
            );
        }
    }
    Ok(super::classify::ClassifyOutcome { out_dir: out.to_path_buf(), images: preds.len(), remote: Vec::new() })
}
