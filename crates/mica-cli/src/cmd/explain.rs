//! `mica explain` (owned by the CNN work).
use std::path::PathBuf;

use anyhow::Context;

use crate::exit::usage;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// `cnn:RUN_DIR`.
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
    let mica_run::ClassifierSpec::Cnn { run: dir } = spec else {
        return Err(usage(format!(
            "`{spec}`: explanations need a trained CNN (--classifier cnn:RUN_DIR)"
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
