//! `mica llm check SPEC`: one small request, before a paid run, that says whether the key
//! works, the model exists, images are accepted, structured output is supported, and what one
//! image will roughly cost. It asks through the same runner as a run (the same client from
//! `build_provider`, prompts, negotiation of structured output and reasoning parameters, and
//! price table), so what it reports is what a run would meet.
//!
//! Exit status: 0 when a run would work, 1 when it would not, 2 for a usage error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use image::GrayImage;
use mica_core::{ImageSource, Modality, Outcome, Prediction, Sample};
use mica_llm::provider::{build_provider, http_client, OPENAI_API_KEY_ENV};
use mica_llm::spec::redact_url;
use mica_llm::{Detail, Limits, LlmConfig, LlmRunner, PriceTable, ProviderKind, ProviderSpec, WorkItem};

use crate::exit::usage;

#[derive(clap::Subcommand, Debug)]
pub enum LlmCommand {
    /// Send one tiny synthetic image to a model and say whether a run would work and what
    /// one image costs: key, model, image input, structured output, price.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The classifier spec, as for `mica classify --classifier`: `llm:openai/gpt-4o`,
    /// `llm:ollama/llama3.2-vision`, `llm:openai-compatible/<model>@http://host:port`, ...
    pub spec: String,
    /// Server address replacing the spec's.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Environment variable holding the API key (never printed) [default: the provider's].
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Azure OpenAI `api-version` [default: 2024-10-21, or $AZURE_OPENAI_API_VERSION].
    #[arg(long, value_name = "VERSION")]
    pub api_version: Option<String>,
    /// TOML price table laid over the built-in one.
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
    /// The modality whose prompt and labels are sent [default: mri].
    #[arg(long, default_value = "mri")]
    pub modality: String,
    /// OpenAI image detail: low, high or auto [default: low].
    #[arg(long, default_value = "low")]
    pub detail: String,
    /// [default: 200; 4000 for reasoning models]
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Force the OpenAI reasoning-model parameters.
    #[arg(long, conflicts_with = "no_reasoning")]
    pub reasoning: bool,
    /// Force the classic parameters (`max_tokens`, `temperature`).
    #[arg(long)]
    pub no_reasoning: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
}

pub fn run(cmd: LlmCommand) -> anyhow::Result<()> {
    match cmd {
        LlmCommand::Check(a) => check(a),
    }
}

/// A 64x64 gray gradient: small enough to cost the minimum, a real PNG all the same.
fn probe_image() -> GrayImage {
    GrayImage::from_fn(64, 64, |x, y| image::Luma([(64 + x + y) as u8]))
}

fn line(ok: Option<bool>, what: &str) {
    let tag = match ok {
        Some(true) => "[ok]  ",
        Some(false) => "[FAIL]",
        None => "[note]",
    };
    println!("  {tag} {what}");
}

fn check(a: CheckArgs) -> anyhow::Result<()> {
    let mut spec = ProviderSpec::parse(&a.spec).map_err(|e| usage(e.to_string()))?;
    if let Some(u) = &a.base_url {
        spec = spec.with_base_url(u).map_err(|e| usage(e.to_string()))?;
    }
    if let Some(v) = &a.api_version {
        spec = spec.with_api_version(v).map_err(|e| usage(e.to_string()))?;
    }
    let modality: Modality = a.modality.parse().map_err(usage)?;
    let labels = modality
        .canonical_labels()
        .ok_or_else(|| usage(format!("modality `{}` has no built-in label set", a.modality)))?;
    let detail: Detail = a.detail.parse().map_err(usage)?;
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        return Err(usage("--timeout must be a positive number of seconds"));
    }
    let prices = match &a.prices {
        Some(p) => PriceTable::builtin()
            .with_overrides_from(p)
            .map_err(|e| usage(e.to_string()))?,
        None => PriceTable::builtin(),
    };
    let key_env = a.api_key_env.as_deref().unwrap_or(OPENAI_API_KEY_ENV);

    println!("checking {} at {}", spec.canonical(), redact_url(&spec.base_url));
    let provider = match build_provider(&spec, key_env, http_client()) {
        Ok(p) => p,
        Err(e) => {
            line(Some(false), &format!("key: {}", redact_url(&e.to_string())));
            anyhow::bail!("not ready: no request was sent");
        }
    };

    let mut cfg = LlmConfig::new(spec.clone(), modality, labels.clone());
    cfg.params.detail = detail;
    cfg.params.seed = Some(42);
    cfg.params.reasoning = if a.reasoning {
        Some(true)
    } else {
        a.no_reasoning.then_some(false)
    };
    let reasoning = cfg.params.reasoning_for(&spec.model);
    cfg.params.max_tokens = a.max_tokens.unwrap_or(if reasoning {
        mica_run::llm::REASONING_MAX_TOKENS
    } else {
        cfg.params.max_tokens
    });
    let image = Arc::new(probe_image());
    let runner = LlmRunner::new(cfg, provider)
        .with_limits(Limits {
            concurrency: 1,
            max_attempts: 3,
            timeout: Duration::from_secs_f64(a.timeout),
            ..Limits::default()
        })
        .with_prices(&prices)
        .with_loader(Arc::new(move |_: &ImageSource| Ok((*image).clone())))
        .with_name(spec.canonical());
    let sample = Sample {
        id: "mica-llm-check/gray-64x64.png".into(),
        source: ImageSource::file("mica-llm-check-gray-64x64.png"),
        label: 0,
        split: None,
        context: None,
    };
    let item = WorkItem::from_sample(&sample, &labels);
    let rt = mica_llm::runtime()?;
    let runner = Arc::new(runner);
    let p = rt.block_on(runner.classify_one(&item));
    // The snapshot that answered may have a price of its own (the runner charged it).
    let by_snapshot = p
        .extra
        .get("price_key")
        .and_then(|k| k.as_str())
        .and_then(|k| prices.models.get(k).map(|e| (k.to_string(), e.clone())));
    let ready = report(&p, &spec, key_env, reasoning, by_snapshot.as_ref().or(runner.price()));
    if ready {
        println!("ready: a run with this spec would work");
        Ok(())
    } else {
        anyhow::bail!("not ready: a run with this spec would fail (see the checklist above)")
    }
}

/// Prints the checklist for the probe's prediction; true when a run would work.
fn report(
    p: &Prediction,
    spec: &ProviderSpec,
    key_env: &str,
    reasoning: bool,
    price: Option<&(String, mica_llm::PriceEntry)>,
) -> bool {
    let key_set = std::env::var(key_env).is_ok_and(|k| !k.trim().is_empty());
    let keyless = matches!(spec.kind, ProviderKind::Ollama | ProviderKind::OpenAiCompatible);
    let key_note = if key_set {
        format!("key from {key_env}")
    } else if keyless {
        "no key sent".to_string()
    } else {
        format!("{key_env} not set")
    };
    let flag = |k: &str| p.extra.get(k).and_then(|v| v.as_bool()) == Some(true);
    if p.outcome == Outcome::Failed {
        let msg = redact_url(p.error.as_deref().unwrap_or("no answer"));
        let low = msg.to_ascii_lowercase();
        match p.http_status {
            None if p.error.as_deref().is_some_and(|e| e.starts_with("cannot read image")) => {
                line(Some(false), &format!("probe image: {msg}"))
            }
            None => line(Some(false), &format!("server: {msg}")),
            Some(s @ (401 | 403)) => {
                line(Some(true), "server reachable");
                line(Some(false), &format!("key: refused (HTTP {s}; {key_note}): {msg}"));
            }
            Some(404) => {
                line(Some(true), "server reachable");
                line(
                    Some(false),
                    &format!("model `{}`: not found (HTTP 404): {msg}", spec.model),
                );
            }
            Some(429) if low.contains("insufficient_quota") => {
                line(Some(true), "server reachable");
                line(
                    Some(false),
                    &format!("quota: used up (HTTP 429 insufficient_quota): {msg}"),
                );
            }
            Some(s) if low.contains("image") => {
                line(Some(true), "server reachable");
                line(Some(false), &format!("images: not accepted (HTTP {s}): {msg}"));
            }
            Some(s) => {
                line(Some(true), "server reachable");
                line(Some(false), &format!("request: refused (HTTP {s}): {msg}"));
            }
        }
        if flag("structured_fallback") {
            line(
                None,
                "structured output: not supported (the request failed without it too)",
            );
        }
        return false;
    }
    line(Some(true), "server reachable");
    line(Some(true), &format!("key: accepted ({key_note})"));
    let resolved = p
        .resolved_model
        .as_deref()
        .filter(|m| *m != spec.model)
        .map(|m| format!(" (snapshot {m})"))
        .unwrap_or_default();
    line(Some(true), &format!("model `{}`: answered{resolved}", spec.model));
    line(Some(true), "images: accepted");
    if flag("structured_fallback") {
        line(None, "structured output: not supported, prompted JSON will be used");
    } else {
        line(Some(true), "structured output: supported");
    }
    if flag("reasoning_params_fallback") {
        line(
            None,
            "reasoning parameters: the server asked for them (max_completion_tokens, no temperature); a run switches after its first request, or pass --reasoning",
        );
    } else if reasoning && spec.kind.speaks_openai() {
        line(
            Some(true),
            "reasoning parameters: used (max_completion_tokens, no temperature)",
        );
    }
    match p.outcome {
        Outcome::Refused => line(
            None,
            "answer: the model declined to classify the gray probe image (fine for a check)",
        ),
        Outcome::Unparseable if p.finish_reason.as_deref() == Some("length") => line(
            None,
            "answer: cut off at the token limit (finish_reason length); raise --max-tokens for the run",
        ),
        Outcome::Unparseable => line(
            None,
            "answer: not parseable as a label (a gray probe image may do that)",
        ),
        _ => line(
            Some(true),
            &format!(
                "answer: parsed ({})",
                p.predicted.as_deref().unwrap_or("deferred by the filter")
            ),
        ),
    }
    match (p.tokens, price) {
        (Some(t), Some((key, e))) => {
            let reasoning = p
                .extra
                .get("reasoning_tokens")
                .and_then(|v| v.as_u64())
                .map(|r| format!(", {r} of them reasoning"))
                .unwrap_or_default();
            line(
                Some(true),
                &format!(
                    "cost: about ${:.6} per image ({} in / {} out tokens{reasoning}; {key} at ${}/${} per 1M in/out tokens, as of {})",
                    p.cost_usd.unwrap_or(0.0),
                    t.prompt,
                    t.completion,
                    e.input_per_million,
                    e.output_per_million,
                    e.as_of
                ),
            )
        }
        (Some(t), None) => line(
            None,
            &format!(
                "cost: unknown price for {}/{} ({} in / {} out tokens per image); add it with --prices FILE",
                spec.kind.as_str(),
                spec.model,
                t.prompt,
                t.completion
            ),
        ),
        (None, _) => line(None, "cost: unknown (the server reported no token usage)"),
    }
    if p.simulated {
        line(None, "the server is `mica llm-sim`: its answers are SIMULATED");
    }
    true
}
