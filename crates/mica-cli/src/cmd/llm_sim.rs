//! `mica llm-sim`: the LLM simulator as a local server, for dry runs before paying for an API.
//! Its answers are stamped SIMULATED wherever they end up.

use std::net::SocketAddr;
use std::path::PathBuf;

use mica_llm::sim::{SimConfig, SimServer, TruthTable};

use crate::exit::usage;

#[derive(clap::Args)]
pub struct LlmSimArgs {
    #[arg(long, default_value_t = 11435)]
    pub port: u16,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Probability that a known image gets its true label.
    #[arg(long, default_value_t = 0.7)]
    pub accuracy: f64,
    /// Latency added to every answer.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of requests answered with an HTTP error (half 429, half 500).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Dataset whose images (and labels) the simulator knows; other images get random labels.
    #[arg(long, value_name = "PATH")]
    pub dataset: Option<PathBuf>,
    /// CSV `path,label` of known images (paths relative to the CSV), instead of --dataset.
    #[arg(long, value_name = "FILE", conflicts_with = "dataset")]
    pub truth: Option<PathBuf>,
    /// Share of answers that are truncated JSON.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Share of answers naming a label outside the label set.
    #[arg(long, default_value_t = 0.0)]
    pub out_of_set_rate: f64,
    /// Share of answers in free prose naming the label by a synonym.
    #[arg(long, default_value_t = 0.0)]
    pub prose_rate: f64,
    /// Share of answers delayed by an extra --slow-ms.
    #[arg(long, default_value_t = 0.0)]
    pub slow_rate: f64,
    #[arg(long, default_value_t = 5000)]
    pub slow_ms: u64,
    /// `retry-after-ms` sent with simulated 429s.
    #[arg(long, default_value_t = 200)]
    pub retry_after_ms: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(args: LlmSimArgs) -> anyhow::Result<()> {
    let cfg = SimConfig {
        accuracy: args.accuracy,
        latency_ms: args.latency_ms,
        rate_malformed: args.malformed_rate,
        rate_out_of_set: args.out_of_set_rate,
        rate_prose: args.prose_rate,
        rate_slow: args.slow_rate,
        slow_ms: args.slow_ms,
        retry_after_ms: args.retry_after_ms,
        seed: args.seed,
        ..SimConfig::default()
    }
    .with_fail_rate(args.fail_rate);
    cfg.validate().map_err(|e| usage(e.to_string()))?;
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|e| usage(format!("--host {}: {e}", args.host)))?;
    let truth = if let Some(d) = &args.dataset {
        if !d.exists() {
            return Err(usage(format!("{}: no such dataset folder", d.display())));
        }
        let ds = mica_data::load(d).map_err(|e| {
            if e.is_usage() {
                usage(e.to_string())
            } else {
                anyhow::Error::new(e)
            }
        })?;
        let mut t = TruthTable::new();
        let mut unreadable = 0;
        for s in &ds.samples {
            match mica_data::image::load_gray(&s.source) {
                Ok(img) => t.add(&img, ds.labels.name(s.label)),
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            eprintln!("warning: {unreadable} images of {} could not be read and are unknown to the simulator", d.display());
        }
        t
    } else if let Some(f) = &args.truth {
        TruthTable::from_csv(f).map_err(|e| usage(e.to_string()))?
    } else {
        eprintln!("note: no --dataset or --truth: every image is unknown and gets a random label");
        TruthTable::new()
    };
    let known = truth.len();
    let rt = mica_llm::runtime()?;
    rt.block_on(async move {
        let sim = SimServer::start(cfg, truth, addr, false).await?;
        eprintln!(
            "mica llm-sim: SIMULATED answers (accuracy {}, latency {} ms, {} known images) on {}",
            args.accuracy,
            args.latency_ms,
            known,
            sim.url()
        );
        eprintln!(
            "  OpenAI format: {0}/v1/chat/completions   Ollama format: {0}/api/chat   Ctrl-C stops",
            sim.url()
        );
        println!("{}", sim.url());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        sim.run_until_signal().await;
        Ok::<_, mica_llm::LlmError>(())
    })?;
    Ok(())
}
