//! Shortcut check: does an acquisition property alone predict the class?
//!
//! Public medical image sets are often assembled from several sources, one per class, and the
//! sources differ in image size, format or brightness. A model (or an LLM told the image size)
//! can then score well by recognising the source, not the disease. For each property this
//! measures Cramér's V against the class and the accuracy of a one-feature classifier (the
//! majority class of each property value) under 5-fold cross-validation, and flags a property
//! that predicts the class far above chance.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Cross-validated accuracy must beat the majority-class rate by this much to be flagged
/// (a property shared by two of four classes can reach only 50 % against 25 %)...
pub const FLAG_MARGIN: f64 = 0.10;
/// ...and the association (Cramér's V) must be at least this strong.
pub const FLAG_MIN_V: f64 = 0.4;

/// How well one property predicts the class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertyCheck {
    /// `native width`, `native height`, `aspect ratio`, `bit depth`, `file format`,
    /// `DICOM modality and manufacturer`, `file size band`, `mean intensity band`.
    pub property: String,
    /// Distinct values seen.
    pub values: usize,
    pub cramers_v: f64,
    /// Accuracy of predicting the class from this property alone, 5-fold cross-validated.
    pub cv_accuracy: f64,
    /// Accuracy of always answering the most frequent class.
    pub chance: f64,
    pub flagged: bool,
}

impl PropertyCheck {
    /// The plain-words warning a report shows for a flagged property.
    pub fn sentence(&self) -> String {
        format!(
            "{} alone predicts the class with {:.0} % accuracy on this data set (chance {:.0} %, Cramér's V {:.2}); results may reflect source differences, not disease",
            capitalise(&self.property),
            self.cv_accuracy * 100.0,
            self.chance * 100.0,
            self.cramers_v
        )
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// One image's acquisition properties, as categories.
#[derive(Debug, Clone, Default)]
pub struct Properties {
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub file_bytes: u64,
    /// Mean intensity on 0..1.
    pub mean: f64,
    /// Bits per sample as stored (8, 16, 12 for DICOM `BitsStored`, ...).
    pub bit_depth: String,
    /// DICOM modality and manufacturer; empty for other files.
    pub dicom_source: String,
}

impl Properties {
    /// The properties of one decoded image.
    pub fn of(source: &mica_core::ImageSource, img: &image::GrayImage) -> Properties {
        let path = source.path();
        let raw = img.as_raw();
        let (bit_depth, dicom_source) = crate::image::acquisition(source);
        Properties {
            width: img.width(),
            height: img.height(),
            format: path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default(),
            file_bytes: match source {
                mica_core::ImageSource::File { .. } => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                _ => 0,
            },
            mean: raw.iter().map(|&v| v as f64).sum::<f64>() / (raw.len().max(1) as f64 * 255.0),
            bit_depth,
            dicom_source,
        }
    }
}

/// Decodes every image of `ds` and checks its properties; unreadable images are left out
/// (they are reported elsewhere).
pub fn check_dataset(ds: &mica_core::Dataset) -> Vec<PropertyCheck> {
    use rayon::prelude::*;
    let rows: Vec<(Properties, usize)> = ds
        .samples
        .par_iter()
        .filter_map(|s| {
            let img = crate::image::load_gray(&s.source).ok()?;
            Some((Properties::of(&s.source, &img), s.label))
        })
        .collect();
    let (props, labels): (Vec<Properties>, Vec<usize>) = rows.into_iter().unzip();
    check(&props, &labels)
}

/// Checks every property against the class labels (`labels[i]` is image `i`'s class).
pub fn check(props: &[Properties], labels: &[usize]) -> Vec<PropertyCheck> {
    let columns: Vec<(&str, Vec<String>)> = vec![
        ("native width", props.iter().map(|p| p.width.to_string()).collect()),
        ("native height", props.iter().map(|p| p.height.to_string()).collect()),
        (
            "aspect ratio",
            props.iter().map(|p| format!("{:.2}", p.width as f64 / p.height.max(1) as f64)).collect(),
        ),
        ("bit depth", props.iter().map(|p| p.bit_depth.clone()).collect()),
        ("file format", props.iter().map(|p| p.format.clone()).collect()),
        ("DICOM modality and manufacturer", props.iter().map(|p| p.dicom_source.clone()).collect()),
        (
            "file size band",
            props.iter().map(|p| format!("2^{}", 64 - p.file_bytes.max(1).leading_zeros())).collect(),
        ),
        (
            "mean intensity band",
            props.iter().map(|p| format!("{}", ((p.mean * 5.0) as usize).min(4))).collect(),
        ),
    ];
    columns
        .into_iter()
        .map(|(name, values)| {
            let (v, distinct) = cramers_v(&values, labels);
            let chance = majority_rate(labels);
            let cv = cv_accuracy(&values, labels, 5);
            PropertyCheck {
                property: name.to_string(),
                values: distinct,
                cramers_v: v,
                cv_accuracy: cv,
                chance,
                flagged: cv - chance >= FLAG_MARGIN && v >= FLAG_MIN_V,
            }
        })
        .collect()
}

fn majority_rate(labels: &[usize]) -> f64 {
    let mut n: HashMap<usize, usize> = HashMap::new();
    for l in labels {
        *n.entry(*l).or_default() += 1;
    }
    n.values().max().copied().unwrap_or(0) as f64 / labels.len().max(1) as f64
}

/// Cramér's V of the contingency table of `values` x `labels`, and the number of distinct
/// values (0 when either side has a single category: no association can be measured).
fn cramers_v(values: &[String], labels: &[usize]) -> (f64, usize) {
    let mut vi: BTreeMap<&str, usize> = BTreeMap::new();
    let mut li: BTreeMap<usize, usize> = BTreeMap::new();
    for (v, l) in values.iter().zip(labels) {
        let n = vi.len();
        vi.entry(v.as_str()).or_insert(n);
        let n = li.len();
        li.entry(*l).or_insert(n);
    }
    let (r, c) = (vi.len(), li.len());
    if r < 2 || c < 2 {
        return (0.0, r);
    }
    let mut table = vec![vec![0f64; c]; r];
    for (v, l) in values.iter().zip(labels) {
        table[vi[v.as_str()]][li[l]] += 1.0;
    }
    let n = values.len() as f64;
    let rows: Vec<f64> = table.iter().map(|row| row.iter().sum()).collect();
    let cols: Vec<f64> = (0..c).map(|j| table.iter().map(|row| row[j]).sum()).collect();
    let mut chi2 = 0.0;
    for i in 0..r {
        for j in 0..c {
            let e = rows[i] * cols[j] / n;
            if e > 0.0 {
                chi2 += (table[i][j] - e).powi(2) / e;
            }
        }
    }
    let k = (r.min(c) - 1) as f64;
    ((chi2 / (n * k)).sqrt().min(1.0), r)
}

/// Accuracy of "the majority class of this value in the training folds" over `k` folds
/// (fold = index mod k, so the result does not depend on a random draw); a value unseen in
/// training gets the training folds' majority class.
fn cv_accuracy(values: &[String], labels: &[usize], k: usize) -> f64 {
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let mut correct = 0usize;
    for fold in 0..k {
        let mut by_value: HashMap<&str, HashMap<usize, usize>> = HashMap::new();
        let mut overall: HashMap<usize, usize> = HashMap::new();
        for i in (0..n).filter(|i| i % k != fold) {
            *by_value.entry(values[i].as_str()).or_default().entry(labels[i]).or_default() += 1;
            *overall.entry(labels[i]).or_default() += 1;
        }
        let best = |m: &HashMap<usize, usize>| m.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(l, _)| *l);
        let fallback = best(&overall);
        for i in (0..n).filter(|i| i % k == fold) {
            let guess = by_value.get(values[i].as_str()).and_then(best).or(fallback);
            correct += usize::from(guess == Some(labels[i]));
        }
    }
    correct as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(w: u32, h: u32) -> Properties {
        Properties { width: w, height: h, format: "png".into(), file_bytes: 5000, mean: 0.5, ..Default::default() }
    }

    #[test]
    fn a_size_tied_to_the_class_is_flagged_and_uniform_sizes_are_not() {
        let labels: Vec<usize> = (0..80).map(|i| i % 4).collect();
        // Classes 0 and 1 come from one source (512 px), 2 and 3 from another (256 px), with
        // a little mixing.
        let tied: Vec<Properties> = labels
            .iter()
            .enumerate()
            .map(|(i, &l)| if (l < 2) ^ (i % 10 == 0) { props(512, 512) } else { props(256, 256) })
            .collect();
        let r = check(&tied, &labels);
        let w = r.iter().find(|c| c.property == "native width").unwrap();
        assert!(w.flagged && w.cv_accuracy >= 0.35 && w.cramers_v > 0.7, "{w:?}");
        assert!(w.sentence().starts_with("Native width alone predicts the class with"), "{}", w.sentence());
        let uniform: Vec<Properties> = labels.iter().map(|_| props(256, 256)).collect();
        assert!(check(&uniform, &labels).iter().all(|c| !c.flagged && c.cramers_v == 0.0));
    }

    #[test]
    fn cramers_v_is_one_for_a_perfect_association() {
        let labels = [0, 1, 0, 1, 0, 1];
        let values: Vec<String> = labels.iter().map(|l| format!("v{l}")).collect();
        assert!((cramers_v(&values, &labels).0 - 1.0).abs() < 1e-12);
        assert!((cv_accuracy(&values, &labels, 3) - 1.0).abs() < 1e-12);
    }
}
