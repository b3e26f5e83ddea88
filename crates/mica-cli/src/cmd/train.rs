//! `mica train` (owned by the CNN work).
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    #[arg(long)]
    pub dataset: PathBuf,
    /// small, resnet18 or mobilenet.
    #[arg(long, default_value = "small")]
    pub model: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub class_weights: bool,
    #[arg(long)]
    pub resume: bool,
}

pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica train` is not built yet")
}
