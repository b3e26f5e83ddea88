//! `mica classify`: dispatches on the classifier spec (`cnn:RUN_DIR` or `llm:...`).
use std::path::PathBuf;

use crate::exit::usage;

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    #[arg(long)]
    pub dataset: PathBuf,
    /// `cnn:RUN_DIR`, `llm:openai/gpt-4o`, `llm:ollama/llama3.2-vision`,
    /// `llm:openai-compatible/<model>@http://host:port`.
    #[arg(long)]
    pub classifier: String,
    /// Which split to classify.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Output run directory (predictions.jsonl, metrics.json, energy.csv).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Classify at most N images per class (for costly classifiers).
    #[arg(long)]
    pub limit_per_class: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub cnn: super::classify_cnn::CnnArgs,
    #[command(flatten)]
    pub llm: super::classify_llm::LlmArgs,
    #[command(flatten)]
    pub energy: super::energy::EnergyOpts,
}

/// What a classification run produced, for the caller to wrap (energy) and print.
pub struct ClassifyOutcome {
    pub out_dir: PathBuf,
    pub images: usize,
    /// Work done on a remote API's machines: its energy is `not-measured:remote-api`.
    pub remote: Vec<mica_energy::RemoteUsage>,
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    if !args.classifier.starts_with("cnn:") && !args.classifier.starts_with("llm:") {
        return Err(usage(format!(
            "unknown classifier `{}`: expected cnn:RUN_DIR or llm:PROVIDER/MODEL",
            args.classifier
        )));
    }
    let project = format!("classify {}", args.classifier);
    let outcome = super::energy::measured_dir(&args.energy, &project, || {
        let outcome = if let Some(dir) = args.classifier.strip_prefix("cnn:") {
            super::classify_cnn::run(&args, std::path::Path::new(dir))?
        } else {
            let spec = &args.classifier["llm:".len()..];
            super::classify_llm::run(&args, spec)?
        };
        let (images, dir, remote) = (outcome.images, outcome.out_dir.clone(), outcome.remote.clone());
        Ok((outcome, images, dir, remote))
    })?;
    println!(
        "classified {} images; results in {}",
        outcome.images,
        outcome.out_dir.display()
    );
    Ok(())
}
