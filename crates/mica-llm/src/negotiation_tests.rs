//! The OpenAI and Ollama clients against stand-in servers that behave like the real APIs
//! where the simulator does not: reasoning models that reject `max_tokens` and
//! `temperature`, servers that reject structured output, the documented error bodies for a
//! bad key, an unknown model, an exhausted quota and a content-policy block, a 200 whose body
//! is not JSON, and an Ollama behind an authenticating proxy.

use std::sync::Arc;
use std::time::Duration;

use image::GrayImage;
use mica_core::{ImageSource, LabelSet, Modality, Outcome, Sample};
use serde_json::{json, Value};

use crate::provider::{
    build_provider, http_client, is_reasoning_model, OllamaClient, OpenAiClient,
};
use crate::testing::{Request, Server};
use crate::*;

const GLIOMA: &str = r#"{"label":"glioma","confidence":0.9,"rationale":"a mass"}"#;
const CHAT: &str = "/v1/chat/completions";

fn mri() -> LabelSet {
    Modality::Mri.canonical_labels().unwrap()
}

fn items(dir: &std::path::Path, n: usize) -> Vec<WorkItem> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i}.png"));
            GrayImage::from_fn(32, 32, |x, y| {
                image::Luma([((x * 3 + y) as u8).wrapping_add(i as u8 * 40)])
            })
            .save(&path)
            .unwrap();
            let s = Sample {
                id: format!("glioma/{i}.png"),
                source: ImageSource::file(&path),
                label: 0,
                split: None,
                context: None,
            };
            WorkItem::from_sample(&s, &mri())
        })
        .collect()
}

fn runner_with(spec: &str, url: &str, params: GenParams) -> Arc<LlmRunner> {
    let spec = ProviderSpec::parse(&format!("{spec}@{url}")).unwrap();
    let provider: Arc<dyn LlmProvider> = match spec.kind {
        ProviderKind::Ollama => Arc::new(OllamaClient::new(http_client(), &spec.base_url)),
        kind => Arc::new(OpenAiClient::new(http_client(), kind, &spec.base_url, None)),
    };
    let mut cfg = LlmConfig::new(spec, Modality::Mri, mri());
    cfg.params = params;
    let limits = Limits {
        concurrency: 1,
        max_attempts: 3,
        timeout: Duration::from_secs(10),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..Limits::default()
    };
    Arc::new(LlmRunner::new(cfg, provider).with_limits(limits))
}

fn runner(spec: &str, url: &str) -> Arc<LlmRunner> {
    runner_with(spec, url, GenParams::default())
}

/// OpenAI's documented `chat.completion`, with the usage breakdown reasoning models report.
fn completion(model: &str, reasoning: Option<u64>) -> String {
    let mut usage = json!({"prompt_tokens": 1117, "completion_tokens": 146, "total_tokens": 1263});
    if let Some(r) = reasoning {
        usage["completion_tokens_details"] = json!({"reasoning_tokens": r, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0});
    }
    json!({
        "id": "chatcmpl-AyPNinnUqUDYo9SAdA52NobMflmj2", "object": "chat.completion", "created": 1738960610,
        "model": model, "system_fingerprint": "fp_ef58bd3122",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": GLIOMA, "refusal": null},
                     "finish_reason": "stop"}],
        "usage": usage
    })
    .to_string()
}

fn body(r: &Request) -> Value {
    serde_json::from_str(&r.body).unwrap_or(Value::Null)
}

/// An OpenAI reasoning model: the documented 400s for `max_tokens` and `temperature`.
fn reasoning_server(model: &'static str) -> Server {
    Server::start_routed(move |r: &Request| {
        let b = body(r);
        if b.get("max_tokens").is_some() {
            return (400, json!({"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}).to_string());
        }
        if b.get("temperature")
            .is_some_and(|t| t.as_f64() != Some(1.0))
        {
            return (400, json!({"error": {"message": "Unsupported value: 'temperature' does not support 0.0 with this model. Only the default (1) value is supported.", "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}}).to_string());
        }
        (200, completion(model, Some(128)))
    })
}

#[test]
fn the_reasoning_rule_follows_the_model_name_and_the_override_wins() {
    for m in [
        "o1",
        "o1-2024-12-17",
        "o3-mini",
        "o3",
        "o4-mini",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5.1",
        "openai/O3-mini",
    ] {
        assert!(is_reasoning_model(m), "{m}");
    }
    for m in [
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4.1",
        "o10",
        "omni-moderation",
        "llama3.2-vision",
        "gpt-4o-mini",
    ] {
        assert!(!is_reasoning_model(m), "{m}");
    }
    let c = OpenAiClient::new(http_client(), ProviderKind::OpenAi, "http://h", None);
    let req = |model: &str, reasoning: Option<bool>| ChatRequest {
        model: model.into(),
        system: "s".into(),
        user: "u".into(),
        image_b64: None,
        labels: vec!["a".into()],
        params: GenParams {
            reasoning,
            logprobs: true,
            ..GenParams::default()
        },
    };
    let b = c.request_body(&req("o3-mini", None));
    assert_eq!(b["max_completion_tokens"], json!(200));
    for absent in [
        "max_tokens",
        "temperature",
        "top_p",
        "logprobs",
        "top_logprobs",
    ] {
        assert!(b.get(absent).is_none(), "{absent}: {b}");
    }
    assert!(
        b.get("response_format").is_some(),
        "structured output stays"
    );
    let b = c.request_body(&req("gpt-4o", None));
    assert_eq!(
        (b["max_tokens"].clone(), b["temperature"].clone()),
        (json!(200), json!(0.0))
    );
    assert_eq!(b["logprobs"], json!(true));
    assert!(b.get("max_completion_tokens").is_none());
    // The override beats the rule both ways.
    assert!(c
        .request_body(&req("o1", Some(false)))
        .get("max_tokens")
        .is_some());
    assert!(c
        .request_body(&req("gpt-4o", Some(true)))
        .get("temperature")
        .is_none());
    // A run with the override left out hashes as before: no `reasoning` key in the params.
    assert!(!serde_json::to_string(&GenParams::default())
        .unwrap()
        .contains("reasoning"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_model_is_asked_right_the_first_time_and_its_reasoning_tokens_priced_once() {
    let server = reasoning_server("o3-mini-2025-01-31");
    let dir = tempfile::tempdir().unwrap();
    let r = runner("openai-compatible/o3-mini", &server.url);
    let p = r.classify_one(&items(dir.path(), 1)[0]).await;
    assert_eq!(p.outcome, Outcome::Answered, "{p:?}");
    assert_eq!(server.requests(), 1, "no rejected request first");
    assert_eq!(p.extra["reasoning_tokens"], json!(128));
    let t = p.tokens.unwrap();
    assert_eq!((t.prompt, t.completion), (1117, 146));
    // 146 completion tokens (128 of them reasoning) at the output price, once.
    let want = (1117.0 * 1.10 + 146.0 * 4.40) / 1e6;
    assert!(
        (p.cost_usd.unwrap() - want).abs() < 1e-12,
        "{:?} vs {want}",
        p.cost_usd
    );
    let s = summary::LlmSummary::from_predictions(&[p], &r.config.filter, r.price());
    assert_eq!(s.reasoning_tokens, 128);
    assert_eq!(s.completion_tokens, 146);
    assert_eq!(s.price_as_of.as_deref(), Some("2026-03"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_the_rule_misses_is_switched_to_reasoning_parameters_once_for_the_run() {
    let server = reasoning_server("house-reasoner-1");
    let dir = tempfile::tempdir().unwrap();
    let r = runner("openai-compatible/house-reasoner", &server.url);
    let its = items(dir.path(), 2);
    let p = r.classify_one(&its[0]).await;
    assert_eq!(p.outcome, Outcome::Answered, "{p:?}");
    assert_eq!(p.extra["reasoning_params_fallback"], json!(true));
    assert_eq!(server.requests(), 2);
    assert!(r.reasoning_fallback());
    let p = r.classify_one(&its[1]).await;
    assert_eq!(p.outcome, Outcome::Answered, "{p:?}");
    assert_eq!(
        server.requests(),
        3,
        "the second image is asked right at once"
    );
    assert!(body(&server.received()[2])
        .get("max_completion_tokens")
        .is_some());

    // Overridden to classic parameters: the user's word stands, and the 400 is permanent.
    let server = reasoning_server("o1-2024-12-17");
    let r = runner_with(
        "openai-compatible/o1",
        &server.url,
        GenParams {
            reasoning: Some(false),
            ..GenParams::default()
        },
    );
    let p = r.classify_one(&its[0]).await;
    assert_eq!(
        (p.outcome, p.http_status, p.permanent_error),
        (Outcome::Failed, Some(400), true),
        "{p:?}"
    );
    assert_eq!(server.requests(), 1);
}

/// OpenAI's documented answer to a `json_schema` the model does not support.
const OPENAI_NO_SCHEMA: &str = r#"{"error":{"message":"Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model. Learn more about supported models at the Structured Outputs guide: https://platform.openai.com/docs/guides/structured-outputs","type":"invalid_request_error","param":"response_format","code":null}}"#;
/// llama.cpp's server (OpenAI-format error object with a numeric code).
const LLAMACPP_NO_SCHEMA: &str = r#"{"error":{"code":400,"message":"\"response_format\" must be one of \"text\" or \"json_object\", but got: json_schema","type":"invalid_request_error"}}"#;
/// An older Ollama, given a schema object where it expects the string "json".
const OLLAMA_NO_SCHEMA: &str = r#"{"error":"json: cannot unmarshal object into Go struct field ChatRequest.format of type string"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_schema_is_dropped_once_and_for_the_rest_of_the_run() {
    for (spec, rejection) in [
        ("openai-compatible/gpt-4o", OPENAI_NO_SCHEMA),
        ("openai-compatible/llava", LLAMACPP_NO_SCHEMA),
        ("ollama/llava", OLLAMA_NO_SCHEMA),
    ] {
        let server = Server::start_routed(move |r: &Request| {
            let b = body(r);
            if b.get("response_format").is_some() || b.get("format").is_some() {
                return (400, rejection.to_string());
            }
            if r.path == "/api/tags" {
                (
                    200,
                    json!({"models": [{"name": "llava:latest", "digest": "d1"}]}).to_string(),
                )
            } else if r.path == CHAT {
                (200, completion("m", None))
            } else {
                (200, json!({"model": "llava", "message": {"role": "assistant", "content": GLIOMA}, "done": true, "done_reason": "stop", "prompt_eval_count": 30, "eval_count": 20}).to_string())
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let its = items(dir.path(), 2);
        let r = runner(spec, &server.url);
        let p = r.classify_one(&its[0]).await;
        assert_eq!(p.outcome, Outcome::Answered, "{spec}: {p:?}");
        assert_eq!(p.extra["structured_fallback"], json!(true), "{spec}");
        assert!(!p.permanent_error);
        let chats = || {
            server
                .received()
                .iter()
                .filter(|r| r.method == "POST")
                .count()
        };
        assert_eq!(
            chats(),
            2,
            "{spec}: one rejected request, one without the schema"
        );
        assert!(r.structured_fallback());
        let p = r.classify_one(&its[1]).await;
        assert_eq!(p.outcome, Outcome::Answered, "{spec}: {p:?}");
        assert_eq!(p.extra["structured_fallback"], json!(true));
        assert_eq!(
            chats(),
            3,
            "{spec}: the rest of the run goes without the schema"
        );
        let last = body(server.received().last().unwrap());
        assert!(
            last.get("response_format").is_none() && last.get("format").is_none(),
            "{last}"
        );
        let s = summary::LlmSummary::from_predictions(&[p], &r.config.filter, r.price());
        assert_eq!(s.structured_fallback_images, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_errors_are_permanent_and_asked_once_rate_limits_and_garbage_are_retried() {
    // (status, documented body, permanent, requests made with max_attempts 3, text expected)
    let cases: [(u16, &str, bool, usize, &str); 7] = [
        (
            401,
            r#"{"error":{"message":"Incorrect API key provided: sk-abc. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
            true,
            1,
            "HTTP 401",
        ),
        (
            404,
            r#"{"error":{"message":"The model `gpt-9o` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            true,
            1,
            "model_not_found",
        ),
        (
            429,
            r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
            true,
            1,
            "insufficient_quota",
        ),
        (
            400,
            r#"{"error":{"message":"Your request was rejected as a result of our safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#,
            true,
            1,
            "content_policy_violation",
        ),
        (
            400,
            r#"{"error":{"message":"Invalid image.","type":"invalid_request_error","param":null,"code":"invalid_image"}}"#,
            true,
            1,
            "Invalid image",
        ),
        (
            429,
            r#"{"error":{"message":"Rate limit reached for gpt-4o on requests per min (RPM): Limit 500, Used 500, Requested 1.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            false,
            3,
            "rate_limit_exceeded",
        ),
        (
            200,
            "<html><body>502 Bad Gateway</body></html>",
            false,
            3,
            "not JSON",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let item = &items(dir.path(), 1)[0];
    for (status, answer, permanent, requests, needle) in cases {
        let server = Server::start(move |_| (status, answer.to_string()));
        let p = runner("openai-compatible/gpt-4o", &server.url)
            .classify_one(item)
            .await;
        assert_eq!(p.outcome, Outcome::Failed, "{status}: {p:?}");
        assert_eq!(p.permanent_error, permanent, "{status} {needle}: {p:?}");
        assert_eq!(server.requests(), requests, "{status} {needle}");
        assert!(
            p.error.as_deref().unwrap_or("").contains(needle),
            "{status}: {:?}",
            p.error
        );
        assert!(
            p.extra.get("structured_fallback").is_none(),
            "{status}: not a schema problem"
        );
    }
    // A 200 carrying a content-policy error object is final too.
    let e = crate::provider::parse_openai(
        &json!({"error": {"code": "content_policy_violation", "message": "blocked"}}),
        false,
    )
    .unwrap_err();
    assert!(e.is_permanent() && !e.retryable, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_sends_a_bearer_key_only_when_one_is_set_and_never_shows_it() {
    const KEY: &str = "ollama-key-NEVER-SHOW-77d1";
    let server = Server::start_routed(|r: &Request| {
        match r.path.as_str() {
        "/api/tags" => (200, json!({"models": [{"name": "llava:latest", "model": "llava:latest", "digest": "abc123"}]}).to_string()),
        _ if r.header("authorization").is_none() => (401, r#"{"error":"unauthorized"}"#.into()),
        // A proxy that echoes what it got must not put the key into mica's messages.
        _ => (403, json!({"error": format!("forbidden for {}", r.header("authorization").unwrap())}).to_string()),
    }
    });
    let spec = ProviderSpec::parse(&format!("ollama/llava@{}", server.url)).unwrap();
    let env = "MICA_NEGOTIATION_TEST_OLLAMA_KEY";
    std::env::set_var(env, KEY);
    let with = build_provider(&spec, env, http_client()).unwrap();
    let req = ChatRequest {
        model: "llava".into(),
        system: "s".into(),
        user: "u".into(),
        image_b64: None,
        labels: vec!["glioma".into()],
        params: GenParams::default(),
    };
    let e = with.chat(&req, Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(e.status, Some(403));
    assert!(
        !e.message.contains(KEY) && e.message.contains("<redacted>"),
        "{}",
        e.message
    );
    assert_eq!(
        with.model_digest("llava", Duration::from_secs(5))
            .await
            .unwrap()
            .as_deref(),
        Some("abc123")
    );
    let seen = server.received();
    assert!(
        seen.iter()
            .all(|r| r.header("authorization") == Some(&format!("Bearer {KEY}"))),
        "{seen:?}"
    );
    assert!(!format!(
        "{:?}",
        OllamaClient::new(http_client(), "http://h").with_api_key(Some(KEY.into()))
    )
    .contains(KEY));

    // No key variable set: no header at all (a plain local Ollama).
    let without = build_provider(&spec, "MICA_NEGOTIATION_TEST_UNSET_VAR", http_client()).unwrap();
    let e = without
        .chat(&req, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.status, Some(401));
    assert!(server
        .received()
        .last()
        .unwrap()
        .header("authorization")
        .is_none());
}
