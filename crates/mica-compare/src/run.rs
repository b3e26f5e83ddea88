//! The comparison run: one split, every classifier on the same test images, each in its own
//! energy window, resumable at any point and shardable across machines.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mica_core::{Classifier, Dataset, Outcome, Prediction, PredictionLog, RunManifest, Sample, Split};
use mica_energy::{CarbonConfig, EnergyReport, MeterConfig, MeterSet};
use mica_eval::RunMetrics;
use serde::{Deserialize, Serialize};

use crate::baseline::CentroidClassifier;
use crate::experiment::{ClassifierSpec, Experiment, Kind};
use crate::CompareError;

/// How a run is carried out (not part of the experiment itself).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Process only slice `k` of `n` (1-based) of the test images.
    pub shard: Option<(usize, usize)>,
    /// Write report.html and report.md when the (unsharded) run finishes.
    pub report: bool,
    /// Index the finished run in this results store.
    pub store: Option<PathBuf>,
    /// The command line, recorded in the manifest.
    pub command: Option<String>,
    /// Images per `classify` call (and per progress update).
    pub batch: Option<usize>,
}

/// What the run reports while it works; the CLI draws progress bars from these.
#[derive(Debug, Clone)]
pub enum Event {
    Notice(String),
    /// A classifier starts: `todo` of `total` images remain (the rest were done before).
    Start { slug: String, name: String, total: usize, todo: usize },
    Progress { slug: String, done: usize, total: usize },
    /// A classifier is finished; `reused` when nothing had to be redone.
    Done { slug: String, reused: bool },
}

/// The result of [`run_experiment`].
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run directory (`runs/<name>`); shards write below `shards/<k>-of-<n>/`.
    pub dir: PathBuf,
    /// Where this invocation's classifier directories are.
    pub work_dir: PathBuf,
    pub test_images: usize,
    pub classifiers: Vec<String>,
    /// `report.html`, when written.
    pub report: Option<PathBuf>,
    /// Id in the results store, when indexed.
    pub store_id: Option<i64>,
}

const SPLIT_FILE: &str = "split.csv";
const WINDOWS_FILE: &str = "energy_windows.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CompareError + '_ {
    move |e| CompareError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Runs every classifier of `exp`, writes the run directory and (unless sharded) the report.
pub fn run_experiment(
    exp: &Experiment,
    opts: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<RunOutcome, CompareError> {
    exp.validate().map_err(CompareError::Invalid)?;
    let dir = exp.output_dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let carbon = CarbonConfig::resolve(
        exp.energy.country.as_deref(),
        exp.energy.grid_intensity,
        exp.energy.pue,
    )
    .map_err(|e| CompareError::Invalid(format!("[energy]: {e}")))?;
    if let Some(w) = carbon.warning() {
        progress(Event::Notice(w));
    }

    // 1. One split for everyone, pinned in split.csv so a resumed run (or another shard)
    //    tests on exactly the same images.
    let mut ds = mica_data::load(&exp.dataset.path)
        .map_err(|e| CompareError::Data(e.to_string()))?;
    let split_path = dir.join(SPLIT_FILE);
    if split_path.is_file() {
        mica_data::split::apply_manifest(&mut ds, &split_path).map_err(|e| {
            CompareError::Data(format!(
                "{e} (the dataset changed since this run started: use a new output directory)"
            ))
        })?;
    } else if let Some(m) = &exp.dataset.split_manifest {
        mica_data::split::apply_manifest(&mut ds, m).map_err(|e| CompareError::Data(e.to_string()))?;
        mica_data::split::write_manifest(&ds, &split_path).map_err(|e| CompareError::Data(e.to_string()))?;
    } else {
        let cfg = mica_data::split::SplitConfig {
            seed: exp.dataset.seed,
            train: exp.dataset.train,
            val: exp.dataset.val,
            test: exp.dataset.test,
        };
        let summary = mica_data::split::assign(&mut ds, &cfg).map_err(|e| CompareError::Data(e.to_string()))?;
        for n in summary.notes {
            progress(Event::Notice(n));
        }
        mica_data::split::write_manifest(&ds, &split_path).map_err(|e| CompareError::Data(e.to_string()))?;
    }
    let split_hash = mica_data::split::fingerprint(&ds);
    let test = test_set(&ds, exp.dataset.limit_per_class, exp.dataset.seed);
    if test.is_empty() {
        return Err(CompareError::Data(format!(
            "{}: the split has no test images",
            exp.dataset.path.display()
        )));
    }
    let mine: Vec<Sample> = match opts.shard {
        Some((k, n)) => test
            .iter()
            .enumerate()
            .filter(|(i, _)| i % n == k - 1)
            .map(|(_, s)| s.clone())
            .collect(),
        None => test.clone(),
    };

    // 2. The manifest: written once, checked on every resume.
    write_or_check_manifest(exp, opts, &dir, &ds, &split_hash, test.len())?;
    let work_dir = match opts.shard {
        Some((k, n)) => dir.join(mica_report::rundir::SHARDS).join(mica_report::shard_dir_name(k, n)),
        None => dir.clone(),
    };

    // 3. Every classifier in turn.
    let mut names = Vec::new();
    for spec in &exp.classifiers {
        let slug = spec.slug();
        let subset = limit_subset(&mine, &test, spec.limit_per_class, exp.dataset.seed);
        run_classifier(exp, spec, &slug, &subset, &ds, &dir, &work_dir, &carbon, opts, progress)?;
        names.push(slug);
    }

    // 4. Report and index, unless this is one shard of many.
    let mut outcome = RunOutcome {
        dir: dir.clone(),
        work_dir,
        test_images: mine.len(),
        classifiers: names,
        report: None,
        store_id: None,
    };
    if opts.shard.is_none() {
        if opts.report {
            let (run, cmp) = mica_report::load(&dir).map_err(|e| CompareError::Report(e.to_string()))?;
            mica_report::render::write_report(&run, &cmp, mica_report::Format::Markdown)
                .map_err(|e| CompareError::Report(e.to_string()))?;
            let html = mica_report::render::write_report(&run, &cmp, mica_report::Format::Html)
                .map_err(|e| CompareError::Report(e.to_string()))?;
            outcome.report = Some(html);
            if let Some(store) = &opts.store {
                let mut st = mica_report::Store::open(store).map_err(|e| CompareError::Report(e.to_string()))?;
                outcome.store_id = Some(st.index(&run, &cmp).map_err(|e| CompareError::Report(e.to_string()))?);
            }
        } else if let Some(store) = &opts.store {
            let (run, cmp) = mica_report::load(&dir).map_err(|e| CompareError::Report(e.to_string()))?;
            let mut st = mica_report::Store::open(store).map_err(|e| CompareError::Report(e.to_string()))?;
            outcome.store_id = Some(st.index(&run, &cmp).map_err(|e| CompareError::Report(e.to_string()))?);
        }
    }
    Ok(outcome)
}

/// The comparison's test images in a fixed order (by id), capped per class by a seeded,
/// id-keyed draw, so the subset is the same on every machine and independent of file order.
pub fn test_set(ds: &Dataset, limit_per_class: Option<usize>, seed: u64) -> Vec<Sample> {
    let mut test: Vec<Sample> = ds.split(Split::Test).cloned().collect();
    test.sort_by(|a, b| a.id.cmp(&b.id));
    match limit_per_class {
        None => test,
        Some(limit) => cap_per_class(&test, limit, seed),
    }
}

fn cap_per_class(samples: &[Sample], limit: usize, seed: u64) -> Vec<Sample> {
    let mut ranked: Vec<(u64, &Sample)> = samples.iter().map(|s| (keyed_hash(seed, &s.id), s)).collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let mut per_class = std::collections::HashMap::new();
    let mut keep = HashSet::new();
    for (_, s) in ranked {
        let n = per_class.entry(s.label).or_insert(0usize);
        if *n < limit {
            *n += 1;
            keep.insert(s.id.clone());
        }
    }
    samples.iter().filter(|s| keep.contains(&s.id)).cloned().collect()
}

/// The classifier's images: its own per-class cap is drawn from the whole comparison's test
/// set (so shards agree on it), then intersected with this shard's slice.
fn limit_subset(mine: &[Sample], all: &[Sample], limit: Option<usize>, seed: u64) -> Vec<Sample> {
    match limit {
        None => mine.to_vec(),
        Some(l) => {
            let keep: HashSet<String> = cap_per_class(all, l, seed).into_iter().map(|s| s.id).collect();
            mine.iter().filter(|s| keep.contains(&s.id)).cloned().collect()
        }
    }
}

fn keyed_hash(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final avalanche so neighbouring ids do not keep their order.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

fn machine() -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    m.insert("os".into(), std::env::consts::OS.into());
    m.insert("arch".into(), std::env::consts::ARCH.into());
    m.insert(
        "cpus".into(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string(),
    );
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(l) = info.lines().find(|l| l.starts_with("model name")) {
            if let Some((_, v)) = l.split_once(':') {
                m.insert("cpu".into(), v.trim().to_string());
            }
        }
    }
    if let Ok(info) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(l) = info.lines().find(|l| l.starts_with("MemTotal")) {
            if let Some(kb) = l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()) {
                m.insert("memory".into(), format!("{:.1} GiB", kb / 1024.0 / 1024.0));
            }
        }
    }
    m
}

fn write_or_check_manifest(
    exp: &Experiment,
    opts: &RunOptions,
    dir: &Path,
    ds: &Dataset,
    split_hash: &str,
    test_images: usize,
) -> Result<(), CompareError> {
    let path = dir.join(mica_report::rundir::MANIFEST);
    let slugs: Vec<String> = exp.classifiers.iter().map(|c| c.slug()).collect();
    if path.is_file() {
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let old: RunManifest = serde_json::from_slice(&bytes).map_err(|e| CompareError::Config {
            path: path.clone(),
            message: format!("not a mica run manifest: {e}"),
        })?;
        let old_hash = old.config.get("split_hash").and_then(|v| v.as_str()).unwrap_or("");
        if old_hash != split_hash {
            return Err(CompareError::Config {
                path,
                message: format!(
                    "this run used split {old_hash}, the experiment now gives {split_hash}; use a new output directory"
                ),
            });
        }
        let old_exp: Option<Experiment> = old
            .config
            .get("experiment")
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        if let Some(old_exp) = old_exp {
            // Adding classifiers to a finished run is fine; changing the data or a
            // classifier's meaning under its slug is not.
            let changed = old_exp.dataset != exp.dataset
                || old_exp.eval != exp.eval
                || old_exp.classifiers.iter().any(|o| {
                    exp.classifiers
                        .iter()
                        .any(|n| n.slug() == o.slug() && n != o)
                });
            if changed {
                return Err(CompareError::Config {
                    path,
                    message: "the experiment changed since this run started (dataset, eval or a classifier's settings); use a new output directory".into(),
                });
            }
            let mut all = old
                .config
                .get("classifier_slugs")
                .and_then(|v| serde_json::from_value::<Vec<String>>(v.clone()).ok())
                .unwrap_or_default();
            let mut changed_list = false;
            for s in &slugs {
                if !all.contains(s) {
                    all.push(s.clone());
                    changed_list = true;
                }
            }
            if changed_list {
                let mut m = old.clone();
                m.config["classifier_slugs"] = serde_json::json!(all);
                let mut merged = old_exp.clone();
                for c in &exp.classifiers {
                    if !merged.classifiers.iter().any(|o| o.slug() == c.slug()) {
                        merged.classifiers.push(c.clone());
                    }
                }
                m.config["experiment"] = serde_json::to_value(&merged).expect("experiment serialises");
                write_json(&path, &m)?;
            }
        }
        return Ok(());
    }
    let m = RunManifest {
        mica_version: env!("CARGO_PKG_VERSION").to_string(),
        command: opts.command.clone().unwrap_or_else(|| "mica compare".into()),
        dataset: exp.dataset.path.clone(),
        split_manifest: Some(PathBuf::from(SPLIT_FILE)),
        seed: Some(exp.dataset.seed),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine: machine(),
        config: serde_json::json!({
            "experiment": exp,
            "classifier_slugs": slugs,
            "split_hash": split_hash,
            "split_hash_method": "FNV-1a 64 over sorted id,label,split lines (mica_data::split::fingerprint)",
            "layout": ds.layout.as_str(),
            "modality": ds.modality.as_str(),
            "labels": ds.labels.names(),
            "test_images": test_images,
            "eval": exp.eval.options(),
        }),
    };
    write_json(&path, &m)
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), CompareError> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("serialises");
    bytes.push(b'\n');
    mica_core::write_atomic(path, &bytes).map_err(|e| CompareError::Data(e.to_string()))
}

/// One energy window of one invocation (a resumed classifier has several).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Window {
    images: usize,
    seconds: f64,
    report: Option<EnergyReport>,
}

#[allow(clippy::too_many_arguments)]
fn run_classifier(
    exp: &Experiment,
    spec: &ClassifierSpec,
    slug: &str,
    samples: &[Sample],
    ds: &Dataset,
    run_dir: &Path,
    work_dir: &Path,
    carbon: &CarbonConfig,
    opts: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<(), CompareError> {
    let cdir = work_dir.join(slug);
    let metrics_path = cdir.join(mica_report::rundir::METRICS);
    let pred_path = cdir.join(mica_report::rundir::PREDICTIONS);
    let name = spec.display_name();
    let wanted: HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();

    // Finished before: metrics.json exists and the predictions cover every image.
    if metrics_path.is_file() && pred_path.is_file() {
        let done: HashSet<String> = mica_core::read_predictions(&pred_path)
            .map_err(|e| CompareError::Data(e.to_string()))?
            .into_iter()
            .map(|p| p.sample_id)
            .collect();
        if wanted.iter().all(|id| done.contains(*id)) {
            progress(Event::Done {
                slug: slug.to_string(),
                reused: true,
            });
            return Ok(());
        }
    }
    let (mut log, _) = PredictionLog::open(&pred_path).map_err(|e| CompareError::Data(e.to_string()))?;
    let todo: Vec<Sample> = samples
        .iter()
        .filter(|s| !log.is_done(&name, &s.id))
        .cloned()
        .collect();
    progress(Event::Start {
        slug: slug.to_string(),
        name: name.clone(),
        total: samples.len(),
        todo: todo.len(),
    });

    let windows_path = cdir.join(WINDOWS_FILE);
    let mut windows: Vec<Window> = match std::fs::read(&windows_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| CompareError::Config {
            path: windows_path.clone(),
            message: format!("unreadable energy windows: {e}"),
        })?,
        Err(_) => Vec::new(),
    };
    let mut simulated = spec.simulated;
    let mut extra = serde_json::Map::new();
    extra.insert("family".into(), serde_json::to_value(spec.kind).expect("kind"));
    extra.insert("spec".into(), serde_json::to_value(spec).expect("spec"));
    if !todo.is_empty() {
        let (mut classifier, info) = build_classifier(exp, spec, slug, &name, ds, run_dir, progress)?;
        simulated |= info.simulated;
        for (k, v) in info.extra {
            extra.insert(k, v);
        }
        let meters = MeterSet::auto(&MeterConfig {
            tdp_w: exp.energy.tdp_w,
            ..MeterConfig::default()
        });
        let window = meters.start().map_err(|e| CompareError::Energy(e.to_string()))?;
        let t0 = Instant::now();
        let batch = opts.batch.unwrap_or(16).max(1);
        let mut done = samples.len() - todo.len();
        for chunk in todo.chunks(batch) {
            let results = classifier.classify(chunk);
            for (s, r) in chunk.iter().zip(results) {
                let p = match r {
                    Ok(mut p) => {
                        // The run's name keys the log, whatever the backend calls itself.
                        p.classifier = name.clone();
                        p
                    }
                    Err(e) => failed(s, &name, ds, e.message),
                };
                log.append(&p).map_err(|e| CompareError::Data(e.to_string()))?;
            }
            done += chunk.len();
            progress(Event::Progress {
                slug: slug.to_string(),
                done,
                total: samples.len(),
            });
        }
        let seconds = t0.elapsed().as_secs_f64();
        let report = match window.stop() {
            Ok(m) => {
                let mut r = EnergyReport::new(&format!("{}/{slug}", run_dir.display()), &m, carbon, todo.len());
                if let Some(remote) = info.remote_usage {
                    r.add_remote(remote(&log_predictions(&pred_path, &wanted)?));
                }
                let _ = mica_energy::append_energy_csv(&cdir.join(mica_report::rundir::ENERGY_CSV), &r);
                Some(r)
            }
            Err(e) => {
                progress(Event::Notice(format!("{name}: energy window failed: {e}")));
                None
            }
        };
        windows.push(Window {
            images: todo.len(),
            seconds,
            report,
        });
        write_json(&windows_path, &windows)?;
    }
    drop(log);

    // Metrics over every image this classifier has answered in this run (or shard).
    let preds: Vec<Prediction> = log_predictions(&pred_path, &wanted)?;
    let measured_images: usize = windows.iter().map(|w| w.images).sum();
    let measured_seconds: f64 = windows.iter().map(|w| w.seconds).sum();
    // Throughput from the timed windows; images predicted in a window a kill cut short have
    // no timing, so the wall time is scaled to all images.
    let wall = if measured_images > 0 {
        measured_seconds * preds.len() as f64 / measured_images as f64
    } else {
        0.0
    };
    let labels = ds.labels.clone();
    let mut metrics = RunMetrics::from_predictions(
        &name,
        &exp.dataset.path.display().to_string(),
        "test",
        &labels,
        &preds,
        wall,
        &exp.eval.options(),
    )
    .map_err(|e| CompareError::Data(format!("{}: {e}", pred_path.display())))?;
    metrics.simulated = simulated
        || preds
            .iter()
            .any(|p| p.extra.get("simulated").and_then(|v| v.as_bool()) == Some(true));
    metrics.energy = combine_windows(&windows).map(|e| serde_json::to_value(e).expect("energy serialises"));
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
    metrics.extra = extra;
    metrics
        .write(&metrics_path)
        .map_err(|e| CompareError::Data(e.to_string()))?;
    progress(Event::Done {
        slug: slug.to_string(),
        reused: false,
    });
    Ok(())
}

fn log_predictions(path: &Path, wanted: &HashSet<&str>) -> Result<Vec<Prediction>, CompareError> {
    let mut preds: Vec<Prediction> = mica_core::read_predictions(path)
        .map_err(|e| CompareError::Data(e.to_string()))?
        .into_iter()
        .filter(|p| wanted.contains(p.sample_id.as_str()))
        .collect();
    preds.sort_by(|a, b| a.sample_id.cmp(&b.sample_id));
    Ok(preds)
}

fn failed(s: &Sample, name: &str, ds: &Dataset, message: String) -> Prediction {
    let mut p = Prediction::new(&s.id, name, Outcome::Failed);
    p.true_label = (s.label < ds.labels.len()).then(|| ds.labels.name(s.label).to_string());
    p.error = Some(message);
    p
}

/// Sums the windows of a resumed classifier into one report over the metered images.
fn combine_windows(windows: &[Window]) -> Option<EnergyReport> {
    let reports: Vec<(&EnergyReport, usize)> = windows
        .iter()
        .filter_map(|w| w.report.as_ref().map(|r| (r, w.images)))
        .collect();
    let (first, _) = reports.first()?;
    let mut e = (*first).clone();
    for (r, _) in &reports[1..] {
        e.duration_s += r.duration_s;
        e.energy_wh += r.energy_wh;
        e.facility_energy_wh += r.facility_energy_wh;
        e.co2e_g += r.co2e_g;
        for c in &mut e.components {
            if let Some(o) = r.components.iter().find(|o| o.label == c.label && o.component == c.component) {
                c.energy_wh += o.energy_wh;
            }
        }
        e.remote.extend(r.remote.iter().cloned());
        for w in &r.warnings {
            if !e.warnings.contains(w) {
                e.warnings.push(w.clone());
            }
        }
    }
    let images: usize = reports.iter().map(|(_, n)| n).sum();
    e.set_images(images);
    if reports.len() > 1 {
        e.warnings.push(format!("summed over {} energy windows (the run was resumed)", reports.len()));
    }
    Some(e)
}

type RemoteFn = Box<dyn Fn(&[Prediction]) -> mica_energy::RemoteUsage>;

/// What building a classifier tells the run besides the classifier itself.
pub(crate) struct BuildInfo {
    pub simulated: bool,
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// For remote APIs: their usage, recorded as not measured in the energy report.
    pub remote_usage: Option<RemoteFn>,
}

fn build_classifier(
    exp: &Experiment,
    spec: &ClassifierSpec,
    slug: &str,
    name: &str,
    ds: &Dataset,
    run_dir: &Path,
    progress: &mut dyn FnMut(Event),
) -> Result<(Box<dyn Classifier>, BuildInfo), CompareError> {
    // Builders warm their classifier up themselves, before the energy window opens.
    let mut info = BuildInfo {
        simulated: false,
        extra: serde_json::Map::new(),
        remote_usage: None,
    };
    match spec.kind {
        Kind::Baseline => {
            let train: Vec<&Sample> = ds.split(Split::Train).collect();
            let (c, skipped) = CentroidClassifier::fit(name, &ds.labels, &train).map_err(CompareError::Data)?;
            if skipped > 0 {
                progress(Event::Notice(format!("{name}: {skipped} unreadable training images skipped")));
            }
            info.extra.insert("train_images".into(), serde_json::json!(train.len() - skipped));
            Ok((Box::new(c), info))
        }
        Kind::Cnn => {
            let c = crate::cnn::build(exp, spec, slug, name, ds, run_dir, &mut info, progress)?;
            Ok((c, info))
        }
        Kind::Llm => {
            let c = crate::llm::build(exp, spec, slug, name, ds, run_dir, &mut info, progress)?;
            Ok((c, info))
        }
    }
}
