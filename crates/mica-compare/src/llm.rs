//! The LLM arm, through mica-llm's providers, prompts, parser, filter and response cache.
//!
//! A `simulated = true` entry answers from mica-llm's simulator, started in-process on a free
//! local port and fed the true labels of the classifier's images; every such result is
//! stamped SIMULATED in metrics.json and the report.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mica_core::{Classifier, ClassifyError, Dataset, LabelSet, Prediction, Sample, Split};
use mica_llm::sim::{SimConfig, SimServer, TruthTable};
use mica_llm::{
    build_provider, ContextMode, FilterSpec, LlmClassifier, LlmConfig, LlmRunner, PriceTable, PromptSet,
    ProviderKind, ProviderSpec, ResponseCache,
};

use crate::experiment::{ClassifierSpec, Experiment};
use crate::run::{BuildInfo, Event};
use crate::CompareError;

/// The environment variable holding the OpenAI key (read by mica-llm, never stored).
pub const API_KEY_ENV: &str = "OPENAI_API_KEY";

/// Keeps the simulator's runtime and server alive as long as the classifier.
struct Backed {
    inner: LlmClassifier,
    _sim: Option<(SimServer, Box<dyn std::any::Any>)>,
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
}

fn llm_err(e: impl std::fmt::Display) -> CompareError {
    CompareError::Llm(e.to_string())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    exp: &Experiment,
    spec: &ClassifierSpec,
    _slug: &str,
    name: &str,
    ds: &Dataset,
    _run_dir: &Path,
    info: &mut BuildInfo,
    progress: &mut dyn FnMut(Event),
) -> Result<Box<dyn Classifier>, CompareError> {
    let model = spec.model.as_deref().unwrap_or_default();
    let mut pspec = ProviderSpec::parse(model).map_err(|e| CompareError::Invalid(format!("{name}: {e}")))?;
    let context: ContextMode = spec
        .context
        .as_deref()
        .unwrap_or("image")
        .parse()
        .map_err(|e: String| CompareError::Invalid(format!("{name}: {e}")))?;
    let filter = FilterSpec::parse(spec.filter.as_deref().unwrap_or("none"))
        .map_err(|e| CompareError::Invalid(format!("{name}: {e}")))?;
    let prompts = match &spec.template {
        Some(p) => PromptSet::builtin()
            .with_overrides_from(Path::new(p))
            .map_err(|e| CompareError::Invalid(format!("{name}: {e}")))?,
        None => PromptSet::builtin(),
    };

    let mut sim = None;
    if spec.simulated {
        let rt = mica_llm::runtime().map_err(llm_err)?;
        let mut truth = TruthTable::new();
        for s in ds.split(Split::Test) {
            if let Ok(img) = mica_data::image::load_gray(&s.source) {
                truth.add(&img, ds.labels.name(s.label));
            }
        }
        let cfg = SimConfig {
            seed: exp.dataset.seed,
            ..SimConfig::default()
        };
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("static address");
        let server = rt
            .block_on(SimServer::start(cfg, truth, addr, false))
            .map_err(llm_err)?;
        pspec = pspec.with_base_url(&server.url()).map_err(llm_err)?;
        progress(Event::Notice(format!(
            "{name}: SIMULATED: answers come from the built-in LLM simulator at {}, not from {model}",
            server.url()
        )));
        sim = Some((server, Box::new(rt) as Box<dyn std::any::Any>));
    }

    let mut cfg = LlmConfig::new(pspec.clone(), ds.modality, ds.labels.clone());
    cfg.context = context;
    cfg.filter = filter;
    cfg.params.seed = Some(exp.dataset.seed);
    let provider = build_provider(&pspec, API_KEY_ENV, mica_llm::provider::http_client()).map_err(|e| {
        CompareError::Invalid(format!(
            "{name}: {e} (or mark the entry `simulated = true` for a dry run stamped SIMULATED)"
        ))
    })?;
    // Simulated answers are never cached: a cache must only ever replay real model answers.
    let cache = (!spec.simulated).then(|| ResponseCache::new(ResponseCache::default_dir()));
    let loader: mica_llm::ImageLoader =
        Arc::new(|src: &mica_core::ImageSource| mica_data::image::load_gray(src).map_err(|e| e.to_string()));
    let runner = LlmRunner::new(cfg, provider)
        .with_name(name)
        .with_prompts(prompts)
        .with_prices(&PriceTable::builtin())
        .with_cache(cache)
        .with_loader(loader)
        .with_crosscheck_from_filter()
        .map_err(|e| CompareError::Invalid(format!("{name}: {e}")))?;
    if runner.price().is_none() && pspec.kind != ProviderKind::Ollama {
        progress(Event::Notice(format!(
            "{name}: no price for `{}` in the price table: cost is reported as unknown",
            pspec.model
        )));
    }
    info.simulated = spec.simulated;
    info.extra.insert("llm_config".into(), serde_json::to_value(&runner.config).unwrap_or_default());
    if pspec.kind != ProviderKind::Ollama && !spec.simulated {
        let provider_name = pspec.kind.as_str().to_string();
        let model_name = pspec.model.clone();
        info.remote_usage = Some(Box::new(move |preds: &[Prediction]| mica_energy::RemoteUsage {
            provider: provider_name.clone(),
            model: model_name.clone(),
            requests: preds.iter().filter(|p| p.tokens.is_some()).count() as u64,
            input_tokens: preds.iter().filter_map(|p| p.tokens).map(|t| t.prompt).sum(),
            output_tokens: preds.iter().filter_map(|p| p.tokens).map(|t| t.completion).sum(),
            estimate: None,
        }));
    } else if pspec.kind == ProviderKind::Ollama {
        progress(Event::Notice(format!(
            "{name}: Ollama runs in its own process; the CPU-time estimate of this process does not include it (RAPL/NVML counters do)"
        )));
    }
    let inner = LlmClassifier::new(runner).map_err(llm_err)?;
    Ok(Box::new(Backed { inner, _sim: sim }))
}
