//! `mica serve`: the web app and JSON API (library: `mica-server`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mica_core::Modality;
use mica_server::{App, LlmOptions, Panel, ServeOptions, ServerError, Settings, TaskSpec};

use crate::exit::usage;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// A classifier to run on every upload, repeatable: `cnn:RUN_DIR` (a `mica train` run),
    /// `onnx:PATH.onnx` (a model trained elsewhere, its sidecar `PATH.toml` beside it) or
    /// `llm:openai/gpt-4o`, `llm:ollama/llama3.2-vision`,
    /// `llm:openai-compatible/<model>@http://host:port`, or a cascade
    /// `cascade:cnn:RUN_DIR,llm:PROVIDER/MODEL@0.8` (the LLM is asked only when the CNN's
    /// confidence is below 0.8; the CNN's own card shows its answer at once).
    /// (One task; for several, use --task or --tasks.)
    #[arg(long = "classifier", value_name = "SPEC", required_unless_present_any = ["tasks", "tasks_file"])]
    pub classifiers: Vec<String>,
    /// A task with its own classifiers, repeatable: `NAME=SPEC[,SPEC...]`, e.g.
    /// `--task xray=cnn:runs/xray,llm:openai/gpt-4o --task mri=cnn:runs/brain`. The uploader
    /// picks the task, or a DICOM's Modality and Body Part Examined pick it (CR/DX: xray,
    /// MR: mri, CT: ct); an image whose header contradicts its task is flagged, not classified.
    /// A task named xray, mri or ct has that modality.
    #[arg(long = "task", value_name = "NAME=SPECS", conflicts_with = "classifiers")]
    pub tasks: Vec<String>,
    /// Tasks from a TOML file: `[[task]]` tables with `name`, `classifiers` and optional
    /// `modality`.
    #[arg(long = "tasks", value_name = "FILE", conflicts_with_all = ["classifiers", "tasks"])]
    pub tasks_file: Option<PathBuf>,
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
    /// Cascades tell their LLM the first model's two most probable labels and confidences,
    /// as a marked second opinion in the prompt.
    #[arg(long)]
    pub cascade_context: bool,
    /// Environment variable holding the LLM API key (read here; never sent to the browser).
    #[arg(long, default_value = "OPENAI_API_KEY", value_name = "NAME")]
    pub api_key_env: String,
    /// Per-request timeout for LLM calls, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub llm_timeout: f64,
    /// Deadline for one LLM's answer on one case, retries included, in seconds; past it the
    /// card says `timed-out` and the other answers stand.
    #[arg(long, default_value_t = 180.0)]
    pub llm_deadline: f64,
    /// Deadline for one CNN's answer on one case, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub cnn_deadline: f64,
    /// Cases classified at the same time; further uploads get 503 until one finishes.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent_cases: usize,
    /// Memory for recent cases' images and Grad-CAM overlays, in megabytes (oldest go first).
    #[arg(long, default_value_t = 256)]
    pub image_cache_mb: usize,
    /// Longest time one request may take, reading the upload included, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Time a client has to send its request headers, in seconds, before the connection is
    /// closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// CPU TDP in watts for the CPU-time energy estimate, instead of the table value.
    #[arg(long, value_name = "W")]
    pub tdp: Option<f64>,
    /// Named users: a TOML file of `[[users]]` entries (name, role `physician` or `viewer`,
    /// argon2id `secret`), made with `mica users add`. Physicians record decisions, viewers
    /// read; each decision records the signed-in user.
    #[arg(long, value_name = "FILE")]
    pub users: Option<PathBuf>,
    /// Take the user's name from this request header (e.g. X-Remote-User), set by an
    /// authenticating reverse proxy; believed only from --trusted-proxy addresses.
    #[arg(long, value_name = "HEADER", requires = "trusted_proxy")]
    pub trusted_user_header: Option<String>,
    /// Addresses of the reverse proxy allowed to set --trusted-user-header (comma-separated).
    #[arg(long, value_name = "IP[,IP]", value_delimiter = ',')]
    pub trusted_proxy: Vec<std::net::IpAddr>,
    /// A host name this server is reached by (repeatable; `localhost` and IP literals are
    /// always accepted). Requests naming any other host are refused (DNS rebinding).
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Serve without any authentication on a non-loopback address (refused otherwise).
    #[arg(long)]
    pub allow_open: bool,
    /// A TLS-terminating proxy is in front: session cookies are marked `Secure`.
    #[arg(long)]
    pub behind_tls: bool,
    /// Hours a signed-in session may stay unused before it ends.
    #[arg(long, default_value_t = 8.0, value_name = "H")]
    pub session_idle_hours: f64,
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
    // Set but empty or short is refused (App::new), never read as "no authentication".
    let token = std::env::var(TOKEN_ENV).ok();
    if let Some(t) = &token {
        mica_server::security::check_token(t).map_err(usage)?;
    }
    if !args.trusted_proxy.is_empty() && args.trusted_user_header.is_none() {
        return Err(usage("--trusted-proxy is only used with --trusted-user-header"));
    }
    if !(args.session_idle_hours > 0.0 && args.session_idle_hours.is_finite() && args.session_idle_hours <= 24.0) {
        return Err(usage("--session-idle-hours must be above 0 and at most 24"));
    }
    let authenticated = token.is_some() || args.users.is_some() || args.trusted_user_header.is_some();
    mica_server::security::check_exposure(addr.ip(), authenticated, args.allow_open).map_err(usage)?;
    let users = match &args.users {
        Some(p) => Some(mica_server::auth::Users::load(p).map_err(|e| usage(e.to_string()))?),
        None => None,
    };
    let access = mica_server::AccessConfig {
        users,
        proxy: args.trusted_user_header.as_ref().map(|h| mica_server::auth::TrustedProxy {
            header: h.trim().to_ascii_lowercase(),
            peers: args.trusted_proxy.clone(),
        }),
        allowed_hosts: args.allowed_hosts.clone(),
        secure_cookies: args.behind_tls,
        session_idle: Some(Duration::from_secs_f64(args.session_idle_hours * 3600.0)),
    };
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
        cascade_context: args.cascade_context,
        ..LlmOptions::default()
    };
    let meter = super::energy::EnergyOpts { tdp: args.tdp, ..Default::default() }.meter_config()?;
    for (flag, v) in [("--llm-deadline", args.llm_deadline), ("--cnn-deadline", args.cnn_deadline), ("--request-timeout", args.request_timeout), ("--header-timeout", args.header_timeout)] {
        if !(v > 0.0 && v.is_finite() && v <= 86_400.0) {
            return Err(usage(format!("{flag} must be a positive number of seconds (at most a day)")));
        }
    }
    if args.max_concurrent_cases == 0 || args.image_cache_mb == 0 {
        return Err(usage("--max-concurrent-cases and --image-cache-mb must be above 0"));
    }
    let tasks: Vec<TaskSpec> = if let Some(f) = &args.tasks_file {
        mica_server::read_tasks_file(f).map_err(config_err)?
    } else if !args.tasks.is_empty() {
        args.tasks.iter().map(|t| TaskSpec::parse(t)).collect::<Result<_, _>>().map_err(config_err)?
    } else {
        Vec::new()
    };
    if !tasks.is_empty() && modality.is_some() {
        return Err(usage("--modality applies to --classifier; give each task's modality in its name or in the tasks file"));
    }
    let tasks = if tasks.is_empty() {
        let panel = Panel::load(&args.classifiers, modality, &llm, &meter).map_err(config_err)?;
        vec![mica_server::Task { name: panel.modality.as_str().to_string(), panel: std::sync::Arc::new(panel) }]
    } else {
        mica_server::load_tasks(&tasks, &llm, &meter).map_err(config_err)?
    };
    for t in &tasks {
        for m in &t.panel.members {
            eprintln!(
                "task {}: classifier {} ({}): {}{}",
                t.name,
                m.name,
                m.family,
                m.model_version,
                if m.remote { " [sends images off this machine]" } else { "" }
            );
        }
    }
    for l in tasks[0].panel.meter_lines() {
        eprintln!("energy: {l}");
    }
    let settings = Settings {
        max_upload_bytes: (args.max_upload_mb * 1024.0 * 1024.0) as usize,
        review_threshold: args.review_threshold,
        token: token.clone(),
    };
    let options = ServeOptions {
        cnn_deadline: Duration::from_secs_f64(args.cnn_deadline),
        llm_deadline: Duration::from_secs_f64(args.llm_deadline),
        max_concurrent_cases: args.max_concurrent_cases,
        image_cache_bytes: args.image_cache_mb.saturating_mul(1 << 20),
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        header_read_timeout: Duration::from_secs_f64(args.header_timeout),
    };
    let app = App::with_tasks(tasks, store, settings, options)
        .and_then(|a| a.with_access(access))
        .map_err(config_err)?;
    let auth_line = match (&token, &args.users, &args.trusted_user_header) {
        (Some(_), _, _) => format!("bearer token required ({TOKEN_ENV}); browsers sign in at /sign-in"),
        (None, Some(p), None) => format!("named users from {}; sign in at /sign-in", p.display()),
        (None, Some(p), Some(h)) => format!("users from the {h} header of the trusted proxy, roles from {}", p.display()),
        (None, None, Some(h)) => format!("users from the {h} header of the trusted proxy"),
        (None, None, None) if args.allow_open && !addr.ip().is_loopback() => "NO AUTHENTICATION on a network address (--allow-open)".to_string(),
        (None, None, None) => format!("no authentication ({TOKEN_ENV}, --users and --trusted-user-header are not set; loopback only)"),
    };
    mica_server::run(app, addr, |local| {
        let url = format!("http://{local}");
        eprintln!(
            "mica serve: decision support on {url} (results store {}); {}; Ctrl-C stops",
            store_path.display(),
            auth_line
        );
        println!("{url}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
