//! `mica explain` (owned by the CNN work).
use std::path::PathBuf;

use anyhow::Context;

use crate::exit::usage;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// `cnn:RUN_DIR` (Grad-CAM) or `onnx:PATH.onnx` (an occlusion map: tract gives no gradients).
    #[arg(long)]
    pub classifier: String,
    pub image: PathBuf,
    /// Output PNG: the Grad-CAM heat map over the image.
    #[arg(long)]
    pub out: PathBuf,
    /// Explain this class instead of the predicted one.
    #[arg(long)]
    pub class: Option<String>,
    /// Also print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let spec: mica_run::ClassifierSpec =
        args.classifier.parse().map_err(|e: mica_run::SpecError| usage(e.to_string()))?;
    if let mica_run::ClassifierSpec::Onnx { path } = &spec {
        return explain_onnx(&args, path);
    }
    let mica_run::ClassifierSpec::Cnn { run: dir } = spec else {
        return Err(usage(format!(
            "`{spec}`: explanations need a trained CNN (--classifier cnn:RUN_DIR) or an ONNX model (onnx:PATH.onnx)"
        )));
    };
    if !dir.is_dir() {
        return Err(usage(format!("{}: no such CNN run directory", dir.display())));
    }
    if !args.image.is_file() {
        return Err(usage(format!("{}: no such image", args.image.display())));
    }
    let e = mica_cnn::gradcam::explain_to_png(&dir, &args.image, args.class.as_deref(), &args.out)
        .with_context(|| format!("explaining {}", args.image.display()))?;
    if args.json {
        let v = serde_json::json!({
            "image": args.image,
            "overlay": args.out,
            "explained_class": e.label,
            "predicted": e.predicted,
            "confidence": e.confidence,
            "probabilities": e.probabilities.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "feature_map": [e.feature_size.0, e.feature_size.1],
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "predicted {} (confidence {:.2}; a model output for decision support, not a diagnosis); Grad-CAM for `{}` ({}x{} feature map) written to {}",
            e.predicted,
            e.confidence,
            e.label,
            e.feature_size.0,
            e.feature_size.1,
            args.out.display()
        );
    }
    Ok(())
}

/// ONNX models get an occlusion map: the runtime runs graphs forward only, so there are no
/// gradients for Grad-CAM. Every output says which method drew the map.
fn explain_onnx(args: &ExplainArgs, model: &std::path::Path) -> anyhow::Result<()> {
    if !args.image.is_file() {
        return Err(usage(format!("{}: no such image", args.image.display())));
    }
    let e = mica_run::onnx::explain_to_png(model, &args.image, args.class.as_deref(), &args.out).map_err(|e| {
        if e.is_usage() {
            usage(e.to_string())
        } else {
            anyhow::Error::new(e).context(format!("explaining {}", args.image.display()))
        }
    })?;
    if args.json {
        let v = serde_json::json!({
            "image": args.image,
            "overlay": args.out,
            "method": mica_onnx::occlusion::METHOD,
            "explained_class": e.label,
            "predicted": e.predicted,
            "confidence": e.confidence,
            "probabilities": e.probabilities.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "input_size": [e.height, e.width],
            "patch": e.patch,
            "stride": e.stride,
            "forward_passes": e.passes,
            "max_probability_drop": e.max_drop,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "predicted {} (confidence {:.2}; a model output for decision support, not a diagnosis); {} for `{}` ({}-pixel patches over {}x{}, largest drop {:.2}) written to {}",
            e.predicted,
            e.confidence,
            mica_onnx::occlusion::METHOD,
            e.label,
            e.patch,
            e.height,
            e.width,
            e.max_drop,
            args.out.display()
        );
    }
    Ok(())
}
