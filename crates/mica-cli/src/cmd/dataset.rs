//! `mica dataset ...` (owned by the data work).
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum DatasetCommand {
    /// Detect the layout, count classes and splits, list unreadable files and near-duplicates.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
pub struct InspectArgs {
    pub path: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: DatasetCommand) -> anyhow::Result<()> {
    match cmd {
        DatasetCommand::Inspect(_a) => anyhow::bail!("`mica dataset inspect` is not built yet"),
    }
}
