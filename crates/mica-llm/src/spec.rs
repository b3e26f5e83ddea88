//! Classifier spec strings (`llm:openai/gpt-4o`, `llm:ollama/llama3.2-vision`,
//! `llm:openai-compatible/<model>@http://host:port`) and the endpoint they resolve to.

use serde::{Deserialize, Serialize};

use crate::LlmError;

/// Which wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// api.openai.com (API key required).
    OpenAi,
    /// Ollama's native `/api/chat` (keeps its load/eval timings).
    Ollama,
    /// Any server with `/v1/chat/completions`: vLLM, llama-server, Ollama's `/v1`, llm-sim.
    OpenAiCompatible,
    /// Azure OpenAI: a deployment of one resource (`https://<resource>.openai.azure.com`),
    /// chat completions under `/openai/deployments/<deployment>` with an `api-version`.
    Azure,
    /// Anthropic's Messages API (`/v1/messages`).
    Anthropic,
    /// Google's Generative Language API (`/v1beta/models/<model>:generateContent`).
    Gemini,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Ollama => "ollama",
            ProviderKind::OpenAiCompatible => "openai-compatible",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    /// The environment variable a provider's key is read from when the user names none:
    /// each vendor's own convention, so a hospital with several keys set never sends one
    /// vendor's key to another. (Azure also takes an Entra ID bearer token from
    /// [`AZURE_AD_TOKEN_ENV`] when its key variable is unset.)
    pub fn default_key_env(self) -> &'static str {
        match self {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => "OPENAI_API_KEY",
            ProviderKind::Ollama => "OLLAMA_API_KEY",
            ProviderKind::Azure => "AZURE_OPENAI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
            ProviderKind::Gemini => "GEMINI_API_KEY",
        }
    }

    /// The OpenAI flavours share one request builder (Azure too: only its path, query and
    /// auth header differ), so OpenAI's parameter rules apply to all of them.
    pub fn speaks_openai(self) -> bool {
        matches!(
            self,
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::Azure
        )
    }
}

pub const OPENAI_BASE_URL: &str = "https://api.openai.com";
pub const OLLAMA_BASE_URL: &str = "http://localhost:11434";
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
pub const GEMINI_BASE_URL: &str = "https://generativelanguage.googleapis.com";
/// The Azure OpenAI data-plane version sent when none is chosen: the latest GA version
/// (2024-10-21) with image input and strict `json_schema` structured output.
pub const AZURE_API_VERSION: &str = "2024-10-21";
/// Overrides [`AZURE_API_VERSION`] (e.g. for a preview version a deployment needs).
pub const AZURE_API_VERSION_ENV: &str = "AZURE_OPENAI_API_VERSION";
/// A Microsoft Entra ID token, sent as `Authorization: Bearer`, used when no Azure key is set.
pub const AZURE_AD_TOKEN_ENV: &str = "AZURE_OPENAI_AD_TOKEN";

/// A parsed classifier spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderSpec {
    pub kind: ProviderKind,
    pub model: String,
    /// Server root without a trailing `/` or `/v1` (the clients append their paths).
    pub base_url: String,
    /// Azure only: the `api-version` query value; from [`AZURE_API_VERSION_ENV`] at parse
    /// time, else [`AZURE_API_VERSION`]. Kept in the spec so the run records which one it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

impl ProviderSpec {
    /// Parses `PROVIDER/MODEL[@URL]`, with or without the leading `llm:`.
    ///
    /// The model may itself contain `/` and `:` (`meta-llama/Llama-3.2-11B-Vision`,
    /// `llama3.2-vision:11b`), so only the first `/` separates the provider and the URL is
    /// recognised by its `@http://` / `@https://` prefix.
    pub fn parse(spec: &str) -> Result<Self, LlmError> {
        let err = |message: &str| LlmError::Spec {
            spec: spec.to_string(),
            message: message.to_string(),
        };
        let body = spec.strip_prefix("llm:").unwrap_or(spec).trim();
        let (provider, rest) = body
            .split_once('/')
            .ok_or_else(|| err("expected PROVIDER/MODEL, e.g. openai/gpt-4o"))?;
        let (model, url) = match rest.find("@http://").or_else(|| rest.find("@https://")) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if model.trim().is_empty() {
            return Err(err("the model name is empty"));
        }
        let kind = match provider.to_ascii_lowercase().as_str() {
            "openai" => ProviderKind::OpenAi,
            "ollama" => ProviderKind::Ollama,
            "openai-compatible" | "openai_compatible" | "vllm" | "llama-server" => {
                ProviderKind::OpenAiCompatible
            }
            "azure" | "azure-openai" => ProviderKind::Azure,
            "anthropic" => ProviderKind::Anthropic,
            "gemini" => ProviderKind::Gemini,
            other => {
                return Err(err(&format!(
                    "unknown provider `{other}` (expected openai, azure, anthropic, gemini, \
                     ollama or openai-compatible)"
                )))
            }
        };
        let base_url = match (kind, url) {
            (_, Some(u)) => u.to_string(),
            (ProviderKind::OpenAi, None) => OPENAI_BASE_URL.to_string(),
            (ProviderKind::Ollama, None) => ollama_host_from_env(),
            (ProviderKind::OpenAiCompatible, None) => {
                return Err(err(
                    "openai-compatible needs a server address: openai-compatible/MODEL@http://host:port",
                ))
            }
            (ProviderKind::Azure, None) => {
                return Err(err(
                    "azure needs the resource endpoint: azure/DEPLOYMENT@https://RESOURCE.openai.azure.com",
                ))
            }
            (ProviderKind::Anthropic, None) => ANTHROPIC_BASE_URL.to_string(),
            (ProviderKind::Gemini, None) => GEMINI_BASE_URL.to_string(),
        };
        let model = model.trim();
        // These names become URL path segments: anything else would change the request.
        if matches!(kind, ProviderKind::Azure | ProviderKind::Gemini)
            && !model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
                    || (c == '/' && kind == ProviderKind::Gemini))
        {
            return Err(err(&format!(
                "`{model}` is not a valid {} name (letters, digits, `-`, `_`, `.`)",
                if kind == ProviderKind::Azure { "deployment" } else { "model" }
            )));
        }
        let api_version = match kind {
            ProviderKind::Azure => Some(
                match std::env::var(AZURE_API_VERSION_ENV) {
                    Ok(v) if !v.trim().is_empty() => check_api_version(v.trim())
                        .map_err(|m| err(&format!("{AZURE_API_VERSION_ENV}: {m}")))?,
                    _ => AZURE_API_VERSION.to_string(),
                },
            ),
            _ => None,
        };
        Ok(ProviderSpec {
            kind,
            model: model.to_string(),
            base_url: normalize_base_url(&base_url).map_err(|m| err(&m))?,
            api_version,
        })
    }

    /// Replaces the endpoint (`--base-url`), e.g. to point `openai/gpt-4o` at a proxy or at
    /// `mica llm-sim` for a dry run.
    pub fn with_base_url(mut self, url: &str) -> Result<Self, LlmError> {
        self.base_url = normalize_base_url(url).map_err(|message| LlmError::Spec {
            spec: url.to_string(),
            message,
        })?;
        Ok(self)
    }

    /// Sets Azure's `api-version` (a `--api-version` flag or a TOML key), overriding the
    /// environment and the default. Only for `azure`: the other providers version by path or
    /// header and would ignore it silently.
    pub fn with_api_version(mut self, version: &str) -> Result<Self, LlmError> {
        let err = |message: String| LlmError::Spec {
            spec: self.canonical(),
            message,
        };
        if self.kind != ProviderKind::Azure {
            return Err(err(format!(
                "an api-version applies to azure only, not {}",
                self.kind.as_str()
            )));
        }
        self.api_version = Some(check_api_version(version.trim()).map_err(err)?);
        Ok(self)
    }

    /// The canonical spec string, used as the classifier name in predictions.
    pub fn canonical(&self) -> String {
        match self.kind {
            // A deployment name only means something within its resource.
            ProviderKind::OpenAiCompatible | ProviderKind::Azure => {
                format!("llm:{}/{}@{}", self.kind.as_str(), self.model, self.base_url)
            }
            k => format!("llm:{}/{}", k.as_str(), self.model),
        }
    }
}

/// Removes credentials and query strings from a URL before it is shown to anyone
/// (`http://user:secret@host:1234/x?key=...` becomes `http://host:1234/x`).
pub fn redact_url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == ')' || c == '"')
            .unwrap_or(tail.len());
        let (url, after) = tail.split_at(end);
        let url = url.split(['?', '#']).next().unwrap_or("");
        let (authority, path) = match url.find('/') {
            Some(j) => url.split_at(j),
            None => (url, ""),
        };
        let host = authority.rsplit('@').next().unwrap_or(authority);
        out.push_str(host);
        out.push_str(path);
        rest = after;
    }
    out.push_str(rest);
    out
}

/// An `api-version` goes into the query string verbatim, so it must look like one
/// (`2024-10-21`, `2025-04-01-preview`) and carry nothing else.
fn check_api_version(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 40
        && v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "`{v}` is not an api-version (expected a date such as {AZURE_API_VERSION} or 2025-04-01-preview)"
        ))
    }
}

/// Ollama's own convention: `OLLAMA_HOST` may be `host:port` or a URL.
fn ollama_host_from_env() -> String {
    match std::env::var("OLLAMA_HOST") {
        Ok(h) if !h.trim().is_empty() => {
            let h = h.trim();
            if h.starts_with("http://") || h.starts_with("https://") {
                h.to_string()
            } else {
                format!("http://{h}")
            }
        }
        _ => OLLAMA_BASE_URL.to_string(),
    }
}

fn normalize_base_url(url: &str) -> Result<String, String> {
    let u = url.trim();
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        return Err(format!(
            "server address `{u}` must start with http:// or https://"
        ));
    }
    let mut u = u.trim_end_matches('/').to_string();
    if let Some(stripped) = u.strip_suffix("/v1") {
        u = stripped.to_string();
    }
    if u.len() <= "https://".len() {
        return Err(format!("server address `{url}` has no host"));
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_documented_forms() {
        let s = ProviderSpec::parse("llm:openai/gpt-4o").unwrap();
        assert_eq!((s.kind, s.model.as_str()), (ProviderKind::OpenAi, "gpt-4o"));
        assert_eq!(s.base_url, OPENAI_BASE_URL);

        let s = ProviderSpec::parse("ollama/llama3.2-vision:11b@http://gpu:11434/").unwrap();
        assert_eq!(s.kind, ProviderKind::Ollama);
        assert_eq!(s.model, "llama3.2-vision:11b");
        assert_eq!(s.base_url, "http://gpu:11434");

        let s = ProviderSpec::parse("openai-compatible/meta-llama/Llama-3.2-11B@http://h:8000/v1")
            .unwrap();
        assert_eq!(s.model, "meta-llama/Llama-3.2-11B");
        assert_eq!(s.base_url, "http://h:8000");
        assert_eq!(
            s.canonical(),
            "llm:openai-compatible/meta-llama/Llama-3.2-11B@http://h:8000"
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (spec, needle) in [
            ("gpt-4o", "PROVIDER/MODEL"),
            ("openai/", "empty"),
            ("bard/x", "unknown provider"),
            ("openai-compatible/m", "server address"),
            ("openai/m@http://", "no host"),
        ] {
            let e = ProviderSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }
}
