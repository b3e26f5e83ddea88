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

pub use cache::ResponseCache;
pub use cost::{PriceEntry, PriceTable};
pub use error::LlmError;
pub use filter::{FilterSpec};
pub use findings::Findings;
pub use parse::{parse_answer, ParseOptions, ParseStage, ParsedAnswer, SynonymTable};
pub use prompt::{ContextMode, PromptSet};
pub use provider::{ChatRequest, ChatResponse, Detail, GenParams, LlmProvider, OllamaClient, OpenAiClient, ProviderError};
pub use runner::{ConfidenceSource, ImageLoader, Limits, LlmClassifier, LlmConfig, LlmRunner, RunStats, WorkItem};
pub use spec::{ProviderKind, ProviderSpec};
