//! A cascade in the web app, through the JSON API: the CNN's own card answers, and the cascade's
//! card says whether the LLM was consulted and why; the LLM stub's request log shows it was
//! asked only when the CNN was unsure.

mod common;

use std::io::Write as _;
use std::path::Path;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use mica_core::Modality;
use mica_llm::testing::Server;
use mica_server::{App, LlmOptions, Panel, Settings};
use serde_json::Value;
use tower::ServiceExt;

/// OpenAI's documented `chat.completion` naming `label` at confidence 0.9.
fn completion(label: &str) -> String {
    let content = serde_json::json!({"label": label, "confidence": 0.9, "rationale": "pattern"}).to_string();
    serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    })
    .to_string()
}

/// The app over `specs`, with its store in `dir`.
fn app(specs: &[String], context: bool, dir: &Path) -> Router {
    let llm = LlmOptions { api_key_env: "MICA_SERVER_TEST_UNSET_KEY".into(), cascade_context: context, ..LlmOptions::default() };
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    let panel = Panel::load(specs, None, &llm, &meter).unwrap();
    let st = mica_report::Store::open(dir.join("store.sqlite")).unwrap();
    let app = App::new(panel, st, Settings { max_upload_bytes: 1 << 20, review_threshold: 0.7, token: None }).unwrap();
    mica_server::router(app)
}

async fn send(router: &Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let r = router.clone().oneshot(req).await.unwrap();
    let status = r.status();
    (status, r.into_body().collect().await.unwrap().to_bytes().to_vec())
}

async fn classify(router: &Router) -> Value {
    const B: &str = "mica-cascade-boundary";
    let img = image::GrayImage::from_fn(48, 40, |x, y| image::Luma([((x * 5 + y * 3) % 256) as u8]));
    let mut body = Vec::new();
    write!(body, "--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"scan-of-jane.png\"\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
    body.extend_from_slice(&mica_data::image::png_bytes(&img));
    write!(body, "\r\n--{B}--\r\n").unwrap();
    let req = Request::post("/api/v1/classify?wait=true")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={B}"))
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap();
    let (status, bytes) = send(router, req).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&bytes));
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cnn_answers_at_once_and_the_llm_is_asked_only_when_it_is_unsure() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("cnn-run");
    common::write_checkpoint(&run, Modality::Mri);
    let server = Server::start(|_| (200, completion("glioma")));
    let llm = format!("llm:openai-compatible/m@{}", server.url);
    let specs = [
        format!("cascade:cnn:{},{llm}@0", run.display()),
        format!("cascade:cnn:{},{llm}@0.99", run.display()),
    ];
    let router = app(&specs, false, tmp.path());
    let c = classify(&router).await;
    let preds = c["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3, "the CNN once, on its own card, then each cascade: {c}");
    let (cnn, sure, unsure) = (&preds[0], &preds[1], &preds[2]);
    assert_eq!((cnn["family"].as_str(), cnn["state"].as_str()), (Some("cnn"), Some("answered")));
    let cnn_conf = cnn["confidence"].as_f64().unwrap();
    assert!(cnn_conf < 0.99, "{cnn}");

    // Threshold 0: the CNN is confident enough, its answer stands, the LLM is not asked.
    assert_eq!(sure["family"], "cascade");
    assert_eq!(sure["suggested_label"], cnn["suggested_label"]);
    let why = sure["cascade"].as_str().unwrap();
    assert_eq!(why, format!("CNN confident ({cnn_conf:.2} >= 0.00): llm:openai-compatible/m@{} not asked", server.url));
    assert!(sure["tokens"].is_null() && sure["energy_method"] == cnn["energy_method"], "{sure}");

    // Threshold 0.99: the CNN is unsure, the LLM is asked and its answer stands.
    let why = unsure["cascade"].as_str().unwrap();
    assert!(why.starts_with(&format!("CNN confidence {cnn_conf:.2} below 0.99: asked llm:openai-compatible/m@")), "{why}");
    assert!(why.ends_with("its answer stands"), "{why}");
    assert_eq!((unsure["suggested_label"].as_str(), unsure["outcome"].as_str()), (Some("glioma"), Some("answered")));
    assert_eq!(unsure["tokens"]["prompt"], 100);
    assert!(unsure["latency_ms"].as_f64().unwrap() >= cnn["latency_ms"].as_f64().unwrap(), "both stages' time");
    assert_eq!(unsure["energy_method"], "not-measured:remote-api");
    assert!(unsure["model_version"].as_str().unwrap().contains("when its confidence is below 0.99"), "{unsure}");

    assert_eq!(server.requests(), 1, "only the unsure cascade asked the LLM");
    let body = &server.bodies()[0];
    assert!(!body.contains(mica_llm::SUGGESTION_MARKER) && !body.contains("scan-of-jane"), "{body}");

    // The page renders the cascade's account from the same JSON.
    let (status, page) = send(&router, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page).contains("p.cascade"), "the card shows the cascade's reason");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cascade_context_the_llm_reads_the_cnns_top_two() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("cnn-run");
    common::write_checkpoint(&run, Modality::Mri);
    let server = Server::start(|_| (200, completion("meningioma")));
    let specs = [format!("cascade:cnn:{},llm:openai-compatible/m@{}@0.99/0.95", run.display(), server.url)];
    let router = app(&specs, true, tmp.path());
    let c = classify(&router).await;
    let (cnn, cascade) = (&c["predictions"][0], &c["predictions"][1]);
    let mut probs: Vec<(String, f64)> =
        cnn["probabilities"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let line = format!(
        "{} an image classifier ranks {} (confidence {:.2}), then {} (confidence {:.2}).",
        mica_llm::SUGGESTION_MARKER,
        probs[0].0,
        probs[0].1,
        probs[1].0,
        probs[1].1
    );
    let body: Value = serde_json::from_str(&server.bodies()[0]).unwrap();
    let user: String = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["text"].as_str().map(String::from))
        .collect();
    assert!(user.ends_with(&line), "{user}");
    // The LLM's 0.9 is below the second threshold 0.95: both unsure, a physician decides.
    assert_eq!((cascade["outcome"].as_str(), cascade["suggested_label"].as_str()), (Some("deferred"), Some("meningioma")));
    assert!(cascade["cascade"].as_str().unwrap().ends_with("both unsure: for the physician"), "{cascade}");
    assert!(c["needs_review"].as_bool().unwrap());
}

#[test]
fn a_cascade_the_web_app_cannot_run_is_refused_with_the_form_it_takes() {
    let llm = LlmOptions::default();
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    for spec in ["cascade:llm:openai/gpt-4o,llm:openai/gpt-4o-mini@0.8", "cascade:cnn:runs/x,baseline@0.8"] {
        let e = Panel::load(&[spec.to_string()], Some(Modality::Mri), &llm, &meter).err().unwrap().to_string();
        assert!(e.contains("cascade of a trained CNN or ONNX model (first) and an LLM (second)"), "{spec}: {e}");
    }
}
