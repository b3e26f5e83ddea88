//! Seeded, stratified train/val/test splits and the manifest that pins a split down.
//!
//! Splits are drawn per class from samples sorted by id with a ChaCha8 stream seeded from the
//! seed and the class name, so the same files and seed give the same split on any machine,
//! regardless of directory listing order or thread count.

use std::collections::HashMap;
use std::path::Path;

use mica_core::hash::Fnv1a64;
use mica_core::{Dataset, Split};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub seed: u64,
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            seed: 42,
            train: 0.7,
            val: 0.1,
            test: 0.2,
        }
    }
}

impl SplitConfig {
    /// Ratios must be non-negative, give training something, and sum to 1.
    pub fn validate(&self) -> Result<(), String> {
        for (n, v) in [("train", self.train), ("val", self.val), ("test", self.test)] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("split ratio {n}={v} must be a number >= 0"));
            }
        }
        if self.train <= 0.0 {
            return Err("split ratio train must be > 0".into());
        }
        let sum = self.train + self.val + self.test;
        if (sum - 1.0).abs() > 1e-6 {
            return Err(format!(
                "split ratios {}/{}/{} sum to {sum}, not 1",
                self.train, self.val, self.test
            ));
        }
        Ok(())
    }
}

/// What [`assign`] did, for logs and run manifests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitSummary {
    /// True when the layout's own split was kept (possibly with val/test carved out of train).
    pub official: bool,
    /// Human-readable notes such as "val carved out of the official train split (12.5 %)".
    pub notes: Vec<String>,
}

fn class_rng(seed: u64, label: &str, salt: &str) -> ChaCha8Rng {
    // FNV-1a over the label so each class has its own stream; adding a class never reshuffles
    // the others.
    let mut h = Fnv1a64::new();
    h.update(label.as_bytes());
    h.update(&[0xff]);
    h.update(salt.as_bytes());
    ChaCha8Rng::seed_from_u64(seed ^ h.finish())
}

/// Assigns every sample a split.
///
/// Samples that already have one (official splits such as Kaggle's Training/Testing) keep it;
/// when the official split lacks val (or test), that part is carved out of train per class,
/// so the official test set is never touched. Samples without a split are split per class
/// with the configured ratios.
pub fn assign(ds: &mut Dataset, cfg: &SplitConfig) -> Result<SplitSummary, DataError> {
    cfg.validate().map_err(|m| DataError::usage(&ds.root, m))?;
    let mut summary = SplitSummary::default();
    let official = ds.samples.iter().any(|s| s.split.is_some());
    summary.official = official;

    // Indices per class, sorted by id.
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); ds.labels.len()];
    for (i, s) in ds.samples.iter().enumerate() {
        by_class[s.label].push(i);
    }
    for v in &mut by_class {
        v.sort_by(|&a, &b| ds.samples[a].id.cmp(&ds.samples[b].id));
    }

    // 1. Unsplit samples: stratified random split.
    for (label, idx) in by_class.iter().enumerate() {
        let mut free: Vec<usize> = idx.iter().copied().filter(|&i| ds.samples[i].split.is_none()).collect();
        if free.is_empty() {
            continue;
        }
        free.shuffle(&mut class_rng(cfg.seed, ds.labels.name(label), "split"));
        let n = free.len();
        let mut n_test = (n as f64 * cfg.test).round() as usize;
        let mut n_val = (n as f64 * cfg.val).round() as usize;
        // Keep at least one training image per class.
        while n_test + n_val >= n && (n_test > 0 || n_val > 0) {
            if n_val >= n_test && n_val > 0 {
                n_val -= 1;
            } else {
                n_test -= 1;
            }
        }
        for (k, &i) in free.iter().enumerate() {
            ds.samples[i].split = Some(if k < n_test {
                Split::Test
            } else if k < n_test + n_val {
                Split::Val
            } else {
                Split::Train
            });
        }
    }

    // 2. An official split without val/test: carve them out of train.
    if official {
        let has = |ds: &Dataset, s: Split| ds.samples.iter().any(|x| x.split == Some(s));
        let carve = |ds: &mut Dataset, target: Split, fraction: f64, salt: &str| {
            for (label, idx) in by_class.iter().enumerate() {
                let mut train: Vec<usize> =
                    idx.iter().copied().filter(|&i| ds.samples[i].split == Some(Split::Train)).collect();
                train.shuffle(&mut class_rng(cfg.seed, ds.labels.name(label), salt));
                let k = ((train.len() as f64) * fraction).round() as usize;
                let k = k.min(train.len().saturating_sub(1));
                for &i in &train[..k] {
                    ds.samples[i].split = Some(target);
                }
            }
        };
        if !has(ds, Split::Test) && cfg.test > 0.0 {
            carve(ds, Split::Test, cfg.test, "test");
            summary.notes.push(format!(
                "no official test split: {:.0} % of train held out as test",
                cfg.test * 100.0
            ));
        }
        if !has(ds, Split::Val) && cfg.val > 0.0 {
            let fraction = cfg.val / (cfg.train + cfg.val);
            carve(ds, Split::Val, fraction, "val");
            summary.notes.push(format!(
                "no official val split: {:.1} % of the official train split carved out as val",
                fraction * 100.0
            ));
        }
    }
    Ok(summary)
}

/// A short fingerprint (FNV-1a 64, hex) of the split: every `id,label,split` line in id
/// order. Two runs with the same fingerprint trained and tested on exactly the same images.
pub fn fingerprint(ds: &Dataset) -> String {
    let mut rows: Vec<(&str, &str, &str)> = ds
        .samples
        .iter()
        .map(|s| (s.id.as_str(), ds.labels.name(s.label), s.split.map(|x| x.as_str()).unwrap_or("")))
        .collect();
    rows.sort();
    let mut h = Fnv1a64::new();
    for (a, b, c) in rows {
        let line: [&[u8]; 6] = [a.as_bytes(), &[0], b.as_bytes(), &[0], c.as_bytes(), b"\n"];
        for part in line {
            h.update(part);
        }
    }
    format!("{:016x}", h.finish())
}

/// Writes the split as CSV `id,label,split` (sorted by id), atomically.
pub fn write_manifest(ds: &Dataset, path: &Path) -> Result<(), DataError> {
    if let Some(s) = ds.samples.iter().find(|s| s.split.is_none()) {
        return Err(DataError::invalid(
            path,
            format!("cannot write a split manifest: sample `{}` has no split yet", s.id),
        ));
    }
    let mut samples: Vec<_> = ds.samples.iter().collect();
    samples.sort_by(|a, b| a.id.cmp(&b.id));
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["id", "label", "split"]).expect("in-memory csv");
    for s in samples {
        w.write_record([
            s.id.as_str(),
            ds.labels.name(s.label),
            s.split.expect("checked").as_str(),
        ])
        .expect("in-memory csv");
    }
    let bytes = w.into_inner().expect("in-memory csv");
    mica_core::write_atomic(path, &bytes).map_err(|e| DataError::invalid(path, e.to_string()))
}

/// Applies a manifest written by [`write_manifest`]. The manifest and the dataset must list
/// exactly the same ids with the same labels; anything else means the data changed since the
/// run, and reproducing it silently on other images would be wrong.
pub fn apply_manifest(ds: &mut Dataset, path: &Path) -> Result<(), DataError> {
    let f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(f);
    let headers = rdr
        .headers()
        .map_err(|e| DataError::invalid(path, format!("malformed split manifest: {e}")))?
        .clone();
    let col = |name: &str| {
        headers.iter().position(|h| h.eq_ignore_ascii_case(name)).ok_or_else(|| {
            DataError::invalid(
                path,
                format!(
                    "split manifest lacks column `{name}` (header: {}; expected id,label,split)",
                    headers.iter().collect::<Vec<_>>().join(",")
                ),
            )
        })
    };
    let (ci, cl, cs) = (col("id")?, col("label")?, col("split")?);
    let mut wanted: HashMap<String, (String, Split)> = HashMap::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| DataError::invalid(path, format!("malformed split manifest: {e}")))?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let split = rec
            .get(cs)
            .unwrap_or("")
            .parse::<Split>()
            .map_err(|e| DataError::invalid(path, format!("line {line}: {e}")))?;
        let id = rec.get(ci).unwrap_or("").to_string();
        if wanted
            .insert(id.clone(), (rec.get(cl).unwrap_or("").to_string(), split))
            .is_some()
        {
            return Err(DataError::invalid(path, format!("line {line}: id `{id}` listed twice")));
        }
    }
    let mut missing = Vec::new();
    let mut relabelled = Vec::new();
    let mut planned = Vec::with_capacity(ds.samples.len());
    for s in &ds.samples {
        match wanted.remove(&s.id) {
            None => missing.push(s.id.clone()),
            Some((label, split)) => {
                if label != ds.labels.name(s.label) {
                    relabelled.push(format!("`{}` is `{}` here but `{label}` in the manifest", s.id, ds.labels.name(s.label)));
                }
                planned.push(split);
            }
        }
    }
    let extra: Vec<String> = {
        let mut v: Vec<String> = wanted.into_keys().collect();
        v.sort();
        v
    };
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("{} dataset images not in the manifest (first: `{}`)", missing.len(), missing[0]));
    }
    if !extra.is_empty() {
        problems.push(format!("{} manifest ids not in the dataset (first: `{}`)", extra.len(), extra[0]));
    }
    if !relabelled.is_empty() {
        problems.push(format!("{} labels differ (first: {})", relabelled.len(), relabelled[0]));
    }
    if !problems.is_empty() {
        return Err(DataError::invalid(
            path,
            format!("split manifest does not match the dataset at {}: {}", ds.root.display(), problems.join("; ")),
        ));
    }
    for (s, split) in ds.samples.iter_mut().zip(planned) {
        s.split = Some(split);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mica_core::{ImageSource, LabelSet, Layout, Modality, Sample};

    fn dataset(per_class: &[usize], split: Option<Split>) -> Dataset {
        let labels = LabelSet::new((0..per_class.len()).map(|i| format!("c{i}")).collect()).unwrap();
        let mut samples = Vec::new();
        for (c, &n) in per_class.iter().enumerate() {
            for i in 0..n {
                let id = format!("c{c}/{i:04}.png");
                samples.push(Sample {
                    source: ImageSource::file(&id),
                    id,
                    label: c,
                    split,
                    context: None,
                });
            }
        }
        Dataset {
            root: "/data".into(),
            layout: Layout::ImageFolder,
            modality: Modality::Other,
            labels,
            samples,
            skipped: vec![],
            context_columns: Vec::new(),
            label_like_context: Vec::new(),
        }
    }

    fn counts(ds: &Dataset, label: usize) -> [usize; 3] {
        Split::ALL.map(|s| ds.count(Some(s), label))
    }

    #[test]
    fn stratified_split_has_configured_ratios_per_class() {
        let mut ds = dataset(&[100, 50, 10], None);
        assign(&mut ds, &SplitConfig::default()).unwrap();
        assert_eq!(counts(&ds, 0), [70, 10, 20]);
        assert_eq!(counts(&ds, 1), [35, 5, 10]);
        assert_eq!(counts(&ds, 2), [7, 1, 2]);
    }

    #[test]
    fn same_seed_same_split_and_other_seed_differs() {
        let mut a = dataset(&[60, 60], None);
        let mut b = dataset(&[60, 60], None);
        b.samples.reverse(); // listing order must not matter
        let mut c = dataset(&[60, 60], None);
        assign(&mut a, &SplitConfig::default()).unwrap();
        assign(&mut b, &SplitConfig::default()).unwrap();
        assign(&mut c, &SplitConfig { seed: 7, ..Default::default() }).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }

    #[test]
    fn official_test_is_kept_and_val_is_carved_from_train() {
        let mut ds = dataset(&[80, 80], Some(Split::Train));
        for s in ds.samples.iter_mut().filter(|s| s.id.ends_with("9.png")) {
            s.split = Some(Split::Test);
        }
        let before: Vec<_> = ds.samples.iter().filter(|s| s.split == Some(Split::Test)).map(|s| s.id.clone()).collect();
        let sum = assign(&mut ds, &SplitConfig::default()).unwrap();
        assert!(sum.official);
        let after: Vec<_> = ds.samples.iter().filter(|s| s.split == Some(Split::Test)).map(|s| s.id.clone()).collect();
        assert_eq!(before, after);
        // 72 train per class, val = round(72 * 0.1 / 0.8) = 9.
        assert_eq!(counts(&ds, 0), [63, 9, 8]);
        assert_eq!(sum.notes.len(), 1);
    }

    #[test]
    fn bad_ratios_are_rejected() {
        let mut ds = dataset(&[10], None);
        let e = assign(&mut ds, &SplitConfig { train: 0.5, val: 0.1, test: 0.1, seed: 1 }).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("sum to"), "{e}");
    }

    #[test]
    fn manifest_round_trips_and_detects_changed_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("split.csv");
        let mut ds = dataset(&[30, 30], None);
        assign(&mut ds, &SplitConfig::default()).unwrap();
        write_manifest(&ds, &path).unwrap();

        let mut again = dataset(&[30, 30], None);
        apply_manifest(&mut again, &path).unwrap();
        assert_eq!(fingerprint(&again), fingerprint(&ds));

        let mut grown = dataset(&[31, 30], None);
        let e = apply_manifest(&mut grown, &path).unwrap_err().to_string();
        assert!(e.contains("split.csv") && e.contains("not in the manifest") && e.contains("c0/0030.png"), "{e}");

        let mut relabelled = dataset(&[30, 30], None);
        relabelled.samples[0].label = 1;
        let e = apply_manifest(&mut relabelled, &path).unwrap_err().to_string();
        assert!(e.contains("labels differ"), "{e}");
    }
}
