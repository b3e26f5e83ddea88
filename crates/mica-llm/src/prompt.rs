//! Prompt templates per modality, in four context modes, overridable from a TOML file.
//!
//! Placeholders: `{modality}` (e.g. "chest X-ray"), `{labels}` (comma-separated label names),
//! `{label_lines}` (one `- label: description` line per class), `{context}` (the context
//! block of the mode, may be empty), `{examples}` (text-only few-shot examples, may be empty).
//! Few-shot examples are text only because Llama 3.2 Vision accepts one image per message.
//!
//! Override file (any subset of keys; unknown modalities get the `other` template):
//!
//! ```toml
//! [mri]
//! system = "You are ..."
//! user = "Classify this {modality} ... {labels} ... {context}"
//! examples = ["A large enhancing mass ... -> glioma"]
//! [mri.descriptions]
//! glioma = "infiltrative intra-axial tumour"
//! [synonyms]
//! no_tumor = ["tumour-free"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use mica_core::{LabelSet, Modality};
use serde::{Deserialize, Serialize};

use crate::LlmError;

/// What the model is given besides the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContextMode {
    /// Image and task only.
    #[serde(rename = "image")]
    Image,
    /// Image plus the dataset's clinical-context column.
    #[serde(rename = "image+clinical")]
    ImageClinical,
    /// Image plus mica's measured image findings as text.
    #[serde(rename = "image+findings")]
    ImageFindings,
    /// Findings text only (for text-only models): no image is sent.
    #[serde(rename = "findings")]
    Findings,
}

impl ContextMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ContextMode::Image => "image",
            ContextMode::ImageClinical => "image+clinical",
            ContextMode::ImageFindings => "image+findings",
            ContextMode::Findings => "findings",
        }
    }
    pub fn sends_image(self) -> bool {
        self != ContextMode::Findings
    }
    pub fn needs_findings(self) -> bool {
        matches!(self, ContextMode::ImageFindings | ContextMode::Findings)
    }
}

impl std::str::FromStr for ContextMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace(' ', "").as_str() {
            "image" => Ok(ContextMode::Image),
            "image+clinical" | "clinical" => Ok(ContextMode::ImageClinical),
            "image+findings" => Ok(ContextMode::ImageFindings),
            "findings" => Ok(ContextMode::Findings),
            other => Err(format!(
                "unknown context mode `{other}` (expected image, image+clinical, image+findings or findings)"
            )),
        }
    }
}

impl std::fmt::Display for ContextMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub descriptions: BTreeMap<String, String>,
    #[serde(default)]
    pub examples: Vec<String>,
}

/// The templates of every modality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub templates: BTreeMap<String, Template>,
    /// Extra answer synonyms (label -> phrases) read from the override file.
    #[serde(default)]
    pub synonyms: BTreeMap<String, Vec<String>>,
}

const SYSTEM: &str = "You are a careful radiology assistant supporting research on image \
classification. Your answer is decision support for a physician, not a diagnosis. Answer only \
with a JSON object {\"label\": one of the allowed labels, \"confidence\": a number from 0 to 1, \
\"rationale\": one short sentence}.";

const USER: &str = "Classify this {modality} into exactly one of these classes: {labels}.\n\
Classes:\n{label_lines}\n{examples}{context}\
State how confident you are (0 = guessing, 1 = certain); low confidence is fine and will be \
referred to a physician.";

impl Default for PromptSet {
    fn default() -> Self {
        Self::builtin()
    }
}

impl PromptSet {
    pub fn builtin() -> Self {
        let mut templates = BTreeMap::new();
        let d = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        templates.insert(
            "xray".into(),
            Template {
                descriptions: d(&[
                    ("covid", "COVID-19 pneumonia: bilateral, peripheral, lower-zone ground-glass opacities"),
                    ("lung_opacity", "non-COVID lung opacity or infection: focal or lobar consolidation"),
                    ("viral_pneumonia", "non-COVID viral pneumonia: diffuse interstitial, perihilar pattern"),
                    ("normal", "clear lung fields, no opacity"),
                ]),
                ..Template::default()
            },
        );
        templates.insert(
            "mri".into(),
            Template {
                descriptions: d(&[
                    ("glioma", "intra-axial, infiltrative mass within the brain parenchyma, irregular margins"),
                    ("meningioma", "extra-axial, well-circumscribed mass attached to the dura"),
                    ("pituitary", "sellar or suprasellar mass at the pituitary gland"),
                    ("no_tumor", "no mass lesion"),
                ]),
                ..Template::default()
            },
        );
        templates.insert(
            "ct".into(),
            Template {
                descriptions: d(&[
                    (
                        "adenocarcinoma",
                        "peripheral nodule or mass, often with ground-glass component",
                    ),
                    (
                        "large_cell_carcinoma",
                        "large peripheral, poorly differentiated mass",
                    ),
                    (
                        "squamous_cell_carcinoma",
                        "central mass near the hilum, possibly cavitating",
                    ),
                    ("normal", "no nodule or mass"),
                ]),
                ..Template::default()
            },
        );
        templates.insert("other".into(), Template::default());
        PromptSet {
            templates,
            synonyms: BTreeMap::new(),
        }
    }

    /// Lays a TOML override file over the built-in templates.
    pub fn with_overrides_from(mut self, path: &Path) -> Result<Self, LlmError> {
        let text = std::fs::read_to_string(path).map_err(|e| LlmError::file(path, e))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| LlmError::file(path, format!("bad prompt file: {e}")))?;
        if let Some(syn) = table.remove("synonyms") {
            let syn: BTreeMap<String, Vec<String>> = syn
                .try_into()
                .map_err(|e| LlmError::file(path, format!("bad [synonyms] table: {e}")))?;
            self.synonyms.extend(syn);
        }
        for (key, value) in table {
            let m: Modality = key
                .parse()
                .map_err(|e| LlmError::file(path, format!("section [{key}]: {e}")))?;
            let over: Template = value
                .try_into()
                .map_err(|e| LlmError::file(path, format!("section [{key}]: {e}")))?;
            let t = self.templates.entry(m.as_str().to_string()).or_default();
            if over.system.is_some() {
                t.system = over.system;
            }
            if over.user.is_some() {
                t.user = over.user;
            }
            t.descriptions.extend(over.descriptions);
            if !over.examples.is_empty() {
                t.examples = over.examples;
            }
        }
        Ok(self)
    }

    /// Renders (system, user) text. `variant` > 0 rotates the order the classes are listed in,
    /// the prompt-variant form of self-consistency (it also exposes position bias).
    pub fn render(
        &self,
        modality: Modality,
        labels: &LabelSet,
        mode: ContextMode,
        clinical: Option<&str>,
        findings: Option<&str>,
        variant: usize,
    ) -> (String, String) {
        let t = self
            .templates
            .get(modality.as_str())
            .or_else(|| self.templates.get("other"));
        let empty = Template::default();
        let t = t.unwrap_or(&empty);
        let mut order: Vec<&str> = labels.iter().collect();
        if !order.is_empty() {
            let k = variant % order.len();
            order.rotate_left(k);
        }
        let label_lines: String = order
            .iter()
            .map(|l| match t.descriptions.get(*l) {
                Some(d) => format!("- {l}: {d}\n"),
                None => format!("- {l}\n"),
            })
            .collect();
        let examples = if t.examples.is_empty() {
            String::new()
        } else {
            let mut s = "Examples (text only):\n".to_string();
            for e in &t.examples {
                s.push_str(&format!("- {e}\n"));
            }
            s
        };
        let context = match mode {
            ContextMode::Image => String::new(),
            ContextMode::ImageClinical => format!(
                "Clinical context: {}\n",
                clinical
                    .filter(|c| !c.trim().is_empty())
                    .unwrap_or("not available for this patient.")
            ),
            ContextMode::ImageFindings => format!(
                "Image measurements computed by software (not a radiologist's report): {}\n",
                findings.unwrap_or("not available.")
            ),
            ContextMode::Findings => format!(
                "You cannot see the image. Classify from these image measurements computed by \
                 software (not a radiologist's report): {}\n",
                findings.unwrap_or("not available.")
            ),
        };
        let fill = |s: &str| {
            s.replace("{modality}", modality_name(modality))
                .replace("{labels}", &order.join(", "))
                .replace("{label_lines}", &label_lines)
                .replace("{examples}", &examples)
                .replace("{context}", &context)
        };
        let mut user = fill(t.user.as_deref().unwrap_or(USER));
        // A custom template without `{context}` must still carry the context it asked for.
        if !t.user.as_deref().unwrap_or(USER).contains("{context}") && !context.is_empty() {
            user.push('\n');
            user.push_str(&context);
        }
        (fill(t.system.as_deref().unwrap_or(SYSTEM)), user)
    }
}

pub fn modality_name(m: Modality) -> &'static str {
    match m {
        Modality::Xray => "chest X-ray",
        Modality::Mri => "brain MRI slice",
        Modality::Ct => "chest CT slice",
        Modality::Other => "medical image",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mri() -> LabelSet {
        Modality::Mri.canonical_labels().unwrap()
    }

    #[test]
    fn each_context_mode_renders_its_context() {
        let p = PromptSet::builtin();
        let (sys, u) = p.render(
            Modality::Mri,
            &mri(),
            ContextMode::Image,
            Some("58 y, headache"),
            Some("F"),
            0,
        );
        assert!(sys.contains("not a diagnosis"));
        assert!(u.contains("brain MRI") && u.contains("glioma, meningioma, pituitary, no_tumor"));
        assert!(u.contains("- meningioma: extra-axial"));
        assert!(!u.contains("headache") && !u.contains("measurements"));
        let (_, u) = p.render(
            Modality::Mri,
            &mri(),
            ContextMode::ImageClinical,
            Some("58 y, headache"),
            None,
            0,
        );
        assert!(u.contains("Clinical context: 58 y, headache"));
        let (_, u) = p.render(
            Modality::Mri,
            &mri(),
            ContextMode::ImageClinical,
            None,
            None,
            0,
        );
        assert!(u.contains("not available"));
        let (_, u) = p.render(
            Modality::Mri,
            &mri(),
            ContextMode::ImageFindings,
            None,
            Some("bright blob"),
            0,
        );
        assert!(u.contains("computed by software") && u.contains("bright blob"));
        let (_, u) = p.render(
            Modality::Mri,
            &mri(),
            ContextMode::Findings,
            None,
            Some("bright blob"),
            0,
        );
        assert!(u.contains("cannot see the image"));
        let (_, u) = p.render(Modality::Mri, &mri(), ContextMode::Image, None, None, 1);
        assert!(u.contains("meningioma, pituitary, no_tumor, glioma"), "{u}");
    }

    #[test]
    fn toml_overrides_templates_and_synonyms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.toml");
        std::fs::write(
            &path,
            "[mri]\nuser = \"Which of {labels}? {context}\"\nexamples = [\"dural tail -> meningioma\"]\n\
             [mri.descriptions]\nglioma = \"GLIO\"\n[synonyms]\nno_tumor = [\"tumour-free\"]\n",
        )
        .unwrap();
        let p = PromptSet::builtin().with_overrides_from(&path).unwrap();
        let (_, u) = p.render(
            Modality::Mri,
            &mri(),
            ContextMode::ImageClinical,
            Some("x"),
            None,
            0,
        );
        assert!(u.starts_with("Which of glioma,"), "{u}");
        assert!(u.contains("Clinical context: x"));
        assert_eq!(p.templates["mri"].descriptions["glioma"], "GLIO");
        assert_eq!(p.synonyms["no_tumor"], vec!["tumour-free".to_string()]);
        std::fs::write(&path, "[pet]\nuser = \"x\"\n").unwrap();
        let e = PromptSet::builtin()
            .with_overrides_from(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("prompts.toml") && e.contains("[pet]"), "{e}");
        std::fs::write(&path, "[mri]\nusr = \"x\"\n").unwrap();
        let e = PromptSet::builtin()
            .with_overrides_from(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("usr"), "{e}");
    }
}
