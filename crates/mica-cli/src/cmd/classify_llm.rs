//! `mica classify --classifier llm:...` (owned by the LLM work).

/// Flags that only the LLM arm reads.
#[derive(clap::Args, Debug, Default)]
pub struct LlmArgs {
    /// image, image+clinical, image+findings or findings.
    #[arg(long, default_value = "image")]
    pub context: String,
    /// Filter spec (e.g. `default`, `none`).
    #[arg(long)]
    pub filter: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[arg(long)]
    pub no_cache: bool,
}

pub fn run(
    _common: &super::classify::ClassifyArgs,
    _spec: &str,
) -> anyhow::Result<super::classify::ClassifyOutcome> {
    anyhow::bail!("LLM classification is not built yet")
}
