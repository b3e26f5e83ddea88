//! Which per-image metadata reaches a model's prompt, and the guard that keeps the answer out.
//!
//! Clinical context is opt-in: a `context` column (of a CSV manifest or of `metadata.csv`
//! beside the dataset) is used as written, and other columns only when they are named
//! (`--context-columns age,sex`). A column whose name or values name or imply a class is
//! refused even when named, because a prompt that says "diagnosis: glioma" measures nothing;
//! `--allow-label-like-context` lets it through, and the run is stamped with it.

use std::collections::HashMap;
use std::path::Path;

use mica_core::{LabelSet, Modality};
use serde::{Deserialize, Serialize};

use crate::labels::fold;
use crate::DataError;

/// What metadata may reach a prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextSpec {
    /// Metadata columns joined into the context as `name: value`, besides a `context` column.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// Let columns that name or imply a class through (every figure of the run says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_label_like: bool,
}

/// Words that say a column holds the answer.
const LABEL_WORDS: [&str; 17] = [
    "label", "labels", "class", "classes", "diagnosis", "diagnoses", "dx", "finding", "findings",
    "target", "category", "outcome", "truth", "gt", "pathology", "disease", "tumor_type",
];

/// The folded spellings that name `label` in free text (`viral pneumonia`, `no tumor`, ...).
fn label_phrases(labels: &LabelSet, modality: Modality) -> Vec<String> {
    let mut out = Vec::new();
    for l in labels.iter() {
        out.push(fold(l));
        for s in crate::labels::spellings(modality, l) {
            // "no" alone is too common a word to mean "no tumour".
            if *s != "no" {
                out.push(s.to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// True when the folded text contains the folded phrase as whole words.
fn contains_phrase(folded: &str, phrase: &str) -> bool {
    format!("_{folded}_").contains(&format!("_{phrase}_"))
}

/// Why a column may carry the answer, if it may.
pub fn label_like(column: &str, values: &[&str], labels: &LabelSet, modality: Modality) -> Option<String> {
    let name = fold(column);
    if let Some(w) = LABEL_WORDS.iter().find(|w| contains_phrase(&name, w)) {
        return Some(format!("its name says `{w}`"));
    }
    let phrases = label_phrases(labels, modality);
    if let Some(p) = phrases.iter().find(|p| contains_phrase(&name, p)) {
        return Some(format!("its name contains the class `{p}`"));
    }
    for v in values {
        let f = fold(v);
        if let Some(p) = phrases.iter().find(|p| contains_phrase(&f, p)) {
            return Some(format!("a value (`{}`) names the class `{p}`", v.chars().take(60).collect::<String>()));
        }
    }
    None
}

/// The columns of a metadata table that reach prompts under `spec`, checked: `context` when
/// present, then each named column (which must exist). Returns their header indices and the
/// columns let through under `allow_label_like`.
pub fn select_columns(
    file: &Path,
    headers: &[String],
    rows: &[Vec<String>],
    spec: &ContextSpec,
    labels: &LabelSet,
    modality: Modality,
) -> Result<(Vec<(usize, bool)>, Vec<String>), DataError> {
    let find = |name: &str| headers.iter().position(|h| fold(h) == fold(name));
    let mut chosen: Vec<(usize, bool)> = Vec::new();
    if let Some(i) = find("context") {
        chosen.push((i, true));
    }
    for c in &spec.columns {
        let i = find(c).ok_or_else(|| {
            DataError::usage(file, format!("--context-columns names `{c}`, which is not a column (header: {})", headers.join(",")))
        })?;
        if !chosen.iter().any(|(j, _)| *j == i) {
            chosen.push((i, false));
        }
    }
    let mut allowed = Vec::new();
    for (i, _) in &chosen {
        let values: Vec<&str> = rows.iter().filter_map(|r| r.get(*i).map(|s| s.as_str())).collect();
        if let Some(why) = label_like(&headers[*i], &values, labels, modality) {
            if !spec.allow_label_like {
                return Err(DataError::usage(
                    file,
                    format!(
                        "column `{}` may carry the answer ({why}), so it never reaches a prompt; pass --allow-label-like-context to use it anyway (every figure is then stamped)",
                        headers[*i]
                    ),
                ));
            }
            allowed.push(headers[*i].clone());
        }
    }
    Ok((chosen, allowed))
}

/// The context text of one row: a `context` column as written, other columns as `name: value`.
pub fn compose(headers: &[String], row: &[String], chosen: &[(usize, bool)]) -> Option<String> {
    let parts: Vec<String> = chosen
        .iter()
        .filter_map(|(i, raw)| {
            let v = row.get(*i).map(|s| s.trim()).unwrap_or("");
            (!v.is_empty()).then(|| if *raw { v.to_string() } else { format!("{}: {v}", headers[*i]) })
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Matches metadata rows to samples by the path relative to the dataset root; a bare file
/// name (or stem) is accepted only where it names exactly one image.
pub fn match_rows<'a>(
    file: &Path,
    keys: impl Iterator<Item = (usize, &'a str)>,
    ids: &[&str],
) -> Result<HashMap<usize, usize>, DataError> {
    let by_id: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let name = id.rsplit('/').next().unwrap_or(id);
        let stem = name.rsplit_once('.').map(|(a, _)| a).unwrap_or(name);
        by_name.entry(name.to_string()).or_default().push(i);
        if stem != name {
            by_name.entry(stem.to_string()).or_default().push(i);
        }
    }
    let mut out: HashMap<usize, usize> = HashMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (row, key) in keys {
        let key = key.replace('\\', "/");
        let key = key.trim_start_matches("./");
        if key.is_empty() {
            continue;
        }
        if let Some(prev) = seen.insert(key.to_string(), row) {
            return Err(DataError::invalid(file, format!("rows {} and {} both describe `{key}`", prev + 2, row + 2)));
        }
        let sample = match by_id.get(key) {
            Some(&i) => Some(i),
            None => match by_name.get(key).map(|v| v.as_slice()) {
                Some([i]) => Some(*i),
                Some(many) if many.len() > 1 => {
                    let ids: Vec<&str> = many.iter().take(3).map(|i| ids[*i]).collect();
                    return Err(DataError::invalid(
                        file,
                        format!(
                            "`{key}` (row {}) names several images ({}); give the path relative to the dataset root",
                            row + 2,
                            ids.join(", ")
                        ),
                    ));
                }
                _ => None,
            },
        };
        if let Some(i) = sample {
            if out.insert(i, row).is_some() {
                return Err(DataError::invalid(file, format!("two rows describe `{}`", ids[i])));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mri() -> LabelSet {
        Modality::Mri.canonical_labels().unwrap()
    }

    #[test]
    fn names_and_values_that_carry_the_class_are_caught() {
        let l = mri();
        for col in ["label", "Class", "diagnosis", "Finding", "target", "tumor_type", "glioma_flag"] {
            assert!(label_like(col, &[], &l, Modality::Mri).is_some(), "{col}");
        }
        assert!(label_like("notes", &["history of Glioma, resected"], &l, Modality::Mri).is_some());
        assert!(label_like("notes", &["no tumor seen before"], &l, Modality::Mri).is_some());
        assert!(label_like("age", &["61", "45"], &l, Modality::Mri).is_none());
        assert!(label_like("symptoms", &["headache for 3 weeks", "no relevant history"], &l, Modality::Mri).is_none());
    }

    #[test]
    fn bare_names_must_be_unambiguous() {
        let f = Path::new("metadata.csv");
        let ids = ["glioma/1.png", "meningioma/1.png", "pituitary/7.png"];
        let m = match_rows(f, [(0, "pituitary/7.png"), (1, "7")].into_iter(), &ids);
        assert!(m.is_err(), "two rows for one image");
        let m = match_rows(f, [(0, "7.png")].into_iter(), &ids).unwrap();
        assert_eq!(m[&2], 0);
        let e = match_rows(f, [(0, "1.png")].into_iter(), &ids).unwrap_err().to_string();
        assert!(e.contains("names several images") && e.contains("glioma/1.png"), "{e}");
        let m = match_rows(f, [(0, "meningioma/1.png")].into_iter(), &ids).unwrap();
        assert_eq!(m[&1], 0);
    }
}
