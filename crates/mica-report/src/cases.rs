//! The web app's audit trail in the results store: each case (one uploaded image and every
//! classifier's suggestion for it) and the physicians' decisions on it, so that who decided
//! what, when, and with which model versions in front of them can be reconstructed later, and
//! so that each model's agreement with the physicians can be followed over time.
//!
//! What is kept is deliberately narrow: the SHA-256 of the de-identified pixels (never the
//! image, never a DICOM header), the label set, and the suggestions. Decisions are append-only:
//! a corrected decision is a new row, and the latest one counts.
//!
//! The tables are created with `CREATE TABLE IF NOT EXISTS`, so a store written by an older
//! mica gains them on first open and keeps its runs.

use std::collections::BTreeMap;

use mica_core::TokenUsage;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::store::Store;
use crate::ReportError;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY,
    created_unix INTEGER NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_format TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    deidentified_json TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    review_threshold REAL NOT NULL,
    needs_review INTEGER NOT NULL,
    review_reasons_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS case_predictions (
    case_id TEXT NOT NULL REFERENCES cases(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    classifier TEXT NOT NULL,
    model_version TEXT NOT NULL,
    family TEXT NOT NULL,
    outcome TEXT NOT NULL,
    suggested_label TEXT,
    confidence REAL,
    latency_ms REAL NOT NULL,
    energy_wh REAL,
    energy_method TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    PRIMARY KEY (case_id, position)
);
CREATE TABLE IF NOT EXISTS case_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT NOT NULL REFERENCES cases(id) ON DELETE CASCADE,
    decided_unix INTEGER NOT NULL,
    reviewer TEXT NOT NULL,
    final_label TEXT NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS case_decisions_case ON case_decisions(case_id);
CREATE INDEX IF NOT EXISTS cases_created ON cases(created_unix);
";

/// One classifier's suggestion for a case, as shown on the page and kept for audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CasePrediction {
    /// Name the classifier was configured under (`cnn:small`, `llm:ollama/llama3.2-vision`).
    pub classifier: String,
    /// `cnn` or `llm`.
    pub family: String,
    /// Exactly which model answered: architecture, epoch and weights hash of a checkpoint, or
    /// the provider and model id of an LLM.
    pub model_version: String,
    /// `answered`, `deferred`, `unparseable`, `refused` or `failed` (see `mica_core::Outcome`).
    pub outcome: String,
    /// The label the model suggests (a suggestion for the physician, not a diagnosis).
    pub suggested_label: Option<String>,
    pub confidence: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<BTreeMap<String, f64>>,
    pub latency_ms: f64,
    /// Energy of this answer at this machine; `None` where it cannot be measured here.
    pub energy_wh: Option<f64>,
    /// How `energy_wh` was obtained (`estimated:cpu-time*tdp`, `measured:rapl`, ...), or why
    /// there is none (`not-measured:remote-api`).
    pub energy_method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub simulated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Whether a Grad-CAM overlay was made for this answer (CNNs).
    #[serde(default)]
    pub has_gradcam: bool,
}

/// A case as classified: what the image was (never the image) and every suggestion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    /// Server-generated, random; the only key a client ever uses.
    pub id: String,
    pub created_unix: i64,
    /// SHA-256 of the de-identified 8-bit pixels as classified (PNG-encoded), so a case can be
    /// matched to an image without storing the image or its header.
    pub image_sha256: String,
    /// `png`, `jpeg` or `dicom`.
    pub image_format: String,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    /// DICOM attributes removed before anything else read the file (keywords only).
    pub deidentified: Vec<String>,
    pub labels: Vec<String>,
    pub review_threshold: f64,
    pub needs_review: bool,
    pub review_reasons: Vec<String>,
    pub predictions: Vec<CasePrediction>,
}

/// A physician's decision on a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub id: i64,
    pub case_id: String,
    pub decided_unix: i64,
    pub reviewer: String,
    pub final_label: String,
    pub note: Option<String>,
}

/// What one model suggested on a decided case, and whether the physician agreed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    pub classifier: String,
    pub model_version: String,
    pub suggested_label: Option<String>,
    pub confidence: Option<f64>,
    pub agrees: bool,
}

/// Agreement of one model version with the physicians' latest decisions on one UTC day (of
/// the decision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementDay {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub decided: u64,
    pub agreed: u64,
    /// Cases where the model gave no label at all (failed, unparseable or refused).
    pub no_answer: u64,
    pub agreement: f64,
}

/// Agreement of one model version with the physicians, overall and per day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAgreement {
    pub classifier: String,
    pub model_version: String,
    pub decided: u64,
    pub agreed: u64,
    pub no_answer: u64,
    /// `agreed / decided`: a model that gave no label counts as disagreeing.
    pub agreement: f64,
    pub days: Vec<AgreementDay>,
}

/// The monitoring summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Monitoring {
    pub cases: u64,
    pub decided: u64,
    /// Cases flagged for physician review that have no decision yet.
    pub awaiting_review: u64,
    pub models: Vec<ModelAgreement>,
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

impl Store {
    /// Records a classified case with all its suggestions (one transaction).
    pub fn insert_case(&mut self, c: &CaseRecord) -> Result<(), ReportError> {
        let path = self.path.clone();
        let e = move |e: rusqlite::Error| ReportError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        let tx = self.conn.transaction().map_err(&e)?;
        tx.execute(
            "INSERT INTO cases (id, created_unix, image_sha256, image_format, width, height, frames, deidentified_json, labels_json, review_threshold, needs_review, review_reasons_json) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
            params![
                c.id,
                c.created_unix,
                c.image_sha256,
                c.image_format,
                c.width,
                c.height,
                c.frames,
                json(&c.deidentified),
                json(&c.labels),
                c.review_threshold,
                c.needs_review,
                json(&c.review_reasons)
            ],
        )
        .map_err(&e)?;
        for (i, p) in c.predictions.iter().enumerate() {
            tx.execute(
                "INSERT INTO case_predictions (case_id, position, classifier, model_version, family, outcome, suggested_label, confidence, latency_ms, energy_wh, energy_method, detail_json) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
                params![
                    c.id,
                    i as i64,
                    p.classifier,
                    p.model_version,
                    p.family,
                    p.outcome,
                    p.suggested_label,
                    p.confidence,
                    p.latency_ms,
                    p.energy_wh,
                    p.energy_method,
                    json(p)
                ],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    /// One case with its suggestions, or `None` if there is no such case.
    pub fn case(&self, id: &str) -> Result<Option<CaseRecord>, ReportError> {
        type Row = (i64, String, String, u32, u32, u32, String, String, f64, bool, String);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT created_unix, image_sha256, image_format, width, height, frames, deidentified_json, labels_json, review_threshold, needs_review, review_reasons_json FROM cases WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                        r.get(10)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((created, sha, format, w, h, frames, deid, labels, thr, review, reasons)) = row else {
            return Ok(None);
        };
        let parse = |s: &str, what: &str| -> Result<Vec<String>, ReportError> {
            serde_json::from_str(s).map_err(|e| self.err(format!("case {id}: bad {what}: {e}")))
        };
        let mut stmt = self
            .conn
            .prepare("SELECT detail_json FROM case_predictions WHERE case_id = ?1 ORDER BY position")
            .map_err(|e| self.err(e))?;
        let details = stmt
            .query_map(params![id], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let predictions = details
            .iter()
            .map(|d| serde_json::from_str(d).map_err(|e| self.err(format!("case {id}: bad prediction: {e}"))))
            .collect::<Result<Vec<CasePrediction>, _>>()?;
        Ok(Some(CaseRecord {
            id: id.to_string(),
            created_unix: created,
            image_sha256: sha,
            image_format: format,
            width: w,
            height: h,
            frames,
            deidentified: parse(&deid, "deidentified")?,
            labels: parse(&labels, "labels")?,
            review_threshold: thr,
            needs_review: review,
            review_reasons: parse(&reasons, "review reasons")?,
            predictions,
        }))
    }

    /// Appends a decision; returns it with its id. The case must exist.
    pub fn add_decision(
        &mut self,
        case_id: &str,
        decided_unix: i64,
        reviewer: &str,
        final_label: &str,
        note: Option<&str>,
    ) -> Result<Decision, ReportError> {
        self.conn
            .execute(
                "INSERT INTO case_decisions (case_id, decided_unix, reviewer, final_label, note) VALUES (?1,?2,?3,?4,?5)",
                params![case_id, decided_unix, reviewer, final_label, note],
            )
            .map_err(|e| self.err(e))?;
        Ok(Decision {
            id: self.conn.last_insert_rowid(),
            case_id: case_id.to_string(),
            decided_unix,
            reviewer: reviewer.to_string(),
            final_label: final_label.to_string(),
            note: note.map(String::from),
        })
    }

    /// Every decision on a case, oldest first (the last one is the one that counts).
    pub fn decisions(&self, case_id: &str) -> Result<Vec<Decision>, ReportError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, case_id, decided_unix, reviewer, final_label, note FROM case_decisions WHERE case_id = ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![case_id], |r| {
                Ok(Decision {
                    id: r.get(0)?,
                    case_id: r.get(1)?,
                    decided_unix: r.get(2)?,
                    reviewer: r.get(3)?,
                    final_label: r.get(4)?,
                    note: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// The latest `limit` decisions, newest first, each with the suggestions the physician
    /// had in front of them.
    pub fn recent_decisions(&self, limit: usize) -> Result<Vec<(Decision, Vec<Suggestion>)>, ReportError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, case_id, decided_unix, reviewer, final_label, note FROM case_decisions ORDER BY id DESC LIMIT ?1")
            .map_err(|e| self.err(e))?;
        let decisions = stmt
            .query_map(params![limit as i64], |r| {
                Ok(Decision {
                    id: r.get(0)?,
                    case_id: r.get(1)?,
                    decided_unix: r.get(2)?,
                    reviewer: r.get(3)?,
                    final_label: r.get(4)?,
                    note: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut stmt = self
            .conn
            .prepare("SELECT classifier, model_version, suggested_label, confidence FROM case_predictions WHERE case_id = ?1 ORDER BY position")
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(decisions.len());
        for d in decisions {
            let s = stmt
                .query_map(params![d.case_id], |r| {
                    let label: Option<String> = r.get(2)?;
                    Ok(Suggestion {
                        classifier: r.get(0)?,
                        model_version: r.get(1)?,
                        agrees: label.as_deref() == Some(d.final_label.as_str()),
                        suggested_label: label,
                        confidence: r.get(3)?,
                    })
                })
                .map_err(|e| self.err(e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.err(e))?;
            out.push((d, s));
        }
        Ok(out)
    }

    /// Each model version's agreement with the latest decision of every decided case, overall
    /// and per UTC day of the decision.
    pub fn monitoring(&self) -> Result<Monitoring, ReportError> {
        let count = |sql: &str| -> Result<u64, ReportError> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(|e| self.err(e))
        };
        let cases = count("SELECT COUNT(*) FROM cases")?;
        let decided = count("SELECT COUNT(DISTINCT case_id) FROM case_decisions")?;
        let awaiting_review = count(
            "SELECT COUNT(*) FROM cases c WHERE c.needs_review = 1 AND NOT EXISTS (SELECT 1 FROM case_decisions d WHERE d.case_id = c.id)",
        )?;
        let mut stmt = self
            .conn
            .prepare(
                "WITH latest AS (
                     SELECT d.case_id, d.final_label, d.decided_unix FROM case_decisions d
                     WHERE d.id = (SELECT MAX(x.id) FROM case_decisions x WHERE x.case_id = d.case_id)
                 )
                 SELECT p.classifier, p.model_version, date(l.decided_unix, 'unixepoch') AS day,
                        COUNT(*),
                        SUM(CASE WHEN p.suggested_label = l.final_label THEN 1 ELSE 0 END),
                        SUM(CASE WHEN p.suggested_label IS NULL THEN 1 ELSE 0 END)
                 FROM case_predictions p JOIN latest l ON l.case_id = p.case_id
                 GROUP BY p.classifier, p.model_version, day
                 ORDER BY p.classifier, p.model_version, day",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)? as u64,
                    r.get::<_, i64>(4)? as u64,
                    r.get::<_, i64>(5)? as u64,
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut models: Vec<ModelAgreement> = Vec::new();
        for (classifier, version, day, n, agreed, no_answer) in rows {
            let d = AgreementDay {
                day,
                decided: n,
                agreed,
                no_answer,
                agreement: rate(agreed, n),
            };
            match models.last_mut() {
                Some(m) if m.classifier == classifier && m.model_version == version => {
                    m.decided += n;
                    m.agreed += agreed;
                    m.no_answer += no_answer;
                    m.agreement = rate(m.agreed, m.decided);
                    m.days.push(d);
                }
                _ => models.push(ModelAgreement {
                    classifier,
                    model_version: version,
                    decided: n,
                    agreed,
                    no_answer,
                    agreement: rate(agreed, n),
                    days: vec![d],
                }),
            }
        }
        Ok(Monitoring {
            cases,
            decided,
            awaiting_review,
            models,
        })
    }
}

fn rate(k: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        k as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(classifier: &str, version: &str, label: Option<&str>) -> CasePrediction {
        CasePrediction {
            classifier: classifier.into(),
            family: "cnn".into(),
            model_version: version.into(),
            outcome: if label.is_some() { "answered" } else { "failed" }.into(),
            suggested_label: label.map(String::from),
            confidence: label.map(|_| 0.8),
            probabilities: None,
            latency_ms: 3.0,
            energy_wh: Some(1e-6),
            energy_method: "estimated:cpu-time*tdp".into(),
            rationale: None,
            error: None,
            simulated: false,
            tokens: None,
            cost_usd: None,
            has_gradcam: false,
        }
    }

    fn case(id: &str, preds: Vec<CasePrediction>) -> CaseRecord {
        CaseRecord {
            id: id.into(),
            created_unix: 1_700_000_000,
            image_sha256: "ab".repeat(32),
            image_format: "png".into(),
            width: 16,
            height: 16,
            frames: 1,
            deidentified: vec![],
            labels: vec!["a".into(), "b".into()],
            review_threshold: 0.7,
            needs_review: true,
            review_reasons: vec!["disagree".into()],
            predictions: preds,
        }
    }

    #[test]
    fn cases_round_trip_and_decisions_are_an_append_only_trail() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = Store::open(dir.path().join("s.sqlite")).unwrap();
        let c = case("c1", vec![pred("cnn:small", "v1", Some("a")), pred("llm:x", "x", None)]);
        st.insert_case(&c).unwrap();
        assert_eq!(st.case("c1").unwrap().unwrap(), c);
        assert!(st.case("nope").unwrap().is_none());
        assert!(st.insert_case(&c).is_err(), "case ids are unique");
        st.add_decision("c1", 1_700_000_100, "Dr A", "b", Some("first look")).unwrap();
        st.add_decision("c1", 1_700_086_500, "Dr B", "a", None).unwrap();
        let d = st.decisions("c1").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].reviewer.as_str(), d[0].final_label.as_str()), ("Dr A", "b"));
        assert_eq!(d[1].note, None);
        // A decision on a case that does not exist is refused by the foreign key.
        assert!(st.add_decision("ghost", 0, "Dr A", "a", None).is_err());
    }

    #[test]
    fn monitoring_counts_the_latest_decision_per_case_by_day() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let mut st = Store::open(&path).unwrap();
        // Day 1 (2023-11-14): c1 both right; c2 cnn wrong, llm no answer. Day 2: c3 cnn right.
        st.insert_case(&case("c1", vec![pred("cnn:small", "v1", Some("a")), pred("llm:x", "x", Some("a"))])).unwrap();
        st.insert_case(&case("c2", vec![pred("cnn:small", "v1", Some("a")), pred("llm:x", "x", None)])).unwrap();
        st.insert_case(&case("c3", vec![pred("cnn:small", "v1", Some("b")), pred("llm:x", "x", Some("a"))])).unwrap();
        st.insert_case(&case("c4", vec![pred("cnn:small", "v1", Some("b"))])).unwrap();
        let day1 = 1_699_963_200; // 2023-11-14T12:00:00Z
        st.add_decision("c1", day1, "Dr A", "b", None).unwrap();
        st.add_decision("c1", day1 + 60, "Dr A", "a", Some("corrected")).unwrap();
        st.add_decision("c2", day1, "Dr A", "b", None).unwrap();
        st.add_decision("c3", day1 + 86_400, "Dr B", "b", None).unwrap();
        drop(st);
        // Reopening keeps everything (the schema is created only if missing).
        let st = Store::open(&path).unwrap();
        let m = st.monitoring().unwrap();
        assert_eq!((m.cases, m.decided, m.awaiting_review), (4, 3, 1));
        let cnn = m.models.iter().find(|x| x.classifier == "cnn:small").unwrap();
        assert_eq!((cnn.decided, cnn.agreed, cnn.no_answer), (3, 2, 0));
        assert_eq!(cnn.days.len(), 2);
        assert_eq!(cnn.days[0].day, "2023-11-14");
        assert_eq!((cnn.days[0].decided, cnn.days[0].agreed), (2, 1));
        assert_eq!((cnn.days[1].day.as_str(), cnn.days[1].agreed), ("2023-11-15", 1));
        let llm = m.models.iter().find(|x| x.classifier == "llm:x").unwrap();
        assert_eq!((llm.decided, llm.agreed, llm.no_answer), (3, 1, 1));
        assert!((llm.agreement - 1.0 / 3.0).abs() < 1e-12);
        let recent = st.recent_decisions(2).unwrap();
        assert_eq!(recent.len(), 2);
        assert_eq!((recent[0].0.case_id.as_str(), recent[1].0.case_id.as_str()), ("c3", "c2"));
        let s = &recent[0].1;
        assert_eq!(s.len(), 2);
        assert!(s[0].agrees && !s[1].agrees, "{s:?}");
    }
}
