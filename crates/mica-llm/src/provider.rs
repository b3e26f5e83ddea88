//! The provider trait and its two wire protocols: OpenAI-compatible chat completions and
//! Ollama's native `/api/chat`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mica_core::TokenUsage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ProviderKind;

/// The response header by which `mica llm-sim` identifies itself, so its answers are stamped
/// SIMULATED and can never pass for a real model's.
pub const SIM_HEADER: &str = "x-mica-simulator";
/// The `system_fingerprint` the simulator puts in OpenAI-format responses.
pub const SIM_FINGERPRINT: &str = "mica-llm-sim";

/// OpenAI's image detail: `low` is a fixed 512x512 view at a small fixed token cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Detail {
    Low,
    High,
    Auto,
}

impl std::str::FromStr for Detail {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(Detail::Low),
            "high" => Ok(Detail::High),
            "auto" => Ok(Detail::Auto),
            o => Err(format!(
                "unknown image detail `{o}` (expected low, high or auto)"
            )),
        }
    }
}

/// Generation parameters; all of them are part of the cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenParams {
    pub temperature: f64,
    pub seed: Option<u64>,
    pub max_tokens: u32,
    pub detail: Detail,
    /// Ask for token log-probabilities (OpenAI format only; not every server has them).
    pub logprobs: bool,
    /// Send the JSON schema (`response_format` / `format`). Off for servers that reject it.
    pub structured: bool,
    /// OpenAI reasoning-model parameters (`max_completion_tokens`, no `temperature`, `top_p`
    /// or `logprobs`): `None` decides by [`is_reasoning_model`], `Some` overrides the rule.
    /// Left out of the serialised form when `None`, so cache keys of earlier runs still match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<bool>,
}

impl GenParams {
    /// Whether requests for `model` use the reasoning-model parameters: the override when
    /// set, else the naming rule of [`is_reasoning_model`].
    pub fn reasoning_for(&self, model: &str) -> bool {
        self.reasoning
            .unwrap_or_else(|| is_reasoning_model(model))
    }
}

/// The documented rule for OpenAI reasoning models, which reject `max_tokens`, a
/// `temperature` other than the default, `top_p` and `logprobs`: the model name (after any
/// `org/` prefix, case-insensitive) is `o1`, `o3` or `o4` alone or followed by `-`
/// (`o1-2024-12-17`, `o3-mini`, `o4-mini`), or starts with `gpt-5` (`gpt-5`, `gpt-5-mini`,
/// `gpt-5.1`). Everything else (`gpt-4o`, `gpt-4.1`, local models) keeps the classic
/// parameters; `reasoning = true|false` overrides the rule for a model it gets wrong.
pub fn is_reasoning_model(model: &str) -> bool {
    let name = model.rsplit('/').next().unwrap_or(model).to_ascii_lowercase();
    let o_series = ["o1", "o3", "o4"].iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    });
    o_series || name.starts_with("gpt-5")
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            temperature: 0.0,
            seed: Some(42),
            max_tokens: 200,
            detail: Detail::Low,
            logprobs: false,
            structured: true,
            reasoning: None,
        }
    }
}

/// One chat request: a system text, a user text and at most one image (Llama 3.2 Vision takes
/// one image per message, so mica never sends more).
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub system: String,
    pub user: String,
    /// Base64 of the PNG (no `data:` prefix); shared between the k samples of one image.
    pub image_b64: Option<Arc<str>>,
    /// The allowed labels: the `enum` of the answer schema.
    pub labels: Vec<String>,
    pub params: GenParams,
}

/// Ollama's timings, in milliseconds, so model-load time is reported apart from inference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerTimings {
    pub total_ms: f64,
    pub load_ms: f64,
    pub prompt_eval_ms: f64,
    pub eval_ms: f64,
}

/// A successful HTTP exchange. Whether the text means anything is decided by parsing later.
/// `Default` (an empty answer) lets clients fill in only what their API reports:
/// `ChatResponse { content, usage, ..Default::default() }`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The assistant's text (empty when the model refused).
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
    /// True when the server identified itself as `mica llm-sim`.
    #[serde(default)]
    pub simulated: bool,
    /// exp(sum of the log-probabilities of the label's tokens), when logprobs were returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob_confidence: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<ServerTimings>,
    /// Why generation stopped: OpenAI's `choices[0].finish_reason`, Ollama's `done_reason`
    /// (`stop`, `length`, ...). A `length` answer was cut off by `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The model the server says answered (the response's top-level `model`): for an alias
    /// such as `gpt-4o` the dated snapshot behind it (`gpt-4o-2024-08-06`). Cache entries keep
    /// it, so an answer from an older snapshot is recognised after the alias moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_model: Option<String>,
    /// OpenAI's `system_fingerprint`: identifies the serving configuration; it may change
    /// while the snapshot stays, so it is recorded, not used to invalidate answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Content digest of the weights (Ollama's `/api/tags` digest). Never part of a chat
    /// response on the wire: the runner fills it in from [`LlmProvider::model_digest`] before
    /// the answer is cached, so a replay reports the weights that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_digest: Option<String>,
    /// Round-trip time of the request that produced this answer (kept in the cache, so a
    /// cached answer still reports the latency it had).
    #[serde(default)]
    pub latency_ms: f64,
    /// Hidden reasoning tokens (OpenAI's `usage.completion_tokens_details.reasoning_tokens`).
    /// Already counted in `usage.completion` (OpenAI bills them as output and includes them
    /// in `completion_tokens`), so this is a breakdown, never added to the cost again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
}

/// Why a request failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError {
    pub retryable: bool,
    pub status: Option<u16>,
    /// From `retry-after-ms` or `Retry-After` (seconds).
    pub retry_after: Option<Duration>,
    pub message: String,
}

impl ProviderError {
    /// True when the server rejected the structured-output request itself (OpenAI's
    /// `response_format`/`json_schema`, Ollama's `format`, a schema or grammar it cannot
    /// compile), so the same request without the schema, asking for JSON in the prompt, can
    /// still work. Only 400, 422 and 501, and a 500 that names the schema (llama.cpp's
    /// "JSON schema conversion failed"), with the offending parameter named in the body.
    pub fn rejects_structured_output(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        let names_schema = [
            "response_format",
            "json_schema",
            "json schema",
            "responseschema",
            "response_schema",
            "structured output",
            "grammar",
            "guided",
            ".format",
            "\"format\"",
            "'format'",
            "invalid format",
            "format:",
        ]
        .iter()
        .any(|k| m.contains(k));
        match self.status {
            Some(400 | 422 | 501) => names_schema,
            Some(500) => m.contains("schema") || m.contains("grammar"),
            _ => false,
        }
    }

    /// True when a 400 says the model wants OpenAI's reasoning-model parameters: `max_tokens`
    /// refused in favour of `max_completion_tokens`, or `temperature`/`top_p`/`logprobs`
    /// "not supported with this model". The request can be sent again with them.
    pub fn wants_reasoning_params(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        self.status == Some(400)
            && (m.contains("max_completion_tokens")
                || ((m.contains("unsupported_parameter") || m.contains("unsupported_value")
                    || m.contains("not supported with this model"))
                    && ["temperature", "top_p", "logprobs"].iter().any(|k| m.contains(k))))
    }

    /// True when every further request would fail the same way: a bad or missing key (401,
    /// 403), an unknown model or path (404), a request the server rejects as malformed (400,
    /// 422), or a quota that is used up rather than a rate limit (429 `insufficient_quota`).
    /// A run stops on these instead of recording the whole split as failed.
    ///
    /// A content-policy block (400 `content_policy_violation`, or a 200 carrying an error
    /// object of that code) is permanent for that image: asking again gives the same answer.
    pub fn is_permanent(&self) -> bool {
        match self.status {
            Some(400 | 401 | 403 | 404 | 422) => true,
            Some(429) => self.message.contains("insufficient_quota"),
            _ => is_policy_block(&self.message),
        }
    }
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A chat backend. Object-safe so a run can hold `Arc<dyn LlmProvider>`.
pub trait LlmProvider: Send + Sync {
    fn kind(&self) -> ProviderKind;
    fn base_url(&self) -> &str;
    /// The exact JSON body `chat` sends for `req`.
    fn request_body(&self, req: &ChatRequest) -> Value;
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>>;
    /// The content digest of the weights the server would answer `model` with, for servers
    /// that report one before answering (Ollama's `GET /api/tags`). `Ok(None)`: the server
    /// has no such notion (the OpenAI formats; their snapshot only shows in each response's
    /// `model`). `Err`: it should have one but could not say.
    fn model_digest<'a>(
        &'a self,
        model: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, ProviderError>> {
        let _ = (model, timeout);
        Box::pin(async { Ok(None) })
    }
}

/// The structured answer: `label` restricted to the label set, a confidence and a rationale.
/// Written for OpenAI's strict mode: every property required, no additional properties, and
/// no `minimum`/`maximum` (not accepted by every strict-mode server).
pub fn answer_schema(labels: &[String]) -> Value {
    json!({
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": labels},
            "confidence": {"type": "number", "description": "confidence in the label, from 0 to 1"},
            "rationale": {"type": "string", "description": "one short sentence"}
        },
        "required": ["label", "confidence", "rationale"],
        "additionalProperties": false
    })
}

/// Builds an HTTP client for one run: connection pooling across the run's requests.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()
        .expect("building an HTTP client without custom TLS roots cannot fail")
}

/// OpenAI `POST {base}/v1/chat/completions`: OpenAI, vLLM, llama-server, Ollama `/v1`, llm-sim.
pub struct OpenAiClient {
    http: reqwest::Client,
    kind: ProviderKind,
    base_url: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl OpenAiClient {
    /// `api_key` is held in memory only: never logged, cached, or written.
    pub fn new(
        http: reqwest::Client,
        kind: ProviderKind,
        base_url: &str,
        api_key: Option<String>,
    ) -> Self {
        OpenAiClient {
            http,
            kind,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.filter(|k| !k.is_empty()),
        }
    }

    fn redact(&self, mut e: ProviderError) -> ProviderError {
        if let Some(k) = &self.api_key {
            e.message = e.message.replace(k.as_str(), "<redacted>");
        }
        e
    }
}

impl LlmProvider for OpenAiClient {
    fn kind(&self) -> ProviderKind {
        self.kind
    }
    fn base_url(&self) -> &str {
        &self.base_url
    }

    fn request_body(&self, req: &ChatRequest) -> Value {
        let mut user_parts = vec![json!({"type": "text", "text": req.user})];
        if let Some(b64) = &req.image_b64 {
            user_parts.push(json!({
                "type": "image_url",
                "image_url": {"url": format!("data:image/png;base64,{b64}"), "detail": req.params.detail}
            }));
        }
        let mut body = json!({
            "model": req.model,
            "messages": [
                {"role": "system", "content": req.system},
                {"role": "user", "content": user_parts}
            ],
        });
        let m = body.as_object_mut().expect("object");
        let reasoning = req.params.reasoning_for(&req.model);
        if reasoning {
            // The budget covers the hidden reasoning as well as the answer.
            m.insert("max_completion_tokens".into(), json!(req.params.max_tokens));
        } else {
            m.insert("temperature".into(), json!(req.params.temperature));
            m.insert("max_tokens".into(), json!(req.params.max_tokens));
        }
        if let Some(seed) = req.params.seed {
            m.insert("seed".into(), json!(seed));
        }
        if req.params.structured {
            m.insert(
                "response_format".into(),
                json!({
                    "type": "json_schema",
                    "json_schema": {"name": "classification", "strict": true, "schema": answer_schema(&req.labels)}
                }),
            );
        }
        if req.params.logprobs && !reasoning {
            m.insert("logprobs".into(), json!(true));
            m.insert("top_logprobs".into(), json!(5));
        }
        body
    }

    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(async move {
            let url = format!("{}/v1/chat/completions", self.base_url);
            let mut rb = self.http.post(&url).json(&self.request_body(req));
            if let Some(k) = &self.api_key {
                rb = rb.bearer_auth(k);
            }
            let (simulated, v) = send(rb, timeout, &url).await.map_err(|e| self.redact(e))?;
            parse_openai(&v, simulated).map_err(|e| self.redact(e))
        })
    }
}

/// Whether an error text is a provider's content-policy block (OpenAI's
/// `content_policy_violation`/`content_filter`, Azure's `ResponsibleAIPolicyViolation`).
fn is_policy_block(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["content_policy_violation", "content_filter", "responsibleaipolicyviolation"]
        .iter()
        .any(|k| m.contains(k))
}

/// Parses an OpenAI chat-completion body (also the shape Azure OpenAI returns).
pub fn parse_openai(v: &Value, sim_header: bool) -> Result<ChatResponse, ProviderError> {
    let bad = |m: &str| ProviderError {
        retryable: true,
        status: None,
        retry_after: None,
        message: format!("malformed chat completion: {m}"),
    };
    if let Some(err) = v.get("error") {
        return Err(ProviderError {
            retryable: false,
            status: None,
            retry_after: None,
            message: format!("server error: {}", short(&err.to_string())),
        });
    }
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| bad("no choices"))?;
    let msg = choice.get("message").ok_or_else(|| bad("no message"))?;
    let content = match msg.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        // Some servers return content parts even in responses.
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join(""),
        Some(other) => other.to_string(),
    };
    let refusal = msg
        .get("refusal")
        .and_then(|r| r.as_str())
        .map(|s| s.to_string());
    let usage = v.get("usage").map(|u| TokenUsage {
        prompt: u.get("prompt_tokens").and_then(|x| x.as_u64()).unwrap_or(0),
        completion: u
            .get("completion_tokens")
            .and_then(|x| x.as_u64())
            .unwrap_or(0),
    });
    let reasoning_tokens = v
        .pointer("/usage/completion_tokens_details/reasoning_tokens")
        .and_then(|x| x.as_u64());
    let tokens: Vec<(String, f64)> = choice
        .get("logprobs")
        .and_then(|l| l.get("content"))
        .and_then(|c| c.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some((
                        t.get("token")?.as_str()?.to_string(),
                        t.get("logprob")?.as_f64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let simulated =
        sim_header || v.get("system_fingerprint").and_then(|s| s.as_str()) == Some(SIM_FINGERPRINT);
    Ok(ChatResponse {
        content,
        refusal,
        usage,
        simulated,
        logprob_confidence: label_logprob_confidence(&tokens),
        timings: None,
        finish_reason: str_field(choice, "finish_reason"),
        resolved_model: str_field(v, "model"),
        system_fingerprint: str_field(v, "system_fingerprint"),
        model_digest: None,
        latency_ms: 0.0,
        reasoning_tokens,
    })
}

/// The probability the model gave its label: exp(sum of logprobs of the tokens that spell
/// the value of `"label"` in the JSON answer). `None` without logprobs or a label value.
pub fn label_logprob_confidence(tokens: &[(String, f64)]) -> Option<f64> {
    if tokens.is_empty() {
        return None;
    }
    let text: String = tokens.iter().map(|(t, _)| t.as_str()).collect();
    let key = text.find("\"label\"")?;
    let after = &text[key + 7..];
    let colon = after.find(':')?;
    let rest = &after[colon + 1..];
    let q1 = rest.find('"')?;
    let start = key + 7 + colon + 1 + q1 + 1;
    let len = text[start..].find('"')?;
    let end = start + len;
    if end == start {
        return None;
    }
    let mut pos = 0;
    let mut sum = 0.0;
    for (t, lp) in tokens {
        let (a, b) = (pos, pos + t.len());
        if b > start && a < end {
            sum += lp;
        }
        pos = b;
    }
    Some(sum.exp().clamp(0.0, 1.0))
}

/// Ollama native `POST {base}/api/chat` with `"stream": false`.
pub struct OllamaClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for OllamaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OllamaClient")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl OllamaClient {
    pub fn new(http: reqwest::Client, base_url: &str) -> Self {
        OllamaClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: None,
        }
    }

    /// Sends `Authorization: Bearer <key>` with every request, for an Ollama behind an
    /// authenticating proxy (or ollama.com). Held in memory only; an empty key sends nothing.
    pub fn with_api_key(mut self, api_key: Option<String>) -> Self {
        self.api_key = api_key.filter(|k| !k.trim().is_empty());
        self
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    fn redact(&self, mut e: ProviderError) -> ProviderError {
        if let Some(k) = &self.api_key {
            e.message = e.message.replace(k.as_str(), "<redacted>");
        }
        e
    }
}

impl LlmProvider for OllamaClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Ollama
    }
    fn base_url(&self) -> &str {
        &self.base_url
    }

    fn request_body(&self, req: &ChatRequest) -> Value {
        let mut user = json!({"role": "user", "content": req.user});
        if let Some(b64) = &req.image_b64 {
            user["images"] = json!([b64.as_ref()]);
        }
        let mut options =
            json!({"temperature": req.params.temperature, "num_predict": req.params.max_tokens});
        if let Some(seed) = req.params.seed {
            options["seed"] = json!(seed);
        }
        let mut body = json!({
            "model": req.model,
            "stream": false,
            "messages": [{"role": "system", "content": req.system}, user],
            "options": options,
        });
        if req.params.structured {
            body["format"] = answer_schema(&req.labels);
        }
        body
    }

    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(async move {
            let url = format!("{}/api/chat", self.base_url);
            let rb = self.authed(self.http.post(&url).json(&self.request_body(req)));
            let (simulated, v) = send(rb, timeout, &url).await.map_err(|e| self.redact(e))?;
            if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
                return Err(ProviderError {
                    retryable: false,
                    status: None,
                    retry_after: None,
                    message: format!("ollama error: {}", short(err)),
                });
            }
            let content = v
                .get("message")
                .and_then(|m| m.get("content"))
                .and_then(|c| c.as_str())
                .ok_or_else(|| ProviderError {
                    retryable: true,
                    status: None,
                    retry_after: None,
                    message: "malformed ollama response: no message.content".into(),
                })?
                .to_string();
            let ns = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0) / 1e6;
            let count = |k: &str| v.get(k).and_then(|x| x.as_u64());
            let usage = match (count("prompt_eval_count"), count("eval_count")) {
                (None, None) => None,
                (p, c) => Some(TokenUsage {
                    prompt: p.unwrap_or(0),
                    completion: c.unwrap_or(0),
                }),
            };
            Ok(ChatResponse {
                content,
                refusal: None,
                usage,
                simulated,
                logprob_confidence: None,
                timings: Some(ServerTimings {
                    total_ms: ns("total_duration"),
                    load_ms: ns("load_duration"),
                    prompt_eval_ms: ns("prompt_eval_duration"),
                    eval_ms: ns("eval_duration"),
                }),
                finish_reason: str_field(&v, "done_reason"),
                resolved_model: str_field(&v, "model"),
                system_fingerprint: None,
                model_digest: None,
                latency_ms: 0.0,
                reasoning_tokens: None,
            })
        })
    }

    /// `GET /api/tags` lists the local models with their digests (`/api/show` does not carry
    /// the digest in newer versions). One request per runner: the runner caches the answer.
    fn model_digest<'a>(
        &'a self,
        model: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, ProviderError>> {
        Box::pin(async move {
            let url = format!("{}/api/tags", self.base_url);
            let (_, v) = send(self.authed(self.http.get(&url)), timeout, &url)
                .await
                .map_err(|e| self.redact(e))?;
            let fail = |message: String| ProviderError {
                retryable: false,
                status: None,
                retry_after: None,
                message,
            };
            let models = v
                .get("models")
                .and_then(|m| m.as_array())
                .ok_or_else(|| fail(format!("{url}: no `models` list in the answer")))?;
            let entry = models
                .iter()
                .find(|m| {
                    ["name", "model"].iter().any(|k| {
                        m.get(*k)
                            .and_then(|n| n.as_str())
                            .is_some_and(|n| ollama_names_match(model, n))
                    })
                })
                .ok_or_else(|| {
                    fail(format!(
                        "{url}: model `{model}` is not among the {} models listed",
                        models.len()
                    ))
                })?;
            match str_field(entry, "digest").filter(|d| !d.is_empty()) {
                Some(d) => Ok(Some(d)),
                None => Err(fail(format!("{url}: model `{model}` is listed without a digest"))),
            }
        })
    }
}

/// Whether two Ollama model names denote the same model under Ollama's defaults: a name
/// without a tag means `:latest`, and `registry.ollama.ai/library/` may be left out. Names
/// compare case-insensitively, as Ollama's do.
pub fn ollama_names_match(a: &str, b: &str) -> bool {
    fn canonical(name: &str) -> String {
        let n = name.trim().to_ascii_lowercase();
        let n = n.strip_prefix("registry.ollama.ai/").unwrap_or(&n);
        let n = n.strip_prefix("library/").unwrap_or(n);
        // The tag follows the last `:` after the last `/` (a registry host may carry a port).
        let last = n.rsplit('/').next().unwrap_or(n);
        if last.contains(':') {
            n.to_string()
        } else {
            format!("{n}:latest")
        }
    }
    canonical(a) == canonical(b)
}

pub(crate) fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .filter(|x| !x.is_empty())
        .map(|x| x.to_string())
}

pub(crate) fn short(s: &str) -> String {
    let t: String = s.chars().take(300).collect();
    t.replace('\n', " ")
}

/// Sends one request; classifies every failure as retryable or not. Returns whether the
/// server identified itself as the simulator, and the JSON body.
async fn send(
    rb: reqwest::RequestBuilder,
    timeout: Duration,
    url: &str,
) -> Result<(bool, Value), ProviderError> {
    let r = send_raw(rb, timeout, url).await?;
    if !(200..300).contains(&r.status) {
        return Err(http_error(url, r.status, r.retry_after, &r.body));
    }
    Ok((r.simulated, json_body(url, r.status, &r.body)?))
}

/// An HTTP exchange that completed, whatever its status: the native clients (Azure,
/// Anthropic, Gemini) read their own error bodies before falling back to [`http_error`].
pub(crate) struct RawReply {
    pub status: u16,
    pub simulated: bool,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// Sends one request; only transport failures (no connection, timeout, cut-off body) are
/// errors here, all retryable.
pub(crate) async fn send_raw(
    rb: reqwest::RequestBuilder,
    timeout: Duration,
    url: &str,
) -> Result<RawReply, ProviderError> {
    // These messages reach logs, predictions and the terminal: never a URL's user-info or
    // query (a token), whatever the caller passed.
    let url = &crate::spec::redact_url(url);
    let resp = rb
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| ProviderError {
            retryable: true,
            status: None,
            retry_after: None,
            message: if e.is_timeout() {
                format!("{url}: no answer within {:.1} s", timeout.as_secs_f64())
            } else if e.is_connect() {
                format!("{url}: cannot connect: {}", root_cause(&e))
            } else {
                format!("{url}: {}", root_cause(&e))
            },
        })?;
    let status = resp.status();
    let simulated = resp.headers().contains_key(SIM_HEADER);
    let retry_after = retry_after(resp.headers());
    let bytes = resp.bytes().await.map_err(|e| ProviderError {
        retryable: true,
        status: Some(status.as_u16()),
        retry_after,
        message: if e.is_timeout() {
            format!("{url}: no answer within {:.1} s", timeout.as_secs_f64())
        } else {
            format!("{url}: reading the response: {}", root_cause(&e))
        },
    })?;
    Ok(RawReply {
        status: status.as_u16(),
        simulated,
        retry_after,
        body: bytes.to_vec(),
    })
}

/// The error for a non-2xx answer: whether waiting can help is decided here for every
/// provider, so the run engine's retry and fail-fast rules treat them all alike.
pub(crate) fn http_error(
    url: &str,
    code: u16,
    retry_after: Option<Duration>,
    bytes: &[u8],
) -> ProviderError {
    // An exhausted quota answers 429 too, but waiting does not refill it.
    let quota = code == 429 && String::from_utf8_lossy(bytes).contains("insufficient_quota");
    // As in `send_raw`: the URL is named without its user-info or query, whatever was passed.
    ProviderError {
        retryable: (matches!(code, 408 | 409 | 425 | 429) && !quota) || (500..600).contains(&code),
        status: Some(code),
        retry_after,
        message: format!(
            "{}: HTTP {code}: {}",
            crate::spec::redact_url(url),
            short(&String::from_utf8_lossy(bytes))
        ),
    }
}

/// A 2xx body as JSON; anything else (an HTML page from a proxy) is a retryable error.
pub(crate) fn json_body(url: &str, status: u16, bytes: &[u8]) -> Result<Value, ProviderError> {
    serde_json::from_slice(bytes).map_err(|e| ProviderError {
        retryable: true,
        status: Some(status),
        retry_after: None,
        message: format!("{}: response is not JSON ({e})", crate::spec::redact_url(url)),
    })
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `retry-after-ms` (OpenAI) wins over `Retry-After`, which may be seconds or an HTTP date
/// (RFC 9110; a date in the past means "now").
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    retry_after_at(h, std::time::SystemTime::now())
}

fn retry_after_at(h: &reqwest::header::HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|x| x.is_finite() && *x >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The variable the API key is read from when a run names none.
pub const OPENAI_API_KEY_ENV: &str = "OPENAI_API_KEY";
/// The native Ollama client's optional bearer token (an Ollama behind an authenticating
/// proxy, or ollama.com), read when the run names no other variable.
pub const OLLAMA_API_KEY_ENV: &str = "OLLAMA_API_KEY";

/// Builds the client for a spec. The API key is read from the environment variable named
/// `api_key_env` (required for `openai`, optional for `openai-compatible`); it stays in
/// memory and is never printed or written. For `ollama`, a key is optional and sent as
/// `Authorization: Bearer`: from `api_key_env` when it names a variable other than the
/// OpenAI default, else from `OLLAMA_API_KEY`.
pub fn build_provider(
    spec: &crate::ProviderSpec,
    api_key_env: &str,
    http: reqwest::Client,
) -> Result<Arc<dyn LlmProvider>, crate::LlmError> {
    let key = std::env::var(api_key_env)
        .ok()
        .filter(|k| !k.trim().is_empty());
    Ok(match spec.kind {
        ProviderKind::Ollama => {
            let env = if api_key_env == OPENAI_API_KEY_ENV {
                OLLAMA_API_KEY_ENV
            } else {
                api_key_env
            };
            let key = std::env::var(env).ok();
            Arc::new(OllamaClient::new(http, &spec.base_url).with_api_key(key))
        }
        ProviderKind::Azure | ProviderKind::Anthropic | ProviderKind::Gemini => {
            return crate::native::build(spec, api_key_env, http)
        }
        ProviderKind::OpenAi if key.is_none() && spec.base_url == crate::spec::OPENAI_BASE_URL => {
            return Err(crate::LlmError::Config(format!(
                "environment variable {api_key_env} is not set: the OpenAI API needs a key \
                 (or use --base-url to point at a compatible server)"
            )))
        }
        kind => Arc::new(OpenAiClient::new(http, kind, &spec.base_url, key)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status and body errors name the server without a URL's user-info or query token.
    #[test]
    fn error_messages_never_carry_url_secrets() {
        let url = "http://mica:urlpw-77ab@127.0.0.1:9/v1/chat/completions?key=qkey-31cd";
        let status = http_error(url, 401, None, b"{\"error\":{\"message\":\"bad key\"}}");
        let body = json_body(url, 200, b"<html>proxy</html>").unwrap_err();
        for e in [status, body] {
            assert!(e.message.starts_with("http://127.0.0.1:9/v1/chat/completions: "), "{}", e.message);
            assert!(!e.message.contains("urlpw") && !e.message.contains("qkey"), "{}", e.message);
        }
    }

    #[test]
    fn retry_after_reads_milliseconds_seconds_and_http_dates() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let with = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            retry_after_at(&h, now)
        };
        assert_eq!(with(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(with(&[("retry-after", "1.5")]), Some(Duration::from_millis(1500)));
        assert_eq!(
            with(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            Some(Duration::from_millis(250)),
            "OpenAI's millisecond header wins"
        );
        assert_eq!(with(&[("retry-after", "Sun, 06 Nov 1994 08:50:07 GMT")]), Some(Duration::from_secs(30)));
        assert_eq!(
            with(&[("retry-after", "Sun, 06 Nov 1994 08:40:00 GMT")]),
            Some(Duration::ZERO),
            "a date in the past means retry now"
        );
        assert_eq!(with(&[("retry-after", "soon")]), None);
        assert_eq!(with(&[("retry-after", "-3")]), None);
        assert_eq!(with(&[]), None);
    }

    #[test]
    fn logprob_confidence_covers_the_label_tokens_only() {
        let toks: Vec<(String, f64)> = [
            ("{\"", -0.01),
            ("label", 0.0),
            ("\":\"", 0.0),
            ("cov", (0.5f64).ln()),
            ("id", (0.8f64).ln()),
            ("\",\"", -0.2),
            ("confidence\":0.9}", -1.0),
        ]
        .iter()
        .map(|(t, l)| (t.to_string(), *l))
        .collect();
        let c = label_logprob_confidence(&toks).unwrap();
        assert!((c - 0.4).abs() < 1e-9, "{c}");
        assert_eq!(label_logprob_confidence(&[]), None);
    }

    #[test]
    fn openai_response_parsing_reads_usage_refusal_and_fingerprint() {
        let v = json!({"choices":[{"message":{"content":null,"refusal":"I can't"},"finish_reason":"stop"}],
                       "usage":{"prompt_tokens":90,"completion_tokens":3},"system_fingerprint":"mica-llm-sim"});
        let r = parse_openai(&v, false).unwrap();
        assert_eq!(r.content, "");
        assert_eq!(r.refusal.as_deref(), Some("I can't"));
        assert_eq!(
            r.usage,
            Some(TokenUsage {
                prompt: 90,
                completion: 3
            })
        );
        assert!(r.simulated);
        assert_eq!(r.system_fingerprint.as_deref(), Some("mica-llm-sim"));
        assert_eq!((r.resolved_model, r.finish_reason.as_deref()), (None, Some("stop")));
        let v = json!({"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_44709d6fcb",
                       "choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"length"}]});
        let r = parse_openai(&v, false).unwrap();
        assert_eq!(r.resolved_model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert!(!r.simulated);
        assert!(
            parse_openai(&json!({"choices": []}), false)
                .unwrap_err()
                .retryable
        );
    }

    #[test]
    fn ollama_names_follow_the_default_tag_rule() {
        assert!(ollama_names_match("llama3.2-vision", "llama3.2-vision:latest"));
        assert!(ollama_names_match("llama3.2-vision:latest", "llama3.2-vision"));
        assert!(ollama_names_match("Llama3.2-Vision", "llama3.2-vision:latest"));
        assert!(ollama_names_match(
            "registry.ollama.ai/library/llava:13b",
            "llava:13b"
        ));
        assert!(ollama_names_match("llama3.2-vision:11b", "llama3.2-vision:11b"));
        assert!(!ollama_names_match("llama3.2-vision", "llama3.2-vision:11b"));
        assert!(!ollama_names_match("llama3.2-vision", "llava:latest"));
        // A registry port is not a tag.
        assert!(ollama_names_match("localhost:5000/me/vlm", "localhost:5000/me/vlm:latest"));
        assert!(!ollama_names_match("localhost:5000/me/vlm", "localhost:5000/me/vlm:q4"));
    }
}
