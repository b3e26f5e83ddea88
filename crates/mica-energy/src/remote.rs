//! Remote API calls (GPT-4o and other hosted models): the provider's energy cannot be measured
//! from the client. It is recorded as `not-measured:remote-api`; an optional published
//! per-token figure may be attached, always with its source, and is kept apart from the
//! measured totals.

use serde::{Deserialize, Serialize};

/// A published energy figure per output token, with where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerTokenEstimate {
    pub wh_per_1000_output_tokens: f64,
    pub source: String,
}

/// Epoch AI's 2025 estimate for GPT-4o: about 0.3 Wh for a typical ChatGPT query, which they
/// model as about 500 output tokens; so 0.6 Wh per 1,000 output tokens. It excludes image
/// input processing, networking and training, so for image classification it is a lower bound.
pub fn epoch_ai_gpt4o_2025() -> PerTokenEstimate {
    PerTokenEstimate {
        wh_per_1000_output_tokens: EPOCH_AI_GPT4O_2025,
        source: "Epoch AI, 'How much energy does ChatGPT use?' (J. You, Feb 2025): ~0.3 Wh per GPT-4o query of ~500 output tokens; excludes image input, networking and training".into(),
    }
}

/// Wh per 1,000 output tokens from [`epoch_ai_gpt4o_2025`].
pub const EPOCH_AI_GPT4O_2025: f64 = 0.6;

/// What the LLM arm knows about its remote calls in one window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RemoteUsage {
    /// `openai`, `openai-compatible`, ...
    pub provider: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Opt-in published figure; `None` leaves the remote energy simply unknown.
    pub estimate: Option<PerTokenEstimate>,
}
