//! `mica serve`: the web app and JSON API (library: `mica-server`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mica_core::Modality;
use mica_server::{App, LlmOptions, Panel, ServerError, Settings};

use crate::exit::usage;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// A classifier to run on every upload, repeatable: `cnn:RUN_DIR` (a `mica train` run) or
    /// `llm:openai/gpt-4o`, `llm:ollama/llama3.2-vision`,
    /// `llm:openai-compatible/<model>@http://host:port`.
    #[arg(long = "classifier", value_name = "SPEC", required = true)]
    pub classifiers: Vec<String>,
    /// The task (xray, mri or ct), needed when only LLMs are configured; with a CNN its labels
    /// are used.
    #[arg(long)]
    pub modality: Option<String>,
    /// Results store: runs for the dashboard, cases and decisions
    /// [default: $MICA_STORE or ~/.local/share/mica/runs.sqlite].
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Index every finished run directory under DIR into the store at start-up.
    #[arg(long, value_name = "DIR")]
    pub runs_dir: Option<PathBuf>,
    /// Largest accepted upload, in megabytes.
    #[arg(long, default_value_t = 50.0)]
    pub max_upload_mb: f64,
    /// Suggestions with a confidence below this flag the case for physician review.
    #[arg(long, default_value_t = 0.7)]
    pub review_threshold: f64,
    /// Environment variable holding the LLM API key (read here; never sent to the browser).
    #[arg(long, default_value = "OPENAI_API_KEY", value_name = "NAME")]
    pub api_key_env: String,
    /// Per-request timeout for LLM calls, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub llm_timeout: f64,
    /// CPU TDP in watts for the CPU-time energy estimate, instead of the table value.
    #[arg(long, value_name = "W")]
    pub tdp: Option<f64>,
}

/// The environment variable holding the bearer token; when set, every page and API call
/// needs it.
pub const TOKEN_ENV: &str = "MICA_SERVE_TOKEN";

fn config_err(e: ServerError) -> anyhow::Error {
    match e {
        ServerError::Config(m) => usage(m),
        other => anyhow::Error::new(other),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if !(args.max_upload_mb > 0.0 && args.max_upload_mb.is_finite() && args.max_upload_mb <= 4096.0) {
        return Err(usage("--max-upload-mb must be above 0 and at most 4096"));
    }
    if !(0.0..=1.0).contains(&args.review_threshold) {
        return Err(usage("--review-threshold must be between 0 and 1"));
    }
    if !(args.llm_timeout > 0.0 && args.llm_timeout.is_finite()) {
        return Err(usage("--llm-timeout must be a positive number of seconds"));
    }
    let modality: Option<Modality> = args.modality.as_deref().map(str::parse).transpose().map_err(usage)?;
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|e| usage(format!("--host {}: {e}", args.host)))?;
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty());
    let store_path = args
        .store
        .clone()
        .or_else(mica_report::default_store_path)
        .ok_or_else(|| usage("no results store: give --store PATH or set MICA_STORE"))?;
    let mut store = mica_report::Store::open(&store_path)?;
    if let Some(dir) = &args.runs_dir {
        let (n, notes) = mica_server::index_runs_dir(&mut store, dir).map_err(config_err)?;
        for n in notes {
            eprintln!("note: {n}");
        }
        eprintln!("indexed {n} run(s) from {}", dir.display());
    }
    let llm = LlmOptions {
        api_key_env: args.api_key_env.clone(),
        timeout: Duration::from_secs_f64(args.llm_timeout),
        ..LlmOptions::default()
    };
    let meter = super::energy::EnergyOpts { tdp: args.tdp, ..Default::default() }.meter_config()?;
    let panel = Panel::load(&args.classifiers, modality, &llm, &meter).map_err(config_err)?;
    for m in &panel.members {
        eprintln!("classifier {} ({}): {}", m.name, m.family, m.model_version);
    }
    for l in panel.meter_lines() {
        eprintln!("energy: {l}");
    }
    let settings = Settings {
        max_upload_bytes: (args.max_upload_mb * 1024.0 * 1024.0) as usize,
        review_threshold: args.review_threshold,
        token: token.clone(),
    };
    let app = App::new(panel, store, settings).map_err(config_err)?;
    mica_server::run(app, addr, |local| {
        let url = format!("http://{local}");
        eprintln!(
            "mica serve: decision support on {url} (results store {}); {}; Ctrl-C stops",
            store_path.display(),
            if token.is_some() {
                format!("bearer token required ({TOKEN_ENV}); open {url}/?token=... once in a browser")
            } else {
                format!("no authentication ({TOKEN_ENV} is not set)")
            }
        );
        println!("{url}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
