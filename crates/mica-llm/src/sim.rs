//! `mica llm-sim`: a local server speaking the OpenAI chat-completions and Ollama `/api/chat`
//! protocols, answering from a confusion model. For dry runs (set-up, cost and throughput
//! before paying for an API) and for tests. It is not a model: every response carries the
//! header `x-mica-simulator: 1` (and `system_fingerprint: "mica-llm-sim"` in OpenAI format),
//! clients stamp its answers SIMULATED, and each rationale says so.
//!
//! How it knows the truth: it is given a truth table (images with their labels, e.g. built from
//! a dataset). It decodes the image it is sent, reduces it to a 16x16 thumbnail and takes the
//! label of the nearest table entry (mean absolute difference below 10 grey levels, so client-
//! side resizing and re-encoding do not matter). Known images get the true label with
//! probability `accuracy`, otherwise a confusable wrong label; unknown images (and text-only
//! requests) get a uniformly random label. No hidden markers in the images are used. Answers
//! are deterministic per (image, model, prompt, seed, temperature), so caching and seeds behave
//! as with a real server.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use image::GrayImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::provider::{SIM_FINGERPRINT, SIM_HEADER};
use crate::{shutdown_signal, LlmError, SynonymTable};

const THUMB: u32 = 16;
const MATCH_MAD: f64 = 10.0;

/// Rates are probabilities per request, drawn independently of the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Probability that a known image gets its true label.
    pub accuracy: f64,
    /// Latency added to every answer.
    pub latency_ms: u64,
    pub rate_429: f64,
    pub rate_500: f64,
    /// Truncated JSON that names no label.
    pub rate_malformed: f64,
    /// A well-formed answer whose label is outside the label set.
    pub rate_out_of_set: f64,
    /// Free prose naming the label by a synonym ("COVID-19 pneumonia"), without JSON.
    pub rate_prose: f64,
    pub rate_slow: f64,
    pub slow_ms: u64,
    /// `retry-after-ms` sent with 429s.
    pub retry_after_ms: u64,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            accuracy: 0.7,
            latency_ms: 0,
            rate_429: 0.0,
            rate_500: 0.0,
            rate_malformed: 0.0,
            rate_out_of_set: 0.0,
            rate_prose: 0.0,
            rate_slow: 0.0,
            slow_ms: 0,
            retry_after_ms: 200,
            seed: 42,
        }
    }
}

impl SimConfig {
    /// `--fail-rate F`: half 429s, half 500s.
    pub fn with_fail_rate(mut self, f: f64) -> Self {
        self.rate_429 = f / 2.0;
        self.rate_500 = f / 2.0;
        self
    }

    pub fn validate(&self) -> Result<(), LlmError> {
        let rates = [
            ("accuracy", self.accuracy),
            ("429 rate", self.rate_429),
            ("500 rate", self.rate_500),
            ("malformed rate", self.rate_malformed),
            ("out-of-set rate", self.rate_out_of_set),
            ("prose rate", self.rate_prose),
            ("slow rate", self.rate_slow),
        ];
        for (n, r) in rates {
            if !(0.0..=1.0).contains(&r) {
                return Err(LlmError::Sim(format!("{n} {r} must be within 0..1")));
            }
        }
        let sum = self.rate_429
            + self.rate_500
            + self.rate_malformed
            + self.rate_out_of_set
            + self.rate_prose;
        if sum > 1.0 + 1e-9 {
            return Err(LlmError::Sim(format!("fault rates add up to {sum:.2} > 1")));
        }
        Ok(())
    }
}

/// A fault forced onto the next request(s), for tests (before the random draws).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// 429 with `retry-after-ms` and/or `Retry-After` (seconds).
    TooManyRequests {
        retry_after_ms: Option<u64>,
        retry_after_s: Option<u64>,
    },
    ServerError,
    Malformed,
    OutOfSet,
    Prose,
    Slow(Duration),
    /// Answer normally (a scripted pass).
    None,
}

/// Images with known labels, matched by thumbnail.
#[derive(Debug, Clone, Default)]
pub struct TruthTable {
    entries: Vec<(Vec<u8>, String)>,
}

pub fn thumbnail(img: &GrayImage) -> Vec<u8> {
    image::imageops::resize(img, THUMB, THUMB, image::imageops::FilterType::Triangle).into_raw()
}

impl TruthTable {
    pub fn new() -> Self {
        TruthTable::default()
    }
    pub fn add(&mut self, img: &GrayImage, label: &str) {
        self.entries.push((thumbnail(img), label.to_string()));
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn labels(&self) -> Vec<String> {
        let mut l: Vec<String> = self.entries.iter().map(|e| e.1.clone()).collect();
        l.sort();
        l.dedup();
        l
    }

    /// The label of the nearest known image, if it is near enough.
    pub fn lookup(&self, img: &GrayImage) -> Option<&str> {
        self.lookup_thumbnail(&thumbnail(img))
    }

    fn lookup_thumbnail(&self, t: &[u8]) -> Option<&str> {
        let mut best: Option<(f64, &str)> = None;
        for (e, l) in &self.entries {
            let mad = e
                .iter()
                .zip(t)
                .map(|(a, b)| (*a as i32 - *b as i32).unsigned_abs() as u64)
                .sum::<u64>() as f64
                / t.len() as f64;
            if best.is_none_or(|b| mad < b.0) {
                best = Some((mad, l));
            }
        }
        best.filter(|b| b.0 < MATCH_MAD).map(|b| b.1)
    }

    /// A CSV with a header and the columns `path,label` (paths relative to the CSV's folder).
    pub fn from_csv(path: &Path) -> Result<Self, LlmError> {
        let text = std::fs::read_to_string(path).map_err(|e| LlmError::file(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut t = TruthTable::new();
        for (i, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let (p, l) = line.rsplit_once(',').ok_or_else(|| {
                LlmError::file(path, format!("line {}: expected `path,label`", i + 1))
            })?;
            let img_path = base.join(p.trim().trim_matches('"'));
            let img = image::open(&img_path)
                .map_err(|e| {
                    LlmError::file(path, format!("line {}: {}: {e}", i + 1, img_path.display()))
                })?
                .to_luma8();
            t.add(&img, l.trim().trim_matches('"'));
        }
        if t.is_empty() {
            return Err(LlmError::file(path, "no `path,label` rows"));
        }
        Ok(t)
    }
}

/// Counters the tests and the benchmark read.
#[derive(Debug, Default)]
pub struct SimStats {
    pub requests: AtomicU64,
    pub openai_requests: AtomicU64,
    pub ollama_requests: AtomicU64,
    pub faults: AtomicU64,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Every request body received, in arrival order (kept only when `keep_bodies`).
    pub bodies: Mutex<Vec<Value>>,
    pub arrivals: Mutex<Vec<Instant>>,
    keep_bodies: bool,
}

impl SimStats {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().unwrap().clone()
    }
}

struct Shared {
    cfg: SimConfig,
    truth: TruthTable,
    stats: Arc<SimStats>,
    script: Mutex<VecDeque<Fault>>,
    synonyms: SynonymTable,
}

/// A running simulator (in-process).
pub struct SimServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimServer {
    /// Binds `addr` (port 0 for any free port) and serves in the background of the current
    /// tokio runtime. `keep_bodies` records every request body (tests only: memory grows).
    pub async fn start(
        cfg: SimConfig,
        truth: TruthTable,
        addr: SocketAddr,
        keep_bodies: bool,
    ) -> Result<SimServer, LlmError> {
        cfg.validate()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| LlmError::Sim(format!("cannot listen on {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| LlmError::Sim(e.to_string()))?;
        let shared = Arc::new(Shared {
            cfg,
            truth,
            stats: Arc::new(SimStats {
                keep_bodies,
                ..SimStats::default()
            }),
            script: Mutex::new(VecDeque::new()),
            synonyms: SynonymTable::builtin(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(openai_chat))
            .route("/api/chat", post(ollama_chat))
            .route("/api/tags", get(ollama_tags))
            .route(
                "/health",
                get(|| async { "mica llm-sim (SIMULATED answers)\n" }),
            )
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(shared.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(SimServer {
            addr,
            shared,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn stats(&self) -> Arc<SimStats> {
        self.shared.stats.clone()
    }
    /// Forces faults onto the next requests, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.script.lock().unwrap().extend(faults);
    }

    /// Stops accepting requests and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Serves until Ctrl-C (or SIGTERM on Unix), then shuts down gracefully.
    pub async fn run_until_signal(self) {
        shutdown_signal().await;
        self.shutdown().await;
    }
}

struct InFlight(Arc<SimStats>);
impl InFlight {
    fn enter(s: &Arc<SimStats>) -> Self {
        let n = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(n, Ordering::SeqCst);
        InFlight(s.clone())
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    OpenAi,
    Ollama,
}

async fn openai_chat(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    handle(s, body, Proto::OpenAi).await
}

async fn ollama_chat(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    handle(s, body, Proto::Ollama).await
}

/// The models the simulator's `/api/tags` lists (it answers any model name in `/api/chat`,
/// but a list must name some): common vision models, all with the `:latest` tag.
pub const SIM_OLLAMA_MODELS: [&str; 8] = [
    "llama3.2-vision:latest",
    "llava:latest",
    "llava-llama3:latest",
    "bakllava:latest",
    "minicpm-v:latest",
    "qwen2.5vl:latest",
    "gemma3:latest",
    "moondream:latest",
];

/// The digest the simulator reports for a model: stable per name and marked as the
/// simulator's (`mica-llm-sim-` before the hex), so it can never pass for real weights' digest.
pub fn sim_digest(model: &str) -> String {
    let hex: String = Sha256::digest(format!("mica llm-sim {model}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("mica-llm-sim-{hex}")
}

/// `GET /api/tags` in Ollama's documented shape, with fake digests (see [`sim_digest`]).
async fn ollama_tags() -> Response {
    let models: Vec<Value> = SIM_OLLAMA_MODELS
        .iter()
        .map(|m| {
            json!({
                "name": m,
                "model": m,
                "modified_at": "1970-01-01T00:00:00Z",
                "size": 0,
                "digest": sim_digest(m),
                "details": {"parent_model": "", "format": "mica-llm-sim", "family": "mica-llm-sim",
                            "families": ["mica-llm-sim"], "parameter_size": "0", "quantization_level": "none"}
            })
        })
        .collect();
    (StatusCode::OK, sim_headers(), Json(json!({"models": models}))).into_response()
}

fn sim_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(SIM_HEADER, HeaderValue::from_static("1"));
    h
}

fn error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        sim_headers(),
        Json(json!({"error": {"message": msg, "type": "mica_llm_sim"}})),
    )
        .into_response()
}

/// What one request asked for, extracted from either protocol.
struct Asked {
    model: String,
    text: String,
    image: Option<GrayImage>,
    labels: Vec<String>,
    seed: Option<u64>,
    temperature: f64,
    logprobs: bool,
    detail_high: bool,
}

fn extract(v: &Value, proto: Proto) -> Result<Asked, String> {
    let model = v
        .get("model")
        .and_then(|m| m.as_str())
        .ok_or("missing `model`")?
        .to_string();
    let messages = v
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or("missing `messages`")?;
    let mut text = String::new();
    let mut images_b64: Vec<String> = Vec::new();
    let mut detail_high = false;
    for m in messages {
        match m.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) if proto == Proto::OpenAi => {
                for p in parts {
                    match p.get("type").and_then(|t| t.as_str()) {
                        Some("text") => {
                            text.push_str(p.get("text").and_then(|t| t.as_str()).unwrap_or(""))
                        }
                        Some("image_url") => {
                            let iu = p
                                .get("image_url")
                                .ok_or("image_url part without `image_url`")?;
                            let url = iu
                                .get("url")
                                .and_then(|u| u.as_str())
                                .ok_or("image_url without `url`")?;
                            let (_, b64) = url
                                .split_once(";base64,")
                                .ok_or("image url is not a base64 data: URL")?;
                            detail_high |=
                                iu.get("detail").and_then(|d| d.as_str()) == Some("high");
                            images_b64.push(b64.to_string());
                        }
                        other => return Err(format!("unknown content part type {other:?}")),
                    }
                }
            }
            _ => {}
        }
        if proto == Proto::Ollama {
            if let Some(imgs) = m.get("images").and_then(|i| i.as_array()) {
                for i in imgs {
                    images_b64.push(
                        i.as_str()
                            .ok_or("`images` entries must be base64 strings")?
                            .to_string(),
                    );
                }
            }
        }
    }
    if images_b64.len() > 1 {
        return Err("more than one image: Llama 3.2 Vision accepts one image per request".into());
    }
    let image = match images_b64.first() {
        Some(b) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| format!("image is not valid base64: {e}"))?;
            Some(
                image::load_from_memory(&bytes)
                    .map_err(|e| format!("image cannot be decoded: {e}"))?
                    .to_luma8(),
            )
        }
        None => None,
    };
    let schema = match proto {
        Proto::OpenAi => v.pointer("/response_format/json_schema/schema"),
        Proto::Ollama => v.get("format"),
    };
    let labels: Vec<String> = schema
        .and_then(|s| s.pointer("/properties/label/enum"))
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let (seed, temperature) = match proto {
        Proto::OpenAi => (
            v.get("seed").and_then(|s| s.as_u64()),
            v.get("temperature").and_then(|t| t.as_f64()).unwrap_or(1.0),
        ),
        Proto::Ollama => (
            v.pointer("/options/seed").and_then(|s| s.as_u64()),
            v.pointer("/options/temperature")
                .and_then(|t| t.as_f64())
                .unwrap_or(0.8),
        ),
    };
    Ok(Asked {
        model,
        text,
        image,
        labels,
        seed,
        temperature,
        logprobs: v.get("logprobs").and_then(|l| l.as_bool()).unwrap_or(false),
        detail_high,
    })
}

fn confusable(label: &str) -> &'static [&'static str] {
    match label {
        "covid" => &["lung_opacity", "viral_pneumonia"],
        "lung_opacity" => &["covid", "viral_pneumonia"],
        "viral_pneumonia" => &["lung_opacity", "covid"],
        "glioma" => &["meningioma"],
        "meningioma" => &["glioma", "pituitary"],
        "pituitary" => &["meningioma"],
        "no_tumor" => &["pituitary"],
        "adenocarcinoma" => &["large_cell_carcinoma", "squamous_cell_carcinoma"],
        "large_cell_carcinoma" => &["adenocarcinoma"],
        "squamous_cell_carcinoma" => &["adenocarcinoma"],
        _ => &[],
    }
}

async fn handle(s: Arc<Shared>, body: Bytes, proto: Proto) -> Response {
    let stats = &s.stats;
    let _guard = InFlight::enter(stats);
    let n = stats.requests.fetch_add(1, Ordering::SeqCst);
    match proto {
        Proto::OpenAi => stats.openai_requests.fetch_add(1, Ordering::SeqCst),
        Proto::Ollama => stats.ollama_requests.fetch_add(1, Ordering::SeqCst),
    };
    stats.arrivals.lock().unwrap().push(Instant::now());
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("request is not JSON: {e}"),
            )
        }
    };
    if stats.keep_bodies {
        stats.bodies.lock().unwrap().push(v.clone());
    }
    let scripted = s.script.lock().unwrap().pop_front();
    let fault = scripted.unwrap_or_else(|| {
        let mut r = ChaCha8Rng::seed_from_u64(s.cfg.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let u: f64 = r.random();
        let c = &s.cfg;
        let mut acc = 0.0;
        let mut pick = Fault::None;
        for (rate, f) in [
            (
                c.rate_429,
                Fault::TooManyRequests {
                    retry_after_ms: Some(c.retry_after_ms),
                    retry_after_s: None,
                },
            ),
            (c.rate_500, Fault::ServerError),
            (c.rate_malformed, Fault::Malformed),
            (c.rate_out_of_set, Fault::OutOfSet),
            (c.rate_prose, Fault::Prose),
        ] {
            acc += rate;
            if u < acc {
                pick = f;
                break;
            }
        }
        if pick == Fault::None && c.rate_slow > 0.0 && r.random::<f64>() < c.rate_slow {
            pick = Fault::Slow(Duration::from_millis(c.slow_ms));
        }
        pick
    });
    if fault != Fault::None {
        stats.faults.fetch_add(1, Ordering::SeqCst);
    }
    let started = Instant::now();
    let mut delay = Duration::from_millis(s.cfg.latency_ms);
    if let Fault::Slow(d) = fault {
        delay += d;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match &fault {
        Fault::TooManyRequests {
            retry_after_ms,
            retry_after_s,
        } => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "simulated rate limit");
            if let Some(ms) = retry_after_ms {
                r.headers_mut()
                    .insert("retry-after-ms", HeaderValue::from(*ms));
            }
            if let Some(secs) = retry_after_s {
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from(*secs));
            }
            return r;
        }
        Fault::ServerError => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "simulated server error")
        }
        _ => {}
    }
    let asked = match extract(&v, proto) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let labels = if asked.labels.is_empty() {
        s.truth.labels()
    } else {
        asked.labels.clone()
    };
    if labels.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "no label set: send the answer schema (label enum) or start the simulator with a truth table",
        );
    }
    // Deterministic answer per (image, model, prompt, seed, temperature).
    let mut h = Sha256::new();
    h.update(s.cfg.seed.to_le_bytes());
    h.update(asked.model.as_bytes());
    h.update(asked.text.as_bytes());
    h.update(asked.seed.unwrap_or(u64::MAX).to_le_bytes());
    h.update(asked.temperature.to_le_bytes());
    let thumb = asked.image.as_ref().map(thumbnail);
    if let Some(t) = &thumb {
        h.update(t);
    }
    let digest = h.finalize();
    let mut rng = ChaCha8Rng::from_seed(digest.into());
    let truth = thumb
        .as_deref()
        .and_then(|t| s.truth.lookup_thumbnail(t))
        .filter(|t| labels.iter().any(|l| l == t));
    let (label, confidence, why) = match truth {
        Some(t) => {
            if rng.random::<f64>() < s.cfg.accuracy {
                (
                    t.to_string(),
                    0.55 + 0.44 * rng.random::<f64>(),
                    "known image, answered truly",
                )
            } else {
                let conf: Vec<&str> = confusable(t)
                    .iter()
                    .copied()
                    .filter(|c| labels.iter().any(|l| l == c))
                    .collect();
                let others: Vec<&String> = labels.iter().filter(|l| *l != t).collect();
                let wrong = if !conf.is_empty() && rng.random::<f64>() < 0.7 {
                    conf[rng.random_range(0..conf.len())].to_string()
                } else if !others.is_empty() {
                    others[rng.random_range(0..others.len())].clone()
                } else {
                    t.to_string()
                };
                (
                    wrong,
                    0.3 + 0.5 * rng.random::<f64>(),
                    "known image, answered with a confusable label",
                )
            }
        }
        None => (
            labels[rng.random_range(0..labels.len())].clone(),
            0.2 + 0.3 * rng.random::<f64>(),
            "unknown image, random label",
        ),
    };
    let confidence = (confidence * 100.0).round() / 100.0;
    let rationale = format!("SIMULATED by mica llm-sim ({why}); not a model output");
    let content = match fault {
        Fault::Malformed => format!("{{\"rationale\": \"{rationale}\", \"label\": "),
        Fault::OutOfSet => {
            json!({"label": "tuberculosis", "confidence": confidence, "rationale": rationale})
                .to_string()
        }
        Fault::Prose => {
            let phrase = s
                .synonyms
                .phrases_for(&label)
                .into_iter()
                .find(|p| *p != label.replace('_', " "))
                .unwrap_or_else(|| label.replace('_', " "));
            format!("SIMULATED answer: the image is most consistent with {phrase}.")
        }
        _ => json!({"label": label, "confidence": confidence, "rationale": rationale}).to_string(),
    };
    let image_tokens = match &asked.image {
        None => 0,
        Some(img) if asked.detail_high => {
            let (w, h) = img.dimensions();
            let s1 = (2048.0 / w.max(h) as f64).min(1.0);
            let (w, h) = (w as f64 * s1, h as f64 * s1);
            let s2 = (768.0 / w.min(h)).min(1.0);
            let tiles = ((w * s2) / 512.0).ceil() * ((h * s2) / 512.0).ceil();
            85 + 170 * tiles as u64
        }
        Some(_) => 85,
    };
    let prompt_tokens = asked.text.len() as u64 / 4 + image_tokens + 7;
    let completion_tokens = content.len() as u64 / 4 + 1;
    let elapsed_ns = started.elapsed().as_nanos() as u64;
    // A truncated answer is what running out of `max_tokens` produces.
    let finish_reason = if fault == Fault::Malformed { "length" } else { "stop" };
    let body = match proto {
        Proto::OpenAi => {
            let mut choice = json!({
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "finish_reason": finish_reason
            });
            if asked.logprobs {
                choice["logprobs"] =
                    json!({"content": logprob_tokens(&content, &label, confidence)});
            }
            json!({
                "id": format!("chatcmpl-sim-{n}"),
                "object": "chat.completion",
                "created": 0,
                "model": asked.model,
                "system_fingerprint": SIM_FINGERPRINT,
                "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}
            })
        }
        Proto::Ollama => json!({
            "model": asked.model,
            "created_at": "1970-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": content},
            "done": true,
            "done_reason": finish_reason,
            "total_duration": elapsed_ns,
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": elapsed_ns * 3 / 10,
            "eval_count": completion_tokens,
            "eval_duration": elapsed_ns * 7 / 10
        }),
    };
    (StatusCode::OK, sim_headers(), Json(body)).into_response()
}

/// Splits the answer into three tokens around the label value; the label token's logprob is
/// ln(confidence), so a logprob-derived confidence equals the stated one.
fn logprob_tokens(content: &str, label: &str, confidence: f64) -> Value {
    let needle = format!("\"{label}\"");
    match content.find(&needle) {
        Some(i) => {
            let (a, rest) = content.split_at(i + 1);
            let (b, c) = rest.split_at(label.len());
            json!([
                {"token": a, "logprob": -0.001, "top_logprobs": []},
                {"token": b, "logprob": confidence.max(1e-6).ln(), "top_logprobs": []},
                {"token": c, "logprob": -0.001, "top_logprobs": []}
            ])
        }
        None => json!([{"token": content, "logprob": -2.0, "top_logprobs": []}]),
    }
}
