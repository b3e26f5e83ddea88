//! `mica llm-sim` (owned by the LLM work).

#[derive(clap::Args)]
pub struct LlmSimArgs {
    #[arg(long, default_value_t = 11435)]
    pub port: u16,
    /// Probability that the answer is the true class.
    #[arg(long, default_value_t = 0.7)]
    pub accuracy: f64,
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
}

pub fn run(_args: LlmSimArgs) -> anyhow::Result<()> {
    anyhow::bail!("`mica llm-sim` is not built yet")
}
