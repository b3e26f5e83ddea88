//! The experiment file: one TOML that pins down a whole comparison.
//!
//! ```toml
//! name = "brain-mri"
//! output = "runs/brain-mri"
//!
//! [dataset]
//! path = "data/demo/brain-tumor-mri"
//! seed = 42
//! train = 0.7
//! val = 0.1
//! test = 0.2
//! image_size = 64
//! limit_per_class = 50          # every classifier sees the same, smaller test set
//!
//! [[classifier]]
//! kind = "cnn"
//! train = "small"               # or: run = "runs/brain/cnn" (a `mica train` run directory)
//! epochs = 5
//! patience = 5                  # early stopping (default 6); = epochs trains the whole schedule
//!
//! [[classifier]]
//! kind = "llm"
//! model = "openai/gpt-4o"
//! context = "image"
//! filter = "default"
//! limit_per_class = 10          # costly: a deterministic subset of the shared test set
//!
//! [energy]
//! country = "FRA"               # or grid_intensity = 56.0
//! pue = 1.2
//! ```
//!
//! Relative paths are relative to the working directory, like every other `mica` path.

use std::path::{Path, PathBuf};

use mica_core::Split;
use serde::{Deserialize, Serialize};

use crate::spec::{ClassifierSpec, SpecError};
use crate::RunError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Run name; defaults to the output directory's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Run directory (`runs/<name>` when absent).
    #[serde(default)]
    pub output: Option<PathBuf>,
    pub dataset: DatasetSpec,
    #[serde(rename = "classifier", default)]
    pub classifiers: Vec<ClassifierConfig>,
    #[serde(default)]
    pub energy: EnergySpec,
    #[serde(default)]
    pub eval: EvalSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub path: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_train")]
    pub train: f64,
    #[serde(default = "default_val")]
    pub val: f64,
    #[serde(default = "default_test")]
    pub test: f64,
    /// Input side for trained CNNs and the pixel baseline.
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Cap on test images per class for the whole comparison (every classifier sees the same).
    #[serde(default)]
    pub limit_per_class: Option<usize>,
    /// An existing split manifest (`id,label,split`) to reuse instead of drawing a split.
    #[serde(default)]
    pub split_manifest: Option<PathBuf>,
    /// Which split is classified (`test` unless `mica classify --split` says otherwise).
    #[serde(default = "test_split", skip_serializing_if = "is_test_split")]
    pub split: Split,
    /// Metadata columns that may reach an LLM's prompt (`image+clinical`), besides a `context`
    /// column. Columns that name or imply a class are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_columns: Vec<String>,
    /// Let label-like context columns through anyway; every figure of the run says so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_label_like_context: bool,
}

fn test_split() -> Split {
    Split::Test
}
fn is_test_split(s: &Split) -> bool {
    *s == Split::Test
}

impl DatasetSpec {
    /// The dataset at `path` with the default split (seed 42, 70/10/20) and no limit.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DatasetSpec {
            path: path.into(),
            seed: default_seed(),
            train: default_train(),
            val: default_val(),
            test: default_test(),
            image_size: None,
            limit_per_class: None,
            split_manifest: None,
            split: Split::Test,
            context_columns: Vec::new(),
            allow_label_like_context: false,
        }
    }

    /// What metadata may reach a prompt.
    pub fn context(&self) -> mica_data::ContextSpec {
        mica_data::ContextSpec {
            columns: self.context_columns.clone(),
            allow_label_like: self.allow_label_like_context,
        }
    }
}

fn default_seed() -> u64 {
    42
}
fn default_train() -> f64 {
    0.7
}
fn default_val() -> f64 {
    0.1
}
fn default_test() -> f64 {
    0.2
}

/// Which family a classifier entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A CNN: an existing `mica train` run (`run`) or one to train (`train = "small"`).
    Cnn,
    /// A multimodal LLM behind an OpenAI-compatible or Ollama endpoint.
    Llm,
    /// A nearest-class-centroid classifier on raw pixels: the floor any model must beat.
    Baseline,
    /// A model trained elsewhere, as an ONNX file (`onnx = "models/x.onnx"`, sidecar beside it).
    Onnx,
    /// Two classifiers in a row (`first`, `second`, `threshold`): the second is asked only
    /// when the first is unsure, a physician when both are.
    Cascade,
}

/// One `[[classifier]]` entry: which classifier (`spec`, or the older `kind` with `run`,
/// `train` or `model`) and every setting that changes its answers. `mica classify` builds the
/// same entry from its flags, so both commands run a classifier the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// `cnn:RUN_DIR`, `cnn-train:ARCH`, `llm:PROVIDER/MODEL[@URL]` or `baseline`; read into
    /// `kind` and `run`/`train`/`model` on load.
    #[serde(default, skip_serializing)]
    pub spec: Option<String>,
    #[serde(default = "default_kind")]
    pub kind: Kind,
    /// Directory name and key in reports; derived from the spec when absent.
    #[serde(default)]
    pub slug: Option<String>,
    /// CNN: a `mica train` run directory to load.
    #[serde(default)]
    pub run: Option<PathBuf>,
    /// CNN: an architecture to train on the experiment's split (`small`, `resnet8`,
    /// `resnet18`, `mobilenet`).
    #[serde(default)]
    pub train: Option<String>,
    #[serde(default)]
    pub epochs: Option<usize>,
    /// CNN trained in the run: epochs without a better validation macro F1 before training
    /// stops early, counted in the second half of the schedule only (default 6, as `mica
    /// train`). Set it to `epochs` to train the whole schedule; the best checkpoint is kept
    /// either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patience: Option<usize>,
    /// ONNX: the model file; its sidecar `PATH.toml` (how to feed it) lies beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx: Option<PathBuf>,
    /// Images per `classify` call (CNN inference batch).
    #[serde(default)]
    pub batch: Option<usize>,
    /// CNN: confidence below which a case is flagged for physician review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_below: Option<f64>,
    /// LLM: `openai/gpt-4o`, `ollama/llama3.2-vision`, `openai-compatible/<model>@<url>`.
    /// Written to run files without URL credentials or query strings.
    #[serde(default, serialize_with = "redacted")]
    pub model: Option<String>,
    /// LLM: context mode (`image`, `image+clinical`, `image+findings`, `findings`).
    #[serde(default)]
    pub context: Option<String>,
    /// LLM: a TOML file overriding prompt templates, class descriptions and synonyms. Its
    /// content is part of the configuration checked on resume.
    #[serde(default)]
    pub template: Option<String>,
    /// LLM: filter stages (`default`, `none`, or a list such as `validate,confidence=0.7`).
    #[serde(default)]
    pub filter: Option<String>,
    /// LLM: answer from the built-in simulator (results stamped SIMULATED).
    #[serde(default)]
    pub simulated: bool,
    /// Per-class cap for costly classifiers: a deterministic subset of the shared test set.
    #[serde(default)]
    pub limit_per_class: Option<usize>,
    #[serde(default, skip_serializing_if = "LlmOptions::is_default")]
    pub llm: LlmOptions,
    /// Cascade: the first stage's spec (`cnn:RUN_DIR`, `cnn-train:ARCH`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "redacted")]
    pub first: Option<String>,
    /// Cascade: the second stage's spec, asked when the first is below `threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "redacted")]
    pub second: Option<String>,
    /// Cascade: the first stage answers at or above this confidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Cascade: the second stage answers at or above this confidence; below, a physician.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_threshold: Option<f64>,
    /// Cascade: the second stage (an LLM) is told the first model's top two labels and
    /// confidences.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cascade_context: bool,
}

/// Which stage of a cascade entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CascadeStage {
    First,
    Second,
}

/// How an LLM is asked and reached. `None` means the documented default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmOptions {
    /// Server address replacing the spec's (a proxy, or `mica llm-sim`). Written to run files
    /// without credentials or query strings.
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "redacted")]
    pub base_url: Option<String>,
    /// Environment variable holding the API key (its value is never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Azure OpenAI only: the `api-version` query value (default
    /// `mica_llm::spec::AZURE_API_VERSION`, or `AZURE_OPENAI_API_VERSION` when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// OpenAI image detail: `low`, `high`, `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Send the JSON schema for structured output (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// OpenAI reasoning-model parameters (`max_completion_tokens`, no `temperature`):
    /// unset follows the model-name rule (o1, o3, o4, gpt-5 families), true/false overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<bool>,
    /// `stated` or `logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency_temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_max_side: Option<u32>,
    /// A TOML price table laid over the built-in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<PathBuf>,
    /// How the run is paced; not part of what decides an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Seconds per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<f64>,
    /// Neither read nor write the response cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_cache: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
}

impl LlmOptions {
    fn is_default(&self) -> bool {
        self == &LlmOptions::default()
    }
}

/// Run files (manifest, classifier.json, metrics.json) record where a model was reached, never
/// the user name, password or query string (tokens) in that address.
fn redacted<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(u) => s.serialize_some(&mica_llm::spec::redact_url(u)),
        None => s.serialize_none(),
    }
}

fn default_kind() -> Kind {
    Kind::Baseline
}

/// The filter an LLM gets when none is named: label validation and a confidence threshold of
/// 0.5, so low-confidence answers go to a physician. The same in every command.
pub const DEFAULT_FILTER: &str = "default";

impl ClassifierConfig {
    /// True for an LLM whose prompt carries the dataset's clinical context.
    pub fn uses_clinical_context(&self) -> bool {
        matches!(self.kind, Kind::Llm | Kind::Cascade)
            && self.context.as_deref().and_then(|c| c.parse::<mica_llm::ContextMode>().ok())
                == Some(mica_llm::ContextMode::ImageClinical)
    }

    /// An entry of `kind` with every option unset, to fill with struct-update syntax.
    pub fn new(kind: Kind) -> Self {
        ClassifierConfig {
            spec: None,
            kind,
            slug: None,
            run: None,
            train: None,
            epochs: None,
            patience: None,
            onnx: None,
            batch: None,
            review_below: None,
            model: None,
            context: None,
            template: None,
            filter: None,
            simulated: false,
            limit_per_class: None,
            llm: LlmOptions::default(),
            first: None,
            second: None,
            threshold: None,
            second_threshold: None,
            cascade_context: false,
        }
    }

    /// The entry for a parsed spec, every option unset.
    pub fn from_spec(spec: &ClassifierSpec) -> Self {
        match spec {
            ClassifierSpec::Cnn { run } => ClassifierConfig {
                run: Some(run.clone()),
                ..Self::new(Kind::Cnn)
            },
            ClassifierSpec::CnnTrain { arch } => ClassifierConfig {
                train: Some(arch.clone()),
                ..Self::new(Kind::Cnn)
            },
            ClassifierSpec::Llm(l) => ClassifierConfig {
                model: Some(l.to_string()),
                ..Self::new(Kind::Llm)
            },
            ClassifierSpec::Baseline => Self::new(Kind::Baseline),
            ClassifierSpec::Onnx { path } => ClassifierConfig {
                onnx: Some(path.clone()),
                ..Self::new(Kind::Onnx)
            },
            ClassifierSpec::Cascade { first, second, threshold, second_threshold } => ClassifierConfig {
                first: Some(first.to_string()),
                second: Some(second.to_string()),
                threshold: Some(*threshold),
                second_threshold: *second_threshold,
                ..Self::new(Kind::Cascade)
            },
        }
    }

    /// The entry one stage of a cascade runs as. The rule for the cascade entry's settings:
    /// the LLM settings (`context`, `template`, `filter`, `simulated`, `[classifier.llm]`)
    /// apply to every LLM stage, the CNN settings (`epochs`, `patience`, `batch`, `review_below`) to every
    /// CNN stage; `slug` becomes `<slug>-first` / `<slug>-second`, so a `cnn-train:` stage
    /// trains into its own model directory.
    pub fn stage(&self, which: CascadeStage) -> Result<ClassifierConfig, String> {
        let mut c = self
            .stage_entry(which)
            .ok_or_else(|| format!("classifier `{}` is not a cascade with two valid stages", self.display_name()))?;
        let suffix = match which {
            CascadeStage::First => "first",
            CascadeStage::Second => "second",
        };
        c.slug = Some(format!("{}-{suffix}", self.slug()));
        match c.kind {
            Kind::Llm => {
                c.context = self.context.clone();
                c.template = self.template.clone();
                c.llm = self.llm.clone();
            }
            Kind::Cnn => {
                c.epochs = self.epochs;
                c.patience = self.patience;
                c.batch = self.batch;
                c.review_below = self.review_below;
            }
            _ => c.batch = self.batch,
        }
        Ok(c)
    }

    /// A stage's entry without its derived slug (which would recurse into [`Self::slug`]).
    fn stage_entry(&self, which: CascadeStage) -> Option<ClassifierConfig> {
        if self.kind != Kind::Cascade {
            return None;
        }
        let spec = match which {
            CascadeStage::First => self.first.as_deref()?,
            CascadeStage::Second => self.second.as_deref()?,
        };
        let spec: ClassifierSpec = spec.parse().ok()?;
        let mut c = Self::from_spec(&spec);
        if c.kind == Kind::Llm {
            c.filter = self.filter.clone();
            c.simulated = self.simulated;
        }
        Some(c)
    }

    /// Reads `spec = "..."` into the typed fields (an entry gives either `spec` or `kind`).
    fn resolve_spec(&mut self, at: &str) -> Result<(), String> {
        let Some(s) = self.spec.take() else {
            return Ok(());
        };
        if self.run.is_some() || self.train.is_some() || self.model.is_some() || self.onnx.is_some() || self.kind != Kind::Baseline {
            return Err(format!("{at}: give either `spec` or `kind` with `run`/`train`/`model`/`onnx`, not both"));
        }
        if self.first.is_some() || self.second.is_some() || self.threshold.is_some() || self.second_threshold.is_some() {
            return Err(format!(
                "{at}: give either `spec = \"cascade:...\"` or `kind = \"cascade\"` with `first`/`second`/`threshold`, not both"
            ));
        }
        let parsed: ClassifierSpec = s.parse().map_err(|e: SpecError| format!("{at}: {e}"))?;
        let typed = Self::from_spec(&parsed);
        self.kind = typed.kind;
        self.run = typed.run;
        self.train = typed.train;
        self.model = typed.model;
        self.onnx = typed.onnx;
        self.first = typed.first;
        self.second = typed.second;
        self.threshold = typed.threshold;
        self.second_threshold = typed.second_threshold;
        Ok(())
    }

    /// The classifier this entry names.
    pub fn spec(&self) -> Result<ClassifierSpec, String> {
        let at = || format!("classifier `{}`", self.display_name());
        match self.kind {
            Kind::Cnn => match (&self.run, &self.train) {
                (Some(_), Some(_)) => Err(format!("{}: give either `run` or `train`, not both", at())),
                (None, None) => Err(format!(
                    "{}: a CNN needs `run = \"RUN_DIR\"` (a mica train run) or `train = \"small\"`",
                    at()
                )),
                (Some(r), None) => Ok(ClassifierSpec::Cnn { run: r.clone() }),
                (None, Some(a)) => format!("cnn-train:{a}").parse().map_err(|e: SpecError| e.to_string()),
            },
            Kind::Llm => match &self.model {
                None => Err(format!("{}: an LLM needs `model = \"provider/model\"`", at())),
                Some(m) => format!("llm:{m}").parse().map_err(|e: SpecError| e.to_string()),
            },
            Kind::Baseline => Ok(ClassifierSpec::Baseline),
            Kind::Onnx => match &self.onnx {
                None => Err(format!("{}: an ONNX model needs `onnx = \"PATH.onnx\"` (or spec = \"onnx:PATH.onnx\")", at())),
                Some(p) => format!("onnx:{}", p.display()).parse().map_err(|e: SpecError| e.to_string()),
            },
            Kind::Cascade => match (&self.first, &self.second, self.threshold) {
                (Some(f), Some(s), Some(t)) => {
                    let mut spec = format!("cascade:{f},{s}@{t}");
                    if let Some(t2) = self.second_threshold {
                        spec.push_str(&format!("/{t2}"));
                    }
                    spec.parse().map_err(|e: SpecError| e.to_string())
                }
                _ => Err(format!(
                    "{}: a cascade needs `first = \"SPEC\"`, `second = \"SPEC\"` and `threshold = 0.8` (a confidence)",
                    at()
                )),
            },
        }
    }

    /// The filter in force (LLMs): the entry's, else [`DEFAULT_FILTER`].
    pub fn filter_or_default(&self) -> &str {
        self.filter.as_deref().unwrap_or(DEFAULT_FILTER)
    }

    /// A short, filesystem-safe, stable identifier.
    pub fn slug(&self) -> String {
        if let Some(s) = &self.slug {
            return slugify(s);
        }
        let raw = match self.kind {
            Kind::Cnn => match (&self.train, &self.run) {
                (Some(a), _) => format!("cnn-{a}"),
                (None, Some(r)) => format!(
                    "cnn-{}",
                    r.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
                ),
                _ => "cnn".into(),
            },
            Kind::Llm => {
                let model = mica_llm::spec::redact_url(self.model.as_deref().unwrap_or("model"));
                let mut s = format!("llm-{model}");
                let f = self.filter_or_default();
                if f != "none" {
                    s.push_str("-filter-");
                    s.push_str(f);
                }
                if self.simulated {
                    s.push_str("-sim");
                }
                s
            }
            Kind::Baseline => "baseline-centroid".into(),
            Kind::Onnx => format!(
                "onnx-{}",
                self.onnx.as_ref().and_then(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
            ),
            Kind::Cascade => {
                let part = |which| self.stage_entry(which).map(|c| c.slug()).unwrap_or_else(|| "stage".into());
                let t = self.threshold.unwrap_or(0.0);
                let mut s = format!("cascade-{}-{}-t{t}", part(CascadeStage::First), part(CascadeStage::Second));
                if let Some(t2) = self.second_threshold {
                    s.push_str(&format!("-t{t2}"));
                }
                if self.cascade_context {
                    s.push_str("-context");
                }
                s
            }
        };
        slugify(&raw)
    }

    /// The name predictions carry (`cnn:small`, `llm:openai/gpt-4o+filter:default`, ...):
    /// the spec string, with the filter for LLMs and credentials removed from URLs.
    pub fn display_name(&self) -> String {
        match self.kind {
            Kind::Cnn => match (&self.train, &self.run) {
                (Some(a), _) => format!("cnn:{a}"),
                (None, Some(r)) => format!("cnn:{}", r.display()),
                _ => "cnn".into(),
            },
            Kind::Llm => {
                let model = mica_llm::spec::redact_url(self.model.as_deref().unwrap_or("?"));
                let mut s = format!("llm:{model}");
                let f = self.filter_or_default();
                if f != "none" {
                    s.push_str(&format!("+filter:{f}"));
                }
                s
            }
            Kind::Baseline => "baseline:centroid".into(),
            Kind::Onnx => match &self.onnx {
                Some(p) => format!("onnx:{}", p.display()),
                None => "onnx".into(),
            },
            Kind::Cascade => {
                let part = |which| self.stage_entry(which).map(|c| c.display_name()).unwrap_or_else(|| "?".into());
                let t = self.threshold.unwrap_or(0.0);
                let mut s = format!("cascade:{},{}@{t}", part(CascadeStage::First), part(CascadeStage::Second));
                if let Some(t2) = self.second_threshold {
                    s.push_str(&format!("/{t2}"));
                }
                if self.cascade_context {
                    s.push_str("+context");
                }
                s
            }
        }
    }

    fn validate(&self, i: usize) -> Result<(), String> {
        let at = format!("classifier #{} ({})", i + 1, self.display_name());
        let spec = self.spec().map_err(|e| format!("{at}: {e}"))?;
        if let ClassifierSpec::Llm(l) = &spec {
            crate::llm::settings(self, l, &self.display_name()).map_err(|e| e.to_string())?;
        }
        if let ClassifierSpec::Cascade { .. } = &spec {
            for which in [CascadeStage::First, CascadeStage::Second] {
                let stage = self.stage(which).map_err(|e| format!("{at}: {e}"))?;
                if let ClassifierSpec::Llm(l) = stage.spec().map_err(|e| format!("{at}: {e}"))? {
                    crate::llm::settings(&stage, &l, &stage.display_name()).map_err(|e| format!("{at}: {e}"))?;
                }
            }
        } else if self.cascade_context || self.first.is_some() || self.second.is_some() || self.threshold.is_some() {
            return Err(format!(
                "{at}: `first`, `second`, `threshold` and `cascade_context` belong to `kind = \"cascade\"` entries"
            ));
        }
        if self.limit_per_class == Some(0) {
            return Err(format!("{at}: limit_per_class must be at least 1"));
        }
        if self.batch == Some(0) {
            return Err(format!("{at}: batch must be at least 1"));
        }
        if let Some(r) = self.review_below {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("{at}: review_below must be between 0 and 1"));
            }
        }
        Ok(())
    }
}

fn slugify(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let t = out.trim_matches('-').to_string();
    if t.is_empty() {
        "classifier".into()
    } else {
        t
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergySpec {
    /// ISO 3166-1 alpha-3 country for the grid's carbon intensity.
    #[serde(default)]
    pub country: Option<String>,
    /// gCO2e/kWh; wins over `country`.
    #[serde(default)]
    pub grid_intensity: Option<f64>,
    #[serde(default)]
    pub pue: Option<f64>,
    /// CPU TDP override in watts for the CPU-time estimate.
    #[serde(default)]
    pub tdp_w: Option<f64>,
    /// Electricity price in USD per kWh: turns local energy into money for the break-even
    /// point against a paid API. Without it the report compares energy only and says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub electricity_usd_per_kwh: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    #[serde(default = "default_resamples")]
    pub bootstrap_resamples: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_resamples() -> usize {
    1000
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            bootstrap_resamples: default_resamples(),
            seed: default_seed(),
        }
    }
}

impl EvalSpec {
    pub fn options(&self) -> mica_eval::EvalOptions {
        mica_eval::EvalOptions {
            bootstrap_resamples: self.bootstrap_resamples,
            seed: self.seed,
            ..Default::default()
        }
    }
}

impl Experiment {
    /// Reads and checks an experiment file; errors name the file and the problem.
    pub fn load(path: impl AsRef<Path>) -> Result<Experiment, RunError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| RunError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        // `kind` may only be left out where `spec` names the classifier.
        if let Ok(toml::Value::Table(t)) = toml::from_str::<toml::Value>(&text) {
            if let Some(toml::Value::Array(list)) = t.get("classifier") {
                for (i, c) in list.iter().enumerate() {
                    if c.get("kind").is_none() && c.get("spec").is_none() {
                        return Err(RunError::Config {
                            path: path.to_path_buf(),
                            message: format!(
                                "classifier #{}: name it with `spec = \"cnn:RUN_DIR\"` (or cnn-train:ARCH, llm:PROVIDER/MODEL, baseline) or `kind`",
                                i + 1
                            ),
                        });
                    }
                }
            }
        }
        let mut exp: Experiment = toml::from_str(&text).map_err(|e| RunError::Config {
            path: path.to_path_buf(),
            message: e.to_string().replace('\n', " ").trim().to_string(),
        })?;
        for (i, c) in exp.classifiers.iter_mut().enumerate() {
            c.resolve_spec(&format!("classifier #{}", i + 1))
                .map_err(|message| RunError::Config {
                    path: path.to_path_buf(),
                    message,
                })?;
        }
        exp.validate().map_err(|message| RunError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(exp)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.classifiers.is_empty() {
            return Err("no classifiers: add at least one [[classifier]]".into());
        }
        let split = mica_data::split::SplitConfig {
            seed: self.dataset.seed,
            train: self.dataset.train,
            val: self.dataset.val,
            test: self.dataset.test,
        };
        split.validate()?;
        if let Some(p) = self.energy.electricity_usd_per_kwh {
            if !p.is_finite() || p < 0.0 || p > 100.0 {
                return Err(format!("energy.electricity_usd_per_kwh must be between 0 and 100 USD/kWh, not {p}"));
            }
        }
        if self.dataset.limit_per_class == Some(0) {
            return Err("dataset.limit_per_class must be at least 1".into());
        }
        let mut seen = Vec::new();
        for (i, c) in self.classifiers.iter().enumerate() {
            c.validate(i)?;
            let s = c.slug();
            if seen.contains(&s) {
                return Err(format!(
                    "two classifiers share the slug `{s}`; give one of them `slug = \"...\"`"
                ));
            }
            seen.push(s);
        }
        Ok(())
    }

    /// The run directory.
    pub fn output_dir(&self) -> PathBuf {
        match &self.output {
            Some(o) => o.clone(),
            None => PathBuf::from("runs").join(self.name.clone().unwrap_or_else(|| {
                self.dataset
                    .path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "compare".into())
            })),
        }
    }

    /// The entry for a `--classifier` flag (every option unset).
    pub fn classifier_from_flag(spec: &str) -> Result<ClassifierConfig, String> {
        let spec: ClassifierSpec = spec.parse().map_err(|e: SpecError| e.to_string())?;
        Ok(ClassifierConfig::from_spec(&spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses_with_defaults_and_slugs() {
        let exp: Experiment = toml::from_str(
            r#"
            name = "brain"
            [dataset]
            path = "data/brain"
            limit_per_class = 5
            [[classifier]]
            kind = "cnn"
            train = "small"
            [[classifier]]
            kind = "llm"
            model = "openai/gpt-4o"
            filter = "default"
            [[classifier]]
            kind = "baseline"
            [energy]
            country = "FRA"
            "#,
        )
        .unwrap();
        exp.validate().unwrap();
        assert_eq!(exp.dataset.seed, 42);
        assert_eq!(exp.output_dir(), PathBuf::from("runs/brain"));
        let slugs: Vec<String> = exp.classifiers.iter().map(|c| c.slug()).collect();
        assert_eq!(slugs, ["cnn-small", "llm-openai-gpt-4o-filter-default", "baseline-centroid"]);
        assert_eq!(exp.classifiers[0].spec().unwrap().to_string(), "cnn-train:small");
        assert_eq!(exp.classifiers[1].display_name(), "llm:openai/gpt-4o+filter:default");
    }

    #[test]
    fn mistakes_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exp.toml");
        std::fs::write(&p, "[dataset]\npath = \"d\"\n[[classifier]]\nkind = \"cnn\"\n").unwrap();
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("exp.toml") && e.contains("needs `run"), "{e}");
        std::fs::write(&p, "[dataset]\npath = \"d\"\ncolour = 1\n").unwrap();
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("exp.toml") && e.contains("colour"), "{e}");
        assert!(!e.contains('\n'));
        std::fs::write(
            &p,
            "[dataset]\npath = \"d\"\n[[classifier]]\nkind = \"baseline\"\n[[classifier]]\nkind = \"baseline\"\n",
        )
        .unwrap();
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("share the slug"), "{e}");
        let e = Experiment::load(dir.path().join("nope.toml")).unwrap_err().to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }

    #[test]
    fn shipped_experiments_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                let exp = Experiment::load(e.path()).unwrap_or_else(|err| panic!("{err}"));
                assert!(!exp.classifiers.is_empty());
                n += 1;
            }
        }
        assert!(n >= 3, "one experiment per modality");
    }

    #[test]
    fn flag_forms_parse() {
        assert_eq!(Experiment::classifier_from_flag("cnn:runs/x").unwrap().slug(), "cnn-x");
        assert_eq!(Experiment::classifier_from_flag("cnn-train:resnet18").unwrap().slug(), "cnn-resnet18");
        assert_eq!(Experiment::classifier_from_flag("baseline").unwrap().kind, Kind::Baseline);
        assert!(Experiment::classifier_from_flag("svm").is_err());
    }

    #[test]
    fn spec_key_is_the_same_as_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exp.toml");
        std::fs::write(
            &p,
            "[dataset]\npath = \"d\"\n[[classifier]]\nspec = \"llm:ollama/llava\"\nfilter = \"none\"\n[[classifier]]\nspec = \"cnn-train:small\"\n",
        )
        .unwrap();
        let exp = Experiment::load(&p).unwrap();
        assert_eq!(exp.classifiers[0], ClassifierConfig { filter: Some("none".into()), ..Experiment::classifier_from_flag("llm:ollama/llava").unwrap() });
        assert_eq!(exp.classifiers[1].spec().unwrap().to_string(), "cnn-train:small");
        std::fs::write(&p, "[dataset]\npath = \"d\"\n[[classifier]]\nspec = \"svm\"\n").unwrap();
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("exp.toml") && e.contains("svm"), "{e}");
    }
}
