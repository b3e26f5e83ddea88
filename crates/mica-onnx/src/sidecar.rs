//! The sidecar `PATH.toml` beside `PATH.onnx`: how to feed the model, in keys that stay the
//! same across mica versions so that users' files keep working.
//!
//! An ONNX file states its input shape but not what the numbers mean (which class is output 2,
//! how pixels were scaled in training). Keys the graph states may be left out; everything else
//! must be written down, because a wrong guess here gives confident, wrong answers rather than
//! an error.

use std::path::{Path, PathBuf};

use mica_core::{LabelSet, Modality};
use serde::Deserialize;

use crate::OnnxError;

/// Where the channel axis is in the model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorLayout {
    /// `[batch, channels, height, width]` (PyTorch).
    Nchw,
    /// `[batch, height, width, channels]` (TensorFlow/Keras).
    Nhwc,
}

impl TensorLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            TensorLayout::Nchw => "nchw",
            TensorLayout::Nhwc => "nhwc",
        }
    }
}

/// How the image is decoded before it is fed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    /// True colour where the file has it (PNG/JPEG); DICOM and grayscale files become R = G = B.
    Rgb,
    /// Grayscale (DICOM windowed as everywhere in mica), replicated when the graph takes 3.
    Gray,
}

/// What the model's output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Already a probability distribution (the graph ends in Softmax).
    Probabilities,
    /// Raw scores; mica applies softmax.
    Logits,
}

/// How the image is stretched to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    Bilinear,
    Nearest,
}

/// The sidecar as written. Optional keys may be filled in from the graph ([`crate::Preprocess`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Class names in output order: mica label names or synonyms.
    pub labels: Vec<String>,
    pub modality: Option<String>,
    pub layout: Option<TensorLayout>,
    /// `[height, width]`.
    pub size: Option<[u32; 2]>,
    pub channels: Option<Channels>,
    pub scale: Option<f32>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub output: Option<OutputKind>,
    pub resize: Option<Resize>,
}

/// The sidecar path of a model: same name, `.toml` instead of `.onnx`.
pub fn sidecar_path(model: &Path) -> PathBuf {
    model.with_extension("toml")
}

impl Sidecar {
    /// Reads and checks the sidecar of `model` (`PATH.toml` beside `PATH.onnx`).
    pub fn read_for(model: &Path) -> Result<Sidecar, OnnxError> {
        let path = sidecar_path(model);
        let text = std::fs::read_to_string(&path).map_err(|e| OnnxError::Sidecar {
            path: path.clone(),
            message: if e.kind() == std::io::ErrorKind::NotFound {
                format!("no sidecar beside {} (write labels, scale, mean, std and output there; see README \"Bring your own model\")", model.display())
            } else {
                e.to_string()
            },
        })?;
        Sidecar::parse(&text, &path)
    }

    /// Parses sidecar text; errors are one line, with the line number where TOML gives a span.
    pub fn parse(text: &str, path: &Path) -> Result<Sidecar, OnnxError> {
        toml::from_str::<Sidecar>(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().trim().replace('\n', " ");
            OnnxError::Sidecar {
                path: match line {
                    Some(l) => PathBuf::from(format!("{}:{l}", path.display())),
                    None => path.to_path_buf(),
                },
                message,
            }
        })
    }

    /// The task the labels belong to: the `modality` key, else the one study task whose
    /// labels cover every class name.
    pub fn modality(&self, path: &Path) -> Result<Modality, OnnxError> {
        match &self.modality {
            Some(m) => m.parse().map_err(|e: String| OnnxError::sidecar(path, format!("modality: {e}"))),
            None => mica_data::labels::detect_modality(self.labels.iter().map(String::as_str)).ok_or_else(|| {
                OnnxError::sidecar(
                    path,
                    "missing key `modality` (the labels do not name exactly one of the tasks xray, mri, ct; write modality = \"xray\", \"mri\", \"ct\" or \"other\")",
                )
            }),
        }
    }

    /// The labels in output order, each mapped onto mica's canonical name for `modality`
    /// through the same spellings the dataset loaders accept (`notumor`, `Viral Pneumonia`).
    pub fn label_set(&self, modality: Modality, path: &Path) -> Result<LabelSet, OnnxError> {
        if self.labels.is_empty() {
            return Err(OnnxError::sidecar(path, "labels: empty (one name per model output, in output order)"));
        }
        let names: Vec<String> = match modality.canonical_labels() {
            Some(canon) => self
                .labels
                .iter()
                .map(|l| {
                    mica_data::labels::canonical_index(modality, l)
                        .map(|i| canon.name(i).to_string())
                        .ok_or_else(|| {
                            OnnxError::sidecar(
                                path,
                                format!("labels: `{l}` is not a {modality} label (mica's are {})", canon.names().join(", ")),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
            None => self.labels.iter().map(|l| l.trim().to_string()).collect(),
        };
        LabelSet::new(names).map_err(|e| OnnxError::sidecar(path, format!("labels: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
labels = ["glioma", "meningioma", "notumor", "pituitary"]
modality = "mri"
layout = "nhwc"
size = [240, 240]
channels = "rgb"
scale = 255.0
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
output = "probabilities"
resize = "bilinear"
"#;

    #[test]
    fn the_issue_example_parses_and_labels_map_to_mica_names() {
        let p = Path::new("m.toml");
        let s = Sidecar::parse(FULL, p).unwrap();
        assert_eq!(s.layout, Some(TensorLayout::Nhwc));
        assert_eq!(s.size, Some([240, 240]));
        assert_eq!(s.output, Some(OutputKind::Probabilities));
        let m = s.modality(p).unwrap();
        assert_eq!(m, Modality::Mri);
        let l = s.label_set(m, p).unwrap();
        assert_eq!(l.names(), ["glioma", "meningioma", "no_tumor", "pituitary"]);
    }

    #[test]
    fn unknown_keys_are_refused_by_name_on_one_line() {
        let e = Sidecar::parse("labels = [\"a\"]\nmeans = [0.5]\n", Path::new("m.toml")).unwrap_err().to_string();
        assert!(e.contains("means") && e.contains("m.toml:2"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = Sidecar::parse("layout = \"hwc\"\nlabels = [\"a\"]", Path::new("m.toml")).unwrap_err().to_string();
        assert!(e.contains("hwc") && !e.contains('\n'), "{e}");
        let e = Sidecar::parse("scale = 1.0", Path::new("m.toml")).unwrap_err().to_string();
        assert!(e.contains("labels"), "{e}");
    }

    #[test]
    fn modality_is_detected_from_labels_or_must_be_written() {
        let p = Path::new("m.toml");
        let s = Sidecar::parse("labels = [\"COVID\", \"Lung_Opacity\", \"Viral Pneumonia\", \"Normal\"]", p).unwrap();
        let m = s.modality(p).unwrap();
        assert_eq!(m, Modality::Xray);
        assert_eq!(s.label_set(m, p).unwrap().names(), ["covid", "lung_opacity", "viral_pneumonia", "normal"]);
        // `normal` alone belongs to three tasks.
        let s = Sidecar::parse("labels = [\"normal\", \"abnormal\"]", p).unwrap();
        let e = s.modality(p).unwrap_err().to_string();
        assert!(e.contains("missing key `modality`"), "{e}");
        let e = Sidecar::parse("labels = [\"glioma\", \"cat\"]\nmodality = \"mri\"", p)
            .unwrap()
            .label_set(Modality::Mri, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`cat` is not a mri label"), "{e}");
        let s = Sidecar::parse("labels = [\"cat\", \"dog\"]\nmodality = \"other\"", p).unwrap();
        assert_eq!(s.label_set(s.modality(p).unwrap(), p).unwrap().names(), ["cat", "dog"]);
        let s = Sidecar::parse("labels = [\"glioma\", \"Glioma\"]\nmodality = \"mri\"", p).unwrap();
        assert!(s.label_set(Modality::Mri, p).unwrap_err().to_string().contains("twice"));
    }
}
