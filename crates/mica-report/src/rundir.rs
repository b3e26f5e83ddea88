//! Reading run directories, and merging the shards of a sharded comparison.
//!
//! A comparison run directory looks like this:
//!
//! ```text
//! runs/<name>/manifest.json            mica_core::RunManifest (split hash, config, machine)
//! runs/<name>/split.csv                the exact test images every classifier saw
//! runs/<name>/<slug>/predictions.jsonl one mica_core::Prediction per line
//! runs/<name>/<slug>/metrics.json      mica_eval::RunMetrics (+ energy section)
//! runs/<name>/<slug>/energy.csv        CodeCarbon-compatible rows
//! runs/<name>/shards/<k>-of-<n>/<slug>/...   the same, per shard, before `mica report` merges
//! runs/<name>/report.{md,html,json,csv}, runs/<name>/plots/
//! ```
//!
//! A single classifier's run directory (`mica classify --out DIR`, with `metrics.json` at its
//! root) reads as a comparison of one.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use mica_core::{read_predictions, LabelSet, Prediction, RunManifest};
use mica_energy::EnergyReport;
use mica_eval::{EvalOptions, RunMetrics};

use crate::ReportError;

pub use mica_core::rundir::shard_dir_name;
use mica_core::{ClassifierDir, RunRoot};

/// One classifier's finished run inside a comparison.
#[derive(Debug, Clone)]
pub struct ClassifierRun {
    /// Directory name, also the stable key in the results store and plot file names.
    pub slug: String,
    pub dir: PathBuf,
    pub metrics: RunMetrics,
    pub predictions: Vec<Prediction>,
    /// The `energy` section of `metrics.json`, when it parses as `mica-energy`'s report.
    pub energy: Option<EnergyReport>,
}

impl ClassifierRun {
    pub fn open(slug: &str, dir: &Path) -> Result<ClassifierRun, ReportError> {
        let files = ClassifierDir::new(dir);
        let metrics_path = files.metrics();
        let metrics = RunMetrics::read(&metrics_path).map_err(|e| ReportError::Format {
            path: metrics_path.clone(),
            message: strip_path(&e.to_string(), &metrics_path),
        })?;
        let pred_path = files.predictions();
        let predictions = if pred_path.exists() {
            read_predictions(&pred_path)?
        } else {
            Vec::new()
        };
        let energy = match &metrics.energy {
            Some(v) => Some(serde_json::from_value::<EnergyReport>(v.clone()).map_err(|e| {
                ReportError::Format {
                    path: metrics_path.clone(),
                    message: format!("the `energy` section is not a mica-energy report: {e}"),
                }
            })?),
            None => None,
        };
        Ok(ClassifierRun {
            slug: slug.to_string(),
            dir: dir.to_path_buf(),
            metrics,
            predictions,
            energy,
        })
    }

    /// The classifier's display name (as recorded in its metrics).
    pub fn name(&self) -> &str {
        &self.metrics.classifier
    }
}

fn strip_path(msg: &str, path: &Path) -> String {
    let p = format!("{}: ", path.display());
    msg.strip_prefix(&p).unwrap_or(msg).to_string()
}

/// A comparison: the manifest and every finished classifier.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
    pub manifest: Option<RunManifest>,
    pub classifiers: Vec<ClassifierRun>,
    /// Sub-directories that were skipped (unfinished classifiers), with the reason.
    pub skipped: Vec<String>,
}

impl RunDir {
    /// Opens a run directory. Classifier sub-directories without `metrics.json` are listed in
    /// `skipped` (an unfinished classifier of a killed run), not fatal; a directory with no
    /// finished classifier at all is an error.
    pub fn open(root: impl AsRef<Path>) -> Result<RunDir, ReportError> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(ReportError::Invalid(format!(
                "{}: not a run directory (no such folder)",
                root.display()
            )));
        }
        let manifest = read_manifest(&root)?;
        let mut classifiers = Vec::new();
        let mut skipped = Vec::new();
        let layout = RunRoot::new(&root);
        if layout.flat().is_finished() {
            let slug = root
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            classifiers.push(ClassifierRun::open(&slug, &root)?);
        } else {
            for slug in classifier_order(&root, manifest.as_ref())? {
                let files = layout.classifier(&slug);
                if files.is_finished() {
                    classifiers.push(ClassifierRun::open(&slug, files.path())?);
                } else if files.predictions().is_file() {
                    skipped.push(format!("{slug}: unfinished (no metrics.json yet)"));
                }
            }
        }
        if classifiers.is_empty() {
            let hint = if layout.shards().is_dir() {
                " (it has shards: run `mica report` on it to merge them)"
            } else {
                ""
            };
            return Err(ReportError::Invalid(format!(
                "{}: no finished classifier run (no */metrics.json){hint}",
                root.display()
            )));
        }
        Ok(RunDir {
            root,
            manifest,
            classifiers,
            skipped,
        })
    }

    /// The run's name: the directory's last component.
    pub fn name(&self) -> String {
        self.root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into())
    }

    /// True when any classifier ran against the simulator.
    pub fn simulated(&self) -> bool {
        self.classifiers.iter().any(|c| c.metrics.simulated)
    }
}

pub fn read_manifest(root: &Path) -> Result<Option<RunManifest>, ReportError> {
    let path = RunRoot::new(root).manifest();
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| ReportError::Io {
        path: path.clone(),
        source: e,
    })?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ReportError::Format {
            path,
            message: format!("not a mica run manifest: {e}"),
        })
}

/// The classifier slugs in the experiment's order (`config.classifier_slugs` of the manifest),
/// then any other sub-directory alphabetically.
fn classifier_order(root: &Path, manifest: Option<&RunManifest>) -> Result<Vec<String>, ReportError> {
    let mut order: Vec<String> = manifest
        .and_then(|m| m.config.get("classifier_slugs"))
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let mut rest = BTreeSet::new();
    let entries = std::fs::read_dir(root).map_err(|e| ReportError::Io {
        path: root.to_path_buf(),
        source: e,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && !RunRoot::is_reserved(&name) && !order.contains(&name) {
            rest.insert(name);
        }
    }
    order.extend(rest);
    Ok(order)
}

/// Parses `k/n` (1 <= k <= n).
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| format!("--shard {s}: expected K/N, e.g. 2/8"))?;
    let k: usize = k.trim().parse().map_err(|_| format!("--shard {s}: K is not a number"))?;
    let n: usize = n.trim().parse().map_err(|_| format!("--shard {s}: N is not a number"))?;
    if n == 0 || k == 0 || k > n {
        return Err(format!("--shard {s}: need 1 <= K <= N"));
    }
    Ok((k, n))
}

/// What [`merge_shards`] did.
#[derive(Debug, Clone, Default)]
pub struct MergeSummary {
    /// Slugs merged, with their image counts.
    pub merged: Vec<(String, usize)>,
    pub shards: usize,
}

/// Merges `root/shards/<k>-of-<n>/<slug>/` into `root/<slug>/`: predictions concatenated (in
/// sample-id order, so the result does not depend on which machine finished first), metrics
/// recomputed from them, energy windows summed. Every shard of every classifier must be
/// finished; a missing one is an error naming it, because a partial merge would quietly
/// report on a subset of the test set.
pub fn merge_shards(root: &Path, opts: &EvalOptions) -> Result<Option<MergeSummary>, ReportError> {
    let shards_root = RunRoot::new(root).shards();
    if !shards_root.is_dir() {
        return Ok(None);
    }
    let mut shard_dirs: BTreeMap<usize, PathBuf> = BTreeMap::new();
    let mut total: Option<usize> = None;
    let entries = std::fs::read_dir(&shards_root).map_err(|e| ReportError::Io {
        path: shards_root.clone(),
        source: e,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((k, n)) = name
            .split_once("-of-")
            .and_then(|(k, n)| Some((k.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
        else {
            continue;
        };
        match total {
            None => total = Some(n),
            Some(t) if t != n => {
                return Err(ReportError::Invalid(format!(
                    "{}: shards of different splits ({t} and {n} shards) in one run",
                    shards_root.display()
                )))
            }
            _ => {}
        }
        shard_dirs.insert(k, entry.path());
    }
    let Some(n) = total else { return Ok(None) };
    let missing: Vec<String> = (1..=n)
        .filter(|k| !shard_dirs.contains_key(k))
        .map(|k| shard_dir_name(k, n))
        .collect();
    if !missing.is_empty() {
        return Err(ReportError::Invalid(format!(
            "{}: shard(s) {} not present yet; run them (mica compare --shard K/{n}) before the report",
            shards_root.display(),
            missing.join(", ")
        )));
    }
    let manifest = read_manifest(root)?;
    let mut slugs: Vec<String> = Vec::new();
    for dir in shard_dirs.values() {
        for s in classifier_order(dir, manifest.as_ref())? {
            if !slugs.contains(&s) {
                slugs.push(s);
            }
        }
    }
    let mut summary = MergeSummary {
        merged: Vec::new(),
        shards: n,
    };
    for slug in slugs {
        let mut runs = Vec::new();
        for (k, dir) in &shard_dirs {
            let d = dir.join(&slug);
            if !ClassifierDir::new(&d).is_finished() {
                return Err(ReportError::Invalid(format!(
                    "{}: classifier `{slug}` is not finished in shard {} (no metrics.json)",
                    d.display(),
                    shard_dir_name(*k, n)
                )));
            }
            runs.push(ClassifierRun::open(&slug, &d)?);
        }
        let merged = merge_runs(&runs, opts)?;
        let out = root.join(&slug);
        write_merged(&out, &merged, &runs)?;
        summary.merged.push((slug, merged.metrics.images));
    }
    Ok(Some(summary))
}

/// Merged predictions + metrics of one classifier.
struct Merged {
    predictions: Vec<Prediction>,
    metrics: RunMetrics,
}

fn merge_runs(runs: &[ClassifierRun], opts: &EvalOptions) -> Result<Merged, ReportError> {
    let first = &runs[0].metrics;
    let labels = LabelSet::new(first.labels.clone())
        .map_err(|e| ReportError::Invalid(format!("{}: {e}", runs[0].dir.display())))?;
    let mut seen = HashSet::new();
    let mut preds = Vec::new();
    for r in runs {
        if r.metrics.labels != first.labels {
            return Err(ReportError::Invalid(format!(
                "{}: label set differs from the other shards",
                r.dir.display()
            )));
        }
        for p in &r.predictions {
            if !seen.insert(p.sample_id.clone()) {
                return Err(ReportError::Invalid(format!(
                    "{}: sample `{}` appears in more than one shard",
                    r.dir.display(),
                    p.sample_id
                )));
            }
            preds.push(p.clone());
        }
    }
    preds.sort_by(|a, b| a.sample_id.cmp(&b.sample_id));
    let wall: f64 = runs.iter().map(|r| r.metrics.wall_seconds).sum();
    let mut metrics = RunMetrics::from_predictions(
        &first.classifier,
        &first.dataset,
        &first.split,
        &labels,
        &preds,
        wall,
        opts,
    )
    .map_err(|e| ReportError::Invalid(format!("{}: {e}", runs[0].dir.display())))?;
    metrics.simulated = runs.iter().any(|r| r.metrics.simulated);
    metrics.latency_kind = first.latency_kind;
    // Each shard had its own cold start; the first shard's stands for them.
    metrics.first_latency_ms = first.first_latency_ms;
    metrics.extra = first.extra.clone();
    metrics.extra.insert("shards".into(), serde_json::json!(runs.len()));
    let energies: Vec<EnergyReport> = runs.iter().filter_map(|r| r.energy.clone()).collect();
    if energies.len() == runs.len() {
        let mut e = EnergyReport::sum(&energies, "shard energy windows (machines may differ)")
            .expect("at least one shard");
        // Per-image energy is over the answers asked live, as in each shard.
        e.set_images(metrics.live);
        metrics.energy = Some(serde_json::to_value(&e).expect("energy report serialises"));
    } else if !energies.is_empty() {
        metrics.extra.insert(
            "energy_note".into(),
            serde_json::json!("some shards have no energy measurement; energy left out"),
        );
    }
    Ok(Merged {
        predictions: preds,
        metrics,
    })
}

fn write_merged(out: &Path, m: &Merged, runs: &[ClassifierRun]) -> Result<(), ReportError> {
    let mut lines = String::new();
    for p in &m.predictions {
        lines.push_str(&serde_json::to_string(p).expect("prediction serialises"));
        lines.push('\n');
    }
    let files = ClassifierDir::new(out);
    mica_core::write_atomic(files.predictions(), lines.as_bytes())?;
    let mut csv = String::new();
    for r in runs {
        let path = ClassifierDir::new(&r.dir).energy_csv();
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| ReportError::Io {
                path: path.clone(),
                source: e,
            })?;
            for (j, line) in text.lines().enumerate() {
                if j == 0 && !csv.is_empty() {
                    continue; // header only once
                }
                csv.push_str(line);
                csv.push('\n');
            }
        }
    }
    if !csv.is_empty() {
        mica_core::write_atomic(files.energy_csv(), csv.as_bytes())?;
    }
    let mut bytes = serde_json::to_vec_pretty(&m.metrics).expect("metrics serialise");
    bytes.push(b'\n');
    mica_core::write_atomic(files.metrics(), &bytes)?;
    Ok(())
}
