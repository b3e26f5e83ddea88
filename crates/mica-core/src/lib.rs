//! Shared vocabulary of mica.
//!
//! Every crate downstream of the dataset (CNN, LLM, evaluation, report, server) speaks in these
//! types only, so a new model family is one new [`Classifier`] implementation and nothing else
//! has to change.

pub mod hash;
pub mod labels;
pub mod machine;
pub mod prediction;
pub mod run;
pub mod rundir;
pub mod sample;
pub mod time;

pub use labels::{LabelSet, Modality};
pub use prediction::{softmax, FilterStage, Outcome, Prediction, TokenUsage};
pub use run::{read_predictions, write_atomic, FailedOnResume, PredictionLog, RunManifest};
pub use rundir::{ClassifierDir, RunLock, RunRoot};
pub use sample::{Dataset, ImageSource, Layout, Sample, SharedPixels, SkippedFile, Split};

/// Errors shared by the core file formats.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: std::path::PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid label set: {0}")]
    Labels(String),
    #[error("{}: another mica process is writing into this run directory; wait for it to finish or use another --out", dir.display())]
    Locked { dir: std::path::PathBuf },
}

impl CoreError {
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Why one image could not be classified. Recorded as an outcome, never turned into a label.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{sample_id}: {message}")]
pub struct ClassifyError {
    pub sample_id: String,
    pub message: String,
}

/// The one contract every model family implements.
///
/// Results are per image so that one bad image (or one failed API call) never sinks a batch.
pub trait Classifier {
    fn name(&self) -> &str;
    fn labels(&self) -> &LabelSet;
    fn classify(&mut self, batch: &[Sample]) -> Vec<Result<Prediction, ClassifyError>>;

    /// True when [`Classifier::classify_with_notes`] puts the notes before the model (an LLM's
    /// prompt); a cascade refuses `--cascade-context` for a second stage that would drop them.
    fn accepts_notes(&self) -> bool {
        false
    }

    /// Classifies with one optional note per image for the model to read (a cascade's second
    /// stage is told the first model's suggestion). A family without a way to read text
    /// ignores the notes, and says so through [`Classifier::accepts_notes`].
    fn classify_with_notes(&mut self, batch: &[Sample], notes: &[Option<String>]) -> Vec<Result<Prediction, ClassifyError>> {
        let _ = notes;
        self.classify(batch)
    }
}
