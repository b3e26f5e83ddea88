//! What the web app's test files share.

use std::path::Path;

use mica_core::Modality;

/// A small CNN checkpoint of `modality`'s canonical labels with its initial (random) weights:
/// a real `mica train`-format run directory the panel loads, whose confidences on four classes
/// are far below 0.99.
pub fn write_checkpoint(dir: &Path, modality: Modality) {
    use mica_cnn::checkpoint::{self, CheckpointMeta, FORMAT_VERSION};
    use mica_cnn::{Arch, CpuBackend, Net, Normalization};
    std::fs::create_dir_all(dir).unwrap();
    let labels = modality.canonical_labels().unwrap();
    let model = Net::<CpuBackend>::new(Arch::Small, 1, labels.len(), &Default::default());
    let mut meta = CheckpointMeta {
        format: FORMAT_VERSION,
        arch: Arch::Small,
        labels,
        modality,
        in_channels: 1,
        input_size: 32,
        normalization: Normalization { mean: vec![0.5], std: vec![0.25] },
        weights_file: String::new(),
        weights_fnv64: String::new(),
        epoch: 1,
        val_macro_f1: 0.0,
        val_accuracy: 0.0,
        seed: 7,
        mica_version: "test".into(),
        pretrained_from: None,
    };
    checkpoint::save(dir, &mut meta, &model).unwrap();
}
