//! Comparison reports of mica runs: reading run directories (and merging shards), the headline
//! table with its uncertainty, plots, the plain-language summary, and the results store.
//!
//! Entry points:
//! - [`render`]: `mica report RUN_DIR --format md|html|json|csv`;
//! - [`load`] + [`headline_text`]: the table a terminal prints after `mica compare`/`mica demo`;
//! - [`store::Store`]: the SQLite index behind `mica runs list|show`, which also keeps the web
//!   app's cases and physicians' decisions ([`cases`]).
//!
//! The report never recomputes a metric that `metrics.json` holds; it reads and formats it,
//! so a reviewer who opens `metrics.json` finds the same numbers.

pub mod cases;
pub mod comparison;
pub mod pilot;
pub mod plots;
pub mod render;
pub mod rundir;
pub mod store;

use std::path::{Path, PathBuf};

pub use comparison::{Comparison, Family, HeadlineRow, PairTest};
pub use render::{headline_text, html_escape, Format};
pub use rundir::{merge_shards, parse_shard, shard_dir_name, ClassifierRun, MergeSummary, RunDir};
pub use store::{default_store_path, Store};

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

/// Merges shards if there are any, then reads the run directory and computes its comparison.
pub fn load(run_dir: impl AsRef<Path>) -> Result<(RunDir, Comparison), ReportError> {
    load_with(run_dir, pilot::PilotOptions::default())
}

/// [`load`] with the business-case options (`mica report --budget`).
pub fn load_with(run_dir: impl AsRef<Path>, options: pilot::PilotOptions) -> Result<(RunDir, Comparison), ReportError> {
    let root = run_dir.as_ref();
    merge_shards(root, &eval_options(root)?)?;
    let run = RunDir::open(root)?;
    let cmp = Comparison::build_with(&run, options);
    Ok((run, cmp))
}

/// The evaluation options a merge must reuse so merged metrics match unsharded ones: those
/// recorded in the manifest's `config.eval`; the defaults only where the run has no manifest
/// (a single `mica classify` run) or the manifest records none. An unreadable manifest is an
/// error: merging with other options than the run's would change its figures silently.
pub fn eval_options(root: &Path) -> Result<mica_eval::EvalOptions, ReportError> {
    let Some(m) = rundir::read_manifest(root)? else {
        return Ok(Default::default());
    };
    match m.config.get("eval") {
        None => Ok(Default::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| ReportError::Format {
            path: mica_core::RunRoot::new(root).manifest(),
            message: format!("`config.eval` is not a set of evaluation options: {e}"),
        }),
    }
}

/// Writes `RUN_DIR/report.<ext>` (figures under `RUN_DIR/plots/` for md and html) and returns
/// its path.
pub fn render(run_dir: impl AsRef<Path>, format: Format) -> Result<PathBuf, ReportError> {
    render_with(run_dir, format, pilot::PilotOptions::default())
}

/// [`render`] with the business-case options (`mica report --budget`).
pub fn render_with(run_dir: impl AsRef<Path>, format: Format, options: pilot::PilotOptions) -> Result<PathBuf, ReportError> {
    let (run, cmp) = load_with(run_dir, options)?;
    render::write_report(&run, &cmp, format)
}

#[cfg(test)]
mod tests;
