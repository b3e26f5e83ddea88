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
/// | `cnn-train:ARCH` | a CNN to train on the run's own train split (`small`, `resnet8`, `resnet18`, `mobilenet`) |
/// | `llm:PROVIDER/MODEL[@URL]` | a vision LLM (`openai`, `ollama`, `openai-compatible`) |
/// | `baseline` | the nearest-class-centroid floor |
/// | `onnx:PATH.onnx` | any trained model exported to ONNX, fed as its sidecar `PATH.toml` says |
/// | `cascade:FIRST,SECOND@T[/T2]` | FIRST answers at confidence >= T, SECOND is asked otherwise, a physician when SECOND is below T2 |
#[derive(Debug, Clone, PartialEq)]
pub enum ClassifierSpec {
    Cnn { run: PathBuf },
    CnnTrain { arch: String },
    Llm(LlmSpec),
    Baseline,
    /// A model trained elsewhere (PyTorch, Keras, a vendor) as an ONNX file.
    Onnx { path: PathBuf },
    /// Two stages (neither a cascade: cascades do not nest, since `cascade:a,cascade:b,c@0.5@0.7`
    /// could not be split unambiguously and a three-stage chain has no clinical reading).
    Cascade {
        first: Box<ClassifierSpec>,
        second: Box<ClassifierSpec>,
        /// The first stage answers at or above this confidence (0..=1).
        threshold: f64,
        /// The second stage answers at or above this confidence; below it, a physician.
        second_threshold: Option<f64>,
    },
}

/// Where a cascade's first spec ends: the first comma followed by one of these.
const STAGE_PREFIXES: [&str; 6] = ["cnn:", "cnn-train:", "llm:", "onnx:", "baseline", "cascade:"];

const CASCADE_FORM: &str = "expected cascade:FIRST,SECOND@THRESHOLD[/SECOND_THRESHOLD] (e.g. cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.8)";

/// A threshold written in a cascade spec: a number within 0..=1.
fn parse_threshold(s: &str, which: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("the {which} threshold `{s}` is not a number; {CASCADE_FORM}"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("the {which} threshold {v} is outside 0..=1 (a confidence)"));
    }
    Ok(v)
}

/// `cascade:` body (after the prefix) into its parts.
fn parse_cascade(body: &str) -> Result<ClassifierSpec, String> {
    // The threshold is after the last `@`, and must be a number: `@http://...` is a URL.
    let (stages, th) = body
        .rsplit_once('@')
        .filter(|(_, t)| t.trim().starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-'))
        .ok_or_else(|| format!("no threshold: end the spec with @THRESHOLD; {CASCADE_FORM}"))?;
    let (t1, t2) = match th.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (th, None),
    };
    let threshold = parse_threshold(t1, "first")?;
    let second_threshold = t2.map(|t| parse_threshold(t, "second")).transpose()?;
    let split_at = |s: &str, from: usize| -> Option<usize> {
        s.char_indices()
            .skip_while(|(i, _)| *i < from)
            .find(|(i, c)| *c == ',' && STAGE_PREFIXES.iter().any(|p| s[i + 1..].trim_start().starts_with(p)))
            .map(|(i, _)| i)
    };
    let comma = split_at(stages, 0).ok_or_else(|| {
        format!("a cascade needs two classifier specs separated by a comma (cnn:, cnn-train:, llm:, onnx: or baseline); {CASCADE_FORM}")
    })?;
    let (first, second) = (stages[..comma].trim(), stages[comma + 1..].trim());
    if first.is_empty() {
        return Err(format!("the first stage is empty; {CASCADE_FORM}"));
    }
    for (which, stage) in [("first", first), ("second", second)] {
        if stage.starts_with("cascade:") {
            return Err(format!("the {which} stage is a cascade: cascades do not nest"));
        }
    }
    if split_at(second, 0).is_some() {
        return Err(format!("a cascade takes exactly two stages, `{second}` holds more; {CASCADE_FORM}"));
    }
    let stage = |s: &str, which: &str| -> Result<ClassifierSpec, String> {
        s.parse::<ClassifierSpec>().map_err(|e| format!("{which} stage: {}", e.message))
    };
    Ok(ClassifierSpec::Cascade {
        first: Box::new(stage(first, "first")?),
        second: Box::new(stage(second, "second")?),
        threshold,
        second_threshold,
    })
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

const FORMS: &str = "expected cnn:RUN_DIR, cnn-train:ARCH, llm:PROVIDER/MODEL[@URL], onnx:PATH.onnx, baseline or cascade:FIRST,SECOND@THRESHOLD";

impl FromStr for ClassifierSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = |message: String| SpecError {
            spec: mica_llm::spec::redact_url(s),
            message: mica_llm::spec::redact_url(&message),
        };
        let s = s.trim();
        if let Some(body) = s.strip_prefix("cascade:") {
            parse_cascade(body).map_err(err)
        } else if let Some(dir) = s.strip_prefix("cnn:") {
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
            ClassifierSpec::Cascade { first, second, threshold, second_threshold } => {
                write!(f, "cascade:{first},{second}@{threshold}")?;
                if let Some(t) = second_threshold {
                    write!(f, "/{t}")?;
                }
                Ok(())
            }
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
            ClassifierSpec::Cascade { .. } => "cascade",
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
            "cnn-train:resnet8",
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
    fn cascades_round_trip_and_split_where_the_second_spec_starts() {
        for s in [
            "cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.8",
            "cascade:cnn:runs/cnn,llm:ollama/llava@http://host:11434@0.8",
            "cascade:cnn-train:small,llm:openai-compatible/m@http://127.0.0.1:8000/v1@0.75/0.6",
            "cascade:baseline,cnn:runs/a,b@1",
            "cascade:cnn:runs/with,comma,llm:openai/gpt-4o@0",
        ] {
            let spec: ClassifierSpec = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(spec.to_string(), s);
            assert_eq!(spec.family(), "cascade");
        }
        let ClassifierSpec::Cascade { first, second, threshold, second_threshold } =
            "cascade:cnn:runs/cnn,llm:ollama/llava@http://host:11434@0.8".parse().unwrap()
        else {
            panic!("a cascade")
        };
        assert_eq!(*first, ClassifierSpec::Cnn { run: "runs/cnn".into() });
        assert_eq!(second.to_string(), "llm:ollama/llava@http://host:11434");
        assert_eq!((threshold, second_threshold), (0.8, None));
        // A comma inside a path stays in the first spec; the one before `llm:` splits.
        let ClassifierSpec::Cascade { first, .. } = "cascade:cnn:runs/with,comma,llm:openai/gpt-4o@0".parse().unwrap() else {
            panic!("a cascade")
        };
        assert_eq!(first.to_string(), "cnn:runs/with,comma");
        let ClassifierSpec::Cascade { second_threshold, .. } = "cascade:baseline,llm:openai/gpt-4o@0.7/0.9".parse().unwrap() else {
            panic!("a cascade")
        };
        assert_eq!(second_threshold, Some(0.9));
    }

    #[test]
    fn cascade_nonsense_says_what_was_expected() {
        for (s, want) in [
            ("cascade:cnn:runs/cnn,llm:openai/gpt-4o", "no threshold"),
            ("cascade:cnn:runs/cnn,llm:ollama/llava@http://host:11434", "no threshold"),
            ("cascade:cnn:runs/cnn,llm:openai/gpt-4o@1.5", "outside 0..=1"),
            ("cascade:cnn:runs/cnn,llm:openai/gpt-4o@-0.1", "outside 0..=1"),
            ("cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.5/2", "second threshold 2 is outside"),
            ("cascade:cnn:runs/cnn,llm:openai/gpt-4o@0.5x", "not a number"),
            ("cascade:cnn:runs/cnn@0.8", "two classifier specs"),
            ("cascade:cnn:a,svm@0.8", "two classifier specs"),
            ("cascade:svm,cnn:a@0.8", "first stage: expected cnn:RUN_DIR"),
            ("cascade:cnn:a,llm:gpt-4o@0.8", "second stage: "),
            ("cascade:cnn:a,baseline,llm:openai/gpt-4o@0.8", "exactly two stages"),
            ("cascade:cascade:cnn:a,baseline@0.5,llm:openai/gpt-4o@0.8", "do not nest"),
            ("cascade:,llm:openai/gpt-4o@0.8", "first stage is empty"),
        ] {
            let e = s.parse::<ClassifierSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
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
