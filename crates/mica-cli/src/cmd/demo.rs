//! `mica demo`: the README's first command.
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where datasets, runs and the report go.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
}

pub fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica demo` is not built yet")
}
