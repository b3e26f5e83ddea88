//! `mica compare`: every classifier of an experiment on one split, one table.
//!
//! All logic lives in `mica-run` (the run) and `mica-report` (the report); this module turns
//! flags into an [`Experiment`], draws progress bars and prints the headline table.
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use mica_run::{DatasetSpec, EnergySpec, EvalSpec, Event, Experiment, RunOptions};

use crate::exit::usage;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Print every training epoch's figures (by default a progress bar per classifier and one
    /// line when training ends).
    #[arg(short, long)]
    pub verbose: bool,
    /// Experiment TOML file (see experiments/). Flags below override or replace it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Quick use without a file: the dataset folder.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Quick use: a classifier (repeatable): cnn:RUN_DIR, cnn-train:ARCH, llm:PROVIDER/MODEL,
    /// onnx:PATH.onnx, baseline.
    #[arg(long = "classifier", value_name = "SPEC")]
    pub classifiers: Vec<String>,
    /// Filter for the --classifier LLMs (none, default, or a stage list).
    #[arg(long)]
    pub filter: Option<String>,
    /// Context mode for the --classifier LLMs.
    #[arg(long)]
    pub context: Option<String>,
    #[command(flatten)]
    pub context_columns: super::classify::ContextArgs,
    /// Epochs for cnn-train: classifiers.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Run directory (default: the experiment's `output`, else runs/<dataset name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Split seed (quick use).
    #[arg(long)]
    pub seed: Option<u64>,
    /// At most N test images per class, for every classifier.
    #[arg(long)]
    pub limit_per_class: Option<usize>,
    /// Input side in pixels for trained CNNs.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Process slice K of N of the test images (1-based), e.g. 2/8 for a Slurm array task;
    /// `mica report RUN_DIR` merges the shards.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long)]
    pub bootstrap: Option<usize>,
    #[command(flatten)]
    pub energy: super::energy::EnergyOpts,
    /// Results store (SQLite); default $MICA_STORE or ~/.local/share/mica/runs.sqlite.
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Do not index the run in the results store.
    #[arg(long)]
    pub no_store: bool,
    /// Do not write report.html / report.md at the end.
    #[arg(long)]
    pub no_report: bool,
    /// On resume, keep images recorded as failed instead of asking them again.
    #[arg(long)]
    pub keep_failed: bool,
}

/// Builds the experiment from `--config` and the quick flags.
pub fn experiment(args: &CompareArgs) -> anyhow::Result<Experiment> {
    let mut exp = match &args.config {
        Some(p) => {
            if !p.is_file() {
                return Err(usage(format!("{}: experiment file not found", p.display())));
            }
            Experiment::load(p).map_err(|e| usage(e.to_string()))?
        }
        None => {
            let Some(ds) = &args.dataset else {
                return Err(usage(
                    "give --config EXPERIMENT.toml, or --dataset DIR with one or more --classifier SPEC",
                ));
            };
            Experiment {
                name: None,
                output: None,
                dataset: DatasetSpec::new(ds),
                classifiers: Vec::new(),
                energy: EnergySpec::default(),
                eval: EvalSpec::default(),
            }
        }
    };
    if args.config.is_some() {
        if let Some(ds) = &args.dataset {
            exp.dataset.path = ds.clone();
        }
    }
    if !args.classifiers.is_empty() {
        let mut specs = Vec::new();
        for c in &args.classifiers {
            let mut s = Experiment::classifier_from_flag(c).map_err(usage)?;
            if s.kind == mica_run::Kind::Llm {
                s.filter = args.filter.clone();
                s.context = args.context.clone();
            }
            if s.kind == mica_run::Kind::Cnn {
                s.epochs = args.epochs;
            }
            specs.push(s);
        }
        exp.classifiers = specs;
    }
    if let Some(o) = &args.out {
        exp.output = Some(o.clone());
    }
    if let Some(s) = args.seed {
        exp.dataset.seed = s;
    }
    if let Some(l) = args.limit_per_class {
        exp.dataset.limit_per_class = Some(l);
    }
    if let Some(s) = args.image_size {
        exp.dataset.image_size = Some(s);
    }
    if !args.context_columns.context_columns.is_empty() {
        exp.dataset.context_columns = args.context_columns.context_columns.clone();
    }
    if args.context_columns.allow_label_like_context {
        exp.dataset.allow_label_like_context = true;
    }
    if let Some(b) = args.bootstrap {
        exp.eval.bootstrap_resamples = b;
    }
    let e = &args.energy;
    if e.country.is_some() {
        exp.energy.country = e.country.clone();
    }
    if e.grid_intensity.is_some() {
        exp.energy.grid_intensity = e.grid_intensity;
    }
    if e.pue.is_some() {
        exp.energy.pue = e.pue;
    }
    if e.tdp.is_some() {
        exp.energy.tdp_w = e.tdp;
    }
    if e.electricity_price.is_some() {
        exp.energy.electricity_usd_per_kwh = e.electricity_price;
    }
    if !exp.dataset.path.exists() {
        return Err(usage(format!("{}: dataset folder not found", exp.dataset.path.display())));
    }
    exp.validate().map_err(|m| match &args.config {
        Some(p) => usage(format!("{}: {m}", p.display())),
        None => usage(m),
    })?;
    Ok(exp)
}

/// Runs an experiment with progress bars on stderr; shared with `mica demo`.
///
/// One progress bar per classifier: a CNN trained for the run first shows its epochs, then its
/// images. Each epoch's figures are printed only with `verbose`; otherwise one line per trained
/// CNN says how training ended, so a log without a terminal still records it.
pub fn run_with_progress(exp: &Experiment, opts: &RunOptions, verbose: bool) -> anyhow::Result<mica_run::RunOutcome> {
    let style = ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})")
        .expect("valid template")
        .progress_chars("=> ");
    let train_style = ProgressStyle::with_template("{prefix:>28} [{bar:30}] epoch {pos}/{len} {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    // (slug, bar, last epoch line) of the CNN being trained.
    let mut training: Option<(String, ProgressBar, String)> = None;
    // The same warning (world-average grid, TDP estimate) applies to every classifier: say it once.
    let mut warned: std::collections::HashSet<String> = std::collections::HashSet::new();
    let result = mica_run::run_experiment(exp, opts, &mut |e| match e {
        Event::Notice(m) => say(&bar, format!("note: {m}")),
        Event::Epoch { slug, name, epoch, epochs, line } => {
            if training.as_ref().is_none_or(|(s, _, _)| *s != slug) {
                let b = ProgressBar::new(epochs as u64);
                b.set_style(train_style.clone());
                b.set_prefix(format!("{slug} training"));
                training = Some((slug.clone(), b, String::new()));
            }
            // The image bar of this classifier waits, hidden, while it trains.
            if let Some(b) = &bar {
                b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let (_, b, last) = training.as_mut().expect("set above");
            b.set_position(epoch as u64);
            b.set_message(line.clone());
            if verbose {
                b.suspend(|| eprintln!("{name}: {line}"));
            }
            *last = format!("epoch {epoch}/{epochs}: {line}");
        }
        Event::Energy { slug, summary, warnings } => {
            end_training(&mut training, &bar);
            say(&bar, format!("{slug}: {summary}"));
            for w in warnings {
                if warned.insert(w.clone()) {
                    say(&bar, format!("warning: {w}"));
                }
            }
        }
        Event::Start { slug, total, todo, .. } => {
            if todo < total {
                eprintln!("{slug}: resuming, {} of {total} images already done", total - todo);
            }
            let b = ProgressBar::new(total as u64);
            b.set_style(style.clone());
            b.set_prefix(slug);
            b.set_position((total - todo) as u64);
            bar = Some(b);
        }
        Event::Progress { done, .. } => {
            end_training(&mut training, &bar);
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        }
        Event::Done { slug, reused } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            if reused {
                eprintln!("{slug}: finished in an earlier run, reused");
            } else {
                eprintln!("{slug}: done");
            }
        }
    });
    if let Some(b) = bar.take() {
        b.abandon();
    }
    result.map_err(|e| if e.is_usage() { usage(e.to_string()) } else { anyhow::Error::new(e) })
}

/// Closes the training bar of a CNN that has finished training (its images are being
/// classified now) with one line saying how training ended, and shows its image bar again.
fn end_training(training: &mut Option<(String, ProgressBar, String)>, bar: &Option<ProgressBar>) {
    if let Some((slug, b, last)) = training.take() {
        b.finish_and_clear();
        eprintln!("{slug}: trained, {last}");
        if let Some(b) = bar {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }
}

fn say(bar: &Option<ProgressBar>, line: String) {
    match bar {
        Some(b) => b.suspend(|| eprintln!("{line}")),
        None => eprintln!("{line}"),
    }
}

/// A run in which some classifier answered nothing at all (every image failed) is not a
/// success, whatever else it wrote: exit 1 with what went wrong.
pub fn fail_if_nothing_answered(outcome: &mica_run::RunOutcome) -> anyhow::Result<()> {
    let dead: Vec<String> = outcome
        .classifiers
        .iter()
        .filter(|c| c.all_failed())
        .map(|c| format!("{} ({} images)", c.name, c.images))
        .collect();
    if dead.is_empty() {
        return Ok(());
    }
    let first_error = outcome
        .classifiers
        .iter()
        .filter(|c| c.all_failed())
        .find_map(|c| {
            mica_core::read_predictions(mica_core::ClassifierDir::new(&c.dir).predictions())
                .ok()?
                .into_iter()
                .find_map(|p| p.error)
        })
        .unwrap_or_default();
    anyhow::bail!(
        "every image failed for {}: {first_error} (fix the cause and run the same command again: failed images are asked again)",
        dead.join(", ")
    )
}

/// What one classifier's run gave, in a few lines (`mica classify`).
pub fn print_classifier(m: &mica_eval::RunMetrics, c: &mica_run::ClassifierOutcome) {
    if m.simulated {
        println!("SIMULATED: answers came from `mica llm-sim`, not a model; these numbers are a dry run.");
    }
    let o = &m.outcomes;
    println!(
        "{}: {} images: {} answered, {} deferred to a physician, {} refused, {} unparseable, {} failed",
        m.classifier, m.images, o.answered, o.deferred, o.refused, o.unparseable, o.failed
    );
    println!(
        "accuracy {:.3} over all images (no answer = wrong), macro F1 {:.3}{}; coverage {:.3}{}",
        m.all.accuracy,
        m.all.macro_f1,
        m.answered.as_ref().map_or(String::new(), |r| format!(", {:.3} over answered", r.accuracy)),
        m.coverage,
        m.accepted.as_ref().map_or(String::new(), |r| format!(", accuracy {:.3} on accepted cases", r.accuracy)),
    );
    println!("{} of {} flagged for physician review", c.needs_review, m.images);
    if c.asked > 0 {
        if let (Some(t), Some(l)) = (m.throughput_images_per_s, &m.latency_ms) {
            println!(
                "throughput {t:.1} images/s; latency per image p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
                l.p50, l.p90, l.p99
            );
        }
    }
    let Some(llm) = m.extra.get("llm") else { return };
    let Ok(s) = serde_json::from_value::<mica_llm::LlmSummary>(llm.clone()) else { return };
    for l in s.stage_lines() {
        println!("  filter {l}");
    }
    let ps: Vec<String> = s.parse_stages.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
    println!("  parsed by: {}", ps.join(", "));
    let cost = match (&s.cost_usd, &s.price) {
        (Some(cost), Some(p)) => format!(
            "${cost:.4} (${:.5}/image; {} at ${}/${} per 1M in/out tokens, as of {})",
            s.cost_usd_per_image.unwrap_or(0.0),
            p.key,
            p.entry.input_per_million,
            p.entry.output_per_million,
            p.entry.as_of
        ),
        _ => "unknown (no price entry)".into(),
    };
    println!("  tokens {} in / {} out; cost {cost}", s.prompt_tokens, s.completion_tokens);
    // This invocation's requests: none when everything was finished before.
    let run: mica_llm::RunStats = match (c.reused, m.extra.get("llm_run")) {
        (false, Some(v)) => serde_json::from_value(v.clone()).unwrap_or_default(),
        _ => mica_llm::RunStats::default(),
    };
    println!(
        "  {} requests, {} retries, {} cache hits, {} resumed",
        run.http_requests,
        run.retries,
        run.cache_hits,
        c.images - c.asked
    );
}

pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let exp = experiment(&args)?;
    let shard = match &args.shard {
        Some(s) => Some(mica_report::parse_shard(s).map_err(usage)?),
        None => None,
    };
    let store = if args.no_store {
        None
    } else {
        args.store.clone().or_else(mica_report::default_store_path)
    };
    let opts = RunOptions {
        shard,
        report: !args.no_report,
        store,
        command: Some(std::env::args().collect::<Vec<_>>().join(" ")),
        failed: if args.keep_failed { mica_core::FailedOnResume::Keep } else { mica_core::FailedOnResume::Retry },
        meter: args.energy.meter_config()?,
        ..Default::default()
    };
    let outcome = run_with_progress(&exp, &opts, args.verbose)?;
    if let Some((k, n)) = shard {
        println!(
            "shard {k}/{n}: {} test images done in {}; when every shard is done, run `mica report {}`",
            outcome.test_images,
            outcome.work_dir.display(),
            outcome.dir.display()
        );
        return Ok(());
    }
    let (_, cmp) = mica_report::load(&outcome.dir)?;
    print!("{}", mica_report::headline_text(&cmp));
    if let Some(id) = outcome.store_id {
        println!("indexed as run {id} in the results store (mica runs show {id})");
    }
    match &outcome.report {
        Some(r) => println!("report: {}", r.display()),
        None => println!("run directory: {} (mica report {} --format html)", outcome.dir.display(), outcome.dir.display()),
    }
    fail_if_nothing_answered(&outcome)
}
