//! `mica eval` (owned by the metrics work).
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// CSV with columns label,prediction and optional prob_<class> columns.
    pub predictions: PathBuf,
    /// A second predictions file on the same images: McNemar's test between the two.
    #[arg(long)]
    pub versus: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica eval` is not built yet")
}
