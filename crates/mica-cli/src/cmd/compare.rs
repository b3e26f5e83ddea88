//! `mica compare` (owned by the compare/report work).
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Experiment TOML file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(_args: CompareArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica compare` is not built yet")
}
