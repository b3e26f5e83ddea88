//! `mica explain` (owned by the CNN work).
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// `cnn:RUN_DIR`.
    #[arg(long)]
    pub classifier: String,
    pub image: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(_args: ExplainArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica explain` is not built yet")
}
