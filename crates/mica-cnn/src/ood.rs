//! Out-of-distribution warning: is this image like the ones the network was trained on?
//!
//! A CNN answers every image with a confident-looking label, including an image of the wrong
//! body part, the wrong modality or the wrong kind of scanner. To warn a physician, each
//! checkpoint carries statistics of its training images' features (`ood.json`, written by
//! [`crate::train()`] with the best weights once training ends) and [`crate::CnnClassifier`] puts
//! a verdict on every prediction (`Prediction.extra["ood"]`, see [`OodVerdict`]).
//!
//! # Method (`shrunk-mahalanobis-min-class`)
//! - Features: the pooled penultimate vector the linear layer reads ([`crate::Net::pool`]),
//!   of the training split's images without augmentation.
//! - Statistics: one mean per class (over that class's training images) and one covariance
//!   shared by the classes (pooled within-class scatter), as in Lee et al. 2018 "A simple
//!   unified framework for detecting out-of-distribution samples". With a few hundred images
//!   and 256-640 feature dimensions the sample covariance is singular, so it is shrunk halfway
//!   ([`SHRINKAGE`]) toward its own diagonal, and every variance gets a floor of 1 % of the mean
//!   variance (a unit that never varied in training cannot make an ordinary image's distance
//!   explode). The file stores the Cholesky factor of that matrix.
//! - Score: the Mahalanobis distance to the nearest class mean, as a root-mean-square z-score
//!   `min_c sqrt((f - mu_c)' Sigma^-1 (f - mu_c) / width)`; dividing by the width keeps
//!   scores of different architectures on a similar scale.
//! - Calibration: a training image is close to statistics fitted on itself, so its own
//!   distance would understate how far new images of the same kind fall. The training images'
//!   distances are therefore taken out of fold: the images are dealt into 5 folds (by
//!   position) and each fold is measured against statistics fitted on the other four. On
//!   synthetic chest X-rays (32 px, small CNN) the 99th percentile of these distances lies
//!   close to the largest held-out distance, while in-sample distances put a quarter to half
//!   of the held-out images above it.
//! - Threshold: [`MARGIN`] times that 99th percentile (linear interpolation, numpy's default).
//!   By construction at most 1 % of the training images lie above their own 99th percentile,
//!   and the margin pushes the false-flag rate below that; `ood.json` records the rate on the
//!   training images (out of fold) and on the validation images, which the statistics never
//!   saw.
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
pub const METHOD: &str = "shrunk-mahalanobis-min-class";
/// Threshold = `MARGIN` x the 99th percentile of the training images' distances.
///
/// 1.25 rather than 1.0: the network itself was fitted to the training images, so their
/// features are a little tighter than those of new images of the same kind; the margin keeps
/// those from being flagged. On the synthetic chest X-rays (32 px, small CNN, training seeds
/// 1-6, 60 held-out phantoms each) the largest held-out distance was 0.99-1.19 times the 99th
/// percentile and a real chest radiograph 1.65-2.6 times, i.e. 1.3-2.1 times the threshold.
pub const MARGIN: f64 = 1.25;
/// Key of the verdict in `Prediction.extra`.
pub const EXTRA_KEY: &str = "ood";
/// What a verdict says when the checkpoint has no usable statistics.
pub const NOT_AVAILABLE: &str = "not available for this checkpoint";

/// Floor added to every variance, as a share of the mean variance.
const VARIANCE_FLOOR: f64 = 0.01;
/// Weight of the diagonal in the shrunk covariance `(1 - s) S + s diag(S)`.
pub const SHRINKAGE: f64 = 0.5;
/// Folds of the out-of-fold calibration.
const FOLDS: usize = 5;

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
    /// Added to every variance: 1 % of the mean variance.
    pub variance_floor: f64,
    /// Weight of the diagonal in the shrunk covariance ([`SHRINKAGE`]).
    pub shrinkage: f64,
    /// Lower Cholesky factor `L` of the shrunk covariance (`Sigma = L L'`), rows packed: row
    /// `i` holds `L[i][0..=i]`.
    pub cholesky: Vec<f64>,
    pub train_images: usize,
    /// The training images' distances, each measured against statistics fitted without its
    /// fold (see the module documentation).
    pub train_distance: Percentiles,
    pub val_images: usize,
    /// The validation images' distances (images the statistics never saw).
    #[serde(default)]
    pub val_distance: Option<Percentiles>,
    pub margin: f64,
    /// Distances above this are flagged: `margin * train_distance.p99`.
    pub threshold: f64,
    /// Share of training images (out of fold) above the threshold.
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

/// Class means, pooled variance and the shrunk covariance's Cholesky factor of a feature set.
struct Fitted {
    classes: Vec<ClassMean>,
    variance: Vec<f64>,
    floor: f64,
    cholesky: Vec<f64>,
}

fn fit_statistics(feats: &[&[f32]], labels: &[usize], names: &LabelSet) -> Fitted {
    let width = feats[0].len();
    let k = names.len();
    let mut sums = vec![vec![0.0f64; width]; k];
    let mut counts = vec![0usize; k];
    for (f, &c) in feats.iter().zip(labels) {
        counts[c] += 1;
        for (s, &x) in sums[c].iter_mut().zip(f.iter()) {
            *s += x as f64;
        }
    }
    let classes: Vec<ClassMean> = (0..k)
        .map(|c| ClassMean {
            label: names.name(c).to_string(),
            count: counts[c],
            mean: if counts[c] == 0 {
                Vec::new()
            } else {
                sums[c].iter().map(|s| s / counts[c] as f64).collect()
            },
        })
        .collect();
    // Pooled within-class scatter (only the lower triangle is filled and read).
    let mut cov = vec![0.0f64; width * width];
    let mut r = vec![0.0f64; width];
    for (f, &c) in feats.iter().zip(labels) {
        for ((ri, &x), m) in r.iter_mut().zip(f.iter()).zip(&classes[c].mean) {
            *ri = x as f64 - m;
        }
        for i in 0..width {
            let ri = r[i];
            if ri == 0.0 {
                continue;
            }
            for (cij, rj) in cov[i * width..i * width + i + 1].iter_mut().zip(&r[..=i]) {
                *cij += ri * rj;
            }
        }
    }
    let present = counts.iter().filter(|&&n| n > 0).count();
    let dof = if feats.len() > present {
        feats.len() - present
    } else {
        feats.len()
    } as f64;
    for v in &mut cov {
        *v /= dof;
    }
    let variance: Vec<f64> = (0..width).map(|i| cov[i * width + i]).collect();
    let floor = VARIANCE_FLOOR * variance.iter().sum::<f64>() / width as f64 + 1e-12;
    // (1 - s) S + s (diag(S) + floor I): off-diagonal scaled by 1 - s, diagonal S_ii + s floor.
    for i in 0..width {
        for j in 0..i {
            cov[i * width + j] *= 1.0 - SHRINKAGE;
        }
        cov[i * width + i] += SHRINKAGE * floor;
    }
    Fitted {
        classes,
        variance,
        floor,
        cholesky: cholesky(&cov, width),
    }
}

/// Lower Cholesky factor of a symmetric positive definite `n x n` matrix (only its lower
/// triangle is read), rows packed. The shrunk covariance is diagonally floored, so a
/// non-positive pivot can only come from rounding; it is clamped rather than allowed to NaN.
fn cholesky(a: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0.0f64; n * (n + 1) / 2];
    let row = |i: usize| i * (i + 1) / 2;
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (row(i), row(j));
            let dot: f64 = l[ri..ri + j]
                .iter()
                .zip(&l[rj..rj + j])
                .map(|(x, y)| x * y)
                .sum();
            let v = a[i * n + j] - dot;
            l[ri + j] = if i == j {
                v.max(1e-300).sqrt()
            } else {
                v / l[rj + j]
            };
        }
    }
    l
}

/// `sqrt(d' Sigma^-1 d / n)` from `Sigma`'s packed Cholesky factor (forward substitution).
fn rms_mahalanobis(chol: &[f64], d: &[f64]) -> f64 {
    let n = d.len();
    let mut z = vec![0.0f64; n];
    let mut sum = 0.0;
    let mut r = 0;
    for i in 0..n {
        let dot: f64 = chol[r..r + i].iter().zip(&z[..i]).map(|(a, b)| a * b).sum();
        z[i] = (d[i] - dot) / chol[r + i];
        sum += z[i] * z[i];
        r += i + 1;
    }
    (sum / n as f64).sqrt()
}

fn nearest_class_distance(classes: &[ClassMean], chol: &[f64], f: &[f32]) -> f64 {
    let mut best = f64::INFINITY;
    let mut d = vec![0.0f64; f.len()];
    for c in classes.iter().filter(|c| c.count > 0) {
        for ((di, &x), m) in d.iter_mut().zip(f).zip(&c.mean) {
            *di = x as f64 - m;
        }
        let s = rms_mahalanobis(chol, &d);
        // NaN never wins: a NaN feature ends at infinity, hence flagged.
        if s < best {
            best = s;
        }
    }
    best
}

/// Fits the statistics to the training images' features (`train[i]` has class
/// `train_labels[i]`) and calibrates the threshold on out-of-fold distances; `val` are
/// held-out features, used only to report the false-flag rate.
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
    let all: Vec<&[f32]> = train.iter().map(Vec::as_slice).collect();
    let full = fit_statistics(&all, train_labels, labels);
    // Out-of-fold distances; with fewer than two images per fold, in-sample ones.
    let folds = FOLDS.min(train.len() / 2);
    let mut train_scores = vec![0.0f64; train.len()];
    if folds >= 2 {
        for k in 0..folds {
            let (mut fs, mut ls) = (Vec::new(), Vec::new());
            for (i, f) in all.iter().enumerate().filter(|(i, _)| i % folds != k) {
                fs.push(*f);
                ls.push(train_labels[i]);
            }
            let part = fit_statistics(&fs, &ls, labels);
            for i in (k..train.len()).step_by(folds) {
                train_scores[i] = nearest_class_distance(&part.classes, &part.cholesky, &train[i]);
            }
        }
    } else {
        for (s, f) in train_scores.iter_mut().zip(train) {
            *s = nearest_class_distance(&full.classes, &full.cholesky, f);
        }
    }
    let mut stats = OodStats {
        format: OOD_FORMAT,
        method: METHOD.into(),
        weights_fnv64: meta.weights_fnv64.clone(),
        epoch: meta.epoch,
        feature_width: width,
        classes: full.classes,
        variance: full.variance,
        variance_floor: full.floor,
        shrinkage: SHRINKAGE,
        cholesky: full.cholesky,
        train_images: train.len(),
        train_distance: Percentiles::of(&train_scores).ok_or("no finite training distances")?,
        val_images: val.len(),
        val_distance: None,
        margin: MARGIN,
        threshold: 0.0,
        train_flag_rate: 0.0,
        val_flag_rate: None,
    };
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
    /// Distance of one feature vector from the training data: the root-mean-square
    /// Mahalanobis distance to the nearest class mean (see the module documentation).
    pub fn score(&self, f: &[f32]) -> f64 {
        nearest_class_distance(&self.classes, &self.cholesky, f)
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
            || s.cholesky.len() != feature_width * (feature_width + 1) / 2
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
        // Within-class deviations are +-1 in x and +-2 in y, never both, so the pooled
        // covariance is diagonal with variances (n - k degrees of freedom: 8 vectors, 2
        // classes) 4/6 and 16/6, and the shrunk one adds half the floor to each.
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
        let (vx, vy) = (4.0 / 6.0 + 0.5 * floor, 16.0 / 6.0 + 0.5 * floor);
        assert!((s.cholesky[0] - vx.sqrt()).abs() < 1e-12 && s.cholesky[1].abs() < 1e-12);
        assert!((s.cholesky[2] - vy.sqrt()).abs() < 1e-12);

        // (1, 0): nearest mean (0, 0); z^2 = 1 / vx over 2 dimensions.
        let want = (1.0 / vx / 2.0f64).sqrt();
        assert!((s.score(&[1.0, 0.0]) - want).abs() < 1e-12);
        // The nearest class decides: (9, 0) is measured from b, not a.
        assert!((s.score(&[9.0, 0.0]) - want).abs() < 1e-12);
        // (0, 2): z^2 = 4 / vy.
        let want_y = (4.0 / vy / 2.0f64).sqrt();
        assert!((s.score(&[0.0, 2.0]) - want_y).abs() < 1e-12);

        // In sample every training vector would be at `want` or `want_y`; out of fold (4
        // folds of 2) each is measured without itself, so farther out.
        assert!(
            s.train_distance.p50 > want.max(want_y),
            "{:?}",
            s.train_distance
        );
        assert!((s.threshold - MARGIN * s.train_distance.p99).abs() < 1e-12);
        assert!(s.train_flag_rate <= 1.0 / 8.0, "{}", s.train_flag_rate);
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
        let x_at = |z: f64| (z * z * 2.0 * vx).sqrt() as f32;
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
    fn cholesky_and_mahalanobis_match_the_explicit_inverse() {
        // [[4, 2], [2, 3]] = L L' with L = [[2, 0], [1, sqrt 2]]; its inverse is
        // [[3, -2], [-2, 4]] / 8, so d = (1, 1) has d' S^-1 d = 3/8.
        let l = cholesky(&[4.0, 2.0, 2.0, 3.0], 2);
        assert_eq!(l[0], 2.0);
        assert_eq!(l[1], 1.0);
        assert!((l[2] - 2f64.sqrt()).abs() < 1e-15);
        assert!((rms_mahalanobis(&l, &[1.0, 1.0]) - (3.0f64 / 8.0 / 2.0).sqrt()).abs() < 1e-15);
        assert!((rms_mahalanobis(&l, &[1.0, -1.0]) - (11.0f64 / 8.0 / 2.0).sqrt()).abs() < 1e-15);
    }

    #[test]
    fn correlated_features_are_measured_along_their_correlation() {
        // One class whose two features move together: (1, 1) lies along the training data,
        // (1, -1) across it, at the same Euclidean and per-dimension distance. A diagonal
        // method could not tell them apart; the shrunk covariance can.
        let l1 = LabelSet::new(vec!["a".into(), "b".into()]).unwrap();
        let train: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let t = (i as f32 - 19.5) / 10.0;
                vec![t, t + if i % 2 == 0 { 0.05 } else { -0.05 }]
            })
            .collect();
        let s = fit(&train, &vec![0; 40], &l1, &[], &meta(&l1)).unwrap();
        let along = s.score(&[1.0, 1.0]);
        let across = s.score(&[1.0, -1.0]);
        assert!(across > 1.5 * along, "along {along}, across {across}");
        // At twice that offset, past the training data's end: along it is still within range,
        // across it is flagged.
        assert!(s.verdict(&[2.0, -2.0]).flagged && !s.verdict(&[2.0, 2.0]).flagged);
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
