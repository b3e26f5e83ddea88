//! Errors of the LLM arm that stop a run. Per-image problems never use these: they become a
//! prediction with outcome `failed` or `unparseable`, so one bad answer never sinks a run.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("invalid classifier spec `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("invalid filter spec `{spec}`: {message}")]
    Filter { spec: String, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Core(#[from] mica_core::CoreError),
    #[error("simulator: {0}")]
    Sim(String),
}

impl LlmError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        LlmError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
