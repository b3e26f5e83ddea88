//! The run loop: one split, every classifier on the same images, each in its own energy
//! window, resumable at any point, shardable across machines, and stopped early when a
//! provider refuses every request the same way.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mica_core::{ClassifierDir, Dataset, FailedOnResume, Outcome, Prediction, PredictionLog, RunManifest, RunRoot, Sample};
use mica_energy::{CarbonConfig, EnergyReport, MeterConfig, MeterSet};
use mica_eval::RunMetrics;
use serde::{Deserialize, Serialize};

use crate::experiment::{ClassifierConfig, Experiment};
use crate::factory::{self, BuildContext};
use crate::select::{cap_per_class, prepare, select};
use crate::RunError;

/// How many first answers must all fail the same permanent way before a run stops.
pub const FAIL_FAST_AFTER: usize = 4;

/// Where a classifier's files go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `<root>/<slug>/...`: a comparison (`mica compare`, `mica demo`).
    #[default]
    Comparison,
    /// `<root>/...`: one classifier (`mica classify`); the run must have exactly one.
    Flat,
}

/// How a run is carried out (not part of the experiment itself).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Process only slice `k` of `n` (1-based) of the images.
    pub shard: Option<(usize, usize)>,
    /// Write report.html and report.md when the (unsharded) run finishes.
    pub report: bool,
    /// Index the finished run in this results store.
    pub store: Option<PathBuf>,
    /// The command line, recorded in the manifest.
    pub command: Option<String>,
    pub layout: Layout,
    /// What a resumed run does with images that failed before (default: ask again).
    pub failed: FailedOnResume,
    /// Energy meters (the experiment's `tdp_w` wins over `meter.tdp_w`).
    pub meter: MeterConfig,
}

/// What the run reports while it works; the CLI draws progress bars from these.
#[derive(Debug, Clone)]
pub enum Event {
    Notice(String),
    /// One training epoch of a CNN trained for the run: `epoch` of at most `epochs` (early
    /// stopping may end sooner), with the epoch's figures as one line.
    Epoch { slug: String, name: String, epoch: usize, epochs: usize, line: String },
    /// A classifier starts: `todo` of `total` images remain (the rest were done before).
    Start { slug: String, name: String, total: usize, todo: usize },
    Progress { slug: String, done: usize, total: usize },
    /// The energy of one window, as one line plus its warnings.
    Energy { slug: String, summary: String, warnings: Vec<String> },
    /// A classifier is finished; `reused` when nothing had to be redone.
    Done { slug: String, reused: bool },
}

/// One classifier's result in this run.
#[derive(Debug, Clone)]
pub struct ClassifierOutcome {
    pub slug: String,
    pub name: String,
    pub dir: PathBuf,
    /// Images with a recorded prediction.
    pub images: usize,
    /// Images asked in this invocation.
    pub asked: usize,
    pub failed: usize,
    /// Cases flagged for physician review.
    pub needs_review: usize,
    /// Finished in an earlier run; nothing was asked.
    pub reused: bool,
}

impl ClassifierOutcome {
    /// Every image failed: the run produced no answer at all, whatever else it did.
    pub fn all_failed(&self) -> bool {
        self.images > 0 && self.failed == self.images
    }
}

/// The result of [`run_experiment`].
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run directory (`runs/<name>`); shards write below `shards/<k>-of-<n>/`.
    pub dir: PathBuf,
    /// Where this invocation's classifier directories are.
    pub work_dir: PathBuf,
    pub test_images: usize,
    pub classifiers: Vec<ClassifierOutcome>,
    /// `report.html`, when written.
    pub report: Option<PathBuf>,
    /// Id in the results store, when indexed.
    pub store_id: Option<i64>,
}

/// Runs every classifier of `exp`, writes the run directory and (unless sharded) the report.
pub fn run_experiment(
    exp: &Experiment,
    opts: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<RunOutcome, RunError> {
    exp.validate().map_err(RunError::Invalid)?;
    if opts.layout == Layout::Flat && exp.classifiers.len() != 1 {
        return Err(RunError::Invalid("a single-classifier run takes exactly one classifier".into()));
    }
    let root = RunRoot::new(exp.output_dir());
    let work = match opts.shard {
        Some((k, n)) => root.shard(k, n),
        None => root.clone(),
    };
    // One writer per directory: a second process is refused before it reads anything.
    let _lock = work.lock()?;
    let carbon = CarbonConfig::resolve(exp.energy.country.as_deref(), exp.energy.grid_intensity, exp.energy.pue)
        .map_err(|e| RunError::Invalid(format!("[energy]: {e}")))?;
    if let Some(w) = carbon.warning() {
        progress(Event::Notice(w));
    }

    // 1. One split for everyone, pinned in split.csv so a resumed run (or another shard)
    //    classifies exactly the same images.
    let with_context = exp.classifiers.iter().any(|c| c.uses_clinical_context());
    if !with_context && !exp.dataset.context_columns.is_empty() {
        return Err(RunError::Invalid(
            "context columns are given, but no classifier is an LLM with context `image+clinical`".into(),
        ));
    }
    let ds = prepare(&exp.dataset, &root, with_context, &mut |n| progress(Event::Notice(n)))?;
    if !ds.label_like_context.is_empty() {
        progress(Event::Notice(format!(
            "LABEL-LIKE CONTEXT: columns [{}] name or imply the class and reach the prompt because --allow-label-like-context was given; every figure of this run is stamped",
            ds.label_like_context.join(", ")
        )));
    }
    // The split's provenance: the SHA-256 of split.csv as written (`sha256sum split.csv`).
    let split_path = root.split();
    let split_sha256 = sha256_file(&split_path)?;
    let split_hash = mica_data::split::fingerprint(&ds);
    let chosen = select(&ds, exp.dataset.split, exp.dataset.limit_per_class, exp.dataset.seed);
    if chosen.is_empty() {
        return Err(RunError::Invalid(format!(
            "{}: the {} split has no images",
            exp.dataset.path.display(),
            exp.dataset.split
        )));
    }
    let mine: Vec<Sample> = match opts.shard {
        Some((k, n)) => chosen.iter().enumerate().filter(|(i, _)| i % n == k - 1).map(|(_, s)| s.clone()).collect(),
        None => chosen.clone(),
    };

    // 2. The manifest: written once, checked on every resume.
    write_or_check_manifest(exp, opts, &root, &ds, (&split_hash, &split_sha256), chosen.len())?;

    // 3. Every classifier in turn.
    let mut meter = opts.meter.clone();
    if exp.energy.tdp_w.is_some() {
        meter.tdp_w = exp.energy.tdp_w;
    }
    let mut results = Vec::new();
    for cfg in &exp.classifiers {
        let slug = cfg.slug();
        let subset = match cfg.limit_per_class {
            None => mine.clone(),
            Some(l) => {
                // Drawn from the whole selection (so shards agree), then cut to this shard.
                let keep: HashSet<String> = cap_per_class(&chosen, l, exp.dataset.seed).into_iter().map(|s| s.id).collect();
                mine.iter().filter(|s| keep.contains(&s.id)).cloned().collect()
            }
        };
        let files = match opts.layout {
            Layout::Flat => work.flat(),
            Layout::Comparison => work.classifier(&slug),
        };
        let job = Job { exp, cfg, slug: &slug, ds: &ds, root: &root, files: &files, carbon: &carbon, meter: &meter, opts };
        results.push(run_classifier(&job, &subset, progress)?);
    }

    // 4. Report and index, unless this is one shard of many.
    let mut outcome = RunOutcome {
        dir: root.path().to_path_buf(),
        work_dir: work.path().to_path_buf(),
        test_images: mine.len(),
        classifiers: results,
        report: None,
        store_id: None,
    };
    if opts.shard.is_none() && (opts.report || opts.store.is_some()) {
        let (run, cmp) = mica_report::load(root.path())?;
        if opts.report {
            mica_report::render::write_report(&run, &cmp, mica_report::Format::Markdown)?;
            outcome.report = Some(mica_report::render::write_report(&run, &cmp, mica_report::Format::Html)?);
        }
        if let Some(store) = &opts.store {
            let mut st = mica_report::Store::open(store)?;
            outcome.store_id = Some(st.index(&run, &cmp)?);
        }
    }
    Ok(outcome)
}

fn write_or_check_manifest(
    exp: &Experiment,
    opts: &RunOptions,
    root: &RunRoot,
    ds: &Dataset,
    (split_hash, split_sha256): (&str, &str),
    images: usize,
) -> Result<(), RunError> {
    let path = root.manifest();
    let slugs: Vec<String> = exp.classifiers.iter().map(|c| c.slug()).collect();
    let config_err = |message: String| RunError::Config { path: path.clone(), message };
    if path.is_file() {
        let bytes = std::fs::read(&path).map_err(RunError::io(&path))?;
        let old: RunManifest =
            serde_json::from_slice(&bytes).map_err(|e| config_err(format!("not a mica run manifest: {e}")))?;
        // Runs from before the SHA-256 recorded only the FNV fingerprint.
        let (old_hash, now) = match old.config.get("split_sha256").and_then(|v| v.as_str()) {
            Some(h) => (h, split_sha256),
            None => (old.config.get("split_hash").and_then(|v| v.as_str()).unwrap_or(""), split_hash),
        };
        if old_hash != now {
            return Err(config_err(format!(
                "this run used split {old_hash}, the experiment now gives {now}; use a new output directory"
            )));
        }
        let old_exp: Experiment = match old.config.get("experiment") {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| config_err(format!("the recorded experiment does not read back ({e}); use a new output directory")))?,
            None => return Err(config_err("the manifest records no experiment; use a new output directory".into())),
        };
        // The per-class limit only chooses how many images: raising it extends the run.
        let same_data = |a: &Experiment| crate::experiment::DatasetSpec { limit_per_class: None, ..a.dataset.clone() };
        if same_data(&old_exp) != same_data(exp) || old_exp.eval != exp.eval {
            return Err(config_err(
                "the experiment's dataset or evaluation settings changed since this run started; use a new output directory".into(),
            ));
        }
        let mut all: Vec<String> = match old.config.get("classifier_slugs") {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| config_err(format!("`classifier_slugs`: {e}")))?,
            None => Vec::new(),
        };
        let new: Vec<&String> = slugs.iter().filter(|s| !all.contains(s)).collect();
        if !new.is_empty() {
            // Adding classifiers to a finished run is fine: record them.
            all.extend(new.into_iter().cloned());
            let mut merged = old_exp.clone();
            for c in &exp.classifiers {
                if !merged.classifiers.iter().any(|o| o.slug() == c.slug()) {
                    merged.classifiers.push(c.clone());
                }
            }
            let mut m = old.clone();
            m.config["classifier_slugs"] = serde_json::json!(all);
            m.config["experiment"] = serde_json::to_value(&merged).expect("experiment serialises");
            write_json(&path, &m)?;
        }
        return Ok(());
    }
    let shortcuts = mica_data::shortcut::check_dataset(ds);
    // The report cannot read mica-data's types, so the plain-words warnings travel as text.
    let shortcut_warnings: Vec<String> = shortcuts.iter().filter(|c| c.flagged).map(|c| c.sentence()).collect();
    let m = RunManifest {
        mica_version: env!("CARGO_PKG_VERSION").to_string(),
        // A spec's URL on the command line may carry user-info or a token in its query.
        command: mica_llm::spec::redact_url(opts.command.as_deref().unwrap_or("mica compare")),
        dataset: exp.dataset.path.clone(),
        split_manifest: Some(root.split().file_name().map(PathBuf::from).unwrap_or_default()),
        seed: Some(exp.dataset.seed),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        created_utc: Some(mica_core::time::iso_utc(std::time::SystemTime::now())),
        machine: mica_core::machine::describe(),
        config: serde_json::json!({
            "experiment": exp,
            "classifier_slugs": slugs,
            "split_sha256": split_sha256,
            "split_sha256_of": "split.csv",
            "layout": ds.layout.as_str(),
            "modality": ds.modality.as_str(),
            "labels": ds.labels.names(),
            "test_images": images,
            "eval": exp.eval.options(),
            // What may reach a prompt besides the image: metadata columns (label-like ones
            // only by explicit request) and the acquisition properties in the findings text
            // (none: size, bit depth and format are left out because they can carry the class).
            "context_columns": ds.context_columns,
            "label_like_context": ds.label_like_context,
            "findings_acquisition_properties": Vec::<String>::new(),
            // Acquisition properties that alone predict the class (a shortcut, not disease).
            "shortcuts": shortcuts,
            "shortcut_warnings": shortcut_warnings,
        }),
    };
    write_json(&path, &m)
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), RunError> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("serialises");
    bytes.push(b'\n');
    Ok(mica_core::write_atomic(path, &bytes)?)
}

/// One energy window of one invocation (a resumed classifier has several).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Window {
    images: usize,
    /// Images asked live in the window (the rest were replayed from the response cache);
    /// absent in windows written before replays were told apart.
    #[serde(default)]
    live: Option<usize>,
    /// Latency of the window's first image (not failed): its cold start.
    #[serde(default)]
    first_latency_ms: Option<f64>,
    seconds: f64,
    report: Option<EnergyReport>,
}

/// Everything [`run_classifier`] works with.
struct Job<'a> {
    exp: &'a Experiment,
    cfg: &'a ClassifierConfig,
    slug: &'a str,
    ds: &'a Dataset,
    root: &'a RunRoot,
    files: &'a ClassifierDir,
    carbon: &'a CarbonConfig,
    meter: &'a MeterConfig,
    opts: &'a RunOptions,
}

/// What decides a classifier's answers, recorded in `classifier.json` and checked on resume.
/// Pacing (concurrency, rate limits, retries, timeouts, cache, batch) is left out: it changes
/// how fast answers come, not what they are. Files named by the entry are recorded by content.
fn answer_config(cfg: &ClassifierConfig) -> Result<serde_json::Value, RunError> {
    let mut c = cfg.clone();
    c.batch = None;
    c.limit_per_class = None;
    c.llm.concurrency = None;
    c.llm.rpm = None;
    c.llm.tpm = None;
    c.llm.max_attempts = None;
    c.llm.request_timeout = None;
    c.llm.no_cache = None;
    c.llm.cache_dir = None;
    let mut v = serde_json::json!({ "classifier": cfg.display_name(), "entry": c });
    if let Some(t) = &cfg.template {
        v["template_sha256"] = sha256_file(Path::new(t))?.into();
    }
    if let Some(p) = &cfg.llm.prices {
        v["prices_sha256"] = sha256_file(p)?.into();
    }
    Ok(v)
}

/// Hex SHA-256 of a file's bytes (what `sha256sum` prints).
fn sha256_file(path: &Path) -> Result<String, RunError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(RunError::io(path))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

/// Refuses to resume a classifier whose answers were given with other settings; returns what
/// to record once the classifier is built.
fn check_config(files: &ClassifierDir, cfg: &ClassifierConfig) -> Result<serde_json::Value, RunError> {
    let path = files.config();
    let now = answer_config(cfg)?;
    if path.is_file() {
        let bytes = std::fs::read(&path).map_err(RunError::io(&path))?;
        let before: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| RunError::Config {
            path: path.clone(),
            message: format!("not valid JSON ({e}); use another output directory"),
        })?;
        if before != now {
            let mut diff = Vec::new();
            let (b, n) = (&before["entry"], &now["entry"]);
            for k in n.as_object().into_iter().flatten().map(|(k, _)| k).chain(b.as_object().into_iter().flatten().map(|(k, _)| k)) {
                if b.get(k) != n.get(k) && !diff.contains(k) {
                    diff.push(k.clone());
                }
            }
            for k in ["template_sha256", "prices_sha256"] {
                if before.get(k) != now.get(k) {
                    diff.push(k.trim_end_matches("_sha256").to_string() + " file content");
                }
            }
            return Err(RunError::Config {
                path: files.path().to_path_buf(),
                message: format!(
                    "this run directory holds a run with different settings ({}); use another output directory",
                    diff.join(", ")
                ),
            });
        }
    }
    Ok(now)
}

fn run_classifier(job: &Job, samples: &[Sample], progress: &mut dyn FnMut(Event)) -> Result<ClassifierOutcome, RunError> {
    let (cfg, slug, ds, files) = (job.cfg, job.slug, job.ds, job.files);
    let name = cfg.display_name();
    let pred_path = files.predictions();
    let wanted: HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    let config = check_config(files, cfg)?;
    let (mut log, _) = PredictionLog::open_with(&pred_path, job.opts.failed)?;
    let todo: Vec<Sample> = samples.iter().filter(|s| !log.is_done(&name, &s.id)).cloned().collect();
    let outcome = |preds: &[Prediction], asked: usize, reused: bool| ClassifierOutcome {
        slug: slug.to_string(),
        name: name.clone(),
        dir: files.path().to_path_buf(),
        images: preds.len(),
        asked,
        failed: preds.iter().filter(|p| p.outcome == Outcome::Failed).count(),
        needs_review: preds.iter().filter(|p| p.needs_review).count(),
        reused,
    };
    if todo.is_empty() && files.is_finished() {
        drop(log);
        progress(Event::Done { slug: slug.to_string(), reused: true });
        return Ok(outcome(&log_predictions(&pred_path, &wanted)?, 0, true));
    }
    progress(Event::Start {
        slug: slug.to_string(),
        name: name.clone(),
        total: samples.len(),
        todo: todo.len(),
    });

    let windows_path = files.energy_windows();
    let mut windows: Vec<Window> = if windows_path.is_file() {
        let bytes = std::fs::read(&windows_path).map_err(RunError::io(&windows_path))?;
        serde_json::from_slice(&bytes).map_err(|e| RunError::Config {
            path: windows_path.clone(),
            message: format!("unreadable energy windows: {e}"),
        })?
    } else {
        Vec::new()
    };
    let mut simulated = cfg.simulated;
    // What the classifier's builder recorded (model, training, cost basis) survives a resume
    // that has nothing left to ask and so builds nothing.
    let mut extra = previous_extra(&files.metrics());
    for recomputed in ["timing_note", "label_like_context"] {
        extra.remove(recomputed);
    }
    extra.insert("family".into(), serde_json::to_value(cfg.kind).expect("kind"));
    extra.insert("spec".into(), serde_json::to_value(cfg).expect("entry"));
    let mut summarize = None;
    let mut latency_kind = None;
    if !todo.is_empty() {
        let ctx = BuildContext {
            ds,
            dataset: &job.exp.dataset,
            root: job.root,
            slug,
            name: &name,
            energy: Some((job.carbon, job.meter)),
        };
        let mut built = factory::build(cfg, &ctx, progress)?;
        // Recorded once the classifier exists, so a typo or a missing key leaves nothing that
        // a corrected run would have to match.
        write_json(&files.config(), &config)?;
        simulated |= built.simulated;
        extra.extend(std::mem::take(&mut built.extra));
        extra.insert("cost_basis".into(), built.cost_basis.into());
        summarize = built.summarize.take();
        latency_kind = Some(built.latency_kind);
        // A model server on this machine does the LLM's work: its energy belongs to the window.
        let mut meter_cfg = job.meter.clone();
        meter_cfg.local_server = built.local_server.map(|port| mica_energy::LocalServer { port });
        let meters = MeterSet::auto(&meter_cfg);
        let project = format!("{}/{slug}", job.root.path().display());
        let classifier = &mut built.classifier;
        let batch = built.batch;
        let (seconds, mut r) = mica_energy::measure(&meters, job.carbon, &project, || {
            let t0 = Instant::now();
            let mut gate = FailFast::default();
            let mut done = samples.len() - todo.len();
            let mut rest: &[Sample] = &todo;
            while !rest.is_empty() {
                // Small batches until an answer shows the classifier works, so a wrong key
                // costs a handful of requests, not a batch of them.
                let n = if gate.open { batch } else { batch.min(FAIL_FAST_AFTER) };
                let (chunk, tail) = rest.split_at(n.max(1).min(rest.len()));
                rest = tail;
                let results = classifier.classify(chunk);
                for (s, r) in chunk.iter().zip(results) {
                    let mut p = match r {
                        Ok(p) => p,
                        Err(e) => {
                            let mut p = Prediction::new(&s.id, &name, Outcome::Failed);
                            p.error = Some(e.message);
                            p
                        }
                    };
                    // The run's name keys the log, whatever the backend calls itself; the
                    // truth comes from the dataset, never from the classifier.
                    p.classifier = name.clone();
                    p.true_label = (s.label < ds.labels.len()).then(|| ds.labels.name(s.label).to_string());
                    // Error texts may quote the server's URL; credentials in it are never written.
                    p.error = p.error.map(|e| mica_llm::spec::redact_url(&e));
                    for p in gate.admit(p, &name)? {
                        log.append(&p)?;
                    }
                }
                done += chunk.len();
                progress(Event::Progress {
                    slug: slug.to_string(),
                    done,
                    total: samples.len(),
                });
            }
            gate.finish(&name)?;
            Ok::<_, RunError>((t0.elapsed().as_secs_f64(), todo.len()))
        })?;
        let asked: HashSet<&str> = todo.iter().map(|s| s.id.as_str()).collect();
        let asked_preds = log_predictions(&pred_path, &asked)?;
        // Replayed answers took no model time: the per-image energy is over live answers only.
        let live = asked_preds.iter().filter(|p| !p.cached).count();
        // Every classifier of one run shares CodeCarbon's experiment_id.
        r.set_experiment(&job.root.path().display().to_string());
        let first_latency = todo
            .iter()
            .find_map(|s| asked_preds.iter().find(|p| p.sample_id == s.id && p.outcome != Outcome::Failed && !p.cached))
            .map(|p| p.latency_ms);
        r.set_images(live);
        if let Some(remote) = &built.remote_usage {
            r.add_remote(remote(&asked_preds));
        }
        mica_energy::append_energy_csv(&files.energy_csv(), &r)?;
        progress(Event::Energy {
            slug: slug.to_string(),
            summary: r.summary_line(),
            warnings: r.warnings.clone(),
        });
        windows.push(Window {
            images: todo.len(),
            live: Some(live),
            first_latency_ms: first_latency,
            seconds,
            report: Some(r),
        });
        write_json(&windows_path, &windows)?;
    }
    drop(log);

    // Metrics over every image this classifier has answered in this run (or shard).
    let preds = log_predictions(&pred_path, &wanted)?;
    let measured_images: usize = windows.iter().map(|w| w.images).sum();
    let measured_seconds: f64 = windows.iter().map(|w| w.seconds).sum();
    // Throughput from the timed windows; images predicted in a window a kill cut short have
    // no timing, so the wall time is scaled to all images.
    let wall = if measured_images > 0 {
        measured_seconds * preds.len() as f64 / measured_images as f64
    } else {
        0.0
    };
    let mut metrics = RunMetrics::from_predictions(
        &name,
        &job.exp.dataset.path.display().to_string(),
        job.exp.dataset.split.as_str(),
        &ds.labels,
        &preds,
        wall,
        &job.exp.eval.options(),
    )
    .map_err(|source| RunError::Eval {
        path: pred_path.clone(),
        source,
    })?;
    metrics.simulated = simulated || preds.iter().any(|p| p.simulated);
    metrics.latency_kind = latency_kind.or_else(|| {
        previous_extra_kind(&extra)
    });
    if let Some(k) = metrics.latency_kind {
        extra.insert("latency_kind".into(), serde_json::to_value(k).expect("kind serialises"));
    }
    metrics.first_latency_ms = windows.iter().find_map(|w| w.first_latency_ms);
    let reports: Vec<EnergyReport> = windows.iter().filter_map(|w| w.report.clone()).collect();
    metrics.energy = EnergyReport::sum(&reports, "energy windows (the run was resumed)")
        .map(|e| serde_json::to_value(e).expect("energy serialises"));
    if measured_images < preds.len() {
        extra.insert(
            "timing_note".into(),
            serde_json::json!(format!(
                "{} of {} images were timed and metered; the rest were predicted in a run that was killed before its window closed",
                measured_images,
                preds.len()
            )),
        );
    }
    extra.insert("needs_review".into(), preds.iter().filter(|p| p.needs_review).count().into());
    let (prov, prov_warnings) = model_provenance(&preds);
    if !prov.is_empty() {
        extra.insert("provenance".into(), serde_json::Value::Object(prov));
    }
    extra.remove("provenance_warnings");
    if !prov_warnings.is_empty() {
        for w in &prov_warnings {
            progress(Event::Notice(format!("{name}: {w}")));
        }
        extra.insert("provenance_warnings".into(), serde_json::json!(prov_warnings));
    }
    if cfg.uses_clinical_context() && !ds.label_like_context.is_empty() {
        extra.insert("label_like_context".into(), serde_json::json!(ds.label_like_context));
    }
    if let Some(f) = &summarize {
        extra.extend(f(&preds));
    }
    metrics.extra = extra;
    metrics.write(files.metrics()).map_err(|source| RunError::Eval {
        path: files.metrics(),
        source,
    })?;
    progress(Event::Done {
        slug: slug.to_string(),
        reused: false,
    });
    Ok(outcome(&preds, todo.len(), false))
}

/// Holds back the first answers until one of them is not a permanent failure: when the first
/// [`FAIL_FAST_AFTER`] all failed the same permanent way (401, 404, a rejected parameter, an
/// exhausted quota), the run stops and records nothing for them, so fixing the key and
/// running again asks them afresh.
#[derive(Default)]
struct FailFast {
    held: Vec<Prediction>,
    open: bool,
}

impl FailFast {
    fn admit(&mut self, p: Prediction, name: &str) -> Result<Vec<Prediction>, RunError> {
        if self.open {
            return Ok(vec![p]);
        }
        let same = self.held.first().is_none_or(|f| f.http_status == p.http_status && f.error == p.error);
        if p.permanent_error && same {
            self.held.push(p);
            if self.held.len() >= FAIL_FAST_AFTER {
                return Err(self.stop(name));
            }
            return Ok(Vec::new());
        }
        self.open = true;
        let mut out = std::mem::take(&mut self.held);
        out.push(p);
        Ok(out)
    }

    /// Fewer images than the threshold, and every one failed permanently: stop all the same.
    fn finish(&mut self, name: &str) -> Result<(), RunError> {
        if !self.open && !self.held.is_empty() {
            return Err(self.stop(name));
        }
        Ok(())
    }

    fn stop(&self, name: &str) -> RunError {
        let first = &self.held[0];
        RunError::FailFast {
            classifier: name.to_string(),
            requests: self.held.len(),
            status: first.http_status,
            message: mica_llm::spec::redact_url(first.error.as_deref().unwrap_or("no message")),
        }
    }
}

/// The latency kind an earlier invocation recorded (a resume that built nothing).
fn previous_extra_kind(extra: &serde_json::Map<String, serde_json::Value>) -> Option<mica_eval::LatencyKind> {
    extra.get("latency_kind").and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// The `extra` section of a metrics.json written before, or empty.
fn previous_extra(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("extra").and_then(|e| e.as_object()).cloned())
        .unwrap_or_default()
}

/// Which model versions answered, counted over the predictions: the resolved model (the
/// snapshot behind an alias), OpenAI's system fingerprint, the weights' digest and why
/// generation stopped. More than one snapshot or digest in one run is a warning: the run then
/// mixes two models under one name.
fn model_provenance(preds: &[Prediction]) -> (serde_json::Map<String, serde_json::Value>, Vec<String>) {
    use std::collections::BTreeMap;
    let count = |f: &dyn Fn(&Prediction) -> Option<&str>| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for p in preds {
            if let Some(v) = f(p) {
                *m.entry(v.to_string()).or_insert(0) += 1;
            }
        }
        m
    };
    let fields: [(&str, BTreeMap<String, usize>); 4] = [
        ("resolved_models", count(&|p| p.resolved_model.as_deref())),
        ("system_fingerprints", count(&|p| p.system_fingerprint.as_deref())),
        ("model_digests", count(&|p| p.model_digest.as_deref())),
        ("finish_reasons", count(&|p| p.finish_reason.as_deref())),
    ];
    let mut warnings = Vec::new();
    for (key, what) in [("resolved_models", "model snapshots"), ("model_digests", "model weight digests")] {
        let m = &fields.iter().find(|(k, _)| *k == key).expect("listed").1;
        if m.len() > 1 {
            let list: Vec<String> = m.iter().map(|(v, n)| format!("{v} ({n} answers)")).collect();
            warnings.push(format!(
                "the model changed mid-run: {} {what} answered ({}); the figures mix them",
                m.len(),
                list.join(", ")
            ));
        }
    }
    let out = fields
        .into_iter()
        .filter(|(_, m)| !m.is_empty())
        .map(|(k, m)| (k.to_string(), serde_json::to_value(m).expect("counts serialise")))
        .collect();
    (out, warnings)
}

fn log_predictions(path: &Path, wanted: &HashSet<&str>) -> Result<Vec<Prediction>, RunError> {
    let mut preds: Vec<Prediction> = if path.exists() {
        mica_core::read_predictions(path)?
    } else {
        Vec::new()
    };
    preds.retain(|p| wanted.contains(p.sample_id.as_str()));
    preds.sort_by(|a, b| a.sample_id.cmp(&b.sample_id));
    Ok(preds)
}
