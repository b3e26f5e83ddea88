//! Vision-LLM classifiers: providers, prompts, parsing, filtering, caching.

pub mod anthropic;
pub mod azure;
pub mod cache;
pub mod cost;
pub mod error;
pub mod filter;
pub mod findings;
pub mod gemini;
pub mod imgenc;
pub mod native;
pub mod parse;
pub mod prompt;
pub mod provider;
pub mod runner;
#[cfg(feature = "sim")]
pub mod sim;
pub mod spec;
pub mod summary;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
// The end-to-end tests talk to the simulator: `cargo test -p mica-llm --features sim` (the
// workspace's test run enables the feature through mica-cli and mica-run).
#[cfg(all(test, feature = "sim"))]
mod tests;
#[cfg(test)]
mod provenance_tests;
#[cfg(test)]
mod native_tests;

pub use anthropic::AnthropicClient;
pub use azure::{AzureAuth, AzureClient};
pub use cache::{AliasSnapshot, ResponseCache, SnapshotWatch};
pub use cost::{PriceEntry, PriceTable};
pub use error::LlmError;
pub use filter::FilterSpec;
pub use findings::Findings;
pub use gemini::GeminiClient;
pub use parse::{parse_answer, ParseOptions, ParseStage, ParsedAnswer, SynonymTable};
pub use prompt::{ContextMode, PromptSet};
pub use provider::{
    build_provider, ChatRequest, ChatResponse, Detail, GenParams, LlmProvider, OllamaClient,
    OpenAiClient, ProviderError,
};
pub use runner::{
    ConfidenceSource, ImageLoader, Limits, LlmClassifier, LlmConfig, LlmRunner, RunStats, WorkItem,
    SUGGESTION_MARKER,
};
pub use spec::{ProviderKind, ProviderSpec};
pub use summary::LlmSummary;

/// A small multi-threaded tokio runtime (two workers, all drivers) for synchronous callers:
/// the CLI, [`LlmClassifier`] and `mica serve`.
pub fn runtime() -> Result<tokio::runtime::Runtime, LlmError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LlmError::Config(format!("cannot start the async runtime: {e}")))
}

/// Resolves on Ctrl-C, or SIGTERM on Unix. Both long-running servers (`mica llm-sim` and
/// `mica serve`) stop this way, letting in-flight requests finish when a job scheduler or a
/// terminal asks them to stop.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term_fut = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term_fut => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
