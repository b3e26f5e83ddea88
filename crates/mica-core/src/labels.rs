//! Label sets and the canonical labels of the three study tasks.

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// The imaging task a dataset belongs to; it decides canonical labels, prompts and phantoms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Xray,
    Mri,
    Ct,
    Other,
}

impl Modality {
    pub const STUDY: [Modality; 3] = [Modality::Xray, Modality::Mri, Modality::Ct];

    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Xray => "xray",
            Modality::Mri => "mri",
            Modality::Ct => "ct",
            Modality::Other => "other",
        }
    }

    /// Canonical label names (snake_case, in a fixed order) of the study's three tasks.
    pub fn canonical_labels(self) -> Option<LabelSet> {
        let names: &[&str] = match self {
            Modality::Xray => &["covid", "lung_opacity", "viral_pneumonia", "normal"],
            Modality::Mri => &["glioma", "meningioma", "pituitary", "no_tumor"],
            Modality::Ct => &[
                "adenocarcinoma",
                "large_cell_carcinoma",
                "squamous_cell_carcinoma",
                "normal",
            ],
            Modality::Other => return None,
        };
        Some(LabelSet::new(names.iter().map(|s| s.to_string()).collect()).expect("static labels"))
    }
}

impl std::str::FromStr for Modality {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "xray" | "x-ray" | "cxr" => Ok(Modality::Xray),
            "mri" | "mr" => Ok(Modality::Mri),
            "ct" => Ok(Modality::Ct),
            "other" => Ok(Modality::Other),
            other => Err(format!("unknown modality `{other}` (expected xray, mri or ct)")),
        }
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An ordered set of class names; the index of a name is its class id everywhere
/// (tensors, confusion matrices, probability vectors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LabelSet {
    labels: Vec<String>,
}

impl LabelSet {
    pub fn new(labels: Vec<String>) -> Result<Self, CoreError> {
        if labels.is_empty() {
            return Err(CoreError::Labels("no labels".into()));
        }
        for (i, l) in labels.iter().enumerate() {
            if l.trim().is_empty() {
                return Err(CoreError::Labels(format!("label {i} is empty")));
            }
            if labels[..i].contains(l) {
                return Err(CoreError::Labels(format!("label `{l}` appears twice")));
            }
        }
        Ok(LabelSet { labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }

    pub fn name(&self, index: usize) -> &str {
        &self.labels[index]
    }

    pub fn names(&self) -> &[String] {
        &self.labels
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.labels.iter().map(|s| s.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sets_have_four_distinct_labels() {
        for m in Modality::STUDY {
            let l = m.canonical_labels().unwrap();
            assert_eq!(l.len(), 4, "{m}");
        }
        assert_eq!(Modality::Mri.canonical_labels().unwrap().index_of("no_tumor"), Some(3));
    }

    #[test]
    fn duplicate_and_empty_labels_are_rejected() {
        assert!(LabelSet::new(vec!["a".into(), "a".into()]).is_err());
        assert!(LabelSet::new(vec![]).is_err());
        assert!(LabelSet::new(vec![" ".into()]).is_err());
    }

    #[test]
    fn modality_parses_aliases() {
        assert_eq!("X-Ray".parse::<Modality>().unwrap(), Modality::Xray);
        assert!("pet".parse::<Modality>().is_err());
    }
}
