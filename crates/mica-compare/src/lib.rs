//! `mica compare`: the study's comparison made reproducible.
//!
//! One experiment file ([`Experiment`]) names a dataset, a split, classifiers and energy
//! settings; [`run_experiment`] puts every classifier on exactly the same test images, each in
//! its own energy window, resumable after a kill and shardable across machines, and writes a
//! run directory that `mica_report` renders.

pub mod baseline;
mod cnn;
pub mod experiment;
mod llm;
pub mod run;

pub use experiment::{ClassifierSpec, DatasetSpec, EnergySpec, EvalSpec, Experiment, Kind};
pub use run::{run_experiment, test_set, Event, RunOptions, RunOutcome};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A problem in the experiment file (or a run manifest), naming the file.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A setting that cannot mean anything.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Cnn(String),
    #[error("{0}")]
    Llm(String),
    #[error("{0}")]
    Energy(String),
    #[error("{0}")]
    Report(String),
    /// A classifier family this build cannot run.
    #[error("{0}")]
    Unavailable(String),
}

impl CompareError {
    /// True for errors in what the user asked for (exit code 2 in the CLI).
    pub fn is_usage(&self) -> bool {
        matches!(self, CompareError::Config { .. } | CompareError::Invalid(_))
    }
}

#[cfg(test)]
mod tests;
