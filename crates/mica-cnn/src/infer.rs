//! Batched inference behind the shared [`Classifier`] contract, with an out-of-distribution
//! verdict on every prediction ([`crate::ood`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use mica_core::{Classifier, ClassifyError, LabelSet, Outcome, Prediction, Sample};

use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::data::{self, ImageCache};
use crate::device::{self, DeviceKind};
use crate::fused::FusedNet;
use crate::model::Net;
use crate::ood::{OodStats, OodVerdict, EXTRA_KEY};
use crate::{CnnError, CpuBackend};

enum Engine {
    /// burn's network, and its compiled form when [`crate::fused`] implements every layer
    /// and is not switched off; the forward pass then runs through the compiled one.
    Cpu(Net<CpuBackend>, Option<FusedNet>),
    #[cfg(feature = "cuda")]
    Cuda(Net<burn::backend::Cuda>),
}

/// A trained CNN checkpoint, ready to classify.
pub struct CnnClassifier {
    name: String,
    meta: CheckpointMeta,
    engine: Engine,
    device: DeviceKind,
    /// Images per forward pass.
    pub batch: usize,
    /// Confidence below which a prediction is flagged `needs_review` for a physician.
    pub review_below: Option<f64>,
    /// Whether a prediction flagged "unlike the training data" is also marked `needs_review`
    /// (default: yes; a physician must look at an answer the network cannot vouch for).
    pub ood_review: bool,
    /// The checkpoint's training-feature statistics, or why there are none.
    ood: Result<OodStats, String>,
    resized: usize,
}

/// Throughput of one timed pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InferenceStats {
    pub images: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

impl CnnClassifier {
    /// Loads the best checkpoint of a `mica train` run directory.
    pub fn load(run_dir: impl AsRef<Path>, notice: &mut dyn FnMut(&str)) -> Result<Self, CnnError> {
        let dir = run_dir.as_ref();
        let kind = device::select(notice);
        let (meta, engine) = match kind {
            DeviceKind::Cpu => {
                let c = Checkpoint::<CpuBackend>::load(dir, &Default::default())?;
                let fused = if crate::fused::enabled() { FusedNet::compile(&c.model) } else { None };
                (c.meta, Engine::Cpu(c.model, fused))
            }
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => {
                let c = Checkpoint::<burn::backend::Cuda>::load(dir, &Default::default())?;
                (c.meta, Engine::Cuda(c.model))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda => unreachable!("cuda is only selected in cuda builds"),
        };
        let width = match &engine {
            Engine::Cpu(m, _) => m.feature_width(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(m) => m.feature_width(),
        };
        let ood = OodStats::read(dir, &meta, width);
        if let Err(why) = &ood {
            notice(&format!("out-of-distribution check {}: {why}", crate::ood::NOT_AVAILABLE));
        }
        Ok(CnnClassifier {
            name: format!("cnn:{}", meta.arch),
            meta,
            engine,
            device: kind,
            batch: 32,
            review_below: None,
            ood_review: true,
            ood,
            resized: 0,
        })
    }

    /// Renames the classifier (the name keys predictions in `predictions.jsonl`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn meta(&self) -> &CheckpointMeta {
        &self.meta
    }

    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// Which forward pass classifies (recorded beside the latency figures it produced):
    /// `fused-cpu` ([`crate::fused`]), `burn-cpu` (a layer the fused engine lacks, or
    /// `MICA_CNN_ENGINE=burn`) or `burn-cuda`.
    pub fn engine(&self) -> &'static str {
        match &self.engine {
            Engine::Cpu(_, Some(_)) => "fused-cpu",
            Engine::Cpu(_, None) => "burn-cpu",
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => "burn-cuda",
        }
    }

    /// The checkpoint's training-feature statistics (`ood.json`), or why the out-of-distribution
    /// check is not available for it.
    pub fn ood_stats(&self) -> Result<&OodStats, &str> {
        self.ood.as_ref().map_err(String::as_str)
    }

    /// Out-of-distribution verdicts for already-decoded images (`[0, 1]` CHW at the input
    /// size), one per image; every one says "not available" when the checkpoint has no
    /// statistics. [`Classifier::classify`] puts the same verdict on each prediction.
    pub fn ood_verdicts(&self, cache: &ImageCache) -> Vec<OodVerdict> {
        self.probabilities_and_verdicts(cache).1
    }

    /// How many images so far were not at the checkpoint's input size and were resized.
    pub fn resized_images(&self) -> usize {
        self.resized
    }

    /// Softmax probabilities for already-decoded images (`[0, 1]` CHW at the input size).
    pub fn probabilities(&self, cache: &ImageCache) -> Vec<Vec<f32>> {
        let norm = &self.meta.normalization;
        match &self.engine {
            Engine::Cpu(_, Some(f)) => crate::fused::predict_with_features(f, cache, norm, self.batch).0,
            Engine::Cpu(m, None) => crate::train::predict(m, cache, norm, self.batch, &Default::default()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(m) => crate::train::predict(m, cache, norm, self.batch, &Default::default()),
        }
    }

    /// Probabilities plus, when the checkpoint has statistics, the out-of-distribution verdict
    /// from the same forward pass (the probabilities are identical to [`Self::probabilities`]).
    fn probabilities_and_verdicts(&self, cache: &ImageCache) -> (Vec<Vec<f32>>, Vec<OodVerdict>) {
        let stats = match &self.ood {
            Ok(s) => s,
            Err(why) => {
                let v = OodVerdict::unavailable(why);
                return (self.probabilities(cache), vec![v; cache.len()]);
            }
        };
        let norm = &self.meta.normalization;
        let (probs, feats) = match &self.engine {
            Engine::Cpu(_, Some(f)) => crate::fused::predict_with_features(f, cache, norm, self.batch),
            Engine::Cpu(m, None) => crate::train::predict_with_features(m, cache, norm, self.batch, &Default::default()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(m) => crate::train::predict_with_features(m, cache, norm, self.batch, &Default::default()),
        };
        (probs, feats.iter().map(|f| stats.verdict(f)).collect())
    }

    /// One untimed forward pass of a full batch, so that timed runs exclude first-call costs
    /// (allocation, thread pool start-up, GPU kernel compilation).
    pub fn warm_up(&self) {
        let s = self.meta.input_size;
        let c = self.meta.in_channels;
        let cache = ImageCache {
            size: s,
            channels: c,
            data: vec![0.5; self.batch.max(1) * c * s * s],
            labels: vec![0; self.batch.max(1)],
            ids: vec![String::new(); self.batch.max(1)],
            resized: 0,
        };
        let _ = self.probabilities(&cache);
    }

    fn to_prediction(&self, sample: &Sample, probs: &[f32], ood: &OodVerdict, latency_ms: f64) -> Prediction {
        let labels = &self.meta.labels;
        let mut p = Prediction::new(&sample.id, &self.name, Outcome::Answered);
        p.true_label = (sample.label < labels.len()).then(|| labels.name(sample.label).to_string());
        let mut best = 0;
        for (i, &v) in probs.iter().enumerate() {
            if v > probs[best] {
                best = i;
            }
        }
        p.predicted = Some(labels.name(best).to_string());
        let conf = probs[best] as f64;
        p.confidence = Some(conf);
        p.probabilities = Some(
            probs
                .iter()
                .enumerate()
                .map(|(i, &v)| (labels.name(i).to_string(), v as f64))
                .collect::<BTreeMap<_, _>>(),
        );
        p.latency_ms = latency_ms;
        if let Some(t) = self.review_below {
            p.needs_review = conf < t;
        }
        if ood.flagged && self.ood_review {
            p.needs_review = true;
        }
        p.extra.insert(EXTRA_KEY.into(), ood.to_json());
        p
    }
}

impl Classifier for CnnClassifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self) -> &LabelSet {
        &self.meta.labels
    }

    /// Decodes the batch (each unreadable image becomes its own `Failed` result), then runs
    /// the readable ones through the network in chunks of `self.batch`. Latency per image is
    /// decode time plus its share of the forward pass. Every prediction carries the
    /// out-of-distribution verdict as `extra["ood"]` ([`OodVerdict`]); a flagged one is marked
    /// `needs_review` unless `ood_review` is off.
    fn classify(&mut self, batch: &[Sample]) -> Vec<Result<Prediction, ClassifyError>> {
        let size = self.meta.input_size;
        let ch = self.meta.in_channels;
        let mut results: Vec<Option<Result<Prediction, ClassifyError>>> = vec![None; batch.len()];
        for chunk_start in (0..batch.len()).step_by(self.batch.max(1)) {
            let chunk = &batch[chunk_start..(chunk_start + self.batch.max(1)).min(batch.len())];
            let t0 = Instant::now();
            let mut cache = ImageCache { size, channels: ch, data: Vec::new(), labels: Vec::new(), ids: Vec::new(), resized: 0 };
            let mut rows = Vec::new();
            for (k, s) in chunk.iter().enumerate() {
                match data::load_image(&s.source, size, ch) {
                    Ok((px, resized)) => {
                        self.resized += resized as usize;
                        cache.data.extend_from_slice(&px);
                        cache.labels.push(s.label);
                        cache.ids.push(s.id.clone());
                        rows.push(k);
                    }
                    Err(e) => {
                        results[chunk_start + k] = Some(Err(ClassifyError { sample_id: s.id.clone(), message: e.to_string() }));
                    }
                }
            }
            if rows.is_empty() {
                continue;
            }
            let (probs, ood) = self.probabilities_and_verdicts(&cache);
            let per_image = t0.elapsed().as_secs_f64() * 1000.0 / rows.len() as f64;
            for (r, &k) in rows.iter().enumerate() {
                results[chunk_start + k] = Some(Ok(self.to_prediction(&chunk[k], &probs[r], &ood[r], per_image)));
            }
        }
        results.into_iter().map(|r| r.expect("every image has a result")).collect()
    }
}

/// Times inference over an in-memory cache (after a warm-up): the figure the benchmark reports.
pub fn time_inference(c: &CnnClassifier, cache: &ImageCache) -> InferenceStats {
    c.warm_up();
    let t0 = Instant::now();
    let _ = c.probabilities(cache);
    let seconds = t0.elapsed().as_secs_f64();
    InferenceStats { images: cache.len(), seconds, images_per_s: cache.len() as f64 / seconds.max(1e-9) }
}
