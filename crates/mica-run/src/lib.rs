//! The run engine: every command that classifies images (`mica classify`, `mica compare`,
//! `mica demo`, `mica serve`) goes through here, so a fix to how images are selected, logged,
//! resumed, metered or scored lands once.
//!
//! - [`ClassifierSpec`]: the one parser and printer of `cnn:` / `cnn-train:` / `llm:` /
//!   `baseline` strings; [`ClassifierConfig`] adds the settings that change the answers.
//! - [`cascade`]: a cascade of two stages (`cascade:FIRST,SECOND@T`), built from two specs
//!   through the factory, decided by `mica_eval::cascade::combine`.
//! - [`factory::build`]: the one place a spec becomes a `Box<dyn Classifier>`. A new model
//!   family is one `Classifier` implementation plus one arm there.
//! - [`run_experiment`]: one split, the same seeded per-class selection everywhere, the
//!   append-only prediction log with resume (failed images asked again), fail-fast on errors
//!   every request would repeat, an exclusive lock, energy windows, metrics and manifest.
//! - The run directory's file names live in `mica_core::rundir`; nothing else spells them.

pub mod baseline;
pub mod cascade;
pub mod cnn;
pub mod experiment;
pub mod factory;
pub mod llm;
pub mod onnx;
pub mod record;
pub mod run;
pub mod select;
pub mod spec;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use experiment::{
    CascadeStage, ClassifierConfig, DatasetSpec, EnergySpec, EvalSpec, Experiment, Kind, LlmOptions, DEFAULT_FILTER,
};
pub use record::record_energy;
pub use run::{run_experiment, ClassifierOutcome, Event, Layout, RunOptions, RunOutcome};
pub use select::{load_split, select};
pub use spec::{ClassifierSpec, LlmSpec, SpecError};

use std::path::PathBuf;

/// Why a run stopped. Every variant keeps its cause, so the message names the file, the
/// setting or the provider's answer.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A problem in the experiment file (or a run manifest), naming the file.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A setting that cannot mean anything.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The dataset no longer matches the split pinned in the run directory.
    #[error("{source} (the dataset changed since this run started: use a new output directory)")]
    DatasetChanged {
        path: PathBuf,
        #[source]
        source: mica_data::DataError,
    },
    #[error(transparent)]
    Data(#[from] mica_data::DataError),
    #[error(transparent)]
    Core(#[from] mica_core::CoreError),
    #[error("{name}: {source}")]
    Cnn {
        name: String,
        #[source]
        source: mica_cnn::CnnError,
    },
    #[error("{name}: {source}")]
    Llm {
        name: String,
        #[source]
        source: mica_llm::LlmError,
    },
    #[error(transparent)]
    Energy(#[from] mica_energy::EnergyError),
    #[error("{}: {source}", path.display())]
    Eval {
        path: PathBuf,
        #[source]
        source: mica_eval::EvalError,
    },
    #[error(transparent)]
    Report(#[from] mica_report::ReportError),
    /// The first requests all failed the same way, in a way every further request would
    /// repeat; nothing was recorded for them.
    #[error("{classifier}: stopped after {requests} requests that all failed with {}: {message}", status.map_or("the same error".to_string(), |s| format!("HTTP {s}")))]
    FailFast {
        classifier: String,
        requests: usize,
        status: Option<u16>,
        message: String,
    },
}

impl RunError {
    /// True for errors in what the user asked for (exit code 2 in the CLI).
    pub fn is_usage(&self) -> bool {
        match self {
            RunError::Config { .. } | RunError::Invalid(_) | RunError::Spec(_) => true,
            RunError::Data(e) => e.is_usage(),
            RunError::Core(mica_core::CoreError::Locked { .. }) => true,
            RunError::Llm { source, .. } => matches!(
                source,
                mica_llm::LlmError::Spec { .. } | mica_llm::LlmError::Filter { .. }
            ),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RunError {
        let path = path.into();
        move |source| RunError::Io { path, source }
    }
}

#[cfg(test)]
mod tests;
