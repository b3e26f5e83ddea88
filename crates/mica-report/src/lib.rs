//! Comparison reports of mica runs.

pub mod plots;

use std::path::PathBuf;

/// Errors of the report crate; each names the file or run at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("plot {0}")]
    Plot(String),
    #[error("results store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Core(#[from] mica_core::CoreError),
}
