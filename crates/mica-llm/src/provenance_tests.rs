//! Provenance of LLM answers against stand-in servers speaking the providers' documented
//! JSON: the resolved snapshot, system fingerprint, finish reason and Ollama weights digest
//! land in predictions, and the cache never replays an answer of another snapshot.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::GrayImage;
use mica_core::{ImageSource, LabelSet, Modality, Outcome, Prediction, Sample};
use serde_json::json;

use crate::provider::{http_client, OllamaClient, OpenAiClient};
use crate::testing::{Request, Server};
use crate::*;

const GLIOMA: &str = r#"{"label":"glioma","confidence":0.9,"rationale":"a mass"}"#;
const DIGEST_A: &str = "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697";
const DIGEST_B: &str = "0a8c266910232fd3291e71e5ba1e058cc5af9d411192cf88b6d30e92b6e73163";
const SNAP_A: &str = "gpt-4o-2024-05-13";
const SNAP_B: &str = "gpt-4o-2024-08-06";

/// What the stub answers with; tests change it between requests.
#[derive(Clone)]
struct Script {
    /// The response's `model`.
    model: String,
    content: String,
    finish: String,
    /// The `/api/tags` list: (name, digest).
    tags: Vec<(String, String)>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            model: SNAP_B.into(),
            content: GLIOMA.into(),
            finish: "stop".into(),
            tags: vec![
                ("llava:latest".into(), DIGEST_B.into()),
                ("llama3.2-vision:latest".into(), DIGEST_A.into()),
            ],
        }
    }
}

/// OpenAI's documented `chat.completion` object.
fn openai_completion(s: &Script) -> String {
    json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion",
        "created": 1741570283, "model": s.model, "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": s.content, "refusal": null},
                     "logprobs": null, "finish_reason": s.finish}],
        "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163}
    })
    .to_string()
}

/// Ollama's documented non-streaming `/api/chat` response.
fn ollama_chat(s: &Script) -> String {
    json!({
        "model": s.model, "created_at": "2023-12-12T14:13:43.416799Z",
        "message": {"role": "assistant", "content": s.content},
        "done": true, "done_reason": s.finish, "total_duration": 5191566416u64,
        "load_duration": 2154458, "prompt_eval_count": 26, "prompt_eval_duration": 383809000,
        "eval_count": 298, "eval_duration": 4799921000u64
    })
    .to_string()
}

/// Ollama's documented `/api/tags` list.
fn ollama_tags(s: &Script) -> String {
    let models: Vec<_> = s
        .tags
        .iter()
        .map(|(name, digest)| {
            json!({"name": name, "model": name, "modified_at": "2025-05-10T08:06:48.639712648-07:00",
                   "size": 7365960935u64, "digest": digest,
                   "details": {"parent_model": "", "format": "gguf", "family": "mllama",
                               "families": ["mllama"], "parameter_size": "10.7B",
                               "quantization_level": "Q4_K_M"}})
        })
        .collect();
    json!({ "models": models }).to_string()
}

fn stub(script: &Arc<Mutex<Script>>) -> Server {
    let script = script.clone();
    Server::start_routed(move |r: &Request| {
        let s = script.lock().unwrap().clone();
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/v1/chat/completions") => (200, openai_completion(&s)),
            ("POST", "/api/chat") => (200, ollama_chat(&s)),
            ("GET", "/api/tags") => (200, ollama_tags(&s)),
            _ => (404, r#"{"error":"404 page not found"}"#.into()),
        }
    })
}

fn mri() -> LabelSet {
    Modality::Mri.canonical_labels().unwrap()
}

/// `n` distinct images (truth: glioma) in `dir`.
fn items(dir: &std::path::Path, n: usize) -> Vec<WorkItem> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i}.png"));
            GrayImage::from_fn(64, 64, |x, y| {
                image::Luma([((x + y) as u8).wrapping_mul(i as u8 + 1)])
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

fn runner(spec: &str, url: &str, cache: Option<&std::path::Path>) -> Arc<LlmRunner> {
    let spec = ProviderSpec::parse(&format!("{spec}@{url}")).unwrap();
    let provider: Arc<dyn LlmProvider> = match spec.kind {
        ProviderKind::Ollama => Arc::new(OllamaClient::new(http_client(), &spec.base_url)),
        kind => Arc::new(OpenAiClient::new(http_client(), kind, &spec.base_url, None)),
    };
    let cfg = LlmConfig::new(spec, Modality::Mri, mri());
    let limits = Limits {
        concurrency: 2,
        max_attempts: 2,
        timeout: Duration::from_secs(10),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..Limits::default()
    };
    Arc::new(
        LlmRunner::new(cfg, provider)
            .with_limits(limits)
            .with_cache(cache.map(ResponseCache::new)),
    )
}

const OPENAI: &str = "openai-compatible/gpt-4o";
const OLLAMA: &str = "ollama/llama3.2-vision";
const CHAT: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_snapshot_fingerprint_and_finish_reason_land_in_the_prediction() {
    let script = Arc::new(Mutex::new(Script::default()));
    let server = stub(&script);
    let dir = tempfile::tempdir().unwrap();
    let p = runner(OPENAI, &server.url, None)
        .classify_one(&items(dir.path(), 1)[0])
        .await;
    assert_eq!(p.outcome, Outcome::Answered, "{p:?}");
    assert_eq!(p.resolved_model.as_deref(), Some(SNAP_B));
    assert_eq!(p.system_fingerprint.as_deref(), Some("fp_44709d6fcb"));
    assert_eq!(p.finish_reason.as_deref(), Some("stop"));
    assert_eq!(
        p.model_digest, None,
        "OpenAI formats report no weights digest"
    );
    assert_eq!(server.requests_to("/api/tags"), 0);
    let line = serde_json::to_string(&p).unwrap();
    assert!(
        line.contains(r#""resolved_model":"gpt-4o-2024-08-06""#),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_answer_records_finish_reason_length_in_both_formats() {
    let script = Arc::new(Mutex::new(Script {
        content: r#"{"rationale": "The T1 image shows a large mass with"#.into(),
        finish: "length".into(),
        ..Script::default()
    }));
    let server = stub(&script);
    let dir = tempfile::tempdir().unwrap();
    let item = &items(dir.path(), 1)[0];
    for spec in [OPENAI, OLLAMA] {
        let p = runner(spec, &server.url, None).classify_one(item).await;
        assert_eq!(
            (p.outcome, p.finish_reason.as_deref()),
            (Outcome::Unparseable, Some("length")),
            "{spec}: {p:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_digest_is_looked_up_once_and_lands_in_every_prediction() {
    let script = Arc::new(Mutex::new(Script {
        model: "llama3.2-vision".into(),
        ..Script::default()
    }));
    let server = stub(&script);
    let dir = tempfile::tempdir().unwrap();
    let r = runner(OLLAMA, &server.url, None);
    let mut set = tokio::task::JoinSet::new();
    for it in items(dir.path(), 3) {
        let r = r.clone();
        set.spawn(async move { r.classify_one(&it).await });
    }
    let preds: Vec<Prediction> = set.join_all().await;
    assert_eq!(preds.len(), 3);
    for p in &preds {
        assert_eq!(p.outcome, Outcome::Answered, "{p:?}");
        // `llama3.2-vision` is `llama3.2-vision:latest` under Ollama's default tag.
        assert_eq!(p.model_digest.as_deref(), Some(DIGEST_A));
        assert_eq!(p.resolved_model.as_deref(), Some("llama3.2-vision"));
        assert_eq!(p.finish_reason.as_deref(), Some("stop"));
        assert_eq!(p.system_fingerprint, None);
    }
    assert_eq!(server.requests_to("/api/tags"), 1, "one lookup per runner");
    assert_eq!(server.requests_to("/api/chat"), 3);
    assert_eq!(r.model_digest().await.as_deref(), Some(DIGEST_A));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_the_server_cannot_give_is_not_fatal() {
    // Listed under another tag only: `llama3.2-vision` means `:latest`, which is absent.
    let script = Arc::new(Mutex::new(Script {
        tags: vec![("llama3.2-vision:11b".into(), DIGEST_A.into())],
        ..Script::default()
    }));
    let server = stub(&script);
    let dir = tempfile::tempdir().unwrap();
    let r = runner(OLLAMA, &server.url, None);
    for it in items(dir.path(), 2) {
        let p = r.classify_one(&it).await;
        assert_eq!(
            (p.outcome, p.model_digest.as_deref()),
            (Outcome::Answered, None),
            "{p:?}"
        );
    }
    assert_eq!(
        server.requests_to("/api/tags"),
        1,
        "a failed lookup is not retried per image"
    );
    // An older server without /api/tags (404) is no different.
    let none = Server::start_routed(|r: &Request| match r.path.as_str() {
        "/api/chat" => (200, ollama_chat(&Script::default())),
        _ => (404, "404 page not found".into()),
    });
    let p = runner(OLLAMA, &none.url, None)
        .classify_one(&items(dir.path(), 1)[0])
        .await;
    assert_eq!((p.outcome, p.model_digest), (Outcome::Answered, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_pulled_ollama_model_misses_the_cache() {
    let script = Arc::new(Mutex::new(Script {
        model: "llama3.2-vision".into(),
        ..Script::default()
    }));
    let server = stub(&script);
    let (dir, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let its = items(dir.path(), 2);
    let chats = || server.requests_to("/api/chat");
    let pass = |expect_cached: bool, digest: &'static str| {
        let r = runner(OLLAMA, &server.url, Some(cache.path()));
        let its = its.clone();
        async move {
            for it in &its {
                let p = r.classify_one(it).await;
                assert_eq!(p.cached, expect_cached, "{p:?}");
                assert_eq!(p.model_digest.as_deref(), Some(digest));
            }
        }
    };
    pass(false, DIGEST_A).await;
    assert_eq!(chats(), 2);
    pass(true, DIGEST_A).await;
    assert_eq!(chats(), 2, "same weights: replayed");
    script.lock().unwrap().tags[1].1 = DIGEST_B.into();
    pass(false, DIGEST_B).await;
    assert_eq!(chats(), 4, "new weights under the same name: asked again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_of_an_old_snapshot_stop_replaying_once_a_live_answer_reveals_a_new_one() {
    let script = Arc::new(Mutex::new(Script {
        model: SNAP_A.into(),
        ..Script::default()
    }));
    let server = stub(&script);
    let (dir, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let its = items(dir.path(), 3);
    let chats = || server.requests_to(CHAT);

    // Run 1: the alias answers as snapshot A.
    let r1 = runner(OPENAI, &server.url, Some(cache.path()));
    let first: Vec<Prediction> = {
        let mut v = Vec::new();
        for it in &its[..2] {
            v.push(r1.classify_one(it).await);
        }
        v
    };
    assert_eq!(chats(), 2);
    assert_eq!(r1.snapshots_seen(), vec![SNAP_A.to_string()]);

    // Run 2: the alias has moved to B.
    script.lock().unwrap().model = SNAP_B.into();
    let r2 = runner(OPENAI, &server.url, Some(cache.path()));
    // Before any live answer, A is the latest known: its entry replays, as it was.
    let replay = r2.classify_one(&its[1]).await;
    assert_eq!(chats(), 2);
    assert!(replay.cached);
    assert_eq!(replay.resolved_model.as_deref(), Some(SNAP_A));
    let orig = &first[1];
    assert_eq!(
        (replay.tokens, replay.cost_usd),
        (orig.tokens, orig.cost_usd),
        "a replay keeps the original request's tokens and cost"
    );
    // serde_json's default float parsing may be 1 ulp off: the cache file is JSON.
    assert!(
        (replay.latency_ms - orig.latency_ms).abs() <= 1e-9 * orig.latency_ms,
        "a replay keeps the original latency: {} vs {}",
        replay.latency_ms,
        orig.latency_ms
    );
    assert!(replay.cost_usd.is_some_and(|c| c > 0.0));
    // A live answer reveals B ...
    let live = r2.classify_one(&its[2]).await;
    assert_eq!(
        (live.cached, live.resolved_model.as_deref()),
        (false, Some(SNAP_B))
    );
    // ... after which A's entries are misses.
    let again = r2.classify_one(&its[0]).await;
    assert_eq!(chats(), 4);
    assert_eq!(
        (again.cached, again.resolved_model.as_deref()),
        (false, Some(SNAP_B))
    );
    assert_eq!(
        r2.snapshots_seen(),
        vec![SNAP_A.to_string(), SNAP_B.to_string()],
        "the run can tell the snapshot changed under it"
    );
    assert_eq!(
        r2.snapshot_changes(),
        vec![(SNAP_A.to_string(), SNAP_B.to_string())]
    );
    assert!(r1.snapshot_changes().is_empty());

    // Run 3: the cache knows B is the latest: B's entries replay, A's are asked again.
    let r3 = runner(OPENAI, &server.url, Some(cache.path()));
    let b = r3.classify_one(&its[0]).await;
    assert!(
        b.cached && b.resolved_model.as_deref() == Some(SNAP_B),
        "{b:?}"
    );
    assert_eq!(chats(), 4);
    let a = r3.classify_one(&its[1]).await;
    assert!(
        !a.cached && a.resolved_model.as_deref() == Some(SNAP_B),
        "{a:?}"
    );
    assert_eq!(chats(), 5);
    assert_eq!(r3.snapshots_seen(), vec![SNAP_B.to_string()]);
    assert_eq!(
        r3.snapshot_changes(),
        vec![(SNAP_A.to_string(), SNAP_B.to_string())],
        "the skipped entry of A is named"
    );
    assert_eq!(r3.counters().cache_hits, 1);
}
