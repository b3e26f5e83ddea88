//! Checkpoints: `checkpoint.json` (everything needed to use the weights) next to the
//! weights file it names (`model-eNNNN.mpk`).
//!
//! The JSON carries the architecture, label set, input size, channels and normalisation, so
//! `mica classify` needs nothing but the run directory, and it records a hash of the weights
//! file so that a truncated or swapped file is caught before burn tries to read it.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::Backend;
use mica_core::{write_atomic, LabelSet, Modality};
use serde::{Deserialize, Serialize};

use crate::data::Normalization;
use crate::model::{Arch, Net};
use crate::CnnError;

pub const META_FILE: &str = "checkpoint.json";
/// 2: the small CNN's head pools average and max (its linear layer is twice as wide).
pub const FORMAT_VERSION: u32 = 2;

pub(crate) type Rec = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    pub arch: Arch,
    pub labels: LabelSet,
    pub modality: Modality,
    pub in_channels: usize,
    pub input_size: usize,
    pub normalization: Normalization,
    pub weights_file: String,
    /// FNV-1a 64 of the weights file, hex.
    pub weights_fnv64: String,
    /// Epoch (1-based) the weights come from and its validation scores.
    pub epoch: usize,
    pub val_macro_f1: f64,
    pub val_accuracy: f64,
    pub seed: u64,
    pub mica_version: String,
    /// Where transfer-learning weights came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained_from: Option<String>,
}

/// A loaded checkpoint: metadata plus the network on a backend.
pub struct Checkpoint<B: Backend> {
    pub meta: CheckpointMeta,
    pub model: Net<B>,
    pub dir: PathBuf,
}

/// The weights-file checksum as stored in `weights_fnv64`: FNV-1a 64, 16 hex digits.
pub fn fnv64(bytes: &[u8]) -> String {
    format!("{:016x}", mica_core::hash::fnv1a64(bytes))
}

/// Serialises a network's weights (mpk bytes).
pub fn model_bytes<B: Backend>(model: &Net<B>) -> Result<Vec<u8>, CnnError> {
    Recorder::<B>::record(&Rec::default(), model.clone().into_record(), ())
        .map_err(|e| CnnError::Checkpoint { path: PathBuf::new(), message: e.to_string() })
}

/// Decodes weights into a freshly built network of the right shape.
///
/// burn does not check tensor shapes when loading a record, so the metadata (architecture,
/// channels, classes) must be validated first; a record whose structure does not fit is an
/// error, and a panic inside burn is caught and reported instead of aborting.
pub fn model_from_bytes<B: Backend>(
    meta: &CheckpointMeta,
    bytes: Vec<u8>,
    device: &B::Device,
    path: &Path,
) -> Result<Net<B>, CnnError> {
    let err = |message: String| CnnError::Checkpoint { path: path.to_path_buf(), message };
    let load = |layout: u32, bytes: Vec<u8>| -> Result<Net<B>, CnnError> {
        let fresh = Net::<B>::with_layout(meta.arch, layout, meta.in_channels, meta.labels.len(), device);
        let record = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Recorder::<B>::load::<<Net<B> as Module<B>>::Record>(&Rec::default(), bytes, device)
        }))
        .map_err(|_| err("weights do not decode as this architecture".into()))?
        .map_err(|e| err(format!("weights do not decode: {e}")))?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fresh.load_record(record)))
            .map_err(|_| err("weights do not fit this architecture".into()))
    };
    let mut model = load(crate::model::MOBILENET_LAYOUT, bytes.clone())?;
    // The MobileNet layouts share every parameter but the classifier's input width (mean
    // pooling in layout 0, mean and maximum since): a checkpoint of the earlier layout is
    // recognised by it and rebuilt with that layout's strides and pooling.
    if meta.arch == crate::Arch::Mobilenet && model.fc.weight.dims()[0] == crate::model::MobileNetV2::<B>::LAST {
        model = load(0, bytes)?;
    }
    check_shapes(&model, meta).map_err(err)?;
    Ok(model)
}

/// The classifier layer's shape must match the label set and the first conv the channels.
fn check_shapes<B: Backend>(model: &Net<B>, meta: &CheckpointMeta) -> Result<(), String> {
    let [_, classes] = model.fc.weight.dims();
    if classes != meta.labels.len() {
        return Err(format!(
            "weights have {classes} classes but the metadata lists {}",
            meta.labels.len()
        ));
    }
    Ok(())
}

impl CheckpointMeta {
    pub fn read(dir: &Path) -> Result<Self, CnnError> {
        let path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| CnnError::Checkpoint {
            path: path.clone(),
            message: if e.kind() == std::io::ErrorKind::NotFound {
                "not found: is this a `mica train` run directory?".into()
            } else {
                e.to_string()
            },
        })?;
        let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| CnnError::Checkpoint {
            path: path.clone(),
            message: format!("not a checkpoint description: {e}"),
        })?;
        if meta.format != FORMAT_VERSION {
            return Err(CnnError::Checkpoint {
                path,
                message: format!(
                    "checkpoint format {} is not supported (this mica reads format {FORMAT_VERSION})",
                    meta.format
                ),
            });
        }
        Ok(meta)
    }

    /// Errors when a dataset's label set differs from the checkpoint's (order matters: the
    /// index of a label is its output unit).
    pub fn check_labels(&self, labels: &LabelSet, dir: &Path) -> Result<(), CnnError> {
        if &self.labels != labels {
            return Err(CnnError::LabelMismatch {
                path: dir.join(META_FILE),
                checkpoint: self.labels.names().join(", "),
                dataset: labels.names().join(", "),
            });
        }
        Ok(())
    }
}

impl<B: Backend> Checkpoint<B> {
    /// Loads `checkpoint.json` and the weights it names from a run directory.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, CnnError> {
        let dir = dir.as_ref();
        let meta = CheckpointMeta::read(dir)?;
        let wpath = dir.join(&meta.weights_file);
        let bytes = std::fs::read(&wpath).map_err(|e| CnnError::Checkpoint {
            path: wpath.clone(),
            message: e.to_string(),
        })?;
        if fnv64(&bytes) != meta.weights_fnv64 {
            return Err(CnnError::Checkpoint {
                path: wpath,
                message: "weights file is corrupt or does not belong to this checkpoint (hash mismatch)"
                    .into(),
            });
        }
        let model = model_from_bytes(&meta, bytes, device, &wpath)?;
        Ok(Checkpoint { meta, model, dir: dir.to_path_buf() })
    }
}

/// Writes the weights under a new name, then the metadata that points at them (both
/// atomically), then removes the previous weights: a kill at any moment leaves a checkpoint
/// that loads, either the old one or the new one.
pub fn save<B: Backend>(dir: &Path, meta: &mut CheckpointMeta, model: &Net<B>) -> Result<(), CnnError> {
    let bytes = model_bytes(model)?;
    let old = CheckpointMeta::read(dir).ok().map(|m| m.weights_file);
    meta.weights_fnv64 = fnv64(&bytes);
    meta.weights_file = format!("model-e{:04}.mpk", meta.epoch);
    write_atomic(dir.join(&meta.weights_file), &bytes)?;
    let json = serde_json::to_vec_pretty(meta).expect("meta serialises");
    write_atomic(dir.join(META_FILE), &json)?;
    if let Some(old) = old.filter(|o| o != &meta.weights_file) {
        let _ = std::fs::remove_file(dir.join(old));
    }
    Ok(())
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Tensor, TensorData};

    fn meta(arch: Arch) -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT_VERSION,
            arch,
            labels: LabelSet::new(vec!["a".into(), "b".into(), "c".into()]).unwrap(),
            modality: Modality::Other,
            in_channels: 1,
            input_size: 32,
            normalization: Normalization { mean: vec![0.5], std: vec![0.25] },
            weights_file: "model.mpk".into(),
            weights_fnv64: "0".into(),
            epoch: 1,
            val_macro_f1: 0.0,
            val_accuracy: 0.0,
            seed: 1,
            mica_version: "test".into(),
            pretrained_from: None,
        }
    }

    /// A MobileNet saved before layout 1 loads as layout 0 and gives the same logits; one
    /// saved now loads as the current layout.
    #[test]
    fn mobilenet_checkpoints_of_both_layouts_load_as_saved() {
        let d = Default::default();
        let v: Vec<f32> = (0..2 * 32 * 32).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let x = Tensor::<Flex, 4>::from_data(TensorData::new(v, [2, 1, 32, 32]), &d);
        for layout in [0, crate::model::MOBILENET_LAYOUT] {
            let saved = Net::<Flex>::with_layout(Arch::Mobilenet, layout, 1, 3, &d);
            let want: Vec<f32> = saved.forward(x.clone(), None).into_data().to_vec().unwrap();
            let bytes = model_bytes(&saved).unwrap();
            let loaded = model_from_bytes::<Flex>(&meta(Arch::Mobilenet), bytes, &d, Path::new("model.mpk")).unwrap();
            let crate::model::Backbone::Mobilenet(m) = &loaded.backbone else { panic!("not a MobileNet") };
            assert_eq!(m.layout, layout);
            let got: Vec<f32> = loaded.forward(x.clone(), None).into_data().to_vec().unwrap();
            assert_eq!(got, want, "layout {layout}");
        }
    }
}
