//! The experiment file: one TOML that pins down a whole comparison.
//!
//! ```toml
//! name = "brain-mri"
//! output = "runs/brain-mri"
//!
//! [dataset]
//! path = "data/demo/brain-tumor-mri"
//! seed = 42
//! train = 0.7
//! val = 0.1
//! test = 0.2
//! image_size = 64
//! limit_per_class = 50          # every classifier sees the same, smaller test set
//!
//! [[classifier]]
//! kind = "cnn"
//! train = "small"               # or: run = "runs/brain/cnn" (a `mica train` run directory)
//! epochs = 5
//!
//! [[classifier]]
//! kind = "llm"
//! model = "openai/gpt-4o"
//! context = "image"
//! filter = "default"
//! limit_per_class = 10          # costly: a deterministic subset of the shared test set
//!
//! [energy]
//! country = "FRA"               # or grid_intensity = 56.0
//! pue = 1.2
//! ```
//!
//! Relative paths are relative to the working directory, like every other `mica` path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CompareError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Run name; defaults to the output directory's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Run directory (`runs/<name>` when absent).
    #[serde(default)]
    pub output: Option<PathBuf>,
    pub dataset: DatasetSpec,
    #[serde(rename = "classifier", default)]
    pub classifiers: Vec<ClassifierSpec>,
    #[serde(default)]
    pub energy: EnergySpec,
    #[serde(default)]
    pub eval: EvalSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub path: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_train")]
    pub train: f64,
    #[serde(default = "default_val")]
    pub val: f64,
    #[serde(default = "default_test")]
    pub test: f64,
    /// Input side for trained CNNs and the pixel baseline.
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Cap on test images per class for the whole comparison (every classifier sees the same).
    #[serde(default)]
    pub limit_per_class: Option<usize>,
    /// An existing split manifest (`id,label,split`) to reuse instead of drawing a split.
    #[serde(default)]
    pub split_manifest: Option<PathBuf>,
}

fn default_seed() -> u64 {
    42
}
fn default_train() -> f64 {
    0.7
}
fn default_val() -> f64 {
    0.1
}
fn default_test() -> f64 {
    0.2
}

/// Which family a classifier entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A CNN: an existing `mica train` run (`run`) or one to train (`train = "small"`).
    Cnn,
    /// A multimodal LLM behind an OpenAI-compatible or Ollama endpoint.
    Llm,
    /// A nearest-class-centroid classifier on raw pixels: the floor any model must beat.
    Baseline,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    pub kind: Kind,
    /// Directory name and key in reports; derived from the spec when absent.
    #[serde(default)]
    pub slug: Option<String>,
    /// CNN: a `mica train` run directory to load.
    #[serde(default)]
    pub run: Option<PathBuf>,
    /// CNN: an architecture to train on the experiment's split (`small`, `resnet18`,
    /// `mobilenet`).
    #[serde(default)]
    pub train: Option<String>,
    #[serde(default)]
    pub epochs: Option<usize>,
    #[serde(default)]
    pub batch: Option<usize>,
    /// LLM: `openai/gpt-4o`, `ollama/llama3.2-vision`, `openai-compatible/<model>@<url>`.
    #[serde(default)]
    pub model: Option<String>,
    /// LLM: context mode (`image`, `image+context`, `image+findings`).
    #[serde(default)]
    pub context: Option<String>,
    /// LLM: prompt template name or file.
    #[serde(default)]
    pub template: Option<String>,
    /// LLM: filter spec (`none`, `default`, or stages such as `labels,confidence>=0.7`).
    #[serde(default)]
    pub filter: Option<String>,
    /// LLM: answer from the built-in simulator (results stamped SIMULATED).
    #[serde(default)]
    pub simulated: bool,
    /// Per-class cap for costly classifiers: a deterministic subset of the shared test set.
    #[serde(default)]
    pub limit_per_class: Option<usize>,
}

impl ClassifierSpec {
    /// An entry of `kind` with every option unset, to fill with struct-update syntax.
    pub fn new(kind: Kind) -> Self {
        ClassifierSpec {
            kind,
            slug: None,
            run: None,
            train: None,
            epochs: None,
            batch: None,
            model: None,
            context: None,
            template: None,
            filter: None,
            simulated: false,
            limit_per_class: None,
        }
    }

    /// A short, filesystem-safe, stable identifier.
    pub fn slug(&self) -> String {
        if let Some(s) = &self.slug {
            return slugify(s);
        }
        let raw = match self.kind {
            Kind::Cnn => match (&self.train, &self.run) {
                (Some(a), _) => format!("cnn-{a}"),
                (None, Some(r)) => format!(
                    "cnn-{}",
                    r.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
                ),
                _ => "cnn".into(),
            },
            Kind::Llm => {
                let mut s = format!("llm-{}", self.model.as_deref().unwrap_or("model"));
                if let Some(f) = self.filter.as_deref().filter(|f| *f != "none") {
                    s.push_str("-filter-");
                    s.push_str(f);
                }
                if self.simulated {
                    s.push_str("-sim");
                }
                s
            }
            Kind::Baseline => "baseline-centroid".into(),
        };
        slugify(&raw)
    }

    /// The name predictions carry (`cnn:small`, `llm:openai/gpt-4o+filter`, ...).
    pub fn display_name(&self) -> String {
        match self.kind {
            Kind::Cnn => match (&self.train, &self.run) {
                (Some(a), _) => format!("cnn:{a}"),
                (None, Some(r)) => format!("cnn:{}", r.display()),
                _ => "cnn".into(),
            },
            Kind::Llm => {
                let mut s = format!("llm:{}", self.model.as_deref().unwrap_or("?"));
                if let Some(f) = self.filter.as_deref().filter(|f| *f != "none") {
                    s.push_str(&format!("+filter:{f}"));
                }
                s
            }
            Kind::Baseline => "baseline:centroid".into(),
        }
    }

    fn validate(&self, i: usize) -> Result<(), String> {
        let at = format!("classifier #{} ({})", i + 1, self.display_name());
        match self.kind {
            Kind::Cnn => match (&self.run, &self.train) {
                (Some(_), Some(_)) => Err(format!("{at}: give either `run` or `train`, not both")),
                (None, None) => Err(format!(
                    "{at}: a CNN needs `run = \"RUN_DIR\"` (a mica train run) or `train = \"small\"`"
                )),
                (None, Some(a)) => a
                    .parse::<mica_cnn::Arch>()
                    .map(|_| ())
                    .map_err(|e| format!("{at}: {e}")),
                _ => Ok(()),
            },
            Kind::Llm => {
                if self.model.is_none() {
                    Err(format!("{at}: an LLM needs `model = \"provider/model\"`"))
                } else {
                    Ok(())
                }
            }
            Kind::Baseline => Ok(()),
        }?;
        if self.limit_per_class == Some(0) {
            return Err(format!("{at}: limit_per_class must be at least 1"));
        }
        Ok(())
    }
}

fn slugify(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let t = out.trim_matches('-').to_string();
    if t.is_empty() {
        "classifier".into()
    } else {
        t
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergySpec {
    /// ISO 3166-1 alpha-3 country for the grid's carbon intensity.
    #[serde(default)]
    pub country: Option<String>,
    /// gCO2e/kWh; wins over `country`.
    #[serde(default)]
    pub grid_intensity: Option<f64>,
    #[serde(default)]
    pub pue: Option<f64>,
    /// CPU TDP override in watts for the CPU-time estimate.
    #[serde(default)]
    pub tdp_w: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    #[serde(default = "default_resamples")]
    pub bootstrap_resamples: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_resamples() -> usize {
    1000
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            bootstrap_resamples: default_resamples(),
            seed: default_seed(),
        }
    }
}

impl EvalSpec {
    pub fn options(&self) -> mica_eval::EvalOptions {
        mica_eval::EvalOptions {
            bootstrap_resamples: self.bootstrap_resamples,
            seed: self.seed,
            ..Default::default()
        }
    }
}

impl Experiment {
    /// Reads and checks an experiment file; errors name the file and the problem.
    pub fn load(path: impl AsRef<Path>) -> Result<Experiment, CompareError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| CompareError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let exp: Experiment = toml::from_str(&text).map_err(|e| CompareError::Config {
            path: path.to_path_buf(),
            message: e.to_string().replace('\n', " ").trim().to_string(),
        })?;
        exp.validate().map_err(|message| CompareError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(exp)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.classifiers.is_empty() {
            return Err("no classifiers: add at least one [[classifier]]".into());
        }
        let split = mica_data::split::SplitConfig {
            seed: self.dataset.seed,
            train: self.dataset.train,
            val: self.dataset.val,
            test: self.dataset.test,
        };
        split.validate()?;
        if self.dataset.limit_per_class == Some(0) {
            return Err("dataset.limit_per_class must be at least 1".into());
        }
        let mut seen = Vec::new();
        for (i, c) in self.classifiers.iter().enumerate() {
            c.validate(i)?;
            let s = c.slug();
            if seen.contains(&s) {
                return Err(format!(
                    "two classifiers share the slug `{s}`; give one of them `slug = \"...\"`"
                ));
            }
            seen.push(s);
        }
        Ok(())
    }

    /// The run directory.
    pub fn output_dir(&self) -> PathBuf {
        match &self.output {
            Some(o) => o.clone(),
            None => PathBuf::from("runs").join(self.name.clone().unwrap_or_else(|| {
                self.dataset
                    .path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "compare".into())
            })),
        }
    }

    /// Parses a classifier from the quick command-line form: `cnn:RUN_DIR`, `cnn-train:ARCH`,
    /// `baseline`, `llm:PROVIDER/MODEL` (with `--filter`, `--context` applying to LLMs).
    pub fn classifier_from_flag(spec: &str) -> Result<ClassifierSpec, String> {
        let blank = ClassifierSpec::new;
        if let Some(dir) = spec.strip_prefix("cnn:") {
            Ok(ClassifierSpec {
                run: Some(PathBuf::from(dir)),
                ..blank(Kind::Cnn)
            })
        } else if let Some(arch) = spec.strip_prefix("cnn-train:") {
            Ok(ClassifierSpec {
                train: Some(arch.to_string()),
                ..blank(Kind::Cnn)
            })
        } else if let Some(model) = spec.strip_prefix("llm:") {
            Ok(ClassifierSpec {
                model: Some(model.to_string()),
                ..blank(Kind::Llm)
            })
        } else if spec == "baseline" || spec == "baseline:centroid" {
            Ok(blank(Kind::Baseline))
        } else {
            Err(format!(
                "classifier `{spec}`: expected cnn:RUN_DIR, cnn-train:ARCH, llm:PROVIDER/MODEL or baseline"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses_with_defaults_and_slugs() {
        let exp: Experiment = toml::from_str(
            r#"
            name = "brain"
            [dataset]
            path = "data/brain"
            limit_per_class = 5
            [[classifier]]
            kind = "cnn"
            train = "small"
            [[classifier]]
            kind = "llm"
            model = "openai/gpt-4o"
            filter = "default"
            [[classifier]]
            kind = "baseline"
            [energy]
            country = "FRA"
            "#,
        )
        .unwrap();
        exp.validate().unwrap();
        assert_eq!(exp.dataset.seed, 42);
        assert_eq!(exp.output_dir(), PathBuf::from("runs/brain"));
        let slugs: Vec<String> = exp.classifiers.iter().map(|c| c.slug()).collect();
        assert_eq!(slugs, ["cnn-small", "llm-openai-gpt-4o-filter-default", "baseline-centroid"]);
        assert_eq!(exp.classifiers[1].display_name(), "llm:openai/gpt-4o+filter:default");
    }

    #[test]
    fn mistakes_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exp.toml");
        std::fs::write(&p, "[dataset]\npath = \"d\"\n[[classifier]]\nkind = \"cnn\"\n").unwrap();
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("exp.toml") && e.contains("needs `run"), "{e}");
        std::fs::write(&p, "[dataset]\npath = \"d\"\ncolour = 1\n").unwrap();
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("exp.toml") && e.contains("colour"), "{e}");
        assert!(!e.contains('\n'));
        std::fs::write(
            &p,
            "[dataset]\npath = \"d\"\n[[classifier]]\nkind = \"baseline\"\n[[classifier]]\nkind = \"baseline\"\n",
        )
        .unwrap();
        let e = Experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains("share the slug"), "{e}");
        let e = Experiment::load(dir.path().join("nope.toml")).unwrap_err().to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }

    #[test]
    fn shipped_experiments_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                let exp = Experiment::load(e.path()).unwrap_or_else(|err| panic!("{err}"));
                assert!(!exp.classifiers.is_empty());
                n += 1;
            }
        }
        assert!(n >= 3, "one experiment per modality");
    }

    #[test]
    fn flag_forms_parse() {
        assert_eq!(Experiment::classifier_from_flag("cnn:runs/x").unwrap().slug(), "cnn-x");
        assert_eq!(Experiment::classifier_from_flag("cnn-train:resnet18").unwrap().slug(), "cnn-resnet18");
        assert_eq!(Experiment::classifier_from_flag("baseline").unwrap().kind, Kind::Baseline);
        assert!(Experiment::classifier_from_flag("svm").is_err());
    }
}
