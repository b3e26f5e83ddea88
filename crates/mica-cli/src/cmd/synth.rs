//! `mica synth` (owned by the data work).
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output folder; one sub-folder per dataset.
    #[arg(long)]
    pub out: PathBuf,
    /// xray, mri, ct or all.
    #[arg(long, default_value = "all")]
    pub modality: String,
    /// Images per class (split across the layout's folders).
    #[arg(long)]
    pub per_class: Option<usize>,
    /// Image side in pixels.
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(_args: SynthArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica synth` is not built yet")
}
