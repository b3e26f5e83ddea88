//! Mapping of folder and manifest class names onto the canonical labels of the study tasks.
//!
//! The public datasets spell the same class many ways (`Viral Pneumonia`, `notumor`,
//! `large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa`); a model trained on one spelling must be
//! evaluated against the same label ids, so all spellings fold to one canonical name here.

use mica_core::{LabelSet, Modality};

/// Lower-case, with spaces, dots and dashes folded to `_` and repeated `_` collapsed.
pub fn fold(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.trim().chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '_' };
        if c == '_' && (out.is_empty() || out.ends_with('_')) {
            continue;
        }
        out.push(c);
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

/// Folded spellings of each canonical label. A folded name matches when it equals a spelling
/// or starts with it followed by `_` (which covers staging suffixes and `_tumor` endings).
pub(crate) fn spellings(modality: Modality, label: &str) -> &'static [&'static str] {
    match (modality, label) {
        (Modality::Xray, "covid") => &["covid", "covid_19", "covid19", "covid_positive"],
        (Modality::Xray, "lung_opacity") => &["lung_opacity", "opacity", "lung_opacities"],
        (Modality::Xray, "viral_pneumonia") => &["viral_pneumonia", "viral"],
        (Modality::Xray, "normal") => &["normal", "healthy"],
        (Modality::Mri, "glioma") => &["glioma"],
        (Modality::Mri, "meningioma") => &["meningioma"],
        (Modality::Mri, "pituitary") => &["pituitary"],
        (Modality::Mri, "no_tumor") => &["no_tumor", "notumor", "no", "normal", "healthy"],
        (Modality::Ct, "adenocarcinoma") => &["adenocarcinoma"],
        (Modality::Ct, "large_cell_carcinoma") => &["large_cell_carcinoma", "large_cell"],
        (Modality::Ct, "squamous_cell_carcinoma") => &["squamous_cell_carcinoma", "squamous_cell"],
        (Modality::Ct, "normal") => &["normal", "healthy"],
        _ => &[],
    }
}

/// The canonical label index a class name maps to for `modality`, if any.
pub fn canonical_index(modality: Modality, name: &str) -> Option<usize> {
    let labels = modality.canonical_labels()?;
    let f = fold(name);
    if f.is_empty() {
        return None;
    }
    let found = labels.iter().position(|label| {
        spellings(modality, label)
            .iter()
            .any(|s| f == *s || (f.starts_with(s) && f.as_bytes().get(s.len()) == Some(&b'_')))
    });
    found
}

/// The study task whose canonical labels cover every given class name, if exactly one does.
pub fn detect_modality<'a>(names: impl IntoIterator<Item = &'a str> + Clone) -> Option<Modality> {
    let hits: Vec<Modality> = Modality::STUDY
        .into_iter()
        .filter(|&m| {
            let mut any = false;
            for n in names.clone() {
                any = true;
                if canonical_index(m, n).is_none() {
                    return false;
                }
            }
            any
        })
        .collect();
    match hits.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Label set and per-name index for a list of class names: the canonical set when the names
/// belong to a study task, otherwise the names themselves in sorted order.
pub fn label_set_for(names: &[String]) -> (Modality, LabelSet, Vec<usize>) {
    if let Some(m) = detect_modality(names.iter().map(|s| s.as_str())) {
        let set = m.canonical_labels().expect("study modality");
        let idx = names
            .iter()
            .map(|n| canonical_index(m, n).expect("checked"))
            .collect();
        return (m, set, idx);
    }
    let mut sorted: Vec<String> = names.to_vec();
    sorted.sort();
    sorted.dedup();
    let idx = names
        .iter()
        .map(|n| sorted.iter().position(|s| s == n).expect("present"))
        .collect();
    (
        Modality::Other,
        LabelSet::new(sorted).expect("non-empty distinct names"),
        idx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaggle_spellings_fold_to_canonical_labels() {
        assert_eq!(canonical_index(Modality::Xray, "Viral Pneumonia"), Some(2));
        assert_eq!(canonical_index(Modality::Xray, "COVID"), Some(0));
        assert_eq!(canonical_index(Modality::Xray, "Lung_Opacity"), Some(1));
        assert_eq!(canonical_index(Modality::Mri, "notumor"), Some(3));
        assert_eq!(canonical_index(Modality::Mri, "glioma_tumor"), Some(0));
        assert_eq!(
            canonical_index(Modality::Ct, "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa"),
            Some(1)
        );
        assert_eq!(
            canonical_index(Modality::Ct, "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib"),
            Some(0)
        );
        assert_eq!(canonical_index(Modality::Ct, "squamous.cell.carcinoma"), Some(2));
        // A prefix that is not followed by a separator is a different word.
        assert_eq!(canonical_index(Modality::Mri, "nothing"), None);
        assert_eq!(canonical_index(Modality::Xray, "abnormal"), None);
    }

    #[test]
    fn modality_is_detected_only_when_unambiguous() {
        assert_eq!(
            detect_modality(["glioma", "meningioma", "notumor", "pituitary"]),
            Some(Modality::Mri)
        );
        // `normal` alone fits X-ray and CT.
        assert_eq!(detect_modality(["normal"]), None);
        assert_eq!(detect_modality(["cats", "dogs"]), None);
    }

    #[test]
    fn other_names_keep_sorted_order() {
        let (m, set, idx) = label_set_for(&["b".into(), "a".into()]);
        assert_eq!(m, Modality::Other);
        assert_eq!(set.names(), ["a", "b"]);
        assert_eq!(idx, [1, 0]);
    }
}
