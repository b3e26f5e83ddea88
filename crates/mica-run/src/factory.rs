//! The one factory: a classifier entry becomes a `Box<dyn Classifier>`.
//!
//! Adding a model family is one `mica_core::Classifier` implementation plus one arm in
//! [`build`]; the run loop, the CLI and the server need no change.

use mica_core::{Classifier, Dataset, Prediction, RunRoot, Sample, Split};

use crate::baseline::CentroidClassifier;
use crate::experiment::{ClassifierConfig, DatasetSpec};
use crate::run::Event;
use crate::spec::ClassifierSpec;
use crate::RunError;

/// What a classifier is built from besides its own entry.
pub struct BuildContext<'a> {
    pub ds: &'a Dataset,
    pub dataset: &'a DatasetSpec,
    /// Where CNNs trained for the run keep their checkpoints.
    pub root: &'a RunRoot,
    pub slug: &'a str,
    pub name: &'a str,
    /// How work done while building (training a `cnn-train:` CNN) is metered; None leaves it
    /// unmetered, and the report then says the training cost is unknown.
    pub energy: Option<(&'a mica_energy::CarbonConfig, &'a mica_energy::MeterConfig)>,
}

pub(crate) type RemoteFn = Box<dyn Fn(&[Prediction]) -> mica_energy::RemoteUsage>;
pub(crate) type SummaryFn = Box<dyn Fn(&[Prediction]) -> serde_json::Map<String, serde_json::Value>>;

/// A built classifier and what the run needs to know about it.
pub struct Built {
    pub classifier: Box<dyn Classifier>,
    /// Images per `classify` call.
    pub batch: usize,
    /// Answers come from the simulator, not a model.
    pub simulated: bool,
    /// Provenance recorded in `metrics.json` (`extra`).
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// For remote APIs: their usage, recorded as not measured in the energy report.
    pub(crate) remote_usage: Option<RemoteFn>,
    /// Family-specific figures computed from the predictions (the LLM summary).
    pub(crate) summarize: Option<SummaryFn>,
    /// The port of a model server on this machine (Ollama, vLLM, llama.cpp) whose energy the
    /// meters must include: it does the work, not mica's process.
    pub local_server: Option<u16>,
    /// What the run's money figure means: `no-api-fee` (mica's own CNN, a local model server),
    /// `api-price` (a remote API with a known price), `unknown-price` (a remote API missing
    /// from the price table) or `simulated`.
    pub cost_basis: &'static str,
    /// What one latency value of this classifier measures.
    pub latency_kind: mica_eval::LatencyKind,
}

impl Built {
    pub(crate) fn new(classifier: Box<dyn Classifier>, batch: usize) -> Self {
        Built {
            classifier,
            batch,
            simulated: false,
            extra: serde_json::Map::new(),
            remote_usage: None,
            summarize: None,
            local_server: None,
            cost_basis: "no-api-fee",
            latency_kind: mica_eval::LatencyKind::PerImage,
        }
    }
}

/// Builds the classifier an entry names. No builder warms its classifier up: every family's
/// cold start falls inside the run's timing and energy (see the report's timing rule).
pub fn build(
    cfg: &ClassifierConfig,
    ctx: &BuildContext,
    progress: &mut dyn FnMut(Event),
) -> Result<Built, RunError> {
    let spec = cfg.spec().map_err(RunError::Invalid)?;
    match &spec {
        ClassifierSpec::Baseline => {
            let train: Vec<&Sample> = ctx.ds.split(Split::Train).collect();
            let (c, skipped) =
                CentroidClassifier::fit(ctx.name, &ctx.ds.labels, &train).map_err(|m| {
                    RunError::Invalid(format!("{}: {m}", ctx.name))
                })?;
            if skipped > 0 {
                progress(Event::Notice(format!("{}: {skipped} unreadable training images skipped", ctx.name)));
            }
            let mut b = Built::new(Box::new(c), cfg.batch.unwrap_or(16));
            b.extra.insert("train_images".into(), serde_json::json!(train.len() - skipped));
            Ok(b)
        }
        ClassifierSpec::Cnn { .. } | ClassifierSpec::CnnTrain { .. } => crate::cnn::build(cfg, &spec, ctx, progress),
        ClassifierSpec::Llm(l) => crate::llm::build(cfg, l, ctx, progress),
        ClassifierSpec::Cascade { .. } => crate::cascade::build(cfg, &spec, ctx, progress),
        ClassifierSpec::Onnx { path } => crate::onnx::build(cfg, path, ctx),
    }
}
