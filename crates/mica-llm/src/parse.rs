//! Staged answer parsing: strict JSON -> exact label -> synonym -> fuzzy -> `unparseable`,
//! with refusals recognised on the way.
//!
//! Each stage is recorded on the prediction, so a report can say how many answers needed
//! rescuing, and an answer that maps onto nothing is never silently scored as some class
//! (the pitfall of harnesses that turn a failed request into an empty "wrong" answer).
//!
//! Rules for prose (answers that are not the requested JSON):
//! - **One class or nothing.** An answer that names two classes, or hedges between them
//!   ("it could be glioma or meningioma", "either X or Y", "X vs Y", even with the second
//!   one misspelt), is unparseable, never the first class named.
//! - **Refusals.** The answer is cut into clauses (at `. ! ? ; :`, line breaks, and "but",
//!   "however", "although", "though", "nevertheless"). A clause that declines ("I'm sorry,
//!   but I can't help with that", "I cannot provide a diagnosis", "I can't tell whether this
//!   is COVID-19") is a refusal clause; any labels it mentions do not count. If the other
//!   clauses name exactly one class, that is the answer (a disclaimer followed by an answer:
//!   "I can't give a diagnosis, but this looks like a glioma"); otherwise the answer is
//!   refused. See [`REFUSAL_HEADS`] for the patterns.
//! - A JSON answer is never read as a refusal: an out-of-set `label` is unparseable.

use std::collections::BTreeMap;

use mica_core::LabelSet;
use serde::{Deserialize, Serialize};

/// The built-in synonym table: per task, per label, the phrases that name it, with the reasons
/// why tempting phrases were left out.
pub const BUILTIN_SYNONYMS: &str = include_str!("synonyms.toml");

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

    /// Synonyms for the canonical labels of the study's three tasks, read from
    /// `synonyms.toml` (built into the binary; one file a clinician can read and review).
    pub fn builtin() -> Self {
        static BUILTIN: std::sync::OnceLock<SynonymTable> = std::sync::OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                SynonymTable::from_toml(BUILTIN_SYNONYMS)
                    .expect("the built-in synonyms.toml parses (checked by a unit test)")
            })
            .clone()
    }

    /// A table from the layout of `synonyms.toml`: one table per task, `label = [phrases]`.
    /// A label that appears in several tasks collects the phrases of all of them.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let sections: BTreeMap<String, BTreeMap<String, Vec<String>>> =
            toml::from_str(text).map_err(|e| format!("synonym table: {e}"))?;
        let mut t = SynonymTable::empty();
        for labels in sections.values() {
            for (label, phrases) in labels {
                for p in phrases {
                    t.add(label, p);
                }
            }
        }
        Ok(t)
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
    /// The model declined to answer (an OpenAI `refusal`, or prose that reads as one).
    #[serde(default, skip_serializing_if = "is_false")]
    pub refused: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ParsedAnswer {
    /// A refusal: no label; `why` says what the model wrote.
    pub fn refusal(text: &str) -> Self {
        ParsedAnswer {
            refused: true,
            note: Some(format!(
                "the model declined to answer: `{}`",
                truncate(text.trim(), 80)
            )),
            ..ParsedAnswer::default()
        }
    }
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
    if normalize(&text).is_empty() {
        out.note = Some("empty answer".into());
        return out;
    }
    // Prose that declines: only the clauses that are not refusals may still name a class.
    if !out.json {
        let (refusals, rest) = split_refusal(&text);
        if refusals > 0 {
            let mut rescued = match_text(&rest, labels, synonyms, opts);
            if rescued.label.is_some() {
                rescued.note = Some("answer given after a refusal-like disclaimer".into());
                return rescued;
            }
            return ParsedAnswer::refusal(content);
        }
    }
    let json = out.json;
    let confidence = out.confidence;
    let rationale = out.rationale.take();
    // A JSON answer without a label field is searched for a label name, not fuzzily.
    let note = out.note.take();
    let opts = ParseOptions {
        fuzzy: opts.fuzzy && note.is_none(),
        ..*opts
    };
    let mut m = match_text(&text, labels, synonyms, &opts);
    m.json = json;
    m.confidence = confidence;
    m.rationale = rationale;
    if m.label.is_none()
        && note.is_some()
        && !m
            .note
            .as_deref()
            .is_some_and(|n| n.contains("several labels"))
    {
        m.note = note;
    }
    m
}

/// The exact, synonym and fuzzy stages over `text`.
fn match_text(
    text: &str,
    labels: &LabelSet,
    synonyms: &SynonymTable,
    opts: &ParseOptions,
) -> ParsedAnswer {
    let mut out = ParsedAnswer::default();
    let norm = normalize(text);
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
        Match::One(l, via_synonym, spans) => {
            // A hedge whose other class is misspelt ("glioma or meningeoma") names two.
            if opts.fuzzy {
                if let Some(other) = fuzzy_hits(&words, &candidates, opts.fuzzy_threshold, &spans)
                    .into_iter()
                    .map(|(_, l2)| l2)
                    .find(|l2| *l2 != l)
                {
                    out.note = Some(format!("answer names several labels: {l}, {other}"));
                    return out;
                }
            }
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
    if opts.fuzzy {
        match fuzzy_label(&words, &candidates, opts.fuzzy_threshold) {
            Match::One(l, _, _) => {
                out.note = Some(format!("fuzzy match of `{}`", truncate(text, 80)));
                out.label = Some(l);
                out.stage = Some(ParseStage::Fuzzy);
                return out;
            }
            Match::Ambiguous(ls) => {
                out.note = Some(format!(
                    "answer names several labels (fuzzily): {}",
                    ls.join(", ")
                ));
                return out;
            }
            Match::None => {}
        }
    }
    out.note = Some(format!(
        "`{}` does not map onto the labels {}",
        truncate(text, 80),
        labels.names().join(", ")
    ));
    out
}

/// Beginnings of a clause that declines to answer (normalised: "I'm" is `i m`, "can't" is
/// `can t`). A head is a refusal when the clause ends right after it ("I'm sorry, I can't.")
/// or when, after at most two adverbs ([`REFUSAL_ADVERBS`]), one of [`REFUSAL_VERBS`]
/// follows: "I can't help", "I'm unable to provide a diagnosis", "I cannot reliably
/// determine". "I cannot see any tumour" or "I can't be certain, but ..." are not refusals:
/// `see` alone and `be` are not refusal verbs.
pub const REFUSAL_HEADS: &[&str] = &[
    "can t",
    "cannot",
    "can not",
    "unable to",
    "not able to",
    "i won t",
    "i will not",
    "won t be able to",
    "will not be able to",
    "not allowed to",
    "not permitted to",
    "not qualified to",
    "not in a position to",
    "not possible to",
    "not possible for me to",
    "impossible to",
    "decline to",
    "i m not going to",
    "i am not going to",
];

/// Words that may sit between a refusal head and its verb ("I can't really help").
pub const REFUSAL_ADVERBS: &[&str] = &[
    "really",
    "currently",
    "actually",
    "directly",
    "personally",
    "reliably",
    "accurately",
    "definitively",
    "safely",
    "confidently",
    "responsibly",
    "medically",
    "clinically",
];

/// What a refusal declines to do (first words after the head).
pub const REFUSAL_VERBS: &[&str] = &[
    "help",
    "assist",
    "provide",
    "diagnose",
    "interpret",
    "analyze",
    "analyse",
    "classify",
    "categorize",
    "categorise",
    "determine",
    "tell",
    "comply",
    "fulfill",
    "fulfil",
    "answer",
    "evaluate",
    "assess",
    "examine",
    "review",
    "view",
    "process",
    "access",
    "read",
    "support",
    "offer",
    "give",
    "share",
    "make a diagnosis",
    "make diagnoses",
    "make a medical",
    "make medical",
    "do that",
    "do this",
    "do so",
    "identify medical",
    "identify the medical",
    "identify diseases",
    "identify the disease",
    "identify conditions",
    "identify the condition",
    "see the image",
    "see images",
    "see the images",
    "be of help",
    "be of assistance",
    "be of any help",
];

/// Phrases that are a refusal wherever they stand in a clause.
pub const REFUSAL_PHRASES: &[&str] = &[
    "i must decline",
    "i have to decline",
    "i need to decline",
    "i decline",
    "i m sorry but i can t",
    "beyond my capabilities",
    "beyond my capability",
    "outside my capabilities",
    "outside the scope of what i can",
    "not something i can help",
    "not something i can assist",
];

/// Words that end a clause besides punctuation: a disclaimer is often followed by "but".
const CLAUSE_WORDS: &[&str] = &["but", "however", "although", "though", "nevertheless"];

/// Whether one (normalised) clause declines to answer.
pub fn is_refusal_clause(norm: &str) -> bool {
    let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    let has = |phrase: &str, at: usize| -> Option<usize> {
        let pw: Vec<&str> = phrase.split(' ').collect();
        (at + pw.len() <= words.len() && words[at..at + pw.len()] == pw[..]).then_some(pw.len())
    };
    for i in 0..words.len() {
        if REFUSAL_PHRASES.iter().any(|p| has(p, i).is_some()) {
            return true;
        }
        for head in REFUSAL_HEADS {
            let Some(n) = has(head, i) else { continue };
            let mut j = i + n;
            if j == words.len() {
                return true;
            }
            let mut skipped = 0;
            while skipped < 2 && j < words.len() && REFUSAL_ADVERBS.contains(&words[j]) {
                j += 1;
                skipped += 1;
            }
            if REFUSAL_VERBS.iter().any(|v| has(v, j).is_some()) {
                return true;
            }
        }
    }
    false
}

/// Splits an answer into clauses; returns how many decline, and the other clauses joined.
fn split_refusal(text: &str) -> (usize, String) {
    let mut refusals = 0;
    let mut rest: Vec<String> = Vec::new();
    for sentence in text.split(['.', '!', '?', ';', ':', '\n']) {
        let norm = normalize(sentence);
        let mut clause: Vec<&str> = Vec::new();
        let mut flush = |clause: &mut Vec<&str>| {
            if clause.is_empty() {
                return;
            }
            let c = clause.join(" ");
            if is_refusal_clause(&c) {
                refusals += 1;
            } else {
                rest.push(c);
            }
            clause.clear();
        };
        for w in norm.split(' ').filter(|w| !w.is_empty()) {
            if CLAUSE_WORDS.contains(&w) {
                flush(&mut clause);
            } else {
                clause.push(w);
            }
        }
        flush(&mut clause);
    }
    (refusals, rest.join(". "))
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
    /// The label, whether a synonym (not the label's own name) named it, and the word spans
    /// of its occurrences.
    One(String, bool, Vec<(usize, usize)>),
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
            let spans = kept.iter().map(|(s, e, _, _)| (*s, *e)).collect();
            Match::One(labels.pop().unwrap(), !by_name, spans)
        }
        _ => Match::Ambiguous(labels),
    }
}

/// Every (similarity, label) of a window that is a near-miss spelling of a candidate phrase,
/// best first; windows overlapping `skip` (occurrences already matched exactly) are left out.
fn fuzzy_hits(
    words: &[&str],
    candidates: &[(String, String, bool)],
    threshold: f64,
    skip: &[(usize, usize)],
) -> Vec<(f64, String)> {
    let mut best: Vec<(f64, String)> = Vec::new();
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
            if negated(words, i) || skip.iter().any(|&(s, e)| i < e && s < i + n) {
                continue;
            }
            let window = words[i..i + n].join(" ");
            let s = similarity(&window, phrase);
            if s >= threshold {
                best.push((s, label.clone()));
            }
        }
    }
    best.sort_by(|a, b| b.0.total_cmp(&a.0));
    best
}

/// The one label some window spells nearly right. Near-misses of two different labels are a
/// hedge ("gliomma or meningeoma"), not a match.
fn fuzzy_label(words: &[&str], candidates: &[(String, String, bool)], threshold: f64) -> Match {
    let best = fuzzy_hits(words, candidates, threshold, &[]);
    let Some((_, label)) = best.first() else {
        return Match::None;
    };
    let mut labels = vec![label.clone()];
    for (_, l) in &best {
        if !labels.contains(l) {
            labels.push(l.clone());
        }
    }
    if labels.len() > 1 {
        return Match::Ambiguous(labels);
    }
    Match::One(label.clone(), true, Vec::new())
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
    fn ct() -> LabelSet {
        Modality::Ct.canonical_labels().unwrap()
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
    fn refusals_in_prose_are_refused() {
        for (text, labels) in [
            ("I'm sorry, but I can't help with identifying medical conditions from images.", mri()),
            ("I\u{2019}m sorry, but I can\u{2019}t help with identifying medical conditions from images.", mri()),
            ("I cannot provide a diagnosis.", xray()),
            ("I'm sorry, I can't assist with that request.", xray()),
            ("I can't tell whether this is COVID-19.", xray()),
            ("As an AI language model, I am unable to interpret medical images.", ct()),
            ("I'm not able to provide medical advice or diagnoses. Please consult a radiologist.", mri()),
            ("Sorry, I can't do that.", xray()),
            ("I'm afraid I can't.", xray()),
            ("I must decline to classify this scan.", ct()),
            ("Identifying tumours in MRI scans is beyond my capabilities.", mri()),
            ("I won't be able to help with this glioma question.", mri()),
            ("I cannot reliably determine the type of tumor from this image.", mri()),
            ("Unable to assess: the image is not diagnostic.", ct()),
            // A refusal followed by a hedge is still a refusal.
            ("I cannot provide a diagnosis. It could be glioma or meningioma.", mri()),
        ] {
            let a = p(text, &labels);
            assert!(a.refused, "{text}: {a:?}");
            assert_eq!((a.label, a.stage), (None, None), "{text}");
            assert!(a.note.unwrap().contains("declined"), "{text}");
        }
    }

    #[test]
    fn look_alikes_of_refusals_are_answers() {
        for (text, labels, want) in [
            (
                "I can't be certain, but this looks like COVID-19.",
                xray(),
                "covid",
            ),
            (
                "I cannot exclude a small effusion; otherwise normal.",
                xray(),
                "normal",
            ),
            (
                "I'm not a radiologist, but the findings suggest viral pneumonia.",
                xray(),
                "viral_pneumonia",
            ),
            (
                "I cannot see any tumour: no tumour is present.",
                mri(),
                "no_tumor",
            ),
            // A disclaimer, then one class: the answer.
            (
                "I can't provide a diagnosis, but the image is most consistent with a meningioma.",
                mri(),
                "meningioma",
            ),
            (
                "I'm not able to diagnose. However, the pattern is typical of a pituitary adenoma.",
                mri(),
                "pituitary",
            ),
        ] {
            let a = p(text, &labels);
            assert!(!a.refused, "{text}: {a:?}");
            assert_eq!(a.label.as_deref(), Some(want), "{text}: {a:?}");
        }
        // The rescued answer says it came after a disclaimer.
        let a = p(
            "I can't give a diagnosis, but this looks like a glioma.",
            &mri(),
        );
        assert!(a.note.unwrap().contains("disclaimer"));
        // A JSON answer is never read as a refusal: an out-of-set label is unparseable.
        let a = p(
            r#"{"label":"I cannot help with that","confidence":0}"#,
            &mri(),
        );
        assert!(!a.refused && a.label.is_none() && a.json);
        assert!(is_refusal_clause(&normalize("I can't help")));
        assert!(!is_refusal_clause(&normalize("it cannot be excluded")));
    }

    #[test]
    fn hedges_between_classes_are_unparseable() {
        for (text, labels) in [
            ("This could be a glioma or a meningioma.", mri()),
            ("It could be glioma or meningioma", mri()),
            ("either glioma or meningioma", mri()),
            ("Glioma vs. meningioma", mri()),
            ("glioma/meningioma", mri()),
            (
                "Most likely a glioma, although a meningioma is possible.",
                mri(),
            ),
            // The second class misspelt, or both.
            ("glioma or meningeoma", mri()),
            ("gliomma or meningeoma", mri()),
            ("COVID-19 or viral pneumonia", xray()),
            ("adenocarcinoma versus squamous cell carcinoma", ct()),
            (
                r#"{"label":"glioma or meningioma","confidence":0.5}"#,
                mri(),
            ),
        ] {
            let a = p(text, &labels);
            assert_eq!(a.label, None, "{text}: {a:?}");
            assert!(!a.refused, "{text}");
            assert!(a.note.unwrap().contains("several labels"), "{text}");
        }
        // One class named, with a negated other: still an answer.
        let a = p("A glioma, not a meningioma.", &mri());
        assert_eq!(a.label.as_deref(), Some("glioma"));
        // COVID-19 is a viral pneumonia: one class, not a hedge.
        let a = p("COVID-19 viral pneumonia", &xray());
        assert_eq!(a.label.as_deref(), Some("covid"));
    }

    #[test]
    fn synonym_file_parses_and_covers_every_study_label() {
        let sections: BTreeMap<String, BTreeMap<String, Vec<String>>> =
            toml::from_str(BUILTIN_SYNONYMS).unwrap();
        let table = SynonymTable::builtin();
        for m in Modality::STUDY {
            let section = sections
                .get(m.as_str())
                .unwrap_or_else(|| panic!("synonyms.toml has no [{m}] section"));
            let labels = m.canonical_labels().unwrap();
            for l in labels.iter() {
                let phrases = section
                    .get(l)
                    .unwrap_or_else(|| panic!("[{m}] has no `{l}`"));
                assert!(!phrases.is_empty(), "[{m}] {l}");
                assert!(!table.phrases_for(l).is_empty(), "{l}");
            }
            for l in section.keys() {
                assert!(
                    labels.index_of(l).is_some(),
                    "[{m}] `{l}` is not a label of the task"
                );
            }
        }
        assert_eq!(table, SynonymTable::from_toml(BUILTIN_SYNONYMS).unwrap());
        assert!(SynonymTable::from_toml("[mri]\nglioma = 3").is_err());
    }

    #[test]
    fn phrases_that_name_another_disease_map_to_nothing() {
        for (text, labels) in [
            ("pneumonia", xray()),
            ("consolidation", xray()),
            ("opacities", xray()),
            ("infiltrate", xray()),
            ("lung infection", xray()),
            ("viral infection", xray()),
            ("coronavirus", xray()),
            ("benign", ct()),
            ("carcinoma", ct()),
            ("lung cancer", ct()),
            ("large cell neuroendocrine carcinoma", ct()),
            ("squamous metaplasia", ct()),
            ("no acute findings", ct()),
            ("tumor", mri()),
            ("mass", mri()),
            ("meningeal tumour", mri()),
        ] {
            let a = p(text, &labels);
            assert_eq!(a.label, None, "{text}: {a:?}");
        }
        // A finding next to a diagnosis no longer makes the answer ambiguous.
        let a = p(
            "Bilateral ground-glass opacities consistent with COVID-19.",
            &xray(),
        );
        assert_eq!(a.label.as_deref(), Some("covid"));
        let a = p("Epidermoid carcinoma of the right upper lobe", &ct());
        assert_eq!(
            (a.label.as_deref(), a.stage),
            (Some("squamous_cell_carcinoma"), Some(ParseStage::Synonym))
        );
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
