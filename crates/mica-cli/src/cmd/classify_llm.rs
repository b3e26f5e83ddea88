//! `mica classify --classifier llm:...`: a vision LLM over a dataset split, resumable, cached,
//! rate-limited, with the filter stages and token/cost accounting (library: `mica-llm`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mica_core::{Prediction, Sample, Split};
use mica_llm::{
    build_provider, ConfidenceSource, ContextMode, FilterSpec, Limits, LlmConfig, LlmRunner,
    LlmSummary, PriceTable, PromptSet, ProviderSpec, ResponseCache, WorkItem,
};

use crate::exit::usage;

/// Flags that only the LLM arm reads.
#[derive(clap::Args, Debug, Default)]
pub struct LlmArgs {
    /// image, image+clinical, image+findings or findings.
    #[arg(long, default_value = "image")]
    pub context: String,
    /// Filter stages: `default` (= validate,confidence=0.5), `none`, or a comma list of
    /// validate, confidence=T, consistency=K[:AGREE], variants=K[:AGREE], crosscheck=CNN_PREDICTIONS.
    #[arg(long)]
    pub filter: Option<String>,
    /// Maximum LLM requests in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Neither read nor write the response cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Response cache folder [default: $MICA_CACHE_DIR/llm or ~/.cache/mica/llm].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Server address replacing the spec's (e.g. a proxy, or `mica llm-sim` for a dry run).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Environment variable holding the API key (never printed or stored).
    #[arg(long, default_value = "OPENAI_API_KEY", value_name = "NAME")]
    pub api_key_env: String,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: u32,
    /// OpenAI image detail: low, high or auto.
    #[arg(long, default_value = "low")]
    pub detail: String,
    /// Do not send the JSON schema (for servers without structured output).
    #[arg(long)]
    pub no_structured: bool,
    /// Ask for token log-probabilities (OpenAI format).
    #[arg(long)]
    pub logprobs: bool,
    /// Confidence used by the filter: stated or logprobs.
    #[arg(long, default_value = "stated")]
    pub confidence_source: String,
    /// Sampling temperature of the self-consistency samples.
    #[arg(long, default_value_t = 0.7)]
    pub consistency_temperature: f64,
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
    /// Attempts per request before the image is recorded as failed.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Longest image side sent, in pixels.
    #[arg(long, default_value_t = 512)]
    pub image_max_side: u32,
}

pub fn run(
    common: &super::classify::ClassifyArgs,
    spec: &str,
) -> anyhow::Result<super::classify::ClassifyOutcome> {
    let a = &common.llm;
    let mut pspec = ProviderSpec::parse(spec).map_err(|e| usage(e.to_string()))?;
    if let Some(u) = &a.base_url {
        pspec = pspec.with_base_url(u).map_err(|e| usage(e.to_string()))?;
    }
    let context: ContextMode = a.context.parse().map_err(usage)?;
    let mut filter = FilterSpec::parse(a.filter.as_deref().unwrap_or("default"))
        .map_err(|e| usage(e.to_string()))?;
    if let Some(c) = filter.consistency.as_mut() {
        c.temperature = a.consistency_temperature;
    }
    if let Some(p) = &filter.crosscheck {
        if !p.is_file() {
            return Err(usage(format!(
                "{}: CNN predictions file for --filter crosscheck not found",
                p.display()
            )));
        }
    }
    let split: Split = common.split.parse().map_err(usage)?;
    if a.concurrency == 0 {
        return Err(usage("--concurrency must be at least 1"));
    }
    if a.max_attempts == 0 {
        return Err(usage("--max-attempts must be at least 1"));
    }
    if !(a.request_timeout > 0.0 && a.request_timeout.is_finite()) {
        return Err(usage(
            "--request-timeout must be a positive number of seconds",
        ));
    }
    if !(0.0..=2.0).contains(&a.temperature) || !(0.0..=2.0).contains(&a.consistency_temperature) {
        return Err(usage("temperatures must be within 0..2"));
    }
    let detail = a.detail.parse().map_err(usage)?;
    let confidence_source: ConfidenceSource = a.confidence_source.parse().map_err(usage)?;
    let prompts = match &a.prompts {
        Some(p) => PromptSet::builtin()
            .with_overrides_from(p)
            .map_err(|e| usage(e.to_string()))?,
        None => PromptSet::builtin(),
    };
    let prices = match &a.prices {
        Some(p) => PriceTable::builtin()
            .with_overrides_from(p)
            .map_err(|e| usage(e.to_string()))?,
        None => PriceTable::builtin(),
    };

    let ds = super::classify_cnn::load_split_dataset(&common.dataset, common.seed)?;
    let mut samples: Vec<&Sample> = ds.split(split).collect();
    if let Some(n) = common.limit_per_class {
        let mut counts = vec![0usize; ds.labels.len()];
        samples.retain(|s| {
            let c = &mut counts[s.label.min(ds.labels.len() - 1)];
            *c += 1;
            *c <= n
        });
    }
    if samples.is_empty() {
        anyhow::bail!("{}: the {split} split is empty", common.dataset.display());
    }

    let mut cfg = LlmConfig::new(pspec.clone(), ds.modality, ds.labels.clone());
    cfg.context = context;
    cfg.filter = filter;
    cfg.params.temperature = a.temperature;
    cfg.params.seed = Some(common.seed);
    cfg.params.max_tokens = a.max_tokens;
    cfg.params.detail = detail;
    cfg.params.logprobs = a.logprobs;
    cfg.params.structured = !a.no_structured;
    cfg.image_max_side = a.image_max_side;
    cfg.confidence_source = confidence_source;

    let out = common
        .out
        .clone()
        .unwrap_or_else(|| default_out(&ds.root, &pspec, context, split));
    check_or_record_config(&out, &cfg)?;

    let provider = build_provider(&pspec, &a.api_key_env, mica_llm::provider::http_client())
        .map_err(|e| usage(e.to_string()))?;
    let cache = (!a.no_cache).then(|| {
        ResponseCache::new(
            a.cache_dir
                .clone()
                .unwrap_or_else(ResponseCache::default_dir),
        )
    });
    let limits = Limits {
        concurrency: a.concurrency,
        rpm: a.rpm,
        tpm: a.tpm,
        max_attempts: a.max_attempts,
        timeout: Duration::from_secs_f64(a.request_timeout),
        ..Limits::default()
    };
    let loader: mica_llm::ImageLoader = Arc::new(|src: &mica_core::ImageSource| {
        mica_data::image::load_gray(src).map_err(|e| e.to_string())
    });
    let runner = LlmRunner::new(cfg, provider)
        .with_limits(limits)
        .with_prompts(prompts)
        .with_prices(&prices)
        .with_cache(cache)
        .with_loader(loader)
        .with_crosscheck_from_filter()
        .map_err(|e| usage(e.to_string()))?;
    let runner = Arc::new(runner);
    if runner.price().is_none() {
        eprintln!(
            "note: no price for `{}` in the price table: cost is reported as unknown (add it with --prices FILE)",
            pspec.model
        );
    }
    let name = runner.name().to_string();

    let items: Vec<WorkItem> = samples
        .iter()
        .map(|s| WorkItem::from_sample(s, &ds.labels))
        .collect();
    let log_path = out.join("predictions.jsonl");
    let (mut log, existing) = mica_llm::runner::open_log(&out)?;
    let done = items
        .iter()
        .filter(|i| log.is_done(&name, &i.sample.id))
        .count();
    if !existing.is_empty() && done > 0 && done < items.len() {
        eprintln!(
            "note: resuming: {done} of {} images already classified",
            items.len()
        );
    }
    let bar = indicatif::ProgressBar::new((items.len() - done) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} images {elapsed} (eta {eta}) {msg}",
        )
        .expect("static template"),
    );
    let progress = {
        let bar = bar.clone();
        move |p: &Prediction| {
            bar.inc(1);
            if p.extra.get("simulated").and_then(|v| v.as_bool()) == Some(true) {
                bar.set_message("SIMULATED");
            }
        }
    };
    let rt = mica_llm::runtime()?;
    let stats = rt
        .block_on(runner.run(items, &mut log, Some(&progress)))
        .with_context(|| format!("classifying into {}", log_path.display()))?;
    bar.finish_and_clear();
    drop(log);

    let wanted: std::collections::HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    let preds: Vec<Prediction> = mica_core::read_predictions(&log_path)?
        .into_iter()
        .filter(|p| p.classifier == name && wanted.contains(p.sample_id.as_str()))
        .collect();
    let summary = LlmSummary::from_predictions(&preds, &runner.config.filter, runner.price());
    let mut metrics = mica_eval::RunMetrics::from_predictions(
        &name,
        &ds.root.display().to_string(),
        split.as_str(),
        &ds.labels,
        &preds,
        stats.wall_seconds,
        &mica_eval::EvalOptions::default(),
    )
    .with_context(|| format!("computing metrics for {}", log_path.display()))?;
    if stats.classified > 0 {
        metrics.throughput_images_per_s =
            Some(stats.classified as f64 / stats.wall_seconds.max(1e-9));
    }
    metrics.simulated = summary.simulated;
    metrics
        .extra
        .insert("llm".into(), serde_json::to_value(&summary)?);
    metrics
        .extra
        .insert("llm_run".into(), serde_json::to_value(&stats)?);
    metrics
        .extra
        .insert("llm_config".into(), serde_json::to_value(&runner.config)?);
    metrics.write(out.join("metrics.json"))?;

    print_summary(&metrics, &summary, &stats);
    // The provider's machines did the inference: their energy is recorded as not measured,
    // next to this process's own measured or estimated share. The simulator runs locally.
    let remote = if summary.simulated {
        Vec::new()
    } else {
        vec![mica_energy::RemoteUsage {
            provider: pspec.kind.as_str().to_string(),
            model: pspec.model.clone(),
            requests: stats.http_requests,
            input_tokens: summary.prompt_tokens,
            output_tokens: summary.completion_tokens,
            estimate: None,
        }]
    };
    Ok(super::classify::ClassifyOutcome {
        out_dir: out,
        images: stats.classified,
        remote,
    })
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn default_out(root: &Path, spec: &ProviderSpec, context: ContextMode, split: Split) -> PathBuf {
    let ds_name = root
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "dataset".into());
    PathBuf::from("runs").join(sanitize(&ds_name)).join(format!(
        "llm-{}-{}-{}-{}",
        spec.kind.as_str(),
        sanitize(&spec.model),
        sanitize(context.as_str()),
        split
    ))
}

/// A run directory belongs to one configuration: resuming into it with other settings would
/// mix answers to different questions in one predictions file.
fn check_or_record_config(out: &Path, cfg: &LlmConfig) -> anyhow::Result<()> {
    let path = out.join("llm_config.json");
    let now = serde_json::to_value(cfg)?;
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let before: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        if before != now {
            let diff: Vec<String> = now
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| before.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            return Err(usage(format!(
                "{}: this run directory holds a run with different settings ({}); use another --out",
                out.display(),
                diff.join(", ")
            )));
        }
        return Ok(());
    }
    mica_core::write_atomic(&path, serde_json::to_string_pretty(&now)?.as_bytes())?;
    Ok(())
}

fn print_summary(m: &mica_eval::RunMetrics, s: &LlmSummary, stats: &mica_llm::RunStats) {
    if s.simulated {
        println!("SIMULATED: answers came from `mica llm-sim`, not a model; these numbers are a dry run.");
    }
    let o = &m.outcomes;
    println!(
        "{}: {} images: {} answered, {} deferred to a physician, {} unparseable, {} failed",
        m.classifier, m.images, o.answered, o.deferred, o.unparseable, o.failed
    );
    println!(
        "accuracy {:.3} over all images (no answer = wrong){}; coverage {:.3}{}",
        m.all.accuracy,
        m.answered.as_ref().map_or(String::new(), |r| format!(
            ", {:.3} over answered",
            r.accuracy
        )),
        m.coverage,
        m.accepted.as_ref().map_or(String::new(), |r| format!(
            ", accuracy {:.3} on accepted cases",
            r.accuracy
        )),
    );
    for l in s.stage_lines() {
        println!("  filter {l}");
    }
    let ps: Vec<String> = s
        .parse_stages
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("  parsed by: {}", ps.join(", "));
    let cost = match (&s.cost_usd, &s.price) {
        (Some(c), Some(p)) => format!(
            "${c:.4} (${:.5}/image; {} at ${}/${} per 1M in/out tokens, as of {})",
            s.cost_usd_per_image.unwrap_or(0.0),
            p.key,
            p.entry.input_per_million,
            p.entry.output_per_million,
            p.entry.as_of
        ),
        _ => "unknown (no price entry)".into(),
    };
    println!(
        "  tokens {} in / {} out; cost {cost}",
        s.prompt_tokens, s.completion_tokens
    );
    println!(
        "  {} requests, {} retries, {} cache hits, {} resumed; {:.1} s",
        stats.http_requests, stats.retries, stats.cache_hits, stats.resumed, stats.wall_seconds
    );
}
