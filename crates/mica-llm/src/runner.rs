//! Running a vision LLM over a dataset robustly: bounded concurrency, RPM/TPM limits,
//! exponential backoff with jitter that honours `Retry-After`, a per-request timeout, a
//! maximum number of attempts after which the image is `failed` with the last error (never an
//! empty "wrong" answer), the response cache, and the append-only prediction log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::GrayImage;
use mica_core::{
    ClassifyError, ImageSource, LabelSet, Modality, Outcome, Prediction, PredictionLog, Sample,
    TokenUsage,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

use crate::filter::{self, FilterSpec};
use crate::imgenc::{base64, encode_png, sha256_hex};
use crate::provider::{
    ChatRequest, ChatResponse, Detail, GenParams, LlmProvider, ProviderError, ServerTimings,
};
use crate::{
    parse_answer, ContextMode, Findings, LlmError, ParsedAnswer, PriceEntry, PriceTable, PromptSet,
    ProviderSpec, ResponseCache, SnapshotWatch, SynonymTable,
};

/// Where a prediction's confidence comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfidenceSource {
    /// The confidence the model states in its JSON answer.
    Stated,
    /// exp(logprob of the label tokens), falling back to the stated one when absent.
    Logprobs,
}

impl std::str::FromStr for ConfidenceSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stated" => Ok(ConfidenceSource::Stated),
            "logprobs" => Ok(ConfidenceSource::Logprobs),
            o => Err(format!(
                "unknown confidence source `{o}` (expected stated or logprobs)"
            )),
        }
    }
}

/// Request-pacing and failure-handling knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Maximum requests in flight.
    pub concurrency: usize,
    /// Requests per minute (None: unlimited).
    pub rpm: Option<u32>,
    /// Tokens per minute, estimated before sending (None: unlimited).
    pub tpm: Option<u64>,
    pub max_attempts: u32,
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Longest `Retry-After` honoured (the OpenAI SDK's cap is 60 s).
    pub max_retry_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            concurrency: 4,
            rpm: None,
            tpm: None,
            max_attempts: 5,
            timeout: Duration::from_secs(120),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// Delay before attempt `attempt + 1`: the server's `Retry-After` when given, else
    /// base * 2^(attempt-1) capped, with "equal jitter" (half fixed, half random) so a burst of
    /// rate-limited requests does not come back in lockstep.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_retry_after);
        }
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20))
            .min(self.backoff_max);
        let j: f64 = rand::rng().random_range(0.5..=1.0);
        exp.mul_f64(j)
    }
}

/// Token bucket: `capacity` tokens, refilled at `per_sec`.
struct Bucket {
    capacity: f64,
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A per-minute budget with a 10-second burst.
    fn per_minute(per_min: f64) -> Self {
        let capacity = (per_min / 6.0).max(1.0);
        Bucket {
            capacity,
            per_sec: per_min / 60.0,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    async fn acquire(&self, n: f64) {
        let n = n.min(self.capacity);
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                s.0 =
                    (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_sec).min(self.capacity);
                s.1 = now;
                if s.0 >= n {
                    s.0 -= n;
                    return;
                }
                (n - s.0) / self.per_sec
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }

    /// Settles the difference between what a request was charged up front and what the
    /// server says it used: a refund when the estimate was high, a debt (the level may go
    /// negative, delaying later requests) when it was low, so the estimate's error does not
    /// accumulate over a long run.
    async fn settle(&self, charged: f64, actual: f64) {
        let mut s = self.state.lock().await;
        s.0 = (s.0 + charged - actual).min(self.capacity);
    }

    #[cfg(test)]
    async fn level(&self) -> f64 {
        self.state.lock().await.0
    }
}

/// Reads an image's pixels. The CLI passes `mica_data::image::load_gray` (all layouts,
/// DICOM, npz); [`default_loader`] reads plain image files.
pub type ImageLoader = Arc<dyn Fn(&ImageSource) -> Result<GrayImage, String> + Send + Sync>;

pub fn default_loader() -> ImageLoader {
    Arc::new(|src: &ImageSource| match src {
        ImageSource::File { path } => image::open(path)
            .map(|i| i.to_luma8())
            .map_err(|e| format!("{}: {e}", path.display())),
        other => Err(format!(
            "{}: this image source needs mica-data's loader",
            other.path().display()
        )),
    })
}

/// The configuration that decides what is asked; recorded in the run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmConfig {
    pub spec: ProviderSpec,
    pub modality: Modality,
    pub labels: LabelSet,
    pub context: ContextMode,
    pub params: GenParams,
    pub filter: FilterSpec,
    /// Longest image side sent (pixels).
    pub image_max_side: u32,
    pub confidence_source: ConfidenceSource,
}

impl LlmConfig {
    pub fn new(spec: ProviderSpec, modality: Modality, labels: LabelSet) -> Self {
        LlmConfig {
            spec,
            modality,
            labels,
            context: ContextMode::Image,
            params: GenParams::default(),
            filter: FilterSpec::default(),
            image_max_side: 512,
            confidence_source: ConfidenceSource::Stated,
        }
    }
}

/// One image to classify.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub sample: Sample,
    pub true_label: Option<String>,
}

impl WorkItem {
    pub fn from_sample(sample: &Sample, labels: &LabelSet) -> Self {
        WorkItem {
            true_label: (sample.label < labels.len())
                .then(|| labels.name(sample.label).to_string()),
            sample: sample.clone(),
        }
    }
}

/// Counters of one `run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    /// Images classified in this invocation.
    pub classified: usize,
    /// Images already in the log (a resumed run).
    pub resumed: usize,
    pub http_requests: u64,
    pub cache_hits: u64,
    pub retries: u64,
    pub wall_seconds: f64,
}

/// Runs one LLM configuration over images. Cheap to share (`Arc`); all state is internal.
pub struct LlmRunner {
    pub config: LlmConfig,
    name: String,
    provider: Arc<dyn LlmProvider>,
    prompts: PromptSet,
    synonyms: SynonymTable,
    price: Option<(String, PriceEntry)>,
    /// The whole table, so an answer from a snapshot other than the spec's alias target is
    /// charged that snapshot's own price.
    prices: PriceTable,
    limits: Limits,
    cache: Option<ResponseCache>,
    crosscheck: Option<HashMap<String, String>>,
    loader: ImageLoader,
    sem: Arc<Semaphore>,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    http_requests: AtomicU64,
    cache_hits: AtomicU64,
    retries: AtomicU64,
    /// The weights' digest, looked up once before the first request (Ollama); `None` inside
    /// when the server has none or could not say.
    digest: tokio::sync::OnceCell<Option<String>>,
    /// Which snapshot answers, and which cached answers may still be replayed.
    snapshots: SnapshotWatch,
    /// Set when the server rejected the structured-output request (400 on
    /// `response_format`/`format`): every later request of the run goes without the schema,
    /// with the JSON asked for in the prompt, instead of paying a rejected request each time.
    structured_off: AtomicBool,
    /// Set when the server asked for OpenAI's reasoning-model parameters (400 naming
    /// `max_completion_tokens`, or `temperature` unsupported) that the naming rule did not
    /// choose: every later request uses them.
    reasoning_on: AtomicBool,
}

impl LlmRunner {
    pub fn new(config: LlmConfig, provider: Arc<dyn LlmProvider>) -> Self {
        let name = config.spec.canonical();
        let prices = PriceTable::builtin();
        let price = prices.lookup(&config.spec);
        let snapshots =
            SnapshotWatch::new(config.spec.kind, &config.spec.base_url, &config.spec.model);
        let mut r = LlmRunner {
            config,
            name,
            provider,
            prompts: PromptSet::builtin(),
            synonyms: SynonymTable::builtin(),
            price,
            prices,
            limits: Limits::default(),
            cache: None,
            crosscheck: None,
            loader: default_loader(),
            sem: Arc::new(Semaphore::new(1)),
            rpm: None,
            tpm: None,
            http_requests: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            digest: tokio::sync::OnceCell::new(),
            snapshots,
            structured_off: AtomicBool::new(false),
            reasoning_on: AtomicBool::new(false),
        };
        r = r.with_limits(Limits::default());
        r
    }

    /// The classifier name written into predictions (default: the canonical spec).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.sem = Arc::new(Semaphore::new(limits.concurrency.max(1)));
        self.rpm = limits
            .rpm
            .filter(|r| *r > 0)
            .map(|r| Bucket::per_minute(r as f64));
        self.tpm = limits
            .tpm
            .filter(|t| *t > 0)
            .map(|t| Bucket::per_minute(t as f64));
        self.limits = limits;
        self
    }
    pub fn with_prompts(mut self, prompts: PromptSet) -> Self {
        for (label, phrases) in &prompts.synonyms {
            for p in phrases {
                self.synonyms.add(label, p);
            }
        }
        self.prompts = prompts;
        self
    }
    pub fn with_prices(mut self, table: &PriceTable) -> Self {
        self.price = table.lookup(&self.config.spec);
        self.prices = table.clone();
        self
    }
    pub fn with_cache(mut self, cache: Option<ResponseCache>) -> Self {
        self.cache = cache;
        self
    }
    pub fn with_loader(mut self, loader: ImageLoader) -> Self {
        self.loader = loader;
        self
    }
    /// Loads the CNN predictions named by the filter's `crosscheck` stage, if any.
    pub fn with_crosscheck_from_filter(mut self) -> Result<Self, LlmError> {
        if let Some(p) = self.config.filter.crosscheck.clone() {
            self.crosscheck = Some(filter::load_crosscheck(&p)?);
        }
        Ok(self)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn price(&self) -> Option<&(String, PriceEntry)> {
        self.price.as_ref()
    }
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// True once the server has rejected structured output and the run asks for JSON in the
    /// prompt instead (each such prediction has `extra.structured_fallback = true`).
    pub fn structured_fallback(&self) -> bool {
        self.structured_off.load(Ordering::SeqCst)
    }

    /// True once the server asked for the reasoning-model parameters the naming rule did not
    /// choose (each such prediction has `extra.reasoning_params_fallback = true`).
    pub fn reasoning_fallback(&self) -> bool {
        self.reasoning_on.load(Ordering::SeqCst)
    }

    /// The content digest of the model's weights, where the server reports one (Ollama's
    /// `/api/tags`), looked up on the first call and kept for the runner's life; every
    /// prediction carries it in `model_digest` and it is part of the cache key. A failed
    /// lookup is not fatal: it is logged once and the predictions carry no digest.
    pub async fn model_digest(&self) -> Option<String> {
        self.digest
            .get_or_init(|| async {
                let model = &self.config.spec.model;
                match self.provider.model_digest(model, self.limits.timeout).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(
                            model = %model,
                            "cannot learn the model's digest, predictions will not record it: {e}"
                        );
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// Every model snapshot (the `model` the server says answered, e.g. `gpt-4o-2024-08-06`)
    /// whose answers went into this runner's predictions, live or replayed from the cache, in
    /// first-use order. More than one: the alias moved during the run, and the predictions'
    /// `resolved_model` tells which answer came from which.
    pub fn snapshots_seen(&self) -> Vec<String> {
        self.snapshots.used()
    }

    /// The snapshot changes this runner noticed, `(old, new)`, each once: a live answer from
    /// a snapshot other than the latest known for the alias (the cache's record or an earlier
    /// answer), or a cached answer not replayed because a newer snapshot is known. Each was
    /// also logged as a warning.
    pub fn snapshot_changes(&self) -> Vec<(String, String)> {
        self.snapshots.changes()
    }

    /// Requests sent, cache hits and retries so far (the image counts and wall time are the
    /// caller's to fill in).
    pub fn counters(&self) -> RunStats {
        RunStats {
            http_requests: self.http_requests.load(Ordering::SeqCst),
            cache_hits: self.cache_hits.load(Ordering::SeqCst),
            retries: self.retries.load(Ordering::SeqCst),
            ..RunStats::default()
        }
    }

    /// Classifies the items not yet in `log`, appending each answer as soon as it is known.
    /// `progress` is called after every appended prediction.
    pub async fn run(
        self: &Arc<Self>,
        items: Vec<WorkItem>,
        log: &mut PredictionLog,
        progress: Option<&(dyn Fn(&Prediction) + Send + Sync)>,
    ) -> Result<RunStats, LlmError> {
        let t0 = Instant::now();
        let before = (
            self.http_requests.load(Ordering::SeqCst),
            self.cache_hits.load(Ordering::SeqCst),
            self.retries.load(Ordering::SeqCst),
        );
        let mut stats = RunStats::default();
        let todo: Vec<WorkItem> = items
            .into_iter()
            .filter(|it| {
                let done = log.is_done(&self.name, &it.sample.id);
                stats.resumed += usize::from(done);
                !done
            })
            .collect();
        // Backpressure: only a few images beyond the request limit are prepared at a time, so
        // a 20,000-image run never holds 20,000 decoded images.
        let window = self.limits.concurrency.max(1) * 2 + 2;
        let mut set = tokio::task::JoinSet::new();
        let mut queue = todo.into_iter();
        loop {
            while set.len() < window {
                match queue.next() {
                    Some(item) => {
                        let me = self.clone();
                        set.spawn(async move { me.classify_one(&item).await });
                    }
                    None => break,
                }
            }
            let Some(res) = set.join_next().await else {
                break;
            };
            let pred =
                res.map_err(|e| LlmError::Config(format!("classification task panicked: {e}")))?;
            log.append(&pred)?;
            stats.classified += 1;
            if let Some(cb) = progress {
                cb(&pred);
            }
        }
        stats.http_requests = self.http_requests.load(Ordering::SeqCst) - before.0;
        stats.cache_hits = self.cache_hits.load(Ordering::SeqCst) - before.1;
        stats.retries = self.retries.load(Ordering::SeqCst) - before.2;
        stats.wall_seconds = t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// One image, start to finish. Never fails: problems become the outcome.
    pub async fn classify_one(&self, item: &WorkItem) -> Prediction {
        self.classify_one_with_note(item, None).await
    }

    /// [`LlmRunner::classify_one`] with another model's suggestion appended to the prompt's
    /// user text, under [`SUGGESTION_MARKER`] so the model reads it as a second opinion, not as
    /// an instruction or a fact. The note is part of the request and so of the cache key: an
    /// answer given with a note is never replayed for a request without it. The caller must
    /// build the note from model outputs only, never from the true label or file names.
    pub async fn classify_one_with_note(&self, item: &WorkItem, note: Option<&str>) -> Prediction {
        let t_all = Instant::now();
        let cfg = &self.config;
        let mut p = Prediction::new(&item.sample.id, &self.name, Outcome::Failed);
        p.true_label = item.true_label.clone();
        // Before any request: the digest is part of the cache key.
        let digest = self.model_digest().await;
        p.model_digest = digest.clone();
        p.extra
            .insert("context".into(), json!(cfg.context.as_str()));

        // Decode, measure and encode off the async threads.
        let loader = self.loader.clone();
        let src = item.sample.source.clone();
        let (mode, max_side) = (cfg.context, cfg.image_max_side);
        let prepared = tokio::task::spawn_blocking(move || {
            let img = loader(&src)?;
            let findings = mode
                .needs_findings()
                .then(|| Findings::measure(&img).to_text());
            let image = mode.sends_image().then(|| {
                let png = encode_png(&img, max_side);
                (sha256_hex(&png), Arc::<str>::from(base64(&png)))
            });
            Ok::<_, String>((findings, image))
        })
        .await
        .unwrap_or_else(|e| Err(format!("image task failed: {e}")));
        let (findings, image) = match prepared {
            Ok(x) => x,
            Err(e) => {
                p.error = Some(format!("cannot read image: {e}"));
                p.latency_ms = t_all.elapsed().as_secs_f64() * 1e3;
                return p;
            }
        };
        if let Some(f) = &findings {
            p.extra.insert("findings".into(), json!(f));
        }
        let image_sha = image.as_ref().map(|(h, _)| h.clone());
        if let Some(h) = &image_sha {
            p.extra.insert("image_sha256".into(), json!(h));
        }

        let k = cfg.filter.k();
        let parse_opts = cfg.filter.parse_options();
        let mut answers = Vec::with_capacity(k);
        let mut confidences = Vec::with_capacity(k);
        let mut raws = Vec::with_capacity(k);
        // (resolved model, system fingerprint, finish reason, weights digest) of each answer.
        let mut provenance = Vec::with_capacity(k);
        let mut usage = TokenUsage::default();
        let mut have_usage = false;
        let (mut latency, mut attempts, mut cached, mut simulated) = (0.0, 0u32, 0usize, false);
        let mut timings = ServerTimings::default();
        let mut have_timings = false;
        let mut reasoning_tokens: Option<u64> = None;
        let (mut structured_fallback, mut reasoning_fallback) = (false, false);
        for i in 0..k {
            let mut params = cfg.params.clone();
            if params.structured && self.structured_off.load(Ordering::SeqCst) {
                params.structured = false;
                structured_fallback = true;
            }
            if params.reasoning.is_none() && self.reasoning_on.load(Ordering::SeqCst) {
                params.reasoning = Some(true);
                reasoning_fallback = true;
            }
            let mut variant = 0;
            if let Some(c) = &cfg.filter.consistency {
                if c.variants {
                    variant = i;
                } else {
                    params.temperature = c.temperature;
                    params.seed = Some(params.seed.unwrap_or(0).wrapping_add(i as u64));
                }
            }
            let (system, mut user) = self.prompts.render(
                cfg.modality,
                &cfg.labels,
                cfg.context,
                item.sample.context.as_deref(),
                findings.as_deref(),
                variant,
            );
            if let Some(n) = note {
                user.push_str("\n\n");
                user.push_str(SUGGESTION_MARKER);
                user.push(' ');
                user.push_str(n);
            }
            let mut req = ChatRequest {
                model: cfg.spec.model.clone(),
                system,
                user,
                image_b64: image.as_ref().map(|(_, b)| b.clone()),
                labels: cfg.labels.names().to_vec(),
                params,
            };
            let key_of = |req: &ChatRequest| {
                self.cache
                    .as_ref()
                    .filter(|_| ResponseCache::cacheable(req))
                    .map(|_| {
                        ResponseCache::key_with_digest(
                            cfg.spec.kind,
                            &cfg.spec.base_url,
                            req,
                            image_sha.as_deref(),
                            digest.as_deref(),
                        )
                    })
            };
            let mut key = key_of(&req);
            // An entry of a snapshot other than the alias's latest is a miss (cache.rs).
            let hit = match (&self.cache, &key) {
                (Some(c), Some(k)) => c
                    .get(k)
                    .filter(|r| self.snapshots.admit(Some(c), r.resolved_model.as_deref())),
                _ => None,
            };
            let resp = match hit {
                Some(r) => {
                    self.cache_hits.fetch_add(1, Ordering::SeqCst);
                    cached += 1;
                    r
                }
                None => match self.call_negotiated(&mut req).await {
                    Ok((mut r, n, changed)) => {
                        structured_fallback |= changed.structured;
                        reasoning_fallback |= changed.reasoning;
                        if changed.structured || changed.reasoning {
                            // Cached under the request that was answered.
                            key = key_of(&req);
                        }
                        attempts += n;
                        r.model_digest = digest.clone();
                        self.snapshots.observe_live(
                            self.cache.as_ref(),
                            r.resolved_model.as_deref(),
                            r.system_fingerprint.as_deref(),
                        );
                        if let (Some(c), Some(k)) = (&self.cache, &key) {
                            if let Err(e) = c.put(k, &req.model, &r) {
                                tracing::warn!("response cache: {e}");
                            }
                        }
                        r
                    }
                    Err((e, n, changed)) => {
                        attempts += n;
                        if changed.structured {
                            p.extra.insert("structured_fallback".into(), json!(true));
                        }
                        p.error = Some(e.message.clone());
                        p.extra.insert("attempts".into(), json!(attempts));
                        p.http_status = e.status;
                        p.permanent_error = e.is_permanent();
                        p.latency_ms = t_all.elapsed().as_secs_f64() * 1e3;
                        return p;
                    }
                },
            };
            self.snapshots.note_used(resp.resolved_model.as_deref());
            provenance.push((
                resp.resolved_model.clone(),
                resp.system_fingerprint.clone(),
                resp.finish_reason.clone(),
                resp.model_digest.clone(),
            ));
            latency += resp.latency_ms;
            simulated |= resp.simulated;
            if let Some(u) = resp.usage {
                usage.prompt += u.prompt;
                usage.completion += u.completion;
                have_usage = true;
            }
            if let Some(r) = resp.reasoning_tokens {
                *reasoning_tokens.get_or_insert(0) += r;
            }
            if let Some(t) = resp.timings {
                timings.total_ms += t.total_ms;
                timings.load_ms += t.load_ms;
                timings.prompt_eval_ms += t.prompt_eval_ms;
                timings.eval_ms += t.eval_ms;
                have_timings = true;
            }
            // An OpenAI `refusal` is the model declining, whatever it says ("I can't tell
            // whether this is COVID-19" names no answer): never parsed for a label.
            let refusal = resp.refusal.as_deref().filter(|r| !r.trim().is_empty());
            let (text, parsed) = match refusal {
                Some(r) => (r.to_string(), ParsedAnswer::refusal(r)),
                None => {
                    let parsed =
                        parse_answer(&resp.content, &cfg.labels, &self.synonyms, &parse_opts);
                    (resp.content.clone(), parsed)
                }
            };
            let conf = match cfg.confidence_source {
                ConfidenceSource::Logprobs => resp.logprob_confidence.or(parsed.confidence),
                ConfidenceSource::Stated => parsed.confidence,
            };
            if let Some(lc) = resp.logprob_confidence {
                p.extra.insert("logprob_confidence".into(), json!(lc));
            }
            confidences.push(conf);
            raws.push(text);
            answers.push(parsed);
        }

        let cnn = self
            .crosscheck
            .as_ref()
            .map(|m| m.get(&item.sample.id).map(|s| s.as_str()));
        let d = filter::decide(&cfg.filter, &answers, &confidences, cnn);
        p.outcome = d.outcome;
        p.predicted = d.predicted.clone();
        p.confidence = d.confidence;
        p.filter = d.stages;
        let lead = match (&d.predicted, d.outcome) {
            (Some(l), _) => answers.iter().position(|a| a.label.as_ref() == Some(l)),
            (None, Outcome::Refused) => answers.iter().position(|a| a.refused),
            _ => None,
        }
        .unwrap_or(0);
        p.raw_answer = raws.get(lead).cloned();
        // Provenance of the answer the prediction reports. A replayed answer reports the
        // snapshot and digest it was produced by, which the cache key and replay rule make
        // the current ones.
        if let Some((resolved, fingerprint, finish, entry_digest)) = provenance.get(lead).cloned() {
            p.resolved_model = resolved;
            p.system_fingerprint = fingerprint;
            p.finish_reason = finish;
            if entry_digest.is_some() {
                p.model_digest = entry_digest;
            }
        }
        p.parse_stage = answers[lead].stage.map(|s| s.as_str().to_string());
        p.rationale = answers[lead].rationale.clone();
        if d.outcome == Outcome::Unparseable {
            p.error = answers[lead].note.clone();
        }
        // Latency, tokens and cost are those of the requests that produced the answers, also
        // for a replay (`cached`): `cost_usd` of a cached prediction is the original request's
        // cost, kept for reference; the run engine counts it as 0 for the run that replays it.
        p.latency_ms = latency;
        if have_usage {
            p.tokens = Some(usage);
            // The snapshot that answered has its own price when the table knows it exactly
            // (`gpt-4o` answered by `gpt-4o-2024-05-13` costs that snapshot's price).
            let by_snapshot = p
                .resolved_model
                .as_deref()
                .filter(|m| *m != cfg.spec.model)
                .and_then(|m| self.prices.lookup_model(cfg.spec.kind, m))
                .filter(|(k, _)| !k.ends_with("/*"));
            if let Some((k, _)) = &by_snapshot {
                if self.price.as_ref().map(|(pk, _)| pk) != Some(k) {
                    p.extra.insert("price_key".into(), json!(k));
                }
            }
            p.cost_usd = by_snapshot
                .as_ref()
                .or(self.price.as_ref())
                .map(|(_, e)| e.cost(&usage));
        }
        if let Some(a) = d.agreement {
            p.extra.insert("agreement".into(), json!(a));
        }
        if k > 1 {
            p.extra.insert(
                "answers".into(),
                json!(answers.iter().zip(&raws).zip(&provenance).map(|((a, r), pv)| json!({"label": a.label, "stage": a.stage, "confidence": a.confidence, "refused": a.refused, "raw": r, "finish_reason": pv.2})).collect::<Vec<_>>()),
            );
        }
        p.extra.insert("attempts".into(), json!(attempts));
        // Part of `tokens.completion` already (and so of `cost_usd`): a breakdown only.
        if let Some(r) = reasoning_tokens {
            p.extra.insert("reasoning_tokens".into(), json!(r));
        }
        if structured_fallback {
            p.extra.insert("structured_fallback".into(), json!(true));
        }
        if reasoning_fallback {
            p.extra
                .insert("reasoning_params_fallback".into(), json!(true));
        }
        p.cached = cached == k;
        p.extra
            .insert("wall_ms".into(), json!(t_all.elapsed().as_secs_f64() * 1e3));
        if have_timings {
            p.extra.insert("server_timings".into(), json!(timings));
        }
        p.simulated = simulated;
        p
    }

    /// [`Self::call`], and once more when the server rejects a part of the request that can be
    /// negotiated: the structured-output schema (sent again without it, the JSON asked for in
    /// the prompt) or the classic sampling parameters of a reasoning model (sent again with
    /// `max_completion_tokens` and no `temperature`). A successful renegotiation holds for the
    /// rest of the run. `req` is left as it was last sent; the flags say what changed.
    pub(crate) async fn call_negotiated(
        &self,
        req: &mut ChatRequest,
    ) -> Result<(ChatResponse, u32, Negotiated), (ProviderError, u32, Negotiated)> {
        let mut changed = Negotiated::default();
        let mut attempts = 0;
        // At most one change of each kind: two rounds plus the first request.
        for _ in 0..3 {
            match self.call(req).await {
                Ok((r, n)) => {
                    attempts += n;
                    if changed.structured && !self.structured_off.swap(true, Ordering::SeqCst) {
                        tracing::warn!(
                            "{}: the server rejected structured output; the rest of the run asks for JSON in the prompt",
                            self.name
                        );
                    }
                    if changed.reasoning && !self.reasoning_on.swap(true, Ordering::SeqCst) {
                        tracing::warn!(
                            "{}: the server asked for reasoning-model parameters (max_completion_tokens, no temperature); the rest of the run uses them (set `reasoning = true` to say so up front)",
                            self.name
                        );
                    }
                    return Ok((r, attempts, changed));
                }
                Err((e, n)) => {
                    attempts += n;
                    if req.params.structured && !changed.structured && e.rejects_structured_output()
                    {
                        tracing::debug!(
                            "structured output rejected, retrying without it: {}",
                            e.message
                        );
                        req.params.structured = false;
                        changed.structured = true;
                        continue;
                    }
                    // Any kind: an Azure deployment's name says nothing about the model
                    // behind it, and the error texts matched are OpenAI's own.
                    if req.params.reasoning.is_none()
                        && !req.params.reasoning_for(&req.model)
                        && !changed.reasoning
                        && e.wants_reasoning_params()
                    {
                        tracing::debug!(
                            "classic parameters rejected, retrying as a reasoning model: {}",
                            e.message
                        );
                        req.params.reasoning = Some(true);
                        changed.reasoning = true;
                        continue;
                    }
                    return Err((e, attempts, changed));
                }
            }
        }
        unreachable!("each of the two renegotiations happens at most once")
    }

    /// One request with retries. Returns the response and the attempts it took, or the last
    /// error and the attempts made.
    async fn call(&self, req: &ChatRequest) -> Result<(ChatResponse, u32), (ProviderError, u32)> {
        let est = estimate_tokens(req);
        let max = self.limits.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            if let Some(b) = &self.rpm {
                b.acquire(1.0).await;
            }
            let charged = match &self.tpm {
                Some(b) => {
                    let n = est.min(b.capacity);
                    b.acquire(n).await;
                    n
                }
                None => 0.0,
            };
            let permit = self.sem.acquire().await.expect("semaphore is never closed");
            self.http_requests.fetch_add(1, Ordering::SeqCst);
            let t0 = Instant::now();
            let r = self.provider.chat(req, self.limits.timeout).await;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            drop(permit);
            if let Some(b) = &self.tpm {
                // A failed request used no tokens; an answered one used what it reports
                // (or the estimate when the server reports nothing).
                let used = match &r {
                    Ok(resp) => resp
                        .usage
                        .as_ref()
                        .map_or(charged, |u| (u.prompt + u.completion) as f64),
                    Err(_) => 0.0,
                };
                b.settle(charged, used).await;
            }
            match r {
                Ok(mut resp) => {
                    resp.latency_ms = ms;
                    return Ok((resp, attempt));
                }
                Err(e) if e.retryable && attempt < max => {
                    let wait = self.limits.backoff(attempt, e.retry_after);
                    tracing::debug!(
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        "retrying: {}",
                        e.message
                    );
                    self.retries.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(mut e) => {
                    if e.retryable {
                        e.message = format!("gave up after {attempt} attempts: {}", e.message);
                    }
                    return Err((e, attempt));
                }
            }
        }
    }
}

/// What [`LlmRunner::call_negotiated`] changed in a request to get it answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// Sent again without the structured-output schema.
    pub structured: bool,
    /// Sent again with the reasoning-model parameters.
    pub reasoning: bool,
}

/// Tokens a request may use, for the TPM limiter: text/4 + image + max completion.
fn estimate_tokens(req: &ChatRequest) -> f64 {
    let text = (req.system.len() + req.user.len()) as f64 / 4.0;
    let image = match (&req.image_b64, req.params.detail) {
        (None, _) => 0.0,
        (Some(_), Detail::Low) => 85.0,
        (Some(_), _) => 765.0,
    };
    text + image + req.params.max_tokens as f64
}

/// Opens the line that carries another model's suggestion in the user prompt.
pub const SUGGESTION_MARKER: &str =
    "Another model's suggestion (a second opinion that may be wrong; judge the image yourself):";

/// The [`mica_core::Classifier`] face of a runner, for callers outside an async runtime (it
/// owns a small tokio runtime; inside a runtime call [`LlmRunner::classify_one`] instead).
pub struct LlmClassifier {
    runner: Arc<LlmRunner>,
    rt: tokio::runtime::Runtime,
}

impl LlmClassifier {
    pub fn new(runner: LlmRunner) -> Result<Self, LlmError> {
        let rt = crate::runtime()?;
        Ok(LlmClassifier {
            runner: Arc::new(runner),
            rt,
        })
    }

    /// The runner behind it, for its counters, price and configuration.
    pub fn runner(&self) -> &Arc<LlmRunner> {
        &self.runner
    }
}

impl mica_core::Classifier for LlmClassifier {
    fn name(&self) -> &str {
        self.runner.name()
    }
    fn labels(&self) -> &LabelSet {
        &self.runner.config.labels
    }
    fn classify(&mut self, batch: &[Sample]) -> Vec<Result<Prediction, ClassifyError>> {
        mica_core::Classifier::classify_with_notes(self, batch, &[])
    }

    fn accepts_notes(&self) -> bool {
        true
    }

    fn classify_with_notes(&mut self, batch: &[Sample], notes: &[Option<String>]) -> Vec<Result<Prediction, ClassifyError>> {
        let labels = self.runner.config.labels.clone();
        let runner = self.runner.clone();
        let items: Vec<(WorkItem, Option<String>)> = batch
            .iter()
            .enumerate()
            .map(|(i, s)| (WorkItem::from_sample(s, &labels), notes.get(i).cloned().flatten()))
            .collect();
        self.rt.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for (i, (it, note)) in items.into_iter().enumerate() {
                let r = runner.clone();
                set.spawn(async move {
                    let mut p = r.classify_one_with_note(&it, note.as_deref()).await;
                    if let Some(n) = note {
                        p.extra.insert("suggestion".into(), json!(n));
                    }
                    (i, p)
                });
            }
            let mut out: Vec<Option<Prediction>> = vec![None; set.len()];
            while let Some(res) = set.join_next().await {
                if let Ok((i, p)) = res {
                    out[i] = Some(p);
                }
            }
            out.into_iter()
                .zip(batch)
                .map(|(p, s)| {
                    p.ok_or_else(|| ClassifyError {
                        sample_id: s.id.clone(),
                        message: "classification task panicked".into(),
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    #[tokio::test]
    async fn token_bucket_settles_estimates_against_reported_usage() {
        let b = Bucket::per_minute(6000.0); // capacity 1000, 100 tokens/s
        b.acquire(400.0).await;
        let after = b.level().await;
        assert!((after - 600.0).abs() < 5.0, "{after}");
        // The server used 100 tokens, not 400: 300 come back.
        b.settle(400.0, 100.0).await;
        assert!((b.level().await - 900.0).abs() < 5.0);
        // It used 2,000: the bucket goes into debt, so the next request waits for the refill.
        b.settle(400.0, 2000.0).await;
        assert!(b.level().await < -600.0);
        // Refunds never overfill the bucket.
        b.settle(5000.0, 0.0).await;
        assert!(b.level().await <= 1000.0);
    }
}

#[cfg(test)]
#[path = "negotiation_tests.rs"]
mod negotiation_tests;
