//! `mica classify --classifier cnn:RUN_DIR` (owned by the CNN work).

/// Flags that only the CNN arm reads.
#[derive(clap::Args, Debug, Default)]
pub struct CnnArgs {
    /// Inference batch size.
    #[arg(long)]
    pub batch: Option<usize>,
}

pub fn run(
    _common: &super::classify::ClassifyArgs,
    _run_dir: &std::path::Path,
) -> anyhow::Result<super::classify::ClassifyOutcome> {
    anyhow::bail!("CNN classification is not built yet")
}
