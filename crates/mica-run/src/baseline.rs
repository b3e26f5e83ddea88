//! A nearest-class-centroid classifier on downsampled pixels.
//!
//! It is the floor of every comparison: a model that cannot beat "which class's average image
//! is this one closest to" has learned nothing useful. It trains in a second on the train
//! split and needs no GPU, weights or network, so it also runs where nothing else can.

use std::collections::BTreeMap;
use std::time::Instant;

use mica_core::{Classifier, ClassifyError, LabelSet, Outcome, Prediction, Sample};

/// Side of the images the centroids are computed at.
pub const BASELINE_SIZE: u32 = 16;

pub struct CentroidClassifier {
    name: String,
    labels: LabelSet,
    centroids: Vec<Vec<f32>>,
    /// Softmax temperature over negative distances, set from the training data's spread so
    /// confidences are comparable across datasets.
    temperature: f64,
}

impl CentroidClassifier {
    /// Fits the class centroids on `train`. Unreadable training images are skipped and
    /// counted; a class without any readable image is an error.
    pub fn fit(name: &str, labels: &LabelSet, train: &[&Sample]) -> Result<(Self, usize), String> {
        let dim = (BASELINE_SIZE * BASELINE_SIZE) as usize;
        let mut sums = vec![vec![0f64; dim]; labels.len()];
        let mut counts = vec![0usize; labels.len()];
        let mut skipped = 0;
        let mut vectors = Vec::new();
        for s in train {
            match mica_data::image::load_tensor(&s.source, BASELINE_SIZE, 1) {
                Ok(v) if s.label < labels.len() => {
                    for (a, b) in sums[s.label].iter_mut().zip(&v) {
                        *a += *b as f64;
                    }
                    counts[s.label] += 1;
                    vectors.push((s.label, v));
                }
                _ => skipped += 1,
            }
        }
        if let Some(i) = counts.iter().position(|&c| c == 0) {
            return Err(format!(
                "baseline: no readable training image of class `{}`",
                labels.name(i)
            ));
        }
        let centroids: Vec<Vec<f32>> = sums
            .iter()
            .zip(&counts)
            .map(|(s, &c)| s.iter().map(|v| (*v / c as f64) as f32).collect())
            .collect();
        // Mean distance of a training image to its own centroid sets the temperature.
        let mean_d = vectors
            .iter()
            .map(|(l, v)| dist(v, &centroids[*l]))
            .sum::<f64>()
            / vectors.len().max(1) as f64;
        Ok((
            CentroidClassifier {
                name: name.to_string(),
                labels: labels.clone(),
                centroids,
                temperature: (mean_d * 0.25).max(1e-6),
            },
            skipped,
        ))
    }

    fn predict(&self, sample: &Sample, v: &[f32], latency_ms: f64) -> Prediction {
        let d: Vec<f64> = self.centroids.iter().map(|c| dist(v, c)).collect();
        let dmin = d.iter().copied().fold(f64::INFINITY, f64::min);
        let w: Vec<f64> = d.iter().map(|x| (-(x - dmin) / self.temperature).exp()).collect();
        let z: f64 = w.iter().sum();
        let probs: Vec<f64> = w.iter().map(|x| x / z).collect();
        let best = (0..probs.len())
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .expect("at least one class");
        let mut p = Prediction::new(&sample.id, &self.name, Outcome::Answered);
        p.true_label = (sample.label < self.labels.len()).then(|| self.labels.name(sample.label).to_string());
        p.predicted = Some(self.labels.name(best).to_string());
        p.confidence = Some(probs[best]);
        p.probabilities = Some(
            probs
                .iter()
                .enumerate()
                .map(|(i, &v)| (self.labels.name(i).to_string(), v))
                .collect::<BTreeMap<_, _>>(),
        );
        p.latency_ms = latency_ms;
        p
    }
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x - *y) as f64;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

impl Classifier for CentroidClassifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self) -> &LabelSet {
        &self.labels
    }

    fn classify(&mut self, batch: &[Sample]) -> Vec<Result<Prediction, ClassifyError>> {
        batch
            .iter()
            .map(|s| {
                let t0 = Instant::now();
                let v = mica_data::image::load_tensor(&s.source, BASELINE_SIZE, 1).map_err(|e| ClassifyError {
                    sample_id: s.id.clone(),
                    message: e.to_string(),
                })?;
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                Ok(self.predict(s, &v, ms))
            })
            .collect()
    }
}
