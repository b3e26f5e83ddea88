//! Out-of-distribution warning: is this image like the ones the network was trained on?
//!
//! A CNN answers every image with a confident-looking label, including an image of the wrong
//! body part, the wrong modality or the wrong kind of scanner. To warn a physician, each
//! checkpoint carries statistics of its training images' features (`ood.json`, written by
//! [`crate::train()`] with the best weights once training ends) and [`crate::CnnClassifier`] puts
//! a verdict on every prediction (`Prediction.extra["ood"]`, see [`OodVerdict`]).
//!
//! # Method (`diag-mahalanobis-min-class`)
//! - Features: the pooled penultimate vector the linear layer reads ([`crate::Net::pool`]),
//!   of the training split's images without augmentation.
//! - Statistics: one mean per class (over that class's training images) and one pooled
//!   within-class variance per feature dimension (a diagonal, class-shared covariance, as in
//!   Lee et al. 2018 "A simple unified framework for detecting out-of-distribution samples",
//!   restricted to the diagonal so the file stays small for 640-wide features and the estimate
//!   stays stable with a few hundred training images). Each variance gets a floor of 1 % of the
//!   mean variance, so a unit that never varied in training cannot make an ordinary image's
//!   distance explode.
//! - Score: the distance to the nearest class mean, as a root-mean-square z-score
//!   `min_c sqrt(mean_d (f_d - mu_cd)^2 / (var_d + floor))`; dividing by the width keeps it
//!   near 1 for typical training images whatever the architecture.
//! - Threshold: [`MARGIN`] times the 99th percentile (linear interpolation, numpy's default)
//!   of the training images' own scores. By construction at most 1 % of the training images
//!   lie above their own 99th percentile, and the margin pushes the false-flag rate on
//!   training images below that; `ood.json` records the rate measured on the training images
//!   and, more honestly, on the validation images, which the statistics never saw.
//!
//! A flag means "unlike the training data", not "abnormal": it says the label should not be
//! trusted, and the classifier marks such predictions `needs_review`.

use std::path::Path;

use mica_core::{write_atomic, LabelSet, Prediction};
use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointMeta;
use crate::CnnError;

/// The statistics file, next to `checkpoint.json`.
pub const OOD_FILE: &str = "ood.json";
/// Version of [`OOD_FILE`]'s layout; a file of another version is ignored (check unavailable).
pub const OOD_FORMAT: u32 = 1;
/// Machine-readable name of the method, stored in the file and on every verdict.
pub const METHOD: &str = "diag-mahalanobis-min-class";
/// Threshold = `MARGIN` x the 99th percentile of the training images' distances.
///
/// 1.25 rather than 1.0: training images sit closer to their own statistics than new images
/// of the same kind do (the network was fitted to them), so the raw 99th percentile flags
/// several percent of held-out in-distribution images; measured on the synthetic chest X-rays
/// (32 px, small CNN) the margin brings that down while a real radiograph stays far above.
pub const MARGIN: f64 = 1.25;
/// Key of the verdict in `Prediction.extra`.
pub const EXTRA_KEY: &str = "ood";
/// What a verdict says when the checkpoint has no usable statistics.
pub const NOT_AVAILABLE: &str = "not available for this checkpoint";

/// Floor added to every variance, as a share of the mean variance.
const VARIANCE_FLOOR: f64 = 0.01;

/// Summary of a set of distances.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(scores: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = scores.iter().copied().filter(|s| s.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Percentiles {
            p50: percentile(&v, 0.50),
            p95: percentile(&v, 0.95),
            p99: percentile(&v, 0.99),
            max: v[v.len() - 1],
        })
    }
}

/// Linear-interpolation percentile of sorted values (numpy's default method).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// One class's feature mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMean {
    pub label: String,
    /// Training images of this class; a class without any has no mean and is skipped.
    pub count: usize,
    pub mean: Vec<f64>,
}

/// The content of `ood.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodStats {
    pub format: u32,
    pub method: String,
    /// FNV-1a 64 of the weights the features came from (`CheckpointMeta::weights_fnv64`):
    /// statistics of other weights are refused rather than silently misapplied.
    pub weights_fnv64: String,
    /// Epoch of those weights.
    pub epoch: usize,
    pub feature_width: usize,
    pub classes: Vec<ClassMean>,
    /// Pooled within-class variance per feature dimension (before the floor).
    pub variance: Vec<f64>,
    /// Added to every variance: [`VARIANCE_FLOOR`] x the mean variance.
    pub variance_floor: f64,
    pub train_images: usize,
    /// The training images' own distances.
    pub train_distance: Percentiles,
    pub val_images: usize,
    /// The validation images' distances (images the statistics never saw).
    #[serde(default)]
    pub val_distance: Option<Percentiles>,
    pub margin: f64,
    /// Distances above this are flagged: `margin * train_distance.p99`.
    pub threshold: f64,
    /// Share of training images above the threshold.
    pub train_flag_rate: f64,
    /// Share of validation images above the threshold: the expected false-flag rate on new
    /// images like the training data.
    #[serde(default)]
    pub val_flag_rate: Option<f64>,
}

/// The out-of-distribution check's answer for one image, stored as `Prediction.extra["ood"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodVerdict {
    /// False when the checkpoint has no usable statistics (then `flagged` is false too).
    pub available: bool,
    /// The image is unlike the training data: its label should not be trusted.
    pub flagged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// One sentence for the case page.
    pub message: String,
}

impl OodVerdict {
    /// The verdict of a checkpoint without usable statistics; `why` says what is missing.
    pub fn unavailable(why: &str) -> Self {
        OodVerdict {
            available: false,
            flagged: false,
            score: None,
            threshold: None,
            method: None,
            message: format!("out-of-distribution check {NOT_AVAILABLE} ({why})"),
        }
    }

    /// The verdict a CNN prediction carries, if any.
    pub fn from_prediction(p: &Prediction) -> Option<Self> {
        serde_json::from_value(p.extra.get(EXTRA_KEY)?.clone()).ok()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("verdict serialises")
    }
}

/// Fits the statistics to the training images' features (`train[i]` has class
/// `train_labels[i]`) and calibrates the threshold; `val` are held-out features, used only to
/// report the false-flag rate.
pub fn fit(
    train: &[Vec<f32>],
    train_labels: &[usize],
    labels: &LabelSet,
    val: &[Vec<f32>],
    meta: &CheckpointMeta,
) -> Result<OodStats, String> {
    let width = train.first().map(Vec::len).ok_or("no training features")?;
    if width == 0 || train.iter().chain(val).any(|f| f.len() != width) {
        return Err("feature vectors differ in width".into());
    }
    if train_labels.len() != train.len() || train_labels.iter().any(|&l| l >= labels.len()) {
        return Err("training labels do not match the features".into());
    }
    let k = labels.len();
    let mut sums = vec![vec![0.0f64; width]; k];
    let mut counts = vec![0usize; k];
    for (f, &c) in train.iter().zip(train_labels) {
        counts[c] += 1;
        for (s, &x) in sums[c].iter_mut().zip(f) {
            *s += x as f64;
        }
    }
    let classes: Vec<ClassMean> = (0..k)
        .map(|c| ClassMean {
            label: labels.name(c).to_string(),
            count: counts[c],
            mean: if counts[c] == 0 {
                Vec::new()
            } else {
                sums[c].iter().map(|s| s / counts[c] as f64).collect()
            },
        })
        .collect();
    let mut variance = vec![0.0f64; width];
    for (f, &c) in train.iter().zip(train_labels) {
        for ((v, &x), m) in variance.iter_mut().zip(f).zip(&classes[c].mean) {
            *v += (x as f64 - m).powi(2);
        }
    }
    let present = counts.iter().filter(|&&n| n > 0).count();
    let dof = if train.len() > present {
        train.len() - present
    } else {
        train.len()
    };
    for v in &mut variance {
        *v /= dof as f64;
    }
    let mean_var = variance.iter().sum::<f64>() / width as f64;
    let mut stats = OodStats {
        format: OOD_FORMAT,
        method: METHOD.into(),
        weights_fnv64: meta.weights_fnv64.clone(),
        epoch: meta.epoch,
        feature_width: width,
        classes,
        variance,
        variance_floor: VARIANCE_FLOOR * mean_var + 1e-12,
        train_images: train.len(),
        train_distance: Percentiles {
            p50: 0.0,
            p95: 0.0,
            p99: 0.0,
            max: 0.0,
        },
        val_images: val.len(),
        val_distance: None,
        margin: MARGIN,
        threshold: 0.0,
        train_flag_rate: 0.0,
        val_flag_rate: None,
    };
    let train_scores: Vec<f64> = train.iter().map(|f| stats.score(f)).collect();
    stats.train_distance = Percentiles::of(&train_scores).ok_or("no finite training distances")?;
    stats.threshold = stats.margin * stats.train_distance.p99;
    let rate = |scores: &[f64], t: f64| {
        scores.iter().filter(|&&s| !(s <= t)).count() as f64 / scores.len() as f64
    };
    stats.train_flag_rate = rate(&train_scores, stats.threshold);
    if !val.is_empty() {
        let val_scores: Vec<f64> = val.iter().map(|f| stats.score(f)).collect();
        stats.val_distance = Percentiles::of(&val_scores);
        stats.val_flag_rate = Some(rate(&val_scores, stats.threshold));
    }
    Ok(stats)
}

impl OodStats {
    /// Distance of one feature vector from the training data: the root-mean-square z-score to
    /// the nearest class mean (see the module documentation).
    pub fn score(&self, f: &[f32]) -> f64 {
        let mut best = f64::INFINITY;
        for c in self.classes.iter().filter(|c| c.count > 0) {
            let mut sum = 0.0f64;
            for ((&x, m), v) in f.iter().zip(&c.mean).zip(&self.variance) {
                sum += (x as f64 - m).powi(2) / (v + self.variance_floor);
            }
            best = best.min((sum / self.feature_width as f64).sqrt());
        }
        best
    }

    /// The verdict for one feature vector. A non-finite score (a NaN feature) is flagged.
    pub fn verdict(&self, f: &[f32]) -> OodVerdict {
        if f.len() != self.feature_width {
            return OodVerdict::unavailable(&format!(
                "features are {} wide, the statistics {}",
                f.len(),
                self.feature_width
            ));
        }
        let score = self.score(f);
        let flagged = !(score <= self.threshold);
        let message = if flagged {
            format!(
                "unlike the training data: feature distance {score:.2} is above the threshold {:.2} \
                 ({} x the 99th percentile of the training images' distances); do not trust this label",
                self.threshold, self.margin
            )
        } else {
            format!(
                "like the training data (feature distance {score:.2}, threshold {:.2})",
                self.threshold
            )
        };
        OodVerdict {
            available: true,
            flagged,
            score: Some(if score.is_finite() { score } else { f64::MAX }),
            threshold: Some(self.threshold),
            method: Some(self.method.clone()),
            message,
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(), CnnError> {
        let json = serde_json::to_vec_pretty(self).expect("statistics serialise");
        write_atomic(dir.join(OOD_FILE), &json)?;
        Ok(())
    }

    /// Reads a checkpoint's statistics. `Err` says, in a few words, why the check is not
    /// available: no file (a checkpoint from before this check), an unreadable or newer file,
    /// or statistics of other weights or another network width.
    pub fn read(dir: &Path, meta: &CheckpointMeta, feature_width: usize) -> Result<Self, String> {
        let path = dir.join(OOD_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("the checkpoint has no {OOD_FILE}; it was trained before mica recorded training-feature statistics"))
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let format = v.get("format").and_then(|f| f.as_u64());
        if format != Some(OOD_FORMAT as u64) {
            return Err(format!(
                "{}: format {format:?} is not supported (this mica reads {OOD_FORMAT})",
                path.display()
            ));
        }
        let s: OodStats = serde_json::from_value(v)
            .map_err(|e| format!("{}: not OOD statistics: {e}", path.display()))?;
        if s.method != METHOD {
            return Err(format!("{}: unknown method `{}`", path.display(), s.method));
        }
        if s.weights_fnv64 != meta.weights_fnv64 {
            return Err(format!(
                "{}: the statistics belong to other weights",
                path.display()
            ));
        }
        let k = meta.labels.len();
        if s.feature_width != feature_width
            || s.variance.len() != feature_width
            || s.classes.len() != k
            || s.classes
                .iter()
                .any(|c| c.count > 0 && c.mean.len() != feature_width)
            || !s.threshold.is_finite()
        {
            return Err(format!(
                "{}: the statistics do not fit this network",
                path.display()
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Normalization;
    use crate::model::Arch;
    use mica_core::Modality;

    fn meta(labels: &LabelSet) -> CheckpointMeta {
        CheckpointMeta {
            format: crate::checkpoint::FORMAT_VERSION,
            arch: Arch::Small,
            labels: labels.clone(),
            modality: Modality::Other,
            in_channels: 1,
            input_size: 16,
            normalization: Normalization {
                mean: vec![0.5],
                std: vec![0.25],
            },
            weights_file: "model-e0001.mpk".into(),
            weights_fnv64: "00000000deadbeef".into(),
            epoch: 1,
            val_macro_f1: 1.0,
            val_accuracy: 1.0,
            seed: 1,
            mica_version: "test".into(),
            pretrained_from: None,
        }
    }

    fn ab() -> LabelSet {
        LabelSet::new(vec!["a".into(), "b".into(), "c".into()]).unwrap()
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=11).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 0.5), 6.0);
        assert!((percentile(&v, 0.95) - 10.5).abs() < 1e-12);
        assert!((percentile(&v, 0.99) - 10.9).abs() < 1e-12);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }

    #[test]
    fn distances_thresholds_and_verdicts_from_hand_made_vectors() {
        // Class a around (0, 0), class b around (10, 0); class c has no training images.
        // Within-class deviations are +-1 in x and +-2 in y, so the pooled variances (n - k
        // degrees of freedom: 8 vectors, 2 classes) are 4/6 and 16/6.
        let train: Vec<Vec<f32>> = vec![
            vec![1.0, 0.0],
            vec![-1.0, 0.0],
            vec![0.0, 2.0],
            vec![0.0, -2.0],
            vec![11.0, 0.0],
            vec![9.0, 0.0],
            vec![10.0, 2.0],
            vec![10.0, -2.0],
        ];
        let labels = vec![0, 0, 0, 0, 1, 1, 1, 1];
        let m = meta(&ab());
        let val = vec![vec![0.5f32, 0.5], vec![30.0, 0.0]];
        let s = fit(&train, &labels, &ab(), &val, &m).unwrap();
        assert_eq!(s.classes[0].mean, vec![0.0, 0.0]);
        assert_eq!(s.classes[1].mean, vec![10.0, 0.0]);
        assert_eq!(s.classes[2].count, 0);
        assert!((s.variance[0] - 4.0 / 6.0).abs() < 1e-12);
        assert!((s.variance[1] - 16.0 / 6.0).abs() < 1e-12);
        let floor = 0.01 * (20.0 / 6.0) / 2.0 + 1e-12;
        assert!((s.variance_floor - floor).abs() < 1e-12);

        // (1, 0): nearest mean (0, 0); z^2 = 1 / (4/6 + floor) over 2 dimensions.
        let want = (1.0 / (4.0 / 6.0 + floor) / 2.0f64).sqrt();
        assert!((s.score(&[1.0, 0.0]) - want).abs() < 1e-12);
        // The nearest class decides: (9, 0) is measured from b, not a.
        assert!((s.score(&[9.0, 0.0]) - want).abs() < 1e-12);
        // (0, 2): z^2 = 4 / (16/6 + floor).
        let want_y = (4.0 / (16.0 / 6.0 + floor) / 2.0f64).sqrt();
        assert!((s.score(&[0.0, 2.0]) - want_y).abs() < 1e-12);

        // Training distances: four at `want`, four at `want_y`; p99 by linear interpolation.
        let mut d = [want, want, want, want, want_y, want_y, want_y, want_y];
        d.sort_by(f64::total_cmp);
        assert!((s.train_distance.p99 - percentile(&d, 0.99)).abs() < 1e-12);
        assert!((s.threshold - MARGIN * s.train_distance.p99).abs() < 1e-12);
        assert_eq!(s.train_flag_rate, 0.0);
        assert_eq!(s.val_images, 2);
        assert_eq!(
            s.val_flag_rate,
            Some(0.5),
            "(30, 0) is flagged, (0.5, 0.5) is not"
        );

        let near = s.verdict(&[0.5, 0.5]);
        assert!(near.available && !near.flagged, "{near:?}");
        assert!(
            near.message.contains("like the training data"),
            "{}",
            near.message
        );
        let far = s.verdict(&[30.0, 0.0]);
        assert!(
            far.flagged && far.score.unwrap() > far.threshold.unwrap(),
            "{far:?}"
        );
        assert!(
            far.message.starts_with("unlike the training data"),
            "{}",
            far.message
        );
        assert_eq!(far.method.as_deref(), Some(METHOD));
        // Just above and just below the threshold along x from class a's mean.
        let x_at = |z: f64| (z * z * 2.0 * (4.0 / 6.0 + floor)).sqrt() as f32;
        assert!(!s.verdict(&[x_at(s.threshold) * 0.999, 0.0]).flagged);
        assert!(s.verdict(&[x_at(s.threshold) * 1.001, 0.0]).flagged);
        // A NaN feature is flagged, never silently passed.
        assert!(s.verdict(&[f32::NAN, 0.0]).flagged);

        // The verdict survives the trip through Prediction.extra.
        let mut p = Prediction::new("x", "cnn:small", mica_core::Outcome::Answered);
        p.extra.insert(EXTRA_KEY.into(), far.to_json());
        assert_eq!(OodVerdict::from_prediction(&p), Some(far));
        let j = s.verdict(&[0.0, 0.0]).to_json();
        for k in ["score", "threshold", "flagged", "method"] {
            assert!(j.get(k).is_some(), "{k} missing from {j}");
        }
    }

    #[test]
    fn file_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta(&ab());
        let train = vec![
            vec![0.0f32, 1.0],
            vec![1.0, 0.0],
            vec![2.0, 2.0],
            vec![3.0, 1.0],
        ];
        let s = fit(&train, &[0, 0, 1, 1], &ab(), &[], &m).unwrap();
        assert_eq!(s.val_flag_rate, None);

        let err = OodStats::read(dir.path(), &m, 2).unwrap_err();
        assert!(err.contains("no ood.json"), "{err}");
        assert!(OodVerdict::unavailable(&err)
            .message
            .contains(NOT_AVAILABLE));

        s.write(dir.path()).unwrap();
        assert_eq!(OodStats::read(dir.path(), &m, 2).unwrap(), s);
        let err = OodStats::read(dir.path(), &m, 3).unwrap_err();
        assert!(err.contains("do not fit"), "{err}");
        let mut other = m.clone();
        other.weights_fnv64 = "0000000000000001".into();
        let err = OodStats::read(dir.path(), &other, 2).unwrap_err();
        assert!(err.contains("other weights"), "{err}");

        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(OOD_FILE)).unwrap()).unwrap();
        v["format"] = 99.into();
        std::fs::write(dir.path().join(OOD_FILE), v.to_string()).unwrap();
        let err = OodStats::read(dir.path(), &m, 2).unwrap_err();
        assert!(err.contains("format"), "{err}");
        std::fs::write(dir.path().join(OOD_FILE), "{").unwrap();
        assert!(OodStats::read(dir.path(), &m, 2)
            .unwrap_err()
            .contains("not JSON"));

        // Bad input to fit is an error, not a panic.
        assert!(fit(&[], &[], &ab(), &[], &m).is_err());
        assert!(fit(&[vec![1.0], vec![1.0, 2.0]], &[0, 0], &ab(), &[], &m).is_err());
        assert!(fit(&[vec![1.0]], &[5], &ab(), &[], &m).is_err());
    }
}
