//! Building the clients of the providers with their own wire formats (Azure OpenAI,
//! Anthropic, Gemini): which environment variable holds whose key.

use std::sync::Arc;

use crate::anthropic::AnthropicClient;
use crate::azure::{AzureAuth, AzureClient};
use crate::gemini::GeminiClient;
use crate::provider::{LlmProvider, OPENAI_API_KEY_ENV};
use crate::spec::{AZURE_AD_TOKEN_ENV, AZURE_API_VERSION};
use crate::{LlmError, ProviderKind, ProviderSpec};

/// The variable a provider's key is read from. `OPENAI_API_KEY` is what the CLI, `serve` and
/// experiment entries pass when the user named nothing, so for another vendor it stands for
/// that vendor's own variable: an OpenAI key is never sent to Anthropic or Google.
pub fn key_env_for(kind: ProviderKind, api_key_env: &str) -> &str {
    if api_key_env == OPENAI_API_KEY_ENV {
        kind.default_key_env()
    } else {
        api_key_env
    }
}

fn read(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
}

/// True for the vendor's own endpoints, where a missing key can only end in 401: better
/// said before the run than after its first request. A gateway or a local stand-in may
/// need no key.
fn is_vendor_endpoint(kind: ProviderKind, base_url: &str) -> bool {
    let host = crate::spec::redact_url(base_url);
    let host = host
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split(['/', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match kind {
        ProviderKind::Azure => {
            host.ends_with(".openai.azure.com") || host.ends_with(".cognitiveservices.azure.com")
        }
        ProviderKind::Anthropic => host == "api.anthropic.com",
        ProviderKind::Gemini => host == "generativelanguage.googleapis.com",
        _ => false,
    }
}

/// The client for an `azure`, `anthropic` or `gemini` spec (see [`crate::build_provider`]).
pub fn build(
    spec: &ProviderSpec,
    api_key_env: &str,
    http: reqwest::Client,
) -> Result<Arc<dyn LlmProvider>, LlmError> {
    let env = key_env_for(spec.kind, api_key_env);
    let key = read(env);
    let vendor = is_vendor_endpoint(spec.kind, &spec.base_url);
    let missing = |also: &str| {
        LlmError::Config(format!(
            "environment variable {env} is not set{also}: {} at {} needs a key",
            spec.kind.as_str(),
            crate::spec::redact_url(&spec.base_url)
        ))
    };
    Ok(match spec.kind {
        ProviderKind::Azure => {
            let auth = match (key, read(AZURE_AD_TOKEN_ENV)) {
                (Some(k), _) => AzureAuth::ApiKey(k),
                (None, Some(t)) => AzureAuth::Bearer(t),
                (None, None) if vendor => {
                    return Err(missing(&format!(
                        " (nor {AZURE_AD_TOKEN_ENV} for Entra ID)"
                    )))
                }
                (None, None) => AzureAuth::None,
            };
            let version = spec.api_version.as_deref().unwrap_or(AZURE_API_VERSION);
            Arc::new(AzureClient::new(
                http,
                &spec.base_url,
                &spec.model,
                version,
                auth,
            ))
        }
        ProviderKind::Anthropic if key.is_none() && vendor => return Err(missing("")),
        ProviderKind::Anthropic => Arc::new(AnthropicClient::new(http, &spec.base_url, key)),
        ProviderKind::Gemini if key.is_none() && vendor => return Err(missing("")),
        ProviderKind::Gemini => Arc::new(GeminiClient::new(http, &spec.base_url, key)),
        other => {
            return Err(LlmError::Config(format!(
                "{} is not a native provider",
                other.as_str()
            )))
        }
    })
}
