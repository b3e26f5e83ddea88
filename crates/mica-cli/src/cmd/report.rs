//! `mica report` (owned by the compare/report work).
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ReportArgs {
    pub run_dir: PathBuf,
    /// md, html, json or csv.
    #[arg(long, default_value = "html")]
    pub format: String,
}

pub fn run(_args: ReportArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica report` is not built yet")
}
