//! The CNN arm of the factory: a `mica train` run directory, or an architecture trained on the
//! run's own split (so the CNN never sees the images it is tested on).

use std::path::PathBuf;

use mica_cnn::{CnnClassifier, Progress, TrainConfig};

use crate::experiment::ClassifierConfig;
use crate::factory::{BuildContext, Built};
use crate::run::Event;
use crate::spec::ClassifierSpec;
use crate::RunError;

/// Written after training finishes; its presence makes a resumed run skip training.
const TRAIN_SUMMARY: &str = "train_summary.json";

/// Default inference batch.
const BATCH: usize = 32;

/// The model version string the audit trail records for a CNN checkpoint.
pub fn version(meta: &mica_cnn::CheckpointMeta) -> String {
    format!(
        "{} epoch {} weights fnv64:{} (val macro-F1 {:.3}, {}x{} px, mica {})",
        meta.arch, meta.epoch, meta.weights_fnv64, meta.val_macro_f1, meta.input_size, meta.input_size, meta.mica_version
    )
}

/// The energy report `mica train` (or a run's `cnn-train:`) left in a model directory.
fn read_energy(dir: &std::path::Path) -> Result<Option<mica_energy::EnergyReport>, RunError> {
    let path = mica_core::ClassifierDir::new(dir).energy_report();
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(RunError::io(&path))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| RunError::Config {
        path,
        message: format!("not a mica energy report: {e}"),
    })
}

pub(crate) fn build(
    cfg: &ClassifierConfig,
    spec: &ClassifierSpec,
    ctx: &BuildContext,
    progress: &mut dyn FnMut(Event),
) -> Result<Built, RunError> {
    let name = ctx.name;
    let cnn_err = |source| RunError::Cnn {
        name: name.to_string(),
        source,
    };
    let model_dir: PathBuf = match spec {
        ClassifierSpec::Cnn { run } => {
            if !run.is_dir() {
                return Err(RunError::Invalid(format!(
                    "{}: no such CNN run directory (train one with `mica train`, or use cnn-train:small)",
                    run.display()
                )));
            }
            run.clone()
        }
        ClassifierSpec::CnnTrain { arch } => {
            let dir = ctx.root.model_dir(ctx.slug);
            let summary_path = dir.join(TRAIN_SUMMARY);
            if !summary_path.is_file() {
                let arch = arch.parse().map_err(RunError::Invalid)?;
                let mut tc = TrainConfig::new(arch);
                tc.epochs = cfg.epochs.unwrap_or(5);
                if let Some(p) = cfg.patience {
                    tc.patience = p.max(1);
                }
                if let Some(b) = cfg.batch {
                    tc.batch = b;
                }
                tc.size = ctx.dataset.image_size;
                tc.seed = ctx.dataset.seed;
                tc.resume = dir.join("last.json").is_file();
                progress(Event::Notice(format!(
                    "{name}: training {} for up to {} epochs on the run's train split{}",
                    arch.as_str(),
                    tc.epochs,
                    if tc.resume { " (resuming)" } else { "" }
                )));
                let mut train = || -> Result<(mica_cnn::TrainSummary, usize), RunError> {
                    let s = mica_cnn::train(ctx.ds, &tc, &dir, &mut |p| match p {
                        Progress::Notice(m) => progress(Event::Notice(format!("{name}: {m}"))),
                        Progress::EpochEnd(s) => progress(Event::Epoch {
                            slug: ctx.slug.to_string(),
                            name: name.to_string(),
                            epoch: s.epoch,
                            epochs: tc.epochs,
                            line: format!(
                                "epoch {} val accuracy {:.1} % macro F1 {:.3}{}",
                                s.epoch,
                                s.val_accuracy * 100.0,
                                s.val_macro_f1,
                                if s.best { " (best)" } else { "" }
                            ),
                        }),
                        _ => {}
                    })
                    .map_err(cnn_err)?;
                    // Images processed: every epoch of this invocation saw the training split once.
                    let images = s.train_images * s.history.len().max(1);
                    Ok((s, images))
                };
                // Training is metered like `mica train`, into the model directory, so the
                // report can put what the CNN cost to make next to what it costs to run.
                let summary = match ctx.energy {
                    Some((carbon, meter)) => {
                        let meters = mica_energy::MeterSet::auto(meter);
                        let project = format!("train {}", arch.as_str());
                        let (s, mut report) = mica_energy::measure(&meters, carbon, &project, train)?;
                        // A resumed training adds to what the killed one had spent.
                        if let Some(before) = tc.resume.then(|| read_energy(&dir)).transpose()?.flatten() {
                            report = mica_energy::EnergyReport::sum(&[before, report], "training invocations (resumed)")
                                .expect("two reports sum");
                        }
                        crate::record_energy(&dir, &report)?;
                        s
                    }
                    None => train()?.0,
                };
                let mut bytes = serde_json::to_vec_pretty(&summary).expect("summary serialises");
                bytes.push(b'\n');
                mica_core::write_atomic(&summary_path, &bytes)?;
            }
            dir
        }
        _ => unreachable!("the factory sends only CNN specs here"),
    };
    let mut notices = Vec::new();
    let mut c = CnnClassifier::load(&model_dir, &mut |m| notices.push(m.to_string()))
        .map_err(cnn_err)?
        .with_name(name);
    for n in notices {
        progress(Event::Notice(format!("{name}: {n}")));
    }
    c.meta().check_labels(&ctx.ds.labels, &model_dir).map_err(cnn_err)?;
    c.batch = cfg.batch.unwrap_or(BATCH);
    c.review_below = cfg.review_below;
    let batch = c.batch;
    let mut extra = serde_json::Map::new();
    extra.insert("model_dir".into(), serde_json::json!(model_dir.display().to_string()));
    extra.insert("device".into(), serde_json::json!(c.device().as_str()));
    extra.insert("engine".into(), serde_json::json!(c.engine()));
    extra.insert("batch".into(), serde_json::json!(c.batch));
    extra.insert("checkpoint".into(), serde_json::to_value(c.meta()).expect("meta serialises"));
    let summary_path = model_dir.join(TRAIN_SUMMARY);
    if summary_path.is_file() {
        let bytes = std::fs::read(&summary_path).map_err(RunError::io(&summary_path))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| RunError::Config {
            path: summary_path.clone(),
            message: format!("not a training summary: {e}"),
        })?;
        let keep = ["arch", "epochs_run", "best_epoch", "best_val_macro_f1", "train_images", "train_seconds", "input_size"];
        let small: serde_json::Map<String, serde_json::Value> = keep
            .iter()
            .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.clone())))
            .collect();
        let mut small = small;
        // What training cost, as `mica train` (or the run) metered it: the report's break-even
        // point needs it. A model trained elsewhere has none, and the report says so.
        if let Some(e) = read_energy(&model_dir)? {
            small.insert("energy_wh".into(), e.energy_wh.into());
            small.insert("co2e_g".into(), e.co2e_g.into());
            small.insert("energy_method".into(), e.method.clone().into());
            small.insert("energy_seconds".into(), e.duration_s.into());
            small.insert("carbon_intensity_g_per_kwh".into(), e.carbon.intensity_g_per_kwh.into());
        }
        extra.insert("training".into(), serde_json::Value::Object(small));
    }
    // No warm-up: an LLM's first request is not warmed up either, so both cold starts fall
    // inside the timing and energy, and the report shows the first image's latency apart.
    let mut b = Built::new(Box::new(c), batch);
    b.extra = extra;
    b.latency_kind = if batch == 1 {
        mica_eval::LatencyKind::PerImage
    } else {
        mica_eval::LatencyKind::PerImageAmortised { batch }
    };
    Ok(b)
}
