//! `mica classify`: one classifier over one split of a dataset. It is a run of one classifier
//! through the same engine as `mica compare` (`mica_run::run_experiment`), written with the
//! classifier's files at the root of `--out`.
use std::path::{Path, PathBuf};

use mica_core::{FailedOnResume, Split};
use mica_run::{ClassifierConfig, ClassifierSpec, DatasetSpec, EnergySpec, EvalSpec, Experiment, Kind, Layout, RunOptions};

use crate::exit::usage;

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    #[arg(long)]
    pub dataset: PathBuf,
    /// `cnn:RUN_DIR`, `cnn-train:ARCH`, `llm:openai/gpt-4o`, `llm:ollama/llama3.2-vision`,
    /// `llm:openai-compatible/<model>@http://host:port`, `onnx:PATH.onnx`, `baseline`,
    /// `cascade:FIRST,SECOND@THRESHOLD` (e.g. `cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.8`).
    #[arg(long)]
    pub classifier: String,
    /// Which split to classify.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Output run directory (predictions.jsonl, metrics.json, energy.csv, manifest.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Classify at most N images per class: a seeded draw, the same images `mica compare`
    /// takes with the same flag.
    #[arg(long)]
    pub limit_per_class: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// On resume, keep images recorded as failed instead of asking them again.
    #[arg(long)]
    pub keep_failed: bool,
    /// Cascade (`cascade:FIRST,SECOND@T`): tell the second stage (an LLM) the first model's two
    /// most probable labels and their confidences, as a marked second opinion in its prompt.
    #[arg(long)]
    pub cascade_context: bool,
    #[command(flatten)]
    pub context: ContextArgs,
    #[command(flatten)]
    pub cnn: CnnArgs,
    #[command(flatten)]
    pub llm: LlmArgs,
    #[command(flatten)]
    pub energy: super::energy::EnergyOpts,
}

/// Which metadata may reach an LLM's prompt (`--context image+clinical`).
#[derive(clap::Args, Debug, Default)]
pub struct ContextArgs {
    /// Metadata columns (of a CSV manifest, or of metadata.csv beside the images) joined into
    /// the clinical context, besides a `context` column. Columns that name or imply a class
    /// are refused.
    #[arg(long, value_delimiter = ',', value_name = "COL,...")]
    pub context_columns: Vec<String>,
    /// Let label-like context columns through anyway (every figure of the run says so).
    #[arg(long)]
    pub allow_label_like_context: bool,
}

/// Flags that only CNNs read.
#[derive(clap::Args, Debug, Default)]
pub struct CnnArgs {
    /// Inference batch size [default: 32].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Flag predictions whose confidence is below this for physician review
    /// (`needs_review` in predictions.jsonl).
    #[arg(long, default_value_t = 0.6)]
    pub review_below: f64,
}

/// Flags that only LLMs read. Unset flags take the engine's documented defaults.
#[derive(clap::Args, Debug, Default)]
pub struct LlmArgs {
    /// image, image+clinical, image+findings or findings [default: image].
    #[arg(long)]
    pub context: Option<String>,
    /// Filter stages: `default` (= validate,confidence=0.5), `none`, or a comma list of
    /// validate, confidence=T, consistency=K[:AGREE], variants=K[:AGREE], crosscheck=CNN_PREDICTIONS
    /// [default: default].
    #[arg(long)]
    pub filter: Option<String>,
    /// Maximum LLM requests in flight [default: 4].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Neither read nor write the response cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Response cache folder [default: $MICA_CACHE_DIR/llm or ~/.cache/mica/llm].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Server address replacing the spec's (e.g. a proxy, or `mica llm-sim` for a dry run).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Environment variable holding the API key (never printed or stored) [default: OPENAI_API_KEY].
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Azure OpenAI `api-version` [default: 2024-10-21, or $AZURE_OPENAI_API_VERSION].
    #[arg(long, value_name = "VERSION")]
    pub api_version: Option<String>,
    /// Sampling temperature [default: 0].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// [default: 200; 4000 for reasoning models, whose budget includes hidden reasoning]
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// OpenAI image detail: low, high or auto [default: low].
    #[arg(long)]
    pub detail: Option<String>,
    /// Do not send the JSON schema (for servers without structured output).
    #[arg(long)]
    pub no_structured: bool,
    /// Ask for token log-probabilities (OpenAI format).
    #[arg(long)]
    pub logprobs: bool,
    /// Send OpenAI reasoning-model parameters (`max_completion_tokens`, no temperature or
    /// logprobs) whatever the model's name [default: by name: o1, o3, o4, gpt-5 families].
    #[arg(long, conflicts_with = "no_reasoning")]
    pub reasoning: bool,
    /// Send the classic parameters (`max_tokens`, `temperature`) even to a model whose name
    /// says reasoning model.
    #[arg(long)]
    pub no_reasoning: bool,
    /// Confidence used by the filter: stated or logprobs [default: stated].
    #[arg(long)]
    pub confidence_source: Option<String>,
    /// Sampling temperature of the self-consistency samples [default: 0.7].
    #[arg(long)]
    pub consistency_temperature: Option<f64>,
    /// TOML file overriding prompt templates, class descriptions and answer synonyms.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// TOML price table laid over the built-in one ($ per million tokens, dated).
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute (estimated before sending).
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Attempts per request before the image is recorded as failed [default: 5].
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Per-request timeout in seconds [default: 120].
    #[arg(long)]
    pub request_timeout: Option<f64>,
    /// Longest image side sent, in pixels [default: 512].
    #[arg(long)]
    pub image_max_side: Option<u32>,
}

/// The classifier entry the flags describe.
fn entry(spec: &ClassifierSpec, args: &ClassifyArgs) -> ClassifierConfig {
    let mut c = ClassifierConfig::from_spec(spec);
    c.batch = args.cnn.batch;
    match c.kind {
        // An ONNX model gives softmax probabilities like a CNN: the same review threshold.
        Kind::Cnn | Kind::Onnx => c.review_below = Some(args.cnn.review_below),
        // A cascade entry holds the settings of both stages: the CNN flags go to its CNN
        // stage, the LLM flags to its LLM stage (`ClassifierConfig::stage`).
        Kind::Llm | Kind::Cascade => {
            if c.kind == Kind::Cascade {
                c.review_below = Some(args.cnn.review_below);
                c.cascade_context = args.cascade_context;
            }
            let a = &args.llm;
            c.context = a.context.clone();
            c.filter = a.filter.clone();
            c.template = a.prompts.as_ref().map(|p| p.display().to_string());
            let o = &mut c.llm;
            o.base_url = a.base_url.clone();
            o.api_key_env = a.api_key_env.clone();
            o.api_version = a.api_version.clone();
            o.temperature = a.temperature;
            o.max_tokens = a.max_tokens;
            o.detail = a.detail.clone();
            o.structured = a.no_structured.then_some(false);
            o.logprobs = a.logprobs.then_some(true);
            o.reasoning = if a.reasoning {
                Some(true)
            } else {
                a.no_reasoning.then_some(false)
            };
            o.confidence_source = a.confidence_source.clone();
            o.consistency_temperature = a.consistency_temperature;
            o.image_max_side = a.image_max_side;
            o.prices = a.prices.clone();
            o.concurrency = a.concurrency;
            o.rpm = a.rpm;
            o.tpm = a.tpm;
            o.max_attempts = a.max_attempts;
            o.request_timeout = a.request_timeout;
            o.no_cache = a.no_cache.then_some(true);
            o.cache_dir = a.cache_dir.clone();
        }
        Kind::Baseline => {}
    }
    c
}

/// `RUN_DIR/classify-<split>` for a trained CNN, else `runs/<dataset>/<classifier>-<split>`.
fn default_out(spec: &ClassifierSpec, c: &ClassifierConfig, dataset: &Path, split: Split) -> PathBuf {
    match spec {
        ClassifierSpec::Cnn { run } => run.join(format!("classify-{split}")),
        _ => {
            let ds = dataset
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dataset".into());
            let ctx = c.context.as_deref().map(|x| format!("-{}", x.replace('+', "_"))).unwrap_or_default();
            PathBuf::from("runs").join(ds).join(format!("{}{ctx}-{split}", c.slug()))
        }
    }
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    let spec: ClassifierSpec = args.classifier.parse().map_err(|e: mica_run::SpecError| usage(e.to_string()))?;
    let split: Split = args.split.parse().map_err(usage)?;
    if !args.dataset.exists() {
        return Err(usage(format!("{}: no such dataset folder", args.dataset.display())));
    }
    if let ClassifierSpec::Cnn { run } = &spec {
        if !run.is_dir() {
            return Err(usage(format!("{}: no such CNN run directory", run.display())));
        }
    }
    if args.cascade_context && !matches!(spec, ClassifierSpec::Cascade { .. }) {
        return Err(usage("--cascade-context applies to a cascade:FIRST,SECOND@THRESHOLD classifier only"));
    }
    let cfg = entry(&spec, &args);
    let out = args.out.clone().unwrap_or_else(|| default_out(&spec, &cfg, &args.dataset, split));
    let exp = Experiment {
        name: None,
        output: Some(out),
        dataset: DatasetSpec {
            seed: args.seed,
            limit_per_class: args.limit_per_class,
            split,
            context_columns: args.context.context_columns.clone(),
            allow_label_like_context: args.context.allow_label_like_context,
            ..DatasetSpec::new(&args.dataset)
        },
        classifiers: vec![cfg],
        energy: EnergySpec {
            country: args.energy.country.clone(),
            grid_intensity: args.energy.grid_intensity,
            pue: args.energy.pue,
            tdp_w: None,
            electricity_usd_per_kwh: args.energy.electricity_price,
        },
        eval: EvalSpec::default(),
    };
    exp.validate().map_err(usage)?;
    let opts = RunOptions {
        layout: Layout::Flat,
        failed: if args.keep_failed { FailedOnResume::Keep } else { FailedOnResume::Retry },
        meter: args.energy.meter_config()?,
        command: Some(std::env::args().collect::<Vec<_>>().join(" ")),
        ..Default::default()
    };
    let outcome = super::compare::run_with_progress(&exp, &opts, true)?;
    let c = &outcome.classifiers[0];
    let metrics = mica_eval::RunMetrics::read(mica_core::ClassifierDir::new(&c.dir).metrics())?;
    super::compare::print_classifier(&metrics, c);
    println!("classified {} images; results in {}", c.images, c.dir.display());
    super::compare::fail_if_nothing_answered(&outcome)
}
