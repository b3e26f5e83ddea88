//! ONNX image classifiers: "bring your own model".
//!
//! Most trained image models leave PyTorch, TensorFlow/Keras or timm as ONNX files. This crate
//! has one job: run such a file as a mica classifier. It reads the graph with tract (pure
//! Rust, so `cargo build` stays the whole set-up), fills in how to feed it from a sidecar
//! `PATH.toml` ([`sidecar`]), and records what the file is ([`Provenance`]) for the audit
//! trail. Explanations are occlusion maps ([`occlusion`]): tract gives no gradients.

pub mod classifier;
pub mod model;
pub mod occlusion;
pub mod preprocess;
pub mod sidecar;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use classifier::OnnxClassifier;
pub use model::{BatchDim, OnnxModel, Preprocess, Provenance};
pub use occlusion::{occlusion, OcclusionMap};
pub use preprocess::Pixels;
pub use sidecar::{sidecar_path, Channels, OutputKind, Resize, Sidecar, TensorLayout};

/// The runtime that executes ONNX graphs, as provenance names it.
pub const RUNTIME: &str = "tract-onnx";
/// Its version. Cargo exposes no dependency's version to the dependent crate, so this is
/// written here and a unit test holds it to the workspace's Cargo.lock.
pub const RUNTIME_VERSION: &str = "0.23.9";

/// Why an ONNX model could not be loaded or run; every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{}: {message}", path.display())]
    Sidecar { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Model { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Run { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
}

impl OnnxError {
    pub(crate) fn sidecar(path: &std::path::Path, message: impl Into<String>) -> Self {
        OnnxError::Sidecar { path: path.to_path_buf(), message: message.into() }
    }

    /// True when the sidecar is what is wrong (a missing or bad key): the user's input.
    pub fn is_sidecar(&self) -> bool {
        matches!(self, OnnxError::Sidecar { .. })
    }
}
