//! [`OnnxClassifier`]: an ONNX model behind the shared [`Classifier`] contract.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use mica_core::{Classifier, ClassifyError, ImageSource, LabelSet, Modality, Outcome, Prediction, Sample};

use crate::model::OnnxModel;
use crate::preprocess::{decode, to_input};
use crate::sidecar::{sidecar_path, Sidecar};
use crate::OnnxError;

/// An ONNX image classifier with its sidecar.
pub struct OnnxClassifier {
    name: String,
    model: OnnxModel,
    /// The labels in the model's output order (mica names).
    model_labels: LabelSet,
    /// The labels in the order the run (the dataset, the server's panel) uses.
    labels: LabelSet,
    /// For output `i`, its index in `labels`.
    order: Vec<usize>,
    modality: Modality,
    /// Images per forward pass (1 whatever this says when the graph has a fixed batch of 1).
    pub batch: usize,
    /// Confidence below which a prediction is flagged `needs_review` for a physician.
    pub review_below: Option<f64>,
}

impl OnnxClassifier {
    /// Loads `path` (`.onnx`) and its sidecar (`.toml` beside it).
    pub fn load(path: &Path) -> Result<OnnxClassifier, OnnxError> {
        let side_path = sidecar_path(path);
        let sidecar = Sidecar::read_for(path)?;
        let modality = sidecar.modality(&side_path)?;
        let model_labels = sidecar.label_set(modality, &side_path)?;
        let model = OnnxModel::load_with(path, &sidecar, &side_path)?;
        Ok(OnnxClassifier {
            name: format!("onnx:{}", path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
            order: (0..model_labels.len()).collect(),
            labels: model_labels.clone(),
            model_labels,
            model,
            modality,
            batch: 16,
            review_below: None,
        })
    }

    /// Renames the classifier (the name keys predictions in `predictions.jsonl`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Answers in `labels`' order: the model's outputs must name the same classes, in any
    /// order (a Keras export sorts its classes alphabetically, mica's tasks do not).
    pub fn align_labels(&mut self, labels: &LabelSet) -> Result<(), OnnxError> {
        let mismatch = || OnnxError::Sidecar {
            path: sidecar_path(self.model.path()),
            message: format!(
                "labels [{}] are not the task's labels [{}] (one score per class, same classes, any order)",
                self.model_labels.names().join(", "),
                labels.names().join(", ")
            ),
        };
        if labels.len() != self.model_labels.len() {
            return Err(mismatch());
        }
        let order = self.model_labels.iter().map(|l| labels.index_of(l)).collect::<Option<Vec<usize>>>().ok_or_else(mismatch)?;
        self.order = order;
        self.labels = labels.clone();
        Ok(())
    }

    pub fn model(&self) -> &OnnxModel {
        &self.model
    }

    pub fn modality(&self) -> Modality {
        self.modality
    }

    /// The labels in the model's output order.
    pub fn model_labels(&self) -> &LabelSet {
        &self.model_labels
    }

    /// Class probabilities (in [`Classifier::labels`] order) for images already decoded.
    pub fn probabilities(&self, images: &[crate::Pixels]) -> Result<Vec<Vec<f32>>, OnnxError> {
        let step = self.model.max_batch(self.batch);
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(step) {
            let mut input = Vec::new();
            for px in chunk {
                to_input(&self.model.pre, px, &mut input);
            }
            for row in self.model.run(&input, chunk.len())? {
                let mut p = vec![0.0; row.len()];
                for (i, v) in row.into_iter().enumerate() {
                    p[self.order[i]] = v;
                }
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Decodes one image as the model wants it.
    pub fn decode(&self, source: &ImageSource) -> Result<crate::Pixels, OnnxError> {
        decode(&self.model.pre, source)
    }

    fn to_prediction(&self, sample: &Sample, probs: &[f32], latency_ms: f64) -> Prediction {
        let labels = &self.labels;
        let mut p = Prediction::new(&sample.id, &self.name, Outcome::Answered);
        p.true_label = (sample.label < labels.len()).then(|| labels.name(sample.label).to_string());
        let best = argmax(probs);
        p.predicted = Some(labels.name(best).to_string());
        let conf = probs[best] as f64;
        p.confidence = Some(conf);
        p.probabilities = Some(
            probs.iter().enumerate().map(|(i, &v)| (labels.name(i).to_string(), v as f64)).collect::<BTreeMap<_, _>>(),
        );
        p.latency_ms = latency_ms;
        if let Some(t) = self.review_below {
            p.needs_review = conf < t;
        }
        p
    }
}

pub(crate) fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl Classifier for OnnxClassifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self) -> &LabelSet {
        &self.labels
    }

    /// Decodes the batch (an unreadable image is its own `Failed` result) and runs the readable
    /// ones in chunks of `batch` (one at a time for a graph with a fixed batch of 1). Latency
    /// per image is decode time plus its share of the forward pass. A run error (an output
    /// that is not a distribution) fails every image of its chunk with that one-line reason.
    fn classify(&mut self, batch: &[Sample]) -> Vec<Result<Prediction, ClassifyError>> {
        let step = self.model.max_batch(self.batch);
        let mut results: Vec<Option<Result<Prediction, ClassifyError>>> = vec![None; batch.len()];
        for start in (0..batch.len()).step_by(step) {
            let chunk = &batch[start..(start + step).min(batch.len())];
            let t0 = Instant::now();
            let mut images = Vec::new();
            let mut rows = Vec::new();
            for (k, s) in chunk.iter().enumerate() {
                match self.decode(&s.source) {
                    Ok(px) => {
                        images.push(px);
                        rows.push(k);
                    }
                    Err(e) => results[start + k] = Some(Err(ClassifyError { sample_id: s.id.clone(), message: e.to_string() })),
                }
            }
            if rows.is_empty() {
                continue;
            }
            match self.probabilities(&images) {
                Ok(probs) => {
                    let per_image = t0.elapsed().as_secs_f64() * 1000.0 / rows.len() as f64;
                    for (r, &k) in rows.iter().enumerate() {
                        results[start + k] = Some(Ok(self.to_prediction(&chunk[k], &probs[r], per_image)));
                    }
                }
                Err(e) => {
                    for &k in &rows {
                        results[start + k] = Some(Err(ClassifyError { sample_id: chunk[k].id.clone(), message: e.to_string() }));
                    }
                }
            }
        }
        results.into_iter().map(|r| r.expect("every image has a result")).collect()
    }
}
