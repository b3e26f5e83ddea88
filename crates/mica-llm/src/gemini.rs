//! Google's Generative Language API: `POST {base}/v1beta/models/{model}:generateContent` with
//! the key in `x-goog-api-key` (never in the `?key=` query, which would end up in logs).
//!
//! The image is an `inline_data` part, the structured answer a `responseSchema` (Gemini's
//! OpenAPI subset: upper-case types, no `additionalProperties`). A prompt blocked by the
//! safety filters (`promptFeedback.blockReason`) or an answer withheld by them (`finishReason`
//! `SAFETY`, `PROHIBITED_CONTENT`, ...) is the provider declining: outcome `refused`.

use std::time::Duration;

use mica_core::TokenUsage;
use serde_json::{json, Value};

use crate::provider::{
    http_error, json_body, send_raw, short, str_field, BoxFuture, ChatRequest, ChatResponse,
    LlmProvider, ProviderError,
};
use crate::ProviderKind;

/// `finishReason`s that mean the safety system withheld the answer.
const SAFETY_FINISH: &[&str] = &[
    "SAFETY",
    "PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "IMAGE_SAFETY",
];

/// Output tokens added for a thinking model's thoughts when the run did not size the budget
/// for reasoning itself (see [`thinks`]).
pub const THINKING_ALLOWANCE: u32 = 2048;

/// Gemini 2.5 and later think before answering by default, and their thoughts count
/// against `maxOutputTokens`: mica's answer budget (200 tokens) would be spent before the
/// answer began and every answer would end `MAX_TOKENS`.
pub fn thinks(model: &str) -> bool {
    let m = model.strip_prefix("models/").unwrap_or(model);
    m.starts_with("gemini-2.5") || m.starts_with("gemini-3")
}

pub struct GeminiClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for GeminiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeminiClient")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The answer schema in Gemini's `responseSchema` dialect; `propertyOrdering` keeps the
/// label first, as in the other providers' answers.
pub fn gemini_answer_schema(labels: &[String]) -> Value {
    json!({
        "type": "OBJECT",
        "properties": {
            "label": {"type": "STRING", "format": "enum", "enum": labels},
            "confidence": {"type": "NUMBER", "description": "confidence in the label, from 0 to 1"},
            "rationale": {"type": "STRING", "description": "one short sentence"}
        },
        "required": ["label", "confidence", "rationale"],
        "propertyOrdering": ["label", "confidence", "rationale"]
    })
}

impl GeminiClient {
    /// `api_key` is held in memory only: never logged, cached, or written.
    pub fn new(http: reqwest::Client, base_url: &str, api_key: Option<String>) -> Self {
        GeminiClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.filter(|k| !k.trim().is_empty()),
        }
    }

    /// `models/gemini-2.0-flash` and `gemini-2.0-flash` name the same model.
    pub fn endpoint(&self, model: &str) -> String {
        let m = model.strip_prefix("models/").unwrap_or(model);
        format!("{}/v1beta/models/{m}:generateContent", self.base_url)
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
        let url = self.endpoint(&req.model);
        let mut rb = self.http.post(&url).json(&self.request_body(req));
        if let Some(k) = &self.api_key {
            rb = rb.header("x-goog-api-key", k);
        }
        let r = send_raw(rb, timeout, &url).await?;
        if !(200..300).contains(&r.status) {
            return Err(classify_error(&url, r.status, r.retry_after, &r.body));
        }
        let v = json_body(&url, r.status, &r.body)?;
        let mut resp = parse_generate(&v)?;
        resp.simulated |= r.simulated;
        Ok(resp)
    }
}

/// Google's errors carry their own hints: a `RetryInfo.retryDelay` when no `Retry-After`
/// header came, and for 429 a `QuotaFailure` whose per-day quota will not refill within a
/// run (a per-minute one will).
fn classify_error(
    url: &str,
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> ProviderError {
    let mut e = http_error(url, status, retry_after, body);
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return e;
    };
    let details = v
        .pointer("/error/details")
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    let of_type = |suffix: &str| {
        details.iter().find(|d| {
            d.get("@type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with(suffix))
        })
    };
    if e.retry_after.is_none() {
        e.retry_after = of_type("google.rpc.RetryInfo")
            .and_then(|d| d.get("retryDelay"))
            .and_then(|d| d.as_str())
            .and_then(|d| d.strip_suffix('s'))
            .and_then(|d| d.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
    }
    if status == 429 {
        let per_day = of_type("google.rpc.QuotaFailure")
            .and_then(|d| d.get("violations"))
            .and_then(|v| v.as_array())
            .is_some_and(|vs| {
                vs.iter().any(|q| {
                    q.get("quotaId")
                        .and_then(|id| id.as_str())
                        .is_some_and(|id| id.contains("PerDay"))
                })
            });
        if per_day {
            e.retryable = false;
        }
    }
    if let (Some(st), Some(msg)) = (
        v.pointer("/error/status").and_then(|s| s.as_str()),
        v.pointer("/error/message").and_then(|s| s.as_str()),
    ) {
        e.message = format!("{url}: HTTP {status} {st}: {}", short(msg));
    }
    e
}

impl LlmProvider for GeminiClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Gemini
    }
    fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Image before text, as Google's vision examples do. The seed is sent when it fits
    /// Gemini's int32; logprobs and image detail are not sent (not every model has them).
    fn request_body(&self, req: &ChatRequest) -> Value {
        let mut parts = Vec::new();
        if let Some(b64) = &req.image_b64 {
            parts.push(json!({"inline_data": {"mime_type": "image/png", "data": b64.as_ref()}}));
        }
        parts.push(json!({"text": req.user}));
        // With `reasoning = true` the run already sized the budget for thinking
        // (mica-run's reasoning default); otherwise the thoughts get their own allowance on top
        // of the answer's budget.
        let max_output = if thinks(&req.model) && req.params.reasoning.is_none() {
            req.params.max_tokens.saturating_add(THINKING_ALLOWANCE)
        } else {
            req.params.max_tokens
        };
        let mut config = json!({
            "temperature": req.params.temperature,
            "maxOutputTokens": max_output,
        });
        if let Some(seed) = req.params.seed.and_then(|s| i32::try_from(s).ok()) {
            config["seed"] = json!(seed);
        }
        if req.params.structured {
            config["responseMimeType"] = json!("application/json");
            config["responseSchema"] = gemini_answer_schema(&req.labels);
        }
        let mut body = json!({
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": config,
        });
        if !req.system.is_empty() {
            body["systemInstruction"] = json!({"parts": [{"text": req.system}]});
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

/// Reads a `GenerateContentResponse`.
pub(crate) fn parse_generate(v: &Value) -> Result<ChatResponse, ProviderError> {
    let usage = v.get("usageMetadata").map(|u| {
        let n = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        TokenUsage {
            prompt: n("promptTokenCount"),
            // Thinking tokens are billed as output.
            completion: n("candidatesTokenCount") + n("thoughtsTokenCount"),
        }
    });
    // Gemini counts thinking apart from the answer (`candidatesTokenCount` excludes it);
    // mica's completion count includes it, as OpenAI's does, with the breakdown beside.
    let reasoning_tokens = v
        .pointer("/usageMetadata/thoughtsTokenCount")
        .and_then(|x| x.as_u64());
    let resolved_model = str_field(v, "modelVersion");
    let candidate = v.get("candidates").and_then(|c| c.get(0));
    let block = v
        .pointer("/promptFeedback/blockReason")
        .and_then(|b| b.as_str());
    let finish = candidate.and_then(|c| str_field(c, "finishReason"));
    let refusal = match (block, finish.as_deref()) {
        (Some(b), _) => Some(format!(
            "Gemini blocked the prompt (blockReason: {b}){}",
            v.pointer("/promptFeedback/blockReasonMessage")
                .and_then(|m| m.as_str())
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )),
        (None, Some(f)) if SAFETY_FINISH.contains(&f) => {
            Some(format!("Gemini withheld the answer (finishReason: {f})"))
        }
        _ => None,
    };
    let respond = |content: String| ChatResponse {
        content,
        refusal: refusal.clone(),
        usage,
        simulated: false,
        logprob_confidence: None,
        timings: None,
        finish_reason: finish.clone().or_else(|| block.map(|b| b.to_string())),
        resolved_model: resolved_model.clone(),
        reasoning_tokens,
        ..ChatResponse::default()
    };
    if refusal.is_some() {
        return Ok(respond(String::new()));
    }
    let candidate = candidate.ok_or_else(|| ProviderError {
        retryable: true,
        status: None,
        retry_after: None,
        message: "malformed Gemini response: no candidates and no block reason".into(),
    })?;
    // Thought summaries (`thought: true`) are not the answer.
    let text = candidate
        .pointer("/content/parts")
        .and_then(|p| p.as_array())
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p.get("thought").and_then(|t| t.as_bool()) != Some(true))
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default();
    Ok(respond(text))
}
