//! Run-directory files shared by every classifier: the append-only prediction log and the run
//! manifest.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{CoreError, Prediction};

/// What a resumed run does with images whose recorded outcome is `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailedOnResume {
    /// Ask them again: a failure (timeout, server down, wrong key) is not the model's answer.
    #[default]
    Retry,
    /// Keep them as recorded (`--keep-failed`).
    Keep,
}

/// Append-only `predictions.jsonl`, flushed after every line.
///
/// A run killed at any moment leaves at most one partial last line; reopening drops that line
/// (it is rewritten when the image is redone) and reports which samples are finished, so a
/// re-run does only the rest. An image that failed and is asked again gets a second line;
/// readers take the last line of each image ([`read_predictions`]), so nothing is rewritten in
/// place and the failure stays on record.
pub struct PredictionLog {
    path: PathBuf,
    file: File,
    done: HashSet<String>,
}

impl PredictionLog {
    /// Opens (creating if needed) the log; every recorded image counts as finished.
    pub fn open(path: impl AsRef<Path>) -> Result<(Self, Vec<Prediction>), CoreError> {
        Self::open_with(path, FailedOnResume::Keep)
    }

    /// Opens the log; images whose latest outcome is `failed` count as finished only with
    /// [`FailedOnResume::Keep`]. Returns the latest prediction of every recorded image.
    pub fn open_with(
        path: impl AsRef<Path>,
        failed: FailedOnResume,
    ) -> Result<(Self, Vec<Prediction>), CoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
            }
        }
        let (existing, valid_len) = if path.exists() {
            read_valid_prefix(&path)?
        } else {
            (Vec::new(), 0)
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| CoreError::io(&path, e))?;
        // Cut a torn last line left by a kill mid-write.
        let len = file.metadata().map_err(|e| CoreError::io(&path, e))?.len();
        if len != valid_len {
            file.set_len(valid_len).map_err(|e| CoreError::io(&path, e))?;
        }
        let existing = latest(existing);
        let done = existing
            .iter()
            .filter(|p| failed == FailedOnResume::Keep || p.outcome != crate::Outcome::Failed)
            .map(|p| key(&p.classifier, &p.sample_id))
            .collect();
        Ok((PredictionLog { path, file, done }, existing))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_done(&self, classifier: &str, sample_id: &str) -> bool {
        self.done.contains(&key(classifier, sample_id))
    }

    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Appends one prediction and flushes it to the OS. A prediction for a sample already in
    /// the log is ignored, so resumed runs cannot write duplicates.
    pub fn append(&mut self, p: &Prediction) -> Result<bool, CoreError> {
        let k = key(&p.classifier, &p.sample_id);
        if self.done.contains(&k) {
            return Ok(false);
        }
        let mut line = serde_json::to_string(p).expect("prediction serialises");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| CoreError::io(&self.path, e))?;
        self.done.insert(k);
        Ok(true)
    }
}

fn key(classifier: &str, sample_id: &str) -> String {
    format!("{classifier}\u{0}{sample_id}")
}

/// Reads every complete prediction line; returns them and the byte length they occupy.
fn read_valid_prefix(path: &Path) -> Result<(Vec<Prediction>, u64), CoreError> {
    let f = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut reader = BufReader::new(f);
    let mut out = Vec::new();
    let mut valid = 0u64;
    let mut buf = String::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader
            .read_line(&mut buf)
            .map_err(|e| CoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if !buf.ends_with('\n') {
            // Torn final line from a killed writer: drop it.
            break;
        }
        let trimmed = buf.trim();
        if !trimmed.is_empty() {
            match serde_json::from_str::<Prediction>(trimmed) {
                Ok(mut p) => {
                    p.upgrade_legacy();
                    out.push(p)
                }
                Err(e) => {
                    return Err(CoreError::Parse {
                        path: path.to_path_buf(),
                        line: line_no,
                        message: format!("not a prediction: {e}"),
                    })
                }
            }
        }
        valid += n as u64;
    }
    Ok((out, valid))
}

/// Reads `predictions.jsonl`: the latest line of every (classifier, image), in the order the
/// images first appear (a torn last line is ignored).
pub fn read_predictions(path: impl AsRef<Path>) -> Result<Vec<Prediction>, CoreError> {
    Ok(latest(read_valid_prefix(path.as_ref())?.0))
}

/// Keeps the last prediction of each (classifier, image), at the place the image first appears.
fn latest(lines: Vec<Prediction>) -> Vec<Prediction> {
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out: Vec<Prediction> = Vec::with_capacity(lines.len());
    for p in lines {
        let k = key(&p.classifier, &p.sample_id);
        match at.get(&k) {
            Some(&i) => out[i] = p,
            None => {
                at.insert(k, out.len());
                out.push(p);
            }
        }
    }
    out
}

/// `manifest.json`: what is needed to reproduce a run exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunManifest {
    pub mica_version: String,
    pub command: String,
    pub dataset: PathBuf,
    pub split_manifest: Option<PathBuf>,
    pub seed: Option<u64>,
    pub created_unix: u64,
    /// `created_unix` in ISO 8601 UTC, for readers of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_utc: Option<String>,
    #[serde(default)]
    pub machine: BTreeMap<String, String>,
    #[serde(default)]
    pub config: serde_json::Value,
}

/// Writes a file atomically (temp file + rename), so a kill never leaves a half-written
/// checkpoint, manifest or metrics file behind.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), CoreError> {
    let path = path.as_ref();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(|e| CoreError::io(d, e))?;
    }
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let mut f = File::create(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| CoreError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| CoreError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Outcome;

    fn pred(id: &str) -> Prediction {
        let mut p = Prediction::new(id, "cnn:small", Outcome::Answered);
        p.predicted = Some("normal".into());
        p
    }

    #[test]
    fn append_then_reopen_resumes_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.jsonl");
        let (mut log, existing) = PredictionLog::open(&path).unwrap();
        assert!(existing.is_empty());
        assert!(log.append(&pred("a")).unwrap());
        assert!(log.append(&pred("b")).unwrap());
        assert!(!log.append(&pred("a")).unwrap());
        drop(log);
        let (mut log, existing) = PredictionLog::open(&path).unwrap();
        assert_eq!(existing.len(), 2);
        assert!(log.is_done("cnn:small", "b"));
        assert!(!log.append(&pred("b")).unwrap());
        assert!(log.append(&pred("c")).unwrap());
        assert_eq!(read_predictions(&path).unwrap().len(), 3);
    }

    #[test]
    fn torn_last_line_is_dropped_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.jsonl");
        let (mut log, _) = PredictionLog::open(&path).unwrap();
        log.append(&pred("a")).unwrap();
        drop(log);
        // Simulate a kill in the middle of writing the second line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"sample_id":"b","classi"#).unwrap();
        drop(f);
        let (mut log, existing) = PredictionLog::open(&path).unwrap();
        assert_eq!(existing.len(), 1);
        assert!(!log.is_done("cnn:small", "b"));
        log.append(&pred("b")).unwrap();
        let all = read_predictions(&path).unwrap();
        assert_eq!(
            all.iter().map(|p| p.sample_id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn corrupt_middle_line_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.jsonl");
        std::fs::write(&path, "not json\n").unwrap();
        let err = PredictionLog::open(&path).err().unwrap().to_string();
        assert!(err.contains("predictions.jsonl:1"), "{err}");
    }

    #[test]
    fn failed_images_are_asked_again_and_the_last_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.jsonl");
        let (mut log, _) = PredictionLog::open(&path).unwrap();
        let mut f = pred("a");
        f.outcome = Outcome::Failed;
        f.predicted = None;
        log.append(&f).unwrap();
        log.append(&pred("b")).unwrap();
        drop(log);
        let (log, _) = PredictionLog::open_with(&path, FailedOnResume::Keep).unwrap();
        assert!(log.is_done("cnn:small", "a"));
        drop(log);
        let (mut log, existing) = PredictionLog::open_with(&path, FailedOnResume::Retry).unwrap();
        assert_eq!(existing.len(), 2);
        assert!(!log.is_done("cnn:small", "a") && log.is_done("cnn:small", "b"));
        assert!(log.append(&pred("a")).unwrap());
        drop(log);
        let all = read_predictions(&path).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].sample_id.as_str(), all[0].outcome), ("a", Outcome::Answered));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn write_atomic_replaces_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/metrics.json");
        write_atomic(&path, b"1").unwrap();
        write_atomic(&path, b"2").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }
}
