//! The CNN arm: a `mica train` run directory, or an architecture trained on the experiment's
//! own split (so the CNN never sees the comparison's test images).

use std::path::Path;

use mica_cnn::{CnnClassifier, Progress, TrainConfig};
use mica_core::{Classifier, Dataset};

use crate::experiment::{ClassifierSpec, Experiment};
use crate::run::{BuildInfo, Event};
use crate::CompareError;

/// Written after training finishes; its presence makes a resumed compare skip training.
const TRAIN_SUMMARY: &str = "train_summary.json";

#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    exp: &Experiment,
    spec: &ClassifierSpec,
    slug: &str,
    name: &str,
    ds: &Dataset,
    run_dir: &Path,
    info: &mut BuildInfo,
    progress: &mut dyn FnMut(Event),
) -> Result<Box<dyn Classifier>, CompareError> {
    let model_dir = match (&spec.run, &spec.train) {
        (Some(r), _) => {
            if !r.is_dir() {
                return Err(CompareError::Invalid(format!(
                    "{}: CNN run directory not found (train one with `mica train`, or use train = \"small\")",
                    r.display()
                )));
            }
            r.clone()
        }
        (None, Some(arch)) => {
            let dir = run_dir.join("models").join(slug);
            let summary_path = dir.join(TRAIN_SUMMARY);
            if !summary_path.is_file() {
                let arch = arch.parse().map_err(CompareError::Invalid)?;
                let mut cfg = TrainConfig::new(arch);
                cfg.epochs = spec.epochs.unwrap_or(5);
                if let Some(b) = spec.batch {
                    cfg.batch = b;
                }
                cfg.size = exp.dataset.image_size;
                cfg.seed = exp.dataset.seed;
                cfg.resume = dir.join("last.json").is_file();
                progress(Event::Notice(format!(
                    "{name}: training {} for up to {} epochs on the experiment's train split{}",
                    arch.as_str(),
                    cfg.epochs,
                    if cfg.resume { " (resuming)" } else { "" }
                )));
                let summary = mica_cnn::train(ds, &cfg, &dir, &mut |p| match p {
                    Progress::Notice(m) => progress(Event::Notice(format!("{name}: {m}"))),
                    Progress::EpochEnd(s) => progress(Event::Notice(format!(
                        "{name}: epoch {} val accuracy {:.1} % macro F1 {:.3}{}",
                        s.epoch,
                        s.val_accuracy * 100.0,
                        s.val_macro_f1,
                        if s.best { " (best)" } else { "" }
                    ))),
                    _ => {}
                })
                .map_err(|e| CompareError::Cnn(e.to_string()))?;
                let mut bytes = serde_json::to_vec_pretty(&summary).expect("summary serialises");
                bytes.push(b'\n');
                mica_core::write_atomic(&summary_path, &bytes).map_err(|e| CompareError::Data(e.to_string()))?;
            }
            dir
        }
        (None, None) => return Err(CompareError::Invalid(format!("{name}: needs `run` or `train`"))),
    };
    let mut notices = Vec::new();
    let c = CnnClassifier::load(&model_dir, &mut |m| notices.push(m.to_string()))
        .map_err(|e| CompareError::Cnn(e.to_string()))?
        .with_name(name);
    for n in notices {
        progress(Event::Notice(format!("{name}: {n}")));
    }
    if c.labels() != &ds.labels {
        return Err(CompareError::Invalid(format!(
            "{}: the CNN was trained on labels [{}] but the dataset has [{}]",
            model_dir.display(),
            c.labels().names().join(", "),
            ds.labels.names().join(", ")
        )));
    }
    info.extra.insert("model_dir".into(), serde_json::json!(model_dir.display().to_string()));
    info.extra.insert("device".into(), serde_json::json!(format!("{:?}", c.device())));
    if let Ok(b) = std::fs::read(model_dir.join(TRAIN_SUMMARY)) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
            let keep = ["arch", "epochs_run", "best_epoch", "best_val_macro_f1", "train_images", "train_seconds", "input_size"];
            let small: serde_json::Map<String, serde_json::Value> = keep
                .iter()
                .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.clone())))
                .collect();
            info.extra.insert("training".into(), serde_json::Value::Object(small));
        }
    }
    // Warm-up outside the energy window and the timings: first-call costs are not inference.
    c.warm_up();
    Ok(Box::new(c))
}
