//! Classification metrics, confidence intervals and significance tests.
//!
//! Every number here is defined to equal scikit-learn's on the same inputs (to 1e-9); the
//! `tests/sklearn.rs` cross-check enforces it whenever Python is available, and compares McNemar
//! and Holm with statsmodels and the bootstrap intervals with scipy on mica's own resamples.
//! Where no library has a twin (ECE, AURC, risk-coverage), the definition is written out next
//! to the code, unit-tested against hand-computed values and re-implemented in numpy by the
//! cross-check.
//!
//! Entry points:
//! - [`evaluate`]: one [`EvalReport`] from class indices (and optional probabilities);
//! - [`RunMetrics::from_predictions`]: the `metrics.json` of one classifier run, built from
//!   [`mica_core::Prediction`]s with unparseable/failed answers kept visible;
//! - [`mcnemar`]: paired comparison of two classifiers on the same images, [`holm`] for
//!   adjusting a family of such p-values;
//! - [`latency_summary`], [`selective`]: timing and risk-coverage helpers;
//! - [`cascade`]: the cascade's decision rule (CNN first, LLM when unsure, physician when
//!   both are), its per-stage summary and the offline threshold sweep;
//! - [`csv_input`]: the `label,prediction[,prob_<class>]` file format of `mica eval`.

pub mod cascade;
pub mod csv_input;
pub mod latency;
pub mod metrics;
pub mod run;
pub mod selective;
pub mod stats;

pub use csv_input::{EncodedPredictions, PredictionsCsv};
pub use latency::{latency_summary, LatencyKind, LatencySummary};
pub use metrics::{
    aurc, brier_confidence, brier_multiclass, evaluate, evaluate_with, macro_f1, percentile_interval,
    stratified_resampler, stratified_resamples, BootstrapMethod, BootstrapSettings, ClassMetrics,
    ConfidenceInterval, ConfusionMatrix, EvalReport, LabelMap, ReliabilityBin, StratifiedResampler,
};
pub use run::{CostTotals, OutcomeCounts, RunMetrics, TokenTotals, RUN_METRICS_SCHEMA};
pub use selective::{risk_coverage, RiskCoveragePoint};
pub use stats::{holm, mcnemar, McNemar};

use std::path::PathBuf;

/// Marks "no answer" (unparseable, refused or failed) in a `y_pred` slice. Such a case counts as wrong
/// and has its own column in the confusion matrix; it is never mapped onto a class.
pub const NO_ANSWER: usize = usize::MAX;

/// How the metrics that need randomness or binning are computed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EvalOptions {
    /// Bootstrap resamples for the confidence intervals; 0 turns the intervals off.
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap's ChaCha8 generator, so intervals are reproducible run to run.
    pub seed: u64,
    /// Coverage of the bootstrap intervals (0.95 = percentiles 2.5 and 97.5).
    pub confidence_level: f64,
    /// Equal-width bins on [0, 1] for the expected calibration error.
    pub ece_bins: usize,
    /// Cap on the number of risk-coverage points kept in `metrics.json` (evenly thinned).
    pub max_curve_points: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            bootstrap_resamples: 1000,
            seed: 42,
            confidence_level: 0.95,
            ece_bins: 15,
            max_curve_points: 201,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("no samples to evaluate")]
    Empty,
    /// Inconsistent arguments or values (lengths, indices, probabilities).
    #[error("{0}")]
    Input(String),
    /// A problem with a whole file (missing column, unreadable).
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// A problem on one line of a file.
    #[error("{path}:{line}: {message}")]
    Row {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error(transparent)]
    Core(#[from] mica_core::CoreError),
}

impl EvalError {
    pub(crate) fn input(msg: impl Into<String>) -> Self {
        EvalError::Input(msg.into())
    }
}
