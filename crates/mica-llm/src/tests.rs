//! End-to-end tests of the runner against the in-process simulator (127.0.0.1:0, no network).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use image::GrayImage;
use mica_core::{ImageSource, LabelSet, Modality, Outcome, Prediction, PredictionLog, Sample};
use serde_json::Value;

use crate::filter::FilterSpec;
use crate::provider::{http_client, OllamaClient, OpenAiClient};
use crate::sim::{Fault, SimConfig, SimServer, TruthTable};
use crate::*;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn labels() -> LabelSet {
    Modality::Xray.canonical_labels().unwrap()
}

/// Class c is a flat level 30+60c with a bright square whose position encodes the sample.
fn phantom(c: usize, i: usize) -> GrayImage {
    let base = 30 + 60 * c as u8;
    GrayImage::from_fn(96, 80, |x, y| {
        let (sx, sy) = (8 + (i as u32 % 4) * 20, 8 + (i as u32 / 4 % 3) * 20);
        image::Luma([if x >= sx && x < sx + 16 && y >= sy && y < sy + 16 {
            255 - base / 2
        } else {
            base
        }])
    })
}

struct Fixture {
    dir: tempfile::TempDir,
    items: Vec<WorkItem>,
    sim: SimServer,
}

async fn fixture(per_class: usize, cfg: SimConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let labels = labels();
    let mut truth = TruthTable::new();
    let mut items = Vec::new();
    for c in 0..labels.len() {
        for i in 0..per_class {
            let img = phantom(c, i);
            let path = dir.path().join(format!("{}_{i}.png", labels.name(c)));
            img.save(&path).unwrap();
            truth.add(&img, labels.name(c));
            let s = Sample {
                id: format!("{}/{i}.png", labels.name(c)),
                source: ImageSource::file(&path),
                label: c,
                split: None,
                context: Some(format!("patient {i}, cough")),
            };
            items.push(WorkItem::from_sample(&s, &labels));
        }
    }
    let sim = SimServer::start(cfg, truth, any_port(), true)
        .await
        .unwrap();
    Fixture { dir, items, sim }
}

fn fast_limits(concurrency: usize) -> Limits {
    Limits {
        concurrency,
        max_attempts: 3,
        timeout: Duration::from_secs(10),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..Limits::default()
    }
}

fn openai_runner(f: &Fixture, filter: &str, key: Option<&str>) -> LlmRunner {
    let spec = ProviderSpec::parse(&format!("openai-compatible/test-vlm@{}", f.sim.url())).unwrap();
    let provider = Arc::new(OpenAiClient::new(
        http_client(),
        spec.kind,
        &spec.base_url,
        key.map(String::from),
    ));
    let mut cfg = LlmConfig::new(spec, Modality::Xray, labels());
    cfg.filter = FilterSpec::parse(filter).unwrap();
    LlmRunner::new(cfg, provider).with_limits(fast_limits(4))
}

fn ollama_runner(f: &Fixture, filter: &str) -> LlmRunner {
    let spec = ProviderSpec::parse(&format!("ollama/llama3.2-vision@{}", f.sim.url())).unwrap();
    let provider = Arc::new(OllamaClient::new(http_client(), &spec.base_url));
    let mut cfg = LlmConfig::new(spec, Modality::Xray, labels());
    cfg.filter = FilterSpec::parse(filter).unwrap();
    LlmRunner::new(cfg, provider).with_limits(fast_limits(4))
}

async fn run_all(
    r: &Arc<LlmRunner>,
    items: &[WorkItem],
    out: &Path,
) -> (RunStats, Vec<Prediction>) {
    let (mut log, _) = PredictionLog::open(mica_core::ClassifierDir::new(out).predictions()).unwrap();
    let stats = r.run(items.to_vec(), &mut log, None).await.unwrap();
    drop(log);
    (
        stats,
        mica_core::read_predictions(out.join("predictions.jsonl")).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_request_shape() {
    let f = fixture(1, SimConfig::default()).await;
    let r = Arc::new(openai_runner(&f, "default", None));
    let p = r.classify_one(&f.items[0]).await;
    assert_ne!(p.outcome, Outcome::Failed, "{p:?}");
    let b = &f.sim.stats().bodies()[0];
    assert_eq!(b["model"], "test-vlm");
    assert_eq!(b["temperature"], 0.0);
    assert_eq!(b["seed"], 42);
    assert_eq!(b["max_tokens"], 200);
    assert_eq!(b["messages"][0]["role"], "system");
    let parts = b["messages"][1]["content"].as_array().unwrap();
    assert_eq!(b["messages"][1]["role"], "user");
    assert_eq!(parts[0]["type"], "text");
    assert!(parts[0]["text"].as_str().unwrap().contains("chest X-ray"));
    assert_eq!(parts[1]["type"], "image_url");
    assert!(parts[1]["image_url"]["url"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,iVBOR"));
    assert_eq!(parts[1]["image_url"]["detail"], "low");
    let rf = &b["response_format"];
    assert_eq!(rf["type"], "json_schema");
    assert_eq!(rf["json_schema"]["strict"], true);
    let schema = &rf["json_schema"]["schema"];
    assert_eq!(
        schema["properties"]["label"]["enum"],
        serde_json::json!(labels().names())
    );
    assert_eq!(
        schema["required"],
        serde_json::json!(["label", "confidence", "rationale"])
    );
    assert_eq!(schema["additionalProperties"], false);
    assert!(b.get("logprobs").is_none());
    assert_eq!(
        f.sim
            .stats()
            .openai_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_request_shape_and_timings() {
    let f = fixture(1, SimConfig::default()).await;
    let r = Arc::new(ollama_runner(&f, "none"));
    let p = r.classify_one(&f.items[1]).await;
    assert_eq!(p.outcome, Outcome::Answered, "{p:?}");
    let b = &f.sim.stats().bodies()[0];
    assert_eq!(b["model"], "llama3.2-vision");
    assert_eq!(b["stream"], false);
    assert_eq!(b["options"]["temperature"], 0.0);
    assert_eq!(b["options"]["seed"], 42);
    assert_eq!(b["messages"][0]["role"], "system");
    let user = &b["messages"][1];
    assert!(user["content"].is_string());
    let imgs = user["images"].as_array().unwrap();
    assert_eq!(imgs.len(), 1);
    assert!(
        imgs[0].as_str().unwrap().starts_with("iVBOR"),
        "raw base64, no data: prefix"
    );
    assert_eq!(
        b["format"]["properties"]["label"]["enum"],
        serde_json::json!(labels().names())
    );
    let t = &p.extra["server_timings"];
    for k in ["total_ms", "load_ms", "prompt_eval_ms", "eval_ms"] {
        assert!(t[k].is_number(), "{k}");
    }
    assert!(p.tokens.unwrap().prompt > 85);
    assert_eq!(
        p.cost_usd,
        Some(0.0),
        "local model: priced at zero, not unknown"
    );
    // The simulator lists the model in /api/tags with a digest marked as its own.
    let d = p.model_digest.unwrap();
    assert!(d.starts_with("mica-llm-sim-"), "{d}");
    assert_eq!(d, crate::sim::sim_digest("llama3.2-vision:latest"));
    assert_eq!(
        (p.resolved_model.as_deref(), p.finish_reason.as_deref()),
        (Some("llama3.2-vision"), Some("stop"))
    );
    assert_eq!(f.sim.stats().requests(), 1, "the tags lookup is not a chat request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_stages_through_the_wire() {
    let f = fixture(
        1,
        SimConfig {
            accuracy: 1.0,
            ..SimConfig::default()
        },
    )
    .await;
    let r = Arc::new(openai_runner(&f, "validate", None));
    f.sim
        .push_faults([Fault::None, Fault::Prose, Fault::OutOfSet, Fault::Malformed]);
    let json = r.classify_one(&f.items[0]).await;
    assert_eq!(
        (json.parse_stage.as_deref(), json.outcome),
        (Some("json"), Outcome::Answered)
    );
    assert_eq!(json.predicted, json.true_label);
    let prose = r.classify_one(&f.items[0]).await;
    assert_eq!(
        prose.parse_stage.as_deref(),
        Some("synonym"),
        "{:?}",
        prose.raw_answer
    );
    assert_eq!(prose.predicted, prose.true_label);
    let oos = r.classify_one(&f.items[0]).await;
    assert_eq!(
        (oos.outcome, oos.predicted.as_deref()),
        (Outcome::Unparseable, None)
    );
    assert!(oos.error.unwrap().contains("tuberculosis"));
    let bad = r.classify_one(&f.items[0]).await;
    assert_eq!(bad.outcome, Outcome::Unparseable);
    assert!(bad.raw_answer.unwrap().contains("SIMULATED"));
    assert_eq!(bad.finish_reason.as_deref(), Some("length"), "the sim truncates like max_tokens");
    assert_eq!(json.finish_reason.as_deref(), Some("stop"));
    assert_eq!(
        (json.resolved_model.as_deref(), json.system_fingerprint.as_deref()),
        (Some("test-vlm"), Some(crate::provider::SIM_FINGERPRINT))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidence_and_consistency_stages() {
    let f = fixture(
        3,
        SimConfig {
            accuracy: 0.5,
            ..SimConfig::default()
        },
    )
    .await;
    // Threshold 1.0: the simulator never states 1.0, so everything is deferred, with labels.
    let r = Arc::new(openai_runner(&f, "confidence=1.0", None));
    let p = r.classify_one(&f.items[0]).await;
    assert_eq!(p.outcome, Outcome::Deferred);
    assert!(p.predicted.is_some());
    assert_eq!(p.filter.last().unwrap().stage, "confidence");

    let r = Arc::new(openai_runner(&f, "consistency=5", None));
    let before = f.sim.stats().requests();
    let dir = tempfile::tempdir().unwrap();
    let (_, preds) = run_all(&r, &f.items, dir.path()).await;
    assert_eq!(f.sim.stats().requests() - before, 5 * f.items.len() as u64);
    for p in &preds {
        let agreement = p.extra["agreement"].as_f64().unwrap();
        let st = p
            .filter
            .iter()
            .find(|s| s.stage == "self_consistency")
            .unwrap();
        assert_eq!(st.verdict == "kept", agreement == 1.0, "{p:?}");
        assert_eq!(p.outcome == Outcome::Deferred, agreement < 1.0);
        assert_eq!(p.extra["answers"].as_array().unwrap().len(), 5);
    }
    // Seeds differ per sample, so at 50 % accuracy some images must disagree.
    assert!(preds.iter().any(|p| p.outcome == Outcome::Deferred));
    let seeds: Vec<Value> = f.sim.stats().bodies()[before as usize..before as usize + 5]
        .iter()
        .map(|b| b["seed"].clone())
        .collect();
    assert_eq!(seeds.len(), 5);
    assert_eq!(f.sim.stats().bodies()[before as usize]["temperature"], 0.7);

    let summary = LlmSummary::from_predictions(&preds, &r.config.filter, r.price());
    let sc = summary
        .filter_stages
        .iter()
        .find(|s| s.stage == "self_consistency")
        .unwrap();
    assert_eq!(sc.input, preds.len());
    assert_eq!(sc.kept + sc.deferred, sc.input);
    assert!(summary.simulated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cnn_crosscheck_stage() {
    let f = fixture(
        1,
        SimConfig {
            accuracy: 1.0,
            ..SimConfig::default()
        },
    )
    .await;
    let cnn = f.dir.path().join("cnn.jsonl");
    {
        let (mut log, _) = PredictionLog::open(&cnn).unwrap();
        for (i, it) in f.items.iter().enumerate() {
            let mut p = Prediction::new(&it.sample.id, "cnn:x", Outcome::Answered);
            // The CNN agrees on the first two images and disagrees on the rest.
            p.predicted = Some(if i < 2 {
                it.true_label.clone().unwrap()
            } else {
                "normal".into()
            });
            if i == 3 {
                continue; // no CNN prediction for the last one
            }
            log.append(&p).unwrap();
        }
    }
    let r = Arc::new(
        openai_runner(&f, &format!("crosscheck={}", cnn.display()), None)
            .with_crosscheck_from_filter()
            .unwrap(),
    );
    let out = tempfile::tempdir().unwrap();
    let (_, preds) = run_all(&r, &f.items, out.path()).await;
    let by_id = |id: &str| preds.iter().find(|p| p.sample_id == id).unwrap().clone();
    assert_eq!(by_id(&f.items[0].sample.id).outcome, Outcome::Answered);
    let d = by_id(&f.items[2].sample.id);
    assert_eq!(d.outcome, Outcome::Deferred);
    assert_eq!(
        d.filter.last().unwrap().detail.as_deref(),
        Some("CNN says normal")
    );
    assert_eq!(by_id(&f.items[3].sample.id).outcome, Outcome::Answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_honour_retry_after() {
    let f = fixture(1, SimConfig::default()).await;
    let r = Arc::new(openai_runner(&f, "none", None));
    f.sim.push_faults([Fault::TooManyRequests {
        retry_after_ms: Some(300),
        retry_after_s: None,
    }]);
    let p = r.classify_one(&f.items[0]).await;
    assert_eq!(p.outcome, Outcome::Answered, "{p:?}");
    assert_eq!(p.extra["attempts"], 2);
    let a = f.sim.stats().arrivals();
    assert_eq!(a.len(), 2);
    assert!(
        a[1] - a[0] >= Duration::from_millis(300),
        "{:?}",
        a[1] - a[0]
    );
    // Retry-After in whole seconds, and a 500 retried after the backoff.
    f.sim.push_faults([
        Fault::TooManyRequests {
            retry_after_ms: None,
            retry_after_s: Some(1),
        },
        Fault::ServerError,
    ]);
    let p = r.classify_one(&f.items[0]).await;
    assert_eq!(
        (p.outcome, p.extra["attempts"].as_u64()),
        (Outcome::Answered, Some(3))
    );
    let a = f.sim.stats().arrivals();
    assert!(a[3] - a[2] >= Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_max_attempts_is_failed_not_a_label() {
    let f = fixture(1, SimConfig::default()).await;
    let r = Arc::new(openai_runner(&f, "default", None));
    f.sim
        .push_faults([Fault::ServerError, Fault::ServerError, Fault::ServerError]);
    let p = r.classify_one(&f.items[0]).await;
    assert_eq!(p.outcome, Outcome::Failed);
    assert_eq!(p.predicted, None);
    let e = p.error.unwrap();
    assert!(
        e.contains("gave up after 3 attempts") && e.contains("HTTP 500"),
        "{e}"
    );
    assert_eq!(f.sim.stats().requests(), 3);
    // A timeout is a failure too, with its own message.
    let mut lim = fast_limits(1);
    lim.timeout = Duration::from_millis(100);
    lim.max_attempts = 1;
    let r = Arc::new(openai_runner(&f, "none", None).with_limits(lim));
    f.sim.push_faults([Fault::Slow(Duration::from_millis(600))]);
    let p = r.classify_one(&f.items[0]).await;
    assert_eq!(p.outcome, Outcome::Failed);
    assert!(p.error.unwrap().contains("no answer within"));
    // A non-retryable status fails at once.
    let spec =
        ProviderSpec::parse(&format!("openai-compatible/x@{}/nowhere", f.sim.url())).unwrap();
    let prov = Arc::new(OpenAiClient::new(
        http_client(),
        spec.kind,
        &spec.base_url,
        None,
    ));
    let r = Arc::new(
        LlmRunner::new(LlmConfig::new(spec, Modality::Xray, labels()), prov)
            .with_limits(fast_limits(1)),
    );
    let p = r.classify_one(&f.items[0]).await;
    assert_eq!(
        (p.outcome, p.extra["attempts"].as_u64()),
        (Outcome::Failed, Some(1))
    );
    assert!(p.error.unwrap().contains("HTTP 404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_makes_a_rerun_free() {
    let f = fixture(2, SimConfig::default()).await;
    let cache_dir = tempfile::tempdir().unwrap();
    let mk = || {
        Arc::new(
            openai_runner(&f, "default", None)
                .with_cache(Some(ResponseCache::new(cache_dir.path()))),
        )
    };
    let (o1, o2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, p1) = run_all(&mk(), &f.items, o1.path()).await;
    assert_eq!((s1.http_requests, s1.cache_hits), (8, 0));
    let before = f.sim.stats().requests();
    let (s2, p2) = run_all(&mk(), &f.items, o2.path()).await;
    assert_eq!((s2.http_requests, s2.cache_hits), (0, 8));
    assert_eq!(f.sim.stats().requests(), before, "second run made no calls");
    for p in &p2 {
        let q = p1.iter().find(|q| q.sample_id == p.sample_id).unwrap();
        assert_eq!(
            (&p.predicted, p.confidence, p.tokens),
            (&q.predicted, q.confidence, q.tokens)
        );
        assert!(p.cached);
        assert_eq!(
            p.latency_ms, q.latency_ms,
            "cached answers keep their latency"
        );
    }
    // --no-cache: calls again.
    let o3 = tempfile::tempdir().unwrap();
    let (s3, _) = run_all(
        &Arc::new(openai_runner(&f, "default", None)),
        &f.items,
        o3.path(),
    )
    .await;
    assert_eq!(s3.http_requests, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_kill_mid_line() {
    let f = fixture(3, SimConfig::default()).await;
    let out = tempfile::tempdir().unwrap();
    let r = Arc::new(openai_runner(&f, "default", None));
    let (_, first) = run_all(&r, &f.items[..7], out.path()).await;
    assert_eq!(first.len(), 7);
    // Kill mid-write: cut the file in the middle of its 6th line.
    let path = out.path().join("predictions.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let starts: Vec<usize> = text.match_indices('\n').map(|(i, _)| i + 1).collect();
    let cut = starts[4] + (starts[5] - starts[4]) / 2;
    std::fs::write(&path, &text[..cut]).unwrap();
    let before = f.sim.stats().requests();
    let (stats, all) = run_all(&r, &f.items, out.path()).await;
    assert_eq!(stats.resumed, 5);
    assert_eq!(stats.classified, f.items.len() - 5);
    assert_eq!(
        f.sim.stats().requests() - before,
        (f.items.len() - 5) as u64
    );
    let mut ids: Vec<&str> = all.iter().map(|p| p.sample_id.as_str()).collect();
    ids.sort();
    let mut want: Vec<&str> = f.items.iter().map(|i| i.sample.id.as_str()).collect();
    want.sort();
    assert_eq!(ids, want, "no duplicate, no missing line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bound_is_respected() {
    let f = fixture(
        5,
        SimConfig {
            latency_ms: 30,
            ..SimConfig::default()
        },
    )
    .await;
    let r = Arc::new(openai_runner(&f, "none", None).with_limits(fast_limits(3)));
    let out = tempfile::tempdir().unwrap();
    let (stats, preds) = run_all(&r, &f.items, out.path()).await;
    assert_eq!(preds.len(), 20);
    assert_eq!(stats.http_requests, 20);
    assert_eq!(f.sim.stats().max_in_flight(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_limit_spaces_requests() {
    let f = fixture(1, SimConfig::default()).await;
    // 600 rpm = 10/s with a burst of 100... too big for a test; 60 rpm: burst 10, then 1/s.
    let mut lim = fast_limits(4);
    lim.rpm = Some(60);
    let r = Arc::new(openai_runner(&f, "none", None).with_limits(lim));
    let mut items = Vec::new();
    for _ in 0..3 {
        items.extend(f.items.iter().cloned());
    }
    for (i, it) in items.iter_mut().enumerate() {
        it.sample.id = format!("{i}");
    }
    let out = tempfile::tempdir().unwrap();
    let (_, preds) = run_all(&r, &items[..11], out.path()).await;
    assert_eq!(preds.len(), 11);
    let a = f.sim.stats().arrivals();
    // The 11th request had to wait for a refill (about 1 s).
    assert!(
        a[10] - a[0] >= Duration::from_millis(800),
        "{:?}",
        a[10] - a[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_never_reaches_a_file() {
    const KEY: &str = "sk-mica-test-DO-NOT-WRITE-7f3a9c";
    let f = fixture(2, SimConfig::default().with_fail_rate(0.3)).await;
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let r = Arc::new(
        openai_runner(&f, "default", Some(KEY)).with_cache(Some(ResponseCache::new(cache.path()))),
    );
    let (_, preds) = run_all(&r, &f.items, out.path()).await;
    assert_eq!(preds.len(), 8);
    let summary = LlmSummary::from_predictions(&preds, &r.config.filter, r.price());
    mica_core::write_atomic(
        out.path().join("llm.json"),
        serde_json::to_string(&summary).unwrap().as_bytes(),
    )
    .unwrap();
    let mut files = 0;
    for root in [out.path(), cache.path()] {
        for f in walk(root) {
            files += 1;
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(KEY),
                "{} contains the key",
                f.display()
            );
        }
    }
    assert!(files >= 3);
    assert!(!format!(
        "{:?}",
        OpenAiClient::new(
            http_client(),
            ProviderKind::OpenAi,
            "http://x",
            Some(KEY.into())
        )
    )
    .contains(KEY));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_truth_accuracy_and_stamp() {
    let f = fixture(
        3,
        SimConfig {
            accuracy: 1.0,
            ..SimConfig::default()
        },
    )
    .await;
    let r = Arc::new(openai_runner(&f, "none", None));
    let out = tempfile::tempdir().unwrap();
    let (_, preds) = run_all(&r, &f.items, out.path()).await;
    for p in &preds {
        assert_eq!(p.predicted, p.true_label, "{p:?}");
        assert!(p.simulated);
        assert!(p.rationale.as_deref().unwrap().contains("SIMULATED"));
    }
    // The truth table survives the client's downscaling (max side 32 here).
    let mut lim_cfg = openai_runner(&f, "none", None);
    lim_cfg.config.image_max_side = 32;
    let p = Arc::new(lim_cfg).classify_one(&f.items[5]).await;
    assert_eq!(p.predicted, p.true_label);
    assert!(!p.rationale.unwrap().contains("unknown image"));
    // An image the simulator has never seen gets a random label, said so.
    let other = f.dir.path().join("unknown.png");
    GrayImage::from_fn(64, 64, |x, _| image::Luma([(x * 4) as u8]))
        .save(&other)
        .unwrap();
    let mut it = f.items[0].clone();
    it.sample.source = ImageSource::file(&other);
    let p = r.classify_one(&it).await;
    assert!(p.rationale.unwrap().contains("unknown image"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_findings_modes() {
    let f = fixture(1, SimConfig::default()).await;
    let mut r = openai_runner(&f, "none", None);
    r.config.params.logprobs = true;
    r.config.confidence_source = ConfidenceSource::Logprobs;
    let p = Arc::new(r).classify_one(&f.items[0]).await;
    let lc = p.extra["logprob_confidence"].as_f64().unwrap();
    assert!((lc - p.confidence.unwrap()).abs() < 1e-6);
    assert_eq!(f.sim.stats().bodies()[0]["logprobs"], true);

    let mut r = openai_runner(&f, "none", None);
    r.config.context = ContextMode::Findings;
    let p = Arc::new(r).classify_one(&f.items[0]).await;
    assert_ne!(p.outcome, Outcome::Failed);
    let b = &f.sim.stats().bodies()[1];
    let parts = b["messages"][1]["content"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "findings mode sends no image");
    assert!(parts[0]["text"]
        .as_str()
        .unwrap()
        .contains("cannot see the image"));
    assert!(p.extra["findings"].as_str().unwrap().contains("Left/right"));

    let mut r = openai_runner(&f, "none", None);
    r.config.context = ContextMode::ImageClinical;
    Arc::new(r).classify_one(&f.items[0]).await;
    let b = &f.sim.stats().bodies()[2];
    assert!(b["messages"][1]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("Clinical context: patient 0, cough"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_image_is_failed() {
    let f = fixture(1, SimConfig::default()).await;
    let bad = f.dir.path().join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let mut it = f.items[0].clone();
    it.sample.source = ImageSource::file(&bad);
    let p = Arc::new(openai_runner(&f, "default", None))
        .classify_one(&it)
        .await;
    assert_eq!(p.outcome, Outcome::Failed);
    assert!(p.error.unwrap().contains("bad.png"));
    assert_eq!(f.sim.stats().requests(), 0);
}

#[test]
fn classifier_trait_runs_outside_a_runtime() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = rt.block_on(fixture(
        1,
        SimConfig {
            accuracy: 1.0,
            ..SimConfig::default()
        },
    ));
    let runner = openai_runner(&f, "none", None);
    let mut c = LlmClassifier::new(runner).unwrap();
    let batch: Vec<Sample> = f.items.iter().map(|i| i.sample.clone()).collect();
    let out = mica_core::Classifier::classify(&mut c, &batch);
    assert_eq!(out.len(), 4);
    for (p, s) in out.iter().zip(&batch) {
        let p = p.as_ref().unwrap();
        assert_eq!(p.sample_id, s.id);
        assert_eq!(p.predicted.as_deref(), Some(labels().name(s.label)));
    }
}

// --- Refusals and hedges in the providers' documented wire formats ---------------------------

/// A stand-in server answering every request 200 with `body`. Returns its base URL.
fn wire_stub(body: String) -> String {
    crate::testing::Server::start(move |_| (200, body.clone())).url
}

/// OpenAI's documented `chat.completion` object with this assistant message.
fn openai_completion(message: Value) -> String {
    serde_json::json!({
        "id": "chatcmpl-123", "object": "chat.completion", "created": 1677652288,
        "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 12, "total_tokens": 132}
    })
    .to_string()
}

/// Ollama's documented non-streaming `/api/chat` response with this assistant text.
fn ollama_chat(content: &str) -> String {
    serde_json::json!({
        "model": "llama3.2-vision", "created_at": "2023-12-12T14:13:43.416799Z",
        "message": {"role": "assistant", "content": content},
        "done": true, "done_reason": "stop", "total_duration": 5191566416u64,
        "load_duration": 2154458, "prompt_eval_count": 26, "prompt_eval_duration": 383809000,
        "eval_count": 298, "eval_duration": 4799921000u64
    })
    .to_string()
}

/// Classifies one brain-MRI phantom (truth: glioma) against a server that answers `body`.
async fn classify_via(ollama: bool, body: String) -> Prediction {
    let url = wire_stub(body);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.png");
    phantom(0, 0).save(&path).unwrap();
    let labels = Modality::Mri.canonical_labels().unwrap();
    let s = Sample {
        id: "glioma/0.png".into(),
        source: ImageSource::file(&path),
        label: 0,
        split: None,
        context: None,
    };
    let (spec, provider): (_, Arc<dyn LlmProvider>) = if ollama {
        let spec = ProviderSpec::parse(&format!("ollama/llama3.2-vision@{url}")).unwrap();
        let p = Arc::new(OllamaClient::new(http_client(), &spec.base_url));
        (spec, p)
    } else {
        let spec = ProviderSpec::parse(&format!("openai-compatible/gpt-4o@{url}")).unwrap();
        let p = Arc::new(OpenAiClient::new(http_client(), spec.kind, &spec.base_url, None));
        (spec, p)
    };
    let mut cfg = LlmConfig::new(spec, Modality::Mri, labels.clone());
    cfg.filter = FilterSpec::default();
    let r = Arc::new(LlmRunner::new(cfg, provider).with_limits(fast_limits(1)));
    r.classify_one(&WorkItem::from_sample(&s, &labels)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_refusal_field_is_refused_not_parsed() {
    let text = "I'm sorry, I can't assist with that request.";
    let body = openai_completion(
        serde_json::json!({"role": "assistant", "content": null, "refusal": text}),
    );
    let p = classify_via(false, body).await;
    assert_eq!(p.outcome, Outcome::Refused, "{p:?}");
    assert_eq!((p.predicted.as_deref(), p.parse_stage.as_deref()), (None, None));
    assert_eq!(p.raw_answer.as_deref(), Some(text));
    assert_eq!(p.filter[0].verdict, "refused");
    assert_eq!(p.filter.len(), 1, "no later stage runs on a refusal");
    // Even a refusal that names a class is not an answer.
    let body = openai_completion(serde_json::json!({"role": "assistant", "content": null,
        "refusal": "I can't tell whether this is a glioma."}));
    let p = classify_via(false, body).await;
    assert_eq!((p.outcome, p.predicted), (Outcome::Refused, None));
    // Prose refusals in `content` are refused too.
    let body = openai_completion(serde_json::json!({"role": "assistant",
        "content": "I cannot provide a diagnosis from medical images.", "refusal": null}));
    let p = classify_via(false, body).await;
    assert_eq!(p.outcome, Outcome::Refused, "{p:?}");
    // The summary counts it in label validation and on its own.
    let s = LlmSummary::from_predictions(&[p], &FilterSpec::default(), None);
    assert_eq!((s.outcomes["refused"], s.parse_stages["refused"]), (1, 1));
    assert_eq!((s.filter_stages[0].refused, s.filter_stages[0].unparseable), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_prose_refusal_is_refused() {
    let text = "I'm sorry, but I can't help with identifying medical conditions from images.";
    let p = classify_via(true, ollama_chat(text)).await;
    assert_eq!(p.outcome, Outcome::Refused, "{p:?}");
    assert_eq!(p.predicted, None);
    assert_eq!(p.raw_answer.as_deref(), Some(text));
    assert!(p.extra.contains_key("server_timings"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_are_unparseable_in_both_wire_formats() {
    let hedge = "This could be a glioma or a meningioma.";
    let openai = openai_completion(
        serde_json::json!({"role": "assistant", "content": hedge, "refusal": null}),
    );
    for (ollama, body) in [(false, openai), (true, ollama_chat(hedge))] {
        let p = classify_via(ollama, body).await;
        assert_eq!((p.outcome, p.predicted.as_deref()), (Outcome::Unparseable, None), "{p:?}");
        assert_eq!(p.raw_answer.as_deref(), Some(hedge));
        assert!(p.error.unwrap().contains("several labels"));
    }
    // One class in plain prose is still an answer (deferred: no confidence stated).
    let p = classify_via(true, ollama_chat("This is most consistent with a glioma.")).await;
    assert_eq!((p.outcome, p.predicted.as_deref()), (Outcome::Deferred, Some("glioma")));
}
