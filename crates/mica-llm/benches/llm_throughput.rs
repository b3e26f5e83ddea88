//! Throughput of the LLM runner against `llm-sim` (not a test: it prints ratios).
//!
//! 500 images, simulator latency 200 ms, concurrency 16: the ideal wall time is
//! 500 x 0.2 s / 16 = 6.25 s; the target is within 1.3x of it. Also prints mica's own
//! per-request overhead (PNG encode + base64, JSON body, answer parsing) at p50/p90, target
//! under 2 ms at p50.
//!
//! Run: `cargo bench -p mica-llm --bench llm_throughput` (add `--profile dev` to reuse the
//! test build). Environment: MICA_BENCH_IMAGES, MICA_BENCH_LATENCY_MS, MICA_BENCH_CONCURRENCY,
//! MICA_BENCH_SIDE (image side in pixels, default 256).

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::GrayImage;
use mica_core::{ImageSource, Modality, PredictionLog, Sample};
use mica_llm::provider::{http_client, ChatRequest, GenParams, LlmProvider, OpenAiClient};
use mica_llm::sim::{SimConfig, SimServer, TruthTable};
use mica_llm::{
    imgenc, parse_answer, Limits, LlmConfig, LlmRunner, ParseOptions, ProviderSpec, SynonymTable,
    WorkItem,
};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn phantom(i: usize, side: u32) -> GrayImage {
    let mut s = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    GrayImage::from_fn(side, side, |x, y| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let base = ((x + y + i as u32 * 7) % 200) as u64;
        image::Luma([(base + (s % 40)) as u8])
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let n = env("MICA_BENCH_IMAGES", 500) as usize;
    let latency = env("MICA_BENCH_LATENCY_MS", 200);
    let conc = env("MICA_BENCH_CONCURRENCY", 16) as usize;
    let side = env("MICA_BENCH_SIDE", 256) as u32;
    let labels = Modality::Xray.canonical_labels().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut truth = TruthTable::new();
    let mut items = Vec::with_capacity(n);
    for i in 0..n {
        let img = phantom(i, side);
        let path = dir.path().join(format!("{i}.png"));
        img.save(&path).unwrap();
        let c = i % labels.len();
        truth.add(&img, labels.name(c));
        let s = Sample {
            id: format!("{i}.png"),
            source: ImageSource::file(&path),
            label: c,
            split: None,
            context: None,
        };
        items.push(WorkItem::from_sample(&s, &labels));
    }

    // 1. mica's own work per request, without the network.
    let spec = ProviderSpec::parse("openai-compatible/bench@http://127.0.0.1:1").unwrap();
    let client = OpenAiClient::new(http_client(), spec.kind, &spec.base_url, None);
    let (sys, user) = mica_llm::PromptSet::builtin().render(
        Modality::Xray,
        &labels,
        mica_llm::ContextMode::Image,
        None,
        None,
        0,
    );
    let syn = SynonymTable::builtin();
    let answer = r#"{"label":"viral_pneumonia","confidence":0.74,"rationale":"diffuse interstitial pattern"}"#;
    let mut overhead = Vec::new();
    for it in items.iter().take(200) {
        let t = Instant::now();
        let img = image::open(it.sample.source.path()).unwrap().to_luma8();
        let png = imgenc::encode_png(&img, 512);
        let sha = imgenc::sha256_hex(&png);
        let req = ChatRequest {
            model: "bench".into(),
            system: sys.clone(),
            user: user.clone(),
            image_b64: Some(Arc::from(imgenc::base64(&png))),
            labels: labels.names().to_vec(),
            params: GenParams::default(),
        };
        let body = serde_json::to_vec(&client.request_body(&req)).unwrap();
        let parsed = parse_answer(answer, &labels, &syn, &ParseOptions::default());
        overhead.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(parsed.label.is_some() && !body.is_empty() && sha.len() == 64);
    }
    let (p50, p90) = (pct(&mut overhead.clone(), 0.5), pct(&mut overhead, 0.9));
    println!(
        "overhead per request ({side}x{side} PNG file: decode + encode + sha256 + base64 + JSON body + parse): p50 {p50:.3} ms, p90 {p90:.3} ms (target p50 < 2 ms: {})",
        if p50 < 2.0 { "met" } else { "NOT met" }
    );

    // 2. Throughput against the simulator.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cfg = SimConfig { latency_ms: latency, ..SimConfig::default() };
        let sim = SimServer::start(cfg, truth, "127.0.0.1:0".parse().unwrap(), false).await.unwrap();
        let spec = ProviderSpec::parse(&format!("openai-compatible/bench@{}", sim.url())).unwrap();
        let provider = Arc::new(OpenAiClient::new(http_client(), spec.kind, &spec.base_url, None));
        let runner = Arc::new(
            LlmRunner::new(LlmConfig::new(spec, Modality::Xray, labels.clone()), provider)
                .with_limits(Limits { concurrency: conc, timeout: Duration::from_secs(30), ..Limits::default() }),
        );
        let out = tempfile::tempdir().unwrap();
        let (mut log, _) = PredictionLog::open(out.path().join("predictions.jsonl")).unwrap();
        let stats = runner.run(items, &mut log, None).await.unwrap();
        let ideal = n as f64 * latency as f64 / 1000.0 / conc as f64;
        let ratio = stats.wall_seconds / ideal;
        let stats_sim = sim.stats();
        println!(
            "throughput: {n} images, latency {latency} ms, concurrency {conc}: {:.2} s vs ideal {ideal:.2} s: ratio {ratio:.3} (target <= 1.3: {}); {:.1} images/s; server saw max {} in flight, {} requests",
            stats.wall_seconds,
            if ratio <= 1.3 { "met" } else { "NOT met" },
            n as f64 / stats.wall_seconds,
            stats_sim.max_in_flight(),
            stats_sim.requests(),
        );
        sim.shutdown().await;
    });
}
