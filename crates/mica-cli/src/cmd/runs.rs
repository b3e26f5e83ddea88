//! `mica runs ...` (owned by the compare/report work).

#[derive(clap::Subcommand)]
pub enum RunsCommand {
    /// List indexed runs.
    List,
    /// Show one run.
    Show { id: String },
}

pub fn run(_cmd: RunsCommand) -> anyhow::Result<()> {
    anyhow::bail!("`mica runs` is not built yet")
}
