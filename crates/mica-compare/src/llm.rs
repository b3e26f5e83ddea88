//! The LLM arm, through mica-llm's providers, prompts, parser, filter and response cache.

use std::path::Path;

use mica_core::{Classifier, Dataset};

use crate::experiment::{ClassifierSpec, Experiment};
use crate::run::{BuildInfo, Event};
use crate::CompareError;

#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    _exp: &Experiment,
    _spec: &ClassifierSpec,
    _slug: &str,
    name: &str,
    _ds: &Dataset,
    _run_dir: &Path,
    _info: &mut BuildInfo,
    _progress: &mut dyn FnMut(Event),
) -> Result<Box<dyn Classifier>, CompareError> {
    Err(CompareError::Unavailable(format!(
        "{name}: this build of mica has no LLM runner yet (crates/mica-llm); remove the LLM classifiers from the experiment or use a newer build"
    )))
}
