//! Datasets for mica: layout detection and loading, seeded splits with reproducible manifests,
//! image decoding and preprocessing, perceptual-hash duplicate checks and synthetic phantoms.
//!
//! Everything downstream (CNN trainer, LLM clients, the web server) gets pixels only through
//! [`image`], so DICOM windowing, `.npz` arrays and colour handling are decided in one place.

pub mod context;
pub mod deid;
mod dicom_read;
pub mod error;
pub mod image;
pub mod inspect;
pub mod labels;
pub mod layout;
pub mod phash;
pub mod shortcut;
pub mod split;
pub mod synth;
pub mod upload;

pub use error::DataError;
pub use inspect::{inspect, InspectOptions, Inspection};
pub use context::ContextSpec;
pub use layout::{detect, load, load_with};
pub use mica_core;
