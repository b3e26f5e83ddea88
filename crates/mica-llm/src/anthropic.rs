//! Anthropic's Messages API: `POST {base}/v1/messages` with `x-api-key` and
//! `anthropic-version` headers, the image as a base64 source block.
//!
//! The structured answer is a forced tool call: one tool whose `input_schema` is the answer
//! schema, chosen by `tool_choice`, so the model's `input` object is the answer. Without
//! structured output the prompt's own JSON instructions stand alone.

use std::time::Duration;

use mica_core::TokenUsage;
use serde_json::{json, Value};

use crate::provider::{
    answer_schema, http_error, json_body, send_raw, str_field, BoxFuture, ChatRequest,
    ChatResponse, LlmProvider, ProviderError,
};
use crate::ProviderKind;

/// The API version header every request carries (the only stable version of the Messages
/// API's wire format).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// The name of the forced tool whose input is the answer.
pub const ANSWER_TOOL: &str = "record_classification";

pub struct AnthropicClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for AnthropicClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnthropicClient")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl AnthropicClient {
    /// `api_key` is held in memory only: never logged, cached, or written.
    pub fn new(http: reqwest::Client, base_url: &str, api_key: Option<String>) -> Self {
        AnthropicClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.filter(|k| !k.trim().is_empty()),
        }
    }

    fn redact(&self, mut e: ProviderError) -> ProviderError {
        if let Some(k) = &self.api_key {
            e.message = e.message.replace(k.as_str(), "<redacted>");
        }
        e
    }

    async fn exchange(
        &self,
        req: &ChatRequest,
        timeout: Duration,
    ) -> Result<ChatResponse, ProviderError> {
        let url = format!("{}/v1/messages", self.base_url);
        let mut rb = self
            .http
            .post(&url)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&self.request_body(req));
        if let Some(k) = &self.api_key {
            rb = rb.header("x-api-key", k);
        }
        let r = send_raw(rb, timeout, &url).await?;
        if !(200..300).contains(&r.status) {
            let mut e = http_error(&url, r.status, r.retry_after, &r.body);
            // A 429 for the monthly spend cap has the rate limit's type but will not clear
            // by waiting (its `error.details.error_code` tells them apart).
            if r.status == 429
                && String::from_utf8_lossy(&r.body).contains("enforced_spend_limit_reached")
            {
                e.retryable = false;
            }
            return Err(e);
        }
        let v = json_body(&url, r.status, &r.body)?;
        let mut resp = parse_message(&v)?;
        resp.simulated |= r.simulated;
        Ok(resp)
    }
}

impl LlmProvider for AnthropicClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }
    fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The image goes before the text, as Anthropic recommends for vision prompts. Seed,
    /// logprobs and image detail have no Messages API equivalent and are not sent.
    fn request_body(&self, req: &ChatRequest) -> Value {
        let mut content = Vec::new();
        if let Some(b64) = &req.image_b64 {
            content.push(json!({
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": b64.as_ref()}
            }));
        }
        content.push(json!({"type": "text", "text": req.user}));
        let mut body = json!({
            "model": req.model,
            "max_tokens": req.params.max_tokens,
            "messages": [{"role": "user", "content": content}],
            "temperature": req.params.temperature,
        });
        let m = body.as_object_mut().expect("object");
        if !req.system.is_empty() {
            m.insert("system".into(), json!(req.system));
        }
        if req.params.structured {
            m.insert(
                "tools".into(),
                json!([{
                    "name": ANSWER_TOOL,
                    "description": "Record the classification of the image: one allowed label, a confidence from 0 to 1 and a one-sentence rationale.",
                    "input_schema": answer_schema(&req.labels),
                }]),
            );
            m.insert(
                "tool_choice".into(),
                json!({"type": "tool", "name": ANSWER_TOOL}),
            );
        }
        body
    }

    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(async move {
            self.exchange(req, timeout)
                .await
                .map_err(|e| self.redact(e))
        })
    }
}

/// Reads a Messages API response. The answer tool's `input` (as JSON text) wins over any
/// text blocks; a `stop_reason` of `refusal` is the model declining.
pub(crate) fn parse_message(v: &Value) -> Result<ChatResponse, ProviderError> {
    let bad = |m: &str| ProviderError {
        retryable: true,
        status: None,
        retry_after: None,
        message: format!("malformed Anthropic message: {m}"),
    };
    if v.get("type").and_then(|t| t.as_str()) == Some("error") {
        return Err(ProviderError {
            retryable: false,
            status: None,
            retry_after: None,
            message: format!(
                "server error: {}",
                crate::provider::short(&v.get("error").unwrap_or(v).to_string())
            ),
        });
    }
    let blocks = v
        .get("content")
        .and_then(|c| c.as_array())
        .ok_or_else(|| bad("no content"))?;
    let tool_input = blocks
        .iter()
        .find(|b| b.get("type").and_then(|t| t.as_str()) == Some("tool_use"))
        .and_then(|b| b.get("input"));
    let text: String = blocks
        .iter()
        .filter(|b| b.get("type").and_then(|t| t.as_str()) == Some("text"))
        .filter_map(|b| b.get("text").and_then(|t| t.as_str()))
        .collect::<Vec<_>>()
        .join("");
    let content = match tool_input {
        Some(input) => input.to_string(),
        None => text.clone(),
    };
    let stop_reason = str_field(v, "stop_reason");
    let refusal = (stop_reason.as_deref() == Some("refusal")).then(|| {
        if text.trim().is_empty() {
            "the model declined to answer (stop_reason: refusal)".to_string()
        } else {
            text.clone()
        }
    });
    let usage = v.get("usage").map(|u| {
        let n = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        TokenUsage {
            // Cache writes and reads are input too (mica sets no cache breakpoints, so both
            // stay 0 unless a proxy adds them).
            prompt: n("input_tokens")
                + n("cache_creation_input_tokens")
                + n("cache_read_input_tokens"),
            completion: n("output_tokens"),
        }
    });
    Ok(ChatResponse {
        content: if refusal.is_some() {
            String::new()
        } else {
            content
        },
        refusal,
        usage,
        simulated: false,
        logprob_confidence: None,
        timings: None,
        finish_reason: stop_reason,
        resolved_model: str_field(v, "model"),
        ..ChatResponse::default()
    })
}
