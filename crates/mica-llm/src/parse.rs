//! Staged answer parsing: strict JSON -> exact label -> synonym -> fuzzy -> `unparseable`.
//!
//! Each stage is recorded on the prediction, so a report can say how many answers needed
//! rescuing, and an answer that maps onto nothing is never silently scored as some class
//! (the pitfall of harnesses that turn a failed request into an empty "wrong" answer).

use mica_core::LabelSet;
use serde::{Deserialize, Serialize};

/// Which stage turned the raw answer into a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParseStage {
    /// The answer is the requested JSON object and its `label` is in the label set.
    Json,
    /// The answer (or its `label` field) names exactly one label.
    Exact,
    /// A known synonym ("COVID-19 pneumonia", "no tumour") names exactly one label.
    Synonym,
    /// A near-miss spelling ("meningeoma") of exactly one label or synonym.
    Fuzzy,
}

impl ParseStage {
    pub fn as_str(self) -> &'static str {
        match self {
            ParseStage::Json => "json",
            ParseStage::Exact => "exact",
            ParseStage::Synonym => "synonym",
            ParseStage::Fuzzy => "fuzzy",
        }
    }
}

/// Which stages may map an answer; the later two are the filter's "label validation" stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParseOptions {
    pub synonyms: bool,
    pub fuzzy: bool,
    /// Minimum normalised Levenshtein similarity (0..1) for a fuzzy match.
    pub fuzzy_threshold: f64,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            synonyms: true,
            fuzzy: true,
            fuzzy_threshold: 0.8,
        }
    }
}

/// Phrases that name a label in other words. Entries for labels outside the current label set
/// are ignored, so one table serves all three tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SynonymTable {
    /// (normalised phrase, label)
    entries: Vec<(String, String)>,
}

impl SynonymTable {
    pub fn empty() -> Self {
        SynonymTable::default()
    }

    /// Synonyms for the canonical labels of the study's three tasks.
    pub fn builtin() -> Self {
        let mut t = SynonymTable::empty();
        let table: &[(&str, &[&str])] = &[
            (
                "covid",
                &[
                    "covid-19",
                    "covid 19",
                    "covid19",
                    "covid pneumonia",
                    "covid-19 pneumonia",
                    "sars-cov-2",
                    "sars cov 2",
                    "coronavirus",
                    "coronavirus disease",
                ],
            ),
            (
                "lung_opacity",
                &[
                    "lung opacity",
                    "lung opacities",
                    "opacity",
                    "opacities",
                    "non-covid lung infection",
                    "non covid lung infection",
                    "consolidation",
                    "infiltrate",
                ],
            ),
            (
                "viral_pneumonia",
                &[
                    "viral pneumonia",
                    // Not plain "pneumonia": bacterial pneumonia is another disease, and an
                    // answer that names only "pneumonia" has not said which.
                    "non-covid viral pneumonia",
                    "viral infection",
                ],
            ),
            (
                "glioma",
                &["glioma", "glioblastoma", "astrocytoma", "gliomas"],
            ),
            (
                "meningioma",
                &[
                    "meningioma",
                    "meningiomas",
                    "meningeal tumor",
                    "meningeal tumour",
                ],
            ),
            (
                "pituitary",
                &[
                    "pituitary tumor",
                    "pituitary tumour",
                    "pituitary adenoma",
                    "pituitary macroadenoma",
                    "pituitary lesion",
                    "pituitary",
                ],
            ),
            (
                "no_tumor",
                &[
                    "no tumor",
                    "no tumour",
                    "notumor",
                    "no_tumor",
                    "tumor free",
                    "tumour free",
                    "no tumor detected",
                    "normal brain",
                    "healthy brain",
                    "no lesion",
                ],
            ),
            (
                "adenocarcinoma",
                &["adenocarcinoma", "lung adenocarcinoma", "adeno carcinoma"],
            ),
            (
                "large_cell_carcinoma",
                &[
                    "large cell carcinoma",
                    "large-cell carcinoma",
                    "large cell",
                    "large-cell",
                    "large cell undifferentiated carcinoma",
                ],
            ),
            (
                "squamous_cell_carcinoma",
                &[
                    "squamous cell carcinoma",
                    "squamous carcinoma",
                    "squamous cell",
                    "squamous",
                ],
            ),
            (
                "normal",
                &[
                    "normal",
                    "no finding",
                    "no findings",
                    "healthy",
                    "unremarkable",
                    "no abnormality",
                    "no abnormalities",
                    "no acute findings",
                    "no disease",
                    // Not "benign": a benign tumour is a finding, not a normal scan.
                ],
            ),
        ];
        for (label, phrases) in table {
            for p in *phrases {
                t.add(label, p);
            }
        }
        t
    }

    /// The (normalised) phrases recorded for a label.
    pub fn phrases_for(&self, label: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, l)| l == label)
            .map(|(p, _)| p.clone())
            .collect()
    }

    pub fn add(&mut self, label: &str, phrase: &str) {
        let n = normalize(phrase);
        if !n.is_empty() && !self.entries.iter().any(|(p, l)| *p == n && l == label) {
            self.entries.push((n, label.to_string()));
        }
    }

    /// (phrase, label, is a synonym) for labels in `labels`, starting with each label's own
    /// name; synonyms only when `with_synonyms`.
    fn candidates(&self, labels: &LabelSet, with_synonyms: bool) -> Vec<(String, String, bool)> {
        let mut out: Vec<(String, String, bool)> = labels
            .iter()
            .map(|l| (normalize(l), l.to_string(), false))
            .collect();
        if with_synonyms {
            for (p, l) in &self.entries {
                if labels.index_of(l).is_some() && !out.iter().any(|(q, m, _)| q == p && m == l) {
                    out.push((p.clone(), l.clone(), true));
                }
            }
        }
        out
    }
}

/// What parsing made of one raw answer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ParsedAnswer {
    /// `None`: unparseable.
    pub label: Option<String>,
    pub stage: Option<ParseStage>,
    /// The model's stated confidence, 0..=1 (a percentage is rescaled).
    pub confidence: Option<f64>,
    pub rationale: Option<String>,
    /// Whether the answer was (or contained) a JSON object.
    pub json: bool,
    /// Why the answer was unparseable, or what was rescued.
    pub note: Option<String>,
}

/// Lowercase, every non-alphanumeric run becomes one space: `COVID-19` -> `covid 19`,
/// `no_tumor` -> `no tumor`.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = true;
    for c in s.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
            space = false;
        } else if !space {
            out.push(' ');
            space = true;
        }
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

const NEGATIONS: &[&str] = &[
    "no", "not", "without", "non", "excluded", "exclude", "absent", "nor",
];

pub fn parse_answer(
    content: &str,
    labels: &LabelSet,
    synonyms: &SynonymTable,
    opts: &ParseOptions,
) -> ParsedAnswer {
    let mut out = ParsedAnswer::default();
    let mut text = content.to_string();
    if let Some(obj) = extract_json_object(content) {
        out.json = true;
        out.confidence = obj.get("confidence").and_then(confidence_value);
        out.rationale = obj
            .get("rationale")
            .and_then(|v| v.as_str())
            .map(|s| s.to_string());
        let label_field = ["label", "class", "diagnosis", "answer", "category"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(|v| v.as_str()));
        match label_field {
            Some(l) => {
                let n = normalize(l);
                if let Some(hit) = labels.iter().find(|x| normalize(x) == n) {
                    out.label = Some(hit.to_string());
                    out.stage = Some(ParseStage::Json);
                    return out;
                }
                text = l.to_string();
            }
            None => {
                out.note = Some("JSON answer has no `label` field".into());
            }
        }
    }
    let norm = normalize(&text);
    if norm.is_empty() {
        out.note = Some("empty answer".into());
        return out;
    }
    let words: Vec<&str> = norm.split(' ').collect();

    // Exact: the answer is a label, or names exactly one label (not negated).
    if let Some(hit) = labels.iter().find(|l| normalize(l) == norm) {
        out.label = Some(hit.to_string());
        out.stage = Some(ParseStage::Exact);
        return out;
    }
    // Label names and synonyms are matched together so that a longer synonym wins over a
    // label name inside it ("covid 19" is the synonym stage, not the label `covid`).
    let candidates = synonyms.candidates(labels, opts.synonyms);
    match unique_label(&words, &candidates) {
        Match::One(l, via_synonym) => {
            out.label = Some(l);
            out.stage = Some(if via_synonym {
                ParseStage::Synonym
            } else {
                ParseStage::Exact
            });
            out.note = None;
            return out;
        }
        Match::Ambiguous(ls) => {
            out.note = Some(format!("answer names several labels: {}", ls.join(", ")));
            return out;
        }
        Match::None => {}
    }
    if opts.fuzzy && out.note.is_none() {
        if let Some(l) = fuzzy_label(&words, &candidates, opts.fuzzy_threshold) {
            out.note = Some(format!("fuzzy match of `{}`", truncate(&text, 80)));
            out.label = Some(l);
            out.stage = Some(ParseStage::Fuzzy);
            return out;
        }
    }
    if out.note.is_none() {
        out.note = Some(format!(
            "`{}` does not map onto the labels {}",
            truncate(&text, 80),
            labels.names().join(", ")
        ));
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    let t: String = s.chars().take(n).collect();
    if t.len() < s.len() {
        format!("{t}...")
    } else {
        t
    }
}

fn confidence_value(v: &serde_json::Value) -> Option<f64> {
    let x = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().trim_end_matches('%').trim().parse().ok()?,
        _ => return None,
    };
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    if x <= 1.0 {
        Some(x)
    } else if x <= 100.0 {
        Some(x / 100.0)
    } else {
        None
    }
}

/// The JSON object in an answer: the whole answer, a fenced ```json block, or the outermost
/// `{...}` inside prose.
fn extract_json_object(content: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let t = content.trim();
    let try_parse = |s: &str| match serde_json::from_str::<serde_json::Value>(s) {
        Ok(serde_json::Value::Object(m)) => Some(m),
        _ => None,
    };
    if let Some(m) = try_parse(t) {
        return Some(m);
    }
    let (start, end) = (t.find('{')?, t.rfind('}')?);
    if end > start {
        try_parse(&t[start..=end])
    } else {
        None
    }
}

enum Match {
    None,
    /// The label, and whether a synonym (not the label's own name) named it.
    One(String, bool),
    Ambiguous(Vec<String>),
}

/// "no covid", "not a meningioma", "without any tumor".
fn negated(words: &[&str], i: usize) -> bool {
    const FILLERS: &[&str] = &["a", "an", "the", "any", "of"];
    (i > 0 && NEGATIONS.contains(&words[i - 1]))
        || (i > 1 && FILLERS.contains(&words[i - 1]) && NEGATIONS.contains(&words[i - 2]))
}

/// Finds every non-negated occurrence of a candidate phrase; occurrences inside a longer
/// occurrence are dropped ("covid pneumonia" wins over "pneumonia"), then exactly one label
/// must remain.
fn unique_label(words: &[&str], candidates: &[(String, String, bool)]) -> Match {
    let mut hits: Vec<(usize, usize, &str, bool)> = Vec::new();
    for (phrase, label, syn) in candidates {
        let pw: Vec<&str> = phrase.split(' ').collect();
        if pw.len() > words.len() {
            continue;
        }
        for i in 0..=words.len() - pw.len() {
            if words[i..i + pw.len()] == pw[..] {
                // A phrase that is itself a negation ("no tumor") is not negated by its own word.
                if !negated(words, i) {
                    hits.push((i, i + pw.len(), label.as_str(), *syn));
                }
            }
        }
    }
    let kept: Vec<&(usize, usize, &str, bool)> = hits
        .iter()
        .filter(|(s, e, _, _)| {
            !hits
                .iter()
                .any(|(s2, e2, _, _)| s2 <= s && e <= e2 && (e2 - s2) > (e - s))
        })
        .collect();
    let mut labels: Vec<String> = Vec::new();
    for (_, _, l, _) in &kept {
        if !labels.iter().any(|x| x == l) {
            labels.push(l.to_string());
        }
    }
    match labels.len() {
        0 => Match::None,
        // Exact only when the label's own name is among the surviving occurrences.
        1 => {
            let by_name = kept.iter().any(|(_, _, _, syn)| !syn);
            Match::One(labels.pop().unwrap(), !by_name)
        }
        _ => Match::Ambiguous(labels),
    }
}

fn fuzzy_label(
    words: &[&str],
    candidates: &[(String, String, bool)],
    threshold: f64,
) -> Option<String> {
    let mut best: Vec<(f64, &str)> = Vec::new();
    for (phrase, label, _) in candidates {
        // Short phrases ("scc", "normal" vs "formal") match too much by accident.
        if phrase.len() < 6 {
            continue;
        }
        let n = phrase.split(' ').count();
        if n > words.len() {
            continue;
        }
        for i in 0..=words.len() - n {
            if negated(words, i) {
                continue;
            }
            let window = words[i..i + n].join(" ");
            let s = similarity(&window, phrase);
            if s >= threshold {
                best.push((s, label));
            }
        }
    }
    best.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (top, label) = *best.first()?;
    // A near tie between two different labels is not a match.
    if best.iter().any(|(s, l)| *l != label && top - s < 0.05) {
        return None;
    }
    Some(label.to_string())
}

/// 1 - Levenshtein distance / longer length.
pub fn similarity(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let n = a.len().max(b.len());
    if n == 0 {
        return 1.0;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    1.0 - prev[b.len()] as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use mica_core::Modality;

    fn xray() -> LabelSet {
        Modality::Xray.canonical_labels().unwrap()
    }
    fn mri() -> LabelSet {
        Modality::Mri.canonical_labels().unwrap()
    }
    fn p(content: &str, labels: &LabelSet) -> ParsedAnswer {
        parse_answer(
            content,
            labels,
            &SynonymTable::builtin(),
            &ParseOptions::default(),
        )
    }

    #[test]
    fn strict_json_stage() {
        let a = p(
            r#"{"label":"covid","confidence":0.83,"rationale":"bilateral opacities"}"#,
            &xray(),
        );
        assert_eq!(a.label.as_deref(), Some("covid"));
        assert_eq!(a.stage, Some(ParseStage::Json));
        assert_eq!(a.confidence, Some(0.83));
        assert_eq!(a.rationale.as_deref(), Some("bilateral opacities"));
        // Fenced JSON with a percentage confidence.
        let a = p(
            "```json\n{\"label\": \"Normal\", \"confidence\": 90}\n```",
            &xray(),
        );
        assert_eq!(
            (a.label.as_deref(), a.stage),
            (Some("normal"), Some(ParseStage::Json))
        );
        assert_eq!(a.confidence, Some(0.9));
    }

    #[test]
    fn exact_stage() {
        let a = p("viral_pneumonia", &xray());
        assert_eq!(
            (a.label.as_deref(), a.stage),
            (Some("viral_pneumonia"), Some(ParseStage::Exact))
        );
        let a = p("The answer is: lung opacity.", &xray());
        assert_eq!(
            (a.label.as_deref(), a.stage),
            (Some("lung_opacity"), Some(ParseStage::Exact))
        );
        // A JSON label that is an out-of-set spelling falls through to later stages.
        let a = p(r#"{"label":"Lung Opacity","confidence":0.4}"#, &xray());
        assert_eq!(a.stage, Some(ParseStage::Json));
    }

    #[test]
    fn synonym_stage() {
        for (text, want) in [
            ("COVID-19", "covid"),
            ("This looks like covid pneumonia", "covid"),
            (
                r#"{"label":"SARS-CoV-2 infection","confidence":0.7}"#,
                "covid",
            ),
        ] {
            let a = p(text, &xray());
            assert_eq!(
                (a.label.as_deref(), a.stage),
                (Some(want), Some(ParseStage::Synonym)),
                "{text}"
            );
        }
        let a = p("No tumour is visible.", &mri());
        assert_eq!(
            (a.label.as_deref(), a.stage),
            (Some("no_tumor"), Some(ParseStage::Synonym))
        );
        let a = p(
            "Findings consistent with a pituitary adenoma, not a meningioma.",
            &mri(),
        );
        assert_eq!(a.label.as_deref(), Some("pituitary"));
    }

    #[test]
    fn fuzzy_stage() {
        let a = p("meningeoma", &mri());
        assert_eq!(
            (a.label.as_deref(), a.stage),
            (Some("meningioma"), Some(ParseStage::Fuzzy))
        );
        let a = p(r#"{"label":"pituatary","confidence":0.6}"#, &mri());
        assert_eq!(
            (a.label.as_deref(), a.stage),
            (Some("pituitary"), Some(ParseStage::Fuzzy))
        );
        assert_eq!(a.confidence, Some(0.6));
    }

    #[test]
    fn unparseable_answers_get_no_label_and_a_reason() {
        for text in [
            "",
            "I cannot help with medical images.",
            r#"{"label":"tuberculosis"}"#,
            r#"{"label": "covid", "confid"#,
            "either glioma or meningioma",
        ] {
            let a = p(text, &mri());
            assert_eq!(a.label, None, "{text}");
            assert!(a.note.is_some(), "{text}");
        }
        let a = p("glioma or meningioma", &mri());
        assert!(a.note.unwrap().contains("several labels"));
    }

    #[test]
    fn stages_can_be_switched_off() {
        let strict = ParseOptions {
            synonyms: false,
            fuzzy: false,
            fuzzy_threshold: 0.8,
        };
        let a = parse_answer("SARS-CoV-2", &xray(), &SynonymTable::builtin(), &strict);
        assert_eq!(a.label, None);
        let a = parse_answer("meningeoma", &mri(), &SynonymTable::builtin(), &strict);
        assert_eq!(a.label, None);
    }

    #[test]
    fn negation_is_respected() {
        let a = p("not covid; normal lungs", &xray());
        assert_eq!(a.label.as_deref(), Some("normal"));
    }
}
