//! Checking and exporting the audit trail (`mica audit verify|export`). Both read the store
//! without changing it: verification must not repair what it is meant to find, so it opens
//! the file read-only and does not migrate or recreate triggers.

use std::path::Path;

use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{meta, row_sha256, CHAINED, GENESIS_SHA256, TRIGGERS};
use crate::store::Store;
use crate::ReportError;

/// Where the chain first fails to hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainBreak {
    /// `cases`, `case_predictions` or `case_decisions`.
    pub table: String,
    /// The row in words: `id=7`, `case_id=... position=1`.
    pub row: String,
    pub chain_seq: Option<i64>,
    /// What does not hold, in words.
    pub problem: String,
    /// The value the chain requires at this row (a hash, or a `chain_seq`).
    pub expected: String,
    /// The value the row holds.
    pub found: String,
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainReport {
    /// The chain holds and every append-only trigger is in place.
    pub ok: bool,
    /// Links walked (all rows of the three tables).
    pub rows: u64,
    pub cases: u64,
    pub predictions: u64,
    pub decisions: u64,
    /// `row_sha256` of the newest link (genesis on an empty chain): keep it elsewhere to be
    /// able to show later that no newest rows were removed.
    pub head_sha256: String,
    pub head_seq: i64,
    /// When this store's chain started (its creation, or the migration of an older store).
    pub chain_started_unix: Option<i64>,
    /// Rows chained at that migration: not protected when they were written.
    pub chained_at_migration: u64,
    /// Append-only triggers that are not in the database.
    pub missing_triggers: Vec<String>,
    /// `--expect-head` was given and no row carries that hash (rows were removed from the end,
    /// or the store is not the one the hash was taken from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_head_missing: Option<String>,
    /// The first link that does not hold, in chain order.
    pub broken: Option<ChainBreak>,
}

/// One prediction as the physician saw it when deciding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShownPrediction {
    pub position: i64,
    pub classifier: String,
    /// What was configured (requested).
    pub model_version: String,
    /// What the provider reported answering, where it reports it.
    pub resolved_model: Option<String>,
    pub system_fingerprint: Option<String>,
    pub model_digest: Option<String>,
    pub outcome: String,
    pub suggested_label: Option<String>,
    pub confidence: Option<f64>,
    pub row_sha256: Option<String>,
}

/// One decision with everything needed to audit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub decision_id: i64,
    pub case_id: String,
    pub decided_unix: i64,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub decided_utc: String,
    /// The name shown with the decision (free text where there was no identity).
    pub reviewer: String,
    pub user_id: Option<String>,
    pub auth_method: Option<String>,
    pub final_label: String,
    pub note: Option<String>,
    pub case_created_unix: i64,
    pub image_sha256: String,
    pub labels: Vec<String>,
    /// The suggestions recorded before the decision (those on the page when it was made).
    pub predictions_shown: Vec<ShownPrediction>,
    pub chain_seq: Option<i64>,
    pub prev_sha256: Option<String>,
    pub row_sha256: Option<String>,
    /// The row existed before the store had a hash chain and was chained at migration.
    pub chained_at_migration: bool,
}

/// An [`AuditEntry`] as one CSV line: the nested lists as JSON in their cells.
#[derive(Debug, Serialize, Deserialize)]
struct CsvRow {
    decision_id: i64,
    case_id: String,
    decided_unix: i64,
    decided_utc: String,
    reviewer: String,
    user_id: Option<String>,
    auth_method: Option<String>,
    final_label: String,
    note: Option<String>,
    case_created_unix: i64,
    image_sha256: String,
    labels_json: String,
    predictions_shown_json: String,
    chain_seq: Option<i64>,
    prev_sha256: Option<String>,
    row_sha256: Option<String>,
    chained_at_migration: bool,
}

const CSV_HEADER: [&str; 17] = [
    "decision_id",
    "case_id",
    "decided_unix",
    "decided_utc",
    "reviewer",
    "user_id",
    "auth_method",
    "final_label",
    "note",
    "case_created_unix",
    "image_sha256",
    "labels_json",
    "predictions_shown_json",
    "chain_seq",
    "prev_sha256",
    "row_sha256",
    "chained_at_migration",
];

/// Writes the entries as CSV (one line per decision, header first).
pub fn write_csv<W: std::io::Write>(entries: &[AuditEntry], out: W) -> Result<(), ReportError> {
    let mut w = csv::Writer::from_writer(out);
    if entries.is_empty() {
        // serde writes the header with the first row; an empty trail still says what it is.
        w.write_record(CSV_HEADER)
            .map_err(|e| ReportError::Invalid(format!("audit CSV: {e}")))?;
    }
    for e in entries {
        w.serialize(CsvRow {
            decision_id: e.decision_id,
            case_id: e.case_id.clone(),
            decided_unix: e.decided_unix,
            decided_utc: e.decided_utc.clone(),
            reviewer: e.reviewer.clone(),
            user_id: e.user_id.clone(),
            auth_method: e.auth_method.clone(),
            final_label: e.final_label.clone(),
            note: e.note.clone(),
            case_created_unix: e.case_created_unix,
            image_sha256: e.image_sha256.clone(),
            labels_json: super::json(&e.labels),
            predictions_shown_json: super::json(&e.predictions_shown),
            chain_seq: e.chain_seq,
            prev_sha256: e.prev_sha256.clone(),
            row_sha256: e.row_sha256.clone(),
            chained_at_migration: e.chained_at_migration,
        })
        .map_err(|e| ReportError::Invalid(format!("audit CSV: {e}")))?;
    }
    w.flush().map_err(|e| ReportError::Invalid(format!("audit CSV: {e}")))
}

/// Reads what [`write_csv`] wrote. An empty optional cell reads as `None`.
pub fn read_csv<R: std::io::Read>(input: R) -> Result<Vec<AuditEntry>, ReportError> {
    let bad = |e: String| ReportError::Invalid(format!("audit CSV: {e}"));
    let mut out = Vec::new();
    for row in csv::Reader::from_reader(input).deserialize::<CsvRow>() {
        let r = row.map_err(|e| bad(e.to_string()))?;
        out.push(AuditEntry {
            decision_id: r.decision_id,
            case_id: r.case_id,
            decided_unix: r.decided_unix,
            decided_utc: r.decided_utc,
            reviewer: r.reviewer,
            user_id: r.user_id,
            auth_method: r.auth_method,
            final_label: r.final_label,
            note: r.note,
            case_created_unix: r.case_created_unix,
            image_sha256: r.image_sha256,
            labels: serde_json::from_str(&r.labels_json).map_err(|e| bad(e.to_string()))?,
            predictions_shown: serde_json::from_str(&r.predictions_shown_json).map_err(|e| bad(e.to_string()))?,
            chain_seq: r.chain_seq,
            prev_sha256: r.prev_sha256,
            row_sha256: r.row_sha256,
            chained_at_migration: r.chained_at_migration,
        });
    }
    Ok(out)
}

/// One link as stored.
struct Link {
    table: &'static str,
    fields: &'static [&'static str],
    row: String,
    seq: Option<i64>,
    prev: Option<String>,
    hash: Option<String>,
    values: Vec<Value>,
}

fn describe(table: &str, values: &[Value]) -> String {
    let s = |v: &Value| match v {
        Value::Text(t) => t.clone(),
        Value::Integer(i) => i.to_string(),
        other => format!("{other:?}"),
    };
    match table {
        "cases" => format!("id={}", s(&values[0])),
        "case_predictions" => format!("case_id={} position={}", s(&values[0]), s(&values[1])),
        _ => format!("id={}", s(&values[0])),
    }
}

impl Store {
    /// Opens an existing store read-only, without creating or migrating anything: for
    /// checking and exporting the audit trail exactly as it is.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Store, ReportError> {
        let path = path.as_ref().to_path_buf();
        let err = |m: String| ReportError::Store {
            path: path.clone(),
            message: m,
        };
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| err(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| err(e.to_string()))?;
        let has_chain: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('case_decisions') WHERE name = 'row_sha256'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| err(format!("not a mica results store ({e})")))?;
        if has_chain == 0 {
            return Err(err(
                "no audit chain in this store: it has no case tables, or was written by an older mica and not opened since (`mica serve` or `mica runs list` on it migrates it)".into(),
            ));
        }
        Ok(Store { path, conn })
    }

    /// Walks the hash chain over cases, suggestions and decisions in `chain_seq` order and
    /// checks that every link's `prev_sha256` is the previous link's hash, that its
    /// `row_sha256` is the hash of its content, that `chain_seq` runs 1, 2, 3, ... without gaps,
    /// and that the append-only triggers are in place. With `expect_head`, also that a row with
    /// that hash still exists.
    pub fn verify_chain(&self, expect_head: Option<&str>) -> Result<ChainReport, ReportError> {
        let mut links = Vec::new();
        let mut counts = [0u64; 3];
        for (i, (table, fields)) in CHAINED.iter().enumerate() {
            let mut stmt = self
                .conn
                .prepare(&format!(
                    "SELECT chain_seq, prev_sha256, row_sha256, {} FROM {table}",
                    fields.join(",")
                ))
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([], |r| {
                    let values = (0..fields.len())
                        .map(|k| r.get::<_, Value>(k + 3))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Link {
                        table,
                        fields,
                        row: describe(table, &values),
                        seq: r.get(0)?,
                        prev: r.get(1)?,
                        hash: r.get(2)?,
                        values,
                    })
                })
                .map_err(|e| self.err(e))?;
            for l in rows {
                links.push(l.map_err(|e| self.err(e))?);
                counts[i] += 1;
            }
        }
        // Unchained rows (no chain_seq) sort first: they are the first problem to name.
        links.sort_by_key(|l| l.seq.unwrap_or(i64::MIN));
        let mut broken = None;
        let mut prev = GENESIS_SHA256.to_string();
        let mut head_seq = 0;
        for (i, l) in links.iter().enumerate() {
            let brk = |problem: &str, expected: String, found: String| ChainBreak {
                table: l.table.to_string(),
                row: l.row.clone(),
                chain_seq: l.seq,
                problem: problem.to_string(),
                expected,
                found,
            };
            let want_seq = i as i64 + 1;
            let Some(seq) = l.seq else {
                broken = Some(brk(
                    "row is not in the chain (written without a hash after the chain started, or its hash was removed)",
                    want_seq.to_string(),
                    "NULL".into(),
                ));
                break;
            };
            if seq != want_seq {
                broken = Some(brk(
                    if seq > want_seq {
                        "chain_seq skips: rows before this one were removed"
                    } else {
                        "chain_seq repeats: a row was inserted with a position already taken"
                    },
                    want_seq.to_string(),
                    seq.to_string(),
                ));
                break;
            }
            let found_prev = l.prev.clone().unwrap_or_else(|| "NULL".into());
            if found_prev != prev {
                broken = Some(brk(
                    "prev_sha256 is not the previous row's row_sha256 (a row before it was removed, inserted or rehashed)",
                    prev.clone(),
                    found_prev,
                ));
                break;
            }
            let want = row_sha256(&prev, l.table, seq, l.fields, &l.values);
            let found = l.hash.clone().unwrap_or_else(|| "NULL".into());
            if found != want {
                broken = Some(brk(
                    "row_sha256 is not the hash of the row's content (the row was changed after it was written)",
                    want,
                    found,
                ));
                break;
            }
            prev = want;
            head_seq = seq;
        }
        let present: Vec<String> = self
            .conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        let missing_triggers: Vec<String> = TRIGGERS
            .iter()
            .map(|(n, _)| n.to_string())
            .filter(|n| !present.contains(n))
            .collect();
        let expected_head_missing = match expect_head {
            Some(h) if !links.iter().any(|l| l.hash.as_deref() == Some(h)) => Some(h.to_string()),
            _ => None,
        };
        let m = |k: &str| -> Result<Option<i64>, ReportError> {
            Ok(meta(&self.conn, k)
                .map_err(|e| self.err(e))?
                .and_then(|v| v.parse().ok()))
        };
        Ok(ChainReport {
            ok: broken.is_none() && missing_triggers.is_empty() && expected_head_missing.is_none(),
            rows: links.len() as u64,
            cases: counts[0],
            predictions: counts[1],
            decisions: counts[2],
            head_sha256: if broken.is_none() { prev } else { String::new() },
            head_seq,
            chain_started_unix: m("chain_started_unix")?,
            chained_at_migration: m("chained_at_migration")?.unwrap_or(0) as u64,
            missing_triggers,
            expected_head_missing,
            broken,
        })
    }

    /// Every decision, oldest first, with its case, the suggestions recorded before it, the
    /// identity behind it and its hashes.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>, ReportError> {
        let migrated = meta(&self.conn, "chained_at_migration")
            .map_err(|e| self.err(e))?
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        type Row = (
            i64,
            String,
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, case_id, decided_unix, strftime('%Y-%m-%dT%H:%M:%SZ', decided_unix, 'unixepoch'), reviewer, user_id, auth_method, final_label, note, chain_seq, prev_sha256, row_sha256
                 FROM case_decisions ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let decisions: Vec<Row> = stmt
            .query_map([], |r| {
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
                    r.get(11)?,
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        let mut case_stmt = self
            .conn
            .prepare("SELECT created_unix, image_sha256, labels_json FROM cases WHERE id = ?1")
            .map_err(|e| self.err(e))?;
        let mut pred_stmt = self
            .conn
            .prepare(
                "SELECT position, classifier, model_version, resolved_model, system_fingerprint, model_digest, outcome, suggested_label, confidence, row_sha256, chain_seq
                 FROM case_predictions WHERE case_id = ?1 ORDER BY position",
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(decisions.len());
        for (id, case_id, unix, utc, reviewer, user_id, auth_method, label, note, seq, prev, hash) in decisions {
            let case: Option<(i64, String, String)> = case_stmt
                .query_row(params![case_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
                .map_err(|e| self.err(e))?;
            let (created, sha, labels) = case.unwrap_or((0, String::new(), "[]".into()));
            let preds = pred_stmt
                .query_map(params![case_id], |r| {
                    Ok((
                        ShownPrediction {
                            position: r.get(0)?,
                            classifier: r.get(1)?,
                            model_version: r.get(2)?,
                            resolved_model: r.get(3)?,
                            system_fingerprint: r.get(4)?,
                            model_digest: r.get(5)?,
                            outcome: r.get(6)?,
                            suggested_label: r.get(7)?,
                            confidence: r.get(8)?,
                            row_sha256: r.get(9)?,
                        },
                        r.get::<_, Option<i64>>(10)?,
                    ))
                })
                .map_err(|e| self.err(e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.err(e))?;
            out.push(AuditEntry {
                decision_id: id,
                case_id,
                decided_unix: unix,
                decided_utc: utc,
                reviewer,
                user_id,
                auth_method,
                final_label: label,
                note,
                case_created_unix: created,
                image_sha256: sha,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                predictions_shown: preds
                    .into_iter()
                    .filter(|(_, ps)| match (ps, seq) {
                        (Some(p), Some(d)) => *p < d,
                        _ => true,
                    })
                    .map(|(p, _)| p)
                    .collect(),
                chain_seq: seq,
                prev_sha256: prev,
                row_sha256: hash,
                chained_at_migration: seq.is_some_and(|s| s <= migrated),
            });
        }
        Ok(out)
    }
}
