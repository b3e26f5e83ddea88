//! The LLM arm of the factory, through mica-llm's providers, prompts, parser, filter and
//! response cache.
//!
//! A `simulated = true` entry answers from mica-llm's simulator, started in-process on a free
//! local port and fed the true labels of the run's images; every such result is stamped
//! SIMULATED in the predictions, metrics.json and the report.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mica_core::{Classifier, ClassifyError, LabelSet, Prediction, Sample, Split};
use mica_llm::sim::{SimConfig, SimServer, TruthTable};
use mica_llm::{
    build_provider, ConfidenceSource, ContextMode, FilterSpec, Limits, LlmClassifier, LlmConfig, LlmRunner,
    LlmSummary, PriceTable, PromptSet, ProviderKind, ResponseCache,
};

use crate::experiment::ClassifierConfig;
use crate::factory::{BuildContext, Built};
use crate::run::Event;
use crate::spec::LlmSpec;
use crate::RunError;

/// The environment variable holding the API key when the entry names none.
pub const API_KEY_ENV: &str = "OPENAI_API_KEY";
/// The completion budget of a reasoning model when the entry sets none (it covers the hidden
/// reasoning and the answer).
pub const REASONING_MAX_TOKENS: u32 = 4000;

/// Keeps the simulator's runtime and server alive as long as the classifier.
struct Backed {
    inner: LlmClassifier,
    _sim: Option<(SimServer, tokio::runtime::Runtime)>,
}

impl Classifier for Backed {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn labels(&self) -> &LabelSet {
        self.inner.labels()
    }
    fn classify(&mut self, batch: &[Sample]) -> Vec<Result<Prediction, ClassifyError>> {
        self.inner.classify(batch)
    }
    fn accepts_notes(&self) -> bool {
        self.inner.accepts_notes()
    }
    fn classify_with_notes(&mut self, batch: &[Sample], notes: &[Option<String>]) -> Vec<Result<Prediction, ClassifyError>> {
        self.inner.classify_with_notes(batch, notes)
    }
}

fn invalid(name: &str, e: impl std::fmt::Display) -> RunError {
    RunError::Invalid(format!("{name}: {e}"))
}

/// Every LLM setting of an entry, parsed and checked: a typo fails before anything is asked
/// or written (the experiment's validation calls this too).
pub(crate) struct Settings {
    pspec: mica_llm::ProviderSpec,
    context: ContextMode,
    filter: FilterSpec,
    concurrency: usize,
    max_attempts: u32,
    timeout: f64,
    temperature: f64,
    detail: mica_llm::Detail,
    confidence_source: ConfidenceSource,
    prompts: PromptSet,
    prices: PriceTable,
}

pub(crate) fn settings(cfg: &ClassifierConfig, spec: &LlmSpec, name: &str) -> Result<Settings, RunError> {
    let o = &cfg.llm;
    let llm_err = |source| RunError::Llm {
        name: name.to_string(),
        source,
    };
    let mut pspec = spec.provider().map_err(|e| invalid(name, e))?;
    if let Some(u) = &o.base_url {
        pspec = pspec.with_base_url(u).map_err(|e| invalid(name, e))?;
    }
    if let Some(v) = &o.api_version {
        pspec = pspec.with_api_version(v).map_err(|e| invalid(name, e))?;
    }
    let context: ContextMode = cfg.context.as_deref().unwrap_or("image").parse().map_err(|e: String| invalid(name, e))?;
    let mut filter = FilterSpec::parse(cfg.filter_or_default()).map_err(|e| invalid(name, e))?;
    if let (Some(c), Some(t)) = (filter.consistency.as_mut(), o.consistency_temperature) {
        c.temperature = t;
    }
    if let Some(p) = &filter.crosscheck {
        if !p.is_file() {
            return Err(invalid(name, format!("{}: CNN predictions file for the crosscheck filter not found", p.display())));
        }
    }
    let concurrency = o.concurrency.unwrap_or(4);
    if concurrency == 0 {
        return Err(invalid(name, "concurrency must be at least 1"));
    }
    let max_attempts = o.max_attempts.unwrap_or(5);
    if max_attempts == 0 {
        return Err(invalid(name, "max_attempts must be at least 1"));
    }
    let timeout = o.request_timeout.unwrap_or(120.0);
    if !(timeout > 0.0 && timeout.is_finite()) {
        return Err(invalid(name, "the request timeout must be a positive number of seconds"));
    }
    let temperature = o.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) || !o.consistency_temperature.is_none_or(|t| (0.0..=2.0).contains(&t)) {
        return Err(invalid(name, "temperatures must be within 0..2"));
    }
    let detail = o.detail.as_deref().unwrap_or("low").parse().map_err(|e: String| invalid(name, e))?;
    let confidence_source: ConfidenceSource =
        o.confidence_source.as_deref().unwrap_or("stated").parse().map_err(|e: String| invalid(name, e))?;
    let prompts = match &cfg.template {
        Some(p) => PromptSet::builtin().with_overrides_from(Path::new(p)).map_err(llm_err)?,
        None => PromptSet::builtin(),
    };
    let prices = match &o.prices {
        Some(p) => PriceTable::builtin().with_overrides_from(p).map_err(llm_err)?,
        None => PriceTable::builtin(),
    };

    Ok(Settings { pspec, context, filter, concurrency, max_attempts, timeout, temperature, detail, confidence_source, prompts, prices })
}

/// An LLM runner for an entry: the provider client, prompts, prices, cache, limits and filter
/// the entry asks for. The web app asks it one image at a time; the run loop through
/// [`LlmClassifier`].
pub fn runner(
    cfg: &ClassifierConfig,
    spec: &LlmSpec,
    task: &Task,
    progress: &mut dyn FnMut(Event),
) -> Result<Ready, RunError> {
    let name = task.name;
    let o = &cfg.llm;
    let llm_err = |source| RunError::Llm {
        name: name.to_string(),
        source,
    };
    let Settings { mut pspec, context, filter, concurrency, max_attempts, timeout, temperature, detail, confidence_source, prompts, prices } =
        settings(cfg, spec, name)?;
    let mut sim = None;
    if cfg.simulated {
        let rt = mica_llm::runtime().map_err(llm_err)?;
        let mut truth = TruthTable::new();
        let ds = task.dataset.ok_or_else(|| invalid(name, "a simulated LLM needs a dataset to answer from"))?;
        for s in ds.split(Split::Test).chain(ds.split(task.split)) {
            if let Ok(img) = mica_data::image::load_gray(&s.source) {
                truth.add(&img, ds.labels.name(s.label));
            }
        }
        let sim_cfg = SimConfig {
            seed: task.seed.unwrap_or(0),
            ..SimConfig::default()
        };
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("static address");
        let server = rt.block_on(SimServer::start(sim_cfg, truth, addr, false)).map_err(llm_err)?;
        pspec = pspec.with_base_url(&server.url()).map_err(|e| invalid(name, e))?;
        // The simulator speaks the OpenAI and Ollama formats only: a simulated Azure,
        // Anthropic or Gemini entry is asked in the OpenAI format.
        if matches!(pspec.kind, ProviderKind::Azure | ProviderKind::Anthropic | ProviderKind::Gemini) {
            pspec.kind = ProviderKind::OpenAiCompatible;
            pspec.api_version = None;
        }
        progress(Event::Notice(format!(
            "{name}: SIMULATED: answers come from the built-in LLM simulator at {}, not from {spec}",
            server.url()
        )));
        sim = Some((server, rt));
    }

    let mut lc = LlmConfig::new(pspec.clone(), task.modality, task.labels.clone());
    lc.context = context;
    lc.filter = filter;
    lc.params.temperature = temperature;
    lc.params.seed = task.seed;
    lc.params.reasoning = o.reasoning;
    // A reasoning model spends its budget on hidden reasoning before the answer: the classic
    // default of 200 would leave most answers cut off (`finish_reason: length`).
    lc.params.max_tokens = match o.max_tokens {
        Some(m) => m,
        None if lc.params.reasoning_for(&pspec.model) => REASONING_MAX_TOKENS,
        None => lc.params.max_tokens,
    };
    lc.params.detail = detail;
    lc.params.logprobs = o.logprobs.unwrap_or(false);
    lc.params.structured = o.structured.unwrap_or(true);
    lc.image_max_side = o.image_max_side.unwrap_or(512);
    lc.confidence_source = confidence_source;

    let key_env = o.api_key_env.as_deref().unwrap_or(API_KEY_ENV);
    let provider = build_provider(&pspec, key_env, mica_llm::provider::http_client()).map_err(|e| {
        invalid(name, format!("{e} (or mark the entry `simulated = true` for a dry run stamped SIMULATED)"))
    })?;
    // Simulated answers are never cached: a cache must only ever replay real model answers.
    let cache = (!cfg.simulated && !o.no_cache.unwrap_or(false))
        .then(|| ResponseCache::new(o.cache_dir.clone().unwrap_or_else(ResponseCache::default_dir)));
    let loader: mica_llm::ImageLoader =
        Arc::new(|src: &mica_core::ImageSource| mica_data::image::load_gray(src).map_err(|e| e.to_string()));
    let runner = LlmRunner::new(lc, provider)
        .with_name(name)
        .with_limits(Limits {
            concurrency,
            rpm: o.rpm,
            tpm: o.tpm,
            max_attempts,
            timeout: Duration::from_secs_f64(timeout),
            ..Limits::default()
        })
        .with_prompts(prompts)
        .with_prices(&prices)
        .with_cache(cache)
        .with_loader(loader)
        .with_crosscheck_from_filter()
        .map_err(llm_err)?;
    if runner.price().is_none() && pspec.kind != ProviderKind::Ollama {
        progress(Event::Notice(format!(
            "{name}: no price for `{}` in the price table: cost is reported as unknown (add it with a prices file)",
            pspec.model
        )));
    }
    Ok(Ready { runner, provider: pspec, sim })
}

/// What an LLM is asked about.
pub struct Task<'a> {
    pub name: &'a str,
    pub modality: mica_core::Modality,
    pub labels: &'a LabelSet,
    /// Seeds the sampling (and the simulator).
    pub seed: Option<u64>,
    /// The dataset, for a simulated LLM's answers.
    pub dataset: Option<&'a mica_core::Dataset>,
    pub split: Split,
}

/// A runner ready to ask, with the endpoint it resolved to.
pub struct Ready {
    pub runner: LlmRunner,
    pub provider: mica_llm::ProviderSpec,
    sim: Option<(SimServer, tokio::runtime::Runtime)>,
}

/// The model version string the audit trail records for an LLM.
pub fn version(p: &mica_llm::ProviderSpec) -> String {
    format!("{} model {} at {}", p.kind.as_str(), p.model, mica_llm::spec::redact_url(&p.base_url))
}

pub(crate) fn build(
    cfg: &ClassifierConfig,
    spec: &LlmSpec,
    ctx: &BuildContext,
    progress: &mut dyn FnMut(Event),
) -> Result<Built, RunError> {
    let name = ctx.name;
    let o = &cfg.llm;
    let llm_err = |source| RunError::Llm {
        name: name.to_string(),
        source,
    };
    let task = Task {
        name,
        modality: ctx.ds.modality,
        labels: &ctx.ds.labels,
        seed: Some(ctx.dataset.seed),
        dataset: Some(ctx.ds),
        split: ctx.dataset.split,
    };
    let Ready { runner, provider: pspec, sim } = runner(cfg, spec, &task, progress)?;
    let concurrency = o.concurrency.unwrap_or(4);
    let inner = LlmClassifier::new(runner).map_err(llm_err)?;
    let runner = inner.runner().clone();

    let mut b = Built::new(Box::new(Backed { inner, _sim: sim }), concurrency * 4);
    b.simulated = cfg.simulated;
    let mut recorded = serde_json::to_value(&runner.config).expect("config serialises");
    recorded["spec"]["base_url"] = serde_json::json!(mica_llm::spec::redact_url(&runner.config.spec.base_url));
    b.extra.insert("llm_config".into(), recorded);
    let r = runner.clone();
    b.summarize = Some(Box::new(move |preds: &[Prediction]| {
        let summary = LlmSummary::from_predictions(preds, &r.config.filter, r.price());
        let mut m = serde_json::Map::new();
        m.insert("llm".into(), serde_json::to_value(&summary).expect("summary serialises"));
        m.insert("llm_run".into(), serde_json::to_value(r.counters()).expect("counters serialise"));
        m
    }));
    b.latency_kind = mica_eval::LatencyKind::PerRequest;
    let local = mica_energy::LocalServer::from_base_url(&pspec.base_url).map(|s| s.port);
    // A priced model is charged wherever it is served (a local proxy may forward to a paid
    // API); an unpriced one is free only when it runs here.
    b.cost_basis = if cfg.simulated {
        "simulated"
    } else if runner.price().is_some_and(|(_, p)| p.input_per_million > 0.0 || p.output_per_million > 0.0) {
        "api-price"
    } else if runner.price().is_some() || local.is_some() {
        "no-api-fee"
    } else {
        "unknown-price"
    };
    if cfg.simulated {
        // The simulator's energy is not a model's; the report never compares it with one.
    } else if let Some(port) = local {
        b.local_server = Some(port);
        progress(Event::Notice(format!(
            "{name}: the model server is on this machine (port {port}): its energy is metered with the run"
        )));
    } else {
        let provider_name = pspec.kind.as_str().to_string();
        let model_name = pspec.model.clone();
        // Replayed answers made no request now: only live calls count as usage.
        b.remote_usage = Some(Box::new(move |preds: &[Prediction]| {
            let live: Vec<&Prediction> = preds.iter().filter(|p| !p.cached).collect();
            mica_energy::RemoteUsage {
                provider: provider_name.clone(),
                model: model_name.clone(),
                requests: live.iter().filter(|p| p.tokens.is_some()).count() as u64,
                input_tokens: live.iter().filter_map(|p| p.tokens).map(|t| t.prompt).sum(),
                output_tokens: live.iter().filter_map(|p| p.tokens).map(|t| t.completion).sum(),
                estimate: None,
            }
        }));
    }
    Ok(b)
}

#[cfg(test)]
mod reasoning_tests {
    use super::*;
    use crate::experiment::Experiment;
    use crate::spec::ClassifierSpec;

    /// The generation parameters an experiment entry for `model` with `options` asks with.
    fn params(model: &str, options: &str) -> mica_llm::GenParams {
        let exp: Experiment = toml::from_str(&format!(
            "[dataset]\npath = \"d\"\n[[classifier]]\nkind = \"llm\"\nmodel = \"openai-compatible/{model}@http://127.0.0.1:9\"\n[classifier.llm]\n{options}\n"
        ))
        .unwrap();
        let cfg = &exp.classifiers[0];
        let ClassifierSpec::Llm(spec) = cfg.spec().unwrap() else { panic!("an LLM entry") };
        let labels = mica_core::Modality::Mri.canonical_labels().unwrap();
        let task = Task {
            name: "x",
            modality: mica_core::Modality::Mri,
            labels: &labels,
            seed: Some(1),
            dataset: None,
            split: Split::Test,
        };
        runner(cfg, &spec, &task, &mut |_| {}).ok().unwrap().runner.config.params
    }

    #[test]
    fn reasoning_follows_the_name_rule_unless_the_entry_says_otherwise() {
        let p = params("o3-mini", "");
        assert_eq!((p.reasoning, p.max_tokens), (None, REASONING_MAX_TOKENS));
        assert!(p.reasoning_for("o3-mini"));
        let p = params("o3-mini", "reasoning = false");
        assert_eq!((p.reasoning, p.max_tokens), (Some(false), 200));
        let p = params("house-vlm", "reasoning = true\nmax_tokens = 900");
        assert_eq!((p.reasoning, p.max_tokens), (Some(true), 900));
        assert_eq!(params("gpt-4o", "").max_tokens, 200);
    }

    /// `api_version` in an entry (the CLI's `--api-version`) reaches an Azure request, and is
    /// refused for a provider that would ignore it rather than silently dropped.
    #[test]
    fn an_entry_sets_the_azure_api_version_and_other_providers_refuse_it() {
        let exp = |model: &str| -> Experiment {
            toml::from_str(&format!(
                "[dataset]\npath = \"d\"\n[[classifier]]\nkind = \"llm\"\nmodel = \"{model}\"\n[classifier.llm]\napi_version = \"2025-04-01-preview\"\n"
            ))
            .unwrap()
        };
        let e = exp("azure/gpt4o-radiology@https://res.openai.azure.com");
        let ClassifierSpec::Llm(spec) = e.classifiers[0].spec().unwrap() else { panic!("an LLM entry") };
        let s = settings(&e.classifiers[0], &spec, "x").ok().unwrap();
        assert_eq!(s.pspec.api_version.as_deref(), Some("2025-04-01-preview"));
        let e = exp("openai-compatible/m@http://127.0.0.1:9");
        let ClassifierSpec::Llm(spec) = e.classifiers[0].spec().unwrap() else { panic!("an LLM entry") };
        let err = settings(&e.classifiers[0], &spec, "x").err().unwrap().to_string();
        assert!(err.contains("azure only"), "{err}");
    }
}
