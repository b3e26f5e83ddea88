//! Azure OpenAI: OpenAI's chat completions behind a resource endpoint, addressed by
//! deployment (`POST {resource}/openai/deployments/{deployment}/chat/completions?api-version=`),
//! authenticated by an `api-key` header or an Entra ID bearer token.
//!
//! The body and the answer are OpenAI's, so both go through the OpenAI client's builder and
//! parser; only Azure's content filter needs its own reading: a prompt it blocks answers 400
//! with `code: "content_filter"`, an answer it cuts answers `finish_reason: "content_filter"`.
//! Both are the provider declining this one image, recorded as `refused` (never retried, and
//! never ending the run the way a real 400 does).

use std::time::Duration;

use serde_json::Value;

use crate::provider::{
    http_error, json_body, parse_openai, send_raw, BoxFuture, ChatRequest, ChatResponse,
    LlmProvider, OpenAiClient, ProviderError,
};
use crate::ProviderKind;

/// How the client proves itself to the resource.
#[derive(Clone, PartialEq, Eq)]
pub enum AzureAuth {
    /// `api-key: <key>` (the resource's key 1 or 2).
    ApiKey(String),
    /// `Authorization: Bearer <token>` (a Microsoft Entra ID token for
    /// `https://cognitiveservices.azure.com/.default`).
    Bearer(String),
    /// Nothing: only for a gateway that adds its own credentials.
    None,
}

impl std::fmt::Debug for AzureAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AzureAuth::ApiKey(_) => "ApiKey(<redacted>)",
            AzureAuth::Bearer(_) => "Bearer(<redacted>)",
            AzureAuth::None => "None",
        })
    }
}

/// One deployment of one Azure OpenAI resource.
pub struct AzureClient {
    http: reqwest::Client,
    base_url: String,
    deployment: String,
    api_version: String,
    auth: AzureAuth,
    /// Builds the (OpenAI-format) body; never sends anything itself.
    openai: OpenAiClient,
}

impl std::fmt::Debug for AzureClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureClient")
            .field("base_url", &self.base_url)
            .field("deployment", &self.deployment)
            .field("api_version", &self.api_version)
            .field("auth", &self.auth)
            .finish()
    }
}

impl AzureClient {
    /// `base_url` is the resource endpoint (`https://<resource>.openai.azure.com`); the
    /// credentials stay in memory only.
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        deployment: &str,
        api_version: &str,
        auth: AzureAuth,
    ) -> Self {
        let auth = match auth {
            AzureAuth::ApiKey(k) | AzureAuth::Bearer(k) if k.trim().is_empty() => AzureAuth::None,
            a => a,
        };
        AzureClient {
            openai: OpenAiClient::new(http.clone(), ProviderKind::Azure, base_url, None),
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            deployment: deployment.to_string(),
            api_version: api_version.to_string(),
            auth,
        }
    }

    /// The chat-completions path of the deployment, without the query (what error messages
    /// show).
    pub fn endpoint(&self) -> String {
        format!(
            "{}/openai/deployments/{}/chat/completions",
            self.base_url, self.deployment
        )
    }

    fn redact(&self, mut e: ProviderError) -> ProviderError {
        if let AzureAuth::ApiKey(k) | AzureAuth::Bearer(k) = &self.auth {
            e.message = e.message.replace(k.as_str(), "<redacted>");
        }
        e
    }

    async fn exchange(
        &self,
        req: &ChatRequest,
        timeout: Duration,
    ) -> Result<ChatResponse, ProviderError> {
        let shown = self.endpoint();
        // The version was checked to be `[0-9A-Za-z.-]` (spec.rs): nothing to escape.
        let url = format!("{shown}?api-version={}", self.api_version);
        let mut rb = self.http.post(&url).json(&self.request_body(req));
        rb = match &self.auth {
            AzureAuth::ApiKey(k) => rb.header("api-key", k),
            AzureAuth::Bearer(t) => rb.bearer_auth(t),
            AzureAuth::None => rb,
        };
        let r = send_raw(rb, timeout, &shown).await?;
        if !(200..300).contains(&r.status) {
            if let Some(refusal) = content_filter_block(r.status, &r.body) {
                return Ok(refused(refusal, r.simulated));
            }
            return Err(http_error(&shown, r.status, r.retry_after, &r.body));
        }
        let v = json_body(&shown, r.status, &r.body)?;
        let mut resp = parse_openai(&v, r.simulated)?;
        if resp.finish_reason.as_deref() == Some("content_filter") && resp.refusal.is_none() {
            // The answer may hold a partial text; the filter's verdict is the outcome.
            resp.refusal = Some(format!(
                "Azure content filter stopped the answer{}",
                filtered_categories(v.pointer("/choices/0/content_filter_results"))
            ));
        }
        Ok(resp)
    }
}

/// The refusal text when a non-2xx answer is Azure's content filter blocking the prompt.
fn content_filter_block(status: u16, body: &[u8]) -> Option<String> {
    if status != 400 {
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error")?;
    let code = err.get("code").and_then(|c| c.as_str());
    let inner = err.pointer("/innererror/code").and_then(|c| c.as_str());
    if code != Some("content_filter") && inner != Some("ResponsibleAIPolicyViolation") {
        return None;
    }
    Some(format!(
        "Azure content filter blocked the prompt{}",
        filtered_categories(err.pointer("/innererror/content_filter_result"))
    ))
}

/// ` (hate, violence)`: the categories the filter flagged, when it says.
fn filtered_categories(results: Option<&Value>) -> String {
    let Some(Value::Object(m)) = results else {
        return String::new();
    };
    let hit: Vec<&str> = m
        .iter()
        .filter(|(_, r)| {
            r.get("filtered").and_then(|f| f.as_bool()) == Some(true)
                || r.get("detected").and_then(|f| f.as_bool()) == Some(true)
        })
        .map(|(k, _)| k.as_str())
        .collect();
    if hit.is_empty() {
        String::new()
    } else {
        format!(" ({})", hit.join(", "))
    }
}

fn refused(reason: String, simulated: bool) -> ChatResponse {
    ChatResponse {
        content: String::new(),
        refusal: Some(reason),
        usage: None,
        simulated,
        logprob_confidence: None,
        timings: None,
        finish_reason: Some("content_filter".into()),
        ..ChatResponse::default()
    }
}

impl LlmProvider for AzureClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Azure
    }
    fn base_url(&self) -> &str {
        &self.base_url
    }

    /// OpenAI's body. Its `model` is the deployment name, which Azure ignores (the path
    /// names the deployment) but which keeps the body identical to OpenAI's.
    fn request_body(&self, req: &ChatRequest) -> Value {
        self.openai.request_body(req)
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
