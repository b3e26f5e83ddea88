//! Classifier spec strings: the one parser and the one printer for every form a user writes
//! (`--classifier` flags of every command, `spec = "..."` in an experiment file).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use mica_llm::ProviderSpec;

/// Which classifier to run, as a user names it.
///
/// | form | meaning |
/// | --- | --- |
/// | `cnn:RUN_DIR` | a CNN trained by `mica train` |
/// | `cnn-train:ARCH` | a CNN to train on the run's own train split (`small`, `resnet18`, `mobilenet`) |
/// | `llm:PROVIDER/MODEL[@URL]` | a vision LLM (`openai`, `ollama`, `openai-compatible`) |
/// | `baseline` | the nearest-class-centroid floor |
/// | `onnx:PATH.onnx` | any trained model exported to ONNX, fed as its sidecar `PATH.toml` says |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassifierSpec {
    Cnn { run: PathBuf },
    CnnTrain { arch: String },
    Llm(LlmSpec),
    Baseline,
    /// A model trained elsewhere (PyTorch, Keras, a vendor) as an ONNX file.
    Onnx { path: PathBuf },
}

/// `PROVIDER/MODEL[@URL]` exactly as written, so it prints back the same; [`LlmSpec::provider`]
/// resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmSpec {
    pub provider: String,
    pub model: String,
    pub url: Option<String>,
}

impl LlmSpec {
    /// The endpoint this spec resolves to (default URLs filled in, `OLLAMA_HOST` honoured).
    pub fn provider(&self) -> Result<ProviderSpec, mica_llm::LlmError> {
        ProviderSpec::parse(&self.to_string())
    }
}

impl fmt::Display for LlmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)?;
        if let Some(u) = &self.url {
            write!(f, "@{u}")?;
        }
        Ok(())
    }
}

/// A spec string that means nothing, with what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("classifier `{spec}`: {message}")]
pub struct SpecError {
    pub spec: String,
    pub message: String,
}

const FORMS: &str = "expected cnn:RUN_DIR, cnn-train:ARCH, llm:PROVIDER/MODEL[@URL], onnx:PATH.onnx or baseline";

impl FromStr for ClassifierSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = |message: String| SpecError {
            spec: mica_llm::spec::redact_url(s),
            message: mica_llm::spec::redact_url(&message),
        };
        let s = s.trim();
        if let Some(dir) = s.strip_prefix("cnn:") {
            if dir.is_empty() {
                return Err(err("cnn: needs a run directory (cnn:runs/brain/cnn)".into()));
            }
            Ok(ClassifierSpec::Cnn { run: PathBuf::from(dir) })
        } else if let Some(arch) = s.strip_prefix("cnn-train:") {
            arch.parse::<mica_cnn::Arch>().map_err(err)?;
            Ok(ClassifierSpec::CnnTrain { arch: arch.to_string() })
        } else if let Some(body) = s.strip_prefix("llm:") {
            // Validated by the provider parser (known provider, model present, URL shape).
            ProviderSpec::parse(body).map_err(|e| err(e.to_string()))?;
            let (provider, rest) = body.split_once('/').expect("checked by ProviderSpec::parse");
            let (model, url) = match rest.find("@http://").or_else(|| rest.find("@https://")) {
                Some(i) => (&rest[..i], Some(rest[i + 1..].to_string())),
                None => (rest, None),
            };
            Ok(ClassifierSpec::Llm(LlmSpec {
                provider: provider.to_string(),
                model: model.trim().to_string(),
                url,
            }))
        } else if let Some(path) = s.strip_prefix("onnx:") {
            if path.trim().is_empty() {
                return Err(err("onnx: needs a model file (onnx:models/brain.onnx, with models/brain.toml beside it)".into()));
            }
            Ok(ClassifierSpec::Onnx { path: PathBuf::from(path) })
        } else if s == "baseline" || s == "baseline:centroid" {
            Ok(ClassifierSpec::Baseline)
        } else {
            Err(err(FORMS.into()))
        }
    }
}

impl fmt::Display for ClassifierSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassifierSpec::Cnn { run } => write!(f, "cnn:{}", run.display()),
            ClassifierSpec::CnnTrain { arch } => write!(f, "cnn-train:{arch}"),
            ClassifierSpec::Llm(l) => write!(f, "llm:{l}"),
            ClassifierSpec::Baseline => f.write_str("baseline"),
            ClassifierSpec::Onnx { path } => write!(f, "onnx:{}", path.display()),
        }
    }
}

impl ClassifierSpec {
    /// The family, as reports and the audit trail name it.
    pub fn family(&self) -> &'static str {
        match self {
            ClassifierSpec::Cnn { .. } | ClassifierSpec::CnnTrain { .. } => "cnn",
            ClassifierSpec::Llm(_) => "llm",
            ClassifierSpec::Baseline => "baseline",
            ClassifierSpec::Onnx { .. } => "onnx",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_round_trips() {
        for s in [
            "cnn:runs/brain/cnn",
            "cnn:/abs/path with space/run",
            "cnn-train:small",
            "cnn-train:resnet18",
            "cnn-train:mobilenet",
            "llm:openai/gpt-4o",
            "llm:openai/gpt-4o@https://proxy.example:8443/base",
            "llm:ollama/llama3.2-vision:11b",
            "llm:ollama/llama3.2-vision@http://127.0.0.1:11434",
            "llm:openai-compatible/meta-llama/Llama-3.2-11B-Vision@http://127.0.0.1:8000",
            "baseline",
            "onnx:models/brain.onnx",
            "onnx:/abs/vendor model/x-ray v2.onnx",
        ] {
            let spec: ClassifierSpec = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(spec.to_string(), s);
            assert_eq!(spec.to_string().parse::<ClassifierSpec>().unwrap(), spec);
        }
        assert_eq!("baseline:centroid".parse::<ClassifierSpec>().unwrap(), ClassifierSpec::Baseline);
    }

    #[test]
    fn nonsense_says_what_was_expected() {
        for (s, want) in [
            ("svm", "expected cnn:RUN_DIR"),
            ("cnn:", "run directory"),
            ("onnx:", "model file"),
            ("onnx", "expected cnn:RUN_DIR"),
            ("cnn-train:vgg", "vgg"),
            ("llm:gpt-4o", "PROVIDER/MODEL"),
            ("llm:acme/m", "unknown provider"),
            ("llm:openai-compatible/m", "server address"),
        ] {
            let e = s.parse::<ClassifierSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        let e = "llm:acme/m@http://user:secret@host/".parse::<ClassifierSpec>().unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
