//! CNN classifiers trained and run with burn 0.21.
//!
//! The study's first family of models: a CNN trained per dataset. This crate builds three
//! architectures ([`Arch`]), trains them with AdamW, a warm-up + cosine schedule, seeded
//! augmentation and early stopping on validation macro F1 ([`train()`]), keeps self-describing
//! checkpoints ([`Checkpoint`]), classifies through the shared [`mica_core::Classifier`]
//! contract ([`CnnClassifier`]), explains answers with Grad-CAM ([`gradcam`]) and imports
//! torchvision ResNet-18 weights ([`transfer`]). Each checkpoint also records its training
//! images' feature statistics, so an image unlike the training data is flagged ([`ood`]).
//!
//! The CPU backend is burn's pure-Rust `flex`; with the `cuda` feature a present NVIDIA GPU is
//! used instead (see [`device`]).

mod alloc_tuning;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod fused;
pub mod gradcam;
pub mod infer;
pub mod model;
pub mod norm;
pub mod ood;
pub mod train;
pub mod transfer;

use std::path::PathBuf;

pub use alloc_tuning::tune_allocator;
pub use checkpoint::{Checkpoint, CheckpointMeta};
pub use data::{Augment, ImageCache, Normalization};
pub use device::DeviceKind;
pub use infer::{CnnClassifier, InferenceStats};
pub use model::{Arch, Net};
pub use ood::{OodStats, OodVerdict};
pub use train::{train, EpochStats, Progress, StepRunner, TrainConfig, TrainSummary};

/// burn's CPU backend.
pub type CpuBackend = burn::backend::Flex;
/// burn's CPU backend with automatic differentiation, for training.
pub type CpuTrainBackend = burn::backend::Autodiff<CpuBackend>;

#[derive(Debug, thiserror::Error)]
pub enum CnnError {
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{path}: checkpoint labels [{checkpoint}] do not match the dataset's labels [{dataset}]")]
    LabelMismatch {
        path: PathBuf,
        checkpoint: String,
        dataset: String,
    },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("the dataset has no {0} images (nothing to train or classify on)")]
    EmptySplit(String),
    #[error(
        "batch size {batch} needs about {need_gib:.1} GiB but about {avail_gib:.1} GiB is available; try --batch {suggest}"
    )]
    OutOfMemory {
        batch: usize,
        need_gib: f64,
        avail_gib: f64,
        suggest: usize,
    },
    #[error("{path}: {message}")]
    Run { path: PathBuf, message: String },
    #[error(transparent)]
    Core(#[from] mica_core::CoreError),
}

#[cfg(test)]
mod conv_patch_tests;
#[cfg(test)]
mod pool_patch_tests;
#[cfg(test)]
mod tests;
