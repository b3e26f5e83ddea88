//! The run directory's layout: every file name lives here and nowhere else.
//!
//! ```text
//! <root>/manifest.json            RunManifest (split hash, experiment, machine)
//! <root>/split.csv                the exact split every classifier saw
//! <root>/<slug>/predictions.jsonl one Prediction per line, append-only
//! <root>/<slug>/metrics.json      RunMetrics with its energy section
//! <root>/<slug>/energy.csv        CodeCarbon-compatible rows, one per energy window
//! <root>/<slug>/energy_windows.json  the windows of a resumed classifier
//! <root>/energy.json              the one window of a `mica train` run
//! <root>/<slug>/classifier.json   what decides the answers (checked on resume)
//! <root>/shards/<k>-of-<n>/<slug>/...  the same, per shard, before `mica report` merges
//! <root>/models/<slug>/           CNNs trained for the comparison
//! <root>/report.{md,html,json,csv}, <root>/plots/
//! ```
//!
//! `mica classify` writes one classifier with its files at the root ([`RunRoot::flat`]), which
//! reads as a comparison of one.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::CoreError;

const MANIFEST: &str = "manifest.json";
const SPLIT: &str = "split.csv";
const SHARDS: &str = "shards";
const MODELS: &str = "models";
const PLOTS: &str = "plots";
const PREDICTIONS: &str = "predictions.jsonl";
const METRICS: &str = "metrics.json";
const ENERGY_CSV: &str = "energy.csv";
const ENERGY_WINDOWS: &str = "energy_windows.json";
const ENERGY_REPORT: &str = "energy.json";
const CLASSIFIER: &str = "classifier.json";
const LOCK: &str = ".mica.lock";

/// A comparison's (or a single classification's) run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRoot {
    root: PathBuf,
}

impl RunRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunRoot { root: root.into() }
    }
    pub fn path(&self) -> &Path {
        &self.root
    }
    pub fn manifest(&self) -> PathBuf {
        self.root.join(MANIFEST)
    }
    pub fn split(&self) -> PathBuf {
        self.root.join(SPLIT)
    }
    pub fn shards(&self) -> PathBuf {
        self.root.join(SHARDS)
    }
    /// The work directory of slice `k` (1-based) of `n`.
    pub fn shard(&self, k: usize, n: usize) -> RunRoot {
        RunRoot::new(self.shards().join(shard_dir_name(k, n)))
    }
    pub fn classifier(&self, slug: &str) -> ClassifierDir {
        ClassifierDir::new(self.root.join(slug))
    }
    /// The root itself as the one classifier's directory (`mica classify`).
    pub fn flat(&self) -> ClassifierDir {
        ClassifierDir::new(self.root.clone())
    }
    /// Where CNNs trained for this comparison keep their checkpoints.
    pub fn model_dir(&self, slug: &str) -> PathBuf {
        self.root.join(MODELS).join(slug)
    }
    pub fn plots(&self) -> PathBuf {
        self.root.join(PLOTS)
    }
    /// `report.<ext>` (`md`, `html`, `json`, `csv`).
    pub fn report(&self, ext: &str) -> PathBuf {
        self.root.join(format!("report.{ext}"))
    }
    /// True for sub-directory names that are part of the layout, not a classifier.
    pub fn is_reserved(name: &str) -> bool {
        matches!(name, SHARDS | MODELS | PLOTS)
    }
    /// Takes the directory for this process (see [`RunLock`]).
    pub fn lock(&self) -> Result<RunLock, CoreError> {
        RunLock::acquire(&self.root)
    }
}

/// The shard directory name for slice `k` (1-based) of `n`.
pub fn shard_dir_name(k: usize, n: usize) -> String {
    format!("{k}-of-{n}")
}

/// One classifier's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifierDir {
    dir: PathBuf,
}

impl ClassifierDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ClassifierDir { dir: dir.into() }
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
    pub fn predictions(&self) -> PathBuf {
        self.dir.join(PREDICTIONS)
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join(METRICS)
    }
    pub fn energy_csv(&self) -> PathBuf {
        self.dir.join(ENERGY_CSV)
    }
    /// One window's report, for runs that are not classifications (`mica train`).
    pub fn energy_report(&self) -> PathBuf {
        self.dir.join(ENERGY_REPORT)
    }
    pub fn energy_windows(&self) -> PathBuf {
        self.dir.join(ENERGY_WINDOWS)
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join(CLASSIFIER)
    }
    pub fn is_finished(&self) -> bool {
        self.metrics().is_file()
    }
}

/// An exclusive lock on a run directory, held while a process writes into it.
///
/// Two processes appending to one `predictions.jsonl` would interleave lines and each count
/// the other's images as its own; the second one is refused at once instead. The operating
/// system releases the lock when the process ends, however it ends, so a killed run never
/// leaves a stale lock behind.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<RunLock, CoreError> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let path = dir.join(LOCK);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CoreError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(CoreError::Locked {
                dir: dir.to_path_buf(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(CoreError::io(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let root = RunRoot::new(dir.path().join("run"));
        let first = root.lock().unwrap();
        let err = root.lock().unwrap_err().to_string();
        assert!(err.contains("another mica process"), "{err}");
        drop(first);
        root.lock().unwrap();
    }

    #[test]
    fn names_are_where_readers_expect_them() {
        let root = RunRoot::new("runs/x");
        assert_eq!(root.classifier("cnn-small").metrics(), Path::new("runs/x/cnn-small/metrics.json"));
        assert_eq!(root.flat().predictions(), Path::new("runs/x/predictions.jsonl"));
        assert_eq!(root.shard(2, 8).path(), Path::new("runs/x/shards/2-of-8"));
        assert!(RunRoot::is_reserved("models") && !RunRoot::is_reserved("cnn-small"));
    }
}
