//! The web app's audit trail in the results store: each case (one uploaded image and every
//! classifier's suggestion for it) and the physicians' decisions on it, so that who decided
//! what, when, and with which model versions in front of them can be reconstructed later, and
//! so that each model's agreement with the physicians can be followed over time.
//!
//! What is kept is deliberately narrow: the SHA-256 of the de-identified pixels (never the
//! image, never a DICOM header), the label set, and the suggestions. A corrected decision is a
//! new row, and the latest one counts.
//!
//! # Append-only, enforced by the database
//!
//! Triggers make SQLite itself refuse `UPDATE` and `DELETE` on `case_decisions`,
//! `case_predictions` and `audit_meta`, `DELETE` on `cases`, and `UPDATE` of every column of
//! `cases` that the hash chain covers. Triggers rather than only the application's discipline
//! because anything else that opens the file (a script, the `sqlite3` shell, a later mica)
//! goes through them too. `DELETE` on `cases` is refused because stores written by an older
//! mica declare `case_decisions.case_id ... ON DELETE CASCADE`: deleting a case there would
//! silently delete its decisions, and SQLite cannot drop a foreign-key clause in place (only a
//! full table rebuild could), so the trigger is what stops the cascade. New stores declare the
//! foreign keys without `CASCADE`. Whoever can write the file can still drop the triggers; the
//! hash chain is what makes that visible afterwards.
//!
//! # The hash chain
//!
//! Every row of `cases`, `case_predictions` and `case_decisions` is one link of a single
//! chain, in insertion order (`chain_seq` = 1, 2, 3, ... across the three tables), so a
//! decision's hash also covers every case and suggestion recorded before it. Each row carries
//! `prev_sha256` (the previous link's `row_sha256`; the genesis value is 64 zeros) and
//! `row_sha256` = lowercase hex SHA-256 of this byte string (`\n` is one 0x0A byte):
//!
//! ```text
//! mica-audit-chain-v1\n
//! prev=<prev_sha256>\n
//! table=<cases|case_predictions|case_decisions>\n
//! chain_seq=i:<chain_seq>\n
//! <column>=<value>\n     one line per column in the order of CASE_FIELDS, PREDICTION_FIELDS
//!                        or DECISION_FIELDS below
//! ```
//!
//! where a value is written from what SQLite stores: `null`; `i:<decimal>` for an INTEGER;
//! `r:<16 lowercase hex digits of the IEEE-754 bits, big-endian>` for a REAL (exact, no
//! decimal formatting to disagree on); `t:<UTF-8 byte length>:<bytes>` for TEXT and
//! `b:<length>:<bytes>` for a BLOB. Text is length-prefixed, so no content can forge a field
//! boundary. Anyone can recompute a hash from the file with any SQLite client.
//!
//! A case's `needs_review` and `review_reasons_json` are outside the hash (and may be updated)
//! because they are derived from the suggestions, which may arrive after the case is created.
//!
//! The chain shows an edited, inserted or removed row anywhere but at the end; removing the
//! newest rows leaves a shorter valid chain, so `mica audit verify` prints the head hash for
//! keeping elsewhere (and checks a kept one with `--expect-head`).
//!
//! # Stores written before the chain
//!
//! The tables are created with `CREATE TABLE IF NOT EXISTS` and missing columns are added
//! with `ALTER TABLE ... ADD COLUMN`, so a store written by an older mica keeps its runs and
//! cases. The first open by this version chains the rows already there (cases in insertion
//! order each followed by its suggestions, then decisions by id) and records in `audit_meta`
//! when (`chain_started_unix`) and how many (`chained_at_migration`): those rows were not
//! protected when written, only from the migration on, and the export says so per decision.

use std::collections::BTreeMap;

use mica_core::TokenUsage;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::Store;
use crate::ReportError;

pub mod audit;

pub use audit::{AuditEntry, ChainBreak, ChainReport, ShownPrediction};

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
    review_reasons_json TEXT NOT NULL,
    chain_seq INTEGER,
    prev_sha256 TEXT,
    row_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS case_predictions (
    case_id TEXT NOT NULL REFERENCES cases(id),
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
    resolved_model TEXT,
    system_fingerprint TEXT,
    model_digest TEXT,
    chain_seq INTEGER,
    prev_sha256 TEXT,
    row_sha256 TEXT,
    PRIMARY KEY (case_id, position)
);
CREATE TABLE IF NOT EXISTS case_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT NOT NULL REFERENCES cases(id),
    decided_unix INTEGER NOT NULL,
    reviewer TEXT NOT NULL,
    final_label TEXT NOT NULL,
    note TEXT,
    user_id TEXT,
    auth_method TEXT,
    chain_seq INTEGER,
    prev_sha256 TEXT,
    row_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS audit_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS case_decisions_case ON case_decisions(case_id);
CREATE INDEX IF NOT EXISTS cases_created ON cases(created_unix);
";

/// Columns added since the first case store, per table: added with `ALTER TABLE` where an
/// older store lacks them.
const ADDED_COLUMNS: &[(&str, &[(&str, &str)])] = &[
    ("cases", &[("chain_seq", "INTEGER"), ("prev_sha256", "TEXT"), ("row_sha256", "TEXT")]),
    (
        "case_predictions",
        &[
            ("resolved_model", "TEXT"),
            ("system_fingerprint", "TEXT"),
            ("model_digest", "TEXT"),
            ("chain_seq", "INTEGER"),
            ("prev_sha256", "TEXT"),
            ("row_sha256", "TEXT"),
        ],
    ),
    (
        "case_decisions",
        &[
            ("user_id", "TEXT"),
            ("auth_method", "TEXT"),
            ("chain_seq", "INTEGER"),
            ("prev_sha256", "TEXT"),
            ("row_sha256", "TEXT"),
        ],
    ),
];

/// Created after the columns exist (an old store gains `chain_seq` first).
const CHAIN_INDEXES: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS cases_chain ON cases(chain_seq);
CREATE UNIQUE INDEX IF NOT EXISTS case_predictions_chain ON case_predictions(chain_seq);
CREATE UNIQUE INDEX IF NOT EXISTS case_decisions_chain ON case_decisions(chain_seq);
";

/// The append-only triggers (see the module documentation for why each exists).
pub const TRIGGERS: &[(&str, &str)] = &[
    (
        "case_decisions_append_only_update",
        "BEFORE UPDATE ON case_decisions BEGIN SELECT RAISE(ABORT, 'append-only: a decision cannot be changed; record a new decision instead'); END",
    ),
    (
        "case_decisions_append_only_delete",
        "BEFORE DELETE ON case_decisions BEGIN SELECT RAISE(ABORT, 'append-only: a decision cannot be deleted'); END",
    ),
    (
        "case_predictions_append_only_update",
        "BEFORE UPDATE ON case_predictions BEGIN SELECT RAISE(ABORT, 'append-only: a recorded suggestion cannot be changed'); END",
    ),
    (
        "case_predictions_append_only_delete",
        "BEFORE DELETE ON case_predictions BEGIN SELECT RAISE(ABORT, 'append-only: a recorded suggestion cannot be deleted'); END",
    ),
    (
        "cases_append_only_delete",
        "BEFORE DELETE ON cases BEGIN SELECT RAISE(ABORT, 'append-only: a case cannot be deleted (it would take its decisions with it)'); END",
    ),
    (
        "cases_append_only_update",
        "BEFORE UPDATE OF id, created_unix, image_sha256, image_format, width, height, frames, deidentified_json, labels_json, review_threshold, chain_seq, prev_sha256, row_sha256 ON cases BEGIN SELECT RAISE(ABORT, 'append-only: what identifies a case cannot be changed'); END",
    ),
    (
        "audit_meta_append_only_update",
        "BEFORE UPDATE ON audit_meta BEGIN SELECT RAISE(ABORT, 'append-only: audit metadata cannot be changed'); END",
    ),
    (
        "audit_meta_append_only_delete",
        "BEFORE DELETE ON audit_meta BEGIN SELECT RAISE(ABORT, 'append-only: audit metadata cannot be deleted'); END",
    ),
];

/// The genesis `prev_sha256` of the chain's first row.
pub const GENESIS_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The columns of a `cases` row the chain covers, in hashing order.
pub const CASE_FIELDS: &[&str] = &[
    "id",
    "created_unix",
    "image_sha256",
    "image_format",
    "width",
    "height",
    "frames",
    "deidentified_json",
    "labels_json",
    "review_threshold",
];

/// The columns of a `case_predictions` row the chain covers, in hashing order.
pub const PREDICTION_FIELDS: &[&str] = &[
    "case_id",
    "position",
    "classifier",
    "model_version",
    "family",
    "outcome",
    "suggested_label",
    "confidence",
    "latency_ms",
    "energy_wh",
    "energy_method",
    "detail_json",
    "resolved_model",
    "system_fingerprint",
    "model_digest",
];

/// The columns of a `case_decisions` row the chain covers, in hashing order.
pub const DECISION_FIELDS: &[&str] = &[
    "id",
    "case_id",
    "decided_unix",
    "reviewer",
    "final_label",
    "note",
    "user_id",
    "auth_method",
];

/// The chained tables, each with the columns it hashes.
pub(crate) const CHAINED: &[(&str, &[&str])] = &[
    ("cases", CASE_FIELDS),
    ("case_predictions", PREDICTION_FIELDS),
    ("case_decisions", DECISION_FIELDS),
];

/// `row_sha256` of one row (the serialisation is documented at the top of this module).
pub fn row_sha256(prev_sha256: &str, table: &str, chain_seq: i64, fields: &[&str], values: &[Value]) -> String {
    let mut h = Sha256::new();
    h.update(b"mica-audit-chain-v1\n");
    h.update(format!("prev={prev_sha256}\ntable={table}\nchain_seq=i:{chain_seq}\n").as_bytes());
    for (f, v) in fields.iter().zip(values) {
        h.update(f.as_bytes());
        h.update(b"=");
        match v {
            Value::Null => h.update(b"null"),
            Value::Integer(i) => h.update(format!("i:{i}").as_bytes()),
            Value::Real(x) => h.update(format!("r:{:016x}", x.to_bits()).as_bytes()),
            Value::Text(t) => {
                h.update(format!("t:{}:", t.len()).as_bytes());
                h.update(t.as_bytes());
            }
            Value::Blob(b) => {
                h.update(format!("b:{}:", b.len()).as_bytes());
                h.update(b);
            }
        }
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What SQLite will give back for a value bound now: NaN is stored as NULL and a REAL zero
/// loses its sign, so the hash is computed over what a later reader will see.
fn stored(v: Value) -> Value {
    match v {
        Value::Real(x) if x.is_nan() => Value::Null,
        Value::Real(x) if x == 0.0 => Value::Real(0.0),
        v => v,
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn opt_text(s: Option<&str>) -> Value {
    s.map(text).unwrap_or(Value::Null)
}

fn opt_real(x: Option<f64>) -> Value {
    x.map(Value::Real).unwrap_or(Value::Null)
}

/// The newest link: `(chain_seq, row_sha256)`, or `(0, genesis)` on an empty chain.
pub(crate) fn chain_head(conn: &Connection) -> rusqlite::Result<(i64, String)> {
    let mut best: Option<(i64, &str)> = None;
    for (table, _) in CHAINED {
        let m: Option<i64> = conn.query_row(&format!("SELECT MAX(chain_seq) FROM {table}"), [], |r| r.get(0))?;
        if let Some(m) = m {
            if best.is_none_or(|(b, _)| m > b) {
                best = Some((m, table));
            }
        }
    }
    match best {
        None => Ok((0, GENESIS_SHA256.to_string())),
        Some((seq, table)) => {
            let h: Option<String> = conn.query_row(
                &format!("SELECT row_sha256 FROM {table} WHERE chain_seq = ?1"),
                params![seq],
                |r| r.get(0),
            )?;
            Ok((seq, h.unwrap_or_default()))
        }
    }
}

/// Inserts one chained row: `values` (in the order of `fields`) are hashed, `extra` columns
/// are stored unhashed. The caller holds a write transaction, so no other writer can take the
/// same place in the chain. The row is read back and its hash recomputed before the caller
/// commits: a row that a later verification would call broken is never written.
fn append_row(
    conn: &Connection,
    table: &str,
    fields: &[&str],
    values: Vec<Value>,
    extra: &[(&str, Value)],
) -> rusqlite::Result<(i64, String)> {
    let values: Vec<Value> = values.into_iter().map(stored).collect();
    let (head, prev) = chain_head(conn)?;
    let seq = head + 1;
    let hash = row_sha256(&prev, table, seq, fields, &values);
    let mut cols: Vec<&str> = fields.to_vec();
    cols.extend(extra.iter().map(|(c, _)| *c));
    cols.extend(["chain_seq", "prev_sha256", "row_sha256"]);
    let mut all = values;
    all.extend(extra.iter().map(|(_, v)| v.clone()));
    all.extend([Value::Integer(seq), Value::Text(prev.clone()), Value::Text(hash.clone())]);
    let marks = (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(",");
    conn.execute(
        &format!("INSERT INTO {table} ({}) VALUES ({marks})", cols.join(",")),
        params_from_iter(all),
    )?;
    let back: Vec<Value> = conn.query_row(
        &format!("SELECT {} FROM {table} WHERE chain_seq = ?1", fields.join(",")),
        params![seq],
        |r| (0..fields.len()).map(|i| r.get::<_, Value>(i)).collect(),
    )?;
    if row_sha256(&prev, table, seq, fields, &back) != hash {
        return Err(rusqlite::Error::ToSqlConversionFailure(format!(
            "{table}: the row as stored does not hash like the row as given; not recorded"
        )
        .into()));
    }
    Ok((seq, hash))
}

fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM audit_meta WHERE key = ?1", params![key], |r| r.get(0))
        .optional()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Brings the case tables of any older store up to this version (see the module
/// documentation): adds missing columns, chains the rows written before the chain existed
/// (once, recorded in `audit_meta`), and (re)creates the indexes and append-only triggers.
/// One write transaction, so two processes opening an old store at once migrate it once.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    // Most opens find nothing to do: they must not take the write lock (a reader next to a
    // busy server, a store on a read-only mount).
    if up_to_date(conn)? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (table, cols) in ADDED_COLUMNS {
        let have: Vec<String> = tx
            .prepare(&format!("PRAGMA table_info({table})"))?
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<Result<_, _>>()?;
        for (c, ty) in *cols {
            if !have.iter().any(|h| h == c) {
                tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {c} {ty}"))?;
            }
        }
    }
    if meta(&tx, "chain_started_unix")?.is_none() {
        // Only a store that never had the chain gets here; any trigger of the same name is
        // from this very code path failing half-way, and is recreated below.
        for (name, _) in TRIGGERS {
            tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {name}"))?;
        }
        let chained = chain_existing(&tx)?;
        let started = now_unix();
        for (k, v) in [
            ("chain_version", "1".to_string()),
            ("chain_started_unix", started.to_string()),
            ("chained_at_migration", chained.to_string()),
            (
                "chain_note",
                if chained == 0 {
                    "every row was chained when it was written".to_string()
                } else {
                    format!(
                        "rows with chain_seq 1..={chained} existed before the hash chain and were chained when this store was migrated; they were not protected when written"
                    )
                },
            ),
        ] {
            tx.execute("INSERT INTO audit_meta (key, value) VALUES (?1, ?2)", params![k, v])?;
        }
    }
    tx.execute_batch(CHAIN_INDEXES)?;
    for (name, body) in TRIGGERS {
        tx.execute_batch(&format!("CREATE TRIGGER IF NOT EXISTS {name} {body};"))?;
    }
    tx.commit()
}

/// Whether every added column, the chain's start, its indexes and every trigger are there.
fn up_to_date(conn: &Connection) -> rusqlite::Result<bool> {
    for (table, cols) in ADDED_COLUMNS {
        for (c, _) in *cols {
            let n: i64 = conn.query_row(
                &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                params![c],
                |r| r.get(0),
            )?;
            if n == 0 {
                return Ok(false);
            }
        }
    }
    let names = ["cases_chain", "case_predictions_chain", "case_decisions_chain"]
        .into_iter()
        .chain(TRIGGERS.iter().map(|(n, _)| *n));
    for name in names {
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = ?1", params![name], |r| r.get(0))?;
        if n == 0 {
            return Ok(false);
        }
    }
    Ok(meta(conn, "chain_started_unix")?.is_some())
}

/// Chains every unchained row in migration order; returns how many.
fn chain_existing(conn: &Connection) -> rusqlite::Result<i64> {
    let rowids = |sql: &str| -> rusqlite::Result<Vec<i64>> {
        conn.prepare(sql)?.query_map([], |r| r.get(0))?.collect()
    };
    let (mut seq, mut prev) = chain_head(conn)?;
    let start = seq;
    let mut link = |table: &str, fields: &[&str], rowid: i64| -> rusqlite::Result<()> {
        let values: Vec<Value> = conn.query_row(
            &format!("SELECT {} FROM {table} WHERE rowid = ?1", fields.join(",")),
            params![rowid],
            |r| (0..fields.len()).map(|i| r.get::<_, Value>(i)).collect(),
        )?;
        seq += 1;
        let hash = row_sha256(&prev, table, seq, fields, &values);
        conn.execute(
            &format!("UPDATE {table} SET chain_seq = ?1, prev_sha256 = ?2, row_sha256 = ?3 WHERE rowid = ?4"),
            params![seq, prev, hash, rowid],
        )?;
        prev = hash;
        Ok(())
    };
    for case in rowids("SELECT rowid FROM cases WHERE chain_seq IS NULL ORDER BY rowid")? {
        link("cases", CASE_FIELDS, case)?;
        for p in rowids(&format!(
            "SELECT p.rowid FROM case_predictions p JOIN cases c ON c.id = p.case_id WHERE c.rowid = {case} AND p.chain_seq IS NULL ORDER BY p.position"
        ))? {
            link("case_predictions", PREDICTION_FIELDS, p)?;
        }
    }
    for p in rowids("SELECT rowid FROM case_predictions WHERE chain_seq IS NULL ORDER BY rowid")? {
        link("case_predictions", PREDICTION_FIELDS, p)?;
    }
    for d in rowids("SELECT rowid FROM case_decisions WHERE chain_seq IS NULL ORDER BY id")? {
        link("case_decisions", DECISION_FIELDS, d)?;
    }
    Ok(seq - start)
}

/// How the person who decided was identified (`auth_method` of a decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// A named user of the server's `--users` file.
    UsersFile,
    /// A user named by a trusted reverse proxy's header.
    ProxyHeader,
    /// Someone holding the server's shared token: not a person's identity.
    Token,
    /// No authentication: the reviewer name is whatever was typed.
    None,
}

impl AuthMethod {
    /// The value stored in `case_decisions.auth_method`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::UsersFile => "users-file",
            AuthMethod::ProxyHeader => "proxy-header",
            AuthMethod::Token => "token",
            AuthMethod::None => "none",
        }
    }
}

/// A decision to record, with the identity behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDecision<'a> {
    pub case_id: &'a str,
    pub decided_unix: i64,
    /// The name shown with the decision: the authenticated user's display name where there is
    /// identity, the free text typed where there is none.
    pub reviewer: &'a str,
    pub final_label: &'a str,
    pub note: Option<&'a str>,
    /// The authenticated identity (user name in the users file, or the proxy header's value);
    /// `None` without authentication or with only a shared token.
    pub user_id: Option<&'a str>,
    pub auth_method: AuthMethod,
}

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
    /// The model the provider says answered (`mica_core::Prediction::resolved_model`): for an
    /// alias such as `gpt-4o`, the dated snapshot behind it. `model_version` is what was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_model: Option<String>,
    /// The provider's `system_fingerprint` (`mica_core::Prediction::system_fingerprint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Digest of the weights where the server reports one (`mica_core::Prediction::model_digest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_digest: Option<String>,
    /// A cascade's account of itself: which stage answered and why ("CNN confidence 0.62
    /// below 0.80: asked llm:...", "CNN confident (0.93 >= 0.80): llm:... not asked").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<String>,
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
    /// The authenticated identity; `None` for decisions made without one (and all decisions
    /// recorded before mica knew identities).
    #[serde(default)]
    pub user_id: Option<String>,
    /// `users-file`, `proxy-header`, `token` or `none` ([`AuthMethod`]); `None` where unknown
    /// (decisions recorded through [`Store::add_decision`] or before mica recorded it).
    #[serde(default)]
    pub auth_method: Option<String>,
    /// This decision's link in the hash chain; `None` only on a row that escaped the chain.
    #[serde(default)]
    pub row_sha256: Option<String>,
}

const DECISION_COLUMNS: &str = "id, case_id, decided_unix, reviewer, final_label, note, user_id, auth_method, row_sha256";

fn decision_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Decision> {
    Ok(Decision {
        id: r.get(0)?,
        case_id: r.get(1)?,
        decided_unix: r.get(2)?,
        reviewer: r.get(3)?,
        final_label: r.get(4)?,
        note: r.get(5)?,
        user_id: r.get(6)?,
        auth_method: r.get(7)?,
        row_sha256: r.get(8)?,
    })
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

fn append_prediction_row(conn: &Connection, case_id: &str, position: i64, p: &CasePrediction) -> rusqlite::Result<()> {
    append_row(
        conn,
        "case_predictions",
        PREDICTION_FIELDS,
        vec![
            text(case_id),
            Value::Integer(position),
            text(&p.classifier),
            text(&p.model_version),
            text(&p.family),
            text(&p.outcome),
            opt_text(p.suggested_label.as_deref()),
            opt_real(p.confidence),
            Value::Real(p.latency_ms),
            opt_real(p.energy_wh),
            text(&p.energy_method),
            Value::Text(json(p)),
            opt_text(p.resolved_model.as_deref()),
            opt_text(p.system_fingerprint.as_deref()),
            opt_text(p.model_digest.as_deref()),
        ],
        &[],
    )
    .map(|_| ())
}

impl Store {
    /// Records a classified case with all its suggestions (one transaction), each row a link
    /// of the audit chain.
    pub fn insert_case(&mut self, c: &CaseRecord) -> Result<(), ReportError> {
        let path = self.path.clone();
        let e = move |e: rusqlite::Error| ReportError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        append_row(
            &tx,
            "cases",
            CASE_FIELDS,
            vec![
                text(&c.id),
                Value::Integer(c.created_unix),
                text(&c.image_sha256),
                text(&c.image_format),
                Value::Integer(c.width.into()),
                Value::Integer(c.height.into()),
                Value::Integer(c.frames.into()),
                Value::Text(json(&c.deidentified)),
                Value::Text(json(&c.labels)),
                Value::Real(c.review_threshold),
            ],
            &[
                ("needs_review", Value::Integer(c.needs_review.into())),
                ("review_reasons_json", Value::Text(json(&c.review_reasons))),
            ],
        )
        .map_err(&e)?;
        for (i, p) in c.predictions.iter().enumerate() {
            append_prediction_row(&tx, &c.id, i as i64, p).map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    /// Appends one more suggestion to an existing case (an answer that arrived after the case
    /// was recorded); returns its position. Decisions recorded before it did not show it, and
    /// the export says so.
    pub fn append_prediction(&mut self, case_id: &str, p: &CasePrediction) -> Result<usize, ReportError> {
        let path = self.path.clone();
        let e = move |e: rusqlite::Error| ReportError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        let position: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM case_predictions WHERE case_id = ?1",
                params![case_id],
                |r| r.get(0),
            )
            .map_err(&e)?;
        append_prediction_row(&tx, case_id, position, p).map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(position as usize)
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

    /// Appends a decision without an identity (`user_id` and `auth_method` left empty);
    /// returns it with its id. The case must exist. Prefer [`Store::record_decision`].
    pub fn add_decision(
        &mut self,
        case_id: &str,
        decided_unix: i64,
        reviewer: &str,
        final_label: &str,
        note: Option<&str>,
    ) -> Result<Decision, ReportError> {
        self.insert_decision(case_id, decided_unix, reviewer, final_label, note, None, None)
    }

    /// Appends a decision with the identity of who made it; returns it with its id and hash.
    /// The case must exist.
    pub fn record_decision(&mut self, d: &NewDecision<'_>) -> Result<Decision, ReportError> {
        self.insert_decision(
            d.case_id,
            d.decided_unix,
            d.reviewer,
            d.final_label,
            d.note,
            d.user_id,
            Some(d.auth_method.as_str()),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_decision(
        &mut self,
        case_id: &str,
        decided_unix: i64,
        reviewer: &str,
        final_label: &str,
        note: Option<&str>,
        user_id: Option<&str>,
        auth_method: Option<&str>,
    ) -> Result<Decision, ReportError> {
        let path = self.path.clone();
        let e = move |e: rusqlite::Error| ReportError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        // The id is part of the hash, so it is chosen here rather than by AUTOINCREMENT, the
        // same way AUTOINCREMENT would: never an id used before.
        let id: i64 = tx
            .query_row(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'case_decisions'), 0), COALESCE((SELECT MAX(id) FROM case_decisions), 0)) + 1",
                [],
                |r| r.get(0),
            )
            .map_err(&e)?;
        let (_, hash) = append_row(
            &tx,
            "case_decisions",
            DECISION_FIELDS,
            vec![
                Value::Integer(id),
                text(case_id),
                Value::Integer(decided_unix),
                text(reviewer),
                text(final_label),
                opt_text(note),
                opt_text(user_id),
                opt_text(auth_method),
            ],
            &[],
        )
        .map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(Decision {
            id,
            case_id: case_id.to_string(),
            decided_unix,
            reviewer: reviewer.to_string(),
            final_label: final_label.to_string(),
            note: note.map(String::from),
            user_id: user_id.map(String::from),
            auth_method: auth_method.map(String::from),
            row_sha256: Some(hash),
        })
    }

    /// Every decision on a case, oldest first (the last one is the one that counts).
    pub fn decisions(&self, case_id: &str) -> Result<Vec<Decision>, ReportError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {DECISION_COLUMNS} FROM case_decisions WHERE case_id = ?1 ORDER BY id"))
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map(params![case_id], decision_row).map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// The latest `limit` decisions, newest first, each with the suggestions the physician
    /// had in front of them.
    pub fn recent_decisions(&self, limit: usize) -> Result<Vec<(Decision, Vec<Suggestion>)>, ReportError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {DECISION_COLUMNS} FROM case_decisions ORDER BY id DESC LIMIT ?1"))
            .map_err(|e| self.err(e))?;
        let decisions = stmt
            .query_map(params![limit as i64], decision_row)
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
            resolved_model: None,
            system_fingerprint: None,
            model_digest: None,
            cascade: None,
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

    /// The case tables exactly as mica created them before the audit chain (with the
    /// `ON DELETE CASCADE` that the triggers now neutralise).
    const OLD_SCHEMA: &str = "
CREATE TABLE cases (id TEXT PRIMARY KEY, created_unix INTEGER NOT NULL, image_sha256 TEXT NOT NULL, image_format TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, frames INTEGER NOT NULL, deidentified_json TEXT NOT NULL, labels_json TEXT NOT NULL, review_threshold REAL NOT NULL, needs_review INTEGER NOT NULL, review_reasons_json TEXT NOT NULL);
CREATE TABLE case_predictions (case_id TEXT NOT NULL REFERENCES cases(id) ON DELETE CASCADE, position INTEGER NOT NULL, classifier TEXT NOT NULL, model_version TEXT NOT NULL, family TEXT NOT NULL, outcome TEXT NOT NULL, suggested_label TEXT, confidence REAL, latency_ms REAL NOT NULL, energy_wh REAL, energy_method TEXT NOT NULL, detail_json TEXT NOT NULL, PRIMARY KEY (case_id, position));
CREATE TABLE case_decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL REFERENCES cases(id) ON DELETE CASCADE, decided_unix INTEGER NOT NULL, reviewer TEXT NOT NULL, final_label TEXT NOT NULL, note TEXT);
CREATE INDEX case_decisions_case ON case_decisions(case_id);
CREATE INDEX cases_created ON cases(created_unix);
";

    fn raw(path: &std::path::Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch("PRAGMA foreign_keys = ON;").unwrap();
        c
    }

    fn refused(c: &Connection, sql: &str) -> String {
        let e = c.execute(sql, []).expect_err(sql).to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
        e
    }

    fn sample_store(path: &std::path::Path) -> Store {
        let mut st = Store::open(path).unwrap();
        let mut llm = pred("llm:openai/gpt-4o", "openai/gpt-4o", Some("b"));
        llm.family = "llm".into();
        llm.resolved_model = Some("gpt-4o-2024-08-06".into());
        llm.system_fingerprint = Some("fp_abc".into());
        st.insert_case(&case("c1", vec![pred("cnn:small", "v1", Some("a")), llm])).unwrap();
        st.insert_case(&case("c2", vec![pred("cnn:small", "v1", Some("b"))])).unwrap();
        st.record_decision(&NewDecision {
            case_id: "c1",
            decided_unix: 1_700_000_100,
            reviewer: "Dr A",
            final_label: "a",
            note: Some("line one\nline two, \"quoted\""),
            user_id: Some("alice"),
            auth_method: AuthMethod::UsersFile,
        })
        .unwrap();
        st.add_decision("c2", 1_700_000_200, "Dr B", "b", None).unwrap();
        st
    }

    #[test]
    fn the_database_refuses_to_update_or_delete_the_trail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        drop(sample_store(&path));
        let c = raw(&path);
        refused(&c, "UPDATE case_decisions SET final_label = 'b' WHERE case_id = 'c1'");
        refused(&c, "DELETE FROM case_decisions");
        refused(&c, "UPDATE case_predictions SET suggested_label = 'a'");
        refused(&c, "DELETE FROM case_predictions WHERE case_id = 'c2'");
        refused(&c, "DELETE FROM cases WHERE id = 'c1'");
        refused(&c, "UPDATE cases SET image_sha256 = 'x' WHERE id = 'c1'");
        refused(&c, "UPDATE audit_meta SET value = '0'");
        refused(&c, "DELETE FROM audit_meta");
        // Without foreign-key enforcement (the sqlite3 shell's default) the triggers still hold.
        c.execute_batch("PRAGMA foreign_keys = OFF;").unwrap();
        refused(&c, "DELETE FROM cases");
        // What is derived from the suggestions may be updated as answers arrive.
        c.execute("UPDATE cases SET needs_review = 0 WHERE id = 'c1'", []).unwrap();
        let n: i64 = c.query_row("SELECT COUNT(*) FROM case_decisions", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 2);
        drop(c);
        let st = Store::open_read_only(&path).unwrap();
        let r = st.verify_chain(None).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.rows, r.cases, r.predictions, r.decisions), (7, 2, 3, 2));
        assert_eq!((r.head_seq, r.chained_at_migration), (7, 0));
    }

    #[test]
    fn decisions_carry_identity_and_predictions_the_resolved_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let mut st = sample_store(&path);
        let c = st.case("c1").unwrap().unwrap();
        assert_eq!(c.predictions[1].resolved_model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(c.predictions[1].system_fingerprint.as_deref(), Some("fp_abc"));
        let d = st.decisions("c1").unwrap();
        assert_eq!(d[0].user_id.as_deref(), Some("alice"));
        assert_eq!(d[0].auth_method.as_deref(), Some("users-file"));
        assert_eq!(d[0].row_sha256.as_ref().map(|h| h.len()), Some(64));
        let d2 = &st.decisions("c2").unwrap()[0];
        assert_eq!((d2.user_id.as_deref(), d2.auth_method.as_deref()), (None, None));
        // A late answer is appended to its case, after the decision that did not see it.
        let mut late = pred("llm:ollama/x", "ollama/x", Some("a"));
        late.model_digest = Some("sha256:feed".into());
        assert_eq!(st.append_prediction("c1", &late).unwrap(), 2);
        assert_eq!(st.case("c1").unwrap().unwrap().predictions.len(), 3);
        let stored: Option<String> = st
            .conn
            .query_row("SELECT resolved_model FROM case_predictions WHERE case_id='c1' AND position=1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored.as_deref(), Some("gpt-4o-2024-08-06"));
        let e = st.audit_entries().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].predictions_shown.len(), 2, "the late answer was not on the page");
        assert_eq!(e[0].predictions_shown[1].resolved_model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(e[0].decided_utc, "2023-11-14T22:15:00Z");
        assert!(!e[0].chained_at_migration);
        assert_eq!(e[0].row_sha256, d[0].row_sha256);
        let mut buf = Vec::new();
        audit::write_csv(&e, &mut buf).unwrap();
        assert_eq!(audit::read_csv(&buf[..]).unwrap(), e);
        // The serde header and the one written for an empty trail are the same.
        let mut empty = Vec::new();
        audit::write_csv(&[], &mut empty).unwrap();
        assert!(buf.starts_with(&empty), "{}", String::from_utf8_lossy(&empty));
        assert!(audit::read_csv(&empty[..]).unwrap().is_empty());
        assert!(st.verify_chain(None).unwrap().ok);
    }

    #[test]
    fn verification_names_the_first_tampered_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let head = {
            let st = sample_store(&path);
            st.verify_chain(None).unwrap().head_sha256
        };
        let c = raw(&path);
        c.execute_batch("DROP TRIGGER case_decisions_append_only_update;").unwrap();
        c.execute("UPDATE case_decisions SET final_label = 'b' WHERE case_id = 'c1'", []).unwrap();
        drop(c);
        let st = Store::open_read_only(&path).unwrap();
        let r = st.verify_chain(Some(&head)).unwrap();
        assert!(!r.ok);
        assert_eq!(r.missing_triggers, vec!["case_decisions_append_only_update".to_string()]);
        let b = r.broken.unwrap();
        assert_eq!((b.table.as_str(), b.row.as_str(), b.chain_seq), ("case_decisions", "id=1", Some(6)));
        assert!(b.problem.contains("changed"), "{}", b.problem);
        assert_ne!(b.expected, b.found);
        assert_eq!(r.expected_head_missing, None);
        drop(st);

        // Rehashing the edited row moves the break to the next link; removing a row shows
        // at the one after it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        drop(sample_store(&path));
        let c = raw(&path);
        for (name, _) in TRIGGERS {
            c.execute_batch(&format!("DROP TRIGGER {name};")).unwrap();
        }
        c.execute("DELETE FROM case_predictions WHERE case_id = 'c2'", []).unwrap();
        drop(c);
        let r = Store::open_read_only(&path).unwrap().verify_chain(None).unwrap();
        let b = r.broken.unwrap();
        assert_eq!((b.table.as_str(), b.row.as_str()), ("case_decisions", "id=1"));
        assert!(b.problem.contains("skips"), "{}", b.problem);
        // Opening it for writing restores the triggers but not the chain.
        drop(Store::open(&path).unwrap());
        let r = Store::open_read_only(&path).unwrap().verify_chain(None).unwrap();
        assert!(r.missing_triggers.is_empty() && r.broken.is_some());
    }

    #[test]
    fn an_old_store_is_migrated_and_chained_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        let c = raw(&path);
        c.execute_batch(OLD_SCHEMA).unwrap();
        c.execute(
            "INSERT INTO cases VALUES ('old1', 1690000000, 'ab', 'png', 4, 4, 1, '[]', '[\"a\",\"b\"]', 0.7, 1, '[]')",
            [],
        )
        .unwrap();
        let detail = json(&pred("cnn:small", "v0", Some("a")));
        c.execute(
            "INSERT INTO case_predictions VALUES ('old1', 0, 'cnn:small', 'v0', 'cnn', 'answered', 'a', 0.8, 3.0, NULL, 'estimated:cpu-time*tdp', ?1)",
            params![detail],
        )
        .unwrap();
        c.execute("INSERT INTO case_decisions (case_id, decided_unix, reviewer, final_label) VALUES ('old1', 1690000100, 'Dr Old', 'a')", [])
            .unwrap();
        drop(c);
        assert!(Store::open_read_only(&path).is_err(), "an unmigrated store has no chain to verify");

        let mut st = Store::open(&path).unwrap();
        assert_eq!(st.case("old1").unwrap().unwrap().predictions[0].model_version, "v0");
        st.insert_case(&case("new1", vec![pred("cnn:small", "v1", Some("b"))])).unwrap();
        let d = st
            .record_decision(&NewDecision {
                case_id: "new1",
                decided_unix: 1_700_000_000,
                reviewer: "Dr New",
                final_label: "b",
                note: None,
                user_id: Some("proxy-user"),
                auth_method: AuthMethod::ProxyHeader,
            })
            .unwrap();
        assert_eq!(d.id, 2);
        drop(st);
        // A second open migrates nothing more.
        drop(Store::open(&path).unwrap());
        let st = Store::open_read_only(&path).unwrap();
        let r = st.verify_chain(None).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.rows, r.chained_at_migration, r.head_seq), (6, 3, 6));
        assert!(r.chain_started_unix.is_some());
        let e = st.audit_entries().unwrap();
        assert_eq!(e.len(), 2);
        assert!(e[0].chained_at_migration && !e[1].chained_at_migration);
        assert_eq!(e[0].reviewer, "Dr Old");
        assert_eq!(e[1].auth_method.as_deref(), Some("proxy-header"));
        drop(st);
        // The old ON DELETE CASCADE can no longer take decisions with a case.
        let c = raw(&path);
        refused(&c, "DELETE FROM cases WHERE id = 'old1'");
        refused(&c, "UPDATE case_decisions SET reviewer = 'someone else'");
        let wal: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(wal, "wal");
    }
}
