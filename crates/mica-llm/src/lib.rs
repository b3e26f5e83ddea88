//! Vision-LLM classifiers: providers, prompts, parsing, filtering, caching.

pub mod cache;
pub mod cost;
pub mod error;
pub mod filter;
pub mod findings;
pub mod imgenc;
pub mod parse;
pub mod prompt;
pub mod provider;
pub mod runner;
pub mod sim;
pub mod spec;
pub mod summary;
#[cfg(test)]
mod tests;

pub use cache::ResponseCache;
pub use cost::{PriceEntry, PriceTable};
pub use error::LlmError;
pub use filter::FilterSpec;
pub use findings::Findings;
pub use parse::{parse_answer, ParseOptions, ParseStage, ParsedAnswer, SynonymTable};
pub use prompt::{ContextMode, PromptSet};
pub use provider::{
    build_provider, ChatRequest, ChatResponse, Detail, GenParams, LlmProvider, OllamaClient,
    OpenAiClient, ProviderError,
};
pub use runner::{
    ConfidenceSource, ImageLoader, Limits, LlmClassifier, LlmConfig, LlmRunner, RunStats, WorkItem,
};
pub use spec::{ProviderKind, ProviderSpec};
pub use summary::LlmSummary;

/// A small multi-threaded tokio runtime for synchronous callers (the CLI).
pub fn runtime() -> Result<tokio::runtime::Runtime, LlmError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LlmError::Config(format!("cannot start the async runtime: {e}")))
}
