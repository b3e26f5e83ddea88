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
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Ollama => "ollama",
            ProviderKind::OpenAiCompatible => "openai-compatible",
        }
    }

    /// Both OpenAI flavours share one client; only the default endpoint and key policy differ.
    pub fn speaks_openai(self) -> bool {
        matches!(self, ProviderKind::OpenAi | ProviderKind::OpenAiCompatible)
    }
}

pub const OPENAI_BASE_URL: &str = "https://api.openai.com";
pub const OLLAMA_BASE_URL: &str = "http://localhost:11434";

/// A parsed classifier spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderSpec {
    pub kind: ProviderKind,
    pub model: String,
    /// Server root without a trailing `/` or `/v1` (the clients append their paths).
    pub base_url: String,
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
            other => {
                return Err(err(&format!(
                    "unknown provider `{other}` (expected openai, ollama or openai-compatible)"
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
        };
        Ok(ProviderSpec {
            kind,
            model: model.trim().to_string(),
            base_url: normalize_base_url(&base_url).map_err(|m| err(&m))?,
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

    /// The canonical spec string, used as the classifier name in predictions.
    pub fn canonical(&self) -> String {
        match self.kind {
            ProviderKind::OpenAiCompatible => {
                format!("llm:openai-compatible/{}@{}", self.model, self.base_url)
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
