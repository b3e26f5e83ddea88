//! Azure OpenAI, Anthropic and Gemini clients against loopback servers answering with the
//! bodies each vendor documents (success, 400, 401, 404, 429 with its retry hints, safety
//! blocks, a non-JSON 200), checking the requests they send: path, query, auth headers and
//! body shape. The runner tests at the end take each provider through `build_provider`,
//! retries, refusals and pricing, as a run would.

use std::sync::Arc;
use std::time::Duration;

use image::GrayImage;
use mica_core::{ImageSource, LabelSet, Modality, Outcome, Sample, TokenUsage};
use serde_json::{json, Value};

use crate::anthropic::{AnthropicClient, ANSWER_TOOL, ANTHROPIC_VERSION};
use crate::azure::{AzureAuth, AzureClient};
use crate::gemini::GeminiClient;
use crate::provider::{http_client, ChatRequest, ChatResponse, GenParams, ProviderError};
use crate::testing::{Reply, Request, Server};
use crate::*;

const ANSWER: &str = r#"{"label":"glioma","confidence":0.9,"rationale":"an infiltrative mass"}"#;
const KEY: &str = "sk-test-7f3a9c1e5b";
const PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==";

fn labels() -> Vec<String> {
    ["glioma", "meningioma", "pituitary", "notumor"]
        .map(String::from)
        .to_vec()
}

fn request(model: &str, structured: bool) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        system: "You are a radiologist.".into(),
        user: "Classify this brain MRI.".into(),
        image_b64: Some(Arc::from(PNG_B64)),
        labels: labels(),
        params: GenParams {
            structured,
            ..GenParams::default()
        },
    }
}

fn chat(p: &dyn LlmProvider, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(p.chat(req, Duration::from_secs(10)))
}

fn body(r: &Request) -> Value {
    serde_json::from_str(&r.body).unwrap()
}

/// Asserts the error class the run engine acts on, and that the key never shows.
fn assert_error(e: &ProviderError, status: u16, retryable: bool, permanent: bool) {
    assert_eq!(e.status, Some(status), "{e:?}");
    assert_eq!(e.retryable, retryable, "retryable: {e:?}");
    assert_eq!(e.is_permanent(), permanent, "permanent: {e:?}");
    assert!(!e.message.contains(KEY), "the key leaked: {}", e.message);
}

// ---------------------------------------------------------------- Azure OpenAI

const DEPLOYMENT: &str = "gpt4o-radiology";
const AZURE_PATH: &str =
    "/openai/deployments/gpt4o-radiology/chat/completions?api-version=2024-10-21";

/// Azure's documented chat completion (it adds the content-filter annotations to OpenAI's).
fn azure_completion(content: Option<&str>, finish: &str) -> String {
    json!({
        "id": "chatcmpl-7R1nGnsXO8n4oi9UPz2f3UHdgAYMn", "object": "chat.completion",
        "created": 1686676106, "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_b705f0c291",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {
            "hate": {"filtered": false, "severity": "safe"}, "self_harm": {"filtered": false, "severity": "safe"},
            "sexual": {"filtered": false, "severity": "safe"}, "violence": {"filtered": false, "severity": "safe"}}}],
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content},
                     "content_filter_results": {
                        "hate": {"filtered": false, "severity": "safe"},
                        "violence": {"filtered": finish == "content_filter", "severity": if finish == "content_filter" {"high"} else {"safe"}}}}],
        "usage": {"completion_tokens": 22, "prompt_tokens": 394, "total_tokens": 416}
    })
    .to_string()
}

/// Azure's documented 400 when the prompt trips the content filter.
const AZURE_PROMPT_FILTERED: &str = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":true,"severity":"medium"},"violence":{"filtered":false,"severity":"safe"}}}}}"#;

fn azure(url: &str, auth: AzureAuth) -> AzureClient {
    AzureClient::new(
        http_client(),
        url,
        DEPLOYMENT,
        spec::AZURE_API_VERSION,
        auth,
    )
}

#[test]
fn azure_sends_the_deployment_path_api_version_and_api_key_and_reads_usage() {
    let server = Server::start(|_| (200, azure_completion(Some(ANSWER), "stop")));
    let r = chat(
        &azure(&server.url, AzureAuth::ApiKey(KEY.into())),
        &request(DEPLOYMENT, true),
    )
    .unwrap();
    let seen = &server.received()[0];
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", AZURE_PATH)
    );
    assert_eq!(seen.header("api-key"), Some(KEY));
    assert_eq!(
        seen.header("authorization"),
        None,
        "an api-key is not also sent as a bearer"
    );
    let b = body(seen);
    assert_eq!(
        b["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"],
        json!(labels())
    );
    assert!(
        b["messages"][1]["content"]
            .to_string()
            .contains("data:image/png;base64,"),
        "{b}"
    );
    assert_eq!(r.content, ANSWER);
    assert_eq!(
        r.usage,
        Some(TokenUsage {
            prompt: 394,
            completion: 22
        })
    );
    assert_eq!(r.resolved_model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(
        (r.finish_reason.as_deref(), r.refusal.as_deref()),
        (Some("stop"), None)
    );
}

#[test]
fn azure_entra_id_token_goes_as_a_bearer_and_the_api_version_can_change() {
    let server = Server::start(|_| (200, azure_completion(Some(ANSWER), "stop")));
    let c = AzureClient::new(
        http_client(),
        &server.url,
        DEPLOYMENT,
        "2025-04-01-preview",
        AzureAuth::Bearer("eyJ0eXAi.tok".into()),
    );
    chat(&c, &request(DEPLOYMENT, true)).unwrap();
    let seen = &server.received()[0];
    assert_eq!(
        seen.path,
        "/openai/deployments/gpt4o-radiology/chat/completions?api-version=2025-04-01-preview"
    );
    assert_eq!(seen.header("authorization"), Some("Bearer eyJ0eXAi.tok"));
    assert_eq!(seen.header("api-key"), None);
}

#[test]
fn azure_content_filter_on_the_prompt_or_the_answer_is_a_refusal_not_an_error() {
    let server = Server::start(|_| (400, AZURE_PROMPT_FILTERED.to_string()));
    let r = chat(
        &azure(&server.url, AzureAuth::ApiKey(KEY.into())),
        &request(DEPLOYMENT, true),
    )
    .unwrap();
    assert_eq!(server.requests(), 1);
    let why = r.refusal.expect("a refusal");
    assert!(
        why.contains("content filter") && why.contains("sexual"),
        "{why}"
    );
    assert_eq!(
        (r.content.as_str(), r.finish_reason.as_deref()),
        ("", Some("content_filter"))
    );

    let server = Server::start(|_| (200, azure_completion(None, "content_filter")));
    let r = chat(
        &azure(&server.url, AzureAuth::ApiKey(KEY.into())),
        &request(DEPLOYMENT, true),
    )
    .unwrap();
    let why = r.refusal.expect("a refusal");
    assert!(why.contains("violence"), "{why}");
    assert_eq!(
        r.usage,
        Some(TokenUsage {
            prompt: 394,
            completion: 22
        }),
        "a filtered answer is still billed"
    );
}

#[test]
fn azure_errors_are_classified_like_openai_ones() {
    let cases = [
        // Documented 401 for a wrong key or endpoint.
        (
            401,
            r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#,
            false,
            true,
        ),
        (
            404,
            r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}}"#,
            false,
            true,
        ),
        (
            400,
            r#"{"error":{"message":"Unrecognized request argument supplied: top_k","type":"invalid_request_error","param":null,"code":null}}"#,
            false,
            true,
        ),
        (
            429,
            r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds."}}"#,
            true,
            false,
        ),
        (
            500,
            r#"{"error":{"code":"InternalServerError","message":"The service is temporarily unable to process your request."}}"#,
            true,
            false,
        ),
    ];
    for (status, text, retryable, permanent) in cases {
        let server = Server::start_replies(move |_| {
            Reply::new(status, text).with_header("retry-after", "6")
        });
        let e = chat(
            &azure(&server.url, AzureAuth::ApiKey(KEY.into())),
            &request(DEPLOYMENT, true),
        )
        .unwrap_err();
        assert_error(&e, status, retryable, permanent);
        assert!(
            !e.message.contains("api-version"),
            "the query stays out of messages: {}",
            e.message
        );
        if status == 429 {
            assert_eq!(e.retry_after, Some(Duration::from_secs(6)));
        }
    }
}

#[test]
fn azure_non_json_200_is_a_clear_retryable_error() {
    let server = Server::start(|_| (200, "<html><body>Gateway says hello</body></html>".into()));
    let e = chat(
        &azure(&server.url, AzureAuth::None),
        &request(DEPLOYMENT, true),
    )
    .unwrap_err();
    assert!(e.retryable && e.message.contains("not JSON"), "{e:?}");
}

// ---------------------------------------------------------------- Anthropic

const CLAUDE: &str = "claude-sonnet-4-5";
const CLAUDE_SNAPSHOT: &str = "claude-sonnet-4-5-20250929";

/// The Messages API's documented response: a forced tool call, or text.
fn claude_message(tool: bool, stop: &str) -> String {
    let content = if tool {
        json!([{"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": ANSWER_TOOL,
                "input": {"label": "glioma", "confidence": 0.9, "rationale": "an infiltrative mass"}}])
    } else {
        json!([{"type": "text", "text": ANSWER}])
    };
    json!({
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
        "model": CLAUDE_SNAPSHOT, "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": 1612, "output_tokens": 48,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    })
    .to_string()
}

fn claude_error(kind: &str, message: &str) -> String {
    json!({"type": "error", "error": {"type": kind, "message": message},
           "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
    .to_string()
}

#[test]
fn anthropic_sends_its_headers_an_image_block_and_a_forced_tool_and_reads_the_tool_input() {
    let server = Server::start(|_| (200, claude_message(true, "tool_use")));
    let c = AnthropicClient::new(http_client(), &server.url, Some(KEY.into()));
    let r = chat(&c, &request(CLAUDE, true)).unwrap();
    let seen = &server.received()[0];
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(seen.header("x-api-key"), Some(KEY));
    assert_eq!(seen.header("anthropic-version"), Some(ANTHROPIC_VERSION));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("authorization"), None);
    let b = body(seen);
    assert_eq!(b["model"], CLAUDE);
    assert_eq!(b["max_tokens"], 200);
    assert_eq!(b["system"], "You are a radiologist.");
    assert_eq!(
        b["messages"][0]["content"][0],
        json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}})
    );
    assert_eq!(
        b["messages"][0]["content"][1],
        json!({"type": "text", "text": "Classify this brain MRI."})
    );
    assert_eq!(
        b["tool_choice"],
        json!({"type": "tool", "name": ANSWER_TOOL})
    );
    assert_eq!(
        b["tools"][0]["input_schema"]["properties"]["label"]["enum"],
        json!(labels())
    );
    assert!(
        b.get("seed").is_none() && b.get("response_format").is_none(),
        "{b}"
    );

    let answer: Value = serde_json::from_str(&r.content).unwrap();
    assert_eq!(answer["label"], "glioma");
    assert_eq!(
        r.usage,
        Some(TokenUsage {
            prompt: 1612,
            completion: 48
        })
    );
    assert_eq!(r.resolved_model.as_deref(), Some(CLAUDE_SNAPSHOT));
    assert_eq!(r.finish_reason.as_deref(), Some("tool_use"));
}

#[test]
fn anthropic_without_structured_output_sends_no_tool_and_reads_the_text() {
    let server = Server::start(|_| (200, claude_message(false, "end_turn")));
    let c = AnthropicClient::new(http_client(), &server.url, Some(KEY.into()));
    let r = chat(&c, &request(CLAUDE, false)).unwrap();
    let b = body(&server.received()[0]);
    assert!(
        b.get("tools").is_none() && b.get("tool_choice").is_none(),
        "{b}"
    );
    assert_eq!(
        (r.content.as_str(), r.finish_reason.as_deref()),
        (ANSWER, Some("end_turn"))
    );
}

#[test]
fn anthropic_refusal_stop_reason_is_a_refusal() {
    let server = Server::start(|_| {
        let mut m: Value = serde_json::from_str(&claude_message(false, "refusal")).unwrap();
        m["content"] = json!([]);
        (200, m.to_string())
    });
    let c = AnthropicClient::new(http_client(), &server.url, Some(KEY.into()));
    let r = chat(&c, &request(CLAUDE, true)).unwrap();
    assert!(
        r.refusal.as_deref().is_some_and(|s| s.contains("refusal")),
        "{r:?}"
    );
    assert_eq!(r.content, "");
}

#[test]
fn anthropic_documented_errors_are_classified() {
    let cases = [
        (400, claude_error("invalid_request_error", "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"), false, true),
        (401, claude_error("authentication_error", "invalid x-api-key"), false, true),
        (403, claude_error("permission_error", "Your API key does not have permission to use the specified resource."), false, true),
        (404, claude_error("not_found_error", "model: claude-3-opus-19000101"), false, true),
        (429, claude_error("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"), true, false),
        (500, claude_error("api_error", "Internal server error"), true, false),
        (529, claude_error("overloaded_error", "Overloaded"), true, false),
    ];
    for (status, text, retryable, permanent) in cases {
        let t = text.clone();
        let server = Server::start_replies(move |_| {
            Reply::new(status, t.clone()).with_header("retry-after", "7")
        });
        let c = AnthropicClient::new(http_client(), &server.url, Some(KEY.into()));
        let e = chat(&c, &request(CLAUDE, true)).unwrap_err();
        assert_error(&e, status, retryable, permanent);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let kind: Value = serde_json::from_str(&text).unwrap();
        assert!(
            e.message.contains(kind["error"]["type"].as_str().unwrap()),
            "{}",
            e.message
        );
    }
    // The monthly spend cap has the rate limit's type and status, but waiting does not help.
    let server = Server::start(|_| {
        let mut v: Value = serde_json::from_str(&claude_error(
            "rate_limit_error",
            "You have reached your specified API usage limits.",
        ))
        .unwrap();
        v["error"]["details"] = json!({"error_code": "enforced_spend_limit_reached"});
        (429, v.to_string())
    });
    let c = AnthropicClient::new(http_client(), &server.url, Some(KEY.into()));
    let e = chat(&c, &request(CLAUDE, true)).unwrap_err();
    assert!(!e.retryable, "{e:?}");
}

#[test]
fn anthropic_non_json_200_is_a_clear_retryable_error() {
    let server = Server::start(|_| {
        (
            200,
            "upstream connect error or disconnect/reset before headers".into(),
        )
    });
    let c = AnthropicClient::new(http_client(), &server.url, Some(KEY.into()));
    let e = chat(&c, &request(CLAUDE, true)).unwrap_err();
    assert!(
        e.retryable && e.message.contains("not JSON") && e.message.contains("/v1/messages"),
        "{e:?}"
    );
}

// ---------------------------------------------------------------- Gemini

const GEMINI: &str = "gemini-2.5-flash";
const GEMINI_PATH: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// The documented `GenerateContentResponse`.
fn gemini_response(text: &str, finish: &str) -> String {
    json!({
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                        "finishReason": finish, "index": 0,
                        "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"}]}],
        "usageMetadata": {"promptTokenCount": 1290, "candidatesTokenCount": 31, "thoughtsTokenCount": 150,
                          "totalTokenCount": 1471,
                          "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 32}, {"modality": "IMAGE", "tokenCount": 1258}]},
        "modelVersion": "gemini-2.5-flash-preview-05-20",
        "responseId": "mAitaLmkHPPlz7IPvtfUqQ4"
    })
    .to_string()
}

fn google_error(code: u16, status: &str, message: &str, details: Value) -> String {
    json!({"error": {"code": code, "message": message, "status": status, "details": details}})
        .to_string()
}

#[test]
fn gemini_sends_inline_data_a_response_schema_and_the_key_header_and_reads_usage() {
    let server = Server::start(|_| (200, gemini_response(ANSWER, "STOP")));
    let c = GeminiClient::new(http_client(), &server.url, Some(KEY.into()));
    let r = chat(&c, &request(GEMINI, true)).unwrap();
    let seen = &server.received()[0];
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", GEMINI_PATH)
    );
    assert_eq!(seen.header("x-goog-api-key"), Some(KEY));
    assert!(!seen.path.contains(KEY), "the key never goes in the URL");
    let b = body(seen);
    let parts = &b["contents"][0]["parts"];
    assert_eq!(b["contents"][0]["role"], "user");
    assert_eq!(
        parts[0],
        json!({"inline_data": {"mime_type": "image/png", "data": PNG_B64}})
    );
    assert_eq!(parts[1], json!({"text": "Classify this brain MRI."}));
    assert_eq!(
        b["systemInstruction"]["parts"][0]["text"],
        "You are a radiologist."
    );
    let g = &b["generationConfig"];
    assert_eq!(
        (
            g["temperature"].as_f64(),
            g["maxOutputTokens"].as_u64(),
            g["seed"].as_u64()
        ),
        (
            Some(0.0),
            Some(200 + gemini::THINKING_ALLOWANCE as u64),
            Some(42)
        ),
        "Gemini 2.5 thinks within maxOutputTokens: the answer keeps its 200"
    );
    assert_eq!(g["responseMimeType"], "application/json");
    let schema = &g["responseSchema"];
    assert_eq!(schema["type"], "OBJECT");
    assert_eq!(schema["properties"]["label"]["enum"], json!(labels()));
    assert!(
        !schema.to_string().contains("additionalProperties"),
        "not in Gemini's schema subset: {schema}"
    );

    assert_eq!(r.content, ANSWER);
    assert_eq!(
        r.usage,
        Some(TokenUsage {
            prompt: 1290,
            completion: 181
        }),
        "thinking is billed as output"
    );
    assert_eq!(r.reasoning_tokens, Some(150));
    assert_eq!(
        r.resolved_model.as_deref(),
        Some("gemini-2.5-flash-preview-05-20")
    );
    assert_eq!(
        (r.finish_reason.as_deref(), r.refusal.as_deref()),
        (Some("STOP"), None)
    );

    // Unstructured: no schema, and `models/` in the name is the same model.
    let r2 = chat(&c, &request("models/gemini-2.5-flash", false)).unwrap();
    let seen = &server.received()[1];
    assert_eq!(seen.path, GEMINI_PATH);
    assert!(body(seen)["generationConfig"]
        .get("responseSchema")
        .is_none());
    assert_eq!(r2.content, ANSWER);

    // A model that does not think, or a run that sized the budget for reasoning, gets
    // exactly the budget asked for.
    let mut req = request("gemini-2.0-flash", true);
    chat(&c, &req).unwrap();
    req.model = GEMINI.into();
    req.params.reasoning = Some(true);
    req.params.max_tokens = 4000;
    chat(&c, &req).unwrap();
    let seen = server.received();
    assert_eq!(body(&seen[2])["generationConfig"]["maxOutputTokens"], 200);
    assert_eq!(body(&seen[3])["generationConfig"]["maxOutputTokens"], 4000);
}

#[test]
fn gemini_safety_blocks_of_the_prompt_or_the_answer_are_refusals() {
    let blocked = json!({
        "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
            {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "HIGH", "blocked": true}]},
        "usageMetadata": {"promptTokenCount": 1290, "totalTokenCount": 1290},
        "modelVersion": "gemini-2.5-flash"
    })
    .to_string();
    let server = Server::start(move |_| (200, blocked.clone()));
    let c = GeminiClient::new(http_client(), &server.url, Some(KEY.into()));
    let r = chat(&c, &request(GEMINI, true)).unwrap();
    assert!(
        r.refusal
            .as_deref()
            .is_some_and(|s| s.contains("blockReason: SAFETY")),
        "{r:?}"
    );
    assert_eq!(r.finish_reason.as_deref(), Some("SAFETY"));
    assert_eq!(
        r.usage,
        Some(TokenUsage {
            prompt: 1290,
            completion: 0
        })
    );

    for finish in ["SAFETY", "PROHIBITED_CONTENT"] {
        let server = Server::start(move |_| (200, gemini_response("", finish)));
        let c = GeminiClient::new(http_client(), &server.url, Some(KEY.into()));
        let r = chat(&c, &request(GEMINI, true)).unwrap();
        assert!(
            r.refusal.as_deref().is_some_and(|s| s.contains(finish)),
            "{r:?}"
        );
    }
    // A cut-off answer is not a refusal.
    let server = Server::start(|_| (200, gemini_response("{\"label\": \"gli", "MAX_TOKENS")));
    let c = GeminiClient::new(http_client(), &server.url, Some(KEY.into()));
    let r = chat(&c, &request(GEMINI, true)).unwrap();
    assert_eq!(
        (r.refusal, r.finish_reason.as_deref()),
        (None, Some("MAX_TOKENS"))
    );
}

#[test]
fn gemini_documented_errors_are_classified_with_google_retry_hints() {
    let invalid_key = google_error(
        400,
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
        json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]),
    );
    let cases = [
        (400, invalid_key, false, true),
        (400, google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unknown name \"top_k\" at 'generation_config': Cannot find field.", json!([])), false, true),
        (403, google_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.", json!([])), false, true),
        (404, google_error(404, "NOT_FOUND", "models/gemini-9-ultra is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods.", json!([])), false, true),
        (503, google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.", json!([])), true, false),
    ];
    for (status, text, retryable, permanent) in cases {
        let server = Server::start(move |_| (status, text.clone()));
        let c = GeminiClient::new(http_client(), &server.url, Some(KEY.into()));
        let e = chat(&c, &request(GEMINI, true)).unwrap_err();
        assert_error(&e, status, retryable, permanent);
        assert!(
            e.message.contains(&format!("HTTP {status} ")),
            "{}",
            e.message
        );
    }

    // 429 with Google's RetryInfo and no Retry-After header: the delay comes from the body.
    let per_minute = google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
        json!([
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"}, "quotaValue": "10"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]),
    );
    let per_day = per_minute.replace("PerMinute", "PerDay");
    let server = Server::start(move |n| {
        (
            429,
            if n == 0 {
                per_minute.clone()
            } else {
                per_day.clone()
            },
        )
    });
    let c = GeminiClient::new(http_client(), &server.url, Some(KEY.into()));
    let e = chat(&c, &request(GEMINI, true)).unwrap_err();
    assert_error(&e, 429, true, false);
    assert_eq!(e.retry_after, Some(Duration::from_secs(37)));
    assert!(e.message.contains("RESOURCE_EXHAUSTED"), "{}", e.message);
    let e = chat(&c, &request(GEMINI, true)).unwrap_err();
    assert!(
        !e.retryable,
        "a per-day quota does not refill within a run: {e:?}"
    );
}

#[test]
fn gemini_non_json_200_is_a_clear_retryable_error() {
    let server = Server::start(|_| (200, "".into()));
    let c = GeminiClient::new(http_client(), &server.url, Some(KEY.into()));
    let e = chat(&c, &request(GEMINI, true)).unwrap_err();
    assert!(e.retryable && e.message.contains("not JSON"), "{e:?}");
}

// ---------------------------------------------------------------- specs and keys

#[test]
fn the_three_spec_forms_parse_with_their_defaults() {
    let s = ProviderSpec::parse("llm:azure/gpt4o-radiology@https://contoso-med.openai.azure.com/")
        .unwrap();
    assert_eq!(
        (s.kind, s.model.as_str(), s.base_url.as_str()),
        (
            ProviderKind::Azure,
            DEPLOYMENT,
            "https://contoso-med.openai.azure.com"
        )
    );
    assert!(s.api_version.is_some());
    assert_eq!(
        s.canonical(),
        "llm:azure/gpt4o-radiology@https://contoso-med.openai.azure.com"
    );
    let s = s.with_api_version("2025-04-01-preview").unwrap();
    assert_eq!(s.api_version.as_deref(), Some("2025-04-01-preview"));
    for bad in ["2024-10-21&x=1", "latest", ""] {
        assert!(s.clone().with_api_version(bad).is_err(), "{bad}");
    }
    let e = ProviderSpec::parse("llm:azure/gpt4o")
        .unwrap_err()
        .to_string();
    assert!(e.contains("openai.azure.com"), "{e}");
    assert!(ProviderSpec::parse("azure/a b@https://x.openai.azure.com").is_err());

    let s = ProviderSpec::parse("llm:anthropic/claude-sonnet-4-5").unwrap();
    assert_eq!(
        (s.kind, s.base_url.as_str(), s.api_version.as_deref()),
        (ProviderKind::Anthropic, spec::ANTHROPIC_BASE_URL, None)
    );
    assert_eq!(s.canonical(), "llm:anthropic/claude-sonnet-4-5");
    assert!(
        s.with_api_version("2024-10-21").is_err(),
        "api-version is Azure's"
    );
    let s = ProviderSpec::parse("anthropic/claude-sonnet-4-5@http://127.0.0.1:9/").unwrap();
    assert_eq!(s.base_url, "http://127.0.0.1:9");

    let s = ProviderSpec::parse("llm:gemini/gemini-2.5-flash").unwrap();
    assert_eq!(
        (s.kind, s.base_url.as_str()),
        (ProviderKind::Gemini, spec::GEMINI_BASE_URL)
    );
    assert!(ProviderSpec::parse("gemini/gemini?x").is_err());

    for (kind, var) in [
        (ProviderKind::Azure, "AZURE_OPENAI_API_KEY"),
        (ProviderKind::Anthropic, "ANTHROPIC_API_KEY"),
        (ProviderKind::Gemini, "GEMINI_API_KEY"),
        (ProviderKind::OpenAi, "OPENAI_API_KEY"),
    ] {
        assert_eq!(kind.default_key_env(), var);
        assert_eq!(
            native::key_env_for(kind, "OPENAI_API_KEY"),
            var,
            "the generic default means the vendor's own"
        );
        assert_eq!(
            native::key_env_for(kind, "MY_KEY"),
            "MY_KEY",
            "a named variable is used as named"
        );
        if kind != ProviderKind::OpenAi {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(
                json,
                format!("\"{}\"", kind.as_str()),
                "config files use the spec's name"
            );
        }
    }
}

#[test]
fn a_vendor_endpoint_without_a_key_fails_before_any_request() {
    for spec in [
        "anthropic/claude-sonnet-4-5",
        "gemini/gemini-2.5-flash",
        "azure/gpt4o@https://contoso-med.openai.azure.com",
    ] {
        let s = ProviderSpec::parse(spec).unwrap();
        let e = match build_provider(&s, "MICA_TEST_NEVER_SET_KEY_3F9", http_client()) {
            Ok(_)
                if s.kind == ProviderKind::Azure
                    && std::env::var(spec::AZURE_AD_TOKEN_ENV).is_ok() =>
            {
                continue
            }
            Ok(_) => panic!("{spec}: built without a key"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("MICA_TEST_NEVER_SET_KEY_3F9"), "{spec}: {e}");
    }
}

// ---------------------------------------------------------------- through the runner

fn mri() -> LabelSet {
    Modality::Mri.canonical_labels().unwrap()
}

fn item(dir: &std::path::Path) -> WorkItem {
    let path = dir.join("0.png");
    GrayImage::from_fn(64, 64, |x, y| image::Luma([(x * 3 + y) as u8]))
        .save(&path)
        .unwrap();
    let s = Sample {
        id: "glioma/0.png".into(),
        source: ImageSource::file(&path),
        label: 0,
        split: None,
        context: None,
    };
    WorkItem::from_sample(&s, &mri())
}

/// A runner built the way a run builds one: spec string, `build_provider` with the key from
/// a (test-unique) variable, a prices file, fast retries.
fn runner(spec: &str, key_var: &str, prices: &str, dir: &std::path::Path) -> LlmRunner {
    std::env::set_var(key_var, KEY);
    let spec = ProviderSpec::parse(spec).unwrap();
    let provider = build_provider(&spec, key_var, http_client()).unwrap();
    let file = dir.join("prices.toml");
    std::fs::write(&file, prices).unwrap();
    let table = PriceTable::builtin().with_overrides_from(&file).unwrap();
    let limits = Limits {
        concurrency: 1,
        max_attempts: 3,
        timeout: Duration::from_secs(10),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..Limits::default()
    };
    LlmRunner::new(LlmConfig::new(spec, Modality::Mri, mri()), provider)
        .with_limits(limits)
        .with_prices(&table)
}

fn rate_limited_once(first: Reply, then: String) -> Server {
    Server::start_replies(move |r| {
        if r.n == 0 {
            first.clone()
        } else {
            Reply::new(200, then.clone())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_answers_through_the_runner_after_a_429_with_cost_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let it = item(dir.path());
    let cases = [
        (
            "azure/gpt4o-radiology",
            "MICA_TEST_AZURE_KEY_A1",
            "api-key",
            rate_limited_once(
                Reply::new(429, r#"{"error":{"code":"429","message":"Rate limit is exceeded. Try again in 0 seconds."}}"#).with_header("retry-after", "0"),
                azure_completion(Some(ANSWER), "stop"),
            ),
            "[models.\"azure/gpt4o-radiology\"]\ninput_per_million = 2.5\noutput_per_million = 10.0\nas_of = \"2025-01\"\n",
            (394, 22, 2.5, 10.0),
            "gpt-4o-2024-08-06",
            "stop",
        ),
        (
            "anthropic/claude-sonnet-4-5",
            "MICA_TEST_ANTHROPIC_KEY_A1",
            "x-api-key",
            rate_limited_once(
                Reply::new(429, claude_error("rate_limit_error", "Number of requests has exceeded your per-minute rate limit")).with_header("retry-after", "0"),
                claude_message(true, "tool_use"),
            ),
            "[models.\"anthropic/claude-sonnet-4-5\"]\ninput_per_million = 3.0\noutput_per_million = 15.0\nas_of = \"2025-09\"\n",
            (1612, 48, 3.0, 15.0),
            CLAUDE_SNAPSHOT,
            "tool_use",
        ),
        (
            "gemini/gemini-2.5-flash",
            "MICA_TEST_GEMINI_KEY_A1",
            "x-goog-api-key",
            rate_limited_once(
                Reply::new(429, google_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", json!([]))).with_header("retry-after", "0"),
                gemini_response(ANSWER, "STOP"),
            ),
            "[models.\"gemini/gemini-2.5-flash\"]\ninput_per_million = 0.3\noutput_per_million = 2.5\nas_of = \"2025-06\"\n",
            (1290, 181, 0.3, 2.5),
            "gemini-2.5-flash-preview-05-20",
            "STOP",
        ),
    ];
    for (spec, var, header, server, prices, (inp, out, pin, pout), snapshot, finish) in cases {
        let r = runner(&format!("{spec}@{}", server.url), var, prices, dir.path());
        let p = r.classify_one(&it).await;
        assert_eq!(p.outcome, Outcome::Answered, "{spec}: {p:?}");
        assert_eq!(p.predicted.as_deref(), Some("glioma"), "{spec}");
        assert_eq!(server.requests(), 2, "{spec}: one 429, one retry");
        assert!(
            server
                .received()
                .iter()
                .all(|q| q.header(header) == Some(KEY)),
            "{spec}: key header"
        );
        assert_eq!(
            p.tokens,
            Some(TokenUsage {
                prompt: inp,
                completion: out
            }),
            "{spec}"
        );
        let want = (inp as f64 * pin + out as f64 * pout) / 1e6;
        assert!(
            p.cost_usd.is_some_and(|c| (c - want).abs() < 1e-12),
            "{spec}: {:?} vs {want}",
            p.cost_usd
        );
        assert_eq!(p.resolved_model.as_deref(), Some(snapshot), "{spec}");
        assert_eq!(p.finish_reason.as_deref(), Some(finish), "{spec}");
        assert!(
            !serde_json::to_string(&p).unwrap().contains(KEY),
            "{spec}: key in the prediction"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_permanent_errors_reach_the_prediction_without_retries() {
    let dir = tempfile::tempdir().unwrap();
    let it = item(dir.path());
    let prices = "[models]\n";
    // Safety blocks and content filters: `refused`, one request each.
    let gem = Server::start(|_| {
        (
            200,
            json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}).to_string(),
        )
    });
    let az = Server::start(|_| (400, AZURE_PROMPT_FILTERED.to_string()));
    for (spec, var, server) in [
        ("gemini/gemini-2.5-flash", "MICA_TEST_GEMINI_KEY_B1", &gem),
        ("azure/gpt4o-radiology", "MICA_TEST_AZURE_KEY_B1", &az),
    ] {
        let p = runner(&format!("{spec}@{}", server.url), var, prices, dir.path())
            .classify_one(&it)
            .await;
        assert_eq!(p.outcome, Outcome::Refused, "{spec}: {p:?}");
        assert!(
            !p.permanent_error,
            "{spec}: one image's block does not stop the run"
        );
        assert_eq!(server.requests(), 1, "{spec}");
    }
    // A bad key: failed, permanent (the run engine stops), not retried.
    let ant = Server::start(|_| {
        (
            401,
            claude_error("authentication_error", "invalid x-api-key"),
        )
    });
    let p = runner(
        &format!("anthropic/claude-sonnet-4-5@{}", ant.url),
        "MICA_TEST_ANTHROPIC_KEY_B1",
        prices,
        dir.path(),
    )
    .classify_one(&it)
    .await;
    assert_eq!(
        (p.outcome, p.http_status, p.permanent_error),
        (Outcome::Failed, Some(401), true),
        "{p:?}"
    );
    assert_eq!(ant.requests(), 1);
    assert!(!p.error.unwrap_or_default().contains(KEY));
}
